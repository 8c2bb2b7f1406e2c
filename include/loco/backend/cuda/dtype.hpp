#pragma once
// Element types of the tensors the CUDA kernels read and write, and their conversions.
//
// Storage types are float and loco::bf16 (float16.hpp). Arithmetic is always float: a bf16 value
// is widened exactly on load and rounded on store. Rounding to nearest uses loco::bf16::from_float,
// the integer-only conversion the host also uses, so the device writes the very bits the host
// oracle computes (the hardware instruction differs from it on NaN payloads).
//
// 16-byte vectors: 4 floats or 8 bf16 per access. The vector paths require 16-byte aligned
// addresses; the callers guarantee it (see table.hpp) and fall back to scalar accesses otherwise.

#include <loco/config.hpp>
#include <loco/float16.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace loco::backend::cuda {

enum class dtype : unsigned char { f32, bf16 };

constexpr std::size_t size_of(dtype t) noexcept { return t == dtype::f32 ? 4 : 2; }
constexpr std::string_view to_string(dtype t) noexcept { return t == dtype::f32 ? "fp32" : "bf16"; }

template <class T>
inline constexpr bool is_storage_type = std::is_same_v<T, float> || std::is_same_v<T, loco::bf16>;

template <class T>
    requires is_storage_type<T>
inline constexpr dtype dtype_of = std::is_same_v<T, float> ? dtype::f32 : dtype::bf16;

// The (parameter dtype, gradient dtype) pairs a kernel is compiled for, as a bit set: a template
// argument, so that a model with only fp32 tensors compiles (and spends registers on) only the
// fp32 body. A table whose pairs are not all in the set is refused when launched.
namespace combos {
inline constexpr unsigned f32_f32 = 1u << 0;    // fp32 parameters, fp32 gradients
inline constexpr unsigned bf16_f32 = 1u << 1;   // bf16 parameters, fp32 gradients
inline constexpr unsigned f32_bf16 = 1u << 2;   // fp32 parameters, bf16 gradients
inline constexpr unsigned bf16_bf16 = 1u << 3;  // bf16 parameters, bf16 gradients
inline constexpr unsigned all = 0xfu;
}  // namespace combos

constexpr unsigned combo_index(dtype value, dtype grad) noexcept {
    return (value == dtype::bf16 ? 1u : 0u) + (grad == dtype::bf16 ? 2u : 0u);
}
constexpr unsigned combo_bit(dtype value, dtype grad) noexcept {
    return 1u << combo_index(value, grad);
}

// How bf16 parameters are updated by the inner step (a template argument of the kernels).
enum class bf16_update : unsigned char {
    // An fp32 master copy of every bf16 parameter is kept as one more state array (as llm.c does);
    // the update runs on the master and the bf16 tensor receives the master rounded to nearest.
    // Exact fp32 training at +4 bytes of memory and +8 bytes of traffic per parameter and step.
    master,
    // No master: the update runs on the widened bf16 value and is rounded stochastically, with
    // random bits that are a pure function of (seed, step, flat element index), so a run repeats
    // exactly and does not depend on the launch geometry. Unbiased in expectation.
    stochastic
};

// Stochastic rounding of f to bf16: adds 16 random bits below bf16's last fraction bit and
// truncates, so f rounds up with probability equal to its distance from the bf16 value below.
// Infinities and NaN go through the ordinary conversion. A finite f within one bf16 step of the
// largest finite bf16 may round to infinity, with that same probability.
LOCO_HD loco::bf16 round_stochastic(float f, std::uint32_t random) noexcept {
    const std::uint32_t u = loco::detail::float_bits(f);
    if ((u & 0x7fffffffu) >= 0x7f800000u) {
        return loco::bf16::from_float(f);
    }
    return {static_cast<std::uint16_t>((u + (random & 0xffffu)) >> 16)};
}

namespace detail {

LOCO_HD float widen(float x) noexcept { return x; }
LOCO_HD float widen(loco::bf16 x) noexcept { return x.to_float(); }

template <class T>
LOCO_HD T narrow(float x) noexcept {
    if constexpr (std::is_same_v<T, float>) {
        return x;
    } else {
        return loco::bf16::from_float(x);
    }
}

#if LOCO_HAS_CUDA()
// Element type -> elements per 16-byte vector.
template <class T>
inline constexpr int per_vector = static_cast<int>(16 / sizeof(T));

__device__ __forceinline__ float bf16_lo(std::uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(std::uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
    return static_cast<std::uint32_t>(loco::bf16::from_float(lo).bits) |
           (static_cast<std::uint32_t>(loco::bf16::from_float(hi).bits) << 16);
}

__device__ __forceinline__ void unpack8(const uint4 x, float* v, int at) {
    v[at + 0] = bf16_lo(x.x);
    v[at + 1] = bf16_hi(x.x);
    v[at + 2] = bf16_lo(x.y);
    v[at + 3] = bf16_hi(x.y);
    v[at + 4] = bf16_lo(x.z);
    v[at + 5] = bf16_hi(x.z);
    v[at + 6] = bf16_lo(x.w);
    v[at + 7] = bf16_hi(x.w);
}
__device__ __forceinline__ void unpack4(const uint2 x, float* v, int at) {
    v[at + 0] = bf16_lo(x.x);
    v[at + 1] = bf16_hi(x.x);
    v[at + 2] = bf16_lo(x.y);
    v[at + 3] = bf16_hi(x.y);
}

// Vector k of type V from p: a plain load, or through the read-only data path (ReadOnly).
template <bool ReadOnly, class V>
__device__ __forceinline__ V load_word(const void* p, int k) {
    const V* w = static_cast<const V*>(p) + k;
    if constexpr (ReadOnly) {
        return __ldg(w);
    } else {
        return *w;
    }
}

// E consecutive elements from a 16-byte aligned address, widened to float.
template <int E, bool ReadOnly = false>
__device__ __forceinline__ void load_vec(const float* p, float* v) {
    static_assert(E % 4 == 0);
#pragma unroll
    for (int k = 0; k < E / 4; ++k) {
        const float4 x = load_word<ReadOnly, float4>(p, k);
        v[4 * k + 0] = x.x;
        v[4 * k + 1] = x.y;
        v[4 * k + 2] = x.z;
        v[4 * k + 3] = x.w;
    }
}
template <int E, bool ReadOnly = false>
__device__ __forceinline__ void load_vec(const loco::bf16* p, float* v) {
    static_assert(E % 4 == 0);
    if constexpr (E % 8 == 0) {
#pragma unroll
        for (int k = 0; k < E / 8; ++k) {
            unpack8(load_word<ReadOnly, uint4>(p, k), v, 8 * k);
        }
    } else {
#pragma unroll
        for (int k = 0; k < E / 4; ++k) {
            unpack4(load_word<ReadOnly, uint2>(p, k), v, 4 * k);
        }
    }
}
// The same through the read-only data path, for inputs no kernel thread writes (gradients).
template <int E, class T>
__device__ __forceinline__ void load_vec_ro(const T* p, float* v) {
    load_vec<E, true>(p, v);
}

// E floats to a 16-byte aligned address, rounded to nearest for bf16.
template <int E>
__device__ __forceinline__ void store_vec(float* p, const float* v) {
    static_assert(E % 4 == 0);
#pragma unroll
    for (int k = 0; k < E / 4; ++k) {
        reinterpret_cast<float4*>(p)[k] =
            make_float4(v[4 * k + 0], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
    }
}
template <int E>
__device__ __forceinline__ void store_vec(loco::bf16* p, const float* v) {
    static_assert(E % 4 == 0);
    if constexpr (E % 8 == 0) {
#pragma unroll
        for (int k = 0; k < E / 8; ++k) {
            reinterpret_cast<uint4*>(p)[k] = make_uint4(
                pack_bf16(v[8 * k + 0], v[8 * k + 1]), pack_bf16(v[8 * k + 2], v[8 * k + 3]),
                pack_bf16(v[8 * k + 4], v[8 * k + 5]), pack_bf16(v[8 * k + 6], v[8 * k + 7]));
        }
    } else {
#pragma unroll
        for (int k = 0; k < E / 4; ++k) {
            reinterpret_cast<uint2*>(p)[k] =
                make_uint2(pack_bf16(v[4 * k + 0], v[4 * k + 1]), pack_bf16(v[4 * k + 2], v[4 * k + 3]));
        }
    }
}
// E bf16 values already rounded (stochastic rounding), to a 16-byte aligned address.
template <int E>
__device__ __forceinline__ void store_vec_bits(loco::bf16* p, const std::uint16_t* b) {
    static_assert(E % 4 == 0);
    const auto pair = [&](int i) {
        return static_cast<std::uint32_t>(b[i]) | (static_cast<std::uint32_t>(b[i + 1]) << 16);
    };
    if constexpr (E % 8 == 0) {
#pragma unroll
        for (int k = 0; k < E / 8; ++k) {
            reinterpret_cast<uint4*>(p)[k] =
                make_uint4(pair(8 * k + 0), pair(8 * k + 2), pair(8 * k + 4), pair(8 * k + 6));
        }
    } else {
#pragma unroll
        for (int k = 0; k < E / 4; ++k) {
            reinterpret_cast<uint2*>(p)[k] = make_uint2(pair(4 * k + 0), pair(4 * k + 2));
        }
    }
}
#endif  // LOCO_HAS_CUDA()

}  // namespace detail
}  // namespace loco::backend::cuda
