// The GPT example's robust aggregation and attackers (examples/gpt): two of five workers that
// send a sign-flipped (-4x) pseudo-gradient at every sync pull `mean` far from the clean run,
// while `median` (at M = 5 the same as `trimmed_mean` with b = 2) ends within a few percent of
// it; the command line of
// --aggregate, its hyper-parameters and --attackers / --attack, and their one-sentence errors;
// the settings of SparseLoCo and DeMo (--topk, --chunk, --ef-decay, --no-median-clip) reaching
// their policies and the bytes on the wire; a run under --attackers that no skipped sync stops.
#include <doctest/doctest.h>

#include "support/errors.hpp"
#include "support/random.hpp"

#include "../examples/gpt/cli.hpp"
#include "../examples/gpt/data.hpp"
#include "../examples/gpt/trainer.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace {

using loco_test::error_of;

// The rules these tests run, compiled alone (loco_gpt compiles the full list).
using robust_rules =
    gpt::combinations<std::tuple<gpt::adamw_choice>, std::tuple<gpt::nesterov_choice>,
                      std::tuple<std::tuple_element_t<0, gpt::compress_choices>>,
                      std::tuple<gpt::every_choice>,
                      std::tuple<gpt::mean_choice, gpt::median_choice>>;

gpt::rule_factory rules(const gpt::options& o) {
    return gpt::make_rule_factory<std::tuple<robust_rules>, std::tuple<gpt::adamw_choice>,
                                  gpt::no_splits>(o);
}

// SparseLoCo as the study runs it, compiled alone: its factory checks the compressor's settings.
using sparseloco_rules =
    gpt::combinations<std::tuple<gpt::adamw_choice>, std::tuple<gpt::outer_sgd_choice>,
                      std::tuple<std::tuple_element_t<0, gpt::frontier_compress_choices>>,
                      std::tuple<gpt::every_choice>, std::tuple<gpt::median_norm_clip_choice>>;

gpt::rule_factory sparse_rules(const gpt::options& o) {
    return gpt::make_rule_factory<std::tuple<sparseloco_rules>, std::tuple<gpt::adamw_choice>,
                                  gpt::no_splits>(o);
}

// DeMo as the study runs it (outer Nesterov; the mean or DeMo's scatter-mean), compiled alone for
// the same reason.
using demo_rules =
    gpt::combinations<std::tuple<gpt::adamw_choice>, std::tuple<gpt::nesterov_choice>,
                      std::tuple<std::tuple_element_t<1, gpt::frontier_compress_choices>>,
                      std::tuple<gpt::every_choice>,
                      std::tuple<gpt::mean_choice, gpt::scatter_mean_choice>>;

gpt::rule_factory demo_rules_for(const gpt::options& o) {
    return gpt::make_rule_factory<std::tuple<demo_rules>, std::tuple<gpt::adamw_choice>,
                                  gpt::no_splits>(o);
}

gpt::options parsed(std::vector<const char*> args) {
    args.insert(args.begin(), "loco_gpt");
    gpt::options o;
    REQUIRE(gpt::parse(static_cast<int>(args.size()), const_cast<char**>(args.data()), o));
    return o;
}

std::string parse_error(std::vector<const char*> args) {
    args.insert(args.begin(), "loco_gpt");
    gpt::options o;
    return error_of([&] { gpt::parse(static_cast<int>(args.size()), const_cast<char**>(args.data()), o); });
}

}  // namespace

TEST_CASE("gpt: two sign-flip attackers of five pull mean away while median holds") {
    const std::uint64_t seed = loco_test::rng_for("gpt.attack")() % 1000;
    INFO("seed " << seed);
    gpt::options o;
    o.model = {.vocab = 256, .context = 16, .dim = 16, .layers = 1, .heads = 2};
    o.data = "markov";
    o.workers = 5;
    o.steps = 40;
    o.batch = 4;
    o.every = 10;
    o.lr = 0.01f;
    o.eval_every = 40;
    o.log_every = 40;
    o.eval_sequences = 16;
    o.seed = seed;
    o.quiet = true;
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 30000, seed);
    const auto run = [&](const char* aggregate, int attackers) {
        gpt::options r = o;
        r.aggregate = aggregate;
        r.attackers = attackers;
        r.attack = "sign_flip";
        const gpt::run_result res = gpt::train(r, data, rules(r), nullptr);
        CHECK(res.syncs == 4);
        return res.final_val_loss;
    };
    const double clean = run("mean", 0);
    const double mean_attacked = run("mean", 2);
    const double median_attacked = run("median", 2);
    INFO("clean " << clean << ", mean attacked " << mean_attacked << ", median attacked "
                  << median_attacked);
    CHECK(clean < 0.8 * std::log(256.0));  // the clean run learns
    CHECK(mean_attacked > 1.15 * clean);
    CHECK(std::abs(median_attacked - clean) < 0.05 * clean);
}

TEST_CASE("gpt: --aggregate, its settings and the attack options on the command line") {
    SUBCASE("defaults change nothing") {
        const gpt::options o = parsed({});
        CHECK(o.aggregate == "mean");
        CHECK(o.attackers == 0);
        CHECK(!o.trim.has_value());
        CHECK(gpt::edit_choice::hyper(o).scope == loco::aggregate::edit_scope::fragment);
        CHECK(gpt::edit_choice::hyper(o).ewma_warmup == loco::aggregate::edit::hyper{}.ewma_warmup);
        CHECK(gpt::trimmed_mean_choice::hyper(o).trim == loco::aggregate::trimmed_mean::hyper{}.trim);
        CHECK(gpt::centered_clip_choice::hyper(o).tau == loco::aggregate::centered_clip::hyper{}.tau);
        CHECK(gpt::describe_mode(o).find("aggregate") == std::string::npos);
    }
    SUBCASE("every setting reaches its policy") {
        const gpt::options o =
            parsed({"--workers", "8", "--aggregate", "trimmed_mean", "--trim", "2", "--clip-tau",
                    "0.5", "--clip-iterations", "3", "--edit-scope", "tensor", "--edit-temperature",
                    "2", "--edit-warmup", "5", "--edit-clip", "10", "--attackers", "2", "--attack",
                    "nan"});
        CHECK(o.aggregate == "trimmed_mean");
        CHECK(gpt::trimmed_mean_choice::hyper(o).trim == 2);
        CHECK(gpt::centered_clip_choice::hyper(o).tau == 0.5f);
        CHECK(gpt::centered_clip_choice::hyper(o).iterations == 3);
        const auto e = gpt::edit_choice::hyper(o);
        CHECK(e.scope == loco::aggregate::edit_scope::tensor);
        CHECK(e.temperature == 2.0f);
        CHECK(e.ewma_warmup == 5);
        CHECK(e.clip == 10.0f);
        CHECK(o.attackers == 2);
        CHECK(o.attack == "nan");
        CHECK(gpt::describe_mode(o).ends_with(", aggregate trimmed_mean, 2 attackers (nan)"));
        CHECK_THROWS(rules(o));  // trimmed_mean is not in this test's list
        gpt::options m = o;
        m.aggregate = "median";
        CHECK_NOTHROW(rules(m));
    }
    SUBCASE("bad input: one sentence naming the fix") {
        CHECK(parse_error({"--edit-scope", "layer"}) ==
              "gpt: unknown --edit-scope 'layer'; valid: fragment, tensor");
        CHECK(parse_error({"--workers", "4", "--attackers", "4"}) ==
              "gpt: --attackers 4 leaves no honest worker of 4; choose fewer than --workers");
        CHECK(parse_error({"--trim", "-1"}) == "gpt: --trim takes a whole number, not '-1'");
        CHECK(parse_error({"--clip-tau", "x"}) == "gpt: --clip-tau takes a non-negative number, not 'x'");

        gpt::options o;
        o.aggregate = "krum";
        CHECK(error_of([&] { rules(o); }) ==
              "gpt: unknown --aggregate 'krum'; valid: mean, edit, trimmed_mean, median, "
              "centered_clip, median_norm_clip, scatter_mean");
        o = gpt::options{};
        o.attackers = 1;
        o.attack = "lie";
        CHECK(error_of([&] { rules(o); }) ==
              "gpt: unknown --attack 'lie'; valid: scaled, sign_flip, nan, random");
        o.attack = "scaled";
        o.schedule = "streaming";
        CHECK(error_of([&] { rules(o); }).starts_with("gpt: --attackers needs DiLoCo's --schedule every"));
        o = gpt::options{};
        o.sync_every_step = true;
        o.aggregate = "median";
        CHECK(error_of([&] { rules(o); }) ==
              "gpt: --sync-every-step averages gradients; drop --aggregate median");
        // A combination that is not compiled names the aggregations that are.
        o = gpt::options{};
        o.aggregate = "median";
        o.compress = "sparseloco";
        CHECK(error_of([&] { rules(o); }) ==
              "gpt: --schedule every with --inner adamw --outer nesterov --compress sparseloco "
              "--aggregate median is not compiled into this trainer; it is compiled with "
              "--inner adamw --outer nesterov --compress none --aggregate mean|median (add a combination to compiled_combinations in "
              "examples/gpt/policies.hpp)");
    }
}

TEST_CASE("gpt: --topk, --chunk, --bins, --ef-decay, --fixed-indices and --no-median-clip reach "
          "SparseLoCo's and DeMo's policies") {
    using sparseloco = std::tuple_element_t<0, gpt::frontier_compress_choices>;
    using demo = std::tuple_element_t<1, gpt::frontier_compress_choices>;
    using ef = std::tuple_element_t<4, gpt::compress_choices>;  // statistical2-ef
    static_assert(sparseloco::name == "sparseloco" && demo::name == "demo" &&
                  ef::name == "statistical2-ef");
    // One 64 x 64 matrix: N = chunks x topk kept values of 2-bit codes and their indices, after
    // a 40-byte header and 4 (1 + 4) bytes of shift and table (compress/sparseloco.hpp):
    // 40 + 20 + 4 ceil(ceil(I / 8) / 4) + 4 ceil(ceil(2 N / 8) / 4), I the index bits: per chunk
    // of `cells`, k l + k + ((cells - 1) >> l) with l = floor(log2(cells / k)) (Elias-Fano), or
    // 12 N with --fixed-indices.
    const loco::compress::segment matrix{.offset = 0, .size = 64 * 64, .rows = 64, .cols = 64};
    const auto bytes = [&](const gpt::options& o) {
        return loco::compress::sparseloco::payload_bytes(sparseloco::hyper(o), {&matrix, 1});
    };
    SUBCASE("defaults are the references' (templar, DeMo)") {
        const gpt::options o = parsed({});
        const auto s = sparseloco::hyper(o);
        CHECK(s.topk == 64);
        CHECK(s.chunk == 64);
        CHECK(s.beta == 0.95f);
        CHECK(s.indices == loco::compress::index_coding::compact);
        CHECK(bytes(o) == 40 + 20 + 64 + 16);  // N = 64, l = 6: 511 index bits
        const auto d = demo::hyper(o);
        CHECK(d.topk == 32);
        CHECK(d.chunk == 64);
        CHECK(d.decay == 0.999f);
        CHECK(d.indices == loco::compress::index_coding::compact);
        CHECK(demo::hyper(parsed({"--fixed-indices"})).indices ==
              loco::compress::index_coding::fixed);
        CHECK(ef::hyper(o).decay == 1.0f);
        CHECK(gpt::median_norm_clip_choice::hyper(o).clip);
    }
    SUBCASE("every setting reaches its policy") {
        const gpt::options o = parsed({"--compress", "sparseloco", "--topk", "16", "--chunk", "32",
                                       "--ef-decay", "0.99", "--no-median-clip"});
        const auto s = sparseloco::hyper(o);
        CHECK(s.topk == 16);
        CHECK(s.chunk == 32);
        CHECK(s.beta == 0.99f);
        // Four 32 x 32 chunks: N = 64; l = 6, 4 x 127 index bits (fixed: 4 x 16 x 10).
        CHECK(bytes(o) == 40 + 20 + 64 + 16);
        CHECK(bytes(parsed({"--topk", "16", "--chunk", "32", "--fixed-indices"})) ==
              40 + 20 + 80 + 16);
        CHECK(bytes(parsed({"--topk", "16"})) == 40 + 20 + 20 + 4);  // N = 16, l = 8: 159 bits
        CHECK(bytes(parsed({"--topk", "16", "--fixed-indices"})) == 40 + 20 + 24 + 4);
        CHECK(bytes(parsed({"--fixed-indices"})) == 40 + 20 + 96 + 16);  // templar's 12 bits
        // --bins B: ceil(log2 B)-bit codes and a table of 4 (1 + B) bytes.
        const gpt::options b16 = parsed({"--compress", "sparseloco", "--bins", "16"});
        CHECK(sparseloco::hyper(b16).bins == 16);
        CHECK(bytes(b16) == 40 + 68 + 64 + 32);
        CHECK(bytes(parsed({"--compress", "sparseloco", "--bins", "3"})) == 40 + 16 + 64 + 16);
        CHECK(bytes(parsed({"--compress", "sparseloco", "--bins", "256"})) == 40 + 1028 + 64 + 64);
        CHECK(s.bins == 4);  // unset: templar's quantization_bins
        const auto d = demo::hyper(o);
        CHECK(d.topk == 16);
        CHECK(d.chunk == 32);
        CHECK(d.decay == 0.99f);  // --ef-decay is DeMo's residual decay too
        CHECK(ef::hyper(o).decay == 0.99f);
        CHECK(!gpt::median_norm_clip_choice::hyper(o).clip);
    }
    SUBCASE("bad settings: one sentence, before any data is loaded") {
        CHECK(parse_error({"--topk", "-3"}) == "gpt: --topk takes a whole number, not '-3'");
        CHECK(parse_error({"--chunk", "x"}) == "gpt: --chunk takes a whole number, not 'x'");
        CHECK(parse_error({"--bins", "16"}) ==
              "gpt: --bins sets SparseLoCo's quantization; it needs --compress sparseloco or "
              "--head-compress sparseloco");
        CHECK(parse_error({"--compress", "demo", "--bins", "16"}) ==
              "gpt: --bins sets SparseLoCo's quantization; it needs --compress sparseloco or "
              "--head-compress sparseloco");
        gpt::options o;
        o.outer = "sgd";
        o.compress = "sparseloco";
        o.aggregate = "median_norm_clip";
        CHECK_NOTHROW(sparse_rules(o));
        o.topk = 0;
        CHECK(error_of([&] { sparse_rules(o); }) ==
              "loco::compress::sparseloco: topk must be in [1, 65535] (0 sends nothing)");
        o.topk = (std::uint64_t{1} << 32) + 64;  // saturates, does not wrap to 64
        CHECK(error_of([&] { sparse_rules(o); }) ==
              "loco::compress::sparseloco: topk must be in [1, 65535] (0 sends nothing)");
        o.topk = 16;
        o.chunk = 2;
        CHECK(error_of([&] { sparse_rules(o); }) ==
              "loco::compress::sparseloco: topk must not exceed the chunk's chunk x chunk cells; "
              "lower topk or raise chunk");
        o.chunk.reset();
        o.bins = 1;
        CHECK(error_of([&] { sparse_rules(o); }) ==
              "loco::compress::sparseloco: bins must be in [2, 256]");
        o.bins = (std::uint64_t{1} << 32) + 4;  // saturates, does not wrap to 4
        CHECK(error_of([&] { sparse_rules(o); }) ==
              "loco::compress::sparseloco: bins must be in [2, 256]");
        o.bins.reset();
        o.ef_decay = 1.0f;
        CHECK(error_of([&] { sparse_rules(o); }) ==
              "loco::compress::sparseloco: beta must be in [0, 1) (templar: 0.95)");
        o.outer = "nesterov";
        o.compress = "demo";
        o.aggregate = "mean";
        CHECK(error_of([&] { demo_rules_for(o); }) ==
              "loco::compress::demo: decay must be in [0, 1) (DeMo: 0.999)");
        o.ef_decay = 0.5f;
        CHECK_NOTHROW(demo_rules_for(o));
        // DeMo's own aggregation is offered with DeMo, and refused (not compiled) with SparseLoCo.
        const gpt::options scatter = parsed({"--compress", "demo", "--aggregate", "scatter_mean"});
        CHECK(scatter.aggregate == "scatter_mean");
        CHECK_NOTHROW(demo_rules_for(scatter));
        gpt::options sparse_scatter = scatter;
        sparse_scatter.outer = "sgd";
        sparse_scatter.compress = "sparseloco";
        CHECK(error_of([&] { sparse_rules(sparse_scatter); }).find("is not compiled into this trainer") !=
              std::string::npos);
    }
}

TEST_CASE("gpt: under --attackers a run never stops for skipped syncs") {
    // --attack nan makes every sync of `mean` skip (a NaN pseudo-gradient): one more in a row than
    // loco stops a run at by default, and the run ends on the model it started from.
    using handle = loco::diloco<gpt::adamw_choice::type, gpt::nesterov_choice::type,
                                loco::compress::none, loco::schedule::every, loco::aggregate::mean>;
    const std::uint64_t stops_after = handle::config{}.max_skipped_syncs;
    REQUIRE(stops_after > 0);
    const std::uint64_t seed = loco_test::rng_for("gpt.attack.skipped")() % 1000;
    INFO("seed " << seed);
    gpt::options o;
    o.model = {.vocab = 256, .context = 8, .dim = 8, .layers = 1, .heads = 2};
    o.data = "markov";
    o.workers = 2;
    o.steps = stops_after + 1;
    o.batch = 1;
    o.every = 1;
    o.lr = 0.01f;
    o.eval_every = o.steps;
    o.log_every = o.steps;
    o.eval_sequences = 4;
    o.seed = seed;
    o.quiet = true;
    o.attackers = 1;
    o.attack = "nan";
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 4000, seed);
    gpt::run_result r;
    CHECK(error_of([&] { r = gpt::train(o, data, rules(o), nullptr); }) == "");
    REQUIRE(!r.rows.empty());
    CHECK(r.syncs == 0);
    CHECK(std::isfinite(r.final_val_loss));
    CHECK(r.final_val_loss == r.rows.front().val_loss);
}
