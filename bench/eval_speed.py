"""Evaluation speed: items/s of multiple-choice tasks, choices batched over a shared KV-cache prefix vs one call per choice.

Usage:
    FPTQ_DATA_DIR=../shared/data python bench/eval_speed.py MODEL.onnx --tasks piqa,arc_easy,mmlu \\
        --limit 40 --subject-limit 1 --out bench/eval_speed_cpu.md

"unbatched" is the harness's plain-scorer path: one ORT prefill per (context, choice) request, the
scoring every task used before batching. "batched" gives the harness the model itself
(`OnnxCausalLM`, a KV-cache model): each item's longest common prefix runs once, the choices'
remaining tokens run as one right-padded batch on top of it. Both score the same items in the same
run, each twice in the order unbatched, batched, batched, unbatched (`--repeats 2`; the machine is
shared: drifting load hits both alike; items/s over both runs) or once each (`--repeats 1`), and the
table shows that their metrics agree. `--limit` is items per task, `--subject-limit` MMLU's
questions per subject (57 subjects).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fptq_onnx.evaluation import evaluate
from fptq_onnx.evaluation_cli import model_max_length
from fptq_onnx.loading import load_onnx_tokenizer
from fptq_onnx.runtime import OnnxCausalLM

METRIC_KEYS = ("acc", "acc_norm", "acc_macro")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    isa = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_int8") if f in flags)
    return f"{name} ({isa}), {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--tasks", default="piqa,arc_easy,mmlu")
    parser.add_argument("--limit", type=int, default=40, help="items per task")
    parser.add_argument("--subject-limit", type=int, default=1, help="MMLU questions per subject")
    parser.add_argument("--repeats", type=int, choices=(1, 2), default=2, help="2: unbatched, batched, batched, unbatched")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    lm = OnnxCausalLM(args.model, threads=args.threads or None, spin=False)
    tokenizer = load_onnx_tokenizer(args.model)
    max_length = model_max_length(args.model)

    def unbatched(ids: np.ndarray) -> np.ndarray:  # a plain Scorer: the harness scores one request per call
        return lm.logits(ids)

    rows = []
    for task in args.tasks.split(","):
        limit = args.subject_limit if task == "mmlu" else args.limit
        runs: dict[str, list[dict]] = {"unbatched": [], "batched": []}
        for label in ("unbatched", "batched", "batched", "unbatched")[: 2 * args.repeats]:  # ABBA: drifting load hits both alike
            model = unbatched if label == "unbatched" else lm
            runs[label].append(evaluate(model, tokenizer, [task], limit=limit, max_length=max_length,
                                        progress=False)[task])
        slow, fast = runs["unbatched"][0], runs["batched"][0]
        rate = {label: r[0]["n"] / sum(x["seconds"] for x in r) * len(r) for label, r in runs.items()}
        same = all(slow.get(k) == fast.get(k) for k in METRIC_KEYS)
        metric = ", ".join(f"{k} {fast[k]:.3f}" for k in METRIC_KEYS if k in fast)
        rows.append(f"| {task} | {fast['n']} | {rate['unbatched']:.2f} | {rate['batched']:.2f} | "
                    f"{rate['batched'] / rate['unbatched']:.2f}x | {metric} | {'yes' if same else 'NO'} |")
        print(rows[-1], flush=True)

    load = os.getloadavg()[0]
    text = "\n".join([
        f"# Evaluation speed: choices batched over a shared KV-cache prefix ({datetime.datetime.now():%Y-%m-%dT%H:%M})",
        "",
        f"Machine: {cpu_model()}; onnxruntime {ort.__version__}, {args.threads or 'default'} intra-op threads, "
        f"no spinning; load average {load:.1f} at the end (the machine is shared).",
        f"Model: `{args.model}`. Command: `FPTQ_DATA_DIR=../shared/data python bench/eval_speed.py {args.model} "
        f"--tasks {args.tasks} --limit {args.limit} --subject-limit {args.subject_limit} --repeats {args.repeats}`",
        "",
        "| task | items | unbatched items/s | batched items/s | speed-up | metrics (batched) | metrics equal |",
        "|---|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        "unbatched: one ORT prefill per (context, choice), as before batching; batched: the item's common prefix "
        "once, then its choices' remaining tokens as one right-padded batch on the cached prefix (MMLU's "
        "single-token answers need no second call). MMLU items: the first questions of every subject (0-shot).",
        "",
    ])
    print(text)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
