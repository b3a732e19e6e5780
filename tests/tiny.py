"""Tiny random-init models of every supported architecture, built in-process.

Norm weights are randomised too: at init they are all ones, which hides
bugs in folding scales into them (and the exporter dedups equal constants).
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


def tiny_config(model_type: str):
    from transformers import AutoConfig

    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    return AutoConfig.for_model(model_type, **TINY_COMMON, **extra, tie_word_embeddings=(model_type == "llama"))


def tiny_model(model_type: str = "llama", seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand_like(param))
    return model
