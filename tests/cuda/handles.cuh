#pragma once
// Three small tensors (5, a 6 x 7 matrix, 1003) with values and gradients on the host or in GPU
// memory, their seeded data, and communicators that wrap another one to corrupt or record what an
// all-gather receives: the setting in which the tests run loco::cuda::diloco against
// loco::diloco on threads (compress_test.cu, topk_test.cu).
#include "../support/forwarding_comm.hpp"
#include "../support/payloads.hpp"
#include "../support/random.hpp"
#include "device.cuh"

#include <loco/backend/cuda/memory.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/compress/wire.hpp>
#include <loco/params.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace loco_test::handles {

namespace lcu = loco::backend::cuda;

constexpr std::size_t sizes[3] = {5, 42, 1003};
constexpr std::size_t total = 5 + 42 + 1003;

inline std::vector<float> init_of(const std::string& label, int rank) {
    auto rng = rng_for(label + "/init/" + std::to_string(rank));
    return normal_floats(rng, total);
}
inline std::vector<float> grads_of(const std::string& label, int rank, int step) {
    auto rng = rng_for(label + "/grad/" + std::to_string(rank) + "/" + std::to_string(step));
    return normal_floats(rng, total, 0.5f);
}

struct gpu_params {
    std::vector<lcu::device_buffer<float>> values, grads;
    loco::parameter_list list;
    explicit gpu_params(const std::vector<float>& init) {
        std::size_t at = 0;
        for (const std::size_t n : sizes) {
            values.emplace_back(n);
            grads.emplace_back(n);
            values.back().upload({init.data() + at, n});
            at += n;
        }
        list.add_views("a", loco::cuda_tensor(values[0].get(), 5),
                       loco::cuda_tensor(static_cast<const float*>(grads[0].get()), 5));
        list.add_views("b", loco::cuda_matrix(values[1].get(), 6, 7),
                       loco::cuda_matrix(static_cast<const float*>(grads[1].get()), 6, 7));
        list.add_views("c", loco::cuda_tensor(values[2].get(), 1003),
                       loco::cuda_tensor(static_cast<const float*>(grads[2].get()), 1003));
    }
    void set_gradients(const std::vector<float>& g, cudaStream_t s) {
        std::size_t at = 0;
        for (std::size_t i = 0; i < 3; ++i) {
            check_cuda(cudaMemcpyAsync(grads[i].get(), g.data() + at, sizes[i] * 4,
                                       cudaMemcpyHostToDevice, s),
                       "gradient upload");
            at += sizes[i];
        }
        check_cuda(cudaStreamSynchronize(s), "gradient upload");
    }
    std::vector<float> host_values(cudaStream_t s) {
        check_cuda(cudaStreamSynchronize(s), "sync");
        std::vector<float> out;
        for (auto& v : values) {
            const auto part = v.download();
            out.insert(out.end(), part.begin(), part.end());
        }
        return out;
    }
};

struct host_params {
    std::vector<float> a, b, c, ga, gb, gc;
    loco::parameter_list list;
    explicit host_params(const std::vector<float>& init)
        : a(init.begin(), init.begin() + 5), b(init.begin() + 5, init.begin() + 47),
          c(init.begin() + 47, init.end()), ga(5), gb(42), gc(1003) {
        list.add("a", a, ga);
        list.add_views("b", loco::host_matrix(b.data(), 6, 7),
                       loco::host_matrix(static_cast<const float*>(gb.data()), 6, 7));
        list.add("c", c, gc);
    }
    void set_gradients(const std::vector<float>& g) {
        std::copy(g.begin(), g.begin() + 5, ga.begin());
        std::copy(g.begin() + 5, g.begin() + 47, gb.begin());
        std::copy(g.begin() + 47, g.end(), gc.begin());
    }
    std::vector<float> values() const {
        std::vector<float> out = a;
        out.insert(out.end(), b.begin(), b.end());
        out.insert(out.end(), c.begin(), c.end());
        return out;
    }
};

// What a rank's handle holds at the end of a run, to compare a GPU run with the host's.
struct handle_result {
    std::vector<float> params, global, momentum;  // flat; momentum: the outer state's array 0
    std::uint64_t outer_steps = 0, skipped = 0, bytes = 0;
    bool device_exchange = false;  // CUDA handles only
};

// Read from a host or CUDA handle, with the parameters' values.
template <class Handle>
handle_result result_of(const Handle& opt, std::vector<float> params) {
    handle_result out;
    out.params = std::move(params);
    const auto g = opt.global();
    out.global.assign(g.begin(), g.end());
    const auto mo = opt.outer_state(0);
    out.momentum.assign(mo.begin(), mo.end());
    out.outer_steps = opt.outer_steps();
    out.skipped = opt.skipped_syncs();
    out.bytes = opt.bytes_per_sync();
    if constexpr (requires { opt.device_exchange(); }) {
        out.device_exchange = opt.device_exchange();
    }
    return out;
}

// A device communicator that flips one byte of what an all-gather received, when armed; with
// reseal_stride (the payload size), it then rewrites that payload's checksum, so that only the
// compressor's own format checks can refuse it.
class corrupting final : public loco_test::forwarding_comm {
public:
    explicit corrupting(loco::comm::communicator& inner) : forwarding_comm(inner, "corrupting") {}
    std::size_t armed_at = 0;  // byte of the receive buffer to flip; 0: none
    std::size_t reseal_stride = 0;

protected:
    void do_all_gather(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        forwarding_comm::do_all_gather(send, recv);
        if (armed_at != 0) {
            std::byte b{};
            check_cuda(cudaMemcpy(&b, recv.data + armed_at, 1, cudaMemcpyDeviceToHost), "peek");
            b ^= std::byte{0x04};
            check_cuda(cudaMemcpy(recv.data + armed_at, &b, 1, cudaMemcpyHostToDevice), "poke");
            if (reseal_stride != 0) {
                std::byte* at = recv.data + armed_at / reseal_stride * reseal_stride;
                std::vector<std::byte> p(reseal_stride);
                check_cuda(cudaMemcpy(p.data(), at, p.size(), cudaMemcpyDeviceToHost), "peek");
                reseal(p);
                check_cuda(cudaMemcpy(at, p.data(), p.size(), cudaMemcpyHostToDevice), "reseal");
            }
        }
    }
};

// With `comm` armed: the next sync fails on this rank with `message` and changes nothing (the
// parameters, global values, outer state and compressor state stay as they were); disarmed, the
// same round then goes through and moves the compressor state.
template <class Handle>
void expect_refused_then_intact(Handle& opt, gpu_params& m, corrupting& comm, cudaStream_t s,
                                const std::string& message) {
    const auto values = m.host_values(s);
    const auto global = opt.global();
    constexpr bool outer_state = Handle::outer_policy::state_size > 0;  // outer SGD keeps none
    std::vector<float> outer;
    if constexpr (outer_state) outer = opt.outer_state(0);
    const auto state = opt.compressor_state();
    const std::uint64_t steps = opt.outer_steps();
    CHECK_THROWS_WITH_AS(opt.sync(), doctest::Contains(message.c_str()), loco::wire_error);
    CHECK(m.host_values(s) == values);
    CHECK(opt.global() == global);
    if constexpr (outer_state) CHECK(opt.outer_state(0) == outer);
    CHECK(opt.compressor_state() == state);
    CHECK(opt.outer_steps() == steps);
    comm.armed_at = 0;
    opt.sync();  // the same round again, now intact
    CHECK(opt.outer_steps() == steps + 1);
    CHECK(opt.compressor_state() != state);
}

// A communicator that keeps a host copy of everything its all-gathers received, in order.
class recording final : public loco_test::forwarding_comm {
public:
    explicit recording(loco::comm::communicator& inner) : forwarding_comm(inner, "recording") {}
    std::vector<std::vector<std::byte>> gathered;

protected:
    void do_all_gather(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        forwarding_comm::do_all_gather(send, recv);
        std::vector<std::byte> copy(recv.size);
        if (recv.space == loco::memory_space::cuda) {
            check_cuda(cudaMemcpy(copy.data(), recv.data, recv.size, cudaMemcpyDeviceToHost),
                       "download");
        } else {
            std::copy(recv.data, recv.data + recv.size, copy.begin());
        }
        gathered.push_back(std::move(copy));
    }
};

}  // namespace loco_test::handles
