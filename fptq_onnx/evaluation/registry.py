"""The one table of evaluation tasks: name, data file, schema (how it is scored) and the metrics shown.

A *schema* is a jsonl row layout with the runner that scores it and the metric
columns it yields; a *task* is a schema applied to one data file. Registered
tasks name a file in the data directory; any other ``.txt``/``.jsonl`` name is a
local file whose schema is detected from the fields of its first row, so a
user's own multiple-choice file is scored the way the built-in task of the same
layout is. ``compare`` reads its table columns from here.

A task name may end in ``@Kshot`` (``mmlu@5shot``, ``my_mmlu.jsonl@5shot``): the
MMLU-schema task with K exemplars per subject, a task (result key, table column
"MMLU 5-shot acc", cache entry) of its own beside the 0-shot one, so one
``compare --tasks`` list can ask for both.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation.data import (
    WIKITEXT2_FILE,
    data_file,
    describe_fields,
    first_row_fields,
    resolve_data_dir,
)
from fptq_onnx.evaluation.mmlu import run_mmlu
from fptq_onnx.evaluation.spec import Schema, TaskSpec
from fptq_onnx.evaluation.tasks import run_choice, run_cloze, run_corpus, run_partial


CORPUS = Schema("corpus", {"text": str}, run_corpus, (("perplexity", "ppl"),), "perplexity", is_perplexity=True)
CHOICE = Schema("choice", {"query": str, "choices": list, "gold": int}, run_choice,
                (("acc", "acc"), ("acc_norm", "acc_norm")), "multiple choice")
MMLU = Schema("mmlu", {"question": str, "choices": list, "answer": int}, run_mmlu, (("acc", "acc"),),
              "lettered multiple choice, cais/mmlu (+ optional subject)")
CLOZE = Schema("cloze", {"context": str, "continuation": str}, run_cloze, (("acc", "acc"),), "last-word cloze")
PARTIAL = Schema("partial", {"context_options": list, "continuation": str, "gold": int}, run_partial,
                 (("acc", "acc"),), "partial scoring")

SCHEMAS: tuple[Schema, ...] = (PARTIAL, CHOICE, MMLU, CLOZE, CORPUS)
"""Detection order: the first schema whose required fields a row has."""


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("wikitext2", "WikiText-2", WIKITEXT2_FILE, CORPUS),
        TaskSpec("c4", "C4", "c4-validation.jsonl", CORPUS, windows=256, joiner=" "),
        TaskSpec("lambada_openai", "LAMBADA", "tasks/lambada_openai.jsonl", CLOZE),
        TaskSpec("piqa", "PIQA", "tasks/piqa.jsonl", CHOICE),
        TaskSpec("arc_easy", "ARC-e", "tasks/arc_easy.jsonl", CHOICE),
        TaskSpec("winogrande", "WinoGrande", "tasks/winogrande.jsonl", PARTIAL),
        TaskSpec("mmlu", "MMLU", "tasks/mmlu.jsonl", MMLU),
    )
}
ALIASES: dict[str, str] = {"lambada": "lambada_openai"}
SHOTS = re.compile(r"(\d+)shot")
"""The ``@`` suffix of a task name: its MMLU exemplars per subject."""

_LOCAL: dict[str, TaskSpec] = {}  # local file name -> the spec it was last resolved to (for table columns)


def known_tasks() -> list[str]:
    """Every registered task name (local ``.txt``/``.jsonl`` files are accepted besides)."""
    return list(TASKS)


def is_local_file(name: str) -> bool:
    return name.endswith((".txt", ".jsonl"))


def split_shots(name: str) -> tuple[str, int | None]:
    """'mmlu@5shot' -> ('mmlu', 5); a name without an ``@Kshot`` suffix -> (name, None).

    A local file's own path may hold '@' (it still ends in .txt/.jsonl), so only a
    name that does not is split, at its last '@'.
    """
    if is_local_file(name) or "@" not in name:
        return name, None
    base, _, suffix = name.rpartition("@")
    match = SHOTS.fullmatch(suffix)
    if not match or not base:
        raise FptqError(f"task {name!r}: the part after '@' must be Kshot with K a whole number, e.g. mmlu@5shot")
    return base, int(match.group(1))


def canonical_name(name: str) -> str:
    """The registered name for ``name`` (aliases resolved) or the local file name; error otherwise.

    ``@Kshot`` is kept (``@0shot`` dropped: it is the plain task); on a registered
    task of another schema it is an error here, before any file is looked for.
    """
    base, shots = split_shots(name)
    if shots is not None:
        base = canonical_name(base)
        if shots == 0:
            return base
        if base in TASKS:
            with_shots(TASKS[base], f"{base}@{shots}shot")
        return f"{base}@{shots}shot"
    if is_local_file(name):
        return name
    canonical = ALIASES.get(name, name)
    if canonical not in TASKS:
        raise FptqError(
            f"unknown task {name!r}; known tasks: {', '.join(known_tasks())} (or a local .txt/.jsonl file)"
        )
    return canonical


def needs_data_dir(name: str) -> bool:
    return not (is_local_file(name) and Path(name).expanduser().is_absolute())


def detect_schema(path: Path) -> Schema:
    """The schema of a local file: ``.txt`` is a corpus, a ``.jsonl`` is matched on its first row's fields."""
    if path.suffix != ".jsonl":
        return CORPUS
    fields = first_row_fields(path)
    for schema in SCHEMAS:
        if schema.fields.keys() <= fields:
            return schema
    known = "; ".join(f"{describe_fields(s.fields)} ({s.what})" for s in SCHEMAS)
    raise FptqError(f"{path}: fields {{{', '.join(sorted(fields))}}} fit no known task schema; expected one of {known}")


def with_shots(spec: TaskSpec, name: str) -> TaskSpec:
    """``spec`` as the task ``name`` (``BASE@Kshot``): K exemplars, its own result key and title."""
    shots = split_shots(name)[1]
    if shots is None:
        return spec
    if spec.schema is not MMLU:
        raise FptqError(f"task {name!r}: @Kshot applies to MMLU-schema tasks (mmlu, or a file of "
                        f"{describe_fields(MMLU.fields)}); {spec.name} is scored as {spec.schema.what}")
    return dataclasses.replace(spec, name=name, title=f"{spec.title} {shots}-shot", num_fewshot=shots)


def resolve_task(name: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[TaskSpec, Path]:
    """The task spec for ``name`` and its data file, which must exist (``data_dir`` or ``$FPTQ_DATA_DIR``)."""
    name = canonical_name(name)
    base = split_shots(name)[0]
    if base != name:
        spec, path = resolve_task(base, data_dir)
        return with_shots(spec, name), path
    root = resolve_data_dir(data_dir) if needs_data_dir(name) else Path("/")
    if name in TASKS:
        spec = TASKS[name]
        return spec, data_file(root, spec.file)
    path = data_file(root, name)
    spec = TaskSpec(name, Path(name).name, name, detect_schema(path))
    _LOCAL[name] = spec
    return spec, path


def task_spec(name: str) -> TaskSpec:
    """The spec of a registered task, or of a local file as last resolved (detected now if never)."""
    name = canonical_name(name)
    base = split_shots(name)[0]
    return with_shots(TASKS.get(base) or _LOCAL.get(base) or resolve_task(base)[0], name)
