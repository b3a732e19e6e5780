"""`compare`: quantize one model with several methods and score every result through ONNX Runtime.

This module only orchestrates: specs are parsed and checked before any work
(compare_specs.py), rows whose model and scores still hold are reused
(compare_cache.py), every row still to build goes through ONE layer walk together
(layer_walk.py: the float forward and its statistics are shared, each method plans,
quantizes and fills its own graph per layer, streamed or in memory like `convert`),
then each model is evaluated and results.json, comparison.md and comparison.png are
rewritten after every row (compare_report.py), so an interrupted run resumes.
Every model lands in OUT/<label>/model.onnx (a full bundle, runnable with `fptq-onnx eval`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from types import SimpleNamespace

from fptq_onnx.calibration import CalibrationConfig, calibration_tokens
from fptq_onnx.compare_cache import _jsonable, cached_scores, manifest_matches, read_manifest, read_previous
from fptq_onnx.compare_report import PLOT_FILE, RESULTS_FILE, TABLE_FILE, describe_manifest, model_bytes, summary_line, write_outputs
from fptq_onnx.compare_specs import FLOAT_METHOD, check_calibration, check_methods, check_overlap, check_tasks, method_format
from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation import is_perplexity_task
from fptq_onnx.plan import QuantPlan
from fptq_onnx.report import say, step

MODEL_FILE = "model.onnx"

# The fp32 row as a method of the walk: plans nothing, so the graph keeps every float weight.
FLOAT_ROW = SimpleNamespace(__name__=FLOAT_METHOD,
                            plan_layer=lambda ctx, config: QuantPlan(FLOAT_METHOD, {}, ctx.calibration))


def score_model(path: Path, tasks: list[str], data_dir, seqlen: int, limit, item_limit, provider: str,
                threads: int | None, progress: bool) -> dict:
    """One row's scores through ORT on `provider`: perplexity tasks capped at `limit` windows, zero-shot tasks
    at `item_limit` items, task order kept. A top-level function, so that `--jobs` can run it in a process."""
    from fptq_onnx.ep_models import scoring_lm
    from fptq_onnx.evaluation import evaluate
    from fptq_onnx.evaluation_cli import model_max_length
    from fptq_onnx.loading import load_onnx_tokenizer

    lm = scoring_lm(path, provider, threads)
    tokenizer, max_length = load_onnx_tokenizer(path), model_max_length(path)
    results = {}
    for task in tasks:
        cap = limit if is_perplexity_task(task) else item_limit
        results.update(evaluate(lm, tokenizer, [task], data_dir=data_dir, seqlen=seqlen, limit=cap,
                                max_length=max_length, progress=progress))
    return results


def _score_in_worker(*args) -> dict:
    """score_model in a `--jobs` worker: a user error comes back as a value, so the other rows go on."""
    try:
        return {"results": score_model(*args)}
    except FptqError as exc:
        return {"error": str(exc)}


def build_models(model_arg, todo: list[dict], calibration: CalibrationConfig, verify: bool, allow_pickle: bool,
                 stream: bool | None, device, progress: bool) -> str:
    """Convert every row of `todo` in one layer walk; sets each row's 'manifest' or 'error'. Returns the model label."""
    from fptq_onnx.conversion import Conversion, ParityReference, parity_text_ids, write_manifests
    from fptq_onnx.convert import ConvertOptions, graph_structure, open_source
    from fptq_onnx.devices import resolve_device
    from fptq_onnx.layer_walk import MethodRun, walk
    from fptq_onnx.memory import should_stream
    from fptq_onnx.saving import staged_outputs, write_sidecars

    device = resolve_device(device)
    options = ConvertOptions(calibration=calibration, allow_pickle=allow_pickle, formats=["qdq"])
    stream = stream if stream is not None else should_stream(model_arg, options, None)
    source = open_source(model_arg, stream, allow_pickle, calibration, 1, None)
    tokens = calibration_tokens(calibration, source.tokenizer, source.config.vocab_size)
    structure = graph_structure(source)
    with contextlib.ExitStack() as stack:
        runs = []
        for row in todo:
            row["path"].parent.mkdir(exist_ok=True)
            stage = stack.enter_context(staged_outputs(row["path"].parent))
            reference = ParityReference(source, parity_text_ids(source.tokenizer), [row["fmt"]]) if verify else None
            row["conversion"] = Conversion(structure, {row["fmt"]: row["path"]}, stage, reference)
            row["stage"] = stage
            module = FLOAT_ROW if row["spec"].is_float else row["module"]
            runs.append(MethodRun(module, row["config"], [row["conversion"]], keep_weights=False))
        del structure
        names = ", ".join(row["spec"].text for row in todo)
        with step(f"walking the layers once for {names} ({calibration.source} {tokens.shape[0]} x {tokens.shape[1]} "
                  f"tokens, {device})"):
            walk(source, runs, tokens, calibration, device, progress)
        for row, run in zip(todo, runs):
            conversion = row.pop("conversion")
            try:
                if run.error:
                    raise FptqError(run.error)
                conversion.save(run.plan)
                write_sidecars(source.skeleton, source.tokenizer, row["stage"], row["path"].parent)
                parity = conversion.check(source, 3.0, run.plan).get(row["fmt"])
                if not row["spec"].is_float:
                    row["manifest"] = write_manifests(run.plan, {row["fmt"]: row["path"]}, row["stage"], {row["fmt"]: {
                        "model": source.label, "architecture": source.spec.name, "device": str(device),
                        "streamed": stream, "parity": None if parity is None else parity.__dict__}})[row["fmt"]]
            except FptqError as exc:
                conversion.close()
                conversion.discard()
                row["error"] = str(exc)
            del row["stage"]
    return source.label


def compare_command(
    model_arg: str | None,
    methods: list[str],
    tasks: list[str],
    out_dir: Path,
    limit: int | None = None,
    seqlen: int = 2048,
    item_limit: int | None = None,
    data_dir: str | None = None,
    calibration: CalibrationConfig | None = None,
    force: bool = False,
    verify: bool = False,
    threads: int | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    stream: bool | None = None,
    device: str | None = None,
    allow_calibration_overlap: bool = False,
    provider: str = "cpu",
    jobs: int = 1,
) -> Path:
    """Convert `model_arg` with every method, evaluate each through ORT, write results; returns comparison.md.

    provider: the ORT execution provider that scores ('cpu' or 'cuda', same numbers: ep_models.py); jobs:
    rows scored at once, each in its own process (the intra-op threads split between them unless given).
    """
    from fptq_onnx.ep_models import PROVIDERS

    start = time.perf_counter()
    rows = check_methods(methods)
    task_names = check_tasks(tasks, data_dir)
    item_limit = limit if item_limit is None else item_limit
    for what, value in (("limit", limit), ("item limit", item_limit), ("jobs", jobs)):
        if value is not None and value < 1:
            raise FptqError(f"{what} must be >= 1, got {value}")
    if provider not in PROVIDERS:
        raise FptqError(f"unknown provider '{provider}'; known: {', '.join(PROVIDERS)}")
    calibration = calibration or CalibrationConfig()
    if calibration.data_dir is None and data_dir is not None:
        calibration = dataclasses.replace(calibration, data_dir=data_dir)
    calibration = check_calibration(calibration, rows)
    overlap = check_overlap(calibration, rows, task_names, data_dir, allow_calibration_overlap)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FptqError(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise FptqError(f"output directory is not writable: {out_dir}")
    if jobs > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)

    previous = {} if force else read_previous(out_dir)
    eval_key = {"tasks": task_names, "limit": limit, "item_limit": item_limit, "seqlen": seqlen, "provider": provider}
    report = {"model": model_arg or "smollm2-135m (default)", "tasks": task_names,
              "eval": {**eval_key, "threads": threads, "jobs": jobs},
              "calibration": calibration.describe(), "methods": {}}
    if overlap:
        report["calibration_overlap"] = overlap
    table = []
    for spec, module, config in rows:
        path = out_dir / spec.label / MODEL_FILE
        fmt = FLOAT_METHOD if spec.is_float else method_format(module)
        old = None if spec.is_float else read_manifest(path)
        reuse = not force and path.is_file() and (
            spec.is_float or (old is not None and manifest_matches(old, spec, config, fmt, calibration)))
        table.append({"spec": spec, "module": module, "config": config, "path": path, "fmt": fmt,
                      "manifest": old if reuse else None, "built": not reuse})
    todo = [row for row in table if row["built"]]
    if todo:
        report["model"] = build_models(model_arg, todo, calibration, verify, allow_pickle, stream, device, progress)
    entries = {row["spec"].label: _entry(row, previous, task_names, eval_key) for row in table}
    report["methods"] = entries
    to_score = [row for row in table if "error" not in entries[row["spec"].label]
                and entries[row["spec"].label]["missing"]]
    settings = (data_dir, seqlen, limit, item_limit, provider, threads)
    parallel = jobs > 1 and len(to_score) > 1
    for i, row in enumerate(table, 1):
        entry = entries[row["spec"].label]
        _say_row(i, len(table), row, entry)
        if "error" in entry:
            say(f"  {row['spec'].label} FAILED: {entry['error']}")
            continue
        if not entry["missing"]:
            _finish(entry, {"results": {}}, task_names, 0.0)
        if parallel or row not in to_score:
            continue
        method_start = time.perf_counter()
        with step(f"evaluating {row['spec'].label} through ONNX Runtime ({', '.join(entry['missing'])}) "
                  f"on the {provider} EP"):
            try:
                outcome = {"results": score_model(row["path"], entry["missing"], *settings, progress)}
            except FptqError as exc:
                outcome = {"error": str(exc)}
        _finish(entry, outcome, task_names, time.perf_counter() - method_start)
        write_outputs(report, out_dir)
    if parallel:
        _score_in_processes(to_score, entries, settings, jobs, report, out_dir, task_names)
    for entry in entries.values():
        entry.pop("missing", None)
        entry.setdefault("seconds", 0.0)
    write_outputs(report, out_dir)
    say(f"compared {len(table)} methods in {time.perf_counter() - start:.0f} s; wrote {out_dir / RESULTS_FILE}, "
        f"{TABLE_FILE}, {PLOT_FILE}")
    return out_dir / TABLE_FILE


def _entry(row: dict, previous: dict, task_names: list[str], eval_key: dict) -> dict:
    """A row's report entry before scoring: what it is, its reusable scores, and the tasks still to score."""
    spec, path = row["spec"], row["path"]
    entry: dict = {"spec": spec.text, "method": spec.name, "options": spec.options, "format": row["fmt"],
                   "path": str(path),
                   "config": None if row["config"] is None else _jsonable(dataclasses.asdict(row["config"]))}
    if row.get("error"):
        entry["error"] = row["error"]
        return entry
    manifest = row["manifest"]
    entry["describe"] = describe_manifest(manifest)
    entry["size_bytes"] = model_bytes(path)
    if manifest is not None and manifest.get("parity"):
        entry["parity"] = manifest["parity"]
    cached = {} if row["built"] else cached_scores(previous, spec.label, spec, eval_key, entry["size_bytes"])
    entry["results"] = cached
    entry["eval"] = eval_key
    entry["missing"] = [task for task in task_names if task not in cached]
    return entry


def _say_row(i: int, n: int, row: dict, entry: dict) -> None:
    """The row's progress line: what is built or reused, and which scores are reused."""
    say(f"[{i}/{n}] {row['spec'].text} -> {row['path']} ({row['fmt']})"
        + ("" if row["built"] else ", reusing the existing " + (
            "float export" if row["spec"].is_float else "converted model (manifest matches)")))
    if entry.get("results"):
        say(f"  {row['spec'].label}: reusing the existing scores ({', '.join(entry['results'])})")


def _finish(entry: dict, outcome: dict, task_names: list[str], seconds: float) -> None:
    """Merge a scoring outcome into the entry and say its summary line (or its error)."""
    entry["seconds"] = round(seconds, 1)
    if "error" in outcome:
        # One broken method must not cost the others' hours: record it and go on.
        say(f"  {entry['spec']} FAILED: {outcome['error']}")
        entry["error"] = outcome["error"]
        return
    entry["results"] = {task: entry["results"].get(task) or outcome["results"][task] for task in task_names}
    entry["eval_seconds"] = round(sum(result["seconds"] for result in entry["results"].values()), 1)
    entry.pop("missing", None)
    say(f"  {entry['spec']}: " + summary_line(entry, task_names))


def _score_in_processes(rows: list[dict], entries: dict, settings: tuple, jobs: int, report: dict, out_dir: Path,
                        task_names: list[str]) -> None:
    """Score rows `jobs` at a time, each in a fresh process (spawned: no forked ORT or torch state)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    say(f"scoring {len(rows)} models, {jobs} at a time, on {settings[4]} ({settings[5]} threads each)")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_score_in_worker, row["path"], entries[row["spec"].label]["missing"], *settings, False):
                   row["spec"].label for row in rows}
        for future in as_completed(futures):
            _finish(entries[futures[future]], future.result(), task_names, time.perf_counter() - started)
            write_outputs(report, out_dir)
