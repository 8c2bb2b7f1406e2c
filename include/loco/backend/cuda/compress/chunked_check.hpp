#pragma once
// chunked_payload_check: M gathered payloads of a chunked compressor (compress::sparseloco,
// compress::demo) checked on the device for everything their host decoder refuses, before any of
// them is decoded. The device kernels only order the loops; the verdict's words are the host's:
//
//   header    each payload's 40-byte header copied to the host and compared with the plan's
//             (wire::header_mismatch), its checksum summed on the device (checksum.hpp)
//   chunks    one thread per (payload, chunk): the chunk's indices well formed (index_code::check,
//             what chunking::check_index_stream asks of every chunk); sparseloco: each code
//             below the bin count, and the bins the chunk uses OR-ed into a mask per (payload,
//             segment)
//   segments  one thread per (payload, segment): zero padding after the index stream and after
//             the code (or sign) stream; sparseloco: a zero table entry for every bin no code uses
//
// A payload the kernels flag is then copied to the host, whole, and put through the host's own
// checks (chunking::residual_codec<C>::checked_body), so the error is the host decoder's, word
// for word, with the sender's rank. That copy happens only on the failure path.

#include <loco/backend/cuda/compress/checksum.hpp>
#include <loco/backend/cuda/compress/chunked_kernels.hpp>
#include <loco/backend/cuda/compress/payload_header.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/compress/chunking.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace loco::backend::cuda {

namespace detail {

// Words of the bin mask per (payload, segment): bins <= 256.
inline constexpr std::uint32_t chunked_bin_words = 8;

// Width of the second stream of C's segments (sparseloco: codes; demo: signs, or none).
template <class C>
unsigned chunked_value_bits(const typename C::hyper& h) {
    if constexpr (std::is_same_v<C, compress::sparseloco>) {
        return compress::sparseloco::code_bits(h);
    } else {
        return h.sign ? 1u : 0u;
    }
}

struct chunked_check_view {
    const chunked_segment* segs;
    const std::uint32_t* chunk_segment;
    const std::byte* gathered;
    std::uint64_t stride;
    std::uint64_t chunks;
    std::uint32_t segments;
    std::uint32_t payloads;
    unsigned value_bits;      // the second stream's width (0: none)
    unsigned bins;            // sparseloco: codes must be below; 0: no codes to check
    std::uint32_t* bin_mask;  // payloads x segments x chunked_bin_words
    std::uint32_t* bad;       // per payload: nonzero when a check failed
};

#if LOCO_HAS_CUDA()

// True when every bit of the `bytes`-byte stream from bit `used` on is zero.
__device__ inline bool chunked_tail_is_zero(const std::byte* stream, std::uint64_t used,
                                            std::uint64_t bytes) {
    const auto* b = reinterpret_cast<const unsigned char*>(stream);
    std::uint64_t at = used / 8;
    if (used % 8 != 0) {
        if ((b[at] >> (used % 8)) != 0) return false;
        ++at;
    }
    for (; at < bytes; ++at) {
        if (b[at] != 0) return false;
    }
    return true;
}

template <int = 0>
__global__ void __launch_bounds__(block_threads) chunked_check_chunk_kernel(chunked_check_view v) {
    const std::uint64_t item = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (item >= v.chunks * v.payloads) return;
    const std::uint64_t p = item / v.chunks;
    const std::uint64_t c = item % v.chunks;
    const std::uint32_t g = v.chunk_segment[c];
    const chunked_segment s = v.segs[g];
    const std::byte* base = v.gathered + p * v.stride;
    const std::uint64_t first = (c - s.chunk0) * s.k;
    bool ok = compress::index_code::check(base + s.indices, s.coding, c - s.chunk0).problem ==
              compress::index_code::verdict::ok;
    if (v.bins != 0) {
        std::uint32_t mask[chunked_bin_words] = {};
        for (unsigned j = 0; j < s.k; ++j) {
            const std::uint32_t q = compress::wire::get_bits(base + s.values, first + j,
                                                             v.value_bits);
            if (q >= v.bins) {
                ok = false;
            } else {
                mask[q / 32] |= 1u << (q % 32);
            }
        }
        std::uint32_t* out = v.bin_mask + (p * v.segments + g) * chunked_bin_words;
        for (unsigned w = 0; w < chunked_bin_words; ++w) {
            if (mask[w] != 0) atomicOr(out + w, mask[w]);
        }
    }
    if (!ok) atomicOr(v.bad + p, 1u);
}

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    chunked_check_segment_kernel(chunked_check_view v) {
    const std::uint64_t item = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (item >= static_cast<std::uint64_t>(v.segments) * v.payloads) return;
    const std::uint64_t p = item / v.segments;
    const auto g = static_cast<std::uint32_t>(item % v.segments);
    const chunked_segment s = v.segs[g];
    const std::byte* base = v.gathered + p * v.stride;
    const std::uint64_t sent = static_cast<std::uint64_t>(s.chunks) * s.k;
    bool ok = chunked_tail_is_zero(base + s.indices, s.chunks * s.coding.bits(),
                                   s.values - s.indices);
    if (v.value_bits != 0) {
        const std::uint64_t bits = sent * v.value_bits;
        ok = ok && chunked_tail_is_zero(base + s.values, bits, (bits + 31) / 32 * 4);
    }
    if (v.bins != 0) {
        const std::uint32_t* mask = v.bin_mask + (p * v.segments + g) * chunked_bin_words;
        const auto* table = reinterpret_cast<const float*>(base + s.record) + 1;
        for (unsigned b = 0; b < v.bins; ++b) {
            const bool used = ((mask[b / 32] >> (b % 32)) & 1u) != 0;
            ok = ok && (used || loco::detail::float_bits(table[b]) == 0);
        }
    }
    if (!ok) atomicOr(v.bad + p, 1u);
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

template <class C>
class chunked_payload_check {
public:
    chunked_payload_check() = default;
    chunked_payload_check(const chunked_layout<C>& l, int ranks)
        : ranks_(static_cast<std::uint32_t>(ranks)),
          sums_(ranks_),
          bad_(ranks_),
          mask_(std::is_same_v<C, compress::sparseloco>
                    ? std::size_t{ranks_} * l.segment_count() * detail::chunked_bin_words
                    : 0) {
        if (ranks < 1 || ranks > 65535) {
            throw invalid_argument("loco::cuda: a chunked payload check takes 1 to 65535 ranks, "
                                   "got " + std::to_string(ranks));
        }
    }

    std::uint32_t ranks() const noexcept { return ranks_; }

    // Blocks until the checks are done (one host synchronisation). Throws loco::wire_error for
    // the first bad rank, with the host decoder's words; writes nothing but its own workspace.
    void run(const chunked_layout<C>& l, const std::byte* gathered, cudaStream_t stream) {
        detail::require_payload_pointer(gathered, C::name.data(), "the gathered payloads");
        const std::uint64_t stride = l.payload_bytes();
        const std::uint64_t body = stride - compress::wire::header_bytes;
        LOCO_CUDA_CHECK(cudaMemsetAsync(sums_.get(), 0, sizeof(unsigned long long) * ranks_,
                                        stream));
        LOCO_CUDA_CHECK(cudaMemsetAsync(bad_.get(), 0, sizeof(std::uint32_t) * ranks_, stream));
        if (mask_.size() != 0) {
            LOCO_CUDA_CHECK(
                cudaMemsetAsync(mask_.get(), 0, sizeof(std::uint32_t) * mask_.size(), stream));
        }
        detail::launch_checksum(gathered_payloads{gathered, stride, ranks_, 0}, body, sums_.get(),
                                stream);
#if LOCO_HAS_CUDA()
        const detail::chunked_check_view v{
            l.segment_table(), l.chunk_segment(), gathered, stride, l.chunks(), l.segment_count(),
            ranks_, detail::chunked_value_bits<C>(l.hyper()),
            std::is_same_v<C, compress::sparseloco> ? bins_of(l.hyper()) : 0u, mask_.get(),
            bad_.get()};
        if (l.chunks() > 0) {
            LOCO_CUDA_CHECK(detail::launch(detail::chunked_check_chunk_kernel<>,
                                           detail::chunked_thread_blocks(l.chunks() * ranks_),
                                           stream, v));
            LOCO_CUDA_CHECK(detail::launch(
                detail::chunked_check_segment_kernel<>,
                detail::chunked_thread_blocks(std::uint64_t{l.segment_count()} * ranks_), stream,
                v));
        }
#endif
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<std::byte> headers(compress::wire::header_bytes * ranks_);
        LOCO_CUDA_CHECK(cudaMemcpy2D(headers.data(), compress::wire::header_bytes, gathered,
                                     stride, compress::wire::header_bytes, ranks_,
                                     cudaMemcpyDeviceToHost));
        const std::vector<unsigned long long> sums = sums_.download();
        const std::vector<std::uint32_t> bad = bad_.download();
        const compress::wire::header want = C::expected_header_of(l.hyper(), l.segments());
        for (std::uint32_t k = 0; k < ranks_; ++k) {
            detail::check_header(C::name, k, headers.data() + k * compress::wire::header_bytes,
                                 want, sums[k] + body);
            if (bad[k] != 0) refuse(l, gathered + k * stride, k);
        }
    }

private:
    static unsigned bins_of(const typename C::hyper& h) {
        if constexpr (std::is_same_v<C, compress::sparseloco>) {
            return h.bins;
        } else {
            static_cast<void>(h);
            return 0;
        }
    }

    // Rank k's payload, flagged by the device, through the host decoder's checks.
    [[noreturn]] static void refuse(const chunked_layout<C>& l, const std::byte* payload,
                                    std::uint32_t k) {
        std::vector<std::byte> copy(l.payload_bytes());
        LOCO_CUDA_CHECK(cudaMemcpy(copy.data(), payload, copy.size(), cudaMemcpyDeviceToHost));
        const std::string prefix =
            "loco::compress::" + std::string(C::name) + ": malformed payload: ";
        try {
            static_cast<void>(compress::chunking::residual_codec<C>::checked_body(
                l.hyper(), copy, l.segments(), l.elements()));
        } catch (const wire_error& e) {
            std::string why = e.what();
            if (why.rfind(prefix, 0) == 0) why = why.substr(prefix.size());
            throw detail::malformed_payload(C::name, k, why);
        }
        throw error("loco::cuda: the device check refused rank " + std::to_string(k) +
                             "'s " + std::string(C::name) +
                             " payload, which the host decoder accepts (a bug in loco)");
    }

    std::uint32_t ranks_ = 0;
    device_buffer<unsigned long long> sums_;
    device_buffer<std::uint32_t> bad_;
    device_buffer<std::uint32_t> mask_;
};

}  // namespace loco::backend::cuda
