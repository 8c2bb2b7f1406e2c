#pragma once
// Schedule settings the CUDA handle tests run loco::cuda::diloco and loco::diloco under, defined
// once so the tests that compare the two backends under streaming run the same fragments. A test
// maps each schedule it runs to one of these (aggregate_test.cu, pipeline_test.cu):
//   template <> struct schedule_case<ls::streaming> : loco_test::two_fragment_streaming {};
#include <loco/fragments.hpp>
#include <loco/schedule/streaming.hpp>

#include <cstdint>

namespace loco_test {

// A whole-model schedule (schedule::every, schedule::delayed) syncing every H steps.
template <class Schedule, std::uint64_t H>
struct whole_model_every {
    static typename Schedule::hyper hyper() { return {.every = H}; }
    static loco::fragment_layout layout() { return {}; }
};

// Two fragments named by the user ({a, c} and {b}), every 4 steps, each exchange in flight over
// one inner step (overlap 1), merged with alpha 0.5.
struct two_fragment_streaming {
    static loco::schedule::streaming::hyper hyper() {
        return {.every = 4, .fragments = 2, .overlap = 1, .alpha = 0.5f};
    }
    static loco::fragment_layout layout() {
        loco::fragment_layout l;
        l.names = {{"a", "c"}, {"b"}};
        return l;
    }
};

}  // namespace loco_test
