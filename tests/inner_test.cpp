// Conformance suite for inner optimizers: every case runs loco::optimizer<Policy> on random data
// and compares it with the double-precision reference in support/reference.hpp.
//   * one step at a time from the same state (tight tolerance, every element, every step);
//   * a whole trajectory without re-synchronising (errors may accumulate, looser tolerance);
//   * a non-finite gradient is skipped bit-exactly, and raises under nonfinite_policy::raise.
#include <doctest/doctest.h>

#include "support/compare.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"

#include <loco/loco.hpp>

#include <boost/mp11.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace {

using namespace loco_test;

// A test case: a policy, its hyper-parameters, and the tolerances for each check.
template <class Policy>
struct case_base {
    using policy = Policy;
    static constexpr double step_rel_tol = 2e-6;   // one float step vs double
    static constexpr double trajectory_rel_tol = 1e-4;
    static constexpr bool check_trajectory = true;
};

struct adamw_defaults : case_base<loco::inner::adamw> {
    static constexpr const char* label = "adamw, DiLoCo defaults";
    static policy::hyper hyper() { return {}; }
};
struct adamw_large_lr : case_base<loco::inner::adamw> {
    static constexpr const char* label = "adamw, lr 1e-2, betas 0.8/0.99, wd 0.01, eps 1e-6";
    static policy::hyper hyper() {
        return {.lr = 1e-2f, .beta1 = 0.8f, .beta2 = 0.99f, .eps = 1e-6f, .weight_decay = 0.01f};
    }
};
struct lion_defaults : case_base<loco::inner::lion> {
    static constexpr const char* label = "lion, paper defaults";
    static constexpr bool check_trajectory = false;  // sign(): see reference<lion>::ambiguous
    static policy::hyper hyper() { return {}; }
};
struct lion_decay : case_base<loco::inner::lion> {
    static constexpr const char* label = "lion, lr 3e-4, wd 0.5";
    static constexpr bool check_trajectory = false;
    static policy::hyper hyper() { return {.lr = 3e-4f, .weight_decay = 0.5f}; }
};
// lr * wd large: decoupled decay multiplies p alone, not p after the sign step (the two orders
// differ by lr^2 * wd, invisible at small lr).
struct lion_large_decay : case_base<loco::inner::lion> {
    static constexpr const char* label = "lion, lr 0.1, wd 1";
    static constexpr bool check_trajectory = false;
    static policy::hyper hyper() { return {.lr = 0.1f, .weight_decay = 1.0f}; }
};
struct sgd_plain : case_base<loco::inner::sgd> {
    static constexpr const char* label = "sgd, no momentum";
    static policy::hyper hyper() { return {.lr = 0.05f}; }
};
struct sgd_momentum_dampening : case_base<loco::inner::sgd> {
    static constexpr const char* label = "sgd, momentum 0.9, dampening 0.3, wd 1e-2";
    static policy::hyper hyper() {
        return {.lr = 0.01f, .momentum = 0.9f, .dampening = 0.3f, .weight_decay = 1e-2f};
    }
};
struct sgd_nesterov : case_base<loco::inner::sgd> {
    static constexpr const char* label = "sgd, Nesterov momentum 0.9, wd 1e-3";
    static policy::hyper hyper() {
        return {.lr = 0.01f, .momentum = 0.9f, .weight_decay = 1e-3f, .nesterov = true};
    }
};

using inner_cases = boost::mp11::mp_list<adamw_defaults, adamw_large_lr, lion_defaults,
                                         lion_decay, lion_large_decay, sgd_plain,
                                         sgd_momentum_dampening, sgd_nesterov>;

// Every built-in inner optimizer satisfies the concept and has at least one case above.
using builtin_inner = boost::mp11::mp_list<loco::inner::adamw, loco::inner::lion, loco::inner::sgd>;
template <class P>
using is_inner = std::bool_constant<loco::inner_optimizer<P>>;
static_assert(boost::mp11::mp_all_of<builtin_inner, is_inner>::value);
template <class C>
using policy_of = typename C::policy;
template <class P>
using has_case = boost::mp11::mp_contains<boost::mp11::mp_transform<policy_of, inner_cases>, P>;
static_assert(boost::mp11::mp_all_of<builtin_inner, has_case>::value,
              "every built-in inner optimizer needs a conformance case");

// The concept asks that update write its element (float& x): a rule taking x by value or by
// const reference is refused (it would change nothing); a template taking it by forwarding
// reference writes it, and is taken.
namespace concept_probe {
struct scalars {
    float lr;
};
struct base {
    static constexpr std::string_view name = "probe";
    struct hyper {
        float lr = 0.1f;
    };
    static constexpr int state_size = 0;
    static scalars prepare(const hyper& h, std::uint64_t) { return {h.lr}; }
};
struct by_value : base {
    static void update(const scalars& k, float x, float g, float*) { x -= k.lr * g; }
};
struct by_const_ref : base {
    static void update(const scalars&, const float&, float, float*) {}
};
struct by_ref : base {
    static void update(const scalars& k, float& x, float g, float*) noexcept { x -= k.lr * g; }
};
struct by_auto_value : base {
    static void update(const scalars& k, auto x, float g, float*) { x -= k.lr * g; }
};
struct forwarding : base {
    template <class X>
    static void update(const scalars& k, X&& x, float g, float*) {
        x -= k.lr * g;
    }
};
static_assert(!loco::inner_optimizer<by_value>);
static_assert(!loco::inner_optimizer<by_const_ref>);
static_assert(loco::inner_optimizer<by_ref>);
static_assert(!loco::inner_optimizer<by_auto_value>);  // a template too: called with a probe
static_assert(loco::inner_optimizer<forwarding>);
}  // namespace concept_probe

template <class Policy>
bool ambiguous(const typename Policy::hyper& h, double g, const double* s) {
    if constexpr (requires { reference<Policy>::ambiguous(h, g, s); }) {
        return reference<Policy>::ambiguous(h, g, s);
    } else {
        return false;
    }
}

// Three tensors of awkward sizes, so per-tensor offsets into the flat state are exercised.
struct model {
    std::vector<std::vector<float>> values;
    std::vector<std::vector<float>> grads;
    loco::parameter_list list;

    explicit model(std::mt19937_64& rng) {
        for (const std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{1000}}) {
            values.push_back(normal_floats(rng, n));
            grads.emplace_back(n, 0.0f);
        }
        for (std::size_t t = 0; t < values.size(); ++t) {
            list.add("t" + std::to_string(t), values[t], grads[t]);
        }
    }
    void draw_gradients(std::mt19937_64& rng) {
        for (auto& g : grads) {
            const auto fresh = normal_floats(rng, g.size(), 0.5f);
            std::copy(fresh.begin(), fresh.end(), g.begin());  // in place: the views stay valid
        }
    }
};

}  // namespace

TEST_CASE_TEMPLATE_DEFINE("inner optimizer matches its double-precision reference", Case,
                          inner_conformance) {
    using P = typename Case::policy;
    constexpr int S = P::state_size;
    INFO("case: " << std::string(Case::label));
    auto rng = rng_for(Case::label);
    model m(rng);
    loco::optimizer<P> opt(m.list, {.inner = Case::hyper()});
    const std::size_t total = m.list.total_elements();

    SUBCASE("one step at a time, from the same state") {
        std::size_t ambiguous_elements = 0;
        mismatch_log log;
        for (std::uint64_t t = 1; t <= 50; ++t) {
            m.draw_gradients(rng);
            // The reference starts every step from loco's float state, so only this step's
            // arithmetic is compared.
            std::vector<double> p_ref, s_ref(static_cast<std::size_t>(S) * total);
            std::vector<bool> skip;
            for (const auto& p : m.list) {
                for (std::size_t i = 0; i < p.value.size; ++i) {
                    double s[S > 0 ? S : 1] = {};
                    for (int j = 0; j < S; ++j) {
                        s[j] = opt.state(j)[p.offset + i];
                    }
                    double x = p.value.data[i];
                    skip.push_back(ambiguous<P>(Case::hyper(), p.grad.data[i], s));
                    reference<P>::step(Case::hyper(), x, p.grad.data[i], s, t);
                    p_ref.push_back(x);
                    for (int j = 0; j < S; ++j) {
                        s_ref[static_cast<std::size_t>(j) * total + p.offset + i] = s[j];
                    }
                }
            }
            REQUIRE(opt.step().applied);
            REQUIRE(opt.steps() == t);
            for (const auto& p : m.list) {
                for (std::size_t i = 0; i < p.value.size; ++i) {
                    const std::size_t flat = p.offset + i;
                    if (skip[flat]) {
                        ++ambiguous_elements;
                        continue;
                    }
                    log.expect_close(p.value.data[i], p_ref[flat], Case::step_rel_tol,
                                     [&](auto& s) { s << "step " << t << ", " << p.name << "[" << i << "]"; });
                    for (int j = 0; j < S; ++j) {
                        const double want = s_ref[static_cast<std::size_t>(j) * total + flat];
                        log.expect_close(opt.state(j)[flat], want, Case::step_rel_tol, [&](auto& s) {
                            s << "step " << t << ", state " << j << " of " << p.name << "[" << i << "]";
                        });
                    }
                }
            }
        }
        log.check();
        // Sign ties are rare; many of them would mean the rule is wrong, not rounding.
        CHECK(ambiguous_elements <= total / 100);
    }

    SUBCASE("a 200-step trajectory") {
        if (!Case::check_trajectory) {
            return;
        }
        std::vector<double> x_ref, s_ref(static_cast<std::size_t>(S) * total, 0.0);
        for (const auto& p : m.list) {
            x_ref.insert(x_ref.end(), p.value.data, p.value.data + p.value.size);
        }
        for (std::uint64_t t = 1; t <= 200; ++t) {
            m.draw_gradients(rng);
            std::vector<float> flat_grad;
            for (const auto& g : m.grads) {
                flat_grad.insert(flat_grad.end(), g.begin(), g.end());
            }
            reference_step_all<P>(Case::hyper(), x_ref, flat_grad, s_ref, t);
            opt.step();
        }
        double worst = 0.0;
        for (const auto& p : m.list) {
            for (std::size_t i = 0; i < p.value.size; ++i) {
                const double want = x_ref[p.offset + i];
                worst = std::max(worst, std::abs(p.value.data[i] - want) / std::max(1.0, std::abs(want)));
            }
        }
        INFO("worst relative error after 200 steps: " << worst);
        CHECK(worst <= Case::trajectory_rel_tol);
    }

    SUBCASE("a non-finite gradient is skipped and leaves everything untouched") {
        m.draw_gradients(rng);
        opt.step();
        const auto values_before = m.values;
        std::vector<std::vector<float>> state_before;
        for (int j = 0; j < S; ++j) {
            state_before.emplace_back(opt.state(j).begin(), opt.state(j).end());
        }
        for (const float bad : {std::numeric_limits<float>::quiet_NaN(),
                                std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity()}) {
            m.draw_gradients(rng);
            m.grads[2][500] = bad;
            const auto result = opt.step();
            CHECK_FALSE(result.applied);
            CHECK(m.values == values_before);
            for (int j = 0; j < S; ++j) {
                CHECK(std::vector<float>(opt.state(j).begin(), opt.state(j).end()) ==
                      state_before[static_cast<std::size_t>(j)]);
            }
        }
        CHECK(opt.steps() == 1);
        CHECK(opt.skipped_steps() == 3);
    }

    SUBCASE("nonfinite_policy::raise throws and leaves everything untouched") {
        loco::optimizer<P> strict(m.list, {.inner = Case::hyper(),
                                           .on_nonfinite = loco::nonfinite_policy::raise});
        m.draw_gradients(rng);
        m.grads[1][3] = std::numeric_limits<float>::quiet_NaN();
        const auto values_before = m.values;
        CHECK_THROWS_WITH_AS(strict.step(), doctest::Contains("the gradient of 't1' holds nan at element 3"),
                             loco::nonfinite_error);
        CHECK(m.values == values_before);
        CHECK(strict.steps() == 0);
    }
}

TEST_CASE_TEMPLATE_APPLY(inner_conformance, boost::mp11::mp_rename<inner_cases, std::tuple>);

TEST_CASE("inner hyper-parameters are validated") {
    std::vector<float> w(4), g(4);
    loco::parameter_list list;
    list.add("w", w, g);
    CHECK_THROWS_AS(loco::optimizer<loco::inner::adamw>(list, {.inner = {.lr = -1.0f}}),
                    loco::invalid_argument);
    CHECK_THROWS_AS(loco::optimizer<loco::inner::adamw>(list, {.inner = {.beta2 = 1.0f}}),
                    loco::invalid_argument);
    CHECK_THROWS_WITH_AS(
        loco::optimizer<loco::inner::sgd>(list, {.inner = {.nesterov = true}}),
        doctest::Contains("Nesterov momentum requires momentum > 0"), loco::invalid_argument);
    CHECK_THROWS_AS(loco::optimizer<loco::inner::lion>(list, {.inner = {.beta2 = 1.5f}}),
                    loco::invalid_argument);

    // A value changed after construction is checked at the next step, before anything moves.
    loco::optimizer<loco::inner::adamw> opt(list);
    opt.hyper().eps = -1.0f;
    CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
    CHECK(opt.steps() == 0);
}

// Nesterov with dampening is refused, as torch.optim.SGD refuses it ("Nesterov momentum
// requires a momentum and zero dampening"); dampening is a fraction of the gradient, at most 1;
// Lion's beta2 = 1 never moves the momentum from 0. The limits themselves pass.
TEST_CASE("sgd and lion refuse Nesterov with dampening, dampening above 1 and beta2 = 1") {
    std::vector<float> w(4, 1.0f), g(4, 0.5f);
    loco::parameter_list list;
    list.add("w", w, g);
    using sgd = loco::optimizer<loco::inner::sgd>;
    using lion = loco::optimizer<loco::inner::lion>;
    CHECK_THROWS_WITH_AS(
        sgd(list, {.inner = {.lr = 0.1f, .momentum = 0.9f, .dampening = 0.5f, .nesterov = true}}),
        "loco::inner::sgd: Nesterov momentum requires momentum > 0 and dampening = 0",
        loco::invalid_argument);
    CHECK_NOTHROW(sgd(list, {.inner = {.lr = 0.1f, .momentum = 0.9f, .nesterov = true}}));
    const float above_one = std::nextafter(1.0f, 2.0f);
    CHECK_THROWS_WITH_AS(
        sgd(list, {.inner = {.lr = 0.1f, .momentum = 0.9f, .dampening = above_one}}),
        doctest::Contains("dampening must be in [0, 1]"), loco::invalid_argument);
    CHECK_THROWS_WITH_AS(sgd(list, {.inner = {.lr = 0.1f, .momentum = 0.9f, .dampening = 3.0f}}),
                         doctest::Contains("dampening must be in [0, 1]"), loco::invalid_argument);
    CHECK_NOTHROW(sgd(list, {.inner = {.lr = 0.1f, .momentum = 0.9f, .dampening = 1.0f}}));
    CHECK_THROWS_WITH_AS(lion(list, {.inner = {.lr = 0.1f, .beta2 = 1.0f}}),
                         doctest::Contains("beta2 must be in [0, 1)"), loco::invalid_argument);
    CHECK_NOTHROW(lion(list, {.inner = {.lr = 0.1f, .beta2 = std::nextafter(1.0f, 0.0f)}}));
    // Changed after construction, each is refused at the next step, before anything moves.
    sgd opt(list, {.inner = {.lr = 0.1f, .momentum = 0.9f, .nesterov = true}});
    opt.hyper().dampening = 0.5f;
    CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
    lion lopt(list, {.inner = {.lr = 0.1f}});
    lopt.hyper().beta2 = 1.0f;
    CHECK_THROWS_AS(lopt.step(), loco::invalid_argument);
    CHECK(w == std::vector<float>(4, 1.0f));
}

// The paper's decoupled decay (Chen et al. 2023, Algorithm 2): p <- p - lr * (sign(c) + wd * p),
// c = beta1 m + (1 - beta1) g; the decay scales the old p, not the p after the sign step.
TEST_CASE("lion with large lr * wd follows the paper's update p - lr * (sign(c) + wd * p)") {
    std::vector<float> p = {1.0f, -2.0f}, g = {1.0f, 0.5f};
    loco::parameter_list list;
    list.add("p", p, g);
    const double lr = 0.1, wd = 1.0;
    loco::optimizer<loco::inner::lion> opt(
        list, {.inner = {.lr = float(lr), .weight_decay = float(wd)}});
    const std::vector<double> p0 = {1.0, -2.0};
    REQUIRE(opt.step().applied);
    for (std::size_t i = 0; i < p.size(); ++i) {
        // m = 0 before the first step: c = (1 - beta1) g.
        const double c = (1.0 - 0.9) * double(g[i]);
        const double sign = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
        const double want = p0[i] - lr * (sign + wd * p0[i]);
        CAPTURE(i);
        CHECK(std::abs(p[i] - want) <= 1e-6 * std::max(1.0, std::abs(want)));
    }
    CHECK(p[0] == doctest::Approx(0.8).epsilon(1e-6));
    CHECK(p[1] == doctest::Approx(-1.9).epsilon(1e-6));
}

// math::sign is torch.sign: 0 for both zeros, +-1 for everything else of that sign, subnormals
// and infinities included. In lion a zero direction (zero gradient and zero momentum) leaves only
// the decoupled weight decay: p * (1 - lr * wd), step after step.
TEST_CASE("lion: a zero gradient with zero momentum moves a parameter by its weight decay only") {
    const float tiny = std::numeric_limits<float>::denorm_min();
    const float inf = std::numeric_limits<float>::infinity();
    CHECK(loco::math::sign(0.0f) == 0.0f);
    CHECK(loco::math::sign(-0.0f) == 0.0f);
    CHECK(loco::math::sign(tiny) == 1.0f);
    CHECK(loco::math::sign(-tiny) == -1.0f);
    CHECK(loco::math::sign(inf) == 1.0f);
    CHECK(loco::math::sign(-inf) == -1.0f);

    std::vector<float> p = {1.5f, -2.0f, 0.25f, 0.0f}, g = {0.0f, -0.0f, 0.0f, -0.0f};
    loco::parameter_list list;
    list.add("p", p, g);
    const double lr = 0.1, wd = 0.5;
    loco::optimizer<loco::inner::lion> opt(
        list, {.inner = {.lr = float(lr), .weight_decay = float(wd)}});
    const std::vector<double> p0 = {1.5, -2.0, 0.25, 0.0};
    for (int t = 1; t <= 3; ++t) {
        REQUIRE(opt.step().applied);
        for (std::size_t i = 0; i < p.size(); ++i) {
            const double want = p0[i] * std::pow(1.0 - lr * wd, t);
            CAPTURE(t);
            CAPTURE(i);
            CHECK(std::abs(p[i] - want) <= 1e-6 * std::abs(p0[i]));
            CHECK(opt.state(0)[i] == 0.0f);
        }
    }
}

// Under nonfinite_policy::ignore a NaN gradient reaches lion's update unchecked. PyTorch's
// reference (torch.sign of the interpolation, then p.add_) turns the parameter NaN, so the fault
// shows; a sign of 0 for NaN instead left the parameter to its weight decay, step after step,
// with the momentum NaN for good and nothing reported.
TEST_CASE("lion under nonfinite_policy::ignore carries a NaN gradient into the parameter as torch.sign does") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    CHECK(std::isnan(loco::math::sign(nan)));
    CHECK(std::isnan(loco::math::sign(-nan)));

    std::vector<float> p = {1.5f, -2.0f, 0.25f}, g = {0.5f, nan, -0.25f};
    loco::parameter_list list;
    list.add("p", p, g);
    const double lr = 0.1, wd = 0.5, beta1 = 0.9, beta2 = 0.99;
    loco::optimizer<loco::inner::lion> opt(
        list, {.inner = {.lr = float(lr), .beta1 = float(beta1), .beta2 = float(beta2),
                         .weight_decay = float(wd)},
               .on_nonfinite = loco::nonfinite_policy::ignore});
    REQUIRE(opt.step().applied);
    // The finite elements take the step in double (zero momentum: the direction is sign(g)).
    CHECK(std::abs(p[0] - (1.5 * (1 - lr * wd) - lr)) <= 1e-6);
    CHECK(std::abs(p[2] - (0.25 * (1 - lr * wd) + lr)) <= 1e-6);
    CHECK(std::isnan(p[1]));
    CHECK(std::isnan(opt.state(0)[1]));
    // The next, finite gradient cannot bring it back: the momentum is NaN.
    g = {0.5f, 0.5f, -0.25f};
    REQUIRE(opt.step().applied);
    CHECK(std::isnan(p[1]));
    CHECK(std::isfinite(p[0]));
    CHECK(std::isfinite(p[2]));
}

// The error names the first non-finite element of the gradient, not another one.
TEST_CASE("nonfinite_policy::raise names the first of several non-finite gradient elements") {
    std::vector<float> p(9, 1.0f), g(9, 0.5f);
    g[4] = std::numeric_limits<float>::infinity();
    g[6] = std::numeric_limits<float>::quiet_NaN();
    g[8] = -std::numeric_limits<float>::infinity();
    loco::parameter_list list;
    list.add("w", p, g);
    loco::optimizer<loco::inner::sgd> opt(list, {.on_nonfinite = loco::nonfinite_policy::raise});
    CHECK_THROWS_WITH_AS(opt.step(), doctest::Contains("the gradient of 'w' holds inf at element 4"),
                         loco::nonfinite_error);
    CHECK(p == std::vector<float>(9, 1.0f));
}

// The bias corrections 1 - beta^t cancel in float when beta is near 1: computed in float, beta2 =
// 0.9999 put the step off by 5e-5 relative (PyTorch computes them in double). Against double, the
// two scalars are now within a float rounding or two, at every step and for betas up to 0.99999.
TEST_CASE("adamw's bias corrections are exact to float rounding with beta2 near 1") {
    for (const float beta2 : {0.999f, 0.9999f, 0.99999f}) {
        const loco::inner::adamw::hyper h{.lr = 1e-3f, .beta1 = 0.9f, .beta2 = beta2};
        for (std::uint64_t t : {1u, 2u, 3u, 25u, 1000u, 100000u}) {
            expect_bias_corrections(loco::inner::adamw::prepare(h, t), h.lr, h.beta1, beta2, t);
        }
    }
}
