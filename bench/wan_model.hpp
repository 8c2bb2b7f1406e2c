#pragma once
// A small model of compute utilisation over a wide-area link: how much of the wall time a worker
// spends computing when its syncs cross a link of a given bandwidth and latency. It turns the
// bytes a sync sends (counted by loco: bytes_per_sync(), peak_bytes_per_sync(), or per fragment)
// and the time of one inner step into a utilisation, for data parallelism, DiLoCo, Streaming
// DiLoCo, streaming with overlap and streaming with overlap and 4-bit payloads (the columns of
// Streaming DiLoCo's Table 4, arXiv 2501.18512). docs/wan.md derives it and compares it with the
// paper; bench/wan_projection.cpp prints the tables and the plot data; tests/wan_model_test.cpp
// checks it against closed forms.
//
// The step. One inner step takes C seconds: a forward pass of f C (f = 1/3: the backward costs
// twice the forward) and a backward pass through L equal layers, last layer first, each taking
// b = (1 - f) C / L, so layer l (0 = the first) is done at r_l = f C + (L - l) b. A layer's
// gradient (data parallelism) or pseudo-gradient (the outer methods, on the step that syncs) can
// be sent from then on: a sync is a list of pieces (layer l, bytes), and the pieces queue on the
// link one after another in the order they become ready, each taking
//   t = latency + 8 bytes / bandwidth
// (each piece is one collective). The sync ends when its last piece does; it holds the next step
// back by the exposed time E = max(0, end - C). For a sync of all L layers with equal pieces the
// queue's end is max over j of (f C + j b + (L - j + 1) t) = f C + max(L b + t, b + L t), so
//   E = t + (L - 1) max(0, t - b).
// A fragment of Streaming DiLoCo holds some layers (strided: p, p + P, p + 2 P, ...): its
// pieces are ready at their layers' times, so a fragment whose lowest layer is p still has p
// layers of backward to hide behind. With an overlap of tau inner steps the exchange may also
// travel during the next tau steps: E_tau = max(0, E - tau C).
//
// Utilisation over one period of H steps (every fragment synced once, one at a time):
//   data parallelism   U = C / (C + E(whole model))                       (a sync every step)
//   DiLoCo             U = H C / (H C + E(whole model))
//   streaming          U = H C / (H C + sum_p E_tau(fragment p))          tau = 0: no overlap
// The model assumes the link carries nothing else (one fragment in flight: tau < H / P), that the
// outer step's own compute is free, and that every worker is equally fast.

#include <loco/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace loco_bench::wan {

struct link {
    double bits_per_second = 1e9;
    double latency = 0.0;  // seconds, paid by each collective (one per piece of a sync)
};

struct step_model {
    double seconds = 0.1;               // C: compute time of one inner step
    std::size_t layers = 12;            // L
    double forward_fraction = 1.0 / 3;  // f: the forward pass's share of the step
};

// One collective of a sync: the bytes each worker sends for layer `layer`'s tensors.
struct piece {
    std::size_t layer = 0;
    double bytes = 0;
};
// A whole-model sync or one fragment's.
using sync_bytes = std::vector<piece>;

// `bytes` spread evenly over the given layers.
inline sync_bytes spread(double bytes, const std::vector<std::size_t>& layers) {
    sync_bytes s;
    for (const std::size_t l : layers) s.push_back({l, bytes / static_cast<double>(layers.size())});
    return s;
}
inline std::vector<std::size_t> all_layers(std::size_t count) {
    std::vector<std::size_t> v(count);
    for (std::size_t l = 0; l < count; ++l) v[l] = l;
    return v;
}
// Layers p, p + P, p + 2 P, ...: fragment p of P under the strided pattern.
inline std::vector<std::size_t> strided_layers(std::size_t p, std::size_t fragments,
                                               std::size_t count) {
    std::vector<std::size_t> v;
    for (std::size_t l = p; l < count; l += fragments) v.push_back(l);
    return v;
}

// The exposed time E of a sync: how long it holds the next step back beyond the backward pass.
inline double exposed(const sync_bytes& s, const step_model& c, const link& l) {
    if (!(l.bits_per_second > 0)) {
        throw loco::invalid_argument("wan: the link's bits_per_second must be > 0");
    }
    if (c.layers == 0) throw loco::invalid_argument("wan: the step model needs layers >= 1");
    const double layers = static_cast<double>(c.layers);
    const double f = c.forward_fraction * c.seconds;
    const double b = (1.0 - c.forward_fraction) * c.seconds / layers;
    std::vector<std::pair<double, double>> queue;  // (ready, seconds on the link)
    for (const piece& p : s) {
        if (p.layer >= c.layers) {
            throw loco::invalid_argument("wan: a piece names layer " + std::to_string(p.layer) +
                                         " but the step model has " + std::to_string(c.layers) +
                                         " layers; raise step_model::layers or fix the piece");
        }
        queue.push_back({f + (layers - static_cast<double>(p.layer)) * b,
                         l.latency + 8.0 * p.bytes / l.bits_per_second});
    }
    std::sort(queue.begin(), queue.end());
    double end = 0;
    for (const auto& [ready, seconds] : queue) end = std::max(end, ready) + seconds;
    return std::max(0.0, end - c.seconds);
}

// A method: the collectives of each sync (one sync per fragment; one for the whole model), every
// fragment synced once per `every` steps, each allowed to travel `overlap` further steps before
// it blocks. Data parallelism: one whole-model sync, every = 1, overlap 0.
struct method {
    std::vector<sync_bytes> syncs;
    std::uint64_t every = 100;  // H
    std::uint64_t overlap = 0;  // tau
};

inline double utilisation(const method& m, const step_model& c, const link& l) {
    if (m.every == 0) throw loco::invalid_argument("wan: a method's every (H) must be >= 1");
    const double compute = static_cast<double>(m.every) * c.seconds;
    double stalled = 0;
    for (const sync_bytes& s : m.syncs) {
        stalled += std::max(0.0, exposed(s, c, l) - static_cast<double>(m.overlap) * c.seconds);
    }
    return compute / (compute + stalled);
}

// The bandwidth (bit/s) at which the method reaches utilisation `target` (in (0, 1)), found by
// bisection on a log scale between 1 kbit/s and 1 Pbit/s (utilisation grows with bandwidth).
// Returns +inf when even 1 Pbit/s is not enough (latency alone can cap the utilisation).
inline double bandwidth_for(const method& m, const step_model& c, double target,
                            double latency = 0.0) {
    if (!(target > 0 && target < 1)) {
        throw loco::invalid_argument("wan: the target utilisation must be in (0, 1)");
    }
    double lo = 1e3, hi = 1e15;
    if (utilisation(m, c, {hi, latency}) < target) return INFINITY;
    if (utilisation(m, c, {lo, latency}) >= target) return lo;
    for (int i = 0; i < 200; ++i) {
        const double mid = std::sqrt(lo * hi);
        (utilisation(m, c, {mid, latency}) >= target ? hi : lo) = mid;
    }
    return hi;
}

// The bandwidth grid Streaming DiLoCo's Table 4 reads its values from: 50 points spaced evenly
// in log10 from 0.1 to 1000 Gbit/s (ratio 10^(4/49) = 1.2068; 86.8, 104.8, ..., 569.0 are points
// of it). Returns the smallest grid point >= gbits (inf above the grid).
inline double paper_grid_ceil(double gbits) {
    for (int k = 0; k < 50; ++k) {
        const double g = std::pow(10.0, -1.0 + 4.0 * k / 49.0);
        if (g >= gbits * (1 - 1e-12)) return g;
    }
    return INFINITY;
}

}  // namespace loco_bench::wan
