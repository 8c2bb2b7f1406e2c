#pragma once
// How the workers' pseudo-gradients become one average, for any compressor. Three schemes, with
// the bytes each rank sends per sync (M workers, n elements, P = C::payload_bytes of all segments,
// Q = the largest C::payload_bytes of one chunk's segments, chunks being [n k/M, n (k+1)/M)):
//
//   all_reduce   one fp32 mean all-reduce (compress::none only: payloads of other compressors
//                cannot be summed). Ring volume: 2 (M-1)/M * 4n.
//   all_gather   every rank encodes its pseudo-gradient into one payload; an all-gather gives
//                every rank all M payloads; each rank decodes them and averages in fp32 in rank
//                order, so every rank holds bit-identical results. (M-1) * P. (With
//                aggregate::scatter_mean the compressor averages the payloads in its own
//                coordinates instead, here and in two_phase's per-chunk average.)
//   two_phase    DeepSpeed 1-bit Adam's scheme: every rank encodes chunk k of its pseudo-gradient
//                for rank k (all-to-all); rank k decodes the M payloads of its chunk, averages them,
//                re-encodes the average with its own server-side state (error feedback when the
//                compressor has it) and an all-gather returns every chunk to every rank.
//                Blocks are padded to Q bytes: 2 (M-1) * Q, about 2 (M-1)/M * P.
//
// The average is transactional and split-phase: start() takes this worker's pseudo-gradient, encodes
// it and starts the collective (returning at once), finish() completes it and writes the aggregate
// into a buffer of the caller's, and only commit() advances the compressor state (error-feedback
// residuals). A failure at any stage is recorded, not thrown, so that every rank can go through the
// same collectives and then agree on one outcome (loco::diloco's all-or-nothing sync); average() is
// start + finish + commit and throws the recorded error.

#include <loco/aggregate/aggregate.hpp>
#include <loco/aggregate/mean.hpp>
#include <loco/aggregate/scatter_mean.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/none.hpp>
#include <loco/error.hpp>
#include <loco/params.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco {

enum class exchange_scheme : unsigned char {
    automatic,   // all_reduce for compress::none, all_gather for every other compressor
    all_reduce,
    all_gather,
    two_phase
};

constexpr std::string_view to_string(exchange_scheme s) noexcept {
    switch (s) {
        case exchange_scheme::automatic: return "automatic";
        case exchange_scheme::all_reduce: return "all_reduce";
        case exchange_scheme::all_gather: return "all_gather";
        case exchange_scheme::two_phase: return "two_phase";
    }
    return "?";
}

namespace detail {

// One segment per parameter; matrices keep their shape (per-row compressors use it).
inline std::vector<compress::segment> parameter_segments(const parameter_list& params) {
    std::vector<compress::segment> segs;
    segs.reserve(params.size());
    for (const auto& p : params) {
        const bool matrix = p.value.is_matrix();
        segs.push_back({p.offset, p.value.size, matrix ? p.value.rows : 1,
                        matrix ? p.value.cols : p.value.size});
    }
    return segs;
}

// The parts of `segs` inside [begin, end), with offsets moved down by `shift`. A part keeps its
// 2-D shape only when it consists of whole rows.
inline std::vector<compress::segment> clip_segments(std::span<const compress::segment> segs,
                                                    std::size_t begin, std::size_t end,
                                                    std::size_t shift) {
    std::vector<compress::segment> out;
    for (const auto& s : segs) {
        const std::size_t lo = std::max(s.offset, begin);
        const std::size_t hi = std::min(s.offset + s.size, end);
        if (lo >= hi) {
            continue;
        }
        compress::segment part{lo - shift, hi - lo, 1, hi - lo};
        if (s.rows > 1 && (lo - s.offset) % s.cols == 0 && part.size % s.cols == 0) {
            part.rows = part.size / s.cols;
            part.cols = s.cols;
        }
        out.push_back(part);
    }
    return out;
}

// Where a sync failed, in pipeline order, and what kind of error it was.
enum class sync_stage : unsigned char { none, encode, transfer, decode, apply };

constexpr std::string_view to_string(sync_stage s) noexcept {
    switch (s) {
        case sync_stage::none: return "none";
        case sync_stage::encode: return "encode";
        case sync_stage::transfer: return "transfer";
        case sync_stage::decode: return "decode";
        case sync_stage::apply: return "apply";
    }
    return "?";
}

struct stage_failure {
    sync_stage stage = sync_stage::none;
    std::exception_ptr error;

    explicit operator bool() const noexcept { return stage != sync_stage::none; }
    // The first failure is kept: later stages fail because of it.
    void record(sync_stage where, std::exception_ptr e) noexcept {
        if (stage == sync_stage::none) {
            stage = where;
            error = std::move(e);
        }
    }
};

template <class C, class A = aggregate::mean>
class exchanger {
    static constexpr std::size_t S = static_cast<std::size_t>(C::state_size);
    // Whether C can tell which elements a payload carries (sparse payloads).
    static constexpr bool has_support =
        requires(const typename C::hyper& h, std::span<const std::byte> in,
                 std::span<const compress::segment> segs, std::span<std::uint8_t> sent) {
            C::decode_support(h, in, segs, sent);
        };
    static_assert(!aggregate::decodes_payloads_together<A>() ||
                      (!A::needs_deltas && aggregate::has_scatter_mean<C>),
                  "loco: this aggregation averages payloads in the compressor's own coordinates, "
                  "which needs a compressor with decode_scatter_mean (compress::demo); for "
                  "SparseLoCo's element-wise scatter-mean use aggregate::median_norm_clip with "
                  "clip = false (see docs/aggregation.md)");
    static_assert(!A::needs_reports || A::needs_deltas,
                  "loco: an aggregation that reads worker reports must also set needs_deltas "
                  "(reports without deltas are not supported yet); see docs/diloco.md");

public:
    exchanger(const parameter_list& params, exchange_scheme scheme, int world, int rank,
              const typename C::hyper& h)
        : exchanger(parameter_segments(params), scheme, world, rank, h) {}

    // The segments tile the flat layout [0, n) in order (one per parameter).
    exchanger(std::vector<compress::segment> segs, exchange_scheme scheme, int world, int rank,
              const typename C::hyper& h)
        : world_(static_cast<std::size_t>(world)),
          rank_(static_cast<std::size_t>(rank)),
          n_(compress::total_elements(segs)),
          segs_(std::move(segs)) {
        if (scheme != exchange_scheme::automatic && scheme != exchange_scheme::all_reduce &&
            scheme != exchange_scheme::all_gather && scheme != exchange_scheme::two_phase) {
            throw invalid_argument("loco: exchange_scheme value " +
                                   std::to_string(static_cast<int>(scheme)) +
                                   " is not a scheme; use automatic, all_reduce, all_gather or "
                                   "two_phase");
        }
        const bool raw_mean = std::is_same_v<C, compress::none> && !A::needs_deltas;
        scheme_ = scheme == exchange_scheme::automatic
                      ? (raw_mean ? exchange_scheme::all_reduce : exchange_scheme::all_gather)
                      : scheme;
        if (scheme_ == exchange_scheme::all_reduce && !std::is_same_v<C, compress::none>) {
            throw invalid_argument("loco: exchange_scheme::all_reduce needs compress::none; the "
                                   "payloads of " + std::string(C::name) +
                                   " cannot be summed (use all_gather or two_phase)");
        }
        if (A::needs_deltas && scheme_ != exchange_scheme::all_gather) {
            throw invalid_argument("loco: the aggregation " + std::string(A::name) +
                                   " reads every worker's pseudo-gradient, which only "
                                   "exchange_scheme::all_gather delivers; use it (or automatic)");
        }
        state_.assign(S * n_, 0.0f);
        if (scheme_ == exchange_scheme::two_phase) {
            for (std::size_t k = 0; k <= world_; ++k) {
                chunk_begin_.push_back(n_ * k / world_);
            }
            for (std::size_t k = 0; k < world_; ++k) {
                const std::size_t b = chunk_begin_[k], e = chunk_begin_[k + 1];
                chunk_segs_.push_back(clip_segments(segs_, b, e, 0));
                local_segs_.push_back(clip_segments(segs_, b, e, b));
            }
            (void)chunk_payloads(h);  // the compressor refuses these segments now, not at a sync
            server_state_.assign(S * chunk_size(rank_), 0.0f);
        }
    }

    exchanger(exchanger&&) noexcept = default;
    exchanger& operator=(exchanger&&) noexcept = default;  // requests first: see the members
    exchanger(const exchanger&) = delete;
    exchanger& operator=(const exchanger&) = delete;
    ~exchanger() {
        request_ = comm::request{};  // members go in reverse order: end the collectives first
        report_request_ = comm::request{};
    }

    exchange_scheme scheme() const noexcept { return scheme_; }
    std::size_t elements() const noexcept { return n_; }
    std::span<const compress::segment> segments() const noexcept { return segs_; }

    // Bytes this rank sends per average (the formulas at the top of the file).
    std::uint64_t bytes_per_average(const typename C::hyper& h) const {
        const std::uint64_t m = world_;
        const std::uint64_t reports = A::needs_reports ? (m - 1) * sizeof(aggregate::worker_report) : 0;
        switch (scheme_) {
            case exchange_scheme::all_reduce: {
                const std::uint64_t c = chunk_of(n_, rank_);
                return 4 * (n_ + (m - 2) * c);
            }
            case exchange_scheme::all_gather: return (m - 1) * C::payload_bytes(h, segs_) + reports;
            case exchange_scheme::two_phase: return 2 * (m - 1) * chunk_payloads(h).block;
            case exchange_scheme::automatic: break;
        }
        return 0;
    }

    // Takes this worker's pseudo-gradient and starts the exchange; returns at once. An encode
    // failure is recorded (a zero payload is sent so that every rank's collectives still match).
    // A communicator that refuses to start a collective (throws at once) leaves nothing in
    // flight: the next start() may try again.
    void start(comm::communicator& comm, std::span<const float> delta, const typename C::hyper& h,
               const compress::encode_context& ctx, aggregate::worker_report report = {}) {
        if (in_flight_) {
            throw invalid_argument("loco: an exchange was started while the previous one is still "
                                   "in flight; finish it first");
        }
        failure_ = {};
        refused_ = false;
        ctx_ = ctx;
        try {
            start_collectives(comm, delta, h, ctx, report);
        } catch (...) {
            request_ = comm::request{};
            report_request_ = comm::request{};
            throw;
        }
        in_flight_ = true;
    }

private:
    void start_collectives(comm::communicator& comm, std::span<const float> delta,
                           const typename C::hyper& h, const compress::encode_context& ctx,
                           aggregate::worker_report report) {
        switch (scheme_) {
            case exchange_scheme::all_reduce:
                work_.assign(delta.begin(), delta.end());
                request_ = comm.start_all_reduce(host_tensor(work_.data(), work_.size()),
                                                 comm::reduce_op::mean);
                return;
            case exchange_scheme::all_gather: {
                const std::size_t p = C::payload_bytes(h, segs_);
                next_state_ = state_;
                send_.assign(p, std::byte{0});
                try {
                    C::encode(h, delta, segs_, next_state_, ctx, send_);
                } catch (...) {
                    failure_.record(sync_stage::encode, std::current_exception());
                    std::fill(send_.begin(), send_.end(), std::byte{0});
                }
                if constexpr (A::needs_reports) {
                    report_send_ = report;
                    reports_.assign(world_, {});
                    report_request_ = comm.start_all_gather(
                        {reinterpret_cast<const std::byte*>(&report_send_), sizeof report_send_, 0, 0,
                         memory_space::host},
                        {reinterpret_cast<std::byte*>(reports_.data()),
                         reports_.size() * sizeof(aggregate::worker_report), 0, 0, memory_space::host});
                }
                recv_.assign(world_ * p, std::byte{0});
                request_ = comm.start_all_gather(const_bytes_of(send_), bytes_of(recv_));
                return;
            }
            case exchange_scheme::two_phase:
                // all_to_all has no split-phase form: the whole exchange runs in finish().
                work_.assign(delta.begin(), delta.end());
                return;
            case exchange_scheme::automatic: break;
        }
        (void)report;
    }

public:
    bool in_flight() const noexcept { return in_flight_; }
    // The pseudo-gradient given to start() (all_reduce and two_phase keep a copy; all_gather the
    // encoded payload).
    const stage_failure& failure() const noexcept { return failure_; }

    // Completes the exchange and writes the aggregate into out (n elements). Failures are
    // recorded in failure(); out is then unspecified. Nothing is committed.
    void finish(comm::communicator& comm, std::span<float> out, const typename C::hyper& h) {
        if (!in_flight_) {
            throw invalid_argument("loco: an exchange was finished that is not in flight (finished "
                                   "twice, or never started)");
        }
        in_flight_ = false;
        switch (scheme_) {
            case exchange_scheme::all_reduce:
                wait(request_);
                if (!failure_) std::copy(work_.begin(), work_.end(), out.begin());
                return;
            case exchange_scheme::all_gather: {
                if constexpr (A::needs_reports) wait(report_request_);
                wait(request_);
                if (failure_) return;
                const std::size_t p = C::payload_bytes(h, segs_);
                if constexpr (A::needs_deltas) {
                    rows_.assign(world_ * n_, 0.0f);
                    aggregate::contributions c;
                    c.workers = world_;
                    c.elements = n_;
                    c.deltas = rows_;
                    try {
                        for (std::size_t k = 0; k < world_; ++k) {
                            C::decode(h, std::span<const std::byte>(recv_).subspan(k * p, p), segs_,
                                      std::span<float>(rows_).subspan(k * n_, n_));
                        }
                        if constexpr (aggregate::needs_support<A>() && has_support) {
                            // Which elements each payload carried.
                            sent_.assign(world_ * n_, 0);
                            for (std::size_t k = 0; k < world_; ++k) {
                                C::decode_support(
                                    h, std::span<const std::byte>(recv_).subspan(k * p, p), segs_,
                                    std::span<std::uint8_t>(sent_).subspan(k * n_, n_));
                            }
                            c.sent = sent_;
                        }
                    } catch (...) {
                        failure_.record(sync_stage::decode, std::current_exception());
                        return;
                    }
                    if constexpr (A::needs_reports) c.reports = reports_;
                    c.segments = segs_;
                    try {
                        next_aggregate_state_ = aggregate_state_;
                        refused_ = !aggregate::combine<A>(aggregate_hyper_, next_aggregate_state_, c, out);
                        if (refused_) std::fill(out.begin(), out.end(), 0.0f);
                    } catch (...) {
                        failure_.record(sync_stage::apply, std::current_exception());
                    }
                } else {
                    try {
                        mean_of_payloads(std::span<const std::byte>(recv_), p, p, segs_, h, out);
                    } catch (...) {
                        failure_.record(sync_stage::decode, std::current_exception());
                    }
                }
                return;
            }
            case exchange_scheme::two_phase: finish_two_phase(comm, out, h); return;
            case exchange_scheme::automatic: break;
        }
    }

    // An applied round: advances the compressor state to what the last exchange encoded with,
    // and the aggregation's state to what it computed.
    // aggregation = false: the compressor's state moves, the aggregation's does not (a warm-up
    // sync, schedule/plan.hpp).
    void commit(bool aggregation = true) noexcept {
        if (scheme_ == exchange_scheme::all_gather || scheme_ == exchange_scheme::two_phase) {
            state_.swap(next_state_);
        }
        if (scheme_ == exchange_scheme::two_phase) {
            server_state_.swap(next_server_);
        }
        if (aggregation) commit_aggregation();
    }
    // A round the aggregation refused: only the aggregation's own state moves (EDiT's detectors
    // see every round). The residual stays, since no worker applied what this round sent: the
    // next round sends it again. A round dropped for a non-finite aggregate commits nothing.
    void commit_aggregation() noexcept {
        if constexpr (aggregate::stateful<A>) std::swap(aggregate_state_, next_aggregate_state_);
    }

    // Whether the aggregation refused the last round (aggregate/aggregate.hpp); out is then 0.
    bool refused() const noexcept { return refused_; }
    // The aggregation's state after the last commit, for checkpoints.
    const aggregate::state_t<A>& aggregate_state() const noexcept { return aggregate_state_; }
    void restore_aggregate_state(aggregate::state_t<A> s) { aggregate_state_ = std::move(s); }

    // Replaces delta (this worker's pseudo-gradient, flat layout) by the average over all workers:
    // start + finish + commit; throws the first failure, committing nothing.
    void average(comm::communicator& comm, std::span<float> delta, const typename C::hyper& h,
                 const compress::encode_context& ctx) {
        start(comm, delta, h, ctx);
        finish(comm, delta, h);
        if (failure_) std::rethrow_exception(failure_.error);
        commit();
    }

    // The aggregation's hyper-parameters (set by the handle before each finish).
    typename A::hyper& aggregate_hyper() noexcept { return aggregate_hyper_; }

    // The compressor state the last exchange encoded with, which commit() makes current (empty
    // for the all-reduce, which keeps none). The handle checks it before committing: a payload
    // that cannot carry a non-finite value (DeMo's signs) leaves it only there.
    std::span<const float> pending_state() const noexcept {
        if (scheme_ == exchange_scheme::all_gather || scheme_ == exchange_scheme::two_phase) {
            return next_state_;
        }
        return {};
    }

    // Compressor state (error-feedback residuals), for inspection and checkpoints.
    std::span<const float> state() const noexcept { return state_; }
    std::span<const float> server_state() const noexcept { return server_state_; }
    std::span<float> state() noexcept { return state_; }
    std::span<float> server_state() noexcept { return server_state_; }

private:
    static std::size_t chunk_of(std::size_t n, std::size_t k, std::size_t m) {
        return n * (k + 1) / m - n * k / m;
    }
    std::size_t chunk_of(std::size_t n, std::size_t k) const { return chunk_of(n, k, world_); }
    std::size_t chunk_size(std::size_t k) const { return chunk_begin_[k + 1] - chunk_begin_[k]; }

    static tensor_view<std::byte> bytes_of(std::vector<std::byte>& v) {
        return {v.data(), v.size(), 0, 0, memory_space::host};
    }
    static tensor_view<const std::byte> const_bytes_of(const std::vector<std::byte>& v) {
        return {v.data(), v.size(), 0, 0, memory_space::host};
    }

    // two_phase: the payload bytes of each rank's chunk under h, and the block every chunk
    // travels in (the largest).
    struct two_phase_payloads {
        std::vector<std::size_t> chunk;
        std::size_t block = 0;
    };
    two_phase_payloads chunk_payloads(const typename C::hyper& h) const {
        two_phase_payloads p;
        for (const auto& segs : local_segs_) {
            p.chunk.push_back(C::payload_bytes(h, segs));
            p.block = std::max(p.block, p.chunk.back());
        }
        return p;
    }

    void wait(comm::request& r) {
        try {
            r.finish();
        } catch (...) {
            failure_.record(sync_stage::transfer, std::current_exception());
        }
    }

    // DeepSpeed's two phases, blocking. Every rank goes through both collectives even when its
    // own encode or its first transfer failed (it sends zeros), so that the ranks stay in step:
    // a transfer that failed on this rank alone (a dropped acknowledgement) completed on its
    // peers, which go on to the second phase; a link that is gone fails that at once too.
    void finish_two_phase(comm::communicator& comm, std::span<float> out,
                          const typename C::hyper& h) {
        // Sized from the settings of this exchange: compress_hyper() may have changed since the
        // last one (every rank changes it at the same call, or the fingerprint differs).
        const two_phase_payloads sizes = chunk_payloads(h);
        const std::vector<std::size_t>& chunk_bytes_ = sizes.chunk;
        const std::size_t q = sizes.block;
        next_state_ = state_;
        next_server_ = server_state_;

        // Phase 1: chunk k of this worker's pseudo-gradient goes to rank k.
        send_.assign(world_ * q, std::byte{0});
        try {
            for (std::size_t k = 0; k < world_; ++k) {
                C::encode(h, work_, chunk_segs_[k], next_state_, ctx_,
                          std::span<std::byte>(send_).subspan(k * q, chunk_bytes_[k]));
            }
        } catch (...) {
            failure_.record(sync_stage::encode, std::current_exception());
            std::fill(send_.begin(), send_.end(), std::byte{0});
        }
        recv_.assign(world_ * q, std::byte{0});
        bool received = true;
        try {
            comm.all_to_all(const_bytes_of(send_), bytes_of(recv_));
        } catch (const std::bad_alloc&) {
            // Out of memory before the collective was posted: this rank's alone, which its
            // peers cannot learn of from the agreement (their collective waits for it), so it
            // is not recorded as a failure to agree on but raised (diloco marks it).
            throw;
        } catch (...) {
            failure_.record(sync_stage::transfer, std::current_exception());
            received = false;
        }

        // The owner averages its chunk and re-encodes it with its own state; its draws use a
        // stream of their own (rank M + r), distinct from every worker's.
        std::vector<float> mine(chunk_size(rank_), 0.0f);
        std::vector<std::byte> reencoded(q, std::byte{0});
        if (received) {
            try {
                mean_of_payloads(std::span<const std::byte>(recv_), q, chunk_bytes_[rank_],
                                 local_segs_[rank_], h, mine);
                compress::encode_context server_ctx = ctx_;
                server_ctx.rank = static_cast<int>(world_ + rank_);
                C::encode(h, mine, local_segs_[rank_], next_server_, server_ctx,
                          std::span<std::byte>(reencoded).first(chunk_bytes_[rank_]));
            } catch (...) {
                failure_.record(sync_stage::decode, std::current_exception());
                std::fill(reencoded.begin(), reencoded.end(), std::byte{0});
            }
        }

        // Phase 2: every chunk's average to every rank.
        send_.swap(reencoded);
        try {
            comm.all_gather(const_bytes_of(send_), bytes_of(recv_));
        } catch (const std::bad_alloc&) {
            throw;  // as the all_to_all above
        } catch (...) {
            failure_.record(sync_stage::transfer, std::current_exception());
            return;
        }
        if (failure_) return;
        try {
            for (std::size_t k = 0; k < world_; ++k) {
                C::decode(h, std::span<const std::byte>(recv_).subspan(k * q, chunk_bytes_[k]),
                          local_segs_[k], out.subspan(chunk_begin_[k], chunk_size(k)));
            }
        } catch (...) {
            failure_.record(sync_stage::decode, std::current_exception());
        }
    }

    // out = mean over ranks of the decoded payloads found every `stride` bytes (each `bytes` long),
    // or with an aggregation that decodes the payloads together, the compressor's scatter-mean of
    // them (aggregate/scatter_mean.hpp).
    void mean_of_payloads(std::span<const std::byte> payloads, std::size_t stride,
                          std::size_t bytes, std::span<const compress::segment> segs,
                          const typename C::hyper& h, std::span<float> out) {
        if constexpr (aggregate::decodes_payloads_together<A>()) {
            std::vector<std::span<const std::byte>> each(world_);
            for (std::size_t k = 0; k < world_; ++k) each[k] = payloads.subspan(k * stride, bytes);
            std::fill(out.begin(), out.end(), 0.0f);  // the segments tile out; no gap stays stale
            C::decode_scatter_mean(h, each, segs, out);
        } else {
            std::vector<float> sum(out.size(), 0.0f);
            decoded_.assign(out.size(), 0.0f);
            for (std::size_t k = 0; k < world_; ++k) {
                C::decode(h, payloads.subspan(k * stride, bytes), segs, decoded_);
                for (std::size_t i = 0; i < sum.size(); ++i) {
                    sum[i] += decoded_[i];
                }
            }
            const float m = static_cast<float>(world_);
            for (std::size_t i = 0; i < sum.size(); ++i) {
                out[i] = sum[i] / m;
            }
        }
    }

    // The collectives of an exchange in flight write into the buffers below, so the requests
    // come first: a move assignment (a regroup's new exchanger) waits for or drops them before
    // it replaces the buffers, and the destructor ends them before the buffers go.
    comm::request request_, report_request_;
    std::size_t world_;
    std::size_t rank_;
    std::size_t n_;
    exchange_scheme scheme_ = exchange_scheme::all_reduce;
    std::vector<compress::segment> segs_;
    std::vector<float> state_;         // S arrays of n_ floats
    std::vector<float> server_state_;  // S arrays of this rank's chunk (two_phase)
    std::vector<float> next_state_, next_server_;  // what commit() makes current
    std::vector<std::size_t> chunk_begin_;
    std::vector<std::vector<compress::segment>> chunk_segs_;  // flat offsets
    std::vector<std::vector<compress::segment>> local_segs_;  // offsets within the chunk

    std::vector<std::byte> send_, recv_;
    std::vector<float> work_;     // all_reduce buffer / two_phase input
    std::vector<float> decoded_;
    std::vector<float> rows_;     // every worker's decoded delta (needs_deltas)
    std::vector<std::uint8_t> sent_;  // which elements each payload carried (needs_support)
    aggregate::worker_report report_send_{};
    std::vector<aggregate::worker_report> reports_;
    typename A::hyper aggregate_hyper_{};
    aggregate::state_t<A> aggregate_state_{}, next_aggregate_state_{};  // what commit() makes current
    bool refused_ = false;
    compress::encode_context ctx_{};
    stage_failure failure_;
    bool in_flight_ = false;
};

}  // namespace detail
}  // namespace loco
