// Throughput of the fused CUDA kernels on real parameter lists, next to a plain 16-byte-vector
// device copy of the same number of bytes measured in the same run:
//   ./build-gpu/bench/bench_cuda_kernels --benchmark_counters_tabular=true
//
// Parameter lists: GPT-2 124M (148 tensors), GPT-2 1.5B (580 tensors, d = 1600, 48 layers), and
// 10,000 tiny tensors (1 to 2048 elements). Every array holds random data (never zeros).
//
// Minimum traffic per parameter and step (each array read once, each written once), which the
// GB/s figures count (GB = 1e9 bytes):
//   AdamW  fp32 values:   read p 4 + g 4 + m 4 + v 4, write p 4 + m 4 + v 4        = 28 B
//          bf16 values:   read master 4 + g 2 + m 4 + v 4, write master 4 + p 2 + m 4 + v 4 = 28 B
//   SGD (Nesterov momentum) fp32: read p 4 + g 4 + b 4, write p 4 + b 4            = 20 B
//          bf16 values:   read master 4 + g 2 + b 4, write master 4 + p 2 + b 4     = 20 B
//   "+check" variants also run the non-finite gradient check first (one more read of the
//   gradients); their GB/s still counts the step's 28 B, so the check's cost shows as a drop.
//   Outer phase 1 (delta = global - local): read global 4 + local 4, write delta 4   = 12 B
//   Outer phase 2 (Nesterov): read global 4 + delta 4 + b 4, write global 4 + b 4 + p 4 = 24 B
//          bf16 values: the write of p is 2 B and the master's 4 B is added          = 26 B
// Fused compression (backend/cuda/compress.hpp), error_feedback<blockwise<2, Block>>, fp32
// parameters, P = the payload's bytes (2-bit codes + one fp32 scale per block, header; per
// element P/n = 0.2656 for Block 256, 0.2539 for Block 1024):
//   encode+EF (phase 1 fused in): read global 4 + p 4 + residual 4, write residual 4 + P/n
//          = 16 B + P/n; its time includes the checksum pass (reads P once more) and the header
//   decode+avg+outer, M payloads (Nesterov): read global 4 + b 4 + M P/n, write global 4 + b 4
//          + p 4 = 20 B + M P/n (M = 4 here: the payloads of one GPU, repeated)
//   (Nsight Compute's dram__bytes_read/write on the H100 agree with these counts within 0.5 %
//   for encode+EF, decode+avg+outer, AdamW fp32, outer phase 2 and the copy: docs/benchmarks.md.)
//   verify, M payloads: read M P (checksums) plus the scales again (format checks); counted as
//          M P bytes
// error_feedback<statistical<2>> per tensor (MuLoCo's setting; P/n = 0.25 + 20 bytes per tensor)
//   is counted with the same minimum traffic, 16 B + P/n and 20 B + M P/n, although its encode
//   takes four passes over the tensors (it needs each tensor's mean and deviation before its
//   codes: about 32 B + 3 P/n, docs/cuda.md); the ratio to the copy shows what that costs.
// The reference of the issue: a PyTorch 2-bit blockwise quantizer with error feedback takes
// 67 ms for 1.56 G elements on an H100 (0.28 TB/s); the target is >= 85 % of the copy for both
// fused passes.
// Chunked top-k compressors (backend/cuda/compress/sparseloco_kernels.hpp, demo_kernels.hpp) on
//   the 1.5B list as matrices (wte V x d, attn d x 3d, ...; vectors flat), fp32, at their
//   references' defaults: read x 4 + e 4, write e 4 + P/n = 12 B + P/n. SparseLoCo's later passes
//   touch only the kept values (n / 64 of them); DeMo's DCT costs 2 (h + w) double multiply-adds
//   per element each way, so its ratio to the copy shows the price of the double sums.
// LOCO_BENCH_SMOKE=1 runs every row on small stand-ins of these lists (bench/cuda/support.cuh;
// CTest does so on the CPU emulator).
// Timing: CUDA events around each launch, after warm-up; the median over the iterations is
// reported (counters median_ms, GBps), and the copy of the same byte count likewise (copy_GBps);
// ratio = GBps / copy_GBps. The summary table printed at the end repeats them.
#include <loco/backend/cuda/compress/demo_kernels.hpp>
#include <loco/aggregate/edit.hpp>
#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/aggregate/robust.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/backend/cuda/compress/sparseloco_kernels.hpp>
#include <loco/cuda.hpp>

#include "support.cuh"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

namespace lc = loco::backend::cuda;
using lc::dtype;
using loco_bench::fill;
using loco_bench::skip;
using loco_bench::smoke;
using loco_bench::timed_loop;

// ---- parameter lists --------------------------------------------------------------------------

// GPT-2's vocabulary and context; smoke mode's stand-ins are small.
std::size_t gpt2_vocab() { return smoke() ? 128 : 50257; }
std::size_t gpt2_context() { return smoke() ? 32 : 1024; }

std::vector<std::size_t> gpt2(std::size_t d, std::size_t layers) {
    const std::size_t vocab = gpt2_vocab(), context = gpt2_context();
    std::vector<std::size_t> sizes{vocab * d, context * d};
    for (std::size_t l = 0; l < layers; ++l) {
        const std::vector<std::size_t> layer{
            d, d,                  // ln_1 weight, bias
            d * 3 * d, 3 * d,      // attn.c_attn weight, bias
            d * d, d,              // attn.c_proj weight, bias
            d, d,                  // ln_2 weight, bias
            d * 4 * d, 4 * d,      // mlp.c_fc weight, bias
            4 * d * d, d};         // mlp.c_proj weight, bias
        sizes.insert(sizes.end(), layer.begin(), layer.end());
    }
    sizes.push_back(d);  // ln_f weight
    sizes.push_back(d);  // ln_f bias
    return sizes;
}

std::vector<std::size_t> tiny(std::size_t count) {
    std::vector<std::size_t> sizes(count);
    std::uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (auto& s : sizes) {
        x = loco::random::mix64(x);
        s = 1 + x % 2048;
    }
    return sizes;
}

const std::vector<std::size_t>& parameter_list(int which) {
    static const std::vector<std::size_t> lists[3] = {
        smoke() ? gpt2(32, 1) : gpt2(768, 12), smoke() ? gpt2(64, 2) : gpt2(1600, 48),
        tiny(smoke() ? 100 : 10000)};
    return lists[which];
}
const char* list_name(int which) {
    static const char* names[3] = {"gpt2_124M", "gpt2_1.5B", "tiny_10k"};
    return names[which];
}

// ---- device data ------------------------------------------------------------------------------

// The plain copy every figure is compared with: 16-byte vectors, grid-stride, four loads in
// flight per thread before the first store (a copy that waits on one load at a time reaches
// less of the memory system and would flatter every ratio), then a tail loop.
__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, std::size_t n) {
    constexpr std::size_t unroll = 4;
    const std::size_t stride = std::size_t{gridDim.x} * blockDim.x;
    std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x;
    for (; i + (unroll - 1) * stride < n; i += unroll * stride) {
        uint4 v[unroll];
#pragma unroll
        for (std::size_t u = 0; u < unroll; ++u) {
            v[u] = src[i + u * stride];
        }
#pragma unroll
        for (std::size_t u = 0; u < unroll; ++u) {
            dst[i + u * stride] = v[u];
        }
    }
    for (; i < n; i += stride) {
        dst[i] = src[i];
    }
}

int sm_count() {
    static const int n = [] {
        int device = 0, count = 0;
        LOCO_CUDA_CHECK(cudaGetDevice(&device));
        LOCO_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
        return count;
    }();
    return n;
}

// Median time in ms of `reps` runs of fn on `s`, each timed with events, after `warmup` runs.
template <class Fn>
double median_ms(Fn&& fn, cudaStream_t s, int warmup, int reps, std::vector<double>* all = nullptr) {
    lc::event start(cudaEventDefault), stop(cudaEventDefault);
    for (int i = 0; i < warmup; ++i) {
        fn();
    }
    LOCO_CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<double> times;
    for (int i = 0; i < reps; ++i) {
        start.record(s);
        fn();
        stop.record(s);
        LOCO_CUDA_CHECK(cudaEventSynchronize(stop));
        float ms = 0.0f;
        LOCO_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms);
    }
    if (all) {
        *all = times;
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

// Copy bandwidth (GB/s, bytes read + written) for a total traffic of `bytes`, measured once per
// byte count per run.
double copy_gbps(std::size_t bytes) {
    static std::map<std::size_t, double> cache;
    if (auto it = cache.find(bytes); it != cache.end()) {
        return it->second;
    }
    const std::size_t n16 = bytes / 2 / 16;
    lc::device_buffer<uint4> src(n16), dst(n16);
    fill(reinterpret_cast<float*>(src.get()), n16 * 4, 7, -1.0f, 1.0f);
    LOCO_CUDA_CHECK(cudaDeviceSynchronize());  // the fill ran on the legacy stream
    lc::stream s;
    const unsigned blocks = static_cast<unsigned>(sm_count()) * 8;
    const double ms = median_ms(
        [&] {
            LOCO_CUDA_CHECK(lc::detail::launch(copy_kernel, blocks, s, src.get(), dst.get(), n16));
        },
        s, 3, loco_bench::iterations(20));
    const double gbps = double(2 * n16 * 16) / (ms * 1e6);
    cache[bytes] = gbps;
    return gbps;
}

struct result {
    std::string name;
    double ms, gbps, copy;
};
std::vector<result>& results() {
    static std::vector<result> r;
    return r;
}

// A parameter list on the device: one arena per array, every tensor 256-byte aligned.
template <class P, class G>
struct device_model {
    std::vector<lc::tensor_spec> specs;
    lc::device_buffer<std::byte> values, grads;

    explicit device_model(const std::vector<std::size_t>& sizes) {
        std::size_t vb = 0, gb = 0;
        std::vector<std::size_t> vat, gat;
        for (const std::size_t n : sizes) {
            vat.push_back(vb);
            gat.push_back(gb);
            vb += (n * sizeof(P) + 255) / 256 * 256;
            gb += (n * sizeof(G) + 255) / 256 * 256;
        }
        values = lc::device_buffer<std::byte>(vb);
        grads = lc::device_buffer<std::byte>(gb);
        fill(reinterpret_cast<P*>(values.get()), vb / sizeof(P), 1, -1.0f, 1.0f);
        fill(reinterpret_cast<G*>(grads.get()), gb / sizeof(G), 2, -0.05f, 0.05f);
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            std::string name = std::to_string(i);
            name.insert(name.begin(), 'p');  // not "p" + ...: GCC 12's false -Wrestrict
            specs.push_back({std::move(name), values.get() + vat[i], lc::dtype_of<P>,
                             grads.get() + gat[i], lc::dtype_of<G>, sizes[i]});
        }
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
    }
};

void report(benchmark::State& state, const std::string& name, double ms, std::size_t bytes) {
    const double gbps = double(bytes) / (ms * 1e6);
    const double copy = copy_gbps(bytes);
    state.counters["median_ms"] = ms;
    state.counters["GBps"] = gbps;
    state.counters["copy_GBps"] = copy;
    state.counters["ratio"] = gbps / copy;
    results().push_back({name, ms, gbps, copy});
}

// ---- benchmarks -------------------------------------------------------------------------------

template <class Rule, class P, bool Check>
void inner_step(benchmark::State& state) {
    const int which = static_cast<int>(state.range(0));
    using G = P;  // gradients in the parameters' dtype
    constexpr unsigned combos = std::is_same_v<P, float> ? lc::combos::f32_f32 : lc::combos::bf16_bf16;
    const std::size_t bytes_per_param = Rule::state_size == 2 ? 28 : 20;
    try {
        const auto& sizes = parameter_list(which);
        std::size_t total = 0;
        for (const auto n : sizes) {
            total += n;
        }
        copy_gbps(total * bytes_per_param);  // measured before the model takes the memory
        device_model<P, G> model(sizes);
        const lc::tensor_table table(model.specs);
        lc::device_buffer<float> st(Rule::state_size * table.padded_elements());
        lc::device_buffer<float> master(table.master_elements());
        fill(st.get(), st.size(), 3, 0.0f, 1e-3f);  // m and v (or b): small, v >= 0
        lc::init_master(table, master.get(), nullptr);
        typename Rule::hyper h{};
        if constexpr (std::is_same_v<Rule, loco::inner::sgd>) {
            h = {.lr = 1e-2f, .momentum = 0.9f, .nesterov = true};
        }
        lc::device_control<typename Rule::hyper> control(h);
        lc::stream s;
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
        const double ms = timed_loop(
            state,
            [&] {
                if constexpr (Check) {
                    lc::check_gradients(table, control.control(), s);
                }
                lc::inner_step<Rule, float, lc::bf16_update::master, combos>(
                    table, st.get(), master.get(), control.hyper(), control.control(), Check, s);
            },
            s);
        const auto c = control.read(s);
        if (c.skipped != 0) {
            skip(state, "a step was skipped: the random gradients were not finite");
            return;
        }
        const std::string name = std::string(Rule::name) + (Check ? "+check " : " ") +
                                 (std::is_same_v<P, float> ? "fp32 " : "bf16 ") + list_name(which);
        report(state, name, ms, total * bytes_per_param);
    } catch (const std::exception& e) {
        skip(state, e.what());
    }
}

template <class P, int Phase>
void outer_phase(benchmark::State& state) {
    const int which = static_cast<int>(state.range(0));
    using Outer = loco::outer::nesterov;
    constexpr unsigned combos = std::is_same_v<P, float> ? lc::combos::f32_f32 : lc::combos::bf16_bf16;
    const std::size_t bytes_per_param = Phase == 1 ? 12 : (std::is_same_v<P, float> ? 24 : 26);
    try {
        const auto& sizes = parameter_list(which);
        std::size_t total = 0;
        for (const auto n : sizes) {
            total += n;
        }
        copy_gbps(total * bytes_per_param);
        device_model<P, P> model(sizes);
        const lc::tensor_table table(model.specs);
        const std::size_t padded = table.padded_elements();
        lc::device_buffer<float> global(padded), delta(padded), mom(padded),
            master(table.master_elements());
        fill(global.get(), padded, 4, -1.0f, 1.0f);
        fill(delta.get(), padded, 5, -1e-3f, 1e-3f);
        fill(mom.get(), padded, 6, -1e-3f, 1e-3f);
        lc::init_master(table, master.get(), nullptr);
        lc::device_control<Outer::hyper> control;
        lc::stream s;
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
        const double ms = timed_loop(
            state,
            [&] {
                if constexpr (Phase == 1) {
                    lc::outer_delta<lc::bf16_update::master, combos>(table, global.get(),
                                                                     master.get(), delta.get(), s);
                } else {
                    lc::outer_apply<Outer, lc::bf16_update::master, combos>(
                        table, global.get(), delta.get(), mom.get(), master.get(),
                        control.hyper(), control.control(), false, s);
                }
            },
            s);
        const std::string name = std::string("outer phase ") + (Phase == 1 ? "1 delta " : "2 nesterov ") +
                                 (std::is_same_v<P, float> ? "fp32 " : "bf16 ") + list_name(which);
        report(state, name, ms, total * bytes_per_param);
    } catch (const std::exception& e) {
        skip(state, e.what());
    }
}

template <class Codec>
struct block_of {
    static constexpr std::size_t value = 0;  // statistical
};
template <int Bits, std::size_t Block>
struct block_of<loco::compress::blockwise<Bits, Block>> {
    static constexpr std::size_t value = Block;
};

// The GPT-2 1.5B parameters (fp32) without gradients, the arrays of a compressed sync, and one
// encoded payload repeated M times as the gathered payloads.
template <class Codec>
struct compressed_sync {
    using codec = Codec;
    using ef = loco::compress::error_feedback<codec>;
    static constexpr int ranks = 4;

    std::vector<lc::tensor_spec> specs;
    lc::device_buffer<std::byte> values;
    std::unique_ptr<lc::tensor_table> table;
    std::unique_ptr<lc::compress_plan<codec>> plan;
    lc::device_buffer<float> global, residual, next, momentum;
    lc::device_buffer<std::byte> gathered;
    typename ef::hyper h{};

    explicit compressed_sync(const std::vector<std::size_t>& sizes) {
        std::size_t vb = 0;
        std::vector<std::size_t> at;
        for (const std::size_t n : sizes) {
            at.push_back(vb);
            vb += (n * 4 + 255) / 256 * 256;
        }
        values = lc::device_buffer<std::byte>(vb);
        fill(reinterpret_cast<float*>(values.get()), vb / 4, 1, -1.0f, 1.0f);
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            std::string name = std::to_string(i);
            name.insert(name.begin(), 'p');
            specs.push_back({std::move(name), values.get() + at[i], dtype::f32, nullptr,
                             dtype::f32, sizes[i]});
        }
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
        table = std::make_unique<lc::tensor_table>(specs);
        plan = std::make_unique<lc::compress_plan<codec>>(*table);
        const std::size_t padded = table->padded_elements();
        global = lc::device_buffer<float>(padded);
        residual = lc::device_buffer<float>(padded);
        next = lc::device_buffer<float>(padded);
        momentum = lc::device_buffer<float>(padded);
        fill(global.get(), padded, 4, -1.0f, 1.0f);
        fill(residual.get(), padded, 5, -1e-3f, 1e-3f);
        fill(momentum.get(), padded, 6, -1e-3f, 1e-3f);
        gathered = lc::device_buffer<std::byte>(ranks * plan->payload_bytes());
        if constexpr (block_of<Codec>::value != 0) {  // blockwise
            h.compress = {loco::compress::scale_kind::absmax, loco::compress::rounding::nearest};
        } else {  // statistical: MuLoCo's setting (per tensor, range 6, decay 0.9, lr folded in)
            h.decay = 0.9f;
            h.fold_outer_lr = true;
        }
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
    }

    void encode(cudaStream_t s, std::byte* payload) {
        lc::encode_io io;
        io.global = global.get();
        io.residual = residual.get();
        io.next_residual = next.get();
        io.payload = payload;
        lc::encode<ef, lc::encode_from::params, lc::bf16_update::master, lc::combos::f32_f32>(
            *plan, *table, h, io, {1, 0, 0, 1.0f, nullptr}, s);
    }
    // Fills the gathered buffer with M copies of one encoded payload; checks them.
    void gather(cudaStream_t s) {
        const std::size_t p = plan->payload_bytes();
        encode(s, gathered.get());
        for (int k = 1; k < ranks; ++k) {
            LOCO_CUDA_CHECK(cudaMemcpyAsync(gathered.get() + k * p, gathered.get(), p,
                                            cudaMemcpyDeviceToDevice, s));
        }
        lc::payload_check check(ranks);
        if (check.run(*plan, *table, h.compress, gathered.get(), s) != lc::no_nonfinite) {
            throw loco::error("the random payloads average to a non-finite value");
        }
    }
};

std::size_t list_elements(int which) {
    std::size_t t = 0;
    for (const auto n : parameter_list(which)) {
        t += n;
    }
    return t;
}

// List `which` as one flat segment per tensor (what the element-wise codecs see).
std::vector<loco::compress::segment> flat_segments(int which) {
    std::vector<loco::compress::segment> segs;
    std::size_t off = 0;
    for (const auto n : parameter_list(which)) {
        segs.push_back({off, n, 1, n});
        off += n;
    }
    return segs;
}

template <class Codec>
std::string codec_label() {
    if constexpr (block_of<Codec>::value != 0) {
        return "2-bit B" + std::to_string(block_of<Codec>::value);
    } else {
        return "2-bit statistical";
    }
}

// Pass 0: encode+EF; 1: decode+average+outer; 2: verify.
template <class Codec, int Pass>
void compressed(benchmark::State& state) {
    using sync_t = compressed_sync<Codec>;
    const int which = 1;
    try {
        const std::size_t total = list_elements(which);
        const std::size_t p = Codec::payload_bytes({}, flat_segments(which));
        const std::size_t m = sync_t::ranks;
        const std::size_t bytes = Pass == 0 ? 16 * total + p : (Pass == 1 ? 20 * total + m * p
                                                                          : m * p);
        copy_gbps(bytes);
        sync_t sync(parameter_list(which));
        lc::stream s;
        using outer = loco::outer::nesterov;
        lc::device_control<outer::hyper> control;
        lc::payload_check check(static_cast<int>(m));
        if (Pass != 0) {
            sync.gather(s);
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(s));
        lc::device_buffer<std::byte> send(Pass == 0 ? p : 0);
        const double ms = timed_loop(
            state,
            [&] {
                if constexpr (Pass == 0) {
                    sync.encode(s, send.get());
                } else if constexpr (Pass == 1) {
                    lc::decode_average_apply<typename sync_t::codec, outer, lc::bf16_update::master,
                                             lc::combos::f32_f32>(
                        *sync.plan, *sync.table, sync.gathered.get(), sync_t::ranks,
                        sync.global.get(), sync.momentum.get(), nullptr, control.hyper(),
                        control.control(), nullptr, s);
                } else {
                    check.run(*sync.plan, *sync.table, sync.h.compress, sync.gathered.get(), s);
                }
            },
            s);
        const std::string b = codec_label<Codec>();
        const std::string name =
            Pass == 0 ? "encode+EF " + b + " fp32 gpt2_1.5B"
                      : (Pass == 1 ? "decode+avg+outer M=4 " + b + " gpt2_1.5B"
                                   : "verify M=4 " + b + " gpt2_1.5B");
        report(state, name, ms, bytes);
    } catch (const std::exception& e) {
        skip(state, e.what());
    }
}

// The whole sync of the handle, loco::cuda::diloco<adamw, nesterov, Compressor> (issue 10: the
// pipeline must cost what its kernels cost). One rank (comm::cuda_replicas of size 1) on fp32
// parameters: phase 1, the exchange (for a compressor: the fused encode with error feedback, the
// all-gather of one payload, its check, the decode-average-outer kernel; without one: the delta,
// its non-finite check, the outer step), the agreement bookkeeping and the counters' uploads.
// Each iteration runs one inner step (untimed), then the timed sync() between two events: sync()
// waits on the host, so the figure is the call's wall time on the device's timeline. Minimum
// traffic counted: none 36 B per parameter (phase 1 12 B, phase 2 24 B); compressed 36 B + 2 P/n
// (encode 16 B + P/n, decode 20 B + P/n at M = 1); SparseLoCo as templar runs it (outer SGD,
// median_norm_clip; the chunked exchange, compress/chunked_exchange.hpp; the GPT-2 matrices as
// rows x cols, as templar chunks them) 44 B + 4 P/n (the pseudo-gradient 12 B, the encode
// 12 B + P/n, the check and the norms P/n each, the scatter-mean 4 B + P/n, the outer step 16 B:
// outer::sgd has no state, 8 B more per state array otherwise).
std::vector<loco::compress::segment> gpt2_matrices(std::size_t d, std::size_t layers);

// The segments of list `which` as the chunked compressors see them: the GPT-2 lists' matrices as
// rows x cols (in parameter_list()'s order), every other tensor flat.
std::vector<loco::compress::segment> list_segments(int which) {
    if (which == 0) return smoke() ? gpt2_matrices(32, 1) : gpt2_matrices(768, 12);
    if (which == 1) return smoke() ? gpt2_matrices(64, 2) : gpt2_matrices(1600, 48);
    return flat_segments(which);
}

template <class Compressor, class Outer = loco::outer::nesterov,
          class Aggregate = loco::aggregate::mean>
void handle_sync(benchmark::State& state) {
    const int which = static_cast<int>(state.range(0));
    try {
        const auto& sizes = parameter_list(which);
        const std::size_t total = list_elements(which);
        constexpr bool chunked = std::is_same_v<Compressor, loco::compress::sparseloco>;
        // The chunked compressor sees the matrices' shapes (a flat tensor is one row of chunks
        // that keep every cell: not SparseLoCo's payload); the others only the sizes.
        const std::vector<loco::compress::segment> segs =
            chunked ? list_segments(which) : flat_segments(which);
        std::size_t payload = 0;
        if constexpr (chunked) {
            payload = Compressor::payload_bytes({}, segs);
        } else if constexpr (!std::is_same_v<Compressor, loco::compress::none>) {
            payload = Compressor::base::payload_bytes({}, segs);
        }
        const std::size_t outer_bytes = 16 + 8 * Outer::state_size;
        const std::size_t bytes = chunked ? (28 + outer_bytes) * total + 4 * payload
                                          : (12 + outer_bytes) * total + 2 * payload;
        copy_gbps(bytes);
        device_model<float, float> model(sizes);
        lc::stream s;
        auto group = std::make_shared<loco::comm::cuda_replica_group>(1);
        loco::comm::cuda_replicas comm(group, 0, s);
        using handle = loco::cuda::diloco<loco::inner::adamw, Outer, Compressor,
                                          loco::schedule::every, Aggregate>;
        typename handle::config cfg;
        cfg.schedule.every = std::uint64_t{1} << 40;  // syncs only when the loop calls sync()
        cfg.stream = s;
        // fp32 CUDA views with the segments' shapes (a tensor_table carries sizes only).
        loco::parameter_list params;
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            const auto& spec = model.specs[i];
            auto* value = static_cast<float*>(spec.value);
            const auto* grad = static_cast<const float*>(spec.grad);
            if (segs[i].size != sizes[i]) {
                throw loco::invalid_argument("bench: the list's segments do not match its sizes");
            }
            if (segs[i].rows > 1) {
                params.add_views(spec.name, loco::cuda_matrix(value, segs[i].rows, segs[i].cols),
                                 loco::cuda_matrix(grad, segs[i].rows, segs[i].cols));
            } else {
                params.add_views(spec.name, loco::cuda_tensor(value, sizes[i]),
                                 loco::cuda_tensor(grad, sizes[i]));
            }
        }
        handle opt(params, comm, cfg);
        opt.start();
        lc::event start(cudaEventDefault), stop(cudaEventDefault);
        for (int i = 0; i < 2; ++i) {  // warm-up
            opt.step();
            opt.sync();
        }
        std::vector<double> times;
        for (auto _ : state) {
            opt.step();
            LOCO_CUDA_CHECK(cudaStreamSynchronize(s));
            start.record(s);
            opt.sync();
            stop.record(s);
            LOCO_CUDA_CHECK(cudaEventSynchronize(stop));
            float ms = 0.0f;
            LOCO_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
            state.SetIterationTime(double(ms) * 1e-3);
            times.push_back(ms);
        }
        std::sort(times.begin(), times.end());
        const double ms = times.empty() ? 0.0 : times[times.size() / 2];
        if (opt.outer_steps() != 2 + times.size()) {
            skip(state, "a sync was skipped: the random data were not finite");
            return;
        }
        std::string label = "none";
        if constexpr (chunked) {
            label = "sparseloco";
        } else if constexpr (!std::is_same_v<Compressor, loco::compress::none>) {
            label = "2-bit+EF " + codec_label<typename Compressor::base>();
        }
        report(state, "diloco sync " + label + " M=1 " + list_name(which), ms, bytes);
    } catch (const std::exception& e) {
        skip(state, e.what());
    }
}

// The 1.5B list as the chunked compressors see it: matrices as rows x cols, vectors flat.
std::vector<loco::compress::segment> gpt2_matrices(std::size_t d, std::size_t layers) {
    const std::size_t vocab = gpt2_vocab(), context = gpt2_context();
    std::vector<std::pair<std::size_t, std::size_t>> shapes{{vocab, d}, {context, d}};
    for (std::size_t l = 0; l < layers; ++l) {
        const std::vector<std::pair<std::size_t, std::size_t>> layer{
            {1, d}, {1, d}, {d, 3 * d}, {1, 3 * d}, {d, d},     {1, d},
            {1, d}, {1, d}, {d, 4 * d}, {1, 4 * d}, {4 * d, d}, {1, d}};
        shapes.insert(shapes.end(), layer.begin(), layer.end());
    }
    shapes.push_back({1, d});
    shapes.push_back({1, d});
    std::vector<loco::compress::segment> segs;
    std::size_t at = 0;
    for (const auto& [rows, cols] : shapes) {
        segs.push_back({at, rows * cols, rows, cols});
        at += rows * cols;
    }
    return segs;
}

// Encode (accumulator or residual update, top-k per chunk, payload, checksum) of SparseLoCo
// (Which 0; 3: with fixed-width 12-bit indices instead of Elias-Fano's) or DeMo (1: fp32 values,
// 2: signs) at their defaults on the 1.5B list.
template <int Which>
void chunked_encode(benchmark::State& state) {
    try {
        const auto segs = smoke() ? gpt2_matrices(64, 1) : gpt2_matrices(1600, 48);
        const std::size_t n = segs.back().offset + segs.back().size;
        const auto go = [&](const auto& plan, auto encode, const std::string& name) {
            const std::size_t bytes = 12 * n + plan.payload_bytes();
            copy_gbps(bytes);
            lc::device_buffer<float> x(n), e(n);
            lc::device_buffer<std::byte> payload(plan.payload_bytes());
            fill(x.get(), n, 8, -1e-3f, 1e-3f);
            fill(e.get(), n, 9, -1e-3f, 1e-3f);
            LOCO_CUDA_CHECK(cudaDeviceSynchronize());
            lc::stream s;
            const double ms = timed_loop(
                state, [&] { encode(plan, x.get(), e.get(), payload.get(), s.get()); }, s);
            report(state, name, ms, bytes);
        };
        if constexpr (Which == 0 || Which == 3) {
            const lc::sparseloco_plan plan(
                {.indices = Which == 0 ? loco::compress::index_coding::compact
                                       : loco::compress::index_coding::fixed},
                segs, n);
            go(plan, [](auto& p, auto... a) { lc::sparseloco_encode(p, a...); },
               Which == 0 ? "encode sparseloco 64x64 top64 2-bit gpt2_1.5B"
                          : "encode sparseloco fixed-idx 64x64 top64 gpt2_1.5B");
        } else {
            const lc::demo_plan plan({.sign = Which == 2}, segs, n);
            go(plan, [](auto& p, auto... a) { lc::demo_encode(p, a...); },
               Which == 1 ? "encode demo 64x64 top32 fp32 gpt2_1.5B"
                          : "encode demo 64x64 top32 sign gpt2_1.5B");
        }
    } catch (const std::exception& e) {
        skip(state, e.what());
    }
}

void copy_only(benchmark::State& state) {
    // The reference itself, at AdamW's traffic on the 1.5B list.
    const std::size_t total = [] {
        std::size_t t = 0;
        for (const auto n : parameter_list(1)) {
            t += n;
        }
        return t;
    }();
    const std::size_t bytes = total * 28;
    const std::size_t n16 = bytes / 2 / 16;
    try {
        lc::device_buffer<uint4> src(n16), dst(n16);
        fill(reinterpret_cast<float*>(src.get()), n16 * 4, 7, -1.0f, 1.0f);
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
        lc::stream s;
        const unsigned blocks = static_cast<unsigned>(sm_count()) * 8;
        const double ms = timed_loop(
            state,
            [&] {
                LOCO_CUDA_CHECK(lc::detail::launch(copy_kernel, blocks, s, src.get(), dst.get(), n16));
            },
            s);
        const double gbps = double(2 * n16 * 16) / (ms * 1e6);
        state.counters["median_ms"] = ms;
        state.counters["GBps"] = gbps;
        results().push_back({"copy (16-B vectors), 1.5B x 28 B", ms, gbps, gbps});
    } catch (const std::exception& e) {
        skip(state, e.what());
    }
}

// The device aggregation policies (backend/cuda/aggregate.hpp, issue 14's "aggregation cost per
// parameter"): the rule alone, on M rows of random pseudo-gradients already in device memory
// (the all-gather, which the network dominates, is not timed), 16.8 M parameters in 8 tensors.
// Each sync runs the norms (the rows read once), the policy's host decisions, and the elementwise
// pass (the rows read again, the aggregate written): counted as (2 M + 1) 4 n bytes; centered
// clipping reads the rows twice per iteration (L = 1 here). The ns per parameter is the median
// time over n.
class replicated_reports final : public loco::comm::communicator {
public:
    explicit replicated_reports(int size) : size_(size) {}
    int rank() const noexcept override { return 0; }
    int size() const noexcept override { return size_; }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return "replicated_reports"; }
    std::uint64_t bytes_sent() const noexcept override { return 0; }

protected:
    // Every rank's slot gets this rank's data: M identical reports.
    void do_all_gather(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        for (std::size_t at = 0; at + send.size <= recv.size; at += send.size) {
            std::copy(send.data, send.data + send.size, recv.data + at);
        }
    }
    void do_all_reduce(loco::tensor_view<float>, loco::comm::reduce_op) override {}
    void do_all_to_all(loco::tensor_view<const std::byte>, loco::tensor_view<std::byte>) override {}
    void do_broadcast(loco::tensor_view<std::byte>, int) override {}
    void do_barrier() override {}

private:
    int size_;
};

template <class A>
void aggregate_cost(benchmark::State& state) {
    const int m = static_cast<int>(state.range(0));
    try {
        const std::size_t each = std::size_t{1} << (smoke() ? 10 : 21);
        const std::vector<std::size_t> sizes(8, each);
        const std::size_t n = 8 * each;
        const std::size_t bytes = (2 * static_cast<std::size_t>(m) + 1) * 4 * n;
        copy_gbps(bytes);
        device_model<float, float> model(sizes);
        const lc::tensor_table table(model.specs);
        lc::stream s;
        lc::device_aggregation<A> agg(table, m, s);
        replicated_reports control(m);
        const loco::aggregate::worker_report mine{1.0f, 50.0f};
        typename A::hyper h{};
        if constexpr (std::is_same_v<A, loco::aggregate::centered_clip>) h.iterations = 1;
        // A first round sizes the rows; it must finish (its reports' all-gather is in flight)
        // before the next one starts. The rows keep their random values through every round.
        agg.start_reports(control, mine);
        fill(agg.rows(), static_cast<std::size_t>(m) * table.padded_elements(), 3, -0.01f, 0.01f);
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
        bool refused = static_cast<bool>(agg.finish(h)) || agg.refused();
        agg.commit();
        const double ms = timed_loop(
            state,
            [&] {
                agg.start_reports(control, mine);
                const auto failure = agg.finish(h);
                if (failure || agg.refused()) refused = true;
                agg.commit();
            },
            s);
        if (refused) {
            skip(state, "the aggregation refused or failed a round of random rows");
            return;
        }
        state.counters["ns_per_param"] = ms * 1e6 / static_cast<double>(n);
        report(state,
               "aggregate " + std::string(A::name) + " M=" + std::to_string(m) + " 16.8M params",
               ms, bytes);
    } catch (const std::exception& e) {
        skip(state, e.what());
    }
}

// The GPT-2 lists hold GPT-2's parameters, 124,439,808 and 1,557,611,200 elements with the head
// tied (bench/run_gpu.sh scales PyTorch's per-element figure to the latter; smoke mode's stand-ins:
// V C + T C + L (12 C^2 + 13 C) + 2 C), and the chunked rows' matrices are the same tensors.
// Exits with 1 otherwise, before anything is measured.
void check_lists() {
    const auto expect = [](std::size_t c, std::size_t layers) {
        return gpt2_vocab() * c + gpt2_context() * c + layers * (12 * c * c + 13 * c) + 2 * c;
    };
    const std::size_t want[2] = {smoke() ? expect(32, 1) : 124439808,
                                 smoke() ? expect(64, 2) : 1557611200};
    bool ok = true;
    for (int which = 0; which < 2; ++which) {
        const auto segs = list_segments(which);
        const auto& sizes = parameter_list(which);
        ok = ok && list_elements(which) == want[which] && segs.size() == sizes.size();
        for (std::size_t i = 0; ok && i < segs.size(); ++i) {
            ok = segs[i].size == sizes[i] && segs[i].rows * segs[i].cols == sizes[i];
        }
    }
    if (!ok) {
        std::printf("bench_cuda_kernels: the GPT-2 parameter lists are not GPT-2's (%zu and %zu "
                    "elements, want %zu and %zu)\n",
                    list_elements(0), list_elements(1), want[0], want[1]);
        std::exit(1);
    }
}

void register_all() {
    check_lists();
    using loco::bf16;
    using loco::inner::adamw;
    using loco::inner::sgd;
    const auto big = [](benchmark::internal::Benchmark* b) {
        b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(loco_bench::iterations(30));
    };
    const auto lists = [&](benchmark::internal::Benchmark* b) {
        big(b);
        b->ArgName("list")->Arg(0)->Arg(1)->Arg(2);
    };
    benchmark::RegisterBenchmark("copy", copy_only)->Apply(big);
    lists(benchmark::RegisterBenchmark("adamw/fp32", inner_step<adamw, float, false>));
    lists(benchmark::RegisterBenchmark("adamw/bf16", inner_step<adamw, bf16, false>));
    lists(benchmark::RegisterBenchmark("sgd_nesterov/fp32", inner_step<sgd, float, false>));
    lists(benchmark::RegisterBenchmark("sgd_nesterov/bf16", inner_step<sgd, bf16, false>));
    big(benchmark::RegisterBenchmark("adamw+check/fp32", inner_step<adamw, float, true>)
            ->ArgName("list")->Arg(0)->Arg(1));
    using b256 = loco::compress::blockwise<2, 256>;
    using b1024 = loco::compress::blockwise<2, 1024>;
    using stat2 = loco::compress::statistical<2>;
    for (auto* b : {benchmark::RegisterBenchmark("compress_encode_ef/B256", compressed<b256, 0>),
                    benchmark::RegisterBenchmark("compress_decode_outer/B256",
                                                 compressed<b256, 1>),
                    benchmark::RegisterBenchmark("compress_verify/B256", compressed<b256, 2>),
                    benchmark::RegisterBenchmark("compress_encode_ef/B1024", compressed<b1024, 0>),
                    benchmark::RegisterBenchmark("compress_decode_outer/B1024",
                                                 compressed<b1024, 1>),
                    benchmark::RegisterBenchmark("compress_encode_ef/statistical2",
                                                 compressed<stat2, 0>),
                    benchmark::RegisterBenchmark("compress_decode_outer/statistical2",
                                                 compressed<stat2, 1>)}) {
        big(b);
    }
    using ef256 = loco::compress::error_feedback<b256>;
    for (auto* b : {benchmark::RegisterBenchmark("diloco_sync/none", handle_sync<loco::compress::none>),
                    benchmark::RegisterBenchmark("diloco_sync/B256", handle_sync<ef256>),
                    benchmark::RegisterBenchmark(
                        "diloco_sync/sparseloco",
                        handle_sync<loco::compress::sparseloco, loco::outer::sgd,
                                    loco::aggregate::median_norm_clip>)}) {
        big(b->ArgName("list")->Arg(0)->Arg(1));
    }
    for (auto* b : {benchmark::RegisterBenchmark("chunked_encode/sparseloco", chunked_encode<0>),
                    benchmark::RegisterBenchmark("chunked_encode/sparseloco_fixed",
                                                 chunked_encode<3>),
                    benchmark::RegisterBenchmark("chunked_encode/demo", chunked_encode<1>),
                    benchmark::RegisterBenchmark("chunked_encode/demo_sign", chunked_encode<2>)}) {
        big(b);
    }
    for (auto* b : {benchmark::RegisterBenchmark("aggregate/edit", aggregate_cost<loco::aggregate::edit>),
                    benchmark::RegisterBenchmark("aggregate/trimmed_mean",
                                                 aggregate_cost<loco::aggregate::trimmed_mean>),
                    benchmark::RegisterBenchmark("aggregate/median",
                                                 aggregate_cost<loco::aggregate::median>),
                    benchmark::RegisterBenchmark("aggregate/centered_clip",
                                                 aggregate_cost<loco::aggregate::centered_clip>),
                    benchmark::RegisterBenchmark("aggregate/median_norm_clip",
                                                 aggregate_cost<loco::aggregate::median_norm_clip>)}) {
        big(b->ArgName("M")->Arg(4)->Arg(8)->Arg(16));
    }
    for (auto* b : {benchmark::RegisterBenchmark("outer_phase1/fp32", outer_phase<float, 1>),
                    benchmark::RegisterBenchmark("outer_phase2/fp32", outer_phase<float, 2>),
                    benchmark::RegisterBenchmark("outer_phase1/bf16", outer_phase<bf16, 1>),
                    benchmark::RegisterBenchmark("outer_phase2/bf16", outer_phase<bf16, 2>)}) {
        big(b->ArgName("list")->Arg(1));
    }
}

void print_summary(std::FILE* out) {
    std::fprintf(out, "\n%-44s %10s %10s %10s %7s\n", "benchmark", "ms", "GB/s", "copy GB/s",
                 "ratio");
    for (const auto& r : results()) {
        std::fprintf(out, "%-44s %10.3f %10.1f %10.1f %7.3f\n", r.name.c_str(), r.ms, r.gbps,
                     r.copy, r.gbps / r.copy);
    }
}

}  // namespace

int main(int argc, char** argv) {
    return loco_bench::run_main(argc, argv, "bench_cuda_kernels", register_all, print_summary,
                                false);
}
