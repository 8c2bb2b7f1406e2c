// loco::cuda::optimizer and loco::cuda::diloco against the host handles on the same data: the
// GPU run must give the host run's numbers (within fp32 rounding: nvcc contracts multiply-adds),
// with every exchange scheme, and checkpoints must move between host and GPU.
#include <doctest/doctest.h>

#include "../support/compare.hpp"
#include "../support/hex.hpp"
#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"

#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_handles_test {

namespace {

using namespace loco_test;
namespace lcu = loco::backend::cuda;

// The three tensors of handles.cuh (one a 6 x 7 matrix), on the GPU and on the host, and their
// seeded values and gradients.
using gpu_model = loco_test::handles::gpu_params;
using host_model = loco_test::handles::host_params;
using loco_test::handles::grads_of;
using loco_test::handles::init_of;
using loco_test::handles::total;

void expect_close(const std::vector<float>& got, const std::vector<float>& want, double tol) {
    REQUIRE(got.size() == want.size());
    mismatch_log log;
    for (std::size_t i = 0; i < got.size(); ++i) {
        log.expect_close(got[i], want[i], tol, [&](auto& s) { s << "element " << i; });
    }
    log.check();
}

}  // namespace

TEST_CASE("cuda::optimizer equals loco::optimizer, and checkpoints move between them") {
    const std::string label = "cuda optimizer";
    lcu::stream s;
    gpu_model gpu(init_of(label, 0));
    host_model host(init_of(label, 0));
    const loco::inner::adamw::hyper h{.lr = 1e-2f};
    loco::cuda::optimizer<loco::inner::adamw> g(gpu.list, {.inner = h, .stream = s.get()});
    loco::optimizer<loco::inner::adamw> o(host.list, {.inner = h});
    for (int t = 1; t <= 5; ++t) {
        const auto grad = grads_of(label, 0, t);
        gpu.set_gradients(grad, s.get());
        host.set_gradients(grad);
        g.step();
        o.step();
    }
    expect_close(gpu.host_values(s.get()), host.values(), 1e-5);
    CHECK(g.steps() == 5);
    expect_close(g.state(1), std::vector<float>(o.state(1).begin(), o.state(1).end()), 1e-5);

    // GPU checkpoint into the host optimizer: the same state, bit for bit.
    std::stringstream from_gpu;
    g.save(from_gpu);
    host_model again(gpu.host_values(s.get()));
    loco::optimizer<loco::inner::adamw> restored(again.list, {.inner = h});
    restored.load(from_gpu);
    CHECK(restored.steps() == 5);
    CHECK(std::vector<float>(restored.state(0).begin(), restored.state(0).end()) == g.state(0));

    // And a host checkpoint into a GPU optimizer.
    std::stringstream from_host;
    o.save(from_host);
    loco::cuda::optimizer<loco::inner::adamw> g2(gpu.list, {.inner = h, .stream = s.get()});
    g2.load(from_host);
    CHECK(g2.steps() == 5);
    CHECK(g2.state(1) == std::vector<float>(o.state(1).begin(), o.state(1).end()));
}

TEST_CASE("tensor tables carry matrix shapes: checkpoints refuse another shape, and a shape must "
          "hold the tensor") {
    lcu::stream s;
    auto rng = rng_for("cuda table shapes");
    const std::vector<float> x0 = normal_floats(rng, 6), g0 = normal_floats(rng, 6, 0.5f);
    loco_test::device_buffer<float> x(x0), g(g0);
    const auto table = [&](std::size_t rows, std::size_t cols) {
        lcu::tensor_spec spec{"x", x.get(), lcu::dtype::f32, g.get(), lcu::dtype::f32, 6};
        spec.rows = rows;
        spec.cols = cols;
        return lcu::tensor_table(std::vector<lcu::tensor_spec>{spec});
    };
    CHECK_THROWS_WITH_AS(table(2, 4),
                         "loco: parameter 'x': its shape 2 x 4 does not hold its 6 elements; give "
                         "rows * cols == size, or 0 x 0 for a flat tensor",
                         loco::shape_error);
    CHECK_THROWS_AS(table(0, 6), loco::shape_error);
    CHECK_THROWS_AS(table(6, 0), loco::shape_error);
    // 2^63 + 3 rows of 2 wrap around to 6 elements in 64 bits: still refused.
    CHECK_THROWS_AS(table((std::size_t(1) << 63) + 3, 2), loco::shape_error);

    // An optimizer checkpoint of the 2 x 3 entry: format 6, the host's bytes.
    using opt_t = loco::cuda::optimizer<loco::inner::adamw>;
    opt_t wide(table(2, 3), {.stream = s.get()});
    wide.step();
    std::ostringstream os;
    wide.save(os);
    const std::string saved = os.str();
    CHECK(static_cast<unsigned char>(saved[8]) == 6);
    std::vector<float> hx = x.to_host(), hg = g0;
    loco::parameter_list host_list;
    host_list.add_views("x", loco::host_matrix(hx.data(), 2, 3),
                        loco::host_matrix(static_cast<const float*>(hg.data()), 2, 3));
    loco::optimizer<loco::inner::adamw> host(host_list);
    std::istringstream to_host(saved);
    host.load(to_host);
    std::ostringstream resaved;
    host.save(resaved);
    CHECK(resaved.str() == saved);

    // Refused by a 3 x 2 entry of the same name, naming both shapes; nothing changes.
    opt_t tall(table(3, 2), {.stream = s.get()});
    std::istringstream is(saved);
    CHECK_THROWS_WITH_AS(tall.load(is),
                         "loco: the checkpoint's parameter 'x' is 2 x 3 but this handle's is "
                         "3 x 2; load a checkpoint of this model",
                         loco::checkpoint_error);
    CHECK(tall.steps() == 0);
    CHECK(tall.state(0) == std::vector<float>(6, 0.0f));
    // A flat entry has no shape to compare.
    opt_t flat(table(0, 0), {.stream = s.get()});
    std::istringstream again(saved);
    CHECK_NOTHROW(flat.load(again));
    CHECK(flat.steps() == 1);

    // loco::cuda::diloco built from a table keeps the entry's shape (what its chunked
    // compressors cut and its checkpoint records): a host handle of a 3 x 2 matrix refuses its
    // checkpoint, one of a 2 x 3 matrix loads it.
    using gpu_t = loco::cuda::diloco<loco::inner::sgd, loco::outer::nesterov>;
    using host_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    std::string handle_saved;
    loco::comm::run_replicas(1, [&](loco::comm::cuda_replicas& comm) {
        gpu_t opt(table(2, 3), comm, {.stream = comm.stream()});
        opt.step();
        std::ostringstream o;
        opt.save(o);
        handle_saved = o.str();
    });
    const auto host_handle_loads = [&](std::size_t rows, std::size_t cols) {
        std::vector<float> v = x.to_host(), gv(6);
        loco::parameter_list l;
        l.add_views("x", loco::host_matrix(v.data(), rows, cols),
                    loco::host_matrix(static_cast<const float*>(gv.data()), rows, cols));
        loco::comm::single comm;
        host_t opt(l, comm);
        std::istringstream in(handle_saved);
        opt.load(in);
    };
    CHECK_NOTHROW(host_handle_loads(2, 3));
    CHECK_THROWS_WITH_AS(host_handle_loads(3, 2),
                         "loco: the checkpoint's parameter 'x' is 2 x 3 but this handle's is "
                         "3 x 2; load a checkpoint of this model",
                         loco::checkpoint_error);
}

TEST_CASE("host optimizer checkpoints of formats 4 and 5 load into cuda::optimizer, and a corrupted one changes nothing") {
    // The stream of tests/resume_test.cpp's format 5 test, written by loco at commit 4a9ab83:
    // AdamW at lr 0.125 on w (2 x 3) and b (2), three steps; and the same run written at commit
    // e0cdba3 (format 4: no shapes). The GPU optimizer reads the old formats as the host one
    // does: the same step count and states, bit for bit, and the same bytes saved again
    // (format 6).
    const std::string format4 = loco_test::bytes_from_hex(
        "4c4f434f434b50540400000009000000000000006f7074696d697a657202000000000000000600000000000000020000"
        "00000000000300000000000000000000000000000005000000000000006164616d770200000000000000100000000000"
        "0000b49d8f3db49d0f3e8e6c573eb49d8f3e2185b33e8e6cd73eb49d0f3fb49d8fbe5d642f3c5d642f3de850c53d5d64"
        "2f3e6806893ee850c53e5d642f3f5d642f3ec1c58cd53977670d");
    REQUIRE(static_cast<unsigned char>(format4[8]) == 4);
    const std::string format5 = loco_test::bytes_from_hex(
        "4c4f434f434b50540500000009000000000000006f7074696d697a657202000000000000000200000000000000030000"
        "000000000000000000000000000000000000000000020000000000000006000000000000000200000000000000030000"
        "0000000000000000000000000005000000000000006164616d7702000000000000001000000000000000b49d8f3db49d"
        "0f3e8e6c573eb49d8f3e2185b33e8e6cd73eb49d0f3fb49d8fbe5d642f3c5d642f3de850c53d5d642f3e6806893ee850"
        "c53e5d642f3f5d642f3eed563e1956008e57");
    REQUIRE(static_cast<unsigned char>(format5[8]) == 5);
    const std::vector<float> w0{0.25f, 0.5f, 0.75f, 1.0f, 1.25f, 1.5f}, b0{0.5f, -1.0f};
    lcu::stream s;
    loco_test::device_buffer<float> w(w0), gw(std::vector<float>(6)), b(b0),
        gb(std::vector<float>(2));
    lcu::tensor_spec w_spec{"w", w.get(), lcu::dtype::f32, gw.get(), lcu::dtype::f32, 6};
    w_spec.rows = 2;
    w_spec.cols = 3;
    const lcu::tensor_spec b_spec{"b", b.get(), lcu::dtype::f32, gb.get(), lcu::dtype::f32, 2};
    loco::cuda::optimizer<loco::inner::adamw> gpu(
        lcu::tensor_table(std::vector<lcu::tensor_spec>{w_spec, b_spec}),
        {.inner = {.lr = 0.125f}, .stream = s.get()});
    std::istringstream is(format5);
    REQUIRE_NOTHROW(gpu.load(is));
    CHECK(gpu.steps() == 3);

    std::vector<float> hw = w0, hgw(6), hb = b0, hgb(2);
    loco::parameter_list list;
    list.add_views("w", loco::host_matrix(hw.data(), 2, 3),
                   loco::host_matrix(static_cast<const float*>(hgw.data()), 2, 3));
    list.add("b", hb, hgb);
    loco::optimizer<loco::inner::adamw> host(list, {.inner = {.lr = 0.125f}});
    std::istringstream host_is(format5);
    host.load(host_is);
    for (int j = 0; j < 2; ++j) {
        CHECK(gpu.state(j) == std::vector<float>(host.state(j).begin(), host.state(j).end()));
    }
    std::ostringstream from_gpu, from_host;
    gpu.save(from_gpu);
    host.save(from_host);
    CHECK(from_gpu.str() == from_host.str());

    // Format 4 (no shapes): the same state.
    loco::cuda::optimizer<loco::inner::adamw> gpu4(
        lcu::tensor_table(std::vector<lcu::tensor_spec>{w_spec, b_spec}),
        {.inner = {.lr = 0.125f}, .stream = s.get()});
    std::istringstream is4(format4);
    REQUIRE_NOTHROW(gpu4.load(is4));
    std::ostringstream from_gpu4;
    gpu4.save(from_gpu4);
    CHECK(from_gpu4.str() == from_host.str());

    // One state byte flipped (the checksum no longer holds): refused, and the loaded state stays.
    std::string flipped = format5;
    flipped[flipped.size() - 8 - 5] = static_cast<char>(flipped[flipped.size() - 8 - 5] ^ 0x10);
    std::istringstream bad(flipped);
    CHECK_THROWS_WITH_AS(gpu.load(bad), doctest::Contains("checksum mismatch"),
                         loco::checkpoint_error);
    std::ostringstream after;
    gpu.save(after);
    CHECK(after.str() == from_host.str());
}

TEST_CASE("cuda::diloco's start() says it moved the parameters exactly when the host's does "
          "(bits: -0 against +0, NaN against NaN)") {
    // Rank 0 holds -0 where rank 1 holds +0: the broadcast changes rank 1's bits. With a NaN at
    // the same place on both ranks it changes nothing. (A float != said the opposite in both.)
    for (const bool nan : {false, true}) {
        CAPTURE(nan);
        const auto init = [&](int rank) {
            return std::vector<float>{
                nan ? std::numeric_limits<float>::quiet_NaN() : (rank == 0 ? -0.0f : 0.0f), 1.0f,
                2.0f};
        };
        std::array<bool, 2> host_moved{}, gpu_moved{};
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            std::vector<float> x = init(comm.rank()), g(3, 0.0f);
            loco::parameter_list list;
            list.add("w", x, g);
            loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(list, comm);
            host_moved[std::size_t(comm.rank())] = opt.start();
        });
        loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
            lcu::device_buffer<float> v(3), g(3);
            v.upload(init(comm.rank()));
            g.zero(nullptr);
            loco::parameter_list list;
            list.add_views("w", loco::cuda_tensor(v.get(), 3),
                           loco::cuda_tensor(static_cast<const float*>(g.get()), 3));
            loco::cuda::diloco<loco::inner::sgd, loco::outer::sgd> opt(
                list, comm, {.stream = comm.stream()});
            gpu_moved[std::size_t(comm.rank())] = opt.start();
        });
        CHECK(host_moved == std::array<bool, 2>{false, !nan});
        CHECK(gpu_moved == host_moved);
    }
}

TEST_CASE("cuda::optimizer: a step captured in a CUDA graph replays like steps on the host") {
    const std::string label = "cuda optimizer graph";
    lcu::stream s;
    gpu_model gpu(init_of(label, 0));
    host_model host(init_of(label, 0));
    const loco::inner::sgd::hyper h{.lr = 0.05f, .momentum = 0.9f, .nesterov = true};
    loco::cuda::optimizer<loco::inner::sgd> g(gpu.list, {.inner = h, .stream = s.get()});
    loco::optimizer<loco::inner::sgd> o(host.list, {.inner = h});
    const auto grad = grads_of(label, 0, 1);
    gpu.set_gradients(grad, s.get());
    host.set_gradients(grad);

    check_cuda(cudaStreamBeginCapture(s.get(), cudaStreamCaptureModeGlobal), "begin capture");
    g.step();
    g.hyper().lr = 0.01f;  // a change inside the capture is refused, not recorded
    CHECK_THROWS_AS(g.step(), loco::invalid_argument);
    g.hyper().lr = 0.05f;
    const auto step_graph = lcu::graph::end_capture(s.get());
    for (int t = 0; t < 4; ++t) {
        step_graph.launch(s.get());
        o.step();
    }
    expect_close(gpu.host_values(s.get()), host.values(), 1e-5);
    CHECK(g.steps() == 4);
}

TEST_CASE("cuda::optimizer: nonfinite_policy::raise names the tensor and changes nothing") {
    const std::string label = "cuda optimizer raise";
    lcu::stream s;
    auto grad = grads_of(label, 0, 1);
    grad[5 + 17] = std::numeric_limits<float>::infinity();  // element 17 of "b"
    gpu_model gpu(init_of(label, 0));
    gpu.set_gradients(grad, s.get());
    loco::cuda::optimizer<loco::inner::adamw> g(
        gpu.list, {.on_nonfinite = loco::nonfinite_policy::raise, .stream = s.get()});
    const auto before = gpu.host_values(s.get());
    CHECK_THROWS_WITH_AS(g.step(), doctest::Contains("the gradient of 'b' holds a non-finite value at element 17"),
                         loco::nonfinite_error);
    CHECK(gpu.host_values(s.get()) == before);
    CHECK(g.steps() == 0);

    loco::cuda::optimizer<loco::inner::adamw> skipping(gpu.list, {.stream = s.get()});
    skipping.step();
    CHECK(gpu.host_values(s.get()) == before);
    CHECK(skipping.skipped_steps() == 1);

    // The raise leaves no trace of the non-finite value: once the trainer fixes the gradient,
    // the next step applies, as the host optimizer's first step on the same data.
    grad[5 + 17] = 0.25f;
    gpu.set_gradients(grad, s.get());
    CHECK_NOTHROW(g.step());
    CHECK(g.steps() == 1);
    host_model host(before);
    host.set_gradients(grad);
    loco::optimizer<loco::inner::adamw> o(host.list);
    o.step();
    expect_close(gpu.host_values(s.get()), host.values(), 1e-5);
}

namespace {

// H = 3, M = 3, 7 steps then a closing sync: the same run on the host (threads) and on the GPU
// (cuda_replicas); returns rank 0's final parameters and every rank's bytes per sync.
template <class Compressor>
struct diloco_runs {
    std::vector<std::vector<float>> host_final = std::vector<std::vector<float>>(3);
    std::vector<std::vector<float>> gpu_final = std::vector<std::vector<float>>(3);
    std::vector<std::uint64_t> host_bytes = std::vector<std::uint64_t>(3);
    std::vector<std::uint64_t> gpu_bytes = std::vector<std::uint64_t>(3);
    std::vector<std::uint64_t> gpu_formula = std::vector<std::uint64_t>(3);
    std::uint64_t padded = 0;  // elements of the GPU's padded layout

    diloco_runs(const std::string& label, loco::exchange_scheme scheme,
                typename Compressor::hyper ch = {}) {
        using host_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov, Compressor>;
        using gpu_t = loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov, Compressor>;
        const loco::inner::adamw::hyper inner{.lr = 3e-3f};
        loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
            const int r = comm.rank();
            host_model m(init_of(label, r));
            host_t opt(m.list, comm,
                       {.inner = inner, .schedule = {.every = 3}, .compress = ch, .exchange = scheme});
            for (int t = 1; t <= 7; ++t) {
                m.set_gradients(grads_of(label, r, t));
                opt.step();
            }
            opt.sync();
            host_final[std::size_t(r)] = m.values();
            // Payloads only: less the sync agreement and the start() fingerprint.
            host_bytes[std::size_t(r)] = comm.bytes_sent() -
                                         opt.outer_steps() * opt.agreement_bytes_per_sync() -
                                         opt.fingerprint_bytes();
        });
        loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& comm) {
            const int r = comm.rank();
            gpu_model m(init_of(label, r));
            gpu_t opt(m.list, comm,
                      {.inner = inner, .schedule = {.every = 3}, .compress = ch, .exchange = scheme,
                       .stream = comm.stream()});
            for (int t = 1; t <= 7; ++t) {
                m.set_gradients(grads_of(label, r, t), comm.stream());
                opt.step();
            }
            opt.sync();
            CHECK(opt.outer_steps() == 3);
            gpu_final[std::size_t(r)] = m.host_values(comm.stream());
            // Payloads only, as on the host (both handles add the same agreement and
            // fingerprint).
            gpu_bytes[std::size_t(r)] = comm.bytes_sent() -
                                        opt.outer_steps() * opt.agreement_bytes_per_sync() -
                                        opt.fingerprint_bytes();
            gpu_formula[std::size_t(r)] = opt.bytes_per_sync() - opt.agreement_bytes_per_sync();
            padded = opt.inner().table().padded_elements();
        });
    }
};

}  // namespace

TEST_CASE("cuda::diloco on one GPU equals loco::diloco on threads: fp32 all-reduce on the device") {
    diloco_runs<loco::compress::none> runs("cuda diloco none", loco::exchange_scheme::automatic);
    for (int r = 0; r < 3; ++r) {
        CHECK(runs.gpu_final[std::size_t(r)] == runs.gpu_final[0]);  // identical workers
        expect_close(runs.gpu_final[std::size_t(r)], runs.host_final[std::size_t(r)], 1e-5);
        // Three syncs plus the initial broadcast; the device all-reduce runs over the padded
        // layout, whose formula bytes_per_sync() gives.
        CHECK(runs.padded == 8 + 48 + 1008);  // each tensor's slice rounded up to 8 elements
        const std::uint64_t broadcast = r == 0 ? 2 * 4 * runs.padded : 0;
        CHECK(runs.gpu_bytes[std::size_t(r)] == 3 * runs.gpu_formula[std::size_t(r)] + broadcast);
    }
}

TEST_CASE("cuda::diloco with 2-bit codes and error feedback equals the host, both schemes") {
    using ef = loco::compress::error_feedback<loco::compress::statistical<2>>;
    for (const auto scheme : {loco::exchange_scheme::all_gather, loco::exchange_scheme::two_phase}) {
        CAPTURE(loco::to_string(scheme));
        diloco_runs<ef> runs(std::string("cuda diloco ef ") + std::string(loco::to_string(scheme)),
                             scheme, {.decay = 0.9f});
        for (int r = 0; r < 3; ++r) {
            CHECK(runs.gpu_final[std::size_t(r)] == runs.gpu_final[0]);
            // The codes are decided by comparisons: a pseudo-gradient a rounding away from a bin
            // edge may take the neighbouring code on one side, so allow a little more.
            expect_close(runs.gpu_final[std::size_t(r)], runs.host_final[std::size_t(r)], 1e-4);
            // The same payloads; only the initial broadcast differs, by rank 0's padding.
            const std::uint64_t padding = r == 0 ? 2 * 4 * (runs.padded - total) : 0;
            CHECK(runs.gpu_bytes[std::size_t(r)] == runs.host_bytes[std::size_t(r)] + padding);
        }
    }
}

// docs/cuda.md: the handle's device plan records no rows, so per-row statistical codes take the
// host exchange (correct, not fast) instead of being refused.
TEST_CASE("cuda::diloco with per-row statistical codes keeps the host exchange and equals the "
          "host") {
    using ef = loco::compress::error_feedback<loco::compress::statistical<2>>;
    ef::hyper h{};
    h.compress.per = loco::compress::granularity::row;
    h.decay = 0.9f;
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        gpu_model m(init_of("cuda diloco ef per row", comm.rank()));
        loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov, ef> opt(
            m.list, comm, {.compress = h, .stream = comm.stream()});
        CHECK(!opt.device_exchange());
        CHECK(opt.exchange() == loco::exchange_scheme::all_gather);
    });
    diloco_runs<ef> runs("cuda diloco ef per row", loco::exchange_scheme::automatic, h);
    for (int r = 0; r < 3; ++r) {
        CHECK(runs.gpu_final[std::size_t(r)] == runs.gpu_final[0]);
        expect_close(runs.gpu_final[std::size_t(r)], runs.host_final[std::size_t(r)], 1e-4);
        const std::uint64_t padding = r == 0 ? 2 * 4 * (runs.padded - total) : 0;
        CHECK(runs.gpu_bytes[std::size_t(r)] == runs.host_bytes[std::size_t(r)] + padding);
    }
}

TEST_CASE("cuda::diloco checkpoints load into loco::diloco and back") {
    const std::string label = "cuda diloco checkpoint";
    using gpu_t = loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov>;
    using host_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    std::vector<std::string> saved(2);
    std::vector<std::vector<float>> gpu_global(2);
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        gpu_model m(init_of(label, 0));
        gpu_t opt(m.list, comm, {.schedule = {.every = 2}, .stream = comm.stream()});
        for (int t = 1; t <= 3; ++t) {
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
        }
        std::ostringstream os;
        opt.save(os);
        saved[std::size_t(comm.rank())] = os.str();
        gpu_global[std::size_t(comm.rank())] = opt.global();
    });
    std::vector<std::string> resaved(2);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        host_model m(init_of(label, 0));
        host_t opt(m.list, comm);
        std::istringstream is(saved[std::size_t(comm.rank())]);
        opt.load(is);
        CHECK(opt.calls() == 3);
        CHECK(opt.outer_steps() == 1);
        CHECK(std::vector<float>(opt.global().begin(), opt.global().end()) ==
              gpu_global[std::size_t(comm.rank())]);
        std::ostringstream os;
        opt.save(os);
        resaved[std::size_t(comm.rank())] = os.str();
    });
    CHECK(resaved == saved);  // the same bytes: one format for host and GPU
}

namespace {

// Fresh random gradients that a reference can recompute element by element: a hash of the
// process seed, the worker, the step and the index, uniform in [-1, 1).
float fresh_gradient(int rank, int step, std::size_t i) {
    std::uint64_t z = loco_test::process_seed() ^ (std::uint64_t(rank) << 56) ^
                      (std::uint64_t(step) << 36) ^ std::uint64_t(i);
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return float(double(z >> 40) / double(1ULL << 23) - 1.0);
}
void fill_gradient(std::vector<float>& g, int rank, int step) {
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = fresh_gradient(rank, step, i);
}
float initial_value(std::size_t i) { return fresh_gradient(200, 0, i); }

}  // namespace

TEST_CASE("docs: DiLoCo with four workers on one GPU") {
    std::vector<std::vector<float>> finals(4);
    // [snippet:cuda-replicas]
    // Four DiLoCo workers on one GPU, each a thread with its own stream and its own copy of the
    // model in device memory.
    loco::comm::run_replicas(4, [&](loco::comm::cuda_replicas& comm) {
        const std::size_t n = 1 << 20;
        loco::backend::cuda::device_buffer<float> w(n), g(n);  // the model and its gradient
        std::vector<float> host_w(n), host_g(n);
        for (std::size_t i = 0; i < n; ++i) host_w[i] = initial_value(i);
        w.upload(host_w);
        loco::parameter_list params;
        params.add_views("w", loco::cuda_tensor(w.get(), n),
                         loco::cuda_tensor(static_cast<const float*>(g.get()), n));

        using diloco = loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov>;
        diloco opt(params, comm, {.inner = {.lr = 1e-3f}, .schedule = {.every = 50},
                                  .stream = comm.stream()});  // the trainer's stream
        opt.start();
        for (int step = 0; step < 100; ++step) {
            // forward and backward on comm.stream() write g; here, random numbers from the host.
            fill_gradient(host_g, comm.rank(), step);
            LOCO_CUDA_CHECK(cudaMemcpyAsync(g.get(), host_g.data(), n * sizeof(float),
                                            cudaMemcpyHostToDevice, comm.stream()));
            opt.step();  // two kernel launches; every 50th call also syncs the four workers
        }
        // [snippet:cuda-replicas end]
        CHECK(opt.outer_steps() == 2);
        check_cuda(cudaStreamSynchronize(comm.stream()), "sync");
        finals[std::size_t(comm.rank())] = w.download();
    });
    for (const auto& f : finals) {
        CHECK(f == finals[0]);  // bit for bit
    }
    // A double-precision reference of AdamW inside, Nesterov outside, on every 613th element
    // (all the arithmetic is element-wise, so a subset is checked exactly as the whole).
    const loco::inner::adamw::hyper inner{.lr = 1e-3f};
    const loco::outer::nesterov::hyper outer{};
    loco_test::mismatch_log log;
    for (std::size_t i = 0; i < finals[0].size(); i += 613) {
        double global = initial_value(i), momentum = 0.0;
        std::vector<double> x(4, global), m(4, 0.0), v(4, 0.0);
        int t = 0;
        for (int sync = 1; sync <= 2; ++sync) {
            for (int step = 0; step < 50; ++step, ++t) {
                for (int r = 0; r < 4; ++r) {
                    const double gr = fresh_gradient(r, t, i);
                    x[std::size_t(r)] *= 1.0 - double(inner.lr) * double(inner.weight_decay);
                    m[std::size_t(r)] = inner.beta1 * m[std::size_t(r)] + (1.0 - inner.beta1) * gr;
                    v[std::size_t(r)] = inner.beta2 * v[std::size_t(r)] + (1.0 - inner.beta2) * gr * gr;
                    const double mh = m[std::size_t(r)] / (1.0 - std::pow(double(inner.beta1), t + 1));
                    const double vh = v[std::size_t(r)] / (1.0 - std::pow(double(inner.beta2), t + 1));
                    x[std::size_t(r)] -= double(inner.lr) * mh / (std::sqrt(vh) + double(inner.eps));
                }
            }
            double delta = 0.0;
            for (const double xr : x) delta += (global - xr) / 4.0;
            momentum = sync == 1 ? delta : double(outer.momentum) * momentum + delta;
            global -= double(outer.lr) * (delta + double(outer.momentum) * momentum);
            std::fill(x.begin(), x.end(), global);
        }
        log.expect_close(finals[0][i], global, 1e-5, [&](std::ostream& o) { o << "w[" << i << "]"; });
    }
    log.check();
}

}  // namespace cuda_handles_test
