"""`compare`: quantize one model with several methods and score every result through ONNX Runtime.

Each method spec is `NAME[:key=value,...]` (`fp32`, `rtn:bits=8,act=per_token`,
`smoothquant:alpha=0.8`, `fptq`, ...). The model is loaded, calibrated and
exported to float ONNX once; each method then only plans and runs its graph
passes. Every model lands in OUT/<label>/model.onnx (a full bundle, runnable
with `fptq-onnx eval`), and after each method OUT/results.json,
OUT/comparison.md and OUT/comparison.png are rewritten, so an interrupted run
resumes: a model whose manifest matches the requested method, config and
calibration is reused, and its scores too when tasks, limit and seqlen match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from fptq_onnx import algorithms
from fptq_onnx.calibration import CalibrationConfig
from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation import is_perplexity_task
from fptq_onnx.report import say, step

FLOAT_METHOD = "fp32"
RESULTS_FILE = "results.json"
TABLE_FILE = "comparison.md"
PLOT_FILE = "comparison.png"
MODEL_FILE = "model.onnx"

ACT_NAMES = {
    "none": "float (A16)",
    "static": "int8 per-tensor static",
    "per_token": "int8 per-token",
    "per_block": "int8 per-block (ORT acc4)",
}


# --------------------------------------------------------------------------- method specs


@dataclass(frozen=True)
class MethodSpec:
    """One requested row: `name` (fp32 or an algorithm), its options, the directory label."""

    text: str
    name: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        opts = "-".join(f"{k}{_slug(v)}" for k, v in self.options.items())
        return f"{self.name}-{opts}"

    @property
    def is_float(self) -> bool:
        return self.name == FLOAT_METHOD


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_") or "_"


def parse_method(text: str) -> MethodSpec:
    """'rtn:bits=8,act=per_token' -> MethodSpec('rtn', {'bits': '8', 'act': 'per_token'})."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FptqError(f"method '{text}': options must be key=value, got '{item}'")
        options[key.strip().replace("-", "_")] = value.strip()
    if not name:
        raise FptqError(f"empty method name in '{text}'")
    if name == FLOAT_METHOD and options:
        raise FptqError(f"'{FLOAT_METHOD}' takes no options (got '{text}')")
    return MethodSpec(text.strip(), name, options)


def split_methods(text: str) -> list[str]:
    """'fp32,rtn:bits=8,act=per_token,fptq' -> ['fp32', 'rtn:bits=8,act=per_token', 'fptq'].

    A comma piece holding '=' but no ':' is one more option of the method before it
    (method names never contain '='), so one comma list can carry options.
    """
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece:
            if not out:
                raise FptqError(f"'{piece}' in '{text}' is an option without a method before it")
            out[-1] += ("," if ":" in out[-1] else ":") + piece
        else:
            out.append(piece)
    return out


def _check_methods(texts: list[str]) -> list[tuple[MethodSpec, object, object]]:
    """(spec, algorithm module, config) per method; every name and option checked before any work."""
    if not texts:
        raise FptqError(f"no methods given; known: {FLOAT_METHOD}, {', '.join(algorithms.ALGORITHMS)}")
    out, labels = [], set()
    for text in texts:
        spec = parse_method(text)
        if spec.is_float:
            module = config = None
        else:
            if spec.name not in algorithms.ALGORITHMS:
                raise FptqError(
                    f"unknown method '{spec.name}'; known: {FLOAT_METHOD}, {', '.join(algorithms.ALGORITHMS)}")
            module = algorithms.get(spec.name)
            try:
                config = algorithms.make_config(module, {}, spec.options)
            except FptqError as exc:
                raise FptqError(f"method '{spec.text}': {exc}") from None
            except (TypeError, ValueError) as exc:
                raise FptqError(f"method '{spec.text}': {exc}") from None
        if spec.label in labels:
            raise FptqError(f"method '{spec.text}' is given twice")
        labels.add(spec.label)
        out.append((spec, module, config))
    return out


def _check_tasks(tasks: list[str], data_dir) -> list[str]:
    from fptq_onnx.evaluation import known_tasks
    from fptq_onnx.evaluation.data import resolve_data_dir
    from fptq_onnx.evaluation.registry import canonical_name, resolve_task

    if not tasks:
        raise FptqError(f"no tasks given; known tasks: {', '.join(known_tasks())}")
    names = list(dict.fromkeys(canonical_name(task) for task in tasks))
    resolve_data_dir(data_dir)  # a missing data dir fails now, not after the first conversion
    for name in names:
        resolve_task(name, data_dir)  # so does a missing file or a local file of no known schema
    return names


def _check_calibration(calibration: CalibrationConfig, rows) -> CalibrationConfig:
    """'auto' resolved once (what manifests record); a source that cannot work fails now, not after the export."""
    from fptq_onnx.calibration import RANDOM_SOURCE, resolve_source, text_path

    calibration = resolve_source(calibration)
    if all(spec.is_float for spec, _, _ in rows) or calibration.source == RANDOM_SOURCE:
        return calibration
    text_path(calibration)
    return calibration


def _check_overlap(calibration: CalibrationConfig, rows, tasks: list[str], data_dir: str | None,
                   allow: bool) -> list[str]:
    """Perplexity tasks whose corpus is the calibration text: refused unless allowed (then marked)."""
    from fptq_onnx.calibration import RANDOM_SOURCE, text_path
    from fptq_onnx.leakage import check_corpora, corpus_identity, perplexity_corpora

    if all(spec.is_float for spec, _, _ in rows) or calibration.source == RANDOM_SOURCE:
        return []
    return check_corpora(corpus_identity(text_path(calibration)), perplexity_corpora(tasks, data_dir), allow)


def method_format(module) -> str:
    """The ONNX format a method is evaluated in: its FORMAT (ort-acc4: native), else qdq."""
    return getattr(module, "FORMAT", "qdq")


# --------------------------------------------------------------------------- the shared torch side


class _Shared:
    """Model, calibration and float export, each built on first use and then reused by every method."""

    def __init__(self, model_arg, calibration: CalibrationConfig, allow_pickle: bool, progress: bool) -> None:
        self.model_arg, self.calibration, self.allow_pickle, self.progress = model_arg, calibration, allow_pickle, progress
        self._loaded = self._calib = self._float = None
        self._fingerprint = None

    @property
    def loaded(self):
        if self._loaded is None:
            from fptq_onnx.pipeline import load

            self._loaded = load(self.model_arg, allow_pickle=self.allow_pickle)
            self._fingerprint = _fingerprint(self._loaded.model)
        return self._loaded

    @property
    def calib(self):
        if self._calib is None:
            from fptq_onnx.calibration import calibrate

            c = self.calibration
            with step(f"calibrating once for all methods ({c.source}, {c.samples} x {c.seqlen} tokens)"):
                self._calib = calibrate(self.loaded.model, self.loaded.spec, self.loaded.tokenizer, c, self.progress)
        return self._calib

    @property
    def float_model(self):
        if self._float is None:
            from fptq_onnx.export import export_float

            with step("exporting the float model to ONNX once"):
                self._float = export_float(self.loaded.model, self.loaded.spec)
        return self._float

    def check_unchanged(self, method: str) -> None:
        """Methods share one torch model: one that edits it in place would skew every later row."""
        if self._loaded is not None and _fingerprint(self._loaded.model) != self._fingerprint:
            raise FptqError(f"method '{method}' modified the shared torch model in place; later rows would be wrong")


def _fingerprint(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


# --------------------------------------------------------------------------- describing a row


def model_bytes(path: Path) -> int:
    """The model on disk: the .onnx file plus its external .data file (tokenizer etc. not counted)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def describe_manifest(manifest: dict | None) -> dict:
    """bits / group / symmetry / activation granularity of a plan's manifest (None: the float model)."""
    if manifest is None:
        return {"scheme": "fp32", "weights": "fp32", "group": "—", "symmetry": "—", "activations": "float"}
    linears = manifest.get("linears", {})
    weights = [lp["weight"] for lp in linears.values() if lp.get("weight")]
    bits = sorted({w["bits"] for w in weights})
    groups = sorted({"per-channel" if w["per_channel"] else str(w["group_size"]) for w in weights})
    syms = sorted({"sym" if w["symmetric"] else "asym" for w in weights})
    modes: dict[str, int] = {}
    for lp in linears.values():
        modes[lp["act_mode"]] = modes.get(lp["act_mode"], 0) + 1
    if len(modes) == 1:
        activations = ACT_NAMES.get(next(iter(modes)), next(iter(modes)))
    else:
        total = sum(modes.values())
        activations = "mixed: " + ", ".join(
            f"{ACT_NAMES.get(m, m).replace('int8 ', '')} {100 * n / total:.0f}%" for m, n in sorted(modes.items(), key=lambda kv: -kv[1]))
    a_bits = "16" if set(modes) <= {"none"} else "8" if "none" not in modes else "8/16"
    w_bits = "/".join(str(b) for b in bits) or "32"
    return {
        "scheme": f"W{w_bits}A{a_bits}",
        "weights": "/".join(f"int{b}" for b in bits) or "fp32",
        "group": "/".join(groups) or "—",
        "symmetry": "/".join(syms) or "—",
        "activations": activations,
        "equalizations": len(manifest.get("equalizations", [])),
    }


def _jsonable(obj):
    from fptq_onnx.plan import to_json

    return json.loads(to_json(obj))


def _manifest_matches(manifest: dict, spec: MethodSpec, config, fmt: str, calibration: CalibrationConfig) -> bool:
    wanted_calib = calibration.describe()
    return (
        manifest.get("method") == spec.name
        and manifest.get("format") == fmt
        and manifest.get("config") == _jsonable(dataclasses.asdict(config))
        and {k: manifest.get("calibration", {}).get(k) for k in wanted_calib} == wanted_calib
    )


# --------------------------------------------------------------------------- outputs


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def table_columns(tasks: list[str]) -> list[tuple[str, str, str]]:
    """(task, metric key, title) for every task, in the order run."""
    from fptq_onnx.evaluation import task_columns

    cols = []
    for task in tasks:
        for key, title in task_columns(task):
            cols.append((task, key, title))
    return cols


def _ppl_task(tasks: list[str]) -> str | None:
    return next((t for t in tasks if t == "wikitext2"), None) or next(
        (t for t in tasks if is_perplexity_task(t)), None)


def _metric(entry: dict, task: str, key: str) -> float | None:
    value = (entry.get("results") or {}).get(task, {}).get(key)
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if key == "perplexity" else f"{value:.3f}"


def render_table(report: dict) -> str:
    tasks = report["tasks"]
    cols = table_columns(tasks)
    ppl_task = _ppl_task(tasks)
    methods = report["methods"]
    base = methods.get(FLOAT_METHOD)
    base_ppl = _metric(base, ppl_task, "perplexity") if base and ppl_task else None
    head = ["Method", "Scheme", "Weights", "Group", "Sym", "Activations"]
    for task, key, title in cols:
        head.append(title)
        if ppl_task and task == ppl_task and key == "perplexity":
            head.append("ppl / fp32")
    head.append("Size MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, entry in methods.items():
        d = entry.get("describe") or {}
        row = [f"`{entry.get('spec', label)}`", d.get("scheme", "?"), d.get("weights", "?"), d.get("group", "?"),
               d.get("symmetry", "?"), d.get("activations", "?")]
        if entry.get("error"):
            row[1] = "failed: " + entry["error"].replace("|", "/")[:120]
        for task, key, _ in cols:
            value = _metric(entry, task, key)
            row.append(_fmt(value, key))
            if ppl_task and task == ppl_task and key == "perplexity":
                row.append("—" if value is None or not base_ppl else f"{value / base_ppl:.3f}")
        size = entry.get("size_bytes")
        row.append("—" if size is None else f"{size / 1e6:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    ev = report["eval"]
    cal = report.get("calibration", {})
    notes = [
        f"# Comparison: {report.get('model', '?')}",
        "",
        *lines,
        "",
        f"Evaluated through ONNX Runtime ({ev.get('threads') or 'default'} threads); perplexity windows of "
        f"{ev['seqlen']} tokens; at most {_cap(ev.get('limit'))} windows per perplexity task and "
        f"{_cap(ev.get('item_limit', ev.get('limit')))} items per zero-shot task "
        f"(n per task in {RESULTS_FILE}). Calibration: {cal.get('source')} {cal.get('samples')} x {cal.get('seqlen')} "
        "tokens, shared by every method"
        + (f" — **{', '.join(report['calibration_overlap'])} scored on the calibration text: optimistic**"
           if report.get("calibration_overlap") else "")
        + ". Size: model.onnx + model.onnx.data, MB = 10^6 bytes. "
        "Formats: qdq except ORT-native methods (ort-acc4: MatMulNBits accuracy_level 4).",
    ]
    return "\n".join(notes) + "\n"


def _cap(value) -> str:
    return "all" if value is None else str(value)


def plot_comparison(report: dict, path: Path) -> None:
    """One bar panel per metric (bars labelled with model size), plus model size itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {k: v for k, v in report["methods"].items() if not v.get("error") and v.get("size_bytes")}
    cols = [(t, k, title) for t, k, title in table_columns(report["tasks"])]
    panels = len(cols) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels + 1, 4.2), squeeze=False)
    labels = list(methods)
    sizes = [methods[m]["size_bytes"] / 1e6 for m in labels]
    ticks = [f"{m}\n{s:.0f} MB" for m, s in zip(labels, sizes)]
    colors = ["#7f7f7f" if m == FLOAT_METHOD else f"C{i % 10}" for i, m in enumerate(labels)]
    for ax, (task, key, title) in zip(axes[0], cols):
        values = [_metric(methods[m], task, key) for m in labels]
        ax.bar(range(len(labels)), [v if v is not None else 0 for v in values], color=colors)
        for i, v in enumerate(values):
            if v is not None:
                ax.text(i, v, _fmt(v, key), ha="center", va="bottom", fontsize=7)
        ax.set_title(title + (" (lower is better)" if key == "perplexity" else " (higher is better)"), fontsize=9)
        if key == "perplexity":
            finite = [v for v in values if v is not None]
            if finite and max(finite) > 3 * min(finite):
                ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), ticks, rotation=45, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[0, -1]
    ax.bar(range(len(labels)), sizes, color=colors)
    ax.set_title("model size on disk (MB)", fontsize=9)
    ax.set_xticks(range(len(labels)), ticks, rotation=45, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report.get('model', '')}: quality vs size per method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_outputs(report: dict, out_dir: Path) -> None:
    write_atomic(out_dir / RESULTS_FILE, json.dumps(report, indent=2))
    write_atomic(out_dir / TABLE_FILE, render_table(report))
    tmp = out_dir / f".{PLOT_FILE}.tmp.png"
    plot_comparison(report, tmp)
    os.replace(tmp, out_dir / PLOT_FILE)


def _read_previous(out_dir: Path) -> dict:
    path = out_dir / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("methods", {})
    except (json.JSONDecodeError, AttributeError):
        say(f"  ignoring unreadable {path}")
        return {}


# --------------------------------------------------------------------------- the command


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
    allow_calibration_overlap: bool = False,
) -> Path:
    """Convert `model_arg` with every method, evaluate each through ORT, write results; returns comparison.md."""
    from fptq_onnx.convert import ConvertOptions, write_format
    from fptq_onnx.evaluation import evaluate
    from fptq_onnx.evaluation_cli import model_max_length
    from fptq_onnx.loading import load_onnx_tokenizer
    from fptq_onnx.pipeline import write_bundle
    from fptq_onnx.runtime import OnnxCausalLM

    start = time.perf_counter()
    rows = _check_methods(methods)
    task_names = _check_tasks(tasks, data_dir)
    item_limit = limit if item_limit is None else item_limit
    for what, value in (("limit", limit), ("item limit", item_limit)):
        if value is not None and value < 1:
            raise FptqError(f"{what} must be >= 1, got {value}")
    calibration = calibration or CalibrationConfig()
    if calibration.data_dir is None and data_dir is not None:
        calibration = dataclasses.replace(calibration, data_dir=data_dir)
    calibration = _check_calibration(calibration, rows)
    overlap = _check_overlap(calibration, rows, task_names, data_dir, allow_calibration_overlap)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FptqError(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise FptqError(f"output directory is not writable: {out_dir}")

    previous = {} if force else _read_previous(out_dir)
    shared = _Shared(model_arg, calibration, allow_pickle, progress)
    eval_key = {"tasks": task_names, "limit": limit, "item_limit": item_limit, "seqlen": seqlen}
    report = {
        "model": model_arg or "smollm2-135m (default)",
        "tasks": task_names,
        "eval": {**eval_key, "threads": threads},
        "calibration": calibration.describe(),
        "methods": {},
    }
    if overlap:
        report["calibration_overlap"] = overlap
    convert_options = ConvertOptions(verify=verify, ppl_windows=0, data_dir=data_dir, calibration=calibration,
                                     force=True, allow_pickle=allow_pickle, progress=progress)
    for i, (spec, module, config) in enumerate(rows, 1):
        label = spec.label
        path = out_dir / label / MODEL_FILE
        fmt = "fp32" if spec.is_float else method_format(module)
        say(f"[{i}/{len(rows)}] {spec.text} -> {path} ({fmt})")
        entry: dict = {"spec": spec.text, "method": spec.name, "options": spec.options, "format": fmt,
                       "path": str(path), "config": None if config is None else _jsonable(dataclasses.asdict(config))}
        method_start = time.perf_counter()
        manifest = None
        built = False
        try:
            if spec.is_float:
                if force or not path.is_file():
                    path.parent.mkdir(exist_ok=True)
                    write_bundle(shared.float_model, path, shared.loaded,
                                 shared.loaded.model if verify else None, 1e-3 if verify else None)
                    built = True
                else:
                    say("  reusing the existing float export")
            else:
                old = _read_manifest(path)
                if not force and old is not None and path.is_file() and _manifest_matches(old, spec, config, fmt, calibration):
                    say("  reusing the existing converted model (manifest matches)")
                    manifest = old
                else:
                    path.parent.mkdir(exist_ok=True)
                    with step(f"planning ({spec.text})"):
                        plan = module.build_plan(shared.loaded.model, shared.loaded.spec, shared.calib, config)
                    shared.check_unchanged(spec.text)
                    say(f"  decisions: {plan.counts()}")
                    options = dataclasses.replace(convert_options, method=spec.name, formats=[fmt])
                    manifest = write_format(shared.float_model, plan, fmt, path, shared.loaded, options)
                    del plan
                    built = True
            entry["describe"] = describe_manifest(manifest)
            entry["size_bytes"] = model_bytes(path)
            if manifest is not None and manifest.get("parity"):
                entry["parity"] = manifest["parity"]
            cached = previous.get(label)
            if (not built and cached and cached.get("results") and not cached.get("error")
                    and cached.get("eval") == eval_key and cached.get("size_bytes") == entry["size_bytes"]
                    and cached.get("spec") == spec.text):
                say("  reusing the existing scores")
                entry["results"] = cached["results"]
                entry["eval_seconds"] = cached.get("eval_seconds")
            else:
                with step(f"evaluating {label} through ONNX Runtime ({', '.join(task_names)})"):
                    eval_start = time.perf_counter()
                    lm = OnnxCausalLM(path, threads=threads, spin=False)
                    entry["results"] = _evaluate(evaluate, lm, load_onnx_tokenizer(path), task_names, data_dir,
                                                 seqlen, limit, item_limit, model_max_length(path), progress)
                    del lm
                    entry["eval_seconds"] = round(time.perf_counter() - eval_start, 1)
            entry["eval"] = eval_key
            say("  " + _summary_line(entry, task_names))
        except FptqError as exc:
            # One broken method must not cost the others' hours: record it and go on.
            say(f"  FAILED: {exc}")
            entry["error"] = str(exc)
        entry["seconds"] = round(time.perf_counter() - method_start, 1)
        report["methods"][label] = entry
        if shared._loaded is not None:
            report["model"] = shared._loaded.source.label
        _write_outputs(report, out_dir)
    say(f"compared {len(rows)} methods in {time.perf_counter() - start:.0f} s; wrote {out_dir / RESULTS_FILE}, "
        f"{TABLE_FILE}, {PLOT_FILE}")
    return out_dir / TABLE_FILE


def _evaluate(evaluate, scorer, tokenizer, tasks, data_dir, seqlen, limit, item_limit, max_length, progress) -> dict:
    """Perplexity tasks capped at `limit` windows, zero-shot tasks at `item_limit` items; task order kept."""
    results = {}
    for task in tasks:
        cap = limit if is_perplexity_task(task) else item_limit
        results.update(evaluate(scorer, tokenizer, [task], data_dir=data_dir, seqlen=seqlen, limit=cap,
                                max_length=max_length, progress=progress))
    return results


def _read_manifest(path: Path) -> dict | None:
    from fptq_onnx.plan import manifest_path

    mpath = manifest_path(path)
    if not mpath.is_file():
        return None
    try:
        return json.loads(mpath.read_text())
    except json.JSONDecodeError:
        return None


def _summary_line(entry: dict, tasks: list[str]) -> str:
    parts = []
    for task, key, title in table_columns(tasks):
        parts.append(f"{title} {_fmt(_metric(entry, task, key), key)}")
    return f"{entry['describe']['scheme']}, {entry['size_bytes'] / 1e6:.1f} MB: " + ", ".join(parts)
