#pragma once
// What an optimizer policy is, written down as concepts, plus the checks that turn a policy with a
// missing member into one readable compiler message.
//
// An element-wise optimizer policy (every inner and outer optimizer so far) is a struct with
//   static constexpr std::string_view name;   // recorded in checkpoints and messages
//   struct hyper { ... };                      // hyper-parameters, paper defaults
//   static constexpr int state_size;           // floats of state per parameter element
//   static scalars prepare(const hyper&, std::uint64_t step);       // once per step, LOCO_HD
//   static void update(const scalars&, float& x, float g, float* s); // once per element, LOCO_HD
// and optionally
//   static void validate(const hyper&);        // throws loco::invalid_argument on bad values
//
// For an inner optimizer x is the parameter and g its gradient; for an outer optimizer x is the
// global parameter and g the averaged pseudo-gradient. `step` counts updates from 1. State starts
// at zero. The same `update` runs in the host loop and in the CUDA kernels.

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace loco {

namespace detail {

// Whether P::update writes its element: its second parameter a non-const lvalue reference. A
// plain function is asked its type; a template or an overload set is called with an lvalue that
// cannot be copied but converts to float&: by value (`auto x`) it does not compile, by forwarding
// reference (`X&& x`) or `float& x` it does. (A template taking `const X&` is not caught.)
struct element_probe {
    element_probe(const element_probe&) = delete;
    operator float&() const;  // never called: the probe lives in unevaluated operands only
};
template <class F>
struct second_parameter {
    using type = float&;
};
template <class R, class A, class B, class... Rest>
struct second_parameter<R (*)(A, B, Rest...)> {
    using type = B;
};
template <class R, class A, class B, class... Rest>
struct second_parameter<R (*)(A, B, Rest...) noexcept> {
    using type = B;
};
template <class P>
constexpr bool update_writes_element() {
    if constexpr (requires { &P::update; }) {
        using X = typename second_parameter<decltype(&P::update)>::type;
        return std::is_lvalue_reference_v<X> && !std::is_const_v<std::remove_reference_t<X>>;
    } else {
        return requires(const typename P::hyper& h, element_probe& x, float g, float* s) {
            P::update(P::prepare(h, std::uint64_t{}), x, g, s);
        };
    }
}

}  // namespace detail

template <class P>
concept elementwise_optimizer =
    requires {
        typename P::hyper;
        { P::name } -> std::convertible_to<std::string_view>;
        { P::state_size } -> std::convertible_to<int>;
    } && std::is_default_constructible_v<typename P::hyper> && (P::state_size >= 0) &&
    requires(const typename P::hyper& h, std::uint64_t step, float& x, float g, float* s) {
        P::prepare(h, step);
        P::update(P::prepare(h, step), x, g, s);
    } &&
    // x by non-const reference: the rule writes the new value there (an update taking x by
    // value, or by const reference, compiles and leaves every parameter as it was).
    detail::update_writes_element<P>();

// A per-matrix optimizer policy (Muon): the update of a whole rows x cols matrix at a time.
//   static constexpr std::string_view name;  struct hyper { ... };  using workspace = ...;
//   static constexpr int state_size;          // 0 or 1: floats of state per element
//   static void update_matrix(const hyper&, std::uint64_t step, float* x, const float* g,
//                             float* state, std::size_t rows, std::size_t cols, workspace&);
//   optional: static void validate(const hyper&);
// It only takes parameters with a 2-D shape; route the others to another group (groups.hpp).
template <class P>
concept matrix_optimizer =
    requires {
        typename P::hyper;
        typename P::workspace;
        { P::name } -> std::convertible_to<std::string_view>;
        { P::state_size } -> std::convertible_to<int>;
    } && std::is_default_constructible_v<typename P::hyper> &&
    (P::state_size == 0 || P::state_size == 1) &&
    requires(const typename P::hyper& h, std::uint64_t step, float* x, const float* g, float* s,
             std::size_t rows, std::size_t cols, typename P::workspace& ws) {
        P::update_matrix(h, step, x, g, s, rows, cols, ws);
    };

// Runs every step on each worker: an element-wise rule, or a per-matrix one (Muon).
template <class P>
concept inner_optimizer = elementwise_optimizer<P> || matrix_optimizer<P>;

// Runs at each sync on the averaged pseudo-gradient.
template <class P>
concept outer_optimizer = elementwise_optimizer<P>;

template <elementwise_optimizer P>
using scalars_t = decltype(P::prepare(std::declval<const typename P::hyper&>(), std::uint64_t{}));

// A sync schedule: an object that owns its state (the count of step() calls, anything else it
// needs) and, after each step() call, plans the sync (schedule/plan.hpp).
//   static constexpr std::string_view name;  struct hyper { ... };
//   static std::size_t fragments(const hyper&);             // fragments it syncs (1: whole model)
//   schedule::sync_plan next(const hyper&);                   // after each step() call
//   std::uint64_t calls() const;                              // step() calls so far
//   void save(detail::checkpoint_writer&) const;  static S read(detail::checkpoint_reader&);
//   optional: static void validate(const hyper&);  static std::string describe(const hyper&);
//             static float merge_alpha(const hyper&);  static fragment_pattern pattern(const hyper&);
// A stateless schedule, `static bool due(const hyper&, std::uint64_t calls)`, is still accepted:
// loco::diloco wraps it into a one-fragment plan.
template <class S>
concept planning_schedule = requires(S& s, const S& cs, const typename S::hyper& h) {
    { S::name } -> std::convertible_to<std::string_view>;
    { S::fragments(h) } -> std::convertible_to<std::size_t>;
    s.next(h);
    { cs.calls() } -> std::convertible_to<std::uint64_t>;
};

template <class S>
concept stateless_schedule = requires(const typename S::hyper& h, std::uint64_t calls) {
    { S::name } -> std::convertible_to<std::string_view>;
    { S::due(h, calls) } -> std::convertible_to<bool>;
};

template <class S>
concept sync_schedule = planning_schedule<S> || stateless_schedule<S>;

namespace detail {

// Calls P::validate(h) when the policy has one.
template <class P>
void validate_hyper(const typename P::hyper& h) {
    if constexpr (requires { P::validate(h); }) {
        P::validate(h);
    }
}

// One message per missing member, each check assuming the previous ones passed, so a policy with
// a missing member produces exactly one sentence that names it.
template <class P>
constexpr bool check_elementwise_policy() {
    constexpr bool has_hyper = requires { typename P::hyper; };
    constexpr bool has_name = requires {
        { P::name } -> std::convertible_to<std::string_view>;
    };
    constexpr bool has_state_size = requires {
        { P::state_size } -> std::convertible_to<int>;
    };
    constexpr bool has_prepare = requires(const typename P::hyper& h) { P::prepare(h, std::uint64_t{}); };
    constexpr bool has_update = requires(const typename P::hyper& h, float& x, float g, float* s) {
        P::update(P::prepare(h, std::uint64_t{}), x, g, s);
    };
    static_assert(has_hyper,
                  "loco: an optimizer policy needs a nested `struct hyper` holding its "
                  "hyper-parameters; see docs/policies.md");
    static_assert(!has_hyper || has_name,
                  "loco: an optimizer policy needs `static constexpr std::string_view name`; see "
                  "docs/policies.md");
    static_assert(!has_hyper || !has_name || has_state_size,
                  "loco: an optimizer policy needs `static constexpr int state_size` (floats of "
                  "state per element); see docs/policies.md");
    static_assert(!has_hyper || !has_name || !has_state_size || has_prepare,
                  "loco: an optimizer policy needs `static scalars prepare(const hyper&, "
                  "std::uint64_t step)`; see docs/policies.md");
    static_assert(!has_hyper || !has_name || !has_state_size || !has_prepare || has_update,
                  "loco: an optimizer policy needs `static void update(const scalars&, float& x, "
                  "float g, float* state)`; see docs/policies.md");
    constexpr bool writes_x = update_writes_element<P>();
    static_assert(!has_hyper || !has_name || !has_state_size || !has_prepare || !has_update ||
                      writes_x,
                  "loco: an optimizer policy's `update` must take the element as `float& x` and "
                  "write the new value there (by value or by const reference, every parameter "
                  "would stay as it was); see docs/policies.md");
    constexpr bool complete =
        has_hyper && has_name && has_state_size && has_prepare && has_update && writes_x;
    if constexpr (complete) {
        static_assert(std::is_default_constructible_v<typename P::hyper>,
                      "loco: an optimizer policy's `hyper` must be default-constructible (its "
                      "defaults are the paper's values); see docs/policies.md");
        static_assert(P::state_size >= 0,
                      "loco: an optimizer policy's `state_size` must be >= 0; see docs/policies.md");
    }
    return complete;
}

template <class S>
constexpr bool check_schedule_policy() {
    constexpr bool has_hyper = requires { typename S::hyper; };
    constexpr bool has_name = requires {
        { S::name } -> std::convertible_to<std::string_view>;
    };
    constexpr bool has_due = requires(const typename S::hyper& h) {
        { S::due(h, std::uint64_t{}) } -> std::convertible_to<bool>;
    };
    constexpr bool has_fragments = requires(const typename S::hyper& h) {
        { S::fragments(h) } -> std::convertible_to<std::size_t>;
    };
    constexpr bool has_next = requires(S& s, const typename S::hyper& h) { s.next(h); };
    constexpr bool has_calls = requires(const S& s) {
        { s.calls() } -> std::convertible_to<std::uint64_t>;
    };
    constexpr bool planning = has_fragments || has_next || has_calls;
    static_assert(has_hyper,
                  "loco: a sync schedule needs a nested `struct hyper`; see docs/schedules.md");
    static_assert(!has_hyper || has_name,
                  "loco: a sync schedule needs `static constexpr std::string_view name`; see "
                  "docs/schedules.md");
    static_assert(!has_hyper || !has_name || planning || has_due,
                  "loco: a sync schedule needs `schedule::sync_plan next(const hyper&)` (or, "
                  "stateless, `static bool due(const hyper&, std::uint64_t calls)`); see "
                  "docs/schedules.md");
    static_assert(!has_hyper || !has_name || !planning || has_fragments,
                  "loco: a sync schedule needs `static std::size_t fragments(const hyper&)`; see "
                  "docs/schedules.md");
    static_assert(!has_hyper || !has_name || !planning || !has_fragments || has_next,
                  "loco: a sync schedule needs `schedule::sync_plan next(const hyper&)`; see "
                  "docs/schedules.md");
    static_assert(!has_hyper || !has_name || !planning || !has_fragments || !has_next || has_calls,
                  "loco: a sync schedule needs `std::uint64_t calls() const` (step() calls so "
                  "far); see docs/schedules.md");
    return has_hyper && has_name && ((has_fragments && has_next && has_calls) || (!planning && has_due));
}

// A policy's description for fingerprints and checkpoints: its describe(hyper) when it has one,
// else its name. A policy with settings must describe them: start() compares the descriptions
// between the ranks and a checkpoint records them, so that ranks built with another outer lr or
// compressor setting, or a resume with them, are refused (without, only the name was compared,
// and such ranks applied different outer steps without a word).
template <class P>
std::string describe_policy(const typename P::hyper& h) {
    constexpr bool describes = requires {
        { P::describe(h) } -> std::convertible_to<std::string>;
    };
    static_assert(describes || std::is_empty_v<typename P::hyper>,
                  "loco: a policy with settings (a non-empty `hyper`) needs `static std::string "
                  "describe(const hyper&)` naming each of them: start() compares it between the "
                  "ranks and checkpoints record it; see docs/policies.md");
    if constexpr (describes) {
        return P::describe(h);
    } else {
        return std::string(P::name);
    }
}

// The name of a policy that wraps another: Word::value + "<" + Wrapped::name + ">" as a static
// string (e.g. "error_feedback<statistical2>", "warmup<every>"), so that checkpoints and
// fingerprints tell the wrapped policies apart. Built from types, not from string_view template
// arguments, which nvcc's front end does not accept.
template <class Word, class Wrapped>
struct wrapped_name {
    static constexpr auto storage = [] {
        std::array<char, Word::value.size() + Wrapped::name.size() + 3> out{};
        std::size_t at = 0;
        for (const char c : Word::value) out[at++] = c;
        out[at++] = '<';
        for (const char c : Wrapped::name) out[at++] = c;
        out[at] = '>';
        return out;
    }();
    static constexpr std::string_view value{storage.data(), storage.size() - 1};
};

}  // namespace detail
}  // namespace loco
