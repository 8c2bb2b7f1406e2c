#pragma once
// loco::detail::text_stream: the std::ostringstream loco builds its texts in (a policy's
// description, a handle's fingerprint), made to raise what its buffer throws. A plain one
// swallows std::bad_alloc and returns what it had written so far: out of memory, a description
// came back cut short and read as another configuration (a checkpoint "mismatch", ranks that
// "disagree") instead of as out of memory.

#include <ios>
#include <sstream>

namespace loco::detail {

class text_stream : public std::ostringstream {
public:
    text_stream() { exceptions(std::ios::badbit); }
};

}  // namespace loco::detail
