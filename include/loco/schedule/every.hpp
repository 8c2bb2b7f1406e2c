#pragma once
// DiLoCo's schedule: the workers sync the whole model after every H calls to step() (H =
// hyper::every, set at run time). Calls are counted, not applied updates, so a worker that skips a
// step with a non-finite gradient still reaches the sync together with its peers.

#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/schedule/plan.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace loco::schedule {

class every {
public:
    static constexpr std::string_view name = "every";

    struct hyper {
        std::uint64_t every = 500;  // H, inner steps per outer step (DiLoCo, OpenDiLoCo)
    };

    static void validate(const hyper& h) {
        if (h.every == 0) throw invalid_argument("loco::schedule::every: every (H) must be >= 1");
    }
    static std::string describe(const hyper& h) { return "every H=" + std::to_string(h.every); }
    static std::size_t fragments(const hyper&) noexcept { return 1; }

    // Called once after each step() call; calls() counts them from 1.
    sync_plan next(const hyper& h) noexcept {
        ++calls_;
        return calls_ % h.every == 0 ? whole_model_now : nothing_now;
    }

    std::uint64_t calls() const noexcept { return calls_; }
    void save(detail::checkpoint_writer& w) const { w.u64(calls_); }
    static every read(detail::checkpoint_reader& r) {
        every s;
        s.calls_ = r.counter("the step call count");
        return s;
    }

private:
    std::uint64_t calls_ = 0;
};

}  // namespace loco::schedule
