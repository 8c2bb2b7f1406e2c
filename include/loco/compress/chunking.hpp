#pragma once
// Chunks of a segment, cut the way DeMo (bloc97/DeMo demo.py), DisTrO (PsycheFoundation/psyche
// shared/modeling/src/distro.rs, TransformDCT) and SparseLoCo (tplr-ai/templar
// src/tplr/compress.py, ChunkingTransformer) cut a tensor before they keep the top-k of each
// chunk. Shared by compress/demo.hpp and compress/sparseloco.hpp.
//
//   side(n, target) = the largest divisor of n that is <= target (_get_smaller_split in all three
//                     references; n itself when n <= target; 1 when n is a prime above target)
//   a matrix segment rows x cols is cut into chunks of h x w, h = side(rows, target),
//     w = side(cols, target), ordered by block row, then block column ("(y h) (x w) -> y x h w");
//   a 1-D segment of n elements (rows == 1) into n / w flat chunks of w = side(n, target): the
//     matrix rule with one row, as "(x w) -> x w" in the references;
//   cell j of a chunk is its element (j / w, j % w), row-major ("y x h w -> y x (h w)").
//
// Top-k of a chunk: the k cells of largest |value|, ties to the lower cell, NaN above every
// number, -0 == +0: topk::magnitude_key, the order compress/topk.hpp defines. The references
// call torch.topk(sorted=False), whose order among equal magnitudes is unspecified; the kept set
// is the same whenever magnitudes are distinct. Cells are sent in ascending order, so a decoder
// can refuse repeated or unsorted indices.

#include <loco/compress/compressor.hpp>
#include <loco/compress/index_code.hpp>
#include <loco/compress/topk.hpp>
#include <loco/compress/wire.hpp>
#include <loco/error.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace loco::compress::chunking {

// _get_smaller_split(n, target) for target >= 1 (0 for n = 0): the divisors come in pairs
// (d, n / d) with d <= sqrt(n).
constexpr std::size_t side(std::size_t n, std::size_t target) noexcept {
    if (n == 0) {
        return 0;
    }
    std::size_t best = 1;
    for (std::size_t d = 1; d <= n / d; ++d) {
        if (n % d == 0) {
            if (d <= target) {
                best = std::max(best, d);
            }
            if (n / d <= target) {
                best = std::max(best, n / d);
            }
        }
    }
    return best;
}

// The settings every chunked compressor has, checked alike: the chunk side and topk each travel
// in 16 bits of the header's block field, and a chunk must hold topk cells.
inline void validate_chunk_topk(std::string_view who, std::uint32_t chunk, std::uint32_t topk) {
    const auto refuse = [&](const char* what) {
        return invalid_argument("loco::compress::" + std::string(who) + ": " + what);
    };
    if (chunk < 1 || chunk > 65535) {
        throw refuse("chunk must be in [1, 65535]");
    }
    if (topk < 1 || topk > 65535) {
        throw refuse("topk must be in [1, 65535] (0 sends nothing)");
    }
    if (static_cast<std::uint64_t>(topk) > static_cast<std::uint64_t>(chunk) * chunk) {
        throw refuse("topk must not exceed the chunk's chunk x chunk cells; lower topk or raise "
                     "chunk");
    }
}

// Bits of an in-chunk index at fixed width: ceil(log2(cells)), 0 for chunks of one cell (12 for
// 64 x 64, the width of templar's pack_12bit_indices).
constexpr unsigned index_bits(std::size_t cells) noexcept { return index_code::fixed_width(cells); }

struct grid {
    std::size_t rows = 0;  // the segment seen as rows x cols
    std::size_t cols = 0;
    std::size_t h = 0;  // chunk sides
    std::size_t w = 0;

    std::size_t cells() const noexcept { return h * w; }
    std::size_t chunks() const noexcept { return cells() == 0 ? 0 : rows * cols / cells(); }

    // Position in the segment (row-major) of cell j of chunk c.
    std::size_t element(std::size_t c, std::size_t j) const noexcept {
        const std::size_t across = cols / w;
        return ((c / across) * h + j / w) * cols + (c % across) * w + j % w;
    }
};

// The chunks of a segment; a 2-D segment's rows must divide its size (loco::shape_error).
inline grid grid_of(const segment& s, std::size_t target, std::string_view who) {
    if (s.size == 0) {
        return {};
    }
    const std::size_t rows = s.rows <= 1 ? 1 : s.rows;
    if (s.size % rows != 0) {
        throw shape_error("loco::compress::" + std::string(who) + ": a segment of " +
                          std::to_string(s.size) + " elements cannot be " + std::to_string(rows) +
                          " rows; give rows that divide the size (or rows = 1 for a flat tensor)");
    }
    const std::size_t cols = s.size / rows;
    return {rows, cols, side(rows, target), side(cols, target)};
}

// The ascending cells of the k largest magnitudes of `chunk` (k <= chunk.size()), in order[0, k).
inline void select_largest(std::span<const float> chunk, std::size_t k,
                           std::vector<std::uint32_t>& order) {
    order.resize(chunk.size());
    std::iota(order.begin(), order.end(), std::uint32_t{0});
    const auto first = [&](std::uint32_t a, std::uint32_t b) {
        const std::uint32_t ka = topk::magnitude_key(chunk[a]);
        const std::uint32_t kb = topk::magnitude_key(chunk[b]);
        return ka != kb ? ka > kb : a < b;
    };
    const auto kth = order.begin() + static_cast<std::ptrdiff_t>(k);
    if (k < chunk.size()) {
        std::nth_element(order.begin(), kth, order.end(), first);
    }
    std::sort(order.begin(), kth);
}

// Bytes of a bit stream of `count` codes of `width` bits, padded with zero bytes to a multiple of
// 4 so that what follows stays 4-byte aligned.
constexpr std::size_t padded_stream_bytes(std::size_t count, unsigned width) noexcept {
    return (wire::bit_stream_bytes(count, width) + 3) / 4 * 4;
}

// The same for a stream of `bits` bits.
constexpr std::size_t padded_bit_bytes(std::uint64_t bits) noexcept {
    return static_cast<std::size_t>((bits + 31) / 32 * 4);
}

// True when every bit of `stream` after the first `used_bits` is zero.
inline bool padding_is_zero(std::span<const std::byte> stream, std::size_t used_bits) noexcept {
    for (std::size_t b = used_bits; b < 8 * stream.size(); ++b) {
        if (((static_cast<unsigned>(stream[b / 8]) >> (b % 8)) & 1u) != 0) {
            return false;
        }
    }
    return true;
}

// Writes the index stream of `chunks` chunks (cells: their ascending cells, chunk after chunk)
// into `out`, padded_bit_bytes(chunks * code.bits()) bytes, a word at a time as the device does.
inline void write_index_stream(const index_code::chunk_indices& code, const std::uint32_t* cells,
                               std::size_t chunks, std::span<std::byte> out) noexcept {
    for (std::size_t w = 0; w < out.size() / 4; ++w) {
        wire::put<std::uint32_t>(out, 4 * w, index_code::word(code, cells, chunks, w));
    }
}

// Checks a received index stream of `chunks` chunks coded as `code`: each index below the
// chunk's cells, strictly ascending within its chunk, Elias-Fano's high parts well formed,
// padding zero. Returns what is wrong, or an empty string.
inline std::string check_index_stream(std::span<const std::byte> stream, std::size_t chunks,
                                      const index_code::chunk_indices& code) {
    for (std::size_t c = 0; c < chunks; ++c) {
        const index_code::verdict v = index_code::check(stream.data(), code, c);
        if (v.problem != index_code::verdict::ok) {
            return index_code::describe(v, code);
        }
    }
    if (!padding_is_zero(stream, chunks * code.bits())) {
        return "nonzero padding after the indices";
    }
    return std::string();
}

// The encode and decode that chunked compressors with a residual (demo, sparseloco) share. C
// supplies encode_values, decode_body, layout_of, check_segment, expected_header, validate and
// wire_id; `carry` is the factor of the old residual (DeMo's decay, SparseLoCo's beta).
template <class C>
struct residual_codec {
    using hyper = typename C::hyper;

    static void encode(const hyper& h, float carry, std::span<const float> x,
                       std::span<const segment> segs, std::span<float> state,
                       std::span<std::byte> out) {
        C::validate(h);
        check_segments_inside(segs, x.size(), C::name, "input");
        check_payload_buffer(out.size(), C::payload_bytes(h, segs), C::name);
        if (state.size() < x.size()) {
            throw shape_error("loco::compress::" + std::string(C::name) + ": the state holds " +
                              std::to_string(state.size()) + " floats, the residual needs " +
                              std::to_string(x.size()));
        }
        // carry * e + x, kept aside until the payload is written, so a failure changes nothing.
        std::vector<float> e(x.size(), 0.0f);
        for (const segment& s : segs) {
            for (std::size_t i = s.offset; i < s.offset + s.size; ++i) {
                e[i] = carry * state[i] + x[i];
            }
        }
        C::encode_values(h, e, segs, out);
        std::vector<float> sent(x.size(), 0.0f);
        C::decode_body(h, out.subspan(wire::header_bytes), segs, sent);
        for (const segment& s : segs) {
            for (std::size_t i = s.offset; i < s.offset + s.size; ++i) {
                state[i] = e[i] - sent[i];
            }
        }
    }

    // The payload's body: every segment's layout, in order.
    static std::size_t body_bytes(const hyper& h, std::span<const segment> segs) {
        std::size_t n = 0;
        for (const segment& s : segs) n += C::layout_of(h, s).bytes();
        return n;
    }

    // The header fields every chunked compressor fills alike; C's expected_header adds bits and
    // flags.
    static wire::header header(const hyper& h, std::span<const segment> segs) {
        wire::header w;
        w.compressor = C::wire_id;
        w.block = h.chunk | (h.topk << 16);
        w.segments = static_cast<std::uint32_t>(segs.size());
        w.elements = total_elements(segs);
        w.body_bytes = body_bytes(h, segs);
        return w;
    }

    // Checks the header and every segment's index stream before anything is written.
    static void decode(const hyper& h, std::span<const std::byte> in,
                       std::span<const segment> segs, std::span<float> out) {
        C::decode_body(h, checked_body(h, in, segs, out.size()), segs, out);
    }

    // The body of a payload for an output of n elements, after every check decode makes.
    static std::span<const std::byte> checked_body(const hyper& h, std::span<const std::byte> in,
                                                   std::span<const segment> segs, std::size_t n) {
        C::validate(h);
        check_segments_inside(segs, n, C::name, "output");
        for (const segment& s : segs) {
            grid_of(s, h.chunk, C::name);
        }
        const std::span<const std::byte> body = wire::open(in, C::expected_header(h, segs), C::name);
        std::size_t at = 0;
        for (const segment& s : segs) {
            const auto l = C::layout_of(h, s);
            C::check_segment(h, l, body.subspan(at, l.bytes()));
            at += l.bytes();
        }
        return body;
    }
};

}  // namespace loco::compress::chunking
