"""Quantization arithmetic shared by the algorithms, the torch fake-quant check and the graph passes.

One definition of each rounding rule lives here so the ONNX model and the torch
reference of the same plan compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_MAX = 127


@dataclass
class QuantizedWeight:
    """Group-wise integer weight in the layout of ONNX blocked DequantizeLinear (axis 0 of [K, N]).

    q: int8 [K, N]: symmetric values in [-2^(b-1), 2^(b-1) - 1], or asymmetric in
       [0, 2^b - 1] with zero_points.
    scales: float32 [ceil(K / group_size), N]; the last group may be ragged. One group
       (group_size >= K) is per-output-channel quantization.
    zero_points: uint8 [ceil(K / group_size), N] or None (symmetric: zero point 0).
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    group_size: int
    bits: int = 4

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def per_channel(self) -> bool:
        return self.scales.shape[0] == 1

    def dequantize(self) -> np.ndarray:
        return dequantize(self)

    def slim(self) -> QuantizedWeight:
        """Same shapes and settings, no data (zero-stride views): for plans whose values are on disk already."""

        def empty(a: np.ndarray) -> np.ndarray:
            return np.broadcast_to(np.zeros((), a.dtype), a.shape)

        return QuantizedWeight(empty(self.q), empty(self.scales),
                               None if self.zero_points is None else empty(self.zero_points), self.group_size, self.bits)

    def describe(self) -> str:
        grouping = "per-channel" if self.per_channel else f"g{self.group_size}"
        return f"int{self.bits} {grouping} {'sym' if self.symmetric else 'asym'}"

    @property
    def nbytes_packed(self) -> int:
        """Bytes on disk: packed weights plus fp32 scales (and packed zero points)."""
        k, n = self.q.shape
        zp = 0 if self.zero_points is None else (self.zero_points.size * self.bits + 7) // 8
        return (k * n * self.bits + 7) // 8 + self.scales.nbytes + zp


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _grouped(w: np.ndarray, group_size: int) -> np.ndarray:
    """[K, N] -> [G, group_size, N], padding the ragged last group with zeros."""
    k, n = w.shape
    groups = num_groups(k, group_size)
    padded = np.zeros((groups * group_size, n), dtype=np.float32)
    padded[:k] = w
    return padded.reshape(groups, group_size, n)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def quantize_groups(
    w: np.ndarray, group_size: int, symmetric: bool = True, bits: int = 4, clip: np.ndarray | None = None
) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of a [K, N] weight.

    Symmetric maps max |w| of a group to the largest positive level (7 for int4),
    so the grid is symmetric around zero. `clip` (optional, [G, N] in (0, 1])
    shrinks each group's range before rounding; search-based quantizers pass it.
    """
    k, _ = w.shape
    grouped = _grouped(np.asarray(w, np.float32), group_size)
    lo_q, hi_q = int_range(bits, symmetric)
    if symmetric:
        absmax = np.abs(grouped).max(axis=1)
        if clip is not None:
            absmax = absmax * clip
        scales = np.where(absmax > 0, absmax / hi_q, 1.0).astype(np.float32)
        q = np.clip(np.rint(grouped / scales[:, None, :]), lo_q, hi_q)
        zero_points = None
    else:
        lo, hi = grouped.min(axis=1), grouped.max(axis=1)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scales = np.where(hi > lo, (hi - lo) / hi_q, 1.0).astype(np.float32)
        zero_points = np.clip(np.rint(-lo / scales), 0, hi_q).astype(np.uint8)
        q = np.clip(np.rint(grouped / scales[:, None, :]) + zero_points[:, None, :], 0, hi_q)
    q = q.reshape(-1, w.shape[1])[:k]
    q = q.astype(np.int8) if symmetric or bits < 8 else q.astype(np.uint8)
    return QuantizedWeight(q=q, scales=scales, zero_points=zero_points, group_size=group_size, bits=bits)


def quantize_int4(w: np.ndarray, group_size: int, symmetric: bool = True, clip: np.ndarray | None = None) -> QuantizedWeight:
    return quantize_groups(w, group_size, symmetric, bits=4, clip=clip)


def quantize_int8_per_channel(w: np.ndarray, symmetric: bool = True) -> QuantizedWeight:
    return quantize_groups(w, w.shape[0], symmetric, bits=8)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    k, n = qw.q.shape
    grouped = _grouped(qw.q.astype(np.float32), qw.group_size)
    if qw.zero_points is not None:
        grouped = grouped - qw.zero_points[:, None, :].astype(np.float32)
    return (grouped * qw.scales[:, None, :]).reshape(-1, n)[:k].astype(np.float32)


def static_scale(max_abs: float) -> float:
    """Per-tensor int8 scale mapping the calibrated max to 127."""
    return float(max(max_abs, 1e-8) / INT8_MAX)


def lae_scales(channel_max: np.ndarray) -> np.ndarray:
    """FPTQ's Logarithmic Activation Equalization: s_j = max|X_j| / log2(2 + max|X_j|).

    After X/s every channel's max becomes log2(2 + max|X_j|): large channels are
    compressed logarithmically, small ones barely move.
    """
    m = np.maximum(channel_max.astype(np.float64), 1e-5)
    return (m / np.log2(2.0 + m)).astype(np.float32)
