#pragma once
// EDiT's warm-up (Cheng et al., arXiv 2412.07210; atorch's local_sgd_warmup_steps): for the first
// W calls to step() every fragment syncs at every step, then the wrapped schedule S takes over,
// counting its own calls from 1 (its first round starts after the warm-up). With outer::sgd at
// lr = 1 each warm-up sync is exact parameter averaging, i.e. synchronous data-parallel training
// for an SGD inner step; with another outer optimizer each warm-up sync is an outer step (atorch
// all-reduces gradients instead, without its outer optimizer).
//
//   loco::diloco<..., loco::schedule::warmup<loco::schedule::every>, loco::aggregate::edit>
//       opt(params, comm, {.schedule = {.steps = 100, .then = {.every = 10}}});

#include <loco/comm/communicator.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/policy.hpp>
#include <loco/schedule/plan.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace loco::detail {
struct warmup_word {
    static constexpr std::string_view value = "warmup";
};
}  // namespace loco::detail

namespace loco::schedule {

template <class S>
class warmup {
    static_assert(planning_schedule<S>,
                  "loco::schedule::warmup wraps a planning schedule (every, streaming, wallclock, "
                  "...); see docs/schedules.md");

public:
    // "warmup<every>", ...: checkpoints tell the wrapped schedules apart (format 3; format 1 and 2
    // recorded "warmup" alone, see legacy_name).
    static constexpr std::string_view name = detail::wrapped_name<detail::warmup_word, S>::value;
    static constexpr std::string_view legacy_name = "warmup";

    struct hyper {
        std::uint64_t steps = 0;        // W, calls that sync every step (atorch default 0)
        typename S::hyper then{};       // the schedule after the warm-up
    };

    static void validate(const hyper& h) { detail::validate_hyper<S>(h.then); }
    static std::string describe(const hyper& h) {
        return "warmup W=" + std::to_string(h.steps) + " then " + detail::describe_policy<S>(h.then);
    }
    static std::size_t fragments(const hyper& h) { return S::fragments(h.then); }
    static float merge_alpha(const hyper& h)
        requires requires { S::merge_alpha(h.then); }
    {
        return S::merge_alpha(h.then);
    }
    static auto pattern(const hyper& h)
        requires requires { S::pattern(h.then); }
    {
        return S::pattern(h.then);
    }
    // The inner state arrays S averages (state_periods, DES-LOC): loco::diloco checks them against
    // the inner optimizer at construction and before each step's inner update.
    static auto inner_state_periods(const hyper& h)
        requires requires { S::inner_state_periods(h.then); }
    {
        return S::inner_state_periods(h.then);
    }

    // Before a step: a warm-up that would start again once the wrapped schedule has run (W
    // raised past the calls made) is refused (its every-step syncs would meet the wrapped
    // schedule's exchanges in flight, and finish each a call late); then the wrapped schedule's
    // refusals of changed hyper-parameters (streaming).
    void check(const hyper& h) const {
        if (h.steps > warm_ && after_.calls() != 0) {
            throw invalid_argument(
                "loco::schedule::warmup: steps raised to " + std::to_string(h.steps) +
                " after the warm-up ended at call " + std::to_string(warm_) + " and " +
                std::string(S::name) + " took over; the warm-up cannot start again (keep "
                "steps at most " + std::to_string(warm_) + ")");
        }
        if constexpr (requires { after_.check(h.then); }) after_.check(h.then);
    }

    // An exchange the handle finished early (streaming): the wrapped schedule plans no finish.
    void forget(std::size_t p)
        requires requires(S& s) { s.forget(p); }
    {
        after_.forget(p);
    }

    // After a sync of the wrapped schedule's plan (proportional restarts its round's timer).
    void synced(const hyper& h)
        requires requires(S& s, const typename S::hyper& then) { s.synced(then); }
    {
        if (!in_warmup_) after_.synced(h.then);
    }

    // diloco::regroup(): the wrapped schedule says what it takes from the donor; the warm-up's
    // count is the group's.
    void regrouped(warmup donor, bool newcomer)
        requires requires(S& s, S d) { s.regrouped(std::move(d), true); }
    {
        warm_ = donor.warm_;
        after_.regrouped(std::move(donor.after_), newcomer);
    }

    // Which exchanges the wrapped schedule started, for a checkpoint that did not record it.
    void resume_started(std::vector<bool> started)
        requires requires(S& s) { s.resume_started(std::move(started)); }
    {
        after_.resume_started(std::move(started));
    }

    void use_communicator(comm::communicator& comm) {
        if constexpr (requires { after_.use_communicator(comm); }) after_.use_communicator(comm);
    }

    sync_plan next(const hyper& h) {
        in_warmup_ = warm_ < h.steps;
        if (warm_ < h.steps) {
            ++warm_;
            plan_.clear();
            for (std::size_t f = 0; f < S::fragments(h.then); ++f) {
                plan_.start(f);
                plan_.finish(f);
            }
            schedule::sync_plan p = plan_.view();
            p.warmup = true;  // the aggregation learns from the wrapped schedule's rounds only
            return p;
        }
        return after_.next(h.then);
    }

    // step() calls: the warm-up's and the wrapped schedule's.
    std::uint64_t calls() const noexcept { return warm_ + after_.calls(); }
    std::uint64_t warmup_calls() const noexcept { return warm_; }
    const S& then() const noexcept { return after_; }

    void save(detail::checkpoint_writer& w) const {
        w.u64(warm_);
        after_.save(w);
    }
    static warmup read(detail::checkpoint_reader& r) {
        warmup s;
        s.warm_ = r.counter("the warm-up call count");
        s.after_ = S::read(r);
        return s;
    }

private:
    std::uint64_t warm_ = 0;
    bool in_warmup_ = false;  // the last plan was a warm-up sync (synced() is not the wrapped one's)
    S after_{};
    plan_buffer plan_;
};

}  // namespace loco::schedule
