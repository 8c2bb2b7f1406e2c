#pragma once
// --residual-csv: how much of the residual SparseLoCo and DeMo compress each sync actually
// leaves with it, and how much the same top-k would keep in the other basis. Both compressors
// keep a residual e per worker (compress/sparseloco.hpp, compress/demo.hpp):
//
//   e <- decay * e + delta      delta = global - local, the sync's pseudo-gradient
//   send the k_c largest of each chunk: values (SparseLoCo) or DCT coefficients (DeMo)
//   e <- e - decode(sent)
//
// At each sync worker 0 writes one row for the whole model (tensor "model"), then one for each
// tensor (by its registered name):
//
//   step          the step() call that synced
//   tensor        "model" or the tensor's name
//   before        |e| before the sync (after the decay and delta)
//   after         |e| after it: what the sync left behind
//   sent_share    1 - after^2 / before^2: the share of e's energy the sync removed (negative
//                 where a sync adds energy, as DeMo's sign variant can, whose +-1 codes the
//                 trainer does not offer)
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

// What the k largest magnitudes of each chunk hold of the segment's energy: sums of squares, in
// double, of those cells and of all cells, in the value basis or after each chunk's DCT-II.
struct kept_energy {
    double kept = 0.0;
    double total = 0.0;
    double share() const noexcept { return total > 0.0 ? kept / total : 0.0; }
};

inline kept_energy topk_energy(std::span<const float> e, const chunked_segment& s, basis b) {
    kept_energy out;
    const loco::compress::chunking::grid& g = s.grid;
    if (g.cells() == 0) return out;
    const loco::compress::dct::chunk_transform transform =
        b == basis::dct ? loco::compress::dct::chunk_transform(g.h, g.w)
                        : loco::compress::dct::chunk_transform();
    std::vector<float> cells(g.cells());
    std::vector<std::uint32_t> order;
    std::vector<double> work;
    const float* seg = e.data() + s.segment.offset;
    for (std::size_t c = 0; c < g.chunks(); ++c) {
        if (b == basis::dct) {
            transform.forward(seg + g.element(c, 0), g.cols, cells.data(), work);
        } else {
            for (std::size_t j = 0; j < g.cells(); ++j) cells[j] = seg[g.element(c, j)];
        }
        loco::compress::chunking::select_largest(cells, s.k, order);
        for (const float v : cells) out.total += static_cast<double>(v) * v;
        for (std::size_t j = 0; j < s.k; ++j) {
            const double v = cells[order[j]];
            out.kept += v * v;
        }
    }
    return out;
}

// The same over several segments: the share of their energy the kept cells hold; 0 for a zero
// residual.
inline double topk_energy_share(std::span<const float> e, std::span<const chunked_segment> segs,
                                basis b) {
    kept_energy sum;
    for (const chunked_segment& s : segs) {
        const kept_energy k = topk_energy(e, s, b);
        sum.kept += k.kept;
        sum.total += k.total;
    }
    return sum.share();
}

// Worker 0's report: before() with the state just before a sync, after() with the state after
// it; each pair writes one row for the whole model (tensor "model") and one for each tensor.
class residual_report {
public:
    template <class C>
    static residual_report of(const typename C::hyper& h, const loco::parameter_list& params,
                              const std::string& path) {
        // The segments the handle's compressor sees: one per tensor, matrices as rows x cols,
        // at their flat offsets (the whole model is one fragment under --schedule every).
        std::vector<part> parts;
        for (const loco::compress::segment& s : loco::detail::parameter_segments(params)) {
            const auto l = C::layout_of(h, s);
            part p;
            p.chunks = {s, l.grid, l.k};
            p.name = params[parts.size()].name;
            parts.push_back(std::move(p));
        }
        return residual_report(std::move(parts), residual_decay<C>(h), path);
    }

    // The residual the sync of step `step` compresses: decay * e + (global - local), in fp32 as
    // the compressors form it, from the residual `e` of the last sync.
    void before(std::uint64_t step, std::span<const float> e, std::span<const float> global,
                const float* local) {
        step_ = step;
        residual_.resize(global.size());
        for (std::size_t i = 0; i < global.size(); ++i) {
            residual_[i] = decay_ * e[i] + (global[i] - local[i]);
        }
        for (part& p : parts_) {
            p.before = squares(std::span<const float>(residual_).subspan(p.chunks.segment.offset,
                                                                        p.chunks.segment.size));
            p.values = topk_energy(residual_, p.chunks, basis::values);
            p.dct = topk_energy(residual_, p.chunks, basis::dct);
        }
    }

    // The residual the sync left; writes the rows.
    void after(std::span<const float> e) {
        part model;
        model.name = "model";
        for (part& p : parts_) {
            p.after = squares(e.subspan(p.chunks.segment.offset, p.chunks.segment.size));
            model.before += p.before;
            model.after += p.after;
            model.values.kept += p.values.kept;
            model.values.total += p.values.total;
            model.dct.kept += p.dct.kept;
            model.dct.total += p.dct.total;
        }
        write(model);
        for (const part& p : parts_) write(p);
    }

    // Flushes and closes the file; throws if the rows could not all be written.
    void close() {
        if (!file_) return;
        std::FILE* f = file_.release();
        if (std::ferror(f) != 0 || std::fclose(f) != 0) {
            throw loco::invalid_argument("gpt: cannot write --residual-csv " + path_);
        }
    }

private:
    // A tensor's chunks, and the energies of its residual at the sync being reported.
    struct part {
        chunked_segment chunks;
        std::string name;
        double before = 0.0;  // sums of squares
        double after = 0.0;
        kept_energy values;
        kept_energy dct;
    };
    struct closer {
        void operator()(std::FILE* f) const noexcept { std::fclose(f); }
    };

    residual_report(std::vector<part> parts, float decay, const std::string& path)
        : parts_(std::move(parts)), decay_(decay), path_(path),
          file_(std::fopen(path.c_str(), "w")) {
        if (!file_) {
            throw loco::invalid_argument("gpt: cannot write --residual-csv " + path);
        }
        std::fprintf(file_.get(), "step,tensor,before,after,sent_share,value_share,dct_share\n");
    }

    static double squares(std::span<const float> x) {
        double sq = 0.0;
        for (const float v : x) sq += static_cast<double>(v) * v;
        return sq;
    }

    void write(const part& p) {
        const double sent = p.before > 0.0 ? 1.0 - p.after / p.before : 0.0;
        std::fprintf(file_.get(), "%llu,%s,%.9g,%.9g,%.9g,%.9g,%.9g\n",
                     static_cast<unsigned long long>(step_), p.name.c_str(), std::sqrt(p.before),
                     std::sqrt(p.after), sent, p.values.share(), p.dct.share());
    }

    std::vector<part> parts_;
    float decay_;
    std::string path_;
    std::unique_ptr<std::FILE, closer> file_;
    std::uint64_t step_ = 0;
    std::vector<float> residual_;
};

}  // namespace gpt
