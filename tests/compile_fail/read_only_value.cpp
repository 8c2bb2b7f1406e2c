// expect: loco: parameter values must be mutable float \(fp32\) tensors
// A read-only tensor (a const vector: const float elements) given as a parameter value: the
// optimizer updates values in place. The gradient may be read-only; the value may not.
#include <loco/params.hpp>

#include <vector>

int main() {
    const std::vector<float> value(4);
    std::vector<float> grad(4);
    loco::parameter_list params;
    params.add("w", value, grad);
}
