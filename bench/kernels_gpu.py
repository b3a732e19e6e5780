"""GPU kernel benchmark of fptq::W4A8MatMul (CUDA) on LLaMA-7B shapes; builds nothing.

Needs a libfptq_ops.so built with CUDA (FPTQ_OPS_LIBRARY or the usual search path),
torch with CUDA and, for the ORT rows, onnxruntime with CUDAExecutionProvider.
In one go, for each K x N and M:

* correctness of our kernels (direct entry points, static and per_token, with and
  without zero points, every kernel variant incl. the sm_90a wgmma prefill) against a
  float64 reference on the GPU (y = s_a * q @ ((w - zp) * s)^T, the contract's numerics
  without rounding), and bit-exact checks on ragged shapes against the numpy reference;
* kernel time (median of CUDA-graph replays, CUDA events) of ours (activation
  quantization + GEMM/GEMV; auto and each variant) and of the peers cuBLAS fp16
  (torch.matmul), int8 torch._int_mm, FP8 torch._scaled_mm and tinygemm W4A16
  (torch._weight_int4pack_mm), each rotating over enough weight copies that the
  weights come from HBM, not L2;
* through ONNX Runtime on CUDA, models of R parallel nodes (R weight copies) of
  com.microsoft MatMulNBits (W4A16, fp16, block 128) and of ours: kernel time per node
  from the torch profiler (CUPTI sees ORT's kernels too) and wall time per node
  (run_with_iobinding / R, launch overheads included).

Writes a markdown report (--md) and raw JSON (--json).  Example (GPU machine):
    FPTQ_OPS_LIBRARY=/tmp/b/libfptq_ops.so python bench/kernels_gpu.py --md bench/kernels_gpu.md
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fptq_onnx import custom_ops  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]  # (K, N), LLaMA-7B / 8B
MS = [1, 16, 128, 512, 2048, 4096]
G = 128
HBM = {"H200": 4.8e12, "H100": 3.35e12}  # vendor datasheet bytes/s (SXM)
INT8_PEAK = 1979e12  # dense int8 tensor-core ops/s, H100/H200 SXM datasheet
PATH_NAMES = {5: "decode v4", 1: "decode v5", 4: "mma.sync", 2: "mma.sync 128", 7: "wgmma"}  # force_path values

# ---------------------------------------------------------------- library


def load_lib():
    lib = ctypes.CDLL(str(custom_ops.library_path()))
    if not hasattr(lib, "fptq_cuda_compiled"):
        raise SystemExit("libfptq_ops.so was built without CUDA")
    i64, vp, cp = ctypes.c_int64, ctypes.c_void_p, ctypes.c_char_p
    lib.fptq_cuda_packed_bytes.restype = ctypes.c_size_t
    lib.fptq_cuda_packed_bytes.argtypes = [i64, i64, i64, ctypes.c_int]
    lib.fptq_cuda_workspace_bytes.restype = ctypes.c_size_t
    lib.fptq_cuda_workspace_bytes.argtypes = [i64, i64, i64, i64, ctypes.c_int]
    lib.fptq_cuda_pack.restype = cp
    lib.fptq_cuda_pack.argtypes = [i64, i64, i64, vp, vp, vp, vp, vp, vp, vp]
    lib.fptq_cuda_auto_path.restype = ctypes.c_int
    lib.fptq_cuda_auto_path.argtypes = [i64, i64, i64, i64]
    lib.fptq_cuda_run.restype = cp
    lib.fptq_cuda_run.argtypes = [i64, i64, i64, ctypes.c_int, i64, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                                  ctypes.c_int, ctypes.c_int]
    return lib


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


class Ours:
    """Packed weights (copies) + direct launches of our kernels on torch's stream."""

    def __init__(self, lib, K, N, B, scales, zp, copies):
        self.lib, self.K, self.N = lib, K, N
        nb = [lib.fptq_cuda_packed_bytes(K, N, G, i) for i in range(3)]
        self.packed = []
        for _ in range(copies):
            Bp = torch.empty(nb[0], dtype=torch.uint8, device="cuda")
            sc = torch.empty(nb[1] // 4, dtype=torch.float32, device="cuda")
            zc = torch.empty(nb[2], dtype=torch.int8, device="cuda") if zp is not None else None
            err = lib.fptq_cuda_pack(K, N, G, _p(B), _p(scales), _p(zp), _p(Bp), _p(sc), _p(zc), _stream())
            assert err is None, err
            self.packed.append((Bp, sc, zc))
        self.has_zp = zp is not None

    def workspace(self, M):
        return torch.empty(self.lib.fptq_cuda_workspace_bytes(self.K, self.N, G, M, int(self.has_zp)),
                           dtype=torch.uint8, device="cuda")

    def run(self, A, Y, ws, act_scale, per_token, copy=0, bias=None, force_path=0, force_splits=0):
        Bp, sc, zc = self.packed[copy]
        err = self.lib.fptq_cuda_run(self.K, self.N, G, int(per_token), A.shape[0], _p(A), _p(act_scale), _p(bias),
                                     _p(Bp), _p(sc), _p(zc), _p(Y), _p(ws), _stream(), force_path, force_splits)
        assert err is None, err.decode()


# ---------------------------------------------------------------- reference


def reference(A, B, scales, zp, act_scale, per_token, K):
    """float64 on the GPU: y = s_a * q @ ((w - zp) * s)^T."""
    N, ng, _ = B.shape
    lo = (B & 15).to(torch.int16)
    hi = (B >> 4).to(torch.int16)
    w = torch.stack([lo, hi], dim=-1).reshape(N, ng * G)[:, :K].double()
    z = torch.full((N, ng), 8, dtype=torch.float64, device="cuda") if zp is None else zp.double()
    wd = (w - z.repeat_interleave(G, dim=1)[:, :K]) * scales.double().repeat_interleave(G, dim=1)[:, :K]
    if per_token:
        m = A.abs().amax(dim=1)
        s = torch.where(m == 0, torch.ones_like(m), m / torch.tensor(127.0, device="cuda"))
        q = torch.clamp(torch.round(A / s[:, None]), -127, 127)
    else:
        s = act_scale.expand(A.shape[0])
        q = torch.clamp(torch.round(A / act_scale), -128, 127)
    return s.double()[:, None] * (q.double() @ wd.T)


# ---------------------------------------------------------------- timing


def graph_time(fn, copies, reps=10):
    """Median per-call µs of `fn(i)` for i in range(copies), captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):  # warm-up (also sets kernel attributes outside capture)
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / copies)
    del g
    return statistics.median(times)


def copies_for(nbytes, l2):
    return int(min(32, max(2, math.ceil(4 * l2 / nbytes))))


# ---------------------------------------------------------------- ONNX Runtime


def ort_models(K, N, B_np, s_np, R):
    from onnx import TensorProto, helper, numpy_helper

    def model(nodes, inits, a_type, extra):
        graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("A", a_type, ["M", K])],
                                  [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT if a_type == TensorProto.FLOAT
                                                                 else TensorProto.FLOAT16, ["M", N]) for i in range(R)],
                                  initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(extra, 1)],
                                 ir_version=10)

    nb_nodes, nb_inits, our_nodes, our_inits = [], [], [], []
    s16 = s_np.astype(np.float16)
    for i in range(R):
        nb_inits += [numpy_helper.from_array(B_np, f"B{i}"), numpy_helper.from_array(s16.reshape(-1), f"S{i}")]
        nb_nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft",
                                         K=K, N=N, bits=4, block_size=G, accuracy_level=0))
        our_inits += [numpy_helper.from_array(B_np, f"B{i}"), numpy_helper.from_array(s_np, f"S{i}")]
        our_nodes.append(helper.make_node("W4A8MatMul", ["A", f"B{i}", f"S{i}", "", "act"], [f"Y{i}"], domain="fptq",
                                          K=K, N=N, group_size=G, act_mode="static"))
    our_inits.append(numpy_helper.from_array(np.array(0.05, np.float32), "act"))
    return (model(nb_nodes, nb_inits, TensorProto.FLOAT16, "com.microsoft"),
            model(our_nodes, our_inits, TensorProto.FLOAT, "fptq"))


def ort_session(ort, model):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.log_severity_level = 3
    custom_ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])


def ort_time(ort, sess, A_np, N, R, dtype, profile=True, reps=10):
    """(kernel µs per node via the torch profiler or None, wall µs per node)."""
    M = A_np.shape[0]
    a = ort.OrtValue.ortvalue_from_numpy(A_np, "cuda", 0)
    outs = [ort.OrtValue.ortvalue_from_shape_and_type([M, N], dtype, "cuda", 0) for _ in range(R)]
    io = sess.io_binding()
    io.bind_ortvalue_input("A", a)
    for i, o in enumerate(outs):
        io.bind_ortvalue_output(f"Y{i}", o)
    for _ in range(3):
        sess.run_with_iobinding(io)
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        walls.append((time.perf_counter() - t0) * 1e6 / R)
    kern = None
    if profile:
        try:
            from torch.profiler import ProfilerActivity, profile as tprofile

            n = 3
            with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    sess.run_with_iobinding(io)
                torch.cuda.synchronize()
            total = 0.0
            for ev in prof.events():
                dt = getattr(ev, "device_type", None)
                if dt is not None and str(dt).endswith("CUDA") and "memcpy" not in ev.name.lower() \
                        and "memset" not in ev.name.lower():
                    total += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            kern = total / (n * R) if total > 0 else None
        except Exception as e:  # profiler unavailable: wall time only
            print(f"  (profiler failed: {e})")
    return kern, statistics.median(walls)


# ---------------------------------------------------------------- peers


def has_wgmma():
    """The sm_90a wgmma prefill kernel runs on compute capability 9.0 only."""
    return torch.cuda.get_device_capability() == (9, 0)


def paths_for(M):
    """Kernel variants checked at M: auto, decode v5 / v4 (M <= 16), mma.sync prefill 128/64, wgmma prefill."""
    wg = [7] if has_wgmma() else []
    return ([0, 1, 5, 4] if M <= 16 else [0, 2, 4]) + wg


class Peers:
    """The peer matmuls of one K x N, each with its own weight copies (rotated: weights from HBM).

    cuBLAS fp16 (torch.matmul), int8 torch._int_mm (M padded to 32: it needs M > 16), FP8 e4m3
    torch._scaled_mm (bf16 out, M padded to a multiple of 16), tinygemm W4A16
    torch._weight_int4pack_mm (bf16, group 128).  The int8 / FP8 peers get their activations already
    quantized (no conversion kernel timed), ours includes its quantization kernel.
    """

    def __init__(self, K, N, l2):
        self.K, self.N = K, N
        self.c16, self.c8, self.c4 = copies_for(N * K * 2, l2), copies_for(N * K, l2), copies_for(N * K // 2, l2)
        dev = "cuda"
        self.w16 = [torch.randn(K, N, device=dev, dtype=torch.float16) * 0.02 for _ in range(self.c16)]
        self.w8 = [torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev).t() for _ in range(self.c8)]
        self.wf8 = [(torch.randn(N, K, device=dev) * 0.5).to(torch.float8_e4m3fn).t() for _ in range(self.c8)]
        self.w4 = [torch._convert_weight_to_int4pack(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev), 8)
                   for _ in range(self.c4)]
        self.sz = (torch.rand(K // 128, N, 2, device=dev) * 0.01).to(torch.bfloat16)
        self.one = torch.tensor(1.0, device=dev)

    def times(self, M):
        K, N, dev = self.K, self.N, "cuda"
        out = {}

        def timed(key, fn, copies, reps=10):
            try:
                out[key] = graph_time(fn, copies, reps)
            except Exception as e:  # reported in the table as failed, with the reason printed
                print(f"  peer {key} failed at M={M}: {str(e)[:200]}")
                out[key] = None

        A16 = torch.randn(M, K, device=dev, dtype=torch.float16)
        Y16 = torch.empty(M, N, device=dev, dtype=torch.float16)
        timed("fp16_us", lambda i: torch.matmul(A16, self.w16[i], out=Y16), self.c16)
        A8 = torch.randint(-128, 128, (max(M, 32), K), dtype=torch.int8, device=dev)
        timed("int8_us", lambda i: torch._int_mm(A8, self.w8[i]), self.c8)
        Af8 = torch.randn(-(-M // 16) * 16, K, device=dev).to(torch.float8_e4m3fn)
        timed("fp8_us", lambda i: torch._scaled_mm(Af8, self.wf8[i], self.one, self.one, out_dtype=torch.bfloat16),
              self.c8)
        Abf = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        slow = M >= 512  # tinygemm is a GEMV design: ~10 ms per call at M = 4096
        timed("w4a16_us", lambda i: torch._weight_int4pack_mm(Abf, self.w4[i], 128, self.sz), 2 if slow else self.c4,
              3 if slow else 10)
        return out


# ---------------------------------------------------------------- ragged shapes, every kernel


def ragged_checks(lib):
    """Small odd shapes (ragged K, groups 16..1024, N not a multiple of 16) through every kernel
    variant, against the numpy reference with power-of-two scales (exact: error must be 0)."""
    rng = np.random.default_rng(1)
    out = []
    for K, N, Gr in [(576, 40, 128), (100, 24, 32), (70, 16, 32), (256, 13, 64), (512, 9, 256), (80, 11, 16),
                     (2112, 200, 1024)]:
        ng = -(-K // Gr)
        for with_zp in (False, True):
            q = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
            scales = (2.0 ** -rng.integers(5, 8, size=(ng, N))).astype(np.float32)
            zp = rng.integers(0, 16, size=(ng, N), dtype=np.uint8) if with_zp else np.full((ng, N), 8, np.uint8)
            B, s_ng, zp_ng = custom_ops.pack_weights(q, scales, zp, Gr)
            bias = (rng.integers(-64, 64, size=N) / 16).astype(np.float32)
            tB, ts = torch.from_numpy(B).cuda(), torch.from_numpy(s_ng).cuda()
            tz = None if zp_ng is None else torch.from_numpy(zp_ng).cuda()
            nb = [lib.fptq_cuda_packed_bytes(K, N, Gr, i) for i in range(3)]
            Bp = torch.empty(nb[0], dtype=torch.uint8, device="cuda")
            sc = torch.empty(nb[1] // 4, dtype=torch.float32, device="cuda")
            zc = torch.empty(nb[2], dtype=torch.int8, device="cuda") if tz is not None else None
            assert lib.fptq_cuda_pack(K, N, Gr, _p(tB), _p(ts), _p(tz), _p(Bp), _p(sc), _p(zc), _stream()) is None
            tbias = torch.from_numpy(bias).cuda()
            act = torch.tensor(0.125, device="cuda")
            for per_token in (False, True):
                mode = "per_token" if per_token else "static"
                for M in (1, 5, 16, 17, 128, 1000):
                    a = (rng.standard_normal((M, K)) * 6).astype(np.float32)
                    if per_token:
                        a = np.clip(a, -15, 15)
                        a[:, rng.integers(0, K)] = 127 / 8
                    ref = custom_ops.reference_w4a8_matmul(a, B, s_ng, zp_ng, np.float32(0.125), bias, K, N, Gr, mode)
                    tA = torch.from_numpy(a).cuda()
                    Y = torch.empty(M, N, device="cuda")
                    ws = torch.empty(lib.fptq_cuda_workspace_bytes(K, N, Gr, M, int(tz is not None)),
                                     dtype=torch.uint8, device="cuda")
                    for fp in ([0, 1, 2, 4, 5, 6] if M <= 16 else [0, 2, 4]) + ([7] if has_wgmma() else []):
                        Y.fill_(float("nan"))
                        err = lib.fptq_cuda_run(K, N, Gr, int(per_token), M, _p(tA), _p(act), _p(tbias), _p(Bp),
                                                _p(sc), _p(zc), _p(Y), _p(ws), _stream(), fp, 0)
                        assert err is None, err
                        y = Y.cpu().numpy()
                        e = float(np.nanmax(np.abs(y - ref))) if np.isfinite(y).all() else float("inf")
                        ok = e == 0.0
                        out.append(dict(K=K, N=N, M=M, G=Gr, per_token=per_token, zp="zp" if with_zp else "nozp",
                                        path=fp, max_err=e, rel=e, ok=ok))
                        if not ok:
                            print(f"  RAGGED MISMATCH K={K} N={N} G={Gr} M={M} {mode} zp={with_zp} path={fp}: {e}")
    print(f"ragged/exact checks: {sum(c['ok'] for c in out)}/{len(out)} exact")
    return out


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, M in {1, 128, 4096}")
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows")
    ap.add_argument("--decode-only", action="store_true", help="M in {1, 16} only")
    ap.add_argument("--prefill-only", action="store_true", help="M >= 128 only (the prefill kernels)")
    ap.add_argument("--no-ragged", action="store_true", help="skip the ragged exact checks")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    lib = load_lib()
    prop = torch.cuda.get_device_properties(0)
    name = prop.name
    l2 = getattr(prop, "L2_cache_size", 50 << 20)
    hbm = next((v for k, v in HBM.items() if k in name), None)
    print(f"device: {name}, {prop.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}")

    ort = None
    if not args.no_ort:
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                print("onnxruntime has no CUDAExecutionProvider: ORT rows skipped")
                ort = None
            else:
                print(f"onnxruntime {ort.__version__}")
        except ImportError:
            ort = None

    checks = [] if args.no_ragged else ragged_checks(lib)
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = [1, 512, 4096] if args.quick else MS
    if args.decode_only:
        ms = [1, 16]
    if args.prefill_only:
        ms = [m for m in ms if m >= 128]
    rows = []
    for K, N in shapes:
        ng = K // G
        B = torch.randint(0, 256, (N, ng, G // 2), dtype=torch.uint8, device="cuda")
        scales = (torch.rand(N, ng, device="cuda") * 0.02 + 0.002).float()
        zp = torch.randint(0, 16, (N, ng), dtype=torch.uint8, device="cuda")
        int4_bytes = N * K // 2
        C = copies_for(int4_bytes, l2)
        ours = Ours(lib, K, N, B, scales, None, C)
        ours_zp = Ours(lib, K, N, B, scales, zp, 1)
        peers = Peers(K, N, l2)
        act = torch.tensor(0.05, device="cuda")

        sess_nb = sess_ours = None
        if ort is not None:
            t0 = time.time()
            m_nb, m_ours = ort_models(K, N, B.cpu().numpy(), scales.cpu().numpy(), C)
            sess_nb, sess_ours = ort_session(ort, m_nb), ort_session(ort, m_ours)
            del m_nb, m_ours
            print(f"  ORT sessions for {K}x{N} ({C} nodes each) built in {time.time() - t0:.1f} s")

        for M in ms:
            A = torch.randn(M, K, device="cuda") * 2
            Y = torch.empty(M, N, device="cuda")
            ws = ours.workspace(M)
            ws_zp = ours_zp.workspace(M)
            # correctness: both act modes, with/without zero points, every kernel that takes this M
            for per_token in (False, True):
                for which, o, w_zp in (("nozp", ours, None), ("zp", ours_zp, zp)):
                    ref = reference(A, B, scales, w_zp, act, per_token, K)
                    for fp in paths_for(M):
                        Y.fill_(float("nan"))
                        o.run(A, Y, ws_zp if which == "zp" else ws, act, per_token, force_path=fp)
                        torch.cuda.synchronize()
                        err = (Y.double() - ref).abs().max().item() / ref.abs().max().item()
                        rel = ((Y.double() - ref).norm() / ref.norm()).item()
                        ok = bool(torch.isfinite(Y).all().item()) and err < 1e-5
                        checks.append(dict(K=K, N=N, M=M, per_token=per_token, zp=which, path=fp, max_err=err,
                                           rel=rel, ok=ok))
                        if not ok:
                            print(f"  MISMATCH K={K} N={N} M={M} per_token={per_token} {which} path={fp}: "
                                  f"max err {err:.2e} rel {rel:.2e}")
            # timing: ours (auto and the forced variants), then every peer
            def ours_t(fp):
                return graph_time(lambda i: ours.run(A, Y, ws, act, False, copy=i, force_path=fp), C)

            auto = lib.fptq_cuda_auto_path(K, N, G, M)
            row = dict(K=K, N=N, M=M, copies=C, ours_path=PATH_NAMES.get(auto, str(auto)), ours_us=ours_t(0))
            if M > 16:
                row["mma_us"], row["quant_us"] = ours_t(4), ours_t(3)
                if has_wgmma():
                    row["wgmma_us"], row["wgmma_quant_us"] = ours_t(7), ours_t(9)
            else:
                row["decode_v4_us"], row["decode_v5_us"], row["quant_us"] = ours_t(5), ours_t(1), ours_t(3)
            if M == 1:
                row["read_probe_us"] = ours_t(8)
            row.update(peers.times(M))
            if sess_nb is not None:
                for key, sess, a_np, dt in (("nbits", sess_nb, A.half().cpu().numpy(), np.float16),
                                            ("ours_ort", sess_ours, A.cpu().numpy(), np.float32)):
                    try:
                        k_us, w_us = ort_time(ort, sess, a_np, N, C, dt)
                        row[f"{key}_kernel_us"], row[f"{key}_wall_us"] = k_us, w_us
                    except Exception as e:
                        print(f"  ORT {key} failed: {e}")
            ops = 2.0 * M * N * K
            row["ours_GBps"] = int4_bytes / (row["ours_us"] * 1e-6) / 1e9
            row["ours_TOPS"] = ops / (row["ours_us"] * 1e-6) / 1e12
            rows.append(row)
            print("  " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
        del ours, ours_zp, peers, sess_nb, sess_ours
        torch.cuda.empty_cache()

    n_bad = sum(not c["ok"] for c in checks)
    worst = max([c["max_err"] for c in checks if "G" not in c] + [0.0])
    print(f"correctness: {len(checks) - n_bad}/{len(checks)} ok, worst max|err|/max|ref| {worst:.2e}")
    md = report(name, prop, l2, hbm, rows, checks, ort, " ".join(sys.argv[1:]))
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, rows=rows, checks=checks), indent=1))
    return 1 if n_bad else 0


def _f(v, fmt="{:.1f}"):
    return "–" if v is None else fmt.format(v)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _quant(r):
    return r.get("wgmma_quant_us") if r.get("ours_path") == "wgmma" else r.get("quant_us")


def _var(r):
    if r.get("decode_v4_us") is not None:
        return f"v4 {r['decode_v4_us']:.1f} / v5 {_f(r.get('decode_v5_us'))}"
    return f"{_f(r.get('wgmma_us'))} / {_f(r.get('mma_us'))}"


def report(name, prop, l2, hbm, rows, checks, ort, argv):
    date = datetime.date.today().isoformat()
    has_nb = any(r.get("nbits_kernel_us") is not None for r in rows)
    lines = [
        "# W4A8MatMul on the GPU: kernel benchmark",
        "",
        f"Card: **{name}** ({prop.multi_processor_count} SMs, L2 {l2 >> 20} MiB), {date}; torch {torch.__version__}"
        + (f", onnxruntime {ort.__version__}" if ort is not None else "") + ".",
        f"Produced by `python bench/kernels_gpu.py {argv}` (see its docstring).",
        "",
        "Times are µs per matmul, median of CUDA-graph replays (events) rotating over enough weight copies that "
        "weights stream from HBM. *ours* = activation quantization kernel + W4A8 kernel chosen automatically "
        "(static act scale, no zero points, group 128), the kernel it chose in the *auto path* column (its "
        "quantization kernel in *quant part*: the tiled one for wgmma); "
        "*wgmma* = the sm_90a wgmma prefill kernel forced, with its own (tiled) quantization kernel; *mma.sync* = "
        "the mma.sync prefill kernel (128×64 tiles) forced. Peers: cuBLAS fp16 `torch.matmul`; int8 `torch._int_mm` "
        "(M padded to 32); FP8 e4m3 `torch._scaled_mm` (bf16 out, M padded to 16); tinygemm W4A16 "
        "`torch._weight_int4pack_mm` (bf16, group 128). The int8/FP8 peers are timed on already-quantized "
        "activations; ours includes its quantization kernel (float32 in, float32 out).",
        f"GB/s counts the int4 weight bytes only (N·K/2) against HBM {_f(hbm and hbm / 1e12, '{:.2f}')} TB/s; "
        f"TOPS = 2·M·N·K / time against the dense int8 peak {INT8_PEAK / 1e12:.0f} TOPS.",
        "",
        "| K×N | M | cuBLAS fp16 | int8 _int_mm | FP8 _scaled_mm | W4A16 tinygemm |"
        + (" MatMulNBits kern |" if has_nb else "")
        + " ours | auto path | (quant part) | wgmma / mma.sync prefill, or decode v4 / v5 | read probe "
        "| ours vs fp16 | ours vs FP8 | ours vs int8 | wgmma vs fp16 / FP8 | weight GB/s (% HBM) | TOPS (% int8 peak) |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if has_nb else "")
        + "---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        hb = "" if hbm is None else f" ({100 * r['ours_GBps'] * 1e9 / hbm:.0f}%)"
        lines.append(
            f"| {r['K']}×{r['N']} | {r['M']} | {_f(r.get('fp16_us'))} | {_f(r.get('int8_us'))} | "
            f"{_f(r.get('fp8_us'))} | {_f(r.get('w4a16_us'))} |"
            + (f" {_f(r.get('nbits_kernel_us'))} |" if has_nb else "")
            + f" **{r['ours_us']:.1f}** | {r.get('ours_path', '–')} | {_f(_quant(r))} | {_var(r)} | {_f(r.get('read_probe_us'))} | "
            f"{_f(_ratio(r.get('fp16_us'), r['ours_us']), '{:.2f}×')} | "
            f"{_f(_ratio(r.get('fp8_us'), r['ours_us']), '{:.2f}×')} | "
            f"{_f(_ratio(r.get('int8_us'), r['ours_us']), '{:.2f}×')} | "
            f"{_f(_ratio(r.get('fp16_us'), r.get('wgmma_us')), '{:.2f}×')} / "
            f"{_f(_ratio(r.get('fp8_us'), r.get('wgmma_us')), '{:.2f}×')} | {r['ours_GBps']:.0f}{hb} | "
            f"{r['ours_TOPS']:.0f} ({100 * r['ours_TOPS'] * 1e12 / INT8_PEAK:.0f}%) |")
    big = [c for c in checks if "G" not in c]
    exact = [c for c in checks if "G" in c]
    n_bad = sum(not c["ok"] for c in big)
    worst = max([c["max_err"] for c in big] + [0.0])
    worst_rel = max([c["rel"] for c in big] + [0.0])
    lines += ["", f"Correctness on these shapes (vs float64 reference, static/per_token × zero points or not × "
              f"every kernel variant for the M, wgmma included): {len(big) - n_bad}/{len(big)} ok; worst "
              f"max|err|/max|ref| {worst:.1e}, worst ‖err‖/‖ref‖ {worst_rel:.1e}.",
              f"Exact checks on ragged shapes (K not a multiple of the group, groups 16…1024, odd N; power-of-two "
              f"scales so the numpy reference is exact), every kernel variant: "
              f"{sum(c['ok'] for c in exact)}/{len(exact)} bit-exact.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
