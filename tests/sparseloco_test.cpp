// Tests of SparseLoCo's compressor (include/loco/compress/sparseloco.hpp).
//
//   * one round on a fixed 128 x 128 input against a double-precision re-computation written
//     from templar's code (derivation below);
//   * templar's per-chunk k rule (_clamp_topk), the quantizer's edge cases, several rounds of the
//     error-feedback accumulator;
//   * payload bytes equal to the documented formula, 204x below fp32 at the defaults (146x with
//     templar's fixed-width indices);
//   * bad settings and malformed payloads refused with nothing written;
//   * sparseloco and demo inside loco::diloco (two threads): the bytes per sync, the workers in
//     agreement after each sync, the accumulator carrying what was not sent.
#include <doctest/doctest.h>

#include "support/chunked_reference.hpp"
#include "support/payloads.hpp"
#include "support/random.hpp"

#include <loco/comm/threads.hpp>
#include <loco/compress/chunking.hpp>
#include <loco/compress/demo.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/compress/wire.hpp>
#include <loco/diloco.hpp>
#include <loco/error.hpp>
#include <loco/exchange.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/params.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

namespace lc = loco::compress;
namespace wire = loco::compress::wire;
namespace ref = loco_test::chunked;
using sl = lc::sparseloco;

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
constexpr std::uint32_t sentinel_bits = 0x7fa5a5a5u;

lc::segment flat(std::size_t offset, std::size_t size) { return {offset, size, 1, size}; }

std::vector<std::byte> encode(const sl::hyper& h, std::span<const float> x,
                              std::span<const lc::segment> segs, std::span<float> state) {
    std::vector<std::byte> out(sl::payload_bytes(h, segs));
    sl::encode(h, x, segs, state, {}, out);
    return out;
}

std::vector<float> decode(const sl::hyper& h, std::span<const std::byte> p,
                          std::span<const lc::segment> segs, std::size_t n) {
    std::vector<float> out(n, 0.0f);
    sl::decode(h, p, segs, out);
    return out;
}

using loco_test::reseal;

double round_half_even(double t) {
    const double low = std::floor(t);
    const double frac = t - low;
    if (frac != 0.5) {
        return frac < 0.5 ? low : low + 1;
    }
    return std::fmod(low, 2.0) == 0.0 ? low : low + 1;
}

std::size_t pad4(std::size_t bytes) { return (bytes + 3) / 4 * 4; }

}  // namespace

// One SparseLoCo round as templar runs it (src/tplr/neurons.py, the loop over parameters, with
// src/tplr/compress.py and hparams/hparams.json: momentum_decay 0.95, outer_learning_rate 1,
// target_chunk 64, topk_compression 64, use_dct false, quantization_bins 4,
// quantization_range 6), for one 128 x 128 parameter:
//
//   e    = 0.95 * e0 + 1.0 * delta                error_feedback.mul_(0.95).add_(grad, alpha=1)
//   ChunkingTransformer.encode(e, use_dct=False): _get_smaller_split(128, 64) = 64, so
//          rearrange "(y h) (x w) -> y x h w" with h = w = 64: 2 x 2 chunks of 64 x 64
//   TopKCompressor.compress: "y x h w -> y x (h w)", totalk 4096,
//          _clamp_topk(64) = 64 (<= 4096, >= 2, even); idx = topk(|e|, 64) per chunk; val = e[idx]
//   _quantize_values(val), over all 2 * 2 * 64 = 256 values:
//          offset = 4 // 2 = 2; shift = val.mean(); centered = val - shift
//          std = ||centered|| / sqrt(256 - 1); scale = 6 * std / 4
//          q = clamp(round(centered / scale + 2), 0, 3)             (torch.round: half to even)
//          lookup[b] = mean of centered over q == b (0 if empty)
//   decompress: val = lookup[q] + shift, scattered into zeros at idx; ChunkingTransformer.decode
//          puts the chunks back ("y x h w -> (y h) (x w)")
//   e    = e - decoded                             error_feedback.sub_(transmit_grad)
//
// The reference below does all of it in double from the fp32 e (the compressor stores e in fp32,
// as templar does); codes within 1e-6 of a rounding boundary may differ by one.
TEST_CASE("sparseloco: one round on a fixed 128 x 128 input matches a double-precision "
          "re-computation of templar's formulas") {
    constexpr std::size_t n = 128;
    std::vector<float> delta(n * n);
    std::vector<float> e0(n * n);
    for (std::size_t i = 0; i < n; ++i) {
        for (std::size_t j = 0; j < n; ++j) {
            const double di = static_cast<double>(i);
            const double dj = static_cast<double>(j);
            delta[i * n + j] = static_cast<float>(std::sin(1.3 * di + 0.7 * dj + 0.01 * di * dj) *
                                                  (1.0 + static_cast<double>((i * j) % 7) / 7.0));
            e0[i * n + j] = static_cast<float>(0.5 * std::cos(0.3 * di - 1.1 * dj));
        }
    }
    const sl::hyper h{};  // the defaults are templar's hparams.json
    CHECK(h.chunk == 64);
    CHECK(h.topk == 64);
    CHECK(h.bins == 4);
    CHECK(h.range == 6.0f);
    CHECK(h.beta == 0.95f);
    CHECK(h.indices == lc::index_coding::compact);
    const std::vector<lc::segment> segs = {{0, n * n, n, n}};

    // The reference.
    std::vector<double> e(n * n);
    for (std::size_t i = 0; i < n * n; ++i) {
        e[i] = static_cast<float>(0.95f * e0[i] + delta[i]);
    }
    const ref::chunk_list cl = ref::chunks(n, n, 64);
    REQUIRE(cl.h == 64);
    REQUIRE(cl.w == 64);
    REQUIRE(cl.cells.size() == 4);
    std::vector<std::size_t> positions;  // slot -> element
    std::vector<std::size_t> cells;      // slot -> in-chunk index
    std::vector<double> val;
    for (const auto& chunk : cl.cells) {
        std::vector<double> v;
        for (const std::size_t i : chunk) {
            v.push_back(e[i]);
        }
        REQUIRE(ref::selection_margin(v, 64) > 1e-6);  // the input has no near-ties at the cut
        for (const std::size_t j : ref::top_k(v, 64)) {
            cells.push_back(j);
            positions.push_back(chunk[j]);
            val.push_back(v[j]);
        }
    }
    REQUIRE(val.size() == 256);
    double sum = 0;
    for (const double v : val) {
        sum += v;
    }
    const double shift = sum / 256;
    double squares = 0;
    for (const double v : val) {
        squares += (v - shift) * (v - shift);
    }
    const double scale = 6.0 * std::sqrt(squares / 255) / 4;
    std::vector<int> q(256);
    std::vector<double> bin_sum(4, 0);
    std::vector<int> bin_count(4, 0);
    std::size_t near_boundary = 0;
    for (std::size_t j = 0; j < 256; ++j) {
        const double t = std::clamp((val[j] - shift) / scale + 2, 0.0, 3.0);
        q[j] = static_cast<int>(round_half_even(t));
        near_boundary += std::abs(t - std::floor(t) - 0.5) < 1e-6 ? 1 : 0;
        bin_sum[q[j]] += val[j] - shift;
        ++bin_count[q[j]];
    }
    REQUIRE(near_boundary == 0);  // a fixed input: no code is in doubt
    CHECK(bin_count[0] + bin_count[1] + bin_count[2] + bin_count[3] == 256);

    for (const lc::index_coding coding : {lc::index_coding::compact, lc::index_coding::fixed}) {
        INFO(lc::to_string(coding));
        const sl::hyper hc{.indices = coding};
        std::vector<float> state = e0;
        const std::vector<std::byte> p = encode(hc, delta, segs, state);
        const std::vector<float> out = decode(hc, p, segs, n * n);

        // Bytes: header 40, record 4 * (1 + 4) = 20, the indices, 256 codes of 2 bits = 64. The
        // indices at fixed width: 256 of 12 bits = 384 bytes. Compact: per chunk Elias-Fano with
        // l = floor(log2(4096 / 64)) = 6 low bits an index, then a unary high part of
        // 64 + (4095 >> 6) = 127 bits (index i's high part h_i = cell >> 6 as a one at h_i + i):
        // 511 bits a chunk (less than 768), 2044 bits for four, 256 bytes.
        const std::size_t index_bytes = coding == lc::index_coding::fixed ? 384 : 256;
        CHECK(p.size() == 40 + 20 + index_bytes + 64);

        // The payload.
        const std::size_t body = wire::header_bytes;
        CHECK(std::abs(wire::get<float>(p, body) - shift) <= 1e-6 * (1 + std::abs(shift)));
        for (int b = 0; b < 4; ++b) {
            const double want = bin_count[b] == 0 ? 0.0 : bin_sum[b] / bin_count[b];
            const float entry = wire::get<float>(p, body + 4 * (1 + b));
            CHECK(std::abs(entry - want) <= 1e-6 * (1 + std::abs(want)));
        }
        const std::byte* indices = p.data() + body + 20;
        const std::byte* codes = indices + index_bytes;
        const auto bit = [&](std::size_t b) {
            return (static_cast<unsigned>(indices[b / 8]) >> (b % 8)) & 1u;
        };
        for (std::size_t j = 0; j < 256; ++j) {
            if (coding == lc::index_coding::fixed) {
                CHECK(wire::get_bits(indices, j, 12) == cells[j]);
            } else {
                // Slot j = 64 c + i: low bits at 511 c + 6 i, the high part from 511 c + 384, where
                // the i-th one stands at (cell >> 6) + i.
                const std::size_t c = j / 64;
                const std::size_t i = j % 64;
                std::size_t low = 0;
                for (std::size_t b = 0; b < 6; ++b) low |= bit(511 * c + 6 * i + b) << b;
                CHECK(low == cells[j] % 64);
                CHECK(bit(511 * c + 384 + cells[j] / 64 + i) == 1);
                std::size_t ones = 0;
                for (std::size_t b = 0; b < 127; ++b) ones += bit(511 * c + 384 + b);
                CHECK(ones == 64);
            }
            CHECK(wire::get_bits(codes, j, 2) == static_cast<unsigned>(q[j]));
        }
        // Decoded values and the new accumulator.
        std::vector<double> decoded(n * n, 0.0);
        for (std::size_t j = 0; j < 256; ++j) {
            const double mean = bin_count[q[j]] == 0 ? 0.0 : bin_sum[q[j]] / bin_count[q[j]];
            decoded[positions[j]] = mean + shift;
        }
        std::size_t nonzero = 0;
        for (std::size_t i = 0; i < n * n; ++i) {
            CHECK(std::abs(out[i] - decoded[i]) <= 1e-6 * (1 + std::abs(decoded[i])));
            CHECK(std::abs(state[i] - (e[i] - decoded[i])) <= 1e-6 * (1 + std::abs(e[i])));
            nonzero += out[i] != 0.0f ? 1 : 0;
        }
        CHECK(nonzero == 256);
    }
}

TEST_CASE("sparseloco: values kept per chunk follow templar's _clamp_topk") {
    const auto kept = [](std::uint32_t topk, std::size_t cells) {
        return sl::kept(sl::hyper{.topk = topk}, cells);
    };
    CHECK(kept(64, 4096) == 64);
    CHECK(kept(63, 4096) == 62);  // rounded down to even (12-bit index pairs in templar)
    CHECK(kept(1, 4096) == 2);    // at least 2
    CHECK(kept(64, 48) == 48);    // at most the chunk
    CHECK(kept(64, 3) == 2);
    CHECK(kept(64, 2) == 2);
    CHECK(kept(64, 1) == 1);      // one cell: the reference fails; loco sends it
}

TEST_CASE("sparseloco: payload bytes follow the documented formula, 204x below fp32 at the "
          "defaults (146x with fixed-width indices)") {
    struct shape {
        std::size_t rows, cols;
    };
    for (const lc::index_coding coding : {lc::index_coding::fixed, lc::index_coding::compact}) {
        for (const std::uint32_t bins : {2u, 3u, 4u, 16u, 256u}) {
            for (const std::uint32_t chunk : {1u, 4u, 64u}) {
                for (const std::uint32_t topk : {1u, 7u, 64u}) {
                    if (topk > chunk * chunk) {
                        continue;
                    }
                    const sl::hyper h{
                        .chunk = chunk, .topk = topk, .bins = bins, .indices = coding};
                    const unsigned qb = std::bit_width(bins - 1);
                    for (const shape sh : {shape{1, 1}, shape{1, 1000}, shape{768, 3072},
                                           shape{97, 64}, shape{50257, 1}}) {
                        const std::size_t size = sh.rows * sh.cols;
                        const lc::segment s{0, size, sh.rows, sh.cols};
                        const std::size_t cells =
                            ref::side(sh.rows, chunk) * ref::side(sh.cols, chunk);
                        std::size_t k = cells;
                        if (cells > 1) {
                            k = std::max<std::size_t>(std::min<std::size_t>(topk, cells), 2);
                            k -= k % 2;
                        }
                        const std::size_t chunks = size / cells;
                        const std::size_t sent = chunks * k;
                        // Index bits of one chunk: fixed width b, or for compact nothing when
                        // every cell is kept, else the smaller of b and Elias-Fano's.
                        const std::size_t b = cells == 1 ? 0 : std::bit_width(cells - 1);
                        std::size_t per_chunk = k * b;
                        if (coding == lc::index_coding::compact) {
                            if (k == cells) {
                                per_chunk = 0;
                            } else {
                                std::size_t l = 0;
                                while ((std::size_t{2} << l) <= cells / k) ++l;
                                per_chunk = std::min(per_chunk, k * l + k + ((cells - 1) >> l));
                            }
                        }
                        const std::size_t want = wire::header_bytes + 4 * (1 + bins) +
                                                 pad4((chunks * per_chunk + 7) / 8) +
                                                 pad4((sent * qb + 7) / 8);
                        INFO(sh.rows << " x " << sh.cols << ", chunk " << chunk << ", topk "
                                     << topk << ", bins " << bins << ", "
                                     << lc::to_string(coding));
                        CHECK(sl::payload_bytes(h, std::span(&s, 1)) == want);
                    }
                }
            }
        }
    }
    // The defaults on a 4096 x 4096 matrix: N = 2^24 / 64 values in 4096 chunks, 2-bit codes, and
    // per chunk 511 bits of Elias-Fano indices (l = 6), or 64 x 12 bits at fixed width.
    const lc::segment big{0, 4096 * 4096, 4096, 4096};
    const std::size_t bytes = sl::payload_bytes({}, std::span(&big, 1));
    CHECK(bytes == 40 + 20 + pad4((4096 * 511 + 7) / 8) + 262144 * 2 / 8);
    CHECK(4.0 * 4096 * 4096 / static_cast<double>(bytes) > 204.0);
    const std::size_t fixed =
        sl::payload_bytes({.indices = lc::index_coding::fixed}, std::span(&big, 1));
    CHECK(fixed == 40 + 20 + 262144 * 12 / 8 + 262144 * 2 / 8);
    CHECK(4.0 * 4096 * 4096 / static_cast<double>(fixed) > 146.0);
}

TEST_CASE("sparseloco: the quantizer's edge cases") {
    const sl::hyper h{.chunk = 4, .topk = 2};
    SUBCASE("equal kept values: the spread is 0, scale 1, every code the middle bin") {
        const std::vector<float> x(16, 0.25f);  // 4 chunks of 4; 2 kept each, cells 0 and 1
        std::vector<float> state(16, 0.0f);
        const std::vector<lc::segment> segs = {flat(0, 16)};
        const auto p = encode(h, x, segs, state);
        CHECK(wire::get<float>(p, wire::header_bytes) == 0.25f);
        const auto out = decode(h, p, segs, 16);
        for (std::size_t i = 0; i < 16; ++i) {
            CHECK(out[i] == (i % 4 < 2 ? 0.25f : 0.0f));
            CHECK(state[i] == (i % 4 < 2 ? 0.0f : 0.25f));
        }
    }
    SUBCASE("one element: sent exactly") {
        const std::vector<float> x = {-3.5f};
        std::vector<float> state(1, 0.0f);
        const std::vector<lc::segment> segs = {flat(0, 1)};
        const auto p = encode(h, x, segs, state);
        CHECK(decode(h, p, segs, 1)[0] == -3.5f);
        CHECK(state[0] == 0.0f);
    }
    SUBCASE("NaN reaches the receiver at every kept cell") {
        std::vector<float> x(16, 1.0f);
        x[5] = std::nanf("");
        std::vector<float> state(16, 0.0f);
        const std::vector<lc::segment> segs = {flat(0, 16)};
        const auto p = encode(h, x, segs, state);
        const auto out = decode(h, p, segs, 16);
        CHECK(std::isnan(out[5]));
        CHECK(bits_of(wire::get<float>(p, wire::header_bytes)) == 0x7fc00000u);
    }
}

TEST_CASE("sparseloco: the accumulator over several rounds is e <- beta e + x - D") {
    auto rng = loco_test::rng_for("sparseloco rounds");
    // A 48 x 40 matrix (chunks 16 x 20 at target 20, 8 kept), a flat 99 (chunks of 11), a gap.
    const std::vector<lc::segment> segs = {{0, 1920, 48, 40}, {1921, 99, 1, 99}};
    const std::size_t n = 2020;
    const sl::hyper h{.chunk = 20, .topk = 8, .bins = 4, .beta = 0.9f};
    std::vector<float> state(n, 0.0f);
    std::vector<float> e(n, 0.0f);  // the same bookkeeping in the test
    state[1920] = e[1920] = 42.0f;  // outside every segment: never touched
    for (int round = 0; round < 5; ++round) {
        const std::vector<float> x = loco_test::normal_floats(rng, n);
        const auto p = encode(h, x, segs, state);
        const auto d = decode(h, p, segs, n);
        for (const lc::segment& s : segs) {
            for (std::size_t i = s.offset; i < s.offset + s.size; ++i) {
                const float acc = h.beta * e[i] + x[i];
                e[i] = acc - d[i];
            }
        }
        CHECK(std::equal(state.begin(), state.end(), e.begin(),
                         [](float a, float b) { return bits_of(a) == bits_of(b); }));
    }
    CHECK(state[1920] == 42.0f);
    // Kept cells are where |e| was largest: a kept cell never has a smaller |accumulated| than a
    // dropped one in the same chunk, so after a round the dropped cells' residual magnitudes are
    // bounded by the chunk's smallest kept magnitude; checked via the reference on a fresh round.
    std::vector<float> s2(n, 0.0f);
    const std::vector<float> x = loco_test::normal_floats(rng, n);
    const auto p = encode(h, x, segs, s2);
    const auto d = decode(h, p, segs, n);
    const ref::chunk_list cl = ref::chunks(48, 40, 20);
    for (const auto& chunk : cl.cells) {
        double smallest_kept = 1e300;
        double largest_dropped = 0;
        for (const std::size_t i : chunk) {
            if (d[i] != 0.0f) {
                smallest_kept = std::min(smallest_kept, std::abs(double(x[i])));
            } else {
                largest_dropped = std::max(largest_dropped, std::abs(double(x[i])));
            }
        }
        CHECK(largest_dropped <= smallest_kept);
    }
}

namespace {

// The quantizer's fields for one segment whose chunks keep every cell (k_c = cells, so slot j is
// element j), from the definition in sparseloco.hpp: shift, scale and the bin means from sums in
// double in two levels (each chunk's k terms from +0, then the chunk sums in chunk order from +0),
// the codes from t = (v - shift) / scale + floor(B / 2) in fp32, NaN into bin 0.
struct quantized {
    float shift = 0.0f;
    std::vector<float> lut;
    std::vector<unsigned> q;
};

quantized two_level_reference(const std::vector<float>& v, std::size_t k, unsigned bins,
                              float range) {
    const std::size_t n = v.size();
    const auto two_level = [&](auto term) {
        double total = 0.0;
        for (std::size_t c = 0; c * k < n; ++c) {
            double part = 0.0;
            for (std::size_t j = c * k; j < (c + 1) * k; ++j) {
                part += term(j);
            }
            total += part;
        }
        return total;
    };
    const auto canonical = [](float f) {
        return std::isnan(f) ? std::bit_cast<float>(0x7fc00000u) : f;
    };
    quantized r;
    r.shift = static_cast<float>(two_level([&](std::size_t j) { return double(v[j]); }) /
                                 static_cast<double>(n));
    float scale = 1.0f;
    if (n >= 2) {
        const double squares = two_level([&](std::size_t j) {
            const double c = double(v[j]) - double(r.shift);
            return c * c;
        });
        scale = static_cast<float>(double(range) * std::sqrt(squares / double(n - 1)) /
                                   double(bins));
        if (scale == 0.0f || !std::isfinite(scale)) {
            scale = 1.0f;
        }
    }
    for (std::size_t j = 0; j < n; ++j) {
        const float t = (v[j] - r.shift) / scale + static_cast<float>(bins / 2);
        r.q.push_back(t >= 0.0f ? static_cast<unsigned>(std::min<double>(
                                      round_half_even(t), static_cast<double>(bins - 1)))
                                : 0u);
    }
    for (unsigned b = 0; b < bins; ++b) {
        std::size_t count = 0;
        const double sum = two_level([&](std::size_t j) {
            count += r.q[j] == b ? 1 : 0;
            return r.q[j] == b ? double(v[j]) - double(r.shift) : 0.0;
        });
        r.lut.push_back(count == 0 ? 0.0f : canonical(static_cast<float>(sum / double(count))));
    }
    r.shift = canonical(r.shift);
    return r;
}

// The payload's shift, table and codes against the reference, bit for bit; the segment is flat
// with chunks that keep every cell, so no index bits precede the codes.
void check_quantized(const sl::hyper& h, const std::vector<float>& v) {
    const std::vector<lc::segment> segs = {flat(0, v.size())};
    std::vector<float> state(v.size(), 0.0f);
    const auto p = encode(h, v, segs, state);
    const quantized want = two_level_reference(v, h.topk, h.bins, h.range);
    const std::size_t body = wire::header_bytes;
    CHECK(bits_of(wire::get<float>(p, body)) == bits_of(want.shift));
    for (unsigned b = 0; b < h.bins; ++b) {
        CAPTURE(b);
        CHECK(bits_of(wire::get<float>(p, body + 4 * (1 + b))) == bits_of(want.lut[b]));
    }
    const unsigned qb = static_cast<unsigned>(std::bit_width(h.bins - 1));
    std::size_t wrong_codes = 0;
    for (std::size_t j = 0; j < v.size(); ++j) {
        wrong_codes += wire::get_bits(p.data() + body + 4 * (1 + h.bins), j, qb) != want.q[j];
    }
    CHECK(wrong_codes == 0);
}

}  // namespace

// The sums of the kept values, of their squares and per bin run in two levels (each chunk's terms,
// then the chunk sums in chunk order), so a device that sums a chunk per thread has the host's
// bits; these inputs give other bits in any other order.
TEST_CASE("sparseloco: shift and bin means are summed chunk by chunk, then over the chunks") {
    const sl::hyper h{.chunk = 2, .topk = 2};  // chunks of 2 cells, both kept
    {
        // v = [2^-60, 2^-60 | 1, -1]: (2^-60 + 2^-60) + (1 + -1) = 2^-59, shift = 2^-59 / 4 =
        // 2^-61 (element order, ((2^-60 + 2^-60) + 1) + -1, would give 0).
        const std::vector<float> v = {0x1p-60f, 0x1p-60f, 1.0f, -1.0f};
        const std::vector<lc::segment> segs = {flat(0, 4)};
        std::vector<float> state(4, 0.0f);
        const auto p = encode(h, v, segs, state);
        CHECK(wire::get<float>(p, wire::header_bytes) == 0x1p-61f);
        check_quantized(h, v);
    }
    {
        // v = [a0, a0 | 1, -1 | 100, -100], a0 = 2^-60: chunk sums 2^-59, 0, 0, shift s =
        // fp32(2^-59 / 6). sigma is about 63, scale about 95: 100 lands in bin 3, -100 in bin 1,
        // the first four in bin 2 with terms a, a, 1 - s, -1 - s (a = 2^-60 - s; 1 - s and -1 - s
        // round to 1 and -1 in double), so lut[2] = fp32((a + a + 0) / 4) = fp32(a / 2), not the
        // 0 of element order.
        const std::vector<float> v = {0x1p-60f, 0x1p-60f, 1.0f, -1.0f, 100.0f, -100.0f};
        const std::vector<lc::segment> segs = {flat(0, 6)};
        std::vector<float> state(6, 0.0f);
        const auto p = encode(h, v, segs, state);
        const float s = static_cast<float>(0x1p-59 / 6.0);
        CHECK(wire::get<float>(p, wire::header_bytes) == s);
        const auto lut2 = static_cast<float>((0x1p-60 - double(s)) / 2.0);
        CHECK(lut2 != 0.0f);
        CHECK(wire::get<float>(p, wire::header_bytes + 4 * 3) == lut2);
        const unsigned want_q[] = {2, 2, 2, 2, 3, 1};
        for (std::size_t j = 0; j < 6; ++j) {
            CHECK(wire::get_bits(p.data() + wire::header_bytes + 20, j, 2) == want_q[j]);
        }
        check_quantized(h, v);
    }
    // Random values of widely different magnitudes, some cancelling across chunks.
    auto rng = loco_test::rng_for("sparseloco two-level sums");
    for (const std::uint32_t chunk : {2u, 4u, 6u, 8u}) {
        for (const std::uint32_t bins : {3u, 4u, 16u}) {
            CAPTURE(chunk);
            CAPTURE(bins);
            std::vector<float> v = loco_test::normal_floats(rng, 12 * chunk);
            for (std::size_t i = 0; i < v.size(); i += 5) {
                v[i] *= 0x1p24f;
            }
            for (std::size_t i = 3; i + chunk < v.size(); i += 7) {
                v[i + chunk] = -v[i];
            }
            check_quantized({.chunk = chunk, .topk = chunk, .bins = bins}, v);
        }
    }
}

// Kept values all equal: their spread is 0, so scale is 1 (the rule for a zero scale), every
// c = 0 and every code is floor(B / 2), whose table entry is 0; D is the value itself.
TEST_CASE("sparseloco: equal kept values take the middle code floor(B / 2)") {
    auto rng = loco_test::rng_for("sparseloco equal values");
    for (const std::uint32_t bins : {2u, 3u, 4u, 256u}) {
        CAPTURE(bins);
        const sl::hyper h{.chunk = 4, .topk = 4, .bins = bins};
        const float value = loco_test::normal_floats(rng, 1)[0];
        const std::vector<float> x(12, value);
        const std::vector<lc::segment> segs = {flat(0, 12)};
        std::vector<float> state(12, 0.0f);
        const auto p = encode(h, x, segs, state);
        const std::size_t body = wire::header_bytes;
        CHECK(wire::get<float>(p, body) == value);
        for (unsigned b = 0; b < bins; ++b) {
            CHECK(bits_of(wire::get<float>(p, body + 4 * (1 + b))) == 0u);
        }
        const unsigned qb = static_cast<unsigned>(std::bit_width(bins - 1));
        for (std::size_t j = 0; j < 12; ++j) {
            CHECK(wire::get_bits(p.data() + body + 4 * (1 + bins), j, qb) == bins / 2);
        }
        CHECK(decode(h, p, segs, 12) == x);
        CHECK(std::all_of(state.begin(), state.end(), [](float e) { return e == 0.0f; }));
    }
}

// A NaN shift or table entry is written as the quiet NaN 0x7fc00000 whatever NaN (sign, payload,
// signalling) the arithmetic carried, so the bytes do not depend on the machine.
TEST_CASE("sparseloco: a NaN among the kept values is sent as the canonical quiet NaN") {
    const sl::hyper h{.chunk = 2, .topk = 2};
    const std::vector<lc::segment> segs = {flat(0, 4)};
    for (const std::uint32_t nan : {0xffc00001u, 0x7fc12345u, 0xffffffffu, 0x7f800001u,
                                    0xff800001u, 0x7fc00000u}) {
        CAPTURE(nan);
        const std::vector<float> x = {std::bit_cast<float>(nan), 1.0f, 2.0f, 3.0f};
        std::vector<float> state(4, 0.0f);
        const auto p = encode(h, x, segs, state);
        CHECK(bits_of(wire::get<float>(p, wire::header_bytes)) == 0x7fc00000u);
        // Every t is NaN, so every code is 0 and lut[0] the NaN mean; the other bins are empty.
        CHECK(bits_of(wire::get<float>(p, wire::header_bytes + 4)) == 0x7fc00000u);
        for (std::size_t b = 1; b < 4; ++b) {
            CHECK(bits_of(wire::get<float>(p, wire::header_bytes + 4 * (1 + b))) == 0u);
        }
        const auto out = decode(h, p, segs, 4);
        CHECK(std::all_of(out.begin(), out.end(), [](float v) { return std::isnan(v); }));
    }
}

TEST_CASE("sparseloco: bad settings and shapes are refused with one sentence") {
    const auto refused = [](sl::hyper h) {
        CHECK_THROWS_AS(sl::validate(h), loco::invalid_argument);
    };
    refused({.topk = 0});
    refused({.chunk = 4, .topk = 17});
    refused({.chunk = 0});
    refused({.bins = 1});
    refused({.bins = 257});
    refused({.range = 0.0f});
    refused({.range = INFINITY});
    refused({.beta = 1.0f});
    refused({.beta = -0.01f});
    refused({.beta = std::nanf("")});
    // An index coding outside the enumeration (a value read from a file, say).
    CHECK_THROWS_WITH_AS(sl::validate({.indices = static_cast<lc::index_coding>(7)}),
                         "loco::compress::sparseloco: indices must be index_coding::fixed or "
                         "::compact",
                         loco::invalid_argument);
    CHECK_NOTHROW(sl::validate({.chunk = 4, .topk = 16, .beta = 0.0f}));

    const sl::hyper h{.chunk = 4, .topk = 2};
    const std::vector<lc::segment> bad_rows = {{0, 10, 4, 3}};  // 4 rows do not divide 10
    CHECK_THROWS_AS(sl::payload_bytes(h, bad_rows), loco::shape_error);
    const std::vector<lc::segment> segs = {flat(0, 8)};
    const std::vector<float> x(8, 1.0f);
    std::vector<float> state(8, 0.5f);
    std::vector<std::byte> small(sl::payload_bytes(h, segs) + 1);
    CHECK_THROWS_AS(sl::encode(h, x, segs, state, {}, small), loco::shape_error);
    CHECK(std::all_of(state.begin(), state.end(), [](float v) { return v == 0.5f; }));
    const std::vector<lc::segment> outside = {flat(4, 8)};
    std::vector<std::byte> out(sl::payload_bytes(h, outside));
    CHECK_THROWS_AS(sl::encode(h, x, outside, state, {}, out), loco::shape_error);
    CHECK(std::all_of(state.begin(), state.end(), [](float v) { return v == 0.5f; }));
}

TEST_CASE("sparseloco: payloads that pass the checksum but break the format are refused") {
    auto rng = loco_test::rng_for("sparseloco malformed");
    // bins 3: 2-bit codes with code 3 unused. A flat 12 at target 3: 4 chunks of 3 cells, 2
    // kept, 2-bit indices with index 3 out of range. Then a 4 x 4 matrix (2 x 2 chunks at
    // target 3, 2 kept of 4 cells, 2-bit indices).
    const std::vector<lc::segment> segs = {flat(0, 12), {12, 16, 4, 4}};
    const sl::hyper h{.chunk = 4, .topk = 2, .bins = 3};
    const sl::hyper h3{.chunk = 3, .topk = 2, .bins = 3};
    const std::vector<float> x = loco_test::normal_floats(rng, 28);
    const auto check = [&](const sl::hyper& hh, std::vector<std::byte> p, const char* what) {
        INFO(what);
        reseal(p);
        std::vector<float> out(28, std::bit_cast<float>(sentinel_bits));
        CHECK_THROWS_AS(sl::decode(hh, p, segs, out), loco::wire_error);
        CHECK(std::all_of(out.begin(), out.end(),
                          [](float v) { return bits_of(v) == sentinel_bits; }));
    };
    // Layout of the first segment at target 3: record 16 bytes, 8 indices x 2 bits (4 bytes),
    // 8 codes x 2 bits (4 bytes).
    std::vector<float> st(28, 0.0f);
    const auto good3 = encode(h3, x, segs, st);
    const std::size_t idx = wire::header_bytes + 16;
    const std::size_t codes = idx + 4;
    const auto with_slot = [](std::vector<std::byte> p, std::size_t base, std::size_t slot,
                              unsigned v) {
        auto& byte = reinterpret_cast<unsigned char&>(p[base + slot / 4]);
        byte = static_cast<unsigned char>(byte & ~(3u << (2 * (slot % 4))));
        wire::put_bits(p.data() + base, slot, 2, v);
        return p;
    };
    {
        // The good payload decodes.
        std::vector<float> out(28, 0.0f);
        CHECK_NOTHROW(sl::decode(h3, good3, segs, out));
    }
    check(h3, with_slot(good3, idx, 1, 3), "index 3 in a chunk of 3 cells");
    check(h3, with_slot(good3, idx, 1, wire::get_bits(good3.data() + idx, 0, 2)),
          "a repeated index");
    {
        const unsigned a = wire::get_bits(good3.data() + idx, 0, 2);
        const unsigned b = wire::get_bits(good3.data() + idx, 1, 2);
        check(h3, with_slot(with_slot(good3, idx, 0, b), idx, 1, a), "unsorted indices");
    }
    check(h3, with_slot(good3, codes, 2, 3), "code 3 of 3 bins");
    {
        // Every code of the first segment 1, and a nonzero table entry for the unused bin 0.
        auto p = good3;
        for (std::size_t j = 0; j < 8; ++j) {
            p = with_slot(p, codes, j, 1);
        }
        wire::put<float>(p, wire::header_bytes + 4, 1.0f);  // lut[0]
        check(h3, p, "a nonzero table entry for an unused bin");
    }
    {
        auto p = good3;  // second segment: record 16, 8 indices x 2 bits (2 bytes of 4)
        p[codes + 4 + 16 + 2] = std::byte{0x10};
        check(h3, p, "nonzero padding after the indices");
        auto q = good3;  // first segment: 8 codes x 2 bits fill 2 of 4 bytes
        q[codes + 3] = std::byte{0x01};
        check(h3, q, "nonzero padding after the codes");
    }
    {
        auto p = good3;
        wire::put<std::uint64_t>(p, 16, 27);
        check(h3, p, "an element count that disagrees");
        auto q = good3;
        wire::put<std::uint32_t>(q, 12, 3);
        check(h3, q, "a segment count that disagrees");
        auto r = good3;
        check(h, r, "a payload of other settings (chunk 3, read as chunk 4)");
        auto s = good3;
        s[5] = std::byte{3};  // flags: 4 bins
        check(h3, s, "another bin count in the header");
    }
}

TEST_CASE_TEMPLATE("sparseloco and demo plug into loco::diloco: bytes per sync are one payload per "
                   "peer, workers agree after a sync", C, lc::sparseloco, lc::demo) {
    // A 64 x 96 matrix and a bias of 96, two workers with different gradients, outer SGD with
    // lr 1 and no momentum (SparseLoCo's outer step), a sync every 4 inner steps.
    constexpr std::size_t rows = 64, cols = 96;
    for (const auto scheme : {loco::exchange_scheme::automatic, loco::exchange_scheme::two_phase}) {
        INFO("exchange " << loco::to_string(scheme));
        std::vector<float> final_w[2];
        std::uint64_t per_sync[2] = {};
        std::size_t residual_nonzero[2] = {};
        loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
            std::vector<float> w(rows * cols, 0.5f);
            std::vector<float> gw(rows * cols, 0.0f);
            std::vector<float> b(cols, 0.0f);
            std::vector<float> gb(cols, 0.0f);
            loco::parameter_list params;
            params.add_views("w", loco::host_matrix(w.data(), rows, cols),
                             loco::host_matrix(static_cast<const float*>(gw.data()), rows, cols));
            params.add("b", b, gb);
            loco::diloco<loco::inner::sgd, loco::outer::sgd, C> opt(
                params, comm, {.schedule = {.every = 4}, .exchange = scheme});
            for (int step = 0; step < 12; ++step) {
                for (std::size_t i = 0; i < gw.size(); ++i) {
                    gw[i] = std::sin(0.01f * static_cast<float>(i * (comm.rank() + 1) + step));
                }
                for (std::size_t i = 0; i < gb.size(); ++i) {
                    gb[i] = std::cos(0.1f * static_cast<float>(i + step)) * (comm.rank() + 1.0f);
                }
                opt.step();
            }
            // The payloads alone, without the all-or-nothing agreement's bytes.
            per_sync[comm.rank()] = opt.bytes_per_sync() - opt.agreement_bytes_per_sync();
            final_w[comm.rank()] = w;
            for (const float e : opt.compressor_state()) {
                residual_nonzero[comm.rank()] += e != 0.0f ? 1 : 0;
            }
        });
        const std::vector<lc::segment> segs = {{0, rows * cols, rows, cols},
                                               {rows * cols, cols, 1, cols}};
        const typename C::hyper h{};
        if (scheme == loco::exchange_scheme::automatic) {
            CHECK(per_sync[0] == C::payload_bytes(h, segs));  // all_gather: M - 1 = 1 payload
        } else {
            // two_phase: 2 (M - 1) blocks of the larger chunk payload; chunk 0 is rows 0-31 of w.
            const std::vector<lc::segment> first = {{0, rows * cols / 2, rows / 2, cols}};
            CHECK(per_sync[0] >= 2 * C::payload_bytes(h, first));
        }
        CHECK(per_sync[1] == per_sync[0]);
        // Step 12 ends with a sync: both workers hold the same parameters.
        CHECK(std::equal(final_w[0].begin(), final_w[0].end(), final_w[1].begin(), final_w[1].end(),
                         [](float a, float c) { return bits_of(a) == bits_of(c); }));
        CHECK(final_w[0] != std::vector<float>(rows * cols, 0.5f));
        // The accumulator holds what was not sent.
        CHECK(residual_nonzero[0] > rows * cols / 2);
        CHECK(residual_nonzero[1] > rows * cols / 2);
    }
}

TEST_CASE_TEMPLATE("sparseloco and demo: ranks with different settings fail at start, naming them",
                   C, lc::sparseloco, lc::demo) {
    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        std::vector<float> w(64 * 64, 0.5f);
        std::vector<float> g(w.size(), 0.0f);
        loco::parameter_list params;
        params.add_views("w", loco::host_matrix(w.data(), 64, 64),
                         loco::host_matrix(static_cast<const float*>(g.data()), 64, 64));
        typename C::hyper h{};
        if (comm.rank() == 1) {
            if constexpr (std::is_same_v<C, lc::sparseloco>) {
                h.indices = lc::index_coding::fixed;
            } else {
                h.topk = 16;
            }
        }
        loco::diloco<loco::inner::sgd, loco::outer::sgd, C> opt(
            params, comm, {.schedule = {.every = 4}, .compress = h});
        const std::string want =
            std::is_same_v<C, lc::sparseloco>
                ? "rank 0 has 'compressor: sparseloco chunk=64 topk=64 bins=4 range=6 beta=0.949999988 "
                  "indices=compact' where rank 1 has 'compressor: sparseloco chunk=64 topk=64 bins=4 "
                  "range=6 beta=0.949999988 indices=fixed'"
                : "rank 0 has 'compressor: demo chunk=64 topk=32 decay=0.999000013 sign=0 "
                  "indices=compact' where rank 1 has 'compressor: demo chunk=64 topk=16 "
                  "decay=0.999000013 sign=0 indices=compact'";
        CHECK_THROWS_WITH_AS(opt.start(), doctest::Contains(want.c_str()), loco::invalid_argument);
        CHECK(w == std::vector<float>(64 * 64, 0.5f));
    });
}
