// expect: loco: the Compressor argument of loco::diloco is not a loco compressor
// The schedule given where the compressor goes (the third and fourth arguments swapped).
#include <loco/comm/single.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>

#include <vector>

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::schedule::every> opt(params, comm);
    opt.step();
}
