"""What a task is: a row layout (schema) with its runner and metrics, applied to one data file.

Kept apart from the table (`registry.py`) so that the runners (`tasks.py`, `mmlu.py`),
which take a `TaskSpec`, and the table, which names the runners, import without a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fptq_onnx.evaluation.data import FieldSpec


@dataclass(frozen=True)
class Schema:
    """A row layout: its required fields, runner, and (result key, column suffix) metrics."""

    name: str
    fields: FieldSpec
    run: Callable[..., Any]  # (scorer, tokenizer, path, TaskSpec, tasks.RunOptions) -> metrics dict
    metrics: tuple[tuple[str, str], ...]
    what: str  # for messages: what the schema scores
    is_perplexity: bool = False  # windows of a corpus, not items


@dataclass(frozen=True)
class TaskSpec:
    """One task: ``file`` is relative to the data dir (registered) or the user's path (local)."""

    name: str
    title: str
    file: str
    schema: Schema
    windows: int | None = None  # corpus: windows scored by default (None = all)
    joiner: str = "\n\n"  # corpus: how rows are joined before tokenizing
    num_fewshot: int | None = None  # MMLU schema: exemplars fixed by the name (``mmlu@5shot``); None = the run's

    @property
    def columns(self) -> list[tuple[str, str]]:
        """(result key, table column title) of every metric shown for this task."""
        return [(key, f"{self.title} {suffix}") for key, suffix in self.schema.metrics]
