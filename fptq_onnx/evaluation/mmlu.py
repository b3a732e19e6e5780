"""MMLU-style questions (the cais/mmlu schema): lm-eval's prompt, k-shot from each subject, per-subject scores.

Prompt (lm-eval-harness ``mmlu`` default template)::

    The following are multiple choice questions (with answers) about {subject}.

    {exemplar question}
    A. ...
    ...
    Answer: {letter}

    {question}
    A. ...
    B. ...
    C. ...
    D. ...
    Answer:

and the log-likelihoods of " A", " B", ... are compared (``acc``). ``subject``
is the field with underscores read as spaces; a file without subjects is one
group and its description drops "about ...". With ``num_fewshot = k`` the first
k questions of each subject are its exemplars (the data has no dev split) and
only the rest are scored. ``limit`` caps the scored questions *per subject*
(lm-eval's ``--limit`` on MMLU's per-subject subtasks), so a small limit still
covers every subject.

Averages: ``acc`` is the micro average (every question weighs the same; lm-eval's
group score), ``acc_macro`` the mean of the per-subject accuracies; ``subjects``
holds each subject's ``acc`` and ``n``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation.data import read_jsonl
from fptq_onnx.evaluation.perplexity import Scorer
from fptq_onnx.evaluation.scoring import encode_pair, score_requests
from fptq_onnx.evaluation.spec import TaskSpec
from fptq_onnx.evaluation.tasks import RunOptions, TaskResult, gold_in, items_bar

LETTERS = string.ascii_uppercase
OPTIONAL_FIELDS = {"subject": str}


def _choices_fit(item: dict[str, Any]) -> str | None:
    if len(item["choices"]) > len(LETTERS):
        return f"{len(item['choices'])} choices; at most {len(LETTERS)} can be lettered"
    return gold_in("choices", "answer")(item)


def format_question(item: dict[str, Any]) -> str:
    """The question, its lettered choices and "Answer:" (no trailing space)."""
    lines = [item["question"].strip()]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def description(subject: str) -> str:
    if not subject:
        return "The following are multiple choice questions (with answers).\n\n"
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def build_context(subject: str, exemplars: list[dict[str, Any]], item: dict[str, Any]) -> str:
    """Description, the k solved exemplars and the question, joined lm-eval's way ("\\n\\n")."""
    shots = "".join(f"{format_question(e)} {LETTERS[e['answer']]}\n\n" for e in exemplars)
    return description(subject) + shots + format_question(item)


def group_by_subject(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Subjects in order of first appearance, each with its questions in file order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item.get("subject", ""), []).append(item)
    return groups


def run_mmlu(scorer: Scorer, tokenizer: Any, path: Path, task: TaskSpec, opts: RunOptions) -> TaskResult:
    """Score every subject (k-shot, per-subject limit) and report per-subject, micro and macro accuracy."""
    groups = group_by_subject(read_jsonl(path, task.schema.fields, None, _choices_fit, OPTIONAL_FIELDS))
    k = opts.num_fewshot
    jobs: list[tuple[str, str, dict[str, Any]]] = []  # (subject, context, item)
    for subject, items in groups.items():
        if len(items) <= k:
            where = f"subject {subject!r}" if subject else "the file"
            raise FptqError(f"{path}: {where} has {len(items)} questions; "
                            f"{k}-shot (--num-fewshot {k} or @{k}shot) needs at least {k + 1}")
        scored = items[k:] if opts.limit is None else items[k : k + opts.limit]
        jobs += [(subject, build_context(subject, items[:k], item), item) for item in scored]
    hits: dict[str, list[bool]] = {subject: [] for subject in groups}
    for subject, context, item in items_bar(jobs, task, opts):
        requests = [encode_pair(tokenizer, context, " " + LETTERS[i]) for i in range(len(item["choices"]))]
        lps = [ll.logprob for ll in score_requests(scorer, requests, opts.max_length)]
        hits[subject].append(int(np.argmax(lps)) == item["answer"])
    per_subject = {s: {"acc": sum(h) / len(h), "n": len(h)} for s, h in hits.items()}
    result: TaskResult = {
        "acc": sum(map(sum, hits.values())) / len(jobs),
        "acc_macro": float(np.mean([v["acc"] for v in per_subject.values()])),
        "n": len(jobs),
        "num_fewshot": k,
    }
    if any(groups):
        result["subjects"] = per_subject
    return result
