#pragma once
// Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675): the update
// is the sign of an interpolation between the momentum and the gradient; the momentum itself is
// tracked with a second, slower coefficient. Decoupled weight decay as in AdamW.

#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <cstdint>
#include <string>
#include <string_view>

namespace loco::inner {

struct lion {
    static constexpr std::string_view name = "lion";

    // The paper's defaults (lr 1e-4, betas 0.9/0.99, no weight decay).
    struct hyper {
        float lr = 1e-4f;
        float beta1 = 0.9f;
        float beta2 = 0.99f;
        float weight_decay = 0.0f;
    };

    // The settings, for when the policy serves as an outer optimizer (start() compares them
    // between the ranks and checkpoints record them; an inner optimizer is each worker's own).
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " lr=" << h.lr << " beta1=" << h.beta1 << " beta2=" << h.beta2
           << " weight_decay=" << h.weight_decay;
        return os.str();
    }

    static constexpr int state_size = 1;  // momentum m

    struct scalars {
        float lr, decay, beta1, beta2;
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t) {
        return {h.lr, 1.0f - h.lr * h.weight_decay, h.beta1, h.beta2};
    }

    LOCO_HD static void update(const scalars& k, float& p, float g, float* s) {
        const float m = s[0];
        const float direction = math::sign(k.beta1 * m + (1.0f - k.beta1) * g);
        p = p * k.decay - k.lr * direction;
        s[0] = k.beta2 * m + (1.0f - k.beta2) * g;
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f && math::isfinite(h.lr)))
            throw invalid_argument("loco::inner::lion: lr must be finite and >= 0, got " +
                                   std::to_string(h.lr));
        if (!(h.beta1 >= 0.0f && h.beta1 <= 1.0f))
            throw invalid_argument("loco::inner::lion: beta1 must be in [0, 1], got " +
                                   std::to_string(h.beta1));
        if (!(h.beta2 >= 0.0f && h.beta2 < 1.0f))
            throw invalid_argument("loco::inner::lion: beta2 must be in [0, 1), got " +
                                   std::to_string(h.beta2));
        if (!(h.weight_decay >= 0.0f && math::isfinite(h.weight_decay)))
            throw invalid_argument("loco::inner::lion: weight_decay must be finite and >= 0, got " +
                                   std::to_string(h.weight_decay));
        // Each finite, their product can overflow a float (every parameter would turn inf).
        if (!math::isfinite(1.0f - h.lr * h.weight_decay))
            throw invalid_argument("loco::inner::lion: lr * weight_decay overflows a float (lr " +
                                   std::to_string(h.lr) + ", weight_decay " +
                                   std::to_string(h.weight_decay) + ")");
    }
};

}  // namespace loco::inner
