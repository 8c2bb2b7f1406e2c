#pragma once
// What each codec supplies to the generic kernels (encode.hpp, decode.hpp, payload_check.hpp):
// encode_body<Codec>::run (a CTA's work item), decode_body<Codec>::values (E decoded values of one
// payload), inspect_body<Codec>::run (the decoder's format checks of a work item) and
// level_fractions<Codec> (tables in shared memory). blockwise_kernels.hpp, cast_kernels.hpp and
// statistical_kernels.hpp hold the specialisations. Here too: the rank-order average every decoder
// shares, and the verdict a payload check fills.

#include <loco/backend/cuda/compress/payload_header.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
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

// Verdict bits of one rank's payload (blockwise).
inline constexpr unsigned long long bad_scale = 1u;
inline constexpr unsigned long long bad_zero_codes = 2u;
inline constexpr unsigned long long bad_padding_bits = 4u;
inline constexpr unsigned long long bad_padding_bytes = 8u;
inline constexpr unsigned long long bad_unused_bin = 16u;  // statistical

}  // namespace detail

namespace detail {

// verdict layout (unsigned long long): [0, M) checksum sums, [M, 2M) flags, [2M] the smallest
// flat index of a non-finite average (no_nonfinite when none).
struct verdict_view {
    unsigned long long* sums;
    unsigned long long* flags;
    unsigned long long* nonfinite;
};

}  // namespace detail

namespace detail {

#if LOCO_HAS_CUDA()

template <class Codec>
struct encode_body;

template <class Codec>
struct decode_body;

// blockwise::level(s, k) is s * (float(2k - L) / float(L)): one division per decoded value. The
// decoders look the quotients up instead (computed by the same IEEE division, so the products
// are the same bits), in shared memory: `fractions` holds L + 1 floats.
template <class Codec>
struct level_fractions {
    static constexpr unsigned count = 1;
    __device__ __forceinline__ static void fill(float*) {}
};

template <class Codec>
struct inspect_body;

// The average over the ranks of elements j .. j + E - 1: an fp32 sum in rank order from 0, then
// one division, as the host exchanger computes it. (For M a power of two the division is a
// multiplication by the exact 1/M: the same correctly rounded value.)
template <class Codec, int E>
__device__ __forceinline__ void average(const gathered_payloads& g, std::uint64_t body,
                                        std::uint64_t blocks, std::uint64_t cols, std::uint64_t j,
                                        float* avg, const float* fractions) {
    float sum[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        sum[e] = 0.0f;
    }
    const std::byte* seg = g.base + compress::wire::header_bytes + body;
    for (std::uint32_t k = 0; k < g.ranks; ++k) {
        float v[E];
        decode_body<Codec>::template values<E>(seg + k * g.stride, blocks, cols, j, v, fractions);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            sum[e] = __fadd_rn(sum[e], v[e]);
        }
    }
    const float m = static_cast<float>(g.ranks);
    if ((g.ranks & (g.ranks - 1)) == 0) {
        const float inverse = 1.0f / m;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            avg[e] = __fmul_rn(sum[e], inverse);
        }
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
            avg[e] = sum[e] / m;
        }
    }
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

}  // namespace loco::backend::cuda
