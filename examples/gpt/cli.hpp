#pragma once
// The command line of loco_gpt: parse() fills options (options.hpp) or throws usage_error with
// one sentence; usage() is --help.

#include "options.hpp"
#include "policies.hpp"
#include "residual_report.hpp"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

namespace gpt {

struct usage_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

inline void usage(std::FILE* to) {
    const options d;
    std::fprintf(to,
        "usage: loco_gpt [options]\n"
        "Trains a byte-level GPT on M worker threads with loco (DiLoCo and its family), or with\n"
        "synchronous data parallelism, and prints a progress line every --log-every steps.\n"
        "\n"
        "data\n"
        "  --data NAME            fortunes | markov (default %s)\n"
        "  --data-dir DIR         where the fortune files are (default %s)\n"
        "  --markov-alphabet N    symbols of the order-2 Markov source, 2..32 (default %zu)\n"
        "  --markov-sharpness X   larger: lower entropy (default %.1f); refused where a\n"
        "                         transition probability would underflow (from 110 to 130\n"
        "                         at 16 symbols, by --seed; the message gives the bound)\n"
        "  --markov-bytes N       length of the Markov text (default %zu)\n"
        "model\n"
        "  --context T            sequence length (default %zu)\n"
        "  --dim C                residual width (default %zu)\n"
        "  --layers L             transformer blocks (default %zu)\n"
        "  --heads N              attention heads (default %zu)\n"
        "  --tied                 the output head is the token embedding (default: untied)\n"
        "training\n"
        "  --workers M            thread workers (default %d)\n"
        "  --steps N              inner steps per worker (default %llu)\n"
        "  --batch B              sequences per worker and step (default %zu)\n"
        "  --lr X                 inner peak learning rate (muon: of its AdamW group)\n"
        "                         (defaults: adamw %g, sgd %g, lion %g)\n"
        "  --muon-lr X            peak learning rate of Muon's group (default %g)\n"
        "  --weight-decay X       inner weight decay (defaults: adamw, lion, muon %g; sgd %g);\n"
        "                         lion decays by three times X, sgd adds PyTorch's L2 term\n"
        "  --warmup N             warm-up steps, 0 for none (default min(100, steps / 10))\n"
        "  --seed N               model, data and rounding seed (default %llu)\n"
        "communication\n"
        "  --sync-every-step      all-reduce gradients every step (data-parallel baseline)\n"
        "  --inner NAME           %s (default %s)\n"
        "  --outer NAME           %s (default %s)\n"
        "  --outer-lr X           (defaults: nesterov 0.7, sgd 1.0, adam 0.01)\n"
        "  --outer-momentum X     nesterov momentum or adam beta1 (defaults 0.9)\n"
        "  --compress NAME        %s (default %s)\n"
        "  --ef-decay X           error feedback: the residual's decay (default 1, MuLoCo 0.9;\n"
        "                         sparseloco: its accumulator's decay, default 0.95; demo:\n"
        "                         its residual's decay, default 0.999)\n"
        "  --ef-fold-outer-lr     error feedback: accumulate outer lr x delta (MuLoCo's code)\n"
        "  --head-compress NAME   none | sparseloco | demo: the output head synced with its own\n"
        "                         compressor and that compressor's aggregation (mean,\n"
        "                         median_norm_clip, scatter_mean), the rest with --compress\n"
        "                         sparseloco or demo (--inner adamw, --outer sgd|nesterov)\n"
        "  --topk K               sparseloco, demo: values kept per chunk (defaults 64, 32)\n"
        "  --chunk C              sparseloco, demo: the chunks' side, C x C (default 64)\n"
        "  --bins B               sparseloco: quantization bins of the kept values, 2 to 256\n"
        "                         (default 4: 2 bits a value; 256: 8 bits)\n"
        "  --fixed-indices        sparseloco, demo: ceil(log2 cells)-bit indices (templar's 12\n"
        "                         bits) instead of the default Elias-Fano code (8 bits at 64\n"
        "                         of 4096, 9 at 32)\n"
        "  --schedule NAME        %s (default %s)\n"
        "  --H N                  inner steps between syncs (default %llu)\n"
        "                         (streaming: of one fragment; a multiple of --fragments)\n"
        "  --fragments P          streaming: fragments, whole layers (default %llu)\n"
        "  --overlap TAU          streaming: inner steps an exchange travels (default %llu)\n"
        "  --alpha X              streaming: weight of the local values at a merge (default %g)\n"
        "  --pattern NAME         streaming: strided | sequential layers per fragment\n"
        "                         (default %s)\n"
        "                         streaming and delayed are compiled with --inner adamw\n"
        "                         --outer nesterov --compress none|blockwise4 only\n"
        "  --aggregate NAME       %s (default %s)\n"
        "                         all but mean are compiled with --inner adamw --outer nesterov\n"
        "                         --compress none --schedule every; median_norm_clip with\n"
        "                         --outer sgd --compress sparseloco (SparseLoCo); --compress demo\n"
        "                         with --inner adamw --outer nesterov and mean or scatter_mean\n"
        "  --trim B               trimmed_mean: values dropped at each end (default %llu; 2B < M)\n"
        "  --clip-tau X           centered_clip: radius tau (default %g)\n"
        "  --clip-iterations L    centered_clip: iterations (default %llu)\n"
        "  --edit-scope NAME      edit: fragment | tensor, where norms are taken (default %s)\n"
        "  --edit-temperature T   edit: softmax(-G / T) weights (default %g)\n"
        "  --edit-warmup N        edit: norms before the anomaly detector flags\n"
        "                         (default %llu)\n"
        "  --edit-clip PHI        edit: clip of the aggregate's norm (default none)\n"
        "  --no-median-clip       median_norm_clip: the plain scatter-mean, no clip to the\n"
        "                         median norm\n"
        "attack (robustness runs, --schedule every)\n"
        "  --attackers N          the last N workers corrupt their pseudo-gradient at every\n"
        "                         sync (default 0)\n"
        "  --attack NAME          scaled (100x) | sign_flip (-4x) | nan | random (honest norm)\n"
        "                         (default %s)\n"
        "reporting\n"
        "  --log-every N          progress line interval (default %llu)\n"
        "  --eval-every N         validation interval, a progress line with the validation\n"
        "                         loss every N steps (default %llu)\n"
        "  --eval-sequences N     validation windows (default %zu)\n"
        "  --csv FILE             also write the progress rows as CSV (the file is created\n"
        "                         before training, written after the final line)\n"
        "  --residual-csv FILE    sparseloco, demo: at each sync, worker 0's residual norm\n"
        "                         before and after, the share of its energy sent, and the\n"
        "                         share its per-chunk top-k holds in values and in DCT\n"
        "                         coefficients\n"
        "  --quiet                no progress lines, only the summary\n"
        "  --require-below X      exit 1 unless the final validation loss is below X\n",
        d.data.c_str(), d.data_dir.c_str(), d.markov_alphabet, d.markov_sharpness,
        d.markov_bytes, d.model.context, d.model.dim, d.model.layers, d.model.heads, d.workers,
        static_cast<unsigned long long>(d.steps), d.batch, double(adamw_choice::default_lr),
        double(sgd_choice::default_lr), double(lion_choice::default_lr), double(d.muon_lr),
        double(default_weight_decay), double(default_sgd_weight_decay), static_cast<unsigned long long>(d.seed),
        choice_names<inner_choices>().c_str(), d.inner.c_str(),
        choice_names<outer_choices>().c_str(), d.outer.c_str(),
        choice_names<known_compress_choices>().c_str(), d.compress.c_str(),
        choice_names<schedule_choices>().c_str(), d.schedule.c_str(),
        static_cast<unsigned long long>(d.every), static_cast<unsigned long long>(d.fragments),
        static_cast<unsigned long long>(d.overlap), double(d.alpha), d.pattern.c_str(),
        choice_names<aggregate_choices>().c_str(), d.aggregate.c_str(),
        static_cast<unsigned long long>(trimmed_mean_choice::type::hyper{}.trim),
        double(centered_clip_choice::type::hyper{}.tau),
        static_cast<unsigned long long>(centered_clip_choice::type::hyper{}.iterations),
        d.edit_scope.c_str(), double(edit_choice::type::hyper{}.temperature),
        static_cast<unsigned long long>(edit_choice::type::hyper{}.ewma_warmup), d.attack.c_str(),
        static_cast<unsigned long long>(d.log_every),
        static_cast<unsigned long long>(d.eval_every), d.eval_sequences);
}

namespace detail {

inline std::uint64_t parse_count(std::string_view flag, const std::string& text) {
    errno = 0;
    char* end = nullptr;
    const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
    // Digits only: strtoull skips leading spaces and takes " -1" as 2^64 - 1.
    if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0])) || *end != '\0' ||
        errno == ERANGE) {
        throw usage_error("gpt: " + std::string(flag) + " takes a whole number, not '" + text + "'");
    }
    return v;
}

inline float parse_real(std::string_view flag, const std::string& text) {
    char* end = nullptr;
    const float v = std::strtof(text.c_str(), &end);
    if (text.empty() || *end != '\0' || !std::isfinite(v) || v < 0.0f) {
        throw usage_error("gpt: " + std::string(flag) + " takes a non-negative number, not '" +
                          text + "'");
    }
    return v;
}

}  // namespace detail

// Returns false for --help.
inline bool parse(int argc, char** argv, options& o) {
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") return false;
        if (flag == "--tied") { o.model.tied = true; continue; }
        if (flag == "--sync-every-step") { o.sync_every_step = true; continue; }
        if (flag == "--ef-fold-outer-lr") { o.ef_fold_outer_lr = true; continue; }
        if (flag == "--quiet") { o.quiet = true; continue; }
        if (flag == "--no-median-clip") { o.median_clip = false; continue; }
        if (flag == "--fixed-indices") { o.fixed_indices = true; continue; }
        if (i + 1 >= argc) {
            throw usage_error("gpt: " + flag + " needs a value (or is not an option; see --help)");
        }
        const std::string v = argv[++i];
        const auto count = [&] { return detail::parse_count(flag, v); };
        const auto real = [&] { return detail::parse_real(flag, v); };
        if (flag == "--data") o.data = v;
        else if (flag == "--data-dir") o.data_dir = v;
        else if (flag == "--markov-alphabet") o.markov_alphabet = count();
        else if (flag == "--markov-sharpness") o.markov_sharpness = real();
        else if (flag == "--markov-bytes") o.markov_bytes = count();
        else if (flag == "--context") o.model.context = count();
        else if (flag == "--dim") o.model.dim = count();
        else if (flag == "--layers") o.model.layers = count();
        else if (flag == "--heads") o.model.heads = count();
        else if (flag == "--workers") {
            const std::uint64_t m = count();
            if (m < 1 || m > 256) throw usage_error("gpt: --workers must be between 1 and 256");
            o.workers = static_cast<int>(m);
        }
        else if (flag == "--steps") o.steps = count();
        else if (flag == "--batch") o.batch = count();
        else if (flag == "--lr") o.lr = real();
        else if (flag == "--muon-lr") o.muon_lr = real();
        else if (flag == "--weight-decay") o.weight_decay = real();
        else if (flag == "--warmup") o.warmup = count();
        else if (flag == "--seed") o.seed = count();
        else if (flag == "--inner") o.inner = v;
        else if (flag == "--outer") o.outer = v;
        else if (flag == "--outer-lr") o.outer_lr = real();
        else if (flag == "--outer-momentum") o.outer_momentum = real();
        else if (flag == "--compress") o.compress = v;
        else if (flag == "--head-compress") o.head_compress = v;
        else if (flag == "--ef-decay") o.ef_decay = real();
        else if (flag == "--topk") o.topk = count();
        else if (flag == "--chunk") o.chunk = count();
        else if (flag == "--bins") o.bins = count();
        else if (flag == "--schedule") o.schedule = v;
        else if (flag == "--H") o.every = count();
        else if (flag == "--fragments") o.fragments = count();
        else if (flag == "--overlap") o.overlap = count();
        else if (flag == "--alpha") o.alpha = real();
        else if (flag == "--pattern") o.pattern = v;
        else if (flag == "--aggregate") o.aggregate = v;
        else if (flag == "--trim") o.trim = count();
        else if (flag == "--clip-tau") o.clip_tau = real();
        else if (flag == "--clip-iterations") o.clip_iterations = count();
        else if (flag == "--edit-scope") o.edit_scope = v;
        else if (flag == "--edit-temperature") o.edit_temperature = real();
        else if (flag == "--edit-warmup") o.edit_warmup = count();
        else if (flag == "--edit-clip") o.edit_clip = real();
        else if (flag == "--attackers") {
            const std::uint64_t n = count();
            if (n > 255) throw usage_error("gpt: --attackers must be below --workers");
            o.attackers = static_cast<int>(n);
        }
        else if (flag == "--attack") o.attack = v;
        else if (flag == "--log-every") o.log_every = count();
        else if (flag == "--eval-every") o.eval_every = count();
        else if (flag == "--eval-sequences") o.eval_sequences = count();
        else if (flag == "--csv") o.csv = v;
        else if (flag == "--residual-csv") o.residual_csv = v;
        else if (flag == "--require-below") o.require_below = real();  // 0 too: nothing passes
        else throw usage_error("gpt: unknown option '" + flag + "'; see --help");
    }
    if (o.data != "fortunes" && o.data != "markov") {
        throw usage_error("gpt: unknown --data '" + o.data + "'; valid: fortunes, markov");
    }
    if (o.edit_scope != "fragment" && o.edit_scope != "tensor") {
        throw usage_error("gpt: unknown --edit-scope '" + o.edit_scope +
                          "'; valid: fragment, tensor");
    }
    if (o.attackers >= o.workers) {
        throw usage_error("gpt: --attackers " + std::to_string(o.attackers) +
                          " leaves no honest worker of " + std::to_string(o.workers) +
                          "; choose fewer than --workers");
    }
    if (o.bins && o.compress != "sparseloco" && o.head_compress != "sparseloco") {
        throw usage_error("gpt: --bins sets SparseLoCo's quantization; it needs --compress "
                          "sparseloco or --head-compress sparseloco");
    }
    if (!residual_csv_fits(o.residual_csv, o.compress, o.sync_every_step)) {
        throw usage_error(residual_csv_refusal);
    }
    if (o.pattern != "strided" && o.pattern != "sequential") {
        throw usage_error("gpt: unknown --pattern '" + o.pattern + "'; valid: strided, sequential");
    }
    return true;
}

}  // namespace gpt
