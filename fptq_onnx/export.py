"""Float ONNX export of a causal LM with KV cache, with canonical names.

torch's dynamo exporter names nodes and folded constants after FX nodes
(`node_linear_12`, `val_433`) and deduplicates equal constants (a random-init
model's norm weights all collapse into one). The graph passes need stable,
unshared handles, so after export every decoder linear becomes a MatMul named
after its module (`model.layers.0.self_attn.q_proj`) whose B input is its own
initializer `<module>.weight` of shape [K, N], and every norm weight becomes
`<norm>.weight`, holding what the norm multiplies by (its weight, or 1 + weight for
Gemma's RMSNorm, as the exporter folds it). The plan's keys are those names.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import warnings

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import torch

from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import ArchSpec
from fptq_onnx.passes.rsqrt_as_div import RsqrtAsDivPass

OPSET = 21
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_WRAPPER_ATTR = "lm"


class KVCacheWrapper(torch.nn.Module):
    """Flat-tensor signature (Optimum's names) around an HF causal LM with a DynamicCache.

    Every layer gets a full cache layer, sliding-window ones too (Gemma, Mistral): the
    graph then keeps one KV layout (past + new tokens for every layer, which runtimes
    and genai expect) and the window lives in the attention mask, instead of the
    exported truncation of a sliding cache layer, which indexes past its input once
    the past reaches the window.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, _WRAPPER_ATTR, model)
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        model = getattr(self, _WRAPPER_ATTR)
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_shape(config) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of the cache tensors."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def example_inputs(config, batch: int = 2, seq: int = 4, past: int = 3) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: a non-empty past and distinct sizes so no dim specializes to a constant."""
    kv_heads, head_dim = kv_shape(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [torch.randn(batch, kv_heads, past, head_dim, generator=gen) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, pos, *cache)


def export_float(model: torch.nn.Module, spec: ArchSpec) -> ir.Model:
    """Export `model` to an in-memory ONNX IR model with canonical names (see module doc)."""
    from torch.export import Dim

    config = model.config
    layers = config.num_hidden_layers
    wrapper = KVCacheWrapper(model).eval()
    batch, seq, past, total = Dim.DYNAMIC, Dim.DYNAMIC, Dim.DYNAMIC, Dim.DYNAMIC
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layers)),
    }
    input_names = list(spec.io_inputs) + spec.past_names(layers)
    output_names = ["logits"] + spec.present_names(layers)
    with warnings.catch_warnings(), _quiet_loggers(), torch.no_grad(), _eager_attention(model):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                example_inputs(config),
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; the user needs one line
            raise FptqError(f"torch.onnx.export failed for {config.model_type}: {str(exc).splitlines()[0]}") from exc
    ir_model = program.model
    canonicalize(ir_model, model, spec)
    RsqrtAsDivPass()(ir_model)
    _name_dims(ir_model, spec, layers)
    ir_model.producer_name = "fptq-onnx"
    return ir_model


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module):
    """Export attention as plain MatMul/Softmax with an additive mask.

    The SDPA path exports a NaN guard (IsNaN + Where over every [heads, T, T] score
    tensor) that cost ~25% of a 1024-token prefill in ONNX Runtime here; eager
    attention computes the same function without it.
    """
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def canonicalize(ir_model: ir.Model, model: torch.nn.Module, spec: ArchSpec, weight_of=None) -> None:
    """Give every decoder linear and norm its own canonically named initializer.

    `weight_of(param_name)` supplies the values (default: the model's parameters);
    the streaming export passes one that returns placeholders for linear weights
    (an `ir` tensor of the [K, N] shape, used as is) and real norm weights.
    """
    graph = ir_model.graph
    linear_names = {
        name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.startswith(spec.layers_path + ".")
    }
    norm_suffixes = tuple(g.norm for g in spec.groups)
    norm_names = {
        name for name, _ in model.named_modules() if name.endswith(norm_suffixes) and name.startswith(spec.layers_path)
    }
    params = dict(model.named_parameters())
    if weight_of is None:
        def weight_of(name: str):
            value = params[name].detach().numpy()
            return value.T.copy() if value.ndim == 2 else value.copy()  # linears as [K, N]
    seen_linears: set[str] = set()
    seen_norms: set[str] = set()
    for node in list(ir.traversal.RecursiveGraphIterator(graph)):
        scope = _module_scope(node, linear_names | norm_names)
        if scope is None:
            continue
        if node.op_type == "MatMul" and scope in linear_names:
            if scope in seen_linears:
                raise FptqError(f"export produced two MatMuls for {scope}; cannot name them")
            seen_linears.add(scope)
            node.name = scope
            node.replace_input_with(1, _initializer(graph, f"{scope}.weight", weight_of(f"{scope}.weight")))
        elif node.op_type == "Mul" and scope in norm_names:
            for index, value in enumerate(node.inputs):
                if value is not None and value.const_value is not None and value.const_value.shape.numpy() == (
                    params[f"{scope}.weight"].shape[0],
                ):
                    seen_norms.add(scope)
                    node.name = scope
                    multiplier = _norm_multiplier(spec, scope, value.const_value, weight_of(f"{scope}.weight"))
                    node.replace_input_with(index, _initializer(graph, f"{scope}.weight", multiplier))
    missing = sorted(linear_names - seen_linears) + sorted(norm_names - seen_norms)
    if missing:
        raise FptqError(f"export lost track of {len(missing)} modules (e.g. {missing[0]}); architecture not supported")
    ir.passes.common.RemoveUnusedNodesPass()(ir_model)
    prefix = _WRAPPER_ATTR + "."
    for name, value in list(graph.initializers.items()):
        if name.startswith(prefix) and name[len(prefix):] not in graph.initializers:
            graph.initializers.pop(name)
            value.name = name[len(prefix):]
            graph.register_initializer(value)


def _norm_multiplier(spec: ArchSpec, scope: str, exported: ir.TensorProtocol, weight: np.ndarray) -> np.ndarray:
    """The value a norm's Mul multiplies by: w, or offset + w (Gemma), as the exporter folded it.

    `<norm>.weight` in the graph holds this multiplier, so folding 1/s into it is one
    division for every architecture. Checked against the exported constant, which
    also checks the registry entry's `norm_offset`.
    """
    multiplier = spec.norm_multiplier(np.asarray(weight, dtype=np.float32))
    if not np.allclose(exported.numpy(), multiplier, rtol=1e-6, atol=1e-6):
        raise FptqError(
            f"{scope} multiplies by a constant that is not {spec.norm_offset:g} + its weight; "
            f"the '{spec.name}' entry's norm_offset does not fit this model"
        )
    return multiplier


def _module_scope(node: ir.Node, modules: set[str]) -> str | None:
    """The innermost module (from the exporter's name-scope metadata) that is in `modules`."""
    raw = node.metadata_props.get(_SCOPES_KEY)
    if not raw:
        return None
    prefix = _WRAPPER_ATTR + "."
    for scope in reversed(ast.literal_eval(raw)):
        name = scope[len(prefix):] if scope.startswith(prefix) else scope
        if name in modules:
            return name
    return None


def _initializer(graph: ir.Graph, name: str, array) -> ir.Value:
    """An initializer from a numpy array, or from an `ir` tensor (e.g. a streaming placeholder) as is."""
    if name in graph.initializers:
        raise FptqError(f"duplicate initializer {name}")
    tensor = ir.tensor(array, name=name) if isinstance(array, np.ndarray) else array
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _name_dims(ir_model: ir.Model, spec: ArchSpec, layers: int) -> None:
    """Replace the exporter's symbol names (s10, s70, ...) with Optimum's readable ones."""
    graph = ir_model.graph
    inputs = {v.name: v for v in graph.inputs}
    mapping: dict[str, str] = {}

    def learn(value_name: str, axis: int, readable: str) -> None:
        dim = inputs[value_name].shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            mapping.setdefault(dim.value, readable)

    learn("input_ids", 0, "batch_size")
    learn("attention_mask", 0, "batch_size")
    learn("input_ids", 1, "sequence_length")
    learn("attention_mask", 1, "total_sequence_length")
    for name in spec.past_names(layers):
        learn(name, 2, "past_sequence_length")
    for value in list(graph.inputs) + list(graph.outputs):
        if value.shape is None:
            continue
        value.shape = ir.Shape(
            [ir.SymbolicDim(mapping.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d for d in value.shape]
        )
    present = spec.present_names(layers)
    for value in graph.outputs:
        if value.name in present and value.shape is not None:
            dims = list(value.shape)
            dims[2] = ir.SymbolicDim("total_sequence_length")
            value.shape = ir.Shape(dims)


class _quiet_loggers:
    """The exporter logs pages of progress at INFO; users see our progress instead."""

    _names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")

    def __enter__(self) -> None:
        self._levels = {n: logging.getLogger(n).level for n in self._names}
        for name in self._names:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
