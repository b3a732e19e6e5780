"""ONNX export without the float weights in memory, for the layer-streaming convert.

Graph structure. The model is built on PyTorch's meta device (shapes, no data) and
exported by the same dynamo exporter, wrapper, opset and example shapes as
`export.export_float`, with meta example inputs. The exporter's optimizer is run
afterwards by us instead of inside `torch.onnx.export`, because it would fold
`Transpose(weight)` for every linear and so read every weight. Before it runs:

- every decoder linear's weight becomes a *placeholder*: an `ir.ExternalTensor`
  with the right dtype and shape and a location that does not exist, so nothing
  can read it by accident (and our `should_fold` keeps the optimizer off it);
- every other initializer (embeddings, lm_head, norms, biases, rotary inv_freq)
  gets its real value from the checkpoint (`values(name)`): these are small next to
  the decoder linears (the embedding and lm_head of a 7B model are 0.5 GB each);
- an initializer that is no tensor of the model is a constant the exporter lifted
  out of the forward (`lifted_tensor_N`: transformers 5.17's eager mask makes
  `torch.tensor(0.0, device=mask.device)`): it keeps the value the trace gave it
  (the traced-graph cache stores it). On the meta device such a scalar would have
  no value, so the trace makes number scalars on the CPU (`_scalars_on_cpu`).

`export.canonicalize` then names the graph exactly as for the in-memory export:
MatMul B of each decoder linear is the placeholder `<module>.weight` [K, N], norm
weights are `<norm>.weight`. The result is structurally the model `export_float`
writes (same nodes up to the optimizer's pass order), without a single linear weight.

Weights. `ExternalDataWriter.spill(graph)` moves every in-memory initializer of at
least 1 KiB into the model's external-data file and replaces it by an
`ir.ExternalTensor` pointing there; the streaming convert fills one layer's
initializers (quantized by the graph passes), spills them and frees them before the
next layer, so the ONNX file grows layer by layer and the model is never whole in
memory. Saving then writes only the (small) graph proto.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import ArchSpec
from fptq_onnx.passes.rsqrt_as_div import RsqrtAsDivPass
from fptq_onnx.saving import pause_point

PLACEHOLDER = "fptq-streaming-placeholder"
_WRAPPER_PREFIX = "lm."


def placeholder(name: str, shape: tuple[int, ...], dtype: ir.DataType = ir.DataType.FLOAT) -> ir.ExternalTensor:
    """A tensor with a shape and dtype but no data (reading it fails loudly)."""
    length = int(int(np.prod(shape)) * dtype.itemsize)
    return ir.ExternalTensor(f"{PLACEHOLDER}/{name}", 0, length, dtype, shape=ir.Shape(shape), name=name,
                             base_dir=os.devnull)


def is_placeholder(tensor) -> bool:
    return isinstance(tensor, ir.ExternalTensor) and str(tensor.location).startswith(PLACEHOLDER)


def zero_weight(shape: tuple[int, ...]) -> ir.Tensor:
    """A [K, N] float weight of zeros that takes no memory (a zero-stride view).

    The fold pass multiplies planned linears' float weights by s before the weight
    pass replaces them with the plan's quantized ones; the float values themselves
    are never used for a planned linear, so they need not exist.
    """
    return ir.tensor(np.broadcast_to(np.float32(0.0), shape))


def export_structure(skeleton: torch.nn.Module, spec: ArchSpec, values: Callable[[str], np.ndarray],
                     linear_names: set[str], cache: Path | None = None) -> ir.Model:
    """The canonical float graph of a meta-device model; see the module docstring.

    values(param_or_buffer_name) -> real array for every non-linear initializer;
    linear_names: the decoder linears (module names), whose weights stay placeholders.
    cache: a file for the traced graph (trace_structure's output, every initializer a
    placeholder): read when it exists, written when not, so a model is traced once (the
    dynamo trace is most of a small model's conversion time); what follows runs every time.
    """
    if cache is not None and cache.is_file():
        model = ir.load(cache)
    else:
        model = trace_structure(skeleton, spec)
        if cache is not None:
            _save_traced(model, cache, model_tensor_names(skeleton))
    return finish_structure(model, skeleton, spec, values, linear_names)


def model_tensor_names(skeleton: torch.nn.Module) -> set[str]:
    """The parameters' and buffers' names: an initializer named otherwise is a constant the trace lifted."""
    return ({name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
            | {name for name, _ in skeleton.named_buffers(remove_duplicate=False)})


def _model_key(initializer: str) -> str:
    return initializer[len(_WRAPPER_PREFIX):] if initializer.startswith(_WRAPPER_PREFIX) else initializer


def _has_data(tensor) -> bool:
    """False for no value, a placeholder, or a meta-device torch tensor (the trace of a meta model)."""
    if tensor is None or is_placeholder(tensor):
        return False
    raw = getattr(tensor, "raw", None)
    return not (isinstance(raw, torch.Tensor) and raw.is_meta)


def _save_traced(model: ir.Model, path: Path, model_tensors: set[str]) -> None:
    """The traced graph, written atomically: the model's tensors as placeholders (no data), lifted constants whole."""
    for name, value in model.graph.initializers.items():
        if _model_key(name) in model_tensors or not _has_data(value.const_value):
            value.const_value = placeholder(name, tuple(int(d) for d in value.shape), value.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ir.save(model, tmp)
    os.replace(tmp, path)


def trace_structure(skeleton: torch.nn.Module, spec: ArchSpec, replicate: bool = True) -> ir.Model:
    """torch.onnx.export (dynamo) of the meta-device model, unoptimized, initializers without values.

    With `replicate`, only the first few decoder layers are traced and the rest copied
    from the middle one (fptq_onnx.layer_replicas): the trace then costs the same for any depth.
    """
    from fptq_onnx.layer_replicas import NotReplicable, first_layers, replicate_layers, traced_layers

    layers = skeleton.config.num_hidden_layers
    count = traced_layers(skeleton.config) if replicate else layers
    if count == layers:
        return _trace(skeleton, spec)
    with first_layers(skeleton, spec, count):
        model = _trace(skeleton, spec)
    try:
        replicate_layers(model, spec, _WRAPPER_PREFIX, count, layers)
    except NotReplicable:
        return _trace(skeleton, spec)
    return model


def _trace(skeleton: torch.nn.Module, spec: ArchSpec) -> ir.Model:
    from torch.export import Dim

    from fptq_onnx.export import OPSET, KVCacheWrapper, _eager_attention, _quiet_loggers, example_inputs

    config = skeleton.config
    layers = config.num_hidden_layers
    wrapper = KVCacheWrapper(skeleton).eval()
    dim = Dim.DYNAMIC
    dynamic_shapes = {
        "input_ids": {0: dim, 1: dim},
        "attention_mask": {0: dim, 1: dim},
        "position_ids": {0: dim, 1: dim},
        "past": tuple({0: dim, 2: dim} for _ in range(2 * layers)),
    }
    inputs = tuple(t.to("meta") for t in example_inputs(config))
    with warnings.catch_warnings(), _quiet_loggers(), torch.no_grad(), _eager_attention(skeleton), _scalars_on_cpu():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper, inputs, dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=OPSET,
                input_names=list(spec.io_inputs) + spec.past_names(layers),
                output_names=["logits"] + spec.present_names(layers), optimize=False, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; the user needs one line
            raise FptqError(f"torch.onnx.export failed for {config.model_type}: {str(exc).splitlines()[0]}") from exc
    return program.model


@contextlib.contextmanager
def _scalars_on_cpu() -> Iterator[None]:
    """`torch.tensor(number, device=<meta>)` makes the scalar on the CPU instead, for the trace's duration.

    A meta scalar has no value, so its lifted constant could not be exported; a 0-dim CPU
    tensor keeps the number and mixes with tensors of any device.
    """
    original = torch.tensor

    def tensor(data, *args, device=None, **kwargs):
        if isinstance(data, (bool, int, float)) and device is not None and torch.device(device).type == "meta":
            device = "cpu"
        return original(data, *args, device=device, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = original


def finish_structure(model: ir.Model, skeleton: torch.nn.Module, spec: ArchSpec, values: Callable[[str], np.ndarray],
                     linear_names: set[str]) -> ir.Model:
    """Values (or placeholders) into the traced graph, the exporter's optimizer, canonical names."""
    import onnxscript.optimizer

    from fptq_onnx.export import _name_dims, canonicalize

    layers = skeleton.config.num_hidden_layers
    weights = {f"{name}.weight" for name in linear_names}
    model_tensors = model_tensor_names(skeleton)
    for name, value in model.graph.initializers.items():
        key = _model_key(name)
        shape = tuple(int(d) for d in value.shape)
        if key in weights:
            value.const_value = placeholder(name, shape)
        elif key not in model_tensors:
            if not _has_data(value.const_value):
                raise FptqError(f"the traced graph has a constant {name} without a value (not a tensor of the model)")
        else:
            array = values(key)
            if tuple(array.shape) != shape:
                raise FptqError(f"checkpoint tensor {key} has shape {tuple(array.shape)}, the model expects {shape}")
            value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)

    def should_fold(node: ir.Node) -> bool | None:
        if any(v is not None and is_placeholder(v.const_value) for v in node.inputs):
            return False
        return None

    with warnings.catch_warnings(), _without_rewrite_rules(_SKIPPED_REWRITE_RULES):
        warnings.simplefilter("ignore")
        onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)

    def weight_of(param: str):
        if param in weights:
            n, k = skeleton.get_submodule(param[: -len(".weight")]).weight.shape
            return placeholder(param, (k, n))
        return np.ascontiguousarray(values(param)).astype(np.float32)

    canonicalize(model, skeleton, spec, weight_of)
    RsqrtAsDivPass()(model)
    _name_dims(model, spec, layers)
    _stable_names(model.graph)
    model.producer_name = "fptq-onnx"
    leftover = [n for n, v in model.graph.initializers.items() if is_placeholder(v.const_value) and n not in weights]
    if leftover:
        raise FptqError(f"streaming export kept a weight outside the decoder linears ({leftover[0]}); "
                        "architecture not supported by --stream")
    return model


# onnxscript's SlicesSplit (two Slices of one input -> one Split) looks for the second Slice by walking
# the whole graph for every Slice: quadratic, 13.5 of the 17 s the optimizer takes on SmolLM2, and it
# never fires on these graphs (the finished model is byte-identical without it: tests/test_streaming.py).
_SKIPPED_REWRITE_RULES = frozenset({"SlicesSplit"})


@contextlib.contextmanager
def _without_rewrite_rules(names: frozenset[str]) -> Iterator[None]:
    """optimize_ir with its default rewrite rules less `names` (it reads the module's tuple when called)."""
    from onnxscript import rewriter

    rules = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


_GENERATED_NODE = re.compile(r"node_[A-Za-z0-9]+_\d+")
_GENERATED_VALUE = re.compile(r"val_\d+")


def _stable_names(graph: ir.Graph) -> None:
    """Names the exporter and its optimizer generate from process-wide counters, renumbered in graph order.

    So a graph finished from the cached trace is byte-identical to one finished right after tracing.
    """
    values = 0
    for name in [n for n in graph.initializers if _GENERATED_VALUE.fullmatch(n)]:  # the optimizer's constants
        value = graph.initializers.pop(name)
        value.name = f"fptq_v{values}"
        values += 1
        graph.register_initializer(value)
    for index, node in enumerate(graph):
        if node.name and _GENERATED_NODE.fullmatch(node.name):
            node.name = f"fptq_n{index}_{node.op_type}"
        for value in node.outputs:
            if value.name and _GENERATED_VALUE.fullmatch(value.name):
                value.name = f"fptq_v{values}"
                values += 1


class ExternalDataWriter:
    """Appends initializer data to one external-data file and points the graph at it."""

    ALIGN = 4096
    MIN_BYTES = 1024  # smaller initializers stay inside the proto, like saving.save_model

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.offset = 0

    def spill(self, graph: ir.Graph, hold: frozenset[str] | set[str] = frozenset()) -> int:
        """Write every in-memory initializer >= MIN_BYTES but those named in `hold` (a later pass
        replaces them: written now, their bytes would stay in the file unread); returns the bytes written."""
        written = 0
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if (tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < self.MIN_BYTES
                    or name in hold):
                continue
            data = tensor.tobytes()
            pad = -self.offset % self.ALIGN
            if pad:
                self.file.write(b"\0" * pad)
                self.offset += pad
            self.file.write(data)
            value.const_value = ir.ExternalTensor(
                self.path.name, self.offset, len(data), tensor.dtype, shape=tensor.shape, name=name,
                base_dir=str(self.path.parent),
            )
            self.offset += len(data)
            written += len(data)
            del data
        self.file.flush()
        if written:
            pause_point("external-data")
        return written

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def check_complete(graph: ir.Graph) -> None:
    """No placeholder may reach the saved model."""
    missing = [n for n, v in graph.initializers.items() if is_placeholder(v.const_value)]
    if missing:
        raise FptqError(f"streaming export left {len(missing)} weights unfilled (e.g. {missing[0]})")
