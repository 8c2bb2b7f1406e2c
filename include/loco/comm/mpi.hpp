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
// MPI counts are ints: a collective over more than INT_MAX elements (options::max_count) is issued
// as several MPI calls over consecutive pieces, one request for all of them. An all_reduce's
// pieces are multiples of M floats, so their chunks add up to the whole buffer's: the bytes stay
// those of comm::threads, and so do the sums (rank order, element by element).
//
// The constructor duplicates the communicator twice (MPI_Comm_dup is collective): loco's traffic
// never matches the program's own messages, and errors on the duplicates come back as return codes
// (MPI_ERRORS_RETURN), which loco turns into comm_error with MPI_Error_string's text. The user's
// communicator is neither changed nor freed unless options::take_ownership asks for it.
// One exception: OpenMPI 4.1 raises the error of a nonblocking collective that MPI_Wait or
// MPI_Test completes (all_reduce, all_gather, the call check) on MPI_COMM_WORLD's error handler,
// not on the duplicate's. That handler is the program's, fatal by default (the job aborts); loco
// does not change it: a program that wants comm_error there sets MPI_ERRORS_RETURN on
// MPI_COMM_WORLD itself.
//
// Split-phase collectives are real nonblocking MPI operations; the reduce-scatter's sum and the
// issue of the all-gather happen in finish(), or earlier when a later call finds the reduce-scatter
// done. The all-gathers of all_reduce run on the second duplicate, issued in start order on every
// rank: finishing any request first completes every collective started before it, and a blocking
// collective first completes every pending one. MPI progresses a transfer only inside MPI calls
// (OpenMPI has no progress thread for collectives), so the overlap is as good as the MPI library's.
// The call check is nonblocking too, and the pending collectives keep moving while it waits: a
// peer may be blocked finishing a collective whose next stage this rank has yet to issue.
//
// The state lives in a `core` shared by the communicator and its requests, behind one mutex taken
// by every entry point (start_*, the blocking calls, finish, the destructor): a request may be
// finished on another thread than the one starting the next collective, and finished or dropped
// after its communicator is gone (the destructor completes it, or fails it after MPI_Finalize).
// Below MPI_THREAD_SERIALIZED, MPI may only be called from its main thread: construction,
// start_*, the blocking calls and finish() on another thread are refused (invalid_argument; a
// refused finish() leaves its request pending). The destructor and the drop of a pending request
// call MPI too but cannot refuse (they must not throw, nor return while MPI may still write the
// buffers): below SERIALIZED, the program must run them on MPI's main thread.

#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
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
        // Before each collective, one small MPI_Iallreduce compares what the ranks called (kind,
        // count, root, operation): ranks that disagree all throw the same comm_error and no data
        // moves, instead of MPI's undefined behaviour (truncation, garbage or a hang). It costs
        // one latency per collective; turn it off only for programs known to agree.
        bool check_calls = true;
        // The most elements one MPI call moves: floats for all_reduce, bytes for the others (per
        // block for all_to_all, per rank for all_gather). A larger collective is issued as
        // several calls over consecutive pieces, so loco's whole-model broadcasts and exchanges
        // work past MPI's int counts. INT_MAX by default; smaller values exercise the pieces in
        // tests. In [number of ranks, INT_MAX].
        std::size_t max_count = static_cast<std::size_t>(INT_MAX);
    };

    // Collective over `comm` (it duplicates it). Throws comm_error when MPI is not initialised or
    // already finalized, invalid_argument for MPI_COMM_NULL, an inter-communicator or (below
    // MPI_THREAD_SERIALIZED) a thread other than MPI's main thread, and comm_error when the size
    // differs from options::expected_size. A rank that refuses its options (expected_size,
    // take_ownership) throws after the ranks' agreement, and every other rank throws comm_error.
    explicit mpi(MPI_Comm comm) : mpi(comm, options{}) {}
    mpi(MPI_Comm comm, options opts) : user_(comm), take_ownership_(opts.take_ownership) {
        require_mpi_running("loco::comm::mpi: ");
        if (comm == MPI_COMM_NULL) {
            throw invalid_argument("loco::comm::mpi: the communicator is MPI_COMM_NULL; pass "
                                   "MPI_COMM_WORLD or a communicator this process belongs to");
        }
        core& c = *core_;
        // Before any MPI call that only MPI's main thread may make below SERIALIZED (these two,
        // like MPI_Initialized and MPI_Finalized, may run on any thread).
        check_setup(MPI_Query_thread(&c.thread_level), "MPI_Query_thread");
        c.require_thread("loco::comm::mpi: ", "constructed");
        int inter = 0;
        check_setup(MPI_Comm_test_inter(comm, &inter), "MPI_Comm_test_inter");
        if (inter != 0) {
            throw invalid_argument("loco::comm::mpi: an inter-communicator was given; loco's "
                                   "collectives need an intra-communicator (MPI_Intercomm_merge)");
        }
        c.check_calls = opts.check_calls;
        check_setup(MPI_Comm_rank(comm, &c.rank), "MPI_Comm_rank");
        check_setup(MPI_Comm_size(comm, &c.size), "MPI_Comm_size");
        // This rank's refusal of its own options waits for the agreement below: a rank that threw
        // here alone would leave the others waiting in MPI_Comm_dup for ever.
        std::exception_ptr refusal;
        if (opts.take_ownership && (comm == MPI_COMM_WORLD || comm == MPI_COMM_SELF)) {
            refusal = std::make_exception_ptr(
                invalid_argument("loco::comm::mpi: take_ownership of MPI_COMM_WORLD or "
                                 "MPI_COMM_SELF; they are MPI's and cannot be freed"));
        } else if (opts.expected_size < 0) {
            refusal = std::make_exception_ptr(
                invalid_argument("loco::comm::mpi: expected_size must be >= 0 (0 = any), got " +
                                 std::to_string(opts.expected_size)));
        } else if (opts.expected_size != 0 && opts.expected_size != c.size) {
            refusal = std::make_exception_ptr(comm_error(
                "loco::comm::mpi: expected " + std::to_string(opts.expected_size) +
                " ranks but the MPI communicator has " + std::to_string(c.size) +
                "; start the program with mpirun -np " + std::to_string(opts.expected_size) +
                " or pass the communicator of that group"));
        }
        check_setup(MPI_Comm_dup(comm, &c.data), "MPI_Comm_dup");
        if (const int rc = MPI_Comm_set_errhandler(c.data, MPI_ERRORS_RETURN); rc != MPI_SUCCESS) {
            MPI_Comm_free(&c.data);
            check_setup(rc, "MPI_Comm_set_errhandler");
        }
        agree_on_options(opts, refusal);
        if (const int rc = MPI_Comm_dup(c.data, &c.gather); rc != MPI_SUCCESS) {
            MPI_Comm_free(&c.data);
            check_setup(rc, "MPI_Comm_dup");
        }
    }

    mpi(const mpi&) = delete;
    mpi& operator=(const mpi&) = delete;

private:
    // max_count and check_calls decide which MPI calls a collective is issued as: ranks that
    // differ would issue different calls (truncation, an abort, or silently wrong data), so the
    // constructor agrees on them over the first duplicate (one MPI_Allreduce of each value and
    // its complement: every rank sees the minimum and maximum), then checks max_count's range,
    // the same on every rank. The same reduction carries whether a rank refused its own options
    // (`refusal`): that rank throws its error, the others say a peer refused. Frees the duplicate
    // when it throws.
    void agree_on_options(const options& opts, const std::exception_ptr& refusal) {
        core& c = *core_;
        const std::size_t max_count = opts.max_count;
        const std::uint64_t mine[2] = {static_cast<std::uint64_t>(max_count),
                                       opts.check_calls ? 1u : 0u};
        std::uint64_t v[5] = {mine[0], UINT64_MAX - mine[0], mine[1], UINT64_MAX - mine[1],
                              refusal ? 1u : 0u};
        if (const int rc = MPI_Allreduce(MPI_IN_PLACE, v, 5, MPI_UINT64_T, MPI_MAX, c.data);
            rc != MPI_SUCCESS) {
            MPI_Comm_free(&c.data);
            check_setup(rc, "MPI_Allreduce");
        }
        if (refusal) {
            MPI_Comm_free(&c.data);
            std::rethrow_exception(refusal);
        }
        if (v[4] != 0) {
            MPI_Comm_free(&c.data);
            throw comm_error("loco::comm::mpi: another rank refused its options at construction "
                             "(expected_size or take_ownership; its own error says which), so "
                             "this rank refuses too");
        }
        const std::uint64_t lo = UINT64_MAX - v[1], hi = v[0];
        if (lo != hi) {
            MPI_Comm_free(&c.data);
            throw comm_error("loco::comm::mpi: ranks disagree on options::max_count: from " +
                             std::to_string(lo) + " to " + std::to_string(hi) +
                             "; every rank must pass the same");
        }
        if (v[2] != UINT64_MAX - v[3]) {
            MPI_Comm_free(&c.data);
            throw comm_error("loco::comm::mpi: ranks disagree on options::check_calls: some "
                             "true, others false; every rank must pass the same");
        }
        if (max_count < static_cast<std::size_t>(c.size) ||
            max_count > static_cast<std::size_t>(INT_MAX)) {
            MPI_Comm_free(&c.data);
            throw invalid_argument("loco::comm::mpi: max_count must be in [number of ranks (" +
                                   std::to_string(c.size) + "), INT_MAX], got " +
                                   std::to_string(max_count));
        }
        c.max_count = max_count;
    }

public:

    // Completes what is still pending (errors stay with their requests, which may be finished or
    // dropped later), then frees the duplicates and, with take_ownership, the given communicator.
    // Collective when MPI frees communicators collectively. Once MPI_Finalize has run it does
    // nothing to MPI: the requests still pending throw comm_error from finish(). Below
    // MPI_THREAD_SERIALIZED it must run on MPI's main thread: it calls MPI and cannot refuse.
    ~mpi() override {
        core& c = *core_;
        const std::lock_guard<std::mutex> lock(c.mutex);
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (finalized != 0) {
            c.close("the communicator was destroyed before finish(), after MPI_Finalize, so the "
                    "collective never completed; finish every request before MPI_Finalize");
            return;
        }
        try {
            c.drain();
        } catch (...) {
            // Every pending operation keeps its own error; nothing more to report here.
        }
        c.close("the communicator was destroyed before finish() and could not complete the "
                "collective");
        MPI_Comm_free(&c.gather);
        MPI_Comm_free(&c.data);
        if (take_ownership_) {
            MPI_Comm_free(&user_);
        }
    }

    int rank() const noexcept override { return core_->rank; }
    int size() const noexcept override { return core_->size; }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return "mpi"; }
    std::uint64_t bytes_sent() const noexcept override { return core_->bytes_sent.load(); }

    // The communicator given at construction (loco uses duplicates of it).
    MPI_Comm handle() const noexcept { return user_; }

protected:
    // Each call checks with its peers first (agree) and moves no data when they disagree, not a
    // local throw that leaves the others waiting.
    std::unique_ptr<request::operation> do_start_all_reduce(tensor_view<float> data,
                                                            reduce_op op) override {
        const std::string where = prefix("all_reduce");
        core& c = *core_;
        const auto lock = c.enter(where);
        c.require_usable(where);
        c.agree(kind::all_reduce, data.size, 0, op, where);
        if (data.size > static_cast<std::size_t>(PTRDIFF_MAX) / sizeof(float)) {
            // No buffer is that large (the view is wrong); refused before a piece is allocated.
            // Every rank agreed on the count, so every rank throws here.
            throw invalid_argument(where + std::to_string(data.size) +
                                   " floats exceed the address space; the view is wrong");
        }
        c.progress();
        c.require_usable(where);
        std::vector<std::shared_ptr<pending>> parts;
        std::unique_ptr<operation> handle;
        try {
            parts = reduce_scatter_pieces(data, op, where);
            // Queued (as pending) and its handle made before MPI is called: nothing allocates
            // once a transfer may write into the pieces' buffers.
            handle = std::make_unique<operation>(core_, parts);
            for (const auto& p : parts) {
                c.queue.push_back(p);
            }
        } catch (const std::bad_alloc&) {
            c.out_of_memory(where, "all_reduce");
        }
        try {
            for (const auto& p : parts) {
                // MPI reads the count arrays until completion: they live in `p`, as long as the
                // request.
                c.call(MPI_Ialltoallv(p->data.data, p->counts.data(), p->displs.data(), MPI_FLOAT,
                                      p->scratch.data(), p->recv_counts.data(),
                                      p->recv_displs.data(), MPI_FLOAT, c.data, &p->req),
                       "MPI_Ialltoallv", where);
                p->step = stage::reduce_scatter;
            }
        } catch (...) {
            c.settle_issued(parts);
            throw;
        }
        return handle;
    }

    std::unique_ptr<request::operation> do_start_all_gather(tensor_view<const std::byte> send,
                                                            tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_gather");
        core& c = *core_;
        const auto lock = c.enter(where);
        c.require_usable(where);
        c.agree(kind::all_gather, send.size, 0, reduce_op::sum, where);
        c.progress();
        c.require_usable(where);
        // In place: this rank's send already sits in its slot of recv.
        const std::byte* own_slot = recv.data + static_cast<std::size_t>(c.rank) * send.size;
        const bool in_place = send.size != 0 && send.data == own_slot;
        // Piece i covers bytes [begin_i, begin_i + n_i) of every rank's slot. Everything is
        // allocated and queued before the first MPI call (as for all_reduce).
        std::vector<std::shared_ptr<pending>> parts;
        std::vector<std::size_t> sizes;
        std::unique_ptr<operation> handle;
        try {
            std::size_t begin = 0;
            do {
                const std::size_t n = std::min(c.max_count, send.size - begin);
                auto p = std::make_shared<pending>();
                p->what = kind::all_gather;
                p->where = where;
                p->bytes = static_cast<std::uint64_t>(c.size - 1) * n;
                parts.push_back(std::move(p));
                sizes.push_back(n);
                begin += n;
            } while (begin < send.size);
            handle = std::make_unique<operation>(core_, parts);
            for (const auto& p : parts) {
                c.queue.push_back(p);
            }
        } catch (const std::bad_alloc&) {
            c.out_of_memory(where, "all_gather");
        }
        try {
            std::size_t begin = 0;
            for (std::size_t i = 0; i < parts.size(); ++i) {
                pending& p = *parts[i];
                const int n = static_cast<int>(sizes[i]);
                const void* src =
                    in_place ? MPI_IN_PLACE : static_cast<const void*>(send.data + begin);
                if (parts.size() == 1) {
                    c.call(MPI_Iallgather(src, n, MPI_BYTE, recv.data, n, MPI_BYTE, c.data,
                                          &p.req),
                           "MPI_Iallgather", where);
                } else {
                    // Rank k's piece lands at k * send.size + begin: a piece-sized type whose
                    // extent is a whole slot. It lives until the piece completes.
                    datatype slot = c.piece_type(sizes[i], send.size, where);
                    c.call(MPI_Iallgather(src, n, MPI_BYTE, recv.data + begin, 1, slot.get(),
                                          c.data, &p.req),
                           "MPI_Iallgather", where);
                    p.type = slot.release();
                }
                p.step = stage::all_gather;
                begin += sizes[i];
            }
        } catch (...) {
            c.settle_issued(parts);
            throw;
        }
        return handle;
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_to_all");
        core& c = *core_;
        const auto lock = c.enter(where);
        c.require_usable(where);
        const std::size_t block = send.size / static_cast<std::size_t>(c.size);
        c.agree(kind::all_to_all, send.size, 0, reduce_op::sum, where);
        c.drain();
        c.require_usable(where);
        if (block <= c.max_count) {
            c.call(MPI_Alltoall(send.data, static_cast<int>(block), MPI_BYTE, recv.data,
                                static_cast<int>(block), MPI_BYTE, c.data),
                   "MPI_Alltoall", where);
        } else {
            // Piece [begin, begin + n) of every block: a piece-sized type whose extent is a block.
            for (std::size_t begin = 0; begin < block;) {
                const std::size_t n = std::min(c.max_count, block - begin);
                const datatype part = c.piece_type(n, block, where);
                c.call(MPI_Alltoall(send.data + begin, 1, part.get(), recv.data + begin, 1,
                                    part.get(), c.data),
                       "MPI_Alltoall", where);
                begin += n;
            }
        }
        c.bytes_sent += static_cast<std::uint64_t>(c.size - 1) * block;
    }

    void do_broadcast(tensor_view<std::byte> data, int root) override {
        const std::string where = prefix("broadcast");
        core& c = *core_;
        const auto lock = c.enter(where);
        c.require_usable(where);
        c.agree(kind::broadcast, data.size, root, reduce_op::sum, where);
        c.drain();
        c.require_usable(where);
        std::size_t begin = 0;
        do {
            const std::size_t n = std::min(c.max_count, data.size - begin);
            c.call(MPI_Bcast(data.data + begin, static_cast<int>(n), MPI_BYTE, root, c.data),
                   "MPI_Bcast", where);
            begin += n;
        } while (begin < data.size);
        if (c.rank == root) {
            c.bytes_sent += static_cast<std::uint64_t>(c.size - 1) * data.size;
        }
    }

    void do_barrier() override {
        const std::string where = prefix("barrier");
        core& c = *core_;
        const auto lock = c.enter(where);
        c.require_usable(where);
        c.drain();
        c.require_usable(where);
        if (c.check_calls) {
            c.agree(kind::barrier, 0, 0, reduce_op::sum, where);  // that all-reduce is a barrier
        } else {
            c.call(MPI_Barrier(c.data), "MPI_Barrier", where);
        }
    }

private:
    enum class kind : unsigned char { barrier, all_reduce, all_gather, all_to_all, broadcast };
    static constexpr int kinds = 5;
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
        // The reduce-scatter receives M copies of this rank's chunk here, in rank order; the
        // all-gather then lands here too, and in `data` when it completes: a request dropped
        // before then (release_through) leaves `data` to its owner at once.
        std::vector<float> scratch;
        bool released = false;       // dropped: the result is not copied into `data`
        bool in_scratch = true;      // the all-gather went to scratch (copied out at the end)
        std::vector<int> counts, displs;     // the chunks of the buffer, in floats
        std::vector<int> recv_counts, recv_displs;
        // all_gather's pieces of a slot over max_count bytes: their receive type, freed when done
        MPI_Datatype type = MPI_DATATYPE_NULL;
    };

    // An MPI datatype this communicator made, freed unless release()d.
    class datatype {
    public:
        explicit datatype(MPI_Datatype t) noexcept : t_(t) {}
        datatype(const datatype&) = delete;
        datatype& operator=(const datatype&) = delete;
        ~datatype() { free_type(t_); }
        MPI_Datatype get() const noexcept { return t_; }
        MPI_Datatype release() noexcept { return std::exchange(t_, MPI_DATATYPE_NULL); }

    private:
        MPI_Datatype t_;
    };

    // Frees a type unless MPI is finalized (then MPI has freed everything).
    static void free_type(MPI_Datatype& t) noexcept {
        if (t == MPI_DATATYPE_NULL) {
            return;
        }
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (finalized == 0) {
            MPI_Type_free(&t);
        }
        t = MPI_DATATYPE_NULL;
    }

    // do_start_all_reduce's allocations, after the agreement: one pending all-reduce per piece of
    // at most max_count floats, each a multiple of M floats but the last (so that the pieces'
    // chunks add up to the whole buffer's chunks, and the bytes to comm::threads').
    std::vector<std::shared_ptr<pending>> reduce_scatter_pieces(tensor_view<float> data,
                                                                reduce_op op,
                                                                const std::string& where) const {
        const core& c = *core_;
        const auto m = static_cast<std::size_t>(c.size);
        const std::size_t piece = c.max_count / m * m;
        std::vector<std::shared_ptr<pending>> parts;
        std::size_t begin = 0;
        do {
            const std::size_t n = std::min(piece, data.size - begin);
            auto p = std::make_shared<pending>();
            p->what = kind::all_reduce;
            p->where = where;
            p->data = tensor_view<float>{data.data + begin, n};
            p->op = op;
            p->counts.resize(m);
            p->displs.resize(m);
            for (std::size_t k = 0; k < m; ++k) {
                p->displs[k] = static_cast<int>(chunk_begin(n, k));
                p->counts[k] = static_cast<int>(chunk_begin(n, k + 1) - chunk_begin(n, k));
            }
            // Rank r receives its own chunk from every rank: M blocks of c_r floats, in rank order.
            const int own = p->counts[static_cast<std::size_t>(c.rank)];
            // One buffer for both stages, allocated here so that nothing is allocated between them
            // (a failure there would leave this rank's all-gather unissued while its peers issue
            // theirs): the reduce-scatter's M blocks, then the all-gather's result.
            p->scratch.resize(std::max(m * static_cast<std::size_t>(own), n));
            p->recv_counts.assign(m, own);
            p->recv_displs.resize(m);
            for (std::size_t k = 0; k < m; ++k) {
                p->recv_displs[k] = static_cast<int>(k) * own;
            }
            p->bytes = sizeof(float) * (n - static_cast<std::size_t>(own));
            parts.push_back(std::move(p));
            begin += n;
        } while (begin < data.size);
        return parts;
    }

    // What the communicator and its requests share: the MPI side of every call, behind one mutex.
    // A request holds it, so it outlives the communicator; once `closed`, nothing touches MPI.
    struct core {
        std::mutex mutex;  // every entry point holds it, so one thread at a time drives MPI here
        MPI_Comm data = MPI_COMM_NULL;    // every collective but all_reduce's all-gather
        MPI_Comm gather = MPI_COMM_NULL;  // all_reduce's all-gathers, issued in start order
        bool check_calls = true;
        std::size_t max_count = static_cast<std::size_t>(INT_MAX);  // elements per MPI call
        int rank = 0;
        int size = 1;
        int thread_level = MPI_THREAD_SINGLE;  // what MPI provides (MPI_Query_thread)
        bool closed = false;  // the communicator is gone: every pending collective is done
        std::atomic<std::uint64_t> bytes_sent{0};  // read by bytes_sent() without the mutex
        std::string broken;  // the first MPI error; after it this communicator refuses calls
        std::deque<std::shared_ptr<pending>> queue;  // started, not yet completed, in start order

        // `bytes` contiguous bytes with an extent of `stride`: one piece of each slot (all_gather)
        // or block (all_to_all), the slots `stride` bytes apart.
        datatype piece_type(std::size_t bytes, std::size_t stride, const std::string& where) {
            MPI_Datatype run = MPI_DATATYPE_NULL;
            call(MPI_Type_contiguous(static_cast<int>(bytes), MPI_BYTE, &run),
                 "MPI_Type_contiguous", where);
            datatype contiguous(run);
            MPI_Datatype spaced = MPI_DATATYPE_NULL;
            call(MPI_Type_create_resized(contiguous.get(), 0, static_cast<MPI_Aint>(stride), &spaced),
                 "MPI_Type_create_resized", where);
            datatype result(spaced);
            call(MPI_Type_commit(&spaced), "MPI_Type_commit", where);
            return datatype(result.release());
        }

        // An entry point: takes the mutex, then checks that MPI runs and may be called here.
        std::unique_lock<std::mutex> enter(const std::string& where) {
            std::unique_lock<std::mutex> lock(mutex);
            require_mpi_running(where);
            require_thread(where, "called");
            return lock;
        }

        // Below MPI_THREAD_SERIALIZED only MPI's main thread may call MPI (the mutex would keep
        // loco's calls apart, but not the MPI library's own state nor the program's other calls).
        void require_thread(const std::string& where, const char* what) const {
            if (thread_level >= MPI_THREAD_SERIALIZED) {
                return;
            }
            int is_main = 0;
            MPI_Is_thread_main(&is_main);
            if (is_main == 0) {
                throw invalid_argument(where + what + " on a thread other than MPI's main thread, "
                                       "but MPI provides only " + level_name(thread_level) +
                                       "; initialise MPI with MPI_Init_thread and "
                                       "MPI_THREAD_SERIALIZED to use loco from several threads");
            }
        }

        // request::finish asks before it gives the operation up: a refusal here touches nothing,
        // so the request stays pending and may be finished on the main thread.
        void check_finish(const pending& p) {
            const std::lock_guard<std::mutex> lock(mutex);
            int finalized = 0;
            MPI_Finalized(&finalized);
            if (!closed && finalized == 0) {
                require_thread(p.where, "finish()");
            }
        }

        // request::finish (`checked`) or the drop of an unfinished request: its pieces, in order.
        void finish(const std::vector<std::shared_ptr<pending>>& parts, bool checked) {
            const std::lock_guard<std::mutex> lock(mutex);
            if (!closed) {
                int finalized = 0;
                MPI_Finalized(&finalized);
                if (checked && finalized == 0) {
                    // Before looking at the pieces: whether they are done yet depends on timing.
                    require_thread(parts.front()->where, "finish()");
                }
                for (const auto& p : parts) {
                    if (p->step != stage::done) {
                        require_mpi_running(p->where);
                        if (checked) {
                            complete_through(p);
                        } else {
                            release_through(p);
                        }
                    }
                }
            }
            for (const auto& p : parts) {
                if (p->error) {
                    std::rethrow_exception(p->error);
                }
            }
        }

        // The communicator is going away: a collective still pending fails with `reason` (the
        // destructor drained them first, unless MPI was already finalized).
        void close(const char* reason) {
            for (const auto& p : queue) {
                if (p->step != stage::done) {
                    p->error = std::make_exception_ptr(comm_error(p->where + reason));
                    p->step = stage::done;
                }
                free_type(p->type);
            }
            queue.clear();
            closed = true;
        }

        // An allocation failed after the agreement: the peers went on into the collective, and
        // this rank's calls would now pair with the wrong ones, so the communicator refuses them
        // all.
        [[noreturn]] void out_of_memory(const std::string& where, const char* collective) {
            broken = where + "out of memory for the " + collective + "'s buffers";
            throw comm_error(where + "out of memory for the " + collective + "'s buffers; the "
                             "peers started it, so this communicator refuses every later call: "
                             "end the job and restart it from a checkpoint");
        }

        // A start whose k-th MPI call failed (call() marked the communicator broken): its pieces
        // issued before still move the caller's buffers. Waits for each (its error is not this
        // call's) and marks every piece done, so that once the start has thrown nothing touches
        // the buffers; the pieces leave the queue with the next call.
        void settle_issued(const std::vector<std::shared_ptr<pending>>& parts) noexcept {
            for (const auto& p : parts) {
                if (p->step != stage::done) {
                    MPI_Wait(&p->req, MPI_STATUS_IGNORE);
                }
                p->step = stage::done;
                p->released = true;
                std::vector<float>().swap(p->scratch);
                free_type(p->type);
            }
        }

        // An MPI call of a collective: a failure leaves the ranks' views of what was exchanged
        // unknown, so this communicator refuses every later call.
        void call(int rc, const char* fn, const std::string& where) {
            if (rc == MPI_SUCCESS) {
                return;
            }
            const std::string message = where + fn + " failed: " + mpi_error_text(rc);
            if (broken.empty()) {
                broken = message;
            }
            throw comm_error(message);
        }

        void require_usable(const std::string& where) const {
            require_mpi_running(where);
            if (!broken.empty()) {
                throw comm_error(where + "an earlier MPI error left this communicator unusable (" +
                                 broken + "); the ranks may disagree on what was exchanged, so "
                                 "end the job (MPI_Abort) and restart it from a checkpoint");
            }
        }

        // One MPI_Iallreduce (max) of the call's fields, their complements (UINT64_MAX - x) and
        // one flag per kind gives every rank the minimum and maximum of each field and every kind
        // called; where they differ, every rank throws the same comm_error before any data moves.
        // Unsigned, so that every count a size_t holds compares exactly: a signed negation
        // overflowed at 2^63 and missed the disagreement. The pending collectives keep moving
        // while it waits: a peer may be blocked in finish() on one whose all-gather this rank
        // issues only once its reduce-scatter is done.
        void agree(kind what, std::size_t count, int root, reduce_op op, const std::string& where) {
            if (!check_calls) {
                return;
            }
            static_assert(sizeof(std::size_t) <= sizeof(std::uint64_t));
            constexpr std::uint64_t all = UINT64_MAX;
            // root is in [0, size) here: the base class checked it.
            const std::uint64_t mine[3] = {static_cast<std::uint64_t>(count),
                                           static_cast<std::uint64_t>(root),
                                           static_cast<std::uint64_t>(op)};
            std::uint64_t v[6 + kinds] = {};
            for (int i = 0; i < 3; ++i) {
                v[i] = mine[i];
                v[3 + i] = all - mine[i];
            }
            v[6 + static_cast<int>(what)] = 1;
            MPI_Request check = MPI_REQUEST_NULL;
            call(MPI_Iallreduce(MPI_IN_PLACE, v, 6 + kinds, MPI_UINT64_T, MPI_MAX, data, &check),
                 "MPI_Iallreduce", where);
            if (queue.empty()) {
                call(MPI_Wait(&check, MPI_STATUS_IGNORE), "MPI_Iallreduce", where);
            } else {
                for (int done = 0; done == 0;) {
                    progress();
                    call(MPI_Test(&check, &done, MPI_STATUS_IGNORE), "MPI_Iallreduce", where);
                }
            }
            const auto lo = [&](int i) { return all - v[3 + i]; };
            const auto hi = [&](int i) { return v[i]; };
            // Nothing is allocated unless the ranks disagree: every rank then throws, while an
            // allocation failing on one rank alone would leave it behind its peers.
            constexpr const char* rule = "; every rank must call the same collectives in the "
                                         "same order with the same sizes (no data moved)";
            int kinds_called = 0;
            for (int k = 0; k < kinds; ++k) {
                kinds_called += v[6 + k] != 0 ? 1 : 0;
            }
            if (kinds_called > 1) {
                // "some called barrier, some all_gather, others broadcast"
                std::vector<std::string_view> called;
                for (int k = 0; k < kinds; ++k) {
                    if (v[6 + k] != 0) {
                        called.push_back(kind_name(static_cast<kind>(k)));
                    }
                }
                std::string list = "some called " + std::string(called.front());
                for (std::size_t i = 1; i + 1 < called.size(); ++i) {
                    list += ", some " + std::string(called[i]);
                }
                list += ", others " + std::string(called.back());
                throw comm_error(where + "ranks disagree on the collective: " + list + rule);
            }
            if (lo(0) != hi(0)) {
                const char* unit = what == kind::all_reduce ? " floats" : " bytes";
                throw comm_error(where + "ranks disagree on the size: from " +
                                 std::to_string(lo(0)) + unit + " to " + std::to_string(hi(0)) +
                                 unit + rule);
            }
            if (lo(1) != hi(1)) {
                throw comm_error(where + "ranks disagree on the root: from rank " +
                                 std::to_string(lo(1)) + " to rank " + std::to_string(hi(1)) +
                                 rule);
            }
            if (lo(2) != hi(2)) {
                throw comm_error(where + "ranks disagree on the reduce operation: some sum, "
                                         "others take the mean" + rule);
            }
        }

        // Moves `p` on when its stage is complete: waits for it when `block`, else only tests.
        // Returns true when p is done (with or without an error). `gather_too` false: stops
        // once all_reduce's all-gather is issued (release_through). `in_place`: the all-gather
        // may go straight into the caller's buffer, because p is waited for to the end now
        // (complete_through, drain); one issued on the way (progress, release_through) goes to
        // scratch and is copied out when it completes, so that a drop never waits for it.
        bool advance(pending& p, bool block, bool gather_too = true, bool in_place = false) {
            try {
                if (p.step == stage::reduce_scatter) {
                    if (!complete(p, block, "MPI_Ialltoallv")) {
                        return false;
                    }
                    if (!broken.empty()) {
                        throw comm_error(p.where + "not completed: an earlier MPI error left this "
                                                   "communicator unusable (" + broken + ")");
                    }
                    p.in_scratch = !(in_place && !p.released);
                    float* target = p.in_scratch ? p.scratch.data() : p.data.data;
                    reduce_own_chunk(p, target);
                    call(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, target, p.counts.data(),
                                         p.displs.data(), MPI_FLOAT, gather, &p.req),
                         "MPI_Iallgatherv", p.where);
                    p.step = stage::all_gather;
                    const auto own = static_cast<std::uint64_t>(p.counts[static_cast<std::size_t>(rank)]);
                    p.bytes = sizeof(float) * static_cast<std::uint64_t>(size - 1) * own;
                    if (!gather_too) {
                        return false;
                    }
                }
                if (p.step == stage::all_gather) {
                    if (!complete(p, block, p.what == kind::all_reduce ? "MPI_Iallgatherv"
                                                                        : "MPI_Iallgather")) {
                        return false;
                    }
                    if (p.what == kind::all_reduce && p.in_scratch && !p.released) {
                        std::copy_n(p.scratch.data(), p.data.size, p.data.data);
                    }
                    p.step = stage::done;
                    p.scratch = {};
                    free_type(p.type);
                }
            } catch (...) {
                p.error = std::current_exception();
                p.step = stage::done;
                p.scratch = {};
                free_type(p.type);
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
                bytes_sent += p.bytes;
            }
            return done != 0;
        }

        // The reduce-scatter's sum: rank r's chunk over ranks 0..M-1 in that order, as
        // comm::threads sums it, then divided by M for the mean; written at the chunk's place in
        // `target` (scratch or the caller's buffer), where the all-gather sends it from.
        void reduce_own_chunk(pending& p, float* target) const {
            const auto m = static_cast<std::size_t>(size);
            const auto r = static_cast<std::size_t>(rank);
            const auto c = static_cast<std::size_t>(p.counts[r]);
            // Summed in place over block 0 (rank 0's copy), then moved to its place.
            float* out = p.scratch.data();
            const float* in = p.scratch.data();
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
            float* place = target + p.displs[r];
            if (place != out && c != 0) {
                std::memmove(place, out, c * sizeof(float));  // may overlap within scratch
            }
        }

        // Opportunistic progress: moves the pending collectives on as far as their transfers
        // allow, in start order, so all_reduce's all-gather is issued without waiting for
        // finish(). Issues nothing out of order: it stops at the first reduce-scatter in flight.
        void progress() {
            for (auto& p : queue) {
                if (p->step == stage::reduce_scatter) {
                    if (!advance(*p, false)) {
                        break;
                    }
                } else if (p->step == stage::all_gather) {
                    advance(*p, false);
                }
            }
            while (!queue.empty() && queue.front()->step == stage::done) {
                queue.pop_front();
            }
        }

        // Completes every collective started before `p`, then `p` (start order).
        void complete_through(const std::shared_ptr<pending>& p) {
            if (std::find(queue.begin(), queue.end(), p) == queue.end()) {
                return;  // already completed, with every collective before it
            }
            while (!queue.empty()) {
                const auto front = queue.front();
                advance(*front, true, true, true);
                queue.pop_front();
                if (front == p) {
                    return;
                }
            }
        }

        // A dropped request (abandon()): returns once MPI no longer touches the caller's buffers,
        // without waiting for what needs the peers' later calls. Every collective before `p` and
        // p itself gets its reduce-scatter completed (every peer issued it when it started) and
        // its all-gather issued; an all_reduce's all-gather writes into memory of the request's
        // own (`scratch`), so it need not complete now. Waiting for it, as finish() does, needs
        // every peer's next loco call on this communicator, which a departure or regroup never
        // makes: every rank waited in its own drop. The released collectives complete in later
        // calls, or when the communicator is destroyed. The one-stage collectives (all_gather,
        // all_to_all, broadcast) write the caller's buffers and were issued by every rank at its
        // start: a dropped one is waited for.
        void release_through(const std::shared_ptr<pending>& p) {
            if (std::find(queue.begin(), queue.end(), p) == queue.end()) {
                return;  // already completed
            }
            for (const auto& q : queue) {
                if (q->step == stage::reduce_scatter) {
                    advance(*q, true, false);
                }
                if (q == p) {
                    q->released = true;
                    if (q->what != kind::all_reduce && q->step != stage::done) {
                        advance(*q, true);
                    }
                    break;
                }
            }
            while (!queue.empty() && queue.front()->step == stage::done) {
                queue.pop_front();
            }
        }

        // Completes every pending collective; their errors stay with their requests.
        void drain() {
            while (!queue.empty()) {
                advance(*queue.front(), true, true, true);
                queue.pop_front();
            }
        }
    };

    class operation final : public request::operation {
    public:
        operation(std::shared_ptr<core> c, std::vector<std::shared_ptr<pending>> parts) noexcept
            : core_(std::move(c)), parts_(std::move(parts)) {}
        void check_finish() override { core_->check_finish(*parts_.front()); }
        void wait() override { core_->finish(parts_, true); }
        // A dropped request must not return while MPI may still write its buffers, and the
        // request's destructor cannot throw: no thread check here. Below MPI_THREAD_SERIALIZED
        // the program must drop requests on MPI's main thread (see the top of this file).
        void abandon() override { core_->finish(parts_, false); }

    private:
        std::shared_ptr<core> core_;
        std::vector<std::shared_ptr<pending>> parts_;  // the pieces, in start order (never empty)
    };

    // Rank k's chunk of n elements starts here, as in comm::threads.
    std::size_t chunk_begin(std::size_t n, std::size_t k) const noexcept {
        return n * k / static_cast<std::size_t>(core_->size);
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

    static std::string_view kind_name(kind k) noexcept {
        switch (k) {
            case kind::barrier: return "barrier";
            case kind::all_reduce: return "all_reduce";
            case kind::all_gather: return "all_gather";
            case kind::all_to_all: return "all_to_all";
            case kind::broadcast: return "broadcast";
        }
        return "?";
    }

    static std::string level_name(int level) {
        switch (level) {
            case MPI_THREAD_SINGLE: return "MPI_THREAD_SINGLE";
            case MPI_THREAD_FUNNELED: return "MPI_THREAD_FUNNELED";
            default: return "thread level " + std::to_string(level);
        }
    }

    MPI_Comm user_;
    bool take_ownership_;
    std::shared_ptr<core> core_ = std::make_shared<core>();
};

}  // namespace loco::comm
