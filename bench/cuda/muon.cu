// Muon on the GPU (loco::backend::cuda::muon_engine): one optimizer step over the hidden matrices
// of GPT-2, as MuLoCo runs it (embeddings, head, biases and norms go to AdamW and are not here):
//   ./build-gpu/bench/bench_cuda_muon --benchmark_counters_tabular=true
//
//   GPT-2 124M: 12 layers x (attn.c_attn 768 x 2304, attn.c_proj 768 x 768, mlp.c_fc 768 x 3072,
//               mlp.c_proj 3072 x 768): 48 matrices, 85M parameters
//   GPT-2 1.5B: 48 layers x (1600 x 4800, 1600 x 1600, 1600 x 6400, 6400 x 1600): 192 matrices,
//               1.47G parameters
// torch.optim.Muon's defaults (lr 1e-3, weight decay 0.1, momentum 0.95, Nesterov, Keller Jordan's
// coefficients, 5 iterations, "original" lr adjustment); fp32 parameters, gradients and momentum
// unless the row says bf16 (bf16 values with fp32 masters, bf16 gradients). Random data, never
// zeros.
//
// LOCO_BENCH_SMOKE=1 runs every row on small stand-ins of these matrices (bench/cuda/support.cuh;
// CTest does so on the CPU emulator).
// Timing: CUDA events around each step on a non-blocking stream after 3 warm-up steps; the median
// of 20 is reported (median_ms). TFLOP/s counts the Newton-Schulz products by the nominal model,
// 5 x (4 m^2 n + 2 m^3) per m x n matrix (m <= n), whatever the engine executes; exec_TFLOPs
// counts what it executes (the symmetric products in k (k + 1) / 2 of k^2 blocks, see
// loco/backend/cuda/muon.hpp). Reference: PyTorch 2.11's torch.optim.Muon on an H100, default
// settings, 26.4 ms (124M) and 148 ms (1.5B) per step, measured by hand on 2026-11-22 and printed
// as such (bench/torch_reference.py measures PyTorch in the same run); targets 6 ms and 100 ms.
//
// Rows: the default engine; the symmetric products in full (k = 1) and in larger blocks (at least
// 256 rows, the default before the H100 measurement); one iteration instead of five (the difference is four iterations' cost; what remains
// is the element-wise passes and launch gaps); bf16 values and gradients; the step captured in a
// CUDA graph and replayed (launch overhead); at most 16 matrices per batch (a smaller workspace).
#include <loco/backend/cuda/muon.hpp>
#include <loco/random.hpp>

#include "support.cuh"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace lc = loco::backend::cuda;
using lc::dtype;
using loco_bench::fill;
using loco_bench::skip;
using loco_bench::smoke;

struct shape {
    std::size_t rows, cols;
};

std::vector<shape> gpt2_hidden(std::size_t d, std::size_t layers) {
    std::vector<shape> out;
    for (std::size_t l = 0; l < layers; ++l) {
        out.push_back({d, 3 * d});  // attn.c_attn
        out.push_back({d, d});      // attn.c_proj
        out.push_back({d, 4 * d});  // mlp.c_fc
        out.push_back({4 * d, d});  // mlp.c_proj
    }
    return out;
}

struct model_info {
    const char* name;
    std::vector<shape> shapes;
    double pytorch_ms;  // the reference above: not measured by this program
    double target_ms;
};
const model_info& model(int which) {
    static const model_info models[2] = {
        {"gpt2_124M", smoke() ? gpt2_hidden(32, 1) : gpt2_hidden(768, 12), 26.4, 6.0},
        {"gpt2_1.5B", smoke() ? gpt2_hidden(64, 2) : gpt2_hidden(1600, 48), 148.0, 100.0}};
    return models[which];
}

__global__ void widen_kernel(const loco::bf16* from, float* to, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
         i += std::size_t{gridDim.x} * blockDim.x) {
        to[i] = from[i].to_float();
    }
}

// The matrices of a model in device memory: one arena per array, every matrix 256-byte aligned.
struct device_model {
    std::vector<lc::muon_matrix> specs;
    lc::device_buffer<std::byte> values, grads;
    lc::device_buffer<float> momentum, master;

    device_model(const std::vector<shape>& shapes, dtype type) {
        const std::size_t es = lc::size_of(type);
        std::vector<std::size_t> at;
        std::size_t elements = 0;  // in units of 128 elements, so every matrix stays aligned
        for (const shape& s : shapes) {
            at.push_back(elements);
            elements += (s.rows * s.cols + 127) / 128 * 128;
        }
        values = lc::device_buffer<std::byte>(elements * es);
        grads = lc::device_buffer<std::byte>(elements * es);
        momentum = lc::device_buffer<float>(elements);
        momentum.zero(nullptr);
        if (type == dtype::f32) {
            fill(reinterpret_cast<float*>(values.get()), elements, 1, -0.05f, 0.05f);
            fill(reinterpret_cast<float*>(grads.get()), elements, 2, -1.0f, 1.0f);
        } else {
            master = lc::device_buffer<float>(elements);
            auto* v = reinterpret_cast<loco::bf16*>(values.get());
            fill(v, elements, 1, -0.05f, 0.05f);
            fill(reinterpret_cast<loco::bf16*>(grads.get()), elements, 2, -1.0f, 1.0f);
            LOCO_CUDA_CHECK(lc::detail::launch(widen_kernel, smoke() ? 16 : 1024, nullptr, v,
                                               master.get(), elements));
        }
        for (std::size_t i = 0; i < shapes.size(); ++i) {
            lc::muon_matrix m;
            m.name = "w" + std::to_string(i);
            m.value = values.get() + at[i] * es;
            m.value_type = type;
            m.master = type == dtype::bf16 ? master.get() + at[i] : nullptr;
            m.grad = grads.get() + at[i] * es;
            m.grad_type = type;
            m.momentum = momentum.get() + at[i];
            m.rows = shapes[i].rows;
            m.cols = shapes[i].cols;
            m.size = m.rows * m.cols;
            specs.push_back(std::move(m));
        }
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
    }
};

struct variant {
    std::string name;
    lc::muon_options options{};
    int ns_steps = 5;
    dtype type = dtype::f32;
    bool graph = false;
};

struct result {
    std::string name;
    double ms, tflops, exec_tflops, workspace_gib, pytorch_ms, target_ms;
};
std::vector<result>& results() {
    static std::vector<result> r;
    return r;
}

void muon_step(benchmark::State& state, int which, variant v) {
    try {
        const model_info& info = model(which);
        device_model m(info.shapes, v.type);
        lc::muon_engine engine(m.specs, v.options);
        loco::inner::muon::hyper h{};
        h.ns_steps = v.ns_steps;
        lc::stream s;
        engine.set_hyper(h, s);
        std::optional<lc::graph> g;
        if (v.graph) {
            LOCO_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            engine.step(h, nullptr, false, s);
            g.emplace(lc::graph::end_capture(s));
        }
        const auto run = [&] {
            if (g) {
                g->launch(s);
            } else {
                engine.step(h, nullptr, false, s);
            }
        };
        const double ms = loco_bench::timed_loop(state, run, s);
        if (engine.nonfinite_matrices(s) != 0) {
            skip(state, "a matrix's Newton-Schulz input was not finite");
            return;
        }
        const double tflops = engine.nominal_flops(v.ns_steps) / (ms * 1e9);
        const double exec = engine.executed_flops(v.ns_steps) / (ms * 1e9);
        const double gib = double(engine.workspace_bytes()) / double(1 << 30);
        state.counters["median_ms"] = ms;
        state.counters["TFLOPs"] = tflops;
        state.counters["exec_TFLOPs"] = exec;
        state.counters["workspace_GiB"] = gib;
        std::string ks;
        for (const auto& b : engine.batches()) {
            // Two appends: GCC 12 misreports -Wrestrict on "literal" + std::string at -O3.
            if (!ks.empty()) {
                ks += ',';
            }
            ks += std::to_string(b.gram_blocks);
        }
        state.SetLabel("gram blocks " + ks + ", " + std::to_string(engine.batches().size()) +
                       " batches");
        results().push_back({"muon " + v.name + " " + info.name, ms, tflops, exec, gib,
                             info.pytorch_ms, info.target_ms});
    } catch (const std::exception& e) {
        skip(state, e.what());
    }
}

void register_all() {
    std::vector<variant> variants;
    variants.push_back({"fp32"});
    variant full{"fp32 full-gram"};
    full.options.max_gram_blocks = 1;
    variants.push_back(full);
    variant coarse{"fp32 gram>=256"};
    coarse.options.min_gram_block = 256;
    variants.push_back(coarse);
    variant one{"fp32 1-iteration"};
    one.ns_steps = 1;
    variants.push_back(one);
    variant half{"bf16"};
    half.type = dtype::bf16;
    variants.push_back(half);
    variant graph{"fp32 graph"};
    graph.graph = true;
    variants.push_back(graph);
    variant capped{"fp32 batch<=16"};
    capped.options.max_batch = 16;
    variants.push_back(capped);
    for (int which = 0; which < 2; ++which) {
        for (const variant& v : variants) {
            if (which == 0 && v.options.max_batch != 0) {
                continue;  // 12 per shape: already under the cap
            }
            benchmark::RegisterBenchmark(("muon/" + v.name + "/" + model(which).name).c_str(),
                                         muon_step, which, v)
                ->UseManualTime()
                ->Unit(benchmark::kMillisecond)
                ->Iterations(loco_bench::iterations(20));
        }
    }
}

// The PyTorch column is the hand-measured reference, not this run's: its header and the note
// under the table say so, so that it is not read as a same-run comparison.
void print_summary(std::FILE* out) {
    std::fprintf(out, "\n%-44s %10s %10s %10s %9s %12s %8s\n", "benchmark", "ms", "TFLOP/s",
                 "exec TF/s", "ws GiB", "torch ref ms", "target");
    for (const auto& r : results()) {
        std::fprintf(out, "%-44s %10.3f %10.1f %10.1f %9.2f %12.1f %8s\n", r.name.c_str(), r.ms,
                     r.tflops, r.exec_tflops, r.workspace_gib, r.pytorch_ms,
                     smoke() ? "-" : r.ms <= r.target_ms ? "met" : "missed");
    }
    std::fprintf(out, "torch ref ms: PyTorch 2.11's torch.optim.Muon, measured by hand on an H100 "
                      "on 2026-11-22, not in this run\n(this run's PyTorch rows: torch.txt, "
                      "bench/torch_reference.py)\n");
}

}  // namespace

// Appended to the summary file: bench/run_gpu.sh gives this program the kernel benchmarks' file.
int main(int argc, char** argv) {
    return loco_bench::run_main(argc, argv, "bench_cuda_muon", register_all, print_summary, true);
}
