"""fptq::W4A8MatMul (libfptq_ops.so) against the numpy reference."""

from __future__ import annotations

import ctypes
import zlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from fptq_onnx import custom_ops  # noqa: E402
from fptq_onnx.errors import FptqError  # noqa: E402

try:
    LIB = custom_ops.library_path()
except FptqError as e:  # pragma: no cover - only when the library was not built
    pytest.skip(f"libfptq_ops.so not built: {e}", allow_module_level=True)

_CLIB = ctypes.CDLL(str(LIB))
_CLIB.fptq_ops_isa_supported.restype = ctypes.c_int
_CLIB.fptq_ops_isa_supported.argtypes = [ctypes.c_char_p]
ALL_ISAS = ["scalar", "avx2", "avxvnni", "avx512vnni", "avx512vnni512", "amx"]
ISAS = [i for i in ALL_ISAS if _CLIB.fptq_ops_isa_supported(i.encode())]
# Every kernel path, skipped (with the reason) where this CPU, OS or build lacks it.
# "amx" runs its tile kernel for M >= 16 and the avx512vnni512 kernels below.
ISA_PARAMS = [
    pytest.param(i, id=i, marks=pytest.mark.skipif(i not in ISAS, reason=f"ISA {i} not supported by this CPU/OS/build"))
    for i in ALL_ISAS
]


@pytest.fixture
def isa(request, monkeypatch):
    """Force the kernel variant (the kernel reads FPTQ_OPS_ISA when the session is created)."""
    name = getattr(request, "param", None)
    if name is None:
        monkeypatch.delenv("FPTQ_OPS_ISA", raising=False)
    else:
        monkeypatch.setenv("FPTQ_OPS_ISA", name)
    return name


# ---------------------------------------------------------------- helpers


def make_weights(rng, K, N, G, with_zp):
    ng = -(-K // G)
    q = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
    # powers of two: every float operation of the op is exact for the tested sizes
    scales = (2.0 ** -rng.integers(5, 8, size=(ng, N))).astype(np.float32)
    zp = rng.integers(0, 16, size=(ng, N), dtype=np.uint8) if with_zp else np.full((ng, N), 8, np.uint8)
    B, s_ng, zp_ng = custom_ops.pack_weights(q, scales, zp, G)
    if not with_zp:
        assert zp_ng is None
    return B, s_ng, zp_ng


def make_model(
    K,
    N,
    G,
    act_mode,
    B,
    scales,
    zp=None,
    act_scale=None,
    bias=None,
    a_rank=2,
    a_dtype=TensorProto.FLOAT,
    weights_as_inputs=False,
    attrs=None,
):
    """One W4A8MatMul node; B/scales/zp/act_scale/bias are initializers (or graph inputs)."""
    inputs = [helper.make_tensor_value_info("A", a_dtype, [f"d{i}" for i in range(a_rank - 1)] + [K])]
    inits = []
    names = ["A"]
    for name, arr in (("B", B), ("scales", scales), ("zero_points", zp), ("act_scale", act_scale), ("bias", bias)):
        if arr is None:
            names.append("")
            continue
        names.append(name)
        arr = np.asarray(arr)
        if weights_as_inputs and name in ("B", "scales", "zero_points"):
            inputs.append(
                helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
            )
        else:
            inits.append(numpy_helper.from_array(arr, name))
    while names[-1] == "":
        names.pop()
    node_attrs = dict(K=K, N=N, group_size=G, act_mode=act_mode)
    node_attrs.update(attrs or {})
    node_attrs = {k: v for k, v in node_attrs.items() if v is not None}
    node = helper.make_node("W4A8MatMul", names, ["Y"], domain="fptq", name="w4a8", **node_attrs)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("fptq", 1)], ir_version=10
    )
    return model


def session(model, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    custom_ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def make_activations(rng, shape, act_mode, exact):
    a = (rng.standard_normal(shape) * 6).astype(np.float32)
    if exact and act_mode == "per_token" and a.size:
        # put |a| max = 127/8 in every row => s_a = 1/8 exactly
        flat = a.reshape(-1, shape[-1])
        flat[:] = np.clip(flat, -15, 15)
        flat[:, rng.integers(0, shape[-1])] = 127 / 8
        a = flat.reshape(shape)
    return a


SHAPES = [  # (K, N, G)
    (576, 40, 128),  # ragged last group (4.5 groups)
    (100, 24, 32),  # ragged, 4 groups of 32
    (70, 16, 32),  # ragged, odd number of groups of 32
    (256, 13, 64),  # N not a multiple of the 8-column panel
    (512, 9, 256),
    (80, 11, 16),  # group 16, ragged
]
M_SHAPES = [(0,), (1,), (3,), (64,), (2, 3)]


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("isa", ISA_PARAMS, indirect=True)
@pytest.mark.parametrize("K,N,G", SHAPES)
@pytest.mark.parametrize("lead", M_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference_exactly(K, N, G, lead, act_mode, threads, isa):
    """Power-of-two scales: every float op is exact, so y must equal the reference bit for bit."""
    rng = np.random.default_rng(zlib.crc32(repr((K, N, G, lead, act_mode)).encode()))
    for variant in range(2):
        with_zp, with_bias = bool(variant), bool((variant + threads) % 2)
        B, s, zp = make_weights(rng, K, N, G, with_zp)
        bias = (rng.integers(-64, 64, size=N) / 16).astype(np.float32) if with_bias else None
        act_scale = np.array(0.125, np.float32) if act_mode == "static" else None
        model = make_model(K, N, G, act_mode, B, s, zp, act_scale, bias, a_rank=len(lead) + 1)
        a = make_activations(rng, lead + (K,), act_mode, exact=True)
        (y,) = session(model, threads).run(None, {"A": a})
        ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, act_mode)
        assert y.shape == lead + (N,)
        np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("isa", ISA_PARAMS, indirect=True)
@pytest.mark.parametrize("K,N,G", SHAPES)
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_every_isa(K, N, G, act_mode, isa):
    rng = np.random.default_rng(7)
    B, s, zp = make_weights(rng, K, N, G, with_zp=True)
    bias = (rng.integers(-64, 64, size=N) / 16).astype(np.float32)
    act_scale = np.array([0.125], np.float32) if act_mode == "static" else None
    model = make_model(K, N, G, act_mode, B, s, zp, act_scale, bias)
    sess = session(model, 2)
    for M in (1, 5, 67):
        a = make_activations(rng, (M, K), act_mode, exact=True)
        (y,) = sess.run(None, {"A": a})
        ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, act_mode)
        np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("isa", ISA_PARAMS, indirect=True)
@pytest.mark.parametrize("K,N,G,M", [(1100, 200, 512, 290), (640, 136, 32, 40), (4100, 24, 4096, 33)])
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_blocked_gemm_exact(K, N, G, M, act_mode, isa):
    """Shapes that cross the GEMM cache blocks: > 256 rows (two row blocks, the last partial),
    > 8 column panels (an odd panel count in the last block), groups longer than one K block
    (int32 sums carried across blocks), ragged last groups, partial column panels."""
    rng = np.random.default_rng(zlib.crc32(repr((K, N, G, M)).encode()))
    B, s, zp = make_weights(rng, K, N, G, with_zp=True)
    bias = (rng.integers(-64, 64, size=N) / 16).astype(np.float32)
    act_scale = np.array(0.125, np.float32) if act_mode == "static" else None
    a = make_activations(rng, (M, K), act_mode, exact=True)
    (y,) = session(make_model(K, N, G, act_mode, B, s, zp, act_scale, bias), 2).run(None, {"A": a})
    ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, act_mode)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("isa", ISA_PARAMS, indirect=True)
@pytest.mark.parametrize("G", [16, 128, 1024])
@pytest.mark.parametrize("w_nibble,zp_value", [(15, 0), (0, 15), (15, 8)])
@pytest.mark.parametrize("a_value", [-1e4, 1e4])
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_extreme_values(G, w_nibble, zp_value, a_value, act_mode, isa):
    """Largest |products| (q = -128 / 127 / -127, nibbles 0 / 15): no int16 overflow anywhere."""
    K, N = 2 * G, 8
    ng = 2
    B = np.full((N, ng, G // 2), w_nibble * 0x11, np.uint8)
    s = np.full((N, ng), 2.0**-10, np.float32)
    zp = np.full((N, ng), zp_value, np.uint8)
    act_scale = np.array(1.0, np.float32) if act_mode == "static" else None
    a = np.full((17, K), a_value, np.float32)  # 17 rows: the amx path runs its tiles
    (y,) = session(make_model(K, N, G, act_mode, B, s, zp, act_scale)).run(None, {"A": a})
    ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, None, K, N, G, act_mode)
    np.testing.assert_array_equal(y, ref)
    q = -128 if (act_mode == "static" and a_value < 0) else (127 if a_value > 0 else -127)
    s_a = 1.0 if act_mode == "static" else 1e4 / 127
    np.testing.assert_allclose(ref, s_a * 2.0**-10 * q * (w_nibble - zp_value) * K, rtol=1e-6)


@pytest.mark.parametrize("isa", ISA_PARAMS, indirect=True)
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_general_scales_within_float_rounding(act_mode, isa):
    """Arbitrary float scales / activations: equal up to float32 summation order."""
    rng = np.random.default_rng(11)
    K, N, G = 1000, 70, 128
    q = rng.integers(-8, 8, size=(K, N), dtype=np.int8)
    scales = rng.uniform(0.001, 0.05, size=(-(-K // G), N)).astype(np.float32)
    B, s, zp = custom_ops.pack_weights(q, scales, None, G)
    bias = rng.standard_normal(N).astype(np.float32)
    act_scale = np.array(0.0371, np.float32) if act_mode == "static" else None
    model = make_model(K, N, G, act_mode, B, s, zp, act_scale, bias, a_rank=3)
    a = (rng.standard_normal((2, 9, K)) * 2).astype(np.float32)
    a[0, 0, :5] = [0.0371 * 0.5, 0.0371 * 1.5, -0.0371 * 2.5, 1e3, -1e3]  # ties and clipping
    (y,) = session(model, 2).run(None, {"A": a})
    ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, act_scale, bias, K, N, G, act_mode)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_weights_as_graph_inputs():
    """Non-constant B/scales/zero_points (re-laid out every call) give the same result."""
    rng = np.random.default_rng(3)
    K, N, G = 192, 20, 64
    B, s, zp = make_weights(rng, K, N, G, with_zp=True)
    act_scale = np.array(0.25, np.float32)
    model = make_model(K, N, G, "static", B, s, zp, act_scale, None, weights_as_inputs=True)
    sess = session(model, 2)
    a = make_activations(rng, (4, K), "static", exact=True)
    for _ in range(2):
        B2, s2, zp2 = make_weights(rng, K, N, G, with_zp=True)
        (y,) = sess.run(None, {"A": a, "B": B2, "scales": s2, "zero_points": zp2})
        ref = custom_ops.reference_w4a8_matmul(a, B2, s2, zp2, act_scale, None, K, N, G, "static")
        np.testing.assert_array_equal(y, ref)


def test_act_scale_ignored_in_per_token_mode():
    rng = np.random.default_rng(5)
    K, N, G = 128, 8, 128
    B, s, zp = make_weights(rng, K, N, G, with_zp=False)
    model = make_model(K, N, G, "per_token", B, s, None, np.array(123.0, np.float32))
    a = make_activations(rng, (3, K), "per_token", exact=True)
    a[1] = 0  # all-zero row: s_a = 1, y = 0
    (y,) = session(model).run(None, {"A": a})
    ref = custom_ops.reference_w4a8_matmul(a, B, s, zp, None, None, K, N, G, "per_token")
    np.testing.assert_array_equal(y, ref)
    assert not y[1].any()


# ---------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("act_mode", ["static", "per_token"])
@pytest.mark.parametrize("signed", [True, False])
def test_reference_equals_qdq_matmul(act_mode, signed):
    """reference == QuantizeLinear/DequantizeLinear(A) @ DequantizeLinear(W) (blocked, axis 0) + bias."""
    rng = np.random.default_rng(1)
    K, N, G = 300, 17, 64
    ng = -(-K // G)
    if signed:
        q = rng.integers(-8, 8, size=(K, N), dtype=np.int8)
        zp = rng.integers(-8, 8, size=(ng, N), dtype=np.int8)
    else:
        q = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
        zp = rng.integers(0, 16, size=(ng, N), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(ng, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    a = rng.standard_normal((6, K)).astype(np.float32)
    act_scale = np.float32(0.02)

    B, s_ng, zp_ng = custom_ops.pack_weights(q, scales, zp, G)
    ref = custom_ops.reference_w4a8_matmul(a, B, s_ng, zp_ng, act_scale, bias, K, N, G, act_mode)

    # plain numpy QDQ
    w = (q.astype(np.float64) - np.repeat(zp.astype(np.float64), G, axis=0)[:K]) * np.repeat(scales, G, axis=0)[:K]
    if act_mode == "static":
        s_a = np.full((6, 1), act_scale, np.float32)
        qa = np.clip(np.rint(a / act_scale), -128, 127)
    else:
        s_a = (np.abs(a).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
        qa = np.clip(np.rint(a / s_a), -127, 127)
    plain = (qa * s_a.astype(np.float64)) @ w + bias
    np.testing.assert_allclose(ref, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())


def test_static_quantization_equals_onnx_quantize_linear():
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((4, 333)) * 3).astype(np.float32)
    s = np.float32(0.0234)
    a[0, :4] = [s * 0.5, s * 2.5, -s * 3.5, 1e6]
    node = helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"])
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("q", TensorProto.INT8, list(a.shape))],
        initializer=[numpy_helper.from_array(np.array(s)), numpy_helper.from_array(np.array(0, np.int8), "z")],
    )
    graph.initializer[0].name = "s"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    (q_ort,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})
    q_ref, _ = custom_ops.quantize_activations(a, s, "static")
    np.testing.assert_array_equal(q_ref, q_ort)


def test_pack_weights_layout():
    rng = np.random.default_rng(4)
    K, N, G = 100, 5, 32
    q = rng.integers(-8, 8, size=(K, N), dtype=np.int8)
    scales = rng.uniform(0.1, 1, size=(4, N)).astype(np.float32)
    B, s, zp = custom_ops.pack_weights(q, scales, None, G)
    assert B.shape == (N, 4, 16) and B.dtype == np.uint8 and zp is None
    assert s.shape == (N, 4)
    nib = custom_ops.unpack_weights(B, 4 * G)
    np.testing.assert_array_equal(nib[:, :K], q.T.astype(np.int16) + 8)
    assert (nib[:, K:] == 8).all()  # ragged padding = zero point
    assert B[2, 1, 3] == ((int(q[32 + 6, 2]) + 8) | ((int(q[32 + 7, 2]) + 8) << 4))
    # unsigned weights without zero points: ONNX default zero point 0 must be explicit
    _, _, zp_u = custom_ops.pack_weights(q.astype(np.int16).clip(0).astype(np.uint8), scales, None, G)
    assert zp_u is not None and not zp_u.any()


# ---------------------------------------------------------------- bad input


def _expect_error(model, feed, pattern, threads=1):
    with pytest.raises(Exception, match=pattern):
        session(model, threads).run(None, feed)


def _good(K=128, N=8, G=64, act_mode="static"):
    rng = np.random.default_rng(0)
    B, s, zp = make_weights(rng, K, N, G, with_zp=True)
    a = rng.standard_normal((2, K)).astype(np.float32)
    return rng, B, s, zp, a


def test_bad_a_dtype():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B, s, zp, np.float32(0.1), a_dtype=TensorProto.DOUBLE)
    _expect_error(model, {"A": a.astype(np.float64)}, r"tensor\(double\)")


def test_bad_b_dtype():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B.view(np.int8), s, zp, np.float32(0.1))
    _expect_error(model, {"A": a}, r"tensor\(int8\)")


def test_bad_a_last_dim():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B, s, zp, np.float32(0.1))
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "k"  # let the bad shape reach the kernel
    _expect_error(model, {"A": np.zeros((2, 127), np.float32)}, r"input 'A' has shape \[2, 127\].*K=128")


def test_bad_a_scalar():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B, s, zp, np.float32(0.1), a_rank=1)
    model.graph.input[0].type.tensor_type.shape.ClearField("dim")
    _expect_error(model, {"A": np.array(1.0, np.float32)}, r"input 'A' has shape \[\]")


def test_bad_b_shape():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B[:, :1], s, zp, np.float32(0.1))
    _expect_error(model, {"A": a}, r"input 'B' has shape \[8, 1, 32\], expected \[8, 2, 32\]")


def test_b_shape_vs_group_size():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 32, "static", B, s, zp, np.float32(0.1))  # attrs say G=32
    _expect_error(model, {"A": a}, r"input '(B|scales)' has shape")


def test_bad_scales_shape():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B, s[:, :1], zp, np.float32(0.1))
    _expect_error(model, {"A": a}, r"input 'scales' has shape \[8, 1\], expected \[8, 2\]")


def test_bad_scales_shape_graph_input():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B, s, zp, np.float32(0.1), weights_as_inputs=True)
    feed = {"A": a, "B": B, "scales": s[:7], "zero_points": zp}
    model.graph.input[2].type.tensor_type.shape.dim[0].dim_value = 7
    _expect_error(model, feed, r"input 'scales' has shape \[7, 2\]")


def test_bad_zero_points():
    _, B, s, zp, a = _good()
    _expect_error(make_model(128, 8, 64, "static", B, s, zp[:, :1], np.float32(0.1)), {"A": a}, r"'zero_points' has shape")
    bad = zp.copy()
    bad[3, 1] = 16
    _expect_error(make_model(128, 8, 64, "static", B, s, bad, np.float32(0.1)), {"A": a}, r"zero_points must be in 0\.\.15")


def test_missing_act_scale_static():
    _, B, s, zp, a = _good()
    _expect_error(make_model(128, 8, 64, "static", B, s, zp, None), {"A": a}, r"'act_scale' is required.*static")


@pytest.mark.parametrize("value", [np.zeros((2,), np.float32), np.float32(0), np.float32(-1), np.float32(np.nan)])
def test_bad_act_scale(value):
    _, B, s, zp, a = _good()
    _expect_error(make_model(128, 8, 64, "static", B, s, zp, value), {"A": a}, r"'act_scale' must be")


def test_bad_bias():
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B, s, zp, np.float32(0.1), np.zeros(9, np.float32))
    _expect_error(model, {"A": a}, r"input 'bias' has shape \[9\], expected \[8\]")


def test_unknown_act_mode():
    _, B, s, zp, a = _good()
    _expect_error(make_model(128, 8, 64, "dynamic", B, s, zp, np.float32(0.1)), {"A": a}, r"unknown act_mode 'dynamic'")


@pytest.mark.parametrize("G", [48, 8, 0, -64])
def test_bad_group_size(G):
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B, s, zp, np.float32(0.1), attrs={"group_size": G})
    _expect_error(model, {"A": a}, r"group_size must be a power of two >= 16")


@pytest.mark.parametrize("missing", ["K", "N", "group_size", "act_mode"])
def test_missing_attribute(missing):
    _, B, s, zp, a = _good()
    model = make_model(128, 8, 64, "static", B, s, zp, np.float32(0.1), attrs={missing: None})
    _expect_error(model, {"A": a}, rf"attribute '{missing}'")


def test_library_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FPTQ_OPS_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(FptqError, match="FPTQ_OPS_LIBRARY"):
        custom_ops.library_path()
    monkeypatch.setenv("FPTQ_OPS_LIBRARY", str(LIB))
    assert custom_ops.library_path() == LIB


def test_isa_selection_reported():
    sel = ctypes.CDLL(str(LIB)).fptq_ops_selected_isa
    sel.restype = ctypes.c_char_p
    assert sel().decode() in ISAS
    assert "scalar" in ISAS
