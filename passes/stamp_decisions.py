"""Write each linear's decision onto its MatMul (metadata_props + doc string) so Netron shows it."""

from __future__ import annotations

import onnx_ir as ir

from fptq_onnx.passes.graph_utils import set_metadata
from fptq_onnx.plan import QuantPlan


ORT_ACCURACY_LEVEL_KEY = "fptq.ort_matmulnbits_accuracy_level"


class StampDecisionsPass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan, fmt: str) -> None:
        super().__init__()
        self.plan = plan
        self.fmt = fmt

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Lowered linears are W4A8MatMul nodes with the same names.
        matmuls = {node.name: node for node in model.graph if node.name}
        for name, lp in self.plan.linears.items():
            node = matmuls.get(name)
            if node is None:
                continue
            items = {
                "fptq.method": self.plan.method,
                "fptq.format": self.fmt,
                "fptq.strategy": lp.strategy,
                "fptq.act_mode": lp.act_mode.value,
                "fptq.max_abs": f"{lp.max_abs:.4g}",
                "fptq.max_abs_equalized": f"{lp.max_abs_equalized:.4g}",
                "fptq.act_scale": None if lp.act_scale is None else f"{lp.act_scale:.6g}",
                "fptq.equalized_by": lp.equalized_by,
                "fptq.weight": None if lp.weight is None else lp.weight.describe(),
                "fptq.reason": lp.reason,
            }
            set_metadata(node, items)
            node.doc_string = "; ".join(f"{k.removeprefix('fptq.')}={v}" for k, v in items.items() if v is not None)
        model.metadata_props["fptq.method"] = self.plan.method
        model.metadata_props["fptq.format"] = self.fmt
        model.metadata_props["fptq.counts"] = str(self.plan.counts())
        # ORT fuses int4 DQ + MatMul into MatMulNBits and by default quantizes its activations
        # per K-block (accuracy level 4). Only the native form wants that; elsewhere (weight-only
        # layers) level 0 keeps float activations exact. fptq_onnx.runtime applies this hint.
        model.metadata_props[ORT_ACCURACY_LEVEL_KEY] = "4" if self.fmt == "native" else "0"
        return ir.passes.PassResult(model, modified=True)
