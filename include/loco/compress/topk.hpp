#pragma once
// Top-k sparsification: each segment sends its k largest-magnitude elements exactly, as (index,
// value) pairs, and the receiver reads zeros everywhere else. With error feedback (Stich et al.,
// "Sparsified SGD with memory", arXiv 1809.07599) what is not sent now is sent later; MuLoCo's
// TopKCompressor uses ratio 0.02 in its paper job files (facebookresearch/MuLoCo,
// jobs/muloco_paper/inner_sweep_distributed_quantized_topk.py).
//
// Definition, per segment of n > 0 elements:
//   k = min(n, max(1, ceil(ratio * n)))            (ratio * n evaluated in double)
//   send the k elements of largest |x|; between equal magnitudes the lower index goes first,
//   so the choice is a function of x alone. NaN counts as larger than every number (it is always
//   sent, so a non-finite pseudo-gradient still reaches the receiver); -0 and +0 are equal.
//   decode: x_i for a sent index i, 0 elsewhere.
// The order is that of magnitude_key() below, the bit pattern of |x| as an unsigned integer
// (every NaN the same key, above infinity), which orders every float and is the key a GPU radix
// select uses. A NaN is sent as the canonical quiet NaN 0x7fc00000, whatever its bits.
//
// Error bound: sent elements are exact; an element not sent decodes to 0, an error of |x| <=
// the smallest magnitude sent from its segment.
//
// Wire header: bits = 32 (value width), flags = 0, block = the fp32 bit pattern of ratio (a
// receiver with another ratio is refused even when it gives the same k).
//
// Body, for each segment in order: k u32 indices, strictly ascending, relative to the segment,
// then the k fp32 values in the same order. Segment bytes: 8 * k. A segment must have fewer than
// 2^32 elements (loco::shape_error otherwise).
//
// decode refuses, besides everything wire::open checks: an index not less than the segment's
// size, and indices that are not strictly ascending (so no duplicates). decode_support marks the
// sent indices (aggregate::median_norm_clip's "sent"), refusing the same payloads.

#include <loco/compress/compressor.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <sstream>
#include <string_view>
#include <vector>

namespace loco::compress {

struct topk {
    static constexpr std::string_view name = "topk";
    static constexpr std::uint8_t wire_id = 4;
    static constexpr int state_size = 0;

    struct hyper {
        float ratio = 0.02f;  // fraction of each segment sent
    };

    // Name and settings: what must match between ranks and checkpoints.
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " ratio=" << h.ratio;
        return os.str();
    }

    static void validate(const hyper& h) {
        if (!(h.ratio > 0.0f && h.ratio <= 1.0f)) {
            throw invalid_argument("loco::compress::topk: ratio must be in (0, 1]");
        }
    }

    // The sort key of the definition: larger key, larger magnitude; NaN above infinity.
    // Every NaN has one key, above infinity's, and is sent as the one canonical quiet NaN: the
    // same arithmetic gives different NaN bits on an x86 host and on a GPU, and neither the choice
    // of elements (ties between NaNs go to the lower index) nor the payload may depend on where
    // it was encoded.
    LOCO_HD static std::uint32_t magnitude_key(float x) noexcept {
        const std::uint32_t key = loco::detail::float_bits(x) & 0x7fffffffu;
        return key > 0x7f800000u ? 0x7fc00000u : key;
    }
    LOCO_HD static float wire_value(float x) noexcept {
        return x != x ? loco::detail::float_from_bits(0x7fc00000u) : x;
    }

    // How many elements a segment of n sends.
    static std::size_t count(const hyper& h, std::size_t n) {
        validate(h);
        if (n == 0) {
            return 0;
        }
        const double wanted = std::ceil(static_cast<double>(h.ratio) * static_cast<double>(n));
        return std::min(n, std::max<std::size_t>(1, static_cast<std::size_t>(wanted)));
    }

    // ---- the compressor interface ---------------------------------------------------------------

    static std::size_t payload_bytes(const hyper& h, std::span<const segment> segs) {
        return wire::header_bytes + body_bytes(h, segs);
    }

    static void encode(const hyper& h, std::span<const float> x, std::span<const segment> segs,
                       std::span<float>, const encode_context&, std::span<std::byte> out) {
        check_encode_buffers(h, x, segs, out.size());
        std::vector<std::uint32_t> order;
        std::size_t at = wire::header_bytes;
        for (const segment& s : segs) {
            const std::size_t k = count(h, s.size);
            select(x.subspan(s.offset, s.size), k, order);
            for (std::size_t j = 0; j < k; ++j) {
                wire::put<std::uint32_t>(out, at + 4 * j, order[j]);
                wire::put<float>(out, at + 4 * (k + j), wire_value(x[s.offset + order[j]]));
            }
            at += 8 * k;
        }
        wire::write_header(out, expected_header(h, segs));
    }

    static void decode(const hyper& h, std::span<const std::byte> in, std::span<const segment> segs,
                       std::span<float> out) {
        const std::span<const std::byte> body = checked_body(h, in, segs, out.size());
        std::size_t at = 0;
        for (const segment& s : segs) {
            const std::size_t k = count(h, s.size);
            std::fill_n(out.begin() + static_cast<std::ptrdiff_t>(s.offset), s.size, 0.0f);
            for (std::size_t j = 0; j < k; ++j) {
                const std::uint32_t i = wire::get<std::uint32_t>(body, at + 4 * j);
                out[s.offset + i] = wire::get<float>(body, at + 4 * (k + j));
            }
            at += 8 * k;
        }
    }

    // Which elements a payload carries: sent[i] = 1 at its indices, 0 elsewhere in each segment
    // (aggregate::median_norm_clip averages each element over the workers that sent it; without
    // this, a sent 0 and an element not sent were the same and every element was divided by M).
    // Refuses what decode refuses, writing nothing.
    static void decode_support(const hyper& h, std::span<const std::byte> in,
                               std::span<const segment> segs, std::span<std::uint8_t> sent) {
        const std::span<const std::byte> body = checked_body(h, in, segs, sent.size());
        std::size_t at = 0;
        for (const segment& s : segs) {
            const std::size_t k = count(h, s.size);
            std::fill_n(sent.begin() + static_cast<std::ptrdiff_t>(s.offset), s.size, 0);
            for (std::size_t j = 0; j < k; ++j) {
                sent[s.offset + wire::get<std::uint32_t>(body, at + 4 * j)] = 1;
            }
            at += 8 * k;
        }
    }

private:
    // The payload's body after every check of decode (settings, segments inside an output of
    // out_size, header, indices), before anything is written.
    static std::span<const std::byte> checked_body(const hyper& h, std::span<const std::byte> in,
                                                   std::span<const segment> segs,
                                                   std::size_t out_size) {
        check_decode_buffer(h, segs, out_size);
        const std::span<const std::byte> body = wire::open(in, expected_header(h, segs), name);
        std::size_t at = 0;
        for (const segment& s : segs) {
            check_indices(body.subspan(at, 4 * count(h, s.size)), s.size);
            at += 8 * count(h, s.size);
        }
        return body;
    }

    static std::size_t body_bytes(const hyper& h, std::span<const segment> segs) {
        std::size_t n = 0;
        for (const segment& s : segs) {
            n += 8 * count(h, s.size);
        }
        return n;
    }

    static wire::header expected_header(const hyper& h, std::span<const segment> segs) {
        wire::header w;
        w.compressor = wire_id;
        w.bits = 32;
        w.block = loco::detail::float_bits(h.ratio);
        w.segments = static_cast<std::uint32_t>(segs.size());
        for (const segment& s : segs) {
            w.elements += s.size;
        }
        w.body_bytes = body_bytes(h, segs);
        return w;
    }

    static void check_segment_size(const segment& s) {
        if (s.size > std::numeric_limits<std::uint32_t>::max()) {
            throw shape_error("loco::compress::topk: a segment of " + std::to_string(s.size) +
                              " elements; 32-bit indices address at most 2^32 - 1");
        }
    }

    static void check_encode_buffers(const hyper& h, std::span<const float> x,
                                     std::span<const segment> segs, std::size_t out_bytes) {
        for (const segment& s : segs) {
            check_segment_size(s);
            if (s.offset > x.size() || s.size > x.size() - s.offset) {
                throw shape_error("loco::compress::topk: a segment lies outside the input");
            }
        }
        if (out_bytes != payload_bytes(h, segs)) {
            throw shape_error("loco::compress::topk: the output buffer holds " +
                              std::to_string(out_bytes) + " bytes, payload_bytes() is " +
                              std::to_string(payload_bytes(h, segs)));
        }
    }

    static void check_decode_buffer(const hyper& h, std::span<const segment> segs,
                                    std::size_t out_size) {
        validate(h);
        for (const segment& s : segs) {
            check_segment_size(s);
            if (s.offset > out_size || s.size > out_size - s.offset) {
                throw shape_error("loco::compress::topk: a segment lies outside the output");
            }
        }
    }

    // The k indices of the definition, ascending, in order[0 .. k).
    static void select(std::span<const float> x, std::size_t k, std::vector<std::uint32_t>& order) {
        order.resize(x.size());
        std::iota(order.begin(), order.end(), std::uint32_t{0});
        const auto first = [&](std::uint32_t a, std::uint32_t b) {
            const std::uint32_t ka = magnitude_key(x[a]);
            const std::uint32_t kb = magnitude_key(x[b]);
            return ka != kb ? ka > kb : a < b;
        };
        const auto kth = order.begin() + static_cast<std::ptrdiff_t>(k);
        if (k < x.size()) {
            std::nth_element(order.begin(), kth, order.end(), first);
        }
        std::sort(order.begin(), kth);
    }

    static void check_indices(std::span<const std::byte> indices, std::size_t n) {
        for (std::size_t j = 0; j < indices.size() / 4; ++j) {
            const std::uint32_t i = wire::get<std::uint32_t>(indices, 4 * j);
            if (i >= n) {
                throw wire_error("loco::compress::topk: malformed payload: index " +
                                 std::to_string(i) + " in a segment of " + std::to_string(n));
            }
            if (j > 0 && i <= wire::get<std::uint32_t>(indices, 4 * (j - 1))) {
                throw wire_error(
                    "loco::compress::topk: malformed payload: indices are not strictly ascending");
            }
        }
    }
};

static_assert(compressor<topk>);

}  // namespace loco::compress
