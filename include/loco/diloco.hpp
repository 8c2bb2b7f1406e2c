#pragma once
// loco::diloco: the handle a trainer holds. Each worker runs the inner optimizer on its own
// parameters every step; when the schedule says so, the workers exchange their pseudo-gradients
//   delta = global - local            (old global minus new local, the sign of a gradient)
// of a fragment of the model (the whole model for DiLoCo), aggregate them (the mean), and every
// worker applies the same outer optimizer step to the same global parameters of that fragment,
// which are then merged into the user's tensors. Inner optimizer state is never reset.
//
// A sync is a pipeline whose stages are policies (docs/design.md, "The sync pipeline"):
//
//   step():  inner step
//            plan = schedule.next()                       which fragments start / finish / reset
//            start:   delta = global - local -> encode (compressor, error feedback)
//                     -> comm.start_*  (returns at once; the transfer overlaps the next steps)
//            finish:  request.finish() -> decode -> aggregate -> checks
//                     -> the ranks agree on one status word: applied everywhere or nowhere
//                     -> outer step on the fragment's global -> merge into local (alpha)
//
// Algorithm 1 of DiLoCo (Douillard et al., arXiv 2311.08105), Streaming DiLoCo (arXiv 2501.18512)
// and the one-outer-step delay of DiLoCoX; see docs/diloco.md and docs/schedules.md.
//
// The pipeline is written once, here. Where the arrays live and how each stage loops over them is
// the Backend policy's: loco::host_backend (the default; backend/host/diloco_engine.hpp) or
// loco::cuda_backend (fused launches on a stream; backend/cuda/diloco_engine.hpp, with the alias
// loco::cuda::diloco).

#include <loco/aggregate/aggregate.hpp>
#include <loco/aggregate/mean.hpp>
#include <loco/backend/host/diloco_engine.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/none.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/exchange.hpp>
#include <loco/fragments.hpp>
#include <loco/heal.hpp>
#include <loco/optimizer.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>
#include <loco/schedule/every.hpp>
#include <loco/schedule/plan.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <istream>
#include <limits>
#include <new>
#include <optional>
#include <ostream>
#include <sstream>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco {

namespace detail {

// A stateless schedule (`static bool due(hyper, calls)`) as a one-fragment planning schedule.
template <class S>
class due_schedule {
public:
    static constexpr std::string_view name = S::name;
    using hyper = typename S::hyper;

    static void validate(const hyper& h) { validate_hyper<S>(h); }
    static std::string describe(const hyper& h) { return describe_policy<S>(h); }
    static std::size_t fragments(const hyper&) noexcept { return 1; }

    schedule::sync_plan next(const hyper& h) {
        ++calls_;
        return S::due(h, calls_) ? schedule::whole_model_now : schedule::nothing_now;
    }
    std::uint64_t calls() const noexcept { return calls_; }
    void save(checkpoint_writer& w) const { w.u64(calls_); }
    static due_schedule read(checkpoint_reader& r) {
        due_schedule s;
        s.calls_ = r.counter("the step call count");
        return s;
    }

private:
    std::uint64_t calls_ = 0;
};

template <class S>
struct schedule_state {
    using type = S;
};
template <class S>
    requires(!planning_schedule<S> && stateless_schedule<S>)
struct schedule_state<S> {
    using type = due_schedule<S>;
};

// The kind of a loco error, so that every rank can raise the same type after a failed sync.
enum class error_kind : unsigned char { other, invalid, comm, wire, nonfinite, shape };

inline error_kind kind_of(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const invalid_argument&) {
        return error_kind::invalid;
    } catch (const comm_error&) {
        return error_kind::comm;
    } catch (const wire_error&) {
        return error_kind::wire;
    } catch (const nonfinite_error&) {
        return error_kind::nonfinite;
    } catch (const shape_error&) {
        return error_kind::shape;
    } catch (...) {
        return error_kind::other;
    }
}

inline std::string message_of(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    } catch (...) {
        return "unknown error";
    }
}

[[noreturn]] inline void raise(error_kind k, const std::string& what) {
    switch (k) {
        case error_kind::invalid: throw invalid_argument(what);
        case error_kind::comm: throw comm_error(what);
        case error_kind::wire: throw wire_error(what);
        case error_kind::nonfinite: throw nonfinite_error(what);
        case error_kind::shape: throw shape_error(what);
        case error_kind::other: break;
    }
    throw error(what);
}

}  // namespace detail

template <class Inner, class Outer, class Compressor = compress::none,
          class Schedule = schedule::every, class Aggregate = aggregate::mean,
          class Backend = host_backend>
class diloco {
    static_assert(compress::state_size_not_negative<Compressor>(),
                  "loco: a compressor's `state_size` (floats of state per element: 0, or 1 for a "
                  "residual) must be >= 0; see docs/compressors.md");
    static_assert(!compress::state_size_not_negative<Compressor>() ||  // said once, above
                      compress::compressor<Compressor>,
                  "loco: the Compressor argument of loco::diloco is not a loco compressor; see "
                  "docs/compressors.md");
    static_assert(detail::check_elementwise_policy<Outer>());
    static_assert(detail::check_schedule_policy<Schedule>());
    static_assert(detail::check_aggregate_policy<Aggregate>());

    using schedule_type = typename detail::schedule_state<Schedule>::type;
    using engine_type = typename Backend::template engine<Inner, Outer, Compressor, Aggregate>;

public:
    using inner_policy = Inner;
    using outer_policy = Outer;
    using compressor_policy = Compressor;
    using schedule_policy = Schedule;
    using aggregate_policy = Aggregate;
    using backend_policy = Backend;
    // Inner::hyper, or for loco::groups<...> the tuple of every group's hyper-parameters.
    using inner_hyper_type = typename engine_type::inner_hyper_type;

    struct config {
        inner_hyper_type inner{};
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
        // Which tensors each fragment syncs (fragments.hpp); default: automatic, near-equal bytes.
        fragment_layout fragments{};
        // The aggregation's hyper-parameters (aggregate/aggregate.hpp).
        typename Aggregate::hyper aggregate{};
        // Under nonfinite_policy::skip, more than this many syncs in a row of one fragment
        // discarded for a non-finite pseudo-gradient raise nonfinite_error naming the tensor (the
        // run has stalled; another fragment's syncs do not break the streak), as do more than
        // this many averages in a row of one inner state array (schedule::state_periods);
        // 0: never.
        std::uint64_t max_skipped_syncs = 10;
        // CUDA backend: the stream every launch goes to (the trainer's compute stream). Nothing
        // on the host.
        [[no_unique_address]] typename engine_type::stream_type stream{};
    };

    // Not collective: no communication happens before start() (or the first step() or sync()).
    // `params`: a parameter_list (host or CUDA memory, as the backend needs), or what the backend
    // accepts besides (the CUDA backend: a tensor table of bf16 parameters).
    template <class Params>
    diloco(Params&& params, comm::communicator& comm, config cfg = {})
        : engine_(std::forward<Params>(params), comm, cfg.inner, cfg.on_nonfinite, cfg.stream,
                  cfg.seed),
          comm_(&comm),
          outer_hyper_(cfg.outer),
          schedule_hyper_(cfg.schedule),
          compress_hyper_(cfg.compress),
          aggregate_hyper_(cfg.aggregate),
          broadcast_initial_(cfg.broadcast_initial),
          seed_(cfg.seed),
          max_skipped_syncs_(cfg.max_skipped_syncs) {
        detail::validate_hyper<Outer>(outer_hyper_);
        detail::validate_hyper<schedule_type>(schedule_hyper_);
        check_state_periods();
        detail::validate_hyper<Compressor>(compress_hyper_);
        detail::validate_hyper<Aggregate>(aggregate_hyper_);
        if (cfg.workers < 0) {
            throw invalid_argument(std::string(name()) +
                                   ": workers must be >= 0 (0 = the communicator's size)");
        }
        if (cfg.workers != 0 && cfg.workers != comm.size()) {
            throw comm_error(std::string(name()) + ": configured for " +
                             std::to_string(cfg.workers) + " workers but the " +
                             std::string(comm.name()) + " communicator has " +
                             std::to_string(comm.size()) + " ranks");
        }
        const std::size_t count = schedule_type::fragments(schedule_hyper_);
        fragment_pattern pattern = fragment_pattern::strided;
        if constexpr (requires { schedule_type::pattern(schedule_hyper_); }) {
            pattern = schedule_type::pattern(schedule_hyper_);
        }
        pattern_ = pattern;
        const auto lists = detail::resolve_fragments(tensors(), cfg.fragments, count, pattern);
        fragment_description_ = detail::describe_fragments(tensors(), lists);
        frags_.reserve(count);
        for (const auto& list : lists) {
            std::size_t n = 0;
            for (const std::size_t i : list) n += tensors()[i].value.size;
            frags_.push_back(fragment_state{list, n});
        }
        engine_.build(lists, cfg.exchange, compress_hyper_);
    }

    diloco(const diloco&) = delete;
    diloco& operator=(const diloco&) = delete;

    // Collective, once: checks that every rank built the same model and policies (a fingerprint
    // of tensor names and shapes, schedule, fragments, compressor, aggregation and outer policy;
    // invalid_argument naming the first difference otherwise), takes the global snapshot from
    // the parameters as they are now and, with broadcast_initial, gives every worker rank 0's
    // values. Call it after initialising the model and before the first forward pass; otherwise
    // the first step() or sync() calls it. After load(), which restores the saved snapshot, it
    // only compares the ranks (a checkpoint saved before start() leaves the handle unstarted,
    // format 6). Returns true when it changed this worker's parameters.
    bool start() {
        check_in_step();
        if (started_) {
            if (!compared_) {
                check_fingerprint(engine_.control_comm(), /*resumed=*/true);
                compared_ = true;
            }
            return false;
        }
        // Compared once: a snapshot that fails on this rank before its broadcast is posted (out
        // of memory) leaves its peers waiting in theirs, which the retry then meets.
        if (!compared_) {
            check_fingerprint(engine_.control_comm());
            compared_ = true;
        }
        const bool moved = engine_.snapshot(broadcast_initial_);
        started_ = true;
        return moved;
    }

    // Inner step from the current gradients, then what the schedule plans for this call (start
    // exchanges, apply fragments). If a sync throws, the inner update of this call stays applied
    // and nothing of the failed sync is.
    step_result step() {
        check_in_step();
        detail::validate_hyper<schedule_type>(schedule_hyper_);
        // The compressor's settings are read when an exchange starts, after the inner update and
        // the collectives of this call's finishes: checked here, a bad setting changes nothing.
        detail::validate_hyper<Compressor>(compress_hyper_);
        check_state_periods();
        check_fragment_count();
        // A schedule that refuses some changes of its hyper-parameters (streaming: H or tau with
        // an exchange in flight) says so before the inner update, so that nothing changes.
        if constexpr (requires { schedule_.check(schedule_hyper_); }) {
            schedule_.check(schedule_hyper_);
        }
        const bool ready = engine_.inner_ready();  // may throw; nothing has changed yet
        // A gradient computed before this worker received rank 0's parameters belongs to other
        // parameters: it is not applied (call start() before the first forward pass to avoid it).
        const bool moved = start();
        step_result result;
        result.received_initial = moved;
        if (ready && !moved) {
            engine_.inner_apply();
            result.applied = true;
        } else {
            engine_.inner_skip();
        }
        try {
            restart_loaded_exchanges();
            // A schedule that decides with its peers (schedule/wallclock.hpp) gets the
            // communicator. Host memory: over a GPU communicator, its staging view.
            if constexpr (requires { schedule_.use_communicator(engine_.control_comm()); }) {
                schedule_.use_communicator(engine_.control_comm());
            }
            const schedule::sync_plan plan = schedule_.next(schedule_hyper_);
            result.synced = !plan.finish.empty();
            run(plan);
            // A schedule that times the workers' steps (proportional) leaves the sync out.
            if constexpr (requires { schedule_.synced(schedule_hyper_); }) {
                if (result.synced) schedule_.synced(schedule_hyper_);
            }
        } catch (const std::bad_alloc&) {
            // Out of memory is this rank's alone (an agreed failure is raised as a loco error),
            // and may have come after the schedule counted the call but before this rank posted
            // the call's collectives (a streaming plan growing): out of step, as a failed start.
            mark_out_of_step(no_fragment, "running its sync");
            throw;
        }
        return result;
    }

    // Syncs every fragment now (collective): exchanges in flight are finished first, then every
    // fragment is exchanged and applied. If it throws, nothing of the failed fragment is applied.
    // The finish the schedule planned for an exchange finished here early is skipped when due.
    void sync() { finish_now(/*every_fragment=*/true); }

    // Finishes every exchange in flight now and applies it as its planned finish would (the
    // outer step, then the merge of the local values), starting none (collective): the end of a
    // run under the delayed or streaming schedules, whose last exchanges would otherwise never
    // be applied. sync() would then exchange every fragment once more, one more outer step (with
    // a pseudo-gradient of zero right after a round's end, which still moves the parameters by
    // the outer momentum). The finish the schedule planned for them is skipped.
    void flush() { finish_now(/*every_fragment=*/false); }

    // Hyper-parameters may be changed between steps (a learning-rate schedule); they are
    // validated again before they are used.
    inner_hyper_type& inner_hyper() noexcept { return engine_.inner().hyper(); }
    const inner_hyper_type& inner_hyper() const noexcept { return engine_.inner().hyper(); }
    typename Outer::hyper& outer_hyper() noexcept { return outer_hyper_; }
    const typename Outer::hyper& outer_hyper() const noexcept { return outer_hyper_; }
    typename Schedule::hyper& schedule_hyper() noexcept { return schedule_hyper_; }
    const typename Schedule::hyper& schedule_hyper() const noexcept { return schedule_hyper_; }
    typename Compressor::hyper& compress_hyper() noexcept { return compress_hyper_; }
    const typename Compressor::hyper& compress_hyper() const noexcept { return compress_hyper_; }
    typename Aggregate::hyper& aggregate_hyper() noexcept { return aggregate_hyper_; }
    const typename Aggregate::hyper& aggregate_hyper() const noexcept { return aggregate_hyper_; }

    std::uint64_t calls() const noexcept { return schedule_.calls(); }  // step() calls
    // The schedule's state: what its workers agreed (wallclock's last_window(), proportional's
    // local_steps() and speeds()), read between calls.
    const schedule_type& schedule() const noexcept { return schedule_; }
    std::uint64_t inner_steps() const { return engine_.inner().steps(); }
    // Outer steps applied, over all fragments (one per sync for DiLoCo), and per fragment.
    std::uint64_t outer_steps() const noexcept {
        std::uint64_t n = 0;
        for (const auto& f : frags_) n += f.outer_steps;
        return n;
    }
    std::uint64_t outer_steps(std::size_t fragment) const { return at(fragment).outer_steps; }
    std::uint64_t skipped_steps() const { return engine_.inner().skipped_steps(); }
    std::uint64_t skipped_syncs() const noexcept { return skipped_syncs_; }
    // Averages of inner state arrays (schedule::state_periods, DES-LOC) discarded for a
    // non-finite value, all arrays together.
    std::uint64_t skipped_state_syncs() const noexcept { return skipped_state_syncs_; }

    // The fragments the schedule syncs: each a list of parameter indices, in layout order.
    std::size_t fragments() const noexcept { return frags_.size(); }
    std::span<const std::size_t> fragment_params(std::size_t fragment) const {
        return at(fragment).params;
    }
    // Whether an exchange of the fragment is in flight (started, not applied yet).
    bool in_flight(std::size_t fragment) const { return at(fragment).in_flight; }

    // The parameters as registered (the host backend; the CUDA backend's table() holds its own).
    decltype(auto) params() const noexcept
        requires requires(const engine_type& e) { e.params(); }
    {
        return engine_.params();
    }
    comm::communicator& communicator() const noexcept { return *comm_; }
    // The global parameters after the last sync (before the first step: the parameters at
    // construction), in the flat layout. The host backend returns a view of its array, the CUDA
    // backend a copy (which waits for the stream).
    decltype(auto) global() const { return engine_.global(); }
    decltype(auto) inner_state(int j) const
        requires requires(const engine_type& e) { e.inner().state(j); }
    {
        return engine_.inner().state(j);
    }
    // The inner optimizer (for parameter groups: inner().engine_state().group<I>()).
    const auto& inner() const noexcept { return engine_.inner(); }
    // The backend's own accessors (CUDA: stream(), table(), device_exchange()).
    const engine_type& backend() const noexcept { return engine_; }
    decltype(auto) stream() const noexcept
        requires requires(const engine_type& e) { e.stream(); }
    {
        return engine_.stream();
    }
    decltype(auto) table() const noexcept
        requires requires(const engine_type& e) { e.table(); }
    {
        return engine_.table();
    }
    bool device_exchange() const
        requires requires(const engine_type& e) { e.device_exchange(); }
    {
        return engine_.device_exchange();
    }
    // The compressor's state over a fragment's elements in its own order (the flat layout when
    // the whole model is one fragment): error-feedback residuals; and, with
    // exchange_scheme::two_phase, its server-side state for this rank's chunk.
    decltype(auto) compressor_state(std::size_t fragment = 0) const {
        (void)at(fragment);
        return engine_.compressor_state(fragment);
    }
    decltype(auto) server_state(std::size_t fragment = 0) const {
        (void)at(fragment);
        return engine_.server_state(fragment);
    }
    exchange_scheme exchange() const noexcept { return engine_.scheme(); }
    // Bytes this worker sends per sync of every fragment: the exchange (the formulas in
    // exchange.hpp) and the all-or-nothing agreement (one float all-reduced, with M > 1).
    std::uint64_t bytes_per_sync() const {
        std::uint64_t n = 0;
        for (std::size_t f = 0; f < frags_.size(); ++f) {
            n += engine_.bytes_per_average(f, compress_hyper_) + agreement_bytes();
        }
        return n;
    }
    // Of bytes_per_sync(): what the all-or-nothing agreement adds to each fragment's sync.
    std::uint64_t agreement_bytes_per_sync() const { return agreement_bytes(); }
    // What start() sends once to compare the ranks' fingerprints (none with one rank).
    std::uint64_t fingerprint_bytes() const {
        const std::uint64_t m = static_cast<std::uint64_t>(comm_->size());
        if (m == 1) return 0;
        if (m >= 256) return 8 * (m - 1);  // the all-gather of 8-byte digests (check_fingerprint)
        const std::uint64_t r = static_cast<std::uint64_t>(comm_->rank());
        const std::uint64_t c = 16 * (r + 1) / m - 16 * r / m;  // this rank's chunk of 16 floats
        return 4 * (16 + (m - 2) * c);
    }
    // Bytes of the largest fragment's exchange: the peak a schedule with one fragment in flight
    // puts on the link at once.
    std::uint64_t peak_bytes_per_sync() const {
        std::uint64_t n = 0;
        for (std::size_t f = 0; f < frags_.size(); ++f) {
            n = std::max(n, engine_.bytes_per_average(f, compress_hyper_));
        }
        return n + agreement_bytes();
    }
    // Bytes this worker sends per average of inner state array j (schedule::state_periods,
    // DES-LOC): an fp32 all-reduce of the array (exchange.hpp's formula) and the all-or-nothing
    // agreement. Counted apart from bytes_per_sync(); 0 for an array the optimizer does not keep.
    std::uint64_t bytes_per_state_sync(int j) const
        requires requires(const engine_type& e) { e.bytes_per_state_average(j); }
    {
        if (j < 0 || j >= engine_type::inner_state_arrays) return 0;
        return engine_.bytes_per_state_average(j) + agreement_bytes();
    }
    // Array j of the outer optimizer's state, flat layout (host: a view; CUDA: a copy).
    decltype(auto) outer_state(int j) const {
        detail::check_state_index(j, Outer::state_size, "outer state");
        return engine_.outer_state(j);
    }

    // What start() compares between ranks and the checkpoint records, one "key: value" per line.
    std::string fingerprint() const {
        std::string s = "handle: diloco\n";
        for (const auto& p : tensors()) {
            s += "tensor: " + p.name + " " + std::to_string(p.value.size) + " elements";
            if (p.value.is_matrix()) {
                s += " " + std::to_string(p.value.rows) + "x" + std::to_string(p.value.cols);
            }
            s += "\n";
        }
        s += "schedule: " + detail::describe_policy<schedule_type>(schedule_hyper_) + "\n";
        s += "fragments: " + fragment_description_ + "\n";
        s += "compressor: " + detail::describe_policy<Compressor>(compress_hyper_) + "\n";
        s += "exchange: " + std::string(to_string(exchange())) + "\n";
        s += "aggregate: " + detail::describe_policy<Aggregate>(aggregate_hyper_) + "\n";
        s += "outer: " + detail::describe_policy<Outer>(outer_hyper_) + "\n";
        // Options that change what the ranks do together: whether start() broadcasts (ranks that
        // differ waited for each other's collective until a timeout), and after how many skipped
        // syncs every rank raises (a rank that raised alone left the others waiting). The inner
        // optimizer is each worker's own and is not compared.
        s += "broadcast_initial: " + std::string(broadcast_initial_ ? "true" : "false") + "\n";
        s += "max_skipped_syncs: " + std::to_string(max_skipped_syncs_) + "\n";
        return s;
    }

    // After load(): the state every rank must share, from its checkpoint. Ranks resumed from
    // checkpoints of different calls (one rank's last save failed, say) paired collectives of
    // the same size and each applied the mean to its own global model for good. The rounds of
    // every fragment, whether its exchange is in flight, and under a lockstep schedule the call
    // count (wallclock and proportional count each worker's own calls, which may differ).
    std::string resumed_state() const {
        std::string s;
        if constexpr (!requires(schedule_type& a, schedule_type b) { a.regrouped(std::move(b), true); }) {
            s += "resumed at: call " + std::to_string(schedule_.calls()) + "\n";
        }
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            const auto& f = frags_[i];
            s += "resumed fragment " + std::to_string(i) + ": " + std::to_string(f.outer_steps) +
                 " outer steps, " + std::to_string(f.skipped) + " skipped, " +
                 (f.restart ? "an exchange in flight" : "no exchange in flight") + "\n";
        }
        return s;
    }

    // Writes this worker's full optimizer state: global snapshot, outer state, its own inner
    // state, compressor state and counters, per fragment. Every worker saves its own stream
    // (inner states differ). An exchange in flight is saved as the pseudo-gradient it carries;
    // load() starts it again at the next step() or sync(), so a resumed run continues
    // bit-identically (every rank must resume from checkpoints of the same call; under a
    // schedule whose workers meet by rounds at their own calls, wallclock or proportional, of the
    // same point of the same round).
    void save(std::ostream& os) const {
        detail::checkpoint_writer w(os);
        w.text("diloco");
        w.text(Outer::name);
        w.text(Compressor::name);
        w.text(Schedule::name);
        w.text(detail::describe_policy<Compressor>(compress_hyper_));
        w.text(fragment_description_);
        write_shapes(w);  // format 4
        w.text(detail::describe_policy<Aggregate>(aggregate_hyper_));
        w.text(detail::describe_policy<Outer>(outer_hyper_));
        w.u64(static_cast<std::uint64_t>(comm_->size()));
        w.u64(static_cast<std::uint64_t>(comm_->rank()));
        write_counters(w);
        engine_.write_inner(w);
        w.floats(engine_.global());
        w.floats(engine_.outer_state());
        w.text(to_string(exchange()));
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            const fragment_state& f = frags_[i];
            // A loaded exchange that has not started again yet is still in flight.
            const bool flying = f.in_flight || f.restart;
            w.u64(f.outer_steps);
            w.u64(f.skipped);
            w.floats(engine_.compressor_state(i));
            w.floats(engine_.server_state(i));
            w.u64(flying ? 1 : 0);
            w.u64(flying ? f.started_at : 0);
            if (flying) {
                w.floats(engine_.captured(i));
            } else {
                w.floats(std::span<const float>());
            }
            w.u64(flying ? f.started_steps : 0);  // format 2
            w.u64(f.lost ? 1 : 0);                // format 2
            if constexpr (aggregate::stateful<Aggregate>) engine_.aggregate_state(i).save(w);
            if (flying) {  // format 5: what its encode used, for the restart
                // (unknown_outer_lr: loaded from a format 1-4 stream and not restarted yet)
                w.u64(f.sent_outer_lr ? std::bit_cast<std::uint32_t>(*f.sent_outer_lr)
                                      : unknown_outer_lr);
                w.text(detail::describe_policy<Compressor>(f.sent_with));
            }
        }
        // Format 6. Before start() the global snapshot is this worker's parameters at
        // construction, agreed with nobody: a handle loaded from it starts again (snapshot and,
        // with broadcast_initial, rank 0's values) as the run that saved it would have.
        w.u64(started_ ? 1 : 0);
        w.finish();
    }

    // Restores a state written by save() on the same rank of a run with the same number of
    // workers, policies (the compressor with the same settings, the same fragments) and model. Throws
    // checkpoint_error and changes nothing otherwise. The user's parameter tensors are not
    // touched: they are the trainer's to save and restore. The outer policy's hyper-parameters
    // are recorded but not compared (a learning-rate schedule may have moved them), nor are the
    // schedule's (a run may change H); an exchange in flight is finished when the live schedule
    // says, and a schedule that no longer plans it raises at that step.
    void load(std::istream& is) {
        detail::checkpoint_reader r(is);
        r.expect_text("diloco", "the checkpoint kind");
        r.expect_text(Outer::name, "the outer optimizer");
        r.expect_text(Compressor::name, "the compressor");
        expect_schedule_name(r);
        const std::string compressor = detail::describe_policy<Compressor>(compress_hyper_);
        r.expect_text(compressor, "the compressor settings");
        r.expect_text(fragment_description_, "the fragment layout");
        if (r.format() >= 4) expect_shapes(r);
        r.expect_text(detail::describe_policy<Aggregate>(aggregate_hyper_), "the aggregation");
        (void)r.text("the outer optimizer settings");
        r.expect_u64(static_cast<std::uint64_t>(comm_->size()), "the number of workers");
        r.expect_u64(static_cast<std::uint64_t>(comm_->rank()),
                     "the worker rank (each worker loads the checkpoint it saved)");
        counters read_back = read_counters(r);
        auto inner = engine_.read_inner(r);
        std::size_t total = 0;
        for (const auto& p : tensors()) total += p.value.size;
        std::vector<float> global(total);
        r.floats(global, "the global parameters");
        std::vector<float> outer_state(static_cast<std::size_t>(Outer::state_size) * total);
        r.floats(outer_state, "the outer optimizer state");
        r.expect_text(to_string(exchange()), "the exchange scheme");
        struct pending {
            std::uint64_t outer_steps, skipped, started_at, started_steps = 0;
            bool in_flight, lost = false;
            std::optional<float> sent_outer_lr;  // format 5
        };
        std::vector<pending> loaded;
        std::vector<typename engine_type::fragment_restore> restored;
        std::vector<aggregate::state_t<Aggregate>> aggregate_states;
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            pending p;
            typename engine_type::fragment_restore q;
            p.outer_steps = r.counter("a fragment's outer step count");
            p.skipped = r.counter("a fragment's skipped sync count");
            q.state.resize(engine_.compressor_state_size(i));
            r.floats(q.state, "the compressor state");
            q.server.resize(engine_.server_state_size(i));
            r.floats(q.server, "the server-side compressor state");
            const std::uint64_t flying = r.u64("whether an exchange was in flight");
            if (flying > 1) throw checkpoint_error("loco: checkpoint corrupted (in-flight flag)");
            p.in_flight = flying == 1;
            p.started_at = r.u64("the call an exchange started at");
            q.captured.resize(p.in_flight ? frags_[i].elements : 0);
            r.floats(q.captured, "the pseudo-gradient in flight");
            if (r.format() >= 2) {
                p.started_steps = r.u64("the inner step count an exchange started at");
                const std::uint64_t lost = r.u64("whether a planned finish has nothing");
                if (lost > 1 || (lost == 1 && p.in_flight)) {
                    throw checkpoint_error("loco: checkpoint corrupted (finish flag)");
                }
                p.lost = lost == 1;
            }
            if constexpr (aggregate::stateful<Aggregate>) {
                aggregate_states.push_back(aggregate::state_t<Aggregate>::read(r));
                // A state whose size the live fragment decides says so before anything changes.
                if constexpr (requires(const aggregate::state_t<Aggregate>& s) {
                                  s.check_loaded(std::size_t{}, std::size_t{}, std::size_t{});
                              }) {
                    aggregate_states.back().check_loaded(frags_[i].elements,
                                                         static_cast<std::size_t>(comm_->size()),
                                                         frags_[i].params.size());
                }
            }
            if (p.in_flight && r.format() >= 5) {
                const std::uint64_t lr = r.u64("the outer lr of an exchange in flight");
                if (lr > std::numeric_limits<std::uint32_t>::max() && lr != unknown_outer_lr) {
                    throw checkpoint_error("loco: checkpoint corrupted (the outer lr of an "
                                           "exchange in flight)");
                }
                if (lr != unknown_outer_lr) {
                    p.sent_outer_lr = std::bit_cast<float>(static_cast<std::uint32_t>(lr));
                }
                // The restart encodes with the live settings: refused if the exchange was started
                // with others (they were changed while it travelled), which would send another
                // payload than the run that saved it.
                const std::string sent = r.text("the compressor settings of an exchange in flight",
                                                std::max<std::uint64_t>(
                                                    detail::checkpoint_reader::max_text_bytes,
                                                    compressor.size()));
                if (sent != compressor) {
                    throw checkpoint_error(
                        "loco: fragment " + std::to_string(i) + "'s exchange in flight was "
                        "started with the compressor settings '" + sent + "', which changed to '" +
                        compressor + "' before the save; a resumed run cannot send it again as "
                        "it was sent: resume from a checkpoint saved after it was applied");
                }
            }
            loaded.push_back(p);
            restored.push_back(std::move(q));
        }
        bool was_started = true;  // formats 1 to 5 did not record it
        if (r.format() >= 6) {
            const std::uint64_t started = r.u64("whether the handle had started");
            if (started > 1) throw checkpoint_error("loco: checkpoint corrupted (started flag)");
            was_started = started == 1;
        }
        r.finish();
        // Older formats did not record which exchanges the schedule started (streaming: formats
        // 1 and 2; delayed: 1 to 4): those in flight, and those whose planned finish has nothing
        // (the schedule must still plan it). A schedule whose stream recorded it ignores this.
        if constexpr (requires(std::vector<bool> v) { read_back.schedule.resume_started(v); }) {
            if (r.format() < 5) {
                std::vector<bool> started;
                for (const pending& p : loaded) started.push_back(p.in_flight || p.lost);
                read_back.schedule.resume_started(std::move(started));
            }
        }
        for (const auto& f : frags_) {
            if (f.in_flight) {
                throw invalid_argument(std::string(name()) +
                                       ": load() while an exchange is in flight; load into a "
                                       "fresh handle, or before the first step()");
            }
        }

        // Everything that allocates before anything changes: a failure (out of memory) leaves
        // the handle as it was, not half loaded.
        auto restore_plan = engine_.prepare_restore(std::move(global), std::move(outer_state),
                                                    std::move(restored));
        engine_.commit_inner(std::move(inner));
        // Format 1 did not record the inner step count of an exchange in flight: the count at
        // the save stands in for it (aggregate::edit's step weights may then differ slightly).
        const std::uint64_t steps_at_save = engine_.inner().steps();
        engine_.restore(std::move(restore_plan));
        if constexpr (aggregate::stateful<Aggregate>) {
            for (std::size_t i = 0; i < frags_.size(); ++i) {
                engine_.restore_aggregate_state(i, std::move(aggregate_states[i]));
            }
        }
        adopt_counters(std::move(read_back));
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            auto& f = frags_[i];
            const auto& p = loaded[i];
            f.outer_steps = p.outer_steps;
            f.skipped = p.skipped;
            f.restart = p.in_flight;
            f.started_at = p.started_at;
            f.started_steps = r.format() >= 2 ? p.started_steps : steps_at_save;
            f.lost = p.lost;
            f.sent_with = compress_hyper_;
            f.sent_outer_lr = p.sent_outer_lr;  // formats 1 to 4: none (the restart's lr)
        }
        started_ = was_started;
        compared_ = false;  // the next start(), step() or sync() compares the ranks
        // Every rank resumes from its checkpoint of one call (the comparison above refuses
        // others), so a handle left out of step is in step again.
        out_of_step_ = false;
        out_of_step_why_.clear();
    }

    // Worker loss and rejoin (docs/reliability.md). Collective over `group`, called by every rank
    // of it: the handle goes on with the workers of `group` (the survivors of a failed sync, a
    // smaller or larger group, newcomers included) and keeps the global parameters, the outer
    // state, the schedule state and the round counters. A rank whose handle never started (a
    // newcomer, built with the same config on `group`) is healed from `donor`, which must be a
    // worker that did: it receives those values over the communicator, checked by a checksum on
    // every rank, its parameters become the global ones, and it takes part in the next sync
    // bit-identically; its inner optimizer and compressor residuals start from zero, as a fresh
    // worker's do. Survivors keep their parameters, inner state and residuals. Exchanges still in
    // flight on the old communicator are dropped on every rank (their fragments miss this round,
    // as after a failed sync); call regroup() while the old communicator still exists (it waits
    // for them, at most its timeout). The two-phase server residuals restart from zero (their
    // chunks follow the rank count). Every rank first checks that all were built alike, as in
    // start(). Throws, and changes nothing on any rank, if that check or the transfer fails
    // (but for the agreement's gap: the last collective failing on some ranks only, after the
    // others completed it, lets those others adopt the group; the recovery, every rank calling
    // regroup() again on a fresh group, is docs/reliability.md's).
    // Both backends: the group must move the memory the old communicator moved (on the CUDA
    // backend a GPU communicator's heal travels through its cuda_staging view).
    void regroup(comm::communicator& group, int donor = 0)
    {
        // Regrouping drops the exchanges in flight, which marks their communicator as one whose
        // ranks may disagree (comm::request): only a communicator being left may be so marked.
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            if (frags_[i].in_flight && &group == comm_) {
                throw invalid_argument(
                    "loco::diloco: regroup() onto the communicator this handle already uses, "
                    "while fragment " + std::to_string(i) + "'s exchange is in flight; call "
                    "sync() first, or regroup onto the new group's communicator");
            }
        }
        // The group's exchange buffers and its control communicator (host memory), built before
        // anything changes.
        auto next = engine_.prepare_regroup(group, compress_hyper_);
        comm::communicator& control = next.control();
        std::size_t total = 0;
        for (const auto& p : tensors()) total += p.value.size;
        // The shared state as the donor will send it; fragments in flight count as lost.
        ::loco::detail::text_stream out;
        {
            detail::checkpoint_writer w(out);
            w.text("diloco heal");
            w.u64(started_ ? 1 : 0);
            write_counters(w);
            w.floats(engine_.global());
            w.floats(engine_.outer_state());
            for (const auto& f : frags_) {
                w.u64(f.outer_steps);
                w.u64(f.skipped);
                w.u64(f.lost || f.in_flight || f.restart ? 1 : 0);
            }
            w.finish();
        }
        check_fingerprint(control);
        // The floats, each fragment's counters, the skip streaks' tensor names (the longest
        // streak's and each fragment's: at most the longest parameter name each, as
        // read_counters accepts), and 1 MiB for the schedule's state and the rest.
        const std::uint64_t limit = 4 * total * (1 + static_cast<std::uint64_t>(Outer::state_size)) +
                                    64 * frags_.size() +
                                    (frags_.size() + 1) * (8 + streak_name_bound()) + (1u << 20);
        const std::string blob = detail::share_from(control, donor, out.str(), limit);
        // Read everything into temporaries; every rank holds the same verified bytes, so every
        // rank reaches the same verdict.
        std::istringstream in(blob);
        detail::checkpoint_reader r(in);
        r.expect_text("diloco heal", "the healing state");
        if (r.u64("whether the donor started") != 1) {
            throw invalid_argument("loco::diloco: regroup() from rank " + std::to_string(donor) +
                                   ", a worker that never started; heal from a surviving worker");
        }
        counters read_back = read_counters(r);
        std::vector<float> global(total);
        std::vector<float> outer_state(static_cast<std::size_t>(Outer::state_size) * total);
        r.floats(global, "the global parameters");
        r.floats(outer_state, "the outer optimizer state");
        std::vector<std::uint64_t> counts(3 * frags_.size());
        for (std::size_t i = 0; i < frags_.size(); ++i) {  // checked as load() checks them
            counts[3 * i] = r.counter("a fragment's outer step count");
            counts[3 * i + 1] = r.counter("a fragment's skipped sync count");
            counts[3 * i + 2] = r.u64("whether a fragment's planned finish has nothing");
            if (counts[3 * i + 2] > 1) {
                throw checkpoint_error("loco: the healing state is corrupted (finish flag)");
            }
        }
        r.finish();
        engine_.stage_regroup(next, std::move(global), std::move(outer_state));

        // Commit: nothing below throws.
        const bool newcomer = !started_;
        comm_ = &group;
        engine_.adopt(std::move(next), !newcomer);
        // Every rank takes the donor's schedule state, which puts a lockstep schedule (every,
        // streaming, delayed, ...) back in step on every rank whatever each held. A schedule
        // with state of each worker's own (wallclock: its steps since the sync and its window;
        // proportional: its H_w and round) says what it takes: regrouped(donor, newcomer).
        if constexpr (requires(schedule_type& s, schedule_type d) { s.regrouped(std::move(d), true); }) {
            schedule_.regrouped(std::move(read_back.schedule), newcomer);
            adopt_counters(std::move(read_back), /*schedule_too=*/false);
        } else {
            adopt_counters(std::move(read_back));
        }
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            auto& f = frags_[i];
            f.outer_steps = counts[3 * i];
            f.skipped = counts[3 * i + 1];
            f.in_flight = false;
            f.restart = false;
            // No exchange is in flight on any rank now: a schedule that can forget its starts
            // forgets them all; another finds nothing at the donor's lost ones.
            if constexpr (requires { schedule_.forget(i); }) {
                schedule_.forget(i);
                f.lost = false;
            } else {
                f.lost = counts[3 * i + 2] == 1;
            }
            if (newcomer) merge(i, 0.0f);
        }
        started_ = true;
        compared_ = true;
        out_of_step_ = false;  // every rank of the new group is in step
        out_of_step_why_.clear();
    }

private:
    // In a checkpoint, the outer lr of an exchange in flight that was loaded from a format 1-4
    // stream (which did not record it) and not restarted since: the restart's lr stands in.
    static constexpr std::uint64_t unknown_outer_lr = std::uint64_t{1} << 32;

    // A fragment's syncs dropped in a row (for a non-finite aggregate, or refused by the
    // aggregation) and the tensor where the streak's first non-finite value was.
    struct skip_streak {
        std::uint64_t count = 0;
        std::string first_nonfinite;
    };

    // The schedule's state and the skip counters (checkpoints and regroup()): written, read into
    // a temporary, and adopted once everything else was read.
    struct counters {
        schedule_type schedule;
        std::uint64_t skipped_syncs;
        std::uint64_t consecutive_skips;  // the longest fragment streak (formats 1 to 4: the one)
        std::string first_nonfinite;
        std::uint64_t skipped_state_syncs = 0;            // format 3
        std::vector<std::uint64_t> state_skip_streaks{};  // format 3
        std::vector<skip_streak> fragment_streaks{};      // format 5, one per fragment
    };
    // The schedule's name. Formats 1 and 2 recorded a wrapping schedule by its own name alone
    // ("warmup"), which is accepted for such a stream (what it wrapped was not recorded).
    static void expect_schedule_name(detail::checkpoint_reader& r) {
        if constexpr (requires { Schedule::legacy_name; }) {
            if (r.format() < 3) {
                r.expect_text(Schedule::legacy_name, "the sync schedule");
                return;
            }
        }
        r.expect_text(Schedule::name, "the sync schedule");
    }
    // The longest fragment streak (the first such fragment's): what formats 1 to 4 recorded as
    // the handle's one streak, still written in its place.
    const skip_streak& longest_streak() const {
        static const skip_streak none{};
        const skip_streak* at = &none;
        for (const auto& f : frags_) {
            if (f.streak.count > at->count) at = &f.streak;
        }
        return *at;
    }
    // The longest skip streak name read_counters accepts: a parameter's name, which may be
    // longer than text()'s usual bound.
    std::uint64_t streak_name_bound() const {
        std::uint64_t bound = detail::checkpoint_reader::max_text_bytes;
        for (const auto& p : tensors()) bound = std::max<std::uint64_t>(bound, p.name.size());
        return bound;
    }
    void write_counters(detail::checkpoint_writer& w) const {
        schedule_.save(w);
        w.u64(skipped_syncs_);
        w.u64(longest_streak().count);
        w.text(longest_streak().first_nonfinite);
        w.u64(skipped_state_syncs_);  // format 3
        w.u64(state_skip_streaks_.size());
        for (const std::uint64_t n : state_skip_streaks_) w.u64(n);
        w.u64(frags_.size());  // format 5
        for (const auto& f : frags_) {
            w.u64(f.streak.count);
            w.text(f.streak.first_nonfinite);
        }
    }
    counters read_counters(detail::checkpoint_reader& r) const {
        schedule_type s = schedule_type::read(r);
        const std::uint64_t skipped = r.counter("the skipped sync count");
        const std::uint64_t consecutive = r.counter("the consecutive skipped sync count");
        const std::uint64_t name_bound = streak_name_bound();
        counters c{std::move(s), skipped, consecutive,
                   r.text("the first non-finite tensor", name_bound)};
        if (r.format() >= 3) {
            c.skipped_state_syncs = r.counter("the skipped state sync count");
            const std::uint64_t arrays = r.u64("the number of state skip streaks");
            if (arrays > 64) {
                throw checkpoint_error("loco: checkpoint corrupted: the number of state skip "
                                       "streaks has an implausible value");
            }
            c.state_skip_streaks.resize(static_cast<std::size_t>(arrays));
            for (auto& n : c.state_skip_streaks) n = r.counter("a state skip streak");
        }
        if (r.format() >= 5) {
            r.expect_u64(frags_.size(), "the number of fragment skip streaks");
            c.fragment_streaks.resize(frags_.size());
            for (auto& f : c.fragment_streaks) {
                f.count = r.counter("a fragment's skip streak");
                f.first_nonfinite =
                    r.text("the first non-finite tensor of a fragment's streak", name_bound);
            }
        } else {
            // The one streak of the handle then: every fragment continues it (exact with one
            // fragment; with several, a fragment that syncs next ends its own copy).
            c.fragment_streaks.assign(frags_.size(),
                                      skip_streak{c.consecutive_skips, c.first_nonfinite});
        }
        return c;
    }
    void adopt_counters(counters c, bool schedule_too = true) noexcept {
        if (schedule_too) schedule_ = std::move(c.schedule);
        skipped_syncs_ = c.skipped_syncs;
        skipped_state_syncs_ = c.skipped_state_syncs;
        state_skip_streaks_ = std::move(c.state_skip_streaks);
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            frags_[i].streak = std::move(c.fragment_streaks[i]);
        }
    }

    // The pipeline's bookkeeping of a fragment; its arrays are the backend's.
    struct fragment_state {
        std::vector<std::size_t> params;  // parameter indices, in layout order
        std::size_t elements = 0;
        std::uint64_t outer_steps = 0;
        std::uint64_t skipped = 0;      // syncs discarded for a non-finite aggregate
        std::uint64_t started_at = 0;     // the call its exchange in flight started at
        std::uint64_t started_steps = 0;  // the inner step count then (the aggregation's report)
        typename Compressor::hyper sent_with{};  // the compressor settings it was started with
        // The outer lr its encode used (error_feedback's fold_outer_lr reads it): a restarted
        // exchange (load()) is encoded again with it, not with the lr of the call it restarts at.
        std::optional<float> sent_outer_lr{};
        bool in_flight = false;           // an exchange started and not finished
        bool restart = false;             // loaded with an exchange in flight: start it again
        // The schedule's next planned finish has nothing to finish: sync() finished the exchange
        // early, regroup() dropped it, or a failed call never started it.
        bool lost = false;
        skip_streak streak{};  // max_skipped_syncs applies per fragment
    };

    static constexpr const char* name() noexcept { return engine_type::handle_name; }
    // The tensors as the pipeline sees them (names, sizes, shapes, flat offsets).
    decltype(auto) tensors() const noexcept { return engine_.tensors(); }

    const fragment_state& at(std::size_t f) const {
        if (f >= frags_.size()) {
            throw invalid_argument("loco::diloco: fragment " + std::to_string(f) +
                                   " does not exist (there are " + std::to_string(frags_.size()) +
                                   ")");
        }
        return frags_[f];
    }

    void check_fragment_count() const {
        if (schedule_type::fragments(schedule_hyper_) != frags_.size()) {
            throw invalid_argument("loco::diloco: the schedule now asks for " +
                                   std::to_string(schedule_type::fragments(schedule_hyper_)) +
                                   " fragments but the model was split into " +
                                   std::to_string(frags_.size()) +
                                   " at construction; keep the number of fragments");
        }
        if constexpr (requires { schedule_type::pattern(schedule_hyper_); }) {
            if (schedule_type::pattern(schedule_hyper_) != pattern_) {
                throw invalid_argument(
                    "loco::diloco: the schedule now asks for the " +
                    std::string(to_string(schedule_type::pattern(schedule_hyper_))) +
                    " fragment pattern but the model was split " +
                    std::string(to_string(pattern_)) + " at construction; keep the pattern");
            }
        }
    }

    // A schedule that averages inner state arrays (schedule/state_periods.hpp) may name only
    // arrays the inner optimizer keeps, on a backend that averages them.
    void check_state_periods() const {
        if constexpr (requires { schedule_type::inner_state_periods(schedule_hyper_); }) {
            static_assert(requires(engine_type& e) { e.average_state(0); },
                          "loco: per-state sync periods (schedule::state_periods, DES-LOC) need a "
                          "backend that averages inner state arrays: loco::host_backend, or "
                          "loco::cuda_backend without parameter groups");
            const auto periods = schedule_type::inner_state_periods(schedule_hyper_);
            for (std::size_t j = 0; j < periods.size(); ++j) {
                if (periods[j] != 0) check_state_array(static_cast<int>(j), periods[j]);
            }
        }
    }
    void check_state_array(int j, std::uint64_t period) const {
        if constexpr (requires { engine_type::inner_state_arrays; }) {
            const int kept = engine_type::inner_state_arrays;
            if (j >= 0 && j < kept) return;
            std::string inner = "the inner optimizer";
            if constexpr (requires { Inner::name; }) inner += " (" + std::string(Inner::name) + ")";
            throw invalid_argument(
                "loco::diloco: the " + std::string(Schedule::name) +
                " schedule averages inner state array " + std::to_string(j) +
                (period != 0 ? " (period " + std::to_string(period) + ")" : std::string()) +
                " but " + inner + " keeps " + std::to_string(kept) +
                " state array(s); set that period to 0 or drop the entry");
        } else {
            throw invalid_argument(std::string(name()) + ": this backend cannot average inner "
                                   "state arrays; use loco::host_backend");
        }
    }

    // Averages array j of every worker's inner state (DES-LOC): one fp32 mean all-reduce, then
    // the ranks agree as for a fragment: the average replaces the state on every rank, or on
    // none (a failure raises the same error everywhere; a non-finite average is skipped under
    // nonfinite_policy::skip).
    void average_inner_state(int j) {
        if constexpr (requires { engine_.average_state(j); }) {
            check_state_array(j, 0);
            detail::stage_failure failure = engine_.average_state(j);
            std::optional<backend::host::nonfinite_hit> hit;
            if (!failure) {
                try {
                    const nonfinite_policy policy = engine_.inner().on_nonfinite();
                    if (policy != nonfinite_policy::ignore) {
                        hit = engine_.state_nonfinite();
                        if (hit && policy == nonfinite_policy::raise) {
                            throw nonfinite_error(
                                std::string(name()) + ": the average of inner state array " +
                                std::to_string(j) + " holds " + std::to_string(hit->value) +
                                " at element " + std::to_string(hit->index) +
                                "; the state was not changed");
                        }
                    }
                } catch (...) {
                    failure.record(detail::sync_stage::apply, std::current_exception());
                }
            }
            const auto at = static_cast<std::size_t>(j);
            if (state_skip_streaks_.size() <= at) state_skip_streaks_.resize(at + 1, 0);
            if (agree(0, failure, hit.has_value(),
                      "the sync of inner state array " + std::to_string(j))) {
                // A non-finite average, skipped on every rank (the same outcome everywhere, so
                // every rank counts it and raises at the same sync).
                if (max_skipped_syncs_ != 0 && state_skip_streaks_[at] + 1 > max_skipped_syncs_) {
                    throw nonfinite_error(
                        "loco::diloco: " + std::to_string(state_skip_streaks_[at] + 1) +
                        " averages in a row of inner state array " + std::to_string(j) +
                        " were skipped for a non-finite value; the workers' optimizer states "
                        "no longer agree: fix the model or lower the learning rate (or raise "
                        "config.max_skipped_syncs)");
                }
                ++state_skip_streaks_[at];
                ++skipped_state_syncs_;
                return;
            }
            engine_.commit_state(j);
            state_skip_streaks_[at] = 0;
        } else {
            check_state_array(j, 0);
        }
    }

    // The plan of one call, in the order of the pipeline (see schedule/plan.hpp).
    void run(const schedule::sync_plan& plan) {
        // Whether this call's finishes are warm-up syncs (which teach the aggregation nothing and
        // merge with alpha 0); those of sync() and every other call are not.
        struct teaching {
            bool& flag;
            ~teaching() { flag = false; }
        } restore{warmup_sync_};
        warmup_sync_ = plan.warmup;
        const auto planned = [](std::span<const std::size_t> list, std::size_t f) {
            return std::find(list.begin(), list.end(), f) != list.end();
        };
        for (const std::size_t f : plan.start) {
            if (frags_[f].in_flight && !planned(plan.finish, f)) {
                throw invalid_argument("loco::diloco: the schedule starts fragment " +
                                       std::to_string(f) +
                                       " while its previous exchange was never finished; a "
                                       "schedule must finish every exchange it starts");
            }
            // An exchange finished within this call need not keep its pseudo-gradient (the CUDA
            // backend then forms it inside the encode); one left in flight keeps it for save().
            // (A planned finish with nothing to finish, `lost`, leaves the new exchange in flight.)
            const bool same_call =
                planned(plan.finish, f) && !frags_[f].in_flight && !frags_[f].lost;
            capture(f, !same_call);
        }
        // The starts whose exchange travels on past this call: if the call fails before one of
        // them starts, the finish planned for it has nothing (its fragment misses the round).
        // Both lists allocated before the first collective of the call (mark_out_of_step).
        std::vector<std::size_t> travelling, done;
        try {
            travelling.reserve(plan.start.size());
            done.reserve(plan.finish.size());
        } catch (...) {
            mark_out_of_step(no_fragment, "planning its sync");
            throw;
        }
        for (const std::size_t f : plan.start) {
            if (!planned(plan.finish, f) || frags_[f].in_flight || frags_[f].lost) {
                travelling.push_back(f);
            }
        }
        try {
            for (const std::size_t f : plan.finish) {
                if (frags_[f].in_flight) {
                    finish_fragment(f);
                    done.push_back(f);
                } else if (frags_[f].lost) {
                    frags_[f].lost = false;  // nothing to finish (see fragment_state); go on
                    done.push_back(f);
                }
            }
            for (const std::size_t f : plan.start) {
                start_exchange(f);
            }
            for (const std::size_t f : plan.finish) {
                if (planned(done, f)) continue;
                if (frags_[f].in_flight) {
                    finish_fragment(f);
                } else {
                    throw invalid_argument("loco::diloco: the schedule finishes fragment " +
                                           std::to_string(f) +
                                           " but no exchange of it is in flight; did its "
                                           "hyper-parameters change in the middle of a round?");
                }
            }
        } catch (...) {
            for (const std::size_t f : travelling) {
                if (!frags_[f].in_flight) nothing_to_finish(f);
            }
            // A start planned to finish within this call, started before the failure and not
            // finished: its exchange is waited for and dropped (nothing of it applied), so that
            // the fragment misses this round and starts afresh at its next sync. Left in flight,
            // every later sync of it applied the round before and sent its own on.
            for (const std::size_t f : plan.start) {
                if (frags_[f].in_flight && !planned(travelling, f)) drop_exchange(f);
            }
            throw;
        }
        for (const std::size_t f : plan.reset) {
            merge(f, 0.0f);
        }
        for (const int j : plan.states) {
            average_inner_state(j);
        }
    }

    // Waits for fragment f's exchange and drops it on every rank alike (the ranks agreed on the
    // failure that leaves it unfinished): nothing committed, as for a skipped round.
    void drop_exchange(std::size_t f) noexcept {
        frags_[f].in_flight = false;
        try {
            static_cast<void>(engine_.finish(f, frags_[f].sent_with, aggregate_hyper_));
        } catch (...) {
            // Its transfer failed too (the communicator that failed the call): nothing to drop.
        }
    }

    // Fragment f has no exchange for the finish its schedule planned (sync() or flush() finished
    // it early, regroup() dropped it, a failed call never started it). A schedule that can
    // forget a start (streaming) then plans no finish, so that its H and tau may change at once;
    // another keeps its plan, which finds nothing (`lost`) and is skipped.
    void nothing_to_finish(std::size_t f) {
        if constexpr (requires { schedule_.forget(f); }) {
            schedule_.forget(f);
            frags_[f].lost = false;
        } else {
            frags_[f].lost = true;
        }
    }

    // sync() and flush(): the exchanges in flight finished, then (sync) every fragment.
    void finish_now(bool every_fragment) {
        check_in_step();
        detail::validate_hyper<Compressor>(compress_hyper_);  // as step()
        // As step(): a merge alpha or fragment count changed since is refused before anything
        // moves (the merge reads alpha unchecked).
        detail::validate_hyper<schedule_type>(schedule_hyper_);
        check_fragment_count();
        // Fragments whose planned finish has nothing: already so, or finished here early. (The
        // exchanges below clear the flag as every start does; it is set again after them.)
        // Allocated before any collective of the call: failing here, this rank changed nothing
        // and posted nothing, and its retry meets its peers.
        std::vector<std::size_t> nothing_planned;
        nothing_planned.reserve(2 * frags_.size());
        start();
        restart_loaded_exchanges();
        for (std::size_t f = 0; f < frags_.size(); ++f) {
            if (frags_[f].lost) nothing_planned.push_back(f);
        }
        const auto mark = [&] {
            for (const std::size_t f : nothing_planned) {
                if (!frags_[f].in_flight) nothing_to_finish(f);
            }
        };
        try {
            for (std::size_t f = 0; f < frags_.size(); ++f) {
                if (!frags_[f].in_flight) continue;
                nothing_planned.push_back(f);
                finish_fragment(f);
            }
            for (std::size_t f = 0; every_fragment && f < frags_.size(); ++f) {
                start_fragment(f);
                finish_fragment(f);
            }
        } catch (const std::bad_alloc&) {
            mark_out_of_step(no_fragment, "running its sync");  // as in step()
            mark();
            throw;
        } catch (...) {
            mark();
            throw;
        }
        mark();
    }

    compress::encode_context context(std::size_t fi) const {
        const fragment_state& f = frags_[fi];
        compress::encode_context ctx;
        ctx.seed = seed_ + 0x9E3779B97F4A7C15ULL * fi;  // fragment 0 keeps DiLoCo's draws
        ctx.round = f.outer_steps + f.skipped;
        ctx.rank = comm_->rank();
        if constexpr (requires { outer_hyper_.lr; }) {
            ctx.outer_lr = outer_hyper_.lr;
        }
        return ctx;
    }

    void start_exchange(std::size_t fi) {
        fragment_state& f = frags_[fi];
        // A restarted exchange (load()) reports what it reported when it first started.
        if (!f.restart) f.started_steps = engine_.inner().steps();
        aggregate::worker_report report;
        if constexpr (Aggregate::needs_reports) {
            try {
                report.norm = engine_.captured_norm(fi);  // a device reduction on the GPU
            } catch (...) {
                mark_out_of_step(fi, "measuring its pseudo-gradient");
                throw;
            }
            report.inner_steps = static_cast<float>(f.started_steps);
        }
        // A restarted exchange (load()) is sent as it was first: with the settings load()
        // checked and the outer lr the checkpoint recorded (formats 1 to 4 did not: the lr in
        // force now stands in).
        if (!f.restart) f.sent_with = compress_hyper_;
        compress::encode_context ctx = context(fi);
        if (f.restart && f.sent_outer_lr) {
            ctx.outer_lr = *f.sent_outer_lr;
        } else {
            f.sent_outer_lr = ctx.outer_lr;
        }
        try {
            engine_.start(fi, f.sent_with, ctx, report);
        } catch (...) {
            mark_out_of_step(fi, "starting its exchange");
            throw;
        }
        f.in_flight = true;
        f.restart = false;
        f.lost = false;
        f.started_at = schedule_.calls();
    }

    void start_fragment(std::size_t fi) {
        capture(fi, false);
        start_exchange(fi);
    }

    // A failure on this rank before its exchange is posted (out of memory, a communicator that
    // refuses the start) is this rank's alone: its peers' collectives of this sync are posted and
    // wait for it, and its next sync's would pair with them (each rank averaging another round's
    // data without a word). So it leaves the handle out of step until regroup() or every rank's
    // load(). With one rank there is no peer to be out of step with: the next call may try
    // again. (step() and sync() mark any bad_alloc after the schedule counted the call too.)
    void capture(std::size_t fi, bool keep) {
        try {
            engine_.capture(fi, keep);
        } catch (...) {
            mark_out_of_step(fi, "capturing its pseudo-gradient");
            throw;
        }
    }
    static constexpr std::size_t no_fragment = static_cast<std::size_t>(-1);
    void mark_out_of_step(std::size_t fi, const char* stage) noexcept {
        if (comm_->size() == 1 || out_of_step_) return;
        out_of_step_ = true;  // first: the message below may fail to allocate
        try {
            std::string why;
            try {
                throw;
            } catch (const std::exception& e) {
                why = e.what();
            } catch (...) {
                why = "an unknown exception";
            }
            out_of_step_why_ = "rank " + std::to_string(comm_->rank()) + " failed" +
                           (fi == no_fragment ? std::string() : of_fragment(fi)) + " while " +
                           stage + " (" + why + ")";
        } catch (...) {  // NOLINT(bugprone-empty-catch): check_in_step says it without the why
        }
    }
    // Refuses every collective call of a handle left out of step (mark_out_of_step).
    void check_in_step() const {
        if (!out_of_step_) return;
        throw comm_error("loco::diloco: " +
                         (out_of_step_why_.empty() ? std::string("this rank failed during a sync")
                                                   : out_of_step_why_) +
                         ", a failure of this rank alone that its peers could not learn of: their "
                         "collectives of that sync were left unmatched, so this handle refuses to "
                         "sync on this communicator: call regroup() on a fresh communicator of "
                         "the ranks (docs/reliability.md), or load() every rank's checkpoint of "
                         "one call");
    }

    void restart_loaded_exchanges() {
        for (std::size_t fi = 0; fi < frags_.size(); ++fi) {
            fragment_state& f = frags_[fi];
            if (f.restart) {
                const std::uint64_t at = f.started_at;
                start_exchange(fi);
                f.started_at = at;
            }
        }
    }

    // Finishes the fragment's exchange; the ranks agree; then all of it is applied, or none.
    void finish_fragment(std::size_t fi) {
        fragment_state& f = frags_[fi];
        f.in_flight = false;
        f.lost = false;  // this is the planned finish, whatever its outcome
        // Decoded with the settings it was encoded with: compress_hyper() may have changed while
        // it travelled (a change applies from the next exchange that starts).
        detail::stage_failure failure = engine_.finish(fi, f.sent_with, aggregate_hyper_);

        // A warm-up sync (plan.warmup) is synchronous averaging: the local values become the
        // global ones, whatever the wrapped schedule's merge weight.
        float alpha = 0.0f;
        if constexpr (requires { schedule_type::merge_alpha(schedule_hyper_); }) {
            if (!warmup_sync_) alpha = schedule_type::merge_alpha(schedule_hyper_);
        }

        // The apply stage's checks and allocations, before anything changes.
        std::optional<backend::host::nonfinite_hit> hit;
        std::string streak_name;  // the tensor a skip streak starting here names
        if (!failure) {
            try {
                engine_.prepare_apply(fi, alpha);
                detail::validate_hyper<Outer>(outer_hyper_);
                // Also checked before each combine; here too for the device paths whose
                // aggregation runs inside the exchange (SparseLoCo's clipped scatter-mean).
                detail::validate_hyper<Aggregate>(aggregate_hyper_);
                const nonfinite_policy policy = engine_.inner().on_nonfinite();
                if (policy != nonfinite_policy::ignore) {
                    hit = engine_.find_nonfinite(fi);
                    if (!hit && !compress::carries_nonfinite<Compressor>(f.sent_with)) {
                        // A payload that cannot carry a non-finite value (DeMo's signs) hides a
                        // non-finite pseudo-gradient from the aggregate, robust or not; the
                        // residual this rank would keep shows it. Its vote skips the round on
                        // every rank.
                        if (auto r = engine_.find_nonfinite_residual(fi)) {
                            if (policy == nonfinite_policy::raise) {
                                throw nonfinite_error(
                                    std::string(name()) + ": the error-feedback residual would "
                                    "hold " + std::to_string(r->value) + " at flat element " +
                                    std::to_string(flat_index(fi, r->index)) + " (tensor '" +
                                    tensor_at(fi, r->index) + "'), from a non-finite "
                                    "pseudo-gradient the payload could not carry; the outer "
                                    "step was not applied");
                            }
                            hit = r;
                        }
                    }
                    if (hit && policy == nonfinite_policy::raise) {
                        throw nonfinite_error(
                            std::string(name()) + ": the averaged pseudo-gradient holds " +
                            (hit->value_known ? std::to_string(hit->value)
                                              : std::string("a non-finite value")) +
                            " at flat element " +
                            std::to_string(flat_index(fi, hit->index)) + " (tensor '" +
                            tensor_at(fi, hit->index) + "'); the outer step was not applied");
                    }
                }
                // Copied now: after the agreement a copy failing on this rank alone would leave
                // it behind its peers' skipped round.
                if (f.streak.count == 0 || f.streak.first_nonfinite.empty()) {
                    streak_name = tensor_at(fi, hit ? hit->index : 0);
                }
            } catch (...) {
                failure.record(detail::sync_stage::apply, std::current_exception());
            }
        }
        const bool skip = agree(fi, failure, hit.has_value(), {}, f.outer_steps + f.skipped);
        if constexpr (aggregate::can_refuse<Aggregate>) {
            if (!skip && engine_.refused(fi)) {
                // The aggregation refused this round on every rank (same data, same rule): nothing
                // applied, the local values back to the global ones (aggregate/aggregate.hpp);
                // the aggregation's state moves, the compressor's residual stays. Refusals count
                // towards max_skipped_syncs: EDiT's detectors learn from inliers only, so a run
                // whose every worker is flagged stays so, and used to stall without a word.
                if (max_skipped_syncs_ != 0 && f.streak.count + 1 > max_skipped_syncs_) {
                    throw error("loco::diloco: " + std::to_string(f.streak.count + 1) +
                                " syncs in a row" + of_fragment(fi) +
                                " applied nothing, the last refused by the "
                                "aggregation (" + std::string(Aggregate::name) + ": " +
                                std::string(aggregate::refusal_reason<Aggregate>()) +
                                "); training has stalled: check the "
                                "aggregation's settings against the workers' pseudo-gradients "
                                "(or raise config.max_skipped_syncs)");
                }
                if (f.streak.count == 0) f.streak.first_nonfinite.clear();
                if (!warmup_sync_) engine_.commit_aggregation(fi);
                ++f.skipped;
                ++skipped_syncs_;
                ++f.streak.count;
                f.lost = false;
                merge(fi, 0.0f);
                return;
            }
        }

        if (skip) {
            // (Set before the check below, which names it, and which leaves the round as if
            // skipped: the streak's tensor is all that moves.)
            if (f.streak.count == 0 || f.streak.first_nonfinite.empty()) {
                f.streak.first_nonfinite = std::move(streak_name);  // allocates nothing
            }
            if (max_skipped_syncs_ != 0 && f.streak.count + 1 > max_skipped_syncs_) {
                throw nonfinite_error(
                    "loco::diloco: " + std::to_string(f.streak.count + 1) +
                    " syncs in a row" + of_fragment(fi) +
                    " were skipped for a non-finite pseudo-gradient, first in "
                    "tensor '" + f.streak.first_nonfinite +
                    "'; training has stalled: fix the model or lower the learning rate (or raise "
                    "config.max_skipped_syncs)");
            }
            // Every worker sees the same aggregate, so every worker discards this round, and
            // commits nothing: a residual or aggregation state advanced on a non-finite round
            // would hold the non-finite values and spoil every later round.
            ++f.skipped;
            ++skipped_syncs_;
            ++f.streak.count;
            f.lost = false;
            merge(fi, 0.0f);
            return;
        }
        // A finite aggregate while this rank's residual went non-finite: an aggregation that
        // leaves out non-finite workers (trimmed_mean, median, centered_clip, edit) left this
        // one out, so nothing it sent was applied. It keeps its residual as it was, on its own
        // (the residual is this rank's alone); committed, the residual would keep the non-finite
        // values and exclude the worker for good.
        if (engine_.inner().on_nonfinite() != nonfinite_policy::ignore &&
            engine_.find_nonfinite_residual(fi)) {
            if (!warmup_sync_) engine_.commit_aggregation(fi);
        } else {
            engine_.commit(fi, !warmup_sync_);
        }
        engine_.apply(fi, outer_hyper_, f.outer_steps + 1, alpha);
        ++f.outer_steps;
        f.streak = {};
        f.lost = false;
    }

    // " of fragment i" where the model has several (a streak is a fragment's own).
    std::string of_fragment(std::size_t fi) const {
        return frags_.size() > 1 ? " of fragment " + std::to_string(fi) : std::string();
    }

    void merge(std::size_t fi, float alpha) { engine_.merge(fi, alpha); }

    // Every parameter's rows x cols, format 4 (detail::write_shapes: the layout alone let an
    // 8 x 6 matrix's checkpoint load into a 6 x 8 one). A side without a shape (a flat view, a
    // CUDA table entry given without one) has none to compare.
    void write_shapes(detail::checkpoint_writer& w) const {
        detail::write_shapes(w, detail::parameter_shapes(tensors()));
    }
    void expect_shapes(detail::checkpoint_reader& r) const {
        detail::expect_shapes(r, detail::parameter_shapes(tensors()),
                              [&](std::size_t i) -> const std::string& {
                                  return tensors()[i].name;
                              });
    }

    std::size_t flat_index(std::size_t fi, std::size_t index) const {
        for (const std::size_t i : frags_[fi].params) {
            const auto& p = tensors()[i];
            if (index < p.value.size) return p.offset + index;
            index -= p.value.size;
        }
        return index;
    }
    std::string tensor_at(std::size_t fi, std::size_t index) const {
        for (const std::size_t i : frags_[fi].params) {
            const auto& p = tensors()[i];
            if (index < p.value.size) return p.name;
            index -= p.value.size;
        }
        return "?";
    }

    // The ranks agree on the outcome of fragment fi's sync in one all-reduce of one float: a
    // rank adds 1 to skip a non-finite aggregate and M + 1 for a failure. Only after a failure do
    // the ranks exchange what went wrong, so that every rank raises the same error naming the
    // rank and stage that failed first (earliest stage, then lowest rank: a rank that could not
    // encode sends zeros its peers cannot decode). Returns whether to skip.
    //
    // With `rounds` (a fragment's applied and skipped rounds so far), the same float also says
    // whether the ranks went apart earlier: an agreement that failed on some ranks only, after
    // the others completed it (a lost last acknowledgement), has those others apply a round the
    // failing ones do not, and every later sync would average over different global models
    // without a word. Each rank adds B = M (M + 1) + 1 (above any status sum) when its count is
    // odd; ranks whose counts differ by one then sum to k B + status with 0 < k < M, and every
    // rank raises the same error, applying nothing, until regroup(). The sums stay exact in
    // floats below 2^24 for M < 256; larger groups go without this check.
    bool agree(std::size_t fi, const detail::stage_failure& failure, bool skip,
               const std::string& subject = {}, std::optional<std::uint64_t> rounds = {}) {
        const int world = comm_->size();
        if (world == 1) {
            if (failure) std::rethrow_exception(failure.error);
            return skip;
        }
        float status = failure ? static_cast<float>(world + 1) : skip ? 1.0f : 0.0f;
        constexpr int parity_world_limit = 256;
        const bool check_rounds = rounds.has_value() && world < parity_world_limit;
        const double w = static_cast<double>(world);
        const double odd_weight = w * (w + 1.0) + 1.0;
        if (check_rounds && (*rounds & 1u) != 0) status += static_cast<float>(odd_weight);
        try {
            engine_.control_comm().all_reduce(host_tensor(&status, 1), comm::reduce_op::sum);
        } catch (const std::bad_alloc&) {
            // Out of memory before the agreement was posted (a communicator allocates its
            // request first): the peers wait in theirs, as for a start that failed. Any other
            // error may have come after the others completed it, which the round parity finds.
            mark_out_of_step(fi, "agreeing on its sync");
            throw;
        }
        if (check_rounds) {
            const double total = static_cast<double>(status);
            const double odd = std::floor(total / odd_weight);
            status = static_cast<float>(total - odd * odd_weight);
            if (odd != 0.0 && odd != w) {
                throw comm_error(
                    "loco::diloco: the ranks went apart: " +
                    std::to_string(static_cast<long long>(odd)) + " of " +
                    std::to_string(world) + " ranks applied an odd number of rounds" +
                    of_fragment(fi) + ", the others an even number (an earlier sync's "
                    "agreement failed on some ranks only, after the others applied it; "
                    "docs/reliability.md); nothing was applied: regroup() from the rank whose "
                    "outer_steps() is highest, or restore every rank from one checkpoint");
            }
        }
        if (status < static_cast<float>(world + 1)) {
            return status > 0.0f;
        }
        // What each rank saw: its stage and error kind, then its message.
        constexpr std::size_t width = 384;
        std::vector<char> mine(width, '\0');
        if (failure) {
            mine[0] = static_cast<char>(failure.stage);
            mine[1] = static_cast<char>(detail::kind_of(failure.error));
            const std::string m = detail::message_of(failure.error);
            std::memcpy(mine.data() + 2, m.data(), std::min(m.size(), width - 3));
        }
        const auto m = static_cast<std::size_t>(world);
        std::vector<char> all(width * m, '\0');
        engine_.control_comm().all_gather({reinterpret_cast<const std::byte*>(mine.data()), width, 0, 0,
                           memory_space::host},
                          {reinterpret_cast<std::byte*>(all.data()), all.size(), 0, 0,
                           memory_space::host});
        std::size_t culprit = m;
        for (std::size_t k = 0; k < m; ++k) {
            const int stage = all[k * width];
            if (stage != 0 && (culprit == m || stage < all[culprit * width])) culprit = k;
        }
        if (culprit == m) {
            throw comm_error("loco::diloco: the ranks disagree on the outcome of a sync; nothing "
                             "was applied");
        }
        const char* at = all.data() + culprit * width;
        const auto stage = static_cast<detail::sync_stage>(at[0]);
        const auto kind = static_cast<detail::error_kind>(at[1]);
        const std::string what(at + 2, std::find(at + 2, at + width, '\0'));
        detail::raise(kind, "loco::diloco: " +
                                (subject.empty() ? "the sync of fragment " + std::to_string(fi)
                                                 : subject) +
                                " failed on rank " + std::to_string(culprit) + " at the " +
                                std::string(to_string(stage)) + " stage (" + what +
                                "); nothing was applied on any rank");
    }

    // The bytes agree() sends on the way to a successful sync (one float all-reduced).
    std::uint64_t agreement_bytes() const {
        const std::uint64_t m = static_cast<std::uint64_t>(comm_->size());
        if (m == 1) return 0;
        const std::uint64_t r = static_cast<std::uint64_t>(comm_->rank());
        const std::uint64_t c = (r + 1) / m - r / m;  // this rank's chunk of one element
        return 4 * (1 + (m - 2) * c);
    }

    // Every rank built the same model and policies, or every rank fails here naming the first
    // difference. One all-gather of a 64-bit digest; the descriptions travel only when the
    // digests differ.
    void check_fingerprint(comm::communicator& control, bool resumed = false) {
        const int world = control.size();
        if (world == 1) return;
        const std::string mine = resumed ? fingerprint() + resumed_state() : fingerprint();
        detail::fnv1a64 h;
        h.add(mine.data(), mine.size());
        const std::uint64_t digest = h.value();
        const auto m = static_cast<std::size_t>(world);
        // All digests are equal exactly when M * sum(x^2) == (sum x)^2 for each of their 8 bytes
        // x (Cauchy-Schwarz); the sums are exact in floats for M < 256 (sum(x^2) < 2^24), and
        // every rank reaches the same verdict from one all-reduce. Larger groups compare the
        // gathered digests themselves.
        constexpr std::size_t exact_in_floats = 256;
        if (m < exact_in_floats) {
            float sums[16];
            for (int b = 0; b < 8; ++b) {
                const float x = static_cast<float>((digest >> (8 * b)) & 0xff);
                sums[b] = x;
                sums[8 + b] = x * x;
            }
            control.all_reduce(host_tensor(sums, 16), comm::reduce_op::sum);
            bool same = true;
            for (int b = 0; b < 8; ++b) {
                same = same && static_cast<double>(m) * sums[8 + b] ==
                                   static_cast<double>(sums[b]) * static_cast<double>(sums[b]);
            }
            if (same) return;
        }
        std::vector<std::uint64_t> digests(m);
        control.all_gather({reinterpret_cast<const std::byte*>(&digest), sizeof digest, 0, 0,
                           memory_space::host},
                          {reinterpret_cast<std::byte*>(digests.data()), m * sizeof digest, 0, 0,
                           memory_space::host});
        std::size_t other = 0;
        while (other < m && digests[other] == digests[0]) ++other;
        if (other == m) {
            if (m >= exact_in_floats) return;  // every rank gathered the same equal digests
            other = 1;  // the sums differed but the digests agree: the wire changed one; the
                        // lines will tell
        }
        const std::uint64_t length = mine.size();
        std::vector<std::uint64_t> lengths(m);
        control.all_gather({reinterpret_cast<const std::byte*>(&length), sizeof length, 0, 0,
                           memory_space::host},
                          {reinterpret_cast<std::byte*>(lengths.data()), m * sizeof length, 0, 0,
                           memory_space::host});
        const std::uint64_t longest = *std::max_element(lengths.begin(), lengths.end());
        if (longest > (std::uint64_t{1} << 24)) {
            throw comm_error("loco::diloco: the ranks' fingerprints differ and their lengths arrived "
                             "corrupted; check the communicator");
        }
        const auto width = static_cast<std::size_t>(longest);
        std::vector<char> padded(width, '\0'), all(width * m, '\0');
        // At most `width`: lengths that arrived corrupted (shorter than this rank's fingerprint)
        // cut it short rather than overrun the buffer; every rank keeps the same width, so the
        // all-gather below still pairs.
        if (width != 0) std::memcpy(padded.data(), mine.data(), std::min(mine.size(), width));
        control.all_gather({reinterpret_cast<const std::byte*>(padded.data()), width, 0, 0,
                           memory_space::host},
                          {reinterpret_cast<std::byte*>(all.data()), all.size(), 0, 0,
                           memory_space::host});
        const auto lines_of = [&](std::size_t k) {
            std::vector<std::string> lines;
            std::string line;
            for (std::size_t i = 0; i < lengths[k]; ++i) {
                const char c = all[k * width + i];
                if (c == '\n') {
                    lines.push_back(line);
                    line.clear();
                } else {
                    line += c;
                }
            }
            return lines;
        };
        const auto a = lines_of(0), b = lines_of(other);
        std::size_t i = 0;
        while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
        if (i == a.size() && i == b.size()) {
            // The texts gathered agree where the digests did not: the wire changed the digests,
            // their sums or the lengths (every rank gathered the same, so every rank says so).
            throw comm_error("loco::diloco: the ranks' fingerprints differ but their texts "
                             "arrived alike: the comparison arrived corrupted; check the "
                             "communicator");
        }
        const std::string left = i < a.size() ? a[i] : "(nothing more)";
        const std::string right = i < b.size() ? b[i] : "(nothing more)";
        if (left.starts_with("resumed") || right.starts_with("resumed")) {
            throw invalid_argument("loco::diloco: the ranks resumed from checkpoints of different "
                                   "points of the run: rank 0 has '" + left + "' where rank " +
                                   std::to_string(other) + " has '" + right +
                                   "'; load on every rank its checkpoint of the same call");
        }
        throw invalid_argument("loco::diloco: the ranks were built differently: rank 0 has '" +
                               left + "' where rank " + std::to_string(other) + " has '" + right +
                               "'; build the same model, schedule, fragments and policies on "
                               "every rank");
    }

    engine_type engine_;
    comm::communicator* comm_;
    typename Outer::hyper outer_hyper_;
    typename Schedule::hyper schedule_hyper_;
    typename Compressor::hyper compress_hyper_;
    typename Aggregate::hyper aggregate_hyper_;
    bool broadcast_initial_;
    std::uint64_t seed_;
    std::uint64_t max_skipped_syncs_;
    schedule_type schedule_{};
    std::vector<fragment_state> frags_;
    std::string fragment_description_;
    fragment_pattern pattern_ = fragment_pattern::strided;  // the split made at construction
    bool started_ = false;
    bool compared_ = false;  // the ranks' fingerprints compared since the last load()
    // Why this rank's handle is out of step with its peers (mark_out_of_step); empty when not.
    bool out_of_step_ = false;
    std::string out_of_step_why_;
    std::uint64_t skipped_syncs_ = 0;
    // During a warm-up plan's finishes (run()): the aggregation learns nothing from them, and
    // they merge with alpha 0.
    bool warmup_sync_ = false;
    std::uint64_t skipped_state_syncs_ = 0;
    // Per inner state array j: its averages skipped in a row (a successful one resets it).
    std::vector<std::uint64_t> state_skip_streaks_;
};

}  // namespace loco
