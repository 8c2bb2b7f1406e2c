#pragma once
// M workers as threads of one process, with real collectives on shared memory.
//
// Every collective starts with a rendezvous (rendezvous.hpp) where each rank posts what it is
// calling; if the ranks disagree, every rank throws the same comm_error and no data moves. Then
// the data moves the way a ring would move it, and every copy out of a rank's buffer is counted as
// bytes that rank sent:
//   all_reduce  reduce-scatter then all-gather; rank r owns elements [n*r/M, n*(r+1)/M) and sums
//               them over ranks 0..M-1 in that order, so every rank ends with bit-identical
//               results. Bytes sent by rank r: 4 * (n + (M-2) * c_r), c_r its chunk, which is
//               2 (M-1)/M * 4n when M divides n (the ring all-reduce volume).
//   all_gather  (M-1) * bytes per rank.      all_to_all  (M-1) * block bytes per rank.
//   broadcast   (M-1) * bytes from the root, 0 from the others.
// A rank that waits longer than the group's timeout aborts the group: it and every rank waiting
// with it throw comm_error instead of hanging.

#include <loco/comm/communicator.hpp>
#include <loco/comm/rendezvous.hpp>
#include <loco/error.hpp>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

namespace loco::comm {

class threads;

// How long a rank waits for its peers in a collective before it aborts the group.
inline constexpr std::chrono::milliseconds default_collective_timeout{std::chrono::minutes(5)};

template <class Fn>
void run_threads(int size, Fn&& fn,
                 std::chrono::milliseconds timeout = default_collective_timeout);

// The shared state of M thread ranks. Create one, then one loco::comm::threads per rank.
class thread_group {
public:
    static constexpr std::chrono::milliseconds default_timeout = default_collective_timeout;

    explicit thread_group(int size, std::chrono::milliseconds timeout = default_timeout)
        : rendezvous_(checked_size(size), timeout, "thread group") {}

    int size() const noexcept { return rendezvous_.size(); }
    std::chrono::milliseconds timeout() const noexcept { return rendezvous_.timeout(); }

    // Wakes every rank waiting in a collective; they and every later call throw comm_error with
    // this reason. Used when one worker fails so that its peers do not wait for the timeout.
    void abort(const std::string& reason) { rendezvous_.abort(reason); }
    bool aborted() const { return rendezvous_.aborted(); }

private:
    friend class threads;
    template <class Fn>
    friend void run_threads(int, Fn&&, std::chrono::milliseconds);

    static int checked_size(int size) {
        if (size < 1) {
            throw invalid_argument("loco::comm::thread_group: size must be >= 1, got " +
                                   std::to_string(size));
        }
        return size;
    }

    detail::rendezvous rendezvous_;
};

// One rank of a thread_group.
class threads final : public communicator {
public:
    threads(std::shared_ptr<thread_group> group, int rank) : group_(std::move(group)), rank_(rank) {
        if (!group_) {
            throw invalid_argument("loco::comm::threads: null thread_group");
        }
        if (rank < 0 || rank >= group_->size()) {
            throw invalid_argument("loco::comm::threads: rank " + std::to_string(rank) +
                                   " is outside a group of size " +
                                   std::to_string(group_->size()));
        }
    }

    int rank() const noexcept override { return rank_; }
    int size() const noexcept override { return group_->size(); }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return "threads"; }
    std::uint64_t bytes_sent() const noexcept override {
        return rv().sent(static_cast<std::size_t>(rank_));
    }
    thread_group& group() const noexcept { return *group_; }

protected:
    using collective = detail::collective;

    void do_all_reduce(tensor_view<float> data, reduce_op op) override {
        const std::string where = prefix("all_reduce");
        rv().start(rank_, {collective::all_reduce, data.size, 0, op, data.data, data.data}, where);
        const std::size_t m = static_cast<std::size_t>(size());
        const std::size_t r = static_cast<std::size_t>(rank_);
        const auto chunk_begin = [&](std::size_t k) { return data.size * k / m; };
        const auto peer = [&](std::size_t k) { return static_cast<const float*>(rv().slot(k).dst); };

        // Reduce-scatter: this rank owns [lo, hi) and sums it over all ranks in rank order.
        const std::size_t lo = chunk_begin(r);
        const std::size_t hi = chunk_begin(r + 1);
        const float divisor = static_cast<float>(m);
        for (std::size_t i = lo; i < hi; ++i) {
            float acc = peer(0)[i];
            for (std::size_t k = 1; k < m; ++k) {
                acc += peer(k)[i];
            }
            data.data[i] = op == reduce_op::mean ? acc / divisor : acc;
        }
        for (std::size_t k = 0; k < m; ++k) {
            if (k != r) {
                rv().count_sent(k, (hi - lo) * sizeof(float));
            }
        }
        rv().wait(rank_, where);

        // All-gather: copy every other owner's reduced chunk.
        for (std::size_t k = 0; k < m; ++k) {
            if (k == r) {
                continue;
            }
            const std::size_t begin = chunk_begin(k);
            const std::size_t n = chunk_begin(k + 1) - begin;
            if (n != 0) {
                std::memcpy(data.data + begin, peer(k) + begin, n * sizeof(float));
            }
            rv().count_sent(k, n * sizeof(float));
        }
        rv().wait(rank_, where);
    }

    void do_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_gather");
        rv().start(rank_, {collective::all_gather, send.size, 0, reduce_op::sum, send.data, recv.data},
                   where);
        const std::size_t m = static_cast<std::size_t>(size());
        for (std::size_t k = 0; k < m; ++k) {
            if (send.size != 0) {
                // memmove: an in-place call has this rank's send already in its slot.
                std::memmove(recv.data + k * send.size, rv().slot(k).src, send.size);
            }
            if (k != static_cast<std::size_t>(rank_)) {
                rv().count_sent(k, send.size);
            }
        }
        rv().wait(rank_, where);
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_to_all");
        rv().start(rank_, {collective::all_to_all, send.size, 0, reduce_op::sum, send.data, recv.data},
                   where);
        const std::size_t m = static_cast<std::size_t>(size());
        const std::size_t r = static_cast<std::size_t>(rank_);
        const std::size_t block = send.size / m;
        for (std::size_t k = 0; k < m; ++k) {
            if (block != 0) {
                std::memcpy(recv.data + k * block,
                            static_cast<const std::byte*>(rv().slot(k).src) + r * block, block);
            }
            if (k != r) {
                rv().count_sent(k, block);
            }
        }
        rv().wait(rank_, where);
    }

    void do_broadcast(tensor_view<std::byte> data, int root) override {
        const std::string where = prefix("broadcast");
        rv().start(rank_, {collective::broadcast, data.size, root, reduce_op::sum, data.data, data.data},
                   where);
        if (rank_ != root) {
            if (data.size != 0) {
                std::memcpy(data.data, rv().slot(static_cast<std::size_t>(root)).dst, data.size);
            }
            rv().count_sent(static_cast<std::size_t>(root), data.size);
        }
        rv().wait(rank_, where);
    }

    void do_barrier() override { rv().start(rank_, detail::posted_call{}, prefix("barrier")); }

private:
    detail::rendezvous& rv() const noexcept { return group_->rendezvous_; }

    std::shared_ptr<thread_group> group_;
    int rank_;
};

// Runs fn(comm) on `size` threads, one per rank, and waits for all of them. If a rank throws, the
// group is aborted so that its peers stop waiting, and the first exception that was not caused by
// the abort is rethrown.
template <class Fn>
void run_threads(int size, Fn&& fn, std::chrono::milliseconds timeout) {
    auto group = std::make_shared<thread_group>(size, timeout);
    detail::run_ranks(size, group->rendezvous_, [&](int r) {
        threads comm(group, r);
        fn(comm);
    });
}

}  // namespace loco::comm
