// The bytes bench/sync_bytes.cpp reports, checked on real runs: GPT-2's tensor structure (at a
// small, randomly drawn width and vocabulary) trained by 4 thread workers with schedule::every,
// schedule::streaming (fragments by transformer layer) and streaming + blockwise<4, 256>. What
// each rank's communicator counts must equal closed forms written here from the definitions:
//   fp32 mean all-reduce of n floats (ring: reduce-scatter + all-gather), rank r of M with chunk
//     c_r = floor(n (r+1) / M) - floor(n r / M):     4 (n + (M - 2) c_r)
//   the all-or-nothing agreement: the same for n = 1
//   a blockwise<B, K> payload over tensors of sizes n_i: 40 header bytes
//     + sum_i (4 ceil(n_i / K) + 4 ceil(ceil(n_i B / 8) / 4)), all-gathered: (M - 1) payloads
// and the handle's accessors must agree with both.
#include <doctest/doctest.h>

#include "../bench/gpt2_layout.hpp"
#include "support/random.hpp"

#include <loco/comm/threads.hpp>
#include <loco/loco.hpp>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr std::uint64_t workers = 4;

std::uint64_t chunk(std::uint64_t n, std::uint64_t r) {
    return n * (r + 1) / workers - n * r / workers;
}
std::uint64_t ring_bytes(std::uint64_t n, std::uint64_t r) {
    return 4 * (n + (workers - 2) * chunk(n, r));
}
std::uint64_t agreement(std::uint64_t r) { return ring_bytes(1, r); }
std::uint64_t ceil_div(std::uint64_t a, std::uint64_t b) { return (a + b - 1) / b; }
std::uint64_t four_bit_gather(const std::vector<std::uint64_t>& sizes) {
    std::uint64_t payload = 40;
    for (const std::uint64_t n : sizes) payload += 4 * ceil_div(n, 256) + 4 * ceil_div(ceil_div(n * 4, 8), 4);
    return (workers - 1) * payload;
}

// The tensor sizes of each fragment when transformer layer l goes to fragment l mod P, the
// embeddings with layer 0 and ln_f with the last (written from the shapes, not from loco).
std::vector<std::vector<std::uint64_t>> fragment_sizes(const loco_bench::gpt2_shape& s,
                                                       std::uint64_t p) {
    const std::uint64_t c = s.width;
    std::vector<std::vector<std::uint64_t>> f(p);
    f[0] = {s.vocab * c, s.context * c};
    for (std::uint64_t l = 0; l < s.layers; ++l) {
        auto& to = f[l % p];
        for (const std::uint64_t n : {c, c, 3 * c * c, 3 * c, c * c, c, c, c, 4 * c * c, 4 * c,
                                      4 * c * c, c}) {
            to.push_back(n);
        }
    }
    f[(s.layers - 1) % p].push_back(c);
    f[(s.layers - 1) % p].push_back(c);
    return f;
}

std::uint64_t sum(const std::vector<std::uint64_t>& v) {
    std::uint64_t n = 0;
    for (const auto x : v) n += x;
    return n;
}

loco_bench::gpt2_shape random_shape(std::mt19937_64& rng) {
    std::uniform_int_distribution<std::size_t> vocab(40, 300), context(4, 40), width(1, 6);
    return {.vocab = vocab(rng), .context = context(rng), .width = 8 * width(rng), .layers = 12};
}

template <class Compressor, class Schedule>
using handle = loco::diloco<loco::inner::sgd, loco::outer::nesterov, Compressor, Schedule>;

struct counted {
    std::uint64_t total = 0;                // after start(), over the run
    std::vector<std::uint64_t> per_step;    // bytes sent during each step()
    std::uint64_t accessor_total = 0, accessor_peak = 0;
};

// Runs `steps` steps on 4 workers and returns what each rank's communicator counted.
template <class Compressor, class Schedule>
std::vector<counted> run(const loco_bench::gpt2_shape& shape, std::uint64_t seed,
                         typename Schedule::hyper sched, std::uint64_t steps) {
    std::vector<counted> out(workers);
    loco::comm::run_threads(static_cast<int>(workers), [&](loco::comm::threads& comm) {
        loco_bench::gpt2_model model(shape, static_cast<std::uint32_t>(seed + static_cast<std::uint64_t>(comm.rank())));
        typename handle<Compressor, Schedule>::config cfg;
        cfg.schedule = sched;
        cfg.fragments = loco_bench::by_transformer_layer(shape.layers);
        handle<Compressor, Schedule> opt(model.params(), comm, cfg);
        opt.start();
        counted& c = out[static_cast<std::size_t>(comm.rank())];
        const std::uint64_t before = comm.bytes_sent();
        for (std::uint64_t i = 0; i < steps; ++i) {
            model.nudge(1e-3f);
            const std::uint64_t b = comm.bytes_sent();
            opt.step();
            c.per_step.push_back(comm.bytes_sent() - b);
        }
        c.total = comm.bytes_sent() - before;
        c.accessor_total = opt.bytes_per_sync();
        c.accessor_peak = opt.peak_bytes_per_sync();
    });
    return out;
}

}  // namespace

TEST_CASE("sync bytes on GPT-2's layout: every, streaming and streaming + 4-bit match the closed forms") {
    auto rng = loco_test::rng_for("sync bytes gpt2");
    const loco_bench::gpt2_shape shape = random_shape(rng);
    const std::uint64_t seed = rng();
    const std::uint64_t n = shape.parameters();
    CAPTURE(shape.vocab);
    CAPTURE(shape.context);
    CAPTURE(shape.width);
    {
        loco_bench::gpt2_model model(shape);
        REQUIRE(model.params().total_elements() == n);
        REQUIRE(model.params().size() == 2 + 12 * shape.layers + 2);
    }
    // GPT-2 small's count, tied head: 124,439,808.
    CHECK(loco_bench::gpt2_small.parameters() == 124439808u);

    {  // every: one fp32 all-reduce of the model and one agreement per H steps
        const auto ranks = run<loco::compress::none, loco::schedule::every>(shape, seed, {.every = 4}, 12);
        for (std::uint64_t r = 0; r < workers; ++r) {
            CAPTURE(r);
            const std::uint64_t sync = ring_bytes(n, r) + agreement(r);
            CHECK(ranks[r].accessor_total == sync);
            CHECK(ranks[r].accessor_peak == sync);
            CHECK(ranks[r].total == 3 * sync);
            for (std::size_t i = 0; i < ranks[r].per_step.size(); ++i) {
                CHECK(ranks[r].per_step[i] == ((i + 1) % 4 == 0 ? sync : 0));
            }
        }
    }

    for (const std::uint64_t p : {4u, 8u}) {
        const auto frags = fragment_sizes(shape, p);
        const std::uint64_t h = 2 * p;  // each fragment every 2P steps, one every 2 steps
        CAPTURE(p);
        {  // streaming, tau = 0: the steps that sync send their fragment's all-reduce and agreement
            const auto ranks = run<loco::compress::none, loco::schedule::streaming>(
                shape, seed, {.every = h, .fragments = p, .overlap = 0, .alpha = 0.5f}, 2 * h);
            for (std::uint64_t r = 0; r < workers; ++r) {
                CAPTURE(r);
                std::uint64_t round = 0, peak = 0;
                for (const auto& f : frags) {
                    round += ring_bytes(sum(f), r) + agreement(r);
                    peak = std::max(peak, ring_bytes(sum(f), r) + agreement(r));
                }
                CHECK(ranks[r].accessor_total == round);
                CHECK(ranks[r].accessor_peak == peak);
                CHECK(ranks[r].total == 2 * round);
                // Fragment q is applied (and, with tau = 0, sent) at calls c with c = (q + 1) * 2 mod h.
                for (std::size_t i = 0; i < ranks[r].per_step.size(); ++i) {
                    const std::uint64_t call = i + 1;
                    std::uint64_t want = 0;
                    for (std::uint64_t q = 0; q < p; ++q) {
                        if (call % h == ((q + 1) * 2) % h) want += ring_bytes(sum(frags[q]), r) + agreement(r);
                    }
                    CHECK(ranks[r].per_step[i] == want);
                    CHECK(ranks[r].per_step[i] <= ranks[r].accessor_peak);
                }
            }
        }
        {  // streaming + blockwise<4, 256>, tau = 1: all-gathered 4-bit payloads
            const auto ranks = run<loco::compress::blockwise<4, 256>, loco::schedule::streaming>(
                shape, seed, {.every = h, .fragments = p, .overlap = 1, .alpha = 0.5f}, 3 * h);
            for (std::uint64_t r = 0; r < workers; ++r) {
                CAPTURE(r);
                std::uint64_t round = 0, peak = 0;
                for (const auto& f : frags) {
                    round += four_bit_gather(f) + agreement(r);
                    peak = std::max(peak, four_bit_gather(f) + agreement(r));
                }
                CHECK(ranks[r].accessor_total == round);
                CHECK(ranks[r].accessor_peak == peak);
                // The exchanges travel on the progress thread (tau = 1), so only the total over
                // whole periods is exact; no exchange is in flight after call 3 h.
                CHECK(ranks[r].total == 3 * round);
            }
        }
    }
}

TEST_CASE("GPT-2's layout: Hugging Face's names, shapes and roles in order, and the XL count") {
    // Written from GPT-2's state dict (transformers' GPT2Model; Conv1D weights are in x out):
    // wte (V, C), wpe (T, C), per layer ln_1 (C) x2, attn.c_attn (C, 3C) + (3C), attn.c_proj
    // (C, C) + (C), ln_2 (C) x2, mlp.c_fc (C, 4C) + (4C), mlp.c_proj (4C, C) + (C); ln_f (C) x2.
    const loco_bench::gpt2_shape shape{.vocab = 50, .context = 8, .width = 16, .layers = 3};
    const loco_bench::gpt2_model model(shape);
    const std::size_t c = shape.width;
    struct want {
        std::string name;
        std::size_t rows, cols;  // rows 0: a vector of cols elements
        loco::role role;
    };
    std::vector<want> w{{"wte", 50, c, loco::role::embedding},
                        {"wpe", 8, c, loco::role::embedding}};
    for (std::size_t l = 0; l < shape.layers; ++l) {
        const std::string h = "h." + std::to_string(l) + ".";
        for (const want& t : std::vector<want>{
                 {"ln_1.weight", 0, c, loco::role::vector},
                 {"ln_1.bias", 0, c, loco::role::vector},
                 {"attn.c_attn.weight", c, 3 * c, loco::role::matrix},
                 {"attn.c_attn.bias", 0, 3 * c, loco::role::vector},
                 {"attn.c_proj.weight", c, c, loco::role::matrix},
                 {"attn.c_proj.bias", 0, c, loco::role::vector},
                 {"ln_2.weight", 0, c, loco::role::vector},
                 {"ln_2.bias", 0, c, loco::role::vector},
                 {"mlp.c_fc.weight", c, 4 * c, loco::role::matrix},
                 {"mlp.c_fc.bias", 0, 4 * c, loco::role::vector},
                 {"mlp.c_proj.weight", 4 * c, c, loco::role::matrix},
                 {"mlp.c_proj.bias", 0, c, loco::role::vector}}) {
            w.push_back({h + t.name, t.rows, t.cols, t.role});
        }
    }
    w.push_back({"ln_f.weight", 0, c, loco::role::vector});
    w.push_back({"ln_f.bias", 0, c, loco::role::vector});
    const auto& params = model.params();
    REQUIRE(params.size() == w.size());
    const auto layer_of = loco_bench::by_transformer_layer(shape.layers).layer_of;
    for (std::size_t i = 0; i < w.size(); ++i) {
        const auto& p = params[i];
        CAPTURE(w[i].name);
        CHECK(p.name == w[i].name);
        CHECK(p.value.rows == w[i].rows);
        CHECK(p.value.cols == (w[i].rows == 0 ? 0 : w[i].cols));
        CHECK(p.value.size == (w[i].rows == 0 ? 1 : w[i].rows) * w[i].cols);
        CHECK(p.role == w[i].role);
        // Fragments by transformer layer: h.l is layer l, the embeddings layer 0, ln_f the last.
        const std::size_t layer = w[i].name.rfind("h.", 0) == 0 ? std::stoul(w[i].name.substr(2))
                                  : w[i].name.rfind("ln_f.", 0) == 0 ? shape.layers - 1
                                                                      : 0;
        CHECK(layer_of(p) == layer);
    }
    // GPT-2 XL (d = 1600, 48 layers, tied head): 1,557,611,200 parameters, the "1.5B" list of
    // bench/cuda/kernels.cu and bench/torch_reference.py.
    CHECK(loco_bench::gpt2_shape{.width = 1600, .layers = 48}.parameters() == 1557611200u);
    CHECK(loco_bench::gpt2_shape{.width = 1024, .layers = 24}.parameters() == 354823168u);
}
