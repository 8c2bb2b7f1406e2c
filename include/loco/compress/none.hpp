#pragma once
// No compression: pseudo-gradients travel as fp32 and are averaged with one all-reduce.

#include <cstddef>
#include <string_view>

namespace loco::compress {

struct none {
    static constexpr std::string_view name = "none";

    struct hyper {};

    // Bytes one worker puts into the collective for n elements (before the all-reduce's own
    // factor 2(M-1)/M).
    static constexpr std::size_t payload_bytes(std::size_t n) noexcept { return 4 * n; }
};

}  // namespace loco::compress
