"""End-to-end generation speed in ONNX Runtime's CUDA EP: fp16 ONNX, MatMulNBits W4A16 ONNX and ours (w4a8).

Commands (GPU machine, repo root; onnxruntime-gpu and the op library built with CUDA):

    # SmolLM2-135M: export + convert into DIR (skipped for files already there), then measure
    python bench/e2e_gpu.py /tmp/e2e-smol --source smollm2-135m --title SmolLM2-135M --out bench/e2e_gpu.md
    # 7B-shaped random LLaMA (LLaMA-2-7B shapes, N of its 32 layers; accuracy is not the point, speed is)
    python bench/make_random_checkpoint.py --shape llama-7b --layers 8 /tmp/ckpt-7b
    python bench/e2e_gpu.py /tmp/e2e-7b --source /tmp/ckpt-7b --title "LLaMA-7B shapes, 8 layers, random" \\
        --convert-args "--recipe fptq --calib random --calib-samples 4 --calib-seqlen 128 --quantize-lm-head \\
        --ppl-windows 0" --out bench/e2e_gpu.md --append
    # CPU plumbing check with a tiny model (what tests/test_e2e_gpu.py runs)
    python bench/e2e_gpu.py DIR --provider cpu --batches 1,2 --prompts 16 --decode 4

DIR holds `float.onnx` (`fptq-onnx export SOURCE DIR/float.onnx`) and `w4a8.onnx` + `w4a8.native.onnx`
(`fptq-onnx convert SOURCE DIR/w4a8.onnx --format w4a8,native CONVERT_ARGS`); with `--source` the
missing ones are made first. The bench casts the float and the native model to float16 once
(passes/cast_float16.py: weights, activations, KV cache and logits) and runs passes/cache_shapes.py
on all three (one cache-length read, no host-to-device copy in the shape arithmetic; its docstring
says why; `--no-share-shapes` leaves it out), giving the three forms:

    fp16     float.fp16.shapes.onnx         the float export in half precision (the baseline)
    w4a16    w4a8.native.fp16.shapes.onnx   ORT's int4 (DequantizeLinear + MatMul, fused by ORT into MatMulNBits)
    w4a8     w4a8.shapes.onnx               ours: fptq.W4A8MatMul (float32 activations: the CUDA op has no fp16)

Each model gets its own session (one at a time, so GPU memory holds one model) and is stepped with IO
binding: input ids, mask and positions are copied to the device once per step, logits and the KV
cache are bound as device outputs that ORT allocates, and each step's present OrtValues are the next
step's past (no host round trip of the cache). Per (batch, prompt): one warm-up pass, then
`--repeats` passes of one prefill (tokens/s = batch x prompt / time of the run) and `--decode`
greedy steps (tokens/s = batch x steps / time; each step includes copying its [batch, 1, vocab]
logits to the host for the argmax, as a generation loop must); medians are reported. Before timing,
one profiled prefill + decode step tells where ORT placed every node of the decode step (nodes per
EP, the CPU op types, Memcpy nodes, and whether MatMulNBits / W4A8MatMul are there).
No CUDA graphs: ORT replays a captured graph only with fixed input/output shapes and addresses, and
this export's KV cache grows by concatenation every step.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from e2e_cpu import machine, model_size_mb
from fptq_onnx import custom_ops
from fptq_onnx.errors import FptqError
from fptq_onnx.runtime import OnnxCausalLM

PROVIDERS = {
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}
# label -> (file in DIR, float16 copy made from it?)
FORMS = {"fp16": ("float.onnx", True), "w4a16": ("w4a8.native.onnx", True), "w4a8": ("w4a8.onnx", False)}
BASE, PEER, OURS = "fp16", "w4a16", "w4a8"
# Issue 13, 7B-shaped: decode >= 2.5x fp16 and >= 1.2x MatMulNBits at batch 1; prefill >= 1.3x fp16 at prompt 2048.
TARGETS = (("decode", BASE, 1, None, 2.5), ("decode", PEER, 1, None, 1.2), ("prefill", BASE, None, 2048, 1.3))
DEFAULT_CONVERT_ARGS = "--recipe fptq --quantize-lm-head --ppl-windows 0"
WATCHED_OPS = ("MatMulNBits", "W4A8MatMul", "DequantizeLinear", "MatMul")


def prepare(directory: Path, source: str | None, convert_args: str, share_shapes: bool) -> dict[str, Path]:
    """The three model forms of DIR (exported/converted from `source` when missing; the copies made once)."""
    commands = {"float.onnx": ["export", source, str(directory / "float.onnx")],
                "w4a8.onnx": ["convert", source, str(directory / "w4a8.onnx"), "--format", "w4a8,native",
                              *shlex.split(convert_args)]}
    for name, command in commands.items():
        if not (directory / name).is_file():
            if source is None:
                raise FptqError(f"{directory / name} not found; give --source MODEL to make it")
            directory.mkdir(parents=True, exist_ok=True)
            print("$ fptq-onnx " + shlex.join(command), flush=True)
            if subprocess.run([sys.executable, "-m", "fptq_onnx.cli", *command]).returncode:
                raise FptqError(f"`fptq-onnx {shlex.join(command)}` failed (its error is above)")
    models = {}
    for label, (name, half) in FORMS.items():
        path = directory / name
        if not path.is_file():
            raise FptqError(f"{path} not found")
        models[label] = bench_copy(path, half, share_shapes)
    return models


def bench_copy(path: Path, half: bool, share_shapes: bool) -> Path:
    """`path` after the bench's passes: `<stem>[.fp16][.shapes].onnx` beside it (made once, staged and
    renamed into place), or `path` itself when there is none to run."""
    import onnx_ir as ir

    from fptq_onnx.formats import run_passes
    from fptq_onnx.passes.cache_shapes import ShareCacheShapesPass
    from fptq_onnx.passes.cast_float16 import CastFloat16Pass
    from fptq_onnx.saving import stage_model, staged_outputs

    passes = {".fp16": CastFloat16Pass() if half else None, ".shapes": ShareCacheShapesPass() if share_shapes else None}
    passes = {suffix: p for suffix, p in passes.items() if p is not None}
    if not passes:
        return path
    out = path.with_name(path.stem + "".join(passes) + ".onnx")
    if not out.is_file():
        start = time.perf_counter()
        model = run_passes(ir.load(path), list(passes.values()))
        with staged_outputs(out.parent) as stage:
            stage_model(stage, model, out)
        print(f"{' + '.join(type(p).__name__ for p in passes.values())} -> {out} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return out


class BoundLM:
    """One model's session stepped with IO binding: inputs, logits and the KV cache live on `device`."""

    def __init__(self, path: Path, provider: str, profile_prefix: str | None = None) -> None:
        options = ort.SessionOptions()
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.lm = OnnxCausalLM(path, providers=PROVIDERS[provider], options=options)
        self.session = self.lm.session
        missing = set(PROVIDERS[provider]) - set(self.session.get_providers())
        if missing:
            raise FptqError(f"{path}: ONNX Runtime {ort.__version__} has no {', '.join(sorted(missing))} here "
                            f"(available: {', '.join(ort.get_available_providers())})")
        self.device = provider
        kv_type = next(i.type for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
        self.kv_dtype = np.float16 if kv_type == "tensor(float16)" else np.float32
        self.present_names = [f"present.{i}.{k}" for i in range(self.lm.num_layers) for k in ("key", "value")]

    def _on_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty_past(self, batch: int) -> list[ort.OrtValue]:
        shape = (batch, self.lm.kv_heads, 0, self.lm.head_dim)
        return [self._on_device(np.zeros(shape, self.kv_dtype)) for _ in self.present_names]

    def step(self, ids: np.ndarray, past: list[ort.OrtValue]) -> tuple[ort.OrtValue, list[ort.OrtValue]]:
        """One forward of `ids` [B, T] after `past`; returns device logits and the device cache."""
        batch, seq = ids.shape
        past_len = past[0].shape()[2]
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", self._on_device(ids.astype(np.int64)))
        binding.bind_ortvalue_input("attention_mask", self._on_device(np.ones((batch, past_len + seq), np.int64)))
        if self.lm.has_position_ids:
            positions = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
            binding.bind_ortvalue_input("position_ids", self._on_device(positions))
        for name, value in zip(self.present_names, past):
            binding.bind_ortvalue_input(name.replace("present", "past_key_values"), value)
        for name in self.lm.output_names:
            binding.bind_output(name, self.device, 0)  # ORT allocates each output on the device
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self.lm.output_names, binding.get_outputs()))
        return outputs["logits"], [outputs[name] for name in self.present_names]

    @staticmethod
    def next_tokens(logits: ort.OrtValue) -> np.ndarray:
        """Greedy tokens [B, 1] from the last position (copies the logits to the host)."""
        return logits.numpy()[:, -1].argmax(-1).astype(np.int64)[:, None]

    def generate(self, prompt: np.ndarray, steps: int) -> tuple[np.ndarray, float, float]:
        """Greedy tokens [B, steps + 1] after `prompt`, seconds of the prefill run and of the decode steps."""
        start = time.perf_counter()
        logits, past = self.step(prompt, self.empty_past(prompt.shape[0]))
        prefill = time.perf_counter() - start
        tokens = [self.next_tokens(logits)]
        del logits
        start = time.perf_counter()
        for _ in range(steps):
            logits, past = self.step(tokens[-1], past)
            tokens.append(self.next_tokens(logits))
        return np.concatenate(tokens, axis=1), prefill, time.perf_counter() - start


def placement(profile: Path) -> dict:
    """Where ORT ran each node of the last profiled run: nodes per EP, CPU op types, Memcpy and watched ops."""
    events = json.loads(profile.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if not runs:
        raise FptqError(f"{profile}: no model_run event in the ORT profile")
    last = runs[-1]
    nodes = {e["name"]: e["args"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and last["ts"] <= e["ts"] <= last["ts"] + last["dur"]}
    by_ep = Counter(args.get("provider", "?") for args in nodes.values())
    ops = Counter(args.get("op_name", "?") for args in nodes.values())
    cpu_ops = Counter(args.get("op_name", "?") for args in nodes.values()
                      if args.get("provider") == "CPUExecutionProvider")
    return {"by_ep": dict(by_ep), "cpu_ops": dict(cpu_ops.most_common()),
            "memcpy": sum(n for op, n in ops.items() if op.startswith("Memcpy")),
            "watched": {op: ops[op] for op in WATCHED_OPS if ops[op]}}


def probe_placement(lm: BoundLM) -> dict:
    """One profiled short prefill + decode step; the placement of the decode step. Ending the profile
    stops it (ORT collects nothing after writing it), so the timed runs that follow are not profiled."""
    lm.generate(np.zeros((1, 8), np.int64), 1)
    profile = Path(lm.session.end_profiling())
    try:
        return placement(profile)
    finally:
        profile.unlink(missing_ok=True)


@dataclass
class Timing:
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)

    def median(self) -> dict[str, float]:
        return {"prefill": statistics.median(self.prefill), "decode": statistics.median(self.decode)}


def measure(path: Path, provider: str, combos: list[tuple[int, int]], decode: int,
            repeats: int) -> tuple[dict, dict[tuple[int, int], dict[str, float]]]:
    """The decode-step placement and the median prefill and decode tokens/s of one model at each
    (batch, prompt); the same prompts for every model."""
    with tempfile.TemporaryDirectory() as tmp:
        lm = BoundLM(path, provider, profile_prefix=str(Path(tmp) / path.stem))
        where = probe_placement(lm)
    print(f"{path.name}: decode-step placement {where}", flush=True)
    vocab = lm.session.get_outputs()[0].shape[-1]
    vocab_limit = min(1000, vocab) if isinstance(vocab, int) else 1000
    rng = np.random.default_rng(0)
    results = {}
    for batch, prompt_len in combos:
        prompt = rng.integers(0, vocab_limit, size=(batch, prompt_len), dtype=np.int64)
        lm.generate(prompt, decode)  # warm-up: kernels, arena growth, cuBLAS heuristics for these shapes
        timing = Timing()
        for _ in range(repeats):
            _, prefill, decode_s = lm.generate(prompt, decode)
            timing.prefill.append(batch * prompt_len / prefill)
            timing.decode.append(batch * decode / decode_s)
        results[(batch, prompt_len)] = timing.median()
        r = results[(batch, prompt_len)]
        print(f"  {path.name} batch {batch} prompt {prompt_len}: prefill {r['prefill']:.0f} tok/s, "
              f"decode {r['decode']:.1f} tok/s", flush=True)
    del lm
    gc.collect()
    return where, results


def device_name(provider: str) -> str:
    if provider == "cpu":
        return machine()["cpu"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown GPU (nvidia-smi not available)"
    return out.splitlines()[0].strip()


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def report(args: argparse.Namespace, models: dict[str, Path], speeds: dict, placements: dict) -> str:
    lines = [
        f"## {args.title} ({datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')})",
        "",
        f"- Device: {device_name(args.provider)}; onnxruntime {ort.__version__} "
        f"({', '.join(PROVIDERS[args.provider])}); fptq library `{custom_ops.library_path()}`.",
        f"- Models (`{args.dir}`): " + "; ".join(f"{label} `{p.name}` {model_size_mb(p):.0f} MB"
                                               for label, p in models.items()) + ".",
        f"- IO binding, KV cache on the device; prefill = one prompt from an empty cache, decode = {args.decode} "
        f"greedy steps after it; tokens/s count all sequences of the batch; median of {args.repeats} after a "
        "warm-up; ratios against fp16 and w4a16 measured in this run.",
        "- Command: `python bench/e2e_gpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "`",
        "",
        f"| model | batch | prompt | prefill tok/s | × {BASE} | × {PEER} | decode tok/s | × {BASE} | × {PEER} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for combo in speeds[BASE]:
        for label in models:
            r, base, peer = speeds[label][combo], speeds[BASE][combo], speeds[PEER][combo]
            lines.append(f"| {label} | {combo[0]} | {combo[1]} | {r['prefill']:.0f} | "
                         f"{r['prefill'] / base['prefill']:.2f} | {r['prefill'] / peer['prefill']:.2f} | "
                         f"{r['decode']:.1f} | {r['decode'] / base['decode']:.2f} | {r['decode'] / peer['decode']:.2f} |")
    lines += ["", "Node placement of one decode step (ORT profile):", "",
              "| model | nodes per EP | CPU-placed op types | Memcpy nodes | watched ops |", "|---|---|---|---:|---|"]
    for label, p in placements.items():
        lines.append(f"| {label} | {', '.join(f'{ep}: {n}' for ep, n in p['by_ep'].items())} | "
                     f"{', '.join(f'{op} {n}' for op, n in p['cpu_ops'].items()) or '–'} | {p['memcpy']} | "
                     f"{', '.join(f'{op} {n}' for op, n in p['watched'].items())} |")
    checks = []
    for phase, ref, batch, prompt, want in TARGETS:
        for combo in speeds[OURS]:
            if (batch is None or combo[0] == batch) and (prompt is None or combo[1] == prompt):
                got = speeds[OURS][combo][phase] / speeds[ref][combo][phase]
                checks.append(f"- {phase} batch {combo[0]} prompt {combo[1]}: {got:.2f}x {ref} "
                              f"(want >= {want}x: {'met' if got >= want else 'not met'})")
    if checks:
        lines += ["", f"Targets for `{OURS}` (issue 13, stated for the 7B shapes):", "", *checks]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="model dir: float.onnx, w4a8.onnx, w4a8.native.onnx")
    parser.add_argument("--source", help="model name/dir/GGUF to export and convert into DIR when files are missing")
    parser.add_argument("--convert-args", default=DEFAULT_CONVERT_ARGS, help="extra `fptq-onnx convert` options")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--no-share-shapes", dest="share_shapes", action="store_false",
                        help="measure the models without passes/cache_shapes.py (to see what it changes)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompts", default="512,2048")
    parser.add_argument("--decode", type=int, default=128, help="greedy decode steps after each prefill")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--title", default="model")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = parser.parse_args()
    try:
        models = prepare(args.dir, args.source, args.convert_args, args.share_shapes)
        print(f"{device_name(args.provider)}; onnxruntime {ort.__version__}; "
              f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}", flush=True)
        combos = [(b, p) for b in ints(args.batches) for p in ints(args.prompts)]
        placements, speeds = {}, {}
        for label, path in models.items():
            placements[label], speeds[label] = measure(path, args.provider, combos, args.decode, args.repeats)
    except FptqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    section = report(args, models, speeds, placements)
    print(section)
    if args.out:
        if args.append and args.out.is_file():
            section = args.out.read_text().rstrip("\n") + "\n\n" + section
        args.out.write_text(section)


if __name__ == "__main__":
    main()
