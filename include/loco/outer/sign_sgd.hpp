#pragma once
// Sign-SGD as the outer step, DeMo's and DisTrO's apply (bloc97/DeMo demo.py DeMo.step:
// p.mul_(1 - lr * weight_decay), then p.grad.sign_() and torch.optim.SGD without momentum;
// PsycheFoundation/psyche shared/modeling/src/distro.rs Distro::apply, weight decay in
// Distro::generate):
//
//   global = global * (1 - lr * weight_decay) - lr * sign(delta)
//
// sign is torch.sign: -1, 0 (for both zeros) or +1, and NaN for NaN, so a non-finite aggregate
// still reaches the global parameters under nonfinite_policy::ignore, as in the references. Every
// element moves by lr (or not at all), whatever the size of the averaged pseudo-gradient; with
// compress::demo's sign variant this is the step Psyche takes (see docs/compressors.md, demo).

#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace loco::outer {

struct sign_sgd {
    static constexpr std::string_view name = "outer_sign_sgd";

    // DeMo's OLMo configurations (OLMo-1B-100BT-demo.yaml: learning_rate 4e-4, weight_decay 0).
    struct hyper {
        float lr = 4e-4f;
        float weight_decay = 0.0f;  // decoupled, applied before the sign step
    };

    static constexpr int state_size = 0;

    struct scalars {
        float lr;
        float decay;  // 1 - lr * weight_decay
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t) {
        return {h.lr, static_cast<float>(1.0 - static_cast<double>(h.lr) * h.weight_decay)};
    }

    LOCO_HD static void update(const scalars& k, float& global, float delta, float*) {
        global = global * k.decay - k.lr * math::sign(delta);
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " lr=" << h.lr << " weight_decay=" << h.weight_decay;
        return os.str();
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f && math::isfinite(h.lr)))
            throw invalid_argument("loco::outer::sign_sgd: lr must be finite and >= 0, got " +
                                   std::to_string(h.lr));
        if (!(h.weight_decay >= 0.0f && math::isfinite(h.weight_decay)))
            throw invalid_argument("loco::outer::sign_sgd: weight_decay must be finite and >= 0, "
                                   "got " + std::to_string(h.weight_decay));
        // Each finite, their product can overflow the float decay prepare() forms (every global
        // parameter -inf or NaN at the first sync), as in inner::lion.
        if (!math::isfinite(static_cast<float>(1.0 - static_cast<double>(h.lr) *
                                                         static_cast<double>(h.weight_decay))))
            throw invalid_argument("loco::outer::sign_sgd: lr * weight_decay overflows a float (lr " +
                                   std::to_string(h.lr) + ", weight_decay " +
                                   std::to_string(h.weight_decay) + ")");
    }
};

}  // namespace loco::outer
