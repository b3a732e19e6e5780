"""The plan: the seam between torch-side algorithms and ONNX graph passes.

Algorithms only *produce* a QuantPlan (per linear: activation mode and scale,
the quantized weight; per fold: the equalization vector and where it goes).
Passes only *consume* it. Its JSON form (arrays summarised) is the manifest
written next to the model, which `inspect` and Netron metadata read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from fptq_onnx.errors import FptqError
from fptq_onnx.quant import QuantizedWeight


class ActMode(str, Enum):
    """How a linear's input activation is quantized at run time."""

    NONE = "none"  # float activations (weight-only, W4A16)
    STATIC = "static"  # per-tensor int8, calibrated scale
    PER_TOKEN = "per_token"  # int8, scale = row max / 127 computed at run time
    PER_BLOCK = "per_block"  # ORT MatMulNBits accuracy_level 4: per K-block dynamic int8, uncalibrated


@dataclass
class Equalization:
    """A per-channel scale s: the linears' input X becomes X / s and their weights W * s.

    `source` is where 1/s folds: a norm weight (kind 'norm') or the output
    channels of a producing linear (kind 'linear', e.g. up_proj for down_proj).
    """

    source: str
    kind: str
    linears: list[str]
    scale: np.ndarray  # per input channel of the consumers
    method: str  # 'lae', 'smoothquant', ...
    source_scale: np.ndarray | None = None  # per output channel of a producing linear, if it differs (GQA)

    def source_side(self) -> np.ndarray:
        return self.scale if self.source_scale is None else self.source_scale

    def summary(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "linears": self.linears,
            "method": self.method,
            "scale_min": float(self.scale.min()),
            "scale_max": float(self.scale.max()),
            "channels": int(self.scale.size),
        }


@dataclass
class LinearPlan:
    name: str
    strategy: str  # human-readable decision, e.g. 'static', 'lae+static', 'per_token'
    act_mode: ActMode
    max_abs: float  # calibrated max |X| before equalization
    max_abs_equalized: float  # after equalization (what the static scale covers)
    act_scale: float | None = None
    weight: QuantizedWeight | None = None
    equalized_by: str | None = None  # Equalization.source
    reason: str = ""

    def summary(self) -> dict:
        data = {
            "strategy": self.strategy,
            "act_mode": self.act_mode.value,
            "max_abs": round(self.max_abs, 4),
            "max_abs_equalized": round(self.max_abs_equalized, 4),
            "act_scale": self.act_scale,
            "equalized_by": self.equalized_by,
            "reason": self.reason,
        }
        if self.weight is not None:
            data["weight"] = {
                "bits": self.weight.bits,
                "group_size": self.weight.group_size,
                "per_channel": self.weight.per_channel,
                "symmetric": self.weight.symmetric,
                "shape_kn": list(self.weight.q.shape),
            }
        return data


@dataclass
class EmbeddingPlan:
    """An input embedding tied to a quantized linear, quantized with it: int8 rows, one scale per row.

    `weight` is in the tied linear's [K, N] = [hidden, vocab] layout, per output channel,
    so one channel is one embedding row.
    """

    name: str  # the embedding module, e.g. model.embed_tokens
    tied_to: str  # the linear sharing its float weight (lm_head)
    weight: QuantizedWeight

    def summary(self) -> dict:
        return {
            "tied_to": self.tied_to,
            "weight": f"int{self.weight.bits} per-row {'sym' if self.weight.symmetric else 'asym'}",
            "shape_vh": list(self.weight.q.shape[::-1]),
        }


@dataclass
class QuantPlan:
    method: str
    config: dict
    calibration: dict
    linears: dict[str, LinearPlan] = field(default_factory=dict)
    equalizations: list[Equalization] = field(default_factory=list)
    embedding: EmbeddingPlan | None = None  # set by `--quantize-lm-head` when the embedding is tied

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for plan in self.linears.values():
            counts[plan.strategy] = counts.get(plan.strategy, 0) + 1
        return dict(sorted(counts.items()))

    def manifest(self, **extra) -> dict:
        from fptq_onnx import __version__

        return {
            "tool": "fptq-onnx",
            "version": __version__,
            "method": self.method,
            "config": self.config,
            "calibration": self.calibration,
            # Top level so that nobody misses it: the calibration text is also evaluated (leakage.py).
            "calibration_overlaps_eval": bool(self.calibration.get("overlaps_eval", False)),
            "counts": self.counts(),
            **extra,
            "equalizations": [e.summary() for e in self.equalizations],
            "linears": {name: p.summary() for name, p in self.linears.items()},
            **({"embeddings": {self.embedding.name: self.embedding.summary()}} if self.embedding else {}),
        }


def manifest_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".manifest.json")


def read_manifest(model_path: Path) -> dict:
    path = manifest_path(model_path)
    if not path.is_file():
        raise FptqError(f"no manifest beside {model_path} (expected {path.name}); was it made by `fptq-onnx convert`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FptqError(f"corrupt manifest {path}: {exc}") from None


def to_json(data: dict) -> str:
    def default(obj):
        if isinstance(obj, (np.floating, np.integer)):
            return obj.item()
        if isinstance(obj, Enum):
            return obj.value
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)
        raise TypeError(type(obj))

    return json.dumps(data, indent=2, default=default)
