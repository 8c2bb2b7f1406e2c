#pragma once
// The payload layout of a codec over the tensors of a table (compress_plan): one segment per
// tensor, in order, as the host exchanger lays out a payload, with the CTA work items of the
// kernels. Built and uploaded once.

#include <loco/backend/cuda/compress/device_compressor.hpp>
#include <loco/backend/cuda/compress/payload_header.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/compressor.hpp>
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

// ---- the payload layout of a table -------------------------------------------------------------

// Per tensor of the table: where its segment starts in the payload body, and its blocks.
struct compress_tensor {
    std::uint64_t body;
    std::uint64_t blocks;  // statistical: groups
    std::uint64_t cols;    // statistical: elements per group (0 for an empty tensor); else 0
};

// One CTA's work: elements [first, first + count) of a tensor; first is a multiple of the
// codec's unit (blockwise: whole blocks, and whole 256-element chunks on the fast path).
struct compress_item {
    std::uint64_t first;
    std::uint64_t count;
    std::uint32_t tensor;
    std::uint32_t reserved;
};

struct compress_view {
    const compress_tensor* tensors;
    const compress_item* items;
    std::uint64_t payload;  // bytes, header included
    std::uint64_t body;     // payload - 40
};

// The payload layout of Codec (blockwise<...> or cast<...>; statistical<...> below) over the
// tensors of a table: one segment per tensor, as loco::cuda::diloco and the host exchanger use.
// Built and uploaded once.
// A plan's encode() calls must be ordered (one stream): they share a checksum accumulator.
template <class Codec>
class compress_plan {
    static_assert(detail::codec_traits<Codec>::available,
                  "loco: compress_plan needs compress::blockwise<Bits, Block> or "
                  "compress::cast<T> (error_feedback's codec)");
    using traits = detail::codec_traits<Codec>;

public:
    compress_plan() = default;

    explicit compress_plan(const tensor_table& table) : device_(table.device()) {
        if (table.size() > UINT32_MAX) {
            throw invalid_argument("loco: compress_plan: more than 2^32 segments");
        }
        std::vector<compress_tensor> tensors;
        std::vector<compress_item> items;
        std::uint64_t body = 0;
        for (std::size_t i = 0; i < table.size(); ++i) {
            const std::size_t n = table.spec(i).size;
            tensors.push_back({body, traits::blocks(n), 0});
            segments_.push_back({table.flat_offset(i), n, 1, n});
            body += traits::segment_bytes(n);
            for (std::size_t first = 0; first < n; first += traits::item_elements) {
                items.push_back({first, std::min(traits::item_elements, n - first),
                                 static_cast<std::uint32_t>(i), 0u});
            }
        }
        if (items.size() > INT32_MAX) {
            throw invalid_argument("loco: compress_plan: the tensors need more CUDA blocks than a "
                                   "grid holds");
        }
        payload_ = compress::wire::header_bytes + body;
        // The host compressor's own count: the layouts agree or this is a bug.
        if (payload_ != Codec::payload_bytes(typename Codec::hyper{}, segments_)) {
            throw error("loco: compress_plan: the device layout disagrees with " +
                        std::string(Codec::name) + "::payload_bytes");
        }
        item_count_ = static_cast<std::uint32_t>(items.size());
        elements_ = table.total_elements();
        const std::size_t tensor_bytes =
            (tensors.size() * sizeof(compress_tensor) + allocation_alignment - 1) /
            allocation_alignment * allocation_alignment;
        std::vector<std::byte> host(tensor_bytes + items.size() * sizeof(compress_item));
        if (!tensors.empty()) {
            std::memcpy(host.data(), tensors.data(), tensors.size() * sizeof(compress_tensor));
        }
        if (!items.empty()) {
            std::memcpy(host.data() + tensor_bytes, items.data(),
                        items.size() * sizeof(compress_item));
        }
        memory_ = device_buffer<std::byte>(host.size());
        memory_.upload(host);
        view_.tensors = reinterpret_cast<const compress_tensor*>(memory_.get());
        view_.items = reinterpret_cast<const compress_item*>(memory_.get() + tensor_bytes);
        view_.payload = payload_;
        view_.body = body;
        sum_ = device_buffer<unsigned long long>(1);
    }

    // Bytes of one payload, header included (Codec::payload_bytes of segments()).
    std::size_t payload_bytes() const noexcept { return payload_; }
    // The host compressor's segments: one per tensor, flat offsets.
    const std::vector<compress::segment>& segments() const noexcept { return segments_; }
    std::size_t elements() const noexcept { return elements_; }
    std::uint32_t items() const noexcept { return item_count_; }
    int device() const noexcept { return device_; }
    const compress_view& view() const noexcept { return view_; }
    unsigned long long* checksum_accumulator() const noexcept { return sum_.get(); }

    // The payload's header for the hyper-parameters h (the checksum aside), and its first 32
    // bytes as the header kernel writes them.
    compress::wire::header wire_header(const typename Codec::hyper& h) const {
        return {Codec::wire_id, traits::bits, traits::flags(h), traits::block,
                static_cast<std::uint32_t>(segments_.size()), elements_,
                payload_ - compress::wire::header_bytes};
    }
    header_prefix prefix(const typename Codec::hyper& h) const {
        return detail::prefix_bytes(wire_header(h));
    }

private:
    std::vector<compress::segment> segments_;
    std::size_t payload_ = compress::wire::header_bytes;
    std::size_t elements_ = 0;
    std::uint32_t item_count_ = 0;
    int device_ = 0;
    device_buffer<std::byte> memory_;
    device_buffer<unsigned long long> sum_;
    compress_view view_{};
};

namespace detail {

template <class Codec>
void require_plan(const compress_plan<Codec>& plan, const tensor_table& table, const char* what) {
    require_device(table, what);
    if (plan.device() != table.device() || plan.elements() != table.total_elements() ||
        plan.segments().size() != table.size()) {
        throw invalid_argument(std::string("loco: ") + what +
                               ": the compress_plan was built for another table");
    }
}

}  // namespace detail

}  // namespace loco::backend::cuda
