"""`convert --quantize-lm-head`: add the lm_head (and an embedding tied to it) to a method's plan.

The methods plan the decoder linears only and keep the lm_head float, as the paper does. On a
small model that is most of what decoding reads: SmolLM2-135M's tied 49152 x 576 table is 113 MB
of fp32 beside 53 MB of int4 layers. The lm_head takes the decoder linears' weight format (bits,
group size, symmetry; round-to-nearest) and, when they quantize activations, per-token int8
(its input, the final norm's output, carries outlier channels no per-tensor scale covers), so the
w4a8 form runs it as one more fptq.W4A8MatMul. A tied embedding becomes int8 rows with a scale
per row: a lookup reads a few rows, so int8 costs nothing in speed and keeps the input side
near-lossless. Why int4 + per-token rather than int8 per-channel: in ONNX Runtime an int8 weight
is a DequantizeLinear run on every call (100x slower at M=1 than W4A8MatMul on this shape,
bench/lm_head_cpu.py). The price is accuracy: +24% WikiText-2 ppl on SmolLM2 with the paper
recipe (bench/e2e_cpu.md), so it is opt-in and not part of `--recipe best`.

Both run outside the layer walk: the embedding plan before it (it depends on the weights only,
and the parity reference starts from it), the lm_head after it (it follows the layers' weight
format, and its input range is the final norm of the walk's last float hidden states).
"""

from __future__ import annotations

import torch

from fptq_onnx.errors import FptqError
from fptq_onnx.passes.quantize_lm_head import LM_HEAD
from fptq_onnx.plan import ActMode, EmbeddingPlan, LinearPlan, QuantPlan
from fptq_onnx.quant import quantize_groups, quantize_int8_per_channel

# Calibration windows whose final-norm output measures the lm_head's input range (recorded, not used by per-token).
RANGE_WINDOWS = 4


def _head(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings()
    names = {module: name for name, module in model.named_modules()}
    if names.get(head) != LM_HEAD or head.bias is not None:
        raise FptqError(f"--quantize-lm-head: expected a bias-free output linear named '{LM_HEAD}'")
    return head


def tied_embedding(model: torch.nn.Module) -> EmbeddingPlan | None:
    """int8 rows of an input embedding that shares the lm_head's weight; None when untied."""
    head = _head(model)
    embed = model.get_input_embeddings()
    if embed.weight.data_ptr() != head.weight.data_ptr():
        return None
    name = next(n for n, m in model.named_modules() if m is embed)
    weight = head.weight.detach().float().numpy().T.copy()  # [K, N]
    return EmbeddingPlan(name, LM_HEAD, quantize_int8_per_channel(weight, symmetric=True))


def add_lm_head(plan: QuantPlan, model: torch.nn.Module, final_hidden: torch.Tensor,
                embedding: EmbeddingPlan | None) -> None:
    """Plan `lm_head` like the decoder linears (`final_hidden`: the last layer's float outputs)."""
    head = _head(model)
    layers = [lp for lp in plan.linears.values() if lp.weight is not None]
    if not layers:
        raise FptqError("--quantize-lm-head: the method quantizes no weights to follow")
    ref = layers[0].weight
    modes = {lp.act_mode for lp in plan.linears.values()}
    mode = (ActMode.PER_BLOCK if ActMode.PER_BLOCK in modes
            else ActMode.PER_TOKEN if modes & {ActMode.STATIC, ActMode.PER_TOKEN} else ActMode.NONE)
    weight = head.weight.detach().float().numpy().T.copy()  # [K, N]
    windows = final_hidden[:RANGE_WINDOWS]
    with torch.no_grad():
        norm = model.get_decoder().norm
        max_abs = float(norm.to(windows.device)(windows).abs().max())
        norm.to("cpu")
    qw = quantize_groups(weight, ref.group_size, ref.symmetric, ref.bits)
    strategy = {ActMode.PER_TOKEN: "per_token", ActMode.PER_BLOCK: "per_block", ActMode.NONE: "float"}[mode]
    plan.linears[LM_HEAD] = LinearPlan(
        LM_HEAD, strategy, mode, max_abs, max_abs, weight=qw,
        reason=f"--quantize-lm-head: the layers' weight format ({qw.describe()}), RTN; "
               f"activations {mode.value} (max|X| {max_abs:.3g} over {len(windows)} calibration windows)",
    )
    plan.embedding = embedding
