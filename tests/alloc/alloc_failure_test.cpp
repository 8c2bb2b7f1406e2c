// Out of memory on one rank: this program replaces the global operator new so that a thread can
// make its n-th allocation throw std::bad_alloc, and sweeps n over one collective's start and over
// one whole sync. Its own executable: the replacement would otherwise be every test's.
#include <doctest/doctest.h>

#include <loco/loco.hpp>

#include <array>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

namespace {

// Allocations left before the one that fails on this thread; 0: none fails.
thread_local long allocations_left = 0;
thread_local bool failed = false;

void* allocate(std::size_t n) {
    if (allocations_left > 0 && --allocations_left == 0) {
        failed = true;
        throw std::bad_alloc();
    }
    if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
    throw std::bad_alloc();
}

// Arms the n-th allocation of this thread to fail while it lives.
struct failing_allocation {
    explicit failing_allocation(long n) {
        allocations_left = n;
        failed = false;
    }
    ~failing_allocation() { allocations_left = 0; }
    failing_allocation(const failing_allocation&) = delete;
    failing_allocation& operator=(const failing_allocation&) = delete;
};

}  // namespace

void* operator new(std::size_t n) { return allocate(n); }
void* operator new[](std::size_t n) { return allocate(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

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

TEST_CASE("diloco: one rank out of memory during a sync never leaves the ranks apart") {
    // Rank 1's n-th allocation of its second step() (a sync under every = 2) fails, for every n
    // until a step needs no more. Whatever failed, afterwards both ranks hold the same global
    // parameters and outer step count (applied on both or on neither), and a rank whose handle
    // is out of step refuses its next sync instead of pairing another round's collectives.
    using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    int failures = 0;
    bool reached_end = false;
    for (long n = 1; n <= 400 && !reached_end; ++n) {
        CAPTURE(n);
        auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::milliseconds(300));
        std::array<std::vector<float>, 2> global;
        std::array<std::uint64_t, 2> outer{};
        std::array<std::string, 2> outcome, next_call;
        std::vector<std::thread> ranks;
        for (int r = 0; r < 2; ++r) {
            ranks.emplace_back([&, r] {
                loco::comm::threads comm(group, r);
                std::vector<float> w(37), g(37);
                for (std::size_t i = 0; i < w.size(); ++i) {
                    w[i] = 0.01f * float(i);
                    g[i] = 0.1f * float(r + 1) - 0.003f * float(i);
                }
                loco::parameter_list list;
                list.add("w", w, g);
                opt_t opt(list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 2}});
                opt.step();
                try {
                    failing_allocation arm(r == 1 ? n : 0);
                    opt.step();
                    outcome[std::size_t(r)] = failed ? "failed inside, returned" : "returned";
                } catch (const std::bad_alloc&) {
                    outcome[std::size_t(r)] = "bad_alloc";
                } catch (const std::exception& e) {
                    outcome[std::size_t(r)] = std::string("threw: ") + e.what();
                }
                global[std::size_t(r)].assign(opt.global().begin(), opt.global().end());
                outer[std::size_t(r)] = opt.outer_steps();
                if (r == 1 && outcome[1] == "bad_alloc") {
                    std::this_thread::sleep_for(std::chrono::milliseconds(600));
                    try {
                        opt.step();
                        opt.step();
                        next_call[1] = "synced";
                    } catch (const std::exception& e) {
                        next_call[1] = e.what();
                    }
                }
            });
        }
        for (auto& t : ranks) t.join();
        CAPTURE(outcome[0]);
        CAPTURE(outcome[1]);
        CAPTURE(next_call[1]);
        CHECK(outer[0] == outer[1]);
        CHECK(global[0] == global[1]);
        if (outcome[1] == "returned") {
            reached_end = true;  // the whole step allocated fewer than n times
            CHECK(outcome[0] == "returned");
            CHECK(outer[0] == 1);
        }
        if (outcome[1] == "bad_alloc") {
            ++failures;
            // Never a sync that pairs with rank 0's abandoned one.
            CHECK(next_call[1] != "synced");
        }
    }
    CHECK(reached_end);
    CHECK(failures > 0);
}
