"""LowerW4A8Pass: the qdq pattern -> fptq.W4A8MatMul, computing what the qdq graph computes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import tinygraph as t

from fptq_onnx import custom_ops
from fptq_onnx.errors import FptqError
from fptq_onnx.passes.lower_w4a8 import LowerW4A8Pass
from fptq_onnx.passes.quantize_activations import QuantizeActivationsPass
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.plan import ActMode
from fptq_onnx.quant import quantize_int4, quantize_int8_per_channel

try:
    custom_ops.library_path()
except FptqError as exc:  # pragma: no cover - only when the library was not built
    pytest.skip(f"libfptq_ops.so not built: {exc}", allow_module_level=True)

L = t.L
# K > G for all of these (K = 48 is ragged with G = 32; down_proj K = 64 is two full groups)
LOWERED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def qdq_model(act_mode: ActMode, symmetric: bool, names=LOWERED, act_names=LOWERED) -> ir.Model:
    w = t.weights()
    weights = {f"{L}.{n}": quantize_int4(w[f"{L}.{n}.weight"], t.G, symmetric) for n in names}
    scale = 0.03 if act_mode == ActMode.STATIC else None
    decisions = {f"{L}.{n}": (act_mode, scale) for n in act_names}
    model = QuantizeWeightsPass(weights)(t.build(direct_output=False)).model
    return QuantizeActivationsPass(decisions)(model).model


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("act_mode", [ActMode.STATIC, ActMode.PER_TOKEN], ids=["static", "per_token"])
def test_lowered_matches_qdq(act_mode, symmetric):
    qdq = qdq_model(act_mode, symmetric)
    x = t.inputs(zero_row=True)
    ref = t.run_list(qdq, x)
    result = LowerW4A8Pass([f"{L}.{n}" for n in LOWERED])(t.copy(qdq))
    assert result.modified
    m = result.model
    assert m.opset_imports.get("fptq") == 1
    assert t.op_count(m, "W4A8MatMul", "fptq") == len(LOWERED)
    assert t.op_count(m, "QuantizeLinear") == 0
    assert t.op_count(m, "ReduceMax") == 0 and t.op_count(m, "Abs") == 0  # per-token subgraph removed
    assert t.op_count(m, "DequantizeLinear") == 0  # o_proj stays float here
    assert {n.name for n in m.graph if n.op_type == "MatMul"} == {f"{L}.o_proj"}
    for n in LOWERED:
        fused = t.node(m, f"{L}.{n}")
        assert fused.domain == "fptq" and fused.op_type == "W4A8MatMul"
        assert fused.attributes.get_string("act_mode") == act_mode.value
        assert fused.attributes.get_int("group_size") == t.G
    got = t.run_list(m, x, custom_ops=True)
    for out_ref, out_got in zip(ref, got):
        _close(out_got, out_ref)


def test_lowered_graph_output_keeps_its_name():
    """q_proj's MatMul output is itself the graph output 'q': lowering must keep it, same name."""
    w = t.weights()
    model = QuantizeWeightsPass({f"{L}.q_proj": quantize_int4(w[f"{L}.q_proj.weight"], t.G)})(t.build()).model
    qdq = QuantizeActivationsPass({f"{L}.q_proj": (ActMode.STATIC, 0.03)})(model).model
    x = t.inputs()
    ref = t.run(qdq, x)
    m = LowerW4A8Pass([f"{L}.q_proj"])(t.copy(qdq)).model
    assert [v.name for v in m.graph.outputs] == list(t.OUTPUTS)
    _close(t.run(m, x, custom_ops=True)["q"], ref["q"])


@pytest.mark.parametrize(
    "case",
    ["float_weight", "no_act_qdq", "int8_weight", "missing"],
)
def test_not_the_pattern(case):
    name = f"{L}.q_proj"
    w = t.weights()[f"{name}.weight"]
    if case == "float_weight":
        model = QuantizeActivationsPass({name: (ActMode.STATIC, 0.03)})(t.build()).model
    elif case == "no_act_qdq":
        model = QuantizeWeightsPass({name: quantize_int4(w, t.G)})(t.build()).model
    elif case == "int8_weight":
        model = QuantizeWeightsPass({name: quantize_int8_per_channel(w)})(t.build()).model
        model = QuantizeActivationsPass({name: (ActMode.STATIC, 0.03)})(model).model
    else:
        model = t.build()
        name = f"{L}.missing_proj"
    model = t.copy(model)
    with pytest.raises(FptqError, match="not the int4-weight"):
        LowerW4A8Pass([name])(t.copy(model))
    before = [(n.op_type, n.name) for n in model.graph]
    result = LowerW4A8Pass([name], required=False)(model)
    assert not result.modified
    assert [(n.op_type, n.name) for n in result.model.graph] == before
    assert "fptq" not in result.model.opset_imports


def test_mixed_required_false_lowers_only_the_pattern():
    qdq = qdq_model(ActMode.STATIC, True, names=("q_proj", "k_proj"), act_names=("q_proj",))
    x = t.inputs()
    ref = t.run_list(qdq, x)
    m = LowerW4A8Pass([f"{L}.q_proj", f"{L}.k_proj"], required=False)(t.copy(qdq)).model
    assert t.node(m, f"{L}.q_proj").op_type == "W4A8MatMul"
    assert t.node(m, f"{L}.k_proj").op_type == "MatMul"  # int4 weight but float activations: weight-only
    for out_ref, out_got in zip(ref, t.run_list(m, x, custom_ops=True)):
        _close(out_got, out_ref)


def test_single_group_int4_weight_lowers():
    """o_proj has K = 32 = G: one group per column."""
    qdq = qdq_model(ActMode.STATIC, True, names=("o_proj",), act_names=("o_proj",))
    x = t.inputs()
    ref = t.run_list(qdq, x)
    m = LowerW4A8Pass([f"{L}.o_proj"])(t.copy(qdq)).model
    for out_ref, out_got in zip(ref, t.run_list(m, x, custom_ops=True)):
        _close(out_got, out_ref)
