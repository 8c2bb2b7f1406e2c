// expect: loco: a temporary container was given as a parameter value
// The vector dies at the end of the statement; the optimizer would update freed memory.
#include <loco/params.hpp>

#include <vector>

int main() {
    std::vector<float> grad(4);
    loco::parameter_list params;
    params.add("w", std::vector<float>(4), grad);
}
