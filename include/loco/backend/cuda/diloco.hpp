#pragma once
// loco::cuda::diloco: loco::diloco for parameters in GPU memory, with the same configuration,
// semantics and checkpoint format (an fp32 model's checkpoint moves between host and GPU runs).
//
//   inner step    two launches (non-finite check, fused update); no host synchronisation.
//                 With Inner = loco::groups<...> (backend/cuda/groups.hpp): the check, then each
//                 group's launches (fused update, or Muon's cuBLAS step)
//   sync          phase 1 (delta = global - local, one launch), the average over the workers,
//                 phase 2 (outer update of global and state, written into the parameters, one
//                 launch)
//
// The average, with a GPU communicator (comm::nccl, comm::cuda_replicas):
//   - compress::none: one fp32 all-reduce of device memory between phase 1 and phase 2;
//   - a compressor with a device implementation under exchange_scheme::all_gather or automatic:
//     the sync runs on the device. blockwise, cast, statistical<1 | 2 | 4> per tensor
//     (backend/cuda/compress.hpp, headers in backend/cuda/compress/) and topk
//     (backend/cuda/compress_topk.hpp), each also inside error_feedback<>. One fused encode forms
//     the pseudo-gradient (phase 1), adds it into the error-feedback residual and encodes the
//     payload, the host compressor's byte for byte (statistical and topk take a few passes); an
//     all-gather of the payloads in device memory; one check of every received payload
//     (payload_header.hpp's header check, then the codec's format checks) that throws
//     loco::wire_error before anything is written; then the M payloads decoded, averaged in rank
//     order and the outer step applied (phase 2): one fused kernel for blockwise, cast and
//     statistical; for topk a scatter per rank, then the uncompressed path's check and apply. The
//     new residual goes to a second buffer that replaces the old one only once every payload
//     checked out.
// Otherwise (two_phase, statistical per row or with 8 bits, a host communicator) the
// pseudo-gradient is copied to the host and averaged by the same exchange schemes as on the host
// (exchange.hpp), over the communicator itself when it moves host memory, or over
// comm::cuda_staging when it moves device memory. A sync waits for the stream: it is a
// collective, and its results are needed by every worker.

#include <loco/backend/cuda/compress.hpp>
#include <loco/backend/cuda/compress_topk.hpp>
#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/groups.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/optimizer.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/aggregate/mean.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/comm/cuda_staging.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/none.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/exchange.hpp>
#include <loco/optimizer.hpp>
#include <loco/params.hpp>
#include <loco/policy.hpp>
#include <loco/schedule/every.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <istream>
#include <memory>
#include <optional>
#include <span>
#include <ostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco::cuda {
namespace detail {

// One segment per tensor of the table; shapes come from the parameter list when there is one.
inline std::vector<compress::segment> table_segments(const backend::cuda::tensor_table& table,
                                                     const parameter_list* shapes) {
    std::vector<compress::segment> segs;
    for (std::size_t i = 0; i < table.size(); ++i) {
        const std::size_t n = table.spec(i).size;
        compress::segment s{table.flat_offset(i), n, 1, n};
        if (shapes && (*shapes)[i].value.is_matrix()) {
            s.rows = (*shapes)[i].value.rows;
            s.cols = (*shapes)[i].value.cols;
        }
        segs.push_back(s);
    }
    return segs;
}

// What the fused device exchange keeps: the payload layout, the send and receive buffers, the
// error-feedback residual (current and next, padded layout) and the payload check.
template <class Compressor>
struct device_exchange {
    using support = backend::cuda::device_compressor<Compressor>;
    using codec = typename support::codec;
    static constexpr bool feedback = support::feedback;

    device_exchange(const backend::cuda::tensor_table& table, int ranks,
                    const typename Compressor::hyper&)
        : plan(table),
          send(plan.payload_bytes()),
          recv(plan.payload_bytes() * static_cast<std::size_t>(ranks)),
          residual(support::feedback ? table.padded_elements() : 0),
          next(support::feedback ? table.padded_elements() : 0),
          check(ranks) {
        residual.zero(nullptr);
        next.zero(nullptr);  // its padding is never written, and must stay zero
    }

    backend::cuda::compress_plan<codec> plan;
    backend::cuda::device_buffer<std::byte> send, recv;
    backend::cuda::device_buffer<float> residual, next;
    backend::cuda::payload_check check;
};

// The same for compress::topk and error_feedback<topk> (backend/cuda/compress_topk.hpp). The
// layout depends on the ratio (k per tensor): a sync with another ratio than the plan's re-plans
// first, keeping the residual.
template <class Compressor>
struct topk_device_exchange {
    using support = backend::cuda::device_topk<Compressor>;
    static constexpr bool feedback = support::feedback;

    topk_device_exchange(const backend::cuda::tensor_table& table, int ranks,
                         const typename Compressor::hyper& h)
        : plan(table, support::codec_hyper(h)),
          send(plan.payload_bytes()),
          recv(plan.payload_bytes() * static_cast<std::size_t>(ranks)),
          residual(feedback ? table.padded_elements() : 0),
          next(feedback ? table.padded_elements() : 0),
          check(ranks) {
        residual.zero(nullptr);
        next.zero(nullptr);
    }

    void replan(const backend::cuda::tensor_table& table, const typename Compressor::hyper& h) {
        const compress::topk::hyper& ch = support::codec_hyper(h);
        if (loco::detail::float_bits(ch.ratio) == loco::detail::float_bits(plan.hyper().ratio)) {
            return;
        }
        backend::cuda::topk_plan fresh(table, ch);
        backend::cuda::device_buffer<std::byte> s(fresh.payload_bytes());
        backend::cuda::device_buffer<std::byte> r(fresh.payload_bytes() * check.ranks());
        plan = std::move(fresh);
        send = std::move(s);
        recv = std::move(r);
    }

    backend::cuda::topk_plan plan;
    backend::cuda::device_buffer<std::byte> send, recv;
    backend::cuda::device_buffer<float> residual, next;
    backend::cuda::topk_payload_check check;
};

struct no_device_exchange {};

}  // namespace detail

template <class Inner, class Outer, class Compressor = compress::none,
          class Schedule = schedule::every>
class diloco {
    static_assert(compress::compressor<Compressor>,
                  "loco: the Compressor argument of loco::cuda::diloco is not a loco compressor; "
                  "see docs/compressors.md");
    static_assert(loco::detail::check_elementwise_policy<Outer>());
    static_assert(loco::detail::check_schedule_policy<Schedule>());
    static_assert(std::is_same_v<Schedule, schedule::every> || loco::stateless_schedule<Schedule>,
                  "loco: loco::cuda::diloco syncs the whole model with schedule::every (or a "
                  "stateless `due` schedule) for now; streaming and delayed schedules come with "
                  "the unified handle, see docs/cuda.md");

    // The fused device exchange is possible for this compressor (see the top of the file).
    static constexpr bool device_topk = backend::cuda::device_topk<Compressor>::available;
    static constexpr bool device_compression =
        backend::cuda::has_device_compressor<Compressor> || device_topk;
    using device_exchange_t = std::conditional_t<
        backend::cuda::has_device_compressor<Compressor>, detail::device_exchange<Compressor>,
        std::conditional_t<device_topk, detail::topk_device_exchange<Compressor>,
                           detail::no_device_exchange>>;

public:
    using inner_policy = Inner;
    // Inner::hyper, or for loco::groups<...> the tuple of every group's hyper-parameters.
    using inner_hyper_type = typename cuda::optimizer<Inner>::hyper_type;
    using outer_policy = Outer;
    using compressor_policy = Compressor;
    using schedule_policy = Schedule;

    struct config {
        inner_hyper_type inner{};
        typename Outer::hyper outer{};
        typename Schedule::hyper schedule{};
        typename Compressor::hyper compress{};
        nonfinite_policy on_nonfinite = nonfinite_policy::skip;
        bool broadcast_initial = true;
        int workers = 0;
        exchange_scheme exchange = exchange_scheme::automatic;
        std::uint64_t seed = 0;
        cudaStream_t stream = nullptr;  // every launch goes here (the trainer's compute stream)
    };

    diloco(const parameter_list& params, comm::communicator& comm, config cfg = {})
        : diloco(params, &params, comm, cfg) {}

    // bf16 parameters (element-wise inner policies; parameter groups route a parameter_list).
    diloco(backend::cuda::tensor_table table, comm::communicator& comm, config cfg = {})
        requires(!detail::is_groups<Inner>)
        : diloco(std::move(table), nullptr, comm, cfg) {}

    // Collective once: the initial broadcast (see loco::diloco::start).
    bool start() {
        if (started_) {
            return false;
        }
        const auto& table = inner_.table_;
        const std::size_t padded = table.padded_elements();
        backend::cuda::gather_values(table, inner_.master_ptr(), global_.get(), stream());
        bool moved = false;
        if (broadcast_initial_ && comm_->size() > 1) {
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
            const std::vector<float> mine = global_.download();
            if (comm_->space() == memory_space::cuda) {
                comm_->broadcast(comm::as_bytes(cuda_tensor(global_.get(), padded)), 0);
            } else {
                std::vector<float> staged = mine;
                comm_->broadcast(comm::as_bytes(host_tensor(staged.data(), staged.size())), 0);
                global_.upload(staged);
            }
            moved = global_.download() != mine;
            backend::cuda::scatter_values(table, global_.get(), inner_.master_ptr(), stream());
        }
        started_ = true;
        return moved;
    }

    step_result step() {
        loco::detail::validate_hyper<Schedule>(schedule_hyper_);
        inner_.prepare();  // may throw; nothing has changed yet
        step_result result;
        if (start()) {
            inner_.skip_on_host();  // the gradient belongs to the parameters before the broadcast
        } else {
            inner_.launch_update();
            result.applied = true;
        }
        ++calls_;
        bool due = false;
        if constexpr (std::is_same_v<Schedule, schedule::every>) {
            due = calls_ % schedule_hyper_.every == 0;
        } else {
            due = Schedule::due(schedule_hyper_, calls_);
        }
        if (due) {
            sync();
            result.synced = true;
        }
        return result;
    }

    // Outer step now (collective). If it throws, parameters, global snapshot, outer state and
    // compressor state are unchanged.
    void sync() {
        loco::detail::validate_hyper<Outer>(outer_hyper_);
        loco::detail::validate_hyper<Compressor>(compress_hyper_);
        start();
        const auto& table = inner_.table_;
        outer_mirror_.sync(outer_hyper_, outer_control_, stream());
        if constexpr (device_compression) {
            if (device_) {
                device_sync();
                return;
            }
        }
        backend::cuda::outer_delta(table, global_.get(), inner_.master_ptr(), delta_.get(),
                                   stream());
        average();
        apply_average(delta_.get());
    }

    inner_hyper_type& inner_hyper() noexcept { return inner_.hyper(); }
    const inner_hyper_type& inner_hyper() const noexcept { return inner_.hyper(); }
    typename Outer::hyper& outer_hyper() noexcept { return outer_hyper_; }
    const typename Outer::hyper& outer_hyper() const noexcept { return outer_hyper_; }
    typename Schedule::hyper& schedule_hyper() noexcept { return schedule_hyper_; }
    const typename Schedule::hyper& schedule_hyper() const noexcept { return schedule_hyper_; }
    typename Compressor::hyper& compress_hyper() noexcept { return compress_hyper_; }
    const typename Compressor::hyper& compress_hyper() const noexcept { return compress_hyper_; }

    // The counters on the device are read with a wait for the stream.
    std::uint64_t calls() const noexcept { return calls_; }
    std::uint64_t inner_steps() const { return inner_.steps(); }
    std::uint64_t skipped_steps() const { return inner_.skipped_steps(); }
    std::uint64_t outer_steps() const { return outer_control_.read(stream()).steps; }
    std::uint64_t skipped_syncs() const { return outer_control_.read(stream()).skipped; }

    const cuda::optimizer<Inner>& inner() const noexcept { return inner_; }
    comm::communicator& communicator() const noexcept { return *comm_; }
    cudaStream_t stream() const noexcept { return inner_.stream(); }
    exchange_scheme exchange() const noexcept {
        return host_ ? host_->scheme() : exchange_scheme::all_gather;
    }
    // True when syncs run the fused device exchange (the top of the file says when).
    bool device_exchange() const noexcept { return host_ == nullptr && !device_all_reduce_; }
    // Bytes this worker sends per sync. The device all-reduce runs over the padded layout (each
    // tensor's slice rounded up to 8 elements), so its ring volume counts the padding; the
    // device exchange sends the host's payloads, (M - 1) P.
    std::uint64_t bytes_per_sync() const {
        if constexpr (device_compression) {
            if (device_) {
                return static_cast<std::uint64_t>(comm_->size() - 1) *
                       device_->plan.payload_bytes();
            }
        }
        if (!device_all_reduce_) {
            return host_->bytes_per_average(compress_hyper_);
        }
        const std::uint64_t m = static_cast<std::uint64_t>(comm_->size());
        const std::uint64_t n = padded();
        const std::uint64_t r = static_cast<std::uint64_t>(comm_->rank());
        const std::uint64_t chunk = n * (r + 1) / m - n * r / m;
        return 4 * (n + (m - 2) * chunk);
    }

    // Copies to the host, in the flat layout (each waits for the stream).
    std::vector<float> global() const { return flat(global_.get(), 1); }
    std::vector<float> inner_state(int j) const { return inner_.state(j); }
    std::vector<float> outer_state(int j) const {
        loco::detail::check_state_index(j, Outer::state_size, "outer state");
        return flat(outer_state_.get() + static_cast<std::size_t>(j) * padded(), 1);
    }
    // The compressor's state (the error-feedback residual), flat layout, as loco::diloco's.
    std::vector<float> compressor_state() const {
        if constexpr (device_compression) {
            if (device_) {
                if constexpr (device_exchange_t::feedback) {
                    return flat(device_->residual.get(), 1);
                } else {
                    return {};
                }
            }
        }
        const auto s = host_->exchanger().state();
        return {s.begin(), s.end()};
    }
    // The server-side state of two_phase (empty otherwise).
    std::vector<float> server_state() const {
        if (!host_) {
            return {};
        }
        const auto s = host_->exchanger().server_state();
        return {s.begin(), s.end()};
    }

    // The host handle's checkpoint format (loco::diloco::save with one fragment and the mean),
    // so that a checkpoint moves between host and GPU runs.
    void save(std::ostream& os) const {
        const auto oc = outer_control_.read(stream());
        loco::detail::checkpoint_writer w(os);
        write_policies(w);
        w.u64(static_cast<std::uint64_t>(comm_->size()));
        w.u64(static_cast<std::uint64_t>(comm_->rank()));
        w.u64(calls_);  // schedule::every's state
        w.u64(oc.skipped);
        w.u64(0);   // consecutive skipped syncs: not tracked by the GPU handle yet
        w.text("");  // the first non-finite tensor, likewise
        inner_.write_section(w);
        w.floats(global());
        w.floats(flat(outer_state_.get(), static_cast<std::size_t>(Outer::state_size)));
        w.text(to_string(exchange()));
        w.u64(oc.steps);  // the one fragment: outer steps, skipped syncs, compressor state
        w.u64(oc.skipped);
        w.floats(compressor_state());
        w.floats(server_state());
        w.u64(0);  // no exchange in flight: the GPU handle syncs in one call
        w.u64(0);
        w.floats(std::span<const float>());
        w.finish();
    }

    void load(std::istream& is) {
        const std::size_t n = inner_.table_.total_elements();
        loco::detail::checkpoint_reader r(is);
        r.expect_text("diloco", "the checkpoint kind");
        r.expect_text(Outer::name, "the outer optimizer");
        r.expect_text(Compressor::name, "the compressor");
        r.expect_text(Schedule::name, "the sync schedule");
        r.expect_text(loco::detail::describe_policy<Compressor>(compress_hyper_),
                      "the compressor settings");
        r.expect_text(fragment_description(), "the fragment layout");
        r.expect_text(loco::detail::describe_policy<aggregate::mean>({}), "the aggregation");
        (void)r.text("the outer optimizer settings");
        r.expect_u64(static_cast<std::uint64_t>(comm_->size()), "the number of workers");
        r.expect_u64(static_cast<std::uint64_t>(comm_->rank()),
                     "the worker rank (each worker loads the checkpoint it saved)");
        const std::uint64_t calls = r.u64("the step call count");
        (void)r.u64("the skipped sync count");
        (void)r.u64("the consecutive skipped sync count");
        (void)r.text("the first non-finite tensor");
        auto inner = inner_.read_section(r);
        std::vector<float> global(n);
        r.floats(global, "the global parameters");
        std::vector<float> outer_state(static_cast<std::size_t>(Outer::state_size) * n);
        r.floats(outer_state, "the outer optimizer state");
        r.expect_text(to_string(exchange()), "the exchange scheme");
        const std::uint64_t outer_steps = r.u64("a fragment's outer step count");
        const std::uint64_t skipped_syncs = r.u64("a fragment's skipped sync count");
        std::vector<float> compressor_state(
            host_ ? host_->exchanger().state().size()
                  : static_cast<std::size_t>(Compressor::state_size) * n);
        r.floats(compressor_state, "the compressor state");
        std::vector<float> server_state(host_ ? host_->exchanger().server_state().size() : 0);
        r.floats(server_state, "the server-side compressor state");
        if (r.u64("whether an exchange was in flight") != 0) {
            throw checkpoint_error("loco::cuda::diloco: the checkpoint holds an exchange in flight "
                                   "(a streaming or delayed schedule), which the GPU handle does "
                                   "not run yet (docs/cuda.md)");
        }
        (void)r.u64("the call an exchange started at");
        std::vector<float> none;
        r.floats(none, "the pseudo-gradient in flight");
        r.finish();

        inner_.commit(inner);
        backend::cuda::from_flat<float>(inner_.table_, global, global_.get());
        backend::cuda::from_flat<float>(inner_.table_, outer_state, outer_state_.get(),
                                        static_cast<std::size_t>(Outer::state_size));
        if (host_) {
            host_->restore(compressor_state, server_state);
        }
        if constexpr (device_compression) {
            if (device_ && !compressor_state.empty()) {
                backend::cuda::from_flat<float>(inner_.table_, compressor_state,
                                                device_->residual.get());
            }
        }
        outer_control_.set_counters(outer_steps, skipped_syncs, 0, stream());
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        calls_ = calls;
        started_ = true;
    }

private:
    void write_policies(loco::detail::checkpoint_writer& w) const {
        w.text("diloco");
        w.text(Outer::name);
        w.text(Compressor::name);
        w.text(Schedule::name);
        w.text(loco::detail::describe_policy<Compressor>(compress_hyper_));
        w.text(fragment_description());
        w.text(loco::detail::describe_policy<aggregate::mean>({}));
        w.text(loco::detail::describe_policy<Outer>(outer_hyper_));
    }

    // The host's description of one fragment holding every tensor in order.
    std::string fragment_description() const {
        std::string s = "fragment 0:";
        for (std::size_t i = 0; i < inner_.table_.size(); ++i) {
            s += " " + inner_.table_.spec(i).name;
        }
        return s;
    }

    // The host exchange of a compressed (or host-communicator) sync, with the state it keeps.
    class host_exchange {
    public:
        host_exchange(std::vector<compress::segment> segs, exchange_scheme scheme,
                      comm::communicator& comm, const typename Compressor::hyper& h)
            : exchanger_(std::move(segs), scheme, comm.size(), comm.rank(), h) {
            if (comm.space() == memory_space::cuda) {
                staging_ = std::make_unique<comm::cuda_staging>(comm);
            }
        }

        exchange_scheme scheme() const noexcept { return exchanger_.scheme(); }
        const auto& exchanger() const noexcept { return exchanger_; }
        std::uint64_t bytes_per_average(const typename Compressor::hyper& h) const {
            return exchanger_.bytes_per_average(h);
        }

        // Averages `flat` (this worker's pseudo-gradient); the compressor state advances only
        // when every collective succeeded and every payload decoded (exchange.hpp).
        void average(comm::communicator& comm, std::vector<float>& flat,
                     const typename Compressor::hyper& h, const compress::encode_context& ctx) {
            comm::communicator& host_comm = staging_ ? *staging_ : comm;
            exchanger_.average(host_comm, flat, h, ctx);
        }
        void restore(const std::vector<float>& state, const std::vector<float>& server) {
            std::copy(state.begin(), state.end(), exchanger_.state().begin());
            std::copy(server.begin(), server.end(), exchanger_.server_state().begin());
        }

    private:
        loco::detail::exchanger<Compressor> exchanger_;
        std::unique_ptr<comm::cuda_staging> staging_;
    };

    // `source`: a tensor_table, or the parameter_list (which groups need for their routing).
    template <class Source>
    diloco(Source&& source, const parameter_list* shapes, comm::communicator& comm, config cfg)
        : inner_(std::forward<Source>(source),
                 {cfg.inner, cfg.on_nonfinite, cfg.stream, cfg.seed}),
          comm_(&comm),
          outer_hyper_(cfg.outer),
          schedule_hyper_(cfg.schedule),
          compress_hyper_(cfg.compress),
          broadcast_initial_(cfg.broadcast_initial),
          seed_(cfg.seed),
          outer_control_((loco::detail::validate_hyper<Outer>(cfg.outer), cfg.outer)),
          outer_mirror_(cfg.outer),
          global_(padded()),
          outer_state_(static_cast<std::size_t>(Outer::state_size) * padded()),
          delta_(fused(comm, cfg) ? 0 : padded()) {  // the device exchange needs no delta
        loco::detail::validate_hyper<Schedule>(schedule_hyper_);
        loco::detail::validate_hyper<Compressor>(compress_hyper_);
        if (cfg.workers < 0) {
            throw invalid_argument(
                "loco::cuda::diloco: workers must be >= 0 (0 = the communicator's size)");
        }
        if (cfg.workers != 0 && cfg.workers != comm.size()) {
            throw comm_error("loco::cuda::diloco: configured for " + std::to_string(cfg.workers) +
                             " workers but the " + std::string(comm.name()) +
                             " communicator has " + std::to_string(comm.size()) + " ranks");
        }
        if constexpr (device_compression) {
            if (fused(comm, cfg)) {
                device_ = std::make_unique<device_exchange_t>(inner_.table_, comm.size(),
                                                              cfg.compress);
            }
        }
        if (!device_) {
            host_ = std::make_unique<host_exchange>(detail::table_segments(inner_.table_, shapes),
                                                    cfg.exchange, comm, cfg.compress);
        }
        device_all_reduce_ = std::is_same_v<Compressor, compress::none> && host_ &&
                             comm.space() == memory_space::cuda &&
                             host_->scheme() == exchange_scheme::all_reduce;
        outer_state_.zero(nullptr);
        delta_.zero(nullptr);
        backend::cuda::gather_values(inner_.table_, inner_.master_ptr(), global_.get(), nullptr);
        LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    }

    std::size_t padded() const noexcept { return inner_.table_.padded_elements(); }

    // Whether syncs take the fused device exchange.
    static bool fused(const comm::communicator& comm, const config& cfg) noexcept {
        return device_compression && device_layout(cfg) && comm.space() == memory_space::cuda &&
               (cfg.exchange == exchange_scheme::automatic ||
                cfg.exchange == exchange_scheme::all_gather);
    }

    // The device plan is built from the tensor table, which records no rows: statistical<> per
    // row takes the host exchange (correct, not fast); per tensor (MuLoCo's) runs on the device.
    static bool device_layout(const config& cfg) noexcept {
        using support = backend::cuda::device_compressor<Compressor>;
        using codec = typename support::codec;
        if constexpr (device_topk) {
            static_cast<void>(cfg);
            return true;
        } else if constexpr (requires(const typename codec::hyper& h) { h.per; }) {
            if constexpr (support::feedback) {
                return cfg.compress.compress.per == compress::granularity::tensor;
            } else {
                return cfg.compress.per == compress::granularity::tensor;
            }
        } else {
            static_cast<void>(cfg);
            return true;
        }
    }

    std::vector<float> flat(const float* device, std::size_t arrays) const {
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        return backend::cuda::to_flat(inner_.table_, device, arrays);
    }

    // delta := its mean over the workers. A collective waits for the stream first: the
    // communicator runs on its own stream and needs phase 1 finished.
    void average() {
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        if (device_all_reduce_) {
            comm_->all_reduce(cuda_tensor(delta_.get(), padded()), comm::reduce_op::mean);
            return;
        }
        std::vector<float> host = backend::cuda::to_flat(inner_.table_, delta_.get());
        const auto oc = outer_control_.read(stream());
        compress::encode_context ctx;
        ctx.seed = seed_;
        ctx.round = oc.steps + oc.skipped;
        ctx.rank = comm_->rank();
        if constexpr (requires { outer_hyper_.lr; }) {
            ctx.outer_lr = outer_hyper_.lr;
        }
        host_->average(*comm_, host, compress_hyper_, ctx);
        backend::cuda::from_flat<float>(inner_.table_, host, delta_.get());
    }

    // avg (padded layout) is the averaged pseudo-gradient: the non-finite policy, then phase 2.
    void apply_average(float* avg) {
        const auto& table = inner_.table_;
        if (inner_.on_nonfinite() != nonfinite_policy::ignore) {
            backend::cuda::check_padded(table, avg, outer_control_.control(), stream());
        }
        if (inner_.on_nonfinite() == nonfinite_policy::raise) {
            const auto c = outer_control_.read(stream());
            if (c.first_nonfinite != backend::cuda::no_nonfinite) {
                outer_control_.reset_nonfinite(stream());
                throw nonfinite_error("loco::cuda::diloco: the averaged pseudo-gradient holds a "
                                      "non-finite value at flat element " +
                                      std::to_string(c.first_nonfinite) +
                                      "; the outer step was not applied");
            }
        }
        // Under skip, a non-finite average makes the kernel write the unchanged global values
        // back (every worker drops the round) and count a skipped sync.
        backend::cuda::outer_apply<Outer>(table, global_.get(), avg, outer_state_.get(),
                                          inner_.master_ptr(), outer_control_.hyper(),
                                          outer_control_.control(),
                                          inner_.on_nonfinite() == nonfinite_policy::skip,
                                          stream());
    }

    // This worker's payload into device_->send: phase 1 fused into the encode (see the top of
    // the file); then the all-gather into device_->recv.
    template <class Encode>
    void encode_and_gather(Encode&& encode) {
        auto& dx = *device_;
        backend::cuda::encode_io io;
        io.global = global_.get();
        io.master = inner_.master_ptr();
        io.residual = dx.residual.get();
        io.next_residual = dx.next.get();
        io.payload = dx.send.get();
        backend::cuda::device_encode_context ctx;
        ctx.seed = seed_;
        ctx.rank = comm_->rank();
        ctx.round_from = outer_control_.control();  // round = outer steps + skipped syncs
        if constexpr (requires { outer_hyper_.lr; }) {
            ctx.outer_lr = outer_hyper_.lr;
        }
        encode(io, ctx);
        // The communicator runs on its own stream and needs the payload finished.
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream()));
        const std::size_t p = dx.plan.payload_bytes();
        comm_->all_gather(
            tensor_view<const std::byte>{dx.send.get(), p, 0, 0, memory_space::cuda},
            tensor_view<std::byte>{dx.recv.get(), dx.recv.size(), 0, 0, memory_space::cuda});
    }

    // The whole sync on the device (device_ set): see the top of the file.
    void device_sync() {
        if constexpr (device_topk) {
            auto& dx = *device_;
            const auto& table = inner_.table_;
            dx.replan(table, compress_hyper_);
            encode_and_gather([&](const backend::cuda::encode_io& io,
                                  const backend::cuda::device_encode_context& ctx) {
                backend::cuda::encode_topk<Compressor, backend::cuda::encode_from::params>(
                    dx.plan, table, compress_hyper_, io, ctx, stream());
            });
            // Throws wire_error for a malformed payload: nothing has been written yet.
            dx.check.run(dx.plan, table, dx.recv.get(), stream());
            if constexpr (device_exchange_t::feedback) {
                std::swap(dx.residual, dx.next);  // every payload decodes: the residual advances
            }
            // The rank-order average into the plan's work buffer (its encode is done with it).
            backend::cuda::decode_average_topk(dx.plan, table, dx.recv.get(), comm_->size(),
                                               dx.plan.work(), stream());
            apply_average(dx.plan.work());
        } else if constexpr (device_compression) {
            using support = typename detail::device_exchange<Compressor>::support;
            using codec = typename support::codec;
            auto& dx = *device_;
            const auto& table = inner_.table_;
            encode_and_gather([&](const backend::cuda::encode_io& io,
                                  const backend::cuda::device_encode_context& ctx) {
                backend::cuda::encode<Compressor, backend::cuda::encode_from::params>(
                    dx.plan, table, compress_hyper_, io, ctx, stream());
            });
            typename codec::hyper ch{};
            if constexpr (support::feedback) {
                ch = compress_hyper_.compress;
            } else {
                ch = compress_hyper_;
            }
            // Throws wire_error for a malformed payload: nothing has been written yet.
            const std::uint64_t nonfinite =
                dx.check.run(dx.plan, table, ch, dx.recv.get(), stream());
            if constexpr (support::feedback) {
                std::swap(dx.residual, dx.next);  // every payload decodes: the residual advances
            }
            const nonfinite_policy policy = inner_.on_nonfinite();
            if (policy == nonfinite_policy::raise && nonfinite != backend::cuda::no_nonfinite) {
                throw nonfinite_error("loco::cuda::diloco: the averaged pseudo-gradient holds a "
                                      "non-finite value at flat element " +
                                      std::to_string(nonfinite) +
                                      "; the outer step was not applied");
            }
            // Under skip, a non-finite average makes the kernel write the unchanged global values
            // back and count a skipped sync, as outer_apply does.
            backend::cuda::decode_average_apply<codec, Outer>(
                dx.plan, table, dx.recv.get(), comm_->size(), global_.get(), outer_state_.get(),
                inner_.master_ptr(), outer_control_.hyper(), outer_control_.control(),
                policy == nonfinite_policy::skip ? dx.check.nonfinite() : nullptr, stream());
        }
    }

    cuda::optimizer<Inner> inner_;
    comm::communicator* comm_;
    typename Outer::hyper outer_hyper_;
    typename Schedule::hyper schedule_hyper_;
    typename Compressor::hyper compress_hyper_;
    bool broadcast_initial_;
    std::uint64_t seed_;
    mutable backend::cuda::device_control<typename Outer::hyper> outer_control_;
    detail::hyper_mirror<typename Outer::hyper> outer_mirror_;
    std::unique_ptr<host_exchange> host_;        // the host exchange, when the device's is not used
    std::unique_ptr<device_exchange_t> device_;  // the fused device exchange
    bool device_all_reduce_ = false;
    backend::cuda::device_buffer<float> global_;       // padded layout
    backend::cuda::device_buffer<float> outer_state_;  // Outer::state_size padded arrays
    backend::cuda::device_buffer<float> delta_;        // padded layout
    std::uint64_t calls_ = 0;
    bool started_ = false;
};

}  // namespace loco::cuda
