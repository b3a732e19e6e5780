"""Bring the lm_head, and an embedding tied to it, under the plan (`convert --quantize-lm-head`).

lm_head    the export leaves the logits MatMul unnamed (`node_linear_N`, B a folded [K, V]
           constant). This names it `lm_head`, the plan's key, so the weight, activation and
           W4A8-lowering passes that follow treat it like any planned linear.
embedding  Gather(E[V, H] float, input_ids) becomes
           DequantizeLinear(Gather(E_q int8 [V, H], ids), Gather(s [V, 1], ids), axis -1, block H):
           int8 rows, one scale per row, in standard ONNX (opset 21 blocked DQ, the layout of the
           per-token activations), so every EP runs it and Netron shows Gather -> DequantizeLinear.
           A step gathers a few rows, so this is for size (the fp32 table is 113 of SmolLM2's
           166 MB once the layers are int4), not speed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.graph_utils import add_initializer, drop_unused_initializers
from fptq_onnx.plan import EmbeddingPlan

LM_HEAD = "lm_head"
LOGITS = "logits"
INPUT_IDS = "input_ids"


class QuantizeLmHeadPass(ir.passes.InPlacePass):
    def __init__(self, embedding: EmbeddingPlan | None) -> None:
        super().__init__()
        self.embedding = embedding

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        _logits_matmul(graph).name = LM_HEAD
        if self.embedding is not None:
            _quantize_embedding(graph, self.embedding)
        return ir.passes.PassResult(model, modified=True)


def replaced_tables(graph: ir.Graph, embedding: bool) -> set[str]:
    """Names of the fp32 initializers the pass may replace (the lm_head weight, the embedding
    table if `embedding`): a writer that spills weights before the pass runs holds these back,
    or their dead fp32 bytes stay in the external-data file.  (A tied table the pass keeps, as
    without `embedding`, is merely written later.)"""
    _, weight, transpose = _logits_weight(graph)
    names = {(transpose.inputs[0] if transpose is not None else weight).name} if weight is not None else set()
    ids = next((v for v in graph.inputs if v.name == INPUT_IDS), None)
    if embedding and ids is not None:
        names |= {use.node.inputs[0].name for use in ids.uses() if use.node.op_type == "Gather" and use.idx == 1}
    return names


def _logits_weight(graph: ir.Graph) -> tuple[ir.Node | None, ir.Value | None, ir.Node | None]:
    """(the MatMul producing the logits, its B, the [1, 0] Transpose of a constant producing B or None)."""
    output = next((v for v in graph.outputs if v.name == LOGITS), None)
    node = None if output is None else output.producer()
    weight = None if node is None or node.op_type != "MatMul" else node.inputs[1]
    transpose = None if weight is None else weight.producer()
    if (transpose is None or transpose.op_type != "Transpose" or transpose.inputs[0].const_value is None
            or list(transpose.attributes.get_ints("perm", [1, 0])) != [1, 0]):
        transpose = None
    return node, weight, transpose


def _logits_matmul(graph: ir.Graph) -> ir.Node:
    """The MatMul producing the logits, with B made a constant [K, V] initializer of its own.

    The exporter folds a tied lm_head's transpose of the embedding into a constant for small
    tables but leaves a Transpose node for large ones (SmolLM2's); that is folded here.
    """
    node, weight, transpose = _logits_weight(graph)
    if transpose is not None:
        source = transpose.inputs[0]
        node.replace_input_with(1, add_initializer(graph, f"{LM_HEAD}.weight_kn",
                                                   np.ascontiguousarray(source.const_value.numpy().T)))
        if not transpose.outputs[0].uses():
            graph.remove(transpose, safe=True)
            drop_unused_initializers(graph, [source.name])  # an untied table read by nothing else
        weight = node.inputs[1]
    if weight is None or weight.const_value is None:
        raise FptqError(f"cannot find the lm_head: graph output '{LOGITS}' is not a MatMul with a constant weight")
    return node


def _embedding_gather(graph: ir.Graph, shape: tuple[int, int]) -> ir.Node:
    ids = next((v for v in graph.inputs if v.name == INPUT_IDS), None)
    gathers = [] if ids is None else [
        use.node for use in ids.uses()
        if use.node.op_type == "Gather" and use.idx == 1 and use.node.inputs[0].const_value is not None
    ]
    if len(gathers) != 1:
        raise FptqError(f"cannot find the embedding: want one Gather of a constant table by '{INPUT_IDS}', "
                        f"found {len(gathers)}")
    table = gathers[0].inputs[0]
    if tuple(table.const_value.shape.numpy()) != shape:
        raise FptqError(f"planned embedding is {shape} but the graph's table is {tuple(table.const_value.shape)}")
    return gathers[0]


def _quantize_embedding(graph: ir.Graph, plan: EmbeddingPlan) -> None:
    qw = plan.weight
    if qw.bits != 8 or not qw.per_channel or not qw.symmetric:
        raise FptqError(f"{plan.name}: the embedding must be int8 symmetric per row, got {qw.describe()}")
    rows = np.ascontiguousarray(qw.q.T)  # [V, H]
    vocab, hidden = rows.shape
    old = _embedding_gather(graph, (vocab, hidden))
    ids, table = old.inputs[1], old.inputs[0]
    name = plan.name
    q = add_initializer(graph, f"{name}.weight_q", rows, ir.DataType.INT8)
    s = add_initializer(graph, f"{name}.weight_scale", np.ascontiguousarray(qw.scales[0][:, None]))
    axis = {"axis": ir.AttrInt64("axis", 0)}
    gather_q = ir.Node("", "Gather", [q, ids], attributes=axis, name=f"{name}/gather_rows")
    gather_s = ir.Node("", "Gather", [s, ids], attributes=axis, name=f"{name}/gather_scales")
    dq = ir.Node("", "DequantizeLinear", [gather_q.outputs[0], gather_s.outputs[0]], name=f"{name}/dequantize_rows",
                 attributes={"axis": ir.AttrInt64("axis", -1), "block_size": ir.AttrInt64("block_size", hidden)})
    gather_q.outputs[0].name, gather_s.outputs[0].name = f"{name}.rows_q", f"{name}.rows_scale"
    dq.outputs[0].name = f"{name}.rows"
    dq.outputs[0].shape, dq.outputs[0].type = old.outputs[0].shape, old.outputs[0].type
    dq.metadata_props["fptq.weight"] = "int8 per-row sym"
    dq.doc_string = f"{plan.name}: int8 rows, one scale per row, tied to {plan.tied_to}"
    graph.insert_before(old, [gather_q, gather_s, dq])
    ir.convenience.replace_all_uses_with(old.outputs[0], dq.outputs[0], replace_graph_outputs=True)
    graph.remove(old, safe=True)
    drop_unused_initializers(graph, [table.name])
