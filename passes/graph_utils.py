"""Small onnx-ir helpers the passes share."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def matmuls_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    return {node.name: node for node in graph if node.op_type == "MatMul" and node.name}


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.Tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def replace_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> None:
    """New contents for an existing initializer (same name, dtype of the array)."""
    value = graph.initializers[name]
    value.const_value = ir.tensor(array.astype(value.const_value.dtype.numpy()), name=name)
    value.shape = ir.Shape(array.shape)


def initializer_array(graph: ir.Graph, name: str) -> np.ndarray:
    return graph.initializers[name].const_value.numpy()


def bias_add(node: ir.Node) -> ir.Node | None:
    """The `Add` of a constant right after a MatMul (a linear's bias), if any."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1:
        return None
    user = uses[0].node
    if user.op_type != "Add":
        return None
    other = user.inputs[1 - uses[0].idx]
    return user if other is not None and other.const_value is not None else None


def bias_initializer(node: ir.Node) -> ir.Value | None:
    add = bias_add(node)
    if add is None:
        return None
    return next(v for v in add.inputs if v is not node.outputs[0])


def drop_unused_initializers(graph: ir.Graph, names: list[str]) -> None:
    for name in names:
        value = graph.initializers.get(name)
        if value is not None and not value.uses() and value not in graph.outputs:
            graph.initializers.pop(name)


def set_metadata(node: ir.Node, items: dict[str, object]) -> None:
    for key, val in items.items():
        if val is not None:
            node.metadata_props[key] = str(val)
