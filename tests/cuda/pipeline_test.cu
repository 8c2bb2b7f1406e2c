// The one handle's pipeline on the CUDA backend: every schedule (every, streaming with overlap
// and merge, delayed) gives the host backend's numbers on the same data, the fused device exchange
// and the fp32 all-reduce alike, and with outer Adam's bias correction (an outer step that depends
// on the step count); a checkpoint taken with an exchange in flight resumes bit for bit and moves
// between host and GPU (SparseLoCo's and DeMo's device exchange too); a sync that fails on one
// rank changes nothing on any rank.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"
#include "model.cuh"
#include "schedule_cases.cuh"

#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <mutex>
#include <sstream>
#include <thread>
#include <string>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_pipeline_test {

namespace {

using namespace loco_test;
using namespace loco_test::handles;
namespace ls = loco::schedule;
namespace cz = loco::compress;

using inner = loco::inner::adamw;
using outer = loco::outer::nesterov;

template <class Schedule>
struct schedule_case;
template <>
struct schedule_case<ls::every> : whole_model_every<ls::every, 3> {};
template <>
struct schedule_case<ls::streaming> : two_fragment_streaming {};
template <>
struct schedule_case<ls::delayed> : whole_model_every<ls::delayed, 3> {};

constexpr int steps = 11;

using rank_result = handle_result;

template <class Compressor, class Schedule, class Outer = outer>
rank_result host_rank(const std::string& label, loco::comm::communicator& comm,
                      const typename Outer::hyper& oh = {}) {
    using host_t = loco::diloco<inner, Outer, Compressor, Schedule>;
    host_params m(init_of(label, comm.rank()));
    host_t opt(m.list, comm,
               {.inner = {.lr = 3e-3f}, .outer = oh, .schedule = schedule_case<Schedule>::hyper(),
                .fragments = schedule_case<Schedule>::layout()});
    for (int t = 1; t <= steps; ++t) {
        m.set_gradients(grads_of(label, comm.rank(), t));
        opt.step();
    }
    return result_of(opt, m.values());
}

// The same run with the parameters in GPU memory (of the current device), on a GPU communicator.
template <class Compressor, class Schedule, class Outer = outer>
rank_result gpu_rank(const std::string& label, loco::comm::communicator& comm,
                     cudaStream_t stream, const typename Outer::hyper& oh = {}) {
    using gpu_t = loco::cuda::diloco<inner, Outer, Compressor, Schedule>;
    gpu_params m(init_of(label, comm.rank()));
    gpu_t opt(m.list, comm,
              {.inner = {.lr = 3e-3f}, .outer = oh, .schedule = schedule_case<Schedule>::hyper(),
               .fragments = schedule_case<Schedule>::layout(), .stream = stream});
    for (int t = 1; t <= steps; ++t) {
        m.set_gradients(grads_of(label, comm.rank(), t), stream);
        opt.step();
    }
    return result_of(opt, m.host_values(stream));
}

template <class Compressor, class Schedule, class Outer = outer>
std::vector<rank_result> host_run(const std::string& label, int m,
                                  const typename Outer::hyper& oh = {}) {
    std::vector<rank_result> out(static_cast<std::size_t>(m));
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        out[static_cast<std::size_t>(comm.rank())] =
            host_rank<Compressor, Schedule, Outer>(label, comm, oh);
    });
    return out;
}

template <class Compressor, class Schedule, class Outer = outer>
std::vector<rank_result> replicas_run(const std::string& label, int m,
                                      const typename Outer::hyper& oh = {}) {
    std::vector<rank_result> out(static_cast<std::size_t>(m));
    loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
        out[static_cast<std::size_t>(comm.rank())] =
            gpu_rank<Compressor, Schedule, Outer>(label, comm, comm.stream(), oh);
    });
    return out;
}

void expect_same_run(const std::vector<rank_result>& gpu, const std::vector<rank_result>& host,
                     double tol) {
    REQUIRE(gpu.size() == host.size());
    for (std::size_t r = 0; r < gpu.size(); ++r) {
        CAPTURE(r);
        CHECK(gpu[r].outer_steps == host[r].outer_steps);
        CHECK(host[r].outer_steps > 0);
        expect_close_arrays(gpu[r].params, host[r].params, tol, "parameters");
        expect_close_arrays(gpu[r].global, host[r].global, tol, "global values");
        expect_close_arrays(gpu[r].momentum, host[r].momentum, tol, "outer momentum");
        expect_equal_arrays(gpu[r].global, gpu[0].global, "the ranks' global values");
    }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda backend: each schedule gives the host's numbers (fp32 all-reduce)", S,
                   ls::every, ls::streaming, ls::delayed) {
    const std::string label = std::string("pipeline none ") + std::string(S::name);
    const auto gpu = replicas_run<cz::none, S>(label, 3);
    CHECK_FALSE(gpu[0].device_exchange);
    expect_same_run(gpu, host_run<cz::none, S>(label, 3), 1e-5);
}

TEST_CASE_TEMPLATE("cuda backend: each schedule gives the host's numbers (fused 2-bit + EF)", S,
                   ls::every, ls::streaming, ls::delayed) {
    using ef = cz::error_feedback<cz::blockwise<2, 256>>;
    const std::string label = std::string("pipeline ef ") + std::string(S::name);
    const auto gpu = replicas_run<ef, S>(label, 3);
    CHECK(gpu[0].device_exchange);
    // A pseudo-gradient a rounding away from a code boundary may take the neighbouring code.
    expect_same_run(gpu, host_run<ef, S>(label, 3), 1e-4);
}

// Outer Adam's bias correction depends on the fragment's outer step count, which the device
// handle passes to each outer step: it must count from 1 as the host's does.
TEST_CASE_TEMPLATE("cuda backend: outer adam with bias correction gives the host's numbers", S,
                   ls::every, ls::streaming, ls::delayed) {
    using adam = loco::outer::adam;
    const adam::hyper oh{.lr = 0.1f, .bias_correction = true};
    const std::string label = std::string("pipeline adam ") + std::string(S::name);
    const auto gpu = replicas_run<cz::none, S, adam>(label, 3, oh);
    expect_same_run(gpu, host_run<cz::none, S, adam>(label, 3, oh), 1e-5);
}

TEST_CASE_TEMPLATE("cuda backend: a checkpoint with an exchange in flight resumes bit for bit", C,
                   cz::none, cz::error_feedback<cz::blockwise<2, 256>>, cz::sparseloco, cz::demo) {
    using gpu_t = loco::cuda::diloco<inner, outer, C, ls::streaming>;
    using host_t = loco::diloco<inner, outer, C, ls::streaming>;
    const std::string label = "pipeline resume";
    const inner::hyper ih{.lr = 3e-3f};
    const auto sh = schedule_case<ls::streaming>::hyper();
    const auto layout = schedule_case<ls::streaming>::layout();
    std::vector<std::vector<float>> straight(3), resumed(3), host_resumed(3);
    std::vector<std::string> saved(3);
    std::vector<int> saved_at(3, 0);  // the first call after which an exchange is in flight
    std::vector<std::vector<float>> params_at_save(3);  // the trainer's own checkpoint
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        gpu_params m(init_of(label, comm.rank()));
        gpu_t opt(m.list, comm,
                  {.inner = ih, .schedule = sh, .fragments = layout, .stream = comm.stream()});
        for (int t = 1; t <= steps; ++t) {
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
            if (saved_at[r] == 0 && (opt.in_flight(0) || opt.in_flight(1))) {
                std::ostringstream os;
                opt.save(os);
                saved[r] = os.str();
                saved_at[r] = t;
                params_at_save[r] = m.host_values(comm.stream());
            }
        }
        straight[r] = m.host_values(comm.stream());
    });
    REQUIRE(saved_at[0] > 0);
    CHECK(saved_at == std::vector<int>(3, saved_at[0]));
    const int save_after = saved_at[0];
    // A fresh GPU handle on the parameters as they were at the save.
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        gpu_params m(params_at_save[r]);
        gpu_t opt(m.list, comm,
                  {.inner = ih, .schedule = sh, .fragments = layout, .stream = comm.stream()});
        std::istringstream is(saved[r]);
        opt.load(is);
        for (int t = save_after + 1; t <= steps; ++t) {
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
        }
        resumed[r] = m.host_values(comm.stream());
    });
    // The host handle loads the GPU's checkpoint and goes on to the same numbers.
    loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        host_params m(params_at_save[r]);
        host_t opt(m.list, comm, {.inner = ih, .schedule = sh, .fragments = layout});
        std::istringstream is(saved[r]);
        opt.load(is);
        for (int t = save_after + 1; t <= steps; ++t) {
            m.set_gradients(grads_of(label, comm.rank(), t));
            opt.step();
        }
        host_resumed[r] = m.values();
    });
    for (std::size_t r = 0; r < 3; ++r) {
        CAPTURE(r);
        expect_equal_arrays(resumed[r], straight[r], "resumed GPU run");
        expect_close_arrays(host_resumed[r], straight[r], 1e-4, "host run from the GPU checkpoint");
    }
}

TEST_CASE("cuda backend: a corrupted payload on one rank fails the sync on every rank, nothing "
          "applied, and the next sync succeeds") {
    using ef = cz::error_feedback<cz::blockwise<2, 256>>;
    using gpu_t = loco::cuda::diloco<inner, outer, ef, ls::every>;
    const std::string label = "pipeline corrupt";
    std::vector<int> raised(3, 0);
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& replica) {
        corrupting comm(replica);
        gpu_params m(init_of(label, comm.rank()));
        gpu_t opt(m.list, comm, {.inner = {.lr = 3e-3f}, .schedule = {.every = 2},
                                 .stream = replica.stream()});
        CHECK(opt.device_exchange());
        m.set_gradients(grads_of(label, comm.rank(), 1), replica.stream());
        opt.step();
        const auto params_before = m.host_values(replica.stream());
        const auto global_before = opt.global();
        const auto residual_before = opt.compressor_state();
        const auto momentum_before = opt.outer_state(0);
        m.set_gradients(grads_of(label, comm.rank(), 2), replica.stream());
        // A byte of rank 0's payload body, flipped in what rank 1 receives.
        if (comm.rank() == 1) comm.armed_at = cz::wire::header_bytes + 10;
        try {
            opt.step();
        } catch (const loco::error& e) {
            raised[std::size_t(comm.rank())] = 1;
            const std::string what = e.what();
            CHECK(what.find("failed on rank 1 at the decode stage") != std::string::npos);
            CHECK(what.find("from rank 0: checksum mismatch") != std::string::npos);
        }
        comm.armed_at = 0;
        // The inner step of the failed call stays applied; the sync does not.
        CHECK(opt.outer_steps() == 0);
        expect_equal_arrays(opt.global(), global_before, "global values");
        expect_equal_arrays(opt.compressor_state(), residual_before, "residual");
        expect_equal_arrays(opt.outer_state(0), momentum_before, "outer momentum");
        CHECK(m.host_values(replica.stream()) != params_before);  // the inner step
        opt.sync();
        CHECK(opt.outer_steps() == 1);
    });
    CHECK(raised == std::vector<int>{1, 1, 1});
}

#if defined(LOCO_TEST_NCCL)

// comm::nccl, one rank per GPU (three emulated GPUs in CTest's cuda_emulated; real ones on a
// machine that has them), against the threads communicator.
TEST_CASE_TEMPLATE("cuda backend over nccl: each schedule gives the threads run's numbers", S,
                   ls::every, ls::streaming, ls::delayed) {
    int devices = 0;
    check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    if (devices < 2) {
        MESSAGE("SKIPPED: needs at least 2 GPUs (one NCCL rank per GPU); this machine has "
                << devices);
        return;
    }
    const int m = devices < 3 ? devices : 3;
    const std::string label = std::string("pipeline nccl ") + std::string(S::name);
    using ef = cz::error_feedback<cz::blockwise<2, 256>>;
    std::vector<rank_result> plain(static_cast<std::size_t>(m)), fused(plain.size());
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    ncclUniqueId id2{};
    REQUIRE(ncclGetUniqueId(&id2) == ncclSuccess);
    std::mutex mutex;
    std::vector<std::thread> ranks;
    for (int r = 0; r < m; ++r) {
        ranks.emplace_back([&, r] {
            try {
                check_cuda(cudaSetDevice(r), "cudaSetDevice");
                auto comm = loco::comm::nccl::create(m, r, id, nullptr, {});
                plain[std::size_t(r)] = gpu_rank<cz::none, S>(label, *comm, nullptr);
                auto comm2 = loco::comm::nccl::create(m, r, id2, nullptr, {});
                fused[std::size_t(r)] = gpu_rank<ef, S>(label + " ef", *comm2, nullptr);
            } catch (const std::exception& err) {
                std::lock_guard<std::mutex> lock(mutex);
                FAIL_CHECK("rank " << r << ": " << err.what());
            }
        });
    }
    for (auto& t : ranks) t.join();
    expect_same_run(plain, host_run<cz::none, S>(label, m), 1e-5);
    CHECK(fused[0].device_exchange);
    expect_same_run(fused, host_run<ef, S>(label + " ef", m), 1e-4);
}

#endif  // LOCO_TEST_NCCL

}  // namespace cuda_pipeline_test

namespace cuda_pipeline_test {

TEST_CASE_TEMPLATE("cuda backend: after sync() mid-round, the delayed round's next exchange travels "
                   "and saves", C, cz::none, cz::error_feedback<cz::blockwise<2, 256>>) {
    // Delayed H = 3: round 1's exchange starts at call 3; sync() after call 4 applies it early.
    // Call 6 has nothing left to apply and starts round 2's exchange, which travels: it keeps
    // its pseudo-gradient, so save() takes it (it refused a pseudo-gradient formed inside the
    // encode), and a resumed run is bit for bit the run that went on.
    using gpu_t = loco::cuda::diloco<inner, outer, C, ls::delayed>;
    const std::string label = "pipeline sync mid-round";
    const auto sh = schedule_case<ls::delayed>::hyper();
    std::vector<std::vector<float>> straight(2), resumed(2), params_at_save(2);
    std::vector<std::string> saved(2);
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        gpu_params m(init_of(label, comm.rank()));
        gpu_t opt(m.list, comm, {.inner = {.lr = 3e-3f}, .schedule = sh, .stream = comm.stream()});
        for (int t = 1; t <= steps; ++t) {
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
            if (t == 4) {
                REQUIRE(opt.in_flight(0));
                opt.sync();
                CHECK(opt.outer_steps() == 2);
            }
            if (t == 6) {
                CHECK(opt.outer_steps() == 2);
                CHECK(opt.in_flight(0));
                std::ostringstream os;
                CHECK_NOTHROW(opt.save(os));
                saved[r] = os.str();
                params_at_save[r] = m.host_values(comm.stream());
            }
        }
        straight[r] = m.host_values(comm.stream());
    });
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        gpu_params m(params_at_save[r]);
        gpu_t opt(m.list, comm, {.inner = {.lr = 3e-3f}, .schedule = sh, .stream = comm.stream()});
        std::istringstream is(saved[r]);
        opt.load(is);
        for (int t = 7; t <= steps; ++t) {
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
        }
        resumed[r] = m.host_values(comm.stream());
    });
    for (std::size_t r = 0; r < 2; ++r) {
        CAPTURE(r);
        expect_equal_arrays(resumed[r], straight[r], "resumed GPU run");
    }
}

}  // namespace cuda_pipeline_test
