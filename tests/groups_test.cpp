// Parameter groups: routing by selector, per-group hyper-parameters and state, equality with one
// optimizer per group run separately, checkpoints, errors, and diloco over groups (MuLoCo), whose
// values are checked against double-precision references (tests/support/reference.hpp,
// tests/support/muon_reference.hpp).
#include <doctest/doctest.h>

#include "support/compare.hpp"
#include "support/hex.hpp"
#include "support/muon_reference.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"

#include <loco/loco.hpp>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using namespace loco_test;

// A small transformer-shaped model: an embedding, a hidden matrix, a norm gain, an output head.
struct model {
    std::vector<float> wte, w1, gain, head;
    std::vector<float> g_wte, g_w1, g_gain, g_head;
    loco::parameter_list list;

    explicit model(const std::string& seed) {
        auto rng = rng_for(seed);
        wte = normal_floats(rng, 6 * 4);
        w1 = normal_floats(rng, 4 * 5);
        gain = normal_floats(rng, 4);
        head = normal_floats(rng, 4 * 6);
        g_wte.resize(wte.size());
        g_w1.resize(w1.size());
        g_gain.resize(gain.size());
        g_head.resize(head.size());
        list.add_views("wte", loco::host_matrix(wte.data(), 6, 4),
                       loco::host_matrix(static_cast<const float*>(g_wte.data()), 6, 4), loco::tags::embedding);
        list.add_views("h0.w1", loco::host_matrix(w1.data(), 4, 5),
                       loco::host_matrix(static_cast<const float*>(g_w1.data()), 4, 5));
        list.add("h0.gain", gain, g_gain);
        list.add_views("head", loco::host_matrix(head.data(), 4, 6),
                       loco::host_matrix(static_cast<const float*>(g_head.data()), 4, 6), loco::tags::head);
    }
    void set_gradients(const std::string& seed, int step) {
        auto rng = rng_for(seed + "/" + std::to_string(step));
        for (auto* g : {&g_wte, &g_w1, &g_gain, &g_head}) {
            const auto fresh = normal_floats(rng, g->size());
            std::copy(fresh.begin(), fresh.end(), g->begin());
        }
    }
};

using hidden_sgd_rest_adamw = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::sgd>,
                                           loco::group<loco::otherwise, loco::inner::adamw>>;

// The model's values and gradients in the flat layout (the order the tensors were added).
std::vector<float> flat(const model& m) {
    std::vector<float> x;
    for (const auto* v : {&m.wte, &m.w1, &m.gain, &m.head}) x.insert(x.end(), v->begin(), v->end());
    return x;
}
std::vector<float> flat_gradients(const model& m) {
    std::vector<float> g;
    for (const auto* v : {&m.g_wte, &m.g_w1, &m.g_gain, &m.g_head}) g.insert(g.end(), v->begin(), v->end());
    return g;
}

}  // namespace

TEST_CASE("groups: selectors route each parameter to the first group that matches") {
    model m("groups routing");
    const auto& params = m.list;
    CHECK(loco::is_hidden_matrix::matches(params[1]));
    CHECK_FALSE(loco::is_hidden_matrix::matches(params[0]));  // tagged embedding
    CHECK_FALSE(loco::is_hidden_matrix::matches(params[2]));  // a vector
    CHECK_FALSE(loco::is_hidden_matrix::matches(params[3]));  // tagged head
    CHECK(loco::is_matrix::matches(params[3]));
    CHECK(loco::is_vector::matches(params[2]));
    CHECK(loco::name_contains<"gain">::matches(params[2]));
    CHECK_FALSE(loco::name_contains<"gain">::matches(params[1]));
    CHECK(loco::has_tag<loco::tags::head>::matches(params[3]));

    loco::optimizer<hidden_sgd_rest_adamw> opt(m.list);
    const auto& engine = opt.engine_state();
    REQUIRE(engine.group_params<0>().size() == 1);
    CHECK(engine.group_params<0>()[0].name == "h0.w1");
    REQUIRE(engine.group_params<1>().size() == 3);
    CHECK(engine.group_params<1>()[0].name == "wte");
    CHECK(engine.group_params<1>()[1].name == "h0.gain");
    CHECK(engine.group_params<1>()[2].name == "head");
}

TEST_CASE("groups: each group behaves exactly like its own optimizer over its parameters") {
    const loco::inner::sgd::hyper sgd_h{.lr = 0.05f, .momentum = 0.9f, .nesterov = true};
    const loco::inner::adamw::hyper adamw_h{.lr = 1e-2f};
    model grouped("groups equality"), separate("groups equality");
    loco::optimizer<hidden_sgd_rest_adamw> opt(grouped.list, {.inner = {sgd_h, adamw_h}});

    loco::parameter_list hidden, rest;
    hidden.add_views("h0.w1", separate.list[1].value, separate.list[1].grad);
    for (const std::size_t i : {0u, 2u, 3u}) {
        rest.add_views(separate.list[i].name, separate.list[i].value, separate.list[i].grad);
    }
    loco::optimizer<loco::inner::sgd> sgd(hidden, {.inner = sgd_h});
    loco::optimizer<loco::inner::adamw> adamw(rest, {.inner = adamw_h});
    for (int step = 0; step < 7; ++step) {
        grouped.set_gradients("groups equality", step);
        separate.set_gradients("groups equality", step);
        CHECK(opt.step().applied);
        sgd.step();
        adamw.step();
    }
    CHECK(grouped.wte == separate.wte);
    CHECK(grouped.w1 == separate.w1);
    CHECK(grouped.gain == separate.gain);
    CHECK(grouped.head == separate.head);
    const auto& engine = opt.engine_state();
    CHECK(std::vector<float>(engine.group<1>().state(1).begin(), engine.group<1>().state(1).end()) ==
          std::vector<float>(adamw.state(1).begin(), adamw.state(1).end()));
    // Each group keeps its own hyper-parameters.
    CHECK(std::get<0>(opt.hyper()).lr == 0.05f);
    CHECK(std::get<1>(opt.hyper()).lr == 1e-2f);
}

TEST_CASE("groups: a non-finite gradient in one group skips the step of every group") {
    model m("groups nonfinite");
    loco::optimizer<hidden_sgd_rest_adamw> opt(m.list);
    m.set_gradients("groups nonfinite", 0);
    m.g_head[3] = std::numeric_limits<float>::quiet_NaN();
    const auto before = m.w1;
    CHECK_FALSE(opt.step().applied);
    CHECK(m.w1 == before);  // the SGD group did not move either
}

TEST_CASE("groups: checkpoints round-trip, and a parameter no group takes is refused") {
    model m("groups checkpoint");
    loco::optimizer<hidden_sgd_rest_adamw> opt(m.list);
    for (int step = 0; step < 3; ++step) {
        m.set_gradients("groups checkpoint", step);
        opt.step();
    }
    std::stringstream saved;
    opt.save(saved);
    loco::optimizer<hidden_sgd_rest_adamw> restored(m.list);
    restored.load(saved);
    std::ostringstream again;
    restored.save(again);
    CHECK(again.str() == saved.str());

    using only_matrices = loco::groups<loco::group<loco::is_matrix, loco::inner::sgd>>;
    CHECK_THROWS_WITH_AS(loco::optimizer<only_matrices>(m.list),
                         "loco: parameter 'h0.gain' matches no parameter group; add a last group<loco::otherwise, ...>",
                         loco::invalid_argument);
    CHECK_THROWS_AS(loco::optimizer<hidden_sgd_rest_adamw>(m.list, {.inner = {{.lr = -1.0f}, {}}}),
                    loco::invalid_argument);
}

// Two parameters of six elements each, one in each group, chosen by role: swapping the roles keeps
// every group's sizes and changes which parameter each state belongs to.
using embedding_sgd_rest_adamw =
    loco::groups<loco::group<loco::has_role<loco::role::embedding>, loco::inner::sgd>,
                 loco::group<loco::otherwise, loco::inner::adamw>>;
struct two_roles {
    std::vector<float> a = {1, 2, 3, 4, 5, 6}, b = {-1, -2, -3, -4, -5, -6}, ga, gb;
    loco::parameter_list list;
    explicit two_roles(bool a_is_embedding) : ga(6), gb(6) {
        const loco::role first = a_is_embedding ? loco::role::embedding : loco::role::vector;
        const loco::role second = a_is_embedding ? loco::role::vector : loco::role::embedding;
        list.add("a", a, ga, {.role = first});
        list.add("b", b, gb, {.role = second});
    }
};
const loco::optimizer<embedding_sgd_rest_adamw>::config two_roles_config{
    .inner = {{.lr = 0.5f, .momentum = 0.9f}, {.lr = 0.1f}}};

TEST_CASE("groups: a checkpoint whose parameters went to other groups of the same sizes is refused") {
    two_roles saved_model(true);
    loco::optimizer<embedding_sgd_rest_adamw> opt(saved_model.list, two_roles_config);
    saved_model.ga.assign(6, 0.5f);
    saved_model.gb.assign(6, -0.25f);
    opt.step();
    std::stringstream saved;
    opt.save(saved);

    two_roles swapped(false);
    loco::optimizer<embedding_sgd_rest_adamw> other(swapped.list, two_roles_config);
    CHECK_THROWS_WITH_AS(other.load(saved),
                         "loco: checkpoint mismatch in the parameter groups: parameter 'a' was "
                         "saved in group 0, this optimizer puts it in group 1 (the selectors, "
                         "roles or tags changed)",
                         loco::checkpoint_error);
    CHECK(other.steps() == 0);
    CHECK(other.engine_state().group<0>().state(0)[0] == 0.0f);
}

TEST_CASE("groups: a format 2 checkpoint (no routing recorded) still loads") {
    // Written by loco at commit 5e02b60 (format 2): two_roles(true), gradients
    // ga[i] = (s + i) / 4 and gb[i] = -s i / 2 at steps s = 1, 2.
    const std::string format2 = bytes_from_hex(
        "4c4f434f434b50540200000009000000000000006f7074696d697a657202000000000000000600000000000000060000"
        "000000000002000000000000000000000000000000060000000000000067726f75707302000000000000000100000000"
        "00000006000000000000000300000000000000736764010000000000000006000000000000009a99393f9a99993f6666"
        "d63f9a99094000002840666646400100000000000000060000000000000005000000000000006164616d770200000000"
        "0000000c0000000000000000000000e47a14bee47a94be56b8debee47a14bf9c9939bf00000000a8707d3da8707d3e5e"
        "8f0e3fa8707d3f0200c63f885bde8dc89e8d8f");
    REQUIRE(format2.size() == 259);
    two_roles straight_model(true);
    loco::optimizer<embedding_sgd_rest_adamw> straight(straight_model.list, two_roles_config);
    const auto gradients = [](two_roles& m, int s) {
        for (std::size_t i = 0; i < 6; ++i) {
            m.ga[i] = 0.25f * float(s + int(i));
            m.gb[i] = -0.5f * float(s * int(i));
        }
    };
    for (int s = 1; s <= 2; ++s) {
        gradients(straight_model, s);
        straight.step();
    }
    two_roles resumed_model(true);
    resumed_model.a = straight_model.a;
    resumed_model.b = straight_model.b;
    loco::optimizer<embedding_sgd_rest_adamw> resumed(resumed_model.list, two_roles_config);
    std::istringstream is(format2);
    resumed.load(is);
    CHECK(resumed.steps() == 2);
    for (int s = 3; s <= 5; ++s) {
        gradients(straight_model, s);
        gradients(resumed_model, s);
        straight.step();
        resumed.step();
        CHECK(resumed_model.a == straight_model.a);
        CHECK(resumed_model.b == straight_model.b);
    }
    // Saved again, it is the current format, with the routing.
    std::ostringstream again;
    resumed.save(again);
    CHECK(static_cast<unsigned char>(again.str()[8]) == loco::detail::checkpoint_format_version);
}

TEST_CASE("groups inside diloco: two workers, one sync, values of a double-precision reference") {
    // SGD on the hidden matrix, AdamW elsewhere, outer Nesterov: three inner steps per worker on
    // fresh random gradients, then one sync; every tensor of both workers against the reference.
    using opt_t = loco::diloco<hidden_sgd_rest_adamw, loco::outer::nesterov>;
    const opt_t::config cfg{.inner = {{.lr = 0.01f}, {.lr = 1e-3f}}, .schedule = {.every = 3}};
    std::vector<std::vector<float>> finals(2);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        model m("groups diloco");
        opt_t opt(m.list, comm, cfg);
        opt.start();
        for (int step = 0; step < 3; ++step) {
            m.set_gradients("groups diloco/" + std::to_string(comm.rank()), step);
            opt.step();
        }
        CHECK(opt.outer_steps() == 1);
        std::get<1>(opt.inner_hyper()).lr = 5e-4f;  // per-group schedules work through the tuple
        finals[std::size_t(comm.rank())] = flat(m);
    });
    CHECK(finals[0] == finals[1]);

    // The reference: both workers start from rank 0's values.
    model init("groups diloco");
    const std::vector<float> init_values = flat(init);
    const std::vector<double> start(init_values.begin(), init_values.end());
    const std::size_t n = start.size(), w1_at = init.wte.size(), w1_end = w1_at + init.w1.size();
    std::vector<double> delta(n, 0.0);
    for (int r = 0; r < 2; ++r) {
        model m("groups diloco");
        std::vector<double> x = start, adam(2 * n, 0.0), sgd(n, 0.0);
        for (int step = 0; step < 3; ++step) {
            m.set_gradients("groups diloco/" + std::to_string(r), step);
            const auto g = flat_gradients(m);
            for (std::size_t i = 0; i < n; ++i) {
                if (i >= w1_at && i < w1_end) {
                    reference<loco::inner::sgd>::step(std::get<0>(cfg.inner), x[i], g[i], &sgd[i], step + 1);
                } else {
                    reference<loco::inner::adamw>::step(std::get<1>(cfg.inner), x[i], g[i], &adam[2 * i], step + 1);
                }
            }
        }
        for (std::size_t i = 0; i < n; ++i) delta[i] += (start[i] - x[i]) / 2;
    }
    std::vector<double> global = start;
    mismatch_log log;
    for (std::size_t i = 0; i < n; ++i) {
        double momentum = 0.0;
        reference<loco::outer::nesterov>::step(cfg.outer, global[i], delta[i], &momentum, 1);
        log.expect_close(finals[0][i], global[i], 1e-5, [&](std::ostream& o) { o << "element " << i; });
    }
    log.check();
}

// ---- Muon through loco::optimizer and groups ------------------------------------------------------

TEST_CASE("muon in loco::optimizer equals update_matrix called by hand, matrix by matrix") {
    model a("muon optimizer"), b("muon optimizer");
    loco::parameter_list matrices;
    matrices.add_views("h0.w1", a.list[1].value, a.list[1].grad);
    matrices.add_views("head", a.list[3].value, a.list[3].grad);
    const loco::inner::muon::hyper h{.lr = 0.02f, .weight_decay = 0.01f};
    loco::optimizer<loco::inner::muon> opt(matrices, {.inner = h});
    std::vector<float> m_w1(b.w1.size(), 0.0f), m_head(b.head.size(), 0.0f);
    loco::inner::muon_workspace ws;
    for (int step = 1; step <= 3; ++step) {
        a.set_gradients("muon optimizer", step);
        b.set_gradients("muon optimizer", step);
        CHECK(opt.step().applied);
        loco::inner::muon::update_matrix(h, std::uint64_t(step), b.w1.data(), b.g_w1.data(), m_w1.data(), 4, 5, ws);
        loco::inner::muon::update_matrix(h, std::uint64_t(step), b.head.data(), b.g_head.data(), m_head.data(), 4, 6, ws);
    }
    CHECK(a.w1 == b.w1);
    CHECK(a.head == b.head);
    CHECK(std::vector<float>(opt.state(0).begin(), opt.state(0).begin() + 20) == m_w1);
}

TEST_CASE("muon refuses a parameter without a 2-D shape, naming it") {
    model m("muon refuses");
    CHECK_THROWS_WITH_AS(loco::optimizer<loco::inner::muon>(m.list),
                         doctest::Contains("parameter 'h0.gain' has no 2-D shape"), loco::invalid_argument);
    using muon_for_everything = loco::groups<loco::group<loco::otherwise, loco::inner::muon>>;
    CHECK_THROWS_WITH_AS(loco::optimizer<muon_for_everything>(m.list),
                         doctest::Contains("parameter 'h0.gain' has no 2-D shape"), loco::invalid_argument);
}

TEST_CASE("muon: a non-finite gradient of a Muon matrix is refused before any matrix moves, even "
          "under ignore, and the other groups' are ignored under ignore") {
    model m("muon nonfinite");
    using muloco_inner = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                                      loco::group<loco::otherwise, loco::inner::adamw>>;
    m.set_gradients("muon nonfinite", 0);
    const auto w1 = m.w1, wte = m.wte, head = m.head;
    // The Muon matrix (h0.w1): refused under ignore as under raise.
    m.g_w1[3] = std::numeric_limits<float>::infinity();
    loco::optimizer<muloco_inner> opt(m.list, {.on_nonfinite = loco::nonfinite_policy::ignore});
    CHECK_THROWS_WITH_AS(opt.step(),
                         "loco: the gradient of 'h0.w1' holds inf at element 3; the step was not "
                         "applied",
                         loco::nonfinite_error);
    CHECK(m.w1 == w1);
    CHECK(m.wte == wte);
    CHECK(opt.steps() == 0);
    // Under skip, any group's non-finite gradient skips every group.
    loco::optimizer<muloco_inner> skipping(m.list);
    CHECK_FALSE(skipping.step().applied);
    CHECK(m.w1 == w1);

    // An AdamW parameter (head): ignore means ignore; Muon still updates its matrix.
    m.set_gradients("muon nonfinite", 0);
    m.g_head[1] = std::numeric_limits<float>::infinity();
    loco::optimizer<muloco_inner> ignoring(m.list, {.on_nonfinite = loco::nonfinite_policy::ignore});
    CHECK(ignoring.step().applied);
    CHECK(ignoring.steps() == 1);
    CHECK(m.w1 != w1);
    CHECK(m.wte != wte);
    CHECK_FALSE(std::isfinite(m.head[1]));  // AdamW applied the infinite gradient, as asked
    CHECK(m.head[0] != head[0]);
}

TEST_CASE("MuLoCo composes: Muon on hidden matrices, AdamW elsewhere, 2-bit codes with error feedback") {
    // Two workers, two rounds of two inner steps on fresh random gradients. Before each sync every
    // worker's values must equal a double-precision run of Muon (on h0.w1) and AdamW (elsewhere)
    // from the round's global values; after it, the global values must equal a double-precision
    // outer Nesterov step on the mean of the workers' decoded 2-bit codes, whose pseudo-gradients
    // and error-feedback residuals the test computes itself from the workers' values.
    using compressor = loco::compress::error_feedback<loco::compress::statistical<2>>;
    using muloco = loco::diloco<loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                                             loco::group<loco::otherwise, loco::inner::adamw>>,
                                loco::outer::nesterov, compressor>;
    const muloco::config cfg{.inner = {{.lr = 0.02f}, {.lr = 1e-3f}},
                             .schedule = {.every = 1000},  // the test syncs itself
                             .compress = {.decay = 0.9f}};
    constexpr int rounds = 2, steps = 2;
    // [round][rank]: the values before the sync; [round]: the global values before and after.
    std::vector<std::vector<std::vector<float>>> before_sync(rounds, std::vector<std::vector<float>>(2));
    std::vector<std::vector<float>> global_before(rounds), global_after(rounds);
    std::vector<std::uint64_t> bytes(2);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = std::size_t(comm.rank());
        model m("muloco compose");
        muloco opt(m.list, comm, cfg);
        opt.start();
        for (int round = 0; round < rounds; ++round) {
            if (r == 0) global_before[std::size_t(round)].assign(opt.global().begin(), opt.global().end());
            for (int step = 0; step < steps; ++step) {
                m.set_gradients("muloco compose/" + std::to_string(r), round * steps + step);
                CHECK(opt.step().applied);
            }
            before_sync[std::size_t(round)][r] = flat(m);
            opt.sync();
            if (r == 0) global_after[std::size_t(round)].assign(opt.global().begin(), opt.global().end());
            CHECK(flat(m) == std::vector<float>(opt.global().begin(), opt.global().end()));
        }
        CHECK(opt.outer_steps() == 2);
        bytes[r] = opt.bytes_per_sync();
    });
    CHECK(bytes[0] > 0);

    model shape("muloco compose");
    const std::size_t n = flat(shape).size(), w1_at = shape.wte.size(), w1_end = w1_at + shape.w1.size();
    const auto segments = loco::detail::parameter_segments(shape.list);
    const loco::inner::muon::hyper& muon_h = std::get<0>(cfg.inner);
    const loco::inner::adamw::hyper& adamw_h = std::get<1>(cfg.inner);
    std::vector<std::vector<double>> muon_buf(2, std::vector<double>(w1_end - w1_at, 0.0));
    std::vector<std::vector<double>> adam(2, std::vector<double>(2 * n, 0.0));
    std::vector<std::vector<float>> residual(2, std::vector<float>(compressor::state_size * n, 0.0f));
    std::vector<double> outer_momentum(n, 0.0);
    mismatch_log inner_log, outer_log;
    for (int round = 0; round < rounds; ++round) {
        const auto& g0 = global_before[std::size_t(round)];
        std::vector<double> mean(n, 0.0);
        for (std::size_t r = 0; r < 2; ++r) {
            model m("muloco compose");
            std::vector<double> x(g0.begin(), g0.end());
            for (int step = 0; step < steps; ++step) {
                const int t = round * steps + step;
                m.set_gradients("muloco compose/" + std::to_string(r), t);
                const auto g = flat_gradients(m);
                std::vector<double> w1(x.begin() + long(w1_at), x.begin() + long(w1_end));
                muon_ref::reference_step(muon_h, w1, std::vector<float>(g.begin() + long(w1_at), g.begin() + long(w1_end)),
                                         muon_buf[r], 4, 5);
                std::copy(w1.begin(), w1.end(), x.begin() + long(w1_at));
                for (std::size_t i = 0; i < n; ++i) {
                    if (i < w1_at || i >= w1_end) {
                        reference<loco::inner::adamw>::step(adamw_h, x[i], g[i], &adam[r][2 * i], std::uint64_t(t + 1));
                    }
                }
            }
            const auto& got = before_sync[std::size_t(round)][r];
            for (std::size_t i = 0; i < n; ++i) {
                inner_log.expect_close(got[i], x[i], 1e-4, [&](std::ostream& o) {
                    o << "round " << round << " rank " << r << " element " << i;
                });
            }
            // The worker's pseudo-gradient, encoded and decoded as its peers see it.
            std::vector<float> delta(n);
            for (std::size_t i = 0; i < n; ++i) delta[i] = g0[i] - got[i];
            std::vector<std::byte> payload(compressor::payload_bytes(cfg.compress, segments));
            const loco::compress::encode_context ctx{.seed = 0, .round = std::uint64_t(round), .rank = int(r),
                                                     .outer_lr = cfg.outer.lr};
            compressor::encode(cfg.compress, delta, segments, residual[r], ctx, payload);
            std::vector<float> decoded(n);
            compressor::decode(cfg.compress, payload, segments, decoded);
            for (std::size_t i = 0; i < n; ++i) mean[i] += double(decoded[i]) / 2;
        }
        for (std::size_t i = 0; i < n; ++i) {
            double x = g0[i];
            reference<loco::outer::nesterov>::step(cfg.outer, x, mean[i], &outer_momentum[i], std::uint64_t(round + 1));
            outer_log.expect_close(global_after[std::size_t(round)][i], x, 1e-5, [&](std::ostream& o) {
                o << "round " << round << " global element " << i;
            });
        }
    }
    inner_log.check();
    outer_log.check();
}

// ---- roles, stacks and the shape guess ------------------------------------------------------------

namespace {

// A transformer that stacks its layers: (L, C, C) attention weights, (L, C) norm gains, an
// embedding and a head, each registered with its role (or, with_roles = false, without, as before
// roles existed: the embedding and the head tagged, the rest left to the shape).
struct stacked_model {
    static constexpr std::size_t layers = 3, width = 6, vocab = 5;
    std::vector<float> wte, attn, ln, head;
    std::vector<float> g_wte, g_attn, g_ln, g_head;
    loco::parameter_list list;

    stacked_model(const std::string& seed, bool with_roles) {
        auto rng = rng_for(seed);
        wte = normal_floats(rng, vocab * width);
        attn = normal_floats(rng, layers * width * width);
        ln = normal_floats(rng, layers * width, 0.1f, 1.0f);
        head = normal_floats(rng, width * vocab);
        g_wte.resize(wte.size());
        g_attn.resize(attn.size());
        g_ln.resize(ln.size());
        g_head.resize(head.size());
        const auto as = [&](loco::role r) { return with_roles ? r : loco::role::unspecified; };
        list.add_views("wte", loco::host_matrix(wte.data(), vocab, width),
                       loco::host_matrix(static_cast<const float*>(g_wte.data()), vocab, width),
                       {.role = as(loco::role::embedding), .tag = loco::tags::embedding});
        list.add("h.attn", attn, g_attn,
                 {.role = as(loco::role::matrix), .stack = {layers, width, width}});
        list.add_views("h.ln", loco::host_matrix(ln.data(), layers, width),
                       loco::host_matrix(static_cast<const float*>(g_ln.data()), layers, width),
                       {.role = as(loco::role::vector)});
        list.add_views("head", loco::host_matrix(head.data(), width, vocab),
                       loco::host_matrix(static_cast<const float*>(g_head.data()), width, vocab),
                       {.role = as(loco::role::head), .tag = loco::tags::head});
    }
    void set_gradients(const std::string& seed, int step) {
        auto rng = rng_for(seed + "/" + std::to_string(step));
        for (auto* g : {&g_wte, &g_attn, &g_ln, &g_head}) {
            const auto fresh = normal_floats(rng, g->size());
            std::copy(fresh.begin(), fresh.end(), g->begin());
        }
    }
};

using muloco_groups = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                                   loco::group<loco::otherwise, loco::inner::adamw>>;

// Collects warnings for one test and puts stderr back afterwards.
struct captured_warnings {
    std::vector<std::string> lines;
    captured_warnings() {
        loco::set_warning_sink([this](std::string_view line) { lines.emplace_back(line); });
    }
    ~captured_warnings() { loco::set_warning_sink(loco::warn_to_stderr); }
};

}  // namespace

TEST_CASE("groups: selectors read the role first, and the shape only without one") {
    stacked_model m("groups roles", true);
    const auto& p = m.list;
    // wte, h.attn (a stack), h.ln (a (L, C) stack of gains), head
    CHECK_FALSE(loco::is_hidden_matrix::matches(p[0]));
    CHECK(loco::is_hidden_matrix::matches(p[1]));
    CHECK_FALSE(loco::is_hidden_matrix::matches(p[2]));  // 2-D, but role vector
    CHECK_FALSE(loco::is_hidden_matrix::matches(p[3]));
    CHECK(loco::is_vector::matches(p[2]));
    CHECK_FALSE(loco::is_matrix::matches(p[2]));
    CHECK(loco::is_matrix::matches(p[0]));
    CHECK(loco::is_matrix::matches(p[1]));
    CHECK(loco::has_role<loco::role::vector>::matches(p[2]));
    CHECK(loco::has_role<loco::role::embedding>::matches(p[0]));
    CHECK(loco::has_role<loco::role::head>::matches(p[3]));
    CHECK_FALSE(loco::has_role<loco::role::matrix>::matches(p[0]));

    // Without roles the guess from the shape is what it always was: every 2-D parameter not
    // tagged embedding or head is a hidden matrix, the (L, C) gains included.
    stacked_model bare("groups roles", false);
    CHECK(loco::is_hidden_matrix::matches(bare.list[2]));
    CHECK(loco::is_matrix::matches(bare.list[2]));
    CHECK_FALSE(loco::is_vector::matches(bare.list[2]));
    CHECK_FALSE(loco::has_role<loco::role::matrix>::matches(bare.list[1]));
    // Tags name roles for has_role and is_hidden_matrix, as before.
    model tagged("groups roles tags");
    CHECK(loco::has_role<loco::role::embedding>::matches(tagged.list[0]));
    CHECK(loco::has_role<loco::role::head>::matches(tagged.list[3]));
    CHECK(loco::role_of(tagged.list[1]) == loco::role::unspecified);
}

TEST_CASE("groups: a stack goes to Muon as L matrices and to AdamW as one tensor") {
    const loco::inner::muon::hyper muon_h{.lr = 0.05f, .weight_decay = 0.01f};
    const loco::inner::adamw::hyper adamw_h{.lr = 1e-2f};
    captured_warnings warnings;
    stacked_model grouped("groups stack", true), separate("groups stack", true);
    loco::optimizer<muloco_groups> opt(grouped.list, {.inner = {muon_h, adamw_h}});
    const auto& engine = opt.engine_state();
    REQUIRE(engine.group_params<0>().size() == 1);
    CHECK(engine.group_params<0>()[0].name == "h.attn");
    CHECK(engine.group_params<0>()[0].matrices == 3);
    REQUIRE(engine.group_params<1>().size() == 3);
    CHECK(engine.group_params<1>()[1].name == "h.ln");

    // The same arithmetic by other routes: Muon over the L layers registered one by one, AdamW
    // over the other tensors registered flat.
    constexpr std::size_t c = stacked_model::width, each = c * c;
    loco::parameter_list layers, flat;
    for (std::size_t l = 0; l < stacked_model::layers; ++l) {
        layers.add_views("h" + std::to_string(l) + ".attn",
                         loco::host_matrix(separate.attn.data() + l * each, c, c),
                         loco::host_matrix(static_cast<const float*>(separate.g_attn.data()) + l * each, c, c));
    }
    flat.add("wte", separate.wte, separate.g_wte);
    flat.add("h.ln", separate.ln, separate.g_ln);
    flat.add("head", separate.head, separate.g_head);
    loco::optimizer<loco::inner::muon> muon(layers, {.inner = muon_h});
    loco::optimizer<loco::inner::adamw> adamw(flat, {.inner = adamw_h});
    for (int step = 0; step < 4; ++step) {
        grouped.set_gradients("groups stack", step);
        separate.set_gradients("groups stack", step);
        REQUIRE(opt.step().applied);
        muon.step();
        adamw.step();
    }
    CHECK(grouped.attn == separate.attn);
    CHECK(grouped.ln == separate.ln);
    CHECK(grouped.wte == separate.wte);
    CHECK(grouped.head == separate.head);
    CHECK(std::vector<float>(engine.group<0>().state(0).begin(), engine.group<0>().state(0).end()) ==
          std::vector<float>(muon.state(0).begin(), muon.state(0).end()));
    CHECK(warnings.lines.empty());  // every parameter had a role
}

TEST_CASE("groups: a 2-D parameter without a role sent to Muon on its shape warns once") {
    captured_warnings warnings;
    stacked_model bare("groups guess", false);
    loco::optimizer<muloco_groups> first(bare.list);
    // Without roles, the (L, C) gains go to Muon as the rank says: results as before roles.
    CHECK(first.engine_state().group_params<0>().size() == 2);
    REQUIRE(warnings.lines.size() == 1);
    const std::string& line = warnings.lines[0];
    INFO(line);
    // h.attn is a declared stack of matrices: no guess. h.ln is the (L, C) guess.
    CHECK(line.find("loco: warning: 'h.ln' (3 x 6) by loco::is_hidden_matrix went to a per-matrix "
                    "policy (Muon) on a 2-D shape alone") == 0);
    CHECK(line.find(".role = loco::role::matrix or loco::role::vector") != std::string::npos);
    CHECK(line.find("docs/groups.md") != std::string::npos);

    // Once per process: a second optimizer (another worker, say) says nothing more ...
    loco::optimizer<muloco_groups> second(bare.list);
    CHECK(warnings.lines.size() == 1);
    // ... until a sink is set again.
    captured_warnings again;
    loco::optimizer<muloco_groups> third(bare.list);
    CHECK(again.lines.size() == 1);

    // Element-wise groups take the guess without a word: their arithmetic does not depend on it.
    captured_warnings quiet;
    loco::optimizer<hidden_sgd_rest_adamw> sgd(bare.list);
    CHECK(quiet.lines.empty());
    // Nor does Muon in loco::optimizer<muon>, where the user chose Muon for every parameter.
    loco::parameter_list one;
    one.add_views("h.ln", bare.list[2].value, bare.list[2].grad);
    loco::optimizer<loco::inner::muon> direct(one);
    CHECK(quiet.lines.empty());
}

TEST_CASE("groups: strict roles refuse the shape guess, naming the parameter") {
    captured_warnings warnings;
    stacked_model bare("groups strict", false);
    bare.list.set_strict_roles();
    CHECK(bare.list.strict_roles());
    CHECK_THROWS_WITH_AS(
        loco::optimizer<muloco_groups>(bare.list),
        "loco: parameter 'h.ln' (3 x 6) has no role, and loco::is_hidden_matrix would send it to "
        "a per-matrix policy on its 2-D shape alone; add it with .role = loco::role::matrix for a "
        "weight matrix or loco::role::vector for a stack of norm gains or biases (docs/groups.md)",
        loco::invalid_argument);
    CHECK(warnings.lines.empty());
    // Element-wise groups are not affected; with roles, strict lists build.
    CHECK_NOTHROW(loco::optimizer<hidden_sgd_rest_adamw>(bare.list));
    stacked_model roled("groups strict", true);
    roled.list.set_strict_roles();
    CHECK_NOTHROW(loco::optimizer<muloco_groups>(roled.list));

    // A declared stack says what the tensor is, one matrix included: no guess, no warning, and
    // a strict list builds.
    std::vector<float> flat(12), g_flat(12), gain(6), g_gain(6);
    loco::parameter_list declared;
    declared.add("h.w", flat, g_flat, {.stack = {1, 3, 4}});
    declared.add("h.gain", gain, g_gain);
    declared.set_strict_roles();
    captured_warnings none;
    loco::optimizer<muloco_groups> stacked_one(declared);
    CHECK(stacked_one.engine_state().group_params<0>().size() == 1);
    CHECK(stacked_one.engine_state().group_params<0>()[0].name == "h.w");
    CHECK(none.lines.empty());
    // Registering it again from its options keeps the declaration.
    loco::parameter_list again;
    again.add_views("h.w", declared[0].value, declared[0].grad, declared[0].options());
    CHECK(again[0].stacked);
    CHECK(again[0].matrices == 1);

    // Muon refuses a parameter whose role says it is not a matrix, whatever routed it there.
    using muon_for_everything = loco::groups<loco::group<loco::otherwise, loco::inner::muon>>;
    CHECK_THROWS_WITH_AS(loco::optimizer<muon_for_everything>(roled.list),
                         doctest::Contains("parameter 'h.ln' has role vector"),
                         loco::invalid_argument);
}

TEST_CASE("groups: with a role, embedding, head and matrix are matrices and only vector is a vector") {
    stacked_model m("groups roles vector", true);
    const auto& p = m.list;  // wte (embedding), h.attn (matrix), h.ln (vector), head (head)
    CHECK_FALSE(loco::is_vector::matches(p[0]));
    CHECK_FALSE(loco::is_vector::matches(p[1]));
    CHECK(loco::is_vector::matches(p[2]));
    CHECK_FALSE(loco::is_vector::matches(p[3]));
    CHECK(loco::is_matrix::matches(p[3]));
    // The routing follows: a vector group first takes the gains alone.
    using vectors_first = loco::groups<loco::group<loco::is_vector, loco::inner::sgd>,
                                       loco::group<loco::otherwise, loco::inner::adamw>>;
    loco::optimizer<vectors_first> opt(m.list);
    REQUIRE(opt.engine_state().group_params<0>().size() == 1);
    CHECK(opt.engine_state().group_params<0>()[0].name == "h.ln");
    CHECK(opt.engine_state().group_params<1>().size() == 3);
}

TEST_CASE("groups: the shape-guess warning names the first three parameters and counts the rest") {
    captured_warnings warnings;
    constexpr std::size_t count = 5, rows = 2, cols = 3;
    std::vector<std::vector<float>> values(count, std::vector<float>(rows * cols, 0.5f));
    std::vector<std::vector<float>> grads(count, std::vector<float>(rows * cols, 0.0f));
    loco::parameter_list list;
    for (std::size_t i = 0; i < count; ++i) {
        list.add_views("m" + std::to_string(i), loco::host_matrix(values[i].data(), rows, cols),
                       loco::host_matrix(static_cast<const float*>(grads[i].data()), rows, cols));
    }
    loco::optimizer<muloco_groups> opt(list);
    CHECK(opt.engine_state().group_params<0>().size() == count);
    REQUIRE(warnings.lines.size() == 1);
    const std::string& line = warnings.lines[0];
    INFO(line);
    CHECK(line.find("loco: warning: 'm0' (2 x 3) by loco::is_hidden_matrix, 'm1' (2 x 3) by "
                    "loco::is_hidden_matrix, 'm2' (2 x 3) by loco::is_hidden_matrix and 2 more "
                    "went to a per-matrix policy (Muon)") == 0);
}
