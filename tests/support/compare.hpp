#pragma once
// Element-wise comparison helpers that report the first few mismatches and a count, instead of one
// failure line per element.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

namespace loco_test {

// Adam's bias-corrected scalars from Rule::prepare (step_size = lr / (1 - beta1^t), inv_bc2_sqrt =
// 1 / sqrt(1 - beta2^t)) against double precision: within a float rounding or two. Computed in
// float, 1 - beta2^t cancelled when beta2 was near 1 (0.9999: 5e-5 relative).
template <class Scalars>
void expect_bias_corrections(const Scalars& k, double lr, double beta1, double beta2,
                             std::uint64_t t) {
    const double td = static_cast<double>(t);
    const double step_size = lr / (1.0 - std::pow(beta1, td));
    const double inv_bc2_sqrt = 1.0 / std::sqrt(1.0 - std::pow(beta2, td));
    CAPTURE(beta2);
    CAPTURE(t);
    CHECK(std::abs(k.step_size - step_size) <= 2e-7 * step_size);
    CHECK(std::abs(k.inv_bc2_sqrt - inv_bc2_sqrt) <= 2e-7 * inv_bc2_sqrt);
}

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
