#pragma once
// The wire checksum of payload bodies on the device (wire::checksum's terms, wire::checksum_term,
// summed by CTAs in any order) and the kernel that writes a payload's 40-byte header.

#include <loco/backend/cuda/compress/encode_source.hpp>
#include <loco/backend/cuda/compress/payload_header.hpp>
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

// Body words a CTA of the checksum kernel sums.
inline constexpr std::uint64_t checksum_words_per_cta = 4096;

}  // namespace detail

namespace detail {

#if LOCO_HAS_CUDA()

// ---- checksum and header -----------------------------------------------------------------------

// Word i of a body of `len` bytes, little-endian, zero-padded past the end. Payloads sit at any
// even offset of a gathered buffer (cast bodies are 2 n bytes), so the loads follow the address.
__device__ __forceinline__ std::uint64_t body_word(const std::byte* body, std::uint64_t i,
                                                   std::uint64_t len) {
    const std::byte* p = body + 8 * i;
    const std::uint64_t avail = min_u64(8, len - 8 * i);
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    if (avail == 8 && address % 4 == 0) {
        const auto* w = reinterpret_cast<const std::uint32_t*>(p);
        return static_cast<std::uint64_t>(w[0]) | (static_cast<std::uint64_t>(w[1]) << 32);
    }
    std::uint64_t word = 0;
    if (address % 2 == 0 && avail % 2 == 0) {
        const auto* h = reinterpret_cast<const std::uint16_t*>(p);
        for (unsigned k = 0; k < avail / 2; ++k) {
            word |= static_cast<std::uint64_t>(h[k]) << (16 * k);
        }
        return word;
    }
    const auto* b = reinterpret_cast<const unsigned char*>(p);
    for (unsigned k = 0; k < avail; ++k) {
        word |= static_cast<std::uint64_t>(b[k]) << (8 * k);
    }
    return word;
}

// The CTA's sum of v (mod 2^64), valid in thread 0.
__device__ __forceinline__ unsigned long long block_sum(unsigned long long v) {
    __shared__ unsigned long long partial[block_threads / 32];
#pragma unroll
    for (unsigned m = 16; m > 0; m /= 2) {
        v += __shfl_xor_sync(full_mask, v, static_cast<int>(m));
    }
    if (threadIdx.x % 32 == 0) {
        partial[threadIdx.x / 32] = v;
    }
    __syncthreads();
    unsigned long long total = 0;
    if (threadIdx.x == 0) {
        for (unsigned w = 0; w < block_threads / 32; ++w) {
            total += partial[w];
        }
    }
    return total;
}

// sums[k] += the wire::checksum_term of each body word of payload k (the host's checksum less
// the length). CTA x takes payload x / per_rank, words of block x % per_rank.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    checksum_kernel(gathered_payloads g, std::uint64_t len, std::uint32_t per_rank,
                    unsigned long long* sums) {
    const std::uint32_t k = blockIdx.x / per_rank;
    const std::uint64_t part = blockIdx.x % per_rank;
    const std::byte* body = g.base + k * g.stride + compress::wire::header_bytes;
    const std::uint64_t words = (len + 7) / 8;
    const std::uint64_t first = part * checksum_words_per_cta;
    const std::uint64_t last = min_u64(words, first + checksum_words_per_cta);
    unsigned long long acc = 0;
    for (std::uint64_t i = first + threadIdx.x; i < last; i += block_threads) {
        acc += compress::wire::checksum_term(body_word(body, i, len), i);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0 && acc != 0) {
        atomicAdd(sums + k, acc);
    }
}

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    header_kernel(std::byte* out, header_prefix h, const unsigned long long* sum,
                  std::uint64_t len) {
    auto* o = reinterpret_cast<unsigned char*>(out);
    if (threadIdx.x < 32) {
        o[threadIdx.x] = h.bytes[threadIdx.x];
    } else if (threadIdx.x < 40) {
        const std::uint64_t checksum = *sum + len;
        o[threadIdx.x] = static_cast<unsigned char>(checksum >> (8 * (threadIdx.x - 32)));
    }
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

namespace detail {

// Sums body words of `ranks` payloads into sums[0 .. ranks).
inline void launch_checksum(const gathered_payloads& g, std::uint64_t len,
                            unsigned long long* sums, cudaStream_t stream) {
    const std::uint64_t words = (len + 7) / 8;
    const std::uint64_t per_rank =
        std::max<std::uint64_t>(1, (words + checksum_words_per_cta - 1) / checksum_words_per_cta);
    if (per_rank * g.ranks > INT32_MAX) {
        throw invalid_argument("loco: payloads too large for one checksum grid");
    }
#if LOCO_HAS_CUDA()
    LOCO_CUDA_CHECK(launch(checksum_kernel<>, static_cast<std::uint32_t>(per_rank * g.ranks),
                           stream, g, len, static_cast<std::uint32_t>(per_rank), sums));
#else
    static_cast<void>(sums);
    static_cast<void>(stream);
#endif
}

}  // namespace detail

}  // namespace loco::backend::cuda
