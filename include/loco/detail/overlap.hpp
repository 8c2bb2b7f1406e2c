#pragma once
// Finding parameter storage that overlaps: a value must not share memory with another value or
// with any gradient (an update through one would silently change the other); gradients may share
// memory with each other (a trainer may reuse one buffer).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace loco::detail {

struct memory_range {
    std::uintptr_t begin = 0;
    std::uintptr_t end = 0;
    std::size_t index = 0;  // the parameter it belongs to
    bool is_value = false;
};

// The first overlap involving a value, found in one sort and sweep: (range, earlier range).
inline std::optional<std::pair<memory_range, memory_range>> find_value_overlap(
    std::vector<memory_range> ranges) {
    std::sort(ranges.begin(), ranges.end(),
              [](const memory_range& a, const memory_range& b) { return a.begin < b.begin; });
    // The furthest-reaching range of any kind, and of values, seen so far: a range overlaps an
    // earlier one exactly when it starts before the furthest earlier end.
    const memory_range* reach_any = nullptr;
    const memory_range* reach_value = nullptr;
    for (const memory_range& r : ranges) {
        if (r.is_value && reach_any && reach_any->end > r.begin) {
            return std::pair{r, *reach_any};
        }
        if (reach_value && reach_value->end > r.begin) {
            return std::pair{r, *reach_value};
        }
        if (!reach_any || r.end > reach_any->end) {
            reach_any = &r;
        }
        if (r.is_value && (!reach_value || r.end > reach_value->end)) {
            reach_value = &r;
        }
    }
    return std::nullopt;
}

}  // namespace loco::detail
