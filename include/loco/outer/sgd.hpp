#pragma once
// Outer SGD: global -= lr * averaged pseudo-gradient. With lr = 1 the new global parameters are
// exactly the mean of the workers' parameters (FedAvg / Local SGD parameter averaging).

#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace loco::outer {

struct sgd {
    static constexpr std::string_view name = "outer_sgd";

    struct hyper {
        float lr = 1.0f;
    };

    static constexpr int state_size = 0;

    struct scalars {
        float lr;
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t) { return {h.lr}; }

    LOCO_HD static void update(const scalars& k, float& global, float delta, float*) {
        global -= k.lr * delta;
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " lr=" << h.lr;
        return os.str();
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f && math::isfinite(h.lr)))
            throw invalid_argument("loco::outer::sgd: lr must be finite and >= 0, got " +
                                   std::to_string(h.lr));
    }
};

}  // namespace loco::outer
