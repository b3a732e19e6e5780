"""What `sources.resolve` hands to `loading`: where a model's files are (its own module: no import circle).

Importing it switches the Hugging Face hub off before transformers is imported by
either of them: nothing is ever downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass(frozen=True)
class ModelSource:
    """A resolved, loadable model: an HF checkpoint dir, optionally with a GGUF file in it."""

    path: Path
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)
