"""Locating and validating evaluation data files.

Evaluation runs for minutes to hours, so every input problem (no data dir,
a missing file, a malformed jsonl line) is turned into a one-line
:class:`FptqError` *before* or *while* reading, naming the file (and line),
instead of a KeyError deep inside a scoring loop.

Nothing here knows where the data lives: the directory comes from the caller
(``--data-dir``) or the ``FPTQ_DATA_DIR`` environment variable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fptq_onnx.errors import FptqError

ENV_VAR = "FPTQ_DATA_DIR"
WIKITEXT2_FILE = "wikitext-2-raw-test.txt"
HOW_TO_FIX = f"pass --data-dir or set {ENV_VAR}"

# A field spec: name -> expected Python type. ``list`` means a non-empty list of str.
FieldSpec = Mapping[str, type]
ItemCheck = Callable[[dict[str, Any]], str | None]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data directory: the explicit argument, else ``$FPTQ_DATA_DIR``."""
    chosen = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not chosen:
        raise FptqError(f"no evaluation data directory given: {HOW_TO_FIX}")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FptqError(f"evaluation data directory {path} does not exist: {HOW_TO_FIX}")
    return path


def data_file(data_dir: Path, relative: str | os.PathLike[str]) -> Path:
    """``data_dir / relative`` (or an absolute path), which must exist."""
    path = Path(relative).expanduser()
    if not path.is_absolute():
        path = data_dir / path
    if not path.is_file():
        raise FptqError(f"evaluation data file {path} not found: {HOW_TO_FIX}")
    return path


def _type_ok(value: Any, expected: type) -> bool:
    if expected is list:
        return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)
    if expected is int:  # bool is an int subclass; a true/false gold is a data bug
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def describe_fields(fields: FieldSpec) -> str:
    names = {str: "str", int: "int", list: "list[str]"}
    return "{" + ", ".join(f'"{k}": {names.get(t, t.__name__)}' for k, t in fields.items()) + "}"


def read_jsonl(
    path: Path, fields: FieldSpec, limit: int | None = None, check: ItemCheck | None = None,
    optional: FieldSpec | None = None,
) -> list[dict[str, Any]]:
    """Read up to ``limit`` items of a jsonl file, validating every item read.

    Blank lines are skipped. ``optional`` fields are kept (and type-checked) where
    present; other extra fields are allowed and dropped. ``check`` may add a
    semantic test (e.g. gold index in range) returning an error text.
    """
    optional = optional or {}
    items: list[dict[str, Any]] = []
    expected = describe_fields(fields)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FptqError(f"{where}: not valid JSON ({e.msg}); expected {expected}") from None
            if not isinstance(obj, dict):
                raise FptqError(f"{where}: not a JSON object; expected {expected}")
            bad = [k for k, t in fields.items() if k not in obj or not _type_ok(obj[k], t)]
            bad += [k for k, t in optional.items() if k in obj and not _type_ok(obj[k], t)]
            if bad:
                raise FptqError(f"{where}: missing or wrong-typed field(s) {', '.join(bad)}; expected {expected}")
            item = {k: obj[k] for k in [*fields, *optional] if k in obj}
            problem = check(item) if check is not None else None
            if problem:
                raise FptqError(f"{where}: {problem}; expected {expected}")
            items.append(item)
    if not items:
        raise FptqError(f"{path}: no items; expected jsonl lines of {expected}")
    return items


def first_row_fields(path: Path) -> set[str]:
    """Field names of the first non-blank line of a jsonl file (what schema detection looks at)."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FptqError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise FptqError(f"{path}:{lineno}: not a JSON object")
            return set(obj)
    raise FptqError(f"{path}: no items")


def read_text_rows(path: Path) -> list[str]:
    """Rows of a local corpus file, as the ``datasets`` library would give them.

    * ``.jsonl``: the ``"text"`` field of every line (e.g. C4 shards).
    * anything else (``.txt``): one row per line, WikiText/HF style: a line keeps
      its ``"\\n"`` and a whitespace-only line becomes ``""`` -- exactly what the
      HF ``wikitext`` loader yields for ``wiki.test.raw``, so that
      ``"\\n\\n".join(rows)`` reproduces the standard GPTQ evaluation text.
    """
    if path.suffix == ".jsonl":
        return [item["text"] for item in read_jsonl(path, {"text": str})]
    with path.open(encoding="utf-8", newline="") as f:
        return [line if line.strip() else "" for line in f]
