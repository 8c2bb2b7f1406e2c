#pragma once
// Kernels behind the device communicators: the rank-ordered sum of M device buffers (the reduce
// step of comm::cuda_replicas) and the division that turns an NCCL sum into a mean.
//
// The sum runs over ranks 0..M-1 in that order for every element, and the mean divides the sum by
// M, exactly as comm::threads computes on the host: the results are bit-identical to it, and to
// every other rank, as long as the code is not built with fast-math division (-use_fast_math or
// -prec-div=false).

#include <loco/backend/cuda/error.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace loco::backend::cuda {

inline constexpr int max_replicas = 64;

struct replica_sources {
    const float* rank[max_replicas];
};

namespace detail {

inline constexpr unsigned collective_threads = 256;

#if LOCO_HAS_CUDA()
// Kernels of a header are templates so that every translation unit may instantiate them.
template <int = 0>
__global__ void __launch_bounds__(collective_threads)
    reduce_ranks_kernel(replica_sources src, int m, float* out, std::size_t n, bool mean) {
    const float divisor = static_cast<float>(m);
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
         i += std::size_t{gridDim.x} * blockDim.x) {
        float acc = src.rank[0][i];
        for (int k = 1; k < m; ++k) {
            acc += src.rank[k][i];
        }
        out[i] = mean ? acc / divisor : acc;
    }
}

template <int = 0>
__global__ void __launch_bounds__(collective_threads)
    divide_kernel(float* x, std::size_t n, float divisor) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
         i += std::size_t{gridDim.x} * blockDim.x) {
        x[i] = x[i] / divisor;
    }
}
#endif

inline unsigned grid_for(std::size_t n) {
    const std::size_t blocks = (n + collective_threads - 1) / collective_threads;
    // A grid-stride loop covers the rest; a few waves of the largest GPUs are enough.
    return static_cast<unsigned>(blocks < 8192 ? (blocks == 0 ? 1 : blocks) : 8192);
}

// Launches one of the grid-stride kernels above over n elements; returns the launch's error.
template <class... Params, class... Args>
cudaError_t launch_over(std::size_t n, cudaStream_t stream, void (*kernel)(Params...),
                        Args... args) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(grid_for(n), 1, 1);
    cfg.blockDim = dim3(collective_threads, 1, 1);
    cfg.stream = stream;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

}  // namespace detail

// out[i] = src.rank[0][i] + ... + src.rank[m-1][i] (divided by m for a mean), for i < n. `out`
// may be one of the sources (each element is read from every rank before it is written).
inline void reduce_ranks(const replica_sources& src, int m, float* out, std::size_t n,
                         comm::reduce_op op, cudaStream_t stream) {
    if (m < 1 || m > max_replicas) {
        throw invalid_argument("loco: reduce_ranks over " + std::to_string(m) +
                               " ranks; 1 to " + std::to_string(max_replicas) + " are supported");
    }
    if (n == 0) {
        return;
    }
    LOCO_CUDA_CHECK(detail::launch_over(n, stream, detail::reduce_ranks_kernel<>, src, m, out, n,
                                        op == comm::reduce_op::mean));
}

// x[i] /= divisor for i < n.
inline void divide(float* x, std::size_t n, float divisor, cudaStream_t stream) {
    if (n == 0) {
        return;
    }
    LOCO_CUDA_CHECK(detail::launch_over(n, stream, detail::divide_kernel<>, x, n, divisor));
}

}  // namespace loco::backend::cuda
