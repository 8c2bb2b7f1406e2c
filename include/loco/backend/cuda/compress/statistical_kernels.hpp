#pragma once
// compress::statistical<1 | 2 | 4> on the device (MuLoCo's quantizer): the encode passes whose
// double sums reproduce the host's (see compress.hpp's top comment), the decoder's values and
// checks.

#include <loco/backend/cuda/compress/checksum.hpp>
#include <loco/backend/cuda/compress/codec_bodies.hpp>
#include <loco/backend/cuda/compress/device_compressor.hpp>
#include <loco/backend/cuda/compress/encode_source.hpp>
#include <loco/backend/cuda/compress/statistical_plan.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/statistical.hpp>
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

// statistical: lut[q] + shift of the element's group (groups = the tensor's groups, cols their
// size). Per tensor there is one group and no division.
template <int Bits>
struct decode_body<compress::statistical<Bits>> {
    using codec = compress::statistical<Bits>;
    template <int E>
    __device__ __forceinline__ static void values(const std::byte* seg, std::uint64_t groups,
                                                  std::uint64_t cols, std::uint64_t j, float* v,
                                                  const float*) {
        const std::byte* codes = seg + codec::record_bytes * groups;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const std::uint64_t i = j + static_cast<unsigned>(e);
            std::uint64_t g = 0;
            if (groups > 1) {  // a 32-bit division when it is enough (the common case)
                g = (i >> 32) == 0 && (cols >> 32) == 0
                        ? static_cast<std::uint32_t>(i) / static_cast<std::uint32_t>(cols)
                        : i / cols;
            }
            const auto* record = reinterpret_cast<const float*>(seg + codec::record_bytes * g);
            const unsigned q = compress::wire::unpack<Bits>(codes, i);
            v[e] = codec::value(record[1 + q], record[0]);
        }
    }
};

// ---- statistical: encode -----------------------------------------------------------------------

// The unsigned sum over a warp (counts: exact in any order).
__device__ __forceinline__ unsigned warp_usum(unsigned v) {
#pragma unroll
    for (unsigned m = 16; m > 0; m /= 2) {
        v += __shfl_xor_sync(full_mask, v, static_cast<int>(m));
    }
    return v;
}

// One warp's chunk of a group, pass 1 to 4 (see encode_statistical). Lane l takes elements l,
// l + 32, ... of the chunk, in that order: the order statistical.hpp defines, so group_sum<32>
// (the documented butterfly) gives the host's chunk sums bit for bit.
template <int Bits, int Pass, bool Feedback, encode_from From, class P, bool UseMaster>
__device__ __forceinline__ void stat_chunk_pass(const tensor_desc& d, const stat_chunk& c,
                                                const compress_tensor& ct, const stat_view& v,
                                                const encode_params& a, std::uint64_t index,
                                                unsigned lane) {
    using codec = compress::statistical<Bits>;
    constexpr unsigned B = codec::bins;
    const auto src = source_of<Feedback, From, P, UseMaster>(d, a, false);
    // e after pass 1: with error feedback it waits in the new residual buffer (pass 4 overwrites
    // it with the residual); without, x is formed again from its source (no scratch array).
    const auto again = [&](std::uint64_t j) {
        if constexpr (Feedback) {
            return src.next[j];
        } else {
            return src.load1(j);
        }
    };
    const float* st = v.stats + static_cast<std::uint64_t>(c.group) * (2 + B);
    const std::uint64_t first = c.first;
    const unsigned count = c.count;
    if constexpr (Pass == 1) {
        double sum = 0.0;
        for (unsigned i = lane; i < count; i += 32) {
            const float e = src.load1(first + i);
            src.store1(first + i, e);
            sum += static_cast<double>(e);
        }
        sum = group_sum<32>(sum);
        if (lane == 0) {
            v.sums[index] = sum;
        }
    } else if constexpr (Pass == 2) {
        const double shift = static_cast<double>(st[0]);
        double sum = 0.0;
        for (unsigned i = lane; i < count; i += 32) {
            const double x = static_cast<double>(again(first + i)) - shift;
            sum = __dadd_rn(sum, __dmul_rn(x, x));  // rounded product, as on the host
        }
        sum = group_sum<32>(sum);
        if (lane == 0) {
            v.sums[index] = sum;
        }
    } else if constexpr (Pass == 3) {
        const float shift = st[0];
        const float scale = st[1];
        double sums[B];
        unsigned counts[B];
#pragma unroll
        for (unsigned b = 0; b < B; ++b) {
            sums[b] = 0.0;
            counts[b] = 0;
        }
        auto* words = reinterpret_cast<unsigned*>(a.payload + compress::wire::header_bytes +
                                                  ct.body + codec::record_bytes * ct.blocks);
        constexpr unsigned per_word = 32 / Bits;
        const unsigned rounds = (count + 31) / 32;
        for (unsigned r = 0; r < rounds; ++r) {
            const unsigned i = 32 * r + lane;
            unsigned q = 0;
            if (i < count) {
                const float x = again(first + i);
                q = codec::code(x, shift, scale);
                const double cx = static_cast<double>(x) - static_cast<double>(shift);
#pragma unroll
                for (unsigned b = 0; b < B; ++b) {
                    if (b == q) {  // registers, not a dynamically indexed local array
                        sums[b] += cx;
                        ++counts[b];
                    }
                }
            }
            // The 32 codes of this round are 32 * Bits bits: one ballot per code bit, then lane
            // w < Bits interleaves word w (elements w * 32 / Bits ..) from them.
            unsigned planes[Bits];
#pragma unroll
            for (int b = 0; b < Bits; ++b) {
                planes[b] = __ballot_sync(full_mask, static_cast<int>((q >> b) & 1u));
            }
            unsigned word = 0;
            const unsigned base = (lane % static_cast<unsigned>(Bits)) * per_word;
#pragma unroll
            for (unsigned k = 0; k < per_word; ++k) {
#pragma unroll
                for (int b = 0; b < Bits; ++b) {
                    const unsigned bit = (planes[b] >> (base + k)) & 1u;
                    word |= bit << (k * Bits + static_cast<unsigned>(b));
                }
            }
            const std::uint64_t bit = (first + 32 * r) * static_cast<unsigned>(Bits);
            if (lane < static_cast<unsigned>(Bits)) {
                const std::uint64_t w = bit / 32 + lane;
                const unsigned offset = static_cast<unsigned>(bit % 32);
                if (offset == 0 && i - lane + 32 <= count) {
                    words[w] = word;  // whole words of this group: a plain store
                } else {
                    // A row that starts inside a word, or a group's last round: OR into the
                    // zeroed payload (other groups own the rest of the word). Only nonzero
                    // pieces are written, so nothing past the code bytes is touched.
                    const unsigned low = word << offset;
                    const unsigned high = offset == 0 ? 0u : word >> (32 - offset);
                    if (low != 0) {
                        atomicOr(words + w, low);
                    }
                    if (high != 0) {
                        atomicOr(words + w + 1, high);
                    }
                }
            }
        }
#pragma unroll
        for (unsigned b = 0; b < B; ++b) {
            const double s = group_sum<32>(sums[b]);
            const unsigned k = warp_usum(counts[b]);
            if (lane == 0) {
                v.bin_sums[index * B + b] = s;
                v.bin_counts[index * B + b] = k;
            }
        }
    } else {
        const float shift = st[0];
        const float scale = st[1];
        for (unsigned i = lane; i < count; i += 32) {
            const float x = again(first + i);
            const unsigned q = codec::code(x, shift, scale);
            src.next[first + i] = __fsub_rn(x, codec::value(st[2 + q], shift));
        }
    }
}

template <int Bits, int Pass, bool Feedback, encode_from From, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads)
    stat_pass_kernel(table_view t, stat_view v, encode_params a) {
    const std::uint64_t index =
        static_cast<std::uint64_t>(blockIdx.x) * (block_threads / 32) + threadIdx.x / 32;
    if (index >= v.chunk_count) {
        return;  // the whole warp
    }
    const unsigned lane = threadIdx.x % 32;
    const stat_chunk c = v.chunks[index];
    const std::uint32_t tensor = v.groups[c.group].tensor;
    const tensor_desc d = t.tensors[tensor];
    const compress_tensor ct = v.tensors[tensor];
    if constexpr (From == encode_from::delta) {
        stat_chunk_pass<Bits, Pass, Feedback, From, float, false>(d, c, ct, v, a, index, lane);
    } else {
        if (d.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                stat_chunk_pass<Bits, Pass, Feedback, From, loco::bf16,
                                reads_master<loco::bf16, Mode>>(d, c, ct, v, a, index, lane);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                stat_chunk_pass<Bits, Pass, Feedback, From, float, false>(d, c, ct, v, a, index,
                                                                          lane);
            }
        }
    }
}

// One thread per group: the chunk sums in chunk order (statistical.hpp), then shift (stage 1),
// scale (2) or the table (3), kept in v.stats and written to the group's record.
template <int Bits, int Stage>
__global__ void __launch_bounds__(block_threads)
    stat_finish_kernel(stat_view v, std::byte* payload, float range) {
    using codec = compress::statistical<Bits>;
    constexpr unsigned B = codec::bins;
    const std::uint64_t g = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (g >= v.group_count) {
        return;
    }
    const stat_group gr = v.groups[g];
    float* st = v.stats + g * (2 + B);
    auto* record = reinterpret_cast<float*>(payload + compress::wire::header_bytes + gr.record);
    // The adds depend on each other (chunk order); unrolling lets the loads run ahead of them.
    if constexpr (Stage == 1 || Stage == 2) {
        double total = 0.0;
#pragma unroll 8
        for (std::uint32_t c = 0; c < gr.chunks; ++c) {
            total += v.sums[gr.chunk0 + c];
        }
        if constexpr (Stage == 1) {
            const float shift = static_cast<float>(total / static_cast<double>(gr.n));
            st[0] = shift;
            record[0] = codec::canonical(shift);
        } else {
            st[1] = codec::scale_of(total, gr.n, range);
        }
    } else {
        double totals[B];
        std::uint64_t counts[B];
#pragma unroll
        for (unsigned b = 0; b < B; ++b) {
            totals[b] = 0.0;
            counts[b] = 0;
        }
#pragma unroll 2
        for (std::uint32_t c = 0; c < gr.chunks; ++c) {
            const std::uint64_t at = (gr.chunk0 + c) * B;
#pragma unroll
            for (unsigned b = 0; b < B; ++b) {
                totals[b] += v.bin_sums[at + b];
                counts[b] += v.bin_counts[at + b];
            }
        }
#pragma unroll
        for (unsigned b = 0; b < B; ++b) {
            const float lut = codec::lut_entry(totals[b], counts[b]);
            st[2 + b] = lut;
            record[1 + b] = lut;
        }
    }
}

// ---- statistical: verification -----------------------------------------------------------------

// Warp per chunk: the bins each rank's codes use (ORed into masks[rank * groups + group]), and
// the smallest flat index whose average is not finite.
template <int Bits>
__global__ void __launch_bounds__(block_threads)
    stat_inspect_kernel(table_view t, stat_view v, gathered_payloads g, verdict_view vd,
                        unsigned* masks) {
    using codec = compress::statistical<Bits>;
    const std::uint64_t index =
        static_cast<std::uint64_t>(blockIdx.x) * (block_threads / 32) + threadIdx.x / 32;
    if (index >= v.chunk_count) {
        return;
    }
    const unsigned lane = threadIdx.x % 32;
    const stat_chunk c = v.chunks[index];
    const std::uint32_t tensor = v.groups[c.group].tensor;
    const compress_tensor ct = v.tensors[tensor];
    const std::byte* codes =
        g.base + compress::wire::header_bytes + ct.body + codec::record_bytes * ct.blocks;
    for (std::uint32_t k = 0; k < g.ranks; ++k) {
        unsigned used = 0;
        for (unsigned i = lane; i < c.count; i += 32) {
            used |= 1u << compress::wire::unpack<Bits>(codes + k * g.stride, c.first + i);
        }
#pragma unroll
        for (unsigned m = 16; m > 0; m /= 2) {
            used |= __shfl_xor_sync(full_mask, used, static_cast<int>(m));
        }
        if (lane == 0) {
            atomicOr(masks + k * v.group_count + c.group, used);
        }
    }
    const std::uint64_t flat = t.tensors[tensor].flat_offset;
    for (unsigned i = lane; i < c.count; i += 32) {
        float avg;
        average<codec, 1>(g, ct.body, ct.blocks, ct.cols, c.first + i, &avg, nullptr);
        if (!math::isfinite(avg)) {
            atomicMin(vd.nonfinite, flat + c.first + i);
            break;  // this lane's later elements have larger indices
        }
    }
}

// Thread per (rank, group): a nonzero table entry for a bin no code uses; then thread per (rank,
// tensor): padding bits after the last code and alignment bytes. statistical::decode's checks.
template <int Bits>
__global__ void __launch_bounds__(block_threads)
    stat_check_kernel(stat_view v, gathered_payloads g, verdict_view vd, const unsigned* masks) {
    using codec = compress::statistical<Bits>;
    const std::uint64_t id = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    const std::uint64_t group_items = g.ranks * v.group_count;
    if (id < group_items) {
        const std::uint64_t k = id / v.group_count;
        const stat_group gr = v.groups[id % v.group_count];
        const auto* record = reinterpret_cast<const std::uint32_t*>(
            g.base + k * g.stride + compress::wire::header_bytes + gr.record);
        const unsigned used = masks[id];
        for (unsigned b = 0; b < codec::bins; ++b) {
            if (((used >> b) & 1u) == 0 && record[1 + b] != 0u) {
                atomicOr(vd.flags + k, bad_unused_bin);
            }
        }
    } else if (id < group_items + g.ranks * v.tensor_count) {
        const std::uint64_t q = id - group_items;
        const std::uint64_t k = q / v.tensor_count;
        const compress_tensor ct = v.tensors[q % v.tensor_count];
        const std::uint64_t n = ct.blocks * ct.cols;
        const std::byte* codes = g.base + k * g.stride + compress::wire::header_bytes + ct.body +
                                 codec::record_bytes * ct.blocks;
        constexpr std::uint64_t per_byte = 8 / Bits;
        const std::uint64_t packed = compress::wire::packed_bytes<Bits>(n);
        for (std::uint64_t j = n; j < packed * per_byte; ++j) {
            if (compress::wire::unpack<Bits>(codes, j) != 0) {
                atomicOr(vd.flags + k, bad_padding_bits);
            }
        }
        for (std::uint64_t i = packed; i < code_bytes<Bits>(n); ++i) {
            if (codes[i] != std::byte{0}) {
                atomicOr(vd.flags + k, bad_padding_bytes);
            }
        }
    }
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

namespace detail {

// statistical<Bits>: passes over the chunks of every group (warp per chunk) with a one-thread-per-
// group kernel after each sum. The code region is zeroed first: codes of rows that start inside
// a word are ORed in.
//   pass 1   e (x, or decay * residual + s * x), stored into the new residual buffer with error
//            feedback; per chunk the sum of e                        -> finish: shift
//   pass 2   per chunk the sum of (e - shift)^2                      -> finish: scale
//   pass 3   codes written; per chunk and bin the sum of e - shift and the count -> finish: lut
//   pass 4   (error feedback) residual = e - (lut[q] + shift)
template <class Codec, bool Feedback, encode_from From, bf16_update Mode, unsigned Combos>
void encode_statistical(const compress_plan<Codec>& plan, const tensor_table& table,
                        const typename Codec::hyper& h, const encode_params& a,
                        cudaStream_t stream) {
    constexpr int Bits = codec_traits<Codec>::bits;
    const std::uint64_t len = plan.payload_bytes() - compress::wire::header_bytes;
    LOCO_CUDA_CHECK(cudaMemsetAsync(plan.checksum_accumulator(), 0, sizeof(unsigned long long),
                                    stream));
    if (len != 0) {
        LOCO_CUDA_CHECK(cudaMemsetAsync(a.payload + compress::wire::header_bytes, 0, len, stream));
    }
    const stat_view& v = plan.stats();
    const auto chunk_grid = static_cast<std::uint32_t>((v.chunk_count + 7) / 8);
    const auto group_grid = static_cast<std::uint32_t>((v.group_count + block_threads - 1) /
                                                       block_threads);
#if LOCO_HAS_CUDA()
    if (v.chunk_count != 0) {
        const table_view t = table.view();
        LOCO_CUDA_CHECK(launch(stat_pass_kernel<Bits, 1, Feedback, From, Mode, Combos>,
                               chunk_grid, stream, t, v, a));
        LOCO_CUDA_CHECK(launch(stat_finish_kernel<Bits, 1>, group_grid, stream, v, a.payload,
                               h.range));
        LOCO_CUDA_CHECK(launch(stat_pass_kernel<Bits, 2, Feedback, From, Mode, Combos>,
                               chunk_grid, stream, t, v, a));
        LOCO_CUDA_CHECK(launch(stat_finish_kernel<Bits, 2>, group_grid, stream, v, a.payload,
                               h.range));
        LOCO_CUDA_CHECK(launch(stat_pass_kernel<Bits, 3, Feedback, From, Mode, Combos>,
                               chunk_grid, stream, t, v, a));
        LOCO_CUDA_CHECK(launch(stat_finish_kernel<Bits, 3>, group_grid, stream, v, a.payload,
                               h.range));
        if constexpr (Feedback) {
            LOCO_CUDA_CHECK(launch(stat_pass_kernel<Bits, 4, Feedback, From, Mode, Combos>,
                                   chunk_grid, stream, t, v, a));
        }
    }
    const gathered_payloads self{a.payload, plan.payload_bytes(), 1, 0};
    launch_checksum(self, len, plan.checksum_accumulator(), stream);
    LOCO_CUDA_CHECK(launch(header_kernel<>, 1, stream, a.payload, plan.prefix(h),
                           plan.checksum_accumulator(), len));
#else
    static_cast<void>(table);
    static_cast<void>(sp);
    static_cast<void>(chunk_grid);
    static_cast<void>(group_grid);
#endif
}

}  // namespace detail

}  // namespace loco::backend::cuda
