// What the CUDA benchmark programs (bench/cuda/kernels.cu, bench/cuda/muon.cu) share: random
// device data, the event-timed loop, the smoke mode and the program's main.
//
// Smoke mode (LOCO_BENCH_SMOKE=1 in the environment): every row runs on small stand-ins of its
// parameter lists for two iterations, so that the whole program runs in seconds; the figures then
// mean nothing, and the summary says so. CTest runs both programs that way on the CPU emulator,
// through bench/run_gpu.sh (bench.run_gpu_smoke in tests/CMakeLists.txt), so a row that throws,
// refuses its data or fails its own checks fails the suite instead of a lent GPU's minutes.
// A row that fails calls skip(), which Google Benchmark reports as an error; the program then
// exits with 1 after its summary.
#pragma once

#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/random.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace loco_bench {

namespace lc = loco::backend::cuda;

// LOCO_BENCH_SMOKE set to anything but "" or "0".
inline bool smoke() {
    static const bool on = [] {
        const char* v = std::getenv("LOCO_BENCH_SMOKE");
        return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
    }();
    return on;
}

// Timed iterations of a row: `full` on a GPU, 2 in smoke mode.
inline int iterations(int full) { return smoke() ? 2 : full; }

inline std::atomic<int>& failed_rows() {
    static std::atomic<int> n{0};
    return n;
}

// Reports a failed row (Google Benchmark shows it as an error) and counts it for the exit status.
inline void skip(benchmark::State& state, const std::string& why) {
    ++failed_rows();
    state.SkipWithError(why.c_str());  // Debian 12's Google Benchmark 1.7 takes a const char*
}

// Uniform random values in [lo, hi) from a counter-based hash: independent of the launch shape.
template <class T>
__global__ void fill_kernel(T* p, std::size_t n, std::uint64_t seed, float lo, float hi) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
         i += std::size_t{gridDim.x} * blockDim.x) {
        const float u = loco::random::uniform(seed, 0, i);
        p[i] = lc::detail::narrow<T>(lo + (hi - lo) * u);
    }
}

// On the legacy stream: callers synchronise the device before they time anything.
template <class T>
void fill(T* p, std::size_t n, std::uint64_t seed, float lo, float hi) {
    if (n != 0) {
        LOCO_CUDA_CHECK(lc::detail::launch(fill_kernel<T>, smoke() ? 16 : 1024, nullptr, p, n,
                                           seed, lo, hi));
    }
}

// Runs fn `warmup` times, then once per benchmark iteration between two events on `s`; returns
// the median time in ms and reports each iteration's time to the benchmark (manual time).
template <class Fn>
double timed_loop(benchmark::State& state, Fn&& fn, cudaStream_t s, int warmup = 3) {
    lc::event start(cudaEventDefault), stop(cudaEventDefault);
    for (int i = 0; i < (smoke() ? 1 : warmup); ++i) {
        fn();
    }
    LOCO_CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<double> times;
    for (auto _ : state) {
        start.record(s);
        fn();
        stop.record(s);
        LOCO_CUDA_CHECK(cudaEventSynchronize(stop.get()));
        float ms = 0.0f;
        LOCO_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
        state.SetIterationTime(double(ms) * 1e-3);
        times.push_back(ms);
    }
    std::sort(times.begin(), times.end());
    return times.empty() ? 0.0 : times[times.size() / 2];
}

// main() of a benchmark program: 77 without a device, the device's name, the registered rows,
// then the summary on stdout and (appended when `append`) to the file LOCO_BENCH_SUMMARY names.
// Exit status 1 when a row failed.
template <class Register, class Summary>
int run_main(int argc, char** argv, const char* program, Register&& register_all,
             Summary&& print_summary, bool append) {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::printf("%s: no usable CUDA device; nothing to measure\n", program);
        return 77;
    }
    cudaDeviceProp prop{};
    LOCO_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs, %.1f GiB%s\n", prop.name, prop.multiProcessorCount,
                double(prop.totalGlobalMem) / double(1 << 30),
                smoke() ? " (smoke mode: small stand-in sizes, the figures mean nothing)" : "");
    register_all();
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
        return 1;
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    if (smoke()) {
        std::printf("\n(smoke mode: stand-in sizes and two iterations; not measurements)");
    }
    print_summary(stdout);
    if (const char* path = std::getenv("LOCO_BENCH_SUMMARY")) {
        if (std::FILE* f = std::fopen(path, append ? "a" : "w")) {
            print_summary(f);
            std::fclose(f);
        }
    }
    if (const int n = failed_rows(); n != 0) {
        std::printf("%s: %d row%s failed (see the errors above)\n", program, n, n == 1 ? "" : "s");
        return 1;
    }
    return 0;
}

}  // namespace loco_bench
