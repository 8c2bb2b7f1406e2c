// expect: loco: a per-matrix policy needs
// A per-matrix rule (update_matrix) without `using workspace`: one sentence, the per-matrix one
// (the element-wise policy's checks used to add a second, wrong one about prepare()).
#include <loco/optimizer.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

struct no_workspace {
    static constexpr std::string_view name = "no_workspace";
    struct hyper {};
    static constexpr int state_size = 0;
    static void update_matrix(const hyper&, std::uint64_t, float*, const float*, float*,
                              std::size_t, std::size_t, int&) {}
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add_views("w", loco::host_matrix(w.data(), 2, 2),
                     loco::host_matrix(static_cast<const float*>(g.data()), 2, 2));
    loco::optimizer<no_workspace> opt(params);
    opt.step();
}
