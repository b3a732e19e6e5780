"""Calibration text must never be evaluation text.

Methods that fit to their calibration data (GPTQ, AWQ, the auto policy's error
search, clip searches) score better on that very text than on text they never
saw, so a perplexity measured on it is optimistic. Published baselines calibrate
on C4 train and evaluate on WikiText-2 test and C4 validation. Here a calibration
records which file it read (name + SHA-256, in the manifest), and `eval` and
`compare` refuse a perplexity on a corpus with the same content unless the user
overrides it, which then marks the result.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from fptq_onnx.errors import FptqError

# Files of the data dir that are evaluated (besides everything under tasks/).
EVALUATION_FILES = ("wikitext-2-raw-test.txt", "c4-validation.jsonl")
TASKS_DIR = "tasks"
OVERRIDE_FLAG = "--allow-calibration-overlap"


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    """Content hash of a corpus file (cached per path, size and mtime)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def corpus_identity(path: Path) -> dict[str, str]:
    """What a manifest records of the calibration text: its file name and content hash."""
    return {"file": Path(path).name, "sha256": sha256(path)}


def _evaluation_hashes() -> set[str]:
    """Hashes of the evaluation files of $FPTQ_DATA_DIR, so a renamed copy is still recognised."""
    root = os.environ.get("FPTQ_DATA_DIR")
    if not root or not Path(root).is_dir():
        return set()
    files = [Path(root) / name for name in EVALUATION_FILES]
    files += sorted((Path(root) / TASKS_DIR).glob("*.jsonl"))
    return {sha256(f) for f in files if f.is_file()}


def is_evaluation_text(path: Path) -> bool:
    """True for WikiText-2 test, C4 validation, task files, and files with their content."""
    path = Path(path)
    if path.name in EVALUATION_FILES or path.resolve().parent.name == TASKS_DIR:
        return True
    return sha256(path) in _evaluation_hashes()


def calibrated_on(calibration: dict, corpus: Path) -> bool:
    """Did the calibration recorded in a manifest read exactly this corpus?"""
    recorded = calibration.get("sha256")
    return recorded is not None and recorded == sha256(corpus)


def perplexity_corpora(tasks: list[str], data_dir: str | None) -> dict[str, Path]:
    """The corpus file of every perplexity task among `tasks` (the evaluation registry resolves them)."""
    from fptq_onnx.evaluation.registry import canonical_name, resolve_task

    corpora = {}
    for task in dict.fromkeys(canonical_name(t) for t in tasks):
        spec, path = resolve_task(task, data_dir)
        if spec.schema.is_perplexity:
            corpora[task] = path
    return corpora


def model_calibration(onnx_path: Path) -> dict | None:
    """The calibration record of a converted model's manifest; None for a float export (no manifest)."""
    from fptq_onnx.plan import manifest_path, read_manifest

    return read_manifest(onnx_path).get("calibration") if manifest_path(Path(onnx_path)).is_file() else None


def check_corpora(calibration: dict | None, corpora: dict[str, Path], allow: bool) -> list[str]:
    """The perplexity tasks whose corpus is the calibration text; an error unless `allow`.

    `calibration` is a manifest's calibration record (None for a float model).
    """
    if not calibration:
        return []
    overlapping = [task for task, path in corpora.items() if calibrated_on(calibration, path)]
    if overlapping and not allow:
        raise FptqError(
            f"refusing to score perplexity on {', '.join(overlapping)}: the model was calibrated on that text "
            f"({calibration.get('file')}); recalibrate with --calib c4, or pass {OVERRIDE_FLAG} to report it marked"
        )
    return overlapping

