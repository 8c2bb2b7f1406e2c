#pragma once
// Delayed Nesterov (Liu et al., "Asynchronous Local-SGD Training for Language Modeling", arXiv
// 2401.09135, Algorithm 3): Nesterov momentum for outer updates that arrive one at a time and
// late. Pseudo-gradients are added into a buffer; every N-th outer step the momentum takes the
// buffer's mean, in between the global parameters move by the plain step lr * delta / N:
//   buf += delta
//   step % N == 0:  m = beta * m + buf / N;  global -= lr * ((1 - c*N + c) * beta * m + delta / N);  buf = 0
//   otherwise:      global -= lr * (c * beta * m + delta / N)
// Over N steps the total change equals one Nesterov step on the mean of the N pseudo-gradients
// (c = 0). `step` counts this policy's outer steps from 1 (per fragment in Streaming DiLoCo).

#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace loco::outer {

struct delayed_nesterov {
    static constexpr std::string_view name = "outer_delayed_nesterov";

    // The HALoS reference values (utnslab/halos src/halos/opt.py, algorithms.md 6.2).
    struct hyper {
        float lr = 0.3f;
        float momentum = 0.5f;   // beta
        std::uint32_t period = 2;  // N: outer steps per momentum update
        float c = 0.0f;          // share of the momentum applied between milestones
    };

    static constexpr int state_size = 2;  // momentum m, buffer buf

    struct scalars {
        float lr, momentum, inv_n, c_between, c_milestone;
        bool milestone;
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t step) {
        const float n = static_cast<float>(h.period);
        return {h.lr,
                h.momentum,
                1.0f / n,
                h.c * h.momentum,
                (1.0f - h.c * n + h.c) * h.momentum,
                step % h.period == 0};
    }

    LOCO_HD static void update(const scalars& k, float& global, float delta, float* s) {
        const float buf = s[1] + delta;
        if (k.milestone) {
            const float m = k.momentum * s[0] + buf * k.inv_n;
            s[0] = m;
            s[1] = 0.0f;
            global -= k.lr * (k.c_milestone * m + delta * k.inv_n);
        } else {
            s[1] = buf;
            global -= k.lr * (k.c_between * s[0] + delta * k.inv_n);
        }
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f && math::isfinite(h.lr)))
            throw invalid_argument(
                "loco::outer::delayed_nesterov: lr must be finite and >= 0, got " +
                std::to_string(h.lr));
        if (!(h.momentum >= 0.0f && h.momentum < 1.0f))
            throw invalid_argument("loco::outer::delayed_nesterov: momentum must be in [0, 1), got " +
                                   std::to_string(h.momentum));
        if (h.period == 0)
            throw invalid_argument("loco::outer::delayed_nesterov: period (N) must be >= 1, got 0");
        if (!(h.c >= 0.0f && h.c <= 1.0f))
            throw invalid_argument("loco::outer::delayed_nesterov: c must be in [0, 1], got " +
                                   std::to_string(h.c));
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " lr=" << h.lr << " momentum=" << h.momentum << " period=" << h.period
           << " c=" << h.c;
        return os.str();
    }
};

}  // namespace loco::outer
