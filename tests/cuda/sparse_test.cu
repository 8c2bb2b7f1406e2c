// The device encoders and decoders of SparseLoCo and DeMo (backend/cuda/compress/
// sparseloco_kernels.hpp, demo_kernels.hpp) against the host compressors (compress/sparseloco.hpp,
// compress/demo.hpp): fresh random inputs over several rounds, the device payload equal to the
// host's byte for byte, the residual bit for bit (NaN where the host's is NaN), and the device
// decode of a host payload equal to the host decode; the receivers' scatter-means (DeMo's in the
// coefficient domain, SparseLoCo's with median_norm_clip's factors) equal the host's, and the
// device norms behind those factors equal the host's within fp32 rounding; the device payload
// check (backend/cuda/compress/chunked_check.hpp) refuses what the host decoder refuses, in its
// words. Then loco::cuda::diloco with both codecs on its device exchange
// (backend/cuda/compress/chunked_exchange.hpp: the mean, SparseLoCo's clipped scatter-mean,
// DeMo's coefficient scatter-mean, rows of a robust aggregation) against loco::diloco on threads, and a malformed payload refused on
// every rank with nothing changed.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"
#include "model.cuh"
#include "schedule_cases.cuh"

#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/aggregate/scatter_mean.hpp>
#include <loco/aggregate/robust.hpp>
#include <loco/backend/cuda/compress/chunked_check.hpp>
#include <loco/backend/cuda/compress/demo_kernels.hpp>
#include <loco/backend/cuda/compress/sparseloco_kernels.hpp>
#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_sparse_test {

namespace {

using namespace loco_test;
namespace lcu = loco::backend::cuda;
namespace cz = loco::compress;

bool same_float(float a, float b) {
    return std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b));
}

// Elements that differ (every element when the sizes differ, or when there are none).
std::size_t count_differences(const std::vector<float>& got, const std::vector<float>& want) {
    if (got.size() != want.size() || got.empty()) return want.size() + 1;
    std::size_t bad = 0;
    for (std::size_t i = 0; i < got.size(); ++i) bad += same_float(got[i], want[i]) ? 0 : 1;
    return bad;
}

std::size_t first_difference(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
    if (a.size() != b.size() || a.empty()) return 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (a[i] != b[i]) return i;
    }
    return a.size();
}

// Segments with gaps: a 128 x 192 matrix, a flat 5000, a 7 x 3 matrix (7 is prime above most
// targets), an empty one and a single element.
std::vector<cz::segment> big_segments() {
    return {{3, 128 * 192, 128, 192}, {24581, 5000, 1, 5000}, {29583, 21, 7, 3},
            {29604, 0, 1, 0},        {29604, 1, 1, 1}};
}
constexpr std::size_t big_elements = 29607;

// Small chunk targets make many chunks: smaller segments keep the emulator quick.
std::vector<cz::segment> small_segments() {
    return {{1, 48 * 40, 48, 40}, {1923, 300, 1, 300}, {2223, 21, 7, 3}, {2244, 1, 1, 1}};
}
constexpr std::size_t small_elements = 2246;

// Rounds of encode on the host and on the device from the same inputs; returns the number of
// payload bytes compared.
template <class C, class Plan, class Encode, class Decode>
void device_equals_host(const typename C::hyper& h, const std::vector<cz::segment>& segs,
                        std::size_t n, const std::string& label, Encode encode, Decode decode) {
    auto rng = rng_for(label);
    const Plan plan(h, segs, n);
    REQUIRE(plan.payload_bytes() == C::payload_bytes(h, segs));
    std::vector<float> host_e = normal_floats(rng, n, 0.5f);
    lcu::device_buffer<float> e(n), x(n), out(n);
    lcu::device_buffer<std::byte> payload(plan.payload_bytes());
    e.upload(host_e);
    for (int round = 0; round < 3; ++round) {
        CAPTURE(round);
        std::vector<float> xs = normal_floats(rng, n, round == 1 ? 100.0f : 1.0f);
        if (round == 2) {  // non-finite pseudo-gradients reach the payload as canonical NaNs
            xs[10] = std::numeric_limits<float>::quiet_NaN();
            xs[n / 2] = std::numeric_limits<float>::infinity();
        }
        x.upload(xs);
        std::vector<std::byte> want(C::payload_bytes(h, segs));
        C::encode(h, xs, segs, host_e, {}, want);
        encode(plan, x.get(), e.get(), payload.get(), nullptr);
        check_cuda(cudaDeviceSynchronize(), "encode");
        const std::vector<std::byte> got = payload.download();
        REQUIRE(got.size() == want.size());
        CHECK_MESSAGE(first_difference(got, want) == got.size(),
                      "first differing payload byte " << first_difference(got, want) << " of "
                                                      << got.size());
        CHECK(count_differences(e.download(), host_e) == 0);

        // The device decode of the host's payload is the host's decode; nothing else is written.
        std::vector<float> host_out(n, 0.0f);
        C::decode(h, want, segs, host_out);
        std::vector<float> sentinel(n, 12345.0f);
        for (const cz::segment& s : segs) {
            std::fill_n(sentinel.begin() + static_cast<std::ptrdiff_t>(s.offset), s.size, 0.0f);
        }
        for (std::size_t i = 0; i < n; ++i) {
            if (sentinel[i] != 0.0f) host_out[i] = sentinel[i];
        }
        out.upload(sentinel);
        lcu::device_buffer<std::byte> received(want.size());
        received.upload(want);
        decode(plan, received.get(), out.get(), nullptr);
        check_cuda(cudaDeviceSynchronize(), "decode");
        CHECK(count_differences(out.download(), host_out) == 0);
    }
}

void sparseloco_case(const cz::sparseloco::hyper& h, const std::vector<cz::segment>& segs,
                     std::size_t n, const std::string& label) {
    device_equals_host<cz::sparseloco, lcu::sparseloco_plan>(
        h, segs, n, label,
        [](const lcu::sparseloco_plan& p, const float* x, float* e, std::byte* out,
           cudaStream_t s) { lcu::sparseloco_encode(p, x, e, out, s); },
        [](const lcu::sparseloco_plan& p, const std::byte* in, float* out, cudaStream_t s) {
            lcu::sparseloco_decode(p, in, out, s);
        });
}

void demo_case(const cz::demo::hyper& h, const std::vector<cz::segment>& segs, std::size_t n,
               const std::string& label) {
    device_equals_host<cz::demo, lcu::demo_plan>(
        h, segs, n, label,
        [](const lcu::demo_plan& p, const float* x, float* e, std::byte* out, cudaStream_t s) {
            lcu::demo_encode(p, x, e, out, s);
        },
        [](const lcu::demo_plan& p, const std::byte* in, float* out, cudaStream_t s) {
            lcu::demo_decode(p, in, out, s);
        });
}

}  // namespace

static_assert(lcu::device_chunked<cz::sparseloco>::available);
static_assert(lcu::device_chunked<cz::demo>::available);
static_assert(!lcu::device_chunked<cz::topk>::available);

TEST_CASE("sparseloco on the device: payloads byte for byte and accumulators bit for bit the "
          "host's, decode the host's") {
    SUBCASE("templar's defaults: 64 x 64 chunks, top 64, 2-bit codes") {
        sparseloco_case({}, big_segments(), big_elements, "sparse sparseloco defaults");
    }
    SUBCASE("8 x 8 chunks, top 5 (4 sent), 3 bins") {
        sparseloco_case({.chunk = 8, .topk = 5, .bins = 3, .range = 2.5f, .beta = 0.5f},
                        small_segments(), small_elements, "sparse sparseloco 8");
    }
    SUBCASE("16 x 16 chunks, top 7 (6 sent), 256 bins") {
        sparseloco_case({.chunk = 16, .topk = 7, .bins = 256, .range = 4.0f, .beta = 0.0f},
                        small_segments(), small_elements, "sparse sparseloco 256");
    }
    SUBCASE("templar's defaults with fixed-width (12-bit) indices") {
        sparseloco_case({.indices = cz::index_coding::fixed}, big_segments(), big_elements,
                        "sparse sparseloco fixed");
    }
    SUBCASE("top 2 of 64 x 64: the compact coding keeps fixed width (24 bits, not 25)") {
        const cz::sparseloco::hyper h{.topk = 2};
        REQUIRE(cz::sparseloco::layout_of(h, big_segments()[0]).indices.how ==
                cz::index_code::chunk_indices::fixed_width);
        sparseloco_case(h, big_segments(), big_elements, "sparse sparseloco top 2");
    }
    SUBCASE("2 x 2 chunks, every cell kept: no indices travel") {
        const cz::sparseloco::hyper h{.chunk = 2, .topk = 4};
        REQUIRE(cz::sparseloco::layout_of(h, small_segments()[0]).index_bytes == 0);
        sparseloco_case(h, small_segments(), small_elements, "sparse sparseloco implied");
    }
}

TEST_CASE("demo on the device: payloads byte for byte and residuals bit for bit the host's, "
          "decode the host's") {
    // Compact indices (the default: Elias-Fano for top-32 of 64 x 64 and top-3 of the 20- and
    // 5-cell chunks) and fixed width, on both layouts.
    for (const bool sign : {false, true}) {
        CAPTURE(sign);
        for (const cz::index_coding coding : {cz::index_coding::compact, cz::index_coding::fixed}) {
            CAPTURE(cz::to_string(coding));
            demo_case({.chunk = 64, .topk = 32, .decay = 0.999f, .sign = sign, .indices = coding},
                      big_segments(), big_elements, "sparse demo defaults");
            demo_case({.chunk = 5, .topk = 3, .decay = 0.9f, .sign = sign, .indices = coding},
                      small_segments(), small_elements, "sparse demo 5");
        }
    }
}

// The sign variant sends signbit(C) of the canonical value (compress/demo.hpp): a coefficient
// that rounds to -0 sends 1, and a NaN sends 0 whatever sign its arithmetic gave it. Three 1-D
// chunks of 4 (every cell sent, so the compact coding puts the 12 sign bits right after the
// header): x = [-2^-149, 0, 0, 0] makes C = [-0, -2^-149, -2^-149, -0] (C_k = x0 F[0][k]), all
// sign bits 1; a chunk holding a NaN with its sign bit set makes every coefficient NaN (its sign
// kept where the arithmetic propagates NaN payloads, as x86 does), all 0; +2^-149 all 0.
TEST_CASE("demo signs on the device: a coefficient rounding to -0 sends 1, a NaN of either sign "
          "sends 0, as on the host") {
    const cz::demo::hyper h{.chunk = 4, .topk = 4, .decay = 0.5f, .sign = true};
    const std::vector<cz::segment> segs = {{0, 12, 1, 12}};
    const std::size_t n = 12;
    const lcu::demo_plan plan(h, segs, n);
    REQUIRE(plan.payload_bytes() == cz::wire::header_bytes + 4);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const std::vector<float> x = {-0x1p-149f, 0.0f, 0.0f, 0.0f, -nan, 1.0f,
                                  2.0f,       3.0f, 0x1p-149f, 0.0f, 0.0f, 0.0f};
    REQUIRE(std::signbit(x[4]));
    std::vector<float> host_e(n, 0.0f);
    std::vector<std::byte> want(plan.payload_bytes());
    cz::demo::encode(h, x, segs, host_e, {}, want);
    lcu::device_buffer<float> dx(n), e(n);
    dx.upload(x);
    e.upload(std::vector<float>(n, 0.0f));
    lcu::device_buffer<std::byte> payload(plan.payload_bytes());
    lcu::demo_encode(plan, dx.get(), e.get(), payload.get(), nullptr);
    check_cuda(cudaDeviceSynchronize(), "encode");
    const std::vector<std::byte> got = payload.download();
    for (std::size_t j = 0; j < n; ++j) {
        CAPTURE(j);
        const unsigned bit = j < 4 ? 1u : 0u;
        CHECK(cz::wire::get_bits(want.data() + cz::wire::header_bytes, j, 1) == bit);
        CHECK(cz::wire::get_bits(got.data() + cz::wire::header_bytes, j, 1) == bit);
    }
    CHECK(first_difference(got, want) == got.size());
    CHECK(count_differences(e.download(), host_e) == 0);
}

TEST_CASE("demo's coefficient-domain scatter-mean on the device equals the host's") {
    for (const bool sign : {false, true}) {
        for (int variant = 0; variant < 4; ++variant) {
            // Both codings on both layouts (the host's scatter-mean reads them through the same
            // walk; the device reads a cell per thread).
            const bool big = variant < 2;
            const cz::index_coding coding =
                variant % 2 == 0 ? cz::index_coding::compact : cz::index_coding::fixed;
            const cz::demo::hyper h{.chunk = big ? 64u : 5u, .topk = big ? 32u : 3u,
                                    .decay = 0.999f, .sign = sign, .indices = coding};
            const std::vector<cz::segment> segs = big ? big_segments() : small_segments();
            const std::size_t n = big ? big_elements : small_elements;
            CAPTURE(sign);
            CAPTURE(big);
            CAPTURE(cz::to_string(coding));
            auto rng = rng_for("sparse demo scatter mean");
            const lcu::demo_plan plan(h, segs, n);
            const std::size_t p = plan.payload_bytes();
            const std::uint32_t m = 3;
            std::vector<std::byte> gathered;
            std::vector<std::vector<std::byte>> payloads;
            for (std::uint32_t k = 0; k < m; ++k) {
                std::vector<float> e = normal_floats(rng, n, 0.5f);
                payloads.emplace_back(p);
                cz::demo::encode(h, normal_floats(rng, n), segs, e, {}, payloads.back());
                gathered.insert(gathered.end(), payloads.back().begin(), payloads.back().end());
            }
            std::vector<std::span<const std::byte>> views(payloads.begin(), payloads.end());
            std::vector<float> want(n, 5.0f);
            cz::demo::decode_scatter_mean(h, views, segs, want);
            lcu::device_buffer<std::byte> g(gathered.size());
            g.upload(gathered);
            lcu::device_buffer<float> out(n);
            out.upload(std::vector<float>(n, 5.0f));
            lcu::demo_decode_scatter_mean(plan, g.get(), m, out.get(), nullptr);
            check_cuda(cudaDeviceSynchronize(), "scatter mean");
            CHECK(count_differences(out.download(), want) == 0);
        }
    }
}

TEST_CASE("sparseloco's scatter-mean on the device equals median_norm_clip's combine, with and "
          "without the clip") {
    namespace ag = loco::aggregate;
    for (const bool big : {true, false}) {
        CAPTURE(big);
        // median_norm_clip takes segments that tile the fragment.
        const std::vector<cz::segment> segs =
            big ? std::vector<cz::segment>{{0, 128 * 192, 128, 192}, {24576, 5000, 1, 5000},
                                           {29576, 21, 7, 3}, {29597, 1, 1, 1}}
                : std::vector<cz::segment>{{0, 48 * 40, 48, 40}, {1920, 300, 1, 300},
                                           {2220, 21, 7, 3}};
        const std::size_t n = segs.back().offset + segs.back().size;
        const cz::sparseloco::hyper h =
            big ? cz::sparseloco::hyper{} : cz::sparseloco::hyper{.chunk = 8, .topk = 5};
        auto rng = rng_for("sparse sparseloco scatter mean");
        const lcu::sparseloco_plan plan(h, segs, n);
        const std::size_t p = plan.payload_bytes();
        const std::size_t m = 3;
        std::vector<std::byte> gathered;
        std::vector<float> deltas(m * n);
        std::vector<std::uint8_t> sent(m * n);
        for (std::size_t k = 0; k < m; ++k) {
            std::vector<float> e = normal_floats(rng, n, 0.5f);
            std::vector<std::byte> payload(p);
            // Workers of different scales, so that the clip scales some of them.
            cz::sparseloco::encode(h, normal_floats(rng, n, 1.0f + static_cast<float>(k)), segs,
                                   e, {}, payload);
            cz::sparseloco::decode(h, payload, segs, std::span(deltas).subspan(k * n, n));
            cz::sparseloco::decode_support(h, payload, segs, std::span(sent).subspan(k * n, n));
            gathered.insert(gathered.end(), payload.begin(), payload.end());
        }
        ag::contributions c;
        c.workers = m;
        c.elements = n;
        c.deltas = deltas;
        c.segments = segs;
        c.sent = sent;
        lcu::device_buffer<std::byte> g(gathered.size());
        g.upload(gathered);
        lcu::device_buffer<float> out(n);
        for (const bool clip : {false, true}) {
            CAPTURE(clip);
            const ag::median_norm_clip::hyper ah{.epsilon = 1e-8f, .clip = clip};
            std::vector<float> want(n);
            ag::median_norm_clip::combine(ah, c, want);
            std::vector<float> factors(m * segs.size());
            for (std::size_t si = 0; si < segs.size(); ++si) {
                std::vector<float> f;
                ag::median_norm_clip::factors(ah, c, segs[si].offset,
                                              segs[si].offset + segs[si].size, f);
                for (std::size_t k = 0; k < m; ++k) factors[k * segs.size() + si] = f[k];
            }
            if (clip) {  // the clip does scale someone, or the case tests nothing more
                CHECK(std::any_of(factors.begin(), factors.end(), [](float f) { return f < 1; }));
            }
            lcu::device_buffer<float> f(factors.size());
            f.upload(factors);
            out.upload(std::vector<float>(n, 9.0f));
            lcu::sparseloco_decode_scatter_mean(plan, g.get(), static_cast<std::uint32_t>(m),
                                                clip ? f.get() : nullptr, out.get(), nullptr);
            check_cuda(cudaDeviceSynchronize(), "scatter mean");
            CHECK(count_differences(out.download(), want) == 0);
        }
    }
}

TEST_CASE("sparseloco on the device: more ties in a chunk than wanted, a larger cell after them, "
          "equals the host") {
    // Each chunk's top-k takes its last cell (the largest) and 4 of 63 equal ones: the larger
    // cell's slot counts only the ties taken.
    const cz::sparseloco::hyper h{.chunk = 8, .topk = 5, .bins = 3, .range = 2.5f, .beta = 0.5f};
    const std::vector<cz::segment> segs{{0, 64 * 64, 64, 64}};
    const std::size_t n = 64 * 64;
    const lcu::sparseloco_plan plan(h, segs, n);
    std::vector<float> xs(n, 1.0f);
    for (std::size_t r = 7; r < 64; r += 8) {
        for (std::size_t c = 7; c < 64; c += 8) xs[r * 64 + c] = 2.0f;
    }
    std::vector<float> host_e(n, 0.0f);
    lcu::device_buffer<float> e(n), x(n);
    lcu::device_buffer<std::byte> payload(plan.payload_bytes());
    e.upload(host_e);
    x.upload(xs);
    std::vector<std::byte> want(cz::sparseloco::payload_bytes(h, segs));
    cz::sparseloco::encode(h, xs, segs, host_e, {}, want);
    lcu::sparseloco_encode(plan, x.get(), e.get(), payload.get(), nullptr);
    check_cuda(cudaDeviceSynchronize(), "encode");
    CHECK(payload.download() == want);
    CHECK(e.download() == host_e);
}

TEST_CASE("chunked device plans refuse what they cannot do, with one sentence") {
    const std::vector<cz::segment> segs = {{0, 128 * 128, 128, 128}};
    CHECK_THROWS_WITH_AS(lcu::sparseloco_plan({.chunk = 128}, segs, 128 * 128),
                         doctest::Contains("chunk <= 64"), loco::invalid_argument);
    CHECK_THROWS_AS(lcu::demo_plan({.chunk = 64, .topk = 0}, segs, 128 * 128),
                    loco::invalid_argument);
    CHECK_THROWS_AS(lcu::demo_plan({}, segs, 100), loco::shape_error);  // outside the array
    // Chunk numbers are 32-bit on the device: more than 2^31 - 1 chunks are refused before
    // anything is built, in one segment (65537 is prime, so every cell is a chunk: 2^32 + 2^17 + 1
    // of them, which wrapped to 131073 and was accepted) or in two that only together pass it.
    const std::size_t p = 65537, q = 32771;  // primes
    const std::vector<cz::segment> huge = {{0, p * p, p, p}};
    CHECK_THROWS_WITH_AS(lcu::sparseloco_plan({}, huge, p * p),
                         doctest::Contains("makes it 4295098369"), loco::invalid_argument);
    CHECK_THROWS_WITH_AS(lcu::demo_plan({}, huge, p * p), doctest::Contains("makes it 4295098369"),
                         loco::invalid_argument);
    const std::vector<cz::segment> pair = {{0, q * q, q, q}, {q * q, q * q, q, q}};
    CHECK_THROWS_WITH_AS(lcu::sparseloco_plan({}, pair, 2 * q * q),
                         doctest::Contains("segment 1 (32771 x 32771) makes it 2147876882"),
                         loco::invalid_argument);
    const lcu::demo_plan plan({}, segs, 128 * 128);
    CHECK_THROWS_AS(lcu::demo_encode(plan, nullptr, nullptr, nullptr, nullptr),
                    loco::invalid_argument);
    // 64 is the largest side the shared-memory kernels hold: 65 is refused, by demo too.
    CHECK_THROWS_WITH_AS(lcu::demo_plan({.chunk = 65}, segs, 128 * 128),
                         doctest::Contains("chunk <= 64"), loco::invalid_argument);
    // The scatter-mean counts each cell's senders in 16 bits: 1 to 65535 payloads.
    lcu::device_buffer<std::byte> gathered(plan.payload_bytes());
    lcu::device_buffer<float> out(128 * 128);
    for (const std::uint32_t m : {0u, 65536u}) {
        CAPTURE(m);
        CHECK_THROWS_WITH_AS(
            lcu::demo_decode_scatter_mean(plan, gathered.get(), m, out.get(), nullptr),
            doctest::Contains(("takes 1 to 65535 payloads, got " + std::to_string(m)).c_str()),
            loco::invalid_argument);
    }
}

TEST_CASE("chunked encodes into a second accumulator: the in-place encode's bits, the first kept") {
    const auto segs = small_segments();
    const std::size_t n = small_elements;
    auto rng = rng_for("sparse encode into next");
    const std::vector<float> e0 = normal_floats(rng, n, 0.5f);
    const std::vector<float> x = normal_floats(rng, n);
    const auto run = [&](auto& plan, auto encode_in_place, auto encode_into) {
        lcu::device_buffer<float> dx(n), in_place(n), first(n), next(n);
        lcu::device_buffer<std::byte> p1(plan.payload_bytes()), p2(plan.payload_bytes());
        dx.upload(x);
        in_place.upload(e0);
        first.upload(e0);
        next.upload(std::vector<float>(n, 7.0f));  // outside the segments: left alone
        encode_in_place(plan, dx.get(), in_place.get(), p1.get());
        encode_into(plan, dx.get(), first.get(), next.get(), p2.get());
        check_cuda(cudaDeviceSynchronize(), "encode");
        CHECK(p1.download() == p2.download());
        CHECK(count_differences(first.download(), e0) == 0);
        std::vector<float> want = in_place.download();
        for (std::size_t i = 0; i < n; ++i) {
            bool inside = false;
            for (const cz::segment& s : segs) inside = inside || (i >= s.offset && i < s.offset + s.size);
            if (!inside) want[i] = 7.0f;
        }
        CHECK(count_differences(next.download(), want) == 0);
    };
    const lcu::sparseloco_plan sp({.chunk = 8, .topk = 5, .bins = 3}, segs, n);
    run(sp,
        [](const lcu::sparseloco_plan& p, const float* x, float* e, std::byte* out) {
            lcu::sparseloco_encode(p, x, e, out, nullptr);
        },
        [](const lcu::sparseloco_plan& p, const float* x, const float* e, float* next,
           std::byte* out) { lcu::sparseloco_encode(p, x, e, next, out, nullptr); });
    const lcu::demo_plan dp({.chunk = 8, .topk = 5}, segs, n);
    run(dp,
        [](const lcu::demo_plan& p, const float* x, float* e, std::byte* out) {
            lcu::demo_encode(p, x, e, out, nullptr);
        },
        [](const lcu::demo_plan& p, const float* x, const float* e, float* next, std::byte* out) {
            lcu::demo_encode(p, x, e, next, out, nullptr);
        });
}

// compress_hyper() may change mid-run: the device exchange re-plans before its next encode, and
// then sends the host's payload for the new settings. A change of the index coding alone was not
// seen as a change (the old coding, size and check stayed).
template <class C>
void replanned_payload_is_the_hosts(typename C::hyper h0, const char* label) {
    constexpr std::size_t rows = 64, cols = 96;
    lcu::device_buffer<float> values(rows * cols);
    const lcu::tensor_table table(std::vector<lcu::tensor_spec>{
        {"w", values.get(), lcu::dtype::f32, nullptr, lcu::dtype::f32, rows * cols}});
    const std::vector<cz::segment> flat = {{0, rows * cols, rows, cols}};
    const auto segs = lcu::detail::padded_segments(table, flat);
    const std::size_t n = table.padded_elements();
    typename C::hyper h1 = h0;
    h1.indices = h0.indices == cz::index_coding::compact ? cz::index_coding::fixed
                                                         : cz::index_coding::compact;
    REQUIRE(C::payload_bytes(h1, segs) != C::payload_bytes(h0, segs));
    for (const auto& [from, to] : {std::pair{h0, h1}, std::pair{h1, h0}}) {
        CAPTURE(std::string(C::describe(to)));
        lcu::chunked_exchange<C> dx(table, flat, 2, from);
        dx.replan(table, to);  // as cuda::diloco does before every encode
        CHECK(dx.plan.payload_bytes() == C::payload_bytes(to, segs));
        auto rng = rng_for(std::string(label) + " replan");
        const std::vector<float> x = normal_floats(rng, n);
        lcu::device_buffer<float> delta(n);
        delta.upload(x);
        dx.encode(delta.get(), nullptr);
        check_cuda(cudaDeviceSynchronize(), "encode");
        std::vector<float> e(n, 0.0f);  // the exchange's accumulator starts at zero
        std::vector<std::byte> want(C::payload_bytes(to, segs));
        C::encode(to, x, segs, e, {}, want);
        CHECK(dx.send.download() == want);
    }
}

TEST_CASE("a chunked device exchange re-planned for new settings sends the host's payload") {
    replanned_payload_is_the_hosts<cz::sparseloco>({}, "sparseloco");
    replanned_payload_is_the_hosts<cz::demo>({}, "demo");
}

TEST_CASE("sparseloco's norms on the device equal median_norm_clip's host norms within fp32 "
          "rounding") {
    const std::vector<cz::segment> segs = {{0, 128 * 192, 128, 192}, {24576, 5000, 1, 5000},
                                           {29576, 0, 1, 0}, {29576, 21, 7, 3}};
    const std::size_t n = 29597;
    const cz::sparseloco::hyper h{};
    auto rng = rng_for("sparse sparseloco norms");
    const lcu::sparseloco_plan plan(h, segs, n);
    const std::size_t p = plan.payload_bytes();
    const std::uint32_t m = 3;
    std::vector<std::byte> gathered;
    std::vector<double> want;  // per payload and segment, in double, in element order
    for (std::uint32_t k = 0; k < m; ++k) {
        std::vector<float> e(n, 0.0f), d(n);
        std::vector<std::byte> payload(p);
        cz::sparseloco::encode(h, normal_floats(rng, n, 1.0f + static_cast<float>(k)), segs, e, {},
                               payload);
        cz::sparseloco::decode(h, payload, segs, d);
        for (const cz::segment& s : segs) {
            double sq = 0.0;
            for (std::size_t i = s.offset; i < s.offset + s.size; ++i) sq += double(d[i]) * d[i];
            want.push_back(std::sqrt(sq));
        }
        gathered.insert(gathered.end(), payload.begin(), payload.end());
    }
    lcu::device_buffer<std::byte> g(gathered.size());
    g.upload(gathered);
    lcu::device_buffer<double> partial(plan.layout().chunks() * m);
    lcu::device_buffer<float> norms(m * segs.size());
    norms.upload(std::vector<float>(m * segs.size(), -1.0f));
    lcu::sparseloco_norms(plan, g.get(), m, partial.get(), norms.get(), nullptr);
    check_cuda(cudaDeviceSynchronize(), "norms");
    const std::vector<float> got = norms.download();
    for (std::size_t i = 0; i < got.size(); ++i) {
        CAPTURE(i);
        CHECK(std::abs(double(got[i]) - want[i]) <= 1e-6 * want[i]);  // 0 for the empty segment
    }
    CHECK(got[2] == 0.0f);
    CHECK(want[0] > 0.0);
}

namespace {

// Rank 1's payload of three, edited by `edit` and resealed: the device check throws the host
// decoder's message with "from rank 1", or nothing when the host accepts the edit too. Returns
// whether the host refused it.
template <class C, class Plan, class Edit>
bool check_agrees_with_host(const typename C::hyper& h, const std::string& label, Edit edit) {
    const auto segs = small_segments();
    const std::size_t n = small_elements;
    auto rng = rng_for("sparse check " + label);
    const Plan plan(h, segs, n);
    const std::size_t p = plan.payload_bytes();
    std::vector<std::byte> gathered;
    std::vector<std::byte> bad;
    for (int k = 0; k < 3; ++k) {
        std::vector<float> e(n, 0.0f);
        std::vector<std::byte> payload(p);
        C::encode(h, normal_floats(rng, n), segs, e, {}, payload);
        if (k == 1) {
            edit(payload);
            reseal(payload);
            bad = payload;
        }
        gathered.insert(gathered.end(), payload.begin(), payload.end());
    }
    std::string want;
    try {
        std::vector<float> out(n);
        C::decode(h, bad, segs, out);
    } catch (const loco::wire_error& e) {
        want = e.what();
        const std::string plain = "malformed payload: ";
        want.replace(want.find(plain), plain.size(), "malformed payload from rank 1: ");
    }
    CAPTURE(label);
    CAPTURE(want);
    lcu::device_buffer<std::byte> g(gathered.size());
    g.upload(gathered);
    lcu::chunked_payload_check<C> check(plan.layout(), 3);
    std::string got;
    try {
        check.run(plan.layout(), g.get(), nullptr);
    } catch (const loco::wire_error& e) {
        got = e.what();
    }
    CHECK(got == want);
    return !want.empty();
}

template <class C, class Plan, class Edit>
void check_refuses_like_host(const typename C::hyper& h, const std::string& label, Edit edit) {
    const bool refused = check_agrees_with_host<C, Plan>(h, label, edit);
    CHECK_MESSAGE(refused, label << ": the host decoder accepts this edit; the case tests nothing");
}

// Sets code j of a bit stream (wire::put_bits only ORs into a zeroed stream).
void set_bits(std::byte* stream, std::size_t j, unsigned width, std::uint32_t code) {
    for (unsigned b = 0; b < width; ++b) {
        const std::size_t bit = j * width + b;
        const auto mask = static_cast<std::byte>(1u << (bit % 8));
        stream[bit / 8] = ((code >> b) & 1u) != 0 ? (stream[bit / 8] | mask)
                                                  : (stream[bit / 8] & ~mask);
    }
}

// The byte offset of segment `which`'s layout within a payload, and that layout.
template <class C>
std::pair<std::size_t, typename C::segment_layout> segment_at(const typename C::hyper& h,
                                                              std::size_t which) {
    const auto segs = small_segments();
    std::size_t at = cz::wire::header_bytes;
    for (std::size_t s = 0; s < which; ++s) at += C::layout_of(h, segs[s]).bytes();
    return {at, C::layout_of(h, segs[which])};
}

}  // namespace

TEST_CASE("the device check of chunked payloads refuses what the host decoder refuses, in its "
          "words") {
    namespace wire = cz::wire;
    using sl = cz::sparseloco;
    // Fixed-width indices (the edits below write them), and the compact coding's Elias-Fano.
    const sl::hyper sh{.chunk = 8, .topk = 5, .bins = 3, .indices = cz::index_coding::fixed};
    const sl::hyper compact{.chunk = 8, .topk = 5, .bins = 3};
    // An index repeated (chunk 0 of the 48 x 40 matrix: slot 1 = slot 0).
    check_refuses_like_host<sl, lcu::sparseloco_plan>(sh, "sparseloco order", [&](auto& p) {
        const auto [at, l] = segment_at<sl>(sh, 0);
        std::byte* s = p.data() + at + l.record_bytes;
        set_bits(s, 1, l.indices.low, wire::get_bits(s, 0, l.indices.low));
    });
    // Elias-Fano, chunk 0 of the 48 x 40 matrix (4 of 64 cells: 4 low bits an index, then a
    // high part of 4 + 3 bits): every high bit set, 7 ones for 4 indices.
    check_refuses_like_host<sl, lcu::sparseloco_plan>(compact, "sparseloco ones", [&](auto& p) {
        const auto [at, l] = segment_at<sl>(compact, 0);
        REQUIRE(l.indices.how == cz::index_code::chunk_indices::elias_fano);
        REQUIRE(l.indices.low == 4);
        REQUIRE(l.indices.bits() == 23);
        for (std::size_t b = 16; b < 23; ++b) set_bits(p.data() + at + l.record_bytes, b, 1, 1);
    });
    // Elias-Fano: the first index's low part set to the second's (the two share a high part when
    // equal; else the chunk is still checked alike on both sides).
    check_agrees_with_host<sl, lcu::sparseloco_plan>(compact, "sparseloco low", [&](auto& p) {
        const auto [at, l] = segment_at<sl>(compact, 0);
        std::byte* s = p.data() + at + l.record_bytes;
        set_bits(s, 0, 4, wire::get_bits(s, 1, 4));
    });
    // An index past the 21 cells of the 7 x 3 matrix (5 bits hold up to 31).
    check_refuses_like_host<sl, lcu::sparseloco_plan>(sh, "sparseloco range", [&](auto& p) {
        const auto [at, l] = segment_at<sl>(sh, 2);
        REQUIRE(l.grid.cells() == 21);
        set_bits(p.data() + at + l.record_bytes, l.k - 1, l.indices.low, 31);
    });
    // A code of bin 3 with 3 bins.
    check_refuses_like_host<sl, lcu::sparseloco_plan>(sh, "sparseloco code", [&](auto& p) {
        const auto [at, l] = segment_at<sl>(sh, 1);
        set_bits(p.data() + at + l.record_bytes + l.index_bytes, 4, 2, 3);
    });
    // Every code of the flat 300 set to bin 0: the other bins' table entries are now unused.
    check_refuses_like_host<sl, lcu::sparseloco_plan>(sh, "sparseloco table", [&](auto& p) {
        const auto [at, l] = segment_at<sl>(sh, 1);
        for (std::size_t j = 0; j < l.sent; ++j) {
            set_bits(p.data() + at + l.record_bytes + l.index_bytes, j, 2, 0);
        }
    });
    // A bit set in the padding after the 7 x 3 matrix's index and code streams (4 values: 20
    // index bits and 8 code bits, each stream padded to 4 bytes).
    check_refuses_like_host<sl, lcu::sparseloco_plan>(sh, "sparseloco index padding", [&](auto& p) {
        const auto [at, l] = segment_at<sl>(sh, 2);
        p[at + l.record_bytes + l.index_bytes - 1] |= std::byte{0x80};
    });
    check_refuses_like_host<sl, lcu::sparseloco_plan>(sh, "sparseloco code padding", [&](auto& p) {
        const auto [at, l] = segment_at<sl>(sh, 2);
        p[at + l.bytes() - 1] |= std::byte{0x80};
    });
    // The header's chunk | topk << 16 (bytes 8 to 11) of other settings.
    check_refuses_like_host<sl, lcu::sparseloco_plan>(sh, "sparseloco header", [&](auto& p) {
        p[8] ^= std::byte{0x01};
    });
    using dm = cz::demo;
    // Fixed width for the edits below; the flips also try the compact coding (Elias-Fano: 5 of
    // 64 cells, 3 low bits an index and a 12-bit high part).
    const dm::hyper dh{.chunk = 8, .topk = 5, .sign = true, .indices = cz::index_coding::fixed};
    const dm::hyper dh_compact{.chunk = 8, .topk = 5, .sign = true};
    check_refuses_like_host<dm, lcu::demo_plan>(dh_compact, "demo ones", [&](auto& p) {
        const auto [at, l] = segment_at<dm>(dh_compact, 0);
        REQUIRE(l.indices.how == cz::index_code::chunk_indices::elias_fano);
        REQUIRE(l.indices.bits() == 27);
        set_bits(p.data() + at, 15, 1, 1 - wire::get_bits(p.data() + at, 15, 1));
    });
    check_refuses_like_host<dm, lcu::demo_plan>(dh, "demo order", [&](auto& p) {
        const auto [at, l] = segment_at<dm>(dh, 0);
        set_bits(p.data() + at, 3, l.indices.low, wire::get_bits(p.data() + at, 2, l.indices.low));
    });
    check_refuses_like_host<dm, lcu::demo_plan>(dh, "demo sign padding", [&](auto& p) {
        const auto [at, l] = segment_at<dm>(dh, 2);
        p[at + l.bytes() - 1] |= std::byte{0x80};
    });
    // Random resealed bit flips in the body: the device refuses exactly what the host refuses.
    auto flips = rng_for("sparse check flips");
    std::size_t refused = 0;
    for (int trial = 0; trial < 90; ++trial) {
        const bool sparse = trial % 3 != 2;
        const sl::hyper& shk = trial % 3 == 0 ? sh : compact;
        const dm::hyper& dhk = trial % 6 == 2 ? dh : dh_compact;
        const std::size_t bytes = sparse ? sl::payload_bytes(shk, small_segments())
                                         : dm::payload_bytes(dhk, small_segments());
        std::uniform_int_distribution<std::size_t> pick(cz::wire::header_bytes, bytes - 1);
        const std::size_t at = pick(flips);
        const auto bit = static_cast<unsigned>(flips() % 8);
        const auto flip = [&](auto& p) { p[at] ^= static_cast<std::byte>(1u << bit); };
        CAPTURE(trial);
        CAPTURE(at);
        if (sparse) {
            refused += check_agrees_with_host<sl, lcu::sparseloco_plan>(shk, "flip", flip);
        } else {
            refused += check_agrees_with_host<dm, lcu::demo_plan>(dhk, "flip", flip);
        }
    }
    CHECK(refused > 0);  // the flips reach the checked fields
    // Intact payloads pass.
    const auto segs = small_segments();
    const lcu::demo_plan plan(dh, segs, small_elements);
    std::vector<std::byte> gathered;
    auto rng = rng_for("sparse check intact");
    for (int k = 0; k < 2; ++k) {
        std::vector<float> e(small_elements, 0.0f);
        std::vector<std::byte> payload(plan.payload_bytes());
        dm::encode(dh, normal_floats(rng, small_elements), segs, e, {}, payload);
        gathered.insert(gathered.end(), payload.begin(), payload.end());
    }
    lcu::device_buffer<std::byte> g(gathered.size());
    g.upload(gathered);
    lcu::chunked_payload_check<dm> check(plan.layout(), 2);
    CHECK_NOTHROW(check.run(plan.layout(), g.get(), nullptr));
}

// ---- loco::cuda::diloco with SparseLoCo and DeMo -------------------------------------------------

namespace {

namespace hd = loco_test::handles;

struct run_result {
    std::vector<float> values;
    std::vector<float> state;
    std::vector<std::vector<std::byte>> payloads;
    bool device_exchange = false;
};

// H = 3, 7 steps then a closing sync; inner SGD with lr 2^-6. Or Streaming DiLoCo: fragments
// {a, c} and {b}, each exchange in flight over one inner step, merge 0.5.
template <class Schedule>
struct schedule_of;
template <>
struct schedule_of<loco::schedule::every> : loco_test::whole_model_every<loco::schedule::every, 3> {
    static constexpr std::size_t gathers = 3;
};
template <>
struct schedule_of<loco::schedule::streaming> : loco_test::two_fragment_streaming {
    static constexpr std::size_t gathers = 6;  // 7 steps and the closing sync()
};

template <class Handle, class Schedule, class C, class Outer>
typename Handle::config config_of(const typename C::hyper& ch, const typename Outer::hyper& oh) {
    typename Handle::config c;
    c.inner = {.lr = 1.0f / 64};
    c.outer = oh;
    c.schedule = schedule_of<Schedule>::hyper();
    c.fragments = schedule_of<Schedule>::layout();
    c.compress = ch;
    return c;
}

template <class C, class Outer, class A, class Schedule = loco::schedule::every>
run_result gpu_rank(const std::string& label, loco::comm::communicator& inner_comm,
                    cudaStream_t stream, const typename C::hyper& ch,
                    const typename Outer::hyper& oh) {
    using inner = loco::inner::sgd;
    using handle = loco::cuda::diloco<inner, Outer, C, Schedule, A>;
    hd::recording comm(inner_comm);
    hd::gpu_params m(hd::init_of(label, comm.rank()));
    auto cfg = config_of<handle, Schedule, C, Outer>(ch, oh);
    cfg.stream = stream;
    handle opt(m.list, comm, cfg);
    for (int t = 1; t <= 7; ++t) {
        m.set_gradients(hd::grads_of(label, comm.rank(), t), stream);
        opt.step();
    }
    opt.sync();
    run_result r;
    r.values = m.host_values(stream);
    for (std::size_t f = 0; f < opt.fragments(); ++f) {
        const auto s = opt.compressor_state(f);
        r.state.insert(r.state.end(), s.begin(), s.end());
    }
    r.payloads = comm.gathered;
    r.device_exchange = opt.device_exchange();
    return r;
}

template <class C, class Outer, class A, class Schedule = loco::schedule::every>
std::vector<run_result> host_run(const std::string& label, int m, const typename C::hyper& ch,
                                 const typename Outer::hyper& oh) {
    using inner = loco::inner::sgd;
    using handle = loco::diloco<inner, Outer, C, Schedule, A>;
    std::vector<run_result> out(static_cast<std::size_t>(m));
    loco::comm::run_threads(m, [&](loco::comm::threads& threads) {
        hd::recording comm(threads);
        hd::host_params p(hd::init_of(label, comm.rank()));
        handle opt(p.list, comm, config_of<handle, Schedule, C, Outer>(ch, oh));
        for (int t = 1; t <= 7; ++t) {
            p.set_gradients(hd::grads_of(label, comm.rank(), t));
            opt.step();
        }
        opt.sync();
        auto& r = out[static_cast<std::size_t>(comm.rank())];
        r.values = p.values();
        for (std::size_t f = 0; f < opt.fragments(); ++f) {
            const auto s = opt.compressor_state(f);
            r.state.insert(r.state.end(), s.begin(), s.end());
        }
        r.payloads = comm.gathered;
    });
    return out;
}

// exact: bit for bit. Otherwise (median_norm_clip) within fp32 rounding: the device sums each
// worker's norm per chunk and then over the chunks, the host in element order, so a clip factor
// can move by an fp32 rounding, and with it the later rounds' payloads.
void expect_same_run(const std::vector<run_result>& gpu, const std::vector<run_result>& host,
                     bool exact, std::size_t gathers = 3) {
    REQUIRE(gpu.size() == host.size());
    for (std::size_t r = 0; r < gpu.size(); ++r) {
        CAPTURE(r);
        CHECK(gpu[r].device_exchange);
        CHECK(gpu[r].payloads.size() == gathers);
        CHECK(host[r].payloads.size() == gathers);
        if (exact) {
            CHECK(count_differences(gpu[r].values, host[r].values) == 0);
            CHECK(count_differences(gpu[r].state, host[r].state) == 0);
            CHECK(gpu[r].payloads == host[r].payloads);
        } else {
            expect_close_arrays(gpu[r].values, host[r].values, 1e-5, "parameters");
            expect_close_arrays(gpu[r].state, host[r].state, 1e-5, "accumulators");
            REQUIRE(!gpu[r].payloads.empty());
            CHECK(gpu[r].payloads[0] == host[r].payloads[0]);  // the first round's, before any clip
        }
    }
}

template <class C, class Outer, class A, class Schedule = loco::schedule::every>
void handles_equal(const std::string& label, const typename C::hyper& ch,
                   const typename Outer::hyper& oh, bool exact = true) {
    constexpr std::size_t gathers = schedule_of<Schedule>::gathers;
    const auto host = host_run<C, Outer, A, Schedule>(label, 3, ch, oh);
    std::vector<run_result> gpu(3);
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& replica) {
        gpu[static_cast<std::size_t>(replica.rank())] =
            gpu_rank<C, Outer, A, Schedule>(label, replica, replica.stream(), ch, oh);
    });
    expect_same_run(gpu, host, exact, gathers);
#if defined(LOCO_TEST_NCCL)
    int devices = 0;
    check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    if (devices < 3) {
        MESSAGE("SKIPPED the NCCL run: needs 3 GPUs, this machine has " << devices);
        return;
    }
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    std::vector<run_result> nccl(3);
    std::mutex mutex;
    std::vector<std::thread> ranks;
    for (int r = 0; r < 3; ++r) {
        ranks.emplace_back([&, r] {
            try {
                check_cuda(cudaSetDevice(r), "cudaSetDevice");
                auto comm = loco::comm::nccl::create(3, r, id, nullptr, {});
                nccl[static_cast<std::size_t>(r)] =
                    gpu_rank<C, Outer, A, Schedule>(label, *comm, nullptr, ch, oh);
            } catch (const std::exception& err) {
                std::lock_guard<std::mutex> lock(mutex);
                FAIL_CHECK("rank " << r << ": " << err.what());
            }
        });
    }
    for (auto& t : ranks) t.join();
    expect_same_run(nccl, host, exact, gathers);
#endif
}

}  // namespace

TEST_CASE("cuda::diloco with sparseloco and demo exchanges on the device and equals loco::diloco "
          "on threads") {
    namespace ag = loco::aggregate;
    // SparseLoCo as templar runs it: median-norm clipped scatter-mean, outer SGD with lr 1.
    handles_equal<cz::sparseloco, loco::outer::sgd, ag::median_norm_clip>(
        "sparse handles sparseloco", {.chunk = 64, .topk = 6}, {.lr = 1.0f}, false);
    // The same payloads averaged (the mean of the decoded payloads), 3 bins, outer Nesterov.
    handles_equal<cz::sparseloco, loco::outer::nesterov, ag::mean>(
        "sparse handles sparseloco mean", {.chunk = 64, .topk = 3, .bins = 3}, {});
    // Each decoded payload a row of a robust aggregation.
    handles_equal<cz::sparseloco, loco::outer::nesterov, ag::trimmed_mean>(
        "sparse handles sparseloco trimmed", {.chunk = 64, .topk = 6}, {});
    // DisTrO's signs and sign-SGD; DeMo's fp32 coefficients with Nesterov.
    handles_equal<cz::demo, loco::outer::sign_sgd, ag::mean>(
        "sparse handles demo", {.chunk = 64, .topk = 4, .sign = true}, {.lr = 1.0f / 64});
    handles_equal<cz::demo, loco::outer::nesterov, ag::mean>(
        "sparse handles demo fp32", {.chunk = 64, .topk = 5}, {});
    // DeMo as its references aggregate: each coefficient averaged over the workers that sent it
    // (demo_decode_scatter_mean on the device), signs and fp32.
    handles_equal<cz::demo, loco::outer::sign_sgd, ag::scatter_mean>(
        "sparse handles demo scatter signs", {.chunk = 64, .topk = 4, .sign = true},
        {.lr = 1.0f / 64});
    handles_equal<cz::demo, loco::outer::nesterov, ag::scatter_mean, loco::schedule::streaming>(
        "sparse handles demo scatter streaming", {.chunk = 64, .topk = 5}, {});
    // Streaming DiLoCo: two fragments, each exchange in flight over an inner step.
    handles_equal<cz::sparseloco, loco::outer::sgd, ag::median_norm_clip, loco::schedule::streaming>(
        "sparse handles sparseloco streaming", {.chunk = 64, .topk = 6}, {.lr = 1.0f}, false);
    handles_equal<cz::demo, loco::outer::nesterov, ag::mean, loco::schedule::streaming>(
        "sparse handles demo streaming", {.chunk = 64, .topk = 5}, {});
}

TEST_CASE("cuda::diloco with sparseloco: a malformed payload is refused on every rank and changes "
          "nothing; the round then goes through") {
    namespace hd = loco_test::handles;
    const std::string label = "sparse handles refused";
    const cz::sparseloco::hyper ch{.chunk = 64, .topk = 6};
    using gpu_t = loco::cuda::diloco<loco::inner::sgd, loco::outer::sgd, cz::sparseloco,
                                     loco::schedule::every, loco::aggregate::median_norm_clip>;
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& replica) {
        hd::corrupting comm(replica);
        hd::gpu_params m(hd::init_of(label, comm.rank()));
        gpu_t opt(m.list, comm,
                  {.inner = {.lr = 1.0f / 64}, .schedule = {.every = 100}, .compress = ch,
                   .stream = replica.stream()});
        REQUIRE(opt.device_exchange());
        for (int t = 1; t <= 3; ++t) {
            m.set_gradients(hd::grads_of(label, comm.rank(), t), replica.stream());
            opt.step();
            if (t == 1) opt.sync();  // an accumulator that is not zero
        }
        REQUIRE(opt.outer_steps() == 1);
        const std::size_t p = (opt.bytes_per_sync() - opt.agreement_bytes_per_sync()) / 2;
        // A bit in the padding after tensor a's index stream (5 cells, 4 kept: Elias-Fano's
        // 4 + 4 bits, l = 0, in 4 bytes), in rank 2's payload, with the checksum rewritten: the
        // format check refuses it.
        const auto l = cz::sparseloco::layout_of(ch, {0, 5, 1, 5});
        REQUIRE(l.grid.chunks() * l.indices.bits() <= 24);
        comm.armed_at = 2 * p + cz::wire::header_bytes + l.record_bytes + l.index_bytes - 1;
        comm.reseal_stride = p;
        hd::expect_refused_then_intact(opt, m, comm, replica.stream(),
                                       "loco::compress::sparseloco: malformed payload from "
                                       "rank 2: nonzero padding after the indices");
        // Other settings re-plan the exchange; the accumulator carries over.
        opt.compress_hyper().topk = 2;
        opt.sync();
        CHECK(opt.outer_steps() == 3);
        CHECK((opt.bytes_per_sync() - opt.agreement_bytes_per_sync()) / 2 ==
              cz::sparseloco::payload_bytes({.chunk = 64, .topk = 2},
                                            std::vector<cz::segment>{
                                                {0, 5, 1, 5}, {5, 42, 6, 7}, {47, 1003, 1, 1003}}));
    });
}

// aggregate_hyper() changed mid-run is validated at the sync on the device path too, where the
// clipped scatter-mean runs inside the exchange (no combine): an epsilon of -1 was applied, an
// outer step in about the opposite direction.
TEST_CASE("cuda::diloco with sparseloco: a bad median_norm_clip setting set mid-run fails the "
          "sync on every rank, nothing applied") {
    namespace hd = loco_test::handles;
    const std::string label = "sparse handles bad epsilon";
    using gpu_t = loco::cuda::diloco<loco::inner::sgd, loco::outer::sgd, cz::sparseloco,
                                     loco::schedule::every, loco::aggregate::median_norm_clip>;
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& replica) {
        hd::gpu_params m(hd::init_of(label, replica.rank()));
        gpu_t opt(m.list, replica,
                  {.inner = {.lr = 1.0f / 64}, .outer = {.lr = 1.0f}, .schedule = {.every = 1},
                   .compress = {.chunk = 64, .topk = 6}, .stream = replica.stream()});
        opt.start();
        REQUIRE(opt.device_exchange());
        m.set_gradients(hd::grads_of(label, replica.rank(), 1), replica.stream());
        opt.step();
        REQUIRE(opt.outer_steps() == 1);
        const auto global = opt.global();
        opt.aggregate_hyper().epsilon = -1.0f;
        m.set_gradients(hd::grads_of(label, replica.rank(), 2), replica.stream());
        CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("epsilon must be"),
                             loco::invalid_argument);
        CHECK(opt.outer_steps() == 1);
        CHECK(opt.global() == global);
        opt.aggregate_hyper().epsilon = 1e-8f;
        opt.sync();
        CHECK(opt.outer_steps() == 2);
    });
}

// bytes_per_sync() after compress_hyper() changed is what the next sync sends, as on the host:
// the device plan is rebuilt only when that exchange starts, and its old size was reported.
template <class C>
void bytes_follow_new_settings(typename C::hyper before, typename C::hyper after,
                               const std::string& label) {
    namespace hd = loco_test::handles;
    using gpu_t = loco::cuda::diloco<loco::inner::sgd, loco::outer::sgd, C, loco::schedule::every,
                                     loco::aggregate::mean>;
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& replica) {
        hd::gpu_params m(hd::init_of(label, replica.rank()));
        gpu_t opt(m.list, replica,
                  {.inner = {.lr = 1.0f / 64}, .outer = {.lr = 1.0f}, .schedule = {.every = 1},
                   .compress = before, .stream = replica.stream()});
        opt.start();
        REQUIRE(opt.device_exchange());
        m.set_gradients(hd::grads_of(label, replica.rank(), 1), replica.stream());
        opt.step();
        opt.compress_hyper() = after;
        const std::uint64_t reported = opt.bytes_per_sync();
        const std::uint64_t sent = replica.bytes_sent();
        m.set_gradients(hd::grads_of(label, replica.rank(), 2), replica.stream());
        opt.step();
        CHECK(replica.bytes_sent() - sent == reported);
        CHECK(opt.bytes_per_sync() == reported);
    });
}

TEST_CASE("cuda::diloco: bytes_per_sync right after a change of compress_hyper() is the next "
          "sync's") {
    bytes_follow_new_settings<cz::sparseloco>({.chunk = 64, .topk = 6}, {.chunk = 64, .topk = 2},
                                              "sparse bytes follow sparseloco");
    bytes_follow_new_settings<cz::demo>({.chunk = 64, .topk = 5}, {.chunk = 32, .topk = 3},
                                        "sparse bytes follow demo");
}

}  // namespace cuda_sparse_test
