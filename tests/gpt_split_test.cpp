// The GPT example's --head-compress (examples/gpt/split_rule.hpp): the output head synced by its
// own loco::diloco handle. Naming the run's own compressor for the head is the unsplit run to the
// bit (losses at every row); another compressor changes what each sync sends by exactly the
// closed form of the two parts' payloads; the one-sentence refusals.
#include <doctest/doctest.h>

#include "support/errors.hpp"
#include "support/random.hpp"

#include "../examples/gpt/cli.hpp"
#include "../examples/gpt/data.hpp"
#include "../examples/gpt/run.hpp"
#include "../examples/gpt/split_rule.hpp"
#include "../examples/gpt/trainer.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

using loco_test::error_of;
using sparseloco_choice = std::tuple_element_t<0, gpt::frontier_compress_choices>;
using demo_choice = std::tuple_element_t<1, gpt::frontier_compress_choices>;

// Outer Nesterov only (the study's DeMo runs; at momentum 0 it is SGD): the unsplit runs and the
// splits of both compressors, each with its reference's aggregation.
template <class Compress>
using unsplit = gpt::combinations<std::tuple<gpt::adamw_choice>, std::tuple<gpt::nesterov_choice>,
                                  std::tuple<Compress>, std::tuple<gpt::every_choice>,
                                  std::tuple<gpt::reference_aggregate<Compress>>>;
using unsplit_rules = std::tuple<unsplit<sparseloco_choice>, unsplit<demo_choice>>;
using test_splits =
    gpt::split_combinations<std::tuple<gpt::adamw_choice>, std::tuple<gpt::nesterov_choice>,
                            gpt::frontier_compress_choices, gpt::compiled_splits::heads>;

gpt::rule_factory rules(const gpt::options& o) {
    return gpt::make_rule_factory<unsplit_rules, std::tuple<gpt::adamw_choice>,
                                  test_splits>(o);
}

// A one-layer model on a Markov text (head.w is 256 x 16), two quiet workers, 36 steps syncing
// every 10: three syncs and the closing one. Small chunks so that every tensor has several.
gpt::options tiny_run(const std::string& compress, std::uint64_t seed) {
    gpt::options o;
    o.model = {.vocab = 256, .context = 16, .dim = 16, .layers = 1, .heads = 2};
    o.data = "markov";
    o.workers = 2;
    o.steps = 36;
    o.every = 10;
    o.eval_every = 10;
    o.log_every = 5;
    o.quiet = true;
    o.seed = seed;
    o.compress = compress;
    o.aggregate = compress == "demo" ? "scatter_mean" : "median_norm_clip";
    o.outer_momentum = 0.0f;
    o.outer_lr = 1.5f;
    o.topk = 6;
    o.chunk = 8;
    o.ef_decay = 0.9f;
    return o;
}

// The payload of compressor C over the tensors of the layout that `keep` selects, its segments
// written from the layout's shapes (one per tensor; vectors as one row). The sizes are the
// compressors' own payload_bytes (checked against the payload formats in
// tests/sparseloco_test.cpp and tests/demo_test.cpp); what this file checks is how the split
// composes them: which tensors each handle sends, how often, and with what framing.
template <class C, class Keep>
std::uint64_t payload(const gpt::options& o, Keep keep) {
    const gpt::layout lay(o.model);
    std::vector<loco::compress::segment> segs;
    std::size_t offset = 0;
    for (const gpt::tensor_spec& s : lay.tensors()) {
        if (!keep(s.name)) continue;
        segs.push_back({.offset = offset, .size = s.size(), .rows = s.rows == 0 ? 1 : s.rows,
                        .cols = s.cols});
        offset += s.size();
    }
    return C::type::payload_bytes(C::hyper(o), segs);
}

// What the second handle's start() adds once: its fingerprint check, 16 floats all-reduced (a
// ring at M = 2 sends them once).
constexpr std::uint64_t fingerprint = 4 * 16;

bool is_head(const std::string& name) { return name == "head.w"; }
bool not_head(const std::string& name) { return name != "head.w"; }
bool any(const std::string&) { return true; }

// Worker 0's bytes at the end of a run.
std::uint64_t bytes_of(const gpt::run_result& r) { return r.rows.back().bytes_sent; }

}  // namespace

TEST_CASE("gpt: --head-compress naming the run's own compressor is the unsplit run, to the bit") {
    auto rng = loco_test::rng_for("gpt.split.same");
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 30000, rng() % 1000 + 1);
    for (const char* compress : {"demo", "sparseloco"}) {
        CAPTURE(compress);
        const gpt::options plain_o = tiny_run(compress, rng() % 1000 + 1);
        gpt::options split_o = plain_o;
        split_o.head_compress = compress;
        const gpt::run_result plain = gpt::train(plain_o, data, rules(plain_o), nullptr);
        const gpt::run_result split = gpt::train(split_o, data, rules(split_o), nullptr);
        REQUIRE(plain.rows.size() == split.rows.size());
        for (std::size_t i = 0; i < plain.rows.size(); ++i) {
            CAPTURE(plain.rows[i].step);
            CHECK(split.rows[i].step == plain.rows[i].step);
            CHECK((split.rows[i].train_loss == plain.rows[i].train_loss ||
                   (std::isnan(split.rows[i].train_loss) && std::isnan(plain.rows[i].train_loss))));
            CHECK((split.rows[i].val_loss == plain.rows[i].val_loss ||
                   (std::isnan(split.rows[i].val_loss) && std::isnan(plain.rows[i].val_loss))));
        }
        CHECK(split.final_val_loss == plain.final_val_loss);
        REQUIRE(plain.syncs == 4);
        CHECK(split.syncs == 4);
        // The second handle's start() checks its fingerprint once (16 floats all-reduced: 64
        // bytes at M = 2), and each sync of the split adds its all-or-nothing agreement (one
        // float: 4 bytes) and its payload's framing: the two parts' payloads against the whole
        // model's, all-gathered to the one other worker.
        const std::uint64_t per_sync_split =
            4 + (std::string(compress) == "demo"
                     ? payload<demo_choice>(plain_o, not_head) +
                           payload<demo_choice>(plain_o, is_head)
                     : payload<sparseloco_choice>(plain_o, not_head) +
                           payload<sparseloco_choice>(plain_o, is_head));
        const std::uint64_t per_sync_plain = std::string(compress) == "demo"
                                                 ? payload<demo_choice>(plain_o, any)
                                                 : payload<sparseloco_choice>(plain_o, any);
        CHECK(bytes_of(split) - bytes_of(plain) ==
              fingerprint + 4 * (per_sync_split - per_sync_plain));
    }
}

TEST_CASE("gpt: --head-compress syncs the head with its own compressor, and the rest without it") {
    auto rng = loco_test::rng_for("gpt.split.other");
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 30000, rng() % 1000 + 1);
    const std::uint64_t head_floats = 256 * 16;
    const auto run = [&](gpt::options o) { return gpt::train(o, data, rules(o), nullptr); };

    SUBCASE("DeMo for the rest, the head uncompressed (mean, one fp32 all-reduce)") {
        const gpt::options plain_o = tiny_run("demo", rng() % 1000 + 1);
        gpt::options split_o = plain_o;
        split_o.head_compress = "none";
        const gpt::run_result plain = run(plain_o), split = run(split_o);
        // Per sync, rank 0 of 2: the rest's DeMo payload (one copy to the other worker), the
        // head's ring all-reduce (4 n bytes at M = 2) and one agreement per handle; the unsplit
        // run sends the whole model's payload and one agreement.
        const std::uint64_t per_sync_split =
            payload<demo_choice>(plain_o, not_head) + 4 * head_floats + 4 + 4;
        const std::uint64_t per_sync_plain = payload<demo_choice>(plain_o, any) + 4;
        CHECK(bytes_of(split) - bytes_of(plain) ==
              fingerprint + 4 * (per_sync_split - per_sync_plain));
        CHECK(split.syncs == 4);
        CHECK(split.final_val_loss != plain.final_val_loss);
        CHECK(split.final_val_loss < split.rows.front().val_loss);
    }
    SUBCASE("DeMo for the rest, SparseLoCo's 8-bit values for the head (--bins reaches it)") {
        gpt::options plain_o = tiny_run("demo", rng() % 1000 + 1);
        gpt::options split_o = plain_o;
        split_o.head_compress = "sparseloco";
        split_o.bins = 256;
        split_o.median_clip = false;
        const gpt::run_result plain = run(plain_o), split = run(split_o);
        const std::uint64_t head_8bit = payload<sparseloco_choice>(split_o, is_head);
        gpt::options two_bit = split_o;
        two_bit.bins.reset();
        CHECK(head_8bit > payload<sparseloco_choice>(two_bit, is_head));  // 8-bit codes and table
        const std::uint64_t per_sync_split =
            payload<demo_choice>(plain_o, not_head) + head_8bit + 8;
        const std::uint64_t per_sync_plain = payload<demo_choice>(plain_o, any) + 4;
        CHECK(bytes_of(split) - bytes_of(plain) ==
              fingerprint + 4 * (per_sync_split - per_sync_plain));
        CHECK(split.final_val_loss != plain.final_val_loss);
        CHECK(split.final_val_loss < split.rows.front().val_loss);
    }
    SUBCASE("SparseLoCo for the rest, DeMo's DCT for the head") {
        const gpt::options plain_o = tiny_run("sparseloco", rng() % 1000 + 1);
        gpt::options split_o = plain_o;
        split_o.head_compress = "demo";
        const gpt::run_result plain = run(plain_o), split = run(split_o);
        const std::uint64_t per_sync_split = payload<sparseloco_choice>(plain_o, not_head) +
                                             payload<demo_choice>(plain_o, is_head) + 8;
        const std::uint64_t per_sync_plain = payload<sparseloco_choice>(plain_o, any) + 4;
        CHECK(bytes_of(split) - bytes_of(plain) ==
              fingerprint + 4 * (per_sync_split - per_sync_plain));
        CHECK(split.final_val_loss != plain.final_val_loss);
        CHECK(split.final_val_loss < split.rows.front().val_loss);
    }
}

TEST_CASE("gpt: --head-compress errors") {
    const auto factory_error = [](gpt::options o) { return error_of([&] { rules(o); }); };
    gpt::options o = tiny_run("demo", 1);
    o.head_compress = "bf16";
    CHECK(factory_error(o) == "gpt: unknown --head-compress 'bf16'; valid: none, sparseloco, demo");
    o.head_compress = "none";
    CHECK(factory_error(o).empty());

    const std::string combos =
        "gpt: --head-compress none is compiled with --inner adamw --outer nesterov --schedule "
        "every --compress sparseloco|demo (demo with --aggregate scatter_mean, sparseloco with "
        "--aggregate median_norm_clip) and --head-compress none|sparseloco|demo";
    gpt::options bad = o;
    bad.aggregate = "mean";
    CHECK(factory_error(bad) == combos);
    bad = o;
    bad.compress = "none";
    bad.aggregate = "mean";
    CHECK(factory_error(bad) == combos);
    bad = o;
    bad.outer = "sgd";
    CHECK(factory_error(bad) == combos);
    bad = o;
    bad.schedule = "delayed";
    CHECK(factory_error(bad) == combos);

    const std::string split_only =
        "gpt: --head-compress splits DiLoCo's sync; drop --sync-every-step, --attackers and "
        "--residual-csv";
    bad = o;
    bad.sync_every_step = true;
    CHECK(factory_error(bad) == split_only);
    bad = o;
    bad.attackers = 1;
    CHECK(factory_error(bad) == split_only);
    bad = o;
    bad.residual_csv = "r.csv";
    CHECK(factory_error(bad) == split_only);
    bad = o;
    bad.model.tied = true;
    CHECK(factory_error(bad) ==
          "gpt: --head-compress needs the untied output head 'head.w'; drop --tied");
    // Bad compressor settings of either part are refused as the unsplit run refuses them.
    bad = o;
    bad.topk = 0;  // the rest's (DeMo's)
    gpt::options unsplit_o = bad;
    unsplit_o.head_compress.clear();
    CHECK(!factory_error(unsplit_o).empty());
    CHECK(factory_error(bad) == factory_error(unsplit_o));
    bad = o;
    bad.head_compress = "sparseloco";
    bad.bins = 1;  // the head's (SparseLoCo's)
    unsplit_o = tiny_run("sparseloco", 1);
    unsplit_o.bins = 1;
    CHECK(!factory_error(unsplit_o).empty());
    CHECK(factory_error(bad) == factory_error(unsplit_o));

    // The outer optimizer's, the schedule's and the inner optimizer's settings too, as the
    // unsplit run refuses them: a bad command line (exit 2), before any data is loaded. Only the
    // compressors' were checked: these failed in the workers, after loading (exit 1).
    const auto status = [](const gpt::options& opts, std::string& err) {
        std::FILE* out_file = std::tmpfile();
        std::FILE* err_file = std::tmpfile();
        REQUIRE(out_file != nullptr);
        REQUIRE(err_file != nullptr);
        const int s = gpt::run(opts, rules, out_file, err_file);
        const auto text = [](std::FILE* f) {
            std::fflush(f);
            std::rewind(f);
            std::string t;
            for (int c; (c = std::fgetc(f)) != EOF;) t += static_cast<char>(c);
            return t;
        };
        err = text(err_file);
        CHECK(text(out_file) == "");  // nothing was loaded or trained
        std::fclose(out_file);
        std::fclose(err_file);
        return s;
    };
    std::string err;
    for (const std::string head : {"none", "demo"}) {
        INFO("--head-compress " << head);
        bad = o;
        bad.head_compress = head;
        bad.outer_momentum = 1.5f;
        CHECK(status(bad, err) == 2);
        CHECK(err.find("loco::outer::nesterov: momentum must be in [0, 1)") == 0);
        bad.outer_momentum = 0.0f;
        bad.every = 0;
        CHECK(status(bad, err) == 2);
        CHECK(err == "loco::schedule::every: every (H) must be >= 1\n");
        bad.every = 10;
        bad.lr = 1e20f;
        bad.weight_decay = 1e20f;
        CHECK(status(bad, err) == 2);
        CHECK(err.find("loco::inner::adamw: lr * weight_decay overflows a float") == 0);
    }

    // A build that compiles no split says so.
    CHECK(error_of([&] {
              gpt::make_rule_factory<unsplit_rules, std::tuple<gpt::adamw_choice>,
                                     gpt::no_splits>(o);
          }) == "gpt: --head-compress is not compiled into this trainer");

    // On the command line: the name is taken as given, and --bins is accepted for the head.
    const auto parse_error = [](std::vector<const char*> args) {
        args.insert(args.begin(), "loco_gpt");
        gpt::options p;
        return error_of([&] {
            gpt::parse(static_cast<int>(args.size()), const_cast<char**>(args.data()), p);
        });
    };
    CHECK(parse_error({"--compress", "demo", "--head-compress", "sparseloco", "--bins", "256"})
              .empty());
    CHECK(parse_error({"--compress", "demo", "--head-compress", "none", "--bins", "256"}) ==
          "gpt: --bins sets SparseLoCo's quantization; it needs --compress sparseloco or "
          "--head-compress sparseloco");
}
