// expect: loco: an optimizer policy needs `static void update\(const scalars&, float& x, float g, float\* state\)`
// Everything an element-wise policy needs except the per-element rule itself.
#include <loco/optimizer.hpp>

#include <cstdint>
#include <string_view>
#include <vector>

struct no_update {
    static constexpr std::string_view name = "no_update";
    struct hyper {
        float lr = 0.1f;
    };
    static constexpr int state_size = 0;
    struct scalars {
        float lr;
    };
    static scalars prepare(const hyper& h, std::uint64_t) { return {h.lr}; }
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::optimizer<no_update> opt(params);
    opt.step();
}
