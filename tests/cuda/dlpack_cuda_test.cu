// The DLPack adapter (include/loco/dlpack.hpp) with kDLCUDA tensors: the road of CUDA tensors
// from PyTorch (python/loco/__init__.py) into loco::cuda::diloco. DLTensors over device buffers,
// shaped as torch shapes a model's parameters (a vector, a matrix, a 4-D convolution kernel),
// feed the CUDA handle; the same numbers as kDLCPU tensors feed the host handle. Both run DiLoCo
// (AdamW inner, Nesterov outer, H = 3, 7 steps and a closing sync) on two workers, and must end
// at the same parameters (within fp32 rounding: nvcc contracts multiply-adds), over a device
// communicator (cuda_replicas: the path of NCCL) and over a host one (threads: the path of gloo,
// where the CUDA handle stages its exchanges through host memory).
#include <doctest/doctest.h>

#include "../support/compare.hpp"
#include "../support/random.hpp"
#include "device.cuh"

#include <loco/cuda.hpp>
#include <loco/dlpack.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_dlpack_cuda_test {

namespace {

using namespace loco_test;
namespace lcu = loco::backend::cuda;

// Three parameters as torch lays them out: shapes, names, element counts.
struct shape {
    const char* name;
    std::vector<std::int64_t> extents;
    std::size_t size() const {
        std::size_t n = 1;
        for (const auto e : extents) n *= static_cast<std::size_t>(e);
        return n;
    }
};
const std::array<shape, 3> shapes = {{{"bias", {5}}, {"linear", {6, 7}}, {"conv", {4, 3, 5, 5}}}};
constexpr std::size_t total = 5 + 42 + 300;

// A compact DLTensor of float32 over `data` (CPU or CUDA memory), as torch.utils.dlpack.to_dlpack
// exports a contiguous tensor: shape, no strides.
DLTensor dl_tensor(const float* data, DLDeviceType device, const shape& s) {
    DLTensor t{};
    t.data = const_cast<float*>(data);
    t.device = {device, 0};
    t.ndim = static_cast<std::int32_t>(s.extents.size());
    t.dtype = {kDLFloat, 32, 1};
    t.shape = const_cast<std::int64_t*>(s.extents.data());
    t.strides = nullptr;
    t.byte_offset = 0;
    return t;
}

std::vector<float> init_of(int rank) {
    auto rng = rng_for("dlpack cuda/init/" + std::to_string(rank));
    return normal_floats(rng, total);
}
std::vector<float> grads_of(int rank, int step) {
    auto rng = rng_for("dlpack cuda/grad/" + std::to_string(rank) + "/" + std::to_string(step));
    return normal_floats(rng, total, 0.5f);
}

// The parameters in host memory, registered through kDLCPU DLTensors.
struct host_model {
    std::vector<float> values, grads;
    loco::parameter_list list;
    explicit host_model(const std::vector<float>& init) : values(init), grads(total) {
        std::size_t at = 0;
        for (const shape& s : shapes) {
            loco::dlpack::add(list, s.name, dl_tensor(values.data() + at, kDLCPU, s),
                              dl_tensor(grads.data() + at, kDLCPU, s));
            at += s.size();
        }
    }
    void set_gradients(const std::vector<float>& g) { grads = g; }
};

// The same in device memory, one buffer per tensor as torch allocates them, through kDLCUDA.
struct gpu_model {
    std::vector<lcu::device_buffer<float>> values, grads;
    loco::parameter_list list;
    explicit gpu_model(const std::vector<float>& init) {
        std::size_t at = 0;
        for (const shape& s : shapes) {
            values.emplace_back(s.size());
            grads.emplace_back(s.size());
            values.back().upload({init.data() + at, s.size()});
            grads.back().zero(nullptr);
            loco::dlpack::add(list, s.name, dl_tensor(values.back().get(), kDLCUDA, s),
                              dl_tensor(grads.back().get(), kDLCUDA, s));
            at += s.size();
        }
        LOCO_CUDA_CHECK(cudaDeviceSynchronize());
    }
    // Waits for `stream` (the handle's launches) before writing, as a trainer's backward pass on
    // the same stream would be ordered after them.
    void set_gradients(const std::vector<float>& g, cudaStream_t stream) {
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        std::size_t at = 0;
        for (std::size_t i = 0; i < shapes.size(); ++i) {
            grads[i].upload({g.data() + at, shapes[i].size()});
            at += shapes[i].size();
        }
    }
    std::vector<float> host_values(cudaStream_t stream) const {
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<float> out;
        for (const auto& v : values) {
            const auto part = v.download();
            out.insert(out.end(), part.begin(), part.end());
        }
        return out;
    }
};

using host_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
using gpu_t = loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov>;
const loco::inner::adamw::hyper inner_hyper{.lr = 3e-3f};
constexpr int workers = 2;
constexpr int steps = 7;

template <class Handle, class Model, class Comm>
std::vector<float> train(Model& m, Comm& comm, cudaStream_t stream) {
    typename Handle::config cfg{.inner = inner_hyper, .schedule = {.every = 3}};
    if constexpr (std::is_same_v<Handle, gpu_t>) cfg.stream = stream;
    Handle opt(m.list, comm, cfg);
    for (int t = 1; t <= steps; ++t) {
        if constexpr (std::is_same_v<Handle, host_t>) {
            m.set_gradients(grads_of(comm.rank(), t));
        } else {
            m.set_gradients(grads_of(comm.rank(), t), stream);
        }
        opt.step();
    }
    opt.sync();
    CHECK(opt.outer_steps() == 3);
    if constexpr (std::is_same_v<Handle, host_t>) {
        return m.values;
    } else {
        return m.host_values(stream);
    }
}

void expect_close(const std::vector<float>& got, const std::vector<float>& want, double tol) {
    REQUIRE(got.size() == want.size());
    mismatch_log log;
    for (std::size_t i = 0; i < got.size(); ++i) {
        log.expect_close(got[i], want[i], tol, [&](auto& s) { s << "element " << i; });
    }
    log.check();
}

}  // namespace

TEST_CASE("dlpack: kDLCUDA tensors become CUDA views with torch's shapes, and export back") {
    gpu_model m(init_of(0));
    REQUIRE(m.list.size() == 3);
    for (std::size_t i = 0; i < 3; ++i) {
        CAPTURE(shapes[i].name);
        CHECK(m.list[i].value.space == loco::memory_space::cuda);
        CHECK(m.list[i].grad.space == loco::memory_space::cuda);
        CHECK(m.list[i].value.data == m.values[i].get());
        CHECK(m.list[i].value.size == shapes[i].size());
    }
    // A tensor of two or more dimensions is a matrix of shape[0] rows (Muon's flattening).
    CHECK(!m.list[0].value.is_matrix());
    CHECK((m.list[1].value.rows == 6 && m.list[1].value.cols == 7));
    CHECK((m.list[2].value.rows == 4 && m.list[2].value.cols == 75));

    // loco's own device buffers go out as kDLCUDA (the NCCL communicator of python/_loco.cpp).
    DLManagedTensor* out = loco::dlpack::export_view(loco::cuda_tensor(m.values[1].get(), 42));
    CHECK(out->dl_tensor.device.device_type == kDLCUDA);
    const auto back = loco::dlpack::view<float>(out->dl_tensor, "exported");
    CHECK(back.space == loco::memory_space::cuda);
    CHECK(back.data == m.values[1].get());
    CHECK(back.size == 42);
    out->deleter(out);
}

TEST_CASE("dlpack: kDLCUDA parameters in loco::cuda::diloco equal kDLCPU ones in loco::diloco") {
    std::vector<std::vector<float>> host_final(workers), replicas_final(workers),
        staged_final(workers);
    loco::comm::run_threads(workers, [&](loco::comm::threads& comm) {
        host_model m(init_of(comm.rank()));
        host_final[std::size_t(comm.rank())] = train<host_t>(m, comm, nullptr);
    });
    // A device communicator: the handle all-reduces its device buffers (NCCL's path).
    loco::comm::run_replicas(workers, [&](loco::comm::cuda_replicas& comm) {
        gpu_model m(init_of(comm.rank()));
        replicas_final[std::size_t(comm.rank())] = train<gpu_t>(m, comm, comm.stream());
    });
    // A host communicator: the handle stages its exchanges through host memory (gloo's path).
    loco::comm::run_threads(workers, [&](loco::comm::threads& comm) {
        gpu_model m(init_of(comm.rank()));
        cudaStream_t stream = nullptr;
        LOCO_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        staged_final[std::size_t(comm.rank())] = train<gpu_t>(m, comm, stream);
        LOCO_CUDA_CHECK(cudaStreamDestroy(stream));
    });
    for (std::size_t r = 0; r < workers; ++r) {
        CAPTURE(r);
        CHECK(host_final[r] == host_final[0]);  // DiLoCo ends with identical workers
        expect_close(replicas_final[r], host_final[r], 1e-5);
        expect_close(staged_final[r], host_final[r], 1e-5);
    }
    // The run moved the parameters: a comparison of untouched values would prove nothing.
    double moved = 0;
    const auto init = init_of(0);
    for (std::size_t i = 0; i < total; ++i) {
        moved = std::max(moved, static_cast<double>(std::abs(host_final[0][i] - init[i])));
    }
    CHECK(moved > 1e-2);
}

TEST_CASE("dlpack: a kDLCUDA list in the host handle, or a kDLCPU one in the CUDA handle, is "
          "refused") {
    gpu_model g(init_of(0));
    host_model h(init_of(0));
    loco::comm::single one;
    CHECK_THROWS_WITH_AS(host_t(g.list, one), doctest::Contains("cuda"), loco::memory_space_error);
    CHECK_THROWS_WITH_AS(gpu_t(h.list, one), doctest::Contains("the CUDA backend needs cuda tensors"),
                         loco::memory_space_error);
}

}  // namespace cuda_dlpack_cuda_test
