"""Per-architecture knowledge, as data: which norm feeds which linears, which linear feeds which.

Adding an architecture means adding one `ArchSpec` entry to `registry.py` (plus a
tiny-config test), never a new code path.
"""

from fptq_onnx.models.registry import ArchSpec, EqualizationGroup, LinearPair, spec_for, supported_model_types

__all__ = ["ArchSpec", "EqualizationGroup", "LinearPair", "spec_for", "supported_model_types"]
