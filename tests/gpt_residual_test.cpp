// The GPT example's --residual-csv (examples/gpt/residual_report.hpp): the per-chunk top-k energy
// share in the value and DCT bases against a plain double-precision re-computation and closed
// forms; runs of SparseLoCo and DeMo with the report are the runs without it, to the bit, and
// each row agrees with what the compressor did (DeMo's fp32 coefficients remove exactly the DCT
// share, SparseLoCo's 8-bit codes nearly the value share); the one-sentence errors.
#include <doctest/doctest.h>

#include "support/errors.hpp"
#include "support/random.hpp"

#include "../examples/gpt/cli.hpp"
#include "../examples/gpt/data.hpp"
#include "../examples/gpt/residual_report.hpp"
#include "../examples/gpt/trainer.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numbers>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

namespace fs = std::filesystem;
using loco_test::error_of;

// The k largest of `energies` over their sum.
double top_share(std::vector<double> energies, std::size_t k, double& total) {
    std::sort(energies.begin(), energies.end(), std::greater<>());
    double kept = 0.0;
    for (std::size_t j = 0; j < energies.size(); ++j) {
        total += energies[j];
        if (j < k) kept += energies[j];
    }
    return kept;
}

// The reference: chunk (by, bx) of an h x w grid over a rows x cols matrix read directly, its
// 2-D DCT-II with norm "ortho" summed straight from the definition in double.
double reference_share(const std::vector<float>& x, std::size_t rows, std::size_t cols,
                       std::size_t h, std::size_t w, std::size_t k, bool dct) {
    const auto c = [](std::size_t n, std::size_t f) {
        return f == 0 ? std::sqrt(1.0 / static_cast<double>(n)) : std::sqrt(2.0 / static_cast<double>(n));
    };
    double total = 0.0;
    double kept = 0.0;
    for (std::size_t by = 0; by < rows / h; ++by) {
        for (std::size_t bx = 0; bx < cols / w; ++bx) {
            const auto at = [&](std::size_t r, std::size_t q) {
                return static_cast<double>(x[(by * h + r) * cols + bx * w + q]);
            };
            std::vector<double> energies;
            for (std::size_t a = 0; a < h; ++a) {
                for (std::size_t b = 0; b < w; ++b) {
                    double v = at(a, b);
                    if (dct) {
                        v = 0.0;
                        for (std::size_t r = 0; r < h; ++r) {
                            for (std::size_t q = 0; q < w; ++q) {
                                v += at(r, q) * c(h, a) * c(w, b) *
                                     std::cos(std::numbers::pi * (2.0 * r + 1.0) * a / (2.0 * h)) *
                                     std::cos(std::numbers::pi * (2.0 * q + 1.0) * b / (2.0 * w));
                            }
                        }
                    }
                    energies.push_back(v * v);
                }
            }
            kept += top_share(energies, k, total);
        }
    }
    return kept / total;
}

gpt::chunked_segment matrix(std::size_t offset, std::size_t rows, std::size_t cols,
                            std::size_t target, std::size_t k) {
    const loco::compress::segment s{.offset = offset, .size = rows * cols, .rows = rows, .cols = cols};
    return {s, loco::compress::chunking::grid_of(s, target, "test"), k};
}

// SparseLoCo and DeMo as the study runs them, compiled alone.
using sparseloco_rules =
    gpt::combinations<std::tuple<gpt::adamw_choice>, std::tuple<gpt::outer_sgd_choice>,
                      std::tuple<std::tuple_element_t<0, gpt::frontier_compress_choices>>,
                      std::tuple<gpt::every_choice>, std::tuple<gpt::median_norm_clip_choice>>;
using demo_rules =
    gpt::combinations<std::tuple<gpt::adamw_choice>, std::tuple<gpt::nesterov_choice>,
                      std::tuple<std::tuple_element_t<1, gpt::frontier_compress_choices>>,
                      std::tuple<gpt::every_choice>, std::tuple<gpt::scatter_mean_choice>>;
using frontier_rules = std::tuple<sparseloco_rules, demo_rules>;

gpt::rule_factory rules(const gpt::options& o) {
    return gpt::make_rule_factory<frontier_rules, std::tuple<gpt::adamw_choice>, gpt::no_splits>(o);
}

struct report_row {
    double step = 0.0;
    std::string tensor;
    double before = 0.0, after = 0.0, sent = 0.0, value = 0.0, dct = 0.0;
};

std::vector<report_row> read_rows(const fs::path& path, std::string& header) {
    std::ifstream in(path);
    std::getline(in, header);
    std::vector<report_row> rows;
    for (std::string line; std::getline(in, line);) {
        std::vector<std::string> f;
        std::stringstream fields(line);
        for (std::string x; std::getline(fields, x, ',');) f.push_back(x);
        REQUIRE(f.size() == 7);
        rows.push_back({std::stod(f[0]), f[1], std::stod(f[2]), std::stod(f[3]), std::stod(f[4]),
                        std::stod(f[5]), std::stod(f[6])});
    }
    return rows;
}

// A one-layer model on a Markov text, two quiet workers, `steps` steps syncing every `every`.
gpt::options tiny_run(std::uint64_t steps, std::uint64_t every) {
    gpt::options o;
    o.model = {.vocab = 256, .context = 16, .dim = 16, .layers = 1, .heads = 2};
    o.data = "markov";
    o.workers = 2;
    o.steps = steps;
    o.every = every;
    o.quiet = true;
    return o;
}

// Equal, or both not measured (NaN).
bool same(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

fs::path temp_csv(const char* label) {
    return fs::temp_directory_path() /
           ("loco_gpt_residual_" + std::string(label) + "_" +
            std::to_string(loco_test::rng_for(label)()) + ".csv");
}

}  // namespace

TEST_CASE("gpt: the top-k energy share of each chunk, in values and DCT coefficients") {
    auto rng = loco_test::rng_for("gpt.residual.share");
    SUBCASE("against the definition in double, fresh random matrices") {
        // 12 x 20 cut at target 8 into 6 x 5 chunks; then a flat segment of 35 into chunks of 7.
        const std::vector<float> x = loco_test::normal_floats(rng, 12 * 20 + 35);
        for (const std::size_t k : {1, 3, 29, 30}) {
            const gpt::chunked_segment m = matrix(0, 12, 20, 8, k);
            REQUIRE(m.grid.h == 6);
            REQUIRE(m.grid.w == 5);
            for (const bool dct : {false, true}) {
                INFO("k " << k << " dct " << dct);
                const gpt::basis b = dct ? gpt::basis::dct : gpt::basis::values;
                CHECK(gpt::topk_energy_share(x, {&m, 1}, b) ==
                      doctest::Approx(reference_share(x, 12, 20, 6, 5, k, dct)).epsilon(1e-6));
            }
        }
        const loco::compress::segment flat{.offset = 240, .size = 35, .rows = 1, .cols = 35};
        const gpt::chunked_segment f{flat, loco::compress::chunking::grid_of(flat, 8, "test"), 2};
        REQUIRE(f.grid.w == 7);
        const std::vector<float> tail(x.begin() + 240, x.end());
        CHECK(gpt::topk_energy_share(x, {&f, 1}, gpt::basis::values) ==
              doctest::Approx(reference_share(tail, 1, 35, 1, 7, 2, false)).epsilon(1e-6));
        CHECK(gpt::topk_energy_share(x, {&f, 1}, gpt::basis::dct) ==
              doctest::Approx(reference_share(tail, 1, 35, 1, 7, 2, true)).epsilon(1e-6));
    }
    SUBCASE("closed forms") {
        // A constant chunk is its DC coefficient alone, and evenly spread over the values; a
        // spike is one value; the k largest of n cells hold at least k / n of any chunk's energy.
        const gpt::chunked_segment m = matrix(0, 8, 8, 8, 4);
        std::vector<float> constant(64, -0.75f);
        CHECK(gpt::topk_energy_share(constant, {&m, 1}, gpt::basis::dct) ==
              doctest::Approx(1.0).epsilon(1e-12));
        CHECK(gpt::topk_energy_share(constant, {&m, 1}, gpt::basis::values) ==
              doctest::Approx(4.0 / 64.0).epsilon(1e-12));
        std::vector<float> spike(64, 0.0f);
        spike[19] = 3.0f;
        CHECK(gpt::topk_energy_share(spike, {&m, 1}, gpt::basis::values) == 1.0);
        const std::vector<float> noise = loco_test::normal_floats(rng, 64);
        for (const gpt::basis b : {gpt::basis::values, gpt::basis::dct}) {
            CHECK(gpt::topk_energy_share(noise, {&m, 1}, b) >= 4.0 / 64.0);
            CHECK(gpt::topk_energy_share(noise, {&m, 1}, b) <= 1.0);
        }
        CHECK(gpt::topk_energy_share(std::vector<float>(64, 0.0f), {&m, 1}, gpt::basis::dct) == 0.0);
    }
}

TEST_CASE("gpt: --residual-csv leaves SparseLoCo's and DeMo's runs unchanged and reports what each "
          "sync sent") {
    const std::uint64_t seed = loco_test::rng_for("gpt.residual.run")() % 1000;
    INFO("seed " << seed);
    gpt::options o = tiny_run(36, 10);  // 3 syncs at H = 10 and the closing one at step 36
    o.batch = 4;
    o.lr = 0.01f;
    o.eval_every = 12;
    o.log_every = 6;
    o.eval_sequences = 16;
    o.seed = seed;
    o.topk = 8;
    o.chunk = 8;
    o.ef_decay = 0.9f;
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 30000, seed);

    const auto compare = [&](gpt::options r, const char* label) {
        const gpt::run_result plain = gpt::train(r, data, rules(r), nullptr);
        const fs::path csv = temp_csv(label);
        r.residual_csv = csv.string();
        const gpt::run_result reported = gpt::train(r, data, rules(r), nullptr);
        REQUIRE(plain.rows.size() == reported.rows.size());
        for (std::size_t i = 0; i < plain.rows.size(); ++i) {
            INFO("row " << i);
            CHECK(same(plain.rows[i].train_loss, reported.rows[i].train_loss));
            CHECK(same(plain.rows[i].val_loss, reported.rows[i].val_loss));
            CHECK(plain.rows[i].bytes_sent == reported.rows[i].bytes_sent);
        }
        CHECK(plain.final_val_loss == reported.final_val_loss);
        CHECK(plain.syncs == 4);
        CHECK(reported.syncs == 4);
        std::string header;
        const std::vector<report_row> rows = read_rows(csv, header);
        fs::remove(csv);
        CHECK(header == "step,tensor,before,after,sent_share,value_share,dct_share");
        // Per sync, the whole model, then each tensor in registration order.
        const gpt::layout lay(r.model);
        const std::vector<gpt::tensor_spec>& tensors = lay.tensors();
        const std::size_t block = 1 + tensors.size();
        REQUIRE(rows.size() == 4 * block);
        const double steps[] = {10, 20, 30, 36};
        for (std::size_t i = 0; i < 4; ++i) {
            INFO("sync " << i);
            const report_row& model = rows[i * block];
            CHECK(model.tensor == "model");
            CHECK(model.before > model.after);  // the sync removed something
            CHECK(model.after > 0.0);           // and left something
            double before = 0.0, after = 0.0, value = 0.0, dct = 0.0;
            for (std::size_t j = 0; j < block; ++j) {
                const report_row& row = rows[i * block + j];
                INFO("tensor " << row.tensor);
                CHECK(row.step == steps[i]);
                if (j > 0) {
                    CHECK(row.tensor == tensors[j - 1].name);
                    const double e = row.before * row.before;
                    before += e;
                    after += row.after * row.after;
                    value += row.value * e;
                    dct += row.dct * e;
                }
                CHECK(row.sent == doctest::Approx(1.0 - row.after * row.after /
                                                            (row.before * row.before)));
                // Of each chunk of at most 64 cells, the 8 largest (or all) hold at least 1/8
                // of its energy, in either basis.
                for (const double share : {row.value, row.dct}) {
                    CHECK(share >= 0.125);
                    CHECK(share <= 1.0 + 1e-12);
                }
            }
            // The tensors' energies add up to the model's.
            CHECK(before == doctest::Approx(model.before * model.before).epsilon(1e-7));
            CHECK(after == doctest::Approx(model.after * model.after).epsilon(1e-7));
            CHECK(value / before == doctest::Approx(model.value).epsilon(1e-6));
            CHECK(dct / before == doctest::Approx(model.dct).epsilon(1e-6));
        }
        return rows;
    };

    SUBCASE("DeMo, fp32 coefficients: the sync removes exactly the DCT share") {
        gpt::options r = o;
        r.compress = "demo";
        r.aggregate = "scatter_mean";
        r.outer_momentum = 0.0f;
        for (const report_row& row : compare(r, "demo")) {
            INFO("step " << row.step << " tensor " << row.tensor);
            CHECK(row.sent == doctest::Approx(row.dct).epsilon(1e-4));
        }
    }
    SUBCASE("SparseLoCo, 8-bit codes: the sync removes the value share less the quantization's") {
        gpt::options r = o;
        r.outer = "sgd";
        r.compress = "sparseloco";
        r.aggregate = "median_norm_clip";
        r.bins = 256;
        // Quantizing the kept values can only lose energy (the kept cells are the same). How
        // much depends on how they spread within a tensor: in the embedding, whose rows of the
        // 16 symbols the text uses move far more than the others, it once reached 1.4 points;
        // over the model the 8-bit codes lose little.
        for (const report_row& row : compare(r, "sparseloco")) {
            INFO("step " << row.step << " tensor " << row.tensor);
            CHECK(row.sent <= row.value + 1e-6);
            if (row.tensor == "model") CHECK(row.sent > row.value - 0.01);
        }
    }
}

TEST_CASE("gpt: --residual-csv errors") {
    const auto parse_error = [](std::vector<const char*> args) {
        args.insert(args.begin(), "loco_gpt");
        gpt::options o;
        return error_of([&] { gpt::parse(static_cast<int>(args.size()), const_cast<char**>(args.data()), o); });
    };
    const std::string refusal =
        "gpt: --residual-csv reports on SparseLoCo's and DeMo's residual; it needs --compress "
        "sparseloco or demo (with --schedule every)";
    CHECK(parse_error({"--residual-csv", "r.csv"}) == refusal);
    CHECK(parse_error({"--compress", "statistical2-ef", "--residual-csv", "r.csv"}) == refusal);
    CHECK(parse_error({"--compress", "demo", "--residual-csv", "r.csv"}).empty());
    CHECK(parse_error({"--compress", "sparseloco", "--residual-csv"}) ==
          "gpt: --residual-csv needs a value (or is not an option; see --help)");

    // Options filled directly: the factory refuses them before any worker starts.
    gpt::options o;
    o.residual_csv = "r.csv";
    o.compress = "statistical2-ef";
    CHECK(error_of([&] { rules(o); }) == refusal);
    o.compress = "sparseloco";
    o.sync_every_step = true;
    CHECK(error_of([&] { rules(o); }) == refusal);
    o.sync_every_step = false;

    // A file that cannot be opened stops the run before its first step, naming the file.
    o = tiny_run(4, 2);
    o.batch = 2;
    o.eval_sequences = 4;
    o.compress = "demo";
    o.aggregate = "scatter_mean";
    const fs::path missing = fs::temp_directory_path() / "loco_gpt_no_such_dir" / "r.csv";
    o.residual_csv = missing.string();
    const gpt::corpus data = gpt::make_markov_corpus(16, 2.0, 5000, 1);
    CHECK(error_of([&] { gpt::train(o, data, rules(o), nullptr); }) ==
          "gpt: cannot write --residual-csv " + missing.string());
}
