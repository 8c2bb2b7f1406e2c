// expect: loco: a policy with settings \(a non-empty `hyper`\) needs `static std::string describe\(const hyper&\)`
// An outer optimizer with a learning rate but no describe(): start() could compare only its name,
// so ranks built with different rates would apply different outer steps without a word.
#include <loco/comm/single.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>

#include <cstdint>
#include <string_view>
#include <vector>

struct plain_outer {
    static constexpr std::string_view name = "plain_outer";
    struct hyper {
        float lr = 0.7f;
    };
    static constexpr int state_size = 0;
    struct scalars {
        float lr;
    };
    static scalars prepare(const hyper& h, std::uint64_t) { return {h.lr}; }
    static void update(const scalars& k, float& x, float g, float*) { x -= k.lr * g; }
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, plain_outer> opt(params, comm);
    opt.step();
}
