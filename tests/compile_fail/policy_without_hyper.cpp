// expect: loco: an optimizer policy needs a nested `struct hyper` holding its hyper-parameters
// The hyper-parameters are plain static members instead of a `hyper` struct.
#include <loco/optimizer.hpp>

#include <cstdint>
#include <string_view>
#include <vector>

struct no_hyper {
    static constexpr std::string_view name = "no_hyper";
    static constexpr float lr = 0.1f;
    static constexpr int state_size = 0;
    struct scalars {
        float lr;
    };
    static scalars prepare(std::uint64_t) { return {lr}; }
    static void update(const scalars& k, float& x, float g, float*) { x -= k.lr * g; }
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::optimizer<no_hyper> opt(params);
    opt.step();
}
