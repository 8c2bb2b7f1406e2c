// Host backend inner step throughput (the no-GPU path), in bytes of minimum traffic per second
// of wall time (GB/s, 1e9 bytes: the `GBps` counter), next to a plain copy of the same number of
// bytes measured in the same run:
//   ./build/bench/bench/bench_host_inner --benchmark_counters_tabular=true
// Minimum traffic per element: read param, grad and each state float; write param and state.
// SGD runs with momentum (0.9, Nesterov, as bench/cuda/kernels.cu): without it the step reads no
// state, and its 12 bytes would have been counted as 20.
#include <loco/loco.hpp>

#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

namespace {

std::vector<float> random_floats(std::size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist;
    std::vector<float> v(n);
    for (auto& x : v) {
        x = dist(rng);
    }
    return v;
}

// Google Benchmark's own bytes_per_second is per CPU second and in 2^30 units: this counter is
// per wall second (UseRealTime below) and in 1e9.
void count_bytes(benchmark::State& state, std::size_t bytes_per_iteration) {
    state.counters["GBps"] = benchmark::Counter(static_cast<double>(bytes_per_iteration) / 1e9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

template <class Inner>
typename Inner::hyper bench_hyper() {
    if constexpr (std::is_same_v<Inner, loco::inner::sgd>) {
        return {.lr = 1e-3f, .momentum = 0.9f, .nesterov = true};
    } else {
        return {};
    }
}

template <class Inner>
void inner_step(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    auto value = random_floats(n, 1);
    const auto grad = random_floats(n, 2);
    loco::parameter_list list;
    list.add("p", value, grad);
    loco::optimizer<Inner> opt(
        list, {.inner = bench_hyper<Inner>(), .on_nonfinite = loco::nonfinite_policy::ignore});
    for (auto _ : state) {
        opt.step();
        benchmark::DoNotOptimize(value.data());
        benchmark::ClobberMemory();
    }
    count_bytes(state, n * 4 * (3 + 2 * std::size_t(Inner::state_size)));
}

// A copy of the AdamW step's traffic (28 bytes per element: 14 read, 14 written).
void copy_baseline(benchmark::State& state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    const auto src = random_floats(n * 7 / 2, 3);
    std::vector<float> dst(src.size());
    for (auto _ : state) {
        std::memcpy(dst.data(), src.data(), src.size() * sizeof(float));
        benchmark::DoNotOptimize(dst.data());
        benchmark::ClobberMemory();
    }
    count_bytes(state, 2 * src.size() * sizeof(float));
}

}  // namespace

// 2^25 elements: AdamW's working set (940 MB) is far larger than any CPU cache.
BENCHMARK(copy_baseline)->Arg(1 << 25)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(inner_step<loco::inner::adamw>)->Arg(1 << 25)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(inner_step<loco::inner::sgd>)->Arg(1 << 25)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(inner_step<loco::inner::lion>)->Arg(1 << 25)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
