"""Evaluation of a model given only as a logits scorer: perplexity and zero-shot tasks.

The model is a *scorer*, ``scorer(input_ids int64 [1, T]) -> logits float32
[1, T, V]``, so the same code evaluates the PyTorch reference, the fp32 ONNX
export and the quantized ONNX model, and their numbers differ only by the model.

Task names accepted by :func:`evaluate`:

* ``wikitext2`` -- windowed perplexity of ``<data_dir>/wikitext-2-raw-test.txt``;
* any name ending in ``.txt`` / ``.jsonl`` -- perplexity of that local corpus
  (e.g. a C4 shard), relative to the data dir or absolute;
* the registered zero-shot tasks in :data:`tasks.TASKS`
  (``lambada_openai`` (alias ``lambada``), ``piqa``, ``arc_easy``, ``winogrande``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation.data import ENV_VAR, resolve_data_dir
from fptq_onnx.evaluation.perplexity import Scorer, perplexity_of_file, wikitext2_perplexity
from fptq_onnx.evaluation.tasks import ALIASES, TASKS, get_task

PERPLEXITY_TASKS = ("wikitext2",)

__all__ = ["ENV_VAR", "PERPLEXITY_TASKS", "Scorer", "TASKS", "evaluate", "known_tasks"]


def known_tasks() -> list[str]:
    """Every task name :func:`evaluate` accepts (besides local ``.txt``/``.jsonl`` corpora)."""
    return [*PERPLEXITY_TASKS, *TASKS]


def _is_corpus_file(name: str) -> bool:
    return name.endswith((".txt", ".jsonl"))


def _canonical_names(names: list[str]) -> list[str]:
    """Validate every task name (resolving aliases) before any slow scoring starts."""
    for name in names:
        if name in PERPLEXITY_TASKS or _is_corpus_file(name) or name in TASKS or name in ALIASES:
            continue
        raise FptqError(
            f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}"
            " (or a local .txt/.jsonl corpus for perplexity)"
        )
    return [ALIASES.get(n, n) for n in names]


def evaluate(
    scorer: Scorer,
    tokenizer: Any,
    tasks: list[str],
    data_dir: str | os.PathLike[str] | None = None,
    seqlen: int = 2048,
    limit: int | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float | int]]:
    """Run ``tasks`` and return JSON-able ``{task: {metric: value, ..., "n": count}}``.

    ``data_dir`` falls back to ``$FPTQ_DATA_DIR``. ``limit`` caps the number of
    windows (perplexity) or items (tasks) per task, for quick runs. ``seqlen``
    is the perplexity window; ``max_length`` is the model's maximum context
    (tasks truncate their context from the left to fit it; a ``seqlen`` above it
    is an error). Names, the data dir and ``seqlen`` are all checked before the
    first task runs, so a typo fails in a second rather than after an hour.
    """
    plan = _canonical_names(list(tasks))
    if not plan:
        raise FptqError(f"no tasks given; known tasks: {', '.join(known_tasks())}")
    wants_ppl = any(n in PERPLEXITY_TASKS or _is_corpus_file(n) for n in plan)
    if wants_ppl and max_length is not None and seqlen > max_length:
        raise FptqError(
            f"seqlen {seqlen} is larger than the model's maximum context {max_length}; pass a smaller --seqlen"
        )
    needs_dir = any(not (_is_corpus_file(n) and Path(n).expanduser().is_absolute()) for n in plan)
    root = resolve_data_dir(data_dir) if needs_dir else None

    results: dict[str, dict[str, float | int]] = {}
    for name in plan:
        if name == "wikitext2":
            results[name] = wikitext2_perplexity(scorer, tokenizer, root, seqlen, limit, max_length, progress)
        elif _is_corpus_file(name):
            results[name] = perplexity_of_file(scorer, tokenizer, name, seqlen, limit, max_length, progress, root)
        else:
            assert root is not None
            results[name] = get_task(name)(scorer, tokenizer, root, limit, max_length, progress)
    return results
