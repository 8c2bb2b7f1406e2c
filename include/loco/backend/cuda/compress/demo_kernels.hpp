#pragma once
// DeMo / DisTrO's compressor on the device (compress/demo.hpp): payloads byte for byte the host's,
// residuals bit for bit, for the fp32 and the sign variants.
//
// encode(x, e) is one CTA per chunk, fused (the chunk of at most 64 x 64 cells stays in shared
// memory):
//   e = decay * e + x                (__fmul_rn / __fadd_rn: the host's rounding), written back
//   C = DCT of the chunk             two small products in double, as compress/dct.hpp orders
//                                    them: t[r][d] = sum_c e[r][c] F_w[c][d] (c ascending), then
//                                    C[b][d] = sum_r F_h[r][b] t[r][d] (r ascending), each term
//                                    rounded before it is added (__dmul_rn / __dadd_rn), so the
//                                    sums are the host's bit for bit; one thread per output, the
//                                    bases (computed on the host, dct::basis) read from global
//                                    memory, t in shared memory
//   the chunk's top-k                chunked_kernels.hpp's select_chunk; values as topk::wire_value
//                                    makes them, written to the payload, or their sign bits
//   e -= inverse DCT of what was sent  the same two products backwards (dct::chunk_transform::
//                                    inverse's order, zero coefficients skipped as there)
// then the index (and sign) streams are packed and the checksum and header written. The dense
// arrays are read once and written once (12 B per element); the DCT costs 2 (h + w) double
// multiply-adds per element each way, which makes the encode compute-bound on double throughput
// rather than bandwidth-bound (bench/cuda/ measures it against a copy).
//
// decode(payload) (a payload that passed compress::demo's checks): per chunk, the inverse DCT of
// the sent coefficients (or +-1), as the host's decode.
//
// decode_scatter_mean(M payloads): the references' aggregation (compress::demo::
// decode_scatter_mean), one CTA per chunk: the coefficients summed in double in payload order in
// shared memory, divided by their counts, then one inverse DCT.

#include <loco/backend/cuda/compress/chunked_kernels.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/compress/dct.hpp>
#include <loco/compress/demo.hpp>
#include <loco/compress/topk.hpp>
#include <loco/config.hpp>
#include <loco/float16.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace loco::backend::cuda {

// The layout, bases and workspace of DeMo payloads for fixed settings and segments.
class demo_plan {
public:
    using codec = compress::demo;

    demo_plan(const codec::hyper& h, std::span<const compress::segment> segs,
              std::size_t elements)
        : layout_(h, segs, elements) {
        layout_.add_streams(h.sign ? 1u : 0u);
        // One basis per distinct side, in double, as dct::basis computes it on the host.
        std::vector<double> bases;
        std::map<std::uint32_t, std::uint32_t> at;
        const auto basis_of = [&](std::uint32_t n) {
            const auto found = at.find(n);
            if (found != at.end()) return found->second;
            const auto offset = static_cast<std::uint32_t>(bases.size());
            const std::vector<double> f = compress::dct::basis(n);
            bases.insert(bases.end(), f.begin(), f.end());
            at.emplace(n, offset);
            return offset;
        };
        layout_.for_each_segment([&](chunked_segment& s) {
            s.basis_h = basis_of(s.h);
            s.basis_w = basis_of(s.w);
        });
        layout_.upload(std::move(bases));
    }

    const chunked_layout<codec>& layout() const noexcept { return layout_; }
    std::size_t payload_bytes() const noexcept { return layout_.payload_bytes(); }
    std::size_t elements() const noexcept { return layout_.elements(); }

private:
    chunked_layout<codec> layout_;
};

template <>
struct device_chunked<compress::demo> {
    static constexpr bool available = true;
    using plan = demo_plan;
};

namespace detail {

#if LOCO_HAS_CUDA()

// The CTA's chunk (chunked_kernels.hpp) and the DCT bases of its sides, F_h (h x h) and F_w
// (w x w), row-major.
struct demo_chunk : cta_chunk {
    const double* fh;
    const double* fw;
};

__device__ __forceinline__ demo_chunk this_chunk(const chunked_segment* segs,
                                                 const std::uint32_t* chunk_segment,
                                                 const double* basis) {
    const cta_chunk c = this_cta_chunk(segs, chunk_segment);
    return {c, basis + c.s.basis_h, basis + c.s.basis_w};
}

// The chunk's sent coefficients are slots [first, first + k) (ascending cells); row_start[b] ..
// row_start[b + 1] are those of row b. Returns the value of slot j.
struct demo_sent {
    const std::uint32_t* cell;  // the slots' cells (encode) or null (decode: read the payload)
    const float* value;         // fp32 values (encode, or the payload's), or null for signs
    const std::byte* indices;   // decode: the index stream
    const std::byte* signs;     // the sign stream (sign variant)
    const std::uint32_t* sign_codes;  // encode, sign variant: the slots' sign bits
    std::uint64_t first;        // first slot (of the arrays above): chunk first / k's
    compress::index_code::chunk_indices coding;

    __device__ std::uint32_t cell_of(unsigned j) const {
        return cell != nullptr ? cell[first + j]
                               : compress::index_code::cell(indices, coding, first / coding.k, j);
    }
    __device__ float value_of(unsigned j) const {
        if (value != nullptr) return value[first + j];
        const unsigned bit = sign_codes != nullptr
                                 ? sign_codes[first + j]
                                 : compress::wire::get_bits(signs, first + j, 1);
        return bit != 0 ? -1.0f : 1.0f;
    }
};

// A pass over the chunk's rows (x in the flat layout, the chunk's own cells), in double, each term
// rounded before it is added (the host's order, compress/dct.hpp):
//   forward (encode)  t[r][d] = sum_c x[r][c] F_w[c][d], c ascending
//   inverse           t[b][c] = sum_d x[b][d] F_w[c][d], d ascending
// Zero x are skipped: the +-0 product never changes a sum that starts at +0, so skipping them
// only saves work (the host's inverse skips them too).
template <bool Inverse>
__device__ void demo_rows(const demo_chunk& ch, const float* x, double* t) {
    const chunked_segment& s = ch.s;
    const double* fw = ch.fw;
    for (unsigned o = threadIdx.x; o < ch.cells(); o += block_threads) {
        const unsigned r = o / s.w;
        const unsigned j = o % s.w;
        const std::uint64_t row = ch.element(r * s.w);
        double acc = 0.0;
        for (unsigned k = 0; k < s.w; ++k) {
            const double v = static_cast<double>(x[row + k]);
            if (v == 0.0) continue;
            acc = __dadd_rn(acc, __dmul_rn(v, Inverse ? fw[j * s.w + k] : fw[k * s.w + j]));
        }
        t[o] = acc;
    }
}

// The inverse DCT's second pass, x[r][c] = sum_b F_h[r][b] t[b][c] (b ascending, the host's
// order, no fused multiply-add); put(o, x) for each cell o = r * w + c of the chunk.
template <class Put>
__device__ void demo_columns(const demo_chunk& ch, const double* t, Put put) {
    const chunked_segment& s = ch.s;
    const double* fh = ch.fh;
    for (unsigned o = threadIdx.x; o < ch.cells(); o += block_threads) {
        const unsigned r = o / s.w;
        const unsigned c = o % s.w;
        double acc = 0.0;
        for (unsigned b = 0; b < s.h; ++b) {
            acc = __dadd_rn(acc, __dmul_rn(fh[r * s.h + b], t[b * s.w + c]));
        }
        put(o, acc);
    }
}

// D = the inverse DCT of the sent coefficients; apply(i, D) for each element of the chunk.
// t: shared scratch of h * w doubles; row_start: shared, h + 1 entries.
template <class Apply>
__device__ void demo_inverse(const demo_chunk& ch, const demo_sent& sent, double* t,
                             unsigned* row_start, Apply apply) {
    const chunked_segment& s = ch.s;
    const unsigned cells = ch.cells();
    const double* fw = ch.fw;
    if (threadIdx.x == 0) {
        unsigned j = 0;
        for (unsigned b = 0; b <= s.h; ++b) {
            while (j < s.k && sent.cell_of(j) < b * s.w) ++j;
            row_start[b] = j;
        }
    }
    __syncthreads();
    // t[b][c] = sum_d C[b][d] F_w[c][d], d ascending, zero coefficients skipped
    for (unsigned o = threadIdx.x; o < cells; o += block_threads) {
        const unsigned b = o / s.w;
        const unsigned c = o % s.w;
        double acc = 0.0;
        for (unsigned j = row_start[b]; j < row_start[b + 1]; ++j) {
            const double v = static_cast<double>(sent.value_of(j));
            if (v == 0.0) continue;
            const unsigned d = sent.cell_of(j) % s.w;
            acc = __dadd_rn(acc, __dmul_rn(v, fw[c * s.w + d]));
        }
        t[o] = acc;
    }
    __syncthreads();
    demo_columns(ch, t, [&](unsigned o, double x) { apply(ch.element(o), static_cast<float>(x)); });
}

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    demo_encode_kernel(const chunked_segment* segs, const std::uint32_t* chunk_segment,
                       const double* basis, float decay, bool sign, const float* x,
                       const float* e_in, float* e,
                       std::uint32_t* slot_cell, float* slot_value, std::uint32_t* slot_code,
                       std::byte* payload) {
    __shared__ double t[chunked_max_cells];
    __shared__ chunk_select_shared sh;
    __shared__ unsigned row_start[chunked_max_side + 1];
    const demo_chunk ch = this_chunk(segs, chunk_segment, basis);
    const chunked_segment& s = ch.s;
    const std::uint64_t local = ch.local;
    const unsigned cells = ch.cells();
    for (unsigned j = threadIdx.x; j < cells; j += block_threads) {
        const std::uint64_t i = ch.element(j);
        e[i] = __fadd_rn(__fmul_rn(decay, e_in[i]), x[i]);
    }
    __syncthreads();
    demo_rows<false>(ch, e, t);  // t[r][d] = sum_c e[r][c] F_w[c][d]
    __syncthreads();
    // C[b][d] = sum_r F_h[r][b] t[r][d], r ascending; held in registers, then over t as fp32
    constexpr unsigned per_thread = chunked_max_cells / block_threads;
    float mine[per_thread];
    for (unsigned m = 0, o = threadIdx.x; o < cells; ++m, o += block_threads) {
        const unsigned b = o / s.w;
        const unsigned d = o % s.w;
        double acc = 0.0;
        for (unsigned r = 0; r < s.h; ++r) {
            acc = __dadd_rn(acc, __dmul_rn(ch.fh[r * s.h + b], t[r * s.w + d]));
        }
        mine[m] = static_cast<float>(acc);
    }
    __syncthreads();
    float* coef = reinterpret_cast<float*>(t);
    for (unsigned m = 0, o = threadIdx.x; o < cells; ++m, o += block_threads) coef[o] = mine[m];
    __syncthreads();
    const std::uint64_t slot0 = s.slot0 + local * s.k;
    select_chunk(coef, cells, s.k, slot_cell + slot0, slot_value + slot0, sh);
    __syncthreads();
    // The sent values: one NaN, sign + (topk::wire_value); fp32 into the payload, or sign bits.
    for (unsigned j = threadIdx.x; j < s.k; j += block_threads) {
        const float v = compress::topk::wire_value(slot_value[slot0 + j]);
        slot_value[slot0 + j] = v;
        if (sign) {
            slot_code[slot0 + j] = loco::detail::float_bits(v) >> 31;
        } else {
            reinterpret_cast<float*>(payload + s.values)[local * s.k + j] = v;
        }
    }
    __syncthreads();
    const demo_sent sent{slot_cell, sign ? nullptr : slot_value, nullptr, nullptr,
                         sign ? slot_code : nullptr, slot0, s.coding};
    demo_inverse(ch, sent, t, row_start,
                 [&](std::uint64_t i, float d) { e[i] = __fsub_rn(e[i], d); });
}

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    demo_decode_kernel(const chunked_segment* segs, const std::uint32_t* chunk_segment,
                       const double* basis, bool sign, const std::byte* payload, float* out) {
    __shared__ double t[chunked_max_cells];
    __shared__ unsigned row_start[chunked_max_side + 1];
    const demo_chunk ch = this_chunk(segs, chunk_segment, basis);
    const chunked_segment& s = ch.s;
    const demo_sent sent{nullptr,
                         sign ? nullptr : reinterpret_cast<const float*>(payload + s.values),
                         payload + s.indices,
                         payload + s.values,
                         nullptr,
                         ch.local * s.k,
                         s.coding};
    demo_inverse(ch, sent, t, row_start, [&](std::uint64_t i, float d) { out[i] = d; });
}

// The references' aggregation (compress::demo::decode_scatter_mean): per chunk, each cell's sent
// coefficients summed in double in payload order (t), counted, divided, rounded to fp32 and
// parked in out (the chunk's own elements, as scratch), then the inverse DCT from there.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    demo_scatter_mean_kernel(const chunked_segment* segs, const std::uint32_t* chunk_segment,
                             const double* basis, bool sign, const std::byte* gathered,
                             std::uint64_t stride, std::uint32_t payloads, float* out) {
    __shared__ double t[chunked_max_cells];
    __shared__ std::uint16_t count[chunked_max_cells];
    const demo_chunk ch = this_chunk(segs, chunk_segment, basis);
    const chunked_segment& s = ch.s;
    const std::uint64_t local = ch.local;
    const unsigned cells = ch.cells();
    for (unsigned o = threadIdx.x; o < cells; o += block_threads) {
        t[o] = 0.0;
        count[o] = 0;
    }
    __syncthreads();
    for (std::uint32_t p = 0; p < payloads; ++p) {  // the cells of one payload are distinct
        const std::byte* base = gathered + p * stride;
        for (unsigned j = threadIdx.x; j < s.k; j += block_threads) {
            const std::uint64_t slot = local * s.k + j;
            const std::uint32_t cell =
                compress::index_code::cell(base + s.indices, s.coding, local, j);
            const double v =
                sign ? (compress::wire::get_bits(base + s.values, slot, 1) != 0 ? -1.0 : 1.0)
                     : static_cast<double>(reinterpret_cast<const float*>(base + s.values)[slot]);
            t[cell] = __dadd_rn(t[cell], v);
            count[cell] = static_cast<std::uint16_t>(count[cell] + 1);
        }
        __syncthreads();
    }
    for (unsigned o = threadIdx.x; o < cells; o += block_threads) {
        out[ch.element(o)] =
            count[o] == 0 ? 0.0f : static_cast<float>(t[o] / static_cast<double>(count[o]));
    }
    __syncthreads();
    demo_rows<true>(ch, out, t);  // t[b][c] = sum_d C[b][d] F_w[c][d]
    __syncthreads();
    demo_columns(ch, t, [&](unsigned o, double x) { out[ch.element(o)] = static_cast<float>(x); });
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

// e = decay * e_in + x; payload = the host's encode of e; e -= decode(payload). x, e_in and e
// hold plan.elements() floats (the flat layout of the plan's segments; e_in may be e, and e's
// elements outside the segments are not written), payload plan.payload_bytes() bytes, 4-byte
// aligned; all device memory. Asynchronous on `stream`.
inline void demo_encode(const demo_plan& plan, const float* x, const float* e_in, float* e,
                        std::byte* payload, cudaStream_t stream) {
    detail::require_chunked_pointer(x, "demo_encode: x", plan.layout().chunks());
    detail::require_chunked_pointer(e_in, "demo_encode: the residual", plan.layout().chunks());
    detail::require_chunked_pointer(e, "demo_encode: the new residual", plan.layout().chunks());
    detail::require_payload_pointer(payload, "demo", "the payload");
#if LOCO_HAS_CUDA()
    const auto& l = plan.layout();
    if (l.chunks() > 0) {
        LOCO_CUDA_CHECK(detail::launch(detail::demo_encode_kernel<>,
                                       static_cast<std::uint32_t>(l.chunks()), stream,
                                       l.segment_table(), l.chunk_segment(), l.basis(),
                                       l.hyper().decay, l.hyper().sign, x, e_in, e, l.slot_cell(),
                                       l.slot_value(), l.slot_code(), payload));
        detail::pack_streams(l, payload, stream);
    }
    l.finish(payload, stream);
#else
    static_cast<void>(plan);
    static_cast<void>(stream);
#endif
}

// The same, updating e in place.
inline void demo_encode(const demo_plan& plan, const float* x, float* e, std::byte* payload,
                        cudaStream_t stream) {
    demo_encode(plan, x, e, e, payload, stream);
}

// out = decode(payload) on the plan's segments (elements outside them are not written). The
// payload must have passed the host's checks (compress::demo::decode refuses a malformed one).
inline void demo_decode(const demo_plan& plan, const std::byte* payload, float* out,
                        cudaStream_t stream) {
    detail::require_payload_pointer(payload, "demo", "the payload");
    detail::require_chunked_pointer(out, "demo_decode: out", plan.layout().chunks());
#if LOCO_HAS_CUDA()
    const auto& l = plan.layout();
    if (l.chunks() == 0) return;
    LOCO_CUDA_CHECK(detail::launch(detail::demo_decode_kernel<>,
                                   static_cast<std::uint32_t>(l.chunks()), stream,
                                   l.segment_table(), l.chunk_segment(), l.basis(), l.hyper().sign,
                                   payload, out));
#else
    static_cast<void>(plan);
    static_cast<void>(stream);
#endif
}

// The references' aggregation of M payloads on the device, with compress::demo::
// decode_scatter_mean's bits: gathered holds M payloads of plan.payload_bytes() bytes back to back
// (an all-gather's buffer, 4-byte aligned), each already checked by the host's rules.
inline void demo_decode_scatter_mean(const demo_plan& plan, const std::byte* gathered,
                                     std::uint32_t payloads, float* out, cudaStream_t stream) {
    detail::require_payload_pointer(gathered, "demo", "the gathered payloads");
    detail::require_chunked_pointer(out, "demo_decode_scatter_mean: out", plan.layout().chunks());
    if (payloads == 0 || payloads > 65535) {
        throw invalid_argument("loco::cuda: demo_decode_scatter_mean takes 1 to 65535 payloads, "
                               "got " + std::to_string(payloads));
    }
#if LOCO_HAS_CUDA()
    const auto& l = plan.layout();
    if (l.chunks() == 0) return;
    LOCO_CUDA_CHECK(detail::launch(detail::demo_scatter_mean_kernel<>,
                                   static_cast<std::uint32_t>(l.chunks()), stream,
                                   l.segment_table(), l.chunk_segment(), l.basis(), l.hyper().sign,
                                   gathered, static_cast<std::uint64_t>(l.payload_bytes()),
                                   payloads, out));
#else
    static_cast<void>(plan);
    static_cast<void>(stream);
#endif
}

}  // namespace loco::backend::cuda
