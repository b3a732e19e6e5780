"""Tensors of a safetensors checkpoint, read one at a time from memory-mapped files.

`LazyCheckpoint(dir)` indexes every tensor name of `model.safetensors` or of the
shards listed in `model.safetensors.index.json` (or, without an index, of every
`*.safetensors` file) without reading any data. `get(name)` maps the tensor's
bytes (safetensors memory-maps the file) and returns an fp32 copy: only that one
tensor is ever resident, so a 7B checkpoint is read layer by layer in the memory
of one layer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from fptq_onnx.errors import FptqError

INDEX_FILE = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def _header(path: Path) -> dict:
    """The safetensors JSON header (names, dtypes, shapes, offsets), read without touching the data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            size = int.from_bytes(raw, "little")
            if size <= 0 or size > 100_000_000 or size + 8 > os.path.getsize(path):
                raise ValueError("bad header length")
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FptqError(f"corrupt safetensors file {path.name}: {exc}") from None
    header.pop("__metadata__", None)
    return header


class LazyCheckpoint:
    """Name -> (file, dtype, shape) for every tensor of a local safetensors checkpoint."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise FptqError(f"corrupt {INDEX_FILE} in {self.directory}: {exc}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FptqError(f"streaming needs safetensors weights; {self.directory} has none")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FptqError(f"{INDEX_FILE} names {name}, which is missing from {self.directory}")
            for key, info in _header(path).items():
                self.entries[key] = (path, info["dtype"], tuple(info["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def numel(self) -> int:
        total = 0
        for _, _, shape in self.entries.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def stored_bytes(self) -> int:
        total = 0
        for _, dtype, shape in self.entries.values():
            n = _DTYPE_BYTES.get(dtype, 4)
            for d in shape:
                n *= d
            total += n
        return total

    def layer_numel(self, layers_path: str) -> dict[int, int]:
        """Parameters per decoder layer (from the headers)."""
        pattern = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
        out: dict[int, int] = {}
        for name, (_, _, shape) in self.entries.items():
            match = pattern.match(name)
            if match:
                n = 1
                for d in shape:
                    n *= d
                out[int(match.group(1))] = out.get(int(match.group(1)), 0) + n
        return out

    def _entry(self, name: str) -> tuple[Path, str, tuple[int, ...]]:
        if name not in self.entries:
            raise FptqError(f"tensor {name} is missing from the checkpoint in {self.directory}")
        return self.entries[name]

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor as an owned (not memory-mapped) copy in `dtype`."""
        from safetensors import SafetensorError, safe_open

        path, _, _ = self._entry(name)
        # The file is mapped only for this read: a mapping kept open would count every page
        # read so far in this process's resident set (up to the whole checkpoint).
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(name)
                out = tensor.to(dtype) if tensor.dtype != dtype else tensor.clone()
                del tensor
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise FptqError(f"cannot read {name} from {path.name}: {str(exc).splitlines()[0]}") from None
        return out
