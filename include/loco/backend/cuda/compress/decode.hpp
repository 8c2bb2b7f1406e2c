#pragma once
// decode_average() and decode_average_apply(): the M gathered payloads decoded and averaged in
// rank order (the host exchanger's fp32 sums), and in one kernel with phase 2 of the outer step.

#include <loco/backend/cuda/compress/blockwise_kernels.hpp>
#include <loco/backend/cuda/compress/cast_kernels.hpp>
#include <loco/backend/cuda/compress/codec_bodies.hpp>
#include <loco/backend/cuda/compress/payload_plan.hpp>
#include <loco/backend/cuda/compress/statistical_kernels.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>
#include <loco/policy.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace loco::backend::cuda {

namespace detail {

#if LOCO_HAS_CUDA()

// A table segment with its place in the payload.
struct apply_segment {
    resolved_segment r;
    std::uint64_t begin;   // element of the tensor at the segment's start
    std::uint64_t body;    // the tensor's segment in the payload body
    std::uint64_t blocks;
    std::uint64_t cols;
};

__device__ __forceinline__ std::uint32_t stage_apply_segments(const table_view& t,
                                                              const compress_view& p,
                                                              apply_segment* out) {
    const std::uint32_t first = t.block_first[blockIdx.x];
    const std::uint32_t count = t.block_first[blockIdx.x + 1] - first;
    if (threadIdx.x < count) {
        const segment s = t.segments[first + threadIdx.x];
        const tensor_desc d = t.tensors[s.tensor];
        const compress_tensor ct = p.tensors[s.tensor];
        apply_segment a;
        a.r = resolve_segment(s, d);
        a.r.grad = nullptr;  // the apply reads no gradient
        a.begin = s.begin;
        a.body = ct.body;
        a.blocks = ct.blocks;
        a.cols = ct.cols;
        out[threadIdx.x] = a;
    }
    __syncthreads();
    return count;
}

// decode_average: out = the average, padded layout (padding 0).
template <class Codec>
__device__ __forceinline__ void store_average(const apply_segment& s, const gathered_payloads& g,
                                              float* out, const float* fractions) {
    constexpr int E = 4;
    float* __restrict__ o = out + s.r.padded;
    const std::uint32_t n = s.r.len;
    const std::uint32_t vec_end = n / E * E;
    for (std::uint32_t i = threadIdx.x * E; i < vec_end; i += block_threads * E) {
        float avg[E];
        average<Codec, E>(g, s.body, s.blocks, s.cols, s.begin + i, avg, fractions);
        store_vec<E>(o + i, avg);
    }
    for (std::uint32_t i = vec_end + threadIdx.x; i < s.r.span; i += block_threads) {
        float avg = 0.0f;
        if (i < n) {
            average<Codec, 1>(g, s.body, s.blocks, s.cols, s.begin + i, &avg, fractions);
        }
        o[i] = avg;
    }
}

template <class Codec>
__global__ void __launch_bounds__(block_threads)
    decode_average_kernel(table_view t, compress_view p, gathered_payloads g, float* out) {
    __shared__ apply_segment segs[max_segments_per_block];
    __shared__ float fractions[level_fractions<Codec>::count];
    level_fractions<Codec>::fill(fractions);
    const std::uint32_t count = stage_apply_segments(t, p, segs);  // (synchronises)
    for (std::uint32_t q = 0; q < count; ++q) {
        store_average<Codec>(segs[q], g, out, fractions);
    }
}

template <class Outer>
struct apply_args {
    const typename Outer::hyper* hyper;
    step_control* control;
    float* global;
    float* state;
    float* master;
    const std::uint64_t* skip_if;  // the verdict's first non-finite index, or null: never skip
};

// The averaged delta decode_average_apply hands update_segment (elementwise.hpp): the average
// of the payloads at element i of the segment, decoded instead of read from memory.
template <class Codec>
struct delta_from_payloads {
    const gathered_payloads& g;
    const apply_segment& s;
    const float* fractions;
    template <int E>
    __device__ __forceinline__ void read(std::uint32_t i, float* d) const {
        average<Codec, E>(g, s.body, s.blocks, s.cols, s.begin + i, d, fractions);
    }
};

template <class Codec, class Outer, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads, min_blocks_per_sm)
    apply_kernel(table_view t, compress_view p, gathered_payloads g, apply_args<Outer> a) {
    __shared__ apply_segment segs[max_segments_per_block];
    __shared__ float fractions[level_fractions<Codec>::count];
    const bool skip = a.skip_if != nullptr && *a.skip_if != no_nonfinite;
    const std::uint64_t step = a.control->steps + 1;
    const typename Outer::hyper h = *a.hyper;
    level_fractions<Codec>::fill(fractions);
    const std::uint32_t count = stage_apply_segments(t, p, segs);  // (synchronises)
    const auto k = Outer::prepare(h, step);
    for (std::uint32_t q = 0; q < count; ++q) {
        const apply_segment s = segs[q];
        const delta_from_payloads<Codec> delta{g, s, fractions};
        if (s.r.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                update_segment<Outer, Mode, loco::bf16>(s.r, k, a.global, delta, a.state,
                                                        a.master, t.padded_total, skip);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                update_segment<Outer, Mode, float>(s.r, k, a.global, delta, a.state, a.master,
                                                   t.padded_total, skip);
            }
        }
    }
    finish_block(a.control, skip);
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

// ---- decode ------------------------------------------------------------------------------------

// out := the average of M payloads (gathered: M payloads of plan.payload_bytes() each, rank
// order), fp32 in rank order, padded layout, padding 0. The payloads must have passed
// payload_check (malformed ones decode to garbage, never out of bounds).
template <class Codec>
void decode_average(const compress_plan<Codec>& plan, const tensor_table& table,
                    const std::byte* gathered, int ranks, float* out, cudaStream_t stream) {
    constexpr const char* what = "cuda::decode_average";
    detail::require_plan(plan, table, what);
    detail::require_payload_pointer(gathered, "gathered payloads", what);
    detail::require_pointer(out, table.padded_elements(), "out", what);
    if (ranks < 1) {
        throw invalid_argument("loco: cuda::decode_average needs at least one payload");
    }
    const gathered_payloads g{gathered, plan.payload_bytes(), static_cast<std::uint32_t>(ranks),
                              0};
#if LOCO_HAS_CUDA()
    LOCO_CUDA_CHECK(detail::launch(detail::decode_average_kernel<Codec>, table.blocks(), stream,
                                   table.view(), plan.view(), g, out));
#else
    static_cast<void>(g);
    static_cast<void>(stream);
#endif
}

// Phase 2 of a compressed sync in one kernel: the average of the M payloads (as decode_average),
// then outer_apply's work: Outer::update of global and state, the new global values written to
// the parameters (bf16: rounded to nearest) and to the masters of bf16 values. With skip_if
// non-null and *skip_if != no_nonfinite (payload_check::nonfinite()), only the write-back of the
// unchanged global values happens and the skipped count advances.
template <class Codec, class Outer, bf16_update Mode = bf16_update::master,
          unsigned Combos = combos::all>
void decode_average_apply(const compress_plan<Codec>& plan, const tensor_table& table,
                          const std::byte* gathered, int ranks, float* global, float* state,
                          float* master, const typename Outer::hyper* hyper,
                          step_control* control, const std::uint64_t* skip_if,
                          cudaStream_t stream) {
    static_assert(elementwise_optimizer<Outer>);
    constexpr const char* what = "cuda::decode_average_apply";
    detail::require_plan(plan, table, what);
    detail::require_combos(table, Combos, what);
    detail::require_payload_pointer(gathered, "gathered payloads", what);
    detail::require_pointer(global, table.padded_elements(), "global", what);
    detail::require_pointer(state,
                            static_cast<std::size_t>(Outer::state_size) * table.padded_elements(),
                            "state", what);
    if constexpr (Mode == bf16_update::master) {
        detail::require_pointer(master, table.master_elements(), "master", what);
    }
    detail::require_pointer(hyper, 1, "hyper", what);
    detail::require_pointer(control, 1, "control", what);
    if (ranks < 1) {
        throw invalid_argument("loco: cuda::decode_average_apply needs at least one payload");
    }
    const gathered_payloads g{gathered, plan.payload_bytes(), static_cast<std::uint32_t>(ranks),
                              0};
    detail::apply_args<Outer> a{hyper, control, global, state, master, skip_if};
#if LOCO_HAS_CUDA()
    LOCO_CUDA_CHECK(detail::launch(detail::apply_kernel<Codec, Outer, Mode, Combos>,
                                   table.blocks(), stream, table.view(), plan.view(), g, a));
#else
    static_cast<void>(g);
    static_cast<void>(a);
    static_cast<void>(stream);
#endif
}

}  // namespace loco::backend::cuda
