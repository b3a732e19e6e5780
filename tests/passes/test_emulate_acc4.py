"""EmulateAcc4Pass: float ops that compute what ORT CPU's MatMulNBits accuracy_level 4 computes.

The reference is ORT itself: the quantized graph on CPU with session.qdq_matmulnbits_accuracy_level=4
(checked to have fused into MatMulNBits). The emulated graph runs with graph optimizations off, so
its DequantizeLinear + MatMul stay plain float ops (with them on, ORT would fuse the emulated graph's
DQ + MatMul into MatMulNBits too, and at level 4 re-quantize the already quantized activation).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tinygraph as t
from onnx import TensorProto, helper, numpy_helper

from fptq_onnx.passes.emulate_acc4 import EmulateAcc4Pass
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.quant import quantize_int4, quantize_int8_per_channel

N = 24
LINEARS = ("a_proj", "b_proj")  # two MatMuls on one input: the fake quantization is shared


def _build(k: int, seed: int = 0) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x [1, M, K] -> a_proj, b_proj (quantizable) and f_proj (float B, left alone)."""
    rng = np.random.default_rng(seed)
    w = {f"{n}.weight": rng.normal(0, 0.2, (k, N)).astype(np.float32) for n in (*LINEARS, "f_proj")}
    nodes = [helper.make_node("MatMul", ["x", f"{n}.weight"], [n], name=n) for n in (*LINEARS, "f_proj")]
    graph = helper.make_graph(
        nodes, "acc4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", k])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "M", N]) for n in (*LINEARS, "f_proj")],
        initializer=[numpy_helper.from_array(v, name) for name, v in w.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto), w


def _quantized(k: int, g: int, symmetric: bool) -> ir.Model:
    model, w = _build(k)
    plan = {n: quantize_int4(w[f"{n}.weight"], g, symmetric) for n in LINEARS}
    return QuantizeWeightsPass(plan)(model).model


def _activations(m: int, k: int, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1.0, (1, m, k)).astype(np.float32)
    x[..., 5] *= 40.0  # an outlier column: its block's scale is large, the others' small
    return x


def _session(model: ir.Model, accuracy_level: str | None, optimized: str | None = None,
             optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    if optimized is not None:
        so.optimized_model_filepath = optimized
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def _acc4_reference(model: ir.Model, x: np.ndarray, tmp_path) -> list[np.ndarray]:
    optimized = str(tmp_path / "acc4_optimized.onnx")
    out = _session(model, "4", optimized).run(None, {"x": x})
    fused = [n for n in onnx.load(optimized).graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == len(LINEARS)
    assert all(a.i == 4 for n in fused for a in n.attribute if a.name == "accuracy_level")
    return out


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("k_blocks", [2, 3, 2.5], ids=["2blocks", "3blocks", "ragged"])
@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["int4", "uint4_zp"])
def test_emulated_graph_matches_ort_acc4(symmetric, g, k_blocks, m, tmp_path):
    k = int(k_blocks * g)
    quantized = _quantized(k, g, symmetric)
    x = _activations(m, k)
    reference = _acc4_reference(quantized, x, tmp_path)
    w4a32 = _session(quantized, None, optimize=False).run(None, {"x": x})

    emulated = t.copy(quantized)
    assert EmulateAcc4Pass()(emulated).modified
    assert t.op_count(emulated, "Round") == 1  # one fake quantization shared by both linears
    assert t.op_count(emulated, "DequantizeLinear") == len(LINEARS)  # the weight DQs stay
    got = _session(emulated, None, optimize=False).run(None, {"x": x})

    for i, name in enumerate(LINEARS):
        scale = np.abs(reference[i]).max()
        diff = np.abs(got[i] - reference[i]).max()
        assert diff <= 2e-6 * scale, f"{name}: max |diff| {diff:.3g} vs max |y| {scale:.3g}"
        # and the activation quantization is real: the float-A model is far from acc4
        assert np.abs(w4a32[i] - reference[i]).max() > 100 * max(diff, 1e-7 * scale)
    np.testing.assert_array_equal(got[2], w4a32[2])  # f_proj (float B) is untouched


def test_emulated_graph_is_stable_under_acc4_refusion(tmp_path):
    """ORT still fuses the emulated graph's DQ + MatMul at level 4; re-quantizing changes nothing."""
    quantized = _quantized(96, 32, symmetric=False)
    x = _activations(7, 96)
    reference = _acc4_reference(quantized, x, tmp_path)
    emulated = t.copy(quantized)
    EmulateAcc4Pass()(emulated)
    refused = _session(emulated, "4").run(None, {"x": x})
    for i in range(len(LINEARS)):
        np.testing.assert_allclose(refused[i], reference[i], rtol=0, atol=2e-6 * np.abs(reference[i]).max())


def test_zero_block_quantizes_to_zero(tmp_path):
    """A block of zeros (amax 0) has inverse scale 0 in MLAS, not a division by zero."""
    quantized = _quantized(64, 32, symmetric=True)
    x = _activations(3, 64)
    x[0, 1, :32] = 0.0
    reference = _acc4_reference(quantized, x, tmp_path)
    emulated = t.copy(quantized)
    EmulateAcc4Pass()(emulated)
    got = _session(emulated, None, optimize=False).run(None, {"x": x})
    assert np.isfinite(got[0]).all()
    np.testing.assert_allclose(got[0], reference[0], rtol=0, atol=2e-6 * np.abs(reference[0]).max())


def test_second_run_changes_nothing():
    emulated = _quantized(80, 32, symmetric=False)
    assert EmulateAcc4Pass()(emulated).modified
    before = ir.to_proto(emulated).SerializeToString()
    assert not EmulateAcc4Pass()(emulated).modified
    assert ir.to_proto(emulated).SerializeToString() == before


def test_float_and_8bit_graphs_are_left_alone():
    model, w = _build(64)
    before = ir.to_proto(model).SerializeToString()
    assert not EmulateAcc4Pass()(model).modified
    assert ir.to_proto(model).SerializeToString() == before
    # per-channel int8 weights also fuse in ORT, but not into a 4-bit MatMulNBits
    plan = {n: quantize_int8_per_channel(w[f"{n}.weight"]) for n in LINEARS}
    int8 = QuantizeWeightsPass(plan)(model).model
    assert not EmulateAcc4Pass()(int8).modified


def test_activation_side_dequantize_blocks_the_fusion():
    """A MatMul with DequantizeLinear on both inputs is not ORT's DQ -> MatMulNBits pattern."""
    quantized = _quantized(64, 32, symmetric=True)
    graph = quantized.graph
    x = graph.inputs[0]
    s = ir.Value(name="act_scale", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(np.array(0.05, np.float32), name="act_scale"))
    graph.register_initializer(s)
    q = ir.Node("", "QuantizeLinear", [x, s], name="act_q")
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s], name="act_dq")
    first = t.node(quantized, LINEARS[0])
    graph.insert_before(first, [q, dq])
    for name in LINEARS:
        t.node(quantized, name).replace_input_with(0, dq.outputs[0])
    assert not EmulateAcc4Pass()(quantized).modified
