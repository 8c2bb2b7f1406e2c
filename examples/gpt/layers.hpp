#pragma once
// The layers of the transformer, forward and backward, on the host, for any scalar type (float to
// train, double for the gradient check). Each function works on raw row-major arrays of N rows
// (N = batch x context tokens). Backward functions ADD into their gradient outputs, so that a
// tensor used twice (a residual stream, a tied embedding) collects both contributions; the caller
// zeroes them once per step.
//
// Every product goes through gemm_acc, one cache-friendly kernel (a 4 x 32 tile of the output
// held in registers while the inner dimension streams), so that speed is tuned in one place.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numbers>
#include <vector>

namespace gpt {

namespace detail {

inline constexpr std::size_t tile_cols = 32;

// c[R x 32] += a[R x inner] * b[inner x 32-column slice]: the R x 32 tile of c stays in
// registers (or L1) while a's R rows and b's slice stream past. Row strides: inner for a, cols for
// b and c.
template <std::size_t R, class T>
void gemm_tile(T* __restrict c, const T* __restrict a, const T* __restrict b, std::size_t inner,
               std::size_t cols) {
    constexpr std::size_t J = tile_cols;
    T acc[R][J] = {};
    for (std::size_t k = 0; k < inner; ++k) {
        const T* bk = b + k * cols;
        for (std::size_t r = 0; r < R; ++r) {
            const T x = a[r * inner + k];
            for (std::size_t jj = 0; jj < J; ++jj) {
                acc[r][jj] += x * bk[jj];
            }
        }
    }
    for (std::size_t r = 0; r < R; ++r) {
        for (std::size_t jj = 0; jj < J; ++jj) {
            c[r * cols + jj] += acc[r][jj];
        }
    }
}

}  // namespace detail

// c[rows x cols] += a[rows x inner] * b[inner x cols]; all dense, row-major, not overlapping.
// Chunks of 64 rows of a, and within a chunk column slices of 32 of b, so that both stay in cache
// while the 4 x 32 tiles of c are computed; the last cols % 32 columns take a plain loop.
template <class T>
void gemm_acc(T* c, const T* a, const T* b, std::size_t rows, std::size_t inner,
              std::size_t cols) {
    constexpr std::size_t J = detail::tile_cols;
    constexpr std::size_t chunk = 64;  // rows of a kept in cache while b's slices pass
    const std::size_t full = cols - cols % J;
    for (std::size_t i0 = 0; i0 < rows; i0 += chunk) {
        const std::size_t i1 = std::min(rows, i0 + chunk);
        for (std::size_t j = 0; j < full; j += J) {
            std::size_t i = i0;
            for (; i + 4 <= i1; i += 4) {
                detail::gemm_tile<4>(c + i * cols + j, a + i * inner, b + j, inner, cols);
            }
            for (; i < i1; ++i) {
                detail::gemm_tile<1>(c + i * cols + j, a + i * inner, b + j, inner, cols);
            }
        }
    }
    const std::size_t j = full;
    for (std::size_t i = 0; i < rows; ++i) {
        for (std::size_t jr = j; jr < cols; ++jr) {
            T s = 0;
            for (std::size_t k = 0; k < inner; ++k) {
                s += a[i * inner + k] * b[k * cols + jr];
            }
            c[i * cols + jr] += s;
        }
    }
}

// out[cols x rows] = in[rows x cols] transposed.
template <class T>
void transpose(T* out, const T* in, std::size_t rows, std::size_t cols) {
    for (std::size_t i = 0; i < rows; ++i) {
        for (std::size_t j = 0; j < cols; ++j) {
            out[j * rows + i] = in[i * cols + j];
        }
    }
}

// ---- linear: out[N x O] = in[N x I] W^T + b, W stored [O x I] as in PyTorch ---------------------

template <class T>
void linear_forward(T* out, const T* in, const T* w, const T* bias, std::size_t n, std::size_t in_dim,
                    std::size_t out_dim, std::vector<T>& scratch) {
    scratch.resize(in_dim * out_dim);
    transpose(scratch.data(), w, out_dim, in_dim);  // W^T, [I x O]
    for (std::size_t i = 0; i < n; ++i) {
        for (std::size_t o = 0; o < out_dim; ++o) {
            out[i * out_dim + o] = bias != nullptr ? bias[o] : T(0);
        }
    }
    gemm_acc(out, in, scratch.data(), n, in_dim, out_dim);
}

// din += dout W, dW += dout^T in, dbias += column sums of dout (dbias may be null).
template <class T>
void linear_backward(T* din, T* dw, T* dbias, const T* dout, const T* in, const T* w, std::size_t n,
                     std::size_t in_dim, std::size_t out_dim, std::vector<T>& scratch) {
    gemm_acc(din, dout, w, n, out_dim, in_dim);
    scratch.resize(out_dim * n);
    transpose(scratch.data(), dout, n, out_dim);  // dout^T, [O x N]
    gemm_acc(dw, scratch.data(), in, out_dim, n, in_dim);
    if (dbias != nullptr) {
        for (std::size_t i = 0; i < n; ++i) {
            for (std::size_t o = 0; o < out_dim; ++o) {
                dbias[o] += dout[i * out_dim + o];
            }
        }
    }
}

// ---- layer norm over the last dimension ---------------------------------------------------------

inline constexpr double layer_norm_eps = 1e-5;

template <class T>
void layer_norm_forward(T* out, T* mean, T* rstd, const T* in, const T* gain, const T* bias,
                        std::size_t n, std::size_t dim) {
    for (std::size_t i = 0; i < n; ++i) {
        const T* x = in + i * dim;
        T m = 0;
        for (std::size_t j = 0; j < dim; ++j) m += x[j];
        m /= static_cast<T>(dim);
        T v = 0;
        for (std::size_t j = 0; j < dim; ++j) v += (x[j] - m) * (x[j] - m);
        v /= static_cast<T>(dim);
        const T r = T(1) / std::sqrt(v + static_cast<T>(layer_norm_eps));
        for (std::size_t j = 0; j < dim; ++j) {
            out[i * dim + j] = (x[j] - m) * r * gain[j] + bias[j];
        }
        mean[i] = m;
        rstd[i] = r;
    }
}

template <class T>
void layer_norm_backward(T* din, T* dgain, T* dbias, const T* dout, const T* in, const T* mean,
                         const T* rstd, const T* gain, std::size_t n, std::size_t dim) {
    for (std::size_t i = 0; i < n; ++i) {
        const T* x = in + i * dim;
        const T* dy = dout + i * dim;
        T mean_dxhat = 0;
        T mean_dxhat_xhat = 0;
        for (std::size_t j = 0; j < dim; ++j) {
            const T xhat = (x[j] - mean[i]) * rstd[i];
            const T dxhat = dy[j] * gain[j];
            mean_dxhat += dxhat;
            mean_dxhat_xhat += dxhat * xhat;
            dgain[j] += dy[j] * xhat;
            dbias[j] += dy[j];
        }
        mean_dxhat /= static_cast<T>(dim);
        mean_dxhat_xhat /= static_cast<T>(dim);
        for (std::size_t j = 0; j < dim; ++j) {
            const T xhat = (x[j] - mean[i]) * rstd[i];
            din[i * dim + j] += rstd[i] * (dy[j] * gain[j] - mean_dxhat - xhat * mean_dxhat_xhat);
        }
    }
}

// ---- GELU, tanh approximation (GPT-2's) ---------------------------------------------------------

template <class T>
void gelu_forward(T* out, const T* in, std::size_t n) {
    const T s = static_cast<T>(std::sqrt(2.0 / std::numbers::pi));
    for (std::size_t i = 0; i < n; ++i) {
        const T x = in[i];
        out[i] = T(0.5) * x * (T(1) + std::tanh(s * (x + T(0.044715) * x * x * x)));
    }
}

template <class T>
void gelu_backward(T* din, const T* dout, const T* in, std::size_t n) {
    const T s = static_cast<T>(std::sqrt(2.0 / std::numbers::pi));
    for (std::size_t i = 0; i < n; ++i) {
        const T x = in[i];
        const T th = std::tanh(s * (x + T(0.044715) * x * x * x));
        const T slope = T(0.5) * (T(1) + th) +
                        T(0.5) * x * (T(1) - th * th) * s * (T(1) + T(3 * 0.044715) * x * x);
        din[i] += dout[i] * slope;
    }
}

// ---- causal multi-head self-attention -----------------------------------------------------------

// Per-(sequence, head) work arrays, reused across calls.
template <class T>
struct attention_scratch {
    std::vector<T> q, k, v, kt, vt, s, y, dy, dp, ds, dst, pt, dq, dk, dv;
};

// qkv: [B*T x 3C] (q, k, v side by side, head h at columns h*hd .. h*hd+hd-1 of each);
// probs: [B x heads x T x T] softmax weights (zero above the diagonal), kept for backward;
// out: [B*T x C], the heads' outputs side by side.
template <class T>
void attention_forward(T* out, T* probs, const T* qkv, std::size_t batch, std::size_t context,
                       std::size_t dim, std::size_t heads, attention_scratch<T>& w) {
    const std::size_t hd = dim / heads;
    const std::size_t t_len = context;
    const T scale = T(1) / std::sqrt(static_cast<T>(hd));
    w.q.resize(t_len * hd);
    w.kt.resize(hd * t_len);
    w.v.resize(t_len * hd);
    w.y.resize(t_len * hd);
    for (std::size_t b = 0; b < batch; ++b) {
        for (std::size_t h = 0; h < heads; ++h) {
            for (std::size_t t = 0; t < t_len; ++t) {
                const T* row = qkv + (b * t_len + t) * 3 * dim + h * hd;
                for (std::size_t d = 0; d < hd; ++d) {
                    w.q[t * hd + d] = row[d] * scale;
                    w.kt[d * t_len + t] = row[dim + d];
                    w.v[t * hd + d] = row[2 * dim + d];
                }
            }
            T* p = probs + (b * heads + h) * t_len * t_len;
            std::fill(p, p + t_len * t_len, T(0));
            gemm_acc(p, w.q.data(), w.kt.data(), t_len, hd, t_len);  // scores, full square
            for (std::size_t t = 0; t < t_len; ++t) {
                T* r = p + t * t_len;
                const T top = *std::max_element(r, r + t + 1);
                T sum = 0;
                for (std::size_t u = 0; u <= t; ++u) {
                    r[u] = std::exp(r[u] - top);
                    sum += r[u];
                }
                for (std::size_t u = 0; u <= t; ++u) r[u] /= sum;
                for (std::size_t u = t + 1; u < t_len; ++u) r[u] = T(0);  // the causal mask
            }
            std::fill(w.y.begin(), w.y.end(), T(0));
            gemm_acc(w.y.data(), p, w.v.data(), t_len, t_len, hd);
            for (std::size_t t = 0; t < t_len; ++t) {
                std::copy_n(w.y.data() + t * hd, hd, out + (b * t_len + t) * dim + h * hd);
            }
        }
    }
}

// dqkv += the gradient of the attention output dout with respect to qkv.
template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* probs, std::size_t batch,
                        std::size_t context, std::size_t dim, std::size_t heads,
                        attention_scratch<T>& w) {
    const std::size_t hd = dim / heads;
    const std::size_t t_len = context;
    const T scale = T(1) / std::sqrt(static_cast<T>(hd));
    const std::size_t sq = t_len * t_len;
    w.q.resize(t_len * hd);
    w.k.resize(t_len * hd);
    w.vt.resize(hd * t_len);
    w.dy.resize(t_len * hd);
    w.dp.resize(sq);
    w.ds.resize(sq);
    w.dst.resize(sq);
    w.pt.resize(sq);
    w.dq.resize(t_len * hd);
    w.dk.resize(t_len * hd);
    w.dv.resize(t_len * hd);
    for (std::size_t b = 0; b < batch; ++b) {
        for (std::size_t h = 0; h < heads; ++h) {
            for (std::size_t t = 0; t < t_len; ++t) {
                const T* row = qkv + (b * t_len + t) * 3 * dim + h * hd;
                const T* dy = dout + (b * t_len + t) * dim + h * hd;
                for (std::size_t d = 0; d < hd; ++d) {
                    w.q[t * hd + d] = row[d] * scale;
                    w.k[t * hd + d] = row[dim + d];
                    w.vt[d * t_len + t] = row[2 * dim + d];
                    w.dy[t * hd + d] = dy[d];
                }
            }
            const T* p = probs + (b * heads + h) * sq;
            // y = P v: dP = dy v^T, dv = P^T dy.
            std::fill(w.dp.begin(), w.dp.end(), T(0));
            gemm_acc(w.dp.data(), w.dy.data(), w.vt.data(), t_len, hd, t_len);
            transpose(w.pt.data(), p, t_len, t_len);
            std::fill(w.dv.begin(), w.dv.end(), T(0));
            gemm_acc(w.dv.data(), w.pt.data(), w.dy.data(), t_len, t_len, hd);
            // Softmax of each row: dS = P (dP - sum_u P dP); zero where P is masked.
            for (std::size_t t = 0; t < t_len; ++t) {
                const T* pr = p + t * t_len;
                const T* dpr = w.dp.data() + t * t_len;
                T dot = 0;
                for (std::size_t u = 0; u <= t; ++u) dot += pr[u] * dpr[u];
                T* dsr = w.ds.data() + t * t_len;
                for (std::size_t u = 0; u < t_len; ++u) {
                    dsr[u] = u <= t ? pr[u] * (dpr[u] - dot) : T(0);
                }
            }
            // S = (scale q) k^T: d(scale q) = dS k, dk = dS^T (scale q).
            std::fill(w.dq.begin(), w.dq.end(), T(0));
            gemm_acc(w.dq.data(), w.ds.data(), w.k.data(), t_len, t_len, hd);
            transpose(w.dst.data(), w.ds.data(), t_len, t_len);
            std::fill(w.dk.begin(), w.dk.end(), T(0));
            gemm_acc(w.dk.data(), w.dst.data(), w.q.data(), t_len, t_len, hd);
            for (std::size_t t = 0; t < t_len; ++t) {
                T* row = dqkv + (b * t_len + t) * 3 * dim + h * hd;
                for (std::size_t d = 0; d < hd; ++d) {
                    row[d] += w.dq[t * hd + d] * scale;
                    row[dim + d] += w.dk[t * hd + d];
                    row[2 * dim + d] += w.dv[t * hd + d];
                }
            }
        }
    }
}

// ---- softmax cross-entropy ----------------------------------------------------------------------

// Mean over n rows of -log softmax(logits)[target]. Overwrites logits with the gradient of that
// mean, (softmax - onehot) / n, when `gradient` is set. Returns the mean in double.
template <class T>
double cross_entropy(T* logits, const std::uint8_t* targets, std::size_t n, std::size_t vocab,
                     bool gradient) {
    double total = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
        T* z = logits + i * vocab;
        const T top = *std::max_element(z, z + vocab);
        T sum = 0;
        for (std::size_t c = 0; c < vocab; ++c) sum += std::exp(z[c] - top);
        const std::size_t y = targets[i];
        total -= static_cast<double>(z[y] - top - std::log(sum));
        if (gradient) {
            for (std::size_t c = 0; c < vocab; ++c) {
                z[c] = (std::exp(z[c] - top) / sum - (c == y ? T(1) : T(0))) / static_cast<T>(n);
            }
        }
    }
    return total / static_cast<double>(n);
}

}  // namespace gpt
