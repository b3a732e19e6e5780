"""SmoothQuant: the smoothing is function-preserving, flattens the inputs it targets, and plans W8A8 / W4A8."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fptq_onnx import algorithms
from fptq_onnx.algorithms import smoothquant as sq
from fptq_onnx.algorithms.common import apply_equalizations
from fptq_onnx.calibration import CalibrationConfig
from planning import build_plan, calibrate, collect_stats, decoder_linears, float_weights
from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import spec_for
from fptq_onnx.plan import ActMode

CALIB = CalibrationConfig(source="random", samples=4, seqlen=32)


def _setup(tiny_models, arch: str, outlier: bool = False):
    model = tiny_models[arch]
    if outlier:  # one hot channel in every norm: what SmoothQuant exists for
        model = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    p[5] = 30.0
    spec = spec_for(model.config.model_type)
    return model, spec, calibrate(model, spec, None, CALIB, progress=False)


def _equalized_float(model, spec, equalizations):
    """The float model with only the equalizations applied (in torch): 1/s into sources, s into weights."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    weights = apply_equalizations(float_weights(model, spec), equalizations)
    with torch.no_grad():
        for eq in equalizations:
            side = torch.from_numpy(eq.source_side())
            source = modules[eq.source]
            if eq.kind == "norm":
                source.weight.div_(side)
            elif source.bias is not None:
                source.bias.div_(side)
        for name, linear in decoder_linears(out, spec).items():
            linear.weight.copy_(torch.from_numpy(weights[name].T))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("fold_pairs", [False, True])
def test_smoothing_alone_preserves_the_float_function(tiny_models, arch, fold_pairs):
    model, spec, calib = _setup(tiny_models, arch)
    eqs = build_plan(sq, model, spec, calib, sq.Config(fold_pairs=fold_pairs)).equalizations
    assert len(eqs) == model.config.num_hidden_layers * (len(spec.groups) + (len(spec.pairs) if fold_pairs else 0))
    smoothed = _equalized_float(model, spec, eqs)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, smoothed(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("fold_pairs", [False, True])
def test_smoothing_reduces_input_range_of_smoothed_linears(tiny_models, fold_pairs):
    model, spec, calib = _setup(tiny_models, "llama", outlier=True)
    eqs = build_plan(sq, model, spec, calib, sq.Config(fold_pairs=fold_pairs)).equalizations
    after = collect_stats(_equalized_float(model, spec, eqs), spec, calib.tokens)
    for eq in eqs:
        for name in eq.linears:
            before_max, after_max = calib.stats[name].channel_max_np(), after[name].channel_max_np()
            assert after_max.max() < before_max.max(), name
            # and flatter: the outlier channel no longer dominates
            assert after_max.max() / np.median(after_max) < before_max.max() / np.median(before_max), name
            # what the plan records matches what the smoothed model sees
            np.testing.assert_allclose(after_max, before_max / eq.scale, rtol=1e-3, atol=1e-6)


def test_smooth_scales_formula_and_clamps():
    x = np.array([4.0, 1.0, 0.0, 100.0], np.float32)
    w = np.array([1.0, 4.0, 0.5, 0.0], np.float32)
    s = sq.smooth_scales(x, w, 0.5)
    np.testing.assert_allclose(s[:2], [2.0, 0.5], rtol=1e-6)
    assert np.isfinite(s).all() and (s >= 1e-5).all()
    np.testing.assert_allclose(sq.smooth_scales(x[:2], w[:2], 1.0), x[:2], rtol=1e-6)  # alpha 1: all into W
    np.testing.assert_allclose(sq.weight_input_max([np.array([[1.0, -3.0], [0.5, 0.2]]),
                                                    np.array([[2.0, 0.0], [-0.1, 0.1]])]), [3.0, 0.5])


def test_weight_max_is_over_all_consumers(tiny_models):
    model, spec, calib = _setup(tiny_models, "llama")
    eqs = build_plan(sq, model, spec, calib, sq.Config()).equalizations
    weights = float_weights(model, spec)
    eq = eqs[0]
    w_max = np.max([np.abs(weights[n]).max(axis=1) for n in eq.linears], axis=0)
    want = np.sqrt(calib.stats[eq.linears[0]].channel_max_np()) / np.sqrt(w_max)
    np.testing.assert_allclose(eq.scale, want, rtol=1e-5)
    assert eq.kind == "norm" and eq.method == "smoothquant"


def test_w8a8_plan(tiny_models):
    model, spec, calib = _setup(tiny_models, "llama")
    plan = build_plan(sq, model, spec, calib, sq.Config())
    assert plan.method == "smoothquant" and len(plan.equalizations) == 2 * model.config.num_hidden_layers
    for name, lp in plan.linears.items():
        assert lp.act_mode == ActMode.PER_TOKEN
        assert (lp.weight.bits, lp.weight.per_channel, lp.weight.symmetric) == (8, True, True)
        assert (lp.equalized_by is None) == name.endswith(("o_proj", "down_proj"))
        if lp.equalized_by is not None:
            assert lp.max_abs_equalized < lp.max_abs


def test_w4a8_static_plan(tiny_models):
    model, spec, calib = _setup(tiny_models, "llama")
    config = algorithms.make_config(sq, {"group_size": 128, "symmetric": True},
                                    {"bits": "4", "group_size": "32", "act": "static", "fold_pairs": "true"})
    plan = build_plan(sq, model, spec, calib, config)
    by_linear = {n: eq for eq in plan.equalizations for n in eq.linears}
    for name, lp in plan.linears.items():
        assert (lp.weight.bits, lp.weight.group_size, lp.weight.per_channel) == (4, 32, False)
        assert lp.act_mode == ActMode.STATIC
        eq = by_linear[name]  # fold_pairs: every linear is smoothed
        want = float((calib.stats[name].channel_max_np() / eq.scale).max()) / 127
        assert lp.act_scale == pytest.approx(want, rel=1e-5)


def test_config_errors():
    for opts in ({"alpha": "1.5"}, {"bits": "6"}, {"act": "none"}, {"act": "per_block"}):
        with pytest.raises(FptqError):
            algorithms.make_config(sq, {}, opts)
