"""`export` and what it shares with convert: resolve and load a model, write a float bundle.

A bundle is the ONNX file plus what apps need beside it (config.json,
generation_config.json, tokenizer files), the layout Optimum's
ORTModelForCausalLM and plain ORT apps read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import torch

from fptq_onnx import loading, sources
from fptq_onnx.export import export_float
from fptq_onnx.models.registry import ArchSpec, spec_for
from fptq_onnx.report import peak_rss_mb, say, step
from fptq_onnx.saving import check_output_path, stage_model, staged_outputs, write_sidecars
from fptq_onnx.verify import Parity, check_parity


@dataclass
class LoadedModel:
    source: sources.ModelSource
    spec: ArchSpec
    model: torch.nn.Module
    tokenizer: object


def load(model_arg: str | None, allow_pickle: bool = False, trust_remote_code: bool = False) -> LoadedModel:
    """Resolve, check the architecture before touching weights, then load model and tokenizer."""
    with step("resolving model"):
        source = sources.resolve(model_arg, allow_pickle=allow_pickle)
        config = loading.load_config(source)
        spec = spec_for(config.model_type)
        say(f"  {source.label} ({config.model_type}, {config.num_hidden_layers} layers)")
    with step("loading weights"):
        model = loading.load_model(source, trust_remote_code=trust_remote_code)
        tokenizer = loading.load_tokenizer(source)
    return LoadedModel(source, spec, model, tokenizer)


def write_bundle(
    ir_model: ir.Model,
    out: Path,
    loaded: LoadedModel,
    reference: torch.nn.Module | None,
    tolerance: float | None,
    parity_ids=None,
    metric: str = "max",
) -> Parity | None:
    """Stage model + sidecars, check parity on the staged file, then move everything into place."""
    parity = None
    with staged_outputs(out.parent) as stage:
        with step(f"saving {out.name}"):
            staged = stage_model(stage, ir_model, out)
            write_sidecars(loaded.model, loaded.tokenizer, stage, out.parent)
        if reference is not None:
            with step("checking parity (torch vs ONNX Runtime, prefill + decode)"):
                parity = check_parity(reference, staged, tolerance, parity_ids, metric)
                say(f"  {parity.describe()}")
    return parity


def export_command(
    model_arg: str | None, out: Path, force: bool, verify: bool, tolerance: float, allow_pickle: bool
) -> Parity | None:
    start = time.perf_counter()
    check_output_path(out, force)
    loaded = load(model_arg, allow_pickle=allow_pickle)
    with step("exporting to ONNX (opset 21, KV cache)"):
        ir_model = export_float(loaded.model, loaded.spec)
    parity = write_bundle(ir_model, out, loaded, loaded.model if verify else None, tolerance)
    say(f"wrote {out} in {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_mb():.0f} MB")
    return parity
