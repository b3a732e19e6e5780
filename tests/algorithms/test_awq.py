"""AWQ: scales keep the float function, the searches never lose to RTN, outliers are protected, ONNX matches."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from fptq_onnx.models.registry import spec_for
from tiny import tiny_model

from fptq_onnx.algorithms import awq
from fptq_onnx.algorithms.common import quantize_weights
from fptq_onnx.algorithms.gptq import apply_equalizations_torch
from fptq_onnx.calibration import CalibrationConfig
from planning import build_plan, calibrate, float_weights
from fptq_onnx.errors import FptqError
from fptq_onnx.fakequant import apply_plan
from fptq_onnx.plan import ActMode, LinearPlan, QuantPlan
from fptq_onnx.quant import quantize_groups

CALIB = CalibrationConfig(source="random", samples=4, seqlen=32)
CONFIG = awq.Config(group_size=32)


def _outlier_model(arch: str):
    """Tiny model whose norm outputs have a few large channels (as real LLMs do)."""
    model = tiny_model(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param[[3, 17, 40]] *= 20.0
    return model


@pytest.fixture(scope="module")
def planned() -> dict:
    out = {}
    for arch in ("llama", "qwen2"):
        model = _outlier_model(arch)
        spec = spec_for(model.config.model_type)
        calib = calibrate(model, spec, None, CALIB, progress=False)
        out[arch] = (model, spec, calib, build_plan(awq, model, spec, calib, CONFIG))
    return out


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


HELD_OUT = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(7))


def test_fake_quant_mirrors_quantize_groups():
    w = torch.randn(96, 24, generator=torch.Generator().manual_seed(0)).double()
    clip = np.random.default_rng(0).uniform(0.5, 1.0, (2, 24)).astype(np.float32)
    for symmetric in (True, False):
        for c in (None, clip):
            ref = quantize_groups(w.float().numpy(), 64, symmetric, 4, clip=c).dequantize()
            got = awq.fake_quant(w, 64, symmetric, 4, None if c is None else torch.from_numpy(c).double())
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_searches_never_lose_to_their_baselines():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=gen).double() * torch.ones(64).double().index_fill(0, torch.tensor([2, 9]), 30.0)
    w = torch.randn(64, 48, generator=gen).double()
    gram = x.T @ x
    s, alpha, loss, rtn = awq.search_scale([w[:, :16], w[:, 16:]], gram, x.abs().mean(0), CONFIG)
    assert s.shape == (64,) and loss <= rtn and alpha > 0  # outlier channels: a non-trivial scale wins
    assert abs(float(np.log(s.max()) + np.log(s.min()))) < 1e-4  # normalised: sqrt(max·min) = 1
    clip, err, base = awq.search_clip(w, gram, CONFIG)
    assert clip.shape == (2, 48) and err <= base and clip.min() >= 0.5 and clip.max() <= 1.0
    # the Gram-matrix loss is the token-level output error
    delta = awq.fake_quant(w, 32, False, 4) - w
    assert abs(awq.output_error(delta, gram) - float(((x @ delta) ** 2).sum())) < 1e-6 * awq.output_error(delta, gram)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_equalization_alone_keeps_the_float_function(arch, planned):
    if arch in planned:
        model, spec, _calib, plan = planned[arch]
    else:
        model = _outlier_model(arch)
        spec = spec_for(model.config.model_type)
        calib = calibrate(model, spec, None, CALIB, progress=False)
        plan = build_plan(awq, model, spec, calib, dataclasses.replace(CONFIG, clip_search=False))
    layers = model.config.num_hidden_layers
    assert len(plan.equalizations) == 4 * layers  # qkv, gate/up, v->o, up->down in every layer
    assert all(e.method == "awq" for e in plan.equalizations)
    equalized = copy.deepcopy(model)
    apply_equalizations_torch(dict(equalized.named_modules()), plan.equalizations)  # both sides, no quantization
    ref = _logits(model, HELD_OUT[:4])
    got = _logits(equalized, HELD_OUT[:4])
    assert (got - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))
    assert not all(np.allclose(e.scale, 1.0) for e in plan.equalizations)


def test_gqa_pair_scale_is_shared_by_query_heads(planned):
    model, _spec, _calib, plan = planned["llama"]
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    vo = [e for e in plan.equalizations if e.source.endswith("v_proj")]
    assert vo and all(e.kind == "linear" and e.linears[0].endswith("o_proj") for e in vo)
    for e in vo:
        assert e.source_scale is not None and e.source_scale.size == e.scale.size * kv // heads
        per_head = e.scale.reshape(kv, heads // kv, -1)
        assert np.array_equal(per_head, np.broadcast_to(per_head[:, :1], per_head.shape))


def test_awq_beats_asymmetric_rtn_with_outliers(planned):
    for arch, (model, spec, _calib, plan) in planned.items():
        assert all(lp.act_mode == ActMode.NONE and not lp.weight.symmetric for lp in plan.linears.values())
        assert {lp.equalized_by is not None for lp in plan.linears.values()} == {True}
        rtn = QuantPlan("rtn", {}, {})
        for name, qw in quantize_weights(float_weights(model, spec), 32, False).items():
            rtn.linears[name] = LinearPlan(name, "rtn", ActMode.NONE, 0.0, 0.0, weight=qw)
        ref = _logits(model, HELD_OUT)
        err_awq = float(((_logits(apply_plan(model, plan), HELD_OUT) - ref) ** 2).mean())
        err_rtn = float(((_logits(apply_plan(model, rtn), HELD_OUT) - ref) ** 2).mean())
        assert err_awq < 0.8 * err_rtn, arch


def test_config_validation():
    with pytest.raises(FptqError):
        awq.Config(grid=1).validate()
    with pytest.raises(FptqError):
        awq.Config(bits=2).validate()


def test_awq_plan_as_qdq_onnx_matches_fake_quant(planned, tmp_path):
    from fptq_onnx.export import export_float
    from fptq_onnx.formats import apply_format
    from fptq_onnx.runtime import OnnxCausalLM
    from fptq_onnx.saving import save_model

    model, spec, _calib, plan = planned["qwen2"]  # biases on v_proj: the v->o fold divides them too
    path = tmp_path / "awq.onnx"
    save_model(apply_format(export_float(model, spec), plan, "qdq"), path)
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 16), dtype=np.int64)
    onnx_logits = OnnxCausalLM(path).logits(ids)
    ref = _logits(apply_plan(model, plan), torch.from_numpy(ids)).numpy()
    assert np.abs(onnx_logits - ref).max() < 1e-3
