// A CPU emulation of the slice of cuBLAS loco uses (tests/cuda/emulator/run.sh), with cuBLAS's
// conventions exactly: column-major matrices, C = alpha op(A) op(B) + beta C with op(X) = X or
// X^T, the leading-dimension rules and status codes of the real library, C not read when beta is
// 0, alpha and beta read at the call (CUBLAS_POINTER_MODE_HOST) or when the product runs
// (CUBLAS_POINTER_MODE_DEVICE). Products run on the handle's stream like kernels: at once, or
// recorded while the stream captures a graph.
//
// Types: A and B both fp32 or both bf16, C fp32 or (with bf16 inputs) bf16, compute
// CUBLAS_COMPUTE_32F. Products are accumulated in double and rounded once to fp32, then to C's
// type (round to nearest even): an idealised fp32 accumulation, so the emulator checks the
// logic (layouts, blocks, strides, pointer arrays), not the GPU's summation order.
//
// What a GPU would report as an illegal address is a loud abort here: every matrix a product
// touches must lie inside one allocation of emulated device memory, and C must not overlap A or
// B (undefined in cuBLAS; the emulator reads the inputs before writing, so it would hide the bug).
#pragma once

// Lets a test insist on bit-exact agreement with a host model that sums products the same way.
#define LOCO_EMULATED_CUBLAS 1

#include "cuda_runtime.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasPointerMode_t { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 };
enum cublasMath_t {
    CUBLAS_DEFAULT_MATH = 0,
    CUBLAS_TENSOR_OP_MATH = 1,
    CUBLAS_PEDANTIC_MATH = 2,
    CUBLAS_TF32_TENSOR_OP_MATH = 3,
    CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,
};
enum cublasComputeType_t {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_64F = 70,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
typedef cudaDataType_t cudaDataType;

struct emu_cublas_context {
    cudaStream_t stream = nullptr;
    void* workspace = nullptr;
    std::size_t workspace_bytes = 0;
    cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
    int math = CUBLAS_DEFAULT_MATH;
};
typedef emu_cublas_context* cublasHandle_t;

namespace emu_blas {

[[noreturn]] inline void fault(const char* what) {
    std::fprintf(
        stderr, "emulated cuBLAS: %s (an illegal address or undefined behaviour on a GPU)\n", what);
    std::abort();
}

// [p, p + bytes) inside one allocation of emulated device (or managed) memory.
inline bool in_device_memory(const void* p, std::size_t bytes) {
    std::lock_guard<std::mutex> l(emu::mem_mutex());
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    auto it = emu::allocations().upper_bound(a);
    if (it == emu::allocations().begin()) return false;
    --it;
    const auto& alloc = it->second;
    if (alloc.type != cudaMemoryTypeDevice && alloc.type != cudaMemoryTypeManaged) return false;
    return a >= it->first && a + bytes <= it->first + alloc.size;
}

inline std::size_t size_of(cudaDataType t) {
    return t == CUDA_R_32F ? 4 : 2;
}

inline float load(const void* p, cudaDataType t, std::size_t i) {
    if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
    std::uint16_t b;
    std::memcpy(&b, static_cast<const char*>(p) + 2 * i, 2);
    return __uint_as_float(static_cast<unsigned>(b) << 16);
}

inline void store(void* p, cudaDataType t, std::size_t i, float v) {
    if (t == CUDA_R_32F) {
        static_cast<float*>(p)[i] = v;
        return;
    }
    const unsigned u = __float_as_uint(v);
    std::uint16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b = static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    } else {
        b = static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    std::memcpy(static_cast<char*>(p) + 2 * i, &b, 2);
}

struct gemm_shape {
    cublasOperation_t ta, tb;
    int m, n, k;
    cudaDataType at, bt, ct;
    int lda, ldb, ldc;
};

// Bytes spanned by a column-major rows x cols matrix with leading dimension ld.
inline std::size_t span(int rows, int cols, int ld, cudaDataType t) {
    if (rows == 0 || cols == 0) return 0;
    return (static_cast<std::size_t>(rows - 1) + static_cast<std::size_t>(cols - 1) * ld + 1) *
           size_of(t);
}

inline bool overlaps(const void* a, std::size_t an, const void* b, std::size_t bn) {
    const auto x = reinterpret_cast<std::uintptr_t>(a), y = reinterpret_cast<std::uintptr_t>(b);
    return an != 0 && bn != 0 && x < y + bn && y < x + an;
}

// One product, C = alpha op(A) op(B) + beta C.
inline void gemm_one(const gemm_shape& s, float alpha, const void* A, const void* B, float beta,
                     void* C) {
    const bool an = s.ta == CUBLAS_OP_N, bn = s.tb == CUBLAS_OP_N;
    const std::size_t a_bytes = an ? span(s.m, s.k, s.lda, s.at) : span(s.k, s.m, s.lda, s.at);
    const std::size_t b_bytes = bn ? span(s.k, s.n, s.ldb, s.bt) : span(s.n, s.k, s.ldb, s.bt);
    const std::size_t c_bytes = span(s.m, s.n, s.ldc, s.ct);
    if (s.k > 0 && (!in_device_memory(A, a_bytes) || !in_device_memory(B, b_bytes)))
        fault("an input matrix is not inside one allocation of device memory");
    if (!in_device_memory(C, c_bytes))
        fault("the output matrix is not inside one allocation of device memory");
    if (s.k > 0 && (overlaps(C, c_bytes, A, a_bytes) || overlaps(C, c_bytes, B, b_bytes)))
        fault("the output overlaps an input");
    const std::size_t m = s.m, n = s.n, k = s.k;
    // op(A) as m x k and op(B) as k x n, both row-major, in double.
    std::vector<double> a(m * k), b(k * n);
    for (std::size_t i = 0; i < m; ++i)
        for (std::size_t l = 0; l < k; ++l)
            a[i * k + l] = load(A, s.at, an ? i + l * s.lda : l + i * s.lda);
    for (std::size_t l = 0; l < k; ++l)
        for (std::size_t j = 0; j < n; ++j)
            b[l * n + j] = load(B, s.bt, bn ? l + j * s.ldb : j + l * s.ldb);
    std::vector<double> acc(m * n, 0.0);
    for (std::size_t i = 0; i < m; ++i)
        for (std::size_t l = 0; l < k; ++l) {
            const double x = a[i * k + l];
            for (std::size_t j = 0; j < n; ++j) acc[i * n + j] += x * b[l * n + j];
        }
    for (std::size_t i = 0; i < m; ++i)
        for (std::size_t j = 0; j < n; ++j) {
            const std::size_t at = i + j * s.ldc;
            float r = alpha * static_cast<float>(acc[i * n + j]);
            if (beta != 0.0f) r += beta * load(C, s.ct, at);
            store(C, s.ct, at, r);
        }
}

inline cublasStatus_t check(cublasHandle_t h, const gemm_shape& s, int batch,
                            cublasComputeType_t compute) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    const auto op_ok = [](cublasOperation_t o) {
        return o == CUBLAS_OP_N || o == CUBLAS_OP_T || o == CUBLAS_OP_C;
    };
    if (!op_ok(s.ta) || !op_ok(s.tb)) return CUBLAS_STATUS_INVALID_VALUE;
    if (s.m < 0 || s.n < 0 || s.k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const auto at_least = [](int v) { return v < 1 ? 1 : v; };
    if (s.lda < at_least(s.ta == CUBLAS_OP_N ? s.m : s.k)) return CUBLAS_STATUS_INVALID_VALUE;
    if (s.ldb < at_least(s.tb == CUBLAS_OP_N ? s.k : s.n)) return CUBLAS_STATUS_INVALID_VALUE;
    if (s.ldc < at_least(s.m)) return CUBLAS_STATUS_INVALID_VALUE;
    if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const bool f32 = s.at == CUDA_R_32F && s.bt == CUDA_R_32F && s.ct == CUDA_R_32F;
    const bool bf16 =
        s.at == CUDA_R_16BF && s.bt == CUDA_R_16BF && (s.ct == CUDA_R_16BF || s.ct == CUDA_R_32F);
    if (!f32 && !bf16) return CUBLAS_STATUS_NOT_SUPPORTED;
    return CUBLAS_STATUS_SUCCESS;
}

// The scalars as cuBLAS reads them: now in host pointer mode, when the product runs otherwise.
struct scalars {
    bool device;
    float alpha, beta;
    const float* alpha_at;
    const float* beta_at;
    float a() const { return device ? *alpha_at : alpha; }
    float b() const { return device ? *beta_at : beta; }
};
inline scalars read_scalars(cublasHandle_t h, const void* alpha, const void* beta) {
    const auto* a = static_cast<const float*>(alpha);
    const auto* b = static_cast<const float*>(beta);
    if (h->pointer_mode == CUBLAS_POINTER_MODE_DEVICE) return {true, 0.0f, 0.0f, a, b};
    return {false, *a, *b, nullptr, nullptr};
}

}  // namespace emu_blas

inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
    if (h == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *h = new emu_cublas_context;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
// As in cuBLAS, setting the stream also returns the handle to the library's own workspace.
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    h->workspace = nullptr;
    h->workspace_bytes = 0;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void* p, std::size_t bytes) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes != 0 && (p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 256 != 0))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (bytes != 0 && !emu_blas::in_device_memory(p, bytes)) return CUBLAS_STATUS_INVALID_VALUE;
    h->workspace = p;
    h->workspace_bytes = bytes;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->pointer_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}
inline const char* cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS:
            return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED:
            return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_ALLOC_FAILED:
            return "CUBLAS_STATUS_ALLOC_FAILED";
        case CUBLAS_STATUS_INVALID_VALUE:
            return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_ARCH_MISMATCH:
            return "CUBLAS_STATUS_ARCH_MISMATCH";
        case CUBLAS_STATUS_MAPPING_ERROR:
            return "CUBLAS_STATUS_MAPPING_ERROR";
        case CUBLAS_STATUS_EXECUTION_FAILED:
            return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_INTERNAL_ERROR:
            return "CUBLAS_STATUS_INTERNAL_ERROR";
        case CUBLAS_STATUS_NOT_SUPPORTED:
            return "CUBLAS_STATUS_NOT_SUPPORTED";
        case CUBLAS_STATUS_LICENSE_ERROR:
            return "CUBLAS_STATUS_LICENSE_ERROR";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
inline const char* cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS:
            return "success";
        case CUBLAS_STATUS_NOT_INITIALIZED:
            return "the library was not initialized";
        case CUBLAS_STATUS_INVALID_VALUE:
            return "an invalid numeric value was used as an argument";
        case CUBLAS_STATUS_NOT_SUPPORTED:
            return "the functionality requested is not supported";
        default:
            return "emulated cuBLAS error";
    }
}

inline cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
    const void* alpha, const void* A, cudaDataType at, int lda, long long sa, const void* B,
    cudaDataType bt, int ldb, long long sb, const void* beta, void* C, cudaDataType ct, int ldc,
    long long sc, int batch, cublasComputeType_t compute, cublasGemmAlgo_t) {
    const emu_blas::gemm_shape s{ta, tb, m, n, k, at, bt, ct, lda, ldb, ldc};
    if (const cublasStatus_t st = emu_blas::check(h, s, batch, compute);
        st != CUBLAS_STATUS_SUCCESS)
        return st;
    if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    const emu_blas::scalars sc_ = emu_blas::read_scalars(h, alpha, beta);
    emu::enqueue(h->stream, [=] {
        for (int i = 0; i < batch; ++i) {
            emu_blas::gemm_one(
                s, sc_.a(),
                static_cast<const char*>(A) +
                    i * sa * static_cast<long long>(emu_blas::size_of(at)),
                static_cast<const char*>(B) +
                    i * sb * static_cast<long long>(emu_blas::size_of(bt)),
                sc_.b(),
                static_cast<char*>(C) + i * sc * static_cast<long long>(emu_blas::size_of(ct)));
        }
    });
    return CUBLAS_STATUS_SUCCESS;
}

// The pointer arrays are device memory and, as on a GPU, read when the product runs.
inline cublasStatus_t cublasGemmBatchedEx(cublasHandle_t h, cublasOperation_t ta,
                                          cublasOperation_t tb, int m, int n, int k,
                                          const void* alpha, const void* const A[], cudaDataType at,
                                          int lda, const void* const B[], cudaDataType bt, int ldb,
                                          const void* beta, void* const C[], cudaDataType ct,
                                          int ldc, int batch, cublasComputeType_t compute,
                                          cublasGemmAlgo_t) {
    const emu_blas::gemm_shape s{ta, tb, m, n, k, at, bt, ct, lda, ldb, ldc};
    if (const cublasStatus_t st = emu_blas::check(h, s, batch, compute);
        st != CUBLAS_STATUS_SUCCESS)
        return st;
    if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    const emu_blas::scalars sc_ = emu_blas::read_scalars(h, alpha, beta);
    emu::enqueue(h->stream, [=] {
        const std::size_t bytes = static_cast<std::size_t>(batch) * sizeof(void*);
        if (!emu_blas::in_device_memory(A, bytes) || !emu_blas::in_device_memory(B, bytes) ||
            !emu_blas::in_device_memory(C, bytes))
            emu_blas::fault("a pointer array is not in device memory");
        for (int i = 0; i < batch; ++i) emu_blas::gemm_one(s, sc_.a(), A[i], B[i], sc_.b(), C[i]);
    });
    return CUBLAS_STATUS_SUCCESS;
}
