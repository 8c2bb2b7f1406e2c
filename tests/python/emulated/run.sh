#!/usr/bin/env bash
# The Python module's CUDA bindings on a machine without a GPU: builds python/_loco.cpp and
# python/_loco_cuda.cu (through harness.cpp) with g++ against the CPU emulator
# (tests/cuda/emulator/) into build/emulated-python, then runs check_cuda_bindings.py there:
# the Cuda* classes on "device" tensors, two gloo processes, both communicator memory spaces.
# Every test build with torch does the same (CTest entry python.cuda_emulated, built by
# python/CMakeLists.txt); this is the shortcut. Needs /usr/bin/python3 with torch, pybind11 and
# dlpack.h.
#
#   bash tests/python/emulated/run.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
py=${PYTHON:-/usr/bin/python3}
out=$root/build/emulated-python/loco
mkdir -p "$out"
inc=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
suffix=$("$py" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
cp "$root/python/loco/__init__.py" "$out/"
g++ -std=c++20 -O1 -fno-math-errno -ffp-contract=off -Wall -Wextra -Wno-unknown-pragmas \
    -shared -fPIC -fvisibility=hidden \
    -D__CUDACC__ -D__CUDA_ARCH__=900 -DLOCO_EMULATED=1 -DLOCO_PYTHON_CUDA=1 \
    -I"$root/tests/cuda/emulator" -I"$root/include" -I"$root" -I"$inc" -include cuda_runtime.h \
    -x c++ "$root/python/_loco.cpp" "$root/tests/python/emulated/harness.cpp" \
    -o "$out/_loco$suffix" -pthread
EMU_DEVICES=1 PYTHONPATH=$root/build/emulated-python "$py" \
    "$root/tests/python/emulated/check_cuda_bindings.py"
