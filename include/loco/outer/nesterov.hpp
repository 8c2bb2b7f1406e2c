#pragma once
// DiLoCo's outer optimizer: SGD with Nesterov momentum exactly as PyTorch's
// SGD(lr, momentum, nesterov=True) with dampening 0 (and optax.sgd(nesterov=True)):
//   b = mu * b + delta;   global -= lr * (delta + mu * b)
// The first step (b = 0) moves the global parameters by (1 + mu) * lr * delta.

#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace loco::outer {

struct nesterov {
    static constexpr std::string_view name = "outer_nesterov";

    // DiLoCo's values (arXiv 2311.08105; OpenDiLoCo, torchft, prime).
    struct hyper {
        float lr = 0.7f;
        float momentum = 0.9f;
    };

    static constexpr int state_size = 1;  // momentum buffer b

    struct scalars {
        float lr, momentum;
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t) { return {h.lr, h.momentum}; }

    LOCO_HD static void update(const scalars& k, float& global, float delta, float* s) {
        const float b = k.momentum * s[0] + delta;
        s[0] = b;
        global -= k.lr * (delta + k.momentum * b);
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " lr=" << h.lr << " momentum=" << h.momentum;
        return os.str();
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f && math::isfinite(h.lr)))
            throw invalid_argument("loco::outer::nesterov: lr must be finite and >= 0, got " +
                                   std::to_string(h.lr));
        if (!(h.momentum >= 0.0f && h.momentum < 1.0f))
            throw invalid_argument("loco::outer::nesterov: momentum must be in [0, 1), got " +
                                   std::to_string(h.momentum));
    }
};

}  // namespace loco::outer
