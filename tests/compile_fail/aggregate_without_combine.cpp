// expect: loco: an aggregation policy needs `static void combine\(const hyper&, const loco::aggregate::contributions&, std::span<float> out\)`
// An aggregation that gathers the deltas but has no rule to combine them (its combine misnamed).
#include <loco/comm/single.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>

#include <span>
#include <string_view>
#include <vector>

struct largest {
    static constexpr std::string_view name = "largest";
    struct hyper {};
    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = true;
    static void reduce(const hyper&, const loco::aggregate::contributions&, std::span<float>) {}
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, loco::schedule::every,
                 largest>
        opt(params, comm);
    opt.step();
}
