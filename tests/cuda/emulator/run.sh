#!/usr/bin/env bash
# Runs the CUDA tests' logic on the CPU, for machines without a GPU: a development aid, not part
# of the build or of CI (the real tests need a GPU; see bench/run_gpu.sh).
#
# cuda_runtime.h and nccl.h here stand in for the slice of the CUDA runtime and NCCL that loco
# uses: the kernels are compiled by g++ as plain functions; the blocks of a launch run one after
# another, each on a pool of 256 std::threads with a std::barrier for __syncthreads (so the
# indexing, vector paths, shared-memory staging and last-block bookkeeping all execute);
# __shared__ becomes a function static, valid because one block runs at a time; streams execute
# at once and graphs record closures. Contractions and warp-level behaviour are not emulated, nor
# timing, nor NCCL timeouts (the fake NCCL blocks; the timeout test needs real GPUs).
# cublas_v2.h stands in for the few cuBLAS calls of Muon's Newton-Schulz (batched GEMMs, with
# cuBLAS's column-major conventions and argument checks, each product summed in double).
#
#   bash tests/cuda/emulator/run.sh                   # all tests except the kernel-fault child
#   EMU_DEVICES=3 bash tests/cuda/emulator/run.sh -tc='*nccl across GPUs: collectives*'
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out=$root/build/emu
mkdir -p "$out"
flags=(-std=c++20 -O1 -g -x c++ -D__CUDACC__ -D__CUDA_ARCH__=900 -DLOCO_TEST_NCCL=1
       -I"$here" -I"$root/include" -I"$root/tests" -Wall -Wextra -Wno-unknown-pragmas)
objs=()
pids=()
for src in main.cu inner_test.cu outer_test.cu comm_test.cu handles_test.cu compress_test.cu muon_test.cu statistical_test.cu groups_test.cu topk_test.cu; do
  obj=$out/${src%.cu}.o
  objs+=("$obj")
  g++ "${flags[@]}" -c "$root/tests/cuda/$src" -o "$obj" &
  pids+=($!)
  if (( ${#pids[@]} == 2 )); then  # two compilations at a time
    for p in "${pids[@]}"; do wait "$p"; done
    pids=()
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
g++ -o "$out/emulated_cuda_tests" "${objs[@]}" -lpthread
exec "$out/emulated_cuda_tests" -sce='*fault*' "$@"
