// Two workers (threads) train one tiny model with DiLoCo and check the result against numbers
// worked out by hand. Returns non-zero on any difference.
//
// The model is two floats x = (x0, x1). Worker r minimises 0.5 * |x - t_r|^2, gradient x - t_r,
// with t_0 = (2, -4) and t_1 = (6, 0); the targets' mean is m = (4, -2).
// Inner: SGD, lr 0.5, so one step is x <- x - 0.5 (x - t) = 0.5 x + 0.5 t.
// Outer: SGD, lr 0.5, a sync every H = 2 calls; both workers start at x = 0.
//
// From global g, a worker's two inner steps give 0.25 g + 0.75 t_r, so the workers' mean is
// 0.25 g + 0.75 m; the averaged pseudo-gradient is g - (0.25 g + 0.75 m) = 0.75 (g - m), and
// the outer step gives g' = g - 0.5 * 0.75 (g - m), i.e. g' - m = 0.625 (g - m):
//   g_k = m - 0.625^k m,   so after k = 3 syncs (6 steps)
//   x0 = 4 - 4 * 0.244140625 = 3.0234375,   x1 = -2 + 2 * 0.244140625 = -1.51171875.
// Every intermediate value is a short binary fraction, so float arithmetic is exact and the
// comparison below is exact too.
#include <loco/loco.hpp>

#include <array>
#include <cstdio>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr std::array<std::array<float, 2>, 2> targets{{{2.0f, -4.0f}, {6.0f, 0.0f}}};
constexpr std::array<float, 2> expected{3.0234375f, -1.51171875f};
constexpr int syncs = 3;
constexpr int every = 2;

std::mutex report_mutex;
int failures = 0;

void check(bool ok, const std::string& what) {
    if (!ok) {
        const std::lock_guard<std::mutex> lock(report_mutex);
        std::fprintf(stderr, "loco consumer: %s\n", what.c_str());
        ++failures;
    }
}

void train(loco::comm::communicator& comm) {
    const auto r = static_cast<std::size_t>(comm.rank());
    std::vector<float> x(2, 0.0f);
    std::vector<float> grad(2, 0.0f);
    loco::parameter_list params;
    params.add("x", x, grad);

    using algorithm = loco::diloco<loco::inner::sgd, loco::outer::sgd>;
    algorithm::config cfg;
    cfg.inner.lr = 0.5f;
    cfg.outer.lr = 0.5f;
    cfg.schedule.every = every;
    algorithm opt(params, comm, cfg);

    for (int step = 0; step < syncs * every; ++step) {
        for (std::size_t i = 0; i < 2; ++i) {
            grad[i] = x[i] - targets[r][i];
        }
        const loco::step_result result = opt.step();
        check(result.applied, "an inner step was not applied");
        check(result.synced == ((step + 1) % every == 0), "a sync came at the wrong step");
    }

    const std::string who = "rank " + std::to_string(r) + ": ";
    for (std::size_t i = 0; i < 2; ++i) {
        check(x[i] == expected[i], who + "x" + std::to_string(i) + " = " + std::to_string(x[i]) +
                                       ", expected " + std::to_string(expected[i]));
        check(opt.global()[i] == expected[i], who + "global" + std::to_string(i) + " = " +
                                                  std::to_string(opt.global()[i]));
    }
    check(opt.inner_steps() == syncs * every, who + "wrong inner step count");
    check(opt.outer_steps() == syncs, who + "wrong outer step count");
    check(comm.bytes_sent() > 0, who + "the syncs sent nothing");
}

}  // namespace

int main() {
    try {
        loco::comm::run_threads(2, train);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "loco consumer: %s\n", e.what());
        return 1;
    }
    if (failures != 0) {
        return 1;
    }
    std::printf("loco %s consumer: 2 workers, %d syncs, x = (%.10g, %.10g) as derived\n",
                LOCO_VERSION_STRING, syncs, static_cast<double>(expected[0]),
                static_cast<double>(expected[1]));
    return 0;
}
