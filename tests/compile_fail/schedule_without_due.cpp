// expect: loco: a sync schedule needs `schedule::sync_plan next\(const hyper&\)` \(or, stateless, `static bool due\(const hyper&, std::uint64_t calls\)`\)
// A schedule whose decision function has another name (neither the planning next() nor due()).
#include <loco/comm/single.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>

#include <cstdint>
#include <string_view>
#include <vector>

struct every_other {
    static constexpr std::string_view name = "every_other";
    struct hyper {};
    static bool should_sync(const hyper&, std::uint64_t calls) { return calls % 2 == 0; }
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, every_other> opt(
        params, comm);
    opt.step();
}
