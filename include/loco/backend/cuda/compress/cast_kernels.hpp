#pragma once
// compress::cast<bf16 | fp16> on the device: encode, decode and the decoder's check (a cast
// payload is always well formed; the check finds non-finite averages).

#include <loco/backend/cuda/compress/codec_bodies.hpp>
#include <loco/backend/cuda/compress/encode_source.hpp>
#include <loco/backend/cuda/compress/payload_plan.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/cast.hpp>
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

template <class T>
struct encode_body<compress::cast<T>> {
    template <class Src>
    __device__ __forceinline__ static void run(const Src& src, const compress_item& item,
                                               std::byte* seg, std::uint64_t, std::uint64_t,
                                               const encode_params&, std::uint64_t) {
        using codec = compress::cast<T>;
        auto* out = reinterpret_cast<std::uint16_t*>(seg);
        for (std::uint64_t i = threadIdx.x; i < item.count; i += block_threads) {
            const std::uint64_t j = item.first + i;
            const float e = src.load1(j);
            const std::uint16_t bits = codec::to_bits(e);
            out[j] = bits;
            src.store1(j, __fsub_rn(e, codec::from_bits(bits)));
        }
    }
};

template <class T>
struct decode_body<compress::cast<T>> {
    using codec = compress::cast<T>;
    template <int E>
    __device__ __forceinline__ static void values(const std::byte* seg, std::uint64_t,
                                                  std::uint64_t, std::uint64_t j, float* v,
                                                  const float*) {
        const auto* h = reinterpret_cast<const std::uint16_t*>(seg);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            v[e] = codec::from_bits(h[j + static_cast<unsigned>(e)]);
        }
    }
};

template <class T>
struct inspect_body<compress::cast<T>> {
    // Every 16-bit pattern is valid; only the average can be non-finite (NaN or inf sent, or an
    // overflowing bf16 sum).
    __device__ static void run(const compress_item& item, const tensor_desc& d,
                               const compress_tensor& ct, const gathered_payloads& g,
                               const verdict_view& v, const float*) {
        for (std::uint64_t i = threadIdx.x; i < item.count; i += block_threads) {
            const std::uint64_t j = item.first + i;
            float avg;
            average<compress::cast<T>, 1>(g, ct.body, 0, 0, j, &avg, nullptr);
            if (!math::isfinite(avg)) {
                atomicMin(v.nonfinite, d.flat_offset + j);
            }
        }
    }
};

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

}  // namespace loco::backend::cuda
