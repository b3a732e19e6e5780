"""Round-to-nearest: the simplest peer baseline. No equalization, no search.

Weights: int4 group-wise (default g128 symmetric) or int8 (default per output
channel). Activations: float (W4A16 / W8A16), naive per-tensor static int8 on
every linear (scale = calibrated max / 127), or per-token dynamic int8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fptq_onnx.algorithms.common import check_group_size, clipped_static_scale
from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.errors import FptqError
from fptq_onnx.plan import ActMode, LinearPlan, QuantPlan
from fptq_onnx.quant import QuantizedWeight, quantize_groups

SUMMARY = "round-to-nearest baseline: int4 g128 / int8 per-channel weights; float, static or per-token int8 activations"

ACT_MODES = {"none": ActMode.NONE, "static": ActMode.STATIC, "per_token": ActMode.PER_TOKEN}


def parse_optional_bool(value) -> bool | None:
    """`--opt per_channel=true` arrives as a string (the table's coercion knows no `bool | None`)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    if text in ("", "none", "auto"):
        return None
    raise FptqError(f"per_channel: expected true/false/auto, got '{value}'")


def weight_grouping(bits: int, group_size: int, per_channel: bool | None) -> bool:
    """Whether weights are per output channel: explicit, else int8 -> per channel, int4 -> groups."""
    if bits not in (4, 8):
        raise FptqError(f"bits must be 4 or 8, got {bits}")
    channel = (bits == 8) if per_channel is None else per_channel
    if not channel:
        check_group_size(group_size)
    return channel


def act_mode(act: str) -> ActMode:
    if act not in ACT_MODES:
        raise FptqError(f"act must be one of {', '.join(ACT_MODES)}, got '{act}'")
    return ACT_MODES[act]


def quantize_all(weights: dict[str, np.ndarray], bits: int, group_size: int, per_channel: bool,
                 symmetric: bool) -> dict[str, QuantizedWeight]:
    """RTN for every [K, N] weight; per channel = one group spanning K."""
    return {name: quantize_groups(w, w.shape[0] if per_channel else group_size, symmetric, bits)
            for name, w in weights.items()}


@dataclass(frozen=True)
class Config:
    bits: int = 4
    group_size: int = 128
    per_channel: bool | None = None  # None: per channel for int8, groups for int4
    symmetric: bool = True
    act: str = "none"  # none | static | per_token
    act_clip: str = "max"  # static only: 'max' or a percentile of token maxima ('p99.9')

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_channel", parse_optional_bool(self.per_channel))

    def validate(self) -> None:
        weight_grouping(self.bits, self.group_size, self.per_channel)
        act_mode(self.act)


def plan_layer(ctx: LayerContext, config: Config) -> QuantPlan:
    config.validate()
    mode = act_mode(config.act)
    per_channel = weight_grouping(config.bits, config.group_size, config.per_channel)
    plan = QuantPlan(method="rtn", config=asdict(config), calibration=ctx.calibration)
    for name, qw in quantize_all(ctx.weights(), config.bits, config.group_size, per_channel, config.symmetric).items():
        m = ctx.stats[name].max_abs
        if mode == ActMode.STATIC:
            covered, scale = clipped_static_scale(ctx.stats[name], config.act_clip)
            lp = LinearPlan(name, "static", mode, m, covered, scale, reason=f"naive per-tensor static ({config.act_clip})")
        elif mode == ActMode.PER_TOKEN:
            lp = LinearPlan(name, "per_token", mode, m, m, reason="per-token dynamic int8 on every linear")
        else:
            lp = LinearPlan(name, "float", mode, m, m, reason=f"weight-only W{config.bits}A16")
        lp.weight = qw
        plan.linears[name] = lp
    return plan
