// Tests of DeMo / DisTrO compression (include/loco/compress/demo.hpp, dct.hpp, chunking.hpp).
//
//   * Psyche's golden vectors, copied as numbers from PsycheFoundation/psyche
//     shared/modeling/src/distro.rs (mod tests: test_get_smaller_split, test_dct, test_idct,
//     test_encode_1d, test_encode_2d, test_decode_1d, test_decode_2d, test_compress_1d,
//     test_compress_2d, test_decompress_1d, test_decompress_2d,
//     test_signed_vals_reconstructs_original_sign), with Psyche's tolerance (allclose 1e-4);
//   * one round of the compressor (residual, DCT, top-k, decode, residual update) against a plain
//     double-precision re-computation (tests/support/chunked_reference.hpp) on random inputs;
//   * payload sizes against the documented formula; bad settings and malformed payloads refused
//     with nothing written.
#include <doctest/doctest.h>

#include "support/chunked_reference.hpp"
#include "support/payloads.hpp"
#include "support/random.hpp"

#include <loco/compress/chunking.hpp>
#include <loco/compress/dct.hpp>
#include <loco/compress/demo.hpp>
#include <loco/compress/wire.hpp>
#include <loco/error.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <utility>
#include <vector>

namespace {

namespace lc = loco::compress;
namespace wire = loco::compress::wire;
namespace ref = loco_test::chunked;

using matrix4 = std::array<std::array<double, 4>, 4>;

// distro.rs test_dct: dct(eye(4), ortho).
constexpr matrix4 psyche_dct4 = {{{0.5000, 0.6533, 0.5000, 0.2706},
                                  {0.5000, 0.2706, -0.5000, -0.6533},
                                  {0.5000, -0.2706, -0.5000, 0.6533},
                                  {0.5000, -0.6533, 0.5000, -0.2706}}};
// distro.rs test_idct: idct(eye(4), ortho).
constexpr matrix4 psyche_idct4 = {{{0.5000, 0.5000, 0.5000, 0.5000},
                                   {0.6533, 0.2706, -0.2706, -0.6533},
                                   {0.5000, -0.5000, -0.5000, 0.5000},
                                   {0.2706, -0.6533, 0.6533, -0.2706}}};

// torch.allclose(a, b, rtol, atol): |a - b| <= atol + rtol * |b|.
bool allclose(double a, double b, double rtol = 1e-4, double atol = 1e-8) {
    return std::abs(a - b) <= atol + rtol * std::abs(b);
}

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
constexpr std::uint32_t sentinel_bits = 0x7fa5a5a5u;

lc::segment flat(std::size_t offset, std::size_t size) { return {offset, size, 1, size}; }

std::vector<std::byte> encode(const lc::demo::hyper& h, std::span<const float> x,
                              std::span<const lc::segment> segs, std::span<float> state) {
    std::vector<std::byte> out(lc::demo::payload_bytes(h, segs));
    lc::demo::encode(h, x, segs, state, {}, out);
    return out;
}

std::vector<float> decode(const lc::demo::hyper& h, std::span<const std::byte> p,
                          std::span<const lc::segment> segs, std::size_t n) {
    std::vector<float> out(n, 0.0f);
    lc::demo::decode(h, p, segs, out);
    return out;
}

// x such that the DCT of each of its chunks of `w` (1-D) is the given row of coefficients.
std::vector<float> with_coefficients(const std::vector<std::vector<double>>& rows) {
    std::vector<float> x;
    for (const auto& row : rows) {
        for (const double v : ref::idct2(row, 1, row.size())) {
            x.push_back(static_cast<float>(v));
        }
    }
    return x;
}

using loco_test::reseal;

// fp32 values or signs, with each index coding.
constexpr std::array<std::pair<bool, lc::index_coding>, 4> variants = {
    std::pair{false, lc::index_coding::compact}, std::pair{true, lc::index_coding::compact},
    std::pair{false, lc::index_coding::fixed}, std::pair{true, lc::index_coding::fixed}};

}  // namespace

TEST_CASE("chunking: chunk sides are the largest divisors at or below the target (Psyche's "
          "test_get_smaller_split)") {
    CHECK(lc::chunking::side(12, 3) == 3);
    CHECK(lc::chunking::side(12, 4) == 4);
    CHECK(lc::chunking::side(12, 5) == 4);
    CHECK(lc::chunking::side(100, 7) == 5);
    CHECK(lc::chunking::side(100, 26) == 25);
    CHECK(lc::chunking::side(100, 101) == 100);
    CHECK(lc::chunking::side(1, 1) == 1);
    CHECK(lc::chunking::side(1000000007, 500000000) == 1);  // test_large_numbers
    auto rng = loco_test::rng_for("chunking side");
    for (int i = 0; i < 2000; ++i) {
        const std::size_t n = 1 + rng() % 5000;
        const std::size_t target = 1 + rng() % 200;
        INFO("n = " << n << ", target = " << target);
        CHECK(lc::chunking::side(n, target) == ref::side(n, target));
    }
}

TEST_CASE("dct: the 4 x 4 basis and its inverse match Psyche's test_dct and test_idct") {
    const std::vector<double> f = lc::dct::basis(4);
    for (std::size_t i = 0; i < 4; ++i) {
        for (std::size_t k = 0; k < 4; ++k) {
            CHECK(allclose(f[i * 4 + k], psyche_dct4[i][k], 1e-4, 1e-4));
            // The inverse is the transpose (orthonormal).
            CHECK(allclose(f[k * 4 + i], psyche_idct4[i][k], 1e-4, 1e-4));
        }
    }
}

TEST_CASE("dct: encode and decode of arange(8) and eye(4) match Psyche's test_encode and "
          "test_decode") {
    std::vector<double> work;
    SUBCASE("1-D: arange(8), one chunk of 8 at target 64") {
        const std::vector<float> a = {0, 1, 2, 3, 4, 5, 6, 7};
        const std::vector<double> truth = {9.8995e+00, -6.4423e+00, -4.7684e-07, -6.7345e-01,
                                           2.3842e-07, -2.0090e-01, -1.1921e-07, -5.0702e-02};
        REQUIRE(lc::chunking::side(8, 64) == 8);
        const lc::dct::chunk_transform t(1, 8);
        std::vector<float> coef(8);
        t.forward(a.data(), 8, coef.data(), work);
        for (std::size_t k = 0; k < 8; ++k) {
            CHECK(allclose(coef[k], truth[k], 1e-4, 1e-4));
        }
        std::vector<float> truth_f(truth.begin(), truth.end());
        std::vector<float> back(8);
        t.inverse(truth_f.data(), back.data(), 8, work);
        for (std::size_t i = 0; i < 8; ++i) {
            CHECK(allclose(back[i], static_cast<double>(i), 1e-4, 1e-4));
        }
    }
    SUBCASE("2-D: eye(4) transforms to eye(4) and back") {
        std::vector<float> eye(16, 0.0f);
        for (std::size_t i = 0; i < 4; ++i) {
            eye[i * 5] = 1.0f;
        }
        const lc::dct::chunk_transform t(4, 4);
        std::vector<float> coef(16);
        t.forward(eye.data(), 4, coef.data(), work);
        std::vector<float> back(16);
        t.inverse(coef.data(), back.data(), 4, work);
        for (std::size_t i = 0; i < 16; ++i) {
            CHECK(allclose(coef[i], eye[i], 1e-4, 1e-4));
            CHECK(allclose(back[i], eye[i], 1e-4, 1e-4));
        }
    }
    SUBCASE("a chunk inside a wider matrix reads and writes with the row stride") {
        // 4 x 8 with 4 x 4 chunks: the right chunk alone, compared with the reference.
        auto rng = loco_test::rng_for("dct stride");
        const std::vector<float> x = loco_test::normal_floats(rng, 32);
        const lc::dct::chunk_transform t(4, 4);
        std::vector<float> coef(16);
        t.forward(x.data() + 4, 8, coef.data(), work);
        std::vector<double> block;
        for (std::size_t r = 0; r < 4; ++r) {
            for (std::size_t c = 0; c < 4; ++c) {
                block.push_back(x[r * 8 + 4 + c]);
            }
        }
        const std::vector<double> want = ref::dct2(block, 4, 4);
        for (std::size_t i = 0; i < 16; ++i) {
            CHECK(std::abs(coef[i] - want[i]) <= 1e-6 * (1 + std::abs(want[i])));
        }
    }
}

TEST_CASE("demo: top-k of DCT coefficients matches Psyche's test_compress_2d and "
          "test_compress_1d") {
    const lc::demo::hyper base{.chunk = 4, .topk = 2, .decay = 0.0f};
    SUBCASE("four chunks of 4: the rows of test_compress_2d") {
        const std::vector<std::vector<double>> r = {{0.1911, 0.4076, 0.1649, 0.8059},
                                                    {0.2803, 0.9381, 0.9071, 0.2573},
                                                    {0.4070, 0.5765, 0.7226, 0.9486},
                                                    {0.0737, 0.7378, 0.1898, 0.2990}};
        // Psyche's indices and values (in torch.topk's order), here sent ascending.
        const std::size_t idx[4][2] = {{3, 1}, {1, 2}, {3, 2}, {1, 3}};
        const double val[4][2] = {
            {0.8059, 0.4076}, {0.9381, 0.9071}, {0.9486, 0.7226}, {0.7378, 0.2990}};
        const std::vector<float> x = with_coefficients(r);
        const std::vector<lc::segment> segs = {flat(0, 16)};
        std::vector<float> state(16, 0.0f);
        const auto p = encode(base, x, segs, state);
        // Body: 8 indices of 2 bits (4 bytes), then 8 fp32 values.
        REQUIRE(p.size() == wire::header_bytes + 4 + 32);
        const std::byte* indices = p.data() + wire::header_bytes;
        for (std::size_t c = 0; c < 4; ++c) {
            const std::size_t lo = std::min(idx[c][0], idx[c][1]);
            const std::size_t hi = std::max(idx[c][0], idx[c][1]);
            CHECK(wire::get_bits(indices, 2 * c, 2) == lo);
            CHECK(wire::get_bits(indices, 2 * c + 1, 2) == hi);
            const double v_lo = idx[c][0] == lo ? val[c][0] : val[c][1];
            const double v_hi = idx[c][0] == lo ? val[c][1] : val[c][0];
            CHECK(allclose(wire::get<float>(p, wire::header_bytes + 4 + 4 * (2 * c)), v_lo));
            CHECK(allclose(wire::get<float>(p, wire::header_bytes + 4 + 4 * (2 * c + 1)), v_hi));
        }
    }
    SUBCASE("one chunk of 8: test_compress_1d") {
        const std::vector<std::vector<double>> r = {
            {0.5223, 0.9625, 0.5487, 0.2152, 0.2161, 0.0363, 0.4944, 0.0974}};
        const std::vector<float> x = with_coefficients(r);
        const std::vector<lc::segment> segs = {flat(0, 8)};
        std::vector<float> state(8, 0.0f);
        const lc::demo::hyper h{.chunk = 64, .topk = 2, .decay = 0.0f};
        const auto p = encode(h, x, segs, state);
        const std::byte* indices = p.data() + wire::header_bytes;
        CHECK(wire::get_bits(indices, 0, 3) == 1);
        CHECK(wire::get_bits(indices, 1, 3) == 2);
        CHECK(allclose(wire::get<float>(p, wire::header_bytes + 4), 0.9625));
        CHECK(allclose(wire::get<float>(p, wire::header_bytes + 8), 0.5487));
    }
}

TEST_CASE("demo: decode of Psyche's test_decompress cases is their inverse DCT") {
    // A payload written by hand: Psyche's indices and values, then the decoded vector's DCT
    // must give back exactly those scattered coefficients (test_decompress_*'s truth).
    const auto check_case = [](std::size_t chunk_cells, std::size_t chunks,
                               const std::vector<std::vector<std::size_t>>& idx,
                               const std::vector<std::vector<double>>& val,
                               const std::vector<std::vector<double>>& truth) {
        const lc::demo::hyper h{.chunk = static_cast<std::uint32_t>(chunk_cells), .topk = 2};
        const std::size_t n = chunk_cells * chunks;
        const std::vector<lc::segment> segs = {flat(0, n)};
        std::vector<float> zeros(n, 0.0f);
        std::vector<float> state(n, 0.0f);
        std::vector<std::byte> p = encode(h, zeros, segs, state);
        std::fill(p.begin() + wire::header_bytes, p.end(), std::byte{0});
        const unsigned b = lc::chunking::index_bits(chunk_cells);
        const std::size_t index_bytes = lc::chunking::padded_stream_bytes(2 * chunks, b);
        for (std::size_t c = 0; c < chunks; ++c) {
            const bool swap = idx[c][0] > idx[c][1];
            for (std::size_t j = 0; j < 2; ++j) {
                const std::size_t from = swap ? 1 - j : j;
                wire::put_bits(p.data() + wire::header_bytes, 2 * c + j, b,
                               static_cast<std::uint32_t>(idx[c][from]));
                wire::put<float>(p, wire::header_bytes + index_bytes + 4 * (2 * c + j),
                                 static_cast<float>(val[c][from]));
            }
        }
        reseal(p);
        const std::vector<float> out = decode(h, p, segs, n);
        for (std::size_t c = 0; c < chunks; ++c) {
            const std::vector<double> x(out.begin() + static_cast<std::ptrdiff_t>(c * chunk_cells),
                                        out.begin() +
                                            static_cast<std::ptrdiff_t>((c + 1) * chunk_cells));
            const std::vector<double> coef = ref::dct2(x, 1, chunk_cells);
            for (std::size_t k = 0; k < chunk_cells; ++k) {
                CHECK(allclose(coef[k], truth[c][k], 1e-4, 1e-6));
            }
        }
    };
    SUBCASE("test_decompress_1d") {
        check_case(8, 1, {{1, 2}}, {{0.9625, 0.5487}},
                   {{0.0000, 0.9625, 0.5487, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000}});
    }
    SUBCASE("test_decompress_2d: each row a chunk") {
        check_case(4, 4, {{0, 2}, {1, 2}, {2, 3}, {3, 1}},
                   {{0.8988, 0.5175}, {0.9882, 0.8945}, {0.8285, 0.8163}, {0.9093, 0.7600}},
                   {{0.8988, 0.0000, 0.5175, 0.0000},
                    {0.0000, 0.9882, 0.8945, 0.0000},
                    {0.0000, 0.0000, 0.8285, 0.8163},
                    {0.0000, 0.7600, 0.0000, 0.9093}});
    }
}

TEST_CASE("demo sign: signs of the coefficients decode to +-1 (Psyche's "
          "test_signed_vals_reconstructs_original_sign)") {
    // Coefficients equal to Psyche's truth matrix (its idct(eye(4))), every one sent.
    std::vector<std::vector<double>> rows;
    for (const auto& row : psyche_idct4) {
        rows.emplace_back(row.begin(), row.end());
    }
    const std::vector<float> x = with_coefficients(rows);
    const std::vector<lc::segment> segs = {flat(0, 16)};
    // Every cell of each chunk is sent: at fixed width 16 indices of 2 bits (4 bytes); the compact
    // coding sends no indices for such chunks. Then 16 sign bits (2 bytes, padded to 4).
    for (const lc::index_coding coding : {lc::index_coding::fixed, lc::index_coding::compact}) {
        INFO(lc::to_string(coding));
        const lc::demo::hyper h{
            .chunk = 4, .topk = 4, .decay = 0.5f, .sign = true, .indices = coding};
        const bool fixed = coding == lc::index_coding::fixed;
        const std::size_t signs_at = wire::header_bytes + (fixed ? 4 : 0);
        std::vector<float> state(16, 0.0f);
        const auto p = encode(h, x, segs, state);
        // 1-bit values; 16 more in the header's bits for the compact coding.
        CHECK(std::to_integer<unsigned>(p[4]) == (fixed ? 1u : 17u));
        CHECK(p.size() == signs_at + 4);
        const std::vector<float> out = decode(h, p, segs, 16);
        for (std::size_t c = 0; c < 4; ++c) {
            std::vector<double> signs;
            for (std::size_t k = 0; k < 4; ++k) {
                signs.push_back(rows[c][k] < 0 ? -1.0 : 1.0);
                CHECK(wire::get_bits(p.data() + signs_at, 4 * c + k, 1) ==
                      (rows[c][k] < 0 ? 1u : 0u));
            }
            const std::vector<double> want = ref::idct2(signs, 1, 4);
            for (std::size_t i = 0; i < 4; ++i) {
                CHECK(std::abs(out[4 * c + i] - want[i]) <= 1e-6);
                // The residual keeps what the +-1 did not send (Psyche subtracts its quantized
                // results): e = x - D.
                CHECK(std::abs(state[4 * c + i] - (x[4 * c + i] - out[4 * c + i])) <= 1e-6);
            }
        }
        {  // NaN sends +1 (the canonical quiet NaN), whatever its sign; decodes to +-1
            std::vector<float> bad = x;
            bad[5] = -std::numeric_limits<float>::quiet_NaN();  // chunk 1 becomes NaN
            std::vector<float> s(16, 0.0f);
            const auto pn = encode(h, bad, segs, s);
            for (std::size_t j = 4; j < 8; ++j) {
                CHECK(wire::get_bits(pn.data() + signs_at, j, 1) == 0u);
            }
            const std::vector<float> back = decode(h, pn, segs, 16);
            CHECK(std::all_of(back.begin(), back.end(), [](float v) { return std::isfinite(v); }));
        }
        {  // +0 sends +1
            std::vector<float> zero(16, 0.0f);
            std::vector<float> s(16, 0.0f);
            const auto pz = encode(h, zero, segs, s);
            for (std::size_t j = 0; j < 16; ++j) {
                CHECK(wire::get_bits(pz.data() + signs_at, j, 1) == 0u);
            }
        }
    }
}

// The sign variant sends signbit(C), so a coefficient that rounds to -0 sends 1 (decodes to -1).
// x = [x0, 0, 0, 0] in one 1-D chunk of 4 has C_k = x0 F[0][k] with every F[0][k] =
// c_k cos(pi k / 8) > 0, so every C_k has x0's sign bit; for x0 = -2^-149, C_0 = -2^-150 (a tie
// between -0 and -2^-149, to even: -0) and C_3 = -0.27 * 2^-149 round to -0 in fp32.
TEST_CASE("demo sign: a coefficient that rounds to -0 sends the sign bit 1") {
    auto rng = loco_test::rng_for("demo sign of -0");
    const lc::demo::hyper h{.chunk = 4, .topk = 4, .decay = 0.5f, .sign = true};
    const std::vector<lc::segment> segs = {flat(0, 4)};
    // Compact coding with every cell sent: no index bits, the 4 signs right after the header.
    std::vector<float> firsts = {-0x1p-149f, 0x1p-149f};
    for (const float v : loco_test::normal_floats(rng, 6)) {
        firsts.push_back(v);
    }
    for (const float x0 : firsts) {
        CAPTURE(x0);
        const std::vector<float> x = {x0, 0.0f, 0.0f, 0.0f};
        if (std::abs(x0) == 0x1p-149f) {  // the precondition: C_0 is a zero of x0's sign
            std::vector<float> coef(4);
            std::vector<double> work;
            lc::dct::chunk_transform(1, 4).forward(x.data(), 4, coef.data(), work);
            REQUIRE(coef[0] == 0.0f);
            REQUIRE(std::signbit(coef[0]) == std::signbit(x0));
            REQUIRE(static_cast<float>(static_cast<double>(x0) / 2) == 0.0f);
        }
        std::vector<float> state(4, 0.0f);
        const auto p = encode(h, x, segs, state);
        REQUIRE(p.size() == wire::header_bytes + 4);
        std::vector<double> signs;
        for (std::size_t k = 0; k < 4; ++k) {
            CAPTURE(k);
            CHECK(wire::get_bits(p.data() + wire::header_bytes, k, 1) ==
                  (std::signbit(x0) ? 1u : 0u));
            signs.push_back(std::signbit(x0) ? -1.0 : 1.0);
        }
        const std::vector<float> out = decode(h, p, segs, 4);
        const std::vector<double> want = ref::idct2(signs, 1, 4);
        for (std::size_t i = 0; i < 4; ++i) {
            CHECK(std::abs(out[i] - want[i]) <= 1e-6);
        }
    }
}

TEST_CASE("demo: one round against a double-precision re-computation") {
    auto rng = loco_test::rng_for("demo round");
    // A 12 x 20 matrix (chunks 4 x 5 at target 5: 3 x 4 chunks of 20 cells), a flat 100 (target
    // 5: chunks of 5) and a 7 x 3 matrix (7 is prime above 5: chunks of 1 x 3), with gaps.
    const std::vector<lc::segment> segs = {
        {1, 240, 12, 20}, {243, 100, 1, 100}, {345, 21, 7, 3}};
    const std::size_t n = 368;
    // Top-3 of chunks of 20 and 5 cells travel in Elias-Fano's code when compact (13 bits a
    // chunk against 15, 7 against 9), the chunks of 3 cells keep every cell and send no indices.
    for (const auto& [sign, coding] : variants) {
        INFO((sign ? "signs, " : "fp32, ") << lc::to_string(coding));
        const lc::demo::hyper h{
            .chunk = 5, .topk = 3, .decay = 0.9f, .sign = sign, .indices = coding};
        const std::vector<float> x = loco_test::normal_floats(rng, n);
        std::vector<float> state = loco_test::normal_floats(rng, n, 0.5f);
        const std::vector<float> before = state;
        const auto p = encode(h, x, segs, state);
        const std::vector<float> out = decode(h, p, segs, n);

        std::size_t at = wire::header_bytes;
        std::size_t skipped = 0;
        for (const lc::segment& s : segs) {
            const std::size_t rows = s.rows;
            const std::size_t cols = s.size / rows;
            const ref::chunk_list cl = ref::chunks(rows, cols, h.chunk);
            const std::size_t cells = cl.h * cl.w;
            const std::size_t k = std::min<std::size_t>(h.topk, cells);
            const ref::index_form f =
                ref::index_form_of(coding == lc::index_coding::compact, cells, k);
            const std::size_t sent = cl.cells.size() * k;
            const std::size_t index_bytes = ref::index_stream_bytes(f, cl.cells.size());
            const std::size_t value_bytes = sign ? ((sent + 7) / 8 + 3) / 4 * 4 : 4 * sent;
            for (std::size_t c = 0; c < cl.cells.size(); ++c) {
                // e = decay * e + x in fp32 (as the compressor stores it), then the reference.
                std::vector<double> e;
                for (const std::size_t i : cl.cells[c]) {
                    e.push_back(static_cast<double>(
                        static_cast<float>(h.decay * before[s.offset + i] + x[s.offset + i])));
                }
                const std::vector<double> coef = ref::dct2(e, cl.h, cl.w);
                if (ref::selection_margin(coef, k) < 1e-5) {
                    ++skipped;  // fp32 coefficients may pick either of two near-equal ones
                    continue;
                }
                const std::vector<std::size_t> keep = ref::top_k(coef, k);
                std::vector<double> sent_coef(cells, 0.0);
                for (std::size_t j = 0; j < k; ++j) {
                    const std::size_t slot = c * k + j;
                    CHECK(ref::index_at(p.data() + at, f, k, c, j) == keep[j]);
                    if (sign) {
                        CHECK(wire::get_bits(p.data() + at + index_bytes, slot, 1) ==
                              (coef[keep[j]] < 0 ? 1u : 0u));
                        sent_coef[keep[j]] = coef[keep[j]] < 0 ? -1.0 : 1.0;
                    } else {
                        const float v = wire::get<float>(p, at + index_bytes + 4 * slot);
                        CHECK(std::abs(v - coef[keep[j]]) <= 1e-5 * (1 + std::abs(coef[keep[j]])));
                        sent_coef[keep[j]] = coef[keep[j]];
                    }
                }
                const std::vector<double> d = ref::idct2(sent_coef, cl.h, cl.w);
                for (std::size_t j = 0; j < cells; ++j) {
                    const std::size_t i = s.offset + cl.cells[c][j];
                    CHECK(std::abs(out[i] - d[j]) <= 1e-5 * (1 + std::abs(d[j])));
                    CHECK(std::abs(state[i] - (e[j] - d[j])) <= 1e-5 * (1 + std::abs(e[j])));
                }
            }
            at += index_bytes + value_bytes;
        }
        CHECK(at == p.size());
        CHECK(skipped <= 2);
        // Elements outside the segments keep their state.
        CHECK(bits_of(state[0]) == bits_of(before[0]));
        CHECK(bits_of(state[242]) == bits_of(before[242]));
    }
}

TEST_CASE("demo: payload bytes follow the documented formula") {
    struct shape {
        std::size_t rows, cols;
    };
    for (const lc::index_coding coding : {lc::index_coding::fixed, lc::index_coding::compact}) {
        for (const bool sign : {false, true}) {
            for (const std::uint32_t chunk : {1u, 4u, 16u, 64u}) {
                for (const std::uint32_t topk : {1u, 3u, 32u, 256u}) {
                    if (topk > chunk * chunk) {
                        continue;
                    }
                    const lc::demo::hyper h{
                        .chunk = chunk, .topk = topk, .sign = sign, .indices = coding};
                    for (const shape sh : {shape{1, 1}, shape{1, 1000}, shape{768, 3072},
                                           shape{97, 64}, shape{50257, 1}}) {
                        const std::size_t size = sh.rows * sh.cols;
                        const lc::segment s{0, size, sh.rows, sh.cols};
                        const std::size_t cells =
                            ref::side(sh.rows, chunk) * ref::side(sh.cols, chunk);
                        const std::size_t k = std::min<std::size_t>(topk, cells);
                        const std::size_t chunks = size / cells;
                        const std::size_t sent = chunks * k;
                        const ref::index_form f =
                            ref::index_form_of(coding == lc::index_coding::compact, cells, k);
                        const std::size_t want =
                            wire::header_bytes + ref::index_stream_bytes(f, chunks) +
                            (sign ? ((sent + 7) / 8 + 3) / 4 * 4 : 4 * sent);
                        INFO(sh.rows << " x " << sh.cols << ", chunk " << chunk << ", topk "
                                     << topk << ", " << lc::to_string(coding)
                                     << (sign ? ", signs" : ""));
                        CHECK(lc::demo::payload_bytes(h, std::span(&s, 1)) == want);
                    }
                }
            }
        }
    }
    // DeMo's defaults on a 4096 x 4096 matrix: 4096 chunks of 64 x 64, 32 values each of fp32.
    // Fixed width: 12-bit indices. Compact: Elias-Fano with l = floor(log2(4096 / 32)) = 7 low bits
    // an index and a high part of 32 + (4095 >> 7) = 63 bits: 287 bits a chunk instead of 384.
    const lc::segment big{0, 4096 * 4096, 4096, 4096};
    CHECK(lc::demo::payload_bytes({.indices = lc::index_coding::fixed}, std::span(&big, 1)) ==
          wire::header_bytes + 4096 * 32 * 12 / 8 + 4096 * 32 * 4);
    CHECK(lc::demo::payload_bytes({}, std::span(&big, 1)) ==
          wire::header_bytes + 4096 * 287 / 8 + 4096 * 32 * 4);
    // The sign variant: 13 bits a value at fixed width, 287 / 32 + 1 = 9.97 compact.
    CHECK(lc::demo::payload_bytes({.sign = true}, std::span(&big, 1)) ==
          wire::header_bytes + 4096 * 287 / 8 + 4096 * 32 / 8);
}

TEST_CASE("demo: bad settings and shapes are refused with one sentence") {
    const auto refused = [](lc::demo::hyper h) {
        CHECK_THROWS_AS(lc::demo::validate(h), loco::invalid_argument);
    };
    refused({.topk = 0});
    refused({.chunk = 4, .topk = 17});  // more than the 16 cells of a 4 x 4 chunk
    refused({.chunk = 0});
    refused({.chunk = 70000});
    // A side of 65535 would need a 34 GB basis: refused up front, not an allocation failure.
    CHECK_THROWS_WITH_AS(lc::demo::validate({.chunk = 65535}),
                         "loco::compress::demo: chunk must be at most 1024 (the DCT keeps a chunk "
                         "x chunk basis and costs chunk multiply-adds per element and direction; "
                         "DeMo uses 64), got 65535",
                         loco::invalid_argument);
    CHECK_NOTHROW(lc::demo::validate({.chunk = 1024}));
    refused({.chunk = 1025});  // the first side above max_chunk
    refused({.decay = 1.0f});
    refused({.decay = -0.1f});
    refused({.decay = std::nanf("")});
    // An index coding outside the enumeration (a value read from a file, say).
    CHECK_THROWS_WITH_AS(lc::demo::validate({.indices = static_cast<lc::index_coding>(7)}),
                         "loco::compress::demo: indices must be index_coding::fixed or ::compact",
                         loco::invalid_argument);
    CHECK_NOTHROW(lc::demo::validate({.chunk = 4, .topk = 16, .decay = 0.0f}));

    const lc::demo::hyper h{.chunk = 4, .topk = 2};
    const std::vector<lc::segment> bad_rows = {{0, 10, 3, 3}};  // 3 rows do not divide 10
    CHECK_THROWS_AS(lc::demo::payload_bytes(h, bad_rows), loco::shape_error);
    const std::vector<lc::segment> segs = {flat(0, 8)};
    std::vector<float> x(8, 1.0f);
    std::vector<float> short_state(7, 0.5f);
    std::vector<std::byte> out(lc::demo::payload_bytes(h, segs));
    CHECK_THROWS_AS(lc::demo::encode(h, x, segs, short_state, {}, out), loco::shape_error);
    CHECK(std::all_of(short_state.begin(), short_state.end(), [](float v) { return v == 0.5f; }));
    std::vector<float> state(8, 0.5f);
    std::vector<std::byte> small(out.size() - 1);
    CHECK_THROWS_AS(lc::demo::encode(h, x, segs, state, {}, small), loco::shape_error);
    CHECK(std::all_of(state.begin(), state.end(), [](float v) { return v == 0.5f; }));
}

TEST_CASE("demo: payloads that pass the checksum but break the format are refused") {
    auto rng = loco_test::rng_for("demo malformed");
    // Two flat segments of 16 at chunk 4: 4 chunks of 4 cells, 2 kept, 2-bit indices.
    const std::vector<lc::segment> segs = {flat(0, 16), flat(16, 16)};
    for (const bool sign : {false, true}) {
        const lc::demo::hyper h{.chunk = 4, .topk = 2, .sign = sign};
        const std::vector<float> x = loco_test::normal_floats(rng, 32);
        std::vector<float> state(32, 0.0f);
        const auto good = encode(h, x, segs, state);
        const std::size_t body = wire::header_bytes;
        const auto refused = [&](std::vector<std::byte> p, const char* what) {
            INFO(what << (sign ? " (sign)" : ""));
            reseal(p);
            std::vector<float> out(32, std::bit_cast<float>(sentinel_bits));
            CHECK_THROWS_AS(lc::demo::decode(h, p, segs, out), loco::wire_error);
            CHECK(std::all_of(out.begin(), out.end(),
                              [](float v) { return bits_of(v) == sentinel_bits; }));
        };
        const auto set_index = [&](std::vector<std::byte>& p, std::size_t slot, unsigned v) {
            std::byte* s = p.data() + body;
            // Clear, then write the 2 bits.
            const std::size_t bit = 2 * slot;
            auto& byte = reinterpret_cast<unsigned char&>(s[bit / 8]);
            byte = static_cast<unsigned char>(byte & ~(3u << (bit % 8)));
            wire::put_bits(s, slot, 2, v);
        };
        {
            auto p = good;
            set_index(p, 1, wire::get_bits(p.data() + body, 0, 2));
            refused(p, "a repeated index");
        }
        {
            auto p = good;
            const unsigned a = wire::get_bits(p.data() + body, 0, 2);
            const unsigned b = wire::get_bits(p.data() + body, 1, 2);
            set_index(p, 0, b);
            set_index(p, 1, a);
            refused(p, "unsorted indices");
        }
        {
            // Chunks of 4 cells use every 2-bit index; chunks of 3 cells (target 3 on 9
            // elements) leave index 3 out of range.
            const lc::demo::hyper h3{.chunk = 3, .topk = 1, .sign = sign};
            const std::vector<lc::segment> s9 = {flat(0, 9)};
            std::vector<float> st(9, 0.0f);
            auto p = encode(h3, std::span(x).first(9), s9, st);
            p[body] = std::byte{3};  // index 3 in a chunk of 3 cells
            reseal(p);
            std::vector<float> out(9, std::bit_cast<float>(sentinel_bits));
            CHECK_THROWS_AS(lc::demo::decode(h3, p, s9, out), loco::wire_error);
            CHECK(std::all_of(out.begin(), out.end(),
                              [](float v) { return bits_of(v) == sentinel_bits; }));
        }
        {
            auto p = good;  // 8 slots of 2 bits use 2 of the 4 index bytes
            p[body + 2] = std::byte{0x01};
            refused(p, "nonzero padding after the indices");
            if (sign) {
                auto q = good;  // 8 sign bits use 1 of 4 bytes
                q[body + 4 + 1] = std::byte{0x80};
                refused(q, "nonzero padding after the signs");
            }
        }
        {
            // The compact coding's Elias-Fano chunks: top-4 of a flat 64 sends 4 low bits an index,
            // then a high part of 4 + (63 >> 4) = 7 bits with exactly 4 ones (23 bits against 24
            // at fixed width), padded to 4 bytes. Any flipped high bit changes the count of ones.
            const lc::demo::hyper he{.chunk = 64, .topk = 4, .sign = sign};
            const std::vector<lc::segment> s64 = {flat(0, 64)};
            std::vector<float> st(64, 0.0f);
            const auto good64 = encode(he, loco_test::normal_floats(rng, 64), s64, st);
            CHECK(good64.size() == body + 4 + (sign ? 4 : 16));
            for (const std::size_t bit : {16, 17, 18, 19, 20, 21, 22, 23, 31}) {
                INFO("bit " << bit << (sign ? " (sign)" : ""));
                auto p = good64;
                p[body + bit / 8] ^= std::byte{static_cast<unsigned char>(1u << (bit % 8))};
                reseal(p);
                std::vector<float> out(64, std::bit_cast<float>(sentinel_bits));
                CHECK_THROWS_AS(lc::demo::decode(he, p, s64, out), loco::wire_error);
                CHECK(std::all_of(out.begin(), out.end(),
                                  [](float v) { return bits_of(v) == sentinel_bits; }));
            }
        }
        {
            // Another element count in the header (a peer with other segments).
            auto p = good;
            wire::put<std::uint64_t>(p, 16, 31);
            refused(p, "an element count that disagrees");
            auto q = good;
            wire::put<std::uint32_t>(q, 12, 1);
            refused(q, "a segment count that disagrees");
            auto r = good;
            wire::put<std::uint32_t>(r, 8, 4 | (3u << 16));
            refused(r, "another topk in the header");
        }
        {
            // A payload of the other index coding (a peer built with other settings), refused at
            // the header's bits before its body is read.
            const lc::demo::hyper he{.chunk = 64, .topk = 4, .sign = sign};
            lc::demo::hyper hf = he;
            hf.indices = lc::index_coding::fixed;
            const std::vector<lc::segment> s64 = {flat(0, 64)};
            std::vector<float> st(64, 0.0f);
            const auto compact = encode(he, loco_test::normal_floats(rng, 64), s64, st);
            std::vector<float> out(64, std::bit_cast<float>(sentinel_bits));
            CHECK_THROWS_AS(lc::demo::decode(hf, compact, s64, out), loco::wire_error);
            CHECK(std::all_of(out.begin(), out.end(),
                              [](float v) { return bits_of(v) == sentinel_bits; }));
        }
    }
}

// The sign variant's N sign bits are zero-padded to a multiple of 4 bytes: a set padding bit is
// refused at every position from bit N on, bit N itself included.
TEST_CASE("demo sign: a set padding bit after the signs is refused at every position") {
    auto rng = loco_test::rng_for("demo sign padding");
    struct setting {
        std::uint32_t chunk, topk;
        std::size_t n;
        lc::index_coding indices;
    };
    // N = chunks * topk: 4 * 2 = 8, 4 * 3 = 12, 3 * 5 = 15, 5 * 8 = 40.
    for (const setting s : {setting{4, 2, 16, lc::index_coding::fixed},
                            setting{4, 3, 16, lc::index_coding::compact},
                            setting{8, 5, 24, lc::index_coding::fixed},
                            setting{8, 8, 40, lc::index_coding::compact}}) {
        const lc::demo::hyper h{
            .chunk = s.chunk, .topk = s.topk, .sign = true, .indices = s.indices};
        const std::vector<lc::segment> segs = {flat(0, s.n)};
        const std::size_t signs = s.n / s.chunk * s.topk;  // N
        const std::size_t sign_bytes = (signs + 31) / 32 * 4;
        const std::vector<float> x = loco_test::normal_floats(rng, s.n);
        std::vector<float> state(s.n, 0.0f);
        const auto good = encode(h, x, segs, state);
        // One segment: the signs are the payload's last bytes.
        const std::size_t at = good.size() - sign_bytes;
        CHECK_NOTHROW(decode(h, good, segs, s.n));
        for (std::size_t bit = signs; bit < 8 * sign_bytes; ++bit) {
            INFO("N = " << signs << ", padding bit " << bit);
            auto p = good;
            REQUIRE((std::to_integer<unsigned>(p[at + bit / 8]) >> (bit % 8) & 1u) == 0u);
            p[at + bit / 8] ^= static_cast<std::byte>(1u << (bit % 8));
            reseal(p);
            std::vector<float> out(s.n, std::bit_cast<float>(sentinel_bits));
            CHECK_THROWS_AS(lc::demo::decode(h, p, segs, out), loco::wire_error);
            CHECK(std::all_of(out.begin(), out.end(),
                              [](float v) { return bits_of(v) == sentinel_bits; }));
        }
    }
}

TEST_CASE("demo: decode_scatter_mean is the references' coefficient-domain mean, checked against "
          "a double re-computation") {
    auto rng = loco_test::rng_for("demo scatter mean");
    // A 12 x 20 matrix (chunks 4 x 5), a flat 100 (chunks of 5), with a gap before each.
    const std::vector<lc::segment> segs = {{1, 240, 12, 20}, {243, 100, 1, 100}};
    const std::size_t n = 343;
    const std::size_t workers = 3;
    for (const auto& [sign, coding] : variants) {
        INFO((sign ? "signs, " : "fp32, ") << lc::to_string(coding));
        const lc::demo::hyper h{
            .chunk = 5, .topk = 3, .decay = 0.9f, .sign = sign, .indices = coding};
        std::vector<std::vector<std::byte>> payloads;
        for (std::size_t w = 0; w < workers; ++w) {
            std::vector<float> state = loco_test::normal_floats(rng, n, 0.5f);
            payloads.push_back(encode(h, loco_test::normal_floats(rng, n), segs, state));
        }
        std::vector<std::span<const std::byte>> views(payloads.begin(), payloads.end());
        std::vector<float> out(n, 7.0f);
        lc::demo::decode_scatter_mean(h, views, segs, out);
        CHECK(out[0] == 7.0f);  // outside the segments: untouched
        CHECK(out[242] == 7.0f);

        // The re-computation: coefficients read from the documented payload layout, averaged in
        // double over the payloads that sent them, then the double inverse DCT of each chunk.
        std::size_t at = wire::header_bytes;
        std::size_t differs_from_mean = 0;
        for (const lc::segment& s : segs) {
            const ref::chunk_list cl = ref::chunks(s.rows, s.size / s.rows, h.chunk);
            const std::size_t cells = cl.h * cl.w;
            const std::size_t k = std::min<std::size_t>(h.topk, cells);
            const ref::index_form f =
                ref::index_form_of(coding == lc::index_coding::compact, cells, k);
            const std::size_t sent = cl.cells.size() * k;
            const std::size_t index_bytes = ref::index_stream_bytes(f, cl.cells.size());
            const std::size_t value_bytes = sign ? ((sent + 7) / 8 + 3) / 4 * 4 : 4 * sent;
            for (std::size_t c = 0; c < cl.cells.size(); ++c) {
                std::vector<double> sum(cells, 0.0);
                std::vector<double> count(cells, 0.0);
                for (const auto& p : payloads) {
                    for (std::size_t j = 0; j < k; ++j) {
                        const std::size_t slot = c * k + j;
                        const std::size_t i = ref::index_at(p.data() + at, f, k, c, j);
                        sum[i] += sign ? (wire::get_bits(p.data() + at + index_bytes, slot, 1)
                                              ? -1.0
                                              : 1.0)
                                       : wire::get<float>(p, at + index_bytes + 4 * slot);
                        count[i] += 1.0;
                    }
                }
                std::vector<double> mean(cells, 0.0);
                for (std::size_t i = 0; i < cells; ++i) {
                    if (count[i] != 0) mean[i] = sum[i] / count[i];
                    if (count[i] != 0 && count[i] != workers) ++differs_from_mean;
                }
                const std::vector<double> d = ref::idct2(mean, cl.h, cl.w);
                for (std::size_t j = 0; j < cells; ++j) {
                    const std::size_t i = s.offset + cl.cells[c][j];
                    CHECK(std::abs(out[i] - d[j]) <= 1e-5 * (1 + std::abs(d[j])));
                }
            }
            at += index_bytes + value_bytes;
        }
        // Independent workers pick different cells, so the divisor is not M everywhere.
        CHECK(differs_from_mean > 0);

        // One payload: decode, bit for bit. The same payload from every worker: the same.
        const std::vector<float> one = decode(h, payloads[0], segs, n);
        for (const std::size_t m : {std::size_t{1}, workers}) {
            std::vector<std::span<const std::byte>> same(m, std::span<const std::byte>(payloads[0]));
            std::vector<float> got(n, 0.0f);
            lc::demo::decode_scatter_mean(h, same, segs, got);
            std::size_t bad = 0;
            for (std::size_t i = 0; i < n; ++i) bad += bits_of(got[i]) != bits_of(one[i]);
            CHECK(bad == 0);
        }

        // A corrupted payload is refused, naming it, before anything is written.
        std::vector<std::byte> broken = payloads[1];
        broken[wire::header_bytes] ^= std::byte{1};
        std::vector<std::span<const std::byte>> mixed = {payloads[0], broken};
        std::vector<float> untouched(n, 3.0f);
        try {
            lc::demo::decode_scatter_mean(h, mixed, segs, untouched);
            FAIL("a corrupted payload was accepted");
        } catch (const loco::wire_error& e) {
            CHECK(std::string(e.what()).find("payload 1") != std::string::npos);
        }
        CHECK(std::all_of(untouched.begin(), untouched.end(), [](float v) { return v == 3.0f; }));
        CHECK_THROWS_AS(lc::demo::decode_scatter_mean(h, {}, segs, untouched),
                        loco::invalid_argument);
    }
}
