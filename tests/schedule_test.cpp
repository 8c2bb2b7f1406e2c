// Sync schedules as planners: what each plans call by call, the one-outer-step delayed schedule
// against a double-precision re-computation of DiLoCoX's rule, M = 1 (the outer optimizer as a
// lookahead) under every schedule, and schedules that break the pipeline's rules (an exchange
// started twice, or finished without being started).
#include <doctest/doctest.h>

#include "support/random.hpp"

#include <loco/loco.hpp>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace {

std::vector<std::size_t> list_of(std::span<const std::size_t> s) { return {s.begin(), s.end()}; }

}  // namespace

TEST_CASE("schedules plan: every, streaming (torchft offsets), delayed (first round applies nothing)") {
    loco::schedule::every every;
    for (std::uint64_t c = 1; c <= 12; ++c) {
        const auto plan = every.next({.every = 4});
        CHECK(list_of(plan.start) == (c % 4 == 0 ? std::vector<std::size_t>{0} : std::vector<std::size_t>{}));
        CHECK(list_of(plan.finish) == list_of(plan.start));
        CHECK(plan.reset.empty());
    }
    CHECK(every.calls() == 12);

    // H = 12, P = 3, tau = 2: fragment p applies at (p + 1) * 4 mod 12 and starts 2 calls earlier.
    loco::schedule::streaming streaming;
    const loco::schedule::streaming::hyper h{.every = 12, .fragments = 3, .overlap = 2};
    std::vector<std::pair<std::uint64_t, std::size_t>> starts, finishes;
    for (std::uint64_t c = 1; c <= 24; ++c) {
        const auto plan = streaming.next(h);
        for (auto f : plan.start) starts.emplace_back(c, f);
        for (auto f : plan.finish) finishes.emplace_back(c, f);
    }
    using pairs = std::vector<std::pair<std::uint64_t, std::size_t>>;
    CHECK(starts == pairs{{2, 0}, {6, 1}, {10, 2}, {14, 0}, {18, 1}, {22, 2}});
    CHECK(finishes == pairs{{4, 0}, {8, 1}, {12, 2}, {16, 0}, {20, 1}, {24, 2}});

    loco::schedule::delayed delayed;
    for (std::uint64_t c = 1; c <= 9; ++c) {
        const auto plan = delayed.next({.every = 3});
        const bool round_end = c % 3 == 0;
        CHECK(list_of(plan.start) == (round_end ? std::vector<std::size_t>{0} : std::vector<std::size_t>{}));
        CHECK(list_of(plan.reset) == list_of(plan.start));
        CHECK(list_of(plan.finish) == (round_end && c >= 6 ? std::vector<std::size_t>{0} : std::vector<std::size_t>{}));
    }
    CHECK(loco::schedule::streaming::describe(h) == "streaming H=12 P=3 tau=2 alpha=0.5 pattern=strided");
    CHECK(loco::schedule::delayed::describe({.every = 3}) == "delayed H=3");
}

TEST_CASE("delayed schedule: H changed mid-run keeps one exchange in flight, applied one round late") {
    // The plan alone: H = 4 for calls 1-5, then 6; rounds end at calls 4, 6, 12. Round 1 (ended
    // at call 4) is applied at call 6, round 2 at call 12.
    loco::schedule::delayed grown;
    std::vector<std::uint64_t> finishes, starts;
    for (std::uint64_t c = 1; c <= 12; ++c) {
        const auto plan = grown.next({.every = c <= 5 ? 4u : 6u});
        if (!plan.finish.empty()) finishes.push_back(c);
        if (!plan.start.empty()) starts.push_back(c);
    }
    CHECK(starts == std::vector<std::uint64_t>{4, 6, 12});
    CHECK(finishes == std::vector<std::uint64_t>{6, 12});
    // H = 4 shrunk to 2 at call 3: the first round ends at call 4 and applies nothing.
    loco::schedule::delayed shrunk;
    finishes.clear();
    for (std::uint64_t c = 1; c <= 8; ++c) {
        if (!shrunk.next({.every = c <= 2 ? 4u : 2u}).finish.empty()) finishes.push_back(c);
    }
    CHECK(finishes == std::vector<std::uint64_t>{6, 8});

    // The handle, two workers, SGD outer lr 1 (the global values take the mean): after each
    // round end one exchange is in flight, and the global values are what the round before
    // sent. Before, growing H raised "the schedule starts fragment 0 while its previous exchange
    // was never finished" at call 6, and shrinking it applied every round without delay.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::delayed>;
    for (const bool grow : {true, false}) {
        CAPTURE(grow);
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            std::vector<float> w{0.0f}, g{0.0f};
            loco::parameter_list list;
            list.add("w", w, g);
            opt_t opt(list, comm, {.inner = {.lr = 1.0f}, .outer = {.lr = 1.0f},
                                   .schedule = {.every = 4}});
            std::vector<float> sent;  // each round's mean pseudo-gradient, as a global value
            float global = 0.0f, round_start = 0.0f;
            for (std::uint64_t c = 1; c <= 12; ++c) {
                opt.schedule_hyper().every = grow ? (c <= 5 ? 4 : 6) : (c <= 2 ? 4 : 2);
                g[0] = -1.0f - float(comm.rank());  // w moves by 1.5 per call on average
                const bool round_end = c % opt.schedule_hyper().every == 0;
                const float steps = float(c) - round_start;
                const auto result = opt.step();
                if (!round_end) continue;
                CHECK(result.synced == !sent.empty());
                if (!sent.empty()) global = sent.back();
                sent.push_back(global + 1.5f * steps);
                round_start = float(c);
                CHECK(opt.in_flight(0));
                CHECK(opt.global()[0] == global);
                CHECK(w[0] == global);
            }
            CHECK(opt.outer_steps() == sent.size() - 1);
        });
    }
}

TEST_CASE("delayed schedule: three workers equal a double-precision re-computation of the one-step delay") {
    constexpr int m = 3;
    constexpr std::size_t n = 6;
    constexpr std::uint64_t H = 3;
    constexpr int calls = 14;  // four full rounds and two steps
    const float lr = 0.05f;
    const float outer_lr = 0.7f, mu = 0.9f;
    auto rng = loco_test::rng_for("delayed schedule");
    const auto init = loco_test::normal_floats(rng, n);
    std::vector<std::vector<float>> grads;  // [call * m + rank]
    for (int i = 0; i < calls * m; ++i) grads.push_back(loco_test::normal_floats(rng, n));

    // The reference: double precision, the rule of algorithms.md 6.1.
    std::vector<double> global(init.begin(), init.end()), momentum(n, 0.0);
    std::vector<std::vector<double>> local(m, global);
    std::optional<std::vector<double>> pending;
    std::vector<std::uint64_t> applied_after;
    int outer = 0;
    for (int c = 1; c <= calls; ++c) {
        for (int r = 0; r < m; ++r) {
            for (std::size_t i = 0; i < n; ++i) local[r][i] -= lr * grads[std::size_t((c - 1) * m + r)][i];
        }
        if (c % H != 0) continue;
        std::vector<double> mean(n, 0.0);
        for (int r = 0; r < m; ++r) {
            for (std::size_t i = 0; i < n; ++i) mean[i] += (global[i] - local[r][i]) / m;
        }
        if (pending) {
            for (std::size_t i = 0; i < n; ++i) {
                momentum[i] = mu * momentum[i] + (*pending)[i];
                global[i] -= outer_lr * ((*pending)[i] + mu * momentum[i]);
            }
            ++outer;
        }
        for (int r = 0; r < m; ++r) local[r] = global;
        pending = mean;
    }
    CHECK(outer == 3);

    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                               loco::schedule::delayed>;
    std::array<std::vector<float>, m> finals, globals, flushed, flushed_globals;
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        std::vector<float> w = init, g(n);
        loco::parameter_list list;
        list.add("w", w, g);
        opt_t opt(list, comm, {.inner = {.lr = lr}, .outer = {.lr = outer_lr, .momentum = mu}, .schedule = {.every = H}});
        for (int c = 1; c <= calls; ++c) {
            g = grads[std::size_t((c - 1) * m) + r];
            const auto result = opt.step();
            CHECK(result.synced == (c % H == 0 && c >= int(2 * H)));
            if (c == int(H)) {
                // The first round applies nothing, resets the local values and leaves its
                // pseudo-gradient in flight.
                CHECK(opt.outer_steps() == 0);
                CHECK(w == init);
                CHECK(opt.in_flight(0));
            }
        }
        CHECK(opt.outer_steps() == 3);
        finals[r] = w;
        globals[r].assign(opt.global().begin(), opt.global().end());
        // The end of the run: flush() applies round 4's exchange, still in flight, once (no
        // further outer step) and resets the local values to the new global ones.
        REQUIRE(opt.in_flight(0));
        opt.flush();
        CHECK(!opt.in_flight(0));
        CHECK(opt.outer_steps() == 4);
        flushed[r] = w;
        flushed_globals[r].assign(opt.global().begin(), opt.global().end());
    });
    for (int r = 0; r < m; ++r) {
        for (std::size_t i = 0; i < n; ++i) {
            CHECK(finals[r][i] == doctest::Approx(local[r][i]).epsilon(1e-5));
            CHECK(globals[r][i] == doctest::Approx(global[i]).epsilon(1e-5));
        }
        CHECK(globals[r] == globals[0]);
    }
    for (std::size_t i = 0; i < n; ++i) {
        momentum[i] = mu * momentum[i] + (*pending)[i];
        global[i] -= outer_lr * ((*pending)[i] + mu * momentum[i]);
    }
    for (int r = 0; r < m; ++r) {
        for (std::size_t i = 0; i < n; ++i) {
            CHECK(flushed_globals[r][i] == doctest::Approx(global[i]).epsilon(1e-5));
        }
        CHECK(flushed[r] == flushed_globals[r]);
    }
}

TEST_CASE("M = 1: every schedule runs with comm::single, the outer optimizer as a lookahead") {
    loco::comm::single comm;
    SUBCASE("streaming: one replica follows torchft's fixture _4 (tau 1, alpha 0.5)") {
        std::vector<float> w0{1.0f}, w1{1.0f}, g0{2.0f}, g1{2.0f};
        loco::parameter_list list;
        list.add("layers.0.weight", w0, g0);
        list.add("layers.1.weight", w1, g1);
        loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, loco::schedule::streaming> opt(
            list, comm,
            {.inner = {.lr = 1.0f}, .outer = {.lr = 2.0f},
             .schedule = {.every = 6, .fragments = 2, .overlap = 1, .alpha = 0.5f}});
        const std::array<float, 15> f0 = {-1, -3, -6, -8, -10, -12, -14, -16, -21.5f, -23.5f, -25.5f, -27.5f, -29.5f, -31.5f, -35.75f};
        const std::array<float, 15> f1 = {-1, -3, -5, -7, -9, -15, -17, -19, -21, -23, -25, -29, -31, -33, -35};
        for (std::size_t s = 0; s < 15; ++s) {
            opt.step();
            CHECK(w0[0] == f0[s]);
            CHECK(w1[0] == f1[s]);
        }
    }
    SUBCASE("delayed: with outer SGD lr 1 the global trails the local model by one round") {
        std::vector<float> w{0.0f}, g{1.0f};
        loco::parameter_list list;
        list.add("w", w, g);
        loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, loco::schedule::delayed> opt(
            list, comm, {.inner = {.lr = 1.0f}, .schedule = {.every = 2}});
        opt.step();
        opt.step();  // round 1: local -2 shipped, nothing applied, local reset to 0
        CHECK(w[0] == 0.0f);
        opt.step();
        opt.step();  // round 2: delta 2 (this round), apply round 1's 2: global -2, local -2
        CHECK(w[0] == -2.0f);
        CHECK(opt.global()[0] == -2.0f);
        opt.sync();  // flush: round 2's delta applied (-4), then a fresh one of 0
        CHECK(w[0] == -4.0f);
        CHECK(opt.outer_steps() == 3);
        CHECK(!opt.in_flight(0));
    }
}

namespace {

// A schedule written here that starts fragment 0 at every call and never finishes it.
struct never_finishes {
    static constexpr std::string_view name = "never_finishes";
    struct hyper {};
    static std::size_t fragments(const hyper&) { return 1; }
    loco::schedule::sync_plan next(const hyper&) {
        ++calls_;
        return {loco::schedule::fragment_zero, {}, {}};
    }
    std::uint64_t calls() const { return calls_; }
    void save(loco::detail::checkpoint_writer& w) const { w.u64(calls_); }
    static never_finishes read(loco::detail::checkpoint_reader& r) {
        never_finishes s;
        s.calls_ = r.u64("calls");
        return s;
    }
    std::uint64_t calls_ = 0;
};
static_assert(loco::sync_schedule<never_finishes>);

// One that finishes fragment 0 at every call without starting it.
struct never_starts : never_finishes {
    static constexpr std::string_view name = "never_starts";
    loco::schedule::sync_plan next(const hyper&) {
        ++calls_;
        return {{}, loco::schedule::fragment_zero, {}};
    }
    static never_starts read(loco::detail::checkpoint_reader& r) {
        never_starts s;
        s.calls_ = r.u64("calls");
        return s;
    }
};

}  // namespace

TEST_CASE("an exchange started twice or finished without a start is refused with the fix named") {
    loco::comm::single comm;
    std::vector<float> w{1.0f}, g{1.0f};
    loco::parameter_list list;
    list.add("w", w, g);
    {
        loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, never_finishes> opt(
            list, comm, {.inner = {.lr = 1.0f}});
        opt.step();
        CHECK(opt.in_flight(0));
        CHECK_THROWS_WITH_AS(opt.step(),
                             "loco::diloco: the schedule starts fragment 0 while its previous "
                             "exchange was never finished; a schedule must finish every exchange "
                             "it starts",
                             loco::invalid_argument);
        opt.sync();  // finishes it
        CHECK(!opt.in_flight(0));
    }
    {
        loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, never_starts> opt(
            list, comm, {.inner = {.lr = 1.0f}});
        CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("finishes fragment 0 but no exchange of it is in flight"),
                             loco::invalid_argument);
        CHECK(opt.outer_steps() == 0);
    }
    // The exchanger itself: a finish without a start, and a start while one is in flight.
    loco::detail::exchanger<loco::compress::none> ex(list, loco::exchange_scheme::automatic, 1, 0, {});
    std::vector<float> out(1), delta{0.5f};
    CHECK_THROWS_WITH_AS(ex.finish(comm, out, {}), doctest::Contains("finished twice, or never started"),
                         loco::invalid_argument);
    ex.start(comm, delta, {}, {});
    CHECK_THROWS_AS(ex.start(comm, delta, {}, {}), loco::invalid_argument);
    ex.finish(comm, out, {});
    CHECK(out[0] == 0.5f);
    CHECK_THROWS_AS(ex.finish(comm, out, {}), loco::invalid_argument);
}
