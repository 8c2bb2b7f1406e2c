#pragma once
// Everything loco offers, plus the CUDA layer: loco::cuda::optimizer and loco::cuda::diloco for
// parameters in GPU memory, the fused multi-tensor kernels under them, and the device
// communicators (NCCL when its header is found, and the single-GPU replica simulation).
// Compile translation units that include it with nvcc.

#include <loco/loco.hpp>

#include <loco/backend/cuda/collectives.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/diloco.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/optimizer.hpp>
#include <loco/backend/cuda/table.hpp>

#include <loco/comm/cuda_replicas.hpp>
#include <loco/comm/cuda_staging.hpp>

#if __has_include(<nccl.h>)
#include <loco/comm/nccl.hpp>
#endif
