// The README's quickstart: two workers fit the line y = 3x - 1 by least squares with DiLoCo. Each
// worker sees its own points and takes AdamW steps alone; every 10 steps the two average how far
// they moved and take one Nesterov step together. Exits non-zero if the loss did not go down.

#include <loco/loco.hpp>

#include <algorithm>
#include <cstdio>
#include <vector>

int main() {
    std::vector<float> losses;  // worker 0's loss at every step
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> w(2), grad(2);  // the model, y = w[0] * x + w[1], and its gradient
        loco::parameter_list params;
        params.add("w", w, grad);
        loco::diloco<loco::inner::adamw, loco::outer::nesterov> opt(
            params, comm, {.inner = {.lr = 0.05f, .weight_decay = 0.0f},
                           .outer = {.lr = 0.7f, .momentum = 0.9f},
                           .schedule = {.every = 10}});
        for (int step = 0; step < 500; ++step) {
            float loss = 0.0f;  // mean squared error on this worker's 8 points of y = 3x - 1
            std::fill(grad.begin(), grad.end(), 0.0f);
            for (int i = 0; i < 8; ++i) {
                const float x = 0.25f * static_cast<float>(2 * i + comm.rank());
                const float r = w[0] * x + w[1] - (3.0f * x - 1.0f);
                loss += r * r / 8;
                grad[0] += r * x / 4;
                grad[1] += r / 4;
            }
            opt.step();
            if (comm.rank() == 0) losses.push_back(loss);
        }
    });
    std::printf("loss %.4f -> %.6f\n", losses.front(), losses.back());
    return losses.back() < losses.front() ? 0 : 1;
}
