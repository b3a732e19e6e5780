"""Algorithm table: `--method NAME` maps here. Each entry pairs a frozen config dataclass
with the function that turns calibration statistics into a QuantPlan."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from fptq_onnx.algorithms import fptq
from fptq_onnx.errors import FptqError


@dataclass(frozen=True)
class Algorithm:
    name: str
    config_type: type
    build_plan: Callable
    summary: str


ALGORITHMS: dict[str, Algorithm] = {
    "fptq": Algorithm("fptq", fptq.FptqConfig, fptq.build_plan,
                      "W4A8: per-layer static / LAE+static / per-token int8 activations, int4 RTN weights"),
}


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise FptqError(f"unknown method '{name}'; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def make_config(algorithm: Algorithm, options: dict):
    """The algorithm's config from the CLI options it understands (others are ignored)."""
    fields = {f.name for f in dataclasses.fields(algorithm.config_type)}
    config = algorithm.config_type(**{k: v for k, v in options.items() if k in fields and v is not None})
    if hasattr(config, "validate"):
        config.validate()
    return config
