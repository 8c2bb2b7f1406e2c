#pragma once
// The per-element rules of the aggregation policies, written once: the host loops (edit.hpp,
// robust.hpp, median_norm_clip.hpp) and the CUDA kernels (backend/cuda/aggregate.hpp) call the
// same functions, so the two backends cannot drift apart. The scalar decisions (which workers are
// outliers, their weights, refusing a round) are not here: they stay in the policies' host code,
// which the CUDA backend runs on the norms its kernels return.

#include <loco/config.hpp>
#include <loco/math.hpp>

#if LOCO_DEVICE_PASS()
#include <cuda_runtime.h>
#endif

#include <cstddef>

namespace loco::aggregate::rule {

// The most workers the coordinate-wise rules sort per element on the device (a register array).
inline constexpr std::size_t max_sorted_workers = 64;

// GTA's vote of one value: -1, 0 or +1.
LOCO_HD double sign_vote(float d) {
    return static_cast<double>(d > 0.0f) - static_cast<double>(d < 0.0f);
}

// 1 when d's sign agrees with the consensus `vote` (a tie of the vote counts as +), else 0;
// arithmetic, so host loops vectorise.
LOCO_HD double agrees(double vote, float d) {
    const double up = static_cast<double>(vote >= 0.0);
    return up * static_cast<double>(d > 0.0f) + (1.0 - up) * static_cast<double>(d < 0.0f);
}

// The GTA value of an element: the agreeing workers' weighted sum over their total weight. A
// total below 1e-8 divides by 1 instead, as atorch's GTAReducer does (`divisor[divisor.abs() <
// 1e-8] = 1`): a few agreeing workers of tiny softmax weight keep their tiny weighted sum rather
// than being scaled up to full size; no agreeing worker gives 0.
LOCO_HD float consensus_value(double kept, double weight) {
    return static_cast<float>(weight >= 1e-8 ? kept / weight : kept);
}

// EDiT's clip of the aggregate to phi: min(1, phi / (||agg|| + 1e-6)), from its squared norm.
LOCO_HD double norm_clip_scale(double squared_norm, double phi) {
    const double s = phi / (math::sqrt(squared_norm) + 1e-6);
    return s < 1.0 ? s : 1.0;
}

// x scaled by s, rounded once to fp32.
LOCO_HD float scaled(float x, double s) { return static_cast<float>(x * s); }

// Sorts v[0, m) ascending in place. Insertion sort: m is a number of workers (small), and the
// order of finite values is total, so any correct sort gives the same array.
LOCO_HD void sort_ascending(double* v, std::size_t m) {
    for (std::size_t i = 1; i < m; ++i) {
        const double x = v[i];
        std::size_t k = i;
        while (k > 0 && v[k - 1] > x) {
            v[k] = v[k - 1];
            --k;
        }
        v[k] = x;
    }
}

// The mean of sorted[lo, hi), summed in order (trimmed mean: lo = b, hi = m - b; median: the
// middle one or two).
LOCO_HD float window_mean(const double* sorted, std::size_t lo, std::size_t hi) {
    double s = 0.0;
    for (std::size_t k = lo; k < hi; ++k) s += sorted[k];
    return static_cast<float>(s / static_cast<double>(hi - lo));
}

// Centered clipping's weight of a worker at distance `norm` from the center: min(1, tau / norm).
LOCO_HD double radius_scale(double norm, double tau) { return norm > tau ? tau / norm : 1.0; }

// Centered clipping's contribution of one worker to the step of an element.
LOCO_HD double centered_term(float d, double center, double scale) {
    return (d - center) * scale;
}

// SparseLoCo's clip factor of a peer: min(median / (norm + eps), 1) in fp32 (NaN stays NaN, as
// torch.clamp keeps it).
LOCO_HD float median_norm_factor(float median, float norm, float epsilon) {
    const float q = median / (norm + epsilon);
    return q > 1.0f ? 1.0f : q;
}

// acc + d * f in fp32, the product rounded before the sum (never one fused multiply-add, which the
// host loops do not use either): SparseLoCo's rank-order sum of clipped values.
LOCO_HD float add_product(float acc, float d, float f) {
#if LOCO_DEVICE_PASS()
    return __fadd_rn(acc, __fmul_rn(d, f));
#else
    return acc + d * f;
#endif
}

}  // namespace loco::aggregate::rule
