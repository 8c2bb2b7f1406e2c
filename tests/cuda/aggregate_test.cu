// The aggregation policies on the CUDA backend's device path (include/loco/backend/cuda/
// aggregate.hpp): every worker's pseudo-gradient all-gathered in device memory and aggregated by
// kernels. Each policy's syncs give the host handle's numbers on threads, on fresh random data
// with an outlier (a worker whose parameters jumped by +500 before a sync) and a worker whose
// delta holds a NaN; a round where every worker sends NaN is refused on every rank with nothing
// changed; a checkpoint carries the aggregation state between the backends.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"
#include "model.cuh"
#include "schedule_cases.cuh"

#include <loco/aggregate/edit.hpp>
#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/aggregate/robust.hpp>
#include <loco/cuda.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_aggregate_test {

namespace {

using namespace loco_test;
using namespace loco_test::handles;
namespace la = loco::aggregate;
namespace ls = loco::schedule;
namespace cz = loco::compress;

using inner = loco::inner::adamw;
using outer = loco::outer::nesterov;

// EDiT without norm weighting or clipping: the outlier would move the global values unless the
// detector rejects it.
struct edit_linear {
    using policy = la::edit;
    static constexpr const char* name = "edit linear";
    static constexpr bool nan_skips = false;
    static la::edit::hyper hyper() {
        la::edit::hyper h;
        h.weight_by_norm = false;
        h.ewma_alpha = 0.5f;
        h.ewma_warmup = 3;
        h.ewma_threshold = 6.0f;
        h.consensus = la::sign_consensus::none;
        return h;
    }
};
// EDiT with softmax weights, GTA "count", A-EDiT's step weights and a clip that binds (the
// aggregate's norm is about 0.1).
struct edit_gta {
    using policy = la::edit;
    static constexpr const char* name = "edit gta";
    static constexpr bool nan_skips = false;
    static la::edit::hyper hyper() {
        la::edit::hyper h;
        h.temperature = 0.05f;
        h.ewma_alpha = 0.5f;
        h.ewma_warmup = 3;
        h.ewma_threshold = 6.0f;
        h.consensus = la::sign_consensus::count;
        h.step_weights = true;
        h.clip = 0.02f;
        return h;
    }
};
// EDiT per tensor (issue 14's "per layer or per tensor"): each tensor weighted on its own, with a
// detector per worker and tensor (the device path ran the fragment rule for it, and a host
// checkpoint's M x T detectors were cut to M).
struct edit_tensor {
    using policy = la::edit;
    static constexpr const char* name = "edit per tensor";
    static constexpr bool nan_skips = false;
    static la::edit::hyper hyper() {
        la::edit::hyper h = edit_gta::hyper();
        h.step_weights = false;
        h.scope = la::edit_scope::tensor;
        return h;
    }
};
// EDiT without the detector: only a non-finite norm or delta leaves a worker out.
struct edit_no_detector {
    using policy = la::edit;
    static la::edit::hyper hyper() {
        la::edit::hyper h = edit_linear::hyper();
        h.skip_anomaly = false;
        return h;
    }
};
struct trimmed {
    using policy = la::trimmed_mean;
    static constexpr const char* name = "trimmed_mean";
    static constexpr bool nan_skips = false;
    static la::trimmed_mean::hyper hyper() { return {.trim = 1}; }
};
struct median {
    using policy = la::median;
    static constexpr const char* name = "median";
    static constexpr bool nan_skips = false;
    static la::median::hyper hyper() { return {}; }
};
// SparseLoCo's rule without a compressor: each worker's tensor scaled to the median norm. A NaN
// worker makes every median NaN: that sync is skipped (nonfinite_policy::skip), not refused.
struct median_norm {
    using policy = la::median_norm_clip;
    static constexpr const char* name = "median_norm_clip";
    static constexpr bool nan_skips = true;
    static la::median_norm_clip::hyper hyper() { return {}; }
};
// tau below the workers' distance from the center, so the clip binds; three iterations.
struct centered {
    using policy = la::centered_clip;
    static constexpr const char* name = "centered_clip";
    static constexpr bool nan_skips = false;
    static la::centered_clip::hyper hyper() { return {.tau = 0.1f, .iterations = 3}; }
};
// tau far below the workers' distance from the center: each round moves v by about tau, so the
// next round's aggregate depends on where v started (the last applied round's aggregate).
struct centered_tight {
    using policy = la::centered_clip;
    static constexpr const char* name = "centered_clip tight";
    static la::centered_clip::hyper hyper() { return {.tau = 1e-3f, .iterations = 1}; }
};

constexpr int steps = 11;  // syncs after steps 2, 4, 6, 8, 10 (every 2)

template <class Schedule>
struct schedule_case;
template <>
struct schedule_case<ls::every> : whole_model_every<ls::every, 2> {};
template <>
struct schedule_case<ls::streaming> : two_fragment_streaming {};

// What happens to a rank's parameters before step t: with `faults`, the outlier (rank 1 before the
// sync of step 8, when every detector has seen 3 norms) and a NaN (rank 2 before the sync of step
// 4); with `all_nan`, a NaN on every rank before step 4 (a round every rule refuses); with
// `overflow`, one value of rank 1 raised by 1e5 before the sync of step 8.
enum class poke { none, offset, nan, overflow };
enum class scenario { faults, all_nan, clean, overflow };
poke poke_at(int rank, int t, scenario sc) {
    if (sc == scenario::clean) return poke::none;
    if (sc == scenario::overflow) return rank == 1 && t == 8 ? poke::overflow : poke::none;
    if (sc == scenario::all_nan) return t == 4 ? poke::nan : poke::none;
    if (rank == 1 && t == 8) return poke::offset;
    if (rank == 2 && t == 4) return poke::nan;
    return poke::none;
}
void apply_poke(std::vector<float>& v, poke p) {
    if (p == poke::offset) {
        for (auto& x : v) x += 500.0f;
    } else if (p == poke::nan) {
        v[7] = std::numeric_limits<float>::quiet_NaN();
    } else if (p == poke::overflow) {
        v[3] += 1e5f;  // beyond fp16's 65504: that element of the delta is sent as -inf
    }
}

void poke_host(host_params& m, poke p) {
    if (p == poke::none) return;
    std::vector<float> v = m.values();
    apply_poke(v, p);
    std::copy(v.begin(), v.begin() + 5, m.a.begin());
    std::copy(v.begin() + 5, v.begin() + 47, m.b.begin());
    std::copy(v.begin() + 47, v.end(), m.c.begin());
}

void poke_gpu(gpu_params& m, poke p, cudaStream_t s) {
    if (p == poke::none) return;
    std::vector<float> v = m.host_values(s);
    apply_poke(v, p);
    std::size_t at = 0;
    for (std::size_t i = 0; i < 3; ++i) {
        m.values[i].upload({v.data() + at, sizes[i]});
        at += sizes[i];
    }
}

struct rank_result : handle_result {
    std::uint64_t expected_device_bytes = 0;
};

template <class Case, class Schedule, class Compressor = cz::none>
using host_handle = loco::diloco<inner, outer, Compressor, Schedule, typename Case::policy>;
template <class Case, class Schedule, class Compressor = cz::none>
using gpu_handle = loco::cuda::diloco<inner, outer, Compressor, Schedule, typename Case::policy>;

template <class Handle, class Case, class Schedule>
typename Handle::config config_of() {
    typename Handle::config c;
    c.inner = {.lr = 3e-3f};
    c.schedule = schedule_case<Schedule>::hyper();
    c.fragments = schedule_case<Schedule>::layout();
    c.aggregate = Case::hyper();
    return c;
}

template <class Case, class Schedule = ls::every, class Compressor = cz::none>
typename host_handle<Case, Schedule, Compressor>::config host_config() {
    return config_of<host_handle<Case, Schedule, Compressor>, Case, Schedule>();
}

template <class Case, class Schedule = ls::every, class Compressor = cz::none>
typename gpu_handle<Case, Schedule, Compressor>::config gpu_config(cudaStream_t stream) {
    auto c = config_of<gpu_handle<Case, Schedule, Compressor>, Case, Schedule>();
    c.stream = stream;
    return c;
}

template <class Case, class Schedule, class Compressor>
rank_result host_rank(const std::string& label, loco::comm::communicator& comm, scenario sc) {
    using host_t = host_handle<Case, Schedule, Compressor>;
    host_params m(init_of(label, comm.rank()));
    host_t opt(m.list, comm, host_config<Case, Schedule, Compressor>());
    for (int t = 1; t <= steps; ++t) {
        poke_host(m, poke_at(comm.rank(), t, sc));
        m.set_gradients(grads_of(label, comm.rank(), t));
        opt.step();
    }
    return {result_of(opt, m.values())};
}

template <class Case, class Schedule, class Compressor = cz::none>
rank_result gpu_rank(const std::string& label, loco::comm::communicator& comm,
                     cudaStream_t stream, scenario sc) {
    using gpu_t = gpu_handle<Case, Schedule, Compressor>;
    gpu_params m(init_of(label, comm.rank()));
    gpu_t opt(m.list, comm, gpu_config<Case, Schedule, Compressor>(stream));
    for (int t = 1; t <= steps; ++t) {
        poke_gpu(m, poke_at(comm.rank(), t, sc), stream);
        m.set_gradients(grads_of(label, comm.rank(), t), stream);
        opt.step();
    }
    rank_result out{result_of(opt, m.host_values(stream))};
    // The device path's bytes: M - 1 padded fp32 rows (and the reports), plus the agreement.
    // (A fragment's padded size is its tensors' sizes rounded up to 8.)
    const std::uint64_t mm = static_cast<std::uint64_t>(comm.size());
    for (const auto& names : schedule_case<Schedule>::layout().names.empty()
                                 ? std::vector<std::vector<std::string>>{{"a", "b", "c"}}
                                 : schedule_case<Schedule>::layout().names) {
        std::uint64_t padded = 0;
        for (const auto& name : names) {
            const std::size_t k = name == "a" ? 0 : name == "b" ? 1 : 2;
            padded += (sizes[k] + 7) / 8 * 8;
        }
        out.expected_device_bytes += (mm - 1) * 4 * padded +
                                     (Case::policy::needs_reports ? (mm - 1) * 8 : 0) +
                                     opt.agreement_bytes_per_sync();
    }
    return out;
}

template <class Case, class Schedule = ls::every, class Compressor = cz::none>
std::vector<rank_result> host_run(const std::string& label, int m, scenario sc) {
    std::vector<rank_result> out(static_cast<std::size_t>(m));
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        out[static_cast<std::size_t>(comm.rank())] =
            host_rank<Case, Schedule, Compressor>(label, comm, sc);
    });
    return out;
}

template <class Case, class Schedule = ls::every, class Compressor = cz::none>
std::vector<rank_result> replicas_run(const std::string& label, int m, scenario sc) {
    std::vector<rank_result> out(static_cast<std::size_t>(m));
    loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
        out[static_cast<std::size_t>(comm.rank())] =
            gpu_rank<Case, Schedule, Compressor>(label, comm, comm.stream(), sc);
    });
    return out;
}

// fp32 tolerance: the kernels run the host's per-element rules, but the norms sum as a tree
// (double) where the host sums in element order, which can move a norm, and with it a weight or
// a clip scale, by an fp32 rounding.
constexpr double tolerance = 1e-5;

// compressed: the fused path's payloads (the host's bytes), else fp32 rows of the padded layout.
void expect_same_run(const std::vector<rank_result>& gpu, const std::vector<rank_result>& host,
                     bool compressed = false, double tol = tolerance) {
    REQUIRE(gpu.size() == host.size());
    for (std::size_t r = 0; r < gpu.size(); ++r) {
        CAPTURE(r);
        CHECK(gpu[r].outer_steps == host[r].outer_steps);
        CHECK(gpu[r].skipped == host[r].skipped);
        // The device path was taken.
        if (compressed) {
            CHECK(gpu[r].device_exchange);
            CHECK(gpu[r].bytes == host[r].bytes);
        } else {
            CHECK(gpu[r].bytes == gpu[r].expected_device_bytes);
        }
        expect_close_arrays(gpu[r].params, host[r].params, tol, "parameters");
        expect_close_arrays(gpu[r].global, host[r].global, tol, "global values");
        expect_close_arrays(gpu[r].momentum, host[r].momentum, tol, "outer momentum");
        expect_equal_arrays(gpu[r].global, gpu[0].global, "the ranks' global values");
    }
}

// The outlier did not steer the aggregate: the mean would have moved every global value by about
// 0.7 * 500 / M (nesterov's lr 0.7), far beyond the initial N(0, 1) values.
void expect_outlier_rejected(const std::vector<rank_result>& run) {
    for (const auto& r : run) {
        double worst = 0.0;
        for (const float x : r.global) worst = std::max(worst, double(std::abs(x)));
        CHECK(std::isfinite(worst));
        CHECK(worst < 8.0);
    }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda device aggregation: the host handle's numbers with an outlier and a NaN "
                   "worker",
                   Case, edit_linear, edit_gta, edit_tensor, trimmed, median, centered,
                   median_norm) {
    const std::string label = std::string("device aggregate ") + Case::name;
    const int m = 4;
    const auto gpu = replicas_run<Case>(label, m, scenario::faults);
    const auto host = host_run<Case>(label, m, scenario::faults);
    expect_same_run(gpu, host);
    // Every sync applied: the NaN worker and the outlier were left out, not the round (but for
    // median_norm_clip, whose NaN sync is skipped).
    CHECK(gpu[0].outer_steps == (Case::nan_skips ? 4 : 5));
    CHECK(gpu[0].skipped == (Case::nan_skips ? 1 : 0));
    expect_outlier_rejected(gpu);
}

TEST_CASE_TEMPLATE("cuda device aggregation: a round where every worker sends NaN is refused on "
                   "every rank and changes nothing",
                   Case, edit_linear, trimmed, median, centered, centered_tight) {
    using gpu_t = gpu_handle<Case, ls::every>;
    const std::string label = std::string("device aggregate refusal ") + Case::name;
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& comm) {
        gpu_params m(init_of(label, comm.rank()));
        gpu_t opt(m.list, comm, gpu_config<Case>(comm.stream()));
        for (int t = 1; t <= 2; ++t) {
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
        }
        REQUIRE(opt.outer_steps() == 1);
        const auto global_before = opt.global();
        const auto momentum_before = opt.outer_state(0);
        m.set_gradients(grads_of(label, comm.rank(), 3), comm.stream());
        opt.step();
        poke_gpu(m, poke::nan, comm.stream());
        m.set_gradients(grads_of(label, comm.rank(), 4), comm.stream());
        opt.step();  // the sync: every worker's delta holds a NaN
        CHECK(opt.outer_steps() == 1);
        CHECK(opt.skipped_syncs() == 1);
        expect_equal_arrays(opt.global(), global_before, "global values");
        expect_equal_arrays(opt.outer_state(0), momentum_before, "outer momentum");
        // The local values went back to the global ones.
        expect_equal_arrays(m.host_values(comm.stream()), global_before, "parameters");
        // The next round goes on as usual.
        for (int t = 5; t <= 6; ++t) {
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
        }
        CHECK(opt.outer_steps() == 2);
    });
    // The host handle refuses the same round.
    const auto host = host_run<Case>(label + " host", 3, scenario::all_nan);
    const auto gpu = replicas_run<Case>(label + " host", 3, scenario::all_nan);
    expect_same_run(gpu, host);
    CHECK(gpu[0].skipped == 1);
}

TEST_CASE_TEMPLATE("cuda device aggregation: the aggregation state travels in the checkpoint",
                   Case, edit_linear, edit_tensor, centered) {
    using gpu_t = gpu_handle<Case, ls::every>;
    using host_t = host_handle<Case, ls::every>;
    const std::string label = std::string("device aggregate checkpoint ") + Case::name;
    // After three syncs: the detectors have seen 3 norms each (the warm-up), so the outlier of
    // step 8 is rejected only if they survive the checkpoint; the center holds the last aggregate.
    constexpr int save_after = 6;
    std::vector<std::string> saved(3);
    std::vector<std::vector<float>> at_save(3), straight(3), resumed(3), host_resumed(3);
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        gpu_params m(init_of(label, comm.rank()));
        gpu_t opt(m.list, comm, gpu_config<Case>(comm.stream()));
        for (int t = 1; t <= steps; ++t) {
            poke_gpu(m, poke_at(comm.rank(), t, scenario::faults), comm.stream());
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
            if (t == save_after) {
                std::ostringstream os;
                opt.save(os);
                saved[r] = os.str();
                at_save[r] = m.host_values(comm.stream());
            }
        }
        straight[r] = m.host_values(comm.stream());
    });
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        gpu_params m(at_save[r]);
        gpu_t opt(m.list, comm, gpu_config<Case>(comm.stream()));
        std::istringstream is(saved[r]);
        opt.load(is);
        for (int t = save_after + 1; t <= steps; ++t) {
            poke_gpu(m, poke_at(comm.rank(), t, scenario::faults), comm.stream());
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
        }
        resumed[r] = m.host_values(comm.stream());
    });
    loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        host_params m(at_save[r]);
        host_t opt(m.list, comm, host_config<Case>());
        std::istringstream is(saved[r]);
        opt.load(is);
        for (int t = save_after + 1; t <= steps; ++t) {
            poke_host(m, poke_at(comm.rank(), t, scenario::faults));
            m.set_gradients(grads_of(label, comm.rank(), t));
            opt.step();
        }
        host_resumed[r] = m.values();
    });
    // And the reverse: a host run's checkpoint, resumed on the GPU.
    std::vector<std::string> host_saved(3);
    std::vector<std::vector<float>> host_at_save(3), host_straight(3), gpu_from_host(3);
    loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        host_params m(init_of(label, comm.rank()));
        host_t opt(m.list, comm, host_config<Case>());
        for (int t = 1; t <= steps; ++t) {
            poke_host(m, poke_at(comm.rank(), t, scenario::faults));
            m.set_gradients(grads_of(label, comm.rank(), t));
            opt.step();
            if (t == save_after) {
                std::ostringstream os;
                opt.save(os);
                host_saved[r] = os.str();
                host_at_save[r] = m.values();
            }
        }
        host_straight[r] = m.values();
    });
    loco::comm::run_replicas(3, [&](loco::comm::cuda_replicas& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        gpu_params m(host_at_save[r]);
        gpu_t opt(m.list, comm, gpu_config<Case>(comm.stream()));
        std::istringstream is(host_saved[r]);
        opt.load(is);
        for (int t = save_after + 1; t <= steps; ++t) {
            poke_gpu(m, poke_at(comm.rank(), t, scenario::faults), comm.stream());
            m.set_gradients(grads_of(label, comm.rank(), t), comm.stream());
            opt.step();
        }
        gpu_from_host[r] = m.host_values(comm.stream());
    });
    for (std::size_t r = 0; r < 3; ++r) {
        CAPTURE(r);
        expect_equal_arrays(resumed[r], straight[r], "resumed GPU run");
        expect_close_arrays(host_resumed[r], straight[r], tolerance,
                            "host run from the GPU checkpoint");
        expect_close_arrays(gpu_from_host[r], host_straight[r], tolerance,
                            "GPU run from the host checkpoint");
    }
}

// With a compressor: the fused path's 2-bit payloads (with error feedback) all-gathered on the
// device, each decoded into its row. 1e-4 as for the fused mean (tests/cuda/pipeline_test.cu): a
// pseudo-gradient a rounding away from a code boundary may take the neighbouring code.
TEST_CASE_TEMPLATE("cuda device aggregation: compressed payloads give the host handle's numbers",
                   Case, edit_gta, edit_tensor, trimmed, median, centered, median_norm) {
    using ef = cz::error_feedback<cz::blockwise<2, 256>>;
    const std::string label = std::string("device aggregate compressed ") + Case::name;
    const int m = 4;
    const auto gpu = replicas_run<Case, ls::every, ef>(label, m, scenario::faults);
    const auto host = host_run<Case, ls::every, ef>(label, m, scenario::faults);
    expect_same_run(gpu, host, true, 1e-4);
    // The NaN does not stay in its worker's error-feedback residual: a robust rule leaves that
    // worker out of the one sync and it keeps its residual; median_norm_clip skips that sync
    // (each tensor's median is NaN), committing nothing, and applies the later ones.
    CHECK(gpu[0].outer_steps == (Case::nan_skips ? 4 : 5));
    expect_outlier_rejected(gpu);
}

// EDiT's fragment scope weighs a worker by its report, the norm before compression: a delta whose
// element a cast to fp16 overflows to inf (|x| >= 65520) still reports a finite norm. On the device
// as on the host such a worker is an outlier (its decoded row is not finite), not weighted into an
// infinite aggregate that drops the sync.
TEST_CASE("cuda device aggregation: edit leaves out a worker whose fp16 payload overflowed, as the "
          "host") {
    using c16 = cz::cast<loco::fp16>;
    const std::string label = "device aggregate fp16 overflow";
    const auto gpu = replicas_run<edit_no_detector, ls::every, c16>(label, 4, scenario::overflow);
    const auto host = host_run<edit_no_detector, ls::every, c16>(label, 4, scenario::overflow);
    expect_same_run(gpu, host, true);
    CHECK(gpu[0].outer_steps == 5);
    CHECK(gpu[0].skipped == 0);
    CHECK(host[0].outer_steps == 5);
}

// Streaming: two fragments, each exchange in flight over an inner step (its pseudo-gradient kept
// on the device meanwhile), local values merged with alpha 0.5.
TEST_CASE_TEMPLATE("cuda device aggregation: streaming fragments give the host handle's numbers",
                   Case, edit_gta, trimmed, centered, median_norm) {
    const std::string label = std::string("device aggregate streaming ") + Case::name;
    const auto gpu = replicas_run<Case, ls::streaming>(label, 3, scenario::clean);
    const auto host = host_run<Case, ls::streaming>(label, 3, scenario::clean);
    expect_same_run(gpu, host);
    CHECK(gpu[0].outer_steps > 0);
}

#if defined(LOCO_TEST_NCCL)

// comm::nccl, one rank per GPU (three emulated GPUs in CTest's cuda_emulated).
TEST_CASE_TEMPLATE("cuda device aggregation over nccl: the threads run's numbers", Case,
                   edit_linear, median, centered, median_norm) {
    int devices = 0;
    check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    if (devices < 3) {
        MESSAGE("SKIPPED: needs 3 GPUs (one NCCL rank per GPU); this machine has " << devices);
        return;
    }
    const int m = 3;
    const std::string label = std::string("device aggregate nccl ") + Case::name;
    std::vector<rank_result> gpu(static_cast<std::size_t>(m));
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    std::mutex mutex;
    std::vector<std::thread> ranks;
    for (int r = 0; r < m; ++r) {
        ranks.emplace_back([&, r] {
            try {
                check_cuda(cudaSetDevice(r), "cudaSetDevice");
                auto comm = loco::comm::nccl::create(m, r, id, nullptr, {});
                gpu[std::size_t(r)] =
                    gpu_rank<Case, ls::every>(label, *comm, nullptr, scenario::faults);
            } catch (const std::exception& err) {
                std::lock_guard<std::mutex> lock(mutex);
                FAIL_CHECK("rank " << r << ": " << err.what());
            }
        });
    }
    for (auto& t : ranks) t.join();
    expect_same_run(gpu, host_run<Case>(label, m, scenario::faults));
    expect_outlier_rejected(gpu);
}

#endif  // LOCO_TEST_NCCL

}  // namespace cuda_aggregate_test
