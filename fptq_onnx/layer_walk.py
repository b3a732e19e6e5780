"""The one conversion pipeline: calibration activations walk the decoder layers one at a time.

    hidden, kwargs = source.capture(tokens)          # states entering layer 0 (embedding only)
    for each layer i (source.layer(i): fp32 weights, in memory or read from safetensors):
        float forward of layer i on the float stream, with hooks: every linear's input
            statistics (+ NaN check) and each method's observers; outputs -> layer i+1
        per method run:
            plan = method.plan_layer(ctx)            # decisions, equalizations, int4 weights
            GPTQ (method.gptq(config)): equalized copy of layer i on the run's quantized
                stream -> Hessians -> weights; the quantized layer's outputs -> layer i+1
            sinks: graph fill + passes + external data, parity reference, ...
        source.release(i)

Several method runs share one walk (compare): the float forward and its statistics are
computed once per layer. Only one layer's weights and two streams of hidden states
per run (float, and quantized for GPTQ) are alive at a time, whichever the source.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

import torch
from tqdm import tqdm

from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.calibration import Calibration, CalibrationConfig, LinearStats
from fptq_onnx.errors import FptqError
from fptq_onnx.layer_source import LayerSource, layer_output
from fptq_onnx.plan import QuantPlan
from fptq_onnx.report import peak_rss_mb

BATCH_SIZE = 4  # calibration windows per layer forward


class LayerSink(Protocol):
    """Consumes each layer's plan while the layer's float weights are still loaded."""

    def layer(self, index: int, prefix: str, layer: torch.nn.Module, plan: QuantPlan, kwargs: dict) -> None: ...


@dataclass
class MethodRun:
    """One method's share of the walk: algorithm module, config, sinks, and the plan built so far."""

    module: ModuleType
    config: object
    sinks: list[LayerSink] = field(default_factory=list)
    keep_weights: bool = True  # False: the plan keeps each weight's shape only (the sinks wrote the values)
    plan: QuantPlan | None = None
    quantized: torch.Tensor | None = None  # GPTQ's stream: inputs of the next layer from quantized layers
    error: str | None = None  # a user error of this run: it stops, the walk goes on for the others

    def observers(self, ctx: LayerContext) -> dict:
        hook = getattr(self.module, "observers", None)
        return hook(ctx, self.config) if hook else {}

    def gptq(self):
        hook = getattr(self.module, "gptq", None)
        return hook(self.config) if hook else None

    def add(self, layer_plan: QuantPlan) -> None:
        if not self.keep_weights:
            for lp in layer_plan.linears.values():
                if lp.weight is not None:
                    lp.weight = lp.weight.slim()
        if self.plan is None:
            self.plan = QuantPlan(layer_plan.method, layer_plan.config, layer_plan.calibration)
        self.plan.linears.update(layer_plan.linears)
        self.plan.equalizations.extend(layer_plan.equalizations)


class LayerStats:
    """Every linear's input statistics (calibration.LinearStats) over the float forward of one layer."""

    def __init__(self, linears: dict[str, torch.nn.Linear], device: torch.device) -> None:
        self.stats: dict[str, LinearStats] = {}
        self.batch_start = 0
        self.handles = []
        for name, module in linears.items():
            k = module.in_features
            self.stats[name] = LinearStats(torch.zeros(k, device=device), torch.zeros(k, dtype=torch.float64,
                                                                                      device=device))
            self.handles.append(module.register_forward_pre_hook(self._hook(name, k)))

    def _hook(self, name: str, k: int):
        def hook(_module, args):
            x = args[0].detach()
            samples = x.shape[0]
            x = x.reshape(-1, k).float()
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0]) * samples // x.shape[0]
                raise FptqError(
                    f"NaN/inf in calibration activations at the input of {name} (sample {self.batch_start + bad}); "
                    "the model or its weights are broken for this input"
                )
            absx = x.abs()
            entry = self.stats[name]
            torch.maximum(entry.channel_max, absx.amax(dim=0), out=entry.channel_max)
            entry.channel_abs_sum += absx.sum(dim=0, dtype=torch.float64)
            entry.token_max.append(absx.amax(dim=1))
            entry.tokens += x.shape[0]

        return hook

    def finish(self) -> dict[str, LinearStats]:
        """The statistics on the CPU (plans and manifests read them as numpy)."""
        return {name: LinearStats(st.channel_max.cpu(), st.channel_abs_sum.cpu(), [torch.cat(st.token_max).cpu()],
                                  st.tokens) for name, st in self.stats.items()}


def forward_all(layer: torch.nn.Module, inputs: torch.Tensor, kwargs: dict, keep: bool = True,
                stats: LayerStats | None = None) -> torch.Tensor | None:
    """Run a decoder layer on every calibration window, BATCH_SIZE at a time."""
    outs = []
    with torch.no_grad():
        for first in range(0, inputs.shape[0], BATCH_SIZE):
            if stats is not None:
                stats.batch_start = first
            out = layer_output(layer(inputs[first:first + BATCH_SIZE], **kwargs))
            if keep:
                outs.append(out.detach().float())
    return torch.cat(outs, dim=0) if keep else None


def to_device(value, device: torch.device, dtype: torch.dtype | None = None):
    """Tensors inside layer kwargs (tuples of cos/sin) moved (and floats cast) as a whole."""
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(to_device(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    return value


def walk(source: LayerSource, runs: list[MethodRun], tokens: torch.Tensor, calibration: CalibrationConfig,
         device: torch.device | str = "cpu", progress: bool = True) -> torch.Tensor:
    """Walk every decoder layer once for all `runs` (see the module doc); plans land in `run.plan`.

    Returns the float stream after the last layer (the final norm's input).
    """
    device = torch.device(device)
    hidden, layer_kwargs = source.capture(tokens)
    hidden = hidden.to(device)
    described = Calibration(tokens, {}, calibration).describe()
    for run in runs:
        if run.gptq() is not None:
            run.quantized = hidden
    samples, seqlen = tokens.shape
    bar = tqdm(range(source.num_layers), desc="layers", unit="layer", disable=not progress)
    for index in bar:
        prefix = source.prefix(index)
        layer = source.layer(index).to(device)
        kwargs = to_device(layer_kwargs[index], device)
        linears = {prefix + n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        contexts = [LayerContext(index, prefix, source.spec, source.config, linears, described, samples, seqlen,
                                 BATCH_SIZE) for _ in runs]
        recorder = LayerStats(linears, device)
        observed = [run.observers(ctx) for run, ctx in zip(runs, contexts)]
        handles = [linears[name].register_forward_pre_hook(lambda _m, a, ob=ob: ob.add(a[0]))
                   for per_run in observed for name, ob in per_run.values()]
        try:
            outputs = forward_all(layer, hidden, kwargs, stats=recorder)
        finally:
            for handle in handles + recorder.handles:
                handle.remove()
        stats = recorder.finish()
        hidden = outputs
        for run, ctx, per_run in zip(runs, contexts, observed):
            if run.error is not None:
                continue
            ctx.stats = stats
            ctx.observed = {key: ob for key, (_name, ob) in per_run.items()}
            try:
                run.add(_layer(run, ctx, layer, kwargs))
            except FptqError as exc:
                if len(runs) == 1:
                    raise
                run.error = str(exc)
        del contexts, observed, stats
        source.release(index)
        bar.set_postfix_str(f"peak RSS {peak_rss_mb() / 1024:.1f} GB")
    bar.close()
    return hidden


def _layer(run: MethodRun, ctx: LayerContext, layer: torch.nn.Module, kwargs: dict) -> QuantPlan:
    """One run's work on one layer: plan, GPTQ if asked (advancing its quantized stream), sinks."""
    layer_plan = run.module.plan_layer(ctx, run.config)
    ctx.observed = {}
    settings = run.gptq()
    if settings is not None:
        from fptq_onnx.algorithms.gptq import gptq_layer

        weights, run.quantized = gptq_layer(
            copy.deepcopy(layer), ctx.prefix, ctx.reader_groups(), layer_plan.equalizations,
            lambda work, keep, x=run.quantized: forward_all(work, x, kwargs, keep), settings, ctx.spec.norm_offset)
        for name, qw in weights.items():
            layer_plan.linears[name].weight = qw
    if layer_plan.linears and set(layer_plan.linears) != set(ctx.linears):
        raise FptqError(f"{run.module.__name__} planned {len(layer_plan.linears)} of the "
                        f"{len(ctx.linears)} linears of layer {ctx.index}")
    for sink in run.sinks:
        sink.layer(ctx.index, ctx.prefix, layer, layer_plan, kwargs)
    return layer_plan


def plan_model(model: torch.nn.Module, spec, calib: Calibration | torch.Tensor, module: ModuleType, config,
               device: torch.device | str = "cpu") -> QuantPlan:
    """A whole in-memory model's plan (with weights) by the walk, with no other sink (tests, tools)."""
    tokens = calib.tokens if isinstance(calib, Calibration) else calib
    calibration = calib.config if isinstance(calib, Calibration) else CalibrationConfig(
        source="random", samples=tokens.shape[0], seqlen=tokens.shape[1])
    from fptq_onnx.layer_source import ModelLayers

    run = MethodRun(module, config)
    walk(ModelLayers(model, spec), [run], tokens, calibration, device, progress=False)
    return run.plan
