"""fptq::W4A8MatMul on CUDAExecutionProvider against the numpy reference and the CPU op.

Needs a CUDA GPU, onnxruntime-gpu and a libfptq_ops.so built with CUDA (marked `gpu`;
CI deselects them with -m "not gpu"); the `test_direct_*` tests call the library's
`fptq_cuda_*` entry points on torch CUDA buffers and need torch with CUDA instead of
onnxruntime-gpu, so every kernel variant is checked where only torch is installed.  Every session sets
session.disable_cpu_ep_fallback=1, so a W4A8MatMul node that did not land on the
GPU fails the session instead of silently running on the CPU.
"""

from __future__ import annotations

import ctypes
import os
import zlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from fptq_onnx import custom_ops  # noqa: E402
from fptq_onnx.errors import FptqError  # noqa: E402

pytestmark = pytest.mark.gpu

try:
    LIB = custom_ops.library_path()
except FptqError as e:  # pragma: no cover
    pytest.skip(f"libfptq_ops.so not built: {e}", allow_module_level=True)
if not hasattr(ctypes.CDLL(str(LIB)), "fptq_cuda_compiled"):
    pytest.skip("libfptq_ops.so was built without CUDA", allow_module_level=True)
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


# ---------------------------------------------------------------- helpers


def make_weights(rng, K, N, G, with_zp, exact=True):
    ng = -(-K // G)
    q = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
    if exact:  # powers of two: every float operation is exact, results must match bit for bit
        scales = (2.0 ** -rng.integers(5, 8, size=(ng, N))).astype(np.float32)
    else:
        scales = rng.uniform(0.001, 0.05, size=(ng, N)).astype(np.float32)
    zp = rng.integers(0, 16, size=(ng, N), dtype=np.uint8) if with_zp else np.full((ng, N), 8, np.uint8)
    return custom_ops.pack_weights(q, scales, zp, G)


def make_model(K, N, G, act_mode, B, scales, zp=None, act_scale=None, bias=None, a_rank=2, weights_as_inputs=False):
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [f"d{i}" for i in range(a_rank - 1)] + [K])]
    inits, names = [], ["A"]
    for name, arr in (("B", B), ("scales", scales), ("zero_points", zp), ("act_scale", act_scale), ("bias", bias)):
        if arr is None:
            names.append("")
            continue
        names.append(name)
        arr = np.asarray(arr)
        if weights_as_inputs and name in ("B", "scales", "zero_points"):
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    while names[-1] == "":
        names.pop()
    node = helper.make_node("W4A8MatMul", names, ["Y"], domain="fptq", K=K, N=N, group_size=G, act_mode=act_mode)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("fptq", 1)],
                             ir_version=10)


def cuda_session(model):
    if not HAS_CUDA_EP:
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.log_severity_level = 3
    custom_ops.register(so)
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])


def cpu_session(model):
    so = ort.SessionOptions()
    custom_ops.register(so)
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def make_activations(rng, shape, act_mode, exact=True):
    a = (rng.standard_normal(shape) * 6).astype(np.float32)
    if exact and act_mode == "per_token" and a.size:
        flat = a.reshape(-1, shape[-1])
        flat[:] = np.clip(flat, -15, 15)
        flat[:, rng.integers(0, shape[-1])] = 127 / 8  # s_a = 1/8 exactly
        a = flat.reshape(shape)
    return a


def _is_sm90():
    """The sm_90a wgmma prefill kernel runs on compute capability 9.0 only (asked through torch)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


WGMMA = "prefill_wgmma"  # the sm_90a wgmma prefill kernel (CUDA_NOTES.md v6 / v7)


@pytest.fixture
def cuda_path(request, monkeypatch):
    """Force a decode (v5 streaming / v4) or prefill kernel (read when the session creates the kernel)."""
    name = getattr(request, "param", None)
    if name == WGMMA and not _is_sm90():
        pytest.skip("the wgmma prefill kernel needs compute capability 9.0")
    if name is None:
        monkeypatch.delenv("FPTQ_OPS_CUDA_PATH", raising=False)
    else:
        monkeypatch.setenv("FPTQ_OPS_CUDA_PATH", name)
    return name


SHAPES = [  # (K, N, G)
    (576, 40, 128),  # ragged last group (4.5 groups)
    (100, 24, 32),  # ragged, groups of 32
    (70, 16, 32),  # ragged, odd number of groups
    (256, 13, 64),  # N not a multiple of 16
    (512, 9, 256),  # groups span two k-blocks
    (80, 11, 16),  # group 16 (padded to 32 on the GPU), ragged
    (1000, 300, 128),
    (2112, 200, 1024),  # 2 groups + ragged
]
MS = [1, 5, 16, 17, 128, 1000]


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("cuda_path", [None, "prefill128", WGMMA], indirect=True)
@pytest.mark.parametrize("K,N,G", SHAPES)
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_matches_reference_exactly(K, N, G, act_mode, cuda_path):
    """Power-of-two scales: every float op is exact, so the GPU must equal the reference bit for bit."""
    rng = np.random.default_rng(zlib.crc32(repr((K, N, G, act_mode)).encode()))
    for variant in range(4):
        with_zp, with_bias = bool(variant & 1), bool(variant & 2)
        B, s, zp = make_weights(rng, K, N, G, with_zp)
        bias = (rng.integers(-64, 64, size=N) / 16).astype(np.float32) if with_bias else None
        act_scale = np.array(0.125, np.float32) if act_mode == "static" else None
        sess = cuda_session(make_model(K, N, G, act_mode, B, s, zp, act_scale, bias))
        for M in MS:
            a = make_activations(rng, (M, K), act_mode)
            (y,) = sess.run(None, {"A": a})
            ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, act_mode)
            assert y.shape == (M, N)
            np.testing.assert_array_equal(y, ref, err_msg=f"M={M} zp={with_zp} bias={with_bias}")


@pytest.mark.parametrize("cuda_path", ["decode", "decode_v4", "prefill128", "prefill64", WGMMA], indirect=True)
@pytest.mark.parametrize("K,N,G", [(576, 40, 128), (100, 24, 32), (80, 11, 16), (512, 9, 256)])
def test_both_kernels_small_m(K, N, G, cuda_path):
    """M <= 16 through the decode kernel and through both prefill kernels (split-K)."""
    rng = np.random.default_rng(3)
    B, s, zp = make_weights(rng, K, N, G, with_zp=True)
    bias = (rng.integers(-64, 64, size=N) / 16).astype(np.float32)
    act_scale = np.array([0.125], np.float32)
    sess = cuda_session(make_model(K, N, G, "static", B, s, zp, act_scale, bias))
    for M in (1, 2, 7, 8, 9, 16):
        a = make_activations(rng, (M, K), "static")
        (y,) = sess.run(None, {"A": a})
        np.testing.assert_array_equal(y, custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, "static"))


@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_general_scales_match_cpu_op(act_mode):
    """Arbitrary float scales / activations: GPU equals the CPU op up to float32 summation order."""
    rng = np.random.default_rng(11)
    K, N, G = 4096 + 64, 512, 128
    B, s, zp = make_weights(rng, K, N, G, with_zp=True, exact=False)
    bias = rng.standard_normal(N).astype(np.float32)
    act_scale = np.array(0.05, np.float32) if act_mode == "static" else None
    model = make_model(K, N, G, act_mode, B, s, zp, act_scale, bias, a_rank=3)
    gpu, cpu = cuda_session(model), cpu_session(model)
    for lead in ((1, 1), (1, 5), (2, 64), (1, 1000)):
        a = (rng.standard_normal(lead + (K,)) * 2).astype(np.float32)
        (yg,) = gpu.run(None, {"A": a})
        (yc,) = cpu.run(None, {"A": a})
        ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, act_mode)
        scale = np.abs(ref).max()
        assert np.abs(yg - ref).max() <= 1e-5 * scale, lead
        assert np.abs(yg - yc).max() <= 1e-5 * scale, lead


def test_weights_as_graph_inputs():
    """B / scales / zero points that are not initializers are re-packed on the GPU every call."""
    rng = np.random.default_rng(5)
    K, N, G = 320, 72, 64
    sess = None
    for _ in range(2):
        B, s, zp = make_weights(rng, K, N, G, with_zp=True)
        act_scale = np.array(0.125, np.float32)
        if sess is None:
            sess = cuda_session(make_model(K, N, G, "static", B, s, zp, act_scale, weights_as_inputs=True))
        for M in (1, 33):
            a = make_activations(rng, (M, K), "static")
            (y,) = sess.run(None, {"A": a, "B": B, "scales": s, "zero_points": zp})
            np.testing.assert_array_equal(y, custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, None, K, N, G, "static"))


@pytest.mark.parametrize("G", [16, 128, 1024])
@pytest.mark.parametrize("w_nibble,zp_value", [(15, 0), (0, 15), (15, 8)])
@pytest.mark.parametrize("a_value", [-1e4, 1e4])
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_extreme_values(G, w_nibble, zp_value, a_value, act_mode):
    """Largest |products| (q = -128 / 127, nibbles 0 / 15): no overflow, exact magic-number conversion."""
    K, N, ng = 2 * G, 24, 2
    B = np.full((N, ng, G // 2), w_nibble * 0x11, np.uint8)
    s = np.full((N, ng), 2.0**-10, np.float32)
    zp = np.full((N, ng), zp_value, np.uint8)
    act_scale = np.array(1.0, np.float32) if act_mode == "static" else None
    sess = cuda_session(make_model(K, N, G, act_mode, B, s, zp, act_scale))
    for M in (3, 40):
        a = np.full((M, K), a_value, np.float32)
        (y,) = sess.run(None, {"A": a})
        np.testing.assert_array_equal(y, custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, None, K, N, G, act_mode))


def test_empty_and_leading_dims():
    rng = np.random.default_rng(9)
    K, N, G = 256, 32, 128
    B, s, zp = make_weights(rng, K, N, G, with_zp=False)
    sess = cuda_session(make_model(K, N, G, "per_token", B, s, a_rank=3))
    for lead in ((0, 4), (2, 3), (3, 40)):
        a = make_activations(rng, lead + (K,), "per_token")
        (y,) = sess.run(None, {"A": a})
        assert y.shape == lead + (N,)
        np.testing.assert_array_equal(y, custom_ops.reference_w4a8_matmul(a, B, s, zp, None, None, K, N, G, "per_token"))


def test_io_binding_on_device_no_fallback():
    """Inputs and outputs bound in GPU memory: the node runs on the GPU end to end."""
    rng = np.random.default_rng(13)
    K, N, G = 512, 256, 128
    B, s, zp = make_weights(rng, K, N, G, with_zp=True)
    act_scale = np.array(0.125, np.float32)
    sess = cuda_session(make_model(K, N, G, "static", B, s, zp, act_scale))
    a = make_activations(rng, (64, K), "static")
    a_dev = ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type([64, N], np.float32, "cuda", 0)
    io = sess.io_binding()
    io.bind_ortvalue_input("A", a_dev)
    io.bind_ortvalue_output("Y", y_dev)
    sess.run_with_iobinding(io)
    np.testing.assert_array_equal(y_dev.numpy(), custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, None, K, N, G, "static"))


# ---------------------------------------------------------------- direct entry points (torch buffers, no ORT)

PATHS = {"auto": 0, "decode": 1, "decode_v4": 5, "prefill128": 2, "prefill64": 4, WGMMA: 7}


@pytest.fixture(scope="module")
def direct():
    """(torch, the library with the fptq_cuda_* signatures set) or skip."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    lib = ctypes.CDLL(str(LIB))
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.fptq_cuda_packed_bytes.restype = ctypes.c_size_t
    lib.fptq_cuda_packed_bytes.argtypes = [i64, i64, i64, ctypes.c_int]
    lib.fptq_cuda_workspace_bytes.restype = ctypes.c_size_t
    lib.fptq_cuda_workspace_bytes.argtypes = [i64, i64, i64, i64, ctypes.c_int]
    lib.fptq_cuda_pack.restype = ctypes.c_char_p
    lib.fptq_cuda_pack.argtypes = [i64, i64, i64] + [vp] * 7
    lib.fptq_cuda_run.restype = ctypes.c_char_p
    lib.fptq_cuda_run.argtypes = [i64, i64, i64, ctypes.c_int, i64] + [vp] * 9 + [ctypes.c_int, ctypes.c_int]
    return torch, lib


def _run_direct(torch, lib, K, N, G, act_mode, B, s, zp, act_scale, bias, a, force_path, splits=0):
    """One fptq_cuda_pack + fptq_cuda_run on fresh device buffers; the output starts as NaN."""
    def dev(x):
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x)).cuda()

    def ptr(t):
        return None if t is None else ctypes.c_void_p(t.data_ptr())

    tB, ts, tz, tbias, tA = dev(B), dev(s), dev(zp), dev(bias), dev(a)
    tact = dev(np.asarray(act_scale if act_scale is not None else 1.0, np.float32).reshape(1))
    nb = [lib.fptq_cuda_packed_bytes(K, N, G, i) for i in range(3)]
    Bp = torch.empty(nb[0], dtype=torch.uint8, device="cuda")
    sc = torch.empty(nb[1] // 4, dtype=torch.float32, device="cuda")
    zc = torch.empty(nb[2], dtype=torch.int8, device="cuda") if tz is not None else None
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    err = lib.fptq_cuda_pack(K, N, G, ptr(tB), ptr(ts), ptr(tz), ptr(Bp), ptr(sc), ptr(zc), stream)
    assert err is None, err
    M = a.shape[0]
    ws = torch.empty(lib.fptq_cuda_workspace_bytes(K, N, G, M, int(tz is not None)), dtype=torch.uint8, device="cuda")
    Y = torch.full((M, N), float("nan"), device="cuda")
    err = lib.fptq_cuda_run(K, N, G, int(act_mode == "per_token"), M, ptr(tA), ptr(tact), ptr(tbias), ptr(Bp),
                            ptr(sc), ptr(zc), ptr(Y), ptr(ws), stream, force_path, splits)
    assert err is None, err
    return Y.cpu().numpy()


@pytest.mark.parametrize("path", ["auto", WGMMA, "prefill64"])
@pytest.mark.parametrize("K,N,G", SHAPES + [(320, 2048, 64), (4160, 136, 128)])
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_direct_prefill_exact(direct, K, N, G, act_mode, path):
    """Every prefill kernel, ragged K / N / M, with and without zero points and bias: bit-exact.

    (320, 2048, 64) at M = 1200 gives 160 (tile, split) units, more than the SMs of an H200, so the
    wgmma kernel's persistent loop and its stage ring cross unit boundaries (and its ping-pong
    schedule's turn hand-over crosses them too)."""
    torch, lib = direct
    if path == WGMMA and not _is_sm90():
        pytest.skip("the wgmma prefill kernel needs compute capability 9.0")
    rng = np.random.default_rng(zlib.crc32(repr((K, N, G, act_mode, path)).encode()))
    for variant in range(4):
        with_zp, with_bias = bool(variant & 1), bool(variant & 2)
        B, s, zp = make_weights(rng, K, N, G, with_zp)
        bias = (rng.integers(-64, 64, size=N) / 16).astype(np.float32) if with_bias else None
        act_scale = np.array(0.125, np.float32) if act_mode == "static" else None
        for M in (1, 17, 128, 129, 1200 if N == 2048 else 300):
            a = make_activations(rng, (M, K), act_mode)
            y = _run_direct(torch, lib, K, N, G, act_mode, B, s, zp, act_scale, bias, a, PATHS[path])
            ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, act_mode)
            np.testing.assert_array_equal(y, ref, err_msg=f"M={M} zp={with_zp} bias={with_bias}")


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("K,N,G", [(1000, 300, 128), (2112, 200, 1024), (576, 40, 32)])
def test_direct_wgmma_split_k(direct, K, N, G, splits):
    """The wgmma kernel's split-K (group-aligned k ranges, atomicAdd into a zeroed Y): exact."""
    torch, lib = direct
    if not _is_sm90():
        pytest.skip("the wgmma prefill kernel needs compute capability 9.0")
    rng = np.random.default_rng(splits)
    B, s, zp = make_weights(rng, K, N, G, with_zp=True)
    bias = (rng.integers(-64, 64, size=N) / 16).astype(np.float32)
    act_scale = np.array(0.125, np.float32)
    for M in (5, 200):
        a = make_activations(rng, (M, K), "static")
        y = _run_direct(torch, lib, K, N, G, "static", B, s, zp, act_scale, bias, a, PATHS[WGMMA], splits)
        np.testing.assert_array_equal(y, custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, "static"))


@pytest.mark.parametrize("G", [32, 128, 256])
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_direct_wgmma_extreme_values(direct, G, act_mode):
    """Largest |products| through the wgmma kernel (q = -128 / 127, nibbles 0 / 15, zero point 0 / 15)."""
    torch, lib = direct
    if not _is_sm90():
        pytest.skip("the wgmma prefill kernel needs compute capability 9.0")
    K, N = 2 * G, 136
    for w_nibble, zp_value in ((15, 0), (0, 15)):
        B = np.full((N, 2, G // 2), w_nibble * 0x11, np.uint8)
        s = np.full((N, 2), 2.0**-10, np.float32)
        zp = np.full((N, 2), zp_value, np.uint8)
        act_scale = np.array(1.0, np.float32) if act_mode == "static" else None
        for a_value in (-1e4, 1e4):
            a = np.full((130, K), a_value, np.float32)
            y = _run_direct(torch, lib, K, N, G, act_mode, B, s, zp, act_scale, None, a, PATHS[WGMMA])
            np.testing.assert_array_equal(y, custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, None, K, N, G, act_mode))


@pytest.mark.parametrize("K,N,G", [(4160, 136, 128), (320, 2048, 64), (2112, 200, 1024), (100, 24, 32)])
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_direct_wgmma_general_scales_match_mma_sync(direct, K, N, G, act_mode):
    """General (non power-of-two) scales, where float rounding shows any change of order: with the same
    k-split (none) the wgmma kernel gives the mma.sync prefill kernel's bits (exact integer group sums;
    the same float per group: I2FP in both for groups > 128, against their magic-number FADD for groups
    <= 128, where |sum| < 2^22 makes both exact; the same FFMA order over groups; the same epilogue), and
    with its own split-K it stays within float32 summation error of the float64 reference."""
    torch, lib = direct
    if not _is_sm90():
        pytest.skip("the wgmma prefill kernel needs compute capability 9.0")
    rng = np.random.default_rng(zlib.crc32(repr((K, N, G, act_mode, "general")).encode()))
    for with_zp in (False, True):
        B, s, zp = make_weights(rng, K, N, G, with_zp, exact=False)
        bias = rng.uniform(-1, 1, size=N).astype(np.float32)
        act_scale = np.array(0.0371, np.float32) if act_mode == "static" else None
        for M in (17, 300, 1200 if N == 2048 else 129):
            a = make_activations(rng, (M, K), act_mode, exact=False)
            args = (torch, lib, K, N, G, act_mode, B, s, zp, act_scale, bias, a)
            y_wg, y_mma = (_run_direct(*args, PATHS[p], splits=1) for p in (WGMMA, "prefill64"))
            np.testing.assert_array_equal(y_wg, y_mma, err_msg=f"M={M} zp={with_zp}")
            y_auto = _run_direct(*args, PATHS[WGMMA])
            ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, act_mode).astype(np.float64)
            for y in (y_wg, y_auto):
                assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), f"M={M} zp={with_zp}"


def test_direct_auto_rule(direct):
    """The auto rule (gpu::AutoPath): decode v4 / v5 up to M = 16, the wgmma kernel on sm_90 from M = 128
    with groups >= 128, the mma.sync kernel otherwise (CUDA_NOTES.md v6.1, v7)."""
    _, lib = direct
    lib.fptq_cuda_auto_path.restype = ctypes.c_int
    lib.fptq_cuda_auto_path.argtypes = [ctypes.c_int64] * 4
    prefill = PATHS[WGMMA] if _is_sm90() else PATHS["prefill64"]
    assert lib.fptq_cuda_auto_path(4096, 4096, 128, 8) == PATHS["decode_v4"]
    assert lib.fptq_cuda_auto_path(4096, 4096, 128, 16) == PATHS["decode"]
    assert lib.fptq_cuda_auto_path(4096, 4096, 128, 127) == PATHS["prefill64"]
    for M, G in ((128, 128), (4096, 128), (128, 1024)):
        assert lib.fptq_cuda_auto_path(4096, 4096, G, M) == prefill, (M, G)
    assert lib.fptq_cuda_auto_path(4096, 4096, 64, 4096) == PATHS["prefill64"]


# ---------------------------------------------------------------- a whole deploy model


def _deploy_model_path():
    p = os.environ.get("FPTQ_W4A8_MODEL")
    return p if p and os.path.isfile(p) else None


def _providers_from_profile(sess, op_type="W4A8MatMul"):
    """{node name: provider} of the nodes of `op_type`, from ORT's profile of the runs so far."""
    import json

    prof = sess.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    os.unlink(prof)
    out = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and args.get("op_name") == op_type:
            out[ev["name"].rsplit("_kernel_time", 1)[0]] = args.get("provider")
    return out


@pytest.mark.skipif(_deploy_model_path() is None, reason="set FPTQ_W4A8_MODEL to a w4a8 deploy model (.w4a8.onnx)")
def test_deploy_model_logits_cuda_vs_cpu():
    """The converted w4a8 model: every W4A8MatMul on the GPU, logits equal CPU within noise.

    With session.disable_cpu_ep_fallback=1 when ONNX Runtime accepts it for the whole graph;
    ORT keeps some shape arithmetic on the CPU on purpose, so if that makes the session fail, the
    placement of every W4A8MatMul node is read from ORT's profile instead.
    """
    import onnx

    path = _deploy_model_path()
    proto = onnx.load(path, load_external_data=False)
    n_ops = sum(n.op_type == "W4A8MatMul" for n in proto.graph.node)
    assert n_ops > 0
    try:
        gpu = cuda_session(path)
        strict = True
    except Exception as e:  # noqa: BLE001
        print(f"disable_cpu_ep_fallback=1 refused: {str(e)[:300]}")
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.log_severity_level = 3
        custom_ops.register(so)
        gpu = ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                         "CPUExecutionProvider"])
        strict = False
    cpu = cpu_session(path)
    rng = np.random.default_rng(0)
    T = 12
    feeds = {}
    for inp in gpu.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(0, 64, size=(1, T), dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, T), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(T, dtype=np.int64)[None]
        else:  # empty past key/values
            shape = [1 if isinstance(d, str) and "batch" in d else (0 if isinstance(d, str) else d) for d in inp.shape]
            feeds[inp.name] = np.zeros(shape, np.float32)
    outs = [o.name for o in gpu.get_outputs()]
    lg = gpu.run(outs, feeds)[0]
    lc = cpu.run(outs, feeds)[0]
    if not strict:
        placed = _providers_from_profile(gpu)
        assert len(placed) == n_ops, placed
        assert set(placed.values()) == {"CUDAExecutionProvider"}, placed
    print(f"strict={strict} W4A8MatMul nodes={n_ops} max|dlogits|={np.abs(lg - lc).max():.3e} "
          f"max|logits|={np.abs(lc).max():.3e} argmax agree={(lg.argmax(-1) == lc.argmax(-1)).mean():.3f}")
    # The ops agree to float rounding; rounding differences elsewhere (attention, norms) can flip
    # an activation's int8 rounding, so compare against the logits' scale, and the argmax.
    scale = np.abs(lc).max()
    assert np.abs(lg - lc).max() <= 2e-2 * scale
    assert (lg.argmax(-1) == lc.argmax(-1)).mean() >= 0.9
