#pragma once
// The arrays an outer step of the kernel tests works on, set up from a device model's values:
// the fp32 masters gathered from the values, the padded global values, a zero outer state, an
// average buffer and Nesterov's hyper-parameters (lr 0.7, momentum 0.9) in device memory. The
// fused decode-and-apply tests (compress_support.cuh, topk_test.cu) start each run from these.
#include "device.cuh"
#include "model.cuh"

#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/outer/nesterov.hpp>

namespace loco_test {

struct outer_arrays {
    outer_arrays(device_model& m, const loco::backend::cuda::tensor_table& table)
        : global(table.padded_elements()),
          state(table.padded_elements()),
          master(table.master_elements()),
          avg(table.padded_elements()),
          control(loco::outer::nesterov::hyper{0.7f, 0.9f}) {
        m.upload_values();
        loco::backend::cuda::init_master(table, master.get(), nullptr);
        loco::backend::cuda::gather_values(table, master.get(), global.get(), nullptr);
        state.zero(nullptr);
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    }

    loco::backend::cuda::device_buffer<float> global, state, master, avg;
    loco::backend::cuda::device_control<loco::outer::nesterov::hyper> control;
};

}  // namespace loco_test
