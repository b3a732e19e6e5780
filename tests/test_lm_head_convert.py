"""`fptq-onnx convert --quantize-lm-head` on the tiny llama checkpoint (tied embedding), through the CLI.

The convert runs its parity check against the torch fake-quant model with the same
quantized lm_head and int8 embedding (exit 1 if it fails); the tests read what it wrote.
"""

from __future__ import annotations

import json

import onnx
import pytest
from test_convert import CONVERT_ARGS, FORMATS, _paths

from fptq_onnx.stream_export import ExternalDataWriter


@pytest.fixture(scope="module")
def converted(cli, tiny_checkpoint, structure_cache, tmp_path_factory):
    from conftest import cached_graph_structure

    from fptq_onnx import convert

    out = tmp_path_factory.mktemp("lm-head") / "tiny.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert, "graph_structure", cached_graph_structure(structure_cache))
        result = cli("convert", tiny_checkpoint, out, "--format", ",".join(FORMATS), "--quantize-lm-head",
                     *CONVERT_ARGS)
    assert result.code == 0, result.stdout + result.stderr
    return out


def _manifest(path):
    return json.loads(path.with_name(path.stem + ".manifest.json").read_text())


def test_manifest_records_lm_head_and_tied_embedding(converted):
    for fmt, path in _paths(converted).items():
        manifest = _manifest(path)
        head = manifest["linears"]["lm_head"]
        assert head["act_mode"] == "per_token" and head["weight"]["bits"] == 4, fmt
        assert head["weight"]["group_size"] == 16 and head["max_abs"] > 0
        assert manifest["embeddings"]["model.embed_tokens"]["tied_to"] == "lm_head"
        if fmt != "native":
            assert manifest["parity"]["metric"] == "noise"


def test_w4a8_runs_lm_head_as_the_custom_op_and_gathers_int8_rows(converted):
    model = onnx.load(_paths(converted)["w4a8"], load_external_data=False)
    head = next(n for n in model.graph.node if n.name == "lm_head")
    assert (head.domain, head.op_type) == ("fptq", "W4A8MatMul")
    assert not any(n.op_type == "MatMul" and n.output[0] == "logits" for n in model.graph.node)
    rows = next(i for i in model.graph.initializer if i.name == "model.embed_tokens.weight_q")
    assert rows.data_type == onnx.TensorProto.INT8
    vocab, hidden = rows.dims
    tables = [i.name for i in model.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and sorted(i.dims) == sorted([vocab, hidden])]
    assert tables == []  # neither the embedding table nor the lm_head weight is left in fp32


def test_native_lm_head_is_an_int4_dequantize(converted):
    model = onnx.load(_paths(converted)["native"], load_external_data=False)
    head = next(n for n in model.graph.node if n.name == "lm_head")
    dq = next(n for n in model.graph.node if n.output[0] == head.input[1])
    assert dq.op_type == "DequantizeLinear"


def test_generate_on_w4a8_with_quantized_head(cli, converted):
    result = cli("generate", _paths(converted)["w4a8"], "hello world", "--max-new-tokens", "4", "--no-chat")
    assert result.code == 0, result.stdout + result.stderr


def test_streamed_equals_in_memory(cli, tiny_checkpoint, fast_structure, converted, tmp_path):
    """The lm_head and tied embedding are planned around the layer walk, so streaming them is the same code."""
    out = tmp_path / "tiny.onnx"
    result = cli("convert", tiny_checkpoint, out, "--format", ",".join(FORMATS), "--quantize-lm-head", "--stream",
                 *CONVERT_ARGS)
    assert result.code == 0, result.stderr
    for fmt, path in _paths(out).items():
        whole = _paths(converted)[fmt]
        assert path.read_bytes() == whole.read_bytes(), fmt
        data = path.name + ".data"
        assert (path.parent / data).read_bytes() == (whole.parent / data).read_bytes(), fmt
        assert _manifest(path)["linears"] == _manifest(whole)["linears"]


def test_data_file_holds_only_what_the_model_reads(converted):
    """The fp32 table the lm_head passes replace is not written before they run (it once left a
    dead fp32 copy in the .data file: SmolLM2's 111 MB w4a8 model took 220 MB on disk)."""
    for fmt, path in _paths(converted).items():
        model = onnx.load(path, load_external_data=False)
        spans = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data]
        referenced = sum(int(s["length"]) for s in spans)
        size = (path.parent / (path.name + ".data")).stat().st_size
        assert size <= referenced + len(spans) * ExternalDataWriter.ALIGN, (fmt, size, referenced)
