"""End-to-end CPU speed of one model in several forms: prefill time and decode tokens/s.

Usage: python bench/e2e_cpu.py fp32=PATH native=PATH w4a8=PATH [--prefill 512] [--decode 64]
Prints a markdown table (ratios against the first model, all measured in this run)
and writes it with the machine and date to --out.
"""

from __future__ import annotations

import argparse
import datetime
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


def measure(path: Path, threads: int, prefill: int, decode: int, repeats: int) -> dict:
    lm = OnnxCausalLM(path, threads=threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, size=(1, prefill), dtype=np.int64)
    lm.forward(prompt[:, :16], lm.empty_past(1))  # warm-up: session init, weight pre-packing
    prefill_s, decode_tps = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        logits, past = lm.forward(prompt, lm.empty_past(1))
        prefill_s.append(time.perf_counter() - start)
        token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        start = time.perf_counter()
        for _ in range(decode):
            logits, past = lm.forward(token, past)
            token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        decode_tps.append(decode / (time.perf_counter() - start))
    return {"prefill_ms": 1000 * statistics.median(prefill_s), "decode_tps": statistics.median(decode_tps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", help="LABEL=PATH; the first is the baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/e2e_cpu.md"))
    args = parser.parse_args()
    rows = []
    for item in args.models:
        label, _, path = item.partition("=")
        result = measure(Path(path), args.threads, args.prefill, args.decode, args.repeats)
        size = sum(f.stat().st_size for f in Path(path).parent.glob(Path(path).name + "*"))
        rows.append((label, size / 2**20, result))
        print(f"{label}: {result}", flush=True)
    base = rows[0][2]
    lines = [
        f"# End-to-end CPU speed ({datetime.date.today()})",
        "",
        f"Machine: {cpu_name()}, {args.threads} ORT intra-op threads; onnxruntime {ort.__version__}.",
        f"Prefill: one {args.prefill}-token prompt; decode: {args.decode} greedy steps with the KV cache; "
        f"median of {args.repeats} runs.",
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
