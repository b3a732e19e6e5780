"""Zero-shot tasks scored by log-likelihood, following lm-evaluation-harness.

Conventions (chosen to match lm-eval's ``lambada_openai``, ``piqa``,
``arc_easy`` and ``winogrande`` task configs, so numbers compare with
published tables):

* Tokenization split (lm-eval ``_encode_pair``): trailing spaces of the
  context move to the continuation; ``whole = encode(context + continuation)``,
  ``ctx = encode(context)``, continuation tokens = ``whole[len(ctx):]``. No
  special tokens; an empty context gets the BOS (else EOS) token as prefix.
* Truncation: the model sees ``(ctx + cont)[-(max_length + 1):][:-1]``, i.e.
  context is cut from the left; the continuation must fit.
* lambada_openai: context + " " + word; ``acc`` = every continuation token is
  the argmax at its position (lm-eval ``is_greedy``); ``perplexity`` =
  exp(-mean over items of the continuation's summed log-likelihood).
* piqa / arc_easy: context = query (trailing newline stripped) + "\\nAnswer:",
  continuation = " " + choice (lm-eval's ``Question: ...\\nAnswer:`` prompt;
  the llm-foundry files already carry the ``Question:`` prefix). ``acc`` =
  argmax of summed log-likelihood; ``acc_norm`` = argmax of summed
  log-likelihood / ``len(choice)`` in characters (lm-eval's ``completion_len``,
  which excludes the leading space).
* winogrande: partial scoring; the shared continuation " " + continuation is
  scored after each context option; ``acc`` = the better option is gold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation.data import data_file, read_jsonl
from fptq_onnx.evaluation.perplexity import Scorer, encode, run_scorer, token_logprobs

TaskResult = dict[str, float | int]
TaskRunner = Callable[[Scorer, Any, Path, int | None, int | None, bool], TaskResult]


@dataclass(frozen=True)
class Loglikelihood:
    """Summed log-probability of a continuation, and whether greedy decoding reproduces it."""

    logprob: float
    is_greedy: bool


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the lm-eval way (see module docstring)."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    cont = whole[len(ctx) :]
    if not ctx:
        prefix = getattr(tokenizer, "bos_token_id", None)
        prefix = prefix if prefix is not None else getattr(tokenizer, "eos_token_id", None)
        if prefix is None:
            raise FptqError("empty context and the tokenizer has no BOS/EOS token to condition on")
        ctx = [int(prefix)]
    if not cont:
        raise FptqError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


def loglikelihood(
    scorer: Scorer, ctx: Sequence[int], cont: Sequence[int], max_length: int | None
) -> Loglikelihood:
    """Score ``cont`` given ``ctx`` with one scorer call (left-truncated to ``max_length``)."""
    seq = list(ctx) + list(cont)
    if max_length is not None:
        if len(cont) > max_length:
            raise FptqError(f"continuation of {len(cont)} tokens exceeds the maximum context {max_length}")
        seq = seq[-(max_length + 1) :]
    logits = run_scorer(scorer, seq[:-1])[-len(cont) :]
    lp = token_logprobs(logits, cont)
    greedy = bool(np.all(logits.argmax(axis=-1) == np.asarray(cont)))
    return Loglikelihood(float(lp.sum()), greedy)


def _gold_in(options_field: str) -> Callable[[dict[str, Any]], str | None]:
    def check(item: dict[str, Any]) -> str | None:
        n = len(item[options_field])
        return None if 0 <= item["gold"] < n else f'"gold" {item["gold"]} out of range for {n} {options_field}'

    return check


def run_lambada(
    scorer: Scorer, tokenizer: Any, data_dir: Path, limit: int | None, max_length: int | None, progress: bool
) -> TaskResult:
    """LAMBADA (OpenAI): last-word prediction; acc (greedy) and continuation perplexity."""
    path = data_file(data_dir, "tasks/lambada_openai.jsonl")
    items = read_jsonl(path, {"context": str, "continuation": str}, limit)
    hits, total_lp = 0, 0.0
    for item in tqdm(items, desc="lambada_openai", disable=not progress):
        ctx, cont = encode_pair(tokenizer, item["context"], " " + item["continuation"].lstrip())
        ll = loglikelihood(scorer, ctx, cont, max_length)
        hits += ll.is_greedy
        total_lp += ll.logprob
    return {"acc": hits / len(items), "perplexity": math.exp(-total_lp / len(items)), "n": len(items)}


def _multiple_choice(name: str, rel_path: str) -> TaskRunner:
    """A runner for ``{"query", "choices", "gold"}`` files (piqa, arc_easy)."""

    def run(
        scorer: Scorer, tokenizer: Any, data_dir: Path, limit: int | None, max_length: int | None, progress: bool
    ) -> TaskResult:
        path = data_file(data_dir, rel_path)
        items = read_jsonl(path, {"query": str, "choices": list, "gold": int}, limit, _gold_in("choices"))
        acc = acc_norm = 0
        for item in tqdm(items, desc=name, disable=not progress):
            context = item["query"].rstrip("\n") + "\nAnswer:"
            pairs = [encode_pair(tokenizer, context, " " + c) for c in item["choices"]]
            lps = np.array([loglikelihood(scorer, ctx, cont, max_length).logprob for ctx, cont in pairs])
            lengths = np.array([max(len(c), 1) for c in item["choices"]], dtype=np.float64)
            acc += int(np.argmax(lps)) == item["gold"]
            acc_norm += int(np.argmax(lps / lengths)) == item["gold"]
        return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}

    run.__name__ = f"run_{name}"
    run.__doc__ = f"{name}: multiple choice by log-likelihood of ' ' + choice; acc and acc_norm."
    return run


def run_winogrande(
    scorer: Scorer, tokenizer: Any, data_dir: Path, limit: int | None, max_length: int | None, progress: bool
) -> TaskResult:
    """WinoGrande: partial scoring, the shared continuation under each context option."""
    path = data_file(data_dir, "tasks/winogrande.jsonl")
    fields = {"context_options": list, "continuation": str, "gold": int}
    items = read_jsonl(path, fields, limit, _gold_in("context_options"))
    hits = 0
    for item in tqdm(items, desc="winogrande", disable=not progress):
        cont = " " + item["continuation"].lstrip()
        pairs = [encode_pair(tokenizer, opt, cont) for opt in item["context_options"]]
        lps = [loglikelihood(scorer, ctx, cont_ids, max_length).logprob for ctx, cont_ids in pairs]
        hits += int(np.argmax(lps)) == item["gold"]
    return {"acc": hits / len(items), "n": len(items)}


TASKS: dict[str, TaskRunner] = {
    "lambada_openai": run_lambada,
    "piqa": _multiple_choice("piqa", "tasks/piqa.jsonl"),
    "arc_easy": _multiple_choice("arc_easy", "tasks/arc_easy.jsonl"),
    "winogrande": run_winogrande,
}
"""Registry: task name -> runner(scorer, tokenizer, data_dir, limit, max_length, progress)."""

ALIASES: dict[str, str] = {"lambada": "lambada_openai"}


def get_task(name: str) -> TaskRunner:
    """The runner for ``name`` (or an alias); FptqError listing known tasks otherwise."""
    runner = TASKS.get(ALIASES.get(name, name))
    if runner is None:
        raise FptqError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return runner


def run_task(
    name: str,
    scorer: Scorer,
    tokenizer: Any,
    data_dir: str | os.PathLike[str],
    limit: int | None = None,
    max_length: int | None = None,
    progress: bool = False,
) -> TaskResult:
    """Run one registered task on the files under ``data_dir``."""
    return get_task(name)(scorer, tokenizer, Path(data_dir), limit, max_length, progress)
