#pragma once
// What an encode reads: where x comes from (encode_from, encode_io, device_encode_context), the
// kernels' parameters, and per element the compressor input x = delta or global - local, with
// error feedback e = decay * residual + s * x (encode_source); warp reductions over lane groups.

#include <loco/backend/cuda/compress/payload_header.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>
#include <loco/policy.hpp>
#include <loco/random.hpp>

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

// Where encode() reads x from.
enum class encode_from : unsigned char {
    delta,   // an fp32 array of the padded layout (io.delta)
    params   // global - the parameters' authoritative values (io.global, io.master), as outer_delta
};

struct encode_io {
    const float* delta = nullptr;      // encode_from::delta
    const float* global = nullptr;     // encode_from::params: the global snapshot, padded layout
    const float* master = nullptr;     // encode_from::params: the fp32 masters of bf16 values
    const float* residual = nullptr;   // error feedback: the residual, padded layout
    float* next_residual = nullptr;    // error feedback: the new residual (may equal residual)
    std::byte* payload = nullptr;      // plan.payload_bytes(), 4-byte aligned
};

// encode_context on the device. With round_from set, the round is read on the device as
// round_from->steps + round_from->skipped (the outer control of loco::cuda::diloco), so the
// launch needs no host read.
struct device_encode_context {
    std::uint64_t seed = 0;
    std::uint64_t round = 0;
    int rank = 0;
    float outer_lr = 1.0f;
    const step_control* round_from = nullptr;
};

namespace detail {

struct encode_params {
    const float* source;    // delta, or global (padded layout)
    const float* master;
    const float* residual;
    float* next;
    std::byte* payload;
    const step_control* round_from;
    std::uint64_t seed;
    std::uint64_t round;
    float decay;
    float scale;
    std::uint32_t rank;
    std::uint32_t flags;    // blockwise: bit 0 mean_abs, bit 1 stochastic
};

inline constexpr std::uint32_t flag_mean_abs = 1u;
inline constexpr std::uint32_t flag_stochastic = 2u;

// encode's checks of io and the kernels' parameters from it: x's source (From, Mode), with
// Feedback the residual and its decay and scale s (error_feedback's hyper-parameters h; s is the
// outer lr when h folds it in), and the payload. Shared by encode() and encode_topk().
template <encode_from From, bf16_update Mode, bool Feedback, class H>
encode_params encode_inputs(const tensor_table& table, const encode_io& io, const H& h,
                            const device_encode_context& ctx, const char* what) {
    require_payload_pointer(io.payload, "payload", what);
    const std::size_t padded = table.padded_elements();
    encode_params a{};
    if constexpr (From == encode_from::delta) {
        require_pointer(io.delta, padded, "delta", what);
        a.source = io.delta;
    } else {
        require_pointer(io.global, padded, "global", what);
        if constexpr (Mode == bf16_update::master) {
            require_pointer(io.master, table.master_elements(), "master", what);
        }
        a.source = io.global;
        a.master = io.master;
    }
    if constexpr (Feedback) {
        require_pointer(io.residual, padded, "residual", what);
        require_pointer(io.next_residual, padded, "next_residual", what);
        a.residual = io.residual;
        a.next = io.next_residual;
        a.decay = h.decay;
        a.scale = h.fold_outer_lr ? ctx.outer_lr : 1.0f;
    } else {
        static_cast<void>(h);
        static_cast<void>(ctx);
    }
    a.payload = io.payload;
    return a;
}


}  // namespace detail

namespace detail {

#if LOCO_HAS_CUDA()

inline constexpr unsigned full_mask = 0xffffffffu;

// (std::min and the layout functions of the compressors are host functions.)
__device__ __forceinline__ std::uint64_t min_u64(std::uint64_t a, std::uint64_t b) {
    return a < b ? a : b;
}

// Bytes of n packed codes (wire::packed_bytes) rounded up to a multiple of 4: blockwise's
// code_bytes.
template <int Bits>
__device__ __forceinline__ std::uint64_t code_bytes(std::uint64_t n) {
    return (compress::wire::packed_bytes<Bits>(n) + 3) / 4 * 4;
}

// ---- the compressor input x (or e, with error feedback), per tensor -----------------------------

// Reads x = delta, or global - local, and with Feedback e = decay * residual + scale * x;
// writes the new residual. Pointers are offset to the tensor's element 0.
template <bool Feedback, encode_from From, class P, bool UseMaster>
struct encode_source {
    const float* source;  // delta or global, padded layout
    const P* value;
    const float* master;
    const float* residual;
    float* next;
    std::uint64_t n;
    float decay;
    float scale;
    bool vec_value;  // value 16-byte aligned

    __device__ __forceinline__ float combine(float x, float r) const {
        if constexpr (Feedback) {
            return __fadd_rn(__fmul_rn(decay, r), __fmul_rn(scale, x));
        } else {
            return x;
        }
    }

    // j < n.
    __device__ __forceinline__ float load1(std::uint64_t j) const {
        float x;
        if constexpr (From == encode_from::delta) {
            x = source[j];
        } else {
            const float local = UseMaster ? master[j] : widen(value[j]);
            x = __fsub_rn(source[j], local);
        }
        return combine(x, Feedback ? residual[j] : 0.0f);
    }

    // Elements j0 .. j0 + 7 (j0 a multiple of 8); 0 past n.
    __device__ __forceinline__ void load8(std::uint64_t j0, float* e) const {
        if (j0 + 8 > n) {
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const std::uint64_t j = j0 + static_cast<unsigned>(r);
                e[r] = j < n ? load1(j) : 0.0f;
            }
            return;
        }
        float x[8];
        load_vec<8>(source + j0, x);
        if constexpr (From == encode_from::params) {
            float local[8];
            if constexpr (UseMaster) {
                load_vec<8>(master + j0, local);
            } else {
                if (vec_value) {
                    load_vec<8>(value + j0, local);
                } else {
#pragma unroll
                    for (int r = 0; r < 8; ++r) {
                        local[r] = widen(value[j0 + static_cast<unsigned>(r)]);
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                x[r] = __fsub_rn(x[r], local[r]);
            }
        }
        if constexpr (Feedback) {
            float res[8];
            load_vec<8>(residual + j0, res);
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                e[r] = combine(x[r], res[r]);
            }
        } else {
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                e[r] = x[r];
            }
        }
    }

    __device__ __forceinline__ void store1(std::uint64_t j, float v) const {
        if constexpr (Feedback) {
            next[j] = v;
        }
    }
    __device__ __forceinline__ void store8(std::uint64_t j0, const float* v) const {
        if constexpr (Feedback) {
            if (j0 + 8 <= n) {
                store_vec<8>(next + j0, v);
            } else {
#pragma unroll
                for (int r = 0; r < 8; ++r) {
                    if (j0 + static_cast<unsigned>(r) < n) {
                        next[j0 + static_cast<unsigned>(r)] = v[r];
                    }
                }
            }
        }
    }
};

// Tensor d's source, its pointers offset to d's element 0; vec_value: load8 may read d's values
// 16 bytes at a time.
template <bool Feedback, encode_from From, class P, bool UseMaster>
__device__ __forceinline__ encode_source<Feedback, From, P, UseMaster> source_of(
    const tensor_desc& d, const encode_params& a, bool vec_value) {
    encode_source<Feedback, From, P, UseMaster> src;
    src.source = a.source + d.padded_offset;
    src.value = static_cast<const P*>(d.value);
    src.master = UseMaster ? a.master + d.master_offset : nullptr;
    src.residual = Feedback ? a.residual + d.padded_offset : nullptr;
    src.next = Feedback ? a.next + d.padded_offset : nullptr;
    src.n = d.size;
    src.decay = a.decay;
    src.scale = a.scale;
    src.vec_value = vec_value;
    return src;
}

// ---- warp reductions over groups of G lanes (G a power of 2, <= 32; all lanes take part) ------

// One butterfly for all four: at each step a lane combines its value with its partner's,
// combine(own, partner's), so every lane of a group ends with the group's result.
template <unsigned G, class T, class Combine>
__device__ __forceinline__ T group_reduce(T v, Combine combine) {
#pragma unroll
    for (unsigned m = G / 2; m > 0; m /= 2) {
        v = combine(v, __shfl_xor_sync(full_mask, v, static_cast<int>(m)));
    }
    return v;
}

template <unsigned G>
__device__ __forceinline__ float group_max(float v) {
    return group_reduce<G>(v, [](float own, float o) { return o > own ? o : own; });
}
// Both partners of each butterfly step add the same two values (addition commutes), so every
// lane of a group ends with the same bits.
template <unsigned G>
__device__ __forceinline__ double group_sum(double v) {
    return group_reduce<G>(v, [](double own, double o) { return own + o; });
}
template <unsigned G>
__device__ __forceinline__ unsigned group_umax(unsigned v) {
    return group_reduce<G>(v, [](unsigned own, unsigned o) { return o > own ? o : own; });
}
template <unsigned G>
__device__ __forceinline__ unsigned group_umin(unsigned v) {
    return group_reduce<G>(v, [](unsigned own, unsigned o) { return o < own ? o : own; });
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

}  // namespace loco::backend::cuda
