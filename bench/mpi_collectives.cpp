// comm::mpi against comm::threads: the fp32 all-reduce and a 2-bit DiLoCo sync (statistical<2>
// with error feedback) at 1 M, 16 M and 124 M floats, nccl-tests style (docs/benchmarks.md).
//
//   mpirun -np 4 bench_mpi_collectives      the MPI rows: one rank per process
//   bench_mpi_collectives --threads 4       the threads rows: one rank per thread, one process
//
// A plain timed program, not Google Benchmark: every repetition starts at a barrier, its time is
// the slowest rank's, and the table gives the median over the repetitions (for an even count,
// the upper of the two middle times, so that it is always a time that was measured). Columns:
//   algbw  bytes of the fp32 tensor (4n) per second of the collective, in MB/s;
//   busbw  bytes each rank sent per second, in MB/s: for the all-reduce algbw * 2 (M-1)/M
//          (nccl-tests' bus bandwidth, the ring volume), for the sync its (M-1) * payload bytes
//          per second.
// Options (positive whole numbers, else the usage message and exit status 2): --sizes 1,16,124
// (millions of floats), --reps R (repetitions per size; default 10, 3 and 3 for the all-reduce,
// 5, 3 and 2 for the sync), --threads M.

#include <loco/comm/mpi.hpp>
#include <loco/comm/threads.hpp>
#include <loco/loco.hpp>

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

struct settings {
    std::vector<std::size_t> millions{1, 16, 124};
    int reps = 0;  // 0: the defaults per size
    int threads = 0;
};

struct row {
    std::string what;
    std::size_t n = 0;
    int reps = 0;
    double seconds = 0;        // median over repetitions of the slowest rank's time
    std::uint64_t sent = 0;    // bytes rank 0 sends in one repetition
};

// The slowest rank's time of fn, for each repetition, then their median: the middle time, or for
// an even count the upper of the two middle ones (the published tables were measured so). Every
// rank returns it.
double median_time(loco::comm::communicator& comm, int reps, const std::function<void()>& fn) {
    const auto m = static_cast<std::size_t>(comm.size());
    std::vector<double> times;
    for (int rep = 0; rep < reps; ++rep) {
        comm.barrier();
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        const double mine = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::vector<double> all(m);
        const loco::tensor_view<const std::byte> send{reinterpret_cast<const std::byte*>(&mine),
                                                      sizeof mine, 0, 0, loco::memory_space::host};
        const loco::tensor_view<std::byte> recv{reinterpret_cast<std::byte*>(all.data()),
                                                m * sizeof(double), 0, 0, loco::memory_space::host};
        comm.all_gather(send, recv);
        times.push_back(*std::max_element(all.begin(), all.end()));
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

int reps_for(const settings& s, std::size_t millions, bool sync) {
    if (s.reps > 0) {
        return s.reps;
    }
    if (millions <= 1) {
        return sync ? 5 : 10;
    }
    if (millions <= 16) {
        return 3;
    }
    return sync ? 2 : 3;
}

std::vector<row> run_suite(loco::comm::communicator& comm, const settings& s) {
    std::vector<row> rows;
    for (const std::size_t mil : s.millions) {
        const std::size_t n = mil * 1000000;
        {
            std::vector<float> x(n);
            for (std::size_t i = 0; i < n; ++i) {
                x[i] = static_cast<float>((i * 2654435761u + static_cast<std::size_t>(comm.rank())) % 1000) * 1e-3f;
            }
            const auto view = loco::host_tensor(x.data(), n);
            const std::uint64_t before = comm.bytes_sent();
            comm.all_reduce(view, loco::comm::reduce_op::mean);  // warm-up: pages, connections
            const std::uint64_t sent = comm.bytes_sent() - before;
            const int reps = reps_for(s, mil, false);
            const double t = median_time(comm, reps, [&] {
                comm.all_reduce(view, loco::comm::reduce_op::mean);
            });
            rows.push_back({"all_reduce fp32", n, reps, t, sent});
        }
        {
            // One parameter of n floats; inner SGD without state, zero gradients: the sync's work
            // does not depend on the values.
            std::vector<float> w(n), grad(n, 0.0f);
            for (std::size_t i = 0; i < n; ++i) {
                w[i] = static_cast<float>((i * 40503u + static_cast<std::size_t>(comm.rank()) * 7u) % 997) * 1e-3f;
            }
            loco::parameter_list params;
            params.add("w", w, grad);
            using two_bit = loco::compress::error_feedback<loco::compress::statistical<2>>;
            loco::diloco<loco::inner::sgd, loco::outer::nesterov, two_bit> opt(
                params, comm, {.broadcast_initial = false});
            opt.start();
            const int reps = reps_for(s, mil, true);
            const double t = median_time(comm, reps, [&] {
                for (std::size_t i = 0; i < n; i += 4096) {
                    w[i] += 1e-3f;  // a pseudo-gradient that is not all zeros
                }
                opt.sync();
            });
            rows.push_back({"2-bit sync", n, reps, t, opt.bytes_per_sync()});
        }
    }
    return rows;
}

void print(const char* transport, int m, const std::vector<row>& rows) {
    for (const auto& r : rows) {
        const double bytes = 4.0 * static_cast<double>(r.n);
        // MB/s with two decimals: the sync's rows are a few MB/s (0.00 in GB/s).
        const double algbw = bytes / r.seconds / 1e6;
        const double busbw = static_cast<double>(r.sent) / r.seconds / 1e6;
        std::printf("| %-7s | %d | %-15s | %5.0f M | %9.2f | %9.2f | %9.2f | %12llu | %d |\n",
                    transport, m, r.what.c_str(), static_cast<double>(r.n) / 1e6,
                    r.seconds * 1e3, algbw, busbw, static_cast<unsigned long long>(r.sent), r.reps);
    }
    std::fflush(stdout);
}

void header() {
    std::printf("| comm | ranks | operation | floats | time (ms) | algbw (MB/s) | busbw (MB/s) | "
                "bytes sent by rank 0 | reps |\n|---|---|---|---|---|---|---|---|---|\n");
}

// `text` as a positive int of at most 6 digits, or 0 when it is anything else ("", "-1", "4x").
int positive(const char* text) {
    const std::string s = text;
    if (s.empty() || s.size() > 6 || s.find_first_not_of("0123456789") != std::string::npos) {
        return 0;
    }
    return std::stoi(s);
}

}  // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    settings s;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if ((a == "--threads" || a == "--reps") && i + 1 < argc) {
            // atoi read "0", "-2" and "4x" as 0, -2 and 4: --threads 0 silently ran the MPI rows.
            const int value = positive(argv[++i]);
            if (value == 0) {
                std::fprintf(stderr, "%s: %s takes a positive whole number, got \"%s\"\n", argv[0],
                             a.c_str(), argv[i]);
                MPI_Finalize();
                return 2;
            }
            (a == "--threads" ? s.threads : s.reps) = value;
        } else if (a == "--sizes" && i + 1 < argc) {
            // Positive whole numbers of millions, comma-separated; anything else is the usage
            // message (std::stoul threw past main's handler on "1," and accepted "0").
            s.millions.clear();
            const std::string list = argv[++i];
            bool ok = !list.empty();
            for (std::size_t pos = 0; ok && pos <= list.size();) {
                const std::size_t comma = std::min(list.find(',', pos), list.size());
                const std::string item = list.substr(pos, comma - pos);
                ok = !item.empty() && item.size() <= 6 &&
                     item.find_first_not_of("0123456789") == std::string::npos &&
                     std::stoul(item) > 0;
                if (ok) s.millions.push_back(std::stoul(item));
                pos = comma + 1;
            }
            if (!ok) {
                std::fprintf(stderr, "%s: --sizes takes positive numbers of millions, e.g. 1,16,124\n",
                             argv[0]);
                MPI_Finalize();
                return 2;
            }
        } else {
            std::fprintf(stderr, "usage: %s [--threads M] [--sizes 1,16,124] [--reps R]\n", argv[0]);
            MPI_Finalize();
            return 2;
        }
    }
    int world = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    int status = 0;
    try {
        if (s.threads > 0) {
            if (world != 1) {
                throw loco::invalid_argument("--threads runs in one process: start it without mpirun");
            }
            std::vector<row> rows;
            loco::comm::run_threads(s.threads, [&](loco::comm::communicator& comm) {
                auto mine = run_suite(comm, s);
                if (comm.rank() == 0) {
                    rows = std::move(mine);
                }
            });
            header();
            print("threads", s.threads, rows);
        } else {
            loco::comm::mpi comm(MPI_COMM_WORLD);
            const auto rows = run_suite(comm, s);
            if (comm.rank() == 0) {
                header();
                print("mpi", comm.size(), rows);
            }
        }
    } catch (const loco::error& e) {
        std::fprintf(stderr, "bench_mpi_collectives: %s\n", e.what());
        status = 1;
        if (world > 1) {
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
    MPI_Finalize();
    return status;
}
