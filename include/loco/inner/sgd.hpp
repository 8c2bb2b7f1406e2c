#pragma once
// Stochastic gradient descent with PyTorch's torch.optim.SGD semantics: L2 weight decay added to
// the gradient, heavy-ball momentum with dampening (the first step stores the gradient itself),
// optional Nesterov momentum.

#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <cstdint>
#include <string>
#include <string_view>

namespace loco::inner {

struct sgd {
    static constexpr std::string_view name = "sgd";

    // PyTorch's defaults, except lr, which PyTorch requires and loco sets to 1e-3.
    struct hyper {
        float lr = 1e-3f;
        float momentum = 0.0f;
        float dampening = 0.0f;
        float weight_decay = 0.0f;
        bool nesterov = false;
    };

    // The settings, for when the policy serves as an outer optimizer (start() compares them
    // between the ranks and checkpoints record them; an inner optimizer is each worker's own).
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " lr=" << h.lr << " momentum=" << h.momentum << " dampening=" << h.dampening
           << " weight_decay=" << h.weight_decay << " nesterov=" << h.nesterov;
        return os.str();
    }

    // The momentum buffer; allocated even when momentum is 0 so that the state layout does not
    // depend on run-time values.
    static constexpr int state_size = 1;

    struct scalars {
        float lr, momentum, dampening, weight_decay;
        bool nesterov;
        bool first_step;  // PyTorch initialises the buffer to the gradient on the first step
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t step) {
        return {h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov, step == 1};
    }

    LOCO_HD static void update(const scalars& k, float& p, float g, float* s) {
        if (k.weight_decay != 0.0f) {
            g += k.weight_decay * p;
        }
        if (k.momentum != 0.0f) {
            const float b = k.first_step ? g : k.momentum * s[0] + (1.0f - k.dampening) * g;
            s[0] = b;
            g = k.nesterov ? g + k.momentum * b : b;
        }
        p -= k.lr * g;
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f && math::isfinite(h.lr)))
            throw invalid_argument("loco::inner::sgd: lr must be finite and >= 0, got " +
                                   std::to_string(h.lr));
        // A momentum of 1 or more never forgets a gradient: the buffer grows without bound.
        if (!(h.momentum >= 0.0f && h.momentum < 1.0f))
            throw invalid_argument("loco::inner::sgd: momentum must be in [0, 1), got " +
                                   std::to_string(h.momentum));
        if (!(h.dampening >= 0.0f && h.dampening <= 1.0f))
            throw invalid_argument("loco::inner::sgd: dampening must be in [0, 1], got " +
                                   std::to_string(h.dampening));
        if (!(h.weight_decay >= 0.0f && math::isfinite(h.weight_decay)))
            throw invalid_argument("loco::inner::sgd: weight_decay must be finite and >= 0, got " +
                                   std::to_string(h.weight_decay));
        if (h.nesterov && (h.momentum <= 0.0f || h.dampening != 0.0f))
            throw invalid_argument(
                "loco::inner::sgd: Nesterov momentum requires momentum > 0 and dampening = 0");
    }
};

}  // namespace loco::inner
