"""Our loaders (eval, generate, every ORT session we make) refuse external data outside the model's directory.

A model file names the files its weights live in; a hostile one could name
`../../etc/shadow` or an absolute path, or a symlink placed beside it could point out.
runtime.check_external_data refuses all of them, and a range past the file's end,
with one `error:` line before ONNX Runtime opens anything.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from fptq_onnx.errors import FptqError
from fptq_onnx.runtime import OnnxCausalLM


@pytest.fixture(scope="module")
def external_model(tiny_onnx, tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny llama float export with every initializer >= 1 KiB in model.onnx.data, plus its tokenizer."""
    import onnx_ir as ir

    from fptq_onnx.saving import save_model

    directory = tmp_path_factory.mktemp("external") / "model"
    directory.mkdir()
    save_model(ir.load(tiny_onnx["llama"]), directory / "model.onnx", external=True)
    for file in tiny_checkpoint.iterdir():
        if file.suffix == ".json":
            shutil.copy(file, directory)
    return directory / "model.onnx"


def _hostile_copy(external_model: Path, root: Path, location: str | None = None, **fields: str) -> Path:
    """A copy of the model dir whose first external tensor points at `location` / has other fields."""
    model_dir = root / "model"
    shutil.copytree(external_model.parent, model_dir)
    shutil.copy(external_model.with_name("model.onnx.data"), root / "stolen.data")  # what an escape would read
    proto = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location" and location is not None:
            entry.value = location
        entry.value = fields.get(entry.key, entry.value)
    onnx.save(proto, str(model_dir / "model.onnx"))
    return model_dir / "model.onnx"


def test_the_valid_external_model_loads(external_model):
    assert external_model.with_name("model.onnx.data").stat().st_size > 0
    lm = OnnxCausalLM(external_model)
    assert lm.logits(np.array([[1, 2, 3, 4]], np.int64)).shape[:2] == (1, 4)


HOSTILE = {
    "dotdot": (dict(location="../stolen.data"), r"outside the model's directory"),
    "absolute": (dict(location="ABS"), r"outside the model's directory"),
    "symlink-out": (dict(location="link.data"), r"outside the model's directory"),
    "past-end": (dict(offset="999999999"), r"reads up to byte \d+ of 'model\.onnx\.data'"),
    "negative": (dict(length="-4"), r"bad external-data offset/length"),
    "missing": (dict(location="nope.data"), r"external data file 'nope\.data' of tensor '.*' not found"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_external_data_is_refused(external_model, tmp_path, cli, case):
    fields, pattern = HOSTILE[case]
    if fields.get("location") == "ABS":
        fields = {"location": str(tmp_path / "stolen.data")}
    path = _hostile_copy(external_model, tmp_path, **fields)
    if case == "symlink-out":
        (path.parent / "link.data").symlink_to(tmp_path / "stolen.data")
    with pytest.raises(FptqError, match=pattern):
        OnnxCausalLM(path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    for command in (["eval", path, "--task", corpus, "--seqlen", "8"], ["generate", path, "hello"]):
        result = cli(*command)
        assert result.code == 1, result.stderr
        assert len(result.error_lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert re.search(pattern, result.error_lines[0])
