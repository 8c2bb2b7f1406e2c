#pragma once
// A-EDiT's wall-clock schedule (Cheng et al., arXiv 2412.07210; atorch's use_async): the workers
// sync every `seconds` of wall time instead of every H steps, so a fast worker does more local
// steps per window than a slow one. A worker's window closes at the first step() that ends at
// least `seconds` after the window opened; then the workers agree (one all-reduce of three
// floats) on the mean elapsed time and on the steps done: if fewer than min_total_global_steps
// steps were done by all workers together since the last sync, the window is skipped (every
// timer restarts, nothing is exchanged, the steps keep counting); otherwise the whole model
// syncs. Every worker reaches the collective once per window, each by its own clock, and the
// ones that arrive first wait there for the others. Pair it with aggregate::edit's step_weights
// for A-EDiT's w_i = (1 - r) softmax_i + r s_i.
//
// Time comes from hyper::clock (seconds; empty: std::chrono::steady_clock), so tests can inject
// a deterministic clock. The first window opens when the first step() returns. The schedule talks
// to the other workers, so loco::diloco hands it the communicator (use_communicator) before each
// next(). docs/schedules.md.

#include <loco/comm/communicator.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/schedule/plan.hpp>
#include <loco/schedule/saved_counters.hpp>
#include <loco/tensor.hpp>

#include <array>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>

namespace loco::schedule {

// Seconds from an arbitrary origin; the schedules' injectable clock.
using seconds_clock = std::function<double()>;

inline double read_clock(const seconds_clock& clock) {
    if (clock) return clock();
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

class wallclock {
public:
    static constexpr std::string_view name = "wallclock";

    // atorch's defaults (local_sgd_sync_time = 600 s, min_total_global_steps = 100).
    struct hyper {
        double seconds = 600.0;                    // T, wall time between syncs, > 0
        std::uint64_t min_total_global_steps = 100;
        seconds_clock clock{};                     // empty: std::chrono::steady_clock
    };

    static void validate(const hyper& h) {
        if (!(h.seconds > 0.0) || !std::isfinite(h.seconds)) {
            throw invalid_argument("loco::schedule::wallclock: seconds (T) must be a finite number > 0; "
                                   "atorch uses 600");
        }
    }
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " T=" << h.seconds << "s min_total_global_steps=" << h.min_total_global_steps;
        return os.str();
    }
    static std::size_t fragments(const hyper&) noexcept { return 1; }

    void use_communicator(comm::communicator& comm) noexcept { comm_ = &comm; }

    sync_plan next(const hyper& h) {
        if (comm_ == nullptr) {
            throw invalid_argument("loco::schedule::wallclock: next() needs the workers' "
                                   "communicator; call use_communicator(comm) first (loco::diloco "
                                   "does)");
        }
        ++calls_;
        ++since_sync_;
        const double now = read_clock(h.clock);
        if (!open_) {
            opened_at_ = now;
            open_ = true;
            window_steps_ = 0;
            return nothing_now;
        }
        ++window_steps_;
        // A time that is not finite (a clock gone wrong, here or when the window opened) closes
        // the window, so that this rank reaches the agreement and every rank raises there (an
        // infinite opening time left this rank's window open for good, its peers waiting).
        const double elapsed = now - opened_at_;
        if (std::isfinite(elapsed) && elapsed < h.seconds) return nothing_now;

        // The window closed on this worker: agree on the time and the steps of all of them.
        float sums[3] = {static_cast<float>(elapsed), static_cast<float>(window_steps_),
                         static_cast<float>(since_sync_)};
        comm_->all_reduce(host_tensor(sums, 3), comm::reduce_op::sum);
        const double m = comm_->size();
        last_.mean_seconds = sums[0] / m;
        // Saturated: counts near 2^64 (summed over the ranks, or a corrupted checkpoint's)
        // would make the conversion undefined.
        last_.total_steps = !(sums[2] < 0x1p64f) ? std::numeric_limits<std::uint64_t>::max()
                                                 : static_cast<std::uint64_t>(sums[2]);
        opened_at_ = read_clock(h.clock);
        window_steps_ = 0;
        // Each worker did at least one timed step; a mean step longer than T means every window
        // is one step, and the schedule is syncing every step whatever T says. A window opens
        // when the previous one closes, before loco::diloco's sync, so its time includes that
        // sync (wall-clock semantics): a sync longer than T is caught here too, and the message
        // says so rather than blame the step alone.
        if (!std::isfinite(sums[0])) {  // every rank sees the same sum, and raises alike
            throw invalid_argument("loco::schedule::wallclock: a worker's clock gave a time that "
                                   "is not finite; give hyper::clock a clock of finite seconds");
        }
        // One window of one step longer than T is a pause (a checkpoint or an evaluation after
        // a sync, a long regroup): it closes, and the run goes on. Two in a row is a T shorter
        // than a step (or than a sync), which would sync every step whatever T says.
        short_windows_ = sums[0] / sums[1] > h.seconds ? short_windows_ + 1 : 0;
        if (short_windows_ >= 2) {
            ::loco::detail::text_stream os;
            os << "loco::schedule::wallclock: seconds (T = " << h.seconds
               << ") is shorter than one step (" << sums[0] / sums[1]
               << " s per step measured on average over the window, which includes the sync "
                  "that opened it, if any, and over the window before); raise T above the time "
                  "of a step and of a sync";
            throw invalid_argument(os.str());
        }
        if (last_.total_steps < h.min_total_global_steps) {
            last_.synced = false;
            ++skipped_;
            return nothing_now;
        }
        last_.synced = true;
        since_sync_ = 0;
        ++syncs_;
        return whole_model_now;
    }

    // What the workers agreed on when the last window closed.
    struct window {
        double mean_seconds = 0.0;     // mean over the workers of the window's elapsed time
        std::uint64_t total_steps = 0; // steps of all workers since the last sync
        bool synced = false;
    };
    // Not in checkpoints: an empty window after load() until the next window closes.
    const window& last_window() const noexcept { return last_; }
    std::uint64_t syncs() const noexcept { return syncs_; }
    std::uint64_t skipped_windows() const noexcept { return skipped_; }

    // diloco::regroup() on every rank, with the donor's state. A survivor keeps its own steps
    // since the last sync (they count in the agreed total) and its call count; a newcomer takes
    // the donor's counters but has taken no step since the sync (the donor's would be counted
    // twice). Every rank opens a new window at its next step, so that the windows of the group,
    // newcomers included, close together (a survivor's older window would close up to T before
    // a newcomer's, and wait that long in the agreement).
    void regrouped(wallclock donor, bool newcomer) noexcept {
        const std::uint64_t own_calls = calls_, own_steps = since_sync_;
        comm::communicator* const comm = comm_;
        *this = std::move(donor);
        comm_ = comm;
        calls_ = newcomer ? calls_ : own_calls;
        since_sync_ = newcomer ? 0 : own_steps;
        open_ = false;
        window_steps_ = 0;
    }

    std::uint64_t calls() const noexcept { return calls_; }
    // The clock is not saved: a resumed run opens a new window at its first step.
    void save(detail::checkpoint_writer& w) const { save_counters(w, *this, saved()); }
    static wallclock read(detail::checkpoint_reader& r) { return read_counters(r, saved()); }

private:
    // What a checkpoint holds, in this order.
    static constexpr std::array<saved_counter<wallclock>, 4> saved() {
        return {{{&wallclock::calls_, "the step call count"},
                 {&wallclock::since_sync_, "the steps since the last sync"},
                 {&wallclock::syncs_, "the wall-clock sync count"},
                 {&wallclock::skipped_, "the skipped window count"}}};
    }

    comm::communicator* comm_ = nullptr;
    std::uint64_t calls_ = 0, since_sync_ = 0, window_steps_ = 0, syncs_ = 0, skipped_ = 0;
    double opened_at_ = 0.0;
    bool open_ = false;
    std::uint64_t short_windows_ = 0;  // windows in a row whose mean step was longer than T
    window last_{};
};

}  // namespace loco::schedule
