"""Write the bundles that .ci/optimum_check.sh loads with Optimum, and what Optimum must reproduce.

Runs in the main environment (transformers 5): a tiny mistral checkpoint (untied
embeddings, so its greedy path varies; transformers 5 keeps its word-level test
tokenizer as is) is exported (fp32) and converted (qdq + w4a8) through the CLI, as a
user would. For each model, expected.json records the prompt's token ids under
transformers 5, the prefill logits and the greedy tokens of `fptq_onnx.runtime`.
Not a pytest module: optimum_check.py reads its output in a transformers 4.57 venv.

Usage: python tests/apps/optimum_bundle.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TESTS_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS_DIR))

from conftest import run_cli, save_tiny_checkpoint  # noqa: E402

ARCH = "mistral"
PROMPT = "the quick brown fox jumps over the lazy dog"
NEW_TOKENS = 10
CONVERT_ARGS = ("--format", "qdq,w4a8", "--calib", "random", "--calib-samples", "2", "--calib-seqlen", "16",
                "--group-size", "16", "--v0", "1", "--v1", "5", "--ppl-windows", "0")
# model key -> (bundle directory, file, needs the custom-op library written beside it)
MODELS = {"fp32": ("export", "model.onnx", False), "qdq": ("convert", "model.onnx", False),
          "w4a8": ("convert", "model.w4a8.onnx", True)}


def main(out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from fptq_onnx.custom_ops import LIBRARY_NAME
    from fptq_onnx.runtime import OnnxCausalLM

    checkpoint = save_tiny_checkpoint(out / "checkpoint", ARCH)
    for name, args in {"export": ("export",), "convert": ("convert",)}.items():
        (out / name).mkdir()
        extra = CONVERT_ARGS if name == "convert" else ()
        result = run_cli(*args, checkpoint, out / name / "model.onnx", *extra)
        if result.code != 0:
            sys.exit(f"fptq-onnx {name} failed:\n{result.stderr}")
    expected = {"prompt": PROMPT, "new_tokens": NEW_TOKENS, "models": {}}
    for key, (bundle, file, needs_ops) in MODELS.items():
        directory = out / bundle
        tokenizer = AutoTokenizer.from_pretrained(directory)
        prompt_ids = tokenizer(PROMPT)["input_ids"]
        eos = GenerationConfig.from_pretrained(directory).eos_token_id  # what `generate` stops at
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        lm = OnnxCausalLM(directory / file)
        expected["models"][key] = {
            "dir": bundle,
            "file": file,
            "custom_ops_library": LIBRARY_NAME if needs_ops else None,
            "prompt_ids": prompt_ids,
            "logits": lm.logits(np.array([prompt_ids], np.int64))[0].tolist(),
            "tokens": list(lm.generate_ids(prompt_ids, NEW_TOKENS, eos_ids)),
        }
    (out / "expected.json").write_text(json.dumps(expected))
    print(f"wrote {', '.join(MODELS)} bundles and expected.json to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(Path(sys.argv[1]))
