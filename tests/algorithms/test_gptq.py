"""GPTQ: second-order rounding beats RTN on the same weights and inputs; layout, act_order, ragged K, ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fptq_onnx.models.registry import spec_for
from tiny import tiny_model

from fptq_onnx.algorithms import gptq
from fptq_onnx.algorithms.common import quantize_weights
from fptq_onnx.layer_source import ModelLayers
from fptq_onnx.layer_walk import forward_all
from fptq_onnx.calibration import CalibrationConfig
from planning import build_plan, calibrate, decoder_linears, float_weights
from fptq_onnx.fakequant import apply_plan
from fptq_onnx.plan import ActMode, LinearPlan, QuantPlan
from fptq_onnx.quant import quantize_groups

# Model-level error comparisons on held-out tokens: 128 calibration tokens give a rank-deficient
# Hessian for K=64/96 and GPTQ overfits them; 512 tokens generalise.
CALIB_MODEL = CalibrationConfig(source="random", samples=16, seqlen=32)


def _correlated(k: int, tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5
    return (torch.randn(tokens, k, generator=gen) @ mix) * torch.linspace(0.2, 3.0, k)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = gptq.HessianAccumulator(x.shape[1])
    for chunk in x.split(300):  # the running update must equal the one-shot 2XᵀX/n
        acc.add(chunk)
    return acc.h


def _err(x: torch.Tensor, w: torch.Tensor, qw) -> float:
    return float(((x @ w - x @ torch.from_numpy(qw.dequantize())) ** 2).mean())


def test_hessian_accumulator_is_two_xtx_over_n():
    x = _correlated(16, 1000)
    torch.testing.assert_close(_hessian(x), 2 * x.T @ x / 1000, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_a_linear_with_ragged_groups(symmetric, act_order):
    """K=96 with group 64: one full and one ragged group of 32, in the ONNX blocked layout."""
    k, n = 96, 40
    x = _correlated(k, 2048)
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(1))
    qw = gptq.gptq_quantize(w, _hessian(x), 64, symmetric, 4, act_order=act_order, block_size=32)
    rtn = quantize_groups(w.numpy(), 64, symmetric, 4)
    assert qw.q.shape == (k, n) and qw.scales.shape == (2, n) and qw.symmetric == symmetric
    lo, hi = (-8, 7) if symmetric else (0, 15)
    assert qw.q.min() >= lo and qw.q.max() <= hi
    assert _err(x, w, qw) < 0.8 * _err(x, w, rtn)


def test_mse_ranges_on_heavy_tailed_weights():
    """Outlier weights stretch min/max grids; the shrink search trades them for finer steps.

    (It minimises weight error, not output error: on this data it helps the symmetric
    grid and costs the asymmetric one ~5%, which is why it is an option, measured per model.)
    """
    k, n = 128, 64
    x = _correlated(k, 2048)
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(3)) ** 3
    plain = gptq.gptq_quantize(w, _hessian(x), 64, True, 4)
    searched = gptq.gptq_quantize(w, _hessian(x), 64, True, 4, mse=True)
    assert _err(x, w, searched) < _err(x, w, plain)
    asym = gptq.gptq_quantize(w, _hessian(x), 64, False, 4, mse=True)
    assert asym.q.min() >= 0 and asym.q.max() <= 15 and asym.zero_points.max() <= 15


def test_gptq_with_identity_hessian_is_rtn():
    """No correlation -> no error feedback: GPTQ's grid and levels equal quantize_groups' exactly."""
    w = torch.randn(96, 24, generator=torch.Generator().manual_seed(2))
    for symmetric in (True, False):
        for bits in (4, 8):
            for act_order in (False, True):
                qw = gptq.gptq_quantize(w, torch.eye(96), 64, symmetric, bits, act_order=act_order)
                rtn = quantize_groups(w.numpy(), 64, symmetric, bits)
                np.testing.assert_array_equal(qw.q, rtn.q)
                assert qw.q.dtype == rtn.q.dtype
                np.testing.assert_allclose(qw.scales, rtn.scales, rtol=1e-6)
                if not symmetric:
                    np.testing.assert_array_equal(qw.zero_points, rtn.zero_points)


def test_gptq_int8_and_dead_channels():
    x = _correlated(64, 1024)
    x[:, [3, 10, 50]] = 0.0  # dead input channels: diag(H) = 0
    w = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    for bits in (4, 8):
        qw = gptq.gptq_quantize(w, _hessian(x), 32, True, bits)
        assert np.isfinite(qw.dequantize()).all()
        assert _err(x, w, qw) < _err(x, w, quantize_groups(w.numpy(), 32, True, bits))
    assert np.all(qw.dequantize()[[3, 10, 50]] == 0)  # dead rows are zeroed, as in the paper's code


def test_config_validation():
    from fptq_onnx.errors import FptqError

    with pytest.raises(FptqError):
        gptq.Config(bits=3).validate()
    with pytest.raises(FptqError):
        gptq.Config(group_size=100).validate()


# --------------------------------------------------------------------------- sequential runner and tiny models


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    spec = spec_for("llama")
    return model, spec, calibrate(model, spec, None, CALIB_MODEL, progress=False)


def test_layer_source_walk_reproduces_the_model(llama):
    """Captured layer-0 inputs and kwargs, run layer by layer, give the model's own final hidden states."""
    model, spec, calib = llama
    source = ModelLayers(model, spec)
    hidden, kwargs = source.capture(calib.tokens)
    assert hidden.shape == (16, 32, 64) and len(kwargs) == 2
    assert "position_embeddings" in kwargs[0]
    for index in range(source.num_layers):
        hidden = forward_all(source.layer(index), hidden, kwargs[index])
    torch.testing.assert_close(hidden, _pre_norm(model, calib.tokens), rtol=1e-4, atol=1e-4)


def _pre_norm(model, tokens):
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda _m, a: captured.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    return captured["x"]


def _logits_mse(model, reference, tokens) -> float:
    with torch.no_grad():
        return float(((model(input_ids=tokens).logits - reference(input_ids=tokens).logits) ** 2).mean())


def _rtn_plan(model, spec, group_size, symmetric) -> QuantPlan:
    plan = QuantPlan("rtn", {}, {})
    for name, qw in quantize_weights(float_weights(model, spec), group_size, symmetric).items():
        plan.linears[name] = LinearPlan(name, "rtn", ActMode.NONE, 0.0, 0.0, weight=qw)
    return plan


def test_gptq_layer_error_below_rtn_on_tiny_model(llama):
    """Layer 0 sees float inputs in both: every linear's output error is lower with GPTQ.

    Group 64 on down_proj (K=96) is a ragged group."""
    model, spec, calib = llama
    plan = build_plan(gptq, model, spec, calib, gptq.Config(group_size=64))
    rtn = _rtn_plan(model, spec, 64, True)
    inputs = {}
    linears = decoder_linears(model, spec)
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in linears.items() if n.startswith("model.layers.0.")]
    with torch.no_grad():
        model(input_ids=calib.tokens)
    for h in handles:
        h.remove()
    for name, xs in inputs.items():
        x = torch.cat(xs)
        w = linears[name].weight.detach().T
        assert _err(x, w, plan.linears[name].weight) < _err(x, w, rtn.linears[name].weight), name
    assert plan.linears["model.layers.0.mlp.down_proj"].weight.scales.shape == (2, 64)
    assert all(lp.act_mode == ActMode.NONE and lp.weight.symmetric for lp in plan.linears.values())
    assert set(plan.linears) == set(linears)
    # whole model, held-out tokens
    held_out = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(9))
    assert _logits_mse(apply_plan(model, plan), model, held_out) < _logits_mse(apply_plan(model, rtn), model, held_out)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gptq_act_order_asym_round_trips(arch):
    model = tiny_model(arch)
    spec = spec_for(model.config.model_type)
    calib = calibrate(model, spec, None, CALIB_MODEL, progress=False)
    plan = build_plan(gptq, model, spec, calib, gptq.Config(group_size=32, symmetric=False, act_order=True))
    assert all(not lp.weight.symmetric and lp.weight.scales.shape[0] == -(-lp.weight.q.shape[0] // 32)
               for lp in plan.linears.values())
    fq = apply_plan(model, plan)
    held_out = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(9))
    assert _logits_mse(fq, model, held_out) < _logits_mse(apply_plan(model, _rtn_plan(model, spec, 32, False)), model, held_out)


def test_gptq_plan_as_qdq_onnx_matches_fake_quant(llama, tmp_path):
    from fptq_onnx.export import export_float
    from fptq_onnx.formats import apply_format
    from fptq_onnx.runtime import OnnxCausalLM
    from fptq_onnx.saving import save_model

    model, spec, calib = llama
    plan = build_plan(gptq, model, spec, calib, gptq.Config(group_size=64))
    path = tmp_path / "gptq.onnx"
    save_model(apply_format(export_float(model, spec), plan, "qdq"), path)
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 16), dtype=np.int64)
    onnx_logits = OnnxCausalLM(path).logits(ids)
    with torch.no_grad():
        ref = apply_plan(model, plan)(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(onnx_logits - ref).max() < 1e-3
