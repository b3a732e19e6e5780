"""Layer-streaming convert: 7B-class models in the memory of one decoder layer.

The whole-model path (`convert.convert_command`) loads the float model (28 GB for
a 7B model in fp32), calibrates it, exports it and applies the passes to the whole
graph. This path never holds more than one decoder layer's float weights:

1. Skeleton. The model is built with parameters on the meta device (no memory);
   buffers (rotary inv_freq) are computed for real. Embeddings, final norm and
   lm_head are read from the checkpoint (`lazy_weights.LazyCheckpoint`: each
   tensor memory-mapped from its safetensors shard only while it is copied).
2. Graph. `stream_export.export_structure` exports the canonical float graph of a
   meta-device copy, decoder-linear weights as placeholders: one graph per output
   format (clones sharing the embedding tensors).
3. Layer inputs. Every decoder layer is swapped for a pass-through stub and the
   calibration windows (and the parity prompt) run through the model once: the
   stubs record the hidden states entering layer 0 and the keyword arguments each
   layer receives (rotary cos/sin, attention mask), computed by the HF model code
   itself (`sequential.capture_layer_inputs`).
4. Per layer i, in order (tqdm bar with ETA and RSS):
   - load layer i's weights from the checkpoint (fp32);
   - run the calibration windows through it with the same hooks as
     `calibration.collect_stats` (per-channel max/mean |x|, token maxima, NaN check);
     its outputs become layer i+1's inputs (the float model, as in the whole-model
     path, whose calibration also sees only float activations);
   - plan it: the method's own `build_plan` on a one-layer view of the model
     (`model.layers.0` = layer i), renamed to layer i. FPTQ's decisions, LAE scales
     and RTN weights are per layer, so the merged plan equals the whole-model plan;
   - run the parity prompt through the fake-quant layer (`fakequant.apply_plan` of
     the layer's plan) in fp32 and fp64 (and weight-only for `native`): the torch
     reference of the parity check, streamed like the calibration;
   - per format, run the format's graph passes restricted to layer i's linears on
     that format's graph, then move the layer's new initializers (int4 weights,
     scales, packed W4A8 weights) into the format's external-data file;
   - free the layer. The plan keeps each linear's decision and weight *shape* only
     (the quantized values are on disk).
5. Stamp decisions, save each graph proto (weights are already in `OUT.onnx.data`),
   check parity in ONNX Runtime on the staged files against the streamed reference,
   write manifests and range plots, move everything into place. Any error before the
   move leaves no output (one staging directory for the whole bundle).

Memory bound (what the design guarantees, see bench/scale.md for measurements):
    O(largest decoder layer in fp32 x ~5: weights, planning copies, fake-quant copies)
  + O(embedding + lm_head in fp32)
  + O(calibration activations: 2 x samples x seqlen x hidden + one batch's MLP activations)
  and, during the parity check, the ONNX Runtime session of the quantized model.
It does not grow with the number of layers.

Limits: methods whose plan needs only per-layer statistics and the layer's float
weights stream (fptq with RTN weights, rtn, smoothquant, ort-acc4); methods that run
their own layer walk on the whole model (gptq, awq, auto, and the mse/gptq weight
quantizers) do not yet. Safetensors checkpoints only (no GGUF, no pickle). The quick
perplexity after convert is skipped (it needs the float model).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from tqdm import tqdm

from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import ArchSpec, layer_prefix
from fptq_onnx.plan import Equalization, LinearPlan, QuantPlan
from fptq_onnx.quant import QuantizedWeight
from fptq_onnx.report import peak_rss_mb, say, step

# Methods whose build_plan needs only the statistics and float weights of the layer it plans.
STREAMABLE_METHODS = ("fptq", "rtn", "smoothquant", "ort-acc4")
GIB = 1024**3


# --------------------------------------------------------------------------- options and memory


def parse_memory(text: str | None) -> int | None:
    """'20GB', '20G', '20000MB', '20' (GB) -> bytes; None stays None."""
    if text is None or str(text).strip() == "":
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?)?\s*", str(text))
    if not match:
        raise FptqError(f"--max-memory: expected a size like 20GB or 16000MB, got '{text}'")
    number = float(match.group(1))
    unit = (match.group(2) or "G")[0].upper()
    value = int(number * {"K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}[unit])
    if value <= 0:
        raise FptqError(f"--max-memory must be positive, got '{text}'")
    return value


def default_budget() -> int | None:
    """90% of physical memory (MemTotal, Linux), in bytes: the default of --max-memory.

    Physical, not currently available, memory so that whether a model streams does not
    depend on what else happens to run on the machine.
    """
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(int(line.split()[1]) * 1024 * 0.9)
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    whole_model: int  # the in-memory convert: float model + export + passes
    streaming: int  # this path, before the ONNX Runtime check
    largest_layer: int  # fp32 bytes of the largest decoder layer

    def describe(self) -> str:
        return (f"whole-model path ~{self.whole_model / GIB:.1f} GB, streaming ~{self.streaming / GIB:.1f} GB "
                f"(largest layer {self.largest_layer / GIB:.2f} GB in fp32)")


def estimate_memory(ckpt, config, spec: ArchSpec, samples: int, seqlen: int, formats: int) -> MemoryEstimate:
    """Rough peak RSS of both paths from the checkpoint's tensor shapes (see the module doc)."""
    total = ckpt.numel() * 4
    per_layer = ckpt.layer_numel(spec.layers_path)
    largest = max(per_layer.values(), default=0) * 4
    outside = total - sum(per_layer.values()) * 4
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    activations = samples * seqlen * hidden * 4 * 3 + min(samples, 4) * seqlen * inter * 4 * 3
    base = 1 * GIB  # interpreter, torch, onnx, tokenizer
    streaming = base + 5 * largest + outside * (1 + formats) + activations
    whole = base + 3 * total + activations
    return MemoryEstimate(whole, streaming, largest)


# --------------------------------------------------------------------------- skeleton and weights


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer while inputs are captured: returns its input."""

    def __init__(self, like: torch.nn.Module) -> None:
        super().__init__()
        for attr in ("attention_type", "layer_type"):
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _decoder_module(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    module = model
    for part in spec.layers_path.split("."):
        module = getattr(module, part)
    return module


@dataclass
class StreamModel:
    """The pieces of the model the streaming convert holds: everything but the decoder layers."""

    source: object
    spec: ArchSpec
    config: object
    tokenizer: object
    ckpt: object
    skeleton: torch.nn.Module  # parameters on meta except embeddings / final norm / lm_head
    layers: list[torch.nn.Module] = field(default_factory=list)  # the meta decoder layers

    @property
    def model(self) -> torch.nn.Module:  # for pipeline.write_sidecars
        return self.skeleton

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint key of a parameter (lm_head is the embedding when tied)."""
        if name not in self.ckpt and name.endswith("lm_head.weight") and getattr(self.config, "tie_word_embeddings", False):
            embed = [n for n in self.ckpt.names() if n.endswith("embed_tokens.weight")]
            if embed:
                return embed[0]
        return name

    def value(self, name: str) -> np.ndarray:
        """A non-decoder-linear parameter or buffer as a float32 array (for the graph)."""
        buffers = dict(self.skeleton.named_buffers())
        if name in buffers and buffers[name].device.type != "meta":
            return buffers[name].detach().float().numpy()
        return self.ckpt.get(self.checkpoint_name(name)).numpy()

    def load_layer(self, index: int) -> torch.nn.Module:
        """Decoder layer `index` with its fp32 weights (the meta layer gets real tensors)."""
        layer = self.layers[index]
        prefix = layer_prefix(self.spec, index)
        state = {name: self.ckpt.get(self.checkpoint_name(prefix + name)) for name, _ in layer.named_parameters()}
        layer.load_state_dict(state, strict=True, assign=True)
        if any(t.device.type == "meta" for t in list(layer.parameters()) + list(layer.buffers())):
            raise FptqError(f"decoder layer {index} has state outside the checkpoint; not supported by --stream")
        return layer.eval()

    def release_layer(self, index: int) -> None:
        self.layers[index].to("meta")


def open_stream_model(source, config, spec: ArchSpec, tokenizer) -> StreamModel:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    from fptq_onnx.lazy_weights import LazyCheckpoint

    ckpt = LazyCheckpoint(source.path)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    skeleton.eval()
    try:
        skeleton.generation_config = GenerationConfig.from_pretrained(source.path)
    except (OSError, ValueError):
        pass
    model = StreamModel(source, spec, config, tokenizer, ckpt, skeleton)
    prefix = spec.layers_path + "."
    outside = {n: p for n, p in skeleton.named_parameters(remove_duplicate=False) if not n.startswith(prefix)}
    tied = {}
    for name, param in outside.items():
        key = model.checkpoint_name(name)
        if key in tied:  # tied parameters stay one tensor
            tensor = tied[key]
        else:
            tensor = tied[key] = model.ckpt.get(key)
        if tuple(tensor.shape) != tuple(param.shape):
            raise FptqError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the config expects "
                            f"{tuple(param.shape)}")
        module_name, _, attr = name.rpartition(".")
        setattr(skeleton.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))
    model.layers = list(_decoder_module(skeleton, spec))
    return model


def capture_inputs(model: StreamModel, tokens: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering layer 0 and each layer's kwargs, with the layers stubbed out."""
    from fptq_onnx.algorithms.sequential import capture_layer_inputs

    layers = _decoder_module(model.skeleton, model.spec)
    stubs = [_PassThrough(layer) for layer in model.layers]
    for i, stub in enumerate(stubs):
        layers[i] = stub
    try:
        return capture_layer_inputs(model.skeleton, model.spec, tokens)
    finally:
        for i, layer in enumerate(model.layers):
            layers[i] = layer


def head_logits(model: StreamModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head on the last decoder layer's output (in hidden's dtype)."""
    decoder = model.skeleton.get_decoder()
    norm = copy.deepcopy(decoder.norm).to(hidden.dtype)
    weight = model.skeleton.get_output_embeddings().weight
    with torch.no_grad():
        return torch.nn.functional.linear(norm(hidden), weight.to(hidden.dtype))


# --------------------------------------------------------------------------- per-layer planning


class _LayerView(torch.nn.Module):
    """A one-layer model (`<layers_path>.0` = the given layer) that algorithms can plan."""

    def __init__(self, config, spec: ArchSpec, layer: torch.nn.Module) -> None:
        super().__init__()
        self.config = copy.copy(config)
        self.config.num_hidden_layers = 1
        parts = spec.layers_path.split(".")
        parent = self
        for part in parts[:-1]:
            child = torch.nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], torch.nn.ModuleList([layer]))


def _rename(name: str | None, old: str, new: str) -> str | None:
    return new + name[len(old):] if name is not None and name.startswith(old) else name


def rename_plan(plan: QuantPlan, old: str, new: str) -> QuantPlan:
    """The plan with module names under prefix `old` moved under `new` (layer 0 -> layer i)."""
    out = QuantPlan(plan.method, plan.config, plan.calibration)
    for name, lp in plan.linears.items():
        out.linears[_rename(name, old, new)] = dataclasses.replace(
            lp, name=_rename(lp.name, old, new), equalized_by=_rename(lp.equalized_by, old, new))
    for eq in plan.equalizations:
        out.equalizations.append(dataclasses.replace(
            eq, source=_rename(eq.source, old, new), linears=[_rename(n, old, new) for n in eq.linears]))
    return out


def slim_weight(qw: QuantizedWeight) -> QuantizedWeight:
    """Same shapes and settings, no data (zero-stride views): the values are on disk already."""
    return QuantizedWeight(
        q=np.broadcast_to(np.zeros((), qw.q.dtype), qw.q.shape),
        scales=np.broadcast_to(np.zeros((), qw.scales.dtype), qw.scales.shape),
        zero_points=None if qw.zero_points is None else np.broadcast_to(np.zeros((), qw.zero_points.dtype),
                                                                          qw.zero_points.shape),
        group_size=qw.group_size, bits=qw.bits,
    )


class LayerStats:
    """`calibration.collect_stats`'s hooks, for one layer run on batches of windows."""

    def __init__(self, linears: dict[str, torch.nn.Linear], batch_size: int) -> None:
        from fptq_onnx.calibration import LinearStats

        self.stats: dict[str, LinearStats] = {}
        self.batch_start = 0
        self.batch_size = batch_size
        self.handles = []
        for name, module in linears.items():
            self.stats[name] = LinearStats(torch.zeros(module.in_features),
                                           torch.zeros(module.in_features, dtype=torch.float64))
            self.handles.append(module.register_forward_pre_hook(self._hook(name, module.in_features)))

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

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _cast_kwargs(kwargs: dict, dtype: torch.dtype) -> dict:
    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    return {k: cast(v) for k, v in kwargs.items()}


# --------------------------------------------------------------------------- the graphs


def _layer_passes(fmt: str, plan: QuantPlan) -> list:
    """The format's passes (formats.FORMATS) for a plan subset, without the stamping."""
    from fptq_onnx.formats import FORMATS
    from fptq_onnx.passes.stamp_decisions import StampDecisionsPass

    return [p for p in FORMATS[fmt](plan) if not isinstance(p, StampDecisionsPass)]


def fill_layer(graph: ir.Graph, plan: QuantPlan, float_weights: dict[str, np.ndarray]) -> None:
    """Give layer's linear weight initializers values: zeros for planned ones, real floats otherwise."""
    from fptq_onnx.stream_export import zero_weight

    for name, lp in plan.linears.items():
        value = graph.initializers.get(f"{name}.weight")
        if value is None:
            raise FptqError(f"the streamed graph has no initializer {name}.weight")
        shape = tuple(int(d) for d in value.shape)
        if lp.weight is not None:
            value.const_value = zero_weight(shape)
        else:
            value.const_value = ir.tensor(float_weights[name], name=f"{name}.weight")


# --------------------------------------------------------------------------- parity


def parity_from_logits(ref32: np.ndarray, ref64: np.ndarray | None, path: Path, ids: np.ndarray,
                       tolerance: float | None, metric: str):
    """`verify.check_parity` against logits streamed from torch (full sequence = prefill + decode)."""
    from fptq_onnx.verify import Parity, onnx_prefill_decode

    got_prefill, got_decode = onnx_prefill_decode(path, ids)
    got = np.concatenate([got_prefill, got_decode], axis=1)
    ref = ref32 if metric == "max" else ref64
    noise_floor = None if metric == "max" else float(np.abs(ref32 - ref64).mean())
    n = got_prefill.shape[1]
    parity = Parity(
        prefill_max_abs=float(np.abs(ref[:, :n] - got_prefill).max()),
        decode_max_abs=float(np.abs(ref[:, n:] - got_decode).max()),
        mean_abs=float(np.abs(ref - got).mean()),
        logits_scale=float(np.abs(ref).max()),
        top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).mean()),
        metric=metric,
        noise_floor=noise_floor,
    )
    if tolerance is not None and not parity.checked_value <= tolerance:
        what = "max |logits diff|" if metric == "max" else "mean |logits diff| / fp32 noise floor"
        raise FptqError(
            f"parity check failed: {what} {parity.checked_value:.3g} > tolerance {tolerance:g} "
            f"({parity.describe()}; --no-verify skips)"
        )
    return parity


# --------------------------------------------------------------------------- the convert


def check_method(method: str, config) -> None:
    if method not in STREAMABLE_METHODS:
        raise FptqError(f"--stream supports methods {', '.join(STREAMABLE_METHODS)}; '{method}' walks the whole "
                        "model itself (run it without --stream)")
    if getattr(config, "weights", "rtn") != "rtn":
        raise FptqError(f"--stream supports the rtn weight quantizer only, not '{config.weights}'")


def stream_convert(model_arg: str | None, out: Path, options, max_memory: int | None = None,
                   batch_size: int = 4) -> dict[str, dict]:
    """The streaming `convert` (see the module doc); returns the manifests by format."""
    from fptq_onnx import algorithms, loading, sources
    from fptq_onnx.calibration import Calibration, calibration_tokens, resolve_source
    from fptq_onnx.convert import FORMAT_ACTIVATIONS, output_paths, plan_parity_ids
    from fptq_onnx.fakequant import apply_plan
    from fptq_onnx.models.registry import spec_for
    from fptq_onnx.passes.stamp_decisions import StampDecisionsPass
    from fptq_onnx.pipeline import write_sidecars
    from fptq_onnx.plan import manifest_path, to_json
    from fptq_onnx.plot import plot_ranges
    from fptq_onnx.saving import check_output_path, data_file_name, staged_outputs
    from fptq_onnx.stream_export import ExternalDataWriter, check_complete, export_structure

    start = time.perf_counter()
    algorithm = algorithms.get(options.method)
    config = algorithms.make_config(algorithm, options.algorithm_options, options.extra_options)
    check_method(options.method, config)
    paths = output_paths(out, options.formats)
    for path in paths.values():
        check_output_path(path, options.force)

    with step("resolving model"):
        source = sources.resolve(model_arg, allow_pickle=False)
        if source.gguf_file:
            raise FptqError("--stream reads safetensors checkpoints; a GGUF model needs the whole-model path")
        hf_config = loading.load_config(source)
        spec = spec_for(hf_config.model_type)
        tokenizer = loading.load_tokenizer(source)
        calib_config = resolve_source(options.calibration)
        model = open_stream_model(source, hf_config, spec, tokenizer)
        layers = hf_config.num_hidden_layers
        estimate = estimate_memory(model.ckpt, hf_config, spec, calib_config.samples, calib_config.seqlen,
                                   len(options.formats))
        say(f"  {source.label} ({hf_config.model_type}, {layers} layers, {model.ckpt.numel() / 1e9:.2f} B params); "
            f"memory: {estimate.describe()}")
        if max_memory is not None and estimate.streaming > max_memory:
            raise FptqError(
                f"streaming needs about {estimate.streaming / GIB:.1f} GB with these settings, over --max-memory "
                f"{max_memory / GIB:.1f} GB; lower --calib-samples/--calib-seqlen or raise --max-memory"
            )

    tokens = calibration_tokens(calib_config, tokenizer, hf_config.vocab_size)
    parity_ids = plan_parity_ids(model) if options.verify else None
    with step(f"capturing layer inputs ({calib_config.source}, {tokens.shape[0]} x {tokens.shape[1]} tokens)"):
        hidden, layer_kwargs = capture_inputs(model, tokens)
        if parity_ids is not None:
            ref_hidden, ref_kwargs = capture_inputs(model, torch.from_numpy(parity_ids))
            ref = {"fq32": ref_hidden.float(), "fq64": ref_hidden.double()}
            if "native" in options.formats:
                ref["wo32"] = ref_hidden.float()

    with step("exporting the graph structure (meta device, no weights)"):
        linear_names = {layer_prefix(spec, i) + name for i in range(layers) for name in spec.linears()}
        structure = _meta_structure(hf_config, spec, model, linear_names, export_structure)
        graphs = {fmt: structure.clone() if i else structure for i, fmt in enumerate(options.formats)}

    calibration = Calibration(tokens, {}, calib_config).describe()
    plan = None
    view_prefix = layer_prefix(spec, 0)
    with staged_outputs(out.parent) as stage:
        staged = {fmt: stage(path.name) for fmt, path in paths.items()}
        writers = {fmt: ExternalDataWriter(stage(data_file_name(path))) for fmt, path in paths.items()}
        try:
            bar = tqdm(range(layers), desc="streaming layers", unit="layer", disable=not options.progress)
            for index in bar:
                prefix = layer_prefix(spec, index)
                layer = model.load_layer(index)
                view = _LayerView(hf_config, spec, layer)
                linears = {n: m for n, m in view.named_modules()
                           if isinstance(m, torch.nn.Linear) and n.startswith(view_prefix)}
                # Calibrate: float layer on every window; its outputs feed the next layer.
                recorder = LayerStats(linears, batch_size)
                outputs = []
                try:
                    with torch.no_grad():
                        for first in range(0, hidden.shape[0], batch_size):
                            recorder.batch_start = first
                            out_batch = layer(hidden[first:first + batch_size], **layer_kwargs[index])
                            outputs.append((out_batch[0] if isinstance(out_batch, (tuple, list)) else out_batch).float())
                finally:
                    recorder.remove()
                hidden = torch.cat(outputs, dim=0)
                del outputs
                # Plan this layer with the method's own code, on the one-layer view.
                layer_plan = algorithm.build_plan(view, spec, Calibration(tokens, recorder.stats, calib_config),
                                                  config)
                del recorder
                # Reference of the parity check: the parity prompt through the fake-quant layer.
                if parity_ids is not None:
                    _reference_step(view, spec, layer_plan, ref, ref_kwargs[index], apply_plan)
                named = rename_plan(layer_plan, view_prefix, prefix)
                float_weights = {
                    prefix + n[len(view_prefix):]: m.weight.detach().numpy().T.copy()
                    for n, m in linears.items() if layer_plan.linears[n].weight is None
                }
                for fmt, graph in graphs.items():
                    fill_layer(graph.graph, named, float_weights)
                    for graph_pass in _layer_passes(fmt, named):
                        graph_pass(graph)
                    writers[fmt].spill(graph.graph)
                del float_weights, layer_plan, view, linears
                model.release_layer(index)
                for lp in named.linears.values():
                    if lp.weight is not None:
                        lp.weight = slim_weight(lp.weight)
                if plan is None:
                    plan = QuantPlan(named.method, named.config, calibration)
                plan.linears.update(named.linears)
                plan.equalizations.extend(named.equalizations)
                bar.set_postfix_str(f"peak RSS {peak_rss_mb() / 1024:.1f} GB")
            bar.close()
            del hidden
            for fmt, graph in graphs.items():
                writers[fmt].spill(graph.graph)  # anything left outside the layers
        finally:
            for writer in writers.values():
                writer.close()
        say(f"  decisions: {plan.counts()}")

        with step("saving"):
            for fmt, graph in graphs.items():
                StampDecisionsPass(plan, fmt)(graph)
                ir.passes.common.TopologicalSortPass()(graph)
                check_complete(graph.graph)
                ir.save(graph, staged[fmt])
            write_sidecars(out.parent, model, stage)
        del graphs, structure

        logits = {}
        if parity_ids is not None:
            with step("reference logits (final norm + lm_head)"):
                logits = {key: head_logits(model, value).numpy() for key, value in ref.items()}
        results = {}
        for fmt, path in paths.items():
            parity = None
            if parity_ids is not None:
                explicit = fmt != "native"
                with step(f"checking parity of {path.name} (torch streamed vs ONNX Runtime, prefill + decode)"):
                    parity = parity_from_logits(
                        logits["fq32"] if explicit else logits["wo32"], logits["fq64"] if explicit else None,
                        staged[fmt], parity_ids, options.tolerance if explicit else None,
                        "noise" if explicit else "max")
                    say(f"  {parity.describe()}")
            manifest = plan.manifest(
                format=fmt, recipe=options.recipe, model=source.label, architecture=spec.name,
                runtime_activations=FORMAT_ACTIVATIONS[fmt], parity=None if parity is None else parity.__dict__,
            )
            manifest["streaming"] = {
                "layers": layers,
                "onnx_bytes": staged[fmt].stat().st_size + staged[fmt].with_name(data_file_name(path)).stat().st_size,
                "peak_rss_mb": round(peak_rss_mb()),
                "memory_estimate_gb": round(estimate.streaming / GIB, 2),
            }
            manifest_file = stage(manifest_path(path).name)
            manifest_file.write_text(to_json(manifest))
            plot_ranges(manifest, stage(path.stem + ".ranges.png"))
            results[fmt] = manifest
    for fmt, path in paths.items():
        say(f"  wrote {path} ({results[fmt]['streaming']['onnx_bytes'] / GIB:.2f} GB with {data_file_name(path)}), "
            f"{manifest_path(path).name}, {path.stem}.ranges.png")
    say("  quick perplexity skipped (--stream: there is no float model in memory to compare with)")
    say(f"converted in {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_mb():.0f} MB")
    return results


def _meta_structure(hf_config, spec: ArchSpec, model: StreamModel, linear_names: set[str], export_structure):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    return export_structure(meta, spec, model.value, linear_names)


def _reference_step(view, spec: ArchSpec, layer_plan: QuantPlan, ref: dict, kwargs: dict, apply_plan) -> None:
    """Advance the parity reference streams through this layer's fake-quant copies."""
    def run(module, x, kw):
        with torch.no_grad():
            out = _decoder_module(module, spec)[0](x, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    fake = apply_plan(view, spec, layer_plan, activations=True)
    ref["fq32"] = run(fake, ref["fq32"], kwargs)
    fake.double()
    ref["fq64"] = run(fake, ref["fq64"], _cast_kwargs(kwargs, torch.float64))
    del fake
    if "wo32" in ref:
        weight_only = apply_plan(view, spec, layer_plan, activations=False)
        ref["wo32"] = run(weight_only, ref["wo32"], kwargs)


def should_stream(model_arg: str | None, options, max_memory: int | None) -> bool:
    """Auto mode: stream when the whole-model path would not fit in --max-memory (default: 90% of RAM).

    Only safetensors checkpoints can stream; anything else (GGUF, the default model,
    pickle) and any problem reading the checkpoint leave the decision to the
    whole-model path, which reports its own errors.
    """
    from fptq_onnx import loading, sources
    from fptq_onnx.lazy_weights import LazyCheckpoint
    from fptq_onnx.models.registry import spec_for

    budget = max_memory or default_budget()
    if budget is None:
        return False
    try:
        source = sources.resolve(model_arg, allow_pickle=options.allow_pickle)
        if source.gguf_file:
            return False
        config = loading.load_config(source)
        ckpt = LazyCheckpoint(source.path)
        estimate = estimate_memory(ckpt, config, spec_for(config.model_type), options.calibration.samples,
                                   options.calibration.seqlen, len(options.formats))
    except FptqError:
        return False
    if estimate.whole_model > budget:
        say(f"  streaming layers: the whole model needs ~{estimate.whole_model / GIB:.1f} GB, "
            f"over the {budget / GIB:.1f} GB {'of --max-memory' if max_memory else 'budget (90% of RAM)'}")
        return True
    return False
