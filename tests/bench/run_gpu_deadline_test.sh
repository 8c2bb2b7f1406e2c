#!/usr/bin/env bash
# bench/run_gpu.sh under LOCO_GPU_DEADLINE_S (the CTest entry bench.run_gpu_deadline): a step
# still running when the time is up is stopped, the steps after it are not started, and the
# script still reaches its summary and exits 124. The "programs" are stand-ins that sleep or
# succeed at once, so this checks the script's bookkeeping in seconds, without a GPU.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/bin"
printf '#!/bin/sh\nsleep 60\n' >"$work/bin/bench_cuda_kernels"
printf '#!/bin/sh\necho muon ran\n' >"$work/bin/bench_cuda_muon"
chmod +x "$work/bin/"*

fail() { echo "FAILED: $*"; echo "--- output"; cat "$work/log"; exit 1; }

# 18 s: the kernel benchmarks get at most 3 s before the 15 s kept for the summary.
start=$(date +%s)
LOCO_GPU_DEADLINE_S=18 LOCO_GPU_SKIP_TESTS=1 LOCO_GPU_SKIP_TORCH=1 LOCO_GPU_PREBUILT=$work/bin \
  OUT=$work/out bash "$root/bench/run_gpu.sh" >"$work/log" 2>&1
rc=$?
took=$(( $(date +%s) - start ))
[[ "$rc" == 124 ]] || fail "exit $rc, want 124"
(( took < 30 )) || fail "took $took s: the sleeping benchmark was not stopped"
grep -q "^Kernel benchmarks: timed out (LOCO_GPU_DEADLINE_S)" "$work/log" ||
  fail "the kernel benchmarks are not reported as timed out"
grep -q "^Muon benchmarks: timed out (LOCO_GPU_DEADLINE_S)" "$work/log" ||
  fail "the Muon benchmarks are not reported as not started"
grep -q "muon ran" "$work/log" && fail "the Muon benchmarks started after the deadline"
grep -q "^FAILED: kernel benchmarks (timed out: LOCO_GPU_DEADLINE_S)" "$work/log" ||
  fail "the failures list does not name the timed-out step"

# Without a deadline nothing is limited: the same stand-ins, the kernels one succeeding at once.
printf '#!/bin/sh\necho kernels ran\n' >"$work/bin/bench_cuda_kernels"
LOCO_GPU_SKIP_TESTS=1 LOCO_GPU_SKIP_TORCH=1 LOCO_GPU_PREBUILT=$work/bin OUT=$work/out \
  bash "$root/bench/run_gpu.sh" >"$work/log" 2>&1
rc=$?
[[ "$rc" == 0 ]] || fail "exit $rc without a deadline, want 0"
grep -q "kernels ran" "$work/log" && grep -q "muon ran" "$work/log" || fail "a step did not run"

# A deadline that is not a number of seconds is refused before anything runs.
LOCO_GPU_DEADLINE_S=9m LOCO_GPU_PREBUILT=$work/bin OUT=$work/out \
  bash "$root/bench/run_gpu.sh" >"$work/log" 2>&1
rc=$?
[[ "$rc" == 2 ]] || fail "exit $rc for LOCO_GPU_DEADLINE_S=9m, want 2"
grep -q "is not a number of seconds" "$work/log" || fail "no message for LOCO_GPU_DEADLINE_S=9m"
echo "bench/run_gpu.sh deadline: ok"
