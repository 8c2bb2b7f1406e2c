#pragma once
// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101), with
// PyTorch's torch.optim.AdamW semantics: decoupled decay p *= 1 - lr*wd applied first, bias
// correction of both moments, eps added after the bias-corrected square root.

#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <cstdint>
#include <string>
#include <string_view>

namespace loco::inner {

struct adamw {
    static constexpr std::string_view name = "adamw";

    // Defaults are DiLoCo's inner optimizer (arXiv 2311.08105; OpenDiLoCo, torchft, prime), not
    // PyTorch's (lr 1e-3, betas 0.9/0.999, wd 0.01).
    struct hyper {
        float lr = 4e-4f;
        float beta1 = 0.9f;
        float beta2 = 0.95f;
        float eps = 1e-8f;
        float weight_decay = 0.1f;
    };

    // The settings, for when the policy serves as an outer optimizer (start() compares them
    // between the ranks and checkpoints record them; an inner optimizer is each worker's own).
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " lr=" << h.lr << " beta1=" << h.beta1 << " beta2=" << h.beta2
           << " eps=" << h.eps << " weight_decay=" << h.weight_decay;
        return os.str();
    }

    static constexpr int state_size = 2;  // first moment m, second moment v

    struct scalars {
        float decay;         // 1 - lr * weight_decay
        float beta1, beta2;
        float step_size;     // lr / (1 - beta1^step)
        float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^step)
        float eps;
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t step) {
        // The bias corrections in double, then rounded once: 1 - beta2^t cancels in float when
        // beta2 is near 1 (0.9999 was off by 5e-5 relative), and a float t is inexact past 2^24.
        const double t = static_cast<double>(step);
        const double bc1 = 1.0 - math::pow(static_cast<double>(h.beta1), t);
        const double bc2 = 1.0 - math::pow(static_cast<double>(h.beta2), t);
        return {1.0f - h.lr * h.weight_decay, h.beta1, h.beta2,
                static_cast<float>(static_cast<double>(h.lr) / bc1),
                static_cast<float>(1.0 / math::sqrt(bc2)), h.eps};
    }

    LOCO_HD static void update(const scalars& k, float& p, float g, float* s) {
        float m = s[0];
        float v = s[1];
        p *= k.decay;
        m = k.beta1 * m + (1.0f - k.beta1) * g;
        v = k.beta2 * v + (1.0f - k.beta2) * g * g;
        p -= k.step_size * m / (math::sqrt(v) * k.inv_bc2_sqrt + k.eps);
        s[0] = m;
        s[1] = v;
    }

    static void validate(const hyper& h) {
        // Written so that NaN fails every test. eps divides (m / (sqrt(v) + eps) with v = 0 for a
        // zero gradient), so it must be positive.
        if (!(h.lr >= 0.0f && math::isfinite(h.lr)))
            throw invalid_argument("loco::inner::adamw: lr must be finite and >= 0, got " +
                                   std::to_string(h.lr));
        if (!(h.beta1 >= 0.0f && h.beta1 < 1.0f))
            throw invalid_argument("loco::inner::adamw: beta1 must be in [0, 1), got " +
                                   std::to_string(h.beta1));
        if (!(h.beta2 >= 0.0f && h.beta2 < 1.0f))
            throw invalid_argument("loco::inner::adamw: beta2 must be in [0, 1), got " +
                                   std::to_string(h.beta2));
        if (!(h.eps > 0.0f && math::isfinite(h.eps)))
            throw invalid_argument("loco::inner::adamw: eps must be finite and > 0 (it keeps the "
                                   "update's denominator away from zero), got " +
                                   std::to_string(h.eps));
        if (!(h.weight_decay >= 0.0f && math::isfinite(h.weight_decay)))
            throw invalid_argument("loco::inner::adamw: weight_decay must be finite and >= 0, got " +
                                   std::to_string(h.weight_decay));
        // Each finite, the factors prepare() forms from them can still overflow a float (and
        // turn every parameter into inf): the decay, and the step size at its largest (step 1).
        if (!math::isfinite(1.0f - h.lr * h.weight_decay))
            throw invalid_argument("loco::inner::adamw: lr * weight_decay overflows a float (lr " +
                                   std::to_string(h.lr) + ", weight_decay " +
                                   std::to_string(h.weight_decay) + ")");
        if (!math::isfinite(static_cast<float>(static_cast<double>(h.lr) /
                                               (1.0 - static_cast<double>(h.beta1)))))
            throw invalid_argument("loco::inner::adamw: lr / (1 - beta1), the first step's size, "
                                   "overflows a float (lr " + std::to_string(h.lr) + ", beta1 " +
                                   std::to_string(h.beta1) + ")");
    }
};

}  // namespace loco::inner
