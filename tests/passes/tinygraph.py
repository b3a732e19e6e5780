"""A hand-made tiny decoder-layer graph named like the export, and ORT helpers, for the pass tests.

x [B, S, K] -> Mul(L.input_layernorm.weight) -> L.q_proj, L.k_proj (+bias), L.v_proj (+bias)
v -> Gather (GQA repeat of KV channels) -> L.o_proj
x -> L.gate_proj, L.up_proj (+bias); SiLU(gate) * up -> L.down_proj
K = 48 (ragged for G = 32), down_proj K = 64.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

B, S, K = 2, 5, 48
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
NQ, NKV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
F = 64
G = 32
L = "L"
OUTPUTS = ("q", "k", "o", "d")


def repeat_kv_indices(heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM) -> np.ndarray:
    """Consumer channel c reads producer channel (c // (rep*hd)) * hd + c % hd (HF repeat_kv layout)."""
    rep = heads // kv_heads
    c = np.arange(heads * head_dim)
    return ((c // (rep * head_dim)) * head_dim + c % head_dim).astype(np.int64)


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        f"{L}.input_layernorm.weight": (0.5 + rng.random(K)).astype(np.float32),
        f"{L}.q_proj.weight": rng.normal(0, 0.2, (K, NQ)),
        f"{L}.k_proj.weight": rng.normal(0, 0.2, (K, NKV)),
        f"{L}.k_proj.bias": rng.normal(0, 0.5, NKV),
        f"{L}.v_proj.weight": rng.normal(0, 0.2, (K, NKV)),
        f"{L}.v_proj.bias": rng.normal(0, 0.5, NKV),
        f"{L}.o_proj.weight": rng.normal(0, 0.2, (NQ, K)),
        f"{L}.gate_proj.weight": rng.normal(0, 0.2, (K, F)),
        f"{L}.up_proj.weight": rng.normal(0, 0.2, (K, F)),
        f"{L}.up_proj.bias": rng.normal(0, 0.5, F),
        f"{L}.down_proj.weight": rng.normal(0, 0.2, (F, K)),
    }
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def build(seed: int = 0, direct_output: bool = True) -> ir.Model:
    """direct_output: the MatMul outputs q, o, d are themselves graph outputs (else each output
    X goes through an Identity to 'X.out', as in the export where no linear output is a graph output)."""
    w = weights(seed)
    mm = lambda name, a, out: helper.make_node("MatMul", [a, f"{L}.{name}.weight"], [out], name=f"{L}.{name}")  # noqa: E731
    nodes = [
        helper.make_node("Mul", ["x", f"{L}.input_layernorm.weight"], ["n"], name=f"{L}.input_layernorm"),
        mm("q_proj", "n", "q"),
        mm("k_proj", "n", "k_mm"),
        helper.make_node("Add", ["k_mm", f"{L}.k_proj.bias"], ["k"], name=f"{L}.k_proj/bias"),
        mm("v_proj", "n", "v_mm"),
        helper.make_node("Add", ["v_mm", f"{L}.v_proj.bias"], ["v"], name=f"{L}.v_proj/bias"),
        helper.make_node("Gather", ["v", "repeat_kv"], ["v_rep"], axis=2, name="repeat_kv"),
        mm("o_proj", "v_rep", "o"),
        mm("gate_proj", "x", "g"),
        mm("up_proj", "x", "u_mm"),
        helper.make_node("Add", ["u_mm", f"{L}.up_proj.bias"], ["u"], name=f"{L}.up_proj/bias"),
        helper.make_node("Sigmoid", ["g"], ["g_sig"]),
        helper.make_node("Mul", ["g", "g_sig"], ["g_act"]),
        helper.make_node("Mul", ["g_act", "u"], ["h"]),
        mm("down_proj", "h", "d"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(repeat_kv_indices(), "repeat_kv"))
    out_dims = {"q": NQ, "k": NKV, "o": K, "d": K}
    out_names = {n: n if direct_output else f"{n}.out" for n in OUTPUTS}
    if not direct_output:
        nodes += [helper.make_node("Identity", [n], [out_names[n]]) for n in OUTPUTS]
    graph = helper.make_graph(
        nodes, "tiny_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
        [helper.make_tensor_value_info(out_names[n], TensorProto.FLOAT, ["B", "S", out_dims[n]]) for n in OUTPUTS],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def inputs(seed: int = 1, zero_row: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1.0, (B, S, K)).astype(np.float32)
    x[0, 1, 3] = 6.0  # an outlier channel
    if zero_row:
        x[1, 2, :] = 0.0
    return x


def session(model: ir.Model, custom_ops: bool = False, accuracy_level: str | None = "0") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    if custom_ops:
        from fptq_onnx.custom_ops import register

        register(so)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: ir.Model, x: np.ndarray, custom_ops: bool = False) -> dict[str, np.ndarray]:
    sess = session(model, custom_ops)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"x": x})))


def run_list(model: ir.Model, x: np.ndarray, custom_ops: bool = False) -> list[np.ndarray]:
    """Outputs by position (lowering may rename a graph output)."""
    return session(model, custom_ops).run(None, {"x": x})


def copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def op_count(model: ir.Model, op_type: str, domain: str = "") -> int:
    return sum(1 for node in model.graph if node.op_type == op_type and node.domain == domain)


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def init(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def numpy_reference(x: np.ndarray, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float function of the graph in numpy (float64)."""
    x = x.astype(np.float64)
    n = x * w[f"{L}.input_layernorm.weight"]
    v = n @ w[f"{L}.v_proj.weight"] + w[f"{L}.v_proj.bias"]
    g = x @ w[f"{L}.gate_proj.weight"]
    u = x @ w[f"{L}.up_proj.weight"] + w[f"{L}.up_proj.bias"]
    h = g / (1 + np.exp(-g)) * u
    return {
        "q": n @ w[f"{L}.q_proj.weight"],
        "k": n @ w[f"{L}.k_proj.weight"] + w[f"{L}.k_proj.bias"],
        "o": v[..., repeat_kv_indices()] @ w[f"{L}.o_proj.weight"],
        "d": h @ w[f"{L}.down_proj.weight"],
    }
