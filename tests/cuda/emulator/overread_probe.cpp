// The sanitizer check of the emulator itself (CTest entry emulator.asan_sees_overread, test
// builds with LOCO_SANITIZE): a kernel, run as 256 fibers, reads one float past a cudaMalloc
// buffer of 1000. AddressSanitizer must report it, which needs both exact allocations and the
// fiber switches announced to it (tests/cuda/emulator/cuda_runtime.h); the test expects the
// report, so a change that blinds ASan to the kernels fails here and not silently.
#include <cstdio>

namespace {
__global__ void copy_shifted(const float* x, float* y, unsigned n) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    __syncthreads();  // every fiber switches at least once before it reads
    if (i < n) {
        y[i] = x[i + 1];  // x[n] when i == n - 1: one past the buffer
    }
}
}  // namespace

int main() {
    constexpr unsigned n = 1000;
    float* x = nullptr;
    float* y = nullptr;
    if (cudaMalloc(&x, n * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&y, n * sizeof(float)) != cudaSuccess) {
        std::puts("cudaMalloc failed");
        return 2;
    }
    cudaMemset(x, 0, n * sizeof(float));
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3((n + 255) / 256, 1, 1);
    cfg.blockDim = dim3(256, 1, 1);
    cudaLaunchKernelEx(&cfg, copy_shifted, static_cast<const float*>(x), y, n);
    std::puts("the read past the buffer went unreported");
    return 0;
}
