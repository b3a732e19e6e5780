"""Apply a QuantPlan to a torch copy of the model (fake quantization).

This is the reference the quantized ONNX model is checked against: the same
folds, the same int4 weights (taken from the plan, not recomputed), and
activation rounding written exactly like the ONNX Q/DQ and per-token subgraph.
"""

from __future__ import annotations

import copy

import torch

from fptq_onnx.models.registry import fold_norm_scale
from fptq_onnx.passes.quantize_activations import PER_TOKEN_EPS
from fptq_onnx.plan import ActMode, QuantPlan
from fptq_onnx.quant import INT8_MAX


def fake_quant_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    s = torch.clamp(x.abs().amax(dim=-1, keepdim=True), min=PER_TOKEN_EPS) / INT8_MAX
    return torch.clamp(torch.round(x / s), -INT8_MAX, INT8_MAX) * s


def apply_plan(model: torch.nn.Module, plan: QuantPlan, activations: bool = True, prefix: str = "",
               norm_offset: float = 0.0) -> torch.nn.Module:
    """A fake-quantized deep copy; `activations=False` gives the weight-only (W4A16) model.

    `model` is the whole model, or one decoder layer whose modules are named `prefix + name`
    in the plan (the layer walk's parity reference). `norm_offset`: ArchSpec.norm_offset
    (Gemma's norms multiply by 1 + w).
    """
    model = copy.deepcopy(model)
    modules = {prefix + name: module for name, module in model.named_modules()}
    with torch.no_grad():
        for eq in plan.equalizations:
            source = modules[eq.source]
            side = torch.from_numpy(eq.source_side()).to(source.weight.device, source.weight.dtype)
            if eq.kind == "norm":
                source.weight.copy_(fold_norm_scale(source.weight, side, norm_offset))
            else:
                source.weight.div_(side[:, None])
                if source.bias is not None:
                    source.bias.div_(side)
        for name, lp in plan.linears.items():
            if lp.weight is not None:
                # A new parameter rather than copy_: a tied lm_head must not rewrite the embedding.
                weight = modules[name].weight
                modules[name].weight = torch.nn.Parameter(
                    torch.from_numpy(lp.weight.dequantize().T.copy()).to(weight.device, weight.dtype))
        if plan.embedding is not None:
            modules[plan.embedding.name].weight = torch.nn.Parameter(
                torch.from_numpy(plan.embedding.weight.dequantize().T.copy()))
    if activations:
        for name, lp in plan.linears.items():
            if lp.act_mode == ActMode.STATIC:
                scale = lp.act_scale
                modules[name].register_forward_pre_hook(lambda _m, a, s=scale: (fake_quant_static(a[0], s),))
            elif lp.act_mode == ActMode.PER_TOKEN:
                modules[name].register_forward_pre_hook(lambda _m, a: (fake_quant_per_token(a[0]),))
    return model
