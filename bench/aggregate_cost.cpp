// Host cost of the aggregation rules per parameter at M = 4, 8, 16 workers: the rule alone, on
// every worker's decoded delta (what each rank runs after the all-gather), next to the mean over
// the same gathered deltas. Bytes per sync against the mean are in docs/aggregation.md.
//   ./build/bench/bench/bench_aggregate --benchmark_counters_tabular=true
#include <loco/aggregate/edit.hpp>
#include <loco/aggregate/mean.hpp>
#include <loco/aggregate/robust.hpp>

#include <benchmark/benchmark.h>

#include <cmath>
#include <random>
#include <vector>

namespace {

constexpr std::size_t elements = 1 << 16;  // one fragment; the rules are linear in it

struct inputs {
    std::vector<float> deltas;
    std::vector<loco::aggregate::worker_report> reports;
    loco::aggregate::contributions view(std::size_t m) const {
        return {m, elements, reports, deltas};
    }
};

inputs make(std::size_t m) {
    std::mt19937 rng(7);
    std::normal_distribution<float> dist;
    inputs in;
    in.deltas.resize(m * elements);
    for (auto& x : in.deltas) x = dist(rng);
    for (std::size_t k = 0; k < m; ++k) {
        double sq = 0.0;
        for (std::size_t i = 0; i < elements; ++i) sq += double(in.deltas[k * elements + i]) * in.deltas[k * elements + i];
        in.reports.push_back({static_cast<float>(std::sqrt(sq)), 100.0f});
    }
    return in;
}

template <class A>
void aggregate_cost(benchmark::State& state) {
    const auto m = static_cast<std::size_t>(state.range(0));
    const inputs in = make(m);
    typename A::hyper h{};
    if constexpr (requires { h.trim; }) h.trim = m / 4;
    loco::aggregate::state_t<A> s{};
    std::vector<float> out(elements);
    for (auto _ : state) {
        loco::aggregate::combine<A>(h, s, in.view(m), out);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    state.counters["ns_per_param"] = benchmark::Counter(
        state.iterations() * double(elements), benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

}  // namespace

BENCHMARK(aggregate_cost<loco::aggregate::mean>)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kMicrosecond);
BENCHMARK(aggregate_cost<loco::aggregate::edit>)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kMicrosecond);
BENCHMARK(aggregate_cost<loco::aggregate::trimmed_mean>)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kMicrosecond);
BENCHMARK(aggregate_cost<loco::aggregate::median>)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kMicrosecond);
BENCHMARK(aggregate_cost<loco::aggregate::centered_clip>)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kMicrosecond);
BENCHMARK_MAIN();
