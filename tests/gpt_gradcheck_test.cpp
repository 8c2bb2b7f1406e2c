// The GPT example's backward pass (examples/gpt/model.hpp) against central finite differences of
// its own forward pass, in double, for every element of every parameter tensor of a tiny model,
// tied and untied. The tiny shape takes both the 4 x 32 tiles of the product kernel (the MLP's
// 32 columns, 12 rows) and its remainder paths (vocabulary 11, dimension 8); the kernel itself is
// checked against a double reference below, across its 64-row chunks too.
#include <doctest/doctest.h>

#include "support/random.hpp"

#include "../examples/gpt/layers.hpp"
#include "../examples/gpt/model.hpp"

#include <cmath>
#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

void check_gradients(bool tied, const char* label) {
    auto rng = loco_test::rng_for(label);
    gpt::model_config cfg{.vocab = 11, .context = 6, .dim = 8, .layers = 2, .heads = 2,
                          .tied = tied};
    const gpt::layout lay(cfg);
    std::vector<double> params(lay.total());
    gpt::initialise<double>(lay, params, rng());
    // Larger than GPT-2's 0.02, and non-trivial norms and biases, so that every path carries a
    // gradient well above the finite-difference error.
    std::normal_distribution<double> normal(0.0, 0.3);
    for (double& p : params) p += normal(rng);

    const std::size_t batch = 2, n = batch * cfg.context;
    std::vector<std::uint8_t> tokens(n), targets(n);
    std::uniform_int_distribution<int> byte(0, static_cast<int>(cfg.vocab) - 1);
    for (std::size_t i = 0; i < n; ++i) {
        tokens[i] = static_cast<std::uint8_t>(byte(rng));
        targets[i] = static_cast<std::uint8_t>(byte(rng));
    }

    gpt::model<double> m(lay);
    std::vector<double> grads(lay.total());
    m.forward(params.data(), tokens.data(), targets.data(), batch, true);
    m.backward(params.data(), grads.data());

    const double h = 1e-5;
    std::size_t checked = 0;
    for (const gpt::tensor_spec& s : lay.tensors()) {
        double norm = 0.0;
        for (std::size_t i = 0; i < s.size(); ++i) {
            double& p = params[s.offset + i];
            const double keep = p;
            p = keep + h;
            const double up = m.forward(params.data(), tokens.data(), targets.data(), batch, false);
            p = keep - h;
            const double down =
                m.forward(params.data(), tokens.data(), targets.data(), batch, false);
            p = keep;
            const double numeric = (up - down) / (2 * h);
            const double analytic = grads[s.offset + i];
            INFO(s.name << "[" << i << "]: analytic " << analytic << ", numeric " << numeric);
            CHECK(std::abs(analytic - numeric) <= 1e-7 + 1e-5 * std::abs(numeric));
            norm += analytic * analytic;
            ++checked;
        }
        INFO(s.name);
        CHECK(std::sqrt(norm) > 1e-4);  // every tensor takes part in the loss
    }
    CHECK(checked == lay.total());
}

}  // namespace

TEST_CASE("gpt: every parameter's gradient matches central differences (untied head)") {
    check_gradients(false, "gpt.gradcheck.untied");
}

TEST_CASE("gpt: every parameter's gradient matches central differences (tied head)") {
    check_gradients(true, "gpt.gradcheck.tied");
}

TEST_CASE("gpt: the product kernel against a double reference, fast tiles and remainders") {
    auto rng = loco_test::rng_for("gpt.gemm");
    for (const auto [rows, inner, cols] : {std::array<std::size_t, 3>{1, 1, 1}, {4, 3, 16},
                                          {7, 5, 33}, {9, 17, 64}, {12, 8, 15},
                                          {70, 9, 97}, {131, 3, 32}}) {
        const auto a = loco_test::normal_floats(rng, rows * inner);
        const auto b = loco_test::normal_floats(rng, inner * cols);
        auto c = loco_test::normal_floats(rng, rows * cols);
        std::vector<double> want(c.begin(), c.end());
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t j = 0; j < cols; ++j)
                for (std::size_t k = 0; k < inner; ++k)
                    want[i * cols + j] += double(a[i * inner + k]) * double(b[k * cols + j]);
        gpt::gemm_acc(c.data(), a.data(), b.data(), rows, inner, cols);
        for (std::size_t i = 0; i < c.size(); ++i) {
            INFO(rows << "x" << inner << "x" << cols << " element " << i);
            CHECK(std::abs(c[i] - want[i]) <= 1e-5 * (1.0 + std::abs(want[i])));
        }
    }
}
