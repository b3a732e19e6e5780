"""The per-layer contract between the layer walk (layer_walk.py) and every algorithm.

The walk owns the model walk; an algorithm only sees one decoder layer at a time:

1. `observers(ctx, config)` (optional): what to record about this layer's float inputs,
   beyond the statistics every method gets (`ctx.stats`: per-channel max / mean |x|,
   token maxima). Returns {key: (linear name, observer)}; the walk calls
   `observer.add(x)` with each batch of that linear's input during the float forward
   and puts the observer in `ctx.observed[key]`.
2. `plan_layer(ctx, config) -> QuantPlan`: the layer's decisions, equalizations and int4
   weights (those weights may be left None when `gptq(config)` says the walk computes
   them).
3. `gptq(config) -> GptqSettings | None` (optional): the layer's weights come from GPTQ on
   the equalized layer with inputs from the already-quantized earlier layers; the walk
   then carries a second, quantized stream of hidden states.

Everything a layer plan refers to (linears, norms, producers of pairs) lies inside the
layer, so the plans of all layers simply add up to the model's plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fptq_onnx.calibration import LinearStats
from fptq_onnx.models.registry import ArchSpec


class Observer(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


@dataclass
class LayerContext:
    """One decoder layer as an algorithm sees it (names are the model's full module names)."""

    index: int
    prefix: str  # 'model.layers.{index}.'
    spec: ArchSpec
    config: object  # the HF config (heads, KV heads)
    linears: dict[str, torch.nn.Linear]  # full name -> module with the float weights
    calibration: dict  # Calibration.describe(), recorded in the plan
    samples: int
    seqlen: int
    batch_size: int
    stats: dict[str, LinearStats] = field(default_factory=dict)  # float inputs of each linear
    observed: dict[str, Observer] = field(default_factory=dict)

    def weight(self, name: str) -> np.ndarray:
        """A linear's float weight as [K, N] (the ONNX MatMul B layout), a float32 copy."""
        return self.linears[name].weight.detach().float().cpu().numpy().T.copy()

    def weights(self) -> dict[str, np.ndarray]:
        return {name: self.weight(name) for name in self.linears}

    @property
    def heads(self) -> tuple[int, int]:
        """(attention heads, KV heads)."""
        heads = self.config.num_attention_heads
        return heads, getattr(self.config, "num_key_value_heads", None) or heads

    def reader_groups(self) -> list[list[str]]:
        """The layer's linears grouped by the input they read (norm groups, then pair consumers)."""
        return ([[self.prefix + n for n in g.linears] for g in self.spec.groups]
                + [[self.prefix + p.consumer] for p in self.spec.pairs])
