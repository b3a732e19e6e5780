"""RTN and ort-acc4 plans, and every peer method's plan through the qdq graph passes into ORT.

The conversion check compares ONNX Runtime with fptq_onnx.fakequant.apply_plan on the
same plan: weight-only plans must agree to float rounding; with int8 activations a
value on a rounding boundary may round differently in ORT and torch (see verify.py),
so there the mean |diff| is bounded instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from fptq_onnx import algorithms
from fptq_onnx.algorithms import ort_acc4, rtn
from fptq_onnx.calibration import CalibrationConfig
from planning import build_plan, calibrate, float_weights
from fptq_onnx.errors import FptqError
from fptq_onnx.export import export_float
from fptq_onnx.fakequant import apply_plan
from fptq_onnx.formats import apply_format
from fptq_onnx.models.registry import spec_for
from fptq_onnx.plan import ActMode
from fptq_onnx.runtime import OnnxCausalLM
from fptq_onnx.saving import save_model

CALIB = CalibrationConfig(source="random", samples=4, seqlen=32)


@pytest.fixture(scope="module")
def setups(tiny_models) -> dict:
    """arch -> (model, spec, calibration, float ONNX export), built once per module."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            model = tiny_models[arch]
            spec = spec_for(model.config.model_type)
            calib = calibrate(model, spec, None, CALIB, progress=False)
            cache[arch] = (model, spec, calib, export_float(model, spec))
        return cache[arch]

    return get


def _plan(setups, arch, method, **opts):
    model, spec, calib, _ = setups(arch)
    module = algorithms.get(method)
    config = algorithms.make_config(module, {}, {k: str(v) for k, v in opts.items()})
    return build_plan(module, model, spec, calib, config)


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _ids(length: int = 24) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 128, size=(1, length), dtype=np.int64)


# --------------------------------------------------------------------------- RTN plans


def test_w8a8_per_channel_weights_within_half_step(setups):
    model, spec, _, _ = setups("llama")
    plan = _plan(setups, "llama", "rtn", bits=8, act="per_token")
    floats = float_weights(model, spec)
    assert set(plan.linears) == set(floats)
    for name, lp in plan.linears.items():
        qw = lp.weight
        assert (qw.bits, qw.per_channel, qw.symmetric) == (8, True, True)
        assert lp.act_mode == ActMode.PER_TOKEN
        assert qw.q.min() >= -128 and qw.q.max() <= 127
        err = np.abs(qw.dequantize() - floats[name])
        assert (err <= qw.scales[0][None, :] / 2 + 1e-7).all(), name


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4_groups_within_half_step(setups, symmetric):
    model, spec, _, _ = setups("llama")
    plan = _plan(setups, "llama", "rtn", group_size=32, symmetric=symmetric)
    floats = float_weights(model, spec)
    for name, lp in plan.linears.items():
        qw = lp.weight
        assert qw.bits == 4 and qw.group_size == 32 and qw.symmetric == symmetric and not qw.per_channel
        assert lp.act_mode == ActMode.NONE and lp.act_scale is None
        step = np.repeat(qw.scales, 32, axis=0)[: qw.q.shape[0]]
        assert (np.abs(qw.dequantize() - floats[name]) <= step / 2 + 1e-7).all(), name


def test_static_scale_is_calibrated_max_over_127(setups):
    _, _, calib, _ = setups("llama")
    plan = _plan(setups, "llama", "rtn", act="static")
    assert not plan.equalizations
    for name, lp in plan.linears.items():
        assert lp.act_mode == ActMode.STATIC
        assert lp.act_scale == pytest.approx(calib.stats[name].max_abs / 127, rel=1e-6)


def test_rtn_config_defaults_and_errors():
    assert rtn.Config().per_channel is None
    assert algorithms.make_config(rtn, {}, {"per_channel": "false", "bits": "8"}).per_channel is False
    assert rtn.weight_grouping(8, 128, None) and not rtn.weight_grouping(4, 128, None)
    for opts in ({"bits": "3"}, {"act": "per_block"}, {"group_size": "100"}, {"per_channel": "maybe"}):
        with pytest.raises(FptqError):
            algorithms.make_config(rtn, {}, opts)


# --------------------------------------------------------------------------- ort-acc4


def test_ort_acc4_plan_uses_ort_quantizer_defaults(setups):
    plan = _plan(setups, "llama", "ort-acc4")
    assert ort_acc4.FORMAT == "native" and "--format native" in ort_acc4.SUMMARY
    for lp in plan.linears.values():
        assert lp.act_mode == ActMode.PER_BLOCK
        assert (lp.weight.bits, lp.weight.group_size, lp.weight.symmetric) == (4, 128, False)
    # The CLI's common `symmetric` option must not reach it (ORT's default is asymmetric).
    assert algorithms.make_config(ort_acc4, {"symmetric": True, "group_size": 128}).is_symmetric is False


def test_ort_acc4_native_fuses_to_matmulnbits_level4(setups, tmp_path):
    model, spec, _, float_model = setups("llama")
    plan = _plan(setups, "llama", "ort-acc4", group_size=32)  # tiny K=64/96: g128 would be one group
    path = tmp_path / "acc4.onnx"
    save_model(apply_format(_copy(float_model), plan, "native"), path)
    hints = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                     hints["fptq.ort_matmulnbits_accuracy_level"])
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nodes = [n for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(plan.linears)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["accuracy_level"] == 4 and attrs["bits"] == 4 and attrs["block_size"] == 32
    # and it runs close to the weight-only reference (acc4 rounds activations per block)
    ref = apply_plan(model, plan, activations=False)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(_ids())).logits.numpy()
    got = OnnxCausalLM(path).logits(_ids())
    assert np.abs(got - want).mean() < 0.05 * np.abs(want).mean()


# --------------------------------------------------------------------------- every peer plan through qdq -> ORT

WEIGHT_ONLY = [
    ("llama", "rtn", {}),
    ("llama", "rtn", {"group_size": 32, "symmetric": False}),
    ("qwen2", "rtn", {"bits": 8}),
    ("llama", "ort-acc4", {"group_size": 32}),  # PER_BLOCK is float activations in qdq
]
WITH_ACTIVATIONS = [
    ("llama", "rtn", {"act": "static"}),
    ("llama", "rtn", {"bits": 8, "act": "per_token"}),
    ("llama", "smoothquant", {}),
    ("qwen2", "smoothquant", {"fold_pairs": True}),
    ("llama", "smoothquant", {"bits": 4, "group_size": 32, "act": "static", "fold_pairs": True}),
    ("llama", "fptq", {}),
]


def _ort_and_reference(setups, tmp_path, arch, method, opts, activations):
    model, spec, _, float_model = setups(arch)
    plan = _plan(setups, arch, method, **opts)
    path = tmp_path / "model.onnx"
    save_model(apply_format(_copy(float_model), plan, "qdq"), path)
    ref = apply_plan(model, plan, activations=activations)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(_ids())).logits.numpy()
    return OnnxCausalLM(path).logits(_ids()), want


@pytest.mark.parametrize("arch,method,opts", WEIGHT_ONLY, ids=lambda v: str(v))
def test_weight_only_plans_match_fakequant(setups, tmp_path, arch, method, opts):
    got, want = _ort_and_reference(setups, tmp_path, arch, method, opts, activations=False)
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize("arch,method,opts", WITH_ACTIVATIONS, ids=lambda v: str(v))
def test_activation_plans_match_fakequant(setups, tmp_path, arch, method, opts):
    got, want = _ort_and_reference(setups, tmp_path, arch, method, opts, activations=True)
    diff = np.abs(got - want)
    assert diff.mean() < 1e-2 * np.abs(want).mean() + 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_plan_config_is_recorded(setups):
    plan = _plan(setups, "llama", "rtn", bits=8)
    assert plan.method == "rtn" and plan.config["bits"] == 8 and plan.calibration["samples"] == 4
    assert dataclasses.asdict(rtn.Config(bits=8)) == plan.config
