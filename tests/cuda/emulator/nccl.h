// A fake NCCL for the CPU emulation: ranks are threads of this process, every collective is a
// blocking rendezvous executed at the call (the emulated streams run everything at once).
#pragma once
#include "cuda_runtime.h"

#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

typedef enum { ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclSystemError = 2, ncclInternalError = 3,
               ncclInvalidArgument = 4, ncclInvalidUsage = 5, ncclRemoteError = 6, ncclInProgress = 7 } ncclResult_t;
typedef struct { char internal[128]; } ncclUniqueId;
typedef enum { ncclInt8 = 0, ncclUint8 = 1, ncclFloat32 = 7, ncclFloat = 7 } ncclDataType_t;
typedef enum { ncclSum = 0 } ncclRedOp_t;
typedef struct { size_t size; unsigned magic; unsigned version; int blocking; } ncclConfig_t;
#define NCCL_CONFIG_INITIALIZER {sizeof(ncclConfig_t), 0xcafebeef, 0, INT_MIN}

namespace fake {
struct clique {
    int n = 0;
    int joined = 0;
    std::mutex m;
    std::condition_variable cv;
    std::uint64_t gen = 0;
    int arrived = 0;
    std::vector<const void*> send;
    std::vector<void*> recv;
    std::map<std::pair<int, int>, std::vector<std::byte>> mail;
};
inline std::mutex& registry_mutex() { static std::mutex m; return m; }
inline std::map<std::string, std::shared_ptr<clique>>& registry() { static std::map<std::string, std::shared_ptr<clique>> r; return r; }
inline std::shared_ptr<clique> get(const ncclUniqueId& id, int n) {
    std::lock_guard<std::mutex> l(registry_mutex());
    auto& c = registry()[std::string(id.internal, sizeof id.internal)];
    if (!c) { c = std::make_shared<clique>(); c->n = n; c->send.resize(n); c->recv.resize(n); }
    return c;
}

// Fault injection, for the tests of loco's error paths (reset them when done):
// - fail_unique_id(): the next that many ncclGetUniqueId calls of the process fail with
//   ncclSystemError (NCCL finding no usable network interface, say);
// - fail_send_at: when > 0, this thread's ncclSend number fail_send_at (counting from 1 in
//   send_calls) returns ncclRemoteError without queueing anything, as NCCL reports a lost peer;
// - comm_aborts(): how many communicators ncclCommAbort has released.
inline std::atomic<int>& fail_unique_id() { static std::atomic<int> n{0}; return n; }
inline thread_local int fail_send_at = 0;
inline thread_local int send_calls = 0;
inline std::atomic<int>& comm_aborts() { static std::atomic<int> n{0}; return n; }
}  // namespace fake

struct ncclComm {
    std::shared_ptr<fake::clique> c;
    int rank = 0;
    bool aborted = false;
};
typedef struct ncclComm* ncclComm_t;

inline const char* ncclGetErrorString(ncclResult_t r) { return r == ncclSuccess ? "no error" : "fake nccl error"; }
inline const char* ncclGetLastError(ncclComm_t) { return ""; }
inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (fake::fail_unique_id() > 0) { --fake::fail_unique_id(); return ncclSystemError; }
    static std::atomic<unsigned long> next{1};
    std::memset(id->internal, 0, sizeof id->internal);
    const unsigned long v = next++;
    std::memcpy(id->internal, &v, sizeof v);
    return ncclSuccess;
}
inline ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int n, ncclUniqueId id, int rank, ncclConfig_t* cfg) {
    auto c = fake::get(id, n);
    { std::lock_guard<std::mutex> l(c->m); ++c->joined; c->cv.notify_all(); }
    *comm = new ncclComm{c, rank, false};
    return cfg && cfg->blocking == 0 ? ncclInProgress : ncclSuccess;
}
inline ncclResult_t ncclCommInitAll(ncclComm_t* comms, int n, const int*) {
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    for (int r = 0; r < n; ++r) ncclCommInitRankConfig(&comms[r], n, id, r, nullptr);
    return ncclSuccess;
}
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
    std::lock_guard<std::mutex> l(comm->c->m);
    *state = comm->aborted ? ncclInvalidUsage : (comm->c->joined < comm->c->n ? ncclInProgress : ncclSuccess);
    return ncclSuccess;
}
inline ncclResult_t ncclCommCount(ncclComm_t comm, int* n) { *n = comm->c->n; return ncclSuccess; }
inline ncclResult_t ncclCommUserRank(ncclComm_t comm, int* r) { *r = comm->rank; return ncclSuccess; }
inline ncclResult_t ncclCommCuDevice(ncclComm_t, int* d) { *d = 0; return ncclSuccess; }
inline ncclResult_t ncclCommFinalize(ncclComm_t) { return ncclSuccess; }
inline ncclResult_t ncclCommDestroy(ncclComm_t comm) { delete comm; return ncclSuccess; }
inline ncclResult_t ncclCommAbort(ncclComm_t comm) { ++fake::comm_aborts(); delete comm; return ncclSuccess; }

namespace fake {
// All ranks post; the last one runs `work` over every rank's buffers; everyone leaves together.
template <class Work>
ncclResult_t rendezvous(ncclComm_t comm, const void* s, void* r, Work&& work) {
    clique& c = *comm->c;
    std::unique_lock<std::mutex> l(c.m);
    c.send[comm->rank] = s;
    c.recv[comm->rank] = r;
    const auto g = c.gen;
    if (++c.arrived == c.n) {
        work(c);
        c.arrived = 0;
        ++c.gen;
        c.cv.notify_all();
    } else {
        c.cv.wait(l, [&] { return c.gen != g; });
    }
    return ncclSuccess;
}
// A collective's own scratch memory, from malloc: NCCL's allocations are not the process's
// operator new, so a test that fails operator new on one rank (tests/alloc/) must not fail the
// collective that the last rank to arrive runs for all of them.
struct scratch {
    explicit scratch(std::size_t n) : p(static_cast<std::byte*>(std::malloc(n == 0 ? 1 : n))) {
        if (p == nullptr) std::abort();
    }
    ~scratch() { std::free(p); }
    scratch(const scratch&) = delete;
    scratch& operator=(const scratch&) = delete;
    std::byte* p;
};
inline std::size_t type_size(ncclDataType_t t) { return t == ncclFloat32 ? 4 : 1; }
struct p2p { bool is_send; const void* s; void* r; std::size_t bytes; int peer; ncclComm_t comm; };
inline thread_local int group_depth = 0;
inline thread_local std::vector<p2p> pending;
}  // namespace fake

inline ncclResult_t ncclAllReduce(const void* s, void* r, size_t count, ncclDataType_t, ncclRedOp_t, ncclComm_t comm, cudaStream_t) {
    return fake::rendezvous(comm, s, r, [&](fake::clique& c) {
        // Element by element, so that in place needs no scratch (see fake::scratch).
        for (size_t i = 0; i < count; ++i) {
            float a = static_cast<const float*>(c.send[0])[i];
            for (int k = 1; k < c.n; ++k) a += static_cast<const float*>(c.send[k])[i];
            for (int k = 0; k < c.n; ++k) static_cast<float*>(c.recv[k])[i] = a;
        }
    });
}
inline ncclResult_t ncclAllGather(const void* s, void* r, size_t count, ncclDataType_t t, ncclComm_t comm, cudaStream_t) {
    const std::size_t bytes = count * fake::type_size(t);
    return fake::rendezvous(comm, s, r, [&](fake::clique& c) {
        fake::scratch copies(c.n * bytes);  // a send may be its rank's slot of recv
        for (int k = 0; k < c.n; ++k) std::memcpy(copies.p + k * bytes, c.send[k], bytes);
        for (int r2 = 0; r2 < c.n; ++r2) std::memcpy(c.recv[r2], copies.p, c.n * bytes);
    });
}
inline ncclResult_t ncclBroadcast(const void* s, void* r, size_t count, ncclDataType_t t, int root, ncclComm_t comm, cudaStream_t) {
    const std::size_t bytes = count * fake::type_size(t);
    return fake::rendezvous(comm, s, r, [&](fake::clique& c) {
        fake::scratch copy(bytes);
        std::memcpy(copy.p, c.send[root], bytes);
        for (int k = 0; k < c.n; ++k) std::memcpy(c.recv[k], copy.p, bytes);
    });
}
inline ncclResult_t ncclGroupStart() { ++fake::group_depth; return ncclSuccess; }
inline ncclResult_t ncclSend(const void* s, size_t count, ncclDataType_t t, int peer, ncclComm_t comm, cudaStream_t) {
    if (++fake::send_calls == fake::fail_send_at) return ncclRemoteError;
    fake::pending.push_back({true, s, nullptr, count * fake::type_size(t), peer, comm});
    return ncclSuccess;
}
inline ncclResult_t ncclRecv(void* r, size_t count, ncclDataType_t t, int peer, ncclComm_t comm, cudaStream_t) {
    fake::pending.push_back({false, nullptr, r, count * fake::type_size(t), peer, comm});
    return ncclSuccess;
}
inline ncclResult_t ncclGroupEnd() {
    if (--fake::group_depth != 0) return ncclSuccess;
    auto ops = std::move(fake::pending);
    fake::pending.clear();
    for (auto& op : ops) {
        if (!op.is_send) continue;
        fake::clique& c = *op.comm->c;
        std::lock_guard<std::mutex> l(c.m);
        c.mail[{op.comm->rank, op.peer}].assign(static_cast<const std::byte*>(op.s), static_cast<const std::byte*>(op.s) + op.bytes);
        c.cv.notify_all();
    }
    for (auto& op : ops) {
        if (op.is_send) continue;
        fake::clique& c = *op.comm->c;
        std::unique_lock<std::mutex> l(c.m);
        const std::pair<int, int> key{op.peer, op.comm->rank};
        c.cv.wait(l, [&] { return c.mail.count(key) != 0; });
        std::memcpy(op.r, c.mail[key].data(), op.bytes);
        c.mail.erase(key);
    }
    return ncclSuccess;
}
