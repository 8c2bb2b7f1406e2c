#pragma once
// loco::optimizer<Inner>: one inner optimizer over a parameter list, with no communication. It is
// the inner half of loco::diloco, and on its own a plain (host or fused-kernel) optimizer, e.g. for
// a data-parallel baseline that all-reduces gradients itself.

#include <loco/backend/host/elementwise.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>

#include <cstddef>
#include <cstdint>
#include <istream>
#include <ostream>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace loco {

// What a step does with a gradient (or an averaged pseudo-gradient) that holds NaN or infinity.
enum class nonfinite_policy : unsigned char {
    skip,   // leave parameters and state untouched, count the skip, go on (the default)
    raise,  // throw loco::nonfinite_error, leaving parameters and state untouched
    ignore  // apply the update anyway, without checking (saves one read of the gradients)
};

struct step_result {
    bool applied = false;  // the inner update was applied (false: skipped, non-finite gradient)
    bool synced = false;   // an outer sync ran after the inner step
};

template <class, class, class, class>
class diloco;

template <class Inner>
class optimizer {
    static_assert(detail::check_elementwise_policy<Inner>());

public:
    using policy = Inner;
    using hyper_type = typename Inner::hyper;

    struct config {
        hyper_type inner{};
        nonfinite_policy on_nonfinite = nonfinite_policy::skip;
    };

    explicit optimizer(parameter_list params, config cfg = {})
        : params_(std::move(params)), cfg_(cfg) {
        detail::validate_hyper<Inner>(cfg_.inner);
        params_.check_no_overlap();
        require_host_memory(params_);
        state_.assign(static_cast<std::size_t>(Inner::state_size) * params_.total_elements(), 0.0f);
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

    std::uint64_t steps() const noexcept { return steps_; }             // updates applied
    // Steps not applied: a non-finite gradient under nonfinite_policy::skip (and, in
    // loco::diloco, a first gradient computed before the worker received rank 0's parameters).
    std::uint64_t skipped_steps() const noexcept { return skipped_; }
    const parameter_list& params() const noexcept { return params_; }

    // State array j (0 <= j < Inner::state_size) over the flat layout of all parameters.
    std::span<const float> state(int j) const {
        check_state_index(j, Inner::state_size, "state");
        const std::size_t total = params_.total_elements();
        return {state_.data() + static_cast<std::size_t>(j) * total, total};
    }

    void save(std::ostream& os) const {
        detail::checkpoint_writer w(os);
        w.text("optimizer");
        write_section(w);
        w.finish();
    }

    // Restores a state written by save(). Throws checkpoint_error, leaving this optimizer as it
    // was, when the stream is truncated, corrupted, or from another policy or model.
    void load(std::istream& is) {
        detail::checkpoint_reader r(is);
        r.expect_text("optimizer", "the checkpoint kind");
        section pending = read_section(r);
        r.finish();
        commit(std::move(pending));
    }

private:
    template <class, class, class, class>
    friend class diloco;

    struct section {
        std::uint64_t steps = 0;
        std::uint64_t skipped = 0;
        std::vector<float> state;
    };

    static void require_host_memory(const parameter_list& params) {
        for (const auto& p : params) {
            if (p.value.space != memory_space::host) {
                throw memory_space_error(
                    "loco: parameter '" + p.name + "' is in " +
                    std::string(to_string(p.value.space)) +
                    " memory, but this build of loco runs the optimizer on the host; "
                    "pass host tensors");
            }
        }
    }

    static void check_state_index(int j, int state_size, const char* what) {
        if (j < 0 || j >= state_size) {
            throw invalid_argument(std::string("loco: ") + what + " index " + std::to_string(j) +
                                   " is outside [0, " + std::to_string(state_size) + ")");
        }
    }

    // Everything that can refuse a step, before anything changes: the hyper-parameters, and the
    // gradients under the non-finite policy. False means "skip this step".
    bool ready_to_step() {
        detail::validate_hyper<Inner>(cfg_.inner);
        return cfg_.on_nonfinite == nonfinite_policy::ignore || gradients_finite();
    }

    void apply_update() {
        const auto k = Inner::prepare(cfg_.inner, steps_ + 1);
        const std::size_t total = params_.total_elements();
        for (const auto& p : params_) {
            backend::host::apply<Inner>(k, p.value.data, p.grad.data, state_.data() + p.offset,
                                        total, p.value.size);
        }
        ++steps_;
    }

    bool gradients_finite() {
        for (const auto& p : params_) {
            if (const auto hit = backend::host::find_nonfinite(p.grad.data, p.grad.size)) {
                if (cfg_.on_nonfinite == nonfinite_policy::raise) {
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

    // Layout and policy identity first, so that a checkpoint of another model fails early.
    static void write_layout(detail::checkpoint_writer& w, const parameter_list& params) {
        w.u64(params.size());
        for (const auto& p : params) {
            w.u64(p.value.size);
        }
    }
    static void read_layout(detail::checkpoint_reader& r, const parameter_list& params) {
        r.expect_u64(params.size(), "the number of parameters");
        for (const auto& p : params) {
            r.expect_u64(p.value.size, "a parameter's element count");
        }
    }

    void write_section(detail::checkpoint_writer& w) const {
        w.text(Inner::name);
        w.u64(static_cast<std::uint64_t>(Inner::state_size));
        write_layout(w, params_);
        w.u64(steps_);
        w.u64(skipped_);
        w.floats(state_);
    }

    section read_section(detail::checkpoint_reader& r) const {
        r.expect_text(Inner::name, "the inner optimizer");
        r.expect_u64(static_cast<std::uint64_t>(Inner::state_size), "the inner state size");
        read_layout(r, params_);
        section s;
        s.steps = r.u64("the inner step count");
        s.skipped = r.u64("the skipped step count");
        s.state.resize(state_.size());
        r.floats(s.state, "the inner optimizer state");
        return s;
    }

    void commit(section&& s) noexcept {
        steps_ = s.steps;
        skipped_ = s.skipped;
        state_ = std::move(s.state);
    }

    parameter_list params_;
    config cfg_;
    std::vector<float> state_;
    std::uint64_t steps_ = 0;
    std::uint64_t skipped_ = 0;
};

}  // namespace loco
