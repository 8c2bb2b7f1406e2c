// The WAN utilisation model (bench/wan_model.hpp, docs/wan.md) against closed forms, on randomly
// drawn step times, layer counts, bytes, bandwidths and latencies:
//   a sync of all L layers, equal pieces, t = latency + 8 bytes / (L bandwidth), b = (1-f) C / L:
//       E = t                      (t <= b: each piece leaves before the next is ready)
//       E = L t - (L - 1) b        (t >= b: the link is busy from the first piece to the last)
//   fragment p of P, strided over L = k P layers (layers p, p + P, ...), with t >= P b:
//       E_p = k t - (L - P + p) b
//   utilisation over H steps with overlap tau: H C / (H C + sum max(0, E - tau C));
// and the bandwidth it reports for a target utilisation inverts the first two forms.
#include <doctest/doctest.h>

#include "../bench/wan_model.hpp"
#include "support/random.hpp"

#include <cmath>
#include <random>

namespace wan = loco_bench::wan;

namespace {

double uniform(std::mt19937_64& rng, double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(rng);
}

}  // namespace

TEST_CASE("wan model: DiLoCo and data parallelism against the closed form of the layer queue") {
    auto rng = loco_test::rng_for("wan model whole");
    for (int trial = 0; trial < 50; ++trial) {
        const std::size_t layers = std::uniform_int_distribution<std::size_t>(1, 64)(rng);
        const wan::step_model c{uniform(rng, 0.01, 5.0), layers, 1.0 / 3};
        const double bytes = uniform(rng, 1e6, 1e11);
        const double latency = trial % 2 ? uniform(rng, 0.0, 0.05) : 0.0;
        const double bandwidth = std::pow(10.0, uniform(rng, 8.0, 12.0));
        const std::uint64_t h = std::uniform_int_distribution<std::uint64_t>(1, 500)(rng);
        CAPTURE(layers);
        CAPTURE(c.seconds);
        CAPTURE(bytes);
        CAPTURE(bandwidth);
        const double l = static_cast<double>(layers);
        const double t = latency + 8.0 * bytes / l / bandwidth;
        const double b = (2.0 / 3.0) * c.seconds / l;
        const double e = t <= b ? t : l * t - (l - 1.0) * b;
        const wan::method diloco{{wan::spread(bytes, wan::all_layers(layers))}, h, 0};
        const double hc = static_cast<double>(h) * c.seconds;
        CHECK(wan::exposed(diloco.syncs[0], c, {bandwidth, latency}) ==
              doctest::Approx(e).epsilon(1e-12));
        CHECK(wan::utilisation(diloco, c, {bandwidth, latency}) ==
              doctest::Approx(hc / (hc + e)).epsilon(1e-12));
        const wan::method dp{{wan::spread(bytes, wan::all_layers(layers))}, 1, 0};
        CHECK(wan::utilisation(dp, c, {bandwidth, latency}) ==
              doctest::Approx(c.seconds / (c.seconds + e)).epsilon(1e-12));
    }
}

TEST_CASE("wan model: the bandwidth for a target utilisation inverts the closed form") {
    auto rng = loco_test::rng_for("wan model inverse");
    for (int trial = 0; trial < 50; ++trial) {
        const std::size_t layers = std::uniform_int_distribution<std::size_t>(1, 64)(rng);
        const wan::step_model c{uniform(rng, 0.01, 5.0), layers, 1.0 / 3};
        const double bytes = uniform(rng, 1e6, 1e11);
        const std::uint64_t h = std::uniform_int_distribution<std::uint64_t>(1, 500)(rng);
        const double target = uniform(rng, 0.3, 0.995);
        CAPTURE(layers);
        CAPTURE(target);
        const double l = static_cast<double>(layers);
        const double hc = static_cast<double>(h) * c.seconds;
        const double b = (2.0 / 3.0) * c.seconds / l;
        const double allowed = hc * (1.0 / target - 1.0);  // the exposed time the target permits
        // E = t when that leaves t <= b, else E = L t - (L - 1) b.
        const double t = allowed <= b ? allowed : (allowed + (l - 1.0) * b) / l;
        const double want = 8.0 * bytes / l / t;
        const wan::method diloco{{wan::spread(bytes, wan::all_layers(layers))}, h, 0};
        CHECK(wan::bandwidth_for(diloco, c, target) == doctest::Approx(want).epsilon(1e-9));
    }
    // Latency alone can cap the utilisation: one collective of 1 s over steps of 0.1 s, H = 1.
    const wan::method slow{{wan::spread(1.0, wan::all_layers(1))}, 1, 0};
    CHECK(std::isinf(wan::bandwidth_for(slow, {0.1, 1, 1.0 / 3}, 0.5, 1.0)));
}

TEST_CASE("wan model: strided streaming fragments with and without overlap") {
    auto rng = loco_test::rng_for("wan model streaming");
    for (int trial = 0; trial < 50; ++trial) {
        const std::size_t p = std::uniform_int_distribution<std::size_t>(2, 16)(rng);
        const std::size_t k = std::uniform_int_distribution<std::size_t>(1, 6)(rng);
        const std::size_t layers = k * p;
        const wan::step_model c{uniform(rng, 0.01, 5.0), layers, 1.0 / 3};
        const double l = static_cast<double>(layers);
        const double b = (2.0 / 3.0) * c.seconds / l;
        // A link slow enough that t >= P b: the queue of each fragment never idles.
        const double t = static_cast<double>(p) * b * uniform(rng, 1.0, 20.0);
        const double bandwidth = 1e9;
        const double fragment_bytes = t * bandwidth / 8.0 * static_cast<double>(k);
        const std::uint64_t tau = std::uniform_int_distribution<std::uint64_t>(0, 2)(rng);
        const std::uint64_t h = p * std::uniform_int_distribution<std::uint64_t>(tau + 1, 40)(rng);
        CAPTURE(p);
        CAPTURE(k);
        CAPTURE(tau);
        wan::method m{{}, h, tau};
        double stalled = 0;
        for (std::size_t f = 0; f < p; ++f) {
            m.syncs.push_back(wan::spread(fragment_bytes, wan::strided_layers(f, p, layers)));
            const double e = static_cast<double>(k) * t -
                             (l - static_cast<double>(p) + static_cast<double>(f)) * b;
            CHECK(wan::exposed(m.syncs.back(), c, {bandwidth, 0.0}) ==
                  doctest::Approx(std::max(0.0, e)).epsilon(1e-9));
            stalled += std::max(0.0, e - static_cast<double>(tau) * c.seconds);
        }
        const double hc = static_cast<double>(h) * c.seconds;
        CHECK(wan::utilisation(m, c, {bandwidth, 0.0}) ==
              doctest::Approx(hc / (hc + stalled)).epsilon(1e-9));
    }
}

TEST_CASE("wan model: bad input is refused") {
    const wan::method m{{wan::spread(1e6, wan::all_layers(4))}, 10, 0};
    CHECK_THROWS_AS(wan::utilisation(m, {0.1, 4, 1.0 / 3}, {0.0, 0.0}), loco::invalid_argument);
    CHECK_THROWS_AS(wan::utilisation(m, {0.1, 2, 1.0 / 3}, {1e9, 0.0}), loco::invalid_argument);
    CHECK_THROWS_AS(wan::utilisation({m.syncs, 0, 0}, {0.1, 4, 1.0 / 3}, {1e9, 0.0}),
                    loco::invalid_argument);
    CHECK_THROWS_AS(wan::bandwidth_for(m, {0.1, 4, 1.0 / 3}, 1.0), loco::invalid_argument);
}

TEST_CASE("wan model: a piece past the last layer, no layers and a target of 0 are refused") {
    const wan::step_model c{0.1, 4, 1.0 / 3};
    // Layer L does not exist (layers are 0 .. L - 1), even though L itself is the count.
    CHECK_THROWS_AS(wan::exposed({{4, 1e6}}, c, {1e9, 0.0}), loco::invalid_argument);
    CHECK_NOTHROW(wan::exposed({{3, 1e6}}, c, {1e9, 0.0}));
    // No layers at all: refused even for a sync with no pieces (b would divide by zero).
    CHECK_THROWS_AS(wan::exposed({}, {0.1, 0, 1.0 / 3}, {1e9, 0.0}), loco::invalid_argument);
    const wan::method m{{wan::spread(1e6, wan::all_layers(4))}, 10, 0};
    CHECK_THROWS_AS(wan::bandwidth_for(m, c, 0.0), loco::invalid_argument);
    CHECK_THROWS_AS(wan::bandwidth_for(m, c, -0.5), loco::invalid_argument);
}

TEST_CASE("wan model: a sync that ends inside the backward pass exposes nothing") {
    // One small piece of the last layer (L - 1), ready at f C + b, leaves long before C:
    // E = max(0, f C + b + t - C) = 0, never negative.
    auto rng = loco_test::rng_for("wan model hidden");
    for (int trial = 0; trial < 20; ++trial) {
        const std::size_t layers = std::uniform_int_distribution<std::size_t>(2, 64)(rng);
        const wan::step_model c{uniform(rng, 0.01, 5.0), layers, 1.0 / 3};
        const double l = static_cast<double>(layers);
        const double b = (2.0 / 3.0) * c.seconds / l;
        const double t = b * uniform(rng, 0.01, 0.9);  // shorter than one layer's backward
        const double bandwidth = 1e9;
        const wan::sync_bytes s{{layers - 1, t * bandwidth / 8.0}};
        CAPTURE(layers);
        CHECK(wan::exposed(s, c, {bandwidth, 0.0}) == 0.0);
        // Ready at f C + (L - l) b for the piece of layer l: the first layer's ends at C + t.
        const wan::sync_bytes first{{0, t * bandwidth / 8.0}};
        CHECK(wan::exposed(first, c, {bandwidth, 0.0}) == doctest::Approx(t).epsilon(1e-9));
    }
}

TEST_CASE("wan model: the bandwidth reported for a target reaches it") {
    auto rng = loco_test::rng_for("wan model reaches");
    for (int trial = 0; trial < 50; ++trial) {
        const std::size_t layers = std::uniform_int_distribution<std::size_t>(1, 64)(rng);
        const wan::step_model c{uniform(rng, 0.01, 5.0), layers, 1.0 / 3};
        const std::uint64_t h = std::uniform_int_distribution<std::uint64_t>(1, 500)(rng);
        const double target = uniform(rng, 0.3, 0.995);
        const double latency = trial % 2 ? uniform(rng, 0.0, 1e-4) : 0.0;
        const wan::method m{{wan::spread(uniform(rng, 1e6, 1e11), wan::all_layers(layers))}, h, 0};
        CAPTURE(layers);
        CAPTURE(target);
        const double bw = wan::bandwidth_for(m, c, target, latency);
        if (std::isinf(bw)) {  // latency alone caps the utilisation below the target
            CHECK(wan::utilisation(m, c, {1e15, latency}) < target);
            continue;
        }
        // The smallest such bandwidth (to rounding): it reaches the target, 1e-9 less does not.
        CHECK(wan::utilisation(m, c, {bw, latency}) >= target);
        CHECK(wan::utilisation(m, c, {bw * (1 - 1e-9), latency}) < target);
    }
}

TEST_CASE("wan model: the paper's bandwidth grid (50 points, 0.1 to 1000 Gbit/s, log-spaced)") {
    for (int k = 0; k < 50; ++k) {
        const double g = std::pow(10.0, -1.0 + 4.0 * k / 49.0);
        CAPTURE(k);
        // A grid point is its own ceiling, also when computed with a rounding error below it.
        CHECK(wan::paper_grid_ceil(g) == doctest::Approx(g).epsilon(1e-12));
        CHECK(wan::paper_grid_ceil(g * (1 - 1e-14)) == doctest::Approx(g).epsilon(1e-12));
        if (k + 1 < 50) {
            const double next = std::pow(10.0, -1.0 + 4.0 * (k + 1) / 49.0);
            CHECK(wan::paper_grid_ceil(g * (1 + 1e-6)) == doctest::Approx(next).epsilon(1e-12));
        }
    }
    // Points the paper prints (docs/wan.md): 86.8, 104.8, 569.0 and the ends of the grid.
    CHECK(wan::paper_grid_ceil(80.0) == doctest::Approx(86.851).epsilon(1e-4));
    CHECK(wan::paper_grid_ceil(87.0) == doctest::Approx(104.811).epsilon(1e-4));
    CHECK(wan::paper_grid_ceil(500.0) == doctest::Approx(568.987).epsilon(1e-4));
    CHECK(wan::paper_grid_ceil(0.0) == doctest::Approx(0.1).epsilon(1e-12));
    CHECK(wan::paper_grid_ceil(999.0) == doctest::Approx(1000.0).epsilon(1e-12));
    CHECK(std::isinf(wan::paper_grid_ceil(1000.5)));
}
