// EDiT per tensor (aggregate::edit with scope = edit_scope::tensor): each tensor of a fragment
// gets its own norms, softmax weights, GTA reduction and anomaly detectors, checked against a
// double-precision re-computation on fresh random deltas; a worker that is off on one tensor
// loses its weight on that tensor only (per fragment it loses it everywhere); a tensor on which
// every worker is an outlier refuses the round and leaves the detectors as they were; the
// setting's description and validation; the detectors' state (M2 and the z-score window
// included) through a checkpoint, and a run with anomaly rejection resumed from one.

#include <doctest/doctest.h>

#include <loco/aggregate/edit.hpp>
#include <loco/comm/threads.hpp>
#include <loco/compress/none.hpp>
#include <loco/diloco.hpp>
#include <loco/error.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/schedule/every.hpp>

#include "support/random.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

using loco::aggregate::contributions;
using loco::aggregate::edit;
using loco::aggregate::worker_report;
using loco::compress::segment;

struct round_data {
    std::size_t workers = 0, elements = 0;
    std::vector<float> deltas;  // workers x elements
    std::vector<worker_report> reports;
    std::vector<segment> segments;

    contributions view() const {
        contributions c;
        c.workers = workers;
        c.elements = elements;
        c.reports = reports;
        c.deltas = deltas;
        c.segments = segments;
        return c;
    }
};

// Three tensors of 7, 12 and 5 elements; worker i's values on tensor t scaled by scale(i, t), so
// the per-tensor norms differ from worker to worker and from tensor to tensor. With unit, each
// worker's tensor is a random direction of norm scale(i, t) exactly.
round_data make_round(std::mt19937_64& rng, std::size_t workers,
                      const std::vector<std::vector<double>>& scale, bool unit = false) {
    round_data r;
    r.workers = workers;
    const std::size_t sizes[] = {7, 12, 5};
    for (const std::size_t n : sizes) {
        r.segments.push_back({.offset = r.elements, .size = n, .rows = 1, .cols = n});
        r.elements += n;
    }
    for (std::size_t i = 0; i < workers; ++i) {
        double sq = 0.0;
        for (std::size_t t = 0; t < r.segments.size(); ++t) {
            const auto values = loco_test::normal_floats(rng, r.segments[t].size);
            double n = 1.0;
            if (unit) {
                n = 0.0;
                for (const float x : values) n += double(x) * x;
                n = std::sqrt(n);
            }
            for (const float x : values) {
                const float v = static_cast<float>(x / n * scale[i][t]);
                r.deltas.push_back(v);
                sq += double(v) * v;
            }
        }
        r.reports.push_back({static_cast<float>(std::sqrt(sq)), 10.0f});
    }
    return r;
}

// The per-tensor rule without detectors, in double: weights softmax(-G / T) over the workers of
// each tensor, GTA "sum" consensus per element, then the clip over the whole fragment.
std::vector<double> reference(const round_data& r, double temperature, double clip) {
    std::vector<double> out(r.elements, 0.0);
    for (const segment& s : r.segments) {
        std::vector<double> g(r.workers), w(r.workers);
        for (std::size_t i = 0; i < r.workers; ++i) {
            double sq = 0.0;
            for (std::size_t j = 0; j < s.size; ++j) {
                const double x = r.deltas[i * r.elements + s.offset + j];
                sq += x * x;
            }
            g[i] = std::sqrt(sq);
        }
        double total = 0.0;
        for (std::size_t i = 0; i < r.workers; ++i) total += w[i] = std::exp(-g[i] / temperature);
        for (auto& x : w) x /= total;
        for (std::size_t j = 0; j < s.size; ++j) {
            double vote = 0.0;
            for (std::size_t i = 0; i < r.workers; ++i) vote += w[i] * r.deltas[i * r.elements + s.offset + j];
            double kept = 0.0, weight = 0.0;
            for (std::size_t i = 0; i < r.workers; ++i) {
                const double x = r.deltas[i * r.elements + s.offset + j];
                if ((vote >= 0.0 && x > 0.0) || (vote < 0.0 && x < 0.0)) {
                    kept += w[i] * x;
                    weight += w[i];
                }
            }
            out[s.offset + j] = weight > 0.0 ? kept / weight : 0.0;
        }
    }
    double sq = 0.0;
    for (const double x : out) sq += x * x;
    const double f = std::min(1.0, clip / (std::sqrt(sq) + 1e-6));
    for (auto& x : out) x *= f;
    return out;
}

}  // namespace

TEST_CASE("edit per tensor: weights, GTA and clip per tensor match a double re-computation") {
    auto rng = loco_test::rng_for("edit per tensor");
    const std::size_t m = 5;
    std::uniform_real_distribution<double> spread(0.2, 1.5);
    std::vector<std::vector<double>> scale(m, std::vector<double>(3));
    for (auto& row : scale) {
        for (auto& x : row) x = spread(rng);
    }
    const round_data r = make_round(rng, m, scale);
    edit::hyper h;
    h.scope = loco::aggregate::edit_scope::tensor;
    h.temperature = 0.7f;
    h.clip = 2.5f;
    edit::state s;
    std::vector<float> out(r.elements);
    REQUIRE(edit::combine(h, s, r.view(), out));
    const std::vector<double> want = reference(r, 0.7, 2.5);
    for (std::size_t j = 0; j < r.elements; ++j) {
        INFO("element " << j);
        CHECK(out[j] == doctest::Approx(want[j]).epsilon(1e-5));
    }
    // One detector per worker and tensor, each fed once (nothing flagged before the warm-up).
    REQUIRE(s.detectors.size() == m * 3);
    for (const auto& d : s.detectors) CHECK(d.count == 1);

    // The fragment scope weights every tensor by the fragment's norms: another result.
    edit::hyper whole = h;
    whole.scope = loco::aggregate::edit_scope::fragment;
    edit::state s2;
    std::vector<float> out2(r.elements);
    REQUIRE(edit::combine(whole, s2, r.view(), out2));
    CHECK(s2.detectors.size() == m);
    double diff = 0.0;
    for (std::size_t j = 0; j < r.elements; ++j) diff = std::max(diff, double(std::abs(out[j] - out2[j])));
    CHECK(diff > 1e-3);
}

TEST_CASE("edit per tensor: a worker off on one tensor loses its weight there only") {
    // Uniform weights and the linear reducer, so a kept round is the mean of the inliers. Worker
    // 0's tensor 1 jumps to 20x in the last round: the per-tensor detector flags it on tensor 1
    // only; per fragment its whole delta is dropped.
    auto rng = loco_test::rng_for("edit per tensor outlier");
    const std::size_t m = 4;
    edit::hyper h;
    h.weight_by_norm = false;
    h.consensus = loco::aggregate::sign_consensus::none;
    h.ewma_alpha = 0.5f;
    h.ewma_warmup = 2;
    h.ewma_threshold = 3.0f;
    for (const auto scope : {loco::aggregate::edit_scope::tensor, loco::aggregate::edit_scope::fragment}) {
        CAPTURE(loco::aggregate::to_string(scope));
        h.scope = scope;
        edit::state s;
        for (int round = 0; round < 6; ++round) {
            const bool last = round == 5;
            // Honest norms alternate between 1 and 1.1: a small spread the detector learns.
            std::vector<std::vector<double>> scale(m, std::vector<double>(3, round % 2 ? 1.1 : 1.0));
            if (last) scale[0][1] = 20.0;
            const round_data r = make_round(rng, m, scale, true);
            std::vector<float> out(r.elements);
            REQUIRE(edit::combine(h, s, r.view(), out));
            for (const segment& seg : r.segments) {
                const bool drop0 =
                    last && (scope == loco::aggregate::edit_scope::fragment || seg.offset == 7);
                for (std::size_t j = seg.offset; j < seg.offset + seg.size; ++j) {
                    double sum = 0.0;
                    for (std::size_t i = drop0 ? 1 : 0; i < m; ++i) sum += r.deltas[i * r.elements + j];
                    const double want = sum / double(drop0 ? m - 1 : m);
                    INFO("round " << round << " element " << j);
                    CHECK(out[j] == doctest::Approx(want).epsilon(1e-5));
                }
            }
        }
    }
}

TEST_CASE("edit per tensor: every worker an outlier on one tensor refuses the round") {
    auto rng = loco_test::rng_for("edit per tensor refusal");
    const std::size_t m = 3;
    edit::hyper h;
    h.scope = loco::aggregate::edit_scope::tensor;
    h.ewma_alpha = 0.5f;
    h.ewma_warmup = 2;
    edit::state s;
    std::vector<std::vector<double>> scale(m, std::vector<double>(3, 1.0));
    for (int round = 0; round < 4; ++round) {
        for (auto& row : scale) std::fill(row.begin(), row.end(), round % 2 ? 1.1 : 1.0);
        const round_data r = make_round(rng, m, scale, true);
        std::vector<float> out(r.elements);
        REQUIRE(edit::combine(h, s, r.view(), out));
    }
    const auto before = s.detectors;
    for (auto& row : scale) row[2] = 50.0;  // tensor 2 of every worker
    round_data r = make_round(rng, m, scale, true);
    std::vector<float> out(r.elements);
    CHECK_FALSE(edit::combine(h, s, r.view(), out));
    REQUIRE(s.detectors.size() == before.size());
    for (std::size_t k = 0; k < before.size(); ++k) {
        CHECK(s.detectors[k].count == before[k].count);
        CHECK(s.detectors[k].mean == before[k].mean);
    }
    // A NaN on one tensor leaves that worker out there (its other tensors still count).
    scale.assign(m, std::vector<double>(3, 1.0));
    r = make_round(rng, m, scale);
    r.deltas[2 * r.elements + 8] = std::numeric_limits<float>::quiet_NaN();  // worker 2, tensor 1
    h.skip_anomaly = false;
    h.weight_by_norm = false;
    h.consensus = loco::aggregate::sign_consensus::none;
    edit::state fresh;
    REQUIRE(edit::combine(h, fresh, r.view(), out));
    for (std::size_t j = 0; j < r.elements; ++j) {
        const bool tensor1 = j >= 7 && j < 19;
        double sum = 0.0;
        for (std::size_t i = 0; i < (tensor1 ? 2 : 3); ++i) sum += r.deltas[i * r.elements + j];
        CHECK(out[j] == doctest::Approx(sum / (tensor1 ? 2.0 : 3.0)).epsilon(1e-5));
    }
}

// The tensor scope takes its norms from the decoded deltas, but A-EDiT's step counts still come
// from the workers' reports: an infinite one made every tensor's weights NaN (each sync dropped
// as non-finite), a NaN or negative one counted as 0 steps with the worker's softmax weight
// kept. Such a worker is an outlier on every tensor; the rule over the others, in double.
TEST_CASE("edit per tensor: with step_weights a step count that is not finite, or negative, is an "
          "outlier on every tensor") {
    auto rng = loco_test::rng_for("edit per tensor step counts");
    const std::size_t m = 4;
    edit::hyper h;
    h.scope = loco::aggregate::edit_scope::tensor;
    h.skip_anomaly = false;
    h.consensus = loco::aggregate::sign_consensus::none;
    h.step_weights = true;
    h.step_weight_ratio = 0.25f;
    // Worker 3's delta is of the honest size, so without the fix it kept a softmax weight.
    const std::vector<std::vector<double>> scale = {
        {1.0, 0.5, 2.0}, {1.5, 0.8, 1.0}, {0.7, 1.2, 1.5}, {1.0, 1.0, 1.0}};
    round_data r = make_round(rng, m, scale);
    const float steps[] = {10.0f, 30.0f, 20.0f};
    const float inf = std::numeric_limits<float>::infinity();
    for (const float bad : {inf, -inf, std::numeric_limits<float>::quiet_NaN(), -1.0f}) {
        CAPTURE(bad);
        for (std::size_t i = 0; i < 3; ++i) r.reports[i].inner_steps = steps[i];
        r.reports[3].inner_steps = bad;
        edit::state s;
        std::vector<float> out(r.elements);
        REQUIRE(edit::combine(h, s, r.view(), out));
        for (const segment& seg : r.segments) {
            // softmax(-G_i) over workers 0 .. 2 of this tensor, mixed with their step shares.
            double g[3], w[3], total = 0.0;
            for (std::size_t i = 0; i < 3; ++i) {
                double sq = 0.0;
                for (std::size_t j = 0; j < seg.size; ++j) {
                    const double x = r.deltas[i * r.elements + seg.offset + j];
                    sq += x * x;
                }
                g[i] = std::sqrt(sq);
                total += w[i] = std::exp(-g[i]);
            }
            for (std::size_t i = 0; i < 3; ++i) w[i] = 0.75 * w[i] / total + 0.25 * steps[i] / 60.0;
            for (std::size_t j = seg.offset; j < seg.offset + seg.size; ++j) {
                double want = 0.0;
                for (std::size_t i = 0; i < 3; ++i) want += w[i] * r.deltas[i * r.elements + j];
                INFO("element " << j);
                CHECK(out[j] == doctest::Approx(want).epsilon(1e-5));
            }
        }
    }
}

TEST_CASE("edit per tensor: description and validation") {
    edit::hyper h;
    CHECK(edit::describe(h).find("scope") == std::string::npos);  // the fragment text as before
    h.scope = loco::aggregate::edit_scope::tensor;
    CHECK(edit::describe(h).ends_with(" scope=tensor"));
    h.scope = static_cast<loco::aggregate::edit_scope>(7);
    CHECK_THROWS_AS(edit::validate(h), loco::invalid_argument);
}

TEST_CASE("edit: a state of more than 2^20 detectors (per tensor, many workers) saves and loads") {
    // M x tensors detectors under edit_scope::tensor: 1024 workers x 1025 tensors is past 2^20.
    using state = loco::aggregate::edit::state;
    state s;
    s.detectors.resize((std::size_t{1} << 20) + 3);
    auto rng = loco_test::rng_for("edit many detectors");
    for (auto& d : s.detectors) {
        d.count = rng() % 100;
        d.mean = static_cast<double>(rng() % 1000) / 7.0;
        d.m2 = static_cast<double>(rng() % 1000) / 3.0 + 0.5;  // non-zero: a dropped M2 shows
    }
    s.detectors[7].window = {2.0};
    s.detectors[12345].window = {0.25, -3.5, 1.0};
    s.detectors.back().window = {0.5, -1.25};
    std::ostringstream os;
    {
        loco::detail::checkpoint_writer w(os);
        s.save(w);
        w.finish();
    }
    const std::string bytes = os.str();
    std::istringstream is(bytes);
    loco::detail::checkpoint_reader r(is);
    const state back = state::read(r);
    r.finish();
    REQUIRE(back.detectors.size() == s.detectors.size());
    CHECK(back.detectors[12345].count == s.detectors[12345].count);
    CHECK(back.detectors[12345].mean == s.detectors[12345].mean);
    CHECK(back.detectors[12345].m2 == s.detectors[12345].m2);
    CHECK(back.detectors[12345].window == s.detectors[12345].window);
    CHECK(back.detectors.back().window == s.detectors.back().window);
    // Every field of every detector (one check: a million CHECKs would be slow).
    std::size_t differ = 0;
    for (std::size_t k = 0; k < s.detectors.size(); ++k) {
        const auto &a = s.detectors[k], &b = back.detectors[k];
        differ += a.count != b.count || a.mean != b.mean || a.m2 != b.m2 || a.window != b.window;
    }
    CHECK(differ == 0);

    // A corrupted count (2^60 detectors) ends at the stream's end, not in a huge allocation.
    std::string corrupted = bytes;
    const std::uint64_t huge = std::uint64_t{1} << 60;
    std::memcpy(corrupted.data() + 12, &huge, sizeof huge);  // after the signature and version
    std::istringstream bad(corrupted);
    loco::detail::checkpoint_reader rb(bad);
    CHECK_THROWS_WITH_AS(state::read(rb), doctest::Contains("truncated"), loco::checkpoint_error);
}

TEST_CASE("edit with anomaly rejection: a run saved and loaded mid-run goes on bit-identically") {
    // The detectors' M2 (sigma) and z-score window decide which workers are flagged after a
    // resume: with either lost, a flag comes or goes and the runs part. Three workers, H = 2,
    // warm-up 3 and threshold 1 so that flags come early and often; worker 2's gradient is 3x
    // at every 7th call. Per fragment and per tensor (two tensors). Every rank saves after call
    // `at`, and a fresh handle loads it and goes on; the parameters are the trainer's (load()
    // leaves them). The run without rejection must differ (the detector flagged someone).
    using edit_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                loco::schedule::every, edit>;
    constexpr int workers = 3, calls = 40;
    constexpr std::size_t n = 8;  // tensors of 5 and 3
    auto rng = loco_test::rng_for("edit anomaly resume");
    std::vector<std::vector<float>> grads;  // [(call - 1) * workers + rank]
    for (int c = 1; c <= calls; ++c) {
        for (int r = 0; r < workers; ++r) {
            auto g = loco_test::normal_floats(rng, n);
            if (r == 2 && c % 7 == 0) {
                for (auto& x : g) x *= 3.0f;
            }
            grads.push_back(std::move(g));
        }
    }
    for (const auto scope : {loco::aggregate::edit_scope::fragment, loco::aggregate::edit_scope::tensor}) {
        CAPTURE(loco::aggregate::to_string(scope));
        edit_t::config cfg{.inner = {.lr = 0.1f}, .schedule = {.every = 2}};
        cfg.aggregate.ewma_warmup = 3;
        cfg.aggregate.ewma_alpha = 0.3f;
        cfg.aggregate.ewma_threshold = 1.0f;
        cfg.aggregate.consensus = loco::aggregate::sign_consensus::none;
        cfg.aggregate.scope = scope;
        // Every rank's parameters and global values after the last call.
        const auto run = [&](const edit_t::config& c, int at) {
            std::array<std::vector<float>, workers> out;
            loco::comm::run_threads(workers, [&](loco::comm::threads& comm) {
                const auto r = std::size_t(comm.rank());
                std::vector<float> a(5, 1.0f), b(3, -1.0f), ga(5), gb(3);
                loco::parameter_list list;
                list.add("a", a, ga);
                list.add("b", b, gb);
                auto opt = std::make_unique<edit_t>(list, comm, c);
                for (int call = 1; call <= calls; ++call) {
                    const auto& g = grads[std::size_t(call - 1) * workers + r];
                    std::copy_n(g.begin(), 5, ga.begin());
                    std::copy_n(g.begin() + 5, 3, gb.begin());
                    opt->step();
                    if (call == at) {
                        std::stringstream saved;
                        opt->save(saved);
                        opt = std::make_unique<edit_t>(list, comm, c);
                        opt->load(saved);
                    }
                }
                out[r] = a;
                out[r].insert(out[r].end(), b.begin(), b.end());
                out[r].insert(out[r].end(), opt->global().begin(), opt->global().end());
            });
            return out;
        };
        const auto straight = run(cfg, 0);
        edit_t::config keep_all = cfg;
        keep_all.aggregate.skip_anomaly = false;
        CHECK(run(keep_all, 0) != straight);
        for (const int at : {5, 10, 15, 20, 25, 30}) {
            CAPTURE(at);
            const auto resumed = run(cfg, at);
            float worst = 0.0f;
            for (int r = 0; r < workers; ++r) {
                for (std::size_t i = 0; i < straight[r].size(); ++i) {
                    worst = std::max(worst, std::abs(resumed[r][i] - straight[r][i]));
                }
            }
            INFO("largest |resumed - straight| = " << worst);
            CHECK(resumed == straight);
        }
    }
}
