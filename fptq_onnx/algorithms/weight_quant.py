"""Int4 weight quantizers applied *after* an algorithm's equalizations (`weights=rtn|mse|gptq`).

Activation policies (FPTQ, auto) decide equalizations and activation modes; the
weight quantizer is an independent choice, because int4 weights cause most of the
loss of W4A8 on small models:

- rtn:  round-to-nearest per group (the FPTQ paper's choice);
- mse:  per (group, output channel) shrink factor of the range, chosen to minimise
        that group's contribution to the layer-output error ‖X_g ΔW_g‖² on the
        equalized calibration inputs (AWQ's clip search, without AWQ's scales);
- gptq: second-order rounding (GPTQ) on the equalized model, layer by layer.

mse records each reader group's Gram matrix during the walk's float forward of the
layer; gptq is run by the walk itself (layer_walk.py), which keeps the quantized
stream GPTQ needs; rtn needs no data.
"""

from __future__ import annotations

import numpy as np
import torch

from fptq_onnx.algorithms.common import apply_equalizations, quantize_weights
from fptq_onnx.algorithms.gptq import GptqSettings
from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.errors import FptqError
from fptq_onnx.plan import Equalization
from fptq_onnx.quant import QuantizedWeight, quantize_groups

WEIGHT_QUANTIZERS = ("rtn", "mse", "gptq")
CLIP_GRID = 20
MSE_MAX_TOKENS = 4096


def check_weight_quantizer(name: str) -> None:
    if name not in WEIGHT_QUANTIZERS:
        raise FptqError(f"unknown weight quantizer '{name}'; use one of: {', '.join(WEIGHT_QUANTIZERS)}")


def weight_observers(ctx: LayerContext, quantizer: str, group_size: int, symmetric: bool) -> dict:
    """mse needs each reader group's Gram matrix on (a subsample of) the float inputs."""
    if quantizer != "mse":
        return {}
    from fptq_onnx.algorithms.awq import InputStats, token_subsample

    keep = token_subsample(ctx.samples, ctx.seqlen, MSE_MAX_TOKENS, seed=2000 + ctx.index)
    return {f"mse:{names[0]}": (names[0], InputStats(ctx.linears[names[0]].in_features, keep, ctx.batch_size))
            for names in ctx.reader_groups()}


def gptq_settings(quantizer: str, group_size: int, symmetric: bool) -> GptqSettings | None:
    """gptq: the walk quantizes the equalized layer from the quantized stream (GPTQ's defaults)."""
    return GptqSettings(group_size, symmetric) if quantizer == "gptq" else None


def layer_weights(
    ctx: LayerContext,
    equalizations: list[Equalization],
    group_size: int,
    symmetric: bool,
    quantizer: str = "rtn",
) -> dict[str, QuantizedWeight]:
    """Int4 weights of the layer's linears for a plan that applies `equalizations` ({} for gptq: the walk's)."""
    check_weight_quantizer(quantizer)
    if quantizer == "gptq":
        return {}
    weights = apply_equalizations(ctx.weights(), equalizations)
    if quantizer == "rtn":
        return quantize_weights(weights, group_size, symmetric)
    return _mse_clipped(ctx, weights, equalizations, group_size, symmetric)


def input_scale_of(equalizations: list[Equalization]) -> dict[str, np.ndarray]:
    """Per consumer linear: the s its input is divided by."""
    return {name: eq.scale for eq in equalizations for name in eq.linears}


def equalized_gram(gram: torch.Tensor, scale: np.ndarray | None) -> torch.Tensor:
    """XᵀX of X / s from XᵀX of X."""
    if scale is None:
        return gram
    inv = torch.from_numpy(1.0 / scale.astype(np.float64)).to(gram.device)
    return gram * inv[:, None] * inv[None, :]


def _mse_clipped(ctx: LayerContext, weights, equalizations, group_size, symmetric) -> dict[str, QuantizedWeight]:
    from fptq_onnx.algorithms.awq import Config as AwqConfig
    from fptq_onnx.algorithms.awq import search_clip

    search = AwqConfig(group_size=group_size, symmetric=symmetric, grid=CLIP_GRID)
    scales = input_scale_of(equalizations)
    grams = {name: ctx.observed[f"mse:{names[0]}"].gram for names in ctx.reader_groups() for name in names}
    out: dict[str, QuantizedWeight] = {}
    for name in ctx.linears:
        gram = equalized_gram(grams[name], scales.get(name))
        clip, _, _ = search_clip(torch.from_numpy(weights[name]).double(), gram, search)
        out[name] = quantize_groups(weights[name], group_size, symmetric, 4, clip=clip)
    return out
