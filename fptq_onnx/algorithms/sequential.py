"""Layer-by-layer runner shared by GPTQ and AWQ.

The calibration windows enter decoder layer 0 as hidden states; we capture those
(and the keyword arguments each layer receives: rotary position embeddings,
attention mask, position ids) once, then walk the layers:

    for step in sequential_layers(model, spec, tokens):
        handles = hook step.layer's linears   # e.g. accumulate Hessians
        step.forward()                        # run the layer on every sample
        ... change step.layer's weights ...
    # on resuming, the runner computes the next layer's inputs by running the
    # layer again (GPTQ: the already-quantized layer), or reuses the outputs of
    # step.forward() when the algorithm says they are still valid (AWQ: the
    # float layer, whose outputs function-preserving scales do not change).

Memory: only one layer's inputs and outputs live at a time
(2 x samples x seqlen x hidden floats), plus the small per-layer kwargs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import ArchSpec, layer_prefix

# Keyword arguments of a decoder layer that must not be replayed (KV caches).
_DROP_KWARGS = ("cache", "past_key_values", "past_key_value", "cache_position_unused")


class _StopForward(Exception):
    """Raised from the layer-0 pre-hook once its inputs are captured."""


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


def _layer_output(out) -> torch.Tensor:
    """transformers 5.x decoder layers return a tensor; 4.x returned a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_layer_inputs(
    model: torch.nn.Module, spec: ArchSpec, tokens: torch.Tensor
) -> tuple[torch.Tensor, list[dict]]:
    """(hidden states entering layer 0 for every window [samples, seqlen, hidden], per-layer kwargs).

    The kwargs of each layer come from one full forward of the first window (they
    depend only on the window length: all calibration windows have the same one,
    no padding). Per layer, because some architectures give layers different masks
    (sliding-window attention). The other windows stop at layer 0.
    """
    layers = decoder_layers(model, spec)
    if tokens.ndim != 2:
        raise FptqError(f"calibration tokens must be [samples, seqlen], got shape {tuple(tokens.shape)}")
    kwargs: list[dict | None] = [None] * len(layers)
    hidden: list[torch.Tensor] = []
    stop_at_first = [False]

    def hook_for(index: int):
        def hook(_module, args, kw):
            if index == 0:
                x = args[0] if args else kw["hidden_states"]
                hidden.append(x.detach().float().clone())
            if kwargs[index] is None:
                kw = {k: _detach(v) for k, v in kw.items() if k not in _DROP_KWARGS and k != "hidden_states"}
                kw["use_cache"] = False
                if len(args) > 1:
                    raise FptqError("decoder layer received extra positional arguments; unsupported transformers version")
                kwargs[index] = kw
            if stop_at_first[0]:
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for i in range(tokens.shape[0]):
                stop_at_first[0] = i > 0
                try:
                    model(input_ids=tokens[i : i + 1], use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    if any(k is None for k in kwargs):
        raise FptqError("the calibration forward never reached every decoder layer")
    return torch.cat(hidden, dim=0), kwargs  # type: ignore[return-value]


@dataclass
class LayerStep:
    """One decoder layer during the walk: its module, inputs, and a way to run it."""

    index: int
    prefix: str  # 'model.layers.{i}.'
    layer: torch.nn.Module
    inputs: torch.Tensor  # [samples, seqlen, hidden]
    kwargs: dict
    batch_size: int = 4
    outputs: torch.Tensor | None = None
    # Set by the algorithm: True if `outputs` of the last forward() are the next layer's inputs
    # (the layer was not changed afterwards in a way that matters), so the runner need not rerun it.
    reuse_outputs: bool = False
    linears: dict[str, torch.nn.Linear] = field(default_factory=dict)  # full names -> modules

    @torch.no_grad()
    def forward(self, keep: bool = True) -> torch.Tensor | None:
        """Run the layer on every sample (in batches); keep the outputs if asked."""
        outs = []
        for start in range(0, self.inputs.shape[0], self.batch_size):
            x = self.inputs[start : start + self.batch_size]
            out = _layer_output(self.layer(x, **self.kwargs))
            if keep:
                outs.append(out.detach().float())
        self.outputs = torch.cat(outs, dim=0) if keep else None
        return self.outputs


def sequential_layers(
    model: torch.nn.Module,
    spec: ArchSpec,
    tokens: torch.Tensor,
    desc: str = "layers",
    batch_size: int = 4,
    progress: bool | None = None,
) -> Iterator[LayerStep]:
    """Yield each decoder layer with its calibration inputs; advance the inputs when resumed.

    progress None shows a tqdm bar only on a terminal.
    """
    from fptq_onnx.calibration import decoder_linears

    layers = decoder_layers(model, spec)
    all_linears = decoder_linears(model, spec)
    with torch.no_grad():
        inputs, kwargs = capture_layer_inputs(model, spec, tokens)
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", disable=(None if progress is None else not progress)):
        prefix = layer_prefix(spec, index)
        step = LayerStep(
            index, prefix, layers[index], inputs, kwargs[index], batch_size,
            linears={n: m for n, m in all_linears.items() if n.startswith(prefix)},
        )
        yield step
        if step.reuse_outputs and step.outputs is not None:
            inputs = step.outputs
        else:
            step.outputs = None
            inputs = step.forward()
        del step
