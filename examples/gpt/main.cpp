// loco_gpt: a byte-level GPT trained with loco on M worker threads. See docs/gpt.md.
//
//   loco_gpt --data fortunes --workers 4 --H 50 --steps 300        DiLoCo, AdamW inside
//   loco_gpt --data fortunes --workers 4 --sync-every-step          data-parallel baseline
//   loco_gpt --data markov --inner muon --compress statistical2-ef  MuLoCo, 2-bit codes
//
// Exit status: 0 after a finished run, 1 when a run fails (or misses --require-below), 2 for a
// bad command line.

#include "cli.hpp"
#include "rules.hpp"
#include "run.hpp"

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
    return gpt::run(
        o, [](const gpt::options& opts) { return gpt::make_rule_factory(opts); }, stdout, stderr);
}
