// The GPT example's backward pass (examples/gpt/model.hpp) against central finite differences of
// its own forward pass, in double, for every element of every parameter tensor of a tiny model,
// tied and untied. The tiny shape takes both the 4 x 32 tiles of the product kernel (the MLP's
// 32 columns, 12 rows) and its remainder paths (vocabulary 11, dimension 8); the kernel itself is
// checked against a double reference below, across its 64-row chunks too. The forward pass
// against a naive double GPT-2 written here (the loss and every position's logits), cross-entropy
// and attention at logits and scores far apart in float, GPT-2's initialisation, and the
// parameter count against the layout.
#include <doctest/doctest.h>

#include "support/random.hpp"

#include "../examples/gpt/layers.hpp"
#include "../examples/gpt/model.hpp"

#include <algorithm>
#include <cmath>
#include <array>
#include <cstdint>
#include <numbers>
#include <random>
#include <string>
#include <vector>

namespace {

void check_gradients(bool tied, const char* label) {
    auto rng = loco_test::rng_for(label);
    gpt::model_config cfg{.vocab = 11, .context = 6, .dim = 8, .layers = 2, .heads = 2,
                          .tied = tied};
    const gpt::layout lay(cfg);
    std::vector<double> params(lay.total());
    gpt::initialise<double>(lay, params, rng());
    // Larger than GPT-2's 0.02, and non-trivial norms and biases, so that every path carries a
    // gradient well above the finite-difference error.
    std::normal_distribution<double> normal(0.0, 0.3);
    for (double& p : params) p += normal(rng);

    const std::size_t batch = 2, n = batch * cfg.context;
    std::vector<std::uint8_t> tokens(n), targets(n);
    std::uniform_int_distribution<int> byte(0, static_cast<int>(cfg.vocab) - 1);
    for (std::size_t i = 0; i < n; ++i) {
        tokens[i] = static_cast<std::uint8_t>(byte(rng));
        targets[i] = static_cast<std::uint8_t>(byte(rng));
    }

    gpt::model<double> m(lay);
    std::vector<double> grads(lay.total());
    m.forward(params.data(), tokens.data(), targets.data(), batch, true);
    m.backward(params.data(), grads.data());

    const double h = 1e-5;
    std::size_t checked = 0;
    for (const gpt::tensor_spec& s : lay.tensors()) {
        double norm = 0.0;
        for (std::size_t i = 0; i < s.size(); ++i) {
            double& p = params[s.offset + i];
            const double keep = p;
            p = keep + h;
            const double up = m.forward(params.data(), tokens.data(), targets.data(), batch, false);
            p = keep - h;
            const double down =
                m.forward(params.data(), tokens.data(), targets.data(), batch, false);
            p = keep;
            const double numeric = (up - down) / (2 * h);
            const double analytic = grads[s.offset + i];
            INFO(s.name << "[" << i << "]: analytic " << analytic << ", numeric " << numeric);
            CHECK(std::abs(analytic - numeric) <= 1e-7 + 1e-5 * std::abs(numeric));
            norm += analytic * analytic;
            ++checked;
        }
        INFO(s.name);
        CHECK(std::sqrt(norm) > 1e-4);  // every tensor takes part in the loss
    }
    CHECK(checked == lay.total());
}

// ---- GPT-2's forward pass written out naively in double, apart from examples/gpt/layers.hpp ----

using rows = std::vector<std::vector<double>>;

// The values of the layout's tensor `name`.
const double* tensor(const gpt::layout& lay, const std::vector<double>& params,
                     const std::string& name) {
    for (const gpt::tensor_spec& s : lay.tensors()) {
        if (s.name == name) return params.data() + s.offset;
    }
    FAIL("no tensor " << name);
    return nullptr;
}

// x W^T + b, W [out x in] as in PyTorch; b may be null.
rows affine(const rows& x, const double* w, const double* b, std::size_t out) {
    rows y(x.size(), std::vector<double>(out));
    for (std::size_t i = 0; i < x.size(); ++i) {
        for (std::size_t o = 0; o < out; ++o) {
            double s = b != nullptr ? b[o] : 0.0;
            for (std::size_t k = 0; k < x[i].size(); ++k) s += x[i][k] * w[o * x[i].size() + k];
            y[i][o] = s;
        }
    }
    return y;
}

// PyTorch's layer norm: the biased variance, eps 1e-5 inside the square root.
rows layer_norm(const rows& x, const double* gain, const double* bias) {
    rows y = x;
    for (std::size_t i = 0; i < x.size(); ++i) {
        const double dim = static_cast<double>(x[i].size());
        double mean = 0.0, var = 0.0;
        for (const double v : x[i]) mean += v / dim;
        for (const double v : x[i]) var += (v - mean) * (v - mean) / dim;
        for (std::size_t j = 0; j < x[i].size(); ++j) {
            y[i][j] = (x[i][j] - mean) / std::sqrt(var + 1e-5) * gain[j] + bias[j];
        }
    }
    return y;
}

// GPT-2's GELU, the tanh form.
double gelu(double x) {
    const double s = std::sqrt(2.0 / std::numbers::pi);
    return 0.5 * x * (1.0 + std::tanh(s * (x + 0.044715 * x * x * x)));
}

// Softmax of scores[0..len), the largest score subtracted.
std::vector<double> softmax(const std::vector<double>& scores) {
    const double top = *std::max_element(scores.begin(), scores.end());
    std::vector<double> p(scores.size());
    double sum = 0.0;
    for (std::size_t u = 0; u < scores.size(); ++u) sum += p[u] = std::exp(scores[u] - top);
    for (double& v : p) v /= sum;
    return p;
}

// Causal multi-head attention of one sequence's qkv rows [T x 3C] (q, k, v side by side).
rows causal_attention(const rows& qkv, std::size_t dim, std::size_t heads) {
    const std::size_t hd = dim / heads;
    rows y(qkv.size(), std::vector<double>(dim, 0.0));
    for (std::size_t h = 0; h < heads; ++h) {
        for (std::size_t t = 0; t < qkv.size(); ++t) {
            std::vector<double> scores(t + 1, 0.0);  // positions 0..t only
            for (std::size_t u = 0; u <= t; ++u) {
                for (std::size_t d = 0; d < hd; ++d) {
                    scores[u] += qkv[t][h * hd + d] * qkv[u][dim + h * hd + d];
                }
                scores[u] /= std::sqrt(static_cast<double>(hd));
            }
            const std::vector<double> p = softmax(scores);
            for (std::size_t u = 0; u <= t; ++u) {
                for (std::size_t d = 0; d < hd; ++d) {
                    y[t][h * hd + d] += p[u] * qkv[u][2 * dim + h * hd + d];
                }
            }
        }
    }
    return y;
}

// The logits [batch * T x vocab] of GPT-2's pre-LN decoder over `tokens`.
rows reference_logits(const gpt::layout& lay, const std::vector<double>& params,
                      const std::vector<std::uint8_t>& tokens) {
    const gpt::model_config& c = lay.config();
    const auto p = [&](const std::string& name) { return tensor(lay, params, name); };
    rows x(tokens.size(), std::vector<double>(c.dim));
    for (std::size_t i = 0; i < tokens.size(); ++i) {
        for (std::size_t j = 0; j < c.dim; ++j) {
            x[i][j] = p("wte")[tokens[i] * c.dim + j] + p("wpe")[(i % c.context) * c.dim + j];
        }
    }
    const auto add = [](rows& to, const rows& what) {
        for (std::size_t i = 0; i < to.size(); ++i)
            for (std::size_t j = 0; j < to[i].size(); ++j) to[i][j] += what[i][j];
    };
    for (std::size_t l = 0; l < c.layers; ++l) {
        const std::string h = "h" + std::to_string(l) + ".";
        const rows qkv = affine(layer_norm(x, p(h + "ln1.g"), p(h + "ln1.b")), p(h + "attn.qkv.w"),
                                p(h + "attn.qkv.b"), 3 * c.dim);
        rows att;
        for (std::size_t first = 0; first < qkv.size(); first += c.context) {
            const rows one(qkv.begin() + static_cast<std::ptrdiff_t>(first),
                           qkv.begin() + static_cast<std::ptrdiff_t>(first + c.context));
            for (const auto& row : causal_attention(one, c.dim, c.heads)) att.push_back(row);
        }
        add(x, affine(att, p(h + "attn.proj.w"), p(h + "attn.proj.b"), c.dim));
        rows fc = affine(layer_norm(x, p(h + "ln2.g"), p(h + "ln2.b")), p(h + "mlp.fc.w"),
                         p(h + "mlp.fc.b"), 4 * c.dim);
        for (auto& row : fc)
            for (double& v : row) v = gelu(v);
        add(x, affine(fc, p(h + "mlp.proj.w"), p(h + "mlp.proj.b"), c.dim));
    }
    return affine(layer_norm(x, p("ln_f.g"), p("ln_f.b")), p(c.tied ? "wte" : "head.w"), nullptr,
                  c.vocab);
}

// The mean over the rows of -log softmax(z)[target] = log sum exp(z - top) + top - z[target].
double reference_loss(const rows& logits, const std::vector<std::uint8_t>& targets) {
    double total = 0.0;
    for (std::size_t i = 0; i < logits.size(); ++i) {
        const double top = *std::max_element(logits[i].begin(), logits[i].end());
        double sum = 0.0;
        for (const double z : logits[i]) sum += std::exp(z - top);
        total += std::log(sum) + top - logits[i][targets[i]];
    }
    return total / static_cast<double>(logits.size());
}

}  // namespace

TEST_CASE("gpt: every parameter's gradient matches central differences (untied head)") {
    check_gradients(false, "gpt.gradcheck.untied");
}

TEST_CASE("gpt: every parameter's gradient matches central differences (tied head)") {
    check_gradients(true, "gpt.gradcheck.tied");
}

TEST_CASE("gpt: the product kernel against a double reference, fast tiles and remainders") {
    auto rng = loco_test::rng_for("gpt.gemm");
    for (const auto [rows, inner, cols] : {std::array<std::size_t, 3>{1, 1, 1}, {4, 3, 16},
                                          {7, 5, 33}, {9, 17, 64}, {12, 8, 15},
                                          {70, 9, 97}, {131, 3, 32}}) {
        const auto a = loco_test::normal_floats(rng, rows * inner);
        const auto b = loco_test::normal_floats(rng, inner * cols);
        auto c = loco_test::normal_floats(rng, rows * cols);
        std::vector<double> want(c.begin(), c.end());
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t j = 0; j < cols; ++j)
                for (std::size_t k = 0; k < inner; ++k)
                    want[i * cols + j] += double(a[i * inner + k]) * double(b[k * cols + j]);
        gpt::gemm_acc(c.data(), a.data(), b.data(), rows, inner, cols);
        for (std::size_t i = 0; i < c.size(); ++i) {
            INFO(rows << "x" << inner << "x" << cols << " element " << i);
            CHECK(std::abs(c[i] - want[i]) <= 1e-5 * (1.0 + std::abs(want[i])));
        }
    }
}

TEST_CASE("gpt: the forward pass matches a naive double GPT-2, the loss and every position's logits") {
    auto rng = loco_test::rng_for("gpt.forward");
    for (const bool tied : {false, true}) {
        // Embeddings x 1e-3: rows of the residual stream with a variance (about 1e-7) below layer
        // norm's eps of 1e-5, where the eps sets the normalised values.
        for (const double embedding_scale : {1.0, 1e-3}) {
            INFO("tied " << tied << ", embeddings x " << embedding_scale);
            const gpt::model_config cfg{.vocab = 11, .context = 6, .dim = 8, .layers = 2,
                                        .heads = 2, .tied = tied};
            const gpt::layout lay(cfg);
            std::vector<double> params(lay.total());
            gpt::initialise<double>(lay, params, rng());
            std::normal_distribution<double> normal(0.0, 0.3);
            for (double& p : params) p += normal(rng);
            for (const gpt::tensor_spec& s : lay.tensors()) {
                if (s.name != "wte" && s.name != "wpe") continue;
                for (std::size_t i = 0; i < s.size(); ++i) params[s.offset + i] *= embedding_scale;
            }
            const std::size_t batch = 2, n = batch * cfg.context;
            std::vector<std::uint8_t> tokens(n), targets(n);
            std::uniform_int_distribution<int> byte(0, static_cast<int>(cfg.vocab) - 1);
            for (std::size_t i = 0; i < n; ++i) {
                tokens[i] = static_cast<std::uint8_t>(byte(rng));
                targets[i] = static_cast<std::uint8_t>(byte(rng));
            }
            const rows logits = reference_logits(lay, params, tokens);
            gpt::model<double> m(lay);
            const double loss =
                m.forward(params.data(), tokens.data(), targets.data(), batch, false);
            const double want = reference_loss(logits, targets);
            CHECK(std::abs(loss - want) <= 1e-12 * (1.0 + std::abs(want)));
            // The model keeps its logits to itself: its loss with one target changed from y to c
            // falls by (z[c] - z[y]) / n, which gives every logit of every position up to the
            // row's constant (all that softmax sees).
            for (std::size_t i = 0; i < n; ++i) {
                for (std::size_t c = 0; c < cfg.vocab; ++c) {
                    std::vector<std::uint8_t> other = targets;
                    other[i] = static_cast<std::uint8_t>(c);
                    const double changed =
                        m.forward(params.data(), tokens.data(), other.data(), batch, false);
                    const double got = static_cast<double>(n) * (loss - changed);
                    const double expected = logits[i][c] - logits[i][targets[i]];
                    INFO("position " << i << ", class " << c);
                    CHECK(std::abs(got - expected) <= 1e-9 * (1.0 + std::abs(expected)));
                }
            }
        }
    }
}

TEST_CASE("gpt: float cross-entropy and attention stay finite and match double at logits and scores far apart") {
    auto rng = loco_test::rng_for("gpt.far_apart");
    // The loss and its gradient (softmax - onehot) / n against log-sum-exp in double, at logits
    // whose exp overflows (200) or underflows (-300) a float.
    const auto check_cross_entropy = [](std::vector<float> z, const std::vector<std::uint8_t>& y,
                                        std::size_t vocab) {
        const std::size_t n = y.size();
        double want = 0.0;
        std::vector<double> gradient(z.size());
        for (std::size_t i = 0; i < n; ++i) {
            const float* row = z.data() + i * vocab;
            const double top = *std::max_element(row, row + vocab);
            double sum = 0.0;
            for (std::size_t c = 0; c < vocab; ++c) sum += std::exp(row[c] - top);
            want += (std::log(sum) + top - row[y[i]]) / static_cast<double>(n);
            for (std::size_t c = 0; c < vocab; ++c) {
                gradient[i * vocab + c] = (std::exp(row[c] - top) / sum - (c == y[i] ? 1.0 : 0.0)) /
                                          static_cast<double>(n);
            }
        }
        const double loss = gpt::cross_entropy(z.data(), y.data(), n, vocab, true);
        INFO("loss " << loss << ", reference " << want);
        CHECK(std::isfinite(loss));
        CHECK(std::abs(loss - want) <= 1e-6 * (1.0 + std::abs(want)));
        for (std::size_t k = 0; k < z.size(); ++k) {
            INFO("gradient " << k << ": " << z[k] << ", reference " << gradient[k]);
            CHECK(std::abs(z[k] - gradient[k]) <= 1e-6);
        }
    };
    check_cross_entropy({200.0f, 0.0f, -50.0f, -300.0f, -400.0f, -350.0f}, {1, 2}, 3);
    {
        const std::size_t n = 6, vocab = 7;
        std::vector<float> z = loco_test::normal_floats(rng, n * vocab, 300.0f);
        std::vector<std::uint8_t> y(n);
        for (auto& t : y) t = static_cast<std::uint8_t>(rng() % vocab);
        check_cross_entropy(z, y, vocab);
    }

    // Attention, one head of width 1 over 3 positions, q = 1: row 0 scores only its own key 100
    // (the masked 300 of position 2 is no part of its softmax), row 1 {100, 0}, row 2
    // {100, 0, 300}.
    {
        const float qkv[9] = {1.0f, 100.0f, 5.0f, 1.0f, 0.0f, 6.0f, 1.0f, 300.0f, 7.0f};
        float out[3], probs[9];
        gpt::attention_scratch<float> w;
        gpt::attention_forward(out, probs, qkv, 1, 3, 1, 1, w);
        CHECK(out[0] == 5.0f);
        CHECK(out[1] == doctest::Approx(5.0));
        CHECK(out[2] == doctest::Approx(7.0));
    }
    // Random queries and keys x 15: scores hundreds apart, against the double reference.
    {
        const std::size_t batch = 2, context = 6, dim = 8, heads = 2, n = batch * context;
        std::vector<float> qkv = loco_test::normal_floats(rng, n * 3 * dim);
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t j = 0; j < 2 * dim; ++j) qkv[i * 3 * dim + j] *= 15.0f;
        std::vector<float> out(n * dim), probs(batch * heads * context * context);
        gpt::attention_scratch<float> w;
        gpt::attention_forward(out.data(), probs.data(), qkv.data(), batch, context, dim, heads, w);
        for (std::size_t b = 0; b < batch; ++b) {
            rows one(context);
            for (std::size_t t = 0; t < context; ++t) {
                const float* row = qkv.data() + (b * context + t) * 3 * dim;
                one[t].assign(row, row + 3 * dim);
            }
            const rows want = causal_attention(one, dim, heads);
            for (std::size_t t = 0; t < context; ++t) {
                for (std::size_t j = 0; j < dim; ++j) {
                    const float got = out[(b * context + t) * dim + j];
                    INFO("sequence " << b << ", position " << t << ", column " << j << ": " << got
                                     << ", reference " << want[t][j]);
                    CHECK(std::abs(got - want[t][j]) <= 1e-3 * (1.0 + std::abs(want[t][j])));
                }
            }
        }
    }
}

TEST_CASE("gpt: GPT-2's initialisation, residual projections at 0.02 / sqrt(2L)") {
    auto rng = loco_test::rng_for("gpt.init");
    const std::uint64_t seed = rng();
    INFO("seed " << seed);
    const gpt::model_config cfg{.vocab = 256, .context = 16, .dim = 32, .layers = 3, .heads = 2};
    const gpt::layout lay(cfg);
    std::vector<double> params(lay.total());
    gpt::initialise<double>(lay, params, seed);
    for (const gpt::tensor_spec& s : lay.tensors()) {
        INFO(s.name);
        const double* p = params.data() + s.offset;
        if (s.rows == 0) {  // layer-norm gains 1, every bias and layer-norm bias 0
            const double value = s.name.ends_with(".g") ? 1.0 : 0.0;
            CHECK(std::all_of(p, p + s.size(), [&](double v) { return v == value; }));
            continue;
        }
        // N(0, 0.02); attn.proj.w and mlp.proj.w, which add to the residual stream, at
        // 0.02 / sqrt(2L).
        const bool residual = s.name.ends_with("attn.proj.w") || s.name.ends_with("mlp.proj.w");
        const double sd = residual ? 0.02 / std::sqrt(2.0 * static_cast<double>(cfg.layers)) : 0.02;
        const double count = static_cast<double>(s.size());
        double sum = 0.0, squares = 0.0;
        for (std::size_t i = 0; i < s.size(); ++i) {
            sum += p[i];
            squares += p[i] * p[i];
        }
        // Six standard errors: of the mean sd / sqrt(n), of the root mean square sd / sqrt(2n).
        CHECK(std::abs(sum / count) <= 6.0 * sd / std::sqrt(count));
        CHECK(std::abs(std::sqrt(squares / count) / sd - 1.0) <= 6.0 / std::sqrt(2.0 * count));
    }
}

TEST_CASE("gpt: parameter_count is the layout's size") {
    // parameter_count sizes the model before the layout is built (the size limits use it).
    auto rng = loco_test::rng_for("gpt.parameter_count");
    for (int i = 0; i < 20; ++i) {
        const std::size_t heads = 1 + rng() % 4;
        const gpt::model_config c{.vocab = 2 + rng() % 255, .context = 1 + rng() % 64,
                                  .dim = heads * (1 + rng() % 16), .layers = 1 + rng() % 4,
                                  .heads = heads, .tied = rng() % 2 == 0};
        INFO("vocab " << c.vocab << ", context " << c.context << ", dim " << c.dim << ", layers "
                      << c.layers << ", heads " << c.heads << ", tied " << c.tied);
        CHECK(gpt::parameter_count(c) == gpt::layout(c).total());
    }
    // docs/gpt.md: the default shape has 1,073,536 parameters.
    CHECK(gpt::parameter_count(gpt::model_config{}) == 1073536);
}
