#pragma once
// Everything a run is configured with, and its defaults. cli.hpp fills it from the command line;
// the tests fill it directly.

#include "config.hpp"
#include "data.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace gpt {

struct options {
    model_config model;

    // data
    std::string data = "fortunes";  // fortunes | markov
    std::string data_dir = default_fortunes_dir;
    std::size_t markov_alphabet = 16;
    double markov_sharpness = 2.0;
    std::size_t markov_bytes = std::size_t{1} << 21;

    // training
    int workers = 4;                // M, thread workers
    std::uint64_t steps = 1000;     // inner steps per worker
    std::size_t batch = 8;          // sequences per worker and step
    std::optional<std::uint64_t> warmup;  // unset: min(100, steps / 10); 0: no warm-up
    float final_lr_fraction = 0.1f; // cosine decay from the peak to this fraction of it
    std::uint64_t seed = 1;

    // how the workers communicate
    bool sync_every_step = false;   // all-reduce gradients every step (data-parallel baseline)
    std::string inner = "adamw";
    std::string outer = "nesterov";
    std::string compress = "none";
    std::string schedule = "every";
    // the output head's own compressor (split_rule.hpp): none | sparseloco | demo; empty: the
    // head is synced with the rest of the model
    std::string head_compress;
    std::uint64_t every = 50;       // H
    // --schedule streaming: P fragments (whole layers, see layer_of in model.hpp), each synced
    // once every H steps, its exchange travelling tau inner steps, merged with weight alpha
    std::uint64_t fragments = 4;    // P
    std::uint64_t overlap = 1;      // tau
    float alpha = 0.5f;
    std::string pattern = "strided";  // strided | sequential: how layers are dealt to fragments

    // how the pseudo-gradients are combined (policies.hpp, aggregate_choices); an unset value
    // means the policy's own default
    std::string aggregate = "mean";  // mean | edit | trimmed_mean | median | centered_clip |
                                     // median_norm_clip | scatter_mean
    std::optional<std::uint64_t> trim;          // trimmed_mean: b values dropped at each end
    float clip_tau = -1.0f;                     // centered_clip: radius tau
    std::optional<std::uint64_t> clip_iterations;  // centered_clip: L
    std::string edit_scope = "fragment";        // edit: fragment | tensor (where norms are taken)
    float edit_temperature = -1.0f;             // edit: T of the softmax(-G / T) weights
    std::optional<std::uint64_t> edit_warmup;   // edit: norms seen before the detector flags
    float edit_clip = -1.0f;                    // edit: phi, the clip of the aggregate's norm

    // attackers: the last `attackers` workers send a corrupted pseudo-gradient at every sync
    // (rules.hpp, diloco_rule::attack); 0: an honest run
    int attackers = 0;
    std::string attack = "sign_flip";  // scaled | sign_flip | nan | random

    // hyper-parameters; a negative value means "the default of the chosen policy" (see
    // policies.hpp for this trainer's defaults)
    float lr = -1.0f;               // the inner peak lr (muon: of the AdamW group)
    float muon_lr = 0.02f;          // the Muon group's peak lr (--inner muon)
    float weight_decay = -1.0f;     // adamw, lion, muon: 0.1; sgd: 0
    float outer_lr = -1.0f;
    float outer_momentum = -1.0f;
    // error feedback (statistical2-ef): the residual's decay (1: plain error feedback) and
    // whether the residual accumulates outer_lr * delta (MuLoCo's code: decay 0.9, folded)
    float ef_decay = -1.0f;
    bool ef_fold_outer_lr = false;
    // the chunked top-k compressors (sparseloco, demo): values kept per chunk and the chunk's
    // side; unset: the policy's default (sparseloco 64 of 64 x 64, demo 32 of 64 x 64). With
    // sparseloco, --ef-decay is its accumulator's decay beta (default 0.95).
    std::optional<std::uint64_t> topk;
    std::optional<std::uint64_t> chunk;
    // sparseloco: quantization bins of the kept values (unset: 4, 2 bits; up to 256, 8 bits)
    std::optional<std::uint64_t> bins;
    // sparseloco: fixed-width indices (templar's format) instead of the compact coding
    bool fixed_indices = false;
    // median_norm_clip: false is the plain scatter-mean of the sparse deltas (no clip)
    bool median_clip = true;

    // reporting
    std::uint64_t log_every = 10;
    std::uint64_t eval_every = 100;
    std::size_t eval_sequences = 64;
    std::string csv;                // a file for the progress rows, when set
    std::string residual_csv;       // sparseloco, demo: a file for worker 0's residual at each
                                    // sync (residual_report.hpp), when set
    bool quiet = false;             // no progress lines
    std::optional<double> require_below;  // fail the run unless the final val loss is below it
};

}  // namespace gpt
