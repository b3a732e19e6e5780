"""Rewrite a QDQ model into float ops with the same arithmetic, for EPs that lack its quantized kernels.

Why: scoring a qdq model on ONNX Runtime's CUDA EP. Its DequantizeLinear of int4 blocked weights and its
blocked (per-token) QuantizeLinear have no CUDA kernels, so ORT would place them on the CPU and copy every
activation across PCIe at every call. The numbers must stay those of the file, so the rewrite is exact
where it can be and leaves everything else as it was:

* a DequantizeLinear of constants (the weights: per-tensor, per-axis or blocked) becomes the float32
  initializer it always computes, ``(q - zero_point) * scale`` in float32, the formula ORT evaluates;
* a QuantizeLinear whose outputs feed only DequantizeLinear nodes (an activation's fake quantization)
  becomes ``Clip(Round(x / scale) + zp, lo, hi)`` and ``(q - zp) * scale`` in float ops (Round is half
  to even, like QuantizeLinear), when its scale broadcasts against x as it stands: a scalar, a scale
  per element of the last axis, or one block spanning the quantized axis (our per-token form).

Anything else (non-constant zero points, float8, blocks narrower than their axis) is left for ORT.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fptq_onnx.passes.graph_utils import add_initializer, drop_unused_initializers

_RANGES = {
    ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15),
    ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT16: (0, 65535),
}


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
               block_size: int) -> np.ndarray:
    """DequantizeLinear of constants in float32: per-tensor, per-axis (1-D scale) or blocked along `axis`."""
    values = q.astype(np.float32)
    zp = np.zeros((), np.float32) if zero_point is None else zero_point.astype(np.float32)
    scale = scale.astype(np.float32)
    axis = axis % values.ndim
    if block_size > 0:
        scale = np.repeat(scale, block_size, axis=axis).take(range(values.shape[axis]), axis=axis)
        zp = zp if zero_point is None else np.repeat(zp, block_size, axis=axis).take(range(values.shape[axis]), axis=axis)
    elif scale.ndim == 1 and scale.size > 1:
        shape = [1] * values.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.ndim == 1 else zp
    return ((values - zp) * scale).astype(np.float32)


class FloatQdqPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type == "DequantizeLinear" and node.domain == "":
                modified |= self._fold_constant(graph, node)
        for node in list(graph):
            if node.op_type == "QuantizeLinear" and node.domain == "":
                modified |= self._unfuse_pair(graph, node)
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _fold_constant(graph: ir.Graph, dq: ir.Node) -> bool:
        q, scale = _const(dq.inputs[0]), _const(dq.inputs[1])
        zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
        zp = _const(zp_value)
        if q is None or scale is None or (zp_value is not None and zp is None) or dq.outputs[0].is_graph_output():
            return False
        array = dequantize(q, scale, zp, _attr(dq, "axis", 1), _attr(dq, "block_size", 0))
        folded = add_initializer(graph, f"{dq.outputs[0].name}.float", array)
        dq.outputs[0].replace_all_uses_with(folded)
        inputs = [v.name for v in dq.inputs if v is not None]
        graph.remove(dq, safe=True)
        drop_unused_initializers(graph, inputs)
        return True

    @staticmethod
    def _unfuse_pair(graph: ir.Graph, q: ir.Node) -> bool:
        uses = [use.node for use in q.outputs[0].uses()]
        if not uses or q.outputs[0].is_graph_output() or any(
                u.op_type != "DequantizeLinear" or u.domain != "" for u in uses):
            return False
        dtype = _output_dtype(q)
        if dtype not in _RANGES or not all(_broadcasts(n, q.inputs[0].shape) for n in (q, *uses)):
            return False
        zps = [_zero_point(n) for n in (q, *uses)]
        if any(z is False for z in zps):
            return False
        lo, hi = _RANGES[dtype]
        name = q.name or q.outputs[0].name
        constants = [v.name for n in (q, *uses) for v in n.inputs[1:] if v is not None]
        rounded = _op(graph, q, "Round", [_op(graph, q, "Div", [q.inputs[0], q.inputs[1]], f"{name}/div")],
                      f"{name}/round")
        if zps[0] is not None:
            rounded = _op(graph, q, "Add", [rounded, _float(graph, f"{name}.zp_float", zps[0])], f"{name}/add_zp")
        clipped = _op(graph, q, "Clip", [rounded, _float(graph, f"{name}.lo", lo), _float(graph, f"{name}.hi", hi)],
                      f"{name}/clip")
        for dq, zp in zip(uses, zps[1:]):
            dq_name = dq.name or dq.outputs[0].name
            centred = clipped if zp is None else _op(graph, dq, "Sub", [clipped, _float(graph, f"{dq_name}.zp_float", zp)],
                                                     f"{dq_name}/sub_zp")
            out = _op(graph, dq, "Mul", [centred, dq.inputs[1]], f"{dq_name}/mul")
            dq.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
            kept, dq.outputs[0].name = dq.outputs[0].name, None
            out.name = kept
            graph.remove(dq, safe=True)
        graph.remove(q, safe=True)
        drop_unused_initializers(graph, constants)
        return True


def _output_dtype(q: ir.Node) -> ir.DataType:
    if len(q.inputs) > 2 and q.inputs[2] is not None and q.inputs[2].type is not None:
        return q.inputs[2].type.dtype
    code = _attr(q, "output_dtype", 0)
    return ir.DataType(code) if code else ir.DataType.UINT8


def _zero_point(node: ir.Node) -> np.ndarray | None | bool:
    """The node's zero point as float32 (None: absent or all zero; False: not a constant, cannot rewrite)."""
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None:
        return None
    zp = _const(value)
    if zp is None:
        return False
    return None if not np.any(zp) else zp.astype(np.float32)


def _broadcasts(node: ir.Node, shape: ir.Shape | None) -> bool:
    """Whether the node's scale (and zero point) broadcast with numpy rules against data of `shape` (the Q's
    input, which a DQ's input shares) as they stand."""
    scale_shape = node.inputs[1].shape
    block = _attr(node, "block_size", 0)
    if block == 0 and scale_shape is not None and (
            scale_shape.rank() == 0 or (scale_shape.rank() == 1 and scale_shape[0] == 1)):
        return True
    if shape is None:
        return False
    rank, axis = shape.rank(), _attr(node, "axis", 1)
    if block == 0:
        return scale_shape is not None and scale_shape.rank() == 1 and axis % rank == rank - 1
    # blocked: one block spanning the axis means a scale of x's shape with 1 there, which broadcasts
    width = shape[axis]
    return isinstance(width, int) and block >= width


def _float(graph: ir.Graph, name: str, value) -> ir.Value:
    return add_initializer(graph, name, np.asarray(value, np.float32))


def _op(graph: ir.Graph, before: ir.Node, op_type: str, inputs: list[ir.Value], name: str) -> ir.Value:
    node = ir.Node("", op_type, inputs, name=name)
    graph.insert_before(before, node)
    return node.outputs[0]
