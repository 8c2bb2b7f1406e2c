#pragma once
// M workers simulated on one GPU: M replicas, each a host thread with its own CUDA stream and its
// own device buffers, and a communicator that moves device memory between them with kernels and
// device-to-device copies. It lets DiLoCo with M > 1 run (and be tested) on a single GPU.
//
// The semantics are comm::threads' (threads.hpp), on device memory:
//   - every collective starts with the host rendezvous of rendezvous.hpp: ranks that disagree all
//     throw the same comm_error and no data moves; a rank that waits longer than the group's
//     timeout aborts the group;
//   - all_reduce is a reduce-scatter then an all-gather: rank r sums its chunk
//     [n r/M, n (r+1)/M) over ranks 0..M-1 in that order (one kernel reading every replica's
//     buffer) and the others copy it, so every replica ends with bit-identical results, equal to
//     comm::threads' for the same inputs; mean divides the sum by M;
//   - bytes_sent counts every copy out of a rank's buffer as bytes that rank sent, with the same
//     formulas as comm::threads (all_reduce 4 (n + (M-2) c_r), c_r the rank's chunk; all_gather
//     (M-1) x bytes; all_to_all (M-1) x block; broadcast (M-1) x bytes from the root).
// Each collective is host-synchronous: it first waits for the work already enqueued on the
// rank's stream (the producer of the buffer), and returns once the data has moved and every peer
// is done reading this rank's buffers (also when it fails: a rank that times out waits for peers
// still copying from it). The split-phase start_* keep the communicator interface's default (the
// collective runs at start, finish() reports its result): the replicas share one GPU, whose copy
// and compute engines the collective would take from the other replicas' compute anyway, so a
// progress thread would add host threads without hiding anything; this communicator exists to
// test M > 1 on one GPU, and comm::nccl is the one that overlaps on real hardware.

#include <loco/backend/cuda/collectives.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/comm/rendezvous.hpp>
#include <loco/comm/threads.hpp>  // default_collective_timeout
#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace loco::comm {

class cuda_replicas;

template <class Fn>
void run_replicas(int size, Fn&& fn,
                  std::chrono::milliseconds timeout = default_collective_timeout);

// The shared state of M replicas on one GPU. Create one, then one cuda_replicas per rank.
class cuda_replica_group {
public:
    static constexpr std::chrono::milliseconds default_timeout = default_collective_timeout;

    // Replicas on `device` (the current device when -1).
    explicit cuda_replica_group(int size, int device = -1,
                                std::chrono::milliseconds timeout = default_timeout)
        : rendezvous_(checked_size(size), timeout, "replica group"), device_(device) {
        if (device_ < 0) {
            device_ = backend::cuda::current_device();
        }
    }

    int size() const noexcept { return rendezvous_.size(); }
    int device() const noexcept { return device_; }
    std::chrono::milliseconds timeout() const noexcept { return rendezvous_.timeout(); }

    // Wakes every rank waiting in a collective; they and every later call throw comm_error.
    void abort(const std::string& reason) { rendezvous_.abort(reason); }
    bool aborted() const { return rendezvous_.aborted(); }

private:
    friend class cuda_replicas;
    template <class Fn>
    friend void run_replicas(int, Fn&&, std::chrono::milliseconds);

    static int checked_size(int size) {
        if (size < 1 || size > backend::cuda::max_replicas) {
            throw invalid_argument("loco::comm::cuda_replica_group: size must be in [1, " +
                                   std::to_string(backend::cuda::max_replicas) + "], got " +
                                   std::to_string(size));
        }
        return size;
    }

    detail::rendezvous rendezvous_;
    int device_;
};

// One replica of a cuda_replica_group. Its kernels and copies run on its stream: the one given,
// or one it creates and owns.
class cuda_replicas final : public communicator {
public:
    cuda_replicas(std::shared_ptr<cuda_replica_group> group, int rank,
                  cudaStream_t stream = nullptr)
        : group_(std::move(group)), rank_(rank) {
        if (!group_) {
            throw invalid_argument("loco::comm::cuda_replicas: null cuda_replica_group");
        }
        if (rank < 0 || rank >= group_->size()) {
            throw invalid_argument("loco::comm::cuda_replicas: rank " + std::to_string(rank) +
                                   " is outside a group of size " +
                                   std::to_string(group_->size()));
        }
        backend::cuda::device_guard on(group_->device());
        if (stream == nullptr) {
            owned_ = std::make_unique<backend::cuda::stream>();
            stream_ = owned_->get();
        } else {
            stream_ = stream;
        }
        rv().claim(rank_, "loco::comm::cuda_replicas");
    }
    cuda_replicas(const cuda_replicas&) = delete;
    cuda_replicas& operator=(const cuda_replicas&) = delete;
    ~cuda_replicas() override { rv().release(rank_); }

    int rank() const noexcept override { return rank_; }
    int size() const noexcept override { return group_->size(); }
    loco::memory_space space() const noexcept override { return loco::memory_space::cuda; }
    std::string_view name() const noexcept override { return "cuda_replicas"; }
    std::uint64_t bytes_sent() const noexcept override {
        return rv().sent(static_cast<std::size_t>(rank_));
    }
    cuda_replica_group& group() const noexcept { return *group_; }
    // The stream this replica's collectives run on (and wait for before they start).
    cudaStream_t stream() const noexcept { return stream_; }

protected:
    using collective = detail::collective;

    void do_all_reduce(tensor_view<float> data, reduce_op op) override {
        const std::string where = prefix("all_reduce");
        backend::cuda::device_guard on(group_->device());
        settle();
        rv().start(rank_, {collective::all_reduce, data.size, 0, op, data.data, data.data}, where);
        const detail::reading_scope reading(rv(), rank_);
        const std::size_t m = static_cast<std::size_t>(size());
        const std::size_t r = static_cast<std::size_t>(rank_);
        const auto chunk_begin = [&](std::size_t k) { return data.size * k / m; };

        // Reduce-scatter: this rank owns [lo, hi) and sums it over every rank in rank order.
        const std::size_t lo = chunk_begin(r);
        const std::size_t hi = chunk_begin(r + 1);
        backend::cuda::replica_sources src{};
        for (std::size_t k = 0; k < m; ++k) {
            src.rank[k] = static_cast<const float*>(rv().slot(k).dst) + lo;
        }
        backend::cuda::reduce_ranks(src, size(), data.data + lo, hi - lo, op, stream_);
        settle();
        for (std::size_t k = 0; k < m; ++k) {
            if (k != r) {
                rv().count_sent(k, (hi - lo) * sizeof(float));
            }
        }
        rv().wait(rank_, where, detail::rendezvous::then::read);

        // All-gather: copy every other owner's reduced chunk.
        for (std::size_t k = 0; k < m; ++k) {
            if (k == r) {
                continue;
            }
            const std::size_t begin = chunk_begin(k);
            const std::size_t n = chunk_begin(k + 1) - begin;
            if (n != 0) {
                LOCO_CUDA_CHECK(cudaMemcpyAsync(data.data + begin,
                                                static_cast<const float*>(rv().slot(k).dst) + begin,
                                                n * sizeof(float), cudaMemcpyDeviceToDevice,
                                                stream_));
            }
            rv().count_sent(k, n * sizeof(float));
        }
        settle();
        rv().wait(rank_, where);
    }

    void do_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_gather");
        backend::cuda::device_guard on(group_->device());
        settle();
        rv().start(rank_, {collective::all_gather, send.size, 0, reduce_op::sum, send.data, recv.data},
                   where);
        const detail::reading_scope reading(rv(), rank_);
        const std::size_t m = static_cast<std::size_t>(size());
        for (std::size_t k = 0; k < m; ++k) {
            std::byte* to = recv.data + k * send.size;
            if (send.size != 0 && to != rv().slot(k).src) {
                LOCO_CUDA_CHECK(cudaMemcpyAsync(to, rv().slot(k).src, send.size,
                                                cudaMemcpyDeviceToDevice, stream_));
            }
            if (k != static_cast<std::size_t>(rank_)) {
                rv().count_sent(k, send.size);
            }
        }
        settle();
        rv().wait(rank_, where);
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_to_all");
        backend::cuda::device_guard on(group_->device());
        settle();
        rv().start(rank_, {collective::all_to_all, send.size, 0, reduce_op::sum, send.data, recv.data},
                   where);
        const detail::reading_scope reading(rv(), rank_);
        const std::size_t m = static_cast<std::size_t>(size());
        const std::size_t r = static_cast<std::size_t>(rank_);
        const std::size_t block = send.size / m;
        for (std::size_t k = 0; k < m; ++k) {
            if (block != 0) {
                LOCO_CUDA_CHECK(cudaMemcpyAsync(
                    recv.data + k * block, static_cast<const std::byte*>(rv().slot(k).src) + r * block,
                    block, cudaMemcpyDeviceToDevice, stream_));
            }
            if (k != r) {
                rv().count_sent(k, block);
            }
        }
        settle();
        rv().wait(rank_, where);
    }

    void do_broadcast(tensor_view<std::byte> data, int root) override {
        const std::string where = prefix("broadcast");
        backend::cuda::device_guard on(group_->device());
        settle();
        rv().start(rank_, {collective::broadcast, data.size, root, reduce_op::sum, data.data, data.data},
                   where);
        const detail::reading_scope reading(rv(), rank_);
        if (rank_ != root) {
            if (data.size != 0) {
                LOCO_CUDA_CHECK(cudaMemcpyAsync(
                    data.data, rv().slot(static_cast<std::size_t>(root)).dst, data.size,
                    cudaMemcpyDeviceToDevice, stream_));
            }
            rv().count_sent(static_cast<std::size_t>(root), data.size);
        }
        settle();
        rv().wait(rank_, where);
    }

    void do_barrier() override {
        backend::cuda::device_guard on(group_->device());
        settle();
        rv().start(rank_, detail::posted_call{}, prefix("barrier"));
    }

private:
    // Waits for everything enqueued on this replica's stream (device errors surface here).
    void settle() { LOCO_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

    detail::rendezvous& rv() const noexcept { return group_->rendezvous_; }

    std::shared_ptr<cuda_replica_group> group_;
    int rank_;
    std::unique_ptr<backend::cuda::stream> owned_;
    cudaStream_t stream_ = nullptr;
};

// Runs fn(comm) for `size` replicas on `size` threads of this process, on the current GPU, each
// with its own stream (comm.stream()), and waits for all of them. If a replica throws, the group
// is aborted so that its peers stop waiting, and the first exception not caused by the abort is
// rethrown.
template <class Fn>
void run_replicas(int size, Fn&& fn, std::chrono::milliseconds timeout) {
    auto group = std::make_shared<cuda_replica_group>(size, -1, timeout);
    detail::run_ranks(size, group->rendezvous_, [&](int r) {
        // A new thread starts on GPU 0: run on the group's GPU.
        LOCO_CUDA_CHECK(cudaSetDevice(group->device()));
        cuda_replicas comm(group, r);
        fn(comm);
        LOCO_CUDA_CHECK(cudaStreamSynchronize(comm.stream()));
    });
}

}  // namespace loco::comm
