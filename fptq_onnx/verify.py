"""Self-check of an export: the same prefill and decode step in torch and in ONNX Runtime."""

from __future__ import annotations

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
    logits_scale: float  # max |logits| of the reference, to read the differences against
    same_next_token: bool

    @property
    def worst(self) -> float:
        return max(self.prefill_max_abs, self.decode_max_abs)

    def describe(self) -> str:
        return (
            f"max |logits diff| prefill {self.prefill_max_abs:.2e}, decode {self.decode_max_abs:.2e} "
            f"(logits up to {self.logits_scale:.1f}; same next token: {'yes' if self.same_next_token else 'NO'})"
        )


def parity_ids(vocab_size: int, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length), dtype=np.int64)


def torch_prefill_decode(model: torch.nn.Module, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference logits: prefill of ids[:, :-1], then one cached decode step of ids[:, -1:]."""
    with torch.no_grad():
        t = torch.from_numpy(ids)
        out = model(input_ids=t[:, :-1], use_cache=True)
        step = model(input_ids=t[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    return out.logits.float().numpy(), step.logits.float().numpy()


def onnx_prefill_decode(path: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lm = OnnxCausalLM(path)
    prefill, past = lm.forward(ids[:, :-1], lm.empty_past(1))
    decode, _ = lm.forward(ids[:, -1:], past)
    return prefill, decode


def check_parity(model: torch.nn.Module, path: Path, tolerance: float | None) -> Parity:
    """Compare torch `model` with the ONNX file; raise when the worst diff exceeds `tolerance`."""
    ids = parity_ids(model.config.vocab_size)
    ref_prefill, ref_decode = torch_prefill_decode(model, ids)
    got_prefill, got_decode = onnx_prefill_decode(path, ids)
    parity = Parity(
        prefill_max_abs=float(np.abs(ref_prefill - got_prefill).max()),
        decode_max_abs=float(np.abs(ref_decode - got_decode).max()),
        logits_scale=float(np.abs(ref_prefill).max()),
        same_next_token=int(ref_decode[0, -1].argmax()) == int(got_decode[0, -1].argmax()),
    )
    if tolerance is not None and not parity.worst <= tolerance:
        raise FptqError(f"parity check failed: {parity.describe()} > tolerance {tolerance:g} (--no-verify skips)")
    return parity
