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
// and optionally `static void validate(const hyper&)` and `static std::string describe(const
// hyper&)`. When needs_deltas is false the exchange computes the mean natively (one fp32
// all-reduce, or the rank-order mean of the decoded payloads) and combine is not called; when it is
// true the exchange all-gathers every worker's payload (and, with needs_reports, every worker's
// report), decodes each one and calls combine, on every rank with the same inputs, so every rank
// gets the same result as long as combine is deterministic. combine may throw
// loco::invalid_argument to refuse a sync (e.g. every worker an outlier): every rank then raises
// and nothing is applied. See docs/diloco.md ("Write your own aggregation").

#include <cstddef>
#include <cstdint>
#include <span>

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

    std::span<const float> delta(std::size_t rank) const {
        return deltas.subspan(rank * elements, elements);
    }
};

}  // namespace loco::aggregate
