"""Where the layer walk gets a model from: the loaded torch model, or decoder layers read one at a time.

Both sources give the walk (layer_walk.py) the same things, so the rest of the
conversion is one code path:

- `skeleton`: the HF model object, whose decoder layers are swapped for pass-through
  stubs while the calibration windows run to capture the hidden states entering layer
  0 and every layer's keyword arguments (rotary cos/sin, mask), computed by the HF code;
- `layer(i)`: decoder layer i with fp32 weights, `release(i)` when the walk is done with it;
- `value(name)`: any parameter or buffer outside the decoder linears as float32 (for the graph);
- `head_logits(hidden)`: final norm + lm_head (the parity reference's last step).

`ModelLayers` wraps a model already in memory (any format transformers loads, GGUF
included). `CheckpointLayers` builds the model on the meta device and reads each decoder
layer from the safetensors files only while the walk is on it (lazy_weights.py), so a 7B
model converts in the memory of one layer. A layer's weights are the same fp32 values
either way, so both sources give byte-identical outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import ArchSpec, layer_prefix

# Keyword arguments of a decoder layer that must not be replayed (KV caches).
_DROP_KWARGS = ("cache", "past_key_values", "past_key_value", "cache_position_unused")


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer while inputs are captured: returns its input."""

    def __init__(self, like: torch.nn.Module) -> None:
        super().__init__()
        for attr in ("attention_type", "layer_type"):
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def decoder_layers(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    module = model
    for part in spec.layers_path.split("."):
        module = getattr(module, part)
    return module


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    return value


def layer_output(out) -> torch.Tensor:
    """transformers 5.x decoder layers return a tensor; 4.x returned a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerSource:
    """What both sources share: input capture through stubbed layers, the head, names."""

    spec: ArchSpec
    config: object
    tokenizer: object
    label: str
    skeleton: torch.nn.Module
    float_model: torch.nn.Module | None = None  # the whole float model when it is in memory

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def layer(self, index: int) -> torch.nn.Module:
        raise NotImplementedError

    def release(self, index: int) -> None:
        """The walk is done with layer `index` (a streamed layer's weights are dropped)."""

    def value(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def prefix(self, index: int) -> str:
        return layer_prefix(self.spec, index)

    def capture(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """(hidden states entering layer 0 [samples, seqlen, hidden] fp32, each layer's kwargs).

        Every window runs through the model with the decoder layers stubbed out, so this
        costs the embedding only; the kwargs (they depend on the window length only: all
        windows have one length, no padding) come from the first window, per layer
        because some architectures give layers different masks (sliding windows).
        """
        if tokens.ndim != 2:
            raise FptqError(f"calibration tokens must be [samples, seqlen], got shape {tuple(tokens.shape)}")
        layers = decoder_layers(self.skeleton, self.spec)
        originals = list(layers)
        kwargs: list[dict | None] = [None] * len(layers)
        hidden: list[torch.Tensor] = []

        def hook_for(index: int):
            def hook(_module, args, kw):
                if index == 0:
                    x = args[0] if args else kw["hidden_states"]
                    hidden.append(x.detach().float().clone())
                if kwargs[index] is None:
                    if len(args) > 1:
                        raise FptqError("decoder layer received extra positional arguments; "
                                        "unsupported transformers version")
                    kw = {k: _detach(v) for k, v in kw.items() if k not in _DROP_KWARGS and k != "hidden_states"}
                    kw["use_cache"] = False
                    kwargs[index] = kw

            return hook

        stubs = [_PassThrough(layer) for layer in originals]
        handles = [stub.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, stub in enumerate(stubs)]
        for i, stub in enumerate(stubs):
            layers[i] = stub
        try:
            with torch.no_grad():
                for i in range(tokens.shape[0]):
                    self.skeleton(input_ids=tokens[i : i + 1], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            for i, layer in enumerate(originals):
                layers[i] = layer
        if any(k is None for k in kwargs):
            raise FptqError("the calibration forward never reached every decoder layer")
        return torch.cat(hidden, dim=0), kwargs  # type: ignore[return-value]

    def head_logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None, quantize=None) -> torch.Tensor:
        """Final norm, lm_head (and Gemma's final logit softcapping) on the last decoder layer's output.

        In hidden's dtype; `weight` replaces the lm_head's (a quantized one), `quantize` rounds its input.
        """
        norm = copy.deepcopy(self.skeleton.get_decoder().norm).to(hidden.dtype)
        weight = self.skeleton.get_output_embeddings().weight if weight is None else weight
        with torch.no_grad():
            x = norm(hidden)
            logits = torch.nn.functional.linear(x if quantize is None else quantize(x), weight.to(hidden.dtype))
            cap = getattr(self.config, "final_logit_softcapping", None)
            return logits if not cap else torch.tanh(logits / cap) * cap


class ModelLayers(LayerSource):
    """A float model already in memory (loaded by transformers)."""

    def __init__(self, model: torch.nn.Module, spec: ArchSpec, tokenizer=None, label: str = "model") -> None:
        self.skeleton = self.float_model = model.eval()
        self.spec, self.config, self.tokenizer, self.label = spec, model.config, tokenizer, label
        self._layers = list(decoder_layers(model, spec))
        self._values = None

    def layer(self, index: int) -> torch.nn.Module:
        return self._layers[index]

    def release(self, index: int) -> None:
        self._layers[index].to("cpu")  # back from the walk's device; the model stays whole

    def value(self, name: str) -> np.ndarray:
        if self._values is None:
            self._values = {**dict(self.skeleton.named_parameters(remove_duplicate=False)),
                            **dict(self.skeleton.named_buffers(remove_duplicate=False))}
        if name not in self._values:
            raise FptqError(f"the model has no tensor {name}")
        return self._values[name].detach().float().numpy()


class CheckpointLayers(LayerSource):
    """A safetensors checkpoint read layer by layer; everything else (embeddings, head) resident."""

    def __init__(self, source, config, spec: ArchSpec, tokenizer) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM, GenerationConfig

        from fptq_onnx.lazy_weights import LazyCheckpoint

        self.spec, self.config, self.tokenizer, self.label = spec, config, tokenizer, source.label
        self.ckpt = LazyCheckpoint(source.path)
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        skeleton.eval()
        try:
            skeleton.generation_config = GenerationConfig.from_pretrained(source.path)
        except (OSError, ValueError):
            pass
        self.skeleton = skeleton
        prefix = spec.layers_path + "."
        tied: dict[str, torch.Tensor] = {}
        for name, param in skeleton.named_parameters(remove_duplicate=False):
            if name.startswith(prefix):
                continue
            key = self.checkpoint_name(name)
            tensor = tied[key] = tied[key] if key in tied else self.ckpt.get(key)  # tied parameters stay one
            if tuple(tensor.shape) != tuple(param.shape):
                raise FptqError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the config expects "
                                f"{tuple(param.shape)}")
            module_name, _, attr = name.rpartition(".")
            setattr(skeleton.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))
        self._layers = list(decoder_layers(skeleton, spec))

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint key of a parameter (lm_head is the embedding when tied)."""
        if (name not in self.ckpt and name.endswith("lm_head.weight")
                and getattr(self.config, "tie_word_embeddings", False)):
            embed = [n for n in self.ckpt.names() if n.endswith("embed_tokens.weight")]
            if embed:
                return embed[0]
        return name

    def value(self, name: str) -> np.ndarray:
        buffers = dict(self.skeleton.named_buffers())
        if name in buffers and buffers[name].device.type != "meta":
            return buffers[name].detach().float().numpy()
        return self.ckpt.get(self.checkpoint_name(name)).numpy()

    def layer(self, index: int) -> torch.nn.Module:
        layer = self._layers[index]
        prefix = self.prefix(index)
        state = {name: self.ckpt.get(self.checkpoint_name(prefix + name)) for name, _ in layer.named_parameters()}
        layer.load_state_dict(state, strict=True, assign=True)
        if any(t.device.type == "meta" for t in list(layer.parameters()) + list(layer.buffers())):
            raise FptqError(f"decoder layer {index} has state outside the checkpoint; not supported by --stream")
        return layer.eval()

    def release(self, index: int) -> None:
        self._layers[index].to("meta")
