"""Which lm_head form is fastest in ONNX Runtime: SmolLM2's lm_head shape (K=576, N=49152) as one linear.

Usage: python bench/lm_head_cpu.py [--threads 1]
Forms, each written by the project's own passes: fp32; int4 g128 weight-only (ORT fuses it into
MatMulNBits at accuracy level 0 and 4); int4 + per-token int8 lowered to fptq.W4A8MatMul; int8
per-channel weight-only DequantizeLinear; int8 + per-token Q/DQ. Prints median ms at M=1 (decode)
and M=512 (prefill), the forms taking turns. This is how `--quantize-lm-head`'s form was chosen.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fptq_onnx.custom_ops import register
from fptq_onnx.passes.lower_w4a8 import LowerW4A8Pass
from fptq_onnx.passes.quantize_activations import QuantizeActivationsPass
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.plan import ActMode
from fptq_onnx.quant import quantize_int4, quantize_int8_per_channel

K, N, NAME = 576, 49152, "lm_head"


def float_model(w: np.ndarray) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name=NAME)], "lm_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "M", N])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def forms(w: np.ndarray) -> dict[str, tuple[ir.Model, str]]:
    """label -> (model, ORT MatMulNBits accuracy level)."""
    q4, q8 = quantize_int4(w, 128), quantize_int8_per_channel(w)

    def weights(qw) -> ir.Model:
        return QuantizeWeightsPass({NAME: qw})(float_model(w)).model

    def per_token(model: ir.Model) -> ir.Model:
        return QuantizeActivationsPass({NAME: (ActMode.PER_TOKEN, None)})(model).model

    return {
        "fp32": (float_model(w), "0"),
        "int4 weight-only (MatMulNBits acc0)": (weights(q4), "0"),
        "int4 MatMulNBits acc4": (weights(q4), "4"),
        "int4 + per-token: W4A8MatMul": (LowerW4A8Pass([NAME])(per_token(weights(q4))).model, "0"),
        "int8 per-channel weight-only DQ": (weights(q8), "0"),
        "int8 per-channel + per-token Q/DQ": (per_token(weights(q8)), "0"),
    }


def session(model: ir.Model, accuracy_level: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    register(so)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    w = np.random.default_rng(0).normal(0, 0.05, (K, N)).astype(np.float32)
    sessions = {label: session(m, level, args.threads) for label, (m, level) in forms(w).items()}
    print(f"| form | M=1 ms | M=512 ms |  ({args.threads} thread(s), K={K}, N={N})\n|---|---:|---:|")
    medians: dict[str, list[float]] = {label: [] for label in sessions}
    for m, repeats in ((1, 7), (512, 3)):
        x = np.random.default_rng(1).normal(0, 1, (1, m, K)).astype(np.float32)
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for s in sessions.values():
            s.run(None, {"x": x})
        for _ in range(repeats):
            for label, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {"x": x})
                times[label].append(time.perf_counter() - start)
        for label, ts in times.items():
            medians[label].append(1000 * statistics.median(ts))
    for label, (decode, prefill) in medians.items():
        print(f"| {label} | {decode:.2f} | {prefill:.1f} |")


if __name__ == "__main__":
    main()
