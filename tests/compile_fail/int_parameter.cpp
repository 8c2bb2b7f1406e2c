// expect: loco: parameter values must be mutable float \(fp32\) tensors
// Integer weights: a tensor, but optimizers update fp32 values only.
#include <loco/params.hpp>

#include <vector>

int main() {
    std::vector<int> value(4);
    std::vector<float> grad(4);
    loco::parameter_list params;
    params.add("w", value, grad);
}
