"""Steps every algorithm shares: read float weights, apply equalizations, quantize, clip scales."""

from __future__ import annotations

import numpy as np
import torch

from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.calibration import LinearStats
from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import LinearPair
from fptq_onnx.plan import Equalization
from fptq_onnx.quant import QuantizedWeight, quantize_groups, static_scale


def check_group_size(group_size: int) -> None:
    if group_size < 16 or group_size & (group_size - 1):
        raise FptqError(f"group size must be a power of two >= 16, got {group_size}")


def apply_equalizations(weights: dict[str, np.ndarray], equalizations: list[Equalization]) -> dict[str, np.ndarray]:
    """W * s on the consumers' input rows; W / s on a producing linear's output columns."""
    out = dict(weights)
    for eq in equalizations:
        for name in eq.linears:
            out[name] = out[name] * eq.scale[:, None]
        if eq.kind == "linear":
            out[eq.source] = out[eq.source] / eq.source_side()[None, :]
    return out


def quantize_weights(
    weights: dict[str, np.ndarray], group_size: int, symmetric: bool, bits: int = 4
) -> dict[str, QuantizedWeight]:
    """RTN for every weight; group_size >= K means per output channel."""
    return {name: quantize_groups(w, group_size, symmetric, bits) for name, w in weights.items()}


def clipped_static_scale(stats: LinearStats, clip: str, equalization: np.ndarray | None = None) -> tuple[float, float]:
    """(max |X| the scale covers, scale) for a per-tensor static int8 activation.

    clip 'max' covers the calibrated maximum; 'pXX.X' covers that percentile of the
    per-token maxima (outlier tokens then saturate instead of stretching the grid).
    With an equalization the covered max is of X / s.
    """
    channel_max = stats.channel_max_np()
    if equalization is not None:
        channel_max = channel_max / equalization
    full = float(channel_max.max())
    if clip == "max":
        return full, static_scale(full)
    if not clip.startswith("p"):
        raise FptqError(f"unknown activation clip '{clip}'; use 'max' or a percentile like 'p99.9'")
    try:
        pct = float(clip[1:])
    except ValueError:
        raise FptqError(f"unknown activation clip '{clip}'; use 'max' or a percentile like 'p99.9'") from None
    if not 0 < pct <= 100:
        raise FptqError(f"activation clip percentile must be in (0, 100], got {pct}")
    token_max = stats.token_max_np()
    # Token maxima are pre-equalization; scale them by the tensor-level shrink the equalization gives.
    shrink = full / stats.max_abs if stats.max_abs > 0 else 1.0
    covered = min(float(np.percentile(token_max, pct)) * shrink, full)
    return covered, static_scale(covered)


def grouped_head_scale(channel_max: np.ndarray, pair: LinearPair, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """For v_proj -> o_proj under GQA: the max over query heads sharing a KV head, per head dim.

    Returns the max per *producer* channel ([kv_heads * head_dim]); the consumer's
    per-channel vector is its repetition over the query heads of each group.
    """
    if not pair.per_head:
        return channel_max
    head_dim = channel_max.size // num_heads
    rep = num_heads // num_kv_heads
    return channel_max.reshape(num_kv_heads, rep, head_dim).max(axis=1).reshape(-1)


def expand_heads(kv_side: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    head_dim = kv_side.size // num_kv_heads
    rep = num_heads // num_kv_heads
    return np.repeat(kv_side.reshape(num_kv_heads, 1, head_dim), rep, axis=1).reshape(-1)


def pair_rows(ctx: LayerContext, pair: LinearPair) -> slice:
    """The rows of `pair`'s producer that feed its consumer in this layer (LinearPair.producer_rows)."""
    producer, consumer = ctx.linears[ctx.prefix + pair.producer], ctx.linears[ctx.prefix + pair.consumer]
    rows = pair.producer_rows(producer.out_features, consumer.in_features, *ctx.heads)
    if rows is None:
        raise FptqError(f"cannot fold into {pair.producer}: its {producer.out_features} output rows do not pair "
                        f"with the {consumer.in_features} input channels of {pair.consumer} (rows={pair.rows!r})")
    return rows


def pair_equalization(ctx: LayerContext, pair: LinearPair, scale: np.ndarray, method: str,
                      kv_side: np.ndarray | None = None) -> Equalization:
    """`scale` folded across `pair`: the consumer's input channels times s, the producer rows feeding them over s.

    `kv_side`: s per producer channel where it differs from `scale` (per_head: one per
    KV-head channel). A fused producer's other rows (Phi-3's q and k, gate) get 1, so
    the outputs the consumer does not read keep their values.
    """
    rows = pair_rows(ctx, pair)
    side = scale if kv_side is None else kv_side
    out = ctx.linears[ctx.prefix + pair.producer].out_features
    if side.size != rows.stop - rows.start:
        raise FptqError(f"{method} scale for {pair.producer} has {side.size} channels, its rows {rows.start}:{rows.stop}")
    source_scale = kv_side
    if rows != slice(0, out):
        source_scale = np.ones(out, np.float32)
        source_scale[rows] = side
    return Equalization(ctx.prefix + pair.producer, "linear", [ctx.prefix + pair.consumer], scale, method,
                        source_scale=source_scale)
