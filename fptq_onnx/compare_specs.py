"""`compare --methods`: parsing and checking the method specs, tasks and calibration before any work."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fptq_onnx import algorithms
from fptq_onnx.calibration import CalibrationConfig
from fptq_onnx.errors import FptqError

FLOAT_METHOD = "fp32"


@dataclass(frozen=True)
class MethodSpec:
    """One requested row: `name` (fp32 or an algorithm), its options, the directory label."""

    text: str
    name: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        opts = "-".join(f"{k}{_slug(v)}" for k, v in self.options.items())
        return f"{self.name}-{opts}"

    @property
    def is_float(self) -> bool:
        return self.name == FLOAT_METHOD


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_") or "_"


def parse_method(text: str) -> MethodSpec:
    """'rtn:bits=8,act=per_token' -> MethodSpec('rtn', {'bits': '8', 'act': 'per_token'})."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FptqError(f"method '{text}': options must be key=value, got '{item}'")
        options[key.strip().replace("-", "_")] = value.strip()
    if not name:
        raise FptqError(f"empty method name in '{text}'")
    if name == FLOAT_METHOD and options:
        raise FptqError(f"'{FLOAT_METHOD}' takes no options (got '{text}')")
    return MethodSpec(text.strip(), name, options)


def split_methods(text: str) -> list[str]:
    """'fp32,rtn:bits=8,act=per_token,fptq' -> ['fp32', 'rtn:bits=8,act=per_token', 'fptq'].

    A comma piece holding '=' but no ':' is one more option of the method before it
    (method names never contain '='), so one comma list can carry options.
    """
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece:
            if not out:
                raise FptqError(f"'{piece}' in '{text}' is an option without a method before it")
            out[-1] += ("," if ":" in out[-1] else ":") + piece
        else:
            out.append(piece)
    return out


def check_methods(texts: list[str]) -> list[tuple[MethodSpec, object, object]]:
    """(spec, algorithm module, config) per method; every name and option checked before any work."""
    if not texts:
        raise FptqError(f"no methods given; known: {FLOAT_METHOD}, {', '.join(algorithms.ALGORITHMS)}")
    out, labels = [], set()
    for text in texts:
        spec = parse_method(text)
        if spec.is_float:
            module = config = None
        else:
            if spec.name not in algorithms.ALGORITHMS:
                raise FptqError(
                    f"unknown method '{spec.name}'; known: {FLOAT_METHOD}, {', '.join(algorithms.ALGORITHMS)}")
            module = algorithms.get(spec.name)
            try:
                config = algorithms.make_config(module, {}, spec.options)
            except FptqError as exc:
                raise FptqError(f"method '{spec.text}': {exc}") from None
            except (TypeError, ValueError) as exc:
                raise FptqError(f"method '{spec.text}': {exc}") from None
        if spec.label in labels:
            raise FptqError(f"method '{spec.text}' is given twice")
        labels.add(spec.label)
        out.append((spec, module, config))
    return out


def check_tasks(tasks: list[str], data_dir) -> list[str]:
    from fptq_onnx.evaluation import known_tasks
    from fptq_onnx.evaluation.data import resolve_data_dir
    from fptq_onnx.evaluation.registry import canonical_name, resolve_task

    if not tasks:
        raise FptqError(f"no tasks given; known tasks: {', '.join(known_tasks())}")
    names = list(dict.fromkeys(canonical_name(task) for task in tasks))
    resolve_data_dir(data_dir)  # a missing data dir fails now, not after the first conversion
    for name in names:
        resolve_task(name, data_dir)  # so does a missing file or a local file of no known schema
    return names


def check_calibration(calibration: CalibrationConfig, rows) -> CalibrationConfig:
    """'auto' resolved once (what manifests record); a source that cannot work fails now, not after the export."""
    from fptq_onnx.calibration import RANDOM_SOURCE, resolve_source, text_path

    calibration = resolve_source(calibration)
    if all(spec.is_float for spec, _, _ in rows) or calibration.source == RANDOM_SOURCE:
        return calibration
    text_path(calibration)
    return calibration


def check_overlap(calibration: CalibrationConfig, rows, tasks: list[str], data_dir: str | None,
                  allow: bool) -> list[str]:
    """Perplexity tasks whose corpus is the calibration text: refused unless allowed (then marked)."""
    from fptq_onnx.calibration import RANDOM_SOURCE, text_path
    from fptq_onnx.leakage import check_corpora, corpus_identity, perplexity_corpora

    if all(spec.is_float for spec, _, _ in rows) or calibration.source == RANDOM_SOURCE:
        return []
    return check_corpora(corpus_identity(text_path(calibration)), perplexity_corpora(tasks, data_dir), allow)


def method_format(module) -> str:
    """The ONNX format a method is evaluated in: its FORMAT (ort-acc4: native), else qdq."""
    return getattr(module, "FORMAT", "qdq")
