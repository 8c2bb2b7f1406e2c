#pragma once
// DeMo / DisTrO: decoupled momentum with DCT top-k compression (Peng, Quesnelle, Kingma,
// "DeMo: Decoupled Momentum Optimization", arXiv 2411.19870; bloc97/DeMo demo.py; Nous
// Research's DisTrO as Psyche runs it, PsycheFoundation/psyche shared/modeling/src/distro.rs).
// Each worker keeps a momentum-like residual e; per sync it sends, per chunk, the k largest
// DCT coefficients of e and removes what it sent from e. In the sign variant (Psyche's
// quantize_1bit) the values are one bit each and decode to +-1.
//
// Definition, per segment (chunks as in compress/chunking.hpp with target = chunk; the DCT of
// compress/dct.hpp on each chunk; e zero at the start):
//
//   e   <- decay * e + x                      (DeMo step: delta.mul_(decay).add_(grad, lr); here
//                                              x is the pseudo-gradient, lr folded into it)
//   C   =  DCT(chunk of e), per chunk          (TransformDCT.encode)
//   k_c =  min(max(topk, 1), cells)            (CompressDCT._clamp_topk)
//   send the k_c cells of largest |C| of each chunk (chunking.hpp order), with C's fp32 value,
//        or in the sign variant the sign bit of C (quantize_nozeros_tensor_to_boolean_sign:
//        signbit, so +0 sends +1 and -0 sends -1; a NaN is first made the canonical quiet NaN
//        0x7fc00000, as topk.hpp sends it, so it sends +1 whatever sign the arithmetic gave it;
//        one bit carries no NaN or infinity: the sender's residual keeps it, and the handle's
//        check of that residual drops the round, diloco.hpp)
//   D   =  inverse DCT of the sent coefficients, 0 at the others; in the sign variant a sent
//          coefficient is 1 - 2 * signbit, +-1 (unpack_tensor_sign_from_boolean)
//   e   <- e - D                              (state["delta"].sub_(transmit_grad); Psyche
//                                              subtracts its own transmitted, i.e. quantized,
//                                              results, so the sign variant subtracts the +-1
//                                              decode)
//   decode(payload) = D
//
// What the references do next: the receivers scatter-mean the peers' coefficients (each over the
// peers that sent it), apply one inverse DCT, and take the sign for a sign-SGD step. That
// aggregation is decode_scatter_mean below; the exchange of loco::diloco averages decoded payloads
// instead (see docs/compressors.md for where the two differ).
//
// Wire header: bits = 32, or 1 for signs, + 16 * indices (the index_coding); flags = 1 for
// signs, else 0; block = chunk | topk << 16 (a receiver with other settings is refused).
//
// Body, for each segment in order (C chunks, N = C k_c values, I the bits of one chunk's
// indices, compress/index_code.hpp):
//   the in-chunk indices, ascending within a chunk, chunk after chunk, I bits a chunk, as one bit
//     stream (wire::put_bits layout); zero-padded to a multiple of 4 bytes
//   fp32 values: 4 N bytes, in the same order; signs: N bits (1 = negative), zero-padded to a
//     multiple of 4 bytes
// Segment bytes: 4 ceil(ceil(C I / 8) / 4) + (4 N, or 4 ceil(ceil(N / 8) / 4) for signs).
//   indices = fixed:   I = k_c b, b = ceil(log2 cells) (12 bits an index for 64 x 64)
//   indices = compact (the default): I = 0 when a chunk keeps every cell, else the smaller of
//     Elias-Fano's k_c l + k_c + ((cells - 1) >> l), l = floor(log2(cells / k_c)), and k_c b.
// With the defaults (top-32 of 64 x 64): 9 bits an index instead of 12, so a sent value costs
// 41 bits instead of 44, and 10 instead of 13 in the sign variant.
//
// decode refuses, besides everything wire::open checks: an index not below the chunk's cells,
// indices not strictly ascending within a chunk (so no repeats), an Elias-Fano high part without
// exactly k_c ones, nonzero padding.

#include <loco/compress/chunking.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/dct.hpp>
#include <loco/compress/index_code.hpp>
#include <loco/compress/topk.hpp>
#include <loco/compress/wire.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace loco::compress {

struct demo {
    static constexpr std::string_view name = "demo";
    static constexpr std::uint8_t wire_id = 5;
    static constexpr int state_size = 1;  // the residual e

    struct hyper {
        std::uint32_t chunk = 64;  // target chunk side (DeMo compression_chunk)
        std::uint32_t topk = 32;   // coefficients kept per chunk (DeMo compression_topk)
        float decay = 0.999f;      // residual decay (DeMo compression_decay), in [0, 1)
        bool sign = false;         // Psyche's quantize_1bit: send signs, decode to +-1
        index_coding indices = index_coding::compact;  // how the kept cells travel
    };

    // The largest chunk side. Each distinct side keeps a side x side DCT basis in double (8 MB
    // at 1024; 34 GB at chunking's own limit of 65535) and the transform costs `side`
    // multiply-adds per element and direction. DeMo uses 64; the CUDA kernels take up to 64.
    static constexpr std::uint32_t max_chunk = 1024;

    static void validate(const hyper& h) {
        if (h.chunk > max_chunk) {
            throw invalid_argument(
                "loco::compress::demo: chunk must be at most " + std::to_string(max_chunk) +
                " (the DCT keeps a chunk x chunk basis and costs chunk multiply-adds per element "
                "and direction; DeMo uses 64), got " + std::to_string(h.chunk));
        }
        chunking::validate_chunk_topk(name, h.chunk, h.topk);
        if (!(h.decay >= 0.0f && h.decay < 1.0f)) {
            throw invalid_argument("loco::compress::demo: decay must be in [0, 1) (DeMo: 0.999)");
        }
        check_coding(name, h.indices);
    }

    // One bit a value carries no NaN or infinity (compressor.hpp).
    static constexpr bool carries_nonfinite(const hyper& h) { return !h.sign; }

    // Name and settings: what must match between ranks and checkpoints.
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " chunk=" << h.chunk << " topk=" << h.topk << " decay=" << h.decay
           << " sign=" << (h.sign ? 1 : 0) << " indices=" << to_string(h.indices);
        return os.str();
    }

    // Per segment: its chunks, the values kept per chunk and the byte sizes of the two parts.
    struct segment_layout {
        chunking::grid grid;
        std::size_t k = 0;      // k_c
        std::size_t sent = 0;   // N
        index_code::chunk_indices indices;
        std::size_t index_bytes = 0;
        std::size_t value_bytes = 0;
        std::size_t bytes() const noexcept { return index_bytes + value_bytes; }
    };

    static segment_layout layout_of(const hyper& h, const segment& s) {
        segment_layout l;
        l.grid = chunking::grid_of(s, h.chunk, name);
        if (s.size == 0) {
            return l;
        }
        l.k = std::min<std::size_t>(h.topk, l.grid.cells());
        l.sent = l.grid.chunks() * l.k;
        l.indices = index_code::code_of(h.indices, l.grid.cells(), l.k);
        l.index_bytes = chunking::padded_bit_bytes(l.grid.chunks() * l.indices.bits());
        l.value_bytes = h.sign ? chunking::padded_stream_bytes(l.sent, 1) : 4 * l.sent;
        return l;
    }

    // ---- the compressor interface ---------------------------------------------------------------

    static std::size_t payload_bytes(const hyper& h, std::span<const segment> segs) {
        validate(h);
        return wire::header_bytes + chunking::residual_codec<demo>::body_bytes(h, segs);
    }

    static void encode(const hyper& h, std::span<const float> x, std::span<const segment> segs,
                       std::span<float> state, const encode_context&, std::span<std::byte> out) {
        chunking::residual_codec<demo>::encode(h, h.decay, x, segs, state, out);
    }

    static void decode(const hyper& h, std::span<const std::byte> in, std::span<const segment> segs,
                       std::span<float> out) {
        chunking::residual_codec<demo>::decode(h, in, segs, out);
    }

    // The references' aggregation of M payloads (demo.py / Psyche's Distro::apply: scatter_reduce
    // "mean" with include_self=False, then one inverse DCT): per chunk, each coefficient is the
    // mean over the payloads that sent it (summed in double in payload order, divided by their
    // count, rounded to fp32 once; 0 where none did), then the chunk's inverse DCT as decode
    // applies it. With one payload it is decode, bit for bit; when every payload sends the same
    // cells it is the mean of the decodes up to rounding (the DCT is linear); otherwise each
    // coefficient is divided by its own count instead of M. Checks every payload first (what
    // decode refuses, loco::wire_error naming the payload), writing nothing on failure.
    static void decode_scatter_mean(const hyper& h, std::span<const std::span<const std::byte>> in,
                                    std::span<const segment> segs, std::span<float> out) {
        if (in.empty()) {
            throw invalid_argument("loco::compress::demo: decode_scatter_mean needs at least one "
                                   "payload");
        }
        std::vector<std::span<const std::byte>> bodies;
        for (std::size_t p = 0; p < in.size(); ++p) {
            try {
                bodies.push_back(
                    chunking::residual_codec<demo>::checked_body(h, in[p], segs, out.size()));
            } catch (const wire_error& e) {
                throw wire_error(std::string(e.what()) + " (payload " + std::to_string(p) + ")");
            }
        }
        std::vector<double> sum;
        std::vector<std::uint32_t> count;
        const auto mean_of_payloads = [&](const segment_layout& l, std::size_t at, std::size_t c,
                                          std::span<float> coef) {
            sum.assign(l.grid.cells(), 0.0);
            count.assign(l.grid.cells(), 0);
            for (const std::span<const std::byte> body : bodies) {
                for_each_sent(h, l, body, at, c, [&](std::uint32_t cell, float value) {
                    sum[cell] += static_cast<double>(value);
                    ++count[cell];
                });
            }
            for (std::size_t i = 0; i < coef.size(); ++i) {
                if (count[i] != 0) {
                    coef[i] = static_cast<float>(sum[i] / static_cast<double>(count[i]));
                }
            }
        };
        inverse_chunks(h, segs, out, mean_of_payloads);
    }

    // The sent coefficients and in-chunk indices of an fp32 vector x, without the residual:
    // encode() applies this to decay * e + x. out holds payload_bytes(h, segs).
    static void encode_values(const hyper& h, std::span<const float> x,
                              std::span<const segment> segs, std::span<std::byte> out) {
        std::fill(out.begin(), out.end(), std::byte{0});  // put_bits ORs into zeroed bytes
        std::vector<float> coef;
        std::vector<double> work;
        std::vector<std::uint32_t> order;
        std::vector<std::uint32_t> cells;  // the segment's kept cells, chunk after chunk
        std::size_t at = wire::header_bytes;
        for (const segment& s : segs) {
            const segment_layout l = layout_of(h, s);
            if (s.size == 0) {
                continue;
            }
            const dct::chunk_transform t(l.grid.h, l.grid.w);
            coef.resize(l.grid.cells());
            cells.resize(l.sent);
            std::byte* values = out.data() + at + l.index_bytes;
            for (std::size_t c = 0; c < l.grid.chunks(); ++c) {
                t.forward(x.data() + s.offset + l.grid.element(c, 0), l.grid.cols, coef.data(),
                          work);
                chunking::select_largest(coef, l.k, order);
                for (std::size_t j = 0; j < l.k; ++j) {
                    const std::size_t slot = c * l.k + j;
                    const float v = topk::wire_value(coef[order[j]]);  // one NaN, sign +
                    cells[slot] = order[j];
                    if (h.sign) {
                        wire::put_bits(values, slot, 1, std::signbit(v) ? 1u : 0u);
                    } else {
                        wire::put<float>(out, at + l.index_bytes + 4 * slot, v);
                    }
                }
            }
            chunking::write_index_stream(l.indices, cells.data(), l.grid.chunks(),
                                         out.subspan(at, l.index_bytes));
            at += l.bytes();
        }
        wire::write_header(out, expected_header(h, segs));
    }

    // The header of every payload of these settings and segments (a device encoder writes it).
    static wire::header expected_header_of(const hyper& h, std::span<const segment> segs) {
        return expected_header(h, segs);
    }

private:
    friend struct chunking::residual_codec<demo>;

    static wire::header expected_header(const hyper& h, std::span<const segment> segs) {
        wire::header w = chunking::residual_codec<demo>::header(h, segs);
        w.bits = header_bits(h.sign ? 1 : 32, h.indices);
        w.flags = h.sign ? 1 : 0;
        return w;
    }

    static void check_segment(const hyper& h, const segment_layout& l,
                              std::span<const std::byte> bytes) {
        const auto refuse = [](const std::string& what) {
            return wire_error("loco::compress::demo: malformed payload: " + what);
        };
        const std::span<const std::byte> indices = bytes.first(l.index_bytes);
        const std::string bad = chunking::check_index_stream(indices, l.grid.chunks(), l.indices);
        if (!bad.empty()) {
            throw refuse(bad);
        }
        if (h.sign && !chunking::padding_is_zero(bytes.subspan(l.index_bytes), l.sent)) {
            throw refuse("nonzero padding after the signs");
        }
    }

    // Writes D for every segment; the body has been checked (or was just written).
    static void decode_body(const hyper& h, std::span<const std::byte> body,
                            std::span<const segment> segs, std::span<float> out) {
        const auto sent_coefficients = [&](const segment_layout& l, std::size_t at, std::size_t c,
                                           std::span<float> coef) {
            for_each_sent(h, l, body, at, c,
                          [&](std::uint32_t cell, float value) { coef[cell] = value; });
        };
        inverse_chunks(h, segs, out, sent_coefficients);
    }

    // Calls f(cell, coefficient) for each slot chunk c of a checked body sends, in order: its
    // in-chunk cell and its coefficient (+-1 in the sign variant, else the fp32 value). `at` is
    // where the chunk's segment starts in the body.
    template <class F>
    static void for_each_sent(const hyper& h, const segment_layout& l,
                              std::span<const std::byte> body, std::size_t at, std::size_t c,
                              F&& f) {
        const std::byte* values = body.data() + at + l.index_bytes;
        index_code::for_each_cell(body.data() + at, l.indices, c,
                                  [&](std::uint32_t j, std::uint32_t cell) {
            const std::size_t slot = c * l.k + j;
            f(cell, h.sign ? (wire::get_bits(values, slot, 1) != 0 ? -1.0f : 1.0f)
                           : wire::get<float>(body, at + l.index_bytes + 4 * slot));
        });
    }

    // The chunk walk decode and decode_scatter_mean share, so both read a body's layout in one
    // place: per chunk of every segment, in payload order, fill(layout, segment start in the body,
    // chunk, coef) writes the chunk's coefficients into coef (zeroed first), then the chunk's
    // inverse DCT lands in out.
    template <class Fill>
    static void inverse_chunks(const hyper& h, std::span<const segment> segs, std::span<float> out,
                               Fill&& fill) {
        std::vector<float> coef;
        std::vector<double> work;
        std::size_t at = 0;
        for (const segment& s : segs) {
            const segment_layout l = layout_of(h, s);
            if (s.size == 0) {
                continue;
            }
            const dct::chunk_transform t(l.grid.h, l.grid.w);
            for (std::size_t c = 0; c < l.grid.chunks(); ++c) {
                coef.assign(l.grid.cells(), 0.0f);
                fill(l, at, c, std::span<float>(coef));
                t.inverse(coef.data(), out.data() + s.offset + l.grid.element(c, 0),
                          l.grid.cols, work);
            }
            at += l.bytes();
        }
    }
};

static_assert(compressor<demo>);

}  // namespace loco::compress
