#pragma once
// Element-wise comparison helpers that report the first few mismatches and a count, instead of one
// failure line per element.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <sstream>
#include <string>

namespace loco_test {

inline bool close(double got, double want, double rel_tol) {
    return std::abs(got - want) <= rel_tol * std::max(1.0, std::abs(want));
}

class mismatch_log {
public:
    // Records a mismatch when got and want differ by more than rel_tol (relative, at least 1).
    template <class Where>
    void expect_close(double got, double want, double rel_tol, Where&& where) {
        ++checked_;
        if (close(got, want, rel_tol)) {
            return;
        }
        if (count_++ < 5) {
            std::ostringstream s;
            where(s);
            s << ": got " << got << ", want " << want << "\n";
            first_ += s.str();
        }
    }
    std::size_t count() const { return count_; }
    std::size_t checked() const { return checked_; }
    // Fails the current test (non-fatally) if anything mismatched.
    void check() const {
        INFO(count_ << " of " << checked_ << " elements mismatched; first ones:\n" << first_);
        CHECK(count_ == 0);
    }

private:
    std::size_t count_ = 0;
    std::size_t checked_ = 0;
    std::string first_;
};

}  // namespace loco_test
