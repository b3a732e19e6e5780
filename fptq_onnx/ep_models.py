"""Scoring on another execution provider with the numbers the CPU EP computes for the file.

Why: the full evaluation sets take hours on a CPU and minutes on a GPU, but a quantized file does not mean
the same thing everywhere. ORT's CUDA EP has no kernels for the int4 weight DequantizeLinear or the blocked
(per-token) QuantizeLinear of our qdq form (it would run them on the CPU, copying every activation), and
its MatMulNBits ignores accuracy_level 4, so ORT's own W4A8 peer would silently become W4A16 there. The
model is therefore rewritten, in a temporary copy, into float ops with the CPU's arithmetic
(passes/emulate_acc4.py, then passes/float_qdq.py) before the CUDA session is made. A float model is
used as it is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnxruntime as ort

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.stamp_decisions import ORT_ACCURACY_LEVEL_KEY
from fptq_onnx.runtime import OnnxCausalLM

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    # TF32 off: the GPU's float32 matmuls round like the CPU's, not to 10-bit mantissas.
    "cuda": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
}


def _needs_rewrite(model) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph)


def cpu_arithmetic_copy(path: Path, directory: Path) -> Path:
    """`path` rewritten into float ops computing what ORT's CPU EP computes for it (saved under `directory`),
    or `path` itself when it has nothing to rewrite."""
    import onnx_ir as ir

    from fptq_onnx.formats import run_passes
    from fptq_onnx.passes.emulate_acc4 import EmulateAcc4Pass
    from fptq_onnx.passes.float_qdq import FloatQdqPass

    from fptq_onnx.saving import save_model

    model = ir.load(path)
    if not _needs_rewrite(model):
        return path
    level = model.metadata_props.pop(ORT_ACCURACY_LEVEL_KEY, "0")
    if level not in ("0", "4"):
        raise FptqError(f"{path}: MatMulNBits accuracy_level {level} has no float emulation; score it on --provider cpu")
    passes = [EmulateAcc4Pass()] if level == "4" else []
    model = run_passes(model, [*passes, FloatQdqPass()])
    out = directory / path.name
    save_model(model, out, external=True)  # always: loaded tensors still point at the original's data file
    return out


def scoring_lm(path: Path, provider: str = "cpu", threads: int | None = None) -> OnnxCausalLM:
    """The evaluation harness's model on `provider` ('cpu' or 'cuda'), with the CPU's numbers either way."""
    if provider not in PROVIDERS:
        raise FptqError(f"unknown provider '{provider}'; known: {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return OnnxCausalLM(path, threads=threads, spin=False)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise FptqError(f"--provider cuda: onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                        "(install onnxruntime-gpu, or score on --provider cpu)")
    workdir = tempfile.TemporaryDirectory(prefix="fptq-ep-")
    lm = OnnxCausalLM(cpu_arithmetic_copy(Path(path), Path(workdir.name)), threads=threads,
                      providers=PROVIDERS[provider], spin=False)
    if "CUDAExecutionProvider" not in lm.session.get_providers():
        raise FptqError(f"{path}: ONNX Runtime fell back to the CPU (CUDA libraries not loadable?); "
                        "check `python -c 'import onnxruntime; print(onnxruntime.get_device())'`")
    lm.workdir = workdir  # the copy lives as long as the session that reads it
    return lm
