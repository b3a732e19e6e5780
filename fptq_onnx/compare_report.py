"""`compare`'s outputs: results.json, the comparison table (markdown) and chart, each written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from fptq_onnx.compare_specs import FLOAT_METHOD

RESULTS_FILE = "results.json"
TABLE_FILE = "comparison.md"
PLOT_FILE = "comparison.png"

ACT_NAMES = {
    "none": "float (A16)",
    "static": "int8 per-tensor static",
    "per_token": "int8 per-token",
    "per_block": "int8 per-block (ORT acc4)",
}


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
    from fptq_onnx.evaluation import is_perplexity_task

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
        f"Evaluated through ONNX Runtime on {_where(ev.get('provider', 'cpu'))} ({ev.get('threads') or 'default'} "
        f"threads); perplexity windows of "
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


def _where(provider: str) -> str:
    if provider == "cuda":
        return "the CUDA EP (quantized models through float-op copies with the CPU EP's arithmetic)"
    return "the CPU EP"


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


def write_outputs(report: dict, out_dir: Path) -> None:
    write_atomic(out_dir / RESULTS_FILE, json.dumps(report, indent=2))
    write_atomic(out_dir / TABLE_FILE, render_table(report))
    tmp = out_dir / f".{PLOT_FILE}.tmp.png"
    plot_comparison(report, tmp)
    os.replace(tmp, out_dir / PLOT_FILE)


def summary_line(entry: dict, tasks: list[str]) -> str:
    parts = []
    for task, key, title in table_columns(tasks):
        parts.append(f"{title} {_fmt(_metric(entry, task, key), key)}")
    return f"{entry['describe']['scheme']}, {entry['size_bytes'] / 1e6:.1f} MB: " + ", ".join(parts)
