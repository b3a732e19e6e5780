"""AWQ (Lin et al., arXiv 2306.00978): activation-aware scale search + weight clipping, W4A16.

llm-awq's split: *search* scales per decoder layer, record them (our
Equalization, folded by the graph passes like any other), then search a
per-group clipping ratio on the scaled weights.

Scale search, per norm -> linears group (q/k/v; gate/up) and per producer ->
consumer pair (v -> o when the scale can be equal across the query heads sharing
a KV head; up -> down; Phi-3: the v / up rows of its fused qkv_proj / gate_up_proj):
    s = mean|x|^α, normalised s / sqrt(max(s)·min(s)), α in {0, 1/grid, ..., (grid-1)/grid}
    loss(α) = ‖X W − (X/s) Q(s·W)‖²  summed over the group's linears' outputs
(the group's linear outputs, concatenated: simpler than llm-awq's attention /
MLP block output). α = 0 is plain RTN, so the chosen scale never does worse
than RTN on the calibration tokens.

Clip search, per linear except q/k (llm-awq skips them: their outputs go
through softmax, where linear-output MSE says little): for each group of input
channels and output channel, shrink the range by r in linspace(1, 0.5, grid) and
keep the r minimising that group's contribution to the output error
‖X_g (W_g − Q_r(W_g))‖² (llm-awq's per-group loss), on the equalized weights
and inputs X / s.

Both losses are evaluated exactly through the Gram matrix XᵀX of each linear's
input over at most `max_tokens` calibration tokens per layer:
‖X Δ‖² = tr(Δᵀ XᵀX Δ), so the search costs K²·N per grid point, not tokens·K·N.
Inputs come from the float model (the layer walk's float stream): the scales
preserve the function and clipping is applied only in the plan, as llm-awq
computes each layer's inputs from the float layer before applying its scales.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from fptq_onnx.algorithms.common import (
    apply_equalizations,
    check_group_size,
    expand_heads,
    pair_equalization,
    pair_rows,
)
from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import LinearPair
from fptq_onnx.plan import ActMode, Equalization, LinearPlan, QuantPlan
from fptq_onnx.quant import int_range, num_groups, quantize_groups

SUMMARY = "W4A16: AWQ activation-aware scales (folded) + clip search, group-wise int4 asym, float activations"

# Linears whose outputs feed attention scores: no clip search (as llm-awq).
_NO_CLIP_SUFFIXES = ("q_proj", "k_proj")


@dataclass(frozen=True)
class Config:
    group_size: int = 128
    symmetric: bool = False
    bits: int = 4
    grid: int = 20
    clip_search: bool = True
    max_tokens: int = 4096

    def validate(self) -> None:
        check_group_size(self.group_size)
        if self.bits not in (4, 8):
            raise FptqError(f"AWQ bits must be 4 or 8, got {self.bits}")
        if self.grid < 2:
            raise FptqError(f"AWQ grid must be at least 2, got {self.grid}")
        if self.max_tokens < 1:
            raise FptqError(f"AWQ max_tokens must be positive, got {self.max_tokens}")


# --------------------------------------------------------------------------- torch mirror of quant.quantize_groups


def fake_quant(w: torch.Tensor, group_size: int, symmetric: bool, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize a [K, N] weight with exactly quantize_groups' rules (float64 or float32)."""
    k, n = w.shape
    groups = num_groups(k, group_size)
    padded = torch.zeros(groups * group_size, n, dtype=w.dtype, device=w.device)
    padded[:k] = w
    g = padded.view(groups, group_size, n)
    lo_q, hi_q = int_range(bits, symmetric)
    if symmetric:
        absmax = g.abs().amax(dim=1)
        if clip is not None:
            absmax = absmax * clip
        scale = torch.where(absmax > 0, absmax / hi_q, torch.ones_like(absmax)).float().to(w.dtype)
        q = torch.clamp(torch.round(g / scale[:, None, :]), lo_q, hi_q)
        dq = q * scale[:, None, :]
    else:
        lo, hi = g.amin(dim=1), g.amax(dim=1)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = torch.where(hi > lo, (hi - lo) / hi_q, torch.ones_like(hi)).float().to(w.dtype)
        zero = torch.clamp(torch.round(-lo / scale), 0, hi_q)
        q = torch.clamp(torch.round(g / scale[:, None, :]) + zero[:, None, :], 0, hi_q)
        dq = (q - zero[:, None, :]) * scale[:, None, :]
    return dq.reshape(-1, n)[:k]


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X Δ‖² = tr(Δᵀ (XᵀX) Δ) for Δ [K, N]."""
    return float((delta * (gram @ delta)).sum())


# --------------------------------------------------------------------------- statistics of one layer's inputs


class InputStats:
    """Gram matrix XᵀX over a token subsample and mean |x| over all tokens, of one linear's input."""

    def __init__(self, k: int, keep: torch.Tensor, batch_size: int) -> None:
        self.gram: torch.Tensor | float = 0.0  # [K, K] float64 on the inputs' device, from the first batch
        self.abs_sum: torch.Tensor | float = 0.0
        self.tokens = 0
        self.kept = 0
        self._keep = keep  # [samples, seqlen] bool
        self._batch = 0
        self._batch_size = batch_size

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        b = x.shape[0]
        keep = self._keep[self._batch * self._batch_size : self._batch * self._batch_size + b]
        self._batch += 1
        flat = x.reshape(-1, x.shape[-1])
        self.abs_sum += flat.abs().sum(dim=0, dtype=torch.float64)
        self.tokens += flat.shape[0]
        sub = flat[keep.reshape(-1).to(flat.device)]
        self.kept += sub.shape[0]
        self.gram += (sub.T @ sub).double()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


def token_subsample(samples: int, seqlen: int, max_tokens: int, seed: int) -> torch.Tensor:
    total = samples * seqlen
    if max_tokens >= total:
        return torch.ones(samples, seqlen, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=gen)[:max_tokens]] = True
    return keep.view(samples, seqlen)


# --------------------------------------------------------------------------- searches


def awq_scale_candidates(mean_abs: torch.Tensor, grid: int):
    """(α, s) pairs of llm-awq's grid: s = mean|x|^α clamped at 1e-4, normalised by sqrt(max·min)."""
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        yield alpha, s / (s.max() * s.min()).sqrt()


def search_scale(
    weights: list[torch.Tensor], gram: torch.Tensor, mean_abs: torch.Tensor, config: Config,
    tie: tuple[int, int] | None = None,
) -> tuple[np.ndarray, float, float, float]:
    """Best s for consumers `weights` ([K, N_i] float64) reading one input: (s, α, loss, loss at α=0).

    `tie` = (kv_heads, rep): the statistic is averaged over the query heads sharing a
    KV head and s repeated, so that s folds into v_proj (GQA).
    """
    w = torch.cat(weights, dim=1)
    stat = mean_abs
    if tie is not None:
        kv, rep = tie
        stat = mean_abs.view(kv, rep, -1).mean(dim=1)
    best = (None, 0.0, float("inf"))
    rtn_loss = float("nan")
    for alpha, s_small in awq_scale_candidates(stat, config.grid):
        s = s_small if tie is None else s_small[:, None, :].expand(tie[0], tie[1], -1).reshape(-1)
        wq = fake_quant(w * s[:, None], config.group_size, config.symmetric, config.bits) / s[:, None]
        loss = output_error(wq - w, gram)
        if alpha == 0:
            rtn_loss = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    s, alpha, loss = best
    return s.cpu().numpy().astype(np.float32), alpha, loss, rtn_loss


def search_clip(w: torch.Tensor, gram: torch.Tensor, config: Config) -> tuple[np.ndarray, float, float]:
    """Per (group, output channel) shrink ratio minimising ‖X_g Δ_g‖²: (clip [G, N], error, error at r=1)."""
    k, n = w.shape
    gs = config.group_size
    groups = num_groups(k, gs)
    pad = groups * gs
    w = w.to(gram.device)
    gp = torch.zeros(pad, pad, dtype=gram.dtype, device=gram.device)
    gp[:k, :k] = gram
    blocks = gp.view(groups, gs, groups, gs).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, gs, gs]
    best_err = torch.full((groups, n), float("inf"), dtype=w.dtype, device=w.device)
    best_ratio = torch.ones(groups, n, dtype=torch.float32, device=w.device)
    base = None
    for r in np.linspace(1.0, 0.5, config.grid):
        clip = torch.full((groups, n), float(r), dtype=w.dtype, device=w.device)
        delta = torch.zeros(pad, n, dtype=w.dtype, device=w.device)
        delta[:k] = fake_quant(w, gs, config.symmetric, config.bits, clip) - w
        d = delta.view(groups, gs, n)
        err = (d * torch.bmm(blocks, d)).sum(dim=1)  # [G, N]
        if base is None:
            base = float(err.sum())
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.tensor(float(r), dtype=torch.float32, device=w.device), best_ratio)
    return best_ratio.cpu().numpy(), float(best_err.sum()), base


# --------------------------------------------------------------------------- the plan


def _pair_tie(ctx: LayerContext, pair: LinearPair) -> tuple[int, int] | None:
    """(kv, rep): s tied across the query heads sharing a KV head (per_head pairs); None: no tie.

    The shapes are checked first (`pair_rows`), so a tie always divides the consumer's channels.
    """
    pair_rows(ctx, pair)
    if not pair.per_head:
        return None
    heads, kv = ctx.heads
    return (kv, heads // kv)


def observers(ctx: LayerContext, config: Config) -> dict:
    """Per reader group, the Gram matrix and mean |x| of its float input."""
    keep = token_subsample(ctx.samples, ctx.seqlen, config.max_tokens, seed=1000 + ctx.index)
    return {f"awq:{names[0]}": (names[0], InputStats(ctx.linears[names[0]].in_features, keep, ctx.batch_size))
            for names in ctx.reader_groups()}


def plan_layer(ctx: LayerContext, config: Config) -> QuantPlan:
    config.validate()
    p = ctx.prefix
    plan = QuantPlan(method="awq", config=asdict(config), calibration=ctx.calibration)
    notes: dict[str, str] = {}
    stats = {name: ctx.observed[f"awq:{names[0]}"] for names in ctx.reader_groups() for name in names}
    float_w = {n: m.weight.detach().double().T.contiguous() for n, m in ctx.linears.items()}

    for group in ctx.spec.groups:
        names = [p + n for n in group.linears]
        st = stats[names[0]]
        s, alpha, loss, rtn = search_scale([float_w[n] for n in names], st.gram, st.mean_abs, config)
        plan.equalizations.append(Equalization(p + group.norm, "norm", names, s, "awq"))
        for n in names:
            notes[n] = f"α={alpha:.2f} (output error {loss / max(rtn, 1e-30):.2f}x RTN)"
    for pair in ctx.spec.pairs:
        consumer = p + pair.consumer
        tie = _pair_tie(ctx, pair)
        st = stats[consumer]
        s, alpha, loss, rtn = search_scale([float_w[consumer]], st.gram, st.mean_abs, config, tie)
        kv_side = None
        if tie is not None:
            kv_side = np.ascontiguousarray(s.reshape(tie[0], tie[1], -1)[:, 0, :].reshape(-1))
            assert np.array_equal(expand_heads(kv_side, tie[0] * tie[1], tie[0]), s)
        plan.equalizations.append(pair_equalization(ctx, pair, s, "awq", kv_side))
        notes[consumer] = f"α={alpha:.2f} (output error {loss / max(rtn, 1e-30):.2f}x RTN), s folded into {pair.producer}"

    # Clip search on the equalized weights with the equalized inputs (Gram / s sᵀ), then quantize.
    eq_w = apply_equalizations({n: w.float().cpu().numpy() for n, w in float_w.items()}, plan.equalizations)
    input_scale = {n: eq.scale for eq in plan.equalizations for n in eq.linears}
    equalized_by = {n: eq for eq in plan.equalizations for n in eq.linears}
    grid = f"int{config.bits} g{config.group_size} {'sym' if config.symmetric else 'asym'}"
    for name in ctx.linears:
        clip = None
        if config.clip_search and not name.endswith(_NO_CLIP_SUFFIXES):
            gram = stats[name].gram
            if name in input_scale:
                inv = torch.from_numpy(1.0 / input_scale[name].astype(np.float64)).to(gram.device)
                gram = gram * inv[:, None] * inv[None, :]
            clip, err, base = search_clip(torch.from_numpy(eq_w[name]).double(), gram, config)
            notes[name] = notes.get(name, "") + f"; clip mean {clip.mean():.3f} (error {err / max(base, 1e-30):.2f}x unclipped)"
        eq = equalized_by.get(name)
        st = ctx.stats[name]
        m_eq = float((st.channel_max_np() / eq.scale).max()) if eq is not None else st.max_abs
        plan.linears[name] = LinearPlan(
            name, "awq", ActMode.NONE, st.max_abs, m_eq,
            weight=quantize_groups(eq_w[name], config.group_size, config.symmetric, config.bits, clip=clip),
            equalized_by=eq.source if eq else None,
            reason=f"AWQ {grid}: {notes.get(name, '').lstrip('; ')}; float activations",
        )
    return plan
