// expect: loco: gradients must be float \(fp32\) tensors
// fp64 gradients for fp32 values: a tensor, but loco reads fp32 gradients only.
#include <loco/params.hpp>

#include <vector>

int main() {
    std::vector<float> value(4);
    std::vector<double> grad(4);
    loco::parameter_list params;
    params.add("w", value, grad);
}
