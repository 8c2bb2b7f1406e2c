#pragma once
// The checkpoint of a schedule whose state is a few u64 counters (schedule/proportional.hpp,
// schedule/wallclock.hpp): the schedule lists each counter once, with the words a truncated
// checkpoint's error names it by, and save() and read() walk that one list, so the two cannot
// disagree on the order.

#include <loco/detail/checkpoint.hpp>

#include <array>
#include <cstddef>
#include <cstdint>

namespace loco::schedule {

// (An alias, not `std::uint64_t S::*member`: nvcc re-emits that declaration with parentheses
// that g++ then warns about.)
template <class S>
using counter_member = std::uint64_t S::*;

template <class S>
struct saved_counter {
    counter_member<S> member;
    const char* what;  // e.g. "the round count"
    // A count of calls or rounds, which no run takes to 2^63 (a larger one is a corrupted
    // checkpoint's); false for a value that is a setting's (proportional's H_w, up to H).
    bool count = true;
};

template <class S, std::size_t N>
void save_counters(detail::checkpoint_writer& w, const S& s,
                   const std::array<saved_counter<S>, N>& counters) {
    for (const saved_counter<S>& c : counters) w.u64(s.*c.member);
}

template <class S, std::size_t N>
S read_counters(detail::checkpoint_reader& r, const std::array<saved_counter<S>, N>& counters) {
    S s;
    for (const saved_counter<S>& c : counters) {
        s.*c.member = c.count ? r.counter(c.what) : r.u64(c.what);
    }
    return s;
}

}  // namespace loco::schedule
