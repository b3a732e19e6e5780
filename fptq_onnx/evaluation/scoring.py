"""Log-likelihood of continuations: the request split of lm-eval, and batched scoring per item.

A task item asks for several (context, continuation) log-likelihoods that share
most of their tokens: the choices of a multiple-choice question share the whole
question, WinoGrande's two options share the sentence up to the blank. Scored one
sequence per call (what a plain :data:`Scorer` allows) the shared tokens are
recomputed for every choice. A model with a KV cache (:class:`CachedLM`, e.g.
:class:`fptq_onnx.runtime.OnnxCausalLM`) instead runs the longest common prefix of
the item's input sequences once, then all remaining suffixes in one right-padded
batch on top of the cached prefix. For MMLU-style single-token answers the suffixes
are empty and an item costs one forward pass instead of four.

Both paths see exactly the tokens the per-request protocol defines (truncation
included: requests are truncated first and the prefix is what their truncated
sequences share), so their numbers agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation.perplexity import Scorer, encode, run_scorer, token_logprobs

Request = tuple[list[int], list[int]]
"""(context ids, continuation ids) as split by :func:`encode_pair`."""

_MAX_BATCH = 8  # suffix rows per forward call: bounds the [rows, length, vocab] logits


@runtime_checkable
class CachedLM(Protocol):
    """A model that continues from a KV cache (batch of B rows, right padding masked)."""

    def empty_past(self, batch: int) -> list[np.ndarray]: ...

    def forward(
        self, input_ids: np.ndarray, past: list[np.ndarray], attention_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]: ...


@dataclass(frozen=True)
class Loglikelihood:
    """Summed log-probability of a continuation, and whether greedy decoding reproduces it."""

    logprob: float
    is_greedy: bool


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Request:
    """Context and continuation token ids, split the lm-eval way.

    Trailing spaces of the context move to the continuation; continuation ids =
    ``encode(context + continuation)[len(encode(context)):]``. An empty context
    conditions on BOS (else EOS).
    """
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


def model_input(request: Request, max_length: int | None) -> list[int]:
    """The tokens the model sees for a request: ``(ctx + cont)[-(max_length + 1):][:-1]``."""
    ctx, cont = request
    seq = list(ctx) + list(cont)
    if max_length is not None:
        if len(cont) > max_length:
            raise FptqError(f"continuation of {len(cont)} tokens exceeds the maximum context {max_length}")
        seq = seq[-(max_length + 1) :]
    return seq[:-1]


def _judge(logits: np.ndarray, cont: Sequence[int]) -> Loglikelihood:
    lp = token_logprobs(logits, cont)
    return Loglikelihood(float(lp.sum()), bool(np.all(logits.argmax(axis=-1) == np.asarray(cont))))


def loglikelihood(scorer: Scorer, request: Request, max_length: int | None) -> Loglikelihood:
    """Score one request with one scorer call: the reference every batched result must equal."""
    logits = run_scorer(scorer, model_input(request, max_length))[-len(request[1]) :]
    return _judge(logits, request[1])


def score_requests(model: Scorer | CachedLM, requests: Sequence[Request], max_length: int | None) -> list[Loglikelihood]:
    """Log-likelihoods of one item's requests: shared prefix through the KV cache when the model has one."""
    if isinstance(model, CachedLM):
        return _score_shared_prefix(model, requests, max_length)
    return [loglikelihood(model, r, max_length) for r in requests]


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def _check_logits(logits: np.ndarray, batch: int, length: int) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 3 or logits.shape[:2] != (batch, length):
        raise FptqError(
            f"model returned logits of shape {logits.shape} for input of shape {(batch, length)}; expected [B, T, vocab]"
        )
    return logits


def _score_shared_prefix(lm: CachedLM, requests: Sequence[Request], max_length: int | None) -> list[Loglikelihood]:
    """Prefix once (batch 1), then the suffixes as right-padded batches over the repeated prefix cache."""
    inputs = [model_input(r, max_length) for r in requests]
    n_prefix = _common_prefix_length(inputs)
    if n_prefix:
        prefix_logits, prefix_past = lm.forward(np.asarray([inputs[0][:n_prefix]], np.int64), lm.empty_past(1))
        prefix_logits = _check_logits(prefix_logits, 1, n_prefix)[0]
    rows: dict[int, np.ndarray] = {}  # request index -> logits of its suffix positions
    pending = [i for i, seq in enumerate(inputs) if len(seq) > n_prefix]
    for start in range(0, len(pending), _MAX_BATCH):
        chunk = pending[start : start + _MAX_BATCH]
        width = max(len(inputs[i]) - n_prefix for i in chunk)
        ids = np.zeros((len(chunk), width), np.int64)
        mask = np.zeros((len(chunk), n_prefix + width), np.int64)
        mask[:, :n_prefix] = 1
        for row, i in enumerate(chunk):
            suffix = inputs[i][n_prefix:]
            ids[row, : len(suffix)] = suffix
            mask[row, n_prefix : n_prefix + len(suffix)] = 1
        past = [np.repeat(p, len(chunk), axis=0) for p in prefix_past] if n_prefix else lm.empty_past(len(chunk))
        logits = _check_logits(lm.forward(ids, past, mask)[0], len(chunk), width)
        for row, i in enumerate(chunk):
            rows[i] = logits[row, : len(inputs[i]) - n_prefix]
    results = []
    for i, (seq, (_, cont)) in enumerate(zip(inputs, requests)):
        first = len(seq) - len(cont)  # position whose logits predict cont[0]
        parts = []
        if first < n_prefix:
            parts.append(prefix_logits[first:n_prefix])
        if i in rows:
            parts.append(rows[i][max(first - n_prefix, 0) :])
        results.append(_judge(np.concatenate(parts) if len(parts) > 1 else parts[0], cont))
    return results
