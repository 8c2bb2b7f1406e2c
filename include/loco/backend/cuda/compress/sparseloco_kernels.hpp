#pragma once
// SparseLoCo's compressor on the device (compress/sparseloco.hpp): payloads byte for byte the
// host's, accumulators bit for bit. The rule is the host's; the kernels only order its loops.
//
// encode(x, e), per pass (C chunks, N = sum of k_c kept values; one CTA per chunk, or one thread
// per chunk or per segment):
//   select   per chunk: e = beta * e + x (__fmul_rn / __fadd_rn, the host's rounding) written
//            back to e and held in shared memory; the top-k of the chunk (chunked_kernels.hpp)
//            into the slot arrays; one thread sums the chunk's kept values in double in slot
//            order. This is the only pass over the dense arrays: 8 B read + 4 B written per
//            element.
//   shift    per segment: the chunks' sums in chunk order, / N, to fp32 (the host's two-level sum,
//            sparseloco.hpp's top comment)
//   squares  per chunk: sum of (v - shift)^2 in double, slot order; scale per segment likewise
//   codes    per chunk: q_j = sparseloco::code (the host's function), the chunk's bin sums and
//            counts; then per segment and bin the table (bin sums in chunk order / counts) and
//            the record
//   pack     the index and code streams, one word per thread (chunked_kernels.hpp)
//   residual per chunk: e -= lut[q] + shift at the kept cells (the host's e - decode)
//   finish   checksum and header
// Only k_c of every chunk's cells are touched after the first pass, so the whole encode moves
// about 12 B per element plus some 24 B per kept value.
//
// decode(payload) (a payload that passed compress::sparseloco's checks): per chunk, zeros, then
// lut[q] + shift at its kept cells.
//
// decode_scatter_mean(M payloads, clip factors): aggregate::median_norm_clip's combine, one CTA per
// chunk (fp32 sums of f_k * D_k in payload order and counts in shared memory), given the factors.
// norms(M payloads): each payload's L2 norm per segment (median_norm_clip's n_k), one thread per
// (payload, chunk) then per (payload, segment); the median and the factors are the policy's own
// host code (median_norm_clip::factors_of) on these M x segments floats.

#include <loco/backend/cuda/compress/chunked_kernels.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/config.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace loco::backend::cuda {

// The layout and workspace of SparseLoCo payloads for fixed settings and segments.
class sparseloco_plan {
public:
    using codec = compress::sparseloco;

    sparseloco_plan(const codec::hyper& h, std::span<const compress::segment> segs,
                    std::size_t elements)
        : layout_(h, segs, elements) {
        layout_.add_streams(codec::code_bits(h));
        layout_.upload();
        chunk_sums_ = device_buffer<double>(layout_.chunks());
        bin_sums_ = device_buffer<double>(layout_.chunks() * h.bins);
        bin_counts_ = device_buffer<std::uint32_t>(layout_.chunks() * h.bins);
        stats_ = device_buffer<float>(static_cast<std::size_t>(layout_.segment_count()) *
                                      (2 + h.bins));
    }

    const chunked_layout<codec>& layout() const noexcept { return layout_; }
    std::size_t payload_bytes() const noexcept { return layout_.payload_bytes(); }
    std::size_t elements() const noexcept { return layout_.elements(); }
    double* chunk_sums() const noexcept { return chunk_sums_.get(); }
    double* bin_sums() const noexcept { return bin_sums_.get(); }
    std::uint32_t* bin_counts() const noexcept { return bin_counts_.get(); }
    float* stats() const noexcept { return stats_.get(); }  // per segment: shift, scale, lut

private:
    chunked_layout<codec> layout_;
    device_buffer<double> chunk_sums_;
    device_buffer<double> bin_sums_;
    device_buffer<std::uint32_t> bin_counts_;
    device_buffer<float> stats_;
};

template <>
struct device_chunked<compress::sparseloco> {
    static constexpr bool available = true;
    using plan = sparseloco_plan;
};

namespace detail {

#if LOCO_HAS_CUDA()

struct sparseloco_view {
    const chunked_segment* segs;
    const std::uint32_t* chunk_segment;
    std::uint32_t* cell;
    float* value;
    std::uint32_t* code;
    double* chunk_sums;
    double* bin_sums;
    std::uint32_t* bin_counts;
    float* stats;
    std::uint64_t chunks;
    std::uint32_t segments;
    std::uint32_t bins;
    float beta;
    float range;
};

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    sparseloco_select_kernel(sparseloco_view v, const float* x, const float* e_in, float* e) {
    __shared__ float vals[chunked_max_cells];
    __shared__ chunk_select_shared sh;
    const cta_chunk ch = this_cta_chunk(v.segs, v.chunk_segment);
    const chunked_segment& s = ch.s;
    const unsigned cells = ch.cells();
    for (unsigned j = threadIdx.x; j < cells; j += block_threads) {
        const std::uint64_t i = ch.element(j);
        const float a = __fadd_rn(__fmul_rn(v.beta, e_in[i]), x[i]);
        e[i] = a;
        vals[j] = a;
    }
    __syncthreads();
    const std::uint64_t slot0 = s.slot0 + ch.local * s.k;
    select_chunk(vals, cells, s.k, v.cell + slot0, v.value + slot0, sh);
    __syncthreads();
    if (threadIdx.x == 0) {
        double part = 0.0;
        for (unsigned j = 0; j < s.k; ++j) {
            part = __dadd_rn(part, static_cast<double>(v.value[slot0 + j]));
        }
        v.chunk_sums[ch.index] = part;
    }
}

// The second level of every sum here: a segment's per-chunk partial sums in chunk order, from +0.
__device__ inline double segment_total(const double* partial, const chunked_segment& s) {
    double total = 0.0;
    for (std::uint32_t c = 0; c < s.chunks; ++c) total = __dadd_rn(total, partial[s.chunk0 + c]);
    return total;
}

// Per segment: shift = (sum of the chunks' sums) / N.
template <int = 0>
__global__ void __launch_bounds__(block_threads) sparseloco_shift_kernel(sparseloco_view v) {
    const std::uint32_t g = blockIdx.x * block_threads + threadIdx.x;
    if (g >= v.segments) return;
    const chunked_segment s = v.segs[g];
    const double total = segment_total(v.chunk_sums, s);
    const double n = static_cast<double>(static_cast<std::uint64_t>(s.chunks) * s.k);
    v.stats[g * (2 + v.bins)] = static_cast<float>(total / n);
}

// Per chunk: sum of (v - shift)^2, slot order.
template <int = 0>
__global__ void __launch_bounds__(block_threads) sparseloco_square_kernel(sparseloco_view v) {
    const std::uint64_t c = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (c >= v.chunks) return;
    const std::uint32_t g = v.chunk_segment[c];
    const chunked_segment s = v.segs[g];
    const double shift = static_cast<double>(v.stats[g * (2 + v.bins)]);
    const std::uint64_t slot0 = s.slot0 + (c - s.chunk0) * s.k;
    double part = 0.0;
    for (unsigned j = 0; j < s.k; ++j) {
        const double d = __dadd_rn(static_cast<double>(v.value[slot0 + j]), -shift);
        part = __dadd_rn(part, __dmul_rn(d, d));
    }
    v.chunk_sums[c] = part;
}

// Per segment: scale = range * sigma / bins (1 when that is 0 or not finite, or N = 1).
template <int = 0>
__global__ void __launch_bounds__(block_threads) sparseloco_scale_kernel(sparseloco_view v) {
    const std::uint32_t g = blockIdx.x * block_threads + threadIdx.x;
    if (g >= v.segments) return;
    const chunked_segment s = v.segs[g];
    const std::uint64_t n = static_cast<std::uint64_t>(s.chunks) * s.k;
    float scale = 1.0f;
    if (n >= 2) {
        const double squares = segment_total(v.chunk_sums, s);
        const double sigma = sqrt(squares / static_cast<double>(n - 1));
        scale = static_cast<float>(__dmul_rn(static_cast<double>(v.range), sigma) /
                                   static_cast<double>(v.bins));
        if (scale == 0.0f || !math::isfinite(scale)) scale = 1.0f;
    }
    v.stats[g * (2 + v.bins) + 1] = scale;
}

// Per chunk: the codes and the chunk's bin sums and counts.
template <int = 0>
__global__ void __launch_bounds__(block_threads) sparseloco_code_kernel(sparseloco_view v) {
    const std::uint64_t c = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (c >= v.chunks) return;
    const std::uint32_t g = v.chunk_segment[c];
    const chunked_segment s = v.segs[g];
    const float shift = v.stats[g * (2 + v.bins)];
    const float scale = v.stats[g * (2 + v.bins) + 1];
    double* sums = v.bin_sums + c * v.bins;
    std::uint32_t* counts = v.bin_counts + c * v.bins;
    for (unsigned b = 0; b < v.bins; ++b) {
        sums[b] = 0.0;
        counts[b] = 0;
    }
    const std::uint64_t slot0 = s.slot0 + (c - s.chunk0) * s.k;
    for (unsigned j = 0; j < s.k; ++j) {
        const float a = v.value[slot0 + j];
        const unsigned q = compress::sparseloco::code(a, shift, scale, v.bins);
        v.code[slot0 + j] = q;
        const double centered = __dadd_rn(static_cast<double>(a), -static_cast<double>(shift));
        sums[q] = __dadd_rn(sums[q], centered);
        ++counts[q];
    }
}

// Per segment and bin: the table entry (bin sums in chunk order / counts) in the payload's record;
// bin 0's thread also writes the shift.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    sparseloco_table_kernel(sparseloco_view v, std::byte* payload) {
    const std::uint64_t item = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (item >= static_cast<std::uint64_t>(v.segments) * v.bins) return;
    const auto g = static_cast<std::uint32_t>(item / v.bins);
    const auto b = static_cast<unsigned>(item % v.bins);
    const chunked_segment s = v.segs[g];
    float* st = v.stats + g * (2 + v.bins);
    float* record = reinterpret_cast<float*>(payload + s.record);
    if (b == 0) {
        st[0] = compress::sparseloco::canonical(st[0]);
        record[0] = st[0];
    }
    double total = 0.0;
    std::uint64_t count = 0;
    for (std::uint32_t c = 0; c < s.chunks; ++c) {
        total = __dadd_rn(total, v.bin_sums[(s.chunk0 + c) * v.bins + b]);
        count += v.bin_counts[(s.chunk0 + c) * v.bins + b];
    }
    const float entry = count == 0 ? 0.0f
                                   : compress::sparseloco::canonical(
                                         static_cast<float>(total / static_cast<double>(count)));
    st[2 + b] = entry;
    record[1 + b] = entry;
}

// Per chunk: e -= lut[q] + shift at the kept cells.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    sparseloco_residual_kernel(sparseloco_view v, float* e) {
    const std::uint64_t c = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (c >= v.chunks) return;
    const std::uint32_t g = v.chunk_segment[c];
    const chunked_segment s = v.segs[g];
    const float* st = v.stats + g * (2 + v.bins);
    const std::uint64_t local = c - s.chunk0;
    const std::uint64_t slot0 = s.slot0 + local * s.k;
    for (unsigned j = 0; j < s.k; ++j) {
        const std::uint64_t i = chunked_element(s, local, v.cell[slot0 + j]);
        e[i] = __fsub_rn(e[i], compress::sparseloco::value(st[2 + v.code[slot0 + j]], st[0]));
    }
}

// Per chunk: zeros, then lut[q] + shift at the kept cells.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    sparseloco_decode_kernel(const chunked_segment* segs, const std::uint32_t* chunk_segment,
                             unsigned code_bits, const std::byte* payload, float* out) {
    const cta_chunk ch = this_cta_chunk(segs, chunk_segment);
    const chunked_segment& s = ch.s;
    for (unsigned j = threadIdx.x; j < ch.cells(); j += block_threads) {
        out[ch.element(j)] = 0.0f;
    }
    __syncthreads();
    const float* record = reinterpret_cast<const float*>(payload + s.record);
    const std::uint64_t first = ch.local * s.k;  // slot within the segment
    for (unsigned j = threadIdx.x; j < s.k; j += block_threads) {
        const std::uint32_t cell =
            compress::index_code::cell(payload + s.indices, s.coding, ch.local, j);
        const std::uint32_t q = compress::wire::get_bits(payload + s.values, first + j, code_bits);
        out[ch.element(cell)] = compress::sparseloco::value(record[1 + q], record[0]);
    }
}

// out += decode(payload) at the kept cells only, in fp32 (__fadd_rn): the dense out += D of the
// host's mean of decoded payloads, bit for bit, since D is +0 elsewhere and adding +0 never changes
// a sum that starts at +0. One CTA per chunk; the cells of one payload are distinct.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    sparseloco_decode_add_kernel(const chunked_segment* segs, const std::uint32_t* chunk_segment,
                                 unsigned code_bits, const std::byte* payload, float* out) {
    const cta_chunk ch = this_cta_chunk(segs, chunk_segment);
    const chunked_segment& s = ch.s;
    const float* record = reinterpret_cast<const float*>(payload + s.record);
    for (unsigned j = threadIdx.x; j < s.k; j += block_threads) {
        const std::uint64_t slot = ch.local * s.k + j;
        const std::uint32_t cell =
            compress::index_code::cell(payload + s.indices, s.coding, ch.local, j);
        const std::uint32_t q = compress::wire::get_bits(payload + s.values, slot, code_bits);
        const std::uint64_t i = ch.element(cell);
        out[i] = __fadd_rn(out[i], compress::sparseloco::value(record[1 + q], record[0]));
    }
}

// SparseLoCo's receive side (aggregate::median_norm_clip's combine, given its factors): per
// chunk, out = sum over the payloads that sent a cell (payload order, fp32) of f * D, divided by
// how many did; 0 where none did. Sums and counts in shared memory.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    sparseloco_scatter_mean_kernel(const chunked_segment* segs, const std::uint32_t* chunk_segment,
                                   unsigned code_bits, const std::byte* gathered,
                                   std::uint64_t stride, std::uint32_t payloads,
                                   const float* factors, std::uint32_t factor_stride, float* out) {
    __shared__ float sum[chunked_max_cells];
    __shared__ std::uint16_t count[chunked_max_cells];
    const cta_chunk ch = this_cta_chunk(segs, chunk_segment);
    const chunked_segment& s = ch.s;
    const std::uint64_t local = ch.local;
    const unsigned cells = ch.cells();
    for (unsigned o = threadIdx.x; o < cells; o += block_threads) {
        sum[o] = 0.0f;
        count[o] = 0;
    }
    __syncthreads();
    for (std::uint32_t p = 0; p < payloads; ++p) {  // the cells of one payload are distinct
        const std::byte* base = gathered + p * stride;
        const float* record = reinterpret_cast<const float*>(base + s.record);
        const float f = factors == nullptr ? 1.0f : factors[p * factor_stride + s.input];
        for (unsigned j = threadIdx.x; j < s.k; j += block_threads) {
            const std::uint64_t slot = local * s.k + j;
            const std::uint32_t cell =
                compress::index_code::cell(base + s.indices, s.coding, local, j);
            const std::uint32_t q = compress::wire::get_bits(base + s.values, slot, code_bits);
            const float d = compress::sparseloco::value(record[1 + q], record[0]);
            sum[cell] = __fadd_rn(sum[cell], __fmul_rn(d, f));
            count[cell] = static_cast<std::uint16_t>(count[cell] + 1);
        }
        __syncthreads();
    }
    for (unsigned o = threadIdx.x; o < cells; o += block_threads) {
        out[ch.element(o)] = count[o] == 0 ? sum[o] : sum[o] / static_cast<float>(count[o]);
    }
}

// aggregate::median_norm_clip's norms of M payloads, in two levels. Per (payload, chunk), one
// thread: the squares of the chunk's decoded kept values (lut[q] + shift, exact in double)
// summed in double in slot order.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    sparseloco_norm_chunk_kernel(const chunked_segment* segs, const std::uint32_t* chunk_segment,
                                 unsigned code_bits, const std::byte* gathered,
                                 std::uint64_t stride, std::uint64_t chunks,
                                 std::uint32_t payloads, double* partial) {
    const std::uint64_t item = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (item >= chunks * payloads) return;
    const std::uint64_t p = item / chunks;
    const std::uint64_t c = item % chunks;
    const chunked_segment s = segs[chunk_segment[c]];
    const std::byte* base = gathered + p * stride;
    const float* record = reinterpret_cast<const float*>(base + s.record);
    const std::uint64_t first = (c - s.chunk0) * s.k;
    double sq = 0.0;
    for (unsigned j = 0; j < s.k; ++j) {
        const std::uint32_t q = compress::wire::get_bits(base + s.values, first + j, code_bits);
        const double d =
            static_cast<double>(compress::sparseloco::value(record[1 + q], record[0]));
        sq = __dadd_rn(sq, __dmul_rn(d, d));
    }
    partial[item] = sq;
}

// Per (payload, segment), one thread: the chunks' sums in chunk order, the square root, to fp32.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    sparseloco_norm_segment_kernel(const chunked_segment* segs, std::uint32_t segments,
                                   std::uint64_t chunks, std::uint32_t payloads,
                                   std::uint32_t inputs, const double* partial, float* norms) {
    const std::uint64_t item = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (item >= static_cast<std::uint64_t>(segments) * payloads) return;
    const std::uint64_t p = item / segments;
    const chunked_segment s = segs[item % segments];
    norms[p * inputs + s.input] = static_cast<float>(sqrt(segment_total(partial + p * chunks, s)));
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

// e = beta * e_in + x; payload = the host's encode of e; e -= decode(payload). x, e_in and e
// hold plan.elements() floats (the flat layout of the plan's segments; e_in may be e, and e's
// elements outside the segments are not written), payload plan.payload_bytes() bytes, 4-byte
// aligned; all device memory. Asynchronous on `stream`. The handle encodes into a second
// accumulator (e_in is the current one) so that a sync that fails keeps the current one.
inline void sparseloco_encode(const sparseloco_plan& plan, const float* x, const float* e_in,
                              float* e, std::byte* payload, cudaStream_t stream) {
    detail::require_chunked_pointer(x, "sparseloco_encode: x", plan.layout().chunks());
    detail::require_chunked_pointer(e_in, "sparseloco_encode: the accumulator",
                                    plan.layout().chunks());
    detail::require_chunked_pointer(e, "sparseloco_encode: the new accumulator",
                                    plan.layout().chunks());
    detail::require_payload_pointer(payload, "sparseloco", "the payload");
#if LOCO_HAS_CUDA()
    const auto& l = plan.layout();
    const auto& h = l.hyper();
    const detail::sparseloco_view v{l.segment_table(), l.chunk_segment(), l.slot_cell(),
                                    l.slot_value(),    l.slot_code(),     plan.chunk_sums(),
                                    plan.bin_sums(),   plan.bin_counts(), plan.stats(),
                                    l.chunks(),        l.segment_count(), h.bins,
                                    h.beta,            h.range};
    if (l.chunks() > 0) {
        const std::uint32_t chunks = static_cast<std::uint32_t>(l.chunks());
        const std::uint32_t per_chunk = detail::chunked_thread_blocks(l.chunks());
        const std::uint32_t per_segment = detail::chunked_thread_blocks(l.segment_count());
        LOCO_CUDA_CHECK(
            detail::launch(detail::sparseloco_select_kernel<>, chunks, stream, v, x, e_in, e));
        LOCO_CUDA_CHECK(detail::launch(detail::sparseloco_shift_kernel<>, per_segment, stream, v));
        LOCO_CUDA_CHECK(detail::launch(detail::sparseloco_square_kernel<>, per_chunk, stream, v));
        LOCO_CUDA_CHECK(detail::launch(detail::sparseloco_scale_kernel<>, per_segment, stream, v));
        LOCO_CUDA_CHECK(detail::launch(detail::sparseloco_code_kernel<>, per_chunk, stream, v));
        LOCO_CUDA_CHECK(detail::launch(
            detail::sparseloco_table_kernel<>,
            detail::chunked_thread_blocks(std::uint64_t{l.segment_count()} * h.bins), stream, v,
            payload));
        detail::pack_streams(l, payload, stream);
        LOCO_CUDA_CHECK(
            detail::launch(detail::sparseloco_residual_kernel<>, per_chunk, stream, v, e));
    }
    l.finish(payload, stream);
#else
    static_cast<void>(plan);
    static_cast<void>(stream);
#endif
}

// The same, updating e in place.
inline void sparseloco_encode(const sparseloco_plan& plan, const float* x, float* e,
                              std::byte* payload, cudaStream_t stream) {
    sparseloco_encode(plan, x, e, e, payload, stream);
}

// out = decode(payload) on the plan's segments (elements outside them are not written). The
// payload must have passed the host's checks (compress::sparseloco::decode refuses a malformed
// one; the device trusts its indices and codes).
inline void sparseloco_decode(const sparseloco_plan& plan, const std::byte* payload, float* out,
                              cudaStream_t stream) {
    detail::require_payload_pointer(payload, "sparseloco", "the payload");
    detail::require_chunked_pointer(out, "sparseloco_decode: out", plan.layout().chunks());
#if LOCO_HAS_CUDA()
    const auto& l = plan.layout();
    if (l.chunks() == 0) return;
    LOCO_CUDA_CHECK(detail::launch(detail::sparseloco_decode_kernel<>,
                           static_cast<std::uint32_t>(l.chunks()), stream, l.segment_table(),
                           l.chunk_segment(), compress::sparseloco::code_bits(l.hyper()), payload,
                           out));
#else
    static_cast<void>(plan);
    static_cast<void>(stream);
#endif
}

// out += decode(payload) on the plan's segments, touching only the kept cells (out's other
// elements keep their values): the mean of decoded payloads as sums from +0, a payload at a time.
// The payload must have passed the host's checks.
inline void sparseloco_decode_add(const sparseloco_plan& plan, const std::byte* payload,
                                  float* out, cudaStream_t stream) {
    detail::require_payload_pointer(payload, "sparseloco", "the payload");
    detail::require_chunked_pointer(out, "sparseloco_decode_add: out", plan.layout().chunks());
#if LOCO_HAS_CUDA()
    const auto& l = plan.layout();
    if (l.chunks() == 0) return;
    LOCO_CUDA_CHECK(detail::launch(detail::sparseloco_decode_add_kernel<>,
                                   static_cast<std::uint32_t>(l.chunks()), stream,
                                   l.segment_table(), l.chunk_segment(),
                                   compress::sparseloco::code_bits(l.hyper()), payload, out));
#else
    static_cast<void>(plan);
    static_cast<void>(stream);
#endif
}

// SparseLoCo's aggregation on the device, bit for bit aggregate::median_norm_clip's combine:
// gathered holds M payloads of plan.payload_bytes() bytes back to back (an all-gather's buffer,
// 4-byte aligned), each already checked by the host's rules; factors (device memory, M x the
// plan's segment count, payload-major; null: all 1, the plain scatter-mean of clip = false) are
// median_norm_clip's clip factors f_k of each payload and segment (from sparseloco_norms and
// median_norm_clip::factors_of).
inline void sparseloco_decode_scatter_mean(const sparseloco_plan& plan, const std::byte* gathered,
                                           std::uint32_t payloads, const float* factors,
                                           float* out, cudaStream_t stream) {
    detail::require_payload_pointer(gathered, "sparseloco", "the gathered payloads");
    detail::require_chunked_pointer(out, "sparseloco_decode_scatter_mean: out",
                                    plan.layout().chunks());
    if (payloads == 0 || payloads > 65535) {
        throw invalid_argument("loco::cuda: sparseloco_decode_scatter_mean takes 1 to 65535 "
                               "payloads, got " + std::to_string(payloads));
    }
#if LOCO_HAS_CUDA()
    const auto& l = plan.layout();
    if (l.chunks() == 0) return;
    LOCO_CUDA_CHECK(detail::launch(
        detail::sparseloco_scatter_mean_kernel<>, static_cast<std::uint32_t>(l.chunks()), stream,
        l.segment_table(), l.chunk_segment(), compress::sparseloco::code_bits(l.hyper()), gathered,
        static_cast<std::uint64_t>(l.payload_bytes()), payloads, factors,
        static_cast<std::uint32_t>(l.segments().size()), out));
#else
    static_cast<void>(plan);
    static_cast<void>(factors);
    static_cast<void>(stream);
#endif
}

// aggregate::median_norm_clip's n_k of M gathered payloads (laid out as for
// sparseloco_decode_scatter_mean, each checked): norms (device, M x the plan's segment count,
// payload-major) gets the L2 norm of each payload's decoded values over each segment, 0 for an
// empty one; partial is a workspace of M x plan.layout().chunks() doubles. The squares are
// summed in double per chunk in slot order, then over the chunks in order; the host's rule sums
// them in element order, so a norm can differ from the host's in its last fp32 bit.
inline void sparseloco_norms(const sparseloco_plan& plan, const std::byte* gathered,
                             std::uint32_t payloads, double* partial, float* norms,
                             cudaStream_t stream) {
    detail::require_payload_pointer(gathered, "sparseloco", "the gathered payloads");
    detail::require_chunked_pointer(partial, "sparseloco_norms: the workspace",
                                    plan.layout().chunks());
    detail::require_chunked_pointer(norms, "sparseloco_norms: norms",
                                    std::uint64_t{payloads} * plan.layout().segments().size());
    const auto& l = plan.layout();
    const auto inputs = static_cast<std::uint32_t>(l.segments().size());
    LOCO_CUDA_CHECK(cudaMemsetAsync(norms, 0, sizeof(float) * payloads * inputs, stream));
#if LOCO_HAS_CUDA()
    if (l.chunks() == 0 || payloads == 0) return;
    const auto stride = static_cast<std::uint64_t>(l.payload_bytes());
    LOCO_CUDA_CHECK(detail::launch(detail::sparseloco_norm_chunk_kernel<>,
                                   detail::chunked_thread_blocks(l.chunks() * payloads), stream,
                                   l.segment_table(), l.chunk_segment(),
                                   compress::sparseloco::code_bits(l.hyper()), gathered, stride,
                                   l.chunks(), payloads, partial));
    LOCO_CUDA_CHECK(detail::launch(
        detail::sparseloco_norm_segment_kernel<>,
        detail::chunked_thread_blocks(std::uint64_t{l.segment_count()} * payloads), stream,
        l.segment_table(), l.segment_count(), l.chunks(), payloads, inputs, partial, norms));
#else
    static_cast<void>(stream);
#endif
}

}  // namespace loco::backend::cuda
