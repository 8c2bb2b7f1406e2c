#!/usr/bin/env bash
# Runs the CUDA tests' logic on the CPU, for machines without a GPU. The same program runs as the
# CTest entries `cuda_emulated.1` and `.2` (label cuda-emulator; tests/CMakeLists.txt), which
# every test build makes and ./scripts/test runs; this script is the developer's shortcut: it
# configures build/emu, builds only that program and runs it, passing its arguments to doctest.
#
# cuda_runtime.h and nccl.h here stand in for the slice of the CUDA runtime and NCCL that loco
# uses: the kernels are compiled by g++ as plain functions; the blocks of a launch run one after
# another, each as 256 fibers on the launching thread, switched at __syncthreads and warp
# exchanges (so the indexing, vector paths, shared-memory staging and last-block bookkeeping all
# execute; a barrier not every thread reaches aborts with a message);
# __shared__ becomes a function static, valid because one block runs at a time; streams execute
# at once and graphs record closures. Contractions and warp-level behaviour are not emulated, nor
# timing, nor NCCL timeouts (the fake NCCL blocks: the missing-peer test is left out), nor kernel
# faults (the fault child test is left out). EMU_DEVICES sets the number of emulated GPUs (3 by
# default, as in CTest, so the multi-rank NCCL tests run). LOCO_EMULATED is defined, so a test
# can tell where it runs. About a minute on one core (x86-64: fiber switches without system calls).
# cublas_v2.h stands in for the few cuBLAS calls of Muon's Newton-Schulz (batched GEMMs, with
# cuBLAS's column-major conventions and argument checks, each product summed in double).
#
#   bash tests/cuda/emulator/run.sh                   # all tests but the two left out above
#   EMU_DEVICES=2 bash tests/cuda/emulator/run.sh -tc='*nccl across GPUs: collectives*'
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
out=$root/build/emu
generator=()
if command -v ninja > /dev/null; then
  generator=(-G Ninja)
fi
cmake -S "$root" -B "$out" "${generator[@]}" -DCMAKE_BUILD_TYPE=Debug -DLOCO_BUILD_TESTS=ON \
      -DLOCO_BUILD_EXAMPLES=OFF -DLOCO_ENABLE_CUDA=OFF > /dev/null
cmake --build "$out" --target loco_cuda_emulated -j "${EMU_JOBS:-2}"
EMU_DEVICES=${EMU_DEVICES:-3} exec "$out/tests/loco_cuda_emulated" -sce='a fault inside a kernel*' \
  -tce='*a missing peer times out*' "$@"
