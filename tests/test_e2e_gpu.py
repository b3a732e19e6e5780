"""bench/e2e_gpu.py's plumbing on the CPU EP with the tiny llama.

The IO-binding loop (device-side KV cache fed back as the next step's past) gives the same greedy
tokens as plain `session.run` steps, for the fp32 export and its fp16 copy (both after the
cache-shapes pass, as the bench runs them), and the profile-based placement report counts the
nodes. The CUDA run itself is the lead's (`--provider cuda` on the GPU machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import e2e_gpu  # noqa: E402

STEPS = 5


def _plain_greedy(path, prompt: np.ndarray, dtype) -> np.ndarray:
    """The reference loop: OnnxCausalLM.forward with host arrays (session.run)."""
    from fptq_onnx.runtime import OnnxCausalLM

    lm = OnnxCausalLM(path)
    past = [np.zeros((prompt.shape[0], lm.kv_heads, 0, lm.head_dim), dtype) for _ in range(2 * lm.num_layers)]
    ids, tokens = prompt, []
    for _ in range(STEPS + 1):
        logits, past = lm.forward(ids, past)
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(ids)
    return np.concatenate(tokens, axis=1)


@pytest.fixture(scope="module")
def float_models(tiny_onnx, tmp_path_factory):
    directory = tmp_path_factory.mktemp("e2e-gpu")
    for file in tiny_onnx["llama"].parent.iterdir():
        shutil.copy(file, directory / file.name.replace("model", "float"))
    fp32 = directory / "float.onnx"
    return {np.float32: e2e_gpu.bench_copy(fp32, half=False, share_shapes=True),
            np.float16: e2e_gpu.bench_copy(fp32, half=True, share_shapes=True)}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_io_binding_loop_matches_plain_run(float_models, dtype):
    path = float_models[dtype]
    prompt = np.random.default_rng(1).integers(0, 128, (2, 9), dtype=np.int64)
    lm = e2e_gpu.BoundLM(path, "cpu")
    assert lm.kv_dtype == dtype
    tokens, prefill_s, decode_s = lm.generate(prompt, STEPS)
    assert tokens.shape == (2, STEPS + 1) and prefill_s > 0 and decode_s > 0
    np.testing.assert_array_equal(tokens, _plain_greedy(path, prompt, dtype))


def test_placement_counts_decode_step_nodes(float_models, tmp_path):
    lm = e2e_gpu.BoundLM(float_models[np.float16], "cpu", profile_prefix=str(tmp_path / "profile"))
    report = e2e_gpu.probe_placement(lm)
    assert not list(tmp_path.iterdir()), "the profile file is left behind"
    assert set(report["by_ep"]) == {"CPUExecutionProvider"} and report["by_ep"]["CPUExecutionProvider"] > 10
    assert sum(report["cpu_ops"].values()) == report["by_ep"]["CPUExecutionProvider"]
    assert report["memcpy"] == 0 and report["watched"]["MatMul"] > 0


@pytest.mark.slow
def test_bench_end_to_end_on_cpu(tiny_checkpoint, tmp_path):
    """The whole script: export + convert into DIR, fp16 copies, the three forms measured, the table written."""
    out = tmp_path / "e2e.md"
    convert_args = "--calib random --calib-samples 2 --calib-seqlen 16 --group-size 16 --ppl-windows 0"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "e2e_gpu.py"), str(tmp_path / "models"), "--source",
         str(tiny_checkpoint), "--convert-args", convert_args, "--provider", "cpu", "--batches", "1,2",
         "--prompts", "8", "--decode", "2", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    for label in e2e_gpu.FORMS:
        assert sum(line.startswith(f"| {label} | ") for line in table.splitlines()) == 2 + 1  # 2 speed rows + placement
    assert "MatMulNBits" in table and "W4A8MatMul" in table
