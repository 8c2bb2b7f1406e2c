#pragma once
// Plain fp32 matrix products for the host, without a BLAS dependency: the two shapes that the
// Newton-Schulz iteration of Muon needs, cache-blocked and register-tiled so that g++ -O3
// vectorises them with whatever SIMD the target flags allow. Single-threaded on purpose: the
// caller owns the threads (a data loader and a trainer usually already compete for the cores).
//
// All matrices are row-major with the leading dimension equal to the column count.

#include <algorithm>
#include <cstddef>
#include <cstring>

namespace loco::linalg {

namespace detail {

// A micro-tile of C is gemm_mr x gemm_nr accumulators, small enough to stay in registers with
// SSE2 (16 registers of 4 floats); gemm_kc rows of B (gemm_kc x gemm_nr floats, 4 KiB) stay in L1
// while every micro-tile of a column panel reuses them.
inline constexpr std::size_t gemm_mr = 4;
inline constexpr std::size_t gemm_nr = 8;
inline constexpr std::size_t gemm_kc = 128;

// c[i * ldc + j] += sum over k < kc of a[k * ak + i * ai] * b[k * ldb + j], for a full
// gemm_mr x gemm_nr tile. The strides of `a` let one kernel read A either as A (ai = lda, ak = 1)
// or as its transpose (ai = 1, ak = lda) without copying it.
//
// With GCC and Clang a row of the tile is one vector of gemm_nr floats (GNU vector extension:
// two SSE registers, or one AVX register), and every load and store is spelled out. The plain
// loop nest below it is the same arithmetic, but g++ 12 at -O3 with AVX2 or AVX-512 vectorises
// its k loop one iteration at a time while loading A and B as if four (two) iterations were in
// flight: it read up to three rows of A and one row of B past the last row `kc`, which crashed
// when the input ended at a page boundary (tests/linalg/gemm_overread_test.cpp). The explicit
// vectors leave the loop vectoriser nothing to widen, and are faster besides.
#if defined(__GNUC__)
typedef float tile_row __attribute__((vector_size(gemm_nr * sizeof(float))));

inline void tile_full(std::size_t kc, const float* a, std::size_t ak, std::size_t ai,
                      const float* b, std::size_t ldb, float* c, std::size_t ldc) {
    tile_row acc[gemm_mr] = {};
    for (std::size_t k = 0; k < kc; ++k) {
        tile_row brow;
        std::memcpy(&brow, b + k * ldb, sizeof brow);
        const float* acol = a + k * ak;
        for (std::size_t i = 0; i < gemm_mr; ++i) {
            acc[i] += acol[i * ai] * brow;
        }
    }
    for (std::size_t i = 0; i < gemm_mr; ++i) {
        tile_row crow;
        std::memcpy(&crow, c + i * ldc, sizeof crow);
        crow += acc[i];
        std::memcpy(c + i * ldc, &crow, sizeof crow);
    }
}
#else
inline void tile_full(std::size_t kc, const float* a, std::size_t ak, std::size_t ai,
                      const float* b, std::size_t ldb, float* c, std::size_t ldc) {
    float acc[gemm_mr][gemm_nr] = {};
    for (std::size_t k = 0; k < kc; ++k) {
        const float* brow = b + k * ldb;
        const float* acol = a + k * ak;
        for (std::size_t i = 0; i < gemm_mr; ++i) {
            const float av = acol[i * ai];
            for (std::size_t j = 0; j < gemm_nr; ++j) {
                acc[i][j] += av * brow[j];
            }
        }
    }
    for (std::size_t i = 0; i < gemm_mr; ++i) {
        for (std::size_t j = 0; j < gemm_nr; ++j) {
            c[i * ldc + j] += acc[i][j];
        }
    }
}
#endif

// The same for a partial tile at the bottom or right edge (mr <= gemm_mr, nr <= gemm_nr).
inline void tile_edge(std::size_t kc, std::size_t mr, std::size_t nr, const float* a,
                      std::size_t ak, std::size_t ai, const float* b, std::size_t ldb, float* c,
                      std::size_t ldc) {
    float acc[gemm_mr][gemm_nr] = {};
    for (std::size_t k = 0; k < kc; ++k) {
        for (std::size_t i = 0; i < mr; ++i) {
            const float av = a[k * ak + i * ai];
            for (std::size_t j = 0; j < nr; ++j) {
                acc[i][j] += av * b[k * ldb + j];
            }
        }
    }
    for (std::size_t i = 0; i < mr; ++i) {
        for (std::size_t j = 0; j < nr; ++j) {
            c[i * ldc + j] += acc[i][j];
        }
    }
}

inline void tile(std::size_t kc, std::size_t mr, std::size_t nr, const float* a, std::size_t ak,
                 std::size_t ai, const float* b, std::size_t ldb, float* c, std::size_t ldc) {
    if (mr == gemm_mr && nr == gemm_nr) {
        tile_full(kc, a, ak, ai, b, ldb, c, ldc);
    } else {
        tile_edge(kc, mr, nr, a, ak, ai, b, ldb, c, ldc);
    }
}

}  // namespace detail

// c (m x m) = t^T t for t of n x m. The result is symmetric: only the micro-tiles that reach the
// lower triangle are computed, then the lower triangle is mirrored, which halves the work.
inline void gram_tn(std::size_t n, std::size_t m, const float* t, float* c) {
    using namespace detail;
    std::fill(c, c + m * m, 0.0f);
    for (std::size_t k0 = 0; k0 < n; k0 += gemm_kc) {
        const std::size_t kc = std::min(gemm_kc, n - k0);
        const float* tk = t + k0 * m;
        for (std::size_t j0 = 0; j0 < m; j0 += gemm_nr) {
            const std::size_t nr = std::min(gemm_nr, m - j0);
            // Row tiles from the one holding the diagonal element (j0, j0) downwards.
            const std::size_t i_first = j0 / gemm_mr * gemm_mr;
            for (std::size_t i0 = i_first; i0 < m; i0 += gemm_mr) {
                const std::size_t mr = std::min(gemm_mr, m - i0);
                tile(kc, mr, nr, tk + i0, m, 1, tk + j0, m, c + i0 * m + j0, m);
            }
        }
    }
    for (std::size_t i = 0; i < m; ++i) {
        for (std::size_t j = i + 1; j < m; ++j) {
            c[i * m + j] = c[j * m + i];
        }
    }
}

// t = alpha * t + t * s, in place, for t of n x m and s of m x m. Each output row needs only its
// own input row, so rows are copied block by block into `scratch` (scratch_size(m) floats)
// instead of into a second n x m matrix. The copy is transposed so that the micro-kernel reads the
// gemm_mr values of a column of A next to each other, as in gram_tn.
inline constexpr std::size_t right_multiply_rows = 64;
inline constexpr std::size_t right_multiply_scratch(std::size_t m) {
    return right_multiply_rows * m;
}

inline void right_multiply(std::size_t n, std::size_t m, float* t, float alpha, const float* s,
                           float* scratch) {
    using namespace detail;
    for (std::size_t r0 = 0; r0 < n; r0 += right_multiply_rows) {
        const std::size_t rows = std::min(right_multiply_rows, n - r0);
        float* out = t + r0 * m;
        for (std::size_t i = 0; i < rows; ++i) {
            for (std::size_t k = 0; k < m; ++k) {
                scratch[k * rows + i] = out[i * m + k];
            }
        }
        for (std::size_t i = 0; i < rows * m; ++i) {
            out[i] *= alpha;
        }
        for (std::size_t k0 = 0; k0 < m; k0 += gemm_kc) {
            const std::size_t kc = std::min(gemm_kc, m - k0);
            for (std::size_t j0 = 0; j0 < m; j0 += gemm_nr) {
                const std::size_t nr = std::min(gemm_nr, m - j0);
                for (std::size_t i0 = 0; i0 < rows; i0 += gemm_mr) {
                    const std::size_t mr = std::min(gemm_mr, rows - i0);
                    tile(kc, mr, nr, scratch + k0 * rows + i0, rows, 1, s + k0 * m + j0, m,
                         out + i0 * m + j0, m);
                }
            }
        }
    }
}

}  // namespace loco::linalg
