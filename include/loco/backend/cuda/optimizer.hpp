#pragma once
// loco::cuda::optimizer<Inner>: loco::optimizer for parameters in GPU memory. One step is two
// kernel launches over the whole parameter list (the non-finite check, then the fused update),
// with the hyper-parameters and the step count read on the device, so nothing in a step
// synchronises the host with the device (except under nonfinite_policy::raise, which must know
// the verdict) and a step can be captured in a CUDA graph and replayed.
//
// Parameters come from a loco::parameter_list of fp32 tensors in CUDA memory, or from a
// backend::cuda::tensor_table for bf16 values and gradients (which keep an fp32 master copy, as
// optimizer state). Checkpoints have the host optimizer's format: an fp32 model's checkpoint
// loads on the host and the reverse.

#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/groups.hpp>
#include <loco/optimizer.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <istream>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace loco::backend::cuda {
template <class Inner, class Outer, class Compressor, class Aggregate>
class diloco_engine;
}  // namespace loco::backend::cuda

namespace loco::cuda {

namespace detail {

// The element counts of every tensor of a table, in order (the checkpoint layout).
inline std::vector<std::size_t> table_sizes(const backend::cuda::tensor_table& table) {
    std::vector<std::size_t> sizes;
    sizes.reserve(table.size());
    for (std::size_t i = 0; i < table.size(); ++i) {
        sizes.push_back(table.spec(i).size);
    }
    return sizes;
}

// The shape of every tensor of a table (0 x 0 where its entry gives none), for the checkpoint.
inline std::vector<loco::detail::tensor_shape> table_shapes(
    const backend::cuda::tensor_table& table) {
    std::vector<loco::detail::tensor_shape> shapes;
    shapes.reserve(table.size());
    for (std::size_t i = 0; i < table.size(); ++i) {
        shapes.push_back({table.spec(i).rows, table.spec(i).cols});
    }
    return shapes;
}

// Writes `h` to the device when its bytes differ from what was uploaded last. A change while the
// stream is being captured is refused: a graph replay would not read the host again.
template <class Hyper>
class hyper_mirror {
public:
    explicit hyper_mirror(const Hyper& h) : uploaded_(h) {}

    void sync(const Hyper& h, backend::cuda::device_control<Hyper>& control, cudaStream_t s) {
        if (std::memcmp(&h, &uploaded_, sizeof(Hyper)) == 0) {
            return;
        }
        backend::cuda::refuse_hyper_change_in_capture(s, "loco::cuda");
        control.set_hyper(h, s);
        uploaded_ = h;
    }

private:
    Hyper uploaded_;
};

// The gradient check of a step into `control`'s flag, unless the policy is ignore; under raise
// its verdict on the host (one synchronisation): nonfinite_error naming the tensor.
template <class Control>
void check_step_gradients(const backend::cuda::tensor_table& table, Control& control,
                          nonfinite_policy policy, cudaStream_t stream) {
    if (policy == nonfinite_policy::ignore) {
        return;
    }
    backend::cuda::check_gradients(table, control.control(), stream);
    if (policy == nonfinite_policy::raise) {
        const auto c = control.read(stream);
        if (c.first_nonfinite != backend::cuda::no_nonfinite) {
            control.reset_nonfinite(stream);
            const auto at = table.locate(static_cast<std::size_t>(c.first_nonfinite));
            throw nonfinite_error("loco::cuda: the gradient of '" + table.name(at.tensor) +
                                  "' holds a non-finite value at element " +
                                  std::to_string(at.element) + "; the step was not applied");
        }
    }
}

// The head of an optimizer's checkpoint section, the host's: the layout, then the step counts.
struct section_counts {
    std::uint64_t steps = 0;
    std::uint64_t skipped = 0;
};
inline void write_section_head(loco::detail::checkpoint_writer& w,
                               const backend::cuda::tensor_table& table, std::uint64_t steps,
                               std::uint64_t skipped) {
    loco::detail::write_layout(w, table_sizes(table));
    w.u64(steps);
    w.u64(skipped);
}
inline section_counts read_section_head(loco::detail::checkpoint_reader& r,
                                        const backend::cuda::tensor_table& table) {
    loco::detail::read_layout(r, table_sizes(table));
    section_counts c;
    c.steps = r.counter("the inner step count");
    c.skipped = r.counter("the skipped step count");
    return c;
}

// What every GPU optimizer (cuda::optimizer<Inner> and its groups specialisation) does the same
// way around what its Derived class supplies: step() (prepare(), then launch_update()), the
// accessors of its config and table, the step counters (counter_control(), host_skipped_), and
// save() / load() around its checkpoint section (write_section, read_section, commit: the host
// optimizer's format). Derived befriends this class.
template <class Derived>
class optimizer_base {
public:
    // One update of every parameter, launched on the configured stream. Under
    // nonfinite_policy::skip a non-finite gradient makes the update a no-op on the device (counted
    // in skipped_steps()); the returned `applied` says that the update was launched.
    step_result step() {
        self().prepare();
        self().launch_update();
        return {true, false};
    }

    auto& hyper() noexcept { return self().cfg_.inner; }
    const auto& hyper() const noexcept { return self().cfg_.inner; }
    nonfinite_policy on_nonfinite() const noexcept { return self().cfg_.on_nonfinite; }
    cudaStream_t stream() const noexcept { return self().cfg_.stream; }
    // Every parameter, in the order of the list (the flat layout loco::cuda::diloco uses).
    const backend::cuda::tensor_table& table() const noexcept { return self().table_; }

    // The counters live on the device: these wait for the stream.
    std::uint64_t steps() const { return self().counter_control().read(stream()).steps; }
    std::uint64_t skipped_steps() const {
        return self().counter_control().read(stream()).skipped + self().host_skipped_;
    }

    // The host optimizer's stream: the kind, the shapes (format 5), the names (format 6), the
    // section.
    void save(std::ostream& os) const {
        loco::detail::checkpoint_writer w(os);
        w.text("optimizer");
        loco::detail::write_shapes(w, detail::table_shapes(table()));
        loco::detail::write_names(w, table().size(), [&](std::size_t i) -> const std::string& {
            return table().name(i);
        });
        self().write_section(w);
        w.finish();
    }

    // Throws checkpoint_error, leaving the optimizer as it was, for a truncated or corrupted
    // stream or one of another policy or model (a matrix of another shape, or tensors in
    // another order, included).
    void load(std::istream& is) {
        loco::detail::checkpoint_reader r(is);
        r.expect_text("optimizer", "the checkpoint kind");
        const auto name_of = [&](std::size_t i) -> const std::string& { return table().name(i); };
        if (r.format() >= 5) {
            loco::detail::expect_shapes(r, detail::table_shapes(table()), name_of);
        }
        if (r.format() >= 6) loco::detail::expect_names(r, table().size(), name_of);
        auto pending = self().read_section(r);
        r.finish();
        self().commit(pending);
    }

private:
    Derived& self() noexcept { return static_cast<Derived&>(*this); }
    const Derived& self() const noexcept { return static_cast<const Derived&>(*this); }
};

// Whether Inner is loco::groups<...> (served by the specialisation in backend/cuda/groups.hpp).
template <class Inner>
inline constexpr bool is_groups = false;
template <class... Groups>
inline constexpr bool is_groups<loco::groups<Groups...>> = true;

}  // namespace detail

// Element-wise inner policies. loco::groups<...> of element-wise policies and inner::muon (e.g.
// MuLoCo's Muon + AdamW) are a specialisation in <loco/backend/cuda/groups.hpp>.
template <class Inner>
class optimizer : public detail::optimizer_base<optimizer<Inner>> {
    static_assert(elementwise_optimizer<Inner> || !detail::is_groups<Inner>,
                  "loco::cuda::optimizer<loco::groups<...>> is declared in "
                  "<loco/backend/cuda/groups.hpp>: include it (or <loco/cuda.hpp>)");
    static_assert(elementwise_optimizer<Inner> || detail::is_groups<Inner>,
                  "loco::cuda::optimizer runs element-wise inner policies, and Muon inside "
                  "parameter groups: loco::groups<loco::group<loco::otherwise, "
                  "loco::inner::muon>> (docs/groups.md, docs/cuda.md)");

public:
    using policy = Inner;
    using hyper_type = typename Inner::hyper;

    struct config {
        hyper_type inner{};
        nonfinite_policy on_nonfinite = nonfinite_policy::skip;
        cudaStream_t stream = nullptr;  // every launch goes here (the trainer's compute stream)
        std::uint64_t seed = 0;         // stochastic rounding of bf16 values, when used
    };

    explicit optimizer(const parameter_list& params, config cfg = {})
        : optimizer(backend::cuda::tensor_table::from(params), cfg) {}

    explicit optimizer(backend::cuda::tensor_table table, config cfg = {})
        : table_(std::move(table)),
          cfg_(cfg),
          control_((loco::detail::validate_hyper<Inner>(cfg.inner), cfg.inner), cfg.seed),
          mirror_(cfg.inner),
          state_(static_cast<std::size_t>(Inner::state_size) * table_.padded_elements()),
          master_(table_.master_elements()) {
        if (!table_.has_gradients() && table_.total_elements() != 0) {
            throw invalid_argument("loco::cuda::optimizer: the tensor table has no gradients");
        }
        state_.zero(nullptr);
        if (table_.has_bf16_values()) {
            backend::cuda::init_master(table_, master_.get(), nullptr);
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    }

    // State array j in the flat layout, copied to the host (waits for the stream).
    std::vector<float> state(int j) const {
        loco::detail::check_state_index(j, Inner::state_size, "state");
        LOCO_CUDA_CHECK(cudaStreamSynchronize(cfg_.stream));
        return backend::cuda::to_flat(
            table_, state_.get() + static_cast<std::size_t>(j) * table_.padded_elements());
    }

private:
    template <class, class, class, class>
    friend class backend::cuda::diloco_engine;
    friend class detail::optimizer_base<optimizer>;

    struct section : detail::section_counts {
        std::vector<float> state;   // flat layout, Inner::state_size arrays
        std::vector<float> master;  // flat layout; only with bf16 values
    };

    // Everything before the update: validation, the hyper-parameters on the device, and the
    // gradient check (under raise, its verdict, which needs one synchronisation).
    void prepare() {
        loco::detail::validate_hyper<Inner>(cfg_.inner);
        mirror_.sync(cfg_.inner, control_, cfg_.stream);
        detail::check_step_gradients(table_, control_, cfg_.on_nonfinite, cfg_.stream);
    }

    void launch_update() {
        backend::cuda::inner_step<Inner>(table_, state_.get(), master_ptr(), control_.hyper(),
                                         control_.control(),
                                         cfg_.on_nonfinite == nonfinite_policy::skip, cfg_.stream);
    }

    // A step whose gradient must not be used (loco::cuda::diloco's first step after its
    // parameters were replaced by rank 0's): counted as skipped, nothing launched. The check's
    // flag, if any, is cleared so that it does not leak into the next update.
    void skip_on_host() {
        ++host_skipped_;
        control_.reset_nonfinite(cfg_.stream);
    }

    const auto& counter_control() const noexcept { return control_; }

    float* master_ptr() const noexcept {
        return table_.has_bf16_values() ? master_.get() : nullptr;
    }

    void write_section(loco::detail::checkpoint_writer& w) const {
        const auto c = control_.read(cfg_.stream);
        detail::write_section_head(w, table_, c.steps, c.skipped + host_skipped_);
        w.text(Inner::name);
        w.u64(static_cast<std::uint64_t>(Inner::state_size));
        w.floats(backend::cuda::to_flat(table_, state_.get(),
                                        static_cast<std::size_t>(Inner::state_size)));
        if (table_.has_bf16_values()) {
            w.text("bf16 masters");
            w.floats(backend::cuda::master_to_flat(table_, master_.get()));
        }
    }

    section read_section(loco::detail::checkpoint_reader& r) const {
        section s{detail::read_section_head(r, table_), {}, {}};
        r.expect_text(Inner::name, "the inner optimizer");
        r.expect_u64(static_cast<std::uint64_t>(Inner::state_size), "the inner state size");
        s.state.resize(static_cast<std::size_t>(Inner::state_size) * table_.total_elements());
        r.floats(s.state, "the inner optimizer state");
        if (table_.has_bf16_values()) {
            r.expect_text("bf16 masters", "the fp32 masters of bf16 parameters");
            s.master.resize(table_.total_elements());
            r.floats(s.master, "the fp32 masters of bf16 parameters");
        }
        return s;
    }

    void commit(const section& s) {
        LOCO_CUDA_CHECK(cudaStreamSynchronize(cfg_.stream));
        backend::cuda::from_flat<float>(table_, s.state, state_.get(),
                                        static_cast<std::size_t>(Inner::state_size));
        if (table_.has_bf16_values()) {
            backend::cuda::master_from_flat(table_, s.master, master_.get());
        }
        host_skipped_ = 0;
        control_.set_counters(s.steps, s.skipped, control_.read(cfg_.stream).seed, cfg_.stream);
        LOCO_CUDA_CHECK(cudaStreamSynchronize(cfg_.stream));
    }

    backend::cuda::tensor_table table_;
    config cfg_;
    mutable backend::cuda::device_control<hyper_type> control_;
    detail::hyper_mirror<hyper_type> mirror_;
    backend::cuda::device_buffer<float> state_;
    backend::cuda::device_buffer<float> master_;
    std::uint64_t host_skipped_ = 0;
};

}  // namespace loco::cuda
