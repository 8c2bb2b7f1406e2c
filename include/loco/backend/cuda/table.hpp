#pragma once
// The device-resident tensor table: what every fused kernel reads to find its work.
//
// Built once from the list of tensors (the pointers of a model's parameters and gradients are
// stable), uploaded once, and then passed to every launch as a small struct of device pointers:
// no kernel-argument size limit and no per-step walk over the tensors on the host.
//
// Layouts. loco's flat layout puts tensor i's element k at flat_offset(i) + k (as
// loco::parameter_list does). The CUDA state arrays use the padded layout instead: every tensor's
// slice starts at padded_offset(i), a multiple of 8 elements, so that 16-byte vector accesses are
// aligned in every slice of every fp32 or bf16 state array; the padding elements are zero and stay
// zero. A state array of the padded layout holds padded_elements() elements, and array j of a
// policy's state starts at j * padded_elements(). The fp32 master copies of bf16 parameters have
// their own padded layout over the bf16 tensors only (master_offset(i), master_elements()).
// to_flat()/from_flat() convert between the padded layout and loco's flat one (checkpoints, tests).
//
// Work split. The tensors are cut into segments and the segments grouped into blocks of at most
// block_elements "cost units" (a segment costs its padded length plus segment_cost, so that a block
// of many tiny tensors does not serialise too many of them); a CUDA block of block_threads threads
// takes one group. Segments start at multiples of 8 elements within their tensor. Element indices
// inside a segment fit in 32 bits; everything across tensors is 64-bit.

#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/detail/overlap.hpp>
#include <loco/error.hpp>
#include <loco/params.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco::backend::cuda {

inline constexpr unsigned block_threads = 256;
inline constexpr std::uint32_t block_elements = 16384;
inline constexpr std::uint32_t segment_cost = 1024;
inline constexpr std::uint32_t max_segments_per_block = block_elements / (segment_cost + 8) + 1;
inline constexpr std::size_t pad_elements = 8;

// tensor_desc::aligned bits: the value (resp. the gradient, or there is none) starts on a
// 16-byte boundary, so the kernels may use vector accesses on it.
inline constexpr std::uint32_t value_aligned = 1u;
inline constexpr std::uint32_t grad_aligned = 2u;

constexpr std::size_t padded_size(std::size_t n) noexcept {
    return (n + pad_elements - 1) / pad_elements * pad_elements;
}

// One tensor as the caller describes it. `grad` may be null for every tensor of a table that is
// only used by the outer phases; it must then be null for all of them.
struct tensor_spec {
    std::string name;
    void* value = nullptr;
    dtype value_type = dtype::f32;
    const void* grad = nullptr;
    dtype grad_type = dtype::f32;
    std::size_t size = 0;
    // A row-major matrix's shape, rows * cols == size; 0 x 0 for none. Compressors that cut
    // matrices into chunks (SparseLoCo, DeMo) and checkpoints (which refuse a matrix of another
    // shape) use it; without it the tensor is flat.
    std::size_t rows = 0;
    std::size_t cols = 0;
};

// The device copy of a tensor_spec, with its offsets.
struct tensor_desc {
    void* value;
    const void* grad;
    std::uint64_t size;
    std::uint64_t flat_offset;
    std::uint64_t padded_offset;
    std::uint64_t master_offset;  // meaningful for bf16 values only
    std::uint32_t combo;          // combo_index(value type, grad type)
    std::uint32_t aligned;        // value_aligned | grad_aligned: where 16-byte vectors apply
};

struct segment {
    std::uint32_t tensor;
    std::uint32_t len;   // elements of the tensor in this segment
    std::uint32_t span;  // len plus the tensor's padding when the segment ends the tensor
    std::uint32_t reserved;
    std::uint64_t begin;  // first element within the tensor, a multiple of 8
};

// What the kernels receive (by value).
struct table_view {
    const tensor_desc* tensors;
    const segment* segments;
    const std::uint32_t* block_first;  // blocks + 1 entries: block b owns [block_first[b], [b+1])
    std::uint32_t blocks;              // >= 1, so that bookkeeping kernels always run
    std::uint64_t padded_total;
    std::uint64_t master_total;
};

// Where a flat index falls.
struct flat_position {
    std::size_t tensor;
    std::size_t element;
};

class tensor_table {
public:
    tensor_table() = default;

    // Checks every tensor (sizes, alignment of its element type, device memory on the current
    // device, no parameter overlapping another tensor) and uploads the table. Throws
    // memory_space_error naming the tensor when a pointer is not device memory of this GPU,
    // invalid_argument or shape_error for the other mistakes; nothing is allocated then.
    explicit tensor_table(std::vector<tensor_spec> specs) : specs_(std::move(specs)) {
        device_ = current_device();
        validate();
        layout();
        upload();
    }

    // Tensors `indices` of `whole`, in that order, as a table of their own: the outer phases of
    // one fragment of the model (loco::diloco's streaming schedules) run over it. It has its own
    // flat and padded layouts but keeps `whole`'s master layout, so that the fp32 masters of bf16
    // values stay one array (the inner optimizer's). The tensors were checked by `whole`.
    tensor_table(const tensor_table& whole, std::span<const std::size_t> indices) {
        device_ = whole.device_;
        has_grads_ = whole.has_grads_;
        specs_.reserve(indices.size());
        for (const std::size_t i : indices) specs_.push_back(whole.specs_.at(i));
        layout();
        for (std::size_t k = 0; k < indices.size(); ++k) {
            descs_[k].master_offset = whole.descs_[indices[k]].master_offset;
        }
        master_total_ = whole.master_total_;
        upload();
    }

    // The fp32 parameters and gradients of a loco::parameter_list in CUDA memory.
    static tensor_table from(const parameter_list& params) {
        std::vector<tensor_spec> specs;
        specs.reserve(params.size());
        for (const auto& p : params) {
            if (p.value.space != memory_space::cuda && p.value.size != 0) {
                throw memory_space_error("loco: parameter '" + p.name + "' is declared in " +
                                         std::string(loco::to_string(p.value.space)) +
                                         " memory; the CUDA backend needs cuda tensors");
            }
            tensor_spec spec{p.name, p.value.data, dtype::f32, p.grad.data, dtype::f32,
                             p.value.size};
            if (p.value.is_matrix()) {
                spec.rows = p.value.rows;
                spec.cols = p.value.cols;
            }
            specs.push_back(std::move(spec));
        }
        return tensor_table(std::move(specs));
    }

    std::size_t size() const noexcept { return specs_.size(); }
    const tensor_spec& spec(std::size_t i) const { return specs_.at(i); }
    const std::string& name(std::size_t i) const { return specs_.at(i).name; }
    std::size_t flat_offset(std::size_t i) const { return descs_.at(i).flat_offset; }
    std::size_t padded_offset(std::size_t i) const { return descs_.at(i).padded_offset; }
    // Meaningful when spec(i).value_type is bf16.
    std::size_t master_offset(std::size_t i) const { return descs_.at(i).master_offset; }
    // Value and gradient both 16-byte aligned (the kernels' vector paths apply to the tensor).
    bool aligned(std::size_t i) const {
        return descs_.at(i).aligned == (value_aligned | grad_aligned);
    }

    std::size_t total_elements() const noexcept { return total_; }
    std::size_t padded_elements() const noexcept { return padded_total_; }
    std::size_t master_elements() const noexcept { return master_total_; }
    bool has_gradients() const noexcept { return has_grads_; }
    bool has_bf16_values() const noexcept { return master_total_ != 0; }
    // combo_bit() of every (value, grad) dtype pair present.
    unsigned combos_present() const noexcept { return combos_; }
    int device() const noexcept { return device_; }
    std::uint32_t blocks() const noexcept { return view_.blocks; }
    std::size_t segments() const noexcept { return segment_count_; }
    const table_view& view() const noexcept { return view_; }

    // The tensor and element of a flat index (< total_elements()).
    flat_position locate(std::size_t flat) const {
        if (flat >= total_) {
            throw invalid_argument("loco: flat index " + std::to_string(flat) +
                                   " is outside the table's " + std::to_string(total_) +
                                   " elements");
        }
        // The last tensor starting at or before `flat` that is not empty holds it.
        std::size_t lo = 0, hi = descs_.size();
        while (hi - lo > 1) {
            const std::size_t mid = lo + (hi - lo) / 2;
            if (descs_[mid].flat_offset <= flat) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        while (descs_[lo].size == 0 || flat >= descs_[lo].flat_offset + descs_[lo].size) {
            ++lo;
        }
        return {lo, flat - descs_[lo].flat_offset};
    }

private:
    std::string where(std::size_t i) const { return "loco: parameter '" + specs_[i].name + "': "; }

    void validate() {
        has_grads_ = !specs_.empty() && std::any_of(specs_.begin(), specs_.end(), [](const auto& s) {
            return s.grad != nullptr;
        });
        for (std::size_t i = 0; i < specs_.size(); ++i) {
            const tensor_spec& s = specs_[i];
            check_shape(i);
            if (s.size == 0) {
                continue;
            }
            if (s.value == nullptr) {
                throw invalid_argument(where(i) + "null value pointer for a non-empty tensor");
            }
            if (has_grads_ && s.grad == nullptr) {
                throw invalid_argument(where(i) +
                                       "no gradient, but other tensors of the table have one");
            }
            check_pointer(i, s.value, s.value_type, "value");
            if (has_grads_) {
                check_pointer(i, s.grad, s.grad_type, "gradient");
            }
        }
        check_no_overlap();
    }

    // No shape, or one that holds exactly the tensor's elements.
    void check_shape(std::size_t i) const {
        const tensor_spec& s = specs_[i];
        if (s.rows == 0 && s.cols == 0) {
            return;
        }
        if (s.rows == 0 || s.cols == 0 || loco::detail::element_count_overflows(s.rows, s.cols) ||
            s.rows * s.cols != s.size) {
            throw shape_error(where(i) + "its shape " + std::to_string(s.rows) + " x " +
                              std::to_string(s.cols) + " does not hold its " +
                              std::to_string(s.size) +
                              " elements; give rows * cols == size, or 0 x 0 for a flat tensor");
        }
    }

    void check_pointer(std::size_t i, const void* p, dtype t, const char* what) const {
        const auto address = reinterpret_cast<std::uintptr_t>(p);
        if (address % size_of(t) != 0) {
            throw invalid_argument(where(i) + "the " + what + " pointer is not aligned to its " +
                                   std::string(to_string(t)) + " elements");
        }
        const std::size_t bytes = specs_[i].size * size_of(t);
        const auto* last = static_cast<const std::byte*>(p) + (bytes - 1);
        for (const void* q : {p, static_cast<const void*>(last)}) {
            if (!is_device_memory_on(q, device_)) {
                throw memory_space_error(where(i) + "the " + what + " (" +
                                         std::to_string(specs_[i].size) + " elements) is in " +
                                         describe_pointer(q) +
                                         ", but the CUDA backend needs device memory of GPU " +
                                         std::to_string(device_));
            }
        }
    }

    // Parameter values must not share memory with anything; gradients may alias each other.
    void check_no_overlap() const {
        std::vector<loco::detail::memory_range> ranges;
        for (std::size_t i = 0; i < specs_.size(); ++i) {
            const tensor_spec& s = specs_[i];
            if (s.size == 0) {
                continue;
            }
            const auto v = reinterpret_cast<std::uintptr_t>(s.value);
            ranges.push_back({v, v + s.size * size_of(s.value_type), i, true});
            if (has_grads_) {
                const auto g = reinterpret_cast<std::uintptr_t>(s.grad);
                ranges.push_back({g, g + s.size * size_of(s.grad_type), i, false});
            }
        }
        if (const auto hit = loco::detail::find_value_overlap(std::move(ranges))) {
            const auto describe = [&](const loco::detail::memory_range& x) {
                return std::string(x.is_value ? "the value" : "the gradient") + " of '" +
                       specs_[x.index].name + "'";
            };
            throw invalid_argument("loco: " + describe(hit->first) + " overlaps " +
                                   describe(hit->second) +
                                   " in device memory; every parameter value needs its own "
                                   "storage");
        }
    }

    void layout() {
        descs_.reserve(specs_.size());
        std::vector<segment> segs;
        std::vector<std::uint32_t> first{0};
        std::uint32_t fill = 0;  // cost units used in the current block
        const auto close_block = [&] {
            first.push_back(static_cast<std::uint32_t>(segs.size()));
            fill = 0;
        };
        for (std::size_t i = 0; i < specs_.size(); ++i) {
            const tensor_spec& s = specs_[i];
            tensor_desc d{};
            d.value = s.value;
            d.grad = s.grad;
            d.size = s.size;
            d.flat_offset = total_;
            d.padded_offset = padded_total_;
            d.master_offset = master_total_;
            d.combo = combo_index(s.value_type, s.grad_type);
            const bool value_on_16 = reinterpret_cast<std::uintptr_t>(s.value) % 16 == 0;
            const bool grad_on_16 =
                s.grad == nullptr || reinterpret_cast<std::uintptr_t>(s.grad) % 16 == 0;
            d.aligned = (value_on_16 ? value_aligned : 0u) | (grad_on_16 ? grad_aligned : 0u);
            descs_.push_back(d);
            const std::size_t padded = padded_size(s.size);
            total_ += s.size;
            padded_total_ += padded;
            if (s.value_type == dtype::bf16) {
                master_total_ += padded;
            }
            if (s.size != 0) {
                combos_ |= combo_bit(s.value_type, s.grad_type);
            }
            if (i > UINT32_MAX) {
                throw invalid_argument("loco: more than 2^32 tensors in one table");
            }
            for (std::size_t begin = 0; begin < padded;) {
                if (fill + segment_cost + pad_elements > block_elements) {
                    close_block();
                }
                const std::size_t room = (block_elements - fill - segment_cost) / pad_elements *
                                         pad_elements;
                const std::size_t take = std::min(room, padded - begin);
                const std::size_t len = std::min(begin + take, s.size) - begin;
                segs.push_back({static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(len),
                                static_cast<std::uint32_t>(take), 0u, begin});
                fill += static_cast<std::uint32_t>(take) + segment_cost;
                begin += take;
            }
        }
        if (fill != 0 || first.size() == 1) {
            close_block();
        }
        if (first.size() - 1 > INT32_MAX) {
            throw invalid_argument("loco: the table needs more CUDA blocks than a grid holds");
        }
        segments_host_ = std::move(segs);
        first_host_ = std::move(first);
        segment_count_ = segments_host_.size();
    }

    void upload() {
        // One allocation: descriptors, segments, block starts, each 256-byte aligned.
        const auto round = [](std::size_t b) {
            return (b + allocation_alignment - 1) / allocation_alignment * allocation_alignment;
        };
        const std::size_t desc_bytes = round(descs_.size() * sizeof(tensor_desc));
        const std::size_t seg_bytes = round(segments_host_.size() * sizeof(segment));
        const std::size_t first_bytes = first_host_.size() * sizeof(std::uint32_t);
        std::vector<std::byte> host(desc_bytes + seg_bytes + first_bytes);
        std::copy_n(reinterpret_cast<const std::byte*>(descs_.data()),
                    descs_.size() * sizeof(tensor_desc), host.data());
        std::copy_n(reinterpret_cast<const std::byte*>(segments_host_.data()),
                    segments_host_.size() * sizeof(segment), host.data() + desc_bytes);
        std::copy_n(reinterpret_cast<const std::byte*>(first_host_.data()), first_bytes,
                    host.data() + desc_bytes + seg_bytes);
        memory_ = device_buffer<std::byte>(host.size());
        memory_.upload(host);
        std::byte* base = memory_.get();
        view_.tensors = reinterpret_cast<const tensor_desc*>(base);
        view_.segments = reinterpret_cast<const segment*>(base + desc_bytes);
        view_.block_first = reinterpret_cast<const std::uint32_t*>(base + desc_bytes + seg_bytes);
        view_.blocks = static_cast<std::uint32_t>(first_host_.size() - 1);
        view_.padded_total = padded_total_;
        view_.master_total = master_total_;
        // The host copies of the work split are only needed to build it.
        segments_host_ = {};
        first_host_ = {};
    }

    std::vector<tensor_spec> specs_;
    std::vector<tensor_desc> descs_;
    std::vector<segment> segments_host_;
    std::vector<std::uint32_t> first_host_;
    std::size_t segment_count_ = 0;
    std::size_t total_ = 0;
    std::size_t padded_total_ = 0;
    std::size_t master_total_ = 0;
    unsigned combos_ = 0;
    bool has_grads_ = false;
    int device_ = 0;
    device_buffer<std::byte> memory_;
    table_view view_{};
};

// Layout conversions (checkpoints, tests). They are synchronous and ordered on the legacy default
// stream: synchronise the streams that write these arrays before calling them.
//
// Copies `arrays` consecutive arrays of the padded layout (each table.padded_elements() long) to
// the flat layout (each table.total_elements() long). Blocks until done.
template <class T>
std::vector<T> to_flat(const tensor_table& table, const T* device, std::size_t arrays = 1) {
    const std::size_t total = table.total_elements();
    std::vector<T> host(arrays * total);
    for (std::size_t i = 0; i < table.size(); ++i) {
        const std::size_t n = table.spec(i).size;
        if (n == 0 || arrays == 0) {
            continue;
        }
        LOCO_CUDA_CHECK(cudaMemcpy2D(host.data() + table.flat_offset(i), total * sizeof(T),
                                     device + table.padded_offset(i),
                                     table.padded_elements() * sizeof(T), n * sizeof(T), arrays,
                                     cudaMemcpyDeviceToHost));
    }
    return host;
}

// The reverse: fills `arrays` padded arrays from the flat layout, padding set to zero. Blocks.
template <class T>
void from_flat(const tensor_table& table, std::type_identity_t<std::span<const T>> host, T* device,
               std::size_t arrays = 1) {
    const std::size_t total = table.total_elements();
    if (host.size() != arrays * total) {
        throw shape_error("loco: from_flat got " + std::to_string(host.size()) +
                          " elements for " + std::to_string(arrays) + " arrays of " +
                          std::to_string(total));
    }
    if (arrays * table.padded_elements() != 0) {
        LOCO_CUDA_CHECK(
            cudaMemset(device, 0, arrays * table.padded_elements() * sizeof(T)));
    }
    for (std::size_t i = 0; i < table.size(); ++i) {
        const std::size_t n = table.spec(i).size;
        if (n == 0 || arrays == 0) {
            continue;
        }
        LOCO_CUDA_CHECK(cudaMemcpy2D(device + table.padded_offset(i),
                                     table.padded_elements() * sizeof(T),
                                     host.data() + table.flat_offset(i), total * sizeof(T),
                                     n * sizeof(T), arrays, cudaMemcpyHostToDevice));
    }
    LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

// The fp32 master copies in the flat layout; elements of fp32 tensors are 0. Blocks.
inline std::vector<float> master_to_flat(const tensor_table& table, const float* master) {
    std::vector<float> host(table.total_elements(), 0.0f);
    for (std::size_t i = 0; i < table.size(); ++i) {
        const tensor_spec& s = table.spec(i);
        if (s.size == 0 || s.value_type != dtype::bf16) {
            continue;
        }
        LOCO_CUDA_CHECK(cudaMemcpy(host.data() + table.flat_offset(i),
                                   master + table.master_offset(i), s.size * sizeof(float),
                                   cudaMemcpyDeviceToHost));
    }
    return host;
}

inline void master_from_flat(const tensor_table& table, std::span<const float> host,
                             float* master) {
    if (host.size() != table.total_elements()) {
        throw shape_error("loco: master_from_flat got " + std::to_string(host.size()) +
                          " elements for a table of " + std::to_string(table.total_elements()));
    }
    // Each tensor's own padded extent, padding zeroed as init_master leaves it: a fragment's table
    // shares the whole model's master array, and must leave the other fragments' masters alone.
    for (std::size_t i = 0; i < table.size(); ++i) {
        const tensor_spec& s = table.spec(i);
        if (s.size == 0 || s.value_type != dtype::bf16) {
            continue;
        }
        LOCO_CUDA_CHECK(cudaMemset(master + table.master_offset(i), 0,
                                   padded_size(s.size) * sizeof(float)));
        LOCO_CUDA_CHECK(cudaMemcpy(master + table.master_offset(i),
                                   host.data() + table.flat_offset(i), s.size * sizeof(float),
                                   cudaMemcpyHostToDevice));
    }
    LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

}  // namespace loco::backend::cuda
