"""Whole-model planning for the algorithm tests, through the product's layer walk (no second walk here).

`calibrate` gives a Calibration (tokens + every linear's input statistics, recorded by the
walk), `build_plan(module, model, spec, calib, config)` a whole model's plan with weights,
`plan_with_stats` a plan from hand-made statistics (no forward at all).
"""

from __future__ import annotations

import numpy as np
import torch

from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.calibration import Calibration, CalibrationConfig, calibration_tokens, resolve_source
from fptq_onnx.layer_source import ModelLayers, decoder_layers
from fptq_onnx.layer_walk import MethodRun, plan_model, walk
from fptq_onnx.models.registry import layer_prefix
from fptq_onnx.plan import QuantPlan


def decoder_linears(model: torch.nn.Module, spec) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(spec.layers_path + ".")}


def float_weights(model: torch.nn.Module, spec) -> dict[str, np.ndarray]:
    """Every decoder linear's weight as [K, N] float32."""
    return {name: m.weight.detach().float().numpy().T.copy() for name, m in decoder_linears(model, spec).items()}


class _Recorder:
    """A 'method' that keeps the statistics the walk hands it and plans nothing."""

    def __init__(self) -> None:
        self.__name__ = "stats"
        self.stats: dict = {}

    def plan_layer(self, ctx: LayerContext, config) -> QuantPlan:
        self.stats.update(ctx.stats)
        return QuantPlan("stats", {}, ctx.calibration)


def collect_stats(model: torch.nn.Module, spec, tokens: torch.Tensor) -> dict:
    recorder = _Recorder()
    config = CalibrationConfig(source="random", samples=tokens.shape[0], seqlen=tokens.shape[1])
    walk(ModelLayers(model, spec), [MethodRun(recorder, None)], tokens, config, progress=False)
    return recorder.stats


def calibrate(model: torch.nn.Module, spec, tokenizer, config: CalibrationConfig, progress: bool = False) -> Calibration:
    config = resolve_source(config)
    tokens = calibration_tokens(config, tokenizer, model.config.vocab_size)
    return Calibration(tokens, collect_stats(model, spec, tokens), config)


def build_plan(module, model: torch.nn.Module, spec, calib: Calibration, config) -> QuantPlan:
    return plan_model(model, spec, calib, module, config)


def plan_with_stats(module, model: torch.nn.Module, spec, calib: Calibration, config) -> QuantPlan:
    """Each layer planned from `calib.stats` as given (for policies that read statistics only)."""
    plan = None
    samples, seqlen = calib.tokens.shape
    for index, layer in enumerate(decoder_layers(model, spec)):
        prefix = layer_prefix(spec, index)
        linears = {prefix + n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        ctx = LayerContext(index, prefix, spec, model.config, linears, calib.describe(), samples, seqlen, 4,
                           stats={n: calib.stats[n] for n in linears})
        layer_plan = module.plan_layer(ctx, config)
        if plan is None:
            plan = QuantPlan(layer_plan.method, layer_plan.config, layer_plan.calibration)
        plan.linears.update(layer_plan.linears)
        plan.equalizations.extend(layer_plan.equalizations)
    return plan
