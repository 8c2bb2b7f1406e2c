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
        ++calls_;
        if (calls_ % h.every != 0) return nothing_now;
        // From the second round on, the previous round's exchange is applied before the new one
        // starts; every round ends with the local values reset to the global ones.
        return {fragment_zero, calls_ / h.every >= 2 ? std::span<const std::size_t>(fragment_zero)
                                                     : std::span<const std::size_t>(),
                fragment_zero};
    }

    std::uint64_t calls() const noexcept { return calls_; }
    void save(detail::checkpoint_writer& w) const { w.u64(calls_); }
    static delayed read(detail::checkpoint_reader& r) {
        delayed s;
        s.calls_ = r.u64("the step call count");
        return s;
    }

private:
    std::uint64_t calls_ = 0;
};

}  // namespace loco::schedule
