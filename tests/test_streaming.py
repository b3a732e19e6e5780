"""`convert --stream` (layer streaming) gives the whole-model result on the tiny models.

Same decisions, same equalizations, same activation scales, same ONNX logits; the
outputs keep their weights in external data and pass the parity check; bad input
fails with one `error:` line and leaves nothing behind. The whole-model side reuses
the session's cached tiny export (as test_convert does); the streaming side's
structure export (meta device) is cached per architecture in this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ARGS = ("--calib", "random", "--calib-samples", "5", "--calib-seqlen", "16", "--group-size", "16",
        "--v0", "1", "--v1", "5", "--ppl-windows", "0")
FORMATS = ("qdq", "w4a8", "native")


@pytest.fixture(scope="module")
def structure_cache():
    """Streaming structure exports by model type: a pristine graph, handed out as clones."""
    return {}


def _convert_both(cli, checkpoint: Path, arch: str, tiny_onnx, structure_cache, out_dir: Path, extra=()):
    import onnx_ir as ir

    from fptq_onnx import convert, streaming

    original = streaming._meta_structure

    def cached(hf_config, spec, model, linear_names, export_structure):
        if arch not in structure_cache:
            structure_cache[arch] = original(hf_config, spec, model, linear_names, export_structure)
        return structure_cache[arch].clone()

    args = (*ARGS, "--format", ",".join(FORMATS), *extra)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streaming, "_meta_structure", cached)
        mp.setattr(convert, "export_float", lambda model, spec: ir.load(tiny_onnx[arch]))
        streamed = cli("convert", checkpoint, out_dir / "stream.onnx", "--stream", *args)
        whole = cli("convert", checkpoint, out_dir / "whole.onnx", "--no-stream", *args)
    assert streamed.code == 0, streamed.stderr
    assert whole.code == 0, whole.stderr
    return streamed


def _manifest(path: Path) -> dict:
    return json.loads(path.with_name(path.stem + ".manifest.json").read_text())


def _logits(path: Path) -> np.ndarray:
    from fptq_onnx.runtime import OnnxCausalLM

    lm = OnnxCausalLM(path)
    ids = np.random.default_rng(1).integers(0, 100, size=(2, 10))
    logits, _ = lm.forward(ids, lm.empty_past(2))
    return logits


def _check_same(out_dir: Path) -> None:
    for fmt in FORMATS:
        suffix = "" if fmt == "qdq" else f".{fmt}"
        s_path, w_path = out_dir / f"stream{suffix}.onnx", out_dir / f"whole{suffix}.onnx"
        s, w = _manifest(s_path), _manifest(w_path)
        assert list(s["linears"]) == list(w["linears"])
        assert s["counts"] == w["counts"] and len(s["counts"]) >= 2, s["counts"]
        for name, wl in w["linears"].items():
            sl = s["linears"][name]
            for key in ("strategy", "act_mode", "equalized_by", "weight"):
                assert sl[key] == wl[key], (fmt, name, key)
            assert sl["max_abs"] == pytest.approx(wl["max_abs"], rel=1e-5)
            if wl["act_scale"] is not None:
                assert sl["act_scale"] == pytest.approx(wl["act_scale"], rel=1e-5)
        for se, we in zip(s["equalizations"], w["equalizations"], strict=True):
            assert se["source"] == we["source"] and se["linears"] == we["linears"]
            assert se["scale_max"] == pytest.approx(we["scale_max"], rel=1e-5)
        assert s["calibration"] == w["calibration"]
        assert s_path.with_name(s_path.name + ".data").is_file(), "streamed weights live in external data"
        if fmt != "native":
            assert s["parity"]["checked_value"] if "checked_value" in s["parity"] else True
            assert s["parity"]["mean_abs"] == pytest.approx(w["parity"]["mean_abs"], rel=0.05, abs=1e-6)
        np.testing.assert_allclose(_logits(s_path), _logits(w_path), atol=1e-5, rtol=0)
    assert not list(out_dir.glob(".fptq-*")), "staging dirs left behind"


@pytest.mark.parametrize("extra", [(), ("--fold-pairs", "--asym")], ids=["paper", "fold-pairs-asym"])
def test_stream_equals_whole_model_llama(cli, tiny_checkpoint, tiny_onnx, structure_cache, tmp_path, extra):
    result = _convert_both(cli, tiny_checkpoint, "llama", tiny_onnx, structure_cache, tmp_path, extra)
    assert "streaming layers" in result.stderr and "peak RSS" in result.stderr
    _check_same(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_stream_equals_whole_model_other_archs(cli, make_tiny_checkpoint, tiny_onnx, structure_cache, tmp_path, arch):
    _convert_both(cli, make_tiny_checkpoint(arch), arch, tiny_onnx, structure_cache, tmp_path)
    _check_same(tmp_path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--method", "gptq"), "--stream supports methods"),
        (("--weights", "mse"), "rtn weight quantizer only"),
        (("--max-memory", "1MB"), "over --max-memory"),
        (("--max-memory", "lots"), "--max-memory: expected a size"),
    ],
)
def test_stream_bad_input(cli, tiny_checkpoint, tmp_path, extra, message):
    result = cli("convert", tiny_checkpoint, tmp_path / "m.onnx", "--stream", *ARGS, *extra)
    assert result.code == 1
    assert len(result.error_lines) == 1 and message in result.error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_stream_corrupt_checkpoint(cli, make_tiny_checkpoint, tmp_path):
    checkpoint = make_tiny_checkpoint("llama", seed=3)
    shard = next(checkpoint.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "out"
    out.mkdir()
    result = cli("convert", checkpoint, out / "m.onnx", "--stream", *ARGS)
    assert result.code == 1 and len(result.error_lines) == 1, result.stderr
    assert "corrupt safetensors" in result.error_lines[0] or "cannot read" in result.error_lines[0]
    assert list(out.iterdir()) == []


def test_lazy_checkpoint_reads_shards(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fptq_onnx.errors import FptqError
    from fptq_onnx.lazy_weights import INDEX_FILE, LazyCheckpoint

    save_file({"a": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    ckpt = LazyCheckpoint(tmp_path)
    assert ckpt.numel() == 10 and ckpt.stored_bytes() == 20
    assert ckpt.get("a").dtype == torch.float32 and ckpt.get("a")[1, 2] == 5
    with pytest.raises(FptqError, match="missing"):
        ckpt.get("c")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FptqError, match="gone.safetensors"):
        LazyCheckpoint(tmp_path)


def test_rename_plan_and_memory_parsing():
    from fptq_onnx.plan import ActMode, Equalization, LinearPlan, QuantPlan
    from fptq_onnx.streaming import GIB, parse_memory, rename_plan

    plan = QuantPlan("fptq", {}, {})
    plan.linears["model.layers.0.mlp.down_proj"] = LinearPlan(
        "model.layers.0.mlp.down_proj", "lae+static", ActMode.STATIC, 9.0, 3.0, 0.1, equalized_by="model.layers.0.mlp.up_proj")
    plan.equalizations.append(Equalization("model.layers.0.mlp.up_proj", "linear", ["model.layers.0.mlp.down_proj"],
                                           np.ones(4, np.float32), "lae"))
    out = rename_plan(plan, "model.layers.0.", "model.layers.17.")
    assert list(out.linears) == ["model.layers.17.mlp.down_proj"]
    assert out.linears["model.layers.17.mlp.down_proj"].equalized_by == "model.layers.17.mlp.up_proj"
    assert out.equalizations[0].source == "model.layers.17.mlp.up_proj"
    assert out.equalizations[0].linears == ["model.layers.17.mlp.down_proj"]
    assert parse_memory("20GB") == 20 * GIB and parse_memory("512MB") == 512 * 1024**2 and parse_memory("3") == 3 * GIB
    assert parse_memory(None) is None


def test_auto_stream_decision(tiny_checkpoint):
    from fptq_onnx.convert import ConvertOptions
    from fptq_onnx.streaming import GIB, should_stream

    options = ConvertOptions()
    assert should_stream(str(tiny_checkpoint), options, 1024**2)  # a budget the whole model exceeds
    assert not should_stream(str(tiny_checkpoint), options, 64 * GIB)
    assert not should_stream(str(tiny_checkpoint / "missing"), options, 1024**2)  # left to the whole-model path
