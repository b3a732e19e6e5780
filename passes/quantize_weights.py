"""Replace each planned MatMul's float B with a DequantizeLinear of its integer weight (opset 21).

Group-wise: INT4/UINT4 [K, N] (UINT with zero points), scales [ceil(K/G), N], axis 0,
block_size G. 8-bit per-channel (one group): per-axis DQ, axis 1, scale [N]. ORT fuses DQ + MatMul into MatMulNBits when nothing else
sits on the activation side.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.graph_utils import add_initializer, drop_unused_initializers, matmuls_by_name
from fptq_onnx.quant import QuantizedWeight


_DTYPES = {
    (4, True): ir.DataType.INT4,
    (4, False): ir.DataType.UINT4,
    (8, True): ir.DataType.INT8,
    (8, False): ir.DataType.UINT8,
}


class QuantizeWeightsPass(ir.passes.InPlacePass):
    def __init__(self, weights: dict[str, QuantizedWeight]) -> None:
        super().__init__()
        self.weights = weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matmuls = matmuls_by_name(graph)
        replaced: list[str] = []
        for name, qw in self.weights.items():
            node = matmuls.get(name)
            if node is None:
                raise FptqError(f"plan names {name} but the graph has no MatMul of that name")
            old = node.inputs[1]
            k, n = qw.q.shape
            if old.shape is not None and tuple(old.shape) != (k, n):
                raise FptqError(f"{name}: planned weight is {k}x{n} but the graph's B is {tuple(old.shape)}")
            dtype = _DTYPES[(qw.bits, qw.symmetric)]
            # 8-bit with one group is per-output-channel: the canonical per-axis DQ (axis 1, scale [N]).
            # 4-bit stays blocked along K (even with one block) so the W4A8 lowering sees one pattern.
            per_axis = qw.per_channel and qw.bits == 8
            scales = qw.scales[0] if per_axis else qw.scales
            zero_points = None if qw.symmetric else (qw.zero_points[0] if per_axis else qw.zero_points)
            inputs = [
                add_initializer(graph, f"{name}.weight_q", qw.q if qw.symmetric else qw.q.astype(np.uint8), dtype),
                add_initializer(graph, f"{name}.weight_scale", scales),
            ]
            if zero_points is not None:
                inputs.append(add_initializer(graph, f"{name}.weight_zero_point", zero_points, dtype))
            attributes = (
                {"axis": ir.AttrInt64("axis", 1)}
                if per_axis
                else {"axis": ir.AttrInt64("axis", 0), "block_size": ir.AttrInt64("block_size", qw.group_size)}
            )
            dq = ir.Node("", "DequantizeLinear", inputs, attributes=attributes, name=f"{name}/dequantize_weight")
            dq.outputs[0].name = f"{name}.weight_dq"
            dq.outputs[0].shape = ir.Shape([k, n])
            dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
            if old.name is not None:
                replaced.append(old.name)
        drop_unused_initializers(graph, replaced)
        return ir.passes.PassResult(model, modified=bool(self.weights))
