"""Insert int8 activation quantization in front of planned MatMuls.

static: QuantizeLinear/DequantizeLinear int8 with the calibrated per-tensor scale.
per_token: standard ONNX has no per-token op; a small subgraph computes
s = max(|x|, axis=-1) / 127 and feeds it to blocked Q/DQ with one block per row.
Consumers of one input with the same decision share one Q/DQ (q/k/v, gate/up).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.graph_utils import add_initializer, matmuls_by_name
from fptq_onnx.plan import ActMode
from fptq_onnx.quant import INT8_MAX

PER_TOKEN_EPS = 1e-8


class QuantizeActivationsPass(ir.passes.InPlacePass):
    def __init__(self, decisions: dict[str, tuple[ActMode, float | None]]) -> None:
        super().__init__()
        self.decisions = decisions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matmuls = matmuls_by_name(graph)
        shared: dict[tuple, ir.Value] = {}
        modified = False
        for name, (mode, scale) in self.decisions.items():
            if mode in (ActMode.NONE, ActMode.PER_BLOCK):
                continue
            node = matmuls.get(name)
            if node is None:
                raise FptqError(f"plan names {name} but the graph has no MatMul of that name")
            x = node.inputs[0]
            key = (id(x), mode, scale)
            if key not in shared:
                if mode == ActMode.STATIC:
                    if scale is None or not np.isfinite(scale) or scale <= 0:
                        raise FptqError(f"{name}: static activation needs a positive scale, got {scale}")
                    shared[key] = _static_qdq(graph, node, x, name, scale)
                elif mode == ActMode.PER_TOKEN:
                    shared[key] = _per_token(graph, node, x, name)
                else:
                    raise FptqError(f"{name}: unknown activation mode {mode}")
            node.replace_input_with(0, shared[key])
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _insert(graph: ir.Graph, before: ir.Node, nodes: list[ir.Node]) -> None:
    for new in nodes:
        graph.insert_before(before, new)


def _static_qdq(graph: ir.Graph, anchor: ir.Node, x: ir.Value, name: str, scale: float) -> ir.Value:
    s = add_initializer(graph, f"{name}.act_scale", np.array(scale, np.float32))
    zp = add_initializer(graph, f"{name}.act_zero_point", np.array(0, np.int8))
    q = ir.Node("", "QuantizeLinear", [x, s, zp], name=f"{name}/quantize_act")
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, zp], name=f"{name}/dequantize_act")
    q.outputs[0].name, dq.outputs[0].name = f"{name}.act_q", f"{name}.act_dq"
    _insert(graph, anchor, [q, dq])
    return dq.outputs[0]


def _per_token(graph: ir.Graph, anchor: ir.Node, x: ir.Value, name: str) -> ir.Value:
    """s = max(|x|, -1) / 127 per token, then Q/DQ blocked along the last axis with block K.

    Expressed as standard Q/DQ (opset 21 blocked quantization, one block per row) so
    EPs see int8 activations and ORT keeps the explicit precision instead of
    re-quantizing the activation per K-block in a MatMulNBits fusion.
    """
    k = _input_channels(anchor, name)
    axes = add_initializer(graph, f"{name}.per_token_axes", np.array([-1], np.int64))
    eps = add_initializer(graph, f"{name}.per_token_eps", np.array(PER_TOKEN_EPS, np.float32))
    qmax = add_initializer(graph, f"{name}.per_token_qmax", np.array(INT8_MAX, np.float32))
    p = f"{name}/act_per_token"
    abs_ = ir.Node("", "Abs", [x], name=f"{p}/abs")
    rmax = ir.Node("", "ReduceMax", [abs_.outputs[0], axes], attributes={"keepdims": ir.AttrInt64("keepdims", 1)}, name=f"{p}/row_max")
    floor = ir.Node("", "Max", [rmax.outputs[0], eps], name=f"{p}/nonzero")
    scale = ir.Node("", "Div", [floor.outputs[0], qmax], name=f"{p}/scale")
    blocked = {"axis": ir.AttrInt64("axis", -1), "block_size": ir.AttrInt64("block_size", k)}
    q = ir.Node("", "QuantizeLinear", [x, scale.outputs[0]], name=f"{name}/quantize_act",
                attributes={**blocked, "output_dtype": ir.AttrInt64("output_dtype", ir.DataType.INT8.value)})
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale.outputs[0]], name=f"{name}/dequantize_act",
                 attributes=blocked)
    scale.outputs[0].name = f"{name}.act_token_scale"
    q.outputs[0].name, dq.outputs[0].name = f"{name}.act_q", f"{name}.act_dq"
    _insert(graph, anchor, [abs_, rmax, floor, scale, q, dq])
    return dq.outputs[0]


def _input_channels(node: ir.Node, name: str) -> int:
    weight = node.inputs[1]
    if weight is None or weight.shape is None or not isinstance(weight.shape[0], int):
        raise FptqError(f"{name}: cannot tell the MatMul's K (weight shape unknown)")
    return weight.shape[0]
