#pragma once
// The orthonormal DCT-II of DeMo / DisTrO (bloc97/DeMo demo.py and PsycheFoundation/psyche
// shared/modeling/src/distro.rs, TransformDCT::dct with norm "ortho"), as a basis matrix and its
// use on one chunk.
//
//   basis(n)[i][k] = c_k cos(pi (2 i + 1) k / (2 n)),  c_0 = sqrt(1 / n), c_k = sqrt(2 / n)
//
// which is the references' dct(eye(n)): row i is the transform of the unit vector e_i (Psyche's
// test_dct golden values for n = 4). The transform of a vector x is X_k = sum_i x_i F[i][k];
// the inverse, idct(eye(n)) = F^T, is x_i = sum_k X_k F[i][k]. A chunk of h x w is transformed
// along both sides, C[b][d] = sum_(r, c) x[r][c] Fh[r][b] Fw[c][d] (the references' einsum
// "...ijkl, jb, ld -> ...ikbd"), and back by x[r][c] = sum_(b, d) C[b][d] Fh[r][b] Fw[c][d].
// A 1-D chunk is the case h = 1 (basis(1) = [1]).
//
// Precision: the basis is computed in double, the sums run in double from the fp32 inputs in the
// order written below, and the result is rounded to fp32 once.

#include <cmath>
#include <cstddef>
#include <numbers>
#include <vector>

namespace loco::compress::dct {

// basis(n), row-major n x n.
inline std::vector<double> basis(std::size_t n) {
    std::vector<double> f(n * n);
    const double nn = static_cast<double>(n);
    for (std::size_t i = 0; i < n; ++i) {
        for (std::size_t k = 0; k < n; ++k) {
            const double c = k == 0 ? std::sqrt(1.0 / nn) : std::sqrt(2.0 / nn);
            f[i * n + k] = c * std::cos(std::numbers::pi * (2.0 * static_cast<double>(i) + 1.0) *
                                        static_cast<double>(k) / (2.0 * nn));
        }
    }
    return f;
}

// One chunk's transform and its inverse. The chunk's element (r, c) is at x[r * stride + c];
// coefficients are row-major h x w. `work` is scratch (2 h w doubles).
struct chunk_transform {
    std::size_t h = 1;
    std::size_t w = 1;
    std::vector<double> fh = basis(1);
    std::vector<double> fw = basis(1);

    chunk_transform() = default;
    chunk_transform(std::size_t rows, std::size_t cols)
        : h(rows), w(cols), fh(basis(rows)), fw(basis(cols)) {}

    void forward(const float* x, std::size_t stride, float* coef, std::vector<double>& work) const {
        work.assign(2 * h * w, 0.0);
        double* t = work.data();
        double* acc = t + h * w;
        // t[r][d] = sum_c x[r][c] Fw[c][d], c ascending
        for (std::size_t r = 0; r < h; ++r) {
            for (std::size_t c = 0; c < w; ++c) {
                const double v = x[r * stride + c];
                for (std::size_t d = 0; d < w; ++d) {
                    t[r * w + d] += v * fw[c * w + d];
                }
            }
        }
        // C[b][d] = sum_r Fh[r][b] t[r][d], r ascending (the innermost loop runs along d, so
        // it vectorises; each sum still adds its terms in the order of r)
        for (std::size_t r = 0; r < h; ++r) {
            for (std::size_t b = 0; b < h; ++b) {
                const double f = fh[r * h + b];
                for (std::size_t d = 0; d < w; ++d) {
                    acc[b * w + d] += f * t[r * w + d];
                }
            }
        }
        for (std::size_t i = 0; i < h * w; ++i) {
            coef[i] = static_cast<float>(acc[i]);
        }
    }

    void inverse(const float* coef, float* x, std::size_t stride, std::vector<double>& work) const {
        work.assign(2 * h * w, 0.0);
        double* t = work.data();
        double* acc = t + h * w;
        // t[b][c] = sum_d C[b][d] Fw[c][d], d ascending
        for (std::size_t b = 0; b < h; ++b) {
            for (std::size_t d = 0; d < w; ++d) {
                const double v = coef[b * w + d];
                if (v == 0.0) {
                    continue;  // most coefficients of a decoded chunk are zero
                }
                for (std::size_t c = 0; c < w; ++c) {
                    t[b * w + c] += v * fw[c * w + d];
                }
            }
        }
        // x[r][c] = sum_b Fh[r][b] t[b][c], b ascending
        for (std::size_t b = 0; b < h; ++b) {
            for (std::size_t r = 0; r < h; ++r) {
                const double f = fh[r * h + b];
                for (std::size_t c = 0; c < w; ++c) {
                    acc[r * w + c] += f * t[b * w + c];
                }
            }
        }
        for (std::size_t r = 0; r < h; ++r) {
            for (std::size_t c = 0; c < w; ++c) {
                x[r * stride + c] = static_cast<float>(acc[r * w + c]);
            }
        }
    }
};

}  // namespace loco::compress::dct
