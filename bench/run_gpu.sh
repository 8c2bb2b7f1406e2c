#!/usr/bin/env bash
# One call on a machine with a GPU (the lent H100): builds the CUDA tests and benchmarks in
# build-gpu, runs the tests, runs the benchmarks (JSON and logs under $OUT), and prints a short
# table last.
#
#   bash bench/run_gpu.sh                 # everything
#   LOCO_GPU_SKIP_BENCH=1 bash bench/run_gpu.sh   # tests only
#   LOCO_GPU_SKIP_TESTS=1 bash bench/run_gpu.sh   # benchmarks only
#   extra arguments go to the benchmark program (e.g. --benchmark_filter=adamw)
#
# Exit status: the test program's (0 passed, 77 no GPU), or the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
jobs=$(nproc 2>/dev/null || echo 4)
# One machine: NCCL's bootstrap over the loopback interface needs no network; print NCCL's
# warnings, if any, next to the test that caused them.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

step() { echo; echo "== $*"; }

step "configure and build (build-gpu, $jobs jobs)"
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DLOCO_BUILD_BENCHMARKS=ON -DLOCO_BUILD_EXAMPLES=OFF >"$OUT/configure.log" 2>&1 ||
  { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j "$jobs" --target loco_cuda_tests bench_cuda_kernels \
  >"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>/dev/null || true

tests_rc=0
if [[ -z "${LOCO_GPU_SKIP_TESTS:-}" ]]; then
  step "CUDA tests"
  start=$(date +%s)
  ./build-gpu/tests/loco_cuda_tests --duration=true 2>&1 | tee "$OUT/cuda_tests.log"
  tests_rc=${PIPESTATUS[0]}
  echo "tests exit $tests_rc in $(( $(date +%s) - start )) s"
fi

if [[ -z "${LOCO_GPU_SKIP_BENCH:-}" ]]; then
  step "kernel benchmarks"
  LOCO_BENCH_SUMMARY="$OUT/summary.txt" ./build-gpu/bench/bench_cuda_kernels \
    --benchmark_out="$OUT/bench.json" --benchmark_out_format=json \
    --benchmark_counters_tabular=true "$@" 2>&1 | tee "$OUT/bench.log"
fi

step "summary"
echo "CUDA tests: exit $tests_rc (0 passed, 77 skipped without a GPU)"
grep -E "test cases:|assertions:" "$OUT/cuda_tests.log" 2>/dev/null || true
[[ -f "$OUT/summary.txt" ]] && cat "$OUT/summary.txt"
exit "$tests_rc"
