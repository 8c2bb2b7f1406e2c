#pragma once
// DES-LOC's schedule (Iacob et al., "DES-LOC: Desynced Low Communication Adaptive Optimizers for
// Training Foundation Models", arXiv 2505.22549): every worker runs its own inner optimizer, and
// each quantity is averaged over the workers on its own period: the parameters every K_x calls,
// and array j of the inner optimizer's state (AdamW: 0 = first moment, 1 = second moment) every
// K_j calls. A slowly decaying state (Adam's v, half-life ln 0.5 / ln beta2) drifts little
// between workers, so it can sync rarely; the paper recommends K_u = 3 K_x and K_v = 6 K_x.
//
// Timing. The handle plans after the inner update of call c. The paper averages each quantity
// (parameters, u, v) before the update of its step t when t mod K == 0, the values the update of
// step t - 1 left; the authors' code (torchtitan's FL experiments) counts the optimizer steps of
// every quantity alike and averages it after the step that brings its count to K. Both give one
// rule for all three: after call c when c mod K == 0 (schedule::every's rule for the parameters).
// The averages of the parameters and of the states read different arrays, so their order in one
// call does not matter. With outer::sgd at lr 1 a parameter sync is exact parameter averaging,
// DES-LOC's; another outer optimizer turns it into a DiLoCo outer step.

#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/schedule/plan.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace loco::schedule {

class state_periods {
public:
    static constexpr std::string_view name = "state_periods";

    struct hyper {
        std::uint64_t every = 500;  // K_x, calls between two parameter syncs, >= 1
        // K_j, calls between two averages of inner state array j (one entry per array, from 0;
        // 0 or a missing entry: never). The default is the paper's K_u = 3 K_x, K_v = 6 K_x.
        std::vector<std::uint64_t> states = {1500, 3000};
    };

    // The paper's recommendation for a parameter period K_x: K_u = 3 K_x, K_v = 6 K_x. A product
    // past UINT64_MAX is UINT64_MAX (a period beyond any run), not the wrapped, short period.
    static hyper paper(std::uint64_t every) {
        const auto times = [](std::uint64_t a, std::uint64_t f) {
            return a > UINT64_MAX / f ? UINT64_MAX : a * f;
        };
        return {every, {times(every, 3), times(every, 6)}};
    }

    static void validate(const hyper& h) {
        if (h.every == 0) {
            throw invalid_argument(
                "loco::schedule::state_periods: the parameter period every (K_x) is 0; it must be "
                ">= 1 (give a state period of 0 to never sync that state)");
        }
    }
    static std::string describe(const hyper& h) {
        std::string s = "state_periods every=" + std::to_string(h.every) + " states=";
        for (std::size_t j = 0; j < h.states.size(); ++j) {
            s += (j ? "," : "") + std::to_string(h.states[j]);
        }
        return s;
    }
    static std::size_t fragments(const hyper&) noexcept { return 1; }
    // The handle checks these against the inner optimizer's state arrays (diloco.hpp).
    static std::span<const std::uint64_t> inner_state_periods(const hyper& h) noexcept {
        return h.states;
    }

    sync_plan next(const hyper& h) {
        ++calls_;
        plan_.clear();
        if (calls_ % h.every == 0) {
            plan_.start(0);
            plan_.finish(0);
        }
        for (std::size_t j = 0; j < h.states.size(); ++j) {
            if (h.states[j] != 0 && calls_ % h.states[j] == 0) {
                plan_.average_state(static_cast<int>(j));
            }
        }
        return plan_.view();
    }

    std::uint64_t calls() const noexcept { return calls_; }
    void save(detail::checkpoint_writer& w) const { w.u64(calls_); }
    static state_periods read(detail::checkpoint_reader& r) {
        state_periods s;
        s.calls_ = r.counter("the step call count");
        return s;
    }

    // Parameter syncs in the first `calls` calls: floor(calls / K_x).
    static std::uint64_t syncs(const hyper& h, std::uint64_t calls) { return calls / h.every; }
    // Averages of state array j in the first `calls` calls: floor(calls / K_j), as syncs() for
    // the parameters; 0 when the array never syncs.
    static std::uint64_t state_syncs(const hyper& h, std::size_t j, std::uint64_t calls) {
        const std::uint64_t k = j < h.states.size() ? h.states[j] : 0;
        return k == 0 ? 0 : calls / k;
    }

private:
    std::uint64_t calls_ = 0;
    plan_buffer plan_;
};

}  // namespace loco::schedule
