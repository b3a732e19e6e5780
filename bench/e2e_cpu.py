"""End-to-end CPU speed of one model in several forms: prefill and decode tokens/s at several thread counts.

Usage:
    python bench/e2e_cpu.py fp32=PATH native=PATH w4a8=PATH w4a8+head=PATH --int8-dynamic int8 \\
        --title "SmolLM2-135M" --ours w4a8+head --out bench/e2e_cpu.md [--append]

The first model is the fp32 baseline. `--int8-dynamic LABEL` adds ONNX Runtime's own int8 model,
`onnxruntime.quantization.quantize_dynamic` of the baseline (MatMul with constant B and Gather; ORT
fuses it into DynamicQuantizeMatMul), written once beside the baseline and reused. For each thread
count every model gets its own session; the models take turns prompt by prompt (the machine is
shared and noisy, so load changes hit them alike) and the median of the repeats is reported.
Prints the table (ratios against the baseline and `--peer`, measured in this run), the machine
(CPU model, ISA flags, the fptq kernel variant the library selected) and the targets of `--ours`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fptq_onnx import custom_ops
from fptq_onnx.runtime import OnnxCausalLM

ISA_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
# Issue 16: decode >= 2.5x fp32 and >= 1.2x MatMulNBits acc4 (each --peer); prefill >= 2x fp32.
TARGETS = (("decode", "base", 2.5), ("decode", "peer", 1.2), ("prefill", "base", 2.0))


def machine() -> dict[str, str]:
    info = {"cpu": "unknown CPU", "isa": ""}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            info["cpu"] = value.strip()
        elif key.strip() == "Flags":
            flags = set(value.split())
            info["isa"] = " ".join(f for f in ISA_FLAGS if f in flags)
    return info


def kernel_variant() -> str:
    """The kernel path the custom-op library picked by CPUID (its own report)."""
    lib = ctypes.CDLL(str(custom_ops.library_path()))
    try:
        lib.fptq_ops_selected_isa.restype = ctypes.c_char_p
    except AttributeError:
        return "not reported by this library build"
    return lib.fptq_ops_selected_isa().decode()


def int8_dynamic(baseline: Path) -> Path:
    """ORT's own W8A8: quantize_dynamic of the fp32 model (cached beside it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = baseline.with_name(f"{baseline.stem}.int8dyn.onnx")
    if not out.is_file():
        import tempfile

        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=baseline.parent) as tmp:  # model + data file, then moved in place
            quantize_dynamic(baseline, Path(tmp) / out.name, weight_type=QuantType.QInt8,
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
            for file in sorted(Path(tmp).iterdir(), key=lambda f: f.name == out.name):
                file.rename(out.parent / file.name)
        print(f"quantize_dynamic -> {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def model_size_mb(path: Path) -> float:
    """The .onnx file and its external data (`<name>.data` or the name recorded in the model)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    files = {path} | {path.parent / e.value for t in proto.graph.initializer for e in t.external_data
                      if e.key == "location"}
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


class Runner:
    """One model's session at one thread count; `once()` times one prefill and `decode` greedy steps."""

    def __init__(self, path: Path, threads: int, prompt: np.ndarray, decode: int) -> None:
        self.lm = OnnxCausalLM(path, threads=threads)
        self.prompt = prompt
        self.decode = decode
        self.lm.forward(prompt[:, :16], self.lm.empty_past(1))  # warm-up: session init, weight pre-packing
        self.prefill_tps: list[float] = []
        self.decode_tps: list[float] = []

    def once(self) -> None:
        start = time.perf_counter()
        logits, past = self.lm.forward(self.prompt, self.lm.empty_past(1))
        self.prefill_tps.append(self.prompt.shape[1] / (time.perf_counter() - start))
        token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        start = time.perf_counter()
        for _ in range(self.decode):
            logits, past = self.lm.forward(token, past)
            token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        self.decode_tps.append(self.decode / (time.perf_counter() - start))

    def result(self) -> dict[str, float]:
        return {"prefill": statistics.median(self.prefill_tps), "decode": statistics.median(self.decode_tps)}


def thread_counts(text: str) -> list[int]:
    counts = [(os.cpu_count() or 1) if t.strip() == "all" else int(t) for t in text.split(",") if t.strip()]
    return list(dict.fromkeys(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="LABEL=PATH; the first is the fp32 baseline")
    parser.add_argument("--int8-dynamic", metavar="LABEL", help="add quantize_dynamic of the baseline as LABEL")
    parser.add_argument("--threads", default="1,2,all", help="comma list of ORT intra-op thread counts ('all' = CPUs)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=32, help="greedy decode steps with the KV cache")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", default="native", help="comma list of further reference labels (MatMulNBits acc4)")
    parser.add_argument("--ours", help="label whose targets are checked")
    parser.add_argument("--title", default="model")
    parser.add_argument("--out", type=Path, default=Path("bench/e2e_cpu.md"))
    parser.add_argument("--append", action="store_true", help="append this section to --out instead of replacing it")
    args = parser.parse_args()

    models: dict[str, Path] = {}
    for item in args.models:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"want LABEL=PATH of an existing model, got '{item}'")
        models[label] = Path(path)
    base_label = next(iter(models))
    if args.int8_dynamic:
        models = {base_label: models[base_label], args.int8_dynamic: int8_dynamic(models[base_label]),
                  **{k: v for k, v in models.items() if k != base_label}}
    info = machine()
    variant = kernel_variant()
    print(f"{info['cpu']}; ISA: {info['isa']}; fptq kernel: {variant}; library {custom_ops.library_path()}", flush=True)
    prompt = np.random.default_rng(0).integers(0, 1000, size=(1, args.prefill), dtype=np.int64)
    results: dict[int, dict[str, dict[str, float]]] = {}
    for threads in thread_counts(args.threads):
        runners = {label: Runner(path, threads, prompt, args.decode) for label, path in models.items()}
        for _ in range(args.repeats):
            for runner in runners.values():
                runner.once()
        results[threads] = {label: runner.result() for label, runner in runners.items()}
        for label, r in results[threads].items():
            print(f"threads {threads} {label}: prefill {r['prefill']:.1f} tok/s, decode {r['decode']:.2f} tok/s", flush=True)
        del runners

    sizes = {label: model_size_mb(path) for label, path in models.items()}
    peers = [p for p in args.peer.split(",") if p in models]
    lines = [
        f"## {args.title} ({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        f"- Machine: {info['cpu']}, {os.cpu_count()} CPUs; ISA flags: {info['isa']}; onnxruntime {ort.__version__}.",
        f"- fptq kernel variant selected: {variant} (library `{custom_ops.library_path()}`).",
        f"- Prefill: one {args.prefill}-token prompt from an empty cache; decode: {args.decode} greedy steps with the "
        f"KV cache after it; median of {args.repeats} runs, the models taking turns; load average at the end "
        f"{os.getloadavg()[0]:.1f} (a shared machine: other work inflates times alike for every model).",
        f"- Command: `python bench/e2e_cpu.py {' '.join(args.models)}"
        + (f" --int8-dynamic {args.int8_dynamic}" if args.int8_dynamic else "")
        + f" --threads {args.threads} --prefill {args.prefill} --decode {args.decode} --repeats {args.repeats}"
        + f" --peer {args.peer}" + (f" --ours {args.ours}" if args.ours else "") + "`",
        "",
        f"| threads | model | size MB | prefill tok/s | × {base_label} | decode tok/s | × {base_label} |"
        + "".join(f" decode × {p} |" for p in peers),
        "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(peers),
    ]
    for threads, rows in results.items():
        base = rows[base_label]
        for label, r in rows.items():
            lines.append(
                f"| {threads} | {label} | {sizes[label]:.0f} | {r['prefill']:.1f} | {r['prefill'] / base['prefill']:.2f} | "
                f"{r['decode']:.2f} | {r['decode'] / base['decode']:.2f} |"
                + "".join(f" {r['decode'] / rows[p]['decode']:.2f} |" for p in peers)
            )
    if args.ours in models:
        lines += ["", f"Targets for `{args.ours}` (issue 16):", ""]
        for threads, rows in results.items():
            checks = []
            for phase, ref, want in TARGETS:
                for ref_label in [base_label] if ref == "base" else peers:
                    got = rows[args.ours][phase] / rows[ref_label][phase]
                    checks.append(f"{phase} {got:.2f}x {ref_label} (want >= {want}x: {'met' if got >= want else 'not met'})")
            lines.append(f"- {threads} thread{'s' if threads > 1 else ''}: " + "; ".join(checks))
    section = "\n".join(lines) + "\n"
    print(section)
    if args.append and args.out.is_file():
        section = args.out.read_text().rstrip("\n") + "\n\n" + section
    args.out.write_text(section)


if __name__ == "__main__":
    main()
