"""QuantizeActivationsPass: static Q/DQ and the per-token subgraph compute numpy's fake quantization."""

from __future__ import annotations

import numpy as np
import pytest
import tinygraph as t

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.quantize_activations import QuantizeActivationsPass
from fptq_onnx.plan import ActMode

L = t.L


def fq_static(x: np.ndarray, s: float) -> np.ndarray:
    s = np.float32(s)
    return (np.clip(np.rint(x / s), -128, 127) * s).astype(np.float32)


def fq_per_token(x: np.ndarray) -> np.ndarray:
    m = np.abs(x).max(axis=-1, keepdims=True)
    s = (np.maximum(m, np.float32(1e-8)) / np.float32(127)).astype(np.float32)
    return (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_static_qdq_matches_numpy_fake_quant():
    x = t.inputs()
    w = t.weights()
    n = x * w[f"{L}.input_layernorm.weight"]
    scale = float(np.abs(n).max() / 127 * 0.5)  # half range: the outlier saturates, clipping is exercised
    model = t.build()
    result = QuantizeActivationsPass({f"{L}.q_proj": (ActMode.STATIC, scale)})(model)
    assert result.modified
    got = t.run(result.model, x)
    _close(got["q"], fq_static(n, scale) @ w[f"{L}.q_proj.weight"])
    assert np.abs(got["q"] - n @ w[f"{L}.q_proj.weight"]).max() > 1e-3  # activation rounding happened
    # the others are untouched
    _close(got["k"], t.numpy_reference(x, w)["k"].astype(np.float32))
    q = t.node(result.model, f"{L}.q_proj").inputs[0].producer()
    assert q.op_type == "DequantizeLinear"
    assert q.inputs[0].producer().op_type == "QuantizeLinear"


def test_per_token_matches_numpy_including_zero_row():
    x = t.inputs(zero_row=True)
    w = t.weights()
    result = QuantizeActivationsPass({f"{L}.up_proj": (ActMode.PER_TOKEN, None),
                                      f"{L}.down_proj": (ActMode.PER_TOKEN, None)})(t.build())
    got = t.run(result.model, x)
    u = x @ w[f"{L}.up_proj.weight"]
    assert np.all(u[1, 2] == 0)
    u_fq = fq_per_token(x) @ w[f"{L}.up_proj.weight"] + w[f"{L}.up_proj.bias"]
    g = x @ w[f"{L}.gate_proj.weight"]
    h = (g / (1 + np.exp(-g)) * u_fq).astype(np.float32)
    ref_d = fq_per_token(h) @ w[f"{L}.down_proj.weight"]
    _close(got["d"], ref_d)
    assert np.all(np.isfinite(got["d"]))
    assert np.all(got["d"][1, 2] == 0)  # zero row: s = eps/127, q = 0, no NaN
    assert t.op_count(result.model, "QuantizeLinear") == 2


def test_consumers_of_one_input_share_one_qdq():
    model = t.build()
    decisions = {f"{L}.{n}": (ActMode.STATIC, 0.02) for n in ("q_proj", "k_proj", "v_proj")}
    m = QuantizeActivationsPass(decisions)(model).model
    assert t.op_count(m, "QuantizeLinear") == 1
    dq = {t.node(m, f"{L}.{n}").inputs[0] for n in ("q_proj", "k_proj", "v_proj")}
    assert len(dq) == 1


def test_per_token_consumers_share_one_subgraph():
    decisions = {f"{L}.{n}": (ActMode.PER_TOKEN, None) for n in ("gate_proj", "up_proj")}
    m = QuantizeActivationsPass(decisions)(t.build()).model
    assert t.op_count(m, "QuantizeLinear") == 1
    assert t.op_count(m, "ReduceMax") == 1


def test_different_decisions_on_one_input_get_their_own_qdq():
    decisions = {f"{L}.q_proj": (ActMode.STATIC, 0.02), f"{L}.k_proj": (ActMode.STATIC, 0.03),
                 f"{L}.v_proj": (ActMode.PER_TOKEN, None)}
    m = QuantizeActivationsPass(decisions)(t.build()).model
    assert t.op_count(m, "QuantizeLinear") == 3
    x = t.inputs()
    w = t.weights()
    n = x * w[f"{L}.input_layernorm.weight"]
    got = t.run(m, x)
    _close(got["q"], fq_static(n, 0.02) @ w[f"{L}.q_proj.weight"])
    _close(got["k"], fq_static(n, 0.03) @ w[f"{L}.k_proj.weight"] + w[f"{L}.k_proj.bias"])


@pytest.mark.parametrize("mode", [ActMode.NONE, ActMode.PER_BLOCK])
def test_none_and_per_block_leave_graph_untouched(mode):
    model = t.build()
    before = [(n.op_type, n.name) for n in model.graph]
    result = QuantizeActivationsPass({f"{L}.q_proj": (mode, None), f"{L}.down_proj": (mode, 0.1)})(model)
    assert not result.modified
    assert [(n.op_type, n.name) for n in result.model.graph] == before
    x = t.inputs()
    got = t.run(result.model, x)
    ref = t.numpy_reference(x, t.weights())
    _close(got["q"], ref["q"].astype(np.float32))


@pytest.mark.parametrize("scale", [0.0, -0.5, None, float("nan")])
def test_static_needs_positive_scale(scale):
    with pytest.raises(FptqError, match="positive scale"):
        QuantizeActivationsPass({f"{L}.q_proj": (ActMode.STATIC, scale)})(t.build())


def test_unknown_name_errors():
    with pytest.raises(FptqError, match="no MatMul"):
        QuantizeActivationsPass({f"{L}.missing": (ActMode.STATIC, 0.1)})(t.build())
