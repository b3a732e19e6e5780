"""CPU kernel benchmark: fptq::W4A8MatMul against ONNX Runtime's built-in paths.

For each K x N and M: median ms (ORT sessions, --threads intra-op threads) of
fp32 MatMul; com.microsoft.MatMulNBits (4 bits, block 128) accuracy_level 0 and 4;
int8 DynamicQuantizeLinear + MatMulInteger (+ Cast/Mul); ours static and per_token.
Prints a markdown table and writes it to bench/kernels_cpu.md (--out).  No assertions.

    python bench/kernels_cpu.py            # full (minutes)
    python bench/kernels_cpu.py --quick    # small subset
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

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fptq_onnx import custom_ops

FULL_SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]
FULL_MS = [1, 8, 64, 512]
QUICK_SHAPES = [(576, 1536), (4096, 4096)]
QUICK_MS = [1, 64]
G = 128
VARIANTS = ["fp32", "nbits_acc0", "nbits_acc4", "int8_dyn", "ours_static", "ours_per_token"]


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
    for acc in (0, 4):
        node = helper.make_node(
            "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
            K=K, N=N, bits=4, block_size=G, accuracy_level=acc,
        )
        inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(s_ng.reshape(-1), "scales")]
        models[f"nbits_acc{acc}"] = _model([node], inits, K, N, ["com.microsoft"])
    # int8: dynamic uint8 activations x per-column symmetric int8 weights
    w_s = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    w_q = np.clip(np.rint(w / w_s), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["A"], ["a_q", "a_s", "a_zp"]),
        helper.make_node("MatMulInteger", ["a_q", "Wq", "a_zp"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["a_s", "Ws"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["Y"]),
    ]
    models["int8_dyn"] = _model(nodes, [numpy_helper.from_array(w_q, "Wq"), numpy_helper.from_array(w_s, "Ws")], K, N)
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


def make_session(model, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    custom_ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_sessions(sessions: dict, a: np.ndarray, N: int, budget_s: float, max_reps: int) -> dict:
    """{name: (median ms, min ms)}; the sessions take turns so that machine noise hits all alike."""
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
    reps = 0
    while reps < 3 or (reps < max_reps and time.perf_counter() < t_end):
        for name, (sess, io, _) in bound.items():
            t0 = time.perf_counter()
            sess.run_with_iobinding(io)
            times[name].append(time.perf_counter() - t0)
        reps += 1
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


def machine_info() -> dict:
    info = {"model": platform.processor() or "?", "cores": str(os.cpu_count())}
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
                info["isa_flags"] = ",".join(f for f in ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "amx_int8") if f in flags)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def selected_isa() -> str:
    lib = ctypes.CDLL(str(custom_ops.library_path()))
    lib.fptq_ops_selected_isa.restype = ctypes.c_char_p
    return lib.fptq_ops_selected_isa().decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset of shapes and M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", help="force our kernel variant (sets FPTQ_OPS_ISA: scalar|avx2|avxvnni|avx512vnni)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("kernels_cpu.md"))
    args = ap.parse_args()
    if args.isa:
        os.environ["FPTQ_OPS_ISA"] = args.isa
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if args.quick else (FULL_SHAPES, FULL_MS)
    rng = np.random.default_rng(0)

    tables = {"median": [], "min": []}
    header = (
        "| K x N | M | fp32 | NBits acc0 | NBits acc4 | int8 DQ+MMI | ours static | ours per_token "
        "| fp32/ours (st, pt) | acc4/ours (st, pt) |"
    )
    sep = "|" + "---|" * 10
    print(header)
    print(sep, flush=True)
    for K, N in shapes:
        sessions = {name: make_session(m, args.threads) for name, m in build_models(K, N, rng).items()}
        for M in ms:
            a = rng.standard_normal((M, K)).astype(np.float32)
            big = M * K * N >= 512 * 4096 * 4096
            budget, max_reps = (1.0, 5) if args.quick else ((3.0, 7) if big else (3.0, 50))
            both = time_sessions(sessions, a, N, budget, max_reps)
            for i, stat in enumerate(tables):
                t = {name: v[i] for name, v in both.items()}
                st, pt = t["ours_static"], t["ours_per_token"]
                row = (
                    f"| {K}x{N} | {M} | {t['fp32']:.3f} | {t['nbits_acc0']:.3f} | {t['nbits_acc4']:.3f} | "
                    f"{t['int8_dyn']:.3f} | {st:.3f} | {pt:.3f} | {t['fp32'] / st:.2f}, {t['fp32'] / pt:.2f} | "
                    f"{t['nbits_acc4'] / st:.2f}, {t['nbits_acc4'] / pt:.2f} |"
                )
                tables[stat].append(row)
            print(tables["median"][-1], flush=True)
        del sessions

    info = machine_info()
    text = "\n".join(
        [
            "# CPU kernel benchmark (bench/kernels_cpu.py)",
            "",
            f"- machine: {info['model']}, {info['cores']} CPUs ({info.get('isa_flags', '')})",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- onnxruntime {ort.__version__}, {args.threads} intra-op threads, "
            f"fptq kernel variant: {selected_isa()}, group/block size {G}{' (--quick)' if args.quick else ''}",
            "- ms per call (IOBinding, preallocated output; the variants take turns); ratios > 1 mean ours is faster",
            f"- load average at the end: {os.getloadavg()[0]:.1f} (a loaded machine inflates the medians; the minima "
            "are less sensitive to it)",
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
