// Tests of SparseLoCo's aggregation and outer step, and of DeMo's sign-SGD outer step:
//
//   * one SparseLoCo round of four workers on a fixed 128 x 128 input (plus a bias) through
//     loco::diloco, against a double-precision re-computation of templar's miner and outer step
//     (derivation below), with the bytes per sync equal to the formula;
//   * aggregate::median_norm_clip's combine on random inputs against a double-precision
//     re-computation (lower median for even M, scatter-mean counts, clip off, non-finite input);
//   * outer::sign_sgd against DeMo's rule;
//   * bad settings and inputs refused with one-sentence errors, nothing written;
//   * compress::sparseloco::decode_support fuzzed: refused exactly when decode refuses, never
//     writing a refused output, the kept cells otherwise.
#include <doctest/doctest.h>

#include "support/chunked_reference.hpp"
#include "support/payloads.hpp"
#include "support/random.hpp"

#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/comm/single.hpp>
#include <loco/comm/threads.hpp>
#include <loco/compress/error_feedback.hpp>
#include <loco/compress/none.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/compress/topk.hpp>
#include <loco/compress/wire.hpp>
#include <loco/diloco.hpp>
#include <loco/error.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/outer/sign_sgd.hpp>
#include <loco/params.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace lc = loco::compress;
namespace wire = loco::compress::wire;
namespace ref = loco_test::chunked;
using sl = lc::sparseloco;
using mnc = loco::aggregate::median_norm_clip;

double round_half_even(double t) {
    const double low = std::floor(t);
    const double frac = t - low;
    if (frac != 0.5) return frac < 0.5 ? low : low + 1;
    return std::fmod(low, 2.0) == 0.0 ? low : low + 1;
}

// templar's compress + decompress of one tensor's accumulator e (rows x cols, rows = 1 for a
// flat tensor), in double (compress.py: ChunkingTransformer.encode without DCT, _clamp_topk,
// topk, _quantize_values, _dequantize_values, decompress). Returns the decoded tensor; `sent`
// gets 1 at the kept cells. `margin_ok` turns false when a selection or a code is in doubt
// (within 1e-6 of a tie or a rounding boundary), so that the caller can refuse its input.
std::vector<double> templar_round(const std::vector<double>& e, std::size_t rows, std::size_t cols,
                                  std::vector<std::uint8_t>& sent, bool& margin_ok) {
    const ref::chunk_list cl = ref::chunks(rows, cols, 64);
    const std::size_t cells = cl.h * cl.w;
    std::size_t k = std::min<std::size_t>(64, cells);
    k = std::max<std::size_t>(k, 2);
    k -= k % 2;
    std::vector<std::size_t> pos;
    std::vector<double> val;
    for (const auto& chunk : cl.cells) {
        std::vector<double> v;
        for (const std::size_t i : chunk) v.push_back(e[i]);
        if (k < cells && ref::selection_margin(v, k) <= 1e-6) margin_ok = false;
        for (const std::size_t j : ref::top_k(v, k)) {
            pos.push_back(chunk[j]);
            val.push_back(v[j]);
        }
    }
    const double n = static_cast<double>(val.size());
    double sum = 0;
    for (const double v : val) sum += v;
    const double shift = sum / n;
    double squares = 0;
    for (const double v : val) squares += (v - shift) * (v - shift);
    double scale = 6.0 * std::sqrt(squares / (n - 1)) / 4;
    if (scale == 0) scale = 1;
    std::vector<int> q(val.size());
    std::array<double, 4> bin_sum{};
    std::array<int, 4> bin_count{};
    for (std::size_t j = 0; j < val.size(); ++j) {
        const double t = std::clamp((val[j] - shift) / scale + 2, 0.0, 3.0);
        if (std::abs(t - std::floor(t) - 0.5) < 1e-6) margin_ok = false;
        q[j] = static_cast<int>(round_half_even(t));
        bin_sum[std::size_t(q[j])] += val[j] - shift;
        ++bin_count[std::size_t(q[j])];
    }
    std::vector<double> out(e.size(), 0.0);
    sent.assign(e.size(), 0);
    for (std::size_t j = 0; j < val.size(); ++j) {
        const auto b = std::size_t(q[j]);
        out[pos[j]] = bin_sum[b] / bin_count[b] + shift;
        sent[pos[j]] = 1;
    }
    return out;
}

// templar's outer_step for one tensor: batch_decompress(clip_norm=True) then decompress, in
// double: norms of each peer's decoded values, their lower median (torch.median), the factor
// min(median / (norm + 1e-8), 1), and the mean over the peers that sent each element.
std::vector<double> templar_aggregate(const std::vector<std::vector<double>>& d,
                                      const std::vector<std::vector<std::uint8_t>>& sent,
                                      bool clip = true, double eps = 1e-8) {
    const std::size_t m = d.size(), n = d[0].size();
    std::vector<double> norms(m, 0.0);
    for (std::size_t k = 0; k < m; ++k) {
        for (std::size_t i = 0; i < n; ++i) norms[k] += d[k][i] * d[k][i];
        norms[k] = std::sqrt(norms[k]);
    }
    std::vector<double> sorted = norms;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[(m - 1) / 2];
    std::vector<double> out(n, 0.0);
    for (std::size_t i = 0; i < n; ++i) {
        double sum = 0;
        int count = 0;
        for (std::size_t k = 0; k < m; ++k) {
            if (!sent[k].empty() && sent[k][i] == 0) continue;
            const double f = clip ? std::min(median / (norms[k] + eps), 1.0) : 1.0;
            sum += f * d[k][i];
            ++count;
        }
        out[i] = count == 0 ? 0.0 : sum / count;
    }
    return out;
}

// A fixed pseudo-gradient of worker r: a part common to all workers (so that their kept cells
// overlap) and one of its own, with no near-ties; worker 3 is an outlier 8x larger, which the
// median clips.
float fixed_grad(int r, std::size_t i, std::size_t j) {
    const double di = static_cast<double>(i), dj = static_cast<double>(j), dr = r;
    const double scale = r == 3 ? 8.0 : 1.0 + 0.25 * dr;
    const double common = std::sin(1.3 * di + 0.7 * dj + 0.01 * di * dj) *
                          (1.0 + static_cast<double>((i * j) % 7) / 7.0);
    return static_cast<float>(scale * (common + 0.6 * std::sin(0.9 * di - 0.4 * dj + 1.1 * dr)));
}

}  // namespace

// One SparseLoCo round as templar runs it, for a 128 x 128 weight and a bias of 96, four workers
// (hparams.json: momentum_decay 0.95, outer_learning_rate 1, topk_compression 64, target_chunk 64,
// use_dct false, quantization_bins 4, quantization_range 6; the outer optimizer
// SGD(lr = outer_learning_rate), trainer.py):
//
//   every worker starts at w = 0, takes one inner SGD step of lr 1 on its gradient g_r and syncs
//   (H = 1), so its pseudo-gradient is global - local = 0 - (0 - g_r) = g_r exactly;
//   miner (neurons.py):  e_r = 0.95 * 0 + 1 * g_r; idx, val = topk of each 64 x 64 chunk
//                        (the bias: _get_smaller_split(96, 64) = 48, two flat chunks of 48, k = 48,
//                        every value kept); quantize, decompress: D_r; e_r -= D_r
//   outer_step, per tensor: norms n_r = ||D_r||, median = the lower median of the four (torch
//                        .median: the 2nd smallest), D_r scaled by min(median / (n_r + 1e-8), 1),
//                        scatter_reduce "mean" include_self=False over the peers that sent each
//                        element; p.grad = that; SGD(lr 1): w = 0 - 1 * grad.
TEST_CASE("median_norm_clip: one SparseLoCo round of four workers on a fixed 128 x 128 input "
          "matches a double-precision re-computation of templar's outer step") {
    constexpr int m = 4;
    constexpr std::size_t rows = 128, cols = 128, bias = 96;
    std::array<std::vector<float>, m> final_w, final_b, residual;
    std::array<std::uint64_t, m> per_sync{}, agreement{}, counted{};
    loco::comm::run_threads(m, [&](loco::comm::communicator& comm) {
        const int r = comm.rank();
        std::vector<float> w(rows * cols, 0.0f), gw(rows * cols), b(bias, 0.0f), gb(bias);
        for (std::size_t i = 0; i < rows; ++i) {
            for (std::size_t j = 0; j < cols; ++j) gw[i * cols + j] = fixed_grad(r, i, j);
        }
        for (std::size_t j = 0; j < bias; ++j) gb[j] = 0.5f * fixed_grad(r, 200, j);
        loco::parameter_list params;
        params.add_views("w", loco::host_matrix(w.data(), rows, cols),
                         loco::host_matrix(static_cast<const float*>(gw.data()), rows, cols));
        params.add("b", b, gb);
        loco::diloco<loco::inner::sgd, loco::outer::sgd, sl, loco::schedule::every, mnc> opt(
            params, comm, {.inner = {.lr = 1.0f}, .schedule = {.every = 1}});
        opt.start();
        const std::uint64_t before = comm.bytes_sent();
        CHECK(opt.step().synced);
        counted[std::size_t(r)] = comm.bytes_sent() - before;
        final_w[std::size_t(r)] = w;
        final_b[std::size_t(r)] = b;
        const auto st = opt.compressor_state();
        residual[std::size_t(r)].assign(st.begin(), st.end());
        per_sync[std::size_t(r)] = opt.bytes_per_sync();
        agreement[std::size_t(r)] = opt.agreement_bytes_per_sync();
    });

    // The reference, tensor by tensor.
    bool margin_ok = true;
    std::vector<std::vector<double>> dw(m), db(m);
    std::vector<std::vector<std::uint8_t>> sw(m), sb(m);
    for (int r = 0; r < m; ++r) {
        std::vector<double> ew(rows * cols), eb(bias);
        for (std::size_t i = 0; i < rows; ++i) {
            for (std::size_t j = 0; j < cols; ++j) ew[i * cols + j] = fixed_grad(r, i, j);
        }
        for (std::size_t j = 0; j < bias; ++j) eb[j] = 0.5f * fixed_grad(r, 200, j);
        dw[std::size_t(r)] = templar_round(ew, rows, cols, sw[std::size_t(r)], margin_ok);
        db[std::size_t(r)] = templar_round(eb, 1, bias, sb[std::size_t(r)], margin_ok);
        // The accumulator keeps what was not sent.
        for (std::size_t i = 0; i < rows * cols; ++i) {
            const double want = ew[i] - dw[std::size_t(r)][i];
            CHECK(std::abs(residual[std::size_t(r)][i] - want) <= 1e-5 * (1 + std::abs(ew[i])));
        }
    }
    REQUIRE(margin_ok);  // a fixed input: no selection or code is in doubt
    const auto gw = templar_aggregate(dw, sw);
    const auto gb = templar_aggregate(db, sb);

    // The clip acts: worker 3's norm is above the median, the others' are not all equal to it.
    std::vector<double> norms;
    for (const auto& d : dw) {
        double s = 0;
        for (const double v : d) s += v * v;
        norms.push_back(std::sqrt(s));
    }
    CHECK(norms[3] > 2 * norms[0]);
    std::size_t overlap = 0;  // elements sent by more than one worker
    for (std::size_t i = 0; i < rows * cols; ++i) {
        overlap += (sw[0][i] + sw[1][i] + sw[2][i] + sw[3][i]) > 1 ? 1 : 0;
    }
    CHECK(overlap > 0);

    double largest = 0;
    for (const double v : gw) largest = std::max(largest, std::abs(v));
    for (int r = 0; r < m; ++r) {
        std::size_t bad = 0;
        for (std::size_t i = 0; i < rows * cols; ++i) {
            bad += std::abs(final_w[std::size_t(r)][i] - (-gw[i])) > 2e-6 * largest ? 1 : 0;
        }
        for (std::size_t j = 0; j < bias; ++j) {
            bad += std::abs(final_b[std::size_t(r)][j] - (-gb[j])) > 1e-6 * (1 + std::abs(gb[j]))
                       ? 1 : 0;
        }
        CHECK(bad == 0);
        // Every worker holds the same parameters, bit for bit.
        CHECK(final_w[std::size_t(r)] == final_w[0]);
    }

    // Bytes per sync: the all-gather of M - 1 payloads plus the agreement (nothing else), as
    // documented and as the communicator counted them.
    const std::vector<lc::segment> segs = {{0, rows * cols, rows, cols},
                                           {rows * cols, bias, 1, bias}};
    const std::size_t payload = sl::payload_bytes({}, segs);
    // 40 header; w: 20 + 4 chunks x 511 bits of Elias-Fano indices (256) + 256 codes x 2 bits
    // (64); b: 20 + no indices (two chunks of 48 cells, all kept) + 96 codes x 2 bits (24).
    CHECK(payload == 40 + (20 + 256 + 64) + (20 + 0 + 24));
    for (int r = 0; r < m; ++r) {
        CHECK(per_sync[std::size_t(r)] == (m - 1) * payload + agreement[std::size_t(r)]);
        CHECK(counted[std::size_t(r)] == per_sync[std::size_t(r)]);  // what the link carried
    }
}

TEST_CASE("median_norm_clip: combine on random inputs matches a double-precision "
          "re-computation") {
    auto rng = loco_test::rng_for("median_norm_clip combine");
    for (int trial = 0; trial < 60; ++trial) {
        const std::size_t m = 1 + rng() % 6;
        const std::size_t nseg = 1 + rng() % 3;
        std::vector<lc::segment> segs;
        std::size_t n = 0;
        for (std::size_t s = 0; s < nseg; ++s) {
            const std::size_t size = rng() % 40;  // empty segments too
            segs.push_back({n, size, 1, size});
            n += size;
        }
        const bool sparse = rng() % 2 == 0;
        const bool clip = rng() % 4 != 0;
        std::vector<float> deltas(m * n);
        std::vector<std::uint8_t> sent(sparse ? m * n : 0);
        for (std::size_t k = 0; k < m; ++k) {
            const float scale = std::exp2(static_cast<float>(rng() % 8) - 2.0f);
            const auto v = loco_test::normal_floats(rng, n, scale);
            for (std::size_t i = 0; i < n; ++i) {
                const bool on = !sparse || rng() % 3 == 0;
                if (sparse) sent[k * n + i] = on ? 1 : 0;
                deltas[k * n + i] = on ? v[i] : 0.0f;
            }
        }
        loco::aggregate::contributions c;
        c.workers = m;
        c.elements = n;
        c.deltas = deltas;
        c.segments = segs;
        c.sent = sent;
        std::vector<float> out(n, 7.0f);
        mnc::combine({.clip = clip}, c, out);
        for (const auto& s : segs) {
            std::vector<std::vector<double>> d(m);
            std::vector<std::vector<std::uint8_t>> se(m);
            for (std::size_t k = 0; k < m; ++k) {
                for (std::size_t i = s.offset; i < s.offset + s.size; ++i) {
                    d[k].push_back(deltas[k * n + i]);
                    if (sparse) se[k].push_back(sent[k * n + i]);
                }
            }
            if (s.size == 0) continue;
            const auto want = templar_aggregate(d, se, clip);
            for (std::size_t i = 0; i < s.size; ++i) {
                INFO("trial " << trial << " M " << m << " element " << s.offset + i);
                CHECK(std::abs(out[s.offset + i] - want[i]) <= 1e-5 * (1 + std::abs(want[i])));
            }
        }
    }
}

namespace {

// Three thread workers, a tensor of 8 and one of 4, one sync of inner SGD lr 1 and outer SGD lr 1
// from 0: worker r's pseudo-gradient is mnc_grads[r], and every worker ends at -(aggregate).
const std::array<std::vector<float>, 3> mnc_grads = {{
    {4, 0, 0, 3, 0.5f, 0, 0, 0, /* bias */ 0, 1, 0, 0.5f},
    {0, 2, 0, -6, 0, 0.25f, 0, 0, /* bias */ 0, -2, 0.5f, 0},
    {1, 0, 0, 0, 0, 0, 8, 0.125f, /* bias */ 3, 0, 0, 0},
}};

template <class C>
std::vector<float> mnc_round(const typename C::hyper& ch, bool clip) {
    std::array<std::vector<float>, 3> after;
    loco::comm::run_threads(3, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        std::vector<float> w(8, 0.0f), gw(mnc_grads[r].begin(), mnc_grads[r].begin() + 8);
        std::vector<float> b(4, 0.0f), gb(mnc_grads[r].begin() + 8, mnc_grads[r].end());
        loco::parameter_list params;
        params.add("w", w, gw);
        params.add("b", b, gb);
        using opt_t =
            loco::diloco<loco::inner::sgd, loco::outer::sgd, C, loco::schedule::every, mnc>;
        typename opt_t::config cfg{.inner = {.lr = 1.0f}, .schedule = {.every = 1}};
        cfg.compress = ch;
        cfg.aggregate.clip = clip;
        opt_t opt(params, comm, cfg);
        opt.start();
        CHECK(opt.step().synced);
        after[r] = w;
        after[r].insert(after[r].end(), b.begin(), b.end());
    });
    CHECK(after[1] == after[0]);
    CHECK(after[2] == after[0]);
    return after[0];
}

// The reference: per tensor, each worker's k elements of largest magnitude (ties to the lower
// index; every element with k = 0), in double, then templar's aggregate over the senders.
std::vector<double> mnc_reference(double ratio, bool clip) {
    std::vector<double> out;
    for (const auto& tensor : {std::pair<std::size_t, std::size_t>{0, 8}, {8, 4}}) {
        // Named copies, not a structured binding: the comparator below captures the offset, which
        // clang before 16 refuses for a binding.
        const std::size_t offset = tensor.first;
        const std::size_t size = tensor.second;
        const std::size_t k =
            ratio == 0 ? size
                       : std::min(size, std::max<std::size_t>(
                                            1, static_cast<std::size_t>(std::ceil(ratio * double(size)))));
        std::vector<std::vector<double>> d(3, std::vector<double>(size, 0.0));
        std::vector<std::vector<std::uint8_t>> sent(3);
        for (std::size_t r = 0; r < 3; ++r) {
            std::vector<std::size_t> order(size);
            for (std::size_t i = 0; i < size; ++i) order[i] = i;
            std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
                return std::abs(mnc_grads[r][offset + a]) > std::abs(mnc_grads[r][offset + b]);
            });
            if (ratio != 0) sent[r].assign(size, 0);
            for (std::size_t j = 0; j < k; ++j) {
                d[r][order[j]] = mnc_grads[r][offset + order[j]];
                if (ratio != 0) sent[r][order[j]] = 1;
            }
        }
        const auto t = templar_aggregate(d, sent, clip);
        out.insert(out.end(), t.begin(), t.end());
    }
    return out;
}

}  // namespace

// "Each element averaged over the workers that sent it" needs the payloads' support: topk's
// payloads carry indices but topk had no decode_support, so the exchange took them as dense and
// divided every element by M (the reviewer's two workers with disjoint top-1 elements got half
// of each); error_feedback<topk> the same. A dense compressor still averages over all M.
TEST_CASE("median_norm_clip with topk and error_feedback<topk> averages each element over the "
          "workers that sent it, and with a dense compressor over all M") {
    // ratio 0.25: k = 2 of 8 (worker 0 sends 0 and 3, worker 1 sends 1 and 3, worker 2 sends 6
    // and 0), 1 of 4 (1, 1 and 0): elements sent by one, two or no worker.
    for (const bool clip : {true, false}) {
        CAPTURE(clip);
        const auto want = mnc_reference(0.25, clip);
        const auto check = [&](const std::vector<float>& got, const std::vector<double>& ref) {
            REQUIRE(got.size() == ref.size());
            for (std::size_t i = 0; i < ref.size(); ++i) {
                INFO("element " << i);
                CHECK(got[i] == doctest::Approx(-ref[i]).epsilon(1e-6));
            }
        };
        check(mnc_round<lc::topk>({.ratio = 0.25f}, clip), want);
        check(mnc_round<lc::error_feedback<lc::topk>>({.compress = {.ratio = 0.25f}}, clip), want);
        // Dense payloads: every worker sent every element.
        check(mnc_round<lc::none>({}, clip), mnc_reference(0, clip));
    }
    // Closed form of one element: element 1 of the weight is worker 1's 2 alone, scaled to the
    // median norm (worker 1's own: norms 5, sqrt(40), sqrt(65)) by about 1, not 2 / 3.
    CHECK(mnc_round<lc::topk>({.ratio = 0.25f}, true)[1] == doctest::Approx(-2.0).epsilon(1e-6));
}

TEST_CASE("median_norm_clip: the lower median for an even count, unclipped peers below it, "
          "elements nobody sent stay 0") {
    // Four workers, one element each sends alone plus one shared; norms 1, 2, 3, 4: torch.median
    // gives 2 (not 2.5), so workers 2 and 3 are scaled by 2/3 and 2/4.
    const std::vector<float> deltas = {1, 0, 0, 0, 0,   // worker 0 sends element 0
                                       0, 2, 0, 0, 0,   // worker 1 sends element 1
                                       0, 0, 3, 0, 0,   // worker 2 sends element 2
                                       0, 0, 0, 4, 0};  // worker 3 sends element 3
    const std::vector<std::uint8_t> sent = {1, 0, 0, 0, 0, 0, 1, 0, 0, 0,
                                            0, 0, 1, 0, 0, 0, 0, 0, 1, 0};
    loco::aggregate::contributions c;
    c.workers = 4;
    c.elements = 5;
    c.deltas = deltas;
    c.sent = sent;
    std::vector<float> out(5, -1.0f);
    mnc::combine({}, c, out);
    CHECK(out[0] == doctest::Approx(1.0).epsilon(1e-6));
    CHECK(out[1] == doctest::Approx(2.0).epsilon(1e-6));
    CHECK(out[2] == doctest::Approx(2.0).epsilon(1e-6));
    CHECK(out[3] == doctest::Approx(2.0).epsilon(1e-6));
    CHECK(out[4] == 0.0f);
    // Without the sent flags (a dense compressor) every element is a mean over all four.
    c.sent = {};
    mnc::combine({}, c, out);
    CHECK(out[0] == doctest::Approx(0.25).epsilon(1e-6));
    CHECK(out[3] == doctest::Approx(0.5).epsilon(1e-6));
    // A NaN anywhere makes the median, and every element, NaN: the handle's nonfinite policy
    // decides.
    std::vector<float> bad = deltas;
    bad[0] = std::numeric_limits<float>::quiet_NaN();
    c.deltas = bad;
    mnc::combine({}, c, out);
    CHECK(std::isnan(out[1]));
}

// torch.median of norms holding a NaN is NaN (the docs' rule): every factor is NaN, so even an
// element the NaN worker did not send is NaN. A median taken by sorting around the NaN is some
// finite norm instead, and left such elements finite. Three workers, the NaN one at each rank.
TEST_CASE("median_norm_clip: a NaN norm makes the median NaN, and every sent element NaN") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (std::size_t bad = 0; bad < 3; ++bad) {
        CAPTURE(bad);
        // Worker k sends element 0 (NaN for `bad`) or element 1 (value k + 1), never both.
        std::vector<float> deltas(6, 0.0f);
        std::vector<std::uint8_t> sent(6, 0);
        for (std::size_t k = 0; k < 3; ++k) {
            const std::size_t at = k == bad ? 0 : 1;
            deltas[k * 2 + at] = k == bad ? nan : static_cast<float>(k + 1);
            sent[k * 2 + at] = 1;
        }
        loco::aggregate::contributions c;
        c.workers = 3;
        c.elements = 2;
        c.deltas = deltas;
        c.sent = sent;
        std::vector<float> out(2, 0.0f);
        mnc::combine({}, c, out);
        CHECK(std::isnan(out[0]));
        CHECK(std::isnan(out[1]));
        std::vector<float> norms(3, 1.0f), f;
        norms[bad] = nan;
        mnc::factors_of({}, norms, f);
        for (const float x : f) CHECK(std::isnan(x));
        // clip = false is the plain scatter-mean: every factor 1, whatever the norms.
        mnc::factors_of({.clip = false}, norms, f);
        CHECK(f == std::vector<float>(3, 1.0f));
    }
}

// templar's clamp(median / (norm + 1e-8), max=1): where most workers left a tensor untouched its
// median norm is 0, so every factor is 0 (0 / 1e-8 for the still ones, never 0 / 0) and the
// tensor's aggregate is 0, finite.
TEST_CASE("median_norm_clip: a tensor most workers did not move has median norm 0 and aggregates "
          "to 0") {
    auto rng = loco_test::rng_for("median_norm_clip zero median");
    constexpr std::size_t m = 3, n0 = 5, n1 = 7, n = n0 + n1;
    const std::vector<lc::segment> segs = {{0, n0, 1, n0}, {n0, n1, 1, n1}};
    for (const bool sparse : {false, true}) {
        CAPTURE(sparse);
        // Tensor 0 moved by worker 2 only (the others sent zeros, or nothing); tensor 1 by all.
        std::vector<float> deltas(m * n, 0.0f);
        std::vector<std::uint8_t> sent(sparse ? m * n : 0, 1);
        for (std::size_t k = 0; k < m; ++k) {
            const auto v = loco_test::normal_floats(rng, n);
            for (std::size_t i = 0; i < n; ++i) {
                if (i >= n0 || k == 2) {
                    deltas[k * n + i] = v[i];
                } else if (sparse) {
                    sent[k * n + i] = 0;
                }
            }
        }
        loco::aggregate::contributions c;
        c.workers = m;
        c.elements = n;
        c.deltas = deltas;
        c.segments = segs;
        c.sent = sent;
        std::vector<float> out(n, 7.0f);
        mnc::combine({}, c, out);
        for (std::size_t i = 0; i < n0; ++i) CHECK(out[i] == 0.0f);
        std::vector<float> f;
        mnc::factors({}, c, 0, n0, f);
        CHECK(f == std::vector<float>(m, 0.0f));
        for (const auto& s : segs) {
            std::vector<std::vector<double>> d(m);
            std::vector<std::vector<std::uint8_t>> se(m);
            for (std::size_t k = 0; k < m; ++k) {
                for (std::size_t i = s.offset; i < s.offset + s.size; ++i) {
                    d[k].push_back(deltas[k * n + i]);
                    if (sparse) se[k].push_back(sent[k * n + i]);
                }
            }
            const auto want = templar_aggregate(d, se);
            for (std::size_t i = 0; i < s.size; ++i) {
                INFO("element " << s.offset + i);
                CHECK(std::abs(out[s.offset + i] - want[i]) <= 1e-5 * (1 + std::abs(want[i])));
            }
        }
    }
    // The factors from the norms directly: a median of 0 clips every worker to 0.
    std::vector<float> f;
    mnc::factors_of({}, std::vector<float>{0.0f, 0.0f, 0.5f}, f);
    CHECK(f == std::vector<float>{0.0f, 0.0f, 0.0f});
}

// The norms are summed in double and rounded to fp32 (the header and docs/compressors.md), so on a
// large tensor with a nonzero mean each factor is the quotient of those norms within one fp32
// rounding; a running fp32 sum of 2^17 squares drifts by about 1e-5.
TEST_CASE("median_norm_clip: the factors of a tensor of 2^17 elements are the quotients of its "
          "norms summed in double") {
    auto rng = loco_test::rng_for("median_norm_clip large norms");
    constexpr std::size_t m = 4, n = std::size_t{1} << 17;
    std::vector<float> deltas;
    for (std::size_t k = 0; k < m; ++k) {
        // Worker k: mean 2 + k, spread 1 + k, so the norms increase with k.
        const auto v = loco_test::normal_floats(rng, n, 1.0f + float(k), 2.0f + float(k));
        deltas.insert(deltas.end(), v.begin(), v.end());
    }
    loco::aggregate::contributions c;
    c.workers = m;
    c.elements = n;
    c.deltas = deltas;
    std::vector<float> f;
    mnc::factors({}, c, 0, n, f);
    REQUIRE(f.size() == m);
    std::vector<double> norms(m);
    for (std::size_t k = 0; k < m; ++k) {
        double sq = 0.0;
        for (std::size_t i = 0; i < n; ++i) sq += double(deltas[k * n + i]) * deltas[k * n + i];
        norms[k] = static_cast<float>(std::sqrt(sq));
    }
    std::vector<double> sorted = norms;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[(m - 1) / 2];
    int clipped = 0;
    for (std::size_t k = 0; k < m; ++k) {
        CAPTURE(k);
        const double want = std::min(median / (norms[k] + 1e-8), 1.0);
        clipped += want < 1.0 - 1e-6;  // the median's own worker: 1 - 1e-8 / norm
        CHECK(std::abs(double(f[k]) - want) <= 1e-7 * want);
    }
    CHECK(clipped == 2);  // the two workers above the lower median
}

// An infinite delta makes its worker's norm infinite. While the lower median stays finite (at most
// M / 2 such workers) that worker's factor is 0: its infinite elements become NaN (inf * 0) and the
// rest of the tensor stays finite. With more, the median is infinite and those workers' factors
// NaN. templar's formula in double says the same.
TEST_CASE("median_norm_clip: an infinite delta leaves the median finite and makes only its own "
          "elements NaN") {
    auto rng = loco_test::rng_for("median_norm_clip infinite delta");
    const float inf = std::numeric_limits<float>::infinity();
    constexpr std::size_t n = 6;
    for (std::size_t m = 2; m <= 5; ++m) {
        for (std::size_t bad = 1; bad <= m; ++bad) {
            CAPTURE(m);
            CAPTURE(bad);
            std::vector<float> deltas = loco_test::normal_floats(rng, m * n);
            for (std::size_t k = 0; k < bad; ++k) {  // elements 1 and 4 of the first `bad` workers
                deltas[k * n + 1] = inf;
                deltas[k * n + 4] = -inf;
            }
            loco::aggregate::contributions c;
            c.workers = m;
            c.elements = n;
            c.deltas = deltas;
            std::vector<float> out(n);
            mnc::combine({}, c, out);
            std::vector<std::vector<double>> d(m);
            for (std::size_t k = 0; k < m; ++k) {
                d[k].assign(deltas.begin() + std::ptrdiff_t(k * n),
                            deltas.begin() + std::ptrdiff_t((k + 1) * n));
            }
            const auto want = templar_aggregate(d, std::vector<std::vector<std::uint8_t>>(m));
            std::size_t nan = 0;
            for (std::size_t i = 0; i < n; ++i) {
                CAPTURE(i);
                nan += std::isnan(out[i]);
                if (std::isnan(want[i])) {
                    CHECK(std::isnan(out[i]));
                } else {
                    CHECK(std::abs(out[i] - want[i]) <= 1e-5 * (1 + std::abs(want[i])));
                }
            }
            CHECK(nan == (bad <= m / 2 ? 2 : n));
        }
    }
}

TEST_CASE("median_norm_clip and sparseloco refuse bad settings and inputs with one sentence, "
          "nothing written") {
    CHECK_THROWS_WITH_AS(mnc::validate({.epsilon = -1.0f}),
                         doctest::Contains("epsilon must be finite and > 0"),
                         loco::invalid_argument);
    // 0 would give 0 / 0 for a worker whose tensor did not move against a median norm of 0.
    CHECK_THROWS_WITH_AS(mnc::validate({.epsilon = 0.0f}),
                         doctest::Contains("epsilon must be finite and > 0 (templar: 1e-8), got 0.0"),
                         loco::invalid_argument);
    CHECK_THROWS_AS(mnc::validate({.epsilon = std::numeric_limits<float>::infinity()}),
                    loco::invalid_argument);
    const std::vector<float> deltas(6, 1.0f);
    loco::aggregate::contributions c;
    c.workers = 2;
    c.elements = 3;
    c.deltas = deltas;
    std::vector<float> out(4, 9.0f);
    CHECK_THROWS_AS(mnc::combine({}, c, out), loco::shape_error);  // output of 4, not 3
    const std::vector<lc::segment> gap = {{0, 1, 1, 1}, {2, 1, 1, 1}};
    c.segments = gap;
    out.assign(3, 9.0f);
    CHECK_THROWS_WITH_AS(mnc::combine({}, c, out), doctest::Contains("tile"), loco::shape_error);
    CHECK(out == std::vector<float>(3, 9.0f));

    // Through the handle: bad SparseLoCo settings are refused at construction.
    std::vector<float> w(64 * 64, 0.0f), g(64 * 64, 1.0f);
    loco::parameter_list params;
    params.add_views("w", loco::host_matrix(w.data(), 64, 64),
                     loco::host_matrix(static_cast<const float*>(g.data()), 64, 64));
    loco::comm::single comm;
    using handle = loco::diloco<loco::inner::sgd, loco::outer::sgd, sl, loco::schedule::every, mnc>;
    CHECK_THROWS_WITH_AS(handle(params, comm, {.compress = {.topk = 0}}),
                         doctest::Contains("topk must be in [1, 65535]"), loco::invalid_argument);
    CHECK_THROWS_WITH_AS(handle(params, comm, {.compress = {.beta = 1.0f}}),
                         doctest::Contains("beta must be in [0, 1)"), loco::invalid_argument);
    CHECK_THROWS_AS(handle(params, comm, {.compress = {.beta = -0.1f}}), loco::invalid_argument);
    CHECK_THROWS_AS(handle(params, comm, {.compress = {.chunk = 4, .topk = 17}}),
                    loco::invalid_argument);
    CHECK_THROWS_AS(handle(params, comm, {.aggregate = {.epsilon = -1.0f}}),
                    loco::invalid_argument);
    // The median needs every worker's payload: the two-phase exchange cannot deliver them.
    CHECK_THROWS_WITH_AS(handle(params, comm, {.exchange = loco::exchange_scheme::two_phase}),
                         doctest::Contains("all_gather"), loco::invalid_argument);
    // A 2-D segment whose rows do not divide its size cannot be chunked.
    const std::vector<lc::segment> odd = {{0, 10, 3, 3}};
    std::vector<std::byte> payload(64);
    std::vector<std::uint8_t> mask(10, 0xa5);
    CHECK_THROWS_AS(sl::decode_support({}, payload, odd, mask), loco::shape_error);
    CHECK(mask == std::vector<std::uint8_t>(10, 0xa5));
    // Nothing of the parameters changed.
    CHECK(w == std::vector<float>(64 * 64, 0.0f));
}

TEST_CASE("outer::sign_sgd is DeMo's apply: decay by 1 - lr * weight_decay, then minus lr * "
          "sign") {
    using s = loco::outer::sign_sgd;
    const s::hyper h{.lr = 0.01f, .weight_decay = 0.1f};
    const auto k = s::prepare(h, 1);
    const float decay = static_cast<float>(1.0 - 0.01 * 0.1);
    for (const float delta : {2.5f, -1e-30f, 0.0f, -0.0f, 7.0f}) {
        float global = 1.5f;
        s::update(k, global, delta, nullptr);
        const float sign = delta > 0 ? 1.0f : delta < 0 ? -1.0f : 0.0f;
        const float want = 1.5f * decay - 0.01f * sign;
        CHECK(global == want);
    }
    float global = 1.0f;
    s::update(k, global, std::numeric_limits<float>::quiet_NaN(), nullptr);
    CHECK(std::isnan(global));  // torch.sign(NaN) is NaN
    CHECK(s::hyper{}.lr == 4e-4f);
    CHECK_THROWS_WITH_AS(s::validate({.lr = -1.0f}), doctest::Contains("lr must be finite"),
                         loco::invalid_argument);
    CHECK_THROWS_AS(s::validate({.weight_decay = std::numeric_limits<float>::quiet_NaN()}),
                    loco::invalid_argument);

    // In the handle: one worker, the average is its own pseudo-gradient; each element moves by
    // exactly lr against its sign.
    std::vector<float> w = {1.0f, 1.0f, 1.0f}, g = {3.0f, -0.5f, 0.0f};
    loco::parameter_list params;
    params.add("w", w, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, s> opt(params, comm,
                                          {.inner = {.lr = 0.1f}, .outer = {.lr = 0.25f},
                                           .schedule = {.every = 2}});
    opt.step();
    opt.step();
    CHECK(w[0] == 0.75f);
    CHECK(w[1] == 1.25f);
    CHECK(w[2] == 1.0f);
}

namespace {

std::vector<lc::segment> fuzz_segments() {
    return {{0, 12 * 8, 12, 8}, {96, 30, 1, 30}, {126, 0, 1, 0}, {126, 7 * 9, 7, 9}, {189, 5, 1, 5}};
}

}  // namespace

// decode_support is a new payload reader: every mutation (random bit flips, resealed or not,
// index edits resealed past the checksum, truncation and extension) must be refused exactly when
// decode refuses it, with loco::wire_error and the mask untouched; an accepted payload marks
// exactly its kept cells, which include every element decode writes a nonzero value to.
TEST_CASE("wire fuzz: sparseloco decode_support refuses what decode refuses and marks the kept "
          "cells") {
    auto rng = loco_test::rng_for("sparseloco decode_support fuzz");
    const std::vector<lc::segment> segs = fuzz_segments();
    const std::size_t n = 194;
    std::size_t failures = 0, refused = 0, accepted = 0;
    std::string report;
    for (const sl::hyper h : {sl::hyper{.chunk = 3, .topk = 2}, sl::hyper{.chunk = 4, .topk = 5,
                                                                          .bins = 3},
                              sl::hyper{}}) {
        std::size_t kept = 0;
        for (const auto& s : segs) kept += sl::layout_of(h, s).sent;
        for (int trial = 0; trial < 1500; ++trial) {
            const auto x = loco_test::normal_floats(rng, n);
            std::vector<float> state(n, 0.0f);
            std::vector<std::byte> p(sl::payload_bytes(h, segs));
            sl::encode(h, x, segs, state, {}, p);
            const int kind = static_cast<int>(rng() % 5);
            if (kind == 0) {  // flip bits anywhere
                for (int f = 1 + static_cast<int>(rng() % 3); f > 0; --f) {
                    p[rng() % p.size()] ^= std::byte{static_cast<unsigned char>(1u << (rng() % 8))};
                }
            } else if (kind == 1 || kind == 2) {  // flip body bits and reseal the checksum
                for (int f = 1 + static_cast<int>(rng() % 2); f > 0; --f) {
                    const std::size_t at = wire::header_bytes + rng() % (p.size() - wire::header_bytes);
                    p[at] ^= std::byte{static_cast<unsigned char>(1u << (rng() % 8))};
                }
                loco_test::reseal(p);
            } else if (kind == 3) {  // truncate or extend
                p.resize(rng() % 2 == 0 ? p.size() - 1 - rng() % 8 : p.size() + 1 + rng() % 8);
            }  // kind 4: the good payload
            std::vector<float> out(n, 0.0f);
            bool decode_refused = false;
            try {
                sl::decode(h, p, segs, out);
            } catch (const loco::wire_error&) {
                decode_refused = true;
            }
            std::vector<std::uint8_t> mask(n, 0xa5);
            bool support_refused = false;
            try {
                sl::decode_support(h, p, segs, mask);
            } catch (const loco::wire_error&) {
                support_refused = true;
            }
            bool ok = decode_refused == support_refused;
            if (support_refused) {
                ++refused;
                ok = ok && std::all_of(mask.begin(), mask.end(),
                                       [](std::uint8_t v) { return v == 0xa5; });
            } else {
                ++accepted;
                std::size_t ones = 0;
                for (std::size_t i = 0; i < n; ++i) {
                    ok = ok && (mask[i] == 0 || mask[i] == 1);
                    ok = ok && (out[i] == 0.0f || mask[i] == 1);
                    ones += mask[i] == 1 ? 1 : 0;
                }
                ok = ok && ones == kept;
            }
            if (!ok && failures++ < 3) {
                report += "mutation kind " + std::to_string(kind) + ": decode " +
                          (decode_refused ? "refused" : "accepted") + ", decode_support " +
                          (support_refused ? "refused" : "accepted") + "\n";
            }
        }
    }
    INFO(failures << " failures; first ones:\n" << report);
    CHECK(failures == 0);
    CHECK(refused > 1000);
    CHECK(accepted > 500);
}
