#pragma once
// The communicator interface every loco handle talks to. A sync moves megabytes to gigabytes, so
// one virtual call per collective costs nothing measurable, and a run-time interface lets a trainer
// pick threads, MPI or NCCL without recompiling its optimizer types (see docs/design.md).
//
// Public calls check their arguments once here (memory space, sizes, root) and then forward to the
// implementation; implementations count the bytes they actually send.

#include <loco/error.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

namespace loco::comm {

enum class reduce_op : unsigned char { sum, mean };

class communicator;

// The first collective of a communicator that was started and never finished, if any. Shared
// by the communicator and its requests, so that a request may be dropped after its
// communicator is gone, or on another thread than the one starting collectives.
class abandon_mark {
public:
    void set(const std::string& what) {
        const std::lock_guard<std::mutex> lock(m_);
        if (what_.empty()) what_ = what;
    }
    std::string get() const {
        const std::lock_guard<std::mutex> lock(m_);
        return what_;
    }

private:
    mutable std::mutex m_;
    std::string what_;
};

// A collective in flight, returned by communicator::start_*: the transfer progresses while the
// caller goes on, and finish() completes it (waits, then throws the collective's error if it
// failed). Exactly one finish() per started request; the buffers given to start_* belong to the
// collective until then. Move-only.
//
// A request destroyed without finish() returns once the collective no longer touches its buffers
// (they may go away right after; what they then hold is unspecified), swallows its error, and
// marks its communicator: the next call on that communicator throws comm_error naming the
// abandoned collective, because the ranks' views of what was exchanged may now differ. It does
// not wait for what only the peers' later calls would complete (comm::mpi: an all_reduce's
// all-gather then goes to memory of its own): a departure or regroup drops exchanges on every
// rank, and no rank makes a later call on the old communicator.
class request {
public:
    // What an implementation hands back from do_start_*: wait() blocks until the collective is
    // complete on this rank and throws its error.
    class operation {
    public:
        virtual ~operation() = default;
        virtual void wait() = 0;
        // Called instead of wait() when the request is destroyed unfinished. It too must return
        // only once the collective no longer touches the buffers; its error is dropped. An
        // implementation may first cancel or abort (comm::threads aborts its group when the rank
        // is unwinding from an exception, so that peers are not left waiting for it).
        virtual void abandon() { wait(); }
        // Called by finish() before it gives the operation up: what it throws leaves the request
        // pending, so it must touch nothing (comm::mpi refuses a thread MPI may not be called on).
        virtual void check_finish() {}
    };

    request() = default;
    request(std::shared_ptr<abandon_mark> mark, std::unique_ptr<operation> op,
            std::string what) noexcept
        : mark_(std::move(mark)), op_(std::move(op)), what_(std::move(what)) {}
    request(request&& other) noexcept
        : mark_(std::move(other.mark_)),
          op_(std::move(other.op_)),
          what_(std::move(other.what_)),
          finished_(std::exchange(other.finished_, false)) {}
    request& operator=(request&& other) noexcept {
        if (this != &other) {
            abandon();
            mark_ = std::move(other.mark_);
            op_ = std::move(other.op_);
            what_ = std::move(other.what_);
            finished_ = std::exchange(other.finished_, false);
        }
        return *this;
    }
    request(const request&) = delete;
    request& operator=(const request&) = delete;
    ~request() { abandon(); }

    // True between start_* and finish().
    bool pending() const noexcept { return op_ != nullptr; }
    // The collective and rank, for messages ("loco::comm::threads rank 1, all_reduce").
    const std::string& what() const noexcept { return what_; }

    // Completes the collective; throws its error. Throws loco::invalid_argument when the request
    // was already finished or never started.
    inline void finish();

    // What finish() would refuse before it touches anything (the operation's check_finish), for
    // an operation that wraps this request and must pass the check on (comm::cuda_staging).
    void check_finish() {
        if (op_) op_->check_finish();
    }

private:
    inline void abandon() noexcept;

    std::shared_ptr<abandon_mark> mark_;
    std::unique_ptr<operation> op_;
    std::string what_;
    bool finished_ = false;
};

class communicator {
public:
    virtual ~communicator() = default;

    virtual int rank() const noexcept = 0;
    virtual int size() const noexcept = 0;
    // Where the buffers given to the collectives must live.
    virtual loco::memory_space space() const noexcept = 0;
    virtual std::string_view name() const noexcept = 0;
    // Bytes this rank has sent to its peers since construction, counted where they are sent.
    virtual std::uint64_t bytes_sent() const noexcept = 0;

    // Element-wise sum or mean over all ranks, in place; every rank gets bit-identical results.
    // Blocking: start_all_reduce + finish.
    void all_reduce(tensor_view<float> data, reduce_op op) {
        const one_caller guard(*this, "all_reduce");
        make_all_reduce(data, op).finish();
    }

    // The same, split-phase: returns at once; `data` belongs to the collective until finish().
    // Collectives on one communicator complete in the order they were started, on every rank.
    request start_all_reduce(tensor_view<float> data, reduce_op op) {
        const one_caller guard(*this, "start_all_reduce");
        return make_all_reduce(data, op);
    }

    // Concatenation of every rank's `send` bytes in rank order; recv holds size() * send.size.
    // send and recv are disjoint, or send is exactly this rank's slot of recv (in place).
    // Blocking: start_all_gather + finish.
    void all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) {
        const one_caller guard(*this, "all_gather");
        make_all_gather(send, recv).finish();
    }

    // The same, split-phase: both buffers belong to the collective until finish().
    request start_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) {
        const one_caller guard(*this, "start_all_gather");
        return make_all_gather(send, recv);
    }

    // Personalised exchange: send and recv hold size() blocks of b bytes each; block k of this
    // rank's send goes to rank k, and block k of recv comes from rank k. send and recv must not
    // overlap.
    void all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) {
        const one_caller guard(*this, "all_to_all");
        check_usable("all_to_all");
        check_buffer(send.data, send.size, send.space, "all_to_all");
        check_buffer(recv.data, recv.size, recv.space, "all_to_all");
        const auto m = static_cast<std::size_t>(size());
        if (send.size != recv.size || send.size % m != 0) {
            throw shape_error(prefix("all_to_all") + "send (" + std::to_string(send.size) +
                              " bytes) and recv (" + std::to_string(recv.size) +
                              " bytes) must be equal and hold " + std::to_string(m) +
                              " blocks of the same size");
        }
        const std::less<const std::byte*> before;
        if (send.size != 0 && before(send.data, recv.data + recv.size) &&
            before(recv.data, send.data + send.size)) {
            throw invalid_argument(prefix("all_to_all") + "send and recv overlap");
        }
        do_all_to_all(send, recv);
    }

    // Copies root's bytes into every other rank's buffer.
    void broadcast(tensor_view<std::byte> data, int root) {
        const one_caller guard(*this, "broadcast");
        check_usable("broadcast");
        check_buffer(data.data, data.size, data.space, "broadcast");
        if (root < 0 || root >= size()) {
            throw invalid_argument(prefix("broadcast") + "root " + std::to_string(root) +
                                   " is not a rank of a communicator of size " +
                                   std::to_string(size()));
        }
        do_broadcast(data, root);
    }

    // Returns once every rank has called it.
    void barrier() {
        const one_caller guard(*this, "barrier");
        check_usable("barrier");
        do_barrier();
    }

protected:
    // Split-phase hooks. The defaults run the blocking collective now and hand back a completed
    // operation (correct, without overlap); communicators that can overlap override them and
    // then also make the blocking do_* calls wait for the collectives started before them.
    virtual std::unique_ptr<request::operation> do_start_all_reduce(tensor_view<float> data,
                                                                    reduce_op op) {
        return run_now([&] { do_all_reduce(data, op); });
    }
    virtual std::unique_ptr<request::operation> do_start_all_gather(
        tensor_view<const std::byte> send, tensor_view<std::byte> recv) {
        return run_now([&] { do_all_gather(send, recv); });
    }

    virtual void do_all_reduce(tensor_view<float> data, reduce_op op) = 0;
    virtual void do_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) = 0;
    virtual void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) = 0;
    virtual void do_broadcast(tensor_view<std::byte> data, int root) = 0;
    virtual void do_barrier() = 0;

    std::string prefix(std::string_view call) const { return prefix_name(call) + ": "; }

    std::string prefix_name(std::string_view call) const {
        return "loco::comm::" + std::string(name()) + " rank " + std::to_string(rank()) + ", " +
               std::string(call);
    }

private:
    friend class request;

    // Marks a public call in progress. A communicator serves one thread at a time: a second
    // thread calling while one is inside (a blocking collective, or a start_*) would interleave
    // the two threads' collectives in an order the other ranks cannot know, so it is refused.
    class one_caller {
    public:
        one_caller(communicator& c, const char* call) : c_(c) {
            const char* idle = nullptr;
            if (!c_.in_call_.compare_exchange_strong(idle, call, std::memory_order_acq_rel)) {
                throw invalid_argument(
                    c_.prefix(call) + "called while another thread is inside " + idle +
                    " on the same communicator; a communicator serves one thread at a time: "
                    "give each thread its own rank, or make the calls one after another");
            }
        }
        ~one_caller() { c_.in_call_.store(nullptr, std::memory_order_release); }
        one_caller(const one_caller&) = delete;
        one_caller& operator=(const one_caller&) = delete;

    private:
        communicator& c_;
    };

    request make_all_reduce(tensor_view<float> data, reduce_op op) {
        check_usable("all_reduce");
        check_buffer(data.data, data.size, data.space, "all_reduce");
        // The name first: once the operation has started, nothing may throw before the request
        // holds it (a throw would drop it unwaited while it still uses the caller's buffer).
        std::string name = prefix_name("all_reduce");
        auto op_started = do_start_all_reduce(data, op);
        return {abandoned_, std::move(op_started), std::move(name)};
    }

    request make_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) {
        check_usable("all_gather");
        check_buffer(send.data, send.size, send.space, "all_gather");
        check_buffer(recv.data, recv.size, recv.space, "all_gather");
        // Divided, not multiplied: a send size near SIZE_MAX / size() must not wrap into a match.
        if (recv.size % static_cast<std::size_t>(size()) != 0 ||
            recv.size / static_cast<std::size_t>(size()) != send.size) {
            throw shape_error(prefix("all_gather") + "the receive buffer holds " +
                              std::to_string(recv.size) + " bytes but " + std::to_string(size()) +
                              " ranks x " + std::to_string(send.size) + " bytes were sent");
        }
        const std::less<const std::byte*> before;
        const bool overlap = send.size != 0 && before(send.data, recv.data + recv.size) &&
                             before(recv.data, send.data + send.size);
        const std::byte* own_slot = recv.data + static_cast<std::size_t>(rank()) * send.size;
        if (overlap && send.data != own_slot) {
            throw invalid_argument(prefix("all_gather") +
                                   "the send buffer overlaps the receive buffer but is not this "
                                   "rank's slot of it");
        }
        std::string name = prefix_name("all_gather");  // before the start: see make_all_reduce
        auto op_started = do_start_all_gather(send, recv);
        return {abandoned_, std::move(op_started), std::move(name)};
    }

    // A completed operation that rethrows what the blocking call threw.
    class completed final : public request::operation {
    public:
        explicit completed(std::exception_ptr error) noexcept : error_(std::move(error)) {}
        void wait() override {
            if (error_) {
                std::rethrow_exception(std::exchange(error_, nullptr));
            }
        }

    private:
        std::exception_ptr error_;
    };

    template <class Fn>
    static std::unique_ptr<request::operation> run_now(Fn&& fn) {
        std::exception_ptr error;
        try {
            fn();
        } catch (...) {
            error = std::current_exception();
        }
        return std::make_unique<completed>(std::move(error));
    }

    void check_usable(std::string_view call) const {
        const std::string abandoned = abandoned_->get();
        if (!abandoned.empty()) {
            throw comm_error(prefix(call) + "an earlier " + abandoned +
                             " was started but never finished (a request destroyed without "
                             "finish()); the ranks may disagree on what was exchanged, so this "
                             "communicator refuses further collectives");
        }
    }

    void check_buffer(const void* data, std::size_t n, loco::memory_space where,
                      std::string_view call) const {
        if (where != space()) {
            throw memory_space_error(prefix(call) + "got a buffer in " +
                                     std::string(to_string(where)) +
                                     " memory but this communicator moves " +
                                     std::string(to_string(space())) + " memory");
        }
        if (n != 0 && data == nullptr) {
            throw invalid_argument(prefix(call) + "null buffer of " + std::to_string(n) +
                                   " elements");
        }
    }

    std::shared_ptr<abandon_mark> abandoned_ = std::make_shared<abandon_mark>();
    std::atomic<const char*> in_call_{nullptr};  // the public call in progress, if any
};

// The base of communicators whose all-reduce and all-gather are split-phase by nature (threads,
// MPI, NCCL, staging): they implement only the start hooks. The public blocking calls are already
// start + finish; the blocking hooks, which only the default start hooks call, are the same here.
class split_phase_communicator : public communicator {
protected:
    std::unique_ptr<request::operation> do_start_all_reduce(tensor_view<float> data,
                                                            reduce_op op) override = 0;
    std::unique_ptr<request::operation> do_start_all_gather(
        tensor_view<const std::byte> send, tensor_view<std::byte> recv) override = 0;

    void do_all_reduce(tensor_view<float> data, reduce_op op) final {
        do_start_all_reduce(data, op)->wait();
    }
    void do_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) final {
        do_start_all_gather(send, recv)->wait();
    }
};

inline void request::finish() {
    if (!op_) {
        throw invalid_argument(finished_ ? "loco::comm::request: " + what_ +
                                               " was already finished; finish() each request once"
                                         : std::string("loco::comm::request: finish() on a request "
                                                       "that was never started (default-"
                                                       "constructed or moved from)"));
    }
    // A refusal before anything is touched keeps the request pending, to be finished where it
    // is allowed; past this point the request is consumed, whatever wait() throws.
    op_->check_finish();
    auto op = std::move(op_);
    finished_ = true;
    op->wait();
}

inline void request::abandon() noexcept {
    if (!op_) {
        return;
    }
    auto op = std::move(op_);
    try {
        op->abandon();
    } catch (...) {
        // The request is being dropped: its error has no one to go to. The mark below makes the
        // next collective on the communicator fail instead.
    }
    if (mark_) {
        try {
            mark_->set(what_);
        } catch (...) {
            // Out of memory for the name: the collective is gone either way.
        }
    }
}

// Byte views of float data, for all_gather and broadcast.
inline tensor_view<std::byte> as_bytes(tensor_view<float> v) noexcept {
    return {reinterpret_cast<std::byte*>(v.data), v.size_bytes(), 0, 0, v.space};
}
inline tensor_view<const std::byte> as_bytes(tensor_view<const float> v) noexcept {
    return {reinterpret_cast<const std::byte*>(v.data), v.size_bytes(), 0, 0, v.space};
}

namespace detail {

// The longest wait a communicator honours (about a century): std::chrono::milliseconds::max(),
// the natural "never", would overflow when added to a clock's time point.
inline constexpr std::chrono::milliseconds longest_wait =
    std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::hours(24 * 365 * 100));

// now + timeout, saturated at longest_wait.
inline std::chrono::steady_clock::time_point deadline_after(std::chrono::milliseconds timeout) {
    return std::chrono::steady_clock::now() + std::min(timeout, longest_wait);
}

}  // namespace detail
}  // namespace loco::comm
