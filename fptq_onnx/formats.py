"""Output formats: which passes turn the float export + plan into each kind of model.

qdq     portable: int4 weight DQ + explicit int8 activation Q/DQ (or per-token subgraph);
        what TensorRT/QNN-style EPs consume; slow on ORT CPU (activation Q/DQ blocks
        ORT's int4 fusion).
w4a8    the qdq model with every int4-weight / int8-activation linear lowered to our
        fused fptq.W4A8MatMul custom op (CPU library in custom_ops/): the deploy form.
native  equalization folded, int4 weight DQ + MatMul, no activation Q/DQ: ORT fuses it
        into MatMulNBits with its own per-block int8 activations; fast on stock ORT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.fold_scales import FoldScalesPass
from fptq_onnx.passes.lower_w4a8 import LowerW4A8Pass
from fptq_onnx.passes.quantize_activations import QuantizeActivationsPass
from fptq_onnx.passes.quantize_lm_head import LM_HEAD, QuantizeLmHeadPass
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.passes.stamp_decisions import StampDecisionsPass
from fptq_onnx.plan import ActMode, QuantPlan


def _weights(plan: QuantPlan) -> dict:
    return {n: lp.weight for n, lp in plan.linears.items() if lp.weight is not None}


def _lm_head(plan: QuantPlan) -> list[ir.passes.PassBase]:
    """`--quantize-lm-head`: name the logits MatMul so the passes after it find the planned lm_head."""
    return [QuantizeLmHeadPass(plan.embedding)] if LM_HEAD in plan.linears else []


def qdq_passes(plan: QuantPlan) -> list[ir.passes.PassBase]:
    return [
        *_lm_head(plan),
        FoldScalesPass(plan.equalizations),
        QuantizeWeightsPass(_weights(plan)),
        QuantizeActivationsPass({n: (lp.act_mode, lp.act_scale) for n, lp in plan.linears.items()}),
    ]


def w4a8_passes(plan: QuantPlan) -> list[ir.passes.PassBase]:
    lowerable = [
        n for n, lp in plan.linears.items()
        if lp.weight is not None and lp.weight.bits == 4 and lp.act_mode in (ActMode.STATIC, ActMode.PER_TOKEN)
    ]
    return [*qdq_passes(plan), LowerW4A8Pass(lowerable)]


def native_passes(plan: QuantPlan) -> list[ir.passes.PassBase]:
    return [*_lm_head(plan), FoldScalesPass(plan.equalizations), QuantizeWeightsPass(_weights(plan))]


@dataclass(frozen=True)
class Format:
    """One output form: its graph passes (before the decision stamping), what ONNX Runtime does with
    activations (recorded in the manifest), and what its parity check compares with.

    check: 'noise'   the full fake-quant reference, mean |diff| bounded by --tolerance x torch's fp32 noise;
           'weights' the weight-only reference (ORT's own activation rounding is not modelled): reported;
           'float'   the float model, max |diff| <= 1e-3 (compare's fp32 rows).
    """

    passes: Callable[[QuantPlan], list[ir.passes.PassBase]]
    activations: str
    check: str
    stamp: bool = True


FORMATS: dict[str, Format] = {
    "qdq": Format(qdq_passes, "as planned: explicit int8 Q/DQ (static per-tensor or per-token)", "noise"),
    "w4a8": Format(w4a8_passes, "as planned, inside fptq.W4A8MatMul (static per-tensor or per-token int8)", "noise"),
    "native": Format(native_passes, "ONNX Runtime MatMulNBits accuracy_level 4: per-K-block dynamic int8 "
                                    "(planned activation modes not used)", "weights"),
}
FLOAT_FORMAT = "fp32"
# Every form a conversion can write: the user's formats, and the float model that compare scores beside them.
ALL_FORMATS: dict[str, Format] = {**FORMATS, FLOAT_FORMAT: Format(lambda plan: [], "float", "float", stamp=False)}


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise FptqError(f"unknown format '{','.join(unknown) or text}'; known: {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> ir.Model:
    """Run passes in order; a user error raised inside one comes out as itself, not as onnx-ir's PassError."""
    if not passes:
        return model
    try:
        return ir.passes.PassManager(passes)(model).model
    except ir.passes.PassError as exc:
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, FptqError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def apply_format(model: ir.Model, plan: QuantPlan, fmt: str) -> ir.Model:
    """The whole plan applied to a whole float graph in one go (the layer walk applies it layer by layer)."""
    return run_passes(model, [*FORMATS[fmt].passes(plan), StampDecisionsPass(plan, fmt),
                              ir.passes.common.TopologicalSortPass()])
