// EDiT with its warm-up (schedule::warmup<every> + aggregate::edit), as docs/aggregation.md sets it
// up: the warm-up syncs one-step pseudo-gradients every step, far smaller than the rounds' after
// it. Detectors taught by them flagged every worker of every later round, and since they learn
// from inliers only, for good: training stopped without an error. Now
//   * the warm-up syncs do not teach the aggregation (schedule/plan.hpp's sync_plan::warmup), so
//     the rounds after it are applied and the run converges;
//   * a run whose every worker stays flagged raises after max_skipped_syncs refusals in a row, on
//     every rank, instead of stalling silently.
// The detector's own warm-up (ewma_warmup): it flags from exactly ewma_warmup learnt norms on.
#include <doctest/doctest.h>

#include <loco/aggregate/edit.hpp>
#include <loco/comm/threads.hpp>
#include <loco/compress/none.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/adamw.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/nesterov.hpp>
#include <loco/schedule/every.hpp>
#include <loco/schedule/warmup.hpp>

#include "support/random.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

namespace {

using edit_warmup = loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                                 loco::schedule::warmup<loco::schedule::every>,
                                 loco::aggregate::edit>;

}  // namespace

TEST_CASE("EDiT after its warm-up: the rounds are applied and the run converges") {
    // docs/aggregation.md's settings (W = 100, then every 10; ewma_warmup 10, clip 10, outer
    // Nesterov 0.7 / 0.8, AdamW); worker k minimises ||x - c_k||^2 / 2.
    constexpr int workers = 4;
    constexpr std::size_t dim = 16;
    auto rng = loco_test::rng_for("edit warm-up");
    std::vector<std::vector<float>> targets;
    std::vector<double> optimum(dim, 0.0);
    for (int k = 0; k < workers; ++k) {
        targets.push_back(loco_test::normal_floats(rng, dim, 0.3f));
        for (std::size_t i = 0; i < dim; ++i) {
            targets.back()[i] += 5.0f;
            optimum[i] += targets.back()[i] / workers;
        }
    }
    std::vector<std::uint64_t> applied(workers), refused(workers);
    std::vector<double> distance(workers), after_warmup(workers);
    loco::comm::run_threads(workers, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        std::vector<float> x(dim, 0.0f), g(dim);
        loco::parameter_list list;
        list.add("x", x, g);
        edit_warmup::config cfg{.inner = {.lr = 0.01f, .weight_decay = 0.0f},
                                .outer = {.lr = 0.7f, .momentum = 0.8f},
                                .schedule = {.steps = 100, .then = {.every = 10}}};
        cfg.aggregate.ewma_warmup = 10;
        cfg.aggregate.clip = 10.0f;
        edit_warmup opt(list, comm, cfg);
        opt.start();
        const auto from_optimum = [&] {
            double sq = 0.0;
            for (std::size_t i = 0; i < dim; ++i) {
                const double d = double(opt.global()[i]) - optimum[i];
                sq += d * d;
            }
            return std::sqrt(sq);
        };
        for (int call = 1; call <= 600; ++call) {
            for (std::size_t i = 0; i < dim; ++i) g[i] = x[i] - targets[r][i];
            opt.step();
            if (call == 100) after_warmup[r] = from_optimum();
        }
        applied[r] = opt.outer_steps();
        refused[r] = opt.skipped_syncs();
        distance[r] = from_optimum();
    });
    for (int k = 0; k < workers; ++k) {
        CAPTURE(k);
        // 100 warm-up syncs and 50 rounds: before the fix, 100 and none (every round refused,
        // the global values stuck where the warm-up left them, about 7 from the optimum). The
        // rounds bring them within AdamW's noise (0.2 to 0.5 here, lr 0.01 in 16 dimensions).
        CHECK(applied[std::size_t(k)] + refused[std::size_t(k)] == 150);
        CHECK(refused[std::size_t(k)] <= 2);
        CAPTURE(after_warmup[std::size_t(k)]);
        CHECK(distance[std::size_t(k)] < 0.2 * after_warmup[std::size_t(k)]);
    }
}

TEST_CASE("EDiT: every worker flagged round after round raises after max_skipped_syncs refusals") {
    // SGD on ||x||^2 / 2 with gradients scaled by 1000 from call 41 on: every worker's norm jumps
    // far past its detector's threshold and stays there, so every round is refused.
    constexpr int workers = 3;
    std::vector<std::string> errors(workers);
    std::vector<std::uint64_t> refused(workers), applied(workers);
    std::vector<std::vector<float>> global_at_error(workers), before_jump(workers);
    loco::comm::run_threads(workers, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        std::vector<float> x{1.0f, -2.0f, 0.5f}, g(3);
        loco::parameter_list list;
        list.add("x", x, g);
        using handle = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                    loco::schedule::every, loco::aggregate::edit>;
        handle::config cfg{.inner = {.lr = 0.01f}, .schedule = {.every = 4},
                           .max_skipped_syncs = 3};
        cfg.aggregate.ewma_warmup = 5;
        cfg.aggregate.ewma_alpha = 0.2f;
        handle opt(list, comm, cfg);
        try {
            for (int call = 1; call <= 200; ++call) {
                const float scale = call > 40 ? 1000.0f : 1.0f;
                for (std::size_t i = 0; i < 3; ++i) g[i] = scale * (x[i] + 0.01f * float(r + 1));
                opt.step();
                if (call == 40) before_jump[r].assign(opt.global().begin(), opt.global().end());
            }
        } catch (const loco::error& e) {
            errors[r] = e.what();
        }
        refused[r] = opt.skipped_syncs();
        applied[r] = opt.outer_steps();
        global_at_error[r].assign(opt.global().begin(), opt.global().end());
    });
    for (int k = 0; k < workers; ++k) {
        const auto r = std::size_t(k);
        CAPTURE(k);
        CHECK(errors[r].find("4 syncs in a row applied nothing, the last refused by the "
                             "aggregation (edit: every worker an outlier)") != std::string::npos);
        CHECK(applied[r] == 10);  // the rounds of calls 4 .. 40
        CHECK(refused[r] == 3);   // calls 44, 48, 52; the fourth raised
        CHECK(global_at_error[r] == before_jump[r]);  // nothing of the refused rounds applied
    }
}

namespace {

// atorch's OnlineDynamicEWMA (algorithms.md 5.2, "Anomaly detector") written out in doubles from
// the specification, independent of loco::aggregate::ewma_detector:
//   update(v): count += 1; d = v - mean; mean += alpha d; M2 = (1 - alpha)(M2 + alpha d (v - mean));
//              z-window.append(z(v))   (deque(maxlen = warmup_steps))
//   z(v) = (v - mean) / sigma, sigma = sqrt(M2); 0 if sigma == 0 or count < warmup_steps
//   is_outlier(v) = count >= warmup_steps and z(v) > threshold * max(1, std(z-window))
// std is torch.std's, unbiased.
struct ewma_spec {
    double alpha = 0.0, threshold = 0.0;
    std::size_t warmup = 0;
    std::size_t count = 0;
    double mean = 0.0, m2 = 0.0;
    std::vector<double> window;

    double z(double v) const {
        const double sigma = count >= 2 ? std::sqrt(m2) : 0.0;
        return sigma == 0.0 || count < warmup ? 0.0 : (v - mean) / sigma;
    }
    bool is_outlier(double v) const {
        double spread = 0.0;
        if (window.size() >= 2) {
            double mu = 0.0, q = 0.0;
            for (const double x : window) mu += x;
            mu /= double(window.size());
            for (const double x : window) q += (x - mu) * (x - mu);
            spread = std::sqrt(q / double(window.size() - 1));
        }
        return count >= warmup && z(v) > threshold * std::max(1.0, spread);
    }
    void update(double v) {
        ++count;
        const double d = v - mean;
        mean += alpha * d;
        m2 = (1.0 - alpha) * (m2 + alpha * d * (v - mean));
        window.push_back(z(v));
        if (window.size() > warmup) window.erase(window.begin());
    }
};

}  // namespace

TEST_CASE("EDiT's detector flags a huge norm as soon as it has learnt exactly ewma_warmup norms") {
    // atorch's is_outlier: count >= warmup_steps (algorithms.md 5.2). After warmup - 1 learnt
    // norms z is 0 and nothing is flagged; after exactly `warmup` a norm a thousand times the
    // others is. Worker 0 reports random norms in [1, 2], then the huge one; worker 1 is steady
    // and keeps every round alive. Each report's flag (weight 0) and the detector's count, mean
    // and M2 against the specification in doubles, for random alpha and warm-up.
    auto rng = loco_test::rng_for("edit detector warm-up boundary");
    std::uniform_int_distribution<std::size_t> warmups(2, 8);
    std::uniform_real_distribution<float> alphas(0.1f, 0.9f), norms(1.0f, 2.0f);
    for (int trial = 0; trial < 4; ++trial) {
        const std::size_t warmup = warmups(rng);
        const float alpha = alphas(rng);
        CAPTURE(warmup);
        CAPTURE(alpha);
        std::vector<float> learnt(warmup);
        for (auto& v : learnt) v = norms(rng);
        // Learnt: warmup - 1 norms (the huge one comes too early), then all `warmup`.
        for (const std::size_t before : {warmup - 1, warmup}) {
            CAPTURE(before);
            loco::aggregate::edit::hyper h;
            h.ewma_alpha = alpha;
            h.ewma_warmup = warmup;
            h.ewma_threshold = 3.0f;
            h.consensus = loco::aggregate::sign_consensus::none;
            h.weight_by_norm = false;  // equal weights: weight 0 means flagged, not a tiny softmax
            loco::aggregate::edit::state s;
            ewma_spec spec;
            spec.alpha = double(alpha);
            spec.threshold = 3.0;
            spec.warmup = warmup;
            std::vector<float> reports(learnt.begin(), learnt.begin() + std::ptrdiff_t(before));
            reports.push_back(1000.0f * norms(rng));
            const std::vector<float> deltas = {1.0f, 1.0f};
            bool flagged = false;
            for (std::size_t k = 0; k < reports.size(); ++k) {
                CAPTURE(k);
                flagged = spec.is_outlier(double(reports[k]));
                if (!flagged) spec.update(double(reports[k]));
                const std::vector<loco::aggregate::worker_report> reps = {{reports[k], 10.0f},
                                                                          {1.0f, 10.0f}};
                loco::aggregate::contributions c;
                c.workers = 2;
                c.elements = 1;
                c.reports = reps;
                c.deltas = deltas;
                const auto w = loco::aggregate::edit::weights(h, s, c);
                CHECK(w[0] == (flagged ? 0.0 : 0.5));
                CHECK(s.detectors[0].count == spec.count);
                CHECK(s.detectors[0].mean == doctest::Approx(spec.mean).epsilon(1e-12));
                CHECK(s.detectors[0].m2 == doctest::Approx(spec.m2).epsilon(1e-12));
            }
            // The specification itself: the huge norm is flagged exactly when `warmup` were learnt.
            CHECK(flagged == (before == warmup));
        }
    }
}
