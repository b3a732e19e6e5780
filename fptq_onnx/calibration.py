"""Calibration: token windows from a source, and the per-linear input statistics algorithms read.

The statistics are recorded by the layer walk's hooks (layer_walk.LayerStats): running
per-channel maxima and sums plus one max per token, never the activations themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fptq_onnx.errors import FptqError
from fptq_onnx.leakage import corpus_identity, is_evaluation_text

RANDOM_SOURCE = "random"
C4_SOURCE = "c4"
WIKITEXT2_SOURCE = "wikitext2"
AUTO_SOURCE = "auto"
C4_TRAIN_FILE = "c4-train.jsonl"
# Calibration corpora known by name: source -> file in the data dir. C4 train is what GPTQ, AWQ,
# SmoothQuant and QServe calibrate on; WikiText-2 (test: there is no train split here) overlaps the
# evaluation text and is kept only for reproducing older runs.
NAMED_SOURCES = {C4_SOURCE: C4_TRAIN_FILE, WIKITEXT2_SOURCE: "wikitext-2-raw-test.txt"}


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration tokens come from and how many.

    source: 'c4' (C4 train from the data dir), 'wikitext2' (the WikiText-2 *test* text:
    overlaps evaluation, warned and recorded), 'random' (data-free random vocabulary
    tokens; FPTQ's Table 6 found these often as good as text), a .txt/.jsonl file, or
    'auto': c4 when the data dir holds it, else random (never evaluation text).
    """

    source: str = AUTO_SOURCE
    samples: int = 32
    seqlen: int = 512
    seed: int = 0
    data_dir: str | None = None

    def describe(self) -> dict:
        return {"source": self.source, "samples": self.samples, "seqlen": self.seqlen, "seed": self.seed}


@dataclass
class LinearStats:
    """Running statistics of one linear's input X ([tokens, K])."""

    channel_max: torch.Tensor
    channel_abs_sum: torch.Tensor
    token_max: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0

    @property
    def max_abs(self) -> float:
        return float(self.channel_max.max())

    def channel_max_np(self) -> np.ndarray:
        return self.channel_max.numpy().astype(np.float32)

    def channel_mean_np(self) -> np.ndarray:
        return (self.channel_abs_sum / max(self.tokens, 1)).numpy().astype(np.float32)

    def token_max_np(self) -> np.ndarray:
        return torch.cat(self.token_max).numpy() if self.token_max else np.zeros(0, np.float32)


@dataclass
class Calibration:
    """What algorithms get: the token windows, the input statistics of every linear, the source."""

    tokens: torch.Tensor
    stats: dict[str, LinearStats]
    config: CalibrationConfig

    def describe(self) -> dict:
        """The manifest's record: the config, the token count, and which text was used.

        The text's file name and SHA-256 let `eval`/`compare` refuse to score a
        perplexity on the very text a model was calibrated on (`leakage.py`).
        """
        out = {**self.config.describe(), "tokens": int(self.tokens.numel())}
        if self.config.source != RANDOM_SOURCE:
            path = text_path(self.config)
            out.update(corpus_identity(path), overlaps_eval=is_evaluation_text(path))
        return out


def text_path(config: CalibrationConfig) -> Path:
    """The file a text source reads: a named corpus in the data dir, or the user's file."""
    from fptq_onnx.evaluation.data import data_file, resolve_data_dir

    if config.source in NAMED_SOURCES:
        return data_file(resolve_data_dir(config.data_dir), NAMED_SOURCES[config.source])
    path = Path(config.source).expanduser()
    if not path.is_file():
        raise FptqError(
            f"calibration source '{config.source}' is neither {', '.join(repr(n) for n in NAMED_SOURCES)}, "
            "'random' nor an existing .txt/.jsonl file"
        )
    return path


def resolve_source(config: CalibrationConfig) -> CalibrationConfig:
    """Replace 'auto' by the source actually used (recorded in the manifest)."""
    from dataclasses import replace

    from fptq_onnx.evaluation.data import resolve_data_dir

    if config.source != AUTO_SOURCE:
        return config
    try:
        has_text = (resolve_data_dir(config.data_dir) / C4_TRAIN_FILE).is_file()
    except FptqError:
        has_text = False
    return replace(config, source=C4_SOURCE if has_text else RANDOM_SOURCE)


def calibration_tokens(config: CalibrationConfig, tokenizer, vocab_size: int) -> torch.Tensor:
    """[samples, seqlen] int64 token windows (random starts over the text, fixed seed)."""
    if config.samples < 1 or config.seqlen < 2:
        raise FptqError("calibration needs at least 1 sample of at least 2 tokens")
    gen = torch.Generator().manual_seed(config.seed)
    if config.source == RANDOM_SOURCE:
        return torch.randint(0, vocab_size, (config.samples, config.seqlen), generator=gen)
    from fptq_onnx.evaluation.data import read_text_rows
    from fptq_onnx.report import say

    path = text_path(config)
    if is_evaluation_text(path):
        say(f"warning: calibrating on {path.name}, which is evaluation text: perplexity on it will be optimistic "
            "(recorded as calibration overlaps_eval in the manifest; use --calib c4)")
    rows = read_text_rows(path)
    # Enough text for the windows with margin, without tokenizing a whole corpus.
    budget = config.samples * config.seqlen * 8
    text, used = [], 0
    for row in rows:
        text.append(row)
        used += len(row)
        if used > budget:
            break
    ids = tokenizer("\n\n".join(text), add_special_tokens=False)["input_ids"]
    if len(ids) < config.seqlen + 1:
        raise FptqError(
            f"calibration text '{config.source}' has {len(ids)} tokens; need at least {config.seqlen + 1} "
            f"(lower --calib-seqlen or give more text)"
        )
    starts = torch.randint(0, len(ids) - config.seqlen, (config.samples,), generator=gen)
    tokens = torch.tensor(ids, dtype=torch.long)
    return torch.stack([tokens[s : s + config.seqlen] for s in starts.tolist()])
