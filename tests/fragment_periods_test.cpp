// Tests of schedule::fragment_periods (include/loco/schedule/fragment_periods.hpp): each
// user-named fragment synced on its own period.
//
//   * the plan, call by call;
//   * two workers, an embedding synced every 2 calls and the rest every 5, against a plain
//     double-precision re-computation (inner SGD with momentum, outer Nesterov per fragment);
//     the bytes sent equal the sum over fragments of syncs x bytes per sync;
//   * a checkpoint in the middle continues bit-identically;
//   * bad settings refused with one sentence.
#include <doctest/doctest.h>

#include "support/forwarding_comm.hpp"
#include "support/random.hpp"

#include <loco/comm/single.hpp>
#include <loco/comm/threads.hpp>
#include <loco/diloco.hpp>
#include <loco/error.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/nesterov.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/params.hpp>
#include <loco/schedule/fragment_periods.hpp>
#include <loco/tensor.hpp>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <vector>

namespace {

using periods = loco::schedule::fragment_periods;
using handle = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none, periods>;

std::vector<std::size_t> list_of(std::span<const std::size_t> s) { return {s.begin(), s.end()}; }

}  // namespace

TEST_CASE("fragment_periods plans each fragment on its own period") {
    periods s;
    const periods::hyper h{.every = {2, 3, 12}};
    for (std::uint64_t c = 1; c <= 24; ++c) {
        const auto plan = s.next(h);
        std::vector<std::size_t> due;
        for (std::size_t f = 0; f < 3; ++f) {
            if (c % h.every[f] == 0) due.push_back(f);
        }
        INFO("call " << c);
        CHECK(list_of(plan.start) == due);
        CHECK(list_of(plan.finish) == due);
        CHECK(plan.reset.empty());
    }
    CHECK(s.calls() == 24);
    CHECK(periods::fragments(h) == 3);
    CHECK(periods::syncs(h, 1, 24) == 8);
    CHECK(periods::describe(h) == "fragment_periods every=2,3,12 alpha=0 pattern=strided");
}

// Two workers; tensors "embed" (8), "w" (3 x 4) and "b" (5); fragment 0 = {embed} every 2 calls,
// fragment 1 = {w, b} every 5. Each worker's gradient pulls its parameters towards a target of
// its own: g = x - t_r. The re-computation in double, per call c = 1 .. T:
//   inner SGD, momentum mu_i (torch): buf = g on the first step, else mu_i * buf + g; x -= lr * buf
//   for each fragment f with c % H_f == 0, over its elements:
//     delta_r = global - x_r;  d = (delta_0 + delta_1) / 2
//     Nesterov (torch, dampening 0): b = mu * b + d;  global -= lr_o * (d + mu * b)
//     x_r = global                              (alpha = 0: the local values are replaced)
TEST_CASE("fragment_periods: two workers equal a double-precision re-computation, and the bytes "
          "sent are the sum over fragments of syncs times bytes per sync") {
    constexpr int m = 2;
    constexpr std::size_t ne = 8, rows = 3, cols = 4, nb = 5;
    constexpr std::size_t n = ne + rows * cols + nb;
    constexpr std::uint64_t calls = 23;
    const std::array<std::uint64_t, 2> every = {2, 5};
    const float lr = 0.1f, mu_i = 0.5f, lr_o = 0.7f, mu = 0.9f;
    auto rng = loco_test::rng_for("fragment_periods two workers");
    const std::vector<float> init = loco_test::normal_floats(rng, n);
    std::array<std::vector<float>, m> target;
    for (auto& t : target) t = loco_test::normal_floats(rng, n, 2.0f);

    std::array<std::vector<float>, m> final_x;
    std::array<std::uint64_t, m> sent{}, outer0{}, outer1{};
    loco::comm::run_threads(m, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        std::vector<float> x = init, g(n, 0.0f);
        loco::parameter_list params;
        params.add("embed", std::span<float>(x).first(ne), std::span<const float>(g).first(ne));
        params.add_views("w", loco::host_matrix(x.data() + ne, rows, cols),
                         loco::host_matrix(static_cast<const float*>(g.data() + ne), rows, cols));
        params.add("b", std::span<float>(x).subspan(ne + rows * cols),
                   std::span<const float>(g).subspan(ne + rows * cols));
        handle::config cfg{.inner = {.lr = lr, .momentum = mu_i},
                           .outer = {.lr = lr_o, .momentum = mu},
                           .schedule = {.every = {every[0], every[1]}}};
        cfg.fragments.names = {{"embed"}, {"w", "b"}};
        handle opt(params, comm, cfg);
        opt.start();
        const std::uint64_t before = comm.bytes_sent();
        for (std::uint64_t c = 1; c <= calls; ++c) {
            for (std::size_t i = 0; i < n; ++i) g[i] = x[i] - target[r][i];
            opt.step();
        }
        sent[r] = comm.bytes_sent() - before;
        final_x[r] = x;
        outer0[r] = opt.outer_steps(0);
        outer1[r] = opt.outer_steps(1);
    });

    // The re-computation.
    std::array<std::vector<double>, m> x, buf;
    for (int r = 0; r < m; ++r) {
        x[std::size_t(r)].assign(init.begin(), init.end());
        buf[std::size_t(r)].assign(n, 0.0);
    }
    std::vector<double> global(init.begin(), init.end()), b(n, 0.0);
    const auto fragment_of = [&](std::size_t i) { return i < ne ? 0 : 1; };
    for (std::uint64_t c = 1; c <= calls; ++c) {
        for (std::size_t r = 0; r < m; ++r) {
            for (std::size_t i = 0; i < n; ++i) {
                const double g = x[r][i] - double(target[r][i]);
                buf[r][i] = c == 1 ? g : double(mu_i) * buf[r][i] + g;
                x[r][i] -= double(lr) * buf[r][i];
            }
        }
        for (std::size_t i = 0; i < n; ++i) {
            if (c % every[std::size_t(fragment_of(i))] != 0) continue;
            const double d = ((global[i] - x[0][i]) + (global[i] - x[1][i])) / 2;
            b[i] = double(mu) * b[i] + d;
            global[i] -= double(lr_o) * (d + double(mu) * b[i]);
            x[0][i] = global[i];
            x[1][i] = global[i];
        }
    }
    for (std::size_t r = 0; r < m; ++r) {
        for (std::size_t i = 0; i < n; ++i) {
            INFO("worker " << r << " element " << i);
            CHECK(std::abs(final_x[r][i] - x[r][i]) <= 1e-4 * (1 + std::abs(x[r][i])));
        }
        CHECK(outer0[r] == calls / every[0]);
        CHECK(outer1[r] == calls / every[1]);
        // M = 2: a fragment's sync all-reduces its n_f floats (4 n_f bytes sent) and agrees on
        // one float (4 bytes).
        const std::uint64_t want = (calls / every[0]) * (4 * ne + 4) +
                                   (calls / every[1]) * (4 * (rows * cols + nb) + 4);
        CHECK(sent[r] == want);
    }
    // The embedding synced more often: after the last call (23) the embedding last synced at
    // 22, the rest at 20, so the workers differ on both; at call 22 they agreed on the embedding.
    CHECK(final_x[0] != final_x[1]);
}

TEST_CASE("fragment_periods: a checkpoint in the middle of a run continues bit-identically") {
    constexpr std::size_t n = 10;
    auto rng = loco_test::rng_for("fragment_periods checkpoint");
    const std::vector<float> init = loco_test::normal_floats(rng, n);
    const std::vector<float> target = loco_test::normal_floats(rng, n);
    const auto make = [&](std::vector<float>& x, std::vector<float>& g, loco::comm::single& comm) {
        loco::parameter_list params;
        params.add("a", std::span<float>(x).first(4), std::span<const float>(g).first(4));
        params.add("c", std::span<float>(x).subspan(4), std::span<const float>(g).subspan(4));
        handle::config cfg{.inner = {.lr = 0.05f}, .schedule = {.every = {3, 4}, .alpha = 0.25f}};
        cfg.fragments.names = {{"c"}, {"a"}};
        return std::make_unique<handle>(params, comm, cfg);
    };
    const auto run = [&](handle& opt, std::vector<float>& x, std::vector<float>& g, int steps) {
        for (int s = 0; s < steps; ++s) {
            for (std::size_t i = 0; i < n; ++i) g[i] = x[i] - target[i];
            opt.step();
        }
    };
    loco::comm::single comm;
    std::vector<float> x1 = init, g1(n);
    auto straight = make(x1, g1, comm);
    run(*straight, x1, g1, 17);

    std::vector<float> x2 = init, g2(n);
    auto first = make(x2, g2, comm);
    run(*first, x2, g2, 7);
    std::stringstream saved;
    first->save(saved);
    std::vector<float> x3 = x2, g3(n);
    auto second = make(x3, g3, comm);
    second->load(saved);
    run(*second, x3, g3, 10);
    CHECK(x3 == x1);
    CHECK(second->calls() == 17);
    CHECK(second->outer_steps(0) == 17 / 3);
    CHECK(second->outer_steps(1) == 17 / 4);
}

TEST_CASE("fragment_periods refuses bad settings with one sentence") {
    CHECK_THROWS_WITH_AS(periods::validate({.every = {}}), doctest::Contains("one period per fragment"),
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(periods::validate({.every = {4, 0}}),
                         doctest::Contains("the period of fragment 1 is 0"), loco::invalid_argument);
    CHECK_THROWS_WITH_AS(periods::validate({.every = {4}, .alpha = 1.5f}),
                         doctest::Contains("alpha must be in [0, 1]"), loco::invalid_argument);
    std::vector<float> x(6, 1.0f), g(6, 0.5f);
    loco::parameter_list params;
    params.add("a", std::span<float>(x).first(3), std::span<const float>(g).first(3));
    params.add("c", std::span<float>(x).subspan(3), std::span<const float>(g).subspan(3));
    loco::comm::single comm;
    // Two periods but three lists of names.
    handle::config cfg{.schedule = {.every = {2, 3}}};
    cfg.fragments.names = {{"a"}, {"c"}, {}};
    CHECK_THROWS_WITH_AS(handle(params, comm, cfg),
                         doctest::Contains("one list of tensor names per fragment"),
                         loco::invalid_argument);
    cfg.fragments.names = {{"a"}, {"c"}};
    handle opt(params, comm, cfg);
    opt.step();
    // The number of fragments is fixed at construction.
    opt.schedule_hyper().every = {2, 3, 4};
    const std::vector<float> before = x;
    CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("keep the number of fragments"),
                         loco::invalid_argument);
    CHECK(x == before);
    opt.schedule_hyper().every = {2, 0};
    CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
    CHECK(x == before);
}

// Three fragments due at the same call; fragment 1's all-reduce fails on rank 1, so every rank
// raises. Fragment 2's exchange, started in that call and never finished, is dropped: every
// fragment misses the round and the next sync of each is current. (Left in flight, each later
// sync of fragment 2 applied the round before and sent its own on, silently one period late.)
TEST_CASE("fragment_periods: a failed sync drops the exchanges the call started for the others") {
    class fails_once final : public loco_test::forwarding_comm {
    public:
        fails_once(loco::comm::communicator& next, bool& armed)
            : forwarding_comm(next, "fails once"), armed_(armed) {}

    protected:
        void do_all_reduce(loco::tensor_view<float> d, loco::comm::reduce_op op) override {
            forwarding_comm::do_all_reduce(d, op);
            if (armed_ && d.size == 2 && rank() == 1) {  // fragment b's payload
                armed_ = false;
                throw loco::comm_error("test: the link dropped");
            }
        }

    private:
        bool& armed_;
    };
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::fragment_periods>;
    loco::comm::run_threads(2, [&](loco::comm::threads& base) {
        bool armed = false;
        fails_once comm(base, armed);
        const int r = comm.rank();
        std::vector<float> a{0.0f}, b(2, 0.0f), c(3, 0.0f), ga(1), gb(2), gc(3);
        loco::parameter_list list;
        list.add("a", a, ga);
        list.add("b", b, gb);
        list.add("c", c, gc);
        opt_t::config cfg;
        cfg.inner = {.lr = 1.0f};
        cfg.outer = {.lr = 1.0f};  // a sync averages the parameters
        cfg.schedule = {.every = {2, 2, 2}};
        cfg.fragments.names = {{"a"}, {"b"}, {"c"}};
        opt_t opt(list, comm, cfg);
        for (int call = 1; call <= 4; ++call) {
            // Worker r's gradient at call k is (r + 1) k: the workers drift apart between syncs.
            for (auto* g : {&ga, &gb, &gc}) std::fill(g->begin(), g->end(), float((r + 1) * call));
            armed = call == 2;
            if (call == 2) {
                CHECK_THROWS_AS(opt.step(), loco::comm_error);
                for (std::size_t f = 0; f < 3; ++f) CHECK_FALSE(opt.in_flight(f));
            } else {
                opt.step();
            }
        }
        // b and c missed call 2, a applied it; by call 4 each holds the mean of the workers'
        // sums: -(1 + 2 + 3 + 4) (r + 1) averaged over r = 0, 1, i.e. -15 (a: -4.5 - 10.5).
        CHECK(opt.outer_steps(0) == 2);
        CHECK(opt.outer_steps(1) == 1);
        CHECK(opt.outer_steps(2) == 1);
        CHECK(a == std::vector<float>{-15.0f});
        CHECK(b == std::vector<float>(2, -15.0f));
        CHECK(c == std::vector<float>(3, -15.0f));
        for (const float g : opt.global()) CHECK(g == -15.0f);
    });
}
