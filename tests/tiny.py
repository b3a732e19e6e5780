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


# GGUF architecture names (llama.cpp's) of the registry's model types.
GGUF_ARCH = {"llama": "LLAMA", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3", "phi3": "PHI3"}
_GGUF_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


def write_tiny_gguf(model: torch.nn.Module, path) -> None:
    """Write `model` as an F32 GGUF the way llama.cpp lays one out, with a tiny sentencepiece vocabulary.

    Offline (the `gguf` package's writer and tensor-name map): tensors under GGUF names,
    Gemma's norms stored as 1 + w (llama.cpp adds 1, transformers subtracts it again).
    """
    import gguf

    from fptq_onnx.models.registry import spec_for

    config = model.config
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[config.model_type])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(float(rope.get("full_attention", rope)["rope_theta"]))  # Gemma-3: global layers'
    if getattr(config, "sliding_window", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u2581"]
    words = ["\u2581" + w for w in " ".join(TOKENIZER_WORDS).split()]
    tokens = list(_GGUF_SPECIALS) + pieces + list(dict.fromkeys(words))
    tokens += [f"<unused{i}>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3] * len(_GGUF_SPECIALS) + [1] * (len(tokens) - len(_GGUF_SPECIALS)))
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    offset = spec_for(config.model_type).norm_offset
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name}")
        value = tensor.detach().float().numpy()
        writer.add_tensor(gguf_name, value + offset if name.endswith("norm.weight") else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TOKENIZER_WORDS = (
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france paris is the capital",
)
