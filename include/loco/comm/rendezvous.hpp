#pragma once
// What the in-process communicators (comm::threads on host memory, comm::cuda_replicas on one GPU)
// share: the rendezvous that starts every collective, and the driver that runs one function per
// rank on its own thread.
//
// At a rendezvous each rank posts its call (kind, element or byte count, root, op, buffers). The
// last rank to arrive compares the calls; if they disagree, every rank throws the same comm_error
// and no data moves. A rank that waits longer than the timeout aborts the group: it and every
// rank waiting with it throw comm_error instead of hanging, and so does every later call.
//
// Reading. A rendezvous that opens a copy phase (start() of a collective that moves data, or
// wait(..., then::read)) lets every rank read its peers' posted buffers until that rank's next
// wait(), pace() or stop_reading(). The rendezvous counts the ranks still reading, and a rank
// that fails (timeout, abort) waits until none is before it throws: its caller may free its
// buffers as soon as it returns, and a peer slowed in the middle of a copy must not read them
// after that.

#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace loco::comm::detail {

enum class collective : unsigned char { all_reduce, all_gather, all_to_all, broadcast, barrier };

struct posted_call {
    collective what = collective::barrier;
    std::size_t count = 0;  // elements for all_reduce, bytes otherwise
    int root = 0;
    reduce_op op = reduce_op::sum;
    const void* src = nullptr;
    void* dst = nullptr;
};

class rendezvous {
public:
    // `group` names the group in messages ("thread group", "replica group").
    // The longest wait: std::chrono::milliseconds::max() ("never") would overflow inside
    // condition_variable::wait_for, so longer timeouts wait this long (about a century).
    static constexpr std::chrono::milliseconds longest_timeout = longest_wait;

    rendezvous(int size, std::chrono::milliseconds timeout, std::string group)
        : size_(size), timeout_(std::min(timeout, longest_timeout)), group_(std::move(group)) {
        if (timeout.count() <= 0) {
            throw invalid_argument("loco::comm: the " + group_ + "'s timeout must be positive");
        }
        slots_.resize(static_cast<std::size_t>(size));
        claimed_.assign(static_cast<std::size_t>(size), false);
        reading_.assign(static_cast<std::size_t>(size), false);
        sent_ = std::make_unique<std::atomic<std::uint64_t>[]>(static_cast<std::size_t>(size));
    }

    int size() const noexcept { return size_; }
    std::chrono::milliseconds timeout() const noexcept { return timeout_; }

    // One communicator per rank at a time: a second one on a claimed rank would post into the
    // same slot and let a collective complete without the rank it impersonates.
    void claim(int rank, const std::string& who) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (claimed_[static_cast<std::size_t>(rank)]) {
            throw invalid_argument(who + ": rank " + std::to_string(rank) +
                                   " already has a communicator in this " + group_ +
                                   "; each rank needs its own, one at a time");
        }
        claimed_[static_cast<std::size_t>(rank)] = true;
    }
    void release(int rank) noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        claimed_[static_cast<std::size_t>(rank)] = false;
    }

    // What comes after a phase barrier inside a collective.
    enum class then : bool { finish, read };

    void abort(const std::string& reason) {
        std::lock_guard<std::mutex> lock(mutex_);
        abort_locked(reason);
    }
    bool aborted() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return aborted_;
    }

    // Posts this rank's call and waits for every rank; throws the verdict when they disagree.
    // A call that moves data opens a copy phase.
    void start(int rank, const posted_call& call, const std::string& where) {
        const then next = call.what == collective::barrier ? then::finish : then::read;
        const std::string verdict = arrive(rank, &call, next, where);
        if (!verdict.empty()) {
            throw comm_error(where + verdict);
        }
    }

    // A phase barrier inside a collective: ends this rank's reading, waits for every rank, and
    // opens the next copy phase when `next` is then::read.
    void wait(int rank, const std::string& where, then next = then::finish) {
        arrive(rank, nullptr, next, where);
    }

    // Ends this rank's reading of its peers' buffers (idempotent; for exception paths).
    void stop_reading(int rank) noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_reading_locked(rank);
    }

    // Ends this rank's reading and sleeps until `until` (the emulated link's transfer time); an
    // abort wakes it and it throws.
    void pace(int rank, std::chrono::steady_clock::time_point until, const std::string& where) {
        std::unique_lock<std::mutex> lock(mutex_);
        stop_reading_locked(rank);
        cv_.wait_until(lock, until, [&] { return aborted_; });
        if (aborted_) {
            fail_locked(lock, rank, where + "the " + group_ + " was aborted: " + abort_reason_);
        }
    }

    // Test seam: hook(rank, peer) runs right before `rank` copies from `peer`'s buffer. Set it
    // before the group's first collective.
    void set_copy_hook(std::function<void(int, int)> hook) { copy_hook_ = std::move(hook); }
    void before_copy(int rank, int peer) const {
        if (copy_hook_) {
            copy_hook_(rank, peer);
        }
    }

    // What rank r posted at the current collective's rendezvous.
    const posted_call& slot(std::size_t r) const noexcept { return slots_[r]; }

    void count_sent(std::size_t from_rank, std::size_t bytes) noexcept {
        sent_[from_rank].fetch_add(bytes, std::memory_order_relaxed);
    }
    std::uint64_t sent(std::size_t rank) const noexcept {
        return sent_[rank].load(std::memory_order_relaxed);
    }

private:
    static const char* name_of(collective k) {
        switch (k) {
            case collective::all_reduce: return "all_reduce";
            case collective::all_gather: return "all_gather";
            case collective::all_to_all: return "all_to_all";
            case collective::broadcast: return "broadcast";
            case collective::barrier: return "barrier";
        }
        return "?";
    }

    static std::string describe(const posted_call& c) {
        std::string s = name_of(c.what);
        if (c.what == collective::all_reduce) {
            s += std::string(c.op == reduce_op::sum ? " (sum)" : " (mean)") + " of " +
                 std::to_string(c.count) + " floats";
        } else if (c.what != collective::barrier) {
            s += " of " + std::to_string(c.count) + " bytes";
        }
        if (c.what == collective::broadcast) {
            s += " from root " + std::to_string(c.root);
        }
        return s;
    }

    // Empty when every rank posted the same call; otherwise the sentence every rank throws.
    std::string compare_calls() const {
        const posted_call& a = slots_[0];
        for (int r = 1; r < size_; ++r) {
            const posted_call& b = slots_[static_cast<std::size_t>(r)];
            if (a.what != b.what || a.count != b.count || a.root != b.root || a.op != b.op) {
                return "ranks disagree on the collective: rank 0 called " + describe(a) +
                       ", rank " + std::to_string(r) + " called " + describe(b);
            }
        }
        if (a.what != collective::barrier && a.count != 0) {
            // Every rank writes its own output; two ranks whose outputs share a byte would race.
            const std::size_t extent = a.what == collective::all_reduce ? a.count * sizeof(float)
                                       : a.what == collective::all_gather
                                           ? a.count * static_cast<std::size_t>(size_)
                                           : a.count;
            std::vector<int> order(static_cast<std::size_t>(size_));
            for (int r = 0; r < size_; ++r) order[static_cast<std::size_t>(r)] = r;
            const auto begin = [&](int r) {
                return reinterpret_cast<std::uintptr_t>(slots_[static_cast<std::size_t>(r)].dst);
            };
            std::sort(order.begin(), order.end(), [&](int x, int y) {
                return begin(x) != begin(y) ? begin(x) < begin(y) : x < y;
            });
            for (std::size_t i = 1; i < order.size(); ++i) {
                const int r = std::min(order[i - 1], order[i]), q = std::max(order[i - 1], order[i]);
                if (begin(order[i]) - begin(order[i - 1]) < extent) {
                    return "ranks " + std::to_string(r) + " and " + std::to_string(q) +
                           (begin(r) == begin(q) ? " passed the same buffer to "
                                                 : " passed overlapping buffers to ") +
                           name_of(a.what) + "; each rank needs its own";
                }
            }
            // An all-gather or all-to-all reads every rank's send buffer while the others write
            // their outputs: a send buffer inside another rank's output would be overwritten
            // while being read. (A rank's send inside its own output is the in-place form, which
            // the communicator checked.) The outputs are disjoint and sorted here, so the ones a
            // send buffer meets are the run ending at the last output that begins before it ends.
            if (a.what == collective::all_gather || a.what == collective::all_to_all) {
                for (int r = 0; r < size_; ++r) {
                    const auto src = reinterpret_cast<std::uintptr_t>(
                        slots_[static_cast<std::size_t>(r)].src);
                    const std::uintptr_t src_end = src + a.count;
                    auto at = std::partition_point(order.begin(), order.end(),
                                                   [&](int q) { return begin(q) < src_end; });
                    while (at != order.begin()) {
                        const int q = *--at;
                        if (begin(q) + extent <= src) break;  // this output and those before
                        if (q != r) {
                            return "rank " + std::to_string(r) + "'s send buffer lies in rank " +
                                   std::to_string(q) + "'s receive buffer in " +
                                   name_of(a.what) + "; each rank needs its own";
                        }
                    }
                }
            }
        }
        return {};
    }

    void stop_reading_locked(int rank) noexcept {
        const auto mine = static_cast<std::size_t>(rank);
        if (reading_[mine]) {
            reading_[mine] = false;
            if (--readers_ == 0) {
                cv_.notify_all();
            }
        }
    }

    // Throws comm_error(message), but only once no rank reads any posted buffer any more.
    [[noreturn]] void fail_locked(std::unique_lock<std::mutex>& lock, int rank,
                                  const std::string& message) {
        stop_reading_locked(rank);
        cv_.wait(lock, [&] { return readers_ == 0; });
        throw comm_error(message);
    }

    void abort_locked(const std::string& reason) {
        if (!aborted_) {
            aborted_ = true;
            abort_reason_ = reason;
        }
        cv_.notify_all();
    }

    std::string arrive(int rank, const posted_call* posted, then next, const std::string& where) {
        std::unique_lock<std::mutex> lock(mutex_);
        stop_reading_locked(rank);
        if (aborted_) {
            fail_locked(lock, rank, where + "the " + group_ + " was aborted: " + abort_reason_);
        }
        if (posted) {
            slots_[static_cast<std::size_t>(rank)] = *posted;
        }
        const std::uint64_t generation = generation_;
        if (++arrived_ == size_) {
            arrived_ = 0;
            verdict_ = posted ? compare_calls() : std::string();
            if (verdict_.empty() && next == then::read) {
                readers_ = size_;
                std::fill(reading_.begin(), reading_.end(), true);
            }
            ++generation_;
            cv_.notify_all();
            return verdict_;
        }
        const bool woke =
            cv_.wait_for(lock, timeout_, [&] { return generation_ != generation || aborted_; });
        if (generation_ != generation) {
            // Every rank arrived: this phase completed on all of them, so an abort that came
            // after (a peer leaving once its call returned) belongs to the next call. Failing
            // here would let a collective succeed on some ranks and fail on others.
            return verdict_;
        }
        if (aborted_) {
            fail_locked(lock, rank, where + "the " + group_ + " was aborted: " + abort_reason_);
        }
        if (!woke) {
            const std::string reason =
                "rank " + std::to_string(rank) + " waited " + std::to_string(timeout_.count()) +
                " ms for its peers; only " + std::to_string(arrived_) + " of " +
                std::to_string(size_) + " ranks arrived";
            abort_locked(reason);
            fail_locked(lock, rank, where + reason);
        }
        return verdict_;
    }

    int size_;
    std::chrono::milliseconds timeout_;
    std::string group_;
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    int arrived_ = 0;
    std::uint64_t generation_ = 0;
    std::vector<posted_call> slots_;
    std::vector<bool> claimed_;  // ranks that have a communicator now
    std::string verdict_;
    bool aborted_ = false;
    std::string abort_reason_;
    int readers_ = 0;             // ranks that may still read posted buffers
    std::vector<bool> reading_;   // which ones
    std::unique_ptr<std::atomic<std::uint64_t>[]> sent_;
    std::function<void(int, int)> copy_hook_;
};

// Ends a rank's reading when a collective leaves early through an exception.
class reading_scope {
public:
    reading_scope(rendezvous& group, int rank) noexcept : group_(group), rank_(rank) {}
    ~reading_scope() { group_.stop_reading(rank_); }
    reading_scope(const reading_scope&) = delete;
    reading_scope& operator=(const reading_scope&) = delete;

private:
    rendezvous& group_;
    int rank_;
};

// Runs rank_body(r) for r in [0, size) on `size` threads and waits for all of them. If a rank
// throws, the group is aborted so that its peers stop waiting, and the first exception that was
// not caused by the abort is rethrown.
template <class RankBody>
void run_ranks(int size, rendezvous& group, RankBody&& rank_body) {
    std::mutex failure_mutex;
    std::exception_ptr first_failure;
    std::exception_ptr first_abort_victim;
    std::vector<std::thread> workers;
    workers.reserve(static_cast<std::size_t>(size));
    const auto run_rank = [&](int r) {
        try {
            rank_body(r);
        } catch (...) {
            // A comm_error after an abort was caused by it; anything else is the rank's own
            // failure, even when the rank aborted the group itself on the way out.
            bool comm_failure = false;
            try {
                throw;
            } catch (const comm_error&) {
                comm_failure = true;
            } catch (...) {
            }
            const bool victim = comm_failure && group.aborted();
            std::lock_guard<std::mutex> lock(failure_mutex);
            if (!victim && !first_failure) {
                first_failure = std::current_exception();
                group.abort("rank " + std::to_string(r) + " failed");
            } else if (victim && !first_abort_victim) {
                first_abort_victim = std::current_exception();
            }
        }
    };
    for (int r = 0; r < size; ++r) {
        try {
            workers.emplace_back(run_rank, r);
        } catch (...) {
            // A thread that cannot be created (std::system_error) must not unwind past joinable
            // threads (std::terminate): the ranks already started are told to stop, and joined.
            group.abort("could not start the thread of rank " + std::to_string(r));
            for (auto& w : workers) w.join();
            throw;
        }
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

}  // namespace loco::comm::detail
