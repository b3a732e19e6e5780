"""Lower the QDQ pattern of a planned linear to the fused `fptq.W4A8MatMul` custom op.

pattern   MatMul(DQ(Q(x, s_a)), DQ(w_int4, s_w[, zp_w], axis=0, block_size=G))
          s_a constant            -> act_mode "static"
          s_a = rowmax(|x|) / 127 -> act_mode "per_token" (the subgraph quantize_activations writes)
check     weight is 4-bit blocked along K; activation is int8 with zero point 0
rewrite   W4A8MatMul(x, B_packed, scales[N, G], [zero_points], [act_scale]) with K, N,
          group_size, act_mode attributes; the now-unused Q/DQ nodes are removed.
The decisions are not re-derived: every number comes from the QDQ model, so the
deploy model computes what the qdq model defines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from fptq_onnx.custom_ops import pack_weights
from fptq_onnx.errors import FptqError
from fptq_onnx.passes.graph_utils import add_initializer, matmuls_by_name

DOMAIN = "fptq"
OP_TYPE = "W4A8MatMul"
_INT4 = (ir.DataType.INT4, ir.DataType.UINT4)


@dataclass
class _Match:
    matmul: ir.Node
    x: ir.Value
    act_mode: str
    act_scale: ir.Value | None
    weight_q: np.ndarray
    weight_scale: np.ndarray
    weight_zero_point: np.ndarray | None
    group_size: int


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _match(matmul: ir.Node) -> _Match | None:
    """The pattern, or None when this MatMul is not a W4A8 linear (left as it is)."""
    dq_w = _producer(matmul.inputs[1], "DequantizeLinear")
    dq_a = _producer(matmul.inputs[0], "DequantizeLinear")
    q_a = _producer(dq_a.inputs[0] if dq_a else None, "QuantizeLinear")
    if dq_w is None or q_a is None:
        return None
    weight = dq_w.inputs[0]
    if weight is None or weight.const_value is None or weight.const_value.dtype not in _INT4:
        return None
    axis = dq_w.attributes.get_int("axis", 1)
    block = dq_w.attributes.get_int("block_size", 0)
    if axis != 0 or block <= 0:
        return None
    zp_a = _const(q_a.inputs[2] if len(q_a.inputs) > 2 else None)
    if zp_a is not None and np.any(zp_a != 0):
        return None
    scale_value = q_a.inputs[1]
    if scale_value.const_value is not None:
        mode, act_scale = "static", scale_value
    elif _producer(scale_value, "Div") is not None:
        mode, act_scale = "per_token", None
    else:
        return None
    q = weight.const_value.numpy()
    q = q.astype(np.int8) if weight.const_value.dtype == ir.DataType.INT4 else q.astype(np.uint8)
    zp_w = _const(dq_w.inputs[2] if len(dq_w.inputs) > 2 else None)
    if zp_w is not None:
        zp_w = zp_w.astype(q.dtype)
    return _Match(matmul, q_a.inputs[0], mode, act_scale, q, _const(dq_w.inputs[1]), zp_w, block)


def _rewrite(graph: ir.Graph, m: _Match) -> None:
    name = m.matmul.name
    k, n = m.weight_q.shape
    packed, scales, zero_points = pack_weights(m.weight_q, m.weight_scale.astype(np.float32), m.weight_zero_point,
                                               m.group_size)
    inputs: list[ir.Value | None] = [
        m.x,
        add_initializer(graph, f"{name}.w4a8_weight", packed),
        add_initializer(graph, f"{name}.w4a8_scales", scales),
        None if zero_points is None else add_initializer(graph, f"{name}.w4a8_zero_points", zero_points),
        m.act_scale,
    ]
    while inputs[-1] is None:
        inputs.pop()
    fused = ir.Node(
        DOMAIN, OP_TYPE, inputs, name=name,
        attributes={
            "K": ir.AttrInt64("K", k),
            "N": ir.AttrInt64("N", n),
            "group_size": ir.AttrInt64("group_size", m.group_size),
            "act_mode": ir.AttrString("act_mode", m.act_mode),
        },
        metadata_props=dict(m.matmul.metadata_props), doc_string=m.matmul.doc_string,
    )
    out = m.matmul.outputs[0]
    value_name = out.name
    out.name = f"{value_name}/replaced"
    fused.outputs[0].name, fused.outputs[0].shape, fused.outputs[0].type = value_name, out.shape, out.type
    graph.insert_before(m.matmul, fused)
    ir.convenience.replace_all_uses_with(out, fused.outputs[0], replace_graph_outputs=True)
    graph.remove(m.matmul, safe=True)


class LowerW4A8Pass(ir.passes.InPlacePass):
    """Rewrite the named linears; `required=True` makes a name that does not match an error."""

    def __init__(self, names: list[str], required: bool = True) -> None:
        super().__init__()
        self.names = names
        self.required = required

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matmuls = matmuls_by_name(graph)
        lowered = 0
        for name in self.names:
            node = matmuls.get(name)
            match = None if node is None else _match(node)
            if match is None:
                if self.required:
                    raise FptqError(f"{name}: not the int4-weight / int8-activation QDQ pattern W4A8MatMul lowers")
                continue
            _rewrite(graph, match)
            lowered += 1
        if lowered:
            model.opset_imports[DOMAIN] = 1
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=lowered > 0)
