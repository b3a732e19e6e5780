"""Load a resolved ModelSource into torch (fp32, eval mode) and its tokenizer."""

from __future__ import annotations

import torch
from safetensors import SafetensorError

from fptq_onnx.errors import FptqError
from fptq_onnx.model_source import ModelSource


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise FptqError(f"cannot read the model config in {source.label}: {_first_line(exc)}") from None
    check_shapes(config, source.label)
    return config


def check_shapes(config, label: str) -> None:
    """Attention shapes must divide before any weight is read (torch would fail mid-forward otherwise)."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        return
    if heads % kv_heads:
        raise FptqError(f"{label}: num_attention_heads {heads} does not divide by num_key_value_heads {kv_heads}")
    if getattr(config, "head_dim", None) is None and hidden % heads:
        raise FptqError(f"{label}: hidden_size {hidden} does not divide by num_attention_heads {heads}")


def load_model(source: ModelSource, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            low_cpu_mem_usage=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise FptqError(f"cannot load the model in {source.label}: {_first_line(exc)}") from None
    model.eval()
    return model


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        raise FptqError(f"cannot load the tokenizer in {source.label}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def load_onnx_tokenizer(onnx_path):
    """The tokenizer saved beside an exported model."""
    from pathlib import Path

    from transformers import AutoTokenizer

    directory = Path(onnx_path).parent
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise FptqError(f"no tokenizer beside {onnx_path} (export writes one): {_first_line(exc)}") from None
