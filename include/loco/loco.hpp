#pragma once
// Everything loco offers; a host C++20 compiler builds all of it.

#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>
#include <loco/tensor.hpp>

#include <loco/inner/adamw.hpp>
#include <loco/inner/lion.hpp>
#include <loco/inner/muon.hpp>
#include <loco/inner/sgd.hpp>

#include <loco/outer/adam.hpp>
#include <loco/outer/delayed_nesterov.hpp>
#include <loco/outer/nesterov.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/outer/sign_sgd.hpp>

#include <loco/compress/blockwise.hpp>
#include <loco/compress/cast.hpp>
#include <loco/compress/chunking.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/dct.hpp>
#include <loco/compress/demo.hpp>
#include <loco/compress/error_feedback.hpp>
#include <loco/compress/none.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/compress/statistical.hpp>
#include <loco/compress/topk.hpp>
#include <loco/compress/wire.hpp>
#include <loco/exchange.hpp>
#include <loco/schedule/delayed.hpp>
#include <loco/schedule/every.hpp>
#include <loco/schedule/fragment_periods.hpp>
#include <loco/schedule/plan.hpp>
#include <loco/schedule/streaming.hpp>
#include <loco/schedule/proportional.hpp>
#include <loco/schedule/state_periods.hpp>
#include <loco/schedule/wallclock.hpp>
#include <loco/schedule/warmup.hpp>

#include <loco/aggregate/aggregate.hpp>
#include <loco/aggregate/mean.hpp>
#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/aggregate/scatter_mean.hpp>
#include <loco/aggregate/edit.hpp>
#include <loco/aggregate/robust.hpp>
#include <loco/fragments.hpp>

#include <loco/comm/communicator.hpp>
#include <loco/comm/single.hpp>
#include <loco/comm/threads.hpp>

#include <loco/diloco.hpp>
#include <loco/groups.hpp>
#include <loco/optimizer.hpp>
