"""QuantizeWeightsPass: float B -> DequantizeLinear of the plan's integer weight, same numbers as numpy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import tinygraph as t

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.quant import quantize_int4, quantize_int8_per_channel

L = t.L
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _reference(model_weights: dict, replaced: dict, x: np.ndarray) -> dict:
    w = dict(model_weights)
    for name, qw in replaced.items():
        w[f"{name}.weight"] = qw.dequantize()
    return t.numpy_reference(x, w)


def _dq(model: ir.Model, name: str) -> ir.Node:
    node = t.node(model, name).inputs[1].producer()
    assert node is not None and node.op_type == "DequantizeLinear"
    return node


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_blocked_dq_matches_numpy(symmetric):
    model = t.build()
    w = t.weights()
    x = t.inputs()
    plan = {f"{L}.{n}": quantize_int4(w[f"{L}.{n}.weight"], t.G, symmetric) for n in LINEARS}
    result = QuantizeWeightsPass(plan)(model)
    assert result.modified
    m = result.model
    for name, qw in plan.items():
        dq = _dq(m, name)
        weight_q = dq.inputs[0].const_value
        assert weight_q.dtype == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4)
        assert len(dq.inputs) == (2 if symmetric else 3)
        # 4-bit is always blocked along K, one block included (o_proj: K == G), so the
        # W4A8 lowering sees one pattern
        assert dq.attributes.get_int("axis") == 0
        assert dq.attributes.get_int("block_size") == t.G
        assert dq.inputs[1].const_value.numpy().shape == qw.scales.shape
        assert f"{name}.weight" not in m.graph.initializers  # the float weight is gone
    # K = 48 with G = 32: a ragged last group on every K=48 linear
    assert plan[f"{L}.q_proj"].scales.shape[0] == 2
    got = t.run(m, x)
    ref = _reference(w, plan, x)
    for out in t.OUTPUTS:
        np.testing.assert_allclose(got[out], ref[out], rtol=1e-5, atol=1e-5 * np.abs(ref[out]).max())
    # and it is a real quantization: not the float function
    assert np.abs(got["q"] - t.numpy_reference(x, w)["q"]).max() > 1e-3


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int8_per_channel_is_per_axis_dq(symmetric):
    model = t.build()
    w = t.weights()
    x = t.inputs()
    plan = {f"{L}.{n}": quantize_int8_per_channel(w[f"{L}.{n}.weight"], symmetric) for n in ("q_proj", "down_proj")}
    m = QuantizeWeightsPass(plan)(model).model
    for name, qw in plan.items():
        dq = _dq(m, name)
        assert dq.inputs[0].const_value.dtype == (ir.DataType.INT8 if symmetric else ir.DataType.UINT8)
        assert dq.attributes.get_int("axis") == 1
        assert "block_size" not in dq.attributes
        assert dq.inputs[1].const_value.numpy().shape == (qw.q.shape[1],)
        assert f"{name}.weight" not in m.graph.initializers
    got = t.run(m, x)
    ref = _reference(w, plan, x)
    for out in t.OUTPUTS:
        np.testing.assert_allclose(got[out], ref[out], rtol=1e-5, atol=1e-5 * np.abs(ref[out]).max())


def test_untouched_linears_keep_float_weights():
    m = QuantizeWeightsPass({f"{L}.q_proj": quantize_int4(t.weights()[f"{L}.q_proj.weight"], t.G)})(t.build()).model
    assert f"{L}.k_proj.weight" in m.graph.initializers
    assert t.node(m, f"{L}.k_proj").inputs[1].name == f"{L}.k_proj.weight"
    assert t.op_count(m, "DequantizeLinear") == 1


def test_unknown_name_errors():
    qw = quantize_int4(t.weights()[f"{L}.q_proj.weight"], t.G)
    with pytest.raises(FptqError, match="no MatMul"):
        QuantizeWeightsPass({f"{L}.missing_proj": qw})(t.build())


def test_shape_mismatch_errors():
    qw = quantize_int4(np.ones((t.K, t.NQ + 1), np.float32), t.G)
    with pytest.raises(FptqError, match="planned weight"):
        QuantizeWeightsPass({f"{L}.q_proj": qw})(t.build())


def test_empty_plan_is_not_modified():
    assert not QuantizeWeightsPass({})(t.build()).modified
