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
// with it throw comm_error instead of hanging. A rank that fails never returns while a peer may
// still be copying from its buffers.
//
// Progress. Each rank has a progress thread that runs the rank's collectives one after another,
// in the order they were called: start_all_reduce / start_all_gather hand the collective to it
// and return at once, so the transfer moves while the caller computes; the blocking collectives
// queue behind the started ones and wait. An emulated link (link_model) makes each collective
// last as long as its bytes would take on a given bandwidth and latency, slept on the progress
// thread, so that tests and benchmarks can show what overlap hides.

#include <loco/comm/communicator.hpp>
#include <loco/comm/rendezvous.hpp>
#include <loco/error.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

namespace loco::comm {

class threads;

// How long a rank waits for its peers in a collective before it aborts the group.
inline constexpr std::chrono::milliseconds default_collective_timeout{std::chrono::minutes(5)};

// An emulated link between the ranks of a thread_group: each collective on a rank lasts at least
// latency + (bytes this rank sends in it) / bytes_per_second, counted from the moment every rank
// has arrived, and it ends on every rank when the slowest rank's time is up. The time is slept on
// the rank's progress thread, never on the caller's. The defaults model no link at all.
struct link_model {
    double bytes_per_second = 0;  // 0: unlimited
    std::chrono::microseconds latency{0};

    bool unlimited() const noexcept { return bytes_per_second == 0 && latency.count() == 0; }
    // The time a collective in which this rank sends `bytes` lasts at least.
    // Saturates at about a century (a link slower than any real one), latency included.
    std::chrono::steady_clock::duration time_for(std::uint64_t bytes) const {
        using steady = std::chrono::steady_clock::duration;
        constexpr std::chrono::seconds longest{3'000'000'000};
        if (latency >= longest) return std::chrono::duration_cast<steady>(longest);
        const double transfer =
            bytes_per_second > 0 ? static_cast<double>(bytes) / bytes_per_second : 0.0;
        const double room = std::chrono::duration<double>(longest - latency).count();
        return std::chrono::duration_cast<steady>(latency) +
               std::chrono::duration_cast<steady>(
                   std::chrono::duration<double>(std::min(transfer, room)));
    }
};

template <class Fn>
void run_threads(int size, Fn&& fn,
                 std::chrono::milliseconds timeout = default_collective_timeout,
                 link_model link = {});

namespace detail {
class thread_group_access;
}

// The shared state of M thread ranks. Create one, then one loco::comm::threads per rank.
class thread_group {
public:
    static constexpr std::chrono::milliseconds default_timeout = default_collective_timeout;

    explicit thread_group(int size, std::chrono::milliseconds timeout = default_timeout,
                          link_model link = {})
        : rendezvous_(checked_size(size), timeout, "thread group"), link_(checked_link(link)) {}

    int size() const noexcept { return rendezvous_.size(); }
    std::chrono::milliseconds timeout() const noexcept { return rendezvous_.timeout(); }
    const link_model& link() const noexcept { return link_; }

    // Wakes every rank waiting in a collective; they and every later call throw comm_error with
    // this reason. Used when one worker fails so that its peers do not wait for the timeout.
    void abort(const std::string& reason) { rendezvous_.abort(reason); }
    bool aborted() const { return rendezvous_.aborted(); }

private:
    friend class threads;
    friend class detail::thread_group_access;
    template <class Fn>
    friend void run_threads(int, Fn&&, std::chrono::milliseconds, link_model);

    static int checked_size(int size) {
        if (size < 1) {
            throw invalid_argument("loco::comm::thread_group: size must be >= 1, got " +
                                   std::to_string(size));
        }
        return size;
    }

    static link_model checked_link(const link_model& link) {
        if (!(link.bytes_per_second >= 0) || !std::isfinite(link.bytes_per_second)) {
            throw invalid_argument("loco::comm::thread_group: link bytes_per_second must be a "
                                   "finite number >= 0 (0: unlimited), got " +
                                   std::to_string(link.bytes_per_second));
        }
        if (link.latency.count() < 0) {
            throw invalid_argument("loco::comm::thread_group: link latency must be >= 0, got " +
                                   std::to_string(link.latency.count()) + " us");
        }
        return link;
    }

    detail::rendezvous rendezvous_;
    link_model link_;
};

namespace detail {

// Test seam: hook(rank, peer) runs on `rank`'s progress thread right before it copies from
// `peer`'s buffer, so a test can slow a rank in the middle of a transfer. Set it before the
// group's first collective.
class thread_group_access {
public:
    static void set_copy_hook(thread_group& group, std::function<void(int rank, int peer)> hook) {
        group.rendezvous_.set_copy_hook(std::move(hook));
    }
};

// One rank's collectives, run in the order they were posted on a thread of their own (started
// with the first one). The destructor lets the queued work finish, then joins the thread.
class progress_queue {
public:
    // A posted collective: done once its body has run; error holds what it threw.
    class task {
    public:
        explicit task(std::function<void()> body) : body_(std::move(body)) {}

        void wait() {
            std::unique_lock<std::mutex> lock(mutex_);
            done_cv_.wait(lock, [&] { return done_; });
            if (error_) {
                std::rethrow_exception(std::exchange(error_, nullptr));
            }
        }
        bool done() const {
            std::lock_guard<std::mutex> lock(mutex_);
            return done_;
        }

    private:
        friend class progress_queue;

        std::exception_ptr run() noexcept {
            std::exception_ptr error;
            try {
                body_();
            } catch (...) {
                error = std::current_exception();
            }
            body_ = nullptr;  // release what the body holds before anyone is woken
            return error;
        }

        void complete(std::exception_ptr error) noexcept {
            {
                std::lock_guard<std::mutex> lock(mutex_);
                error_ = std::move(error);
                done_ = true;
            }
            done_cv_.notify_all();
        }

        std::function<void()> body_;
        mutable std::mutex mutex_;
        std::condition_variable done_cv_;
        bool done_ = false;
        std::exception_ptr error_;
    };

    progress_queue() = default;
    progress_queue(const progress_queue&) = delete;
    progress_queue& operator=(const progress_queue&) = delete;
    ~progress_queue() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stopping_ = true;
        }
        cv_.notify_all();
        if (worker_.joinable()) {
            worker_.join();
        }
    }

    std::shared_ptr<task> post(std::function<void()> body) {
        auto t = std::make_shared<task>(std::move(body));
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!worker_.joinable()) {
                worker_ = std::thread([this] { loop(); });
            }
            queue_.push_back(t);
            ++unfinished_;
        }
        cv_.notify_one();
        return t;
    }

    // Whether a posted task has not finished yet.
    bool busy() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return unfinished_ != 0;
    }

private:
    void loop() {
        for (;;) {
            std::shared_ptr<task> next;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
                if (queue_.empty()) {
                    return;  // stopping, and nothing left to run
                }
                next = std::move(queue_.front());
                queue_.pop_front();
            }
            std::exception_ptr error = next->run();
            {
                std::lock_guard<std::mutex> lock(mutex_);
                --unfinished_;
            }
            next->complete(std::move(error));
        }
    }

    mutable std::mutex mutex_;
    std::condition_variable cv_;
    std::deque<std::shared_ptr<task>> queue_;
    std::size_t unfinished_ = 0;  // posted, not yet completed
    bool stopping_ = false;
    std::thread worker_;
};

}  // namespace detail

// One rank of a thread_group. Its collectives run on a progress thread of its own, in call order;
// the object serves one calling thread at a time.
class threads final : public split_phase_communicator {
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
        rv().claim(rank_, "loco::comm::threads");
    }
    threads(const threads&) = delete;
    threads& operator=(const threads&) = delete;
    ~threads() override {
        // Requests are finished or abandoned before their communicator goes; if collectives are
        // still queued, the peers cannot rely on this rank any more: abort so that they end.
        if (progress_.busy()) {
            rv().abort("rank " + std::to_string(rank_) +
                       "'s communicator was destroyed with collectives in flight");
        }
        rv().release(rank_);
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
    using then = detail::rendezvous::then;

    std::unique_ptr<request::operation> do_start_all_reduce(tensor_view<float> data,
                                                            reduce_op op) override {
        return post([this, data, op, where = prefix("all_reduce")] {
            all_reduce_now(data, op, where);
        });
    }
    std::unique_ptr<request::operation> do_start_all_gather(
        tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        return post([this, send, recv, where = prefix("all_gather")] {
            all_gather_now(send, recv, where);
        });
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        post([this, send, recv, where = prefix("all_to_all")] {
            all_to_all_now(send, recv, where);
        })->wait();
    }
    void do_broadcast(tensor_view<std::byte> data, int root) override {
        post([this, data, root, where = prefix("broadcast")] { broadcast_now(data, root, where); })
            ->wait();
    }
    void do_barrier() override {
        post([this, where = prefix("barrier")] { barrier_now(where); })->wait();
    }

private:
    using clock = std::chrono::steady_clock;

    // A collective handed to the progress thread.
    class in_flight final : public request::operation {
    public:
        explicit in_flight(threads& owner)
            : owner_(owner), exceptions_(std::uncaught_exceptions()) {}
        void hold(std::shared_ptr<detail::progress_queue::task> task) noexcept {
            task_ = std::move(task);
        }
        void wait() override { task_->wait(); }
        void abandon() override {
            // Dropped while this rank unwinds from an exception: it is leaving, so its peers must
            // not wait for it until the timeout.
            if (std::uncaught_exceptions() > exceptions_ && !task_->done()) {
                owner_.rv().abort("rank " + std::to_string(owner_.rank_) +
                                  " failed with a collective in flight");
            }
            task_->wait();
        }

    private:
        std::shared_ptr<detail::progress_queue::task> task_;
        threads& owner_;
        int exceptions_;
    };

    // The request's operation is allocated before the collective is queued: once queued, it runs
    // with its peers whatever happens here, so an allocation failing after it would tell the
    // caller nothing started while the collective still writes into the caller's buffer.
    template <class Body>
    std::unique_ptr<in_flight> post(Body&& body) {
        auto op = std::make_unique<in_flight>(*this);
        op->hold(progress_.post(std::forward<Body>(body)));
        return op;
    }

    // The rest run on the progress thread.

    // Sleeps out the emulated link's time for a collective that began at `began` and in which
    // this rank sent `sent` bytes; ends this rank's reading first.
    void pace(clock::time_point began, std::uint64_t sent, const std::string& where) {
        const link_model& link = group_->link();
        if (link.unlimited()) {
            rv().stop_reading(rank_);
            return;
        }
        rv().pace(rank_, began + link.time_for(sent), where);
    }

    void all_reduce_now(tensor_view<float> data, reduce_op op, const std::string& where) {
        rv().start(rank_, {collective::all_reduce, data.size, 0, op, data.data, data.data}, where);
        const detail::reading_scope reading(rv(), rank_);
        const clock::time_point began = clock::now();
        const std::size_t m = static_cast<std::size_t>(size());
        const std::size_t r = static_cast<std::size_t>(rank_);
        const auto chunk_begin = [&](std::size_t k) { return data.size * k / m; };
        const auto peer = [&](std::size_t k) { return static_cast<const float*>(rv().slot(k).dst); };
        std::uint64_t sent = 0;

        // Reduce-scatter: this rank owns [lo, hi) and sums it over all ranks in rank order.
        const std::size_t lo = chunk_begin(r);
        const std::size_t hi = chunk_begin(r + 1);
        for (std::size_t k = 0; k < m; ++k) {
            if (k != r) {
                rv().before_copy(rank_, static_cast<int>(k));
            }
        }
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
        if (m > 1) {
            sent += (m - 1) * (hi - lo) * sizeof(float);
        }
        rv().wait(rank_, where, then::read);

        // All-gather: copy every other owner's reduced chunk.
        for (std::size_t k = 0; k < m; ++k) {
            if (k == r) {
                continue;
            }
            const std::size_t begin = chunk_begin(k);
            const std::size_t n = chunk_begin(k + 1) - begin;
            rv().before_copy(rank_, static_cast<int>(k));
            if (n != 0) {
                std::memcpy(data.data + begin, peer(k) + begin, n * sizeof(float));
            }
            rv().count_sent(k, n * sizeof(float));
        }
        if (m > 1) {
            sent += (data.size - (hi - lo)) * sizeof(float);
        }
        pace(began, sent, where);
        rv().wait(rank_, where);
    }

    void all_gather_now(tensor_view<const std::byte> send, tensor_view<std::byte> recv,
                        const std::string& where) {
        rv().start(rank_, {collective::all_gather, send.size, 0, reduce_op::sum, send.data, recv.data},
                   where);
        const detail::reading_scope reading(rv(), rank_);
        const clock::time_point began = clock::now();
        const std::size_t m = static_cast<std::size_t>(size());
        for (std::size_t k = 0; k < m; ++k) {
            std::byte* to = recv.data + k * send.size;
            const auto* from = static_cast<const std::byte*>(rv().slot(k).src);
            if (k != static_cast<std::size_t>(rank_)) {
                rv().before_copy(rank_, static_cast<int>(k));
                rv().count_sent(k, send.size);
            }
            // In place, this rank's send already is its slot.
            if (send.size != 0 && to != from) {
                std::memcpy(to, from, send.size);
            }
        }
        pace(began, (m - 1) * send.size, where);
        rv().wait(rank_, where);
    }

    void all_to_all_now(tensor_view<const std::byte> send, tensor_view<std::byte> recv,
                        const std::string& where) {
        rv().start(rank_, {collective::all_to_all, send.size, 0, reduce_op::sum, send.data, recv.data},
                   where);
        const detail::reading_scope reading(rv(), rank_);
        const clock::time_point began = clock::now();
        const std::size_t m = static_cast<std::size_t>(size());
        const std::size_t r = static_cast<std::size_t>(rank_);
        const std::size_t block = send.size / m;
        for (std::size_t k = 0; k < m; ++k) {
            if (k != r) {
                rv().before_copy(rank_, static_cast<int>(k));
                rv().count_sent(k, block);
            }
            if (block != 0) {
                std::memcpy(recv.data + k * block,
                            static_cast<const std::byte*>(rv().slot(k).src) + r * block, block);
            }
        }
        pace(began, (m - 1) * block, where);
        rv().wait(rank_, where);
    }

    void broadcast_now(tensor_view<std::byte> data, int root, const std::string& where) {
        rv().start(rank_, {collective::broadcast, data.size, root, reduce_op::sum, data.data, data.data},
                   where);
        const detail::reading_scope reading(rv(), rank_);
        const clock::time_point began = clock::now();
        if (rank_ != root) {
            rv().before_copy(rank_, root);
            if (data.size != 0) {
                std::memcpy(data.data, rv().slot(static_cast<std::size_t>(root)).dst, data.size);
            }
            rv().count_sent(static_cast<std::size_t>(root), data.size);
        }
        const std::uint64_t sent =
            rank_ == root ? static_cast<std::uint64_t>(size() - 1) * data.size : 0;
        pace(began, sent, where);
        rv().wait(rank_, where);
    }

    void barrier_now(const std::string& where) {
        rv().start(rank_, detail::posted_call{}, where);
        if (group_->link().unlimited()) return;
        // The link's latency is slept after the rendezvous; a closing one ends the barrier on
        // every rank together, so that a peer leaving once its barrier returned cannot fail the
        // barrier on a rank still sleeping (a collective is decided at its last rendezvous).
        pace(clock::now(), 0, where);
        rv().wait(rank_, where);
    }

    detail::rendezvous& rv() const noexcept { return group_->rendezvous_; }

    std::shared_ptr<thread_group> group_;
    int rank_;
    // Last: destroyed (its thread joined) before the members its tasks use.
    detail::progress_queue progress_;
};

// Runs fn(comm) on `size` threads, one per rank, over a group with the given timeout and emulated
// link, and waits for all of them. If a rank throws, the group is aborted so that its peers stop
// waiting, and the first exception that was not caused by the abort is rethrown.
template <class Fn>
void run_threads(int size, Fn&& fn, std::chrono::milliseconds timeout, link_model link) {
    auto group = std::make_shared<thread_group>(size, timeout, link);
    detail::run_ranks(size, group->rendezvous_, [&](int r) {
        threads comm(group, r);
        fn(comm);
    });
}

}  // namespace loco::comm
