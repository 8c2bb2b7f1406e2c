#pragma once
// The setup of torchft's DiLoCo regression tests (torchft/diloco_regression_test.py,
// DiLoCoMockedUpdateTest), in loco's terms, for the tests that reproduce their fixtures
// (tests/streaming_test.cpp, tests/torchft_recovery_test.cpp): MockModel with two layers of one
// 1x1 weight each, initially 1; MockOptimizer (p -= lr * grad) as the inner optimizer with lr 1 and
// as each fragment's outer optimizer with lr 2; every gradient 2; sync_every H = 6 over two
// fragments (layer 0, then layer 1), fragment_sync_delay tau, fragment_update_alpha alpha.

#include <loco/loco.hpp>

#include <cstdint>
#include <vector>

namespace loco_test {

using torchft_streaming = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                       loco::schedule::streaming>;

inline torchft_streaming::config torchft_config(std::uint64_t tau, float alpha) {
    torchft_streaming::config cfg;
    cfg.inner = {.lr = 1.0f};
    cfg.outer = {.lr = 2.0f};
    cfg.schedule = {.every = 6, .fragments = 2, .overlap = tau, .alpha = alpha,
                    .pattern = loco::fragment_pattern::sequential};
    cfg.fragments.names = {{"layers.0.weight"}, {"layers.1.weight"}};
    return cfg;
}

// One replica's MockModel: its two weights and their fixed gradients, registered under torchft's
// parameter names. Not copyable: the list points into the vectors.
struct torchft_mock_model {
    std::vector<float> w0{1.0f}, w1{1.0f}, g0{2.0f}, g1{2.0f};
    loco::parameter_list list;

    torchft_mock_model() {
        list.add("layers.0.weight", w0, g0);
        list.add("layers.1.weight", w1, g1);
    }
    torchft_mock_model(const torchft_mock_model&) = delete;
    torchft_mock_model& operator=(const torchft_mock_model&) = delete;
};

}  // namespace loco_test
