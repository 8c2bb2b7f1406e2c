// Bytes on the link for GPT-2 small (124M parameters) at M = 4 workers: synchronous data
// parallelism, DiLoCo (schedule::every), Streaming DiLoCo (schedule::streaming, P = 4 and 8) and
// streaming with 4-bit pseudo-gradients (compress::blockwise<4, 256>). docs/benchmarks.md shows
// the table and the command.
//
// The 124M rows come from the handle's accessors (bytes_per_sync(), peak_bytes_per_sync(),
// agreement_bytes_per_sync()) on rank 0 of a comm::threads group of 4: a handle can be built
// without communicating, so one rank's handle at a time is enough (four full workers would need
// several GB). The accessors are then checked against the communicator's counted bytes: every
// configuration runs for real, 4 thread workers, on GPT-2's structure at a smaller width and
// vocabulary (the same 148 tensors and fragments), and each rank's bytes_sent() over the run must
// equal the accessors' total. tests/sync_bytes_test.cpp asserts the same against closed forms.
//
// Options: --steps N (inner steps, default 1040), --every H (default 104), --no-check.

#include "gpt2_layout.hpp"

#include <loco/comm/threads.hpp>
#include <loco/loco.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

using loco::schedule::every;
using loco::schedule::streaming;
using four_bit = loco::compress::blockwise<4, 256>;

template <class Compressor, class Schedule>
using handle = loco::diloco<loco::inner::sgd, loco::outer::nesterov, Compressor, Schedule>;

struct row {
    std::string method;
    std::size_t fragments = 0;
    std::uint64_t peak = 0;       // bytes of the largest fragment's sync, agreement included
    std::uint64_t per_round = 0;  // bytes of one sync of every fragment (one period H)
    std::uint64_t agreement = 0;  // of which the all-or-nothing agreement, per fragment
    std::uint64_t total = 0;      // over the run's inner steps
    // Data parallelism has no agreement: the handle that measures it (every, H = 1) sends this
    // many bytes more per step than the row.
    std::uint64_t left_out = 0;
};

struct settings {
    // H = 104, the multiple of 8 (P = 8 needs H = k P) nearest the paper's H = 100; 10 periods.
    std::uint64_t steps = 1040;
    std::uint64_t every = 104;
    bool check = true;
};

// Syncs in `steps` calls of step(): with steps a multiple of H, every fragment's exchange starts
// and finishes steps / H times (streaming applies fragment p at calls (p + 1) H / P mod H and
// starts it tau < H / P calls earlier, so no exchange is left in flight at call steps).
std::uint64_t rounds(const settings& s) { return s.steps / s.every; }

template <class Compressor, class Schedule>
row accessor_row(const std::string& method, const loco::parameter_list& params,
                 loco::comm::communicator& comm, typename Schedule::hyper sched,
                 const loco::fragment_layout& layout, std::uint64_t syncs) {
    typename handle<Compressor, Schedule>::config cfg;
    cfg.schedule = sched;
    cfg.fragments = layout;
    handle<Compressor, Schedule> opt(params, comm, cfg);
    row r{method, opt.fragments(), opt.peak_bytes_per_sync(), opt.bytes_per_sync(),
          opt.agreement_bytes_per_sync(), 0};
    r.total = syncs * r.per_round;
    return r;
}

// Every configuration of the table, for one parameter list and rank.
std::vector<row> table_rows(const loco_bench::gpt2_model& model, loco::comm::communicator& comm,
                            const settings& s) {
    const auto layers = loco_bench::by_transformer_layer(model.shape().layers);
    const loco::fragment_layout automatic{};
    const std::uint64_t h = s.every;
    const auto stream = [&](std::uint64_t p) {
        return streaming::hyper{.every = h, .fragments = p, .overlap = 1, .alpha = 0.5f};
    };
    std::vector<row> rows;
    // Data parallelism: the fp32 mean all-reduce of every gradient at every step (no agreement).
    row dp = accessor_row<loco::compress::none, every>("data parallel (all-reduce every step)",
                                                       model.params(), comm, {.every = 1}, automatic, 1);
    dp.peak -= dp.agreement;
    dp.per_round -= dp.agreement;
    dp.left_out = dp.agreement;
    dp.agreement = 0;
    dp.total = s.steps * dp.per_round;
    rows.push_back(dp);
    rows.push_back(accessor_row<loco::compress::none, every>("DiLoCo (every)", model.params(), comm,
                                                             {.every = h}, automatic, rounds(s)));
    for (const std::uint64_t p : {4u, 8u}) {
        const std::string n = std::to_string(p);
        rows.push_back(accessor_row<loco::compress::none, streaming>(
            "streaming P = " + n + ", by layer", model.params(), comm, stream(p), layers, rounds(s)));
        rows.push_back(accessor_row<loco::compress::none, streaming>(
            "streaming P = " + n + ", automatic", model.params(), comm, stream(p), automatic,
            rounds(s)));
    }
    for (const std::uint64_t p : {4u, 8u}) {
        const std::string n = std::to_string(p);
        rows.push_back(accessor_row<four_bit, streaming>("streaming P = " + n + ", by layer, 4-bit",
                                                         model.params(), comm, stream(p), layers,
                                                         rounds(s)));
        rows.push_back(accessor_row<four_bit, streaming>("streaming P = " + n + ", automatic, 4-bit",
                                                         model.params(), comm, stream(p), automatic,
                                                         rounds(s)));
    }
    rows.push_back(accessor_row<four_bit, every>("DiLoCo (every), 4-bit", model.params(), comm,
                                                 {.every = h}, automatic, rounds(s)));
    return rows;
}

std::string megabytes(std::uint64_t b) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.2f MB", static_cast<double>(b) / 1e6);
    return buf;
}
std::string gigabytes(std::uint64_t b) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.2f GB", static_cast<double>(b) / 1e9);
    return buf;
}

void print_table(const std::vector<row>& rows) {
    const row& diloco = rows[1];
    const row& dp = rows[0];
    std::printf("| method | fragments | peak bytes per sync | bytes per period H | total | peak vs "
                "DiLoCo | total vs data parallel |\n|---|---|---|---|---|---|---|\n");
    for (const row& r : rows) {
        std::printf("| %s | %zu | %s | %s | %s | %.2fx less | %.0fx less |\n", r.method.c_str(),
                    r.fragments, megabytes(r.peak).c_str(), megabytes(r.per_round).c_str(),
                    gigabytes(r.total).c_str(),
                    static_cast<double>(diloco.peak) / static_cast<double>(r.peak),
                    static_cast<double>(dp.total) / static_cast<double>(r.total));
    }
}

// Runs every configuration for real on `shape` with 4 thread workers for s.steps inner steps and
// compares each rank's counted bytes with the accessors. Returns whether all matched.
bool check_against_communicator(const loco_bench::gpt2_shape& shape, const settings& s) {
    struct result {
        int rank;
        std::string method;
        std::uint64_t predicted, measured;
    };
    std::vector<std::vector<result>> per_rank(4);
    std::vector<std::string> methods;
    loco::comm::run_threads(4, [&](loco::comm::threads& comm) {
        loco_bench::gpt2_model model(shape, static_cast<std::uint32_t>(comm.rank()));
        const auto predicted = table_rows(model, comm, s);
        const auto layers = loco_bench::by_transformer_layer(shape.layers);
        const auto run = [&](const row& want, auto tag, auto sched_tag,
                             typename decltype(sched_tag)::type::hyper sched,
                             const loco::fragment_layout& layout, std::uint64_t steps) {
            using C = typename decltype(tag)::type;
            using S = typename decltype(sched_tag)::type;
            typename handle<C, S>::config cfg;
            cfg.schedule = sched;
            cfg.fragments = layout;
            cfg.inner = {.lr = 0.0f};  // the nudges below stand for the inner steps
            handle<C, S> opt(model.params(), comm, cfg);
            opt.start();
            const std::uint64_t before = comm.bytes_sent();
            for (std::uint64_t i = 0; i < steps; ++i) {
                model.nudge(1e-3f);
                opt.step();
            }
            per_rank[static_cast<std::size_t>(comm.rank())].push_back(
                {comm.rank(), want.method, want.total + steps * want.left_out,
                 comm.bytes_sent() - before});
        };
        const std::uint64_t h = s.every;
        const auto stream = [&](std::uint64_t p) {
            return streaming::hyper{.every = h, .fragments = p, .overlap = 1, .alpha = 0.5f};
        };
        const loco::fragment_layout automatic{};
        struct none_t { using type = loco::compress::none; };
        struct four_t { using type = four_bit; };
        struct every_t { using type = every; };
        struct stream_t { using type = streaming; };
        std::size_t k = 0;
        run(predicted[k++], none_t{}, every_t{}, {.every = 1}, automatic, s.steps);
        run(predicted[k++], none_t{}, every_t{}, {.every = h}, automatic, s.steps);
        for (const std::uint64_t p : {4u, 8u}) {
            run(predicted[k++], none_t{}, stream_t{}, stream(p), layers, s.steps);
            run(predicted[k++], none_t{}, stream_t{}, stream(p), automatic, s.steps);
        }
        for (const std::uint64_t p : {4u, 8u}) {
            run(predicted[k++], four_t{}, stream_t{}, stream(p), layers, s.steps);
            run(predicted[k++], four_t{}, stream_t{}, stream(p), automatic, s.steps);
        }
        run(predicted[k++], four_t{}, every_t{}, {.every = h}, automatic, s.steps);
    });
    bool all = true;
    std::printf("| method | rank | accessors | counted by comm::threads | equal |\n|---|---|---|---|---|\n");
    // (The data-parallel run is a handle with H = 1, so its count includes the agreement.)
    for (std::size_t i = 0; i < per_rank[0].size(); ++i) {
        for (const auto& ranks : per_rank) {
            const result& r = ranks[i];
            const bool equal = r.predicted == r.measured;
            all = all && equal;
            std::printf("| %s | %d | %llu | %llu | %s |\n", r.method.c_str(), r.rank,
                        static_cast<unsigned long long>(r.predicted),
                        static_cast<unsigned long long>(r.measured), equal ? "yes" : "NO");
        }
    }
    return all;
}

}  // namespace

int main(int argc, char** argv) {
    settings s;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--steps" && i + 1 < argc) {
            s.steps = std::strtoull(argv[++i], nullptr, 10);
        } else if (a == "--every" && i + 1 < argc) {
            s.every = std::strtoull(argv[++i], nullptr, 10);
        } else if (a == "--no-check") {
            s.check = false;
        } else {
            std::fprintf(stderr, "usage: %s [--steps N] [--every H] [--no-check]\n", argv[0]);
            return 2;
        }
    }
    if (s.every == 0 || s.every % 8 != 0 || s.steps % s.every != 0) {
        std::fprintf(stderr, "bench_sync_bytes: H must be a positive multiple of 8 (P = 4 and 8) "
                             "and --steps a multiple of H\n");
        return 2;
    }

    const loco_bench::gpt2_shape shape = loco_bench::gpt2_small;
    std::printf("GPT-2 small: %zu parameters, %zu tensors; M = 4 workers (comm::threads), rank 0; "
                "H = %llu, %llu inner steps, tau = 1, alpha = 0.5, blockwise<4, 256>\n\n",
                shape.parameters(), std::size_t{2 + 12 * shape.layers + 2},
                static_cast<unsigned long long>(s.every), static_cast<unsigned long long>(s.steps));
    {
        auto group = std::make_shared<loco::comm::thread_group>(4);
        loco::comm::threads rank0(group, 0);  // no collective runs: the accessors only
        loco_bench::gpt2_model model(shape);
        print_table(table_rows(model, rank0, s));
    }
    if (!s.check) return 0;

    // The same structure, small enough to run 4 workers for real.
    const loco_bench::gpt2_shape small{.vocab = 256, .context = 32, .width = 32, .layers = 12};
    settings run = s;
    run.every = 16;
    run.steps = 32;
    std::printf("\nCheck: the same configurations run for real (H = 16, 32 steps) on GPT-2's "
                "structure at vocab %zu, context %zu, width %zu (%zu parameters); bytes each rank "
                "sent after start():\n\n",
                small.vocab, small.context, small.width, small.parameters());
    const bool ok = check_against_communicator(small, run);
    std::printf("\n%s\n", ok ? "accessors == counted bytes on every rank and configuration"
                             : "MISMATCH between the accessors and the counted bytes");
    return ok ? 0 : 1;
}
