// The outer phases of a sync on the device against the host computation, and a whole DiLoCo run
// on M replicas of one GPU (comm::cuda_replicas) against the algorithm computed on the host.
//
// Tolerances: phase 1 (one subtraction) and every copy are exact. Phase 2 differs from the host
// only by contractions (relative 1e-5 of the array's scale); the values written back are the
// device's own new global values, bit for bit (bf16: rounded to nearest).
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "device.cuh"
#include "handles.cuh"
#include "model.cuh"

#include <loco/cuda.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_outer_test {

namespace {

using namespace loco_test;
namespace lc = loco::backend::cuda;
using lc::dtype;

// The parameters' authoritative values as the outer phases read them: masters of bf16 values
// under bf16_update::master, the values themselves otherwise.
std::vector<float> local_values(const device_model& m, const std::vector<float>& masters,
                                lc::bf16_update mode) {
    std::vector<float> out = m.values();
    m.for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t off) {
        if (s.value == dtype::bf16 && mode == lc::bf16_update::master) {
            std::copy_n(masters.begin() + long(off), s.size, out.begin() + long(off));
        }
    });
    return out;
}

// Masters that differ from the bf16 values (so a kernel reading the wrong one is caught).
std::vector<float> random_masters(std::mt19937_64& rng, const device_model& m) {
    auto masters = normal_floats(rng, m.total());
    m.for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t off) {
        if (s.value != dtype::bf16) {
            std::fill_n(masters.begin() + long(off), s.size, 0.0f);
        }
    });
    return masters;
}

std::size_t nonzero_padding(const lc::tensor_table& table, const std::vector<float>& padded,
                            std::size_t arrays = 1) {
    std::size_t bad = 0;
    for (std::size_t j = 0; j < arrays; ++j) {
        for (std::size_t i = 0; i < table.size(); ++i) {
            const std::size_t n = table.spec(i).size;
            for (std::size_t e = n; e < lc::padded_size(n); ++e) {
                bad += padded[j * table.padded_elements() + table.padded_offset(i) + e] != 0.0f;
            }
        }
    }
    return bad;
}

template <lc::bf16_update Mode, class Pick>
void check_delta(const char* label, Pick&& pick) {
    INFO("case: " << label);
    auto rng = rng_for(std::string("outer delta/") + label);
    device_model m(awkward_shapes(rng, 500, pick));
    m.randomize_values(rng);
    const lc::tensor_table table = m.table(false);  // the outer phases need no gradients
    const auto masters = random_masters(rng, m);
    lc::device_buffer<float> master(table.master_elements());
    lc::master_from_flat(table, masters, master.get());
    const auto global = normal_floats(rng, m.total());
    lc::device_buffer<float> global_dev(table.padded_elements());
    lc::from_flat<float>(table, global, global_dev.get());
    lc::device_buffer<float> delta(table.padded_elements());
    check_cuda(cudaMemset(delta.get(), 0xff, delta.size_bytes()), "poison delta with NaN");

    lc::outer_delta<Mode>(table, global_dev.get(), master.get(), delta.get(), nullptr);
    const auto local = local_values(m, masters, Mode);
    std::vector<float> want(m.total());
    for (std::size_t i = 0; i < want.size(); ++i) {
        want[i] = global[i] - local[i];
    }
    expect_equal_arrays(lc::to_flat(table, delta.get()), want, "delta = global - local");
    CHECK(nonzero_padding(table, delta.download()) == 0);

    // gather_values: the snapshot of the local values, same layout.
    check_cuda(cudaMemset(delta.get(), 0xff, delta.size_bytes()), "poison with NaN");
    lc::gather_values<Mode>(table, master.get(), delta.get(), nullptr);
    expect_equal_arrays(lc::to_flat(table, delta.get()), local, "gather_values");
    CHECK(nonzero_padding(table, delta.download()) == 0);
    CHECK(m.gaps_untouched());
}

template <class Outer, lc::bf16_update Mode, class Pick>
void check_outer_apply(const char* label, const typename Outer::hyper& h, Pick&& pick) {
    INFO("case: " << label);
    constexpr std::size_t S = static_cast<std::size_t>(Outer::state_size);
    auto rng = rng_for(std::string("outer apply/") + label);
    device_model m(awkward_shapes(rng, 500, pick));
    m.randomize_values(rng);
    const lc::tensor_table table = m.table();
    const std::size_t total = m.total();
    const std::size_t padded = table.padded_elements();

    auto global = normal_floats(rng, total);
    std::vector<float> state(S * total, 0.0f);
    lc::device_buffer<float> global_dev(padded), delta_dev(padded), state_dev(S * padded),
        master(table.master_elements());
    lc::from_flat<float>(table, global, global_dev.get());
    state_dev.zero();
    lc::init_master(table, master.get(), nullptr);
    lc::device_control<typename Outer::hyper> control(h);

    const auto check_written_back = [&](const std::vector<float>& dev_global, const char* when) {
        INFO(when);
        // Values: the device's global rounded to each tensor's dtype; masters: the global itself.
        const auto values = m.download_values();
        const auto masters = lc::master_to_flat(table, master.get());
        std::vector<float> want_values(total), got_masters, want_masters;
        m.for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t off) {
            for (std::size_t e = 0; e < s.size; ++e) {
                want_values[off + e] = round_to(s.value, dev_global[off + e]);
                if (s.value == dtype::bf16 && Mode == lc::bf16_update::master) {
                    got_masters.push_back(masters[off + e]);
                    want_masters.push_back(dev_global[off + e]);
                }
            }
        });
        expect_equal_arrays(values, want_values, "values written back");
        expect_equal_arrays(got_masters, want_masters, "masters written back");
    };

    for (std::uint64_t t = 1; t <= 2; ++t) {
        const auto delta = normal_floats(rng, total, 0.05f);
        lc::from_flat<float>(table, delta, delta_dev.get());
        lc::check_padded(table, delta_dev.get(), control.control(), nullptr);
        lc::outer_apply<Outer, Mode>(table, global_dev.get(), delta_dev.get(), state_dev.get(),
                                     master.get(), control.hyper(), control.control(), true,
                                     nullptr);
        const auto k = Outer::prepare(h, t);
        loco::backend::host::apply<Outer>(k, global.data(), delta.data(), state.data(), total,
                                          total);
    }
    auto c = control.read(nullptr);
    CHECK(c.steps == 2);
    CHECK(c.skipped == 0);
    const auto dev_global = lc::to_flat(table, global_dev.get());
    expect_close_arrays(dev_global, global, 1e-5, "global after two outer steps");
    if (S != 0) {
        expect_close_arrays(lc::to_flat(table, state_dev.get(), S), state, 1e-5, "outer state");
    }
    check_written_back(dev_global, "after two outer steps");
    CHECK(nonzero_padding(table, global_dev.download()) == 0);
    CHECK(nonzero_padding(table, state_dev.download(), S) == 0);

    // A non-finite average: nothing changes but the parameters, which get the global values back
    // (the local progress of the round is discarded, as the host diloco does).
    m.randomize_values(rng);
    const auto state_before = lc::to_flat(table, state_dev.get(), S);
    auto delta = normal_floats(rng, total, 0.05f);
    delta[total / 2] = std::nanf("");
    lc::from_flat<float>(table, delta, delta_dev.get());
    lc::check_padded(table, delta_dev.get(), control.control(), nullptr);
    c = control.read(nullptr);
    CHECK(c.first_nonfinite == total / 2);
    lc::outer_apply<Outer, Mode>(table, global_dev.get(), delta_dev.get(), state_dev.get(),
                                 master.get(), control.hyper(), control.control(), true, nullptr);
    c = control.read(nullptr);
    CHECK(c.steps == 2);
    CHECK(c.skipped == 1);
    CHECK(c.first_nonfinite == lc::no_nonfinite);
    expect_equal_arrays(lc::to_flat(table, global_dev.get()), dev_global, "global after a skip");
    expect_equal_arrays(lc::to_flat(table, state_dev.get(), S), state_before,
                        "outer state after a skip");
    check_written_back(dev_global, "after a skipped outer step");

    // The next outer step is the third: a skipped one does not count (the step Adam's bias
    // correction uses).
    delta = normal_floats(rng, total, 0.05f);
    lc::from_flat<float>(table, delta, delta_dev.get());
    lc::check_padded(table, delta_dev.get(), control.control(), nullptr);
    lc::outer_apply<Outer, Mode>(table, global_dev.get(), delta_dev.get(), state_dev.get(),
                                 master.get(), control.hyper(), control.control(), true, nullptr);
    loco::backend::host::apply<Outer>(Outer::prepare(h, 3), global.data(), delta.data(),
                                      state.data(), total, total);
    c = control.read(nullptr);
    CHECK(c.steps == 3);
    CHECK(c.skipped == 1);
    expect_close_arrays(lc::to_flat(table, global_dev.get()), global, 1e-5,
                        "global after the step that follows a skip");
    CHECK(m.gaps_untouched());
}

}  // namespace

TEST_CASE("outer phase 1: delta = global - local over the padded layout") {
    check_delta<lc::bf16_update::master>("fp32", all_f32);
    check_delta<lc::bf16_update::master>("bf16 with masters", all_bf16);
    check_delta<lc::bf16_update::stochastic>("bf16 without masters", all_bf16);
    check_delta<lc::bf16_update::master>("mixed", mixed_dtypes);
}

TEST_CASE("outer phase 2 matches the host outer step and writes the parameters back") {
    check_outer_apply<loco::outer::nesterov, lc::bf16_update::master>("nesterov fp32", {},
                                                                      all_f32);
    check_outer_apply<loco::outer::nesterov, lc::bf16_update::master>("nesterov mixed", {},
                                                                      mixed_dtypes);
    check_outer_apply<loco::outer::adam, lc::bf16_update::master>(
        "adam mixed", {.bias_correction = true}, mixed_dtypes);
    check_outer_apply<loco::outer::sgd, lc::bf16_update::stochastic>("sgd bf16 no masters",
                                                                     {.lr = 0.5f}, all_bf16);
}

TEST_CASE("scatter_values and init_master") {
    auto rng = rng_for("scatter");
    device_model m(awkward_shapes(rng, 500, mixed_dtypes));
    m.randomize_values(rng);
    const lc::tensor_table table = m.table(false);
    lc::device_buffer<float> master(table.master_elements());
    check_cuda(cudaMemset(master.get(), 0xff, master.size_bytes()), "poison masters");
    lc::init_master(table, master.get(), nullptr);
    const auto masters = master.download();
    std::size_t wrong = 0;
    m.for_each_tensor([&](std::size_t i, const tensor_shape& s, std::size_t off) {
        if (s.value != dtype::bf16) {
            return;
        }
        for (std::size_t e = 0; e < lc::padded_size(s.size); ++e) {
            const float want = e < s.size ? m.values()[off + e] : 0.0f;
            wrong += masters[table.master_offset(i) + e] != want;
        }
    });
    CHECK_MESSAGE(wrong == 0, wrong << " masters (or their padding) differ from the values");

    const auto from = normal_floats(rng, m.total());
    lc::device_buffer<float> from_dev(table.padded_elements());
    lc::from_flat<float>(table, from, from_dev.get());
    lc::scatter_values(table, from_dev.get(), master.get(), nullptr);
    std::vector<float> want(m.total());
    m.for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t off) {
        for (std::size_t e = 0; e < s.size; ++e) {
            want[off + e] = round_to(s.value, from[off + e]);
        }
    });
    expect_equal_arrays(m.download_values(), want, "values after scatter_values");
    const auto flat_masters = lc::master_to_flat(table, master.get());
    std::vector<float> got_m, want_m;
    m.for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t off) {
        if (s.value == dtype::bf16) {
            for (std::size_t e = 0; e < s.size; ++e) {
                got_m.push_back(flat_masters[off + e]);
                want_m.push_back(from[off + e]);
            }
        }
    });
    expect_equal_arrays(got_m, want_m, "masters after scatter_values");
    CHECK(m.gaps_untouched());
}

TEST_CASE("DiLoCo with M replicas on one GPU equals the algorithm computed on the host") {
    using Inner = loco::inner::adamw;
    using Outer = loco::outer::nesterov;
    constexpr int M = 3;
    constexpr int H = 3;       // inner steps per round
    constexpr int rounds = 2;
    const Inner::hyper ih{.lr = 1e-2f};
    const Outer::hyper oh{};
    auto rng = rng_for("diloco replicas");
    const auto shapes = awkward_shapes(rng, 60, mixed_dtypes, false);
    device_model probe(shapes);
    const std::size_t total = probe.total();
    probe.randomize_values(rng);
    const std::vector<float> start = probe.values();
    // grads[r][s]: rank r's gradient at its inner step s, each rounded to its tensor's dtype.
    std::vector<std::vector<std::vector<float>>> grads(M);
    for (int r = 0; r < M; ++r) {
        for (int s = 0; s < H * rounds; ++s) {
            auto g = normal_floats(rng, total, 0.5f);
            probe.for_each_tensor([&](std::size_t, const tensor_shape& sh, std::size_t off) {
                for (std::size_t e = 0; e < sh.size; ++e) {
                    g[off + e] = round_to(sh.grad, g[off + e]);
                }
            });
            grads[std::size_t(r)].push_back(std::move(g));
        }
    }

    // The host algorithm: every rank's H inner steps, the rank-ordered mean of the
    // pseudo-gradients, one outer step, every rank restarting from the new global values.
    std::vector<float> global = start;
    std::vector<float> outer_state(total, 0.0f);
    std::vector<std::vector<float>> inner_state(M, std::vector<float>(2 * total, 0.0f));
    for (int round = 0; round < rounds; ++round) {
        std::vector<std::vector<float>> x(M, global);
        for (int r = 0; r < M; ++r) {
            for (int s = 0; s < H; ++s) {
                const auto k = Inner::prepare(ih, std::uint64_t(round * H + s + 1));
                const auto& g = grads[std::size_t(r)][std::size_t(round * H + s)];
                probe.for_each_tensor([&](std::size_t, const tensor_shape& sh, std::size_t off) {
                    loco::backend::host::apply<Inner>(k, x[std::size_t(r)].data() + off,
                                                      g.data() + off,
                                                      inner_state[std::size_t(r)].data() + off,
                                                      total, sh.size);
                });
            }
        }
        std::vector<float> avg(total);
        for (std::size_t i = 0; i < total; ++i) {
            float acc = global[i] - x[0][i];
            for (int r = 1; r < M; ++r) {
                acc += global[i] - x[std::size_t(r)][i];
            }
            avg[i] = acc / float(M);
        }
        loco::backend::host::apply<Outer>(Outer::prepare(oh, std::uint64_t(round + 1)),
                                          global.data(), avg.data(), outer_state.data(), total,
                                          total);
    }

    // The device run: one replica per thread, each with its own copy of the model and stream.
    std::mutex mutex;
    std::vector<std::vector<float>> final_values(M), final_global(M);
    std::vector<std::uint64_t> sent(M);
    loco::comm::run_replicas(M, [&](loco::comm::cuda_replicas& comm) {
        const int r = comm.rank();
        const cudaStream_t s = comm.stream();
        device_model m(shapes);
        m.values() = start;
        m.upload_values();
        const lc::tensor_table table = m.table();
        const std::size_t padded = table.padded_elements();
        lc::device_buffer<float> state(2 * padded), master(table.master_elements()),
            global_dev(padded), delta(padded), outer(padded);
        state.zero(s);
        outer.zero(s);
        lc::init_master(table, master.get(), s);
        lc::gather_values(table, master.get(), global_dev.get(), s);
        lc::device_control<Inner::hyper> inner_control(ih);
        lc::device_control<Outer::hyper> outer_control(oh);
        for (int round = 0; round < rounds; ++round) {
            for (int step = 0; step < H; ++step) {
                m.grads() = grads[std::size_t(r)][std::size_t(round * H + step)];
                m.upload_grads(s);
                lc::check_gradients(table, inner_control.control(), s);
                lc::inner_step<Inner>(table, state.get(), master.get(), inner_control.hyper(),
                                      inner_control.control(), true, s);
            }
            lc::outer_delta(table, global_dev.get(), master.get(), delta.get(), s);
            comm.all_reduce(loco::cuda_tensor(delta.get(), padded), loco::comm::reduce_op::mean);
            lc::check_padded(table, delta.get(), outer_control.control(), s);
            lc::outer_apply<Outer>(table, global_dev.get(), delta.get(), outer.get(),
                                   master.get(), outer_control.hyper(), outer_control.control(),
                                   true, s);
        }
        const auto ic = inner_control.read(s);
        const auto oc = outer_control.read(s);
        auto values = m.download_values();
        auto g = lc::to_flat(table, global_dev.get());
        std::lock_guard<std::mutex> lock(mutex);
        CHECK(ic.steps == std::uint64_t(H * rounds));
        CHECK(oc.steps == std::uint64_t(rounds));
        final_values[std::size_t(r)] = std::move(values);
        final_global[std::size_t(r)] = std::move(g);
        sent[std::size_t(r)] = comm.bytes_sent();
        (void)table;
    });

    for (int r = 0; r < M; ++r) {
        CAPTURE(r);
        // Every replica holds the same bits: the average and the outer step are deterministic.
        expect_equal_arrays(final_global[std::size_t(r)], final_global[0],
                            "global values across replicas");
        expect_equal_arrays(final_values[std::size_t(r)], final_values[0],
                            "parameters across replicas");
    }
    expect_close_arrays(final_global[0], global, 1e-5, "global values vs the host algorithm");
    std::vector<float> want_values(total);
    probe.for_each_tensor([&](std::size_t, const tensor_shape& sh, std::size_t off) {
        for (std::size_t e = 0; e < sh.size; ++e) {
            want_values[off + e] = round_to(sh.value, final_global[0][off + e]);
        }
    });
    expect_equal_arrays(final_values[0], want_values, "parameters = the global values");
    // Ring volume of an fp32 all-reduce of the padded delta, per round (threads.hpp's formula).
    const lc::tensor_table layout = probe.table();
    const std::size_t n = layout.padded_elements();
    for (int r = 0; r < M; ++r) {
        const std::size_t chunk = n * std::size_t(r + 1) / M - n * std::size_t(r) / M;
        CHECK(sent[std::size_t(r)] == std::uint64_t(rounds) * 4 * (n + (M - 2) * chunk));
    }
}

// A checkpoint of the device handle holds every outer state array (Adam's m and v), each in
// its place, and a handle that loads it goes on bit for bit.
TEST_CASE("cuda backend: outer adam's m and v survive a checkpoint and the run resumes bit for "
          "bit") {
    using handles::gpu_params;
    using opt_t = loco::cuda::diloco<loco::inner::sgd, loco::outer::adam>;
    const std::string label = "outer adam checkpoint";
    const opt_t::config cfg{.inner = {.lr = 0.05f},
                            .outer = {.lr = 0.1f, .bias_correction = true},
                            .schedule = {.every = 1}};
    loco::comm::run_replicas(1, [&](loco::comm::cuda_replicas& comm) {
        const cudaStream_t s = comm.stream();
        gpu_params a(handles::init_of(label, 0));
        opt_t::config ca = cfg;
        ca.stream = s;
        opt_t first(a.list, comm, ca);
        for (int t = 1; t <= 3; ++t) {
            a.set_gradients(handles::grads_of(label, 0, t), s);
            first.step();
        }
        std::ostringstream os;
        first.save(os);
        gpu_params b(a.host_values(s));
        opt_t second(b.list, comm, ca);
        std::istringstream is(os.str());
        second.load(is);
        CHECK(second.outer_steps() == 3);
        for (int j = 0; j < loco::outer::adam::state_size; ++j) {
            CAPTURE(j);
            const auto want = first.outer_state(j);
            const auto got = second.outer_state(j);
            expect_equal_arrays(std::vector<float>(got.begin(), got.end()),
                                std::vector<float>(want.begin(), want.end()), "outer state");
        }
        a.set_gradients(handles::grads_of(label, 0, 4), s);
        b.set_gradients(handles::grads_of(label, 0, 4), s);
        first.step();
        second.step();
        expect_equal_arrays(b.host_values(s), a.host_values(s), "parameters after the resume");
    });
}

}  // namespace cuda_outer_test
