#!/usr/bin/env bash
# The full-set accuracy table (bench/accuracy_smollm2.md) on a GPU machine, scored on the CUDA EP.
# Builds every method once (calibration on the GPU), then scores in waves: each wave is one `compare`
# that adds tasks and reuses the finished scores, so a run cut off by a time limit keeps its waves.
# usage: FPTQ_DATA_DIR=DIR bash bench/accuracy_gpu.sh OUT_DIR [JOBS]
#   FPTQ_CLI: the command (default fptq-onnx; e.g. "python3 -m fptq_onnx.cli" without an install)
set -euo pipefail
out=${1:?usage: accuracy_gpu.sh OUT_DIR [JOBS]}
jobs=${2:-9}
read -r -a cli <<< "${FPTQ_CLI:-fptq-onnx}"
methods=fp32,rtn,ort-acc4,smoothquant,smoothquant:bits=4,gptq,awq,fptq,auto:symmetric=false,weights=gptq
"${cli[@]}" compare --out "$out" --methods "$methods" --tasks wikitext2 --limit 1 --device cuda --threads 8
tasks=wikitext2,c4
for more in "" ,lambada,piqa,arc_easy,winogrande ,mmlu; do
    tasks+=$more
    "${cli[@]}" compare --out "$out" --methods "$methods" --tasks "$tasks" --device cuda --provider cuda \
        --jobs "$jobs" --threads 1
done
