#pragma once
// Streaming DiLoCo's merge on the device: local <- lerp(global, local, alpha) over a table, with
// torch.lerp's two formulas (the host's, include/loco/backend/host/diloco_engine.hpp), rounded
// step by step (no contraction into an FMA) so that host and GPU agree bit for bit. alpha = 0 is
// scatter_values (elementwise.hpp); this kernel serves 0 < alpha <= 1.
//
// `local` is the parameter's authoritative fp32 value (its master for bf16 values with masters),
// or `local_copy` (padded layout) when the caller saved it before an outer step overwrote the
// parameters with the new global values.

#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/table.hpp>

#include <cuda_runtime.h>

namespace loco::backend::cuda {
namespace detail {

#if LOCO_HAS_CUDA()

__device__ __forceinline__ float lerp_rn(float g, float x, float alpha) {
    if (alpha < 0.5f) return __fadd_rn(g, __fmul_rn(alpha, __fsub_rn(x, g)));
    return __fsub_rn(x, __fmul_rn(__fsub_rn(x, g), __fsub_rn(1.0f, alpha)));
}

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    merge_kernel(table_view t, const float* global, float* master, const float* local_copy,
                 float alpha) {
    __shared__ resolved_segment segs[max_segments_per_block];
    const std::uint32_t count = stage_segments(t, segs);
    for (std::uint32_t q = 0; q < count; ++q) {
        const resolved_segment r = segs[q];
        const bool bf = (r.combo & 1u) != 0;
        for (std::uint32_t i = threadIdx.x; i < r.len; i += block_threads) {
            float x;
            if (local_copy != nullptr) {
                x = local_copy[r.padded + i];
            } else if (bf) {
                x = master != nullptr ? master[r.master + i]
                                      : widen(static_cast<const loco::bf16*>(r.value)[i]);
            } else {
                x = static_cast<const float*>(r.value)[i];
            }
            const float y = lerp_rn(global[r.padded + i], x, alpha);
            if (bf) {
                if (master != nullptr) master[r.master + i] = y;
                static_cast<loco::bf16*>(r.value)[i] = narrow<loco::bf16>(y);
            } else {
                static_cast<float*>(r.value)[i] = y;
            }
        }
    }
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

// The parameters (and masters of bf16 values) := lerp(global, local, alpha), see the top.
inline void merge_values(const tensor_table& table, const float* global, float* master,
                         const float* local_copy, float alpha, cudaStream_t stream) {
    constexpr const char* what = "cuda::merge_values";
    detail::require_device(table, what);
    detail::require_pointer(global, table.padded_elements(), "global", what);
    if (local_copy != nullptr) {
        detail::require_pointer(local_copy, table.padded_elements(), "local copy", what);
    }
    LOCO_CUDA_CHECK(detail::launch(detail::merge_kernel<>, table.blocks(), stream, table.view(),
                                   global, master, local_copy, alpha));
}

}  // namespace loco::backend::cuda
