// expect-compiles
// The control for every other snippet here: each of their mistakes, done right, through the same
// harness. If this is rejected, the harness (flags, include paths) is broken, and the rejections
// of the other snippets prove nothing.
#include <loco/comm/single.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/lion.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/optimizer.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/params.hpp>
#include <loco/compress/none.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

struct weights {
    float w[4];
};

// not_a_tensor.cpp, adapted.
template <>
struct loco::tensor_traits<weights> {
    using element_type = float;
    static float* data(weights& x) { return x.w; }
    static std::size_t size(const weights&) { return 4; }
};

// policy_without_update.cpp and policy_without_hyper.cpp, complete.
struct complete_policy {
    static constexpr std::string_view name = "complete_policy";
    struct hyper {
        float lr = 0.1f;
    };
    static constexpr int state_size = 0;
    struct scalars {
        float lr;
    };
    static scalars prepare(const hyper& h, std::uint64_t) { return {h.lr}; }
    static void update(const scalars& k, float& x, float g, float*) { x -= k.lr * g; }
    // outer_without_describe.cpp: the settings described.
    static std::string describe(const hyper& h) { return "complete_policy lr=" + std::to_string(h.lr); }
};

// aggregate_without_combine.cpp, with combine.
struct largest {
    static constexpr std::string_view name = "largest";
    struct hyper {};
    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = true;
    static void combine(const hyper&, const loco::aggregate::contributions& c, std::span<float> out) {
        for (std::size_t i = 0; i < out.size(); ++i) out[i] = c.delta(0)[i];
    }
};

// compressor_negative_state.cpp: none's state size, 0.
struct no_state {
    static constexpr std::string_view name = "no_state";
    static constexpr std::uint8_t wire_id = loco::compress::none::wire_id;
    static constexpr int state_size = 0;
    using hyper = loco::compress::none::hyper;
    static std::size_t payload_bytes(const hyper& h, std::span<const loco::compress::segment> s) {
        return loco::compress::none::payload_bytes(h, s);
    }
    static void encode(const hyper& h, std::span<const float> x,
                       std::span<const loco::compress::segment> s, std::span<float> state,
                       const loco::compress::encode_context& ctx, std::span<std::byte> out) {
        loco::compress::none::encode(h, x, s, state, ctx, out);
    }
    static void decode(const hyper& h, std::span<const std::byte> in,
                       std::span<const loco::compress::segment> s, std::span<float> out) {
        loco::compress::none::decode(h, in, s, out);
    }
};

// schedule_without_due.cpp, with `due`.
struct every_other {
    static constexpr std::string_view name = "every_other";
    struct hyper {};
    static bool due(const hyper&, std::uint64_t calls) { return calls % 2 == 0; }
};

int main() {
    weights value{};
    std::vector<float> grad(4), w(4), g(4);  // int_parameter.cpp with float elements
    std::vector<float> temporary_made_lasting(4);
    loco::parameter_list params;
    params.add("w", value, grad);
    params.add("v", w, g);
    // temporary_value.cpp: a temporary is fine when it is a view of storage that outlives it.
    params.add("t", std::span<float>(temporary_made_lasting), g);

    loco::optimizer<complete_policy> opt(params);
    opt.step();

    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, every_other> d(params,
                                                                                          comm);
    d.step();
    loco::diloco<complete_policy, loco::outer::sgd> plain(params, comm);  // not_a_compressor.cpp
    plain.step();
    loco::diloco<loco::inner::sgd, complete_policy, no_state, loco::schedule::every, largest> own(
        params, comm);
    own.step();
    // outer_without_describe.cpp: loco's inner optimizers describe their settings, so they serve
    // as outer optimizers too.
    loco::diloco<loco::inner::sgd, loco::inner::lion> lookahead(params, comm);
    lookahead.step();
}
