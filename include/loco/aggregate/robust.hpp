#pragma once
// Aggregations that a few faulty or malicious workers cannot steer (algorithms.md section 12):
//
//   trimmed_mean   per coordinate, drop the b largest and b smallest values, average the rest
//                  (Yin, Chen, Ramchandran, Bartlett, ICML 2018); needs b >= f and 2b < M
//   median         per coordinate, the median (the mean of the two middle values for an even
//                  count); same paper; breakdown point f < M / 2
//   centered_clip  start from the last round's aggregate v and iterate L times
//                  v <- v + (1/M) sum_i (Delta_i - v) min(1, tau / ||Delta_i - v||)
//                  (Karimireddy, He, Jaggi, ICML 2021); its state is v
//
// Each needs every worker's decoded pseudo-gradient, so the exchange is an all-gather of the
// (compressed) payloads: (M - 1) payloads received per rank, against about 2 (M - 1) / M of one
// payload for the fp32 ring all-reduce of `mean`. Every rank runs the rule on the same gathered
// deltas, so every rank gets the same aggregate without a server. A worker whose delta holds a
// NaN or an infinity is left out (trimmed_mean and median over the others; centered_clip counts
// it as agreeing with v; trimmed_mean trims b - k at each end with k workers left out, since those
// are known bad); no usable worker refuses the round. docs/aggregation.md.

#include <loco/aggregate/aggregate.hpp>
#include <loco/aggregate/rules.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>

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

namespace robust_detail {

// The workers whose delta is finite everywhere.
inline std::vector<std::size_t> finite_workers(const contributions& c) {
    std::vector<std::size_t> ok;
    for (std::size_t k = 0; k < c.workers; ++k) {
        bool finite = true;
        for (const float x : c.delta(k)) finite = finite && std::isfinite(x);
        if (finite) ok.push_back(k);
    }
    return ok;
}

// out[j] = the mean of the sorted values of coordinate j over `rows`, from index lo to hi - 1.
inline void sorted_mean(const contributions& c, const std::vector<std::size_t>& rows,
                        std::size_t lo, std::size_t hi, std::span<float> out) {
    std::vector<double> v(rows.size());
    for (std::size_t j = 0; j < c.elements; ++j) {
        for (std::size_t k = 0; k < rows.size(); ++k) v[k] = c.delta(rows[k])[j];
        rule::sort_ascending(v.data(), v.size());
        out[j] = rule::window_mean(v.data(), lo, hi);
    }
}

}  // namespace robust_detail

struct trimmed_mean {
    static constexpr std::string_view name = "trimmed_mean";
    static constexpr std::string_view refusal = "no worker's delta was finite";
    struct hyper {
        std::uint64_t trim = 1;  // b, values dropped at each end; set it >= the faulty workers f
    };
    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = true;

    static std::string describe(const hyper& h) { return "trimmed_mean b=" + std::to_string(h.trim); }

    // The sorted positions [lo, hi) averaged per coordinate among `usable` finite workers of
    // `workers`; lo == hi refuses the round (no usable worker). Throws when 2b >= M.
    // The k = workers - usable left out are known bad: of the f <= b bad workers at most b - k
    // remain among the usable ones, so b - k are trimmed at each end (none once k >= b), and the
    // window keeps M - 2b + k >= 1 values. Trimming b again refused every round of M = 2b + 1
    // workers with one NaN worker (f = 1 <= b). Shared with the CUDA backend, which sorts on the
    // device.
    static std::pair<std::size_t, std::size_t> window(const hyper& h, std::size_t workers,
                                                      std::size_t usable) {
        // 2b >= M, written so that no b overflows it
        if (workers == 0 || h.trim > (workers - 1) / 2) {
            throw invalid_argument("loco::aggregate::trimmed_mean: trimming b = " +
                                   std::to_string(h.trim) + " values at each end of " +
                                   std::to_string(workers) +
                                   " workers leaves none; choose 2b < M");
        }
        if (usable == 0 || usable > workers) return {0, 0};
        const std::size_t left_out = workers - usable;
        const std::size_t b = h.trim > left_out ? h.trim - left_out : 0;
        return {b, usable - b};  // usable - 2b = M - 2 trim + left_out >= 1 (2 trim < M)
    }

    static bool combine(const hyper& h, const contributions& c, std::span<float> out) {
        window(h, c.workers, c.workers);  // the configuration error first
        check_contributions(c, out.size(), false, "loco::aggregate::trimmed_mean: ");
        const auto rows = robust_detail::finite_workers(c);
        const auto [lo, hi] = window(h, c.workers, rows.size());
        if (lo == hi) return false;
        robust_detail::sorted_mean(c, rows, lo, hi, out);
        return true;
    }
};

struct median {
    static constexpr std::string_view name = "median";
    static constexpr std::string_view refusal = "no worker's delta was finite";
    struct hyper {};
    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = true;

    // The sorted positions [lo, hi) averaged among `usable` finite workers: the middle one or
    // two; lo == hi (no usable worker) refuses the round. Shared with the CUDA backend.
    static std::pair<std::size_t, std::size_t> window(std::size_t usable) {
        if (usable == 0) return {0, 0};
        return {(usable - 1) / 2, usable / 2 + 1};
    }

    static bool combine(const hyper&, const contributions& c, std::span<float> out) {
        check_contributions(c, out.size(), false, "loco::aggregate::median: ");
        const auto rows = robust_detail::finite_workers(c);
        const auto [lo, hi] = window(rows.size());
        if (lo == hi) return false;
        robust_detail::sorted_mean(c, rows, lo, hi, out);
        return true;
    }
};

struct centered_clip {
    static constexpr std::string_view name = "centered_clip";
    static constexpr std::string_view refusal = "no worker's delta was finite";
    struct hyper {
        float tau = 1.0f;              // clipping radius around v, > 0 (in pseudo-gradient units)
        std::uint64_t iterations = 1;  // L, in [1, max_iterations]; 1 is the paper's usual choice
    };
    // The most iterations validate() accepts, far above the paper's 1 (or a few): each costs a
    // pass over every worker's delta on every rank, so a wrapped -1 (2^64 - 1) or a mistyped
    // count stalled every rank's sync without an error.
    static constexpr std::uint64_t max_iterations = 100;
    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = true;

    // v, the last aggregate (empty: 0 before the first round).
    struct state {
        std::vector<float> center;
        void save(loco::detail::checkpoint_writer& w) const {
            w.u64(center.size());
            w.floats(center);
        }
        static state read(loco::detail::checkpoint_reader& r) {
            state s;
            const std::uint64_t n = r.u64("the centered clipping center's length");
            s.center = r.float_vector(n, "the centered clipping center");
            return s;
        }
        // After read(), against the live fragment: empty (before the first round) or one value
        // per element. combine() would otherwise start another length from zeros without a word.
        void check_loaded(std::size_t elements, std::size_t /*workers*/,
                          std::size_t /*tensors*/) const {
            if (!center.empty() && center.size() != elements) {
                throw checkpoint_error("loco: the checkpoint's centered clipping center holds " +
                                       std::to_string(center.size()) +
                                       " elements but the fragment has " +
                                       std::to_string(elements) +
                                       "; load a checkpoint of this model with the same fragments");
            }
        }
    };

    static void validate(const hyper& h) {
        if (!(h.tau > 0.0f) || !std::isfinite(h.tau)) {
            throw invalid_argument("loco::aggregate::centered_clip: tau must be a finite number > 0 "
                                   "(about the honest workers' spread of pseudo-gradient norms)");
        }
        if (h.iterations == 0 || h.iterations > max_iterations) {
            throw invalid_argument("loco::aggregate::centered_clip: iterations (L) must be in [1, " +
                                   std::to_string(max_iterations) + "], got " +
                                   std::to_string(h.iterations));
        }
    }
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << " tau=" << h.tau << " L=" << h.iterations;
        return os.str();
    }

    static bool combine(const hyper& h, state& s, const contributions& c, std::span<float> out) {
        validate(h);  // the loop below runs h.iterations times
        check_contributions(c, out.size(), false, "loco::aggregate::centered_clip: ");
        const std::size_t n = c.elements;
        if (s.center.size() != n) s.center.assign(n, 0.0f);
        const auto rows = robust_detail::finite_workers(c);
        if (rows.empty()) return false;
        std::vector<double> v(s.center.begin(), s.center.end()), step(n);
        const double m = static_cast<double>(c.workers);
        for (std::uint64_t l = 0; l < h.iterations; ++l) {
            std::fill(step.begin(), step.end(), 0.0);
            for (const std::size_t k : rows) {
                const auto d = c.delta(k);
                double sq = 0.0;
                for (std::size_t j = 0; j < n; ++j) sq += (d[j] - v[j]) * (d[j] - v[j]);
                const double norm = std::sqrt(sq);
                const double scale = rule::radius_scale(norm, h.tau);
                for (std::size_t j = 0; j < n; ++j) step[j] += rule::centered_term(d[j], v[j], scale);
            }
            for (std::size_t j = 0; j < n; ++j) v[j] += step[j] / m;
        }
        for (std::size_t j = 0; j < n; ++j) {
            out[j] = static_cast<float>(v[j]);
            s.center[j] = out[j];
        }
        return true;
    }
};

}  // namespace loco::aggregate
