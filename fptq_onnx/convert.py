"""`convert`: HF model -> calibrate (torch) -> decide per layer -> export -> passes -> save.

Each requested format is written as its own bundle (model, data file, manifest,
range plot, tokenizer/config), checked against the torch fake-quant reference of
the same plan, and scored on a few perplexity windows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from fptq_onnx import algorithms
from fptq_onnx.calibration import CalibrationConfig, calibrate, resolve_source
from fptq_onnx.errors import FptqError
from fptq_onnx.export import export_float
from fptq_onnx.fakequant import apply_plan
from fptq_onnx.formats import apply_format
from fptq_onnx.pipeline import LoadedModel, load, write_bundle
from fptq_onnx.plan import QuantPlan, manifest_path, to_json
from fptq_onnx.plot import plot_ranges
from fptq_onnx.report import peak_rss_mb, say, step
from fptq_onnx.saving import atomic_file, check_output_path


FORMAT_ACTIVATIONS = {
    "qdq": "as planned: explicit int8 Q/DQ (static per-tensor or per-token)",
    "w4a8": "as planned, inside fptq.W4A8MatMul (static per-tensor or per-token int8)",
    "native": "ONNX Runtime MatMulNBits accuracy_level 4: per-K-block dynamic int8 (planned activation modes not used)",
}


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
    stream: bool | None = None  # layer-streaming path (streaming.py); None = when the model would not fit
    max_memory: str | None = None  # '20GB': the budget auto-streaming and the streaming check use
    quantize_lm_head: bool = False  # plan lm_head (and a tied embedding) too: algorithms/lm_head.py


def output_paths(out: Path, formats: list[str]) -> dict[str, Path]:
    """The first format takes OUT.onnx; the others OUT.<format>.onnx."""
    return {fmt: out if i == 0 else out.with_name(f"{out.stem}.{fmt}.onnx") for i, fmt in enumerate(formats)}


def convert_command(model_arg: str | None, out: Path, options: ConvertOptions) -> dict[str, dict]:
    from fptq_onnx import streaming

    max_memory = streaming.parse_memory(options.max_memory)
    stream = options.stream
    if stream is None:
        stream = streaming.should_stream(model_arg, options, max_memory)
    if stream:
        if options.quantize_lm_head:
            raise FptqError("--quantize-lm-head is not supported with --stream yet")
        return streaming.stream_convert(model_arg, out, options, max_memory)
    start = time.perf_counter()
    algorithm = algorithms.get(options.method)
    config = algorithms.make_config(algorithm, options.algorithm_options, options.extra_options)
    paths = output_paths(out, options.formats)
    for path in paths.values():
        check_output_path(path, options.force)
    loaded = load(model_arg, allow_pickle=options.allow_pickle)
    plan = make_plan(loaded, algorithm, config, options)
    say(f"  decisions: {plan.counts()}")
    with step("exporting float model to ONNX"):
        float_model = export_float(loaded.model, loaded.spec)
    results = {}
    for fmt, path in paths.items():
        results[fmt] = write_format(float_model, plan, fmt, path, loaded, options)
    say(f"converted in {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_mb():.0f} MB")
    return results


def make_plan(loaded: LoadedModel, algorithm, config, options: ConvertOptions) -> QuantPlan:
    source = resolve_source(options.calibration).source
    with step(f"calibrating ({source}, {options.calibration.samples} x {options.calibration.seqlen} tokens)"):
        calib = calibrate(loaded.model, loaded.spec, loaded.tokenizer, options.calibration, options.progress)
    with step(f"planning ({options.method})"):
        plan = algorithm.build_plan(loaded.model, loaded.spec, calib, config)
    if options.quantize_lm_head:
        from fptq_onnx.algorithms.lm_head import add_lm_head

        with step("planning lm_head"):
            add_lm_head(plan, loaded.model, calib.tokens)
    return plan


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def write_format(float_model: ir.Model, plan: QuantPlan, fmt: str, path: Path, loaded: LoadedModel,
                 options: ConvertOptions) -> dict:
    with step(f"applying passes for '{fmt}'"):
        model = apply_format(_copy(float_model), plan, fmt)
    # qdq and w4a8 are checked against the full fake-quant reference; native uses ORT's own
    # per-block activation rounding, which torch does not model: it is compared with the
    # weight-only reference and reported, not bounded.
    explicit = fmt != "native"
    reference = apply_plan(loaded.model, loaded.spec, plan, activations=explicit) if options.verify else None
    manifest_path(path).unlink(missing_ok=True)  # written last, so a manifest always belongs to its model
    parity = write_bundle(model, path, loaded, reference, options.tolerance if explicit else None,
                          plan_parity_ids(loaded), "noise" if explicit else "max")
    manifest = plan.manifest(
        format=fmt, recipe=options.recipe, model=loaded.source.label, architecture=loaded.spec.name,
        runtime_activations=FORMAT_ACTIVATIONS[fmt], parity=None if parity is None else parity.__dict__,
    )
    if options.ppl_windows > 0:
        manifest["quick_perplexity"] = quick_perplexity(path, reference, loaded, options)
    with atomic_file(path.with_name(path.stem + ".ranges.png")) as png:
        plot_ranges(manifest, png)
    with atomic_file(manifest_path(path)) as file:
        file.write_text(to_json(manifest))
    say(f"  wrote {path}, {manifest_path(path).name}, {path.stem}.ranges.png")
    return manifest


def plan_parity_ids(loaded: LoadedModel, length: int = 64):
    """An in-distribution prompt for the parity check (text, not random tokens)."""
    import numpy as np

    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
            "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
            "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the world.")
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    return np.array([ids], dtype=np.int64)


def quick_perplexity(path: Path, reference, loaded: LoadedModel, options: ConvertOptions) -> dict | None:
    """A few WikiText-2 windows through ONNX Runtime (and the float torch model for contrast)."""
    import numpy as np
    import torch

    from fptq_onnx.evaluation.perplexity import wikitext2_perplexity
    from fptq_onnx.runtime import OnnxCausalLM

    def torch_scorer(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded.model(input_ids=torch.from_numpy(ids)).logits.numpy()

    kwargs = dict(data_dir=options.data_dir, seqlen=options.ppl_seqlen, limit=options.ppl_windows)
    try:
        with step(f"quick perplexity ({options.ppl_windows} WikiText-2 windows of {options.ppl_seqlen})"):
            quantized = wikitext2_perplexity(OnnxCausalLM(path), loaded.tokenizer, **kwargs)["perplexity"]
            floating = wikitext2_perplexity(torch_scorer, loaded.tokenizer, **kwargs)["perplexity"]
            say(f"  perplexity: float {floating:.3f}, {path.name} {quantized:.3f} ({quantized / floating:.3f}x)")
    except FptqError as exc:
        say(f"  skipped quick perplexity: {exc}")
        return None
    return {"windows": options.ppl_windows, "seqlen": options.ppl_seqlen, "float": floating, "quantized": quantized}
