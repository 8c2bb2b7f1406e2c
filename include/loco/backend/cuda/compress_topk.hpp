#pragma once
// Fused CUDA top-k sparsification: compress::topk and compress::error_feedback<compress::topk>
// over a tensor_table, with payloads byte for byte the host's (compress/topk.hpp: one segment per
// tensor of the table, in order, as compress.hpp lays out its codecs) and error-feedback
// residuals bit for bit the host's.
//
// The host sorts; a GPU selects. The k largest keys of the definition (topk::magnitude_key, the
// bits of |x| as a u32, NaN above infinity) are found by an MSB-first radix select, 8 bits at a
// time, which yields the k-th largest key T and how many elements equal to T must be sent
// (`need`): every element with key > T is sent, and the `need` lowest-index elements with key ==
// T, which is the host's tie rule (equal magnitudes: lower index first). Everything the selection
// depends on is an exact count, so the result does not depend on the order in which threads run.
// Since k depends only on n and the ratio, the payload layout is known on the host when the plan
// is built and encode needs no host synchronisation.
//
// Passes of encode (n elements, k sent; per pass one CTA per 4096 elements of a tensor):
//   source   e = delta, or global - local (phase 1 fused in, as compress.hpp's encode_source),
//            with error feedback e = decay * residual + s * x (__fmul_rn / __fadd_rn: no fused
//            multiply-add, the host's rounding); e is written to the new residual buffer (or the
//            plan's work buffer without feedback); the histogram of key bits 31..24 is built in
//            shared memory and added to the tensor's global histogram.
//   select   one thread per tensor walks the 256 bins from the top: the bin holding the k-th
//            largest key extends the prefix of T by 8 bits. Then hist of bits 23..16 among keys
//            with that prefix, select, and so on: 4 histogram and 4 select launches in all.
//   count    per CTA: keys > T and keys == T; a scan per tensor in CTA order gives each CTA the
//            number of each before it.
//   write    per CTA: a block scan of per-thread counts gives every selected element its
//            position, gt_before + min(eq_before, need), so indices come out strictly
//            ascending; index and value are written, and with error feedback the residual of a
//            sent element becomes e - e (the host's e - decode(sent): +0 for a finite e, NaN for
//            an infinite or NaN one).
//   then compress.hpp's checksum kernel over the body and its header kernel.
// fp32 delta with error feedback: 8 B/element read + 4 B written by the source pass, e read 5
// more times (20 B), then 12 B per sent element (8 payload + 4 residual) and the checksum's 8 B
// per sent element: about 32 B/element + 20 k/n.
//
// Receiving M payloads (P = 40 + 8 K bytes each, K = sum of k):
//   topk_payload_check  checksum (compress.hpp's kernel) and an index kernel (every index less
//            than its segment's size, strictly ascending) over the M payloads; the headers and a
//            verdict of 16 M bytes go to the host, which throws loco::wire_error naming the
//            first bad rank before anything is written.
//   decode_average  out is zeroed, then for r = 0 .. M-1 in order one kernel adds rank r's
//            values at its indices (the indices of one payload are distinct, so there are no
//            races, and the sums are in rank order: the host exchanger's bits, since adding the
//            +0 of an unsent element never changes a sum that starts at +0), then one pass
//            divides by M. 4 n written by the memset, 8 K read and 4 K read + written per rank,
//            8 n for the division.
//   decode_average_apply  decode_average into the plan's work buffer, then check_padded (when
//            skipping non-finite averages) and outer_apply: the unfused composition, 8 n + 4 n
//            more than a fused apply.
//
// NaN. Every NaN has one selection key and is sent as the canonical quiet NaN
// (topk::magnitude_key, topk::wire_value), so the choice and the payload do not depend on the NaN
// bits the GPU's arithmetic makes. Residuals and averages that are NaN may carry other NaN bits
// than the host's (the residual of a sent infinity, sums in the average): they are NaN where the
// host's are.

#include <loco/backend/cuda/compress.hpp>
#include <loco/backend/cuda/compress/encode_source.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/error_feedback.hpp>
#include <loco/compress/topk.hpp>
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
#include <vector>

namespace loco::backend::cuda {

// device_topk<C>::available: C is compress::topk or error_feedback<compress::topk>.
template <class C>
struct device_topk {
    static constexpr bool available = false;
};

template <>
struct device_topk<compress::topk> {
    static constexpr bool available = true;
    static constexpr bool feedback = false;
    static const compress::topk::hyper& codec_hyper(const compress::topk::hyper& h) noexcept {
        return h;
    }
};

template <>
struct device_topk<compress::error_feedback<compress::topk>> {
    static constexpr bool available = true;
    static constexpr bool feedback = true;
    static const compress::topk::hyper& codec_hyper(
        const compress::error_feedback<compress::topk>::hyper& h) noexcept {
        return h.compress;
    }
};

// Per tensor of the table.
struct topk_tensor {
    std::uint64_t n;
    std::uint64_t k;
    std::uint64_t body;     // the segment's first byte in the payload body
    std::uint64_t padded;   // the tensor's padded offset
    std::uint64_t before;   // indices sent by the tensors before it (sum of their k)
    std::uint32_t first_item;
    std::uint32_t items;
};

// Work of one CTA: elements (or, for index items, indices) [first, first + count) of a tensor.
struct topk_item {
    std::uint64_t first;
    std::uint32_t count;
    std::uint32_t tensor;
};

struct topk_view {
    const topk_tensor* tensors;
    const topk_item* items;        // element items, tensor by tensor
    const topk_item* index_items;  // index items, tensor by tensor
    std::uint32_t* hist;           // 4 x tensors x 256 counts
    std::uint32_t* select;         // tensors x {prefix of T, count still wanted}
    std::uint64_t* counts;         // per element item: (keys > T) << 32 | (keys == T)
    std::uint64_t* offsets;        // per element item: the same counts summed over earlier items
    std::uint32_t tensor_count;
    std::uint32_t reserved;
};

namespace detail {

// Elements of one CTA (256 threads x 16) and indices of one checking or scattering CTA.
inline constexpr std::uint32_t topk_item_elements = 4096;
inline constexpr std::uint32_t topk_per_thread = topk_item_elements / block_threads;
inline constexpr std::uint32_t topk_index_elements = 4096;

// First bad index of a payload (topk_payload_check's verdict): (position << 1) | kind.
inline constexpr unsigned long long topk_bad_range = 0u;
inline constexpr unsigned long long topk_bad_order = 1u;
inline constexpr unsigned long long topk_all_good = ~0ull;

}  // namespace detail

// The payload layout of topk with a given ratio over the tensors of a table, and the workspace of
// encode (histograms, per-CTA counts, and a padded fp32 work buffer: e without error feedback,
// the average in decode_average_apply). Built and uploaded once. Calls using one plan must be
// ordered (one stream): they share the workspace.
class topk_plan {
public:
    topk_plan() = default;

    topk_plan(const tensor_table& table, const compress::topk::hyper& h)
        : hyper_(h), device_(table.device()) {
        compress::topk::validate(h);
        if (table.size() > UINT32_MAX) {
            throw invalid_argument("loco: topk_plan: more than 2^32 segments");
        }
        std::vector<topk_tensor> tensors;
        std::vector<topk_item> items;
        std::vector<topk_item> index_items;
        std::uint64_t body = 0;
        std::uint64_t before = 0;
        for (std::size_t i = 0; i < table.size(); ++i) {
            const std::size_t n = table.spec(i).size;
            if (n > UINT32_MAX) {
                throw shape_error("loco: topk_plan: parameter '" + table.name(i) + "' has " +
                                  std::to_string(n) +
                                  " elements; 32-bit indices address at most 2^32 - 1");
            }
            const std::size_t k = compress::topk::count(h, n);
            const auto t = static_cast<std::uint32_t>(i);
            topk_tensor d{n, k, body, table.padded_offset(i), before,
                          static_cast<std::uint32_t>(items.size()), 0u};
            for (std::size_t first = 0; first < n; first += detail::topk_item_elements) {
                items.push_back({first, static_cast<std::uint32_t>(std::min<std::size_t>(
                                            detail::topk_item_elements, n - first)),
                                 t});
            }
            for (std::size_t first = 0; first < k; first += detail::topk_index_elements) {
                index_items.push_back({first, static_cast<std::uint32_t>(std::min<std::size_t>(
                                                  detail::topk_index_elements, k - first)),
                                       t});
            }
            d.items = static_cast<std::uint32_t>(items.size()) - d.first_item;
            tensors.push_back(d);
            segments_.push_back({table.flat_offset(i), n, 1, n});
            before_.push_back(before);
            body += 8 * k;
            before += k;
        }
        if (items.size() > INT32_MAX || index_items.size() > INT32_MAX) {
            throw invalid_argument("loco: topk_plan: the tensors need more CUDA blocks than a "
                                   "grid holds");
        }
        payload_ = compress::wire::header_bytes + body;
        // The host compressor's own count: the layouts agree or this is a bug.
        if (payload_ != compress::topk::payload_bytes(h, segments_)) {
            throw error("loco: topk_plan: the device layout disagrees with topk::payload_bytes");
        }
        indices_ = before;
        item_count_ = static_cast<std::uint32_t>(items.size());
        index_item_count_ = static_cast<std::uint32_t>(index_items.size());
        elements_ = table.total_elements();
        names_.reserve(table.size());
        for (std::size_t i = 0; i < table.size(); ++i) {
            names_.push_back(table.name(i));
        }

        const auto round_up = [](std::size_t b) {
            return (b + allocation_alignment - 1) / allocation_alignment * allocation_alignment;
        };
        const std::size_t tensor_bytes = round_up(tensors.size() * sizeof(topk_tensor));
        const std::size_t item_bytes = round_up(items.size() * sizeof(topk_item));
        const std::size_t index_bytes = round_up(index_items.size() * sizeof(topk_item));
        std::vector<std::byte> host(tensor_bytes + item_bytes + index_bytes);
        if (!tensors.empty()) {
            std::memcpy(host.data(), tensors.data(), tensors.size() * sizeof(topk_tensor));
        }
        if (!items.empty()) {
            std::memcpy(host.data() + tensor_bytes, items.data(), items.size() * sizeof(topk_item));
        }
        if (!index_items.empty()) {
            std::memcpy(host.data() + tensor_bytes + item_bytes, index_items.data(),
                        index_items.size() * sizeof(topk_item));
        }
        memory_ = device_buffer<std::byte>(std::max<std::size_t>(host.size(), 1));
        if (!host.empty()) {
            memory_.upload(host);
        }
        hist_ = device_buffer<std::uint32_t>(std::max<std::size_t>(hist_words(), 1));
        select_ = device_buffer<std::uint32_t>(std::max<std::size_t>(2 * tensors.size(), 1));
        counts_ = device_buffer<std::uint64_t>(std::max<std::size_t>(2 * items.size(), 1));
        work_ = device_buffer<float>(std::max<std::size_t>(table.padded_elements(), 1));
        sum_ = device_buffer<unsigned long long>(1);
        view_.tensors = reinterpret_cast<const topk_tensor*>(memory_.get());
        view_.items = reinterpret_cast<const topk_item*>(memory_.get() + tensor_bytes);
        view_.index_items =
            reinterpret_cast<const topk_item*>(memory_.get() + tensor_bytes + item_bytes);
        view_.hist = hist_.get();
        view_.select = select_.get();
        view_.counts = counts_.get();
        view_.offsets = counts_.get() + items.size();
        view_.tensor_count = static_cast<std::uint32_t>(tensors.size());
    }

    const compress::topk::hyper& hyper() const noexcept { return hyper_; }
    // Bytes of one payload, header included (topk::payload_bytes of segments()).
    std::size_t payload_bytes() const noexcept { return payload_; }
    // The host compressor's segments: one per tensor, flat offsets.
    const std::vector<compress::segment>& segments() const noexcept { return segments_; }
    std::size_t elements() const noexcept { return elements_; }
    // Indices one payload carries (the sum of the tensors' k).
    std::size_t indices() const noexcept { return indices_; }
    std::uint32_t items() const noexcept { return item_count_; }
    std::uint32_t index_items() const noexcept { return index_item_count_; }
    int device() const noexcept { return device_; }
    const topk_view& view() const noexcept { return view_; }
    std::size_t hist_words() const noexcept { return 4 * 256 * segments_.size(); }
    float* work() const noexcept { return work_.get(); }
    unsigned long long* checksum_accumulator() const noexcept { return sum_.get(); }
    // For messages: tensor i's name and the indices sent before its segment.
    const std::string& name(std::size_t i) const { return names_.at(i); }
    const std::vector<std::uint64_t>& indices_before() const noexcept { return before_; }

    // The header's first 32 bytes (topk: bits 32, flags 0, block = the bits of the ratio).
    compress::wire::header wire_header() const {
        return {compress::topk::wire_id, 32, 0, loco::detail::float_bits(hyper_.ratio),
                static_cast<std::uint32_t>(segments_.size()), elements_,
                payload_ - compress::wire::header_bytes};
    }
    header_prefix prefix() const { return detail::prefix_bytes(wire_header()); }

private:
    compress::topk::hyper hyper_{};
    std::vector<compress::segment> segments_;
    std::vector<std::uint64_t> before_;
    std::vector<std::string> names_;
    std::size_t payload_ = compress::wire::header_bytes;
    std::size_t elements_ = 0;
    std::size_t indices_ = 0;
    std::uint32_t item_count_ = 0;
    std::uint32_t index_item_count_ = 0;
    int device_ = 0;
    device_buffer<std::byte> memory_;
    device_buffer<std::uint32_t> hist_;
    device_buffer<std::uint32_t> select_;
    device_buffer<std::uint64_t> counts_;
    device_buffer<float> work_;
    device_buffer<unsigned long long> sum_;
    topk_view view_{};
};

namespace detail {

#if LOCO_HAS_CUDA()

__device__ __forceinline__ std::uint32_t topk_key(float x) {
    return compress::topk::magnitude_key(x);
}

// Exclusive prefix sum over the CTA's threads (in thread order) of v; *total gets the sum. All
// threads take part. (Shared memory and barriers only: no warp intrinsics.)
__device__ __forceinline__ std::uint64_t topk_block_scan(std::uint64_t v, std::uint64_t* total) {
    __shared__ std::uint64_t scan[block_threads];
    const unsigned t = threadIdx.x;
    scan[t] = v;
    __syncthreads();
    for (unsigned off = 1; off < block_threads; off *= 2) {
        const std::uint64_t add = t >= off ? scan[t - off] : 0;
        __syncthreads();
        scan[t] += add;
        __syncthreads();
    }
    const std::uint64_t inclusive = scan[t];
    *total = scan[block_threads - 1];
    __syncthreads();  // scan[] is reused by the next call
    return inclusive - v;
}

// Adds a CTA's shared histogram to the tensor's global one (nonzero bins only).
__device__ __forceinline__ void topk_flush_hist(const std::uint32_t* local, std::uint32_t* global) {
    __syncthreads();
    for (unsigned b = threadIdx.x; b < 256; b += block_threads) {
        if (local[b] != 0) {
            atomicAdd(global + b, local[b]);
        }
    }
}

__device__ __forceinline__ void topk_clear_hist(std::uint32_t* local) {
    for (unsigned b = threadIdx.x; b < 256; b += block_threads) {
        local[b] = 0;
    }
    __syncthreads();
}

// The source pass over one item: e written to `e_out` (padded layout, tensor's element 0), the
// histogram of key bits 31..24 counted into `local`.
template <bool Feedback, encode_from From, class P, bool UseMaster>
__device__ __forceinline__ void topk_source_item(const tensor_desc& d, const topk_item& item,
                                                 const encode_params& a, float* e_out,
                                                 std::uint32_t* local) {
    const auto src = source_of<Feedback, From, P, UseMaster>(d, a, false);
    const std::uint64_t end = item.first + item.count;
    for (std::uint64_t j = item.first + threadIdx.x; j < end; j += block_threads) {
        const float e = src.load1(j);
        e_out[j] = e;
        atomicAdd(local + (topk_key(e) >> 24), 1u);
    }
}

template <bool Feedback, encode_from From, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads)
    topk_source_kernel(table_view t, topk_view v, encode_params a, float* e_base) {
    __shared__ std::uint32_t local[256];
    const topk_item item = v.items[blockIdx.x];
    const tensor_desc d = t.tensors[item.tensor];
    float* e_out = e_base + d.padded_offset;
    topk_clear_hist(local);
    if constexpr (From == encode_from::delta) {
        topk_source_item<Feedback, From, float, false>(d, item, a, e_out, local);
    } else {
        if (d.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                topk_source_item<Feedback, From, loco::bf16, reads_master<loco::bf16, Mode>>(
                    d, item, a, e_out, local);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                topk_source_item<Feedback, From, float, false>(d, item, a, e_out, local);
            }
        }
    }
    topk_flush_hist(local, v.hist + static_cast<std::uint64_t>(item.tensor) * 256);
}

// Histogram of key bits [24 - 8 Pass, 32 - 8 Pass) among the keys whose higher bits are the
// prefix selected so far.
template <int Pass>
__global__ void __launch_bounds__(block_threads)
    topk_hist_kernel(topk_view v, const float* e_base) {
    constexpr unsigned shift = 24 - 8 * Pass;
    __shared__ std::uint32_t local[256];
    const topk_item item = v.items[blockIdx.x];
    const topk_tensor d = v.tensors[item.tensor];
    const std::uint32_t high = v.select[2 * item.tensor] >> (shift + 8);
    const float* e = e_base + d.padded;
    topk_clear_hist(local);
    const std::uint64_t end = item.first + item.count;
    for (std::uint64_t j = item.first + threadIdx.x; j < end; j += block_threads) {
        const std::uint32_t key = topk_key(e[j]);
        if ((key >> (shift + 8)) == high) {
            atomicAdd(local + ((key >> shift) & 255u), 1u);
        }
    }
    topk_flush_hist(local,
                    v.hist + (static_cast<std::uint64_t>(Pass) * v.tensor_count + item.tensor) *
                                 256);
}

// One thread per tensor: the bin of pass Pass holding the wanted key extends the prefix of T;
// the count still wanted drops by the keys of the higher bins.
template <int Pass>
__global__ void __launch_bounds__(block_threads) topk_select_kernel(topk_view v) {
    constexpr unsigned shift = 24 - 8 * Pass;
    const std::uint64_t i = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (i >= v.tensor_count) {
        return;
    }
    const topk_tensor d = v.tensors[i];
    if (d.k == 0) {
        return;
    }
    std::uint32_t prefix = Pass == 0 ? 0u : v.select[2 * i];
    std::uint32_t wanted = Pass == 0 ? static_cast<std::uint32_t>(d.k) : v.select[2 * i + 1];
    const std::uint32_t* h = v.hist + (static_cast<std::uint64_t>(Pass) * v.tensor_count + i) * 256;
    for (unsigned b = 256; b-- > 0;) {
        const std::uint32_t c = h[b];
        if (c >= wanted) {
            prefix |= static_cast<std::uint32_t>(b) << shift;
            break;
        }
        wanted -= c;
    }
    v.select[2 * i] = prefix;
    v.select[2 * i + 1] = wanted;
}

// Per item: keys > T and keys == T.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    topk_count_kernel(topk_view v, const float* e_base) {
    const topk_item item = v.items[blockIdx.x];
    const topk_tensor d = v.tensors[item.tensor];
    const std::uint32_t threshold = v.select[2 * item.tensor];
    const float* e = e_base + d.padded;
    std::uint64_t mine = 0;
    const std::uint64_t end = item.first + item.count;
    for (std::uint64_t j = item.first + threadIdx.x; j < end; j += block_threads) {
        const std::uint32_t key = topk_key(e[j]);
        mine += key > threshold ? (std::uint64_t{1} << 32) : (key == threshold ? 1u : 0u);
    }
    std::uint64_t total = 0;
    topk_block_scan(mine, &total);
    if (threadIdx.x == 0) {
        v.counts[blockIdx.x] = total;
    }
}

// One CTA per tensor: exclusive sums of the item counts in item order. (The packed counts add
// without carries: each half stays below 2^32, the tensor's size.)
template <int = 0>
__global__ void __launch_bounds__(block_threads) topk_scan_kernel(topk_view v) {
    const topk_tensor d = v.tensors[blockIdx.x];
    if (d.items <= 1) {  // the common case of a small tensor: no scan (the branch is CTA-wide)
        if (d.items == 1 && threadIdx.x == 0) {
            v.offsets[d.first_item] = 0;
        }
        return;
    }
    const std::uint32_t per = (d.items + block_threads - 1) / block_threads;
    const std::uint32_t first = d.first_item + threadIdx.x * per;
    const std::uint32_t last = d.first_item + d.items;
    std::uint64_t mine = 0;
    for (std::uint32_t i = first; i < last && i < first + per; ++i) {
        mine += v.counts[i];
    }
    std::uint64_t total = 0;
    std::uint64_t at = topk_block_scan(mine, &total);
    for (std::uint32_t i = first; i < last && i < first + per; ++i) {
        v.offsets[i] = at;
        at += v.counts[i];
    }
}

// Per item: the selected elements' positions, their indices and values; with Feedback the
// residual of each sent element becomes e - e.
template <bool Feedback>
__global__ void __launch_bounds__(block_threads)
    topk_write_kernel(topk_view v, float* e_base, std::byte* payload) {
    __shared__ float tile[topk_item_elements];
    const topk_item item = v.items[blockIdx.x];
    const topk_tensor d = v.tensors[item.tensor];
    const std::uint32_t threshold = v.select[2 * item.tensor];
    const std::uint32_t need = v.select[2 * item.tensor + 1];
    float* e = e_base + d.padded + item.first;
    for (std::uint32_t j = threadIdx.x; j < item.count; j += block_threads) {
        tile[j] = e[j];
    }
    __syncthreads();
    // Thread t takes elements [16 t, 16 t + 16) of the item, so positions follow thread order.
    const std::uint32_t lo = threadIdx.x * topk_per_thread;
    const std::uint32_t hi = lo + topk_per_thread < item.count ? lo + topk_per_thread : item.count;
    std::uint64_t mine = 0;
    for (std::uint32_t j = lo; j < hi; ++j) {
        const std::uint32_t key = topk_key(tile[j]);
        mine += key > threshold ? (std::uint64_t{1} << 32) : (key == threshold ? 1u : 0u);
    }
    std::uint64_t total = 0;
    const std::uint64_t before = topk_block_scan(mine, &total) + v.offsets[blockIdx.x];
    std::uint64_t gt = before >> 32;
    std::uint64_t eq = before & 0xffffffffu;
    auto* seg = payload + compress::wire::header_bytes + d.body;
    auto* indices = reinterpret_cast<std::uint32_t*>(seg);
    auto* values = reinterpret_cast<float*>(seg + 4 * d.k);
    for (std::uint32_t j = lo; j < hi; ++j) {
        const float x = tile[j];
        const std::uint32_t key = topk_key(x);
        std::uint64_t at = ~std::uint64_t{0};
        if (key > threshold) {
            at = gt + (eq < need ? eq : need);
            ++gt;
        } else if (key == threshold) {
            if (eq < need) {
                at = gt + eq;
            }
            ++eq;
        }
        if (at != ~std::uint64_t{0}) {
            indices[at] = static_cast<std::uint32_t>(item.first + j);
            values[at] = compress::topk::wire_value(x);
            if constexpr (Feedback) {  // e - decode(sent): +0, or NaN (a NaN or infinite e)
                e[j] = __fsub_rn(x, compress::topk::wire_value(x));
            }
        }
    }
}

// Payload checks: every index less than its segment's size and above the one before it. CTA x
// takes payload x / index_items, index item x % index_items.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    topk_check_kernel(topk_view v, gathered_payloads g, std::uint32_t index_items,
                      unsigned long long* first_bad) {
    const std::uint32_t rank = blockIdx.x / index_items;
    const topk_item item = v.index_items[blockIdx.x % index_items];
    const topk_tensor d = v.tensors[item.tensor];
    const auto* indices = reinterpret_cast<const std::uint32_t*>(
        g.base + rank * g.stride + compress::wire::header_bytes + d.body);
    unsigned long long bad = topk_all_good;
    const std::uint64_t end = item.first + item.count;
    for (std::uint64_t j = item.first + threadIdx.x; j < end; j += block_threads) {
        const std::uint32_t i = indices[j];
        unsigned long long code = topk_all_good;
        if (i >= d.n) {
            code = ((d.before + j) << 1) | topk_bad_range;
        } else if (j > 0 && i <= indices[j - 1]) {
            code = ((d.before + j) << 1) | topk_bad_order;
        }
        bad = code < bad ? code : bad;
    }
    if (bad != topk_all_good) {
        atomicMin(first_bad + rank, bad);
    }
}

// out[index] += value for one payload's pairs (an index out of range is skipped: a payload that
// was not checked never writes out of bounds).
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    topk_scatter_kernel(topk_view v, const std::byte* payload, float* out) {
    const topk_item item = v.index_items[blockIdx.x];
    const topk_tensor d = v.tensors[item.tensor];
    const std::byte* seg = payload + compress::wire::header_bytes + d.body;
    const auto* indices = reinterpret_cast<const std::uint32_t*>(seg);
    const auto* values = reinterpret_cast<const float*>(seg + 4 * d.k);
    float* o = out + d.padded;
    const std::uint64_t end = item.first + item.count;
    for (std::uint64_t j = item.first + threadIdx.x; j < end; j += block_threads) {
        const std::uint32_t i = indices[j];
        if (i < d.n) {
            o[i] = __fadd_rn(o[i], values[j]);
        }
    }
}

// The rank-order sums divided by M, as the host exchanger divides (a power of two: times the
// exact 1 / M, the same correctly rounded value).
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    topk_divide_kernel(float* out, std::uint64_t n, std::uint32_t ranks) {
    const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * block_threads;
    const float m = static_cast<float>(ranks);
    const bool power = (ranks & (ranks - 1)) == 0;
    const float inverse = 1.0f / m;
    for (std::uint64_t i = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
         i < n; i += stride) {
        out[i] = power ? __fmul_rn(out[i], inverse) : out[i] / m;
    }
}

#endif  // LOCO_HAS_CUDA()

inline void require_topk_plan(const topk_plan& plan, const tensor_table& table, const char* what) {
    require_device(table, what);
    if (plan.device() != table.device() || plan.elements() != table.total_elements() ||
        plan.segments().size() != table.size()) {
        throw invalid_argument(std::string("loco: ") + what +
                               ": the topk_plan was built for another table");
    }
    for (std::size_t i = 0; i < table.size(); ++i) {
        if (plan.segments()[i].size != table.spec(i).size ||
            plan.segments()[i].offset != table.flat_offset(i)) {
            throw invalid_argument(std::string("loco: ") + what +
                                   ": the topk_plan was built for another table");
        }
    }
}

inline void require_same_ratio(const topk_plan& plan, const compress::topk::hyper& h,
                               const char* what) {
    if (loco::detail::float_bits(h.ratio) != loco::detail::float_bits(plan.hyper().ratio)) {
        throw invalid_argument(std::string("loco: ") + what +
                               ": the ratio differs from the topk_plan's");
    }
}

}  // namespace detail

// ---- encode ------------------------------------------------------------------------------------

// Encodes the pseudo-gradient of every tensor of `table` into io.payload (plan.payload_bytes(),
// 4-byte aligned): the host's topk::encode / error_feedback<topk>::encode byte for byte. C is
// compress::topk or error_feedback<compress::topk>, with h's ratio the plan's. With error
// feedback, io.residual is read and io.next_residual written (padded layout; may equal
// io.residual; padding untouched), exactly as error_feedback::encode updates the residual. x is
// read as From says (see compress.hpp's encode). Asynchronous on `stream`; no host
// synchronisation.
template <class C, encode_from From, bf16_update Mode = bf16_update::master,
          unsigned Combos = combos::all>
void encode_topk(const topk_plan& plan, const tensor_table& table, const typename C::hyper& h,
                 const encode_io& io, const device_encode_context& ctx, cudaStream_t stream) {
    static_assert(device_topk<C>::available,
                  "loco: cuda::encode_topk needs compress::topk or error_feedback<topk>");
    constexpr bool feedback = device_topk<C>::feedback;
    constexpr const char* what = "cuda::encode_topk";
    loco::detail::validate_hyper<C>(h);
    const compress::topk::hyper& ch = device_topk<C>::codec_hyper(h);
    detail::require_topk_plan(plan, table, what);
    detail::require_same_ratio(plan, ch, what);
    detail::require_combos(table, Combos, what);
    const detail::encode_params a =
        detail::encode_inputs<From, Mode, feedback>(table, io, h, ctx, what);
    float* e = feedback ? io.next_residual : plan.work();
    const std::uint64_t len = plan.payload_bytes() - compress::wire::header_bytes;
    LOCO_CUDA_CHECK(
        cudaMemsetAsync(plan.checksum_accumulator(), 0, sizeof(unsigned long long), stream));
    if (plan.hist_words() != 0) {
        LOCO_CUDA_CHECK(cudaMemsetAsync(plan.view().hist, 0,
                                        plan.hist_words() * sizeof(std::uint32_t), stream));
    }
#if LOCO_HAS_CUDA()
    const topk_view& v = plan.view();
    const std::uint32_t items = plan.items();
    const auto tensors = static_cast<std::uint32_t>(plan.segments().size());
    const std::uint32_t per_tensor_grid = (tensors + block_threads - 1) / block_threads;
    if (items != 0) {
        LOCO_CUDA_CHECK(detail::launch(detail::topk_source_kernel<feedback, From, Mode, Combos>,
                                       items, stream, table.view(), v, a, e));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_select_kernel<0>, per_tensor_grid, stream, v));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_hist_kernel<1>, items, stream, v,
                                       static_cast<const float*>(e)));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_select_kernel<1>, per_tensor_grid, stream, v));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_hist_kernel<2>, items, stream, v,
                                       static_cast<const float*>(e)));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_select_kernel<2>, per_tensor_grid, stream, v));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_hist_kernel<3>, items, stream, v,
                                       static_cast<const float*>(e)));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_select_kernel<3>, per_tensor_grid, stream, v));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_count_kernel<>, items, stream, v,
                                       static_cast<const float*>(e)));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_scan_kernel<>, tensors, stream, v));
        LOCO_CUDA_CHECK(detail::launch(detail::topk_write_kernel<feedback>, items, stream, v, e,
                                       io.payload));
    }
    const gathered_payloads self{io.payload, plan.payload_bytes(), 1, 0};
    detail::launch_checksum(self, len, plan.checksum_accumulator(), stream);
    LOCO_CUDA_CHECK(detail::launch(detail::header_kernel<>, 1, stream, io.payload, plan.prefix(),
                                   plan.checksum_accumulator(), len));
#else
    static_cast<void>(e);
    static_cast<void>(len);
#endif
}

// ---- verify ------------------------------------------------------------------------------------

// Checks M gathered payloads of a topk plan as the host decoder would: wire::open's header fields
// and checksum, then every index less than its segment's size and strictly ascending. Owns the
// device verdict and the pinned host copy.
class topk_payload_check {
public:
    topk_payload_check() = default;
    explicit topk_payload_check(int ranks)
        : ranks_(checked(ranks)),
          verdict_(2 * ranks_),
          host_(2 * ranks_ + (compress::wire::header_bytes * ranks_ + 7) / 8) {}

    // Blocks until the checks are done (one host synchronisation). Throws loco::wire_error
    // naming the first bad rank and what the host decoder would refuse.
    void run(const topk_plan& plan, const tensor_table& table, const std::byte* gathered,
             cudaStream_t stream) {
        constexpr const char* what = "cuda::topk_payload_check";
        detail::require_topk_plan(plan, table, what);
        detail::require_payload_pointer(gathered, "gathered payloads", what);
        const std::size_t m = ranks_;
        const std::uint64_t p = plan.payload_bytes();
        const std::uint64_t len = p - compress::wire::header_bytes;
        LOCO_CUDA_CHECK(cudaMemsetAsync(verdict_.get(), 0, m * 8, stream));
        LOCO_CUDA_CHECK(cudaMemsetAsync(verdict_.get() + m, 0xff, m * 8, stream));
        const gathered_payloads g{gathered, p, static_cast<std::uint32_t>(m), 0};
        detail::launch_checksum(g, len, verdict_.get(), stream);
        const std::uint64_t grid = static_cast<std::uint64_t>(plan.index_items()) * m;
        if (grid > INT32_MAX) {
            throw invalid_argument("loco: topk_payload_check: payloads too large for one grid");
        }
#if LOCO_HAS_CUDA()
        if (grid != 0) {
            LOCO_CUDA_CHECK(detail::launch(detail::topk_check_kernel<>,
                                           static_cast<std::uint32_t>(grid), stream, plan.view(),
                                           g, plan.index_items(), verdict_.get() + m));
        }
#endif
        unsigned long long* host = host_.get();
        auto* headers = reinterpret_cast<std::byte*>(host + 2 * m);
        LOCO_CUDA_CHECK(cudaMemcpyAsync(host, verdict_.get(), 2 * m * 8, cudaMemcpyDeviceToHost,
                                        stream));
        for (std::size_t k = 0; k < m; ++k) {
            LOCO_CUDA_CHECK(cudaMemcpyAsync(headers + k * compress::wire::header_bytes,
                                            gathered + k * p, compress::wire::header_bytes,
                                            cudaMemcpyDeviceToHost, stream));
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        const compress::wire::header want = plan.wire_header();
        for (std::size_t k = 0; k < m; ++k) {
            detail::check_header(compress::topk::name, k,
                                 headers + k * compress::wire::header_bytes, want, host[k] + len);
            check_indices(plan, k, host[m + k]);
        }
    }

    std::size_t ranks() const noexcept { return ranks_; }

private:
    static std::size_t checked(int ranks) {
        if (ranks < 1) {
            throw invalid_argument("loco: topk_payload_check needs at least one rank");
        }
        return static_cast<std::size_t>(ranks);
    }

    // topk::decode's index checks, after the header's.
    static void check_indices(const topk_plan& plan, std::size_t k, unsigned long long first_bad) {
        const auto fail = [&](const std::string& why) {
            return detail::malformed_payload(compress::topk::name, k, why);
        };
        if (first_bad == detail::topk_all_good) {
            return;
        }
        // The position (over all segments) of the first bad index: its segment and place in it.
        const std::uint64_t position = first_bad >> 1;
        const auto& before = plan.indices_before();
        const auto s = static_cast<std::size_t>(
            std::upper_bound(before.begin(), before.end(), position) - before.begin() - 1);
        const std::string where = "index " + std::to_string(position - before[s]) +
                                  " of segment " + std::to_string(s) + " ('" + plan.name(s) +
                                  "', " + std::to_string(plan.segments()[s].size) +
                                  " elements)";
        if ((first_bad & 1u) == detail::topk_bad_range) {
            throw fail(where + " is not less than the segment's size");
        }
        throw fail(where + ": indices are not strictly ascending");
    }

    std::size_t ranks_ = 0;
    device_buffer<unsigned long long> verdict_;  // [0, M) checksum sums, [M, 2M) first bad index
    pinned_buffer<unsigned long long> host_;
};

// ---- decode ------------------------------------------------------------------------------------

// out := the average of M topk payloads (gathered: M payloads of plan.payload_bytes() each, rank
// order), fp32 sums in rank order then a division, as the host exchanger computes it; padded
// layout, padding 0. The payloads must have passed topk_payload_check (an unchecked payload never
// writes out of bounds, but duplicate indices would make the sums depend on timing).
inline void decode_average_topk(const topk_plan& plan, const tensor_table& table,
                                const std::byte* gathered, int ranks, float* out,
                                cudaStream_t stream) {
    constexpr const char* what = "cuda::decode_average_topk";
    detail::require_topk_plan(plan, table, what);
    detail::require_payload_pointer(gathered, "gathered payloads", what);
    detail::require_pointer(out, table.padded_elements(), "out", what);
    if (ranks < 1) {
        throw invalid_argument("loco: cuda::decode_average_topk needs at least one payload");
    }
    const std::size_t padded = table.padded_elements();
    if (padded != 0) {
        LOCO_CUDA_CHECK(cudaMemsetAsync(out, 0, padded * sizeof(float), stream));
    }
#if LOCO_HAS_CUDA()
    if (plan.index_items() != 0) {
        for (int r = 0; r < ranks; ++r) {  // in rank order: the host's order of the sums
            LOCO_CUDA_CHECK(detail::launch(detail::topk_scatter_kernel<>, plan.index_items(),
                                           stream, plan.view(),
                                           gathered + static_cast<std::size_t>(r) *
                                                          plan.payload_bytes(),
                                           out));
        }
    }
    if (padded != 0) {
        const std::uint64_t blocks =
            std::min<std::uint64_t>((padded + block_threads - 1) / block_threads, 4096);
        LOCO_CUDA_CHECK(detail::launch(detail::topk_divide_kernel<>,
                                       static_cast<std::uint32_t>(blocks), stream, out,
                                       static_cast<std::uint64_t>(padded),
                                       static_cast<std::uint32_t>(ranks)));
    }
#else
    static_cast<void>(stream);
#endif
}

// Phase 2 of a topk sync: the average (decode_average_topk into the plan's work buffer), then,
// with skip_nonfinite, check_padded on it, and outer_apply: global and the outer state take one
// Outer::update and the new values go to the parameters and masters (see outer_apply).
template <class Outer, bf16_update Mode = bf16_update::master, unsigned Combos = combos::all>
void decode_average_apply_topk(const topk_plan& plan, const tensor_table& table,
                               const std::byte* gathered, int ranks, float* global, float* state,
                               float* master, const typename Outer::hyper* hyper,
                               step_control* control, bool skip_nonfinite, cudaStream_t stream) {
    decode_average_topk(plan, table, gathered, ranks, plan.work(), stream);
    if (skip_nonfinite) {
        check_padded(table, plan.work(), control, stream);
    }
    outer_apply<Outer, Mode, Combos>(table, global, plan.work(), state, master, hyper, control,
                                     skip_nonfinite, stream);
}

}  // namespace loco::backend::cuda
