// expect: loco: a temporary container was given as a gradient
// The vector dies at the end of the statement; every step would read freed memory.
#include <loco/params.hpp>

#include <vector>

int main() {
    std::vector<float> value(4);
    loco::parameter_list params;
    params.add("w", value, std::vector<float>(4));
}
