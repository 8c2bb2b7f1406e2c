// loco::diloco end to end: the pseudo-gradient sign (torchft), the MaxText two-replica example
// (algorithms.md section 9 T5), plain averaging, M = 1, the inner state surviving syncs, a
// four-worker run against a double-precision simulation of the whole algorithm, a policy written
// in this file (extensibility), and what happens to bad input.
#include <doctest/doctest.h>

#include "support/compare.hpp"
#include "support/forwarding_comm.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"

#include <loco/loco.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace loco_test;

// An outer "optimizer" that records the averaged pseudo-gradient in its state and leaves the
// global parameters alone, to observe exactly what the outer step receives.
struct record_outer {
    static constexpr std::string_view name = "record";
    struct hyper {};
    static constexpr int state_size = 1;
    struct scalars {};
    static scalars prepare(const hyper&, std::uint64_t) { return {}; }
    static void update(const scalars&, float&, float delta, float* s) { s[0] = delta; }
};

// A communicator of one rank whose all-reduce doubles its input, like the fake all-reduce of
// torchft's test_gradient_correctness (two identical workers summed).
class doubling_comm final : public loco::comm::communicator {
public:
    int rank() const noexcept override { return 0; }
    int size() const noexcept override { return 1; }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return "doubling"; }
    std::uint64_t bytes_sent() const noexcept override { return 0; }

protected:
    void do_all_reduce(loco::tensor_view<float> data, loco::comm::reduce_op) override {
        for (std::size_t i = 0; i < data.size; ++i) {
            data.data[i] *= 2.0f;
        }
    }
    void do_all_gather(loco::tensor_view<const std::byte>, loco::tensor_view<std::byte>) override {}
    void do_all_to_all(loco::tensor_view<const std::byte>, loco::tensor_view<std::byte>) override {}
    void do_broadcast(loco::tensor_view<std::byte>, int) override {}
    void do_barrier() override {}
};

// A communicator whose all-reduce fails, as a dropped link would.
class broken_comm final : public loco::comm::communicator {
public:
    int rank() const noexcept override { return 0; }
    int size() const noexcept override { return 1; }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return "broken"; }
    std::uint64_t bytes_sent() const noexcept override { return 0; }

protected:
    void do_all_reduce(loco::tensor_view<float> data, loco::comm::reduce_op) override {
        if (data.size) {
            data.data[0] = 12345.0f;  // a collective may scribble on its buffer before failing
        }
        throw loco::comm_error("link down");
    }
    void do_all_gather(loco::tensor_view<const std::byte>, loco::tensor_view<std::byte>) override {}
    void do_all_to_all(loco::tensor_view<const std::byte>, loco::tensor_view<std::byte>) override {}
    void do_broadcast(loco::tensor_view<std::byte>, int) override {}
    void do_barrier() override {}
};

}  // namespace

TEST_CASE("pseudo-gradient sign: parameters moved by +2, all-reduce doubling, outer gradient -4") {
    // torchft local_sgd_test.py::test_gradient_correctness (algorithms.md section 9 T2).
    std::vector<float> w1{1, 2}, w2{3, 4, 5};
    std::vector<float> g1(2, -2.0f), g2(3, -2.0f);  // inner SGD, lr 1: p -= 1 * (-2), i.e. +2
    loco::parameter_list list;
    list.add("w1", w1, g1).add("w2", w2, g2);
    doubling_comm comm;
    loco::diloco<loco::inner::sgd, record_outer> opt(list, comm,
                                                     {.inner = {.lr = 1.0f}, .schedule = {.every = 1}});
    const auto result = opt.step();
    CHECK(result.applied);
    CHECK(result.synced);
    for (const float d : opt.outer_state(0)) {
        CHECK(d == -4.0f);
    }
    // The global parameters are unchanged by this outer policy and written back to the model.
    CHECK(w1 == std::vector<float>{1, 2});
    CHECK(w2 == std::vector<float>{3, 4, 5});

    // With outer SGD (lr 1) the global parameters descend along -4: they move by +4.
    loco::diloco<loco::inner::sgd, loco::outer::sgd> sgd(list, comm,
                                                         {.inner = {.lr = 1.0f}, .schedule = {.every = 1}});
    sgd.step();
    CHECK(w1 == std::vector<float>{5, 6});
    CHECK(w2 == std::vector<float>{7, 8, 9});
}

namespace {

// The MaxText example: y = x.w + b, mean squared error over two samples.
struct replica_data {
    std::array<std::array<double, 2>, 2> x;
    std::array<double, 2> y;
};
const replica_data maxtext_data[2] = {{{{{0, 1}, {1, 0}}}, {1, 2}}, {{{{1, 0}, {0, 1}}}, {2, 3}}};

double mse(const replica_data& d, const double* w, double b) {
    double loss = 0;
    for (int s = 0; s < 2; ++s) {
        const double e = d.x[s][0] * w[0] + d.x[s][1] * w[1] + b - d.y[s];
        loss += e * e / 2;
    }
    return loss;
}
void mse_grad(const replica_data& d, const double* w, double b, double* gw, double& gb) {
    gw[0] = gw[1] = gb = 0;
    for (int s = 0; s < 2; ++s) {
        const double e = d.x[s][0] * w[0] + d.x[s][1] * w[1] + b - d.y[s];
        gw[0] += e * d.x[s][0];  // d/dw of mean(e^2) over 2 samples: 2 e x / 2
        gw[1] += e * d.x[s][1];
        gb += e;
    }
}

}  // namespace

TEST_CASE("MaxText DiLoCo example: two replicas, inner SGD 0.1, outer Nesterov 1.0/0.9, H = 3") {
    // algorithms.md section 9 T5 (MaxText tests/unit/diloco_test.py).
    std::array<std::array<double, 4>, 2> losses{};  // [rank][step 1..4]
    std::array<std::array<float, 3>, 2> after_sync{};
    std::array<std::uint64_t, 2> syncs{};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        std::vector<float> w{2, 1}, b{1}, gw(2), gb(1);
        loco::parameter_list list;
        list.add("w", w, gw).add("b", b, gb);
        loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(
            list, comm,
            {.inner = {.lr = 0.1f}, .outer = {.lr = 1.0f, .momentum = 0.9f}, .schedule = {.every = 3}});
        for (int step = 0; step < 4; ++step) {
            const double wd[2] = {w[0], w[1]};
            losses[r][std::size_t(step)] = mse(maxtext_data[r], wd, b[0]);
            double g[2], g_b;
            mse_grad(maxtext_data[r], wd, b[0], g, g_b);
            gw = {float(g[0]), float(g[1])};
            gb = {float(g_b)};
            if (step == 3) {
                break;  // step 4's loss is computed with the new global parameters
            }
            const auto result = opt.step();
            CHECK(result.synced == (step == 2));
        }
        after_sync[r] = {w[0], w[1], b[0]};
        syncs[r] = opt.outer_steps();
    });
    const auto mean_loss = [&](int step) { return (losses[0][std::size_t(step)] + losses[1][std::size_t(step)]) / 2; };
    CHECK(mean_loss(0) == doctest::Approx(1.0).epsilon(1e-7));
    CHECK(mean_loss(1) == doctest::Approx(0.65).epsilon(1e-6));
    CHECK(mean_loss(2) == doctest::Approx(0.4481).epsilon(1e-6));
    for (const auto& p : after_sync) {
        CHECK(p[0] == doctest::Approx(1.5345).epsilon(1e-5));
        CHECK(p[1] == doctest::Approx(1.0494).epsilon(1e-5));
        CHECK(p[2] == doctest::Approx(0.5839).epsilon(1e-5));
    }
    CHECK(after_sync[0] == after_sync[1]);  // both replicas reset to the same global parameters
    CHECK(mean_loss(3) == doctest::Approx(0.574244).epsilon(1e-6));
    CHECK(syncs[0] == 1);
    CHECK(syncs[1] == 1);
}

TEST_CASE("outer SGD with lr 1 makes the global parameters the mean of the workers'") {
    const int m = 3;
    const std::size_t n = 101;
    std::vector<std::vector<float>> local_before_sync(m), after(m);
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        auto rng = rng_for("averaging/" + std::to_string(r));
        auto init_rng = rng_for("averaging/init");  // the same start everywhere
        std::vector<float> p = normal_floats(init_rng, n), g(n);
        loco::parameter_list list;
        list.add("p", p, g);
        loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(list, comm,
                                                             {.inner = {.lr = 0.1f}, .schedule = {.every = 4}});
        for (int step = 0; step < 4; ++step) {
            const auto fresh = normal_floats(rng, n);
            std::copy(fresh.begin(), fresh.end(), g.begin());
            if (step == 3) {
                // The local parameters just before the sync: this step's update, by hand.
                local_before_sync[r] = p;
                for (std::size_t i = 0; i < n; ++i) {
                    local_before_sync[r][i] -= 0.1f * g[i];
                }
            }
            opt.step();
        }
        after[r] = p;
    });
    mismatch_log log;
    for (std::size_t i = 0; i < n; ++i) {
        const double mean = (double(local_before_sync[0][i]) + local_before_sync[1][i] + local_before_sync[2][i]) / 3;
        for (int r = 0; r < m; ++r) {
            log.expect_close(after[std::size_t(r)][i], mean, 1e-6, [&](auto& s) { s << "rank " << r << " element " << i; });
        }
    }
    log.check();
}

TEST_CASE("M = 1: the outer optimizer is a lookahead around the inner one") {
    auto rng = rng_for("lookahead");
    const std::size_t n = 64;
    std::vector<float> p = normal_floats(rng, n), g(n);
    loco::parameter_list list;
    list.add("p", p, g);
    loco::comm::single comm;
    const loco::inner::adamw::hyper inner{.lr = 1e-2f};
    const loco::outer::nesterov::hyper outer{.lr = 0.7f, .momentum = 0.9f};
    loco::diloco<loco::inner::adamw, loco::outer::nesterov> opt(list, comm,
                                                                {.inner = inner, .outer = outer, .schedule = {.every = 5}});
    // Double simulation: inner AdamW state persists across rounds; each round starts from global.
    std::vector<double> global(p.begin(), p.end()), local = global, m1(n, 0), v(n, 0), mom(n, 0);
    for (std::uint64_t t = 1; t <= 20; ++t) {
        const auto fresh = normal_floats(rng, n);
        std::copy(fresh.begin(), fresh.end(), g.begin());
        for (std::size_t i = 0; i < n; ++i) {
            double s[2] = {m1[i], v[i]};
            reference<loco::inner::adamw>::step(inner, local[i], g[i], s, t);
            m1[i] = s[0];
            v[i] = s[1];
        }
        if (t % 5 == 0) {
            for (std::size_t i = 0; i < n; ++i) {
                double s[1] = {mom[i]};
                reference<loco::outer::nesterov>::step(outer, global[i], global[i] - local[i], s, t / 5);
                mom[i] = s[0];
                local[i] = global[i];
            }
        }
        opt.step();
    }
    CHECK(opt.outer_steps() == 4);
    CHECK(opt.inner_steps() == 20);
    mismatch_log log;
    for (std::size_t i = 0; i < n; ++i) {
        log.expect_close(p[i], local[i], 1e-4, [&](auto& s) { s << "element " << i; });
        log.expect_close(opt.global()[i], global[i], 1e-4, [&](auto& s) { s << "global " << i; });
    }
    log.check();
}

TEST_CASE("the inner optimizer state is never reset by a sync") {
    auto rng = rng_for("inner state kept");
    const std::size_t n = 32;
    std::vector<float> p = normal_floats(rng, n), g = normal_floats(rng, n);
    loco::parameter_list list;
    list.add("p", p, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::adamw, loco::outer::nesterov> opt(list, comm, {.schedule = {.every = 1000}});
    for (int i = 0; i < 3; ++i) {
        opt.step();
    }
    const std::vector<float> m(opt.inner_state(0).begin(), opt.inner_state(0).end());
    const std::vector<float> v(opt.inner_state(1).begin(), opt.inner_state(1).end());
    opt.sync();
    CHECK(std::vector<float>(opt.inner_state(0).begin(), opt.inner_state(0).end()) == m);
    CHECK(std::vector<float>(opt.inner_state(1).begin(), opt.inner_state(1).end()) == v);
    CHECK(opt.inner_steps() == 3);  // bias correction goes on from step 4
    for (const float x : m) {
        CHECK(x != 0.0f);
    }
}

TEST_CASE("four workers: loco::diloco equals a double-precision simulation of DiLoCo") {
    // Every worker starts from its own random parameters; broadcast_initial gives all of them
    // rank 0's. Gradients are random per (rank, step). Inner AdamW, outer Nesterov, H = 5.
    const int m = 4;
    const std::size_t sizes[] = {3, 50, 200};
    const std::size_t total = 253;
    const int steps = 15, every = 5;
    const loco::inner::adamw::hyper inner{.lr = 3e-3f, .weight_decay = 0.05f};
    const loco::outer::nesterov::hyper outer{};
    const auto grads_of = [&](int rank, int step) {
        auto rng = rng_for("four workers/grad/" + std::to_string(rank) + "/" + std::to_string(step));
        return normal_floats(rng, total);
    };
    const auto init_of = [&](int rank) {
        auto rng = rng_for("four workers/init/" + std::to_string(rank));
        return normal_floats(rng, total);
    };
    std::vector<std::vector<float>> final_params(m);
    std::vector<std::uint64_t> bytes(m);
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        std::vector<float> flat = init_of(comm.rank()), grad(total);
        loco::parameter_list list;
        std::size_t offset = 0;
        for (const std::size_t n : sizes) {
            list.add_views("t" + std::to_string(offset), loco::host_tensor(flat.data() + offset, n),
                           loco::host_tensor(static_cast<const float*>(grad.data() + offset), n));
            offset += n;
        }
        loco::diloco<loco::inner::adamw, loco::outer::nesterov> opt(
            list, comm, {.inner = inner, .outer = outer, .schedule = {.every = every}});
        opt.start();  // every worker holds rank 0's parameters before its first gradient
        for (int step = 1; step <= steps; ++step) {
            const auto fresh = grads_of(comm.rank(), step);
            std::copy(fresh.begin(), fresh.end(), grad.begin());  // in place: the views stay valid
            opt.step();
        }
        final_params[std::size_t(comm.rank())] = flat;
        bytes[std::size_t(comm.rank())] = comm.bytes_sent();
    });

    // The simulation, written from algorithms.md section 1.1.
    const auto start = init_of(0);
    std::vector<double> global(start.begin(), start.end()), momentum(total, 0.0);
    std::vector<std::vector<double>> local(m, global), s(m, std::vector<double>(2 * total, 0.0));
    for (int step = 1; step <= steps; ++step) {
        for (int r = 0; r < m; ++r) {
            const auto g = grads_of(r, step);
            for (std::size_t i = 0; i < total; ++i) {
                double st[2] = {s[r][i], s[r][total + i]};
                reference<loco::inner::adamw>::step(inner, local[r][i], g[i], st, std::uint64_t(step));
                s[r][i] = st[0];
                s[r][total + i] = st[1];
            }
        }
        if (step % every == 0) {
            for (std::size_t i = 0; i < total; ++i) {
                double delta = 0;
                for (int r = 0; r < m; ++r) {
                    delta += (global[i] - local[r][i]) / m;
                }
                double st[1] = {momentum[i]};
                reference<loco::outer::nesterov>::step(outer, global[i], delta, st, std::uint64_t(step / every));
                momentum[i] = st[0];
                for (int r = 0; r < m; ++r) {
                    local[r][i] = global[i];
                }
            }
        }
    }
    mismatch_log log;
    for (int r = 0; r < m; ++r) {
        CHECK(final_params[std::size_t(r)] == final_params[0]);  // bit-identical after the last sync
        for (std::size_t i = 0; i < total; ++i) {
            log.expect_close(final_params[std::size_t(r)][i], global[i], 1e-4,
                             [&](auto& os) { os << "rank " << r << " element " << i; });
        }
    }
    log.check();
    // Bytes: the start-up check that every rank built the same model (an all-reduce of 16
    // floats), the initial broadcast from rank 0, then 3 syncs, each an all-reduce of 253 floats
    // and the ranks' agreement on its outcome (an all-reduce of one float).
    for (int r = 0; r < m; ++r) {
        const auto all_reduce = [&](std::size_t n) {
            const std::size_t chunk = n * std::size_t(r + 1) / m - n * std::size_t(r) / m;
            return std::uint64_t(4 * (n + (m - 2) * chunk));
        };
        const std::uint64_t broadcast = r == 0 ? std::uint64_t(m - 1) * 4 * total : 0;
        CHECK(bytes[std::size_t(r)] == all_reduce(16) + broadcast + 3 * (all_reduce(total) + all_reduce(1)));
    }
}

TEST_CASE("broadcast_initial = false keeps every worker's own starting point") {
    std::vector<float> seen(2);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> p{float(comm.rank() + 1)}, g{0.0f};
        loco::parameter_list list;
        list.add("p", p, g);
        loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(
            list, comm, {.schedule = {.every = 100}, .broadcast_initial = false});
        opt.step();
        seen[std::size_t(comm.rank())] = p[0];
        CHECK(comm.bytes_sent() == 64);  // only the start-up check: 16 floats all-reduced
    });
    CHECK(seen == std::vector<float>{1.0f, 2.0f});
}

TEST_CASE("ranks built with different broadcast_initial or max_skipped_syncs are refused at start()") {
    // Either decides a collective step: rank 0 broadcast while rank 1 went on to its first sync
    // (both waited until a timeout), or one rank raised for a stalled run alone.
    for (const int option : {0, 1}) {
        CAPTURE(option);
        std::vector<std::string> errors(2);
        std::vector<float> seen(2);
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            std::vector<float> p{float(comm.rank() + 1)}, g{0.5f};
            loco::parameter_list list;
            list.add("p", p, g);
            loco::diloco<loco::inner::sgd, loco::outer::sgd>::config cfg{.schedule = {.every = 2}};
            if (comm.rank() == 1) {
                if (option == 0) cfg.broadcast_initial = false;
                if (option == 1) cfg.max_skipped_syncs = 3;
            }
            loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(list, comm, cfg);
            try {
                opt.step();
            } catch (const loco::invalid_argument& e) {
                errors[std::size_t(comm.rank())] = e.what();
            }
            seen[std::size_t(comm.rank())] = p[0];
        });
        const std::string want = option == 0 ? "'broadcast_initial: true' where rank 1 has "
                                               "'broadcast_initial: false'"
                                             : "'max_skipped_syncs: 10' where rank 1 has "
                                               "'max_skipped_syncs: 3'";
        for (const std::string& e : errors) {
            CHECK_MESSAGE(e.find("the ranks were built differently") != std::string::npos, e);
            CHECK_MESSAGE(e.find(want) != std::string::npos, e);
        }
        CHECK(seen == std::vector<float>{1.0f, 2.0f});  // nothing applied, nothing broadcast
    }
}

TEST_CASE("the schedule counts step() calls, so a worker that skips a step still syncs with its peers") {
    std::vector<loco::step_result> results(2 * 6);
    std::vector<std::uint64_t> skipped(2), outer(2);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> p{1.0f, 2.0f}, g{0.5f, 0.5f};
        loco::parameter_list list;
        list.add("p", p, g);
        loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(list, comm, {.schedule = {.every = 3}});
        for (int step = 0; step < 6; ++step) {
            g[1] = (comm.rank() == 1 && step == 1) ? std::numeric_limits<float>::infinity() : 0.5f;
            results[std::size_t(comm.rank() * 6 + step)] = opt.step();
        }
        skipped[std::size_t(comm.rank())] = opt.skipped_steps();
        outer[std::size_t(comm.rank())] = opt.outer_steps();
    });
    for (int r = 0; r < 2; ++r) {
        for (int step = 0; step < 6; ++step) {
            const auto& res = results[std::size_t(r * 6 + step)];
            CHECK(res.synced == (step == 2 || step == 5));
            CHECK(res.applied == !(r == 1 && step == 1));
        }
    }
    CHECK(skipped == std::vector<std::uint64_t>{0, 1});
    CHECK(outer == std::vector<std::uint64_t>{2, 2});
}

TEST_CASE("a non-finite averaged pseudo-gradient: skip discards the round everywhere, raise throws") {
    for (const auto policy : {loco::nonfinite_policy::skip, loco::nonfinite_policy::raise}) {
        std::vector<std::vector<float>> after(2);
        std::vector<std::string> errors(2);
        std::vector<std::uint64_t> skipped(2);
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            std::vector<float> p{1.0f, 2.0f}, g{0.0f, 0.0f};
            loco::parameter_list list;
            list.add("p", p, g);
            loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(
                list, comm, {.schedule = {.every = 2}, .on_nonfinite = policy});
            opt.step();
            if (comm.rank() == 1) {
                p[0] = std::numeric_limits<float>::infinity();  // the trainer corrupted its model
            }
            try {
                opt.step();
            } catch (const loco::nonfinite_error& e) {
                errors[std::size_t(comm.rank())] = e.what();
            }
            after[std::size_t(comm.rank())] = p;
            skipped[std::size_t(comm.rank())] = opt.skipped_syncs();
            CHECK(opt.outer_steps() == 0);
            CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == std::vector<float>{1.0f, 2.0f});
        });
        if (policy == loco::nonfinite_policy::skip) {
            // Every worker goes back to the last global parameters.
            CHECK(after[0] == std::vector<float>{1.0f, 2.0f});
            CHECK(after[1] == std::vector<float>{1.0f, 2.0f});
            CHECK(skipped == std::vector<std::uint64_t>{1, 1});
        } else {
            for (const auto& e : errors) {
                CHECK(e.find("the averaged pseudo-gradient holds -inf at flat element 0") != std::string::npos);
            }
            CHECK(after[0] == std::vector<float>{1.0f, 2.0f});  // untouched
            CHECK(std::isinf(after[1][0]));                      // untouched, still the trainer's
        }
    }
}

// A skipped round commits nothing: with error feedback, a residual advanced on the non-finite
// round would keep the infinity (e = e + x - D) and every later round would be skipped too, until
// max_skipped_syncs stops training.
namespace {

// Two rounds (H = 2) of fresh gradients, then what a dropped round must leave as it was: the
// compressor's residual and the global values.
struct round_state {
    std::vector<float> residual, global;
};
template <class Opt>
round_state two_rounds(Opt& opt, std::mt19937_64& rng, std::vector<float>& g) {
    for (int call = 0; call < 4; ++call) {
        loco_test::fill_normal(rng, g);
        opt.step();
    }
    REQUIRE(opt.outer_steps() == 2);
    return {{opt.compressor_state().begin(), opt.compressor_state().end()},
            {opt.global().begin(), opt.global().end()}};
}

}  // namespace

TEST_CASE_TEMPLATE("a round skipped for a non-finite average leaves the residual, and training goes on",
                   C, loco::compress::sparseloco, loco::compress::demo,
                   loco::compress::error_feedback<loco::compress::blockwise<2, 64>>) {
    constexpr std::size_t rows = 16, cols = 16;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        auto rng = loco_test::rng_for("skip keeps the residual " + std::to_string(comm.rank()));
        std::vector<float> w = loco_test::normal_floats(rng, rows * cols), g(rows * cols);
        loco::parameter_list list;
        list.add_views("w", loco::host_matrix(w.data(), rows, cols),
                       loco::host_matrix(static_cast<const float*>(g.data()), rows, cols));
        typename C::hyper h{};
        if constexpr (requires { h.chunk; }) {
            h.chunk = 8;
            h.topk = 4;
        }
        loco::diloco<loco::inner::sgd, loco::outer::sgd, C> opt(
            list, comm, {.inner = {.lr = 0.05f}, .schedule = {.every = 2}, .compress = h});
        const auto [residual, global] = two_rounds(opt, rng, g);
        bool nonzero = false;
        for (const float e : residual) nonzero = nonzero || e != 0.0f;
        CHECK(nonzero);  // error feedback holds something, so "unchanged" means something
        loco_test::fill_normal(rng, g);
        opt.step();
        if (comm.rank() == 0) w[3] = std::numeric_limits<float>::infinity();  // one bad round
        opt.step();
        CHECK(opt.skipped_syncs() == 1);
        CHECK(std::vector<float>(opt.compressor_state().begin(), opt.compressor_state().end()) ==
              residual);
        CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == global);
        CHECK(w == global);
        for (int call = 0; call < 10; ++call) {
            loco_test::fill_normal(rng, g);
            opt.step();
        }
        CHECK(opt.skipped_syncs() == 1);  // the later rounds, all finite, apply
        CHECK(opt.outer_steps() == 7);
        for (const float e : opt.compressor_state()) REQUIRE(std::isfinite(e));
    });
}

// DeMo's sign variant sends one bit a value, so a non-finite pseudo-gradient reaches the
// receivers as finite signs; the residual the sender would keep shows it, and its vote drops
// the round on every rank (or raises, naming the element), instead of a residual stuck at inf
// re-sending the same signs for ever.
TEST_CASE("demo signs: a non-finite pseudo-gradient the payload cannot carry drops the round") {
    constexpr std::size_t rows = 16, cols = 16;
    for (const auto policy : {loco::nonfinite_policy::skip, loco::nonfinite_policy::raise}) {
        CAPTURE(static_cast<int>(policy));
        std::vector<std::string> errors(2);
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            auto rng = loco_test::rng_for("demo signs nonfinite " + std::to_string(comm.rank()));
            std::vector<float> w = loco_test::normal_floats(rng, rows * cols), g(rows * cols);
            loco::parameter_list list;
            list.add_views("w", loco::host_matrix(w.data(), rows, cols),
                           loco::host_matrix(static_cast<const float*>(g.data()), rows, cols));
            loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::demo> opt(
                list, comm,
                {.inner = {.lr = 0.05f}, .outer = {.lr = 0.01f}, .schedule = {.every = 2},
                 .compress = {.chunk = 8, .topk = 4, .sign = true}, .on_nonfinite = policy});
            const auto [residual, global] = two_rounds(opt, rng, g);
            loco_test::fill_normal(rng, g);
            opt.step();
            if (comm.rank() == 1) w[rows * cols - 1] = std::numeric_limits<float>::infinity();
            try {
                opt.step();
            } catch (const loco::nonfinite_error& e) {
                errors[std::size_t(comm.rank())] = e.what();
            }
            CHECK(opt.outer_steps() == 2);
            CHECK(std::vector<float>(opt.compressor_state().begin(),
                                     opt.compressor_state().end()) == residual);
            CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == global);
            if (policy == loco::nonfinite_policy::raise) return;
            CHECK(opt.skipped_syncs() == 1);
            CHECK(w == global);
            for (int call = 0; call < 6; ++call) {
                loco_test::fill_normal(rng, g);
                opt.step();
            }
            CHECK(opt.skipped_syncs() == 1);
            CHECK(opt.outer_steps() == 5);
        });
        if (policy == loco::nonfinite_policy::raise) {
            for (const auto& e : errors) {
                CHECK(e.find("failed on rank 1 at the apply stage") != std::string::npos);
                CHECK(e.find("the error-feedback residual would hold -inf at flat element 255 "
                             "(tensor 'w')") != std::string::npos);
            }
        }
    }
}

TEST_CASE("diloco rejects a communicator of the wrong size and leaves the parameters alone") {
    std::atomic<int> errors{0};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> p{float(comm.rank())}, g{0.0f};
        loco::parameter_list list;
        list.add("p", p, g);
        try {
            loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(list, comm, {.workers = 4});
        } catch (const loco::comm_error& e) {
            if (std::string(e.what()) ==
                "loco::diloco: configured for 4 workers but the threads communicator has 2 ranks") {
                ++errors;
            }
        }
        CHECK(p[0] == float(comm.rank()));
    });
    CHECK(errors == 2);
}

TEST_CASE("a failed sync leaves parameters, global snapshot and outer state unchanged") {
    std::vector<float> p{1.0f, 2.0f, 3.0f}, g{1.0f, 1.0f, 1.0f};
    loco::parameter_list list;
    list.add("p", p, g);
    broken_comm comm;
    loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(list, comm,
                                                               {.inner = {.lr = 0.5f}, .schedule = {.every = 2}});
    opt.step();
    CHECK(p == std::vector<float>{0.5f, 1.5f, 2.5f});
    CHECK_THROWS_WITH_AS(opt.step(), "link down", loco::comm_error);
    // This call's inner update stays applied; nothing of the failed outer step is.
    CHECK(p == std::vector<float>{0.0f, 1.0f, 2.0f});
    CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == std::vector<float>{1.0f, 2.0f, 3.0f});
    for (const float b : opt.outer_state(0)) {
        CHECK(b == 0.0f);
    }
    CHECK(opt.outer_steps() == 0);
}

TEST_CASE("diloco validates hyper-parameters and accessor indices") {
    std::vector<float> p(3), g(3);
    loco::parameter_list list;
    list.add("p", p, g);
    loco::comm::single comm;
    using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    CHECK_THROWS_WITH_AS(opt_t(list, comm, {.schedule = {.every = 0}}), doctest::Contains("every (H) must be >= 1"),
                         loco::invalid_argument);
    CHECK_THROWS_AS(opt_t(list, comm, {.outer = {.momentum = 1.5f}}), loco::invalid_argument);
    CHECK_THROWS_AS(opt_t(list, comm, {.workers = -1}), loco::invalid_argument);
    opt_t opt(list, comm);
    CHECK_THROWS_AS(opt.outer_state(1), loco::invalid_argument);
    CHECK_THROWS_AS(opt.inner_state(2), loco::invalid_argument);
    opt.schedule_hyper().every = 0;
    CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
    CHECK(opt.calls() == 0);
}

// ---- extensibility: an inner optimizer written here, in one struct, used with no other change --

namespace {

// Adagrad (Duchi et al., 2011): s += g^2; p -= lr * g / (sqrt(s) + eps).
struct adagrad {
    static constexpr std::string_view name = "adagrad";
    struct hyper {
        float lr = 0.01f;
        float eps = 1e-10f;
    };
    static constexpr int state_size = 1;
    struct scalars {
        float lr, eps;
    };
    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t) { return {h.lr, h.eps}; }
    LOCO_HD static void update(const scalars& k, float& p, float g, float* s) {
        s[0] += g * g;
        p -= k.lr * g / (loco::math::sqrt(s[0]) + k.eps);
    }
};
static_assert(loco::inner_optimizer<adagrad>);

}  // namespace

TEST_CASE("a user-written inner optimizer plugs into diloco without touching loco") {
    auto rng = rng_for("adagrad");
    const std::size_t n = 40;
    std::vector<float> p = normal_floats(rng, n), g(n);
    std::vector<double> want(p.begin(), p.end()), acc(n, 0.0);
    loco::parameter_list list;
    list.add("p", p, g);
    loco::comm::single comm;
    loco::diloco<adagrad, loco::outer::sgd> opt(list, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 1000}});
    for (int t = 0; t < 25; ++t) {
        const auto fresh = normal_floats(rng, n);
        std::copy(fresh.begin(), fresh.end(), g.begin());
        for (std::size_t i = 0; i < n; ++i) {
            acc[i] += double(g[i]) * g[i];
            want[i] -= 0.1 * g[i] / (std::sqrt(acc[i]) + 1e-10);
        }
        opt.step();
    }
    mismatch_log log;
    for (std::size_t i = 0; i < n; ++i) {
        log.expect_close(p[i], want[i], 1e-5, [&](auto& s) { s << "element " << i; });
    }
    log.check();
}

TEST_CASE("workers that start from different parameters: start() aligns them before any gradient") {
    // With start() before the first forward pass every worker's first gradient is taken at rank
    // 0's parameters and applied; without it, a worker whose parameters the first step() moved
    // does not apply the gradient it computed at its old parameters.
    for (const bool explicit_start : {true, false}) {
        CAPTURE(explicit_start);
        std::vector<std::vector<float>> after(2);
        std::vector<int> applied(2), received(2);
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            std::vector<float> p{float(comm.rank() + 1)}, g{0.0f};
            loco::parameter_list list;
            list.add("p", p, g);
            loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(list, comm,
                                                                 {.inner = {.lr = 0.5f}, .schedule = {.every = 100}});
            if (explicit_start) {
                CHECK(opt.start() == (comm.rank() == 1));
                CHECK_FALSE(opt.start());  // once only
            }
            g[0] = p[0];  // the gradient of p^2 / 2, at the parameters this worker has now
            const loco::step_result r = opt.step();
            applied[std::size_t(comm.rank())] = r.applied ? 1 : 0;
            received[std::size_t(comm.rank())] = r.received_initial ? 1 : 0;
            after[std::size_t(comm.rank())] = p;
        });
        // The step that started the run says when it replaced the worker's parameters (a binding
        // bumps autograd's version counters on it, python/loco/__init__.py).
        CHECK(received == (explicit_start ? std::vector<int>{0, 0} : std::vector<int>{0, 1}));
        if (explicit_start) {
            CHECK(applied == std::vector<int>{1, 1});
            CHECK(after[0] == std::vector<float>{0.5f});
            CHECK(after[1] == std::vector<float>{0.5f});
        } else {
            CHECK(applied == std::vector<int>{1, 0});
            CHECK(after[0] == std::vector<float>{0.5f});
            CHECK(after[1] == std::vector<float>{1.0f});  // rank 0's start, its own gradient unused
        }
    }
}

TEST_CASE("a refused first step leaves the parameters exactly as the trainer set them") {
    std::vector<float> seen(2);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> p{float(comm.rank() + 1)}, g{std::numeric_limits<float>::quiet_NaN()};
        loco::parameter_list list;
        list.add("p", p, g);
        loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(
            list, comm, {.on_nonfinite = loco::nonfinite_policy::raise});
        CHECK_THROWS_AS(opt.step(), loco::nonfinite_error);
        seen[std::size_t(comm.rank())] = p[0];
        CHECK(comm.bytes_sent() == 0);  // the initial broadcast did not run either
    });
    CHECK(seen == std::vector<float>{1.0f, 2.0f});
}

// ---- the all-or-nothing sync: a failure on one rank at any stage changes nothing anywhere ------

namespace {

// Which stage fails, on which rank; read by the wrappers below from every worker thread.
std::atomic<int> inject_stage{0};  // 0 none, 1 encode, 2 transfer, 3 decode
constexpr int failing_rank = 1;
thread_local int this_rank = -1;

// Error feedback over 4-bit blockwise codes (a compressor with state), failing on request.
struct flaky_compressor {
    using real = loco::compress::error_feedback<loco::compress::blockwise<4, 8>>;
    static constexpr std::string_view name = "flaky";
    static constexpr std::uint8_t wire_id = real::wire_id;
    static constexpr int state_size = real::state_size;
    using hyper = real::hyper;
    static std::string describe(const hyper& h) { return real::describe(h); }
    static std::size_t payload_bytes(const hyper& h, std::span<const loco::compress::segment> s) {
        return real::payload_bytes(h, s);
    }
    static void encode(const hyper& h, std::span<const float> x, std::span<const loco::compress::segment> s,
                       std::span<float> state, const loco::compress::encode_context& ctx,
                       std::span<std::byte> out) {
        real::encode(h, x, s, state, ctx, out);  // the state is half written: the handle must not keep it
        if (inject_stage == 1 && ctx.rank == failing_rank) throw loco::wire_error("injected encode failure");
    }
    static void decode(const hyper& h, std::span<const std::byte> in, std::span<const loco::compress::segment> s,
                       std::span<float> out) {
        if (inject_stage == 3 && this_rank == failing_rank) throw loco::wire_error("injected decode failure");
        real::decode(h, in, s, out);
    }
};
static_assert(loco::compress::compressor<flaky_compressor>);

// Forwards to threads; the all-gather fails on one rank after the data moved.
class flaky_comm final : public loco_test::forwarding_comm {
public:
    explicit flaky_comm(loco::comm::communicator& next) : forwarding_comm(next, "flaky") {}

protected:
    void do_all_gather(loco::tensor_view<const std::byte> s, loco::tensor_view<std::byte> r) override {
        forwarding_comm::do_all_gather(s, r);
        if (inject_stage == 2 && rank() == failing_rank && !fired_) {
            fired_ = true;  // once: the ranks' agreement after it must go through
            throw loco::comm_error("injected transfer failure");
        }
    }

private:
    bool fired_ = false;
};

void refill(std::vector<float>& v, std::mt19937_64& rng) {
    const auto fresh = loco_test::normal_floats(rng, v.size());
    std::copy(fresh.begin(), fresh.end(), v.begin());
}

std::string saved(const auto& opt) {
    std::ostringstream os;
    opt.save(os);
    return os.str();
}

}  // namespace

TEST_CASE("all or nothing: a failure on one rank at any stage leaves every rank's state as it was") {
    using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov, flaky_compressor>;
    constexpr int m = 3;
    struct stage_case {
        int inject;  // 1..3 as above, 4: the outer step is refused on the failing rank
        const char* stage;
        const char* message;
    };
    const stage_case cases[] = {{1, "encode", "injected encode failure"},
                                {2, "transfer", "injected transfer failure"},
                                {3, "decode", "injected decode failure"},
                                {4, "apply", "loco::outer::nesterov: lr must be finite and >= 0, got -1.000000"}};
    for (const auto& sc : cases) {
        CAPTURE(sc.stage);
        std::array<std::string, m> errors;
        loco::comm::run_threads(m, [&](loco::comm::threads& threads) {
            this_rank = threads.rank();
            flaky_comm comm(threads);
            auto rng = loco_test::rng_for("all or nothing " + std::to_string(threads.rank()));
            std::vector<float> a = loco_test::normal_floats(rng, 13), b = loco_test::normal_floats(rng, 20);
            std::vector<float> ga(13), gb(20);
            loco::parameter_list list;
            list.add("a", a, ga);
            list.add("b", b, gb);
            opt_t opt(list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 1000}});
            // Two good syncs first, so that residuals, moments and counters are not zero.
            for (int round = 0; round < 2; ++round) {
                for (int step = 0; step < 3; ++step) {
                    refill(ga, rng);  // in place: loco holds views of the gradients
                    refill(gb, rng);
                    opt.step();
                }
                opt.sync();
            }
            for (int step = 0; step < 2; ++step) {
                refill(ga, rng);
                refill(gb, rng);
                opt.step();
            }
            const std::string before = saved(opt);
            const auto a_before = a, b_before = b;
            if (threads.rank() == 0) inject_stage = sc.inject < 4 ? sc.inject : 0;
            threads.barrier();
            if (sc.inject == 4 && threads.rank() == failing_rank) opt.outer_hyper().lr = -1.0f;
            try {
                opt.sync();
            } catch (const loco::error& e) {
                errors[std::size_t(threads.rank())] = e.what();
            }
            threads.barrier();
            if (threads.rank() == 0) inject_stage = 0;
            threads.barrier();
            if (sc.inject == 4 && threads.rank() == failing_rank) opt.outer_hyper().lr = 0.7f;
            const std::string after = saved(opt);
            CHECK(after == before);  // global, outer state, residuals, counters, inner state
            if (after != before && after.size() == before.size()) {
                std::size_t i = 0;
                while (after[i] == before[i]) ++i;
                MESSAGE("rank " << threads.rank() << " first difference at byte " << i << " of " << after.size());
            }
            CHECK(a == a_before);
            CHECK(b == b_before);
            CHECK(opt.outer_steps() == 2);
            // The next sync succeeds everywhere.
            opt.outer_hyper().lr = 0.7f;
            opt.sync();
            CHECK(opt.outer_steps() == 3);
            CHECK(saved(opt) != before);
        });
        for (const auto& e : errors) {
            CHECK(e == std::string("loco::diloco: the sync of fragment 0 failed on rank 1 at the ") +
                           sc.stage + " stage (" + sc.message + "); nothing was applied on any rank");
        }
    }
}

TEST_CASE("all or nothing: ranks failing at the same stage are named by the lowest of them, on every rank") {
    // The error every rank raises is the culprit's: the earliest stage, then the lowest rank.
    // Several ranks refuse the outer step (each a negative lr of its own, so that each rank's
    // message differs): every rank must name the lowest of them and give its message (a
    // comparison that let a later rank of the same stage win named the highest).
    constexpr int m = 4;
    auto rng = loco_test::rng_for("all or nothing lowest failing rank");
    unsigned failing = 0;
    while (std::popcount(failing) < 2) {
        failing = std::uniform_int_distribution<unsigned>(3, 15)(rng);
    }
    const int lowest = std::countr_zero(failing);
    CAPTURE(failing);
    std::array<std::string, m> errors;
    std::array<std::uint64_t, m> outer_steps{};
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        const int r = comm.rank();
        std::vector<float> p(8, 1.0f), g(8, 0.5f);
        loco::parameter_list list;
        list.add("w", p, g);
        loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(
            list, comm, {.inner = {.lr = 0.1f}, .outer = {.lr = 0.7f}, .schedule = {.every = 1000}});
        opt.step();
        if ((failing >> r) & 1u) opt.outer_hyper().lr = -float(r + 1);
        try {
            opt.sync();
        } catch (const loco::error& e) {
            errors[std::size_t(r)] = e.what();
        }
        outer_steps[std::size_t(r)] = opt.outer_steps();
    });
    const std::string want = "loco::diloco: the sync of fragment 0 failed on rank " +
                             std::to_string(lowest) +
                             " at the apply stage (loco::outer::nesterov: lr must be finite and "
                             ">= 0, got -" + std::to_string(lowest + 1) +
                             ".000000); nothing was applied on any rank";
    for (const auto& e : errors) CHECK(e == want);
    CHECK(outer_steps == std::array<std::uint64_t, m>{});
}

TEST_CASE("all or nothing: the error has the failing stage's type on every rank") {
    std::array<int, 2> wire_errors{};
    loco::comm::run_threads(2, [&](loco::comm::threads& threads) {
        this_rank = threads.rank();
        flaky_comm comm(threads);
        std::vector<float> p(8, 1.0f), g(8, 0.5f);
        loco::parameter_list list;
        list.add("p", p, g);
        loco::diloco<loco::inner::sgd, loco::outer::sgd, flaky_compressor> opt(list, comm);
        opt.step();
        if (threads.rank() == 0) inject_stage = 3;
        threads.barrier();
        try {
            opt.sync();
        } catch (const loco::wire_error&) {
            ++wire_errors[std::size_t(threads.rank())];
        }
        threads.barrier();
        if (threads.rank() == 0) inject_stage = 0;
    });
    CHECK(wire_errors == std::array<int, 2>{1, 1});
}

// ---- defects of issue 12 ----------------------------------------------------------------------

TEST_CASE("an empty parameter list starts, steps and syncs on several ranks") {
    // Before the fix start() passed a null pointer to memcmp (undefined behaviour, UBSan).
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        loco::parameter_list list;
        loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(list, comm, {.schedule = {.every = 2}});
        CHECK_FALSE(opt.start());
        opt.step();
        CHECK(opt.step().synced);
        opt.sync();
        CHECK(opt.outer_steps() == 2);
        CHECK(opt.global().empty());
    });
}

TEST_CASE("an exchange_scheme value outside the enumeration is refused at construction") {
    std::vector<float> p(3), g(3);
    loco::parameter_list list;
    list.add("p", p, g);
    loco::comm::single comm;
    CHECK_THROWS_WITH_AS((loco::diloco<loco::inner::sgd, loco::outer::sgd>(
                             list, comm, {.exchange = static_cast<loco::exchange_scheme>(9)})),
                         "loco: exchange_scheme value 9 is not a scheme; use automatic, "
                         "all_reduce, all_gather or two_phase",
                         loco::invalid_argument);
}

TEST_CASE("syncs skipped for non-finite values in a row raise past the limit, naming the tensor") {
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> a{1.0f, 2.0f}, b{3.0f}, ga{0.0f, 0.0f}, gb{0.0f};
        loco::parameter_list list;
        list.add("a", a, ga);
        list.add("b", b, gb);
        loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(
            list, comm, {.schedule = {.every = 1}, .max_skipped_syncs = 3});
        opt.start();
        for (int call = 1; call <= 3; ++call) {
            if (comm.rank() == 1) b[0] = std::numeric_limits<float>::quiet_NaN();  // a broken model
            opt.step();
            CHECK(opt.skipped_syncs() == std::uint64_t(call));
            CHECK(b[0] == 3.0f);  // back to the global value
        }
        if (comm.rank() == 1) b[0] = std::numeric_limits<float>::quiet_NaN();
        CHECK_THROWS_WITH_AS(opt.step(),
                             "loco::diloco: 4 syncs in a row were skipped for a non-finite "
                             "pseudo-gradient, first in tensor 'b'; training has stalled: fix the "
                             "model or lower the learning rate (or raise config.max_skipped_syncs)",
                             loco::nonfinite_error);
        CHECK(opt.skipped_syncs() == 3);
        // A good sync resets the count.
        b[0] = 3.0f;
        opt.step();
        CHECK(opt.outer_steps() == 1);
        for (int call = 1; call <= 3; ++call) {
            if (comm.rank() == 0) a[1] = std::numeric_limits<float>::infinity();
            opt.step();
        }
        CHECK(opt.skipped_syncs() == 6);
    });
}

TEST_CASE("the round after a skipped sync draws fresh stochastic-rounding numbers") {
    // The compressor's round counts skipped syncs too (compress/compressor.hpp: fresh draws at
    // every sync), so the sync after a skipped one does not reuse the skipped round's draws.
    // M = 1, H = 1, 2-bit blockwise with stochastic rounding, one seed. Run "replay": call 1
    // syncs the pseudo-gradient lr g (round 0). Run "after skip": call 1's model is corrupted
    // (skipped, back to the global values), then call 2 syncs the same lr g. Each element rounds
    // alike in both runs with probability p^2 + (1 - p)^2, p = t - floor(t); the count of alike
    // elements must lie within 6 standard deviations of that expectation (reused draws: all).
    using opt_t =
        loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::blockwise<2, 64>>;
    constexpr std::size_t n = 512;
    auto rng = loco_test::rng_for("skipped round fresh draws");
    std::uniform_int_distribution<int> sixty_fourths(-32, 32);
    std::vector<float> g(n);
    for (auto& v : g) v = float(sixty_fourths(rng)) / 64.0f;  // lr g and 0 - lr g are exact
    opt_t::config cfg;
    cfg.inner = {.lr = 0.125f};
    cfg.outer = {.lr = 1.0f};
    cfg.compress = {.round = loco::compress::rounding::stochastic};
    cfg.schedule = {.every = 1};
    cfg.seed = rng();
    CAPTURE(cfg.seed);
    std::array<std::vector<float>, 2> global;  // [replay, after skip]
    for (const bool skip_first : {false, true}) {
        std::vector<float> x(n, 0.0f), gx(n, 0.0f);
        loco::parameter_list list;
        list.add("x", x, gx);
        loco::comm::single comm;
        opt_t opt(list, comm, cfg);
        opt.start();
        if (skip_first) {
            x[0] = std::numeric_limits<float>::infinity();
            opt.step();
            REQUIRE(opt.skipped_syncs() == 1);
            REQUIRE(x == std::vector<float>(n, 0.0f));
        }
        std::copy(g.begin(), g.end(), gx.begin());
        opt.step();
        REQUIRE(opt.outer_steps() == 1);
        global[skip_first ? 1 : 0].assign(opt.global().begin(), opt.global().end());
    }
    double expected_alike = 0.0, variance = 0.0;
    std::size_t alike = 0;
    for (std::size_t block = 0; block < n; block += 64) {
        double s = 0.0;
        for (std::size_t i = block; i < block + 64; ++i) {
            s = std::max(s, std::abs(double(g[i]) / 8));
        }
        for (std::size_t i = block; i < block + 64; ++i) {
            const double t = s == 0.0 ? 1.5 : (double(g[i]) / 8 / s + 1.0) * 1.5;
            const double p = t - std::floor(t);
            const double q = s == 0.0 ? 1.0 : p * p + (1 - p) * (1 - p);
            expected_alike += q;
            variance += q * (1 - q);
            alike += global[0][i] == global[1][i] ? 1 : 0;
        }
    }
    CAPTURE(expected_alike);
    CAPTURE(variance);
    CHECK(alike < n);
    CHECK(double(alike) <= expected_alike + 6.0 * std::sqrt(variance) + 1.0);
    CHECK(double(alike) >= expected_alike - 6.0 * std::sqrt(variance) - 1.0);
}

TEST_CASE("the skip streak is a fragment's own: another fragment's syncs do not end it, and a "
          "checkpoint keeps it") {
    // fragment_periods {1, 4}: 'a' syncs every call, 'b' every fourth; rank 1's 'b' is NaN from
    // the start, so every sync of 'b' is dropped while every sync of 'a' applies. The third
    // dropped sync of 'b' in a row (call 12) raises, though 'a' synced in between.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::fragment_periods>;
    opt_t::config cfg{.schedule = {.every = {1, 4}}, .max_skipped_syncs = 2};
    cfg.fragments.names = {{"a"}, {"b"}};
    const std::string raised =
        "loco::diloco: 3 syncs in a row of fragment 1 were skipped for a non-finite "
        "pseudo-gradient, first in tensor 'b'; training has stalled: fix the model or lower the "
        "learning rate (or raise config.max_skipped_syncs)";
    std::vector<std::string> saved_at_9(2);
    // Calls 1 to 11 (or, resumed from call 9, 10 and 11), then call 12 raises.
    const auto run = [&](bool resumed) {
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            std::vector<float> a{1.0f}, b{3.0f}, ga{0.25f}, gb{0.0f};
            loco::parameter_list list;
            list.add("a", a, ga);
            list.add("b", b, gb);
            opt_t opt(list, comm, cfg);
            const auto rank = std::size_t(comm.rank());
            if (resumed) {
                std::istringstream is(saved_at_9[rank]);
                opt.load(is);
            } else {
                opt.start();
            }
            const auto broken_b = [&] {
                if (rank == 1) b[0] = std::numeric_limits<float>::quiet_NaN();
            };
            for (int call = resumed ? 10 : 1; call <= 11; ++call) {
                broken_b();
                opt.step();
                if (call == 9) {
                    std::ostringstream os;
                    opt.save(os);
                    saved_at_9[rank] = os.str();
                }
            }
            if (!resumed) {
                CHECK(opt.outer_steps(0) == 11);
                CHECK(opt.outer_steps(1) == 0);
                CHECK(opt.skipped_syncs() == 2);
            }
            broken_b();
            CHECK_THROWS_WITH_AS(opt.step(), raised.c_str(), loco::nonfinite_error);
        });
    };
    run(false);
    run(true);  // the checkpoint of call 9 holds fragment 1's streak of two
}

TEST_CASE("sync() refuses a merge alpha that step() refuses, before anything moves") {
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::fragment_periods>;
    for (const float bad : {5.0f, -0.5f, std::numeric_limits<float>::quiet_NaN()}) {
        CAPTURE(bad);
        std::vector<float> x(4, 1.0f), g(4, 1.0f);
        loco::parameter_list list;
        list.add("x", x, g);
        loco::comm::single comm;
        opt_t opt(list, comm,
                  {.inner = {.lr = 0.1f}, .outer = {.lr = 0.5f},
                   .schedule = {.every = {100}, .alpha = 0.5f}});
        opt.step();  // x = 0.9, the global values 1
        opt.schedule_hyper().alpha = bad;
        CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
        CHECK_THROWS_AS(opt.sync(), loco::invalid_argument);
        CHECK(x == std::vector<float>(4, 0.9f));
        CHECK(opt.global()[0] == 1.0f);
        CHECK(opt.outer_steps() == 0);
        CHECK(opt.calls() == 1);
        opt.schedule_hyper().alpha = 0.5f;
        opt.sync();
        CHECK(opt.outer_steps() == 1);
    }
}

// ---- aggregation as a policy: one written here, reading every worker's delta and report --------

namespace {

// Drops the worker whose pseudo-gradient has the largest norm and averages the others (a crude
// robust mean), to show what the interface hands a policy.
struct drop_largest {
    static constexpr std::string_view name = "drop_largest";
    struct hyper {};
    static constexpr bool needs_reports = true;
    static constexpr bool needs_deltas = true;
    static void combine(const hyper&, const loco::aggregate::contributions& c, std::span<float> out) {
        std::size_t largest = 0;
        for (std::size_t k = 1; k < c.workers; ++k) {
            if (c.reports[k].norm > c.reports[largest].norm) largest = k;
        }
        for (std::size_t i = 0; i < out.size(); ++i) {
            float sum = 0.0f;
            for (std::size_t k = 0; k < c.workers; ++k) {
                if (k != largest) sum += c.delta(k)[i];
            }
            out[i] = sum / static_cast<float>(c.workers - 1);
        }
    }
};

}  // namespace

TEST_CASE("a user-written aggregation sees every worker's delta and report, on every rank alike") {
    constexpr int m = 3;
    constexpr std::size_t n = 10;
    auto rng = loco_test::rng_for("drop largest");
    const auto init = loco_test::normal_floats(rng, n);
    std::array<std::vector<float>, m> grads;
    for (int r = 0; r < m; ++r) grads[std::size_t(r)] = loco_test::normal_floats(rng, n, float(r + 1));
    // Reference: each worker's delta after one SGD step is lr * grad; the largest norm is dropped.
    const float lr = 0.1f;
    std::array<double, m> norms{};
    for (int r = 0; r < m; ++r) {
        for (const float g : grads[std::size_t(r)]) norms[std::size_t(r)] += double(lr * g) * double(lr * g);
    }
    const auto largest = std::size_t(std::max_element(norms.begin(), norms.end()) - norms.begin());
    std::vector<double> expected(n);
    for (std::size_t i = 0; i < n; ++i) {
        double sum = 0.0;
        for (std::size_t r = 0; r < m; ++r) {
            if (r != largest) sum += double(lr) * grads[r][i];
        }
        expected[i] = double(init[i]) - sum / (m - 1);
    }
    std::array<std::vector<float>, m> after;
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        std::vector<float> w = init, g = grads[std::size_t(comm.rank())];
        loco::parameter_list list;
        list.add("w", w, g);
        loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, loco::schedule::every, drop_largest>
            opt(list, comm, {.inner = {.lr = lr}, .schedule = {.every = 1}});
        CHECK(opt.exchange() == loco::exchange_scheme::all_gather);  // every worker's delta travels
        opt.step();
        after[std::size_t(comm.rank())] = w;
        // Bytes: the payload to each peer, the reports, the agreement (one float all-reduced: the
        // rank that owns it in the ring sends it once more).
        const std::size_t r = std::size_t(comm.rank());
        const std::size_t owns = (r + 1) / m - r / m;
        CHECK(opt.bytes_per_sync() == (m - 1) * (loco::compress::wire::header_bytes + 4 * n) +
                                          (m - 1) * sizeof(loco::aggregate::worker_report) +
                                          4 * (1 + (m - 2) * owns));
        // all_reduce cannot carry every delta.
        CHECK_THROWS_WITH_AS((loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                           loco::schedule::every, drop_largest>(
                                 list, comm, {.exchange = loco::exchange_scheme::all_reduce})),
                             doctest::Contains("only exchange_scheme::all_gather delivers"),
                             loco::invalid_argument);
    });
    for (int r = 0; r < m; ++r) {
        CHECK(after[std::size_t(r)] == after[0]);
        for (std::size_t i = 0; i < n; ++i) {
            CHECK(after[std::size_t(r)][i] == doctest::Approx(expected[i]).epsilon(1e-6));
        }
    }
}

TEST_CASE("start(): 300 identically built ranks agree (the fingerprint check is exact past 255 ranks), and one different rank is named") {
    // The sums of the digests' bytes and squares are exact in floats only below 256 ranks;
    // larger groups compare the gathered digests.
    constexpr int ranks = 300;
    for (const bool odd_one : {false, true}) {
        CAPTURE(odd_one);
        std::atomic<int> started{0}, named{0};
        loco::comm::run_threads(ranks, [&](loco::comm::threads& comm) {
            // (With these names and sizes the float sums of 300 equal digests round: found by
            // trying names against the previous check.)
            std::vector<float> w(4, 1.0f), g(4, 0.0f);
            loco::parameter_list list;
            const bool differs = odd_one && comm.rank() == ranks - 1;
            list.add(differs ? "w3" : "w2", w, g);
            loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(
                list, comm, {.broadcast_initial = false});
            const std::uint64_t before = comm.bytes_sent();
            try {
                opt.start();
                // What start() sent is what fingerprint_bytes() says: the digests' all-gather.
                if (comm.bytes_sent() - before == opt.fingerprint_bytes() &&
                    opt.fingerprint_bytes() == 8 * (ranks - 1)) {
                    ++started;
                }
            } catch (const loco::invalid_argument& e) {
                if (std::string(e.what()).find("where rank 299 has") != std::string::npos) ++named;
            }
        });
        CHECK(started == (odd_one ? 0 : ranks));
        CHECK(named == (odd_one ? ranks : 0));
    }
}
