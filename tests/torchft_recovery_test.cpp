// torchft's DiLoCo failure-recovery regression fixture, reproduced with loco (issue 10):
// torchft/diloco_regression_test.py, DiLoCoMockedUpdateTest.test_diloco_mocked_failure_recovery
// with (n_fragments 2, fragment_sync_delay 0, fragment_update_alpha 0), whose values are
// test_fixtures/torchft.diloco_regression_test.DiLoCoMockedUpdateTest.
// test_diloco_mocked_failure_recovery_0.json (written by torchft commit f121e4a).
//
// The run (the mock setup of tests/support/torchft_mock.hpp; H = 6, so fragment 0 syncs at calls
// 3, 9, 15, 21 and fragment 1 at 6, 12, 18; one "call" is one inner step and the sync it triggers):
//   - replicas 0 and 1 train together; both syncs of calls 3 and 6 are committed;
//   - replica 1 raises right after call 6 (EventInjector.fail_at(0, 2): manager step 2 = two
//     commits); everything it held is lost, and its runner starts its train loop again from the
//     initial model, on a new manager;
//   - replica 0 takes calls 7 and 8, which communicate nothing, and at call 9 waits in the quorum
//     (min_replicas 2) until the restarted replica 1 arrives there, after two inner steps of its
//     own (and a third, overwritten by the heal);
//   - the quorum heals replica 1 from replica 0: the fragments' global values
//     (StreamingDiLoCoFragment_i original_parameters), the manager step (which fragment is next),
//     and the trainer's own state_dict, the model (replica 0's local values) and the inner
//     optimizer state; both replicas then sync fragment 0 and train in lockstep to manager step 7.
// Recorded: each replica's values before each iteration of its train loop ("history", by its own
// iteration count: replica 1's count restarts at 0) and the global values at the first iteration
// of each manager step ("global_parameter_history").
//
// In loco: one thread per replica; a thread group for the first part; at the call-9 boundary
// (torchft's quorum) both replicas build ranks of a new group and call regroup(group, 0): replica
// 0 keeps its state, replica 1 (a fresh handle that never started) is healed with the global
// values, outer state and schedule position. The trainer's own state is the trainer's to send:
// replica 0 broadcasts its parameters over the new group, as torchft's heal loads the donor's
// model. With that, every recorded value equals the fixture exactly. Without it (regroup alone,
// loco's default), the newcomer starts from the global values and its first pseudo-gradient is
// its own; the second test case pins where and how that differs (docs/reliability.md, "torchft's
// failure-recovery fixture").
#include <doctest/doctest.h>

#include "support/torchft_mock.hpp"

#include <loco/loco.hpp>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <ostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// (layers.0.weight, layers.1.weight)
struct pair {
    float f0, f1;
    bool operator==(const pair&) const = default;
};
std::ostream& operator<<(std::ostream& os, const pair& p) { return os << "(" << p.f0 << ", " << p.f1 << ")"; }

// The fixture, copied from the JSON file: history[k] is a replica's (layers.0.weight,
// layers.1.weight) before iteration k of its train loop, i.e. after k inner steps and the syncs
// they triggered; global maps an iteration to the fragments' global values (original_parameters)
// recorded there.
const std::vector<pair> replica0_history = {
    {1, 1},     {-1, -1},   {-3, -3},   {-11, -5},  {-13, -7},  {-15, -9},  {-17, -23}, {-19, -25},
    {-21, -27}, {-35, -29}, {-37, -31}, {-39, -33}, {-41, -47}, {-43, -49}, {-45, -51}, {-59, -53},
    {-61, -55}, {-63, -57}, {-65, -71}, {-67, -73}, {-69, -75}, {-83, -77}};
const std::map<int, pair> replica0_global = {{0, {1, 1}},     {3, {-11, 1}},    {6, {-11, -23}},
                                             {9, {-35, -23}}, {12, {-35, -47}}, {15, {-59, -47}},
                                             {18, {-59, -71}}};
// Replica 1 after its restart (its first attempt's record is lost with it).
const std::vector<pair> replica1_history = {
    {1, 1},     {-1, -1},   {-3, -3},   {-35, -29}, {-37, -31}, {-39, -33}, {-41, -47}, {-43, -49},
    {-45, -51}, {-59, -53}, {-61, -55}, {-63, -57}, {-65, -71}, {-67, -73}, {-69, -75}, {-83, -77}};
const std::map<int, pair> replica1_global = {
    {0, {1, 1}}, {3, {-35, -23}}, {6, {-35, -47}}, {9, {-59, -47}}, {12, {-59, -71}}};

constexpr int crash_after = 6;   // replica 1 raises after call 6 (manager step 2)
constexpr int rejoin_at = 9;     // the quorum of call 9 takes replica 1 back
constexpr int last_call = 21;    // manager step 7: seven syncs
constexpr int alone_steps = 2;   // the restarted replica 1's recorded inner steps before the quorum

// torchft's InjectedFailure, raised by the train loop of replica 1.
struct injected_failure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// What the newcomer's parameters start from when it rejoins.
enum class rejoin { donor_parameters, global_values };

struct replica_record {
    std::vector<pair> history;      // by the replica's own iteration count
    std::map<int, pair> global;     // at every iteration k with k % 3 == 0 (torchft: up to 18)
    pair at_rejoin{};               // the parameters right after rejoining
    std::uint64_t calls = 0, outer0 = 0, outer1 = 0;
};

struct run_record {
    replica_record r0, r1;
    std::vector<pair> first_attempt;  // replica 1 before its crash
    std::string crash;
};

pair values(const loco_test::torchft_mock_model& m) { return {m.w0[0], m.w1[0]}; }
pair global_of(const loco_test::torchft_streaming& opt) { return {opt.global()[0], opt.global()[1]}; }

// Every rank of the new group (survivor and newcomer alike) rejoins this way. torchft's heal also
// loads the trainer's state_dict (the donor's model and inner optimizer state,
// torchft/_test/diloco_trainer.py); in loco the trainer's state is the trainer's to send.
void regroup(loco_test::torchft_streaming& opt, loco::comm::communicator& group,
             const loco::parameter_list& params, rejoin how) {
    if (how == rejoin::global_values) {
        opt.regroup(group, 0);
        return;
    }
    // [snippet:regroup-like-torchft]
    opt.regroup(group, 0);  // rank 0 heals: global values, outer state, schedule position
    // torchft's heal also copies the donor's model: the trainer sends its parameters too.
    for (const loco::parameter& p : params) {
        group.broadcast(loco::comm::as_bytes(p.value), 0);
    }
    // [snippet:regroup-like-torchft end]
}

run_record run_recovery(rejoin how) {
    using namespace std::chrono;
    using loco_test::torchft_config;
    auto first = std::make_shared<loco::comm::thread_group>(2, seconds(20));
    auto second = std::make_shared<loco::comm::thread_group>(2, seconds(20));
    run_record out;
    std::mutex failures_mutex;
    std::vector<std::string> failures;
    const auto guarded = [&](auto body) {
        return [&, body] {
            try {
                body();
            } catch (const std::exception& e) {
                const std::lock_guard<std::mutex> lock(failures_mutex);
                failures.push_back(e.what());
            }
        };
    };
    const auto record = [](replica_record& rec, const loco_test::torchft_mock_model& m,
                           const loco_test::torchft_streaming& opt) {
        const int k = int(rec.history.size());
        rec.history.push_back(values(m));
        if (k % 3 == 0) rec.global[k] = global_of(opt);
    };
    const auto finish = [](replica_record& rec, const loco_test::torchft_streaming& opt) {
        rec.calls = opt.calls();
        rec.outer0 = opt.outer_steps(0);
        rec.outer1 = opt.outer_steps(1);
    };

    std::thread replica0(guarded([&] {
        replica_record& rec = out.r0;
        loco::comm::threads comm(first, 0);
        loco_test::torchft_mock_model m;
        loco_test::torchft_streaming opt(m.list, comm, torchft_config(0, 0.0f));
        record(rec, m, opt);
        for (int call = 1; call < rejoin_at; ++call) {
            opt.step();
            record(rec, m, opt);
        }
        // torchft's quorum at call 9: a new group of both replicas, replica 0 the donor.
        loco::comm::threads next(second, 0);
        regroup(opt, next, m.list, how);
        rec.at_rejoin = values(m);
        for (int call = rejoin_at; call <= last_call; ++call) {
            opt.step();
            record(rec, m, opt);
        }
        finish(rec, opt);
    }));

    std::thread replica1(guarded([&] {
        // The first attempt: trains with replica 0 and raises once its second sync is committed.
        try {
            loco::comm::threads comm(first, 1);
            loco_test::torchft_mock_model m;
            loco_test::torchft_streaming opt(m.list, comm, torchft_config(0, 0.0f));
            out.first_attempt.push_back(values(m));
            for (int call = 1; call <= crash_after; ++call) {
                opt.step();
                out.first_attempt.push_back(values(m));
            }
            throw injected_failure("injected failure rank=0 step=2");
        } catch (const injected_failure& e) {
            first->abort(std::string("replica 1 failed: ") + e.what());  // its runner
            out.crash = e.what();
        }
        // The second attempt: a fresh model and handle from the initial values, on the new group.
        replica_record& rec = out.r1;
        loco::comm::threads next(second, 1);
        loco_test::torchft_mock_model m;
        loco_test::torchft_streaming opt(m.list, next, torchft_config(0, 0.0f));
        record(rec, m, opt);
        // Its inner steps before it reaches the quorum, with loco's inner optimizer on its own.
        loco::optimizer<loco::inner::sgd> alone(m.list, {.inner = {.lr = 1.0f}});
        for (int s = 0; s < alone_steps; ++s) {
            alone.step();
            record(rec, m, opt);
        }
        regroup(opt, next, m.list, how);
        rec.at_rejoin = values(m);
        for (int call = rejoin_at; call <= last_call; ++call) {
            opt.step();
            record(rec, m, opt);
        }
        finish(rec, opt);
    }));
    replica0.join();
    replica1.join();
    for (const auto& f : failures) FAIL_CHECK(f);
    REQUIRE(failures.empty());
    return out;
}

// The same events in double precision, written from the algorithm: every live replica takes an
// inner step (p -= 1 * 2); at calls 3, 9, 15, ... fragment 0 and at 6, 12, 18 fragment 1 (the
// manager step modulo 2) gets global -= 2 * mean(global - local), then local = global (alpha 0).
struct reference_run {
    std::array<double, 2> global{1.0, 1.0};
    std::map<int, std::array<double, 2>> live;  // replica -> its local values
    std::uint64_t calls = 0;

    static void inner_step(std::array<double, 2>& x) {
        for (double& v : x) v -= 1.0 * 2.0;
    }
    void call() {
        ++calls;
        for (auto& [id, x] : live) inner_step(x);
        if (calls % 3 != 0) return;
        const std::size_t f = calls % 6 == 3 ? 0 : 1;
        double delta = 0.0;
        for (const auto& [id, x] : live) delta += global[f] - x[f];
        delta /= double(live.size());
        global[f] -= 2.0 * delta;
        for (auto& [id, x] : live) x[f] = global[f];
    }
};

struct reference_record {
    std::vector<std::array<double, 2>> r0, r1, global0, global1;  // global* by iteration
};

reference_record simulate(rejoin how) {
    reference_record rec;
    reference_run ref;
    ref.live[0] = ref.global;
    ref.live[1] = ref.global;
    const auto note0 = [&] {
        rec.r0.push_back(ref.live.at(0));
        rec.global0.push_back(ref.global);
    };
    note0();
    for (int call = 1; call <= crash_after; ++call) {
        ref.call();
        note0();
    }
    ref.live.erase(1);
    std::array<double, 2> restarted{1.0, 1.0};
    rec.r1.push_back(restarted);
    rec.global1.push_back(restarted);  // a fresh replica's own original_parameters
    for (int call = crash_after + 1; call < rejoin_at; ++call) {
        ref.call();
        note0();
    }
    for (int s = 0; s < alone_steps; ++s) {
        reference_run::inner_step(restarted);
        rec.r1.push_back(restarted);
        rec.global1.push_back(std::array<double, 2>{1.0, 1.0});
    }
    ref.live[1] = how == rejoin::donor_parameters ? ref.live.at(0) : ref.global;
    for (int call = rejoin_at; call <= last_call; ++call) {
        ref.call();
        note0();
        rec.r1.push_back(ref.live.at(1));
        rec.global1.push_back(ref.global);
    }
    return rec;
}

// Exact: every value here is a small integer, held exactly in float and double.
void check_against(const replica_record& got, const std::vector<std::array<double, 2>>& history,
                   const std::vector<std::array<double, 2>>& global, const char* who) {
    CAPTURE(who);
    REQUIRE(got.history.size() == history.size());
    for (std::size_t k = 0; k < history.size(); ++k) {
        CAPTURE(k);
        CHECK(got.history[k] == pair{float(history[k][0]), float(history[k][1])});
    }
    for (const auto& [k, g] : got.global) {
        CAPTURE(k);
        CHECK(g == pair{float(global[std::size_t(k)][0]), float(global[std::size_t(k)][1])});
    }
}

}  // namespace

TEST_CASE("torchft failure-recovery fixture: replica 1 crashes after two syncs and rejoins healed from replica 0") {
    const run_record run = run_recovery(rejoin::donor_parameters);
    CHECK(run.crash == "injected failure rank=0 step=2");
    // Replica 1's first attempt trained in lockstep with replica 0 until its crash.
    REQUIRE(run.first_attempt.size() == std::size_t(crash_after + 1));
    for (int k = 0; k <= crash_after; ++k) CHECK(run.first_attempt[std::size_t(k)] == replica0_history[std::size_t(k)]);

    // Every recorded value, exactly (torchft itself compares with rtol = atol = 1e-5).
    REQUIRE(run.r0.history.size() == replica0_history.size());
    for (std::size_t k = 0; k < replica0_history.size(); ++k) {
        CAPTURE(k);
        CHECK(run.r0.history[k] == replica0_history[k]);
    }
    for (const auto& [k, g] : replica0_global) {
        CAPTURE(k);
        CHECK(run.r0.global.at(k) == g);
    }
    REQUIRE(run.r1.history.size() == replica1_history.size());
    for (std::size_t k = 0; k < replica1_history.size(); ++k) {
        CAPTURE(k);
        CHECK(run.r1.history[k] == replica1_history[k]);
    }
    for (const auto& [k, g] : replica1_global) {
        CAPTURE(k);
        CHECK(run.r1.global.at(k) == g);
    }

    // The heal: replica 1 took replica 0's parameters after call 8, and its schedule position.
    CHECK(run.r1.at_rejoin == pair{-21, -27});
    CHECK(run.r1.at_rejoin == run.r0.at_rejoin);
    for (const replica_record* r : {&run.r0, &run.r1}) {
        CHECK(r->calls == std::uint64_t(last_call));
        CHECK(r->outer0 == 4);  // calls 3, 9, 15, 21
        CHECK(r->outer1 == 3);  // calls 6, 12, 18: seven syncs, torchft's manager step 7
    }

    // The double-precision reference of the same events gives the fixture too.
    const reference_record ref = simulate(rejoin::donor_parameters);
    check_against(run.r0, ref.r0, ref.global0, "replica 0");
    check_against(run.r1, ref.r1, ref.global1, "replica 1");
}

TEST_CASE("torchft failure-recovery fixture: regroup alone starts the newcomer from the global values") {
    // loco's default rejoin: no trainer state is sent, the newcomer's parameters are the global
    // values of call 8 (-11, -23). Up to the rejoin everything equals the fixture; at call 9 the
    // newcomer's pseudo-gradient of fragment 0 is -11 - (-13) = 2 where torchft's (the donor's
    // copied) is 12, so the average is 7 and the global value -25 instead of -35.
    const run_record run = run_recovery(rejoin::global_values);
    for (int k = 0; k < rejoin_at; ++k) {
        CAPTURE(k);
        CHECK(run.r0.history[std::size_t(k)] == replica0_history[std::size_t(k)]);
    }
    for (int k = 0; k <= alone_steps; ++k) CHECK(run.r1.history[std::size_t(k)] == replica1_history[std::size_t(k)]);
    CHECK(run.r1.at_rejoin == pair{-11, -23});
    CHECK(run.r0.at_rejoin == pair{-21, -27});
    CHECK(run.r0.history[rejoin_at] == pair{-25, -29});
    CHECK(run.r1.history[alone_steps + 1] == pair{-25, -25});
    CHECK(run.r0.global.at(rejoin_at) == pair{-25, -23});
    CHECK(replica0_global.at(rejoin_at) == pair{-35, -23});

    const reference_record ref = simulate(rejoin::global_values);
    check_against(run.r0, ref.r0, ref.global0, "replica 0");
    check_against(run.r1, ref.r1, ref.global1, "replica 1");
    // From fragment 1's sync at call 12 on, both replicas hold the same values again.
    for (std::size_t k = 12; k < run.r0.history.size(); ++k) {
        CAPTURE(k);
        CHECK(run.r0.history[k] == run.r1.history[k - (rejoin_at - alone_steps - 1)]);
    }
    CHECK(run.r1.outer0 == 4);
    CHECK(run.r1.outer1 == 3);
}
