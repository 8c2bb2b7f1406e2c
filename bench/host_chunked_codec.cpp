// Host cost of the chunked codecs per parameter with the two index codings
// (compress/index_code.hpp), on one GPT-2 124M layer's tensors (7.1 M parameters):
//   sparseloco at templar's settings (64 x 64 chunks, top-64, 2-bit codes): encode (accumulator
//     update, top-k per chunk, quantization, the payload, and the accumulator's e -= decode) and
//     decode;
//   demo at DeMo's (64 x 64 chunks, top-32 DCT coefficients, fp32 values): encode (residual, the
//     chunks' DCT, top-k, the payload, the residual's inverse DCT) and decode (inverse DCT).
// What the compact (Elias-Fano) coding costs on the host next to fixed width, for 40% (sparseloco)
// and 25% (demo) fewer index bytes.
//   ./build/bench/bench/bench_chunked_codec --benchmark_counters_tabular=true
#include <loco/compress/demo.hpp>
#include <loco/compress/sparseloco.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <random>
#include <vector>

namespace {

namespace lc = loco::compress;

// One GPT-2 124M block: ln_1 (2 x 768), attn.c_attn (768 x 2304) and its bias, attn.c_proj
// (768 x 768) and its bias, ln_2 (2 x 768), mlp.c_fc (768 x 3072) and its bias, mlp.c_proj
// (3072 x 768) and its bias.
std::vector<lc::segment> gpt2_block() {
    const std::size_t c = 768;
    const std::size_t shapes[][2] = {{1, c},     {1, c}, {c, 3 * c}, {1, 3 * c},
                                     {c, c},     {1, c}, {1, c},     {1, c},
                                     {c, 4 * c}, {1, 4 * c}, {4 * c, c}, {1, c}};
    std::vector<lc::segment> segs;
    std::size_t at = 0;
    for (const auto& s : shapes) {
        segs.push_back({at, s[0] * s[1], s[0], s[1]});
        at += s[0] * s[1];
    }
    return segs;
}

std::vector<float> normal(std::size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, 1e-3f);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng);
    return v;
}

template <class C>
typename C::hyper settings(benchmark::State& state) {
    typename C::hyper h{};
    h.indices = state.range(0) == 0 ? lc::index_coding::fixed : lc::index_coding::compact;
    return h;
}

void per_parameter(benchmark::State& state, std::size_t n, std::size_t payload) {
    state.counters["ns_per_param"] = benchmark::Counter(
        static_cast<double>(state.iterations()) * static_cast<double>(n),
        benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
    state.counters["payload_bytes"] = static_cast<double>(payload);
}

template <class C>
void encode(benchmark::State& state) {
    const auto h = settings<C>(state);
    const auto segs = gpt2_block();
    const std::size_t n = segs.back().offset + segs.back().size;
    const std::vector<float> x = normal(n, 1);
    std::vector<float> e = normal(n, 2);
    std::vector<std::byte> payload(C::payload_bytes(h, segs));
    for (auto _ : state) {
        C::encode(h, x, segs, e, {}, payload);
        benchmark::DoNotOptimize(payload.data());
        benchmark::ClobberMemory();
    }
    per_parameter(state, n, payload.size());
}

template <class C>
void decode(benchmark::State& state) {
    const auto h = settings<C>(state);
    const auto segs = gpt2_block();
    const std::size_t n = segs.back().offset + segs.back().size;
    std::vector<float> e = normal(n, 2);
    std::vector<std::byte> payload(C::payload_bytes(h, segs));
    C::encode(h, normal(n, 1), segs, e, {}, payload);
    std::vector<float> out(n);
    for (auto _ : state) {
        C::decode(h, payload, segs, out);  // the checks, then the dense output
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    per_parameter(state, n, payload.size());
}

}  // namespace

// Arg 0: fixed-width indices (12 bits for 64 x 64); 1: compact (Elias-Fano, the default). The
// names keep the SparseLoCo rows' earlier names (docs/benchmarks.md).
BENCHMARK(encode<lc::sparseloco>)->Name("encode")->ArgName("compact")->Arg(0)->Arg(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(decode<lc::sparseloco>)->Name("decode")->ArgName("compact")->Arg(0)->Arg(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(encode<lc::demo>)->Name("demo_encode")->ArgName("compact")->Arg(0)->Arg(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(decode<lc::demo>)->Name("demo_decode")->ArgName("compact")->Arg(0)->Arg(1)
    ->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
