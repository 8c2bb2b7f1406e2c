#pragma once
// DLPack tensors as loco tensors: any framework that exports DLPack (PyTorch, JAX, CuPy, NumPy)
// hands its parameters and gradients to loco without a copy, and loco hands its own buffers back
// the same way (the torch.distributed communicator of python/ wraps them so).
//
//   loco::dlpack::view<float>(t, "h0.w")        a tensor_view of a DLTensor, after the checks
//   loco::dlpack::add(params, "h0.w", w, gw)    parameter_list::add_views with the tensor's shape
//   loco::dlpack::export_view(view)             a DLManagedTensor over a loco buffer (not owning)
//
// What is accepted: a compact row-major tensor (strides absent, or equal to the row-major ones
// except along dimensions of extent 1, whose stride says nothing; any strides when it has no
// elements) whose bytes fit std::ptrdiff_t, one lane, of the element type asked for (float32 for
// parameters and gradients), in CPU memory (kDLCPU, or kDLCUDAHost: pinned host memory) or CUDA
// memory (kDLCUDA). Anything else is refused with one sentence naming the tensor and the fix,
// before anything is read or written. A tensor of two or more dimensions is a matrix to loco:
// rows = shape[0], cols = the product of the others (what Muon's "flatten" does with a
// convolution's kernel); fewer dimensions, or no elements, make a flat tensor. Needs
// <dlpack/dlpack.h> (Debian: libdlpack-dev); see docs/pytorch.md.

#include <loco/error.hpp>
#include <loco/params.hpp>
#include <loco/tensor.hpp>

#include <dlpack/dlpack.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>

namespace loco::dlpack {

// The DLPack type code and width of the element types loco reads and writes.
template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
    static constexpr std::uint8_t code = kDLFloat;
    static constexpr std::uint8_t bits = 32;
    static constexpr std::string_view name = "float32";
};
template <>
struct dtype_of<std::byte> {
    static constexpr std::uint8_t code = kDLUInt;
    static constexpr std::uint8_t bits = 8;
    static constexpr std::string_view name = "uint8";
};

// "float32", "bfloat16", "int64", "float32x4", ... for messages.
inline std::string describe_dtype(DLDataType t) {
    std::string s;
    switch (t.code) {
        case kDLInt: s = "int"; break;
        case kDLUInt: s = "uint"; break;
        case kDLFloat: s = "float"; break;
        case kDLBfloat: s = "bfloat"; break;
        case kDLComplex: s = "complex"; break;
        default: s = "type" + std::to_string(static_cast<unsigned>(t.code)) + "_"; break;
    }
    s += std::to_string(static_cast<unsigned>(t.bits));
    if (t.lanes != 1) s += "x" + std::to_string(static_cast<unsigned>(t.lanes));
    return s;
}

// The memory space of a DLPack device; throws memory_space_error for devices loco cannot address.
inline memory_space space_of(DLDevice d, std::string_view what) {
    switch (d.device_type) {
        case kDLCPU:
        case kDLCUDAHost: return memory_space::host;
        case kDLCUDA: return memory_space::cuda;
        default: break;
    }
    throw memory_space_error("loco: " + std::string(what) + " is on DLPack device type " +
                             std::to_string(static_cast<int>(d.device_type)) +
                             ", which loco cannot address; move it to the CPU or a CUDA GPU");
}

// The number of elements of a DLTensor after checking its shape; throws shape_error. The count is
// capped so that its bytes (element_bytes each) fit std::ptrdiff_t: a larger tensor cannot exist
// in memory, and its byte count would wrap where loco computes it.
inline std::size_t element_count(const DLTensor& t, std::string_view what,
                                 std::size_t element_bytes = 1) {
    if (t.ndim < 0 || (t.ndim > 0 && t.shape == nullptr)) {
        throw shape_error("loco: " + std::string(what) + " has a malformed DLPack shape (ndim " +
                          std::to_string(t.ndim) + "); the exporting framework is broken");
    }
    const std::size_t limit = static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max()) /
                              (element_bytes == 0 ? 1 : element_bytes);
    std::size_t n = 1;
    bool empty = false;  // an extent 0: the count is 0, whatever the other extents
    bool too_large = false;
    for (int d = 0; d < t.ndim; ++d) {
        const std::int64_t extent = t.shape[d];
        if (extent < 0) {
            throw shape_error("loco: " + std::string(what) + " has a negative extent " +
                              std::to_string(extent) + " in dimension " + std::to_string(d));
        }
        const auto e = static_cast<std::size_t>(extent);
        if (e == 0) {
            empty = true;
        } else if (too_large || n > limit / e) {
            too_large = true;
        } else {
            n *= e;
        }
    }
    if (empty) return 0;
    if (too_large) {
        throw shape_error("loco: " + std::string(what) + " has more elements than memory can hold "
                          "(at most " + std::to_string(limit) + " of " +
                          std::to_string(element_bytes) + " bytes)");
    }
    return n;
}

// Whether the tensor's elements are contiguous in row-major order. A tensor without elements is
// (there is nothing to lay out: PyTorch exports an empty matrix with strides [1, 1]); so is any
// stride along an extent of 1. A row-major stride beyond std::int64_t is not.
inline bool is_compact(const DLTensor& t) noexcept {
    if (t.strides == nullptr) return true;
    for (int d = 0; d < t.ndim; ++d) {
        if (t.shape[d] == 0) return true;
        if (t.shape[d] < 0) return false;
    }
    std::int64_t expected = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
        if (t.shape[d] != 1 && t.strides[d] != expected) return false;
        if (d > 0) {
            if (expected > std::numeric_limits<std::int64_t>::max() / t.shape[d]) return false;
            expected *= t.shape[d];
        }
    }
    return true;
}

// A loco view of a DLTensor holding elements of type T (const T for read-only use), after the
// checks at the top of the file. `what` names the tensor in messages ("parameter 'h0.w'").
template <class T>
tensor_view<T> view(const DLTensor& t, std::string_view what) {
    using E = std::remove_const_t<T>;
    using D = dtype_of<E>;
    if (t.dtype.code != D::code || t.dtype.bits != D::bits || t.dtype.lanes != 1) {
        throw invalid_argument("loco: " + std::string(what) + " holds " +
                               describe_dtype(t.dtype) + " elements but loco needs " +
                               std::string(D::name) + "; convert it (keep an fp32 master copy "
                               "for lower-precision models)");
    }
    const memory_space space = space_of(t.device, what);
    const std::size_t n = element_count(t, what, sizeof(E));
    if (!is_compact(t)) {
        throw invalid_argument("loco: " + std::string(what) +
                               " is not contiguous (a transposed or sliced view); pass the "
                               "tensor that owns the storage, or a .contiguous() copy kept alive "
                               "by the trainer");
    }
    if (n != 0 && t.data == nullptr) {
        throw invalid_argument("loco: " + std::string(what) + " has a null data pointer");
    }
    auto* bytes = static_cast<unsigned char*>(t.data);
    if (bytes != nullptr) bytes += t.byte_offset;
    if (reinterpret_cast<std::uintptr_t>(bytes) % alignof(E) != 0) {
        throw invalid_argument("loco: " + std::string(what) + " is not aligned to its " +
                               std::string(D::name) + " elements");
    }
    tensor_view<T> v{reinterpret_cast<T*>(bytes), n, 0, 0, space};
    if (t.ndim >= 2 && n != 0) {
        v.rows = static_cast<std::size_t>(t.shape[0]);
        v.cols = n / v.rows;
    }
    return v;
}

// A device as PyTorch names it, for messages: "cpu" (host memory has no index), "cuda:1".
inline std::string device_name(DLDevice d, memory_space space) {
    if (space == memory_space::host) return "cpu";
    return "cuda:" + std::to_string(d.device_id);
}

// Adds a parameter whose value and gradient are DLPack tensors (float32, same element count, same
// device); the value's shape gives the matrix shape. Throws, adding nothing, on any mismatch.
inline parameter_list& add(parameter_list& params, const std::string& name, const DLTensor& value,
                           const DLTensor& grad, parameter_options options = {}) {
    const std::string v_what = "parameter '" + name + "'";
    const std::string g_what = "the gradient of '" + name + "'";
    const memory_space vs = space_of(value.device, v_what);
    const memory_space gs = space_of(grad.device, g_what);
    // Host memory has no index (kDLCPU and kDLCUDAHost may carry different ones): only GPUs
    // compare theirs.
    if (vs != gs || (vs == memory_space::cuda && value.device.device_id != grad.device.device_id)) {
        throw memory_space_error("loco: the gradient of '" + name + "' is on " +
                                 device_name(grad.device, gs) + " but the parameter is on " +
                                 device_name(value.device, vs) +
                                 "; keep each gradient on its parameter's device");
    }
    tensor_view<float> v = view<float>(value, v_what);
    tensor_view<const float> g = view<const float>(grad, g_what);
    if (g.size != v.size) {
        throw shape_error("loco: the gradient of '" + name + "' has " + std::to_string(g.size) +
                          " elements but the parameter has " + std::to_string(v.size));
    }
    g.rows = v.rows;
    g.cols = v.cols;
    return params.add_views(name, v, g, options);
}

// A DLManagedTensor over a loco buffer, 1-D, that does not own it: the buffer must outlive every
// tensor a framework builds from it. Its deleter frees only the DLPack record. A tensor_view does
// not know which GPU its memory is on: pass `device_id` for CUDA memory of a GPU other than 0
// (ignored for host memory).
template <class T>
DLManagedTensor* export_view(tensor_view<T> v, int device_id = 0) {
    using E = std::remove_const_t<T>;
    struct record {
        DLManagedTensor managed;
        std::int64_t shape[1];
    };
    if (v.size > static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max())) {
        throw shape_error("loco: a buffer of " + std::to_string(v.size) +
                          " elements is too large for DLPack");
    }
    auto r = std::make_unique<record>();
    r->shape[0] = static_cast<std::int64_t>(v.size);
    DLTensor& t = r->managed.dl_tensor;
    t.data = const_cast<E*>(v.data);
    t.device = {v.space == memory_space::cuda ? kDLCUDA : kDLCPU,
                v.space == memory_space::cuda ? device_id : 0};
    t.ndim = 1;
    t.dtype = {dtype_of<E>::code, dtype_of<E>::bits, 1};
    t.shape = r->shape;
    t.strides = nullptr;
    t.byte_offset = 0;
    r->managed.manager_ctx = r.get();
    r->managed.deleter = [](DLManagedTensor* self) {
        delete static_cast<record*>(self->manager_ctx);
    };
    return &r.release()->managed;
}

}  // namespace loco::dlpack
