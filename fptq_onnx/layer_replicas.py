"""Trace three decoder layers, not all of them: the other layers are copies of the middle one.

The dynamo trace costs time in proportion to depth (~65 s of a first SmolLM2 convert on
2 cores, 30 layers; ~75 s for a 32-layer 7B shape) and every decoder layer of a
homogeneous model traces to the same nodes. So :func:`traced_layers` says how many
layers to trace (3: the first, whose input is the embedding, a middle one, the last,
whose output feeds the final norm), and :func:`replicate_layers` turns that graph into
the full-depth one: the middle layer's nodes (its namespace in the exporter's
``name_scopes`` metadata, plus the top-level nodes that read only its own KV-cache
inputs) are copied once per missing layer with their own cache inputs/outputs and
initializers, chained hidden state to hidden state, and the traced last layer is
renamed to the model's last index. The result is the graph a full trace gives, up to
the exporter's generated names (tested: same computation, node for node, and the same
ORT outputs).

Models whose layers differ (``config.layer_types`` not all equal: Gemma-2/3's
sliding/global pattern) are traced whole.
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Iterator

import onnx_ir as ir
import torch

from fptq_onnx.models.registry import ArchSpec

TRACED = 3
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_GENERATED_VALUE = re.compile(r"val_\d+")


class NotReplicable(Exception):
    """The traced graph does not have the one-hidden-state-in, one-out layer shape copying needs."""


def traced_layers(config) -> int:
    """How many decoder layers to trace for this config: TRACED, or all of them."""
    layers = config.num_hidden_layers
    kinds = getattr(config, "layer_types", None)
    if layers <= TRACED or (kinds and len(set(kinds)) > 1):
        return layers
    return TRACED


@contextlib.contextmanager
def first_layers(skeleton: torch.nn.Module, spec: ArchSpec, count: int) -> Iterator[None]:
    """The skeleton cut to its first `count` decoder layers for the duration (config included)."""
    config = skeleton.config
    layers = skeleton.get_submodule(spec.layers_path)
    saved_layers, saved_count = list(layers), config.num_hidden_layers
    saved_kinds = getattr(config, "layer_types", None)
    del layers[count:]
    config.num_hidden_layers = count
    if saved_kinds:
        config.layer_types = list(saved_kinds[:count])
    try:
        yield
    finally:
        layers.extend(saved_layers[count:])
        config.num_hidden_layers = saved_count
        if saved_kinds:
            config.layer_types = saved_kinds


def _layer_of(node: ir.Node, prefix: str) -> int | None:
    raw = node.metadata_props.get(_SCOPES_KEY)
    if not raw:
        return None
    for scope in ast.literal_eval(raw):
        if scope.startswith(prefix):
            head = scope[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def _layer_nodes(graph: ir.Graph, prefix: str, past: dict[str, int]) -> dict[int, list[ir.Node]]:
    """Nodes by decoder layer: its namespace, and the top-level nodes that belong to it alone.

    A top-level node belongs to layer k when it derives from layer k's cache inputs only and
    every consumer of its outputs belongs to layer k (decided consumers first, in reverse
    order). A value the exporter shares between layers (all cache lengths are one symbol, so
    one layer's `Shape(past)` may serve them all) stays shared.
    """
    owner: dict[int, int | None] = {}  # id(value) -> the one layer whose cache inputs it derives from
    for value in graph.inputs:
        if value.name in past:
            owner[id(value)] = past[value.name]
    nodes = list(graph)
    layer_of: dict[int, int | None] = {}
    for node in nodes:
        layer = _layer_of(node, prefix)
        if layer is None:
            sources = {owner.get(id(v)) for v in node.inputs if v is not None and id(v) in owner}
            derived = sources.pop() if len(sources) == 1 else None
            for value in node.outputs:
                owner[id(value)] = derived
        layer_of[id(node)] = layer
    for node in reversed(nodes):
        if layer_of[id(node)] is not None:
            continue
        derived = owner.get(id(node.outputs[0])) if node.outputs else None
        if derived is not None and all(
            not value.is_graph_output() and value.uses()
            and all(layer_of.get(id(user)) == derived for user, _ in value.uses())
            for value in node.outputs
        ):
            layer_of[id(node)] = derived
    by_layer: dict[int, list[ir.Node]] = {}
    for node in nodes:
        if layer_of[id(node)] is not None:
            by_layer.setdefault(layer_of[id(node)], []).append(node)
    return by_layer


def _boundary(nodes: list[ir.Node], graph: ir.Graph) -> tuple[list[ir.Value], list[ir.Value]]:
    """(values the nodes read from outside, values they give to outside or as graph outputs)."""
    inside = {id(n) for n in nodes}
    reads, gives, seen_r, seen_g = [], [], set(), set()
    for node in nodes:
        for value in node.inputs:
            if value is None or id(value) in seen_r:
                continue
            producer = value.producer()
            if producer is None or id(producer) not in inside:
                seen_r.add(id(value))
                reads.append(value)
        for value in node.outputs:
            if id(value) not in seen_g and (value.is_graph_output() or any(id(u) not in inside for u, _ in value.uses())):
                seen_g.add(id(value))
                gives.append(value)
    return reads, gives


def _constant(value: ir.Value) -> bool:
    """A Constant node's output: the exporter shares equal constants between layers, and so may we."""
    return value.producer() is not None and value.producer().op_type == "Constant"


def _rename_scope(props: dict[str, str], prefix: str, old: int, new: int) -> dict[str, str]:
    pattern = re.compile(rf"{re.escape(prefix)}{old}(?!\d)")
    return {k: pattern.sub(f"{prefix}{new}", v) for k, v in props.items()}


def replicate_layers(model: ir.Model, spec: ArchSpec, wrapper_prefix: str, traced: int, layers: int) -> None:
    """Grow a graph traced with `traced` layers (see traced_layers) to `layers`, in place.

    Raises NotReplicable when the graph does not have the expected layer boundaries
    (the caller then traces the whole model).
    """
    if traced == layers:
        return
    graph = model.graph
    prefix = f"{wrapper_prefix}{spec.layers_path}."
    past_names = spec.past_names(traced)
    per_layer = len(past_names) // traced
    past = {name: i // per_layer for i, name in enumerate(past_names)}
    by_layer = _layer_nodes(graph, prefix, past)
    if sorted(by_layer) != list(range(traced)):
        raise NotReplicable(f"layers found in the trace: {sorted(by_layer)}")
    template, last = by_layer[1], by_layer[traced - 1]
    reads, gives = _boundary(template, graph)
    first = {id(n) for n in by_layer[0]}
    from_first = [v for v in reads if v.producer() is not None and id(v.producer()) in first and not _constant(v)]
    presents = {v.name: v for v in gives if v.is_graph_output()}
    hidden_out = [v for v in gives if not v.is_graph_output() and not _constant(v)]
    if len(from_first) != 1 or len(hidden_out) != 1 or len(presents) != per_layer:
        raise NotReplicable("the middle layer does not read one hidden state and give one")
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in template for a in n.attributes.values()):
        raise NotReplicable("a layer node has a subgraph")
    hidden_in, hidden = from_first[0], hidden_out[0]
    init_prefix = f"{prefix}1."
    counter = [max((int(m.group()[4:]) for v in graph.initializers.values() if (m := _GENERATED_VALUE.fullmatch(v.name or ""))),
                   default=0) + 10**6]

    def fresh(name: str | None, layer: int) -> str | None:
        if name is None:
            return None
        if _GENERATED_VALUE.fullmatch(name):
            counter[0] += 1
            return f"val_{counter[0]}"
        return f"{name}__layer{layer}"

    def new_input(template_value: ir.Value, name: str) -> ir.Value:
        return ir.Value(name=name, shape=template_value.shape.copy() if template_value.shape is not None else None,
                        type=template_value.type)

    _rename_last(graph, last, _boundary(last, graph)[0], prefix, traced - 1, layers - 1, past)
    anchor = template[-1]
    added_inputs: dict[str, ir.Value] = {}
    added_outputs: dict[str, ir.Value] = {}
    for layer in range(2, layers - 1):
        mapping: dict[int, ir.Value] = {id(hidden_in): hidden}
        for value in reads:
            if value.name in past:
                name = value.name.replace(".1.", f".{layer}.", 1)
                added_inputs[name] = mapping[id(value)] = new_input(value, name)
            elif value.name and value.name.startswith(init_prefix) and value.is_initializer():
                name = f"{prefix}{layer}." + value.name[len(init_prefix):]
                copy = ir.Value(name=name, shape=value.shape.copy() if value.shape is not None else None,
                                type=value.type, const_value=value.const_value)
                graph.register_initializer(copy)
                mapping[id(value)] = copy
        clones = []
        for node in template:
            clone = ir.Node(
                node.domain, node.op_type,
                [None if v is None else mapping.get(id(v), v) for v in node.inputs],
                attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                name=fresh(node.name, layer), doc_string=node.doc_string,
                metadata_props=_rename_scope(dict(node.metadata_props), prefix, 1, layer),
            )
            for old, new in zip(node.outputs, clone.outputs):
                new.name = fresh(old.name, layer) if old.name not in presents else \
                    old.name.replace(".1.", f".{layer}.", 1)
                new.type, new.shape = old.type, old.shape.copy() if old.shape is not None else None
                mapping[id(old)] = new
                if old.name in presents:
                    added_outputs[new.name] = new
            clones.append(clone)
        graph.insert_after(anchor, clones)
        anchor = clones[-1]
        hidden = mapping[id(hidden_out[0])]
    if hidden is not hidden_out[0]:
        for node in last:
            for index, value in enumerate(node.inputs):
                if value is hidden_out[0]:
                    node.replace_input_with(index, hidden)
    order_in = list(spec.io_inputs) + spec.past_names(layers)
    order_out = ["logits"] + spec.present_names(layers)
    all_in = {**{v.name: v for v in graph.inputs}, **added_inputs}
    all_out = {**{v.name: v for v in graph.outputs}, **added_outputs}
    if set(all_in) != set(order_in) or set(all_out) != set(order_out):
        raise NotReplicable("graph inputs/outputs after copying do not match the model's cache names")
    graph.inputs.clear()
    graph.inputs.extend(all_in[n] for n in order_in)
    graph.outputs.clear()
    graph.outputs.extend(all_out[n] for n in order_out)


def _rename_last(graph: ir.Graph, nodes: list[ir.Node], reads: list[ir.Value], prefix: str, old: int, new: int,
                 past: dict[str, int]) -> None:
    """The traced last layer becomes layer `new`: cache inputs/outputs, initializers, scope metadata."""
    if old == new:
        return
    tag_old, tag_new = f".{old}.", f".{new}."
    for value in reads:
        if value.name in past:
            value.name = value.name.replace(tag_old, tag_new, 1)
        elif value.is_initializer() and value.name.startswith(f"{prefix}{old}."):
            graph.initializers.pop(value.name)
            value.name = f"{prefix}{new}." + value.name[len(f"{prefix}{old}."):]
            graph.register_initializer(value)
    for node in nodes:
        props = _rename_scope(dict(node.metadata_props), prefix, old, new)
        node.metadata_props.clear()
        node.metadata_props.update(props)
        for value in node.outputs:
            if value.is_graph_output() and value.name.startswith("present"):
                value.name = value.name.replace(tag_old, tag_new, 1)
