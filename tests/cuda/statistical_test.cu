// The fused CUDA path of compress::statistical (MuLoCo's quantizer; backend/cuda/compress.hpp)
// against the host compressor: device payloads must be the host's byte for byte (the group
// statistics are summed in the order statistical.hpp defines, on both sides), error-feedback
// residuals bit for bit, averages as the host exchanger computes them; payload_check refuses what
// statistical::decode refuses, naming the rank.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "compress_support.cuh"
#include "device.cuh"
#include "model.cuh"

#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_statistical_test {

namespace {

using namespace loco_test;
namespace lcu = loco::backend::cuda;
namespace cz = loco::compress;

// A model and the rows of each tensor (for per-row groups).
struct row_model {
    std::vector<tensor_shape> shapes;
    std::vector<std::size_t> rows;
    void add(std::size_t r, std::size_t cols) {
        shapes.push_back({r * cols});
        rows.push_back(r);
    }
};

// awkward_sizes (so that awkward_values' special tensors 7 to 12 keep their sizes), cut into a
// few rows where a small factor divides them, then the chunk edges (2047, 2048, 2049), an empty
// tensor, many short rows (rows starting inside a code word for every Bits), rows of one element,
// and few long rows (chunks that end inside a row). With `large`, a tensor of 1000003 elements
// (489 chunks, the last partial).
row_model awkward_rows(std::mt19937_64& rng, bool large) {
    row_model m;
    for (const tensor_shape& s : awkward_sizes(rng)) {
        std::size_t r = 1;
        for (const std::size_t f : {3u, 5u, 2u}) {
            if (s.size % f == 0 && s.size > f) {
                r = f;
                break;
            }
        }
        m.add(r, s.size / r);
    }
    m.add(1, 2047);
    m.add(1, 2048);
    m.add(1, 2049);
    m.add(0, 0);
    m.add(300, 3);  // many short rows
    m.add(100, 7);
    m.add(17, 33);
    m.add(100, 1);  // one element per row
    m.add(3, 2049);   // few long rows
    m.add(2, 4096 + 100);
    if (large) {
        m.add(1, 1000003);
    }
    return m;
}

std::string describe(cz::granularity per) {
    return per == cz::granularity::tensor ? "per tensor" : "per row";
}

// M ranks encode on the device and on the host (payloads byte for byte, residuals bit for bit),
// then the gathered payloads are checked and averaged on the device (the host exchanger's
// average bit for bit, and its first non-finite index).
template <class C>
void check_against_host(const std::string& label, const typename C::hyper& h, bool large,
                        int ranks = 3) {
    CAPTURE(label);
    auto rng = rng_for(label);
    const row_model rm = awkward_rows(rng, large);
    device_model m(rm.shapes);
    const lcu::tensor_table table = m.table(false);
    const lcu::compress_plan<codec_of<C>> plan(table, lcu::device_compressor<C>::codec_hyper(h).per,
                                                rm.rows);
    // 0.7, not a power of two: s * x rounds (with fold_outer_lr). Rank 1 encodes in place.
    expect_encodes_and_average_match_host<C>(label, m, table, plan, h, ranks, rng, 0.7f, 1,
                                             [](std::vector<float>&) {});
}

template <int Bits>
void all_settings(bool large) {
    using S = cz::statistical<Bits>;
    using ef = cz::error_feedback<S>;
    const std::string name = "statistical<" + std::to_string(Bits) + "> ";
    for (const auto per : {cz::granularity::tensor, cz::granularity::row}) {
        const std::string base = name + describe(per) + (large ? " large" : "");
        check_against_host<S>(base + " plain", {per, 6.0f}, large);
        struct ef_case {
            float decay;
            bool fold;
        };
        for (const ef_case e : {ef_case{1.0f, false}, ef_case{0.9f, true}, ef_case{0.9f, false},
                                ef_case{1.0f, true}}) {
            typename ef::hyper h;
            h.compress = {per, e.fold ? 6.0f : 4.0f};
            h.decay = e.decay;
            h.fold_outer_lr = e.fold;
            check_against_host<ef>(base + " ef decay " + std::to_string(e.decay) +
                                       (e.fold ? " fold" : ""),
                                   h, large, e.fold ? 4 : 3);
        }
    }
}

}  // namespace

TEST_CASE("statistical: the device compressor is available for Bits 1, 2, 4 with and without "
          "error feedback") {
    static_assert(lcu::has_device_compressor<cz::statistical<1>>);
    static_assert(lcu::has_device_compressor<cz::statistical<2>>);
    static_assert(lcu::has_device_compressor<cz::statistical<4>>);
    static_assert(lcu::has_device_compressor<cz::error_feedback<cz::statistical<2>>>);
    static_assert(!lcu::has_device_compressor<cz::statistical<8>>);  // 256 bins: host exchange
    CHECK(true);
}

// Payloads, residuals and averages are the host's for both granularities, with and without
// error feedback, on awkward sizes with NaN and inf groups. (One case per Bits, so that each can
// be picked with -tc.)
TEST_CASE("statistical<1> fused encode equals the host") { all_settings<1>(false); }
TEST_CASE("statistical<2> fused encode equals the host") { all_settings<2>(false); }
TEST_CASE("statistical<4> fused encode equals the host") { all_settings<4>(false); }

TEST_CASE("statistical fused encode: a tensor of 1000003 elements (489 chunks)") {
    using ef = cz::error_feedback<cz::statistical<2>>;
    for (const auto per : {cz::granularity::tensor, cz::granularity::row}) {
        ef::hyper h;
        h.compress = {per, 6.0f};
        h.decay = 0.9f;
        h.fold_outer_lr = true;
        check_against_host<ef>("statistical<2> large " + describe(per), h, true, 2);
    }
}

TEST_CASE("statistical fused encode from the parameters (phase 1 fused in): fp32 and bf16 "
          "values with masters") {
    using S = cz::statistical<2>;
    using ef = cz::error_feedback<S>;
    auto rng = rng_for("statistical encode from params");
    device_model m(awkward_shapes(rng, 20, mixed_dtypes, false));
    m.randomize_values(rng);
    const lcu::tensor_table table = m.table(false);
    const lcu::compress_plan<S> plan(table);
    params_encode_inputs in(m, table, rng);
    lcu::device_buffer<float> next(table.padded_elements());
    next.zero(nullptr);
    sync_all();

    ef::hyper h;
    h.decay = 0.9f;
    h.fold_outer_lr = true;
    lcu::device_buffer<std::byte> payload(plan.payload_bytes());
    const lcu::encode_io io = in.io(next.get(), payload.get());
    lcu::stream s;
    lcu::encode<ef, lcu::encode_from::params>(plan, table, h, io, {11, 4, 1, 0.7f, nullptr}, s);
    s.synchronize();

    std::vector<std::byte> want(plan.payload_bytes());
    ef::encode(h, in.x, plan.segments(), in.state, {11, 4, 1, 0.7f}, want);
    expect_same_bytes(download_bytes(payload.get(), plan.payload_bytes()), want, "payload");
    expect_same_floats(lcu::to_flat(table, next.get()), in.state, "residual");
    CHECK(m.gaps_untouched());

    // Without error feedback, x is formed again from global and the parameters in every pass.
    lcu::encode<S, lcu::encode_from::params>(plan, table, {}, io, {}, s);
    s.synchronize();
    S::encode({}, in.x, plan.segments(), {}, {}, want);
    expect_same_bytes(download_bytes(payload.get(), plan.payload_bytes()), want,
                      "payload without error feedback");
}

TEST_CASE("statistical: decode + average + outer step in one kernel equals decode_average then "
          "outer_apply") {
    using S = cz::statistical<2>;
    auto rng = rng_for("statistical fused decode apply");
    device_model m(awkward_shapes(rng, 20, mixed_dtypes, false));
    m.randomize_values(rng);
    const lcu::tensor_table table = m.table(false);
    std::vector<std::size_t> rows;
    m.for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t) {
        rows.push_back(s.size % 3 == 0 && s.size > 0 ? 3 : 1);
    });
    const S::hyper h{cz::granularity::row, 6.0f};
    const lcu::compress_plan<S> plan(table, h.per, rows);
    const std::size_t n = m.total();
    const std::size_t padded = table.padded_elements();
    constexpr int ranks = 3;
    const std::size_t p = plan.payload_bytes();
    lcu::device_buffer<std::byte> gathered(ranks * p);
    lcu::device_buffer<float> delta(padded);
    lcu::stream s;
    std::vector<std::vector<std::byte>> host_payloads;
    std::vector<float> x_nan;
    const auto encode = [&](const std::vector<float>& x, int r) {
        lcu::from_flat<float>(table, x, delta.get());
        lcu::encode_io io;
        io.delta = delta.get();
        io.payload = gathered.get() + static_cast<std::size_t>(r) * p;
        lcu::encode<S, lcu::encode_from::delta>(plan, table, h, io, {1, 0, r, 1.0f, nullptr}, s);
        s.synchronize();
    };
    for (int r = 0; r < ranks; ++r) {
        const std::vector<float> x = normal_floats(rng, n, 0.01f);
        if (r == 2) {
            x_nan = x;
            x_nan[n / 2] = std::numeric_limits<float>::quiet_NaN();
        }
        encode(x, r);
        std::vector<std::byte> want(p);
        S::encode(h, x, plan.segments(), {}, {}, want);
        host_payloads.push_back(want);
    }
    {
        lcu::device_buffer<float> avg(padded);
        lcu::decode_average(plan, table, gathered.get(), ranks, avg.get(), s);
        s.synchronize();
        expect_same_floats(lcu::to_flat(table, avg.get()),
                           host_average<S>(h, host_payloads, plan.segments(), n),
                           "decode_average");
    }

    const auto go = [&](bool fused, bool skip) {
        return decode_apply_twice<S>(m, table, plan, h, gathered.get(), ranks, fused, skip, s);
    };
    for (const bool skip : {false, true}) {
        CAPTURE(skip);
        if (skip) {  // rank 2 sends a NaN: its row decodes to NaN and every rank drops the round
            encode(x_nan, 2);
        }
        const decode_apply_run fused = go(true, skip), split = go(false, skip);
        expect_fused_equals_split(fused, split, skip, m.values());
    }
}

// +inf and -inf in one group, no NaN: the sum makes a NaN whose sign and payload depend on the
// machine (x86: the negative default NaN); the record holds the quiet NaN 0x7fc00000 as on the
// host, and the group decodes to NaN.
TEST_CASE("statistical fused encode: a group of +inf and -inf sends the canonical NaN shift") {
    using S = cz::statistical<2>;
    auto rng = rng_for("statistical inf minus inf");
    const float inf = std::numeric_limits<float>::infinity();
    for (const auto per : {cz::granularity::tensor, cz::granularity::row}) {
        CAPTURE(describe(per));
        device_model m(std::vector<tensor_shape>{{6}, {40}});
        const lcu::tensor_table table = m.table(false);
        const S::hyper h{per, 6.0f};
        const lcu::compress_plan<S> plan(table, per, {1, 2});
        std::vector<float> x = normal_floats(rng, m.total());
        x[1] = inf;
        x[3] = -inf;
        x[6 + 25] = -inf;  // tensor 1, row 1
        x[6 + 30] = inf;
        lcu::device_buffer<float> delta(table.padded_elements());
        lcu::from_flat<float>(table, x, delta.get());
        lcu::device_buffer<std::byte> payload(plan.payload_bytes());
        lcu::encode_io io;
        io.delta = delta.get();
        io.payload = payload.get();
        lcu::stream s;
        lcu::encode<S, lcu::encode_from::delta>(plan, table, h, io, {}, s);
        s.synchronize();
        std::vector<std::byte> want(plan.payload_bytes());
        S::encode(h, x, plan.segments(), {}, {}, want);
        const std::vector<std::byte> got = download_bytes(payload.get(), plan.payload_bytes());
        expect_same_bytes(got, want, "payload");
        std::uint32_t shift = 0;
        std::memcpy(&shift, got.data() + cz::wire::header_bytes, 4);
        CHECK(shift == 0x7fc00000u);
    }
}

// The first non-finite average of two ranks: 3e38 sent by both at one element (its own bin, whose
// mean is about 3e38) overflows the fp32 sum there; a NaN makes its whole group NaN.
TEST_CASE("statistical payload_check finds the first non-finite average") {
    auto rng = rng_for("statistical nonfinite index");
    device_model m(std::vector<tensor_shape>{{100}, {300}});
    const lcu::tensor_table table = m.table(false);
    const std::size_t n = m.total();
    const lcu::compress_plan<cz::statistical<2>> plan(table);
    CHECK(checked_first_nonfinite(m, table, plan, rng, 170, n) == 170u);  // tensor 1, element 70
    CHECK(checked_first_nonfinite(m, table, plan, rng, n, 250) == 100u);  // tensor 1's group
    CHECK(checked_first_nonfinite(m, table, plan, rng, n, n) == lcu::no_nonfinite);
}

TEST_CASE("statistical payload_check refuses what statistical::decode refuses, naming the rank") {
    using S = cz::statistical<2>;
    auto rng = rng_for("statistical payload check");
    // Tensor 0: 2 rows of 350 (rows start mid-byte: 350 * 2 bits); tensor 2: 1 row of 1001.
    device_model m(std::vector<tensor_shape>{{700}, {0}, {1001}});
    const std::vector<std::size_t> rows = {2, 1, 1};
    const lcu::tensor_table table = m.table(false);
    const S::hyper h{cz::granularity::row, 6.0f};
    const lcu::compress_plan<S> plan(table, h.per, rows);
    const std::size_t p = plan.payload_bytes();
    constexpr int ranks = 3;
    lcu::device_buffer<std::byte> gathered(ranks * p);
    lcu::device_buffer<float> delta(table.padded_elements());
    lcu::stream s;
    std::vector<float> x = normal_floats(rng, m.total());
    for (std::size_t i = 700; i < 1701; ++i) {
        x[i] = std::abs(x[i]) * 0.001f + (i % 2 == 0 ? 1.0f : 0.0f);
    }
    lcu::from_flat<float>(table, x, delta.get());
    lcu::encode_io io;
    io.delta = delta.get();
    for (int r = 0; r < ranks; ++r) {
        io.payload = gathered.get() + static_cast<std::size_t>(r) * p;
        lcu::encode<S, lcu::encode_from::delta>(plan, table, h, io, {}, s);
    }
    s.synchronize();
    const std::vector<std::byte> good = download_bytes(gathered.get(), ranks * p);
    lcu::payload_check check(ranks);
    CHECK(check.run(plan, table, h, gathered.get(), s) == lcu::no_nonfinite);

    // Layout: segment 0 = 2 records of 20 bytes, then ceil(700 / 4) = 175 code bytes + 1 byte of
    // alignment; segment 2 = 1 record, 251 code bytes (the last holds 1 code and 3 padding
    // codes) + 1 byte of alignment.
    const std::size_t body = cz::wire::header_bytes;
    const std::size_t seg2 = body + S::segment_bytes(h, plan.segments()[0]);
    // The bins no code of tensor 2 uses (its values sit near 0 and near 1: two bins at most).
    std::array<bool, 4> used{};
    for (std::size_t i = 0; i < 1001; ++i) {
        used[cz::wire::unpack<2>(good.data() + seg2 + 20, i)] = true;
    }
    std::vector<std::size_t> unused_bins;
    for (std::size_t b = 0; b < 4; ++b) {
        if (!used[b]) {
            unused_bins.push_back(b);
        }
    }
    REQUIRE(unused_bins.size() >= 2);

    // Rank 1's payload, changed by `edit`; when `resealed`, its checksum is made right again.
    const auto refused = [&](auto&& edit, bool resealed, const std::string& message) {
        expect_refused_by_both(
            good, p, gathered.get(), edit, resealed, message,
            [&](const std::vector<std::byte>& bad) {
                std::vector<float> out(m.total());
                S::decode(h, bad, plan.segments(), out);
            },
            [&] { check.run(plan, table, h, gathered.get(), s); });
    };
    refused([&](auto& b) { b[32] ^= std::byte{0x01}; }, false, "checksum mismatch");
    refused([&](auto& b) { b[body + 100] ^= std::byte{0x10}; }, false, "checksum mismatch");
    refused([&](auto& b) { b[p - 1] ^= std::byte{0x01}; }, false, "checksum mismatch");
    refused([&](auto& b) { b[5] = std::byte{0}; }, false, "the flags is 0, expected 1");
    refused([&](auto& b) { b[4] = std::byte{4}; }, false, "the code width is 4, expected 2");
    refused([&](auto& b) { b[3] = std::byte{1}; }, false, "the compressor id is 1, expected 3");
    refused([&](auto& b) { b[8] ^= std::byte{0x01}; }, false,
            "the block field (block size or setting) is");  // the range
    // A truncated payload as the receiver sees it: the header claims a shorter body.
    refused([&](auto& b) { b[24] = static_cast<std::byte>(static_cast<unsigned>(b[24]) - 4u); },
            false, "the body size is");
    for (const std::size_t unused_bin : unused_bins) {
        CAPTURE(unused_bin);
        refused(
            [&](auto& b) {
                const float v = 0.25f;
                std::memcpy(b.data() + seg2 + 4 * (1 + unused_bin), &v, 4);
            },
            true, "a nonzero table entry for an unused bin");
    }
    refused([&](auto& b) { b[seg2 + 20 + 250] |= std::byte{0x40}; }, true,  // element 1003's bits
            "nonzero padding bits after the last code");
    refused([&](auto& b) { b[seg2 + 20 + 250] |= std::byte{0x04}; }, true,  // element 1001's bits
            "nonzero padding bits after the last code");
    refused([&](auto& b) { b[seg2 + 20 + 251] = std::byte{1}; }, true,
            "nonzero alignment padding");
    refused([&](auto& b) { b[body + 40 + 175] = std::byte{0x80}; }, true,
            "nonzero alignment padding");

    // Hyper-parameters of the other granularity are refused before anything runs.
    CHECK_THROWS_AS(check.run(plan, table, S::hyper{}, gathered.get(), s), loco::invalid_argument);
    io.payload = gathered.get();
    const auto encode_per_tensor = [&] {
        lcu::encode<S, lcu::encode_from::delta>(plan, table, S::hyper{}, io, {}, s);
    };
    CHECK_THROWS_AS(encode_per_tensor(), loco::invalid_argument);
}

}  // namespace cuda_statistical_test
