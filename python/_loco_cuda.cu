// The CUDA half of the Python module (built by nvcc when CUDA is enabled, see
// python/CMakeLists.txt): the configurations of python/bound.hpp on loco::cuda::diloco and
// loco::cuda::optimizer, for parameters that are CUDA tensors. Their classes carry the prefix
// "Cuda" (CudaDiLoCo_adamw_nesterov, ...); python/loco/__init__.py picks them from the tensors'
// device. python/_loco.cpp calls bind_cuda() from the module's init.

#include "bound.hpp"

// The CUDA handles only: not <loco/cuda.hpp>, whose NCCL communicator the module does not use (its
// collectives go through torch.distributed, python/_loco.cpp).
#include <loco/backend/cuda/diloco.hpp>
#include <loco/backend/cuda/groups.hpp>
#include <loco/backend/cuda/optimizer.hpp>

namespace loco_python __attribute__((visibility("hidden"))) {

void bind_cuda(py::module_& m) {
    bind_configurations<loco::cuda_backend, loco::cuda::optimizer>(m, "Cuda");
}

}  // namespace loco_python
