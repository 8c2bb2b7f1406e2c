// The per-element rules compiled for the device: each built-in policy's update() runs in a kernel
// over fresh random data and must match the host backend running the same rule (the oracle).
// Differences come only from nvcc contracting a*b+c into fused multiply-adds.
#include <doctest/doctest.h>

#include "../support/compare.hpp"
#include "../support/random.hpp"
#include "device.cuh"

#include <loco/loco.hpp>

#include <string>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_rules_test {

namespace {

using namespace loco_test;

template <class P>
__global__ void apply_rule(loco::scalars_t<P> k, float* x, const float* g, float* state,
                           std::size_t n) {
    const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
    if (i >= n) {
        return;
    }
    constexpr int S = P::state_size;
    float s[S > 0 ? S : 1] = {};
    for (int j = 0; j < S; ++j) {
        s[j] = state[std::size_t(j) * n + i];
    }
    P::update(k, x[i], g[i], s);
    for (int j = 0; j < S; ++j) {
        state[std::size_t(j) * n + i] = s[j];
    }
}

template <class P>
void check_rule_on_device(const typename P::hyper& h, const char* label) {
    INFO("policy: " << label);
    auto rng = rng_for(std::string("device rule/") + label);
    constexpr std::size_t large = 1000003;
    for (const std::size_t n : {std::size_t{1}, std::size_t{3}, large}) {
        CAPTURE(n);
        std::vector<float> x = normal_floats(rng, n);
        std::vector<float> state(std::size_t(P::state_size) * n, 0.0f);
        device_buffer<float> dx(x), dstate(state);
        for (std::uint64_t t = 1; t <= 3; ++t) {
            const auto g = normal_floats(rng, n, 0.5f);
            device_buffer<float> dg(g);
            const auto k = P::prepare(h, t);
            const unsigned blocks = unsigned((n + 255) / 256);
            cudaLaunchConfig_t cfg{};  // (not <<< >>>: the CPU emulator compiles this file too)
            cfg.gridDim = dim3(blocks, 1, 1);
            cfg.blockDim = dim3(256, 1, 1);
            check_cuda(cudaLaunchKernelEx(&cfg, apply_rule<P>, k, dx.get(),
                                          static_cast<const float*>(dg.get()), dstate.get(), n),
                       "kernel launch");
            check_cuda(cudaDeviceSynchronize(), "kernel");
            loco::backend::host::apply<P>(k, x.data(), g.data(), state.data(), n, n);
        }
        const auto gx = dx.to_host();
        const auto gs = dstate.to_host();
        mismatch_log log;
        for (std::size_t i = 0; i < n; ++i) {
            log.expect_close(gx[i], x[i], 1e-5, [&](auto& s) { s << "x[" << i << "]"; });
        }
        for (std::size_t i = 0; i < gs.size(); ++i) {
            log.expect_close(gs[i], state[i], 1e-5, [&](auto& s) { s << "state[" << i << "]"; });
        }
        log.check();
    }
}

}  // namespace

TEST_CASE("inner rules on the device match the host backend") {
    check_rule_on_device<loco::inner::adamw>({.lr = 1e-2f}, "adamw");
    check_rule_on_device<loco::inner::sgd>({.lr = 1e-2f, .momentum = 0.9f, .nesterov = true}, "sgd");
    check_rule_on_device<loco::inner::lion>({.lr = 1e-3f, .weight_decay = 0.1f}, "lion");
}

TEST_CASE("outer rules on the device match the host backend") {
    check_rule_on_device<loco::outer::sgd>({}, "outer sgd");
    check_rule_on_device<loco::outer::nesterov>({}, "outer nesterov");
    check_rule_on_device<loco::outer::adam>({.bias_correction = true}, "outer adam");
}

}  // namespace cuda_rules_test
