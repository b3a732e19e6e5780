#!/usr/bin/env bash
# Optimum loads our outputs as a new user would: ORTModelForCausalLM + AutoTokenizer under
# transformers 4.57 (optimum-onnx 0.1.0 needs transformers < 4.58; we need 5.x), so in a venv
# of its own. The main environment (fptq-onnx installed) writes a tiny model's fp32, qdq and
# w4a8 bundles and what they must give (tests/apps/optimum_bundle.py); the venv loads them
# and compares tokenizer ids, logits and greedy tokens (tests/apps/optimum_check.py).
#
# The venv sees the main environment's packages (--system-site-packages: torch 2.13.0 CPU,
# onnxruntime, numpy) and installs its own transformers, tokenizers, huggingface-hub, optimum
# and optimum-onnx, which come first on its path. pip then reports that the main
# environment's fptq-onnx wants transformers>=5: expected, and no concern of this venv.
# torch is named with the CPU pin so pip keeps the installed build instead of fetching another.
#
# Usage: .ci/optimum_check.sh   (FPTQ_OPTIMUM_WORK=DIR keeps the venv and bundles in DIR)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
if [[ -n "${FPTQ_OPTIMUM_WORK:-}" ]]; then
    work=$FPTQ_OPTIMUM_WORK
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
rm -rf "$work/bundle"

echo "--- venv with transformers 4.57 + optimum-onnx 0.1.0 ($work/venv)"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0 "transformers==4.57.*" "optimum-onnx==0.1.0"
"$work/venv/bin/python" -c "import transformers, optimum.onnxruntime; print('transformers', transformers.__version__)"
echo "    ($((SECONDS - start)) s)"

echo "--- tiny model bundles from the main environment"
python tests/apps/optimum_bundle.py "$work/bundle"
echo "    ($((SECONDS - start)) s)"

echo "--- ORTModelForCausalLM + AutoTokenizer on them"
"$work/venv/bin/python" tests/apps/optimum_check.py "$work/bundle"
echo "Optimum check passed in $((SECONDS - start)) s"
