#pragma once
// loco::cuda_error and the checks that raise it. Every CUDA runtime call in loco goes through
// LOCO_CUDA_CHECK, so a failure surfaces as an exception naming the call, its file and line and
// the CUDA error, at the first host call that can see it: launch failures at the launch, faults
// inside a kernel at the next synchronising call (CUDA reports those asynchronously).

#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <new>
#include <stdexcept>
#include <string>

namespace loco {

// A CUDA runtime call failed. code() is the CUDA error; what() names the call and where it was
// made. After a fault inside a kernel (an illegal address, a trap) the CUDA context is unusable
// for the rest of the process: every later call fails with the same code.
struct cuda_error : error {
    cuda_error(cudaError_t code, const std::string& what) : error(what), code_(code) {}
    cudaError_t code() const noexcept { return code_; }

private:
    cudaError_t code_;
};

// Out of memory (cudaErrorMemoryAllocation: device memory, or pinned host memory): a
// std::bad_alloc, not a cuda_error, because it is handled as running out of host memory is. The
// failing rank alone has it, before it posted the collective it was allocating for, and its peers
// cannot learn of it: the sync pipeline raises it and leaves the handle out of step
// (docs/reliability.md) where recording it as a failure to agree on would leave the ranks one
// collective apart. what() names the call as cuda_error does.
struct cuda_out_of_memory : std::bad_alloc {
    explicit cuda_out_of_memory(const std::string& what) : what_(what) {}
    const char* what() const noexcept override { return what_.what(); }
    cudaError_t code() const noexcept { return cudaErrorMemoryAllocation; }

private:
    std::runtime_error what_;  // a reference-counted message: copies cannot throw
};

namespace backend::cuda::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* call, const char* file,
                                          int line) {
    // A failed call also sets the runtime's "last error"; clear it so that the next launch check
    // does not blame itself for this one. (Sticky errors stay: they cannot be cleared.)
    static_cast<void>(cudaGetLastError());
    std::string what = std::string("loco: CUDA call ") + call + " failed at " + file + ":" +
                       std::to_string(line) + ": " + cudaGetErrorName(err) + " (" +
                       cudaGetErrorString(err) + ")";
    if (err == cudaErrorMemoryAllocation) throw cuda_out_of_memory(what);
    throw cuda_error(err, what);
}

inline void check(cudaError_t err, const char* call, const char* file, int line) {
    if (err != cudaSuccess) {
        throw_cuda_error(err, call, file, line);
    }
}

}  // namespace backend::cuda::detail
}  // namespace loco

// Throws loco::cuda_error (loco::cuda_out_of_memory when out of memory) when the CUDA runtime
// call does not return cudaSuccess.
#define LOCO_CUDA_CHECK(...) \
    ::loco::backend::cuda::detail::check((__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__)
