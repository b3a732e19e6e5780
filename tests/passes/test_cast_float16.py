"""CastFloat16Pass: the whole tiny export in fp16 (inputs, KV cache, logits) computes the fp32 function."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.cast_float16 import CastFloat16Pass
from fptq_onnx.runtime import OnnxCausalLM


def _fp16_copy(src, dst):
    model = ir.load(src)
    assert CastFloat16Pass()(model).modified
    ir.save(model, dst)
    return model


def test_fp16_model_matches_fp32(tiny_onnx, tmp_path):
    model = _fp16_copy(tiny_onnx["llama"], tmp_path / "fp16.onnx")
    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values(),
              *(v for n in model.graph for v in n.outputs)]
    assert not [v.name for v in values if v.dtype == ir.DataType.FLOAT]
    ref, half = OnnxCausalLM(tiny_onnx["llama"]), OnnxCausalLM(tmp_path / "fp16.onnx")
    assert half.session.get_inputs()[3].type == "tensor(float16)"
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    expected, _ = ref.forward(ids, ref.empty_past(2))
    past = [np.zeros((2, half.kv_heads, 0, half.head_dim), np.float16) for _ in range(2 * half.num_layers)]
    got, present = half.forward(ids, past)
    assert got.dtype == np.float16 and present[0].dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=3e-3 * np.abs(expected).max())


def test_refuses_fptq_custom_ops():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4]))
    node = ir.node("W4A8MatMul", [x], domain="fptq")
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21, "fptq": 1}), ir_version=10)
    with pytest.raises(FptqError, match="float32-only"):
        CastFloat16Pass()(model)
