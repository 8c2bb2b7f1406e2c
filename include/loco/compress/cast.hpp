#pragma once
// Casting the pseudo-gradient to a 16-bit float: 2 bytes per element instead of 4. Streaming
// DiLoCo (Douillard et al., arXiv 2501.18512, Fig. 11) sends its outer gradients in bf16 (and
// lower) with no loss of quality.
//
// Definition: each element goes through loco::bf16 or loco::fp16 (float16.hpp): round to nearest,
// ties to even, subnormals included; NaN stays NaN (quiet); +-inf stays +-inf. fp16 overflows:
// |x| >= 65520 (half a step above 65504, the largest fp16) is sent as +-inf.
//
// Error bound, for finite x (u = 2^-8 for bf16, 2^-11 for fp16, the unit roundoff):
//   |x| below the overflow threshold:  |decode - x| <= max(u * |x|, m / 2)
//     where m is the smallest subnormal step: 2^-133 (bf16), 2^-24 (fp16)
//   |x| at or above it (fp16: 65520; bf16: 2^128 - 2^119): decode = +-inf
//
// Wire header: bits = 16, flags = 0 for bf16, 1 for fp16, block = 0.
// Body: for each segment in order, its elements' 16-bit patterns, little-endian. Segment bytes:
// 2 * n. Every pattern is a valid value, so decode checks only the header.

#include <loco/compress/compressor.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace loco::compress {

template <class T>
struct cast {
    static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, fp16>,
                  "loco::compress::cast: the type must be loco::bf16 or loco::fp16");

    static constexpr std::string_view name =
        std::is_same_v<T, bf16> ? std::string_view("cast<bf16>") : std::string_view("cast<fp16>");
    static constexpr std::uint8_t wire_id = 1;
    static constexpr int state_size = 0;

    struct hyper {};

    // ---- per element, shared with the CUDA kernels ----------------------------------------------

    // Every NaN is sent as the one canonical quiet NaN of T. The same arithmetic gives different
    // NaN bits on an x86 host (the operand's payload, or the negative "indefinite" NaN) and on a
    // GPU (0x7fffffff), and a payload must not depend on where it was encoded.
    LOCO_HD static std::uint16_t to_bits(float x) noexcept {
        if (x != x) {
            return std::is_same_v<T, bf16> ? std::uint16_t{0x7fc0} : std::uint16_t{0x7e00};
        }
        return T::from_float(x).bits;
    }
    LOCO_HD static float from_bits(std::uint16_t bits) noexcept { return T{bits}.to_float(); }

    // ---- the compressor interface ---------------------------------------------------------------

    static std::size_t payload_bytes(const hyper&, std::span<const segment> segs) noexcept {
        return wire::header_bytes + 2 * elements(segs);
    }

    static void encode(const hyper& h, std::span<const float> x, std::span<const segment> segs,
                       std::span<float>, const encode_context&, std::span<std::byte> out) {
        check_encode_buffers(h, x, segs, out.size());
        std::size_t at = wire::header_bytes;
        for (const segment& s : segs) {
            for (std::size_t i = 0; i < s.size; ++i) {
                wire::put<std::uint16_t>(out, at + 2 * i, to_bits(x[s.offset + i]));
            }
            at += 2 * s.size;
        }
        wire::write_header(out, expected_header(segs));
    }

    static void decode(const hyper&, std::span<const std::byte> in, std::span<const segment> segs,
                       std::span<float> out) {
        check_decode_buffer(segs, out.size());
        const std::span<const std::byte> body = wire::open(in, expected_header(segs), name);
        std::size_t at = 0;
        for (const segment& s : segs) {
            for (std::size_t i = 0; i < s.size; ++i) {
                out[s.offset + i] = from_bits(wire::get<std::uint16_t>(body, at + 2 * i));
            }
            at += 2 * s.size;
        }
    }

private:
    static std::size_t elements(std::span<const segment> segs) noexcept {
        std::size_t n = 0;
        for (const segment& s : segs) {
            n += s.size;
        }
        return n;
    }

    static wire::header expected_header(std::span<const segment> segs) noexcept {
        wire::header w;
        w.compressor = wire_id;
        w.bits = 16;
        w.flags = std::is_same_v<T, bf16> ? 0 : 1;
        w.segments = static_cast<std::uint32_t>(segs.size());
        w.elements = elements(segs);
        w.body_bytes = 2 * w.elements;
        return w;
    }

    static void check_encode_buffers(const hyper& h, std::span<const float> x,
                                     std::span<const segment> segs, std::size_t out_bytes) {
        for (const segment& s : segs) {
            if (s.offset > x.size() || s.size > x.size() - s.offset) {
                throw shape_error("loco::compress::" + std::string(name) +
                                  ": a segment lies outside the input");
            }
        }
        if (out_bytes != payload_bytes(h, segs)) {
            throw shape_error("loco::compress::" + std::string(name) +
                              ": the output buffer holds " + std::to_string(out_bytes) +
                              " bytes, payload_bytes() is " +
                              std::to_string(payload_bytes(h, segs)));
        }
    }

    static void check_decode_buffer(std::span<const segment> segs, std::size_t out_size) {
        for (const segment& s : segs) {
            if (s.offset > out_size || s.size > out_size - s.offset) {
                throw shape_error("loco::compress::" + std::string(name) +
                                  ": a segment lies outside the output");
            }
        }
    }
};

static_assert(compressor<cast<bf16>>);
static_assert(compressor<cast<fp16>>);

}  // namespace loco::compress
