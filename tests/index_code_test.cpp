// Tests of the index codings of the chunked compressors (include/loco/compress/index_code.hpp).
//
//   * a hand-worked Elias-Fano chunk, bit for bit;
//   * streams of random ascending cells against a plain re-implementation written here from the
//     definition (one bool per stream bit), for many (cells, k) pairs and both codings;
//   * the sizes: the compact coding's choice, Elias-Fano's bound against the enumerative one;
//   * malformed streams: each corruption found, and no random bit flip crashes the checker or
//     lets through a chunk that does not decode to ascending cells in range.
#include <doctest/doctest.h>

#include "support/random.hpp"

#include <loco/compress/chunking.hpp>
#include <loco/compress/index_code.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

namespace {

namespace lc = loco::compress;
namespace ic = loco::compress::index_code;

// Uniform in [0, n).
std::size_t below(std::mt19937_64& r, std::size_t n) {
    return std::uniform_int_distribution<std::size_t>(0, n - 1)(r);
}

// The stream of `chunks` chunks of cells (chunk after chunk), one bool per bit, written from the
// definition in index_code.hpp's top comment.
std::vector<bool> reference_bits(lc::index_coding coding, std::size_t cells_per_chunk,
                                 std::size_t k, const std::vector<std::uint32_t>& cells) {
    const std::size_t chunks = cells.size() / k;
    const std::size_t b = cells_per_chunk <= 1 ? 0 : std::bit_width(cells_per_chunk - 1);
    std::vector<bool> fixed;
    for (const std::uint32_t c : cells) {
        for (std::size_t i = 0; i < b; ++i) fixed.push_back(((c >> i) & 1u) != 0);
    }
    if (coding == lc::index_coding::fixed) return fixed;
    if (k == cells_per_chunk) return {};
    std::size_t l = 0;
    while ((std::size_t{2} << l) <= cells_per_chunk / k) ++l;  // floor(log2(cells / k))
    std::vector<bool> ef;
    for (std::size_t c = 0; c < chunks; ++c) {
        for (std::size_t j = 0; j < k; ++j) {
            for (std::size_t i = 0; i < l; ++i) ef.push_back(((cells[c * k + j] >> i) & 1u) != 0);
        }
        std::vector<bool> high(k + ((cells_per_chunk - 1) >> l), false);
        for (std::size_t j = 0; j < k; ++j) high[(cells[c * k + j] >> l) + j] = true;
        ef.insert(ef.end(), high.begin(), high.end());
    }
    return ef.size() < fixed.size() ? ef : fixed;
}

std::vector<std::byte> to_bytes(const std::vector<bool>& bits) {
    std::vector<std::byte> out(lc::chunking::padded_bit_bytes(bits.size()), std::byte{0});
    for (std::size_t i = 0; i < bits.size(); ++i) {
        if (bits[i]) out[i / 8] |= std::byte{static_cast<unsigned char>(1u << (i % 8))};
    }
    return out;
}

std::vector<std::uint32_t> random_cells(std::mt19937_64& r, std::size_t cells, std::size_t k,
                                        std::size_t chunks) {
    std::vector<std::uint32_t> out;
    std::vector<std::uint32_t> all(cells);
    for (std::size_t c = 0; c < chunks; ++c) {
        std::iota(all.begin(), all.end(), 0u);
        for (std::size_t j = 0; j < k; ++j) {  // partial Fisher-Yates
            std::swap(all[j], all[j + below(r, cells - j)]);
        }
        std::vector<std::uint32_t> pick(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(k));
        std::sort(pick.begin(), pick.end());
        out.insert(out.end(), pick.begin(), pick.end());
    }
    return out;
}

std::vector<std::byte> write(const ic::chunk_indices& code, const std::vector<std::uint32_t>& cells,
                             std::size_t chunks) {
    std::vector<std::byte> out(lc::chunking::padded_bit_bytes(chunks * code.bits()));
    lc::chunking::write_index_stream(code, cells.data(), chunks, out);
    return out;
}

}  // namespace

TEST_CASE("index_code: a hand-worked Elias-Fano chunk") {
    // Cells {1, 5, 6, 14} of 16: l = floor(log2(16 / 4)) = 2. Low parts 1, 1, 2, 2 in bits
    // 0-1, 2-3, 4-5, 6-7: 0b10100101. High parts 0, 1, 1, 3, ones at h + i = 0, 2, 3, 6 of a
    // 4 + (15 >> 2) = 7-bit vector from bit 8: 0b1001101. 15 bits against fixed's 16.
    const ic::chunk_indices code = ic::code_of(lc::index_coding::compact, 16, 4);
    CHECK(code.how == ic::chunk_indices::elias_fano);
    CHECK(code.low == 2);
    CHECK(code.bits() == 15);
    const std::vector<std::uint32_t> cells{1, 5, 6, 14};
    const std::vector<std::byte> s = write(code, cells, 1);
    REQUIRE(s.size() == 4);
    CHECK(s[0] == std::byte{0xa5});
    CHECK(s[1] == std::byte{0x4d});
    CHECK(s[2] == std::byte{0});
    CHECK(s[3] == std::byte{0});
    for (std::uint32_t j = 0; j < 4; ++j) CHECK(ic::cell(s.data(), code, 0, j) == cells[j]);
    CHECK(ic::check(s.data(), code, 0).problem == ic::verdict::ok);
}

TEST_CASE("index_code: sizes, the compact choice and Elias-Fano's bound") {
    // templar's top-64 of 64 x 64: 8 bits an index against 12, the bound log2 C(4096, 64) / 64.
    const ic::chunk_indices t = ic::code_of(lc::index_coding::compact, 4096, 64);
    CHECK(t.how == ic::chunk_indices::elias_fano);
    CHECK(t.bits() == 64 * 6 + 64 + 63);
    CHECK(ic::code_of(lc::index_coding::fixed, 4096, 64).bits() == 64 * 12);
    // Very sparse chunks keep fixed width (k = 1 of 4096: 12 bits, Elias-Fano would take 13).
    CHECK(ic::code_of(lc::index_coding::compact, 4096, 1).how == ic::chunk_indices::fixed_width);
    CHECK(ic::code_of(lc::index_coding::compact, 4096, 1).bits() == 12);
    // Every cell kept: nothing travels.
    CHECK(ic::code_of(lc::index_coding::compact, 64, 64).bits() == 0);
    CHECK(ic::code_of(lc::index_coding::compact, 1, 1).bits() == 0);
    CHECK(ic::code_of(lc::index_coding::fixed, 64, 64).bits() == 64 * 6);
    for (std::size_t cells = 1; cells <= 5000; cells = cells * 3 + 1) {
        for (std::size_t k = 1; k <= cells; k = k * 2 + 1) {
            const ic::chunk_indices f = ic::code_of(lc::index_coding::fixed, cells, k);
            const ic::chunk_indices c = ic::code_of(lc::index_coding::compact, cells, k);
            INFO(cells << " cells, k " << k);
            CHECK(c.bits() <= f.bits());
            // The compact code's size is the reference's for one chunk.
            std::mt19937_64 r(cells * 7919 + k);
            CHECK(reference_bits(lc::index_coding::compact, cells, k, random_cells(r, cells, k, 1))
                      .size() == c.bits());
            if (c.how == ic::chunk_indices::elias_fano) {
                // At most 2 + ceil(log2(cells / k)) bits an index, and within 2 bits an index of
                // the enumerative bound log2 C(cells, k) / k.
                CHECK(static_cast<double>(c.bits()) <=
                      static_cast<double>(k) *
                          (2.0 + std::ceil(std::log2(static_cast<double>(cells) / k))));
                const double bound = (std::lgamma(cells + 1.0) - std::lgamma(k + 1.0) -
                                      std::lgamma(cells - k + 1.0)) /
                                     std::log(2.0);
                CHECK(static_cast<double>(c.bits()) <= bound + 2.0 * static_cast<double>(k));
            }
        }
    }
}

TEST_CASE("index_code: random streams equal the reference, bit for bit, and decode back") {
    std::mt19937_64 r = loco_test::rng_for("index_code streams");
    const std::size_t shapes[][2] = {{4096, 64}, {4096, 1},    {4096, 2}, {4096, 4095},
                                     {4096, 2048}, {256, 2},   {64, 64},  {64, 32},
                                     {1000, 7},  {3, 2},       {2, 1},    {1, 1},
                                     {4096, 100}, {97, 10},    {4096, 4096}};
    for (const auto& shape : shapes) {
        for (const lc::index_coding coding : {lc::index_coding::fixed, lc::index_coding::compact}) {
            const std::size_t cells = shape[0];
            const std::size_t k = shape[1];
            const std::size_t chunks = 1 + below(r, 5);
            const std::vector<std::uint32_t> in = random_cells(r, cells, k, chunks);
            const ic::chunk_indices code = ic::code_of(coding, cells, k);
            INFO(cells << " cells, k " << k << ", " << chunks << " chunks, "
                       << lc::to_string(coding));
            const std::vector<std::byte> s = write(code, in, chunks);
            CHECK(s == to_bytes(reference_bits(coding, cells, k, in)));
            for (std::size_t c = 0; c < chunks; ++c) {
                CHECK(ic::check(s.data(), code, c).problem == ic::verdict::ok);
                for (std::uint32_t j = 0; j < k; ++j) {
                    REQUIRE(ic::cell(s.data(), code, c, j) == in[c * k + j]);
                }
                // The walk a decoder uses: the same cells, in order, once each.
                std::vector<std::uint32_t> walked;
                const std::uint64_t held =
                    ic::for_each_cell(s.data(), code, c, [&](std::uint32_t j, std::uint32_t i) {
                        CHECK(j == walked.size());
                        walked.push_back(i);
                    });
                CHECK(held == k);
                CHECK(walked == std::vector<std::uint32_t>(in.begin() + c * k,
                                                           in.begin() + (c + 1) * k));
            }
            CHECK(lc::chunking::check_index_stream(s, chunks, code).empty());
        }
    }
}

TEST_CASE("index_code: malformed Elias-Fano streams are found") {
    const ic::chunk_indices code = ic::code_of(lc::index_coding::compact, 16, 4);
    const auto problem = [&](std::uint8_t lowbyte, std::uint8_t highbyte) {
        const std::vector<std::byte> s{std::byte{lowbyte}, std::byte{highbyte}, std::byte{0},
                                       std::byte{0}};
        return ic::check(s.data(), code, 0);
    };
    CHECK(problem(0xa5, 0x4d).problem == ic::verdict::ok);  // {1, 5, 6, 14}
    // A fifth one in the high part, or only three.
    CHECK(problem(0xa5, 0x4f).problem == ic::verdict::ones_count);
    CHECK(problem(0xa5, 0x4f).value == 5);
    CHECK(problem(0xa5, 0x49).problem == ic::verdict::ones_count);
    // Cells 5 and 6 share high part 1: low parts 2 then 1 make 6 before 5.
    CHECK(problem(0x99, 0x4d).problem == ic::verdict::unsorted);
    // Equal low parts under one high part: a repeated cell.
    CHECK(problem(0x95, 0x4d).problem == ic::verdict::unsorted);  // {1, 5, 5, 14}
    // Past the last cell: 13 cells (l = 1), high part of 4 + 6 bits; cell 12 + low 1 = 13.
    const ic::chunk_indices odd = ic::code_of(lc::index_coding::compact, 13, 4);
    REQUIRE(odd.how == ic::chunk_indices::elias_fano);
    REQUIRE(odd.low == 1);
    std::vector<std::byte> s = write(odd, {0, 1, 2, 12}, 1);
    CHECK(ic::check(s.data(), odd, 0).problem == ic::verdict::ok);
    s[0] |= std::byte{0x08};  // the last index's low bit: 12 -> 13
    CHECK(ic::check(s.data(), odd, 0).problem == ic::verdict::beyond);
    CHECK(ic::describe(ic::check(s.data(), odd, 0), odd) == "index 13 in a chunk of 13 cells");
    // Padding after the last chunk.
    std::vector<std::byte> p = write(code, {1, 5, 6, 14}, 1);
    p[1] |= std::byte{0x80};
    CHECK(lc::chunking::check_index_stream(p, 1, code) == "nonzero padding after the indices");
}

TEST_CASE("index_code: random bit flips never pass as a malformed chunk") {
    std::mt19937_64 r = loco_test::rng_for("index_code flips");
    for (int trial = 0; trial < 400; ++trial) {
        const std::size_t cells = 2 + below(r, 300);
        const std::size_t k = 1 + below(r, cells);
        const ic::chunk_indices code = ic::code_of(lc::index_coding::compact, cells, k);
        if (code.bits() == 0) continue;
        const std::size_t chunks = 1 + below(r, 3);
        std::vector<std::byte> s = write(code, random_cells(r, cells, k, chunks), chunks);
        const std::uint64_t bit = below(r, chunks * code.bits());
        s[bit / 8] ^= std::byte{static_cast<unsigned char>(1u << (bit % 8))};
        INFO(cells << " cells, k " << k << ", bit " << bit);
        if (!lc::chunking::check_index_stream(s, chunks, code).empty()) continue;
        // Accepted: then every chunk decodes to k ascending cells in range, alike by cell() and
        // by the walk.
        for (std::size_t c = 0; c < chunks; ++c) {
            for (std::uint32_t j = 0; j < k; ++j) {
                const std::uint32_t i = ic::cell(s.data(), code, c, j);
                CHECK(i < cells);
                if (j > 0) CHECK(i > ic::cell(s.data(), code, c, j - 1));
            }
            CHECK(ic::for_each_cell(s.data(), code, c, [&](std::uint32_t j, std::uint32_t i) {
                CHECK(i == ic::cell(s.data(), code, c, j));
            }) == k);
        }
    }
}
