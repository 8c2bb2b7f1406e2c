// EDiT's penalty and the robust aggregations against published and derived vectors
// (algorithms.md T6, T7, T8), the EWMA detector against a double-precision sequence computed by
// hand from the formulas of algorithms.md 5.2, bad input, non-finite workers, and the
// aggregation state through a checkpoint.

#include <doctest/doctest.h>

#include <loco/aggregate/edit.hpp>
#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/aggregate/mean.hpp>
#include <loco/aggregate/robust.hpp>
#include <loco/aggregate/scatter_mean.hpp>
#include <loco/comm/single.hpp>
#include <loco/comm/threads.hpp>
#include <loco/compress/blockwise.hpp>
#include <loco/compress/error_feedback.hpp>
#include <loco/compress/none.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/nesterov.hpp>
#include <loco/outer/sgd.hpp>

#include "support/random.hpp"
#include "support/settings.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using loco::aggregate::contributions;
using loco::aggregate::worker_report;

struct gathered {
    std::vector<float> deltas;
    std::vector<worker_report> reports;
    std::size_t workers = 0, elements = 0;

    contributions view() const {
        contributions c;
        c.workers = workers;
        c.elements = elements;
        c.reports = reports;
        c.deltas = deltas;
        return c;
    }
};

gathered from_rows(const std::vector<std::vector<float>>& rows) {
    gathered g;
    g.workers = rows.size();
    g.elements = rows.front().size();
    for (const auto& r : rows) {
        double sq = 0.0;
        for (const float x : r) {
            g.deltas.push_back(x);
            sq += double(x) * x;
        }
        g.reports.push_back({static_cast<float>(std::sqrt(sq)), 10.0f});
    }
    return g;
}

// T6: four ranks, every element of rank r is (r + 1)(-1)^r.
gathered t6(std::size_t n = 3) {
    std::vector<std::vector<float>> rows;
    for (int r = 0; r < 4; ++r) rows.emplace_back(n, float((r + 1) * (r % 2 ? -1 : 1)));
    auto g = from_rows(rows);
    for (auto& rep : g.reports) rep.norm = 1.0f;  // equal norms: equal softmax weights
    return g;
}

std::vector<float> run_edit(const loco::aggregate::edit::hyper& h, const gathered& g) {
    loco::aggregate::edit::state s;
    std::vector<float> out(g.elements);
    REQUIRE(loco::aggregate::edit::combine(h, s, g.view(), out));
    return out;
}

}  // namespace

TEST_CASE("edit: T6 reducer values (atorch's GTA reducer test)") {
    const auto g = t6();
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    using loco::aggregate::sign_consensus;
    SUBCASE("linear mean, with and without softmax weights of equal norms: -0.5") {
        h.consensus = sign_consensus::none;
        for (const bool weighted : {false, true}) {
            h.weight_by_norm = weighted;
            for (const float x : run_edit(h, g)) CHECK(x == doctest::Approx(-0.5).epsilon(1e-6));
        }
    }
    SUBCASE("GTA sign consensus 'sum': ranks 1 and 3 kept, -3") {
        h.consensus = sign_consensus::sum;
        for (const float x : run_edit(h, g)) CHECK(x == doctest::Approx(-3.0).epsilon(1e-6));
    }
    SUBCASE("GTA sign consensus 'count': the tie goes to +, 2") {
        h.consensus = sign_consensus::count;
        for (const float x : run_edit(h, g)) CHECK(x == doctest::Approx(2.0).epsilon(1e-6));
    }
    SUBCASE("GTA with weights r + 1 (no softmax): 'sum' -10/3, 'count' 5/2") {
        const std::vector<double> w = {1, 2, 3, 4};
        std::vector<float> out(g.elements);
        loco::aggregate::gta_reduce(w, g.deltas, g.elements, sign_consensus::sum, out);
        for (const float x : out) CHECK(x == doctest::Approx(-10.0 / 3.0).epsilon(1e-6));
        loco::aggregate::gta_reduce(w, g.deltas, g.elements, sign_consensus::count, out);
        for (const float x : out) CHECK(x == doctest::Approx(2.5).epsilon(1e-6));
        loco::aggregate::gta_reduce(w, g.deltas, g.elements, sign_consensus::none, out);
        for (const float x : out) CHECK(x == doctest::Approx(1 - 4 + 9 - 16).epsilon(1e-6));
    }
}

TEST_CASE("edit: T7 weighting vector, clip with the 1e-6 guard, step weights") {
    auto g = from_rows({{0.5f, -0.5f}, {2.0f, 1.0f}});
    g.reports[0].norm = 1.0f;
    g.reports[1].norm = 2.0f;
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    h.consensus = loco::aggregate::sign_consensus::none;
    h.clip = 1.0f;
    loco::aggregate::edit::state s;
    const auto w = loco::aggregate::edit::weights(h, s, g.view());
    CHECK(w[0] == doctest::Approx(0.731059).epsilon(1e-6));
    CHECK(w[1] == doctest::Approx(0.268941).epsilon(1e-6));
    auto out = run_edit(h, g);
    CHECK(out[0] == doctest::Approx(0.903412).epsilon(1e-6));
    CHECK(out[1] == doctest::Approx(-0.096588).epsilon(1e-5));
    CHECK(std::hypot(out[0], out[1]) == doctest::Approx(0.908561).epsilon(1e-6));

    // A smaller phi scales by phi / (||agg|| + 1e-6), computed here in double.
    h.clip = 0.5f;
    out = run_edit(h, g);
    const double e0 = 0.731059 * 0.5 + 0.268941 * 2.0, e1 = -0.731059 * 0.5 + 0.268941 * 1.0;
    const double scale = 0.5 / (std::hypot(e0, e1) + 1e-6);
    CHECK(out[0] == doctest::Approx(e0 * scale).epsilon(1e-5));
    CHECK(out[1] == doctest::Approx(e1 * scale).epsilon(1e-4));

    // The guard where it matters (the values above cannot tell 1e-6 from a smaller epsilon):
    // fresh random deltas of norm about 1e-6, so ||agg|| + 1e-6 is about twice ||agg||, and phi
    // below ||agg||. atorch's clip_pseudo_grad: agg * min(1, phi / (||agg|| + 1e-6)); the
    // reference takes the softmax weights of the fp32 reports and the sums in double.
    {
        auto rng = loco_test::rng_for("edit clip guard");
        constexpr std::size_t n = 16;
        const float sd = 1e-6f / std::sqrt(float(n));
        const auto tiny = from_rows({loco_test::normal_floats(rng, n, sd),
                                     loco_test::normal_floats(rng, n, sd)});
        loco::aggregate::edit::hyper ht;
        ht.skip_anomaly = false;
        ht.consensus = loco::aggregate::sign_consensus::none;
        const double w0 = 1.0 / (1.0 + std::exp(double(tiny.reports[0].norm) - tiny.reports[1].norm));
        std::vector<double> agg(n);
        double sq = 0.0;
        for (std::size_t j = 0; j < n; ++j) {
            agg[j] = w0 * tiny.deltas[j] + (1.0 - w0) * tiny.deltas[n + j];
            sq += agg[j] * agg[j];
        }
        const double norm = std::sqrt(sq);
        ht.clip = float(std::uniform_real_distribution<double>(0.05, 0.5)(rng) * norm);
        const double tiny_scale = std::min(1.0, double(ht.clip) / (norm + 1e-6));
        CAPTURE(norm);
        CAPTURE(ht.clip);
        const auto clipped = run_edit(ht, tiny);
        for (std::size_t j = 0; j < n; ++j) {
            CAPTURE(j);
            // Relative: doctest::Approx's default scale of 1 would pass anything this small.
            CHECK(std::abs(clipped[j] - agg[j] * tiny_scale) <= 1e-5 * std::abs(agg[j] * tiny_scale));
        }
    }

    // A-EDiT: w = (1 - r) softmax + r s, s from the reported step counts (30 and 10).
    h.clip = std::numeric_limits<float>::infinity();
    h.step_weights = true;
    h.step_weight_ratio = 0.25f;
    g.reports[0].inner_steps = 30.0f;
    g.reports[1].inner_steps = 10.0f;
    loco::aggregate::edit::state s2;
    const auto ws = loco::aggregate::edit::weights(h, s2, g.view());
    const double sm0 = 1.0 / (1.0 + std::exp(-1.0));
    CHECK(ws[0] == doctest::Approx(0.75 * sm0 + 0.25 * 0.75).epsilon(1e-12));
    CHECK(ws[1] == doctest::Approx(0.75 * (1 - sm0) + 0.25 * 0.25).epsilon(1e-12));

    // Step weights without step counts: a one-sentence error.
    g.reports[0].inner_steps = g.reports[1].inner_steps = 0.0f;
    loco::aggregate::edit::state s3;
    std::vector<float> o(2);
    CHECK_THROWS_WITH_AS(loco::aggregate::edit::combine(h, s3, g.view(), o),
                         doctest::Contains("step counts"), loco::invalid_argument);
}

// atorch's GTAReducer divides by the agreeing workers' total weight only where it is at least
// 1e-8 (`divisor[divisor.abs() < 1e-8] = 1`): two agreeing workers of softmax weight ~2e-9 keep
// their tiny weighted sum; dividing by it gave their delta at full size, outvoting the dominant
// worker.
TEST_CASE("edit: GTA divides by the agreeing weight only from 1e-8 on, as atorch") {
    auto g = from_rows({{-1.0f}, {1.0f}, {1.0f}});
    g.reports[0].norm = 1.0f;
    g.reports[1].norm = g.reports[2].norm = 21.0f;
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    h.consensus = loco::aggregate::sign_consensus::count;  // two + votes against one -
    const double small = std::exp(-20.0) / (1.0 + 2.0 * std::exp(-20.0));  // each of workers 1, 2
    REQUIRE(2.0 * small < 1e-8);
    auto out = run_edit(h, g);
    CHECK(out[0] == doctest::Approx(2.0 * small).epsilon(1e-6));
    // From 1e-8 on, the division as before: norms 1, 5, 5 give the agreeing pair weight > 1e-8.
    g.reports[1].norm = g.reports[2].norm = 5.0f;
    out = run_edit(h, g);
    CHECK(out[0] == 1.0f);
    // At exactly 1e-8 atorch divides (only divisors below it become 1): one agreeing worker of
    // weight 1e-8 gives its own value, not 1e-8 times it.
    const std::vector<double> tiny{1e-8, 0.0};
    std::vector<float> one(1);
    loco::aggregate::gta_reduce(tiny, std::vector<float>{0.5f, 2.0f}, 1,
                                loco::aggregate::sign_consensus::sum, one);
    CHECK(one[0] == 0.5f);
}

// GTA "count" tallies sign(Delta_i[j]) over the workers of weight > 0 (docs/aggregation.md): a zero
// votes neither way (torch.sign(0) = 0), and an outlier's sign is not counted.
TEST_CASE("edit: GTA 'count' tallies the signs of the inliers only, and a zero votes neither way") {
    using loco::aggregate::sign_consensus;
    std::vector<float> out(1);
    // 0, 0, -1: the tally is -1, so the -1 is the consensus (a zero voting + made it +1 and 0).
    const std::vector<double> equal{1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0};
    loco::aggregate::gta_reduce(equal, std::vector<float>{0.0f, 0.0f, -1.0f}, 1,
                                sign_consensus::count, out);
    CHECK(out[0] == -1.0f);
    // Worker 2 has weight 0: +1 and -1 tie, ties go to +, its -1 does not break the tie.
    const std::vector<double> w{0.5, 0.5, 0.0};
    loco::aggregate::gta_reduce(w, std::vector<float>{1.0f, -1.0f, -1.0f}, 1,
                                sign_consensus::count, out);
    CHECK(out[0] == 1.0f);
    // Through edit: worker 2 an outlier (a negative report), workers 0 and 1 tie.
    auto g = from_rows({{1.0f, 2.0f}, {-1.0f, -2.0f}, {-1.0f, -2.0f}});
    g.reports[0].norm = g.reports[1].norm = 1.0f;
    g.reports[2].norm = -1.0f;
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    h.consensus = sign_consensus::count;
    CHECK(run_edit(h, g) == std::vector<float>{1.0f, 2.0f});
}

// A report is taken on trust (the paper's rule: each worker's norm before compression), but a
// negative one is no norm: it would take the largest softmax weight. It is an outlier.
TEST_CASE("edit: a negative norm report is an outlier, as a non-finite one") {
    auto g = from_rows({{1.0f, 1.0f}, {2.0f, 2.0f}, {100.0f, 100.0f}});
    g.reports[2].norm = -1e30f;
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    h.consensus = loco::aggregate::sign_consensus::none;
    loco::aggregate::edit::state s;
    const auto w = loco::aggregate::edit::weights(h, s, g.view());
    REQUIRE(w.size() == 3);
    CHECK(w[2] == 0.0);
    const double n0 = g.reports[0].norm, n1 = g.reports[1].norm;  // the fp32 reports
    const double w0 = 1.0 / (1.0 + std::exp(-(n1 - n0)));
    CHECK(w[0] == doctest::Approx(w0).epsilon(1e-12));
    CHECK(w[1] == doctest::Approx(1.0 - w0).epsilon(1e-12));
}

// A worker whose pseudo-gradient did not move reports the norm 0: a norm (G_i >= 0), not an
// outlier, and the softmax's largest weight.
TEST_CASE("edit: a norm of 0 is an inlier with the largest softmax weight") {
    auto g = from_rows({{0.0f, 0.0f}, {3.0f, 4.0f}});  // norms 0 and 5
    REQUIRE(g.reports[0].norm == 0.0f);
    REQUIRE(g.reports[1].norm == 5.0f);
    loco::aggregate::edit::hyper h;
    h.consensus = loco::aggregate::sign_consensus::none;
    for (const bool skip : {false, true}) {
        h.skip_anomaly = skip;
        loco::aggregate::edit::state s;
        const auto w = loco::aggregate::edit::weights(h, s, g.view());
        REQUIRE(w.size() == 2);
        const double w1 = std::exp(-5.0) / (1.0 + std::exp(-5.0));
        CHECK(w[0] == doctest::Approx(1.0 - w1).epsilon(1e-12));
        CHECK(w[1] == doctest::Approx(w1).epsilon(1e-12));
        const auto out = run_edit(h, g);
        CHECK(out[0] == doctest::Approx(3.0 * w1).epsilon(1e-6));
        CHECK(out[1] == doctest::Approx(4.0 * w1).epsilon(1e-6));
    }
}

// softmax(-G / T) taken as exp(-(G_i - min G) / T) / sum: the same weights, but norms of a
// thousand (T = 1) do not underflow every exp to 0 and the weights to 0 / 0.
TEST_CASE("edit: the softmax of large norms is shifted by the smallest, so its weights stay finite") {
    auto g = from_rows({{1.0f}, {2.0f}});
    g.reports[0].norm = 1000.0f;
    g.reports[1].norm = 1001.0f;
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    loco::aggregate::edit::state s;
    const auto w = loco::aggregate::edit::weights(h, s, g.view());
    const double w1 = std::exp(-1.0) / (1.0 + std::exp(-1.0));
    CHECK(w[0] == doctest::Approx(1.0 - w1).epsilon(1e-12));
    CHECK(w[1] == doctest::Approx(w1).epsilon(1e-12));
}

// The report is the norm before compression; the decoded delta can still be non-finite (a cast
// to fp16 turns 7e4 into inf). Such a worker is an outlier whatever it reported.
TEST_CASE("edit: a worker whose delta is not finite gets weight 0 even with a finite report") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    auto g = from_rows({{1.0f, 2.0f}, {nan, 1.0f}, {2.0f, inf}});
    g.reports[1].norm = 1.0f;
    g.reports[2].norm = 2.0f;
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    h.consensus = loco::aggregate::sign_consensus::none;
    loco::aggregate::edit::state s;
    const auto w = loco::aggregate::edit::weights(h, s, g.view());
    CHECK(w == std::vector<double>{1.0, 0.0, 0.0});
    CHECK(run_edit(h, g) == std::vector<float>{1.0f, 2.0f});
}

// phi / (||agg|| + 1e-6) with ||agg|| summed in double: a finite aggregate whose squares overflow
// fp32 (|x| > 1.8e19) is scaled to phi, not to 0.
TEST_CASE("edit: the clip takes the aggregate's norm in double, so a huge finite one is clipped to phi") {
    const auto g = from_rows({{3e20f, 4e20f}});
    REQUIRE(std::isfinite(g.reports[0].norm));
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    h.consensus = loco::aggregate::sign_consensus::none;
    h.clip = 1.0f;
    const auto out = run_edit(h, g);
    CHECK(out[0] == doctest::Approx(0.6).epsilon(1e-6));
    CHECK(out[1] == doctest::Approx(0.8).epsilon(1e-6));
}

TEST_CASE("edit: the EWMA detector follows a hand-computed double-precision sequence") {
    // alpha 0.5, warmup 2, threshold 1.5; norms 1, 2, 1.5, 10, 1.25, 1.375 of one worker. Computed by
    // hand from algorithms.md 5.2 (mean starts at 0; the z-score window holds the z of each learnt
    // norm after its update; only inliers are learnt). The windows' spreads stay below 1 here, so
    // the std's divisor does not matter (the next test's does).
    struct expected {
        double norm, z_before;
        bool outlier;
        std::uint64_t count;
        double mean, m2;
    };
    const std::array<expected, 6> seq = {{
        {1.0, 0.0, false, 1, 0.5, 0.125},
        {2.0, 0.0, false, 2, 1.25, 0.34375},
        {1.5, 0.42640143271122083, false, 3, 1.375, 0.1796875},
        {10.0, 20.346989949375804, true, 3, 1.375, 0.1796875},
        {1.25, -0.29488391230979427, false, 4, 1.3125, 0.091796875},
        {1.375, 0.20628424925175867, false, 5, 1.34375, 0.04638671875},
    }};
    loco::aggregate::edit::hyper h;
    h.ewma_alpha = 0.5f;
    h.ewma_warmup = 2;
    h.ewma_threshold = 1.5f;
    h.consensus = loco::aggregate::sign_consensus::none;
    loco::aggregate::edit::state s;
    // Two workers: worker 1 is steady at 1.0 and keeps the round alive when worker 0 is rejected.
    for (const auto& e : seq) {
        gathered g = from_rows({{1.0f}, {1.0f}});
        g.reports[0].norm = float(e.norm);
        CHECK(float(e.norm) == e.norm);  // exactly representable, so the float report is exact
        const auto& d = s.detectors.empty() ? loco::aggregate::ewma_detector{} : s.detectors[0];
        CHECK(d.z(e.norm, 2) == doctest::Approx(e.z_before).epsilon(1e-14));
        const auto w = loco::aggregate::edit::weights(h, s, g.view());
        CHECK((w[0] == 0.0) == e.outlier);
        CHECK(s.detectors[0].count == e.count);
        CHECK(s.detectors[0].mean == doctest::Approx(e.mean).epsilon(1e-15));
        CHECK(s.detectors[0].m2 == doctest::Approx(e.m2).epsilon(1e-15));
    }
    CHECK(s.detectors[0].window.size() == 2);
    CHECK(s.detectors[0].window[0] == doctest::Approx(-0.20628424925175867).epsilon(1e-14));
    CHECK(s.detectors[0].window[1] == doctest::Approx(0.14509525002200233).epsilon(1e-14));

    SUBCASE("every worker an outlier: the round is refused, the detectors learn nothing") {
        gathered g = from_rows({{1.0f}, {1.0f}});
        g.reports[0].norm = g.reports[1].norm = 100.0f;
        const auto before = s.detectors[0].count;
        std::vector<float> out(1, 7.0f);
        CHECK_FALSE(loco::aggregate::edit::combine(h, s, g.view(), out));
        CHECK(s.detectors[0].count == before);
    }
}

TEST_CASE("edit: the z-score window's spread is torch.std's (n - 1), and one z-score flags nothing") {
    // atorch: threshold = base * max(1, torch.stack(window).std()), unbiased; with one z-score
    // torch's std is NaN, the threshold NaN, and z > NaN false.
    loco::aggregate::ewma_detector d;
    d.count = 10;
    d.mean = 0.0;
    d.m2 = 1.0;  // sigma 1: z(v) = v
    d.window = {0.0, 4.0};  // population std 2, unbiased 2 sqrt(2)
    CHECK(d.window_std() == doctest::Approx(2.0 * std::sqrt(2.0)).epsilon(1e-15));
    CHECK_FALSE(d.is_outlier(2.5, 2, 1.0));  // above 2, below 2.83: not an outlier in atorch
    CHECK(d.is_outlier(2.9, 2, 1.0));
    d.window = {3.0};
    CHECK(std::isnan(d.window_std()));
    CHECK_FALSE(d.is_outlier(1000.0, 1, 1.0));
}

// One-sided, as atorch: only norms far above the detector's mean are anomalies. A worker whose
// pseudo-gradient shrinks (z far below -threshold) keeps its weight.
TEST_CASE("edit: the detector flags only large norms, a norm far below its mean is an inlier") {
    loco::aggregate::ewma_detector d;
    d.count = 10;
    d.mean = 5.0;
    d.m2 = 1.0;              // sigma 1
    d.window = {0.0, 0.5};   // spread below 1: the threshold stays 3
    CHECK(d.is_outlier(9.0, 2, 3.0));        // z = 4
    CHECK_FALSE(d.is_outlier(0.0, 2, 3.0));  // z = -5
    loco::aggregate::edit::state s;
    s.detectors = {d, d};
    auto g = from_rows({{0.0f}, {1.0f}});
    g.reports[1].norm = 5.0f;
    loco::aggregate::edit::hyper h;
    h.ewma_warmup = 2;
    h.ewma_threshold = 3.0f;
    h.consensus = loco::aggregate::sign_consensus::none;
    const auto w = loco::aggregate::edit::weights(h, s, g.view());
    const double w1 = std::exp(-5.0) / (1.0 + std::exp(-5.0));
    CHECK(w[0] == doctest::Approx(1.0 - w1).epsilon(1e-12));
    CHECK(w[1] == doctest::Approx(w1).epsilon(1e-12));
}

// sigma = sqrt(M2) only from count 2 on (atorch: 0 before): after one norm M2 is already
// (1 - alpha) alpha v^2 > 0, but no z-score is taken from it, even where the warm-up (0 or 1)
// lets the detector judge that early.
TEST_CASE("edit: the detector's sigma is 0 until it has learnt two norms") {
    loco::aggregate::ewma_detector d;
    d.update(1.0, 0.5, 1);
    CHECK(d.count == 1);
    CHECK(d.m2 == 0.125);
    CHECK(d.sigma() == 0.0);
    CHECK(d.window == std::vector<double>{0.0});  // the z-score of 1 after its update
    CHECK(d.z(10.0, 0) == 0.0);
    CHECK_FALSE(d.is_outlier(10.0, 0, 3.0));
    d.update(2.0, 0.5, 1);
    CHECK(d.sigma() == doctest::Approx(std::sqrt(0.34375)).epsilon(1e-15));
    CHECK(d.z(10.0, 0) == doctest::Approx((10.0 - 1.25) / std::sqrt(0.34375)).epsilon(1e-14));
}

TEST_CASE("edit: a refused step_weights round leaves the fragment-scope detectors as they were") {
    loco::aggregate::edit::hyper h;
    h.step_weights = true;
    gathered g = from_rows({{1.0f}, {2.0f}, {3.0f}});
    for (auto& r : g.reports) r.inner_steps = 0.0f;
    loco::aggregate::edit::state s;
    std::vector<float> out(1, 7.0f);
    CHECK_THROWS_AS(loco::aggregate::edit::combine(h, s, g.view(), out), loco::invalid_argument);
    CHECK(s.detectors.empty());
    CHECK(out[0] == 7.0f);
}

// A-EDiT's step shares take each worker's reported step count, but an infinite one made every
// weight NaN (the sync dropped as non-finite on every rank, blaming the model), and a NaN or
// negative one counted as 0 steps while the worker kept its softmax weight. Such a worker is an
// outlier, as for a bad norm; the others' weights are the rule over the inliers, in double here.
TEST_CASE("edit: with step_weights a step count that is not finite, or negative, is an outlier") {
    auto g = from_rows({{1.0f, 2.0f}, {2.0f, -1.0f}, {0.5f, 0.5f}, {3.0f, 1.0f}});
    const std::array<float, 4> steps = {10.0f, 30.0f, 20.0f, 40.0f};
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    h.consensus = loco::aggregate::sign_consensus::none;
    h.step_weights = true;
    h.step_weight_ratio = 0.5f;
    // The rule over workers 0 .. 2 (worker 3 left out), in double.
    const auto expected = [&](const std::vector<bool>& in) {
        std::vector<double> w(4, 0.0);
        double lowest = std::numeric_limits<double>::infinity(), total = 0.0, total_steps = 0.0;
        for (std::size_t i = 0; i < 4; ++i) {
            if (in[i]) lowest = std::min(lowest, double(g.reports[i].norm));
        }
        for (std::size_t i = 0; i < 4; ++i) {
            if (!in[i]) continue;
            total += w[i] = std::exp(-(double(g.reports[i].norm) - lowest));
            total_steps += g.reports[i].inner_steps;
        }
        for (std::size_t i = 0; i < 4; ++i) {
            if (in[i]) w[i] = 0.5 * w[i] / total + 0.5 * g.reports[i].inner_steps / total_steps;
        }
        return w;
    };
    const float inf = std::numeric_limits<float>::infinity();
    for (const float bad : {inf, -inf, std::numeric_limits<float>::quiet_NaN(), -3.0f, -0.5f}) {
        CAPTURE(bad);
        for (std::size_t i = 0; i < 4; ++i) g.reports[i].inner_steps = steps[i];
        g.reports[3].inner_steps = bad;
        loco::aggregate::edit::state s;
        const auto w = loco::aggregate::edit::weights(h, s, g.view());
        REQUIRE(w.size() == 4);
        const auto want = expected({true, true, true, false});
        for (std::size_t i = 0; i < 4; ++i) CHECK(w[i] == doctest::Approx(want[i]).epsilon(1e-12));
        // The aggregate is the inliers' weighted sum: finite, the round applied.
        std::vector<float> out(2);
        REQUIRE(loco::aggregate::edit::combine(h, s, g.view(), out));
        for (std::size_t j = 0; j < 2; ++j) {
            double agg = 0.0;
            for (std::size_t i = 0; i < 3; ++i) agg += want[i] * g.deltas[i * 2 + j];
            CHECK(out[j] == doctest::Approx(agg).epsilon(1e-6));
        }
        // Without step weights the count is not read: the worker keeps its weight.
        h.step_weights = false;
        CHECK(loco::aggregate::edit::weights(h, s, g.view())[3] > 0.0);
        h.step_weights = true;
    }
    // A finite count is taken on trust, as in the paper (docs/aggregation.md): an inflated one
    // buys the worker nearly all of the share r, and nothing here can tell it from a fast worker.
    for (std::size_t i = 0; i < 4; ++i) g.reports[i].inner_steps = steps[i];
    g.reports[3].inner_steps = 1e30f;
    loco::aggregate::edit::state s;
    const auto w = loco::aggregate::edit::weights(h, s, g.view());
    const auto want = expected({true, true, true, true});
    for (std::size_t i = 0; i < 4; ++i) CHECK(w[i] == doctest::Approx(want[i]).epsilon(1e-12));
    CHECK(w[3] > 0.5);
}

// aggregate_hyper() may lower ewma_warmup mid-run. The window dropped its oldest z-score only
// when it held exactly `warmup`, so a window filled under a larger warm-up grew without bound
// (and with it every checkpoint), and its spread was not that of the last `warmup` z-scores
// (atorch's deque(maxlen=warmup)). The window against the z-scores recomputed in double.
TEST_CASE("edit: lowering ewma_warmup keeps the detector's window to the last warmup z-scores") {
    // A window longer than the warm-up (one kept under a larger one, before an update trims it)
    // spreads over its last `warmup` z-scores only: {0, 0.5, 1} has the unbiased std 0.5, so the
    // threshold is 1 * max(1, 0.5) = 1 and a z-score of 2 is an outlier; the whole window's
    // spread (about 42) let it through.
    loco::aggregate::ewma_detector long_window;
    long_window.count = 10;
    long_window.m2 = 1.0;  // sigma 1, mean 0: z(v) = v
    long_window.window = {60.0, -60.0, 0.0, 0.5, 1.0};
    CHECK(long_window.is_outlier(2.0, 3, 1.0));
    CHECK_FALSE(long_window.is_outlier(2.0, 5, 1.0));
    long_window.update(1.0, 0.5, 3);
    CHECK(long_window.window.size() == 3);
    CHECK(long_window.window[0] == 0.5);
    CHECK(long_window.window[1] == 1.0);

    loco::aggregate::edit::hyper h;
    h.ewma_alpha = 0.25f;
    h.ewma_warmup = 10;
    h.ewma_threshold = 1e30f;  // nothing flagged: every norm is learnt
    h.consensus = loco::aggregate::sign_consensus::none;
    loco::aggregate::edit::state s;
    // The detector of algorithms.md 5.2, in double, every z-score kept.
    double mean = 0.0, m2 = 0.0;
    std::uint64_t count = 0;
    std::vector<double> z;
    for (int k = 0; k < 60; ++k) {
        const std::uint64_t warmup = k < 20 ? 10 : (k < 40 ? 3 : 1);
        h.ewma_warmup = warmup;
        const float norm = 1.0f + 0.25f * float((k * 7) % 5);  // exact in fp32
        gathered g = from_rows({{1.0f}, {1.0f}});
        g.reports[0].norm = norm;
        std::vector<float> out(1);
        REQUIRE(loco::aggregate::combine<loco::aggregate::edit>(h, s, g.view(), out));
        ++count;
        const double d = norm - mean;
        mean += 0.25 * d;
        m2 = 0.75 * (m2 + 0.25 * d * (norm - mean));
        const double sigma = count >= 2 ? std::sqrt(m2) : 0.0;
        z.push_back(sigma == 0.0 || count < warmup ? 0.0 : (norm - mean) / sigma);
        const auto& window = s.detectors[0].window;
        CAPTURE(k);
        REQUIRE(window.size() == std::min<std::size_t>(z.size(), warmup));
        for (std::size_t j = 0; j < window.size(); ++j) {
            CHECK(window[j] == doctest::Approx(z[z.size() - window.size() + j]).epsilon(1e-12));
        }
    }
    // Down to no window at all.
    h.ewma_warmup = 0;
    gathered g = from_rows({{1.0f}, {1.0f}});
    std::vector<float> out(1);
    REQUIRE(loco::aggregate::combine<loco::aggregate::edit>(h, s, g.view(), out));
    CHECK(s.detectors[0].window.empty());
}

TEST_CASE("T8: median, trimmed mean and centered clipping with one attacker") {
    const auto g = from_rows({{0.5f, -1.0f, 2.0f, 0.0f},
                              {0.7f, -0.8f, 1.6f, 0.2f},
                              {0.3f, -1.3f, 2.5f, -0.3f},
                              {0.65f, -0.9f, 1.7f, 0.1f},
                              {50.0f, 100.0f, -200.0f, 10.0f}});
    const auto check = [](const std::vector<float>& got, std::array<double, 4> want) {
        for (std::size_t j = 0; j < 4; ++j) CHECK(got[j] == doctest::Approx(want[j]).epsilon(2e-6));
    };
    std::vector<float> out(4);
    loco::aggregate::mean::combine({}, g.view(), out);
    check(out, {10.43, 19.2, -38.44, 2.0});
    REQUIRE(loco::aggregate::median::combine({}, g.view(), out));
    check(out, {0.65, -0.9, 1.7, 0.1});
    REQUIRE(loco::aggregate::trimmed_mean::combine({.trim = 1}, g.view(), out));
    check(out, {0.616667, -0.9, 1.766667, 0.1});
    using cc = loco::aggregate::centered_clip;
    {
        cc::state s;
        REQUIRE(cc::combine({.tau = 1.0f, .iterations = 1}, s, g.view(), out));
        check(out, {0.24474, -0.262715, 0.508574, 0.018214});
        CHECK(s.center == out);  // the next round starts from this aggregate
    }
    {
        cc::state s;
        REQUIRE(cc::combine({.tau = 1.0f, .iterations = 3}, s, g.view(), out));
        check(out, {0.57465, -0.746251, 1.451437, 0.044289});
    }
    {
        cc::state s{{0.5f, -1.0f, 2.0f, 0.0f}};
        REQUIRE(cc::combine({.tau = 0.5f, .iterations = 1}, s, g.view(), out));
        check(out, {0.560013, -0.942319, 1.850052, 0.018358});
    }
}

TEST_CASE("robust policies against a double-precision re-computation on fresh random deltas") {
    auto rng = loco_test::rng_for("robust policies random");
    for (const std::size_t m : {3u, 4u, 7u, 8u}) {
        std::vector<std::vector<float>> rows;
        for (std::size_t k = 0; k < m; ++k) rows.push_back(loco_test::normal_floats(rng, 9));
        const auto g = from_rows(rows);
        std::vector<float> med(9), trim(9);
        REQUIRE(loco::aggregate::median::combine({}, g.view(), med));
        REQUIRE(loco::aggregate::trimmed_mean::combine({.trim = 1}, g.view(), trim));
        for (std::size_t j = 0; j < 9; ++j) {
            std::vector<double> v;
            for (std::size_t k = 0; k < m; ++k) v.push_back(rows[k][j]);
            std::sort(v.begin(), v.end());
            const double want_med = m % 2 ? v[m / 2] : (v[m / 2 - 1] + v[m / 2]) / 2;
            double s = 0.0;
            for (std::size_t k = 1; k + 1 < m; ++k) s += v[k];
            CHECK(med[j] == doctest::Approx(want_med).epsilon(1e-6));
            CHECK(trim[j] == doctest::Approx(s / double(m - 2)).epsilon(1e-6));
        }
    }
}

TEST_CASE("robust policies leave out NaN and Inf workers, mean does not") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    const auto g = from_rows({{1.0f, 2.0f}, {1.2f, 2.2f}, {0.8f, 1.8f}, {nan, 5.0f}, {3.0f, -inf}});
    std::vector<float> out(2);
    REQUIRE(loco::aggregate::median::combine({}, g.view(), out));
    CHECK(out == std::vector<float>{1.0f, 2.0f});
    // Two workers left out, b = 1: they are the bad ones the trim is for, so the three finite
    // values are averaged untrimmed.
    REQUIRE(loco::aggregate::trimmed_mean::combine({.trim = 1}, g.view(), out));
    CHECK(out[0] == doctest::Approx((0.8 + 1.0 + 1.2) / 3.0).epsilon(1e-6));
    CHECK(out[1] == doctest::Approx((1.8 + 2.0 + 2.2) / 3.0).epsilon(1e-6));
    loco::aggregate::centered_clip::state s;
    REQUIRE(loco::aggregate::centered_clip::combine({.tau = 100.0f}, s, g.view(), out));
    CHECK(out[0] == doctest::Approx(3.0 / 5.0));  // the dropped workers count as agreeing with v = 0
    loco::aggregate::edit::hyper h;
    h.skip_anomaly = false;
    loco::aggregate::edit::state es;
    const auto w = loco::aggregate::edit::weights(h, es, g.view());
    CHECK(w[3] == 0.0);
    CHECK(w[4] == 0.0);
    loco::aggregate::mean::combine({}, g.view(), out);
    CHECK(std::isnan(out[0]));

    // One usable worker: it is the aggregate; none: refused, not an error.
    const auto one_left = from_rows({{nan}, {inf}, {1.0f}});
    std::vector<float> one(1);
    REQUIRE(loco::aggregate::trimmed_mean::combine({.trim = 1}, one_left.view(), one));
    CHECK(one[0] == 1.0f);
    one[0] = 0.0f;
    CHECK(loco::aggregate::median::combine({}, one_left.view(), one));
    CHECK(one[0] == 1.0f);
    const auto none_left = from_rows({{nan}, {inf}, {-inf}});
    CHECK_FALSE(loco::aggregate::trimmed_mean::combine({.trim = 1}, none_left.view(), one));
    CHECK_FALSE(loco::aggregate::median::combine({}, none_left.view(), one));
}

// Yin et al.'s trimmed mean tolerates f <= b bad workers with 2b < M. A worker left out for a
// non-finite delta is one of them, so b - k are trimmed at each end of the others: at M = 2b + 1
// with one NaN worker the rounds apply (trimming b again left 2b values, and every round was
// refused). Checked against a double-precision re-computation on fresh random deltas.
TEST_CASE("trimmed_mean: workers left out for NaN count towards b") {
    auto rng = loco_test::rng_for("trimmed left out");
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (const std::size_t b : {std::size_t{1}, std::size_t{2}, std::size_t{3}}) {
        for (std::size_t k = 0; k <= b + 1; ++k) {
            const std::size_t m = 2 * b + 1;
            if (k >= m) continue;
            CAPTURE(b);
            CAPTURE(k);
            std::vector<std::vector<float>> rows;
            for (std::size_t i = 0; i < m; ++i) rows.push_back(loco_test::normal_floats(rng, 6));
            for (std::size_t i = 0; i < k; ++i) rows[(2 * i + 1) % m][i % 6] = nan;  // k workers
            const auto g = from_rows(rows);
            std::vector<float> out(6);
            REQUIRE(loco::aggregate::trimmed_mean::combine({.trim = b}, g.view(), out));
            const std::size_t trim = k < b ? b - k : 0;
            for (std::size_t j = 0; j < 6; ++j) {
                std::vector<double> v;
                for (const auto& r : rows) {
                    bool finite = true;
                    for (const float x : r) finite = finite && std::isfinite(x);
                    if (finite) v.push_back(r[j]);
                }
                REQUIRE(v.size() == m - k);
                std::sort(v.begin(), v.end());
                double sum = 0.0;
                for (std::size_t i = trim; i < v.size() - trim; ++i) sum += v[i];
                CHECK(out[j] == doctest::Approx(sum / double(v.size() - 2 * trim)).epsilon(1e-6));
            }
        }
    }
}

// The rules are public: a caller's contributions of the wrong shape are a shape_error, not a read
// past the end of a span (gta_reduce and edit's weights read them unchecked before).
TEST_CASE("every rule refuses contributions of the wrong shape") {
    const auto g = from_rows({{1.0f, 2.0f}, {1.5f, 2.5f}, {0.5f, 1.5f}});
    std::vector<float> out(2), short_out(1);
    const auto refused = [](auto call) { CHECK_THROWS_AS(call(), loco::shape_error); };
    auto few_deltas = g.view();
    few_deltas.deltas = few_deltas.deltas.first(4);
    auto few_reports = g.view();
    few_reports.reports = few_reports.reports.first(1);
    const loco::compress::segment gap[] = {{.offset = 0, .size = 1, .rows = 1, .cols = 1}};
    auto bad_segments = g.view();
    bad_segments.segments = gap;  // covers 1 of 2 elements
    for (const auto& c : {few_deltas, bad_segments}) {
        refused([&] { loco::aggregate::mean::combine({}, c, out); });
        refused([&] { loco::aggregate::trimmed_mean::combine({}, c, out); });
        refused([&] { loco::aggregate::median::combine({}, c, out); });
        loco::aggregate::centered_clip::state cs;
        refused([&] { loco::aggregate::centered_clip::combine({}, cs, c, out); });
        loco::aggregate::edit::state es;
        refused([&] { loco::aggregate::edit::combine({}, es, c, out); });
    }
    loco::aggregate::edit::state es;
    refused([&] { loco::aggregate::edit::combine({}, es, few_reports, out); });
    refused([&] { loco::aggregate::edit::weights({}, es, few_reports); });
    refused([&] { loco::aggregate::edit::weights({}, es, few_deltas); });
    refused([&] { loco::aggregate::median::combine({}, g.view(), short_out); });
    CHECK(es.detectors.empty());  // nothing learned from a refused call
    const std::vector<double> w{0.5, 0.25, 0.25};
    using loco::aggregate::sign_consensus;
    refused([&] { loco::aggregate::gta_reduce(w, few_deltas.deltas, 2, sign_consensus::sum, out); });
    refused([&] { loco::aggregate::gta_reduce(w, g.deltas, 2, sign_consensus::none, short_out); });
    CHECK_NOTHROW(loco::aggregate::gta_reduce(w, g.deltas, 2, sign_consensus::none, out));
    // The helpers the CUDA backend calls on its own arrays.
    std::vector<loco::aggregate::ewma_detector> detectors(3);
    const std::vector<double> two_norms{1.0, 2.0};
    const std::vector<std::uint8_t> finite(3, 1);
    refused([&] {
        loco::aggregate::edit::weights_of({}, detectors, two_norms, finite, g.view());
    });
    std::vector<float> f;
    refused([&] { loco::aggregate::median_norm_clip::factors({}, g.view(), 1, 3, f); });
    refused([&] { loco::aggregate::median_norm_clip::factors({}, few_deltas, 0, 2, f); });
    CHECK_NOTHROW(loco::aggregate::median_norm_clip::factors({}, g.view(), 0, 2, f));
    CHECK(f.size() == 3);
    CHECK(out[0] == doctest::Approx(0.5 * 1.0 + 0.25 * 1.5 + 0.25 * 0.5));
}

TEST_CASE("robust and EDiT settings: bad values are one-sentence errors") {
    using loco::invalid_argument;
    const auto edit_bad = [](auto change) {
        loco::aggregate::edit::hyper h;
        change(h);
        CHECK_THROWS_AS(loco::aggregate::edit::validate(h), invalid_argument);
    };
    edit_bad([](auto& h) { h.temperature = 0.0f; });
    edit_bad([](auto& h) { h.temperature = -1.0f; });
    edit_bad([](auto& h) { h.ewma_alpha = 0.0f; });
    edit_bad([](auto& h) { h.ewma_alpha = 1.5f; });
    edit_bad([](auto& h) { h.ewma_threshold = 0.0f; });
    edit_bad([](auto& h) { h.clip = 0.0f; });
    edit_bad([](auto& h) { h.clip = std::numeric_limits<float>::quiet_NaN(); });
    edit_bad([](auto& h) { h.step_weight_ratio = 1.5f; });
    CHECK_NOTHROW(loco::aggregate::edit::validate({}));
    CHECK_THROWS_WITH_AS(loco::aggregate::centered_clip::validate({.tau = 0.0f}),
                         doctest::Contains("tau"), invalid_argument);
    CHECK_THROWS_AS(loco::aggregate::centered_clip::validate({.tau = 1.0f, .iterations = 0}),
                    invalid_argument);
    // Each iteration is a pass over every worker's delta on every rank: a wrapped -1 hung every
    // rank's sync. Above max_iterations (100, docs/aggregation.md) it is refused by name, and
    // by combine itself, before any work.
    using cc = loco::aggregate::centered_clip;
    const std::uint64_t limit = 100;  // cc::max_iterations
    CHECK_NOTHROW(cc::validate({.tau = 1.0f, .iterations = limit}));
    for (const std::uint64_t bad : {limit + 1, std::uint64_t{1} << 32,
                                    std::numeric_limits<std::uint64_t>::max()}) {
        const std::string says = "iterations (L) must be in [1, 100], got " + std::to_string(bad);
        CHECK_THROWS_WITH_AS(cc::validate({.tau = 1.0f, .iterations = bad}),
                             doctest::Contains(says.c_str()), invalid_argument);
    }
    {
        const auto rows = from_rows({{1.0f, 0.0f}, {0.0f, 1.0f}, {1.0f, 1.0f}});
        cc::state s;
        std::vector<float> v(2, 7.0f);
        CHECK_THROWS_AS(cc::combine({.tau = 1.0f, .iterations = limit + 1}, s, rows.view(), v),
                        invalid_argument);
        CHECK(v == std::vector<float>{7.0f, 7.0f});
        CHECK(s.center.empty());
        // At the limit: every worker within tau of v moves v to the workers' mean in one
        // iteration (v + (1/M) sum (Delta_i - v)), and further iterations keep it there.
        REQUIRE(cc::combine({.tau = 10.0f, .iterations = limit}, s, rows.view(), v));
        CHECK(v[0] == doctest::Approx(2.0 / 3.0).epsilon(1e-6));
        CHECK(v[1] == doctest::Approx(2.0 / 3.0).epsilon(1e-6));
    }
    const auto g = from_rows({{1.0f}, {2.0f}, {3.0f}, {4.0f}});
    std::vector<float> out(1);
    CHECK_THROWS_WITH_AS(loco::aggregate::trimmed_mean::combine({.trim = 2}, g.view(), out),
                         doctest::Contains("2b < M"), invalid_argument);
    // b so large that 2b wraps around to 0 or 2 in 64 bits: refused all the same, out untouched.
    out[0] = 7.0f;
    for (const std::uint64_t huge : {std::uint64_t{1} << 63, (std::uint64_t{1} << 63) + 1,
                                     std::numeric_limits<std::uint64_t>::max()}) {
        CHECK_THROWS_WITH_AS(
            loco::aggregate::trimmed_mean::combine({.trim = huge}, g.view(), out),
            doctest::Contains("2b < M"), invalid_argument);
    }
    CHECK(out[0] == 7.0f);
}

// aggregate_hyper() may change between steps like the other settings, and is checked again at
// every sync: a bad value set mid-run fails that sync at the apply stage on every rank (nothing
// applied), where it used to be combined silently (a negative EDiT temperature favouring the
// largest norm, centered clipping with no iteration re-applying the last aggregate).
template <class A, class Bad>
void refuses_bad_setting_mid_run(Bad set_bad, const char* says) {
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::every, A>;
    loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
        const int r = comm.rank();
        std::vector<float> x(2, 0.0f), g(2);
        loco::parameter_list list;
        list.add("x", x, g);
        opt_t opt(list, comm, {.inner = {.lr = 1.0f}, .outer = {.lr = 1.0f},
                               .schedule = {.every = 1}});
        opt.start();
        std::fill(g.begin(), g.end(), static_cast<float>(r + 1));
        opt.step();
        REQUIRE(opt.outer_steps() == 1);
        const std::vector<float> global(opt.global().begin(), opt.global().end());
        const auto good = opt.aggregate_hyper();
        set_bad(opt.aggregate_hyper());
        CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains(says), loco::invalid_argument);
        CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == global);
        for (std::size_t i = 0; i < x.size(); ++i) {  // the inner step only: no outer step, no merge
            CHECK(x[i] == global[i] - static_cast<float>(r + 1));
        }
        CHECK(opt.outer_steps() == 1);
        opt.aggregate_hyper() = good;
        opt.step();
        CHECK(opt.outer_steps() == 2);
    });
}

// Refusals in a row raise after max_skipped_syncs with the policy's own reason: the message used
// to say "every worker an outlier" (EDiT's) whatever the policy.
TEST_CASE("refusals that stall a run name the policy's reason") {
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::every, loco::aggregate::trimmed_mean>;
    loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
        std::vector<float> x(2, 0.0f), g(2, std::numeric_limits<float>::quiet_NaN());
        loco::parameter_list list;
        list.add("x", x, g);
        opt_t::config cfg{.inner = {.lr = 1.0f}, .schedule = {.every = 1},
                          .max_skipped_syncs = 2};
        cfg.on_nonfinite = loco::nonfinite_policy::ignore;  // every worker's delta NaN
        opt_t opt(list, comm, cfg);
        opt.start();
        opt.step();
        opt.step();
        CHECK(opt.skipped_syncs() == 2);
        CHECK_THROWS_WITH_AS(opt.step(),
                             doctest::Contains("refused by the aggregation (trimmed_mean: no "
                                               "worker's delta was finite)"),
                             loco::error);
    });
}

TEST_CASE("aggregation settings changed mid-run are validated at the next sync, on every rank") {
    using loco::aggregate::edit;
    using loco::aggregate::centered_clip;
    refuses_bad_setting_mid_run<edit>([](edit::hyper& h) { h.temperature = -1.0f; },
                                      "temperature (T) must be");
    refuses_bad_setting_mid_run<edit>(
        [](edit::hyper& h) {
            h.step_weights = true;
            h.step_weight_ratio = 5.0f;
        },
        "step_weight_ratio (r) must be");
    refuses_bad_setting_mid_run<centered_clip>([](centered_clip::hyper& h) { h.tau = -0.5f; },
                                               "tau must be");
    refuses_bad_setting_mid_run<centered_clip>([](centered_clip::hyper& h) { h.iterations = 0; },
                                               "iterations (L) must be");
}

// A worker whose model went NaN is left out by a robust rule; with error feedback its own
// residual goes non-finite too. The round still applies on every rank (the aggregate is finite),
// and the faulty worker keeps its residual as it was instead of a NaN one that would exclude it
// for good (before, its vote dropped every round until training stalled).
TEST_CASE("a faulty worker under trimmed_mean with error feedback: the rounds apply, its residual "
          "stays finite") {
    using ef = loco::compress::error_feedback<loco::compress::blockwise<8, 64>>;
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, ef, loco::schedule::every,
                               loco::aggregate::trimmed_mean>;
    constexpr int m = 5;
    std::array<std::vector<float>, m> globals;
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        auto rng = loco_test::rng_for("faulty ef worker " + std::to_string(comm.rank()));
        std::vector<float> x(64, 1.0f), g(64);
        loco::parameter_list list;
        list.add("x", x, g);
        opt_t::config cfg{.inner = {.lr = 0.1f}, .outer = {.lr = 1.0f}, .schedule = {.every = 2}};
        cfg.aggregate.trim = 1;
        opt_t opt(list, comm, cfg);
        for (int c = 1; c <= 20; ++c) {
            loco_test::fill_normal(rng, g, 0.5f);
            if (comm.rank() == 0 && c % 2 == 0) {  // faulty at every sync
                std::fill(x.begin(), x.end(), std::numeric_limits<float>::quiet_NaN());
            }
            opt.step();
        }
        CHECK(opt.outer_steps() == 10);
        CHECK(opt.skipped_syncs() == 0);
        for (const float e : opt.compressor_state()) REQUIRE(std::isfinite(e));
        globals[std::size_t(comm.rank())].assign(opt.global().begin(), opt.global().end());
    });
    for (int r = 1; r < m; ++r) CHECK(globals[std::size_t(r)] == globals[0]);
    for (const float v : globals[0]) REQUIRE(std::isfinite(v));
}

TEST_CASE("diloco with a robust policy: bytes of an all-gather, refused rounds, state in the checkpoint") {
    constexpr int m = 4;
    constexpr std::size_t n = 5;
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                               loco::schedule::every, loco::aggregate::centered_clip>;
    auto rng = loco_test::rng_for("robust diloco checkpoint");
    std::vector<std::vector<float>> grads;
    for (int i = 0; i < 12 * m; ++i) grads.push_back(loco_test::normal_floats(rng, n));
    const auto init = loco_test::normal_floats(rng, n);
    const opt_t::config cfg{.inner = {.lr = 0.1f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                            .schedule = {.every = 2}, .aggregate = {.tau = 0.3f}};

    std::array<std::vector<float>, m> straight, resumed;
    std::array<std::uint64_t, m> bytes{};
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        std::vector<float> w = init, g(n);
        loco::parameter_list list;
        list.add("w", w, g);
        opt_t opt(list, comm, cfg);
        std::stringstream saved;
        std::vector<float> w_at_save;
        for (int c = 0; c < 12; ++c) {
            g = grads[std::size_t(c * m) + r];
            opt.step();
            if (c == 5) {
                opt.save(saved);
                w_at_save = w;
            }
        }
        straight[r] = w;
        bytes[r] = opt.bytes_per_sync();
        // Resume at call 6 in a fresh handle: the center v must come back, or the result differs.
        std::vector<float> w2 = w_at_save, g2(n);
        loco::parameter_list list2;
        list2.add("w", w2, g2);
        opt_t again(list2, comm, cfg);
        again.load(saved);
        for (int c = 6; c < 12; ++c) {
            g2 = grads[std::size_t(c * m) + r];
            again.step();
        }
        resumed[r] = w2;
    });
    for (int r = 0; r < m; ++r) {
        CHECK(resumed[r] == straight[r]);
        // An all-gather of fp32 payloads, (M - 1) * (header + 4n), plus the one-float agreement
        // (4 or 12 bytes at M = 4, by the rank's chunk of the ring).
        const std::uint64_t payload = loco::compress::wire::header_bytes + 4 * n;
        CHECK((bytes[r] == (m - 1) * payload + 4 || bytes[r] == (m - 1) * payload + 12));
    }

    SUBCASE("a refused round applies nothing and resets the local values") {
        using edit_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                    loco::schedule::every, loco::aggregate::edit>;
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            std::vector<float> w(n, 1.0f), g(n, 0.5f);
            loco::parameter_list list;
            list.add("w", w, g);
            edit_t opt(list, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 1},
                                    .aggregate = {.ewma_alpha = 0.5f, .ewma_warmup = 2}});
            for (int c = 0; c < 3; ++c) opt.step();
            CHECK(opt.outer_steps() == 3);
            const std::vector<float> global(opt.global().begin(), opt.global().end());
            g.assign(n, 500.0f);  // every worker's norm jumps: all outliers
            opt.step();
            CHECK(opt.outer_steps() == 3);
            CHECK(opt.skipped_syncs() == 1);
            CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == global);
            CHECK(w == global);
        });
    }

    SUBCASE("a refused round leaves the error-feedback residual: no worker applied what it sent") {
        using ef = loco::compress::error_feedback<loco::compress::blockwise<2, 64>>;
        using edit_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, ef,
                                    loco::schedule::every, loco::aggregate::edit>;
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            auto wrng = loco_test::rng_for("refused residual " + std::to_string(comm.rank()));
            std::vector<float> w = loco_test::normal_floats(wrng, 64), g(64);
            loco::parameter_list list;
            list.add("w", w, g);
            edit_t opt(list, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 1},
                                    .aggregate = {.ewma_alpha = 0.5f, .ewma_warmup = 2}});
            for (int c = 0; c < 3; ++c) {
                loco_test::fill_normal(wrng, g, 0.5f);
                opt.step();
            }
            REQUIRE(opt.outer_steps() == 3);
            const std::vector<float> residual(opt.compressor_state().begin(),
                                              opt.compressor_state().end());
            g.assign(64, 500.0f);  // every worker's norm jumps: all outliers
            opt.step();
            CHECK(opt.skipped_syncs() == 1);
            CHECK(std::vector<float>(opt.compressor_state().begin(),
                                     opt.compressor_state().end()) == residual);
        });
    }
}

namespace {

using loco_test::changed;
using loco_test::member_count;

loco::aggregate::sign_consensus changed(loco::aggregate::sign_consensus c) {
    using loco::aggregate::sign_consensus;
    return c == sign_consensus::sum ? sign_consensus::count : sign_consensus::sum;
}
loco::aggregate::edit_scope changed(loco::aggregate::edit_scope s) {
    using loco::aggregate::edit_scope;
    return s == edit_scope::fragment ? edit_scope::tensor : edit_scope::fragment;
}

template <class H, class M>
H with_changed(M H::*member) {
    H h{};
    h.*member = changed(h.*member);
    return h;
}

// The default settings of aggregation A with one member changed, for each member in turn.
template <class A>
std::vector<typename A::hyper> one_setting_changed() {
    using H = typename A::hyper;
    using namespace loco::aggregate;
    if constexpr (std::is_empty_v<H>) {
        return {};
    } else if constexpr (std::is_same_v<A, trimmed_mean>) {
        return {with_changed(&H::trim)};
    } else if constexpr (std::is_same_v<A, centered_clip>) {
        return {with_changed(&H::tau), with_changed(&H::iterations)};
    } else if constexpr (std::is_same_v<A, median_norm_clip>) {
        return {with_changed(&H::epsilon), with_changed(&H::clip)};
    } else {
        static_assert(std::is_same_v<A, edit>);
        return {with_changed(&H::weight_by_norm), with_changed(&H::temperature),
                with_changed(&H::skip_anomaly),   with_changed(&H::ewma_alpha),
                with_changed(&H::ewma_warmup),    with_changed(&H::ewma_threshold),
                with_changed(&H::consensus),      with_changed(&H::clip),
                with_changed(&H::step_weights),   with_changed(&H::step_weight_ratio),
                with_changed(&H::scope)};
    }
}

}  // namespace

// start() compares the aggregation's describe() between the ranks (and checkpoints record it): a
// member it leaves out lets ranks that combine differently run together without a word.
TEST_CASE_TEMPLATE("every aggregation setting is in describe() and ranks that differ in any one "
                   "are refused at start()",
                   A, loco::aggregate::mean, loco::aggregate::median,
                   loco::aggregate::scatter_mean, loco::aggregate::trimmed_mean,
                   loco::aggregate::centered_clip, loco::aggregate::median_norm_clip,
                   loco::aggregate::edit) {
    using H = typename A::hyper;
    const auto variants = one_setting_changed<A>();
    REQUIRE(variants.size() == member_count<H>());  // a new member needs its entry above
    const std::string base = loco::detail::describe_policy<A>(H{});  // what start() compares
    std::set<std::string> seen{base};
    for (std::size_t j = 0; j < variants.size(); ++j) {
        CAPTURE(j);
        const std::string text = loco::detail::describe_policy<A>(variants[j]);
        CAPTURE(text);
        CHECK(seen.insert(text).second);  // differs from the default and from every other change
        if constexpr (!std::is_empty_v<H>) {
            using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                       loco::schedule::every, A>;
            const auto errors = loco_test::start_errors<opt_t>([&](int r) {
                typename opt_t::config cfg{};
                cfg.aggregate = r == 1 ? variants[j] : H{};
                return cfg;
            });
            const std::string want =
                "rank 0 has 'aggregate: " + base + "' where rank 1 has 'aggregate: " + text + "'";
            for (const auto& e : errors) CHECK_MESSAGE(e.find(want) != std::string::npos, e);
        }
    }
}

// docs/aggregation.md: T > 0, ewma_alpha in (0, 1], ewma_threshold > 0, phi > 0 (infinity: no
// clip), r in [0, 1]; each boundary value is taken and the next float past it refused.
TEST_CASE("edit: the documented ranges of its settings are taken up to their boundaries") {
    using loco::aggregate::edit;
    const float tiny = std::numeric_limits<float>::denorm_min();
    const float inf = std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float above_one = std::nextafter(1.0f, 2.0f);
    const float below_zero = -tiny;
    const auto with = [](auto change) {
        edit::hyper h;
        change(h);
        return h;
    };
    const std::vector<edit::hyper> taken = {
        with([&](edit::hyper& h) { h.temperature = tiny; }),
        with([&](edit::hyper& h) { h.ewma_alpha = 1.0f; }),
        with([&](edit::hyper& h) { h.ewma_alpha = tiny; }),
        with([&](edit::hyper& h) { h.ewma_threshold = tiny; }),
        with([&](edit::hyper& h) { h.clip = tiny; }),
        with([&](edit::hyper& h) { h.clip = inf; }),
        with([&](edit::hyper& h) { h.step_weight_ratio = 0.0f; }),
        with([&](edit::hyper& h) { h.step_weight_ratio = 1.0f; }),
    };
    for (std::size_t i = 0; i < taken.size(); ++i) {
        CAPTURE(i);
        CHECK_NOTHROW(edit::validate(taken[i]));
    }
    const std::vector<std::pair<edit::hyper, const char*>> refused = {
        {with([&](edit::hyper& h) { h.temperature = 0.0f; }), "temperature (T) must be"},
        {with([&](edit::hyper& h) { h.temperature = inf; }), "temperature (T) must be"},
        {with([&](edit::hyper& h) { h.ewma_alpha = 0.0f; }), "ewma_alpha must be in (0, 1]"},
        {with([&](edit::hyper& h) { h.ewma_alpha = above_one; }), "ewma_alpha must be in (0, 1]"},
        {with([&](edit::hyper& h) { h.ewma_alpha = nan; }), "ewma_alpha must be in (0, 1]"},
        {with([&](edit::hyper& h) { h.ewma_threshold = 0.0f; }), "ewma_threshold must be"},
        {with([&](edit::hyper& h) { h.ewma_threshold = inf; }), "ewma_threshold must be"},
        {with([&](edit::hyper& h) { h.clip = 0.0f; }), "clip (phi) must be > 0"},
        {with([&](edit::hyper& h) { h.clip = -inf; }), "clip (phi) must be > 0"},
        {with([&](edit::hyper& h) { h.step_weight_ratio = below_zero; }),
         "step_weight_ratio (r) must be in [0, 1]"},
        {with([&](edit::hyper& h) { h.step_weight_ratio = above_one; }),
         "step_weight_ratio (r) must be in [0, 1]"},
    };
    for (std::size_t i = 0; i < refused.size(); ++i) {
        CAPTURE(i);
        CHECK_THROWS_WITH_AS(edit::validate(refused[i].first),
                             doctest::Contains(refused[i].second), loco::invalid_argument);
    }
    // ewma_alpha = 1 in a handle: the detector's mean is the last norm and its spread 0, so it
    // flags nothing and every round of two workers applies.
    using edit_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                loco::schedule::every, edit>;
    std::array<std::uint64_t, 2> applied{};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        auto rng = loco_test::rng_for("edit alpha one " + std::to_string(comm.rank()));
        std::vector<float> x(8, 0.0f), g(8);
        loco::parameter_list list;
        list.add("x", x, g);
        edit_t opt(list, comm, {.schedule = {.every = 1},
                                .aggregate = {.ewma_alpha = 1.0f, .ewma_warmup = 2}});
        for (int c = 0; c < 6; ++c) {
            loco_test::fill_normal(rng, g, c == 5 ? 1000.0f : 1.0f);  // a jump at the end too
            opt.step();
        }
        applied[static_cast<std::size_t>(comm.rank())] = opt.outer_steps();
    });
    CHECK(applied == std::array<std::uint64_t, 2>{6, 6});
}

// mean::combine promises the exchange's rounding: the deltas summed in rank order in fp32, then
// divided by M (a multiplication by 1 / M rounds differently for M = 3).
TEST_CASE("mean: combine is the rank-order fp32 sum divided by M, bit for bit as the exchange") {
    constexpr std::size_t m = 3, n = 2048;
    auto rng = loco_test::rng_for("mean rounding");
    std::vector<std::vector<float>> rows;
    for (std::size_t k = 0; k < m; ++k) rows.push_back(loco_test::normal_floats(rng, n));
    const auto g = from_rows(rows);
    std::vector<float> out(n);
    loco::aggregate::mean::combine({}, g.view(), out);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < n; ++i) {
        float sum = 0.0f;
        for (std::size_t k = 0; k < m; ++k) sum += rows[k][i];
        differ += std::bit_cast<std::uint32_t>(out[i]) !=
                  std::bit_cast<std::uint32_t>(sum / static_cast<float>(m));
    }
    CHECK(differ == 0);
    // The exchange's own mean of the gathered payloads: inner SGD lr 1 from 0 makes each worker's
    // pseudo-gradient its gradient exactly, and outer SGD lr 1 puts -(mean) in the parameters.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd>;
    std::array<std::vector<float>, m> after;
    loco::comm::run_threads(static_cast<int>(m), [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        std::vector<float> x(n, 0.0f), grad = rows[r];
        loco::parameter_list list;
        list.add("x", x, grad);
        opt_t opt(list, comm, {.inner = {.lr = 1.0f}, .outer = {.lr = 1.0f},
                               .schedule = {.every = 1},
                               .exchange = loco::exchange_scheme::all_gather});
        opt.step();
        after[r] = x;
    });
    std::size_t differ_exchange = 0;
    for (std::size_t i = 0; i < n; ++i) differ_exchange += after[0][i] != -out[i];
    CHECK(differ_exchange == 0);
    CHECK(after[1] == after[0]);
    CHECK(after[2] == after[0]);
}
