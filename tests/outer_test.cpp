// Conformance suite for outer optimizers: the per-element rule that loco::diloco runs at each sync,
// applied through the host backend to random global parameters and pseudo-gradients, against the
// double-precision reference in support/reference.hpp. Plus the published first-step values of
// outer Nesterov.
#include <doctest/doctest.h>

#include "support/compare.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/settings.hpp"

#include <loco/loco.hpp>

#include <boost/mp11.hpp>

#include <array>
#include <cmath>
#include <concepts>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using namespace loco_test;

template <class Policy>
struct outer_case {
    using policy = Policy;
    static constexpr double step_rel_tol = 2e-6;
    static constexpr double trajectory_rel_tol = 1e-4;
};

struct averaging : outer_case<loco::outer::sgd> {
    static constexpr const char* label = "outer sgd, lr 1 (parameter averaging)";
    static policy::hyper hyper() { return {}; }
};
struct outer_sgd_half : outer_case<loco::outer::sgd> {
    static constexpr const char* label = "outer sgd, lr 0.5";
    static policy::hyper hyper() { return {.lr = 0.5f}; }
};
struct nesterov_diloco : outer_case<loco::outer::nesterov> {
    static constexpr const char* label = "outer nesterov, DiLoCo defaults";
    static policy::hyper hyper() { return {}; }
};
struct nesterov_maxtext : outer_case<loco::outer::nesterov> {
    static constexpr const char* label = "outer nesterov, lr 1, momentum 0.9";
    static policy::hyper hyper() { return {.lr = 1.0f, .momentum = 0.9f}; }
};
struct fedadam : outer_case<loco::outer::adam> {
    static constexpr const char* label = "outer adam, FedAdam defaults";
    static policy::hyper hyper() { return {}; }
};
struct adam_bias_corrected : outer_case<loco::outer::adam> {
    static constexpr const char* label = "outer adam, bias correction, lr 0.1, tau 1e-6";
    static policy::hyper hyper() { return {.lr = 0.1f, .tau = 1e-6f, .bias_correction = true}; }
};

using outer_cases = boost::mp11::mp_list<averaging, outer_sgd_half, nesterov_diloco,
                                         nesterov_maxtext, fedadam, adam_bias_corrected>;

using builtin_outer =
    boost::mp11::mp_list<loco::outer::sgd, loco::outer::nesterov, loco::outer::adam>;
template <class P>
using is_outer = std::bool_constant<loco::outer_optimizer<P>>;
static_assert(boost::mp11::mp_all_of<builtin_outer, is_outer>::value);
template <class C>
using policy_of = typename C::policy;
template <class P>
using has_case = boost::mp11::mp_contains<boost::mp11::mp_transform<policy_of, outer_cases>, P>;
static_assert(boost::mp11::mp_all_of<builtin_outer, has_case>::value,
              "every built-in outer optimizer needs a conformance case");

// Runs one outer step of policy P over the whole flat buffer, the way loco::diloco does.
template <class P>
void outer_step(const typename P::hyper& h, std::uint64_t t, std::vector<float>& global,
                const std::vector<float>& delta, std::vector<float>& state) {
    const auto k = P::prepare(h, t);
    loco::backend::host::apply<P>(k, global.data(), delta.data(), state.data(), global.size(),
                                  global.size());
}

}  // namespace

TEST_CASE_TEMPLATE_DEFINE("outer optimizer matches its double-precision reference", Case,
                          outer_conformance) {
    using P = typename Case::policy;
    constexpr int S = P::state_size;
    INFO("case: " << std::string(Case::label));
    auto rng = rng_for(Case::label);
    const std::size_t n = 1003;
    std::vector<float> global = normal_floats(rng, n);
    std::vector<float> state(static_cast<std::size_t>(S) * n, 0.0f);

    SUBCASE("one step at a time, from the same state") {
        mismatch_log log;
        for (std::uint64_t t = 1; t <= 30; ++t) {
            // Pseudo-gradients are parameter differences accumulated over H inner steps: small.
            const auto delta = normal_floats(rng, n, 0.05f);
            std::vector<double> x_ref(global.begin(), global.end());
            std::vector<double> s_ref(state.begin(), state.end());
            reference_step_all<P>(Case::hyper(), x_ref, delta, s_ref, t);
            outer_step<P>(Case::hyper(), t, global, delta, state);
            for (std::size_t i = 0; i < n; ++i) {
                log.expect_close(global[i], x_ref[i], Case::step_rel_tol,
                                 [&](auto& s) { s << "step " << t << ", global[" << i << "]"; });
            }
            for (std::size_t i = 0; i < state.size(); ++i) {
                log.expect_close(state[i], s_ref[i], Case::step_rel_tol,
                                 [&](auto& s) { s << "step " << t << ", state[" << i << "]"; });
            }
        }
        log.check();
    }

    SUBCASE("a 100-step trajectory") {
        std::vector<double> x_ref(global.begin(), global.end());
        std::vector<double> s_ref(state.size(), 0.0);
        for (std::uint64_t t = 1; t <= 100; ++t) {
            const auto delta = normal_floats(rng, n, 0.05f);
            reference_step_all<P>(Case::hyper(), x_ref, delta, s_ref, t);
            outer_step<P>(Case::hyper(), t, global, delta, state);
        }
        mismatch_log log;
        for (std::size_t i = 0; i < n; ++i) {
            log.expect_close(global[i], x_ref[i], Case::trajectory_rel_tol,
                             [&](auto& s) { s << "global[" << i << "]"; });
        }
        log.check();
    }
}

TEST_CASE_TEMPLATE_APPLY(outer_conformance, boost::mp11::mp_rename<outer_cases, std::tuple>);

TEST_CASE("outer Nesterov: the first step moves by (1 + momentum) * lr * delta") {
    // algorithms.md section 0: with momentum 0.9 the first outer step is 1.9 * lr * delta.
    auto rng = rng_for("nesterov first step");
    const std::size_t n = 257;
    const loco::outer::nesterov::hyper h{.lr = 0.7f, .momentum = 0.9f};
    auto global = normal_floats(rng, n);
    const auto start = global;
    const auto d1 = normal_floats(rng, n, 0.1f);
    const auto d2 = normal_floats(rng, n, 0.1f);
    std::vector<float> state(n, 0.0f);

    outer_step<loco::outer::nesterov>(h, 1, global, d1, state);
    mismatch_log first;
    for (std::size_t i = 0; i < n; ++i) {
        first.expect_close(global[i], double(start[i]) - 1.9 * 0.7 * double(d1[i]), 1e-6,
                           [&](auto& s) { s << "element " << i; });
        first.expect_close(state[i], d1[i], 0.0, [&](auto& s) { s << "momentum " << i; });
    }
    first.check();

    // Second step by hand: b = 0.9 d1 + d2; x -= 0.7 (d2 + 0.9 b).
    outer_step<loco::outer::nesterov>(h, 2, global, d2, state);
    mismatch_log second;
    for (std::size_t i = 0; i < n; ++i) {
        const double b = 0.9 * d1[i] + d2[i];
        const double want = double(start[i]) - 1.9 * 0.7 * d1[i] - 0.7 * (d2[i] + 0.9 * b);
        second.expect_close(global[i], want, 1e-6, [&](auto& s) { s << "element " << i; });
    }
    second.check();
}

// sign_sgd: a zero delta, of either sign, has sign 0 (torch.sign), so the global value only
// decays; the smallest subnormal delta already moves it by a whole lr.
TEST_CASE("outer sign_sgd: a zero delta leaves the decay only, a subnormal one a whole step") {
    const loco::outer::sign_sgd::hyper h{.lr = 0.25f, .weight_decay = 0.5f};
    const float tiny = std::numeric_limits<float>::denorm_min();
    std::vector<float> global = {1.0f, -3.0f, 2.0f, -0.5f};
    const std::vector<float> delta = {0.0f, -0.0f, tiny, -tiny};
    std::vector<float> state;
    outer_step<loco::outer::sign_sgd>(h, 1, global, delta, state);
    const double decay = 1.0 - 0.25 * 0.5;
    const std::vector<double> want = {1.0 * decay, -3.0 * decay, 2.0 * decay - 0.25,
                                      -0.5 * decay + 0.25};
    for (std::size_t i = 0; i < global.size(); ++i) {
        CAPTURE(i);
        CHECK(double(global[i]) == want[i]);  // every value here is exact in float
    }
}

TEST_CASE("outer hyper-parameters are validated") {
    CHECK_THROWS_AS(loco::outer::nesterov::validate({.momentum = 1.0f}), loco::invalid_argument);
    CHECK_THROWS_AS(loco::outer::nesterov::validate({.lr = -0.1f}), loco::invalid_argument);
    CHECK_THROWS_AS(loco::outer::adam::validate({.tau = 0.0f}), loco::invalid_argument);
    CHECK_THROWS_AS(loco::outer::sgd::validate({.lr = -1.0f}), loco::invalid_argument);
    CHECK_NOTHROW(loco::outer::nesterov::validate({}));
    CHECK_NOTHROW(loco::outer::adam::validate({}));
}

// As inner AdamW's: the bias corrections in double, rounded once (float lost 5e-5 at 0.9999).
TEST_CASE("outer adam's bias corrections are exact to float rounding with beta2 near 1") {
    for (const float beta2 : {0.999f, 0.9999f, 0.99999f}) {
        const loco::outer::adam::hyper h{.lr = 0.1f, .beta2 = beta2, .bias_correction = true};
        for (std::uint64_t t : {1u, 2u, 3u, 25u, 1000u}) {
            loco_test::expect_bias_corrections(loco::outer::adam::prepare(h, t), h.lr, h.beta1,
                                               beta2, t);
        }
    }
}

TEST_CASE("delayed Nesterov reproduces algorithms.md T7 (N = 2, beta = 0.9, lr = 1, c = 0)") {
    using dn = loco::outer::delayed_nesterov;
    const dn::hyper h{.lr = 1.0f, .momentum = 0.9f, .period = 2, .c = 0.0f};
    float theta = 0.0f;
    float state[2] = {0.0f, 0.0f};  // m, buf
    const float expected_theta[4] = {-0.5f, -1.9f, -2.4f, -4.61f};
    const float expected_m[4] = {0.0f, 1.0f, 1.0f, 1.9f};
    for (std::uint64_t step = 1; step <= 4; ++step) {
        dn::update(dn::prepare(h, step), theta, 1.0f, state);
        CHECK(theta == doctest::Approx(expected_theta[step - 1]).epsilon(1e-6));
        CHECK(state[0] == doctest::Approx(expected_m[step - 1]).epsilon(1e-6));
        CHECK(state[1] == (step % 2 == 0 ? 0.0f : 1.0f));
    }
}

TEST_CASE("delayed Nesterov: with c > 0 it equals a double-precision recomputation of Algorithm 3") {
    using dn = loco::outer::delayed_nesterov;
    auto rng = loco_test::rng_for("delayed nesterov c");
    const dn::hyper h{.lr = 0.3f, .momentum = 0.5f, .period = 3, .c = 0.25f};
    const auto deltas = loco_test::normal_floats(rng, 12);
    float theta = 0.7f;
    float state[2] = {0.0f, 0.0f};
    double t = 0.7, m = 0.0, buf = 0.0;
    const double n = 3.0, beta = 0.5, lr = 0.3, c = 0.25;
    for (std::uint64_t step = 1; step <= deltas.size(); ++step) {
        const double g = deltas[step - 1];
        buf += g;
        if (step % 3 == 0) {
            m = beta * m + buf / n;
            t -= lr * ((1.0 - c * n + c) * beta * m + g / n);
            buf = 0.0;
        } else {
            t -= lr * (c * beta * m + g / n);
        }
        dn::update(dn::prepare(h, step), theta, deltas[step - 1], state);
        CHECK(theta == doctest::Approx(t).epsilon(1e-5));
    }
    CHECK_THROWS_AS(dn::validate({.period = 0}), loco::invalid_argument);
    CHECK_THROWS_AS(dn::validate({.momentum = 1.0f}), loco::invalid_argument);
    CHECK_THROWS_AS(dn::validate({.c = 2.0f}), loco::invalid_argument);
    CHECK_THROWS_AS(dn::validate({.lr = -1.0f}), loco::invalid_argument);
    CHECK(dn::describe(h) == "outer_delayed_nesterov lr=0.300000012 momentum=0.5 period=3 c=0.25");
}

TEST_CASE("delayed Nesterov refuses a non-finite lr, as every outer policy does") {
    using dn = loco::outer::delayed_nesterov;
    const float inf = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(dn::validate({.lr = inf}),
                         "loco::outer::delayed_nesterov: lr must be finite and >= 0, got inf",
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(dn::validate({.lr = std::numeric_limits<float>::quiet_NaN()}),
                         doctest::Contains("lr must be finite and >= 0"), loco::invalid_argument);
    CHECK_THROWS_WITH_AS(dn::validate({.lr = -1.0f}),
                         doctest::Contains("lr must be finite and >= 0, got -1.0"),
                         loco::invalid_argument);
    CHECK_NOTHROW(dn::validate({.lr = 0.0f}));
    CHECK_NOTHROW(dn::validate({.lr = std::numeric_limits<float>::max()}));
}

TEST_CASE("delayed Nesterov as the outer policy: every H, the delayed schedule, and per fragment "
          "in streaming") {
    // M = 1, outer lr 1, inner SGD lr 1 on a gradient of 1: the local value moves by -1 per call.
    using dn = loco::outer::delayed_nesterov;
    const dn::hyper outer{.lr = 1.0f, .momentum = 0.9f, .period = 2};
    // Algorithm 3 with c = 0 in double precision, over one fragment's pseudo-gradients.
    const auto reference = [](const std::vector<double>& deltas) {
        double theta = 0.0, m = 0.0, buf = 0.0;
        std::vector<double> out;
        for (std::size_t step = 1; step <= deltas.size(); ++step) {
            buf += deltas[step - 1];
            if (step % 2 == 0) {
                m = 0.9 * m + buf / 2.0;
                theta -= 0.9 * m + deltas[step - 1] / 2.0;
                buf = 0.0;
            } else {
                theta -= deltas[step - 1] / 2.0;
            }
            out.push_back(theta);
        }
        return out;
    };
    const float t7[4] = {-0.5f, -1.9f, -2.4f, -4.61f};  // algorithms.md T7
    loco::comm::single comm;
    SUBCASE("every, H = 1: each call's pseudo-gradient is 1, the T7 sequence") {
        std::vector<float> w{0.0f}, g{1.0f};
        loco::parameter_list list;
        list.add("w", w, g);
        loco::diloco<loco::inner::sgd, dn> opt(
            list, comm, {.inner = {.lr = 1.0f}, .outer = outer, .schedule = {.every = 1}});
        for (int call = 0; call < 4; ++call) {
            opt.step();
            CHECK(opt.global()[0] == doctest::Approx(t7[call]).epsilon(1e-6));
            CHECK(w[0] == opt.global()[0]);
        }
    }
    SUBCASE("the delayed schedule, H = 1: the same sequence one call late") {
        std::vector<float> w{0.0f}, g{1.0f};
        loco::parameter_list list;
        list.add("w", w, g);
        loco::diloco<loco::inner::sgd, dn, loco::compress::none, loco::schedule::delayed> opt(
            list, comm, {.inner = {.lr = 1.0f}, .outer = outer, .schedule = {.every = 1}});
        opt.step();
        CHECK(opt.global()[0] == 0.0f);  // the first round applies nothing
        for (int call = 0; call < 4; ++call) {
            opt.step();
            CHECK(opt.global()[0] == doctest::Approx(t7[call]).epsilon(1e-6));
            CHECK(w[0] == opt.global()[0]);
        }
        opt.sync();  // nothing may be in flight when a handle goes
    }
    SUBCASE("streaming, two fragments: each its own state and step count") {
        // H = 2, P = 2, tau = 0, alpha = 0: fragment 0 syncs at calls 1, 3, 5, 7 (pseudo-
        // gradients 1, 2, 2, 2), fragment 1 at calls 2, 4, 6, 8 (2, 2, 2, 2).
        std::vector<float> a{0.0f}, b{0.0f}, ga{1.0f}, gb{1.0f};
        loco::parameter_list list;
        list.add("a", a, ga);
        list.add("b", b, gb);
        using opt_t = loco::diloco<loco::inner::sgd, dn, loco::compress::none,
                                   loco::schedule::streaming>;
        opt_t::config cfg{.inner = {.lr = 1.0f}, .outer = outer,
                          .schedule = {.every = 2, .fragments = 2, .overlap = 0, .alpha = 0.0f}};
        cfg.fragments.names = {{"a"}, {"b"}};
        opt_t opt(list, comm, cfg);
        for (int call = 1; call <= 8; ++call) opt.step();
        CHECK(opt.outer_steps(0) == 4);
        CHECK(opt.outer_steps(1) == 4);
        const auto ra = reference({1, 2, 2, 2});
        const auto rb = reference({2, 2, 2, 2});
        CHECK(opt.global()[0] == doctest::Approx(ra.back()).epsilon(1e-6));
        CHECK(opt.global()[1] == doctest::Approx(rb.back()).epsilon(1e-6));
        CHECK(a[0] == opt.global()[0] - 1.0f);  // call 8's inner step, after its sync at 7
        CHECK(b[0] == opt.global()[1]);
    }
}

namespace {

using loco_test::changed;
using loco_test::member_count;

template <class H, class M>
H with_changed(M H::*member) {
    H h{};
    h.*member = changed(h.*member);
    return h;
}

// The default settings of outer policy P with one member changed, for each member in turn.
template <class P>
std::vector<typename P::hyper> one_setting_changed() {
    using H = typename P::hyper;
    using namespace loco::outer;
    if constexpr (std::is_same_v<P, sgd>) {
        return {with_changed(&H::lr)};
    } else if constexpr (std::is_same_v<P, nesterov>) {
        return {with_changed(&H::lr), with_changed(&H::momentum)};
    } else if constexpr (std::is_same_v<P, delayed_nesterov>) {
        return {with_changed(&H::lr), with_changed(&H::momentum), with_changed(&H::period),
                with_changed(&H::c)};
    } else if constexpr (std::is_same_v<P, adam>) {
        return {with_changed(&H::lr), with_changed(&H::beta1), with_changed(&H::beta2),
                with_changed(&H::tau), with_changed(&H::bias_correction)};
    } else {
        static_assert(std::is_same_v<P, sign_sgd>);
        return {with_changed(&H::lr), with_changed(&H::weight_decay)};
    }
}

}  // namespace

// start() compares the outer describe() between the ranks (and checkpoints record it): a member it
// leaves out lets ranks that apply different outer steps run together without a word.
TEST_CASE_TEMPLATE("every outer setting is in describe() and ranks that differ in any one are "
                   "refused at start()",
                   P, loco::outer::sgd, loco::outer::nesterov, loco::outer::delayed_nesterov,
                   loco::outer::adam, loco::outer::sign_sgd) {
    using H = typename P::hyper;
    const auto variants = one_setting_changed<P>();
    REQUIRE(variants.size() == member_count<H>());  // a new member needs its entry above
    const std::string base = P::describe(H{});
    std::set<std::string> seen{base};
    for (std::size_t j = 0; j < variants.size(); ++j) {
        CAPTURE(j);
        const std::string text = P::describe(variants[j]);
        CAPTURE(text);
        CHECK(seen.insert(text).second);  // differs from the default and from every other change
        REQUIRE_NOTHROW(P::validate(variants[j]));
        using opt_t = loco::diloco<loco::inner::sgd, P>;
        const auto errors = loco_test::start_errors<opt_t>([&](int r) {
            return typename opt_t::config{.outer = r == 1 ? variants[j] : H{}};
        });
        const std::string want =
            "rank 0 has 'outer: " + base + "' where rank 1 has 'outer: " + text + "'";
        for (const auto& e : errors) CHECK_MESSAGE(e.find(want) != std::string::npos, e);
    }
}

// The defaults are the published values (algorithms.md: DiLoCo's Nesterov 0.7 / 0.9, FedAdam's
// betas (0.9, 0.99) and tau 1e-3 without bias correction at lr 0.01, HALoS's delayed Nesterov
// 0.3 / 0.5 / N = 2 / c = 0, DeMo's sign step 4e-4 without decay, averaging with lr 1): the
// first steps of each policy with hyper{} against closed forms written with those numbers.
TEST_CASE("outer defaults: the first steps with hyper{} equal closed forms of the published "
          "values") {
    auto rng = rng_for("outer defaults");
    const std::size_t n = 64;
    const auto start = normal_floats(rng, n);
    const auto d1 = normal_floats(rng, n, 0.05f);
    const auto d2 = normal_floats(rng, n, 0.05f);
    const auto run = [&]<class P>(P, int steps) {
        std::vector<float> global = start;
        std::vector<float> state(static_cast<std::size_t>(P::state_size) * n, 0.0f);
        outer_step<P>({}, 1, global, d1, state);
        if (steps == 2) outer_step<P>({}, 2, global, d2, state);
        return global;
    };
    const auto expect = [&](const std::vector<float>& got, auto want, const char* what) {
        mismatch_log log;
        for (std::size_t i = 0; i < n; ++i) {
            log.expect_close(got[i], want(i), 1e-6, [&](auto& s) { s << what << " " << i; });
        }
        log.check();
    };
    const auto x = [&](std::size_t i) { return double(start[i]); };
    const auto a = [&](std::size_t i) { return double(d1[i]); };
    const auto b = [&](std::size_t i) { return double(d2[i]); };

    expect(run(loco::outer::sgd{}, 1), [&](std::size_t i) { return x(i) - a(i); }, "sgd");
    // Nesterov: b1 = d1, b2 = 0.9 d1 + d2; steps 0.7 (d1 + 0.9 b1) and 0.7 (d2 + 0.9 b2).
    expect(run(loco::outer::nesterov{}, 2), [&](std::size_t i) {
        return x(i) - 0.7 * 1.9 * a(i) - 0.7 * (b(i) + 0.9 * (0.9 * a(i) + b(i)));
    }, "nesterov");
    // FedAdam, two steps without bias correction.
    expect(run(loco::outer::adam{}, 2), [&](std::size_t i) {
        const double m1 = 0.1 * a(i), v1 = 0.01 * a(i) * a(i);
        const double m2 = 0.9 * m1 + 0.1 * b(i), v2 = 0.99 * v1 + 0.01 * b(i) * b(i);
        return x(i) - 0.01 * m1 / (std::sqrt(v1) + 1e-3) - 0.01 * m2 / (std::sqrt(v2) + 1e-3);
    }, "adam");
    // Delayed Nesterov: step 1 plain (lr d1 / 2); step 2 a milestone, m = (d1 + d2) / 2.
    expect(run(loco::outer::delayed_nesterov{}, 2), [&](std::size_t i) {
        const double m = (a(i) + b(i)) / 2.0;
        return x(i) - 0.3 * a(i) / 2.0 - 0.3 * (0.5 * m + b(i) / 2.0);
    }, "delayed nesterov");
    expect(run(loco::outer::sign_sgd{}, 1), [&](std::size_t i) {
        return x(i) - 4e-4 * double((a(i) > 0) - (a(i) < 0));
    }, "sign_sgd");
}

// The closed ends of each documented range are settings a user may pick: outer lr 0 (freeze the
// global values), no momentum, beta1 = 0 (RMSProp-like FedAdam), c = 1 (all momentum between
// milestones).
TEST_CASE("outer validation accepts the closed ends of every range") {
    CHECK_NOTHROW(loco::outer::sgd::validate({.lr = 0.0f}));
    CHECK_NOTHROW(loco::outer::nesterov::validate({.lr = 0.0f}));
    CHECK_NOTHROW(loco::outer::nesterov::validate({.momentum = 0.0f}));
    CHECK_NOTHROW(loco::outer::adam::validate({.lr = 0.0f}));
    CHECK_NOTHROW(loco::outer::adam::validate({.beta1 = 0.0f, .beta2 = 0.0f}));
    CHECK_NOTHROW(loco::outer::delayed_nesterov::validate({.lr = 0.0f}));
    CHECK_NOTHROW(loco::outer::delayed_nesterov::validate({.momentum = 0.0f}));
    CHECK_NOTHROW(loco::outer::delayed_nesterov::validate({.period = 1}));
    CHECK_NOTHROW(loco::outer::delayed_nesterov::validate({.c = 0.0f}));
    CHECK_NOTHROW(loco::outer::delayed_nesterov::validate({.c = 1.0f}));
    CHECK_NOTHROW(loco::outer::sign_sgd::validate({.lr = 0.0f, .weight_decay = 0.0f}));
}

// sign_sgd: the decay 1 - lr * weight_decay is formed in double and rounded once (in float,
// 0.1f * 0.3f rounds first: 0.970000029 in place of 0.969999969), and a NaN delta reaches the
// global value (torch.sign(NaN) is NaN), as the header documents.
TEST_CASE("outer sign_sgd: the decay is rounded once and a NaN delta propagates") {
    const loco::outer::sign_sgd::hyper h{.lr = 0.1f, .weight_decay = 0.3f};
    std::vector<float> global = {1.0f, 1.0f, 2.0f};
    const std::vector<float> delta = {0.0f, std::numeric_limits<float>::quiet_NaN(), -1.0f};
    std::vector<float> state;
    outer_step<loco::outer::sign_sgd>(h, 1, global, delta, state);
    const float decay = static_cast<float>(1.0 - double(0.1f) * double(0.3f));
    CHECK(decay == 0.969999969f);
    CHECK(global[0] == decay);
    CHECK(std::isnan(global[1]));
    CHECK(global[2] == doctest::Approx(2.0 * double(decay) + 0.1).epsilon(1e-7));
}

// A round skipped for a non-finite average is no outer step: the next one is the fragment's
// second (the milestone of delayed Nesterov with N = 2), not its third.
TEST_CASE("delayed Nesterov under diloco: a skipped round does not advance the outer step count") {
    using dn = loco::outer::delayed_nesterov;
    loco::comm::single comm;
    std::vector<float> w{0.0f}, g{1.0f};
    loco::parameter_list list;
    list.add("w", w, g);
    loco::diloco<loco::inner::sgd, dn> opt(
        list, comm,
        {.inner = {.lr = 1.0f}, .outer = {.lr = 1.0f, .momentum = 0.9f, .period = 2},
         .schedule = {.every = 1}});
    opt.step();
    CHECK(opt.global()[0] == doctest::Approx(-0.5).epsilon(1e-6));  // algorithms.md T7
    w[0] = std::numeric_limits<float>::infinity();  // this round's average is -inf: skipped
    opt.step();
    CHECK(opt.skipped_syncs() == 1);
    CHECK(opt.outer_steps() == 1);
    CHECK(w[0] == opt.global()[0]);
    opt.step();  // outer step 2, the milestone: T7's -1.9
    CHECK(opt.outer_steps() == 2);
    CHECK(opt.global()[0] == doctest::Approx(-1.9).epsilon(1e-6));
}
