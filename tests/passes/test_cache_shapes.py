"""ShareCacheShapesPass: one cache-length read, no Range + host scalar Add, the same logits (prefill and decode)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fptq_onnx.passes.cache_shapes import CANONICAL, ShareCacheShapesPass
from fptq_onnx.runtime import OnnxCausalLM


def _range_plus_scalar(graph: ir.Graph) -> list[str]:
    return [n.name for n in graph if n.op_type == "Add"
            and any(v is not None and v.producer() is not None and v.producer().op_type == "Range" for v in n.inputs)]


def test_pass_shares_cache_shapes_and_keeps_function(tiny_onnx, tmp_path):
    model = ir.load(tiny_onnx["llama"])
    before = len(list(model.graph))
    assert _range_plus_scalar(model.graph), "the export's cache positions are no longer Range + past_len"
    assert ShareCacheShapesPass()(model).modified
    past_reads = {n.inputs[0].name for n in model.graph if n.op_type == "Shape" and "past" in n.inputs[0].name}
    assert past_reads == {CANONICAL}
    assert not _range_plus_scalar(model.graph)
    assert len(list(model.graph)) < before
    ir.save(model, tmp_path / "shapes.onnx")

    ref, new = OnnxCausalLM(tiny_onnx["llama"]), OnnxCausalLM(tmp_path / "shapes.onnx")
    ids = np.random.default_rng(0).integers(0, 128, (2, 7))
    logits_ref, past_ref = ref.forward(ids, ref.empty_past(2))
    logits_new, past_new = new.forward(ids, new.empty_past(2))
    np.testing.assert_array_equal(logits_new, logits_ref)
    token = logits_ref[:, -1:].argmax(-1)
    np.testing.assert_array_equal(new.forward(token, past_new)[0], ref.forward(token, past_ref)[0])
