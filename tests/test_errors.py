"""README's error contract on the paths test_cli.py does not reach: one `error:` line, exit 1, no output.

Covered here: a user error raised inside an onnx-ir pass (not PassError), `cmd OUT.onnx` with the
model omitted, a missing output directory (created), NaN activations during calibration, shapes
that do not divide, and ONNX files that `eval` / `inspect` cannot use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from test_cli import assert_user_error

CONVERT_ARGS = ("--calib", "random", "--calib-samples", "2", "--calib-seqlen", "16", "--group-size", "16",
                "--ppl-windows", "0", "--no-verify", "--format", "qdq")


def _identity_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def test_pass_error_unwrapped_to_the_user_error():
    """A FptqError inside a pass reaches the CLI as itself (one line), not as onnx-ir's PassError."""
    import onnx_ir as ir

    from fptq_onnx.errors import FptqError
    from fptq_onnx.formats import apply_format
    from fptq_onnx.plan import ActMode, LinearPlan, QuantPlan

    plan = QuantPlan("rtn", {}, {})
    plan.linears["model.layers.0.mlp.up_proj"] = LinearPlan("model.layers.0.mlp.up_proj", "static", ActMode.STATIC,
                                                            1.0, 1.0, 0.01)
    x = ir.Value(name="x", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Identity", [x])
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21}), ir_version=10)
    with pytest.raises(FptqError, match="no MatMul of that name"):
        apply_format(model, plan, "qdq")


def test_model_omitted_means_default_model_into_out():
    from fptq_onnx.cli import model_and_output

    assert model_and_output("out/m.onnx", None) == (None, Path("out/m.onnx"))
    assert model_and_output("ckpt", Path("m.onnx")) == ("ckpt", Path("m.onnx"))
    assert model_and_output(None, None) == (None, Path("model.onnx"))


@pytest.mark.parametrize("command", ["export", "convert"])
def test_single_argument_is_the_output(cli, tmp_path, command):
    """`export OUT.onnx`: OUT is the output (here refused as existing), never 'model not found: OUT.onnx'."""
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    line = assert_user_error(cli(command, out), "exists")
    assert "model not found" not in line and out.read_bytes() == b"old"


def test_missing_output_directory_is_created(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "new" / "deeper" / "m.onnx"
    result = cli("convert", tiny_checkpoint, out, *CONVERT_ARGS)
    assert result.code == 0, result.stderr
    assert out.is_file() and not list(out.parent.glob(".fptq-*"))


def test_output_directory_that_is_a_file(cli, tiny_checkpoint, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_user_error(cli("convert", tiny_checkpoint, tmp_path / "file" / "m.onnx", *CONVERT_ARGS), "is a file")


def _checkpoint_with(tmp_path: Path, edit) -> Path:
    from conftest import save_tiny_checkpoint
    from tiny import tiny_model

    model = tiny_model("llama")
    edit(model)
    return save_tiny_checkpoint(tmp_path / "ckpt", model=model)


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_nan_in_calibration(cli, tmp_path, stream):
    import torch

    def poison(model):
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    checkpoint = _checkpoint_with(tmp_path, poison)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = assert_user_error(cli("convert", checkpoint, out_dir / "m.onnx", stream, *CONVERT_ARGS), "NaN", out_dir)
    assert "down_proj" in line


def test_heads_that_do_not_divide(cli, tmp_path):
    """A config whose query heads are no multiple of its KV heads cannot be an LLaMA attention."""
    checkpoint = _checkpoint_with(tmp_path, lambda model: None)
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (checkpoint / "config.json").write_text(json.dumps(config))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_user_error(cli("convert", checkpoint, out_dir / "m.onnx", *CONVERT_ARGS), "divide", out_dir)


@pytest.mark.parametrize("command", ["eval", "inspect", "generate"])
def test_wrong_onnx_file(cli, tmp_path, command):
    path = _identity_onnx(tmp_path / "id.onnx")
    args = {"eval": ("--task", "wikitext2"), "inspect": (), "generate": ("hi",)}[command]
    before = {p.name for p in tmp_path.iterdir()}
    result = cli(command, path, *args)
    assert_user_error(result, "manifest" if command == "inspect" else "not a causal-LM export")
    assert {p.name for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_missing_onnx_file(cli, tmp_path, command):
    assert_user_error(cli(command, tmp_path / "none.onnx"), "none.onnx")


def test_corrupt_manifest(cli, tmp_path):
    path = _identity_onnx(tmp_path / "id.onnx")
    (tmp_path / "id.manifest.json").write_text("{not json")
    assert_user_error(cli("inspect", path), "corrupt manifest")


def test_quantize_groups_ragged_k_is_fine():
    """K need not divide by the group size: the last group is ragged (README), not an error."""
    from fptq_onnx.quant import quantize_groups

    w = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    qw = quantize_groups(w, 16, True)
    assert qw.scales.shape == (3, 8) and np.abs(qw.dequantize() - w).max() < np.abs(w).max() / 4


def test_device_option(cli, tiny_checkpoint, tmp_path):
    """--device cuda without a GPU is one error line; cpu is what the default resolves to here."""
    import torch

    from fptq_onnx.devices import resolve_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the error path cannot be reached")
    assert resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = assert_user_error(cli("convert", tiny_checkpoint, out_dir / "m.onnx", "--device", "cuda", *CONVERT_ARGS),
                             "--device cuda", out_dir)
    assert "no CUDA GPU" in line
