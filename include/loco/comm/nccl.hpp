#pragma once
// loco::comm::nccl: the communicator interface over NCCL, for device buffers (space() == cuda).
//
// Streams. The communicator runs its collectives on a CUDA stream of its own, so they can overlap
// compute running on other streams. It is ordered after the work already enqueued on the caller's
// stream (set_caller_stream; the legacy default stream when none is set) through an event, and the
// caller's stream is made to wait for the collective the same way, so stream-ordered consumers of
// the result need no host synchronisation.
//
// Split-phase. start_all_reduce / start_all_gather enqueue the collective on the communicator's
// stream after an event recorded on the caller's stream, record an event after it, and return:
// the caller's stream is not made to wait yet, so the compute the caller enqueues next runs
// beside the transfer. finish() makes the caller's stream wait on that event (and, with
// nccl_options::wait, the host too, under the timeout). Nothing between start and finish
// synchronises the host with the device. The blocking collectives are start + finish.
//
// Completion and timeouts. By default (nccl_options::wait) a collective returns (a request
// finishes) once it has completed, as the interface promises; with wait = false it returns once
// enqueued and synchronize() waits. Every wait polls the communicator's asynchronous error state
// and a deadline: an NCCL error, or a peer that does not arrive within nccl_options::timeout,
// aborts the communicator (ncclCommAbort) and throws loco::comm_error; it is never a silent hang.
// Every later call, and the finish() of every request still in flight, throws comm_error too.
// The deadline bounds only comm::nccl's own waits, though: with wait = false a collective returns
// before it completes, and any other host wait for a stream ordered after it (a
// cudaStreamSynchronize or blocking cudaMemcpy on the caller stream, cuda_staging's copies) has
// no deadline and hangs for good when a peer is lost. Where a lost peer must be survivable, keep
// wait = true, or call synchronize() before such a wait.
// Communicators made by create()/bootstrap are nonblocking, so even the NCCL calls themselves
// never block; a communicator handed in from outside should be created nonblocking as well for the
// same guarantee.
//
// Agreement. With nccl_options::check_calls (the default), every collective first all-gathers a
// 32-byte descriptor of the call (its kind, byte or element count, root, op and a sequence number)
// and compares them on every rank: ranks that disagree (another collective, another size, a
// skipped call) all throw the same comm_error before any payload moves, like comm::threads (from
// start_*, for a split-phase call). The descriptor exchange costs one small all-gather and a host
// synchronisation per collective, at its start; it waits for the collectives started before it
// but not for the caller's stream, so it does not wait for the caller's compute.
//
// Bytes. bytes_sent() counts the payload a rank puts on the wire under the ring algorithms, with
// the formulas comm::threads uses, so that the counts of the two communicators agree:
//   all_reduce  4 (n + (M-2) c_r) bytes, c_r = floor(n (r+1)/M) - floor(n r/M) the rank's chunk:
//               the ring's reduce-scatter sends (M-1) chunks and its all-gather (M-1) chunks,
//               2 (M-1)/M x 4n when M divides n;
//   all_gather  (M-1) x bytes;   all_to_all (M-1) x block bytes (the self block is a local copy);
//   broadcast   (M-1) x bytes from the root, 0 from the others (the whole tree's volume, counted
//               at its source);
//   barrier     0.
// NCCL may pick another algorithm (tree, NVLS, CollNet) whose per-rank volume differs; the count
// is the ring's, the bandwidth-optimal volume that nccl-tests' "bus bandwidth" also assumes. The
// descriptors of check_calls are not in bytes_sent but in control_bytes_sent(), (M-1) x 32 bytes
// per collective, plus (M-1) x 32 bytes once at construction (the ranks' agreement on
// check_calls, made whatever its value).
//
// Mean. all_reduce(mean) is an NCCL sum followed by a division by M on the device, the formula of
// comm::threads (ncclAvg would pre-multiply by 1/M, which rounds differently).

#include <loco/backend/cuda/collectives.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(LOCO_WITH_MPI)
#include <mpi.h>
#endif

namespace loco::comm {

struct nccl_options {
    std::chrono::milliseconds timeout{std::chrono::minutes(5)};
    // All-gather a descriptor of every call first and refuse calls the ranks disagree on. The
    // same on every rank: it adds an NCCL collective to each call, so ranks that differ would
    // pair the wrong collectives; the constructor compares it across the ranks and every rank
    // refuses a communicator whose ranks differ.
    bool check_calls = true;
    // Return from a collective only once it has completed (false: once enqueued).
    bool wait = true;
};

namespace detail {

inline std::string nccl_message(ncclResult_t r, ncclComm_t comm) {
    std::string s = ncclGetErrorString(r);
    // NCCL's last error message for this communicator (or the thread's, without one).
    const char* last = ncclGetLastError(comm);
    if (last && *last) {
        s += " (";
        s += last;
        s += ")";
    }
    return s;
}

// The id of a new clique, as rank 0 makes it for the file bootstrap (nccl_bootstrap_mpi
// broadcasts a failure to its peers instead of throwing alone).
inline ncclUniqueId new_unique_id() {
    ncclUniqueId id{};
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) {
        throw comm_error("loco::comm::nccl: ncclGetUniqueId failed: " + nccl_message(r, nullptr));
    }
    return id;
}

// Waits while a nonblocking communicator reports ncclInProgress. Returns the final state, or
// ncclInProgress when the deadline passed first.
inline ncclResult_t nccl_settle(ncclComm_t comm, std::chrono::steady_clock::time_point deadline) {
    ncclResult_t state = ncclInProgress;
    auto pause = std::chrono::microseconds(10);
    for (;;) {
        if (ncclCommGetAsyncError(comm, &state) != ncclSuccess) {
            return ncclInternalError;
        }
        if (state != ncclInProgress || std::chrono::steady_clock::now() > deadline) {
            return state;
        }
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
}

}  // namespace detail

class nccl final : public split_phase_communicator {
public:
    // Wraps an existing communicator, which stays the caller's (it is not destroyed here, but it
    // is aborted, which frees it, on a timeout or NCCL error, the destructor's wait included: see
    // ~nccl). The current device must be the communicator's. Collective over more than one
    // rank: the ranks compare their check_calls (every rank throws comm_error when they differ),
    // so every rank constructs its wrapper at the same point, each on its own thread or process.
    // When it throws comm_error it has aborted (freed) the communicator; after invalid_argument,
    // a CUDA error or bad_alloc the communicator is still the caller's.
    explicit nccl(ncclComm_t comm, cudaStream_t caller_stream = nullptr, nccl_options options = {})
        : nccl(comm, caller_stream, options, false) {}

    // Creates (and owns) a nonblocking communicator for rank `rank` of `nranks` on the current
    // GPU. Every rank calls it with the same id (see nccl_unique_id_via_file and
    // nccl_bootstrap_file). Throws comm_error when the peers do not join within the timeout.
    static std::unique_ptr<nccl> create(int nranks, int rank, const ncclUniqueId& id,
                                        cudaStream_t caller_stream = nullptr,
                                        nccl_options options = {}) {
        if (nranks < 1 || rank < 0 || rank >= nranks) {
            throw invalid_argument("loco::comm::nccl: rank " + std::to_string(rank) + " of " +
                                   std::to_string(nranks) + " ranks");
        }
        if (options.timeout.count() <= 0) {
            throw invalid_argument("loco::comm::nccl: timeout must be positive");
        }
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0;
        ncclComm_t comm = nullptr;
        const std::string who = "loco::comm::nccl rank " + std::to_string(rank) + ": ";
        const ncclResult_t started = ncclCommInitRankConfig(&comm, nranks, id, rank, &config);
        if (started != ncclSuccess && started != ncclInProgress) {
            const std::string msg = detail::nccl_message(started, comm);
            if (comm) {
                static_cast<void>(ncclCommAbort(comm));
            }
            throw comm_error(who + "ncclCommInitRankConfig failed: " + msg);
        }
        const ncclResult_t state =
            detail::nccl_settle(comm, detail::deadline_after(options.timeout));
        if (state != ncclSuccess) {
            const std::string why = state == ncclInProgress
                                        ? "the peers did not join within " +
                                              std::to_string(options.timeout.count()) + " ms"
                                        : detail::nccl_message(state, comm);
            static_cast<void>(ncclCommAbort(comm));
            throw comm_error(who + "creating the communicator failed: " + why);
        }
        // A constructor that throws has aborted the communicator it owns (once: it may have
        // been aborted inside, where a wait timed out).
        return std::unique_ptr<nccl>(new nccl(comm, caller_stream, options, true));
    }

    // Settles every collective still in flight, owned communicator or wrapped: it waits for the
    // communicator's stream under the timeout and aborts the communicator when that passes or
    // NCCL reports an error (never throws). So the requests that outlive it have nothing left
    // to wait for (in_flight), and a lost peer ends in an abort at the timeout, not in a hang of
    // the next wait for the device (cudaFree of the members' buffers, right after, is one).
    // Then an owned communicator is finalized and destroyed; a wrapped one stays the caller's,
    // unless it was aborted here, which frees it (call synchronize() first to learn of that as a
    // comm_error, and check aborted()).
    ~nccl() override {
        *alive_ = false;  // requests still held no longer touch this object
        if (aborted_) {
            return;  // already released by ncclCommAbort
        }
        const int previous = current_device_or(device_);
        static_cast<void>(cudaSetDevice(device_));
        settle_stream();
        if (owned_ && !aborted_) {
            // Finalize flushes NCCL's own outstanding work; bounded by the timeout too.
            ncclResult_t r = ncclCommFinalize(comm_);
            if (r == ncclInProgress || r == ncclSuccess) {
                r = detail::nccl_settle(comm_, deadline());
            }
            static_cast<void>(r == ncclSuccess ? ncclCommDestroy(comm_) : ncclCommAbort(comm_));
        }
        static_cast<void>(cudaSetDevice(previous));
    }
    nccl(const nccl&) = delete;
    nccl& operator=(const nccl&) = delete;

    int rank() const noexcept override { return rank_; }
    int size() const noexcept override { return size_; }
    loco::memory_space space() const noexcept override { return loco::memory_space::cuda; }
    std::string_view name() const noexcept override { return "nccl"; }
    std::uint64_t bytes_sent() const noexcept override { return sent_; }
    // The descriptors exchanged by check_calls.
    std::uint64_t control_bytes_sent() const noexcept { return control_sent_; }

    ncclComm_t get() const noexcept { return comm_; }
    int device() const noexcept { return device_; }
    // The communicator's own stream, where its collectives run.
    cudaStream_t stream() const noexcept { return stream_->get(); }
    cudaStream_t caller_stream() const noexcept { return caller_; }
    // Collectives are ordered after the work enqueued on `s` before them, and `s` waits for them.
    void set_caller_stream(cudaStream_t s) noexcept { caller_ = s; }
    const nccl_options& options() const noexcept { return options_; }
    bool aborted() const noexcept { return aborted_; }

    // Waits for every collective enqueued so far (useful with nccl_options::wait = false), under
    // the timeout. Throws comm_error (and aborts) as a collective would.
    void synchronize() {
        const std::string where = prefix("synchronize");
        ensure_usable(where);
        backend::cuda::device_guard on(device_);
        done_.record(stream_->get());
        wait_for(done_.get(), where);
    }

    // Aborts the communicator: pending collectives end, and every later call throws comm_error.
    void abort(const std::string& reason) {
        if (!aborted_) {
            static_cast<void>(ncclCommAbort(comm_));
            aborted_ = true;
            abort_reason_ = reason;
        }
    }

protected:
    std::unique_ptr<request::operation> do_start_all_reduce(tensor_view<float> data,
                                                            reduce_op op) override {
        const std::string where = prefix("all_reduce");
        const std::size_t n = data.size;
        // The request's operation and its event first: once enqueued, the collective runs with
        // its peers whatever happens here, so nothing may throw after it (comm::threads too).
        auto started = std::make_unique<in_flight>(*this, take_event(), where);
        const call c{kind::all_reduce, op == reduce_op::mean ? 1u : 0u, n, 0};
        enqueue(c, where, started->event(), [&] {
            if (n != 0) {
                check_nccl(ncclAllReduce(data.data, data.data, n, ncclFloat32, ncclSum, comm_,
                                         stream_->get()),
                           where, "ncclAllReduce");
            }
            if (op == reduce_op::mean && size_ > 1) {
                backend::cuda::divide(data.data, n, static_cast<float>(size_), stream_->get());
            }
        });
        const std::size_t m = static_cast<std::size_t>(size_);
        const std::size_t r = static_cast<std::size_t>(rank_);
        if (m > 1) {
            const std::size_t chunk = n * (r + 1) / m - n * r / m;
            sent_ += 4 * (n + (m - 2) * chunk);
        }
        return started;
    }

    std::unique_ptr<request::operation> do_start_all_gather(
        tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_gather");
        auto started = std::make_unique<in_flight>(*this, take_event(), where);  // as all_reduce
        enqueue({kind::all_gather, 0, send.size, 0}, where, started->event(), [&] {
            if (send.size != 0) {
                check_nccl(ncclAllGather(send.data, recv.data, send.size, ncclUint8, comm_,
                                         stream_->get()),
                           where, "ncclAllGather");
            }
        });
        sent_ += static_cast<std::uint64_t>(size_ - 1) * send.size;
        return started;
    }

    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        const std::string where = prefix("all_to_all");
        const std::size_t block = send.size / static_cast<std::size_t>(size_);
        run({kind::all_to_all, 0, send.size, 0}, where, false, [&] {
            if (block == 0) {
                return;
            }
            const std::size_t self = static_cast<std::size_t>(rank_) * block;
            LOCO_CUDA_CHECK(cudaMemcpyAsync(recv.data + self, send.data + self, block,
                                            cudaMemcpyDeviceToDevice, stream_->get()));
            if (size_ == 1) {
                return;
            }
            // An NCCL group belongs to the thread, not to the communicator: one left open by an
            // error would make every later NCCL call of this thread, on any communicator (the
            // survivors' new one too), only join the group, never run. So once it is started it
            // is ended, whatever happens, before the communicator is aborted and comm_error
            // thrown.
            check_nccl(ncclGroupStart(), where, "ncclGroupStart");
            struct group {
                bool open = true;
                ncclResult_t end() {
                    open = false;
                    return ncclGroupEnd();
                }
                ~group() {
                    if (open) {
                        static_cast<void>(ncclGroupEnd());
                    }
                }
            } grouped;
            std::string failure;
            for (int k = 0; k < size_ && failure.empty(); ++k) {
                if (k == rank_) {
                    continue;
                }
                const std::size_t at = static_cast<std::size_t>(k) * block;
                failure = nccl_failure(
                    ncclSend(send.data + at, block, ncclUint8, k, comm_, stream_->get()),
                    "ncclSend");
                if (failure.empty()) {
                    failure = nccl_failure(
                        ncclRecv(recv.data + at, block, ncclUint8, k, comm_, stream_->get()),
                        "ncclRecv");
                }
            }
            const ncclResult_t ended = grouped.end();
            if (!failure.empty()) {
                fail(where, failure);  // the first failure, not ncclGroupEnd's echo of it
            }
            check_nccl(ended, where, "ncclGroupEnd");
        });
        sent_ += static_cast<std::uint64_t>(size_ - 1) * block;
    }

    void do_broadcast(tensor_view<std::byte> data, int root) override {
        const std::string where = prefix("broadcast");
        run({kind::broadcast, 0, data.size, root}, where, false, [&] {
            if (data.size != 0) {
                check_nccl(ncclBroadcast(data.data, data.data, data.size, ncclUint8, root, comm_,
                                         stream_->get()),
                           where, "ncclBroadcast");
            }
        });
        if (rank_ == root) {
            sent_ += static_cast<std::uint64_t>(size_ - 1) * data.size;
        }
    }

    void do_barrier() override {
        const std::string where = prefix("barrier");
        // The descriptor all-gather is itself a barrier; without check_calls a one-float
        // all-reduce stands in for it. Either way the host waits, whatever nccl_options::wait.
        run({kind::barrier, 0, 0, 0}, where, true, [&] {
            if (!options_.check_calls) {
                check_nccl(ncclAllReduce(scratch_.get(), scratch_.get(), 1, ncclFloat32, ncclSum,
                                         comm_, stream_->get()),
                           where, "ncclAllReduce");
            }
        });
    }

private:
    enum class kind : std::uint32_t {
        all_reduce = 1,
        all_gather,
        all_to_all,
        broadcast,
        barrier,
        options,  // the constructor's agreement on check_calls
    };

    struct descriptor {
        std::uint32_t magic;
        kind what;
        std::uint32_t op;  // 0 sum, 1 mean (all_reduce)
        std::int32_t root;
        std::uint64_t count;  // floats for all_reduce, bytes otherwise
        std::uint64_t sequence;
    };
    static_assert(sizeof(descriptor) == 32);
    static constexpr std::uint32_t descriptor_magic = 0x6c6f636fu;  // "loco"

    struct call {
        kind what;
        std::uint32_t op;
        std::size_t count;
        int root;
    };

    // A constructor that throws comm_error has aborted the communicator (which frees it): its
    // agreement may still be in flight on the device after a timeout, and the buffers it uses
    // must not be freed under it, so the one safe way out is ncclCommAbort first; the other
    // failures do the same for one rule the caller can rely on. One it owns (create()) it
    // aborts whatever failed; a wrapped one after invalid_argument, a CUDA error or an
    // allocation failure stays the caller's.
    nccl(ncclComm_t comm, cudaStream_t caller_stream, nccl_options options, bool owned)
        : comm_(comm), owned_(owned), options_(options), caller_(caller_stream) {
        if (comm_ == nullptr) {
            throw invalid_argument("loco::comm::nccl: null ncclComm_t");
        }
        try {
            set_up();
        } catch (const comm_error&) {
            abort("the constructor failed");
            throw;
        } catch (...) {
            if (owned_) abort("the constructor failed");
            throw;
        }
    }

    void set_up() {
        if (options_.timeout.count() <= 0) {
            throw invalid_argument("loco::comm::nccl: timeout must be positive");
        }
        int ranks_in_comm = 0;
        int my_rank = 0;
        int comm_device = 0;
        const auto query = [&](ncclResult_t r, const char* what) {
            if (r != ncclSuccess) {
                throw comm_error(std::string("loco::comm::nccl: ") + what +
                                 " failed: " + detail::nccl_message(r, comm_));
            }
        };
        query(ncclCommCount(comm_, &ranks_in_comm), "ncclCommCount");
        query(ncclCommUserRank(comm_, &my_rank), "ncclCommUserRank");
        query(ncclCommCuDevice(comm_, &comm_device), "ncclCommCuDevice");
        device_ = backend::cuda::current_device();
        if (comm_device != device_) {
            throw invalid_argument("loco::comm::nccl: the communicator is on GPU " +
                                   std::to_string(comm_device) + " but GPU " +
                                   std::to_string(device_) + " is current");
        }
        size_ = ranks_in_comm;
        rank_ = my_rank;
        const std::size_t m = static_cast<std::size_t>(size_);
        stream_ = std::make_unique<backend::cuda::stream>();
        scratch_ = backend::cuda::device_buffer<float>(1);
        scratch_.zero(stream_->get());
        descriptors_ = backend::cuda::device_buffer<descriptor>(m + 1);
        host_descriptors_ = backend::cuda::pinned_buffer<descriptor>(m + 1);
        agree_on_options();
    }

    // check_calls decides whether every collective is preceded by a descriptor all-gather: ranks
    // that differ would pair one rank's descriptor with another's payload (wrong data on some, a
    // timeout on others). So the constructor all-gathers every rank's setting once (counted in
    // control_bytes_sent) and every rank throws the same comm_error when they differ. The
    // constructor is collective for more than one rank.
    void agree_on_options() {
        if (size_ == 1) {
            return;
        }
        const std::string where = prefix("construction");
        const std::size_t m = static_cast<std::size_t>(size_);
        backend::cuda::device_guard on(device_);
        gather_descriptors(descriptor{descriptor_magic, kind::options,
                                      options_.check_calls ? 1u : 0u, 0, 0, 0},
                           where, "ncclAllGather (options)");
        std::size_t with_checks = 0;
        for (std::size_t k = 0; k < m; ++k) {
            const descriptor& d = host_descriptors_[k];
            if (d.magic != descriptor_magic || d.what != kind::options || d.op > 1) {
                throw comm_error(where + "rank " + std::to_string(k) +
                                 " sent a malformed options descriptor (is every rank's "
                                 "communicator a fresh loco::comm::nccl?)");
            }
            with_checks += d.op;
        }
        if (with_checks != 0 && with_checks != m) {
            throw comm_error(where + "ranks disagree on nccl_options::check_calls: " +
                             std::to_string(with_checks) + " of " + std::to_string(m) +
                             " ranks have it on; every rank must pass the same");
        }
    }

    static int current_device_or(int fallback) noexcept {
        int d = fallback;
        return cudaGetDevice(&d) == cudaSuccess ? d : fallback;
    }

    void ensure_usable(const std::string& where) const {
        if (aborted_) {
            throw comm_error(where + "the communicator was aborted: " + abort_reason_);
        }
    }

    std::chrono::steady_clock::time_point deadline() const {
        return detail::deadline_after(options_.timeout);
    }

    // What went wrong with an NCCL call, from its result, or "" when nothing did. ncclInProgress
    // (nonblocking communicators) is waited out first, under the timeout, as NCCL requires before
    // the next call. Neither aborts nor throws, so that a caller inside an NCCL group can end the
    // group first (do_all_to_all).
    std::string nccl_failure(ncclResult_t r, const char* what) {
        if (r == ncclInProgress) {
            r = detail::nccl_settle(comm_, deadline());
            if (r == ncclInProgress) {
                return std::string(what) + " was still in progress after " +
                       std::to_string(options_.timeout.count()) + " ms";
            }
        }
        if (r != ncclSuccess) {
            return std::string(what) + " failed: " + detail::nccl_message(r, comm_);
        }
        return {};
    }

    // Aborts the communicator for `failure` (nccl_failure's) and throws comm_error.
    [[noreturn]] void fail(const std::string& where, const std::string& failure) {
        abort(failure);
        throw comm_error(where + failure + "; the communicator was aborted");
    }

    // An NCCL call's result, outside a group: a failure (or a timeout) aborts and throws.
    void check_nccl(ncclResult_t r, const std::string& where, const char* what) {
        const std::string failure = nccl_failure(r, what);
        if (!failure.empty()) {
            fail(where, failure);
        }
    }

    // The destructor's wait for the work on the communicator's stream, as synchronize() does but
    // never throwing: wait_for aborts on a timeout or NCCL error, as synchronize() would. After
    // a CUDA error (which synchronize() reports as cuda_error without aborting) a wrapped
    // communicator stays the caller's; one this object owns is aborted, since nothing tells
    // whether its collectives ended.
    void settle_stream() noexcept {
        try {
            done_.record(stream_->get());
            wait_for(done_.get(), prefix("destruction"));
        } catch (...) {
            try {
                if (owned_) abort("the destructor's wait failed");
            } catch (...) {  // NOLINT(bugprone-empty-catch): aborted_ is set before the reason
            }
        }
    }

    // Polls `e` until it completes, watching NCCL's error state and the deadline.
    void wait_for(cudaEvent_t e, const std::string& where) {
        const auto until = deadline();
        auto pause = std::chrono::microseconds(5);
        for (;;) {
            const cudaError_t q = cudaEventQuery(e);
            if (q == cudaSuccess) {
                return;
            }
            if (q != cudaErrorNotReady) {
                LOCO_CUDA_CHECK(q);
            }
            ncclResult_t state = ncclSuccess;
            if (ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state != ncclSuccess &&
                state != ncclInProgress) {
                const std::string msg = detail::nccl_message(state, comm_);
                abort("NCCL reported " + msg);
                throw comm_error(where + "NCCL reported " + msg +
                                 "; the communicator was aborted");
            }
            if (std::chrono::steady_clock::now() > until) {
                const std::string reason = "rank " + std::to_string(rank_) + " waited " +
                                           std::to_string(options_.timeout.count()) +
                                           " ms for its peers";
                abort(reason);
                throw comm_error(where + reason + "; the communicator was aborted");
            }
            std::this_thread::sleep_for(pause);
            pause = std::min(pause * 2, std::chrono::microseconds(500));
        }
    }

    static std::string describe(const descriptor& d) {
        std::string s;
        switch (d.what) {
            case kind::all_reduce:
                s = std::string("all_reduce") + (d.op == 0 ? " (sum)" : " (mean)") + " of " +
                    std::to_string(d.count) + " floats";
                break;
            case kind::all_gather: s = "all_gather of " + std::to_string(d.count) + " bytes"; break;
            case kind::all_to_all: s = "all_to_all of " + std::to_string(d.count) + " bytes"; break;
            case kind::broadcast:
                s = "broadcast of " + std::to_string(d.count) + " bytes from root " +
                    std::to_string(d.root);
                break;
            case kind::barrier: s = "barrier"; break;
            default: s = "an unknown call"; break;
        }
        return s + " (its collective #" + std::to_string(d.sequence) + ")";
    }

    // All-gathers `mine` into host_descriptors_[0, M) on the communicator's stream and waits for
    // it under the timeout (counted in control_bytes_sent): the constructor's agreement on the
    // options and every call's check_calls agreement.
    void gather_descriptors(const descriptor& mine, const std::string& where, const char* what) {
        const std::size_t m = static_cast<std::size_t>(size_);
        host_descriptors_[m] = mine;
        descriptor* dev = descriptors_.get();
        cudaStream_t s = stream_->get();
        LOCO_CUDA_CHECK(cudaMemcpyAsync(dev + m, host_descriptors_.get() + m, sizeof(descriptor),
                                        cudaMemcpyHostToDevice, s));
        check_nccl(ncclAllGather(dev + m, dev, sizeof(descriptor), ncclUint8, comm_, s), where,
                   what);
        LOCO_CUDA_CHECK(cudaMemcpyAsync(host_descriptors_.get(), dev, m * sizeof(descriptor),
                                        cudaMemcpyDeviceToHost, s));
        done_.record(s);
        wait_for(done_.get(), where);
        control_sent_ += (m - 1) * sizeof(descriptor);
    }

    // All-gathers this rank's descriptor and compares them all; every rank throws the same
    // comm_error when they differ. No payload has moved then, and the communicator stays usable.
    void agree(const call& c, const std::string& where) {
        const std::size_t m = static_cast<std::size_t>(size_);
        gather_descriptors(descriptor{descriptor_magic, c.what, c.op, c.root,
                                      static_cast<std::uint64_t>(c.count), sequence_},
                           where, "ncclAllGather (call descriptors)");
        const descriptor& first = host_descriptors_[0];
        for (std::size_t k = 0; k < m; ++k) {
            const descriptor& d = host_descriptors_[k];
            if (d.magic != descriptor_magic) {
                throw comm_error(where + "rank " + std::to_string(k) +
                                 " sent a malformed call descriptor");
            }
            if (d.what != first.what || d.op != first.op || d.root != first.root ||
                d.count != first.count || d.sequence != first.sequence) {
                throw comm_error(where + "ranks disagree on the collective: rank 0 called " +
                                 describe(first) + ", rank " + std::to_string(k) + " called " +
                                 describe(d));
            }
        }
    }

    // A collective enqueued on the communicator's stream: finishing it makes the caller's stream
    // (and with options.wait the host) wait for the event recorded after it. Dropped unfinished,
    // the host waits whatever options.wait says: the caller may free the buffers right after.
    // It may outlive the communicator (communicator.hpp): the destructor settles every collective,
    // owned communicator or wrapped (it waits for its stream, or aborts at the timeout), so
    // afterwards finish() throws and a drop has nothing left to wait for; the owner is touched
    // only while it lives.
    class in_flight final : public request::operation {
    public:
        in_flight(nccl& owner, backend::cuda::event done, std::string where)
            : owner_(owner), alive_(owner.alive_), done_(std::move(done)),
              where_(std::move(where)) {}
        cudaEvent_t event() const noexcept { return done_.get(); }
        ~in_flight() override {
            if (*alive_) owner_.give_event(std::move(done_));
        }
        void wait() override {
            if (!*alive_) {
                throw comm_error(where_ + "the request was finished after its communicator "
                                 "was destroyed (which waited for the collective or aborted "
                                 "it); finish requests before destroying their communicator");
            }
            owner_.complete(done_.get(), where_, owner_.options_.wait);
        }
        void abandon() override {
            if (*alive_) owner_.complete(done_.get(), where_, true);
        }

    private:
        nccl& owner_;
        std::shared_ptr<const bool> alive_;
        backend::cuda::event done_;
        std::string where_;
    };

    // Agrees on the call (check_calls), then enqueues it on the communicator's stream after the
    // work already on the caller's stream, and records `done` after it. The host does not wait
    // for the caller's stream: the agreement runs before the wait is enqueued.
    template <class Enqueue>
    void enqueue(const call& c, const std::string& where, cudaEvent_t done, Enqueue&& enqueue_call) {
        ensure_usable(where);
        backend::cuda::device_guard on(device_);
        cudaStream_t s = stream_->get();
        ++sequence_;
        if (options_.check_calls) {
            agree(c, where);
        }
        // On the device: start after the caller's work.
        backend::cuda::stream_wait(s, caller_, ready_.get());
        enqueue_call();
        LOCO_CUDA_CHECK(cudaEventRecord(done, s));
    }

    // The caller's stream waits for `done`; with host_wait the host waits too, under the timeout.
    void complete(cudaEvent_t done, const std::string& where, bool host_wait) {
        ensure_usable(where);
        backend::cuda::device_guard on(device_);
        LOCO_CUDA_CHECK(cudaStreamWaitEvent(caller_, done, 0));
        if (host_wait) {
            wait_for(done, where);
        }
    }

    template <class Enqueue>
    void run(const call& c, const std::string& where, bool always_wait, Enqueue&& enqueue_call) {
        backend::cuda::event done = take_event();
        try {
            enqueue(c, where, done.get(), std::forward<Enqueue>(enqueue_call));
            complete(done.get(), where, options_.wait || always_wait);
        } catch (...) {
            give_event(std::move(done));
            throw;
        }
        give_event(std::move(done));
    }

    // Events for the collectives in flight, reused. Under a lock: a request may be finished or
    // dropped (giving its event back) on another thread while this one starts the next
    // collective (communicators.md).
    backend::cuda::event take_event() {
        {
            const std::lock_guard<std::mutex> lock(events_mutex_);
            if (!spare_events_.empty()) {
                backend::cuda::event e = std::move(spare_events_.back());
                spare_events_.pop_back();
                return e;
            }
        }
        return backend::cuda::event();
    }
    void give_event(backend::cuda::event e) noexcept {
        if (e.get() == nullptr) {
            return;
        }
        try {
            const std::lock_guard<std::mutex> lock(events_mutex_);
            spare_events_.push_back(std::move(e));
        } catch (...) {
            // No room in the list: the event is destroyed instead.
        }
    }

    ncclComm_t comm_;
    bool owned_;
    nccl_options options_;
    cudaStream_t caller_;
    int device_ = 0;
    int rank_ = 0;
    int size_ = 1;
    std::unique_ptr<backend::cuda::stream> stream_;
    backend::cuda::event ready_;
    backend::cuda::event done_;  // synchronize() and the call descriptors
    std::mutex events_mutex_;  // guards spare_events_
    std::vector<backend::cuda::event> spare_events_;
    backend::cuda::device_buffer<float> scratch_;
    backend::cuda::device_buffer<descriptor> descriptors_;
    backend::cuda::pinned_buffer<descriptor> host_descriptors_;
    std::uint64_t sequence_ = 0;
    std::uint64_t sent_ = 0;
    std::uint64_t control_sent_ = 0;
    bool aborted_ = false;
    std::string abort_reason_;
    // False once the destructor runs; shared with the requests in flight (in_flight).
    std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// The unique id of a new NCCL clique, passed between processes through a file: rank 0 creates it
// and writes `path` atomically (a temporary file, then a rename); the other ranks wait (up to
// `timeout`) for the file and read it. Use a path that is fresh for every run (a job id in it):
// a file left by an earlier run would hand out a stale id.
inline ncclUniqueId nccl_unique_id_via_file(const std::string& path, int rank,
                                            std::chrono::milliseconds timeout) {
    ncclUniqueId id{};
    if (rank == 0) {
        id = detail::new_unique_id();
        const std::string tmp = path + ".tmp";
        {
            std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
            out.write(id.internal, sizeof id.internal);
            if (!out) {
                throw comm_error("loco::comm::nccl: cannot write the unique id to " + tmp);
            }
        }
        if (std::rename(tmp.c_str(), path.c_str()) != 0) {
            throw comm_error("loco::comm::nccl: cannot rename " + tmp + " to " + path);
        }
        return id;
    }
    const auto until = detail::deadline_after(timeout);
    for (;;) {
        std::ifstream in(path, std::ios::binary);
        if (in && in.read(id.internal, sizeof id.internal) &&
            in.gcount() == static_cast<std::streamsize>(sizeof id.internal)) {
            return id;
        }
        if (std::chrono::steady_clock::now() > until) {
            throw comm_error("loco::comm::nccl rank " + std::to_string(rank) + ": " + path +
                             " did not appear within " + std::to_string(timeout.count()) +
                             " ms (is rank 0 running?)");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
}

// One process of an N-process job: the id through `path`, then a nonblocking communicator on the
// current GPU.
inline std::unique_ptr<nccl> nccl_bootstrap_file(const std::string& path, int nranks, int rank,
                                                 cudaStream_t caller_stream = nullptr,
                                                 nccl_options options = {}) {
    const ncclUniqueId id = nccl_unique_id_via_file(path, rank, options.timeout);
    return nccl::create(nranks, rank, id, caller_stream, options);
}

#if defined(LOCO_WITH_MPI)
// The same with the id broadcast over MPI from rank 0 of `mpi_comm` (define LOCO_WITH_MPI and link
// MPI to get it).
inline std::unique_ptr<nccl> nccl_bootstrap_mpi(MPI_Comm mpi_comm,
                                                cudaStream_t caller_stream = nullptr,
                                                nccl_options options = {}) {
    int rank = 0;
    int nranks = 0;
    MPI_Comm_rank(mpi_comm, &rank);
    MPI_Comm_size(mpi_comm, &nranks);
    const std::string who = "loco::comm::nccl rank " + std::to_string(rank) + ": ";
    // Rank 0 broadcasts the outcome of ncclGetUniqueId with the id: had it thrown instead, the
    // other ranks would wait in MPI_Bcast for ever. So every rank throws the same comm_error.
    struct {
        ncclUniqueId id;
        std::int32_t result;  // rank 0's ncclResult_t
        char why[256];        // its message, when it failed
    } made{};
    if (rank == 0) {
        const ncclResult_t r = ncclGetUniqueId(&made.id);
        made.result = static_cast<std::int32_t>(r);
        if (r != ncclSuccess) {
            const std::string why = detail::nccl_message(r, nullptr);
            std::snprintf(made.why, sizeof made.why, "%s", why.c_str());
        }
    }
    if (MPI_Bcast(&made, static_cast<int>(sizeof made), MPI_BYTE, 0, mpi_comm) != MPI_SUCCESS) {
        throw comm_error(who + "nccl_bootstrap_mpi: MPI_Bcast of the unique id failed");
    }
    if (made.result != ncclSuccess) {
        made.why[sizeof made.why - 1] = '\0';
        throw comm_error(who + "nccl_bootstrap_mpi: ncclGetUniqueId failed on rank 0: " +
                         made.why + "; no rank made a communicator");
    }
    return nccl::create(nranks, rank, made.id, caller_stream, options);
}
#endif

}  // namespace loco::comm
