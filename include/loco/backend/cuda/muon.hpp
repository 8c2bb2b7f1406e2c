#pragma once
// Muon on the GPU: the update of loco::inner::muon (torch.optim.Muon's semantics, see
// loco/inner/muon.hpp) for a list of matrices in device memory, with the Newton-Schulz products on
// cuBLAS in bf16 with fp32 accumulation, as PyTorch's bf16 iteration does.
//
//   muon_engine engine(matrices, options);            // once: handle, workspace, batches
//   engine.step(hyper, control, skip_nonfinite, s);   // per step: launches only, no host wait
//
// Batching. Matrices of the same shape (the 12 or 48 identical layers of a transformer) form one
// batch: their Newton-Schulz inputs are gathered into one bf16 buffer, and every product of the
// iteration is one strided-batched (or pointer-array batched) cuBLAS call for the whole batch.
// Batches run one after another on the caller's stream; `max_batch` caps the matrices per batch,
// and with it the workspace (4 bytes per element of the largest batch for the two bf16 iterates,
// plus 8 bytes per element of its m x m matrices).
//
// One step of a batch (m = min(rows, cols), n = max(rows, cols)):
//   input    momentum and Nesterov blend (muon::next_momentum, muon::ns_input) per element, the
//            new momentum stored, the input U rounded to bf16 into the gathered buffer, and one
//            partial sum of squares per block of 8192 elements (in double, of the bf16 values);
//   norm     one block per matrix adds its partials in a fixed order (deterministic) and keeps
//            1 / max(||U||, eps), computed in double. The division is not applied to U: it is
//            folded into the first iteration's m x m matrices;
//   rescale  only for a norm outside [2^-32, 2^32] (rare; otherwise every block exits at once):
//            U times a power of two, exactly, bringing the norm into [0.5, 1), so that the fp32
//            product of the unnormalised input neither overflows nor loses its entries;
//   5 x      G1  A = X X^T            bf16 in; bf16 out, or fp32 out on the first iteration
//                                     (symmetric: half computed, see below)
//            M   first iteration: A times 1 / divisor^2 in fp32, both halves, to bf16; later
//                ones: A's other half mirrored in place (only when G1 was half computed)
//            G2  S = A A              bf16 in, fp32 out  (symmetric: half computed)
//            E2  B = a I + b A + c S, both halves, in bf16 (times 1 / divisor on the first
//                iteration: the normalisation of X)
//            G3  X <- B X             bf16 in, bf16 out  (ping-pong between two buffers)
//   apply    weight decay and the update with the adjusted learning rate (muon::apply) per
//            element, bf16 parameters through their fp32 master copies.
// The polynomial's `a X` term is folded into B's diagonal, so that every cuBLAS call has
// alpha = 1 and beta = 0 and no call needs its output buffer to hold a copy of its input.
// Besides the GEMMs' own traffic, an iteration moves 8 to 10 bytes per element of the m x m
// matrices (E2 and the mirror; 14 on the first iteration): about 1.7 ms per iteration for GPT-2
// 1.5B's 192 matrices of m = 1600, next to some 14 ms of products.
//
// Orientation. X is the m x n orientation (transposed for tall matrices, as PyTorch does; square
// ones are not transposed), but nothing is transposed in memory: a row-major rows x cols matrix is
// a column-major cols x rows one to cuBLAS, and the operation flags of each product are chosen
// for the stored layout, so the final X is already the update in the parameter's layout.
//
// The symmetric products. A = X X^T and A A are symmetric. cuBLAS has no bf16 SYRK (SSYRK is fp32
// only, unbatched, and would need fp32 inputs at twice the bytes and half the tensor-core rate),
// so the m x m result is cut into k x k blocks of q = m / k rows and only the k (k + 1) / 2 blocks
// on and above the diagonal are computed, all blocks of all matrices of a batch in ONE
// pointer-array batched GEMM (cublasGemmBatchedEx); the M pass (A) and E2 (S, on the way)
// supply the other half. With k blocks the two products cost (k + 1) / (2 k) of the full ones.
// k is the largest value <= max_gram_blocks with q = m / k a whole multiple of 8 (16-byte aligned
// block pointers) and q >= min_gram_block (blocks large enough for cuBLAS's 128- and 256-wide
// tiles; smaller blocks lose to tile quantisation what they save in FLOPs); k = 1 falls back to
// full strided-batched products. Defaults: GPT-2's m = 768 gives k = 6 (q = 128, 7/12 of the work),
// m = 1600 gives k = 8 (q = 200, 9/16). Measured on an H100 (2026-11-22, bench/cuda/muon.cu):
// blocks of at least 128 rows beat blocks of at least 256 (k = 3 and 5) by 7 % on GPT-2 124M's
// matrices and 3 % on 1.5B's, and the full products (k = 1) by about 9 % on both.
//
// FLOP model, per iteration of an m x n matrix (m <= n):
//   nominal (what the benchmark's TFLOP/s counts): X X^T 2 m^2 n + A A 2 m^3 + B X 2 m^2 n
//                                                = 4 m^2 n + 2 m^3
//   executed with k blocks: (2 m^2 n + 2 m^3) (k + 1) / (2 k) + 2 m^2 n
// e.g. GPT-2 124M (48 matrices, 5 iterations): 1.52 TFLOP nominal, 1.16 executed (k = 6);
// GPT-2 1.5B (192 matrices): 55.1 TFLOP nominal, 41.3 executed (k = 8), with the default blocks.
//
// Precision. The iterate X, A and B are bf16 (PyTorch iterates entirely in bf16); products
// accumulate in fp32 (CUBLAS_COMPUTE_32F, reduced-precision split-K reductions disallowed); the
// normalisation is exact up to fp32 (1 / divisor^2 applied to the first fp32 product); S = A A
// stays fp32 into the polynomial, which is evaluated in fp32 at the bf16 A that S was formed from
// (see muon_poly_kernel) and rounded to bf16 once, a X included. The update differs from
// loco::inner::muon's fp32 iteration by bf16 rounding, amplified by the iteration: up to about
// 5e-2 of its largest entry and 2.5e-2 in Frobenius norm in the tests (tests/cuda/muon_test.cu,
// which also notes that PyTorch's order of bf16 roundings lands 2 to 4 times further from the
// exact result). The Frobenius norm is that of the bf16-rounded input, as PyTorch's
// (X = G.bfloat16(); X / X.norm()).
//
// Non-finite values. As on the host (loco::optimizer always checks a matrix policy's gradients),
// the caller runs the gradient check first (check_gradients on a table of the same gradients) and
// passes its step_control: with skip_nonfinite and the flag set, no kernel of the step writes
// anything, and the step is counted as skipped. If an input turns out non-finite anyway (the
// gradients were not checked, or the momentum arithmetic overflowed), that matrix's parameter is
// left unchanged (its momentum has been written) and nonfinite_matrices() counts it; the host
// engine throws instead, which a step with no host synchronisation cannot do.
//
// Streams and graphs. All work of a step is enqueued on the stream given to step(): no host
// synchronisation, allocation or read of device memory, so a step can be captured in a CUDA graph
// and replayed. The hyper-parameters are uploaded (stream-ordered) by step() only when they
// change; a change while the stream is capturing is refused. An engine is not thread-safe (one
// cuBLAS handle), and must be used on the device that was current when it was built.

#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/cublas.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/config.hpp>
#include <loco/detail/overlap.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/inner/muon.hpp>
#include <loco/linalg/newton_schulz.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco::backend::cuda {

// One matrix as the caller describes it. Pointers are device memory of the current GPU.
struct muon_matrix {
    std::string name;
    void* value = nullptr;  // rows x cols, row-major
    dtype value_type = dtype::f32;
    // bf16 values only (null otherwise): their fp32 master copy, which the update runs on; the
    // value receives the master rounded to nearest (bf16_update::master's scheme).
    float* master = nullptr;
    const void* grad = nullptr;  // rows x cols, row-major
    dtype grad_type = dtype::f32;
    float* momentum = nullptr;  // rows * cols floats of state, zero before the first step
    std::size_t size = 0;       // rows * cols
    std::size_t rows = 0;
    std::size_t cols = 0;
};

struct muon_options {
    // Matrices of one shape per batch (0: all of them): caps the workspace.
    std::size_t max_batch = 0;
    // The symmetric products' block count k (see the file comment): at most this many, with
    // blocks of at least min_gram_block rows. max_gram_blocks = 1 computes them in full.
    std::size_t max_gram_blocks = 8;
    std::size_t min_gram_block = 128;
};

// How the engine grouped the matrices: one entry per batch, in launch order.
struct muon_batch_info {
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::size_t gram_blocks = 1;        // k
    std::vector<std::size_t> matrices;  // indices into the engine's list
};

namespace detail {

inline constexpr std::uint32_t muon_chunk = 8192;  // elements per block of the element-wise passes
inline constexpr unsigned muon_tile = 32;          // edge of the m x m kernels' tiles
inline constexpr std::uint32_t muon_rescale_blocks = 16;  // blocks per matrix of the rescale pass
// Norms outside [2^-32, 2^32] are brought to [0.5, 1) before the Gram product (see the file
// comment); inside, no element moves.
inline constexpr int muon_rescale_exponent = 32;

// A matrix as the kernels see it.
struct muon_desc {
    void* value;
    float* master;
    const void* grad;
    float* momentum;
    std::uint32_t combo;    // bit 0: bf16 value, bit 1: bf16 gradient
    std::uint32_t aligned;  // 1: every pointer is 16-byte aligned (vector accesses)
};

// Per matrix of the running batch, from the norm pass.
struct muon_scale {
    float inv;             // 2^-shift / max(||U||, eps): the gathered input times this is X_0
    float inv2;            // inv^2 (computed in double); both 0 for a zero input
    std::int32_t shift;    // the gathered input holds U * 2^shift
    std::uint32_t invalid; // the input was not finite: the matrix is left unchanged
};

// The hyper-parameters as the kernels need them; per-batch muon::scalars live beside it.
struct muon_params {
    float eps;
    std::uint32_t ns_steps;
    linalg::ns_row rows[linalg::max_ns_steps];  // iteration i's coefficients
};

struct muon_stats {
    std::uint32_t nonfinite_matrices;
    std::uint32_t reserved;
};

struct muon_pass_args {
    const muon_desc* desc;  // the batch's matrices
    const inner::muon::scalars* scalars;
    loco::bf16* x;  // the gathered input (input pass), or the final iterate (apply pass)
    double* partial;
    const muon_scale* scale;
    step_control* control;  // may be null
    std::uint64_t size;     // rows * cols
    std::uint64_t stride;   // between matrices in x
    std::uint32_t chunks;   // blocks per matrix
    bool skip_nonfinite;
    bool finish;  // apply pass: this launch ends the step and does the bookkeeping
};

struct muon_norm_args {
    const double* partial;
    muon_scale* scale;
    muon_stats* stats;
    const muon_params* params;
    const step_control* control;
    std::uint32_t chunks;
    bool skip_nonfinite;
};

struct muon_rescale_args {
    loco::bf16* x;
    const muon_scale* scale;
    std::uint64_t size;
    std::uint64_t stride;
};

struct muon_tile_args {
    const float* gram_f;  // the first iteration's A = X X^T from G1, in fp32 (scale pass)
    loco::bf16* gram;     // A in bf16: from G1, or written by the scale pass; read by E2
    const float* square;  // S = A A from G2 (E2)
    loco::bf16* out;      // B (E2)
    const muon_scale* scale;
    const muon_params* params;
    std::uint64_t stride;  // between matrices
    std::uint32_t m;
    std::uint32_t pairs;  // tiles on and below the diagonal, per matrix
    std::uint32_t iteration;
};

#if LOCO_HAS_CUDA()

__device__ __forceinline__ bool muon_skipping(const step_control* c, bool skip_nonfinite) {
    return skip_nonfinite && c != nullptr && nonfinite_flagged(c);
}

// Sums one double per thread over the block in a fixed order (deterministic); every thread gets
// the sum.
__device__ __forceinline__ double muon_block_sum(double v, double* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = block_threads / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            shared[threadIdx.x] += shared[threadIdx.x + s];
        }
        __syncthreads();
    }
    return shared[0];
}

// The input pass over `len` elements of one matrix: momentum, the Newton-Schulz input rounded to
// bf16, and this thread's share of its sum of squares.
template <class G>
__device__ __forceinline__ double muon_input_segment(const inner::muon::scalars& k,
                                                     const G* __restrict__ g,
                                                     float* __restrict__ mo,
                                                     loco::bf16* __restrict__ x,
                                                     std::uint32_t len, bool vec) {
    double sum = 0.0;
    const std::uint32_t vec_end = vec ? len / 4 * 4 : 0;
    for (std::uint32_t i = threadIdx.x * 4; i < vec_end; i += block_threads * 4) {
        float gv[4];
        float mv[4];
        float u[4];
        load_vec_ro<4>(g + i, gv);
        load_vec<4>(mo + i, mv);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            mv[e] = inner::muon::next_momentum(k, mv[e], gv[e]);
            u[e] = loco::bf16::from_float(inner::muon::ns_input(k, mv[e], gv[e])).to_float();
            sum += static_cast<double>(u[e]) * static_cast<double>(u[e]);
        }
        store_vec<4>(mo + i, mv);
        store_vec<4>(x + i, u);  // already bf16 values: stored exactly
    }
    for (std::uint32_t i = vec_end + threadIdx.x; i < len; i += block_threads) {
        const float gv = widen(g[i]);
        const float mv = inner::muon::next_momentum(k, mo[i], gv);
        mo[i] = mv;
        const loco::bf16 u = loco::bf16::from_float(inner::muon::ns_input(k, mv, gv));
        x[i] = u;
        const double d = u.to_float();
        sum += d * d;
    }
    return sum;
}

template <int = 0>
__global__ void __launch_bounds__(block_threads) muon_input_kernel(muon_pass_args a) {
    __shared__ double shared[block_threads];
    if (muon_skipping(a.control, a.skip_nonfinite)) {
        return;  // uniform over the block: no barrier is left waiting
    }
    const std::uint32_t j = blockIdx.x / a.chunks;
    const std::uint64_t begin = static_cast<std::uint64_t>(blockIdx.x % a.chunks) * muon_chunk;
    const std::uint64_t rest = a.size - begin;
    const auto len = static_cast<std::uint32_t>(rest < muon_chunk ? rest : muon_chunk);
    const muon_desc d = a.desc[j];
    const inner::muon::scalars k = *a.scalars;
    float* mo = d.momentum + begin;
    loco::bf16* x = a.x + j * a.stride + begin;
    const bool vec = d.aligned != 0;
    double sum;
    if (d.combo & 2u) {
        sum = muon_input_segment(k, static_cast<const loco::bf16*>(d.grad) + begin, mo, x, len,
                                 vec);
    } else {
        sum = muon_input_segment(k, static_cast<const float*>(d.grad) + begin, mo, x, len, vec);
    }
    const double total = muon_block_sum(sum, shared);
    if (threadIdx.x == 0) {
        a.partial[blockIdx.x] = total;
    }
}

template <int = 0>
__global__ void __launch_bounds__(block_threads) muon_norm_kernel(muon_norm_args a) {
    __shared__ double shared[block_threads];
    if (muon_skipping(a.control, a.skip_nonfinite)) {
        return;
    }
    const double* partial = a.partial + static_cast<std::uint64_t>(blockIdx.x) * a.chunks;
    double sum = 0.0;
    for (std::uint32_t i = threadIdx.x; i < a.chunks; i += block_threads) {
        sum += partial[i];
    }
    const double total = muon_block_sum(sum, shared);
    if (threadIdx.x != 0) {
        return;
    }
    const double norm = sqrt(total);
    muon_scale s{0.0f, 0.0f, 0, 0u};
    if (!isfinite(norm)) {
        s.invalid = 1u;
        atomicAdd(&a.stats->nonfinite_matrices, 1u);
    } else {
        if (norm > 0.0 && (norm > ldexp(1.0, muon_rescale_exponent) ||
                           norm < ldexp(1.0, -muon_rescale_exponent))) {
            int e = 0;
            static_cast<void>(frexp(norm, &e));
            s.shift = -e;
        }
        // As the host: divide by the norm clamped from below by eps, in double. A zero input
        // stays zero whatever divides it, so its factors stay zero: 1 / eps^2 of an eps below
        // about 5e-20 is no float, and zero times infinity would turn the update into NaN.
        if (norm > 0.0) {
            const double eps = a.params->eps;
            const double divisor = ldexp(norm > eps ? norm : eps, s.shift);
            const double inv = 1.0 / divisor;
            s.inv = static_cast<float>(inv);
            s.inv2 = static_cast<float>(inv * inv);
        }
    }
    a.scale[blockIdx.x] = s;
}

// Multiplies a matrix's gathered input by 2^shift when the norm pass asked for it: exact, since
// only the exponent of a bf16 value changes (entries below 2^-126 of the new norm excepted).
template <int = 0>
__global__ void __launch_bounds__(block_threads) muon_rescale_kernel(muon_rescale_args a) {
    const std::uint32_t j = blockIdx.x / muon_rescale_blocks;
    const std::int32_t shift = a.scale[j].shift;
    if (shift == 0) {
        return;
    }
    loco::bf16* x = a.x + j * a.stride;
    const std::uint64_t step = static_cast<std::uint64_t>(muon_rescale_blocks) * block_threads;
    for (std::uint64_t i = (blockIdx.x % muon_rescale_blocks) * block_threads + threadIdx.x;
         i < a.size; i += step) {
        x[i] = loco::bf16::from_float(ldexpf(x[i].to_float(), shift));
    }
}

// The m x m kernels work on 32 x 32 tiles (tp, tq) with tq <= tp, one per block. The products
// G1 and G2 hold valid data in the blocks on and above the diagonal of cuBLAS's column-major view,
// which are the row-major positions (p, q) with q <= p (column index at most the row index) at
// least: a block reads only such positions and derives the others by symmetry, through shared
// memory so that both its reads and its writes are coalesced.

// The tile's (tp, tq) from the block's index x = tp (tp + 1) / 2 + tq within its matrix.
__device__ __forceinline__ void muon_tile_of(std::uint64_t x, std::uint64_t& tp,
                                             std::uint64_t& tq) {
    // The floating-point root is only a first guess.
    tp = static_cast<std::uint64_t>((sqrt(8.0 * static_cast<double>(x) + 1.0) - 1.0) / 2.0);
    while (tp * (tp + 1) / 2 > x) {
        --tp;
    }
    while ((tp + 1) * (tp + 2) / 2 <= x) {
        ++tp;
    }
    tq = x - tp * (tp + 1) / 2;
}

// Where a block of the m x m kernels works, found the same way by each of them: matrix j, tile
// (tp, tq) whose first row and column are row0 and col0; the thread takes column tx of rows ty,
// ty + muon_rows_per_pass, ... of the tile.
inline constexpr unsigned muon_rows_per_pass = block_threads / muon_tile;
struct muon_block_tile {
    std::uint32_t j;
    std::uint64_t tp, tq, row0, col0;
    unsigned tx, ty;
};
__device__ __forceinline__ muon_block_tile muon_block_tile_of(const muon_tile_args& a) {
    muon_block_tile b{};
    b.j = blockIdx.x / a.pairs;
    muon_tile_of(blockIdx.x % a.pairs, b.tp, b.tq);
    b.row0 = b.tp * muon_tile;
    b.col0 = b.tq * muon_tile;
    b.tx = threadIdx.x % muon_tile;
    b.ty = threadIdx.x / muon_tile;
    return b;
}

// The first iteration's A: G1's fp32 product of the unnormalised input times 1 / divisor^2
// (exact normalisation in fp32), both halves, rounded to bf16 once.
template <int = 0>
__global__ void __launch_bounds__(block_threads) muon_scale_kernel(muon_tile_args a) {
    __shared__ float tile[muon_tile][muon_tile + 1];
    const auto [j, tp, tq, row0, col0, tx, ty] = muon_block_tile_of(a);
    const float s = a.scale[j].inv2;
    const std::uint64_t m = a.m;
    const float* g = a.gram_f + j * a.stride;
    loco::bf16* out = a.gram + j * a.stride;
    for (unsigned k = ty; k < muon_tile; k += muon_rows_per_pass) {
        const std::uint64_t p = row0 + k;
        const std::uint64_t q = col0 + tx;
        tile[k][tx] = p < m && q < m && q <= p ? s * g[p * m + q] : 0.0f;
    }
    __syncthreads();
    for (unsigned k = ty; k < muon_tile; k += muon_rows_per_pass) {
        const std::uint64_t p = row0 + k;
        const std::uint64_t q = col0 + tx;
        if (p < m && q < m) {
            out[p * m + q] =
                loco::bf16::from_float((tp != tq || tx <= k) ? tile[k][tx] : tile[tx][k]);
        }
    }
    if (tp != tq) {
        for (unsigned k = ty; k < muon_tile; k += muon_rows_per_pass) {
            const std::uint64_t p = col0 + k;
            const std::uint64_t q = row0 + tx;
            if (p < m && q < m) {
                out[p * m + q] = loco::bf16::from_float(tile[tx][k]);
            }
        }
    }
}

// Completes A (bf16, in place) from its valid half when G1 computed only blocks: each block reads
// positions with q <= p and writes positions with q > p only, so blocks never race.
template <int = 0>
__global__ void __launch_bounds__(block_threads) muon_mirror_kernel(muon_tile_args a) {
    __shared__ std::uint16_t tile[muon_tile][muon_tile + 1];
    const auto [j, tp, tq, row0, col0, tx, ty] = muon_block_tile_of(a);
    const std::uint64_t m = a.m;
    loco::bf16* g = a.gram + j * a.stride;
    for (unsigned r = ty; r < muon_tile; r += muon_rows_per_pass) {
        const std::uint64_t p = row0 + r;
        const std::uint64_t q = col0 + tx;
        if (p < m && q < m && q <= p) {
            tile[r][tx] = g[p * m + q].bits;
        }
    }
    __syncthreads();
    // Position (col0 + r, row0 + tx) holds element (row0 + tx, col0 + r) = tile[tx][r]; on a
    // diagonal tile only the part above the diagonal is written.
    for (unsigned r = ty; r < muon_tile; r += muon_rows_per_pass) {
        const std::uint64_t p = col0 + r;
        const std::uint64_t q = row0 + tx;
        if (p < m && q < m && q > p) {
            g[p * m + q] = loco::bf16{tile[tx][r]};
        }
    }
}

// E2: B = a I + b A + c S from the bf16 A (both halves) and the valid half of S, in bf16, both
// halves; on the first iteration B times 1 / divisor (the normalisation of X). b A uses the very
// bf16 A that S was formed from, so that B is the polynomial of one matrix: with the fp32 A in
// b A, A's rounding reached B through c (A^2 - A_bf16^2) alone, where a, b A and c S cancel to
// about 0.6, up to 8 times amplified (several percent of the update in tests).
template <int = 0>
__global__ void __launch_bounds__(block_threads) muon_poly_kernel(muon_tile_args a) {
    __shared__ float tile[muon_tile][muon_tile + 1];
    const auto [j, tp, tq, row0, col0, tx, ty] = muon_block_tile_of(a);
    const float out_scale = a.iteration == 0 ? a.scale[j].inv : 1.0f;
    const linalg::ns_row r = a.params->rows[a.iteration];
    const std::uint64_t m = a.m;
    const loco::bf16* g = a.gram + j * a.stride;
    const float* sq = a.square + j * a.stride;
    loco::bf16* out = a.out + j * a.stride;

    for (unsigned k = ty; k < muon_tile; k += muon_rows_per_pass) {
        const std::uint64_t p = row0 + k;
        const std::uint64_t q = col0 + tx;
        float v = 0.0f;
        if (p < m && q < m && q <= p) {
            v = r.b * g[p * m + q].to_float() + r.c * sq[p * m + q];
        }
        tile[k][tx] = v;
    }
    __syncthreads();
    for (unsigned k = ty; k < muon_tile; k += muon_rows_per_pass) {
        const std::uint64_t p = row0 + k;
        const std::uint64_t q = col0 + tx;
        if (p < m && q < m) {
            float v = (tp != tq || tx <= k) ? tile[k][tx] : tile[tx][k];
            if (p == q) {
                v += r.a;
            }
            out[p * m + q] = loco::bf16::from_float(v * out_scale);
        }
    }
    if (tp != tq) {
        for (unsigned k = ty; k < muon_tile; k += muon_rows_per_pass) {
            const std::uint64_t p = col0 + k;
            const std::uint64_t q = row0 + tx;
            if (p < m && q < m) {
                out[p * m + q] = loco::bf16::from_float(tile[tx][k] * out_scale);
            }
        }
    }
}

// The apply pass over `len` elements of one matrix: p = p (1 - lr wd) - adjusted_lr o.
template <class P>
__device__ __forceinline__ void muon_apply_segment(const inner::muon::scalars& k,
                                                   P* __restrict__ v, float* __restrict__ ms,
                                                   const loco::bf16* __restrict__ o,
                                                   std::uint32_t len, bool vec) {
    constexpr bool use_master = std::is_same_v<P, loco::bf16>;
    const std::uint32_t vec_end = vec ? len / 4 * 4 : 0;
    for (std::uint32_t i = threadIdx.x * 4; i < vec_end; i += block_threads * 4) {
        float xv[4];
        float ov[4];
        if constexpr (use_master) {
            load_vec<4>(ms + i, xv);
        } else {
            load_vec<4>(v + i, xv);
        }
        load_vec_ro<4>(o + i, ov);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            inner::muon::apply(k, xv[e], ov[e]);
        }
        if constexpr (use_master) {
            store_vec<4>(ms + i, xv);
        }
        store_vec<4>(v + i, xv);
    }
    for (std::uint32_t i = vec_end + threadIdx.x; i < len; i += block_threads) {
        float xv = use_master ? ms[i] : widen(v[i]);
        inner::muon::apply(k, xv, o[i].to_float());
        if constexpr (use_master) {
            ms[i] = xv;
        }
        v[i] = narrow<P>(xv);
    }
}

template <int = 0>
__global__ void __launch_bounds__(block_threads) muon_apply_kernel(muon_pass_args a) {
    const bool skip = muon_skipping(a.control, a.skip_nonfinite);
    const std::uint32_t j = blockIdx.x / a.chunks;
    if (!skip && a.scale[j].invalid == 0u) {
        const std::uint64_t begin = static_cast<std::uint64_t>(blockIdx.x % a.chunks) * muon_chunk;
        const std::uint64_t rest = a.size - begin;
        const auto len = static_cast<std::uint32_t>(rest < muon_chunk ? rest : muon_chunk);
        const muon_desc d = a.desc[j];
        const inner::muon::scalars k = *a.scalars;
        const loco::bf16* o = a.x + j * a.stride + begin;
        const bool vec = d.aligned != 0;
        if (d.combo & 1u) {
            muon_apply_segment(k, static_cast<loco::bf16*>(d.value) + begin, d.master + begin, o,
                               len, vec);
        } else {
            muon_apply_segment(k, static_cast<float*>(d.value) + begin,
                               static_cast<float*>(nullptr), o, len, vec);
        }
    }
    if (a.finish && a.control != nullptr) {
        finish_block(a.control, skip);
    }
}

// The bookkeeping of a step of an engine without matrices.
template <int = 0>
__global__ void __launch_bounds__(block_threads) muon_finish_kernel(step_control* c,
                                                                    bool skip_nonfinite) {
    finish_block(c, muon_skipping(c, skip_nonfinite));
}

#endif  // LOCO_HAS_CUDA()

// cuBLAS's int arguments: refused at construction rather than truncated at a call.
inline int muon_int(std::size_t v, const char* what) {
    if (v > static_cast<std::size_t>(INT_MAX)) {
        throw invalid_argument(std::string("loco: muon: ") + what + " (" + std::to_string(v) +
                               ") exceeds the int range of cuBLAS's arguments");
    }
    return static_cast<int>(v);
}

inline std::uint32_t muon_grid(std::size_t blocks, const char* what) {
    if (blocks == 0 || blocks > static_cast<std::size_t>(INT32_MAX)) {
        throw invalid_argument(std::string("loco: muon: the ") + what + " pass needs " +
                               std::to_string(blocks) + " CUDA blocks, more than a grid holds; "
                               "lower muon_options::max_batch");
    }
    return static_cast<std::uint32_t>(blocks);
}

inline bool same_hyper(const inner::muon::hyper& x, const inner::muon::hyper& y) {
    return x.lr == y.lr && x.weight_decay == y.weight_decay && x.momentum == y.momentum &&
           x.nesterov == y.nesterov && x.coefficients == y.coefficients && x.eps == y.eps &&
           x.ns_steps == y.ns_steps && x.adjust_lr == y.adjust_lr;
}

}  // namespace detail

// The k of the symmetric products for an m x m Gram matrix (see the file comment).
inline std::size_t muon_gram_blocks(std::size_t m, const muon_options& o) {
    for (std::size_t k = std::min(o.max_gram_blocks, m); k >= 2; --k) {
        const std::size_t q = m / k;
        if (m % k == 0 && q % 8 == 0 && q >= o.min_gram_block) {
            return k;
        }
    }
    return 1;
}

class muon_engine {
public:
    using hyper = inner::muon::hyper;

    // Checks every matrix (a 2-D shape with rows * cols == size, device memory of the current GPU
    // for each pointer, element alignment, fp32 momentum, a master exactly for bf16 values, no
    // value, master or momentum overlapping anything), groups them into batches, and allocates
    // the workspace and the cuBLAS handle. Throws loco::invalid_argument, loco::shape_error or
    // loco::memory_space_error naming the matrix; nothing is left allocated then.
    explicit muon_engine(std::vector<muon_matrix> matrices, muon_options options = {})
        : matrices_(std::move(matrices)), options_(options), device_(current_device()) {
        validate_options();
        for (std::size_t i = 0; i < matrices_.size(); ++i) {
            validate(i);
        }
        check_no_overlap();
        plan();
        allocate();
    }

    // One Muon step of every matrix, enqueued on `stream`. `control` (may be null: no skip, no
    // counters) is the step_control whose non-finite flag a gradient check set before, on the same
    // stream; with `finish`, the step's last kernel advances its counters (steps, or skipped when
    // it skipped) and clears the flag, as inner_step does. Without it the flag and the counters
    // are left to a later launch on the same stream that reads the same flag, e.g. the inner_step
    // of another parameter group, so that one gradient check serves both. Throws
    // loco::invalid_argument for bad hyper-parameters (before anything is enqueued) or a
    // hyper-parameter change during a graph capture.
    void step(const hyper& h, step_control* control, bool skip_nonfinite, cudaStream_t stream,
              bool finish = true) {
        if (current_device() != device_) {
            throw invalid_argument("loco: muon_engine was built on GPU " +
                                   std::to_string(device_) + " but GPU " +
                                   std::to_string(current_device()) + " is current");
        }
        if (skip_nonfinite && control == nullptr) {
            throw invalid_argument(
                "loco: muon_engine::step: skip_nonfinite needs the step_control of a gradient "
                "check");
        }
        set_hyper(h, stream);
        if (plans_.empty()) {
            if (control != nullptr && finish) {
                LOCO_CUDA_CHECK(detail::launch(detail::muon_finish_kernel<>, 1u, stream, control,
                                               skip_nonfinite));
            }
            return;
        }
        // cublasSetStream also resets the handle's workspace to cuBLAS's own pool, which would
        // allocate inside a graph capture: set ours again after it.
        LOCO_CUBLAS_CHECK(cublasSetStream(handle_.get(), stream));
        LOCO_CUBLAS_CHECK(
            cublasSetWorkspace(handle_.get(), cublas_workspace_.get(), cublas_workspace_.size()));
        for (std::size_t b = 0; b < plans_.size(); ++b) {
            run_batch(plans_[b], finish && b + 1 == plans_.size(), control, skip_nonfinite,
                      stream);
        }
    }

    // Validates h and uploads what the kernels need of it when it differs from the last upload
    // (stream-ordered). step() calls it; call it alone to upload outside a graph capture.
    //
    // The number of Newton-Schulz iterations is the number of cuBLAS calls a step enqueues, so a
    // CUDA graph keeps the count it was captured with. Rows past ns_steps are uploaded as the
    // identity (a = 1, b = c = 0: B = I, and X <- B X copies X exactly in bf16), so a graph
    // replayed after ns_steps went down runs the extra iterations as no-ops and matches a direct
    // step; ns_steps above the smallest count captured so far is refused (a graph would run
    // too few iterations without a word): build a new optimizer and capture it again.
    void set_hyper(const hyper& h, cudaStream_t stream) {
        inner::muon::validate(h);
        if (uploaded_ && detail::same_hyper(*uploaded_, h)) {
            return;
        }
        refuse_hyper_change_in_capture(stream, "loco: muon_engine");
        if (captured_steps_ > 0 && h.ns_steps > captured_steps_) {
            throw invalid_argument(
                "loco: muon_engine: ns_steps " + std::to_string(h.ns_steps) +
                " is more than the " + std::to_string(captured_steps_) +
                " Newton-Schulz iterations a CUDA graph of this optimizer was captured with, "
                "which its replays would run; build a new optimizer (a checkpoint carries the "
                "state) and capture it with the larger count");
        }
        staged_params_ = detail::muon_params{};
        staged_params_.eps = h.eps;
        staged_params_.ns_steps = static_cast<std::uint32_t>(h.ns_steps);
        for (int i = 0; i < linalg::max_ns_steps; ++i) {
            staged_params_.rows[i] = i < h.ns_steps
                                         ? h.coefficients.at(static_cast<std::size_t>(i))
                                         : linalg::ns_row{.a = 1.0f, .b = 0.0f, .c = 0.0f};
        }
        staged_scalars_.clear();
        for (const plan_t& p : plans_) {
            // The very host function loco::inner::muon uses: bit-identical scalars.
            staged_scalars_.push_back(inner::muon::prepare(h, p.info.rows, p.info.cols));
        }
        // Pageable sources: CUDA copies them out before returning (as device_control does).
        LOCO_CUDA_CHECK(cudaMemcpyAsync(params_.get(), &staged_params_, sizeof staged_params_,
                                        cudaMemcpyHostToDevice, stream));
        if (!staged_scalars_.empty()) {
            LOCO_CUDA_CHECK(cudaMemcpyAsync(scalars_.get(), staged_scalars_.data(),
                                            staged_scalars_.size() * sizeof(inner::muon::scalars),
                                            cudaMemcpyHostToDevice, stream));
        }
        uploaded_ = h;
    }

    // Matrices whose Newton-Schulz input was not finite and whose parameter was therefore left
    // unchanged, since construction or the last reset (waits for `stream`).
    std::uint32_t nonfinite_matrices(cudaStream_t stream) const {
        detail::muon_stats s{};
        LOCO_CUDA_CHECK(
            cudaMemcpyAsync(&s, stats_.get(), sizeof s, cudaMemcpyDeviceToHost, stream));
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        return s.nonfinite_matrices;
    }
    void reset_nonfinite_matrices(cudaStream_t stream) {
        LOCO_CUDA_CHECK(cudaMemsetAsync(stats_.get(), 0, sizeof(detail::muon_stats), stream));
    }

    std::size_t size() const noexcept { return matrices_.size(); }
    const muon_matrix& matrix(std::size_t i) const { return matrices_.at(i); }
    std::vector<muon_batch_info> batches() const {
        std::vector<muon_batch_info> out;
        for (const plan_t& p : plans_) {
            out.push_back(p.info);
        }
        return out;
    }
    int device() const noexcept { return device_; }
    // Device memory the engine owns besides the handle: iterates, Gram matrices, partial norms,
    // pointer arrays, cuBLAS's workspace.
    std::size_t workspace_bytes() const noexcept {
        return workspace_.size_bytes() + pointers_.size_bytes() + cublas_workspace_.size_bytes();
    }

    // The FLOP model (file comment), summed over the matrices, for `ns_steps` iterations.
    static double nominal_flops(std::size_t rows, std::size_t cols, int ns_steps) {
        const double m = static_cast<double>(std::min(rows, cols));
        const double n = static_cast<double>(std::max(rows, cols));
        return ns_steps * (4.0 * m * m * n + 2.0 * m * m * m);
    }
    double nominal_flops(int ns_steps) const {
        double f = 0.0;
        for (const muon_matrix& x : matrices_) {
            f += nominal_flops(x.rows, x.cols, ns_steps);
        }
        return f;
    }
    double executed_flops(int ns_steps) const {
        double f = 0.0;
        for (const plan_t& p : plans_) {
            const double m = static_cast<double>(p.m);
            const double n = static_cast<double>(p.n);
            const double k = static_cast<double>(p.k);
            const double half = (k + 1.0) / (2.0 * k);
            f += static_cast<double>(p.count) * ns_steps *
                 ((2.0 * m * m * n + 2.0 * m * m * m) * half + 2.0 * m * m * n);
        }
        return f;
    }

private:
    struct plan_t {
        muon_batch_info info;
        std::size_t first = 0;  // its first descriptor in desc_
        std::size_t count = 0;
        std::size_t m = 0, n = 0;
        bool tall = false;
        std::uint64_t size = 0;
        std::uint64_t x_stride = 0;     // elements between matrices in the iterates
        std::uint64_t gram_stride = 0;  // and in the m x m buffers
        std::uint32_t chunks = 0;
        std::uint32_t pairs = 0;
        std::size_t k = 1, q = 0, blocks = 1;  // gram blocks, their edge, k (k + 1) / 2
        std::size_t pointer_offset = 0;        // its 12 pointer arrays of count * blocks entries
    };

    std::string where(std::size_t i) const {
        return "loco: muon: matrix '" + matrices_[i].name + "': ";
    }

    void validate_options() const {
        if (options_.max_gram_blocks < 1) {
            throw invalid_argument("loco: muon_options::max_gram_blocks must be at least 1");
        }
        if (options_.min_gram_block < 8) {
            throw invalid_argument("loco: muon_options::min_gram_block must be at least 8");
        }
    }

    void validate(std::size_t i) const {
        const muon_matrix& x = matrices_[i];
        if (x.rows == 0 || x.cols == 0) {
            throw invalid_argument(where(i) + "Muon updates whole matrices, but this one has no "
                                   "2-D shape (rows " + std::to_string(x.rows) + ", cols " +
                                   std::to_string(x.cols) + "); route it to another group");
        }
        if (x.size / x.rows != x.cols || x.size % x.rows != 0) {
            throw shape_error(where(i) + std::to_string(x.rows) + " x " + std::to_string(x.cols) +
                              " does not match its " + std::to_string(x.size) + " elements");
        }
        if (x.value_type == dtype::bf16 && x.master == nullptr) {
            throw invalid_argument(where(i) + "bf16 values need an fp32 master copy (master)");
        }
        if (x.value_type == dtype::f32 && x.master != nullptr) {
            throw invalid_argument(where(i) + "a master copy is only for bf16 values");
        }
        check_pointer(i, x.value, size_of(x.value_type), "value");
        check_pointer(i, x.grad, size_of(x.grad_type), "gradient");
        check_pointer(i, x.momentum, sizeof(float), "momentum");
        if (x.master != nullptr) {
            check_pointer(i, x.master, sizeof(float), "master");
        }
    }

    void check_pointer(std::size_t i, const void* p, std::size_t element, const char* what) const {
        if (p == nullptr) {
            throw invalid_argument(where(i) + "null " + what + " pointer");
        }
        if (reinterpret_cast<std::uintptr_t>(p) % element != 0) {
            throw invalid_argument(where(i) + "the " + what +
                                   " pointer is not aligned to its elements");
        }
        const std::size_t bytes = matrices_[i].size * element;
        const auto* last = static_cast<const std::byte*>(p) + (bytes - 1);
        for (const void* q : {p, static_cast<const void*>(last)}) {
            if (!is_device_memory_on(q, device_)) {
                throw memory_space_error(where(i) + "the " + what + " is in " +
                                         describe_pointer(q) +
                                         ", but Muon on the GPU needs device memory of GPU " +
                                         std::to_string(device_));
            }
        }
    }

    // Values, masters and momenta must not share memory with anything; gradients may alias each
    // other.
    void check_no_overlap() const {
        struct part {
            std::size_t matrix;
            const char* what;
        };
        std::vector<part> parts;
        std::vector<loco::detail::memory_range> ranges;
        const auto add = [&](std::size_t i, const void* p, std::size_t bytes, bool exclusive,
                             const char* what) {
            const auto b = reinterpret_cast<std::uintptr_t>(p);
            ranges.push_back({b, b + bytes, parts.size(), exclusive});
            parts.push_back({i, what});
        };
        for (std::size_t i = 0; i < matrices_.size(); ++i) {
            const muon_matrix& x = matrices_[i];
            add(i, x.value, x.size * size_of(x.value_type), true, "the value");
            add(i, x.grad, x.size * size_of(x.grad_type), false, "the gradient");
            add(i, x.momentum, x.size * sizeof(float), true, "the momentum");
            if (x.master != nullptr) {
                add(i, x.master, x.size * sizeof(float), true, "the master copy");
            }
        }
        if (const auto hit = loco::detail::find_value_overlap(std::move(ranges))) {
            const auto describe = [&](const loco::detail::memory_range& r) {
                const part& p = parts[r.index];
                return std::string(p.what) + " of '" + matrices_[p.matrix].name + "'";
            };
            throw invalid_argument("loco: muon: " + describe(hit->first) + " overlaps " +
                                   describe(hit->second) +
                                   " in device memory; values, masters and momenta each need "
                                   "their own storage");
        }
    }

    static std::uint64_t round_up(std::uint64_t n, std::uint64_t to) {
        return (n + to - 1) / to * to;
    }

    void plan() {
        // Batches in the order of each shape's first matrix; within a shape, list order.
        std::vector<std::pair<std::size_t, std::size_t>> shapes;
        std::map<std::pair<std::size_t, std::size_t>, std::vector<std::size_t>> members;
        for (std::size_t i = 0; i < matrices_.size(); ++i) {
            const std::pair<std::size_t, std::size_t> key{matrices_[i].rows, matrices_[i].cols};
            auto& list = members[key];
            if (list.empty()) {
                shapes.push_back(key);
            }
            list.push_back(i);
        }
        std::vector<detail::muon_desc> descs;
        std::size_t pointer_entries = 0;
        for (const auto& key : shapes) {
            const auto& list = members[key];
            const std::size_t cap = options_.max_batch == 0 ? list.size() : options_.max_batch;
            for (std::size_t at = 0; at < list.size(); at += cap) {
                plan_t p;
                p.info.rows = key.first;
                p.info.cols = key.second;
                p.info.matrices.assign(list.begin() + static_cast<std::ptrdiff_t>(at),
                                       list.begin() + static_cast<std::ptrdiff_t>(
                                                          std::min(list.size(), at + cap)));
                p.first = descs.size();
                p.count = p.info.matrices.size();
                p.tall = key.first > key.second;
                p.m = std::min(key.first, key.second);
                p.n = std::max(key.first, key.second);
                p.size = key.first * key.second;
                // 128 elements: 256-byte aligned bf16 matrices, 512-byte aligned fp32 ones.
                p.x_stride = round_up(p.size, 128);
                p.gram_stride = round_up(static_cast<std::uint64_t>(p.m) * p.m, 128);
                p.chunks = detail::muon_grid((p.size + detail::muon_chunk - 1) / detail::muon_chunk,
                                             "element-wise");
                const std::size_t tiles = (p.m + detail::muon_tile - 1) / detail::muon_tile;
                p.pairs = detail::muon_grid(tiles * (tiles + 1) / 2, "Gram matrix");
                p.k = muon_gram_blocks(p.m, options_);
                p.q = p.m / p.k;
                p.blocks = p.k * (p.k + 1) / 2;
                p.info.gram_blocks = p.k;
                // Every launch's grid and every cuBLAS int, checked once here.
                detail::muon_grid(p.count * p.chunks, "element-wise");
                detail::muon_grid(p.count * p.pairs, "Gram matrix");
                detail::muon_grid(p.count * detail::muon_rescale_blocks, "rescale");
                detail::muon_int(p.n, "a matrix dimension");
                detail::muon_int(p.count * p.blocks, "the batch of Gram blocks");
                if (p.k > 1) {
                    p.pointer_offset = pointer_entries;
                    pointer_entries += 12 * p.count * p.blocks;
                }
                for (const std::size_t i : p.info.matrices) {
                    const muon_matrix& x = matrices_[i];
                    detail::muon_desc d{};
                    d.value = x.value;
                    d.master = x.master;
                    d.grad = x.grad;
                    d.momentum = x.momentum;
                    d.combo = (x.value_type == dtype::bf16 ? 1u : 0u) |
                              (x.grad_type == dtype::bf16 ? 2u : 0u);
                    const auto on16 = [](const void* q) {
                        return reinterpret_cast<std::uintptr_t>(q) % 16 == 0;
                    };
                    d.aligned = on16(x.value) && on16(x.grad) && on16(x.momentum) &&
                                        (x.master == nullptr || on16(x.master))
                                    ? 1u
                                    : 0u;
                    descs.push_back(d);
                }
                plans_.push_back(std::move(p));
            }
        }
        descs_host_ = std::move(descs);
        pointer_entries_ = pointer_entries;
    }

    void allocate() {
        // One workspace, carved into 256-byte aligned regions sized for the largest batch.
        std::uint64_t x = 0, gram = 0, partial = 0, count = 0;
        for (const plan_t& p : plans_) {
            x = std::max<std::uint64_t>(x, p.count * p.x_stride);
            gram = std::max<std::uint64_t>(gram, p.count * p.gram_stride);
            partial = std::max<std::uint64_t>(partial, p.count * p.chunks);
            count = std::max<std::uint64_t>(count, p.count);
        }
        std::uint64_t at = 0;
        const auto region = [&](std::uint64_t bytes) {
            const std::uint64_t begin = at;
            at += round_up(bytes, allocation_alignment);
            return begin;
        };
        const std::uint64_t x0 = region(x * 2), x1 = region(x * 2);
        const std::uint64_t square_f = region(gram * 4);
        const std::uint64_t gram_h = region(gram * 2), poly_h = region(gram * 2);
        const std::uint64_t part = region(partial * sizeof(double));
        const std::uint64_t scale = region(count * sizeof(detail::muon_scale));
        workspace_ = device_buffer<std::byte>(static_cast<std::size_t>(at));
        std::byte* base = workspace_.get();
        // Garbage in a skipped step's products is harmless, but zeros keep NaN out of them.
        if (at != 0) {
            LOCO_CUDA_CHECK(cudaMemset(base, 0, static_cast<std::size_t>(at)));
        }
        x0_ = reinterpret_cast<loco::bf16*>(base + x0);
        x1_ = reinterpret_cast<loco::bf16*>(base + x1);
        square_f_ = reinterpret_cast<float*>(base + square_f);
        gram_h_ = reinterpret_cast<loco::bf16*>(base + gram_h);
        poly_h_ = reinterpret_cast<loco::bf16*>(base + poly_h);
        partial_ = reinterpret_cast<double*>(base + part);
        scale_ = reinterpret_cast<detail::muon_scale*>(base + scale);

        desc_ = device_buffer<detail::muon_desc>(descs_host_.size());
        desc_.upload(descs_host_);
        params_ = device_buffer<detail::muon_params>(1);
        scalars_ = device_buffer<inner::muon::scalars>(std::max<std::size_t>(plans_.size(), 1));
        stats_ = device_buffer<detail::muon_stats>(1);
        stats_.zero(nullptr);
        build_pointers();
        if (!plans_.empty()) {
            // 32 MiB: the size NVIDIA recommends for Hopper; kept by the engine so that no cuBLAS
            // call allocates (which a graph capture would refuse).
            cublas_workspace_ = device_buffer<std::byte>(std::size_t{32} << 20);
            handle_ = cublas_handle::create();
            LOCO_CUBLAS_CHECK(cublasSetPointerMode(handle_.get(), CUBLAS_POINTER_MODE_HOST));
            // Split-K partial sums in fp32 even when the output is bf16.
            LOCO_CUBLAS_CHECK(cublasSetMathMode(
                handle_.get(), static_cast<cublasMath_t>(
                                   CUBLAS_DEFAULT_MATH |
                                   CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    }

    // The block pointers of the half-computed products, per batch: four sets of arrays A, B and C
    // of count * blocks entries each, for G1 from the first buffer into the fp32 A (the first
    // iteration), G1 from the first and from the second buffer into the bf16 A, and G2. Block
    // (bi, bj), bi <= bj, is rows bi q.. and columns bj q.. of the column-major m x m result.
    void build_pointers() {
        std::vector<void*> host(pointer_entries_, nullptr);
        for (const plan_t& p : plans_) {
            if (p.k == 1) {
                continue;
            }
            const std::size_t per = p.count * p.blocks;
            void** arrays = host.data() + p.pointer_offset;
            const auto put = [&](int set, std::size_t e, void* a, void* b, void* c) {
                void** base = arrays + static_cast<std::size_t>(set) * 3 * per;
                base[e] = a;
                base[per + e] = b;
                base[2 * per + e] = c;
            };
            // Wide: row block i of X is column block i of the n x m column-major view (leading
            // dimension n); tall: row block i of the m x n column-major view (leading dimension m).
            const std::size_t step = p.tall ? p.q : p.q * p.n;
            std::size_t e = 0;
            for (std::size_t j = 0; j < p.count; ++j) {
                loco::bf16* x0 = x0_ + j * p.x_stride;
                loco::bf16* x1 = x1_ + j * p.x_stride;
                const std::size_t a = j * p.gram_stride;
                for (std::size_t bj = 0; bj < p.k; ++bj) {
                    for (std::size_t bi = 0; bi <= bj; ++bi, ++e) {
                        const std::size_t c = a + bi * p.q + bj * p.q * p.m;
                        put(0, e, x0 + bi * step, x0 + bj * step, square_f_ + c);
                        put(1, e, x0 + bi * step, x0 + bj * step, gram_h_ + c);
                        put(2, e, x1 + bi * step, x1 + bj * step, gram_h_ + c);
                        put(3, e, gram_h_ + a + bi * p.q, gram_h_ + a + bj * p.q * p.m,
                            square_f_ + c);
                    }
                }
            }
        }
        pointers_ = device_buffer<void*>(host.size());
        pointers_.upload(host);
    }

    // C = op(A) op(B) over the batch, bf16 inputs, fp32 accumulation, output of type `out`.
    void gemm(cublasOperation_t ta, cublasOperation_t tb, std::size_t m, std::size_t n,
              std::size_t k, const void* a, std::size_t lda, std::uint64_t stride_a,
              const void* b, std::size_t ldb, std::uint64_t stride_b, void* c, cudaDataType out,
              std::size_t ldc, std::uint64_t stride_c, std::size_t batch) {
        const float one = 1.0f, zero = 0.0f;
        LOCO_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
            handle_.get(), ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
            &one, a, CUDA_R_16BF, static_cast<int>(lda), static_cast<long long>(stride_a), b,
            CUDA_R_16BF, static_cast<int>(ldb), static_cast<long long>(stride_b), &zero, c, out,
            static_cast<int>(ldc), static_cast<long long>(stride_c), static_cast<int>(batch),
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }

    // The blocks on and above the diagonal of an m x m product, from pointer set `set`.
    void gemm_blocks(const plan_t& p, int set, cublasOperation_t ta, cublasOperation_t tb,
                     std::size_t k, std::size_t lda, std::size_t ldb, cudaDataType out) {
        const float one = 1.0f, zero = 0.0f;
        const std::size_t per = p.count * p.blocks;
        void** arrays =
            pointers_.get() + p.pointer_offset + static_cast<std::size_t>(set) * 3 * per;
        LOCO_CUBLAS_CHECK(cublasGemmBatchedEx(
            handle_.get(), ta, tb, static_cast<int>(p.q), static_cast<int>(p.q),
            static_cast<int>(k), &one, arrays, CUDA_R_16BF, static_cast<int>(lda), arrays + per,
            CUDA_R_16BF, static_cast<int>(ldb), &zero, arrays + 2 * per, out,
            static_cast<int>(p.m), static_cast<int>(per), CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT));
    }

    void run_batch(const plan_t& p, bool last, step_control* control, bool skip_nonfinite,
                   cudaStream_t stream) {
        const int steps = uploaded_->ns_steps;
        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        LOCO_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
        if (capture != cudaStreamCaptureStatusNone) {
            // The fewest any graph runs: which graph is replayed next is not known here.
            captured_steps_ = captured_steps_ == 0 ? steps : std::min(captured_steps_, steps);
        }
        detail::muon_pass_args pass{.desc = desc_.get() + p.first,
                                    .scalars = scalars_.get() + (&p - plans_.data()),
                                    .x = x0_,
                                    .partial = partial_,
                                    .scale = scale_,
                                    .control = control,
                                    .size = p.size,
                                    .stride = p.x_stride,
                                    .chunks = p.chunks,
                                    .skip_nonfinite = skip_nonfinite,
                                    .finish = false};
        const auto blocks = static_cast<std::uint32_t>(p.count * p.chunks);
        LOCO_CUDA_CHECK(detail::launch(detail::muon_input_kernel<>, blocks, stream, pass));
        const detail::muon_norm_args norm{.partial = partial_,
                                          .scale = scale_,
                                          .stats = stats_.get(),
                                          .params = params_.get(),
                                          .control = control,
                                          .chunks = p.chunks,
                                          .skip_nonfinite = skip_nonfinite};
        LOCO_CUDA_CHECK(detail::launch(detail::muon_norm_kernel<>,
                                       static_cast<std::uint32_t>(p.count), stream, norm));
        const detail::muon_rescale_args rescale{
            .x = x0_, .scale = scale_, .size = p.size, .stride = p.x_stride};
        LOCO_CUDA_CHECK(detail::launch(
            detail::muon_rescale_kernel<>,
            static_cast<std::uint32_t>(p.count * detail::muon_rescale_blocks), stream, rescale));

        const std::size_t m = p.m, n = p.n, mm = p.gram_stride, c = p.count;
        const auto tiles = static_cast<std::uint32_t>(p.count * p.pairs);
        loco::bf16* x = x0_;
        loco::bf16* y = x1_;
        for (int it = 0; it < steps; ++it) {
            // G1: A = X X^T. Wide: X^T is the n x m column-major view, A = (X^T)^T X^T; tall: X
            // is the m x n column-major view, A = X X^T. The first iteration's X is the
            // unnormalised input: A in fp32 (in S's buffer, free until G2), normalised and
            // completed by the scale pass; later ones go to bf16 directly.
            const cublasOperation_t ta = p.tall ? CUBLAS_OP_N : CUBLAS_OP_T;
            const cublasOperation_t tb = p.tall ? CUBLAS_OP_T : CUBLAS_OP_N;
            const std::size_t ld = p.tall ? m : n;
            const detail::muon_tile_args t{.gram_f = square_f_,
                                           .gram = gram_h_,
                                           .square = square_f_,
                                           .out = poly_h_,
                                           .scale = scale_,
                                           .params = params_.get(),
                                           .stride = mm,
                                           .m = static_cast<std::uint32_t>(m),
                                           .pairs = p.pairs,
                                           .iteration = static_cast<std::uint32_t>(it)};
            const bool first = it == 0;
            void* gram_out = first ? static_cast<void*>(square_f_) : static_cast<void*>(gram_h_);
            const cudaDataType gram_type = first ? CUDA_R_32F : CUDA_R_16BF;
            if (p.k == 1) {
                gemm(ta, tb, m, m, n, x, ld, p.x_stride, x, ld, p.x_stride, gram_out, gram_type,
                     m, mm, c);
            } else {
                gemm_blocks(p, first ? 0 : x == x0_ ? 1 : 2, ta, tb, n, ld, ld, gram_type);
            }
            if (first) {
                LOCO_CUDA_CHECK(detail::launch(detail::muon_scale_kernel<>, tiles, stream, t));
            } else if (p.k > 1) {
                LOCO_CUDA_CHECK(detail::launch(detail::muon_mirror_kernel<>, tiles, stream, t));
            }
            // G2: S = A A, in fp32 (A symmetric and complete).
            if (p.k == 1) {
                gemm(CUBLAS_OP_N, CUBLAS_OP_N, m, m, m, gram_h_, m, mm, gram_h_, m, mm, square_f_,
                     CUDA_R_32F, m, mm, c);
            } else {
                gemm_blocks(p, 3, CUBLAS_OP_N, CUBLAS_OP_N, m, m, m, CUDA_R_32F);
            }
            // E2: B = a I + b A + c S, in bf16.
            LOCO_CUDA_CHECK(detail::launch(detail::muon_poly_kernel<>, tiles, stream, t));
            // G3: X <- B X. Wide: (B X)^T = X^T B, an n x m column-major product; tall: B X.
            if (p.tall) {
                gemm(CUBLAS_OP_N, CUBLAS_OP_N, m, n, m, poly_h_, m, mm, x, m, p.x_stride, y,
                     CUDA_R_16BF, m, p.x_stride, c);
            } else {
                gemm(CUBLAS_OP_N, CUBLAS_OP_N, n, m, m, x, n, p.x_stride, poly_h_, m, mm, y,
                     CUDA_R_16BF, n, p.x_stride, c);
            }
            std::swap(x, y);
        }

        pass.x = x;
        pass.finish = last;
        LOCO_CUDA_CHECK(detail::launch(detail::muon_apply_kernel<>, blocks, stream, pass));
    }

    std::vector<muon_matrix> matrices_;
    muon_options options_;
    int device_ = 0;
    std::vector<plan_t> plans_;
    std::vector<detail::muon_desc> descs_host_;
    std::size_t pointer_entries_ = 0;

    device_buffer<std::byte> workspace_;
    loco::bf16* x0_ = nullptr;
    loco::bf16* x1_ = nullptr;
    float* square_f_ = nullptr;
    loco::bf16* gram_h_ = nullptr;
    loco::bf16* poly_h_ = nullptr;
    double* partial_ = nullptr;
    detail::muon_scale* scale_ = nullptr;

    device_buffer<detail::muon_desc> desc_;
    device_buffer<detail::muon_params> params_;
    device_buffer<inner::muon::scalars> scalars_;
    device_buffer<detail::muon_stats> stats_;
    device_buffer<void*> pointers_;
    device_buffer<std::byte> cublas_workspace_;
    cublas_handle handle_;

    std::optional<hyper> uploaded_;
    int captured_steps_ = 0;  // the fewest Newton-Schulz iterations any graph captured
    detail::muon_params staged_params_{};
    std::vector<inner::muon::scalars> staged_scalars_;
};

}  // namespace loco::backend::cuda
