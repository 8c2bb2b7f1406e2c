#pragma once
// loco::cuda::diloco: loco::diloco for parameters in GPU memory. It is the one handle of
// include/loco/diloco.hpp with the CUDA backend (backend/cuda/diloco_engine.hpp): the same
// configuration, schedules (every, streaming, delayed), aggregation, all-or-nothing syncs,
// fingerprint and checkpoint format, so a checkpoint moves between host and GPU runs. The config
// adds `stream`, where every launch goes (the trainer's compute stream). Construct it from a
// parameter_list of CUDA tensors, or from a backend::cuda::tensor_table (bf16 parameters).

#include <loco/backend/cuda/diloco_engine.hpp>
#include <loco/diloco.hpp>

namespace loco::cuda {

template <class Inner, class Outer, class Compressor = compress::none,
          class Schedule = schedule::every, class Aggregate = aggregate::mean>
using diloco = loco::diloco<Inner, Outer, Compressor, Schedule, Aggregate, cuda_backend>;

}  // namespace loco::cuda
