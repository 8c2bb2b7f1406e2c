#pragma once
// loco::cuda::optimizer<loco::groups<...>>: parameter groups on the GPU, e.g. MuLoCo's inner
// optimizer (Muon on the hidden matrices, AdamW on everything else) for parameters in GPU memory.
//
// Same routing as the host (loco::detail::inner_engine<groups<...>>::split, groups.hpp), same
// per-group hyper-parameter tuple in the config, same checkpoint format (an fp32 model's checkpoint
// moves between host and GPU handles), same errors. Each group runs on the device:
//   element-wise policy   the fused inner_step kernel over a tensor_table of that group's
//                         tensors (one launch per group; the table is built once);
//   inner::muon           a backend::cuda::muon_engine over that group's matrices (built once;
//                         batched cuBLAS Newton-Schulz, see muon.hpp).
// One step: one non-finite check over every gradient (one launch), the check's flag copied to the
// other groups' step controls (one 8-byte device copy per further group), then each group's
// launches. A non-finite gradient in any group makes every group's update a no-op on the device
// under nonfinite_policy::skip (the step is all-or-nothing, as on the host), or throws before
// anything is launched under raise. No host synchronisation (except under raise, which must know
// the verdict), so a step can be captured in a CUDA graph and replayed.
//
// As on the host, a group with Muon needs finite gradients whatever the policy: under
// nonfinite_policy::ignore its gradients are still checked and a non-finite one is refused as
// under raise (with the one synchronisation raise needs).
//
// Limits of this version: fp32 parameters from a loco::parameter_list (no bf16 tensor_table: the
// routing needs names, shapes and tags); the only per-matrix policy on the GPU is inner::muon.

#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/muon.hpp>
#include <loco/backend/cuda/optimizer.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/groups.hpp>
#include <loco/inner/muon.hpp>
#include <loco/optimizer.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>

#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <istream>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco::cuda {
namespace detail {

template <class Policy>
inline constexpr bool is_muon_policy = std::is_same_v<Policy, inner::muon>;

// What a group of a loco::cuda::optimizer may run.
template <class Policy>
inline constexpr bool device_group_policy =
    elementwise_optimizer<Policy> || is_muon_policy<Policy>;

// The device hyper-parameters of a group that keeps them elsewhere (muon_engine uploads its own).
struct no_device_hyper {
    unsigned char unused;
};

// One group on the device: its tensor table (the group's flat and padded layouts), its step
// control (counters and non-finite flag, advanced by the group's last launch), its state, and the
// launches of one step. Element-wise policies: inner_step over the table.
template <class Policy, bool = is_muon_policy<Policy>>
class group_engine {
public:
    using hyper_type = typename Policy::hyper;
    static constexpr int state_size = Policy::state_size;
    static constexpr std::string_view policy_name() noexcept { return Policy::name; }

    group_engine(const parameter_list& list, const hyper_type& h, std::uint64_t seed)
        : table_(backend::cuda::tensor_table::from(list)),
          control_(h, seed),
          mirror_(h),
          state_(static_cast<std::size_t>(state_size) * table_.padded_elements()) {
        state_.zero(nullptr);
        LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    }

    // Nothing to check beyond the table's own checks.
    static void check_shapes(const parameter_list&) {}

    const backend::cuda::tensor_table& table() const noexcept { return table_; }
    backend::cuda::device_control<hyper_type>& control() noexcept { return control_; }
    const backend::cuda::device_control<hyper_type>& control() const noexcept { return control_; }

    // The hyper-parameters on the device, when they changed (refused during a capture).
    void upload(const hyper_type& h, cudaStream_t s) { mirror_.sync(h, control_, s); }

    void launch(const hyper_type&, bool skip_nonfinite, cudaStream_t s) {
        backend::cuda::inner_step<Policy>(table_, state_.get(), nullptr, control_.hyper(),
                                          control_.control(), skip_nonfinite, s);
    }

    const float* state_data() const noexcept { return state_.get(); }
    float* state_data() noexcept { return state_.get(); }

private:
    backend::cuda::tensor_table table_;
    backend::cuda::device_control<hyper_type> control_;
    hyper_mirror<hyper_type> mirror_;
    backend::cuda::device_buffer<float> state_;  // state_size arrays of the padded layout
};

// inner::muon: a muon_engine over the group's matrices; the momentum is one padded array.
template <class Policy>
class group_engine<Policy, true> {
public:
    using hyper_type = typename Policy::hyper;
    static constexpr int state_size = Policy::state_size;
    static_assert(state_size == 1, "loco::cuda: Muon's state is its momentum buffer");
    static constexpr std::string_view policy_name() noexcept { return Policy::name; }

    group_engine(const parameter_list& list, const hyper_type&, std::uint64_t seed)
        : table_(backend::cuda::tensor_table::from(list)),
          control_(no_device_hyper{}, seed),
          momentum_(table_.padded_elements()),
          engine_((momentum_.zero(nullptr), matrices(list))) {}

    // The host's refusal (loco::detail::inner_engine of a matrix policy), before anything is
    // allocated: Muon updates whole matrices.
    static void check_shapes(const parameter_list& list) {
        loco::detail::require_matrices(list, Policy::name, "cuda_matrix");
        // Stacks are a host feature in this version (docs/groups.md, "Stacked tensors").
        for (const auto& p : list) {
            if (p.matrices > 1) {
                throw invalid_argument("loco::cuda: parameter '" + p.name + "' is a stack of " +
                                       std::to_string(p.matrices) +
                                       " matrices, which Muon on the GPU does not take yet; "
                                       "register each matrix as its own parameter, or run "
                                       "Muon on the host (docs/groups.md)");
            }
        }
    }

    const backend::cuda::tensor_table& table() const noexcept { return table_; }
    backend::cuda::device_control<no_device_hyper>& control() noexcept { return control_; }
    const backend::cuda::device_control<no_device_hyper>& control() const noexcept {
        return control_;
    }

    void upload(const hyper_type& h, cudaStream_t s) { engine_.set_hyper(h, s); }

    void launch(const hyper_type& h, bool skip_nonfinite, cudaStream_t s) {
        engine_.step(h, control_.control(), skip_nonfinite, s, true);
    }

    const float* state_data() const noexcept { return momentum_.get(); }
    float* state_data() noexcept { return momentum_.get(); }
    const backend::cuda::muon_engine& engine() const noexcept { return engine_; }

private:
    std::vector<backend::cuda::muon_matrix> matrices(const parameter_list& list) const {
        std::vector<backend::cuda::muon_matrix> out;
        out.reserve(list.size());
        for (std::size_t i = 0; i < list.size(); ++i) {
            const parameter& p = list[i];
            backend::cuda::muon_matrix m;
            m.name = p.name;
            m.value = p.value.data;
            m.value_type = backend::cuda::dtype::f32;
            m.grad = p.grad.data;
            m.grad_type = backend::cuda::dtype::f32;
            m.momentum = momentum_.get() + table_.padded_offset(i);
            m.size = p.value.size;
            m.rows = p.value.rows;
            m.cols = p.value.cols;
            out.push_back(std::move(m));
        }
        return out;
    }

    backend::cuda::tensor_table table_;
    backend::cuda::device_control<no_device_hyper> control_;
    backend::cuda::device_buffer<float> momentum_;  // the padded layout of table_
    backend::cuda::muon_engine engine_;
};

}  // namespace detail

template <class... Groups>
class optimizer<loco::groups<Groups...>>
    : public detail::optimizer_base<optimizer<loco::groups<Groups...>>> {
    static_assert((detail::device_group_policy<typename Groups::policy> && ...),
                  "loco::cuda::optimizer<loco::groups<...>> runs groups of element-wise policies "
                  "and of loco::inner::muon; another per-matrix policy runs in loco::optimizer on "
                  "the host in this version");

    using host_engine = loco::detail::inner_engine<loco::groups<Groups...>>;
    static constexpr std::size_t count = sizeof...(Groups);
    using engines = std::tuple<std::unique_ptr<detail::group_engine<typename Groups::policy>>...>;
    // A group with Muon must see finite gradients, whatever the policy (as on the host).
    static constexpr bool needs_finite_gradients =
        loco::detail::engine_needs_finite_gradients<host_engine>;

    template <std::size_t I>
    using engine_at = detail::group_engine<typename std::tuple_element_t<
        I, std::tuple<Groups...>>::policy>;
    // Whether group I's policy must see finite gradients (Muon), as the host decides it.
    template <std::size_t I>
    static constexpr bool needs_finite_at = loco::detail::engine_needs_finite_gradients<
        loco::detail::inner_engine<typename std::tuple_element_t<I, std::tuple<Groups...>>::policy>>;

public:
    using policy = loco::groups<Groups...>;
    // One hyper-parameter struct per group, in group order (as loco::optimizer<groups<...>>).
    using hyper_type = typename host_engine::hyper_type;

    struct config {
        hyper_type inner{};
        nonfinite_policy on_nonfinite = nonfinite_policy::skip;
        cudaStream_t stream = nullptr;  // every launch goes here (the trainer's compute stream)
        std::uint64_t seed = 0;         // passed to every group's step control
    };

    // Routes the parameters as loco::optimizer does (first matching group; a parameter no group
    // takes, or one without a 2-D shape in a Muon group, is a loco::invalid_argument naming it),
    // validates the hyper-parameters, then builds each group's table and engine.
    explicit optimizer(const parameter_list& params, config cfg = {})
        : table_(backend::cuda::tensor_table::from(params)),
          cfg_(cfg),
          lists_(routed(params, cfg.inner)),
          routing_(host_engine::routing(params)),
          engines_(make_engines(std::make_index_sequence<count>{})) {
        if (!table_.has_gradients() && table_.total_elements() != 0) {
            throw invalid_argument("loco::cuda::optimizer: the parameters have no gradients");
        }
    }

    // Group I's parameters, as loco::optimizer<groups<...>>::engine_state().group_params<I>().
    template <std::size_t I>
    const parameter_list& group_params() const noexcept {
        return lists_[I];
    }
    // Group I's tensor table (its flat and padded layouts).
    template <std::size_t I>
    const backend::cuda::tensor_table& group_table() const noexcept {
        return std::get<I>(engines_)->table();
    }
    // Group I's state array j over the group's flat layout, copied to the host (waits for the
    // stream): loco::optimizer's engine_state().group<I>().state(j).
    template <std::size_t I>
    std::vector<float> group_state(int j) const {
        const auto& e = *std::get<I>(engines_);
        loco::detail::check_state_index(j, engine_at<I>::state_size, "state");
        LOCO_CUDA_CHECK(cudaStreamSynchronize(cfg_.stream));
        return backend::cuda::to_flat(
            e.table(), e.state_data() + static_cast<std::size_t>(j) * e.table().padded_elements());
    }
    // The muon_engine of group I, when that group runs Muon (e.g. its nonfinite_matrices()).
    template <std::size_t I>
        requires detail::is_muon_policy<
            typename std::tuple_element_t<I, std::tuple<Groups...>>::policy>
    const backend::cuda::muon_engine& group_muon() const noexcept {
        return std::get<I>(engines_)->engine();
    }

private:
    template <class, class, class, class>
    friend class backend::cuda::diloco_engine;
    friend class detail::optimizer_base<optimizer>;

    struct section : detail::section_counts {
        std::array<std::vector<float>, count> state;  // each group's, over its flat layout
    };

    template <class F>
    void for_each_group(F&& f) {
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (f(std::integral_constant<std::size_t, I>{}, *std::get<I>(engines_)), ...);
        }(std::make_index_sequence<count>{});
    }
    template <class F>
    void for_each_group(F&& f) const {
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (f(std::integral_constant<std::size_t, I>{}, *std::get<I>(engines_)), ...);
        }(std::make_index_sequence<count>{});
    }

    static std::vector<parameter_list> routed(const parameter_list& params,
                                              const hyper_type& h) {
        std::vector<parameter_list> lists = host_engine::split(params);
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (engine_at<I>::check_shapes(lists[I]), ...);
        }(std::make_index_sequence<count>{});
        host_engine::validate(h);
        return lists;
    }

    template <std::size_t... I>
    engines make_engines(std::index_sequence<I...>) const {
        return engines{std::make_unique<engine_at<I>>(lists_[I], std::get<I>(cfg_.inner),
                                                      cfg_.seed)...};
    }

    const auto& first_control() const { return std::get<0>(engines_)->control(); }
    // Every group advances its counters in the same step, so group 0's are the optimizer's.
    const auto& counter_control() const { return first_control(); }
    auto& first_control() { return std::get<0>(engines_)->control(); }

    // Everything before the update: validation, every group's hyper-parameters on the device, and
    // the gradient check over every parameter into group 0's control (under raise, its verdict).
    // Under ignore, the groups that need finite gradients (Muon) check theirs as under raise, as
    // on the host; the others are not checked.
    void prepare() {
        host_engine::validate(cfg_.inner);
        for_each_group([&](auto i, auto& e) {
            e.upload(std::get<decltype(i)::value>(cfg_.inner), cfg_.stream);
        });
        if (cfg_.on_nonfinite == nonfinite_policy::ignore) {
            for_each_group([&](auto i, auto& e) {
                if constexpr (needs_finite_at<decltype(i)::value>) {
                    detail::check_step_gradients(e.table(), e.control(), nonfinite_policy::raise,
                                                 cfg_.stream);
                }
            });
            return;
        }
        detail::check_step_gradients(table_, first_control(), cfg_.on_nonfinite, cfg_.stream);
    }

    // The check's verdict goes to every group's control before any group's launch (group 0's
    // last block clears its own flag), so that every group skips or none does.
    void launch_update() {
        const bool skip = cfg_.on_nonfinite == nonfinite_policy::skip;
        if (skip) {
            const backend::cuda::step_control* from = first_control().control();
            for_each_group([&](auto i, auto& e) {
                if constexpr (decltype(i)::value != 0) {
                    LOCO_CUDA_CHECK(cudaMemcpyAsync(&e.control().control()->first_nonfinite,
                                                    &from->first_nonfinite, sizeof(std::uint64_t),
                                                    cudaMemcpyDeviceToDevice, cfg_.stream));
                }
            });
        }
        for_each_group([&](auto i, auto& e) {
            e.launch(std::get<decltype(i)::value>(cfg_.inner), skip, cfg_.stream);
        });
    }

    // See cuda::optimizer::skip_on_host: only group 0's flag was written by the check.
    void skip_on_host() {
        ++host_skipped_;
        first_control().reset_nonfinite(cfg_.stream);
    }

    // fp32 parameters only: no master copies.
    float* master_ptr() const noexcept { return nullptr; }

    // loco::optimizer<groups<...>>'s section, byte for byte (groups.hpp, optimizer.hpp).
    void write_section(loco::detail::checkpoint_writer& w) const {
        const auto c = first_control().read(cfg_.stream);
        detail::write_section_head(w, table_, c.steps, c.skipped + host_skipped_);
        w.text("groups");
        w.u64(count);
        routing_.write(w);
        for_each_group([&](auto, const auto& e) {
            using engine_t = std::remove_cvref_t<decltype(e)>;
            loco::detail::write_layout(w, detail::table_sizes(e.table()));
            w.text(engine_t::policy_name());
            w.u64(static_cast<std::uint64_t>(engine_t::state_size));
            w.floats(backend::cuda::to_flat(e.table(), e.state_data(),
                                            static_cast<std::size_t>(engine_t::state_size)));
        });
    }

    section read_section(loco::detail::checkpoint_reader& r) const {
        section s{detail::read_section_head(r, table_), {}};
        r.expect_text("groups", "the inner optimizer");
        r.expect_u64(count, "the number of parameter groups");
        routing_.expect(r);
        for_each_group([&](auto i, const auto& e) {
            using engine_t = std::remove_cvref_t<decltype(e)>;
            loco::detail::read_layout(r, detail::table_sizes(e.table()));
            r.expect_text(engine_t::policy_name(), "the inner optimizer");
            r.expect_u64(static_cast<std::uint64_t>(engine_t::state_size), "the inner state size");
            auto& state = s.state[decltype(i)::value];
            state.resize(static_cast<std::size_t>(engine_t::state_size) *
                         e.table().total_elements());
            r.floats(state, "the inner optimizer state");
        });
        return s;
    }

    void commit(const section& s) {
        LOCO_CUDA_CHECK(cudaStreamSynchronize(cfg_.stream));
        for_each_group([&](auto i, auto& e) {
            using engine_t = std::remove_cvref_t<decltype(e)>;
            backend::cuda::from_flat<float>(e.table(), s.state[decltype(i)::value], e.state_data(),
                                            static_cast<std::size_t>(engine_t::state_size));
        });
        host_skipped_ = 0;
        for_each_group([&](auto, auto& e) {
            e.control().set_counters(s.steps, s.skipped, e.control().read(cfg_.stream).seed,
                                     cfg_.stream);
        });
        LOCO_CUDA_CHECK(cudaStreamSynchronize(cfg_.stream));
    }

    backend::cuda::tensor_table table_;  // every parameter: the check, diloco's phases
    config cfg_;
    std::vector<parameter_list> lists_;  // each group's parameters (the host's routing)
    loco::detail::group_routing routing_;  // recorded in checkpoints
    engines engines_;
    std::uint64_t host_skipped_ = 0;
};

}  // namespace loco::cuda
