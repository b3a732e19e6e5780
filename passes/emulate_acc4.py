"""Spell out ORT's MatMulNBits accuracy_level 4 (int8 activations) in standard float ops.

Why: on CPU, ORT fuses DequantizeLinear(constant 4-bit weight, blocked along K) -> MatMul
into com.microsoft.MatMulNBits and, with session.qdq_matmulnbits_accuracy_level=4, MLAS
quantizes the activation A to int8 per block of K on the fly (CompInt8). Other EPs (CUDA)
ignore accuracy_level and compute W4A16, a different model. This pass inserts in front of A
the exact fake quantization MLAS applies, so any EP computes the acc4 arithmetic.

The MatMuls taken are those ORT's DQ -> MatMulNBits selector takes (qdq_selectors.cc,
DQMatMulNodeGroupSelector / ValidateDQForMatMulNBits), restricted to 4-bit weights: B is the
only DequantizeLinear input of the MatMul, used once and not a graph output, of a rank-2
INT4/UINT4 initializer, axis 0, block_size G >= 16 and a power of two, float or float16
rank-2 scales [ceil(K/G), N] (and zero points of that shape) that are initializers; the
MatMul's output feeds no QuantizeLinear.

MLAS's row quantizer (QuantizeARow_CompInt8_avx2 / _avx512 in sqnbitgemm_kernel_avx2.cpp,
sqnbitgemm_kernel_avx512.cpp; the same on the AVX512-VNNI and AVX-VNNI dispatches), per row of
A and block of G along K:
    amax = max|a| over the block's real elements (a short last block when G does not divide K;
           its int8 tail is zero-filled, which is what zero padding computes),
    scale = amax / 127,  inverse = 127 / amax (0 when amax == 0)  -- a reciprocal computed
           directly from amax, not 1 / scale; the two differ by an ulp and flip ties,
    q = round-half-to-even(a * inverse)  (_MM_ROUND_NEAREST), no clamp: |a * inverse| <= 127
           up to an ulp, so the int8 saturation never acts,
and the kernel accumulates scale_a * scale_b * dot(q, qb - zp) per block, which is
MatMul(q * scale, DequantizeLinear(B)) up to float summation order. ONNX Round is half to even.

The weight's DequantizeLinear is left in place (a later pass folds it). Re-running the
emulated graph through MLAS acc4 is harmless: an already quantized block re-quantizes to the
same integers. The pass is idempotent: the last node of each fake quantization is marked, and a
MatMul fed by a marked node is skipped.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.graph_utils import add_initializer
from fptq_onnx.quant import INT8_MAX

_FOUR_BIT = (ir.DataType.INT4, ir.DataType.UINT4)
_SCALE_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_MARK = "fptq.acc4_fake_quant"


class EmulateAcc4Pass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        constants = _Constants(graph)
        shared: dict[tuple[int, int, int], ir.Value] = {}
        modified = False
        for node in list(graph):
            block = _fused_block(graph, node)
            if block is None:
                continue
            k, g = block
            x = node.inputs[0]
            if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
                raise FptqError(f"{node.name}: acc4 emulation handles float32 activations, got {x.dtype}")
            key = (id(x), k, g)
            if key not in shared:
                shared[key] = _fake_quantize(graph, constants, node, x, k, g)
            node.replace_input_with(0, shared[key])
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _fused_block(graph: ir.Graph, node: ir.Node) -> tuple[int, int] | None:
    """(K, G) when ORT would fuse this node into a 4-bit MatMulNBits, else None."""
    if node.op_type != "MatMul" or node.domain != "":
        return None
    a, b = node.inputs
    if a is None or b is None or _is_dequantize(a) or not _is_dequantize(b):
        return None
    if a.producer() is not None and _MARK in a.producer().metadata_props:
        return None  # already emulated
    if len(b.uses()) != 1 or b in graph.outputs:
        return None
    if any(use.node.op_type == "QuantizeLinear" for use in node.outputs[0].uses()):
        return None
    dq = b.producer()
    weight, scale = dq.inputs[0], dq.inputs[1]
    zero_point = dq.inputs[2] if len(dq.inputs) > 2 else None
    constants = [weight, scale] + ([zero_point] if zero_point is not None else [])
    if not all(_is_constant_initializer(graph, v) for v in constants):
        return None
    if weight.const_value.dtype not in _FOUR_BIT or scale.const_value.dtype not in _SCALE_TYPES:
        return None
    axis, g = dq.attributes.get("axis"), dq.attributes.get_int("block_size", 0)
    if axis is None or axis.as_int() != 0 or g < 16 or g & (g - 1):
        return None
    w_shape, s_shape = tuple(weight.const_value.shape), tuple(scale.const_value.shape)
    if len(w_shape) != 2:
        return None
    k, n = w_shape
    if s_shape != (-(-k // g), n):
        return None
    if zero_point is not None and tuple(zero_point.const_value.shape) != s_shape:
        return None
    return k, g


def _is_dequantize(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear" and producer.domain == ""


def _is_constant_initializer(graph: ir.Graph, value: ir.Value) -> bool:
    return value.is_initializer() and value.const_value is not None and value not in graph.inputs


class _Constants:
    """The small initializers of the fake quantization, one of each per graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.values: dict[str, ir.Value] = {}

    def __call__(self, name: str, array: np.ndarray) -> ir.Value:
        full = f"acc4.{name}"
        if full not in self.values:
            existing = self.graph.initializers.get(full)
            self.values[full] = existing if existing is not None else add_initializer(self.graph, full, array)
        return self.values[full]


def _fake_quantize(graph: ir.Graph, const: _Constants, anchor: ir.Node, x: ir.Value, k: int, g: int) -> ir.Value:
    """x [..., K] -> q * scale with MLAS's per-row, per-K-block int8 quantization."""
    p = f"{anchor.name}/acc4"
    blocks = -(-k // g)
    padded = blocks * g
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], suffix: str, **attributes: int) -> ir.Value:
        attrs = {key: ir.AttrInt64(key, val) for key, val in attributes.items()}
        new = ir.Node("", op_type, inputs, attributes=attrs, name=f"{p}/{suffix}")
        new.outputs[0].name = f"{p}.{suffix}"
        nodes.append(new)
        return new.outputs[0]

    last_axis = const("last_axis", np.array([-1], np.int64))
    qmax = const("qmax", np.array(float(INT8_MAX), np.float32))
    zero = const("zero", np.array(0.0, np.float32))
    rows = op("Shape", [x], "rows_shape", end=-1)
    x_full = x
    if padded != k:
        pads = const(f"pads_{padded - k}", np.array([0, padded - k], np.int64))
        x_full = op("Pad", [x, pads, zero, last_axis], "pad")
    block_dims = const(f"block_dims_{blocks}x{g}", np.array([blocks, g], np.int64))
    blocked = op("Reshape", [x_full, op("Concat", [rows, block_dims], "blocked_shape", axis=0)], "blocked")
    amax = op("ReduceMax", [op("Abs", [blocked], "abs"), last_axis], "amax", keepdims=1)
    scale = op("Div", [amax, qmax], "scale")
    inverse = op("Where", [op("Equal", [amax, zero], "all_zero"), zero, op("Div", [qmax, amax], "reciprocal")],
                 "inverse")
    q = op("Round", [op("Mul", [blocked, inverse], "scaled")], "q")
    fake = op("Mul", [q, scale], "dequantized")
    flat_dims = const(f"flat_dims_{padded}", np.array([padded], np.int64))
    flat = op("Reshape", [fake, op("Concat", [rows, flat_dims], "flat_shape", axis=0)], "flat")
    if padded != k:
        starts, ends = const("starts_0", np.array([0], np.int64)), const(f"ends_{k}", np.array([k], np.int64))
        flat = op("Slice", [flat, starts, ends, last_axis], "unpad")
    for new in nodes:
        graph.insert_before(anchor, new)
    flat.producer().metadata_props[_MARK] = f"K={k} G={g}"
    return flat
