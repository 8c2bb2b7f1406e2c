#pragma once
// What loco::cuda::diloco keeps and runs to exchange a fragment with a chunked compressor
// (compress::sparseloco, compress::demo) in device memory, from the encode to the aggregate:
//
//   encode     the pseudo-gradient (the fragment's padded layout) into the payload and the *next*
//              accumulator, read from the current one (sparseloco_encode / demo_encode); the next
//              one replaces the current at commit, so a sync that fails changes nothing
//   check      the M gathered payloads through chunked_payload_check (chunked_check.hpp)
//   aggregate  into the exchange's own buffer, in the fragment's padded layout:
//              - aggregate::mean, as the host exchanger averages decoded payloads (its
//                mean_of_payloads): zeros, each payload decoded and added in rank order (fp32),
//                then divided by M. SparseLoCo adds only its kept values (8 B read and written
//                per kept value); DeMo decodes densely into a scratch buffer (4 n) and adds it
//                (12 n) per payload;
//              - aggregate::median_norm_clip (SparseLoCo as templar runs it): each payload's norm
//                per tensor on the device (sparseloco_norms), the median and clip factors by the
//                policy's own host code (median_norm_clip::factors_of) on those M x tensors
//                floats, then sparseloco_decode_scatter_mean with the factors;
//              - aggregate::scatter_mean (DeMo as its references aggregate):
//                demo_decode_scatter_mean, the coefficients averaged over their senders, then one
//                inverse DCT per chunk;
//              - any other aggregation with a device implementation: each payload decoded into
//                its row of the device aggregation (decode_into), as the host decodes rows.
//
// The segments are the tensors of the fragment's table, at their padded offsets, with the
// matrices' shapes the host exchanger gives them (so the payloads are the host's byte for byte).

#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/backend/cuda/collectives.hpp>
#include <loco/backend/cuda/compress/chunked_check.hpp>
#include <loco/backend/cuda/compress/chunked_kernels.hpp>
#include <loco/backend/cuda/compress/demo_kernels.hpp>
#include <loco/backend/cuda/compress/sparseloco_kernels.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/demo.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace loco::backend::cuda {

namespace detail {

inline void chunked_encode(const sparseloco_plan& plan, const float* x, const float* e_in,
                           float* e, std::byte* payload, cudaStream_t stream) {
    sparseloco_encode(plan, x, e_in, e, payload, stream);
}
inline void chunked_encode(const demo_plan& plan, const float* x, const float* e_in, float* e,
                           std::byte* payload, cudaStream_t stream) {
    demo_encode(plan, x, e_in, e, payload, stream);
}
inline void chunked_decode(const sparseloco_plan& plan, const std::byte* payload, float* out,
                           cudaStream_t stream) {
    sparseloco_decode(plan, payload, out, stream);
}
inline void chunked_decode(const demo_plan& plan, const std::byte* payload, float* out,
                           cudaStream_t stream) {
    demo_decode(plan, payload, out, stream);
}

// Whether two settings give the same payloads (a change re-plans the exchange): the policy's
// describe(), which names every setting, so a field added later cannot be missed (the index
// coding was, and a change of it kept the old payloads).
template <class C>
bool same_settings(const typename C::hyper& a, const typename C::hyper& b) {
    return C::describe(a) == C::describe(b);
}

// The segments of a fragment's table at their padded offsets.
inline std::vector<compress::segment> padded_segments(const tensor_table& table,
                                                      std::span<const compress::segment> flat) {
    if (flat.size() != table.size()) {
        throw invalid_argument("loco::cuda: " + std::to_string(flat.size()) +
                               " segments for a table of " + std::to_string(table.size()) +
                               " tensors");
    }
    std::vector<compress::segment> out(flat.begin(), flat.end());
    for (std::size_t k = 0; k < out.size(); ++k) out[k].offset = table.padded_offset(k);
    return out;
}

#if LOCO_HAS_CUDA()

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    accumulate_kernel(float* sum, const float* x, std::uint64_t n) {
    const std::uint64_t i = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (i < n) sum[i] = __fadd_rn(sum[i], x[i]);
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

template <class C>
class chunked_exchange {
public:
    using plan_type = typename device_chunked<C>::plan;
    static constexpr bool feedback = true;  // the accumulator (sparseloco) or residual (demo)

    chunked_exchange(const tensor_table& table, std::span<const compress::segment> flat,
                     int ranks, const typename C::hyper& h)
        : segments_(detail::padded_segments(table, flat)),
          plan(h, segments_, table.padded_elements()),
          send(plan.payload_bytes()),
          recv(plan.payload_bytes() * static_cast<std::size_t>(ranks)),
          residual(table.padded_elements()),
          next(table.padded_elements()),
          check(plan.layout(), ranks),
          average_(table.padded_elements()),
          scratch_(std::is_same_v<C, compress::sparseloco> ? 0 : table.padded_elements()),
          ranks_(ranks) {
        // Padding is never written by the kernels and must read as zero.
        residual.zero(nullptr);
        next.zero(nullptr);
        average_.zero(nullptr);
        scratch_.zero(nullptr);
    }

    // New settings: a new plan and payload buffers; the accumulator carries over.
    void replan(const tensor_table& table, const typename C::hyper& h) {
        if (detail::same_settings<C>(h, plan.layout().hyper())) return;
        plan_type fresh(h, segments_, table.padded_elements());
        chunked_payload_check<C> fresh_check(fresh.layout(), ranks_);
        device_buffer<std::byte> s(fresh.payload_bytes());
        device_buffer<std::byte> r(fresh.payload_bytes() * static_cast<std::size_t>(ranks_));
        plan = std::move(fresh);
        check = std::move(fresh_check);
        send = std::move(s);
        recv = std::move(r);
        partial_ = device_buffer<double>();
    }

    // next = the accumulator after this round; send = the payload. delta: the padded layout.
    void encode(const float* delta, cudaStream_t stream) {
        detail::chunked_encode(plan, delta, residual.get(), next.get(), send.get(), stream);
    }

    // Throws loco::wire_error (the host decoder's words) for the first bad payload.
    void check_all(cudaStream_t stream) { check.run(plan.layout(), recv.get(), stream); }

    // aggregate::mean of the checked payloads, into average(). SparseLoCo adds each payload's
    // kept values in place (sparseloco_decode_add, about 1/64 of the elements at templar's
    // settings); DeMo's decode is dense (an inverse DCT per chunk), so it decodes and adds.
    void mean(cudaStream_t stream) {
        const std::uint64_t n = average_.size();
        average_.zero(stream);
        for (int k = 0; k < ranks_; ++k) {
            if constexpr (std::is_same_v<C, compress::sparseloco>) {
                sparseloco_decode_add(plan, payload(k), average_.get(), stream);
                continue;
            }
            detail::chunked_decode(plan, payload(k), scratch_.get(), stream);
#if LOCO_HAS_CUDA()
            LOCO_CUDA_CHECK(detail::launch(detail::accumulate_kernel<>,
                                           detail::chunked_thread_blocks(n), stream,
                                           average_.get(), static_cast<const float*>(scratch_.get()),
                                           n));
#endif
        }
        divide(average_.get(), n, static_cast<float>(ranks_), stream);
    }

    // aggregate::median_norm_clip of the checked payloads (SparseLoCo), into average().
    void median_norm_clip(const aggregate::median_norm_clip::hyper& h, cudaStream_t stream)
        requires std::is_same_v<C, compress::sparseloco>
    {
        const auto m = static_cast<std::uint32_t>(ranks_);
        const std::size_t inputs = segments_.size();
        const float* factors = nullptr;
        if (h.clip) {
            if (partial_.size() != plan.layout().chunks() * m) {
                partial_ = device_buffer<double>(plan.layout().chunks() * m);
                norms_ = device_buffer<float>(inputs * m);
                factors_ = device_buffer<float>(inputs * m);
            }
            sparseloco_norms(plan, recv.get(), m, partial_.get(), norms_.get(), stream);
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
            const std::vector<float> norms = norms_.download();
            std::vector<float> all(inputs * m, 1.0f), one(m), f;
            for (std::size_t s = 0; s < inputs; ++s) {
                for (std::uint32_t k = 0; k < m; ++k) one[k] = norms[k * inputs + s];
                aggregate::median_norm_clip::factors_of(h, one, f);
                for (std::uint32_t k = 0; k < m; ++k) all[k * inputs + s] = f[k];
            }
            factors_.upload(all);
            factors = factors_.get();
        }
        sparseloco_decode_scatter_mean(plan, recv.get(), m, factors, average_.get(), stream);
    }

    // aggregate::scatter_mean of the checked payloads (DeMo as its references aggregate: each
    // coefficient averaged over the payloads that sent it, one inverse DCT), into average().
    void scatter_mean(cudaStream_t stream)
        requires std::is_same_v<C, compress::demo>
    {
        demo_decode_scatter_mean(plan, recv.get(), static_cast<std::uint32_t>(ranks_),
                                 average_.get(), stream);
    }

    // Rank k's payload decoded into row (the padded layout; its padding is not written).
    void decode_into(int k, float* row, cudaStream_t stream) const {
        detail::chunked_decode(plan, payload(k), row, stream);
    }

    const float* average() const noexcept { return average_.get(); }
    float* average() noexcept { return average_.get(); }

private:
    const std::byte* payload(int k) const noexcept {
        return recv.get() + static_cast<std::size_t>(k) * plan.payload_bytes();
    }

    std::vector<compress::segment> segments_;

public:
    plan_type plan;
    device_buffer<std::byte> send, recv;
    device_buffer<float> residual, next;
    chunked_payload_check<C> check;

private:
    device_buffer<float> average_, scratch_;
    device_buffer<double> partial_;
    device_buffer<float> norms_, factors_;
    int ranks_;
};

}  // namespace loco::backend::cuda
