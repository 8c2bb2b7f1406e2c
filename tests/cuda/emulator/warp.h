// Warp-level intrinsics and the few other device functions the compression kernels use
// (backend/cuda/compress.hpp), for the CPU emulation in cuda_runtime.h.
//
// The 256 threads of a block are fibers (cuda_runtime.h), so a warp exchange is a rendezvous of
// its 32 fibers: each writes its value to the warp's slots, waits at the warp's barrier, reads
// its source lane, and waits again before the slots can be reused. Only full-mask calls are
// emulated, and every lane of the warp must make the call, as on a GPU: a lane that skips it
// leaves the other 31 waiting (a deadlock here is a divergence bug there).
#pragma once

#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace emu {
struct warp_rendezvous {
    fiber_barrier bar{32};
    std::uint64_t slot[32];
};
inline warp_rendezvous* warps() {
    static warp_rendezvous w[256 / 32];
    return w;
}
// Every lane contributes v; returns lane `source(lane)`'s value.
template <class T, class Source>
T warp_exchange(unsigned mask, T v, Source&& source) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    if (mask != 0xffffffffu) {
        std::abort();  // partial masks are not emulated
    }
    warp_rendezvous& w = warps()[threadIdx.x / 32];
    const unsigned lane = threadIdx.x % 32;
    std::memcpy(&w.slot[lane], &v, sizeof(T));
    w.bar.arrive_and_wait();
    T out;
    std::memcpy(&out, &w.slot[source(lane) % 32], sizeof(T));
    w.bar.arrive_and_wait();
    return out;
}
}  // namespace emu

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::warp_exchange(mask, v, [&](unsigned lane) {
        return (lane & ~static_cast<unsigned>(width - 1)) + (static_cast<unsigned>(src) % width);
    });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::warp_exchange(mask, v, [&](unsigned lane) {
        const unsigned to = lane ^ static_cast<unsigned>(lane_mask);
        return (to & ~static_cast<unsigned>(width - 1)) == (lane & ~static_cast<unsigned>(width - 1))
                   ? to
                   : lane;
    });
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::warp_exchange(mask, v, [&](unsigned lane) {
        const unsigned seg = lane % static_cast<unsigned>(width);
        return seg + delta < static_cast<unsigned>(width) ? lane + delta : lane;
    });
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    if (mask != 0xffffffffu) {
        std::abort();
    }
    emu::warp_rendezvous& w = emu::warps()[threadIdx.x / 32];
    const unsigned lane = threadIdx.x % 32;
    w.slot[lane] = predicate != 0 ? 1u : 0u;
    w.bar.arrive_and_wait();
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l) {
        bits |= static_cast<unsigned>(w.slot[l]) << l;
    }
    w.bar.arrive_and_wait();
    return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
    return __ballot_sync(mask, predicate) == 0xffffffffu;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) {
        std::abort();
    }
    emu::warps()[threadIdx.x / 32].bar.arrive_and_wait();
}

// Round-to-nearest arithmetic that a compiler may not contract (loco's programs are built with
// -ffp-contract=off, cmake/loco_warnings.cmake, so the plain operators are the same thing).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

inline unsigned atomicOr(unsigned* p, unsigned v) {
    return std::atomic_ref<unsigned>(*p).fetch_or(v);
}
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_or(v);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}

inline cudaError_t cudaMemcpy2DAsync(void* d, std::size_t dp, const void* s, std::size_t sp,
                                     std::size_t w, std::size_t h, cudaMemcpyKind k,
                                     cudaStream_t st = nullptr) {
    if (st && st->capturing && k == cudaMemcpyHostToDevice &&
        emu::type_of(s) == cudaMemoryTypeUnregistered) {
        return cudaErrorStreamCaptureUnsupported;
    }
    return emu::enqueue(st, [=] {
        for (std::size_t r = 0; r < h; ++r) {
            std::memmove(static_cast<char*>(d) + r * dp, static_cast<const char*>(s) + r * sp, w);
        }
    });
}
