"""Log-likelihood of continuations: the request split of lm-eval, and batched scoring.

A task item asks for several (context, continuation) log-likelihoods that share
most of their tokens: the choices of a multiple-choice question share the whole
question, WinoGrande's two options share the sentence up to the blank. Scored one
sequence per call (what a plain :data:`Scorer` allows) the shared tokens are
recomputed for every choice, and every call reads all the weights again, which
dominates for the short sequences of these tasks. A model with a KV cache
(:class:`CachedLM`, e.g. :class:`fptq_onnx.runtime.OnnxCausalLM`) instead gets
two calls for a group of items: the longest common prefix of each item's input
sequences, all items as one right-padded batch; then every remaining suffix as one
right-padded batch over the cached prefixes (the prefix padding masked out). For
MMLU-style single-token answers there are no suffixes: one call for several
questions instead of four per question.

Both paths see exactly the tokens the per-request protocol defines (truncation
included: requests are truncated first and the prefix is what their truncated
sequences share), so their numbers agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation.perplexity import Scorer, encode, run_scorer, token_logprobs

Request = tuple[list[int], list[int]]
"""(context ids, continuation ids) as split by :func:`encode_pair`."""

_TOKEN_BUDGET = 1024  # padded rows x length per forward call: bounds the [rows, length, vocab] logits


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


def score_items(
    model: Scorer | CachedLM, items: Iterable[Sequence[Request]], max_length: int | None
) -> Iterator[list[Loglikelihood]]:
    """Log-likelihoods of each item's requests, item by item in order.

    A :class:`CachedLM` gets several items per pair of forward calls (as many as
    fit ``_TOKEN_BUDGET``); a plain scorer gets one call per request.
    """
    if not isinstance(model, CachedLM):
        for requests in items:
            yield [loglikelihood(model, r, max_length) for r in requests]
        return
    chunk: list[_ItemPlan] = []
    for requests in items:
        plan = _ItemPlan.of(requests, max_length)
        if chunk and not _fits([*chunk, plan]):
            yield from _score_chunk(model, chunk)
            chunk = []
        chunk.append(plan)
    if chunk:
        yield from _score_chunk(model, chunk)


@dataclass(frozen=True)
class _ItemPlan:
    """One item's model inputs and the length of the prefix they all share."""

    requests: Sequence[Request]
    inputs: list[list[int]]
    n_prefix: int

    @classmethod
    def of(cls, requests: Sequence[Request], max_length: int | None) -> _ItemPlan:
        inputs = [model_input(r, max_length) for r in requests]
        return cls(requests, inputs, _common_prefix_length(inputs))

    @property
    def suffix_lengths(self) -> list[int]:
        return [len(seq) - self.n_prefix for seq in self.inputs if len(seq) > self.n_prefix]


def _fits(plans: list[_ItemPlan]) -> bool:
    """Whether these items may share a prefix call and a suffix call.

    Both calls' padded token counts stay within the budget, and an item with no
    shared prefix (its requests differ from the first token, e.g. after
    truncation) runs alone: a prefix row of pads only would be fully masked.
    """
    if any(p.n_prefix == 0 for p in plans):
        return False
    suffixes = [n for p in plans for n in p.suffix_lengths]
    prefix_tokens = len(plans) * max(p.n_prefix for p in plans)
    return prefix_tokens <= _TOKEN_BUDGET and len(suffixes) * max(suffixes, default=0) <= _TOKEN_BUDGET


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


def _score_chunk(lm: CachedLM, plans: list[_ItemPlan]) -> Iterator[list[Loglikelihood]]:
    """Items' prefixes as one right-padded batch, then all their suffixes as one batch over those caches.

    Padding sits at the end of each prefix row and is masked out of the suffix
    call; position ids follow the mask, so every real token sees exactly the
    positions and keys it has in a single-sequence run.
    """
    width = max(p.n_prefix for p in plans)
    if width:
        ids = np.zeros((len(plans), width), np.int64)
        mask = np.zeros((len(plans), width), np.int64)
        for k, plan in enumerate(plans):
            ids[k, : plan.n_prefix] = plan.inputs[0][: plan.n_prefix]
            mask[k, : plan.n_prefix] = 1
        prefix_logits, prefix_past = lm.forward(ids, lm.empty_past(len(plans)), mask)
        prefix_logits = _check_logits(prefix_logits, len(plans), width)
    rows = [(k, i) for k, plan in enumerate(plans) for i, seq in enumerate(plan.inputs) if len(seq) > plan.n_prefix]
    suffix_rows: dict[tuple[int, int], np.ndarray] = {}  # (item, request) -> logits of its suffix positions
    if rows:
        length = max(len(plans[k].inputs[i]) - plans[k].n_prefix for k, i in rows)
        ids = np.zeros((len(rows), length), np.int64)
        mask = np.zeros((len(rows), width + length), np.int64)
        for r, (k, i) in enumerate(rows):
            suffix = plans[k].inputs[i][plans[k].n_prefix :]
            ids[r, : len(suffix)] = suffix
            mask[r, : plans[k].n_prefix] = 1
            mask[r, width : width + len(suffix)] = 1
        if width:
            which = np.array([k for k, _ in rows])
            past = [p[which] for p in prefix_past]
        else:
            past = lm.empty_past(len(rows))
        logits = _check_logits(lm.forward(ids, past, mask)[0], len(rows), length)
        for r, (k, i) in enumerate(rows):
            suffix_rows[k, i] = logits[r, : len(plans[k].inputs[i]) - plans[k].n_prefix]
    for k, plan in enumerate(plans):
        results = []
        for i, (seq, (_, cont)) in enumerate(zip(plan.inputs, plan.requests)):
            first = len(seq) - len(cont)  # position whose logits predict cont[0]
            parts = []
            if first < plan.n_prefix:
                parts.append(prefix_logits[k, first : plan.n_prefix])
            if (k, i) in suffix_rows:
                parts.append(suffix_rows[k, i][max(first - plan.n_prefix, 0) :])
            results.append(_judge(np.concatenate(parts) if len(parts) > 1 else parts[0], cont))
        yield results
