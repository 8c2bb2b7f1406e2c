#pragma once
// A host-memory view of a device communicator: every collective copies its host buffers into
// device scratch buffers, runs the wrapped communicator (NCCL, cuda_replicas) on them and copies
// the result back. It lets code written for host memory (the compressed exchange schemes, which
// encode and decode on the host) run over a GPU communicator. The bytes sent are the wrapped
// communicator's.
//
// Split-phase: start_all_reduce / start_all_gather copy the host buffers to the device, start
// the wrapped communicator's split-phase collective and return; finish() finishes it and copies
// the result back to the host. Whatever overlap the wrapped communicator has (comm::nccl runs on
// its own stream) survives the staging. Each collective in flight has its own device buffers,
// taken from a pool that keeps them between calls.

#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace loco::comm {

class cuda_staging final : public split_phase_communicator {
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
    std::unique_ptr<request::operation> do_start_all_reduce(tensor_view<float> data,
                                                            reduce_op op) override {
        buffer d = take(data.size_bytes());
        to_device(d.get(), data.data, data.size_bytes());
        request inner = next_.start_all_reduce(
            cuda_tensor(reinterpret_cast<float*>(d.get()), data.size), op);
        return std::make_unique<staged>(*this, std::move(inner), std::move(d), buffer{},
                                        data.data, data.size_bytes());
    }
    std::unique_ptr<request::operation> do_start_all_gather(
        tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        buffer s = take(send.size);
        buffer r = take(recv.size);
        to_device(s.get(), send.data, send.size);
        request inner =
            next_.start_all_gather(cuda_tensor(static_cast<const std::byte*>(s.get()), send.size),
                                   cuda_tensor(r.get(), recv.size));
        return std::make_unique<staged>(*this, std::move(inner), std::move(r), std::move(s),
                                        recv.data, recv.size);
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        buffer s = take(send.size);
        buffer r = take(recv.size);
        to_device(s.get(), send.data, send.size);
        next_.all_to_all(cuda_tensor(static_cast<const std::byte*>(s.get()), send.size),
                         cuda_tensor(r.get(), recv.size));
        to_host(recv.data, r.get(), recv.size);
        give(std::move(s));
        give(std::move(r));
    }
    void do_broadcast(tensor_view<std::byte> data, int root) override {
        buffer d = take(data.size);
        to_device(d.get(), data.data, data.size);
        next_.broadcast(cuda_tensor(d.get(), data.size), root);
        to_host(data.data, d.get(), data.size);
        give(std::move(d));
    }
    void do_barrier() override { next_.barrier(); }

private:
    using buffer = backend::cuda::device_buffer<std::byte>;

    // A collective of the wrapped communicator in flight, with the device buffers it uses and
    // where its result goes on the host.
    class staged final : public request::operation {
    public:
        staged(cuda_staging& owner, request inner, buffer result, buffer other, void* host,
               std::size_t bytes)
            : owner_(owner), inner_(std::move(inner)), result_(std::move(result)),
              other_(std::move(other)), host_(host), bytes_(bytes) {}
        ~staged() override {
            if (inner_.pending()) {
                inner_ = request{};  // waits for the wrapped collective before the buffers go back
            }
            owner_.give(std::move(result_));
            owner_.give(std::move(other_));
        }
        // The wrapped communicator's refusal (comm::mpi off MPI's main thread) keeps this
        // request pending too.
        void check_finish() override { inner_.check_finish(); }
        void wait() override {
            inner_.finish();
            to_host(host_, result_.get(), bytes_);
        }

    private:
        cuda_staging& owner_;
        request inner_;
        buffer result_, other_;
        void* host_;
        std::size_t bytes_;
    };

    // A device buffer of at least `bytes` from the pool, or a new one. Never null, so that empty
    // collectives still pass valid device pointers.
    buffer take(std::size_t bytes) {
        for (auto it = spare_.begin(); it != spare_.end(); ++it) {
            if (it->size() >= bytes) {
                buffer b = std::move(*it);
                spare_.erase(it);
                return b;
            }
        }
        return buffer(bytes == 0 ? 1 : bytes);
    }
    void give(buffer b) noexcept {
        if (!b.empty()) {
            try {
                spare_.push_back(std::move(b));
            } catch (...) {
                // Out of host memory for the pool's list: the buffer is freed instead.
            }
        }
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
    std::vector<buffer> spare_;  // device buffers of finished collectives, for the next ones
};

}  // namespace loco::comm
