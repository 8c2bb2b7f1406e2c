#pragma once
// EDiT's pseudo-gradient penalty (Cheng et al., arXiv 2412.07210; atorch's local_sgd code) as an
// aggregation policy, per fragment (a layer when the layers are registered as fragments), or with
// scope = edit_scope::tensor per tensor of the fragment (norms, detectors and weights of each
// tensor on their own; see `scope` below):
//
//   G_i      = the L2 norm of worker i's pseudo-gradient over the fragment (its own report,
//              taken on trust as in the paper: a worker that lies about it is not caught)
//   outlier  = the online EWMA detector of worker i says G_i is anomalous, or G_i / Delta_i is
//              not finite, or G_i < 0, or (with step weights) steps_i is not finite or < 0; the
//              detector then learns G_i only from inliers (atorch's DDP path)
//   w_i      = softmax_j(-G_j / T) over the inliers (or 1 / #inliers without norm weighting),
//              optionally w_i <- (1 - r) w_i + r s_i with s_i = steps_i / sum of inlier steps
//              (A-EDiT's step weights; steps_i is worker i's report, taken on trust in both
//              scopes as in atorch: an inflated finite count buys up to the weight r)
//   agg      = sum_i w_i Delta_i (linear), or GTA: per element, only the workers whose sign
//              agrees with the consensus ("sum": sign of sum_i w_i Delta_i, "count": sign of
//              sum_i sign(Delta_i); ties +), divided by the sum of their weights
//   agg     *= min(1, phi / (||agg|| + 1e-6))
//   every worker an outlier: the round is refused (nothing applied, local values reset).
//
// Every rank keeps one detector per worker, fed the same gathered norms, so every rank flags the
// same workers. algorithms.md section 5.2; docs/aggregation.md.

#include <loco/aggregate/aggregate.hpp>
#include <loco/aggregate/rules.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace loco::aggregate {

// atorch's OnlineDynamicEWMA, in double precision:
//   update(v): count += 1; d = v - mean; mean += alpha d; M2 = (1 - alpha)(M2 + alpha d (v - mean));
//              the z-score of v (after the update) joins a window of the last `warmup` z-scores
//   sigma = sqrt(M2) when count >= 2, else 0; z(v) = (v - mean) / sigma, 0 when sigma == 0 or
//   count < warmup;  outlier(v) = count >= warmup and z(v) > threshold * max(1, std(window))
// with std torch.std's, the unbiased (n - 1) one; a window of one z-score has none (NaN in torch,
// which makes the threshold NaN: nothing is an outlier). One-sided: only large norms are
// anomalies.
struct ewma_detector {
    std::uint64_t count = 0;
    double mean = 0.0;
    double m2 = 0.0;
    std::vector<double> window;  // the last z-scores, oldest first (at most `warmup`, once updated)

    double sigma() const noexcept { return count >= 2 ? std::sqrt(m2) : 0.0; }

    double z(double v, std::uint64_t warmup) const noexcept {
        const double s = sigma();
        if (s == 0.0 || count < warmup) return 0.0;
        return (v - mean) / s;
    }

    // torch.std() of the last `last` z-scores of the window (all of them by default): unbiased.
    // NaN for one z-score (as torch), 0 for none (warmup 0 keeps no window).
    double window_std(std::uint64_t last = ~std::uint64_t{0}) const noexcept {
        const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(last, window.size()));
        if (n == 0) return 0.0;
        if (n == 1) return std::numeric_limits<double>::quiet_NaN();
        const auto first = window.end() - static_cast<std::ptrdiff_t>(n);
        double m = 0.0;
        for (auto it = first; it != window.end(); ++it) m += *it;
        m /= static_cast<double>(n);
        double q = 0.0;
        for (auto it = first; it != window.end(); ++it) q += (*it - m) * (*it - m);
        return std::sqrt(q / static_cast<double>(n - 1));
    }

    bool is_outlier(double v, std::uint64_t warmup, double threshold) const noexcept {
        // Over the last `warmup` z-scores only (atorch's deque(maxlen=warmup)): a window kept
        // under a larger warm-up (lowered mid-run, or loaded from a checkpoint) is longer.
        const double spread = window_std(warmup);
        // torch.max(1, NaN) is NaN and z > NaN is false: a NaN spread flags nothing.
        if (std::isnan(spread)) return false;
        return count >= warmup && z(v, warmup) > threshold * std::max(1.0, spread);
    }

    void update(double v, double alpha, std::uint64_t warmup) {
        ++count;
        const double d = v - mean;
        mean += alpha * d;
        m2 = (1.0 - alpha) * (m2 + alpha * d * (v - mean));
        if (warmup == 0) {
            window.clear();
            return;
        }
        // Down to the last warmup - 1 before the new one: `warmup` may have been lowered since
        // the window filled (aggregate_hyper() changes it mid-run); dropping one z-score only
        // when the window held exactly `warmup` let such a window grow without bound.
        if (window.size() >= warmup) {
            window.erase(window.begin(),
                         window.end() - static_cast<std::ptrdiff_t>(warmup - 1));
        }
        window.push_back(z(v, warmup));
    }
};

// GTA's sign consensus.
enum class sign_consensus : unsigned char {
    none,   // the weighted sum
    sum,    // keep the workers with the sign of sum_i w_i Delta_i
    count   // keep the workers with the sign of sum_i sign(Delta_i)
};

constexpr std::string_view to_string(sign_consensus c) noexcept {
    switch (c) {
        case sign_consensus::none: return "none";
        case sign_consensus::sum: return "sum";
        case sign_consensus::count: return "count";
    }
    return "?";
}

// The reducer, per element j, over the workers with weight > 0 (atorch's LinearReducer and
// GTAReducer without sparsification): out[j] = sum_i w_i Delta_i[j] for `none`; with a consensus,
// sum over the agreeing workers of w_i Delta_i[j] divided by the sum of their w_i (0 when no
// worker agrees; a sum below 1e-8 divides by 1, as atorch's GTAReducer). Ties of the consensus
// count as +. deltas: workers x n, row-major; the rows of workers with weight > 0 must be finite
// (edit gives the others weight 0).
inline void gta_reduce(std::span<const double> w, std::span<const float> deltas, std::size_t n,
                       sign_consensus consensus, std::span<float> out) {
    const std::size_t m = w.size();
    if (out.size() != n || (m != 0 && n > deltas.size() / m) || deltas.size() != m * n) {
        throw shape_error("loco::aggregate::gta_reduce: expected " + std::to_string(m) + " x " +
                          std::to_string(n) + " deltas (one row per weight) and an output of " +
                          std::to_string(n) + "; got " + std::to_string(deltas.size()) +
                          " deltas and " + std::to_string(out.size()) + " outputs");
    }
    // Row by row (each worker's delta is contiguous), every sum over the workers in rank order.
    std::vector<double> total(n, 0.0), signs(n, 0.0);
    for (std::size_t i = 0; i < m; ++i) {
        if (w[i] == 0.0) continue;
        const double wi = w[i];  // a local: the sums below cannot alias it
        const float* d = deltas.data() + i * n;
        double* t = total.data();
        double* sg = signs.data();
        for (std::size_t j = 0; j < n; ++j) {
            t[j] += wi * d[j];
            sg[j] += rule::sign_vote(d[j]);
        }
    }
    if (consensus == sign_consensus::none) {
        for (std::size_t j = 0; j < n; ++j) out[j] = static_cast<float>(total[j]);
        return;
    }
    const std::vector<double>& vote = consensus == sign_consensus::sum ? total : signs;
    std::vector<double> kept(n, 0.0), weight(n, 0.0);
    for (std::size_t i = 0; i < m; ++i) {
        if (w[i] == 0.0) continue;
        const double wi = w[i];
        const float* d = deltas.data() + i * n;
        const double* v = vote.data();
        double* k = kept.data();
        double* wt = weight.data();
        for (std::size_t j = 0; j < n; ++j) {
            const double agrees = rule::agrees(v[j], d[j]);
            k[j] += agrees * (wi * d[j]);
            wt[j] += agrees * wi;
        }
    }
    for (std::size_t j = 0; j < n; ++j) {
        out[j] = rule::consensus_value(kept[j], weight[j]);
    }
}

// Where EDiT measures the norms G_i it weights and flags workers by.
enum class edit_scope : unsigned char {
    fragment,  // G_i over the whole fragment, from worker i's report (before compression)
    tensor     // G_i per tensor of the fragment, from worker i's decoded delta; one detector per
               // worker and tensor, one set of weights per tensor
};

constexpr std::string_view to_string(edit_scope s) noexcept {
    switch (s) {
        case edit_scope::fragment: return "fragment";
        case edit_scope::tensor: return "tensor";
    }
    return "?";
}

struct edit {
    static constexpr std::string_view name = "edit";
    static constexpr std::string_view refusal = "every worker an outlier";

    // atorch's LocalSGDConfig defaults, except the switches the README example turns on
    // (norm weighting, anomaly rejection, GTA "sum"); no clipping unless phi is set (README: "usually
    // 1 or 10").
    struct hyper {
        bool weight_by_norm = true;      // pseudo_gradnorm_reduce: softmax(-G / T) weights
        float temperature = 1.0f;        // T (weight_softmax_temperature), > 0
        bool skip_anomaly = true;        // reject the detector's outliers
        float ewma_alpha = 0.02f;        // in (0, 1]
        std::uint64_t ewma_warmup = 120; // norms seen before anything is flagged
        float ewma_threshold = 3.0f;     // > 0
        sign_consensus consensus = sign_consensus::sum;  // GTAConfig(reducer="gta"); none = linear
        float clip = std::numeric_limits<float>::infinity();  // phi (clip_pseudo_grad), > 0
        bool step_weights = false;       // A-EDiT's use_step_weight
        float step_weight_ratio = 0.5f;  // r, in [0, 1]
        // fragment: the paper's rule on the fragment (the whole model for DiLoCo, a layer when the
        // layers are the fragments); tensor: the same rule on each tensor of the fragment, so a
        // worker off on one tensor loses its weight there only. The clip stays over the fragment.
        edit_scope scope = edit_scope::fragment;
    };

    static constexpr bool needs_reports = true;
    static constexpr bool needs_deltas = true;

    // One detector per worker.
    struct state {
        std::vector<ewma_detector> detectors;

        void save(loco::detail::checkpoint_writer& w) const {
            w.u64(detectors.size());
            for (const auto& d : detectors) {
                w.u64(d.count);
                w.u64(bits(d.mean));
                w.u64(bits(d.m2));
                w.u64(d.window.size());
                for (const double x : d.window) w.u64(bits(x));
            }
        }
        static state read(loco::detail::checkpoint_reader& r) {
            // The counts have no bound from the live model (per-tensor scope keeps M x tensors
            // detectors), so the arrays grow only with what the stream actually holds: a
            // corrupted count ends at a truncation, not at a huge allocation.
            state s;
            const std::uint64_t m = r.u64("the number of EDiT detectors");
            s.detectors.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(m, 1u << 16)));
            for (std::uint64_t i = 0; i < m; ++i) {
                ewma_detector d;
                d.count = r.u64("an EDiT detector's count");
                d.mean = from_bits(r.u64("an EDiT detector's mean"));
                d.m2 = from_bits(r.u64("an EDiT detector's M2"));
                const std::uint64_t k = r.u64("an EDiT detector's window length");
                for (std::uint64_t j = 0; j < k; ++j) {
                    d.window.push_back(from_bits(r.u64("an EDiT detector's z-score")));
                }
                s.detectors.push_back(std::move(d));
            }
            return s;
        }

    private:
        static std::uint64_t bits(double x) {
            std::uint64_t b;
            std::memcpy(&b, &x, sizeof b);
            return b;
        }
        static double from_bits(std::uint64_t b) {
            double x;
            std::memcpy(&x, &b, sizeof x);
            return x;
        }
    };

    static void validate(const hyper& h) {
        const std::string who = "loco::aggregate::edit: ";
        if (!(h.temperature > 0.0f) || !std::isfinite(h.temperature)) {
            throw invalid_argument(who + "temperature (T) must be a finite number > 0; 1 is atorch's default");
        }
        if (!(h.ewma_alpha > 0.0f && h.ewma_alpha <= 1.0f)) {
            throw invalid_argument(who + "ewma_alpha must be in (0, 1]; atorch uses 0.02");
        }
        if (!(h.ewma_threshold > 0.0f) || !std::isfinite(h.ewma_threshold)) {
            throw invalid_argument(who + "ewma_threshold must be a finite number > 0; atorch uses 3");
        }
        if (!(h.clip > 0.0f)) {
            throw invalid_argument(who + "clip (phi) must be > 0; leave it at infinity for no clipping");
        }
        if (!(h.step_weight_ratio >= 0.0f && h.step_weight_ratio <= 1.0f)) {
            throw invalid_argument(who + "step_weight_ratio (r) must be in [0, 1]; atorch uses 0.5");
        }
        if (h.consensus != sign_consensus::none && h.consensus != sign_consensus::sum &&
            h.consensus != sign_consensus::count) {
            throw invalid_argument(who + "consensus must be sign_consensus::none, sum or count");
        }
        if (h.scope != edit_scope::fragment && h.scope != edit_scope::tensor) {
            throw invalid_argument(who + "scope must be edit_scope::fragment or edit_scope::tensor");
        }
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " weight_by_norm=" << h.weight_by_norm << " T=" << h.temperature
           << " skip_anomaly=" << h.skip_anomaly << " alpha=" << h.ewma_alpha
           << " warmup=" << h.ewma_warmup << " threshold=" << h.ewma_threshold
           << " consensus=" << to_string(h.consensus) << " clip=" << h.clip
           << " step_weights=" << h.step_weights << " r=" << h.step_weight_ratio;
        if (h.scope != edit_scope::fragment) os << " scope=" << to_string(h.scope);  // as before
        return os.str();
    }

    // The weights of the round (0 for outliers), the detectors updated with the inliers; empty
    // when every worker is an outlier. Exposed for tests and for the CUDA backend, which runs the
    // same rule on the gathered norms.
    static std::vector<double> weights(const hyper& h, state& s, const contributions& c) {
        if (c.reports.size() != c.workers ||
            (!c.deltas.empty() && c.deltas.size() != c.workers * c.elements)) {
            throw shape_error("loco::aggregate::edit: expected a report from each of the " +
                              std::to_string(c.workers) + " workers (got " +
                              std::to_string(c.reports.size()) + ") and no deltas or " +
                              std::to_string(c.workers) + " x " + std::to_string(c.elements) +
                              " (got " + std::to_string(c.deltas.size()) + ")");
        }
        const std::size_t m = c.workers;
        // On a copy, swapped in at the end: a refusal below (step_weights without step counts)
        // leaves the detectors as they were, as the per-tensor scope does.
        std::vector<ewma_detector> detectors = s.detectors;
        if (detectors.size() != m) detectors.assign(m, {});
        std::vector<double> norms(m);
        std::vector<std::uint8_t> finite(m, 1);
        for (std::size_t i = 0; i < m; ++i) {
            norms[i] = c.reports[i].norm;
            if (!c.deltas.empty()) {
                for (const float x : c.delta(i)) finite[i] = finite[i] && std::isfinite(x);
            }
        }
        std::vector<double> w = weights_of(h, detectors, norms, finite, c);
        s.detectors.swap(detectors);
        return w;
    }

    // The rule on given norms (finite[i] == 0: worker i's delta holds a NaN or an infinity), with
    // one detector per worker; step counts from c.reports.
    static std::vector<double> weights_of(const hyper& h, std::span<ewma_detector> detectors,
                                          std::span<const double> norms,
                                          std::span<const std::uint8_t> finite,
                                          const contributions& c) {
        const std::size_t m = c.workers;
        if (detectors.size() != m || norms.size() != m || finite.size() != m ||
            (h.step_weights && c.reports.size() != m)) {
            throw shape_error("loco::aggregate::edit: weights_of " + std::to_string(m) +
                              " workers needs as many detectors, norms, finiteness flags (and "
                              "reports with step_weights); got " +
                              std::to_string(detectors.size()) + ", " +
                              std::to_string(norms.size()) + ", " +
                              std::to_string(finite.size()) + " (" +
                              std::to_string(c.reports.size()) + ")");
        }
        std::vector<bool> inlier(m, true);
        for (std::size_t i = 0; i < m; ++i) {
            const double g = norms[i];
            // A negative report is no norm (an honest worker cannot send one) and would take the
            // largest softmax weight: an outlier, as a non-finite one.
            bool ok = std::isfinite(g) && g >= 0.0 && finite[i] != 0;
            // Likewise a step count that is no count (infinite, NaN or negative): an infinite one
            // made every weight NaN (the sync then dropped as non-finite on every rank); NaN and
            // negative ones were counted as 0 steps, as if the worker had reported a count. A
            // finite count is taken on trust, as the paper does.
            if (ok && h.step_weights) {
                const double steps = c.reports[i].inner_steps;
                ok = std::isfinite(steps) && steps >= 0.0;
            }
            if (ok && h.skip_anomaly) {
                ok = !detectors[i].is_outlier(g, h.ewma_warmup, h.ewma_threshold);
            }
            inlier[i] = ok;
        }
        std::vector<double> w(m, 0.0);
        std::size_t kept = 0;
        double lowest = std::numeric_limits<double>::infinity();
        for (std::size_t i = 0; i < m; ++i) {
            if (!inlier[i]) continue;
            ++kept;
            lowest = std::min(lowest, norms[i]);
            if (h.skip_anomaly) detectors[i].update(norms[i], h.ewma_alpha, h.ewma_warmup);
        }
        if (kept == 0) return {};
        double total = 0.0;
        for (std::size_t i = 0; i < m; ++i) {
            if (!inlier[i]) continue;
            // Shifted by the smallest norm: the same softmax, no underflow to 0/0.
            w[i] = h.weight_by_norm ? std::exp(-(norms[i] - lowest) / h.temperature) : 1.0;
            total += w[i];
        }
        for (auto& x : w) x /= total;
        if (h.step_weights) {
            double steps = 0.0;
            for (std::size_t i = 0; i < m; ++i) {
                if (inlier[i]) steps += static_cast<double>(c.reports[i].inner_steps);
            }
            if (!(steps > 0.0)) {
                throw invalid_argument("loco::aggregate::edit: step_weights needs step counts but "
                                       "every inlier reported 0 inner steps; turn step_weights off "
                                       "or sync after some steps");
            }
            const double r = h.step_weight_ratio;
            for (std::size_t i = 0; i < m; ++i) {
                if (!inlier[i]) continue;
                const double si = static_cast<double>(c.reports[i].inner_steps) / steps;
                w[i] = (1.0 - r) * w[i] + r * si;
            }
        }
        return w;
    }

    static bool combine(const hyper& h, state& s, const contributions& c, std::span<float> out) {
        check_contributions(c, out.size(), true, "loco::aggregate::edit: ");
        if (h.scope == edit_scope::tensor) {
            if (!combine_per_tensor(h, s, c, out)) return false;
        } else {
            const std::vector<double> w = weights(h, s, c);
            if (w.empty()) return false;  // every worker an outlier: atorch skips the outer update
            gta_reduce(w, c.deltas, c.elements, h.consensus, out);
        }
        if (std::isfinite(h.clip)) {
            double sq = 0.0;
            for (const float x : out) sq += static_cast<double>(x) * x;
            const double scale = rule::norm_clip_scale(sq, h.clip);
            if (scale < 1.0) {
                for (auto& x : out) x = rule::scaled(x, scale);
            }
        }
        return true;
    }

    // scope == tensor: each tensor (segment) of the fragment weighted on its own, G_i the L2 norm
    // (in double) of worker i's decoded delta over the tensor, detector m * t + i for worker i and
    // tensor t. Every worker an outlier on one tensor refuses the round; the detectors advance
    // only when the round is kept.
    static bool combine_per_tensor(const hyper& h, state& s, const contributions& c,
                                   std::span<float> out) {
        const std::size_t m = c.workers;
        const compress::segment whole{.offset = 0, .size = c.elements, .rows = 1, .cols = c.elements};
        const std::span<const compress::segment> segs =
            c.segments.empty() ? std::span<const compress::segment>(&whole, 1) : c.segments;
        std::vector<ewma_detector> detectors = s.detectors;
        if (detectors.size() != m * segs.size()) detectors.assign(m * segs.size(), {});
        std::vector<double> norms(m);
        std::vector<std::uint8_t> finite(m);
        std::vector<float> rows;
        for (std::size_t t = 0; t < segs.size(); ++t) {
            const compress::segment& seg = segs[t];
            rows.resize(m * seg.size);
            for (std::size_t i = 0; i < m; ++i) {
                const auto d = c.delta(i).subspan(seg.offset, seg.size);
                double sq = 0.0;
                for (const float x : d) sq += static_cast<double>(x) * x;
                norms[i] = std::sqrt(sq);
                finite[i] = std::isfinite(sq) ? 1 : 0;
                std::copy(d.begin(), d.end(), rows.begin() + static_cast<std::ptrdiff_t>(i * seg.size));
            }
            const std::vector<double> w = weights_of(
                h, std::span<ewma_detector>(detectors).subspan(t * m, m), norms, finite, c);
            if (w.empty()) return false;
            gta_reduce(w, rows, seg.size, h.consensus, out.subspan(seg.offset, seg.size));
        }
        s.detectors = std::move(detectors);
        return true;
    }
};

}  // namespace loco::aggregate
