"""`fptq-onnx eval` / `compare` end to end on tiny models: MMLU (k-shot), C4 options, a local task file, a bad one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TOKENIZER_TEXTS, tiny_tokenizer


@pytest.fixture
def tiny_bundle(tiny_onnx, tmp_path: Path) -> Path:
    """The tiny llama export with a tokenizer beside it, as `export` writes a bundle."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in Path(tiny_onnx["llama"]).parent.iterdir():
        shutil.copy(f, model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return model_dir / "model.onnx"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def mmlu_rows() -> list[dict]:
    return [{"subject": s, "question": f"what is {w} ?", "choices": ["one", "two", "three", "four"], "answer": i % 4}
            for s in ("world", "tests") for i, w in enumerate(["the fox", "paris", "the dog"])]


def test_eval_mmlu_fewshot_and_c4_windows(tiny_bundle: Path, tmp_path: Path, cli) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "c4-validation.jsonl", [{"text": t} for t in TOKENIZER_TEXTS] * 4)
    write_jsonl(data / "tasks" / "mmlu.jsonl", mmlu_rows())
    out = tmp_path / "eval.json"
    res = cli("eval", tiny_bundle, "--task", "mmlu,c4", "--data-dir", data, "--num-fewshot", "1",
              "--seqlen", "8", "--windows", "2", "--json", out)
    assert res.code == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["num_fewshot"] == 1 and report["windows"] == 2
    mmlu, c4 = report["results"]["mmlu"], report["results"]["c4"]
    assert mmlu["n"] == 4 and set(mmlu["subjects"]) == {"world", "tests"} and mmlu["items_per_s"] > 0
    assert c4["n"] == 2 and c4["tokens"] == 2 * 7 and c4["windows_per_s"] > 0


def test_eval_file_of_no_known_schema_is_one_error_line(tiny_bundle: Path, tmp_path: Path, cli) -> None:
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "the fox", "label": 1}])
    res = cli("eval", tiny_bundle, "--task", odd)
    assert res.code == 1 and len(res.error_lines) == 1 and "Traceback" not in res.stderr
    assert "fit no known task schema" in res.error_lines[0]


def test_compare_scores_mmlu_c4_and_a_local_choice_file(tiny_checkpoint: Path, tmp_path: Path, cli) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "c4-validation.jsonl", [{"text": t} for t in TOKENIZER_TEXTS] * 4)
    write_jsonl(data / "tasks" / "mmlu.jsonl", mmlu_rows())
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"query": "the quick", "choices": ["fox", "dog"], "gold": 0}] * 3)
    out = tmp_path / "cmp"
    res = cli("compare", tiny_checkpoint, "--out", out, "--methods", "fp32", "--tasks", f"mmlu,c4,{mine}",
              "--limit", "2", "--item-limit", "1", "--seqlen", "8", "--calib", "random", "--data-dir", data)
    assert res.code == 0, res.stderr
    assert "| MMLU acc | C4 ppl | ppl / fp32 | mine.jsonl acc | mine.jsonl acc_norm |" in res.stdout
    results = json.loads((out / "results.json").read_text())["methods"]["fp32"]["results"]
    assert results["mmlu"]["n"] == 2 and results["c4"]["n"] == 2 and results[str(mine)]["n"] == 1


def test_compare_mmlu_5shot_beside_0shot_cached_per_task(tiny_checkpoint: Path, tmp_path: Path, cli) -> None:
    """mmlu@5shot is a column and a cache entry of its own: added to a finished run, only it is scored."""
    data = tmp_path / "data"
    write_jsonl(data / "tasks" / "mmlu.jsonl", [
        {"subject": s, "question": f"what is {w} {i} ?", "choices": ["one", "two", "three", "four"], "answer": i % 4}
        for s in ("world", "tests") for i, w in enumerate(["the fox", "paris"] * 3)])
    out = tmp_path / "cmp"
    common = ("compare", tiny_checkpoint, "--out", out, "--methods", "fp32", "--item-limit", "1",
              "--calib", "random", "--data-dir", data)
    first = cli(*common, "--tasks", "mmlu")
    assert first.code == 0, first.stderr
    res = cli(*common, "--tasks", "mmlu,mmlu@5shot")
    assert res.code == 0, res.stderr
    assert "| MMLU acc | MMLU 5-shot acc |" in res.stdout
    assert "reusing the existing scores (mmlu)" in res.stderr and "ONNX Runtime (mmlu@5shot)" in res.stderr
    results = json.loads((out / "results.json").read_text())["methods"]["fp32"]["results"]
    assert (results["mmlu"]["num_fewshot"], results["mmlu@5shot"]["num_fewshot"]) == (0, 5)
    assert results["mmlu"]["n"] == results["mmlu@5shot"]["n"] == 2  # one per subject (--item-limit 1)
    bad = cli(*common, "--tasks", "mmlu,piqa@5shot")
    assert bad.code == 1 and len(bad.error_lines) == 1 and "Traceback" not in bad.stderr
    assert bad.error_lines[0].startswith("error: task 'piqa@5shot': @Kshot applies to MMLU-schema tasks")
