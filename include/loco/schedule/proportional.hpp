#pragma once
// Dynamic local updates (DyLU; Liu et al., "Asynchronous Local-SGD", arXiv 2401.09135): worker w
// runs H_w = floor(v_w / v_max * H) local steps per round (at least 1), v being its measured
// steps per second, so every worker finishes a round in about the same wall time and the fastest
// does H. The first round is H steps for everyone; at each sync the workers all-gather the speeds
// they measured over the round (one float each) and every worker derives its next H_w from the
// same vector. The whole model is one fragment; pair it with an outer optimizer and aggregation
// as usual (the slow workers' deltas are simply shorter).
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
        if (local_steps_ == 0) local_steps_ = h.every;
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

        // The round ends here: every worker tells its speed (-1: nothing timed yet).
        const double elapsed = now - started_at_;
        float mine = -1.0f;
        if (timed_ > 0) {
            mine = elapsed > 0.0 ? static_cast<float>(static_cast<double>(timed_) / elapsed) : 0.0f;
        }
        const auto m = static_cast<std::size_t>(comm_->size());
        speeds_.assign(m, 0.0f);
        comm_->all_gather({reinterpret_cast<const std::byte*>(&mine), sizeof mine, 0, 0,
                           memory_space::host},
                          {reinterpret_cast<std::byte*>(speeds_.data()), m * sizeof(float), 0, 0,
                           memory_space::host});
        round_calls_ = 0;
        timed_ = 0;
        started_at_ = read_clock(h.clock);
        bool measured = true;
        float fastest = 0.0f;
        for (std::size_t k = 0; k < m; ++k) {
            if (speeds_[k] < 0.0f) measured = false;
            if (speeds_[k] == 0.0f || !std::isfinite(speeds_[k])) {
                throw invalid_argument("loco::schedule::proportional: rank " + std::to_string(k) +
                                       " measured no time over its round; give hyper::clock a "
                                       "clock that advances");
            }
            fastest = std::max(fastest, speeds_[k]);
        }
        const auto me = static_cast<std::size_t>(comm_->rank());
        local_steps_ = h.every;
        if (measured) {
            const double share = static_cast<double>(speeds_[me]) / static_cast<double>(fastest);
            local_steps_ = std::max<std::uint64_t>(
                1, static_cast<std::uint64_t>(std::floor(share * static_cast<double>(h.every))));
        }
        ++rounds_;
        return whole_model_now;
    }

    // This worker's local steps in the current round, and the speeds (steps per second, in rank
    // order) agreed at the last sync.
    std::uint64_t local_steps() const noexcept { return local_steps_; }
    std::span<const float> speeds() const noexcept { return speeds_; }
    std::uint64_t rounds() const noexcept { return rounds_; }

    std::uint64_t calls() const noexcept { return calls_; }
    // The clock is not saved: a resumed round is timed from its first step after load.
    void save(detail::checkpoint_writer& w) const { save_counters(w, *this, saved()); }
    static proportional read(detail::checkpoint_reader& r) { return read_counters(r, saved()); }

private:
    // What a checkpoint holds, in this order.
    static constexpr std::array<saved_counter<proportional>, 4> saved() {
        return {{{&proportional::calls_, "the step call count"},
                 {&proportional::round_calls_, "the steps of the current round"},
                 {&proportional::local_steps_, "the local steps of the round"},
                 {&proportional::rounds_, "the round count"}}};
    }

    comm::communicator* comm_ = nullptr;
    std::uint64_t calls_ = 0, round_calls_ = 0, local_steps_ = 0, timed_ = 0, rounds_ = 0;
    double started_at_ = 0.0;
    bool timing_ = false;
    std::vector<float> speeds_;
};

}  // namespace loco::schedule
