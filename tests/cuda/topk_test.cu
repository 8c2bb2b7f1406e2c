// The fused CUDA top-k (backend/cuda/compress_topk.hpp) against the host compressor
// (compress/topk.hpp) and the host exchanger's average: device payloads must be the host's byte for
// byte, error-feedback residuals bit for bit, averages as the host computes them; malformed
// payloads are refused, naming the rank. And loco::cuda::diloco's device path with top-k against
// loco::diloco on threads.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "compress_support.cuh"
#include "device.cuh"
#include "handles.cuh"
#include "model.cuh"
#include "outer_arrays.cuh"

#include <loco/backend/cuda/compress_topk.hpp>
#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_topk_test {

namespace {

using namespace loco_test;
namespace lcu = loco::backend::cuda;
namespace cz = loco::compress;

using topk = cz::topk;
using ef_topk = cz::error_feedback<cz::topk>;

float bits_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// The payloads byte for byte (NaN values included: the device propagates NaN as the host does).
void expect_same_payload(const std::vector<std::byte>& got, const std::vector<std::byte>& want,
                         const lcu::topk_plan& plan, const std::string& what) {
    REQUIRE_MESSAGE(got.size() == want.size(), what << ": sizes differ");
    std::vector<bool> value_word(got.size() / 4, false);
    std::size_t at = cz::wire::header_bytes;
    for (const auto& s : plan.segments()) {
        const std::size_t k = topk::count(plan.hyper(), s.size);
        for (std::size_t j = 0; j < k; ++j) {
            value_word[(at + 4 * k + 4 * j) / 4] = true;
        }
        at += 8 * k;
    }
    REQUIRE(at == got.size());
    std::size_t bad = 0;
    std::ostringstream first;
    for (std::size_t w = 0; w < got.size() / 4; ++w) {
        std::uint32_t g, h;
        std::memcpy(&g, got.data() + 4 * w, 4);
        std::memcpy(&h, want.data() + 4 * w, 4);
        if (g != h && bad++ < 8) {
            first << "  bytes [" << 4 * w << ", " << 4 * w + 4 << ") got 0x" << std::hex << g
                  << ", want 0x" << h << std::dec
                  << (w < 10 ? " (header)" : (value_word[w] ? " (a value)" : " (an index)"))
                  << "\n";
        }
    }
    INFO(what << ": " << bad << " words differ; first:\n" << first.str());
    CHECK(bad == 0);
}

// Values for tensor i of a rank: ordinary, or one of the awkward kinds the selection must order
// as the host does.
enum class flavor { normal, ties, signs, special, subnormal, zeros, huge, count };

std::vector<float> values_for(std::mt19937_64& rng, const device_model& m) {
    std::vector<float> x = normal_floats(rng, m.total(), 1.0f);
    std::uniform_int_distribution<int> pick(0, 5);
    std::uniform_int_distribution<std::uint32_t> mantissa(1, 0x7fffff);
    std::uniform_int_distribution<std::uint32_t> payload(1, 0x3fffff);
    m.for_each_tensor([&](std::size_t i, const tensor_shape& s, std::size_t off) {
        float* t = x.data() + off;
        const auto f = static_cast<flavor>(i % static_cast<std::size_t>(flavor::count));
        for (std::size_t k = 0; k < s.size; ++k) {
            switch (f) {
                case flavor::ties: {  // many equal magnitudes, +0 and -0
                    static const float set[] = {1.0f, -1.0f, 0.5f, -0.5f, 0.0f, -0.0f};
                    t[k] = set[pick(rng)];
                    break;
                }
                case flavor::signs:  // equal magnitudes differing only in sign
                    t[k] = (rng() & 1 ? 0.25f : 3.0f) * (rng() & 2 ? -1.0f : 1.0f);
                    break;
                case flavor::special: {  // NaN (several payloads and signs), infinities
                    const unsigned r = static_cast<unsigned>(rng() % 16);
                    if (r == 0) {
                        t[k] = bits_float(0x7fc00000u | payload(rng));
                    } else if (r == 1) {
                        t[k] = -std::numeric_limits<float>::quiet_NaN();
                    } else if (r == 2) {
                        t[k] = std::numeric_limits<float>::infinity();
                    } else if (r == 3) {
                        t[k] = -std::numeric_limits<float>::infinity();
                    }
                    break;
                }
                case flavor::subnormal:
                    t[k] = bits_float((rng() & 1 ? 0x80000000u : 0u) |
                                      (rng() % 4 == 0 ? 0u : mantissa(rng)));
                    break;
                case flavor::zeros:
                    t[k] = rng() & 1 ? 0.0f : -0.0f;
                    break;
                case flavor::huge:  // near the top of the range: averages overflow
                    t[k] = rng() % 3 == 0 ? 3.0e38f : t[k];
                    break;
                default:
                    break;
            }
        }
    });
    return x;
}

struct variant {
    bool feedback;
    float decay;
    bool fold;
    const char* name;
};

constexpr variant plain{false, 1.0f, false, "topk"};
constexpr variant ef_classic{true, 1.0f, false, "error_feedback decay 1"};
constexpr variant ef_muloco{true, 0.5f, true, "error_feedback decay 0.5, lr folded"};

// M ranks encode fresh pseudo-gradients on the device and on the host; the payloads and
// residuals must agree, then the gathered device payloads pass the check and average to the
// host exchanger's average.
void check_against_host(const std::string& label, const std::vector<tensor_shape>& shapes,
                        float ratio, const variant& v, int ranks) {
    CAPTURE(label);
    CAPTURE(ratio);
    CAPTURE(std::string(v.name));
    CAPTURE(ranks);
    auto rng = rng_for(label + " " + v.name + " " + std::to_string(ratio));
    device_model m(shapes);
    const lcu::tensor_table table = m.table(false);
    const topk::hyper th{ratio};
    const lcu::topk_plan plan(table, th);
    const auto& segs = plan.segments();
    const std::size_t n = m.total();
    const std::size_t padded = table.padded_elements();
    const std::size_t p = plan.payload_bytes();
    REQUIRE(p == topk::payload_bytes(th, segs));
    lcu::device_buffer<float> delta(std::max<std::size_t>(padded, 1)),
        residual(std::max<std::size_t>(padded, 1)), next(std::max<std::size_t>(padded, 1));
    lcu::device_buffer<std::byte> payload(p), gathered(static_cast<std::size_t>(ranks) * p);
    lcu::stream s;
    ef_topk::hyper eh;
    eh.compress = th;
    eh.decay = v.decay;
    eh.fold_outer_lr = v.fold;
    std::vector<std::vector<std::byte>> host_payloads;
    for (int r = 0; r < ranks; ++r) {
        CAPTURE(r);
        cz::encode_context ctx;
        ctx.seed = rng();
        ctx.round = rng() % 1000;
        ctx.rank = r;
        ctx.outer_lr = std::uniform_real_distribution<float>(0.1f, 1.5f)(rng);
        const std::vector<float> x = values_for(rng, m);
        std::vector<float> state;
        if (v.feedback) {
            state = normal_floats(rng, n, 0.3f);
            // Zero residuals keep the ties of the tie-heavy tensors (s * x keeps equal magnitudes
            // equal).
            m.for_each_tensor([&](std::size_t i, const tensor_shape& sh, std::size_t off) {
                const auto f = static_cast<flavor>(i % static_cast<std::size_t>(flavor::count));
                if (f == flavor::ties || f == flavor::signs || f == flavor::zeros) {
                    std::fill_n(state.begin() + static_cast<std::ptrdiff_t>(off), sh.size, 0.0f);
                }
            });
            lcu::from_flat<float>(table, state, residual.get());
        }
        lcu::from_flat<float>(table, x, delta.get());
        sync_all();
        lcu::encode_io io;
        io.delta = delta.get();
        io.residual = residual.get();
        io.next_residual = r % 2 == 0 ? next.get() : residual.get();  // in place on odd ranks
        io.payload = payload.get();
        const lcu::device_encode_context dctx{ctx.seed, ctx.round, r, ctx.outer_lr, nullptr};
        std::vector<std::byte> want(p);
        if (v.feedback) {
            lcu::encode_topk<ef_topk, lcu::encode_from::delta>(plan, table, eh, io, dctx, s);
            ef_topk::encode(eh, x, segs, state, ctx, want);
        } else {
            lcu::encode_topk<topk, lcu::encode_from::delta>(plan, table, th, io, dctx, s);
            topk::encode(th, x, segs, {}, ctx, want);
        }
        s.synchronize();
        expect_same_payload(download_bytes(payload.get(), p), want, plan, label + ": payload");
        if (v.feedback) {
            expect_same_floats(lcu::to_flat(table, io.next_residual), state,
                               label + ": residual");
        }
        check_cuda(cudaMemcpy(gathered.get() + static_cast<std::size_t>(r) * p, payload.get(), p,
                              cudaMemcpyDeviceToDevice),
                   "gather");
        host_payloads.push_back(want);
    }

    // The host exchanger's average: decode every payload, sum in rank order, divide.
    std::vector<float> want(n, 0.0f), one(n, 0.0f);
    for (const auto& hp : host_payloads) {
        topk::decode(th, hp, segs, one);
        for (std::size_t i = 0; i < n; ++i) {
            want[i] += one[i];
        }
    }
    for (auto& a : want) {
        a = a / static_cast<float>(ranks);
    }
    lcu::topk_payload_check check(ranks);
    check.run(plan, table, gathered.get(), s);
    lcu::device_buffer<float> avg(std::max<std::size_t>(padded, 1));
    lcu::decode_average_topk(plan, table, gathered.get(), ranks, avg.get(), s);
    s.synchronize();
    expect_same_floats(lcu::to_flat(table, avg.get()), want, label + ": average");
    if (padded != 0) {  // the padding is 0
        std::vector<float> all(padded);
        check_cuda(cudaMemcpy(all.data(), avg.get(), padded * 4, cudaMemcpyDeviceToHost), "avg");
        std::size_t nonzero_padding = 0;
        for (std::size_t i = 0; i < table.size(); ++i) {
            const std::size_t end = i + 1 < table.size() ? table.padded_offset(i + 1) : padded;
            for (std::size_t j = table.padded_offset(i) + table.spec(i).size; j < end; ++j) {
                nonzero_padding += all[j] != 0.0f ? 1 : 0;
            }
        }
        CHECK(nonzero_padding == 0);
    }
}

std::vector<tensor_shape> shapes_of(const std::vector<std::size_t>& sizes) {
    std::vector<tensor_shape> out;
    for (const std::size_t n : sizes) {
        out.push_back({n});
    }
    return out;
}

// Sizes at the edges of the work split (a CTA takes 4096 elements), then random ones.
std::vector<tensor_shape> edge_shapes(std::mt19937_64& rng) {
    std::vector<std::size_t> sizes{0, 1, 3, 255, 256, 257, 0, 4095, 4096, 4097, 8193, 12289, 2};
    std::uniform_int_distribution<std::size_t> size(0, 5000);
    for (int i = 0; i < 15; ++i) {
        sizes.push_back(size(rng));
    }
    return shapes_of(sizes);
}

// The top-k hyper-parameters inside C's.
inline const topk::hyper& ch_of(const topk::hyper& h) { return h; }
inline const topk::hyper& ch_of(const ef_topk::hyper& h) { return h.compress; }

// k = 1 for every segment of these tests (count is max(1, ceil(ratio n))).
constexpr float ratio_k1 = 1.0e-7f;

}  // namespace

TEST_CASE("topk on the device: every ratio, with and without error feedback, equals the host") {
    auto rng = rng_for("topk edges");
    const std::vector<tensor_shape> shapes = edge_shapes(rng);
    int turn = 0;
    for (const float ratio : {0.02f, 0.3f, 1.0f, ratio_k1}) {
        for (const variant& v : {plain, ef_classic, ef_muloco}) {
            const int ranks = turn % 3 == 0 ? 1 : (turn % 3 == 1 ? 3 : 4);
            ++turn;
            check_against_host("topk edges", shapes, ratio, v, ranks);
        }
    }
}

TEST_CASE("topk on the device: 500 tensors of random sizes") {
    auto rng = rng_for("topk many");
    std::uniform_int_distribution<std::size_t> size(0, 3000);
    std::vector<std::size_t> sizes(500);
    for (auto& n : sizes) {
        n = size(rng);
    }
    const auto shapes = shapes_of(sizes);
    check_against_host("topk many", shapes, 0.02f, ef_muloco, 3);
    check_against_host("topk many", shapes, ratio_k1, plain, 4);
}

TEST_CASE("topk on the device: a tensor of a million elements") {
    const auto shapes = shapes_of({1000003, 5});
    check_against_host("topk large", shapes, 0.02f, plain, 3);
    check_against_host("topk large", shapes, ratio_k1, ef_muloco, 2);
}

// The device payload of `x` (phase 1 done: the delta given) and the host encoder's.
std::vector<std::byte> device_topk_payload(const lcu::topk_plan& plan,
                                           const lcu::tensor_table& table, const topk::hyper& th,
                                           const std::vector<float>& x) {
    lcu::stream s;
    lcu::device_buffer<float> delta(std::max<std::size_t>(table.padded_elements(), 1));
    lcu::device_buffer<std::byte> payload(plan.payload_bytes());
    lcu::from_flat<float>(table, x, delta.get());
    sync_all();
    lcu::encode_io io;
    io.delta = delta.get();
    io.payload = payload.get();
    lcu::encode_topk<topk, lcu::encode_from::delta>(plan, table, th, io, {1, 0, 0, 1.0f, nullptr},
                                                   s);
    s.synchronize();
    return download_bytes(payload.get(), plan.payload_bytes());
}
std::vector<std::byte> host_topk_payload(const lcu::topk_plan& plan, const topk::hyper& th,
                                         const std::vector<float>& x) {
    cz::encode_context ctx;
    ctx.seed = 1;
    ctx.outer_lr = 1.0f;
    std::vector<std::byte> want(plan.payload_bytes());
    topk::encode(th, x, plan.segments(), {}, ctx, want);
    return want;
}

TEST_CASE("topk on the device: more ties at the threshold than wanted, larger elements after "
          "them, equals the host") {
    // Elements above the threshold that come after more ties than the k still wanted: their
    // position counts only the ties taken (the "ties" flavour above has no larger element).
    device_model m({tensor_shape{1000}, tensor_shape{9000}});
    const lcu::tensor_table table = m.table(false);
    const topk::hyper th{0.01f};  // k = 10 and 90
    const lcu::topk_plan plan(table, th);
    auto rng = rng_for("topk late ties");
    std::uniform_int_distribution<std::size_t> late0(600, 999), late1(4100, 8999);
    std::vector<float> x(m.total(), 1.0f);
    x[late0(rng)] = -2.0f;
    x[999] = 2.0f;            // tensor 0: 2 above the threshold, 8 of 998 ties taken
    x[1000 + late1(rng)] = 3.0f;
    x[1000 + 8999] = 3.0f;    // tensor 1: its last element among the largest (a second item)
    CHECK(device_topk_payload(plan, table, th, x) == host_topk_payload(plan, th, x));
}

TEST_CASE("topk on the device: a tensor of more than 256 work items equals the host") {
    // 1,100,000 elements are 269 items of 4096: the scan's threads each take several items.
    device_model m({tensor_shape{1100000}});
    const lcu::tensor_table table = m.table(false);
    const topk::hyper th{0.02f};
    const lcu::topk_plan plan(table, th);
    auto rng = rng_for("topk items");
    const std::vector<float> x = normal_floats(rng, m.total(), 1.0f);
    CHECK(device_topk_payload(plan, table, th, x) == host_topk_payload(plan, th, x));
}

TEST_CASE("topk_payload_check refuses a repeated index across an index-item boundary") {
    // k = 6000 indices: the order check crosses from the first 4096-index item to the second.
    device_model m({tensor_shape{20000}});
    const lcu::tensor_table table = m.table(false);
    const topk::hyper th{0.3f};
    const lcu::topk_plan plan(table, th);
    REQUIRE(topk::count(th, 20000) > 4097);
    auto rng = rng_for("topk item boundary");
    const std::vector<float> x = normal_floats(rng, m.total(), 1.0f);
    const std::size_t p = plan.payload_bytes();
    std::vector<std::byte> bad = device_topk_payload(plan, table, th, x);
    const std::size_t at = cz::wire::header_bytes;  // the first segment's indices, 4 bytes each
    std::memcpy(bad.data() + at + 4 * 4096, bad.data() + at + 4 * 4095, 4);
    reseal(bad);
    std::vector<float> out(m.total());
    CHECK_THROWS_AS(topk::decode(th, bad, plan.segments(), out), loco::wire_error);
    lcu::device_buffer<std::byte> gathered(p);
    check_cuda(cudaMemcpy(gathered.get(), bad.data(), p, cudaMemcpyHostToDevice), "upload");
    lcu::topk_payload_check check(1);
    lcu::stream s;
    CHECK_THROWS(check.run(plan, table, gathered.get(), s));
}

TEST_CASE("topk encode from the parameters (phase 1 fused in): fp32 and bf16 values, NaN in "
          "the global snapshot") {
    auto rng = rng_for("topk params");
    device_model m(awkward_shapes(rng, 30, mixed_dtypes, false));
    m.randomize_values(rng);
    const lcu::tensor_table table = m.table(false);
    const topk::hyper th{0.005f};  // small tensors send fewer elements than their NaNs
    const lcu::topk_plan plan(table, th);
    const std::size_t n = m.total();
    const std::size_t padded = table.padded_elements();
    const std::size_t p = plan.payload_bytes();
    std::vector<float> global = m.values();
    const std::vector<float> noise = normal_floats(rng, n, 0.01f);
    for (std::size_t i = 0; i < n; ++i) {
        global[i] += noise[i];
        if (rng() % 97 == 0) {  // NaNs of several payloads: their bits decide which are sent
            global[i] = bits_float(0x7fc00000u | static_cast<std::uint32_t>(rng() % 0x3fffff));
        } else if (rng() % 211 == 0) {
            global[i] = -std::numeric_limits<float>::infinity();
        }
    }
    lcu::device_buffer<float> dglobal(padded), residual(padded), next(padded),
        master(std::max<std::size_t>(table.master_elements(), 1));
    lcu::device_buffer<std::byte> payload(p);
    m.upload_values();
    lcu::init_master(table, master.get(), nullptr);
    lcu::from_flat<float>(table, global, dglobal.get());
    sync_all();
    std::vector<float> x(n);
    for (std::size_t i = 0; i < n; ++i) {
        x[i] = global[i] - m.values()[i];
    }
    lcu::stream s;
    for (const variant& v : {plain, ef_muloco}) {
        CAPTURE(std::string(v.name));
        cz::encode_context ctx;
        ctx.outer_lr = 0.7f;
        std::vector<float> state = v.feedback ? normal_floats(rng, n, 0.01f) : std::vector<float>{};
        if (v.feedback) {
            lcu::from_flat<float>(table, state, residual.get());
            sync_all();
        }
        lcu::encode_io io;
        io.global = dglobal.get();
        io.master = master.get();
        io.residual = residual.get();
        io.next_residual = next.get();
        io.payload = payload.get();
        const lcu::device_encode_context dctx{0, 0, 0, ctx.outer_lr, nullptr};
        std::vector<std::byte> want(p);
        if (v.feedback) {
            ef_topk::hyper eh;
            eh.compress = th;
            eh.decay = v.decay;
            eh.fold_outer_lr = v.fold;
            lcu::encode_topk<ef_topk, lcu::encode_from::params>(plan, table, eh, io, dctx, s);
            ef_topk::encode(eh, x, plan.segments(), state, ctx, want);
        } else {
            lcu::encode_topk<topk, lcu::encode_from::params>(plan, table, th, io, dctx, s);
            topk::encode(th, x, plan.segments(), {}, ctx, want);
        }
        s.synchronize();
        expect_same_payload(download_bytes(payload.get(), p), want, plan,
                            "from the parameters: payload");
        if (v.feedback) {
            expect_same_floats(lcu::to_flat(table, next.get()), state,
                               "from the parameters: residual");
        }
    }
}

TEST_CASE("topk_payload_check refuses what the host decoder refuses, naming the rank") {
    auto rng = rng_for("topk payload check");
    device_model m(shapes_of({700, 0, 1000, 5000}));
    const lcu::tensor_table table = m.table(false);
    const topk::hyper th{0.3f};
    const lcu::topk_plan plan(table, th);
    const std::size_t p = plan.payload_bytes();
    constexpr int ranks = 3;
    lcu::device_buffer<std::byte> gathered(ranks * p);
    lcu::device_buffer<float> delta(table.padded_elements());
    lcu::stream s;
    for (int r = 0; r < ranks; ++r) {
        lcu::from_flat<float>(table, normal_floats(rng, m.total()), delta.get());
        sync_all();
        lcu::encode_io io;
        io.delta = delta.get();
        io.payload = gathered.get() + r * p;
        lcu::encode_topk<topk, lcu::encode_from::delta>(plan, table, th, io,
                                                        {1, 0, r, 1.0f, nullptr}, s);
        s.synchronize();
    }
    const std::vector<std::byte> good = download_bytes(gathered.get(), ranks * p);
    lcu::topk_payload_check check(ranks);
    check.run(plan, table, gathered.get(), s);

    // Segment 2 (1000 elements) starts after segment 0's 8 k0 bytes (segment 1 is empty).
    const std::size_t k0 = topk::count(th, 700);
    const std::size_t k2 = topk::count(th, 1000);
    const std::size_t seg0 = cz::wire::header_bytes;
    const std::size_t seg2 = seg0 + 8 * k0;
    const auto index = [](std::vector<std::byte>& b, std::size_t at) -> std::uint32_t {
        std::uint32_t v;
        std::memcpy(&v, b.data() + at, 4);
        return v;
    };
    const auto set_index = [](std::vector<std::byte>& b, std::size_t at, std::uint32_t v) {
        std::memcpy(b.data() + at, &v, 4);
    };
    // Rank 1's payload, changed by `edit`; when `resealed`, its checksum is made right again.
    const auto refused = [&](auto&& edit, bool resealed, const std::string& message) {
        expect_refused_by_both(
            good, p, gathered.get(), edit, resealed, message,
            [&](const std::vector<std::byte>& bad) {
                std::vector<float> out(m.total());
                topk::decode(th, bad, plan.segments(), out);
            },
            [&] { check.run(plan, table, gathered.get(), s); });
    };
    refused([&](std::vector<std::byte>& b) { set_index(b, seg0, 700); }, true,
            "index 0 of segment 0 ('t0', 700 elements) is not less than the segment's size");
    refused([&](std::vector<std::byte>& b) { set_index(b, seg2 + 4 * (k2 - 1), 1000); },
            true,
            "index " + std::to_string(k2 - 1) +
                " of segment 2 ('t2', 1000 elements) is not less than");
    refused([&](std::vector<std::byte>& b) { set_index(b, seg2 + 4 * 5, index(b, seg2 + 16)); },
            true, "index 5 of segment 2 ('t2', 1000 elements): indices are not strictly ascending");
    refused(
        [&](std::vector<std::byte>& b) {
            const std::uint32_t a = index(b, seg0 + 4 * 10);
            set_index(b, seg0 + 4 * 10, index(b, seg0 + 4 * 11));
            set_index(b, seg0 + 4 * 11, a);
        },
        true, "index 11 of segment 0 ('t0', 700 elements): indices are not strictly ascending");
    refused([&](std::vector<std::byte>& b) { b[seg2 + 4 * k2 + 1] ^= std::byte{0x10}; }, false,
            "checksum mismatch");
    refused([&](std::vector<std::byte>& b) { set_index(b, seg0 + 8, index(b, seg0 + 8) + 1); },
            false, "checksum mismatch");
    refused(
        [&](std::vector<std::byte>& b) {
            const float other = 0.25f;
            std::memcpy(b.data() + 8, &other, 4);
        },
        false, "the block field (block size or setting)");
    check.run(plan, table, gathered.get(), s);  // restored: accepted again
}

TEST_CASE("decode_average_apply_topk equals outer_apply of the host's average") {
    using outer = loco::outer::nesterov;
    auto rng = rng_for("topk apply");
    device_model m(awkward_shapes(rng, 20, mixed_dtypes, false));
    m.randomize_values(rng);
    const lcu::tensor_table table = m.table(false);
    const topk::hyper th{0.1f};
    const lcu::topk_plan plan(table, th);
    const std::size_t n = m.total();
    const std::size_t padded = table.padded_elements();
    constexpr int ranks = 3;
    const std::size_t p = plan.payload_bytes();
    lcu::device_buffer<std::byte> gathered(ranks * p);
    lcu::device_buffer<float> delta(padded);
    lcu::stream s;
    std::vector<float> want(n, 0.0f), one(n);
    for (int r = 0; r < ranks; ++r) {
        const std::vector<float> x = normal_floats(rng, n, 0.01f);
        lcu::from_flat<float>(table, x, delta.get());
        sync_all();
        lcu::encode_io io;
        io.delta = delta.get();
        io.payload = gathered.get() + r * p;
        lcu::encode_topk<topk, lcu::encode_from::delta>(plan, table, th, io,
                                                        {1, 0, r, 1.0f, nullptr}, s);
        std::vector<std::byte> host(p);
        topk::encode(th, x, plan.segments(), {}, {}, host);
        topk::decode(th, host, plan.segments(), one);
        for (std::size_t i = 0; i < n; ++i) {
            want[i] += one[i];
        }
    }
    for (auto& a : want) {
        a = a / static_cast<float>(ranks);
    }
    s.synchronize();
    const auto go = [&](bool fused) {
        outer_arrays o(m, table);
        auto &global = o.global, &state = o.state, &master = o.master, &avg = o.avg;
        auto& control = o.control;
        if (fused) {
            lcu::topk_payload_check(ranks).run(plan, table, gathered.get(), s);
            lcu::decode_average_apply_topk<outer>(plan, table, gathered.get(), ranks,
                                                  global.get(), state.get(), master.get(),
                                                  control.hyper(), control.control(), true, s);
        } else {  // the reference: the host's average, uploaded
            lcu::from_flat<float>(table, want, avg.get());
            sync_all();
            lcu::check_padded(table, avg.get(), control.control(), s);
            lcu::outer_apply<outer>(table, global.get(), avg.get(), state.get(), master.get(),
                                    control.hyper(), control.control(), true, s);
        }
        const auto c = control.read(s);
        CHECK(c.steps == 1u);
        return std::vector<std::vector<float>>{m.download_values(),
                                               lcu::to_flat(table, global.get()),
                                               lcu::to_flat(table, state.get())};
    };
    const auto fused = go(true);
    const auto reference = go(false);
    expect_same_floats(fused[0], reference[0], "parameters");
    expect_same_floats(fused[1], reference[1], "global");
    expect_same_floats(fused[2], reference[2], "outer state");
    CHECK(fused[0] != m.values());
}

// ---- loco::cuda::diloco with top-k on the device ------------------------------------------------

namespace {

// H = 3, M = 3, 7 steps then a closing sync, on threads and on cuda_replicas, each through a
// recording communicator. Inner SGD with lr 2^-6 and an outer SGD with lr 1/2: every product is
// exact, so a GPU's contraction of multiply-adds cannot move a bit, and the two runs must agree
// element for element (parameters, residuals) and byte for byte (every gathered payload).
template <class C>
void topk_diloco_equals_host(loco::exchange_scheme scheme, const typename C::hyper& ch) {
    namespace h = loco_test::handles;
    using inner = loco::inner::sgd;
    using outer = loco::outer::sgd;
    const inner::hyper ih{.lr = 1.0f / 64};
    const outer::hyper oh{.lr = 0.5f};
    const std::string label = "cuda diloco topk " + std::string(C::name);
    std::vector<std::vector<float>> host_final(3), gpu_final(3), host_res(3), gpu_res(3);
    std::vector<std::vector<std::vector<std::byte>>> host_payloads(3), gpu_payloads(3);
    std::vector<std::uint64_t> host_formula(3), gpu_formula(3);
    loco::comm::run_threads(3, [&](loco::comm::threads& threads) {
        h::recording comm(threads);
        const auto r = static_cast<std::size_t>(comm.rank());
        h::host_params m(h::init_of(label, comm.rank()));
        loco::diloco<inner, outer, C> opt(m.list, comm,
                                          {.inner = ih, .outer = oh, .schedule = {.every = 3},
                                           .compress = ch, .exchange = scheme});
        for (int t = 1; t <= 7; ++t) {
            m.set_gradients(h::grads_of(label, comm.rank(), t));
            opt.step();
        }
        opt.sync();
        host_final[r] = m.values();
        const auto res = opt.compressor_state();
        host_res[r].assign(res.begin(), res.end());
        host_payloads[r] = comm.gathered;
        // Payloads only: less the sync agreement.
        host_formula[r] = opt.bytes_per_sync() - opt.agreement_bytes_per_sync();
    });
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& replica) {
        h::recording comm(replica);
        const auto r = static_cast<std::size_t>(comm.rank());
        h::gpu_params m(h::init_of(label, comm.rank()));
        loco::cuda::diloco<inner, outer, C> opt(
            m.list, comm,
            {.inner = ih, .outer = oh, .schedule = {.every = 3}, .compress = ch,
             .exchange = scheme, .stream = replica.stream()});
        CHECK(opt.device_exchange());
        CHECK(opt.exchange() == loco::exchange_scheme::all_gather);
        for (int t = 1; t <= 7; ++t) {
            m.set_gradients(h::grads_of(label, comm.rank(), t), replica.stream());
            opt.step();
        }
        opt.sync();
        CHECK(opt.outer_steps() == 3);
        gpu_final[r] = m.host_values(replica.stream());
        gpu_res[r] = opt.compressor_state();
        gpu_payloads[r] = comm.gathered;
        gpu_formula[r] = opt.bytes_per_sync() - opt.agreement_bytes_per_sync();
    });
    const std::size_t p = cz::topk::payload_bytes(
        ch_of(ch), std::vector<cz::segment>{{0, 5, 1, 5}, {5, 42, 6, 7}, {47, 1003, 1, 1003}});
    for (std::size_t r = 0; r < 3; ++r) {
        CAPTURE(r);
        expect_equal_arrays(gpu_final[r], host_final[r], "parameters");
        expect_equal_arrays(gpu_res[r], host_res[r], "residual");
        CHECK(gpu_res[r].size() == (C::state_size == 0 ? 0 : h::total));
        REQUIRE(gpu_payloads[r].size() == 3);  // one all-gather per sync
        for (std::size_t k = 0; k < 3; ++k) {
            CHECK(gpu_payloads[r][k].size() == 3 * p);
            CHECK(gpu_payloads[r][k] == host_payloads[r][k]);
        }
        CHECK(gpu_formula[r] == 2 * p);
        CHECK(gpu_formula[r] == host_formula[r]);
    }
}

}  // namespace

TEST_CASE("cuda::diloco with topk syncs on the device and equals loco::diloco on threads") {
    for (const auto scheme : {loco::exchange_scheme::automatic, loco::exchange_scheme::all_gather}) {
        CAPTURE(loco::to_string(scheme));
        topk_diloco_equals_host<topk>(scheme, {0.1f});
        topk_diloco_equals_host<ef_topk>(scheme, {{0.1f}, 0.9f, false});
        topk_diloco_equals_host<ef_topk>(scheme, {{0.3f}, 1.0f, true});  // s = the outer lr
    }
}

TEST_CASE("cuda::diloco with topk on the device: a corrupted index is refused and changes nothing; "
          "a new ratio re-plans") {
    namespace h = loco_test::handles;
    const std::string label = "cuda diloco topk refused";
    using gpu_t = loco::cuda::diloco<loco::inner::sgd, loco::outer::nesterov, ef_topk>;
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& replica) {
        h::corrupting comm(replica);
        h::gpu_params m(h::init_of(label, comm.rank()));
        gpu_t opt(m.list, comm,
                  {.schedule = {.every = 100}, .compress = {{0.05f}, 0.9f, false},
                   .stream = replica.stream()});
        REQUIRE(opt.device_exchange());
        for (int t = 1; t <= 4; ++t) {
            m.set_gradients(h::grads_of(label, comm.rank(), t), replica.stream());
            opt.step();
            if (t == 2) {
                opt.sync();  // a residual that is not zero
            }
        }
        REQUIRE(opt.outer_steps() == 1);
        const std::size_t p = (opt.bytes_per_sync() - opt.agreement_bytes_per_sync()) / 2;
        // A flipped bit in rank 2's first index: the checksum refuses it, as on the host.
        comm.armed_at = 2 * p + cz::wire::header_bytes;
        h::expect_refused_then_intact(opt, m, comm, replica.stream(),
                                      "from rank 2: checksum mismatch");
        // A larger ratio: the payload grows, the residual carries over.
        opt.compress_hyper().compress.ratio = 0.5f;
        opt.sync();
        CHECK(opt.outer_steps() == 3);
        CHECK((opt.bytes_per_sync() - opt.agreement_bytes_per_sync()) / 2 ==
              cz::topk::payload_bytes({0.5f}, std::vector<cz::segment>{
                                                  {0, 5, 1, 5}, {5, 42, 6, 7}, {47, 1003, 1, 1003}}));
    });
}

TEST_CASE("cuda::diloco with topk and median_norm_clip takes the host exchanger and equals "
          "loco::diloco on threads") {
    // Top-k's device path averages over all M (the mean); median_norm_clip averages each element
    // over the workers that sent it (topk::decode_support), which the host exchanger does. Such
    // handles did not compile before they were routed there.
    namespace h = loco_test::handles;
    using mnc = loco::aggregate::median_norm_clip;
    const auto same = [](const std::string& label, auto compressor, const auto& ch) {
        using C = decltype(compressor);
        std::vector<std::vector<float>> host(3), gpu(3);
        loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
            h::host_params p(h::init_of(label, comm.rank()));
            loco::diloco<loco::inner::sgd, loco::outer::sgd, C, loco::schedule::every, mnc> opt(
                p.list, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 2}, .compress = ch});
            for (int t = 1; t <= 6; ++t) {
                p.set_gradients(h::grads_of(label, comm.rank(), t));
                opt.step();
            }
            host[static_cast<std::size_t>(comm.rank())] = p.values();
        });
        loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& replica) {
            h::gpu_params m(h::init_of(label, replica.rank()));
            loco::cuda::diloco<loco::inner::sgd, loco::outer::sgd, C, loco::schedule::every, mnc>
                opt(m.list, replica,
                    {.inner = {.lr = 0.1f}, .schedule = {.every = 2}, .compress = ch,
                     .stream = replica.stream()});
            CHECK_FALSE(opt.device_exchange());
            for (int t = 1; t <= 6; ++t) {
                m.set_gradients(h::grads_of(label, replica.rank(), t), replica.stream());
                opt.step();
            }
            gpu[static_cast<std::size_t>(replica.rank())] = m.host_values(replica.stream());
        });
        for (std::size_t r = 0; r < 3; ++r) {
            CAPTURE(r);
            expect_close_arrays(gpu[r], host[r], 1e-6, "parameters");
        }
    };
    same("cuda topk median_norm_clip", topk{}, topk::hyper{.ratio = 0.05f});
    same("cuda ef_topk median_norm_clip", ef_topk{}, ef_topk::hyper{.compress = {.ratio = 0.05f}});
}

}  // namespace cuda_topk_test
