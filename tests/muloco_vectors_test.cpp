// MuLoCo's error feedback around its 2-bit statistical quantizer, reproduced number for number:
// algorithms.md section 9 T7 (outer lr 0.8 folded into the buffer, decay 0.9, two rounds), derived
// from facebookresearch/MuLoCo quantized_outer_sgd.py.
#include <doctest/doctest.h>

#include <loco/compress/error_feedback.hpp>
#include <loco/compress/statistical.hpp>

#include <vector>

namespace {

namespace lc = loco::compress;
using muloco_ef = lc::error_feedback<lc::statistical<2>>;

void check_values(const std::vector<float>& got, const std::vector<double>& want, double tol) {
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
        CAPTURE(i);
        CHECK(got[i] == doctest::Approx(want[i]).epsilon(tol).scale(1.0));
    }
}

}  // namespace

TEST_CASE("MuLoCo error feedback, vector T7: two rounds of sent values and residuals") {
    const muloco_ef::hyper h{.compress = {}, .decay = 0.9f, .fold_outer_lr = true};
    const lc::segment seg{0, 8, 1, 8};
    std::vector<float> residual(8, 0.0f), sent(8);
    std::vector<std::byte> payload(muloco_ef::payload_bytes(h, {&seg, 1}));
    const lc::encode_context ctx{.outer_lr = 0.8f};

    const std::vector<float> round1{0.9f, -0.6f, 2.4f, 0.5f, 0.1f, 1.6f, -2.1f, 0.4f};
    muloco_ef::encode(h, round1, {&seg, 1}, residual, ctx, payload);
    muloco_ef::decode(h, payload, {&seg, 1}, sent);
    check_values(sent, {0.208, 0.208, 1.6, 0.208, 0.208, 1.6, -1.68, 0.208}, 1e-5);
    check_values(residual, {0.512, -0.688, 0.32, 0.192, -0.128, -0.32, 0.0, 0.112}, 1e-5);

    const std::vector<float> round2{0.3f, 0.2f, -0.1f, 0.7f, -0.4f, 0.0f, 0.5f, -0.2f};
    muloco_ef::encode(h, round2, {&seg, 1}, residual, ctx, payload);
    muloco_ef::decode(h, payload, {&seg, 1}, sent);
    check_values(sent, {0.7168, -0.394133, 0.182933, 0.7168, -0.394133, -0.394133, 0.182933, 0.182933}, 1e-5);
    check_values(residual, {-0.016, -0.065067, 0.025067, 0.016, -0.041067, 0.106133, 0.217067, -0.242133}, 1e-4);
}
