// What overlap hides: the wall time of K inner steps of 4 thread workers on comm::threads with an
// emulated link (link_model) so slow that one fragment's exchange takes about one step of
// compute. Streaming DiLoCo with tau = 0 waits for every exchange (compute + transfer); with
// tau = 1 the exchange travels during the next step (about compute time); DiLoCo (every) sends
// the whole model at once, for reference. docs/benchmarks.md shows the table and the command.
//
// Compute is emulated by sleeping a fixed time before each step() (the inner step itself is a
// plain SGD update of a small model), so the numbers measure the schedule and the link, not the
// CPU, and stay meaningful on a loaded 2-core machine. The link's time is slept on each rank's
// progress thread (include/loco/comm/threads.hpp), never on the caller's.
//
// Model: P = 4 tensors of n floats, one per fragment; H = 8, so a fragment syncs every 2 steps.
// Each fragment's exchange is a fp32 mean all-reduce in which every rank sends 4 (n + 2 n / 4) =
// 6 n bytes at M = 4; the link's bandwidth is set so that this takes `ratio` steps of compute.
//
// Options: --steps K (default 32), --step-ms T (default 25), --floats n (per fragment, default
// 65536), --ratio R (transfer / compute per fragment, default 1), --reps N (default 5).

#include <loco/comm/threads.hpp>
#include <loco/loco.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

struct settings {
    std::uint64_t steps = 32;
    double step_ms = 25;
    std::size_t floats = 65536;
    double ratio = 1.0;
    int reps = 5;
};

constexpr int workers = 4;
constexpr std::uint64_t fragments = 4;
constexpr std::uint64_t period = 8;  // H

using streaming_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                 loco::schedule::streaming>;
using every_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                             loco::schedule::every>;

// One run: every rank's wall time from a common start to its last step(); returns the slowest.
template <class Handle>
double run_once(const settings& s, const loco::comm::link_model& link,
                typename Handle::config cfg) {
    std::vector<double> seconds(workers, 0.0);
    loco::comm::run_threads(
        workers,
        [&](loco::comm::threads& comm) {
            std::vector<std::vector<float>> w(fragments), g(fragments);
            loco::parameter_list params;
            for (std::uint64_t f = 0; f < fragments; ++f) {
                w[f].assign(s.floats, 0.01f * static_cast<float>(f + 1));
                g[f].assign(s.floats, 1e-3f * static_cast<float>(comm.rank() + 1));
                params.add("fragment" + std::to_string(f), w[f], g[f]);
            }
            cfg.fragments.names = {};
            if constexpr (std::is_same_v<Handle, streaming_t>) {
                for (std::uint64_t f = 0; f < fragments; ++f) {
                    cfg.fragments.names.push_back({"fragment" + std::to_string(f)});
                }
            }
            Handle opt(params, comm, cfg);
            opt.start();    // fingerprint and broadcast, not timed
            comm.barrier();  // a common start (the link adds no latency: latency 0)
            const auto t0 = std::chrono::steady_clock::now();
            for (std::uint64_t i = 0; i < s.steps; ++i) {
                std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(s.step_ms));
                opt.step();
            }
            seconds[static_cast<std::size_t>(comm.rank())] =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        },
        loco::comm::default_collective_timeout, link);
    return *std::max_element(seconds.begin(), seconds.end());
}

template <class Handle>
double median_of(const settings& s, const loco::comm::link_model& link,
                 const typename Handle::config& cfg) {
    std::vector<double> t;
    for (int r = 0; r < s.reps; ++r) t.push_back(run_once<Handle>(s, link, cfg));
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
    settings s;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const bool has = i + 1 < argc;
        if (a == "--steps" && has) {
            s.steps = std::strtoull(argv[++i], nullptr, 10);
        } else if (a == "--step-ms" && has) {
            s.step_ms = std::strtod(argv[++i], nullptr);
        } else if (a == "--floats" && has) {
            s.floats = std::strtoull(argv[++i], nullptr, 10);
        } else if (a == "--ratio" && has) {
            s.ratio = std::strtod(argv[++i], nullptr);
        } else if (a == "--reps" && has) {
            s.reps = std::atoi(argv[++i]);
        } else {
            std::fprintf(stderr, "usage: %s [--steps K] [--step-ms T] [--floats n] [--ratio R] "
                                 "[--reps N]\n", argv[0]);
            return 2;
        }
    }
    if (s.steps == 0 || s.steps % period != 0 || s.floats == 0 || s.floats % 4 != 0 ||
        !(s.step_ms > 0) || !(s.ratio > 0) || s.reps < 1) {
        std::fprintf(stderr, "bench_overlap_wall: --steps must be a positive multiple of 8, "
                             "--floats a positive multiple of 4, --step-ms, --ratio and --reps "
                             "positive\n");
        return 2;
    }

    const double step = s.step_ms / 1e3;
    const double fragment_bytes = 6.0 * static_cast<double>(s.floats);  // per rank, M = 4
    loco::comm::link_model link;
    link.bytes_per_second = fragment_bytes / (s.ratio * step);
    const double transfer = s.ratio * step;  // one fragment's exchange on the link
    const double compute = static_cast<double>(s.steps) * step;
    const double fragment_syncs = static_cast<double>(s.steps) / (period / fragments);
    const double model_syncs = static_cast<double>(s.steps) / period;

    std::printf("4 thread workers, %llu steps of %.1f ms emulated compute, H = %llu, P = %llu "
                "fragments of %zu floats; link %.2f MB/s, one fragment = %.1f ms on it; median of "
                "%d runs\n\n",
                static_cast<unsigned long long>(s.steps), s.step_ms,
                static_cast<unsigned long long>(period), static_cast<unsigned long long>(fragments),
                s.floats, link.bytes_per_second / 1e6, transfer * 1e3, s.reps);

    streaming_t::config tau0, tau1;
    tau0.schedule = {.every = period, .fragments = fragments, .overlap = 0, .alpha = 0.5f};
    tau1.schedule = {.every = period, .fragments = fragments, .overlap = 1, .alpha = 0.5f};
    every_t::config every;
    every.schedule = {.every = period};

    struct row {
        const char* what;
        double expected, measured;
    };
    const loco::comm::link_model none{};
    std::vector<row> rows{
        {"streaming, tau = 0, no link (compute only)", compute, median_of<streaming_t>(s, none, tau0)},
        {"DiLoCo (every), whole model at once", compute + model_syncs * fragments * transfer,
         median_of<every_t>(s, link, every)},
        {"streaming, tau = 0", compute + fragment_syncs * transfer, median_of<streaming_t>(s, link, tau0)},
        {"streaming, tau = 1", compute, median_of<streaming_t>(s, link, tau1)},
    };
    std::printf("| schedule | expected | measured | measured / compute |\n|---|---|---|---|\n");
    for (const row& r : rows) {
        std::printf("| %s | %.3f s | %.3f s | %.2f |\n", r.what, r.expected, r.measured,
                    r.measured / compute);
    }
    return 0;
}
