#pragma once
// cuBLAS for loco: failures as loco::cuda_error (a cublas_error carrying the cuBLAS status; out of
// memory as loco::cuda_out_of_memory, a std::bad_alloc), and an owned handle. Every cuBLAS call
// in loco goes through LOCO_CUBLAS_CHECK.
//
// cuBLAS reports its own status codes, not CUDA runtime errors; cublas_error::code() maps the
// status to the nearest runtime error so that code catching loco::cuda_error sees a meaningful
// code, and status() keeps the original. A kernel fault inside a cuBLAS routine surfaces like any
// other, at the next synchronising runtime call, as a plain cuda_error.

#include <loco/backend/cuda/error.hpp>
#include <loco/error.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>
#include <utility>

namespace loco {

struct cublas_error : cuda_error {
    cublas_error(cublasStatus_t status, cudaError_t code, const std::string& what)
        : cuda_error(code, what), status_(status) {}
    cublasStatus_t status() const noexcept { return status_; }

private:
    cublasStatus_t status_;
};

namespace backend::cuda::detail {

inline cudaError_t runtime_error_of(cublasStatus_t s) noexcept {
    switch (s) {
        case CUBLAS_STATUS_INVALID_VALUE: return cudaErrorInvalidValue;
        case CUBLAS_STATUS_ALLOC_FAILED: return cudaErrorMemoryAllocation;
        case CUBLAS_STATUS_NOT_SUPPORTED:
        case CUBLAS_STATUS_ARCH_MISMATCH: return cudaErrorNotSupported;
        default: return cudaErrorUnknown;
    }
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t s, const char* call, const char* file,
                                            int line) {
    std::string what = std::string("loco: cuBLAS call ") + call + " failed at " + file + ":" +
                       std::to_string(line) + ": " + cublasGetStatusName(s) + " (" +
                       cublasGetStatusString(s) + ")";
    // Out of memory as the runtime's is (backend/cuda/error.hpp): a std::bad_alloc.
    if (s == CUBLAS_STATUS_ALLOC_FAILED) throw cuda_out_of_memory(what);
    throw cublas_error(s, runtime_error_of(s), what);
}

inline void check(cublasStatus_t s, const char* call, const char* file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) {
        throw_cublas_error(s, call, file, line);
    }
}

}  // namespace backend::cuda::detail

namespace backend::cuda {

// An owned cuBLAS handle. Default-constructed it holds none; create() makes one on the device
// current at the call (cublasCreate initialises cuBLAS on first use: expensive, so not implicit).
class cublas_handle {
public:
    cublas_handle() = default;
    static cublas_handle create() {
        cublas_handle h;
        detail::check(cublasCreate(&h.h_), "cublasCreate", __FILE__, __LINE__);
        return h;
    }
    ~cublas_handle() {
        if (h_) {
            static_cast<void>(cublasDestroy(h_));
        }
    }
    cublas_handle(cublas_handle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
    cublas_handle& operator=(cublas_handle&& o) noexcept {
        if (this != &o) {
            if (h_) {
                static_cast<void>(cublasDestroy(h_));
            }
            h_ = std::exchange(o.h_, nullptr);
        }
        return *this;
    }
    cublas_handle(const cublas_handle&) = delete;
    cublas_handle& operator=(const cublas_handle&) = delete;

    cublasHandle_t get() const noexcept { return h_; }

private:
    cublasHandle_t h_ = nullptr;
};

}  // namespace backend::cuda
}  // namespace loco

// Throws loco::cublas_error (a loco::cuda_error; loco::cuda_out_of_memory when cuBLAS could not
// allocate) when the cuBLAS call does not return CUBLAS_STATUS_SUCCESS.
#define LOCO_CUBLAS_CHECK(...) \
    ::loco::backend::cuda::detail::check((__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__)
