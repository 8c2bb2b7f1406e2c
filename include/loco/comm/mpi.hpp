#pragma once
// loco::comm::mpi: the communicator interface over an MPI communicator the program already has
// (MPI_COMM_WORLD or any intra-communicator split from it), so loco's workers can be MPI ranks on
// one machine or many. Needs <mpi.h> and an MPI library (link MPI::MPI_CXX); see
// docs/communicators.md#mpi.
//
// The results and byte counts are those of comm::threads, so a run over MPI and the same run over
// threads end with the same parameters bit for bit:
//   all_reduce  reduce-scatter (MPI_Ialltoallv: rank k receives chunk k, [n*k/M, n*(k+1)/M), of
//               every rank), a sum over ranks 0..M-1 in that order by the chunk's owner, then an
//               all-gather of the reduced chunks (MPI_Iallgatherv). MPI_Allreduce is not used: MPI
//               lets it sum floats in any order, which differs between ranks and algorithms.
//               Bytes sent by rank r: 4 * (n + (M-2) * c_r), c_r its chunk.
//   all_gather  MPI_Iallgather, (M-1) * bytes.    all_to_all  MPI_Alltoall, (M-1) * block bytes.
//   broadcast   MPI_Bcast, (M-1) * bytes from the root, 0 from the others (the volume of a direct
//               broadcast; OpenMPI's tree moves the same data through other ranks).
//
// The constructor duplicates the communicator twice (MPI_Comm_dup is collective): loco's traffic
// never matches the program's own messages, and errors on the duplicates come back as return codes
// (MPI_ERRORS_RETURN), which loco turns into comm_error with MPI_Error_string's text. The user's
// communicator is neither changed nor freed unless options::take_ownership asks for it.
//
// Split-phase collectives are real nonblocking MPI operations; the reduce-scatter's sum and the
// issue of the all-gather happen in finish(), or earlier when a later call finds the reduce-scatter
// done. The all-gathers of all_reduce run on the second duplicate, issued in start order on every
// rank: finishing any request first completes every collective started before it, and a blocking
// collective first completes every pending one. MPI progresses a transfer only inside MPI calls
// (OpenMPI has no progress thread for collectives), so the overlap is as good as the MPI library's.

#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loco::comm {

class mpi final : public split_phase_communicator {
public:
    struct options {
        // The number of ranks the program expects; 0 accepts any. A communicator of another size
        // is refused at construction.
        int expected_size = 0;
        // MPI_Comm_free the given communicator in the destructor (never MPI_COMM_WORLD/SELF).
        bool take_ownership = false;
        // Before each collective, one small MPI_Allreduce compares what the ranks called (kind,
        // count, root, operation): ranks that disagree all throw the same comm_error and no data
        // moves, instead of MPI's undefined behaviour (truncation, garbage or a hang). It costs
        // one latency per collective; turn it off only for programs known to agree.
        bool check_calls = true;
    };

    // Collective over `comm` (it duplicates it). Throws comm_error when MPI is not initialised or
    // already finalized, invalid_argument for MPI_COMM_NULL or an inter-communicator, and
    // comm_error when the size differs from options::expected_size.
    explicit mpi(MPI_Comm comm) : mpi(comm, options{}) {}
    mpi(MPI_Comm comm, options opts) : user_(comm), take_ownership_(opts.take_ownership),
                                       check_calls_(opts.check_calls) {
        require_mpi_running("loco::comm::mpi: ");
        if (comm == MPI_COMM_NULL) {
            throw invalid_argument("loco::comm::mpi: the communicator is MPI_COMM_NULL; pass "
                                   "MPI_COMM_WORLD or a communicator this process belongs to");
        }
        if (opts.take_ownership && (comm == MPI_COMM_WORLD || comm == MPI_COMM_SELF)) {
            throw invalid_argument("loco::comm::mpi: take_ownership of MPI_COMM_WORLD or "
                                   "MPI_COMM_SELF; they are MPI's and cannot be freed");
        }
        int inter = 0;
        check_setup(MPI_Comm_test_inter(comm, &inter), "MPI_Comm_test_inter");
        if (inter != 0) {
            throw invalid_argument("loco::comm::mpi: an inter-communicator was given; loco's "
                                   "collectives need an intra-communicator (MPI_Intercomm_merge)");
        }
        check_setup(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
        check_setup(MPI_Comm_size(comm, &size_), "MPI_Comm_size");
        if (opts.expected_size < 0) {
            throw invalid_argument("loco::comm::mpi: expected_size must be >= 0 (0 = any), got " +
                                   std::to_string(opts.expected_size));
        }
        if (opts.expected_size != 0 && opts.expected_size != size_) {
            throw comm_error("loco::comm::mpi: expected " + std::to_string(opts.expected_size) +
                             " ranks but the MPI communicator has " + std::to_string(size_) +
                             "; start the program with mpirun -np " +
                             std::to_string(opts.expected_size) +
                             " or pass the communicator of that group");
        }
        check_setup(MPI_Comm_dup(comm, &data_), "MPI_Comm_dup");
        if (const int rc = MPI_Comm_set_errhandler(data_, MPI_ERRORS_RETURN); rc != MPI_SUCCESS) {
            MPI_Comm_free(&data_);
            check_setup(rc, "MPI_Comm_set_errhandler");
        }
        if (const int rc = MPI_Comm_dup(data_, &gather_); rc != MPI_SUCCESS) {
            MPI_Comm_free(&data_);
            check_setup(rc, "MPI_Comm_dup");
        }
    }

    mpi(const mpi&) = delete;
    mpi& operator=(const mpi&) = delete;

    // Completes what is still pending (errors have no one to go to), then frees the duplicates and,
    // with take_ownership, the given communicator. Collective when MPI frees communicators
    // collectively; does nothing to MPI once MPI_Finalize has run.
    ~mpi() override {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (finalized != 0) {
            return;
        }
        try {
            drain();
        } catch (...) {
            // Every pending operation keeps its own error; nothing more to report here.
        }
        MPI_Comm_free(&gather_);
        MPI_Comm_free(&data_);
        if (take_ownership_) {
            MPI_Comm_free(&user_);
        }
    }

    int rank() const noexcept override { return rank_; }
    int size() const noexcept override { return size_; }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return "mpi"; }
    std::uint64_t bytes_sent() const noexcept override { return bytes_sent_; }

    // The communicator given at construction (loco uses duplicates of it).
    MPI_Comm handle() const noexcept { return user_; }

protected:
    std::unique_ptr<request::operation> do_start_all_reduce(tensor_view<float> data,
                                                            reduce_op op) override {
        const std::string where = prefix("all_reduce");
        require_usable(where);
        checked_count(data.size, "floats", where);
        agree(kind::all_reduce, data.size, 0, op, where);
        progress();
        require_usable(where);
        auto p = std::make_shared<pending>();
        p->what = kind::all_reduce;
        p->where = where;
        p->data = data;
        p->op = op;
        const auto m = static_cast<std::size_t>(size_);
        p->counts.resize(m);
        p->displs.resize(m);
        for (std::size_t k = 0; k < m; ++k) {
            p->displs[k] = static_cast<int>(chunk_begin(data.size, k));
            p->counts[k] = static_cast<int>(chunk_begin(data.size, k + 1) - chunk_begin(data.size, k));
        }
        // Rank r receives its own chunk from every rank: M blocks of c_r floats, in rank order.
        const int own = p->counts[static_cast<std::size_t>(rank_)];
        p->scratch.resize(m * static_cast<std::size_t>(own));
        p->recv_counts.assign(m, own);
        p->recv_displs.resize(m);
        for (std::size_t k = 0; k < m; ++k) {
            p->recv_displs[k] = static_cast<int>(k) * own;
        }
        // MPI reads the count arrays until completion: they live in `p`, as long as the request.
        call(MPI_Ialltoallv(data.data, p->counts.data(), p->displs.data(), MPI_FLOAT,
                            p->scratch.data(), p->recv_counts.data(), p->recv_displs.data(),
                            MPI_FLOAT, data_, &p->req),
             "MPI_Ialltoallv", where);
        p->step = stage::reduce_scatter;
        p->bytes = sizeof(float) * (data.size - static_cast<std::size_t>(own));
        queue_.push_back(p);
        return std::make_unique<operation>(*this, std::move(p));
    }

    std::unique_ptr<request::operation> do_start_all_gather(tensor_view<const std::byte> send,
                                                            tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_gather");
        require_usable(where);
        const int n = checked_count(send.size, "bytes", where);
        agree(kind::all_gather, send.size, 0, reduce_op::sum, where);
        progress();
        require_usable(where);
        auto p = std::make_shared<pending>();
        p->what = kind::all_gather;
        p->where = where;
        p->bytes = static_cast<std::uint64_t>(size_ - 1) * send.size;
        // In place: this rank's send already sits in its slot of recv.
        const std::byte* own_slot = recv.data + static_cast<std::size_t>(rank_) * send.size;
        const void* src = send.size != 0 && send.data == own_slot
                              ? MPI_IN_PLACE
                              : static_cast<const void*>(send.data);
        call(MPI_Iallgather(src, n, MPI_BYTE, recv.data, n, MPI_BYTE, data_, &p->req),
             "MPI_Iallgather", where);
        p->step = stage::all_gather;
        queue_.push_back(p);
        return std::make_unique<operation>(*this, std::move(p));
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_to_all");
        require_usable(where);
        const std::size_t block = send.size / static_cast<std::size_t>(size_);
        const int n = checked_count(block, "bytes per block", where);
        agree(kind::all_to_all, send.size, 0, reduce_op::sum, where);
        drain();
        require_usable(where);
        call(MPI_Alltoall(send.data, n, MPI_BYTE, recv.data, n, MPI_BYTE, data_), "MPI_Alltoall",
             where);
        bytes_sent_ += static_cast<std::uint64_t>(size_ - 1) * block;
    }

    void do_broadcast(tensor_view<std::byte> data, int root) override {
        const std::string where = prefix("broadcast");
        require_usable(where);
        const int n = checked_count(data.size, "bytes", where);
        agree(kind::broadcast, data.size, root, reduce_op::sum, where);
        drain();
        require_usable(where);
        call(MPI_Bcast(data.data, n, MPI_BYTE, root, data_), "MPI_Bcast", where);
        if (rank_ == root) {
            bytes_sent_ += static_cast<std::uint64_t>(size_ - 1) * data.size;
        }
    }

    void do_barrier() override {
        const std::string where = prefix("barrier");
        require_usable(where);
        drain();
        require_usable(where);
        if (check_calls_) {
            agree(kind::barrier, 0, 0, reduce_op::sum, where);  // that all-reduce is a barrier
        } else {
            call(MPI_Barrier(data_), "MPI_Barrier", where);
        }
    }

private:
    enum class kind : std::int64_t { barrier, all_reduce, all_gather, all_to_all, broadcast };
    enum class stage : unsigned char { reduce_scatter, all_gather, done };

    // One started nonblocking collective. Shared by the queue and the request.
    struct pending {
        kind what = kind::all_reduce;
        std::string where;  // message prefix: "loco::comm::mpi rank 1, all_reduce: "
        stage step = stage::done;
        MPI_Request req = MPI_REQUEST_NULL;
        std::uint64_t bytes = 0;  // what this rank sends in the stage in flight
        std::exception_ptr error;
        // all_reduce only
        tensor_view<float> data;
        reduce_op op = reduce_op::sum;
        std::vector<float> scratch;          // M copies of this rank's chunk, in rank order
        std::vector<int> counts, displs;     // the chunks of the buffer, in floats
        std::vector<int> recv_counts, recv_displs;
    };

    class operation final : public request::operation {
    public:
        operation(mpi& owner, std::shared_ptr<pending> p) noexcept
            : owner_(owner), p_(std::move(p)) {}
        void wait() override {
            owner_.complete_through(p_);
            if (p_->error) {
                std::rethrow_exception(p_->error);
            }
        }

    private:
        mpi& owner_;
        std::shared_ptr<pending> p_;
    };

    // Rank k's chunk of n elements starts here, as in comm::threads.
    std::size_t chunk_begin(std::size_t n, std::size_t k) const noexcept {
        return n * k / static_cast<std::size_t>(size_);
    }

    static void require_mpi_running(const std::string& where) {
        int initialized = 0;
        int finalized = 0;
        MPI_Initialized(&initialized);
        MPI_Finalized(&finalized);
        if (initialized == 0) {
            throw comm_error(where + "MPI is not initialised; call MPI_Init (or MPI_Init_thread) "
                                     "before creating or using a loco::comm::mpi");
        }
        if (finalized != 0) {
            throw comm_error(where + "MPI has been finalized; destroy loco's MPI communicators and "
                                     "finish every collective before MPI_Finalize");
        }
    }

    static std::string mpi_error_text(int code) {
        char text[MPI_MAX_ERROR_STRING] = {};
        int length = 0;
        if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) {
            return "MPI error code " + std::to_string(code);
        }
        return std::string(text, static_cast<std::size_t>(std::max(length, 0))) + " (MPI error " +
               std::to_string(code) + ")";
    }

    // Setup calls run on the user's communicator, whose error handler is the user's.
    static void check_setup(int rc, const char* fn) {
        if (rc != MPI_SUCCESS) {
            throw comm_error(std::string("loco::comm::mpi: ") + fn + " failed: " + mpi_error_text(rc));
        }
    }

    // An MPI call of a collective: a failure leaves the ranks' views of what was exchanged
    // unknown, so this communicator refuses every later call.
    void call(int rc, const char* fn, const std::string& where) {
        if (rc == MPI_SUCCESS) {
            return;
        }
        const std::string message = where + fn + " failed: " + mpi_error_text(rc);
        if (broken_.empty()) {
            broken_ = message;
        }
        throw comm_error(message);
    }

    void require_usable(const std::string& where) const {
        require_mpi_running(where);
        if (!broken_.empty()) {
            throw comm_error(where + "an earlier MPI error left this communicator unusable (" +
                             broken_ + "); the ranks may disagree on what was exchanged, so "
                             "end the job (MPI_Abort) and restart it from a checkpoint");
        }
    }

    static int checked_count(std::size_t n, const char* unit, const std::string& where) {
        if (n > static_cast<std::size_t>(INT_MAX)) {
            throw invalid_argument(where + std::to_string(n) + " " + unit +
                                   " exceed MPI's int count limit (" + std::to_string(INT_MAX) +
                                   "); split the buffer into smaller collectives");
        }
        return static_cast<int>(n);
    }

    static std::string_view kind_name(std::int64_t k) noexcept {
        switch (static_cast<kind>(k)) {
            case kind::barrier: return "barrier";
            case kind::all_reduce: return "all_reduce";
            case kind::all_gather: return "all_gather";
            case kind::all_to_all: return "all_to_all";
            case kind::broadcast: return "broadcast";
        }
        return "?";
    }

    // One MPI_Allreduce of the call's description and its negation gives every rank the minimum
    // and maximum of each field; where they differ, every rank throws the same comm_error before
    // any data moves.
    void agree(kind what, std::size_t count, int root, reduce_op op, const std::string& where) {
        if (!check_calls_) {
            return;
        }
        const std::int64_t mine[4] = {static_cast<std::int64_t>(what),
                                      static_cast<std::int64_t>(count), root,
                                      static_cast<std::int64_t>(op)};
        std::int64_t v[8];
        for (int i = 0; i < 4; ++i) {
            v[i] = mine[i];
            v[4 + i] = -mine[i];
        }
        call(MPI_Allreduce(MPI_IN_PLACE, v, 8, MPI_INT64_T, MPI_MAX, data_), "MPI_Allreduce", where);
        const auto lo = [&](int i) { return -v[4 + i]; };
        const auto hi = [&](int i) { return v[i]; };
        const std::string rule = "; every rank must call the same collectives in the same order "
                                 "with the same sizes (no data moved)";
        if (lo(0) != hi(0)) {
            throw comm_error(where + "ranks disagree on the collective: some called " +
                             std::string(kind_name(lo(0))) + ", others " +
                             std::string(kind_name(hi(0))) + rule);
        }
        if (lo(1) != hi(1)) {
            const char* unit = what == kind::all_reduce ? " floats" : " bytes";
            throw comm_error(where + "ranks disagree on the size: from " + std::to_string(lo(1)) +
                             unit + " to " + std::to_string(hi(1)) + unit + rule);
        }
        if (lo(2) != hi(2)) {
            throw comm_error(where + "ranks disagree on the root: from rank " +
                             std::to_string(lo(2)) + " to rank " + std::to_string(hi(2)) + rule);
        }
        if (lo(3) != hi(3)) {
            throw comm_error(where + "ranks disagree on the reduce operation: some sum, others take "
                                     "the mean" + rule);
        }
    }

    // Moves `p` on when its stage is complete: waits for it when `block`, else only tests.
    // Returns true when p is done (with or without an error).
    bool advance(pending& p, bool block) {
        try {
            if (p.step == stage::reduce_scatter) {
                if (!complete(p, block, "MPI_Ialltoallv")) {
                    return false;
                }
                if (!broken_.empty()) {
                    throw comm_error(p.where + "not completed: an earlier MPI error left this "
                                               "communicator unusable (" + broken_ + ")");
                }
                reduce_own_chunk(p);
                call(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, p.data.data, p.counts.data(),
                                     p.displs.data(), MPI_FLOAT, gather_, &p.req),
                     "MPI_Iallgatherv", p.where);
                p.step = stage::all_gather;
                const auto own = static_cast<std::uint64_t>(p.counts[static_cast<std::size_t>(rank_)]);
                p.bytes = sizeof(float) * static_cast<std::uint64_t>(size_ - 1) * own;
            }
            if (p.step == stage::all_gather) {
                if (!complete(p, block, p.what == kind::all_reduce ? "MPI_Iallgatherv"
                                                                    : "MPI_Iallgather")) {
                    return false;
                }
                p.step = stage::done;
                p.scratch = {};
            }
        } catch (...) {
            p.error = std::current_exception();
            p.step = stage::done;
            p.scratch = {};
        }
        return true;
    }

    // Waits for or tests the stage in flight; counts its bytes when it completed.
    bool complete(pending& p, bool block, const char* fn) {
        int done = 1;
        if (block) {
            call(MPI_Wait(&p.req, MPI_STATUS_IGNORE), fn, p.where);
        } else {
            call(MPI_Test(&p.req, &done, MPI_STATUS_IGNORE), fn, p.where);
        }
        if (done != 0) {
            bytes_sent_ += p.bytes;
        }
        return done != 0;
    }

    // The reduce-scatter's sum: rank r's chunk over ranks 0..M-1 in that order, as comm::threads
    // sums it, then divided by M for the mean.
    void reduce_own_chunk(pending& p) const {
        const auto m = static_cast<std::size_t>(size_);
        const auto r = static_cast<std::size_t>(rank_);
        const auto c = static_cast<std::size_t>(p.counts[r]);
        float* out = p.data.data + p.displs[r];
        const float* in = p.scratch.data();
        for (std::size_t i = 0; i < c; ++i) {
            out[i] = in[i];
        }
        for (std::size_t k = 1; k < m; ++k) {
            const float* block = in + k * c;
            for (std::size_t i = 0; i < c; ++i) {
                out[i] += block[i];
            }
        }
        if (p.op == reduce_op::mean) {
            const float divisor = static_cast<float>(m);
            for (std::size_t i = 0; i < c; ++i) {
                out[i] = out[i] / divisor;
            }
        }
    }

    // Opportunistic progress at every start: moves the pending collectives on as far as their
    // transfers allow, in start order, so all_reduce's all-gather is issued without waiting for
    // finish(). Issues nothing out of order: it stops at the first reduce-scatter still in flight.
    void progress() {
        for (auto& p : queue_) {
            if (p->step == stage::reduce_scatter) {
                if (!advance(*p, false)) {
                    return;
                }
            } else if (p->step == stage::all_gather) {
                advance(*p, false);
            }
        }
        while (!queue_.empty() && queue_.front()->step == stage::done) {
            queue_.pop_front();
        }
    }

    // Completes every collective started before `p`, then `p` (start order).
    void complete_through(const std::shared_ptr<pending>& p) {
        if (std::find(queue_.begin(), queue_.end(), p) == queue_.end()) {
            return;  // already completed, with every collective before it
        }
        while (!queue_.empty()) {
            const auto front = queue_.front();
            advance(*front, true);
            queue_.pop_front();
            if (front == p) {
                return;
            }
        }
    }

    // Completes every pending collective; their errors stay with their requests.
    void drain() {
        while (!queue_.empty()) {
            advance(*queue_.front(), true);
            queue_.pop_front();
        }
    }

    MPI_Comm user_;
    MPI_Comm data_ = MPI_COMM_NULL;    // every collective but all_reduce's all-gather
    MPI_Comm gather_ = MPI_COMM_NULL;  // all_reduce's all-gathers, issued in start order
    bool take_ownership_;
    bool check_calls_;
    int rank_ = 0;
    int size_ = 1;
    std::uint64_t bytes_sent_ = 0;
    std::string broken_;  // the first MPI error; after it this communicator refuses calls
    std::deque<std::shared_ptr<pending>> queue_;  // started, not yet completed, in start order
};

}  // namespace loco::comm
