"""FoldScalesPass: 1/s into the source, s into the consumers; the float function must not change."""

from __future__ import annotations

import numpy as np
import pytest
import tinygraph as t

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.fold_scales import FoldScalesPass
from fptq_onnx.plan import Equalization
from fptq_onnx.quant import lae_scales

L = t.L


def _scale(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.25, 4.0, n).astype(np.float32)


def _assert_same_function(before: dict, after: dict) -> None:
    for name in t.OUTPUTS:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5 * np.abs(before[name]).max())


def test_norm_fold_keeps_function_and_divides_norm():
    model = t.build()
    x = t.inputs()
    before = t.run(model, x)
    norm = t.init(model, f"{L}.input_layernorm.weight").copy()
    q = t.init(model, f"{L}.q_proj.weight").copy()
    s = lae_scales(np.abs(x).reshape(-1, t.K).max(axis=0) * norm)
    eq = Equalization(f"{L}.input_layernorm", "norm", [f"{L}.q_proj", f"{L}.k_proj", f"{L}.v_proj"], s, "lae")
    result = FoldScalesPass([eq])(model)
    assert result.modified
    np.testing.assert_allclose(t.init(result.model, f"{L}.input_layernorm.weight"), norm / s, rtol=1e-6)
    np.testing.assert_allclose(t.init(result.model, f"{L}.q_proj.weight"), q * s[:, None], rtol=1e-6)
    _assert_same_function(before, t.run(result.model, x))
    # the fold moves range: the norm's output (the linears' input) now has max X_j / s_j per channel
    assert not np.allclose(t.init(result.model, f"{L}.input_layernorm.weight"), norm)


def test_linear_fold_with_bias_keeps_function():
    model = t.build()
    x = t.inputs()
    before = t.run(model, x)
    up_w, up_b = t.init(model, f"{L}.up_proj.weight").copy(), t.init(model, f"{L}.up_proj.bias").copy()
    s = _scale(t.F, 3)
    eq = Equalization(f"{L}.up_proj", "linear", [f"{L}.down_proj"], s, "lae")
    result = FoldScalesPass([eq])(model)
    assert result.modified
    np.testing.assert_allclose(t.init(result.model, f"{L}.up_proj.weight"), up_w / s[None, :], rtol=1e-6)
    np.testing.assert_allclose(t.init(result.model, f"{L}.up_proj.bias"), up_b / s, rtol=1e-6)
    _assert_same_function(before, t.run(result.model, x))


def test_linear_fold_gqa_source_scale_keeps_function():
    """v_proj -> repeat over query heads -> o_proj: the consumer's s repeats the producer's per KV head."""
    model = t.build()
    x = t.inputs()
    before = t.run(model, x)
    v_b = t.init(model, f"{L}.v_proj.bias").copy()
    o_w = t.init(model, f"{L}.o_proj.weight").copy()
    source = _scale(t.NKV, 4)
    consumer = source[t.repeat_kv_indices()]
    assert consumer.size == t.NQ != source.size
    eq = Equalization(f"{L}.v_proj", "linear", [f"{L}.o_proj"], consumer, "lae", source_scale=source)
    result = FoldScalesPass([eq])(model)
    np.testing.assert_allclose(t.init(result.model, f"{L}.v_proj.bias"), v_b / source, rtol=1e-6)
    np.testing.assert_allclose(t.init(result.model, f"{L}.o_proj.weight"), o_w * consumer[:, None], rtol=1e-6)
    _assert_same_function(before, t.run(result.model, x))


def test_several_folds_together_keep_function():
    model = t.build()
    x = t.inputs()
    before = t.run(model, x)
    src = _scale(t.NKV, 6)
    eqs = [
        Equalization(f"{L}.input_layernorm", "norm", [f"{L}.q_proj", f"{L}.k_proj", f"{L}.v_proj"], _scale(t.K, 5), "lae"),
        Equalization(f"{L}.v_proj", "linear", [f"{L}.o_proj"], src[t.repeat_kv_indices()], "lae", source_scale=src),
        Equalization(f"{L}.up_proj", "linear", [f"{L}.down_proj"], _scale(t.F, 7), "lae"),
    ]
    result = FoldScalesPass(eqs)(model)
    _assert_same_function(before, t.run(result.model, x))


def test_no_equalizations_is_not_modified():
    model = t.build()
    assert not FoldScalesPass([])(model).modified


def test_unknown_norm_source_errors():
    eq = Equalization(f"{L}.missing_layernorm", "norm", [f"{L}.q_proj"], _scale(t.K, 1), "lae")
    with pytest.raises(FptqError, match="missing_layernorm"):
        FoldScalesPass([eq])(t.build())


def test_unknown_kind_errors():
    eq = Equalization(f"{L}.input_layernorm", "bogus", [f"{L}.q_proj"], _scale(t.K, 1), "lae")
    with pytest.raises(FptqError, match="bogus"):
        FoldScalesPass([eq])(t.build())


def test_unknown_linear_source_errors():
    eq = Equalization(f"{L}.missing_proj", "linear", [f"{L}.down_proj"], _scale(t.F, 1), "lae")
    with pytest.raises(FptqError):
        FoldScalesPass([eq])(t.build())


def test_unknown_consumer_errors():
    eq = Equalization(f"{L}.input_layernorm", "norm", [f"{L}.missing_proj"], _scale(t.K, 1), "lae")
    with pytest.raises(FptqError):
        FoldScalesPass([eq])(t.build())
