"""The sinks of the layer walk for one converted model: ONNX graphs, parity reference, the bundle.

`Conversion` is one method's output: one graph per requested format, cloned from the
canonical float structure (stream_export.export_structure: decoder-linear weights are
placeholders, everything else real). As the walk finishes a layer, `layer()` gives each
graph that layer's weights (zeros for planned linears: the passes replace them by the
plan's quantized ones; the float values for unplanned ones), runs the format's passes
restricted to the layer's plan and moves the layer's new initializers into the
format's external-data file; it also advances the parity reference (the parity prompt
through the layer's fake-quant copies, fp32 and fp64, and weight-only for `native`).
`finish()` stamps the decisions, saves the graph protos, checks parity in ONNX Runtime
against the reference, and writes manifests and range plots, all into a staging
directory that is moved into place only when everything succeeded.

The same code serves the in-memory and the streamed source, so both give identical files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from fptq_onnx.errors import FptqError
from fptq_onnx.fakequant import apply_plan, fake_quant_per_token
from fptq_onnx.formats import ALL_FORMATS, run_passes
from fptq_onnx.layer_source import LayerSource, layer_output
from fptq_onnx.layer_walk import to_device
from fptq_onnx.passes.stamp_decisions import StampDecisionsPass
from fptq_onnx.passes.quantize_lm_head import LM_HEAD
from fptq_onnx.plan import ActMode, EmbeddingPlan, QuantPlan, manifest_path, to_json
from fptq_onnx.report import say, step
from fptq_onnx.saving import data_file_name, pause_point
from fptq_onnx.stream_export import ExternalDataWriter, check_complete, zero_weight

# Format.check -> (reference stream, fp64 stream for the noise floor, fixed tolerance, metric); see formats.Format.
CHECKS = {
    "noise": ("fq32", "fq64", None, "noise"),
    "weights": ("wo32", None, None, "max"),
    "float": ("fq32", None, 1e-3, "max"),
}


def output_paths(out: Path, formats: list[str]) -> dict[str, Path]:
    """The first format takes OUT.onnx; the others OUT.<format>.onnx."""
    return {fmt: out if i == 0 else out.with_name(f"{out.stem}.{fmt}.onnx") for i, fmt in enumerate(formats)}


def parity_text_ids(tokenizer, length: int = 64) -> np.ndarray:
    """An in-distribution prompt for the parity check (text, not random tokens)."""
    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
            "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
            "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the world.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    return np.array([ids], dtype=np.int64)


def fill_layer(graph: ir.Graph, prefix: str, layer: torch.nn.Module, plan: QuantPlan) -> None:
    """Give the layer's linear weight initializers values: zeros for planned ones, real floats otherwise."""
    for name, module in layer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        full = prefix + name
        value = graph.initializers.get(f"{full}.weight")
        if value is None:
            raise FptqError(f"the graph has no initializer {full}.weight")
        lp = plan.linears.get(full)
        if lp is not None and lp.weight is not None:
            value.const_value = zero_weight(tuple(int(d) for d in value.shape))
        else:
            weight = module.weight.detach().float().cpu().numpy().T.copy()
            value.const_value = ir.tensor(weight, name=f"{full}.weight")


class ParityReference:
    """The parity prompt's hidden states through each layer's fake-quant copies (see the module doc)."""

    def __init__(self, source: LayerSource, ids: np.ndarray, formats, embedding: EmbeddingPlan | None = None) -> None:
        self.ids = ids
        self.norm_offset = source.spec.norm_offset
        with _embedding_swapped(source.skeleton, embedding):
            hidden, self.kwargs = source.capture(torch.from_numpy(ids))
        self.streams = {"fq32": hidden.float(), "fq64": hidden.double()}
        if any(ALL_FORMATS[fmt].check == "weights" for fmt in formats):
            self.streams["wo32"] = hidden.float()

    def layer(self, index: int, prefix: str, layer: torch.nn.Module, plan: QuantPlan) -> None:
        device = next(layer.parameters()).device
        kwargs = to_device(self.kwargs[index], device)

        def run(module, key: str, dtype: torch.dtype) -> None:
            with torch.no_grad():
                x = self.streams[key].to(device)
                out = layer_output(module(x, **to_device(kwargs, device, dtype)))
            self.streams[key] = out.cpu()

        fake = apply_plan(layer, plan, activations=True, prefix=prefix, norm_offset=self.norm_offset)
        run(fake, "fq32", torch.float32)
        run(fake.double(), "fq64", torch.float64)
        del fake
        if "wo32" in self.streams:
            run(apply_plan(layer, plan, activations=False, prefix=prefix, norm_offset=self.norm_offset), "wo32",
                torch.float32)

    def logits(self, source: LayerSource, plan: QuantPlan) -> dict[str, np.ndarray]:
        """Final norm and lm_head (fake-quantized like the graph's when the plan has one)."""
        head = plan.linears.get(LM_HEAD)
        out = {}
        for key, value in self.streams.items():
            weight = None if head is None else torch.from_numpy(head.weight.dequantize().T.copy())
            per_token = head is not None and head.act_mode == ActMode.PER_TOKEN and not key.startswith("wo")
            out[key] = source.head_logits(value, weight, fake_quant_per_token if per_token else None).numpy()
        return out


@contextlib.contextmanager
def _embedding_swapped(model: torch.nn.Module, embedding: EmbeddingPlan | None):
    """The model's input embedding temporarily holds the plan's dequantized int8 rows."""
    if embedding is None:
        yield
        return
    module = model.get_submodule(embedding.name)
    original = module.weight
    module.weight = torch.nn.Parameter(torch.from_numpy(embedding.weight.dequantize().T.copy()), requires_grad=False)
    try:
        yield
    finally:
        module.weight = original


def parity_from_logits(ref32: np.ndarray, ref64: np.ndarray | None, path: Path, ids: np.ndarray,
                       tolerance: float | None, metric: str):
    """`verify.check_parity` against reference logits of the full sequence (= prefill + decode)."""
    from fptq_onnx.verify import onnx_prefill_decode, parity_of

    ref = ref32 if metric == "max" else ref64
    noise_floor = None if metric == "max" else float(np.abs(ref32 - ref64).mean())
    return parity_of(ref, *onnx_prefill_decode(path, ids), metric, noise_floor, tolerance)


class Conversion:
    """One method's output files (one per format), filled layer by layer; a sink of the walk."""

    def __init__(self, structure: ir.Model, paths: dict[str, Path], stage, reference: ParityReference | None,
                 hold: frozenset[str] | set[str] = frozenset()) -> None:
        """`hold`: initializers save()'s lm_head passes replace (`replaced_tables`): the layer walk does
        not write them out, or their dead fp32 bytes would stay in the external-data file."""
        self.paths = paths
        self.graphs = {fmt: structure.clone() for fmt in paths}
        self.hold = hold
        self.staged = {fmt: stage(path.name) for fmt, path in paths.items()}
        self.writers = {fmt: ExternalDataWriter(stage(data_file_name(path))) for fmt, path in paths.items()}
        self.reference = reference

    def layer(self, index: int, prefix: str, layer: torch.nn.Module, plan: QuantPlan, kwargs: dict) -> None:
        for fmt, graph in self.graphs.items():
            fill_layer(graph.graph, prefix, layer, plan)
            run_passes(graph, ALL_FORMATS[fmt].passes(plan))
            self.writers[fmt].spill(graph.graph, self.hold)
        if self.reference is not None:
            self.reference.layer(index, prefix, layer, plan)

    def save(self, plan: QuantPlan) -> None:
        """The lm_head's passes (--quantize-lm-head), spill what is left (embeddings, head), stamp, save each proto."""
        head = None
        if LM_HEAD in plan.linears:
            head = QuantPlan(plan.method, plan.config, plan.calibration, {LM_HEAD: plan.linears[LM_HEAD]},
                             embedding=plan.embedding)
        try:
            for fmt, graph in self.graphs.items():
                if head is not None:
                    run_passes(graph, ALL_FORMATS[fmt].passes(head))
                self.writers[fmt].spill(graph.graph)
                stamps = [StampDecisionsPass(plan, fmt)] if ALL_FORMATS[fmt].stamp else []
                run_passes(graph, [*stamps, ir.passes.common.TopologicalSortPass()])
                check_complete(graph.graph)
                ir.save(graph, self.staged[fmt])
                pause_point("staged")
        finally:
            self.close()
        del self.graphs

    def discard(self) -> None:
        """Remove everything this conversion staged (a failed row of `compare` leaves nothing behind)."""
        for path in next(iter(self.staged.values())).parent.iterdir():
            if path.is_file():
                path.unlink()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def check(self, source: LayerSource, tolerance: float, plan: QuantPlan) -> dict:
        """Parity of every staged file against the streamed torch reference: {format: Parity}."""
        if self.reference is None:
            return {}
        logits = self.reference.logits(source, plan)
        out = {}
        for fmt, path in self.staged.items():
            ref, ref64, fixed, metric = CHECKS[ALL_FORMATS[fmt].check]
            with step(f"checking parity of {self.paths[fmt].name} (torch vs ONNX Runtime, prefill + decode)"):
                out[fmt] = parity_from_logits(logits[ref], logits.get(ref64), path, self.reference.ids,
                                              tolerance if metric == "noise" else fixed, metric)
                say(f"  {out[fmt].describe()}")
        return out

    def onnx_bytes(self, fmt: str) -> int:
        staged = self.staged[fmt]
        return staged.stat().st_size + staged.with_name(data_file_name(self.paths[fmt])).stat().st_size


def write_manifests(plan: QuantPlan, paths: dict[str, Path], stage, extra: dict[str, dict]) -> dict[str, dict]:
    """The plan's manifest per format, and its range plot (drawn once: it shows the plan, not the format), staged."""
    import shutil

    from fptq_onnx.plot import plot_ranges

    manifests, plot = {}, None
    for fmt, path in paths.items():
        manifest = plan.manifest(format=fmt, runtime_activations=ALL_FORMATS[fmt].activations, **extra[fmt])
        stage(manifest_path(path).name).write_text(to_json(manifest))
        png = stage(path.stem + ".ranges.png")
        if plot is None:
            plot_ranges(manifest, png)
            plot = png
        else:
            shutil.copyfile(plot, png)
        manifests[fmt] = manifest
    return manifests
