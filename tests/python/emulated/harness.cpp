// The CUDA half of the Python module (python/_loco_cuda.cu) for the CPU emulator, plus one
// function the check needs: memory from the emulator's cudaMalloc, which the CUDA handles accept
// as device memory (and which is host memory, so torch CPU tensors can view it). Built by
// python/CMakeLists.txt (CTest entry python.cuda_emulated) and by tests/python/emulated/run.sh;
// not part of the module.
#define bind_cuda bind_cuda_bindings
#include "python/_loco_cuda.cu"
#undef bind_cuda

#include <cstdint>
#include <stdexcept>

namespace loco_python __attribute__((visibility("hidden"))) {

void bind_cuda(py::module_& m) {
    bind_cuda_bindings(m);
    m.def("emulated_alloc", [](std::size_t bytes) {
        void* p = nullptr;
        if (cudaMalloc(&p, bytes) != cudaSuccess) throw std::runtime_error("emulated cudaMalloc");
        return reinterpret_cast<std::uintptr_t>(p);
    });
}

}  // namespace loco_python
