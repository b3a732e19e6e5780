"""`convert`: model -> layer walk (calibrate, plan, quantize, fill the graphs) -> checked bundle.

One pipeline for every method (layer_walk.py); `--stream` only changes where the
decoder layers come from (layer_source.py): the model loaded whole, or one layer at a
time from the safetensors files. Each requested format is written as its own bundle
(model + external data, manifest, range plot, tokenizer/config), checked against the
streamed torch fake-quant reference of the same plan, and scored on a few perplexity
windows when the float model is in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fptq_onnx import algorithms
from fptq_onnx.calibration import CalibrationConfig, calibration_tokens, resolve_source
from fptq_onnx.conversion import Conversion, ParityReference, output_paths, parity_text_ids, write_manifests
from fptq_onnx.devices import resolve_device
from fptq_onnx.errors import FptqError
from fptq_onnx.layer_source import CheckpointLayers, LayerSource, ModelLayers
from fptq_onnx.layer_walk import MethodRun, walk
from fptq_onnx.memory import GIB, estimate_memory, parse_memory, should_stream
from fptq_onnx.report import peak_rss_mb, say, step
from fptq_onnx.saving import check_output_path, staged_outputs, write_sidecars


@dataclass
class ConvertOptions:
    method: str = "fptq"
    recipe: str | None = None  # the `--recipe` name that chose method and options, for the manifest
    formats: list[str] = field(default_factory=lambda: ["qdq", "w4a8"])
    algorithm_options: dict = field(default_factory=dict)
    extra_options: dict[str, str] = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    verify: bool = True
    tolerance: float = 3.0
    ppl_windows: int = 4
    ppl_seqlen: int = 512
    data_dir: str | None = None
    force: bool = False
    allow_pickle: bool = False
    progress: bool = True
    stream: bool | None = None  # read layers from the checkpoint; None = when the model would not fit
    max_memory: str | None = None  # '20GB': the budget auto-streaming and the streaming check use
    device: str | None = None  # 'cpu' | 'cuda' for calibration and weight search; None = cuda if available
    quantize_lm_head: bool = False  # plan lm_head (and a tied embedding) too: algorithms/lm_head.py


def open_source(model_arg: str | None, stream: bool, allow_pickle: bool, calibration: CalibrationConfig,
                formats: int, max_memory: int | None) -> LayerSource:
    """The walk's source: the loaded model, or (stream) its safetensors checkpoint read layer by layer."""
    from fptq_onnx import loading, sources
    from fptq_onnx.models.registry import spec_for

    if not stream:
        from fptq_onnx.pipeline import load

        loaded = load(model_arg, allow_pickle=allow_pickle)
        return ModelLayers(loaded.model, loaded.spec, loaded.tokenizer, loaded.source.label)
    with step("resolving model (streaming layers from the checkpoint)"):
        source = sources.resolve(model_arg, allow_pickle=False)
        if source.gguf_file:
            raise FptqError("--stream reads safetensors checkpoints; a GGUF model needs --no-stream")
        config = loading.load_config(source)
        spec = spec_for(config.model_type)
        layers = CheckpointLayers(source, config, spec, loading.load_tokenizer(source))
        estimate = estimate_memory(layers.ckpt, config, spec, calibration.samples, calibration.seqlen, formats)
        say(f"  {source.label} ({config.model_type}, {config.num_hidden_layers} layers, "
            f"{layers.ckpt.numel() / 1e9:.2f} B params); memory: {estimate.describe()}")
        if max_memory is not None and estimate.streaming > max_memory:
            raise FptqError(
                f"streaming needs about {estimate.streaming / GIB:.1f} GB with these settings, over --max-memory "
                f"{max_memory / GIB:.1f} GB; lower --calib-samples/--calib-seqlen or raise --max-memory")
    return layers


def traced_graph_cache(config) -> Path:
    """Where the traced graph of a model config lives: the user cache, keyed by everything the trace depends on
    (the config, torch / transformers / onnxscript / onnx-ir versions, and our export code)."""
    import hashlib

    import onnx_ir
    import onnxscript
    import transformers

    from fptq_onnx import export, sources, stream_export

    key = hashlib.sha256()
    for part in (config.to_json_string(use_diff=False), torch.__version__, transformers.__version__,
                 onnxscript.__version__, onnx_ir.__version__):
        key.update(part.encode())
    for module in (export, stream_export):
        key.update(Path(module.__file__).read_bytes())
    return sources.cache_dir() / "graphs" / f"{config.model_type}-{key.hexdigest()[:24]}.onnx"


def graph_structure(source: LayerSource):
    """The canonical float graph with placeholder decoder-linear weights (stream_export.export_structure).

    The dynamo trace is cached per model config (traced_graph_cache): a model converts without
    re-tracing from its second conversion on.
    """
    from transformers import AutoModelForCausalLM

    from fptq_onnx.stream_export import export_structure

    linear_names = {source.prefix(i) + name for i in range(source.num_layers) for name in source.spec.linears()}
    cache = traced_graph_cache(source.config)
    what = "cached trace" if cache.is_file() else "tracing on the meta device, no weights"
    with step(f"exporting the graph structure ({what})"):
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32).eval()
        return export_structure(meta, source.spec, source.value, linear_names, cache)


def convert_command(model_arg: str | None, out: Path, options: ConvertOptions) -> dict[str, dict]:
    start = time.perf_counter()
    algorithm = algorithms.get(options.method)
    config = algorithms.make_config(algorithm, options.algorithm_options, options.extra_options)
    device = resolve_device(options.device)
    paths = output_paths(out, options.formats)
    for path in paths.values():
        check_output_path(path, options.force)
    max_memory = parse_memory(options.max_memory)
    stream = options.stream if options.stream is not None else should_stream(model_arg, options, max_memory)
    calib = resolve_source(options.calibration)
    source = open_source(model_arg, stream, options.allow_pickle, calib, len(paths), max_memory)
    tokens = calibration_tokens(calib, source.tokenizer, source.config.vocab_size)
    structure = graph_structure(source)
    embedding, hold = None, set()
    if options.quantize_lm_head:
        from fptq_onnx.algorithms.lm_head import add_lm_head, tied_embedding
        from fptq_onnx.passes.quantize_lm_head import replaced_tables

        embedding = tied_embedding(source.skeleton)
        hold = replaced_tables(structure.graph, embedding is not None)
    with staged_outputs(out.parent) as stage:
        reference = None
        if options.verify:
            reference = ParityReference(source, parity_text_ids(source.tokenizer), paths, embedding)
        conversion = Conversion(structure, paths, stage, reference, hold)
        run = MethodRun(algorithm, config, [conversion], keep_weights=False)
        try:
            with step(f"walking the layers ({options.method}, {calib.source} {tokens.shape[0]} x {tokens.shape[1]} "
                      f"tokens, {device})"):
                final = walk(source, [run], tokens, calib, device, options.progress)
            if options.quantize_lm_head:
                add_lm_head(run.plan, source.skeleton, final, embedding)
            del final
            say(f"  decisions: {run.plan.counts()}")
            with step("saving"):
                conversion.save(run.plan)
                write_sidecars(source.skeleton, source.tokenizer, stage, out.parent)
        finally:
            conversion.close()
        del structure
        parity = conversion.check(source, options.tolerance, run.plan)
        extra = {}
        for fmt in paths:
            extra[fmt] = {"recipe": options.recipe, "model": source.label, "architecture": source.spec.name,
                          "device": str(device), "streamed": stream,
                          "parity": parity[fmt].__dict__ if fmt in parity else None}
            if options.ppl_windows > 0:
                extra[fmt]["quick_perplexity"] = quick_perplexity(conversion.staged[fmt], source, options)
        results = write_manifests(run.plan, paths, stage, extra)
    for fmt, path in paths.items():
        say(f"  wrote {path} (+ {path.name}.data), {path.stem}.manifest.json, {path.stem}.ranges.png")
    gpu = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB" if device.type == "cuda" else ""
    say(f"converted in {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_mb():.0f} MB{gpu}")
    return results


def quick_perplexity(path: Path, source: LayerSource, options: ConvertOptions) -> dict | None:
    """A few WikiText-2 windows through ONNX Runtime, and the float torch model for contrast (if in memory)."""
    import numpy as np

    from fptq_onnx.evaluation.perplexity import wikitext2_perplexity
    from fptq_onnx.runtime import OnnxCausalLM

    if source.float_model is None:
        say("  quick perplexity skipped (streamed: there is no float model in memory to compare with)")
        return None
    model = source.float_model

    def torch_scorer(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids)).logits.numpy()

    kwargs = dict(data_dir=options.data_dir, seqlen=options.ppl_seqlen, limit=options.ppl_windows)
    try:
        with step(f"quick perplexity ({options.ppl_windows} WikiText-2 windows of {options.ppl_seqlen})"):
            quantized = wikitext2_perplexity(OnnxCausalLM(path), source.tokenizer, **kwargs)["perplexity"]
            floating = _float_perplexity(source, torch_scorer, kwargs)
            say(f"  perplexity: float {floating:.3f}, {path.name} {quantized:.3f} ({quantized / floating:.3f}x)")
    except FptqError as exc:
        say(f"  skipped quick perplexity: {exc}")
        return None
    return {"windows": options.ppl_windows, "seqlen": options.ppl_seqlen, "float": floating, "quantized": quantized}


def _float_perplexity(source: LayerSource, scorer, kwargs: dict) -> float:
    """The float model's quick perplexity, computed once per source (every format compares with it)."""
    from fptq_onnx.evaluation.perplexity import wikitext2_perplexity

    key = tuple(sorted(kwargs.items()))
    cache = source.__dict__.setdefault("_float_ppl", {})
    if key not in cache:
        cache[key] = wikitext2_perplexity(scorer, source.tokenizer, **kwargs)["perplexity"]
    return cache[key]
