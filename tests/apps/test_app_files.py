"""Apps load what `export` and `convert` write, unchanged: onnxruntime-genai and transformers 4.x/5.x.

A tiny qwen2 (untied embeddings: a random tiny llama's greedy path repeats one token) is
exported (fp32) into one directory and converted (qdq, w4a8, native) into another, through
the CLI. onnxruntime-genai loads each directory by its genai_config.json, the other formats
by overlaying their genai_config.<format>.json as the README says; its greedy tokens and
per-step logits must match `fptq_onnx.runtime.OnnxCausalLM`. Prompts are token ids: genai's
tokenizer does not read the tiny word-level tokenizer (the real model's is checked by hand,
see the README). Optimum under transformers 4.57 runs in its own venv: .ci/optimum_check.sh.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ARCH = "qwen2"
CONVERT_ARGS = ("--calib", "random", "--calib-samples", "2", "--calib-seqlen", "16", "--group-size", "16",
                "--v0", "1", "--v1", "5", "--ppl-windows", "0")
PROMPT = [5, 9, 17, 3, 40, 22]
NEW_TOKENS = 12
# the genai config of each format: (bundle, file name)
CONFIGS = {
    "fp32": ("export", "genai_config.json"),
    "qdq": ("convert", "genai_config.json"),
    "w4a8": ("convert", "genai_config.w4a8.json"),
    "native": ("convert", "genai_config.native.json"),
}


@pytest.fixture(scope="module")
def bundles(cli, make_tiny_checkpoint, tiny_onnx, structure_cache, tmp_path_factory) -> dict[str, Path]:
    """{"export": model.onnx (fp32), "convert": model.onnx (qdq) + model.w4a8.onnx + model.native.onnx}.

    The session's tiny export of the same weights stands in for torch.onnx.export (as in test_convert);
    the parity checks are other tests' business.
    """
    import onnx_ir as ir
    from conftest import cached_graph_structure

    from fptq_onnx import convert, pipeline

    checkpoint = make_tiny_checkpoint(ARCH)
    dirs = {"export": tmp_path_factory.mktemp("apps-export"), "convert": tmp_path_factory.mktemp("apps-convert")}
    cached = tiny_onnx[ARCH]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "export_float", lambda model, spec: ir.load(cached))
        mp.setattr(convert, "graph_structure", cached_graph_structure(structure_cache))
        results = [
            cli("export", checkpoint, dirs["export"] / "model.onnx", "--no-verify"),
            cli("convert", checkpoint, dirs["convert"] / "model.onnx", "--format", "qdq,w4a8,native", "--no-verify",
                *CONVERT_ARGS),
        ]
    for result in results:
        assert result.code == 0, result.stdout + result.stderr
    return dirs


@pytest.fixture(scope="module")
def og():
    return pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the test extra has it)")


def _config(bundles: dict[str, Path], fmt: str) -> tuple[Path, dict]:
    key, name = CONFIGS[fmt]
    return bundles[key], json.loads((bundles[key] / name).read_text())


def _genai_decode(og, directory: Path, config_name: str, prompt: list[int], new_tokens: int):
    """Greedy tokens and the logits each was chosen from, through onnxruntime-genai."""
    config = og.Config(str(directory))
    if config_name != "genai_config.json":
        config.overlay((directory / config_name).read_text())
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens, logits = [], []
    while not generator.is_done():
        logits.append(np.array(generator.get_logits())[0, -1].copy())
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, logits


def _our_decode(model_file: Path, prompt: list[int], new_tokens: int, eos_ids: set[int]):
    from fptq_onnx.runtime import OnnxCausalLM

    lm = OnnxCausalLM(model_file)
    ids, past = np.array([prompt], np.int64), lm.empty_past(1)
    tokens, logits = [], []
    for _ in range(new_tokens):
        step, past = lm.forward(ids, past)
        logits.append(step[0, -1])
        tokens.append(int(np.argmax(step[0, -1])))
        if tokens[-1] in eos_ids:
            break
        ids = np.array([[tokens[-1]]], np.int64)
    return tokens, logits


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_genai_decodes_like_our_runtime(og, bundles, fmt):
    directory, config = _config(bundles, fmt)
    theirs, their_logits = _genai_decode(og, directory, CONFIGS[fmt][1], PROMPT, NEW_TOKENS)
    ours, our_logits = _our_decode(directory / config["model"]["decoder"]["filename"], PROMPT, NEW_TOKENS,
                                   set(config["model"]["eos_token_id"]))
    assert theirs == ours
    assert len(set(ours)) > 1, "a degenerate greedy path proves little; pick another prompt"
    scale = max(float(np.abs(o).max()) for o in our_logits)
    for step, (a, b) in enumerate(zip(their_logits, our_logits)):
        np.testing.assert_allclose(a, b, atol=1e-4 * scale, rtol=0, err_msg=f"step {step}")


def test_each_format_has_its_genai_config(bundles):
    """OUT.onnx -> genai_config.json, OUT.<fmt>.onnx -> genai_config.<fmt>.json; names and
    KV shape as in the graph; the custom-op library beside the model, for w4a8 only."""
    import onnx

    for fmt in CONFIGS:
        directory, config = _config(bundles, fmt)
        decoder = config["model"]["decoder"]
        expected = "model.onnx" if fmt in ("fp32", "qdq") else f"model.{fmt}.onnx"
        assert decoder["filename"] == expected
        proto = onnx.load(str(directory / expected), load_external_data=False)
        inputs = {i.name: i for i in proto.graph.input}
        names = decoder["inputs"]
        layers = decoder["num_hidden_layers"]
        assert {names["input_ids"], names["attention_mask"], names["position_ids"]} <= inputs.keys()
        assert {names[k] % i for k in ("past_key_names", "past_value_names") for i in range(layers)} <= inputs.keys()
        dims = [d.dim_value or d.dim_param for d in inputs[names["past_key_names"] % 0].type.tensor_type.shape.dim]
        assert dims[1] == decoder["num_key_value_heads"] and dims[3] == decoder["head_size"]
        # ORT's int4 fusion quantizes activations unless told not to (fptq_onnx.runtime reads the same hint)
        hint = {p.key: p.value for p in proto.metadata_props}.get("fptq.ort_matmulnbits_accuracy_level")
        assert decoder["session_options"].get("session.qdq_matmulnbits_accuracy_level") == hint
        library = decoder["session_options"].get("custom_ops_library")
        assert (library is not None) == (fmt == "w4a8")
        if library is not None:
            assert (directory / library).is_file()
    assert not (bundles["export"] / "libfptq_ops.so").exists()


def test_genai_config_names():
    from fptq_onnx.app_files import genai_config_name

    assert genai_config_name("out.onnx", {"out.onnx"}) == "genai_config.json"
    assert genai_config_name("out.w4a8.onnx", {"out.onnx", "out.w4a8.onnx"}) == "genai_config.w4a8.json"
    # a dotted name of the user's own, without its base beside it, is a first model
    assert genai_config_name("out.w4a8.onnx", {"out.w4a8.onnx"}) == "genai_config.json"
    assert genai_config_name("my.model.onnx", {"my.onnx", "my.model.onnx"}) == "genai_config.json"


def test_tokenizer_config_names_a_class_transformers_4_has(cli, tiny_checkpoint, tiny_onnx, tmp_path):
    """transformers 5 writes TokenizersBackend, which 4.x lacks (Optimum's CI step loads these under 4.57).

    The llama checkpoint: for a qwen2 one transformers 5 swaps the tiny word-level tokenizer for
    its Qwen2Tokenizer class (and writes that name, which 4.x maps to Qwen2TokenizerFast)."""
    import onnx_ir as ir
    from conftest import tiny_tokenizer
    from transformers import AutoTokenizer

    from fptq_onnx import pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "export_float", lambda model, spec: ir.load(tiny_onnx["llama"]))
        result = cli("export", tiny_checkpoint, tmp_path / "model.onnx", "--no-verify")
    assert result.code == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert data["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "token_type_ids" not in data["model_input_names"]  # 4.x's default has it; generate refuses it
    text = "the quick brown fox"
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]
