// A-EDiT's wall-clock schedule, DyLU's speed-proportional local steps and EDiT's warm-up, with
// thread workers whose step times come from injected clocks, against hand-derived sync calls and
// double-precision re-computations of the aggregate; runs of both resumed from a checkpoint
// saved inside a window or round against the runs never interrupted. The wallclock rule is also
// checked against a simulation in doubles (workers waiting in the agreement, the
// min_total_global_steps boundary).

#include <doctest/doctest.h>

#include <loco/aggregate/edit.hpp>
#include <loco/comm/single.hpp>
#include <loco/comm/threads.hpp>
#include <loco/compress/none.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/schedule/every.hpp>
#include <loco/schedule/proportional.hpp>
#include <loco/schedule/streaming.hpp>
#include <loco/schedule/wallclock.hpp>
#include <loco/schedule/warmup.hpp>

#include "support/forwarding_comm.hpp"
#include "support/random.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

// A worker's clock: each step() of worker k takes step_seconds[k]; the test advances it.
struct fake_clock {
    std::shared_ptr<double> now = std::make_shared<double>(0.0);
    loco::schedule::seconds_clock fn() const {
        return [t = now] { return *t; };
    }
};

// One call of a resume test: its sync decision, the schedule's counters after it and the
// worker's parameters.
struct call_record {
    bool synced = false;
    std::array<std::uint64_t, 3> counters{};
    std::vector<float> w;
    bool operator==(const call_record&) const = default;
};

// The first call (from 1) at which two runs of one worker differ, 0 when none does.
std::size_t first_difference(const std::vector<call_record>& a, const std::vector<call_record>& b) {
    for (std::size_t c = 0; c < std::max(a.size(), b.size()); ++c) {
        if (c >= a.size() || c >= b.size() || !(a[c] == b[c])) return c + 1;
    }
    return 0;
}

}  // namespace

TEST_CASE("wallclock: four workers at different speeds agree on the windows, s_i weights, a skipped window changes nothing") {
    constexpr int m = 4;
    constexpr std::size_t n = 3;
    const std::array<double, m> step_seconds = {1.0, 2.0, 3.0, 4.0};
    const float lr = 0.1f;
    auto rng = loco_test::rng_for("wallclock a-edit");
    const auto init = loco_test::normal_floats(rng, n);
    std::vector<std::vector<float>> grads;  // constant per worker
    for (int k = 0; k < m; ++k) grads.push_back(loco_test::normal_floats(rng, n));

    // T = 6 s. The first window opens after the first step; worker k's window closes at the first
    // call c with (c - 1) d_k >= 6: calls 7, 4, 3, 3; the next windows last ceil(6 / d_k) steps:
    // 6, 3, 2, 2. The agreed mean elapsed time is (6 + 6 + 6 + 8) / 4 = 6.5 s both times.
    const std::array<int, m> first = {7, 4, 3, 3}, later = {6, 3, 2, 2};

    SUBCASE("the schedule alone: the agreed mean time and step totals") {
        loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
            const auto r = std::size_t(comm.rank());
            fake_clock clock;
            loco::schedule::wallclock s;
            s.use_communicator(comm);
            const loco::schedule::wallclock::hyper h{.seconds = 6.0, .min_total_global_steps = 0,
                                                     .clock = clock.fn()};
            int c = 0, closes = 0;
            while (closes < 2) {
                ++c;
                *clock.now += step_seconds[r];
                if (!s.next(h).empty()) {
                    ++closes;
                    CHECK(c == (closes == 1 ? first[r] : first[r] + later[r]));
                    CHECK(s.last_window().mean_seconds == doctest::Approx(6.5));
                    CHECK(s.last_window().total_steps == (closes == 1 ? 17u : 13u));
                }
            }
        });
    }

    SUBCASE("T shorter than one step: every rank raises the same one-sentence error") {
        loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
            const auto r = std::size_t(comm.rank());
            fake_clock clock;
            loco::schedule::wallclock s;
            s.use_communicator(comm);
            const loco::schedule::wallclock::hyper h{.seconds = 0.5, .min_total_global_steps = 0,
                                                     .clock = clock.fn()};
            *clock.now += step_seconds[r];
            CHECK(s.next(h).empty());
            // The first window of one step longer than T closes (it may be a pause); the second
            // in a row raises.
            *clock.now += step_seconds[r];
            CHECK(!s.next(h).empty());
            *clock.now += step_seconds[r];
            CHECK_THROWS_WITH_AS(s.next(h), doctest::Contains("shorter than one step"),
                                 loco::invalid_argument);
        });
        // A sync longer than T makes the next window one step long: a second such window in a
        // row raises, and the message says that the sync is counted.
        loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
            fake_clock clock;
            loco::schedule::wallclock s;
            s.use_communicator(comm);
            const loco::schedule::wallclock::hyper h{.seconds = 0.5, .min_total_global_steps = 0,
                                                     .clock = clock.fn()};
            int calls = 0;
            bool synced = false;
            while (!synced && calls < 20) {
                *clock.now += 0.125;
                synced = !s.next(h).empty();
                ++calls;
            }
            REQUIRE(synced);
            CHECK(calls == 5);  // the window opened after call 1 and closed 0.5 s later
            *clock.now += 2.0;   // the sync
            *clock.now += 0.125; // one step
            CHECK(!s.next(h).empty());
            *clock.now += 2.0;   // the next sync, as long
            *clock.now += 0.125;
            CHECK_THROWS_WITH_AS(s.next(h),
                                 "loco::schedule::wallclock: seconds (T = 0.5) is shorter than one "
                                 "step (2.125 s per step measured on average over the window, which "
                                 "includes the sync that opened it, if any, and over the window "
                                 "before); raise T above the time of a step and of a sync",
                                 loco::invalid_argument);
        });
        CHECK_THROWS_AS(loco::schedule::wallclock::validate({.seconds = 0.0}), loco::invalid_argument);
        CHECK_THROWS_AS(loco::schedule::wallclock::validate({.seconds = -1.0}), loco::invalid_argument);
        loco::schedule::wallclock lone;
        CHECK_THROWS_AS(lone.next({}), loco::invalid_argument);  // no communicator
    }

    SUBCASE("through loco::diloco with A-EDiT's step weights (r = 1): global = sum_i s_i local_i") {
        for (const std::uint64_t min_total : {0u, 20u}) {
            CAPTURE(min_total);
            using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                       loco::schedule::wallclock, loco::aggregate::edit>;
            // The reference: worker k's local values after c of its own steps from x.
            const auto walk = [&](const std::vector<double>& x, int k, int c) {
                std::vector<double> out(n);
                for (std::size_t i = 0; i < n; ++i) out[i] = x[i] - double(lr) * c * grads[k][i];
                return out;
            };
            // Window 1 skipped when min_total = 20 (17 steps in all); then the sync is at the end
            // of window 2 with 30 steps since the last sync.
            const bool skip_first = min_total == 20;
            std::vector<double> x0(init.begin(), init.end());
            std::array<int, m> cum{};
            for (int k = 0; k < m; ++k) cum[k] = first[k] + (skip_first ? later[k] : 0);
            const auto weighted = [&](const std::vector<double>& x, std::array<int, m> steps,
                                      std::array<int, m> total) {
                double all = 0.0;
                for (int k = 0; k < m; ++k) all += total[k];
                std::vector<double> g(n, 0.0);
                for (int k = 0; k < m; ++k) {
                    const auto l = walk(x, k, steps[k]);
                    for (std::size_t i = 0; i < n; ++i) g[i] += total[k] / all * l[i];
                }
                return g;
            };
            const auto global1 = weighted(x0, cum, cum);
            // With min_total = 20 the next window (13 steps) is skipped too.
            const int windows = skip_first ? 2 : 1;
            std::array<int, m> steps2{}, cum2{};
            for (int k = 0; k < m; ++k) {
                steps2[k] = windows * later[k];
                cum2[k] = cum[k] + steps2[k];
            }
            const auto global2 = weighted(global1, steps2, cum2);

            std::array<std::vector<float>, m> g1, g2;
            loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
                const auto r = std::size_t(comm.rank());
                fake_clock clock;
                std::vector<float> w = init, g = grads[r];
                loco::parameter_list list;
                list.add("w", w, g);
                opt_t::config cfg{.inner = {.lr = lr}, .outer = {.lr = 1.0f}};
                cfg.schedule = {.seconds = 6.0, .min_total_global_steps = min_total, .clock = clock.fn()};
                cfg.aggregate.weight_by_norm = false;
                cfg.aggregate.skip_anomaly = false;
                cfg.aggregate.consensus = loco::aggregate::sign_consensus::none;
                cfg.aggregate.step_weights = true;
                cfg.aggregate.step_weight_ratio = 1.0f;
                opt_t opt(list, comm, cfg);
                opt.start();
                int c = 0, syncs = 0;
                while (syncs < 2) {
                    ++c;
                    *clock.now += step_seconds[r];
                    const auto res = opt.step();
                    if (skip_first && c == first[r]) {
                        // The skipped window: no sync, the local values walk on, the global stays.
                        CHECK_FALSE(res.synced);
                        CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == init);
                        for (std::size_t i = 0; i < n; ++i) {
                            CHECK(w[i] == doctest::Approx(walk(x0, int(r), c)[i]).epsilon(1e-5));
                        }
                    }
                    if (res.synced) {
                        ++syncs;
                        CHECK(c == (syncs == 1 ? cum[r] : cum2[r]));
                        (syncs == 1 ? g1 : g2)[r].assign(opt.global().begin(), opt.global().end());
                        CHECK(w == (syncs == 1 ? g1 : g2)[r]);
                    }
                }
                CHECK(opt.outer_steps() == 2);
            });
            for (int r = 0; r < m; ++r) {
                for (std::size_t i = 0; i < n; ++i) {
                    CHECK(g1[r][i] == doctest::Approx(global1[i]).epsilon(1e-5));
                    CHECK(g2[r][i] == doctest::Approx(global2[i]).epsilon(1e-5));
                }
            }
        }
    }
}

TEST_CASE("proportional (DyLU): worker w runs floor(v_w / v_max * H) steps after the first round") {
    constexpr int m = 4;
    // Step times 1, 2, 4, 8 s: speeds 1, 1/2, 1/4, 1/8 (exact in floats); H = 12 gives 12, 6, 3, 1.
    const std::array<double, m> step_seconds = {1.0, 2.0, 4.0, 8.0};
    const std::array<std::uint64_t, m> next_h = {12, 6, 3, 1};
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::proportional>;
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        {
            fake_clock clock;
            loco::schedule::proportional s;
            s.use_communicator(comm);
            const loco::schedule::proportional::hyper h{.every = 12, .clock = clock.fn()};
            std::vector<int> syncs;
            for (int c = 1; c <= 12 + 2 * int(next_h[r]); ++c) {
                *clock.now += step_seconds[r];
                if (!s.next(h).empty()) syncs.push_back(c);
                if (c == 12) {
                    CHECK(s.local_steps() == next_h[r]);
                    CHECK(s.speeds()[3] == 0.125f);
                }
            }
            CHECK(syncs == std::vector<int>{12, 12 + int(next_h[r]), 12 + 2 * int(next_h[r])});
        }
        // Through the handle: every worker syncs the same number of times, each at its own calls.
        fake_clock clock;
        std::vector<float> w(2, 1.0f), g(2, float(r));
        loco::parameter_list list;
        list.add("w", w, g);
        opt_t opt(list, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 12, .clock = clock.fn()}});
        int syncs = 0, c = 0;
        while (syncs < 3) {
            ++c;
            *clock.now += step_seconds[r];
            syncs += opt.step().synced ? 1 : 0;
        }
        CHECK(c == 12 + 2 * int(next_h[r]));
        CHECK(opt.outer_steps() == 3);
    });
    CHECK_THROWS_AS(loco::schedule::proportional::validate({.every = 0}), loco::invalid_argument);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        // A clock that never advances: every rank raises the same error at the first sync.
        loco::schedule::proportional s;
        s.use_communicator(comm);
        const loco::schedule::proportional::hyper h{.every = 3, .clock = [] { return 5.0; }};
        s.next(h);
        s.next(h);
        CHECK_THROWS_WITH_AS(s.next(h), doctest::Contains("measured no time"), loco::invalid_argument);
    });
}

TEST_CASE("proportional (DyLU): a worker more than H times slower than the fastest runs 1 step a "
          "round, not 0") {
    // floor(v_w / v_max * H) is 0 for such a worker; H_w is clamped to [1, H] (a worker with
    // H_w = 0 would end a round at every call without a local step of it). Random H and a slow
    // step time of more than H fast ones (whole seconds: the ratio is exact).
    auto rng = loco_test::rng_for("proportional clamped to one step");
    const int every = std::uniform_int_distribution<int>(2, 8)(rng);
    const double slow = std::uniform_int_distribution<int>(every + 1, 4 * every)(rng);
    CAPTURE(every);
    CAPTURE(slow);
    std::array<std::uint64_t, 2> h_w{};
    std::array<int, 2> second_round{};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        const double step = r == 0 ? 1.0 : slow;
        fake_clock clock;
        loco::schedule::proportional s;
        s.use_communicator(comm);
        const loco::schedule::proportional::hyper h{.every = std::uint64_t(every),
                                                    .clock = clock.fn()};
        for (int c = 1; c <= every; ++c) {  // round 1: H steps on every worker
            *clock.now += step;
            if (!s.next(h).empty()) s.synced(h);
        }
        REQUIRE(s.rounds() == 1);
        h_w[r] = s.local_steps();
        for (int c = 1; c <= 4 * every && s.rounds() == 1; ++c) {
            *clock.now += step;
            if (!s.next(h).empty()) s.synced(h);
            second_round[r] = c;
        }
    });
    CHECK(h_w == std::array<std::uint64_t, 2>{std::uint64_t(every), 1});
    CHECK(second_round == std::array<int, 2>{every, 1});
}

TEST_CASE("proportional (DyLU): an exact speed ratio gives exactly floor(v_w / v_max * H)") {
    // Speeds 1/3 and 1/9 are not exact in floats: a ratio of fp32 speeds is 0.33333332 and
    // floor(6 * it) = 1; the documented H_w = floor(1/3 * 6) = 2. Each case runs three rounds and
    // checks H_w after each (every later round has the same ratio). Clocks of 0.1 s steps are not
    // exact in binary: 0.1/0.2 s with H = 10 computes H_1 = 4.999999999999999 before the floor's
    // tolerance.
    struct scenario {
        std::array<double, 2> step_seconds;
        std::uint64_t every;
        std::array<std::uint64_t, 2> want;
    };
    const std::array<scenario, 7> cases = {{{{3.0, 9.0}, 6, {6, 2}},
                                            {{1.0, 5.0}, 10, {10, 2}},
                                            {{9.0, 3.0}, 9, {3, 9}},
                                            {{0.1, 0.3}, 6, {6, 2}},
                                            {{0.1, 0.2}, 10, {10, 5}},
                                            {{0.1, 0.5}, 10, {10, 2}},
                                            {{0.3, 0.3}, 7, {7, 7}}}};
    for (const scenario& sc : cases) {
        CAPTURE(sc.step_seconds[0]);
        CAPTURE(sc.step_seconds[1]);
        CAPTURE(sc.every);
        std::array<std::vector<std::uint64_t>, 2> got;
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            const auto r = std::size_t(comm.rank());
            fake_clock clock;
            loco::schedule::proportional s;
            s.use_communicator(comm);
            const loco::schedule::proportional::hyper h{.every = sc.every, .clock = clock.fn()};
            while (s.rounds() < 3) {
                *clock.now += sc.step_seconds[r];
                if (!s.next(h).empty()) got[r].push_back(s.local_steps());
            }
        });
        for (std::size_t r = 0; r < 2; ++r) {
            CHECK(got[r] == std::vector<std::uint64_t>(3, sc.want[r]));
        }
    }
}

TEST_CASE("warmup<every>: every step syncs for the first W calls, then every H from a fresh round") {
    constexpr int m = 2;
    constexpr std::size_t n = 4;
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::warmup<loco::schedule::every>>;
    auto rng = loco_test::rng_for("warmup schedule");
    const auto init = loco_test::normal_floats(rng, n);
    std::vector<std::vector<float>> grads;
    for (int i = 0; i < 12 * m; ++i) grads.push_back(loco_test::normal_floats(rng, n));
    const float lr = 0.1f;
    // Reference: synchronous averaging (outer SGD, lr 1) at calls 1..3, then every 4: 7, 11.
    std::vector<double> global(init.begin(), init.end());
    std::array<std::vector<double>, m> local = {global, global};
    std::vector<int> want_syncs;
    for (int c = 1; c <= 12; ++c) {
        for (int r = 0; r < m; ++r) {
            for (std::size_t i = 0; i < n; ++i) local[r][i] -= lr * grads[std::size_t((c - 1) * m + r)][i];
        }
        if (c <= 3 || (c - 3) % 4 == 0) {
            want_syncs.push_back(c);
            for (std::size_t i = 0; i < n; ++i) global[i] = (local[0][i] + local[1][i]) / 2;
            local = {global, global};
        }
    }
    CHECK(want_syncs == std::vector<int>{1, 2, 3, 7, 11});
    std::array<std::vector<float>, m> finals;
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        std::vector<float> w = init, g(n);
        loco::parameter_list list;
        list.add("w", w, g);
        const opt_t::config cfg{.inner = {.lr = lr}, .schedule = {.steps = 3, .then = {.every = 4}}};
        opt_t opt(list, comm, cfg);
        std::vector<int> syncs;
        std::stringstream saved;
        for (int c = 1; c <= 12; ++c) {
            g = grads[std::size_t((c - 1) * m) + r];
            if (opt.step().synced) syncs.push_back(c);
            if (c == 2) opt.save(saved);  // mid warm-up
        }
        CHECK(syncs == want_syncs);
        CHECK(opt.calls() == 12);
        finals[r] = w;
        // The warm-up count comes back from the checkpoint: the resumed handle syncs at 3, 7, 11.
        std::vector<float> w2(n), g2(n);
        loco::parameter_list list2;
        list2.add("w", w2, g2);
        opt_t again(list2, comm, cfg);
        again.load(saved);
        std::vector<int> resumed;
        for (int c = 3; c <= 12; ++c) {
            if (again.step().synced) resumed.push_back(c);
        }
        CHECK(resumed == std::vector<int>{3, 7, 11});
    });
    for (int r = 0; r < m; ++r) {
        for (std::size_t i = 0; i < n; ++i) CHECK(finals[r][i] == doctest::Approx(local[r][i]).epsilon(1e-5));
    }
    CHECK(loco::schedule::warmup<loco::schedule::every>::describe({.steps = 5, .then = {.every = 7}}) ==
          "warmup W=5 then every H=7");
    CHECK_THROWS_AS(loco::schedule::warmup<loco::schedule::every>::validate({.steps = 1, .then = {.every = 0}}),
                    loco::invalid_argument);
}

TEST_CASE("warmup<streaming>: the warm-up syncs average (no merge), and a warm-up cannot start "
          "again") {
    constexpr int m = 2;
    constexpr std::size_t n = 3;
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::warmup<loco::schedule::streaming>>;
    auto rng = loco_test::rng_for("warmup streaming");
    const auto init = loco_test::normal_floats(rng, 2 * n);
    std::vector<std::vector<float>> grads;
    for (int i = 0; i < 2 * m; ++i) grads.push_back(loco_test::normal_floats(rng, 2 * n));
    // Reference: two warm-up calls of synchronous averaging (outer SGD at lr 1), every worker
    // then holding the mean; the streaming alpha of 0.5 has no part in them.
    std::vector<double> mean(init.begin(), init.end());
    for (int c = 0; c < 2; ++c) {
        std::vector<double> next(2 * n, 0.0);
        for (int r = 0; r < m; ++r) {
            for (std::size_t i = 0; i < 2 * n; ++i) {
                next[i] += (mean[i] - 0.1 * grads[std::size_t(c * m + r)][i]) / m;
            }
        }
        mean = next;
    }
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        std::vector<float> a(init.begin(), init.begin() + n), b(init.begin() + n, init.end());
        std::vector<float> ga(n), gb(n);
        loco::parameter_list list;
        list.add("a", a, ga);
        list.add("b", b, gb);
        opt_t::config cfg{.inner = {.lr = 0.1f},
                          .schedule = {.steps = 2,
                                       .then = {.every = 4, .fragments = 2, .overlap = 1,
                                                .alpha = 0.5f}}};
        opt_t opt(list, comm, cfg);
        for (int c = 0; c < 2; ++c) {
            const auto& g = grads[std::size_t(c * m) + r];
            std::copy_n(g.begin(), n, ga.begin());
            std::copy_n(g.begin() + n, n, gb.begin());
            CHECK(opt.step().synced);
            CHECK(a == std::vector<float>(opt.global().begin(), opt.global().begin() + n));
            CHECK(b == std::vector<float>(opt.global().begin() + n, opt.global().end()));
        }
        for (std::size_t i = 0; i < n; ++i) {
            CHECK(a[i] == doctest::Approx(mean[i]).epsilon(1e-6));
            CHECK(b[i] == doctest::Approx(mean[n + i]).epsilon(1e-6));
        }
        // Streaming's rounds: fragment 0 starts at its first call (H/P - tau = 1) ...
        std::fill(ga.begin(), ga.end(), 0.5f);
        std::fill(gb.begin(), gb.end(), 0.5f);
        opt.step();
        REQUIRE(opt.in_flight(0));
        // ... and a warm-up raised now would meet it in flight: refused before anything moves.
        const std::vector<float> a_before = a, b_before = b;
        opt.schedule_hyper().steps = 10;
        CHECK_THROWS_WITH_AS(opt.step(),
                             doctest::Contains("the warm-up cannot start again"),
                             loco::invalid_argument);
        CHECK(a == a_before);
        CHECK(b == b_before);
        opt.schedule_hyper().steps = 2;  // back as it was: the run goes on
        opt.step();
    });
}

TEST_CASE("warmup: steps raised by one are taken before the wrapped schedule has run and "
          "refused after") {
    // The warm-up may grow while the wrapped schedule has made no call; once it has, a W of even
    // one more call than were made would restart every-step syncs over its round.
    using S = loco::schedule::warmup<loco::schedule::every>;
    auto rng = loco_test::rng_for("warmup raised by one");
    const auto w = std::uniform_int_distribution<std::uint64_t>(1, 6)(rng);
    const auto every = std::uniform_int_distribution<std::uint64_t>(2, 5)(rng);
    CAPTURE(w);
    CAPTURE(every);
    S s;
    S::hyper h{.steps = w, .then = {.every = every}};
    for (std::uint64_t c = 1; c <= w; ++c) {
        s.check(h);
        CHECK(s.next(h).warmup);
    }
    h.steps = w + 1;
    CHECK_NOTHROW(s.check(h));  // the wrapped schedule has not run: the warm-up goes on
    h.steps = w;
    s.check(h);
    CHECK_FALSE(s.next(h).warmup);
    REQUIRE(s.then().calls() == 1);
    h.steps = w + 1;
    const std::string refused = "steps raised to " + std::to_string(w + 1) +
                                " after the warm-up ended at call " + std::to_string(w);
    CHECK_THROWS_WITH_AS(s.check(h), doctest::Contains(refused.c_str()), loco::invalid_argument);
    h.steps = w;  // W as it was, or lower, is accepted
    CHECK_NOTHROW(s.check(h));
    h.steps = w - 1;
    CHECK_NOTHROW(s.check(h));
}

namespace {

// A donor that made k of the group's W warm-up calls, and a fresh newcomer regrouped from it:
// the newcomer must make the remaining W - k warm-up syncs and then plan as the donor does
// (starting its warm-up afresh, it would sync every step while its peers had moved on).
template <class Then>
void check_newcomer_takes_warmup(typename Then::hyper then, std::uint64_t w, std::uint64_t k) {
    using S = loco::schedule::warmup<Then>;
    fake_clock clock;  // 1 s steps, read by both
    then.clock = clock.fn();
    loco::comm::single comm;
    S donor, newcomer;
    donor.use_communicator(comm);
    newcomer.use_communicator(comm);
    const typename S::hyper h{.steps = w, .then = then};
    for (std::uint64_t c = 1; c <= k; ++c) {
        *clock.now += 1.0;
        CHECK(donor.next(h).warmup);
    }
    newcomer.regrouped(donor, /*newcomer=*/true);
    CHECK(newcomer.warmup_calls() == k);
    std::uint64_t newcomer_syncs = 0;
    for (std::uint64_t c = k + 1; c <= w + 12; ++c) {
        CAPTURE(c);
        *clock.now += 1.0;
        const auto want = donor.next(h);
        const auto got = newcomer.next(h);
        CHECK(got.warmup == (c <= w));
        CHECK(want.warmup == (c <= w));
        CHECK(got.empty() == want.empty());
        newcomer_syncs += got.empty() ? 0 : 1;
        if constexpr (requires { donor.synced(h); }) {
            if (!want.empty()) donor.synced(h);
            if (!got.empty()) newcomer.synced(h);
        }
    }
    CHECK(newcomer_syncs > w - k);  // the wrapped schedule synced after the warm-up too
}

}  // namespace

TEST_CASE("warmup<wallclock> and warmup<proportional>: a newcomer regrouped from a donor takes "
          "the group's warm-up count") {
    auto rng = loco_test::rng_for("warmup newcomer regrouped");
    const auto w = std::uniform_int_distribution<std::uint64_t>(2, 8)(rng);
    const auto k = std::uniform_int_distribution<std::uint64_t>(1, w - 1)(rng);
    CAPTURE(w);
    CAPTURE(k);
    SUBCASE("wallclock") {
        check_newcomer_takes_warmup<loco::schedule::wallclock>(
            {.seconds = 3.0, .min_total_global_steps = 0, .clock = {}}, w, k);
    }
    SUBCASE("proportional") {
        check_newcomer_takes_warmup<loco::schedule::proportional>({.every = 3, .clock = {}}, w, k);
    }
}

TEST_CASE("proportional (DyLU): the sync's time is not counted as a step's, and H_w survives a "
          "load()") {
    // Worker 1 slows from 1 s to 2 s per step after round 1; each sync takes 1000 s. With the
    // timer restarted after the sync (synced(), which loco::diloco calls), H_1 is the formula's
    // 50 from round 2 on; timed from the round's end, the sync pulled it towards H for rounds
    // (91, 84, 79, ...).
    std::array<std::vector<std::uint64_t>, 2> h_w;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        fake_clock clock;
        loco::schedule::proportional s;
        s.use_communicator(comm);
        const loco::schedule::proportional::hyper h{.every = 100, .clock = clock.fn()};
        while (s.rounds() < 5) {
            *clock.now += (r == 1 && s.rounds() >= 1) ? 2.0 : 1.0;
            if (!s.next(h).empty()) {
                h_w[r].push_back(s.local_steps());
                *clock.now += 1000.0;  // the outer sync
                s.synced(h);
            }
        }
    });
    CHECK(h_w[1] == std::vector<std::uint64_t>{100, 50, 50, 50, 50});

    // Step times 1 s and 8 s, H = 8: H_1 = 1. Resumed from a checkpoint of round 2, the
    // straggler's first round after load() times no step (the first starts the timer); it keeps
    // H_w = 1 instead of every worker falling back to H (a round of 8 x 8 s).
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::proportional>;
    std::array<std::vector<int>, 2> straight, resumed;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        const double step_seconds = r == 0 ? 1.0 : 8.0;
        fake_clock clock;
        const opt_t::config cfg{.inner = {.lr = 0.1f},
                                .schedule = {.every = 8, .clock = clock.fn()}};
        const auto rounds = [&](opt_t& o, int n, std::vector<int>& calls) {
            for (int k = 0; k < n; ++k) {
                int c = 0;
                do {
                    ++c;
                    *clock.now += step_seconds;
                } while (!o.step().synced);
                calls.push_back(c);
            }
        };
        std::vector<float> w(2, 1.0f), g(2, 0.1f);
        loco::parameter_list list;
        list.add("w", w, g);
        opt_t opt(list, comm, cfg);
        std::vector<int> first;
        rounds(opt, 2, first);
        CHECK(opt.schedule().local_steps() == (r == 0 ? 8u : 1u));
        std::stringstream saved;
        opt.save(saved);
        rounds(opt, 3, straight[r]);
        std::vector<float> w2(2, 1.0f), g2(2, 0.1f);
        loco::parameter_list again_list;
        again_list.add("w", w2, g2);
        opt_t again(again_list, comm, cfg);
        again.load(saved);
        rounds(again, 3, resumed[r]);
    });
    CHECK(straight[1] == std::vector<int>{1, 1, 1});
    CHECK(resumed[1] == straight[1]);
    CHECK(resumed[0] == straight[0]);
}

TEST_CASE("wallclock: one pause longer than T closes its window, two windows in a row of one "
          "step longer than T raise") {
    // Steps of 1 s, T = 60 s; after the second sync every worker pauses 90 s (a checkpoint, an
    // evaluation): the next window is that step and closes, and the run goes on. (It raised "T
    // is shorter than one step".) A T shorter than every step still raises, at its second
    // window.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::wallclock>;
    // Two workers, 1-element models, on a fake clock: `then` runs on each.
    const auto workers = [](double seconds, std::uint64_t min_steps, auto then) {
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            fake_clock clock;
            std::vector<float> w(2, 1.0f), g(2, 0.1f);
            loco::parameter_list list;
            list.add("w", w, g);
            opt_t opt(list, comm,
                      {.inner = {.lr = 0.1f},
                       .schedule = {.seconds = seconds, .min_total_global_steps = min_steps,
                                    .clock = clock.fn()}});
            then(opt, *clock.now);
        });
    };
    workers(60.0, 10, [](opt_t& opt, double& now) {
        int syncs = 0;
        for (int c = 1; c <= 400 && syncs < 5; ++c) {
            now += 1.0;
            const bool synced = opt.step().synced;
            syncs += synced ? 1 : 0;
            if (synced && syncs == 2) now += 90.0;
        }
        CHECK(syncs == 5);
        CHECK(opt.schedule().syncs() == 5);
    });
    workers(5.0, 1, [](opt_t& opt, double& now) {
        now += 10.0;
        opt.step();  // opens the first window
        now += 10.0;
        CHECK(opt.step().synced);  // one step of 10 s: a pause, perhaps
        now += 10.0;
        CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("is shorter than one step"),
                             loco::invalid_argument);
    });
}

TEST_CASE("wallclock: two pauses longer than T with a normal window between them do not raise") {
    // "Two windows in a row of one step longer than T" raises; a normal window (mean step
    // shorter than T) between two pauses breaks the row, so the run goes on through any number
    // of pauses that each follow normal training.
    auto rng = loco_test::rng_for("wallclock pauses apart");
    const double T = 10.0;
    std::uniform_int_distribution<int> pause_s(11, 100), step_s(1, 3);
    loco::comm::single comm;
    fake_clock clock;
    loco::schedule::wallclock s;
    s.use_communicator(comm);
    const loco::schedule::wallclock::hyper h{.seconds = T, .min_total_global_steps = 0,
                                             .clock = clock.fn()};
    CHECK(s.next(h).empty());  // opens the first window
    for (int round = 1; round <= 3; ++round) {
        CAPTURE(round);
        const double pause = pause_s(rng), step = step_s(rng);
        CAPTURE(pause);
        CAPTURE(step);
        *clock.now += pause;  // a window of one step longer than T closes and syncs
        REQUIRE(!s.next(h).empty());
        CHECK(s.last_window().mean_seconds == pause);
        // A normal window: ceil(T / step) steps, the last closing it.
        const int steps = static_cast<int>(std::ceil(T / step));
        for (int c = 1; c <= steps; ++c) {
            *clock.now += step;
            const bool synced = !s.next(h).empty();
            CHECK(synced == (c == steps));
        }
    }
    // Another pause after the last normal window is still a pause.
    *clock.now += 30.0;
    CHECK(!s.next(h).empty());
    CHECK(s.syncs() == 7);
}

TEST_CASE("wallclock: regroup opens a new window on every rank, and a newcomer counts no step of "
          "its own since the sync") {
    // One worker, T = 10 s, 1 s steps: 5 steps into a window, the handle regroups (the donor's
    // state is this worker's own here). The next step opens a new window whatever the clock
    // says (a survivor's old window would close up to T before a newcomer's, and wait that long
    // in the agreement); it closes 10 steps later, and the agreed total counts the survivor's
    // steps since the sync, or none of the newcomer's before it joined.
    for (const bool newcomer : {false, true}) {
        CAPTURE(newcomer);
        loco::comm::single comm;
        fake_clock clock;
        loco::schedule::wallclock s;
        s.use_communicator(comm);
        const loco::schedule::wallclock::hyper h{.seconds = 10.0, .min_total_global_steps = 0,
                                                 .clock = clock.fn()};
        for (int c = 1; c <= 5; ++c) {
            *clock.now += 1.0;
            CHECK(s.next(h).empty());
        }
        loco::schedule::wallclock donor = s;
        s.regrouped(donor, newcomer);
        *clock.now += 100.0;  // the regroup took long
        CHECK(s.next(h).empty());  // opens the window
        int steps = 0;
        bool synced = false;
        while (!synced && steps < 50) {
            *clock.now += 1.0;
            synced = !s.next(h).empty();
            ++steps;
        }
        CHECK(steps == 10);
        CHECK(s.last_window().total_steps == (newcomer ? 11u : 16u));
    }
}

TEST_CASE("wallclock: regrouped with another rank's state, a survivor keeps its own calls and steps "
          "since the sync, a newcomer takes the donor's calls") {
    // As the test above, but the donor is another worker that made a different number of calls
    // (the test above regroups with its own state, where a survivor that took the donor's
    // counters looks the same): the survivor's agreed total must count its own steps since the
    // sync and its call count stay its own; a newcomer counts the donor's calls and no step.
    auto rng = loco_test::rng_for("wallclock regrouped with a donor");
    const int own = std::uniform_int_distribution<int>(1, 9)(rng);  // within one window of 10 s
    int donors = std::uniform_int_distribution<int>(1, 8)(rng);
    if (donors >= own) ++donors;  // 1 to 9, not `own`
    CAPTURE(own);
    CAPTURE(donors);
    for (const bool newcomer : {false, true}) {
        CAPTURE(newcomer);
        loco::comm::single comm;
        fake_clock clock, donor_clock;
        const loco::schedule::wallclock::hyper h{.seconds = 10.0, .min_total_global_steps = 0,
                                                 .clock = clock.fn()};
        const loco::schedule::wallclock::hyper donor_h{
            .seconds = 10.0, .min_total_global_steps = 0, .clock = donor_clock.fn()};
        loco::schedule::wallclock s, donor;
        s.use_communicator(comm);
        donor.use_communicator(comm);
        for (int c = 1; c <= own; ++c) {
            *clock.now += 1.0;
            CHECK(s.next(h).empty());
        }
        for (int c = 1; c <= donors; ++c) {
            *donor_clock.now += 1.0;
            CHECK(donor.next(donor_h).empty());
        }
        s.regrouped(donor, newcomer);
        const auto calls = std::uint64_t(newcomer ? donors : own);
        CHECK(s.calls() == calls);
        *clock.now += 100.0;
        CHECK(s.next(h).empty());  // opens the window
        int steps = 0;
        bool synced = false;
        while (!synced && steps < 50) {
            *clock.now += 1.0;
            synced = !s.next(h).empty();
            ++steps;
        }
        CHECK(steps == 10);
        // One rank: the agreed total is its own steps since the sync.
        CHECK(s.last_window().total_steps == (newcomer ? 0u : std::uint64_t(own)) + 11u);
        CHECK(s.calls() == calls + 11u);
    }
}

TEST_CASE("wallclock: an infinite time when a window opens raises on every rank at the agreement") {
    // Rank 1's clock reads +inf once, when its first window opens: every later elapsed time is
    // -inf, which never reached T, so rank 1 trained on alone while rank 0 waited in the
    // agreement until the group's timeout. The window now closes, and both ranks raise.
    auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::seconds(20));
    std::array<std::string, 2> errors;
    std::vector<std::thread> ranks;
    for (int r = 0; r < 2; ++r) {
        ranks.emplace_back([&, r] {
            loco::comm::threads comm(group, r);
            auto now = std::make_shared<double>(0.0);
            auto reads = std::make_shared<int>(0);
            loco::schedule::wallclock s;
            s.use_communicator(comm);
            const loco::schedule::wallclock::hyper h{
                .seconds = 5.0, .min_total_global_steps = 0, .clock = [=] {
                    return r == 1 && (*reads)++ == 0 ? std::numeric_limits<double>::infinity()
                                                     : *now;
                }};
            try {
                for (int c = 0; c < 40; ++c) {
                    *now += 1.0;
                    s.next(h);
                }
            } catch (const std::exception& e) {
                errors[std::size_t(r)] = e.what();
            }
        });
    }
    for (auto& t : ranks) t.join();
    for (const auto& e : errors) {
        CAPTURE(e);
        CHECK(e.find("clock gave a time that is not finite") != std::string::npos);
    }
}

TEST_CASE("proportional (DyLU): after a regroup every rank times its steps afresh") {
    // Steps of 1 s on both ranks, H = 10. Rank 0 survives a regroup that took 300 s, rank 1 is
    // the newcomer: both time the next round from their next step, so the speeds are equal and
    // H_w stays 10 (timing across the regroup, the survivor measured a speed of 3% and ran 1).
    std::array<std::uint64_t, 2> h_w{};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        fake_clock clock;
        loco::schedule::proportional s;
        s.use_communicator(comm);
        const loco::schedule::proportional::hyper h{.every = 10, .clock = clock.fn()};
        for (int c = 0; c < 23; ++c) {  // two rounds and 3 steps
            *clock.now += 1.0;
            if (!s.next(h).empty()) s.synced(h);
        }
        // The donor's state as regroup() sends it: through the checkpoint container, which
        // does not carry the clock.
        std::stringstream blob;
        {
            loco::detail::checkpoint_writer w(blob);
            s.save(w);
            w.finish();
        }
        loco::detail::checkpoint_reader read_back(blob);
        loco::schedule::proportional donor = loco::schedule::proportional::read(read_back);
        read_back.finish();
        *clock.now += 300.0;  // the failure and the regroup
        s.regrouped(std::move(donor), /*newcomer=*/r == 1);
        while (s.next(h).empty()) *clock.now += 1.0;
        h_w[r] = s.local_steps();
    });
    CHECK(h_w == std::array<std::uint64_t, 2>{10, 10});
}

TEST_CASE("wallclock: a run resumed from a checkpoint inside a window keeps its steps since the "
          "last sync") {
    // min_total_global_steps = 12 with two workers: the window closing at call 4 (8 steps in all)
    // is skipped and the one at call 8 (16 since the sync) syncs; likewise 12 and 16. Saved after
    // call `at` (4, 5, 6: after the skipped window; 9, 10: after the sync) and loaded into fresh
    // handles, the steps since the last sync come back from the checkpoint: the same windows
    // sync, with the same agreed totals and parameters. The clock is not saved,
    // so a resumed run opens a new window at its first step; every 4th step takes T = 8 s (the
    // others 0.5 s or 1 s), which closes whatever window is open, so the windows close at calls
    // 4, 8, 12 and 16 either way (`at` is never the call before a long step, whose new window
    // would open at it; the agreed mean time differs and is not compared).
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::wallclock>;
    constexpr int m = 2, calls = 16;
    constexpr std::size_t n = 3;
    auto rng = loco_test::rng_for("wallclock resume");
    const auto init = loco_test::normal_floats(rng, n);
    std::vector<std::vector<float>> grads;
    for (int i = 0; i < calls * m; ++i) grads.push_back(loco_test::normal_floats(rng, n));
    const auto run = [&](int at) {
        std::array<std::vector<call_record>, m> out;
        loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
            const auto r = std::size_t(comm.rank());
            fake_clock clock;
            std::vector<float> w = init, g(n);
            loco::parameter_list list;
            list.add("w", w, g);
            opt_t::config cfg{.inner = {.lr = 0.1f}, .outer = {.lr = 0.7f}};
            cfg.schedule = {.seconds = 8.0, .min_total_global_steps = 12, .clock = clock.fn()};
            auto opt = std::make_unique<opt_t>(list, comm, cfg);
            for (int c = 1; c <= calls; ++c) {
                g = grads[std::size_t((c - 1) * m) + r];
                *clock.now += c % 4 == 0 ? 8.0 : (r == 0 ? 0.5 : 1.0);
                const std::uint64_t closed = opt->schedule().syncs() + opt->schedule().skipped_windows();
                call_record rec;
                rec.synced = opt->step().synced;
                const auto& s = opt->schedule();
                const bool closes = s.syncs() + s.skipped_windows() != closed;
                rec.counters = {s.syncs(), s.skipped_windows(), closes ? s.last_window().total_steps : 0};
                rec.w = w;
                out[r].push_back(rec);
                if (c == at) {
                    std::stringstream saved;
                    opt->save(saved);
                    opt = std::make_unique<opt_t>(list, comm, cfg);
                    opt->load(saved);
                }
            }
        });
        return out;
    };
    const auto straight = run(0);
    std::vector<int> syncs, totals;
    for (int c = 1; c <= calls; ++c) {
        const call_record& rec = straight[0][std::size_t(c - 1)];
        if (rec.synced) syncs.push_back(c);
        if (rec.counters[2] != 0) totals.push_back(int(rec.counters[2]));
    }
    CHECK(syncs == std::vector<int>{8, 16});
    CHECK(totals == std::vector<int>{8, 16, 8, 16});
    for (const int at : {4, 5, 6, 9, 10}) {
        CAPTURE(at);
        const auto resumed = run(at);
        for (std::size_t r = 0; r < m; ++r) {
            INFO("rank " << r << ": the first call whose sync, counters or parameters differ (0: none)");
            CHECK(first_difference(resumed[r], straight[r]) == 0);
        }
    }
}

TEST_CASE("proportional (DyLU): a run resumed from a checkpoint inside a round ends the round at "
          "the same call") {
    // Step times 1 s and 2 s, H = 8: both workers run 8 steps in round 1, then H_w = 8 and 4.
    // Saved after the `pos`-th call of round `q` on every worker (a consistent cut: the workers
    // meet by rounds, at different calls) and loaded into fresh handles, the round's steps so far
    // come back from the checkpoint, so each worker's rounds end at the same calls as in the run
    // never interrupted. The resumed round is timed from its first step after load(); the step
    // times are constant, so the speeds and H_w are the same.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::proportional>;
    constexpr int m = 2, rounds = 5;
    constexpr std::size_t n = 3;
    auto rng = loco_test::rng_for("proportional resume");
    const auto init = loco_test::normal_floats(rng, n);
    constexpr int drawn = 8 * (rounds + 1);  // calls of gradients (rank 0 runs 40), then again
    std::vector<std::vector<float>> grads;
    for (int i = 0; i < drawn * m; ++i) grads.push_back(loco_test::normal_floats(rng, n));
    // save: {q, pos}; pos 0: no save.
    const auto run = [&](std::array<int, 2> save) {
        std::array<std::vector<call_record>, m> out;
        loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
            const auto r = std::size_t(comm.rank());
            fake_clock clock;
            std::vector<float> w = init, g(n);
            loco::parameter_list list;
            list.add("w", w, g);
            const opt_t::config cfg{.inner = {.lr = 0.1f}, .outer = {.lr = 0.7f},
                                    .schedule = {.every = 8, .clock = clock.fn()}};
            auto opt = std::make_unique<opt_t>(list, comm, cfg);
            // Until every worker has synced `rounds` times (as many collectives on every rank,
            // whatever the rounds' lengths: a run that went wrong ends in a mismatch, not a wait).
            int in_round = 0;
            for (int c = 1; opt->outer_steps() < rounds; ++c) {
                g = grads[std::size_t((c - 1) % drawn * m) + r];
                *clock.now += r == 0 ? 1.0 : 2.0;
                call_record rec;
                rec.synced = opt->step().synced;
                rec.counters = {opt->schedule().local_steps(), opt->schedule().rounds(), opt->outer_steps()};
                rec.w = w;
                out[r].push_back(rec);
                in_round = rec.synced ? 0 : in_round + 1;
                if (int(opt->outer_steps()) == save[0] && in_round == save[1]) {
                    std::stringstream saved;
                    opt->save(saved);
                    opt = std::make_unique<opt_t>(list, comm, cfg);
                    opt->load(saved);
                }
            }
        }, std::chrono::seconds(20));  // a run that went wrong waits 20 s, not 300
        return out;
    };
    const auto straight = run({0, 0});
    std::array<std::vector<int>, m> syncs;
    for (std::size_t r = 0; r < m; ++r) {
        for (std::size_t c = 0; c < straight[r].size(); ++c) {
            if (straight[r][c].synced) syncs[r].push_back(int(c + 1));
        }
    }
    CHECK(syncs[0] == std::vector<int>{8, 16, 24, 32, 40});
    CHECK(syncs[1] == std::vector<int>{8, 12, 16, 20, 24});
    // Rounds 1, 2 and 3 (q = 0, 1, 2): rank 0 saves after calls 2, 5, 10, 17 and 19, rank 1
    // after calls 2, 5, 10, 13 and 15.
    for (const std::array<int, 2> save : {std::array{0, 2}, std::array{0, 5}, std::array{1, 2},
                                          std::array{2, 1}, std::array{2, 3}}) {
        CAPTURE(save[0]);
        CAPTURE(save[1]);
        const auto resumed = run(save);
        for (std::size_t r = 0; r < m; ++r) {
            INFO("rank " << r << ": the first call whose sync, counters or parameters differ (0: none)");
            CHECK(first_difference(resumed[r], straight[r]) == 0);
        }
    }
}

namespace {

// Workers whose steps take step_seconds[k] on their own clocks, the first to close a window
// waiting in the agreement for the last (docs/schedules.md, wallclock: "The workers that close
// first wait in the all-reduce ... for the others"): after the schedule's all-reduce each
// worker's clock reads the latest arrival time. The agreement is the schedule's only collective.
class waiting_agreement final : public loco_test::forwarding_comm {
public:
    waiting_agreement(loco::comm::communicator& next, std::shared_ptr<double> now)
        : forwarding_comm(next, "waiting_agreement"), now_(std::move(now)) {}

protected:
    void do_all_reduce(loco::tensor_view<float> d, loco::comm::reduce_op op) override {
        forwarding_comm::do_all_reduce(d, op);
        const double mine = *now_;
        std::vector<double> all(static_cast<std::size_t>(size()));
        forwarding_comm::do_all_gather(
            loco::host_tensor(reinterpret_cast<const std::byte*>(&mine), sizeof mine),
            loco::host_tensor(reinterpret_cast<std::byte*>(all.data()), all.size() * sizeof mine));
        *now_ = *std::max_element(all.begin(), all.end());
    }

private:
    std::shared_ptr<double> now_;
};

// One closed window as the documented rule gives it (docs/schedules.md, wallclock, "Rule"):
// the call at which each worker closed it and what the workers agreed on.
struct window_ref {
    std::vector<int> close_call;
    double mean_seconds = 0.0;
    std::uint64_t total_steps = 0;
    bool synced = false;
    double longest_wait = 0.0;  // the longest a worker waited in the agreement
};

// The rule in doubles, independent of the schedule's code: the first window opens when the first
// step returns; a window closes at the first step ending >= T after it opened; the workers wait
// for the last one to close; the agreed mean elapsed time is each worker's close time less its
// opening time (the wait is after the close); total = steps since the last sync, the window is
// skipped when total < min_total_global_steps; then every worker opens its next window when the
// agreement returns.
std::vector<window_ref> wallclock_reference(const std::vector<double>& step_seconds, double T,
                                            std::uint64_t min_total, int windows) {
    const std::size_t m = step_seconds.size();
    std::vector<double> t(m), opened(m);
    std::vector<int> calls(m, 1);
    std::vector<std::uint64_t> since(m, 1);
    for (std::size_t k = 0; k < m; ++k) t[k] = opened[k] = step_seconds[k];
    std::vector<window_ref> out;
    for (int w = 0; w < windows; ++w) {
        window_ref ref;
        double elapsed_sum = 0.0, agreed_at = 0.0;
        for (std::size_t k = 0; k < m; ++k) {
            do {
                ++calls[k];
                ++since[k];
                t[k] += step_seconds[k];
            } while (t[k] - opened[k] < T);
            ref.close_call.push_back(calls[k]);
            elapsed_sum += t[k] - opened[k];
            ref.total_steps += since[k];
            agreed_at = std::max(agreed_at, t[k]);
        }
        ref.mean_seconds = elapsed_sum / double(m);
        for (std::size_t k = 0; k < m; ++k) ref.longest_wait = std::max(ref.longest_wait, agreed_at - t[k]);
        ref.synced = ref.total_steps >= min_total;
        for (std::size_t k = 0; k < m; ++k) {
            t[k] = opened[k] = agreed_at;
            if (ref.synced) since[k] = 0;
        }
        out.push_back(ref);
    }
    return out;
}

// The schedule on `m` thread workers through waiting_agreement: each worker's call at every
// window close and the agreed window, as the schedule reports them.
std::vector<std::vector<window_ref>> wallclock_run(const std::vector<double>& step_seconds, double T,
                                                   std::uint64_t min_total, int windows) {
    const int m = int(step_seconds.size());
    std::vector<std::vector<window_ref>> got(static_cast<std::size_t>(m));
    loco::comm::run_threads(m, [&](loco::comm::threads& base) {
        const auto r = std::size_t(base.rank());
        fake_clock clock;
        waiting_agreement comm(base, clock.now);
        loco::schedule::wallclock s;
        s.use_communicator(comm);
        const loco::schedule::wallclock::hyper h{.seconds = T, .min_total_global_steps = min_total,
                                                 .clock = clock.fn()};
        int call = 0;
        while (got[r].size() < std::size_t(windows) && call < 10000) {
            ++call;
            *clock.now += step_seconds[r];
            const std::uint64_t closed = s.syncs() + s.skipped_windows();
            const bool synced = !s.next(h).empty();
            if (s.syncs() + s.skipped_windows() != closed) {
                window_ref w;
                w.close_call = {call};
                w.mean_seconds = s.last_window().mean_seconds;
                w.total_steps = s.last_window().total_steps;
                w.synced = s.last_window().synced;
                CHECK(synced == w.synced);
                got[r].push_back(w);
            }
        }
    });
    return got;
}

// Dyadic step times (multiples of 1/8 s, distinct per worker) and T, so that every time is
// exact in doubles and in the schedule's float sums.
std::vector<double> dyadic_step_seconds(std::mt19937_64& rng, std::size_t m) {
    std::uniform_int_distribution<int> eighths(2, 12);
    std::vector<double> d;
    while (d.size() < m) {
        const double v = eighths(rng) / 8.0;
        if (std::find(d.begin(), d.end(), v) == d.end()) d.push_back(v);
    }
    return d;
}

void check_against_reference(const std::vector<std::vector<window_ref>>& got,
                             const std::vector<window_ref>& want) {
    for (std::size_t r = 0; r < got.size(); ++r) {
        CAPTURE(r);
        REQUIRE(got[r].size() == want.size());
        for (std::size_t w = 0; w < want.size(); ++w) {
            CAPTURE(w);
            CHECK(got[r][w].close_call[0] == want[w].close_call[r]);
            CHECK(got[r][w].mean_seconds == doctest::Approx(want[w].mean_seconds).epsilon(1e-9));
            CHECK(got[r][w].total_steps == want[w].total_steps);
            CHECK(got[r][w].synced == want[w].synced);
        }
    }
}

}  // namespace

TEST_CASE("wallclock: a worker that waited in the agreement opens its next window when the "
          "agreement returns, and the wait is no time of that window") {
    // docs/schedules.md, wallclock "Rule": after the all-reduce "every worker opens its next
    // window"; the workers that close first wait there for the others. So a fast worker's next
    // window opens when the agreement returns (its clock read then), not when it arrived: the
    // wait neither shortens its next window nor counts in the agreed elapsed time. Three workers
    // of random distinct step times, each waiting for the last, against the rule simulated in
    // doubles (wallclock_reference) over four windows.
    auto rng = loco_test::rng_for("wallclock waits in the agreement");
    std::vector<double> d;
    double T = 0.0;
    std::vector<window_ref> want;
    // Draw until some worker waits at an agreement before the last (the window it opens next
    // would then differ from one opened on its arrival); T >= 2 * the longest step keeps every
    // window longer than one step (no "T shorter than one step").
    for (bool waits = false; !waits;) {
        d = dyadic_step_seconds(rng, 3);
        T = std::uniform_int_distribution<int>(24, 48)(rng) / 8.0;
        want = wallclock_reference(d, T, 0, 4);
        for (std::size_t w = 0; w + 1 < want.size(); ++w) waits = waits || want[w].longest_wait > 0.0;
    }
    CAPTURE(d[0]);
    CAPTURE(d[1]);
    CAPTURE(d[2]);
    CAPTURE(T);
    check_against_reference(wallclock_run(d, T, 0, 4), want);
}

TEST_CASE("wallclock: a window with exactly min_total_global_steps steps since the last sync "
          "syncs, one step fewer than the minimum skips it") {
    // docs/schedules.md, wallclock "Rule" (atorch's A-EDiT): "total steps since the last sync <
    // min_total_global_steps: skip". With min_total_global_steps equal to the first window's
    // agreed total the first window syncs; with one more it is skipped and its steps count in
    // the next window's total. Random step times, against the rule simulated in doubles.
    auto rng = loco_test::rng_for("wallclock min_total_global_steps boundary");
    const auto d = dyadic_step_seconds(rng, 3);
    const double T = std::uniform_int_distribution<int>(24, 48)(rng) / 8.0;
    CAPTURE(d[0]);
    CAPTURE(d[1]);
    CAPTURE(d[2]);
    CAPTURE(T);
    const std::uint64_t first_total = wallclock_reference(d, T, 0, 1)[0].total_steps;
    for (const std::uint64_t min_total : {first_total, first_total + 1}) {
        CAPTURE(min_total);
        const auto want = wallclock_reference(d, T, min_total, 3);
        CHECK(want[0].synced == (min_total == first_total));
        check_against_reference(wallclock_run(d, T, min_total, 3), want);
    }
}

namespace {

// A checkpoint with the four consecutive u64 counters `before` replaced by `after` (the schedule's
// state), resealed with a correct checksum: what a checksum cannot catch (a bug, a hand edit).
std::string with_counters(std::string s, std::array<std::uint64_t, 4> before,
                          std::array<std::uint64_t, 4> after) {
    const std::size_t at = s.find(std::string(reinterpret_cast<const char*>(before.data()), 32));
    REQUIRE(at != std::string::npos);
    std::memcpy(s.data() + at, after.data(), 32);
    loco::detail::fnv1a64 h;
    h.add(s.data(), s.size() - 8);
    const std::uint64_t sum = h.value();
    std::memcpy(s.data() + s.size() - 8, &sum, 8);
    return s;
}

}  // namespace

TEST_CASE("wallclock and proportional: counters out of range in a checkpoint are refused or bounded") {
    fake_clock clock;
    std::vector<float> w(8, 1.0f), g(8, 0.5f);
    loco::parameter_list list;
    list.add("w", w, g);
    loco::comm::single comm;
    SUBCASE("wallclock: 2^63 steps since the sync is a corrupted checkpoint's") {
        // It used to load, and the next window converted its float sum (about 1.8e19) to an
        // integer out of range (undefined; 0 on x86-64, so the window was counted as skipped).
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                   loco::schedule::wallclock>;
        const opt_t::config cfg{.inner = {.lr = 0.1f},
                                .schedule = {.seconds = 1000.0, .min_total_global_steps = 1,
                                             .clock = clock.fn()}};
        opt_t a(list, comm, cfg);
        for (int i = 0; i < 5; ++i) {
            *clock.now += 1.0;
            a.step();
        }
        std::ostringstream os;
        a.save(os);
        // calls, steps since the sync, syncs, skipped windows
        const std::string bad = with_counters(os.str(), {5, 5, 0, 0}, {5, ~std::uint64_t{0} - 1000, 0, 0});
        opt_t b(list, comm, cfg);
        std::istringstream is(bad);
        CHECK_THROWS_WITH_AS(b.load(is), doctest::Contains("2^63 or more"), loco::checkpoint_error);
        CHECK(b.schedule().calls() == 0);
    }
    SUBCASE("proportional: H_w above H ends the round at H") {
        // A checkpoint's H_w of 1000 with H = 3 used to load, and the worker then ran 1000 steps
        // before its round ended, its peers waiting in the all-gather.
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                   loco::schedule::proportional>;
        const opt_t::config cfg{.inner = {.lr = 0.1f}, .schedule = {.every = 3, .clock = clock.fn()}};
        opt_t a(list, comm, cfg);
        for (int i = 0; i < 7; ++i) {
            *clock.now += 1.0;
            a.step();
        }
        std::ostringstream os;
        a.save(os);
        // calls, steps of the round, H_w, rounds
        const std::string edited = with_counters(os.str(), {7, 1, 3, 2}, {7, 1, 1000, 2});
        opt_t b(list, comm, cfg);
        std::istringstream is(edited);
        b.load(is);
        for (int i = 0; i < 30; ++i) {
            *clock.now += 1.0;
            b.step();
        }
        CHECK(b.schedule().local_steps() == 3);
        CHECK(b.schedule().rounds() == 2 + 10);  // 2 more steps end round 3, then 9 of 3
    }
    SUBCASE("proportional: an H of 2^63 or more saves and loads (H_w is a setting, not a count)") {
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                   loco::schedule::proportional>;
        const opt_t::config cfg{.inner = {.lr = 0.1f},
                                .schedule = {.every = std::uint64_t{1} << 63, .clock = clock.fn()}};
        opt_t a(list, comm, cfg);
        *clock.now += 1.0;
        a.step();
        REQUIRE(a.schedule().local_steps() == std::uint64_t{1} << 63);
        std::stringstream saved;
        a.save(saved);
        opt_t b(list, comm, cfg);
        CHECK_NOTHROW(b.load(saved));
        CHECK(b.schedule().local_steps() == std::uint64_t{1} << 63);
    }
    SUBCASE("proportional: an H lowered during a run takes effect in the current round") {
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                   loco::schedule::proportional>;
        opt_t a(list, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 6, .clock = clock.fn()}});
        for (int i = 0; i < 7; ++i) {  // round 1 (6 steps) and one step of round 2, H_w = 6
            *clock.now += 1.0;
            a.step();
        }
        a.schedule_hyper().every = 2;
        *clock.now += 1.0;
        CHECK(a.step().synced);  // the round's second step: H_w is 2 now, not 6
        CHECK(a.schedule().local_steps() == 2);
    }
}

TEST_CASE("wallclock: an agreed total of steps since the sync past 2^64 saturates, and the window syncs") {
    // Three ranks resumed with a random count of steps since the sync each, under 2^63 (what
    // load() accepts) but together past 2^64: the float sum's conversion to an integer was out
    // of range (undefined: 0 or 2^63 on x86-64, and the window could be counted as skipped).
    // The total is UINT64_MAX on every rank, and the window syncs.
    std::array<std::uint64_t, 3> total{};
    std::array<bool, 3> synced{};
    loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        auto rng = loco_test::rng_for("wallclock saturated total " + std::to_string(r));
        // each over 2^64 / 3
        const std::uint64_t since_sync = std::uniform_int_distribution<std::uint64_t>(
            6'200'000'000'000'000'000ull, (std::uint64_t{1} << 63) - 1)(rng);
        // The schedule's checkpoint: calls, steps since the sync, syncs, skipped windows.
        std::stringstream blob;
        {
            loco::detail::checkpoint_writer w(blob);
            w.u64(since_sync);
            w.u64(since_sync);
            w.u64(0);
            w.u64(0);
            w.finish();
        }
        loco::detail::checkpoint_reader read_back(blob);
        auto s = loco::schedule::wallclock::read(read_back);
        read_back.finish();
        s.use_communicator(comm);
        fake_clock clock;
        const loco::schedule::wallclock::hyper h{.seconds = 2.0, .min_total_global_steps = 100,
                                                 .clock = clock.fn()};
        for (int c = 0; c < 10 && s.syncs() + s.skipped_windows() == 0; ++c) {
            *clock.now += 1.0;
            s.next(h);
        }
        total[r] = s.last_window().total_steps;
        synced[r] = s.last_window().synced;
    });
    for (std::size_t r = 0; r < 3; ++r) {
        CAPTURE(r);
        CHECK(total[r] == std::numeric_limits<std::uint64_t>::max());
        CHECK(synced[r]);
    }
}
