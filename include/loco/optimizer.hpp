#pragma once
// loco::optimizer<Inner>: one inner optimizer over a parameter list, with no communication. It is
// the inner half of loco::diloco, and on its own a plain (host or fused-kernel) optimizer, e.g. for
// a data-parallel baseline that all-reduces gradients itself.

#include <loco/backend/host/elementwise.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <istream>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loco {

namespace backend::host {
template <class Inner, class Outer, class Compressor, class Aggregate>
class diloco_engine;
}  // namespace backend::host

// What a step does with a gradient (or an averaged pseudo-gradient) that holds NaN or infinity.
enum class nonfinite_policy : unsigned char {
    skip,   // leave parameters and state untouched, count the skip, go on (the default)
    raise,  // throw loco::nonfinite_error, leaving parameters and state untouched
    ignore  // apply the update anyway, without checking (saves one read of the gradients)
};

struct step_result {
    bool applied = false;  // the inner update was applied (false: skipped, non-finite gradient)
    bool synced = false;   // an outer sync ran after the inner step
    // diloco only: this call started the run (start() had not been called) and gave this worker
    // rank 0's parameters in place of its own (the inner update is then not applied).
    bool received_initial = false;
};

template <class, class, class, class, class, class>
class diloco;

namespace detail {

inline void check_state_index(int j, int state_size, const char* what) {
    if (j < 0 || j >= state_size) {
        throw invalid_argument(std::string("loco: ") + what + " index " + std::to_string(j) +
                               " is outside [0, " + std::to_string(state_size) + ")");
    }
}

// A per-matrix policy (Muon) updates whole matrices: every parameter needs a 2-D shape, which
// `how` says how to give (host_matrix, cuda_matrix). Shared by the host and GPU optimizers.
inline void require_matrices(const parameter_list& params, std::string_view policy,
                             std::string_view how) {
    for (const auto& p : params) {
        if (p.role == role::vector) {
            throw invalid_argument("loco::inner::" + std::string(policy) +
                                   " updates whole matrices, but parameter '" + p.name +
                                   "' has role vector; route it to another group "
                                   "(docs/groups.md)");
        }
        if (!p.value.is_matrix() && p.value.size == 0 && (p.value.rows != 0 || p.value.cols != 0)) {
            throw invalid_argument("loco::inner::" + std::string(policy) +
                                   " updates whole matrices, but parameter '" + p.name +
                                   "' is an empty " + std::to_string(p.value.rows) + " x " +
                                   std::to_string(p.value.cols) +
                                   " matrix; route it to another group (docs/groups.md)");
        }
        if (!p.value.is_matrix()) {
            throw invalid_argument("loco::inner::" + std::string(policy) +
                                   " updates whole matrices, but parameter '" + p.name +
                                   "' has no 2-D shape; give it one (" + std::string(how) +
                                   ", tensor_traits::shape) or route it to another group "
                                   "(docs/groups.md)");
        }
    }
}

// The element counts of every parameter: checked first on load, so that a checkpoint of another
// model fails with a clear message before any state is read.
inline void write_layout(checkpoint_writer& w, std::span<const std::size_t> sizes) {
    w.u64(sizes.size());
    for (const std::size_t n : sizes) {
        w.u64(n);
    }
}
inline void read_layout(checkpoint_reader& r, std::span<const std::size_t> sizes) {
    r.expect_u64(sizes.size(), "the number of parameters");
    for (const std::size_t n : sizes) {
        r.expect_u64(n, "a parameter's element count");
    }
}
inline std::vector<std::size_t> parameter_sizes(const parameter_list& params) {
    std::vector<std::size_t> sizes;
    sizes.reserve(params.size());
    for (const auto& p : params) {
        sizes.push_back(p.value.size);
    }
    return sizes;
}
inline void write_layout(checkpoint_writer& w, const parameter_list& params) {
    write_layout(w, parameter_sizes(params));
}
inline void read_layout(checkpoint_reader& r, const parameter_list& params) {
    read_layout(r, parameter_sizes(params));
}

// Every parameter's rows x cols, 0 x 0 where it has no matrix shape (a flat tensor, a table entry
// given without one). The layout records element counts only: without the shapes a checkpoint of
// an 8 x 6 matrix loaded into a 6 x 8 one of the same name, every state array (Adam's moments,
// Muon's momentum, a residual, the global values) read in the other layout. Written by a diloco
// stream since format 4 and by an optimizer stream since format 5.
struct tensor_shape {
    std::uint64_t rows = 0;
    std::uint64_t cols = 0;
};
// Of a parameter_list, or of a backend's std::vector<parameter>.
template <class Parameters>
std::vector<tensor_shape> parameter_shapes(const Parameters& params) {
    std::vector<tensor_shape> shapes;
    shapes.reserve(params.size());
    for (const auto& p : params) {
        shapes.push_back(p.value.is_matrix() ? tensor_shape{p.value.rows, p.value.cols}
                                             : tensor_shape{});
    }
    return shapes;
}
inline void write_shapes(checkpoint_writer& w, std::span<const tensor_shape> shapes) {
    w.u64(shapes.size());
    for (const tensor_shape& s : shapes) {
        w.u64(s.rows);
        w.u64(s.cols);
    }
}
// Refuses a saved shape that differs from a live one; where either side has none (0 x 0) there
// is nothing to compare. name_of(i) names parameter i in the message.
template <class NameOf>
void expect_shapes(checkpoint_reader& r, std::span<const tensor_shape> shapes, NameOf&& name_of) {
    r.expect_u64(shapes.size(), "the number of parameters");
    for (std::size_t i = 0; i < shapes.size(); ++i) {
        const std::uint64_t rows = r.u64("a parameter's rows");
        const std::uint64_t cols = r.u64("a parameter's cols");
        const tensor_shape& live = shapes[i];
        if (rows != 0 && cols != 0 && live.rows != 0 && live.cols != 0 &&
            (rows != live.rows || cols != live.cols)) {
            throw checkpoint_error("loco: the checkpoint's parameter '" +
                                   std::string(name_of(i)) + "' is " + std::to_string(rows) +
                                   " x " + std::to_string(cols) + " but this handle's is " +
                                   std::to_string(live.rows) + " x " + std::to_string(live.cols) +
                                   "; load a checkpoint of this model");
        }
    }
}

// Every parameter's name, in an optimizer stream since format 6 (a diloco stream has them in its
// fragment layout): the sizes and shapes alone let two parameters of one shape take each other's
// states when a model registers them in another order. name_of(i) names parameter i.
template <class NameOf>
void write_names(checkpoint_writer& w, std::size_t count, NameOf&& name_of) {
    for (std::size_t i = 0; i < count; ++i) w.text(name_of(i));
}
template <class NameOf>
void expect_names(checkpoint_reader& r, std::size_t count, NameOf&& name_of) {
    for (std::size_t i = 0; i < count; ++i) {
        r.expect_text(name_of(i), "a parameter's name (a model registers its parameters in the "
                                  "order it saved them)");
    }
}

// State of a policy kept as state_size arrays over the flat layout, its checkpoint section
// (name, state size, floats) and its accessor: shared by element-wise and per-matrix engines.
template <class Inner>
class flat_state {
public:
    static constexpr int state_size = Inner::state_size;

    explicit flat_state(const parameter_list& params)
        : total_(params.total_elements()),
          state_(static_cast<std::size_t>(state_size) * total_, 0.0f) {}

    std::span<const float> state(int j) const {
        check_state_index(j, state_size, "state");
        return {state_.data() + static_cast<std::size_t>(j) * total_, total_};
    }

    // The most state arrays any part of the optimizer keeps (parameter groups: the largest
    // group's), and array j as writable spans (none when j is not kept): what a per-state sync
    // (schedule/state_periods.hpp) averages over the workers.
    static constexpr int max_state_size = state_size;
    void state_views(int j, std::vector<std::span<float>>& out) {
        if (j >= 0 && j < state_size) {
            out.push_back({state_.data() + static_cast<std::size_t>(j) * total_, total_});
        }
    }

    void write(checkpoint_writer& w) const {
        w.text(Inner::name);
        w.u64(static_cast<std::uint64_t>(state_size));
        w.floats(state_);
    }
    using pending = std::vector<float>;
    pending read(checkpoint_reader& r) const {
        r.expect_text(Inner::name, "the inner optimizer");
        r.expect_u64(static_cast<std::uint64_t>(state_size), "the inner state size");
        pending next(state_.size());
        r.floats(next, "the inner optimizer state");
        return next;
    }
    void commit(pending&& next) noexcept { state_ = std::move(next); }

protected:
    std::size_t total_;
    std::vector<float> state_;  // state_size arrays of total_ floats
};

// The part of an inner optimizer that depends on the kind of policy: its state and how one step
// updates the parameters. This primary template serves element-wise policies; per-matrix policies
// (Muon) and parameter groups (groups.hpp) specialise it.
template <class Inner>
class inner_engine : public flat_state<Inner> {
    // A type with update_matrix is meant as a matrix policy: say what it lacks as one.
    static_assert(!requires { &Inner::update_matrix; } || matrix_optimizer<Inner>,
                  "loco: a per-matrix policy needs `struct hyper`, `using workspace`, `static "
                  "constexpr std::string_view name`, `static constexpr int state_size` (0 or 1) "
                  "and `static void update_matrix(const hyper&, std::uint64_t, float*, const "
                  "float*, float*, std::size_t rows, std::size_t cols, workspace&)`; see "
                  "docs/policies.md");
    // Not `has_update_matrix || check_elementwise_policy<Inner>()`: the call would still be
    // instantiated, and its static_asserts add a second, wrong sentence to a matrix policy's.
    static_assert([] {
        if constexpr (requires { &Inner::update_matrix; }) {
            return true;
        } else {
            return check_elementwise_policy<Inner>();
        }
    }());

public:
    using hyper_type = typename Inner::hyper;
    using flat_state<Inner>::flat_state;

    static void validate(const hyper_type& h) { validate_hyper<Inner>(h); }

    void apply(const hyper_type& h, std::uint64_t step, const parameter_list& params) {
        const auto k = Inner::prepare(h, step);
        for (const auto& p : params) {
            // No state: null, not null + offset (undefined behaviour).
            float* state = Inner::state_size > 0 ? this->state_.data() + p.offset : nullptr;
            backend::host::apply<Inner>(k, p.value.data, p.grad.data, state, this->total_,
                                        p.value.size);
        }
    }
};

// Per-matrix policies (Muon): each parameter is one matrix, or a stack of them (parameter::
// matrices, each updated on its own); its state is its slice of the flat state array, and one
// workspace serves every matrix (one per optimizer, so one per worker).
template <class Inner>
    requires matrix_optimizer<Inner>
class inner_engine<Inner> : public flat_state<Inner> {
public:
    using hyper_type = typename Inner::hyper;
    // The update of a matrix cannot be half applied: its gradients are always checked first,
    // whatever the non-finite policy.
    static constexpr bool needs_finite_gradients = true;

    explicit inner_engine(const parameter_list& params) : flat_state<Inner>(params) {
        require_matrices(params, Inner::name, "host_matrix");
        // The scratch memory of the largest matrix, now: a step that allocated it on the way
        // could fail after updating the matrices before it.
        if constexpr (requires(typename Inner::workspace& ws, std::size_t n) {
                          Inner::reserve(ws, n, n);
                      }) {
            for (const auto& p : params) Inner::reserve(workspace_, p.matrix_rows(), p.matrix_cols());
        }
    }

    static void validate(const hyper_type& h) { validate_hyper<Inner>(h); }

    // The refusals of apply, in advance: throws loco::nonfinite_error, before anything is
    // written, when a matrix's update would be refused (Muon: its Newton-Schulz input is not
    // finite, e.g. a momentum blend of finite values that overflows), so that apply never stops
    // after updating some matrices. A policy without `input_finite` is not checked here.
    void check_inputs(const hyper_type& h, const parameter_list& params) const {
        if constexpr (requires(const float* g, const float* s, std::size_t n) {
                          { Inner::input_finite(h, g, s, n, n) } -> std::convertible_to<bool>;
                      }) {
            for (const auto& p : params) {
                const std::size_t rows = p.matrix_rows();
                const std::size_t cols = p.matrix_cols();
                const std::size_t each = rows * cols;
                for (std::size_t m = 0; m < p.matrices; ++m) {
                    const float* s = Inner::state_size > 0
                                         ? this->state_.data() + p.offset + m * each
                                         : nullptr;
                    if (!Inner::input_finite(h, p.grad.data + m * each, s, rows, cols)) {
                        throw nonfinite_error(
                            "loco::inner::" + std::string(Inner::name) + ": the update of '" +
                            p.name + "'" +
                            (p.matrices > 1 ? " (stack index " + std::to_string(m) + " of " +
                                                  std::to_string(p.matrices) + ")"
                                            : std::string()) +
                            " is not finite (NaN or infinity in its gradient or state, or a "
                            "blend of them that overflows); the step was not applied");
                    }
                }
            }
        }
    }

    void apply(const hyper_type& h, std::uint64_t step, const parameter_list& params) {
        for (const auto& p : params) {
            const std::size_t rows = p.matrix_rows();
            const std::size_t cols = p.matrix_cols();
            const std::size_t each = rows * cols;
            for (std::size_t m = 0; m < p.matrices; ++m) {
                float* s =
                    Inner::state_size > 0 ? this->state_.data() + p.offset + m * each : nullptr;
                Inner::update_matrix(h, step, p.value.data + m * each, p.grad.data + m * each, s,
                                     rows, cols, workspace_);
            }
        }
    }

private:
    typename Inner::workspace workspace_{};
};

// An engine's check_inputs (per-matrix policies, parameter groups), where it has one: what else
// can refuse a step once the gradients are known to be finite, checked before anything moves.
template <class Engine, class Hyper>
void check_engine_inputs(const Engine& e, const Hyper& h, const parameter_list& params) {
    if constexpr (requires { e.check_inputs(h, params); }) {
        e.check_inputs(h, params);
    }
}

// Whether an engine must see finite gradients even under nonfinite_policy::ignore.
template <class Engine>
inline constexpr bool engine_needs_finite_gradients = [] {
    if constexpr (requires { Engine::needs_finite_gradients; }) {
        return Engine::needs_finite_gradients;
    } else {
        return false;
    }
}();

}  // namespace detail

template <class Inner>
class optimizer {
    using engine = detail::inner_engine<Inner>;

public:
    using policy = Inner;
    using hyper_type = typename engine::hyper_type;

    struct config {
        hyper_type inner{};
        nonfinite_policy on_nonfinite = nonfinite_policy::skip;
    };

    explicit optimizer(parameter_list params, config cfg = {})
        : params_(std::move(params)), cfg_(cfg), engine_(checked(params_)) {
        engine::validate(cfg_.inner);
    }

    // One update of every parameter from its gradient. Returns {applied = false} when a gradient
    // is not finite under nonfinite_policy::skip.
    step_result step() {
        if (!ready_to_step()) {
            ++skipped_;
            return {false, false};
        }
        apply_update();
        return {true, false};
    }

    hyper_type& hyper() noexcept { return cfg_.inner; }
    const hyper_type& hyper() const noexcept { return cfg_.inner; }
    nonfinite_policy on_nonfinite() const noexcept { return cfg_.on_nonfinite; }

    std::uint64_t steps() const noexcept { return steps_; }  // updates applied
    // Steps not applied: a non-finite gradient under nonfinite_policy::skip (and, in
    // loco::diloco, a first gradient computed before the worker received rank 0's parameters).
    std::uint64_t skipped_steps() const noexcept { return skipped_; }
    const parameter_list& params() const noexcept { return params_; }

    // State array j (0 <= j < state_size) over the flat layout of all parameters (policies with
    // one state layout; parameter groups expose theirs per group).
    std::span<const float> state(int j) const
        requires requires(const engine& e) { e.state(j); }
    {
        return engine_.state(j);
    }
    // The engine of a parameter-group optimizer: group<I>() (groups.hpp).
    const engine& engine_state() const noexcept { return engine_; }

    // The stream: the kind, every parameter's shape (format 5) and name (format 6), then the
    // section a diloco stream embeds (which records neither: diloco's stream has them already).
    void save(std::ostream& os) const {
        detail::checkpoint_writer w(os);
        w.text("optimizer");
        detail::write_shapes(w, detail::parameter_shapes(params_));
        detail::write_names(w, params_.size(), [&](std::size_t i) -> const std::string& {
            return params_[i].name;
        });
        write_section(w);
        w.finish();
    }

    // Restores a state written by save(). Throws checkpoint_error, leaving this optimizer as it
    // was, when the stream is truncated, corrupted, or from another policy or model (a matrix of
    // another shape, or parameters in another order, included; streams of formats 1 to 4
    // recorded no shapes, of format 5 no names).
    void load(std::istream& is) {
        detail::checkpoint_reader r(is);
        r.expect_text("optimizer", "the checkpoint kind");
        const auto name_of = [&](std::size_t i) -> const std::string& { return params_[i].name; };
        if (r.format() >= 5) {
            detail::expect_shapes(r, detail::parameter_shapes(params_), name_of);
        }
        if (r.format() >= 6) detail::expect_names(r, params_.size(), name_of);
        section pending = read_section(r);
        r.finish();
        commit(std::move(pending));
    }

private:
    template <class, class, class, class>
    friend class backend::host::diloco_engine;

    struct section {
        std::uint64_t steps = 0;
        std::uint64_t skipped = 0;
        typename engine::pending state;
    };

    // Checks that hold for every policy, before the engine allocates anything.
    static const parameter_list& checked(const parameter_list& params) {
        params.check_no_overlap();
        for (const auto& p : params) {
            if (p.value.space != memory_space::host) {
                throw memory_space_error(
                    "loco: parameter '" + p.name + "' is in " +
                    std::string(to_string(p.value.space)) +
                    " memory, but this build of loco runs the optimizer on the host; "
                    "pass host tensors");
            }
        }
        return params;
    }

    // Everything that can refuse a step, before anything changes: the hyper-parameters, the
    // gradients under the non-finite policy, and then (whatever the policy) every matrix's
    // Newton-Schulz input, which finite gradients can still make non-finite (an overflowing
    // blend): that throws nonfinite_error, so that no matrix, and no group, moves. False means
    // "skip this step".
    bool ready_to_step() {
        engine::validate(cfg_.inner);
        bool ready = true;
        if (cfg_.on_nonfinite != nonfinite_policy::ignore) {
            ready = gradients_finite(cfg_.on_nonfinite);
        } else if (detail::engine_needs_finite_gradients<engine>) {
            // A matrix policy cannot skip the check: under `ignore` a non-finite gradient of a
            // parameter it updates is refused as under `raise`, before any matrix changes (with
            // parameter groups, only the groups that need it are checked).
            ready = gradients_finite(nonfinite_policy::raise, /*only_where_needed=*/true);
        }
        if (ready) {
            detail::check_engine_inputs(engine_, cfg_.inner, params_);
        }
        return ready;
    }

    void apply_update() {
        engine_.apply(cfg_.inner, steps_ + 1, params_);
        ++steps_;
    }

    bool gradients_finite(nonfinite_policy on_bad, bool only_where_needed = false) {
        for (std::size_t i = 0; i < params_.size(); ++i) {
            const parameter& p = params_[i];
            if constexpr (requires { engine_.needs_finite_gradient(i); }) {
                if (only_where_needed && !engine_.needs_finite_gradient(i)) continue;
            }
            if (const auto hit = backend::host::find_nonfinite(p.grad.data, p.grad.size)) {
                if (on_bad == nonfinite_policy::raise) {
                    throw nonfinite_error("loco: the gradient of '" + p.name + "' holds " +
                                          std::to_string(hit->value) + " at element " +
                                          std::to_string(hit->index) +
                                          "; the step was not applied");
                }
                return false;
            }
        }
        return true;
    }

    // Layout first, so that a checkpoint of another model fails early.
    void write_section(detail::checkpoint_writer& w) const {
        detail::write_layout(w, params_);
        w.u64(steps_);
        w.u64(skipped_);
        engine_.write(w);
    }

    section read_section(detail::checkpoint_reader& r) const {
        detail::read_layout(r, params_);
        section s;
        s.steps = r.counter("the inner step count");
        s.skipped = r.counter("the skipped step count");
        s.state = engine_.read(r);
        return s;
    }

    void commit(section&& s) noexcept {
        steps_ = s.steps;
        skipped_ = s.skipped;
        engine_.commit(std::move(s.state));
    }

    parameter_list params_;
    config cfg_;
    engine engine_;
    std::uint64_t steps_ = 0;
    std::uint64_t skipped_ = 0;
};

}  // namespace loco
