#pragma once
// 16-bit floating-point storage types and their conversions from and to float, written with
// integer operations only, so the host and the CUDA kernels round identically and no compiler
// flag (fast math, flush-to-zero, the rounding mode) can change a result.
//
//   loco::bf16  bfloat16: 1 sign, 8 exponent, 7 fraction bits (float's range, 8 significant bits)
//   loco::fp16  IEEE binary16: 1 sign, 5 exponent, 10 fraction bits (largest finite 65504)
//
// float -> 16 bits rounds to nearest, ties to even, subnormals included. A float beyond the
// largest finite value becomes +-inf when it is at least halfway to the next power of two
// (fp16: |x| >= 65520; bf16: |x| >= 2^128 - 2^119). NaN stays NaN, with its sign and its leading
// payload bits, and always comes back quiet (the quiet bit, the fraction's top bit, is set).
// 16 bits -> float is exact. Hence a round trip 16 bits -> float -> 16 bits returns every
// pattern unchanged except a signalling NaN, which comes back with its quiet bit set.

#include <loco/config.hpp>

#include <cstdint>
#if !LOCO_DEVICE_PASS()
#include <cstring>
#endif

namespace loco {

namespace detail {

LOCO_HD std::uint32_t float_bits(float f) noexcept {
#if LOCO_DEVICE_PASS()
    return __float_as_uint(f);
#else
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
#endif
}

LOCO_HD float float_from_bits(std::uint32_t u) noexcept {
#if LOCO_DEVICE_PASS()
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
#endif
}

// Drops the low `shift` bits of `value`, rounding to nearest with ties to even. 0 < shift < 32.
LOCO_HD std::uint32_t shift_right_nearest_even(std::uint32_t value, unsigned shift) noexcept {
    const std::uint32_t kept = value >> shift;
    const std::uint32_t rest = value & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    return kept + static_cast<std::uint32_t>(rest > half || (rest == half && (kept & 1u) != 0));
}

LOCO_HD std::uint16_t to_u16(std::uint32_t v) noexcept { return static_cast<std::uint16_t>(v); }

}  // namespace detail

struct bf16 {
    std::uint16_t bits = 0;

    LOCO_HD static bf16 from_float(float f) noexcept {
        const std::uint32_t u = detail::float_bits(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            return {detail::to_u16((u >> 16) | 0x0040u)};
        }
        // bf16 is float's upper half, so rounding the lower half away is the whole conversion;
        // a carry out of the fraction moves to the next binade, and out of the largest one to inf.
        return {detail::to_u16(detail::shift_right_nearest_even(u, 16))};
    }

    LOCO_HD float to_float() const noexcept {
        return detail::float_from_bits(static_cast<std::uint32_t>(bits) << 16);
    }
};

struct fp16 {
    std::uint16_t bits = 0;

    LOCO_HD static fp16 from_float(float f) noexcept {
        const std::uint32_t u = detail::float_bits(f);
        const std::uint32_t sign = (u >> 16) & 0x8000u;
        const std::uint32_t a = u & 0x7fffffffu;
        if (a > 0x7f800000u) {
            return {detail::to_u16(sign | 0x7e00u | ((a >> 13) & 0x03ffu))};
        }
        if (a >= 0x477ff000u) {  // 65520 = 65504 + half a step: ties go to the even pattern, inf
            return {detail::to_u16(sign | 0x7c00u)};
        }
        if (a >= 0x38800000u) {  // 2^-14, the smallest normal fp16
            // Rebias the exponent (127 -> 15) in place; a rounding carry propagates into it.
            return {detail::to_u16(sign | detail::shift_right_nearest_even(a - 0x38000000u, 13))};
        }
        if (a <= 0x33000000u) {  // at most 2^-25, half the smallest subnormal: ties to +-0
            return {detail::to_u16(sign)};
        }
        // Subnormal result m * 2^-24: shift the 24-bit significand down to units of 2^-24. The
        // float is normal here (a > 2^-25), so its implicit bit is 1; a carry into 0x400 yields
        // the smallest normal, which is the right encoding.
        const std::uint32_t significand = (a & 0x007fffffu) | 0x00800000u;
        const unsigned shift = 126u - (a >> 23);  // 14 for 2^-14 > |f| >= 2^-15 ... 24 for 2^-25
        return {detail::to_u16(sign | detail::shift_right_nearest_even(significand, shift))};
    }

    LOCO_HD float to_float() const noexcept {
        const std::uint32_t sign = (static_cast<std::uint32_t>(bits) & 0x8000u) << 16;
        const std::uint32_t exponent = (static_cast<std::uint32_t>(bits) >> 10) & 0x1fu;
        std::uint32_t fraction = static_cast<std::uint32_t>(bits) & 0x03ffu;
        if (exponent == 0x1fu) {
            return detail::float_from_bits(sign | 0x7f800000u | (fraction << 13));
        }
        if (exponent != 0) {
            return detail::float_from_bits(sign | ((exponent + 112u) << 23) | (fraction << 13));
        }
        if (fraction == 0) {
            return detail::float_from_bits(sign);
        }
        // Subnormal m * 2^-24 is a normal float: normalise the fraction to a leading 0x400.
        std::uint32_t float_exponent = 113u;  // the biased exponent of 2^-14
        while ((fraction & 0x0400u) == 0) {
            fraction <<= 1;
            --float_exponent;
        }
        return detail::float_from_bits(sign | (float_exponent << 23) |
                                       ((fraction & 0x03ffu) << 13));
    }
};

}  // namespace loco
