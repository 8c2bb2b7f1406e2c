// Resuming and syncing in the middle of a round, with exchanges in flight (delayed and streaming
// schedules, two thread workers, fresh random gradients):
//   * a checkpoint saved again right after load(), before the next step(), still holds the
//     exchange in flight, so a run resumed from it is bit-identical to one never interrupted;
//   * flush() or sync() as the first call after load() applies the exchange the checkpoint
//     holds in flight as the handle that saved it applies its own, bit for bit;
//   * sync() with an exchange in flight finishes it early, and the finish the schedule planned
//     for it is skipped when due (the run goes on; a delayed round's new exchange still travels),
//     also across a checkpoint taken in between;
//   * ranks resumed from checkpoints compare what they were built with, as at start();
//   * aggregate::edit's step weights: a restarted exchange reports the inner step count of its
//     first start;
//   * a delayed round whose finish fails: the next round's exchange never started, so the
//     finish planned for it has nothing, and the exchange started then still travels;
//   * streaming refuses H or tau changed while an exchange they planned is in flight;
//   * a checkpoint of format 1 (written before format 2 added the fields this needs) still loads;
//   * warmup<S> records what it wraps (format 3), and its format 2 checkpoints still load;
//   * an optimizer checkpoint of format 5 (no names) still loads; format 4 diloco streams carry
//     the handle's skip streak into its fragment and a delayed planned finish with nothing;
//   * a shared bad compressor setting changes nothing and the run goes on; a handle left out of
//     step by a refused start is in step again after every rank's load();
//   * golden format 6 checkpoints (a wallclock handle, an EDiT handle) read back their counters
//     and detector, and this build writes the same bytes.
#include <doctest/doctest.h>

#include "support/forwarding_comm.hpp"
#include "support/hex.hpp"
#include "support/random.hpp"

#include <loco/loco.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace loco_test;

using delayed_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                               loco::schedule::delayed>;
using streaming_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                                 loco::schedule::streaming>;

// Three tensors (so that streaming can make three fragments), a table of gradients drawn afresh
// for each test, and what a run ends with.
struct worker_model {
    std::vector<float> a, b, c, ga, gb, gc;
    loco::parameter_list list;
    explicit worker_model(const std::vector<float>& init)
        : a(init.begin(), init.begin() + 3), b(init.begin() + 3, init.begin() + 7),
          c(init.begin() + 7, init.end()), ga(3), gb(4), gc(2) {
        list.add("a", a, ga).add("b", b, gb).add("c", c, gc);
    }
    void set_gradients(const std::vector<float>& g) {
        std::copy(g.begin(), g.begin() + 3, ga.begin());
        std::copy(g.begin() + 3, g.begin() + 7, gb.begin());
        std::copy(g.begin() + 7, g.end(), gc.begin());
    }
    std::vector<float> values() const {
        std::vector<float> v = a;
        v.insert(v.end(), b.begin(), b.end());
        v.insert(v.end(), c.begin(), c.end());
        return v;
    }
    void set_values(const std::vector<float>& v) {
        std::copy(v.begin(), v.begin() + 3, a.begin());
        std::copy(v.begin() + 3, v.begin() + 7, b.begin());
        std::copy(v.begin() + 7, v.end(), c.begin());
    }
};

struct inputs {
    std::vector<float> init;
    std::vector<std::vector<float>> grads;  // [step * 2 + rank], steps from 0
    explicit inputs(const std::string& label, int steps) {
        auto rng = rng_for(label);
        init = normal_floats(rng, 9);
        for (int i = 0; i < 2 * steps; ++i) grads.push_back(normal_floats(rng, 9, 0.5f));
    }
};

struct outcome {
    std::array<std::vector<float>, 2> values, global;
    std::array<std::uint64_t, 2> outer_steps{};

    bool operator==(const outcome& o) const {
        const auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
            return x.size() == y.size() &&
                   std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
        };
        return same(values[0], o.values[0]) && same(values[1], o.values[1]) &&
               same(global[0], o.global[0]) && same(global[1], o.global[1]) &&
               outer_steps == o.outer_steps;
    }
};

std::string saved(const auto& opt) {
    std::ostringstream os;
    opt.save(os);
    return os.str();
}

// The trainer's side of a resume: it keeps its parameters, lets the old handle finish what is
// in flight (a handle must not go away with an exchange in flight), builds a fresh handle and
// loads the checkpoint into it. `twice`: the fresh handle saves again at once, and a third one
// resumes from that second checkpoint.
template <class Opt>
void resume(std::unique_ptr<Opt>& opt, worker_model& m, const typename Opt::config& cfg,
            loco::comm::communicator& comm, bool twice) {
    const std::string first = saved(*opt);
    const std::vector<float> kept = m.values();
    opt->sync();
    opt = std::make_unique<Opt>(m.list, comm, cfg);
    std::istringstream is(first);
    opt->load(is);
    if (twice) {
        const std::string second = saved(*opt);
        opt = std::make_unique<Opt>(m.list, comm, cfg);
        std::istringstream is2(second);
        opt->load(is2);
    }
    m.set_values(kept);
}

// `steps` calls on two workers; after call `at`, `event` (a resume, a sync(), ...).
template <class Opt>
outcome run(const inputs& in, const typename Opt::config& cfg, int steps, int at,
            const std::function<void(std::unique_ptr<Opt>&, worker_model&,
                                     loco::comm::communicator&)>& event) {
    outcome out;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        worker_model m(in.init);
        auto opt = std::make_unique<Opt>(m.list, comm, cfg);
        for (int step = 1; step <= steps; ++step) {
            m.set_gradients(in.grads[static_cast<std::size_t>(step - 1) * 2 + r]);
            opt->step();
            if (step == at && event) event(opt, m, comm);
        }
        opt->sync();  // nothing left in flight; every fragment applied
        out.values[r] = m.values();
        out.global[r].assign(opt->global().begin(), opt->global().end());
        out.outer_steps[r] = opt->outer_steps();
    });
    return out;
}

template <class Opt>
void check_resumes(const std::string& label, const typename Opt::config& cfg, int steps) {
    const inputs in(label, steps);
    const outcome straight = run<Opt>(in, cfg, steps, 0, {});
    CHECK(straight.outer_steps[0] >= 4);
    for (int at = 1; at < steps; ++at) {
        for (const bool twice : {false, true}) {
            INFO(label << ", saved after call " << at << (twice ? ", saved again after load()" : ""));
            const outcome resumed = run<Opt>(
                in, cfg, steps, at,
                [&](std::unique_ptr<Opt>& opt, worker_model& m, loco::comm::communicator& c) {
                    resume(opt, m, cfg, c, twice);
                });
            CHECK(resumed == straight);
        }
    }
}

// flush() (or sync()) as the first call after load(): the exchange the checkpoint holds in
// flight is sent again and applied as the saving handle applies its own, so parameters, global
// values and outer steps match bit for bit. After each call 1 .. `steps`, one handle finishes
// at once; another resumes from its checkpoint first.
template <class Opt>
void check_finish_after_load(const std::string& label, const typename Opt::config& cfg,
                             int steps) {
    const inputs in(label, steps);
    int carried = 0;  // the cases whose checkpoint held an exchange in flight
    for (const bool every_fragment : {false, true}) {
        for (int at = 1; at <= steps; ++at) {
            const std::string finish = every_fragment ? "sync()" : "flush()";
            INFO(label << ", " << finish << " after call " << at);
            std::array<outcome, 2> out;  // [straight, resumed]
            std::array<std::uint64_t, 2> outer_before{};
            bool flying = false;
            for (const bool resumed : {false, true}) {
                loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
                    const auto r = static_cast<std::size_t>(comm.rank());
                    worker_model m(in.init);
                    auto opt = std::make_unique<Opt>(m.list, comm, cfg);
                    for (int step = 1; step <= at; ++step) {
                        m.set_gradients(in.grads[static_cast<std::size_t>(step - 1) * 2 + r]);
                        opt->step();
                    }
                    outer_before[r] = opt->outer_steps();
                    if (r == 0 && !resumed) {
                        for (std::size_t f = 0; f < opt->fragments(); ++f) {
                            flying |= opt->in_flight(f);
                        }
                    }
                    if (resumed) resume(opt, m, cfg, comm, false);
                    if (every_fragment) {
                        opt->sync();
                    } else {
                        opt->flush();
                    }
                    auto& o = out[resumed ? 1 : 0];
                    o.values[r] = m.values();
                    o.global[r].assign(opt->global().begin(), opt->global().end());
                    o.outer_steps[r] = opt->outer_steps();
                });
            }
            if (flying) {
                ++carried;
                CHECK(out[0].outer_steps[0] > outer_before[0]);  // the exchange was applied
            }
            CHECK(out[1] == out[0]);
        }
    }
    CHECK(carried >= 2);
}

}  // namespace

TEST_CASE("a checkpoint saved again right after load() resumes as the first one does") {
    check_resumes<delayed_t>("resume twice, delayed",
                             {.inner = {.lr = 1e-2f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                              .schedule = {.every = 3}},
                             14);
    check_resumes<streaming_t>("resume twice, streaming tau 1",
                               {.inner = {.lr = 1e-2f},
                                .outer = {.lr = 0.7f, .momentum = 0.9f},
                                .schedule = {.every = 6, .fragments = 3, .overlap = 1}},
                               14);
    check_resumes<streaming_t>("resume twice, streaming tau 3",
                               {.inner = {.lr = 1e-2f},
                                .outer = {.lr = 0.7f, .momentum = 0.9f},
                                .schedule = {.every = 8, .fragments = 2, .overlap = 3}},
                               14);
}

TEST_CASE("flush() or sync() as the first call after load() applies the exchange the checkpoint "
          "holds") {
    check_finish_after_load<delayed_t>("finish after load, delayed",
                                       {.inner = {.lr = 1e-2f},
                                        .outer = {.lr = 0.7f, .momentum = 0.9f},
                                        .schedule = {.every = 3}},
                                       7);
    check_finish_after_load<streaming_t>("finish after load, streaming",
                                         {.inner = {.lr = 1e-2f},
                                          .outer = {.lr = 0.7f, .momentum = 0.9f},
                                          .schedule = {.every = 6, .fragments = 3, .overlap = 1}},
                                         9);
}

TEST_CASE("sync() with an exchange in flight: the finish the schedule planned for it is skipped") {
    SUBCASE("streaming") {
        // H = 8, P = 2, tau = 1: fragment 0 starts at call 3 and is applied at 4, 12, 20, ...;
        // fragment 1 starts at 7 and is applied at 8, 16, ... A sync() after call 3 finishes
        // fragment 0 early, then syncs both; call 4 has nothing left to finish.
        const streaming_t::config cfg{.inner = {.lr = 1e-2f},
                                      .outer = {.lr = 0.7f, .momentum = 0.9f},
                                      .schedule = {.every = 8, .fragments = 2, .overlap = 1}};
        const inputs in("sync in flight, streaming", 22);
        std::array<std::array<std::uint64_t, 2>, 2> per_fragment{};
        const auto sync_now = [&](std::unique_ptr<streaming_t>& opt, worker_model&,
                                  loco::comm::communicator&) {
            REQUIRE(opt->in_flight(0));
            opt->sync();
            CHECK(!opt->in_flight(0));
        };
        const outcome synced = run<streaming_t>(
            in, cfg, 22, 3,
            [&](std::unique_ptr<streaming_t>& opt, worker_model& m, loco::comm::communicator& c) {
                sync_now(opt, m, c);
                const auto r = static_cast<std::size_t>(c.rank());
                per_fragment[r] = {opt->outer_steps(0), opt->outer_steps(1)};
            });
        // After the sync: fragment 0 twice (early, then with the rest), fragment 1 once.
        CHECK(per_fragment[0] == std::array<std::uint64_t, 2>{2, 1});
        CHECK(per_fragment[1] == per_fragment[0]);
        // Then fragment 0 at 12 and 20 (not 4), fragment 1 at 8 and 16, and the closing sync():
        // 2 + 2 + 1 and 1 + 2 + 1.
        CHECK(synced.outer_steps[0] == 9);
        CHECK(synced.global[0] == synced.global[1]);
        // A checkpoint between the sync() and call 4 keeps the skip.
        const outcome resumed = run<streaming_t>(
            in, cfg, 22, 3,
            [&](std::unique_ptr<streaming_t>& opt, worker_model& m, loco::comm::communicator& c) {
                sync_now(opt, m, c);
                resume(opt, m, cfg, c, false);
            });
        CHECK(resumed == synced);
    }
    SUBCASE("delayed") {
        // H = 3: round 1's exchange starts at call 3 and would be applied at call 6. A sync()
        // after call 4 applies it early and syncs; call 6 then has nothing to finish, and the
        // exchange it starts travels during the next round as usual.
        const delayed_t::config cfg{.inner = {.lr = 1e-2f},
                                    .outer = {.lr = 0.7f, .momentum = 0.9f},
                                    .schedule = {.every = 3}};
        const inputs in("sync in flight, delayed", 10);
        // 0: nothing more; 1: a checkpoint between the sync() and call 6; 2: a second sync().
        for (const int variant : {0, 1, 2}) {
            INFO("variant " << variant);
            const std::uint64_t synced = variant == 2 ? 3 : 2;
            loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
                const auto r = static_cast<std::size_t>(comm.rank());
                worker_model m(in.init);
                auto opt = std::make_unique<delayed_t>(m.list, comm, cfg);
                for (int step = 1; step <= 10; ++step) {
                    m.set_gradients(in.grads[static_cast<std::size_t>(step - 1) * 2 + r]);
                    opt->step();
                    if (step == 4) {
                        REQUIRE(opt->in_flight(0));
                        opt->sync();
                        if (variant == 1) resume(opt, m, cfg, comm, false);
                        if (variant == 2) opt->sync();
                        CHECK(opt->outer_steps() == synced);
                    }
                    if (step == 6) {
                        CHECK(opt->outer_steps() == synced);  // nothing applied at call 6
                        CHECK(opt->in_flight(0));             // round 2's exchange travels
                    }
                    if (step == 9) CHECK(opt->outer_steps() == synced + 1);
                }
                opt->sync();
            });
        }
    }
}

TEST_CASE("ranks resumed from checkpoints compare what they were built with") {
    using every_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    const inputs in("resume fingerprint", 4);
    std::array<std::string, 2> checkpoints;
    std::array<std::string, 2> errors;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        worker_model m(in.init);
        const every_t::config cfg{.inner = {.lr = 0.1f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                                  .schedule = {.every = 2}};
        {
            every_t opt(m.list, comm, cfg);
            for (int step = 1; step <= 3; ++step) {
                m.set_gradients(in.grads[static_cast<std::size_t>(step - 1) * 2 + r]);
                opt.step();
            }
            checkpoints[r] = saved(opt);
        }
        // Rank 1 resumes with another outer lr: load() takes it (a resumed run may change its
        // outer settings), and the first step() finds that the ranks now differ.
        every_t::config other = cfg;
        if (r == 1) other.outer.lr = 0.5f;
        every_t opt(m.list, comm, other);
        std::istringstream is(checkpoints[r]);
        opt.load(is);
        const std::vector<float> global_before(opt.global().begin(), opt.global().end());
        try {
            opt.step();
        } catch (const loco::invalid_argument& e) {
            errors[r] = e.what();
        }
        CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == global_before);
    });
    for (const std::string& e : errors) {
        CHECK(e.find("the ranks were built differently") != std::string::npos);
        CHECK(e.find("lr=0.5") != std::string::npos);
    }
}

TEST_CASE("load() into a handle that already started compares the ranks again at the next step") {
    // Ranks that had started (and compared their fingerprints once) then load checkpoints of
    // different calls: the next step() must refuse on every rank, as it does in fresh handles.
    // A load() that left the handle's "compared" mark set let the ranks go on from different
    // points. The calls are drawn among those whose next call does not sync (every = 3), so a
    // handle that skips the comparison steps on without waiting for its peer.
    using every_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    const every_t::config cfg{.inner = {.lr = 0.1f}, .schedule = {.every = 3}};
    const inputs in("load into a started handle", 9);
    auto rng = rng_for("load into a started handle: calls");
    const std::array<int, 6> quiet = {1, 3, 4, 6, 7, 9};  // call + 1 is no multiple of 3
    const std::size_t first = std::uniform_int_distribution<std::size_t>(0, 5)(rng);
    const std::size_t second = (first + std::uniform_int_distribution<std::size_t>(1, 5)(rng)) % 6;
    const std::array<int, 2> at = {quiet[first], quiet[second]};
    CAPTURE(at[0]);
    CAPTURE(at[1]);
    std::array<std::array<std::string, 10>, 2> checkpoints;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        worker_model m(in.init);
        every_t opt(m.list, comm, cfg);
        for (int step = 1; step <= 9; ++step) {
            m.set_gradients(in.grads[static_cast<std::size_t>(step - 1) * 2 + r]);
            opt.step();
            checkpoints[r][static_cast<std::size_t>(step)] = saved(opt);
        }
    });
    std::array<std::string, 2> outcome;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        worker_model m(in.init);
        every_t opt(m.list, comm, cfg);
        m.set_gradients(in.grads[r]);
        opt.step();  // started: the ranks compared their fingerprints
        std::istringstream is(checkpoints[r][static_cast<std::size_t>(at[r])]);
        opt.load(is);
        const std::vector<float> global(opt.global().begin(), opt.global().end());
        try {
            opt.step();
            outcome[r] = "stepped";
        } catch (const loco::invalid_argument& e) {
            outcome[r] = e.what();
        }
        CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) == global);
    });
    for (const auto& o : outcome) {
        CAPTURE(o);
        CHECK(o.find("resumed from checkpoints of different points") != std::string::npos);
    }
}

TEST_CASE("aggregate::edit with step weights: a restarted exchange reports its first start's steps") {
    // Worker 1 skips call 2 (a NaN gradient), so the workers report different inner step counts
    // and A-EDiT's step weights (r = 1: w_i = s_i) depend on them. Saving with round 1's
    // exchange in flight and resuming must give the run that was never interrupted.
    using edit_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                loco::schedule::delayed, loco::aggregate::edit>;
    edit_t::config cfg{.inner = {.lr = 0.1f}, .schedule = {.every = 3}};
    cfg.aggregate.weight_by_norm = false;
    cfg.aggregate.skip_anomaly = false;
    cfg.aggregate.consensus = loco::aggregate::sign_consensus::none;
    cfg.aggregate.step_weights = true;
    cfg.aggregate.step_weight_ratio = 1.0f;
    inputs in("edit step weights resume", 9);
    in.grads[1 * 2 + 1][0] = std::numeric_limits<float>::quiet_NaN();
    const auto event = [&](bool twice) {
        return [&cfg, twice](std::unique_ptr<edit_t>& opt, worker_model& m,
                             loco::comm::communicator& c) { resume(opt, m, cfg, c, twice); };
    };
    const outcome straight = run<edit_t>(in, cfg, 9, 0, {});
    for (const int at : {3, 4, 5}) {
        for (const bool twice : {false, true}) {
            INFO("saved after call " << at << (twice ? ", and again after load()" : ""));
            CHECK(run<edit_t>(in, cfg, 9, at, event(twice)) == straight);
        }
    }
}

// The one-tensor runs the checkpoint fixtures below were written from: w = {1, 2} (or the values
// given), gradient (s / 2, -s^2 / 4) at call s.
template <class Opt>
struct one_tensor_run {
    std::vector<float> w, g = std::vector<float>(2);
    loco::parameter_list list;
    Opt opt;
    one_tensor_run(loco::comm::communicator& comm, const typename Opt::config& cfg,
                   std::vector<float> start = {1.0f, 2.0f})
        : w(std::move(start)), list(listed(w, g)), opt(list, comm, cfg) {}
    one_tensor_run(const one_tensor_run&) = delete;  // the list points into w and g
    loco::step_result call(int s) {
        g[0] = 0.5f * float(s);
        g[1] = -0.25f * float(s * s);
        return opt.step();
    }

private:
    static loco::parameter_list listed(std::vector<float>& w, std::vector<float>& g) {
        loco::parameter_list l;
        l.add("w", w, g);
        return l;
    }
};

namespace {

// Written by loco at commit d450e4e (format 1) from the run this test repeats: comm::single,
// one_tensor_run, inner SGD lr 0.5, outer Nesterov lr 0.7 momentum 0.9, delayed H = 2, saved
// after call 3 with round 1's exchange in flight; w was then {0.25, 3.125}.
std::string format_1_stream() {
    return bytes_from_hex("4c4f434f434b505401000000060000000000000064696c6f636f0e000000000000006f757465725f6e65737465726f76"
        "04000000000000006e6f6e65070000000000000064656c6179656404000000000000006e6f6e650d0000000000000066"
        "7261676d656e7420303a207704000000000000006d65616e32000000000000006f757465725f6e65737465726f76206c"
        "723d302e363939393939393838206d6f6d656e74756d3d302e3839393939393937360100000000000000000000000000"
        "000003000000000000000000000000000000000000000000000000000000000000000100000000000000020000000000"
        "000003000000000000000000000000000000030000000000000073676401000000000000000200000000000000000000"
        "000000000002000000000000000000803f00000040020000000000000000000000000000000a00000000000000616c6c"
        "5f7265647563650000000000000000000000000000000000000000000000000000000000000000010000000000000002"
        "0000000000000002000000000000000000403f000020bfc8f97912b979a623");
}

}  // namespace

TEST_CASE("a checkpoint of format 1 still loads and resumes its exchange in flight") {
    // format_1_stream(), from the run this test repeats.
    const std::string bytes = format_1_stream();
    REQUIRE(bytes.size() == 415);
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                               loco::schedule::delayed>;
    const opt_t::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                            .schedule = {.every = 2}};
    loco::comm::single comm;
    one_tensor_run<opt_t> straight(comm, cfg);
    for (int s = 1; s <= 3; ++s) straight.call(s);
    CHECK(straight.w == std::vector<float>{0.25f, 3.125f});
    one_tensor_run<opt_t> resumed(comm, cfg, straight.w);
    std::istringstream is(bytes);
    resumed.opt.load(is);
    for (int s = 4; s <= 8; ++s) {
        straight.call(s);
        resumed.call(s);
        CHECK(resumed.w == straight.w);
    }
    CHECK(resumed.opt.outer_steps() == straight.opt.outer_steps());
    CHECK(std::vector<float>(resumed.opt.global().begin(), resumed.opt.global().end()) ==
          std::vector<float>(straight.opt.global().begin(), straight.opt.global().end()));
    // What this build writes is format 6.
    const std::string now = saved(resumed.opt);
    CHECK(static_cast<unsigned char>(now[8]) == 6);

    // Resumed with H = 4: the stream holds round 1's exchange in flight, so the round ending at
    // call 4 applies it (formats before 5 did not record that a round was started, and the
    // schedule guessed it from the call count and the new H: "starts fragment 0 while its
    // previous exchange was never finished").
    opt_t::config longer = cfg;
    longer.schedule.every = 4;
    one_tensor_run<opt_t> regrown(comm, longer, {0.25f, 3.125f});
    std::istringstream again(bytes);
    regrown.opt.load(again);
    for (int s = 4; s <= 8; ++s) CHECK_NOTHROW(regrown.call(s));
    CHECK(regrown.opt.outer_steps() == 2);  // at calls 4 and 8
    regrown.opt.sync();
}

TEST_CASE("a format 1 stream with an exchange in flight, loaded into a handle that already stepped, "
          "resumes as in a fresh handle") {
    // Format 1 did not record the inner step count of an exchange in flight: load() puts the
    // stream's count at the save (3) in its place. It read the count before it took the
    // stream's inner state, i.e. the loading handle's own (0 in a fresh handle, the calls it had
    // made in one that stepped), which a later save recorded. Everything a handle holds after
    // load() is the stream's: both handles save the same bytes.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                               loco::schedule::delayed>;
    const opt_t::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                            .schedule = {.every = 2}};
    auto rng = rng_for("format 1 into a stepped handle");
    const int calls = std::uniform_int_distribution<int>(1, 7)(rng);
    CAPTURE(calls);
    loco::comm::single comm;
    one_tensor_run<opt_t> fresh(comm, cfg, {0.25f, 3.125f});
    std::istringstream is(format_1_stream());
    fresh.opt.load(is);
    one_tensor_run<opt_t> stepped(comm, cfg);
    for (int s = 1; s <= calls; ++s) stepped.call(s);
    stepped.opt.sync();  // nothing in flight
    stepped.w[0] = 0.25f;  // the trainer restores its parameters (in place: the list views w)
    stepped.w[1] = 3.125f;
    std::istringstream again(format_1_stream());
    stepped.opt.load(again);
    CHECK(saved(stepped.opt) == saved(fresh.opt));
    for (int s = 4; s <= 8; ++s) {
        fresh.call(s);
        stepped.call(s);
        CHECK(stepped.w == fresh.w);
    }
    CHECK(saved(stepped.opt) == saved(fresh.opt));
}

TEST_CASE("a checkpoint of format 3 (no shapes) still loads, and format 4 refuses a matrix of another shape") {
    // Written by loco at commit ababe97 (format 3) from the run below: comm::single, w a 2 x 2
    // matrix {1, 2, -1, 0.5}, gradient (s / 2, -s^2 / 4, s, 1) at call s, inner SGD lr 0.5, outer
    // Nesterov lr 0.7 momentum 0.9, delayed H = 2, saved after call 3 (an exchange in flight);
    // w was then {0.25, 3.125, -2.5, 0}.
    const std::string bytes = bytes_from_hex("4c4f434f434b505403000000060000000000000064696c6f636f0e000000000000006f757465725f6e65737465726f76"
        "04000000000000006e6f6e65070000000000000064656c6179656404000000000000006e6f6e650d0000000000000066"
        "7261676d656e7420303a207704000000000000006d65616e32000000000000006f757465725f6e65737465726f76206c"
        "723d302e363939393939393838206d6f6d656e74756d3d302e3839393939393937360100000000000000000000000000"
        "000003000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000001000000000000000400000000000000030000000000000000000000000000000300000000000000736764010000"
        "000000000004000000000000000000000000000000000000000000000004000000000000000000803f00000040000080"
        "bf0000003f0400000000000000000000000000000000000000000000000a00000000000000616c6c5f72656475636500"
        "000000000000000000000000000000000000000000000000000000000000000100000000000000020000000000000004"
        "000000000000000000403f000020bf0000c03f0000803f020000000000000000000000000000008a876e6a660310f3");
    REQUIRE(bytes.size() == 479);
    REQUIRE(static_cast<unsigned char>(bytes[8]) == 3);
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                               loco::schedule::delayed>;
    const opt_t::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                            .schedule = {.every = 2}};
    struct matrix_run {
        std::vector<float> w, g = std::vector<float>(4);
        loco::parameter_list list;
        opt_t opt;
        matrix_run(loco::comm::communicator& comm, const opt_t::config& c, std::vector<float> start,
                   std::size_t rows, std::size_t cols)
            : w(std::move(start)),
              list(listed(w, g, rows, cols)),
              opt(list, comm, c) {}
        matrix_run(const matrix_run&) = delete;  // the list points into w and g
        void call(int s) {
            g = {0.5f * float(s), -0.25f * float(s * s), float(s), 1.0f};
            opt.step();
        }
        static loco::parameter_list listed(std::vector<float>& w, std::vector<float>& g,
                                           std::size_t rows, std::size_t cols) {
            loco::parameter_list l;
            if (rows == 0) {
                l.add("w", w, g);
            } else {
                l.add_views("w", loco::host_matrix(w.data(), rows, cols),
                            loco::host_matrix(static_cast<const float*>(g.data()), rows, cols));
            }
            return l;
        }
    };
    loco::comm::single comm;
    matrix_run straight(comm, cfg, {1.0f, 2.0f, -1.0f, 0.5f}, 2, 2);
    for (int s = 1; s <= 3; ++s) straight.call(s);
    CHECK(straight.w == std::vector<float>{0.25f, 3.125f, -2.5f, 0.0f});
    matrix_run resumed(comm, cfg, straight.w, 2, 2);
    std::istringstream is(bytes);
    resumed.opt.load(is);
    const std::string now = saved(straight.opt);  // format 6, with the shapes (since 4)
    CHECK(static_cast<unsigned char>(now[8]) == 6);
    for (int s = 4; s <= 8; ++s) {
        straight.call(s);
        resumed.call(s);
        CHECK(resumed.w == straight.w);
    }

    // The same stream into a 4 x 1 matrix: refused, naming both shapes, nothing changed.
    matrix_run other(comm, cfg, {0.25f, 3.125f, -2.5f, 0.0f}, 4, 1);
    const std::string before = saved(other.opt);
    std::istringstream again(now);
    CHECK_THROWS_WITH_AS(other.opt.load(again),
                         "loco: the checkpoint's parameter 'w' is 2 x 2 but this handle's is 4 x 1; "
                         "load a checkpoint of this model",
                         loco::checkpoint_error);
    CHECK(saved(other.opt) == before);
    // Into a flat parameter of 4 elements (no shape to compare): it loads.
    matrix_run flat(comm, cfg, {0.25f, 3.125f, -2.5f, 0.0f}, 0, 0);
    std::istringstream third(now);
    CHECK_NOTHROW(flat.opt.load(third));
}

TEST_CASE("an optimizer checkpoint records its shapes (format 5) and one of format 4 still loads") {
    // Written by loco at commit d381e04 (format 4, no shapes in an optimizer stream) from the run
    // below: Muon on w (2 x 3, role matrix) at lr 0.02, AdamW on b (2, role vector) at lr 0.01,
    // two steps with the gradients of grad().
    const std::string format4 = bytes_from_hex(
        "4c4f434f434b50540400000009000000000000006f7074696d697a657202000000000000000600000000000000020000"
        "000000000002000000000000000000000000000000060000000000000067726f75707302000000000000000200000000"
        "000000000000000000000001000000000000000100000000000000060000000000000004000000000000006d756f6e01"
        "000000000000000600000000000000400a173de47a14bd2c5caf3dd0cc4c3c9c99093e4ce17a3d010000000000000002"
        "0000000000000005000000000000006164616d7702000000000000000400000000000000e47a143e4ce1fabda8707d3d"
        "c6f5583d3ddde85df01eec01");
    REQUIRE(format4.size() == 252);
    REQUIRE(static_cast<unsigned char>(format4[8]) == 4);
    using inner_t = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                                 loco::group<loco::otherwise, loco::inner::adamw>>;
    using opt_t = loco::optimizer<inner_t>;
    const opt_t::config cfg{.inner = {{.lr = 0.02f}, {.lr = 0.01f}}};
    struct matrix_model {
        std::vector<float> w, gw = std::vector<float>(6), b, gb = std::vector<float>(2);
        loco::parameter_list list;
        opt_t opt;
        matrix_model(const opt_t::config& c, std::vector<float> w0, std::vector<float> b0,
                     std::size_t rows, std::size_t cols)
            : w(std::move(w0)), b(std::move(b0)), list(listed(rows, cols)), opt(list, c) {}
        matrix_model(const matrix_model&) = delete;  // the list points into the vectors
        void step(int s) {
            for (int i = 0; i < 6; ++i) gw[i] = 0.25f * float(s + i) - float(i % 2);
            gb = {0.5f * float(s), -0.25f * float(s * s)};
            opt.step();
        }
        loco::parameter_list listed(std::size_t rows, std::size_t cols) {
            loco::parameter_list l;
            l.add_views("w", loco::host_matrix(w.data(), rows, cols),
                        loco::host_matrix(static_cast<const float*>(gw.data()), rows, cols),
                        {.role = loco::role::matrix});
            l.add("b", b, gb, {.role = loco::role::vector});
            return l;
        }
    };
    matrix_model straight(cfg, {1, 2, 3, -1, 0.5f, 0.25f}, {0.5f, -0.5f}, 2, 3);
    for (int s = 1; s <= 2; ++s) straight.step(s);
    CHECK(straight.w == std::vector<float>{0x1.f930b4p-1f, 0x1.0082c8p+1f, 0x1.7b79ep+1f,
                                           -0x1.ff2b48p-1f, 0x1.d50f0ep-2f, 0x1.da7eb2p-3f});
    CHECK(straight.b == std::vector<float>{0x1.eaefdep-2f, -0x1.ebca1ep-2f});
    const std::string now = saved(straight.opt);
    CHECK(static_cast<unsigned char>(now[8]) == 6);

    // The old stream and the new one both resume the run bit for bit.
    for (const std::string* stream : {&format4, &now}) {
        CAPTURE(static_cast<int>(static_cast<unsigned char>((*stream)[8])));
        matrix_model resumed(cfg, straight.w, straight.b, 2, 3);
        std::istringstream is(*stream);
        resumed.opt.load(is);
        CHECK(resumed.opt.steps() == 2);
        matrix_model reference(cfg, straight.w, straight.b, 2, 3);
        std::istringstream again(now);
        reference.opt.load(again);
        for (int s = 3; s <= 5; ++s) {
            resumed.step(s);
            reference.step(s);
        }
        CHECK(resumed.w == reference.w);
        CHECK(resumed.b == reference.b);
        CHECK(saved(resumed.opt) == saved(reference.opt));
    }

    // Into a 3 x 2 matrix (the same sizes, groups and names): this build's stream is refused, naming both
    // shapes, and nothing changes; format 4 recorded no shape, so it still loads.
    matrix_model other(cfg, straight.w, straight.b, 3, 2);
    const std::string before = saved(other.opt);
    std::istringstream is(now);
    CHECK_THROWS_WITH_AS(other.opt.load(is),
                         "loco: the checkpoint's parameter 'w' is 2 x 3 but this handle's is 3 x 2; "
                         "load a checkpoint of this model",
                         loco::checkpoint_error);
    CHECK(saved(other.opt) == before);
    CHECK(other.opt.steps() == 0);
    std::istringstream old(format4);
    CHECK_NOTHROW(other.opt.load(old));

    // An element-wise optimizer refuses it too (AdamW's moments would sit on other elements).
    std::vector<float> x(6, 1.0f), gx(6, 0.5f);
    loco::parameter_list wide, tall;
    wide.add_views("x", loco::host_matrix(x.data(), 2, 3),
                   loco::host_matrix(static_cast<const float*>(gx.data()), 2, 3));
    tall.add_views("x", loco::host_matrix(x.data(), 3, 2),
                   loco::host_matrix(static_cast<const float*>(gx.data()), 3, 2));
    loco::optimizer<loco::inner::adamw> a(wide), t(tall);
    a.step();
    std::istringstream from_wide(saved(a));
    CHECK_THROWS_WITH_AS(t.load(from_wide),
                         "loco: the checkpoint's parameter 'x' is 2 x 3 but this handle's is 3 x 2; "
                         "load a checkpoint of this model",
                         loco::checkpoint_error);
    CHECK(t.steps() == 0);
}

TEST_CASE("an optimizer checkpoint records its parameters' names (format 6): the same shapes "
          "registered in another order are refused") {
    // Sizes, shapes and groups alone let q's AdamW moments (or Muon momentum) land on k and k's
    // on q, without a word, when a model registers k first.
    using grouped = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                                 loco::group<loco::otherwise, loco::inner::adamw>>;
    auto rng = rng_for("optimizer names");
    std::vector<float> q = normal_floats(rng, 16), k = normal_floats(rng, 16);
    const std::vector<float> gq = normal_floats(rng, 16), gk = normal_floats(rng, 16);
    const auto listed = [&](bool k_first) {
        loco::parameter_list l;
        const auto add = [&](const char* name, std::vector<float>& v, const std::vector<float>& g) {
            l.add_views(name, loco::host_matrix(v.data(), 4, 4), loco::host_matrix(g.data(), 4, 4),
                        {.role = loco::role::matrix});
        };
        if (k_first) add("k", k, gk);
        add("q", q, gq);
        if (!k_first) add("k", k, gk);
        return l;
    };
    const auto check = [&](auto tag) {
        using opt_t = loco::optimizer<typename decltype(tag)::type>;
        const loco::parameter_list saved_order = listed(false), other_order = listed(true);
        opt_t first(saved_order);
        first.step();
        const std::string stream = saved(first);
        CHECK(static_cast<unsigned char>(stream[8]) == 6);
        opt_t swapped(other_order);
        const std::string before = saved(swapped);
        std::istringstream is(stream);
        CHECK_THROWS_WITH_AS(swapped.load(is),
                             "loco: checkpoint mismatch in a parameter's name (a model registers "
                             "its parameters in the order it saved them): saved 'q', this "
                             "optimizer has 'k'",
                             loco::checkpoint_error);
        CHECK(saved(swapped) == before);
        opt_t same(listed(false));
        std::istringstream again(stream);
        CHECK_NOTHROW(same.load(again));
        CHECK(saved(same) == stream);
    };
    check(std::type_identity<loco::inner::adamw>{});
    check(std::type_identity<grouped>{});
}

TEST_CASE("an optimizer checkpoint of format 5 (shapes, no names) still loads") {
    // Written by loco at commit 4a9ab83 (format 5: the shapes, not yet the names) from the run
    // below: AdamW at lr 0.125 on w (2 x 3) = {1, ..., 6} / 4 and b = {0.5, -1}, three steps,
    // the gradient of call s w_i = (i + 1) s / 8, b = (s, -s / 2). Read as format 6, the
    // parameter count after the shapes would be taken for a name.
    const std::string format5 = bytes_from_hex(
        "4c4f434f434b50540500000009000000000000006f7074696d697a657202000000000000000200000000000000030000"
        "000000000000000000000000000000000000000000020000000000000006000000000000000200000000000000030000"
        "0000000000000000000000000005000000000000006164616d7702000000000000001000000000000000b49d8f3db49d"
        "0f3e8e6c573eb49d8f3e2185b33e8e6cd73eb49d0f3fb49d8fbe5d642f3c5d642f3de850c53d5d642f3e6806893ee850"
        "c53e5d642f3f5d642f3eed563e1956008e57");
    REQUIRE(format5.size() == 210);
    REQUIRE(static_cast<unsigned char>(format5[8]) == 5);
    using opt_t = loco::optimizer<loco::inner::adamw>;
    struct run {
        std::vector<float> w{0.25f, 0.5f, 0.75f, 1.0f, 1.25f, 1.5f}, gw = std::vector<float>(6),
            b{0.5f, -1.0f}, gb = std::vector<float>(2);
        loco::parameter_list list;
        opt_t opt;
        run() : list(listed()), opt(list, {.inner = {.lr = 0.125f}}) {}
        run(const run&) = delete;  // the list points into the vectors
        void call(int s) {
            for (int i = 0; i < 6; ++i) gw[i] = float(i + 1) * float(s) / 8.0f;
            gb = {float(s), -float(s) / 2.0f};
            opt.step();
        }
        loco::parameter_list listed() {
            loco::parameter_list l;
            l.add_views("w", loco::host_matrix(w.data(), 2, 3),
                        loco::host_matrix(static_cast<const float*>(gw.data()), 2, 3));
            l.add("b", b, gb);
            return l;
        }
    };
    run straight, resumed;
    for (int s = 1; s <= 3; ++s) straight.call(s);
    // What the run of commit 4a9ab83 ended with.
    CHECK(straight.w == std::vector<float>{-0x1.e1260ap-4f, 0x1.f8edeap-4f, 0x1.74c078p-2f,
                                           0x1.35a2bcp-1f, 0x1.b0e53cp-1f, 0x1.1613dep+0f});
    CHECK(straight.b == std::vector<float>{0x1.f8edeap-4f, -0x1.35a2bcp-1f});
    std::istringstream is(format5);
    REQUIRE_NOTHROW(resumed.opt.load(is));
    CHECK(resumed.opt.steps() == 3);
    // The same state: saved again (format 6, with the names), the bytes of this build's run.
    CHECK(saved(resumed.opt) == saved(straight.opt));
    resumed.w = straight.w;
    resumed.b = straight.b;
    for (int s = 4; s <= 5; ++s) {
        straight.call(s);
        resumed.call(s);
    }
    CHECK(resumed.w == straight.w);
    CHECK(resumed.b == straight.b);
}

TEST_CASE("an exchange in flight restarts with the outer lr it was encoded with, and one started "
          "with other compressor settings is refused") {
    // MuLoCo's error feedback folds the outer lr into its buffer, and the trainer moves the outer
    // lr every call: a run resumed with round 2's exchange in flight (saved after call 10) must
    // encode it again with call 8's lr and settings, not call 11's.
    using ef = loco::compress::error_feedback<loco::compress::blockwise<2, 8>>;
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, ef, loco::schedule::delayed>;
    opt_t::config cfg{.inner = {.lr = 0.1f}, .schedule = {.every = 4}};
    cfg.compress.fold_outer_lr = true;
    cfg.compress.decay = 0.9f;
    const auto lr_at = [](int call) { return 1.0f - 0.05f * float(call); };
    struct model {
        std::vector<float> w, g;
        loco::parameter_list list;
        explicit model(std::vector<float> w0) : w(std::move(w0)), g(w.size()) {
            list.add("w", w, g);
        }
        model(const model&) = delete;  // the list points into w and g
        void gradients(int call) {
            auto rng = rng_for("fold lr resume/" + std::to_string(call));
            const std::vector<float> fresh = normal_floats(rng, w.size());
            std::copy(fresh.begin(), fresh.end(), g.begin());  // in place: the list views g
        }
    };
    auto rng = rng_for("fold lr resume");
    const std::vector<float> w0 = normal_floats(rng, 12);
    loco::comm::single comm;
    model straight(w0);
    opt_t a(straight.list, comm, cfg);
    std::string at_10;
    std::vector<float> w_at_10;
    // The decay changes at call 11, the call at which the resumed run restarts the exchange
    // started at call 8 (round 1's residual makes the decay count): that exchange keeps decay
    // 0.9 in both runs.
    const auto decay_at = [](int call) { return call >= 11 ? 0.5f : 0.9f; };
    for (int call = 1; call <= 16; ++call) {
        a.outer_hyper().lr = lr_at(call);
        a.compress_hyper().decay = decay_at(call);
        straight.gradients(call);
        a.step();
        if (call == 10) {
            at_10 = saved(a);
            w_at_10 = straight.w;
        }
    }
    REQUIRE(a.in_flight(0));
    model resumed(w_at_10);
    opt_t b(resumed.list, comm, cfg);
    std::istringstream is(at_10);
    b.load(is);
    for (int call = 11; call <= 16; ++call) {
        b.outer_hyper().lr = lr_at(call);
        b.compress_hyper().decay = decay_at(call);
        resumed.gradients(call);
        b.step();
    }
    CHECK(resumed.w == straight.w);
    CHECK(std::vector<float>(b.global().begin(), b.global().end()) ==
          std::vector<float>(a.global().begin(), a.global().end()));
    CHECK(saved(b) == saved(a));
    a.sync();  // nothing may be in flight when a handle goes
    b.sync();

    // The decay changed at call 5, while round 1's exchange (started at call 4, encoded with
    // decay 0.9) travelled: a handle built with the new decay cannot send it again as it was
    // sent, and refuses the checkpoint, changing nothing.
    model changed(w0);
    opt_t c(changed.list, comm, cfg);
    for (int call = 1; call <= 6; ++call) {
        if (call == 5) c.compress_hyper().decay = 0.5f;
        changed.gradients(call);
        c.step();
    }
    const std::string with_change = saved(c);
    c.sync();
    opt_t::config later = cfg;
    later.compress.decay = 0.5f;
    model fresh(changed.w);
    opt_t d(fresh.list, comm, later);
    const std::string before = saved(d);
    std::istringstream refused(with_change);
    CHECK_THROWS_WITH_AS(d.load(refused),
                         doctest::Contains("fragment 0's exchange in flight was started with the "
                                           "compressor settings"),
                         loco::checkpoint_error);
    CHECK(saved(d) == before);
}

TEST_CASE("a format 4 stream with an exchange in flight, saved again before its restart, resumes "
          "as the stream itself") {
    // Written by loco at commit d381e04 (format 4, which did not record the outer lr an
    // exchange in flight was encoded with): delayed H = 2, error_feedback<blockwise<2, 8>> with
    // decay 0.9 folding the outer lr, outer SGD whose lr is 0.25 x call, w[i] = i / 4 - 1,
    // g[i] = ((3 i + call) mod 5) / 8 - 1/4; saved after call 3. Its restart takes the lr of
    // the call it restarts at; saved again at once (format 6), the lr is recorded as unknown, not
    // as the lr of the save, so the resaved stream resumes bit for bit as the original.
    const std::string format4 = bytes_from_hex(
        "4c4f434f434b505404000000060000000000000064696c6f636f09000000000000006f757465725f7367641900000000"
        "0000006572726f725f666565646261636b3c626c6f636b776973653e070000000000000064656c617965645b00000000"
        "0000006572726f725f666565646261636b3c626c6f636b776973653c322c383e207363616c653d6162736d617820726f"
        "756e643d6e6561726573743e2064656361793d302e38393939393939373620666f6c645f6f757465725f6c723d310d00"
        "000000000000667261676d656e7420303a20770100000000000000000000000000000000000000000000000400000000"
        "0000006d65616e11000000000000006f757465725f736764206c723d302e373501000000000000000000000000000000"
        "030000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "010000000000000008000000000000000300000000000000000000000000000003000000000000007367640100000000"
        "000000080000000000000000000000000000000000000000000000000000000000000000000000000000000800000000"
        "000000000080bf000040bf000000bf000080be000000000000803e0000003f0000403f00000000000000000a00000000"
        "000000616c6c5f6761746865720000000000000000000000000000000008000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000001000000000000000200000000000000080000"
        "0000000000c0cc4cbc00000000c0cc4c3c9c9919bd9a99193dc0cc4cbc00000000c0cc4c3c0200000000000000000000"
        "0000000000672d7307e859fcbe");
    REQUIRE(format4.size() == 637);
    using ef = loco::compress::error_feedback<loco::compress::blockwise<2, 8>>;
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, ef, loco::schedule::delayed>;
    opt_t::config cfg{.inner = {.lr = 0.1f}, .outer = {.lr = 0.7f}, .schedule = {.every = 2}};
    cfg.compress.decay = 0.9f;
    cfg.compress.fold_outer_lr = true;
    const std::vector<float> w_at_3{-0x1.033334p+0f, -0x1.79999ap-1f, -0x1.0cccccp-1f, -0x1p-2f,
                                    0x1.99999ap-6f,  0x1.e66666p-3f,  0x1.066666p-1f, 0x1.733334p-1f};
    loco::comm::single comm;
    const auto resume = [&](const std::string& stream, bool save_again) {
        std::vector<float> w = w_at_3, g(8);
        loco::parameter_list list;
        list.add("w", w, g);
        auto opt = std::make_unique<opt_t>(list, comm, cfg);
        std::istringstream is(stream);
        opt->load(is);
        if (save_again) {
            const std::string resaved = saved(*opt);
            CHECK(static_cast<unsigned char>(resaved[8]) == 6);
            opt = std::make_unique<opt_t>(list, comm, cfg);
            std::istringstream again(resaved);
            opt->load(again);
        }
        for (int call = 4; call <= 8; ++call) {
            opt->outer_hyper().lr = 0.25f * float(call);
            for (int i = 0; i < 8; ++i) g[std::size_t(i)] = 0.125f * float((i * 3 + call) % 5) - 0.25f;
            opt->step();
        }
        opt->sync();
        return w;
    };
    CHECK(resume(format4, true) == resume(format4, false));
}

TEST_CASE("format 4 streams: the handle's skip streak carries into its fragment, and a planned finish with nothing counts as a started round") {
    // Formats 1 to 4 recorded one skip streak for the handle (not one per fragment) and did not
    // record whether the delayed schedule had started a round: load() derives both. Written by
    // loco at commit e0cdba3 (format 4) from the runs below (comm::single, one_tensor_run, inner
    // SGD lr 0.5, outer SGD lr 1); each loaded stream, saved again, gives this build's own run's
    // bytes, and the runs go on alike.
    loco::comm::single comm;
    SUBCASE("a streak of one skipped sync on 'w'") {
        // every H = 2, max_skipped_syncs 2, w[1] NaN before call 2: the sync is skipped (the
        // local values back to the global {1, 2}); saved after call 2.
        const std::string format4 = bytes_from_hex(
            "4c4f434f434b505404000000060000000000000064696c6f636f09000000000000006f757465725f7367640400000000"
            "0000006e6f6e650500000000000000657665727904000000000000006e6f6e650d00000000000000667261676d656e74"
            "20303a207701000000000000000000000000000000000000000000000004000000000000006d65616e0e000000000000"
            "006f757465725f736764206c723d31010000000000000000000000000000000200000000000000010000000000000001"
            "000000000000000100000000000000770000000000000000000000000000000001000000000000000200000000000000"
            "020000000000000000000000000000000300000000000000736764010000000000000002000000000000000000000000"
            "00000002000000000000000000803f0000004000000000000000000a00000000000000616c6c5f726564756365000000"
            "000000000001000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
            "000000000000000000000000000000000000000000f3a5ea479b28dc02");
        REQUIRE(format4.size() == 413);
        REQUIRE(static_cast<unsigned char>(format4[8]) == 4);
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd>;
        const opt_t::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 1.0f},
                                .schedule = {.every = 2}, .max_skipped_syncs = 2};
        one_tensor_run<opt_t> straight(comm, cfg);
        straight.call(1);
        straight.w[1] = std::numeric_limits<float>::quiet_NaN();
        straight.call(2);
        REQUIRE(straight.opt.skipped_syncs() == 1);
        REQUIRE(straight.w == std::vector<float>{1.0f, 2.0f});
        one_tensor_run<opt_t> resumed(comm, cfg, straight.w);
        std::istringstream is(format4);
        resumed.opt.load(is);
        CHECK(saved(resumed.opt) == saved(straight.opt));
        // Two more skipped syncs (calls 4 and 6): the third in a row raises, in both runs at
        // call 6 (a streak restarted from 0 would let call 6 pass).
        for (auto* run : {&straight, &resumed}) {
            int raised_at = 0;
            for (int s = 3; s <= 6 && raised_at == 0; ++s) {
                if (s % 2 == 0) run->w[1] = std::numeric_limits<float>::quiet_NaN();
                try {
                    run->call(s);
                } catch (const loco::nonfinite_error& e) {
                    raised_at = s;
                    CHECK(std::string(e.what()).find("3 syncs in a row") != std::string::npos);
                }
            }
            CHECK(raised_at == 6);
        }
    }
    SUBCASE("delayed: the finish planned for an exchange sync() applied early") {
        // delayed H = 3: round 1's exchange starts at call 3; sync() after call 4 applies it
        // early (2 outer steps), and the finish planned at call 6 has nothing. Saved then.
        const std::string format4 = bytes_from_hex(
            "4c4f434f434b505404000000060000000000000064696c6f636f09000000000000006f757465725f7367640400000000"
            "0000006e6f6e65070000000000000064656c6179656404000000000000006e6f6e650d00000000000000667261676d65"
            "6e7420303a207701000000000000000000000000000000000000000000000004000000000000006d65616e0e00000000"
            "0000006f757465725f736764206c723d3101000000000000000000000000000000040000000000000000000000000000"
            "000000000000000000000000000000000000000000000000000000000000000000010000000000000002000000000000"
            "000400000000000000000000000000000003000000000000007367640100000000000000020000000000000000000000"
            "000000000200000000000000000000bf0000704000000000000000000a00000000000000616c6c5f7265647563650200"
            "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
            "0000000000000000000000000000010000000000000020f8ca8cbeeb09bd");
        REQUIRE(format4.size() == 414);
        REQUIRE(static_cast<unsigned char>(format4[8]) == 4);
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                   loco::schedule::delayed>;
        const opt_t::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 1.0f},
                                .schedule = {.every = 3}};
        one_tensor_run<opt_t> straight(comm, cfg);
        for (int s = 1; s <= 4; ++s) straight.call(s);
        straight.opt.sync();
        REQUIRE(straight.opt.outer_steps() == 2);
        REQUIRE(straight.w == std::vector<float>{-0.5f, 3.75f});
        one_tensor_run<opt_t> resumed(comm, cfg, straight.w);
        std::istringstream is(format4);
        resumed.opt.load(is);
        CHECK(saved(resumed.opt) == saved(straight.opt));
        for (int s = 5; s <= 10; ++s) {
            straight.call(s);
            resumed.call(s);
        }
        straight.opt.sync();
        resumed.opt.sync();
        CHECK(resumed.w == straight.w);
        CHECK(resumed.opt.outer_steps() == straight.opt.outer_steps());
        CHECK(std::vector<float>(resumed.opt.global().begin(), resumed.opt.global().end()) ==
              std::vector<float>(straight.opt.global().begin(), straight.opt.global().end()));
    }
}

TEST_CASE("a skip streak whose tensor has a name over 4096 bytes saves and loads") {
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    const std::string name(5000, 'p');
    std::vector<float> w(8, 1.0f), g(8, 0.1f);
    loco::parameter_list list;
    list.add(name, w, g);
    loco::comm::single comm;
    opt_t opt(list, comm, {.schedule = {.every = 2}});
    opt.step();
    w[3] = std::numeric_limits<float>::quiet_NaN();  // the sync at call 2 is skipped
    opt.step();
    REQUIRE(opt.skipped_syncs() == 1);
    const std::string checkpoint = saved(opt);
    opt_t fresh(list, comm, {.schedule = {.every = 2}});
    std::istringstream is(checkpoint);
    CHECK_NOTHROW(fresh.load(is));
    CHECK(saved(fresh) == checkpoint);
}

TEST_CASE("a checkpoint saved before start() resumes as the run that saved it: rank 0's values "
          "broadcast at the first step") {
    // Format 6 records whether the handle had started. Loaded as started, each worker kept its
    // own construction-time values as the global parameters (never agreed), and the ranks went
    // apart for good; built before the model's initialisation, the first sync stepped towards
    // the values before it.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    const opt_t::config cfg{.inner = {.lr = 0.1f}, .schedule = {.every = 2}};
    auto rng = rng_for("save before start");
    std::array<std::vector<float>, 2> init = {normal_floats(rng, 5), normal_floats(rng, 5)};
    std::array<std::vector<float>, 4> grads;
    for (auto& g : grads) g = normal_floats(rng, 5);
    std::array<std::string, 2> checkpoints;
    std::array<std::vector<float>, 2> straight, resumed;
    const auto train = [&](opt_t& opt, std::vector<float>& g, std::vector<float>& w) {
        for (const auto& gi : grads) {
            g = gi;
            opt.step();
        }
        return w;
    };
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        std::vector<float> w(5, 0.0f), g(5);  // the model is initialised after the handle
        loco::parameter_list list;
        list.add("w", w, g);
        opt_t opt(list, comm, cfg);
        checkpoints[r] = saved(opt);
        w = init[r];
        straight[r] = train(opt, g, w);
    });
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        std::vector<float> w(5, 0.0f), g(5);
        loco::parameter_list list;
        list.add("w", w, g);
        opt_t opt(list, comm, cfg);
        std::istringstream is(checkpoints[r]);
        opt.load(is);
        w = init[r];
        resumed[r] = train(opt, g, w);
    });
    CHECK(resumed[0] == straight[0]);
    CHECK(resumed[1] == straight[1]);
    CHECK(straight[0] == straight[1]);  // synced at call 4 from rank 0's initial values
}

TEST_CASE("warmup<S> checkpoints name the wrapped schedule, and format 2's plain 'warmup' still loads") {
    using warm_every = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                    loco::schedule::warmup<loco::schedule::every>>;
    using warm_delayed = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                      loco::schedule::warmup<loco::schedule::delayed>>;
    static_assert(loco::schedule::warmup<loco::schedule::every>::name == "warmup<every>");
    const warm_every::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                                 .schedule = {.steps = 2, .then = {.every = 3}}};
    // Written by loco at commit 5e02b60 (format 2, schedule recorded as "warmup") from the
    // one_tensor_run below, saved after call 3: the two warm-up syncs done, one call of every(3)
    // behind it.
    const std::string format2 = bytes_from_hex("4c4f434f434b505402000000060000000000000064696c6f636f0e000000000000006f757465725f6e65737465726f76"
        "04000000000000006e6f6e6506000000000000007761726d757004000000000000006e6f6e650d000000000000006672"
        "61676d656e7420303a207704000000000000006d65616e32000000000000006f757465725f6e65737465726f76206c72"
        "3d302e363939393939393838206d6f6d656e74756d3d302e383939393939393736010000000000000000000000000000"
        "000200000000000000010000000000000000000000000000000000000000000000000000000000000001000000000000"
        "000200000000000000030000000000000000000000000000000300000000000000736764010000000000000002000000"
        "00000000000000000000000002000000000000008c970ebe6abc394002000000000000009a99393fcdcc1cbf0a000000"
        "00000000616c6c5f72656475636502000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000f1af99cd8fa48009");
    REQUIRE(format2.size() == 430);
    loco::comm::single comm;
    one_tensor_run<warm_every> straight(comm, cfg);
    for (int s = 1; s <= 3; ++s) straight.call(s);
    // The run as then printed it.
    CHECK(straight.w == std::vector<float>{-0x1.c74bc6p-1f, 0x1.01bc6ap+2f});

    one_tensor_run<warm_every> resumed(comm, cfg, straight.w);
    std::istringstream is(format2);
    resumed.opt.load(is);
    std::vector<int> syncs;
    for (int s = 4; s <= 9; ++s) {
        straight.call(s);
        if (resumed.call(s).synced) syncs.push_back(s);
        CHECK(resumed.w == straight.w);
    }
    CHECK(syncs == std::vector<int>{5, 8});
    CHECK(resumed.opt.outer_steps() == straight.opt.outer_steps());

    // This build writes format 3 with the whole name; a handle whose warm-up wraps another
    // schedule with the same state refuses it before changing anything.
    const std::string now = saved(resumed.opt);
    CHECK(static_cast<unsigned char>(now[8]) == 6);
    CHECK(now.find("warmup<every>") != std::string::npos);
    one_tensor_run<warm_delayed> other(
        comm, {.inner = {.lr = 0.5f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
               .schedule = {.steps = 2, .then = {.every = 3}}},
        {3.0f, 4.0f});
    std::istringstream in(now);
    CHECK_THROWS_WITH_AS(other.opt.load(in),
                         "loco: checkpoint mismatch in the sync schedule: saved 'warmup<every>', "
                         "this optimizer has 'warmup<delayed>'",
                         loco::checkpoint_error);
    CHECK(other.opt.calls() == 0);
    CHECK(other.w == std::vector<float>{3.0f, 4.0f});
}

TEST_CASE("streaming: H or tau changed while an exchange is in flight is refused, between exchanges taken") {
    // H = 8, P = 2, tau = 1: fragment 0's exchange starts at call 3 and is due at call 4.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::streaming>;
    const opt_t::config cfg{.inner = {.lr = 0.1f},
                            .schedule = {.every = 8, .fragments = 2, .overlap = 1}};
    const inputs in("streaming tau change", 24);
    loco::comm::single comm;
    worker_model m(in.init);
    opt_t opt(m.list, comm, cfg);
    int step = 0;
    const auto next = [&] {
        m.set_gradients(in.grads[static_cast<std::size_t>(step) * 2]);
        ++step;
        return opt.step();
    };
    for (int i = 0; i < 3; ++i) next();
    REQUIRE(opt.in_flight(0));
    const std::string mid_flight = saved(opt);
    const std::vector<float> values_then = m.values();
    opt.schedule_hyper().overlap = 0;
    CHECK_THROWS_WITH_AS(next(), doctest::Contains("while fragment 0's exchange is in flight (due "
                                                   "at call 4)"),
                         loco::invalid_argument);
    CHECK(opt.calls() == 3);  // the call was not counted, nor its inner step applied
    CHECK(opt.inner_steps() == 3);
    CHECK(opt.calls() == opt.inner_steps() + opt.skipped_steps());
    CHECK(m.values() == values_then);
    opt.schedule_hyper().every = 16;
    CHECK_THROWS_AS(next(), loco::invalid_argument);
    opt.schedule_hyper() = cfg.schedule;
    next();  // call 4 applies fragment 0
    CHECK(opt.outer_steps(0) == 1);
    CHECK(!opt.in_flight(0));
    // Nothing in flight now: tau = 0 is taken, and every exchange starts and ends in one call.
    opt.schedule_hyper().overlap = 0;
    for (int i = 0; i < 16; ++i) {
        const bool synced = next().synced;
        CHECK(synced == (opt.calls() % 4 == 0));
        CHECK(!opt.in_flight(0));
        CHECK(!opt.in_flight(1));
    }
    CHECK(opt.outer_steps() == 1 + 4);
    // A run resumed with tau = 0 from a checkpoint saved in flight with tau = 1: the same error.
    worker_model m2(in.init);
    m2.set_values(values_then);
    opt_t::config lowered = cfg;
    lowered.schedule.overlap = 0;
    opt_t resumed(m2.list, comm, lowered);
    std::istringstream is(mid_flight);
    resumed.load(is);
    CHECK_THROWS_WITH_AS(resumed.step(), doctest::Contains("changed from 8 and 1 to 8 and 0"),
                         loco::invalid_argument);

    // sync() with fragment 0's exchange in flight finishes it: nothing is in flight after it,
    // so tau = 0 is taken at once (it was refused until call 4, whose apply had nothing left).
    worker_model m3(in.init);
    opt_t early(m3.list, comm, cfg);
    for (int call = 1; call <= 3; ++call) {
        m3.set_gradients(in.grads[static_cast<std::size_t>(call - 1) * 2]);
        early.step();
    }
    REQUIRE(early.in_flight(0));
    early.sync();
    early.schedule_hyper().overlap = 0;
    for (int call = 4; call <= 12; ++call) {
        m3.set_gradients(in.grads[static_cast<std::size_t>(call - 1) * 2]);
        CHECK(early.step().synced == (call % 4 == 0));
        CHECK(!early.in_flight(0));
        CHECK(!early.in_flight(1));
    }
    // Fragment 0: early and in the sync, then at calls 4 and 12; fragment 1: in the sync, then
    // at call 8.
    CHECK(early.outer_steps(0) == 4);
    CHECK(early.outer_steps(1) == 2);
}

TEST_CASE("streaming: H changed right after an apply is taken, and a fragment whose new start has passed "
          "waits for its next window, across a checkpoint") {
    // H = 6, P = 2, tau = 1: fragment 0 applies at calls 3, 9, ..., fragment 1 at 6, 12, ...
    // After call 3 nothing is in flight; H = 4 then puts fragment 1's apply at call 4 with its
    // start at call 3, already past: fragment 1 skips that apply and syncs at call 8 (started
    // at 7); fragment 0 applies at 6 (started at 5) and 10.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::streaming>;
    const opt_t::config cfg{.inner = {.lr = 0.1f},
                            .schedule = {.every = 6, .fragments = 2, .overlap = 1}};
    const inputs in("streaming H change", 12);
    loco::comm::single comm;
    worker_model m(in.init);
    opt_t opt(m.list, comm, cfg);
    int step = 0;
    const auto next = [&](opt_t& o, worker_model& w) {
        w.set_gradients(in.grads[static_cast<std::size_t>(step) * 2]);
        ++step;
        return o.step();
    };
    for (int i = 0; i < 3; ++i) next(opt, m);
    REQUIRE(opt.outer_steps(0) == 1);
    REQUIRE(!opt.in_flight(0));
    REQUIRE(!opt.in_flight(1));
    opt.schedule_hyper().every = 4;
    std::vector<int> applied0, applied1;
    std::string at_call_4;
    for (int c = 4; c <= 10; ++c) {
        const auto before0 = opt.outer_steps(0), before1 = opt.outer_steps(1);
        CHECK_NOTHROW(next(opt, m));
        if (opt.outer_steps(0) > before0) applied0.push_back(c);
        if (opt.outer_steps(1) > before1) applied1.push_back(c);
        if (c == 4) at_call_4 = saved(opt);
    }
    CHECK(applied0 == std::vector<int>{6, 10});
    CHECK(applied1 == std::vector<int>{8});
    // Resumed from call 4 (format 3 records which exchanges the schedule started), the same.
    worker_model m2(in.init);
    opt_t resumed(m2.list, comm, {.inner = {.lr = 0.1f},
                                  .schedule = {.every = 4, .fragments = 2, .overlap = 1}});
    std::istringstream is(at_call_4);
    resumed.load(is);
    step = 4;
    std::vector<int> resumed1;
    for (int c = 5; c <= 10; ++c) {
        const auto before1 = resumed.outer_steps(1);
        CHECK_NOTHROW(next(resumed, m2));
        if (resumed.outer_steps(1) > before1) resumed1.push_back(c);
    }
    CHECK(resumed1 == std::vector<int>{8});
    CHECK(resumed.outer_steps(0) == opt.outer_steps(0));

    // The fragment pattern is fixed by the split made at construction.
    opt.schedule_hyper().pattern = loco::fragment_pattern::sequential;
    const auto calls = opt.calls();
    CHECK_THROWS_WITH_AS(opt.step(),
                         "loco::diloco: the schedule now asks for the sequential fragment pattern "
                         "but the model was split strided at construction; keep the pattern",
                         loco::invalid_argument);
    CHECK(opt.calls() == calls);
}

TEST_CASE("streaming: format 1 and 2 checkpoints saved with an exchange in flight resume it, also "
          "when saved again before the next step") {
    // Formats 1 and 2 did not record which exchanges the schedule started: load() tells it from
    // the exchanges in flight. Written by loco at commits 5e02b60 (format 2) and d450e4e
    // (format 1): H = 4, P = 2, tau = 1, tensors a (2) and b (1), gradients (s / 2, -s^2 / 4)
    // and s / 8 at calls s = 1..5, saved after call 5 with fragment 0's exchange in flight (due
    // at call 6).
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                               loco::schedule::streaming>;
    const opt_t::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                            .schedule = {.every = 4, .fragments = 2, .overlap = 1}};
    const std::string format2 = bytes_from_hex(
        "4c4f434f434b505402000000060000000000000064696c6f636f0e000000000000006f757465725f6e65737465726f76"
        "04000000000000006e6f6e65090000000000000073747265616d696e6704000000000000006e6f6e651c000000000000"
        "00667261676d656e7420303a20613b20667261676d656e7420313a206204000000000000006d65616e32000000000000"
        "006f757465725f6e65737465726f76206c723d302e363939393939393838206d6f6d656e74756d3d302e383939393939"
        "393736010000000000000000000000000000000500000000000000040000000000000001000000000000000000000000"
        "000000000000000000000000000000000000000200000000000000020000000000000001000000000000000500000000"
        "000000000000000000000003000000000000007367640100000000000000030000000000000000000000000000000000"
        "0000030000000000000048e12a3fd7a30a400ad7bfbf03000000000000000000803e000000be0000c03e0a0000000000"
        "0000616c6c5f726564756365010000000000000000000000000000000000000000000000000000000000000001000000"
        "0000000005000000000000000200000000000000295c4d400a57cfc00500000000000000000000000000000001000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "00000000000000000000000000000000000000001e9319685a4674a8");
    REQUIRE(format2.size() == 556);
    const std::string format1 = bytes_from_hex(
        "4c4f434f434b505401000000060000000000000064696c6f636f0e000000000000006f757465725f6e65737465726f76"
        "04000000000000006e6f6e65090000000000000073747265616d696e6704000000000000006e6f6e651c000000000000"
        "00667261676d656e7420303a20613b20667261676d656e7420313a206204000000000000006d65616e32000000000000"
        "006f757465725f6e65737465726f76206c723d302e363939393939393838206d6f6d656e74756d3d302e383939393939"
        "393736010000000000000000000000000000000500000000000000000000000000000000000000000000000000000000"
        "000000020000000000000002000000000000000100000000000000050000000000000000000000000000000300000000"
        "00000073676401000000000000000300000000000000000000000000000000000000030000000000000048e12a3fd7a3"
        "0a400ad7bfbf03000000000000000000803e000000be0000c03e0a00000000000000616c6c5f72656475636501000000"
        "000000000000000000000000000000000000000000000000000000000100000000000000050000000000000002000000"
        "00000000295c4d400a57cfc0010000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000aba61a7236e3fccc");
    REQUIRE(format1.size() == 508);
    struct two_tensors {
        std::vector<float> a = {1.0f, 2.0f}, b = {-1.0f}, ga = std::vector<float>(2),
                           gb = std::vector<float>(1);
        loco::parameter_list list;
        two_tensors() { list.add("a", a, ga).add("b", b, gb); }
        void gradients(int s) {
            ga[0] = 0.5f * float(s);
            ga[1] = -0.25f * float(s * s);
            gb[0] = 0.125f * float(s);
        }
    };
    loco::comm::single comm;
    two_tensors straight_model;
    opt_t straight(straight_model.list, comm, cfg);
    for (int s = 1; s <= 5; ++s) {
        straight_model.gradients(s);
        straight.step();
    }
    CHECK(straight_model.a == std::vector<float>{-0x1.4547aep+1f, 0x1.14a8f6p+3f});
    CHECK(straight_model.b == std::vector<float>{-0x1.dfd70ap+0f});
    const std::vector<float> a_at_5 = straight_model.a, b_at_5 = straight_model.b;
    std::vector<std::vector<float>> straight_a, straight_b;
    for (int s = 6; s <= 13; ++s) {
        straight_model.gradients(s);
        straight.step();
        straight_a.push_back(straight_model.a);
        straight_b.push_back(straight_model.b);
    }
    // Each old stream; each also loaded, saved again at once (the current format) and loaded
    // from that.
    for (const bool resaved : {false, true}) {
        for (const std::string* old : {&format2, &format1}) {
            CAPTURE(resaved);
            CAPTURE(old == &format1 ? 1 : 2);
            std::string stream = *old;
            if (resaved) {
                two_tensors first_model;
                opt_t first(first_model.list, comm, cfg);
                std::istringstream in(stream);
                first.load(in);
                stream = saved(first);
                CHECK(static_cast<unsigned char>(stream[8]) == 6);
            }
            // A communicator of its own: the run ends with an exchange in flight, which
            // poisons a communicator when its handle goes.
            loco::comm::single own;
            two_tensors resumed_model;
            resumed_model.a = a_at_5;
            resumed_model.b = b_at_5;
            opt_t resumed(resumed_model.list, own, cfg);
            std::istringstream is(stream);
            resumed.load(is);
            for (int s = 6; s <= 13; ++s) {
                resumed_model.gradients(s);
                CHECK_NOTHROW(resumed.step());
                CHECK(resumed_model.a == straight_a[std::size_t(s - 6)]);
                CHECK(resumed_model.b == straight_b[std::size_t(s - 6)]);
            }
            CHECK(resumed.outer_steps(0) == straight.outer_steps(0));
            CHECK(resumed.outer_steps(1) == straight.outer_steps(1));
        }
    }
    // The derived flags also guard a change of tau while that exchange is in flight.
    two_tensors again_model;
    opt_t again(again_model.list, comm, {.inner = {.lr = 0.5f}, .outer = {.lr = 0.7f, .momentum = 0.9f},
                                         .schedule = {.every = 4, .fragments = 2, .overlap = 0}});
    std::istringstream again_in(format2);
    again.load(again_in);
    CHECK_THROWS_WITH_AS(again.step(), doctest::Contains("changed from 4 and 1 to 4 and 0 while "
                                                         "fragment 0's exchange is in flight (due "
                                                         "at call 6)"),
                         loco::invalid_argument);
}

TEST_CASE("delayed: a failed finish skips the next round's start, whose planned finish applies nothing") {
    // H = 3: round 1's exchange starts at call 3; at call 6 its transfer fails on rank 1 (every
    // rank raises) before round 2's exchange could start. Call 9 then has nothing to apply and
    // starts round 3's exchange, which travels to call 12 as usual.
    const delayed_t::config cfg{.inner = {.lr = 1e-2f},
                                .outer = {.lr = 0.7f, .momentum = 0.9f},
                                .schedule = {.every = 3}};
    const inputs in("delayed failed finish", 12);
    std::array<std::string, 2> errors;
    std::array<std::vector<float>, 2> globals;
    loco::comm::run_threads(2, [&](loco::comm::threads& threads) {
        // all-reduces: 1 the fingerprint, 2 round 1's data (started at call 3)
        failing_transfer comm(threads, 1, 2);
        const auto r = static_cast<std::size_t>(comm.rank());
        worker_model m(in.init);
        delayed_t opt(m.list, comm, cfg);
        for (int step = 1; step <= 12; ++step) {
            m.set_gradients(in.grads[static_cast<std::size_t>(step - 1) * 2 + r]);
            try {
                opt.step();
            } catch (const loco::comm_error& e) {
                errors[r] = std::to_string(step) + ": " + e.what();
            }
            if (step == 6) CHECK(!opt.in_flight(0));
            if (step == 9) {
                CHECK(opt.outer_steps() == 0);
                CHECK(opt.in_flight(0));
            }
        }
        CHECK(opt.outer_steps() == 1);
        globals[r].assign(opt.global().begin(), opt.global().end());
    });
    for (const std::string& e : errors) {
        CHECK(e.rfind("6: loco::diloco: the sync of fragment 0 failed on rank 1", 0) == 0);
    }
    CHECK(globals[0] == globals[1]);
}

namespace {

// Forwards to `next`, and refuses at once the next start of an all-reduce or all-gather once
// armed, as a communicator whose peer check fails can.
class refusing_next_start final : public forwarding_comm {
public:
    explicit refusing_next_start(loco::comm::communicator& next)
        : forwarding_comm(next, "refusing_next_start") {}
    bool armed = false;

protected:
    std::unique_ptr<loco::comm::request::operation> do_start_all_reduce(
        loco::tensor_view<float> d, loco::comm::reduce_op op) override {
        refuse_if_armed();
        return communicator::do_start_all_reduce(d, op);
    }
    std::unique_ptr<loco::comm::request::operation> do_start_all_gather(
        loco::tensor_view<const std::byte> send, loco::tensor_view<std::byte> recv) override {
        refuse_if_armed();
        return communicator::do_start_all_gather(send, recv);
    }

private:
    void refuse_if_armed() {
        if (armed) {
            armed = false;
            throw loco::comm_error("injected: start refused");
        }
    }
};

}  // namespace

TEST_CASE("a bad compressor setting on every rank is refused before the inner update, and the run goes on") {
    // The settings are shared, so every rank refuses alike: nothing moved anywhere, and once
    // the setting is mended the next call syncs (the handle is not left out of step).
    using topk_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::topk>;
    const inputs in("bad compressor setting", 4);
    std::array<std::vector<float>, 2> finals;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        worker_model m(in.init);
        topk_t opt(m.list, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 1},
                                  .compress = {.ratio = 0.5f}});
        m.set_gradients(in.grads[0 * 2 + r]);
        opt.step();
        const auto values = m.values();
        const auto calls = opt.calls();
        opt.compress_hyper().ratio = 0.0f;
        m.set_gradients(in.grads[1 * 2 + r]);
        CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("ratio"), loco::invalid_argument);
        CHECK(m.values() == values);  // not even the inner step
        CHECK(opt.calls() == calls);
        opt.compress_hyper().ratio = 0.5f;
        CHECK_NOTHROW(opt.step());
        CHECK_NOTHROW(opt.sync());
        CHECK(opt.outer_steps() == 3);
        finals[r].assign(opt.global().begin(), opt.global().end());
    });
    CHECK(finals[0] == finals[1]);
}

TEST_CASE("a handle out of step after a refused start is in step again after every rank's load()") {
    // Every rank's communicator refuses the start of call 3's exchange (the call's first
    // collective), so every handle is left out of step, with nothing posted on any rank; loading every rank's checkpoint of call 2 brings them back, and the
    // run continues as one never interrupted.
    using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    const opt_t::config cfg{.inner = {.lr = 1e-2f}, .schedule = {.every = 1}};
    const inputs in("out of step then load", 5);
    std::array<std::vector<float>, 2> straight, resumed;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        worker_model m(in.init);
        opt_t opt(m.list, comm, cfg);
        for (int step = 0; step < 5; ++step) {
            m.set_gradients(in.grads[static_cast<std::size_t>(step) * 2 + r]);
            opt.step();
        }
        straight[r].assign(opt.global().begin(), opt.global().end());
    });
    loco::comm::run_threads(2, [&](loco::comm::threads& threads) {
        const auto r = static_cast<std::size_t>(threads.rank());
        refusing_next_start comm(threads);
        worker_model m(in.init);
        opt_t opt(m.list, comm, cfg);
        std::string checkpoint;
        std::vector<float> values_at_save;
        for (int step = 0; step < 2; ++step) {
            m.set_gradients(in.grads[static_cast<std::size_t>(step) * 2 + r]);
            opt.step();
        }
        {
            std::ostringstream os;
            opt.save(os);
            checkpoint = os.str();
            values_at_save = m.values();
        }
        m.set_gradients(in.grads[2 * 2 + r]);
        comm.armed = true;
        CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("injected: start refused"),
                             loco::comm_error);
        CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("refuses to sync"), loco::comm_error);
        m.set_values(values_at_save);
        std::istringstream is(checkpoint);
        opt.load(is);
        for (int step = 2; step < 5; ++step) {
            m.set_gradients(in.grads[static_cast<std::size_t>(step) * 2 + r]);
            opt.step();
        }
        resumed[r].assign(opt.global().begin(), opt.global().end());
    });
    CHECK(resumed == straight);
}

TEST_CASE("golden format 6: a wallclock handle's checkpoint reads back its syncs and skipped windows") {
    // Written by loco at commit 962d863 (format 6) from the run below: comm::single,
    // one_tensor_run, inner SGD lr 0.5, outer SGD lr 1, schedule::wallclock T = 2 s,
    // min_total_global_steps 4, on a clock advanced 1 s per call, saved after call 8. By the rule
    // of docs/schedules.md (wallclock): the first window opens at call 1 and closes at call 3
    // (3 steps since the sync < 4: skipped), the next closes at call 5 (5 steps: synced), the
    // next at call 7 (2 steps: skipped); at call 8: 8 calls, 3 steps since the sync, 1 sync, 2
    // skipped windows, one outer step, and the global values the local ones of call 5:
    // w - 0.5 * sum of the gradients of calls 1..5 = {1 - 3.75, 2 + 6.875} (outer SGD at lr 1),
    // exact in fp32. The fields are all different numbers, so that a reader and a writer that
    // swapped two of them alike are caught: the fixture is this format's bytes, not what the
    // build of the day writes and reads back.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::wallclock>;
    auto now = std::make_shared<double>(0.0);
    const opt_t::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 1.0f},
                            .schedule = {.seconds = 2.0, .min_total_global_steps = 4,
                                         .clock = [now] { return *now; }}};
    loco::comm::single comm;
    one_tensor_run<opt_t> straight(comm, cfg);
    for (int s = 1; s <= 8; ++s) {
        *now += 1.0;
        straight.call(s);
    }
    const std::string written = saved(straight.opt);
    const std::string fixture = bytes_from_hex(
        "4c4f434f434b505406000000060000000000000064696c6f636f09000000000000006f757465725f7367640400000000"
        "0000006e6f6e65090000000000000077616c6c636c6f636b04000000000000006e6f6e650d0000000000000066726167"
        "6d656e7420303a207701000000000000000000000000000000000000000000000004000000000000006d65616e0e0000"
        "00000000006f757465725f736764206c723d310100000000000000000000000000000008000000000000000300000000"
        "000000010000000000000002000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000001000000000000000000000000000000000000000000000001000000000000000200000000"
        "000000080000000000000000000000000000000300000000000000736764010000000000000002000000000000000000"
        "0000000000000200000000000000000030c000000e4100000000000000000a00000000000000616c6c5f726564756365"
        "010000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000010000000000000030e27cfe51563391");
    REQUIRE(fixture.size() == 472);
    REQUIRE(static_cast<unsigned char>(fixture[8]) == 6);
    CHECK(written == fixture);  // this build writes the format's bytes

    one_tensor_run<opt_t> resumed(comm, cfg, straight.w);
    std::istringstream is(fixture);
    resumed.opt.load(is);
    CHECK(resumed.opt.schedule().calls() == 8);
    CHECK(resumed.opt.schedule().syncs() == 1);
    CHECK(resumed.opt.schedule().skipped_windows() == 2);
    CHECK(resumed.opt.outer_steps() == 1);
    CHECK(std::vector<float>(resumed.opt.global().begin(), resumed.opt.global().end()) ==
          std::vector<float>{-2.75f, 8.875f});
    CHECK(saved(resumed.opt) == fixture);  // and reads them back to the same state
}

TEST_CASE("golden format 6: an EDiT handle's checkpoint reads back its detector") {
    // Written by loco at commit 962d863 (format 6) from the run below: comm::single, inner SGD
    // lr 0.5, outer SGD lr 1, every H = 2, aggregate::edit with ewma_alpha 0.5, ewma_warmup 2,
    // threshold 3, no consensus; w = {1, 2}, gradient (0.5 (1 + s mod 3), -0.25 (1 + s mod 2))
    // at call s; saved after call 6: three rounds applied, none flagged (the detector's
    // count 3, mean 0.9068 and M2 0.0684, all different), the global values
    // w - 0.5 * sum of the gradients = {1 - 3, 2 + 1.125}, exact in fp32. The detector is not
    // visible through the handle: the run resumed from the fixture must go on bit for bit as the
    // one never interrupted, every later round learning from the detector it loaded.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                               loco::schedule::every, loco::aggregate::edit>;
    opt_t::config cfg{.inner = {.lr = 0.5f}, .outer = {.lr = 1.0f}, .schedule = {.every = 2}};
    cfg.aggregate.ewma_alpha = 0.5f;
    cfg.aggregate.ewma_warmup = 2;
    cfg.aggregate.ewma_threshold = 3.0f;
    cfg.aggregate.consensus = loco::aggregate::sign_consensus::none;
    struct run {
        std::vector<float> w{1.0f, 2.0f}, g = std::vector<float>(2);
        loco::parameter_list list;
        opt_t opt;
        run(loco::comm::communicator& comm, const opt_t::config& c)
            : list(listed(w, g)), opt(list, comm, c) {}
        run(const run&) = delete;  // the list points into w and g
        void call(int s) {
            g[0] = 0.5f * float(1 + s % 3);
            g[1] = -0.25f * float(1 + s % 2);
            opt.step();
        }
        static loco::parameter_list listed(std::vector<float>& w, std::vector<float>& g) {
            loco::parameter_list l;
            l.add("w", w, g);
            return l;
        }
    };
    loco::comm::single comm;
    run straight(comm, cfg);
    for (int s = 1; s <= 6; ++s) straight.call(s);
    const std::string written = saved(straight.opt);
    const std::string fixture = bytes_from_hex(
        "4c4f434f434b505406000000060000000000000064696c6f636f09000000000000006f757465725f7367640400000000"
        "0000006e6f6e650500000000000000657665727904000000000000006e6f6e650d00000000000000667261676d656e74"
        "20303a207701000000000000000000000000000000000000000000000074000000000000006564697420776569676874"
        "5f62795f6e6f726d3d3120543d3120736b69705f616e6f6d616c793d3120616c7068613d302e35207761726d75703d32"
        "207468726573686f6c643d3320636f6e73656e7375733d6e6f6e6520636c69703d696e6620737465705f776569676874"
        "733d3020723d302e350e000000000000006f757465725f736764206c723d310100000000000000000000000000000006"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000001"
        "000000000000000000000000000000000000000000000001000000000000000200000000000000060000000000000000"
        "000000000000000300000000000000736764010000000000000002000000000000000000000000000000020000000000"
        "0000000000c00000484000000000000000000a00000000000000616c6c5f676174686572030000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "00000000000000000000000001000000000000000300000000000000000000703004ed3f40fe0b569e81b13f02000000"
        "00000000c7959c6752e2d13fab3dc6ed0fbbe33f01000000000000001d06aac770b63a2e");
    REQUIRE(fixture.size() == 612);
    REQUIRE(static_cast<unsigned char>(fixture[8]) == 6);
    CHECK(written == fixture);

    run resumed(comm, cfg);
    resumed.w = straight.w;
    std::istringstream is(fixture);
    resumed.opt.load(is);
    CHECK(resumed.opt.outer_steps() == 3);
    CHECK(resumed.opt.skipped_syncs() == 0);
    CHECK(std::vector<float>(resumed.opt.global().begin(), resumed.opt.global().end()) ==
          std::vector<float>{-2.0f, 3.125f});
    CHECK(saved(resumed.opt) == fixture);
    for (int s = 7; s <= 12; ++s) {
        straight.call(s);
        resumed.call(s);
    }
    CHECK(resumed.w == straight.w);
    CHECK(resumed.opt.outer_steps() == straight.opt.outer_steps());
    CHECK(resumed.opt.skipped_syncs() == straight.opt.skipped_syncs());
    CHECK(saved(resumed.opt) == saved(straight.opt));  // the detectors learnt alike
}
