#pragma once
// Helpers for tests that walk a policy's hyper-parameters: how many members a hyper struct has,
// and another valid value for a setting, so that a test can change each member in turn (and fail
// when a member is added without its entry).

#include <loco/comm/threads.hpp>
#include <loco/error.hpp>
#include <loco/params.hpp>

#include <array>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <string>
#include <vector>

namespace loco_test {

// Converts to anything; named in unevaluated operands only.
struct any_setting {
    template <class T>
    operator T() const;
};

// The number of members of a hyper struct (scalars and enums): the longest brace list it takes.
template <class H, class... Seen>
constexpr std::size_t member_count() {
    if constexpr (requires { H{Seen{}..., any_setting{}}; }) {
        return member_count<H, Seen..., any_setting>();
    } else {
        return sizeof...(Seen);
    }
}

// Another valid value of a setting (enums: the test file adds its own overloads).
inline float changed(float x) { return std::isfinite(x) && x != 0.0f ? x * 0.5f : 0.5f; }
inline bool changed(bool x) { return !x; }
template <std::unsigned_integral T>
T changed(T x) {
    return x + 1;
}

// What start() raised on each of two thread ranks whose handles (type Opt, over one tensor of two
// floats) were built with config_of(rank): empty where it did not refuse.
template <class Opt, class ConfigOf>
std::array<std::string, 2> start_errors(ConfigOf&& config_of) {
    std::array<std::string, 2> errors;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const int r = comm.rank();
        std::vector<float> x{1.0f, -2.0f}, g{0.5f, 0.25f};
        loco::parameter_list list;
        list.add("x", x, g);
        Opt opt(list, comm, config_of(r));
        try {
            opt.start();
        } catch (const loco::invalid_argument& e) {
            errors[static_cast<std::size_t>(r)] = e.what();
        }
    });
    return errors;
}

}  // namespace loco_test
