"""Declarative architecture table: one entry per architecture, looked up by the config's model_type.

Names are module names *inside one decoder layer* (llm-compressor style mappings), so one
entry covers every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fptq_onnx.errors import FptqError


@dataclass(frozen=True)
class EqualizationGroup:
    """A norm whose output feeds `linears`: a per-channel scale can fold into the norm weight."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LinearPair:
    """`producer`'s output rows feed `consumer`'s input channels one to one.

    `per_head` marks pairs where the producer's output is shared by several consumer
    heads (v_proj -> o_proj under grouped-query attention): a scale folds only if it
    is equal across the query heads that share one KV head.

    `rows` says which of the producer's output rows those are: "all" of them, or "last"
    for a fused producer whose consumer reads its trailing block (Phi-3: the v rows of
    qkv_proj = [q; k; v], the up half of gate_up_proj = [gate; up]). Multiplying the
    consumer's input channels by s divides exactly those rows by s; the others keep theirs.
    """

    producer: str
    consumer: str
    per_head: bool = False
    rows: Literal["all", "last"] = "all"

    def producer_rows(self, producer_out: int, consumer_in: int, heads: int, kv_heads: int) -> slice | None:
        """The producer's output rows feeding the consumer; None when the shapes do not pair up.

        As many as the consumer's input channels, or under `per_head` one per KV-head
        channel (each read by heads / kv_heads query heads).
        """
        width = consumer_in
        if self.per_head:
            if kv_heads < 1 or heads % kv_heads or consumer_in % heads:
                return None
            width = consumer_in // (heads // kv_heads)
        start = producer_out - width if self.rows == "last" else 0
        if start < 0 or (self.rows == "all" and width != producer_out):
            return None
        return slice(start, producer_out)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers_path: str
    groups: tuple[EqualizationGroup, ...]
    pairs: tuple[LinearPair, ...]
    # The norms of `groups` compute x_hat * (norm_offset + w): Gemma's RMSNorm stores w with 1 subtracted.
    norm_offset: float = 0.0
    io_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")
    past_key_format: str = "past_key_values.{layer}.{kind}"
    present_key_format: str = "present.{layer}.{kind}"
    notes: str = field(default="", compare=False)

    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear inside one decoder layer, in execution order."""
        return tuple(name for group in self.groups for name in group.linears) + tuple(
            pair.consumer for pair in self.pairs
        )

    def norm_multiplier(self, weight):
        """What a group norm multiplies by (numpy or torch): the value a scale folds into."""
        return weight + self.norm_offset if self.norm_offset else weight

    def past_names(self, num_layers: int) -> list[str]:
        return [self.past_key_format.format(layer=i, kind=k) for i in range(num_layers) for k in ("key", "value")]

    def present_names(self, num_layers: int) -> list[str]:
        return [self.present_key_format.format(layer=i, kind=k) for i in range(num_layers) for k in ("key", "value")]


_LLAMA_LIKE_GROUPS = (
    EqualizationGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    EqualizationGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_LLAMA_LIKE_PAIRS = (
    LinearPair("self_attn.v_proj", "self_attn.o_proj", per_head=True),
    LinearPair("mlp.up_proj", "mlp.down_proj"),
)

_GEMMA_GROUPS = (
    EqualizationGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    EqualizationGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_GEMMA_NOTES = (
    "RMSNorm x_hat * (1 + w) (norm_offset 1); sandwich norms: post_attention_layernorm and "
    "post_feedforward_layernorm follow o_proj / down_proj and take no fold; GeGLU (gelu tanh) MLP; "
    "embeddings scaled by sqrt(hidden); sliding-window layers export with the full cache and the window "
    "in the mask; tied lm_head"
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), "model.layers", _LLAMA_LIKE_GROUPS, _LLAMA_LIKE_PAIRS, notes="LLaMA 1/2/3, SmolLM"),
    ArchSpec("mistral", ("mistral",), "model.layers", _LLAMA_LIKE_GROUPS, _LLAMA_LIKE_PAIRS),
    ArchSpec("qwen2", ("qwen2",), "model.layers", _LLAMA_LIKE_GROUPS, _LLAMA_LIKE_PAIRS, notes="q/k/v carry biases"),
    ArchSpec("qwen3", ("qwen3",), "model.layers", _LLAMA_LIKE_GROUPS, _LLAMA_LIKE_PAIRS, notes="per-head q/k norms after the projections"),
    ArchSpec("gemma2", ("gemma2",), "model.layers", _GEMMA_GROUPS, _LLAMA_LIKE_PAIRS, norm_offset=1.0,
             notes=_GEMMA_NOTES + "; attention and final logit softcapping (tanh)"),
    ArchSpec("gemma3_text", ("gemma3_text",), "model.layers", _GEMMA_GROUPS, _LLAMA_LIKE_PAIRS, norm_offset=1.0,
             notes=_GEMMA_NOTES + "; per-head q/k norms (also 1 + w, not folded into); local/global RoPE bases"),
    ArchSpec(
        "phi3", ("phi3",), "model.layers",
        (
            EqualizationGroup("input_layernorm", ("self_attn.qkv_proj",)),
            EqualizationGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        (
            LinearPair("self_attn.qkv_proj", "self_attn.o_proj", per_head=True, rows="last"),
            LinearPair("mlp.gate_up_proj", "mlp.down_proj", rows="last"),
        ),
        notes="fused qkv_proj and gate_up_proj: o_proj / down_proj read their last rows (v; up), "
              "so a pair's s folds into that slice",
    ),
)


def fold_norm_scale(weight, side, offset: float):
    """A norm weight (numpy or torch) with 1/side folded in, for a norm multiplying by offset + w.

    (offset + w') = (offset + w) / s, so w' = (offset + w) / s - offset; the graph side
    holds offset + w itself (export.canonicalize) and divides it by s.
    """
    return (weight + offset) / side - offset if offset else weight / side


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def spec_for(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise FptqError(
        f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}"
    )


def layer_prefix(spec: ArchSpec, layer: int) -> str:
    return f"{spec.layers_path}.{layer}."
