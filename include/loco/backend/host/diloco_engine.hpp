#pragma once
// The host backend of loco::diloco: where the handle's pipeline (include/loco/diloco.hpp) keeps
// its arrays and how it loops over them when the parameters are in host memory. The pipeline
// (schedule plans, fragments in flight, the ranks' agreement, fingerprint, checkpoint) is the
// handle's; a backend supplies, per fragment, the loops of each stage:
//
//   capture   delta = global - local over the fragment's tensors
//   start     encode + start the exchange (exchange.hpp)          finish   wait, decode, aggregate
//   nonfinite where the aggregate is not finite                    commit   compressor state advances
//   apply     one outer step on the fragment's global values       merge    local <- lerp(global, local, alpha)
//
// and the flat copies of its state that the checkpoint writes. The CUDA backend
// (include/loco/backend/cuda/diloco_engine.hpp) supplies the same operations as fused launches.

#include <loco/aggregate/aggregate.hpp>
#include <loco/backend/host/elementwise.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/exchange.hpp>
#include <loco/optimizer.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace loco {

// loco::diloco::config::stream on the host: there is nothing to set.
struct no_stream {};

namespace backend::host {

template <class Inner, class Outer, class Compressor, class Aggregate>
class diloco_engine {
public:
    using inner_type = optimizer<Inner>;
    using inner_hyper_type = typename optimizer<Inner>::hyper_type;
    using stream_type = no_stream;
    static constexpr const char* handle_name = "loco::diloco";

    diloco_engine(parameter_list params, comm::communicator& comm, const inner_hyper_type& inner,
                  nonfinite_policy on_nonfinite, no_stream, std::uint64_t)
        : inner_(std::move(params), {inner, on_nonfinite}), comm_(&comm) {
        if (comm.space() != params_().space() && !params_().empty()) {
            throw memory_space_error("loco::diloco: the parameters are in " +
                                     std::string(to_string(params_().space())) +
                                     " memory but the " + std::string(comm.name()) +
                                     " communicator moves " +
                                     std::string(to_string(comm.space())) + " memory");
        }
    }

    // The tensors in layout order: names, sizes, shapes, flat offsets.
    const parameter_list& tensors() const noexcept { return params_(); }
    const parameter_list& params() const noexcept { return params_(); }
    // What the pipeline's own small collectives (agreement, fingerprint) run on.
    comm::communicator& control_comm() noexcept { return *comm_; }
    inner_type& inner() noexcept { return inner_; }
    const inner_type& inner() const noexcept { return inner_; }

    // The inner optimizer's checkpoint section (its own format, shared with optimizer::save).
    void write_inner(loco::detail::checkpoint_writer& w) const { inner_.write_section(w); }
    auto read_inner(loco::detail::checkpoint_reader& r) const { return inner_.read_section(r); }
    template <class Section>
    void commit_inner(Section&& s) {
        inner_.commit(std::forward<Section>(s));
    }

    // The inner step, in three parts so that the handle can decide in between.
    bool inner_ready() { return inner_.ready_to_step(); }
    void inner_apply() { inner_.apply_update(); }
    void inner_skip() { ++inner_.skipped_; }

    // One exchanger per fragment; the global snapshot from the parameters; zero outer state.
    void build(const std::vector<std::vector<std::size_t>>& lists, exchange_scheme scheme,
               const typename Compressor::hyper& h) {
        frags_.reserve(lists.size());
        for (const auto& list : lists) {
            std::vector<compress::segment> segs;
            std::size_t n = 0;
            for (const std::size_t i : list) {
                const auto& p = params_()[i];
                const bool matrix = p.value.is_matrix();
                segs.push_back({n, p.value.size, matrix ? p.value.rows : 1,
                                matrix ? p.value.cols : p.value.size});
                n += p.value.size;
            }
            frags_.push_back(fragment{list, n,
                                      loco::detail::exchanger<Compressor, Aggregate>(
                                          std::move(segs), scheme, comm_->size(), comm_->rank(), h),
                                      {}, {}});
        }
        const std::size_t total = params_().total_elements();
        global_.resize(total);
        gather_values(params_(), global_.data());
        outer_state_.assign(static_cast<std::size_t>(Outer::state_size) * total, 0.0f);
    }

    // global := the parameters; with `broadcast`, every worker then takes rank 0's values.
    // Returns whether this worker's parameters changed.
    bool snapshot(bool broadcast) {
        const std::size_t total = global_.size();
        gather_values(params_(), global_.data());
        if (!broadcast || comm_->size() == 1 || total == 0) return false;
        const std::vector<float> own = global_;
        comm_->broadcast(comm::as_bytes(host_tensor(global_.data(), total)), 0);
        const bool moved = std::memcmp(own.data(), global_.data(), total * sizeof(float)) != 0;
        scatter_values(global_.data(), params_());
        return moved;
    }

    // delta = global - local over the fragment, kept until its exchange finishes (the checkpoint
    // saves it while it is in flight). `keep` does not matter here: the host always keeps it.
    void capture(std::size_t fi, bool /*keep*/) {
        fragment& f = frags_[fi];
        f.captured.resize(f.elements);
        std::size_t at = 0;
        for (const std::size_t i : f.params) {
            const auto& p = params_()[i];
            for (std::size_t j = 0; j < p.value.size; ++j) {
                f.captured[at + j] = global_[p.offset + j] - p.value.data[j];
            }
            at += p.value.size;
        }
    }

    // The norm of the captured pseudo-gradient (for the aggregation's per-worker reports).
    float captured_norm(std::size_t fi) const {
        double sq = 0.0;
        for (const float x : frags_[fi].captured) sq += static_cast<double>(x) * x;
        return static_cast<float>(std::sqrt(sq));
    }

    void start(std::size_t fi, const typename Compressor::hyper& h,
               const compress::encode_context& ctx, const aggregate::worker_report& report) {
        fragment& f = frags_[fi];
        // Sized before the exchange is posted: finish() must not fail to allocate on one rank
        // with the collective in flight (the handle marks a failure here, before it).
        f.average.resize(f.elements);
        f.exchange.start(*comm_, f.captured, h, ctx, report);
    }

    // Waits for the exchange, decodes and aggregates; what failed, if anything.
    loco::detail::stage_failure finish(std::size_t fi, const typename Compressor::hyper& h,
                                       const typename Aggregate::hyper& ah) {
        fragment& f = frags_[fi];
        f.exchange.aggregate_hyper() = ah;
        f.exchange.finish(*comm_, f.average, h);
        return f.exchange.failure();
    }

    // The first non-finite value of the aggregate, its index counted over the fragment.
    std::optional<nonfinite_hit> find_nonfinite(std::size_t fi) const {
        const fragment& f = frags_[fi];
        return backend::host::find_nonfinite(f.average.data(), f.elements);
    }

    // The first non-finite value of the residual this round would commit, its index counted
    // over the fragment's elements.
    std::optional<nonfinite_hit> find_nonfinite_residual(std::size_t fi) {
        const fragment& f = frags_[fi];
        const std::span<const float> next = f.exchange.pending_state();
        auto hit = backend::host::find_nonfinite(next.data(), next.size());
        if (hit && f.elements != 0) hit->index %= f.elements;  // state arrays are fragment-sized
        return hit;
    }

    // aggregation: whether the aggregation's state moves too (not after a warm-up sync).
    void commit(std::size_t fi, bool aggregation = true) {
        frags_[fi].exchange.commit(aggregation);
    }
    void commit_aggregation(std::size_t fi) { frags_[fi].exchange.commit_aggregation(); }

    // The aggregation refused the round (aggregate/aggregate.hpp), and its state per fragment.
    bool refused(std::size_t fi) const noexcept { return frags_[fi].exchange.refused(); }
    const aggregate::state_t<Aggregate>& aggregate_state(std::size_t fi) const {
        return frags_[fi].exchange.aggregate_state();
    }
    void restore_aggregate_state(std::size_t fi, aggregate::state_t<Aggregate> s) {
        frags_[fi].exchange.restore_aggregate_state(std::move(s));
    }

    // apply() allocates nothing on the host: nothing to prepare before the ranks agree.
    void prepare_apply(std::size_t, float) const noexcept {}

    // One outer step (the fragment's `step`-th) on its global values and outer state, then the
    // merge of the new global values into the parameters.
    void apply(std::size_t fi, const typename Outer::hyper& h, std::uint64_t step, float alpha) {
        const fragment& f = frags_[fi];
        const std::size_t total = global_.size();
        const auto k = Outer::prepare(h, step);
        std::size_t at = 0;
        for (const std::size_t i : f.params) {
            const auto& p = params_()[i];
            // No state (outer::sgd): null, not null + offset (undefined behaviour).
            float* state = Outer::state_size > 0 ? outer_state_.data() + p.offset : nullptr;
            backend::host::apply<Outer>(k, global_.data() + p.offset, f.average.data() + at,
                                        state, total, p.value.size);
            at += p.value.size;
        }
        merge(fi, alpha);
    }

    // local <- lerp(global, local, alpha) over the fragment, as torch.lerp computes it (alpha = 0
    // copies the global values, alpha = 1 keeps the local ones exactly).
    void merge(std::size_t fi, float alpha) {
        for (const std::size_t i : frags_[fi].params) {
            const auto& p = params_()[i];
            const float* g = global_.data() + p.offset;
            float* x = p.value.data;
            if (alpha == 0.0f) {
                std::copy_n(g, p.value.size, x);
            } else if (alpha < 0.5f) {
                for (std::size_t j = 0; j < p.value.size; ++j) x[j] = g[j] + alpha * (x[j] - g[j]);
            } else {
                for (std::size_t j = 0; j < p.value.size; ++j) {
                    x[j] = x[j] - (x[j] - g[j]) * (1.0f - alpha);
                }
            }
        }
    }

    // State, in the flat layout (the checkpoint's and the accessors').
    std::span<const float> global() const noexcept { return global_; }
    std::span<const float> outer_state() const noexcept { return outer_state_; }
    std::span<const float> outer_state(int j) const noexcept {
        const std::size_t total = global_.size();
        return {outer_state_.data() + static_cast<std::size_t>(j) * total, total};
    }
    std::span<const float> compressor_state(std::size_t fi) const {
        return frags_[fi].exchange.state();
    }
    std::span<const float> server_state(std::size_t fi) const {
        return frags_[fi].exchange.server_state();
    }
    std::size_t compressor_state_size(std::size_t fi) const {
        return frags_[fi].exchange.state().size();
    }
    std::size_t server_state_size(std::size_t fi) const {
        return frags_[fi].exchange.server_state().size();
    }
    std::span<const float> captured(std::size_t fi) const { return frags_[fi].captured; }
    exchange_scheme scheme() const noexcept {
        return frags_.empty() ? exchange_scheme::all_reduce : frags_.front().exchange.scheme();
    }
    std::uint64_t bytes_per_average(std::size_t fi, const typename Compressor::hyper& h) const {
        return frags_[fi].exchange.bytes_per_average(h);
    }

    // Per-state syncs (schedule/state_periods.hpp, DES-LOC): array j of the inner optimizer's
    // state (per group for loco::groups, in group order) averaged over the workers by one fp32
    // mean all-reduce of a copy. In two parts, so that the handle can make the ranks agree in
    // between: average_state() changes no state (a failed transfer is recorded, not thrown),
    // commit_state() writes the average into the state.
    static constexpr int inner_state_arrays = loco::detail::inner_engine<Inner>::max_state_size;
    loco::detail::stage_failure average_state(int j) {
        loco::detail::stage_failure failure;
        std::vector<std::span<float>> views;
        inner_.engine_.state_views(j, views);
        state_average_.clear();
        for (const auto v : views) state_average_.insert(state_average_.end(), v.begin(), v.end());
        try {
            comm_->all_reduce(host_tensor(state_average_.data(), state_average_.size()),
                              comm::reduce_op::mean);
        } catch (const std::bad_alloc&) {
            throw;  // before the collective was posted: this rank's alone (diloco marks it)
        } catch (...) {
            failure.record(loco::detail::sync_stage::transfer, std::current_exception());
        }
        return failure;
    }
    std::optional<nonfinite_hit> state_nonfinite() const {
        return backend::host::find_nonfinite(state_average_.data(), state_average_.size());
    }
    void commit_state(int j) {
        std::vector<std::span<float>> views;
        inner_.engine_.state_views(j, views);
        std::size_t at = 0;
        for (const auto v : views) {
            std::copy_n(state_average_.data() + at, v.size(), v.data());
            at += v.size();
        }
    }
    // Bytes one average of state array j sends: the fp32 all-reduce's 4 (n + (M - 2) c), c this
    // rank's chunk of n / M (exchange.hpp).
    std::uint64_t bytes_per_state_average(int j) const {
        const std::uint64_t m = static_cast<std::uint64_t>(comm_->size());
        if (m == 1 || j < 0 || j >= inner_state_arrays) return 0;
        const std::uint64_t n = state_elements_[static_cast<std::size_t>(j)];
        const std::uint64_t r = static_cast<std::uint64_t>(comm_->rank());
        const std::uint64_t c = n * (r + 1) / m - n * r / m;
        return 4 * (n + (m - 2) * c);
    }

    // regroup() (diloco.hpp) in three steps, the first two free to throw with nothing changed:
    // prepare_regroup() checks that the group moves the parameters' memory and builds the
    // exchangers for it (same segments and scheme, its size and rank); stage_regroup() takes the
    // shared state the donor sent; adopt() commits. This worker's residuals carry over when `keep`
    // (a survivor), else start at zero (a newcomer); two-phase server residuals restart at zero
    // (their chunks follow the rank count). Adopting drops an exchange in flight on the old
    // communicator.
    struct regroup_plan {
        comm::communicator* group;
        std::vector<loco::detail::exchanger<Compressor, Aggregate>> exchanges;
        std::vector<float> global, outer_state;
        // Where the handle's own collectives over the group run (host memory).
        comm::communicator& control() const noexcept { return *group; }
    };
    regroup_plan prepare_regroup(comm::communicator& group,
                                 const typename Compressor::hyper& h) const {
        if (group.space() != params_().space() && !params_().empty()) {
            throw memory_space_error("loco::diloco: regroup() onto a " + std::string(group.name()) +
                                     " communicator that moves " +
                                     std::string(to_string(group.space())) +
                                     " memory; the parameters are in " +
                                     std::string(to_string(params_().space())) + " memory");
        }
        regroup_plan plan{&group, {}, {}, {}};
        plan.exchanges.reserve(frags_.size());
        for (const auto& f : frags_) {
            plan.exchanges.emplace_back(std::vector<compress::segment>(f.exchange.segments().begin(),
                                                                       f.exchange.segments().end()),
                                        f.exchange.scheme(), group.size(), group.rank(), h);
        }
        return plan;
    }
    void stage_regroup(regroup_plan& plan, std::vector<float> global,
                       std::vector<float> outer_state) const {
        plan.global = std::move(global);
        plan.outer_state = std::move(outer_state);
    }
    void adopt(regroup_plan plan, bool keep) noexcept {
        comm_ = plan.group;
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            fragment& f = frags_[i];
            if (keep) {
                const auto own = f.exchange.state();
                std::copy(own.begin(), own.end(), plan.exchanges[i].state().begin());
            }
            f.exchange = std::move(plan.exchanges[i]);
            f.captured.clear();
        }
        global_ = std::move(plan.global);
        outer_state_ = std::move(plan.outer_state);
    }

    // Replaces the whole state (a checkpoint that has been read completely) in two steps, as the
    // CUDA engine: prepare_restore() may throw with nothing changed, restore() cannot fail (it
    // moves the arrays in, and copies into arrays of their sizes).
    struct fragment_restore {
        std::vector<float> state, server, captured;
    };
    struct restore_plan {
        std::vector<float> global, outer_state;
        std::vector<fragment_restore> frags;
    };
    restore_plan prepare_restore(std::vector<float> global, std::vector<float> outer_state,
                                 std::vector<fragment_restore> frags) const {
        return {std::move(global), std::move(outer_state), std::move(frags)};
    }
    void restore(restore_plan plan) noexcept {
        global_ = std::move(plan.global);
        outer_state_ = std::move(plan.outer_state);
        for (std::size_t i = 0; i < frags_.size(); ++i) {
            fragment& f = frags_[i];
            fragment_restore& q = plan.frags[i];
            std::copy(q.state.begin(), q.state.end(), f.exchange.state().begin());
            std::copy(q.server.begin(), q.server.end(), f.exchange.server_state().begin());
            f.captured = std::move(q.captured);
        }
    }

private:
    struct fragment {
        std::vector<std::size_t> params;  // parameter indices, in layout order
        std::size_t elements = 0;
        loco::detail::exchanger<Compressor, Aggregate> exchange;
        std::vector<float> captured;  // the pseudo-gradient taken at start, kept until finish
        std::vector<float> average;   // the aggregate, at finish
    };

    const parameter_list& params_() const noexcept { return inner_.params(); }

    optimizer<Inner> inner_;
    comm::communicator* comm_;
    std::vector<fragment> frags_;
    std::vector<float> global_;       // the global parameters after the last sync
    std::vector<float> outer_state_;  // Outer::state_size arrays over the flat layout
    // Per-state syncs: the elements of each inner state array, and the average in progress.
    std::vector<std::size_t> state_elements_ = count_state_elements();
    std::vector<float> state_average_;

    std::vector<std::size_t> count_state_elements() {
        std::vector<std::size_t> n(static_cast<std::size_t>(inner_state_arrays), 0);
        for (int j = 0; j < inner_state_arrays; ++j) {
            std::vector<std::span<float>> views;
            inner_.engine_.state_views(j, views);
            for (const auto v : views) n[static_cast<std::size_t>(j)] += v.size();
        }
        return n;
    }
};

}  // namespace backend::host

// The backend policy of loco::diloco for parameters in host memory (the default).
struct host_backend {
    template <class Inner, class Outer, class Compressor, class Aggregate>
    using engine = backend::host::diloco_engine<Inner, Outer, Compressor, Aggregate>;
};

}  // namespace loco
