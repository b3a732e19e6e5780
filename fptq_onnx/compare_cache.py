"""`compare`'s resume: a model whose manifest matches the request is reused, and its scores when the
evaluation settings and the model's size match too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fptq_onnx.calibration import CalibrationConfig
from fptq_onnx.compare_report import RESULTS_FILE
from fptq_onnx.compare_specs import MethodSpec
from fptq_onnx.report import say


def _jsonable(obj):
    from fptq_onnx.plan import to_json

    return json.loads(to_json(obj))


def manifest_matches(manifest: dict, spec: MethodSpec, config, fmt: str, calibration: CalibrationConfig) -> bool:
    wanted_calib = calibration.describe()
    return (
        manifest.get("method") == spec.name
        and manifest.get("format") == fmt
        and manifest.get("config") == _jsonable(dataclasses.asdict(config))
        and {k: manifest.get("calibration", {}).get(k) for k in wanted_calib} == wanted_calib
    )


def read_previous(out_dir: Path) -> dict:
    path = out_dir / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("methods", {})
    except (json.JSONDecodeError, AttributeError):
        say(f"  ignoring unreadable {path}")
        return {}


def read_manifest(path: Path) -> dict | None:
    from fptq_onnx.plan import manifest_path

    mpath = manifest_path(path)
    if not mpath.is_file():
        return None
    try:
        return json.loads(mpath.read_text())
    except json.JSONDecodeError:
        return None


def cached_scores(previous: dict, label: str, spec: MethodSpec, eval_key: dict, size: int) -> dict[str, dict]:
    """The earlier run's scores for this row that still hold, by task (same settings, same model size).

    Task by task, so a run that adds a task (say mmlu@5shot beside mmlu) scores only the new one.
    """
    cached = previous.get(label)
    if not (cached and cached.get("results") and not cached.get("error") and cached.get("size_bytes") == size
            and cached.get("spec") == spec.text):
        return {}
    settings = {k: v for k, v in eval_key.items() if k != "tasks"}
    if {k: v for k, v in (cached.get("eval") or {}).items() if k != "tasks"} != settings:
        return {}
    return {task: cached["results"][task] for task in eval_key["tasks"] if task in cached["results"]}
