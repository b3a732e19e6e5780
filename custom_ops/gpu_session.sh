#!/usr/bin/env bash
# One device run for the CUDA kernels: build on the GPU machine, check the wgmma SASS, run the
# direct-entry GPU tests (torch buffers, no onnxruntime-gpu needed), then the kernel benchmark.
#
#   device `run` with carry=["build/<tag>/_ort_headers"] (the ORT headers CMake downloaded here):
#     bash custom_ops/gpu_session.sh            # logs and tables under $OUT
#   BENCH_T (seconds for the bench, default 330) and BENCH_ARGS pass through.
#
# Nothing here runs in CI (no GPU there); CI compiles the same sources with nvcc.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ln -sfn ../passes fptq_onnx/passes
ln -sfn ../models fptq_onnx/models

inc=${ORT_INCLUDE_DIR:-$(ls -d build/*/_ort_headers/usr/include/onnxruntime 2>/dev/null | head -1)}
[[ -f "$inc/onnxruntime_cxx_api.h" ]] || { echo "gpu_session: no ONNX Runtime headers (carry build/<tag>/_ort_headers or set ORT_INCLUDE_DIR)"; exit 1; }
cmake -S custom_ops -B /tmp/fptq_gpu_build -DCMAKE_BUILD_TYPE=Release -DFPTQ_OPS_CUDA=ON -DORT_INCLUDE_DIR="$inc" \
  > "$OUT/cmake.log" 2>&1 && cmake --build /tmp/fptq_gpu_build -j16 > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log" "$OUT/cmake.log"; exit 1; }
export FPTQ_OPS_LIBRARY=/tmp/fptq_gpu_build/libfptq_ops.so

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
cuobjdump --dump-sass "$FPTQ_OPS_LIBRARY" > /tmp/all.sass
echo "wgmma kernels: $(grep -c 'Function : .*Wgmma' /tmp/all.sass), GMMA instructions: $(grep -c GMMA /tmp/all.sass)," \
  "local loads/stores in them: $(awk '/Function :/{f=/Wgmma/} f' /tmp/all.sass | grep -cE 'LDL|STL')" | tee "$OUT/sass_summary.txt"

timeout 200 python3 -m pytest -q -x tests/custom_ops/test_w4a8_cuda.py -k direct --noconftest -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.log" | tail -8
timeout "${BENCH_T:-330}" python3 bench/kernels_gpu.py --no-ort ${BENCH_ARGS:-} --md "$OUT/kernels_gpu.md" \
  --json "$OUT/kernels_gpu.json" 2>&1 | tee "$OUT/bench.log" | tail -60
