#pragma once
// The host backend: plain loops over the same per-element rules the CUDA kernels run. It is the
// no-GPU path and the oracle the kernels are tested against.
//
// Optimizer state is stored structure-of-arrays over the flat layout of all parameters: state
// float j of flat element i lives at state[j * total + i].

#include <loco/math.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>

#include <algorithm>
#include <cstddef>
#include <optional>

namespace loco::backend::host {

// Applies Rule::update to n elements: x[i] is updated with input g[i] and the rule's state at
// state + j * stride + i.
// The arrays never overlap (parameter_list::check_no_overlap), which __restrict tells the compiler
// so that it can vectorise the loop; `k` is copied so that it cannot alias them either.
template <elementwise_optimizer Rule>
void apply(const scalars_t<Rule>& scalars, float* __restrict x, const float* __restrict g,
           float* __restrict state, std::size_t stride, std::size_t n) {
    constexpr int S = Rule::state_size;
    const scalars_t<Rule> k = scalars;
    for (std::size_t i = 0; i < n; ++i) {
        float s[S > 0 ? static_cast<std::size_t>(S) : std::size_t{1}] = {};
        for (int j = 0; j < S; ++j) {
            s[j] = state[static_cast<std::size_t>(j) * stride + i];
        }
        Rule::update(k, x[i], g[i], s);
        for (int j = 0; j < S; ++j) {
            state[static_cast<std::size_t>(j) * stride + i] = s[j];
        }
    }
}

// Where the first non-finite value is, if any.
struct nonfinite_hit {
    std::size_t index;
    float value;
    bool value_known = true;  // false where only the position is found (a fused device check)
};

inline std::optional<nonfinite_hit> find_nonfinite(const float* x, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
        if (!math::isfinite(x[i])) {
            return nonfinite_hit{i, x[i]};
        }
    }
    return std::nullopt;
}

// Copies every parameter's value into the flat buffer, or back out of it.
inline void gather_values(const parameter_list& params, float* flat) {
    for (const auto& p : params) {
        std::copy_n(p.value.data, p.value.size, flat + p.offset);
    }
}
inline void scatter_values(const float* flat, const parameter_list& params) {
    for (const auto& p : params) {
        std::copy_n(flat + p.offset, p.value.size, p.value.data);
    }
}

}  // namespace loco::backend::host
