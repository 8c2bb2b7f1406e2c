#pragma once
// loco::diloco: the handle a trainer holds. Each worker runs the inner optimizer on its own
// parameters every step; when the schedule says so, the workers average their pseudo-gradients
//   delta = global - local            (old global minus new local, the sign of a gradient)
// and every worker applies the same outer optimizer step to the same global parameters, which are
// then written back into the user's tensors. Inner optimizer state is never reset.
//
// Algorithm 1 of DiLoCo (Douillard et al., arXiv 2311.08105); see docs/diloco.md.

#include <loco/backend/host/elementwise.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/none.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/exchange.hpp>
#include <loco/optimizer.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>
#include <loco/schedule/every.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <istream>
#include <ostream>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco {
template <class Inner, class Outer, class Compressor = compress::none,
          class Schedule = schedule::every>
class diloco {
    static_assert(compress::compressor<Compressor>,
                  "loco: the Compressor argument of loco::diloco is not a loco compressor; see "
                  "docs/compressors.md");
    static_assert(detail::check_elementwise_policy<Outer>());
    static_assert(detail::check_schedule_policy<Schedule>());

public:
    using inner_policy = Inner;
    using outer_policy = Outer;
    using compressor_policy = Compressor;
    using schedule_policy = Schedule;

    struct config {
        typename optimizer<Inner>::hyper_type inner{};
        typename Outer::hyper outer{};
        typename Schedule::hyper schedule{};
        typename Compressor::hyper compress{};
        nonfinite_policy on_nonfinite = nonfinite_policy::skip;
        // Start every worker from rank 0's parameters, as DiLoCo requires: one broadcast in
        // start() (not after load()). Turn off only when the trainer already guarantees
        // identical starts.
        bool broadcast_initial = true;
        // The number of workers this run was planned for; 0 accepts the communicator's size.
        int workers = 0;
        // How pseudo-gradients are averaged (exchange.hpp): automatic is one fp32 all-reduce
        // without compression and an all-gather of payloads with it.
        exchange_scheme exchange = exchange_scheme::automatic;
        // Seed of stochastic rounding; draws also depend on the rank and the sync.
        std::uint64_t seed = 0;
    };

    // Not collective: no communication happens before start() (or the first step() or sync()).
    diloco(parameter_list params, comm::communicator& comm, config cfg = {})
        : inner_(std::move(params), {cfg.inner, cfg.on_nonfinite}),
          comm_(&comm),
          outer_hyper_(cfg.outer),
          schedule_hyper_(cfg.schedule),
          compress_hyper_(cfg.compress),
          broadcast_initial_(cfg.broadcast_initial),
          seed_(cfg.seed),
          exchange_(plist(), cfg.exchange, comm.size(), comm.rank(), cfg.compress) {
        detail::validate_hyper<Outer>(outer_hyper_);
        detail::validate_hyper<Schedule>(schedule_hyper_);
        detail::validate_hyper<Compressor>(compress_hyper_);
        if (cfg.workers < 0) {
            throw invalid_argument("loco::diloco: workers must be >= 0 (0 = the communicator's size)");
        }
        if (cfg.workers != 0 && cfg.workers != comm.size()) {
            throw comm_error("loco::diloco: configured for " + std::to_string(cfg.workers) +
                             " workers but the " + std::string(comm.name()) +
                             " communicator has " + std::to_string(comm.size()) + " ranks");
        }
        if (comm.space() != plist().space() && !plist().empty()) {
            throw memory_space_error("loco::diloco: the parameters are in " +
                                     std::string(to_string(plist().space())) +
                                     " memory but the " + std::string(comm.name()) +
                                     " communicator moves " +
                                     std::string(to_string(comm.space())) + " memory");
        }
        const std::size_t total = plist().total_elements();
        global_.resize(total);
        backend::host::gather_values(plist(), global_.data());
        outer_state_.assign(static_cast<std::size_t>(Outer::state_size) * total, 0.0f);
        delta_.resize(total);
    }

    // Collective, once: takes the global snapshot from the parameters as they are now and, with
    // broadcast_initial, gives every worker rank 0's values. Call it after initialising the model
    // and before the first forward pass; otherwise the first step() or sync() calls it. Does
    // nothing after load(), which restores the saved snapshot. Returns true when it changed this
    // worker's parameters.
    bool start() {
        if (started_) {
            return false;
        }
        const std::size_t total = global_.size();
        backend::host::gather_values(plist(), global_.data());
        bool moved = false;
        if (broadcast_initial_ && comm_->size() > 1) {
            delta_ = global_;  // this worker's own values, to tell whether the broadcast moved them
            comm_->broadcast(comm::as_bytes(host_tensor(global_.data(), total)), 0);
            moved = std::memcmp(delta_.data(), global_.data(), total * sizeof(float)) != 0;
            backend::host::scatter_values(global_.data(), plist());
        }
        started_ = true;
        return moved;
    }

    // Inner step from the current gradients, then an outer sync if the schedule is due.
    // If the sync throws, the inner update of this call stays applied; sync() may be retried.
    step_result step() {
        detail::validate_hyper<Schedule>(schedule_hyper_);
        const bool ready = inner_.ready_to_step();  // may throw; nothing has changed yet
        // A gradient computed before this worker received rank 0's parameters belongs to other
        // parameters: it is not applied (call start() before the first forward pass to avoid it).
        const bool moved = start();
        step_result result;
        if (ready && !moved) {
            inner_.apply_update();
            result.applied = true;
        } else {
            ++inner_.skipped_;
        }
        ++calls_;
        if (Schedule::due(schedule_hyper_, calls_)) {
            sync();
            result.synced = true;
        }
        return result;
    }

    // Outer step now (collective). If it throws, parameters, global snapshot and outer state are
    // unchanged.
    void sync() {
        detail::validate_hyper<Outer>(outer_hyper_);
        detail::validate_hyper<Compressor>(compress_hyper_);
        start();
        const std::size_t total = global_.size();
        for (const auto& p : plist()) {
            for (std::size_t i = 0; i < p.value.size; ++i) {
                delta_[p.offset + i] = global_[p.offset + i] - p.value.data[i];
            }
        }
        compress::encode_context ctx;
        ctx.seed = seed_;
        ctx.round = outer_steps_ + skipped_syncs_;
        ctx.rank = comm_->rank();
        if constexpr (requires { outer_hyper_.lr; }) {
            ctx.outer_lr = outer_hyper_.lr;
        }
        exchange_.average(*comm_, delta_, compress_hyper_, ctx);
        if (inner_.on_nonfinite() != nonfinite_policy::ignore) {
            if (const auto hit = backend::host::find_nonfinite(delta_.data(), total)) {
                if (inner_.on_nonfinite() == nonfinite_policy::raise) {
                    throw nonfinite_error("loco::diloco: the averaged pseudo-gradient holds " +
                                          std::to_string(hit->value) + " at flat element " +
                                          std::to_string(hit->index) +
                                          "; the outer step was not applied");
                }
                // Every worker sees the same average, so every worker discards this round.
                ++skipped_syncs_;
                backend::host::scatter_values(global_.data(), plist());
                return;
            }
        }
        const auto k = Outer::prepare(outer_hyper_, outer_steps_ + 1);
        backend::host::apply<Outer>(k, global_.data(), delta_.data(), outer_state_.data(), total,
                                    total);
        ++outer_steps_;
        backend::host::scatter_values(global_.data(), plist());
    }

    // Hyper-parameters may be changed between steps (a learning-rate schedule); they are
    // validated again before they are used.
    typename optimizer<Inner>::hyper_type& inner_hyper() noexcept { return inner_.hyper(); }
    const typename optimizer<Inner>::hyper_type& inner_hyper() const noexcept { return inner_.hyper(); }
    typename Outer::hyper& outer_hyper() noexcept { return outer_hyper_; }
    const typename Outer::hyper& outer_hyper() const noexcept { return outer_hyper_; }
    typename Schedule::hyper& schedule_hyper() noexcept { return schedule_hyper_; }
    const typename Schedule::hyper& schedule_hyper() const noexcept { return schedule_hyper_; }
    typename Compressor::hyper& compress_hyper() noexcept { return compress_hyper_; }
    const typename Compressor::hyper& compress_hyper() const noexcept { return compress_hyper_; }

    std::uint64_t calls() const noexcept { return calls_; }          // step() calls
    std::uint64_t inner_steps() const noexcept { return inner_.steps(); }
    std::uint64_t outer_steps() const noexcept { return outer_steps_; }
    std::uint64_t skipped_steps() const noexcept { return inner_.skipped_steps(); }
    std::uint64_t skipped_syncs() const noexcept { return skipped_syncs_; }

    const parameter_list& params() const noexcept { return plist(); }
    comm::communicator& communicator() const noexcept { return *comm_; }
    // The global parameters after the last sync (before the first step: the parameters at
    // construction), in the flat layout.
    std::span<const float> global() const noexcept { return global_; }
    std::span<const float> inner_state(int j) const
        requires requires(const optimizer<Inner>& o) { o.state(j); }
    {
        return inner_.state(j);
    }
    // The inner optimizer (for parameter groups: inner().engine_state().group<I>()).
    const optimizer<Inner>& inner() const noexcept { return inner_; }
    // The compressor's state over the flat layout (error-feedback residuals), and, with
    // exchange_scheme::two_phase, its server-side state for this rank's chunk.
    std::span<const float> compressor_state() const noexcept { return exchange_.state(); }
    std::span<const float> server_state() const noexcept { return exchange_.server_state(); }
    exchange_scheme exchange() const noexcept { return exchange_.scheme(); }
    // Bytes this worker sends per sync (the formulas in exchange.hpp).
    std::uint64_t bytes_per_sync() const { return exchange_.bytes_per_average(compress_hyper_); }
    std::span<const float> outer_state(int j) const {
        detail::check_state_index(j, Outer::state_size, "outer state");
        const std::size_t total = global_.size();
        return {outer_state_.data() + static_cast<std::size_t>(j) * total, total};
    }

    // Writes this worker's full optimizer state: global snapshot, outer state, its own inner
    // state and the counters. Every worker saves its own stream (inner states differ).
    void save(std::ostream& os) const {
        detail::checkpoint_writer w(os);
        w.text("diloco");
        w.text(Outer::name);
        w.text(Compressor::name);
        w.text(Schedule::name);
        w.u64(static_cast<std::uint64_t>(comm_->size()));
        w.u64(static_cast<std::uint64_t>(comm_->rank()));
        w.u64(calls_);
        w.u64(outer_steps_);
        w.u64(skipped_syncs_);
        inner_.write_section(w);
        w.floats(global_);
        w.floats(outer_state_);
        w.text(to_string(exchange_.scheme()));
        w.floats(exchange_.state());
        w.floats(exchange_.server_state());
        w.finish();
    }

    // Restores a state written by save() on the same rank of a run with the same number of
    // workers, policies and model. Throws checkpoint_error and changes nothing otherwise. The
    // user's parameter tensors are not touched: they are the trainer's to save and restore.
    void load(std::istream& is) {
        detail::checkpoint_reader r(is);
        r.expect_text("diloco", "the checkpoint kind");
        r.expect_text(Outer::name, "the outer optimizer");
        r.expect_text(Compressor::name, "the compressor");
        r.expect_text(Schedule::name, "the sync schedule");
        r.expect_u64(static_cast<std::uint64_t>(comm_->size()), "the number of workers");
        r.expect_u64(static_cast<std::uint64_t>(comm_->rank()),
                     "the worker rank (each worker loads the checkpoint it saved)");
        const std::uint64_t calls = r.u64("the step call count");
        const std::uint64_t outer_steps = r.u64("the outer step count");
        const std::uint64_t skipped_syncs = r.u64("the skipped sync count");
        auto inner = inner_.read_section(r);
        std::vector<float> global(global_.size());
        r.floats(global, "the global parameters");
        std::vector<float> outer_state(outer_state_.size());
        r.floats(outer_state, "the outer optimizer state");
        r.expect_text(to_string(exchange_.scheme()), "the exchange scheme");
        std::vector<float> compressor_state(exchange_.state().size());
        r.floats(compressor_state, "the compressor state");
        std::vector<float> server_state(exchange_.server_state().size());
        r.floats(server_state, "the server-side compressor state");
        r.finish();

        inner_.commit(std::move(inner));
        calls_ = calls;
        outer_steps_ = outer_steps;
        skipped_syncs_ = skipped_syncs;
        global_ = std::move(global);
        outer_state_ = std::move(outer_state);
        std::copy(compressor_state.begin(), compressor_state.end(), exchange_.state().begin());
        std::copy(server_state.begin(), server_state.end(), exchange_.server_state().begin());
        started_ = true;
    }

private:

    const parameter_list& plist() const noexcept { return inner_.params(); }

    optimizer<Inner> inner_;
    comm::communicator* comm_;
    typename Outer::hyper outer_hyper_;
    typename Schedule::hyper schedule_hyper_;
    typename Compressor::hyper compress_hyper_;
    bool broadcast_initial_;
    std::uint64_t seed_;
    detail::exchanger<Compressor> exchange_;
    bool started_ = false;
    std::vector<float> global_;       // the global parameters after the last sync
    std::vector<float> outer_state_;  // Outer::state_size arrays over the flat layout
    std::vector<float> delta_;        // pseudo-gradient workspace
    std::uint64_t calls_ = 0;
    std::uint64_t outer_steps_ = 0;
    std::uint64_t skipped_syncs_ = 0;
};

}  // namespace loco
