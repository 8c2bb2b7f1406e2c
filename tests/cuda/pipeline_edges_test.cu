// The CUDA pipeline at its edges, each against the host backend on the same data: fragments made
// only of empty tensors (SparseLoCo's and DeMo's device exchange, and a checkpoint taken with one
// in flight), an all-gather that moves its data only at finish() (as NCCL on its own stream may),
// a round skipped for a non-finite average, which must leave the error-feedback residual as it
// was so that the next rounds apply, and bf16 parameters streamed in fragments (each fragment's
// table on the whole model's fp32 masters).
#include <doctest/doctest.h>

#include "../support/forwarding_comm.hpp"
#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"
#include "model.cuh"

#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_pipeline_edges_test {

namespace {

using namespace loco_test;
using namespace loco_test::handles;
namespace ls = loco::schedule;
namespace cz = loco::compress;
namespace la = loco::aggregate;

using inner = loco::inner::adamw;
using outer = loco::outer::nesterov;

// Flat tensors t0, t1, ... of the given sizes (0 allowed), in GPU memory or on the host.
struct sized_gpu_model {
    std::vector<std::size_t> sizes;
    std::vector<lcu::device_buffer<float>> values, grads;
    loco::parameter_list list;
    sized_gpu_model(std::vector<std::size_t> s, const std::vector<float>& init) : sizes(std::move(s)) {
        std::size_t at = 0;
        for (const std::size_t n : sizes) {
            values.emplace_back(n);
            grads.emplace_back(n);
            if (n != 0) values.back().upload({init.data() + at, n});
            at += n;
        }
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            list.add_views("t" + std::to_string(i), loco::cuda_tensor(values[i].get(), sizes[i]),
                           loco::cuda_tensor(static_cast<const float*>(grads[i].get()), sizes[i]));
        }
    }
    void set_gradients(const std::vector<float>& g) {
        std::size_t at = 0;
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            if (sizes[i] != 0) grads[i].upload({g.data() + at, sizes[i]});
            at += sizes[i];
        }
    }
    std::vector<float> host_values(cudaStream_t s) {
        check_cuda(cudaStreamSynchronize(s), "sync");
        std::vector<float> out;
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            if (sizes[i] == 0) continue;
            const auto part = values[i].download();
            out.insert(out.end(), part.begin(), part.end());
        }
        return out;
    }
};

struct sized_host_model {
    std::vector<std::vector<float>> values, grads;
    loco::parameter_list list;
    sized_host_model(const std::vector<std::size_t>& sizes, const std::vector<float>& init) {
        std::size_t at = 0;
        for (const std::size_t n : sizes) {
            values.emplace_back(init.begin() + static_cast<std::ptrdiff_t>(at),
                                init.begin() + static_cast<std::ptrdiff_t>(at + n));
            grads.emplace_back(n, 0.0f);
            at += n;
        }
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            list.add_views("t" + std::to_string(i), loco::host_tensor(values[i].data(), sizes[i]),
                           loco::host_tensor(static_cast<const float*>(grads[i].data()),
                                             sizes[i]));
        }
    }
    void set_gradients(const std::vector<float>& g) {
        std::size_t at = 0;
        for (auto& gi : grads) {
            std::copy_n(g.begin() + static_cast<std::ptrdiff_t>(at), gi.size(), gi.begin());
            at += gi.size();
        }
    }
    std::vector<float> host_values() const {
        std::vector<float> out;
        for (const auto& v : values) out.insert(out.end(), v.begin(), v.end());
        return out;
    }
};

std::size_t total_of(const std::vector<std::size_t>& sizes) {
    std::size_t n = 0;
    for (const std::size_t s : sizes) n += s;
    return n;
}
std::vector<float> seeded(const std::string& label, std::size_t n, float stddev = 1.0f) {
    auto rng = rng_for(label);
    return normal_floats(rng, n, stddev);
}

// Streaming over two fragments, the second made only of the empty tensor t1.
ls::streaming::hyper two_fragments() {
    return {.every = 4, .fragments = 2, .overlap = 1, .alpha = 0.5f};
}
loco::fragment_layout empty_second_fragment() {
    loco::fragment_layout l;
    l.names = {{"t0", "t2"}, {"t1"}};
    return l;
}

// An all-gather that moves the data only when it is finished: what the interface allows ("both
// buffers belong to the collective until finish()") and what NCCL on its own stream may do.
class late_all_gather final : public forwarding_comm {
public:
    explicit late_all_gather(loco::comm::communicator& next)
        : forwarding_comm(next, "late all-gather"), next_(next) {}

protected:
    struct gather final : loco::comm::request::operation {
        gather(loco::comm::communicator& c, loco::tensor_view<const std::byte> s,
               loco::tensor_view<std::byte> r)
            : comm(c), send(s), recv(r) {}
        void wait() override { comm.all_gather(send, recv); }
        loco::comm::communicator& comm;
        loco::tensor_view<const std::byte> send;
        loco::tensor_view<std::byte> recv;
    };
    std::unique_ptr<loco::comm::request::operation> do_start_all_gather(
        loco::tensor_view<const std::byte> send, loco::tensor_view<std::byte> recv) override {
        return std::make_unique<gather>(next_, send, recv);
    }

private:
    loco::comm::communicator& next_;
};

// Calls t, t + 1, ..., t + n - 1 of this rank's gradients; returns the next call.
template <class Opt>
int run_calls(Opt& opt, gpu_params& p, const std::string& label,
              loco::comm::cuda_replicas& comm, int t, int n) {
    for (const int end = t + n; t < end; ++t) {
        p.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
        opt.step();
    }
    return t;
}

// The trainer spoils element 7 of tensor c on the device before a sync.
void spoil_c(gpu_params& p) {
    const float inf = std::numeric_limits<float>::infinity();
    check_cuda(cudaMemcpy(p.values[2].get() + 7, &inf, sizeof inf, cudaMemcpyHostToDevice),
               "poison");
}

}  // namespace

// torch.lerp's two formulas, rounded step by step: Streaming DiLoCo's merge as the host engine
// computes it (include/loco/backend/host/diloco_engine.hpp).
float lerp_reference(float g, float x, float alpha) {
    if (alpha < 0.5f) return g + alpha * (x - g);
    return x - (x - g) * (1.0f - alpha);
}

// One merge_values over fresh inputs against lerp_reference, bit for bit: a bf16 tensor's value is
// its master rounded (as after inner steps) and its master the local value; an fp32 tensor's local
// value is its value; with saved_copy, every local value comes from a saved copy of the padded
// layout instead. Nothing outside the tensors is written.
template <class Rng>
void expect_merge_is_lerp(device_model& m, const loco::backend::cuda::tensor_table& table,
                          Rng& rng, float alpha, bool saved_copy) {
    namespace lcu = loco::backend::cuda;
    CAPTURE(saved_copy);
    CAPTURE(alpha);
    const std::vector<float> g = normal_floats(rng, m.total(), 1.0f);
    const std::vector<float> copy = normal_floats(rng, m.total(), 1.0f);
    std::vector<float> master = normal_floats(rng, m.total(), 1.0f);
    m.randomize_values(rng);
    m.for_each_tensor([&](std::size_t, const tensor_shape& sh, std::size_t off) {
        for (std::size_t k = 0; k < sh.size; ++k) {
            if (sh.value == lcu::dtype::bf16) {
                m.values()[off + k] = loco::bf16::from_float(master[off + k]).to_float();
            } else {
                master[off + k] = 0.0f;
            }
        }
    });
    m.upload_values();
    lcu::device_buffer<float> global(table.padded_elements());
    lcu::device_buffer<float> local(table.padded_elements());
    lcu::device_buffer<float> masters(table.master_elements());
    lcu::from_flat<float>(table, g, global.get());
    lcu::from_flat<float>(table, copy, local.get());
    lcu::master_from_flat(table, master, masters.get());
    lcu::merge_values(table, global.get(), masters.get(), saved_copy ? local.get() : nullptr,
                      alpha, nullptr);
    check_cuda(cudaDeviceSynchronize(), "merge");
    const auto values = m.download_values();
    const auto merged_masters = lcu::master_to_flat(table, masters.get());
    std::size_t bad_values = 0, bad_masters = 0;
    m.for_each_tensor([&](std::size_t, const tensor_shape& sh, std::size_t off) {
        const bool bf = sh.value == lcu::dtype::bf16;
        for (std::size_t k = 0; k < sh.size; ++k) {
            const std::size_t j = off + k;
            const float x = saved_copy ? copy[j] : bf ? master[j] : m.values()[j];
            const float want = lerp_reference(g[j], x, alpha);
            if (bf) {
                bad_masters += merged_masters[j] != want;
                bad_values += values[j] != loco::bf16::from_float(want).to_float();
            } else {
                bad_values += values[j] != want;
            }
        }
    });
    CHECK(bad_values == 0);
    CHECK(bad_masters == 0);
    CHECK(m.gaps_untouched());
}

TEST_CASE("cuda merge_values: lerp(global, local, alpha) bit for bit, fp32 values and bf16 values "
          "with masters") {
    namespace lcu = loco::backend::cuda;
    auto rng = rng_for("merge values");
    device_model m({tensor_shape{1000, lcu::dtype::f32, lcu::dtype::f32},
                    tensor_shape{777, lcu::dtype::bf16, lcu::dtype::f32}});
    const lcu::tensor_table table = m.table(false);
    for (const float alpha : {0.5f, 0.25f, 0.75f, 1.0f}) {  // both formulas and their boundary
        expect_merge_is_lerp(m, table, rng, alpha, false);
    }
}

// The merge over odd sizes and every (value, gradient) dtype pair in one table, an empty tensor
// among them: the value type alone decides bf16 handling (an fp32 tensor with bf16 gradients is
// fp32). Both sources of the local values: the masters (and fp32 values), and a saved local copy
// of the padded layout. The launch refuses a null or misaligned global array.
TEST_CASE("cuda merge_values: odd sizes, every dtype pair, and a saved local copy") {
    namespace lcu = loco::backend::cuda;
    auto rng = rng_for("merge values mixed");
    device_model m({tensor_shape{1, lcu::dtype::f32, lcu::dtype::f32},
                    tensor_shape{3, lcu::dtype::bf16, lcu::dtype::f32},
                    tensor_shape{0, lcu::dtype::bf16, lcu::dtype::bf16},
                    tensor_shape{1023, lcu::dtype::f32, lcu::dtype::bf16},
                    tensor_shape{4097, lcu::dtype::bf16, lcu::dtype::bf16},
                    tensor_shape{16, lcu::dtype::f32, lcu::dtype::bf16, 1, 0}});
    const lcu::tensor_table table = m.table();
    for (const bool saved_copy : {false, true}) {
        for (const float alpha : {0.3f, 0.9f}) {
            expect_merge_is_lerp(m, table, rng, alpha, saved_copy);
        }
    }
    lcu::device_buffer<float> global(table.padded_elements() + 4);
    lcu::device_buffer<float> masters(table.master_elements());
    CHECK_THROWS_AS(lcu::merge_values(table, global.get() + 1, masters.get(), nullptr, 0.5f,
                                      nullptr),
                    loco::invalid_argument);
    CHECK_THROWS_AS(lcu::merge_values(table, nullptr, masters.get(), nullptr, 0.5f, nullptr),
                    loco::invalid_argument);
}

// A fragment's table (tensor_table(whole, indices)) reads and writes the one master array of the
// whole model: each bf16 tensor at the whole table's master offset, not at one of its own layout.
TEST_CASE("cuda tensor_table: a fragment's table keeps the whole table's master offsets") {
    namespace lcu = loco::backend::cuda;
    auto rng = rng_for("fragment masters");
    device_model m({tensor_shape{300, lcu::dtype::bf16, lcu::dtype::f32},
                    tensor_shape{77, lcu::dtype::f32, lcu::dtype::f32},
                    tensor_shape{517, lcu::dtype::bf16, lcu::dtype::f32},
                    tensor_shape{200, lcu::dtype::bf16, lcu::dtype::f32}});
    m.randomize_values(rng);
    const lcu::tensor_table whole = m.table();
    const std::vector<float> masters = normal_floats(rng, m.total(), 1.0f);
    lcu::device_buffer<float> master(whole.master_elements());
    check_cuda(cudaMemset(master.get(), 0xff, master.size_bytes()), "poison masters");
    lcu::master_from_flat(whole, masters, master.get());
    check_cuda(cudaDeviceSynchronize(), "upload");
    // master_from_flat sets the masters' padding to zero, as init_master does.
    const auto raw = master.download();
    std::size_t nonzero_padding = 0;
    for (std::size_t i = 0; i < whole.size(); ++i) {
        const std::size_t n = whole.spec(i).size;
        if (whole.spec(i).value_type == lcu::dtype::bf16) {
            for (std::size_t e = n; e < lcu::padded_size(n); ++e) {
                nonzero_padding += raw[whole.master_offset(i) + e] != 0.0f;
            }
        }
    }
    CHECK(nonzero_padding == 0);
    for (const std::vector<std::size_t>& idx :
         {std::vector<std::size_t>{3, 1, 0}, std::vector<std::size_t>{2},
          std::vector<std::size_t>{1}}) {
        CAPTURE(idx.front());
        const lcu::tensor_table frag(whole, idx);
        // The whole master array, even for a fragment of fp32 tensors only.
        CHECK(frag.master_elements() == whole.master_elements());
        std::vector<float> want;
        for (std::size_t k = 0; k < idx.size(); ++k) {
            const auto& sh = m.shape(idx[k]);
            if (sh.value == lcu::dtype::bf16) {
                CHECK(frag.master_offset(k) == whole.master_offset(idx[k]));
            }
            // A bf16 tensor's global values are its masters; an fp32 tensor's, its values.
            const auto& from = sh.value == lcu::dtype::bf16 ? masters : m.values();
            const auto at = from.begin() + static_cast<std::ptrdiff_t>(m.flat(idx[k]));
            want.insert(want.end(), at, at + static_cast<std::ptrdiff_t>(sh.size));
        }
        lcu::device_buffer<float> global(frag.padded_elements());
        lcu::gather_values(frag, master.get(), global.get(), nullptr);
        check_cuda(cudaDeviceSynchronize(), "gather");
        expect_equal_arrays(lcu::to_flat(frag, global.get()), want, "the fragment's global values");
    }
    // master_from_flat through a fragment's table writes that fragment's masters (padding zeroed)
    // and leaves every other tensor's masters as they were.
    const std::vector<std::size_t> second{2};
    const lcu::tensor_table frag(whole, second);
    const std::vector<float> before = master.download();
    const std::vector<float> fresh = normal_floats(rng, frag.total_elements(), 1.0f);
    lcu::master_from_flat(frag, fresh, master.get());
    check_cuda(cudaDeviceSynchronize(), "fragment upload");
    std::vector<float> want = before;
    std::copy(fresh.begin(), fresh.end(),
              want.begin() + static_cast<std::ptrdiff_t>(whole.master_offset(2)));
    expect_equal_arrays(master.download(), want, "the masters after a fragment's upload");
}

// bf16 parameters with fp32 masters, streamed in two fragments: every inner and outer step runs
// on the masters, so the masters follow the host's fp32 run and the bf16 values are its rounding.
TEST_CASE("cuda backend: bf16 parameters streamed in two fragments give the host's fp32 run") {
    namespace lcu = loco::backend::cuda;
    const std::vector<std::size_t> sizes{300, 517, 200};
    const std::string label = "edges bf16 streaming";
    constexpr int calls = 12;
    loco::fragment_layout layout;
    layout.names = {{"t0", "t2"}, {"t1"}};
    // Each rank starts from bf16 values: the host run starts from the same numbers.
    const auto init_of_rank = [&](std::size_t r) {
        auto v = seeded(label + " init " + std::to_string(r), total_of(sizes));
        for (float& x : v) x = loco::bf16::from_float(x).to_float();
        return v;
    };
    const auto grads_of_call = [&](std::size_t r, int t) {
        return seeded(label + " grad " + std::to_string(r) + " " + std::to_string(t),
                      total_of(sizes), 0.5f);
    };
    std::vector<std::vector<float>> gpu(2), gpu_global(2), host(2), host_global(2);
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        std::vector<tensor_shape> shapes;
        for (const std::size_t n : sizes) shapes.push_back({n, lcu::dtype::bf16, lcu::dtype::f32});
        device_model m(shapes);
        m.values() = init_of_rank(r);
        m.upload_values();
        loco::cuda::diloco<inner, outer, cz::none, ls::streaming> opt(
            m.table(), comm, {.inner = {.lr = 1e-2f}, .schedule = two_fragments(),
                              .fragments = layout, .stream = comm.stream()});
        for (int t = 1; t <= calls; ++t) {
            m.grads() = grads_of_call(r, t);
            m.upload_grads(comm.stream());
            opt.step();
        }
        CHECK(opt.outer_steps(0) > 1);
        CHECK(opt.outer_steps(1) > 1);
        check_cuda(cudaStreamSynchronize(comm.stream()), "sync");
        gpu[r] = m.download_values();
        gpu_global[r] = opt.global();
    });
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        sized_host_model m(sizes, init_of_rank(r));
        loco::diloco<inner, outer, cz::none, ls::streaming> opt(
            m.list, comm, {.inner = {.lr = 1e-2f}, .schedule = two_fragments(),
                           .fragments = layout});
        for (int t = 1; t <= calls; ++t) {
            m.set_gradients(grads_of_call(r, t));
            opt.step();
        }
        host[r] = m.host_values();
        const auto g = opt.global();
        host_global[r].assign(g.begin(), g.end());
    });
    for (std::size_t r = 0; r < 2; ++r) {
        CAPTURE(r);
        expect_close_arrays(gpu_global[r], host_global[r], 1e-5, "global values");
        // Within a bf16 rounding (half a unit in the last place: 2^-8 relative) of the host's.
        expect_close_arrays(gpu[r], host[r], 1.0 / 256, "bf16 parameters");
    }
}

TEST_CASE_TEMPLATE("cuda backend: a fragment of empty tensors syncs on the device exchange as on "
                   "the host", C, cz::sparseloco, cz::demo) {
    const std::vector<std::size_t> sizes{64, 0, 200};
    const std::string label = "edges empty fragment " + std::string(C::name);
    constexpr int calls = 10;
    std::vector<std::vector<float>> gpu(2), host(2);
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        sized_gpu_model m(sizes, seeded(label + " init " + std::to_string(r), total_of(sizes)));
        loco::cuda::diloco<inner, outer, C, ls::streaming> opt(
            m.list, comm, {.inner = {.lr = 1e-2f}, .schedule = two_fragments(),
                           .fragments = empty_second_fragment(), .stream = comm.stream()});
        CHECK(opt.device_exchange());
        for (int t = 1; t <= calls; ++t) {
            m.set_gradients(seeded(label + " grad " + std::to_string(r) + " " + std::to_string(t),
                                   total_of(sizes), 0.5f));
            opt.step();
        }
        CHECK(opt.outer_steps(0) > 0);
        CHECK(opt.outer_steps(1) > 0);
        gpu[r] = m.host_values(comm.stream());
    });
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        sized_host_model m(sizes, seeded(label + " init " + std::to_string(r), total_of(sizes)));
        loco::diloco<inner, outer, C, ls::streaming> opt(
            m.list, comm, {.inner = {.lr = 1e-2f}, .schedule = two_fragments(),
                           .fragments = empty_second_fragment()});
        for (int t = 1; t <= calls; ++t) {
            m.set_gradients(seeded(label + " grad " + std::to_string(r) + " " + std::to_string(t),
                                   total_of(sizes), 0.5f));
            opt.step();
        }
        host[r] = m.host_values();
    });
    for (std::size_t r = 0; r < 2; ++r) {
        CAPTURE(r);
        expect_close_arrays(gpu[r], host[r], 1e-4, "parameters");
    }
}

TEST_CASE_TEMPLATE("cuda backend: a checkpoint loaded with an empty fragment in flight saves again",
                   C, cz::none, cz::error_feedback<cz::blockwise<2, 256>>) {
    const std::vector<std::size_t> sizes{64, 0, 200};
    const std::string label = "edges empty in flight";
    using gpu_t = loco::cuda::diloco<inner, outer, C, ls::streaming>;
    std::vector<std::string> saved(2);
    std::vector<std::vector<float>> at_save(2);
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        sized_gpu_model m(sizes, seeded(label + " init " + std::to_string(r), total_of(sizes)));
        gpu_t opt(m.list, comm, {.inner = {.lr = 1e-2f}, .schedule = two_fragments(),
                                 .fragments = empty_second_fragment(), .stream = comm.stream()});
        for (int t = 1; t <= 8 && saved[r].empty(); ++t) {
            m.set_gradients(seeded(label + " grad " + std::to_string(r) + " " + std::to_string(t),
                                   total_of(sizes), 0.5f));
            opt.step();
            if (opt.in_flight(1)) {
                std::ostringstream os;
                opt.save(os);
                saved[r] = os.str();
                at_save[r] = m.host_values(comm.stream());
            }
        }
        REQUIRE_FALSE(saved[r].empty());
    });
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        sized_gpu_model m(sizes, at_save[r]);
        gpu_t opt(m.list, comm, {.inner = {.lr = 1e-2f}, .schedule = two_fragments(),
                                 .fragments = empty_second_fragment(), .stream = comm.stream()});
        std::istringstream is(saved[r]);
        opt.load(is);  // the exchange in flight starts again at the next step
        std::ostringstream again;
        CHECK_NOTHROW(opt.save(again));  // refused as "a failed step" before
        CHECK(again.str() == saved[r]);
    });
}

TEST_CASE("cuda backend: a delayed exchange gathered only at finish() sends its own round's "
          "pseudo-gradient") {
    // Delayed H = 3 on the device aggregation (trimmed mean, no compressor): round t's all-gather
    // is finished at the end of round t + 1, after that call captured round t + 1's delta. It
    // must send round t's, as the host does whenever the data moves.
    using gpu_t = loco::cuda::diloco<inner, outer, cz::none, ls::delayed, la::trimmed_mean>;
    using host_t = loco::diloco<inner, outer, cz::none, ls::delayed, la::trimmed_mean>;
    const std::string label = "edges late gather";
    constexpr int m = 3, calls = 10;
    std::vector<std::vector<float>> gpu(m), host(m);
    loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& replica) {
        const auto r = static_cast<std::size_t>(replica.rank());
        late_all_gather comm(replica);
        gpu_params p(init_of(label, replica.rank()));
        gpu_t opt(p.list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 3},
                                 .stream = replica.stream()});
        for (int t = 1; t <= calls; ++t) {
            p.set_gradients(grads_of(label, replica.rank(), t), replica.stream());
            opt.step();
        }
        CHECK(opt.outer_steps() == 2);
        gpu[r] = p.host_values(replica.stream());
    });
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        host_params p(init_of(label, comm.rank()));
        host_t opt(p.list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 3}});
        for (int t = 1; t <= calls; ++t) {
            p.set_gradients(grads_of(label, comm.rank(), t));
            opt.step();
        }
        host[r] = p.values();
    });
    for (std::size_t r = 0; r < m; ++r) {
        CAPTURE(r);
        expect_close_arrays(gpu[r], host[r], 1e-5, "parameters");
    }
}

TEST_CASE_TEMPLATE("cuda backend: a round skipped for a non-finite average leaves the residual, "
                   "and the next rounds apply", C, cz::sparseloco, cz::demo,
                   cz::error_feedback<cz::blockwise<2, 256>>) {
    using gpu_t = loco::cuda::diloco<inner, outer, C, ls::every>;
    const std::string label = "edges skip keeps residual";
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        gpu_params p(init_of(label, comm.rank()));
        gpu_t opt(p.list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 2},
                                 .stream = comm.stream()});
        CHECK(opt.device_exchange());
        int t = run_calls(opt, p, label, comm, 1, 4);
        REQUIRE(opt.outer_steps() == 2);
        const auto residual = opt.compressor_state();
        const auto global = opt.global();
        t = run_calls(opt, p, label, comm, t, 1);
        if (comm.rank() == 0) spoil_c(p);
        t = run_calls(opt, p, label, comm, t, 1);
        CHECK(opt.skipped_syncs() == 1);
        expect_equal_arrays(opt.compressor_state(), residual, "residual");
        expect_equal_arrays(opt.global(), global, "global values");
        run_calls(opt, p, label, comm, t, 8);
        CHECK(opt.skipped_syncs() == 1);  // every later round, all finite, applies
        CHECK(opt.outer_steps() == 6);
        for (const float e : opt.compressor_state()) REQUIRE(std::isfinite(e));
    });
}

TEST_CASE("cuda backend: demo signs drop a round whose pseudo-gradient the payload cannot carry") {
    // One bit a value carries no infinity: the receivers decode finite signs. The residual the
    // sender would keep holds it, and its vote drops the round everywhere (the host's rule).
    using gpu_t = loco::cuda::diloco<inner, outer, cz::demo, ls::every>;
    const std::string label = "edges demo signs";
    for (const auto policy : {loco::nonfinite_policy::skip, loco::nonfinite_policy::raise}) {
        CAPTURE(static_cast<int>(policy));
        std::vector<std::string> errors(2);
        loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
            gpu_params p(init_of(label, comm.rank()));
            gpu_t opt(p.list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 2},
                                     .compress = {.sign = true}, .on_nonfinite = policy,
                                     .stream = comm.stream()});
            CHECK(opt.device_exchange());
            int t = run_calls(opt, p, label, comm, 1, 4);
            const auto residual = opt.compressor_state();
            t = run_calls(opt, p, label, comm, t, 1);
            if (comm.rank() == 1) spoil_c(p);
            p.set_gradients(grads_of(label, comm.rank(), t++), comm.stream());
            try {
                opt.step();
            } catch (const loco::nonfinite_error& e) {
                errors[std::size_t(comm.rank())] = e.what();
            }
            CHECK(opt.outer_steps() == 2);
            expect_equal_arrays(opt.compressor_state(), residual, "residual");
            if (policy == loco::nonfinite_policy::raise) return;
            CHECK(opt.skipped_syncs() == 1);
            run_calls(opt, p, label, comm, t, 4);
            CHECK(opt.skipped_syncs() == 1);
            CHECK(opt.outer_steps() == 4);
        });
        if (policy == loco::nonfinite_policy::raise) {
            for (const auto& e : errors) {
                // c starts at flat element 47 (after a's 5 and b's 42).
                CHECK(e.find("the error-feedback residual would hold -inf at flat element 54 "
                             "(tensor 'c')") != std::string::npos);
            }
        }
    }
}

TEST_CASE("cuda backend: a faulty worker under trimmed_mean with error feedback: the rounds "
          "apply, its residual stays finite") {
    // The robust rule leaves the NaN worker out, so the aggregate is finite and every rank
    // applies it; the faulty rank keeps its residual instead of committing a NaN one.
    using ef = cz::error_feedback<cz::blockwise<2, 256>>;
    using gpu_t = loco::cuda::diloco<inner, outer, ef, ls::every, la::trimmed_mean>;
    const std::string label = "edges faulty ef worker";
    // Five workers: trimmed_mean b = 1 needs 2b + 1 = 3 usable ones (with three, one faulty
    // worker would have every round refused).
    loco::comm::run_replicas(5, [&](loco::comm::cuda_replicas& comm) {
        gpu_params p(init_of(label, comm.rank()));
        gpu_t opt(p.list, comm, {.inner = {.lr = 1e-2f}, .schedule = {.every = 2},
                                 .stream = comm.stream()});
        const std::vector<float> nan(total, std::numeric_limits<float>::quiet_NaN());
        for (int t = 1; t <= 8; ++t) {
            p.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            if (comm.rank() == 0 && t % 2 == 0) {  // faulty at every sync
                check_cuda(cudaMemcpy(p.values[2].get(), nan.data(), 1003 * sizeof(float),
                                      cudaMemcpyHostToDevice), "poison");
            }
            opt.step();
        }
        CHECK(opt.outer_steps() == 4);
        CHECK(opt.skipped_syncs() == 0);
        for (const float e : opt.compressor_state()) REQUIRE(std::isfinite(e));
        for (const float v : opt.global()) REQUIRE(std::isfinite(v));
    });
}

// A broadcast that throws at the first start() (rank 0's values to every worker), here the
// second fragment's: no parameter may change, so that the retried start() still reports that
// this worker's parameters moved (the handle drops a gradient taken before them). The second
// fragment (tensor b) is the same on every worker, as zero-initialised biases are.
class failing_second_broadcast final : public forwarding_comm {
public:
    explicit failing_second_broadcast(loco::comm::communicator& next)
        : forwarding_comm(next, "failing second broadcast") {}
    int broadcasts = 0;

protected:
    void do_broadcast(loco::tensor_view<std::byte> data, int root) override {
        if (++broadcasts == 2) throw loco::comm_error("test: the second broadcast failed");
        forwarding_comm::do_broadcast(data, root);
    }
};

TEST_CASE("cuda backend: a broadcast failing at start() changes no parameter; the retry moves "
          "them and says so") {
    using gpu_t = loco::cuda::diloco<inner, outer, cz::none, ls::streaming>;
    const std::string label = "edges failed start broadcast";
    loco::fragment_layout layout;
    layout.names = {{"a", "c"}, {"b"}};
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& comm) {
        std::vector<float> mine = init_of(label, comm.rank());
        const std::vector<float> root = init_of(label, 0);
        std::copy_n(root.begin() + 5, 42, mine.begin() + 5);  // b: the same on every worker
        gpu_params p(mine);
        failing_second_broadcast failing(comm);
        gpu_t opt(p.list, failing, {.schedule = two_fragments(), .fragments = layout,
                                    .stream = comm.stream()});
        CHECK_THROWS_AS(opt.start(), loco::comm_error);
        CHECK(p.host_values(comm.stream()) == mine);
        CHECK(opt.start() == (comm.rank() != 0));
        CHECK(p.host_values(comm.stream()) == root);
    });
}

}  // namespace cuda_pipeline_edges_test
