// Tests of schedule::state_periods (include/loco/schedule/state_periods.hpp), DES-LOC: the
// parameters averaged every K_x calls, AdamW's first moment every K_u and second moment every
// K_v, each worker running its own AdamW.
//
//   * the plan, call by call, and the count of syncs over T calls;
//   * 3 thread workers on a random quadratic with fresh noise at every call against a plain
//     double-precision re-computation of DES-LOC: every rank's parameters, m and v;
//   * the bytes sent: syncs x bytes per sync, summed over parameters, m and v;
//   * K_u = K_v = 0 is plain parameter averaging (schedule::every), bit for bit;
//   * bad settings refused with one sentence, before anything changes;
//   * a failed state sync changes nothing on any rank (every rank raises the same error);
//   * a checkpoint in the middle continues bit-identically;
//   * non-finite state averages are skipped, counted, and raise after max_skipped_syncs in a row;
//     a finite average between two ends the streak; under nonfinite_policy::ignore a non-finite
//     average is committed, neither skipped nor counted;
//   * parameter groups: array 1 is averaged only in the group that keeps one, and each group's
//     average is the mean of the ranks' arrays in a run without state averaging.
#include <doctest/doctest.h>

#include "support/forwarding_comm.hpp"
#include "support/random.hpp"

#include <loco/comm/single.hpp>
#include <loco/comm/threads.hpp>
#include <loco/diloco.hpp>
#include <loco/error.hpp>
#include <loco/groups.hpp>
#include <loco/inner/adamw.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/params.hpp>
#include <loco/schedule/every.hpp>
#include <loco/schedule/state_periods.hpp>
#include <loco/schedule/warmup.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using periods = loco::schedule::state_periods;
using desloc = loco::diloco<loco::inner::adamw, loco::outer::sgd, loco::compress::none, periods>;
using averaging =
    loco::diloco<loco::inner::adamw, loco::outer::sgd, loco::compress::none, loco::schedule::every>;

constexpr int workers = 3;
constexpr std::size_t rows = 4, cols = 5, nb = 7, n = rows * cols + nb;
const loco::inner::adamw::hyper adam{.lr = 0.05f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
                                     .weight_decay = 0.1f};

// A random quadratic per worker: g = d * (x - t_r) + noise(r, c), the noise fresh at every call.
struct problem {
    std::vector<float> init, d;
    std::array<std::vector<float>, workers> target;
    std::vector<std::vector<float>> noise;  // [call - 1][r * n + i]

    problem(const std::string& label, std::uint64_t calls) {
        auto rng = loco_test::rng_for(label);
        init = loco_test::normal_floats(rng, n);
        d = loco_test::normal_floats(rng, n, 0.5f, 1.0f);
        for (auto& x : d) x = std::abs(x) + 0.1f;
        for (auto& t : target) t = loco_test::normal_floats(rng, n, 2.0f);
        for (std::uint64_t c = 0; c < calls; ++c) {
            noise.push_back(loco_test::normal_floats(rng, workers * n, 0.3f));
        }
    }
    float grad(std::size_t r, std::uint64_t call, std::size_t i, float x) const {
        return d[i] * (x - target[r][i]) + noise[call - 1][r * n + i];
    }
};

// One worker's model: "w" (rows x cols) and "b" (nb) over one flat array.
struct model {
    std::vector<float> x, g = std::vector<float>(n, 0.0f);
    loco::parameter_list list;
    explicit model(const std::vector<float>& init) : x(init) {
        list.add_views("w", loco::host_matrix(x.data(), rows, cols),
                       loco::host_matrix(static_cast<const float*>(g.data()), rows, cols));
        list.add("b", std::span<float>(x).subspan(rows * cols),
                 std::span<const float>(g).subspan(rows * cols));
    }
    void gradients(const problem& p, std::size_t r, std::uint64_t call) {
        for (std::size_t i = 0; i < n; ++i) g[i] = p.grad(r, call, i, x[i]);
    }
};

// What a run leaves on one worker.
struct outcome {
    std::vector<float> x, m, v;
    std::uint64_t sent = 0;
    bool operator==(const outcome&) const = default;
};

template <class Handle>
outcome outcome_of(const Handle& opt, const model& w) {
    const auto m = opt.inner_state(0), v = opt.inner_state(1);
    return {w.x, {m.begin(), m.end()}, {v.begin(), v.end()}, 0};
}

// Runs `calls` calls of a handle on every worker; returns each rank's outcome.
template <class Handle>
std::array<outcome, workers> run(const problem& p, const typename Handle::config& cfg,
                                 std::uint64_t calls) {
    std::array<outcome, workers> out;
    loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        model w(p.init);
        Handle opt(w.list, comm, cfg);
        opt.start();
        const std::uint64_t before = comm.bytes_sent();
        for (std::uint64_t c = 1; c <= calls; ++c) {
            w.gradients(p, r, c);
            opt.step();
        }
        out[r] = outcome_of(opt, w);
        out[r].sent = comm.bytes_sent() - before;
    });
    return out;
}

// DES-LOC in double, per call c = 1 .. T, per worker (torch.optim.AdamW, step t = c):
//   x *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   x -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// then, over the workers: x <- mean x when c mod K_x == 0; m <- mean m when c mod K_u == 0; v
// likewise with K_v (the paper averages each before the update of step t when t mod K == 0, the
// values step t - 1 left: the values after call t).
struct reference {
    std::array<std::vector<double>, workers> x, m, v;

    reference(const problem& p, const periods::hyper& h, std::uint64_t calls) {
        for (std::size_t r = 0; r < workers; ++r) {
            x[r].assign(p.init.begin(), p.init.end());
            m[r].assign(n, 0.0);
            v[r].assign(n, 0.0);
        }
        const double lr = adam.lr, b1 = adam.beta1, b2 = adam.beta2, eps = adam.eps;
        const double wd = adam.weight_decay;
        const auto due = [&](std::size_t j, std::uint64_t c) {
            return j < h.states.size() && h.states[j] != 0 && c % h.states[j] == 0;
        };
        for (std::uint64_t c = 1; c <= calls; ++c) {
            const double t = double(c);
            for (std::size_t r = 0; r < workers; ++r) {
                for (std::size_t i = 0; i < n; ++i) {
                    const double g = double(p.d[i]) * (x[r][i] - double(p.target[r][i])) +
                                     double(p.noise[c - 1][r * n + i]);
                    x[r][i] *= 1.0 - lr * wd;
                    m[r][i] = b1 * m[r][i] + (1.0 - b1) * g;
                    v[r][i] = b2 * v[r][i] + (1.0 - b2) * g * g;
                    x[r][i] -= lr / (1.0 - std::pow(b1, t)) * m[r][i] /
                               (std::sqrt(v[r][i]) / std::sqrt(1.0 - std::pow(b2, t)) + eps);
                }
            }
            if (c % h.every == 0) average(x);
            if (due(0, c)) average(m);
            if (due(1, c)) average(v);
        }
    }
    static void average(std::array<std::vector<double>, workers>& a) {
        for (std::size_t i = 0; i < n; ++i) {
            double s = 0.0;
            for (const auto& w : a) s += w[i];
            for (auto& w : a) w[i] = s / workers;
        }
    }
};

bool near(double got, double want, double rel) {
    return std::abs(got - want) <= rel * std::abs(want) + 1e-6;
}

// This rank's chunk of an all-reduce of k floats over the workers, and the bytes it sends.
std::uint64_t all_reduce_bytes(std::uint64_t k, std::uint64_t r) {
    const std::uint64_t m = workers;
    const std::uint64_t c = k * (r + 1) / m - k * r / m;
    return 4 * (k + (m - 2) * c);
}

// Forwards to a threads rank; when armed, its next all-reduce of more than one float completes
// and then throws on this rank, as a transfer that failed after the data moved.
class failing_comm final : public loco_test::forwarding_comm {
public:
    explicit failing_comm(loco::comm::communicator& next) : forwarding_comm(next, "failing") {}
    bool armed = false;

protected:
    void do_all_reduce(loco::tensor_view<float> d, loco::comm::reduce_op op) override {
        forwarding_comm::do_all_reduce(d, op);
        if (armed && d.size > 1) {
            armed = false;
            throw loco::comm_error("injected transfer failure");
        }
    }
};

std::string error_of(const auto& fn) {
    try {
        fn();
    } catch (const loco::invalid_argument& e) {
        return e.what();
    }
    return "(no error)";
}

}  // namespace

TEST_CASE("state_periods plans parameters at c mod K_x and each state at c mod K_j") {
    periods s;
    const periods::hyper h{.every = 4, .states = {6, 0, 1}};
    std::array<std::uint64_t, 3> counted{};
    std::uint64_t params = 0;
    for (std::uint64_t c = 1; c <= 30; ++c) {
        const auto plan = s.next(h);
        INFO("call " << c);
        const bool x_due = c % 4 == 0;
        CHECK(plan.start.size() == (x_due ? 1u : 0u));
        CHECK(plan.finish.size() == (x_due ? 1u : 0u));
        CHECK(plan.reset.empty());
        std::vector<int> want;
        if (c % 6 == 0) want.push_back(0);
        want.push_back(2);  // period 1: after every call
        CHECK(std::vector<int>(plan.states.begin(), plan.states.end()) == want);
        params += x_due;
        for (const int j : plan.states) ++counted[std::size_t(j)];
    }
    CHECK(s.calls() == 30);
    CHECK(periods::syncs(h, 30) == params);
    for (std::size_t j = 0; j < 3; ++j) CHECK(periods::state_syncs(h, j, 30) == counted[j]);
    CHECK(periods::state_syncs(h, 7, 30) == 0);
    CHECK(periods::describe(h) == "state_periods every=4 states=6,0,1");
    const auto paper = periods::paper(16);
    CHECK(paper.every == 16);
    CHECK(paper.states == std::vector<std::uint64_t>{48, 96});
    // Past UINT64_MAX the paper's periods saturate (beyond any run) instead of wrapping to a
    // short period (6 K_x wrapped to 2 for K_x = 2^64 / 6 + 1).
    const std::uint64_t big = UINT64_MAX / 6 + 1;
    CHECK(periods::paper(big).states == std::vector<std::uint64_t>{3 * big, UINT64_MAX});
    CHECK(periods::paper(UINT64_MAX).states == std::vector<std::uint64_t>{UINT64_MAX, UINT64_MAX});
    // The count at the largest call count.
    const periods::hyper two{.every = 1, .states = {2, 1, UINT64_MAX}};
    CHECK(periods::state_syncs(two, 0, UINT64_MAX) == (std::uint64_t{1} << 63) - 1);
    CHECK(periods::state_syncs(two, 1, UINT64_MAX) == UINT64_MAX);
    CHECK(periods::state_syncs(two, 2, UINT64_MAX) == 1);
    CHECK(periods::state_syncs(two, 2, UINT64_MAX - 1) == 0);
    CHECK(periods::hyper{}.states == std::vector<std::uint64_t>{1500, 3000});
}

TEST_CASE("state_periods: 3 AdamW workers equal a double-precision DES-LOC and send syncs times "
          "bytes per sync for x and m and v") {
    constexpr std::uint64_t calls = 30;
    const periods::hyper h{.every = 4, .states = {6, 10}};
    const problem p("desloc three workers", calls);
    const auto got = run<desloc>(p, {.inner = adam, .schedule = h}, calls);
    const reference want(p, h, calls);

    std::size_t wrong = 0;
    for (std::size_t r = 0; r < workers; ++r) {
        for (std::size_t i = 0; i < n; ++i) {
            const bool ok = near(got[r].x[i], want.x[r][i], 1e-4) &&
                            near(got[r].m[i], want.m[r][i], 1e-4) &&
                            near(got[r].v[i], want.v[r][i], 1e-4);
            if (!ok && wrong++ < 5) {
                INFO("worker " << r << " element " << i << ": x " << got[r].x[i] << " vs "
                               << want.x[r][i] << ", m " << got[r].m[i] << " vs " << want.m[r][i]
                               << ", v " << got[r].v[i] << " vs " << want.v[r][i]);
                CHECK(ok);
            }
        }
    }
    CHECK(wrong == 0);
    // The last state syncs (m and v after call 30) left the moments equal on every rank; the
    // parameters last synced at call 28 and drifted since.
    CHECK(got[0].m == got[1].m);
    CHECK(got[1].v == got[2].v);
    CHECK(got[0].x != got[1].x);

    // Bytes: B = an fp32 all-reduce of the array + the one-float agreement; parameter syncs at
    // calls 4, 8, ..., 28 (7), m after calls 6, 12, ..., 30 (5), v after calls 10, 20, 30 (3).
    CHECK(periods::syncs(h, calls) == 7);
    CHECK(periods::state_syncs(h, 0, calls) == 5);
    CHECK(periods::state_syncs(h, 1, calls) == 3);
    for (std::size_t r = 0; r < workers; ++r) {
        const std::uint64_t b = all_reduce_bytes(n, r) + all_reduce_bytes(1, r);
        INFO("worker " << r);
        CHECK(got[r].sent == 7 * b + 5 * b + 3 * b);
    }
    // The handle's own accounting agrees.
    loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
        model w(p.init);
        desloc opt(w.list, comm, {.inner = adam, .schedule = h});
        const auto r = static_cast<std::uint64_t>(comm.rank());
        CHECK(opt.bytes_per_sync() == all_reduce_bytes(n, r) + all_reduce_bytes(1, r));
        CHECK(opt.bytes_per_state_sync(0) == opt.bytes_per_sync());
        CHECK(opt.bytes_per_state_sync(1) == opt.bytes_per_sync());
        CHECK(opt.bytes_per_state_sync(2) == 0);
    });
}

TEST_CASE("state_periods with K_u = K_v = 0 is plain parameter averaging, bit for bit") {
    constexpr std::uint64_t calls = 17;
    const problem p("desloc no state syncs", calls);
    const auto got = run<desloc>(p, {.inner = adam, .schedule = {.every = 5, .states = {0, 0}}},
                                 calls);
    const auto plain = run<averaging>(p, {.inner = adam, .schedule = {.every = 5}}, calls);
    for (std::size_t r = 0; r < workers; ++r) {
        INFO("worker " << r);
        CHECK(got[r] == plain[r]);
    }
    // An empty list of state periods is the same.
    const auto empty = run<desloc>(p, {.inner = adam, .schedule = {.every = 5, .states = {}}},
                                   calls);
    CHECK(empty == plain);
}

TEST_CASE("state_periods refuses bad settings with one sentence and changes nothing") {
    std::vector<float> x(3, 1.0f), g(3, 0.5f);
    loco::parameter_list params;
    params.add("x", x, g);
    loco::comm::single comm;
    CHECK(error_of([&] { desloc(params, comm, {.schedule = {.every = 0}}); }) ==
          "loco::schedule::state_periods: the parameter period every (K_x) is 0; it must be >= 1 "
          "(give a state period of 0 to never sync that state)");
    CHECK(error_of([&] { desloc(params, comm, {.schedule = {.every = 2, .states = {3, 6, 9}}}); }) ==
          "loco::diloco: the state_periods schedule averages inner state array 2 (period 9) but the "
          "inner optimizer (adamw) keeps 2 state array(s); set that period to 0 or drop the entry");
    using sgd_desloc = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, periods>;
    CHECK(error_of([&] { sgd_desloc(params, comm, {.schedule = {.every = 2, .states = {0, 4}}}); }) ==
          "loco::diloco: the state_periods schedule averages inner state array 1 (period 4) but the "
          "inner optimizer (sgd) keeps 1 state array(s); set that period to 0 or drop the entry");
    // SGD's one array (the momentum buffer) may sync.
    sgd_desloc ok(params, comm, {.schedule = {.every = 2, .states = {4}}});
    ok.step();
    // A period set later is checked at the next step(), before the inner step.
    desloc opt(params, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 2, .states = {3, 6}}});
    opt.step();
    const std::vector<float> before = x;
    opt.schedule_hyper().states = {3, 6, 1};
    CHECK(error_of([&] { opt.step(); }).find("inner state array 2 (period 1)") !=
          std::string::npos);
    CHECK(x == before);
    CHECK(opt.calls() == 1);
    opt.schedule_hyper().every = 0;
    CHECK(error_of([&] { opt.step(); }).find("every (K_x) is 0") != std::string::npos);
    CHECK(x == before);
}

TEST_CASE("warmup<state_periods> checks the state periods like state_periods and runs it after W") {
    using warm = loco::schedule::warmup<periods>;
    using warm_desloc = loco::diloco<loco::inner::adamw, loco::outer::sgd, loco::compress::none, warm>;
    std::vector<float> x(3, 1.0f), g(3, 0.5f);
    loco::parameter_list params;
    params.add("x", x, g);
    loco::comm::single comm;
    // A period for an array AdamW does not keep: refused at construction, as without warmup.
    CHECK(error_of([&] {
              warm_desloc(params, comm, {.schedule = {.steps = 1, .then = {.every = 2, .states = {0, 0, 4}}}});
          }) ==
          "loco::diloco: the warmup<state_periods> schedule averages inner state array 2 (period 4) but the "
          "inner optimizer (adamw) keeps 2 state array(s); set that period to 0 or drop the entry");
    // Set later: refused at the next step(), before its inner update.
    warm_desloc opt(params, comm,
                    {.inner = {.lr = 0.1f}, .schedule = {.steps = 1, .then = {.every = 2, .states = {3, 6}}}});
    opt.step();
    const std::vector<float> before = x;
    opt.schedule_hyper().then.states = {0, 0, 4};
    CHECK(error_of([&] { opt.step(); }).find("inner state array 2 (period 4)") != std::string::npos);
    CHECK(x == before);
    CHECK(opt.calls() == 1);
    CHECK(opt.inner_steps() == 1);
    opt.schedule_hyper().then.states = {3, 6};
    opt.step();
    CHECK(opt.calls() == 2);

    // With W = 0 it is state_periods, state syncs included, bit for bit.
    constexpr std::uint64_t calls = 13;
    const problem p("desloc under warmup", calls);
    const auto got = run<warm_desloc>(
        p, {.inner = adam, .schedule = {.steps = 0, .then = {.every = 4, .states = {3, 5}}}}, calls);
    const auto plain = run<desloc>(p, {.inner = adam, .schedule = {.every = 4, .states = {3, 5}}}, calls);
    for (std::size_t r = 0; r < workers; ++r) {
        INFO("worker " << r);
        CHECK(got[r] == plain[r]);
    }
}

TEST_CASE("state_periods: a failed state sync changes nothing on any rank, and the run goes on as "
          "one that skipped it") {
    constexpr std::uint64_t calls = 20, failing = 12;  // 12 % 6 == 0, 12 % 5 != 0: m alone is due
    const periods::hyper h{.every = 5, .states = {6, 0}};
    const problem p("desloc failed state sync", calls);
    struct record {
        outcome after_failing, end;
        std::string error;
    };
    // faulty: rank 1's transfer of m fails at call 12; clean: the same run with m's period set to
    // 0 for that one call.
    const auto go = [&](bool faulty) {
        std::array<record, workers> out;
        loco::comm::run_threads(workers, [&](loco::comm::communicator& threads) {
            failing_comm comm(threads);
            const auto r = static_cast<std::size_t>(comm.rank());
            model w(p.init);
            desloc opt(w.list, comm, {.inner = adam, .schedule = h});
            opt.start();
            for (std::uint64_t c = 1; c <= calls; ++c) {
                w.gradients(p, r, c);
                if (c == failing) {
                    if (faulty) {
                        comm.armed = r == 1;
                        try {
                            opt.step();
                        } catch (const loco::comm_error& e) {
                            out[r].error = e.what();
                        }
                    } else {
                        opt.schedule_hyper().states = {0, 0};
                        opt.step();
                        opt.schedule_hyper() = h;
                    }
                    out[r].after_failing = outcome_of(opt, w);
                } else {
                    opt.step();
                }
            }
            out[r].end = outcome_of(opt, w);
        });
        return out;
    };
    const auto faulty = go(true), clean = go(false);
    for (std::size_t r = 0; r < workers; ++r) {
        INFO("worker " << r);
        CHECK(faulty[r].error ==
              "loco::diloco: the sync of inner state array 0 failed on rank 1 at the transfer "
              "stage (injected transfer failure); nothing was applied on any rank");
        CHECK(faulty[r].after_failing == clean[r].after_failing);
        CHECK(faulty[r].end == clean[r].end);
    }
    // The failed sync really would have changed m.
    CHECK(clean[0].after_failing.m != clean[1].after_failing.m);
}

TEST_CASE("state_periods: a checkpoint in the middle continues bit-identically") {
    constexpr std::uint64_t calls = 26, cut = 13;
    const periods::hyper h{.every = 4, .states = {3, 7}};
    const problem p("desloc checkpoint", calls);
    const auto straight = run<desloc>(p, {.inner = adam, .schedule = h}, calls);

    std::array<std::string, workers> saved;
    std::array<std::vector<float>, workers> x_at_cut;
    loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        model w(p.init);
        desloc opt(w.list, comm, {.inner = adam, .schedule = h});
        for (std::uint64_t c = 1; c <= cut; ++c) {
            w.gradients(p, r, c);
            opt.step();
        }
        std::ostringstream os;
        opt.save(os);
        saved[r] = os.str();
        x_at_cut[r] = w.x;  // the trainer saves its parameters itself
    });
    std::array<outcome, workers> resumed;
    std::array<std::uint64_t, workers> calls_after_load{};
    loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        model w(x_at_cut[r]);
        desloc opt(w.list, comm, {.inner = adam, .schedule = h});
        std::istringstream is(saved[r]);
        opt.load(is);
        calls_after_load[r] = opt.calls();
        for (std::uint64_t c = cut + 1; c <= calls; ++c) {
            w.gradients(p, r, c);
            opt.step();
        }
        resumed[r] = outcome_of(opt, w);
    });
    for (std::size_t r = 0; r < workers; ++r) {
        INFO("worker " << r);
        CHECK(calls_after_load[r] == cut);
        CHECK(resumed[r].x == straight[r].x);
        CHECK(resumed[r].m == straight[r].m);
        CHECK(resumed[r].v == straight[r].v);
    }
}

TEST_CASE("state_periods: non-finite state averages are skipped and counted, and a streak of them "
          "raises on every rank, across a checkpoint") {
    // v averaged after calls 2, 4, 6, ...; worker 1's gradient 1e20 at call 2 makes its v
    // infinite (g^2 overflows) while every parameter stays finite, so every average of v from
    // call 2 on is infinite. max_skipped_syncs = 3: calls 2, 4 and 6 skip it, call 8 raises.
    const periods::hyper h{.every = 5, .states = {0, 2}};
    const problem p("desloc nonfinite state", 10);
    const desloc::config cfg{.inner = adam, .schedule = h, .max_skipped_syncs = 3};
    const std::string want =
        "loco::diloco: 4 averages in a row of inner state array 1 were skipped for a non-finite "
        "value; the workers' optimizer states no longer agree: fix the model or lower the "
        "learning rate (or raise config.max_skipped_syncs)";
    std::array<std::string, workers> saved;
    std::array<std::vector<float>, workers> x_at_cut;
    loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        model w(p.init);
        desloc opt(w.list, comm, cfg);
        for (std::uint64_t c = 1; c <= 7; ++c) {
            w.gradients(p, r, c);
            if (c == 2 && r == 1) w.g[0] = 1e20f;
            CHECK(opt.step().applied);
            CHECK(opt.skipped_state_syncs() == c / 2);
        }
        CHECK(opt.skipped_syncs() == 0);  // the parameter sync at call 5 applied
        CHECK(opt.outer_steps() == 1);
        for (const float x : w.x) CHECK(std::isfinite(x));
        std::ostringstream os;
        opt.save(os);
        saved[r] = os.str();
        x_at_cut[r] = w.x;
        w.gradients(p, r, 8);
        CHECK_THROWS_WITH_AS(opt.step(), want.c_str(), loco::nonfinite_error);
        CHECK(opt.skipped_state_syncs() == 3);
    });
    // The streak comes back from the checkpoint.
    loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        model w(x_at_cut[r]);
        desloc opt(w.list, comm, cfg);
        std::istringstream is(saved[r]);
        opt.load(is);
        CHECK(opt.skipped_state_syncs() == 3);
        w.gradients(p, r, 8);
        CHECK_THROWS_WITH_AS(opt.step(), want.c_str(), loco::nonfinite_error);
    });
}

TEST_CASE("state_periods: a finite state average ends a streak of skipped ones") {
    // m averaged at every call, beta1 = 0 (m is the call's gradient), max_skipped_syncs = 1.
    // At calls 1, 3 and 4 every rank's gradient lies in [2e38, 3e38] with one sign, so the sum of
    // m overflows and the average is skipped; call 2's average is finite and is committed, which
    // ends the streak: call 3 raises nothing, and only call 4, the second in a row, raises.
    auto rng = loco_test::rng_for("desloc state streak reset");
    std::uniform_real_distribution<float> huge(2e38f, 3e38f);
    std::array<std::array<std::vector<float>, workers>, 4> grads;  // [call - 1][rank]
    for (std::size_t c = 0; c < 4; ++c) {
        const float sign = std::bernoulli_distribution(0.5)(rng) ? 1.0f : -1.0f;
        for (auto& g : grads[c]) {
            g = loco_test::normal_floats(rng, n);
            if (c != 1) {
                for (auto& x : g) x = sign * huge(rng);
            }
        }
    }
    const desloc::config cfg{.inner = {.lr = 1e-3f, .beta1 = 0.0f},
                             .schedule = {.every = 100, .states = {1, 0}},
                             .max_skipped_syncs = 1};
    loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        model w(std::vector<float>(n, 1.0f));
        desloc opt(w.list, comm, cfg);
        for (std::size_t c = 0; c < 3; ++c) {
            CAPTURE(c + 1);
            std::copy(grads[c][r].begin(), grads[c][r].end(), w.g.begin());
            CHECK_NOTHROW(opt.step());
            CHECK(opt.skipped_state_syncs() == (c < 2 ? 1u : 2u));
            const auto m = opt.inner_state(0);
            for (std::size_t i = 0; i < n; ++i) {
                if (c == 1) {
                    double mean = 0.0;
                    for (const auto& g : grads[c]) mean += double(g[i]) / workers;
                    CHECK(std::abs(double(m[i]) - mean) <= 1e-6 * (std::abs(mean) + 1.0));
                } else {
                    CHECK(m[i] == grads[c][r][i]);  // skipped: this rank's own m
                }
            }
        }
        std::copy(grads[3][r].begin(), grads[3][r].end(), w.g.begin());
        CHECK_THROWS_AS(opt.step(), loco::nonfinite_error);
    });
}

TEST_CASE("state_periods under nonfinite_policy::ignore commits a non-finite state average") {
    // ignore applies updates without checking them: an average of m that overflows (every
    // rank's m in [2e38, 3e38] with one sign, beta1 = 0) replaces m on every rank as the
    // infinity of that sign, and is neither skipped nor counted; max_skipped_syncs = 1 never
    // raises over 3 such calls.
    auto rng = loco_test::rng_for("desloc state ignore");
    std::uniform_real_distribution<float> huge(2e38f, 3e38f);
    const float sign = std::bernoulli_distribution(0.5)(rng) ? 1.0f : -1.0f;
    std::array<std::vector<float>, workers> grads;
    for (auto& g : grads) {
        g.resize(n);
        for (auto& x : g) x = sign * huge(rng);
    }
    const desloc::config cfg{.inner = {.lr = 1e-3f, .beta1 = 0.0f},
                             .schedule = {.every = 100, .states = {1, 0}},
                             .on_nonfinite = loco::nonfinite_policy::ignore,
                             .max_skipped_syncs = 1};
    loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        model w(std::vector<float>(n, 1.0f));
        desloc opt(w.list, comm, cfg);
        for (int c = 1; c <= 3; ++c) {
            CAPTURE(c);
            std::copy(grads[r].begin(), grads[r].end(), w.g.begin());
            CHECK_NOTHROW(opt.step());
            CHECK(opt.skipped_state_syncs() == 0);
            if (c == 1) {
                for (const float m : opt.inner_state(0)) {
                    CHECK(std::isinf(m));
                    CHECK(std::signbit(m) == (sign < 0.0f));
                }
            }
        }
    });
}

TEST_CASE("state_periods with parameter groups averages array j of every group that keeps it") {
    // Matrices on AdamW (m, v), vectors on SGD with momentum (one buffer): array 0 is AdamW's m
    // and SGD's buffer, array 1 only AdamW's v. Period 6 averages after call 6, the last one.
    // Each group's averaged array is, on every rank, the mean of the arrays the ranks hold in a
    // run without state averaging (its group's own slice of the exchange, not another group's).
    using grouped = loco::groups<loco::group<loco::is_matrix, loco::inner::adamw>,
                                 loco::group<loco::otherwise, loco::inner::sgd>>;
    using handle = loco::diloco<grouped, loco::outer::sgd, loco::compress::none, periods>;
    constexpr std::uint64_t calls = 6;
    const problem p("desloc groups", calls);
    struct states {
        std::array<std::vector<float>, workers> m_adam, v_adam, buf_sgd;
        std::array<std::uint64_t, workers> b0{}, b1{};
    };
    const auto run_groups = [&](std::uint64_t k0, std::uint64_t k1) {
        states s;
        loco::comm::run_threads(workers, [&](loco::comm::communicator& comm) {
            const auto r = static_cast<std::size_t>(comm.rank());
            model w(p.init);
            handle::config cfg{.schedule = {.every = 100, .states = {k0, k1}}};
            std::get<0>(cfg.inner) = adam;
            std::get<1>(cfg.inner) = {.lr = 0.05f, .momentum = 0.9f};
            handle opt(w.list, comm, cfg);
            for (std::uint64_t c = 1; c <= calls; ++c) {
                w.gradients(p, r, c);
                opt.step();
            }
            const auto& e = opt.inner().engine_state();
            const auto m = e.group<0>().state(0), v = e.group<0>().state(1);
            const auto b = e.group<1>().state(0);
            s.m_adam[r].assign(m.begin(), m.end());
            s.v_adam[r].assign(v.begin(), v.end());
            s.buf_sgd[r].assign(b.begin(), b.end());
            s.b0[r] = opt.bytes_per_state_sync(0);
            s.b1[r] = opt.bytes_per_state_sync(1);
        });
        return s;
    };
    // The ranks' unaveraged arrays; an average must be their mean in double, within fp32
    // rounding of a sum (1e-6 of the mean magnitude).
    const states local = run_groups(0, 0);
    const auto check_mean = [](const std::vector<float>& got,
                               const std::array<std::vector<float>, workers>& ranks) {
        REQUIRE(got.size() == ranks[0].size());
        for (std::size_t i = 0; i < got.size(); ++i) {
            double mean = 0.0, size = 0.0;
            for (const auto& w : ranks) {
                mean += double(w[i]) / workers;
                size += std::abs(double(w[i])) / workers;
            }
            CAPTURE(i);
            CHECK(std::abs(double(got[i]) - mean) <= 1e-6 * size);
        }
    };
    CHECK(local.m_adam[1] != local.m_adam[0]);
    CHECK(local.buf_sgd[1] != local.buf_sgd[0]);
    for (const std::uint64_t k0 : {0, 6}) {
        const std::uint64_t k1 = 6 - k0;
        INFO("periods " << k0 << " and " << k1);
        const states s = run_groups(k0, k1);
        for (std::size_t r = 0; r < workers; ++r) {
            CAPTURE(r);
            if (k0 != 0) {
                check_mean(s.m_adam[r], local.m_adam);
                check_mean(s.buf_sgd[r], local.buf_sgd);
            } else {
                CHECK(s.m_adam[r] == local.m_adam[r]);
                CHECK(s.buf_sgd[r] == local.buf_sgd[r]);
            }
            if (k1 != 0) {
                check_mean(s.v_adam[r], local.v_adam);
            } else {
                CHECK(s.v_adam[r] == local.v_adam[r]);
            }
        }
        // Array 0 spans both groups (n elements), array 1 only the matrices.
        for (std::size_t r = 0; r < workers; ++r) {
            CHECK(s.b0[r] == all_reduce_bytes(n, r) + all_reduce_bytes(1, r));
            CHECK(s.b1[r] == all_reduce_bytes(rows * cols, r) + all_reduce_bytes(1, r));
        }
    }
}
