"""Int4 weight quantizers applied *after* an algorithm's equalizations (`weights=rtn|mse|gptq`).

Activation policies (FPTQ, auto) decide equalizations and activation modes; the
weight quantizer is an independent choice, because int4 weights cause most of the
loss of W4A8 on small models:

- rtn:  round-to-nearest per group (the FPTQ paper's choice);
- mse:  per (group, output channel) shrink factor of the range, chosen to minimise
        that group's contribution to the layer-output error ‖X_g ΔW_g‖² on the
        equalized calibration inputs (AWQ's clip search, without AWQ's scales);
- gptq: second-order rounding (GPTQ) on the equalized model, layer by layer.

The mse and gptq quantizers walk the decoder layers once (sequential.py) to see
each linear's inputs; rtn needs no data.
"""

from __future__ import annotations

import numpy as np
import torch

from fptq_onnx.algorithms.common import apply_equalizations, float_weights, quantize_weights
from fptq_onnx.calibration import Calibration
from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import ArchSpec
from fptq_onnx.plan import Equalization
from fptq_onnx.quant import QuantizedWeight, quantize_groups

WEIGHT_QUANTIZERS = ("rtn", "mse", "gptq")
CLIP_GRID = 20
MSE_MAX_TOKENS = 4096


def check_weight_quantizer(name: str) -> None:
    if name not in WEIGHT_QUANTIZERS:
        raise FptqError(f"unknown weight quantizer '{name}'; use one of: {', '.join(WEIGHT_QUANTIZERS)}")


def quantize_equalized(
    model: torch.nn.Module,
    spec: ArchSpec,
    calib: Calibration,
    equalizations: list[Equalization],
    group_size: int,
    symmetric: bool,
    quantizer: str = "rtn",
) -> dict[str, QuantizedWeight]:
    """Int4 weights of every decoder linear, for a plan that applies `equalizations`."""
    check_weight_quantizer(quantizer)
    if quantizer == "gptq":
        from fptq_onnx.algorithms.gptq import gptq_weights

        return gptq_weights(model, spec, calib, equalizations, group_size, symmetric)
    weights = apply_equalizations(float_weights(model, spec), equalizations)
    if quantizer == "rtn":
        return quantize_weights(weights, group_size, symmetric)
    return _mse_clipped(model, spec, calib, weights, equalizations, group_size, symmetric)


def reader_groups(spec: ArchSpec) -> list[tuple[str, ...]]:
    """The linears of one layer grouped by the input they read (norm groups, then pair consumers)."""
    return [tuple(g.linears) for g in spec.groups] + [(p.consumer,) for p in spec.pairs]


def input_scale_of(equalizations: list[Equalization]) -> dict[str, np.ndarray]:
    """Per consumer linear: the s its input is divided by."""
    return {name: eq.scale for eq in equalizations for name in eq.linears}


def equalized_gram(gram: torch.Tensor, scale: np.ndarray | None) -> torch.Tensor:
    """XᵀX of X / s from XᵀX of X."""
    if scale is None:
        return gram
    inv = torch.from_numpy(1.0 / scale.astype(np.float64))
    return gram * inv[:, None] * inv[None, :]


def _mse_clipped(model, spec, calib, weights, equalizations, group_size, symmetric) -> dict[str, QuantizedWeight]:
    from fptq_onnx.algorithms.awq import Config as AwqConfig
    from fptq_onnx.algorithms.awq import InputStats, search_clip, token_subsample
    from fptq_onnx.algorithms.sequential import sequential_layers

    search = AwqConfig(group_size=group_size, symmetric=symmetric, grid=CLIP_GRID)
    scales = input_scale_of(equalizations)
    samples, seqlen = calib.tokens.shape
    batch_size = 4
    out: dict[str, QuantizedWeight] = {}
    for step in sequential_layers(model, spec, calib.tokens, desc="mse clip", batch_size=batch_size):
        keep = token_subsample(samples, seqlen, MSE_MAX_TOKENS, seed=2000 + step.index)
        stats: dict[str, InputStats] = {}
        handles = []
        for names in reader_groups(spec):  # linears reading one input share one Gram matrix
            module = step.linears[step.prefix + names[0]]
            st = InputStats(module.in_features, keep, batch_size)
            stats.update({step.prefix + name: st for name in names})
            handles.append(module.register_forward_pre_hook(lambda _m, a, st=st: st.add(a[0])))
        try:
            step.forward(keep=True)  # float layer: its outputs are the next inputs
        finally:
            for handle in handles:
                handle.remove()
        step.reuse_outputs = True
        for name in step.linears:
            gram = equalized_gram(stats[name].gram, scales.get(name))
            clip, _, _ = search_clip(torch.from_numpy(weights[name]).double(), gram, search)
            out[name] = quantize_groups(weights[name], group_size, symmetric, 4, clip=clip)
    return out
