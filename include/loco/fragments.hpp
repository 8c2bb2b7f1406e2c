#pragma once
// How the model is cut into the fragments a schedule syncs one after the other (Streaming DiLoCo).
// A fragment is a list of whole tensors; every tensor is in exactly one fragment. Three ways to
// say which:
//   * automatic (the default): near-equal bytes without cutting a tensor; `sequential` cuts the
//     tensor list into P consecutive runs, `strided` deals the tensors out in order, each to the
//     fragment holding the fewest bytes so far (equal tensors go round-robin, as strided layers);
//   * layer_of: a layer index per tensor; layers go to fragments by the pattern (`strided`: layer l
//     to fragment l mod P; `sequential`: P consecutive runs of layers);
//   * names: P explicit lists of tensor names.
// See docs/schedules.md.

#include <loco/error.hpp>
#include <loco/params.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace loco {

enum class fragment_pattern : unsigned char { strided, sequential };

constexpr std::string_view to_string(fragment_pattern p) noexcept {
    switch (p) {
        case fragment_pattern::strided: return "strided";
        case fragment_pattern::sequential: return "sequential";
    }
    return "?";
}

struct fragment_layout {
    // P lists of tensor names (fragment p syncs names[p]); empty: not used.
    std::vector<std::vector<std::string>> names;
    // The layer index of each tensor (e.g. parsed from its name); empty: not used.
    std::function<std::size_t(const parameter&)> layer_of;
};

// The merge weight and fragment pattern of a fragmenting schedule (streaming, fragment_periods):
// invalid_argument from `who` otherwise.
inline void validate_merge(const std::string& who, float alpha, fragment_pattern pattern) {
    if (!(alpha >= 0.0f && alpha <= 1.0f)) {
        throw invalid_argument(who + "alpha must be in [0, 1] (0 replaces the local values by the "
                                     "global ones, 1 keeps them)");
    }
    if (pattern != fragment_pattern::strided && pattern != fragment_pattern::sequential) {
        throw invalid_argument(who + "pattern must be fragment_pattern::strided or sequential");
    }
}

namespace detail {

// Parameter indices of each of `count` fragments, each list in layout order. Throws
// invalid_argument naming the fix when the layout cannot be used. `params`: a parameter_list, or
// any indexable range of loco::parameter (the CUDA backend's description of a tensor table).
template <class Params>
std::vector<std::vector<std::size_t>> resolve_fragments(const Params& params,
                                                               const fragment_layout& layout,
                                                               std::size_t count,
                                                               fragment_pattern pattern) {
    const std::size_t n = params.size();
    if (n > 0 && count > n) {
        throw invalid_argument("loco: the schedule syncs " + std::to_string(count) +
                               " fragments of a model of " + std::to_string(n) +
                               " tensors, so a fragment holds no tensor; use at most " +
                               std::to_string(n) + " fragments");
    }
    std::vector<std::size_t> owner(n, count);  // count = not assigned yet
    if (!layout.names.empty() && layout.layer_of) {
        throw invalid_argument("loco: a fragment_layout gives both names and layer_of; give one");
    }
    if (!layout.names.empty()) {
        if (layout.names.size() != count) {
            throw invalid_argument("loco: the fragment_layout lists " +
                                   std::to_string(layout.names.size()) +
                                   " fragments but the schedule syncs " + std::to_string(count) +
                                   "; give one list of tensor names per fragment");
        }
        for (std::size_t f = 0; f < count; ++f) {
            for (const std::string& name : layout.names[f]) {
                std::size_t i = 0;
                while (i < n && params[i].name != name) ++i;
                if (i == n) {
                    throw invalid_argument("loco: fragment " + std::to_string(f) +
                                           " names tensor '" + name +
                                           "', which is not a parameter; check the spelling");
                }
                if (owner[i] != count) {
                    throw invalid_argument("loco: tensor '" + name + "' is named by fragments " +
                                           std::to_string(owner[i]) + " and " +
                                           std::to_string(f) + "; name each tensor once");
                }
                owner[i] = f;
            }
        }
        for (std::size_t i = 0; i < n; ++i) {
            if (owner[i] == count) {
                throw invalid_argument("loco: tensor '" + params[i].name +
                                       "' is in no fragment; add it to one of the lists");
            }
        }
    } else if (layout.layer_of) {
        std::vector<std::size_t> layer(n);
        std::size_t layers = 0;
        for (std::size_t i = 0; i < n; ++i) {
            layer[i] = layout.layer_of(params[i]);
            // Bounded so that layer + 1 and layer * count (count <= n) cannot overflow.
            if (layer[i] > std::numeric_limits<std::uint32_t>::max()) {
                throw invalid_argument(
                    "loco: layer_of gives tensor '" + params[i].name + "' the layer index " +
                    std::to_string(layer[i]) +
                    "; give every tensor a layer index below 2^32 (a tensor outside the layers, "
                    "such as an embedding, goes with the first or the last layer)");
            }
            layers = std::max(layers, layer[i] + 1);
        }
        for (std::size_t i = 0; i < n; ++i) {
            owner[i] = pattern == fragment_pattern::strided ? layer[i] % count
                                                            : layer[i] * count / layers;
        }
    } else if (pattern == fragment_pattern::sequential) {
        // Tensor i goes to the fragment whose share of the bytes its middle falls into.
        double total = 0.0;
        for (std::size_t i = 0; i < n; ++i) total += static_cast<double>(params[i].value.size);
        // Clamped so that the runs stay consecutive and leave every later fragment a tensor: a
        // large tensor whose middle lies a few shares on (an embedding first) would otherwise
        // leave the fragments before it empty. A split that needs no clamp is unchanged.
        for (std::size_t i = 0; i < n; ++i) {
            const double middle =
                static_cast<double>(params[i].offset) + 0.5 * static_cast<double>(params[i].value.size);
            const std::size_t share =
                total > 0 ? std::min(count - 1, static_cast<std::size_t>(
                                                    middle * static_cast<double>(count) / total))
                          : i * count / std::max<std::size_t>(n, 1);
            const std::size_t lowest = std::max(i == 0 ? 0 : owner[i - 1],
                                                count > n - i ? count - (n - i) : 0);
            const std::size_t highest = i == 0 ? 0 : std::min(owner[i - 1] + 1, count - 1);
            owner[i] = std::min(std::max(share, lowest), highest);
        }
    } else {
        std::vector<std::size_t> load(count, 0);
        for (std::size_t i = 0; i < n; ++i) {
            const auto lightest = std::min_element(load.begin(), load.end());
            owner[i] = static_cast<std::size_t>(lightest - load.begin());
            *lightest += params[i].value.size;
        }
    }
    std::vector<std::vector<std::size_t>> out(count);
    for (std::size_t i = 0; i < n; ++i) out[owner[i]].push_back(i);
    for (std::size_t f = 0; f < count && n > 0; ++f) {
        if (out[f].empty()) {
            throw invalid_argument("loco: fragment " + std::to_string(f) +
                                   " holds no tensor; use fewer fragments or another layout");
        }
    }
    return out;
}

// "fragment 0: a b; fragment 1: c" for fingerprints and messages.
template <class Params>
std::string describe_fragments(const Params& params,
                                      const std::vector<std::vector<std::size_t>>& fragments) {
    std::string s;
    for (std::size_t f = 0; f < fragments.size(); ++f) {
        s += (f ? "; fragment " : "fragment ") + std::to_string(f) + ":";
        for (const std::size_t i : fragments[f]) s += " " + params[i].name;
    }
    return s;
}

}  // namespace detail
}  // namespace loco
