#pragma once
// Blockwise linear quantization to Bits-bit codes with one fp32 scale per block.
//
// Definition. Each segment is cut into blocks of Block consecutive elements (the last block of
// a segment may be shorter). For a block with elements x_j:
//
//   s   = max_j |x_j|                      (scale_kind::absmax)
//       = (sum_j |x_j|) / n_block          (scale_kind::mean_abs; summed in double, then fp32)
//   L   = 2^Bits - 1
//   v_k = s * (2k/L - 1),  k = 0 .. L      (L + 1 evenly spaced levels; -s and +s are levels;
//                                           Bits = 1 sends sign(x) * s)
//   t   = clamp((x/s + 1) * L/2, 0, L)
//   k   = round_half_to_even(t)                              (rounding::nearest)
//       = floor(t) + (u < t - floor(t))                      (rounding::stochastic)
//         u = loco::random::uniform(ctx.seed, ctx.stream(), flat index of x)
//   decode(k) = v_k
//
// s is stored as fp32 and encode uses that fp32 value, so sender and receiver agree on every
// level. A block whose scale is 0 (every |x| is 0, or so small that the fp32 mean is 0) stores
// s = +0 and gives every element the code of x = 0, k0 = round_half_to_even(L/2) (0, 2, 8, 128
// for 1, 2, 4, 8 bits), so the block decodes to zeros (-0 for Bits = 1, whose k0 = 0 is the
// level -s). A block holding NaN or +-inf stores the quiet NaN 0x7fc00000 as its scale and the
// code k0 everywhere, so the whole block decodes to NaN: a non-finite pseudo-gradient reaches
// every receiver as NaN, where loco::diloco's non-finite policy handles it on every rank alike.
//
// Per element, in fp32: t = (x / s + 1.0f) * (0.5f * L), clamped; v_k = s * (float(2k - L) /
// float(L)) with 2k - L an integer. Neither expression has a multiply feeding an add, so no
// compiler may contract one into a fused multiply-add: a CUDA kernel running the same LOCO_HD
// functions produces the same codes and values as the host.
//
// Error bound, for every element of a block with finite scale s (step = 2s/L):
//   nearest:     |decode - x| <= max(|x| - s, 0) + s/L    + 2^-20 * s + 2^-150
//   stochastic:  |decode - x| <  max(|x| - s, 0) + 2s/L   + 2^-20 * s + 2^-150
// The first term is the clipping of mean_abs (|x| > s only happens there; absmax never clips).
// The last two cover the fp32 rounding of t and of v_k (2^-150 for a subnormal s, where v_k
// rounds to a multiple of 2^-149). Stochastic rounding is unbiased for |x| <= s:
// E[decode] = x up to that rounding (and the 24-bit resolution of u).
//
// Wire header: bits = Bits, block = Block, flags = scale (bit 0: 0 absmax, 1 mean_abs) |
// round << 1 (bit 1: 0 nearest, 1 stochastic).
//
// Body, for each segment in order (n = its size, nb = ceil(n / Block) blocks):
//   nb fp32 scales, block order
//   ceil(n * Bits / 8) bytes of codes, packed as wire.hpp describes (element i of the segment is
//     code i), unused bits zero
//   zero bytes up to a multiple of 4, so that every fp32 of the body is 4-byte aligned
// Segment bytes: 4 * nb + 4 * ceil(ceil(n * Bits / 8) / 4).
//
// decode refuses, besides everything wire::open checks: a negative (or -0) or infinite scale, a
// NaN other than 0x7fc00000; a block of scale 0 or NaN whose codes are not all k0; nonzero
// padding bits or bytes.

#include <loco/compress/compressor.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>
#include <loco/random.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <sstream>
#include <string_view>

namespace loco::compress {

enum class scale_kind : std::uint8_t { absmax = 0, mean_abs = 1 };
enum class rounding : std::uint8_t { nearest = 0, stochastic = 1 };

template <int Bits, std::size_t Block>
struct blockwise {
    static_assert(Bits == 1 || Bits == 2 || Bits == 4 || Bits == 8,
                  "loco::compress::blockwise: Bits must be 1, 2, 4 or 8");
    static_assert(Block >= 1, "loco::compress::blockwise: Block must be at least 1");
    static_assert(Block <= std::numeric_limits<std::uint32_t>::max(),
                  "loco::compress::blockwise: Block must fit the 32-bit header field");

    static constexpr std::string_view name = "blockwise";
    static constexpr std::uint8_t wire_id = 2;
    static constexpr int state_size = 0;

    struct hyper {
        scale_kind scale = scale_kind::absmax;
        rounding round = rounding::nearest;
    };

    static constexpr unsigned top_code = (1u << Bits) - 1u;  // L

    // Name, bits, block and settings: what must match between ranks and checkpoints.
    static std::string describe(const hyper& h) {
        return std::string(name) + "<" + std::to_string(Bits) + "," + std::to_string(Block) +
               "> scale=" + (h.scale == scale_kind::absmax ? "absmax" : "mean_abs") +
               " round=" + (h.round == rounding::nearest ? "nearest" : "stochastic");
    }

    static void validate(const hyper& h) {
        if (h.scale != scale_kind::absmax && h.scale != scale_kind::mean_abs) {
            throw invalid_argument("loco::compress::blockwise: scale must be absmax or mean_abs");
        }
        if (h.round != rounding::nearest && h.round != rounding::stochastic) {
            throw invalid_argument(
                "loco::compress::blockwise: round must be nearest or stochastic");
        }
    }

    // ---- per element, shared with the CUDA kernels ----------------------------------------------

    // t of the definition, clamped to [0, L]; s > 0 and finite, x finite.
    LOCO_HD static float position(float x, float s) noexcept {
        constexpr float top = static_cast<float>(top_code);
        const float t = (x / s + 1.0f) * (0.5f * top);
        return t < 0.0f ? 0.0f : (t > top ? top : t);
    }

    // round_half_to_even(t) for t in [0, L].
    LOCO_HD static unsigned nearest_code(float t) noexcept {
        const unsigned low = static_cast<unsigned>(t);
        const float frac = t - static_cast<float>(low);  // exact: the fraction of a float is one
        return low + static_cast<unsigned>(frac > 0.5f || (frac == 0.5f && (low & 1u) != 0));
    }

    // floor(t) + (u < t - floor(t)) for t in [0, L], u in [0, 1).
    LOCO_HD static unsigned stochastic_code(float t, float u) noexcept {
        const unsigned low = static_cast<unsigned>(t);
        return low + static_cast<unsigned>(u < t - static_cast<float>(low));
    }

    // The code every element of a block of scale 0 carries: that of x = 0.
    LOCO_HD static unsigned zero_code() noexcept {
        return nearest_code(0.5f * static_cast<float>(top_code));
    }

    // The code of x in a block of stored scale s (0 for a block sent as zeros, NaN for one that
    // holds a non-finite value: both carry the zero code).
    LOCO_HD static unsigned code(float x, float s, bool stochastic, float u) noexcept {
        if (!(s > 0.0f)) {
            return zero_code();
        }
        const float t = position(x, s);
        return stochastic ? stochastic_code(t, u) : nearest_code(t);
    }

    LOCO_HD static float level(float s, unsigned k) noexcept {
        const int numerator = 2 * static_cast<int>(k) - static_cast<int>(top_code);  // exact
        return s * (static_cast<float>(numerator) / static_cast<float>(top_code));
    }

    // ---- the compressor interface ---------------------------------------------------------------

    static std::size_t payload_bytes(const hyper& h, std::span<const segment> segs) {
        validate(h);
        return wire::header_bytes + body_bytes(segs);
    }

    static void encode(const hyper& h, std::span<const float> x, std::span<const segment> segs,
                       std::span<float>, const encode_context& ctx, std::span<std::byte> out) {
        validate(h);
        check_encode_buffers(x, segs, out.size());
        std::fill(out.begin(), out.end(), std::byte{0});  // pack() ORs into zeroed bytes
        std::size_t at = wire::header_bytes;
        for (const segment& s : segs) {
            encode_segment(h, x, s, ctx, out, at);
            at += segment_bytes(s.size);
        }
        wire::write_header(out, expected_header(h, segs));
    }

    static void decode(const hyper& h, std::span<const std::byte> in, std::span<const segment> segs,
                       std::span<float> out) {
        validate(h);
        check_decode_buffer(segs, out.size());
        const std::span<const std::byte> body = wire::open(in, expected_header(h, segs), name);
        std::size_t at = 0;
        for (const segment& s : segs) {
            check_segment(body.subspan(at, segment_bytes(s.size)), s.size);
            at += segment_bytes(s.size);
        }
        at = 0;
        for (const segment& s : segs) {
            decode_segment(body.subspan(at, segment_bytes(s.size)), out.subspan(s.offset, s.size));
            at += segment_bytes(s.size);
        }
    }

    // ---- layout ---------------------------------------------------------------------------------

    // The scale of a block that holds NaN or +-inf: the canonical quiet NaN.
    static constexpr std::uint32_t nan_scale_bits = 0x7fc00000u;

    static constexpr std::size_t blocks(std::size_t n) noexcept { return (n + Block - 1) / Block; }
    static constexpr std::size_t code_bytes(std::size_t n) noexcept {
        return (wire::packed_bytes<Bits>(n) + 3) / 4 * 4;
    }
    static constexpr std::size_t segment_bytes(std::size_t n) noexcept {
        return 4 * blocks(n) + code_bytes(n);
    }

    // The block's fp32 scale as the definition gives it: 0 for a block sent as zeros, the quiet
    // NaN for a block holding a non-finite value.
    static float block_scale(const float* x, std::size_t n, scale_kind kind) noexcept {
        float largest = 0.0f;
        double sum = 0.0;
        bool finite = true;
        for (std::size_t j = 0; j < n; ++j) {
            const float a = math::abs(x[j]);
            finite = finite && math::isfinite(a);
            largest = a > largest ? a : largest;
            sum += static_cast<double>(a);
        }
        if (!finite) {
            return loco::detail::float_from_bits(nan_scale_bits);
        }
        return kind == scale_kind::absmax ? largest
                                          : static_cast<float>(sum / static_cast<double>(n));
    }

private:
    static std::size_t body_bytes(std::span<const segment> segs) noexcept {
        std::size_t n = 0;
        for (const segment& s : segs) {
            n += segment_bytes(s.size);
        }
        return n;
    }

    static wire::header expected_header(const hyper& h, std::span<const segment> segs) noexcept {
        wire::header w;
        w.compressor = wire_id;
        w.bits = static_cast<std::uint8_t>(Bits);
        w.flags = static_cast<std::uint8_t>(static_cast<unsigned>(h.scale) |
                                            (static_cast<unsigned>(h.round) << 1));
        w.block = static_cast<std::uint32_t>(Block);
        w.segments = static_cast<std::uint32_t>(segs.size());
        for (const segment& s : segs) {
            w.elements += s.size;
        }
        w.body_bytes = body_bytes(segs);
        return w;
    }

    static void check_encode_buffers(std::span<const float> x, std::span<const segment> segs,
                                     std::size_t out_bytes) {
        for (const segment& s : segs) {
            if (s.offset > x.size() || s.size > x.size() - s.offset) {
                throw shape_error("loco::compress::blockwise: a segment lies outside the input");
            }
        }
        if (out_bytes != wire::header_bytes + body_bytes(segs)) {
            throw shape_error("loco::compress::blockwise: the output buffer holds " +
                              std::to_string(out_bytes) + " bytes, payload_bytes() is " +
                              std::to_string(wire::header_bytes + body_bytes(segs)));
        }
    }

    static void check_decode_buffer(std::span<const segment> segs, std::size_t out_size) {
        for (const segment& s : segs) {
            if (s.offset > out_size || s.size > out_size - s.offset) {
                throw shape_error("loco::compress::blockwise: a segment lies outside the output");
            }
        }
    }

    static void encode_segment(const hyper& h, std::span<const float> x, const segment& s,
                               const encode_context& ctx, std::span<std::byte> out,
                               std::size_t at) {
        const bool stochastic = h.round == rounding::stochastic;
        std::byte* codes = out.data() + at + 4 * blocks(s.size);
        for (std::size_t b = 0; b < blocks(s.size); ++b) {
            const std::size_t first = b * Block;
            const std::size_t n = std::min(Block, s.size - first);
            const float scale = block_scale(x.data() + s.offset + first, n, h.scale);
            wire::put<float>(out, at + 4 * b, scale);
            for (std::size_t j = first; j < first + n; ++j) {
                const std::size_t flat = s.offset + j;
                const float u = stochastic ? random::uniform(ctx.seed, ctx.stream(), flat) : 0.0f;
                wire::pack<Bits>(codes, j, code(x[flat], scale, stochastic, u));
            }
        }
    }

    [[noreturn]] static void refuse(const std::string& what) {
        throw wire_error("loco::compress::blockwise: malformed payload: " + what);
    }

    // Everything a valid encoder guarantees about one segment's bytes, checked before any output.
    static void check_segment(std::span<const std::byte> bytes, std::size_t n) {
        const std::byte* codes = bytes.data() + 4 * blocks(n);
        for (std::size_t b = 0; b < blocks(n); ++b) {
            const std::uint32_t bits = loco::detail::float_bits(wire::get<float>(bytes, 4 * b));
            if (bits >= 0x7f800000u && bits != nan_scale_bits) {  // negative, inf, another NaN
                refuse("block scale " + std::to_string(b) + " is negative or not finite");
            }
            if (bits == 0 || bits == nan_scale_bits) {
                const std::size_t last = std::min(n, (b + 1) * Block);
                for (std::size_t j = b * Block; j < last; ++j) {
                    if (wire::unpack<Bits>(codes, j) != zero_code()) {
                        refuse("a code of a zero-scale or NaN-scale block is not the zero code");
                    }
                }
            }
        }
        constexpr std::size_t per_byte = 8 / Bits;
        for (std::size_t j = n; j < wire::packed_bytes<Bits>(n) * per_byte; ++j) {
            if (wire::unpack<Bits>(codes, j) != 0) {
                refuse("nonzero padding bits after the last code");
            }
        }
        for (std::size_t i = wire::packed_bytes<Bits>(n); i < code_bytes(n); ++i) {
            if (codes[i] != std::byte{0}) {
                refuse("nonzero alignment padding");
            }
        }
    }

    static void decode_segment(std::span<const std::byte> bytes, std::span<float> out) noexcept {
        const std::byte* codes = bytes.data() + 4 * blocks(out.size());
        for (std::size_t j = 0; j < out.size(); ++j) {
            const float scale = wire::get<float>(bytes, 4 * (j / Block));
            out[j] = level(scale, wire::unpack<Bits>(codes, j));
        }
    }
};

static_assert(compressor<blockwise<2, 256>>);

}  // namespace loco::compress
