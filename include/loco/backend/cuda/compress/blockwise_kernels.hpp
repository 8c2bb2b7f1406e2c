#pragma once
// compress::blockwise<Bits, Block> on the device: encode (per-block scales by warp reductions whose
// double sums equal the host's element-order sums, see encode_stats; codes packed), decode
// (level_fractions, decode_body) and the decoder's checks (inspect_body).

#include <loco/backend/cuda/compress/codec_bodies.hpp>
#include <loco/backend/cuda/compress/device_compressor.hpp>
#include <loco/backend/cuda/compress/encode_source.hpp>
#include <loco/backend/cuda/compress/payload_plan.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/blockwise.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>
#include <loco/policy.hpp>
#include <loco/random.hpp>

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

// What a block's scale needs, accumulated element by element.
//
// Exactness of the tree sum (mean_abs). Every magnitude a of the block is a multiple of
// 2^(E' - 150), E' = max(biased exponent, 1), and below 2^(E' - 126). Let Emin and Emax be the
// smallest and largest E' over the nonzero magnitudes: every partial sum, in any order, is a
// multiple of 2^(Emin - 150) below Block * 2^(Emax - 126), hence exact in a double (53 bits) when
// Emax - Emin <= 29 - ceil(log2 Block). Exact sums do not depend on the order, so the tree then
// gives the host's element-order sum; otherwise the block is summed in element order.
struct encode_stats {
    float largest = 0.0f;
    double sum = 0.0;
    unsigned emax = 0;
    unsigned emin = 255;
    bool finite = true;

    // mean_abs is the same in every lane (a launch argument), so its branches do not diverge.
    __device__ __forceinline__ void add(float x, bool mean_abs) {
        const float a = math::abs(x);
        finite = finite && math::isfinite(a);
        largest = a > largest ? a : largest;
        if (mean_abs) {
            sum += static_cast<double>(a);
            const unsigned biased = __float_as_uint(a) >> 23;
            if (a != 0.0f && biased < 255u) {
                const unsigned e = biased > 1u ? biased : 1u;
                emax = e > emax ? e : emax;
                emin = e < emin ? e : emin;
            }
        }
    }
    template <unsigned G>
    __device__ __forceinline__ void reduce(bool mean_abs) {
        largest = group_max<G>(largest);
        finite = group_umin<G>(finite ? 1u : 0u) != 0u;
        if (mean_abs) {
            sum = group_sum<G>(sum);
            emax = group_umax<G>(emax);
            emin = group_umin<G>(emin);
        }
    }
    // After reduce(): the tree sum may differ from the element-order sum.
    __device__ __forceinline__ bool inexact(bool mean_abs, int exact_span) const {
        return mean_abs && finite && emax != 0u &&
               static_cast<int>(emax) - static_cast<int>(emin) > exact_span;
    }
    __device__ __forceinline__ float scale(bool mean_abs, std::uint64_t n) const {
        if (!finite) {
            return __uint_as_float(0x7fc00000u);
        }
        return mean_abs ? static_cast<float>(sum / static_cast<double>(n)) : largest;
    }
};

// Writes the Bits bytes of 8 codes of elements j0 .. j0 + 7 (j0 a multiple of 8), skipping the
// pieces at or past `bytes` (the segment's code bytes, a multiple of 4).
template <int Bits>
__device__ __forceinline__ void store_codes8(std::byte* codes, std::uint64_t j0,
                                             std::uint64_t bytes, std::uint64_t packed) {
    const std::uint64_t at = j0 / 8 * static_cast<unsigned>(Bits);
    if constexpr (Bits == 1) {
        if (at < bytes) {
            reinterpret_cast<unsigned char*>(codes)[at] = static_cast<unsigned char>(packed);
        }
    } else if constexpr (Bits == 2) {
        if (at < bytes) {
            *reinterpret_cast<std::uint16_t*>(codes + at) = static_cast<std::uint16_t>(packed);
        }
    } else if constexpr (Bits == 4) {
        if (at < bytes) {
            *reinterpret_cast<std::uint32_t*>(codes + at) = static_cast<std::uint32_t>(packed);
        }
    } else {
        if (at < bytes) {
            *reinterpret_cast<std::uint32_t*>(codes + at) = static_cast<std::uint32_t>(packed);
        }
        if (at + 4 < bytes) {
            *reinterpret_cast<std::uint32_t*>(codes + at + 4) =
                static_cast<std::uint32_t>(packed >> 32);
        }
    }
}

// ---- blockwise encode --------------------------------------------------------------------------

// Fast path: one unit (Block > 256: one block; else 256 elements, 256 / Block blocks) in a warp.
template <int Bits, std::size_t Block, class Src>
__device__ __forceinline__ void blockwise_unit(const Src& src, std::byte* seg,
                                               std::uint64_t blocks, std::uint64_t unit_first,
                                               std::uint64_t flat, const encode_params& a,
                                               std::uint64_t stream, unsigned lane) {
    using codec = compress::blockwise<Bits, Block>;
    using L = blockwise_layout<Bits, Block>;
    constexpr unsigned C = L::chunks;
    constexpr unsigned G = L::group_lanes;
    const bool mean_abs = (a.flags & flag_mean_abs) != 0;
    const bool stochastic = (a.flags & flag_stochastic) != 0;
    const std::uint64_t n = src.n;

    float e[C][8];
#pragma unroll
    for (unsigned c = 0; c < C; ++c) {
        src.load8(unit_first + c * 256 + 8 * lane, e[c]);
    }
    encode_stats st;
#pragma unroll
    for (unsigned c = 0; c < C; ++c) {
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            st.add(e[c][r], mean_abs);
        }
    }
    st.reduce<G>(mean_abs);
    const unsigned group_base = lane / G * G;
    const std::uint64_t block_first = unit_first + (Block >= 256 ? 0 : lane / G * Block);
    const bool exists = block_first < n;
    const std::uint64_t block_n = exists ? min_u64(Block, n - block_first) : 1;
    const bool inexact = st.inexact(mean_abs, L::exact_span);
    if (__any_sync(full_mask, inexact)) {
        // Element order: chunk, then lane, then the lane's 8 elements.
        double ordered = 0.0;
#pragma unroll
        for (unsigned c = 0; c < C; ++c) {
            for (unsigned s = 0; s < G; ++s) {
#pragma unroll
                for (int r = 0; r < 8; ++r) {
                    const float v = __shfl_sync(full_mask, math::abs(e[c][r]),
                                                static_cast<int>(group_base + s));
                    ordered += static_cast<double>(v);
                }
            }
        }
        if (inexact) {
            st.sum = ordered;
        }
    }
    const float scale = st.scale(mean_abs, block_n);
    if (exists && lane == group_base) {
        reinterpret_cast<float*>(seg)[block_first / Block] = scale;
    }
    std::byte* codes = seg + 4 * blocks;
    const std::uint64_t bytes = code_bytes<Bits>(n);
#pragma unroll
    for (unsigned c = 0; c < C; ++c) {
        const std::uint64_t j0 = unit_first + c * 256 + 8 * lane;
        std::uint64_t packed = 0;
        float next[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const std::uint64_t j = j0 + static_cast<unsigned>(r);
            unsigned k = 0;
            next[r] = 0.0f;
            if (j < n) {
                const float u = stochastic ? random::uniform(a.seed, stream, flat + j) : 0.0f;
                k = codec::code(e[c][r], scale, stochastic, u);
                next[r] = __fsub_rn(e[c][r], codec::level(scale, k));
            }
            packed |= static_cast<std::uint64_t>(k) << (r * Bits);
        }
        src.store8(j0, next);
        store_codes8<Bits>(codes, j0, bytes, packed);
    }
}

// Generic path: block b of the tensor in one warp; inputs read twice; codes ORed into words of
// the zeroed payload.
template <int Bits, std::size_t Block, class Src>
__device__ __forceinline__ void blockwise_block(const Src& src, std::byte* seg,
                                                std::uint64_t blocks, std::uint64_t b,
                                                std::uint64_t flat, const encode_params& a,
                                                std::uint64_t stream, unsigned lane) {
    using codec = compress::blockwise<Bits, Block>;
    using L = blockwise_layout<Bits, Block>;
    const bool mean_abs = (a.flags & flag_mean_abs) != 0;
    const bool stochastic = (a.flags & flag_stochastic) != 0;
    const std::uint64_t first = b * Block;
    const std::uint64_t count = min_u64(Block, src.n - first);
    encode_stats st;
    for (std::uint64_t j = lane; j < count; j += 32) {
        st.add(src.load1(first + j), mean_abs);
    }
    st.reduce<32>(mean_abs);
    if (st.inexact(mean_abs, L::exact_span)) {  // the same in every lane
        double ordered = 0.0;
        if (lane == 0) {
            for (std::uint64_t j = 0; j < count; ++j) {
                ordered += static_cast<double>(math::abs(src.load1(first + j)));
            }
        }
        st.sum = __shfl_sync(full_mask, ordered, 0);
    }
    const float scale = st.scale(mean_abs, count);
    if (lane == 0) {
        reinterpret_cast<float*>(seg)[b] = scale;
    }
    auto* words = reinterpret_cast<unsigned*>(seg + 4 * blocks);
    for (std::uint64_t j = lane; j < count; j += 32) {
        const std::uint64_t at = first + j;
        const float e = src.load1(at);
        const float u = stochastic ? random::uniform(a.seed, stream, flat + at) : 0.0f;
        const unsigned k = codec::code(e, scale, stochastic, u);
        if (k != 0) {
            const std::uint64_t bit = at * static_cast<unsigned>(Bits);
            atomicOr(words + bit / 32, k << (bit % 32));
        }
        src.store1(at, __fsub_rn(e, codec::level(scale, k)));
    }
}

template <int Bits, std::size_t Block>
struct encode_body<compress::blockwise<Bits, Block>> {
    template <class Src>
    __device__ __forceinline__ static void run(const Src& src, const compress_item& item,
                                               std::byte* seg, std::uint64_t blocks,
                                               std::uint64_t flat, const encode_params& a,
                                               std::uint64_t stream) {
        using L = blockwise_layout<Bits, Block>;
        const unsigned warp = threadIdx.x / 32;
        const unsigned lane = threadIdx.x % 32;
        constexpr unsigned warps = block_threads / 32;
        if constexpr (L::fast) {
            const std::uint64_t units = (item.count + L::unit - 1) / L::unit;
            for (std::uint64_t u = warp; u < units; u += warps) {
                blockwise_unit<Bits, Block>(src, seg, blocks, item.first + u * L::unit, flat, a,
                                            stream, lane);
            }
        } else {
            const std::uint64_t first = item.first / Block;
            const std::uint64_t count = (item.count + Block - 1) / Block;
            for (std::uint64_t q = warp; q < count; q += warps) {
                blockwise_block<Bits, Block>(src, seg, blocks, first + q, flat, a, stream, lane);
            }
        }
    }
};

// The quotients of blockwise::level (see level_fractions in codec_bodies.hpp).
template <int Bits, std::size_t Block>
struct level_fractions<compress::blockwise<Bits, Block>> {
    using codec = compress::blockwise<Bits, Block>;
    static constexpr unsigned count = codec::top_code + 1;
    // By the whole CTA; a __syncthreads() must follow before use.
    __device__ __forceinline__ static void fill(float* f) {
        for (unsigned k = threadIdx.x; k < count; k += block_threads) {
            const int numerator = 2 * static_cast<int>(k) - static_cast<int>(codec::top_code);
            f[k] = static_cast<float>(numerator) / static_cast<float>(codec::top_code);
        }
    }
};

template <int Bits, std::size_t Block>
struct decode_body<compress::blockwise<Bits, Block>> {
    using codec = compress::blockwise<Bits, Block>;

    // E consecutive codes from element j (a multiple of E), packed as in the payload.
    template <int E>
    __device__ __forceinline__ static std::uint64_t codes(const std::byte* c, std::uint64_t j) {
        constexpr int bits = E * Bits;
        const std::uint64_t bit = j * static_cast<unsigned>(Bits);
        if constexpr (bits <= 8) {
            const unsigned byte = reinterpret_cast<const unsigned char*>(c)[bit / 8];
            return (byte >> (bit % 8)) & ((1u << bits) - 1u);
        } else if constexpr (bits == 16) {
            return *reinterpret_cast<const std::uint16_t*>(c + bit / 8);
        } else if constexpr (bits == 32) {
            return *reinterpret_cast<const std::uint32_t*>(c + bit / 8);
        } else {
            const auto* w = reinterpret_cast<const std::uint32_t*>(c + bit / 8);
            return static_cast<std::uint64_t>(w[0]) | (static_cast<std::uint64_t>(w[1]) << 32);
        }
    }

    // The decoded values of elements j .. j + E - 1 of one payload's segment: codec::level.
    template <int E>
    __device__ __forceinline__ static void values(const std::byte* seg, std::uint64_t blocks,
                                                  std::uint64_t, std::uint64_t j, float* v,
                                                  const float* fractions) {
        const auto* scales = reinterpret_cast<const float*>(seg);
        const std::uint64_t packed = codes<E>(seg + 4 * blocks, j);
        constexpr unsigned mask = (1u << Bits) - 1u;
        if constexpr (Block % E == 0) {
            const float s = scales[j / Block];
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const unsigned k = static_cast<unsigned>(packed >> (e * Bits)) & mask;
                v[e] = __fmul_rn(s, fractions[k]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const float s = scales[(j + static_cast<unsigned>(e)) / Block];
                const unsigned k = static_cast<unsigned>(packed >> (e * Bits)) & mask;
                v[e] = __fmul_rn(s, fractions[k]);
            }
        }
    }
};

template <int Bits, std::size_t Block>
struct inspect_body<compress::blockwise<Bits, Block>> {
    using codec = compress::blockwise<Bits, Block>;

    // Codes [from, to) of a segment all equal `want`.
    __device__ static bool codes_are(const std::byte* codes, std::uint64_t from, std::uint64_t to,
                                     unsigned want) {
        for (std::uint64_t j = from; j < to; ++j) {
            if (compress::wire::unpack<Bits>(codes, j) != want) {
                return false;
            }
        }
        return true;
    }

    // Thread per block: the checks of blockwise::decode, and whether the average is finite.
    __device__ static void run(const compress_item& item, const tensor_desc& d,
                               const compress_tensor& ct, const gathered_payloads& g,
                               const verdict_view& v, const float* fractions) {
        const std::uint64_t n = d.size;
        const std::uint64_t first = item.first / Block;
        const std::uint64_t count = (item.count + Block - 1) / Block;
        const std::byte* base = g.base + compress::wire::header_bytes + ct.body;
        for (std::uint64_t q = threadIdx.x; q < count; q += block_threads) {
            const std::uint64_t b = first + q;
            const std::uint64_t from = b * Block;
            const std::uint64_t to = min_u64(n, from + Block);
            bool any_nan = false;
            double scales = 0.0;
            for (std::uint32_t k = 0; k < g.ranks; ++k) {
                const std::byte* seg = base + k * g.stride;
                const std::byte* codes = seg + 4 * ct.blocks;
                const std::uint32_t bits = reinterpret_cast<const std::uint32_t*>(seg)[b];
                if (bits >= 0x7f800000u && bits != codec::nan_scale_bits) {
                    atomicOr(v.flags + k, bad_scale);
                } else if (bits == 0u || bits == codec::nan_scale_bits) {
                    any_nan = any_nan || bits != 0u;
                    if (!codes_are(codes, from, to, codec::zero_code())) {
                        atomicOr(v.flags + k, bad_zero_codes);
                    }
                } else {
                    scales += static_cast<double>(__uint_as_float(bits));
                }
                if (b + 1 == ct.blocks) {  // the segment's last bytes
                    constexpr std::uint64_t per_byte = 8 / Bits;
                    const std::uint64_t packed = compress::wire::packed_bytes<Bits>(n);
                    if (!codes_are(codes, n, packed * per_byte, 0u)) {
                        atomicOr(v.flags + k, bad_padding_bits);
                    }
                    for (std::uint64_t i = packed; i < code_bytes<Bits>(n); ++i) {
                        if (codes[i] != std::byte{0}) {
                            atomicOr(v.flags + k, bad_padding_bytes);
                        }
                    }
                }
            }
            // Every element of a block with a NaN scale is NaN. Otherwise |level| <= scale, so a
            // running fp32 sum stays below (sum of scales) (1 + 2^-24)^M: finite unless the
            // scales are huge, which is checked element by element.
            if (any_nan) {
                atomicMin(v.nonfinite, d.flat_offset + from);
            } else if (scales >= 0x1.0p125) {
                for (std::uint64_t j = from; j < to; ++j) {
                    float avg;
                    average<codec, 1>(g, ct.body, ct.blocks, 0, j, &avg, fractions);
                    if (!math::isfinite(avg)) {
                        atomicMin(v.nonfinite, d.flat_offset + j);
                        break;
                    }
                }
            }
        }
    }
};

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

}  // namespace loco::backend::cuda
