"""Shrink the export's shape arithmetic to one small island with no host-to-device copy.

ONNX Runtime's CUDA EP runs the int64 shape arithmetic that starts at `Shape` nodes on the CPU
(fallback_cpu_capability.cc: a node whose inputs are all CPU tensors, small initializers or graph
inputs is placed on the CPU EP), and every value such a node hands to a CUDA kernel's device input
is copied host-to-device, from pageable memory, which waits for the GPU stream. The dynamo export
reads the cache length from every layer's past key and value (`Shape(past_key_values.i.*)`, a chain
of Squeeze/Add/Reshape/Concat per layer, all on the CPU, every decode step), and computes the cache
positions as `Range(0, seq) + past_len`: a CUDA Range whose output meets the CPU scalar `past_len`
in a CUDA Add, the copy that syncs each step.

This pass (1) reads every cache dimension from `past_key_values.0.key` (every layer has a full
cache layer of one shape, export.KVCacheWrapper), after which common-subexpression elimination
merges the per-layer chains into one; (2) rewrites `Add(Range(s, l, d), c)` for a scalar `c` into
`Range(s + c, l + c, d)`, whose bounds stay on the host (CUDA's Range takes them there). The
model's function does not change.
"""

from __future__ import annotations

import re

import onnx_ir as ir
import onnx_ir.passes.common

_PAST = re.compile(r"past_key_values\.\d+\.(key|value)")
CANONICAL = "past_key_values.0.key"


def _scalar(value: ir.Value | None) -> bool:
    return value is not None and value.shape is not None and value.shape.rank() == 0


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


class ShareCacheShapesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        canonical = inputs.get(CANONICAL)
        modified = False
        if canonical is not None:
            for node in graph:
                source = node.inputs[0] if node.op_type == "Shape" and node.inputs else None
                if source is not None and source is not canonical and _PAST.fullmatch(source.name or ""):
                    node.replace_input_with(0, canonical)
                    modified = True
        for add in list(graph):
            if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2 or add.outputs[0].is_graph_output():
                continue
            for index in (0, 1):
                range_node, offset = _producer(add.inputs[index], "Range"), add.inputs[1 - index]
                if range_node is None or not _scalar(offset) or offset.dtype != add.outputs[0].dtype:
                    continue
                start, limit, delta = range_node.inputs
                shifted_start = ir.node("Add", [start, offset], name=f"{add.name}_start")
                shifted_limit = ir.node("Add", [limit, offset], name=f"{add.name}_limit")
                shifted = ir.node("Range", [shifted_start.outputs[0], shifted_limit.outputs[0], delta],
                                  name=f"{add.name}_range")
                for value in (*shifted_start.outputs, *shifted_limit.outputs):
                    value.dtype, value.shape = offset.dtype, ir.Shape([])
                shifted.outputs[0].dtype, shifted.outputs[0].shape = add.outputs[0].dtype, add.outputs[0].shape
                graph.insert_before(add, [shifted_start, shifted_limit, shifted])
                ir.convenience.replace_all_uses_with(add.outputs[0], shifted.outputs[0])
                modified = True
                break
        if modified:
            for step in (onnx_ir.passes.common.CommonSubexpressionEliminationPass(),
                         onnx_ir.passes.common.RemoveUnusedNodesPass(), onnx_ir.passes.common.TopologicalSortPass()):
                step(model)
        return ir.passes.PassResult(model, modified)
