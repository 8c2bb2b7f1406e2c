#pragma once
// DiLoCo's schedule: the workers sync after every H calls to step() (H = hyper::every, set at run
// time). Calls are counted, not applied updates, so a worker that skips a step with a non-finite
// gradient still reaches the sync together with its peers.

#include <loco/error.hpp>

#include <cstdint>
#include <string_view>

namespace loco::schedule {

struct every {
    static constexpr std::string_view name = "every";

    struct hyper {
        std::uint64_t every = 500;  // H, inner steps per outer step (DiLoCo, OpenDiLoCo)
    };

    static bool due(const hyper& h, std::uint64_t calls) { return calls % h.every == 0; }

    static void validate(const hyper& h) {
        if (h.every == 0) throw invalid_argument("loco::schedule::every: every (H) must be >= 1");
    }
};

}  // namespace loco::schedule
