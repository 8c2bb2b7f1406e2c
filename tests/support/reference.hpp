#pragma once
// Plain double-precision reference implementations, written from the papers' and PyTorch's
// formulas, independently of loco's float rules (no shared code, textbook form: bias-corrected
// moments, explicit branches).

#include <loco/inner/adamw.hpp>
#include <loco/inner/lion.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/adam.hpp>
#include <loco/outer/nesterov.hpp>
#include <loco/outer/sgd.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace loco_test {

// reference<Policy>::step(hyper, x, g, state, t): one update of one element in double; t counts
// from 1; state has Policy::state_size doubles, zero before the first step.
template <class Policy>
struct reference;

template <>
struct reference<loco::inner::adamw> {
    static void step(const loco::inner::adamw::hyper& h, double& p, double g, double* s,
                     std::uint64_t t) {
        const double b1 = h.beta1, b2 = h.beta2;
        p = p - double(h.lr) * double(h.weight_decay) * p;
        s[0] = b1 * s[0] + (1 - b1) * g;
        s[1] = b2 * s[1] + (1 - b2) * g * g;
        const double m_hat = s[0] / (1 - std::pow(b1, double(t)));
        const double v_hat = s[1] / (1 - std::pow(b2, double(t)));
        p = p - double(h.lr) * m_hat / (std::sqrt(v_hat) + double(h.eps));
    }
};

template <>
struct reference<loco::inner::lion> {
    static void step(const loco::inner::lion::hyper& h, double& p, double g, double* s,
                     std::uint64_t) {
        const double c = double(h.beta1) * s[0] + (1 - double(h.beta1)) * g;
        const double sign = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
        p = p - double(h.lr) * (sign + double(h.weight_decay) * p);
        s[0] = double(h.beta2) * s[0] + (1 - double(h.beta2)) * g;
    }
    // Lion's update is the sign of c: where |c| is within float rounding of zero, float and double
    // may legitimately take opposite signs.
    static bool ambiguous(const loco::inner::lion::hyper& h, double g, const double* s) {
        const double c = double(h.beta1) * s[0] + (1 - double(h.beta1)) * g;
        return std::abs(c) <= 1e-6 * (std::abs(s[0]) + std::abs(g));
    }
};

template <>
struct reference<loco::inner::sgd> {
    static void step(const loco::inner::sgd::hyper& h, double& p, double g, double* s,
                     std::uint64_t t) {
        double d = g + double(h.weight_decay) * p;
        if (h.momentum != 0.0f) {
            if (t == 1) {
                s[0] = d;
            } else {
                s[0] = double(h.momentum) * s[0] + (1 - double(h.dampening)) * d;
            }
            d = h.nesterov ? d + double(h.momentum) * s[0] : s[0];
        }
        p = p - double(h.lr) * d;
    }
};

template <>
struct reference<loco::outer::sgd> {
    static void step(const loco::outer::sgd::hyper& h, double& x, double d, double*,
                     std::uint64_t) {
        x = x - double(h.lr) * d;
    }
};

template <>
struct reference<loco::outer::nesterov> {
    // torch.optim.SGD(lr, momentum, nesterov=True), dampening 0.
    static void step(const loco::outer::nesterov::hyper& h, double& x, double d, double* s,
                     std::uint64_t t) {
        s[0] = (t == 1) ? d : double(h.momentum) * s[0] + d;
        x = x - double(h.lr) * (d + double(h.momentum) * s[0]);
    }
};

template <>
struct reference<loco::outer::adam> {
    // FedAdam, Reddi et al. Algorithm 2, optionally with Adam's bias correction.
    static void step(const loco::outer::adam::hyper& h, double& x, double d, double* s,
                     std::uint64_t t) {
        s[0] = double(h.beta1) * s[0] + (1 - double(h.beta1)) * d;
        s[1] = double(h.beta2) * s[1] + (1 - double(h.beta2)) * d * d;
        double m = s[0], v = s[1];
        if (h.bias_correction) {
            m /= 1 - std::pow(double(h.beta1), double(t));
            v /= 1 - std::pow(double(h.beta2), double(t));
        }
        x = x - double(h.lr) * m / (std::sqrt(v) + double(h.tau));
    }
};

// Steps every element of a flat buffer: x[i] with input g[i] and structure-of-arrays state
// (state float j of element i at state[j * x.size() + i]), as loco's host backend lays it out.
template <class Policy, class Inputs>
void reference_step_all(const typename Policy::hyper& h, std::vector<double>& x, const Inputs& g,
                        std::vector<double>& state, std::uint64_t t) {
    constexpr int S = Policy::state_size;
    const std::size_t n = x.size();
    for (std::size_t i = 0; i < n; ++i) {
        double s[S > 0 ? S : 1] = {};
        for (int j = 0; j < S; ++j) {
            s[j] = state[static_cast<std::size_t>(j) * n + i];
        }
        reference<Policy>::step(h, x[i], static_cast<double>(g[i]), s, t);
        for (int j = 0; j < S; ++j) {
            state[static_cast<std::size_t>(j) * n + i] = s[j];
        }
    }
}

}  // namespace loco_test
