"""auto policy and weight quantizers: choices are the measured minima, the budget holds, folds keep the function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fptq_onnx.models.registry import spec_for
from tiny import tiny_model

from fptq_onnx.algorithms import auto, fptq
from fptq_onnx.algorithms.auto import Choice, Group, _choose
from fptq_onnx.algorithms.common import apply_equalizations
from fptq_onnx.calibration import CalibrationConfig
from planning import build_plan, calibrate, float_weights
from fptq_onnx.errors import FptqError
from fptq_onnx.fakequant import apply_plan
from fptq_onnx.plan import ActMode
from fptq_onnx.quant import QuantizedWeight, dequantize

CALIB = CalibrationConfig(source="random", samples=4, seqlen=32)
HELD_OUT = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(7))


def _outlier_model(arch: str = "llama"):
    model = tiny_model(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param[[3, 17, 40]] *= 30.0
    return model


@pytest.fixture(scope="module")
def setup():
    model = _outlier_model()
    spec = spec_for(model.config.model_type)
    return model, spec, calibrate(model, spec, None, CALIB, progress=False)


def _error(model, spec, plan, activations=True) -> float:
    with torch.no_grad():
        ref = model(input_ids=HELD_OUT).logits
        got = apply_plan(model, plan, activations)(input_ids=HELD_OUT).logits
    return float((got - ref).pow(2).mean())


def test_auto_covers_every_linear_and_records_its_errors(setup):
    model, spec, calib = setup
    plan = build_plan(auto, model, spec, calib, auto.Config(group_size=32))
    assert set(plan.linears) == set(float_weights(model, spec))
    for lp in plan.linears.values():
        assert lp.act_mode in (ActMode.STATIC, ActMode.PER_TOKEN) and lp.weight is not None
        assert lp.reason.startswith("error ")
        if lp.act_mode == ActMode.STATIC:
            assert lp.act_scale == pytest.approx(lp.max_abs_equalized / 127)
    # consumers of one norm share one decision
    for eq in plan.equalizations:
        assert len({plan.linears[n].strategy for n in eq.linears}) == 1


def test_auto_beats_paper_fptq_and_static_everywhere(setup):
    model, spec, calib = setup
    best = _error(model, spec, build_plan(auto, model, spec, calib, auto.Config(group_size=32)))
    paper = _error(model, spec, build_plan(fptq, model, spec, calib, fptq.Config(group_size=32)))
    static_only = build_plan(auto, model, spec, calib, auto.Config(group_size=32, max_dynamic=0.0))
    assert all(lp.act_mode == ActMode.STATIC for lp in static_only.linears.values())
    assert best < paper
    assert best <= _error(model, spec, static_only)


def test_dynamic_budget_switches_the_cheapest_groups_first():
    def group(n, static_err, dyn_err):
        mk = lambda mode, err: Choice("none", mode, err, 0.0, 1.0, None)  # noqa: E731
        return Group([f"l{i}" for i in range(n)], "src", "norm", 1.0,
                     {ActMode.STATIC: mk(ActMode.STATIC, static_err), ActMode.PER_TOKEN: mk(ActMode.PER_TOKEN, dyn_err)})

    groups = [group(3, 0.10, 0.01), group(1, 0.02, 0.01), group(1, 0.001, 0.01)]
    assert _choose(groups, 1.0) == {0: ActMode.PER_TOKEN, 1: ActMode.PER_TOKEN, 2: ActMode.STATIC}
    # 5 linears, budget 3: the 1-linear group losing only 0.01 goes static, the 3-linear group stays dynamic
    assert _choose(groups, 0.6) == {0: ActMode.PER_TOKEN, 1: ActMode.STATIC, 2: ActMode.STATIC}
    assert set(_choose(groups, 0.0).values()) == {ActMode.STATIC}


def test_auto_equalizations_keep_the_float_function(setup):
    model, spec, calib = setup
    plan = build_plan(auto, model, spec, calib, auto.Config(group_size=32))
    assert plan.equalizations, "outlier channels should make some equalization win"
    assert {eq.kind for eq in plan.equalizations} == {"norm", "linear"}
    weights = apply_equalizations(float_weights(model, spec), plan.equalizations)
    for name, lp in plan.linears.items():  # folds only: the equalized float weights, exactly
        lp.weight = QuantizedWeight(q=np.ones(weights[name].shape, np.int8), scales=weights[name], zero_points=None,
                                    group_size=1)
    with torch.no_grad():
        ref = model(input_ids=HELD_OUT).logits
        got = apply_plan(model, plan, activations=False)(input_ids=HELD_OUT).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("quantizer", ["mse", "gptq"])
def test_data_aware_weights_beat_rtn_on_output_error(setup, quantizer):
    """Same FPTQ decisions and equalizations; only the int4 weights differ."""
    model, spec, calib = setup
    rtn = build_plan(fptq, model, spec, calib, fptq.Config(group_size=32))
    better = build_plan(fptq, model, spec, calib, fptq.Config(group_size=32, weights=quantizer))
    assert set(rtn.linears) == set(better.linears)
    for a, b in zip(rtn.equalizations, better.equalizations, strict=True):
        np.testing.assert_array_equal(a.scale, b.scale)
    assert _error(model, spec, better, activations=False) < _error(model, spec, rtn, activations=False)
    if quantizer == "mse":  # clipping only shrinks ranges: every dequantized |w| stays within RTN's grid range
        name = next(iter(rtn.linears))
        assert (np.abs(dequantize(better.linears[name].weight)).max()
                <= np.abs(dequantize(rtn.linears[name].weight)).max() + 1e-6)


def test_fptq_weights_option_and_bad_configs(setup):
    model, spec, calib = setup
    plan = build_plan(fptq, model, spec, calib, fptq.Config(group_size=32, symmetric=False, weights="mse"))
    assert all(lp.weight.zero_points is not None for lp in plan.linears.values())
    assert plan.config["weights"] == "mse"
    for bad in (dict(weights="awq2"), dict(max_dynamic=1.5), dict(alphas="0.5,x"), dict(alphas="1.5")):
        with pytest.raises(FptqError):
            auto.Config(**bad).validate()
    with pytest.raises(FptqError, match="weight quantizer"):
        fptq.Config(weights="nope").validate()
