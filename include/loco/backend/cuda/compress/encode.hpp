#pragma once
// encode(): the pseudo-gradient of every tensor of a table into the host compressor's payload,
// byte for byte (phase 1 of the outer step and error feedback fused in).

#include <loco/backend/cuda/compress/blockwise_kernels.hpp>
#include <loco/backend/cuda/compress/cast_kernels.hpp>
#include <loco/backend/cuda/compress/checksum.hpp>
#include <loco/backend/cuda/compress/codec_bodies.hpp>
#include <loco/backend/cuda/compress/device_compressor.hpp>
#include <loco/backend/cuda/compress/encode_source.hpp>
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
inline constexpr int encode_min_blocks = [] {
    if constexpr (codec_traits<Codec>::blockwise) {
        return blockwise_layout<codec_traits<Codec>::bits, codec_traits<Codec>::block>::chunks > 2
                   ? 2
                   : min_blocks_per_sm;
    } else {
        return min_blocks_per_sm;
    }
}();

template <class Codec, bool Feedback, encode_from From, class P, bool UseMaster>
__device__ __forceinline__ void encode_item(const tensor_desc& d, const compress_tensor& ct,
                                            const compress_item& item, const encode_params& a,
                                            std::uint64_t stream) {
    const auto src = source_of<Feedback, From, P, UseMaster>(
        d, a, (d.aligned & value_aligned) != 0);
    std::byte* seg = a.payload + compress::wire::header_bytes + ct.body;
    encode_body<Codec>::run(src, item, seg, ct.blocks, d.flat_offset, a, stream);
}

template <class Codec, bool Feedback, encode_from From, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads, encode_min_blocks<Codec>)
    encode_kernel(table_view t, compress_view p, encode_params a) {
    const compress_item item = p.items[blockIdx.x];
    const tensor_desc d = t.tensors[item.tensor];
    const compress_tensor ct = p.tensors[item.tensor];
    const std::uint64_t round =
        a.round_from ? a.round_from->steps + a.round_from->skipped : a.round;
    const std::uint64_t stream = (round << 32) + a.rank;
    if constexpr (From == encode_from::delta) {
        encode_item<Codec, Feedback, From, float, false>(d, ct, item, a, stream);
    } else {
        if (d.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                encode_item<Codec, Feedback, From, loco::bf16, reads_master<loco::bf16, Mode>>(
                    d, ct, item, a, stream);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                encode_item<Codec, Feedback, From, float, false>(d, ct, item, a, stream);
            }
        }
    }
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

// ---- encode --------------------------------------------------------------------------------------

// Encodes the pseudo-gradient of every tensor of `table` into io.payload, the host compressor's
// payload byte for byte. C is a device compressor (has_device_compressor<C>): with
// error_feedback<>, io.residual is read and io.next_residual written (padded layout; padding
// stays as it is, zero); the residual follows error_feedback::encode exactly. x is read as From
// says. Asynchronous on `stream`; no host synchronisation. statistical: the plan's workspace
// holds the group statistics, so encodes with one plan must not overlap; with error feedback
// io.next_residual holds e between the passes (it may still equal io.residual).
template <class C, encode_from From, bf16_update Mode = bf16_update::master,
          unsigned Combos = combos::all>
void encode(const compress_plan<typename device_compressor<C>::codec>& plan,
            const tensor_table& table, const typename C::hyper& h, const encode_io& io,
            const device_encode_context& ctx, cudaStream_t stream) {
    static_assert(has_device_compressor<C>, "loco: cuda::encode: C has no device implementation");
    using support = device_compressor<C>;
    using codec = typename support::codec;
    constexpr const char* what = "cuda::encode";
    loco::detail::validate_hyper<C>(h);
    detail::require_plan(plan, table, what);
    detail::require_combos(table, Combos, what);
    detail::encode_params a =
        detail::encode_inputs<From, Mode, support::feedback>(table, io, h, ctx, what);
    const typename codec::hyper& ch = support::codec_hyper(h);
    if constexpr (detail::codec_traits<codec>::blockwise) {
        a.flags = (ch.scale == compress::scale_kind::mean_abs ? detail::flag_mean_abs : 0u) |
                  (ch.round == compress::rounding::stochastic ? detail::flag_stochastic : 0u);
    }
    a.round_from = ctx.round_from;
    a.seed = ctx.seed;
    a.round = ctx.round;
    a.rank = static_cast<std::uint32_t>(ctx.rank);
    if constexpr (detail::is_statistical<codec>) {
        plan.require_per(ch, what);
        detail::encode_statistical<codec, support::feedback, From, Mode, Combos>(plan, table, ch,
                                                                                 a, stream);
    } else {
        const std::uint64_t len = plan.payload_bytes() - compress::wire::header_bytes;
        LOCO_CUDA_CHECK(cudaMemsetAsync(plan.checksum_accumulator(), 0, sizeof(unsigned long long),
                                        stream));
        bool zeroed = false;
        if constexpr (detail::codec_traits<codec>::blockwise) {
            zeroed = !detail::blockwise_layout<detail::codec_traits<codec>::bits,
                                               detail::codec_traits<codec>::block>::fast;
        }
        if (zeroed && len != 0) {  // the generic path ORs codes into zeroed words
            LOCO_CUDA_CHECK(
                cudaMemsetAsync(io.payload + compress::wire::header_bytes, 0, len, stream));
        }
#if LOCO_HAS_CUDA()
        if (plan.items() != 0) {
            LOCO_CUDA_CHECK(detail::launch(
                detail::encode_kernel<codec, support::feedback, From, Mode, Combos>, plan.items(),
                stream, table.view(), plan.view(), a));
        }
        const gathered_payloads self{io.payload, plan.payload_bytes(), 1, 0};
        detail::launch_checksum(self, len, plan.checksum_accumulator(), stream);
        LOCO_CUDA_CHECK(detail::launch(detail::header_kernel<>, 1, stream, io.payload,
                                       plan.prefix(ch), plan.checksum_accumulator(), len));
#endif
    }
}

}  // namespace loco::backend::cuda
