"""The `fptq-onnx` command line: bad input fails cleanly, good input round-trips export -> generate.

A user error must give a non-zero exit, exactly one stderr line starting with "error:",
no traceback, and leave the output directory as it was (no partial .onnx/.data, no temp dirs).
Most runs go through `fptq_onnx.cli.main` in-process (fast); a few go through the installed
console script in a subprocess to cover the real entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper


SIDECARS = {"config.json", "generation_config.json", "genai_config.json", "tokenizer.json", "tokenizer_config.json"}


def _listing(directory: Path) -> dict[str, str]:
    """name -> sha256 of every entry (dirs marked), to prove nothing was added, removed or changed."""
    out = {}
    for entry in sorted(directory.iterdir()):
        out[entry.name] = "<dir>" if entry.is_dir() else hashlib.sha256(entry.read_bytes()).hexdigest()
    return out


def assert_user_error(result, match: str, out_dir: Path | None = None, before: dict | None = None) -> str:
    """The contract of a user error; returns the error line."""
    text = result.stdout + result.stderr
    assert result.code not in (0, None), f"exit code {result.code}\n{text}"
    assert "Traceback" not in text, text
    assert len(result.error_lines) == 1, f"want one 'error:' line on stderr, got:\n{result.stderr}"
    line = result.error_lines[0]
    assert match.lower() in line.lower(), line
    if out_dir is not None:
        after = _listing(out_dir)
        assert after == (before or {}), f"output dir changed: {sorted(before or {})} -> {sorted(after)}"
    return line


@pytest.fixture
def cached_export(monkeypatch, tiny_onnx):
    """Make the CLI's export step return the session's tiny llama export (same weights as
    `tiny_checkpoint`) instead of re-running torch.onnx.export: for tests about what happens
    around the export (saving, parity failure, overwriting), not about the export itself."""
    import onnx_ir as ir

    from fptq_onnx import pipeline

    path = tiny_onnx["llama"]
    monkeypatch.setattr(pipeline, "export_float", lambda model, spec: ir.load(path))
    return path


@pytest.fixture
def out_dir(tmp_path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- bad models


def test_missing_model_dir(cli, tmp_path, out_dir):
    result = cli("export", tmp_path / "missing", out_dir / "m.onnx")
    assert result.code == 1
    assert_user_error(result, "model not found", out_dir)


def test_dir_without_config(cli, tmp_path, out_dir):
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("export", tmp_path / "empty", out_dir / "m.onnx"), "no config.json", out_dir)


def test_dir_without_weights(cli, tiny_checkpoint, tmp_path, out_dir):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    assert_user_error(cli("export", ckpt, out_dir / "m.onnx"), "no weights", out_dir)


def test_corrupt_config(cli, tiny_checkpoint, tmp_path, out_dir):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "config.json").write_text('{"model_type": "llama", ')
    assert_user_error(cli("export", ckpt, out_dir / "m.onnx"), "corrupt config", out_dir)


def test_corrupt_safetensors(cli, tiny_checkpoint, tmp_path, out_dir):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(os.urandom(4096))
    assert_user_error(cli("export", ckpt, out_dir / "m.onnx"), "cannot load the model", out_dir)


def test_pickle_weights_refused(cli, tiny_checkpoint, tmp_path, out_dir):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    line = assert_user_error(cli("export", ckpt, out_dir / "m.onnx"), "pickle", out_dir)
    assert "--allow-pickle" in line


def test_unsupported_architecture_names_supported(cli, tmp_path, out_dir):
    from transformers import AutoModelForCausalLM, GPT2Config

    ckpt = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(ckpt)
    line = assert_user_error(cli("export", ckpt, out_dir / "m.onnx"), "unsupported architecture 'gpt2'", out_dir)
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in line


# --------------------------------------------------------------------------- bad outputs


def test_output_not_onnx(cli, tiny_checkpoint, out_dir):
    assert_user_error(cli("export", tiny_checkpoint, out_dir / "model.txt"), "must end in .onnx", out_dir)


def test_read_only_output_dir(cli, tiny_checkpoint, out_dir):
    out_dir.chmod(0o555)
    try:
        if os.access(out_dir, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (test_unwritable_output_dir covers it)")
        assert_user_error(cli("export", tiny_checkpoint, out_dir / "m.onnx"), "not writable", out_dir)
    finally:
        out_dir.chmod(0o755)


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs sysfs (/sys), where no user can create files")
def test_unwritable_output_dir(cli, tiny_checkpoint, cached_export):
    before = sorted(os.listdir("/sys"))
    result = cli("export", tiny_checkpoint, "/sys/m.onnx", "--no-verify")
    assert_user_error(result, "/sys")
    assert sorted(os.listdir("/sys")) == before


# --------------------------------------------------------------------------- generate on bad input


def test_generate_not_onnx_subprocess(cli, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf\n" * 10)
    before = _listing(tmp_path)
    result = cli("generate", bad, "hello", in_process=False)
    assert result.code == 1
    assert_user_error(result, "cannot load", tmp_path, before)


def test_generate_missing_file(cli, tmp_path):
    assert_user_error(cli("generate", tmp_path / "none.onnx", "hello"), "not found", tmp_path, {})


def test_generate_onnx_that_is_not_a_causal_lm(cli, tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "id.onnx")
    before = _listing(tmp_path)
    assert_user_error(cli("generate", tmp_path / "id.onnx", "hello"), "not a causal-LM export", tmp_path, before)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def exported(cli, tiny_checkpoint, tmp_path_factory) -> tuple[Path, object]:
    """`fptq-onnx export CKPT OUT/model.onnx` on the tiny llama checkpoint (verify on). Treat as read-only."""
    out = tmp_path_factory.mktemp("cli-export") / "model.onnx"
    result = cli("export", tiny_checkpoint, out)
    assert result.code == 0, result.stdout + result.stderr
    return out, result


def _copy_export(exported_path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported_path.parent, tmp_path / "bundle")) / exported_path.name


def test_export_writes_bundle(exported):
    out, result = exported
    assert "Traceback" not in result.stderr and not result.error_lines
    assert "checking parity" in result.stderr  # verify is on by default
    names = {p.name for p in out.parent.iterdir()}
    assert names == {"model.onnx"} | SIDECARS, names  # small model: no .data file, no temp dirs
    assert json.loads((out.parent / "config.json").read_text())["model_type"] == "llama"
    onnx.checker.check_model(str(out))


def test_generate_end_to_end_subprocess(cli, exported):
    out, _ = exported
    before = _listing(out.parent)
    result = cli("generate", out, "the quick brown", "--max-new-tokens", "6", in_process=False)
    assert result.code == 0, result.stderr
    assert result.stdout.strip(), f"generate printed nothing; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert _listing(out.parent) == before


def test_existing_output_refused_without_force(cli, tiny_checkpoint, exported):
    out, _ = exported
    before = _listing(out.parent)
    line = assert_user_error(cli("export", tiny_checkpoint, out), "exists", out.parent, before)
    assert "--force" in line


def test_force_overwrites(cli, tiny_checkpoint, exported, cached_export, tmp_path):
    out = _copy_export(exported[0], tmp_path)
    out.write_bytes(b"old model")
    (out.parent / "config.json").write_text("{}")
    (out.parent / "model.onnx.data").write_bytes(b"stale weights of an older, larger export")
    result = cli("export", tiny_checkpoint, out, "--force")
    assert result.code == 0, result.stdout + result.stderr
    assert {p.name for p in out.parent.iterdir()} == {"model.onnx"} | SIDECARS
    assert out.read_bytes() == cached_export.read_bytes()
    assert json.loads((out.parent / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.slow  # a second real export (~4 s); test_force_overwrites covers the fast path
def test_force_overwrites_with_real_export(cli, make_tiny_checkpoint, exported, tmp_path):
    """--force with a different checkpoint: the new weights land in the old file's place."""
    out = _copy_export(exported[0], tmp_path)
    other = make_tiny_checkpoint("llama", seed=1)
    result = cli("export", other, out, "--force", "--no-verify")
    assert result.code == 0, result.stdout + result.stderr
    assert {p.name for p in out.parent.iterdir()} == {"model.onnx"} | SIDECARS
    from safetensors.numpy import load_file

    name = "model.layers.0.self_attn.q_proj.weight"
    expected = load_file(other / "model.safetensors")[name].T
    got = {i.name: i for i in onnx.load(str(out)).graph.initializer}[name]
    np.testing.assert_array_equal(numpy_helper.to_array(got), expected)


def test_failed_parity_keeps_previous_output(cli, tiny_checkpoint, exported, cached_export, tmp_path):
    """A failure after the files were staged (--tolerance -1 always fails) leaves the old bundle intact."""
    out = _copy_export(exported[0], tmp_path)
    before = _listing(out.parent)
    result = cli("export", tiny_checkpoint, out, "--force", "--tolerance", "-1")
    assert_user_error(result, "parity check failed", out.parent, before)


def test_help(cli):
    result = cli("--help")
    assert result.code == 0
    assert "export" in result.stdout and "generate" in result.stdout
