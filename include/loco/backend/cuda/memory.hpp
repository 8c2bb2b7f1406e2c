#pragma once
// RAII owners of CUDA resources (device memory, streams, events, graphs) and the pointer checks
// that tell device memory from host memory.
//
// Destructors never throw: a failure while releasing (typically after a kernel fault has made the
// context unusable) is dropped, since the error was already reported by the call that saw it.

#include <loco/backend/cuda/error.hpp>
#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace loco::backend::cuda {

// cudaMalloc returns 256-byte aligned memory; the kernels' 16-byte vector paths rely on at least
// that for every buffer loco allocates.
inline constexpr std::size_t allocation_alignment = 256;

// An owned, uninitialised array of n objects of T in device memory (cudaMalloc).
template <class T>
class device_buffer {
public:
    device_buffer() = default;
    explicit device_buffer(std::size_t n) : size_(n) {
        if (n != 0) {
            void* p = nullptr;
            LOCO_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
            ptr_ = static_cast<T*>(p);
        }
    }
    ~device_buffer() { reset(); }
    device_buffer(device_buffer&& o) noexcept
        : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    device_buffer& operator=(device_buffer&& o) noexcept {
        if (this != &o) {
            reset();
            ptr_ = std::exchange(o.ptr_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    device_buffer(const device_buffer&) = delete;
    device_buffer& operator=(const device_buffer&) = delete;

    T* get() const noexcept { return ptr_; }
    std::size_t size() const noexcept { return size_; }
    std::size_t size_bytes() const noexcept { return size_ * sizeof(T); }
    bool empty() const noexcept { return size_ == 0; }

    // Sets every byte to zero (asynchronously on `stream`).
    void zero(cudaStream_t stream = nullptr) {
        if (size_ != 0) {
            LOCO_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, size_bytes(), stream));
        }
    }
    // Copies host data in; blocks until the data is on the device, so that work on any stream
    // may use it (a cudaMemcpy from pageable memory may return before its DMA is done, ordered
    // only on the legacy default stream). `host` may be shorter than the buffer.
    void upload(std::span<const T> host) {
        if (host.size() > size_) {
            throw invalid_argument("loco: device_buffer::upload of " + std::to_string(host.size()) +
                                   " elements into a buffer of " + std::to_string(size_));
        }
        if (!host.empty()) {
            LOCO_CUDA_CHECK(
                cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
            LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
        }
    }
    // The whole buffer, copied out, after the work enqueued on the legacy default stream (work on
    // other streams must be synchronised first).
    std::vector<T> download() const {
        std::vector<T> out(size_);
        if (size_ != 0) {
            LOCO_CUDA_CHECK(cudaMemcpy(out.data(), ptr_, size_bytes(), cudaMemcpyDeviceToHost));
        }
        return out;
    }

private:
    void reset() noexcept {
        if (ptr_) {
            static_cast<void>(cudaFree(ptr_));
            ptr_ = nullptr;
        }
        size_ = 0;
    }

    T* ptr_ = nullptr;
    std::size_t size_ = 0;
};

// An owned array of n objects of T in pinned (page-locked) host memory: the host side of
// asynchronous copies that must not be staged.
template <class T>
class pinned_buffer {
public:
    pinned_buffer() = default;
    explicit pinned_buffer(std::size_t n) : size_(n) {
        if (n != 0) {
            void* p = nullptr;
            LOCO_CUDA_CHECK(cudaMallocHost(&p, n * sizeof(T)));
            ptr_ = static_cast<T*>(p);
        }
    }
    ~pinned_buffer() {
        if (ptr_) {
            static_cast<void>(cudaFreeHost(ptr_));
        }
    }
    pinned_buffer(pinned_buffer&& o) noexcept
        : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    pinned_buffer& operator=(pinned_buffer&& o) noexcept {
        if (this != &o) {
            if (ptr_) {
                static_cast<void>(cudaFreeHost(ptr_));
            }
            ptr_ = std::exchange(o.ptr_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    pinned_buffer(const pinned_buffer&) = delete;
    pinned_buffer& operator=(const pinned_buffer&) = delete;

    T* get() const noexcept { return ptr_; }
    T& operator[](std::size_t i) const noexcept { return ptr_[i]; }
    std::size_t size() const noexcept { return size_; }

private:
    T* ptr_ = nullptr;
    std::size_t size_ = 0;
};

// An owned CUDA stream. cudaStreamNonBlocking: it never waits for the legacy default stream.
class stream {
public:
    explicit stream(unsigned flags = cudaStreamNonBlocking) {
        LOCO_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, flags));
    }
    ~stream() {
        if (s_) {
            static_cast<void>(cudaStreamDestroy(s_));
        }
    }
    stream(stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
    stream& operator=(stream&&) = delete;
    stream(const stream&) = delete;
    stream& operator=(const stream&) = delete;

    cudaStream_t get() const noexcept { return s_; }
    operator cudaStream_t() const noexcept { return s_; }
    void synchronize() const { LOCO_CUDA_CHECK(cudaStreamSynchronize(s_)); }

private:
    cudaStream_t s_ = nullptr;
};

// An owned CUDA event, without timing unless asked for (cheaper to record and wait on).
class event {
public:
    explicit event(unsigned flags = cudaEventDisableTiming) {
        LOCO_CUDA_CHECK(cudaEventCreateWithFlags(&e_, flags));
    }
    ~event() {
        if (e_) {
            static_cast<void>(cudaEventDestroy(e_));
        }
    }
    event(event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
    event& operator=(event&&) = delete;
    event(const event&) = delete;
    event& operator=(const event&) = delete;

    cudaEvent_t get() const noexcept { return e_; }
    operator cudaEvent_t() const noexcept { return e_; }
    void record(cudaStream_t s) { LOCO_CUDA_CHECK(cudaEventRecord(e_, s)); }

private:
    cudaEvent_t e_ = nullptr;
};

// Makes `waiter` wait (on the device, not the host) for everything enqueued on `producer` so far.
inline void stream_wait(cudaStream_t waiter, cudaStream_t producer, cudaEvent_t scratch) {
    if (waiter == producer) {
        return;
    }
    LOCO_CUDA_CHECK(cudaEventRecord(scratch, producer));
    LOCO_CUDA_CHECK(cudaStreamWaitEvent(waiter, scratch, 0));
}

// A captured CUDA graph, instantiated for replay.
class graph {
public:
    graph() = default;
    // Ends the capture begun on `s` and instantiates what was captured.
    static graph end_capture(cudaStream_t s) {
        graph g;
        LOCO_CUDA_CHECK(cudaStreamEndCapture(s, &g.graph_));
        LOCO_CUDA_CHECK(cudaGraphInstantiate(&g.exec_, g.graph_, 0));
        return g;
    }
    ~graph() {
        if (exec_) {
            static_cast<void>(cudaGraphExecDestroy(exec_));
        }
        if (graph_) {
            static_cast<void>(cudaGraphDestroy(graph_));
        }
    }
    graph(graph&& o) noexcept
        : graph_(std::exchange(o.graph_, nullptr)), exec_(std::exchange(o.exec_, nullptr)) {}
    graph& operator=(graph&&) = delete;
    graph(const graph&) = delete;
    graph& operator=(const graph&) = delete;

    void launch(cudaStream_t s) const { LOCO_CUDA_CHECK(cudaGraphLaunch(exec_, s)); }

private:
    cudaGraph_t graph_ = nullptr;
    cudaGraphExec_t exec_ = nullptr;
};

// Makes `device` current for the lifetime of the guard, then restores the previous one.
class device_guard {
public:
    explicit device_guard(int device) {
        LOCO_CUDA_CHECK(cudaGetDevice(&previous_));
        if (device != previous_) {
            LOCO_CUDA_CHECK(cudaSetDevice(device));
        }
        current_ = device;
    }
    ~device_guard() {
        if (current_ != previous_) {
            static_cast<void>(cudaSetDevice(previous_));
        }
    }
    device_guard(const device_guard&) = delete;
    device_guard& operator=(const device_guard&) = delete;

private:
    int previous_ = 0;
    int current_ = 0;
};

inline int current_device() {
    int d = 0;
    LOCO_CUDA_CHECK(cudaGetDevice(&d));
    return d;
}

// Where a pointer points, as the CUDA driver knows it.
struct pointer_info {
    cudaMemoryType type = cudaMemoryTypeUnregistered;
    int device = -1;  // the owning device for device and managed memory
};

inline pointer_info query_pointer(const void* p) {
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, p);
    if (err == cudaErrorInvalidValue) {
        // An address CUDA knows nothing about (some drivers answer so for unmapped device
        // addresses): not usable device memory.
        static_cast<void>(cudaGetLastError());
        return {};
    }
    LOCO_CUDA_CHECK(err);
    return {attr.type, attr.device};
}

// True when a kernel on `device` may dereference p as ordinary device memory: memory allocated on
// that device (cudaMalloc, cudaMallocAsync pools, VMM) or managed memory. Pinned host memory is
// reachable too but at PCIe speed, so it is refused like pageable host memory.
inline bool is_device_memory_on(const void* p, int device) {
    const pointer_info info = query_pointer(p);
    if (info.type == cudaMemoryTypeManaged) {
        return true;
    }
    return info.type == cudaMemoryTypeDevice && info.device == device;
}

inline std::string describe_pointer(const void* p) {
    const pointer_info info = query_pointer(p);
    switch (info.type) {
        case cudaMemoryTypeUnregistered: return "host memory (not known to CUDA)";
        case cudaMemoryTypeHost: return "pinned host memory";
        case cudaMemoryTypeDevice: return "device memory of GPU " + std::to_string(info.device);
        case cudaMemoryTypeManaged: return "managed memory";
    }
    return "memory of unknown type";
}

}  // namespace loco::backend::cuda
