#pragma once
// The wire format every compressed payload shares: a 40-byte versioned header that describes the
// payload, then the compressor's body. A receiver checks the header against what it expects (same
// compressor and settings, same element count and segment count, exact body size) and the body's
// checksum before it decodes anything, and refuses a payload that is truncated, oversized,
// corrupted or encoded with other settings, with loco::wire_error.
//
// Header, little-endian:
//   offset  0  'L' 'W'           magic
//           2  u8  version        (1)
//           3  u8  compressor     the compressor's wire_id
//           4  u8  bits           code width, 0 when not applicable
//           5  u8  flags          compressor-specific settings (rounding, scale kind, ...)
//           6  u16 reserved       0
//           8  u32 block          block size, or another u32 setting of the compressor (e.g. the
//                                 bit pattern of an fp32 parameter), 0 when not applicable
//          12  u32 segments       number of segments encoded
//          16  u64 elements       number of elements encoded
//          24  u64 body_bytes     bytes after the header
//          32  u64 checksum       of the body (see checksum())
//
// Sub-byte codes are packed little-endian within a byte: with b bits per code, element i's code
// occupies bits [(i % (8/b)) * b, (i % (8/b) + 1) * b) of byte i / (8/b), lowest bits first (for
// b = 2: four codes per byte, element 4k in bits 0-1). Padding bits of the last byte are zero.

#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/random.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

namespace loco::compress::wire {

inline constexpr std::uint8_t version = 1;
inline constexpr std::size_t header_bytes = 40;

struct header {
    std::uint8_t compressor = 0;
    std::uint8_t bits = 0;
    std::uint8_t flags = 0;
    std::uint32_t block = 0;
    std::uint32_t segments = 0;
    std::uint64_t elements = 0;
    std::uint64_t body_bytes = 0;
};

// Little-endian scalar access at a byte offset (the build requires a little-endian host, see
// detail/checkpoint.hpp).
template <class T>
void put(std::span<std::byte> out, std::size_t offset, T value) noexcept {
    std::memcpy(out.data() + offset, &value, sizeof(T));
}
template <class T>
T get(std::span<const std::byte> in, std::size_t offset) noexcept {
    T value;
    std::memcpy(&value, in.data() + offset, sizeof(T));
    return value;
}

// Checksum of a body: the sum, modulo 2^64, of mix64(word_i ^ i) over its little-endian 8-byte
// words (the last one zero-padded), plus the length. Each term depends on one word only, so a
// kernel can sum the terms in any order; changing any single word always changes the sum,
// because mix64 is a bijection.
// The term of word i (a device kernel sums the same terms in its own order).
LOCO_HD std::uint64_t checksum_term(std::uint64_t word, std::uint64_t i) noexcept {
    return random::mix64(word ^ i);
}

inline std::uint64_t checksum(std::span<const std::byte> body) noexcept {
    std::uint64_t sum = body.size();
    const std::size_t words = body.size() / 8;
    for (std::size_t i = 0; i < words; ++i) {
        std::uint64_t w;
        std::memcpy(&w, body.data() + 8 * i, 8);
        sum += checksum_term(w, i);
    }
    if (const std::size_t tail = body.size() % 8; tail != 0) {
        std::uint64_t w = 0;
        std::memcpy(&w, body.data() + 8 * words, tail);
        sum += checksum_term(w, words);
    }
    return sum;
}

// Writes the header's fields, bytes [0, 32) of out (everything but the checksum).
inline void write_fields(std::span<std::byte> out, const header& h) noexcept {
    out[0] = std::byte{'L'};
    out[1] = std::byte{'W'};
    out[2] = std::byte{version};
    out[3] = std::byte{h.compressor};
    out[4] = std::byte{h.bits};
    out[5] = std::byte{h.flags};
    put<std::uint16_t>(out, 6, 0);
    put<std::uint32_t>(out, 8, h.block);
    put<std::uint32_t>(out, 12, h.segments);
    put<std::uint64_t>(out, 16, h.elements);
    put<std::uint64_t>(out, 24, h.body_bytes);
}

// Writes the header in front of an already written body: out holds header_bytes + h.body_bytes.
inline void write_header(std::span<std::byte> out, const header& h) noexcept {
    write_fields(out, h);
    const std::span<const std::byte> body(out.data() + header_bytes,
                                          static_cast<std::size_t>(h.body_bytes));
    put<std::uint64_t>(out, 32, checksum(body));
}

// The first field of a received header (in: at least header_bytes) that differs from the
// expected one, in the order open() checks them, as a message; empty when they agree. The
// checksum is not looked at. (The device payload checks use it too, so both refuse alike.)
inline std::string header_mismatch(std::span<const std::byte> in, const header& expected) {
    if (in[0] != std::byte{'L'} || in[1] != std::byte{'W'}) {
        return "bad magic";
    }
    const auto field = [](const char* name, std::uint64_t got, std::uint64_t want) {
        return got == want ? std::string()
                           : std::string(name) + " is " + std::to_string(got) + ", expected " +
                                 std::to_string(want);
    };
    for (std::string why :
         {field("the format version", std::to_integer<unsigned>(in[2]), version),
          field("the compressor id", std::to_integer<unsigned>(in[3]), expected.compressor),
          field("the code width", std::to_integer<unsigned>(in[4]), expected.bits),
          field("the flags", std::to_integer<unsigned>(in[5]), expected.flags),
          field("the reserved field", get<std::uint16_t>(in, 6), 0),
          field("the block field (block size or setting)", get<std::uint32_t>(in, 8),
                expected.block),
          field("the segment count", get<std::uint32_t>(in, 12), expected.segments),
          field("the element count", get<std::uint64_t>(in, 16), expected.elements),
          field("the body size", get<std::uint64_t>(in, 24), expected.body_bytes)}) {
        if (!why.empty()) {
            return why;
        }
    }
    return {};
}

// Checks a received payload against the header the receiver expects and returns its body.
// `who` names the compressor in messages.
inline std::span<const std::byte> open(std::span<const std::byte> in, const header& expected,
                                       std::string_view who) {
    const auto fail = [&](const std::string& what) {
        return wire_error("loco::compress::" + std::string(who) + ": malformed payload: " + what);
    };
    if (in.size() < header_bytes) {
        throw fail(std::to_string(in.size()) + " bytes, shorter than the " +
                   std::to_string(header_bytes) + "-byte header");
    }
    if (const std::string why = header_mismatch(in, expected); !why.empty()) {
        throw fail(why);
    }
    if (in.size() != header_bytes + expected.body_bytes) {
        throw fail(std::to_string(in.size()) + " bytes received for a " +
                   std::to_string(header_bytes + expected.body_bytes) + "-byte payload");
    }
    const std::span<const std::byte> body = in.subspan(header_bytes);
    if (get<std::uint64_t>(in, 32) != checksum(body)) {
        throw fail("checksum mismatch");
    }
    return body;
}

// Packed sub-byte codes (Bits in {1, 2, 4, 8}).
template <int Bits>
LOCO_HD constexpr std::size_t packed_bytes(std::size_t n) noexcept {
    static_assert(Bits == 1 || Bits == 2 || Bits == 4 || Bits == 8, "code width must be 1, 2, 4 or 8");
    return (n * static_cast<std::size_t>(Bits) + 7) / 8;
}

// ORs code (< 2^Bits) into a zero-initialised packed array. (unsigned char arithmetic: the
// operators of std::byte are host-only functions, which a device pass cannot call.)
template <int Bits>
LOCO_HD void pack(std::byte* packed, std::size_t i, unsigned code) noexcept {
    constexpr std::size_t per_byte = 8 / Bits;
    const unsigned shift = static_cast<unsigned>((i % per_byte) * Bits);
    unsigned char& b = reinterpret_cast<unsigned char&>(packed[i / per_byte]);
    b = static_cast<unsigned char>(b | (code << shift));
}

template <int Bits>
LOCO_HD unsigned unpack(const std::byte* packed, std::size_t i) noexcept {
    constexpr std::size_t per_byte = 8 / Bits;
    constexpr unsigned mask = (1u << Bits) - 1u;
    const unsigned shift = static_cast<unsigned>((i % per_byte) * Bits);
    return (static_cast<unsigned>(packed[i / per_byte]) >> shift) & mask;
}

// Fixed-width codes of any width 0..32 as one little-endian bit stream: code j of width W
// occupies bits [j W, (j + 1) W) of the stream, bit b of the stream being bit (b % 8) of byte
// b / 8, lowest bits first (for W in {1, 2, 4, 8} the same layout as pack/unpack above). Width 0
// stores nothing and reads 0. put_bits ORs into zero-initialised bytes.
constexpr std::size_t bit_stream_bytes(std::size_t count, unsigned width) noexcept {
    return (count * width + 7) / 8;
}

LOCO_HD void put_bits(std::byte* stream, std::size_t j, unsigned width,
                      std::uint32_t code) noexcept {
    std::size_t bit = j * width;
    for (unsigned done = 0; done < width;) {
        const unsigned shift = static_cast<unsigned>(bit % 8);
        const unsigned take = width - done < 8 - shift ? width - done : 8 - shift;
        const unsigned part = static_cast<unsigned>(code >> done) & ((1u << take) - 1u);
        unsigned char& b = reinterpret_cast<unsigned char&>(stream[bit / 8]);
        b = static_cast<unsigned char>(b | (part << shift));
        done += take;
        bit += take;
    }
}

// The `width` bits (0..32) of a stream that start at bit `bit`, as put_bits lays them out.
LOCO_HD std::uint32_t get_bits_at(const std::byte* stream, std::uint64_t bit,
                                  unsigned width) noexcept {
    std::uint32_t code = 0;
    for (unsigned done = 0; done < width;) {
        const unsigned shift = static_cast<unsigned>(bit % 8);
        const unsigned take = width - done < 8 - shift ? width - done : 8 - shift;
        const unsigned part =
            (static_cast<unsigned>(reinterpret_cast<const unsigned char&>(stream[bit / 8])) >>
             shift) &
            ((1u << take) - 1u);
        code |= static_cast<std::uint32_t>(part) << done;
        done += take;
        bit += take;
    }
    return code;
}

LOCO_HD std::uint32_t get_bits(const std::byte* stream, std::size_t j, unsigned width) noexcept {
    return get_bits_at(stream, static_cast<std::uint64_t>(j) * width, width);
}

}  // namespace loco::compress::wire
