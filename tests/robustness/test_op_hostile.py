"""Hostile ONNX models for fptq::W4A8MatMul: every case is refused with a clear ORT error, never a crash.

Each case edits one thing of an otherwise valid one-node model (op_graphs.OpCase):
an attribute, an input's rank, dtype, shape or values, the node's input count, a
declared size, or where its external data lives. The error comes at session
creation (attributes, constant initializers) or at run (inputs fed at run time),
and its message names the problem. custom_ops/run_asan_tests.sh runs this file
against an AddressSanitizer build too, so an out-of-bounds read fails there.
What the contract allows (a ragged last group, zero rows) is checked to work.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from fptq_onnx import custom_ops
from op_graphs import MISSING, OpCase, session

CASE = OpCase()  # K=128, N=8, G=64 (2 groups), static
S, Z, B = CASE.arrays["scales"], CASE.arrays["zero_points"], CASE.arrays["B"]
A = CASE.activations(2)


def _with(array: np.ndarray, index: tuple, value) -> np.ndarray:
    out = array.copy()
    out[index] = value
    return out


def _declared(name: str, array: np.ndarray, dims: list[int]) -> TensorProto:
    """An initializer whose declared dims do not match its (small) data."""
    tensor = numpy_helper.from_array(array, name)
    del tensor.dims[:]
    tensor.dims.extend(dims)
    return tensor


# id -> (model kwargs, feed, pattern of the error)
REFUSED = {
    # attributes
    "K=0": (dict(attrs={"K": 0}), None, r"attribute K must be in 1\.\.2147483647, got 0"),
    "K=2^31": (dict(attrs={"K": 2**31}), None, r"attribute K must be in 1\.\.2147483647, got 2147483648"),
    "K=int64max": (dict(attrs={"K": 2**63 - 1}), None, r"attribute K must be in 1\.\."),
    "N=-1": (dict(attrs={"N": -1}), None, r"attribute N must be in 1\.\."),
    "N=2^62": (dict(attrs={"N": 2**62}), None, r"attribute N must be in 1\.\."),
    "group=48": (dict(attrs={"group_size": 48}), None, r"group_size must be a power of two >= 16"),
    "group=2^21": (dict(attrs={"group_size": 2**21}), None, r"group_size must be a power of two >= 16 and <= 1048576"),
    "group-vs-weights": (dict(attrs={"group_size": 32}), None, r"input '(B|scales)' has shape"),
    "K-float": (dict(attrs={"K": 128.0}), None, r"missing or non-integer attribute 'K'"),
    "K-ints": (dict(attrs={"K": [128]}), None, r"missing or non-integer attribute 'K'"),
    "act_mode-int": (dict(attrs={"act_mode": 1}), None, r"non-string attribute 'act_mode'"),
    "act_mode-unknown": (dict(attrs={"act_mode": "dynamic"}), None, r"unknown act_mode 'dynamic'"),
    # ranks
    "A-rank0": (dict(a_dims=[]), {"A": np.array(1, np.float32)}, r"input 'A' has shape \[\]"),
    "B-rank2": (dict(replace={"B": B.reshape(8, -1)}), None, r"input 'B' has shape \[8, 64\], expected \[8, 2, 32\]"),
    "B-rank4": (dict(replace={"B": B[..., None]}), None, r"input 'B' has shape \[8, 2, 32, 1\]"),
    "scales-rank1": (dict(replace={"scales": S.reshape(-1)}), None, r"input 'scales' has shape \[16\]"),
    "scales-rank3": (dict(replace={"scales": S[None]}), None, r"input 'scales' has shape \[1, 8, 2\]"),
    "zp-rank1": (dict(replace={"zero_points": Z.reshape(-1)}), None, r"input 'zero_points' has shape \[16\]"),
    "bias-rank2": (dict(replace={"bias": np.zeros((1, 8), np.float32)}), None, r"input 'bias' has shape \[1, 8\]"),
    "act_scale-rank2": (dict(replace={"act_scale": np.full((1, 1), 0.1, np.float32)}), None,
                        r"'act_scale' must be a scalar"),
    # dtypes (ORT's own type check against the op schema)
    "A-float64": (dict(a_type=TensorProto.DOUBLE), {"A": A.astype(np.float64)}, r"tensor\(double\)"),
    "B-int8": (dict(replace={"B": B.view(np.int8)}), None, r"tensor\(int8\)"),
    "scales-float16": (dict(replace={"scales": S.astype(np.float16)}), None, r"tensor\(float16\)"),
    "zp-int8": (dict(replace={"zero_points": Z.view(np.int8)}), None, r"tensor\(int8\)"),
    "act_scale-float64": (dict(replace={"act_scale": np.array(0.1)}), None, r"tensor\(double\)"),
    "bias-int32": (dict(replace={"bias": np.zeros(8, np.int32)}), None, r"tensor\(int32\)"),
    # shapes
    "A-last-dim": (dict(a_dims=["M", "k"]), {"A": np.zeros((2, 127), np.float32)}, r"input 'A' has shape \[2, 127\].*K=128"),
    "scales-cols": (dict(replace={"scales": np.ones((8, 3), np.float32)}), None, r"'scales' has shape \[8, 3\]"),
    "zp-rows": (dict(replace={"zero_points": np.zeros((9, 2), np.uint8)}), None, r"'zero_points' has shape \[9, 2\]"),
    "bias-len": (dict(replace={"bias": np.zeros(9, np.float32)}), None, r"'bias' has shape \[9\], expected \[8\]"),
    # zero-size dimensions
    "B-empty": (dict(replace={"B": B[:0]}), None, r"input 'B' has shape \[0, 2, 32\]"),
    "scales-empty": (dict(replace={"scales": S[:, :0]}), None, r"input 'scales' has shape \[8, 0\]"),
    "zp-empty": (dict(replace={"zero_points": Z[:0]}), None, r"'zero_points' has shape \[0, 2\]"),
    "bias-empty": (dict(replace={"bias": np.zeros(0, np.float32)}), None, r"'bias' has shape \[0\]"),
    "act_scale-empty": (dict(replace={"act_scale": np.zeros(0, np.float32)}), None, r"'act_scale' must be a scalar"),
    "A-K-empty": (dict(a_dims=["M", "k"]), {"A": np.zeros((2, 0), np.float32)}, r"input 'A' has shape \[2, 0\]"),
    # values: NaN / inf / out of range
    "scales-nan": (dict(replace={"scales": _with(S, (3, 1), np.nan)}), None, r"'scales' must be finite, got nan at \[3, 1\]"),
    "scales-inf": (dict(replace={"scales": _with(S, (0, 0), np.inf)}), None, r"'scales' must be finite, got inf at \[0, 0\]"),
    "scales--inf": (dict(replace={"scales": _with(S, (7, 1), -np.inf)}), None, r"'scales' must be finite, got -inf"),
    "scales-nan-fed": (dict(graph_inputs=("scales",)), {"A": A, "scales": _with(S, (2, 0), np.nan)},
                       r"'scales' must be finite, got nan at \[2, 0\]"),
    "zp-16": (dict(replace={"zero_points": _with(Z, (3, 1), 16)}), None, r"zero_points must be in 0\.\.15, got 16"),
    "zp-255-fed": (dict(graph_inputs=("zero_points",)), {"A": A, "zero_points": _with(Z, (0, 0), 255)},
                   r"zero_points must be in 0\.\.15, got 255"),
    "act_scale-nan": (dict(replace={"act_scale": np.float32(np.nan)}), None, r"'act_scale' must be finite and > 0"),
    "act_scale-inf": (dict(replace={"act_scale": np.float32(np.inf)}), None, r"'act_scale' must be finite and > 0"),
    "act_scale-0": (dict(replace={"act_scale": np.float32(0)}), None, r"'act_scale' must be finite and > 0"),
    "act_scale-neg": (dict(replace={"act_scale": np.float32(-0.1)}), None, r"'act_scale' must be finite and > 0"),
    "act_scale-missing": (dict(replace={"act_scale": MISSING, "bias": MISSING}), None, r"'act_scale' is required"),
    # the node's inputs
    "7-inputs": (dict(extra_inputs=1), None, r"W4A8MatMul"),
    "B-missing": (dict(replace={"B": MISSING}), None, r"W4A8MatMul"),
    "scales-missing": (dict(replace={"scales": MISSING}), None, r"W4A8MatMul"),
    "B-fed-wrong-shape": (dict(graph_inputs=("B",)), {"A": A, "B": B[:, :1]}, r"input 'B' has shape \[8, 1, 32\]"),
    # huge declared dimensions
    "B-declared-2^40-rows": (dict(replace={"B": _declared("B", B, [2**40, 2, 32])}), None, r"'B'"),
    "scales-declared-huge": (dict(replace={"scales": _declared("scales", S, [8, 2**61])}), None,
                             r"'scales'|Integer overflow"),
    "A-declared-2^62": (dict(a_dims=[2**62, 128]), None, r"invalid dimensions for input: A"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_hostile_model_is_refused(case):
    kwargs, feed, pattern = REFUSED[case]
    model = CASE.model(**kwargs)
    with pytest.raises(Exception) as info:
        session(model).run(None, feed if feed is not None else {"A": A})
    first_line = str(info.value).strip().splitlines()[0]
    assert re.search(pattern, first_line), f"{pattern!r} not in the first line of: {info.value}"


def _external_model(tmp_path, location: str, offset: int = 0, length: int | None = None):
    """The valid model with B stored as external data at `location` (relative to the model dir)."""
    model = CASE.model()
    b = next(t for t in model.graph.initializer if t.name == "B")
    raw = b.raw_data
    b.ClearField("raw_data")
    b.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw) if length is None else length))):
        entry = b.external_data.add()
        entry.key, entry.value = key, value
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "outside.bin").write_bytes(raw)  # what an escaping path would read
    (model_dir / "weights.bin").write_bytes(raw)
    path = model_dir / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


EXTERNAL = {
    "inside": (dict(location="weights.bin"), None),
    "dotdot": (dict(location="../outside.bin"), r"escapes model directory|outside"),
    "absolute": (dict(location="ABS"), r"(?i)absolute path not allowed|escapes model directory"),
    "symlink-out": (dict(location="link.bin"), r"escapes model directory"),
    "past-end": (dict(location="weights.bin", offset=B.nbytes // 2), r"[Ee]xternal|offset|length|exceed|out of bounds"),
    "huge-length": (dict(location="weights.bin", length=2**40), r"[Ee]xternal|length|exceed|size"),
    "missing-file": (dict(location="nope.bin"), r"nope\.bin|[Ee]xternal|open|exist"),
}


@pytest.mark.parametrize("case", EXTERNAL, ids=list(EXTERNAL))
def test_external_data_stays_inside_the_model_directory(tmp_path, case):
    """ORT itself refuses external data outside the model's directory or past its file's end."""
    kwargs, pattern = EXTERNAL[case]
    if kwargs["location"] == "ABS":
        kwargs = {**kwargs, "location": str(tmp_path / "outside.bin")}
    path = _external_model(tmp_path, **kwargs)
    if case == "symlink-out":
        (path.parent / "link.bin").symlink_to(tmp_path / "outside.bin")
    if pattern is None:
        (y,) = session(str(path)).run(None, {"A": A})
        np.testing.assert_array_equal(y, CASE.reference(A))
        return
    with pytest.raises(Exception, match=pattern):
        session(str(path)).run(None, {"A": A})


# ---------------------------------------------------------------- what the contract allows


@pytest.mark.parametrize("K,N,G", [(100, 8, 64), (40, 16, 64), (16, 2, 2**20), (1, 3, 16)],
                         ids=["ragged", "group>K", "group=2^20", "K=1"])
@pytest.mark.parametrize("rows", [(0,), (0, 3), (), (5,)], ids=["M=0", "0x3", "rank1", "M=5"])
def test_legal_edge_shapes_match_the_reference(K, N, G, rows):
    case = OpCase(K=K, N=N, G=G)
    a = case.activations(int(np.prod(rows)) if rows else 1).reshape(*rows, K)
    (y,) = session(case.model(a_dims=[f"d{i}" for i in range(len(rows))] + [K])).run(None, {"A": a})
    assert y.shape == (*rows, N)
    np.testing.assert_array_equal(y, case.reference(a))


_CLIB = ctypes.CDLL(str(custom_ops.library_path()))
_CLIB.fptq_ops_isa_supported.restype = ctypes.c_int
ISAS = [i for i in ("scalar", "avx2", "avxvnni", "avx512vnni") if _CLIB.fptq_ops_isa_supported(i.encode())]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_activations_stay_in_their_row(monkeypatch, isa, act_mode, bad):
    """NaN/inf in A is not rejected (contract): only that row's output is unspecified, the rest exact."""
    monkeypatch.setenv("FPTQ_OPS_ISA", isa)
    case = OpCase(K=320, N=24, G=64, act_mode=act_mode)
    a = case.activations(70)
    a[[3, 40], [7, 319]] = bad
    (y,) = session(case.model(), threads=2).run(None, {"A": a})
    clean = np.ones(len(a), bool)
    clean[[3, 40]] = False
    np.testing.assert_array_equal(y[clean], case.reference(a[clean]))
    assert y.shape == (70, 24)
