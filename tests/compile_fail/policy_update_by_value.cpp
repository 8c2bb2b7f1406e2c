// expect: loco: an optimizer policy's `update` must take the element as `float& x`
// A per-element rule that takes the parameter by value: it would compile and change nothing.
#include <loco/optimizer.hpp>

#include <cstdint>
#include <string_view>
#include <vector>

struct by_value {
    static constexpr std::string_view name = "by_value";
    struct hyper {
        float lr = 0.1f;
    };
    static constexpr int state_size = 0;
    struct scalars {
        float lr;
    };
    static scalars prepare(const hyper& h, std::uint64_t) { return {h.lr}; }
    static void update(const scalars& k, float x, float g, float*) { x -= k.lr * g; }
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::optimizer<by_value> opt(params);
    opt.step();
}
