#pragma once
// SparseLoCo's aggregation (Sarfi et al., arXiv 2508.15706), as Templar's reference code runs it
// (tplr-ai/templar src/tplr/neurons.py outer_step, src/tplr/compress.py
// TopKCompressor.batch_decompress with clip_norm=True, then decompress): each peer's contribution
// to a tensor is scaled down to the median of the peers' norms, and each element is averaged over
// the peers whose payload carried it. Per tensor (segment) of the fragment, with D_k worker k's
// decoded pseudo-gradient:
//
//   n_k  = ||D_k|| over the tensor                  torch.norm of k's dequantized kept values (D_k
//                                                   is 0 elsewhere); summed in double, to fp32
//   med  = the lower median of n_0 .. n_{M-1}       torch.median: element (M - 1) / 2 of the
//                                                   sorted norms; NaN if any norm is NaN
//   f_k  = min(med / (n_k + eps), 1)                fp32, torch.clamp(med / (norm + 1e-8), max=1)
//   out  = sum over the k that sent element i (rank order, fp32) of f_k * D_k[i],
//          divided by how many did; 0 where none did     scatter_reduce("mean", include_self=False)
//
// "Sent" comes from the payloads when the compressor can tell (compress::sparseloco's indices,
// needs_support); with a dense compressor every worker sent every element and out is the mean of
// the clipped deltas over all M workers. The median is over every worker of the sync, the worker
// itself included (templar's gather may pick a subset of peers; here all M take part). A NaN in
// a delta makes its norm, the median and so every factor NaN: every element some worker sent is
// NaN. An infinite delta (no NaN) makes its norm infinite: while at most M / 2 (rounded down) of
// the norms are infinite, the lower median stays finite and such a worker's factor is 0, so its
// infinite elements become NaN (inf * 0), its other elements add 0 (still counted in the divisor)
// and the other workers are clipped as usual; with more, the median is infinite, those workers'
// factors NaN (every element they sent NaN) and the finite workers' 1. Either way the aggregate
// holds a NaN and the handle's nonfinite policy decides (templar skips such a tensor's step).

#include <loco/aggregate/aggregate.hpp>
#include <loco/aggregate/rules.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loco::aggregate {

struct median_norm_clip {
    static constexpr std::string_view name = "median_norm_clip";

    struct hyper {
        float epsilon = 1e-8f;  // added to a peer's norm before the division (templar: 1e-8)
        bool clip = true;       // false: the plain scatter-mean (batch_decompress clip_norm=False)
    };

    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = true;
    static constexpr bool needs_support = true;

    static void validate(const hyper& h) {
        // > 0: with 0, a worker whose tensor did not move against a median of 0 gets the factor
        // 0 / 0, and the aggregate NaN.
        if (!(h.epsilon > 0.0f && math::isfinite(h.epsilon))) {
            throw invalid_argument("loco::aggregate::median_norm_clip: epsilon must be finite and "
                                   "> 0 (templar: 1e-8), got " + std::to_string(h.epsilon));
        }
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " epsilon=" << h.epsilon << " clip=" << (h.clip ? "true" : "false");
        return os.str();
    }

    // The clip factor of each worker (f_k above) from the workers' norms over a tensor (the
    // CUDA backend computes the norms on the device and calls this).
    static void factors_of(const hyper& h, std::span<const float> norms, std::vector<float>& f) {
        f.assign(norms.size(), 1.0f);
        if (!h.clip || norms.empty()) return;
        bool nan = false;
        for (const float n : norms) nan = nan || n != n;
        float median = std::numeric_limits<float>::quiet_NaN();
        if (!nan) {
            std::vector<float> sorted(norms.begin(), norms.end());
            const auto mid = sorted.begin() + static_cast<std::ptrdiff_t>((norms.size() - 1) / 2);
            std::nth_element(sorted.begin(), mid, sorted.end());
            median = *mid;
        }
        for (std::size_t k = 0; k < norms.size(); ++k) {
            f[k] = rule::median_norm_factor(median, norms[k], h.epsilon);
        }
    }

    // The clip factor of each worker for the elements [begin, end) (f_k above).
    static void factors(const hyper& h, const contributions& c, std::size_t begin, std::size_t end,
                        std::vector<float>& f) {
        if (c.deltas.size() != c.workers * c.elements || begin > end || end > c.elements) {
            throw shape_error("loco::aggregate::median_norm_clip: factors of elements [" +
                              std::to_string(begin) + ", " + std::to_string(end) + ") of " +
                              std::to_string(c.workers) + " x " + std::to_string(c.elements) +
                              " deltas, given " + std::to_string(c.deltas.size()));
        }
        f.assign(c.workers, 1.0f);
        if (!h.clip) return;
        std::vector<float> norms(c.workers);
        for (std::size_t k = 0; k < c.workers; ++k) {
            const auto d = c.delta(k);
            double sq = 0.0;
            for (std::size_t i = begin; i < end; ++i) sq += static_cast<double>(d[i]) * d[i];
            norms[k] = static_cast<float>(std::sqrt(sq));
        }
        factors_of(h, norms, f);
    }

    static void combine(const hyper& h, const contributions& c, std::span<float> out) {
        validate(h);
        check_contributions(c, out.size(), false, "loco::aggregate::median_norm_clip: ");
        std::vector<std::pair<std::size_t, std::size_t>> ranges;
        for (const auto& s : c.segments) ranges.emplace_back(s.offset, s.offset + s.size);
        if (c.segments.empty()) ranges.emplace_back(0, c.elements);
        std::vector<float> f;
        std::vector<std::uint32_t> count;
        for (const auto& [begin, end] : ranges) {
            factors(h, c, begin, end, f);
            count.assign(end - begin, 0);
            for (std::size_t i = begin; i < end; ++i) out[i] = 0.0f;
            for (std::size_t k = 0; k < c.workers; ++k) {
                const auto d = c.delta(k);
                const auto sent = c.sent_by(k);
                for (std::size_t i = begin; i < end; ++i) {
                    if (!sent.empty() && sent[i] == 0) continue;
                    out[i] = rule::add_product(out[i], d[i], f[k]);
                    ++count[i - begin];
                }
            }
            for (std::size_t i = begin; i < end; ++i) {
                const std::uint32_t m = count[i - begin];
                if (m != 0) out[i] /= static_cast<float>(m);
            }
        }
    }
};

}  // namespace loco::aggregate
