// Muon (loco::inner::muon) and its Newton-Schulz orthogonalisation (loco::linalg::newton_schulz)
// against a plain double-precision reference written here from torch.optim.Muon's formulas, plus
// closed forms of the iteration:
//   * Newton-Schulz acts on each singular value separately, as the iterated odd quintic
//     phi(x) = a x + b x^3 + c x^5 of the normalised singular value, so a matrix built as
//     U diag(s) V^T must come out as U diag(phi^k(s / ||s||)) V^T; a row or a column vector has
//     one singular value, ||x||, and comes out as phi^k(1) x / ||x||;
//   * with Keller Jordan's coefficients, five iterations put every normalised singular value of
//     at least 0.002 into [0.68, 1.21] (MuLoCo's table: at least 0.01 into [0.97, 1.04]).
//
// Tolerances. loco iterates in fp32, the reference in double. Each product sums at most a few
// hundred terms here, so one iteration is accurate to about 1e-6 relative; the polynomial's slope
// is at most a (about 4) near zero and smaller near 1, and five iterations compound that to a few
// 1e-6 of the largest entry in practice (measured worst: see the MESSAGE lines). The checks use
// 5e-5 of the largest entry of the update, ten times the worst seen. The momentum buffer is plain
// element-wise arithmetic: 2e-6 relative per step.
#include <doctest/doctest.h>

#include "support/compare.hpp"
#include "support/muon_reference.hpp"
#include "support/random.hpp"

#include <loco/groups.hpp>
#include <loco/inner/adamw.hpp>
#include <loco/inner/muon.hpp>
#include <loco/linalg/newton_schulz.hpp>
#include <loco/optimizer.hpp>
#include <loco/params.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace loco_test;
using loco::inner::lr_adjustment;
using loco::inner::muon;
using loco::linalg::ns_coefficients;

// ---- the double-precision reference: tests/support/muon_reference.hpp ---------------------------

using namespace loco_test::muon_ref;

// ---- closed forms and spectra ------------------------------------------------------------------

double phi_iterated(const ns_coefficients& k, int steps, double x) {
    for (int it = 0; it < steps; ++it) {
        const auto [a, b, c] = coeff_at(k, it);
        x = a * x + b * x * x * x + c * x * x * x * x * x;
    }
    return x;
}

// `count` orthonormal columns of length `len` (len x count, row-major), by Gram-Schmidt twice.
dmatrix orthonormal_columns(std::mt19937_64& rng, std::size_t len, std::size_t count) {
    std::normal_distribution<double> d;
    dmatrix q(len * count);
    for (double& v : q) v = d(rng);
    for (std::size_t j = 0; j < count; ++j) {
        for (int pass = 0; pass < 2; ++pass) {
            for (std::size_t l = 0; l < j; ++l) {
                double dot = 0.0;
                for (std::size_t i = 0; i < len; ++i) dot += q[i * count + j] * q[i * count + l];
                for (std::size_t i = 0; i < len; ++i) q[i * count + j] -= dot * q[i * count + l];
            }
        }
        double sq = 0.0;
        for (std::size_t i = 0; i < len; ++i) sq += q[i * count + j] * q[i * count + j];
        for (std::size_t i = 0; i < len; ++i) q[i * count + j] /= std::sqrt(sq);
    }
    return q;
}

// u diag(s) v^T for u of rows x m, v of cols x m.
dmatrix compose(const dmatrix& u, const std::vector<double>& s, const dmatrix& v, std::size_t rows,
                std::size_t cols) {
    const std::size_t m = s.size();
    dmatrix x(rows * cols, 0.0);
    for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t j = 0; j < cols; ++j)
            for (std::size_t l = 0; l < m; ++l)
                x[i * cols + j] += u[i * m + l] * s[l] * v[j * m + l];
    return x;
}

// The eigenvalues of a symmetric m x m matrix by cyclic Jacobi rotations.
std::vector<double> symmetric_eigenvalues(dmatrix a, std::size_t m) {
    for (int sweep = 0; sweep < 100; ++sweep) {
        double off = 0.0;
        for (std::size_t p = 0; p < m; ++p)
            for (std::size_t q = p + 1; q < m; ++q) off += a[p * m + q] * a[p * m + q];
        if (off < 1e-30) break;
        for (std::size_t p = 0; p < m; ++p) {
            for (std::size_t q = p + 1; q < m; ++q) {
                const double apq = a[p * m + q];
                if (std::abs(apq) < 1e-300) continue;
                const double theta = (a[q * m + q] - a[p * m + p]) / (2.0 * apq);
                const double t =
                    (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
                const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
                for (std::size_t k = 0; k < m; ++k) {  // columns p and q
                    const double akp = a[k * m + p], akq = a[k * m + q];
                    a[k * m + p] = c * akp - s * akq;
                    a[k * m + q] = s * akp + c * akq;
                }
                for (std::size_t k = 0; k < m; ++k) {  // rows p and q
                    const double apk = a[p * m + k], aqk = a[q * m + k];
                    a[p * m + k] = c * apk - s * aqk;
                    a[q * m + k] = s * apk + c * aqk;
                }
            }
        }
    }
    std::vector<double> ev(m);
    for (std::size_t i = 0; i < m; ++i) ev[i] = a[i * m + i];
    return ev;
}

// The min(rows, cols) singular values of x.
std::vector<double> singular_values(const dmatrix& x, std::size_t rows, std::size_t cols) {
    const bool wide = rows <= cols;
    const std::size_t m = wide ? rows : cols;
    const dmatrix xt = transpose(x, rows, cols);
    const dmatrix gram = wide ? matmul(x, xt, rows, cols, rows) : matmul(xt, x, cols, rows, cols);
    std::vector<double> sv = symmetric_eigenvalues(gram, m);
    for (double& s : sv) s = std::sqrt(std::max(0.0, s));
    return sv;
}

// ---- helpers ------------------------------------------------------------------------------------

dmatrix to_double(const std::vector<float>& x) { return dmatrix(x.begin(), x.end()); }
std::vector<float> to_float(const dmatrix& x) {
    std::vector<float> f(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) f[i] = static_cast<float>(x[i]);
    return f;
}
double max_abs(const dmatrix& x) {
    double m = 0.0;
    for (const double v : x) m = std::max(m, std::abs(v));
    return m;
}
// max |got - want| / max |want|
double scaled_error(const std::vector<float>& got, const dmatrix& want) {
    double e = 0.0;
    for (std::size_t i = 0; i < want.size(); ++i)
        e = std::max(e, std::abs(double(got[i]) - want[i]));
    return e / std::max(max_abs(want), 1e-300);
}

struct shape {
    std::size_t rows, cols;
};
const shape shapes[] = {{16, 16}, {48, 16}, {16, 48}, {1, 7}, {7, 1}, {65, 33}, {33, 65}, {1, 1}};

// Fresh float inputs for one orthogonalisation, stored in float so both sides see the same data.
std::vector<float> orthogonalise(const std::vector<float>& g, shape s, const ns_coefficients& k,
                                 int steps, float eps, loco::linalg::ns_workspace& ws) {
    std::vector<float> out(g.size());
    loco::linalg::newton_schulz(g.data(), s.rows, s.cols, out.data(), k, steps, eps, ws);
    return out;
}

constexpr double ns_tol = 5e-5;  // of the largest entry; see the file comment

}  // namespace

// ---- Newton-Schulz ------------------------------------------------------------------------------

TEST_CASE("muon: Newton-Schulz in fp32 matches the double-precision reference") {
    auto rng = rng_for("muon/ns-reference");
    loco::linalg::ns_workspace ws;  // shared across shapes: it grows and is reused
    double worst = 0.0;
    for (const auto& k : {ns_coefficients::keller_jordan(), ns_coefficients::muloco()}) {
        for (const int steps : {1, 5, 7}) {
            for (const shape s : shapes) {
                const auto g = normal_floats(rng, s.rows * s.cols);
                const auto got = orthogonalise(g, s, k, steps, 1e-7f, ws);
                const auto want = reference_ns(to_double(g), s.rows, s.cols, k, steps, 1e-7);
                const double e = scaled_error(got, want);
                INFO("shape " << s.rows << " x " << s.cols << ", " << k.count
                              << "-row table, steps " << steps << ": scaled error " << e);
                CHECK(e <= ns_tol);
                worst = std::max(worst, e);
            }
        }
    }
    MESSAGE("worst fp32 Newton-Schulz error, relative to the largest entry: " << worst);
}

TEST_CASE("muon: Newton-Schulz of a vector is phi^k(1) times the unit vector") {
    auto rng = rng_for("muon/ns-vector");
    loco::linalg::ns_workspace ws;
    for (const auto& k : {ns_coefficients::keller_jordan(), ns_coefficients::muloco()}) {
        const double scale = phi_iterated(k, 5, 1.0);
        for (const shape s :
             {shape{1, 1}, shape{1, 7}, shape{9, 1}, shape{1, 300}, shape{300, 1}}) {
            const auto g = normal_floats(rng, s.rows * s.cols, 3.0f);
            const auto got = orthogonalise(g, s, k, 5, 1e-7f, ws);
            double norm = 0.0;
            for (const float v : g) norm += double(v) * double(v);
            norm = std::sqrt(norm);
            dmatrix want(g.size());
            for (std::size_t i = 0; i < g.size(); ++i) want[i] = scale * g[i] / norm;
            INFO("shape " << s.rows << " x " << s.cols << ", " << k.count << "-row table");
            CHECK(scaled_error(got, want) <= 1e-5);
        }
    }
    // phi^5(1) for the two tables, from the coefficients.
    CHECK(phi_iterated(ns_coefficients::keller_jordan(), 5, 1.0) ==
          doctest::Approx(0.6964).epsilon(1e-4));
    CHECK(phi_iterated(ns_coefficients::muloco(), 5, 1.0) == doctest::Approx(0.9783).epsilon(1e-4));
}

TEST_CASE("muon: Newton-Schulz maps U diag(s) V^T to U diag(phi^k(s / |s|)) V^T") {
    auto rng = rng_for("muon/ns-closed-form");
    loco::linalg::ns_workspace ws;
    for (const auto& k : {ns_coefficients::keller_jordan(), ns_coefficients::muloco()}) {
        for (const shape s : {shape{12, 12}, shape{40, 9}, shape{9, 40}, shape{6, 6}}) {
            const std::size_t m = std::min(s.rows, s.cols);
            std::vector<double> sv(m);
            // Normalised, every singular value is at least 0.019, where the slope of phi^5 is below
            // 70 (it reaches about 480 at 0), so the input's float rounding moves the output by at
            // most about 70 * 6e-8.
            std::uniform_real_distribution<double> d(0.2, 3.0);
            for (double& v : sv) v = d(rng);
            // Diagonal (U, V = identity columns) for the square 6 x 6 case, random otherwise.
            const bool diagonal = s.rows == 6;
            dmatrix u(s.rows * m, 0.0), v(s.cols * m, 0.0);
            if (diagonal) {
                for (std::size_t i = 0; i < m; ++i) u[i * m + i] = v[i * m + i] = 1.0;
                sv[1] = -sv[1];  // a negative diagonal entry: phi is odd, its sign survives
            } else {
                u = orthonormal_columns(rng, s.rows, m);
                v = orthonormal_columns(rng, s.cols, m);
            }
            const auto g = to_float(compose(u, sv, v, s.rows, s.cols));
            double fro = 0.0;
            for (const double x : sv) fro += x * x;
            fro = std::sqrt(fro);
            std::vector<double> mapped(m);
            for (std::size_t i = 0; i < m; ++i) {
                const double x = std::abs(sv[i]) / fro;
                mapped[i] = (sv[i] < 0 ? -1.0 : 1.0) * phi_iterated(k, 5, x);
            }
            const dmatrix want = compose(u, mapped, v, s.rows, s.cols);
            INFO("shape " << s.rows << " x " << s.cols << ", " << k.count << "-row table");
            // The float input is the composed matrix rounded, so the closed form holds to about
            // 1e-7 times the slope of phi^5 (at most about 500 near 0, here far smaller).
            CHECK(scaled_error(orthogonalise(g, s, k, 5, 1e-7f, ws), want) <= ns_tol);
            CHECK(scaled_error(to_float(reference_ns(to_double(g), s.rows, s.cols, k, 5, 1e-7)),
                               want) <= ns_tol);
            if (diagonal) {
                const auto got = orthogonalise(g, s, k, 5, 1e-7f, ws);
                for (std::size_t i = 0; i < m; ++i)
                    for (std::size_t j = 0; j < m; ++j)
                        if (i != j) CHECK(std::abs(got[i * m + j]) <= 1e-6f);
            }
        }
    }
}

TEST_CASE("muon: five iterations put the singular values in the published band") {
    auto rng = rng_for("muon/ns-band");
    loco::linalg::ns_workspace ws;
    struct band {
        ns_coefficients k;
        double lo, hi;
    };
    // From the scalar map phi^5 over normalised singular values in [0.01, 1]; Gaussian matrices
    // with an aspect ratio of 3 have all of theirs in about [0.1, 0.4].
    for (const band& b : {band{ns_coefficients::keller_jordan(), 0.68, 1.21},
                          band{ns_coefficients::muloco(), 0.97, 1.04}}) {
        for (const shape s : {shape{16, 48}, shape{48, 16}, shape{30, 90}}) {
            for (int trial = 0; trial < 3; ++trial) {
                const auto g = normal_floats(rng, s.rows * s.cols);
                const auto in_sv = singular_values(to_double(g), s.rows, s.cols);
                double fro = 0.0;
                for (const double x : in_sv) fro += x * x;
                REQUIRE(*std::min_element(in_sv.begin(), in_sv.end()) / std::sqrt(fro) >= 0.01);

                const auto ref = reference_ns(to_double(g), s.rows, s.cols, b.k, 5, 1e-7);
                const auto got = to_double(orthogonalise(g, s, b.k, 5, 1e-7f, ws));
                for (const auto* x : {&ref, &got}) {
                    const auto sv = singular_values(*x, s.rows, s.cols);
                    const auto [lo, hi] = std::minmax_element(sv.begin(), sv.end());
                    INFO("shape " << s.rows << " x " << s.cols << ", " << b.k.count
                                  << "-row table, " << (x == &ref ? "reference" : "loco")
                                  << ": singular values in [" << *lo << ", " << *hi << "]");
                    CHECK(*lo >= b.lo);
                    CHECK(*hi <= b.hi);
                }
            }
        }
    }
}

TEST_CASE("muon: Newton-Schulz edge cases") {
    loco::linalg::ns_workspace ws;
    const auto k = ns_coefficients::keller_jordan();

    SUBCASE("a zero matrix stays zero: the norm is clamped at eps") {
        std::vector<float> g(12, 0.0f), out(12, 1.0f);
        loco::linalg::newton_schulz(g.data(), 3, 4, out.data(), k, 5, 1e-7f, ws);
        CHECK(out == std::vector<float>(12, 0.0f));
    }
    SUBCASE("entries near the float limit neither overflow nor lose the direction") {
        auto rng = rng_for("muon/ns-huge");
        const auto g = normal_floats(rng, 6 * 10);
        std::vector<float> big(g.size());
        for (std::size_t i = 0; i < g.size(); ++i) big[i] = g[i] * 1e37f;
        const auto want = reference_ns(to_double(g), 6, 10, k, 5, 1e-7);
        CHECK(scaled_error(orthogonalise(big, {6, 10}, k, 5, 1e-7f, ws), want) <= ns_tol);
    }
    SUBCASE("entries whose norm exceeds the float range are divided in double") {
        // Entries up to 3e38: the norm (about 1e39) is no float, the quotients are.
        auto rng = rng_for("muon/ns-norm-past-float");
        for (const shape s : {shape{6, 10}, shape{10, 6}}) {
            auto g = normal_floats(rng, s.rows * s.cols);
            for (float& v : g) v = std::clamp(v, -3.0f, 3.0f);
            std::vector<float> big(g.size());
            for (std::size_t i = 0; i < g.size(); ++i) big[i] = g[i] * 1e38f;
            REQUIRE(loco::linalg::frobenius_norm(big.data(), big.size()) >
                    double(std::numeric_limits<float>::max()));
            const auto want = reference_ns(to_double(g), s.rows, s.cols, k, 5, 1e-7);
            INFO("shape " << s.rows << " x " << s.cols);
            CHECK(scaled_error(orthogonalise(big, s, k, 5, 1e-7f, ws), want) <= ns_tol);
        }
    }
    SUBCASE("no rows or no columns: nothing to do") {
        CHECK_NOTHROW(loco::linalg::newton_schulz(nullptr, 0, 5, nullptr, k, 5, 1e-7f, ws));
        CHECK_NOTHROW(loco::linalg::newton_schulz(nullptr, 5, 0, nullptr, k, 5, 1e-7f, ws));
    }
    SUBCASE("non-finite input throws without writing the output") {
        std::vector<float> g(8, 1.0f), out(8, 2.0f);
        g[3] = std::numeric_limits<float>::quiet_NaN();
        CHECK_THROWS_AS(loco::linalg::newton_schulz(g.data(), 2, 4, out.data(), k, 5, 1e-7f, ws),
                        loco::nonfinite_error);
        g[3] = -std::numeric_limits<float>::infinity();
        CHECK_THROWS_AS(loco::linalg::newton_schulz(g.data(), 2, 4, out.data(), k, 5, 1e-7f, ws),
                        loco::nonfinite_error);
        CHECK(out == std::vector<float>(8, 2.0f));
    }
    SUBCASE("in place, and a table shorter than the step count repeats its last row") {
        auto rng = rng_for("muon/ns-inplace");
        auto g = normal_floats(rng, 5 * 3);
        const auto want = reference_ns(to_double(g), 5, 3, ns_coefficients::muloco(), 8, 1e-7);
        loco::linalg::newton_schulz(g.data(), 5, 3, g.data(), ns_coefficients::muloco(), 8, 1e-7f,
                                    ws);
        CHECK(scaled_error(g, want) <= ns_tol);
        CHECK(ns_coefficients::muloco().at(7) == ns_coefficients::muloco().rows[4]);
    }
}

// torch.optim.Muon divides by max(||G||, eps). A norm below eps is not divided out: the
// normalised input keeps the singular value ||G|| / eps, which the iteration maps like any other.
// A vector has one singular value, so the result is phi^k(||g|| / eps) g / ||g||.
TEST_CASE("muon: Newton-Schulz of an input whose norm is below eps divides by eps") {
    auto rng = rng_for("muon/ns-below-eps");
    loco::linalg::ns_workspace ws;
    for (const auto& k : {ns_coefficients::keller_jordan(), ns_coefficients::muloco()}) {
        for (const float eps : {1e-7f, 4.0f}) {
            for (const shape s : {shape{1, 9}, shape{9, 1}}) {
                auto g = normal_floats(rng, s.rows * s.cols);
                double norm = 0.0;
                for (const float v : g) norm += double(v) * double(v);
                // Scale the input to a norm of about eps / 4: the normalised singular value is
                // 0.25 where the iteration's slope is moderate.
                const float to = static_cast<float>(0.25 * double(eps) / std::sqrt(norm));
                for (float& v : g) v *= to;
                norm = 0.0;
                for (const float v : g) norm += double(v) * double(v);
                norm = std::sqrt(norm);
                REQUIRE(norm < double(eps));
                const double scale = phi_iterated(k, 5, norm / double(eps));
                dmatrix want(g.size());
                for (std::size_t i = 0; i < g.size(); ++i) want[i] = scale * g[i] / norm;
                INFO("shape " << s.rows << " x " << s.cols << ", eps " << eps << ", "
                              << k.count << "-row table");
                CHECK(scaled_error(orthogonalise(g, s, k, 5, eps, ws), want) <= 1e-5);
            }
            // A matrix against the reference, which clamps the same way.
            auto g = normal_floats(rng, 6 * 10);
            for (float& v : g) v *= eps * 0.02f;  // norm about 0.15 eps
            const auto want = reference_ns(to_double(g), 6, 10, k, 5, double(eps));
            INFO("6 x 10, eps " << eps << ", " << k.count << "-row table");
            CHECK(scaled_error(orthogonalise(g, {6, 10}, k, 5, eps, ws), want) <= ns_tol);
        }
    }
    // Through a Muon step: momentum 0, no decay, a 1 x 5 gradient of norm eps / 4.
    std::vector<float> g = {0.1f, -0.2f, 0.3f, 0.4f, -0.5f}, p(5, 0.0f), buf(5, 0.0f);
    double norm = 0.0;
    for (const float v : g) norm += double(v) * double(v);
    norm = std::sqrt(norm);
    const muon::hyper h{.lr = 0.1f, .weight_decay = 0.0f, .momentum = 0.0f,
                        .eps = static_cast<float>(4.0 * norm)};
    loco::inner::muon_workspace mws;
    muon::update_matrix(h, 1, p.data(), g.data(), buf.data(), 1, 5, mws);
    const double scale = phi_iterated(h.coefficients, 5, norm / double(h.eps));
    dmatrix want(5);
    for (std::size_t i = 0; i < 5; ++i) want[i] = -0.1 * scale * g[i] / norm;
    CHECK(scaled_error(p, want) <= 1e-5);
}

// The MuLoCo table against the one published with the paper code (Therien et al.,
// facebookresearch/MuLoCo dion_optimizer/muon.py; /work/shared/reference/algorithms.md, section
// 4.2), entry by entry: the Newton-Schulz reference uses the same table, so only a literal
// comparison sees a mistyped digit.
TEST_CASE("muon: MuLoCo's Newton-Schulz table is the published one") {
    const float published[5][3] = {{4.0848f, -6.8946f, 2.9270f},
                                   {3.9505f, -6.3029f, 2.6377f},
                                   {3.7418f, -5.5913f, 2.3037f},
                                   {2.8769f, -3.1427f, 1.2046f},
                                   {2.8366f, -3.0525f, 1.2012f}};
    const auto k = ns_coefficients::muloco();
    REQUIRE(k.count == 5);
    for (std::size_t i = 0; i < 5; ++i) {
        INFO("row " << i);
        CHECK(k.rows[i].a == published[i][0]);
        CHECK(k.rows[i].b == published[i][1]);
        CHECK(k.rows[i].c == published[i][2]);
    }
}

// Tables are equal when their counts and every row in use are; the rows past `count` do not
// matter. The CUDA engine re-uploads its coefficients only when the table differs
// (detail::same_hyper), so a comparison that missed a row would keep stale coefficients.
TEST_CASE("muon: Newton-Schulz tables compare every row in use and nothing past it") {
    const auto kj = ns_coefficients::keller_jordan();
    CHECK(ns_coefficients::constant(3.4445f, -4.7750f, 2.0315f) == kj);
    CHECK_FALSE(ns_coefficients::constant(3.4445f, -4.7750f, 2.0f) == kj);
    CHECK_FALSE(ns_coefficients::constant(3.0f, -4.7750f, 2.0315f) == kj);
    auto padded = kj;
    padded.rows[1] = {9.0f, 9.0f, 9.0f};  // past count: unused
    CHECK(padded == kj);
    for (std::size_t row = 0; row < 5; ++row) {
        auto changed = ns_coefficients::muloco();
        changed.rows[row].b += 0.5f;
        INFO("row " << row << " changed");
        CHECK_FALSE(changed == ns_coefficients::muloco());
        CHECK_FALSE(ns_coefficients::muloco() == changed);
    }
    auto longer = ns_coefficients::muloco();
    longer.count = 6;
    longer.rows[5] = longer.rows[4];
    CHECK_FALSE(longer == ns_coefficients::muloco());
}

// The largest table (max_rows = 8 rows) is accepted and used row by row; a non-finite entry in
// any row, the last included, and an eps that is not finite are refused.
TEST_CASE("muon: the Newton-Schulz table may fill every row, and every row is checked") {
    ns_coefficients full;
    full.count = ns_coefficients::max_rows;
    for (std::size_t i = 0; i < full.count; ++i) {
        // Keller Jordan's quintic, softened a little more each row: a different row per iteration.
        const float t = 1.0f - 0.05f * static_cast<float>(i);
        full.rows[i] = {3.4445f * t + 1.5f * (1.0f - t), -4.7750f * t - 0.5f * (1.0f - t),
                        2.0315f * t};
    }
    CHECK_NOTHROW(muon::validate({.coefficients = full, .ns_steps = 8}));
    CHECK_NOTHROW(loco::linalg::validate_newton_schulz(full, 8, 1e-7f, "test"));
    auto rng = rng_for("muon/ns-eight-rows");
    loco::linalg::ns_workspace ws;
    for (const shape s : {shape{12, 20}, shape{20, 12}}) {
        const auto g = normal_floats(rng, s.rows * s.cols);
        const auto want = reference_ns(to_double(g), s.rows, s.cols, full, 8, 1e-7);
        INFO("shape " << s.rows << " x " << s.cols);
        CHECK(scaled_error(orthogonalise(g, s, full, 8, 1e-7f, ws), want) <= ns_tol);
        // The last row matters: the same table with its last row replaced gives another result.
        auto other = full;
        other.rows[7] = {1.0f, 0.0f, 0.0f};
        CHECK(scaled_error(orthogonalise(g, s, other, 8, 1e-7f, ws), want) > 100 * ns_tol);
    }

    const float inf = std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (std::size_t row = 0; row < full.count; ++row) {
        for (const float bad : {inf, nan}) {
            auto k = full;
            k.rows[row].c = bad;
            INFO("row " << row);
            const std::string what = "row " + std::to_string(row) + " is not finite";
            CHECK_THROWS_WITH_AS(muon::validate({.coefficients = k}),
                                 doctest::Contains(what.c_str()), loco::invalid_argument);
        }
    }
    auto one = ns_coefficients::keller_jordan();
    one.rows[0].a = nan;
    CHECK_THROWS_AS(muon::validate({.coefficients = one}), loco::invalid_argument);

    CHECK_THROWS_WITH_AS(muon::validate({.eps = inf}), doctest::Contains("eps must be"),
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(muon::validate({.eps = nan}), doctest::Contains("eps must be"),
                         loco::invalid_argument);
    std::vector<float> g(6, 1.0f), out(6, 2.0f);
    CHECK_THROWS_AS(loco::linalg::newton_schulz(g.data(), 2, 3, out.data(),
                                                ns_coefficients::keller_jordan(), 5, inf, ws),
                    loco::invalid_argument);
    CHECK(out == std::vector<float>(6, 2.0f));
}

// ---- Muon ---------------------------------------------------------------------------------------

TEST_CASE("muon: hyper-parameters are PyTorch's defaults") {
    const muon::hyper h;
    CHECK(h.lr == 1e-3f);
    CHECK(h.weight_decay == 0.1f);
    CHECK(h.momentum == 0.95f);
    CHECK(h.nesterov);
    CHECK(h.coefficients == ns_coefficients::keller_jordan());
    CHECK(h.coefficients.count == 1);
    CHECK(h.coefficients.rows[0] == loco::linalg::ns_row{3.4445f, -4.7750f, 2.0315f});
    CHECK(h.eps == 1e-7f);
    CHECK(h.ns_steps == 5);
    CHECK(h.adjust_lr == lr_adjustment::original);
    CHECK(ns_coefficients{} == ns_coefficients::keller_jordan());
    CHECK_FALSE(ns_coefficients::muloco() == ns_coefficients::keller_jordan());
    static_assert(muon::state_size == 1);
    static_assert(muon::name == "muon");
    static_assert(std::is_aggregate_v<muon::hyper>);
    static_assert(std::is_same_v<muon::workspace, loco::inner::muon_workspace>);
    // Designated initializers in declaration order (PyTorch's argument order).
    constexpr muon::hyper custom{.lr = 0.02f,
                                 .momentum = 0.9f,
                                 .nesterov = false,
                                 .coefficients = ns_coefficients::muloco(),
                                 .adjust_lr = lr_adjustment::match_rms_adamw};
    CHECK(custom.weight_decay == 0.1f);
    CHECK(custom.coefficients.count == 5);
    CHECK_NOTHROW(muon::validate(custom));
}

TEST_CASE("muon: the learning-rate adjustments") {
    // 48 x 16 (tall), 16 x 48 (wide)
    CHECK(muon::lr_factor(lr_adjustment::original, 48, 16) == doctest::Approx(std::sqrt(3.0)));
    CHECK(muon::lr_factor(lr_adjustment::original, 16, 48) == 1.0);
    CHECK(muon::lr_factor(lr_adjustment::match_rms_adamw, 16, 48) ==
          doctest::Approx(0.2 * std::sqrt(48.0)));
    CHECK(muon::lr_factor(lr_adjustment::match_rms_adamw, 48, 16) ==
          doctest::Approx(0.2 * std::sqrt(48.0)));
    CHECK(muon::lr_factor(lr_adjustment::spectral_norm, 16, 48) ==
          doctest::Approx(std::sqrt(1.0 / 3.0)));
    const auto k = muon::prepare({.lr = 0.5f, .weight_decay = 0.2f}, 48, 16);
    CHECK(k.decay == doctest::Approx(0.9));
    CHECK(k.step == doctest::Approx(0.5 * std::sqrt(3.0)));
}

namespace {

struct muon_case {
    ns_coefficients coefficients;
    lr_adjustment adjust;
    bool nesterov;
    float weight_decay;
};

std::string describe(const muon_case& c, shape s) {
    return std::to_string(s.rows) + " x " + std::to_string(s.cols) + ", " +
           (c.coefficients.count == 1 ? "Keller Jordan" : "MuLoCo") + " coefficients, adjust " +
           std::to_string(static_cast<int>(c.adjust)) + (c.nesterov ? ", nesterov" : "") + ", wd " +
           std::to_string(c.weight_decay);
}

}  // namespace

// Every option combination on every small shape, and on the two larger ones (which cost most of
// the time in a sanitized debug build) with Nesterov and decay on; three steps each. Each step of
// the reference starts from loco's float state, so only that step's arithmetic is compared; lr is
// large (0.2) so that the update, not the parameter's own rounding, dominates the comparison.
TEST_CASE("muon: each step matches the double-precision reference") {
    auto rng = rng_for("muon/steps");
    loco::inner::muon_workspace ws;  // one for every case and shape, as a training loop would
    std::vector<muon_case> cases;
    for (const auto& k : {ns_coefficients::keller_jordan(), ns_coefficients::muloco()})
        for (const auto adjust : {lr_adjustment::original, lr_adjustment::match_rms_adamw,
                                  lr_adjustment::spectral_norm})
            for (const bool nesterov : {true, false})
                for (const float wd : {0.0f, 0.5f}) cases.push_back({k, adjust, nesterov, wd});

    double worst_update = 0.0, worst_momentum = 0.0;
    int steps = 0, undetermined = 0;
    for (const auto& c : cases) {
        const muon::hyper h{.lr = 0.2f,
                            .weight_decay = c.weight_decay,
                            .momentum = 0.9f,
                            .nesterov = c.nesterov,
                            .coefficients = c.coefficients,
                            .adjust_lr = c.adjust};
        for (const shape s : shapes) {
            const bool large = s.rows * s.cols > 1000;
            if (large && !(c.nesterov && c.weight_decay > 0.0f)) continue;
            INFO(describe(c, s));
            const std::size_t size = s.rows * s.cols;
            auto p = normal_floats(rng, size);
            std::vector<float> buf(size, 0.0f);
            for (std::uint64_t t = 1; t <= 3; ++t) {
                const auto g = normal_floats(rng, size, 0.5f);
                dmatrix p_ref = to_double(p), buf_ref = to_double(buf);
                const dmatrix p_before = p_ref, buf_before = buf_ref;
                muon::update_matrix(h, t, p.data(), g.data(), buf.data(), s.rows, s.cols, ws);
                reference_step(h, p_ref, g, buf_ref, s.rows, s.cols);
                ++steps;

                // How well float arithmetic fixes the direction Newton-Schulz orthogonalises:
                // the momentum (and Nesterov's blend) is formed in float, each element within
                // a rounding of its terms' size. When the terms cancel to almost nothing (a
                // 1 x 1 seed gave a momentum of 4.5e-8 from terms near 0.1) that direction is
                // rounding noise, which five Newton-Schulz steps amplify, and no tolerance on
                // the parameter holds; such steps are counted (rare, checked below) and their
                // momentum is still compared.
                const double mu = h.momentum;
                double noise = 0.0, norm = 0.0;
                for (std::size_t i = 0; i < size; ++i) {
                    double terms = mu * std::abs(buf_before[i]) + (1.0 - mu) * std::abs(g[i]);
                    double u = buf_ref[i];
                    if (h.nesterov) {
                        terms = (1.0 - mu) * std::abs(g[i]) + mu * terms;
                        u = (1.0 - mu) * g[i] + mu * buf_ref[i];
                    }
                    noise += (0x1p-24 * terms) * (0x1p-24 * terms);
                    norm += u * u;
                }
                const bool determined = std::sqrt(noise) <= 1e-5 * std::sqrt(norm);
                // The parameter, against the size of this step's two terms: the orthogonalised
                // update and the decay (not their sum, which cancels for a parameter near
                // -update / (lr * wd)). On top, three float roundings of the parameter's size
                // are allowed: the decay factor 1 - lr * wd (rounded to float, as PyTorch's
                // scalar is for a float tensor), the decayed parameter, and the difference.
                const double decay = double(h.lr) * double(h.weight_decay);
                double scale = 0.0;
                for (std::size_t i = 0; i < size; ++i) {
                    const double decay_term = decay * p_before[i];
                    const double update_term = p_before[i] - decay_term - p_ref[i];
                    scale = std::max({scale, std::abs(decay_term), std::abs(update_term)});
                }
                double e = 0.0;
                for (std::size_t i = 0; i < size; ++i) {
                    const double rounding = 3.0 * 0x1p-24 * std::max(1.0, std::abs(p_ref[i]));
                    e = std::max(
                        e, std::max(0.0, std::abs(double(p[i]) - p_ref[i]) - rounding) / scale);
                }
                INFO("step " << t << ": parameter error " << e << " of the step size");
                if (determined) {
                    worst_update = std::max(worst_update, e);
                    CHECK(e <= ns_tol);
                } else {
                    ++undetermined;
                }

                mismatch_log log;
                for (std::size_t i = 0; i < size; ++i) {
                    log.expect_close(buf[i], buf_ref[i], 2e-6, [&](auto& o) {
                        o << "step " << t << ", momentum[" << i << "]";
                    });
                    worst_momentum =
                        std::max(worst_momentum, std::abs(buf[i] - buf_ref[i]) /
                                                     std::max(1.0, std::abs(buf_ref[i])));
                }
                log.check();
            }
        }
    }
    MESSAGE("worst parameter error, relative to the step: "
            << worst_update << "; worst momentum error: " << worst_momentum << "; "
            << undetermined << " of " << steps << " steps with a cancelled momentum");
    CHECK(undetermined * 100 <= steps);  // a rare draw, not a way to pass
}

// A whole trajectory without re-synchronising: float and double drift apart slowly (each step's
// Newton-Schulz error is a few 1e-6 of the step; the parameter's rounding adds about 1e-7 per
// step), so after 30 steps the parameters agree to 1e-4 of the distance travelled.
TEST_CASE("muon: a 30-step trajectory stays with the double-precision reference") {
    auto rng = rng_for("muon/trajectory");
    loco::inner::muon_workspace ws;
    for (const auto& k : {ns_coefficients::keller_jordan(), ns_coefficients::muloco()}) {
        for (const shape s : {shape{33, 65}, shape{48, 16}, shape{16, 16}, shape{1, 7}}) {
            const muon::hyper h{.lr = 0.05f, .weight_decay = 0.1f, .coefficients = k};
            const std::size_t size = s.rows * s.cols;
            auto p = normal_floats(rng, size);
            std::vector<float> buf(size, 0.0f);
            dmatrix p_ref = to_double(p), buf_ref(size, 0.0);
            const dmatrix p0 = p_ref;
            for (std::uint64_t t = 1; t <= 30; ++t) {
                const auto g = normal_floats(rng, size, 0.5f);
                muon::update_matrix(h, t, p.data(), g.data(), buf.data(), s.rows, s.cols, ws);
                reference_step(h, p_ref, g, buf_ref, s.rows, s.cols);
            }
            double travelled = 0.0, e = 0.0;
            for (std::size_t i = 0; i < size; ++i) {
                travelled = std::max(travelled, std::abs(p_ref[i] - p0[i]));
                e = std::max(e, std::abs(double(p[i]) - p_ref[i]));
            }
            INFO("shape " << s.rows << " x " << s.cols << ", " << k.count << "-row table: error "
                          << e / travelled << " of the distance travelled");
            CHECK(e <= 1e-4 * travelled);
        }
    }
}

// A (L, rows, cols) tensor registered as a stack is L matrices: each is orthogonalised on its
// own, with its own learning-rate factor, exactly as the reference does for L separate matrices.
// The stacks are a flat tensor and a 2-D view of (L * rows) x cols; the reference runs on each
// slice, re-synchronised every step as in "each step matches the double-precision reference".
TEST_CASE("muon: a stacked (L, rows, cols) tensor is updated as L separate matrices") {
    auto rng = rng_for("muon/stack");
    struct stack_case {
        std::size_t count, rows, cols;
        bool shaped_view;
    };
    const stack_case cases[] = {{3, 5, 7, false}, {4, 9, 4, true}, {2, 33, 17, false}};
    for (const auto adjust : {lr_adjustment::original, lr_adjustment::spectral_norm}) {
        const muon::hyper h{.lr = 0.1f, .weight_decay = 0.2f, .momentum = 0.9f, .adjust_lr = adjust};
        std::vector<std::vector<float>> values, grads;
        for (const auto& c : cases) {
            values.push_back(normal_floats(rng, c.count * c.rows * c.cols));
            grads.emplace_back(c.count * c.rows * c.cols, 0.0f);
        }
        loco::parameter_list params;
        for (std::size_t i = 0; i < std::size(cases); ++i) {
            const auto& c = cases[i];
            const loco::parameter_options o{.role = loco::role::matrix,
                                            .stack = {c.count, c.rows, c.cols}};
            const std::string name = "h.w" + std::to_string(i);
            if (c.shaped_view) {
                params.add_views(name, loco::host_matrix(values[i].data(), c.count * c.rows, c.cols),
                                 loco::host_matrix(static_cast<const float*>(grads[i].data()),
                                                   c.count * c.rows, c.cols),
                                 o);
            } else {
                params.add(name, values[i], grads[i], o);
            }
        }
        loco::optimizer<muon> opt(params, {.inner = h});

        double worst = 0.0, whole_matrix_gap = 0.0;
        for (std::uint64_t t = 1; t <= 3; ++t) {
            for (auto& g : grads) {
                const auto fresh = normal_floats(rng, g.size(), 0.5f);
                std::copy(fresh.begin(), fresh.end(), g.begin());
            }
            // The reference: L separate matrices per tensor, from the state before this step.
            const std::span<const float> state = opt.state(0);
            std::vector<dmatrix> want_p, want_buf, whole_p;
            for (std::size_t i = 0; i < std::size(cases); ++i) {
                const auto& c = cases[i];
                const std::size_t each = c.rows * c.cols;
                const std::size_t offset = params[i].offset;
                dmatrix p_all, buf_all;
                for (std::size_t m = 0; m < c.count; ++m) {
                    dmatrix p(values[i].begin() + m * each, values[i].begin() + (m + 1) * each);
                    dmatrix buf(state.begin() + offset + m * each,
                                state.begin() + offset + (m + 1) * each);
                    const std::vector<float> g(grads[i].begin() + m * each,
                                               grads[i].begin() + (m + 1) * each);
                    reference_step(h, p, g, buf, c.rows, c.cols);
                    p_all.insert(p_all.end(), p.begin(), p.end());
                    buf_all.insert(buf_all.end(), buf.begin(), buf.end());
                }
                want_p.push_back(p_all);
                want_buf.push_back(buf_all);
                // What a stack taken as one (L * rows) x cols matrix would do instead.
                dmatrix whole = to_double(values[i]);
                dmatrix whole_buf(state.begin() + offset, state.begin() + offset + whole.size());
                reference_step(h, whole, grads[i], whole_buf, c.count * c.rows, c.cols);
                whole_p.push_back(whole);
            }
            std::vector<dmatrix> before;
            for (const auto& v : values) before.push_back(to_double(v));

            REQUIRE(opt.step().applied);

            for (std::size_t i = 0; i < std::size(cases); ++i) {
                INFO("stack " << cases[i].count << " x " << cases[i].rows << " x " << cases[i].cols
                              << ", step " << t);
                double scale = 0.0, e = 0.0, gap = 0.0;
                for (std::size_t j = 0; j < values[i].size(); ++j) {
                    scale = std::max(scale, std::abs(want_p[i][j] - before[i][j]));
                }
                for (std::size_t j = 0; j < values[i].size(); ++j) {
                    const double rounding = 3.0 * 0x1p-24 * std::max(1.0, std::abs(want_p[i][j]));
                    e = std::max(e, std::max(0.0, std::abs(values[i][j] - want_p[i][j]) - rounding) /
                                        scale);
                    gap = std::max(gap, std::abs(whole_p[i][j] - want_p[i][j]) / scale);
                }
                worst = std::max(worst, e);
                whole_matrix_gap = std::max(whole_matrix_gap, gap);
                CHECK(e <= ns_tol);
                mismatch_log log;
                const std::span<const float> after = opt.state(0);
                for (std::size_t j = 0; j < values[i].size(); ++j) {
                    log.expect_close(after[params[i].offset + j], want_buf[i][j], 2e-6,
                                     [&](auto& o) { o << "momentum[" << j << "]"; });
                }
                log.check();
            }
        }
        // The check can tell: one big matrix would be far off.
        CHECK(whole_matrix_gap > 100 * ns_tol);
        MESSAGE("stacks: worst error " << worst << " of the step; one-matrix reading is "
                                       << whole_matrix_gap << " off");
    }
}

TEST_CASE("muon: zero gradient and zero momentum leave the parameter alone") {
    std::vector<float> p = {1.0f, -2.0f, 3.0f, 0.5f, 0.25f, -8.0f};
    const auto p0 = p;
    std::vector<float> g(6, 0.0f), buf(6, 0.0f);
    loco::inner::muon_workspace ws;
    muon::update_matrix({.weight_decay = 0.0f}, 1, p.data(), g.data(), buf.data(), 2, 3, ws);
    CHECK(p == p0);
    CHECK(buf == std::vector<float>(6, 0.0f));
    // With decay, only the decay applies.
    muon::update_matrix({.lr = 0.5f, .weight_decay = 0.1f}, 2, p.data(), g.data(), buf.data(), 2, 3,
                        ws);
    for (std::size_t i = 0; i < p.size(); ++i) CHECK(p[i] == p0[i] * 0.95f);
}

TEST_CASE("muon: momentum 0 is plain orthogonalised gradient descent") {
    auto rng = rng_for("muon/momentum-0");
    const std::size_t rows = 9, cols = 5;
    const auto g = normal_floats(rng, rows * cols);
    std::vector<float> p(rows * cols, 0.0f), buf(rows * cols, 0.0f);
    loco::inner::muon_workspace ws;
    const muon::hyper h{.lr = 0.1f, .weight_decay = 0.0f, .momentum = 0.0f};
    muon::update_matrix(h, 1, p.data(), g.data(), buf.data(), rows, cols, ws);
    CHECK(buf == g);  // lerp with weight 1 returns the gradient exactly
    const dmatrix o = reference_ns(to_double(g), rows, cols, h.coefficients, 5, 1e-7);
    dmatrix want(o.size());
    for (std::size_t i = 0; i < o.size(); ++i) want[i] = -0.1 * std::sqrt(9.0 / 5.0) * o[i];
    CHECK(scaled_error(p, want) <= ns_tol);
}

// PyTorch's lerp kernel (ATen/native/Lerp.h) takes start + w (end - start) for |w| < 0.5 and
// end - (end - start) (1 - w) otherwise, so weight exactly 0.5 (momentum 0.5: both of Muon's
// lerps) rounds as end - (end - start) * 0.5f, which differs in the last bit for some pairs.
TEST_CASE("muon: lerp at weight 0.5 rounds as PyTorch's end - (end - start) * 0.5") {
    auto rng = rng_for("muon/lerp-half");
    const std::size_t n = 20000;
    const auto start = normal_floats(rng, n);
    const auto end = normal_floats(rng, n, 1000.0f);  // wide apart: (end - start) rounds
    std::size_t mismatched = 0, other_rounding = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const float e = end[i], st = start[i];
        const float torch_half = e - (e - st) * 0.5f;
        const float from_start = st + 0.5f * (e - st);
        mismatched += std::bit_cast<std::uint32_t>(muon::lerp(st, e, 0.5f)) !=
                      std::bit_cast<std::uint32_t>(torch_half);
        other_rounding += std::bit_cast<std::uint32_t>(from_start) !=
                          std::bit_cast<std::uint32_t>(torch_half);
    }
    CHECK(mismatched == 0);
    CHECK(other_rounding > 0);  // the draw holds pairs where the formula matters

    // Through a step: momentum 0.5 makes the new buffer lerp(buf, g, 1 - 0.5).
    const std::size_t rows = 16, cols = 12;
    auto buf = normal_floats(rng, rows * cols);
    const auto buf0 = buf;
    const auto g = normal_floats(rng, rows * cols, 1000.0f);
    std::vector<float> p = normal_floats(rng, rows * cols);
    loco::inner::muon_workspace ws;
    muon::update_matrix({.lr = 0.01f, .momentum = 0.5f}, 1, p.data(), g.data(), buf.data(), rows,
                        cols, ws);
    std::size_t buffer_mismatched = 0;
    for (std::size_t i = 0; i < buf.size(); ++i) {
        const float torch_half = g[i] - (g[i] - buf0[i]) * 0.5f;
        buffer_mismatched += std::bit_cast<std::uint32_t>(buf[i]) !=
                             std::bit_cast<std::uint32_t>(torch_half);
    }
    CHECK(buffer_mismatched == 0);
}

TEST_CASE("muon: a non-finite gradient or momentum is refused before anything changes") {
    auto rng = rng_for("muon/nonfinite");
    const std::size_t rows = 4, cols = 6;
    auto p = normal_floats(rng, rows * cols);
    auto g = normal_floats(rng, rows * cols);
    auto buf = normal_floats(rng, rows * cols);
    const auto p0 = p, buf0 = buf;
    loco::inner::muon_workspace ws;
    for (const float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity()}) {
        auto g_bad = g;
        g_bad[7] = bad;
        CHECK_THROWS_WITH_AS(
            muon::update_matrix({}, 1, p.data(), g_bad.data(), buf.data(), rows, cols, ws),
            doctest::Contains("4 x 6 matrix holds NaN or infinity"), loco::nonfinite_error);
        auto buf_bad = buf;
        buf_bad[11] = bad;
        CHECK_THROWS_AS(
            muon::update_matrix({}, 1, p.data(), g.data(), buf_bad.data(), rows, cols, ws),
            loco::nonfinite_error);
        CHECK(p == p0);
        CHECK(buf == buf0);
    }
    // Finite, but the blend overflows: refused too.
    std::vector<float> g_big(rows * cols, 3e38f), buf_big(rows * cols, -3e38f);
    CHECK_THROWS_AS(muon::update_matrix({.momentum = 0.5f}, 1, p.data(), g_big.data(),
                                        buf_big.data(), rows, cols, ws),
                    loco::nonfinite_error);
    CHECK(p == p0);
}

// A step of loco::optimizer is all-or-nothing (docs/inner.md): a matrix whose Newton-Schulz input
// overflows although every gradient is finite (the momentum blend g - buf of a large buffer and a
// large gradient of the other sign) refuses the whole step before any matrix, the earlier ones of
// the list and of a stack included, is updated.
namespace overflow_case {

constexpr float huge = 3.4e38f;  // finite; a buffer of the other sign puts g - buf past FLT_MAX

// The rows x cols matrix `a`, then `b`: `count` matrices of rows x cols (a stack when count > 1),
// whose last matrix gets the huge gradient at element `at`.
struct model {
    std::size_t rows, cols, count, at;
    std::vector<float> a, ga, b, gb;
    model(std::mt19937_64& rng, std::size_t count_) : count(count_) {
        rows = std::uniform_int_distribution<std::size_t>(2, 7)(rng);
        cols = std::uniform_int_distribution<std::size_t>(2, 7)(rng);
        at = (count - 1) * rows * cols +
             std::uniform_int_distribution<std::size_t>(0, rows * cols - 1)(rng);
        a = normal_floats(rng, rows * cols);
        b = normal_floats(rng, count * rows * cols);
        ga.resize(a.size());
        gb.resize(b.size());
    }
    // Fresh gradients, with b's element `at` set to `big`.
    void gradients(std::mt19937_64& rng, float big) {
        const auto fa = normal_floats(rng, ga.size(), 0.5f);
        const auto fb = normal_floats(rng, gb.size(), 0.5f);
        std::copy(fa.begin(), fa.end(), ga.begin());
        std::copy(fb.begin(), fb.end(), gb.begin());
        gb[at] = big;
    }
    void add_to(loco::parameter_list& params) {
        params.add_views("a", loco::host_matrix(a.data(), rows, cols),
                         loco::host_matrix(static_cast<const float*>(ga.data()), rows, cols),
                         {.role = loco::role::matrix});
        loco::parameter_options o{.role = loco::role::matrix};
        if (count > 1) o.stack = {count, rows, cols};
        params.add_views("b", loco::host_matrix(b.data(), count * rows, cols),
                         loco::host_matrix(static_cast<const float*>(gb.data()), count * rows, cols),
                         o);
    }
};

std::vector<float> copy_of(std::span<const float> s) { return {s.begin(), s.end()}; }

}  // namespace overflow_case

TEST_CASE("muon: a blend that overflows in a later matrix refuses the whole step") {
    using namespace overflow_case;
    auto rng = rng_for("muon/overflow-all-or-nothing");
    std::uniform_real_distribution<float> mu(0.05f, 0.8f);
    for (const std::size_t count : {std::size_t{1}, std::size_t{3}}) {
        for (const auto policy : {loco::nonfinite_policy::skip, loco::nonfinite_policy::raise,
                                  loco::nonfinite_policy::ignore}) {
            for (const bool nesterov : {true, false}) {
                CAPTURE(count);
                CAPTURE(static_cast<int>(policy));
                CAPTURE(nesterov);
                model m(rng, count);
                loco::parameter_list params;
                m.add_to(params);
                const muon::hyper h{.lr = 0.05f, .weight_decay = 0.1f, .momentum = mu(rng),
                                    .nesterov = nesterov};
                loco::optimizer<muon> opt(params, {.inner = h, .on_nonfinite = policy});
                m.gradients(rng, -huge);  // finite blend: buf = (1 - momentum) * -huge
                REQUIRE(opt.step().applied);

                m.gradients(rng, huge);  // every gradient finite; g - buf overflows
                const auto a0 = m.a, b0 = m.b;
                const auto state0 = copy_of(opt.state(0));
                const char* where = count > 1 ? "'b' (stack index 2 of 3)" : "'b'";
                CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains(where), loco::nonfinite_error);
                CHECK(m.a == a0);  // bit-identical: `a` comes first and was not touched
                CHECK(m.b == b0);  // nor the earlier matrices of the stack
                CHECK(copy_of(opt.state(0)) == state0);
                CHECK(opt.steps() == 1);
                CHECK(opt.skipped_steps() == 0);

                // With b's gradient finite and tame again, the step goes through and equals the
                // update of each matrix on its own from the untouched state.
                m.gb[m.at] = 0.25f;
                auto want_a = m.a, want_b = m.b;
                auto want_state = state0;
                loco::inner::muon_workspace ws;
                const std::size_t each = m.rows * m.cols;
                muon::update_matrix(h, 2, want_a.data(), m.ga.data(),
                                    want_state.data() + params[0].offset, m.rows, m.cols, ws);
                for (std::size_t k = 0; k < count; ++k) {
                    muon::update_matrix(h, 2, want_b.data() + k * each, m.gb.data() + k * each,
                                        want_state.data() + params[1].offset + k * each, m.rows,
                                        m.cols, ws);
                }
                REQUIRE(opt.step().applied);
                CHECK(m.a == want_a);
                CHECK(m.b == want_b);
                CHECK(copy_of(opt.state(0)) == want_state);
                CHECK(opt.steps() == 2);
            }
        }
    }
}

TEST_CASE("muon: with parameter groups a Muon blend that overflows leaves every group unchanged") {
    using namespace overflow_case;
    // AdamW is group 0, so it is applied before the Muon group.
    using inner = loco::groups<loco::group<loco::is_vector, loco::inner::adamw>,
                               loco::group<loco::otherwise, muon>>;
    auto rng = rng_for("muon/overflow-groups");
    std::uniform_real_distribution<float> mu(0.05f, 0.8f);
    for (const std::size_t count : {std::size_t{1}, std::size_t{2}}) {
        for (const auto policy : {loco::nonfinite_policy::skip, loco::nonfinite_policy::raise,
                                  loco::nonfinite_policy::ignore}) {
            CAPTURE(count);
            CAPTURE(static_cast<int>(policy));
            model m(rng, count);
            std::vector<float> bias = normal_floats(rng, 5), gbias(5);
            loco::parameter_list params;
            params.add("bias", bias, gbias, {.role = loco::role::vector});
            m.add_to(params);
            loco::optimizer<inner> opt(
                params, {.inner = {{.lr = 0.01f}, {.lr = 0.05f, .momentum = mu(rng)}},
                         .on_nonfinite = policy});
            REQUIRE(opt.engine_state().group_params<0>().size() == 1);
            REQUIRE(opt.engine_state().group_params<1>().size() == 2);
            const auto fresh_bias = [&] {
                const auto f = normal_floats(rng, gbias.size());
                std::copy(f.begin(), f.end(), gbias.begin());
            };
            fresh_bias();
            m.gradients(rng, -huge);
            REQUIRE(opt.step().applied);

            fresh_bias();
            m.gradients(rng, huge);
            const auto bias0 = bias, a0 = m.a, b0 = m.b;
            const auto& adamw = opt.engine_state().group<0>();
            const auto& mu_group = opt.engine_state().group<1>();
            const auto m0 = copy_of(adamw.state(0)), v0 = copy_of(adamw.state(1));
            const auto buf0 = copy_of(mu_group.state(0));
            CHECK_THROWS_AS(opt.step(), loco::nonfinite_error);
            CHECK(bias == bias0);  // the AdamW group did not move
            CHECK(copy_of(adamw.state(0)) == m0);
            CHECK(copy_of(adamw.state(1)) == v0);
            CHECK(m.a == a0);  // nor any matrix of the Muon group
            CHECK(m.b == b0);
            CHECK(copy_of(mu_group.state(0)) == buf0);
            CHECK(opt.steps() == 1);
            CHECK(opt.skipped_steps() == 0);
        }
    }
}

TEST_CASE("muon: a matrix with no rows or no columns is a no-op") {
    loco::inner::muon_workspace ws;
    CHECK_NOTHROW(muon::update_matrix({}, 1, nullptr, nullptr, nullptr, 0, 7, ws));
    CHECK_NOTHROW(muon::update_matrix({}, 1, nullptr, nullptr, nullptr, 7, 0, ws));
    CHECK(ws.update.empty());
}

TEST_CASE("muon: the workspace is reused across shapes without changing results") {
    auto rng = rng_for("muon/workspace");
    loco::inner::muon_workspace shared;
    for (const shape s : {shape{40, 20}, shape{3, 5}, shape{20, 40}, shape{7, 7}, shape{40, 20}}) {
        const auto g = normal_floats(rng, s.rows * s.cols);
        auto p1 = normal_floats(rng, s.rows * s.cols);
        auto p2 = p1;
        std::vector<float> b1(g.size(), 0.1f), b2(g.size(), 0.1f);
        loco::inner::muon_workspace fresh;
        muon::update_matrix({}, 1, p1.data(), g.data(), b1.data(), s.rows, s.cols, shared);
        muon::update_matrix({}, 1, p2.data(), g.data(), b2.data(), s.rows, s.cols, fresh);
        CHECK(p1 == p2);
        CHECK(b1 == b2);
    }
}

namespace reserve_case {

// Muon that counts the reserve calls, and the updates that had to grow the workspace (a buffer
// moved). Counters are static: the optimizer's workspace is private to it.
struct watched_muon : muon {
    static inline std::size_t reserves = 0;
    static inline std::size_t grown = 0;
    static void reserve(workspace& ws, std::size_t rows, std::size_t cols) {
        ++reserves;
        muon::reserve(ws, rows, cols);
    }
    static void update_matrix(const hyper& h, std::uint64_t step, float* x, const float* g,
                              float* s, std::size_t rows, std::size_t cols, workspace& ws) {
        const auto buffers = [&ws] {
            return std::vector<const float*>{ws.update.data(), ws.ns.iterate.data(),
                                             ws.ns.gram.data(), ws.ns.poly.data(),
                                             ws.ns.scratch.data()};
        };
        const auto before = buffers();
        muon::update_matrix(h, step, x, g, s, rows, cols, ws);
        if (buffers() != before) ++grown;
    }
};

// Random matrices of the given shapes, each registered as a Muon matrix "w0", "w1", ...
// (not copyable: the list points into the vectors).
struct random_matrices {
    std::vector<std::vector<float>> values, grads;
    loco::parameter_list params;

    random_matrices(std::mt19937_64& rng, const std::vector<shape>& sizes) {
        for (const shape s : sizes) {
            values.push_back(normal_floats(rng, s.rows * s.cols));
            grads.push_back(normal_floats(rng, s.rows * s.cols));
        }
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            params.add_views("w" + std::to_string(i),
                             loco::host_matrix(values[i].data(), sizes[i].rows, sizes[i].cols),
                             loco::host_matrix(static_cast<const float*>(grads[i].data()),
                                               sizes[i].rows, sizes[i].cols),
                             {.role = loco::role::matrix});
        }
    }
    random_matrices(const random_matrices&) = delete;
    random_matrices& operator=(const random_matrices&) = delete;
};

}  // namespace reserve_case

// The optimizer reserves every matrix's scratch memory when it is built, so that a step never
// allocates: an allocation failing in the middle of a step would leave the matrices before it
// updated (and the step count not), and a retry would apply them twice.
TEST_CASE("muon: the optimizer reserves every matrix's scratch memory, so a step allocates none") {
    using reserve_case::watched_muon;
    static_assert(loco::matrix_optimizer<watched_muon>);
    auto rng = rng_for("muon/reserve");
    // Small first, then tall, square and wide ones that each need more of some buffer.
    const std::vector<shape> sizes{{3, 5}, {200, 10}, {60, 60}, {4, 300}};
    reserve_case::random_matrices m(rng, sizes);
    auto& [values, grads, params] = m;
    watched_muon::reserves = 0;
    watched_muon::grown = 0;
    loco::optimizer<watched_muon> opt(params);
    CHECK(watched_muon::reserves == sizes.size());
    auto reference = values;  // plain Muon, one matrix at a time, each with a fresh workspace
    std::vector<std::vector<float>> momenta;
    for (const auto& v : values) momenta.emplace_back(v.size(), 0.0f);
    for (int step = 1; step <= 3; ++step) {
        REQUIRE(opt.step().applied);
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            loco::inner::muon_workspace ws;
            muon::update_matrix({}, static_cast<std::uint64_t>(step), reference[i].data(),
                                grads[i].data(), momenta[i].data(), sizes[i].rows,
                                sizes[i].cols, ws);
        }
    }
    CHECK(watched_muon::grown == 0);
    CHECK(values == reference);
}

// The same for tall and wide matrices alone: the iterate needs max * min floats, more than any
// of these matrices' min * min Gram matrices, so a reservation sized by the short side alone
// would leave the first step to grow the workspace.
TEST_CASE("muon: the optimizer reserves the iterate of tall and wide matrices") {
    using reserve_case::watched_muon;
    auto rng = rng_for("muon/reserve-tall-wide");
    const std::vector<shape> sizes{{200, 10}, {4, 300}, {3, 5}};
    reserve_case::random_matrices m(rng, sizes);
    auto& [values, grads, params] = m;
    watched_muon::reserves = 0;
    watched_muon::grown = 0;
    loco::optimizer<watched_muon> opt(params);
    CHECK(watched_muon::reserves == sizes.size());
    REQUIRE(opt.step().applied);
    REQUIRE(opt.step().applied);
    CHECK(watched_muon::grown == 0);
    // Directly: one reservation covers the update of that shape.
    for (const shape s : sizes) {
        loco::inner::muon_workspace ws;
        muon::reserve(ws, s.rows, s.cols);
        const auto* iterate = ws.ns.iterate.data();
        CHECK(ws.ns.iterate.size() >= s.rows * s.cols);
        auto p = normal_floats(rng, s.rows * s.cols);
        const auto g = normal_floats(rng, s.rows * s.cols);
        std::vector<float> buf(g.size(), 0.0f);
        muon::update_matrix({}, 1, p.data(), g.data(), buf.data(), s.rows, s.cols, ws);
        CHECK(ws.ns.iterate.data() == iterate);
    }
}

TEST_CASE("muon: hyper-parameters are validated") {
    const auto bad = [](muon::hyper h, const char* what) {
        INFO(what);
        CHECK_THROWS_WITH_AS(muon::validate(h), doctest::Contains(what), loco::invalid_argument);
    };
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    bad({.lr = -1e-3f}, "lr must be");
    bad({.lr = nan}, "lr must be");
    bad({.lr = inf}, "lr must be");
    bad({.weight_decay = -0.1f}, "weight_decay must be");
    bad({.momentum = 1.0f}, "momentum must be in [0, 1)");
    bad({.momentum = -0.1f}, "momentum must be in [0, 1)");
    bad({.momentum = nan}, "momentum must be in [0, 1)");
    bad({.eps = 0.0f}, "eps must be");
    bad({.eps = -1e-7f}, "eps must be");
    bad({.ns_steps = 0}, "ns_steps must be in [1, 99]");
    bad({.ns_steps = 100}, "ns_steps must be in [1, 99]");
    bad({.adjust_lr = static_cast<lr_adjustment>(7)}, "adjust_lr");
    ns_coefficients empty;
    empty.count = 0;
    bad({.coefficients = empty}, "between 1 and 8 rows");
    ns_coefficients too_long;
    too_long.count = 9;
    bad({.coefficients = too_long}, "between 1 and 8 rows");
    auto not_finite = ns_coefficients::muloco();
    not_finite.rows[3].b = inf;
    bad({.coefficients = not_finite}, "row 3 is not finite");

    CHECK_NOTHROW(muon::validate({}));
    CHECK_NOTHROW(
        muon::validate({.lr = 0.0f, .weight_decay = 0.0f, .momentum = 0.0f, .ns_steps = 99}));

    // update_matrix checks too, before writing anything.
    std::vector<float> p = {1.0f, 2.0f}, g = {0.5f, 0.5f}, buf = {0.0f, 0.0f};
    loco::inner::muon_workspace ws;
    CHECK_THROWS_AS(
        muon::update_matrix({.momentum = 2.0f}, 1, p.data(), g.data(), buf.data(), 1, 2, ws),
        loco::invalid_argument);
    CHECK(p == std::vector<float>{1.0f, 2.0f});
    CHECK(buf == std::vector<float>{0.0f, 0.0f});
}

TEST_CASE("muon and newton_schulz refuse a shape whose rows * cols overflows, and name an empty matrix") {
    // rows * cols = 2^64 wraps to 0: formerly "left alone" by the size, then walked 2^63 rows.
    std::vector<float> g(16, 1.0f), out(16, 0.0f), m(16, 0.0f), p(16, 0.5f);
    const std::size_t rows = std::size_t(1) << 63, cols = 2;
    loco::linalg::ns_workspace ws;
    CHECK_THROWS_WITH_AS(loco::linalg::newton_schulz(g.data(), rows, cols, out.data(),
                                                     loco::linalg::ns_coefficients::keller_jordan(),
                                                     5, 1e-7f, ws),
                         doctest::Contains("matrix has more elements than std::size_t can count"),
                         loco::shape_error);
    loco::inner::muon::workspace mws;
    CHECK_THROWS_AS(loco::inner::muon::update_matrix({}, 1, p.data(), g.data(), m.data(), rows,
                                                     cols, mws),
                    loco::shape_error);
    CHECK_THROWS_AS(loco::inner::muon::input_finite({}, g.data(), m.data(), rows, cols),
                    loco::shape_error);
    CHECK(out == std::vector<float>(16, 0.0f));
    CHECK(p == std::vector<float>(16, 0.5f));

    // An empty 0 x 8 matrix is named as empty, not as a tensor without a 2-D shape.
    std::vector<float> none, g_none;
    loco::parameter_list list;
    list.add_views("e", loco::host_matrix(none.data(), 0, 8),
                   loco::host_matrix(static_cast<const float*>(g_none.data()), 0, 8));
    CHECK_THROWS_WITH_AS(loco::optimizer<loco::inner::muon>{list},
                         "loco::inner::muon updates whole matrices, but parameter 'e' is an empty "
                         "0 x 8 matrix; route it to another group (docs/groups.md)",
                         loco::invalid_argument);
}
