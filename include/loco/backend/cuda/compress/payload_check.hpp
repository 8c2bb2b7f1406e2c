#pragma once
// payload_check: M gathered payloads checked as the host decoder would (the header and checksum,
// then each codec's format checks) before anything is written, and the first non-finite average
// found.

#include <loco/backend/cuda/compress/blockwise_kernels.hpp>
#include <loco/backend/cuda/compress/cast_kernels.hpp>
#include <loco/backend/cuda/compress/checksum.hpp>
#include <loco/backend/cuda/compress/codec_bodies.hpp>
#include <loco/backend/cuda/compress/payload_header.hpp>
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

template <class Codec>
__global__ void __launch_bounds__(block_threads)
    inspect_kernel(table_view t, compress_view p, gathered_payloads g, verdict_view v) {
    __shared__ float fractions[level_fractions<Codec>::count];
    level_fractions<Codec>::fill(fractions);
    __syncthreads();
    const compress_item item = p.items[blockIdx.x];
    const tensor_desc d = t.tensors[item.tensor];
    const compress_tensor ct = p.tensors[item.tensor];
    inspect_body<Codec>::run(item, d, ct, g, v, fractions);
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

// ---- verify ------------------------------------------------------------------------------------

// Checks M gathered payloads of a plan as the host decoder would (wire::open: header fields and
// checksum; blockwise: scales, codes of zero/NaN blocks, padding; statistical: table entries of
// unused bins, padding), and finds the smallest flat
// index where their average is not finite. Owns the device verdict and the pinned host copy.
class payload_check {
public:
    payload_check() = default;
    explicit payload_check(int ranks)
        : ranks_(checked(ranks)),
          verdict_(2 * ranks_ + 1),
          host_(2 * ranks_ + 1 + (compress::wire::header_bytes * ranks_ + 7) / 8) {}

    // Blocks until the checks are done (one host synchronisation). Throws loco::wire_error
    // naming the first bad rank, as the host decoder would refuse it; returns the smallest flat
    // index of a non-finite average element, or no_nonfinite. The device copy of that index
    // stays readable at nonfinite() until the next run().
    template <class Codec>
    std::uint64_t run(const compress_plan<Codec>& plan, const tensor_table& table,
                      const typename Codec::hyper& h, const std::byte* gathered,
                      cudaStream_t stream) {
        constexpr const char* what = "cuda::payload_check";
        detail::require_plan(plan, table, what);
        detail::require_payload_pointer(gathered, "gathered payloads", what);
        loco::detail::validate_hyper<Codec>(h);
        if constexpr (detail::is_statistical<Codec>) {
            plan.require_per(h, what);
        }
        const std::size_t m = ranks_;
        const std::uint64_t p = plan.payload_bytes();
        const std::uint64_t len = p - compress::wire::header_bytes;
        LOCO_CUDA_CHECK(cudaMemsetAsync(verdict_.get(), 0, 2 * m * 8, stream));
        LOCO_CUDA_CHECK(cudaMemsetAsync(verdict_.get() + 2 * m, 0xff, 8, stream));
        const gathered_payloads g{gathered, p, static_cast<std::uint32_t>(m), 0};
        detail::launch_checksum(g, len, verdict_.get(), stream);
        const detail::verdict_view v{verdict_.get(), verdict_.get() + m, verdict_.get() + 2 * m};
        if constexpr (detail::is_statistical<Codec>) {
            inspect_statistical(plan, table, g, v, stream);
        } else {
#if LOCO_HAS_CUDA()
            if (plan.items() != 0) {
                LOCO_CUDA_CHECK(detail::launch(detail::inspect_kernel<Codec>, plan.items(), stream,
                                               table.view(), plan.view(), g, v));
            }
#else
            static_cast<void>(v);
#endif
        }
        unsigned long long* host = host_.get();
        auto* headers = reinterpret_cast<std::byte*>(host + 2 * m + 1);
        LOCO_CUDA_CHECK(cudaMemcpyAsync(host, verdict_.get(), (2 * m + 1) * 8,
                                        cudaMemcpyDeviceToHost, stream));
        // One copy per header (a 2-D copy would limit the payload size to the device's pitch).
        for (std::size_t k = 0; k < m; ++k) {
            LOCO_CUDA_CHECK(cudaMemcpyAsync(headers + k * compress::wire::header_bytes,
                                            gathered + k * p, compress::wire::header_bytes,
                                            cudaMemcpyDeviceToHost, stream));
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        const compress::wire::header want = plan.wire_header(h);
        for (std::size_t k = 0; k < m; ++k) {
            detail::check_header(Codec::name, k, headers + k * compress::wire::header_bytes, want,
                                 host[k] + len);
            check_format(Codec::name, k, host[m + k]);
        }
        return host[2 * m];
    }

    // Device copy of the last run's non-finite index (for decode_average_apply's skip).
    const std::uint64_t* nonfinite() const noexcept {
        return reinterpret_cast<const std::uint64_t*>(verdict_.get() + 2 * ranks_);
    }
    std::size_t ranks() const noexcept { return ranks_; }

private:
    static std::size_t checked(int ranks) {
        if (ranks < 1) {
            throw invalid_argument("loco: payload_check needs at least one rank");
        }
        return static_cast<std::size_t>(ranks);
    }

    // statistical: the bins each rank's codes use, per group (masks_), then the table entries and
    // padding; and the first non-finite average.
    template <class Codec>
    void inspect_statistical(const compress_plan<Codec>& plan, const tensor_table& table,
                             const gathered_payloads& g, const detail::verdict_view& v,
                             cudaStream_t stream) {
        constexpr int Bits = detail::codec_traits<Codec>::bits;
        const std::size_t masks = ranks_ * plan.groups();
        if (masks_.size() < masks) {
            masks_ = device_buffer<unsigned>(masks);
        }
        if (masks != 0) {
            LOCO_CUDA_CHECK(cudaMemsetAsync(masks_.get(), 0, masks * sizeof(unsigned), stream));
        }
        const std::uint64_t checks = ranks_ * (plan.groups() + plan.segments().size());
        if (checks / block_threads >= INT32_MAX) {
            throw invalid_argument("loco: payload_check: too many groups for one grid");
        }
#if LOCO_HAS_CUDA()
        if (plan.chunks() != 0) {
            LOCO_CUDA_CHECK(detail::launch(detail::stat_inspect_kernel<Bits>,
                                           static_cast<std::uint32_t>((plan.chunks() + 7) / 8),
                                           stream, table.view(), plan.stats(), g, v,
                                           masks_.get()));
        }
        if (checks != 0) {
            LOCO_CUDA_CHECK(detail::launch(
                detail::stat_check_kernel<Bits>,
                static_cast<std::uint32_t>((checks + block_threads - 1) / block_threads), stream,
                plan.stats(), g, v, static_cast<const unsigned*>(masks_.get())));
        }
#else
        static_cast<void>(table);
        static_cast<void>(g);
        static_cast<void>(v);
        static_cast<void>(stream);
#endif
    }

    // The host decoder's checks of the body (blockwise's or statistical's), after the header's.
    static void check_format(std::string_view who, std::size_t k, unsigned long long flags) {
        const auto fail = [&](const char* why) { return detail::malformed_payload(who, k, why); };
        if (flags & detail::bad_scale) {
            throw fail("a block scale is negative or not finite");
        }
        if (flags & detail::bad_zero_codes) {
            throw fail("a code of a zero-scale or NaN-scale block is not the zero code");
        }
        if (flags & detail::bad_unused_bin) {
            throw fail("a nonzero table entry for an unused bin");
        }
        if (flags & detail::bad_padding_bits) {
            throw fail("nonzero padding bits after the last code");
        }
        if (flags & detail::bad_padding_bytes) {
            throw fail("nonzero alignment padding");
        }
    }

    std::size_t ranks_ = 0;
    device_buffer<unsigned long long> verdict_;
    pinned_buffer<unsigned long long> host_;
    device_buffer<unsigned> masks_;  // statistical: ranks x groups bin masks
};

}  // namespace loco::backend::cuda
