// schedule::state_periods (DES-LOC) on the CUDA backend: three GPU workers give the host
// backend's numbers on the same data (parameters, AdamW's m and v; within fp32 rounding, nvcc
// contracts multiply-adds), the state syncs leave m and v bit-identical on every rank, and the
// bytes per state sync are the host's. tests/desloc_test.cpp checks the host backend against a
// double-precision DES-LOC.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"
#include "model.cuh"

#include <loco/cuda.hpp>
#include <loco/schedule/state_periods.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_desloc_test {

namespace {

using namespace loco_test;
using namespace loco_test::handles;

using periods = loco::schedule::state_periods;
constexpr int desloc_steps = 12;
// Parameters after calls 5, 10; m after 4, 8, 12 and v after 6, 12: both end averaged.
const periods::hyper desloc_hyper{.every = 5, .states = {4, 6}};

struct desloc_result {
    std::vector<float> params, m, v;
    std::uint64_t state_bytes = 0, bytes = 0;
};

}  // namespace

TEST_CASE("cuda backend: state_periods (DES-LOC) gives the host's numbers") {
    const std::string label = "cuda desloc";
    constexpr int m = 3;
    const loco::inner::adamw::hyper inner{.lr = 3e-3f};
    std::vector<desloc_result> host(m), gpu(m);
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        using host_t = loco::diloco<loco::inner::adamw, loco::outer::sgd, loco::compress::none,
                                    periods>;
        host_params p(init_of(label, comm.rank()));
        host_t opt(p.list, comm, {.inner = inner, .schedule = desloc_hyper});
        for (int t = 1; t <= desloc_steps; ++t) {
            p.set_gradients(grads_of(label, comm.rank(), t));
            opt.step();
        }
        auto& out = host[static_cast<std::size_t>(comm.rank())];
        out.params = p.values();
        const auto mm = opt.inner_state(0), vv = opt.inner_state(1);
        out.m.assign(mm.begin(), mm.end());
        out.v.assign(vv.begin(), vv.end());
        out.state_bytes = opt.bytes_per_state_sync(1);
        out.bytes = opt.bytes_per_sync();
    });
    loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
        using gpu_t = loco::cuda::diloco<loco::inner::adamw, loco::outer::sgd,
                                         loco::compress::none, periods>;
        gpu_params p(init_of(label, comm.rank()));
        gpu_t opt(p.list, comm, {.inner = inner, .schedule = desloc_hyper, .stream = comm.stream()});
        for (int t = 1; t <= desloc_steps; ++t) {
            p.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
        }
        auto& out = gpu[static_cast<std::size_t>(comm.rank())];
        out.params = p.host_values(comm.stream());
        out.m = opt.inner_state(0);
        out.v = opt.inner_state(1);
        out.state_bytes = opt.bytes_per_state_sync(1);
        out.bytes = opt.bytes_per_sync();
    });
    for (std::size_t r = 0; r < m; ++r) {
        CAPTURE(r);
        expect_close_arrays(gpu[r].params, host[r].params, 1e-5, "parameters");
        expect_close_arrays(gpu[r].m, host[r].m, 1e-5, "first moments");
        expect_close_arrays(gpu[r].v, host[r].v, 1e-5, "second moments");
        expect_equal_arrays(gpu[r].m, gpu[0].m, "the ranks' first moments");
        expect_equal_arrays(gpu[r].v, gpu[0].v, "the ranks' second moments");
        CHECK(gpu[r].state_bytes == host[r].state_bytes);
        CHECK(host[r].state_bytes > 0);
    }
    // The parameters last synced at call 10 and drifted since: the state syncs, not a parameter
    // sync, made the moments equal.
    CHECK(gpu[0].params != gpu[1].params);
}

}  // namespace cuda_desloc_test
