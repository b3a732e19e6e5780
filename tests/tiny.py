"""Tiny random-init models of every supported architecture, built in-process.

Norm weights are randomised too: at init they are all ones (Gemma: zeros, its norms
multiply by 1 + w), which hides bugs in folding scales into them (and the exporter
dedups equal constants). Every norm ends up multiplying by a value in [0.5, 1.5).
"""

from __future__ import annotations

import torch

TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
# A window shorter than the parity prompts (12 tokens), so the sliding-window mask is exercised.
TINY_WINDOW = 4
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=TINY_WINDOW,
              layer_types=["sliding_attention", "full_attention"])
TINY_EXTRA = {
    "qwen3": dict(head_dim=16),
    # Caps near the tiny model's score and logit ranges (Gemma-2's own: 50 and 30), so the tanh bends.
    "gemma2": dict(_GEMMA, attn_logit_softcapping=0.05, final_logit_softcapping=0.5),
    "gemma3_text": dict(_GEMMA, rope_local_base_freq=10000.0),
    # Phi-3's defaults name token ids past the tiny vocabulary.
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
TIED = ("llama", "gemma2", "gemma3_text")


def tiny_config(model_type: str):
    from transformers import AutoConfig

    extra = TINY_EXTRA.get(model_type, {})
    return AutoConfig.for_model(model_type, **TINY_COMMON, **extra, tie_word_embeddings=model_type in TIED)


def tiny_model(model_type: str = "llama", seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from fptq_onnx.models.registry import spec_for

    offset = spec_for(model_type).norm_offset
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand_like(param) - offset)
    return model
