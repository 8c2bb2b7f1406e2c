#pragma once
// The CUDA backend of loco::diloco (include/loco/diloco.hpp): the same pipeline, its stages as
// launches on the trainer's stream. Select it with loco::cuda_backend as the handle's last
// argument, or through the alias loco::cuda::diloco (backend/cuda/diloco.hpp).
//
//   inner step    two launches (non-finite check, fused update); no host synchronisation.
//                 With Inner = loco::groups<...> (backend/cuda/groups.hpp): the check, then each
//                 group's launches (fused update, or Muon's cuBLAS step)
//   fragments     each fragment of the schedule is a table of its own (its tensors, its padded
//                 layout, the whole model's fp32 masters) with its own global values, outer state,
//                 exchange buffers and counters; DiLoCo's one fragment is the whole model
//
// A fragment's exchange takes one of five paths, chosen at construction:
//   - fused (a compressor with a device implementation, a GPU communicator, all_gather or
//     automatic, the mean): one encode kernel forms the pseudo-gradient (phase 1), adds it into
//     the error-feedback residual and writes the host compressor's payload byte for byte
//     (backend/cuda/compress/, compress_topk.hpp); a split-phase all-gather of the payloads in
//     device memory; at finish one check of every payload (a malformed one is a failure of the
//     decode stage, agreed by every rank before anything is written); after the agreement one
//     kernel decodes, averages in rank order and applies the outer step (for topk: a scatter per
//     rank, then the outer step). The new residual goes to a second buffer that replaces the old
//     one at commit;
//   - device all-reduce (no compressor, a GPU communicator, the mean): phase 1 into a delta
//     buffer, a split-phase fp32 all-reduce of it, then the check and the outer step;
//   - device aggregation (an aggregation with a device implementation: edit, trimmed_mean,
//     median, centered_clip, median_norm_clip; a GPU communicator; at most 64 workers; no
//     compressor or a dense one of the fused path): without a compressor, phase 1 into the delta
//     buffer and a split-phase all-gather of every worker's fp32 delta in device memory; with
//     one, the fused path's encode and all-gather, then the payload check and each payload
//     decoded into its row; the workers' reports through cuda_staging; then
//     backend/cuda/aggregate.hpp: per-worker norms and the per-element rules as kernels, the
//     policy's decisions (detectors, weights, refusal) in its own host code; the aggregate lands
//     in the aggregation's own buffer, and the policy's state (EDiT's detectors, centered clipping's center
//     on the device) advances at commit;
//   - chunked (compress::sparseloco or compress::demo, chunk target <= 64, a GPU communicator,
//     all_gather or automatic; the mean, SparseLoCo's median_norm_clip, DeMo's scatter_mean, or
//     rows of a device aggregation): compress/chunked_exchange.hpp. The pseudo-gradient in the
//     delta buffer, one encode into the next accumulator, a split-phase all-gather of the
//     payloads, at finish the device check of every payload (the host decoder's refusals, agreed
//     by every rank), then the mean of the decoded payloads, the clipped scatter-mean (norms on
//     the device, factors by the policy's host code) or DeMo's coefficient scatter-mean into the
//     exchange's buffer, and the outer step;
//   - host (everything else: two_phase, statistical per row or 8-bit, another aggregation or one
//     with a compressor, a host communicator): the pseudo-gradient is copied to the host and
//     exchanged by the host exchanger (exchange.hpp), over comm::cuda_staging when the
//     communicator moves device memory.
// An exchange left in flight across step() calls (streaming, delayed) keeps its pseudo-gradient in
// the delta buffer, which the checkpoint saves. The pipeline's own small collectives (agreement,
// fingerprint) travel as host memory, through cuda_staging for a GPU communicator.

#include <loco/aggregate/aggregate.hpp>
#include <loco/aggregate/mean.hpp>
#include <loco/aggregate/scatter_mean.hpp>
#include <loco/backend/cuda/aggregate.hpp>
#include <loco/backend/cuda/compress.hpp>
#include <loco/backend/cuda/compress/chunked_exchange.hpp>
#include <loco/backend/cuda/compress_topk.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/groups.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/merge.hpp>
#include <loco/backend/cuda/optimizer.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/backend/host/elementwise.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/comm/cuda_staging.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/none.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/exchange.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco::backend::cuda {
namespace detail {

// One segment per tensor of a fragment's table; shapes from the tensors' description.
inline std::vector<compress::segment> table_segments(const tensor_table& table,
                                                     std::span<const parameter> tensors,
                                                     std::span<const std::size_t> indices) {
    std::vector<compress::segment> segs;
    for (std::size_t k = 0; k < table.size(); ++k) {
        const std::size_t n = table.spec(k).size;
        compress::segment s{table.flat_offset(k), n, 1, n};
        const parameter& p = tensors[indices[k]];
        if (p.value.is_matrix()) {
            s.rows = p.value.rows;
            s.cols = p.value.cols;
        }
        segs.push_back(s);
    }
    return segs;
}

// What a fused device exchange keeps: the payload plan, the send and receive buffers, the
// error-feedback residual (current and next, padded layout) and the payload check.
template <class Plan, class Check>
struct exchange_buffers {
    exchange_buffers(Plan p, const tensor_table& table, int ranks, bool feedback)
        : plan(std::move(p)),
          send(plan.payload_bytes()),
          recv(plan.payload_bytes() * static_cast<std::size_t>(ranks)),
          residual(feedback ? table.padded_elements() : 0),
          next(feedback ? table.padded_elements() : 0),
          check(ranks) {
        residual.zero(nullptr);
        next.zero(nullptr);  // its padding is never written, and must stay zero
    }

    Plan plan;
    device_buffer<std::byte> send, recv;
    device_buffer<float> residual, next;
    Check check;
};

// blockwise, cast, statistical (backend/cuda/compress/), each also inside error_feedback<>.
template <class Compressor>
struct device_exchange
    : exchange_buffers<compress_plan<typename device_compressor<Compressor>::codec>,
                       payload_check> {
    using support = device_compressor<Compressor>;
    static constexpr bool feedback = support::feedback;

    device_exchange(const tensor_table& table, int ranks, const typename Compressor::hyper&)
        : device_exchange::exchange_buffers(compress_plan<typename support::codec>(table), table,
                                            ranks, feedback) {}

    void replan(const tensor_table&, const typename Compressor::hyper&) {}
};

// compress::topk and error_feedback<topk> (compress_topk.hpp). The layout depends on the ratio
// (k per tensor): an exchange with another ratio than the plan's re-plans first, keeping the
// residual.
template <class Compressor>
struct topk_device_exchange : exchange_buffers<topk_plan, topk_payload_check> {
    using support = device_topk<Compressor>;
    static constexpr bool feedback = support::feedback;

    topk_device_exchange(const tensor_table& table, int ranks, const typename Compressor::hyper& h)
        : topk_device_exchange::exchange_buffers(topk_plan(table, support::codec_hyper(h)), table,
                                                 ranks, feedback) {}

    void replan(const tensor_table& table, const typename Compressor::hyper& h) {
        const compress::topk::hyper& ch = support::codec_hyper(h);
        if (loco::detail::float_bits(ch.ratio) ==
            loco::detail::float_bits(this->plan.hyper().ratio)) {
            return;
        }
        topk_plan fresh(table, ch);
        device_buffer<std::byte> s(fresh.payload_bytes());
        device_buffer<std::byte> r(fresh.payload_bytes() * this->check.ranks());
        this->plan = std::move(fresh);
        this->send = std::move(s);
        this->recv = std::move(r);
    }
};

struct no_device_exchange {
    static constexpr bool feedback = false;
};

}  // namespace detail

template <class Inner, class Outer, class Compressor, class Aggregate>
class diloco_engine {
    // Top-k's device path averages the payloads (the mean only); with another aggregation the
    // payloads take the host exchanger, which gives median_norm_clip their support (docs/
    // aggregation.md, "On the GPU"). Ungated, those handles did not compile.
    static constexpr bool device_topk_ =
        device_topk<Compressor>::available && std::is_same_v<Aggregate, aggregate::mean>;
    // compress::sparseloco and compress::demo (compress/chunked_exchange.hpp): aggregated by the
    // exchange itself (the mean; SparseLoCo's median-norm clipped scatter-mean), or decoded into
    // the rows of another device aggregation.
    static constexpr bool chunked_ = device_chunked<Compressor>::available;
    static constexpr bool chunked_aggregates_ =
        chunked_ && (std::is_same_v<Aggregate, aggregate::mean> ||
                     (std::is_same_v<Compressor, compress::sparseloco> &&
                      std::is_same_v<Aggregate, aggregate::median_norm_clip>) ||
                     (std::is_same_v<Compressor, compress::demo> &&
                      std::is_same_v<Aggregate, aggregate::scatter_mean>));
    static constexpr bool chunked_rows_ =
        chunked_ && !chunked_aggregates_ && has_device_aggregation<Aggregate> &&
        !std::is_same_v<Aggregate, aggregate::median_norm_clip>;
    static constexpr bool device_compression =
        ((has_device_compressor<Compressor> || device_topk_) &&
         std::is_same_v<Aggregate, aggregate::mean>) ||
        (has_device_compressor<Compressor> && has_device_aggregation<Aggregate>) ||
        chunked_aggregates_ || chunked_rows_;
    using device_exchange_t = std::conditional_t<
        !device_compression, detail::no_device_exchange,
        std::conditional_t<
            chunked_, chunked_exchange<Compressor>,
            std::conditional_t<device_topk_, detail::topk_device_exchange<Compressor>,
                               detail::device_exchange<Compressor>>>>;

public:
    using inner_type = loco::cuda::optimizer<Inner>;
    // Inner::hyper, or for loco::groups<...> the tuple of every group's hyper-parameters.
    using inner_hyper_type = typename inner_type::hyper_type;
    using stream_type = cudaStream_t;
    static constexpr const char* handle_name = "loco::cuda::diloco";

    // fp32 parameters in device memory (element-wise inner policies and parameter groups).
    diloco_engine(const parameter_list& params, comm::communicator& comm,
                  const inner_hyper_type& inner, nonfinite_policy on_nonfinite,
                  cudaStream_t stream, std::uint64_t seed)
        : inner_(params, {inner, on_nonfinite, stream, seed}), comm_(&comm) {
        for (const parameter& p : params) tensors_.push_back(p);
        init_control(comm);
    }

    // A table of fp32 or bf16 parameters (element-wise inner policies; parameter groups route a
    // parameter_list).
    diloco_engine(tensor_table table, comm::communicator& comm, const inner_hyper_type& inner,
                  nonfinite_policy on_nonfinite, cudaStream_t stream, std::uint64_t seed)
        requires(!loco::cuda::detail::is_groups<Inner>)
        : inner_(std::move(table), {inner, on_nonfinite, stream, seed}), comm_(&comm) {
        const tensor_table& t = inner_.table_;
        for (std::size_t i = 0; i < t.size(); ++i) {
            parameter p;
            p.name = t.spec(i).name;
            // The entry's shape, where it has one: the chunked compressors cut it as a matrix
            // and the checkpoint records it, as for a parameter_list.
            p.value = tensor_view<float>{nullptr, t.spec(i).size, t.spec(i).rows, t.spec(i).cols,
                                         memory_space::cuda};
            p.offset = t.flat_offset(i);
            tensors_.push_back(std::move(p));
        }
        init_control(comm);
    }

    diloco_engine(const diloco_engine&) = delete;
    diloco_engine& operator=(const diloco_engine&) = delete;

    const std::vector<parameter>& tensors() const noexcept { return tensors_; }
    comm::communicator& control_comm() noexcept { return staging_ ? *staging_ : *comm_; }
    inner_type& inner() noexcept { return inner_; }
    const inner_type& inner() const noexcept { return inner_; }
    cudaStream_t stream() const noexcept { return inner_.stream(); }
    const tensor_table& table() const noexcept { return inner_.table_; }
    // True when every fragment's exchange takes the fused device path (the top of the file).
    bool device_exchange() const noexcept {
        for (const auto& f : frags_) {
            if (!f->device) return false;
        }
        return !frags_.empty();
    }

    void write_inner(loco::detail::checkpoint_writer& w) const { inner_.write_section(w); }
    auto read_inner(loco::detail::checkpoint_reader& r) const { return inner_.read_section(r); }
    template <class Section>
    void commit_inner(const Section& s) {
        inner_.commit(s);
    }

    // The inner step: the checks (may throw; nothing changed), then the launches. Whether a
    // gradient is finite is decided on the device.
    bool inner_ready() {
        inner_.prepare();
        return true;
    }
    void inner_apply() { inner_.launch_update(); }
    void inner_skip() { inner_.skip_on_host(); }

    void build(const std::vector<std::vector<std::size_t>>& lists, exchange_scheme scheme,
               const typename Compressor::hyper& h) {
        frags_.reserve(lists.size());
        for (const auto& list : lists) {
            frags_.push_back(std::make_unique<fragment>(inner_.table_, list, tensors_, *comm_,
                                                        scheme, h, staging_ != nullptr));
            attach_device_aggregation(*frags_.back());
        }
        // The fragments zeroed their buffers on the legacy stream, which does not order the
        // trainer's (a non-blocking stream): done before the gathers below write the snapshots.
        LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
        for (auto& f : frags_) {
            gather_values(f->table, master(), f->global.get(), stream());
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
    }

    // Every fragment is broadcast before any is written back: a broadcast that throws leaves the
    // parameters as they were (as the host's single broadcast), so a retried start() still sees
    // them move and drops a gradient taken before.
    bool snapshot(bool broadcast) {
        for (auto& f : frags_) gather_values(f->table, master(), f->global.get(), stream());
        if (!broadcast || comm_->size() == 1) return false;
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        std::vector<std::vector<float>> mine(frags_.size());
        for (std::size_t fi = 0; fi < frags_.size(); ++fi) {
            fragment& f = *frags_[fi];
            if (f.elements == 0) continue;
            mine[fi] = f.global.download();
            if (comm_->space() == memory_space::cuda) {
                comm_->broadcast(comm::as_bytes(loco::cuda_tensor(f.global.get(),
                                                                  f.table.padded_elements())),
                                 0);
            } else {
                std::vector<float> staged = mine[fi];
                comm_->broadcast(comm::as_bytes(host_tensor(staged.data(), staged.size())), 0);
                f.global.upload(staged);
            }
        }
        // A device broadcast with nccl_options::wait = false orders only the caller stream (the
        // handle's, as docs/cuda.md asks): the legacy-stream copies below wait for it here.
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        bool moved = false;
        for (std::size_t fi = 0; fi < frags_.size(); ++fi) {
            fragment& f = *frags_[fi];
            if (f.elements == 0) continue;
            // Bits, as the host compares (a float != calls a NaN changed and -0 unchanged).
            const std::vector<float> now = f.global.download();
            moved = moved ||
                    std::memcmp(now.data(), mine[fi].data(), mine[fi].size() * sizeof(float)) != 0;
            scatter_values(f.table, f.global.get(), master(), stream());
        }
        return moved;
    }

    // delta = global - local. With `keep` it is formed now and kept until the exchange finishes
    // (the checkpoint may save it); otherwise the fused path forms it inside the encode at start()
    // (the handle starts it within the same call, before this fragment's tensors change).
    void capture(std::size_t fi, bool keep) {
        fragment& f = *frags_[fi];
        f.host_ready = false;
        f.hold = keep;
        f.kept = keep || !f.device;
        if (f.kept) {
            outer_delta(f.table, f.global.get(), master(), f.delta.get(), stream());
        }
    }

    float captured_norm(std::size_t fi) {
        fragment& f = *frags_[fi];
        if (f.agg) {
            form_delta(f);
            return f.agg->norm(f.delta.get());
        }
        download_captured(f);
        double sq = 0.0;
        for (const float x : f.host_captured) sq += static_cast<double>(x) * x;
        return static_cast<float>(std::sqrt(sq));
    }

    void start(std::size_t fi, const typename Compressor::hyper& h,
               const compress::encode_context& ctx, const aggregate::worker_report& report) {
        fragment& f = *frags_[fi];
        if (f.device) {
            start_fused(f, h, ctx);
            if (f.agg) f.agg->start_reports(control_comm(), report);
        } else if (f.device_all_reduce) {
            // An exchange left in flight keeps its delta for save(): the reduction runs in the
            // average buffer. Otherwise it runs in place (no extra pass over the fragment).
            f.avg = f.delta.get();
            if (f.hold) {
                f.avg = f.average.get();
                LOCO_CUDA_CHECK(cudaMemcpyAsync(f.avg, f.delta.get(),
                                                f.table.padded_elements() * sizeof(float),
                                                cudaMemcpyDeviceToDevice, stream()));
            } else {
                f.kept = false;
            }
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
            f.request = comm_->start_all_reduce(
                loco::cuda_tensor(f.avg, f.table.padded_elements()), comm::reduce_op::mean);
        } else if (f.agg) {
            form_delta(f);
            // The all-gather owns its send buffer until finish(). An exchange left in flight
            // sends a copy: the next capture rewrites the delta before this exchange finishes
            // (a delayed round finishes and restarts its fragment in one call).
            const float* send = f.delta.get();
            if (f.hold) {
                LOCO_CUDA_CHECK(cudaMemcpyAsync(f.average.get(), f.delta.get(),
                                                f.table.padded_elements() * sizeof(float),
                                                cudaMemcpyDeviceToDevice, stream()));
                send = f.average.get();
            }
            f.agg->start(*comm_, control_comm(), send, report);
        } else {
            download_captured(f);
            f.host->start(control_comm(), f.host_captured, h, ctx, report);
        }
    }

    loco::detail::stage_failure finish(std::size_t fi, const typename Compressor::hyper& h,
                                       const typename Aggregate::hyper& ah) {
        fragment& f = *frags_[fi];
        loco::detail::stage_failure failure;
        f.hit.reset();
        if (f.agg) return finish_aggregate(f, h, ah);
        if constexpr (chunked_aggregates_) {
            if (f.device) return finish_chunked(f, ah);
        }
        if (f.device || f.device_all_reduce) {
            try {
                f.request.finish();
            } catch (...) {
                failure.record(loco::detail::sync_stage::transfer, std::current_exception());
                return failure;
            }
            try {
                f.hit = f.device ? check_payloads(f, h) : check_average(f, f.avg);
            } catch (...) {
                failure.record(loco::detail::sync_stage::decode, std::current_exception());
            }
            return failure;
        }
        f.host->aggregate_hyper() = ah;
        f.host_average.resize(f.elements);
        f.host->finish(control_comm(), f.host_average, h);
        failure = f.host->failure();
        if (!failure) {
            f.hit = backend::host::find_nonfinite(f.host_average.data(), f.elements);
            from_flat<float>(f.table, f.host_average, f.average.get());
            f.avg = f.average.get();
        }
        return failure;
    }

    std::optional<backend::host::nonfinite_hit> find_nonfinite(std::size_t fi) const {
        return frags_[fi]->hit;
    }

    // The first non-finite value of the residual this round would commit (the host engine's
    // rule), its index counted over the fragment's elements.
    std::optional<backend::host::nonfinite_hit> find_nonfinite_residual(std::size_t fi) {
        fragment& f = *frags_[fi];
        if (f.host) {
            const std::span<const float> next = f.host->pending_state();
            auto hit = backend::host::find_nonfinite(next.data(), next.size());
            if (hit && f.elements != 0) hit->index %= f.elements;
            return hit;
        }
        if constexpr (device_compression && device_exchange_t::feedback) {
            if (f.device) return check_average(f, f.device->next.get());
        }
        return std::nullopt;
    }

    // aggregation: whether the aggregation's state moves too (not after a warm-up sync).
    void commit(std::size_t fi, bool aggregation = true) {
        fragment& f = *frags_[fi];
        if constexpr (device_compression && device_exchange_t::feedback) {
            if (f.device) std::swap(f.device->residual, f.device->next);
        }
        if (f.host) f.host->commit(aggregation);
        if (f.agg) {
            if (aggregation) {
                f.agg->commit();
            } else {
                f.agg->discard();
            }
        }
    }
    // A refused round: the aggregation's state only (exchange.hpp's commit_aggregation).
    void commit_aggregation(std::size_t fi) {
        fragment& f = *frags_[fi];
        if (f.host) f.host->commit_aggregation();
        if (f.agg) f.agg->commit();
    }

    // The aggregation refused the round, and its state per fragment (aggregate/aggregate.hpp),
    // kept by the device aggregation or the host exchange, whichever the fragment takes.
    bool refused(std::size_t fi) const noexcept {
        if (frags_[fi]->agg) return frags_[fi]->agg->refused();
        return frags_[fi]->host && frags_[fi]->host->refused();
    }
    const aggregate::state_t<Aggregate>& aggregate_state(std::size_t fi) const {
        if (frags_[fi]->agg) return frags_[fi]->agg->state();
        return frags_[fi]->host->aggregate_state();
    }
    void restore_aggregate_state(std::size_t fi, aggregate::state_t<Aggregate> s) {
        if (frags_[fi]->agg) return frags_[fi]->agg->restore(std::move(s));
        frags_[fi]->host->restore_aggregate_state(std::move(s));
    }

    // What apply() with `alpha` needs, allocated before the ranks agree (an allocation failing
    // there is a failure they agree on; in apply(), after the agreement, this rank alone would
    // skip the round its peers apply): the local values' buffer of a merge.
    void prepare_apply(std::size_t fi, float alpha) {
        fragment& f = *frags_[fi];
        if (alpha != 0.0f && f.local.size() != f.table.padded_elements()) {
            f.local = device_buffer<float>(f.table.padded_elements());
        }
    }

    // One outer step (the fragment's `step`-th) on its global values and state; the new global
    // values go to the parameters, merged with `alpha` (0: copied). prepare_apply(fi, alpha)
    // came first.
    void apply(std::size_t fi, const typename Outer::hyper& h, std::uint64_t step, float alpha) {
        fragment& f = *frags_[fi];
        f.mirror.sync(h, f.control, stream());
        f.control.set_counters(step - 1, 0, 0, stream());
        if (alpha != 0.0f) {
            prepare_apply(fi, alpha);  // allocated already: allocates nothing
            gather_values(f.table, master(), f.local.get(), stream());
        }
        if (f.device && !f.agg) {
            apply_fused(f);
        } else {
            outer_apply<Outer>(f.table, f.global.get(), f.avg, f.outer_state.get(), master(),
                               f.control.hyper(), f.control.control(), false, stream());
        }
        if (alpha != 0.0f) {
            merge_values(f.table, f.global.get(), master(), f.local.get(), alpha, stream());
        }
    }

    // local <- lerp(global, local, alpha) (0: the global values).
    void merge(std::size_t fi, float alpha) {
        fragment& f = *frags_[fi];
        if (alpha == 0.0f) {
            scatter_values(f.table, f.global.get(), master(), stream());
        } else {
            merge_values(f.table, f.global.get(), master(), nullptr, alpha, stream());
        }
    }

    // State in the flat layout (copies; each waits for the stream).
    std::vector<float> global() const { return gather_flat([](const fragment& f) {
        return f.global.get(); }, 0); }
    std::vector<float> outer_state() const {
        std::vector<float> all;
        for (int j = 0; j < Outer::state_size; ++j) {
            const std::vector<float> one = outer_state(j);
            all.insert(all.end(), one.begin(), one.end());
        }
        return all;
    }
    std::vector<float> outer_state(int j) const {
        return gather_flat([](const fragment& f) { return f.outer_state.get(); },
                           static_cast<std::size_t>(j));
    }
    std::vector<float> compressor_state(std::size_t fi) const {
        const fragment& f = *frags_[fi];
        if (f.host) {
            const auto s = f.host->state();
            return {s.begin(), s.end()};
        }
        if constexpr (device_compression && device_exchange_t::feedback) {
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
            return to_flat(f.table, f.device->residual.get());
        }
        return {};
    }
    std::vector<float> server_state(std::size_t fi) const {
        const fragment& f = *frags_[fi];
        if (!f.host) return {};
        const auto s = f.host->server_state();
        return {s.begin(), s.end()};
    }
    std::size_t compressor_state_size(std::size_t fi) const {
        const fragment& f = *frags_[fi];
        if (f.host) return f.host->state().size();
        return device_exchange_t::feedback ? f.elements : 0;
    }
    std::size_t server_state_size(std::size_t fi) const {
        const fragment& f = *frags_[fi];
        return f.host ? f.host->server_state().size() : 0;
    }
    std::vector<float> captured(std::size_t fi) const {
        const fragment& f = *frags_[fi];
        if (f.elements == 0) return {};  // nothing to keep (a restored one reads as not kept)
        if (!f.kept) {
            throw invalid_argument("loco::cuda::diloco: save() while an exchange started and "
                                   "finished within one call is in flight (a failed step); call "
                                   "sync() first");
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        return to_flat(f.table, f.delta.get());
    }
    exchange_scheme scheme() const noexcept {
        if (frags_.empty()) return exchange_scheme::all_reduce;
        return frags_.front()->host ? frags_.front()->host->scheme() : exchange_scheme::all_gather;
    }

    // Bytes this worker sends per exchange of fragment fi. The device all-reduce runs over the
    // padded layout (each tensor's slice rounded up to 8 elements), so its ring volume counts the
    // padding; the fused exchange sends the host's payloads, (M - 1) P, with P for the settings
    // `h` (the device plan is re-planned only when the next exchange starts: after a change of
    // compress_hyper() it still has the old size).
    std::uint64_t bytes_per_average(std::size_t fi, const typename Compressor::hyper& h) const {
        const fragment& f = *frags_[fi];
        const auto m = static_cast<std::uint64_t>(comm_->size());
        if constexpr (device_compression) {
            if (f.device) {
                const std::uint64_t p = Compressor::payload_bytes(
                    h, detail::table_segments(f.table, tensors_, f.params));
                if (f.agg) return f.agg->bytes_per_average(m, p);
                return (m - 1) * p;
            }
        }
        if (f.agg) return f.agg->bytes_per_average(m);
        if (!f.device_all_reduce) return f.host->bytes_per_average(h);
        const std::uint64_t n = f.table.padded_elements();
        const auto r = static_cast<std::uint64_t>(comm_->rank());
        const std::uint64_t chunk = n * (r + 1) / m - n * r / m;
        return 4 * (n + (m - 2) * chunk);
    }

    // Per-state syncs (schedule/state_periods.hpp, DES-LOC), through the host for now: array j of
    // the inner optimizer's state is copied to the host in the flat layout, averaged by one fp32
    // mean all-reduce on the control communicator (cuda_staging for a GPU communicator), and
    // written back at commit_state() (the handle's agreement comes in between). States sync every
    // few outer rounds, so the copies cost little; parameter groups are host-only for now.
    static constexpr int inner_state_arrays = [] {
        if constexpr (loco::cuda::detail::is_groups<Inner>) {
            return 0;
        } else {
            return Inner::state_size;
        }
    }();
    loco::detail::stage_failure average_state(int j)
        requires(!loco::cuda::detail::is_groups<Inner>)
    {
        loco::detail::stage_failure failure;
        state_average_ = inner_.state(j);  // waits for the stream
        try {
            control_comm().all_reduce(host_tensor(state_average_.data(), state_average_.size()),
                                      comm::reduce_op::mean);
        } catch (const std::bad_alloc&) {
            throw;  // before the collective was posted: this rank's alone (diloco marks it)
        } catch (...) {
            failure.record(loco::detail::sync_stage::transfer, std::current_exception());
        }
        return failure;
    }
    std::optional<backend::host::nonfinite_hit> state_nonfinite() const {
        return backend::host::find_nonfinite(state_average_.data(), state_average_.size());
    }
    void commit_state(int j)
        requires(!loco::cuda::detail::is_groups<Inner>)
    {
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        from_flat<float>(inner_.table_, state_average_,
                         inner_.state_.get() +
                             static_cast<std::size_t>(j) * inner_.table_.padded_elements());
    }
    // An fp32 all-reduce of the array's elements (unpadded) on the control communicator.
    std::uint64_t bytes_per_state_average(int j) const {
        const auto m = static_cast<std::uint64_t>(comm_->size());
        if (m == 1 || j < 0 || j >= inner_state_arrays) return 0;
        const std::uint64_t n = inner_.table_.total_elements();
        const auto r = static_cast<std::uint64_t>(comm_->rank());
        const std::uint64_t chunk = n * (r + 1) / m - n * r / m;
        return 4 * (n + (m - 2) * chunk);
    }

    // Replaces the whole state (a checkpoint that has been read completely) in two steps:
    // prepare_restore() cuts each fragment's part of the shared state (host memory: free to throw
    // with nothing changed), restore() uploads it all and allocates nothing.
    struct fragment_restore {
        std::vector<float> state, server, captured;
    };
    struct restore_plan {
        std::vector<std::vector<float>> global, outer_state;  // per fragment, its own layout
        std::vector<fragment_restore> frags;
    };
    restore_plan prepare_restore(const std::vector<float>& global,
                                 const std::vector<float>& outer_state,
                                 std::vector<fragment_restore> frags) const {
        restore_plan plan;
        plan.global.reserve(frags_.size());
        plan.outer_state.reserve(frags_.size());
        for (const auto& fp : frags_) {
            plan.global.push_back(slice(*fp, global, 0));
            plan.outer_state.push_back(outer_slices(*fp, outer_state, global.size()));
        }
        plan.frags = std::move(frags);
        return plan;
    }
    void restore(restore_plan plan) {
        for (std::size_t fi = 0; fi < frags_.size(); ++fi) {
            fragment& f = *frags_[fi];
            from_flat<float>(f.table, plan.global[fi], f.global.get());
            from_flat<float>(f.table, plan.outer_state[fi], f.outer_state.get(),
                             static_cast<std::size_t>(Outer::state_size));
            fragment_restore& q = plan.frags[fi];
            if (f.host) {
                std::copy(q.state.begin(), q.state.end(), f.host->state().begin());
                std::copy(q.server.begin(), q.server.end(), f.host->server_state().begin());
            } else if constexpr (device_compression && device_exchange_t::feedback) {
                if (!q.state.empty()) from_flat<float>(f.table, q.state, f.device->residual.get());
            }
            f.kept = !q.captured.empty();
            f.hold = f.kept;
            f.host_ready = false;
            if (f.kept) from_flat<float>(f.table, q.captured, f.delta.get());
        }
    }

    // regroup() (diloco.hpp) in three steps, the first two free to throw with nothing changed.
    // prepare_regroup() builds what the group needs: each fragment's exchange buffers for its
    // size (the fused path's receive buffer and payload check, or the host exchanger) and, over a
    // GPU communicator, the staging view the handle's own collectives use; stage_regroup()
    // uploads the shared state the donor sent into fresh device arrays; adopt() swaps them in.
    // This worker's error-feedback residuals carry over when `keep` (a survivor), else start at
    // zero (a newcomer); the aggregation's state starts again. Adopting drops an exchange in
    // flight on the old communicator (it waits for it, as a request dropped unfinished does). The
    // group must move the memory the old communicator moved: the exchange path of each fragment
    // was chosen for it.
    struct regroup_plan {
        struct part {
            std::unique_ptr<device_exchange_t> device;
            std::unique_ptr<loco::detail::exchanger<Compressor, Aggregate>> host;
            std::unique_ptr<device_aggregation<Aggregate>> agg;
            bool device_all_reduce = false;
            device_buffer<float> global, outer_state;
        };
        comm::communicator* group = nullptr;
        std::unique_ptr<comm::cuda_staging> staging;
        std::vector<part> parts;
        comm::communicator& control() const noexcept { return staging ? *staging : *group; }
    };
    regroup_plan prepare_regroup(comm::communicator& group, const typename Compressor::hyper& h) {
        if (group.space() != comm_space_) {
            throw memory_space_error(
                std::string(handle_name) + ": regroup() onto a " + std::string(group.name()) +
                " communicator that moves " + std::string(to_string(group.space())) +
                " memory; this handle was built on one that moves " +
                std::string(to_string(comm_space_)) +
                " memory (each fragment's exchange path follows it); regroup onto the same kind");
        }
        regroup_plan plan;
        plan.group = &group;
        if (group.space() == memory_space::cuda) {
            plan.staging = std::make_unique<comm::cuda_staging>(group, stream());
        }
        for (const auto& fp : frags_) {
            const fragment& f = *fp;
            typename regroup_plan::part q;
            if (f.device) {
                if constexpr (device_compression) {
                    q.device = make_device_exchange(
                        f.table, detail::table_segments(f.table, tensors_, f.params), group.size(),
                        h);
                }
            } else {
                q.host = std::make_unique<loco::detail::exchanger<Compressor, Aggregate>>(
                    std::vector<compress::segment>(f.host->segments().begin(),
                                                   f.host->segments().end()),
                    f.host->scheme(), group.size(), group.rank(), h);
                q.device_all_reduce = f.device_all_reduce &&
                                      q.host->scheme() == exchange_scheme::all_reduce;
            }
            if constexpr (has_device_aggregation<Aggregate>) {
                if (f.agg) {
                    if (static_cast<std::size_t>(group.size()) >
                        device_aggregation<Aggregate>::max_workers) {
                        throw invalid_argument(
                            std::string(handle_name) + ": regroup() onto " +
                            std::to_string(group.size()) + " workers; the device aggregation " +
                            "this handle was built with takes at most " +
                            std::to_string(device_aggregation<Aggregate>::max_workers));
                    }
                    q.agg = std::make_unique<device_aggregation<Aggregate>>(f.table, group.size(),
                                                                            stream());
                }
            }
            plan.parts.push_back(std::move(q));
        }
        return plan;
    }
    void stage_regroup(regroup_plan& plan, const std::vector<float>& global,
                       const std::vector<float>& outer_state) {
        for (std::size_t fi = 0; fi < frags_.size(); ++fi) {
            const fragment& f = *frags_[fi];
            auto& q = plan.parts[fi];
            q.global = device_buffer<float>(f.table.padded_elements());
            q.outer_state = device_buffer<float>(static_cast<std::size_t>(Outer::state_size) *
                                                 f.table.padded_elements());
            q.global.zero(stream());
            q.outer_state.zero(stream());
            // upload_shared copies on the legacy stream, which does not wait for the trainer's:
            // the zeroing must be done first, or it could wipe the healed values.
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
            upload_shared(f, global, outer_state, q.global.get(), q.outer_state.get());
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
    }
    void adopt(regroup_plan plan, bool keep) noexcept {
        for (std::size_t fi = 0; fi < frags_.size(); ++fi) {
            fragment& f = *frags_[fi];
            auto& q = plan.parts[fi];
            f.request = comm::request{};  // a fused or device exchange in flight: waited for
            if (f.device) {
                if constexpr (device_compression && device_exchange_t::feedback) {
                    if (keep) {
                        std::swap(f.device->residual, q.device->residual);
                    }
                }
                f.device = std::move(q.device);
            } else {
                if (keep) {
                    const auto own = f.host->state();
                    std::copy(own.begin(), own.end(), q.host->state().begin());
                }
                f.host = std::move(q.host);  // a host exchange in flight: dropped here
                f.device_all_reduce = q.device_all_reduce;
            }
            // The aggregation's state (EDiT's detectors, centered clipping's center) starts
            // again with the group, as the host exchanger's does.
            if (q.agg) f.agg = std::move(q.agg);
            f.global = std::move(q.global);
            f.outer_state = std::move(q.outer_state);
            f.kept = false;
            f.hold = false;
            f.host_ready = false;
            f.avg = nullptr;
            f.hit.reset();
        }
        // Last: requests dropped above may have run through the old staging view.
        comm_ = plan.group;
        staging_ = std::move(plan.staging);
    }

private:
    struct fragment {
        fragment(const tensor_table& whole, const std::vector<std::size_t>& list,
                 const std::vector<parameter>& tensors, comm::communicator& comm,
                 exchange_scheme scheme, const typename Compressor::hyper& h, bool staged)
            : params(list),
              table(whole, list),
              elements(table.total_elements()),
              global(table.padded_elements()),
              outer_state(static_cast<std::size_t>(Outer::state_size) * table.padded_elements()),
              mirror(typename Outer::hyper{}) {
            if constexpr (device_compression) {
                if (fused(comm, scheme, h)) {
                    device = make_device_exchange(
                        table, detail::table_segments(table, tensors, list), comm.size(), h);
                }
            }
            if (!device) {
                host = std::make_unique<loco::detail::exchanger<Compressor, Aggregate>>(
                    detail::table_segments(table, tensors, list), scheme, comm.size(), comm.rank(),
                    h);
                device_all_reduce = std::is_same_v<Compressor, compress::none> &&
                                    std::is_same_v<Aggregate, aggregate::mean> && staged &&
                                    host->scheme() == exchange_scheme::all_reduce;
                average = device_buffer<float>(table.padded_elements());
                average.zero(nullptr);
            }
            delta = device_buffer<float>(table.padded_elements());
            delta.zero(nullptr);
            outer_state.zero(nullptr);
            global.zero(nullptr);
        }

        // Whether the exchange takes the fused device path.
        static bool fused(const comm::communicator& comm, exchange_scheme scheme,
                          const typename Compressor::hyper& h) {
            std::size_t max_workers = 0;
            if constexpr (chunked_aggregates_) {
                max_workers = 65535;  // the scatter-mean kernels count senders in 16 bits
            } else if constexpr (std::is_same_v<Aggregate, aggregate::mean>) {
                max_workers = SIZE_MAX;
            } else {
                max_workers = device_aggregation<Aggregate>::max_workers;
            }
            return device_layout(h) && comm.space() == memory_space::cuda &&
                   (scheme == exchange_scheme::automatic || scheme == exchange_scheme::all_gather) &&
                   static_cast<std::size_t>(comm.size()) <= max_workers;
        }

        // The device plan is built from the tensor table, which records no rows: statistical<>
        // per row takes the host exchange (correct, not fast); per tensor (MuLoCo's) runs on the
        // device.
        static bool device_layout(const typename Compressor::hyper& h) {
            if constexpr (chunked_) {
                return h.chunk <= chunked_max_side;  // a chunk in shared memory
            } else if constexpr (device_topk_) {
                static_cast<void>(h);
                return true;
            } else {
                using support = device_compressor<Compressor>;
                using codec = typename support::codec;
                if constexpr (requires(const typename codec::hyper& c) { c.per; }) {
                    return support::codec_hyper(h).per == compress::granularity::tensor;
                } else {
                    static_cast<void>(h);
                    return true;
                }
            }
        }

        std::vector<std::size_t> params;
        tensor_table table;
        std::size_t elements;
        device_buffer<float> global;       // padded layout of the fragment's table
        device_buffer<float> outer_state;  // Outer::state_size padded arrays
        device_buffer<float> delta;        // the pseudo-gradient when kept (and the host paths')
        device_buffer<float> average;      // the aggregate (device all-reduce and host paths)
        device_buffer<float> local;        // the local values before a merge with alpha > 0
        device_control<typename Outer::hyper> control;
        loco::cuda::detail::hyper_mirror<typename Outer::hyper> mirror;
        std::unique_ptr<device_exchange_t> device;
        std::unique_ptr<loco::detail::exchanger<Compressor, Aggregate>> host;
        bool device_all_reduce = false;
        std::unique_ptr<device_aggregation<Aggregate>> agg;  // the device aggregation path
        comm::request request;
        bool kept = false;        // delta holds the pseudo-gradient
        bool hold = false;        // the handle asked to keep it until the exchange finishes
        float* avg = nullptr;     // where the aggregate is (delta, average)
        bool host_ready = false;  // host_captured holds it
        std::vector<float> host_captured, host_average;
        std::optional<backend::host::nonfinite_hit> hit;
    };

    float* master() const noexcept { return inner_.master_ptr(); }

    // The fused exchange's buffers; the chunked codecs also take the tensors' shapes.
    static std::unique_ptr<device_exchange_t> make_device_exchange(
        const tensor_table& table, const std::vector<compress::segment>& segs, int ranks,
        const typename Compressor::hyper& h) {
        if constexpr (chunked_) {
            return std::make_unique<device_exchange_t>(table, segs, ranks, h);
        } else {
            static_cast<void>(segs);
            return std::make_unique<device_exchange_t>(table, ranks, h);
        }
    }

    // The chunked exchange's finish: the payloads checked, then aggregated by the exchange (the
    // mean, SparseLoCo's clipped scatter-mean or DeMo's coefficient scatter-mean) into its own
    // buffer.
    loco::detail::stage_failure finish_chunked(fragment& f, const typename Aggregate::hyper& ah) {
        loco::detail::stage_failure failure;
        if constexpr (chunked_aggregates_) {
            try {
                f.request.finish();
            } catch (...) {
                failure.record(loco::detail::sync_stage::transfer, std::current_exception());
                return failure;
            }
            auto& dx = *f.device;
            try {
                dx.check_all(stream());
                if constexpr (std::is_same_v<Aggregate, aggregate::median_norm_clip>) {
                    dx.median_norm_clip(ah, stream());
                } else if constexpr (std::is_same_v<Aggregate, aggregate::scatter_mean>) {
                    dx.scatter_mean(stream());
                } else {
                    static_cast<void>(ah);
                    dx.mean(stream());
                }
                f.avg = dx.average();
                f.hit = check_average(f, f.avg);
            } catch (...) {
                failure.record(loco::detail::sync_stage::decode, std::current_exception());
            }
        } else {
            static_cast<void>(f);
            static_cast<void>(ah);
        }
        return failure;
    }

    // The device aggregation path (the top of the file): an aggregation with a device
    // implementation, a GPU communicator, at most 64 workers, and no compressor (the fp32 deltas
    // gathered) or the fused path's (its payloads gathered and decoded per worker).
    void attach_device_aggregation(fragment& f) {
        if constexpr (has_device_aggregation<Aggregate>) {
            bool gathers = false;
            if constexpr (std::is_same_v<Compressor, compress::none>) {
                gathers = staging_ && f.host && f.host->scheme() == exchange_scheme::all_gather &&
                          static_cast<std::size_t>(comm_->size()) <=
                              device_aggregation<Aggregate>::max_workers;
            } else if constexpr (device_compression && !chunked_aggregates_) {
                gathers = f.device != nullptr;  // fragment::fused() checked the rest
            }
            if (gathers) {
                f.agg = std::make_unique<device_aggregation<Aggregate>>(f.table, comm_->size(),
                                                                        stream());
            }
        } else {
            static_cast<void>(f);
        }
    }

    // The pseudo-gradient in the delta buffer (formed now unless it is kept there).
    void form_delta(fragment& f) {
        if (!f.kept) {
            outer_delta(f.table, f.global.get(), master(), f.delta.get(), stream());
            f.kept = true;
        }
    }

    // The device aggregation's finish: with a compressor, the payloads checked and each decoded
    // into its row; then the aggregate in the aggregation's buffer, or a refusal.
    loco::detail::stage_failure finish_aggregate(fragment& f, const typename Compressor::hyper& h,
                                                 const typename Aggregate::hyper& ah) {
        loco::detail::stage_failure failure;
        if constexpr (device_compression && !device_topk_) {
            if (f.device) {
                try {
                    f.request.finish();
                } catch (...) {
                    failure.record(loco::detail::sync_stage::transfer, std::current_exception());
                }
                if (!failure) {
                    try {
                        decode_rows(f, h);
                    } catch (...) {
                        failure.record(loco::detail::sync_stage::decode, std::current_exception());
                    }
                }
            }
        } else {
            static_cast<void>(h);
        }
        failure = f.agg->finish(ah, std::move(failure));
        f.avg = f.agg->result();
        if (!failure && !f.agg->refused()) {
            try {
                f.hit = check_average(f, f.avg);
            } catch (...) {
                failure.record(loco::detail::sync_stage::decode, std::current_exception());
            }
        }
        return failure;
    }

    void init_control(comm::communicator& comm) {
        comm_space_ = comm.space();
        if (comm.space() == memory_space::cuda) {
            staging_ = std::make_unique<comm::cuda_staging>(comm, stream());
        }
    }

    void download_captured(fragment& f) {
        if (f.host_ready) return;
        if (!f.kept) {
            outer_delta(f.table, f.global.get(), master(), f.delta.get(), stream());
            f.kept = true;
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        f.host_captured = to_flat(f.table, f.delta.get());
        f.host_ready = true;
    }

    void start_fused(fragment& f, const typename Compressor::hyper& h,
                     const compress::encode_context& ctx) {
        if constexpr (chunked_) {
            auto& dx = *f.device;
            dx.replan(f.table, h);
            static_cast<void>(ctx);  // the chunked codecs use no seed, rank or outer lr
            form_delta(f);
            dx.encode(f.delta.get(), stream());
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
            f.request = comm_->start_all_gather(
                tensor_view<const std::byte>{dx.send.get(), dx.plan.payload_bytes(), 0, 0,
                                             memory_space::cuda},
                tensor_view<std::byte>{dx.recv.get(), dx.recv.size(), 0, 0, memory_space::cuda});
        } else if constexpr (device_compression) {
            auto& dx = *f.device;
            dx.replan(f.table, h);
            f.control.set_counters(ctx.round, 0, 0, stream());
            encode_io io;
            io.global = f.global.get();
            io.master = master();
            io.delta = f.delta.get();
            io.residual = dx.residual.get();
            io.next_residual = dx.next.get();
            io.payload = dx.send.get();
            device_encode_context dctx;
            dctx.seed = ctx.seed;
            dctx.rank = ctx.rank;
            dctx.round_from = f.control.control();  // round = steps + skipped, as set above
            dctx.outer_lr = ctx.outer_lr;
            if (f.kept) {
                encode_with<encode_from::delta>(dx, f.table, h, io, dctx);
            } else {
                encode_with<encode_from::params>(dx, f.table, h, io, dctx);
            }
            // The communicator runs on its own stream and needs the payload finished.
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
            f.request = comm_->start_all_gather(
                tensor_view<const std::byte>{dx.send.get(), dx.plan.payload_bytes(), 0, 0,
                                             memory_space::cuda},
                tensor_view<std::byte>{dx.recv.get(), dx.recv.size(), 0, 0, memory_space::cuda});
        } else {
            static_cast<void>(f);
            static_cast<void>(h);
            static_cast<void>(ctx);
        }
    }

    template <encode_from From>
    void encode_with(device_exchange_t& dx, const tensor_table& table,
                     const typename Compressor::hyper& h, const encode_io& io,
                     const device_encode_context& ctx) {
        if constexpr (device_topk_) {
            encode_topk<Compressor, From>(dx.plan, table, h, io, ctx, stream());
        } else if constexpr (device_compression && !chunked_) {
            encode<Compressor, From>(dx.plan, table, h, io, ctx, stream());
        }
    }

    // Every received payload checks out, or wire_error before anything is written. The first
    // non-finite element of the average, if any.
    std::optional<backend::host::nonfinite_hit> check_payloads(fragment& f,
                                                               const typename Compressor::hyper& h) {
        if constexpr (chunked_) {
            static_cast<void>(f);
            static_cast<void>(h);
            return std::nullopt;  // finish_chunked() checks these
        } else if constexpr (device_topk_) {
            auto& dx = *f.device;
            dx.check.run(dx.plan, f.table, dx.recv.get(), stream());
            // The rank-order average into the plan's work buffer (its encode is done with it).
            decode_average_topk(dx.plan, f.table, dx.recv.get(), comm_->size(), dx.plan.work(),
                                stream());
            return check_average(f, dx.plan.work());
        } else if constexpr (device_compression) {
            auto& dx = *f.device;
            const auto& ch = device_compressor<Compressor>::codec_hyper(h);
            const std::uint64_t first = dx.check.run(dx.plan, f.table, ch, dx.recv.get(),
                                                     stream());
            if (first == no_nonfinite) return std::nullopt;
            // The payload check finds the position; the average there is formed later, in the
            // fused decode-and-apply, so the message names no value.
            return backend::host::nonfinite_hit{static_cast<std::size_t>(first),
                                                std::numeric_limits<float>::quiet_NaN(), false};
        } else {
            static_cast<void>(h);
            return std::nullopt;
        }
    }

    // The first non-finite element of an average in the fragment's padded layout.
    std::optional<backend::host::nonfinite_hit> check_average(fragment& f, const float* avg) {
        f.control.set_counters(0, 0, 0, stream());  // clears the flag
        check_padded(f.table, avg, f.control.control(), stream());
        const auto c = f.control.read(stream());
        if (c.first_nonfinite == no_nonfinite) return std::nullopt;
        const flat_position at = f.table.locate(c.first_nonfinite);
        float value = 0.0f;
        LOCO_CUDA_CHECK(cudaMemcpy(&value, avg + f.table.padded_offset(at.tensor) + at.element,
                                   sizeof value, cudaMemcpyDeviceToHost));
        return backend::host::nonfinite_hit{static_cast<std::size_t>(c.first_nonfinite), value};
    }

    void apply_fused(fragment& f) {
        if constexpr (chunked_) {
            outer_apply<Outer>(f.table, f.global.get(), f.device->average(), f.outer_state.get(),
                               master(), f.control.hyper(), f.control.control(), false, stream());
        } else if constexpr (device_topk_) {
            auto& dx = *f.device;
            outer_apply<Outer>(f.table, f.global.get(), dx.plan.work(), f.outer_state.get(),
                               master(), f.control.hyper(), f.control.control(), false, stream());
        } else if constexpr (device_compression) {
            auto& dx = *f.device;
            using codec = typename device_compressor<Compressor>::codec;
            decode_average_apply<codec, Outer>(dx.plan, f.table, dx.recv.get(), comm_->size(),
                                               f.global.get(), f.outer_state.get(), master(),
                                               f.control.hyper(), f.control.control(), nullptr,
                                               stream());
        }
    }

    // Every received payload checks out (or wire_error before anything is written), then each
    // rank's decoded into its row of the device aggregation (an average of one payload: the
    // host decoder's values).
    void decode_rows(fragment& f, const typename Compressor::hyper& h) {
        if constexpr (chunked_) {
            static_cast<void>(h);
            auto& dx = *f.device;
            dx.check_all(stream());
            const std::size_t n = f.table.padded_elements();
            for (int k = 0; k < comm_->size(); ++k) {
                dx.decode_into(k, f.agg->rows() + static_cast<std::size_t>(k) * n, stream());
            }
        } else if constexpr (device_compression && !device_topk_) {
            auto& dx = *f.device;
            const auto& ch = device_compressor<Compressor>::codec_hyper(h);
            static_cast<void>(dx.check.run(dx.plan, f.table, ch, dx.recv.get(), stream()));
            const std::size_t p = dx.plan.payload_bytes();
            const std::size_t n = f.table.padded_elements();
            for (int k = 0; k < comm_->size(); ++k) {
                const auto r = static_cast<std::size_t>(k);
                decode_average(dx.plan, f.table, dx.recv.get() + r * p, 1,
                               f.agg->rows() + r * n, stream());
            }
        } else {
            static_cast<void>(f);
            static_cast<void>(h);
        }
    }

    // A flat-layout array of the whole model from each fragment's padded array (array j).
    template <class Pick>
    std::vector<float> gather_flat(Pick pick, std::size_t j) const {
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        std::size_t total = 0;
        for (const auto& p : tensors_) total += p.value.size;
        std::vector<float> out(total);
        for (const auto& f : frags_) {
            const std::vector<float> part =
                to_flat(f->table, pick(*f) + j * f->table.padded_elements());
            for (std::size_t k = 0; k < f->params.size(); ++k) {
                const parameter& p = tensors_[f->params[k]];
                std::copy_n(part.begin() + static_cast<std::ptrdiff_t>(f->table.flat_offset(k)),
                            p.value.size, out.begin() + static_cast<std::ptrdiff_t>(p.offset));
            }
        }
        return out;
    }

    // Fragment f's part of the whole-model global values and outer state (flat layout, the
    // checkpoint's and the heal's) into its padded device arrays.
    void upload_shared(const fragment& f, const std::vector<float>& global,
                       const std::vector<float>& outer_state, float* to_global,
                       float* to_outer_state) const {
        from_flat<float>(f.table, slice(f, global, 0), to_global);
        from_flat<float>(f.table, outer_slices(f, outer_state, global.size()), to_outer_state,
                         static_cast<std::size_t>(Outer::state_size));
    }
    // The fragment's part of each outer state array (whole-model flat arrays of `total`
    // elements, one after the other), one after the other.
    std::vector<float> outer_slices(const fragment& f, const std::vector<float>& outer_state,
                                    std::size_t total) const {
        std::vector<float> state;
        state.reserve(f.elements * static_cast<std::size_t>(Outer::state_size));
        for (int j = 0; j < Outer::state_size; ++j) {
            const auto one = slice(f, outer_state, static_cast<std::size_t>(j) * total);
            state.insert(state.end(), one.begin(), one.end());
        }
        return state;
    }

    // The fragment's elements of a whole-model flat array (starting at `base`), in its order.
    std::vector<float> slice(const fragment& f, const std::vector<float>& flat,
                             std::size_t base) const {
        std::vector<float> part(f.elements);
        for (std::size_t k = 0; k < f.params.size(); ++k) {
            const parameter& p = tensors_[f.params[k]];
            std::copy_n(flat.begin() + static_cast<std::ptrdiff_t>(base + p.offset), p.value.size,
                        part.begin() + static_cast<std::ptrdiff_t>(f.table.flat_offset(k)));
        }
        return part;
    }

    inner_type inner_;
    comm::communicator* comm_;
    memory_space comm_space_ = memory_space::host;  // what comm_ moves (regroup() keeps it)
    std::unique_ptr<comm::cuda_staging> staging_;
    std::vector<parameter> tensors_;
    std::vector<std::unique_ptr<fragment>> frags_;
    std::vector<float> state_average_;  // a per-state sync's average, on the host
};

}  // namespace loco::backend::cuda

namespace loco {

// The backend policy of loco::diloco for parameters in CUDA memory.
struct cuda_backend {
    template <class Inner, class Outer, class Compressor, class Aggregate>
    using engine = backend::cuda::diloco_engine<Inner, Outer, Compressor, Aggregate>;
};

}  // namespace loco
