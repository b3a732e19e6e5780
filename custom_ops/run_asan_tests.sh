#!/usr/bin/env bash
# Build an AddressSanitizer copy of libfptq_ops.so in a temp dir and run the
# op tests against it: tests/custom_ops (numerics, bad input) and the op's
# robustness tests (tests/robustness/test_op_*.py: hostile models, concurrent
# runs).  Fails on a test failure or on any ASAN report.
#
#   custom_ops/run_asan_tests.sh [extra pytest args]
#
# Env: ORT_INCLUDE_DIR (optional, else an already-downloaded copy in build/ is
# reused, else the normal header lookup/download runs), CXX (g++ or clang++).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fptq_asan.XXXXXX")
trap '[[ -n "${KEEP_ASAN_WORK:-}" ]] || rm -rf "$WORK"' EXIT

if [[ -z "${ORT_INCLUDE_DIR:-}" ]]; then
  for d in "$ROOT"/build/*/_ort_headers/usr/include/onnxruntime; do
    if [[ -f "$d/onnxruntime_cxx_api.h" ]]; then export ORT_INCLUDE_DIR=$d; break; fi
  done
fi

CXX=${CXX:-g++}
cmake -S "$HERE" -B "$WORK/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFPTQ_OPS_ASAN=ON \
  -DCMAKE_CXX_COMPILER="$CXX" >"$WORK/cmake.log" 2>&1 || { cat "$WORK/cmake.log"; exit 1; }
cmake --build "$WORK/build" -j2 >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
LIB="$WORK/build/libfptq_ops.so"

# The ASAN runtime must be loaded before python (which is not instrumented).
ASAN_RT=$("$CXX" -print-file-name=libasan.so)
if [[ "$ASAN_RT" != /* ]]; then  # clang
  ASAN_RT=$("$CXX" -print-file-name=libclang_rt.asan-x86_64.so)
fi
[[ -f "$ASAN_RT" ]] || { echo "run_asan_tests: ASAN runtime not found for $CXX" >&2; exit 1; }
# python does not link libstdc++; preload it too so ASAN's __cxa_throw interceptor
# finds the real one (else the first C++ exception inside onnxruntime aborts).
STDCXX=$("$CXX" -print-file-name=libstdc++.so.6)
[[ "$STDCXX" == /* ]] || STDCXX=""

mkdir -p "$WORK/asan"
echo "run_asan_tests: $LIB with $ASAN_RT" >&2
set +e
# detect_leaks=0: CPython and onnxruntime (not instrumented) keep allocations alive at exit.
FPTQ_OPS_LIBRARY="$LIB" LD_PRELOAD="$ASAN_RT${STDCXX:+ $STDCXX}" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$WORK/asan/report:symbolize=1" \
  python3 -m pytest "$ROOT/tests/custom_ops" "$ROOT"/tests/robustness/test_op_*.py -q -p no:cacheprovider "$@"
rc=$?
set -e
if compgen -G "$WORK/asan/report*" >/dev/null; then
  cat "$WORK"/asan/report* >&2
  echo "run_asan_tests: FAILED: AddressSanitizer reported errors" >&2
  exit 1
fi
if [[ $rc -ne 0 ]]; then
  echo "run_asan_tests: FAILED: pytest exit status $rc" >&2
  exit $rc
fi
echo "run_asan_tests: OK (no ASAN reports)" >&2
