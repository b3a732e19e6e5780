"""GPTQ (Frantar et al., arXiv 2210.17323): second-order weight rounding, W4A16.

Per linear, the Hessian of the layer-output error is H = 2 X Xᵀ / n over the
calibration inputs X of that linear, taken layer by layer from the model whose
earlier layers are already quantized (sequential.py). Columns (input channels)
are quantized one at a time in blocks of `block_size`; each rounding error is
spread over the not-yet-quantized columns through the Cholesky factor of H⁻¹.

Grouping matches ONNX blocked DequantizeLinear: contiguous groups of
`group_size` input channels in the original order, ragged last group allowed.
Group scales are computed when the group's first column is reached (standard
GPTQ), from the already-updated weights. With `act_order` columns are visited by
descending diag(H), and the group scales are *static*: computed up front on the
original weights, so the result is still contiguous groups (ONNX has no g_idx).

All linears of a layer are quantized from the inputs of one pass through the
(equalized, float) layer, those inputs coming from the already-quantized earlier
layers (the layer walk's quantized stream); the next layer's inputs come from the
quantized layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from fptq_onnx.algorithms.common import check_group_size
from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import fold_norm_scale
from fptq_onnx.plan import ActMode, Equalization, LinearPlan, QuantPlan
from fptq_onnx.quant import QuantizedWeight, int_range, num_groups

SUMMARY = "W4A16: GPTQ second-order weight rounding (group-wise int4, float activations)"


@dataclass(frozen=True)
class Config:
    group_size: int = 128
    symmetric: bool = True
    bits: int = 4
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    mse: bool = False  # each group's range from a shrink search instead of min/max

    def validate(self) -> None:
        check_group_size(self.group_size)
        if self.bits not in (4, 8):
            raise FptqError(f"GPTQ bits must be 4 or 8, got {self.bits}")
        if not 0 < self.damp < 1:
            raise FptqError(f"GPTQ damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise FptqError(f"GPTQ block size must be positive, got {self.block_size}")


# --------------------------------------------------------------------------- the quantizer grid


def _grid_params(w: torch.Tensor, symmetric: bool, bits: int, shrink: float | torch.Tensor = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of w [N, cols]: the same rule as quant.quantize_groups, range times `shrink`."""
    _, hi_q = int_range(bits, symmetric)
    if symmetric:
        absmax = w.abs().amax(dim=1) * shrink
        scale = torch.where(absmax > 0, absmax / hi_q, torch.ones_like(absmax))
        return scale, torch.zeros_like(scale)
    lo = torch.clamp(w.amin(dim=1) * shrink, max=0.0)
    hi = torch.clamp(w.amax(dim=1) * shrink, min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / hi_q, torch.ones_like(hi))
    zero = torch.clamp(torch.round(-lo / scale), 0, hi_q)
    return scale, zero


# Range shrink factors tried by the `mse` grid search, and the error norm (GPTQ's reference uses 2.4).
MSE_SHRINKS = torch.linspace(1.0, 0.5, 26)
MSE_NORM = 2.4


def _searched_grid_params(w: torch.Tensor, symmetric: bool, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the shrunk range whose grid rounds w with the least Σ|w − q(w)|^2.4."""
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_scale, best_zero = _grid_params(w, symmetric, bits)
    lo_q, hi_q = int_range(bits, symmetric)
    for shrink in MSE_SHRINKS:
        scale, zero = _grid_params(w, symmetric, bits, float(shrink))
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], lo_q if symmetric else 0, hi_q)
        err = ((q - zero[:, None]) * scale[:, None] - w).abs().pow(MSE_NORM).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool, bits: int):
    """(integer level, dequantized value) of one column w [N]."""
    lo_q, hi_q = int_range(bits, symmetric)
    if symmetric:
        q = torch.clamp(torch.round(w / scale), lo_q, hi_q)
    else:
        q = torch.clamp(torch.round(w / scale) + zero, 0, hi_q)
    return q, (q - zero) * scale


# --------------------------------------------------------------------------- GPTQ on one weight


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹; more damping if H is not PD numerically."""
    k = h.shape[0]
    mean_diag = torch.mean(torch.diag(h))
    for attempt in range(6):
        hd = h.clone()
        hd.diagonal().add_(damp * (10**attempt) * mean_diag)
        try:
            lower = torch.linalg.cholesky(hd)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise FptqError(f"GPTQ: Hessian of a [{k} x {k}] input is not positive definite even with heavy damping")


def gptq_quantize(
    weight_kn: np.ndarray | torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    symmetric: bool = True,
    bits: int = 4,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mse: bool = False,
) -> QuantizedWeight:
    """GPTQ one weight given in the [K, N] layout with its input Hessian H [K, K].

    `mse` picks each group's range by a shrink search (GPTQ's reference `--mse`) instead of min/max.

    Returns the QuantizedWeight (same layout and rounding rules as quant.quantize_groups).
    """
    w_kn = torch.as_tensor(np.asarray(weight_kn, np.float32) if isinstance(weight_kn, np.ndarray) else weight_kn)
    W = w_kn.detach().float().T.clone()  # [N, K]: columns are input channels, as in the paper's code
    n, k = W.shape
    H = hessian.detach().float().to(W.device).clone()
    if H.shape != (k, k):
        raise FptqError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match K={k}")
    lo_q, hi_q = int_range(bits, symmetric)
    groups = num_groups(k, group_size)
    grid_params = _searched_grid_params if mse else _grid_params

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.zeros(groups, n, device=W.device)
    zeros = torch.zeros(groups, n, device=W.device)
    if act_order:
        # Static groups: grids from the original weights, original contiguous grouping.
        for g in range(groups):
            scales[g], zeros[g] = grid_params(W[:, g * group_size : (g + 1) * group_size], symmetric, bits)
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    else:
        perm = invperm = None

    Hinv = _inverse_hessian_factor(H, damp)
    Q = torch.zeros_like(W)  # integer levels
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if act_order:
                g = int(perm[col]) // group_size
            else:
                g = col // group_size
                if col % group_size == 0:
                    # The group's columns as they are now (updated by earlier errors).
                    end = min(col + group_size, k)
                    current = W1[:, i : min(end - i1, count)]
                    if end > i2:
                        current = torch.cat([current, W[:, i2:end]], dim=1)
                    scales[g], zeros[g] = grid_params(current, symmetric, bits)
            w = W1[:, i]
            d = Hinv1[i, i]
            q, dq = _quantize_column(w, scales[g], zeros[g], symmetric, bits)
            Q1[:, i] = q
            err = (w - dq) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        Q = Q[:, invperm]
    q = Q.T.cpu().numpy()  # [K, N]
    q = q.astype(np.int8) if symmetric or bits < 8 else q.astype(np.uint8)
    assert q.min() >= lo_q and q.max() <= hi_q
    zero_points = None if symmetric else zeros.cpu().numpy().astype(np.uint8)
    return QuantizedWeight(q=q, scales=scales.cpu().numpy().astype(np.float32), zero_points=zero_points,
                           group_size=group_size, bits=bits)


# --------------------------------------------------------------------------- GPTQ of one decoder layer (run by the walk)


@dataclass(frozen=True)
class GptqSettings:
    """What the walk needs to GPTQ a layer (the `gptq` method's config, or a weight quantizer's defaults)."""

    group_size: int
    symmetric: bool
    bits: int = 4
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    mse: bool = False


class HessianAccumulator:
    """Running H = 2/n Σ xᵀx over the rows of the inputs seen so far (the paper's update)."""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(k, k, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.h *= self.n / (self.n + t)
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.T, x)


def apply_equalizations_torch(modules: dict[str, torch.nn.Module], equalizations: list[Equalization],
                              norm_offset: float = 0.0) -> None:
    """In place, like fakequant: norm weight / s (ArchSpec.norm_offset: Gemma's 1 + w),
    producer rows (and bias) / s, consumer columns * s."""
    with torch.no_grad():
        for eq in equalizations:
            source = modules[eq.source]
            side = torch.from_numpy(np.asarray(eq.source_side(), np.float32)).to(source.weight.device)
            if eq.kind == "norm":
                source.weight.copy_(fold_norm_scale(source.weight, side, norm_offset))
            else:
                source.weight.div_(side[:, None])
                if getattr(source, "bias", None) is not None:
                    source.bias.div_(side)
            scale = torch.from_numpy(np.asarray(eq.scale, np.float32)).to(source.weight.device)
            for name in eq.linears:
                modules[name].weight.mul_(scale[None, :])


def gptq_layer(
    layer: torch.nn.Module,
    prefix: str,
    reader_groups: list[list[str]],
    equalizations: list[Equalization],
    forward,
    settings: GptqSettings,
    norm_offset: float = 0.0,
) -> tuple[dict[str, QuantizedWeight], torch.Tensor]:
    """GPTQ one decoder layer: (its weights, the quantized layer's outputs = the next layer's inputs).

    `layer` is a working copy (changed in place): equalized first (the float function is
    unchanged), then every linear's Hessian comes from one `forward(layer, keep=False)`
    on the quantized stream's inputs, its weights are replaced by their dequantized GPTQ
    values and `forward(layer, keep=True)` gives the next inputs.
    """
    modules = {prefix + n: m for n, m in layer.named_modules() if n}
    apply_equalizations_torch(modules, equalizations, norm_offset)
    hessians: dict[str, HessianAccumulator] = {}
    handles = []
    for names in reader_groups:
        module = modules[names[0]]
        acc = HessianAccumulator(module.in_features, module.weight.device)
        hessians.update({name: acc for name in names})
        handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    try:
        forward(layer, keep=False)
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, QuantizedWeight] = {}
    for name, acc in hessians.items():
        module = modules[name]
        qw = gptq_quantize(module.weight.detach().T, acc.h, settings.group_size, settings.symmetric,
                           settings.bits, settings.damp, settings.block_size, settings.act_order, settings.mse)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(qw.dequantize().T).to(module.weight.device))
        out[name] = qw
    return out, forward(layer, keep=True)


def observers(ctx: LayerContext, config: Config) -> dict:
    return {}


def gptq(config: Config) -> GptqSettings:
    return GptqSettings(config.group_size, config.symmetric, config.bits, config.damp, config.block_size,
                        config.act_order, config.mse)


def plan_layer(ctx: LayerContext, config: Config) -> QuantPlan:
    """Float activations everywhere; the weights are the walk's GPTQ of the layer (`gptq(config)`)."""
    config.validate()
    plan = QuantPlan(method="gptq", config=asdict(config), calibration=ctx.calibration)
    grid = f"int{config.bits} g{config.group_size} {'sym' if config.symmetric else 'asym'}"
    for name in ctx.linears:
        m = ctx.stats[name].max_abs
        plan.linears[name] = LinearPlan(
            name, "gptq", ActMode.NONE, m, m,
            reason=f"GPTQ {grid}{', act_order (static groups)' if config.act_order else ''}"
                   f"{', mse ranges' if config.mse else ''}; float activations",
        )
    return plan
