"""QuantizeLmHeadPass on a hand-built tied embedding -> norm -> lm_head graph, checked against numpy.

ids [B, S] -> Gather(E [V, H]) -> Mul(norm weight) -> MatMul(B = E^T, folded as the export does) -> logits
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import tinygraph as t
from onnx import TensorProto, helper, numpy_helper

from fptq_onnx.errors import FptqError
from fptq_onnx.formats import apply_format
from fptq_onnx.passes.quantize_lm_head import LM_HEAD, QuantizeLmHeadPass, replaced_tables
from fptq_onnx.plan import ActMode, EmbeddingPlan, LinearPlan, QuantPlan
from fptq_onnx.quant import quantize_int4, quantize_int8_per_channel

V, H, G = 40, 48, 32  # H = 48: a ragged last int4 group
B, S = 2, 3


def _table() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 0.5, (V, H)).astype(np.float32)


def _norm() -> np.ndarray:
    return (0.5 + np.random.default_rng(1).random(H)).astype(np.float32)


def _build(logits_op: str = "MatMul", transpose: bool = False) -> ir.Model:
    """transpose: B = Transpose(E) as a node (the exporter leaves it unfolded for large tables)."""
    table = _table()
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"], axis=0, name="node_embedding"),
        helper.make_node("Mul", ["h", "norm"], ["n"], name="model.norm"),
        helper.make_node(logits_op, ["n", "val_7"], ["logits"], name="node_linear_7"),
    ]
    if transpose:
        nodes.insert(0, helper.make_node("Transpose", ["embed"], ["val_7"], perm=[1, 0], name="node_transpose"))
    graph = helper.make_graph(
        nodes, "tiny_head",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", V])],
        initializer=[numpy_helper.from_array(table, "embed"), numpy_helper.from_array(_norm(), "norm"),
                     *([] if transpose else [numpy_helper.from_array(table.T.copy(), "val_7")])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def _ids() -> np.ndarray:
    return np.random.default_rng(2).integers(0, V, (B, S)).astype(np.int64)


def _reference(embedding: np.ndarray, head_kn: np.ndarray, per_token: bool = False) -> np.ndarray:
    x = embedding.astype(np.float64)[_ids()] * _norm()
    if per_token:
        s = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-8) / 127
        x = np.clip(np.rint(x / s), -127, 127) * s
    return x @ head_kn.astype(np.float64)


def _run(model: ir.Model, custom_ops: bool = False) -> np.ndarray:
    return t.session(model, custom_ops).run(None, {"input_ids": _ids()})[0]


def _embedding_plan() -> EmbeddingPlan:
    return EmbeddingPlan("model.embed_tokens", LM_HEAD, quantize_int8_per_channel(_table().T.copy(), symmetric=True))


@pytest.mark.parametrize("transpose", [False, True], ids=["folded", "transpose-node"])
def test_names_lm_head_and_quantizes_the_tied_embedding(transpose):
    emb = _embedding_plan()
    m = QuantizeLmHeadPass(emb)(_build(transpose=transpose)).model
    assert t.op_count(m, "Transpose") == 0 and t.node(m, LM_HEAD).inputs[1].const_value is not None
    assert t.node(m, LM_HEAD).op_type == "MatMul"
    assert "embed" not in m.graph.initializers  # the fp32 table is gone
    rows = t.init(m, "model.embed_tokens.weight_q")
    assert rows.dtype == np.int8 and rows.shape == (V, H)
    assert t.init(m, "model.embed_tokens.weight_scale").shape == (V, 1)
    dq = t.node(m, "model.embed_tokens/dequantize_rows")
    assert dq.attributes.get_int("block_size") == H and dq.attributes.get_int("axis") == -1
    got = _run(m)
    ref = _reference(emb.weight.dequantize().T, _table().T)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.abs(got - _reference(_table(), _table().T)).max() > 1e-4  # int8 rows, not the float table


def test_without_embedding_plan_only_names_the_head():
    m = QuantizeLmHeadPass(None)(_build()).model
    assert t.node(m, LM_HEAD).inputs[1].name == "val_7"
    assert "embed" in m.graph.initializers
    np.testing.assert_allclose(_run(m), _reference(_table(), _table().T), rtol=1e-5, atol=1e-5)


def _head_plan(act_mode: ActMode) -> QuantPlan:
    qw = quantize_int4(_table().T.copy(), G, symmetric=True)
    plan = QuantPlan("test", {}, {}, embedding=_embedding_plan())
    plan.linears[LM_HEAD] = LinearPlan(LM_HEAD, act_mode.value, act_mode, 1.0, 1.0, weight=qw)
    return plan


@pytest.mark.parametrize("transpose", [False, True], ids=["folded", "transpose-node"])
def test_w4a8_form_lowers_lm_head_to_the_custom_op(transpose):
    plan = _head_plan(ActMode.PER_TOKEN)
    m = apply_format(_build(transpose=transpose), plan, "w4a8")
    assert not [n for n in m.graph.initializers.values() if n.const_value.dtype == ir.DataType.FLOAT
                and n.const_value.size == V * H]  # no fp32 table or head weight left
    assert t.node(m, LM_HEAD).op_type == "W4A8MatMul" and t.op_count(m, "MatMul") == 0
    assert t.node(m, LM_HEAD).attributes.get_string("act_mode") == "per_token"
    ref = _reference(plan.embedding.weight.dequantize().T, plan.linears[LM_HEAD].weight.dequantize(), per_token=True)
    got = _run(m, custom_ops=True)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    qdq = _run(apply_format(_build(), plan, "qdq"))  # the portable form computes the same
    np.testing.assert_allclose(qdq, got, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("fmt", ["qdq", "w4a8", "native"])
@pytest.mark.parametrize("transpose", [False, True], ids=["folded", "transpose-node"])
def test_replaced_tables_are_exactly_what_the_head_passes_remove(transpose, fmt):
    """A writer holds these back until the passes ran (conversion.Conversion): none may survive them."""
    before = _build(transpose=transpose)
    named = replaced_tables(before.graph, embedding=True)
    assert named == ({"embed"} if transpose else {"embed", "val_7"})
    assert replaced_tables(before.graph, embedding=False) == ({"embed"} if transpose else {"val_7"})
    kept = set(before.graph.initializers) - named
    after = apply_format(before, _head_plan(ActMode.PER_TOKEN), fmt)
    assert not named & set(after.graph.initializers), fmt
    assert kept <= set(after.graph.initializers)


def test_missing_logits_matmul_errors():
    with pytest.raises(FptqError, match="cannot find the lm_head"):
        QuantizeLmHeadPass(None)(_build(logits_op="Add"))


def test_embedding_shape_mismatch_errors():
    wrong = EmbeddingPlan("model.embed_tokens", LM_HEAD, quantize_int8_per_channel(np.ones((H, V + 1), np.float32)))
    with pytest.raises(FptqError, match="planned embedding"):
        QuantizeLmHeadPass(wrong)(_build())
