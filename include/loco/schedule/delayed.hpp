#pragma once
// The one-outer-step delay of DiLoCoX (Qi et al., arXiv 2506.21263) and PCCL's async DiLoCo: every
// H calls to step() the worker takes its pseudo-gradient delta_t against the current global
// parameters, applies the already averaged delta_{t-1} (the outer step), resets its local values
// to the new global ones and starts the exchange of delta_t, which travels during the whole next
// round. The first round applies nothing. The whole model is one fragment.

#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/schedule/plan.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace loco::schedule {

class delayed {
public:
    static constexpr std::string_view name = "delayed";

    struct hyper {
        std::uint64_t every = 500;  // H, inner steps per round
    };

    static void validate(const hyper& h) {
        if (h.every == 0) throw invalid_argument("loco::schedule::delayed: every (H) must be >= 1");
    }
    static std::string describe(const hyper& h) { return "delayed H=" + std::to_string(h.every); }
    static std::size_t fragments(const hyper&) noexcept { return 1; }

    sync_plan next(const hyper& h) noexcept {
        // A format 1-4 stream that load() did not resolve (a schedule read on its own).
        if (started_ == unknown) started_ = calls_ >= h.every ? yes : no;
        ++calls_;
        if (calls_ % h.every != 0) return nothing_now;
        // From the second round on, the previous round's exchange is applied before the new one
        // starts; every round ends with the local values reset to the global ones. Whether a
        // round was started is state, not calls / H: with H changed mid-run (a resumed run, a
        // schedule of H), calls / H says nothing about the rounds already run.
        const bool finish = started_ == yes;
        started_ = yes;
        return {fragment_zero,
                finish ? std::span<const std::size_t>(fragment_zero)
                       : std::span<const std::size_t>(),
                fragment_zero};
    }

    std::uint64_t calls() const noexcept { return calls_; }
    void save(detail::checkpoint_writer& w) const {
        w.u64(calls_);
        // Format 5; a stream read from an older format and saved before its first call still
        // does not know (it is resolved against H at that call).
        w.u64(started_);
    }
    static delayed read(detail::checkpoint_reader& r) {
        delayed s;
        s.calls_ = r.counter("the step call count");
        if (r.format() >= 5) {
            const std::uint64_t started = r.u64("whether a delayed round was started");
            if (started > unknown) {
                throw checkpoint_error("loco: checkpoint corrupted (the delayed schedule's round "
                                       "flag)");
            }
            s.started_ = static_cast<std::uint8_t>(started);
        } else {
            s.started_ = unknown;  // formats 1 to 4 derived it from calls / H
        }
        return s;
    }

    // A format 1-4 stream did not record it: loco::diloco's load() tells it whether the loaded
    // checkpoint holds an exchange in flight (or a planned finish with nothing), which is the
    // answer whatever H the resumed run uses. Ignored when the stream recorded it.
    void resume_started(std::vector<bool> started) {
        if (started_ == unknown && !started.empty()) started_ = started[0] ? yes : no;
    }

private:
    static constexpr std::uint8_t no = 0, yes = 1, unknown = 2;
    std::uint64_t calls_ = 0;
    std::uint8_t started_ = no;  // a round's exchange was started: the next round end finishes it
};

}  // namespace loco::schedule
