// The GPT example end to end (examples/gpt): a short DiLoCo run on two thread workers learns
// (its validation loss falls well below ln 256, and never below the source's entropy floor);
// the synchronous baseline keeps every worker on the same parameters; the Markov source's entropy
// rate against an independent computation, and at large sharpness; the fortunes loader's order,
// filter and split; validation every --eval-every steps; the inner optimizers' weight decay; the
// parameters' roles for Muon; --warmup 0; --csv before and after the run; and the one-sentence
// errors for bad input. The validation windows and the shards against their definitions, the
// learning-rate schedule and the validation mean against closed forms, the policies' defaults and
// the defaults of docs/gpt.md's table of flags.
#include <doctest/doctest.h>

#include "support/errors.hpp"

#include "support/random.hpp"

#include "../examples/gpt/cli.hpp"
#include "../examples/gpt/data.hpp"
#include "../examples/gpt/run.hpp"
#include "../examples/gpt/trainer.hpp"

#include <loco/groups.hpp>
#include <loco/optimizer.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <numbers>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace {

// A model small enough for the sanitizers: 1 block of width 16 over 16-byte windows.
gpt::options tiny_options(std::uint64_t seed) {
    gpt::options o;
    o.model = {.vocab = 256, .context = 16, .dim = 16, .layers = 1, .heads = 2};
    o.data = "markov";
    o.workers = 2;
    o.steps = 50;
    o.batch = 4;
    o.every = 10;
    o.lr = 0.01f;
    o.eval_every = 25;
    o.eval_sequences = 16;
    o.seed = seed;
    o.quiet = true;
    return o;
}

using loco_test::error_of;

// The rules these tests run, compiled alone: every compiled combination is in loco_gpt, whose
// CTest entry runs it.
using adamw_nesterov_none =
    gpt::combinations<std::tuple<gpt::adamw_choice>, std::tuple<gpt::nesterov_choice>,
                      std::tuple<std::tuple_element_t<0, gpt::compress_choices>>,
                      gpt::schedule_choices>;

gpt::rule_factory adamw_rules(const gpt::options& o) {
    return gpt::make_rule_factory<std::tuple<adamw_nesterov_none>, std::tuple<gpt::adamw_choice>,
                                  gpt::no_splits>(o);
}

// Everything written to a tmpfile().
std::string contents(std::FILE* f) {
    std::fflush(f);
    std::rewind(f);
    std::string text;
    for (int c; (c = std::fgetc(f)) != EOF;) text += static_cast<char>(c);
    return text;
}

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) out.push_back(line);
    return out;
}

// `s` without the spaces and backticks around it.
std::string strip(std::string s) {
    const auto keep = [](char c) { return c != ' ' && c != '`'; };
    s.erase(s.begin(), std::find_if(s.begin(), s.end(), keep));
    s.erase(std::find_if(s.rbegin(), s.rend(), keep).base(), s.end());
    return s;
}

// The pieces of `text` between the separators `sep`, stripped.
std::vector<std::string> split(const std::string& text, const std::string& sep) {
    std::vector<std::string> out;
    for (std::size_t at = 0;;) {
        const std::size_t next = text.find(sep, at);
        out.push_back(strip(text.substr(at, next == std::string::npos ? next : next - at)));
        if (next == std::string::npos) return out;
        at = next + sep.size();
    }
}

// The default column of docs/gpt.md's table of flags, by flag: a row of k flags whose default
// cell lists k values gives each flag its own, a row of one flag the whole cell. The page is
// found from this file's path (tests/../docs/gpt.md).
std::map<std::string, std::string> documented_defaults() {
    const std::filesystem::path path =
        std::filesystem::path(__FILE__).parent_path().parent_path() / "docs" / "gpt.md";
    std::ifstream in(path);
    REQUIRE_MESSAGE(in.is_open(), "cannot read " << path);
    std::map<std::string, std::string> out;
    bool flags = false;
    for (std::string line; std::getline(in, line);) {
        if (line.starts_with("## ")) flags = line == "## Flags";
        if (!flags || !line.starts_with("| `--")) continue;
        std::vector<std::string> cells{""};  // split at the '|' that are not escaped
        for (std::size_t i = 1; i < line.size(); ++i) {
            if (line[i] == '|' && line[i - 1] != '\\') {
                cells.emplace_back();
            } else {
                cells.back() += line[i];
            }
        }
        if (cells.size() < 3) continue;
        std::vector<std::string> names = split(cells[0], ", ");
        for (std::string& name : names) name = name.substr(0, name.find(' '));  // `--H N`
        const std::vector<std::string> values = split(cells[1], ", ");
        if (values.size() == names.size()) {
            for (std::size_t k = 0; k < names.size(); ++k) out[names[k]] = values[k];
        } else if (names.size() == 1) {
            out[names[0]] = strip(cells[1]);
        }
    }
    return out;
}

}  // namespace

TEST_CASE("gpt: 50 DiLoCo steps on two workers bring the loss well below ln 256") {
    const std::uint64_t seed = loco_test::rng_for("gpt.smoke")() % 1000;
    INFO("seed " << seed);
    const gpt::options o = tiny_options(seed);
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 20000, seed);
    const gpt::run_result r = gpt::train(o, data, adamw_rules(o), nullptr);
    const double uniform = std::log(256.0);
    REQUIRE(r.rows.size() >= 2);
    CHECK(std::abs(r.rows.front().val_loss - uniform) < 0.2);  // a fresh model knows nothing
    CHECK(r.final_val_loss < 0.6 * uniform);
    // No model beats the entropy rate of the source by more than the noise of 256 tokens.
    CHECK(r.final_val_loss > *data.entropy_floor - 0.1);
    CHECK(r.syncs == 5);
    // Per worker: the initial broadcast and 5 fp32 all-reduces of the model.
    CHECK(r.bytes_per_worker > 0);
}

TEST_CASE("gpt: the synchronous baseline all-reduces gradients every step") {
    gpt::options o = tiny_options(3);
    o.sync_every_step = true;
    o.steps = 12;
    o.log_every = 4;
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 20000, 3);
    const gpt::run_result r = gpt::train(o, data, adamw_rules(o), nullptr);
    CHECK(r.syncs == 12);
    CHECK(r.final_val_loss < std::log(256.0));
    REQUIRE(r.rows.size() == 4);  // step 0, 4, 8, 12
    CHECK(r.rows.back().step == 12);
}

TEST_CASE("gpt: streaming DiLoCo syncs fragments of whole layers, one at a time") {
    // Blocks are their own layers; the embeddings ride with the first, ln_f and the head with the
    // last.
    CHECK(gpt::layer_of("wte", 3) == 0);
    CHECK(gpt::layer_of("wpe", 3) == 0);
    CHECK(gpt::layer_of("h0.ln1.g", 3) == 0);
    CHECK(gpt::layer_of("h2.mlp.fc.w", 3) == 2);
    CHECK(gpt::layer_of("h12.attn.qkv.b", 13) == 12);
    CHECK(gpt::layer_of("ln_f.b", 3) == 2);
    CHECK(gpt::layer_of("head.w", 3) == 2);

    const std::uint64_t seed = loco_test::rng_for("gpt.streaming")() % 1000;
    INFO("seed " << seed);
    gpt::options o = tiny_options(seed);
    o.model.layers = 2;
    o.steps = 48;
    o.every = 8;
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 20000, seed);
    const gpt::run_result whole = gpt::train(o, data, adamw_rules(o), nullptr);
    o.schedule = "streaming";
    o.fragments = 2;
    o.overlap = 1;
    o.alpha = 0.5f;
    const gpt::run_result streamed = gpt::train(o, data, adamw_rules(o), nullptr);
    CHECK(whole.syncs == 6);
    // Each of the 2 fragments syncs every 8 steps (6 times), then the run ends with one sync of
    // both.
    CHECK(streamed.syncs == 2 * 6 + 2);
    CHECK(streamed.final_val_loss < 0.6 * std::log(256.0));
    // Per H steps streaming sends the model once, as DiLoCo does, in two halves: with the final
    // sync it sends 7 models where DiLoCo sends 6 (besides the initial broadcast, and the few
    // bytes of each sync's agreement).
    const auto exchanged = [](const gpt::run_result& r) {
        return double(r.rows.back().bytes_sent - r.rows.front().bytes_sent);
    };
    CHECK(exchanged(streamed) / exchanged(whole) == doctest::Approx(7.0 / 6.0).epsilon(0.01));
}

TEST_CASE("gpt: the delayed schedule applies each round's exchange one round late") {
    gpt::options o = tiny_options(5);
    o.schedule = "delayed";
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 20000, 5);
    const gpt::run_result r = gpt::train(o, data, adamw_rules(o), nullptr);
    // Rounds end at steps 10, 20, ..., 50; the exchanges of the first four are applied at 20 ...
    // 50, the fifth's and one more of the whole model by the final sync.
    CHECK(r.syncs == 4 + 2);
    CHECK(r.final_val_loss < 0.6 * std::log(256.0));
}

TEST_CASE("gpt: the Markov source's entropy rate against power iteration and a sample") {
    auto rng = loco_test::rng_for("gpt.markov");
    const std::uint64_t seed = rng();
    const std::size_t a = 5;
    const gpt::markov_chain m = gpt::make_markov_chain(a, 1.5, seed);
    // Stationary distribution by iterating the pair chain from uniform, independent of the
    // elimination in data.hpp.
    std::vector<double> pi(a * a, 1.0 / double(a * a)), next(a * a);
    for (int it = 0; it < 5000; ++it) {
        std::fill(next.begin(), next.end(), 0.0);
        for (std::size_t x = 0; x < a; ++x)
            for (std::size_t y = 0; y < a; ++y)
                for (std::size_t z = 0; z < a; ++z)
                    next[y * a + z] += pi[x * a + y] * m.next[(x * a + y) * a + z];
        pi.swap(next);
    }
    for (std::size_t s = 0; s < a * a; ++s) CHECK(std::abs(pi[s] - m.stationary[s]) < 1e-12);
    // The mean surprise of a long sample converges to the entropy rate.
    const std::size_t len = 200000;
    const auto text = gpt::sample_markov(m, len, seed + 1);
    double total = 0.0, sq = 0.0;
    for (std::size_t i = 2; i < len; ++i) {
        const std::size_t x = text[i - 2] - 'a', y = text[i - 1] - 'a', z = text[i] - 'a';
        const double s = -std::log(m.next[(x * a + y) * a + z]);
        total += s;
        sq += s * s;
    }
    const double n = double(len - 2), mean = total / n;
    const double sd = std::sqrt(sq / n - mean * mean);
    INFO("sample mean " << mean << ", entropy rate " << m.entropy_rate);
    // The sample is correlated; 6 naive standard errors is still a tight, failing-capable bound.
    CHECK(std::abs(mean - m.entropy_rate) < 6.0 * sd / std::sqrt(n));
}

TEST_CASE("gpt: the Markov source is independent of the model's initialisation and the samplers") {
    auto rng = loco_test::rng_for("gpt.markov.seeds");
    for (const std::uint64_t seed : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{rng()}}) {
        INFO("seed " << seed);
        // Row by row, the chain's centred log-probabilities are sharpness times its centred
        // normal draws; the embedding's first weights are 0.02 times the initialiser's. Drawn
        // from one generator they are the same numbers (correlation 1); independent draws give
        // a correlation of about 1/sqrt(4096) = 0.016.
        const std::size_t a = 16;
        const gpt::markov_chain m = gpt::markov_source(a, 2.0, seed);
        const gpt::layout lay(gpt::model_config{});
        std::vector<double> params(lay.total());
        gpt::initialise<double>(lay, params, seed);
        REQUIRE(lay.tensors().front().name == "wte");
        REQUIRE(lay.tensors().front().size() >= a * a * a);
        double sxy = 0.0, sxx = 0.0, syy = 0.0;
        for (std::size_t row = 0; row < a * a; ++row) {
            double mx = 0.0, my = 0.0;
            for (std::size_t c = 0; c < a; ++c) {
                mx += std::log(m.next[row * a + c]) / double(a);
                my += params[row * a + c] / double(a);
            }
            for (std::size_t c = 0; c < a; ++c) {
                const double x = std::log(m.next[row * a + c]) - mx;
                const double y = params[row * a + c] - my;
                sxy += x * y;
                sxx += x * x;
                syy += y * y;
            }
        }
        const double correlation = sxy / std::sqrt(sxx * syy);
        INFO("correlation " << correlation);
        CHECK(std::abs(correlation) < 0.1);
        // The sample's generator is seeded apart from the chain's, the model's (--seed) and every
        // worker's window sampler (seed * 1000003 + rank, trainer.hpp).
        const std::uint64_t sample = gpt::markov_sample_seed(seed);
        CHECK(sample != gpt::markov_chain_seed(seed));
        CHECK(sample != seed);
        for (std::uint64_t rank = 0; rank < 256; ++rank) CHECK(sample != seed * 1000003 + rank);
    }
}

TEST_CASE("gpt: the fortunes loader reads sorted text files, skips indices and links, splits 90/10") {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() /
                         ("loco_gpt_fortunes_" + std::to_string(loco_test::rng_for("gpt.dir")()));
    fs::create_directories(dir);
    const auto write = [&](const char* name, const std::string& text) {
        std::ofstream(dir / name, std::ios::binary) << text;
    };
    write("zeta", std::string(10, 'z'));
    write("alpha", std::string(20, 'a'));
    write("alpha.dat", "index bytes");
    fs::create_symlink(dir / "alpha", dir / "alpha.u8");
    fs::create_symlink(dir / "zeta", dir / "another-link");
    const gpt::corpus c = gpt::load_fortunes(dir);
    fs::remove_all(dir);
    CHECK(std::string(c.train.begin(), c.train.end()) == std::string(18, 'a') + std::string(9, 'z'));
    CHECK(std::string(c.validation.begin(), c.validation.end()) == "aaz");
    CHECK(!c.entropy_floor.has_value());
}

TEST_CASE("gpt: bad input gets one sentence that names the fix") {
    SUBCASE("missing corpus") {
        const std::string e = error_of([] { gpt::load_fortunes("/nonexistent/fortunes"); });
        CHECK(e.find("apt-get install fortunes") != std::string::npos);
        CHECK(e.find("scripts/install-deps") != std::string::npos);
    }
    SUBCASE("unknown policy names list the valid ones") {
        CHECK(error_of([] { gpt::check_choice<gpt::inner_choices>("adam", "--inner"); }) ==
              "gpt: unknown --inner 'adam'; valid: adamw, sgd, lion, muon");
        CHECK(error_of([] { gpt::check_choice<gpt::outer_choices>("lookahead", "--outer"); }) ==
              "gpt: unknown --outer 'lookahead'; valid: nesterov, sgd, adam");
        CHECK(error_of([] { gpt::check_choice<gpt::compress_choices>("int8", "--compress"); }) ==
              "gpt: unknown --compress 'int8'; valid: none, bf16, blockwise4, statistical2, "
              "statistical2-ef");
        CHECK(error_of([] { gpt::check_choice<gpt::schedule_choices>("sometimes", "--schedule"); }) ==
              "gpt: unknown --schedule 'sometimes'; valid: every, streaming, delayed");
        // The factory checks every name, also one a synchronous run does not use.
        gpt::options o = tiny_options(1);
        o.sync_every_step = true;
        o.outer = "lookahead";
        CHECK(error_of([&] { adamw_rules(o); }).starts_with("gpt: unknown --outer 'lookahead'"));
    }
    SUBCASE("a combination that is not compiled lists those that are") {
        gpt::options o = tiny_options(1);
        o.schedule = "streaming";
        o.inner = "muon";
        CHECK(error_of([&] { adamw_rules(o); }) ==
              "gpt: --schedule streaming with --inner muon --outer nesterov --compress none is not "
              "compiled into this trainer; it is compiled with --inner adamw --outer nesterov "
              "--compress none (add a combination to compiled_combinations in "
              "examples/gpt/policies.hpp)");
        // A schedule's own checks run when the rule is chosen, before any data is loaded.
        o.inner = "adamw";
        o.every = 10;
        o.fragments = 4;
        CHECK(error_of([&] { adamw_rules(o); }).find("must be a positive multiple of fragments") !=
              std::string::npos);
    }
    SUBCASE("a parameter count that overflows") {
        const gpt::model_config c{.dim = std::size_t{1} << 33, .layers = 4};
        const std::string e = error_of([&] { gpt::layout{c}; });
        CHECK(e.find("overflows a 64-bit count") != std::string::npos);
    }
    SUBCASE("a context longer than the data") {
        gpt::options o = tiny_options(1);
        o.model.context = 4096;
        const gpt::corpus data = gpt::make_markov_corpus(4, 1.0, 3000, 1);
        const std::string e = error_of([&] { gpt::train(o, data, adamw_rules(o), nullptr); });
        CHECK(e.find("fewer than --context + 1 = 4097") != std::string::npos);
    }
    SUBCASE("command-line mistakes") {
        gpt::options o;
        const char* unknown[] = {"loco_gpt", "--step", "5"};
        CHECK(error_of([&] { gpt::parse(3, const_cast<char**>(unknown), o); }) ==
              "gpt: unknown option '--step'; see --help");
        const char* negative[] = {"loco_gpt", "--steps", "-5"};
        CHECK(error_of([&] { gpt::parse(3, const_cast<char**>(negative), o); }) ==
              "gpt: --steps takes a whole number, not '-5'");
        const char* pattern[] = {"loco_gpt", "--pattern", "random"};
        CHECK(error_of([&] { gpt::parse(3, const_cast<char**>(pattern), o); }) ==
              "gpt: unknown --pattern 'random'; valid: strided, sequential");
        const char* data[] = {"loco_gpt", "--data", "shakespeare"};
        CHECK(error_of([&] { gpt::parse(3, const_cast<char**>(data), o); }) ==
              "gpt: unknown --data 'shakespeare'; valid: fortunes, markov");
        // strtoull skips leading spaces: " -1" wrapped to 2^64 - 1.
        const char* spaced[] = {"loco_gpt", "--H", " -1"};
        CHECK(error_of([&] { gpt::parse(3, const_cast<char**>(spaced), o); }) ==
              "gpt: --H takes a whole number, not ' -1'");
    }
}

TEST_CASE("gpt: options refused before anything is loaded exit 2, a run that fails exits 1") {
    // An unknown name, an impossible shape, a count of 0, a setting a policy refuses: a bad
    // command line (2), refused before any data is loaded (they exited 1, some only after
    // training had started: a --trim that leaves no worker at the first sync).
    // AdamW and Nesterov, no compressor, every or streaming, mean or trimmed_mean; and Lion and
    // Muon under `every` and the mean, for their own settings (compiled alone).
    using trimmed = gpt::combinations<std::tuple<gpt::adamw_choice>,
                                      std::tuple<gpt::nesterov_choice>,
                                      std::tuple<std::tuple_element_t<0, gpt::compress_choices>>,
                                      std::tuple<gpt::every_choice, gpt::streaming_choice>,
                                      std::tuple<gpt::mean_choice, gpt::trimmed_mean_choice>>;
    using other_inners =
        gpt::combinations<std::tuple<gpt::lion_choice, gpt::muon_choice>,
                          std::tuple<gpt::nesterov_choice>,
                          std::tuple<std::tuple_element_t<0, gpt::compress_choices>>,
                          std::tuple<gpt::every_choice>>;
    const auto status = [](const gpt::options& o, std::string& err) {
        std::FILE* out_file = std::tmpfile();
        std::FILE* err_file = std::tmpfile();
        REQUIRE(out_file != nullptr);
        REQUIRE(err_file != nullptr);
        const int s = gpt::run(
            o,
            [](const gpt::options& opts) {
                return gpt::make_rule_factory<std::tuple<trimmed, other_inners>,
                                              std::tuple<gpt::adamw_choice>, gpt::no_splits>(opts);
            },
            out_file, err_file);
        err = contents(err_file);
        if (s == 2) CHECK(contents(out_file) == "");  // nothing was loaded or trained
        std::fclose(out_file);
        std::fclose(err_file);
        return s;
    };
    std::string err;
    gpt::options o = tiny_options(1);
    o.inner = "adam";
    CHECK(status(o, err) == 2);
    CHECK(err.find("gpt: unknown --inner 'adam'") == 0);
    o = tiny_options(1);
    o.model.heads = 3;
    CHECK(status(o, err) == 2);
    o = tiny_options(1);
    o.steps = 0;
    CHECK(status(o, err) == 2);
    o = tiny_options(1);
    o.every = 0;
    CHECK(status(o, err) == 2);
    o = tiny_options(1);
    o.outer_momentum = 1.5f;
    CHECK(status(o, err) == 2);
    // So are inner settings, of every inner optimizer and with --sync-every-step: they exited 1,
    // after the data was loaded (validate_choice called hyper(o), which no inner choice has: its
    // hyper-parameters take the lr factor too, so the check compiled to nothing).
    o = tiny_options(1);
    o.lr = 1e20f;
    o.weight_decay = 1e20f;
    CHECK(status(o, err) == 2);
    CHECK(err.find("loco::inner::adamw: lr * weight_decay overflows a float") == 0);
    o.sync_every_step = true;  // the synchronous rule's own check
    CHECK(status(o, err) == 2);
    CHECK(err.find("loco::inner::adamw: lr * weight_decay overflows a float") == 0);
    o = tiny_options(1);
    o.inner = "lion";
    o.weight_decay = 2e38f;  // x 3 for Lion: inf
    CHECK(status(o, err) == 2);
    CHECK(err.find("loco::inner::lion: weight_decay must be finite and >= 0") == 0);
    o = tiny_options(1);
    o.inner = "muon";
    o.muon_lr = 1e20f;
    o.weight_decay = 1e20f;  // Muon's group refuses it, not its AdamW one (lr 0.01)
    CHECK(status(o, err) == 2);
    CHECK(err == "loco::inner::muon: lr * weight_decay overflows a float\n");
    // An lr that Muon refuses only for a shape (lr x the shape's factor overflows: sqrt(3) for
    // the 3d x d attention matrix, 2 for the MLP's 4d x d): it exited 1 at the first step, after
    // loading.
    o = tiny_options(1);
    o.inner = "muon";
    o.muon_lr = 2e38f;
    CHECK(status(o, err) == 2);
    CHECK(err.find("loco::inner::muon: lr ") == 0);
    CHECK(err.find("times the learning-rate factor 1.732051 of a 48 x 16 matrix overflows") !=
          std::string::npos);
    o.muon_lr = std::numeric_limits<float>::quiet_NaN();  // validate()'s sentence, not the shape's
    CHECK(status(o, err) == 2);
    CHECK(err.find("loco::inner::muon: lr must be finite and >= 0") == 0);
    // The lr the decay ends at is checked too, not only the peak's: a negative final fraction
    // turns the lr negative late in the run.
    o = tiny_options(1);
    o.final_lr_fraction = -1.0f;
    CHECK(status(o, err) == 2);
    CHECK(err.find("loco::inner::adamw: lr must be finite and >= 0, got -") == 0);
    o = tiny_options(1);
    o.aggregate = "trimmed_mean";
    CHECK(status(o, err) == 2);
    CHECK(err == "gpt: --trim 1 drops 2 x 1 of the 2 workers' values; choose 2B < --workers\n");
    o.trim = std::uint64_t{1} << 63;  // 2 x 2^63 wrapped to 0, and the check passed
    CHECK(status(o, err) == 2);
    CHECK(err.find("gpt: --trim 9223372036854775808 drops") == 0);
    o = tiny_options(1);
    o.schedule = "streaming";
    o.every = 12;
    o.fragments = 4;  // 1 layer: fragments are whole layers
    CHECK(status(o, err) == 2);
    CHECK(err.find("gpt: --fragments 4 needs at least that many layers") == 0);
    o = tiny_options(1);
    o.sync_every_step = true;
    o.schedule = "delayed";
    CHECK(status(o, err) == 2);
    CHECK(err == "gpt: --sync-every-step averages gradients every step, with no schedule; drop "
                 "--schedule delayed\n");
    // The Markov source's settings and the data's buffers: refused before loading too (they
    // exited 1, the buffers with a bare std::bad_alloc after the data was loaded).
    o = tiny_options(1);
    o.markov_alphabet = 40;
    CHECK(status(o, err) == 2);
    CHECK(err.find("--markov-alphabet must be between 2 and 32") != std::string::npos);
    o = tiny_options(1);
    o.markov_sharpness = 1e6;
    CHECK(status(o, err) == 2);
    CHECK(err.find("--markov-sharpness 1e+06 makes transition probabilities") != std::string::npos);
    o = tiny_options(1);
    o.eval_sequences = std::size_t{1} << 40;  // 32 TiB of windows
    CHECK(status(o, err) == 2);
    CHECK(err.find("gpt: --eval-sequences") == 0);
    o = tiny_options(1);
    o.markov_bytes = std::size_t{1} << 62;
    CHECK(status(o, err) == 2);
    CHECK(err.find("gpt: --markov-bytes") == 0);
    o.markov_bytes = (std::size_t{1} << 63) + 5;  // twice that overflows: named, not --batch
    CHECK(status(o, err) == 2);
    CHECK(err.find("gpt: --markov-bytes 9223372036854775813 asks for more bytes") == 0);
    o = tiny_options(1);
    o.eval_sequences = std::size_t{1} << 60;
    CHECK(status(o, err) == 2);
    CHECK(err.find("gpt: --eval-sequences 1152921504606846976 asks for more bytes") == 0);
    o = tiny_options(1);
    o.markov_bytes = 100;  // a validation split of 10 bytes, short of one window
    CHECK(status(o, err) == 2);
    CHECK(err.find("gpt: the validation split holds 10 bytes") == 0);
    // --require-below 0: no loss is below 0, so the finished run fails (it was taken as "off").
    o = tiny_options(1);
    o.steps = 2;
    o.markov_bytes = 20000;
    o.require_below = 0.0;
    CHECK(status(o, err) == 1);
    CHECK(err.find("is not below 0 (--require-below)") != std::string::npos);
}

TEST_CASE("gpt: the Markov source at a large sharpness keeps positive rows and an exact stationary distribution") {
    // Nearly deterministic rows make the pair chain nearly reducible: plain elimination of
    // pi (Q - I) = 0 then returned negative or wholly wrong probabilities (over 2 symbols at
    // sharpness 20, seed 7: off by 1), and without the row maximum subtracted exp() underflowed.
    for (const std::size_t a : {2, 5, 16}) {
        for (const double sharpness : {20.0, 60.0}) {
            for (const std::uint64_t seed : {1, 7}) {
                INFO("alphabet " << a << ", sharpness " << sharpness << ", seed " << seed);
                const gpt::markov_chain m = gpt::make_markov_chain(a, sharpness, seed);
                CHECK(*std::min_element(m.next.begin(), m.next.end()) >=
                      std::numeric_limits<double>::min());
                CHECK(std::isfinite(m.entropy_rate));
                CHECK(m.entropy_rate >= 0.0);
                // pi Q = pi, entry by entry to a few ulps of each (tiny) probability.
                double total = 0.0;
                for (std::size_t t = 0; t < a * a; ++t) {
                    double in = 0.0;  // probability flowing into pair state (y, z) = t
                    for (std::size_t x = 0; x < a; ++x) {
                        const std::size_t from = x * a + t / a;
                        in += m.stationary[from] * m.next[from * a + t % a];
                    }
                    CHECK(m.stationary[t] > 0.0);
                    CHECK(std::abs(in - m.stationary[t]) <= 1e-12 * m.stationary[t]);
                    total += m.stationary[t];
                }
                CHECK(std::abs(total - 1.0) < 1e-12);
            }
        }
    }
}

TEST_CASE("gpt: a Markov sharpness whose probabilities underflow is refused with its bound") {
    // It printed "entropy rate -nan" (0 log 0 at 150; inf / inf at 1000) and trained on it.
    const std::string e = error_of([] { gpt::make_markov_chain(16, 150.0, 1); });
    const std::string head = "gpt: --markov-sharpness 150 makes transition probabilities of this "
                             "chain underflow to zero; use at most ";
    const std::string tail = " with this --markov-alphabet and --seed";
    INFO(e);
    REQUIRE(e.starts_with(head));
    REQUIRE(e.ends_with(tail));
    const double bound = std::stod(e.substr(head.size(), e.size() - head.size() - tail.size()));
    CHECK(bound > 50.0);
    CHECK(bound < 150.0);
    // The bound it names works, and is the largest whole sharpness that does: it was a safe
    // estimate below it (loco_gpt over 16 symbols at --seed 1 named 113 and took 114).
    const gpt::markov_chain m = gpt::make_markov_chain(16, bound, 1);
    CHECK(std::isfinite(m.entropy_rate));
    CHECK(*std::min_element(m.next.begin(), m.next.end()) >= std::numeric_limits<double>::min());
    // Refused, with the same bound whatever the refused sharpness (bisected down from it).
    const std::string named = e.substr(e.find("use at most "));
    for (const double s : {bound + 1.0, 1e6, 1e300}) {
        INFO("sharpness " << s);
        CHECK(error_of([&] { gpt::make_markov_chain(16, s, 1); }).ends_with(named));
    }
    // Over other alphabets and seeds: named, taken, and the next whole number refused.
    for (const std::size_t a : {2, 5, 16}) {
        for (const std::uint64_t seed : {7, 12345}) {
            INFO("alphabet " << a << ", seed " << seed);
            const std::string ea = error_of([&] { gpt::make_markov_chain(a, 1e300, seed); });
            REQUIRE(ea.find("use at most ") != std::string::npos);
            const double b = std::stod(ea.substr(ea.find("use at most ") + 12));
            CHECK(error_of([&] { gpt::make_markov_chain(a, b, seed); }).empty());
            CHECK(!error_of([&] { gpt::make_markov_chain(a, b + 1.0, seed); }).empty());
        }
    }
    CHECK(error_of([] { gpt::make_markov_chain(16, 1000.0, 1); })
              .starts_with("gpt: --markov-sharpness 1000 makes transition probabilities"));
    CHECK(error_of([] { gpt::make_markov_corpus(16, 1000.0, 20000, 1); })
              .starts_with("gpt: --markov-sharpness 1000 makes transition probabilities"));
}

TEST_CASE("gpt: validation runs every --eval-every steps, also between --log-every lines") {
    // It ran only on steps that were also a multiple of --log-every: at 0 and 12 here, not at 6.
    gpt::options o = tiny_options(4);
    o.steps = 12;
    o.log_every = 4;
    o.eval_every = 6;
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 20000, 4);
    const gpt::run_result r = gpt::train(o, data, adamw_rules(o), nullptr);
    std::vector<std::uint64_t> steps, validated;
    for (const gpt::progress_row& row : r.rows) {
        steps.push_back(row.step);
        if (!std::isnan(row.val_loss)) validated.push_back(row.step);
    }
    CHECK(steps == std::vector<std::uint64_t>{0, 4, 6, 8, 12});
    CHECK(validated == std::vector<std::uint64_t>{0, 6, 12});
    // The tokens all workers trained on by the row's step, M x B x T a step: none at step 0.
    const std::uint64_t per_step =
        static_cast<std::uint64_t>(o.workers) * o.batch * o.model.context;
    for (const gpt::progress_row& row : r.rows) CHECK(row.tokens == row.step * per_step);
    // The train loss of each row is the mean over the steps since the row before it: the same
    // run with a row every step (the rows do not change the training) gives the per-step losses.
    gpt::options every_step = o;
    every_step.log_every = 1;
    const gpt::run_result fine = gpt::train(every_step, data, adamw_rules(every_step), nullptr);
    REQUIRE(fine.rows.size() == 13);
    for (std::size_t i = 1; i < r.rows.size(); ++i) {
        const std::uint64_t from = r.rows[i - 1].step, to = r.rows[i].step;
        double sum = 0.0;
        for (std::uint64_t k = from + 1; k <= to; ++k) sum += fine.rows[k].train_loss;
        CAPTURE(to);
        CHECK(r.rows[i].train_loss ==
              doctest::Approx(sum / static_cast<double>(to - from)).epsilon(1e-6));
    }
    // The CSV has the same rows, val_loss empty where it was not measured.
    namespace fs = std::filesystem;
    const fs::path path = fs::temp_directory_path() /
                          ("loco_gpt_eval_" + std::to_string(loco_test::rng_for("gpt.eval")()) +
                           ".csv");
    gpt::write_csv(path.string(), r);
    std::ifstream in(path);
    std::ostringstream text;
    text << in.rdbuf();
    fs::remove(path);
    const std::vector<std::string> lines = lines_of(text.str());
    REQUIRE(lines.size() == 6);
    CHECK(lines[0] == "step,train_loss,val_loss,tokens,bytes_sent,seconds");
    const auto field = [](const std::string& line, int k) {
        std::size_t at = 0;
        for (int i = 0; i < k; ++i) at = line.find(',', at) + 1;
        return line.substr(at, line.find(',', at) - at);
    };
    const std::vector<std::string> csv_steps = {"0", "4", "6", "8", "12"};
    const std::vector<bool> has_val = {true, false, true, false, true};
    for (std::size_t i = 0; i < 5; ++i) {
        INFO(lines[i + 1]);
        CHECK(field(lines[i + 1], 0) == csv_steps[i]);
        CHECK(field(lines[i + 1], 2).empty() == !has_val[i]);
        CHECK(field(lines[i + 1], 3) == std::to_string(std::stoull(csv_steps[i]) * per_step));
    }
}

TEST_CASE("gpt: --weight-decay reaches every inner optimizer, and unset each keeps its default") {
    gpt::options o;  // --weight-decay not given
    CHECK(gpt::adamw_choice::hyper(o, 1.0f).weight_decay == 0.1f);
    CHECK(gpt::lion_choice::hyper(o, 1.0f).weight_decay == doctest::Approx(0.3f));
    CHECK(std::get<0>(gpt::muon_choice::hyper(o, 1.0f)).weight_decay == 0.1f);
    CHECK(std::get<1>(gpt::muon_choice::hyper(o, 1.0f)).weight_decay == 0.1f);
    CHECK(gpt::sgd_choice::hyper(o, 1.0f).weight_decay == 0.0f);  // as SGD runs always had
    // SGD ignored the flag (its decay was always 0).
    const char* argv[] = {"loco_gpt", "--inner", "sgd", "--weight-decay", "0.05"};
    REQUIRE(gpt::parse(5, const_cast<char**>(argv), o));
    CHECK(gpt::sgd_choice::hyper(o, 0.5f).weight_decay == 0.05f);
    CHECK(gpt::sgd_choice::hyper(o, 0.5f).lr == 0.5f * gpt::sgd_choice::default_lr);
    CHECK(gpt::adamw_choice::hyper(o, 1.0f).weight_decay == 0.05f);
    CHECK(gpt::lion_choice::hyper(o, 1.0f).weight_decay == doctest::Approx(0.15f));
    CHECK(std::get<0>(gpt::muon_choice::hyper(o, 1.0f)).weight_decay == 0.05f);
    // 0 switches it off, also for AdamW.
    o.weight_decay = 0.0f;
    CHECK(gpt::adamw_choice::hyper(o, 1.0f).weight_decay == 0.0f);
}

TEST_CASE("gpt: every tensor is registered with its role, so Muon takes the hidden matrices without a guess") {
    for (const bool tied : {false, true}) {
        INFO("tied " << tied);
        const gpt::layout lay(
            gpt::model_config{.context = 8, .dim = 8, .layers = 2, .heads = 2, .tied = tied});
        std::vector<float> params(lay.total()), grads(lay.total(), 0.0f);
        gpt::initialise<float>(lay, params, 1);
        loco::parameter_list list = gpt::register_parameters(lay, params.data(), grads.data());
        std::vector<std::string> hidden;
        for (const loco::parameter& p : list) {
            INFO(p.name);
            const bool embedding = p.name == "wte" || p.name == "wpe";
            const bool head = p.name == "head.w";
            const bool matrix = !embedding && !head && p.name.ends_with(".w");
            CHECK(p.role == (embedding ? loco::role::embedding
                             : head    ? loco::role::head
                             : matrix  ? loco::role::matrix
                                       : loco::role::vector));
            if (matrix) hidden.push_back(p.name);
        }
        CHECK(hidden.size() == 8);  // qkv, attn.proj, mlp.fc, mlp.proj of 2 blocks
        // Strict roles refuse a shape guess; loco warned about one (all the weights) before.
        list.set_strict_roles();
        std::vector<std::string> warnings;
        loco::set_warning_sink([&](std::string_view line) { warnings.emplace_back(line); });
        const std::string refused = error_of([&] { loco::optimizer<gpt::muon_choice::type>{list}; });
        list.set_strict_roles(false);
        const loco::optimizer<gpt::muon_choice::type> opt(list);
        loco::set_warning_sink(loco::warn_to_stderr);
        CHECK(refused == "");
        CHECK(warnings.empty());
        std::vector<std::string> muon, adamw;
        for (const loco::parameter& p : opt.engine_state().group_params<0>()) muon.push_back(p.name);
        for (const loco::parameter& p : opt.engine_state().group_params<1>()) adamw.push_back(p.name);
        CHECK(muon == hidden);
        CHECK(std::find(adamw.begin(), adamw.end(), "wte") != adamw.end());
        CHECK(std::find(adamw.begin(), adamw.end(), "wpe") != adamw.end());
        CHECK((std::find(adamw.begin(), adamw.end(), "head.w") != adamw.end()) == !tied);
        CHECK(muon.size() + adamw.size() == list.size());
    }
}

TEST_CASE("gpt: --warmup 0 means no warm-up, and unset min(100, steps / 10)") {
    gpt::options o;
    o.steps = 1000;
    CHECK(gpt::warmup_steps(o) == 100);
    CHECK(gpt::lr_factor(o, 1) == doctest::Approx(0.01f));
    CHECK(gpt::lr_factor(o, 100) == doctest::Approx(1.0f));
    const char* argv[] = {"loco_gpt", "--warmup", "0"};
    REQUIRE(gpt::parse(3, const_cast<char**>(argv), o));
    CHECK(gpt::warmup_steps(o) == 0);
    // Step 1 is already on the cosine: 0.1 + 0.9 * (1 + cos(pi / 1000)) / 2.
    const double cosine = 0.1 + 0.9 * 0.5 * (1.0 + std::cos(std::numbers::pi / 1000.0));
    CHECK(gpt::lr_factor(o, 1) == doctest::Approx(cosine));
    CHECK(gpt::lr_factor(o, 1000) == doctest::Approx(0.1f));
    o.warmup = 20;
    CHECK(gpt::lr_factor(o, 10) == doctest::Approx(0.5f));
}

TEST_CASE("gpt: --csv is opened before the run and written after the summary") {
    gpt::options o = tiny_options(6);
    o.steps = 4;
    o.log_every = 2;
    o.markov_bytes = 20000;
    const auto run = [&](const std::string& csv, std::string& out, std::string& err) {
        o.csv = csv;
        std::FILE* out_file = std::tmpfile();
        std::FILE* err_file = std::tmpfile();
        REQUIRE(out_file != nullptr);
        REQUIRE(err_file != nullptr);
        const int status = gpt::run(o, adamw_rules, out_file, err_file);
        out = contents(out_file);
        err = contents(err_file);
        std::fclose(out_file);
        std::fclose(err_file);
        return status;
    };
    std::string out, err;
    SUBCASE("a path that cannot be opened is refused before any data is loaded or trained on") {
        // It was found only after the whole run, and the summary was lost.
        const std::string path = "/nonexistent-loco-gpt-dir/rows.csv";
        CHECK(run(path, out, err) == 1);
        CHECK(err == "gpt: cannot write --csv " + path + "\n");
        CHECK(out == "");
    }
    SUBCASE("a file that fails when written keeps the summary before the error") {
        if (!std::filesystem::exists("/dev/full")) return;
        CHECK(run("/dev/full", out, err) == 1);
        CHECK(err == "gpt: cannot write --csv /dev/full\n");
        CHECK(out.find("\nfinal:  val loss ") != std::string::npos);
    }
    SUBCASE("a writable path gets the rows") {
        namespace fs = std::filesystem;
        const fs::path path = fs::temp_directory_path() /
                              ("loco_gpt_csv_" + std::to_string(loco_test::rng_for("gpt.csv")()) +
                               ".csv");
        CHECK(run(path.string(), out, err) == 0);
        CHECK(err == "");
        CHECK(out.find("\nfinal:  val loss ") != std::string::npos);
        std::ifstream in(path);
        std::ostringstream text;
        text << in.rdbuf();
        fs::remove(path);
        CHECK(lines_of(text.str()).size() == 1 + 3);  // header, steps 0, 2, 4
    }
}

TEST_CASE("gpt: a countable shape too large for the host's memory gets a sentence") {
    // --context 100000 --dim 8 --heads 1 --layers 1 --batch 1 on 2 workers: 10^10 attention
    // weights a worker, and four T x T scratch arrays of the backward pass.
    const gpt::model_config c{.context = 100000, .dim = 8, .layers = 1, .heads = 1};
    CHECK(error_of([&] { gpt::check_memory(c, 1, 2, std::size_t{64} << 30); }) ==
          "gpt: 2 workers of this configuration need about 373 GiB for their activations and "
          "parameters, more than this host's 64 GiB of memory; use a smaller --context, --batch, "
          "--dim, --layers or fewer --workers");
    CHECK(error_of([&] { gpt::check_memory(c, 1, 2, std::size_t{400} << 30); }) == "");
    CHECK(error_of([&] { gpt::check_memory(c, 1, 2, 0); }) == "");  // memory unknown
    // What train() refuses before it allocates: 10^12 attention weights (16 TB) on no host.
    gpt::options o = tiny_options(1);
    o.model = {.context = 1000000, .dim = 8, .layers = 1, .heads = 1};
    o.batch = 1;
    o.eval_sequences = 1;
    const gpt::corpus data = gpt::make_markov_corpus(4, 1.0, 3000, 1);
    CHECK(error_of([&] { gpt::train(o, data, adamw_rules(o), nullptr); })
              .find("for their activations and parameters, more than this host's") !=
          std::string::npos);
    // The default shape fits a small host easily.
    CHECK(gpt::step_bytes(gpt::model_config{}, 8) * 4 < (std::size_t{1} << 30));
}

TEST_CASE("gpt: validation windows run evenly from the text's first byte to its last, shards are contiguous") {
    auto rng = loco_test::rng_for("gpt.windows");
    // Windows over 100 bytes of context 10: the last (89) ends with its target at byte 99.
    std::vector<std::uint8_t> hundred(100);
    for (std::size_t i = 0; i < hundred.size(); ++i) hundred[i] = static_cast<std::uint8_t>(i);
    std::vector<std::uint8_t> tokens, targets;
    gpt::validation_windows(hundred, 10, 4, tokens, targets);
    CHECK(std::vector<std::uint8_t>{tokens[0], tokens[10], tokens[20], tokens[30]} ==
          std::vector<std::uint8_t>{0, 29, 59, 89});
    CHECK(targets.back() == 99);
    for (int trial = 0; trial < 50; ++trial) {
        // Distinct bytes, so that each window's position can be read off its first byte.
        std::vector<std::uint8_t> text(256);
        std::iota(text.begin(), text.end(), std::uint8_t{0});
        std::shuffle(text.begin(), text.end(), rng);
        const std::size_t context = 1 + rng() % 20;
        text.resize(context + 1 + rng() % (256 - context));
        const std::size_t count = 1 + rng() % 12;
        INFO("bytes " << text.size() << ", context " << context << ", windows " << count);
        gpt::validation_windows(text, context, count, tokens, targets);
        REQUIRE(tokens.size() == count * context);
        REQUIRE(targets.size() == count * context);
        // Window i starts at floor(i * last / (count - 1)), last = size - context - 1, the last
        // start whose targets (the next bytes) are in the text.
        const std::size_t last = text.size() - context - 1;
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t start = count == 1 ? 0 : i * last / (count - 1);
            INFO("window " << i << ", start " << start);
            CHECK(std::equal(text.begin() + static_cast<std::ptrdiff_t>(start),
                             text.begin() + static_cast<std::ptrdiff_t>(start + context),
                             tokens.begin() + static_cast<std::ptrdiff_t>(i * context)));
            CHECK(std::equal(text.begin() + static_cast<std::ptrdiff_t>(start + 1),
                             text.begin() + static_cast<std::ptrdiff_t>(start + 1 + context),
                             targets.begin() + static_cast<std::ptrdiff_t>(i * context)));
        }
        CHECK(tokens.front() == text.front());
        if (count > 1) CHECK(targets.back() == text.back());
    }
    // Shard r of M is [r * per, (r + 1) * per), per = floor(train / M): disjoint, in order.
    for (int trial = 0; trial < 20; ++trial) {
        gpt::corpus c;
        c.train.resize(1 + rng() % 5000);
        const int workers = 1 + static_cast<int>(rng() % 8);
        const std::size_t per = c.train.size() / static_cast<std::size_t>(workers);
        INFO("bytes " << c.train.size() << ", workers " << workers);
        CHECK(gpt::shard_bytes(c.train.size(), workers) == per);
        for (int r = 0; r < workers; ++r) {
            const std::span<const std::uint8_t> s = gpt::shard(c, r, workers);
            CHECK(s.data() == c.train.data() + static_cast<std::size_t>(r) * per);
            CHECK(s.size() == per);
        }
    }
}

TEST_CASE("gpt: the learning rate follows docs/gpt.md, warm-up min(100, steps / 10) then cosine to a tenth") {
    auto rng = loco_test::rng_for("gpt.lr");
    gpt::options o;
    o.steps = 300;
    CHECK(gpt::warmup_steps(o) == 30);
    o.steps = 2000;
    CHECK(gpt::warmup_steps(o) == 100);
    o.steps = 9;
    CHECK(gpt::warmup_steps(o) == 0);
    for (int trial = 0; trial < 50; ++trial) {
        o.steps = 2 + rng() % 5000;
        if (trial % 2 == 0) {
            o.warmup.reset();
        } else {
            o.warmup = 1 + rng() % (o.steps - 1);
        }
        const std::uint64_t w = o.warmup.value_or(std::min<std::uint64_t>(100, o.steps / 10));
        INFO("steps " << o.steps << ", warm-up " << w);
        CHECK(gpt::warmup_steps(o) == w);
        // Linear warm-up to the peak at step w, then 0.1 + 0.9 (1 + cos(pi (s - w) / (N - w))) / 2,
        // a tenth of the peak at the last step N.
        const auto want = [&](std::uint64_t s) {
            if (s <= w) return static_cast<double>(s) / static_cast<double>(w);
            const double progress =
                static_cast<double>(s - w) / static_cast<double>(o.steps - w);
            return 0.1 + 0.9 * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
        };
        const std::uint64_t mid = w + 1 + rng() % (o.steps - w);
        for (const std::uint64_t s : {std::uint64_t{1}, w, mid, o.steps}) {
            if (s == 0) continue;
            INFO("step " << s);
            CHECK(gpt::lr_factor(o, s) == doctest::Approx(want(s)).epsilon(1e-6));
        }
        CHECK(gpt::lr_factor(o, o.steps) == doctest::Approx(0.1).epsilon(1e-6));
    }
}

TEST_CASE("gpt: the validation loss is the mean over every window, also with a short last batch") {
    auto rng = loco_test::rng_for("gpt.evaluate");
    const gpt::layout lay(gpt::model_config{.context = 8, .dim = 8, .layers = 1, .heads = 2});
    std::vector<float> params(lay.total());
    gpt::initialise<float>(lay, params, rng());
    std::normal_distribution<float> normal(0.0f, 0.3f);
    for (float& p : params) p += normal(rng);  // a model whose losses differ window by window
    std::vector<std::uint8_t> text(400);
    for (auto& b : text) b = static_cast<std::uint8_t>(rng());
    gpt::model<float> m(lay);
    for (const auto [count, batch] : {std::array<std::size_t, 2>{10, 8}, {10, 3}, {1, 8},
                                      {7, 7}, {1 + rng() % 16, 1 + rng() % 16}}) {
        INFO(count << " windows, batch " << batch);
        std::vector<std::uint8_t> tokens, targets;
        gpt::validation_windows(text, 8, count, tokens, targets);
        double want = 0.0;  // the mean of the windows' losses, one at a time
        for (std::size_t i = 0; i < count; ++i) {
            want += m.forward(params.data(), tokens.data() + i * 8, targets.data() + i * 8, 1,
                              false) / static_cast<double>(count);
        }
        CHECK(gpt::evaluate(m, params, tokens, targets, batch) ==
              doctest::Approx(want).epsilon(1e-6));
    }
}

TEST_CASE("gpt: the policies' documented defaults, and the flags that override them, 0 included") {
    const gpt::options d;
    // docs/gpt.md's --outer row: nesterov (lr 0.7, momentum 0.9), sgd (lr 1.0), adam (loco's
    // defaults).
    CHECK(gpt::nesterov_choice::hyper(d).lr == 0.7f);
    CHECK(gpt::nesterov_choice::hyper(d).momentum == 0.9f);
    CHECK(gpt::outer_sgd_choice::hyper(d).lr == 1.0f);
    CHECK(gpt::outer_adam_choice::hyper(d).lr == loco::outer::adam::hyper{}.lr);
    CHECK(gpt::outer_adam_choice::hyper(d).beta1 == loco::outer::adam::hyper{}.beta1);
    // Its --inner row: sgd with Nesterov momentum 0.9.
    CHECK(gpt::sgd_choice::hyper(d, 1.0f).momentum == 0.9f);
    CHECK(gpt::sgd_choice::hyper(d, 1.0f).nesterov);
    // --outer-lr and --outer-momentum reach every outer optimizer (adam's beta1 is its momentum).
    const char* outer[] = {"loco_gpt", "--outer", "adam", "--outer-lr", "0.05", "--outer-momentum",
                           "0.5"};
    gpt::options o;
    REQUIRE(gpt::parse(7, const_cast<char**>(outer), o));
    CHECK(gpt::outer_adam_choice::hyper(o).lr == 0.05f);
    CHECK(gpt::outer_adam_choice::hyper(o).beta1 == 0.5f);
    CHECK(gpt::nesterov_choice::hyper(o).lr == 0.05f);
    CHECK(gpt::nesterov_choice::hyper(o).momentum == 0.5f);
    CHECK(gpt::outer_sgd_choice::hyper(o).lr == 0.05f);
    // 0 is a setting, not "unset": outer Nesterov without momentum (the study's demo-h50-sgd), no
    // weight decay, a loss that no run gets below.
    gpt::options z;
    for (const char* flag : {"--outer-momentum", "--weight-decay", "--require-below"}) {
        const char* argv[] = {"loco_gpt", flag, "0"};
        CHECK(error_of([&] { gpt::parse(3, const_cast<char**>(argv), z); }) == "");
    }
    CHECK(gpt::nesterov_choice::hyper(z).momentum == 0.0f);
    CHECK(gpt::outer_adam_choice::hyper(z).beta1 == 0.0f);
    CHECK(gpt::adamw_choice::hyper(z, 1.0f).weight_decay == 0.0f);
    CHECK(z.require_below == std::optional<double>(0.0));
}

TEST_CASE("gpt: the defaults in docs/gpt.md's table of flags are the options' defaults") {
    const std::map<std::string, std::string> doc = documented_defaults();
    const auto text = [&](const std::string& flag) {
        const auto it = doc.find(flag);
        REQUIRE_MESSAGE(it != doc.end(), "docs/gpt.md gives no default for " << flag);
        return it->second;
    };
    const auto number = [&](const std::string& flag) {
        const std::string s = text(flag);
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        REQUIRE_MESSAGE((!s.empty() && *end == '\0'), flag << ": '" << s << "' is not a number");
        return v;
    };
    const auto on_off = [](bool on) { return std::string(on ? "on" : "off"); };
    const gpt::options d;
    CHECK(text("--data") == d.data);
    CHECK(number("--context") == double(d.model.context));
    CHECK(number("--dim") == double(d.model.dim));
    CHECK(number("--layers") == double(d.model.layers));
    CHECK(number("--heads") == double(d.model.heads));
    CHECK(text("--tied") == (d.model.tied ? "tied" : "untied"));
    CHECK(number("--workers") == double(d.workers));
    CHECK(number("--steps") == double(d.steps));
    CHECK(number("--batch") == double(d.batch));
    std::map<std::string, float> lr;  // "adamw 2e-3, sgd 0.3, lion 3e-4"
    for (const std::string& pair : split(text("--lr"), ", ")) {
        lr[pair.substr(0, pair.find(' '))] = std::stof(pair.substr(pair.find(' ') + 1));
    }
    CHECK(lr == std::map<std::string, float>{{"adamw", gpt::adamw_choice::default_lr},
                                             {"sgd", gpt::sgd_choice::default_lr},
                                             {"lion", gpt::lion_choice::default_lr}});
    CHECK(float(number("--muon-lr")) == d.muon_lr);
    CHECK(text("--warmup") == "min(100, steps / 10)");
    CHECK(!d.warmup.has_value());
    CHECK(number("--seed") == double(d.seed));
    CHECK(text("--sync-every-step") == on_off(d.sync_every_step));
    CHECK(text("--inner") == d.inner);
    CHECK(text("--outer") == d.outer);
    CHECK(text("--compress") == d.compress);
    CHECK(text("--ef-fold-outer-lr") == on_off(d.ef_fold_outer_lr));
    CHECK(text("--schedule") == d.schedule);
    CHECK(number("--H") == double(d.every));
    CHECK(number("--fragments") == double(d.fragments));
    CHECK(number("--overlap") == double(d.overlap));
    CHECK(float(number("--alpha")) == d.alpha);
    CHECK(text("--pattern") == d.pattern);
    CHECK(text("--aggregate") == d.aggregate);
    CHECK(number("--trim") == double(gpt::trimmed_mean_choice::hyper(d).trim));
    CHECK(float(number("--clip-tau")) == gpt::centered_clip_choice::hyper(d).tau);
    CHECK(number("--clip-iterations") == double(gpt::centered_clip_choice::hyper(d).iterations));
    CHECK(text("--edit-scope") == d.edit_scope);
    CHECK(float(number("--edit-temperature")) == gpt::edit_choice::hyper(d).temperature);
    CHECK(number("--edit-warmup") == double(gpt::edit_choice::hyper(d).ewma_warmup));
    CHECK(text("--edit-clip") == "none");  // an infinite phi
    CHECK(std::isinf(gpt::edit_choice::hyper(d).clip));
    CHECK(number("--attackers") == double(d.attackers));
    CHECK(text("--attack") == d.attack);
    CHECK(number("--log-every") == double(d.log_every));
    CHECK(number("--eval-every") == double(d.eval_every));
    CHECK(number("--eval-sequences") == double(d.eval_sequences));
    CHECK(text("--head-compress") == on_off(!d.head_compress.empty()));
}
