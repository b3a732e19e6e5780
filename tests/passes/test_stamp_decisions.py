"""StampDecisionsPass: each linear's decision on its node (metadata_props + doc string), the ORT hint on the model."""

from __future__ import annotations

import numpy as np
import pytest
import tinygraph as t

from fptq_onnx.formats import apply_format
from fptq_onnx.passes.stamp_decisions import ORT_ACCURACY_LEVEL_KEY, StampDecisionsPass
from fptq_onnx.plan import ActMode, Equalization, LinearPlan, QuantPlan
from fptq_onnx.quant import quantize_int4

L = t.L


def make_plan(with_weights: bool = False) -> QuantPlan:
    w = t.weights()
    plan = QuantPlan(method="fptq", config={"v0": 1.0}, calibration={"source": "random"})
    s = np.linspace(0.5, 2.0, t.K).astype(np.float32)
    plan.equalizations.append(Equalization(f"{L}.input_layernorm", "norm", [f"{L}.q_proj", f"{L}.k_proj"], s, "lae"))
    plan.linears[f"{L}.q_proj"] = LinearPlan(f"{L}.q_proj", "lae+static", ActMode.STATIC, 12.3456, 3.21, 0.0253,
                                            equalized_by=f"{L}.input_layernorm", reason="v0 <= max < v1")
    plan.linears[f"{L}.k_proj"] = LinearPlan(f"{L}.k_proj", "lae+static", ActMode.STATIC, 12.3456, 3.21, 0.0253,
                                            equalized_by=f"{L}.input_layernorm", reason="v0 <= max < v1")
    plan.linears[f"{L}.down_proj"] = LinearPlan(f"{L}.down_proj", "per_token", ActMode.PER_TOKEN, 400.0, 400.0,
                                               reason="max >= v1")
    plan.linears[f"{L}.missing_proj"] = LinearPlan(f"{L}.missing_proj", "static", ActMode.STATIC, 1.0, 1.0, 0.01)
    if with_weights:
        eq_w = {n: w[f"{n}.weight"] * (s[:, None] if n != f"{L}.down_proj" else 1.0) for n in plan.linears if "missing" not in n}
        for n, arr in eq_w.items():
            plan.linears[n].weight = quantize_int4(arr, t.G)
        del plan.linears[f"{L}.missing_proj"]
    return plan


@pytest.mark.parametrize("fmt, level", [("qdq", "0"), ("w4a8", "0"), ("native", "4")])
def test_stamps_node_metadata_and_model_hint(fmt, level):
    plan = make_plan()
    result = StampDecisionsPass(plan, fmt)(t.build())
    assert result.modified
    m = result.model
    q = t.node(m, f"{L}.q_proj")
    assert q.metadata_props["fptq.strategy"] == "lae+static"
    assert q.metadata_props["fptq.act_mode"] == "static"
    assert float(q.metadata_props["fptq.max_abs"]) == pytest.approx(12.35, rel=1e-3)
    assert float(q.metadata_props["fptq.act_scale"]) == pytest.approx(0.0253)
    assert q.metadata_props["fptq.equalized_by"] == f"{L}.input_layernorm"
    assert q.metadata_props["fptq.format"] == fmt
    assert q.doc_string and "strategy=lae+static" in q.doc_string
    d = t.node(m, f"{L}.down_proj")
    assert d.metadata_props["fptq.act_mode"] == "per_token"
    assert "fptq.act_scale" not in d.metadata_props  # None values are not written
    assert "fptq.weight" not in d.metadata_props
    assert not t.node(m, f"{L}.o_proj").metadata_props  # not in the plan: left alone
    assert m.metadata_props[ORT_ACCURACY_LEVEL_KEY] == level
    assert m.metadata_props["fptq.method"] == "fptq"
    assert m.metadata_props["fptq.format"] == fmt
    assert m.metadata_props["fptq.counts"] == str(plan.counts())


def test_weight_description_is_stamped():
    plan = make_plan(with_weights=True)
    m = StampDecisionsPass(plan, "qdq")(t.build()).model
    assert t.node(m, f"{L}.q_proj").metadata_props["fptq.weight"] == "int4 g32 sym"


def test_metadata_survives_serialisation():
    m = StampDecisionsPass(make_plan(), "qdq")(t.build()).model
    back = t.copy(m)
    assert t.node(back, f"{L}.q_proj").metadata_props["fptq.strategy"] == "lae+static"
    assert back.metadata_props[ORT_ACCURACY_LEVEL_KEY] == "0"


@pytest.mark.parametrize("fmt", ["qdq", "native"])
def test_formats_stamp_every_planned_linear(fmt):
    m = apply_format(t.build(direct_output=False), make_plan(with_weights=True), fmt)
    for name in (f"{L}.q_proj", f"{L}.k_proj", f"{L}.down_proj"):
        assert t.node(m, name).metadata_props.get("fptq.strategy"), name


def test_w4a8_format_stamps_lowered_linears():
    m = apply_format(t.build(direct_output=False), make_plan(with_weights=True), "w4a8")
    q = t.node(m, f"{L}.q_proj")
    assert q.op_type == "W4A8MatMul"
    assert q.metadata_props.get("fptq.strategy") == "lae+static"
    assert q.doc_string
