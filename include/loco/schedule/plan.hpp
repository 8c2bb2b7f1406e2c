#pragma once
// What a sync schedule tells loco::diloco after each step() call: which fragments of the model
// start their exchange now, which are applied now, and which have their local values reset to the
// global ones. A fragment is a list of whole tensors (fragments.hpp); a schedule that syncs the
// whole model at once has one fragment, 0. See docs/schedules.md.

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace loco::schedule {

struct sync_plan {
    // Fragments whose pseudo-gradient (global - local) is taken and whose exchange starts now.
    std::span<const std::size_t> start;
    // Fragments whose exchange finishes now: decode, aggregate, outer step on the fragment's global
    // parameters, merge into the local ones. If the fragment also starts now, the exchange that
    // was already in flight is the one finished (the new one travels on); otherwise the one that
    // started in this same call.
    std::span<const std::size_t> finish;
    // Fragments whose local values become the global ones after the finishes (the one-outer-step
    // delayed schedule resets every round, even when nothing was applied yet).
    std::span<const std::size_t> reset;
    // Arrays j of the inner optimizer's state (optimizer<Inner>::state(j): AdamW's 0 = m, 1 = v)
    // averaged over the workers now, over the whole model, after the fragments above.
    std::span<const int> states = {};
    // A warm-up sync (schedule::warmup): applied as any other, but the aggregation's state
    // (EDiT's detectors, centered clipping's center) learns nothing from it. Its one-step
    // pseudo-gradients are far smaller than a round's: detectors taught by them flagged every
    // worker of every later round (docs/aggregation.md).
    bool warmup = false;

    bool empty() const noexcept {
        return start.empty() && finish.empty() && reset.empty() && states.empty();
    }
};

// The planned fragments of a call, kept by the schedule so that the plan's spans stay valid until
// the next call.
class plan_buffer {
public:
    sync_plan view() const noexcept { return {start_, finish_, reset_, states_}; }
    void clear() noexcept {
        start_.clear();
        finish_.clear();
        reset_.clear();
        states_.clear();
    }
    void start(std::size_t f) { start_.push_back(f); }
    void finish(std::size_t f) { finish_.push_back(f); }
    void reset(std::size_t f) { reset_.push_back(f); }
    void average_state(int j) { states_.push_back(j); }

private:
    std::vector<std::size_t> start_, finish_, reset_;
    std::vector<int> states_;
};

// The one-fragment plans of DiLoCo: nothing, or start, finish and (by the merge) reset fragment 0.
inline constexpr std::array<std::size_t, 1> fragment_zero = {0};
inline constexpr sync_plan nothing_now{};
inline constexpr sync_plan whole_model_now{fragment_zero, fragment_zero, {}};

}  // namespace loco::schedule
