"""Tracing three decoder layers and copying the middle one gives the graph a full trace gives.

"The same graph" is checked as the same computation: for 5-layer models the replicated and
the full trace have the same inputs, outputs and initializers and ONNX Runtime gives
bit-identical logits and cache outputs for both (the exporter shares cache-length nodes
between layers differently from one config to another, so node lists are not compared);
and a 5-layer checkpoint converts through it and passes convert's ORT-vs-torch parity
check (prefill and KV-cache decode).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import save_tiny_checkpoint
from tiny import tiny_config

from fptq_onnx.layer_replicas import TRACED, traced_layers
from fptq_onnx.models.registry import spec_for
from fptq_onnx.stream_export import finish_structure, is_placeholder, trace_structure


def _config(model_type: str, layers: int):
    config = tiny_config(model_type)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * layers
    return config


def _finished(config, tmp_path: Path, replicate: bool) -> Path:
    """The finished float structure, linear weights filled in from a seeded random model, saved."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    values = {k: v.detach().numpy() for k, v in real.state_dict().items()}
    values.update({k: v.numpy() for k, v in real.named_buffers()})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    spec = spec_for(config.model_type)
    linears = {n for n, m in skeleton.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(spec.layers_path + ".")}
    model = trace_structure(skeleton, spec, replicate=replicate)
    assert skeleton.config.num_hidden_layers == config.num_hidden_layers  # the skeleton is whole again
    model = finish_structure(model, skeleton, spec, values.__getitem__, linears)
    for name, value in model.graph.initializers.items():
        if is_placeholder(value.const_value):
            value.const_value = ir.tensor(np.ascontiguousarray(values[name].T), name=name)
    path = tmp_path / f"replicate-{replicate}.onnx"
    ir.save(model, path)
    return path


def _smollm2_like(layers: int):
    """SmolLM2-135M's config at tiny widths: its exporter graph shares cache-length nodes between layers."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, vocab_size=128, num_hidden_layers=layers, max_position_embeddings=8192,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})


CONFIGS = {
    "llama": lambda: _config("llama", 5),
    "smollm2-like": lambda: _smollm2_like(5),
    "qwen3": lambda: _config("qwen3", 5),
    "phi3": lambda: _config("phi3", 5),
}


@pytest.mark.parametrize("name", ["llama", "smollm2-like", pytest.param("qwen3", marks=pytest.mark.slow),
                                  pytest.param("phi3", marks=pytest.mark.slow)])
def test_replicated_trace_computes_what_the_full_trace_does(name: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    from fptq_onnx.export import example_inputs

    config = CONFIGS[name]()
    full, copied = (_finished(config, tmp_path, replicate) for replicate in (False, True))
    a, b = ir.load(full), ir.load(copied)
    assert [v.name for v in b.graph.inputs] == [v.name for v in a.graph.inputs]
    assert [v.name for v in b.graph.outputs] == [v.name for v in a.graph.outputs]
    assert sorted(b.graph.initializers) == sorted(a.graph.initializers)
    feeds = dict(zip([v.name for v in a.graph.inputs], (t.numpy() for t in example_inputs(config, batch=2, seq=5, past=4))))
    outputs = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, feeds) for p in (full, copied)]
    for x, y in zip(*outputs):
        np.testing.assert_array_equal(x, y)


def test_which_models_are_traced_whole() -> None:
    assert traced_layers(_config("llama", 30)) == TRACED
    assert traced_layers(_config("llama", 3)) == 3
    assert traced_layers(_config("llama", 2)) == 2
    mixed = tiny_config("gemma3_text")  # sliding and global layers: not copies of one another
    mixed.num_hidden_layers, mixed.layer_types = 6, ["sliding_attention"] * 5 + ["full_attention"]
    assert traced_layers(mixed) == 6


@pytest.mark.slow
def test_five_layer_checkpoint_converts_with_parity(cli, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("llama", 5), dtype=torch.float32).eval()
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", model=model)
    out = tmp_path / "out" / "m.onnx"
    result = cli("convert", ckpt, out, "--format", "qdq,w4a8", "--calib", "random", "--calib-samples", "4",
                 "--calib-seqlen", "16", "--group-size", "16", "--ppl-windows", "0")
    assert result.code == 0, result.stderr
    manifest = json.loads(out.with_name("m.manifest.json").read_text())
    assert manifest["parity"]["top1_agreement"] > 0.9
    names = {v.name for v in ir.load(out).graph.inputs}
    assert {f"past_key_values.{i}.key" for i in range(5)} <= names
