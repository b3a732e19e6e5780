"""Optimum's ORTModelForCausalLM and transformers 4.x's AutoTokenizer load our bundles as a user would.

Runs in the venv of .ci/optimum_check.sh (transformers 4.57 + optimum-onnx 0.1.0, which
cannot share the main environment's transformers 5) on what optimum_bundle.py wrote:
the tokenizer must give the same prompt ids as transformers 5, the prefill logits and
the greedy `generate` tokens the same as fptq_onnx.runtime. It imports nothing of
fptq_onnx; the w4a8 model gets the custom-op library copied beside it, through
Optimum's `session_options`. Not a pytest module.

Usage: python tests/apps/optimum_check.py BUNDLE_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def check(out: Path) -> list[str]:
    import onnxruntime as ort
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    if not transformers.__version__.startswith("4."):
        return [f"this check needs transformers 4.x, found {transformers.__version__}"]
    expected = json.loads((out / "expected.json").read_text())
    failures = []
    for key, want in expected["models"].items():
        start = time.perf_counter()
        directory = out / want["dir"]
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            failures.append(f"{key}: AutoTokenizer.from_pretrained({want['dir']}) failed: {exc}")
            continue
        encoded = tokenizer(expected["prompt"], return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        if ids != want["prompt_ids"]:
            failures.append(f"{key}: transformers {transformers.__version__} tokenizes the prompt as {ids}, "
                            f"transformers 5 as {want['prompt_ids']}")
            continue
        options = ort.SessionOptions()
        if want["custom_ops_library"]:
            options.register_custom_ops_library(str(directory / want["custom_ops_library"]))
        model = ORTModelForCausalLM.from_pretrained(directory, file_name=want["file"], session_options=options)
        with torch.no_grad():
            logits = model(**encoded).logits[0].numpy()
        reference = np.array(want["logits"], np.float32)
        diff = float(np.abs(logits - reference).max())
        if diff > 1e-4 * float(np.abs(reference).max()):
            failures.append(f"{key}: prefill logits differ from fptq_onnx.runtime by up to {diff:.3g}")
        generated = model.generate(**encoded, max_new_tokens=expected["new_tokens"], do_sample=False)
        tokens = generated[0, encoded["input_ids"].shape[1]:].tolist()
        if tokens != want["tokens"]:
            failures.append(f"{key}: generate gave {tokens}, fptq_onnx.runtime {want['tokens']}")
        print(f"  {key:5} {want['dir']}/{want['file']}: tokenizer ids equal, logits max|diff| {diff:.2g}, "
              f"greedy {tokens} {'==' if tokens == want['tokens'] else '!='} ours "
              f"({time.perf_counter() - start:.1f} s)")
    return failures


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    problems = check(Path(sys.argv[1]))
    if problems:
        sys.exit("Optimum check failed:\n  " + "\n  ".join(problems))
