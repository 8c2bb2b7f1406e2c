#pragma once
// What an aggregation policy is: the rule that turns the workers' pseudo-gradients of one fragment
// into the one the outer optimizer applies. A policy is a struct with
//
//   static constexpr std::string_view name;
//   struct hyper { ... };
//   static constexpr bool needs_reports;  // gather every worker's report (norm, step count)
//   static constexpr bool needs_deltas;   // gather every worker's decoded pseudo-gradient
//   static void combine(const hyper&, const contributions&, std::span<float> out);
//
// and optionally `static void validate(const hyper&)`; `static std::string describe(const
// hyper&)` (the settings, compared between the ranks and recorded in checkpoints) is required
// when hyper has members. loco::diloco checks these with detail::check_aggregate_policy (end of
// this file). When needs_deltas is false the exchange computes the mean natively (one fp32
// all-reduce, or the rank-order mean of the decoded payloads) and combine is not called; when it is
// true the exchange all-gathers every worker's payload (and, with needs_reports, every worker's
// report), decodes each one and calls combine, on every rank with the same inputs, so every rank
// gets the same result as long as combine is deterministic. combine may throw
// loco::invalid_argument to refuse a sync (e.g. every worker an outlier): every rank then raises
// and nothing is applied. See docs/diloco.md ("Write your own aggregation").
//
// Optionally `static constexpr bool needs_support = true;` (with needs_deltas): the exchange also
// tells, per worker and element, whether that worker's payload carried the element, for
// compressors that can say (a sparse payload's indices: compress::sparseloco::decode_support,
// compress::topk::decode_support, and error_feedback<C> forwarding C's); contributions::sent
// stays empty for the others, whose payloads carry every element (none, cast, blockwise,
// statistical; demo's, whose inverse DCT fills every element). A compressor whose payloads leave
// elements out must define decode_support: without it its payloads are taken as dense.
//
// Optionally `static constexpr bool decodes_payloads_together = true;` (without needs_deltas):
// the exchange does not average decoded payloads but hands all M payloads to the compressor's
// own `decode_scatter_mean`, which averages in the compressor's coordinates (DeMo's DCT
// coefficients; aggregate/scatter_mean.hpp).

#include <loco/compress/compressor.hpp>
// Optionally, a policy that remembers something between rounds (a detector, the last aggregate)
// declares `struct state` (default-constructible, `void save(loco::detail::checkpoint_writer&)
// const`, `static state read(loco::detail::checkpoint_reader&)`) and takes it as the second
// argument of combine. Every rank holds the same state (it is computed from the same gathered
// data); it advances only when the sync is committed and the checkpoint saves it. combine may
// return bool: false refuses the round without an error (EDiT when every worker is an outlier):
// on every rank nothing is applied, the outer state stays, and the local values are reset to the
// global ones. See docs/aggregation.md.

#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace loco::aggregate {

// What each worker says about its own pseudo-gradient of the fragment.
struct worker_report {
    float norm = 0.0f;         // L2 norm of its pseudo-gradient (before compression)
    float inner_steps = 0.0f;  // inner updates it has applied so far (skipped steps not counted)
};

// Everything a policy may read, in rank order.
struct contributions {
    std::size_t workers = 0;
    std::size_t elements = 0;                  // of the fragment
    std::span<const worker_report> reports;    // `workers` entries with needs_reports, else empty
    std::span<const float> deltas;             // workers x elements with needs_deltas, else empty

    // The fragment's tensors, in order over [0, elements) (with needs_deltas; empty otherwise).
    std::span<const compress::segment> segments;
    // workers x elements, 1 where the worker's payload carried the element (with needs_support
    // and a compressor that can say); empty: every worker sent every element.
    std::span<const std::uint8_t> sent;

    std::span<const float> delta(std::size_t rank) const {
        return deltas.subspan(rank * elements, elements);
    }
    std::span<const std::uint8_t> sent_by(std::size_t rank) const {
        return sent.empty() ? sent : sent.subspan(rank * elements, elements);
    }
};

// Throws loco::shape_error (`who` first) unless `c` holds what it promises: workers x elements
// deltas, `workers` reports where `reports` (the policy needs them), sent flags empty or workers x
// elements, segments empty or tiling [0, elements) in order; and `out` has `elements` floats.
// Every policy's combine checks, as the exchange builds them right and a caller of the public
// rules may not: reading past a short span is no error message.
inline void check_contributions(const contributions& c, std::size_t out_size, bool reports,
                                std::string_view who) {
    const std::string w(who);
    if (c.workers == 0) throw shape_error(w + "no worker contributed");
    if (out_size != c.elements || c.elements > c.deltas.size() / c.workers ||
        c.deltas.size() != c.workers * c.elements ||
        (!c.sent.empty() && c.sent.size() != c.deltas.size())) {
        throw shape_error(w + "expected " + std::to_string(c.workers) + " x " +
                          std::to_string(c.elements) + " deltas (and sent flags) and an output of " +
                          std::to_string(c.elements) + " elements; got " +
                          std::to_string(c.deltas.size()) + " deltas and " +
                          std::to_string(out_size) + " outputs");
    }
    if (reports && c.reports.size() != c.workers) {
        throw shape_error(w + "expected a report from each of the " + std::to_string(c.workers) +
                          " workers; got " + std::to_string(c.reports.size()));
    }
    std::size_t covered = 0;
    for (const auto& s : c.segments) {
        if (s.offset != covered || s.size > c.elements - covered) {
            throw shape_error(w + "the segments must tile the fragment's " +
                              std::to_string(c.elements) + " elements in order");
        }
        covered += s.size;
    }
    if (!c.segments.empty() && covered != c.elements) {
        throw shape_error(w + "the segments must tile the fragment's " +
                          std::to_string(c.elements) + " elements in order");
    }
}

// Whether a policy asks for contributions::sent.
template <class A>
constexpr bool needs_support() {
    if constexpr (requires { A::needs_support; }) {
        return A::needs_support;
    } else {
        return false;
    }
}

// Whether a policy has the compressor decode the gathered payloads together.
template <class A>
constexpr bool decodes_payloads_together() {
    if constexpr (requires { A::decodes_payloads_together; }) {
        return A::decodes_payloads_together;
    } else {
        return false;
    }
}

// Why the policy refuses a round (its combine returned false), for the error raised when refusals
// stall a run: the policy's `refusal`, else a sentence that fits any policy.
template <class A>
constexpr std::string_view refusal_reason() {
    if constexpr (requires { std::string_view{A::refusal}; }) {
        return A::refusal;
    } else {
        return "it refused the round";
    }
}

// The state a policy keeps between rounds, or nothing.
struct no_state {
    void save(loco::detail::checkpoint_writer&) const {}
    static no_state read(loco::detail::checkpoint_reader&) { return {}; }
};

template <class A>
concept stateful = requires { typename A::state; };

template <class A>
struct state_of {
    using type = no_state;
};
template <stateful A>
struct state_of<A> {
    using type = typename A::state;
};
template <class A>
using state_t = typename state_of<A>::type;

namespace impl {
template <class A>
decltype(auto) call_combine(const typename A::hyper& h, state_t<A>& s, const contributions& c,
                            std::span<float> out) {
    if constexpr (stateful<A>) {
        return A::combine(h, s, c, out);
    } else {
        (void)s;
        return A::combine(h, c, out);
    }
}

// Whether A's combine returns bool (a policy without combine never refuses).
template <class A>
constexpr bool refuses() {
    if constexpr (decodes_payloads_together<A>()) {
        return false;  // no combine: the compressor aggregates
    } else {
        return std::is_same_v<decltype(call_combine<A>(std::declval<const typename A::hyper&>(),
                                                        std::declval<state_t<A>&>(),
                                                        std::declval<const contributions&>(),
                                                        std::declval<std::span<float>>())),
                              bool>;
    }
}
}  // namespace impl

// Whether the policy's combine can refuse a round (returns bool).
template <class A>
constexpr bool can_refuse = impl::refuses<A>();

// The policy's validate(h), where it has one. Run before every combine (host and device):
// aggregate_hyper() may have been changed since the handle checked it at construction, and a
// negative EDiT temperature or centered-clip radius is no error to the rule itself, only garbage.
template <class A>
void validate_settings(const typename A::hyper& h) {
    if constexpr (requires { A::validate(h); }) A::validate(h);
}

// Runs the policy's rule (after validate_settings); false when it refused the round.
template <class A>
bool combine(const typename A::hyper& h, state_t<A>& s, const contributions& c,
             std::span<float> out) {
    validate_settings<A>(h);
    if constexpr (can_refuse<A>) {
        return impl::call_combine<A>(h, s, c, out);
    } else {
        impl::call_combine<A>(h, s, c, out);
        return true;
    }
}

}  // namespace loco::aggregate

namespace loco::detail {

// The requirements of an aggregation policy (above), each refused with one sentence instead of
// an error deep in the exchange; loco::diloco static_asserts it.
template <class A>
constexpr bool check_aggregate_policy() {
    constexpr bool has_name = requires {
        { A::name } -> std::convertible_to<std::string_view>;
    };
    constexpr bool has_hyper = requires { typename A::hyper; };
    constexpr bool has_flags = requires {
        { A::needs_reports } -> std::convertible_to<bool>;
        { A::needs_deltas } -> std::convertible_to<bool>;
    };
    static_assert(has_name, "loco: an aggregation policy needs `static constexpr std::string_view "
                            "name`; see docs/diloco.md (Write your own aggregation)");
    static_assert(has_hyper, "loco: an aggregation policy needs `struct hyper` (its settings, "
                             "default-constructible); see docs/diloco.md");
    static_assert(has_flags, "loco: an aggregation policy needs `static constexpr bool "
                             "needs_reports` and `needs_deltas`; see docs/diloco.md");
    if constexpr (has_name && has_hyper && has_flags) {
        constexpr bool with_state = requires(const typename A::hyper& h,
                                             aggregate::state_t<A>& s,
                                             const aggregate::contributions& c,
                                             std::span<float> out) { A::combine(h, s, c, out); };
        constexpr bool without_state = requires(const typename A::hyper& h,
                                                const aggregate::contributions& c,
                                                std::span<float> out) { A::combine(h, c, out); };
        constexpr bool has_combine = aggregate::stateful<A> ? with_state : without_state;
        static_assert(aggregate::decodes_payloads_together<A>() || has_combine,
                      "loco: an aggregation policy needs `static void combine(const hyper&, const "
                      "loco::aggregate::contributions&, std::span<float> out)` (with its `state&` "
                      "second when it declares `struct state`; it may return bool to refuse a "
                      "round); see docs/diloco.md");
        return aggregate::decodes_payloads_together<A>() || has_combine;
    }
    return false;
}

}  // namespace loco::detail
