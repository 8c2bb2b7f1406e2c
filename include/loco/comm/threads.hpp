#pragma once
// M workers as threads of one process, with real collectives on shared memory.
//
// Every collective starts with a rendezvous where each rank posts what it is calling (kind, element
// count, root, op, buffers); if the ranks disagree, every rank throws the same comm_error and no
// data moves. Then the data moves the way a ring would move it, and every copy out of a rank's
// buffer is counted as bytes that rank sent:
//   all_reduce  reduce-scatter then all-gather; rank r owns elements [n*r/M, n*(r+1)/M) and sums
//               them over ranks 0..M-1 in that order, so every rank ends with bit-identical
//               results. Bytes sent by rank r: 4 * (n + (M-2) * c_r), c_r its chunk, which is
//               2 (M-1)/M * 4n when M divides n (the ring all-reduce volume).
//   all_gather  (M-1) * bytes per rank.      all_to_all  (M-1) * block bytes per rank.
//   broadcast   (M-1) * bytes from the root, 0 from the others.
// A rank that waits longer than the group's timeout aborts the group: it and every rank waiting
// with it throw comm_error instead of hanging.

#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace loco::comm {

class threads;

// The shared state of M thread ranks. Create one, then one loco::comm::threads per rank.
class thread_group {
public:
    static constexpr std::chrono::milliseconds default_timeout{std::chrono::minutes(5)};

    explicit thread_group(int size, std::chrono::milliseconds timeout = default_timeout)
        : size_(size), timeout_(timeout) {
        if (size < 1) {
            throw invalid_argument("loco::comm::thread_group: size must be >= 1, got " +
                                   std::to_string(size));
        }
        if (timeout.count() <= 0) {
            throw invalid_argument("loco::comm::thread_group: timeout must be positive");
        }
        slots_.resize(static_cast<std::size_t>(size));
        sent_ = std::make_unique<std::atomic<std::uint64_t>[]>(static_cast<std::size_t>(size));
    }

    int size() const noexcept { return size_; }
    std::chrono::milliseconds timeout() const noexcept { return timeout_; }

    // Wakes every rank waiting in a collective; they and every later call throw comm_error with
    // this reason. Used when one worker fails so that its peers do not wait for the timeout.
    void abort(const std::string& reason) {
        std::lock_guard<std::mutex> lock(mutex_);
        abort_locked(reason);
    }

    bool aborted() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return aborted_;
    }

private:
    friend class threads;

    enum class kind : unsigned char { all_reduce, all_gather, all_to_all, broadcast, barrier };

    struct call {
        kind what = kind::barrier;
        std::size_t count = 0;  // elements for all_reduce, bytes otherwise
        int root = 0;
        reduce_op op = reduce_op::sum;
        const void* src = nullptr;
        void* dst = nullptr;
    };

    static const char* kind_name(kind k) {
        switch (k) {
            case kind::all_reduce: return "all_reduce";
            case kind::all_gather: return "all_gather";
            case kind::all_to_all: return "all_to_all";
            case kind::broadcast: return "broadcast";
            case kind::barrier: return "barrier";
        }
        return "?";
    }

    static std::string describe(const call& c) {
        std::string s = kind_name(c.what);
        if (c.what == kind::all_reduce) {
            s += std::string(c.op == reduce_op::sum ? " (sum)" : " (mean)") + " of " +
                 std::to_string(c.count) + " floats";
        } else if (c.what != kind::barrier) {
            s += " of " + std::to_string(c.count) + " bytes";
        }
        if (c.what == kind::broadcast) {
            s += " from root " + std::to_string(c.root);
        }
        return s;
    }

    // Empty when every rank posted the same call; otherwise the sentence every rank throws.
    std::string compare_calls() const {
        for (int r = 1; r < size_; ++r) {
            const call& a = slots_[0];
            const call& b = slots_[static_cast<std::size_t>(r)];
            if (a.what != b.what || a.count != b.count || a.root != b.root || a.op != b.op) {
                return "ranks disagree on the collective: rank 0 called " + describe(a) +
                       ", rank " + std::to_string(r) + " called " + describe(b);
            }
        }
        const call& c = slots_[0];
        if ((c.what == kind::all_reduce || c.what == kind::broadcast) && c.count != 0) {
            for (int r = 0; r < size_; ++r) {
                for (int q = r + 1; q < size_; ++q) {
                    if (slots_[static_cast<std::size_t>(r)].dst ==
                        slots_[static_cast<std::size_t>(q)].dst) {
                        return "ranks " + std::to_string(r) + " and " + std::to_string(q) +
                               " passed the same buffer to " + kind_name(c.what) +
                               "; each rank needs its own";
                    }
                }
            }
        }
        return {};
    }

    void abort_locked(const std::string& reason) {
        if (!aborted_) {
            aborted_ = true;
            abort_reason_ = reason;
        }
        cv_.notify_all();
    }

    // Blocks until every rank has arrived. With a call, records it and returns the verdict of the
    // comparison (empty when the ranks agree); a plain phase barrier passes nullptr.
    std::string arrive(int rank, const call* posted, const std::string& where) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (aborted_) {
            throw comm_error(where + "the thread group was aborted: " + abort_reason_);
        }
        if (posted) {
            slots_[static_cast<std::size_t>(rank)] = *posted;
        }
        const std::uint64_t generation = generation_;
        if (++arrived_ == size_) {
            arrived_ = 0;
            verdict_ = posted ? compare_calls() : std::string();
            ++generation_;
            cv_.notify_all();
            return verdict_;
        }
        const bool woke = cv_.wait_for(lock, timeout_, [&] {
            return generation_ != generation || aborted_;
        });
        if (aborted_) {
            throw comm_error(where + "the thread group was aborted: " + abort_reason_);
        }
        if (!woke) {
            const std::string reason =
                "rank " + std::to_string(rank) + " waited " + std::to_string(timeout_.count()) +
                " ms for its peers; only " + std::to_string(arrived_) + " of " +
                std::to_string(size_) + " ranks arrived";
            abort_locked(reason);
            throw comm_error(where + reason);
        }
        return verdict_;
    }

    int size_;
    std::chrono::milliseconds timeout_;
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    int arrived_ = 0;
    std::uint64_t generation_ = 0;
    std::vector<call> slots_;
    std::string verdict_;
    bool aborted_ = false;
    std::string abort_reason_;
    std::unique_ptr<std::atomic<std::uint64_t>[]> sent_;
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
        return group_->sent_[static_cast<std::size_t>(rank_)].load(std::memory_order_relaxed);
    }
    thread_group& group() const noexcept { return *group_; }

protected:
    using kind = thread_group::kind;
    using call = thread_group::call;

    void do_all_reduce(tensor_view<float> data, reduce_op op) override {
        const std::string where = prefix("all_reduce");
        start({kind::all_reduce, data.size, 0, op, data.data, data.data}, where);
        const auto& slots = group_->slots_;
        const std::size_t m = static_cast<std::size_t>(size());
        const std::size_t r = static_cast<std::size_t>(rank_);
        const auto chunk_begin = [&](std::size_t k) { return data.size * k / m; };

        // Reduce-scatter: this rank owns [lo, hi) and sums it over all ranks in rank order.
        const std::size_t lo = chunk_begin(r);
        const std::size_t hi = chunk_begin(r + 1);
        const float divisor = static_cast<float>(m);
        for (std::size_t i = lo; i < hi; ++i) {
            float acc = static_cast<const float*>(slots[0].dst)[i];
            for (std::size_t k = 1; k < m; ++k) {
                acc += static_cast<const float*>(slots[k].dst)[i];
            }
            data.data[i] = op == reduce_op::mean ? acc / divisor : acc;
        }
        for (std::size_t k = 0; k < m; ++k) {
            if (k != r) {
                count_sent(k, (hi - lo) * sizeof(float));
            }
        }
        group_->arrive(rank_, nullptr, where);

        // All-gather: copy every other owner's reduced chunk.
        for (std::size_t k = 0; k < m; ++k) {
            if (k == r) {
                continue;
            }
            const std::size_t begin = chunk_begin(k);
            const std::size_t n = chunk_begin(k + 1) - begin;
            if (n != 0) {
                std::memcpy(data.data + begin, static_cast<const float*>(slots[k].dst) + begin,
                            n * sizeof(float));
            }
            count_sent(k, n * sizeof(float));
        }
        group_->arrive(rank_, nullptr, where);
    }

    void do_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_gather");
        start({kind::all_gather, send.size, 0, reduce_op::sum, send.data, recv.data}, where);
        const auto& slots = group_->slots_;
        const std::size_t m = static_cast<std::size_t>(size());
        for (std::size_t k = 0; k < m; ++k) {
            if (send.size != 0) {
                // memmove: an in-place call has this rank's send already in its slot.
                std::memmove(recv.data + k * send.size, slots[k].src, send.size);
            }
            if (k != static_cast<std::size_t>(rank_)) {
                count_sent(k, send.size);
            }
        }
        group_->arrive(rank_, nullptr, where);
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_to_all");
        start({kind::all_to_all, send.size, 0, reduce_op::sum, send.data, recv.data}, where);
        const auto& slots = group_->slots_;
        const std::size_t m = static_cast<std::size_t>(size());
        const std::size_t r = static_cast<std::size_t>(rank_);
        const std::size_t block = send.size / m;
        for (std::size_t k = 0; k < m; ++k) {
            if (block != 0) {
                std::memcpy(recv.data + k * block,
                            static_cast<const std::byte*>(slots[k].src) + r * block, block);
            }
            if (k != r) {
                count_sent(k, block);
            }
        }
        group_->arrive(rank_, nullptr, where);
    }

    void do_broadcast(tensor_view<std::byte> data, int root) override {
        const std::string where = prefix("broadcast");
        start({kind::broadcast, data.size, root, reduce_op::sum, data.data, data.data}, where);
        if (rank_ != root) {
            if (data.size != 0) {
                std::memcpy(data.data, group_->slots_[static_cast<std::size_t>(root)].dst,
                            data.size);
            }
            count_sent(static_cast<std::size_t>(root), data.size);
        }
        group_->arrive(rank_, nullptr, where);
    }

    void do_barrier() override { start(call{}, prefix("barrier")); }

private:
    void start(const call& c, const std::string& where) {
        const std::string verdict = group_->arrive(rank_, &c, where);
        if (!verdict.empty()) {
            throw comm_error(where + verdict);
        }
    }

    void count_sent(std::size_t from_rank, std::size_t bytes) {
        group_->sent_[from_rank].fetch_add(bytes, std::memory_order_relaxed);
    }

    std::shared_ptr<thread_group> group_;
    int rank_;
};

// Runs fn(comm) on `size` threads, one per rank, and waits for all of them. If a rank throws, the
// group is aborted so that its peers stop waiting, and the first exception that was not caused by
// the abort is rethrown.
template <class Fn>
void run_threads(int size, Fn&& fn,
                 std::chrono::milliseconds timeout = thread_group::default_timeout) {
    auto group = std::make_shared<thread_group>(size, timeout);
    std::mutex failure_mutex;
    std::exception_ptr first_failure;
    std::exception_ptr first_abort_victim;
    std::vector<std::thread> workers;
    workers.reserve(static_cast<std::size_t>(size));
    for (int r = 0; r < size; ++r) {
        workers.emplace_back([&, r] {
            try {
                threads comm(group, r);
                fn(comm);
            } catch (...) {
                const bool victim = group->aborted();
                std::lock_guard<std::mutex> lock(failure_mutex);
                if (!victim && !first_failure) {
                    first_failure = std::current_exception();
                    group->abort("rank " + std::to_string(r) + " failed");
                } else if (victim && !first_abort_victim) {
                    first_abort_victim = std::current_exception();
                }
            }
        });
    }
    for (auto& w : workers) {
        w.join();
    }
    if (first_failure) {
        std::rethrow_exception(first_failure);
    }
    if (first_abort_victim) {
        std::rethrow_exception(first_abort_victim);
    }
}

}  // namespace loco::comm
