#pragma once
// GPU test support: device detection for skips, checked CUDA calls, and a device buffer.

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

namespace loco_test {

// True when a CUDA device is usable; `why` says why not otherwise.
inline bool gpu_available(std::string* why = nullptr) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        if (why) {
            *why = err != cudaSuccess ? cudaGetErrorString(err) : "no CUDA device";
        }
        return false;
    }
    return true;
}

inline void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
    }
}

// A child process of the test program (started by a test with --loco-child=<what>) runs this
// instead of the tests: for failures that ruin the CUDA context. Returns the exit code.
int loco_test_child(const std::string& what);

template <class T>
class device_buffer {
public:
    explicit device_buffer(const std::vector<T>& host) : n_(host.size()) {
        // One byte for an empty buffer, so that get() is a real device pointer; nothing to copy.
        check_cuda(cudaMalloc(&ptr_, n_ == 0 ? 1 : bytes()), "cudaMalloc");
        if (n_ != 0) {
            check_cuda(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
        }
    }
    ~device_buffer() { cudaFree(ptr_); }
    device_buffer(const device_buffer&) = delete;
    device_buffer& operator=(const device_buffer&) = delete;

    T* get() const { return ptr_; }
    std::vector<T> to_host() const {
        std::vector<T> out(n_);
        if (n_ != 0) {
            check_cuda(cudaMemcpy(out.data(), ptr_, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
        }
        return out;
    }

private:
    std::size_t bytes() const { return n_ * sizeof(T); }
    T* ptr_ = nullptr;
    std::size_t n_;
};

}  // namespace loco_test
