// The README's example, compiled and run by the test suite (example.quickstart); the snippet check
// (docs.readme_example) keeps README.md identical to the marked region.
// [snippet:readme]
#include <loco/loco.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {  // two workers fit y = 3x - 1, each on its own points, syncing every 10 steps
    bool fitted = false;
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> w{0, 0}, grad(2);  // the model y = w[0] x + w[1], and its gradient
        loco::parameter_list params;
        params.add("w", w, grad);
        loco::diloco<loco::inner::adamw, loco::outer::nesterov> opt{
            params, comm, {.inner = {.lr = 0.1f, .weight_decay = 0}, .schedule = {.every = 10}}};
        opt.start();  // every worker starts from rank 0's parameters
        for (int step = 0; step < 500; ++step) {
            grad[0] = grad[1] = 0;  // the gradient of the mean squared error over 8 points
            for (int i = 0; i < 8; ++i) {
                const float x = 0.25f * float(2 * i + comm.rank()), r = w[0] * x + w[1] - (3 * x - 1);
                grad[0] += r * x / 4;
                grad[1] += r / 4;
            }
            opt.step();  // an AdamW step; every 10th call also averages and applies Nesterov
        }
        if (comm.rank() == 0) {
            std::printf("fitted y = %.4f x %+.4f\n", w[0], w[1]);
            fitted = std::abs(w[0] - 3) < 1e-2f && std::abs(w[1] + 1) < 1e-2f;
        }
    });
    return fitted ? 0 : 1;
}
// [snippet:readme end]
