"""Calibration text is never evaluation text: the default source, what manifests record, the checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fptq_onnx import leakage
from fptq_onnx.calibration import Calibration, CalibrationConfig, calibration_tokens, resolve_source, text_path
from fptq_onnx.errors import FptqError

C4_ROWS = [{"text": f"document {i}: the quick brown fox jumps over the lazy dog"} for i in range(40)]
WIKI = "one two three four five six seven eight nine ten\n" * 40


@pytest.fixture()
def data(tmp_path) -> Path:
    (tmp_path / "c4-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in C4_ROWS))
    (tmp_path / "wikitext-2-raw-test.txt").write_text(WIKI)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    return tmp_path


def _tokens(config: CalibrationConfig) -> torch.Tensor:
    from conftest import tiny_tokenizer

    return calibration_tokens(config, tiny_tokenizer(), vocab_size=128)


def test_auto_is_c4_when_the_data_dir_has_it(data, tmp_path_factory):
    assert resolve_source(CalibrationConfig(data_dir=str(data))).source == "c4"
    empty = tmp_path_factory.mktemp("empty")
    assert resolve_source(CalibrationConfig(data_dir=str(empty))).source == "random"
    (empty / "wikitext-2-raw-test.txt").write_text(WIKI)  # evaluation text is never picked by 'auto'
    assert resolve_source(CalibrationConfig(data_dir=str(empty))).source == "random"


def test_manifest_record_names_the_text_and_its_hash(data, capsys):
    config = resolve_source(CalibrationConfig(samples=2, seqlen=8, data_dir=str(data)))
    record = Calibration(_tokens(config), {}, config).describe()
    assert record["source"] == "c4" and record["file"] == "c4-train.jsonl"
    assert record["sha256"] == leakage.sha256(data / "c4-train.jsonl") and record["overlaps_eval"] is False
    assert "warning" not in capsys.readouterr().err


def test_wikitext2_calibration_warns_and_is_recorded_as_overlapping(data, capsys):
    config = CalibrationConfig(source="wikitext2", samples=2, seqlen=8, data_dir=str(data))
    record = Calibration(_tokens(config), {}, config).describe()
    assert record["overlaps_eval"] is True
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "evaluation text" in warnings[0]


def test_evaluation_files_are_recognised_by_name_folder_and_content(data, tmp_path_factory, monkeypatch):
    assert leakage.is_evaluation_text(data / "wikitext-2-raw-test.txt")
    assert leakage.is_evaluation_text(data / "tasks" / "piqa.jsonl")
    assert not leakage.is_evaluation_text(data / "c4-train.jsonl")
    renamed = tmp_path_factory.mktemp("user") / "my_text.txt"
    shutil.copy(data / "wikitext-2-raw-test.txt", renamed)
    monkeypatch.setenv("FPTQ_DATA_DIR", str(data))
    assert leakage.is_evaluation_text(renamed)


def test_check_corpora_refuses_the_calibration_text_unless_allowed(data):
    config = CalibrationConfig(source="wikitext2", samples=2, seqlen=8, data_dir=str(data))
    record = Calibration(_tokens(config), {}, config).describe()
    corpora = {"wikitext2": data / "wikitext-2-raw-test.txt", "c4.jsonl": data / "c4-train.jsonl"}
    with pytest.raises(FptqError, match="calibrated on that text.*--allow-calibration-overlap"):
        leakage.check_corpora(record, corpora, allow=False)
    assert leakage.check_corpora(record, corpora, allow=True) == ["wikitext2"]
    assert leakage.check_corpora(None, corpora, allow=False) == []  # a float model has no calibration
    assert leakage.check_corpora({**record, "sha256": "0" * 64}, corpora, allow=False) == []


def test_unknown_source_is_one_clear_error(data):
    with pytest.raises(FptqError, match="neither 'c4', 'wikitext2', 'random' nor an existing"):
        text_path(CalibrationConfig(source="nope", data_dir=str(data)))


# --------------------------------------------------------------------------- the real texts


def _spans(ids: np.ndarray, width: int) -> set[bytes]:
    """Every `width`-token span of a 1-D id array, as bytes (hashable)."""
    raw = np.ascontiguousarray(ids.astype(np.int32))
    view = np.lib.stride_tricks.sliding_window_view(raw, width)
    return {row.tobytes() for row in view}


@pytest.mark.slow
def test_default_calibration_shares_no_64_token_span_with_evaluation_windows(data_dir, smollm2_dir):
    """The default calibration windows vs WikiText-2 test (all 2048-windows) and C4 validation (GPTQ protocol)."""
    from transformers import AutoTokenizer

    from fptq_onnx.evaluation.data import read_text_rows

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = resolve_source(CalibrationConfig(data_dir=str(data_dir)))
    assert config.source == "c4"
    calib = calibration_tokens(config, tokenizer, tokenizer.vocab_size).numpy()
    calib_spans = set().union(*(_spans(window, 64) for window in calib))

    def windows(text: str, count: int | None) -> np.ndarray:
        ids = np.array(tokenizer(text, add_special_tokens=False)["input_ids"])
        n = len(ids) // 2048 if count is None else min(count, len(ids) // 2048)
        return ids[: n * 2048]

    wikitext = windows("\n\n".join(read_text_rows(data_dir / "wikitext-2-raw-test.txt")), None)
    c4 = windows(" ".join(read_text_rows(data_dir / "c4-validation.jsonl")), 256)
    assert len(wikitext) > 100_000 and len(c4) > 100_000
    for name, ids in (("wikitext2", wikitext), ("c4 validation", c4)):
        shared = calib_spans & _spans(ids, 64)
        assert not shared, f"{len(shared)} calibration spans of 64 tokens also occur in {name}"


# --------------------------------------------------------------------------- eval and compare refuse leaked scores


@pytest.fixture(scope="module")
def calibrated_on_corpus(cli, tiny_checkpoint, structure_cache, tmp_path_factory):
    """A tiny model converted with the default calibration from a data dir, and the text it read."""
    from conftest import cached_graph_structure

    from fptq_onnx import convert

    root = tmp_path_factory.mktemp("leak")
    corpus = root / "c4-train.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in WIKI.splitlines()))
    out = root / "tiny.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert, "graph_structure", cached_graph_structure(structure_cache))
        result = cli("convert", tiny_checkpoint, out, "--format", "qdq", "--data-dir", root, "--calib-samples", "2",
                     "--calib-seqlen", "8", "--group-size", "16", "--ppl-windows", "0", "--no-verify")
    assert result.code == 0, result.stderr
    return out, corpus


def test_default_convert_records_c4(calibrated_on_corpus):
    out, corpus = calibrated_on_corpus
    manifest = json.loads(out.with_name("tiny.manifest.json").read_text())
    assert manifest["calibration"]["source"] == "c4" and manifest["calibration_overlaps_eval"] is False
    assert manifest["calibration"]["sha256"] == leakage.sha256(corpus)


def test_eval_refuses_perplexity_on_the_calibration_text(cli, calibrated_on_corpus):
    out, corpus = calibrated_on_corpus
    refused = cli("eval", out, "--task", corpus, "--seqlen", "8", "--limit", "1")
    assert refused.code == 1 and len(refused.error_lines) == 1
    assert "calibrated on that text" in refused.error_lines[0] and "Traceback" not in refused.stderr
    allowed = cli("eval", out, "--task", corpus, "--seqlen", "8", "--limit", "1", "--allow-calibration-overlap")
    assert allowed.code == 0, allowed.stderr
    assert json.loads(allowed.stdout)["calibration_overlap"] == [str(corpus)]


def test_eval_of_other_text_is_not_marked(cli, calibrated_on_corpus, tmp_path):
    out, _ = calibrated_on_corpus
    other = tmp_path / "other.txt"
    other.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    result = cli("eval", out, "--task", other, "--seqlen", "8", "--limit", "1")
    assert result.code == 0, result.stderr
    assert "calibration_overlap" not in json.loads(result.stdout)


def test_compare_refuses_before_any_work_and_marks_when_allowed(data, tmp_path):
    from fptq_onnx.compare import compare_command
    from fptq_onnx.compare_report import render_table
    from fptq_onnx.compare_specs import check_overlap as _check_overlap
    from fptq_onnx.compare_specs import parse_method

    calibration = CalibrationConfig(source="wikitext2", samples=2, seqlen=8, data_dir=str(data))
    with pytest.raises(FptqError, match="refusing to score perplexity on wikitext2"):
        compare_command(str(tmp_path / "no-model"), ["fp32", "rtn"], ["wikitext2"], tmp_path / "out",
                        data_dir=str(data), calibration=calibration)
    rows = [(parse_method("rtn"), None, None)]
    assert _check_overlap(calibration, rows, ["wikitext2", "piqa"], str(data), allow=True) == ["wikitext2"]
    report = {"model": "m", "tasks": ["wikitext2"], "eval": {"seqlen": 8, "limit": 1}, "methods": {},
              "calibration": calibration.describe(), "calibration_overlap": ["wikitext2"]}
    assert "wikitext2 scored on the calibration text: optimistic" in render_table(report)
