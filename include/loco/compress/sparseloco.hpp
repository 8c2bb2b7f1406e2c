#pragma once
// SparseLoCo's compressor (Sarfi et al., "Communication Efficient LLM Pre-training with
// SparseLoCo", arXiv 2508.15706; Templar's reference code tplr-ai/templar src/tplr/compress.py,
// src/tplr/neurons.py, hparams/hparams.json): an error-feedback accumulator in place of outer
// momentum, chunked top-k of it, and 2-bit codes of the kept values decoded through a table of
// bin means.
//
// Definition, per segment (chunks as in compress/chunking.hpp with target = chunk, no DCT: the
// reference's use_dct is false; e zero at the start):
//
//   e   <- beta * e + x          (neurons.py: error_feedback.mul_(momentum_decay)
//                                 .add_(grad, alpha=outer_learning_rate); the lr is 1 there, and
//                                 x is the pseudo-gradient)
//   k_c  = min(topk, cells), then at least 2, then rounded down to even; 1 for a chunk of one
//          cell (TopKCompressor._clamp_topk; the reference fails on a one-cell chunk)
//   keep the k_c cells of largest |e| of each chunk (chunking.hpp order); v_j, j < N =
//          chunks * k_c, are their fp32 values, chunk after chunk, ascending cell within a chunk
//   quantize the v of the whole segment (TopKCompressor._quantize_values, B = bins):
//     shift = (sum_j v_j) / N                                       -> fp32
//     c_j   = v_j - shift
//     scale = range * sqrt(sum_j c_j^2 / (N - 1)) / B               -> fp32; 1 if that is 0, NaN
//                                                                      or inf, and for N = 1
//     q_j   = clamp(round_half_to_even(c_j / scale + floor(B / 2)), 0, B - 1)
//     lut_b = mean of c_j over the j with q_j = b; 0 for an empty bin  -> fp32
//   D    = lut[q_j] + shift at the kept cells, 0 elsewhere            (_dequantize_values,
//                                                                      decompress)
//   e   <- e - D                 (error_feedback.sub_(transmit_grad))
//   decode(payload) = D
//
// With B = 4 and range 6 (hparams.json: quantization_bins 4, quantization_range 6) one bin spans
// 1.5 sigma and the codes cover c/scale in [-2.5, 1.5]: the reference's offset is B / 2 on a
// range of B bins, so the rule is what the code does rather than a symmetric +-6 sigma grid.
// Sums (of v, of c^2, per bin) run in double from c_j = double(v_j) - double(shift), in two levels:
// each chunk's k_c terms in slot order, from +0, then the chunks' partial sums in chunk order,
// from +0 (so that a GPU sums a chunk in one thread and a segment's chunks in another, with the
// host's bits; backend/cuda/compress/sparseloco_kernels.hpp). q_j is computed in fp32,
// (v_j - shift) / scale + floor(B / 2), as torch does in fp32. A segment
// holding NaN or inf decodes to NaN at its kept cells (the NaN shift reaches every value).
//
// Not here: the receivers' aggregation (scatter-mean with each peer clipped to the median peer
// norm) and the outer SGD step (lr 1, no momentum); see docs/compressors.md.
//
// Wire header: bits = ceil(log2 B) (code width) + 16 * indices (the index_coding),
// flags = B - 1, block = chunk | topk << 16.
//
// Body, for each segment in order (C chunks, N = C k_c kept values, q = code width, and I the
// bits of one chunk's indices, compress/index_code.hpp):
//   shift, lut[0], ..., lut[B - 1]: 4 (1 + B) bytes of fp32 (nothing for an empty segment)
//   the in-chunk indices, ascending within a chunk, chunk after chunk, I bits a chunk, as one bit
//     stream (wire::put_bits layout); zero-padded to a multiple of 4 bytes
//   the N codes, q bits each, as one bit stream; zero-padded to a multiple of 4 bytes
// Segment bytes: 4 (1 + B) + 4 ceil(ceil(C I / 8) / 4) + 4 ceil(ceil(N q / 8) / 4).
//   indices = fixed:   I = k_c b, b = ceil(log2 cells) (templar's 12-bit indices for 64 x 64)
//   indices = compact (the default): I = 0 when a chunk keeps every cell, else the smaller of
//     Elias-Fano's k_c l + k_c + ((cells - 1) >> l), l = floor(log2(cells / k_c)), and k_c b.
// With the defaults on a 64 x 64-divisible matrix of n elements: N = n / 64, I = 511 (l = 6),
// q = 2, so about 20 + 1.25 N bytes, n / 51.2: 204.8x smaller than fp32 as n grows (fixed:
// 12-bit indices, 20 + 1.75 N bytes, 146.3x).
//
// decode refuses, besides everything wire::open checks: an index not below the chunk's cells,
// indices not strictly ascending within a chunk (so no repeats), an Elias-Fano high part without
// exactly k_c ones, a code not below B, a nonzero table entry for a bin no code uses, nonzero
// padding.

#include <loco/compress/bin_code.hpp>
#include <loco/compress/chunking.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/index_code.hpp>
#include <loco/compress/topk.hpp>
#include <loco/compress/wire.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace loco::compress {

struct sparseloco {
    static constexpr std::string_view name = "sparseloco";
    static constexpr std::uint8_t wire_id = 6;
    static constexpr int state_size = 1;  // the error-feedback accumulator e

    struct hyper {
        std::uint32_t chunk = 64;  // target chunk side (hparams.json target_chunk)
        std::uint32_t topk = 64;   // values kept per chunk (topk_compression)
        std::uint32_t bins = 4;    // quantization bins, 2 bits (quantization_bins)
        float range = 6.0f;        // in standard deviations (quantization_range)
        float beta = 0.95f;        // accumulator decay (momentum_decay), in [0, 1)
        index_coding indices = index_coding::compact;  // how the kept cells travel
    };

    static void validate(const hyper& h) {
        chunking::validate_chunk_topk(name, h.chunk, h.topk);
        if (h.bins < 2 || h.bins > 256) {
            throw invalid_argument("loco::compress::sparseloco: bins must be in [2, 256]");
        }
        if (!(h.range > 0.0f) || !math::isfinite(h.range)) {
            throw invalid_argument("loco::compress::sparseloco: range must be positive and finite");
        }
        if (!(h.beta >= 0.0f && h.beta < 1.0f)) {
            throw invalid_argument(
                "loco::compress::sparseloco: beta must be in [0, 1) (templar: 0.95)");
        }
        check_coding(name, h.indices);
    }

    // Name and settings: what must match between ranks and checkpoints.
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " chunk=" << h.chunk << " topk=" << h.topk << " bins=" << h.bins
           << " range=" << h.range << " beta=" << h.beta << " indices=" << to_string(h.indices);
        return os.str();
    }

    static unsigned code_bits(const hyper& h) noexcept {
        return static_cast<unsigned>(std::bit_width(h.bins - 1));
    }

    // k_c of a chunk of `cells` cells.
    static std::size_t kept(const hyper& h, std::size_t cells) noexcept {
        if (cells <= 1) {
            return cells;
        }
        std::size_t k = std::min<std::size_t>(h.topk, cells);
        k = std::max<std::size_t>(k, 2);
        return k - k % 2;
    }

    struct segment_layout {
        chunking::grid grid;
        std::size_t k = 0;     // k_c
        std::size_t sent = 0;  // N
        index_code::chunk_indices indices;
        std::size_t record_bytes = 0;
        std::size_t index_bytes = 0;
        std::size_t code_bytes = 0;
        std::size_t bytes() const noexcept { return record_bytes + index_bytes + code_bytes; }
    };

    static segment_layout layout_of(const hyper& h, const segment& s) {
        segment_layout l;
        l.grid = chunking::grid_of(s, h.chunk, name);
        if (s.size == 0) {
            return l;
        }
        l.k = kept(h, l.grid.cells());
        l.sent = l.grid.chunks() * l.k;
        l.indices = index_code::code_of(h.indices, l.grid.cells(), l.k);
        l.record_bytes = 4 * (1 + static_cast<std::size_t>(h.bins));
        l.index_bytes = chunking::padded_bit_bytes(l.grid.chunks() * l.indices.bits());
        l.code_bytes = chunking::padded_stream_bytes(l.sent, code_bits(h));
        return l;
    }

    // ---- per value ------------------------------------------------------------------------------

    // A kept value's bin and decoding, D = lut[q] + shift: the rule of compress/bin_code.hpp
    // (host and device encoders and decoders alike).
    LOCO_HD static unsigned code(float v, float shift, float scale, unsigned bins) noexcept {
        return bin_code::code(v, shift, scale, bins);
    }
    LOCO_HD static float value(float lut_entry, float shift) noexcept {
        return bin_code::value(lut_entry, shift);
    }

    LOCO_HD static float canonical(float v) noexcept {
        return v == v ? v : loco::detail::float_from_bits(0x7fc00000u);
    }

    // ---- the compressor interface ---------------------------------------------------------------

    static std::size_t payload_bytes(const hyper& h, std::span<const segment> segs) {
        validate(h);
        return wire::header_bytes + chunking::residual_codec<sparseloco>::body_bytes(h, segs);
    }

    static void encode(const hyper& h, std::span<const float> x, std::span<const segment> segs,
                       std::span<float> state, const encode_context&, std::span<std::byte> out) {
        chunking::residual_codec<sparseloco>::encode(h, h.beta, x, segs, state, out);
    }

    static void decode(const hyper& h, std::span<const std::byte> in, std::span<const segment> segs,
                       std::span<float> out) {
        chunking::residual_codec<sparseloco>::decode(h, in, segs, out);
    }

    // Which elements a payload carries: sent[i] = 1 at its kept cells, 0 elsewhere (SparseLoCo's
    // receivers average each element over the peers that sent it; aggregate/median_norm_clip.hpp).
    // Refuses what decode refuses, writing nothing.
    static void decode_support(const hyper& h, std::span<const std::byte> in,
                               std::span<const segment> segs, std::span<std::uint8_t> sent) {
        const std::span<const std::byte> body =
            chunking::residual_codec<sparseloco>::checked_body(h, in, segs, sent.size());
        std::size_t at = 0;
        for (const segment& s : segs) {
            const segment_layout l = layout_of(h, s);
            std::fill_n(sent.begin() + static_cast<std::ptrdiff_t>(s.offset), s.size, 0);
            const std::byte* indices = body.data() + at + l.record_bytes;
            for (std::size_t c = 0; c < l.grid.chunks(); ++c) {
                const auto mark = [&](std::uint32_t, std::uint32_t i) {
                    sent[s.offset + l.grid.element(c, i)] = 1;
                };
                index_code::for_each_cell(indices, l.indices, c, mark);
            }
            at += l.bytes();
        }
    }

    // The payload of an fp32 vector x without the accumulator: encode() applies this to
    // beta * e + x. out holds payload_bytes(h, segs).
    static void encode_values(const hyper& h, std::span<const float> x,
                              std::span<const segment> segs, std::span<std::byte> out) {
        std::fill(out.begin(), out.end(), std::byte{0});  // put_bits ORs into zeroed bytes
        const unsigned qb = code_bits(h);
        std::vector<float> chunk;
        std::vector<std::uint32_t> order;
        std::vector<std::uint32_t> cells;  // kept cell of each slot
        std::vector<float> v;              // kept value of each slot
        std::size_t at = wire::header_bytes;
        for (const segment& s : segs) {
            const segment_layout l = layout_of(h, s);
            if (s.size == 0) {
                continue;
            }
            cells.clear();
            v.clear();
            chunk.resize(l.grid.cells());
            for (std::size_t c = 0; c < l.grid.chunks(); ++c) {
                for (std::size_t j = 0; j < l.grid.cells(); ++j) {
                    chunk[j] = x[s.offset + l.grid.element(c, j)];
                }
                chunking::select_largest(chunk, l.k, order);
                for (std::size_t j = 0; j < l.k; ++j) {
                    cells.push_back(order[j]);
                    v.push_back(chunk[order[j]]);
                }
            }
            // Quantization over the segment's kept values; sums in two levels (top comment).
            const std::size_t n = v.size();
            const auto chunked_sum = [&](auto term) {
                double total = 0.0;
                for (std::size_t c = 0; c < l.grid.chunks(); ++c) {
                    double part = 0.0;
                    for (std::size_t j = c * l.k; j < (c + 1) * l.k; ++j) part += term(j);
                    total += part;
                }
                return total;
            };
            const double sum = chunked_sum([&](std::size_t j) { return static_cast<double>(v[j]); });
            const auto shift = static_cast<float>(sum / static_cast<double>(n));
            float scale = 1.0f;
            if (n >= 2) {
                const double squares = chunked_sum([&](std::size_t j) {
                    const double c = static_cast<double>(v[j]) - static_cast<double>(shift);
                    return c * c;
                });
                const double sigma = std::sqrt(squares / static_cast<double>(n - 1));
                scale = static_cast<float>(static_cast<double>(h.range) * sigma /
                                           static_cast<double>(h.bins));
                if (scale == 0.0f || !math::isfinite(scale)) {
                    scale = 1.0f;
                }
            }
            std::vector<double> bin_sum(h.bins, 0.0);
            std::vector<double> bin_part(h.bins, 0.0);
            std::vector<std::uint64_t> bin_count(h.bins, 0);
            std::byte* codes = out.data() + at + l.record_bytes + l.index_bytes;
            for (std::size_t j = 0; j < n; ++j) {
                const unsigned q = code(v[j], shift, scale, h.bins);
                bin_part[q] += static_cast<double>(v[j]) - static_cast<double>(shift);
                ++bin_count[q];
                wire::put_bits(codes, j, qb, q);
                if ((j + 1) % l.k == 0) {  // the chunk's partial sums, every bin, in chunk order
                    for (unsigned b = 0; b < h.bins; ++b) {
                        bin_sum[b] += bin_part[b];
                        bin_part[b] = 0.0;
                    }
                }
            }
            chunking::write_index_stream(l.indices, cells.data(), l.grid.chunks(),
                                         out.subspan(at + l.record_bytes, l.index_bytes));
            wire::put<float>(out, at, canonical(shift));
            for (unsigned b = 0; b < h.bins; ++b) {
                const float entry =
                    bin_count[b] == 0
                        ? 0.0f
                        : canonical(static_cast<float>(bin_sum[b] /
                                                       static_cast<double>(bin_count[b])));
                wire::put<float>(out, at + 4 * (1 + b), entry);
            }
            at += l.bytes();
        }
        wire::write_header(out, expected_header(h, segs));
    }

    // The header of every payload of these settings and segments (a device encoder writes it).
    static wire::header expected_header_of(const hyper& h, std::span<const segment> segs) {
        return expected_header(h, segs);
    }

private:
    friend struct chunking::residual_codec<sparseloco>;

    static wire::header expected_header(const hyper& h, std::span<const segment> segs) {
        wire::header w = chunking::residual_codec<sparseloco>::header(h, segs);
        w.bits = header_bits(code_bits(h), h.indices);
        w.flags = static_cast<std::uint8_t>(h.bins - 1);
        return w;
    }

    static void check_segment(const hyper& h, const segment_layout& l,
                              std::span<const std::byte> bytes) {
        const auto refuse = [](const std::string& what) {
            return wire_error("loco::compress::sparseloco: malformed payload: " + what);
        };
        if (l.sent == 0) {
            return;
        }
        const std::span<const std::byte> indices = bytes.subspan(l.record_bytes, l.index_bytes);
        const std::string bad = chunking::check_index_stream(indices, l.grid.chunks(), l.indices);
        if (!bad.empty()) {
            throw refuse(bad);
        }
        const unsigned qb = code_bits(h);
        const std::span<const std::byte> codes = bytes.subspan(l.record_bytes + l.index_bytes);
        std::vector<bool> used(h.bins, false);
        for (std::size_t j = 0; j < l.sent; ++j) {
            const std::uint32_t q = wire::get_bits(codes.data(), j, qb);
            if (q >= h.bins) {
                throw refuse("code " + std::to_string(q) + " of " + std::to_string(h.bins) +
                             " bins");
            }
            used[q] = true;
        }
        if (!chunking::padding_is_zero(codes, l.sent * qb)) {
            throw refuse("nonzero padding after the codes");
        }
        for (unsigned b = 0; b < h.bins; ++b) {
            if (!used[b] && loco::detail::float_bits(wire::get<float>(bytes, 4 * (1 + b))) != 0) {
                throw refuse("a nonzero table entry for an unused bin");
            }
        }
    }

    // Writes D for every segment; the body has been checked (or was just written).
    static void decode_body(const hyper& h, std::span<const std::byte> body,
                            std::span<const segment> segs, std::span<float> out) {
        const unsigned qb = code_bits(h);
        std::size_t at = 0;
        for (const segment& s : segs) {
            const segment_layout l = layout_of(h, s);
            std::fill_n(out.begin() + static_cast<std::ptrdiff_t>(s.offset), s.size, 0.0f);
            if (s.size == 0) {
                continue;
            }
            const float shift = wire::get<float>(body, at);
            const std::byte* indices = body.data() + at + l.record_bytes;
            const std::byte* codes = indices + l.index_bytes;
            for (std::size_t c = 0; c < l.grid.chunks(); ++c) {
                const auto put = [&](std::uint32_t j, std::uint32_t i) {
                    const std::uint32_t q = wire::get_bits(codes, c * l.k + j, qb);
                    out[s.offset + l.grid.element(c, i)] =
                        value(wire::get<float>(body, at + 4 * (1 + q)), shift);
                };
                index_code::for_each_cell(indices, l.indices, c, put);
            }
            at += l.bytes();
        }
    }
};

static_assert(compressor<sparseloco>);

}  // namespace loco::compress
