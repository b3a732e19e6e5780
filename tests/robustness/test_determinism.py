"""The same model, options and seed give byte-identical outputs: .onnx, external data, manifest, sidecars.

Every method converts the tiny checkpoint twice, in two interpreters with different
hash seeds (this test process and a subprocess with another PYTHONHASHSEED), so any
output that depends on set/dict iteration order of strings, on a timestamp or on
a temporary path shows up as a difference; every file of the two output dirs is
compared by hash. Every method is compared streamed too (one pipeline, two sources:
test_streaming.py shows the two give the same bytes).

Nothing is excluded from the comparison (no manifest key depends on the run).
fptq in memory (all three formats) is the fast case; the other methods are slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import cli_executable
from fptq_onnx import algorithms
VOLATILE_MANIFEST_KEYS: set[tuple[str, str]] = set()
FAST = ["--calib", "random", "--calib-samples", "4", "--calib-seqlen", "32", "--ppl-windows", "0", "--seed", "3"]
FORMATS = {"ort-acc4": "native"}  # ORT's own W4A8 exists only as MatMulNBits


def content_hashes(directory: Path) -> dict[str, str]:
    """name -> sha256 of every file; manifests hashed without the documented volatile keys."""
    out = {}
    for file in sorted(directory.iterdir()):
        data = file.read_bytes()
        if file.name.endswith(".manifest.json"):
            manifest = json.loads(data)
            for section, key in VOLATILE_MANIFEST_KEYS:
                manifest.get(section, {}).pop(key, None)
            data = json.dumps(manifest, sort_keys=True).encode()
        out[file.name] = hashlib.sha256(data).hexdigest()
    return out


def _other_hash_seed() -> str:
    return "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"


def convert_twice(cli, ckpt: Path, tmp_path: Path, args: list[str]) -> tuple[dict, dict]:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    result = cli("convert", ckpt, first / "m.onnx", *args)
    assert result.code == 0, result.stderr
    proc = subprocess.run(cli_executable() + ["convert", str(ckpt), str(second / "m.onnx"), *args],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONHASHSEED": _other_hash_seed(), "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    return content_hashes(first), content_hashes(second)


def _cases():
    for method in algorithms.ALGORITHMS:
        fast = method == "fptq"
        yield pytest.param(method, "memory", id=f"{method}-memory", marks=() if fast else pytest.mark.slow)
        yield pytest.param(method, "stream", id=f"{method}-stream", marks=pytest.mark.slow)


@pytest.mark.parametrize("method,mode", list(_cases()))
def test_convert_is_byte_identical_across_runs(cli, tiny_checkpoint, tmp_path, method, mode):
    args = ["--method", method, "--format", FORMATS.get(method, "qdq,w4a8,native"), *FAST]
    if mode == "stream":
        # the streamed parity reference is tested by tests/test_streaming.py; here only the bytes matter
        args += ["--stream", "--no-verify"]
    first, second = convert_twice(cli, tiny_checkpoint, tmp_path, args)
    assert first == second
    assert "m.onnx" in first and any(name.endswith(".manifest.json") for name in first)
    if mode == "stream":
        assert "m.onnx.data" in first, "the layer walk always writes external data"


def test_external_data_save_is_byte_identical(tiny_onnx, tmp_path):
    """`export`'s external-data writer (used above 512 MB, so not by the tiny exports)."""
    import onnx_ir as ir

    from fptq_onnx.saving import save_model

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_model(ir.load(tiny_onnx["llama"]), tmp_path / name / "model.onnx", external=True)
    a, b = content_hashes(tmp_path / "a"), content_hashes(tmp_path / "b")
    assert a == b and set(a) == {"model.onnx", "model.onnx.data"}
