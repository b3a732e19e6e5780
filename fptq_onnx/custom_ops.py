"""The fptq custom-operator library (``libfptq_ops.so``) from Python.

* :func:`library_path` / :func:`register`: find the library and register it
  with an ``onnxruntime.SessionOptions``.
* :func:`pack_weights`: standard ONNX blocked-DequantizeLinear weights
  ([K, N] int4 values, scales [ceil(K/G), N]) -> the op's layout.
* :func:`reference_w4a8_matmul`: the numpy reference that *defines* the
  numerics of ``fptq::W4A8MatMul`` (see custom_ops/include/fptq/w4a8_contract.h).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

from fptq_onnx.errors import FptqError

DOMAIN = "fptq"
OP_TYPE = "W4A8MatMul"
LIBRARY_NAME = "libfptq_ops.so"
DEFAULT_ZERO_POINT = 8


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    out = [here / LIBRARY_NAME]
    for key in ("platlib", "purelib"):
        p = sysconfig.get_paths().get(key)
        if p:
            out.append(Path(p) / "fptq_onnx" / LIBRARY_NAME)
    # scikit-build-core build dirs of a source checkout (build/{wheel_tag}/custom_ops/)
    out += sorted((here.parent / "build").glob(f"*/custom_ops/{LIBRARY_NAME}"))
    return out


def library_path() -> Path:
    """Path of libfptq_ops.so: $FPTQ_OPS_LIBRARY, next to this module, the installed
    package dir (editable installs), or a scikit-build build dir of this checkout."""
    env = os.environ.get("FPTQ_OPS_LIBRARY")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FptqError(f"FPTQ_OPS_LIBRARY={env} is not a file")
        return p
    for p in _candidates():
        if p.is_file():
            return p
    raise FptqError(
        f"{LIBRARY_NAME} not found (build it with `pip install .` or `pip install -e .`, or set FPTQ_OPS_LIBRARY)"
    )


def register(sess_options) -> None:
    """Register the fptq custom ops with an ``onnxruntime.SessionOptions``."""
    sess_options.register_custom_ops_library(str(library_path()))


def _n_groups(K: int, group_size: int) -> int:
    return -(-K // group_size)


def pack_weights(
    q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, group_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ONNX blocked DequantizeLinear layout -> W4A8MatMul inputs (B, scales, zero_points).

    ``q``: [K, N] int4 values, either int8 in -8..7 (signed int4) or uint8 in 0..15
    (unsigned int4); ``scales``: [ceil(K/G), N]; ``zero_points``: [ceil(K/G), N] of the
    same kind as ``q`` (int8 -8..7 or uint8 0..15) or None (ONNX default: 0).
    Dequantized weight: ``(q[k, n] - zp[k // G, n]) * scales[k // G, n]``.

    Returns B uint8 [N, n_groups, G/2], scales float32 [N, n_groups] and zero points
    uint8 [N, n_groups], or None when every zero point is 8 (the op's default).
    """
    q = np.asarray(q)
    scales = np.asarray(scales)
    if q.ndim != 2:
        raise FptqError(f"pack_weights: q must be [K, N], got shape {q.shape}")
    if group_size < 16 or group_size & (group_size - 1):
        raise FptqError(f"pack_weights: group_size must be a power of two >= 16, got {group_size}")
    K, N = q.shape
    ng = _n_groups(K, group_size)
    if scales.shape != (ng, N):
        raise FptqError(f"pack_weights: scales must have shape {(ng, N)}, got {scales.shape}")

    if q.dtype == np.int8:
        if q.min(initial=0) < -8 or q.max(initial=0) > 7:
            raise FptqError("pack_weights: int8 q must be in -8..7")
        qu = q.astype(np.int16) + 8
        if zero_points is None:
            zp = np.full((ng, N), 8, dtype=np.int16)  # signed int4 default zero point 0
        else:
            zero_points = np.asarray(zero_points)
            if zero_points.dtype != np.int8:
                raise FptqError("pack_weights: zero_points must be int8 (-8..7) when q is int8")
            zp = zero_points.astype(np.int16) + 8
    elif q.dtype == np.uint8:
        if q.max(initial=0) > 15:
            raise FptqError("pack_weights: uint8 q must be in 0..15")
        qu = q.astype(np.int16)
        if zero_points is None:
            zp = np.zeros((ng, N), dtype=np.int16)  # unsigned int4 default zero point 0
        else:
            zero_points = np.asarray(zero_points)
            if zero_points.dtype != np.uint8:
                raise FptqError("pack_weights: zero_points must be uint8 (0..15) when q is uint8")
            zp = zero_points.astype(np.int16)
    else:
        raise FptqError(f"pack_weights: q must be int8 (-8..7) or uint8 (0..15), got {q.dtype}")
    if zp.shape != (ng, N):
        raise FptqError(f"pack_weights: zero_points must have shape {(ng, N)}, got {zp.shape}")
    if zp.min(initial=0) < 0 or zp.max(initial=0) > 15:
        raise FptqError("pack_weights: zero point out of the int4 range")

    Kp = ng * group_size
    full = np.empty((N, Kp), dtype=np.uint8)
    full[:, :K] = qu.T
    if Kp > K:  # unused nibbles of a ragged last group hold the zero point
        full[:, K:] = zp[-1][:, None]
    pairs = full.reshape(N, ng, group_size // 2, 2)
    B = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    scales_ng = np.ascontiguousarray(scales.T, dtype=np.float32)
    zp_ng = np.ascontiguousarray(zp.T.astype(np.uint8))
    if np.all(zp_ng == DEFAULT_ZERO_POINT):
        zp_ng = None
    return np.ascontiguousarray(B), scales_ng, zp_ng


def unpack_weights(B: np.ndarray, K: int) -> np.ndarray:
    """B uint8 [N, n_groups, G/2] -> unsigned nibbles uint8 [N, K]."""
    N = B.shape[0]
    nib = np.empty(B.shape + (2,), dtype=np.uint8)
    nib[..., 0] = B & 0x0F
    nib[..., 1] = B >> 4
    return nib.reshape(N, -1)[:, :K]


def quantize_activations(a: np.ndarray, act_scale, act_mode: str) -> tuple[np.ndarray, np.ndarray]:
    """a float32 [M, K] -> (q int8 [M, K], s_a float32 [M]) exactly as the op does."""
    a = np.asarray(a, dtype=np.float32)
    M = a.shape[0]
    if act_mode == "static":
        if act_scale is None:
            raise FptqError("act_scale is required when act_mode is 'static'")
        s = np.float32(np.asarray(act_scale, dtype=np.float32).reshape(-1)[0])
        q = np.clip(np.rint(a / s), -128, 127)
        s_a = np.full((M,), s, dtype=np.float32)
    elif act_mode == "per_token":
        m = np.max(np.abs(a), axis=-1) if a.shape[-1] else np.zeros((M,), np.float32)
        s_a = np.where(m == 0, np.float32(1), m / np.float32(127)).astype(np.float32)
        q = np.clip(np.rint(a / s_a[:, None]), -127, 127)
    else:
        raise FptqError(f"unknown act_mode {act_mode!r} (expected 'static' or 'per_token')")
    return q.astype(np.int8), s_a


def reference_w4a8_matmul(
    a: np.ndarray,
    B: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    act_scale,
    bias: np.ndarray | None,
    K: int,
    N: int,
    group_size: int,
    act_mode: str,
) -> np.ndarray:
    """Numpy reference of fptq::W4A8MatMul (the definition of its numerics).

    Activations -> int8 (static: clip(rint(a/act_scale), -128, 127); per_token:
    s_a = max|a_row|/127 (1 if 0), clip(rint(a/s_a), -127, 127)); per group
    isum_g = sum q*(w - zp) in exact integers; y = s_a * sum_g scales*isum_g + bias,
    accumulated in float64 and returned as float32.
    """
    a = np.asarray(a, dtype=np.float32)
    if a.shape[-1] != K:
        raise FptqError(f"A's last dimension must be K={K}, got shape {a.shape}")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, K)
    M = a2.shape[0]
    G = group_size
    ng = _n_groups(K, G)
    q, s_a = quantize_activations(a2, act_scale, act_mode)
    w = unpack_weights(np.asarray(B, dtype=np.uint8), K).astype(np.int64)  # [N, K]
    zp = (
        np.full((N, ng), DEFAULT_ZERO_POINT, np.int64)
        if zero_points is None
        else np.asarray(zero_points).astype(np.int64)
    )
    wz = w - np.repeat(zp, G, axis=1)[:, :K]  # [N, K]
    qp = np.zeros((M, ng * G), dtype=np.int64)
    qp[:, :K] = q
    wp = np.zeros((N, ng * G), dtype=np.int64)
    wp[:, :K] = wz
    isum = np.einsum("mgk,ngk->mng", qp.reshape(M, ng, G), wp.reshape(N, ng, G))  # exact int64
    y = s_a.astype(np.float64)[:, None] * np.einsum("mng,ng->mn", isum.astype(np.float64), np.asarray(scales, np.float64))
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :]
    return y.astype(np.float32).reshape(*lead, N)
