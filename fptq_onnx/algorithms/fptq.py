"""FPTQ (arXiv 2308.15987): per-layer activation policy from calibrated max |X|, LAE, int4 RTN weights.

Policy on the pre-equalization max |X| of a linear's input:
  max < v0          -> per-tensor static int8
  v0 <= max < v1    -> Logarithmic Activation Equalization, then per-tensor static int8
  max >= v1         -> per-token dynamic int8
LAE needs somewhere to fold 1/s. Norm-fed linears (q/k/v, gate/up) fold it into
the norm; o_proj and down_proj have no norm in front, so by default they fall back
to per-token. `fold_pairs` is our extension: fold their s into the producing
linear's output rows (up_proj for down_proj; v_proj for o_proj when equal across
the query heads sharing a KV head; a fused producer's slice of rows, Phi-3's v of
qkv_proj and up of gate_up_proj, see LinearPair.rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fptq_onnx.algorithms.common import (
    check_group_size,
    clipped_static_scale,
    expand_heads,
    grouped_head_scale,
    pair_equalization,
    pair_rows,
)
from fptq_onnx.algorithms.gptq import GptqSettings
from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.algorithms.weight_quant import check_weight_quantizer, gptq_settings, layer_weights, weight_observers
from fptq_onnx.errors import FptqError
from fptq_onnx.plan import ActMode, Equalization, LinearPlan, QuantPlan
from fptq_onnx.quant import lae_scales


SUMMARY = "W4A8 (paper): per-layer static / LAE+static / per-token int8 activations, int4 RTN weights"


@dataclass(frozen=True)
class Config:
    v0: float = 15.0
    v1: float = 150.0
    group_size: int = 128
    symmetric: bool = True
    fold_pairs: bool = False
    act_clip: str = "max"
    weights: str = "rtn"  # the paper's RTN; mse / gptq are the weight quantizers of weight_quant.py

    def validate(self) -> None:
        check_group_size(self.group_size)
        check_weight_quantizer(self.weights)
        if not 0 < self.v0 < self.v1:
            raise FptqError(f"thresholds must satisfy 0 < v0 < v1, got v0={self.v0}, v1={self.v1}")


def observers(ctx: LayerContext, config: Config) -> dict:
    return weight_observers(ctx, config.weights, config.group_size, config.symmetric)


def gptq(config: Config) -> GptqSettings | None:
    return gptq_settings(config.weights, config.group_size, config.symmetric)


def plan_layer(ctx: LayerContext, config: Config) -> QuantPlan:
    config.validate()
    stats = ctx.stats
    heads, kv_heads = ctx.heads
    prefix = ctx.prefix
    plan = QuantPlan(method="fptq", config=asdict(config), calibration=ctx.calibration)

    def static(name: str, strategy: str, eq: Equalization | None, reason: str) -> LinearPlan:
        s = eq.scale if eq is not None else None
        covered, scale = clipped_static_scale(stats[name], config.act_clip, s)
        return LinearPlan(name, strategy, ActMode.STATIC, stats[name].max_abs, covered, scale,
                          equalized_by=eq.source if eq else None, reason=reason)

    def per_token(name: str, reason: str) -> LinearPlan:
        m = stats[name].max_abs
        return LinearPlan(name, "per_token", ActMode.PER_TOKEN, m, m, reason=reason)

    for group in ctx.spec.groups:
        names = [prefix + linear for linear in group.linears]
        m = stats[names[0]].max_abs  # consumers of one norm share one input
        if m < config.v0:
            for name in names:
                plan.linears[name] = static(name, "static", None, f"max {m:.1f} < v0={config.v0:g}")
        elif m < config.v1:
            eq = Equalization(prefix + group.norm, "norm", names, lae_scales(stats[names[0]].channel_max_np()), "lae")
            plan.equalizations.append(eq)
            for name in names:
                plan.linears[name] = static(name, "lae+static", eq, f"v0 <= max {m:.1f} < v1={config.v1:g}; s folded into {group.norm}")
        else:
            for name in names:
                plan.linears[name] = per_token(name, f"max {m:.1f} >= v1={config.v1:g}")
    for pair in ctx.spec.pairs:
        name = prefix + pair.consumer
        m = stats[name].max_abs
        if m < config.v0:
            plan.linears[name] = static(name, "static", None, f"max {m:.1f} < v0={config.v0:g}")
        elif m < config.v1 and config.fold_pairs:
            producer_side = lae_scales(grouped_head_scale(stats[name].channel_max_np(), pair, heads, kv_heads))
            consumer_side = expand_heads(producer_side, heads, kv_heads) if pair.per_head else producer_side
            eq = pair_equalization(ctx, pair, consumer_side, "lae", producer_side if pair.per_head else None)
            plan.equalizations.append(eq)
            rows = pair_rows(ctx, pair)
            plan.linears[name] = static(name, "lae+static", eq, f"v0 <= max {m:.1f} < v1; s folded into {pair.producer} "
                                        f"rows {rows.start}:{rows.stop}")
        elif m < config.v1:
            plan.linears[name] = per_token(name, f"v0 <= max {m:.1f} < v1 but no norm to fold LAE into (--fold-pairs folds into {pair.producer})")
        else:
            plan.linears[name] = per_token(name, f"max {m:.1f} >= v1={config.v1:g}")

    for name, qw in layer_weights(ctx, plan.equalizations, config.group_size, config.symmetric, config.weights).items():
        plan.linears[name].weight = qw
    return plan
