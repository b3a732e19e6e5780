"""RsqrtAsDivPass on a hand-built RMSNorm as torch exports it: x * Reciprocal(Sqrt(mean(x^2) + eps)) * w."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fptq_onnx.passes.rsqrt_as_div import RsqrtAsDivPass

H = 16


def _build(extra_use: bool = False) -> ir.Model:
    """extra_use: the Reciprocal's output is also a graph output (it must survive)."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["rstd"]),
        helper.make_node("Mul", ["x", "rstd"], ["normed"], name="node_mul_1"),
        helper.make_node("Mul", ["weight", "normed"], ["y"], name="model.norm"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", H])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("rstd", TensorProto.FLOAT, ["B", "S", 1]))
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array((0.5 + np.random.default_rng(0).random(H)).astype(np.float32), "weight"),
    ]
    graph = helper.make_graph(nodes, "rmsnorm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", H])],
                              outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def _x() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 3, (2, 3, H)).astype(np.float32)


def _session(model: ir.Model, optimized_path=None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ops_after_ort(model: ir.Model, tmp_path) -> collections.Counter:
    path = tmp_path / "optimized.onnx"
    _session(model, path)
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def test_rewrites_the_norm_into_the_form_ort_fuses(tmp_path):
    before = _ops_after_ort(_build(), tmp_path)
    assert before["SimplifiedLayerNormalization"] == 0 and before["Reciprocal"] == 1  # as exported: not fused
    result = RsqrtAsDivPass()(_build())
    assert result.modified
    ops = collections.Counter(n.op_type for n in result.model.graph)
    assert ops["Reciprocal"] == 0 and ops["Div"] == 1 and ops["Mul"] == 1
    div = next(n for n in result.model.graph if n.op_type == "Div")
    assert div.name == "node_mul_1" and div.outputs[0].name == "normed"
    assert _ops_after_ort(result.model, tmp_path) == collections.Counter({"SimplifiedLayerNormalization": 1})


def test_same_values():
    x = _x()
    ref = (x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5))
    ref *= 0.5 + np.random.default_rng(0).random(H)
    got = _session(RsqrtAsDivPass()(_build()).model).run(None, {"x": x})[0]
    old = _session(_build()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, old, rtol=1e-6, atol=1e-6)


def test_a_reciprocal_used_elsewhere_is_kept():
    m = RsqrtAsDivPass()(_build(extra_use=True)).model
    ops = collections.Counter(n.op_type for n in m.graph)
    assert ops["Reciprocal"] == 1 and ops["Div"] == 1
    x = _x()
    _, rstd = _session(m).run(None, {"x": x})
    np.testing.assert_allclose(rstd, 1 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5),
                               rtol=1e-5)


def test_nothing_to_do_reports_unmodified():
    once = RsqrtAsDivPass()(_build()).model
    assert not RsqrtAsDivPass()(once).modified
