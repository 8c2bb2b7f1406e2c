// Worker loss and rejoin on the CUDA backend (issue 12, item 2): regroup() moves a GPU handle onto a
// new communicator of survivors, then onto one with a newcomer that is healed from a survivor, on
// every exchange path: the device fp32 all-reduce, the fused 2-bit + error-feedback all-gather,
// the device aggregation of a robust policy, and the host exchange through cuda_staging
// (two_phase). The same events run on thread workers with the host handle, whose regroup()
// tests/heal_test.cpp checks against a double-precision simulation; here every rank's parameters,
// global values, outer momentum and residuals on the GPU equal the host run's. The events: 3
// workers train 2 rounds; worker 2 is lost (cuda_replicas: it aborts the group and the survivors'
// sync fails with nothing changed; NCCL: it leaves after a round, the emulator's NCCL has no
// timeouts); the survivors regroup onto a group of 2 and train a round; a newcomer joins a group
// of 3, is healed from rank 0, and all train 2 more rounds.
#include <doctest/doctest.h>

#include "../support/forwarding_comm.hpp"
#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"
#include "model.cuh"

#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_regroup_test {

namespace {

using namespace loco_test;
using namespace loco_test::handles;
namespace ls = loco::schedule;
namespace cz = loco::compress;

using inner = loco::inner::adamw;
using outer = loco::outer::nesterov;
constexpr int H = 2;  // inner steps per round

// What a worker holds at the end.
struct final_state {
    std::vector<float> params, global, momentum, residual;
    std::uint64_t outer_steps = 0;
    bool failed_cleanly = false;  // its sync with the lost worker threw, nothing changed
};

// Thread workers with host memory, the reference side.
struct threads_side {
    static constexpr bool gpu = false;
    using network = std::shared_ptr<loco::comm::thread_group>;
    static network make(int m) {
        return std::make_shared<loco::comm::thread_group>(m, std::chrono::seconds(300));
    }
    static std::unique_ptr<loco::comm::communicator> join(const network& n, int r, cudaStream_t) {
        return std::make_unique<loco::comm::threads>(n, r);
    }
    static void abort(const network& n, const std::string& why) { n->abort(why); }
};

// GPU replicas of one device.
struct replicas_side {
    static constexpr bool gpu = true;
    using network = std::shared_ptr<loco::comm::cuda_replica_group>;
    static network make(int m) {
        return std::make_shared<loco::comm::cuda_replica_group>(m, -1, std::chrono::seconds(300));
    }
    static std::unique_ptr<loco::comm::communicator> join(const network& n, int r,
                                                          cudaStream_t s) {
        return std::make_unique<loco::comm::cuda_replicas>(n, r, s);
    }
    static void abort(const network& n, const std::string& why) { n->abort(why); }
};

#if defined(LOCO_TEST_NCCL)
// One NCCL rank per GPU: a new clique (a fresh unique id) for each group.
struct nccl_side {
    static constexpr bool gpu = true;
    struct clique {
        int size;
        ncclUniqueId id;
    };
    using network = std::shared_ptr<clique>;
    static network make(int m) {
        auto c = std::make_shared<clique>();
        c->size = m;
        REQUIRE(ncclGetUniqueId(&c->id) == ncclSuccess);
        return c;
    }
    static std::unique_ptr<loco::comm::communicator> join(const network& n, int r,
                                                          cudaStream_t s) {
        return loco::comm::nccl::create(n->size, r, n->id, s, {});
    }
    static void abort(const network&, const std::string&) {}
};
#endif

using ef2 = cz::error_feedback<cz::blockwise<2, 256>>;

template <class Side, class Compressor, class Aggregate = loco::aggregate::mean>
struct worker {
    using handle = std::conditional_t<
        Side::gpu, loco::cuda::diloco<inner, outer, Compressor, ls::every, Aggregate>,
        loco::diloco<inner, outer, Compressor, ls::every, Aggregate>>;
    using params_t = std::conditional_t<Side::gpu, gpu_params, host_params>;

    std::string label;
    int id;
    cudaStream_t stream;
    params_t m;
    std::unique_ptr<handle> opt;
    int t = 0;

    worker(const std::string& l, int id_, loco::comm::communicator& comm, cudaStream_t s,
           loco::exchange_scheme scheme)
        : label(l), id(id_), stream(s), m(init_of(l, id_)) {
        typename handle::config c{.inner = {.lr = 3e-3f}, .schedule = {.every = 1000}};
        c.exchange = scheme;
        if constexpr (std::is_same_v<Aggregate, loco::aggregate::centered_clip>) {
            c.aggregate = {.tau = 1e-3f, .iterations = 3};  // a radius that clips every worker
        }
        if constexpr (Side::gpu) c.stream = s;
        opt = std::make_unique<handle>(m.list, comm, c);
    }
    void step() {
        const auto g = grads_of(label, id, ++t);
        if constexpr (Side::gpu) {
            m.set_gradients(g, stream);
        } else {
            m.set_gradients(g);
        }
        opt->step();
    }
    void round() {
        for (int s = 0; s < H; ++s) step();
        opt->sync();
    }
    std::vector<float> params() {
        if constexpr (Side::gpu) {
            return m.host_values(stream);
        } else {
            return m.values();
        }
    }
    std::string saved() const {
        std::ostringstream os;
        opt->save(os);
        return os.str();
    }
    final_state result() {
        final_state out;
        out.params = params();
        const auto g = opt->global();
        out.global.assign(g.begin(), g.end());
        const auto mo = opt->outer_state(0);
        out.momentum.assign(mo.begin(), mo.end());
        const auto re = opt->compressor_state();
        out.residual.assign(re.begin(), re.end());
        out.outer_steps = opt->outer_steps();
        return out;
    }
};

// The events of the file's comment; slot 3 is the newcomer. `fail`: worker 2 aborts the first
// group and the survivors' sync fails, else it leaves after round 2.
template <class Side, class Compressor, class Aggregate = loco::aggregate::mean>
std::vector<final_state> run_events(const std::string& label, loco::exchange_scheme scheme,
                                    bool fail) {
    auto first = Side::make(3);
    auto second = Side::make(2);
    auto third = Side::make(3);
    std::vector<final_state> out(4);
    std::atomic<bool> third_open{false};
    std::mutex mutex;
    std::vector<std::string> errors;
    const auto guarded = [&](int device, auto body) {
        return [&, device, body] {
            try {
                check_cuda(cudaSetDevice(device), "cudaSetDevice");
                loco::backend::cuda::stream s;
                body(s.get());
                check_cuda(cudaStreamSynchronize(s.get()), "final sync");
            } catch (const std::exception& e) {
                const std::lock_guard<std::mutex> lock(mutex);
                errors.push_back(e.what());
            }
        };
    };
    // Replicas share one device; NCCL ranks have one each.
    const auto device_of = [](int r) {
        return std::is_same_v<Side, replicas_side> || !Side::gpu ? 0 : r;
    };
    std::vector<std::thread> threads;
    for (int r = 0; r < 3; ++r) {
        threads.emplace_back(guarded(device_of(r), [&, r](cudaStream_t s) {
            auto comm = Side::join(first, r, s);
            worker<Side, Compressor, Aggregate> w(label, r, *comm, s, scheme);
            w.opt->start();
            w.round();
            w.round();
            if (r == 2) {
                if (fail) {
                    w.step();
                    Side::abort(first, "rank 2 failed: its data loader crashed");
                }
                return;
            }
            if (fail) {
                for (int k = 0; k < H; ++k) w.step();
                const std::string before = w.saved();
                const auto params_before = w.params();
                try {
                    w.opt->sync();
                } catch (const loco::comm_error& e) {
                    out[std::size_t(r)].failed_cleanly =
                        std::string(e.what()).find("rank 2 failed") != std::string::npos &&
                        w.saved() == before && w.params() == params_before;
                }
            }
            comm.reset();  // the first group is gone

            auto two = Side::join(second, r, s);
            w.opt->regroup(*two, 0);
            if (fail) {
                w.opt->sync();  // the failed round, retried by the survivors
            }
            w.round();
            if (r == 0) third_open = true;
            auto three = Side::join(third, r, s);
            w.opt->regroup(*three, 0);
            two.reset();
            w.round();
            w.round();
            out[std::size_t(r)] = [&] {
                final_state f = w.result();
                f.failed_cleanly = out[std::size_t(r)].failed_cleanly;
                return f;
            }();
        }));
    }
    threads.emplace_back(guarded(device_of(2), [&](cudaStream_t s) {
        while (!third_open) std::this_thread::sleep_for(std::chrono::milliseconds(5));
        auto three = Side::join(third, 2, s);
        worker<Side, Compressor, Aggregate> w(label, 7, *three, s, scheme);  // its own values, healed
        w.opt->regroup(*three, 0);
        CHECK(w.params() == [&] {
            const auto g = w.opt->global();
            return std::vector<float>(g.begin(), g.end());
        }());
        w.round();
        w.round();
        out[3] = w.result();
    }));
    for (auto& t : threads) t.join();
    for (const auto& e : errors) FAIL_CHECK(e);
    REQUIRE(errors.empty());
    return out;
}

void expect_same(const std::vector<final_state>& gpu, const std::vector<final_state>& host,
                 double tol, bool fail) {
    for (const std::size_t r : {std::size_t(0), std::size_t(1), std::size_t(3)}) {
        CAPTURE(r);
        CHECK(gpu[r].outer_steps == host[r].outer_steps);
        CHECK(gpu[r].outer_steps == (fail ? 6u : 5u));
        if (fail && r < 2) {
            CHECK(gpu[r].failed_cleanly);
            CHECK(host[r].failed_cleanly);
        }
        expect_close_arrays(gpu[r].params, host[r].params, tol, "parameters");
        expect_close_arrays(gpu[r].global, host[r].global, tol, "global values");
        expect_close_arrays(gpu[r].momentum, host[r].momentum, tol, "outer momentum");
        expect_close_arrays(gpu[r].residual, host[r].residual, tol, "residual");
        // After the last sync every worker holds the global values, the same on every rank.
        expect_equal_arrays(gpu[r].params, gpu[r].global, "parameters after the last sync");
        expect_equal_arrays(gpu[r].global, gpu[0].global, "the ranks' global values");
    }
}

template <class Side, class Compressor, class Aggregate = loco::aggregate::mean>
void check_paths(const std::string& name, loco::exchange_scheme scheme, double tol, bool fail) {
    const std::string label = "regroup " + name + (fail ? " fail" : " leave");
    const auto host = run_events<threads_side, Compressor, Aggregate>(label, scheme, fail);
    const auto gpu = run_events<Side, Compressor, Aggregate>(label, scheme, fail);
    expect_same(gpu, host, tol, fail);
}

}  // namespace

TEST_CASE("cuda backend regroup on replicas: a lost worker, the survivors, a healed newcomer") {
    SUBCASE("device fp32 all-reduce") {
        check_paths<replicas_side, cz::none>("none", loco::exchange_scheme::automatic, 1e-5, true);
    }
    SUBCASE("fused 2-bit with error feedback") {
        check_paths<replicas_side, ef2>("ef2", loco::exchange_scheme::automatic, 1e-4, true);
    }
    SUBCASE("device aggregation (median of the fp32 deltas; its state starts again)") {
        check_paths<replicas_side, cz::none, loco::aggregate::median>(
            "median", loco::exchange_scheme::all_gather, 1e-5, true);
    }
    SUBCASE("device aggregation (centered clipping; its center starts again with the group)") {
        check_paths<replicas_side, cz::none, loco::aggregate::centered_clip>(
            "centered clip", loco::exchange_scheme::all_gather, 1e-5, true);
    }
    SUBCASE("chunked device exchange (SparseLoCo's clipped scatter-mean; the accumulator kept)") {
        check_paths<replicas_side, cz::sparseloco, loco::aggregate::median_norm_clip>(
            "sparseloco", loco::exchange_scheme::automatic, 1e-4, true);
    }
    SUBCASE("host exchange through cuda_staging (two_phase)") {
        check_paths<replicas_side, ef2>("ef2 two-phase", loco::exchange_scheme::two_phase, 1e-4,
                                        true);
    }
}

TEST_CASE("cuda backend regroup onto a communicator of another memory space is refused") {
    loco::comm::run_replicas(1, [&](loco::comm::cuda_replicas& comm) {
        gpu_params m(init_of("regroup space", 0));
        loco::cuda::diloco<inner, outer> opt(m.list, comm, {.stream = comm.stream()});
        opt.start();
        const std::string before = [&] {
            std::ostringstream os;
            opt.save(os);
            return os.str();
        }();
        auto group = std::make_shared<loco::comm::thread_group>(1);
        loco::comm::threads host(group, 0);
        CHECK_THROWS_WITH_AS(opt.regroup(host),
                             doctest::Contains("communicator that moves host memory; this handle "
                                               "was built on one that moves cuda memory"),
                             loco::memory_space_error);
        std::ostringstream after;
        opt.save(after);
        CHECK(after.str() == before);
        opt.sync();  // still on its own communicator
        CHECK(opt.outer_steps() == 1);
    });
}

// Forwards to `next`, but says the group has `size` ranks (a group is refused before any
// collective runs on it).
class one_more_rank final : public loco_test::forwarding_comm {
public:
    one_more_rank(loco::comm::communicator& next, int size)
        : forwarding_comm(next, "one_more_rank"), size_(size) {}
    int size() const noexcept override { return size_; }

private:
    int size_;
};

TEST_CASE("cuda backend regroup: the device aggregation takes a group of its most workers, not one more") {
    // A handle built with a device aggregation (median) regroups onto at most max_workers
    // workers: one more is refused before anything changes; exactly max_workers passes that
    // check (here the other workers never come, so the heal's first collective times out,
    // changing nothing either).
    constexpr std::size_t most =
        loco::backend::cuda::device_aggregation<loco::aggregate::median>::max_workers;
    using handle = loco::cuda::diloco<inner, outer, cz::none, ls::every, loco::aggregate::median>;
    loco::comm::run_replicas(1, [&](loco::comm::cuda_replicas& comm) {
        gpu_params m(init_of("regroup worker limit", 0));
        handle opt(m.list, comm,
                   {.inner = {.lr = 3e-3f}, .schedule = {.every = 1000},
                    .exchange = loco::exchange_scheme::all_gather, .stream = comm.stream()});
        opt.start();
        const auto saved = [&] {
            std::ostringstream os;
            opt.save(os);
            return os.str();
        };
        const std::string before = saved();
        // cuda_replica_group takes at most 64 ranks: a group that says it has one more.
        one_more_rank one_more(comm, int(most) + 1);
        CHECK_THROWS_WITH_AS(opt.regroup(one_more),
                             ("loco::cuda::diloco: regroup() onto " + std::to_string(most + 1) +
                              " workers; the device aggregation this handle was built with takes "
                              "at most " + std::to_string(most)).c_str(),
                             loco::invalid_argument);
        CHECK(saved() == before);
        auto at = std::make_shared<loco::comm::cuda_replica_group>(
            int(most), -1, std::chrono::milliseconds(200));
        loco::comm::cuda_replicas at_most(at, 0, comm.stream());
        CHECK_THROWS_AS(opt.regroup(at_most), loco::comm_error);
        CHECK(saved() == before);
        opt.sync();  // still on its own communicator
        CHECK(opt.outer_steps() == 1);
    });
}

#if defined(LOCO_TEST_NCCL)
TEST_CASE("cuda backend regroup over nccl: a worker leaves, the survivors go on, a newcomer "
          "joins") {
    int devices = 0;
    check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    if (devices < 3) {
        MESSAGE("SKIPPED: needs 3 GPUs (one NCCL rank per GPU); this machine has " << devices);
        return;
    }
    SUBCASE("device fp32 all-reduce") {
        check_paths<nccl_side, cz::none>("nccl none", loco::exchange_scheme::automatic, 1e-5,
                                         false);
    }
    SUBCASE("fused 2-bit with error feedback") {
        check_paths<nccl_side, ef2>("nccl ef2", loco::exchange_scheme::automatic, 1e-4, false);
    }
}
#endif  // LOCO_TEST_NCCL

}  // namespace cuda_regroup_test
