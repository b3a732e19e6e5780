"""ep_models: the float-op copy a CUDA session scores computes what the CPU EP computes for the file."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_compare import CALIB, tiny_data  # noqa: F401  (fixture)

from fptq_onnx.compare import compare_command
from fptq_onnx.ep_models import cpu_arithmetic_copy, scoring_lm
from fptq_onnx.errors import FptqError
from fptq_onnx.runtime import OnnxCausalLM

METHODS = ["fp32", "fptq", "rtn:act=per_token", "smoothquant", "ort-acc4"]


@pytest.fixture(scope="module")
def compared(tiny_checkpoint, tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ep") / "cmp"
    compare_command(str(tiny_checkpoint), METHODS, ["wikitext2"], out, limit=2, seqlen=16, data_dir=str(tiny_data),
                    calibration=CALIB, progress=False, jobs=2)
    return out


@pytest.mark.parametrize("label", ["fptq", "rtn-actper_token", "smoothquant", "ort-acc4"])
def test_copy_has_no_quantized_ops_and_the_same_logits(compared, tmp_path, label):
    path = compared / label / "model.onnx"
    copy = cpu_arithmetic_copy(path, tmp_path)
    assert copy != path
    ops = {node.op_type for node in ir.load(copy).graph}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    ids = np.random.default_rng(0).integers(0, 100, (1, 12))
    want, got = OnnxCausalLM(path).logits(ids), OnnxCausalLM(copy).logits(ids)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_float_model_is_used_as_it_is(compared, tmp_path):
    path = compared / "fp32" / "model.onnx"
    assert cpu_arithmetic_copy(path, tmp_path) == path


def test_jobs_scored_every_row(compared):
    report = json.loads((compared / "results.json").read_text())
    assert list(report["methods"]) == ["fp32", "fptq", "rtn-actper_token", "smoothquant", "ort-acc4"]
    assert report["eval"]["jobs"] == 2 and report["eval"]["provider"] == "cpu"
    for entry in report["methods"].values():
        assert "error" not in entry and entry["results"]["wikitext2"]["n"] == 2


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_without_onnxruntime_gpu_is_one_clear_error(compared):
    with pytest.raises(FptqError, match="no CUDAExecutionProvider"):
        scoring_lm(compared / "fptq" / "model.onnx", "cuda")


def test_unknown_provider(compared):
    with pytest.raises(FptqError, match="unknown provider 'tpu'"):
        scoring_lm(compared / "fptq" / "model.onnx", "tpu")


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
@pytest.mark.parametrize("label", ["fp32", "fptq", "ort-acc4"])
def test_cuda_scores_like_the_cpu(compared, label):
    path = compared / label / "model.onnx"
    ids = np.random.default_rng(1).integers(0, 100, (1, 12))
    want, got = scoring_lm(path, "cpu").logits(ids), scoring_lm(path, "cuda").logits(ids)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
