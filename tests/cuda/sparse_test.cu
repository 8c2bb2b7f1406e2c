// The device encoders and decoders of SparseLoCo and DeMo (backend/cuda/compress/
// sparseloco_kernels.hpp, demo_kernels.hpp) against the host compressors (compress/sparseloco.hpp,
// compress/demo.hpp): fresh random inputs over several rounds, the device payload equal to the
// host's byte for byte, the residual bit for bit (NaN where the host's is NaN), and the device
// decode of a host payload equal to the host decode; the receivers' scatter-means (DeMo's in the
// coefficient domain, SparseLoCo's with median_norm_clip's factors) equal the host's. Then loco::cuda::diloco with both codecs (on
// the host exchange, their references' aggregation) against loco::diloco on threads.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"

#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/backend/cuda/compress/demo_kernels.hpp>
#include <loco/backend/cuda/compress/sparseloco_kernels.hpp>
#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace loco_test;
namespace lcu = loco::backend::cuda;
namespace cz = loco::compress;

bool same_float(float a, float b) {
    return std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b));
}

// Elements that differ (every element when the sizes differ, or when there are none).
std::size_t count_differences(const std::vector<float>& got, const std::vector<float>& want) {
    if (got.size() != want.size() || got.empty()) return want.size() + 1;
    std::size_t bad = 0;
    for (std::size_t i = 0; i < got.size(); ++i) bad += same_float(got[i], want[i]) ? 0 : 1;
    return bad;
}

std::size_t first_difference(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
    if (a.size() != b.size() || a.empty()) return 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (a[i] != b[i]) return i;
    }
    return a.size();
}

// Segments with gaps: a 128 x 192 matrix, a flat 5000, a 7 x 3 matrix (7 is prime above most
// targets), an empty one and a single element.
std::vector<cz::segment> big_segments() {
    return {{3, 128 * 192, 128, 192}, {24581, 5000, 1, 5000}, {29583, 21, 7, 3},
            {29604, 0, 1, 0},        {29604, 1, 1, 1}};
}
constexpr std::size_t big_elements = 29607;

// Small chunk targets make many chunks: smaller segments keep the emulator quick.
std::vector<cz::segment> small_segments() {
    return {{1, 48 * 40, 48, 40}, {1923, 300, 1, 300}, {2223, 21, 7, 3}, {2244, 1, 1, 1}};
}
constexpr std::size_t small_elements = 2246;

// Rounds of encode on the host and on the device from the same inputs; returns the number of
// payload bytes compared.
template <class C, class Plan, class Encode, class Decode>
void device_equals_host(const typename C::hyper& h, const std::vector<cz::segment>& segs,
                        std::size_t n, const std::string& label, Encode encode, Decode decode) {
    auto rng = rng_for(label);
    const Plan plan(h, segs, n);
    REQUIRE(plan.payload_bytes() == C::payload_bytes(h, segs));
    std::vector<float> host_e = normal_floats(rng, n, 0.5f);
    lcu::device_buffer<float> e(n), x(n), out(n);
    lcu::device_buffer<std::byte> payload(plan.payload_bytes());
    e.upload(host_e);
    for (int round = 0; round < 3; ++round) {
        CAPTURE(round);
        std::vector<float> xs = normal_floats(rng, n, round == 1 ? 100.0f : 1.0f);
        if (round == 2) {  // non-finite pseudo-gradients reach the payload as canonical NaNs
            xs[10] = std::numeric_limits<float>::quiet_NaN();
            xs[n / 2] = std::numeric_limits<float>::infinity();
        }
        x.upload(xs);
        std::vector<std::byte> want(C::payload_bytes(h, segs));
        C::encode(h, xs, segs, host_e, {}, want);
        encode(plan, x.get(), e.get(), payload.get(), nullptr);
        check_cuda(cudaDeviceSynchronize(), "encode");
        const std::vector<std::byte> got = payload.download();
        REQUIRE(got.size() == want.size());
        CHECK_MESSAGE(first_difference(got, want) == got.size(),
                      "first differing payload byte " << first_difference(got, want) << " of "
                                                      << got.size());
        CHECK(count_differences(e.download(), host_e) == 0);

        // The device decode of the host's payload is the host's decode; nothing else is written.
        std::vector<float> host_out(n, 0.0f);
        C::decode(h, want, segs, host_out);
        std::vector<float> sentinel(n, 12345.0f);
        for (const cz::segment& s : segs) {
            std::fill_n(sentinel.begin() + static_cast<std::ptrdiff_t>(s.offset), s.size, 0.0f);
        }
        for (std::size_t i = 0; i < n; ++i) {
            if (sentinel[i] != 0.0f) host_out[i] = sentinel[i];
        }
        out.upload(sentinel);
        lcu::device_buffer<std::byte> received(want.size());
        received.upload(want);
        decode(plan, received.get(), out.get(), nullptr);
        check_cuda(cudaDeviceSynchronize(), "decode");
        CHECK(count_differences(out.download(), host_out) == 0);
    }
}

void sparseloco_case(const cz::sparseloco::hyper& h, const std::vector<cz::segment>& segs,
                     std::size_t n, const std::string& label) {
    device_equals_host<cz::sparseloco, lcu::sparseloco_plan>(
        h, segs, n, label,
        [](const lcu::sparseloco_plan& p, const float* x, float* e, std::byte* out,
           cudaStream_t s) { lcu::sparseloco_encode(p, x, e, out, s); },
        [](const lcu::sparseloco_plan& p, const std::byte* in, float* out, cudaStream_t s) {
            lcu::sparseloco_decode(p, in, out, s);
        });
}

void demo_case(const cz::demo::hyper& h, const std::vector<cz::segment>& segs, std::size_t n,
               const std::string& label) {
    device_equals_host<cz::demo, lcu::demo_plan>(
        h, segs, n, label,
        [](const lcu::demo_plan& p, const float* x, float* e, std::byte* out, cudaStream_t s) {
            lcu::demo_encode(p, x, e, out, s);
        },
        [](const lcu::demo_plan& p, const std::byte* in, float* out, cudaStream_t s) {
            lcu::demo_decode(p, in, out, s);
        });
}

}  // namespace

static_assert(lcu::device_chunked<cz::sparseloco>::available);
static_assert(lcu::device_chunked<cz::demo>::available);
static_assert(!lcu::device_chunked<cz::topk>::available);

TEST_CASE("sparseloco on the device: payloads byte for byte and accumulators bit for bit the "
          "host's, decode the host's") {
    SUBCASE("templar's defaults: 64 x 64 chunks, top 64, 2-bit codes") {
        sparseloco_case({}, big_segments(), big_elements, "sparse sparseloco defaults");
    }
    SUBCASE("8 x 8 chunks, top 5 (4 sent), 3 bins") {
        sparseloco_case({.chunk = 8, .topk = 5, .bins = 3, .range = 2.5f, .beta = 0.5f},
                        small_segments(), small_elements, "sparse sparseloco 8");
    }
    SUBCASE("16 x 16 chunks, top 7 (6 sent), 256 bins") {
        sparseloco_case({.chunk = 16, .topk = 7, .bins = 256, .range = 4.0f, .beta = 0.0f},
                        small_segments(), small_elements, "sparse sparseloco 256");
    }
}

TEST_CASE("demo on the device: payloads byte for byte and residuals bit for bit the host's, "
          "decode the host's") {
    for (const bool sign : {false, true}) {
        CAPTURE(sign);
        demo_case({.chunk = 64, .topk = 32, .decay = 0.999f, .sign = sign}, big_segments(),
                  big_elements, "sparse demo defaults");
        demo_case({.chunk = 5, .topk = 3, .decay = 0.9f, .sign = sign}, small_segments(),
                  small_elements, "sparse demo 5");
    }
}

TEST_CASE("demo's coefficient-domain scatter-mean on the device equals the host's") {
    for (const bool sign : {false, true}) {
        for (const bool big : {true, false}) {
            const cz::demo::hyper h{.chunk = big ? 64u : 5u, .topk = big ? 32u : 3u,
                                    .decay = 0.999f, .sign = sign};
            const std::vector<cz::segment> segs = big ? big_segments() : small_segments();
            const std::size_t n = big ? big_elements : small_elements;
            CAPTURE(sign);
            CAPTURE(big);
            auto rng = rng_for("sparse demo scatter mean");
            const lcu::demo_plan plan(h, segs, n);
            const std::size_t p = plan.payload_bytes();
            const std::uint32_t m = 3;
            std::vector<std::byte> gathered;
            std::vector<std::vector<std::byte>> payloads;
            for (std::uint32_t k = 0; k < m; ++k) {
                std::vector<float> e = normal_floats(rng, n, 0.5f);
                payloads.emplace_back(p);
                cz::demo::encode(h, normal_floats(rng, n), segs, e, {}, payloads.back());
                gathered.insert(gathered.end(), payloads.back().begin(), payloads.back().end());
            }
            std::vector<std::span<const std::byte>> views(payloads.begin(), payloads.end());
            std::vector<float> want(n, 5.0f);
            cz::demo::decode_scatter_mean(h, views, segs, want);
            lcu::device_buffer<std::byte> g(gathered.size());
            g.upload(gathered);
            lcu::device_buffer<float> out(n);
            out.upload(std::vector<float>(n, 5.0f));
            lcu::demo_decode_scatter_mean(plan, g.get(), m, out.get(), nullptr);
            check_cuda(cudaDeviceSynchronize(), "scatter mean");
            CHECK(count_differences(out.download(), want) == 0);
        }
    }
}

TEST_CASE("sparseloco's scatter-mean on the device equals median_norm_clip's combine, with and "
          "without the clip") {
    namespace ag = loco::aggregate;
    for (const bool big : {true, false}) {
        CAPTURE(big);
        // median_norm_clip takes segments that tile the fragment.
        const std::vector<cz::segment> segs =
            big ? std::vector<cz::segment>{{0, 128 * 192, 128, 192}, {24576, 5000, 1, 5000},
                                           {29576, 21, 7, 3}, {29597, 1, 1, 1}}
                : std::vector<cz::segment>{{0, 48 * 40, 48, 40}, {1920, 300, 1, 300},
                                           {2220, 21, 7, 3}};
        const std::size_t n = segs.back().offset + segs.back().size;
        const cz::sparseloco::hyper h =
            big ? cz::sparseloco::hyper{} : cz::sparseloco::hyper{.chunk = 8, .topk = 5};
        auto rng = rng_for("sparse sparseloco scatter mean");
        const lcu::sparseloco_plan plan(h, segs, n);
        const std::size_t p = plan.payload_bytes();
        const std::size_t m = 3;
        std::vector<std::byte> gathered;
        std::vector<float> deltas(m * n);
        std::vector<std::uint8_t> sent(m * n);
        for (std::size_t k = 0; k < m; ++k) {
            std::vector<float> e = normal_floats(rng, n, 0.5f);
            std::vector<std::byte> payload(p);
            // Workers of different scales, so that the clip scales some of them.
            cz::sparseloco::encode(h, normal_floats(rng, n, 1.0f + static_cast<float>(k)), segs,
                                   e, {}, payload);
            cz::sparseloco::decode(h, payload, segs, std::span(deltas).subspan(k * n, n));
            cz::sparseloco::decode_support(h, payload, segs, std::span(sent).subspan(k * n, n));
            gathered.insert(gathered.end(), payload.begin(), payload.end());
        }
        ag::contributions c;
        c.workers = m;
        c.elements = n;
        c.deltas = deltas;
        c.segments = segs;
        c.sent = sent;
        lcu::device_buffer<std::byte> g(gathered.size());
        g.upload(gathered);
        lcu::device_buffer<float> out(n);
        for (const bool clip : {false, true}) {
            CAPTURE(clip);
            const ag::median_norm_clip::hyper ah{.epsilon = 1e-8f, .clip = clip};
            std::vector<float> want(n);
            ag::median_norm_clip::combine(ah, c, want);
            std::vector<float> factors(m * segs.size());
            for (std::size_t si = 0; si < segs.size(); ++si) {
                std::vector<float> f;
                ag::median_norm_clip::factors(ah, c, segs[si].offset,
                                              segs[si].offset + segs[si].size, f);
                for (std::size_t k = 0; k < m; ++k) factors[k * segs.size() + si] = f[k];
            }
            if (clip) {  // the clip does scale someone, or the case tests nothing more
                CHECK(std::any_of(factors.begin(), factors.end(), [](float f) { return f < 1; }));
            }
            lcu::device_buffer<float> f(factors.size());
            f.upload(factors);
            out.upload(std::vector<float>(n, 9.0f));
            lcu::sparseloco_decode_scatter_mean(plan, g.get(), static_cast<std::uint32_t>(m),
                                                clip ? f.get() : nullptr, out.get(), nullptr);
            check_cuda(cudaDeviceSynchronize(), "scatter mean");
            CHECK(count_differences(out.download(), want) == 0);
        }
    }
}

TEST_CASE("chunked device plans refuse what they cannot do, with one sentence") {
    const std::vector<cz::segment> segs = {{0, 128 * 128, 128, 128}};
    CHECK_THROWS_WITH_AS(lcu::sparseloco_plan({.chunk = 128}, segs, 128 * 128),
                         doctest::Contains("chunk <= 64"), loco::invalid_argument);
    CHECK_THROWS_AS(lcu::demo_plan({.chunk = 64, .topk = 0}, segs, 128 * 128),
                    loco::invalid_argument);
    CHECK_THROWS_AS(lcu::demo_plan({}, segs, 100), loco::shape_error);  // outside the array
    const lcu::demo_plan plan({}, segs, 128 * 128);
    CHECK_THROWS_AS(lcu::demo_encode(plan, nullptr, nullptr, nullptr, nullptr),
                    loco::invalid_argument);
}

// ---- loco::cuda::diloco with SparseLoCo and DeMo -------------------------------------------------

namespace {

namespace hd = loco_test::handles;

struct run_result {
    std::vector<float> values;
    std::vector<float> state;
    std::vector<std::vector<std::byte>> payloads;
    bool device_exchange = false;
};

// H = 3, 7 steps then a closing sync; inner SGD with lr 2^-6.
template <class C, class Outer, class A>
run_result gpu_rank(const std::string& label, loco::comm::communicator& inner_comm,
                    cudaStream_t stream, const typename C::hyper& ch,
                    const typename Outer::hyper& oh) {
    using inner = loco::inner::sgd;
    hd::recording comm(inner_comm);
    hd::gpu_params m(hd::init_of(label, comm.rank()));
    loco::cuda::diloco<inner, Outer, C, loco::schedule::every, A> opt(
        m.list, comm,
        {.inner = {.lr = 1.0f / 64}, .outer = oh, .schedule = {.every = 3}, .compress = ch,
         .stream = stream});
    for (int t = 1; t <= 7; ++t) {
        m.set_gradients(hd::grads_of(label, comm.rank(), t), stream);
        opt.step();
    }
    opt.sync();
    run_result r;
    r.values = m.host_values(stream);
    r.state = opt.compressor_state();
    r.payloads = comm.gathered;
    r.device_exchange = opt.device_exchange();
    return r;
}

template <class C, class Outer, class A>
std::vector<run_result> host_run(const std::string& label, int m, const typename C::hyper& ch,
                                 const typename Outer::hyper& oh) {
    using inner = loco::inner::sgd;
    std::vector<run_result> out(static_cast<std::size_t>(m));
    loco::comm::run_threads(m, [&](loco::comm::threads& threads) {
        hd::recording comm(threads);
        hd::host_params p(hd::init_of(label, comm.rank()));
        loco::diloco<inner, Outer, C, loco::schedule::every, A> opt(
            p.list, comm,
            {.inner = {.lr = 1.0f / 64}, .outer = oh, .schedule = {.every = 3}, .compress = ch});
        for (int t = 1; t <= 7; ++t) {
            p.set_gradients(hd::grads_of(label, comm.rank(), t));
            opt.step();
        }
        opt.sync();
        auto& r = out[static_cast<std::size_t>(comm.rank())];
        r.values = p.values();
        const auto s = opt.compressor_state();
        r.state.assign(s.begin(), s.end());
        r.payloads = comm.gathered;
    });
    return out;
}

void expect_same_run(const std::vector<run_result>& gpu, const std::vector<run_result>& host) {
    REQUIRE(gpu.size() == host.size());
    for (std::size_t r = 0; r < gpu.size(); ++r) {
        CAPTURE(r);
        CHECK(count_differences(gpu[r].values, host[r].values) == 0);
        CHECK(count_differences(gpu[r].state, host[r].state) == 0);
        CHECK(gpu[r].payloads == host[r].payloads);
        CHECK(gpu[r].payloads.size() == 3);
    }
}

template <class C, class Outer, class A>
void handles_equal(const std::string& label, const typename C::hyper& ch,
                   const typename Outer::hyper& oh) {
    const auto host = host_run<C, Outer, A>(label, 3, ch, oh);
    std::vector<run_result> gpu(3);
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& replica) {
        gpu[static_cast<std::size_t>(replica.rank())] =
            gpu_rank<C, Outer, A>(label, replica, replica.stream(), ch, oh);
    });
    // The exchange of these codecs is the host's (their aggregation is not the mean).
    CHECK(!gpu[0].device_exchange);
    expect_same_run(gpu, host);
#if defined(LOCO_TEST_NCCL)
    int devices = 0;
    check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    if (devices < 3) {
        MESSAGE("SKIPPED the NCCL run: needs 3 GPUs, this machine has " << devices);
        return;
    }
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    std::vector<run_result> nccl(3);
    std::mutex mutex;
    std::vector<std::thread> ranks;
    for (int r = 0; r < 3; ++r) {
        ranks.emplace_back([&, r] {
            try {
                check_cuda(cudaSetDevice(r), "cudaSetDevice");
                auto comm = loco::comm::nccl::create(3, r, id, nullptr, {});
                nccl[static_cast<std::size_t>(r)] =
                    gpu_rank<C, Outer, A>(label, *comm, nullptr, ch, oh);
            } catch (const std::exception& err) {
                std::lock_guard<std::mutex> lock(mutex);
                FAIL_CHECK("rank " << r << ": " << err.what());
            }
        });
    }
    for (auto& t : ranks) t.join();
    expect_same_run(nccl, host);
#endif
}

}  // namespace

TEST_CASE("cuda::diloco with sparseloco (median_norm_clip) and demo (sign_sgd) equals "
          "loco::diloco on threads") {
    handles_equal<cz::sparseloco, loco::outer::sgd, loco::aggregate::median_norm_clip>(
        "sparse handles sparseloco", {.chunk = 8, .topk = 6}, {.lr = 1.0f});
    handles_equal<cz::demo, loco::outer::sign_sgd, loco::aggregate::mean>(
        "sparse handles demo", {.chunk = 8, .topk = 4, .sign = true}, {.lr = 1.0f / 64});
}
