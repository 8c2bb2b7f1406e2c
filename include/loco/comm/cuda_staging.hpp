#pragma once
// A host-memory view of a device communicator: every collective copies its host buffers into
// device scratch buffers, runs the wrapped communicator (NCCL, cuda_replicas) on them and copies
// the result back. It lets code written for host memory (the compressed exchange schemes, which
// encode and decode on the host) run over a GPU communicator. Each call is synchronous; the bytes
// sent are the wrapped communicator's.

#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

namespace loco::comm {

class cuda_staging final : public communicator {
public:
    explicit cuda_staging(communicator& device_comm) : next_(device_comm) {
        if (device_comm.space() != loco::memory_space::cuda) {
            throw memory_space_error("loco::comm::cuda_staging wraps a communicator of CUDA "
                                     "memory; " + std::string(device_comm.name()) +
                                     " moves host memory already");
        }
    }

    int rank() const noexcept override { return next_.rank(); }
    int size() const noexcept override { return next_.size(); }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return "cuda_staging"; }
    std::uint64_t bytes_sent() const noexcept override { return next_.bytes_sent(); }

protected:
    void do_all_reduce(tensor_view<float> data, reduce_op op) override {
        std::byte* d = scratch(a_, data.size_bytes());
        to_device(d, data.data, data.size_bytes());
        next_.all_reduce(cuda_tensor(reinterpret_cast<float*>(d), data.size), op);
        to_host(data.data, d, data.size_bytes());
    }
    void do_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        std::byte* s = scratch(a_, send.size);
        std::byte* r = scratch(b_, recv.size);
        to_device(s, send.data, send.size);
        next_.all_gather(cuda_tensor(static_cast<const std::byte*>(s), send.size),
                         cuda_tensor(r, recv.size));
        to_host(recv.data, r, recv.size);
    }
    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        std::byte* s = scratch(a_, send.size);
        std::byte* r = scratch(b_, recv.size);
        to_device(s, send.data, send.size);
        next_.all_to_all(cuda_tensor(static_cast<const std::byte*>(s), send.size),
                         cuda_tensor(r, recv.size));
        to_host(recv.data, r, recv.size);
    }
    void do_broadcast(tensor_view<std::byte> data, int root) override {
        std::byte* d = scratch(a_, data.size);
        to_device(d, data.data, data.size);
        next_.broadcast(cuda_tensor(d, data.size), root);
        to_host(data.data, d, data.size);
    }
    void do_barrier() override { next_.barrier(); }

private:
    // A device buffer of at least `bytes`, kept between calls (grown, never shrunk). Never null,
    // so that empty collectives still pass valid device pointers.
    static std::byte* scratch(backend::cuda::device_buffer<std::byte>& buf, std::size_t bytes) {
        if (buf.size() < bytes || buf.empty()) {
            buf = backend::cuda::device_buffer<std::byte>(bytes == 0 ? 1 : bytes);
        }
        return buf.get();
    }
    static void to_device(std::byte* d, const void* h, std::size_t bytes) {
        if (bytes != 0) {
            LOCO_CUDA_CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
        }
    }
    static void to_host(void* h, const std::byte* d, std::size_t bytes) {
        if (bytes != 0) {
            LOCO_CUDA_CHECK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
        }
    }

    communicator& next_;
    backend::cuda::device_buffer<std::byte> a_, b_;
};

}  // namespace loco::comm
