#pragma once
// The bin rule of loco's bin-mean quantizers (MuLoCo's statistical codes, SparseLoCo's kept
// values): one copy, shared by the host and the CUDA kernels, so that every encoder puts a value in
// the same bin and every decoder rebuilds the same fp32.
//
//   code(x)  = clamp(round_half_to_even((x - shift) / scale + B/2), 0, B - 1), NaN into bin 0
//   value(q) = lut[q] + shift

#include <loco/config.hpp>

namespace loco::compress::bin_code {

LOCO_HD unsigned code(float x, float shift, float scale, unsigned bins) noexcept {
    float t = (x - shift) / scale + static_cast<float>(bins / 2);
    t = t >= 0.0f ? t : 0.0f;  // also NaN
    t = t <= static_cast<float>(bins - 1) ? t : static_cast<float>(bins - 1);
    const unsigned low = static_cast<unsigned>(t);
    const float frac = t - static_cast<float>(low);
    return low + static_cast<unsigned>(frac > 0.5f || (frac == 0.5f && (low & 1u) != 0));
}

LOCO_HD float value(float lut_entry, float shift) noexcept { return lut_entry + shift; }

}  // namespace loco::compress::bin_code
