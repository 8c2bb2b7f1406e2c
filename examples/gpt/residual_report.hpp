#pragma once
// --residual-csv: how much of the residual SparseLoCo and DeMo compress each sync actually
// leaves with it, and how much the same top-k would keep in the other basis. Both compressors
// keep a residual e per worker (compress/sparseloco.hpp, compress/demo.hpp):
//
//   e <- decay * e + delta      delta = global - local, the sync's pseudo-gradient
//   send the k_c largest of each chunk: values (SparseLoCo) or DCT coefficients (DeMo)
//   e <- e - decode(sent)
//
// At each sync worker 0 writes one row:
//
//   step          the step() call that synced
//   before        |e| before the sync (after the decay and delta)
//   after         |e| after it: what the sync left behind
//   sent_share    1 - after^2 / before^2: the share of e's energy the sync removed
//   value_share   the share of before's energy held by the k_c largest values of each chunk
//   dct_share     the same for the k_c largest DCT-II coefficients of each chunk
//
// with the compressor's own chunks and k_c (layout_of). The DCT is orthonormal, so both shares
// divide by the same energy. For DeMo with fp32 values sent_share is dct_share (up to rounding);
// for SparseLoCo it is value_share less what the quantization loses. The two shares of one row
// compare the bases on the same residual: the question which basis gathers more of this model's
// pseudo-gradients into k_c of each chunk's cells (docs/study.md).

#include <loco/compress/chunking.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/dct.hpp>
#include <loco/error.hpp>
#include <loco/exchange.hpp>
#include <loco/params.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace gpt {

// Whether --residual-csv can report on compressor C: a chunked top-k with a residual.
template <class C>
concept chunked_residual_compressor = requires(const typename C::hyper& h,
                                               const loco::compress::segment& s) {
    C::layout_of(h, s).grid;
    C::layout_of(h, s).k;
};

// The decay of C's residual: SparseLoCo's beta, DeMo's decay.
template <class C>
float residual_decay(const typename C::hyper& h) {
    if constexpr (requires { h.beta; }) {
        return h.beta;
    } else {
        return h.decay;
    }
}

// The one sentence for --residual-csv with any other compressor or schedule.
inline constexpr const char* residual_csv_refusal =
    "gpt: --residual-csv reports on SparseLoCo's and DeMo's residual; it needs --compress "
    "sparseloco or demo (with --schedule every)";

// Whether --residual-csv (when set) comes with SparseLoCo or DeMo under DiLoCo (whose compiled
// combinations are --schedule every only).
inline bool residual_csv_fits(const std::string& path, const std::string& compress,
                              bool sync_every_step) {
    return path.empty() || (!sync_every_step && (compress == "sparseloco" || compress == "demo"));
}

// Where the top-k of each chunk is taken.
enum class basis { values, dct };

// One segment's chunks and the cells kept of each.
struct chunked_segment {
    loco::compress::segment segment;
    loco::compress::chunking::grid grid;
    std::size_t k = 0;
};

// The share of sum(e^2) over the segments that the k largest magnitudes of each chunk hold, in
// the value basis or after each chunk's DCT-II; 0 for a zero residual. Sums in double.
inline double topk_energy_share(std::span<const float> e, std::span<const chunked_segment> segs,
                                basis b) {
    double total = 0.0;
    double kept = 0.0;
    std::vector<float> cells;
    std::vector<std::uint32_t> order;
    std::vector<double> work;
    loco::compress::dct::chunk_transform transform;
    for (const chunked_segment& s : segs) {
        const loco::compress::chunking::grid& g = s.grid;
        if (g.cells() == 0) continue;
        if (b == basis::dct && (transform.h != g.h || transform.w != g.w)) {
            transform = loco::compress::dct::chunk_transform(g.h, g.w);
        }
        cells.resize(g.cells());
        const float* seg = e.data() + s.segment.offset;
        for (std::size_t c = 0; c < g.chunks(); ++c) {
            if (b == basis::dct) {
                transform.forward(seg + g.element(c, 0), g.cols, cells.data(), work);
            } else {
                for (std::size_t j = 0; j < g.cells(); ++j) cells[j] = seg[g.element(c, j)];
            }
            loco::compress::chunking::select_largest(cells, s.k, order);
            for (const float v : cells) total += static_cast<double>(v) * v;
            for (std::size_t j = 0; j < s.k; ++j) {
                const double v = cells[order[j]];
                kept += v * v;
            }
        }
    }
    return total > 0.0 ? kept / total : 0.0;
}

struct residual_row {
    std::uint64_t step = 0;
    double before = 0.0;
    double after = 0.0;
    double sent_share = 0.0;
    double value_share = 0.0;
    double dct_share = 0.0;
};

// Worker 0's report: before() with the state just before a sync, after() with the state after
// it; each pair writes one row to the CSV file.
class residual_report {
public:
    template <class C>
    static residual_report of(const typename C::hyper& h, const loco::parameter_list& params,
                              const std::string& path) {
        std::vector<chunked_segment> segs;
        for (const loco::compress::segment& s : loco::detail::parameter_segments(params)) {
            const auto l = C::layout_of(h, s);
            segs.push_back({s, l.grid, l.k});
        }
        return residual_report(std::move(segs), residual_decay<C>(h), path);
    }

    // The residual the sync of step `step` compresses: decay * e + (global - local), in fp32 as
    // the compressors form it, from the residual `e` of the last sync.
    void before(std::uint64_t step, std::span<const float> e, std::span<const float> global,
                const float* local) {
        pending_.step = step;
        residual_.resize(global.size());
        for (std::size_t i = 0; i < global.size(); ++i) {
            residual_[i] = decay_ * e[i] + (global[i] - local[i]);
        }
        pending_.before = norm(residual_);
        pending_.value_share = topk_energy_share(residual_, segs_, basis::values);
        pending_.dct_share = topk_energy_share(residual_, segs_, basis::dct);
    }

    // The residual the sync left; writes the row.
    void after(std::span<const float> e) {
        residual_row r = pending_;
        r.after = norm(e.first(residual_.size()));
        r.sent_share = r.before > 0.0 ? 1.0 - (r.after * r.after) / (r.before * r.before) : 0.0;
        rows_.push_back(r);
        std::fprintf(file_.get(), "%llu,%.9g,%.9g,%.9g,%.9g,%.9g\n",
                     static_cast<unsigned long long>(r.step), r.before, r.after, r.sent_share,
                     r.value_share, r.dct_share);
    }

    // Flushes and closes the file; throws if the rows could not all be written.
    void close() {
        if (!file_) return;
        std::FILE* f = file_.release();
        if (std::ferror(f) != 0 || std::fclose(f) != 0) {
            throw loco::invalid_argument("gpt: cannot write --residual-csv " + path_);
        }
    }

    const std::vector<residual_row>& rows() const noexcept { return rows_; }

private:
    struct closer {
        void operator()(std::FILE* f) const noexcept { std::fclose(f); }
    };

    residual_report(std::vector<chunked_segment> segs, float decay, const std::string& path)
        : segs_(std::move(segs)), decay_(decay), path_(path),
          file_(std::fopen(path.c_str(), "w")) {
        if (!file_) {
            throw loco::invalid_argument("gpt: cannot write --residual-csv " + path);
        }
        std::fprintf(file_.get(), "step,before,after,sent_share,value_share,dct_share\n");
    }

    static double norm(std::span<const float> x) {
        double sq = 0.0;
        for (const float v : x) sq += static_cast<double>(v) * v;
        return std::sqrt(sq);
    }

    std::vector<chunked_segment> segs_;
    float decay_;
    std::string path_;
    std::unique_ptr<std::FILE, closer> file_;
    residual_row pending_;
    std::vector<float> residual_;
    std::vector<residual_row> rows_;
};

}  // namespace gpt
