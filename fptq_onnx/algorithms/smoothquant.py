"""SmoothQuant (Xiao et al., arXiv 2211.10438): migrate activation outliers into the weights.

For each norm -> linears group, per input channel j:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
with max|W_j| over every consumer's weights of input channel j. X becomes X / s
(folded into the norm weight) and W becomes W * s, so the float function is
unchanged while the activation range flattens. `fold_pairs` also smooths
down_proj (s folded into up_proj's output rows) and o_proj (into v_proj's rows,
s tied across the query heads sharing one KV head; a fused producer's slice of
rows: Phi-3's up half of gate_up_proj, v rows of qkv_proj).

Weights: bits=8 -> int8 per output channel symmetric (W8A8); bits=4 -> int4 g128
symmetric (W4A8). Activations: per-token dynamic int8 on every linear (the
paper's dynamic setting), or act=static: per-tensor int8 with scales taken after
smoothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fptq_onnx.algorithms.common import (
    apply_equalizations,
    clipped_static_scale,
    expand_heads,
    grouped_head_scale,
    pair_equalization,
)
from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.algorithms.rtn import parse_optional_bool, quantize_all, weight_grouping
from fptq_onnx.errors import FptqError
from fptq_onnx.plan import ActMode, Equalization, LinearPlan, QuantPlan

SUMMARY = "SmoothQuant: s = max|X|^a / max|W|^(1-a) folded into norms; W8A8 per-channel (or W4A8 g128), per-token int8"

TINY = 1e-5


@dataclass(frozen=True)
class Config:
    alpha: float = 0.5
    bits: int = 8
    group_size: int = 128  # bits=4 only (int8 is per channel unless per_channel=false)
    per_channel: bool | None = None
    symmetric: bool = True
    act: str = "per_token"  # per_token | static
    act_clip: str = "max"  # static only
    fold_pairs: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_channel", parse_optional_bool(self.per_channel))

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise FptqError(f"alpha must be in [0, 1], got {self.alpha}")
        weight_grouping(self.bits, self.group_size, self.per_channel)
        if self.act not in ("per_token", "static"):
            raise FptqError(f"act must be per_token or static, got '{self.act}'")


def smooth_scales(channel_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), tiny maxima clamped, s >= 1e-5."""
    x = np.maximum(channel_max.astype(np.float64), TINY)
    w = np.maximum(weight_max.astype(np.float64), TINY)
    return np.maximum(x**alpha / w ** (1.0 - alpha), TINY).astype(np.float32)


def weight_input_max(weights: list[np.ndarray]) -> np.ndarray:
    """max |W| per input channel over every consumer ([K, N] layout: max over N)."""
    return np.max([np.abs(w).max(axis=1) for w in weights], axis=0)


def smoothing(ctx: LayerContext, alpha: float, fold_pairs: bool = False) -> list[Equalization]:
    """The SmoothQuant equalizations of one layer (norm groups, plus pairs if asked)."""
    stats = ctx.stats
    weights = ctx.weights()
    heads, kv_heads = ctx.heads
    prefix = ctx.prefix
    out: list[Equalization] = []
    for group in ctx.spec.groups:
        names = [prefix + linear for linear in group.linears]
        s = smooth_scales(stats[names[0]].channel_max_np(), weight_input_max([weights[n] for n in names]), alpha)
        out.append(Equalization(prefix + group.norm, "norm", names, s, "smoothquant"))
    if not fold_pairs:
        return out
    for pair in ctx.spec.pairs:
        name = prefix + pair.consumer
        x_max = grouped_head_scale(stats[name].channel_max_np(), pair, heads, kv_heads)
        w_max = grouped_head_scale(weight_input_max([weights[name]]), pair, heads, kv_heads)
        producer_side = smooth_scales(x_max, w_max, alpha)
        consumer_side = expand_heads(producer_side, heads, kv_heads) if pair.per_head else producer_side
        out.append(pair_equalization(ctx, pair, consumer_side, "smoothquant", producer_side if pair.per_head else None))
    return out


def plan_layer(ctx: LayerContext, config: Config) -> QuantPlan:
    config.validate()
    per_channel = weight_grouping(config.bits, config.group_size, config.per_channel)
    plan = QuantPlan(method="smoothquant", config=asdict(config), calibration=ctx.calibration)
    plan.equalizations = smoothing(ctx, config.alpha, config.fold_pairs)
    smoothed = {name: eq for eq in plan.equalizations for name in eq.linears}
    weights = apply_equalizations(ctx.weights(), plan.equalizations)
    quantized = quantize_all(weights, config.bits, config.group_size, per_channel, config.symmetric)
    for name, qw in quantized.items():
        st = ctx.stats[name]
        eq = smoothed.get(name)
        after = float((st.channel_max_np() / eq.scale).max()) if eq is not None else st.max_abs
        prefix = "smoothquant+" if eq is not None else ""
        where = f"s folded into {eq.source}" if eq is not None else "not smoothed (no norm in front; fold_pairs=false)"
        if config.act == "static":
            covered, scale = clipped_static_scale(st, config.act_clip, eq.scale if eq is not None else None)
            lp = LinearPlan(name, prefix + "static", ActMode.STATIC, st.max_abs, covered, scale,
                            equalized_by=eq.source if eq else None, reason=f"{where}; per-tensor static int8")
        else:
            lp = LinearPlan(name, prefix + "per_token", ActMode.PER_TOKEN, st.max_abs, after,
                            equalized_by=eq.source if eq else None, reason=f"{where}; per-token dynamic int8")
        lp.weight = qw
        plan.linears[name] = lp
    return plan
