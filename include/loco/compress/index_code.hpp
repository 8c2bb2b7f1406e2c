#pragma once
// How the chunked compressors (compress/chunking.hpp) write the in-chunk indices of their kept
// cells: k strictly ascending cells of a chunk of `cells` cells, every chunk of a segment with
// the same k. One rule for the host and the device: the host encoder and the device pack kernel
// write a stream through word(); a decoder reads one index with cell() (a GPU thread per slot)
// or walks a chunk's indices in order with for_each_cell() (the host decoders); both checkers
// ask check(). Every coding here has a size fixed by (cells, k), so payload sizes stay known
// from the shapes alone (the all-gather and the two-phase exchanges rely on that).
//
// Two codings, chosen per compressor (compress::sparseloco::hyper::indices,
// compress::demo::hyper::indices):
//
//   fixed    each index in b = ceil(log2 cells) bits (chunking::index_bits; 12 for 64 x 64, the
//            width of templar's pack_12bit_indices): k b bits per chunk.
//   compact  per segment, the smallest of
//            - none, when a chunk keeps every cell (k = cells): the indices are 0 .. k - 1;
//            - Elias-Fano (Elias 1974, Fano 1971): with l = floor(log2(cells / k)), index i's low
//              l bits as a k l-bit array, then its high part h_i = c_i >> l in unary: a bit
//              vector of k + ((cells - 1) >> l) bits with a one at h_i + i for each i. At most
//              2 + log2(cells / k) bits an index, within 0.6 bits of the enumerative bound
//              log2 C(cells, k) / k at templar's top-64 of 4096 (8 bits against 7.37 and 12);
//            - fixed width, which is smaller for k <= 2 of large chunks (k = 1 of 4096: 12 bits
//              against Elias-Fano's 13).
//
// A segment's stream holds its chunks one after another, chunk c from bit c * bits(), with the
// bit layout of wire::put_bits (bit b of the stream is bit b % 8 of byte b / 8), padded with zero
// bits to a multiple of 4 bytes by the compressor. For `fixed` this is exactly the layout of one
// b-bit code per slot.

#include <loco/compress/wire.hpp>
#include <loco/config.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace loco::compress {

enum class index_coding : std::uint8_t {
    fixed = 0,    // ceil(log2 cells) bits per index
    compact = 1,  // the smaller of Elias-Fano and fixed; nothing when every cell is kept
};

constexpr std::string_view to_string(index_coding c) noexcept {
    switch (c) {
        case index_coding::fixed: return "fixed";
        case index_coding::compact: return "compact";
    }
    return "unknown";
}

// Refuses a coding outside the enumeration (a value read from a file, say), naming the
// compressor whose settings hold it.
inline void check_coding(std::string_view compressor, index_coding c) {
    if (c != index_coding::fixed && c != index_coding::compact) {
        throw invalid_argument("loco::compress::" + std::string(compressor) +
                               ": indices must be index_coding::fixed or ::compact");
    }
}

// The wire header's `bits` of a chunked payload whose values take value_bits each: 16 more for
// the compact coding, so that a receiver built with the other coding is refused at the header
// (wire::open names the bits) instead of misreading the body.
constexpr std::uint8_t header_bits(unsigned value_bits, index_coding c) noexcept {
    return static_cast<std::uint8_t>(value_bits + 16 * static_cast<unsigned>(c));
}

namespace index_code {

// The code of one chunk's indices, the same for every chunk of a segment.
struct chunk_indices {
    enum form : std::uint32_t { fixed_width = 0, elias_fano = 1, implied = 2 };
    std::uint32_t cells = 0;
    std::uint32_t k = 0;
    std::uint32_t low = 0;  // fixed_width: bits per index; elias_fano: low bits per index
    std::uint32_t how = fixed_width;

    // Bits of the unary high part (elias_fano only).
    LOCO_HD std::uint64_t high_bits() const noexcept {
        return how == elias_fano ? std::uint64_t{k} + ((std::uint64_t{cells} - 1) >> low) : 0;
    }
    // Bits of one chunk's code.
    LOCO_HD std::uint64_t bits() const noexcept {
        return how == implied ? 0 : std::uint64_t{k} * low + high_bits();
    }
};

// ceil(log2 cells), 0 for chunks of one cell.
constexpr unsigned fixed_width(std::size_t cells) noexcept {
    return cells <= 1 ? 0u : static_cast<unsigned>(std::bit_width(cells - 1));
}

// The code of k indices (1 <= k <= cells) of chunks of `cells` cells.
constexpr chunk_indices code_of(index_coding coding, std::size_t cells, std::size_t k) noexcept {
    chunk_indices fixed{static_cast<std::uint32_t>(cells), static_cast<std::uint32_t>(k),
                        fixed_width(cells), chunk_indices::fixed_width};
    if (coding != index_coding::compact || k == 0) {
        return fixed;
    }
    if (k >= cells) {
        return {fixed.cells, fixed.k, 0, chunk_indices::implied};
    }
    const auto l = static_cast<std::uint32_t>(std::bit_width(cells / k) - 1);
    const chunk_indices ef{fixed.cells, fixed.k, l, chunk_indices::elias_fano};
    return ef.bits() < fixed.bits() ? ef : fixed;
}

// Set bits of a 32-bit word (SWAR: the same on the host and the device).
LOCO_HD unsigned ones(std::uint32_t v) noexcept {
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    v = (v + (v >> 4)) & 0x0f0f0f0fu;
    return (v * 0x01010101u) >> 24;
}

// Position of the n-th (from 0) set bit of v; v has more than n set bits.
LOCO_HD unsigned nth_one(std::uint32_t v, unsigned n) noexcept {
    for (; n > 0; --n) v &= v - 1;  // clears the lowest set bit
    return ones((v & (0u - v)) - 1u);
}

// Cell of index j of chunk c (a checked stream: check() accepted the chunk). For elias_fano on
// an unchecked stream whose high part holds fewer than j + 1 ones it returns cells, which no
// chunk has.
LOCO_HD std::uint32_t cell(const std::byte* stream, const chunk_indices& code, std::uint64_t c,
                           std::uint32_t j) noexcept {
    const std::uint64_t start = c * code.bits();
    if (code.how == chunk_indices::implied) {
        return j;
    }
    if (code.how == chunk_indices::fixed_width) {
        return wire::get_bits_at(stream, start + std::uint64_t{j} * code.low, code.low);
    }
    const std::uint32_t low =
        wire::get_bits_at(stream, start + std::uint64_t{j} * code.low, code.low);
    const std::uint64_t high = start + std::uint64_t{code.k} * code.low;
    const std::uint64_t n = code.high_bits();
    unsigned seen = 0;
    for (std::uint64_t at = 0; at < n; at += 32) {
        const unsigned width = n - at < 32 ? static_cast<unsigned>(n - at) : 32u;
        const std::uint32_t w = wire::get_bits_at(stream, high + at, width);
        const unsigned here = ones(w);
        if (seen + here > j) {
            const std::uint64_t position = at + nth_one(w, j - seen);
            return static_cast<std::uint32_t>(((position - j) << code.low) | low);
        }
        seen += here;
    }
    return code.cells;
}

// Calls f(j, cell) for the indices of chunk c in order, j = 0, 1, ..., reading the chunk's bits
// once (cell() above finds one index by itself; a decoder that wants them all walks instead).
// Returns how many indices the chunk's code holds: k, or for elias_fano the ones of its high part,
// which only a malformed stream makes differ from k; f sees the first min(that, k) of them.
// (The pragma lets host code pass a host-only callable: nvcc otherwise refuses a host function
// called from a __host__ __device__ template even where only the host instantiates it.)
#if defined(__NVCC__)
#pragma nv_exec_check_disable
#endif
template <class F>
LOCO_HD std::uint64_t for_each_cell(const std::byte* stream, const chunk_indices& code,
                                    std::uint64_t c, F&& f) {
    const std::uint64_t start = c * code.bits();
    if (code.how != chunk_indices::elias_fano) {
        for (std::uint32_t j = 0; j < code.k; ++j) {
            f(j, code.how == chunk_indices::implied
                     ? j
                     : wire::get_bits_at(stream, start + std::uint64_t{j} * code.low, code.low));
        }
        return code.k;
    }
    const std::uint64_t high = start + std::uint64_t{code.k} * code.low;
    const std::uint64_t n = code.high_bits();
    std::uint64_t count = 0;
    for (std::uint64_t at = 0; at < n; at += 32) {
        const unsigned width = n - at < 32 ? static_cast<unsigned>(n - at) : 32u;
        std::uint32_t w = wire::get_bits_at(stream, high + at, width);
        for (; w != 0; w &= w - 1, ++count) {  // each set bit, lowest first
            if (count < code.k) {
                const std::uint64_t position = at + ones((w & (0u - w)) - 1u);
                const auto j = static_cast<std::uint32_t>(count);
                const std::uint32_t low =
                    wire::get_bits_at(stream, start + std::uint64_t{j} * code.low, code.low);
                f(j, static_cast<std::uint32_t>(((position - j) << code.low) | low));
            }
        }
    }
    return count;
}

// Word w (32 bits, little-endian) of the stream of `chunks` chunks whose ascending cells are
// cells[c * k + j]: what the encoders write, the host a word at a time, the device a word per
// thread. Bits past the last chunk are zero.
LOCO_HD std::uint32_t word(const chunk_indices& code, const std::uint32_t* cells,
                           std::uint64_t chunks, std::uint64_t w) noexcept {
    const std::uint64_t per_chunk = code.bits();
    const std::uint64_t total = chunks * per_chunk;
    const std::uint64_t bit0 = 32 * w;
    if (per_chunk == 0 || bit0 >= total) {
        return 0;
    }
    const std::uint64_t end = bit0 + 32 < total ? bit0 + 32 : total;
    std::uint64_t acc = 0;  // bit b of the word at bit b; a code at stream bit `at` (ending
                            // after bit0) lands shifted by at - bit0, or cut by bit0 - at
    for (std::uint64_t c = bit0 / per_chunk; c * per_chunk < end; ++c) {
        const std::uint64_t start = c * per_chunk;
        const std::uint32_t* chunk = cells + c * code.k;
        // The low parts (every index of fixed_width), slots whose bits meet [bit0, end).
        if (code.low > 0) {
            const std::uint64_t mask = (std::uint64_t{1} << code.low) - 1;
            for (std::uint64_t j = bit0 > start ? (bit0 - start) / code.low : 0; j < code.k;
                 ++j) {
                const std::uint64_t at = start + j * code.low;
                if (at >= end) break;
                const std::uint64_t value = chunk[j] & mask;
                acc |= at >= bit0 ? value << (at - bit0) : value >> (bit0 - at);
            }
        }
        if (code.how == chunk_indices::elias_fano) {
            // The ones at high + h_i + i, strictly increasing in i: the first at or after bit0
            // by bisection, then those before end.
            const std::uint64_t high = start + std::uint64_t{code.k} * code.low;
            std::uint64_t lo = 0;
            std::uint64_t hi = code.k;
            while (lo < hi) {
                const std::uint64_t mid = (lo + hi) / 2;
                if (high + (chunk[mid] >> code.low) + mid < bit0) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            for (std::uint64_t i = lo; i < code.k; ++i) {
                const std::uint64_t at = high + (chunk[i] >> code.low) + i;
                if (at >= end) break;
                acc |= std::uint64_t{1} << (at - bit0);
            }
        }
    }
    return static_cast<std::uint32_t>(acc & ((std::uint64_t{1} << (end - bit0)) - 1));
}

// What check() found wrong with a chunk, and the value it concerns.
struct verdict {
    enum what : std::uint32_t { ok = 0, beyond = 1, unsorted = 2, ones_count = 3 };
    std::uint32_t problem = ok;
    std::uint64_t value = 0;  // beyond: the index; ones_count: the ones found
};

// Checks chunk c of a received stream: Elias-Fano's high part holds exactly k ones, and every
// index is below cells and above the one before (so no repeats).
LOCO_HD verdict check(const std::byte* stream, const chunk_indices& code,
                      std::uint64_t c) noexcept {
    verdict first;
    std::uint32_t last = 0;
    const auto look = [&](std::uint32_t j, std::uint32_t i) {
        if (first.problem != verdict::ok) return;
        if (i >= code.cells) {
            first = {verdict::beyond, i};
        } else if (j > 0 && i <= last) {
            first = {verdict::unsorted, i};
        }
        last = i;
    };
    const std::uint64_t count = for_each_cell(stream, code, c, look);
    if (count != code.k) {
        return {verdict::ones_count, count};
    }
    return first;
}

// The host's words for a verdict (the device checkers flag a payload, and the host decoder's
// check then says what is wrong in these words).
inline std::string describe(const verdict& v, const chunk_indices& code) {
    switch (v.problem) {
        case verdict::beyond:
            return "index " + std::to_string(v.value) + " in a chunk of " +
                   std::to_string(code.cells) + " cells";
        case verdict::unsorted:
            return "the indices of a chunk are not strictly ascending";
        case verdict::ones_count:
            return "the Elias-Fano high part of a chunk holds " + std::to_string(v.value) +
                   " ones for its " + std::to_string(code.k) + " indices";
        default:
            return std::string();
    }
}

}  // namespace index_code
}  // namespace loco::compress
