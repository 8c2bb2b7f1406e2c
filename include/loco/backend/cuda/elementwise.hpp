#pragma once
// The fused multi-tensor kernels: one launch per phase over every tensor of a tensor_table.
//
//   check_gradients   finds non-finite gradients; writes the smallest flat index to the flag
//   inner_step        Rule::update on every element: parameters (or their fp32 masters), gradients,
//                     state; computes Rule::prepare(hyper, steps + 1) on the device
//   check_padded      the same check over an fp32 array of the padded layout (an averaged delta)
//   outer_delta       phase 1 of a sync: delta = global - local, in the padded layout
//   outer_apply       phase 2: Outer::update(global, delta, state), then the new global goes to the
//                     snapshot, the user's parameters and (bf16) their master copies
//   gather_values / scatter_values / init_master: copies between the parameters, an fp32 array of
//                     the padded layout and the master copies (start of training, broadcasts)
//
// Between outer_delta and outer_apply the caller averages delta across workers (an fp32 mean
// all-reduce of table.padded_elements() floats; the padding is zero and stays zero). That is the
// seam for compression: a compressor encodes `delta` after phase 1 and leaves the decoded average
// in `delta` before phase 2; nothing else in phase 2 changes.
//
// Stream and graph rules. Every launch is asynchronous on the stream given and makes no host
// synchronisation, allocation or host-side read of device memory, so a whole step (check + update)
// can be captured in a CUDA graph and replayed: each replay reads the current hyper-parameters and
// step count from device memory. The table, the state arrays and the control block must stay
// alive and in place while a graph that uses them exists. Launches of one optimizer must be
// ordered (one stream, or events): the update kernel's last block advances the counters that the
// next launch reads. The non-finite check must run on the same stream before the update it guards.
//
// Non-finite inputs. With skip_nonfinite, an update kernel reads the flag written by the check
// kernels; when set, it changes nothing, increments `skipped` (outer_apply also writes the global
// snapshot back into the parameters, as the host diloco does) and clears the flag. Otherwise it
// updates and increments `steps`. Without skip_nonfinite the flag is ignored (and cleared).

#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>
#include <loco/policy.hpp>
#include <loco/random.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace loco::backend::cuda {

namespace detail {

// Blocks per SM the kernels are compiled for: 4 x 256 threads caps registers at 64 per thread.
inline constexpr int min_blocks_per_sm = 4;

// A segment with its pointers and offsets resolved, staged in shared memory by the block.
struct resolved_segment {
    void* value;            // element 0 of the segment
    const void* grad;       // element 0 of the segment (null without gradients)
    std::uint64_t padded;   // padded-layout offset of element 0
    std::uint64_t master;   // master-layout offset of element 0 (bf16 values)
    std::uint64_t flat;     // flat-layout offset of element 0
    std::uint32_t len;
    std::uint32_t span;
    std::uint32_t combo;
    std::uint32_t aligned;  // value_aligned | grad_aligned bits
};

#if LOCO_HAS_CUDA()

// Segment s of tensor d with its pointers and offsets worked out (grad null where d has none).
__device__ __forceinline__ resolved_segment resolve_segment(const segment& s,
                                                         const tensor_desc& d) {
    const std::uint64_t value_bytes = (d.combo & 1u) ? 2 : 4;
    const std::uint64_t grad_bytes = (d.combo & 2u) ? 2 : 4;
    resolved_segment r;
    r.value = static_cast<char*>(d.value) + s.begin * value_bytes;
    r.grad = d.grad ? static_cast<const char*>(d.grad) + s.begin * grad_bytes : nullptr;
    r.padded = d.padded_offset + s.begin;
    r.master = d.master_offset + s.begin;
    r.flat = d.flat_offset + s.begin;
    r.len = s.len;
    r.span = s.span;
    r.combo = d.combo;
    r.aligned = d.aligned;
    return r;
}

// Loads this block's segments (at most max_segments_per_block) into `out`, one thread each, so the
// loop over them pays one round trip to the table in all. Ends with __syncthreads().
__device__ __forceinline__ std::uint32_t stage_segments(const table_view& t,
                                                        resolved_segment* out) {
    const std::uint32_t first = t.block_first[blockIdx.x];
    const std::uint32_t count = t.block_first[blockIdx.x + 1] - first;
    if (threadIdx.x < count) {
        const segment s = t.segments[first + threadIdx.x];
        const tensor_desc d = t.tensors[s.tensor];  // one copy: adjacent fields load together
        out[threadIdx.x] = resolve_segment(s, d);
    }
    __syncthreads();
    return count;
}

// Last-block bookkeeping: the block that finishes last advances the counters and clears the flag.
// Every block has read the counters before it arrives here, so none can see the new values.
__device__ __forceinline__ void finish_block(step_control* c, bool skipped) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned done = atomicAdd(&c->blocks_done, 1u);
        if (done == gridDim.x - 1) {
            __threadfence();
            if (skipped) {
                c->skipped += 1;
            } else {
                c->steps += 1;
            }
            c->first_nonfinite = no_nonfinite;
            c->blocks_done = 0;
            __threadfence();
        }
    }
}

// A plain load: the flag was written by an earlier kernel, and this kernel's own reset happens
// only after every block has read it (finish_block).
__device__ __forceinline__ bool nonfinite_flagged(const step_control* c) {
    return c->first_nonfinite != no_nonfinite;
}

__device__ __forceinline__ void report_nonfinite(step_control* c, std::uint64_t index) {
    atomicMin(reinterpret_cast<unsigned long long*>(&c->first_nonfinite),
              static_cast<unsigned long long>(index));
}

// Elements per thread and iteration of the inner step: 8 with bf16 state (16-byte state
// accesses), else 4 (16-byte fp32 accesses; bf16 values and gradients then move 8 bytes per lane,
// still whole 32-byte sectors per warp). Eight elements of fp32 state with bf16 values needed
// more than the 64 registers a thread may use (ptxas spilled), and fp32 state is most of the
// traffic in that layout.
template <class P, class G, class S>
inline constexpr int vector_width = sizeof(S) == 2 ? 8 : 4;

// The update at the heart of the fused loops (inner_segment and update_segment), written once:
// Rule::update(k, x[e], in[e], state of element i + e) for the E consecutive elements from i,
// whose Rule::state_size state arrays lie `stride` apart from st. The state moves a vector at a
// time and reaches the rule one element at a time.
template <class Rule, int E, class StateT, class K>
__device__ __forceinline__ void update_vec(const K& k, float* x, const float* in,
                                           StateT* __restrict__ st, std::uint64_t stride,
                                           std::uint32_t i) {
    constexpr int S = Rule::state_size;
    constexpr int SA = S > 0 ? S : 1;
    float s[SA][E];
#pragma unroll
    for (int j = 0; j < S; ++j) {
        load_vec<E>(st + static_cast<std::uint64_t>(j) * stride + i, s[j]);
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
        float t[SA];
#pragma unroll
        for (int j = 0; j < S; ++j) {
            t[j] = s[j][e];
        }
        Rule::update(k, x[e], in[e], t);
#pragma unroll
        for (int j = 0; j < S; ++j) {
            s[j][e] = t[j];
        }
    }
#pragma unroll
    for (int j = 0; j < S; ++j) {
        store_vec<E>(st + static_cast<std::uint64_t>(j) * stride + i, s[j]);
    }
}

// update_vec for the one element i (the loops' scalar paths).
template <class Rule, class StateT, class K>
__device__ __forceinline__ void update_one(const K& k, float& x, float in,
                                           StateT* __restrict__ st, std::uint64_t stride,
                                           std::uint32_t i) {
    constexpr int S = Rule::state_size;
    float t[S > 0 ? S : 1];
#pragma unroll
    for (int j = 0; j < S; ++j) {
        t[j] = widen(st[static_cast<std::uint64_t>(j) * stride + i]);
    }
    Rule::update(k, x, in, t);
#pragma unroll
    for (int j = 0; j < S; ++j) {
        st[static_cast<std::uint64_t>(j) * stride + i] = narrow<StateT>(t[j]);
    }
}

// ---- inner step --------------------------------------------------------------------------------

template <class Rule, class StateT>
struct inner_args {
    const typename Rule::hyper* hyper;
    step_control* control;
    StateT* state;  // Rule::state_size arrays of the padded layout
    float* master;  // master copies of bf16 values (bf16_update::master)
    bool skip_nonfinite;
};

template <class Rule, class StateT, bf16_update Mode, class P, class G>
__device__ __forceinline__ void inner_segment(const resolved_segment& r,
                                              const scalars_t<Rule>& k,
                                              const inner_args<Rule, StateT>& a,
                                              std::uint64_t stride, std::uint64_t step,
                                              std::uint64_t seed) {
    constexpr int S = Rule::state_size;
    constexpr int E = vector_width<P, G, StateT>;
    constexpr bool bf16_value = std::is_same_v<P, loco::bf16>;
    constexpr bool use_master = bf16_value && Mode == bf16_update::master;
    constexpr bool stochastic = bf16_value && Mode == bf16_update::stochastic;

    P* __restrict__ v = static_cast<P*>(r.value);
    const G* __restrict__ g = static_cast<const G*>(r.grad);
    StateT* __restrict__ st = S > 0 ? a.state + r.padded : nullptr;
    float* __restrict__ ms = use_master ? a.master + r.master : nullptr;
    const std::uint32_t n = r.len;
    const bool vec = (r.aligned & (value_aligned | grad_aligned)) == (value_aligned | grad_aligned);
    const std::uint32_t vec_end = vec ? n / E * E : 0;

    for (std::uint32_t i = threadIdx.x * E; i < vec_end; i += block_threads * E) {
        float x[E];
        float gr[E];
        if constexpr (use_master) {
            load_vec<E>(ms + i, x);
        } else {
            load_vec<E>(v + i, x);
        }
        load_vec_ro<E>(g + i, gr);
        update_vec<Rule, E>(k, x, gr, st, stride, i);
        if constexpr (use_master) {
            store_vec<E>(ms + i, x);
            store_vec<E>(v + i, x);
        } else if constexpr (stochastic) {
            std::uint16_t b[E];
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const auto bits = random::bits(seed, step, r.flat + i + static_cast<unsigned>(e));
                b[e] = round_stochastic(x[e], static_cast<std::uint32_t>(bits)).bits;
            }
            store_vec_bits<E>(v + i, b);
        } else {
            store_vec<E>(v + i, x);
        }
    }
    // Scalar path: the tail of an aligned segment, or all of a misaligned one.
    for (std::uint32_t i = vec_end + threadIdx.x; i < n; i += block_threads) {
        float x = use_master ? ms[i] : widen(v[i]);
        update_one<Rule>(k, x, widen(g[i]), st, stride, i);
        if constexpr (use_master) {
            ms[i] = x;
            v[i] = narrow<P>(x);
        } else if constexpr (stochastic) {
            const auto bits = random::bits(seed, step, r.flat + i);
            v[i] = round_stochastic(x, static_cast<std::uint32_t>(bits));
        } else {
            v[i] = narrow<P>(x);
        }
    }
}

template <class Rule, class StateT, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads, min_blocks_per_sm)
    inner_step_kernel(table_view t, inner_args<Rule, StateT> a) {
    __shared__ resolved_segment segs[max_segments_per_block];
    // Everything a block needs before it streams is loaded up front, independently, so that the
    // loads overlap (the flag, the counters, the hyper-parameters and the table).
    const bool skip = a.skip_nonfinite && nonfinite_flagged(a.control);
    const std::uint64_t step = a.control->steps + 1;
    // Only stochastic rounding needs the seed; not loading it saves two registers.
    const std::uint64_t seed = Mode == bf16_update::stochastic ? a.control->seed : 0;
    const typename Rule::hyper h = *a.hyper;
    const std::uint32_t count = stage_segments(t, segs);
    if (!skip) {
        const auto k = Rule::prepare(h, step);
        for (std::uint32_t q = 0; q < count; ++q) {
            const resolved_segment r = segs[q];
            switch (r.combo) {
                case 0:
                    if constexpr ((Combos & combos::f32_f32) != 0) {
                        inner_segment<Rule, StateT, Mode, float, float>(r, k, a, t.padded_total,
                                                                        step, seed);
                    }
                    break;
                case 1:
                    if constexpr ((Combos & combos::bf16_f32) != 0) {
                        inner_segment<Rule, StateT, Mode, loco::bf16, float>(
                            r, k, a, t.padded_total, step, seed);
                    }
                    break;
                case 2:
                    if constexpr ((Combos & combos::f32_bf16) != 0) {
                        inner_segment<Rule, StateT, Mode, float, loco::bf16>(
                            r, k, a, t.padded_total, step, seed);
                    }
                    break;
                default:
                    if constexpr ((Combos & combos::bf16_bf16) != 0) {
                        inner_segment<Rule, StateT, Mode, loco::bf16, loco::bf16>(
                            r, k, a, t.padded_total, step, seed);
                    }
                    break;
            }
        }
    }
    finish_block(a.control, skip);
}

// ---- non-finite checks -------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ std::uint64_t scan_nonfinite(const T* p, std::uint32_t n, bool vec,
                                                        std::uint64_t flat) {
    constexpr int E = per_vector<T>;
    std::uint64_t found = no_nonfinite;
    const std::uint32_t vec_end = vec ? n / E * E : 0;
    for (std::uint32_t i = threadIdx.x * E; i < vec_end; i += block_threads * E) {
        float x[E];
        load_vec_ro<E>(p + i, x);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            if (!isfinite(x[e])) {
                const std::uint64_t at = flat + i + static_cast<unsigned>(e);
                found = at < found ? at : found;
            }
        }
    }
    for (std::uint32_t i = vec_end + threadIdx.x; i < n; i += block_threads) {
        if (!isfinite(widen(p[i]))) {
            found = flat + i < found ? flat + i : found;
        }
    }
    return found;
}

// FromGrads: the gradients of the table; otherwise `padded`, an fp32 array of the padded layout.
template <bool FromGrads>
__global__ void __launch_bounds__(block_threads)
    check_kernel(table_view t, const float* padded, step_control* c) {
    __shared__ resolved_segment segs[max_segments_per_block];
    const std::uint32_t count = stage_segments(t, segs);
    std::uint64_t found = no_nonfinite;
    for (std::uint32_t q = 0; q < count; ++q) {
        const resolved_segment r = segs[q];
        std::uint64_t f;
        if constexpr (FromGrads) {
            const bool vec = (r.aligned & grad_aligned) != 0;
            if (r.combo & 2u) {
                f = scan_nonfinite(static_cast<const loco::bf16*>(r.grad), r.len, vec, r.flat);
            } else {
                f = scan_nonfinite(static_cast<const float*>(r.grad), r.len, vec, r.flat);
            }
        } else {
            f = scan_nonfinite(padded + r.padded, r.len, true, r.flat);
        }
        found = f < found ? f : found;
    }
    if (found != no_nonfinite) {
        report_nonfinite(c, found);
    }
}

// ---- outer phases and copies -------------------------------------------------------------------

// The parameter's authoritative fp32 value: its master copy, or the value itself.
template <class P, bf16_update Mode>
inline constexpr bool reads_master = std::is_same_v<P, loco::bf16> && Mode == bf16_update::master;

// out[i] = (Subtract ? global[i] : 0) - or + local[i] over the padded layout; padding set to 0.
// Subtract: out = global - local (phase 1). Otherwise out = local (gather_values).
template <bool Subtract, bf16_update Mode, class P>
__device__ __forceinline__ void delta_segment(const resolved_segment& r, const float* global,
                                              const float* master, float* out) {
    constexpr int E = per_vector<P>;
    constexpr bool use_master = reads_master<P, Mode>;
    const P* __restrict__ v = static_cast<const P*>(r.value);
    const float* __restrict__ ms = use_master ? master + r.master : nullptr;
    const float* __restrict__ gl = Subtract ? global + r.padded : nullptr;
    float* __restrict__ o = out + r.padded;
    const std::uint32_t n = r.len;
    const bool vec = use_master || (r.aligned & value_aligned) != 0;
    const std::uint32_t vec_end = vec ? n / E * E : 0;
    for (std::uint32_t i = threadIdx.x * E; i < vec_end; i += block_threads * E) {
        float x[E];
        if constexpr (use_master) {
            load_vec<E>(ms + i, x);
        } else {
            load_vec<E>(v + i, x);
        }
        if constexpr (Subtract) {
            float gv[E];
            load_vec<E>(gl + i, gv);
#pragma unroll
            for (int e = 0; e < E; ++e) {
                x[e] = gv[e] - x[e];
            }
        }
        store_vec<E>(o + i, x);
    }
    for (std::uint32_t i = vec_end + threadIdx.x; i < r.span; i += block_threads) {
        float x = 0.0f;
        if (i < n) {
            x = use_master ? ms[i] : widen(v[i]);
            if constexpr (Subtract) {
                x = gl[i] - x;
            }
        }
        o[i] = x;
    }
}

template <bool Subtract, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads)
    delta_kernel(table_view t, const float* global, const float* master, float* out) {
    __shared__ resolved_segment segs[max_segments_per_block];
    const std::uint32_t count = stage_segments(t, segs);
    for (std::uint32_t q = 0; q < count; ++q) {
        const resolved_segment r = segs[q];
        if (r.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                delta_segment<Subtract, Mode, loco::bf16>(r, global, master, out);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                delta_segment<Subtract, Mode, float>(r, global, master, out);
            }
        }
    }
}

template <class Outer>
struct outer_args {
    const typename Outer::hyper* hyper;
    step_control* control;
    float* global;       // padded layout
    const float* delta;  // padded layout, the averaged pseudo-gradient
    float* state;        // Outer::state_size arrays of the padded layout
    float* master;       // master layout (bf16 values with bf16_update::master)
    bool skip_nonfinite;
};

// Update (unless `skip`) and write the global values to the parameters and their masters, with
// the averaged delta from `delta`: delta.read<E>(i, d) puts the E values from element i of the
// segment in d. outer_segment reads it from memory; compress/decode.hpp decodes it from the
// payloads. Outer = void: write only (scatter_values), delta unused.
template <class Outer, bf16_update Mode, class P, class K, class Delta>
__device__ __forceinline__ void update_segment(const resolved_segment& r, const K& k,
                                               float* global, const Delta& delta, float* state,
                                               float* master, std::uint64_t stride, bool skip) {
    constexpr bool updates = !std::is_void_v<Outer>;
    constexpr int S = [] {
        if constexpr (updates) {
            return Outer::state_size;
        } else {
            return 0;
        }
    }();
    constexpr int E = per_vector<P>;
    constexpr bool use_master = reads_master<P, Mode>;
    P* __restrict__ v = static_cast<P*>(r.value);
    float* __restrict__ ms = use_master ? master + r.master : nullptr;
    float* __restrict__ gl = global + r.padded;
    float* __restrict__ st = S > 0 ? state + r.padded : nullptr;
    const std::uint32_t n = r.len;
    const bool vec = (r.aligned & value_aligned) != 0;
    const std::uint32_t vec_end = vec ? n / E * E : 0;
    for (std::uint32_t i = threadIdx.x * E; i < vec_end; i += block_threads * E) {
        float x[E];
        load_vec<E>(gl + i, x);
        if constexpr (updates) {
            if (!skip) {
                float d[E];
                delta.template read<E>(i, d);
                update_vec<Outer, E>(k, x, d, st, stride, i);
                store_vec<E>(gl + i, x);
            }
        }
        if constexpr (use_master) {
            store_vec<E>(ms + i, x);
        }
        store_vec<E>(v + i, x);
    }
    for (std::uint32_t i = vec_end + threadIdx.x; i < n; i += block_threads) {
        float x = gl[i];
        if constexpr (updates) {
            if (!skip) {
                float d;
                delta.template read<1>(i, &d);
                update_one<Outer>(k, x, d, st, stride, i);
                gl[i] = x;
            }
        }
        if constexpr (use_master) {
            ms[i] = x;
        }
        v[i] = narrow<P>(x);
    }
}

// The averaged delta in device memory, from the segment's first element of the padded layout.
struct delta_in_memory {
    const float* __restrict__ at;
    template <int E>
    __device__ __forceinline__ void read(std::uint32_t i, float* d) const {
        if constexpr (E == 1) {
            *d = at[i];
        } else {
            load_vec_ro<E>(at + i, d);
        }
    }
};

template <class Outer, bf16_update Mode, class P, class K>
__device__ __forceinline__ void outer_segment(const resolved_segment& r, const K& k,
                                              float* global, const float* delta, float* state,
                                              float* master, std::uint64_t stride, bool skip) {
    const delta_in_memory d{std::is_void_v<Outer> ? nullptr : delta + r.padded};
    update_segment<Outer, Mode, P>(r, k, global, d, state, master, stride, skip);
}

template <class Outer, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads, min_blocks_per_sm)
    outer_apply_kernel(table_view t, outer_args<Outer> a) {
    __shared__ resolved_segment segs[max_segments_per_block];
    const bool skip = a.skip_nonfinite && nonfinite_flagged(a.control);
    const std::uint64_t step = a.control->steps + 1;
    const typename Outer::hyper h = *a.hyper;
    const std::uint32_t count = stage_segments(t, segs);
    const auto k = Outer::prepare(h, step);
    for (std::uint32_t q = 0; q < count; ++q) {
        const resolved_segment r = segs[q];
        if (r.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                outer_segment<Outer, Mode, loco::bf16>(r, k, a.global, a.delta, a.state, a.master,
                                                       t.padded_total, skip);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                outer_segment<Outer, Mode, float>(r, k, a.global, a.delta, a.state, a.master,
                                                  t.padded_total, skip);
            }
        }
    }
    finish_block(a.control, skip);
}

// Parameters (and masters) := an fp32 array of the padded layout.
template <bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads)
    scatter_kernel(table_view t, const float* from, float* master) {
    __shared__ resolved_segment segs[max_segments_per_block];
    const std::uint32_t count = stage_segments(t, segs);
    const int none = 0;
    for (std::uint32_t q = 0; q < count; ++q) {
        const resolved_segment r = segs[q];
        // outer_segment only reads `from` in write-only mode (Outer = void).
        float* source = const_cast<float*>(from);
        if (r.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                outer_segment<void, Mode, loco::bf16>(r, none, source, nullptr, nullptr, master, 0,
                                                      true);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                outer_segment<void, Mode, float>(r, none, source, nullptr, nullptr, master, 0,
                                                 true);
            }
        }
    }
}

// Masters of bf16 values := the values, widened. (A template, as every kernel of a header.)
template <int = 0>
__global__ void __launch_bounds__(block_threads) init_master_kernel(table_view t, float* master) {
    __shared__ resolved_segment segs[max_segments_per_block];
    const std::uint32_t count = stage_segments(t, segs);
    for (std::uint32_t q = 0; q < count; ++q) {
        const resolved_segment r = segs[q];
        if ((r.combo & 1u) == 0) {
            continue;
        }
        const auto* v = static_cast<const loco::bf16*>(r.value);
        float* ms = master + r.master;
        for (std::uint32_t i = threadIdx.x; i < r.span; i += block_threads) {
            ms[i] = i < r.len ? widen(v[i]) : 0.0f;
        }
    }
}

#endif  // LOCO_HAS_CUDA()

// Launches `kernel` on the table's grid; returns the launch's own error (not a stale one).
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), std::uint32_t blocks, cudaStream_t stream,
                   Args&&... args) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(blocks, 1, 1);
    cfg.blockDim = dim3(block_threads, 1, 1);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cfg.attrs = nullptr;
    cfg.numAttrs = 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

inline void require_device(const tensor_table& table, const char* what) {
    const int d = current_device();
    if (d != table.device()) {
        throw invalid_argument(std::string("loco: ") + what + ": the table was built on GPU " +
                               std::to_string(table.device()) + " but GPU " + std::to_string(d) +
                               " is current");
    }
}

inline void require_combos(const tensor_table& table, unsigned compiled, const char* what) {
    const unsigned missing = table.combos_present() & ~compiled;
    if (missing != 0) {
        std::string names;
        const char* pairs[] = {"fp32 values with fp32 gradients", "bf16 values with fp32 gradients",
                               "fp32 values with bf16 gradients", "bf16 values with bf16 gradients"};
        for (unsigned i = 0; i < 4; ++i) {
            if (missing & (1u << i)) {
                names += std::string(names.empty() ? "" : ", ") + pairs[i];
            }
        }
        throw invalid_argument(std::string("loco: ") + what +
                               ": the table holds tensors of a type this launch was not compiled "
                               "for (" + names + "); add them to the Combos template argument");
    }
}

inline void require_pointer(const void* p, std::size_t elements, const char* name,
                            const char* what) {
    if (elements != 0 && p == nullptr) {
        throw invalid_argument(std::string("loco: ") + what + ": null " + name + " for " +
                               std::to_string(elements) + " elements");
    }
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
        throw invalid_argument(std::string("loco: ") + what + ": " + name +
                               " is not 16-byte aligned (allocate it with device_buffer or "
                               "cudaMalloc)");
    }
}

}  // namespace detail

// One inner step of Rule over every tensor of `table`:
//   state   Rule::state_size arrays of StateT, each table.padded_elements() long, zero at first
//   master  table.master_elements() floats (the fp32 masters of bf16 values, initialised with
//           init_master), or null when the table has no bf16 value or Mode is stochastic
//   hyper, control  device memory (device_control<Rule::hyper>)
// With skip_nonfinite, check_gradients must have run before on the same stream.
template <class Rule, class StateT = float, bf16_update Mode = bf16_update::master,
          unsigned Combos = combos::all>
void inner_step(const tensor_table& table, StateT* state, float* master,
                const typename Rule::hyper* hyper, step_control* control, bool skip_nonfinite,
                cudaStream_t stream) {
    static_assert(elementwise_optimizer<Rule>);
    static_assert(is_storage_type<StateT>, "loco: optimizer state is float or loco::bf16");
    constexpr const char* what = "cuda::inner_step";
    detail::require_device(table, what);
    detail::require_combos(table, Combos, what);
    if (!table.has_gradients() && table.total_elements() != 0) {
        throw invalid_argument("loco: cuda::inner_step: the table was built without gradients");
    }
    detail::require_pointer(state,
                            static_cast<std::size_t>(Rule::state_size) * table.padded_elements(),
                            "state", what);
    if constexpr (Mode == bf16_update::master) {
        detail::require_pointer(master, table.master_elements(), "master", what);
    }
    detail::require_pointer(hyper, 1, "hyper", what);
    detail::require_pointer(control, 1, "control", what);
    detail::inner_args<Rule, StateT> args{hyper, control, state, master, skip_nonfinite};
    LOCO_CUDA_CHECK(detail::launch(detail::inner_step_kernel<Rule, StateT, Mode, Combos>,
                                   table.blocks(), stream, table.view(), args));
}

// Sets control->first_nonfinite to the smallest flat index of a non-finite gradient, if any
// (never raises it: a flag already set stays set).
inline void check_gradients(const tensor_table& table, step_control* control,
                            cudaStream_t stream) {
    detail::require_device(table, "cuda::check_gradients");
    detail::require_pointer(control, 1, "control", "cuda::check_gradients");
    if (!table.has_gradients() && table.total_elements() != 0) {
        throw invalid_argument("loco: cuda::check_gradients: the table has no gradients");
    }
    LOCO_CUDA_CHECK(detail::launch(detail::check_kernel<true>, table.blocks(), stream,
                                   table.view(), static_cast<const float*>(nullptr), control));
}

// The same over an fp32 array of the padded layout (the averaged pseudo-gradient); the index
// reported is a flat-layout index.
inline void check_padded(const tensor_table& table, const float* padded, step_control* control,
                         cudaStream_t stream) {
    detail::require_device(table, "cuda::check_padded");
    detail::require_pointer(padded, table.padded_elements(), "array", "cuda::check_padded");
    detail::require_pointer(control, 1, "control", "cuda::check_padded");
    LOCO_CUDA_CHECK(detail::launch(detail::check_kernel<false>, table.blocks(), stream,
                                   table.view(), padded, control));
}

// Phase 1 of a sync: delta = global - local over the padded layout (padding set to 0). `local` is
// the parameter's authoritative value: its fp32 master for bf16 values under bf16_update::master,
// the (widened) value otherwise.
template <bf16_update Mode = bf16_update::master, unsigned Combos = combos::all>
void outer_delta(const tensor_table& table, const float* global, const float* master,
                 float* delta, cudaStream_t stream) {
    constexpr const char* what = "cuda::outer_delta";
    detail::require_device(table, what);
    detail::require_combos(table, Combos, what);
    detail::require_pointer(global, table.padded_elements(), "global", what);
    detail::require_pointer(delta, table.padded_elements(), "delta", what);
    if constexpr (Mode == bf16_update::master) {
        detail::require_pointer(master, table.master_elements(), "master", what);
    }
    LOCO_CUDA_CHECK(detail::launch(detail::delta_kernel<true, Mode, Combos>, table.blocks(),
                                   stream, table.view(), global, master, delta));
}

// Phase 2 of a sync: with delta holding the average over the workers, global and the outer state
// take one Outer::update, and the new global values are written to the parameters (bf16: rounded
// to nearest) and to the masters of bf16 values. With skip_nonfinite and the flag set (by
// check_padded on delta), only the write-back of the unchanged global values happens.
template <class Outer, bf16_update Mode = bf16_update::master, unsigned Combos = combos::all>
void outer_apply(const tensor_table& table, float* global, const float* delta, float* state,
                 float* master, const typename Outer::hyper* hyper, step_control* control,
                 bool skip_nonfinite, cudaStream_t stream) {
    static_assert(elementwise_optimizer<Outer>);
    constexpr const char* what = "cuda::outer_apply";
    detail::require_device(table, what);
    detail::require_combos(table, Combos, what);
    detail::require_pointer(global, table.padded_elements(), "global", what);
    detail::require_pointer(delta, table.padded_elements(), "delta", what);
    detail::require_pointer(state, static_cast<std::size_t>(Outer::state_size) *
                                       table.padded_elements(),
                            "state", what);
    if constexpr (Mode == bf16_update::master) {
        detail::require_pointer(master, table.master_elements(), "master", what);
    }
    detail::require_pointer(hyper, 1, "hyper", what);
    detail::require_pointer(control, 1, "control", what);
    detail::outer_args<Outer> args{hyper, control, global, delta, state, master, skip_nonfinite};
    LOCO_CUDA_CHECK(detail::launch(detail::outer_apply_kernel<Outer, Mode, Combos>,
                                   table.blocks(), stream, table.view(), args));
}

// out := the parameters' authoritative values (see outer_delta), padded layout, padding 0. Takes
// the global snapshot at the start of training.
template <bf16_update Mode = bf16_update::master, unsigned Combos = combos::all>
void gather_values(const tensor_table& table, const float* master, float* out,
                   cudaStream_t stream) {
    constexpr const char* what = "cuda::gather_values";
    detail::require_device(table, what);
    detail::require_combos(table, Combos, what);
    detail::require_pointer(out, table.padded_elements(), "out", what);
    if constexpr (Mode == bf16_update::master) {
        detail::require_pointer(master, table.master_elements(), "master", what);
    }
    LOCO_CUDA_CHECK(detail::launch(detail::delta_kernel<false, Mode, Combos>, table.blocks(),
                                   stream, table.view(), static_cast<const float*>(nullptr),
                                   master, out));
}

// The parameters (bf16: rounded to nearest) and the masters of bf16 values := `from`, an fp32
// array of the padded layout (after a broadcast of the global values).
template <bf16_update Mode = bf16_update::master, unsigned Combos = combos::all>
void scatter_values(const tensor_table& table, const float* from, float* master,
                    cudaStream_t stream) {
    constexpr const char* what = "cuda::scatter_values";
    detail::require_device(table, what);
    detail::require_combos(table, Combos, what);
    detail::require_pointer(from, table.padded_elements(), "from", what);
    if constexpr (Mode == bf16_update::master) {
        detail::require_pointer(master, table.master_elements(), "master", what);
    }
    LOCO_CUDA_CHECK(detail::launch(detail::scatter_kernel<Mode, Combos>, table.blocks(), stream,
                                   table.view(), from, master));
}

// Masters of bf16 values := the values (padding 0). Run once before the first inner_step.
inline void init_master(const tensor_table& table, float* master, cudaStream_t stream) {
    detail::require_device(table, "cuda::init_master");
    detail::require_pointer(master, table.master_elements(), "master", "cuda::init_master");
    LOCO_CUDA_CHECK(detail::launch(detail::init_master_kernel<>, table.blocks(), stream,
                                   table.view(), master));
}

}  // namespace loco::backend::cuda
