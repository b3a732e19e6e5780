"""Algorithm table: `--method NAME` maps here.

Each algorithm is a module exposing `Config` (a frozen dataclass), `SUMMARY` and the
per-layer hooks of algorithms/layer.py: `plan_layer(ctx, config) -> QuantPlan`, and
optionally `observers(ctx, config)` and `gptq(config)`. The layer walk (layer_walk.py)
runs them; no algorithm walks the model itself. Modules import lazily so a method's
heavy dependencies load only when it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from types import ModuleType

from fptq_onnx.errors import FptqError

ALGORITHMS: dict[str, str] = {
    "fptq": "fptq_onnx.algorithms.fptq",
    "rtn": "fptq_onnx.algorithms.rtn",
    "ort-acc4": "fptq_onnx.algorithms.ort_acc4",
    "smoothquant": "fptq_onnx.algorithms.smoothquant",
    "gptq": "fptq_onnx.algorithms.gptq",
    "awq": "fptq_onnx.algorithms.awq",
    "auto": "fptq_onnx.algorithms.auto",
}


# `convert --recipe NAME`: a method with its options, named for what users want.
RECIPES: dict[str, tuple[str, dict]] = {
    # The paper, unchanged: thresholds 15 / 150, LAE on norm groups, int4 RTN symmetric.
    "fptq": ("fptq", {}),
    # Accuracy first (bench/ablation_smollm2.md): measured-error policy, asymmetric int4, GPTQ weights.
    # No quantize_lm_head: int4 g128 RTN on SmolLM2's tied lm_head costs +24% WikiText-2 ppl on the
    # paper recipe (35.25 -> 43.65, 16 windows; bench/e2e_cpu.md), far from free.
    "best": ("auto", {"symmetric": False, "weights": "gptq"}),
}


def recipe(name: str) -> tuple[str, dict]:
    if name not in RECIPES:
        raise FptqError(f"unknown recipe '{name}'; known: {', '.join(RECIPES)}")
    method, options = RECIPES[name]
    return method, dict(options)


def get(name: str) -> ModuleType:
    if name not in ALGORITHMS:
        raise FptqError(f"unknown method '{name}'; known: {', '.join(ALGORITHMS)}")
    try:
        return importlib.import_module(ALGORITHMS[name])
    except ModuleNotFoundError as exc:
        if exc.name == ALGORITHMS[name]:
            raise FptqError(f"method '{name}' is not available in this build") from None
        raise


def available() -> dict[str, ModuleType]:
    out = {}
    for name in ALGORITHMS:
        try:
            out[name] = get(name)
        except FptqError:
            continue
    return out


def _coerce(value, annotation):
    """CLI strings -> the config field's type (bool/int/float/str)."""
    if not isinstance(value, str):
        return value
    target = annotation if isinstance(annotation, type) else {"bool": bool, "int": int, "float": float}.get(
        str(annotation).split("|")[0].strip(), str)
    if target is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return target(value)


def make_config(module: ModuleType, options: dict, extra: dict[str, str] | None = None):
    """The algorithm's config from the common CLI options it understands, plus `--opt KEY=VALUE`s.

    Common options a method does not use are ignored; an unknown `--opt` key is an error.
    """
    config_type = module.Config
    hints = typing.get_type_hints(config_type)
    fields = {f.name for f in dataclasses.fields(config_type)}
    values = {k: v for k, v in options.items() if k in fields and v is not None}
    for key, raw in (extra or {}).items():
        key = key.replace("-", "_")
        if key not in fields:
            raise FptqError(f"--opt {key}: not an option of this method; it takes: {', '.join(sorted(fields))}")
        try:
            values[key] = _coerce(raw, hints[key])
        except ValueError:
            raise FptqError(f"--opt {key}={raw}: expected a {hints[key]}") from None
    config = config_type(**values)
    if hasattr(config, "validate"):
        config.validate()
    return config
