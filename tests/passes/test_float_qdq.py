"""FloatQdqPass: the qdq graph rewritten into float ops computes what ORT computes for the original."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
import tinygraph as t

from fptq_onnx.passes.float_qdq import FloatQdqPass, dequantize
from fptq_onnx.passes.quantize_activations import QuantizeActivationsPass
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.plan import ActMode
from fptq_onnx.quant import quantize_int4, quantize_int8_per_channel

L = t.L
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _qdq_model(symmetric: bool, int8_down: bool = False) -> ir.Model:
    """Every linear int4 g32 (down_proj int8 per-channel if asked); static and per-token activations."""
    w = t.weights()
    weights = {f"{L}.{n}": quantize_int4(w[f"{L}.{n}.weight"], t.G, symmetric) for n in LINEARS}
    if int8_down:
        weights[f"{L}.down_proj"] = quantize_int8_per_channel(w[f"{L}.down_proj.weight"], symmetric)
    x = t.inputs()
    n = x * w[f"{L}.input_layernorm.weight"]
    static = float(np.abs(n).max() / 127 * 0.5)  # half range: the outlier saturates
    acts = {f"{L}.q_proj": (ActMode.STATIC, static), f"{L}.k_proj": (ActMode.STATIC, static),
            f"{L}.o_proj": (ActMode.STATIC, 0.01), f"{L}.gate_proj": (ActMode.PER_TOKEN, None),
            f"{L}.up_proj": (ActMode.PER_TOKEN, None), f"{L}.down_proj": (ActMode.PER_TOKEN, None)}
    model = QuantizeActivationsPass(acts)(QuantizeWeightsPass(weights)(t.build()).model).model
    return ir.passes.common.ShapeInferencePass()(model).model


@pytest.mark.parametrize("symmetric,int8_down", [(True, False), (False, True)], ids=["int4-sym", "asym-int8"])
def test_rewritten_graph_computes_the_same_as_ort_on_the_original(symmetric, int8_down):
    model = _qdq_model(symmetric, int8_down)
    x = t.inputs(zero_row=True)
    want = t.run(t.copy(model), x)
    result = FloatQdqPass()(model)
    assert result.modified
    assert t.op_count(result.model, "QuantizeLinear") == t.op_count(result.model, "DequantizeLinear") == 0
    assert t.op_count(result.model, "Round") == 4  # q/k share one static Q, gate/up one per-token Q
    got = t.run(result.model, x)
    for name in t.OUTPUTS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5 * np.abs(want[name]).max())
    # the weights really are folded: no integer initializer is left
    integer = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}
    assert not [v.name for v in result.model.graph.initializers.values() if v.const_value.dtype in integer]


def test_dequantize_matches_the_definition_for_ragged_blocks():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (48, 5)).astype(np.uint8)
    scale = rng.random((2, 5)).astype(np.float32)  # K = 48, G = 32: the second block is ragged
    zp = rng.integers(0, 16, (2, 5)).astype(np.uint8)
    got = dequantize(q, scale, zp, axis=0, block_size=32)
    rows = np.arange(48) // 32
    np.testing.assert_array_equal(got, (q.astype(np.float32) - zp[rows].astype(np.float32)) * scale[rows])


def test_a_float_graph_is_left_alone():
    result = FloatQdqPass()(t.build())
    assert not result.modified
