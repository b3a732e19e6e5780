"""One-node fptq::W4A8MatMul models for the robustness tests, and a session helper.

`OpCase` holds valid weights of one shape; `model()` builds the node from them with
any input replaced (a bad dtype, rank or value) and any attribute overridden, so
each hostile case is one small edit of a model that is otherwise correct.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper

from fptq_onnx import custom_ops

INPUTS = ("A", "B", "scales", "zero_points", "act_scale", "bias")
MISSING = object()  # an input slot left empty (name "")


@dataclass
class OpCase:
    K: int = 128
    N: int = 8
    G: int = 64
    act_mode: str = "static"
    seed: int = 0
    arrays: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        ng = -(-self.K // self.G)
        q = rng.integers(0, 16, size=(self.K, self.N), dtype=np.uint8)
        scales = (2.0 ** -rng.integers(5, 8, size=(ng, self.N))).astype(np.float32)  # exact float math
        zp = rng.integers(0, 16, size=(ng, self.N), dtype=np.uint8)
        B, s, z = custom_ops.pack_weights(q, scales, zp, self.G)
        self.arrays = {"B": B, "scales": s, "zero_points": z, "act_scale": np.array(0.125, np.float32),
                       "bias": (rng.integers(-64, 64, size=self.N) / 16).astype(np.float32)}

    def activations(self, rows: int, seed: int = 1) -> np.ndarray:
        """Random rows whose float math is exact in both modes: |a| <= 15 with one 127/8 per row,
        so per-token s_a = 1/8 and static (act_scale 1/8) quantization are exact."""
        rng = np.random.default_rng(seed)
        a = np.clip(rng.standard_normal((rows, self.K)) * 4, -15, 15).astype(np.float32)
        if rows:
            a[np.arange(rows), rng.integers(0, self.K, size=rows)] = 127 / 8
        return a

    def reference(self, a: np.ndarray) -> np.ndarray:
        x = self.arrays
        return custom_ops.reference_w4a8_matmul(a, x["B"], x["scales"], x["zero_points"], x["act_scale"], x["bias"],
                                                self.K, self.N, self.G, self.act_mode)

    def model(self, replace: dict | None = None, attrs: dict | None = None, graph_inputs: tuple[str, ...] = (),
              a_dims: list | None = None, a_type: int = TensorProto.FLOAT, extra_inputs: int = 0) -> ModelProto:
        """The node with `replace`d inputs (array, or MISSING), `attrs` overridden (None drops one);
        inputs named in `graph_inputs` are fed at run time instead of being initializers."""
        arrays = {**self.arrays, **(replace or {})}
        names, inits = ["A"], []
        inputs = [helper.make_tensor_value_info("A", a_type, a_dims if a_dims is not None else ["M", self.K])]
        for name in INPUTS[1:]:
            value = arrays[name]
            if value is MISSING:
                names.append("")
                continue
            names.append(name)
            if name in graph_inputs:
                inputs.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(value.dtype), [f"{name}{i}" for i in range(value.ndim)]))
            elif isinstance(value, TensorProto):
                inits.append(value)
            else:
                inits.append(numpy_helper.from_array(np.asarray(value), name))
        for i in range(extra_inputs):
            names.append(f"extra{i}")
            inits.append(numpy_helper.from_array(np.zeros(1, np.float32), f"extra{i}"))
        while names[-1] == "":
            names.pop()
        node_attrs = {"K": self.K, "N": self.N, "group_size": self.G, "act_mode": self.act_mode, **(attrs or {})}
        node = helper.make_node("W4A8MatMul", names, ["Y"], domain=custom_ops.DOMAIN, name="w4a8",
                                **{k: v for k, v in node_attrs.items() if v is not None})
        graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                                  initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                       helper.make_opsetid(custom_ops.DOMAIN, 1)], ir_version=10)


def session(model: ModelProto | str, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # the tests read the error statuses; ORT's own log lines are noise
    custom_ops.register(options)
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
