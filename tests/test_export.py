"""Float export of every supported architecture: numerics vs torch, dynamic shapes, names, I/O contract.

The exported models come from the session fixture `tiny_onnx` (conftest.py), which runs the
product's own export_float + saving code path once per architecture.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fptq_onnx.export import OPSET, kv_shape
from fptq_onnx.runtime import OnnxCausalLM
from fptq_onnx.verify import check_parity

ARCHS = ("llama", "qwen2", "qwen3", "mistral")  # every entry of models/registry.py
NORMS = ("input_layernorm", "post_attention_layernorm")
READABLE_DIMS = {"batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"}


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def _protos() -> dict:
    return {}


@pytest.fixture
def proto(arch, tiny_onnx, _protos) -> onnx.ModelProto:
    if arch not in _protos:
        _protos[arch] = onnx.load(str(tiny_onnx[arch]))
    return _protos[arch]


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None, pos: np.ndarray | None = None):
    """Reference logits of a full (uncached) forward."""
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(mask)
    if pos is not None:
        kwargs["position_ids"] = torch.from_numpy(pos)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False, **kwargs).logits.numpy()


# --------------------------------------------------------------------------- numerics


def test_parity_prefill_and_decode(arch, tiny_models, tiny_onnx):
    parity = check_parity(tiny_models[arch], tiny_onnx[arch], tolerance=1e-4)
    assert parity.prefill_max_abs < 1e-4
    assert parity.decode_max_abs < 1e-4
    assert parity.top1_agreement == 1.0
    assert parity.logits_scale > 0


@pytest.mark.parametrize(("batch", "prefill", "decode"), [(1, 1, 1), (1, 9, 1), (3, 5, 1), (3, 4, 3)])
def test_dynamic_batch_and_sequence(arch, tiny_models, tiny_onnx, batch, prefill, decode):
    """Prefill from an empty past, then a cached step; both match an uncached torch forward."""
    model = tiny_models[arch]
    config = model.config
    kv_heads, head_dim = kv_shape(config)
    lm = OnnxCausalLM(tiny_onnx[arch])
    rng = np.random.default_rng(batch * 100 + prefill * 10 + decode)
    ids = rng.integers(0, config.vocab_size, size=(batch, prefill + decode), dtype=np.int64)
    reference = _torch_logits(model, ids)

    empty = lm.empty_past(batch)
    assert empty[0].shape == (batch, kv_heads, 0, head_dim)
    logits, past = lm.forward(ids[:, :prefill], empty)
    assert logits.shape == (batch, prefill, config.vocab_size)
    assert len(past) == 2 * config.num_hidden_layers
    assert all(p.shape == (batch, kv_heads, prefill, head_dim) for p in past)
    np.testing.assert_allclose(logits, reference[:, :prefill], atol=1e-4, rtol=0)

    logits, present = lm.forward(ids[:, prefill:], past)
    assert logits.shape == (batch, decode, config.vocab_size)
    assert all(p.shape == (batch, kv_heads, prefill + decode, head_dim) for p in present)
    np.testing.assert_allclose(logits, reference[:, prefill:], atol=1e-4, rtol=0)


def test_left_padded_batch(arch, tiny_models, tiny_onnx):
    """A left-padded row gives the same logits as torch with the same mask and positions."""
    model = tiny_models[arch]
    lm = OnnxCausalLM(tiny_onnx[arch])
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(2, 6), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits, _ = lm.forward(ids, lm.empty_past(2), attention_mask=mask)
    reference = _torch_logits(model, ids, mask, pos)
    np.testing.assert_allclose(logits[0], reference[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1, 3:], reference[1, 3:], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- canonical names


def test_matmuls_named_after_modules(arch, tiny_models, proto):
    model = tiny_models[arch]
    linears = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.")
    }
    assert len(linears) == 7 * model.config.num_hidden_layers
    assert "model.layers.0.self_attn.q_proj" in linears
    nodes = {n.name: n for n in proto.graph.node}
    inits = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for name, module in linears.items():
        assert name in nodes, f"no node named {name}"
        node = nodes[name]
        assert node.op_type == "MatMul"
        assert node.input[1] == f"{name}.weight"
        weight = numpy_helper.to_array(inits[f"{name}.weight"])
        expected = module.weight.detach().numpy().T
        assert weight.shape == (module.in_features, module.out_features)  # [K, N]
        np.testing.assert_array_equal(weight, expected)
        assert consumers[f"{name}.weight"] == 1, f"{name}.weight is shared"
    assert sum(1 for n in proto.graph.node if n.name in linears) == len(linears)


def test_norm_weights_unique(arch, tiny_models, proto):
    model = tiny_models[arch]
    params = dict(model.named_parameters())
    inits = {i.name: i for i in proto.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    seen = []
    for layer in range(model.config.num_hidden_layers):
        for norm in NORMS:
            module = f"model.layers.{layer}.{norm}"
            name = f"{module}.weight"
            assert name in inits, f"missing initializer {name}"
            np.testing.assert_array_equal(numpy_helper.to_array(inits[name]), params[name].detach().numpy())
            assert [(n.op_type, n.name) for n in users[name]] == [("Mul", module)]
            seen.append(numpy_helper.to_array(inits[name]))
    # tiny.py randomises norm weights, so distinct tensors prove nothing was deduplicated
    assert len({w.tobytes() for w in seen}) == len(seen)


def test_opset(proto):
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default and default[0] >= OPSET >= 21
    onnx.checker.check_model(proto)


# --------------------------------------------------------------------------- I/O contract


def test_io_names(arch, tiny_models, proto):
    layers = tiny_models[arch].config.num_hidden_layers
    past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert [v.name for v in proto.graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [v.name for v in proto.graph.output] == ["logits", *present]
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert types["input_ids"] == types["attention_mask"] == types["position_ids"] == onnx.TensorProto.INT64
    assert types["logits"] == types["past_key_values.0.key"] == onnx.TensorProto.FLOAT


def test_io_main_dim_names(arch, tiny_models, proto):
    config = tiny_models[arch].config
    kv_heads, head_dim = kv_shape(config)
    shapes = {v.name: _dims(v) for v in list(proto.graph.input) + list(proto.graph.output)}
    assert shapes["input_ids"] == ["batch_size", "sequence_length"]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert shapes["position_ids"] == ["batch_size", "sequence_length"]
    assert shapes["past_key_values.0.key"] == ["batch_size", kv_heads, "past_sequence_length", head_dim]
    assert shapes["logits"] == ["batch_size", "sequence_length", config.vocab_size]
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            assert shapes[f"present.{i}.{kind}"] == ["batch_size", kv_heads, "total_sequence_length", head_dim]


def test_io_all_dim_names_readable(arch, tiny_models, proto):
    config = tiny_models[arch].config
    kv_heads, head_dim = kv_shape(config)
    for value in list(proto.graph.input) + list(proto.graph.output):
        symbolic = {d for d in _dims(value) if isinstance(d, str)}
        assert symbolic <= READABLE_DIMS, f"{value.name}: {_dims(value)}"
        if value.name.startswith("past_key_values."):
            assert _dims(value) == ["batch_size", kv_heads, "past_sequence_length", head_dim], value.name
