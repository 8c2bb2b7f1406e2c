#pragma once
// Helpers of the fused-compression tests (compress_test.cu, statistical_test.cu, topk_test.cu):
// exact comparisons that print the first mismatches, the awkward segment sizes and values, the
// host exchanger's average, the fused decode-average-apply run against the split one, and the
// payload checks' refusal probe.
#include <doctest/doctest.h>

#include "../support/payloads.hpp"
#include "../support/random.hpp"
#include "device.cuh"
#include "model.cuh"
#include "outer_arrays.cuh"

#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace loco_test {

namespace lcu = loco::backend::cuda;
namespace cz = loco::compress;

inline void sync_all() { check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

// Equal bits, or both NaN (a GPU writes its canonical NaN where the host propagates an operand's).
inline void expect_same_floats(const std::vector<float>& got, const std::vector<float>& want,
                               const std::string& what) {
    REQUIRE_MESSAGE(got.size() == want.size(), what << ": sizes differ");
    std::size_t bad = 0;
    std::ostringstream first;
    for (std::size_t i = 0; i < got.size(); ++i) {
        const bool same = std::memcmp(&got[i], &want[i], 4) == 0 ||
                          (std::isnan(got[i]) && std::isnan(want[i]));
        if (!same && bad++ < 6) {
            std::uint32_t g, w;
            std::memcpy(&g, &got[i], 4);
            std::memcpy(&w, &want[i], 4);
            first << "  [" << i << "] got " << got[i] << " (0x" << std::hex << g << "), want "
                  << want[i] << " (0x" << w << std::dec << ")\n";
        }
    }
    INFO(what << ": " << bad << " of " << got.size() << " elements differ; first:\n"
              << first.str());
    CHECK(bad == 0);
}

inline void expect_same_bytes(const std::vector<std::byte>& got,
                              const std::vector<std::byte>& want, const std::string& what) {
    REQUIRE_MESSAGE(got.size() == want.size(), what << ": sizes differ");
    std::size_t bad = 0;
    std::ostringstream first;
    for (std::size_t i = 0; i < got.size(); ++i) {
        if (got[i] != want[i] && bad++ < 8) {
            first << "  [" << i << "] got " << static_cast<unsigned>(got[i]) << ", want "
                  << static_cast<unsigned>(want[i]) << "\n";
        }
    }
    INFO(what << ": " << bad << " of " << got.size() << " bytes differ; first:\n" << first.str());
    CHECK(bad == 0);
}

inline std::vector<std::byte> download_bytes(const std::byte* p, std::size_t n) {
    std::vector<std::byte> out(n);
    check_cuda(cudaMemcpy(out.data(), p, n, cudaMemcpyDeviceToHost), "download");
    return out;
}
inline void upload_bytes(std::byte* p, const std::vector<std::byte>& bytes) {
    check_cuda(cudaMemcpy(p, bytes.data(), bytes.size(), cudaMemcpyHostToDevice), "upload");
}

// Segment sizes that hit every edge of the layouts (empty, shorter than a block, one past a
// block, a word, a chunk), then random ones.
inline std::vector<tensor_shape> awkward_sizes(std::mt19937_64& rng) {
    std::vector<tensor_shape> shapes;
    for (const std::size_t n : {1, 3, 0, 7, 8, 9, 17, 100, 255, 256, 257, 300, 1000, 1023, 1025,
                                2048, 4099}) {
        shapes.push_back({n});
    }
    std::uniform_int_distribution<std::size_t> size(0, 700);
    for (int i = 0; i < 6; ++i) {
        shapes.push_back({size(rng)});
    }
    return shapes;
}

// Pseudo-gradients with everything a block can hold: ordinary values, a tensor of zeros, NaN and
// infinity in one block, subnormals, values near the top of the float range (their average
// overflows), and blocks whose magnitudes span so many binades that a tree sum in double differs
// from the element-order sum (1, 2^-24, then 2^-54 repeated: the mean of 1 and 2^-24 over a
// power-of-two block is a tie between two floats; in order the small terms vanish and the tie
// goes to even, in a tree they add up and round it up). Tensors 7 to 12 are the special ones.
inline std::vector<float> awkward_values(std::mt19937_64& rng, const device_model& m, int rank) {
    std::vector<float> x = normal_floats(rng, m.total(), 0.02f);
    m.for_each_tensor([&](std::size_t i, const tensor_shape& s, std::size_t off) {
        float* t = x.data() + off;
        switch (i) {
            case 7:  // 100 elements of zeros
                std::fill(t, t + s.size, 0.0f);
                break;
            case 8:  // 255: huge values; with absmax scales, three ranks' average overflows
                for (std::size_t k = 0; k < 64; ++k) {
                    t[k] = 3.0e38f;
                }
                break;
            case 9:  // 256: the order-sensitive sum
                t[0] = 1.0f;
                t[1] = 0x1.0p-24f;
                for (std::size_t k = 2; k < s.size; ++k) {
                    t[k] = (k % 2 ? 1.0f : -1.0f) * 0x1.0p-54f;
                }
                break;
            case 10:  // 257: subnormals and zeros
                for (std::size_t k = 0; k < s.size; ++k) {
                    t[k] = k % 3 == 0 ? 0.0f : t[k] * 0x1.0p-130f;
                }
                break;
            case 11:  // 300: NaN and infinity (rank 1 only: the others send finite blocks)
                if (rank == 1) {
                    t[3] = std::numeric_limits<float>::quiet_NaN();
                    t[200] = -std::numeric_limits<float>::infinity();
                }
                break;
            case 12:  // 1000: the order-sensitive sum in every 64-element group
                for (std::size_t k = 0; k < s.size; ++k) {
                    t[k] = k % 64 == 0 ? 1.0f : (k % 64 == 1 ? 0x1.0p-24f : 0x1.0p-54f);
                }
                break;
            default:
                break;
        }
    });
    return x;
}

// The host exchanger's average: decode every payload, sum in rank order, divide.
template <class C>
std::vector<float> host_average(const typename C::hyper& h,
                                const std::vector<std::vector<std::byte>>& payloads,
                                const std::vector<cz::segment>& segs, std::size_t n) {
    std::vector<float> sum(n, 0.0f), one(n, 0.0f);
    for (const auto& p : payloads) {
        C::decode(h, p, segs, one);
        for (std::size_t i = 0; i < n; ++i) {
            sum[i] += one[i];
        }
    }
    for (auto& v : sum) {
        v = v / static_cast<float>(payloads.size());
    }
    return sum;
}

inline std::uint64_t first_nonfinite(const std::vector<float>& x) {
    for (std::size_t i = 0; i < x.size(); ++i) {
        if (!std::isfinite(x[i])) {
            return i;
        }
    }
    return lcu::no_nonfinite;
}

// ---- decode + average + outer step in one kernel, against the three kernels it fuses ----------

// What two outer steps (Nesterov, lr 0.7, momentum 0.9) from M gathered payloads leave.
struct decode_apply_run {
    std::vector<float> params, global, state;
    std::uint64_t steps, skipped;
};

// Two outer steps from the model's values and the `ranks` payloads at `gathered`, after
// payload_check, which must find a non-finite value exactly when `skip`: fused in one kernel
// (decode_average_apply) or split (decode_average, check_padded, outer_apply).
template <class C>
decode_apply_run decode_apply_twice(device_model& m, const lcu::tensor_table& table,
                                    const lcu::compress_plan<C>& plan, const typename C::hyper& h,
                                    const std::byte* gathered, int ranks, bool fused, bool skip,
                                    lcu::stream& s) {
    using outer = loco::outer::nesterov;
    outer_arrays o(m, table);
    auto &global = o.global, &state = o.state, &master = o.master, &avg = o.avg;
    auto& control = o.control;
    lcu::payload_check check(ranks);
    const std::uint64_t bad = check.run(plan, table, h, gathered, s);
    CHECK((bad != lcu::no_nonfinite) == skip);
    for (int step = 0; step < 2; ++step) {
        if (fused) {
            lcu::decode_average_apply<C, outer>(plan, table, gathered, ranks, global.get(),
                                                state.get(), master.get(), control.hyper(),
                                                control.control(), check.nonfinite(), s);
        } else {
            lcu::decode_average(plan, table, gathered, ranks, avg.get(), s);
            lcu::check_padded(table, avg.get(), control.control(), s);
            lcu::outer_apply<outer>(table, global.get(), avg.get(), state.get(), master.get(),
                                    control.hyper(), control.control(), true, s);
        }
    }
    const auto c = control.read(s);
    return decode_apply_run{m.download_values(), lcu::to_flat(table, global.get()),
                            lcu::to_flat(table, state.get()), c.steps, c.skipped};
}

// The fused run equals the split one bit for bit; both took the two steps, or skipped both.
inline void expect_fused_equals_split(const decode_apply_run& fused,
                                      const decode_apply_run& split, bool skip,
                                      const std::vector<float>& start) {
    expect_same_floats(fused.params, split.params, "parameters");
    expect_same_floats(fused.global, split.global, "global");
    expect_same_floats(fused.state, split.state, "outer state");
    CHECK(fused.steps == split.steps);
    CHECK(fused.skipped == split.skipped);
    CHECK(fused.steps == (skip ? 0u : 2u));
    if (!skip) {
        CHECK(fused.params != start);  // the steps moved them
    }
}

template <class C>
using codec_of = typename lcu::device_compressor<C>::codec;

// M ranks encode their own pseudo-gradients (awkward_values) from a delta on the device and on
// the host: payloads byte for byte, and with error feedback the residuals bit for bit (from a
// random residual that `shape_state` may change first; rank `in_place_rank` writes its next
// residual over the current one). Then the gathered payloads are checked and averaged on the
// device: the host exchanger's average bit for bit, and its first non-finite index.
template <class C, class ShapeState>
void expect_encodes_and_average_match_host(const std::string& label, const device_model& m,
                                           const lcu::tensor_table& table,
                                           const lcu::compress_plan<codec_of<C>>& plan,
                                           const typename C::hyper& h, int ranks,
                                           std::mt19937_64& rng, float outer_lr,
                                           int in_place_rank, ShapeState&& shape_state) {
    using codec = codec_of<C>;
    constexpr bool feedback = lcu::device_compressor<C>::feedback;
    const typename codec::hyper ch = lcu::device_compressor<C>::codec_hyper(h);
    const auto& segs = plan.segments();
    const std::size_t n = m.total();
    const std::size_t padded = table.padded_elements();
    const std::size_t p = plan.payload_bytes();
    REQUIRE(p == codec::payload_bytes(ch, segs));
    lcu::device_buffer<float> delta(padded), residual(padded), next(padded);
    lcu::device_buffer<std::byte> payload(p), gathered(static_cast<std::size_t>(ranks) * p);
    lcu::stream s;
    std::vector<std::vector<std::byte>> host_payloads;
    cz::encode_context ctx;
    ctx.seed = rng();
    ctx.round = rng() % 1000;
    ctx.outer_lr = outer_lr;
    for (int r = 0; r < ranks; ++r) {
        CAPTURE(r);
        ctx.rank = r;
        const std::vector<float> x = awkward_values(rng, m, r);
        std::vector<float> state = feedback ? normal_floats(rng, n, 0.01f) : std::vector<float>{};
        if (feedback) {
            shape_state(state);
        }
        lcu::from_flat<float>(table, x, delta.get());
        if (feedback) {
            lcu::from_flat<float>(table, state, residual.get());
            next.zero(nullptr);
            sync_all();
        }
        float* const next_residual = r == in_place_rank ? residual.get() : next.get();
        lcu::encode_io io;
        io.delta = delta.get();
        io.residual = residual.get();
        io.next_residual = next_residual;
        io.payload = payload.get();
        const lcu::device_encode_context dctx{ctx.seed, ctx.round, r, ctx.outer_lr, nullptr};
        lcu::encode<C, lcu::encode_from::delta>(plan, table, h, io, dctx, s);
        s.synchronize();

        std::vector<std::byte> want(p);
        C::encode(h, x, segs, state, ctx, want);
        expect_same_bytes(download_bytes(payload.get(), p), want, label + ": payload");
        if (feedback) {
            expect_same_floats(lcu::to_flat(table, next_residual), state, label + ": residual");
        }
        check_cuda(cudaMemcpy(gathered.get() + static_cast<std::size_t>(r) * p, payload.get(), p,
                              cudaMemcpyDeviceToDevice),
                   "gather");
        host_payloads.push_back(want);
    }

    const std::vector<float> want = host_average<codec>(ch, host_payloads, segs, n);
    lcu::payload_check check(ranks);
    const std::uint64_t nonfinite = check.run(plan, table, ch, gathered.get(), s);
    CHECK(nonfinite == first_nonfinite(want));
    lcu::device_buffer<float> avg(padded);
    lcu::decode_average(plan, table, gathered.get(), ranks, avg.get(), s);
    s.synchronize();
    expect_same_floats(lcu::to_flat(table, avg.get()), want, label + ": average");
}

// Each rank's values xs[r] encoded with C's default settings on the device, into payload r of
// gathered (plan.payload_bytes() each), and on the host; returns the host's payloads.
template <class C>
std::vector<std::vector<std::byte>> encode_ranks(const lcu::tensor_table& table,
                                                 const lcu::compress_plan<C>& plan,
                                                 const std::vector<std::vector<float>>& xs,
                                                 std::byte* gathered, lcu::stream& s) {
    const std::size_t p = plan.payload_bytes();
    lcu::device_buffer<float> delta(table.padded_elements());
    std::vector<std::vector<std::byte>> host_payloads;
    for (std::size_t r = 0; r < xs.size(); ++r) {
        lcu::from_flat<float>(table, xs[r], delta.get());
        lcu::encode_io io;
        io.delta = delta.get();
        io.payload = gathered + r * p;
        lcu::encode<C, lcu::encode_from::delta>(plan, table, {}, io, {}, s);
        s.synchronize();
        host_payloads.emplace_back(p);
        C::encode({}, xs[r], plan.segments(), {}, {}, host_payloads.back());
    }
    return host_payloads;
}

// Two ranks encode fresh values of the model with C's default settings, both with 3e38 at flat
// index huge_at and rank 1 with a NaN at nan_at (an index past the model: none). Returns
// payload_check's first non-finite average, which must be the host exchanger's.
template <class C>
std::uint64_t checked_first_nonfinite(const device_model& m, const lcu::tensor_table& table,
                                      const lcu::compress_plan<C>& plan, std::mt19937_64& rng,
                                      std::size_t huge_at, std::size_t nan_at) {
    constexpr int ranks = 2;
    const std::size_t n = m.total();
    lcu::device_buffer<std::byte> gathered(ranks * plan.payload_bytes());
    lcu::stream s;
    std::vector<std::vector<float>> xs;
    for (int r = 0; r < ranks; ++r) {
        std::vector<float> x = normal_floats(rng, n);
        if (huge_at < n) {
            x[huge_at] = 3.0e38f;
        }
        if (nan_at < n && r == 1) {
            x[nan_at] = std::numeric_limits<float>::quiet_NaN();
        }
        xs.push_back(std::move(x));
    }
    const auto host_payloads = encode_ranks<C>(table, plan, xs, gathered.get(), s);
    lcu::payload_check check(ranks);
    const std::uint64_t got = check.run(plan, table, {}, gathered.get(), s);
    CHECK(got == first_nonfinite(host_average<C>({}, host_payloads, plan.segments(), n)));
    return got;
}

// The inputs of an encode from the parameters (phase 1 fused in), on the device and on the
// host: random global values, the bf16 tensors' masters made to differ from their values (so an
// encode that reads a value where the master belongs shows), a random residual, and
// x = global - local, what the host encodes.
struct params_encode_inputs {
    lcu::device_buffer<float> global, master, residual;
    std::vector<float> state;  // the residual, flat
    std::vector<float> x;

    params_encode_inputs(const device_model& m, const lcu::tensor_table& table,
                         std::mt19937_64& rng)
        : global(table.padded_elements()),
          master(table.master_elements()),
          residual(table.padded_elements()) {
        const std::size_t n = m.total();
        std::vector<float> masters(n, 0.0f);
        std::vector<float> local = m.values();
        m.for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t off) {
            for (std::size_t k = 0; k < s.size; ++k) {
                if (s.value == dtype::bf16) {
                    masters[off + k] = local[off + k] + 0x1.0p-12f * local[off + k];
                    local[off + k] = masters[off + k];
                }
            }
        });
        lcu::master_from_flat(table, masters, master.get());
        const std::vector<float> g = normal_floats(rng, n);
        lcu::from_flat<float>(table, g, global.get());
        state = normal_floats(rng, n, 0.01f);
        lcu::from_flat<float>(table, state, residual.get());
        x.resize(n);
        for (std::size_t i = 0; i < n; ++i) {
            x[i] = g[i] - local[i];
        }
    }

    // The encode's arrays: the next residual goes to `next` (the residual itself: in place).
    lcu::encode_io io(float* next, std::byte* payload) const {
        lcu::encode_io out;
        out.global = global.get();
        out.master = master.get();
        out.residual = residual.get();
        out.next_residual = next;
        out.payload = payload;
        return out;
    }
};

// The payload checks' probe: rank 1's payload of the M payloads of p bytes in `good` (already
// uploaded at `gathered`), changed by `edit` and, when `resealed`, given a matching checksum
// again. The host decoder (`decode`, given the changed bytes) must refuse it, and the device check
// (`check`, run on the gathered payloads) must refuse it too, saying "from rank 1: " `message`.
// `gathered` holds `good` again afterwards.
template <class Edit, class Decode, class Check>
void expect_refused_by_both(const std::vector<std::byte>& good, std::size_t p, std::byte* gathered,
                            Edit&& edit, bool resealed, const std::string& message,
                            Decode&& decode, Check&& check) {
    CAPTURE(message);
    std::vector<std::byte> bad(good.begin() + static_cast<std::ptrdiff_t>(p),
                               good.begin() + static_cast<std::ptrdiff_t>(2 * p));
    edit(bad);
    if (resealed) {
        reseal(bad);
    }
    CHECK_THROWS_AS(decode(bad), loco::wire_error);
    upload_bytes(gathered + p, bad);
    CHECK_THROWS_WITH_AS(check(), doctest::Contains(("from rank 1: " + message).c_str()),
                         loco::wire_error);
    upload_bytes(gathered, good);
}

}  // namespace loco_test
