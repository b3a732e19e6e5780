"""Mul(x, Reciprocal(Sqrt(v))) -> Div(x, Sqrt(v)): RMSNorm in the form ONNX Runtime fuses.

torch's exporter writes `x * torch.rsqrt(mean(x^2) + eps)` as Sqrt -> Reciprocal -> Mul, but
ONNX Runtime's SimplifiedLayerNormFusion only matches Pow -> ReduceMean -> Add -> Sqrt -> Div
(-> Mul by the weight). As exported, every RMSNorm therefore runs as seven kernels; after this
pass ORT fuses each into one SimplifiedLayerNormalization when it creates the session (SmolLM2:
all 61 norms of the fp32 export; 60 of the w4a8 form with --quantize-lm-head, whose first norm
reads the int8 embedding's DequantizeLinear; that form goes from 1798 to 1437 nodes after ORT's
optimizer). A decode step of
a small model is dominated by such per-node costs, not by its matmuls. The file stays standard
ONNX; x / sqrt(v) and x * (1 / sqrt(v)) differ by rounding only (one operation fewer).
A Reciprocal that feeds anything else is kept for those uses.
"""

from __future__ import annotations

import onnx_ir as ir


def _sqrt_behind_reciprocal(value: ir.Value | None) -> ir.Value | None:
    """v's Sqrt output, if `value` is Reciprocal(Sqrt(v)) in the default domain."""
    recip = None if value is None else value.producer()
    if recip is None or recip.op_type != "Reciprocal" or recip.domain != "":
        return None
    sqrt = recip.inputs[0].producer() if recip.inputs[0] is not None else None
    if sqrt is None or sqrt.op_type != "Sqrt" or sqrt.domain != "":
        return None
    return recip.inputs[0]


class RsqrtAsDivPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for mul in [n for n in graph if n.op_type == "Mul" and n.domain == "" and len(n.inputs) == 2]:
            for side in (0, 1):
                root = _sqrt_behind_reciprocal(mul.inputs[side])
                if root is None:
                    continue
                recip = mul.inputs[side].producer()
                out = mul.outputs[0]
                name, out.name = out.name, None  # the Div's output takes the name
                div = ir.Node("", "Div", [mul.inputs[1 - side], root], name=mul.name)
                div.outputs[0].name, div.outputs[0].shape, div.outputs[0].type = name, out.shape, out.type
                div.metadata_props.update(mul.metadata_props)
                graph.insert_before(mul, div)
                ir.convenience.replace_all_uses_with(out, div.outputs[0], replace_graph_outputs=True)
                graph.remove(mul, safe=True)
                if not recip.outputs[0].uses() and recip.outputs[0] not in graph.outputs:
                    graph.remove(recip, safe=True)
                modified = True
                break
        return ir.passes.PassResult(model, modified=modified)
