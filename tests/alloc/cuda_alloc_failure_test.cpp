// Out of memory on a CUDA handle, on the CPU emulator (tests/cuda/emulator/): device memory through
// the emulator's emu::fail_device_malloc, host memory through a replaced operator new (which is
// why this is a program of its own, as tests/alloc/alloc_failure_test.cpp). Device memory running
// out is a std::bad_alloc (loco::cuda_out_of_memory), handled as host memory running out is: on
// one rank, before it posted a collective, its peers cannot learn of it and the handle is left out
// of step; where the ranks can still agree (before the agreement), they all raise, nothing applied.
#include <doctest/doctest.h>

#include "../cuda/handles.cuh"
#include "failing_new.hpp"

#include <loco/backend/cuda/cublas.hpp>
#include <loco/comm/cuda_replicas.hpp>
#include <loco/comm/nccl.hpp>
#include <loco/cuda.hpp>
#include <loco/schedule/state_periods.hpp>
#include <loco/schedule/streaming.hpp>

#include <array>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace loco_test;
using namespace loco_test::handles;
namespace cz = loco::compress;
namespace ls = loco::schedule;
using std::chrono::milliseconds;

std::string checkpoint_of(const auto& opt) {
    std::ostringstream os;
    opt.save(os);
    return os.str();
}

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// Each rank's outcome of one call: "ok", or the exception's type and message.
struct outcome {
    bool ok = false, out_of_memory = false;
    std::string what;
};
template <class Fn>
outcome run_call(Fn&& fn) {
    outcome o;
    try {
        fn();
        o.ok = true;
    } catch (const std::bad_alloc& e) {
        o.out_of_memory = true;
        o.what = e.what();
    } catch (const std::exception& e) {
        o.what = e.what();
    }
    return o;
}

}  // namespace

TEST_CASE("CUDA: device out of memory (cuBLAS's too) is a std::bad_alloc naming the call") {
    emu::fail_device_malloc(1);
    try {
        loco::backend::cuda::device_buffer<float> b(16);
        FAIL("the allocation succeeded");
    } catch (const loco::cuda_out_of_memory& e) {
        const std::string what = e.what();
        CHECK(contains(what, "cudaMalloc"));
        CHECK(contains(what, "cudaErrorMemoryAllocation"));
        CHECK(e.code() == cudaErrorMemoryAllocation);
        const std::bad_alloc& as_bad_alloc = e;  // caught as any out of memory
        CHECK(std::string(as_bad_alloc.what()) == what);
    }
    CHECK(emu::device_malloc_failures() == 1);
    // Disarmed after one failure.
    CHECK_NOTHROW(loco::backend::cuda::device_buffer<float>(16));
    // cuBLAS out of memory (its handle, a GEMM's workspace) alike; other cuBLAS failures stay
    // cublas_error.
    CHECK_THROWS_AS(LOCO_CUBLAS_CHECK(CUBLAS_STATUS_ALLOC_FAILED), loco::cuda_out_of_memory);
    CHECK_THROWS_AS(LOCO_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE), loco::cublas_error);
}

TEST_CASE("CUDA: one rank out of device memory before posting a collective is out of step") {
    // Its staging (comm::cuda_staging) cannot allocate the device buffer of a blocking
    // collective. It used to be a cuda_error, recorded as a failed transfer: the rank went on to
    // the agreement's all-reduce while its peers were still in the collective it never posted,
    // and its next sync paired with their abandoned one.
    std::array<outcome, 3> failed_call, next_call;
    const auto expect = [&] {
        CHECK(failed_call[1].out_of_memory);
        CHECK(contains(failed_call[1].what, "cudaErrorMemoryAllocation"));
        CHECK(contains(next_call[1].what, "failure of this rank alone"));
        for (const int r : {0, 2}) {
            CAPTURE(r);
            CHECK_FALSE(failed_call[r].ok);  // their collective never met rank 1's
            CHECK_FALSE(contains(failed_call[r].what, "disagree"));
        }
    };
    SUBCASE("DES-LOC's inner-state average") {
        using gpu_t = loco::cuda::diloco<loco::inner::adamw, loco::outer::sgd, cz::none,
                                         ls::state_periods>;
        loco::comm::run_replicas(
            3,
            [&](loco::comm::cuda_replicas& comm) {
                const int r = comm.rank();
                gpu_params p(init_of("device-oom-state", r));
                gpu_t opt(p.list, comm, {.inner = {.lr = 3e-3f},
                                         .schedule = {.every = 5, .states = {4, 6}},
                                         .stream = comm.stream()});
                for (int t = 1; t <= 3; ++t) {
                    p.set_gradients(grads_of("device-oom-state", r, t), comm.stream());
                    opt.step();
                }
                p.set_gradients(grads_of("device-oom-state", r, 4), comm.stream());
                // Rank 1's first device allocation of 4000 bytes or more: the state average's
                // staging (1050 floats).
                if (r == 1) emu::fail_device_malloc(4000);
                failed_call[r] = run_call([&] { opt.step(); });
                if (r == 1) {
                    CHECK(emu::device_malloc_failures() == 1);
                    next_call[r] = run_call([&] { opt.sync(); });
                }
            },
            milliseconds(1500));
        expect();
    }
    SUBCASE("the two-phase exchange's all-to-all") {
        using gpu_t = loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov,
                                         cz::blockwise<8, 256>>;
        loco::comm::run_replicas(
            3,
            [&](loco::comm::cuda_replicas& comm) {
                const int r = comm.rank();
                gpu_params p(init_of("device-oom-two-phase", r));
                gpu_t opt(p.list, comm, {.inner = {.lr = 3e-3f}, .schedule = {.every = 2},
                                         .exchange = loco::exchange_scheme::two_phase,
                                         .stream = comm.stream()});
                p.set_gradients(grads_of("device-oom-two-phase", r, 1), comm.stream());
                opt.step();
                p.set_gradients(grads_of("device-oom-two-phase", r, 2), comm.stream());
                // The all-to-all's staging: three payloads of about 1054 bytes.
                if (r == 1) emu::fail_device_malloc(1000);
                failed_call[r] = run_call([&] { opt.step(); });
                if (r == 1) {
                    CHECK(emu::device_malloc_failures() == 1);
                    next_call[r] = run_call([&] { opt.step(); });
                }
            },
            milliseconds(1500));
        expect();
    }
}

TEST_CASE("CUDA: a merge buffer out of device memory is a failure the ranks agree on") {
    // Streaming DiLoCo with alpha > 0 keeps the local values for the merge in a device buffer
    // made on first use. It used to be made in apply(), after the ranks agreed to apply: rank 1
    // alone skipped a round its peers applied (its residual moved anyway), and nothing said so
    // until the ranks' round counts parted. Now it is made before the agreement: every rank
    // raises, nothing is applied anywhere, and the next rounds go on in step.
    using gpu_t = loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov,
                                     cz::error_feedback<cz::blockwise<2, 256>>, ls::streaming>;
    std::array<outcome, 3> failed_call;
    std::array<std::vector<float>, 3> global_after, global_last;
    std::array<std::uint64_t, 3> steps_after{}, steps_last{};
    loco::comm::run_replicas(
        3,
        [&](loco::comm::cuda_replicas& comm) {
            const int r = comm.rank();
            gpu_params p(init_of("device-oom-merge", r));
            gpu_t opt(p.list, comm,
                      {.inner = {.lr = 3e-3f},
                       .schedule = {.every = 3, .fragments = 1, .overlap = 1, .alpha = 0.5f},
                       .stream = comm.stream()});
            for (int t = 1; t <= 9; ++t) {
                p.set_gradients(grads_of("device-oom-merge", r, t), comm.stream());
                if (t != 3) {
                    opt.step();
                    continue;
                }
                // Call 3 finishes the first exchange: the merge buffer's first use (1064 floats).
                const std::vector<float> global_before = opt.global();
                const std::vector<float> residual_before = opt.compressor_state(0);
                const std::uint64_t outer_before = opt.outer_steps();
                if (r == 1) emu::fail_device_malloc(4000);
                failed_call[r] = run_call([&] { opt.step(); });
                if (r == 1) CHECK(emu::device_malloc_failures() == 1);
                CHECK(opt.outer_steps() == outer_before);
                CHECK(opt.global() == global_before);
                CHECK(opt.compressor_state(0) == residual_before);
                global_after[r] = opt.global();
                steps_after[r] = opt.outer_steps();
            }
            opt.flush();
            global_last[r] = opt.global();
            steps_last[r] = opt.outer_steps();
        },
        milliseconds(3000));
    for (int r = 0; r < 3; ++r) {
        CAPTURE(r);
        CHECK_FALSE(failed_call[r].ok);
        CHECK(contains(failed_call[r].what, "cudaErrorMemoryAllocation"));
        CHECK(global_after[r] == global_after[0]);
        CHECK(steps_after[r] == steps_after[0]);
        CHECK(global_last[r] == global_last[0]);
        CHECK(steps_last[r] == steps_last[0]);
        CHECK(steps_last[r] > steps_after[r]);  // the run went on
    }
}

TEST_CASE("CUDA: load() out of host memory leaves the handle as it was, or loaded") {
    // Every allocation of load() fails in turn. The handle used to restore fragment by fragment,
    // after the inner state: a failure in the middle left fragment 0 loaded, fragment 1 live and
    // the inner state the checkpoint's.
    using gpu_t = loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov, cz::none,
                                     ls::streaming>;
    loco::comm::run_replicas(1, [&](loco::comm::cuda_replicas& comm) {
        gpu_params p(init_of("load-oom", 0));
        gpu_t opt(p.list, comm,
                  {.inner = {.lr = 3e-3f},
                   .schedule = {.every = 4, .fragments = 2, .overlap = 0, .alpha = 0.0f},
                   .stream = comm.stream()});
        for (int t = 1; t <= 4; ++t) {
            p.set_gradients(grads_of("load-oom", 0, t), comm.stream());
            opt.step();
        }
        const std::string saved = checkpoint_of(opt);
        for (int t = 5; t <= 8; ++t) {
            p.set_gradients(grads_of("load-oom", 0, t), comm.stream());
            opt.step();
        }
        const std::string live = checkpoint_of(opt);
        REQUIRE(live != saved);
        int failures = 0;
        bool loaded = false;
        for (long n = 1; n <= 400 && !loaded; ++n) {
            CAPTURE(n);
            std::istringstream is(saved);
            bool threw = false;
            {
                const failing_allocation arm(n);
                try {
                    opt.load(is);
                } catch (const std::bad_alloc&) {
                    threw = true;
                }
            }
            if (threw) {
                ++failures;
                CHECK(checkpoint_of(opt) == live);
            } else {
                loaded = true;
                CHECK(checkpoint_of(opt) == saved);
            }
        }
        CHECK(loaded);
        CHECK(failures > 10);
    });
}

TEST_CASE("CUDA: comm::nccl out of host memory while starting a collective has posted nothing") {
    // A start that throws must not have posted its collective: the operation that tracks it and
    // its event are made before the call agreement and the enqueue. Made after them, a failed
    // allocation left the collective running with its peers while this rank raised, and the
    // rank's retry paired with its peers' next call. Rank 1 fails its n-th allocation of a start,
    // for every n until the start goes through, and retries after each failure: the retry must
    // meet its peers' call, every rank ending with the same all-reduce (all-gather) result.
    constexpr int m = 3;
    constexpr std::size_t n_floats = 5;
    const auto value = [](int r, std::size_t i) { return float(r + 1) * 0.5f + float(i); };
    for (const bool gather : {false, true}) {
        CAPTURE(gather);
        int failures = 0;
        bool went_through = false;
        for (long n = 1; n <= 200 && !went_through; ++n) {
            CAPTURE(n);
            ncclUniqueId id{};
            REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
            std::array<std::vector<float>, m> got;
            bool threw = false, posted_anyway = false;
            std::mutex mutex;
            std::vector<std::thread> ranks;
            for (int r = 0; r < m; ++r) {
                ranks.emplace_back([&, r] {
                    try {
                        check_cuda(cudaSetDevice(r), "cudaSetDevice");
                        auto comm = loco::comm::nccl::create(m, r, id, nullptr,
                                                             {.timeout = std::chrono::seconds(20)});
                        std::vector<float> mine(n_floats);
                        for (std::size_t i = 0; i < n_floats; ++i) mine[i] = value(r, i);
                        loco::backend::cuda::device_buffer<float> send(n_floats);
                        loco::backend::cuda::device_buffer<float> recv(gather ? m * n_floats
                                                                              : n_floats);
                        send.upload(mine);
                        const auto start = [&] {
                            if (!gather) {
                                return comm->start_all_reduce(
                                    loco::cuda_tensor(send.get(), n_floats),
                                    loco::comm::reduce_op::sum);
                            }
                            return comm->start_all_gather(
                                loco::tensor_view<const std::byte>{
                                    reinterpret_cast<const std::byte*>(send.get()),
                                    n_floats * sizeof(float), 0, 0, loco::memory_space::cuda},
                                loco::cuda_tensor(reinterpret_cast<std::byte*>(recv.get()),
                                                  m * n_floats * sizeof(float)));
                        };
                        std::optional<loco::comm::request> pending;
                        if (r == 1) {
                            const auto control = comm->control_bytes_sent();
                            const auto sent = comm->bytes_sent();
                            bool failed = false;
                            {
                                const failing_allocation arm(n);
                                try {
                                    pending.emplace(start());
                                } catch (const std::bad_alloc&) {
                                    failed = true;
                                }
                            }
                            if (failed) {
                                const bool moved = comm->control_bytes_sent() != control ||
                                                   comm->bytes_sent() != sent;
                                {
                                    const std::lock_guard<std::mutex> lock(mutex);
                                    threw = true;
                                    posted_anyway = moved;
                                }
                                // Its collective met its peers' already: a retry would wait
                                // for ever for theirs.
                                if (moved) return;
                                pending.emplace(start());
                            }
                        } else {
                            pending.emplace(start());
                        }
                        pending->finish();
                        std::vector<float> out = gather ? recv.download() : send.download();
                        const std::lock_guard<std::mutex> lock(mutex);
                        got[std::size_t(r)] = std::move(out);
                    } catch (const std::exception& err) {
                        const std::lock_guard<std::mutex> lock(mutex);
                        FAIL_CHECK("rank " << r << ": " << err.what());
                    }
                });
            }
            for (auto& t : ranks) t.join();
            CHECK_FALSE(posted_anyway);
            if (posted_anyway) break;
            if (threw) ++failures;
            went_through = !threw;
            for (int r = 0; r < m; ++r) {
                CAPTURE(r);
                REQUIRE(got[std::size_t(r)].size() == (gather ? m * n_floats : n_floats));
                for (std::size_t i = 0; i < got[std::size_t(r)].size(); ++i) {
                    const float expected =
                        gather ? value(int(i / n_floats), i % n_floats)
                               : value(0, i) + value(1, i) + value(2, i);
                    CHECK(got[std::size_t(r)][i] == expected);
                }
            }
        }
        CHECK(went_through);
        CHECK(failures >= 2);  // the operation and its event at least
    }
}
