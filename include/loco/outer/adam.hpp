#pragma once
// Outer Adam in the FedAdam form (Reddi et al., "Adaptive Federated Optimization",
// arXiv 2003.00295, Algorithm 2): moments of the averaged pseudo-gradient, the adaptivity constant
// tau added after the square root, and no bias correction unless asked for:
//   m = b1*m + (1-b1)*delta;  v = b2*v + (1-b2)*delta^2;  global -= lr * m / (sqrt(v) + tau)

#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace loco::outer {

struct adam {
    static constexpr std::string_view name = "outer_adam";

    // The paper fixes betas (0.9, 0.99) and uses tau = 1e-3; it tunes the server learning rate
    // per task, so lr = 0.01 is a starting point, not a published value.
    struct hyper {
        float lr = 1e-2f;
        float beta1 = 0.9f;
        float beta2 = 0.99f;
        float tau = 1e-3f;
        bool bias_correction = false;
    };

    static constexpr int state_size = 2;  // m, v

    struct scalars {
        float beta1, beta2;
        float step_size;     // lr, or lr / (1 - beta1^t) with bias correction
        float inv_bc2_sqrt;  // 1, or 1 / sqrt(1 - beta2^t)
        float tau;
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t step) {
        float step_size = h.lr;
        float inv_bc2_sqrt = 1.0f;
        if (h.bias_correction) {
            // In double, then rounded once (see inner/adamw.hpp's prepare).
            const double t = static_cast<double>(step);
            step_size = static_cast<float>(static_cast<double>(h.lr) /
                                           (1.0 - math::pow(static_cast<double>(h.beta1), t)));
            inv_bc2_sqrt = static_cast<float>(
                1.0 / math::sqrt(1.0 - math::pow(static_cast<double>(h.beta2), t)));
        }
        return {h.beta1, h.beta2, step_size, inv_bc2_sqrt, h.tau};
    }

    LOCO_HD static void update(const scalars& k, float& global, float delta, float* s) {
        const float m = k.beta1 * s[0] + (1.0f - k.beta1) * delta;
        const float v = k.beta2 * s[1] + (1.0f - k.beta2) * delta * delta;
        s[0] = m;
        s[1] = v;
        global -= k.step_size * m / (math::sqrt(v) * k.inv_bc2_sqrt + k.tau);
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " lr=" << h.lr << " beta1=" << h.beta1 << " beta2=" << h.beta2
           << " tau=" << h.tau << " bias_correction=" << h.bias_correction;
        return os.str();
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f && math::isfinite(h.lr)))
            throw invalid_argument("loco::outer::adam: lr must be finite and >= 0, got " +
                                   std::to_string(h.lr));
        if (!(h.beta1 >= 0.0f && h.beta1 < 1.0f))
            throw invalid_argument("loco::outer::adam: beta1 must be in [0, 1), got " +
                                   std::to_string(h.beta1));
        if (!(h.beta2 >= 0.0f && h.beta2 < 1.0f))
            throw invalid_argument("loco::outer::adam: beta2 must be in [0, 1), got " +
                                   std::to_string(h.beta2));
        // tau divides (m / (sqrt(v) + tau)); an infinite one silently stops every update.
        if (!(h.tau > 0.0f && math::isfinite(h.tau)))
            throw invalid_argument("loco::outer::adam: tau must be finite and > 0, got " +
                                   std::to_string(h.tau));
        // Each finite, the step size prepare() forms at its largest (step 1) can still overflow
        // a float and turn every global parameter into inf or NaN at the first sync, as in
        // inner::adamw. (1 / sqrt(1 - beta2) is at most 4096 for beta2 < 1 in float.)
        if (h.bias_correction &&
            !math::isfinite(static_cast<float>(static_cast<double>(h.lr) /
                                               (1.0 - static_cast<double>(h.beta1)))))
            throw invalid_argument("loco::outer::adam: lr / (1 - beta1), the first step's size, "
                                   "overflows a float (lr " + std::to_string(h.lr) + ", beta1 " +
                                   std::to_string(h.beta1) + ")");
    }
};

}  // namespace loco::outer
