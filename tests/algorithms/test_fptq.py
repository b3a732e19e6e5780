"""FPTQ's per-layer policy on a hand-made Calibration (chosen channel maxima), and LAE maths."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fptq_onnx.algorithms import fptq
from fptq_onnx.algorithms.common import apply_equalizations
from fptq_onnx.calibration import Calibration, CalibrationConfig, LinearStats
from planning import decoder_linears, float_weights, plan_with_stats
from fptq_onnx.errors import FptqError
from fptq_onnx.fakequant import apply_plan
from fptq_onnx.models.registry import layer_prefix, spec_for
from fptq_onnx.plan import ActMode
from fptq_onnx.quant import QuantizedWeight

V0, V1 = 10.0, 100.0
GROUPS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def channel_max(k: int, peak: float, seed: int) -> np.ndarray:
    """Channel maxima in [0.05, 0.5] * peak with exactly one channel at `peak`."""
    rng = np.random.default_rng(seed)
    m = (rng.uniform(0.05, 0.5, k) * peak).astype(np.float32)
    m[seed % k] = peak
    return m


def make_calib(model, peaks: dict[str, float], default: float = 1.0) -> Calibration:
    """peaks: linear suffix (e.g. 'self_attn.o_proj') -> max |X|; linears of one norm share one input."""
    spec = spec_for(model.config.model_type)
    stats = {}
    shared: dict[tuple, LinearStats] = {}
    for i, (name, mod) in enumerate(decoder_linears(model, spec).items()):
        suffix = name.split(".", 3)[3]
        group = next((g for g, members in GROUPS.items() if suffix in members), None)
        key = (name.rsplit(".", 2)[0] if group else name, group)
        if key not in shared:
            peak = peaks.get(suffix, default)
            cm = channel_max(mod.in_features, peak, i)
            token_max = torch.from_numpy(np.linspace(0.1, 1.0, 20, dtype=np.float32) * peak)
            shared[key] = LinearStats(torch.from_numpy(cm), torch.zeros(mod.in_features, dtype=torch.float64),
                                      [token_max], tokens=20)
        stats[name] = shared[key]
    return Calibration(torch.zeros(1, 4, dtype=torch.long), stats, CalibrationConfig(source="random", samples=1, seqlen=4))


def plan_for(model, peaks, default=1.0, **config):
    spec = spec_for(model.config.model_type)
    cfg = fptq.Config(**{"v0": V0, "v1": V1, "group_size": 16, **config})
    calib = make_calib(model, peaks, default)
    return plan_with_stats(fptq, model, spec, calib, cfg), calib


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


P = layer_prefix(spec_for("llama"), 0)


def test_below_v0_is_static_with_max_over_127(llama):
    plan, calib = plan_for(llama, {}, default=3.0)
    assert not plan.equalizations
    for name, lp in plan.linears.items():
        assert lp.strategy == "static" and lp.act_mode == ActMode.STATIC
        assert lp.act_scale == pytest.approx(calib.stats[name].max_abs / 127)
        assert lp.max_abs == pytest.approx(3.0)
        assert lp.weight is not None and lp.weight.bits == 4 and lp.weight.group_size == 16
    assert set(plan.linears) == set(decoder_linears(llama, spec_for("llama")))


def test_middle_band_is_lae_static_on_the_norm(llama):
    plan, calib = plan_for(llama, {"self_attn.q_proj": 50.0, "mlp.gate_proj": 3.0})
    qkv = [P + s for s in GROUPS["input_layernorm"]]
    eqs = [e for e in plan.equalizations if e.source == P + "input_layernorm"]
    assert len(eqs) == 1
    eq = eqs[0]
    assert eq.kind == "norm" and eq.method == "lae" and eq.linears == qkv
    m = calib.stats[qkv[0]].channel_max_np().astype(np.float64)
    np.testing.assert_allclose(eq.scale, m / np.log2(2 + m), rtol=1e-5)
    covered = (m / eq.scale).max()
    np.testing.assert_allclose(covered, (np.log2(2 + m)).max(), rtol=1e-5)
    assert covered == pytest.approx(np.log2(52.0), rel=1e-5)
    for name in qkv:
        lp = plan.linears[name]
        assert lp.strategy == "lae+static" and lp.act_mode == ActMode.STATIC
        assert lp.equalized_by == P + "input_layernorm"
        assert lp.max_abs == pytest.approx(50.0)
        assert lp.max_abs_equalized == pytest.approx(covered, rel=1e-5)
        assert lp.act_scale == pytest.approx(covered / 127, rel=1e-5)
    # one equalization per norm, shared: the other layer's norm is not equalized, gate/up stay plain static
    assert plan.linears[P + "mlp.gate_proj"].strategy == "static"
    assert sum(e.source.endswith("input_layernorm") for e in plan.equalizations) == 2  # both layers
    assert not any(e.source.endswith("post_attention_layernorm") for e in plan.equalizations)


def test_at_or_above_v1_is_per_token(llama):
    plan, _ = plan_for(llama, {"mlp.gate_proj": V1, "self_attn.o_proj": 500.0})
    for s in (*GROUPS["post_attention_layernorm"], "self_attn.o_proj"):
        lp = plan.linears[P + s]
        assert lp.strategy == "per_token" and lp.act_mode == ActMode.PER_TOKEN and lp.act_scale is None
    assert not plan.equalizations


def test_pairs_in_middle_band_default_to_per_token(llama):
    plan, _ = plan_for(llama, {"self_attn.o_proj": 50.0, "mlp.down_proj": 50.0})
    for s in ("self_attn.o_proj", "mlp.down_proj"):
        lp = plan.linears[P + s]
        assert lp.act_mode == ActMode.PER_TOKEN and lp.strategy == "per_token"
        assert "fold" in lp.reason
    assert not plan.equalizations


def test_fold_pairs_equalizes_into_the_producer(llama):
    plan, calib = plan_for(llama, {"self_attn.o_proj": 50.0, "mlp.down_proj": 40.0}, fold_pairs=True)
    heads, kv = llama.config.num_attention_heads, llama.config.num_key_value_heads
    hd = llama.config.hidden_size // heads
    by_source = {e.source: e for e in plan.equalizations}
    down = by_source[P + "mlp.up_proj"]
    assert down.kind == "linear" and down.linears == [P + "mlp.down_proj"] and down.source_scale is None
    m = calib.stats[P + "mlp.down_proj"].channel_max_np().astype(np.float64)
    np.testing.assert_allclose(down.scale, m / np.log2(2 + m), rtol=1e-5)
    o = by_source[P + "self_attn.v_proj"]
    assert o.kind == "linear" and o.linears == [P + "self_attn.o_proj"]
    assert o.scale.size == heads * hd and o.source_scale.size == kv * hd
    per_head = o.scale.reshape(kv, heads // kv, hd)
    assert np.all(per_head == per_head[:, :1, :])  # equal across query heads sharing a KV head
    np.testing.assert_array_equal(per_head[:, 0, :].reshape(-1), o.source_scale)
    m_o = calib.stats[P + "self_attn.o_proj"].channel_max_np().astype(np.float64).reshape(kv, heads // kv, hd).max(1)
    np.testing.assert_allclose(o.source_scale, (m_o / np.log2(2 + m_o)).reshape(-1), rtol=1e-5)
    for s, eq in (("self_attn.o_proj", o), ("mlp.down_proj", down)):
        lp = plan.linears[P + s]
        assert lp.strategy == "lae+static" and lp.act_mode == ActMode.STATIC
        assert lp.equalized_by == eq.source
        covered = float((calib.stats[P + s].channel_max_np() / eq.scale).max())
        assert lp.max_abs_equalized == pytest.approx(covered, rel=1e-5)
        assert lp.act_scale == pytest.approx(covered / 127, rel=1e-5)
        assert covered < lp.max_abs


def test_bad_config_errors(llama):
    with pytest.raises(FptqError, match="v0"):
        plan_for(llama, {}, v0=200.0, v1=100.0)
    with pytest.raises(FptqError, match="v0"):
        plan_for(llama, {}, v0=100.0, v1=100.0)
    for g in (24, 8, 0):
        with pytest.raises(FptqError, match="group size"):
            plan_for(llama, {}, group_size=g)


def test_act_clip_percentile(llama):
    full, _ = plan_for(llama, {}, default=5.0)
    p50, _ = plan_for(llama, {}, default=5.0, act_clip="p50")
    name = P + "self_attn.q_proj"
    assert p50.linears[name].act_scale < full.linears[name].act_scale
    assert p50.linears[name].act_scale == pytest.approx(np.percentile(np.linspace(0.1, 1.0, 20) * 5.0, 50) / 127, rel=1e-5)
    for bad in ("bogus", "pxx", "p0", "p101"):
        with pytest.raises(FptqError):
            plan_for(llama, {}, default=5.0, act_clip=bad)


def _exact(w: np.ndarray) -> QuantizedWeight:
    """A 'quantized' weight that dequantizes to exactly w (groups of one row, q = 1)."""
    return QuantizedWeight(q=np.ones(w.shape, np.int8), scales=w.astype(np.float32), zero_points=None, group_size=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_equalizations_alone_keep_the_float_function(tiny_models, arch):
    """Every linear in the LAE band (with fold_pairs): folds only, unquantized weights -> same logits."""
    model = tiny_models[arch]
    spec = spec_for(arch)
    peaks = {s: 50.0 for s in ("self_attn.q_proj", "mlp.gate_proj", "self_attn.o_proj", "mlp.down_proj")}
    plan, _ = plan_for(model, peaks, fold_pairs=True)
    assert len(plan.equalizations) == 4 * model.config.num_hidden_layers
    weights = apply_equalizations(float_weights(model, spec), plan.equalizations)
    for name, lp in plan.linears.items():
        lp.weight = _exact(weights[name])
    folded = apply_plan(model, plan, activations=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = folded(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # and the folds did change the weights (a no-op plan would pass trivially)
    q = P + "self_attn.q_proj"
    assert not np.allclose(weights[q], float_weights(model, spec)[q])


def test_apply_equalizations_maths():
    from fptq_onnx.plan import Equalization

    rng = np.random.default_rng(0)
    w = {"src": rng.normal(size=(4, 6)).astype(np.float32), "dst": rng.normal(size=(12, 3)).astype(np.float32)}
    src = rng.uniform(0.5, 2, 6).astype(np.float32)
    consumer = np.repeat(src.reshape(2, 1, 3), 2, axis=1).reshape(-1)
    out = apply_equalizations(w, [Equalization("src", "linear", ["dst"], consumer, "lae", source_scale=src)])
    np.testing.assert_allclose(out["src"], w["src"] / src[None, :], rtol=1e-6)
    np.testing.assert_allclose(out["dst"], w["dst"] * consumer[:, None], rtol=1e-6)
    assert out is not w and w["src"] is not out["src"]  # inputs untouched


def test_config_replace_keeps_validation():
    with pytest.raises(FptqError):
        replace(fptq.Config(), v0=0.0).validate()
