"""Evaluation of a model given only as a logits scorer: perplexity, zero-shot tasks, MMLU.

The model is a *scorer*, ``scorer(input_ids int64 [1, T]) -> logits float32
[1, T, V]``, so the same code evaluates the PyTorch reference, the fp32 ONNX
export and the quantized ONNX model, and their numbers differ only by the model.
A scorer that also continues from a KV cache (:class:`.scoring.CachedLM`, as
:class:`fptq_onnx.runtime.OnnxCausalLM` does) scores each item's choices in one
batch over a shared prefix; the numbers are the same.

Task names accepted by :func:`evaluate` (the table is :mod:`.registry`):

* ``wikitext2`` / ``c4`` -- windowed perplexity (C4 by the GPTQ protocol: documents
  joined with spaces, the first 256 windows);
* ``lambada_openai`` (alias ``lambada``), ``piqa``, ``arc_easy``, ``winogrande``,
  ``mmlu`` (0- or k-shot, per-subject and averaged; ``mmlu@5shot`` is the 5-shot
  task under a name of its own);
* any name ending in ``.txt`` / ``.jsonl``: a local file, relative to the data
  dir or absolute, scored by the schema its fields fit (a ``{"text"}`` corpus ->
  perplexity; ``{"query", "choices", "gold"}`` or cais/mmlu ``{"question",
  "choices", "answer"}`` -> accuracy; ...).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation.data import ENV_VAR, describe_fields
from fptq_onnx.evaluation.perplexity import Scorer
from fptq_onnx.evaluation.registry import MMLU, TASKS, canonical_name, known_tasks, resolve_task, split_shots, task_spec
from fptq_onnx.evaluation.tasks import RunOptions

__all__ = ["ENV_VAR", "Scorer", "TASKS", "evaluate", "is_perplexity_task", "known_tasks", "task_columns"]


def is_perplexity_task(name: str) -> bool:
    """Whether ``name`` (registered or a local file) is scored by perplexity over windows."""
    return task_spec(name).schema.is_perplexity


def task_columns(name: str) -> list[tuple[str, str]]:
    """(result key, column title) of the metrics a table shows for task ``name``."""
    return task_spec(name).columns


def _positive(what: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise FptqError(f"{what} must be at least 1, got {value}")


def evaluate(
    scorer: Scorer,
    tokenizer: Any,
    tasks: list[str],
    data_dir: str | os.PathLike[str] | None = None,
    seqlen: int = 2048,
    limit: int | None = None,
    max_length: int | None = None,
    progress: bool = True,
    windows: int | None = None,
    num_fewshot: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run ``tasks`` and return JSON-able ``{task: {metric: value, ..., "n": count, "seconds", rate}}``.

    ``data_dir`` falls back to ``$FPTQ_DATA_DIR``. ``limit`` caps the items per
    task (MMLU: per subject), and the windows per corpus unless ``windows`` sets
    them (default: all; C4: the first 256). ``seqlen`` is the perplexity
    window; ``max_length`` is the model's maximum context (tasks truncate their
    context from the left to fit it; a ``seqlen`` above it is an error).
    ``num_fewshot`` applies to MMLU-schema tasks named without ``@Kshot`` (a name
    with it carries its own; both at once is an error). Names, files, schemas and
    options are all checked before the first task runs, so a typo fails in a
    second rather than after an hour. Each result also carries its wall time and
    rate (``items_per_s``, or ``windows_per_s`` for a corpus).
    """
    if not tasks:
        raise FptqError(f"no tasks given; known tasks: {', '.join(known_tasks())}")
    names = list(dict.fromkeys(canonical_name(t) for t in tasks))  # every name checked before any file
    resolved = [resolve_task(name, data_dir) for name in names]
    _positive("limit", limit)
    _positive("windows", windows)
    if num_fewshot < 0:
        raise FptqError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot and not any(spec.schema is MMLU for spec, _ in resolved):
        raise FptqError(f"--num-fewshot applies to MMLU-schema tasks (mmlu, or a file of {describe_fields(MMLU.fields)}); "
                        f"none of {', '.join(names)} is one")
    named = [t for t in tasks if split_shots(t)[1] is not None]
    if num_fewshot and named:
        raise FptqError(f"--num-fewshot {num_fewshot} and {', '.join(named)} both set the exemplars; "
                        "give them one way (mmlu@5shot, or --task mmlu --num-fewshot 5)")
    if any(spec.schema.is_perplexity for spec, _ in resolved) and max_length is not None and seqlen > max_length:
        raise FptqError(
            f"seqlen {seqlen} is larger than the model's maximum context {max_length}; pass a smaller --seqlen"
        )
    opts = RunOptions(seqlen=seqlen, limit=limit, windows=windows, max_length=max_length, progress=progress,
                      num_fewshot=num_fewshot)
    results: dict[str, dict[str, Any]] = {}
    for spec, path in resolved:
        start = time.perf_counter()
        task_opts = opts if spec.num_fewshot is None else dataclasses.replace(opts, num_fewshot=spec.num_fewshot)
        result = spec.schema.run(scorer, tokenizer, path, spec, task_opts)
        seconds = time.perf_counter() - start
        rate = "windows_per_s" if spec.schema.is_perplexity else "items_per_s"
        results[spec.name] = {**result, "seconds": round(seconds, 2), rate: round(result["n"] / seconds, 3)}
    return results
