"""Self-check of an export: the same prefill and decode step in torch and in ONNX Runtime.

Float exports must agree to float rounding (max |diff|). A quantized model is
compared with the torch fake-quant model of the same plan; there the max is not a
useful bound: a value that sits on a rounding boundary can round differently in
ORT and torch (different float summation order), and that one-step change then
propagates through the later layers. On SmolLM2 with static int8 activations the
torch fake-quant model in float32 already differs from itself in float64 by a mean
|logits diff| near 0.9. So a quantized model is compared with the float64 reference
and must stay within `tolerance` x the float32 reference's own distance from it
(the noise floor): a wrong scale or a misplaced Q/DQ lands far outside that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fptq_onnx.errors import FptqError
from fptq_onnx.runtime import OnnxCausalLM


@dataclass(frozen=True)
class Parity:
    prefill_max_abs: float
    decode_max_abs: float
    mean_abs: float
    logits_scale: float  # max |logits| of the reference, to read the differences against
    top1_agreement: float  # fraction of positions whose argmax token agrees
    metric: str  # 'max': bound on max |diff|; 'noise': bound on mean |diff| / noise floor
    noise_floor: float | None = None  # mean |torch fp32 - torch fp64| of the same reference

    @property
    def checked_value(self) -> float:
        if self.metric == "max":
            return max(self.prefill_max_abs, self.decode_max_abs)
        return self.mean_abs / max(self.noise_floor or 0.0, 1e-4)

    def describe(self) -> str:
        floor = "" if self.noise_floor is None else f", torch fp32 vs fp64 mean {self.noise_floor:.2e}"
        return (
            f"|logits diff| max prefill {self.prefill_max_abs:.2e}, decode {self.decode_max_abs:.2e}, "
            f"mean {self.mean_abs:.2e}{floor} (logits up to {self.logits_scale:.1f}); "
            f"greedy token agrees at {self.top1_agreement:.0%} of positions"
        )


def parity_ids(vocab_size: int, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length), dtype=np.int64)


def torch_prefill_decode(model: torch.nn.Module, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference logits: prefill of ids[:, :-1], then one cached decode step of ids[:, -1:]."""
    with torch.no_grad():
        t = torch.from_numpy(ids)
        out = model(input_ids=t[:, :-1], use_cache=True)
        step = model(input_ids=t[:, -1:], cache=out.past_key_values, use_cache=True)
    return out.logits.float().numpy(), step.logits.float().numpy()


def onnx_prefill_decode(path: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lm = OnnxCausalLM(path)
    prefill, past = lm.forward(ids[:, :-1], lm.empty_past(1))
    decode, _ = lm.forward(ids[:, -1:], past)
    return prefill, decode


def check_parity(
    model: torch.nn.Module, path: Path, tolerance: float | None, ids: np.ndarray | None = None, metric: str = "max"
) -> Parity:
    """Compare torch `model` with the ONNX file; raise when `metric`'s value exceeds `tolerance`."""
    ids = parity_ids(model.config.vocab_size) if ids is None else ids
    ref32 = np.concatenate(torch_prefill_decode(model, ids), axis=1)
    ref, noise_floor = ref32, None
    if metric == "noise":
        ref = np.concatenate(torch_prefill_decode(copy.deepcopy(model).double(), ids), axis=1)
        noise_floor = float(np.abs(ref32 - ref).mean())
    return parity_of(ref, *onnx_prefill_decode(path, ids), metric, noise_floor, tolerance)


def parity_of(ref: np.ndarray, got_prefill: np.ndarray, got_decode: np.ndarray, metric: str,
              noise_floor: float | None, tolerance: float | None) -> Parity:
    """ONNX Runtime's prefill + decode logits against the reference logits of the whole sequence;
    raises when `metric`'s value exceeds `tolerance` (None: only measure)."""
    n = got_prefill.shape[1]
    got = np.concatenate([got_prefill, got_decode], axis=1)
    parity = Parity(
        prefill_max_abs=float(np.abs(ref[:, :n] - got_prefill).max()),
        decode_max_abs=float(np.abs(ref[:, n:] - got_decode).max()),
        mean_abs=float(np.abs(ref - got).mean()),
        logits_scale=float(np.abs(ref).max()),
        top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).mean()),
        metric=metric,
        noise_floor=noise_floor,
    )
    if tolerance is not None and not parity.checked_value <= tolerance:
        what = "max |logits diff|" if metric == "max" else "mean |logits diff| / fp32 noise floor"
        raise FptqError(
            f"parity check failed: {what} {parity.checked_value:.3g} > tolerance {tolerance:g} "
            f"({parity.describe()}; --no-verify skips)"
        )
    return parity
