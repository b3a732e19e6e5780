"""`compare`: method specs, early errors, and an end-to-end run on a tiny checkpoint with made-up data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fptq_onnx.calibration import CalibrationConfig
from fptq_onnx.compare import compare_command
from fptq_onnx.compare_report import describe_manifest, render_table
from fptq_onnx.compare_specs import parse_method, split_methods
from fptq_onnx.errors import FptqError

CALIB = CalibrationConfig(source="random", samples=4, seqlen=32)
TEXT = (
    "the quick brown fox jumps over the lazy dog\n"
    "hello world , this is a tiny tokenizer for tests\n"
    "\n"
    "what is the capital of france ? paris is the capital\n"
    "one two three four five six seven eight nine ten\n"
)
LAMBADA = [
    {"context": "the quick brown fox jumps over the lazy", "continuation": "dog"},
    {"context": "what is the capital of france ? paris is the", "continuation": "capital"},
    {"context": "one two three four five six seven eight nine", "continuation": "ten"},
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2-raw-test.txt").write_text(TEXT * 8)
    (root / "tasks").mkdir()
    (root / "tasks" / "lambada_openai.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LAMBADA))
    return root


def test_parse_method():
    spec = parse_method("rtn:bits=8,act=per_token")
    assert (spec.name, spec.options, spec.label) == ("rtn", {"bits": "8", "act": "per_token"}, "rtn-bits8-actper_token")
    assert parse_method(" fptq ").label == "fptq" and parse_method("fp32").is_float
    assert parse_method("smoothquant:fold-pairs=true").options == {"fold_pairs": "true"}
    assert split_methods("fp32, rtn:bits=8,act=per_token,fptq,smoothquant:alpha=0.8") == [
        "fp32", "rtn:bits=8,act=per_token", "fptq", "smoothquant:alpha=0.8"]
    with pytest.raises(FptqError):
        split_methods("bits=8,rtn")
    for bad in ("rtn:bits", "fp32:x=1", ":bits=8"):
        with pytest.raises(FptqError):
            parse_method(bad)


@pytest.mark.parametrize("methods,tasks,message", [
    (["fp32", "nope"], ["wikitext2"], "unknown method 'nope'"),
    (["rtn:bitz=8"], ["wikitext2"], "bitz"),
    (["rtn:bits=3"], ["wikitext2"], "bits must be 4 or 8"),
    (["rtn", "rtn"], ["wikitext2"], "given twice"),
    (["fp32"], ["wikitext2", "squad"], "unknown task 'squad'"),
])
def test_bad_method_or_task_fails_before_any_work(tmp_path, tiny_data, methods, tasks, message):
    out = tmp_path / "out"
    with pytest.raises(FptqError, match=message):
        # the model path does not exist: an error about it would mean work started first
        compare_command(str(tmp_path / "no-model"), methods, tasks, out, data_dir=str(tiny_data))
    assert not out.exists()


def test_describe_manifest_float_and_mixed():
    assert describe_manifest(None)["scheme"] == "fp32"
    w = {"bits": 4, "group_size": 128, "per_channel": False, "symmetric": True, "shape_kn": [8, 8]}
    d = describe_manifest({"linears": {"a": {"act_mode": "static", "weight": w}, "b": {"act_mode": "per_token", "weight": w},
                                       "c": {"act_mode": "static", "weight": w}}})
    assert (d["scheme"], d["group"], d["symmetry"]) == ("W4A8", "128", "sym")
    assert d["activations"].startswith("mixed: per-tensor static 67%")


def test_compare_end_to_end_and_resume(tiny_checkpoint, tiny_data, tmp_path, capsys, fast_structure):
    out = tmp_path / "cmp"
    kwargs = dict(limit=2, seqlen=16, data_dir=str(tiny_data), calibration=CALIB, progress=False)
    table = compare_command(str(tiny_checkpoint), ["fp32", "rtn", "fptq"], ["wikitext2", "lambada"], out, **kwargs)
    assert table == out / "comparison.md"
    for name in ("results.json", "comparison.md", "comparison.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    for label in ("fp32", "rtn", "fptq"):
        assert (out / label / "model.onnx").is_file() and (out / label / "config.json").is_file()
    report = json.loads((out / "results.json").read_text())
    assert list(report["methods"]) == ["fp32", "rtn", "fptq"] and report["tasks"] == ["wikitext2", "lambada_openai"]
    for entry in report["methods"].values():
        assert "error" not in entry
        assert entry["results"]["wikitext2"]["n"] == 2 and entry["results"]["lambada_openai"]["n"] == 2
        assert entry["results"]["wikitext2"]["perplexity"] > 1 and entry["size_bytes"] > 0
    assert report["methods"]["rtn"]["describe"]["scheme"] == "W4A16"
    assert report["methods"]["fptq"]["describe"]["scheme"] == "W4A8"
    assert report["methods"]["rtn"]["size_bytes"] < report["methods"]["fp32"]["size_bytes"]

    text = table.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`fp32`", "`rtn`", "`fptq`"]
    assert "WikiText-2 ppl" in text and "LAMBADA acc" in text and "ppl / fp32" in text and "Size MB" in text
    assert rows[0].count("1.000") >= 1  # fp32's ratio to itself

    # A second run (say after a crash) reuses models and scores without even loading the torch model.
    capsys.readouterr()
    compare_command(str(tiny_checkpoint), ["fp32", "rtn", "fptq"], ["wikitext2", "lambada"], out, **kwargs)
    err = capsys.readouterr().err
    assert err.count("reusing the existing scores") == 3 and "loading weights" not in err
    assert json.loads((out / "results.json").read_text())["methods"]["rtn"]["results"] == report["methods"]["rtn"]["results"]
    # Different options (here a calibration change) make a model stale: it is rebuilt, not reused.
    capsys.readouterr()
    compare_command(str(tiny_checkpoint), ["rtn"], ["wikitext2"], out,
                    **{**kwargs, "calibration": CalibrationConfig(source="random", samples=2, seqlen=32)})
    err = capsys.readouterr().err
    assert "reusing the existing converted model" not in err and "walking the layers once for rtn" in err
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["rtn"]

def test_render_table_marks_failures():
    report = {"tasks": ["wikitext2"], "eval": {"seqlen": 16, "limit": 2, "item_limit": 2},
              "methods": {"gptq": {"spec": "gptq", "error": "boom"}}}
    assert "failed: boom" in render_table(report)


def test_bad_calibration_source_fails_before_any_work(tmp_path, tiny_data):
    with pytest.raises(FptqError, match="calibration source"):
        compare_command(str(tmp_path / "no-model"), ["fp32", "rtn"], ["wikitext2"], tmp_path / "out",
                        data_dir=str(tiny_data), calibration=CalibrationConfig(source=str(tmp_path / "missing.txt")))


def test_compare_cli(cli, tiny_checkpoint, tiny_data, tmp_path, fast_structure):
    out = tmp_path / "cli"
    result = cli("compare", tiny_checkpoint, "--out", out, "--methods", "fp32,rtn:bits=8,act=per_token",
                 "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16", "--calib", "random",
                 "--calib-samples", "2", "--calib-seqlen", "16", "--data-dir", tiny_data)
    assert result.code == 0, result.stderr
    assert "| `rtn:bits=8,act=per_token` |" in result.stdout and "WikiText-2 ppl" in result.stdout
    assert (out / "rtn-bits8-actper_token" / "model.onnx").is_file()
    bad = cli("compare", tiny_checkpoint, "--out", tmp_path / "bad", "--methods", "fp32,nope", "--data-dir", tiny_data)
    assert bad.code == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown method 'nope'")
