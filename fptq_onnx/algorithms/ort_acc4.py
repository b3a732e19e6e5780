"""The W4A8 an ONNX Runtime user gets today without any calibration.

ORT's `MatMulNBitsQuantizer` (onnxruntime.quantization.matmul_nbits_quantizer)
defaults: bits=4, block_size=128, is_symmetric=False, i.e. RTN int4 with a
uint4 zero point per block of 128 along K. Running the result with
accuracy_level 4 makes MatMulNBits quantize its *activations* to int8 per
K-block at run time, dynamically and uncalibrated (ActMode.PER_BLOCK).

Only the `native` format expresses this: the weight DQ + MatMul is left bare so
ORT fuses it into MatMulNBits, and the model's metadata asks for accuracy level
4 (fptq_onnx.runtime applies it). In `qdq` the same plan is just W4A16.

The symmetry field is `is_symmetric` (ORT's name), not `symmetric`: the CLI's
common `--asym` default (symmetric) must not silently override ORT's default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fptq_onnx.algorithms.common import check_group_size
from fptq_onnx.algorithms.layer import LayerContext
from fptq_onnx.algorithms.rtn import quantize_all
from fptq_onnx.plan import ActMode, LinearPlan, QuantPlan

SUMMARY = ("naive ORT W4A8: RTN int4 g128 asymmetric (MatMulNBitsQuantizer defaults) + MatMulNBits accuracy_level 4 "
           "per-block dynamic int8 activations; convert with --format native")

FORMAT = "native"


@dataclass(frozen=True)
class Config:
    group_size: int = 128  # ORT block_size
    is_symmetric: bool = False  # ORT default: asymmetric (uint4 + zero point)

    def validate(self) -> None:
        check_group_size(self.group_size)


def plan_layer(ctx: LayerContext, config: Config) -> QuantPlan:
    """Every decoder linear: int4 RTN weights, ActMode.PER_BLOCK. Calibration is only recorded (max |X|)."""
    config.validate()
    plan = QuantPlan(method="ort-acc4", config=asdict(config), calibration=ctx.calibration)
    for name, qw in quantize_all(ctx.weights(), 4, config.group_size, False, config.is_symmetric).items():
        m = ctx.stats[name].max_abs
        plan.linears[name] = LinearPlan(
            name, "per_block", ActMode.PER_BLOCK, m, m, weight=qw,
            reason="ORT MatMulNBits accuracy_level 4: per-K-block dynamic int8 (native format)",
        )
    return plan
