#pragma once
// Newton-Schulz orthogonalisation on the host, in fp32: the matrix function Muon applies to its
// momentum. For G = U S V^T it returns approximately U V^T: after normalising G by its Frobenius
// norm (so every singular value is at most 1), each iteration applies the odd quintic
// phi(x) = a x + b x^3 + c x^5 to every singular value at once, as
//     A = X X^T,   X <- a X + (b A + c A A) X.
// The coefficients are chosen for a steep slope at zero rather than for convergence, so the
// singular values end up near 1 (in a band, not exactly at 1) after few iterations.
//
// The iteration runs on the orientation whose Gram matrix is the smaller one (min(rows, cols)
// squared), as torch.optim.Muon does by transposing tall matrices. Here the iterate is kept as a
// tall n x m matrix T (n >= m), where
//     T^T T = X X^T   and   T <- a T + T (b A + c A A)
// is the same iteration transposed; a wide input is transposed on the way in and out. A square
// input is not transposed: the iteration on G^T yields exactly the transpose of the iteration on
// G in exact arithmetic, so only rounding differs.

#include <loco/error.hpp>
#include <loco/linalg/gemm.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace loco::linalg {

// One iteration's coefficients: X <- a X + (b A + c A A) X.
struct ns_row {
    float a = 0.0f;
    float b = 0.0f;
    float c = 0.0f;
    friend constexpr bool operator==(const ns_row&, const ns_row&) = default;
};

// The coefficients of every iteration: iteration i (from 0) uses rows[i], and iterations past
// `count` repeat the last row, so a table of one row is a constant polynomial. A
// default-constructed table is Keller Jordan's constant triple.
struct ns_coefficients {
    static constexpr std::size_t max_rows = 8;

    std::array<ns_row, max_rows> rows{{{3.4445f, -4.7750f, 2.0315f}}};
    std::size_t count = 1;

    // Stays inside `rows` even for a table that validate_newton_schulz would refuse.
    constexpr const ns_row& at(std::size_t iteration) const {
        const std::size_t last = count == 0 ? 0 : std::min(count, max_rows) - 1;
        return rows[std::min(iteration, last)];
    }

    static constexpr ns_coefficients constant(float a, float b, float c) {
        ns_coefficients k;
        k.rows[0] = {a, b, c};
        k.count = 1;
        return k;
    }

    // Keller Jordan's quintic, "Muon: An optimizer for hidden layers in neural networks" (2024),
    // the same for every iteration: torch.optim.Muon's default. Five iterations map every singular
    // value of the normalised input that is at least 0.002 into about [0.68, 1.21].
    static constexpr ns_coefficients keller_jordan() {
        return constant(3.4445f, -4.7750f, 2.0315f);
    }

    // The per-iteration table of the MuLoCo paper code (Therien et al., arXiv 2505.23725;
    // facebookresearch/MuLoCo and bentherien/muloco-1), meant for exactly five iterations. It
    // lands tighter around 1: about [0.98, 1.03] for normalised singular values of at least 0.01.
    static constexpr ns_coefficients muloco() {
        ns_coefficients k;
        k.rows[0] = {4.0848f, -6.8946f, 2.9270f};
        k.rows[1] = {3.9505f, -6.3029f, 2.6377f};
        k.rows[2] = {3.7418f, -5.5913f, 2.3037f};
        k.rows[3] = {2.8769f, -3.1427f, 1.2046f};
        k.rows[4] = {2.8366f, -3.0525f, 1.2012f};
        k.count = 5;
        return k;
    }

    // Compares the rows in use only, so that a table is equal to itself whatever lies unused
    // beyond `count`.
    friend constexpr bool operator==(const ns_coefficients& x, const ns_coefficients& y) {
        if (x.count != y.count) return false;
        for (std::size_t i = 0; i < x.count && i < max_rows; ++i) {
            if (!(x.rows[i] == y.rows[i])) return false;
        }
        return true;
    }
};

// torch.optim.Muon refuses 100 or more iterations; loco keeps the same bound.
inline constexpr int max_ns_steps = 99;

// Throws loco::invalid_argument, prefixed with `who`, for a table or an iteration count that
// cannot be used.
inline void validate_newton_schulz(const ns_coefficients& k, int steps, float eps,
                                   std::string_view who) {
    if (k.count < 1 || k.count > ns_coefficients::max_rows) {
        throw invalid_argument(
            std::string(who) + ": the Newton-Schulz table must have between 1 and " +
            std::to_string(ns_coefficients::max_rows) + " rows, not " + std::to_string(k.count));
    }
    for (std::size_t i = 0; i < k.count; ++i) {
        const ns_row& r = k.rows[i];
        if (!(std::isfinite(r.a) && std::isfinite(r.b) && std::isfinite(r.c))) {
            throw invalid_argument(std::string(who) + ": Newton-Schulz coefficient row " +
                                   std::to_string(i) + " is not finite");
        }
    }
    if (steps < 1 || steps > max_ns_steps) {
        throw invalid_argument(std::string(who) + ": ns_steps must be in [1, " +
                               std::to_string(max_ns_steps) + "], not " + std::to_string(steps));
    }
    if (!(eps > 0.0f && std::isfinite(eps))) {
        throw invalid_argument(std::string(who) + ": eps must be finite and > 0");
    }
}

// The buffers of one orthogonalisation, kept between calls so that a training loop allocates
// them once per matrix shape (they only grow). About (max * min + 2 * min^2 + 64 * min) floats
// for a max x min matrix.
struct ns_workspace {
    std::vector<float> iterate;  // T, n x m
    std::vector<float> gram;     // A = T^T T, m x m
    std::vector<float> poly;     // A A, then b A + c A A, m x m
    std::vector<float> scratch;  // right_multiply's row block

    void reserve_for(std::size_t n, std::size_t m) {
        grow(iterate, n * m);
        grow(gram, m * m);
        grow(poly, m * m);
        grow(scratch, right_multiply_scratch(m));
    }

private:
    static void grow(std::vector<float>& v, std::size_t size) {
        if (v.size() < size) v.resize(size);
    }
};

// The Frobenius norm, accumulated in double so that the sum of squares neither overflows for
// large entries nor loses the small ones. Not finite when x holds NaN or infinity.
inline double frobenius_norm(const float* x, std::size_t size) {
    double sum = 0.0;
    for (std::size_t i = 0; i < size; ++i) {
        const double v = x[i];
        sum += v * v;
    }
    return std::sqrt(sum);
}

namespace detail {

// out (cols x rows) = in (rows x cols)^T / divisor, in square blocks so that both sides are
// read and written a cache line at a time. The quotient is taken in double because the divisor
// (a norm) may exceed the float range when entries are near it.
inline void transpose_divide(const float* in, std::size_t rows, std::size_t cols, double divisor,
                             float* out) {
    constexpr std::size_t block = 32;
    for (std::size_t i0 = 0; i0 < rows; i0 += block) {
        const std::size_t i1 = std::min(rows, i0 + block);
        for (std::size_t j0 = 0; j0 < cols; j0 += block) {
            const std::size_t j1 = std::min(cols, j0 + block);
            for (std::size_t i = i0; i < i1; ++i) {
                for (std::size_t j = j0; j < j1; ++j) {
                    out[j * rows + i] = static_cast<float>(in[i * cols + j] / divisor);
                }
            }
        }
    }
}

}  // namespace detail

// out = NS(g) for the rows x cols row-major matrix g: g / max(||g||_F, eps), then `steps`
// iterations with the coefficients of `k`. `norm` is ||g||_F, computed by the caller (it has
// usually just checked it for finiteness). g and out may be the same array. Nothing is checked:
// see newton_schulz for the checked entry point.
inline void newton_schulz_unchecked(const float* g, std::size_t rows, std::size_t cols, double norm,
                                    float* out, const ns_coefficients& k, int steps, float eps,
                                    ns_workspace& ws) {
    if (rows == 0 || cols == 0) return;
    const bool wide = rows < cols;
    const std::size_t n = wide ? cols : rows;
    const std::size_t m = wide ? rows : cols;
    ws.reserve_for(n, m);
    float* t = ws.iterate.data();
    float* gram = ws.gram.data();
    float* poly = ws.poly.data();

    // torch.optim.Muon divides by the norm clamped from below by eps (not by norm + eps).
    const double divisor = std::max(norm, static_cast<double>(eps));
    if (wide) {
        detail::transpose_divide(g, rows, cols, divisor, t);
    } else {
        for (std::size_t i = 0; i < n * m; ++i) t[i] = static_cast<float>(g[i] / divisor);
    }

    for (int it = 0; it < steps; ++it) {
        const ns_row& c = k.at(static_cast<std::size_t>(it));
        gram_tn(n, m, t, gram);
        // A is symmetric, so A A = A^T A: the same half-computed product as the Gram matrix.
        gram_tn(m, m, gram, poly);
        for (std::size_t i = 0; i < m * m; ++i) {
            poly[i] = c.b * gram[i] + c.c * poly[i];
        }
        right_multiply(n, m, t, c.a, poly, ws.scratch.data());
    }

    if (wide) {
        detail::transpose_divide(t, n, m, 1.0, out);
    } else {
        std::copy(t, t + n * m, out);
    }
}

// out = NS(g), as above, after checking the arguments: throws loco::invalid_argument for a bad
// table, iteration count or eps, and loco::nonfinite_error, without writing `out`, when g holds
// NaN or infinity. A matrix with no rows or no columns is left alone; a shape whose rows * cols
// overflows std::size_t is a loco::shape_error.
inline void newton_schulz(const float* g, std::size_t rows, std::size_t cols, float* out,
                          const ns_coefficients& k, int steps, float eps, ns_workspace& ws) {
    validate_newton_schulz(k, steps, eps, "loco::linalg::newton_schulz");
    const std::size_t size = loco::detail::matrix_elements(rows, cols);
    if (rows == 0 || cols == 0) return;
    const double norm = frobenius_norm(g, size);
    if (!std::isfinite(norm)) {
        throw nonfinite_error("loco::linalg::newton_schulz: the input holds NaN or infinity");
    }
    newton_schulz_unchecked(g, rows, cols, norm, out, k, steps, eps, ws);
}

}  // namespace loco::linalg
