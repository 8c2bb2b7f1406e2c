// expect: loco: this aggregation averages payloads in the compressor's own coordinates
// DeMo's coefficient scatter-mean asked of SparseLoCo, whose payloads have no such rule (its
// element-wise scatter-mean is aggregate::median_norm_clip with clip = false).
#include <loco/aggregate/scatter_mean.hpp>
#include <loco/comm/single.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>

#include <vector>

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::sparseloco,
                 loco::schedule::every, loco::aggregate::scatter_mean>
        opt(params, comm);
    opt.step();
}
