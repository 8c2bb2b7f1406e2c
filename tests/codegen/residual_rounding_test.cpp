// The host's error-feedback residual and SparseLoCo/DeMo accumulator round a product and a sum
// separately, as the CUDA kernels do (__fmul_rn, __fadd_rn), in a build for the machine's own
// instruction set. GCC contracts a * b + c into one fused multiply-add whenever the target has one
// (-march=native on x86-64, every aarch64 host), which rounds once: the host's residual then
// differed from the device's in about a quarter of the elements. loco's programs are built with
// -ffp-contract=off (cmake/loco_warnings.cmake); this test is compiled with -march=native and
// those flags (tests/CMakeLists.txt) and fails without the flag on a machine with FMA.
#include <doctest/doctest.h>

#include "../support/random.hpp"

#include <loco/compress/error_feedback.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/compress/topk.hpp>

#include <bit>
#include <cstdint>
#include <vector>

namespace {

namespace lc = loco::compress;

// One rounding per operation, whatever the flags: the results pass through memory.
float rounded_product(float a, float b) {
    volatile float p = a * b;
    return p;
}
float rounded_sum(float a, float b) {
    volatile float s = a + b;
    return s;
}

// Elements the payload did not carry keep all of e = a * r + b * x as their residual, so the
// residual shows the rounding of e. Returns how many of them differ from two roundings.
std::size_t differing_unsent(const std::vector<float>& decoded, const std::vector<float>& residual,
                             const std::vector<float>& r0, const std::vector<float>& x, float a,
                             float b, bool scale_x, std::size_t& unsent) {
    std::size_t differ = 0;
    unsent = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
        if (decoded[i] != 0.0f) continue;
        ++unsent;
        const float bx = scale_x ? rounded_product(b, x[i]) : x[i];
        const float e = rounded_sum(rounded_product(a, r0[i]), bx);
        if (std::bit_cast<std::uint32_t>(residual[i]) != std::bit_cast<std::uint32_t>(e)) {
            ++differ;
        }
    }
    return differ;
}

}  // namespace

TEST_CASE("error feedback's residual rounds decay * r + s * x twice, as the device does") {
    auto rng = loco_test::rng_for("residual rounding, error feedback");
    const std::size_t n = 4096;
    const std::vector<float> x = loco_test::normal_floats(rng, n);
    const std::vector<float> r0 = loco_test::normal_floats(rng, n);
    const lc::segment segs[] = {{0, n, 1, n}};
    using ef = lc::error_feedback<lc::topk>;
    const ef::hyper h{.compress = {.ratio = 0.25f}, .decay = 0.9f, .fold_outer_lr = true};
    std::vector<float> residual = r0;
    std::vector<std::byte> payload(ef::payload_bytes(h, segs));
    ef::encode(h, x, segs, residual, {.seed = 1, .round = 0, .rank = 0, .outer_lr = 0.7f},
               payload);
    std::vector<float> decoded(n);
    ef::decode(h, payload, segs, decoded);
    std::size_t unsent = 0;
    CHECK(differing_unsent(decoded, residual, r0, x, 0.9f, 0.7f, true, unsent) == 0);
    CHECK(unsent >= n / 2);
}

TEST_CASE("SparseLoCo's accumulator rounds beta * e + x twice, as the device does") {
    auto rng = loco_test::rng_for("residual rounding, sparseloco");
    const std::size_t n = 4096;
    const std::vector<float> x = loco_test::normal_floats(rng, n);
    const std::vector<float> r0 = loco_test::normal_floats(rng, n);
    const lc::segment segs[] = {{0, n, 1, n}};
    const lc::sparseloco::hyper h{.chunk = 64, .topk = 2};
    std::vector<float> accumulator = r0;
    std::vector<std::byte> payload(lc::sparseloco::payload_bytes(h, segs));
    lc::sparseloco::encode(h, x, segs, accumulator, {}, payload);
    std::vector<float> decoded(n);
    lc::sparseloco::decode(h, payload, segs, decoded);
    std::size_t unsent = 0;
    CHECK(differing_unsent(decoded, accumulator, r0, x, h.beta, 1.0f, false, unsent) == 0);
    CHECK(unsent >= n / 2);
}
