"""Cast a float32 model to float16: weights, activations, KV cache and logits.

The GPU benchmark's fp16 baseline and its W4A16 peer (MatMulNBits with fp16 scales) are
the float export run in half precision, as a GPU serves it; the export itself is float32
and has no fp16 option. Every float32 value becomes float16 (graph inputs and outputs
included, so the KV cache is fp16 too), float32 initializers and tensor attributes are
converted (finite values clipped to fp16's range, so a -3.4e38 mask constant becomes
-65504 instead of -inf), and `Cast(to=FLOAT)` becomes `Cast(to=FLOAT16)`. Initializers
are converted lazily, when the model is saved, so a large model is not held twice.
fptq.W4A8MatMul is float32-only, so a model holding it is refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fptq_onnx.errors import FptqError

FP16_MAX = float(np.finfo(np.float16).max)


def _to_float16(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    def convert() -> ir.TensorProtocol:
        array = tensor.numpy()
        finite = np.isfinite(array)
        array = np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array).astype(np.float16)
        return ir.tensor(array, name=tensor.name)

    return ir.LazyTensor(convert, dtype=ir.DataType.FLOAT16, shape=tensor.shape, name=tensor.name)


class CastFloat16Pass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        nodes = list(ir.traversal.RecursiveGraphIterator(graph))
        if any(n.domain == "fptq" for n in nodes):
            raise FptqError("cannot cast to float16: the model holds fptq custom ops, which are float32-only")
        values = [*graph.inputs, *graph.outputs, *graph.initializers.values(), *(v for n in nodes for v in n.outputs)]
        for value in values:
            if value.dtype == ir.DataType.FLOAT:
                value.dtype = ir.DataType.FLOAT16
                if value.const_value is not None:
                    value.const_value = _to_float16(value.const_value)
                modified = True
        for node in nodes:
            for name, attr in list(node.attributes.items()):
                if node.op_type == "Cast" and node.domain == "" and name == "to" and attr.value == ir.DataType.FLOAT:
                    node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT16)
                    modified = True
                elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.FLOAT:
                    node.attributes[name] = ir.AttrTensor(name, _to_float16(attr.value))
                    modified = True
        return ir.passes.PassResult(model, modified)
