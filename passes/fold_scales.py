"""Fold equalization scales into the float graph: 1/s into the source, s into the consumers.

On its own this pass leaves the model's float function unchanged (X/s · W·s = X·W),
which is what its test checks; quantization of the equalized weights comes after.
A norm's `<norm>.weight` holds what it multiplies by (Gemma: 1 + w, see
export.canonicalize), so dividing it by s is right for every architecture.
"""

from __future__ import annotations

import onnx_ir as ir

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.graph_utils import bias_initializer, initializer_array, matmuls_by_name, replace_initializer
from fptq_onnx.plan import Equalization


class FoldScalesPass(ir.passes.InPlacePass):
    def __init__(self, equalizations: list[Equalization]) -> None:
        super().__init__()
        self.equalizations = equalizations

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matmuls = matmuls_by_name(graph)
        for eq in self.equalizations:
            if eq.kind == "norm":
                name = f"{eq.source}.weight"
                if name not in graph.initializers:
                    raise FptqError(f"cannot fold into {eq.source}: no initializer {name} in the graph")
                replace_initializer(graph, name, initializer_array(graph, name) / eq.scale)
            elif eq.kind == "linear":
                if eq.source not in matmuls:
                    raise FptqError(f"cannot fold into {eq.source}: no MatMul of that name in the graph")
                side = eq.source_side()
                weight = f"{eq.source}.weight"
                replace_initializer(graph, weight, initializer_array(graph, weight) / side[None, :])
                bias = bias_initializer(matmuls[eq.source])
                if bias is not None:
                    bias.const_value = ir.tensor(bias.const_value.numpy() / side, name=bias.name)
            else:
                raise FptqError(f"unknown equalization source kind '{eq.kind}'")
            for linear in eq.linears:
                weight = f"{linear}.weight"
                if weight not in graph.initializers:
                    raise FptqError(f"cannot scale {linear}: no initializer {weight} in the graph")
                replace_initializer(graph, weight, initializer_array(graph, weight) * eq.scale[:, None])
        return ir.passes.PassResult(model, modified=bool(self.equalizations))
