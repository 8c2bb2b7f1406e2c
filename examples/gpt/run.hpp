#pragma once
// A whole run of loco_gpt after its command line is parsed: refuses what it can before loading
// anything (the shape, the policy names, an unwritable --csv), loads the data, trains, prints the
// summary and then writes the CSV. main.cpp calls it with every compiled rule; the tests with the
// few they compile.

#include "data.hpp"
#include "options.hpp"
#include "rules.hpp"
#include "trainer.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <functional>
#include <optional>

namespace gpt {

// The rule factory for options (make_rule_factory<...>).
using rule_factory_maker = std::function<rule_factory(const options&)>;

// Refuses, before anything is loaded, data buffers larger than this host's memory (0: unknown):
// the validation windows (tokens and targets, --eval-sequences x --context bytes each) and a
// Markov sample with its train/validation copy (2 x --markov-bytes). They ended in a bare
// std::bad_alloc after the data was loaded.
inline void check_data_memory(const options& o, std::size_t host_bytes) {
    constexpr std::size_t most = std::numeric_limits<std::size_t>::max();
    const auto too_many = [](const std::string& flag) {
        throw loco::invalid_argument("gpt: " + flag + " asks for more bytes than a 64-bit count "
                                     "holds; use a smaller one");
    };
    if (o.model.context != 0 && o.eval_sequences > most / 2 / o.model.context) {
        too_many("--eval-sequences " + std::to_string(o.eval_sequences));
    }
    if (o.data == "markov" && o.markov_bytes > most / 2) {
        too_many("--markov-bytes " + std::to_string(o.markov_bytes));
    }
    const std::size_t windows = 2 * o.eval_sequences * o.model.context;
    const std::size_t sample = o.data == "markov" ? 2 * o.markov_bytes : 0;
    if (host_bytes == 0) return;
    const auto refuse = [&](const std::string& flag, std::size_t need) {
        throw loco::invalid_argument("gpt: " + flag + " needs " + std::to_string(need) +
                                     " bytes, more than this host's memory (" +
                                     std::to_string(host_bytes) + " bytes)");
    };
    if (windows > host_bytes) refuse("--eval-sequences " + std::to_string(o.eval_sequences), windows);
    if (sample > host_bytes) refuse("--markov-bytes " + std::to_string(o.markov_bytes), sample);
    if (windows > host_bytes - sample) {
        refuse("--eval-sequences with --markov-bytes", windows + sample);
    }
}

// Returns the exit status: 0 after a finished run, 1 when it fails (or misses --require-below),
// 2 for options refused before anything is loaded (a bad command line: an impossible shape or
// count, an unknown name, a setting a policy refuses). The header lines, progress and summary
// go to `out`, errors to `err`.
inline int run(const options& o, const rule_factory_maker& make_factory, std::FILE* out,
               std::FILE* err) {
    std::optional<layout> checked;
    rule_factory make_rule;
    try {
        checked.emplace(o.model);  // refuses an impossible shape before loading anything
        check_data_memory(o, host_memory_bytes());  // the data's own buffers, by their flags
        check_activations(o.model, std::max(o.batch, o.eval_sequences));  // (train checks again)
        check_memory(o.model, o.batch, static_cast<std::size_t>(std::max(o.workers, 1)),
                     host_memory_bytes());  // and one too large for this host
        check_counts(o);                    // (train checks again)
        if (o.data == "markov") {
            // The chain's settings (alphabet, a sharpness that underflows): cheap to build, at
            // most 32^3 probabilities, and built again with the corpus below.
            static_cast<void>(markov_source(o.markov_alphabet, o.markov_sharpness, o.seed));
            // Its split and shards are known from the options: each must hold a window (train
            // checks the loaded data again).
            const std::size_t train = training_bytes(o.markov_bytes);
            check_fits(shard_bytes(train, std::max(o.workers, 1)), o.model.context,
                       "each of the " + std::to_string(o.workers) + " training shards");
            check_fits(o.markov_bytes - train, o.model.context, "the validation split");
        }
        make_rule = make_factory(o);        // and unknown names, bad settings
    } catch (const std::exception& e) {
        std::fprintf(err, "%s\n", e.what());
        return 2;
    }
    const layout& lay = *checked;
    try {
        std::optional<csv_file> csv;  // a --csv that cannot be written: refused before loading
        if (!o.csv.empty()) csv.emplace(o.csv);
        const corpus data =
            o.data == "markov"
                ? make_markov_corpus(o.markov_alphabet, o.markov_sharpness, o.markov_bytes, o.seed)
                : load_fortunes(o.data_dir);
        std::fprintf(out, "data:   %s; %zu training bytes in %d shards, %zu validation bytes\n",
                     data.description.c_str(), data.train.size(), o.workers,
                     data.validation.size());
        std::fprintf(out,
                     "model:  %zu parameters (%zu layers, dim %zu, %zu heads, context %zu, %s "
                     "head)\n",
                     lay.total(), o.model.layers, o.model.dim, o.model.heads, o.model.context,
                     o.model.tied ? "tied" : "untied");
        std::fprintf(out, "run:    %s; %d workers x %zu sequences x %llu steps\n",
                     describe_mode(o).c_str(), o.workers, o.batch,
                     static_cast<unsigned long long>(o.steps));
        std::fflush(out);
        const run_result r = train(o, data, make_rule, out);
        std::fprintf(out, "final:  val loss %.4f", r.final_val_loss);
        if (data.entropy_floor) {
            std::fprintf(out, " (entropy floor %.4f, gap %+.4f)", *data.entropy_floor,
                         r.final_val_loss - *data.entropy_floor);
        }
        std::fprintf(out, "; %llu syncs; %.3f MB sent per worker; %.0f tokens/s; %.1f s\n",
                     static_cast<unsigned long long>(r.syncs), r.bytes_per_worker / 1e6,
                     r.tokens_per_second, r.seconds);
        std::fflush(out);
        if (csv) csv->write(r);  // after the summary, which a failed write must not lose
        if (!std::isfinite(r.final_val_loss)) {
            std::fprintf(err, "gpt: the final validation loss is not finite\n");
            return 1;
        }
        if (o.require_below && !(r.final_val_loss < *o.require_below)) {
            std::fprintf(err, "gpt: the final validation loss %.4f is not below %g "
                              "(--require-below)\n", r.final_val_loss, *o.require_below);
            return 1;
        }
        return 0;
    } catch (const std::exception& e) {
        std::fflush(out);
        std::fprintf(err, "%s\n", e.what());
        return 1;
    }
}

}  // namespace gpt
