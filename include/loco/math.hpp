#pragma once
// The few math functions the per-element rules use, callable from host and device code alike.
// Rules call these instead of std:: so one source compiles for both passes.

#include <loco/config.hpp>

#if !LOCO_DEVICE_PASS()
#include <cmath>
#endif

namespace loco::math {

LOCO_HD float sqrt(float x) {
#if LOCO_DEVICE_PASS()
    return ::sqrtf(x);
#else
    return std::sqrt(x);
#endif
}

// Correctly rounded on both sides (IEEE 754 requires it of sqrt), so host and device agree.
LOCO_HD double sqrt(double x) {
#if LOCO_DEVICE_PASS()
    return ::sqrt(x);
#else
    return std::sqrt(x);
#endif
}

LOCO_HD float pow(float base, float exponent) {
#if LOCO_DEVICE_PASS()
    return ::powf(base, exponent);
#else
    return std::pow(base, exponent);
#endif
}

// For factors such as 1 - beta^t, which cancel in float when beta is near 1 (beta2 = 0.9999 lost
// about 5e-5 of the bias correction); PyTorch computes them in double too.
LOCO_HD double pow(double base, double exponent) {
#if LOCO_DEVICE_PASS()
    return ::pow(base, exponent);
#else
    return std::pow(base, exponent);
#endif
}

LOCO_HD float abs(float x) {
#if LOCO_DEVICE_PASS()
    return ::fabsf(x);
#else
    return std::fabs(x);
#endif
}

LOCO_HD bool isfinite(float x) {
#if LOCO_DEVICE_PASS()
    return ::isfinite(x);
#else
    return std::isfinite(x);
#endif
}

// torch.sign: -1, 0 or +1 (0 for both zeros), and NaN for NaN: a NaN reaching a sign-based
// update (lion's direction under nonfinite_policy::ignore) shows in the parameter, as in PyTorch,
// instead of silently becoming a zero step. A select, not a branch, so host loops vectorise.
LOCO_HD float sign(float x) {
    const float s = static_cast<float>(x > 0.0f) - static_cast<float>(x < 0.0f);
    return x != x ? x : s;
}

}  // namespace loco::math
