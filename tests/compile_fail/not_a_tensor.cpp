// expect: loco: this type is not a loco tensor
// A user type with neither tensor_traits nor loco_view, given as a parameter value.
#include <loco/params.hpp>

#include <vector>

struct weights {
    float w[4];
};

int main() {
    weights value{};
    std::vector<float> grad(4);
    loco::parameter_list params;
    params.add("w", value, grad);
}
