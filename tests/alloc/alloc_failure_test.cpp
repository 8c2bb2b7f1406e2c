// Out of memory on one rank: this program replaces the global operator new so that a thread can
// make its n-th allocation throw std::bad_alloc, and sweeps n over one collective's start and over
// one whole sync. Its own executable: the replacement would otherwise be every test's.
#include <doctest/doctest.h>

#include "failing_new.hpp"

#include <loco/loco.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

TEST_CASE("comm::threads: a start that runs out of memory never writes the caller's buffer") {
    // Rank 1's n-th allocation in start_all_reduce fails. Either the start throws and nothing of
    // the collective touches rank 1's buffer (rank 0 then times out), or it starts and both ranks
    // get the sum. The request's operation used to be allocated after the collective was queued:
    // the start threw bad_alloc and the collective still wrote the sum into the buffer.
    int failures = 0;
    for (long n = 1; n <= 40; ++n) {
        CAPTURE(n);
        auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::milliseconds(300));
        std::array<float, 2> value = {1.0f, 10.0f};
        std::array<std::string, 2> outcome;
        float after_wait = 0.0f;
        std::vector<std::thread> ranks;
        for (int r = 0; r < 2; ++r) {
            ranks.emplace_back([&, r] {
                loco::comm::threads comm(group, r);
                float& x = value[std::size_t(r)];
                try {
                    loco::comm::request req;
                    {
                        failing_allocation arm(r == 1 ? n : 0);
                        req = comm.start_all_reduce(loco::host_tensor(&x, 1),
                                                    loco::comm::reduce_op::sum);
                    }
                    req.finish();
                    outcome[std::size_t(r)] = "finished";
                } catch (const std::bad_alloc&) {
                    outcome[std::size_t(r)] = "bad_alloc";
                    // Longer than the group's timeout: a collective still running would have
                    // written by now.
                    std::this_thread::sleep_for(std::chrono::milliseconds(600));
                    after_wait = x;
                } catch (const loco::comm_error&) {
                    outcome[std::size_t(r)] = "comm_error";
                }
            });
        }
        for (auto& t : ranks) t.join();
        if (outcome[1] == "bad_alloc") {
            ++failures;
            CHECK(after_wait == 10.0f);
            CHECK(outcome[0] == "comm_error");
        } else {
            CHECK(outcome[1] == "finished");
            CHECK(outcome[0] == "finished");
            CHECK(value[0] == 11.0f);
            CHECK(value[1] == 11.0f);
        }
    }
    CHECK(failures > 0);  // the sweep reached the start's allocations
}

namespace {

// What one rank saw of the armed call and of the call right after it.
struct rank_outcome {
    std::string armed, retry;
    std::vector<float> global_after_armed, global_after_retry;
    std::uint64_t outer_after_armed = 0, outer_after_retry = 0;
    std::uint64_t calls_after_armed = 0;
};

bool refused_out_of_step(const std::string& what) {
    return what.find("a failure of this rank alone that its peers could not learn of") !=
               std::string::npos &&
           what.find("refuses to sync") != std::string::npos;
}

// Two ranks; rank 1's n-th allocation of its call `armed_call` fails. Both ranks then call
// step() once more at once (before the group's timeout). Checks, for every n until a call needs
// fewer allocations, that the ranks never end apart. A rank that raised bad_alloc itself (a
// failure the ranks could not agree on) either had not counted the call yet (its schedule did
// not move: its next step() is that call again, which meets its peer's, and both end with the
// same model), or refuses its next call as out of step instead of pairing its collectives with
// the ones its peer posted for the failed call.
template <class Opt>
void sweep_one_rank_out_of_memory(const typename Opt::config& cfg, int armed_call) {
    int raw_failures = 0;
    bool reached_end = false;
    for (long n = 1; n <= 600 && !reached_end; ++n) {
        CAPTURE(n);
        auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::milliseconds(400));
        std::array<rank_outcome, 2> out;
        std::vector<std::thread> ranks;
        for (int r = 0; r < 2; ++r) {
            ranks.emplace_back([&, r] {
                rank_outcome& o = out[std::size_t(r)];
                loco::comm::threads comm(group, r);
                std::vector<float> a(37), b(21), ga(37), gb(21);
                for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.01f * float(i);
                for (std::size_t i = 0; i < b.size(); ++i) b[i] = -0.02f * float(i);
                loco::parameter_list list;
                list.add("layers.0.w", a, ga).add("layers.1.w", b, gb);
                Opt opt(list, comm, cfg);
                const auto gradients = [&](int call) {
                    for (std::size_t i = 0; i < ga.size(); ++i) {
                        ga[i] = 0.1f * float(r + 1) - 0.003f * float(i) + 0.01f * float(call);
                    }
                    for (std::size_t i = 0; i < gb.size(); ++i) gb[i] = 0.05f * float(r - 1);
                };
                for (int call = 1; call < armed_call; ++call) {
                    gradients(call);
                    opt.step();
                }
                gradients(armed_call);
                try {
                    failing_allocation arm(r == 1 ? n : 0);
                    opt.step();
                    o.armed = "returned";
                } catch (const std::bad_alloc&) {
                    o.armed = "bad_alloc";
                } catch (const std::exception& e) {
                    o.armed = std::string("threw: ") + e.what();
                }
                o.global_after_armed.assign(opt.global().begin(), opt.global().end());
                o.outer_after_armed = opt.outer_steps();
                o.calls_after_armed = opt.calls();
                gradients(armed_call + 1);
                try {
                    opt.step();
                    o.retry = "returned";
                } catch (const std::exception& e) {
                    o.retry = e.what();
                }
                o.global_after_retry.assign(opt.global().begin(), opt.global().end());
                o.outer_after_retry = opt.outer_steps();
            });
        }
        for (auto& t : ranks) t.join();
        CAPTURE(out[0].armed);
        CAPTURE(out[1].armed);
        CAPTURE(out[0].retry);
        CAPTURE(out[1].retry);
        const bool not_counted = out[1].calls_after_armed == std::uint64_t(armed_call - 1);
        if (out[1].armed == "bad_alloc" && not_counted) {
            // Rank 1's retry was the armed call, which met rank 0's.
            CHECK(out[1].retry == "returned");
            CHECK(out[1].outer_after_retry == out[0].outer_after_armed);
            CHECK(out[1].global_after_retry == out[0].global_after_armed);
        } else {
            CHECK(out[0].outer_after_armed == out[1].outer_after_armed);
            CHECK(out[0].global_after_armed == out[1].global_after_armed);
        }
        if (out[1].armed == "bad_alloc" && !not_counted) {
            ++raw_failures;
            CHECK(refused_out_of_step(out[1].retry));
        }
        // A handle not left out of step is in step: its next call goes through (a bad_alloc
        // recorded as a failed transfer, its collective never posted, used to leave the ranks'
        // collectives one apart for good, every later sync failing on "ranks disagree").
        if (!refused_out_of_step(out[1].retry)) CHECK(out[1].retry == "returned");
        if (!refused_out_of_step(out[1].retry) && out[0].retry == "returned" &&
            out[1].retry == "returned") {
            CHECK(out[0].outer_after_retry == out[1].outer_after_retry);
            CHECK(out[0].global_after_retry == out[1].global_after_retry);
        }
        if (out[1].armed == "returned" && out[0].armed == "returned") reached_end = true;
    }
    CHECK(reached_end);  // the sweep went past the call's last allocation
    CHECK(raw_failures > 0);
}

}  // namespace

TEST_CASE("diloco: one rank out of memory during a sync never leaves the ranks apart") {
    // Every allocation of rank 1's sync call fails in turn, under the schedules whose calls
    // allocate differently: every (a sync), delayed (a finish and a start in one call) and
    // streaming (a fragment's exchange started while another travels).
    SUBCASE("every") {
        using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
        sweep_one_rank_out_of_memory<opt_t>({.inner = {.lr = 1e-2f}, .schedule = {.every = 2}}, 2);
    }
    SUBCASE("delayed") {
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                   loco::schedule::delayed>;
        sweep_one_rank_out_of_memory<opt_t>({.inner = {.lr = 1e-2f}, .schedule = {.every = 1}}, 2);
    }
    SUBCASE("state_periods (DES-LOC: the inner state averages)") {
        using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                                   loco::schedule::state_periods>;
        sweep_one_rank_out_of_memory<opt_t>(
            {.inner = {.lr = 1e-2f}, .schedule = {.every = 2, .states = {1, 2}}}, 2);
    }
    SUBCASE("two_phase with error feedback") {
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov,
                                   loco::compress::error_feedback<loco::compress::topk>>;
        sweep_one_rank_out_of_memory<opt_t>({.inner = {.lr = 1e-2f}, .schedule = {.every = 1},
                                             .compress = {.compress = {.ratio = 0.25f}},
                                             .exchange = loco::exchange_scheme::two_phase},
                                            2);
    }
    SUBCASE("the first call (start()'s fingerprint and broadcast)") {
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
        sweep_one_rank_out_of_memory<opt_t>({.inner = {.lr = 1e-2f}, .schedule = {.every = 1}}, 1);
    }
    SUBCASE("streaming") {
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                   loco::schedule::streaming>;
        sweep_one_rank_out_of_memory<opt_t>(
            {.inner = {.lr = 1e-2f}, .schedule = {.every = 4, .fragments = 2, .overlap = 1}}, 3);
    }
}

TEST_CASE("diloco: a rank with no memory left at all raises bad_alloc, and is out of step") {
    // Every allocation of rank 1's sync call fails, marking the handle included: it used to
    // build its message in a noexcept function, which called std::terminate.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    for (long n = 1; n <= 120; n += 7) {
        CAPTURE(n);
        auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::milliseconds(300));
        std::array<std::string, 2> armed, retry;
        std::array<std::uint64_t, 2> calls{};
        std::vector<std::thread> ranks;
        for (int r = 0; r < 2; ++r) {
            ranks.emplace_back([&, r] {
                loco::comm::threads comm(group, r);
                std::vector<float> w(19, 0.5f), g(19, 0.25f * float(r + 1));
                loco::parameter_list list;
                list.add("w", w, g);
                opt_t opt(list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 1}});
                opt.step();
                try {
                    const no_memory_from none_left(r == 1 ? n : 0);
                    opt.step();
                    armed[std::size_t(r)] = "returned";
                } catch (const std::bad_alloc&) {
                    armed[std::size_t(r)] = "bad_alloc";
                } catch (const std::exception& e) {
                    armed[std::size_t(r)] = e.what();
                }
                calls[std::size_t(r)] = opt.calls();
                try {
                    opt.step();
                    retry[std::size_t(r)] = "returned";
                } catch (const std::exception& e) {
                    retry[std::size_t(r)] = e.what();
                }
            });
        }
        for (auto& t : ranks) t.join();
        CAPTURE(armed[1]);
        CAPTURE(retry[1]);
        if (armed[1] == "bad_alloc" && calls[1] == 2) CHECK(refused_out_of_step(retry[1]));
    }
}

TEST_CASE("diloco: one rank alone (comm::single) out of memory during a sync steps on at its next call") {
    // A rank alone has no peers to fall out of step with: after a sync that raised bad_alloc,
    // its next step() syncs. Every allocation of the sync call fails in turn; a handle marked out
    // of step, as a rank of a group is, refused every later sync until a regroup() or load() it
    // had no reason to call.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    int out_of_memory = 0;
    bool reached_end = false;
    for (long n = 1; n <= 600 && !reached_end; ++n) {
        CAPTURE(n);
        loco::comm::single comm;
        std::vector<float> w(19, 0.5f), g(19, 0.25f);
        loco::parameter_list list;
        list.add("w", w, g);
        opt_t opt(list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 1}});
        opt.step();
        try {
            const failing_allocation arm(n);
            opt.step();
            reached_end = true;  // the call needs fewer than n allocations
        } catch (const std::bad_alloc&) {
            ++out_of_memory;
        }
        std::string retry = "returned";
        try {
            opt.step();
        } catch (const std::exception& e) {
            retry = e.what();
        }
        CHECK(retry == "returned");
        CHECK(w == std::vector<float>(opt.global().begin(), opt.global().end()));  // it synced
    }
    CHECK(reached_end);
    CHECK(out_of_memory > 0);
}

TEST_CASE("diloco: load() out of memory leaves the handle as it was, or loaded") {
    // Every allocation of load() fails in turn, under a streaming schedule with an exchange in
    // flight at the save and error feedback (every part of the state a checkpoint holds). The
    // handle then saves what it saved before the call, or the checkpoint it loaded: never a mix.
    using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov,
                               loco::compress::error_feedback<loco::compress::topk>,
                               loco::schedule::streaming>;
    loco::comm::single comm;
    std::vector<float> a(37), b(21), ga(37), gb(21);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.01f * float(i);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = -0.02f * float(i);
    loco::parameter_list list;
    list.add("layers.0.w", a, ga).add("layers.1.w", b, gb);
    opt_t opt(list, comm, {.inner = {.lr = 1e-2f},
                           .schedule = {.every = 4, .fragments = 2, .overlap = 1},
                           .compress = {.compress = {.ratio = 0.25f}}});
    const auto steps = [&](int from, int to) {
        for (int call = from; call <= to; ++call) {
            for (std::size_t i = 0; i < ga.size(); ++i) ga[i] = 0.1f - 0.003f * float(i * call);
            for (std::size_t i = 0; i < gb.size(); ++i) gb[i] = 0.05f * float(call % 3);
            opt.step();
        }
    };
    const auto checkpoint = [&] {
        std::ostringstream os;
        opt.save(os);
        return os.str();
    };
    steps(1, 7);
    const std::string saved = checkpoint();
    steps(8, 13);
    opt.flush();  // load() refuses a handle with an exchange in flight
    const std::string live = checkpoint();
    REQUIRE(live != saved);
    const std::vector<float> a_live = a, b_live = b;
    int failures = 0;
    bool loaded = false;
    for (long n = 1; n <= 600 && !loaded; ++n) {
        CAPTURE(n);
        std::istringstream is(saved);
        bool threw = false;
        {
            const failing_allocation arm(n);
            try {
                opt.load(is);
            } catch (const std::bad_alloc&) {
                threw = true;
            }
        }
        if (threw) {
            ++failures;
            CHECK(checkpoint() == live);
            CHECK(a == a_live);  // load() leaves the parameters to the trainer
            CHECK(b == b_live);
        } else {
            loaded = true;
            CHECK(checkpoint() == saved);
        }
    }
    CHECK(loaded);
    CHECK(failures > 10);
}

TEST_CASE("diloco: a skipped round allocates nothing after the agreement") {
    // Every rank skips the round (rank 1's pseudo-gradient is not finite); every allocation of
    // rank 1's sync call fails in turn. Its copy of the tensor's name for the skip streak used to
    // be made after the agreement: rank 0 skipped the round (its parameters back to the global
    // ones) while rank 1 raised, its round not counted and its parameters not reset.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    const std::string name(60, 'w');  // long enough that its copy allocates
    bool reached_end = false;
    for (long n = 1; n <= 300 && !reached_end; ++n) {
        CAPTURE(n);
        auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::milliseconds(300));
        std::array<std::string, 2> outcome;
        std::array<std::uint64_t, 2> skipped{};
        std::array<bool, 2> at_global{};
        std::vector<std::thread> ranks;
        for (int r = 0; r < 2; ++r) {
            ranks.emplace_back([&, r] {
                const auto slot = std::size_t(r);
                loco::comm::threads comm(group, r);
                std::vector<float> w(8, 0.5f), g(8, 0.1f);
                loco::parameter_list list;
                list.add(name, w, g);
                opt_t opt(list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 2}});
                opt.step();
                if (r == 1) w[3] = std::numeric_limits<float>::quiet_NaN();
                try {
                    const failing_allocation arm(r == 1 ? n : 0);
                    opt.step();  // call 2: the sync, skipped on every rank
                    outcome[slot] = "returned";
                } catch (const std::bad_alloc&) {
                    outcome[slot] = "bad_alloc";
                } catch (const std::exception& e) {
                    outcome[slot] = e.what();
                }
                skipped[slot] = opt.skipped_syncs();
                at_global[slot] = std::equal(w.begin(), w.end(), opt.global().begin());
            });
        }
        for (auto& t : ranks) t.join();
        CAPTURE(outcome[0]);
        CAPTURE(outcome[1]);
        if (outcome[0] == "returned" && outcome[1] == "bad_alloc") {
            // Rank 1 ran out after its peer completed the sync: only after the round was done.
            CHECK(skipped[1] == skipped[0]);
            CHECK(at_global[1]);
        }
        if (outcome[0] == "returned" && outcome[1] == "returned") {
            CHECK(skipped == std::array<std::uint64_t, 2>{1, 1});
            reached_end = true;
        }
    }
    CHECK(reached_end);
}

TEST_CASE("diloco: regroup() out of memory raises bad_alloc, never a stream error") {
    // regroup() writes the state it shares into a string stream through the checkpoint writer,
    // which turns the stream's exceptions off while it writes: a buffer that could not grow was
    // reported as "writing the checkpoint failed (stream error)", a loco::checkpoint_error.
    using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    loco::comm::single comm, fresh;
    std::vector<float> w(20000, 0.5f), g(20000, 0.01f);
    loco::parameter_list list;
    list.add("w", w, g);
    opt_t opt(list, comm, {.inner = {.lr = 1e-3f}, .schedule = {.every = 2}});
    for (int i = 0; i < 4; ++i) opt.step();
    int out_of_memory = 0;
    bool regrouped = false;
    for (long n = 1; n <= 400 && !regrouped; ++n) {
        CAPTURE(n);
        try {
            const failing_allocation arm(n);
            opt.regroup(fresh);
            regrouped = true;
        } catch (const std::bad_alloc&) {
            ++out_of_memory;
        } catch (const std::exception& e) {
            FAIL_CHECK("regroup() out of memory raised: " << std::string(e.what()));
        }
    }
    CHECK(regrouped);
    CHECK(out_of_memory > 5);
}

TEST_CASE("diloco: save() out of memory raises bad_alloc, never a stream error") {
    // The checkpoint writer turns the stream's exceptions off while it writes: an ostringstream
    // whose buffer could not grow swallowed the bad_alloc, and save() said "stream error" (in
    // Python a CheckpointError where a MemoryError was due).
    using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    loco::comm::single comm;
    std::vector<float> w(5000, 0.5f), g(5000, 0.01f);
    loco::parameter_list list;
    list.add("w", w, g);
    opt_t opt(list, comm, {.inner = {.lr = 1e-3f}, .schedule = {.every = 2}});
    for (int i = 0; i < 4; ++i) opt.step();
    std::ostringstream reference;
    opt.save(reference);
    int out_of_memory = 0;
    bool saved = false;
    for (long n = 1; n <= 400 && !saved; ++n) {
        CAPTURE(n);
        std::ostringstream os;
        try {
            const failing_allocation arm(n);
            opt.save(os);
            saved = true;
        } catch (const std::bad_alloc&) {
            ++out_of_memory;
        } catch (const std::exception& e) {
            FAIL_CHECK("save() out of memory raised: " << std::string(e.what()));
        }
        if (saved) CHECK(os.str() == reference.str());
    }
    CHECK(saved);
    CHECK(out_of_memory > 3);
}

TEST_CASE("comm::run_threads: a rank's thread that cannot be started stops and joins the others") {
    // The calling thread's n-th allocation fails, for every n until run_threads goes through:
    // the group, the list of threads or a thread's start (std::thread allocates its state; a
    // pthread_create failure is a std::system_error taking the same path). The ranks already
    // running wait in a collective for the one that never starts: they must be woken and joined
    // before the error leaves run_threads (a joinable std::thread unwinding is std::terminate, and
    // a rank left waiting would be one that never returns).
    int failures = 0, thread_failures = 0;
    bool went_through = false;
    for (long n = 1; n <= 60 && !went_through; ++n) {
        CAPTURE(n);
        std::array<std::atomic<int>, 3> entered{}, woken{};
        std::mutex mutex;
        std::vector<std::string> wake_reasons;
        bool threw = false;
        {
            const failing_allocation arm(n);
            try {
                loco::comm::run_threads(
                    3,
                    [&](loco::comm::threads& comm) {
                        const auto r = std::size_t(comm.rank());
                        ++entered[r];
                        try {
                            float x = 1.0f;
                            comm.all_reduce(loco::host_tensor(&x, 1), loco::comm::reduce_op::sum);
                            CHECK(x == 3.0f);
                        } catch (const loco::comm_error& e) {
                            ++woken[r];
                            const std::lock_guard<std::mutex> lock(mutex);
                            wake_reasons.emplace_back(e.what());
                            throw;
                        }
                    },
                    std::chrono::seconds(10));
            } catch (const std::bad_alloc&) {
                threw = true;
            }
        }
        const int started = entered[0] + entered[1] + entered[2];
        if (threw) {
            ++failures;
            if (started > 0) {
                ++thread_failures;
                // Every rank that started was woken by the abort (not its timeout), none
                // finished its sum.
                for (std::size_t r = 0; r < 3; ++r) CHECK(woken[r] == entered[r]);
                for (const std::string& why : wake_reasons) {
                    CHECK(why.find("could not start the thread of rank") != std::string::npos);
                }
            }
        } else {
            went_through = true;
            CHECK(started == 3);
            for (std::size_t r = 0; r < 3; ++r) CHECK(woken[r] == 0);
        }
    }
    CHECK(went_through);
    CHECK(thread_failures >= 2);  // ranks 1 and 2 could not start, with ranks running
    CHECK(failures > thread_failures);
}
