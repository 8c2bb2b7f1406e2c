// Streaming DiLoCo (schedule::streaming) against torchft's regression fixtures (algorithms.md
// section 9 T1: torchft/test_fixtures/torchft.diloco_regression_test.DiLoCoMockedUpdateTest.
// test_diloco_mocked_updates_{0..5}.json): two replicas, two fragments of one 1x1 weight each
// (initially 1), gradient 2 at every step, inner SGD lr 1, outer SGD lr 2, H = 6, tau in {0, 1},
// alpha in {0, 0.5, 1}. Every local value of both fragments after each step and every global
// snapshot must match exactly. Also: a failed sync changes nothing and the next one succeeds, and
// a run saved with an exchange in flight resumes bit-identically. (torchft's failure-recovery
// fixture, a replica that crashes and rejoins: tests/torchft_recovery_test.cpp.) And the merge
// for alpha = 0.25 and 0.75 (each of torch.lerp's two formulas, away from the fixtures' 0, 0.5
// and 1) against a double-precision re-computation of algorithms.md section 3, and bit for bit
// against ATen's fp32 lerp at 0.25, 0.5 (on random data) and 0.75. Also: layer_of's fragments
// (sequential: floor(l P / L); strided: l mod P), and each fragment's stochastic rounding drawing
// its own numbers.
#include <doctest/doctest.h>

#include "support/compare.hpp"
#include "support/forwarding_comm.hpp"
#include "support/random.hpp"
#include "support/torchft_mock.hpp"

#include <loco/loco.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using streaming_t = loco_test::torchft_streaming;
using loco_test::torchft_config;

struct fixture {
    std::uint64_t tau;
    float alpha;
    std::array<float, 16> fragment0, fragment1;               // after steps 0..15
    std::map<int, std::array<float, 2>> global;               // step -> (fragment 0, fragment 1)
};

// The six fixtures, copied from the JSON files (both replicas hold the same values).
const std::array<fixture, 6> fixtures = {{
    {0, 0.0f,
     {1, -1, -3, -11, -13, -15, -17, -19, -21, -35, -37, -39, -41, -43, -45, -59},
     {1, -1, -3, -5, -7, -9, -23, -25, -27, -29, -31, -33, -47, -49, -51, -53},
     {{0, {1, 1}}, {3, {-11, 1}}, {6, {-11, -23}}, {9, {-35, -23}}, {12, {-35, -47}}}},
    {0, 0.5f,
     {1, -1, -3, -8, -10, -12, -14, -16, -18, -24.5f, -26.5f, -28.5f, -30.5f, -32.5f, -34.5f, -40.25f},
     {1, -1, -3, -5, -7, -9, -17, -19, -21, -23, -25, -27, -32, -34, -36, -38},
     {{0, {1, 1}}, {3, {-11, 1}}, {6, {-11, -23}}, {9, {-29, -23}}, {12, {-29, -35}}}},
    {0, 1.0f,
     {1, -1, -3, -5, -7, -9, -11, -13, -15, -17, -19, -21, -23, -25, -27, -29},
     {1, -1, -3, -5, -7, -9, -11, -13, -15, -17, -19, -21, -23, -25, -27, -29},
     {{0, {1, 1}}, {3, {-11, 1}}, {6, {-11, -23}}, {9, {-23, -23}}, {12, {-23, -23}}}},
    {1, 0.0f,
     {1, -1, -3, -7, -9, -11, -13, -15, -17, -27, -29, -31, -33, -35, -37, -47},
     {1, -1, -3, -5, -7, -9, -19, -21, -23, -25, -27, -29, -39, -41, -43, -45},
     {{0, {1, 1}}, {3, {-7, 1}}, {6, {-7, -19}}, {9, {-27, -19}}, {12, {-27, -39}}}},
    {1, 0.5f,
     {1, -1, -3, -6, -8, -10, -12, -14, -16, -21.5f, -23.5f, -25.5f, -27.5f, -29.5f, -31.5f, -35.75f},
     {1, -1, -3, -5, -7, -9, -15, -17, -19, -21, -23, -25, -29, -31, -33, -35},
     {{0, {1, 1}}, {3, {-7, 1}}, {6, {-7, -19}}, {9, {-25, -19}}, {12, {-25, -31}}}},
    {1, 1.0f,
     {1, -1, -3, -5, -7, -9, -11, -13, -15, -17, -19, -21, -23, -25, -27, -29},
     {1, -1, -3, -5, -7, -9, -11, -13, -15, -17, -19, -21, -23, -25, -27, -29},
     {{0, {1, 1}}, {3, {-7, 1}}, {6, {-7, -19}}, {9, {-23, -19}}, {12, {-23, -23}}}},
}};

// Two thread workers of tensors a (3 elements, fragment 0) and b (4, fragment 1), H = 4, P = 2,
// tau = 1, merge weight alpha, inner SGD: every worker's values and the global ones after each
// call.
template <class Outer>
using merge_opt = loco::diloco<loco::inner::sgd, Outer, loco::compress::none,
                               loco::schedule::streaming>;

struct merge_trace {
    std::array<std::vector<std::vector<float>>, 2> local, global;  // [rank][call - 1]
};

template <class Outer>
merge_trace run_merge(typename merge_opt<Outer>::config cfg, float alpha,
                      const std::vector<float>& init, const std::vector<std::vector<float>>& grads,
                      int calls) {
    cfg.schedule = {.every = 4, .fragments = 2, .overlap = 1, .alpha = alpha};
    cfg.fragments.names = {{"a"}, {"b"}};
    merge_trace out;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        std::vector<float> a(init.begin(), init.begin() + 3), b(init.begin() + 3, init.end());
        std::vector<float> ga(3), gb(4);
        loco::parameter_list list;
        list.add("a", a, ga);
        list.add("b", b, gb);
        merge_opt<Outer> opt(list, comm, cfg);
        for (int c = 1; c <= calls; ++c) {
            const auto& g = grads[std::size_t(c - 1) * 2 + r];
            std::copy(g.begin(), g.begin() + 3, ga.begin());
            std::copy(g.begin() + 3, g.end(), gb.begin());
            opt.step();
            std::vector<float> v = a;
            v.insert(v.end(), b.begin(), b.end());
            out.local[r].push_back(v);
            out.global[r].emplace_back(opt.global().begin(), opt.global().end());
        }
    });
    return out;
}

// algorithms.md section 3.1 in double for the run above: fragment p (apply_at = (p + 1) H / P
// mod H) captures Delta_p = mean_m (global_p - local_m,p) tau calls before its apply; at the apply
// the outer step (Nesterov b <- mu b + Delta, global -= lr (Delta + mu b); mu = 0 is SGD), then
// local <- alpha local + (1 - alpha) global.
struct merge_reference {
    std::array<std::vector<std::vector<double>>, 2> local;
    std::vector<std::vector<double>> global;
};

merge_reference reference_merge(const std::vector<float>& init,
                                const std::vector<std::vector<float>>& grads, int calls,
                                double inner_lr, double outer_lr, double mu, double alpha) {
    constexpr std::uint64_t every = 4, tau = 1;
    const auto fragment = [](std::size_t i) { return i < 3 ? 0u : 1u; };
    std::vector<double> global(init.begin(), init.end()), momentum(7, 0.0), delta(7, 0.0);
    std::array<std::vector<double>, 2> x = {global, global};
    merge_reference out;
    for (int c = 1; c <= calls; ++c) {
        for (std::size_t m = 0; m < 2; ++m) {
            for (std::size_t i = 0; i < 7; ++i) x[m][i] -= inner_lr * grads[std::size_t(c - 1) * 2 + m][i];
        }
        for (unsigned p = 0; p < 2; ++p) {
            const std::uint64_t apply_at = (p + 1) * 2 % every;
            if ((std::uint64_t(c) + tau) % every == apply_at) {
                for (std::size_t i = 0; i < 7; ++i) {
                    if (fragment(i) == p) delta[i] = ((global[i] - x[0][i]) + (global[i] - x[1][i])) / 2;
                }
            }
            if (std::uint64_t(c) % every == apply_at) {
                for (std::size_t i = 0; i < 7; ++i) {
                    if (fragment(i) != p) continue;
                    momentum[i] = mu * momentum[i] + delta[i];
                    global[i] -= outer_lr * (delta[i] + mu * momentum[i]);
                    for (auto& xm : x) xm[i] = alpha * xm[i] + (1 - alpha) * global[i];
                }
            }
        }
        out.local[0].push_back(x[0]);
        out.local[1].push_back(x[1]);
        out.global.push_back(global);
    }
    return out;
}

void expect_merge(const merge_trace& got, const merge_reference& want, double rel_tol) {
    loco_test::mismatch_log log;
    for (std::size_t r = 0; r < 2; ++r) {
        for (std::size_t c = 0; c < want.global.size(); ++c) {
            for (std::size_t i = 0; i < 7; ++i) {
                log.expect_close(got.local[r][c][i], want.local[r][c][i], rel_tol,
                                 [&](std::ostream& s) { s << "rank " << r << " call " << c + 1 << " local " << i; });
                log.expect_close(got.global[r][c][i], want.global[c][i], rel_tol,
                                 [&](std::ostream& s) { s << "rank " << r << " call " << c + 1 << " global " << i; });
            }
        }
    }
    log.check();
}

}  // namespace

TEST_CASE("streaming DiLoCo reproduces torchft's six regression fixtures step by step") {
    for (std::size_t k = 0; k < fixtures.size(); ++k) {
        const fixture& fx = fixtures[k];
        CAPTURE(k);
        std::atomic<int> checked{0};
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            std::vector<float> w0{1.0f}, w1{1.0f}, g0{2.0f}, g1{2.0f};
            loco::parameter_list list;
            list.add("layers.0.weight", w0, g0);
            list.add("layers.1.weight", w1, g1);
            streaming_t opt(list, comm, torchft_config(fx.tau, fx.alpha));
            CHECK(opt.fragments() == 2);
            CHECK(w0[0] == fx.fragment0[0]);
            CHECK(w1[0] == fx.fragment1[0]);
            for (int step = 1; step <= 15; ++step) {
                CAPTURE(step);
                opt.step();
                CHECK(w0[0] == fx.fragment0[std::size_t(step)]);
                CHECK(w1[0] == fx.fragment1[std::size_t(step)]);
                if (const auto it = fx.global.find(step); it != fx.global.end()) {
                    CHECK(opt.global()[0] == it->second[0]);
                    CHECK(opt.global()[1] == it->second[1]);
                }
                // Between the start and the finish (tau = 1) an exchange is in flight.
                const bool sending0 = fx.tau == 1 && step % 6 == 2;
                const bool sending1 = fx.tau == 1 && step % 6 == 5;
                CHECK(opt.in_flight(0) == sending0);
                CHECK(opt.in_flight(1) == sending1);
            }
            // Each fragment has its own outer step counter.
            CHECK(opt.outer_steps(0) == 3);  // calls 3, 9, 15
            CHECK(opt.outer_steps(1) == 2);  // calls 6, 12
            ++checked;
        });
        CHECK(checked == 2);
    }
}

TEST_CASE("the automatic sequential split gives every fragment a tensor when a large one leads") {
    // GPT-2 small's layout, scaled down: the embedding (31% of the model), then 12 equal blocks.
    // By the middles alone, fragments before the blocks' first would be empty for P = 6, 8, 12
    // and 13 ("fragment 0 holds no tensor"); the runs are clamped to stay consecutive and leave
    // every later fragment a tensor.
    std::vector<std::size_t> sizes{3860};
    for (int l = 0; l < 12; ++l) sizes.push_back(708);
    std::vector<std::vector<float>> values, grads;
    loco::parameter_list list;
    for (const std::size_t n : sizes) {
        values.emplace_back(n, 0.0f);
        grads.emplace_back(n, 0.0f);
    }
    for (std::size_t i = 0; i < sizes.size(); ++i) {
        list.add(i == 0 ? std::string("wte") : "h" + std::to_string(i - 1), values[i], grads[i]);
    }
    loco::comm::single comm;
    const auto split = [&](std::uint64_t p) {
        // H = 2184 is a multiple of every P below.
        streaming_t opt(list, comm, {.schedule = {.every = 2184, .fragments = p, .overlap = 0,
                                                  .pattern = loco::fragment_pattern::sequential}});
        std::vector<std::size_t> owner(sizes.size());
        for (std::size_t f = 0; f < opt.fragments(); ++f) {
            for (const std::size_t i : opt.fragment_params(f)) owner[i] = f;
        }
        return owner;
    };
    using owners = std::vector<std::size_t>;
    CHECK(split(8) == owners{0, 1, 2, 3, 4, 4, 5, 5, 5, 6, 6, 7, 7});
    CHECK(split(6) == owners{0, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5});
    CHECK(split(13) == owners{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12});
    // A split the middles already give is unchanged: P = 2 cuts where the bytes halve.
    CHECK(split(2) == owners{0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1});
    CHECK_THROWS_WITH_AS(split(14),
                         "loco: the schedule syncs 14 fragments of a model of 13 tensors, so a "
                         "fragment holds no tensor; use at most 13 fragments",
                         loco::invalid_argument);
}

TEST_CASE("the automatic sequential split gives every fragment a tensor when a large one trails") {
    // Small tensors first, then one holding nearly all the bytes: by the middles alone every small
    // tensor falls in fragment 0 and the large one in fragment 1, leaving the fragments after it
    // empty. With P = the tensor count each fragment must hold one tensor, in order: the runs
    // leave a tensor for every later fragment.
    auto rng = loco_test::rng_for("sequential split, large tensor last");
    const auto leading = std::uniform_int_distribution<std::size_t>(2, 6)(rng);
    const auto large = std::uniform_int_distribution<std::size_t>(1000, 5000)(rng);
    CAPTURE(leading);
    CAPTURE(large);
    for (const bool drawn : {false, true}) {
        std::vector<std::size_t> sizes = drawn ? std::vector<std::size_t>(leading, 1)
                                               : std::vector<std::size_t>{1, 1};
        sizes.push_back(drawn ? large : 1000);
        CAPTURE(sizes.size());
        std::vector<std::vector<float>> values, grads;
        loco::parameter_list list;
        for (const std::size_t n : sizes) {
            values.emplace_back(n, 0.0f);
            grads.emplace_back(n, 0.0f);
        }
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            list.add("t" + std::to_string(i), values[i], grads[i]);
        }
        loco::comm::single comm;
        const auto split = [&](std::uint64_t p) {
            streaming_t opt(list, comm,
                            {.schedule = {.every = 420, .fragments = p, .overlap = 0,
                                          .pattern = loco::fragment_pattern::sequential}});
            std::vector<std::size_t> owner(sizes.size());
            for (std::size_t f = 0; f < opt.fragments(); ++f) {
                for (const std::size_t i : opt.fragment_params(f)) owner[i] = f;
            }
            return owner;
        };
        std::vector<std::size_t> one_each(sizes.size());
        for (std::size_t i = 0; i < sizes.size(); ++i) one_each[i] = i;
        CHECK(split(sizes.size()) == one_each);
        // P = 2 needs no clamp: the middles put the small tensors first, the large one second.
        std::vector<std::size_t> halves(sizes.size(), 0);
        halves.back() = 1;
        CHECK(split(2) == halves);
    }
}

TEST_CASE("streaming DiLoCo sends one fragment at a time: peak bytes are a fragment's") {
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> a(300, 1.0f), b(100, 1.0f), c(200, 1.0f), d(400, 1.0f);
        std::vector<float> ga(300, 0.1f), gb(100, 0.1f), gc(200, 0.1f), gd(400, 0.1f);
        loco::parameter_list list;
        list.add("a", a, ga);
        list.add("b", b, gb);
        list.add("c", c, gc);
        list.add("d", d, gd);
        // Automatic, sequential: consecutive runs, each tensor where its middle falls
        // (a, b | c, d: 400 | 600 elements; an even split would cut c).
        streaming_t seq(list, comm, {.schedule = {.every = 4, .fragments = 2, .overlap = 1,
                                                  .pattern = loco::fragment_pattern::sequential}});
        CHECK(std::vector<std::size_t>(seq.fragment_params(0).begin(), seq.fragment_params(0).end()) ==
              std::vector<std::size_t>{0, 1});
        CHECK(std::vector<std::size_t>(seq.fragment_params(1).begin(), seq.fragment_params(1).end()) ==
              std::vector<std::size_t>{2, 3});
        // Automatic, strided: each tensor to the lightest fragment so far (a | b, c | d -> 300+400, 100+200).
        streaming_t str(list, comm, {.schedule = {.every = 4, .fragments = 2, .overlap = 1}});
        CHECK(std::vector<std::size_t>(str.fragment_params(0).begin(), str.fragment_params(0).end()) ==
              std::vector<std::size_t>{0, 3});
        CHECK(std::vector<std::size_t>(str.fragment_params(1).begin(), str.fragment_params(1).end()) ==
              std::vector<std::size_t>{1, 2});
        // Layer indices: strided deals layers round-robin, sequential keeps runs.
        loco::fragment_layout by_layer;
        by_layer.layer_of = [](const loco::parameter& p) { return std::size_t(p.name[0] - 'a'); };
        streaming_t layered(list, comm, {.schedule = {.every = 4, .fragments = 2, .overlap = 0},
                                         .fragments = by_layer});
        CHECK(std::vector<std::size_t>(layered.fragment_params(0).begin(), layered.fragment_params(0).end()) ==
              std::vector<std::size_t>{0, 2});
        // Bytes: each sync of a fragment is a fp32 all-reduce (4 bytes per element for M = 2)
        // plus the 4-byte agreement; the peak is the larger fragment's.
        CHECK(seq.peak_bytes_per_sync() == 4 * 600 + 4);
        CHECK(seq.bytes_per_sync() == (4 * 400 + 4) + (4 * 600 + 4));
        const std::uint64_t before = comm.bytes_sent();
        seq.start();
        const std::uint64_t after_start = comm.bytes_sent();
        for (int step = 0; step < 4; ++step) {
            const std::uint64_t b0 = comm.bytes_sent();
            seq.step();
            CHECK(comm.bytes_sent() - b0 <= seq.peak_bytes_per_sync());
        }
        CHECK(comm.bytes_sent() - after_start == seq.bytes_per_sync());
        CHECK(after_start > before);
    });
}

TEST_CASE("streaming: bad settings are refused with the fix named, nothing changed") {
    std::vector<float> w0{1.0f}, w1{1.0f}, g0{2.0f}, g1{2.0f};
    loco::parameter_list list;
    list.add("layers.0.weight", w0, g0);
    list.add("layers.1.weight", w1, g1);
    loco::comm::single comm;
    using loco::fragment_pattern;
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, {.schedule = {.every = 7, .fragments = 2}}),
                         doctest::Contains("must be a positive multiple of fragments (P = 2)"),
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, {.schedule = {.every = 6, .fragments = 2, .overlap = 3}}),
                         doctest::Contains("overlap (tau = 3) must be below H / P = 3"),
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, {.schedule = {.every = 6, .fragments = 2, .alpha = 1.5f}}),
                         doctest::Contains("alpha must be in [0, 1]"), loco::invalid_argument);
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, {.schedule = {.every = 6, .fragments = 2, .alpha = -0.1f}}),
                         doctest::Contains("alpha must be in [0, 1]"), loco::invalid_argument);
    CHECK_THROWS_AS(streaming_t(list, comm, {.schedule = {.every = 6, .fragments = 0}}),
                    loco::invalid_argument);
    CHECK_THROWS_AS(streaming_t(list, comm, {.schedule = {.every = 6, .fragments = 2,
                                                          .pattern = static_cast<fragment_pattern>(7)}}),
                    loco::invalid_argument);
    auto named = [&](std::vector<std::vector<std::string>> names) {
        streaming_t::config cfg;
        cfg.schedule = {.every = 6, .fragments = 2};
        cfg.fragments.names = std::move(names);
        return cfg;
    };
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, named({{"layers.0.weight"}, {}})),
                         "loco: tensor 'layers.1.weight' is in no fragment; add it to one of the lists",
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, named({{"layers.0.weight", "layers.1.weight"}, {"layers.1.weight"}})),
                         "loco: tensor 'layers.1.weight' is named by fragments 0 and 1; name each tensor once",
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, named({{"layers.0.weight"}, {"layers.2.weight"}})),
                         doctest::Contains("names tensor 'layers.2.weight', which is not a parameter"),
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, named({{"layers.0.weight", "layers.1.weight"}})),
                         doctest::Contains("lists 1 fragments but the schedule syncs 2"),
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(streaming_t(list, comm, {.schedule = {.every = 6, .fragments = 3}}),
                         "loco: the schedule syncs 3 fragments of a model of 2 tensors, so a "
                         "fragment holds no tensor; use at most 2 fragments",
                         loco::invalid_argument);
    // A layer index that would overflow the split (size_t(-1) for "not in a layer", say).
    for (const auto pattern : {fragment_pattern::strided, fragment_pattern::sequential}) {
        for (const std::size_t bad : {std::size_t(-1), std::size_t{1} << 32}) {
            streaming_t::config cfg;
            cfg.schedule = {.every = 6, .fragments = 2, .pattern = pattern};
            cfg.fragments.layer_of = [bad](const loco::parameter& p) {
                return p.name == "layers.0.weight" ? bad : std::size_t{0};
            };
            const std::string want =
                "layer_of gives tensor 'layers.0.weight' the layer index " + std::to_string(bad);
            CHECK_THROWS_WITH_AS(streaming_t(list, comm, cfg), doctest::Contains(want.c_str()),
                                 loco::invalid_argument);
        }
    }
    CHECK(w0[0] == 1.0f);
    CHECK(w1[0] == 1.0f);

    // Changing the number of fragments mid-run is refused before the step does anything.
    streaming_t opt(list, comm, {.inner = {.lr = 1.0f}, .schedule = {.every = 6, .fragments = 2}});
    opt.schedule_hyper().fragments = 3;
    opt.schedule_hyper().every = 6;
    CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("keep the number of fragments"),
                         loco::invalid_argument);
    CHECK(w0[0] == 1.0f);
    CHECK(opt.calls() == 0);
}

TEST_CASE("streaming: ranks with different fragment layouts or schedules fail at start, naming the difference") {
    std::array<std::string, 2> errors;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> w0{1.0f}, w1{1.0f}, g0{2.0f}, g1{2.0f};
        loco::parameter_list list;
        list.add("layers.0.weight", w0, g0);
        list.add("layers.1.weight", w1, g1);
        streaming_t::config cfg = torchft_config(1, 0.5f);
        if (comm.rank() == 1) cfg.fragments.names = {{"layers.1.weight"}, {"layers.0.weight"}};
        streaming_t opt(list, comm, cfg);
        try {
            opt.start();
        } catch (const loco::invalid_argument& e) {
            errors[std::size_t(comm.rank())] = e.what();
        }
        CHECK(w0[0] == 1.0f);
    });
    for (const auto& e : errors) {
        CHECK(e == "loco::diloco: the ranks were built differently: rank 0 has 'fragments: fragment 0: "
                   "layers.0.weight; fragment 1: layers.1.weight' where rank 1 has 'fragments: fragment "
                   "0: layers.1.weight; fragment 1: layers.0.weight'; build the same model, schedule, "
                   "fragments and policies on every rank");
    }
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> w0{1.0f}, w1{1.0f}, g0{2.0f}, g1{2.0f};
        loco::parameter_list list;
        list.add("layers.0.weight", w0, g0);
        list.add("layers.1.weight", w1, g1);
        streaming_t opt(list, comm, torchft_config(comm.rank() == 0 ? 0 : 1, 0.5f));
        CHECK_THROWS_WITH_AS(opt.start(),
                             doctest::Contains("rank 0 has 'schedule: streaming H=6 P=2 tau=0 "
                                               "alpha=0.5 pattern=sequential' where rank 1 has "
                                               "'schedule: streaming H=6 P=2 tau=1"),
                             loco::invalid_argument);
    });
}

TEST_CASE("streaming: a failed fragment sync changes nothing on any rank, and the next one succeeds") {
    // torchft fixture _3 (tau 1, alpha 0) with fragment 0's first exchange (started at call 2)
    // failing on replica 1: at call 3 neither replica applies it; their local values keep the
    // inner steps; fragment 1 then syncs at call 6 as in the fixture.
    std::array<std::string, 2> errors;
    loco::comm::run_threads(2, [&](loco::comm::threads& threads) {
        // all-reduces: 1 fingerprint, 2 = fragment 0's data (started at call 2), 3 = its agreement.
        loco_test::failing_transfer comm(threads, 1, 2);
        std::vector<float> w0{1.0f}, w1{1.0f}, g0{2.0f}, g1{2.0f};
        loco::parameter_list list;
        list.add("layers.0.weight", w0, g0);
        list.add("layers.1.weight", w1, g1);
        streaming_t opt(list, comm, torchft_config(1, 0.0f));
        opt.step();
        opt.step();
        std::ostringstream before;
        opt.save(before);
        try {
            opt.step();
        } catch (const loco::comm_error& e) {
            errors[std::size_t(comm.rank())] = e.what();
        }
        CHECK(w0[0] == -5.0f);  // the inner step of call 3 only
        CHECK(opt.global()[0] == 1.0f);
        CHECK(opt.outer_steps() == 0);
        CHECK(!opt.in_flight(0));
        for (int step = 4; step <= 6; ++step) opt.step();
        CHECK(opt.global()[1] == -19.0f);  // fragment 1 as in fixture _3
        CHECK(w1[0] == -19.0f);
        CHECK(opt.outer_steps(1) == 1);
        CHECK(w0[0] == -11.0f);
        for (int step = 7; step <= 9; ++step) opt.step();
        // Fragment 0's next sync succeeds: started at call 8 with delta = 1 - (-15) = 16, global
        // = 1 - 2 * 16, and the local value replaced at call 9.
        CHECK(opt.global()[0] == -31.0f);
        CHECK(w0[0] == -31.0f);
        CHECK(opt.outer_steps(0) == 1);
    });
    for (const auto& e : errors) {
        CHECK(e == "loco::diloco: the sync of fragment 0 failed on rank 1 at the transfer stage "
                   "(injected: link dropped); nothing was applied on any rank");
    }
}

TEST_CASE("streaming: a run saved with an exchange in flight resumes bit-identically") {
    // Random data, tau = 1, alpha = 0.5, outer Nesterov: run 20 steps straight, and again saving
    // after step 7 (fragment 0's exchange in flight, started at call 7 of H = 8 / P = 2 with
    // tau = 1... offsets 4 - 1 = 3 and 8 - 1 = 7), loading into fresh handles and going on.
    using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                               loco::schedule::streaming>;
    const opt_t::config cfg{.inner = {.lr = 1e-2f},
                            .outer = {.lr = 0.7f, .momentum = 0.9f},
                            .schedule = {.every = 8, .fragments = 2, .overlap = 1, .alpha = 0.5f}};
    auto rng = loco_test::rng_for("streaming resume");
    std::vector<std::vector<float>> grads;
    for (int i = 0; i < 20 * 2; ++i) grads.push_back(loco_test::normal_floats(rng, 7));
    const auto init = loco_test::normal_floats(rng, 7);

    auto run = [&](bool interrupt) {
        std::array<std::vector<float>, 2> out;
        std::array<std::string, 2> saved;
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            const auto r = std::size_t(comm.rank());
            std::vector<float> a(init.begin(), init.begin() + 3), b(init.begin() + 3, init.end());
            std::vector<float> ga(3), gb(4);
            loco::parameter_list list;
            list.add("a", a, ga);
            list.add("b", b, gb);
            auto opt = std::make_unique<opt_t>(list, comm, cfg);
            for (int step = 1; step <= 20; ++step) {
                const auto& g = grads[std::size_t(step - 1) * 2 + r];
                std::copy(g.begin(), g.begin() + 3, ga.begin());
                std::copy(g.begin() + 3, g.end(), gb.begin());
                opt->step();
                if (interrupt && step == 7) {
                    CHECK(opt->in_flight(1));
                    std::ostringstream os;
                    opt->save(os);
                    saved[r] = os.str();
                    // The trainer saves its parameters too. The old handle finishes its exchange
                    // (a handle must not go away with one in flight) and moves on; a fresh
                    // handle loads the state and the trainer restores its parameters.
                    const auto a_saved = a, b_saved = b;
                    opt->sync();
                    opt = std::make_unique<opt_t>(list, comm, cfg);
                    std::istringstream is(saved[r]);
                    opt->load(is);
                    a = a_saved;
                    b = b_saved;
                    CHECK(!opt->in_flight(1));  // restarted at the next step()
                }
            }
            out[r] = a;
            out[r].insert(out[r].end(), b.begin(), b.end());
            out[r].insert(out[r].end(), opt->global().begin(), opt->global().end());
        });
        return out;
    };
    const auto straight = run(false);
    const auto resumed = run(true);
    CHECK(straight[0] == resumed[0]);
    CHECK(straight[1] == resumed[1]);
}

TEST_CASE("streaming: the merge for alpha = 0.25 and 0.75 is alpha local + (1 - alpha) global") {
    // torch.lerp computes the merge by one formula below alpha = 0.5 and another from 0.5 up;
    // the fixtures (alpha 0, 0.5, 1) never take the first. Two workers, H = 4, P = 2, tau = 1,
    // 12 calls (three applies of each fragment), every local and global value after every call
    // against the double re-computation: random data with outer Nesterov within fp32 rounding
    // (1e-5 relative; the error seen stays below 1e-6), and quarter-integer data with outer SGD
    // at lr 0.5, where every value is a dyadic rational of under 24 significant bits, so fp32 is
    // exact and so must the match be.
    constexpr int calls = 12;
    for (const float alpha : {0.25f, 0.75f}) {
        CAPTURE(alpha);
        {
            auto rng = loco_test::rng_for("streaming merge alpha random");
            const auto init = loco_test::normal_floats(rng, 7);
            std::vector<std::vector<float>> grads;
            for (int i = 0; i < calls * 2; ++i) grads.push_back(loco_test::normal_floats(rng, 7));
            merge_opt<loco::outer::nesterov>::config cfg;
            cfg.inner = {.lr = 0.1f};
            cfg.outer = {.lr = 0.7f, .momentum = 0.9f};
            const merge_trace got = run_merge<loco::outer::nesterov>(cfg, alpha, init, grads, calls);
            expect_merge(got, reference_merge(init, grads, calls, 0.1f, 0.7f, 0.9f, alpha), 1e-5);
        }
        {
            auto rng = loco_test::rng_for("streaming merge alpha exact");
            std::uniform_int_distribution<int> quarters(-8, 8), small(-4, 4);
            std::vector<float> init(7);
            for (auto& v : init) v = float(quarters(rng)) / 4;
            std::vector<std::vector<float>> grads(calls * 2, std::vector<float>(7));
            for (auto& g : grads) {
                for (auto& v : g) v = float(small(rng)) / 4;
            }
            merge_opt<loco::outer::sgd>::config cfg;
            cfg.inner = {.lr = 0.5f};
            cfg.outer = {.lr = 0.5f};
            const merge_trace got = run_merge<loco::outer::sgd>(cfg, alpha, init, grads, calls);
            expect_merge(got, reference_merge(init, grads, calls, 0.5, 0.5, 0.0, alpha), 0.0);
        }
    }
}

TEST_CASE("streaming: with layer_of, sequential gives fragment p the layers l with floor(l P / L) = p") {
    // fragments.hpp and docs/schedules.md: with layer indices, `sequential` gives each fragment a
    // consecutive run of layers (Streaming DiLoCo's sequential pattern, Douillard et al., arXiv
    // 2501.18512: blocks of consecutive layers), of near-equal lengths: layer l of L to fragment
    // floor(l P / L), so fragment p holds the layers in [p L / P, (p + 1) L / P); `strided` sends
    // layer l to l mod P. Random L and P (P <= L), one to three tensors per layer, the tensors
    // registered in a random order (a layer's index, not its place, decides), against both
    // closed forms; and the sequential runs are consecutive and differ in length by at most one.
    auto rng = loco_test::rng_for("streaming layer_of sequential");
    for (int trial = 0; trial < 8; ++trial) {
        const std::size_t P = std::uniform_int_distribution<std::size_t>(2, 5)(rng);
        const std::size_t L = std::uniform_int_distribution<std::size_t>(P, 13)(rng);
        CAPTURE(P);
        CAPTURE(L);
        std::vector<std::size_t> layer_of_tensor;
        for (std::size_t l = 0; l < L; ++l) {
            const auto copies = std::uniform_int_distribution<int>(1, 3)(rng);
            for (int c = 0; c < copies; ++c) layer_of_tensor.push_back(l);
        }
        std::shuffle(layer_of_tensor.begin(), layer_of_tensor.end(), rng);
        const std::size_t n = layer_of_tensor.size();
        std::vector<std::vector<float>> w(n, std::vector<float>(3, 1.0f)), g = w;
        loco::parameter_list list;
        for (std::size_t i = 0; i < n; ++i) {
            list.add("layers." + std::to_string(layer_of_tensor[i]) + ".t" + std::to_string(i), w[i],
                     g[i]);
        }
        loco::fragment_layout by_layer;
        by_layer.layer_of = [](const loco::parameter& p) {
            return std::size_t(std::stoul(p.name.substr(7, p.name.find(".t") - 7)));
        };
        loco::comm::single comm;
        for (const auto pattern : {loco::fragment_pattern::sequential, loco::fragment_pattern::strided}) {
            const bool seq = pattern == loco::fragment_pattern::sequential;
            CAPTURE(seq);
            streaming_t opt(list, comm, {.schedule = {.every = 4 * P, .fragments = P, .overlap = 0,
                                                      .pattern = pattern},
                                         .fragments = by_layer});
            std::vector<std::size_t> got(n, P);
            for (std::size_t f = 0; f < P; ++f) {
                for (const std::size_t i : opt.fragment_params(f)) got[i] = f;
            }
            for (std::size_t i = 0; i < n; ++i) {
                CAPTURE(i);
                const std::size_t l = layer_of_tensor[i];
                CHECK(got[i] == (seq ? l * P / L : l % P));
            }
            if (!seq) continue;
            // Per layer (all its tensors agree, checked above): runs of consecutive layers.
            std::vector<std::size_t> run(P, 0), of_layer(L, P);
            for (std::size_t i = 0; i < n; ++i) of_layer[layer_of_tensor[i]] = got[i];
            for (std::size_t l = 0; l < L; ++l) {
                if (of_layer[l] < P) ++run[of_layer[l]];
                if (l > 0) CHECK(of_layer[l] >= of_layer[l - 1]);
            }
            CHECK(*std::max_element(run.begin(), run.end()) - *std::min_element(run.begin(), run.end()) <= 1);
        }
    }
}

TEST_CASE("streaming: the merge is torch.lerp's fp32 arithmetic bit for bit at alpha 0.25, 0.5 and "
          "0.75") {
    // torchft merges local <- torch.lerp(global, local, alpha), and ATen's lerp kernel
    // (aten/src/ATen/native/Lerp.h) computes, in the tensor's dtype,
    //   |weight| < 0.5:  start + weight * (end - start)
    //   otherwise:       end - (end - start) * (1 - weight)   (weight 0.5 included)
    // Mathematically equal forms (alpha local + (1 - alpha) global) round differently, which the
    // merge test above (within 1e-5, or on exact data) cannot tell apart. Two workers, H = 4,
    // P = 2, tau = 1, 12 calls, 2 x 500 random normal elements, inner SGD at lr 0.5 (so the inner
    // step x - 0.5 g is one fp32 rounding): at every call each local value must be, bit for bit,
    // the inner step, or where its fragment's global values were just updated, ATen's formula on
    // the new global value and that inner step. At alpha 0.5 the two formulas differ in the last
    // bit for some random pairs, so 0.5 pins the boundary to the second one. At 0.25, 0.5 and
    // 0.75 the products by 0.25 or 0.5 are exact, so the reference is the same on a compiler
    // that contracts to FMA.
    constexpr std::size_t half = 500;
    constexpr int calls = 12;
    for (const float alpha : {0.25f, 0.5f, 0.75f}) {
        CAPTURE(alpha);
        auto rng = loco_test::rng_for("streaming merge lerp bits");
        const auto init = loco_test::normal_floats(rng, 2 * half);
        std::vector<std::vector<float>> grads;  // [call * 2 + rank]
        for (int i = 0; i < calls * 2; ++i) grads.push_back(loco_test::normal_floats(rng, 2 * half));
        std::array<std::size_t, 2> mismatches{}, merged_calls{};
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            const auto r = std::size_t(comm.rank());
            std::vector<float> a(init.begin(), init.begin() + half), b(init.begin() + half, init.end());
            std::vector<float> ga(half), gb(half);
            loco::parameter_list list;
            list.add("a", a, ga);
            list.add("b", b, gb);
            merge_opt<loco::outer::nesterov>::config cfg;
            cfg.inner = {.lr = 0.5f};
            cfg.outer = {.lr = 0.7f, .momentum = 0.9f};
            cfg.schedule = {.every = 4, .fragments = 2, .overlap = 1, .alpha = alpha};
            cfg.fragments.names = {{"a"}, {"b"}};
            merge_opt<loco::outer::nesterov> opt(list, comm, cfg);
            std::vector<float> global_before(opt.global().begin(), opt.global().end());
            for (int c = 1; c <= calls; ++c) {
                const auto& g = grads[std::size_t(c - 1) * 2 + r];
                std::copy(g.begin(), g.begin() + half, ga.begin());
                std::copy(g.begin() + half, g.end(), gb.begin());
                std::vector<float> before = a;
                before.insert(before.end(), b.begin(), b.end());
                opt.step();
                const std::vector<float> global(opt.global().begin(), opt.global().end());
                for (std::size_t f = 0; f < 2; ++f) {
                    const std::vector<float>& x = f == 0 ? a : b;
                    const bool merged = !std::equal(global.begin() + f * half,
                                                    global.begin() + (f + 1) * half,
                                                    global_before.begin() + f * half);
                    if (r == 0 && merged) ++merged_calls[f];
                    for (std::size_t j = 0; j < half; ++j) {
                        const std::size_t e = f * half + j;
                        const float end = before[e] - 0.5f * g[e];
                        const float start = global[e];
                        const float want = !merged ? end
                                           : alpha < 0.5f ? start + alpha * (end - start)
                                                          : end - (end - start) * (1.0f - alpha);
                        if (std::bit_cast<std::uint32_t>(x[j]) != std::bit_cast<std::uint32_t>(want)) {
                            ++mismatches[r];
                        }
                    }
                }
                global_before = global;
            }
        });
        CHECK(merged_calls == std::array<std::size_t, 2>{3, 3});  // three applies of each fragment
        CHECK(mismatches[0] == 0);
        CHECK(mismatches[1] == 0);
    }
}

TEST_CASE("streaming: each fragment's stochastic rounding draws its own numbers") {
    // compress/compressor.hpp: every rank and every sync uses fresh draws; a fragment's payload
    // must not reuse another fragment's draws, or the rounding errors of the fragments correlate
    // (loco::diloco gives each fragment its own seed). Two fragments whose pseudo-gradients are
    // exactly proportional (b's is 2 x a's: SGD at lr 1/8 on the same dyadic gradients, fragment 0
    // syncing after 2 steps, fragment 1 after 4, both in their round 0 on rank 0) are quantized
    // by blockwise<2, 64> with stochastic rounding: the same t for both (absmax scale doubled),
    // rounded up with probability p = t - floor(t). Shared draws would round every element alike,
    // decoded(b) == 2 decoded(a) everywhere; independent ones alike with probability
    // p^2 + (1 - p)^2, whose sum over the elements (and its variance) bound the count.
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::blockwise<2, 64>,
                               loco::schedule::streaming>;
    constexpr std::size_t n = 512;
    auto rng = loco_test::rng_for("streaming fragment seeds");
    std::uniform_int_distribution<int> sixty_fourths(-32, 32);
    std::vector<float> g(n);
    for (auto& v : g) v = float(sixty_fourths(rng)) / 64.0f;
    std::vector<float> a(n, 0.0f), b(n, 0.0f), ga = g, gb = g;
    loco::parameter_list list;
    list.add("a", a, ga);
    list.add("b", b, gb);
    loco::comm::single comm;
    opt_t::config cfg;
    cfg.inner = {.lr = 0.125f};
    cfg.outer = {.lr = 1.0f};
    cfg.compress = {.round = loco::compress::rounding::stochastic};
    cfg.schedule = {.every = 4, .fragments = 2, .overlap = 0};
    cfg.fragments.names = {{"a"}, {"b"}};
    cfg.seed = rng();
    CAPTURE(cfg.seed);
    opt_t opt(list, comm, cfg);
    opt.start();
    for (int c = 0; c < 4; ++c) opt.step();
    REQUIRE(opt.outer_steps(0) == 1);
    REQUIRE(opt.outer_steps(1) == 1);
    const auto global = opt.global();  // 0 - decoded: a's, then b's
    // Fragment a's pseudo-gradient is 2 * lr * g = g / 4; t = (x / s + 1) * 3 / 2 per block of 64.
    double expected_alike = 0.0, variance = 0.0;
    std::size_t alike = 0;
    for (std::size_t block = 0; block < n; block += 64) {
        double s = 0.0;
        for (std::size_t i = block; i < block + 64; ++i) s = std::max(s, std::abs(double(g[i]) / 4));
        for (std::size_t i = block; i < block + 64; ++i) {
            const double t = s == 0.0 ? 1.5 : (double(g[i]) / 4 / s + 1.0) * 1.5;
            const double p = t - std::floor(t);
            const double q = s == 0.0 ? 1.0 : p * p + (1 - p) * (1 - p);
            expected_alike += q;
            variance += q * (1 - q);
            alike += global[n + i] == 2.0f * global[i] ? 1 : 0;
        }
    }
    CAPTURE(expected_alike);
    CAPTURE(variance);
    CHECK(alike < n);
    CHECK(double(alike) <= expected_alike + 6.0 * std::sqrt(variance) + 1.0);
    CHECK(double(alike) >= expected_alike - 6.0 * std::sqrt(variance) - 1.0);
}
