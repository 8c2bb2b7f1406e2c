#pragma once
// How the workers' pseudo-gradients become one average, for any compressor. Three schemes, with
// the bytes each rank sends per sync (M workers, n elements, P = C::payload_bytes of all segments,
// Q = the largest C::payload_bytes of one chunk's segments, chunks being [n k/M, n (k+1)/M)):
//
//   all_reduce   one fp32 mean all-reduce (compress::none only: payloads of other compressors
//                cannot be summed). Ring volume: 2 (M-1)/M * 4n.
//   all_gather   every rank encodes its pseudo-gradient into one payload; an all-gather gives
//                every rank all M payloads; each rank decodes them and averages in fp32 in rank
//                order, so every rank holds bit-identical results. (M-1) * P.
//   two_phase    DeepSpeed 1-bit Adam's scheme: every rank encodes chunk k of its pseudo-gradient
//                for rank k (all-to-all); rank k decodes the M payloads of its chunk, averages them,
//                re-encodes the average with its own server-side state (error feedback when the
//                compressor has it) and an all-gather returns every chunk to every rank.
//                Blocks are padded to Q bytes: 2 (M-1) * Q, about 2 (M-1)/M * P.
//
// The average is transactional: compressor state only advances when every collective succeeded
// and every payload decoded.

#include <loco/comm/communicator.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/none.hpp>
#include <loco/error.hpp>
#include <loco/params.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
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

template <class C>
class exchanger {
    static constexpr std::size_t S = static_cast<std::size_t>(C::state_size);

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
        scheme_ = scheme == exchange_scheme::automatic
                      ? (std::is_same_v<C, compress::none> ? exchange_scheme::all_reduce
                                                           : exchange_scheme::all_gather)
                      : scheme;
        if (scheme_ == exchange_scheme::all_reduce && !std::is_same_v<C, compress::none>) {
            throw invalid_argument("loco: exchange_scheme::all_reduce needs compress::none; the "
                                   "payloads of " + std::string(C::name) +
                                   " cannot be summed (use all_gather or two_phase)");
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
                chunk_bytes_.push_back(C::payload_bytes(h, local_segs_.back()));
                block_bytes_ = std::max(block_bytes_, chunk_bytes_.back());
            }
            server_state_.assign(S * chunk_size(rank_), 0.0f);
        }
    }

    exchange_scheme scheme() const noexcept { return scheme_; }

    // Bytes this rank sends per average (the formulas at the top of the file).
    std::uint64_t bytes_per_average(const typename C::hyper& h) const {
        const std::uint64_t m = world_;
        switch (scheme_) {
            case exchange_scheme::all_reduce: {
                const std::uint64_t c = chunk_of(n_, rank_);
                return 4 * (n_ + (m - 2) * c);
            }
            case exchange_scheme::all_gather: return (m - 1) * C::payload_bytes(h, segs_);
            case exchange_scheme::two_phase: return 2 * (m - 1) * block_bytes_;
            case exchange_scheme::automatic: break;
        }
        return 0;
    }

    // Replaces delta (this worker's pseudo-gradient, flat layout) by the average over all workers.
    void average(comm::communicator& comm, std::span<float> delta, const typename C::hyper& h,
                 const compress::encode_context& ctx) {
        switch (scheme_) {
            case exchange_scheme::all_reduce:
                comm.all_reduce(host_tensor(delta.data(), delta.size()), comm::reduce_op::mean);
                return;
            case exchange_scheme::all_gather: average_all_gather(comm, delta, h, ctx); return;
            case exchange_scheme::two_phase: average_two_phase(comm, delta, h, ctx); return;
            case exchange_scheme::automatic: break;
        }
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

    void average_all_gather(comm::communicator& comm, std::span<float> delta,
                            const typename C::hyper& h, const compress::encode_context& ctx) {
        const std::size_t p = C::payload_bytes(h, segs_);
        std::vector<float> next_state = state_;
        send_.assign(p, std::byte{0});
        C::encode(h, delta, segs_, next_state, ctx, send_);
        recv_.assign(world_ * p, std::byte{0});
        comm.all_gather(const_bytes_of(send_), bytes_of(recv_));
        mean_of_payloads(std::span<const std::byte>(recv_), p, p, segs_, h, delta);
        state_.swap(next_state);
    }

    void average_two_phase(comm::communicator& comm, std::span<float> delta,
                           const typename C::hyper& h, const compress::encode_context& ctx) {
        const std::size_t q = block_bytes_;
        std::vector<float> next_state = state_;
        std::vector<float> next_server = server_state_;

        // Phase 1: chunk k of this worker's pseudo-gradient goes to rank k.
        send_.assign(world_ * q, std::byte{0});
        for (std::size_t k = 0; k < world_; ++k) {
            C::encode(h, delta, chunk_segs_[k], next_state, ctx,
                      std::span<std::byte>(send_).subspan(k * q, chunk_bytes_[k]));
        }
        recv_.assign(world_ * q, std::byte{0});
        comm.all_to_all(const_bytes_of(send_), bytes_of(recv_));

        // The owner averages its chunk and re-encodes it with its own state; its draws use a
        // stream of their own (rank M + r), distinct from every worker's.
        std::vector<float> mine(chunk_size(rank_), 0.0f);
        mean_of_payloads(std::span<const std::byte>(recv_), q, chunk_bytes_[rank_],
                         local_segs_[rank_], h, mine);
        compress::encode_context server_ctx = ctx;
        server_ctx.rank = static_cast<int>(world_ + rank_);
        std::vector<std::byte> reencoded(q, std::byte{0});
        C::encode(h, mine, local_segs_[rank_], next_server, server_ctx,
                  std::span<std::byte>(reencoded).first(chunk_bytes_[rank_]));

        // Phase 2: every chunk's average to every rank.
        send_.swap(reencoded);
        comm.all_gather(const_bytes_of(send_), bytes_of(recv_));
        for (std::size_t k = 0; k < world_; ++k) {
            C::decode(h, std::span<const std::byte>(recv_).subspan(k * q, chunk_bytes_[k]),
                      local_segs_[k], delta.subspan(chunk_begin_[k], chunk_size(k)));
        }
        state_.swap(next_state);
        server_state_.swap(next_server);
    }

    // out = mean over ranks of the decoded payloads found every `stride` bytes (each `bytes` long).
    void mean_of_payloads(std::span<const std::byte> payloads, std::size_t stride,
                          std::size_t bytes, std::span<const compress::segment> segs,
                          const typename C::hyper& h, std::span<float> out) {
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

    std::size_t world_;
    std::size_t rank_;
    std::size_t n_;
    exchange_scheme scheme_ = exchange_scheme::all_reduce;
    std::vector<compress::segment> segs_;
    std::vector<float> state_;         // S arrays of n_ floats
    std::vector<float> server_state_;  // S arrays of this rank's chunk (two_phase)
    std::vector<std::size_t> chunk_begin_;
    std::vector<std::vector<compress::segment>> chunk_segs_;  // flat offsets
    std::vector<std::vector<compress::segment>> local_segs_;  // offsets within the chunk
    std::vector<std::size_t> chunk_bytes_;
    std::size_t block_bytes_ = 0;
    std::vector<std::byte> send_, recv_;
    std::vector<float> decoded_;
};

}  // namespace detail
}  // namespace loco
