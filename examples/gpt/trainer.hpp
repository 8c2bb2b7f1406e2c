#pragma once
// The training loop. M workers (threads talking only through loco::comm::threads) each build the
// same model from the same seed, draw windows from their own shard of the training text, and hand
// every gradient to their update rule (rules.hpp). Worker 0 also measures the validation loss of
// the global parameters and prints a progress line every --log-every steps and every
// --eval-every steps (with the validation loss), and one at the end:
//
//   step  200/1000  train 2.1234  val 2.2345  tok/s 4321  sent 12.34 MB  eta 3m05s
//
// train: worker 0's mean loss since the previous line; val: on the held-out windows, every
// --eval-every steps (and at the end, after the last sync); tok/s: tokens all workers trained on
// per second of wall time, validation time excluded; sent: bytes worker 0 sent, as counted by its
// communicator (the initial broadcast included).

#include "data.hpp"
#include "model.hpp"
#include "options.hpp"
#include "rules.hpp"

#include <loco/loco.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numbers>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace gpt {

struct progress_row {
    std::uint64_t step = 0;
    double train_loss = std::numeric_limits<double>::quiet_NaN();  // NaN: no step yet
    double val_loss = std::numeric_limits<double>::quiet_NaN();    // NaN: not measured
    std::uint64_t tokens = 0;                                      // trained on, all workers
    std::uint64_t bytes_sent = 0;                                  // by worker 0
    double seconds = 0.0;                                          // of training, eval excluded
};

struct run_result {
    std::vector<progress_row> rows;
    double final_val_loss = 0.0;
    double bytes_per_worker = 0.0;  // mean over the workers
    std::uint64_t syncs = 0;
    double tokens_per_second = 0.0;
    double seconds = 0.0;
};

// The counts a run needs at least one of; run.hpp checks them before anything is loaded.
inline void check_counts(const options& o) {
    if (o.workers < 1) {
        throw loco::invalid_argument("gpt: --workers must be at least 1");
    }
    if (o.steps < 1 || o.batch < 1 || o.log_every < 1 || o.eval_every < 1 ||
        o.eval_sequences < 1) {
        throw loco::invalid_argument(
            "gpt: --steps, --batch, --log-every, --eval-every and --eval-sequences must be at "
            "least 1");
    }
}

// The warm-up steps: --warmup, or min(100, steps / 10) when it is not given (0: none).
inline std::uint64_t warmup_steps(const options& o) {
    return o.warmup ? *o.warmup : std::min<std::uint64_t>(100, o.steps / 10);
}

// The peak learning rate's multiplier at step (from 1): linear warm-up, then cosine decay to
// final_lr_fraction of the peak.
inline float lr_factor(const options& o, std::uint64_t step) {
    const std::uint64_t warmup = warmup_steps(o);
    if (step <= warmup) {
        return static_cast<float>(step) / static_cast<float>(warmup);
    }
    const double progress = static_cast<double>(step - warmup) /
                            static_cast<double>(std::max<std::uint64_t>(1, o.steps - warmup));
    const double f = o.final_lr_fraction;
    return static_cast<float>(f + (1.0 - f) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
}

// Mean loss of `params` on the validation windows, `batch` windows at a time.
inline double evaluate(model<float>& m, std::span<const float> params,
                       const std::vector<std::uint8_t>& tokens,
                       const std::vector<std::uint8_t>& targets, std::size_t batch) {
    const std::size_t t_len = m.shape().config().context;
    const std::size_t count = tokens.size() / t_len;
    double total = 0.0;
    for (std::size_t first = 0; first < count; first += batch) {
        const std::size_t n = std::min(batch, count - first);
        total += m.forward(params.data(), tokens.data() + first * t_len,
                           targets.data() + first * t_len, n, false) *
                 static_cast<double>(n);
    }
    return total / static_cast<double>(count);
}

inline std::string format_duration(double seconds) {
    const auto s = static_cast<long long>(std::max(0.0, seconds) + 0.5);
    char buf[32];
    if (s >= 3600) {
        std::snprintf(buf, sizeof buf, "%lldh%02lldm", s / 3600, (s / 60) % 60);
    } else {
        std::snprintf(buf, sizeof buf, "%lldm%02llds", s / 60, s % 60);
    }
    return buf;
}

inline void print_row(std::FILE* out, const progress_row& r, const options& o,
                      const corpus& data) {
    std::fprintf(out, "step %6llu/%llu", static_cast<unsigned long long>(r.step),
                 static_cast<unsigned long long>(o.steps));
    if (std::isnan(r.train_loss)) {
        std::fprintf(out, "  train    -  ");
    } else {
        std::fprintf(out, "  train %.4f", r.train_loss);
    }
    if (std::isnan(r.val_loss)) {
        std::fprintf(out, "  val    -  ");
    } else {
        std::fprintf(out, "  val %.4f", r.val_loss);
        if (data.entropy_floor) {
            std::fprintf(out, " (floor +%.4f)", r.val_loss - *data.entropy_floor);
        }
    }
    const double rate = r.seconds > 0 ? static_cast<double>(r.tokens) / r.seconds : 0.0;
    const double eta = r.step > 0 ? r.seconds / static_cast<double>(r.step) *
                                        static_cast<double>(o.steps - r.step)
                                  : 0.0;
    std::fprintf(out, "  tok/s %7.0f  sent %9.3f MB  eta %s\n", rate,
                 static_cast<double>(r.bytes_sent) / 1e6, format_duration(eta).c_str());
    std::fflush(out);
}

// Trains as the options say, each worker updating through the rule make_rule gives it
// (make_rule_factory(o)), and returns worker 0's progress rows and the final figures. `out`
// receives the progress lines (none when null or o.quiet). Throws what a worker threw.
inline run_result train(const options& o, const corpus& data, const rule_factory& make_rule,
                        std::FILE* out) {
    const layout lay(o.model);
    check_activations(o.model, std::max(o.batch, o.eval_sequences));
    check_memory(o.model, o.batch, static_cast<std::size_t>(std::max(o.workers, 1)),
                 host_memory_bytes());
    check_counts(o);
    for (int r = 0; r < o.workers; ++r) {
        check_fits(shard(data, r, o.workers), o.model.context,
                   "each of the " + std::to_string(o.workers) + " training shards");
    }
    check_fits(data.validation, o.model.context, "the validation split");
    std::vector<std::uint8_t> val_tokens, val_targets;
    validation_windows(data.validation, o.model.context, o.eval_sequences, val_tokens, val_targets);
    if (o.quiet) out = nullptr;

    run_result result;
    std::vector<std::uint64_t> bytes(static_cast<std::size_t>(o.workers), 0);
    const std::uint64_t tokens_per_step =
        static_cast<std::uint64_t>(o.workers) * o.batch * o.model.context;
    using clock = std::chrono::steady_clock;

    loco::comm::run_threads(o.workers, [&](loco::comm::threads& comm) {
        const int rank = comm.rank();
        std::vector<float> params(lay.total()), grads(lay.total(), 0.0f);
        initialise<float>(lay, params, o.seed);
        worker_state w{params.data(), grads.data(), lay.total(),
                       register_parameters(lay, params.data(), grads.data())};
        const std::unique_ptr<update_rule> rule = make_rule(comm, w);
        rule->start();

        model<float> m(lay);  // also measures validation, between steps
        window_sampler sampler(shard(data, rank, o.workers), o.model.context,
                               o.seed * 1000003 + static_cast<std::uint64_t>(rank));
        const std::size_t n = o.batch * o.model.context;
        std::vector<std::uint8_t> tokens(n), targets(n);

        const auto start = clock::now();
        double eval_seconds = 0.0;
        const auto measure = [&](progress_row& row) {
            const auto t0 = clock::now();
            row.val_loss = evaluate(m, rule->global(), val_tokens, val_targets, o.batch);
            eval_seconds += std::chrono::duration<double>(clock::now() - t0).count();
        };
        const auto record = [&](progress_row row) {
            row.bytes_sent = comm.bytes_sent();
            row.tokens = row.step * tokens_per_step;
            row.seconds = std::chrono::duration<double>(clock::now() - start).count() - eval_seconds;
            if (out != nullptr) print_row(out, row, o, data);
            result.rows.push_back(row);
        };
        if (rank == 0) {
            progress_row first;
            measure(first);
            record(first);
        }
        double loss_sum = 0.0;
        std::uint64_t loss_count = 0;
        for (std::uint64_t step = 1; step <= o.steps; ++step) {
            sampler.fill(tokens.data(), targets.data(), o.batch);
            const double loss = m.forward(params.data(), tokens.data(), targets.data(), o.batch, true);
            if (!std::isfinite(loss)) {
                throw std::runtime_error("gpt: worker " + std::to_string(rank) +
                                         " reached a non-finite loss at step " +
                                         std::to_string(step) + "; lower --lr");
            }
            m.backward(params.data(), grads.data());
            rule->step(lr_factor(o, step));
            loss_sum += loss;
            ++loss_count;
            if (step == o.steps) {
                rule->finish();  // the final parameters are the global ones
            }
            // A row every --log-every steps, and every --eval-every steps with the validation
            // loss (the two need not divide each other), and at the end with both.
            const bool validate = step % o.eval_every == 0 || step == o.steps;
            if (rank == 0 && (validate || step % o.log_every == 0)) {
                progress_row row;
                row.step = step;
                row.train_loss = loss_sum / static_cast<double>(loss_count);
                loss_sum = 0.0;
                loss_count = 0;
                if (validate) measure(row);
                record(row);
            }
        }
        bytes[static_cast<std::size_t>(rank)] = comm.bytes_sent();
        if (rank == 0) {
            result.syncs = rule->syncs();
            result.final_val_loss = result.rows.back().val_loss;
            result.seconds = result.rows.back().seconds;
        }
    });
    result.bytes_per_worker =
        static_cast<double>(std::accumulate(bytes.begin(), bytes.end(), std::uint64_t{0})) /
        o.workers;
    result.tokens_per_second = static_cast<double>(o.steps * tokens_per_step) / result.seconds;
    return result;
}

// The --csv file, opened (created or truncated) before the run, so that a path that cannot be
// written is refused before any training rather than after it. write() puts the progress rows
// in it once, as CSV: step, train_loss, val_loss (empty when not measured), tokens, bytes_sent,
// seconds.
class csv_file {
public:
    explicit csv_file(std::string path) : path_(std::move(path)), f_(std::fopen(path_.c_str(), "w")) {
        if (f_ == nullptr) {
            throw loco::invalid_argument("gpt: cannot write --csv " + path_);
        }
    }
    csv_file(const csv_file&) = delete;
    csv_file& operator=(const csv_file&) = delete;
    ~csv_file() {
        if (f_ != nullptr) std::fclose(f_);
    }

    void write(const run_result& r) {
        if (f_ == nullptr) {
            throw loco::invalid_argument("gpt: --csv " + path_ + " was written already");
        }
        std::FILE* f = f_;
        f_ = nullptr;
        write_rows(f, r);
        const bool failed = std::ferror(f) != 0;
        if (std::fclose(f) != 0 || failed) {
            throw loco::invalid_argument("gpt: cannot write --csv " + path_);
        }
    }

private:
    static void write_rows(std::FILE* f, const run_result& r);

    std::string path_;
    std::FILE* f_;
};

inline void write_csv(const std::string& path, const run_result& r) { csv_file(path).write(r); }

inline void csv_file::write_rows(std::FILE* f, const run_result& r) {
    std::fprintf(f, "step,train_loss,val_loss,tokens,bytes_sent,seconds\n");
    for (const progress_row& row : r.rows) {
        std::fprintf(f, "%llu,", static_cast<unsigned long long>(row.step));
        if (!std::isnan(row.train_loss)) std::fprintf(f, "%.6f", row.train_loss);
        std::fprintf(f, ",");
        if (!std::isnan(row.val_loss)) std::fprintf(f, "%.6f", row.val_loss);
        std::fprintf(f, ",%llu,%llu,%.3f\n", static_cast<unsigned long long>(row.tokens),
                     static_cast<unsigned long long>(row.bytes_sent), row.seconds);
    }
}

}  // namespace gpt
