"""Task runners, one per data schema, scored by log-likelihood following lm-evaluation-harness.

Conventions (chosen to match lm-eval's ``lambada_openai``, ``piqa``,
``arc_easy`` and ``winogrande`` task configs, so numbers compare with
published tables):

* Tokenization split and truncation: :func:`.scoring.encode_pair` and
  :func:`.scoring.model_input` (context cut from the left; the continuation must fit).
* cloze (lambada_openai): context + " " + word; ``acc`` = every continuation token
  is the argmax at its position (lm-eval ``is_greedy``); ``perplexity`` =
  exp(-mean over items of the continuation's summed log-likelihood).
* choice (piqa / arc_easy / a local ``{"query", "choices", "gold"}`` file):
  context = query (trailing newline stripped) + "\\nAnswer:", continuation =
  " " + choice (lm-eval's ``Question: ...\\nAnswer:`` prompt; the llm-foundry
  files already carry the ``Question:`` prefix). ``acc`` = argmax of summed
  log-likelihood; ``acc_norm`` = argmax of summed log-likelihood / ``len(choice)``
  in characters (lm-eval's ``completion_len``, which excludes the leading space).
* partial (winogrande): the shared continuation " " + continuation is scored
  after each context option; ``acc`` = the better option is gold.
* corpus: windowed perplexity (:mod:`.perplexity`).

The choices of one item are scored together (:func:`.scoring.score_requests`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fptq_onnx.evaluation.data import read_jsonl
from fptq_onnx.evaluation.perplexity import Scorer, perplexity_of_file
from fptq_onnx.evaluation.scoring import encode_pair, score_requests
from fptq_onnx.evaluation.spec import TaskSpec

TaskResult = dict[str, Any]
"""Metric name -> value (float or int; MMLU adds a per-subject dict), always with ``"n"``."""


@dataclass(frozen=True)
class RunOptions:
    """What every runner may use; ``limit`` caps items, and a corpus's windows unless ``windows`` is given."""

    seqlen: int = 2048
    limit: int | None = None
    windows: int | None = None  # corpus windows; None = min(the task's default (all; C4: 256), limit)
    max_length: int | None = None
    progress: bool = False
    num_fewshot: int = 0


def gold_in(options_field: str, gold_field: str = "gold") -> Callable[[dict[str, Any]], str | None]:
    """A row check: the gold index lies inside the options list."""

    def check(item: dict[str, Any]) -> str | None:
        n, gold = len(item[options_field]), item[gold_field]
        return None if 0 <= gold < n else f'"{gold_field}" {gold} out of range for {n} {options_field}'

    return check


def items_bar(items: list, task: TaskSpec, opts: RunOptions) -> tqdm:
    """Progress over items; tqdm's rate is the items/s the harness reports."""
    return tqdm(items, desc=Path(task.name).name, unit="item", disable=not opts.progress)


def run_corpus(scorer: Scorer, tokenizer: Any, path: Path, task: TaskSpec, opts: RunOptions) -> TaskResult:
    """Perplexity of a text corpus over ``windows`` windows if given, else ``min(task's default, limit)``."""
    caps = [c for c in (task.windows, opts.limit) if c is not None]
    windows = opts.windows if opts.windows is not None else min(caps, default=None)
    return perplexity_of_file(scorer, tokenizer, path, opts.seqlen, windows, opts.max_length, opts.progress,
                              joiner=task.joiner, desc=task.name)


def run_cloze(scorer: Scorer, tokenizer: Any, path: Path, task: TaskSpec, opts: RunOptions) -> TaskResult:
    """LAMBADA-style last-word prediction; acc (greedy) and continuation perplexity."""
    items = read_jsonl(path, task.schema.fields, opts.limit)
    hits, total_lp = 0, 0.0
    for item in items_bar(items, task, opts):
        request = encode_pair(tokenizer, item["context"], " " + item["continuation"].lstrip())
        (ll,) = score_requests(scorer, [request], opts.max_length)
        hits += ll.is_greedy
        total_lp += ll.logprob
    return {"acc": hits / len(items), "perplexity": math.exp(-total_lp / len(items)), "n": len(items)}


def run_choice(scorer: Scorer, tokenizer: Any, path: Path, task: TaskSpec, opts: RunOptions) -> TaskResult:
    """Multiple choice by log-likelihood of ' ' + choice after 'query\\nAnswer:'; acc and acc_norm."""
    items = read_jsonl(path, task.schema.fields, opts.limit, gold_in("choices"))
    acc = acc_norm = 0
    for item in items_bar(items, task, opts):
        context = item["query"].rstrip("\n") + "\nAnswer:"
        requests = [encode_pair(tokenizer, context, " " + c) for c in item["choices"]]
        lps = np.array([ll.logprob for ll in score_requests(scorer, requests, opts.max_length)])
        lengths = np.array([max(len(c), 1) for c in item["choices"]], dtype=np.float64)
        acc += int(np.argmax(lps)) == item["gold"]
        acc_norm += int(np.argmax(lps / lengths)) == item["gold"]
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def run_partial(scorer: Scorer, tokenizer: Any, path: Path, task: TaskSpec, opts: RunOptions) -> TaskResult:
    """WinoGrande-style partial scoring: the shared continuation under each context option."""
    items = read_jsonl(path, task.schema.fields, opts.limit, gold_in("context_options"))
    hits = 0
    for item in items_bar(items, task, opts):
        cont = " " + item["continuation"].lstrip()
        requests = [encode_pair(tokenizer, option, cont) for option in item["context_options"]]
        lps = [ll.logprob for ll in score_requests(scorer, requests, opts.max_length)]
        hits += int(np.argmax(lps)) == item["gold"]
    return {"acc": hits / len(items), "n": len(items)}
