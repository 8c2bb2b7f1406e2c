#pragma once
// Dynamic local updates (DyLU; Liu et al., "Asynchronous Local-SGD", arXiv 2401.09135): worker w
// runs H_w = floor(v_w / v_max * H) local steps per round (at least 1), v being its measured
// steps per second, so every worker finishes a round in about the same wall time and the fastest
// does H. The first round is H steps for everyone; at each sync the workers all-gather what they
// measured over the round (timed steps and elapsed seconds, two doubles each) and every worker
// derives its next H_w from the same vector. The whole model is one fragment; pair it with an
// outer optimizer and aggregation as usual (the slow workers' deltas are simply shorter).
//
// Time comes from hyper::clock (seconds; empty: std::chrono::steady_clock). The first round's
// clock starts when the first step() returns (its first step is not timed). docs/schedules.md.

#include <loco/comm/communicator.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/schedule/plan.hpp>
#include <loco/schedule/saved_counters.hpp>
#include <loco/schedule/wallclock.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace loco::schedule {

class proportional {
public:
    static constexpr std::string_view name = "proportional";

    struct hyper {
        std::uint64_t every = 500;  // H, the fastest worker's local steps per round
        seconds_clock clock{};      // empty: std::chrono::steady_clock
    };

    static void validate(const hyper& h) {
        if (h.every == 0) throw invalid_argument("loco::schedule::proportional: every (H) must be >= 1");
    }
    static std::string describe(const hyper& h) { return "proportional H=" + std::to_string(h.every); }
    static std::size_t fragments(const hyper&) noexcept { return 1; }

    void use_communicator(comm::communicator& comm) noexcept { comm_ = &comm; }

    sync_plan next(const hyper& h) {
        if (comm_ == nullptr) {
            throw invalid_argument("loco::schedule::proportional: next() needs the workers' "
                                   "communicator; call use_communicator(comm) first (loco::diloco "
                                   "does)");
        }
        // H_w is at most H: an H lowered since H_w was set (or a checkpoint's out of range)
        // takes effect now, not after a round of the old length.
        if (local_steps_ == 0 || local_steps_ > h.every) local_steps_ = h.every;
        ++calls_;
        ++round_calls_;
        const double now = read_clock(h.clock);
        if (!timing_) {
            started_at_ = now;
            timing_ = true;
        } else {
            ++timed_;
        }
        if (round_calls_ < local_steps_) return nothing_now;

        // The round ends here: every worker tells its timed steps and their elapsed seconds, as
        // doubles (not a float speed: a speed rounded to fp32 turns an exact ratio such as 1/3
        // into 0.33333332, and floor(6 * that) = 1, not 2).
        const std::array<double, 2> mine = {static_cast<double>(timed_), now - started_at_};
        const auto m = static_cast<std::size_t>(comm_->size());
        std::vector<double> told(2 * m, 0.0);
        comm_->all_gather({reinterpret_cast<const std::byte*>(mine.data()), sizeof mine, 0, 0,
                           memory_space::host},
                          {reinterpret_cast<std::byte*>(told.data()), told.size() * sizeof(double),
                           0, 0, memory_space::host});
        round_calls_ = 0;
        timed_ = 0;
        started_at_ = read_clock(h.clock);
        // Every rank derives the same H_w from the same gathered doubles.
        bool measured = true;
        std::size_t fastest = 0;
        double fastest_speed = 0.0;
        speeds_.assign(m, -1.0f);  // -1: nothing timed yet
        for (std::size_t k = 0; k < m; ++k) {
            const double steps = told[2 * k], elapsed = told[2 * k + 1];
            if (steps == 0.0) {
                measured = false;
                continue;
            }
            const double speed = elapsed > 0.0 ? steps / elapsed : 0.0;
            if (speed == 0.0 || !std::isfinite(speed) ||
                !std::isfinite(static_cast<float>(speed))) {
                throw invalid_argument("loco::schedule::proportional: rank " + std::to_string(k) +
                                       " measured no time over its round; give hyper::clock a "
                                       "clock that advances");
            }
            speeds_[k] = static_cast<float>(speed);
            if (speed > fastest_speed) {
                fastest_speed = speed;
                fastest = k;
            }
        }
        const auto me = static_cast<std::size_t>(comm_->rank());
        if (!measured) {
            // Some worker timed no step: its first round (every worker runs H), or a round of one
            // step after a load() or a heal, whose first step starts the timer. Later rounds keep
            // each worker's H_w (reset to H, the straggler would run the fastest one's H).
            local_steps_ = rounds_ == 0 ? h.every : std::min(local_steps_, h.every);
        } else {
            // H_w = floor(v_w / v_f * H) = floor(H n_w e_f / (n_f e_w)), n the timed steps and e
            // the elapsed seconds, f the fastest. For times exact in binary (3 s and 9 s steps)
            // the products are exact and the division rounds once, so an integer H_w comes out
            // exactly. Times that are not (0.1 s or 0.3 s steps, a real clock) carry a few ulps
            // of error that can land just below an integer (4.999999999999999 for 0.1/0.2 s,
            // H = 10), hence the floor with a relative tolerance of 2^-30, far below any
            // measurable speed difference. Clamped to [1, H].
            const double n_w = told[2 * me], e_w = told[2 * me + 1];
            const double n_f = told[2 * fastest], e_f = told[2 * fastest + 1];
            const double every = static_cast<double>(h.every);
            double share = every * n_w * e_f / (n_f * e_w);
            if (!std::isfinite(share)) share = every * (n_w / e_w / fastest_speed);  // overflow
            const double floored = std::floor(share * (1.0 + 0x1p-30));
            local_steps_ = !(floored >= 1.0) ? 1
                           : floored >= every ? h.every
                                              : static_cast<std::uint64_t>(floored);
        }
        ++rounds_;
        return whole_model_now;
    }

    // loco::diloco, after the sync a plan of this schedule ran: the next round is timed from
    // here, so that a worker's speed is its steps' (the sync's time, the same for every worker,
    // would pull every H_w towards H for many rounds after a speed change).
    void synced(const hyper& h) { started_at_ = read_clock(h.clock); }

    // This worker's local steps in the current round, and the speeds (steps per second, in rank
    // order; -1: nothing timed) agreed at the last sync, rounded to float (H_w is derived from
    // the exact step counts and elapsed times). Not in checkpoints: empty after load() until the
    // next sync.
    std::uint64_t local_steps() const noexcept { return local_steps_; }
    std::span<const float> speeds() const noexcept { return speeds_; }
    std::uint64_t rounds() const noexcept { return rounds_; }

    // diloco::regroup() on every rank, with the donor's state: a survivor keeps its H_w and its
    // round so far (each worker's own); a newcomer takes the donor's round and H_w. Every rank
    // times its steps afresh from its next step, as after load(): the failure and the regroup
    // are no worker's steps (a survivor timing across them measured a speed of a few percent).
    void regrouped(proportional donor, bool newcomer) {
        if (newcomer) {
            comm::communicator* const comm = comm_;
            *this = std::move(donor);
            comm_ = comm;
        }
        timing_ = false;
        timed_ = 0;
    }

    std::uint64_t calls() const noexcept { return calls_; }
    // The clock is not saved: a resumed round is timed from its first step after load.
    void save(detail::checkpoint_writer& w) const { save_counters(w, *this, saved()); }
    static proportional read(detail::checkpoint_reader& r) { return read_counters(r, saved()); }

private:
    // What a checkpoint holds, in this order.
    static constexpr std::array<saved_counter<proportional>, 4> saved() {
        return {{{&proportional::calls_, "the step call count"},
                 {&proportional::round_calls_, "the steps of the current round"},
                 // H_w is up to H (any H >= 1), not a count; next() bounds it by H
                 {&proportional::local_steps_, "the local steps of the round", false},
                 {&proportional::rounds_, "the round count"}}};
    }

    comm::communicator* comm_ = nullptr;
    std::uint64_t calls_ = 0, round_calls_ = 0, local_steps_ = 0, timed_ = 0, rounds_ = 0;
    double started_at_ = 0.0;
    bool timing_ = false;
    std::vector<float> speeds_;
};

}  // namespace loco::schedule
