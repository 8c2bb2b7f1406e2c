// A CPU emulation of the slice of the CUDA runtime loco uses, to execute the kernels' logic with
// g++ on a machine without a GPU. Blocks run one after another; the threads of a block run as
// fibers on the launching thread, switched only at __syncthreads and warp exchanges
// (emu::fiber_barrier), so a barrier costs a few hundred user-space switches, not the wake-up of
// 256 OS threads; __shared__ is a function static (valid because one block runs at a time),
// launches are serialised by a mutex. A barrier that can never complete (a divergent
// __syncthreads) aborts with a message instead of hanging.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
// Aligned as CUDA aligns them (16, 16 and 8 bytes): a vector access needs an address aligned to
// its size on a GPU, which faults otherwise.
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
// A misaligned vector load is a fault on a GPU ("misaligned address"); here it aborts, so that a
// kernel taking its vector path over a misaligned array fails on the emulator too.
template <class T>
inline T __ldg(const T* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) {
        std::fprintf(stderr, "emulator: __ldg of a %zu-byte vector at misaligned address %p\n",
                     sizeof(T), static_cast<const void*>(p));
        std::abort();
    }
    return *p;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
struct pool;
pool& the_pool();
void syncthreads();

void yield_fiber();
// A barrier of `expected` fibers of the running block: arrivals count, the last one releases the
// others (a new generation), which resume when the scheduler next reaches them.
struct fiber_barrier {
    unsigned expected;
    unsigned count = 0;
    unsigned long generation = 0;
    explicit fiber_barrier(unsigned n) : expected(n) {}
    void arrive_and_wait();
};
}  // namespace emu
inline void __syncthreads() { emu::syncthreads(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    std::atomic_ref<unsigned long long> a(*p);
    unsigned long long old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
[[noreturn]] inline void __trap() { std::abort(); }

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorNotReady = 600,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorStreamCaptureUnsupported = 900,
    // What loco::cublas_error maps cuBLAS statuses to.
    cudaErrorMemoryAllocation = 2,
    cudaErrorNotSupported = 801,
    cudaErrorUnknown = 999,
    cudaErrorLaunchFailure = 719,
};
inline const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorNotReady: return "cudaErrorNotReady";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        default: return "cudaErrorUnknown";
    }
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }

enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2, cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes { cudaMemoryType type; int device; void* devicePointer; void* hostPointer; };

struct emu_stream { bool capturing = false; std::vector<std::function<void()>>* capture = nullptr; };
using cudaStream_t = emu_stream*;
struct emu_event { std::chrono::steady_clock::time_point at{}; };  // when recorded
using cudaEvent_t = emu_event*;
struct emu_graph { std::vector<std::function<void()>> ops; };
using cudaGraph_t = emu_graph*;
using cudaGraphExec_t = emu_graph*;
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDefault = 0;
constexpr unsigned cudaEventDisableTiming = 2;
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1, cudaStreamCaptureStatusInvalidated = 2 };

namespace emu {
struct allocation { std::size_t size; cudaMemoryType type; };
inline std::mutex& mem_mutex() { static std::mutex m; return m; }
inline std::map<std::uintptr_t, allocation>& allocations() { static std::map<std::uintptr_t, allocation> a; return a; }
inline void* allocate(std::size_t n, cudaMemoryType t) {
#if defined(__SANITIZE_ADDRESS__)
    // Exactly n bytes, so that AddressSanitizer reports a kernel reading or writing past an
    // allocation (a GPU would not fault until the next page; compute-sanitizer would report it).
    void* p = nullptr;
    if (posix_memalign(&p, 256, std::max<std::size_t>(n, 1)) != 0) p = nullptr;
#else
    void* p = std::aligned_alloc(256, (n + 255) / 256 * 256 + 256);
#endif
    std::lock_guard<std::mutex> l(mem_mutex());
    allocations()[reinterpret_cast<std::uintptr_t>(p)] = {n, t};
    return p;
}
inline void release(void* p) {
    std::lock_guard<std::mutex> l(mem_mutex());
    allocations().erase(reinterpret_cast<std::uintptr_t>(p));
    std::free(p);
}
inline cudaMemoryType type_of(const void* p) {
    std::lock_guard<std::mutex> l(mem_mutex());
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    auto it = allocations().upper_bound(a);
    if (it == allocations().begin()) return cudaMemoryTypeUnregistered;
    --it;
    if (a < it->first + it->second.size) return it->second.type;
    return cudaMemoryTypeUnregistered;
}
// Runs op now, or records it when the stream captures.
// Work outside a graph capture runs at once, with no allocation (a real runtime call cannot throw
// std::bad_alloc, and tests/alloc/cuda_alloc_failure_test.cpp fails the host's allocations in turn).
template <class Op>
inline cudaError_t enqueue(cudaStream_t s, Op&& op) {
    if (s && s->capturing) {
        s->capture->push_back(std::function<void()>(std::forward<Op>(op)));
    } else {
        op();
    }
    return cudaSuccess;
}

// Switching between fibers. On x86-64 a switch saves the callee-saved registers and the SSE and
// x87 control words on the running stack and resumes another stack (the System V ABI leaves
// every other register to the caller): about ten instructions. glibc's swapcontext, the
// portable fallback, also makes a sigprocmask system call per switch; with two switches per
// thread per barrier those calls were half the emulated suite's time.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)  // EMU_UCONTEXT: the fallback, to test it
// *from = the running stack; continue on `to` (a stack saved by this function, or one that
// fiber_context::arm prepared).
__attribute__((naked, noinline)) inline void switch_stack(void** /*from*/, void* /*to*/) {
    asm("pushq %rbp\n\t"
        "pushq %rbx\n\t"
        "pushq %r12\n\t"
        "pushq %r13\n\t"
        "pushq %r14\n\t"
        "pushq %r15\n\t"
        "subq $8, %rsp\n\t"
        "stmxcsr (%rsp)\n\t"
        "fnstcw 4(%rsp)\n\t"
        "movq %rsp, (%rdi)\n\t"
        "movq %rsi, %rsp\n\t"
        "ldmxcsr (%rsp)\n\t"
        "fldcw 4(%rsp)\n\t"
        "addq $8, %rsp\n\t"
        "popq %r15\n\t"
        "popq %r14\n\t"
        "popq %r13\n\t"
        "popq %r12\n\t"
        "popq %rbx\n\t"
        "popq %rbp\n\t"
        "ret\n\t");
}
struct fiber_context {
    void* sp = nullptr;
    // A fresh stack whose first switch_stack lands at the start of entry(), aligned as after a
    // call: entry's return address (never used: entry switches away for good), entry itself
    // where switch_stack's ret finds it, six zero registers, the default control words.
    void arm(char* stack, std::size_t bytes, void (*entry)(), fiber_context*) {
        auto* slot = reinterpret_cast<std::uint64_t*>(
            (reinterpret_cast<std::uintptr_t>(stack) + bytes) & ~std::uintptr_t{15});
        *--slot = 0;
        *--slot = reinterpret_cast<std::uint64_t>(entry);
        for (int r = 0; r < 6; ++r) *--slot = 0;
        *--slot = (std::uint64_t{0x037F} << 32) | 0x1F80;  // x87 control word, MXCSR
        sp = slot;
    }
    void switch_to(fiber_context& to) { switch_stack(&sp, to.sp); }
};
#else
}  // namespace emu
#include <ucontext.h>
namespace emu {
struct fiber_context {
    ucontext_t context;
    void arm(char* stack, std::size_t bytes, void (*entry)(), fiber_context* back) {
        getcontext(&context);
        context.uc_stack.ss_sp = stack;
        context.uc_stack.ss_size = bytes;
        context.uc_link = &back->context;
        makecontext(&context, entry, 0);
    }
    void switch_to(fiber_context& to) { swapcontext(&context, &to.context); }
};
#endif

// AddressSanitizer follows the switches when told (its fiber interface): which stack runs next,
// and on arrival which stack was left. Fibers are always resumed by the scheduler and the
// scheduler by a fiber, so a fiber learns the scheduler's stack (that of whichever thread runs
// the launch) each time it arrives.
#if defined(__SANITIZE_ADDRESS__)
}  // namespace emu
#include <sanitizer/common_interface_defs.h>
namespace emu {
inline void leaving_stack(void** fake, const void* bottom, std::size_t size) {
    __sanitizer_start_switch_fiber(fake, bottom, size);
}
inline void arrived_on_stack(void* fake, const void** old_bottom, std::size_t* old_size) {
    __sanitizer_finish_switch_fiber(fake, old_bottom, old_size);
}
#else
inline void leaving_stack(void**, const void*, std::size_t) {}
inline void arrived_on_stack(void*, const void**, std::size_t*) {}
#endif
struct stack_bounds {
    const void* bottom = nullptr;
    std::size_t size = 0;
    void* fake = nullptr;  // ASan's fake stack of a switched-out context
};

struct pool {
    static constexpr unsigned threads = 256;
    static constexpr std::size_t stack_bytes = 256 * 1024;
    struct fiber {
        fiber_context context;
        std::unique_ptr<char[]> stack;
        stack_bounds bounds;
        bool done = false;
    };
    fiber_barrier sync{threads};
    std::vector<fiber> fibers = std::vector<fiber>(threads);
    fiber_context scheduler;
    stack_bounds scheduler_bounds;
    unsigned current = 0;
    unsigned long progress = 0;  // barrier arrivals and finished fibers: a pass without any is a deadlock
    const std::function<void()>* task = nullptr;
    pool() {
        for (auto& f : fibers) f.stack = std::make_unique<char[]>(stack_bytes);
    }
    // A fiber's whole life: the kernel body, then back to the scheduler for good (the next block
    // arms the stack afresh).
    static void entry() {
        pool& p = the_pool();
        arrived_on_stack(nullptr, &p.scheduler_bounds.bottom, &p.scheduler_bounds.size);
        (*p.task)();
        fiber& self = p.fibers[p.current];
        self.done = true;
        ++p.progress;
        leaving_stack(nullptr, p.scheduler_bounds.bottom, p.scheduler_bounds.size);  // for good
        self.context.switch_to(p.scheduler);
        std::abort();  // never resumed
    }
    void start(fiber& fb) {
        fb.context.arm(fb.stack.get(), stack_bytes, &pool::entry, &scheduler);
        fb.bounds.bottom = fb.stack.get();
        fb.bounds.size = stack_bytes;
        fb.done = false;
    }
    // The scheduler runs fiber t until it waits or ends.
    void resume(fiber& fb) {
        leaving_stack(&scheduler_bounds.fake, fb.bounds.bottom, fb.bounds.size);
        scheduler.switch_to(fb.context);
        arrived_on_stack(scheduler_bounds.fake, nullptr, nullptr);
    }
    // The running fiber waits: back to the scheduler, which resumes it later.
    void yield() {
        fiber& self = fibers[current];
        leaving_stack(&self.bounds.fake, scheduler_bounds.bottom, scheduler_bounds.size);
        self.context.switch_to(scheduler);
        arrived_on_stack(self.bounds.fake, &scheduler_bounds.bottom, &scheduler_bounds.size);
    }
    void run(dim3 g, dim3 b, const std::function<void()>& f) {
        task = &f;
        gridDim = g;
        blockDim = b;
        for (unsigned x = 0; x < g.x; ++x) {
            blockIdx = dim3(x, 0, 0);
            for (auto& fb : fibers) start(fb);
            for (unsigned live = threads; live != 0;) {
                const unsigned long before = progress;
                live = 0;
                for (unsigned t = 0; t < threads; ++t) {
                    if (fibers[t].done) continue;
                    current = t;
                    threadIdx = dim3(t, 0, 0);
                    resume(fibers[t]);
                    live += fibers[t].done ? 0u : 1u;
                }
                if (live != 0 && progress == before) {
                    std::fprintf(stderr, "emulator: block %u deadlocked: a __syncthreads or warp "
                                         "exchange that not every thread reaches\n", x);
                    std::abort();
                }
            }
        }
        task = nullptr;
    }
};
inline pool& the_pool() { static pool p; return p; }
inline void yield_fiber() { the_pool().yield(); }
inline void fiber_barrier::arrive_and_wait() {
    ++the_pool().progress;
    if (++count == expected) {
        count = 0;
        ++generation;
        return;
    }
    const unsigned long mine = generation;
    while (generation == mine) yield_fiber();
}
inline void syncthreads() { the_pool().sync.arrive_and_wait(); }
inline std::mutex& launch_mutex() { static std::mutex m; return m; }
inline std::atomic<long>& launches() { static std::atomic<long> n{0}; return n; }
}  // namespace emu

struct cudaLaunchAttribute {};
struct cudaLaunchConfig_t {
    dim3 gridDim, blockDim;
    std::size_t dynamicSmemBytes = 0;
    cudaStream_t stream = nullptr;
    cudaLaunchAttribute* attrs = nullptr;
    unsigned numAttrs = 0;
};

template <class... Exp, class... Act>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Exp...), Act&&... args) {
    if (cfg->gridDim.x == 0 || cfg->blockDim.x != emu::pool::threads) return cudaErrorInvalidConfiguration;
    auto bound = [kernel, ... a = static_cast<Exp>(std::forward<Act>(args))]() { kernel(a...); };
    const dim3 g = cfg->gridDim, b = cfg->blockDim;
    return emu::enqueue(cfg->stream, [bound, g, b] {
        std::lock_guard<std::mutex> l(emu::launch_mutex());
        ++emu::launches();
        emu::the_pool().run(g, b, bound);
    });
}

namespace emu {
// Fault injection (tests): after fail_device_malloc(bytes), this thread's next cudaMalloc of at
// least `bytes` fails with cudaErrorMemoryAllocation (the device is out of memory), once;
// fail_device_malloc(0) disarms it. device_malloc_failures() counts this thread's failures.
inline thread_local std::size_t device_malloc_fail_at_least = 0;
inline thread_local int device_malloc_failed = 0;
inline void fail_device_malloc(std::size_t bytes) { device_malloc_fail_at_least = bytes; }
inline int device_malloc_failures() { return device_malloc_failed; }
}  // namespace emu
inline cudaError_t cudaMalloc(void** p, std::size_t n) {
    if (emu::device_malloc_fail_at_least != 0 && n >= emu::device_malloc_fail_at_least) {
        emu::device_malloc_fail_at_least = 0;
        ++emu::device_malloc_failed;
        *p = nullptr;
        return cudaErrorMemoryAllocation;
    }
    *p = emu::allocate(n, cudaMemoryTypeDevice);
    return cudaSuccess;
}
template <class T>  // the runtime's typed overload
inline cudaError_t cudaMalloc(T** p, std::size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
inline cudaError_t cudaFree(void* p) { if (p) emu::release(p); return cudaSuccess; }
inline cudaError_t cudaMallocHost(void** p, std::size_t n) { *p = emu::allocate(n, cudaMemoryTypeHost); return cudaSuccess; }
inline cudaError_t cudaFreeHost(void* p) { if (p) emu::release(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* d, const void* s, std::size_t n, cudaMemcpyKind) {
    if (n != 0 && (d == nullptr || s == nullptr)) return cudaErrorInvalidValue;
    if (n) std::memmove(d, s, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, std::size_t n, cudaMemcpyKind k, cudaStream_t st = nullptr) {
    if (n != 0 && (d == nullptr || s == nullptr)) return cudaErrorInvalidValue;
    if (st && st->capturing && k == cudaMemcpyHostToDevice && emu::type_of(s) == cudaMemoryTypeUnregistered)
        return cudaErrorStreamCaptureUnsupported;
    return emu::enqueue(st, [=] { if (n) std::memmove(d, s, n); });
}
inline cudaError_t cudaMemcpy2D(void* d, std::size_t dp, const void* s, std::size_t sp, std::size_t w, std::size_t h, cudaMemcpyKind) {
    for (std::size_t r = 0; r < h; ++r) std::memmove(static_cast<char*>(d) + r * dp, static_cast<const char*>(s) + r * sp, w);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void* d, int v, std::size_t n) { std::memset(d, v, n); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* d, int v, std::size_t n, cudaStream_t s = nullptr) {
    return emu::enqueue(s, [=] { std::memset(d, v, n); });
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = new emu_stream; return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { *e = new emu_event; return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
// Work runs when it is enqueued (or when its graph is launched), so an event's time is the host's
// clock when the stream reaches it: elapsed times are the emulator's wall times.
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new emu_event; return cudaSuccess; }
namespace emu {
// Fault injection (tests; reset it when done): while set, cudaEventRecord fails with
// cudaErrorLaunchFailure, as after a kernel fault that left the context unusable.
inline std::atomic<bool>& events_fail() { static std::atomic<bool> fail{false}; return fail; }
}  // namespace emu
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr) {
    if (emu::events_fail()) return cudaErrorLaunchFailure;
    return emu::enqueue(s, [e] { e->at = std::chrono::steady_clock::now(); });
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t stop) {
    *ms = std::chrono::duration<float, std::milli>(stop->at - start->at).count();
    return cudaSuccess;
}
namespace emu {
// Fault injection (tests; reset it when done): while set, cudaEventQuery reports
// cudaErrorNotReady, as for a device that never gets past the work enqueued so far (a collective
// whose peer is lost), so that code polling an event under a deadline meets its deadline. The
// work itself has still run, and the blocking waits (cudaEventSynchronize, cudaStreamSynchronize)
// still return at once where a GPU would hang.
inline std::atomic<bool>& events_stuck() { static std::atomic<bool> stuck{false}; return stuck; }
}  // namespace emu
inline cudaError_t cudaEventQuery(cudaEvent_t) {
    return emu::events_stuck() ? cudaErrorNotReady : cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned = 0) { return cudaSuccess; }
inline cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    s->capturing = true;
    s->capture = new std::vector<std::function<void()>>;
    return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
    *status = (s && s->capturing) ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
    *g = new emu_graph{std::move(*s->capture)};
    delete s->capture;
    s->capture = nullptr;
    s->capturing = false;
    return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) { *e = new emu_graph(*g); return cudaSuccess; }
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t) { for (auto& op : e->ops) op(); return cudaSuccess; }
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) { delete g; return cudaSuccess; }
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) { delete e; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { const char* e = std::getenv("EMU_DEVICES"); *n = e ? std::atoi(e) : 1; return cudaSuccess; }
// A small device: few SMs keep grids sized by SM count cheap to emulate.
constexpr int emu_sm_count = 4;
struct cudaDeviceProp { char name[256]; int major, minor, multiProcessorCount; std::size_t totalGlobalMem; };
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    std::strcpy(p->name, "CPU emulator");
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = emu_sm_count;
    p->totalGlobalMem = std::size_t{1} << 32;
    return cudaSuccess;
}
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
    *value = emu_sm_count;
    return cudaSuccess;
}
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
    a->type = emu::type_of(p);
    a->device = a->type == cudaMemoryTypeDevice ? 0 : -1;
    return cudaSuccess;
}

// Warp intrinsics and more device functions (the compression kernels).
#include "warp.h"
