#!/usr/bin/env bash
# One call on a machine with a GPU (the lent H100): builds the CUDA tests and benchmarks in
# build-gpu, runs the tests, runs the benchmarks (JSON and logs under $OUT), and prints a short
# table last, with the fused compression passes against their target.
#
#   bash bench/run_gpu.sh                 # everything
#   LOCO_GPU_SKIP_BENCH=1 bash bench/run_gpu.sh   # tests only
#   LOCO_GPU_SKIP_TESTS=1 bash bench/run_gpu.sh   # benchmarks only
#   LOCO_GPU_SKIP_MUON=1 bash bench/run_gpu.sh    # without the Muon benchmark
#   LOCO_GPU_SKIP_TORCH=1 bash bench/run_gpu.sh   # without PyTorch's rows (bench/torch_reference.py)
#   LOCO_GPU_SKIP_PYTHON=1 bash bench/run_gpu.sh  # without the Python module's CUDA test
#   bash bench/run_gpu.sh --stage-python-deps     # on the development machine, before the run:
#                         copies pybind11 (headers, CMake config) and dlpack.h into build/pydeps,
#                         for a GPU machine without them (carry build/pydeps with the run)
#   LOCO_GPU_PREBUILT=dir bash bench/run_gpu.sh   # run binaries built elsewhere for sm_90
#                         (dir holds loco_cuda_tests, bench_cuda_kernels, bench_cuda_muon)
#   extra arguments go to the benchmark program (e.g. --benchmark_filter=adamw)
#
# Exit status: the test program's (0 passed, 77 no GPU), or the first failing step's, or the
# Python CUDA test's when it failed, or a benchmark program's when one of its rows failed.
# LOCO_BENCH_SMOKE=1 with LOCO_GPU_PREBUILT set to the emulated programs runs the whole script on
# the CPU emulator (the CTest entry bench.run_gpu_smoke), which checks this script, not a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == --stage-python-deps ]]; then
  mkdir -p build/pydeps/include build/pydeps/lib/cmake
  cp -r /usr/include/pybind11 /usr/include/dlpack build/pydeps/include/ &&
    cp -r /usr/lib/cmake/pybind11 build/pydeps/lib/cmake/ && echo "staged build/pydeps" && exit 0
  exit 1
fi
# pybind11 and dlpack.h for the Python module: the system's, or the staged copy (relocatable:
# pybind11's CMake config finds its headers relative to itself).
pydeps=()
if [[ -d build/pydeps ]]; then
  pydeps=(-DCMAKE_PREFIX_PATH="$PWD/build/pydeps" -DCMAKE_REQUIRED_INCLUDES="$PWD/build/pydeps/include")
fi
OUT=${OUT:-$PWD/build-gpu/out}
mkdir -p "$OUT"
jobs=$(nproc 2>/dev/null || echo 4)
# One machine: NCCL's bootstrap over the loopback interface needs no network; print NCCL's
# warnings, if any, next to the test that caused them.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

step() { echo; echo "== $*"; }

if [[ -n "${LOCO_GPU_PREBUILT:-}" ]]; then
  tests_bin=$LOCO_GPU_PREBUILT/loco_cuda_tests
  kernels_bin=$LOCO_GPU_PREBUILT/bench_cuda_kernels
  muon_bin=$LOCO_GPU_PREBUILT/bench_cuda_muon
  # Google Benchmark may be another version there: a copy of ours can travel beside the binaries.
  export LD_LIBRARY_PATH=$LOCO_GPU_PREBUILT:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
  step "prebuilt binaries from $LOCO_GPU_PREBUILT"
else
  tests_bin=./build-gpu/tests/loco_cuda_tests
  kernels_bin=./build-gpu/bench/bench_cuda_kernels
  muon_bin=./build-gpu/bench/bench_cuda_muon
  step "configure and build (build-gpu, $jobs jobs)"
  start=$(date +%s)
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLOCO_BUILD_BENCHMARKS=ON -DLOCO_BUILD_EXAMPLES=OFF "${pydeps[@]}" >"$OUT/configure.log" 2>&1 ||
    { tail -40 "$OUT/configure.log"; exit 1; }
  cmake --build build-gpu -j "$jobs" --target loco_cuda_tests bench_cuda_kernels bench_cuda_muon \
    >"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>/dev/null || true

tests_rc=0
if [[ -z "${LOCO_GPU_SKIP_TESTS:-}" ]]; then
  step "CUDA tests"
  start=$(date +%s)
  "$tests_bin" --duration=true 2>&1 | tee "$OUT/cuda_tests.log"
  tests_rc=${PIPESTATUS[0]}
  echo "tests exit $tests_rc in $(( $(date +%s) - start )) s"
fi

# The Python module with its CUDA half (python/_loco_cuda.cu: minutes of nvcc) and
# tests/python/test_cuda.py against the machine's CUDA PyTorch (77: it could not run).
python_rc=skipped
if [[ -z "${LOCO_GPU_SKIP_PYTHON:-}" && -z "${LOCO_GPU_PREBUILT:-}" ]]; then
  step "Python module with CUDA: tests/python/test_cuda.py"
  start=$(date +%s)
  if cmake --build build-gpu -j "$jobs" --target loco_python >"$OUT/python_build.log" 2>&1; then
    py=$(sed -n 's/^Python3_EXECUTABLE:[A-Z]*=//p' build-gpu/CMakeCache.txt)
    PYTHONPATH=$PWD/build-gpu/python "${py:-python3}" tests/python/test_cuda.py 2>&1 |
      tee "$OUT/python_cuda.log"
    python_rc=${PIPESTATUS[0]}
  elif ! cmake --build build-gpu --target help 2>/dev/null | grep -q "loco_python"; then
    # No target: CMake left the module out (no Python headers, pybind11 or dlpack.h).
    grep -h "loco: the Python module" "$OUT/configure.log" | head -5
    python_rc=not-built
  else  # the target exists and failed to build: a failure of the run, not a skip
    grep -h "error" "$OUT/python_build.log" | head -20
    python_rc=1
  fi
  echo "Python CUDA test exit $python_rc in $(( $(date +%s) - start )) s"
fi

bench_rc=0
if [[ -z "${LOCO_GPU_SKIP_BENCH:-}" ]]; then
  step "kernel benchmarks"
  LOCO_BENCH_SUMMARY="$OUT/summary.txt" "$kernels_bin" \
    --benchmark_out="$OUT/bench.json" --benchmark_out_format=json \
    --benchmark_counters_tabular=true "$@" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
  # Muon's step on GPT-2's hidden matrices (about 2 minutes): appends its rows to the summary.
  if [[ -z "${LOCO_GPU_SKIP_MUON:-}" ]]; then
    step "Muon benchmarks"
    LOCO_BENCH_SUMMARY="$OUT/summary.txt" "$muon_bin" \
      --benchmark_out="$OUT/muon.json" --benchmark_out_format=json \
      --benchmark_counters_tabular=true 2>&1 | tee -a "$OUT/bench.log"
    muon_rc=${PIPESTATUS[0]}
    [[ "$bench_rc" == 0 ]] && bench_rc=$muon_rc
  fi
  # PyTorch's fused optimizers, Muon and a plain-PyTorch 2-bit quantizer on the same lists, in
  # the same run: the "PyTorch" column of docs/benchmarks.md.
  if [[ -z "${LOCO_GPU_SKIP_TORCH:-}" ]] && command -v python3 >/dev/null; then
    step "PyTorch reference"
    python3 bench/torch_reference.py --out "$OUT/torch.txt" 2>&1 | tee -a "$OUT/bench.log"
  fi
fi

step "summary"
echo "CUDA tests: exit $tests_rc (0 passed, 77 skipped without a GPU)"
echo "Python CUDA test: $python_rc (0 passed, 77 skipped)"
echo "Benchmarks: exit $bench_rc (0 every row ran, 1 a row failed)"
grep -E "^(Ran|OK|FAILED)" "$OUT/python_cuda.log" 2>/dev/null || true
grep -E "test cases:|assertions:" "$OUT/cuda_tests.log" 2>/dev/null || true
[[ -f "$OUT/summary.txt" ]] && cat "$OUT/summary.txt"
[[ -f "$OUT/torch.txt" ]] && { echo; cat "$OUT/torch.txt"; }
# The fused compression passes against their target (>= 85 % of the same-run copy), and the
# fused encode against the plain-PyTorch quantizer of the same run (per element, when measured).
if [[ -f "$OUT/summary.txt" ]]; then
  echo
  ref=$(awk '/2-bit blockwise\(256\) \+ EF encode/ { print $(NF - 1) / ($(NF - 4) * 1e9) }' \
        "$OUT/torch.txt" 2>/dev/null)
  awk -v ref="${ref:-0}" '/^(encode\+EF|decode\+avg\+outer)/ {
         ms = $(NF - 3); ratio = $NF;
         line = sprintf("%s ratio %.3f, target 0.85: %s", substr($0, 1, 44), ratio,
                        ratio >= 0.85 ? "met" : "NOT met");
         if ($0 ~ /^encode/ && ref > 0) {  # PyTorch ms per element, scaled to 1,557,611,200
           line = line sprintf("; %.1fx faster than PyTorch", ref * 1557611200 / ms);
         }
         print line }' "$OUT/summary.txt"
  # The chunked top-k encodes (SparseLoCo, DeMo) against issue 15's goal: >= 50 % of the copy.
  awk '/^encode (sparseloco|demo)/ {
         printf "%s ratio %.3f, target 0.50: %s\n", substr($0, 1, 44), $NF,
                ($NF >= 0.5 ? "met" : "NOT met") }' "$OUT/summary.txt"
fi
# A failing Python test fails the run too (not a skip, nor a module that could not be built).
if [[ "$tests_rc" == 0 && "$python_rc" =~ ^[0-9]+$ && "$python_rc" != 0 && "$python_rc" != 77 ]]; then
  tests_rc=$python_rc
fi
# So does a benchmark row that failed (1 from the programs). 77 (no GPU) is reported as the
# run's status when nothing else failed: a run whose benchmarks found no device is a skip, not
# a pass.
if [[ "$tests_rc" == 0 && "$bench_rc" != 0 ]]; then
  tests_rc=$bench_rc
fi
exit "$tests_rc"
