"""The real default model (SmolLM2-135M-Instruct) through export and generate. Slow: ~1.5 min on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_export(smollm2_dir, tmp_path_factory):
    """Export once with the product's pipeline (verify on, tolerance 1e-3); returns (onnx path, Parity)."""
    from fptq_onnx.pipeline import export_command

    out = tmp_path_factory.mktemp("smollm2") / "model.onnx"
    parity = export_command(str(smollm2_dir), out, force=False, verify=True, tolerance=1e-3, allow_pickle=False)
    return out, parity


def test_parity(smollm2_export):
    _, parity = smollm2_export
    assert parity is not None
    assert parity.prefill_max_abs <= 1e-3
    assert parity.decode_max_abs <= 1e-3
    assert parity.top1_agreement == 1.0  # greedy token agrees at every position
    assert parity.logits_scale > 1.0  # real logits, not a degenerate model


def test_bundle_files(smollm2_export):
    out, _ = smollm2_export
    names = {p.name for p in out.parent.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.startswith(".")], names  # no temp dirs left
    # 540 MB of weights: must not be inline in the protobuf
    assert (out.parent / "model.onnx.data").stat().st_size > 400e6
    assert out.stat().st_size < 100e6
    config = json.loads((out.parent / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config


def test_generate_paris(cli, smollm2_export):
    out, _ = smollm2_export
    result = cli("generate", out, "What is the capital of France?", "--max-new-tokens", "24", in_process=False)
    assert result.code == 0, result.stderr
    assert "Paris" in result.stdout, result.stdout


def test_loads_with_onnxruntime_alone(smollm2_export):
    """A plain ORT app (no torch, no fptq_onnx) can run the file with the Optimum I/O contract."""
    out, _ = smollm2_export
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import onnxruntime as ort

        session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        assert names[:3] == ["input_ids", "attention_mask", "position_ids"], names
        feed = {
            "input_ids": np.array([[1, 504, 3458, 282]], np.int64),
            "attention_mask": np.ones((1, 4), np.int64),
            "position_ids": np.arange(4, dtype=np.int64)[None],
        }
        for i in session.get_inputs()[3:]:
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        outputs = session.run(None, feed)
        assert outputs[0].shape == (1, 4, 49152), outputs[0].shape
        assert outputs[1].shape == (1, 3, 4, 64), outputs[1].shape
        assert np.isfinite(outputs[0]).all()
        assert "torch" not in sys.modules and "fptq_onnx" not in sys.modules
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300, cwd=Path(out).parent
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
