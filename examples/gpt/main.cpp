// loco_gpt: a byte-level GPT trained with loco on M worker threads. See docs/gpt.md.
//
//   loco_gpt --data fortunes --workers 4 --H 50 --steps 300        DiLoCo, AdamW inside
//   loco_gpt --data fortunes --workers 4 --sync-every-step          data-parallel baseline
//   loco_gpt --data markov --inner muon --compress statistical2-ef  MuLoCo, 2-bit codes
//
// Exit status: 0 after a finished run, 1 when a run fails (or misses --require-below), 2 for a
// bad command line.

#include "cli.hpp"
#include "data.hpp"
#include "rules.hpp"
#include "trainer.hpp"

#include <cmath>
#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
    gpt::options o;
    try {
        if (!gpt::parse(argc, argv, o)) {
            gpt::usage(stdout);
            return 0;
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 2;
    }
    try {
        const gpt::layout lay(o.model);  // refuses an impossible shape before loading anything
        const gpt::rule_factory make_rule = gpt::make_rule_factory(o);  // and unknown names
        const gpt::corpus data =
            o.data == "markov"
                ? gpt::make_markov_corpus(o.markov_alphabet, o.markov_sharpness, o.markov_bytes,
                                          o.seed)
                : gpt::load_fortunes(o.data_dir);
        std::printf("data:   %s; %zu training bytes in %d shards, %zu validation bytes\n",
                    data.description.c_str(), data.train.size(), o.workers,
                    data.validation.size());
        std::printf("model:  %zu parameters (%zu layers, dim %zu, %zu heads, context %zu, %s head)\n",
                    lay.total(), o.model.layers, o.model.dim, o.model.heads, o.model.context,
                    o.model.tied ? "tied" : "untied");
        std::printf("run:    %s; %d workers x %zu sequences x %llu steps\n",
                    gpt::describe_mode(o).c_str(), o.workers, o.batch,
                    static_cast<unsigned long long>(o.steps));
        std::fflush(stdout);
        const gpt::run_result r = gpt::train(o, data, make_rule, stdout);
        if (!o.csv.empty()) gpt::write_csv(o.csv, r);
        std::printf("final:  val loss %.4f", r.final_val_loss);
        if (data.entropy_floor) {
            std::printf(" (entropy floor %.4f, gap %+.4f)", *data.entropy_floor,
                        r.final_val_loss - *data.entropy_floor);
        }
        std::printf("; %llu syncs; %.3f MB sent per worker; %.0f tokens/s; %.1f s\n",
                    static_cast<unsigned long long>(r.syncs), r.bytes_per_worker / 1e6,
                    r.tokens_per_second, r.seconds);
        if (!std::isfinite(r.final_val_loss)) {
            std::fprintf(stderr, "gpt: the final validation loss is not finite\n");
            return 1;
        }
        if (o.require_below > 0.0 && !(r.final_val_loss < o.require_below)) {
            std::fprintf(stderr, "gpt: the final validation loss %.4f is not below %g "
                                 "(--require-below)\n", r.final_val_loss, o.require_below);
            return 1;
        }
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
