"""Memory: the --max-memory budget, the estimate of a conversion's peak, and when to stream.

Both sources of the layer walk (layer_source.py) run the same pipeline; they differ in
what stays resident. The in-memory source holds the whole float model (28 GB for a 7B
model in fp32); the checkpoint source holds one decoder layer plus embeddings and head:

    O(largest decoder layer in fp32 x ~5: weights, planning and fake-quant copies)
  + O(embedding + lm_head in fp32, per output format's graph)
  + O(calibration activations: 2-3 x samples x seqlen x hidden + one batch's MLP activations)

and, during the parity check, the ONNX Runtime session of the quantized model. It does
not grow with the number of layers. `convert` streams when the whole model would not
fit in the budget (default 90% of physical memory), or when asked (--stream).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fptq_onnx.errors import FptqError
from fptq_onnx.models.registry import ArchSpec
from fptq_onnx.report import say

GIB = 1024**3


def parse_memory(text: str | None) -> int | None:
    """'20GB', '20G', '20000MB', '20' (GB) -> bytes; None stays None."""
    if text is None or str(text).strip() == "":
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?)?\s*", str(text))
    if not match:
        raise FptqError(f"--max-memory: expected a size like 20GB or 16000MB, got '{text}'")
    number = float(match.group(1))
    unit = (match.group(2) or "G")[0].upper()
    value = int(number * {"K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}[unit])
    if value <= 0:
        raise FptqError(f"--max-memory must be positive, got '{text}'")
    return value


def default_budget() -> int | None:
    """90% of physical memory (MemTotal, Linux), in bytes: the default of --max-memory.

    Physical, not currently available, memory so that whether a model streams does not
    depend on what else happens to run on the machine.
    """
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(int(line.split()[1]) * 1024 * 0.9)
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    whole_model: int  # the in-memory convert: float model + export + passes
    streaming: int  # this path, before the ONNX Runtime check
    largest_layer: int  # fp32 bytes of the largest decoder layer

    def describe(self) -> str:
        return (f"whole-model path ~{self.whole_model / GIB:.1f} GB, streaming ~{self.streaming / GIB:.1f} GB "
                f"(largest layer {self.largest_layer / GIB:.2f} GB in fp32)")


def estimate_memory(ckpt, config, spec: ArchSpec, samples: int, seqlen: int, formats: int) -> MemoryEstimate:
    """Rough peak RSS of both paths from the checkpoint's tensor shapes (see the module doc)."""
    total = ckpt.numel() * 4
    per_layer = ckpt.layer_numel(spec.layers_path)
    largest = max(per_layer.values(), default=0) * 4
    outside = total - sum(per_layer.values()) * 4
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    activations = samples * seqlen * hidden * 4 * 3 + min(samples, 4) * seqlen * inter * 4 * 3
    base = 1 * GIB  # interpreter, torch, onnx, tokenizer
    streaming = base + 5 * largest + outside * (1 + formats) + activations
    whole = base + 3 * total + activations
    return MemoryEstimate(whole, streaming, largest)


def should_stream(model_arg: str | None, options, max_memory: int | None) -> bool:
    """Auto mode: stream when the whole-model path would not fit in --max-memory (default: 90% of RAM).

    Only safetensors checkpoints can stream; anything else (GGUF, pickle) and any
    problem reading the checkpoint leave the decision to the in-memory source, which
    reports its own errors.
    """
    from fptq_onnx import loading, sources
    from fptq_onnx.lazy_weights import LazyCheckpoint
    from fptq_onnx.models.registry import spec_for

    budget = max_memory or default_budget()
    if budget is None:
        return False
    try:
        source = sources.resolve(model_arg, allow_pickle=options.allow_pickle)
        if source.gguf_file:
            return False
        config = loading.load_config(source)
        ckpt = LazyCheckpoint(source.path)
        estimate = estimate_memory(ckpt, config, spec_for(config.model_type), options.calibration.samples,
                                   options.calibration.seqlen, len(options.formats))
    except FptqError:
        return False
    if estimate.whole_model > budget:
        say(f"  streaming layers: the whole model needs ~{estimate.whole_model / GIB:.1f} GB, "
            f"over the {budget / GIB:.1f} GB {'of --max-memory' if max_memory else 'budget (90% of RAM)'}")
        return True
    return False
