"""One pipeline, two sources: `convert --stream` writes byte-identical files to the in-memory source.

Every method (and the weight quantizers and recipes) converts the tiny llama checkpoint twice,
once with the decoder layers read one at a time from the safetensors file and once with the
model loaded whole; the ONNX files and their external data must be equal byte for byte.
The graph structure is exported once per checkpoint (conftest.cached_graph_structure).
Bad input to the streamed source fails with one `error:` line and leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ARGS = ("--calib", "random", "--calib-samples", "5", "--calib-seqlen", "16", "--group-size", "16",
        "--v0", "1", "--v1", "5", "--ppl-windows", "0")
METHODS = {
    "fptq": ("--method", "fptq", "--fold-pairs", "--asym"),
    "rtn": ("--method", "rtn", "--opt", "act=static"),
    "smoothquant": ("--method", "smoothquant", "--opt", "bits=4"),
    "gptq": ("--method", "gptq"),
    "awq": ("--method", "awq"),
    "auto": ("--method", "auto"),
    "ort-acc4": ("--method", "ort-acc4", "--format", "native"),
    "weights-mse": ("--weights", "mse"),
    "weights-gptq": ("--weights", "gptq"),
    "recipe-fptq": ("--recipe", "fptq"),
    "recipe-best": ("--recipe", "best"),
}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name.endswith((".onnx", ".onnx.data"))}


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_bytes_equal_in_memory(cli, tiny_checkpoint, fast_structure, tmp_path, method):
    _check_stream_equals_memory(cli, tiny_checkpoint, tmp_path, method, METHODS[method],
                                full=method in ("fptq", "recipe-best"))


@pytest.mark.parametrize("method", ["fptq", "smoothquant"])
def test_streamed_phi3_fused_pair_folds_equal_in_memory(cli, make_tiny_checkpoint, fast_structure, tmp_path, method):
    """Phi-3's o_proj / down_proj folded into a slice of qkv_proj / gate_up_proj rows: the same bytes streamed."""
    extra = {"fptq": (*METHODS["fptq"], "--v0", "0.01", "--v1", "1000"),  # the tiny o/down inputs in the LAE band
             "smoothquant": ("--method", "smoothquant", "--opt", "fold_pairs=true")}[method]
    manifest = _check_stream_equals_memory(cli, make_tiny_checkpoint("phi3"), tmp_path, method, extra, full=True)
    assert {eq["source"].rsplit(".", 1)[-1] for eq in manifest["equalizations"] if eq["kind"] == "linear"} == {
        "qkv_proj", "gate_up_proj"}


def _check_stream_equals_memory(cli, checkpoint: Path, tmp_path: Path, method: str, extra: tuple, full: bool) -> dict:
    """Convert streamed and in memory; the files must match byte for byte. `full`: every format and the parity
    check (its reference is streamed too). Returns the streamed manifest."""
    formats = () if "--format" in extra else ("--format", "qdq,w4a8,native" if full else "qdq")
    verify = () if full else ("--no-verify",)
    runs = {}
    for mode in ("--stream", "--no-stream"):
        out = tmp_path / mode.strip("-") / "m.onnx"
        result = cli("convert", checkpoint, out, mode, *ARGS, *formats, *verify, *extra)
        assert result.code == 0, result.stderr
        runs[mode] = out.parent
    streamed, whole = _files(runs["--stream"]), _files(runs["--no-stream"])
    assert len(streamed) >= 2 and list(streamed) == list(whole)
    for name in streamed:
        assert streamed[name] == whole[name], f"{method}: {name} differs between --stream and --no-stream"
    manifests = [json.loads(next(d.glob("m.manifest.json")).read_text()) for d in runs.values()]
    assert manifests[0]["streamed"] is True and manifests[1]["streamed"] is False
    assert manifests[0]["linears"] == manifests[1]["linears"]
    if not verify:
        assert manifests[0]["parity"] == manifests[1]["parity"]
    return manifests[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--max-memory", "1MB"), "over --max-memory"),
        (("--max-memory", "lots"), "--max-memory: expected a size"),
        (("--device", "tpu"), "unknown device"),
    ],
)
def test_stream_bad_input(cli, tiny_checkpoint, tmp_path, extra, message):
    result = cli("convert", tiny_checkpoint, tmp_path / "m.onnx", "--stream", *ARGS, *extra)
    assert result.code == 1
    assert len(result.error_lines) == 1 and message in result.error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_stream_corrupt_checkpoint(cli, make_tiny_checkpoint, tmp_path):
    checkpoint = make_tiny_checkpoint("llama", seed=3)
    shard = next(checkpoint.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "out"
    out.mkdir()
    result = cli("convert", checkpoint, out / "m.onnx", "--stream", *ARGS)
    assert result.code == 1 and len(result.error_lines) == 1, result.stderr
    assert "corrupt safetensors" in result.error_lines[0] or "cannot read" in result.error_lines[0]
    assert list(out.iterdir()) == []


def test_lazy_checkpoint_reads_shards(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fptq_onnx.errors import FptqError
    from fptq_onnx.lazy_weights import INDEX_FILE, LazyCheckpoint

    save_file({"a": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    ckpt = LazyCheckpoint(tmp_path)
    assert ckpt.numel() == 10 and ckpt.stored_bytes() == 20
    assert ckpt.get("a").dtype == torch.float32 and ckpt.get("a")[1, 2] == 5
    with pytest.raises(FptqError, match="missing"):
        ckpt.get("c")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FptqError, match="gone.safetensors"):
        LazyCheckpoint(tmp_path)


def test_memory_parsing():
    from fptq_onnx.memory import GIB, parse_memory

    assert parse_memory("20GB") == 20 * GIB and parse_memory("512MB") == 512 * 1024**2 and parse_memory("3") == 3 * GIB
    assert parse_memory(None) is None


def test_auto_stream_decision(tiny_checkpoint):
    from fptq_onnx.convert import ConvertOptions
    from fptq_onnx.memory import GIB, should_stream

    options = ConvertOptions()
    assert should_stream(str(tiny_checkpoint), options, 1024**2)  # a budget the whole model exceeds
    assert not should_stream(str(tiny_checkpoint), options, 64 * GIB)
    assert not should_stream(str(tiny_checkpoint / "missing"), options, 1024**2)  # left to the in-memory source


def test_lifted_constant_keeps_its_traced_value(tiny_models, tmp_path):
    """torch 2.11's exporter lifts a forward constant into the trace as an initializer (`lifted_tensor_N`) that is
    no tensor of the model: the traced-graph cache keeps its value and finish_structure uses it, instead of
    looking it up in the checkpoint; one without a value is a clear error."""
    import numpy as np
    import onnx_ir as ir
    import torch
    from transformers import AutoModelForCausalLM

    from fptq_onnx.errors import FptqError
    from fptq_onnx.layer_source import ModelLayers
    from fptq_onnx.models.registry import spec_for
    from fptq_onnx.stream_export import (_save_traced, finish_structure, is_placeholder, model_tensor_names,
                                         trace_structure)

    spec, model = spec_for("llama"), tiny_models["llama"]
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
        traced = trace_structure(meta, spec)
    traced.graph.register_initializer(ir.Value(name="lifted_tensor_0", const_value=ir.tensor(np.float32([2.0]))))
    cache = tmp_path / "trace.onnx"
    _save_traced(traced, cache, model_tensor_names(meta))

    loaded = ir.load(cache)
    lifted = loaded.graph.initializers["lifted_tensor_0"]
    assert lifted.const_value.numpy().tolist() == [2.0]
    assert all(is_placeholder(v.const_value) for n, v in loaded.graph.initializers.items() if n != "lifted_tensor_0")
    layers = ModelLayers(model, spec)
    linears = {layers.prefix(i) + name for i in range(layers.num_layers) for name in spec.linears()}
    finish_structure(loaded, meta, spec, layers.value, linears)  # no lookup of lifted_tensor_0 in the model

    valueless = ir.load(cache)
    valueless.graph.initializers["lifted_tensor_0"].const_value = None
    with pytest.raises(FptqError, match="constant lifted_tensor_0 without a value"):
        finish_structure(valueless, meta, spec, layers.value, linears)


def test_meta_trace_keeps_scalar_constants():
    """transformers 5.17's eager mask does `torch.where(mask, torch.tensor(0.0, device=mask.device), min)`: traced on
    the meta device that scalar would be a constant without a value; the structure trace makes it on the CPU."""
    import torch

    from fptq_onnx.export import _quiet_loggers
    from fptq_onnx.stream_export import _scalars_on_cpu

    class Mask(torch.nn.Module):
        def forward(self, x):
            return torch.where(x > 0, torch.tensor(0.0, device=x.device, dtype=x.dtype), torch.finfo(x.dtype).min)

    with _quiet_loggers(), _scalars_on_cpu():
        program = torch.onnx.export(Mask(), (torch.zeros(2, 3, device="meta"),), dynamo=True, optimize=False,
                                    verbose=False)
    (constant,) = program.model.graph.initializers.values()
    assert constant.const_value.numpy().tolist() == 0.0
    assert torch.tensor(1.0, device="meta").is_meta  # the patch ends with the trace


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_skipped_rewrite_rules_change_nothing(arch, monkeypatch, tmp_path) -> None:
    """The optimizer without the slow rules it skips finishes the same bytes as with every rule."""
    import onnx_ir as ir
    import torch
    from tiny import tiny_model
    from transformers import AutoModelForCausalLM

    from fptq_onnx import stream_export
    from fptq_onnx.models.registry import spec_for

    real = tiny_model(arch)
    values = {k: v.detach().numpy() for k, v in real.state_dict().items()}
    values.update({k: v.numpy() for k, v in real.named_buffers()})
    spec = spec_for(arch)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(real.config, dtype=torch.float32).eval()
    linears = {n for n, m in skeleton.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(spec.layers_path + ".")}
    finished = []
    for skipped in (stream_export._SKIPPED_REWRITE_RULES, frozenset()):  # traced once, then from the cache
        monkeypatch.setattr(stream_export, "_SKIPPED_REWRITE_RULES", skipped)
        model = stream_export.export_structure(skeleton, spec, values.__getitem__, linears, tmp_path / "trace.onnx")
        finished.append(ir.to_proto(model).SerializeToString())
    assert finished[0] == finished[1]
