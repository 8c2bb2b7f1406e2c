#pragma once
// DeMo's aggregation, as its references run it (Peng, Quesnelle, Kingma, arXiv 2411.19870;
// bloc97/DeMo demo.py, Psyche's Distro::apply in shared/modeling/src/distro.rs): every worker
// gathers the peers' sparse payloads, averages each sent coordinate over the peers that sent it
// (scatter_reduce "mean" with include_self=False) and decodes the result once. For
// compress::demo a coordinate is one DCT coefficient of one chunk:
//
//   C[c]  = (sum over the workers k whose payload sent cell c of their value) / (how many did),
//           0 where none did                       (per chunk, in the compressor's coordinates)
//   out   = inverse DCT of C, chunk by chunk
//
// aggregate::mean averages the decoded payloads instead: by linearity that is the same inverse
// DCT of each coefficient summed over the workers but divided by M, so a coefficient that m of the
// M workers chose is m / M times as large as here. The two agree when every worker sends the same
// cells, and with one worker.
//
// The rule lives in the compressor's coordinates, so the compressor supplies it as
// `static void decode_scatter_mean(const hyper&, std::span<const std::span<const std::byte>>
// payloads, std::span<const segment>, std::span<float> out)` (compress::demo; on the device
// backend::cuda::demo_decode_scatter_mean). The exchange all-gathers the payloads (the bytes of
// the mean's all-gather: no reports, no extra traffic) and calls it on every rank with the same
// payloads in rank order; a handle whose compressor has no such rule does not compile.
// SparseLoCo's element-wise scatter-mean is aggregate::median_norm_clip with clip = false.
// There is no combine: decoded deltas no longer say which coordinates each worker sent.

#include <loco/compress/compressor.hpp>

#include <cstddef>
#include <span>
#include <string>
#include <string_view>

namespace loco::aggregate {

struct scatter_mean {
    static constexpr std::string_view name = "scatter_mean";
    struct hyper {};
    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = false;
    // The exchange hands the gathered payloads to the compressor's decode_scatter_mean.
    static constexpr bool decodes_payloads_together = true;

    static std::string describe(const hyper&) { return "scatter_mean"; }
};

// Whether compressor C can scatter-mean payloads in its own coordinates.
template <class C>
concept has_scatter_mean =
    requires(const typename C::hyper& h, std::span<const std::span<const std::byte>> in,
             std::span<const compress::segment> segs, std::span<float> out) {
        C::decode_scatter_mean(h, in, segs, out);
    };

}  // namespace loco::aggregate
