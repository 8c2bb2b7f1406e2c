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
//
// Streams. The copies run on the stream given at construction, which must be the stream the
// wrapped communicator orders its collectives with: comm::nccl's caller stream
// (set_caller_stream; the legacy default stream when none is set, the default here too). Each
// copy is enqueued on it and the host waits for that stream: the copy in before the wrapped
// collective starts (a copy from pageable memory may return before its DMA lands, and NCCL's
// own stream waits only for the caller stream), the copy out after it finished (with
// nccl_options::wait = false a finished collective orders only the caller stream, not the host;
// with the default wait the host waits for it and any stream will do). comm::cuda_replicas
// synchronises the host itself, so any stream of its device will do too. These host waits have
// no deadline of their own (the wrapped communicator's timeout covers only its own waits): with
// wait = false a collective whose peer is lost holds the stream, and the copy waits for good.
// Keep nccl_options::wait = true where a lost peer must be survivable (nccl.hpp).
//
// Threads and lifetime. A request may be finished or dropped on another thread than the one
// starting the next collectives, and after its cuda_staging is gone (communicator.hpp): the
// pool is shared by the staging and its requests behind a mutex, and its buffers are freed with
// the last of them. The wrapped communicator's own rules still apply to the wrapped request.

#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace loco::comm {

class cuda_staging final : public split_phase_communicator {
public:
    // `stream`: the stream device_comm orders its collectives with (comm::nccl's caller stream),
    // on which the copies run (see the top of the file).
    explicit cuda_staging(communicator& device_comm, cudaStream_t stream = nullptr)
        : next_(device_comm), stream_(stream), pool_(std::make_shared<pool>()) {
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
    // The stream the copies run on.
    cudaStream_t stream() const noexcept { return stream_; }

protected:
    std::unique_ptr<request::operation> do_start_all_reduce(tensor_view<float> data,
                                                            reduce_op op) override {
        buffer d = pool_->take(data.size_bytes());
        to_device(d.get(), data.data, data.size_bytes(), stream_);
        request inner = next_.start_all_reduce(
            cuda_tensor(reinterpret_cast<float*>(d.get()), data.size), op);
        return std::make_unique<staged>(pool_, stream_, std::move(inner), std::move(d), buffer{},
                                        data.data, data.size_bytes());
    }
    std::unique_ptr<request::operation> do_start_all_gather(
        tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        buffer s = pool_->take(send.size);
        buffer r = pool_->take(recv.size);
        to_device(s.get(), send.data, send.size, stream_);
        request inner =
            next_.start_all_gather(cuda_tensor(static_cast<const std::byte*>(s.get()), send.size),
                                   cuda_tensor(r.get(), recv.size));
        return std::make_unique<staged>(pool_, stream_, std::move(inner), std::move(r),
                                        std::move(s), recv.data, recv.size);
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        buffer s = pool_->take(send.size);
        buffer r = pool_->take(recv.size);
        to_device(s.get(), send.data, send.size, stream_);
        next_.all_to_all(cuda_tensor(static_cast<const std::byte*>(s.get()), send.size),
                         cuda_tensor(r.get(), recv.size));
        to_host(recv.data, r.get(), recv.size, stream_);
        pool_->give(std::move(s));
        pool_->give(std::move(r));
    }
    void do_broadcast(tensor_view<std::byte> data, int root) override {
        buffer d = pool_->take(data.size);
        to_device(d.get(), data.data, data.size, stream_);
        next_.broadcast(cuda_tensor(d.get(), data.size), root);
        to_host(data.data, d.get(), data.size, stream_);
        pool_->give(std::move(d));
    }
    void do_barrier() override { next_.barrier(); }

private:
    using buffer = backend::cuda::device_buffer<std::byte>;

    // Device buffers of finished collectives, for the next ones. Shared by the staging and its
    // requests, which may finish on other threads and outlive the staging.
    class pool {
    public:
        // A device buffer of at least `bytes` from the pool, or a new one. Never null, so that
        // empty collectives still pass valid device pointers.
        buffer take(std::size_t bytes) {
            {
                const std::lock_guard<std::mutex> lock(m_);
                for (auto it = spare_.begin(); it != spare_.end(); ++it) {
                    if (it->size() >= bytes) {
                        buffer b = std::move(*it);
                        spare_.erase(it);
                        return b;
                    }
                }
            }
            return buffer(bytes == 0 ? 1 : bytes);
        }
        void give(buffer b) noexcept {
            if (!b.empty()) {
                try {
                    const std::lock_guard<std::mutex> lock(m_);
                    spare_.push_back(std::move(b));
                } catch (...) {
                    // Out of host memory for the pool's list: the buffer is freed instead.
                }
            }
        }

    private:
        std::mutex m_;
        std::vector<buffer> spare_;
    };

    // A collective of the wrapped communicator in flight, with the device buffers it uses and
    // where its result goes on the host. It holds the pool, not the staging, so that it may
    // outlive the staging.
    class staged final : public request::operation {
    public:
        staged(std::shared_ptr<pool> shared, cudaStream_t stream, request inner, buffer result,
               buffer other, void* host, std::size_t bytes)
            : pool_(std::move(shared)), stream_(stream), inner_(std::move(inner)),
              result_(std::move(result)), other_(std::move(other)), host_(host), bytes_(bytes) {}
        ~staged() override {
            if (inner_.pending()) {
                inner_ = request{};  // waits for the wrapped collective before the buffers go back
            }
            pool_->give(std::move(result_));
            pool_->give(std::move(other_));
        }
        // The wrapped communicator's refusal (comm::mpi off MPI's main thread) keeps this
        // request pending too.
        void check_finish() override { inner_.check_finish(); }
        void wait() override {
            inner_.finish();
            to_host(host_, result_.get(), bytes_, stream_);
        }

    private:
        std::shared_ptr<pool> pool_;
        cudaStream_t stream_;
        request inner_;
        buffer result_, other_;
        void* host_;
        std::size_t bytes_;
    };

    // Copies on `stream`, and the host waits for them (see the top of the file).
    static void to_device(std::byte* d, const void* h, std::size_t bytes, cudaStream_t stream) {
        if (bytes != 0) {
            LOCO_CUDA_CHECK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, stream));
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        }
    }
    static void to_host(void* h, const std::byte* d, std::size_t bytes, cudaStream_t stream) {
        if (bytes != 0) {
            LOCO_CUDA_CHECK(cudaMemcpyAsync(h, d, bytes, cudaMemcpyDeviceToHost, stream));
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        }
    }

    communicator& next_;
    cudaStream_t stream_;
    std::shared_ptr<pool> pool_;
};

}  // namespace loco::comm
