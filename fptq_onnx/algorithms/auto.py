"""Accuracy-first W4A8: each linear's equalization and activation mode chosen by measured error.

FPTQ picks the activation mode from max|X| with fixed thresholds (15 / 150). This
generalises it: for every group of linears reading one input (q/k/v after the
attention norm, gate/up after the MLP norm, o_proj, down_proj), on that layer's
calibration inputs X, we try each equalization s

    none | LAE (FPTQ) | SmoothQuant and AWQ-style (mean|x|^α) scales, α ∈ `alphas`

(o_proj / down_proj: s folds into v_proj / up_proj, or the v / up rows of Phi-3's
fused qkv_proj / gate_up_proj) and each activation
mode for X / s

    per-tensor static int8 (then, for the best equalization, the range chosen by
        output error over a clip grid)
    per-token dynamic int8

with int4 RTN weights of W · s, and measure the group's relative output error
‖X W − Q(X/s) Q(s W)‖² / ‖X W‖². Each group takes its lowest-error pair; if more
linears of a layer would be dynamic than `max_dynamic` allows (dynamic costs a
reduction per token at run time), the groups losing least by going static are
switched first (a per-layer budget: the walk decides each layer once).
The final int4 weights come from `weights` (rtn | mse | gptq, weight_quant.py)
on the chosen equalizations. Every choice and its measured errors go to the
manifest, so `inspect` explains each layer.

Inputs are those of the float model (the walk's float stream, like AWQ): equalizations preserve the float
function, so every group is measured independently of the others' choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from fptq_onnx.algorithms.awq import _pair_tie, fake_quant, token_subsample
from fptq_onnx.algorithms.common import check_group_size, expand_heads, pair_equalization
from fptq_onnx.algorithms.gptq import GptqSettings
from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.algorithms.smoothquant import smooth_scales
from fptq_onnx.algorithms.weight_quant import check_weight_quantizer, gptq_settings, layer_weights, weight_observers
from fptq_onnx.errors import FptqError
from fptq_onnx.fakequant import fake_quant_per_token, fake_quant_static
from fptq_onnx.models.registry import LinearPair
from fptq_onnx.plan import ActMode, Equalization, LinearPlan, QuantPlan
from fptq_onnx.quant import lae_scales, static_scale

SUMMARY = "W4A8 accuracy-first: per group, equalization and static/per-token int8 chosen by measured output error"

# Fractions of the calibrated range a static scale may cover; the error decides.
STATIC_CLIP_GRID = (1.0, 0.85, 0.7, 0.55, 0.4)


@dataclass(frozen=True)
class Config:
    group_size: int = 128
    symmetric: bool = True
    weights: str = "rtn"
    max_dynamic: float = 1.0  # fraction of linears allowed per-token dynamic
    alphas: str = "0.25,0.5,0.75"  # SmoothQuant candidates ('' = none)
    awq: bool = True  # also try AWQ's s = mean|x|^α for the same α
    max_tokens: int = 512  # calibration tokens per layer used for the error measurements

    def validate(self) -> None:
        check_group_size(self.group_size)
        check_weight_quantizer(self.weights)
        if not 0.0 <= self.max_dynamic <= 1.0:
            raise FptqError(f"max_dynamic must be in [0, 1], got {self.max_dynamic}")
        if self.max_tokens < 16:
            raise FptqError(f"max_tokens must be at least 16, got {self.max_tokens}")
        self.alpha_values()

    def alpha_values(self) -> list[float]:
        try:
            values = [float(a) for a in self.alphas.split(",") if a.strip()]
        except ValueError:
            raise FptqError(f"alphas must be a comma list of numbers in (0, 1), got '{self.alphas}'") from None
        if any(not 0 < a < 1 for a in values):
            raise FptqError(f"alphas must lie in (0, 1), got '{self.alphas}'")
        return values


@dataclass
class Choice:
    """One measured (equalization, activation mode) candidate of a reader group."""

    equalization: str  # 'none', 'lae', 'sq0.50', 'awq'
    act_mode: ActMode
    error: float  # relative output error with int8 activations and int4 RTN weights
    weight_error: float  # the same with float activations (W4A16)
    covered: float  # max |X/s| the static scale covers (per-token: the calibrated max)
    scale: np.ndarray | None  # s per consumer input channel; None = no equalization
    kv_side: np.ndarray | None = None  # s per producer channel when it differs (GQA)


@dataclass
class Group:
    """Linears reading one input, where their s would fold, and the best choice per mode."""

    names: list[str]
    source: str
    pair: LinearPair | None  # None: s folds into the norm `source`
    max_abs: float
    best: dict[ActMode, Choice]


class _Sampler:
    """Keeps the calibration tokens selected by `keep` ([samples, seqlen] bool) of one linear's input."""

    def __init__(self, keep: torch.Tensor) -> None:
        self._keep = keep
        self._seen = 0
        self._rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        mask = self._keep[self._seen : self._seen + x.shape[0]].reshape(-1)
        self._seen += x.shape[0]
        self._rows.append(x.detach().float().reshape(-1, x.shape[-1])[mask.to(x.device)])

    def tokens(self) -> torch.Tensor:
        return torch.cat(self._rows)


def _candidate_scales(x_max: np.ndarray, x_mean: np.ndarray, w: torch.Tensor, config: Config,
                      tie: tuple[int, int] | None) -> dict[str, np.ndarray | None]:
    """Equalizations to try, as s per consumer input channel (equal across tied heads)."""

    def tied(v: np.ndarray, reduce=np.max) -> np.ndarray:
        return v if tie is None else reduce(v.reshape(tie[0], tie[1], -1), axis=1).reshape(-1)

    def untie(v: np.ndarray) -> np.ndarray:
        return v if tie is None else expand_heads(v, tie[0] * tie[1], tie[0])

    w_max = w.abs().amax(dim=1).cpu().numpy()
    out: dict[str, np.ndarray | None] = {"none": None, "lae": untie(lae_scales(tied(x_max)))}
    for alpha in config.alpha_values():
        out[f"sq{alpha:.2f}"] = untie(smooth_scales(tied(x_max), tied(w_max), alpha))
        if config.awq:  # AWQ's s = mean|x|^α normalised by sqrt(max·min), on the same α grid
            a = np.maximum(tied(x_mean, np.mean).astype(np.float64), 1e-4) ** alpha
            out[f"awq{alpha:.2f}"] = untie((a / np.sqrt(a.max() * a.min())).astype(np.float32))
    return out


def _measure(x: torch.Tensor, w: torch.Tensor, x_max: np.ndarray, candidates: dict[str, np.ndarray | None],
             config: Config, tie) -> dict[ActMode, Choice]:
    """The lowest-error candidate per activation mode on inputs x [T, K], weights w [K, N].

    Two stages keep it cheap: every equalization with the full-range static scale and
    per-token; then the clip grid only for the best static one.
    """
    y_ref = x @ w
    energy = max(float(y_ref.pow(2).sum()), 1e-30)

    def err(xq: torch.Tensor, wq: torch.Tensor) -> float:
        return float((xq @ wq - y_ref).pow(2).sum()) / energy

    prepared = {}
    scored: dict[ActMode, tuple[float, str]] = {}
    for label, s in candidates.items():
        s_t = None if s is None else torch.from_numpy(s.astype(np.float32)).to(x.device)
        xs = x if s_t is None else x / s_t
        wq = fake_quant(w if s_t is None else w * s_t[:, None], config.group_size, config.symmetric, 4)
        full = float(x_max.max() if s is None else (x_max / s).max())
        prepared[label] = (xs, wq, full)
        for mode, e in ((ActMode.STATIC, err(fake_quant_static(xs, static_scale(full)), wq)),
                        (ActMode.PER_TOKEN, err(fake_quant_per_token(xs), wq))):
            if mode not in scored or e < scored[mode][0]:
                scored[mode] = (e, label)

    best: dict[ActMode, Choice] = {}
    for mode, (e, label) in scored.items():
        xs, wq, full = prepared[label]
        covered = full
        if mode == ActMode.STATIC:
            for r in STATIC_CLIP_GRID[1:]:
                e_r = err(fake_quant_static(xs, static_scale(full * r)), wq)
                if e_r < e:
                    e, covered = e_r, full * r
        s = candidates[label]
        kv_side = None if (s is None or tie is None) else s.reshape(tie[0], tie[1], -1)[:, 0, :].reshape(-1)
        best[mode] = Choice(label, mode, e, err(xs, wq), covered, s, kv_side)
    return best


def _choose(groups: list[Group], max_dynamic: float) -> dict[int, ActMode]:
    """Lowest error per group; then static where dynamic exceeds the budget, cheapest losses first."""
    mode = {i: min(g.best.values(), key=lambda c: c.error).act_mode for i, g in enumerate(groups)}
    budget = int(max_dynamic * sum(len(g.names) for g in groups) + 1e-9)
    dynamic = [i for i, m in mode.items() if m == ActMode.PER_TOKEN]
    used = sum(len(groups[i].names) for i in dynamic)
    loss = {i: groups[i].best[ActMode.STATIC].error - groups[i].best[ActMode.PER_TOKEN].error for i in dynamic}
    for i in sorted(dynamic, key=loss.get):
        if used <= budget:
            break
        mode[i] = ActMode.STATIC
        used -= len(groups[i].names)
    return mode


def _readers(ctx: LayerContext) -> list[tuple[list[str], str, LinearPair | None, tuple[int, int] | None]]:
    """(linears, where s folds, the pair it folds across (None: a norm), GQA tie) per group reading one input."""
    p = ctx.prefix
    readers: list[tuple[list[str], str, LinearPair | None, tuple[int, int] | None]] = []
    for group in ctx.spec.groups:
        readers.append(([p + n for n in group.linears], p + group.norm, None, None))
    for pair in ctx.spec.pairs:
        readers.append(([p + pair.consumer], p + pair.producer, pair, _pair_tie(ctx, pair)))
    return readers


def observers(ctx: LayerContext, config: Config) -> dict:
    """`max_tokens` float input tokens per reader group (for the error measurements), plus the weight quantizer's."""
    keep = token_subsample(ctx.samples, ctx.seqlen, config.max_tokens, seed=3000 + ctx.index)
    out = {f"auto:{names[0]}": (names[0], _Sampler(keep)) for names in ctx.reader_groups()}
    return {**out, **weight_observers(ctx, config.weights, config.group_size, config.symmetric)}


def gptq(config: Config) -> GptqSettings | None:
    return gptq_settings(config.weights, config.group_size, config.symmetric)


def plan_layer(ctx: LayerContext, config: Config) -> QuantPlan:
    """Measure every reader group of the layer, choose, then the layer's int4 weights.

    The `max_dynamic` budget applies to each layer (so also to the model).
    """
    config.validate()
    groups: list[Group] = []
    for names, source, pair, tie in _readers(ctx):
        x = ctx.observed[f"auto:{names[0]}"].tokens()
        w = torch.cat([ctx.linears[n].weight.detach().float().T for n in names], dim=1)
        x_max = ctx.stats[names[0]].channel_max_np()
        x_mean = ctx.stats[names[0]].channel_mean_np()
        candidates = _candidate_scales(x_max, x_mean, w, config, tie)
        groups.append(Group(names, source, pair, float(x_max.max()), _measure(x, w, x_max, candidates, config, tie)))

    modes = _choose(groups, config.max_dynamic)
    plan = QuantPlan(method="auto", config=asdict(config), calibration=ctx.calibration)
    for i, group in enumerate(groups):
        choice = group.best[modes[i]]
        other = group.best[ActMode.PER_TOKEN if modes[i] == ActMode.STATIC else ActMode.STATIC]
        eq = None
        if choice.scale is not None:
            scale = choice.scale.astype(np.float32)
            eq = (Equalization(group.source, "norm", group.names, scale, choice.equalization) if group.pair is None
                  else pair_equalization(ctx, group.pair, scale, choice.equalization, choice.kv_side))
            plan.equalizations.append(eq)
        strategy = ("" if eq is None else choice.equalization + "+") + choice.act_mode.value
        forced = " (static: dynamic budget)" if modes[i] != min(group.best.values(), key=lambda c: c.error).act_mode else ""
        reason = (f"error {choice.error:.2e} ({choice.weight_error:.2e} with float activations); "
                  f"best {other.act_mode.value}: {other.equalization} {other.error:.2e}{forced}")
        for name in group.names:
            scale = static_scale(choice.covered) if choice.act_mode == ActMode.STATIC else None
            plan.linears[name] = LinearPlan(name, strategy, choice.act_mode, group.max_abs, choice.covered, scale,
                                            equalized_by=eq.source if eq else None, reason=reason)
    for name, qw in layer_weights(ctx, plan.equalizations, config.group_size, config.symmetric, config.weights).items():
        plan.linears[name].weight = qw
    return plan
