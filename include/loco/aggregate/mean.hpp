#pragma once
// The plain mean of the workers' pseudo-gradients, DiLoCo's aggregation (the default). The
// exchange computes it natively (no gathering); combine is the same mean in rank order, used when
// a caller hands it every worker's delta.

#include <loco/aggregate/aggregate.hpp>

#include <cstddef>
#include <span>
#include <string>
#include <string_view>

namespace loco::aggregate {

struct mean {
    static constexpr std::string_view name = "mean";
    struct hyper {};
    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = false;

    static std::string describe(const hyper&) { return "mean"; }

    // out = sum over ranks in rank order, then divided by the number of workers (the order and
    // rounding of the exchange's own mean).
    static void combine(const hyper&, const contributions& c, std::span<float> out) {
        check_contributions(c, out.size(), false, "loco::aggregate::mean: ");
        for (std::size_t i = 0; i < out.size(); ++i) out[i] = 0.0f;
        for (std::size_t k = 0; k < c.workers; ++k) {
            const auto d = c.delta(k);
            for (std::size_t i = 0; i < out.size(); ++i) out[i] += d[i];
        }
        const float m = static_cast<float>(c.workers);
        for (std::size_t i = 0; i < out.size(); ++i) out[i] /= m;
    }
};

}  // namespace loco::aggregate
