"""End-to-end CPU speed of one model in several forms: prefill time and decode tokens/s.

Usage: python bench/e2e_cpu.py fp32=PATH native=PATH w4a8=PATH [--prefill 512] [--decode 64]
Prints a markdown table (ratios against the first model, all measured in this run)
and writes it with the machine and date to --out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fptq_onnx.runtime import OnnxCausalLM


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


class Runner:
    """One model's session and prompt; `once()` measures one prefill and `decode` greedy steps."""

    def __init__(self, path: Path, threads: int, prefill: int, decode: int) -> None:
        self.lm = OnnxCausalLM(path, threads=threads)
        self.prompt = np.random.default_rng(0).integers(0, 1000, size=(1, prefill), dtype=np.int64)
        self.decode = decode
        self.lm.forward(self.prompt[:, :16], self.lm.empty_past(1))  # warm-up: session init, weight pre-packing
        self.prefill_s: list[float] = []
        self.decode_tps: list[float] = []

    def once(self) -> None:
        start = time.perf_counter()
        logits, past = self.lm.forward(self.prompt, self.lm.empty_past(1))
        self.prefill_s.append(time.perf_counter() - start)
        token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        start = time.perf_counter()
        for _ in range(self.decode):
            logits, past = self.lm.forward(token, past)
            token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        self.decode_tps.append(self.decode / (time.perf_counter() - start))

    def result(self) -> dict:
        return {"prefill_ms": 1000 * statistics.median(self.prefill_s), "decode_tps": statistics.median(self.decode_tps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", help="LABEL=PATH; the first is the baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/e2e_cpu.md"))
    args = parser.parse_args()
    runners = {}
    for item in args.models:
        label, _, path = item.partition("=")
        runners[label] = (Path(path), Runner(Path(path), args.threads, args.prefill, args.decode))
    for _ in range(args.repeats):  # the models take turns, so load changes hit them alike
        for _, runner in runners.values():
            runner.once()
    rows = []
    for label, (path, runner) in runners.items():
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
        rows.append((label, size / 2**20, runner.result()))
        print(f"{label}: {runner.result()}", flush=True)
    base = rows[0][2]
    lines = [
        f"# End-to-end CPU speed ({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        f"Machine: {cpu_name()}, {args.threads} ORT intra-op threads; onnxruntime {ort.__version__}.",
        f"Prefill: one {args.prefill}-token prompt; decode: {args.decode} greedy steps with the KV cache; "
        f"median of {args.repeats} runs, the models taking turns; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work on the machine inflates times).",
        f"Command: `python bench/e2e_cpu.py {' '.join(args.models)}`",
        "",
        "| model | size MB | prefill ms | prefill speed-up | decode tok/s | decode speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, size, r in rows:
        lines.append(
            f"| {label} | {size:.0f} | {r['prefill_ms']:.0f} | {base['prefill_ms'] / r['prefill_ms']:.2f}x | "
            f"{r['decode_tps']:.1f} | {r['decode_tps'] / base['decode_tps']:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(table)


if __name__ == "__main__":
    main()
