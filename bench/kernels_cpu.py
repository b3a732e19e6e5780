"""CPU kernel benchmark: fptq::W4A8MatMul against ONNX Runtime's built-in paths.

For K x N in 4096x4096, 4096x11008, 11008x4096, M in 1 and 512, 1 and 2 intra-op
threads: median ms (ORT sessions, variants interleaved) of fp32 MatMul;
com.microsoft.MatMulNBits (4 bits, block 128) accuracy_level 4; ORT's int8
com.microsoft.DynamicQuantizeMatMul (the fused form of DynamicQuantizeLinear +
MatMulInteger); ours static and per_token (and, when AMX is used, per_token forced
to the zmm kernels).  Prints the CPU model, ISA flags and our kernel path, a markdown
table and whether the issue-16 targets are met, beside the most this CPU allows any kernel
(bench/roofline.py: int8 dot peak, cold-read bandwidth); writes it all to
bench/kernels_cpu.md (--out).  No assertions.

    python bench/kernels_cpu.py            # full (minutes)
    python bench/kernels_cpu.py --quick    # 4096x4096 only
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fptq_onnx import custom_ops

import roofline  # bench/roofline.py (the script's directory is on sys.path)

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # K x N
MS = [1, 512]
THREADS = [1, 2]
QUICK_SHAPES = [(4096, 4096)]
G = 128
# Targets (issue 16): ours >= 1.3x MatMulNBits acc4 at M=1, >= 1.5x DynamicQuantizeMatMul at M=512.
TARGETS = {1: ("nbits_acc4", 1.3), 512: ("int8_dqmm", 1.5)}
ISA_FLAGS = (
    "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi",
    "amx_tile", "amx_int8", "amx_bf16",
)


def _model(nodes, inits, K, N, extra_opsets=()):
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 21)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def build_models(K: int, N: int, rng) -> dict:
    ng = -(-K // G)
    q = rng.integers(-8, 8, size=(K, N), dtype=np.int8)
    scales = rng.uniform(0.005, 0.02, size=(ng, N)).astype(np.float32)
    B, s_ng, _ = custom_ops.pack_weights(q, scales, None, G)
    w = (q.astype(np.float32) * np.repeat(scales, G, axis=0)[:K]).astype(np.float32)
    models = {}
    models["fp32"] = _model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(w, "W")], K, N)
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
        K=K, N=N, bits=4, block_size=G, accuracy_level=4,
    )
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(s_ng.reshape(-1), "scales")]
    models["nbits_acc4"] = _model([node], inits, K, N, ["com.microsoft"])
    # int8: ORT's DynamicQuantizeMatMul (what quantize_dynamic's DynamicQuantizeLinear + MatMulInteger
    # fuse into): dynamic uint8 activations x per-column symmetric int8 weights
    w_s = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    w_q = np.clip(np.rint(w / w_s), -127, 127).astype(np.int8)
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "Wq", "Ws"], ["Y"], domain="com.microsoft")
    inits = [numpy_helper.from_array(w_q, "Wq"), numpy_helper.from_array(w_s, "Ws")]
    models["int8_dqmm"] = _model([node], inits, K, N, ["com.microsoft"])
    for mode in ("static", "per_token"):
        names = ["A", "B", "scales", "", "act_scale" if mode == "static" else ""]
        while names[-1] == "":
            names.pop()
        node = helper.make_node("W4A8MatMul", names, ["Y"], domain="fptq", K=K, N=N, group_size=G, act_mode=mode)
        inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(s_ng, "scales")]
        if mode == "static":
            inits.append(numpy_helper.from_array(np.array(0.03, np.float32), "act_scale"))
        models[f"ours_{mode}"] = _model([node], inits, K, N, ["fptq"])
    return models


def make_session(model, threads: int, isa: str | None = None):
    """An ORT session; `isa` forces our kernel variant (FPTQ_OPS_ISA is read at session creation)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle workers sleep instead of spinning: on a shared, oversubscribed machine spinning
    # workers are preempted and stall every call (same setting for every variant).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    custom_ops.register(so)
    saved = os.environ.get("FPTQ_OPS_ISA")
    if isa is not None:
        os.environ["FPTQ_OPS_ISA"] = isa
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    finally:
        if isa is not None:
            if saved is None:
                del os.environ["FPTQ_OPS_ISA"]
            else:
                os.environ["FPTQ_OPS_ISA"] = saved


def time_sessions(sessions: dict, a: np.ndarray, N: int, budget_s: float, min_rounds: int = 5) -> dict:
    """{name: (median ms, min ms)}.  The sessions take turns, one call each per round, so machine
    noise hits all alike and every call starts with its weights evicted from the caches by the
    other variants' (as in a model whose layers do not fit the cache)."""
    bound = {}
    for name, sess in sessions.items():
        y = np.empty((a.shape[0], N), np.float32)
        io = sess.io_binding()
        io.bind_cpu_input("A", a)
        io.bind_output("Y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
        for _ in range(2):
            sess.run_with_iobinding(io)
        bound[name] = (sess, io, y)
    times = {name: [] for name in sessions}
    t_end = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_rounds or time.perf_counter() < t_end:
        for name, (sess, io, _) in bound.items():
            t0 = time.perf_counter()
            sess.run_with_iobinding(io)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


def machine_info() -> dict:
    info = {"model": platform.processor() or "?", "cores": str(os.cpu_count()), "isa_flags": "?"}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                info["model"] = val.strip()
            elif key.strip() == "CPU(s)":
                info["cores"] = val.strip()
            elif key.strip() == "Flags":
                flags = set(val.split())
                info["isa_flags"] = " ".join(f for f in ISA_FLAGS if f in flags)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(custom_ops.library_path()))
    lib.fptq_ops_selected_isa.restype = ctypes.c_char_p
    lib.fptq_ops_kernel_path.restype = ctypes.c_char_p
    lib.fptq_ops_kernel_path.argtypes = [ctypes.c_int64]
    return lib


def kernel_path(M: int) -> str:
    """The kernel our op runs for M rows with the ISA this process selects."""
    return _lib().fptq_ops_kernel_path(M).decode()


class Ratio(NamedTuple):
    """One target row: the peer's median ms and ours per_token / static against it (> 1: ours faster)."""

    K: int
    N: int
    M: int
    threads: int
    peer_ms: float
    per_token: float
    static: float


def weight_bytes(K: int, N: int) -> int:
    """Bytes a decode step must read: int4 weights + float32 group scales (ours and MatMulNBits alike)."""
    return K * N // 2 + -(-K // G) * N * 4


def measure_ceilings(shapes) -> dict:
    """{threads: (int8 MACs/s, {(K, N): cold-read bytes/s of that shape's int4 weights})}; None where unknown."""
    return {
        threads: (roofline.int8_macs_per_s(threads),
                  {(K, N): roofline.cold_read_bytes_per_s(weight_bytes(K, N), threads) for K, N in shapes})
        for threads in THREADS
    }


def ceiling_lines(ceilings: dict) -> list[str]:
    lines = []
    for threads, (macs, reads) in ceilings.items():
        peak = f"{macs / 1e9:.0f} GMAC/s" if macs else "unknown (no C compiler or no AVX-512 VNNI)"
        bw = ", ".join(f"{K}x{N} ({weight_bytes(K, N) / 1e6:.1f} MB): " + (f"{r / 1e9:.1f} GB/s" if r else "unknown")
                       for (K, N), r in reads.items())
        lines.append(f"- {threads} thread(s): zmm vpdpbusd peak {peak}; cold read of the int4 weights {bw}")
    return lines


def ceiling_text(rs, ceilings: dict, M: int, threads: int, info: dict) -> str:
    """'ceiling ...': the peer's ms over this CPU's floor for the work, per shape."""
    macs, reads = ceilings[threads]
    if M > 1 and "amx_int8" in info["isa_flags"].split():
        return "ceiling not measured (the int8 peer uses AMX tiles, whose peak the probes do not measure)"
    cells = []
    for r in rs:
        rate = macs if M > 1 else reads[(r.K, r.N)]
        if rate is None:
            return "ceiling unknown"
        floor_ms = (M * r.K * r.N if M > 1 else weight_bytes(r.K, r.N)) / rate * 1e3
        cells.append(f"{r.K}x{r.N}: {r.peer_ms / floor_ms:.2f}x")
    return "ceiling (" + ("int8 dot peak" if M > 1 else "cold-read bandwidth") + "): " + ", ".join(cells)


VARIANT_LABELS = {
    "fp32": "fp32 MatMul",
    "nbits_acc4": "NBits acc4",
    "int8_dqmm": "int8 DQMatMul",
    "ours_static": "ours static",
    "ours_per_token": "ours per_token",
    "ours_zmm_per_token": "ours per_token, no AMX",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape only (4096x4096)")
    ap.add_argument("--isa", help="force our kernel variant (FPTQ_OPS_ISA: scalar|avx2|avxvnni|avx512vnni|"
                    "avx512vnni512|amx)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("kernels_cpu.md"))
    args = ap.parse_args()
    if args.isa:
        os.environ["FPTQ_OPS_ISA"] = args.isa
    shapes = QUICK_SHAPES if args.quick else SHAPES
    info = machine_info()
    isa = _lib().fptq_ops_selected_isa().decode()
    paths = {M: kernel_path(M) for M in MS}
    print(f"machine: {info['model']}, {info['cores']} CPUs; ISA flags: {info['isa_flags']}")
    print(f"our kernel variant: {isa}; path by M: " + ", ".join(f"M={M}: {p}" for M, p in paths.items()), flush=True)
    ceilings = measure_ceilings(shapes)
    for line in ceiling_lines(ceilings):
        print(line)
    rng = np.random.default_rng(0)

    variants = list(VARIANT_LABELS)
    if isa != "amx":  # the no-AMX column is only meaningful beside an AMX run
        variants.remove("ours_zmm_per_token")
    header = (
        "| K x N | M | threads | path | " + " | ".join(VARIANT_LABELS[v] for v in variants)
        + " | fp32/ours pt | acc4/ours pt | DQMatMul/ours pt | DQMatMul/ours st |"
    )
    sep = "|" + "---|" * (len(variants) + 8)
    tables = {"median": [], "min": []}
    ratios: list[Ratio] = []
    print(header)
    print(sep, flush=True)
    for K, N in shapes:
        models = build_models(K, N, rng)
        for threads in THREADS:
            sessions = {}
            for name in variants:
                if name == "ours_zmm_per_token":
                    sessions[name] = make_session(models["ours_per_token"], threads, isa="avx512vnni512")
                else:
                    sessions[name] = make_session(models[name], threads)
            for M in MS:
                a = rng.standard_normal((M, K)).astype(np.float32)
                both = time_sessions(sessions, a, N, budget_s=4.0 if M >= 64 else 6.0)
                for i, stat in enumerate(tables):
                    t = {name: v[i] for name, v in both.items()}
                    st, pt = t["ours_static"], t["ours_per_token"]
                    row = (
                        f"| {K}x{N} | {M} | {threads} | {paths[M]} | " + " | ".join(f"{t[v]:.3f}" for v in variants)
                        + f" | {t['fp32'] / pt:.2f} | {t['nbits_acc4'] / pt:.2f} | {t['int8_dqmm'] / pt:.2f} | "
                        f"{t['int8_dqmm'] / st:.2f} |"
                    )
                    tables[stat].append(row)
                    if stat == "median":
                        peer, _ = TARGETS[M]
                        ratios.append(Ratio(K, N, M, threads, t[peer], t[peer] / pt, t[peer] / st))
                print(tables["median"][-1], flush=True)
            del sessions
        del models

    target_lines = []
    for M, (peer, goal) in TARGETS.items():
        for threads in THREADS:
            rs = [r for r in ratios if r.M == M and r.threads == threads]
            cells = ", ".join(f"{r.K}x{r.N}: {r.per_token:.2f}x (static {r.static:.2f}x)" for r in rs)
            met = all(r.per_token >= goal for r in rs)
            target_lines.append(
                f"- M={M}, {threads} thread(s), ours per_token vs {VARIANT_LABELS[peer]} >= {goal}x: "
                f"{'MET' if met else 'NOT met'} ({cells}); {ceiling_text(rs, ceilings, M, threads, info)}"
            )
    for line in target_lines:
        print(line)

    cmd = "python bench/kernels_cpu.py" + (" --quick" if args.quick else "") + (f" --isa {args.isa}" if args.isa else "")
    text = "\n".join(
        [
            "# CPU kernel benchmark (bench/kernels_cpu.py)",
            "",
            f"- machine: {info['model']}, {info['cores']} CPUs; ISA flags: {info['isa_flags']}",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- command: `{cmd}`",
            f"- onnxruntime {ort.__version__}; group/block size {G}; our kernel variant: {isa} "
            f"(path by M: {', '.join(f'M={M}: {p}' for M, p in paths.items())})"
            + ("; 'no AMX' = ours forced to avx512vnni512 (the path of an AVX-512 CPU without AMX)"
               if "ours_zmm_per_token" in variants else ""),
            "- ORT intra-op workers do not spin (session.intra_op.allow_spinning=0, every variant)",
            "- ms per call (IOBinding, preallocated output; the variants take turns within each row, one call "
            "each per round, >= 5 rounds and 4 s (M=512) / 6 s (M=1); so each call starts with its weights "
            "evicted by the others', as in a model larger than the cache); ratios > 1 mean ours is faster",
            f"- load average at the end: {os.getloadavg()[0]:.1f} (the machine is shared: compare within a row)",
            "",
            "## Targets (medians)",
            "",
            "The ceiling after each target is the peer's median over the floor below: the most any",
            "kernel could beat that peer by on this CPU.",
            "",
            *target_lines,
            "",
            "## What this CPU allows (bench/roofline.py, measured before the timings)",
            "",
            *ceiling_lines(ceilings),
            "",
            "## Median ms",
            "",
            header,
            sep,
            *tables["median"],
            "",
            "## Minimum ms",
            "",
            header,
            sep,
            *tables["min"],
            "",
        ]
    )
    args.out.write_text(text)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
