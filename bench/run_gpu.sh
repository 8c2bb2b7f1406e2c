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
#   LOCO_GPU_DEADLINE_S=540 bash bench/run_gpu.sh # every step ends within 540 s of the start:
#                         a step still running 15 s before then is stopped (exit 124, "timed
#                         out") and the later ones are not run, so the summary and the files
#                         under $OUT still come back from a call with a time limit
#   extra arguments go to the benchmark program (e.g. --benchmark_filter=adamw)
#
# Files under $OUT, at most 8 (the lent machine returns no more than 8):
#   build.log        configure, then the build of every target, each after a "== " line
#   cuda_tests.log   the CUDA test program
#   python_cuda.log  tests/python/test_cuda.py
#   bench.log        the benchmark programs and bench/torch_reference.py
#   bench.json       the kernel benchmarks, Google Benchmark's JSON
#   muon.json        the Muon benchmarks, Google Benchmark's JSON
#   summary.txt      both benchmark programs' summary tables
#   torch.txt        PyTorch's rows, each written as it is measured (a crash keeps the earlier ones)
#
# A target that fails to build leaves out only the step that runs it: every target this run needs
# (the Python module's included, beside the others) is built in one ninja run that keeps going
# past a failure; only after a failure is each built again alone, to tell which failed.
# Exit status: 0 when every step that ran passed; otherwise the first failing step's, in the
# order build (a target that failed), CUDA tests, Python CUDA test, kernel benchmarks, Muon
# benchmarks, PyTorch reference (a benchmark program exits 1 when one of its rows failed);
# a step LOCO_GPU_DEADLINE_S stopped counts as failing with 124 ("timed out" in the summary);
# otherwise 77 when the test program or a benchmark program found no GPU (a skip, not a pass).
# The Python test's and the PyTorch reference's 77 (no CUDA PyTorch) is shown, not counted.
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
# A default $OUT keeps the last run's files: none of them may pass for this run's.
rm -f "$OUT"/{build,cuda_tests,python_cuda,bench}.log "$OUT"/{bench,muon}.json \
  "$OUT"/{summary,torch}.txt
jobs=$(nproc 2>/dev/null || echo 4)
# One machine: NCCL's bootstrap over the loopback interface needs no network; print NCCL's
# warnings, if any, next to the test that caused them.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

step() { echo; echo "== $*"; }

# limited CMD...: CMD, stopped when LOCO_GPU_DEADLINE_S is set and its time is up (15 s before
# the deadline, kept for the summary); 124 when stopped or not started for want of time.
deadline=
if [[ -n "${LOCO_GPU_DEADLINE_S:-}" ]]; then
  [[ "$LOCO_GPU_DEADLINE_S" =~ ^[0-9]+$ ]] ||
    { echo "LOCO_GPU_DEADLINE_S=$LOCO_GPU_DEADLINE_S is not a number of seconds"; exit 2; }
  deadline=$(( $(date +%s) + LOCO_GPU_DEADLINE_S ))
fi
limited() {
  [[ -z "$deadline" ]] && { "$@"; return; }
  local left=$(( deadline - 15 - $(date +%s) ))
  if (( left <= 0 )); then
    echo "not started: LOCO_GPU_DEADLINE_S is up"
    return 124
  fi
  timeout --kill-after=5 "$left" "$@"
}

rc=0         # the exit status, as the header says
failures=()  # the failing steps, for the summary
# record STEP STATUS: one step's outcome into the exit status; 77 is a skip, never a failure.
record() {
  if [[ "$2" == 77 ]]; then
    [[ "$rc" == 0 ]] && rc=77
  elif [[ "$2" == 124 && -n "$deadline" ]]; then
    failures+=("$1 (timed out: LOCO_GPU_DEADLINE_S)")
    [[ "$rc" == 0 || "$rc" == 77 ]] && rc=124
  elif [[ "$2" != 0 ]]; then
    failures+=("$1 (exit $2)")
    [[ "$rc" == 0 || "$rc" == 77 ]] && rc=$2
  fi
}
# What each step runs, and whether it is there to run: built[target] is 0 when it is.
declare -A bin built
want=()  # the targets this run needs
[[ -z "${LOCO_GPU_SKIP_TESTS:-}" ]] && want+=(loco_cuda_tests)
if [[ -z "${LOCO_GPU_SKIP_BENCH:-}" ]]; then
  want+=(bench_cuda_kernels)
  [[ -z "${LOCO_GPU_SKIP_MUON:-}" ]] && want+=(bench_cuda_muon)
fi
python_target=  # loco_python, when this run builds and tests the Python module

if [[ -n "${LOCO_GPU_PREBUILT:-}" ]]; then
  bin=([loco_cuda_tests]=$LOCO_GPU_PREBUILT/loco_cuda_tests
       [bench_cuda_kernels]=$LOCO_GPU_PREBUILT/bench_cuda_kernels
       [bench_cuda_muon]=$LOCO_GPU_PREBUILT/bench_cuda_muon)
  # Google Benchmark may be another version there: a copy of ours can travel beside the binaries.
  export LD_LIBRARY_PATH=$LOCO_GPU_PREBUILT:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
  step "prebuilt binaries from $LOCO_GPU_PREBUILT"
  for t in "${want[@]}"; do
    if [[ -x "${bin[$t]}" ]]; then
      built[$t]=0
    else
      built[$t]=missing
      echo "no ${bin[$t]}"
      record "$t: not in $LOCO_GPU_PREBUILT" 127
    fi
  done
else
  bin=([loco_cuda_tests]=./build-gpu/tests/loco_cuda_tests
       [bench_cuda_kernels]=./build-gpu/bench/bench_cuda_kernels
       [bench_cuda_muon]=./build-gpu/bench/bench_cuda_muon)
  log=$OUT/build.log
  step "configure and build (build-gpu, $jobs jobs; output in build.log)"
  start=$(date +%s)
  echo "== configure" >"$log"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLOCO_BUILD_BENCHMARKS=ON -DLOCO_BUILD_EXAMPLES=OFF "${pydeps[@]}" >>"$log" 2>&1 ||
    { tail -40 "$log"; echo "configure failed: nothing to run"; exit 1; }
  # No target: CMake left the module out (no Python headers, pybind11 or dlpack.h). The list is
  # read whole: grep -q leaving a pipe early would fail it under pipefail.
  if [[ -z "${LOCO_GPU_SKIP_PYTHON:-}" ]] &&
     grep -q "^loco_python:" <<<"$(cmake --build build-gpu --target help 2>/dev/null)"; then
    python_target=loco_python
  fi
  targets=("${want[@]}" ${python_target:+"$python_target"})
  if (( ${#targets[@]} > 0 )); then
    # One ninja run over every target, kept going past a failure (-k 0): a compile error in one
    # benchmark leaves the tests and the other programs to run, and the Python module's nvcc
    # (minutes) runs beside the others' instead of after the tests.
    echo "== build ${targets[*]}" >>"$log"
    limited cmake --build build-gpu -j "$jobs" --target "${targets[@]}" -- -k 0 >>"$log" 2>&1
    build_rc=$?
    for t in "${targets[@]}"; do built[$t]=0; done
    if [[ "$build_rc" != 0 ]]; then
      grep -E "error|FAILED" "$log" | head -40
      # Which targets failed: each is built again on its own, nothing to do for one that was
      # built; a failed one's compile runs once more. (Neither ninja's dry run, which CMake's
      # CONFIGURE_DEPENDS globs always give work, nor the binary, which may be an earlier
      # build's, can tell.)
      for t in "${targets[@]}"; do
        echo "== build $t alone (did it fail?)" >>"$log"
        limited cmake --build build-gpu -j "$jobs" --target "$t" >>"$log" 2>&1
        target_rc=$?
        if [[ "$target_rc" != 0 ]]; then
          built[$t]=failed
          record "build $t" "$target_rc"
        fi
      done
      (( ${#failures[@]} > 0 )) || record "build" "$build_rc"  # not any one target's fault
      echo "failed to build (see build.log): ${failures[*]}"
    fi
  fi
  echo "built in $(( $(date +%s) - start )) s"
fi
# not_run TARGET: why a step that needs TARGET does not run.
not_run() {
  [[ "${built[$1]:-}" == failed ]] && echo "not run ($1 failed to build, see build.log)" ||
    echo "not run (no $1)"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>/dev/null || true

tests_rc=skipped
if [[ -z "${LOCO_GPU_SKIP_TESTS:-}" ]]; then
  step "CUDA tests"
  if [[ "${built[loco_cuda_tests]:-}" == 0 ]]; then
    start=$(date +%s)
    limited "${bin[loco_cuda_tests]}" --duration=true 2>&1 | tee "$OUT/cuda_tests.log"
    tests_rc=${PIPESTATUS[0]}
    echo "tests exit $tests_rc in $(( $(date +%s) - start )) s"
    record "CUDA tests" "$tests_rc"
  else
    tests_rc=$(not_run loco_cuda_tests); echo "$tests_rc"
  fi
fi

# The Python module with its CUDA half (python/_loco_cuda.cu: minutes of nvcc, built above with
# the rest) and tests/python/test_cuda.py against the machine's CUDA PyTorch (77: it could not
# run, not a failure).
python_rc=skipped
if [[ -z "${LOCO_GPU_SKIP_PYTHON:-}" && -z "${LOCO_GPU_PREBUILT:-}" ]]; then
  step "Python module with CUDA: tests/python/test_cuda.py"
  if [[ -z "$python_target" ]]; then
    grep -h "loco: the Python module" "$OUT/build.log" | head -5
    python_rc=not-built
  elif [[ "${built[loco_python]}" == 0 ]]; then
    start=$(date +%s)
    py=$(sed -n 's/^Python3_EXECUTABLE:[A-Z]*=//p' build-gpu/CMakeCache.txt)
    PYTHONPATH=$PWD/build-gpu/python limited "${py:-python3}" tests/python/test_cuda.py 2>&1 |
      tee "$OUT/python_cuda.log"
    python_rc=${PIPESTATUS[0]}
    echo "Python CUDA test exit $python_rc in $(( $(date +%s) - start )) s"
    [[ "$python_rc" != 77 ]] && record "Python CUDA test" "$python_rc"
  else
    python_rc=$(not_run loco_python); echo "$python_rc"
  fi
fi

bench_rc=skipped muon_rc=skipped torch_rc=skipped
if [[ -z "${LOCO_GPU_SKIP_BENCH:-}" ]]; then
  step "kernel benchmarks"
  if [[ "${built[bench_cuda_kernels]:-}" == 0 ]]; then
    LOCO_BENCH_SUMMARY="$OUT/summary.txt" limited "${bin[bench_cuda_kernels]}" \
      --benchmark_out="$OUT/bench.json" --benchmark_out_format=json \
      --benchmark_counters_tabular=true "$@" 2>&1 | tee -a "$OUT/bench.log"
    bench_rc=${PIPESTATUS[0]}
    record "kernel benchmarks" "$bench_rc"
  else
    bench_rc=$(not_run bench_cuda_kernels); echo "$bench_rc"
  fi
  # Muon's step on GPT-2's hidden matrices (about 2 minutes): appends its rows to the summary.
  if [[ -z "${LOCO_GPU_SKIP_MUON:-}" ]]; then
    step "Muon benchmarks"
    if [[ "${built[bench_cuda_muon]:-}" == 0 ]]; then
      LOCO_BENCH_SUMMARY="$OUT/summary.txt" limited "${bin[bench_cuda_muon]}" \
        --benchmark_out="$OUT/muon.json" --benchmark_out_format=json \
        --benchmark_counters_tabular=true 2>&1 | tee -a "$OUT/bench.log"
      muon_rc=${PIPESTATUS[0]}
      record "Muon benchmarks" "$muon_rc"
    else
      muon_rc=$(not_run bench_cuda_muon); echo "$muon_rc"
    fi
  fi
  # PyTorch's fused optimizers, Muon and a plain-PyTorch 2-bit quantizer on the same lists, in
  # the same run: the "PyTorch" column of docs/benchmarks.md. A crash fails the run; 77 (no
  # CUDA PyTorch here) does not.
  if [[ -n "${LOCO_GPU_SKIP_TORCH:-}" ]]; then
    :
  elif ! command -v python3 >/dev/null; then
    torch_rc="skipped (no python3)"
  else
    step "PyTorch reference"
    limited python3 bench/torch_reference.py --out "$OUT/torch.txt" 2>&1 | tee -a "$OUT/bench.log"
    torch_rc=${PIPESTATUS[0]}
    [[ "$torch_rc" != 77 ]] && record "PyTorch reference" "$torch_rc"
  fi
fi

# outcome STEP STATUS LEGEND: one summary line; a step that did not run says why instead.
outcome() {
  if [[ "$2" == 124 && -n "$deadline" ]]; then echo "$1: timed out (LOCO_GPU_DEADLINE_S)"
  elif [[ "$2" =~ ^[0-9]+$ ]]; then echo "$1: exit $2 ($3)"; else echo "$1: $2"; fi
}
step "summary"
outcome "CUDA tests" "$tests_rc" "0 passed, 77 skipped without a GPU"
outcome "Python CUDA test" "$python_rc" "0 passed, 77 skipped"
outcome "Kernel benchmarks" "$bench_rc" "0 every row ran, 1 a row failed"
outcome "Muon benchmarks" "$muon_rc" "0 every row ran, 1 a row failed"
outcome "PyTorch reference" "$torch_rc" "0 every row ran, 77 no CUDA PyTorch; rows in torch.txt"
if (( ${#failures[@]} > 0 )); then
  printf 'FAILED: %s\n' "${failures[@]}"
fi
grep -E "^(Ran|OK|FAILED)" "$OUT/python_cuda.log" 2>/dev/null || true
grep -E "test cases:|assertions:" "$OUT/cuda_tests.log" 2>/dev/null || true
[[ -f "$OUT/summary.txt" ]] && cat "$OUT/summary.txt"
[[ -s "$OUT/torch.txt" ]] && { echo; cat "$OUT/torch.txt"; }
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
echo "exit status $rc"
exit "$rc"
