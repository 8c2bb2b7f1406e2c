#pragma once
// The payload layout of compress::statistical<Bits> over the tensors of a table, and the
// workspace its multi-pass encode needs (compress_plan<statistical<Bits>>).

#include <loco/backend/cuda/compress/payload_plan.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/statistical.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>
#include <loco/policy.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace loco::backend::cuda {

// ---- the statistical layout --------------------------------------------------------------------

// compress::statistical<Bits> quantizes groups (a tensor, or each row of one) with statistics
// summed in the order statistical.hpp documents: chunks of `chunk` = 2048 consecutive elements of
// a group, one warp per chunk, lane l taking elements l, l + 32, ...; the chunk sums are added in
// chunk order by one thread per group.
struct stat_chunk {
    std::uint64_t first;  // element of the tensor
    std::uint32_t count;  // <= 2048
    std::uint32_t group;
};

struct stat_group {
    std::uint64_t n;       // elements
    std::uint64_t record;  // body offset of the record (shift, lut)
    std::uint64_t chunk0;  // its first chunk
    std::uint32_t chunks;
    std::uint32_t tensor;
};

struct stat_view {
    const stat_chunk* chunks;
    const stat_group* groups;
    const compress_tensor* tensors;  // body, groups, cols
    double* sums;                    // per chunk: the sum of e, then of c^2
    double* bin_sums;                // per chunk: 2^Bits sums of c
    unsigned* bin_counts;            // per chunk: 2^Bits counts
    float* stats;                    // per group: shift, scale, lut[0 .. 2^Bits)
    std::uint64_t chunk_count;
    std::uint64_t group_count;
    std::uint64_t tensor_count;
};

// The payload layout of statistical<Bits> over the tensors of a table, one segment per tensor,
// and the workspace of encode (per chunk: 8 + 12 * 2^Bits bytes; per group: 4 * (2 + 2^Bits)).
// The granularity fixes the layout, so it is chosen here: per row, rows[i] is the number of rows
// of tensor i (1 for a vector; an empty `rows` makes every tensor one row); encode and
// payload_check refuse hyper-parameters of the other granularity.
template <int Bits>
class compress_plan<compress::statistical<Bits>> {
    static_assert(Bits <= 4, "loco: the device statistical quantizer takes Bits 1, 2 or 4");
    using codec = compress::statistical<Bits>;
    static constexpr std::size_t chunk = codec::chunk;

public:
    compress_plan() = default;

    explicit compress_plan(const tensor_table& table,
                           compress::granularity per = compress::granularity::tensor,
                           const std::vector<std::size_t>& rows = {})
        : per_(per), device_(table.device()) {
        if (table.size() > UINT32_MAX) {
            throw invalid_argument("loco: compress_plan: more than 2^32 segments");
        }
        if (!rows.empty() && rows.size() != table.size()) {
            throw invalid_argument("loco: compress_plan: rows has " + std::to_string(rows.size()) +
                                   " entries for " + std::to_string(table.size()) + " tensors");
        }
        typename codec::hyper h{};
        h.per = per;
        std::vector<compress_tensor> tensors;
        std::vector<stat_group> groups;
        std::vector<stat_chunk> chunks;
        std::uint64_t body = 0;
        for (std::size_t i = 0; i < table.size(); ++i) {
            const std::size_t n = table.spec(i).size;
            const std::size_t r = rows.empty() ? 1 : rows[i];
            segments_.push_back({table.flat_offset(i), n, r, r == 0 ? 0 : n / r});
            const std::size_t g = codec::groups(h, segments_.back());  // throws for bad rows
            const std::size_t cols = g == 0 ? 0 : n / g;
            tensors.push_back({body, g, cols});
            for (std::size_t k = 0; k < g; ++k) {
                if (groups.size() >= UINT32_MAX) {
                    throw invalid_argument("loco: compress_plan: more than 2^32 groups");
                }
                const std::size_t count = (cols + chunk - 1) / chunk;
                groups.push_back({cols, body + codec::record_bytes * k, chunks.size(),
                                  static_cast<std::uint32_t>(count),
                                  static_cast<std::uint32_t>(i)});
                for (std::size_t c = 0; c < count; ++c) {
                    chunks.push_back({k * cols + c * chunk,
                                      static_cast<std::uint32_t>(std::min(chunk, cols - c * chunk)),
                                      static_cast<std::uint32_t>(groups.size() - 1)});
                }
            }
            body += codec::segment_bytes(h, segments_.back());
        }
        if ((chunks.size() + 7) / 8 > INT32_MAX || (groups.size() + 255) / 256 > INT32_MAX) {
            throw invalid_argument("loco: compress_plan: the tensors need more CUDA blocks than a "
                                   "grid holds");
        }
        payload_ = compress::wire::header_bytes + body;
        if (payload_ != codec::payload_bytes(h, segments_)) {
            throw error("loco: compress_plan: the device layout disagrees with "
                        "statistical::payload_bytes");
        }
        elements_ = table.total_elements();
        const auto round = [](std::size_t bytes) {
            return (bytes + allocation_alignment - 1) / allocation_alignment * allocation_alignment;
        };
        const std::size_t nc = chunks.size(), ng = groups.size(), nt = tensors.size();
        const std::size_t at_groups = round(nc * sizeof(stat_chunk));
        const std::size_t at_tensors = at_groups + round(ng * sizeof(stat_group));
        const std::size_t at_sums = at_tensors + round(nt * sizeof(compress_tensor));
        const std::size_t at_bins = at_sums + round(nc * 8);
        const std::size_t at_counts = at_bins + round(nc * codec::bins * 8);
        const std::size_t at_stats = at_counts + round(nc * codec::bins * 4);
        const std::size_t total = at_stats + round(ng * (2 + codec::bins) * 4);
        std::vector<std::byte> host(at_sums);
        const auto put = [&](std::size_t at, const auto& v) {
            if (!v.empty()) {
                std::memcpy(host.data() + at, v.data(), v.size() * sizeof(v[0]));
            }
        };
        put(0, chunks);
        put(at_groups, groups);
        put(at_tensors, tensors);
        memory_ = device_buffer<std::byte>(std::max<std::size_t>(total, 1));
        memory_.upload(host);
        std::byte* m = memory_.get();
        view_.chunks = reinterpret_cast<const stat_chunk*>(m);
        view_.groups = reinterpret_cast<const stat_group*>(m + at_groups);
        view_.tensors = reinterpret_cast<const compress_tensor*>(m + at_tensors);
        view_.sums = reinterpret_cast<double*>(m + at_sums);
        view_.bin_sums = reinterpret_cast<double*>(m + at_bins);
        view_.bin_counts = reinterpret_cast<unsigned*>(m + at_counts);
        view_.stats = reinterpret_cast<float*>(m + at_stats);
        view_.chunk_count = nc;
        view_.group_count = ng;
        view_.tensor_count = nt;
        compress_.tensors = view_.tensors;
        compress_.items = nullptr;
        compress_.payload = payload_;
        compress_.body = body;
        sum_ = device_buffer<unsigned long long>(1);
    }

    std::size_t payload_bytes() const noexcept { return payload_; }
    // The host compressor's segments: one per tensor, flat offsets, with the rows given.
    const std::vector<compress::segment>& segments() const noexcept { return segments_; }
    std::size_t elements() const noexcept { return elements_; }
    compress::granularity per() const noexcept { return per_; }
    int device() const noexcept { return device_; }
    // The decoders' view (compress_tensor: body, groups, elements per group).
    const compress_view& view() const noexcept { return compress_; }
    const stat_view& stats() const noexcept { return view_; }
    std::uint64_t chunks() const noexcept { return view_.chunk_count; }
    std::uint64_t groups() const noexcept { return view_.group_count; }
    unsigned long long* checksum_accumulator() const noexcept { return sum_.get(); }

    // Throws unless h asks for this plan's granularity.
    void require_per(const typename codec::hyper& h, const char* what) const {
        if (h.per != per_) {
            throw invalid_argument(
                std::string("loco: ") + what + ": the compress_plan was built for per-" +
                (per_ == compress::granularity::tensor ? "tensor" : "row") +
                " groups and the hyper-parameters ask per " +
                (h.per == compress::granularity::tensor ? "tensor" : "row") +
                " (build the plan with compress_plan(table, granularity, rows))");
        }
    }

    compress::wire::header wire_header(const typename codec::hyper& h) const {
        return {codec::wire_id, static_cast<std::uint8_t>(Bits), static_cast<std::uint8_t>(h.per),
                loco::detail::float_bits(h.range), static_cast<std::uint32_t>(segments_.size()),
                elements_, payload_ - compress::wire::header_bytes};
    }
    header_prefix prefix(const typename codec::hyper& h) const {
        return detail::prefix_bytes(wire_header(h));
    }

private:
    std::vector<compress::segment> segments_;
    compress::granularity per_ = compress::granularity::tensor;
    std::size_t payload_ = compress::wire::header_bytes;
    std::size_t elements_ = 0;
    int device_ = 0;
    device_buffer<std::byte> memory_;
    device_buffer<unsigned long long> sum_;
    stat_view view_{};
    compress_view compress_{};
};

}  // namespace loco::backend::cuda
