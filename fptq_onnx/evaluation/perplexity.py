"""Perplexity over non-overlapping windows (WikiText-2, C4, or a local corpus file).

Protocol (the GPTQ / AutoGPTQ / llama.cpp-paper convention, so numbers compare
with published tables):

* rows are joined (``"\\n\\n"`` for WikiText-2 and local files, ``" "`` for C4
  documents) and the whole text is tokenized once with no special tokens
  (nothing prepended);
* the token stream is cut into ``n_tokens // seqlen`` non-overlapping windows of
  ``seqlen`` tokens; the trailing partial window is dropped;
* each window is scored independently (no carried context), so every window
  predicts ``seqlen - 1`` tokens;
* perplexity = exp(mean NLL over all predicted tokens of all windows).

This module also holds the scoring primitives shared with :mod:`.scoring`
(the scorer type, tokenization, the logits sanity check, log-softmax).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation.data import WIKITEXT2_FILE, data_file, read_text_rows, resolve_data_dir

Scorer = Callable[[np.ndarray], np.ndarray]
"""``scorer(input_ids int64 [1, T]) -> logits float32 [1, T, V]``."""

_ROW_CHUNK = 256  # rows of logits per log-softmax step: bounds temporaries to chunk*V floats


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens (no BOS): the protocol of both modules."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def run_scorer(scorer: Scorer, ids: Sequence[int]) -> np.ndarray:
    """Call the scorer on one sequence and return its logits as [T, V].

    The scorer may be user-supplied (an ONNX file), so a wrong output shape is
    reported as an FptqError rather than surfacing as an index error later.
    """
    x = np.asarray(ids, dtype=np.int64)[None, :]
    logits = np.asarray(scorer(x))
    if logits.ndim != 3 or logits.shape[0] != 1 or logits.shape[1] != x.shape[1]:
        raise FptqError(
            f"model returned logits of shape {logits.shape} for input of shape {x.shape}; expected [1, T, vocab]"
        )
    return logits[0]


def token_logprobs(logits: np.ndarray, targets: Sequence[int] | np.ndarray) -> np.ndarray:
    """log p(targets[i] | logits[i]) for every row, chunked over rows; the sum of exponentials in float64.

    Chunking keeps the [rows, V] temporaries small for V ~ 50k-150k and T = 2048. The
    exponentials stay in the logits' float32 (fp16 logits go up to float32) (a float64 copy of a 2048 x 49152 window
    made this the scoring bottleneck on a GPU host: every process 100% busy here) and
    are summed in float64, so a uniform model still gives exactly log V and a window's
    log-probabilities move by ~1e-8 against an all-float64 computation.
    """
    targets = np.asarray(targets, dtype=np.int64)
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), _ROW_CHUNK):
        rows = logits[start : start + _ROW_CHUNK]
        rows = rows.astype(np.promote_types(rows.dtype, np.float32), copy=False)  # fp16 logits: exp in float32
        peak = rows.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(rows - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
        picked = rows[np.arange(len(rows)), targets[start : start + len(rows)]]
        out[start : start + len(rows)] = picked - lse
    return out


def tokenize_for_windows(tokenizer: Any, text: str, seqlen: int, limit: int | None) -> list[int]:
    """Tokenize ``text``, or, with ``limit``, only a prefix long enough for ``limit`` windows.

    Tokenizing all of WikiText-2 costs seconds; a CI run with ``limit=2`` should
    not pay it. The prefix is grown until it yields a safety margin of tokens
    beyond the windows used, so the used tokens equal those of the full text
    (BPE merges never reach across more than a word or two).
    """
    if limit is None:
        return encode(tokenizer, text)
    need = limit * seqlen
    margin = 64
    chars = need * 8 + 1024
    while True:
        ids = encode(tokenizer, text[:chars])
        if chars >= len(text):
            return ids
        if len(ids) >= need + margin:
            return ids[: need + margin]
        chars *= 2


def perplexity_of_text(
    scorer: Scorer,
    tokenizer: Any,
    text: str,
    seqlen: int = 2048,
    limit: int | None = None,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "perplexity",
) -> dict[str, float | int]:
    """Windowed perplexity of an already-joined text; see the module docstring."""
    if seqlen < 2:
        raise FptqError(f"seqlen must be at least 2, got {seqlen}")
    if max_length is not None and seqlen > max_length:
        raise FptqError(
            f"seqlen {seqlen} is larger than the model's maximum context {max_length}; pass a smaller --seqlen"
        )
    if limit is not None and limit < 1:
        raise FptqError(f"limit must be at least 1, got {limit}")
    ids = tokenize_for_windows(tokenizer, text, seqlen, limit)
    n_windows = len(ids) // seqlen
    if limit is not None:
        n_windows = min(n_windows, limit)
    if n_windows == 0:
        raise FptqError(f"text for {desc} has {len(ids)} tokens, fewer than one window of seqlen {seqlen}")
    total_nll = 0.0
    n_pred = 0
    for w in tqdm(range(n_windows), desc=desc, unit="window", disable=not progress):
        window = ids[w * seqlen : (w + 1) * seqlen]
        logits = run_scorer(scorer, window)
        lp = token_logprobs(logits[:-1], window[1:])
        total_nll -= float(lp.sum())
        n_pred += len(lp)
    mean_nll = total_nll / n_pred
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": n_pred, "n": n_windows}


def perplexity_of_file(
    scorer: Scorer,
    tokenizer: Any,
    path: str | os.PathLike[str],
    seqlen: int = 2048,
    limit: int | None = None,
    max_length: int | None = None,
    progress: bool = False,
    joiner: str = "\n\n",
    desc: str | None = None,
) -> dict[str, float | int]:
    """Perplexity of a corpus file: a ``.txt`` (one row per line) or a ``.jsonl`` with ``"text"``.

    Rows are joined with ``joiner``: ``"\\n\\n"`` for HF-style rows (WikiText-2),
    ``" "`` for documents in the GPTQ C4 protocol.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FptqError(f"corpus file {p} not found")
    text = joiner.join(read_text_rows(p))
    return perplexity_of_text(scorer, tokenizer, text, seqlen, limit, max_length, progress, desc=desc or p.name)


def wikitext2_perplexity(
    scorer: Scorer,
    tokenizer: Any,
    data_dir: str | os.PathLike[str] | None = None,
    seqlen: int = 2048,
    limit: int | None = None,
    max_length: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """WikiText-2 (raw) test perplexity from ``<data_dir>/wikitext-2-raw-test.txt``."""
    path = data_file(resolve_data_dir(data_dir), WIKITEXT2_FILE)
    return perplexity_of_file(scorer, tokenizer, path, seqlen, limit, max_length, progress, desc="wikitext2")
