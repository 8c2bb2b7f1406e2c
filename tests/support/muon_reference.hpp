#pragma once
// A double-precision reference of Muon (torch.optim.Muon's formulas: momentum, Nesterov blend,
// Newton-Schulz orthogonalisation, decoupled decay, adjusted lr), for tests that check Muon inside
// larger compositions (parameter groups, MuLoCo). The same formulas as the reference in
// tests/muon_test.cpp, which tests them against closed forms.

#include <loco/inner/muon.hpp>
#include <loco/linalg/newton_schulz.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace loco_test::muon_ref {

using loco::inner::lr_adjustment;
using loco::inner::muon;
using loco::linalg::ns_coefficients;

using dmatrix = std::vector<double>;  // row-major

// The coefficients of iteration it: the table's row, the last row repeated past its end.
struct dcoeff {
    double a, b, c;
};
inline dcoeff coeff_at(const ns_coefficients& k, int it) {
    const auto& r = k.rows[std::min<std::size_t>(static_cast<std::size_t>(it), k.count - 1)];
    return {r.a, r.b, r.c};
}

inline dmatrix transpose(const dmatrix& x, std::size_t rows, std::size_t cols) {
    dmatrix t(x.size());
    for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t j = 0; j < cols; ++j) t[j * rows + i] = x[i * cols + j];
    return t;
}

// (p x q) * (q x r). Through raw pointers only because this runs in unoptimised, sanitized builds.
inline dmatrix matmul(const dmatrix& x, const dmatrix& y, std::size_t p, std::size_t q, std::size_t r) {
    dmatrix z(p * r, 0.0);
    for (std::size_t i = 0; i < p; ++i) {
        double* zi = z.data() + i * r;
        for (std::size_t k = 0; k < q; ++k) {
            const double xik = x[i * q + k];
            const double* yk = y.data() + k * r;
            for (std::size_t j = 0; j < r; ++j) zi[j] += xik * yk[j];
        }
    }
    return z;
}

// torch.optim.Muon's zeroth-power iteration, literally: transpose when rows > cols, divide by
// the Frobenius norm clamped at eps, X = a X + (b A + c A A) X with A = X X^T, transpose back.
inline dmatrix reference_ns(dmatrix x, std::size_t rows, std::size_t cols, const ns_coefficients& k,
                     int steps, double eps) {
    const bool tall = rows > cols;
    std::size_t m = rows, n = cols;
    if (tall) {
        x = transpose(x, rows, cols);
        std::swap(m, n);
    }
    double sq = 0.0;
    for (const double v : x) sq += v * v;
    const double norm = std::max(std::sqrt(sq), eps);
    for (double& v : x) v /= norm;
    for (int it = 0; it < steps; ++it) {
        const auto [a, b, c] = coeff_at(k, it);
        const dmatrix A = matmul(x, transpose(x, m, n), m, n, m);
        const dmatrix AA = matmul(A, A, m, m, m);
        dmatrix B(m * m);
        for (std::size_t i = 0; i < m * m; ++i) B[i] = b * A[i] + c * AA[i];
        const dmatrix BX = matmul(B, x, m, m, n);
        for (std::size_t i = 0; i < m * n; ++i) x[i] = a * x[i] + BX[i];
    }
    return tall ? transpose(x, m, n) : x;
}

inline double reference_lr_factor(lr_adjustment adjust, std::size_t rows, std::size_t cols) {
    const double r = double(rows), c = double(cols);
    if (adjust == lr_adjustment::original) return std::sqrt(std::max(1.0, r / c));
    if (adjust == lr_adjustment::match_rms_adamw) return 0.2 * std::sqrt(std::max(r, c));
    return std::sqrt(r / c);
}

// One Muon step in double: exponential-average momentum, optional Nesterov blend,
// orthogonalisation, decay with the plain lr, update with the adjusted lr.
inline void reference_step(const muon::hyper& h, dmatrix& p, const std::vector<float>& g, dmatrix& buf,
                    std::size_t rows, std::size_t cols) {
    const double mu = h.momentum;
    dmatrix u(p.size());
    for (std::size_t i = 0; i < p.size(); ++i) {
        buf[i] = mu * buf[i] + (1.0 - mu) * g[i];
        u[i] = h.nesterov ? (1.0 - mu) * g[i] + mu * buf[i] : buf[i];
    }
    const dmatrix o = reference_ns(u, rows, cols, h.coefficients, h.ns_steps, h.eps);
    const double lr = h.lr;
    const double adjusted = lr * reference_lr_factor(h.adjust_lr, rows, cols);
    for (std::size_t i = 0; i < p.size(); ++i) {
        p[i] = p[i] * (1.0 - lr * double(h.weight_decay)) - adjusted * o[i];
    }
}

}  // namespace loco_test::muon_ref
