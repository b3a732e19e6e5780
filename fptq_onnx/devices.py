"""`--device`: where torch runs calibration forwards, GPTQ and the weight searches."""

from __future__ import annotations

import torch

from fptq_onnx.errors import FptqError

DEVICES = ("cpu", "cuda")


def resolve_device(name: str | None) -> torch.device:
    """None -> cuda when torch sees a GPU, else cpu; 'cuda' without one is a user error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise FptqError(f"unknown device '{name}'; use one of: {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FptqError("--device cuda: torch sees no CUDA GPU here (CPU build of torch, or no driver); "
                        "use --device cpu")
    return torch.device(name)
