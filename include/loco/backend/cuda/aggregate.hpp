#pragma once
// The aggregation policies other than the mean on the device (include/loco/aggregate/): the
// per-element work runs as kernels over every worker's pseudo-gradient in device memory, the
// scalar decisions in the policies' own host code.
//
//   exchange      every worker's fp32 pseudo-gradient (the fragment's padded layout) all-gathered
//                 in device memory into rows [M x padded]; or, with a compressor of the fused path
//                 (backend/cuda/compress.hpp), its payloads all-gathered by the engine, checked,
//                 and each decoded into its row; with needs_reports, the workers' reports (8 bytes
//                 each) all-gathered as host memory on the control communicator
//   norms         per worker and tensor, the squared L2 norm of its row (or of row - center): a
//                 block per (worker, stretch of at most 8192 elements of one tensor), a fixed tree
//                 in shared memory, the stretches summed on the host in order (deterministic;
//                 double throughout). A non-finite norm is a non-finite row: the worker is unusable
//   decisions     on the host, by the policy's code: edit::weights (EWMA detectors, softmax(-G/T),
//                 step weights, refusal when every worker is an outlier), trimmed_mean::window and
//                 median::window (which sorted positions to average, refusal), centered clipping's
//                 per-worker scale, median_norm_clip::factors_of (each tensor's median norm and
//                 clip factors); each from the norms the device returned
//   elements      edit: the weighted sum or GTA's sign consensus (sum, count), then the clip to
//                 phi (the aggregate's norm, one scale); trimmed_mean and median: each thread sorts
//                 its coordinate's usable values (M <= 64, a register array) and averages its
//                 window; centered_clip: L iterations of v += (1/M) sum_i (Delta_i - v) s_i in
//                 double, v starting at the last aggregate (kept on the device); median_norm_clip:
//                 the rank-order fp32 sum of the clipped values over the M workers (no compressor,
//                 so every worker sent every element) divided by M
//
// Every per-element rule is the one in aggregate/rules.hpp that the host loops call, so the two
// backends run the same arithmetic (the sums' order differs for norms: a tree here, element order
// on the host; the tests compare within fp32 tolerance). The aggregation state (the detectors;
// centered clipping's center, kept on the device and converted for checkpoints) advances only at
// commit().

#include <loco/aggregate/aggregate.hpp>
#include <loco/aggregate/edit.hpp>
#include <loco/aggregate/median_norm_clip.hpp>
#include <loco/aggregate/robust.hpp>
#include <loco/aggregate/rules.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>
#include <loco/exchange.hpp>
#include <loco/math.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco::backend::cuda {

// Whether an aggregation policy has a device implementation here.
template <class A>
inline constexpr bool has_device_aggregation =
    std::is_same_v<A, aggregate::edit> || std::is_same_v<A, aggregate::trimmed_mean> ||
    std::is_same_v<A, aggregate::median> || std::is_same_v<A, aggregate::centered_clip> ||
    std::is_same_v<A, aggregate::median_norm_clip>;

namespace detail {

// A stretch of a row whose squares one block sums: padded elements [offset, offset + len) of
// tensor `tensor` of the fragment's table.
struct norm_stretch {
    std::uint64_t offset;
    std::uint64_t len;
    std::uint64_t tensor;
};
inline constexpr std::uint64_t norm_stretch_elements = 8192;

// Grid-stride loops over n elements: at most this many blocks.
inline std::uint32_t elementwise_blocks(std::uint64_t n) {
    const std::uint64_t b = (n + block_threads - 1) / block_threads;
    return static_cast<std::uint32_t>(std::clamp<std::uint64_t>(b, 1, 4096));
}

#if LOCO_HAS_CUDA()

// partials[r * count + s] = sum over stretch s of (row r - center)^2 in double (center null: 0).
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    row_squares_kernel(const float* rows, std::uint64_t stride, const norm_stretch* stretches,
                       std::uint32_t count, const double* center, double* partials) {
    __shared__ double sums[block_threads];
    const std::uint32_t row = blockIdx.x / count;
    const norm_stretch s = stretches[blockIdx.x % count];
    const float* d = rows + row * stride + s.offset;
    double acc = 0.0;
    for (std::uint64_t i = threadIdx.x; i < s.len; i += block_threads) {
        const double x = center ? d[i] - center[s.offset + i] : static_cast<double>(d[i]);
        acc += x * x;
    }
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned half = block_threads / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = sums[0];
}

// EDiT's reducer (aggregate::gta_reduce): per element, over the workers of weight > 0 in rank
// order, the weighted sum, or GTA's consensus (0: none, 1: sum, 2: count).
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    consensus_kernel(const float* rows, std::uint64_t stride, std::uint32_t workers,
                     const double* w, int consensus, std::uint64_t n, float* out) {
    const std::uint64_t step = static_cast<std::uint64_t>(gridDim.x) * block_threads;
    for (std::uint64_t j = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
         j < n; j += step) {
        double total = 0.0, signs = 0.0;
        for (std::uint32_t k = 0; k < workers; ++k) {
            const double wk = w[k];
            if (wk == 0.0) continue;
            const float d = rows[k * stride + j];
            total += wk * d;
            signs += aggregate::rule::sign_vote(d);
        }
        if (consensus == 0) {
            out[j] = static_cast<float>(total);
            continue;
        }
        const double vote = consensus == 1 ? total : signs;
        double kept = 0.0, weight = 0.0;
        for (std::uint32_t k = 0; k < workers; ++k) {
            const double wk = w[k];
            if (wk == 0.0) continue;
            const float d = rows[k * stride + j];
            const double a = aggregate::rule::agrees(vote, d);
            kept += a * (wk * d);
            weight += a * wk;
        }
        out[j] = aggregate::rule::consensus_value(kept, weight);
    }
}

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    scale_kernel(float* out, std::uint64_t n, double s) {
    const std::uint64_t step = static_cast<std::uint64_t>(gridDim.x) * block_threads;
    for (std::uint64_t j = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
         j < n; j += step) {
        out[j] = aggregate::rule::scaled(out[j], s);
    }
}

// trimmed_mean and median: per element, the usable workers' values (bit k of `usable`) sorted,
// and the mean of sorted positions [lo, hi).
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    window_kernel(const float* rows, std::uint64_t stride, std::uint32_t workers,
                  std::uint64_t usable, std::uint32_t lo, std::uint32_t hi, std::uint64_t n,
                  float* out) {
    const std::uint64_t step = static_cast<std::uint64_t>(gridDim.x) * block_threads;
    for (std::uint64_t j = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
         j < n; j += step) {
        double v[aggregate::rule::max_sorted_workers];
        std::size_t m = 0;
        for (std::uint32_t k = 0; k < workers; ++k) {
            if ((usable >> k) & 1u) v[m++] = rows[k * stride + j];
        }
        aggregate::rule::sort_ascending(v, m);
        out[j] = aggregate::rule::window_mean(v, lo, hi);
    }
}

// centered_clip: wide = the center in double.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    widen_kernel(const float* in, std::uint64_t n, double* wide) {
    const std::uint64_t step = static_cast<std::uint64_t>(gridDim.x) * block_threads;
    for (std::uint64_t j = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
         j < n; j += step) {
        wide[j] = in[j];
    }
}

// One iteration of centered clipping: v += (sum over usable k of (Delta_k - v) s_k) / M.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    centered_step_kernel(const float* rows, std::uint64_t stride, std::uint32_t workers,
                         std::uint64_t usable, const double* scales, std::uint64_t n, double* v) {
    const std::uint64_t step = static_cast<std::uint64_t>(gridDim.x) * block_threads;
    const double m = static_cast<double>(workers);
    for (std::uint64_t j = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
         j < n; j += step) {
        const double c = v[j];
        double s = 0.0;
        for (std::uint32_t k = 0; k < workers; ++k) {
            if ((usable >> k) & 1u) {
                s += aggregate::rule::centered_term(rows[k * stride + j], c, scales[k]);
            }
        }
        v[j] = c + s / m;
    }
}

// out = keep = v rounded to fp32 (the aggregate and the next round's center).
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    narrow_kernel(const double* v, std::uint64_t n, float* out, float* keep) {
    const std::uint64_t step = static_cast<std::uint64_t>(gridDim.x) * block_threads;
    for (std::uint64_t j = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
         j < n; j += step) {
        const float x = static_cast<float>(v[j]);
        out[j] = x;
        keep[j] = x;
    }
}

// median_norm_clip (no compressor: every worker sent every element): per element of each stretch,
// the rank-order fp32 sum of d_k * f_k (f: workers x tensors), divided by the number of workers.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    clipped_mean_kernel(const float* rows, std::uint64_t stride, std::uint32_t workers,
                        const norm_stretch* stretches, const float* factors,
                        std::uint64_t tensors, float* out) {
    const norm_stretch s = stretches[blockIdx.x];
    const float m = static_cast<float>(workers);
    for (std::uint64_t i = threadIdx.x; i < s.len; i += block_threads) {
        float acc = 0.0f;
        for (std::uint32_t k = 0; k < workers; ++k) {
            acc = aggregate::rule::add_product(acc, rows[k * stride + s.offset + i],
                                               factors[k * tensors + s.tensor]);
        }
        out[s.offset + i] = acc / m;
    }
}

#endif  // LOCO_HAS_CUDA()

}  // namespace detail

// One fragment's device aggregation: the exchange of every worker's pseudo-gradient, the norms,
// the policy's decisions and the per-element kernels (the top of the file). Split-phase like the
// host exchanger: start() launches the collectives, finish() writes the aggregate (or refuses),
// commit() advances the policy's state.
template <class A>
class device_aggregation {
public:
    // The most workers the device path takes (a bit mask of usable workers, a register sort).
    static constexpr std::size_t max_workers = aggregate::rule::max_sorted_workers;

    // For the fragment `table` (which must outlive this), work enqueued on `stream`.
    device_aggregation(const tensor_table& table, int ranks, cudaStream_t stream)
        : table_(&table), n_(table.padded_elements()), result_(n_), stream_(stream) {
        result_.zero(nullptr);  // its padding is never written, and must stay zero
        // Each tensor's elements (its padding is zero in every row and center), in stretches.
        std::vector<detail::norm_stretch> s;
        for (std::size_t t = 0; t < table.size(); ++t) {
            const std::uint64_t begin = table.padded_offset(t);
            const std::uint64_t size = table.spec(t).size;
            for (std::uint64_t at = 0; at < size; at += detail::norm_stretch_elements) {
                s.push_back({begin + at,
                             std::min<std::uint64_t>(detail::norm_stretch_elements, size - at), t});
            }
        }
        tensors_ = table.size();
        stretch_tensor_.reserve(s.size());
        for (const auto& x : s) stretch_tensor_.push_back(static_cast<std::size_t>(x.tensor));
        stretches_ = device_buffer<detail::norm_stretch>(s.size());
        stretches_.upload(s);
        count_ = static_cast<std::uint32_t>(s.size());
        if constexpr (std::is_same_v<A, aggregate::centered_clip>) {
            center_ = device_buffer<float>(n_);
            next_center_ = device_buffer<float>(n_);
            wide_ = device_buffer<double>(n_);
            center_.zero(nullptr);
            next_center_.zero(nullptr);
        }
        resize(ranks);
    }

    // Bytes this worker sends per exchange: its row to M - 1 peers (a padded fp32 row, or a
    // compressor's payload of `payload` bytes), and the reports.
    std::uint64_t bytes_per_average(std::uint64_t m, std::uint64_t payload = 0) const {
        const std::uint64_t reports = A::needs_reports ? (m - 1) * sizeof(aggregate::worker_report)
                                                       : 0;
        return (m - 1) * (payload != 0 ? payload : 4 * n_) + reports;
    }

    // Every worker's decoded pseudo-gradient, ranks x padded elements: where a caller that
    // gathers compressed payloads decodes them (after start_reports(), before finish()).
    float* rows() const noexcept { return rows_.get(); }
    // The aggregate, padded layout (after finish()).
    float* result() const noexcept { return result_.get(); }

    // ||delta|| (this worker's report), delta in the padded layout.
    float norm(const float* delta) {
        const std::vector<double> sq = squares(delta, 1, nullptr);
        return static_cast<float>(math::sqrt(sq[0]));
    }

    // Starts the all-gather of `delta` (padded layout, stream work done) on `data`, a device
    // communicator, and of the report on `control`.
    void start(comm::communicator& data, comm::communicator& control, const float* delta,
               const aggregate::worker_report& report) {
        begin(data.size());
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the delta is written
        request_ = data.start_all_gather(
            tensor_view<const std::byte>{reinterpret_cast<const std::byte*>(delta), 4 * n_, 0, 0,
                                         memory_space::cuda},
            tensor_view<std::byte>{reinterpret_cast<std::byte*>(rows_.get()), rows_.size_bytes(),
                                   0, 0, memory_space::cuda});
        gather_reports(control, report);
    }

    // For a caller that gathers (compressed) payloads itself: only the reports' all-gather.
    void start_reports(comm::communicator& control, const aggregate::worker_report& report) {
        begin(control.size());
        gather_reports(control, report);
    }

    // Completes the exchange and writes the aggregate into result() (padded layout), or refuses
    // the round (refused(); result() unspecified). `prior`: the caller's failure of this sync (a
    // compressed payload's transfer or decode), after which the rule does not run. Failures are
    // returned (transfer: a collective; apply: the policy's error, e.g. trimmed_mean with
    // 2b >= M), nothing committed.
    loco::detail::stage_failure finish(const typename A::hyper& h,
                                       loco::detail::stage_failure prior = {}) {
        failure_ = std::move(prior);
        if constexpr (A::needs_reports) wait(report_request_);
        if (request_.pending()) wait(request_);
        if (failure_) return failure_;
        try {
            loco::aggregate::validate_settings<A>(h);
            if constexpr (!std::is_same_v<A, aggregate::centered_clip>) next_ = state_;
            refused_ = !combine(h, result_.get());
        } catch (...) {
            failure_.record(loco::detail::sync_stage::apply, std::current_exception());
        }
        return failure_;
    }

    bool refused() const noexcept { return refused_; }

    void commit() {
        if constexpr (std::is_same_v<A, aggregate::centered_clip>) {
            if (produced_) std::swap(center_, next_center_);  // a refused round keeps v
            produced_ = false;
            cached_ = false;
        } else {
            state_ = std::move(next_);
            next_ = {};
        }
    }

    // A round applied without teaching the aggregation (a warm-up sync): its state stays.
    void discard() noexcept {
        if constexpr (std::is_same_v<A, aggregate::centered_clip>) {
            produced_ = false;
        } else {
            next_ = {};
        }
    }

    // The state after the last commit (centered clipping: its center copied from the device).
    const aggregate::state_t<A>& state() const {
        if constexpr (std::is_same_v<A, aggregate::centered_clip>) {
            if (!cached_) {
                LOCO_CUDA_CHECK(cudaStreamSynchronize(stream_));
                state_.center = to_flat(*table_, center_.get());
                cached_ = true;
            }
        }
        return state_;
    }

    void restore(aggregate::state_t<A> s) {
        if constexpr (std::is_same_v<A, aggregate::centered_clip>) {
            // load() checked the length (state::check_loaded) before anything changed; checked
            // again before the center is touched.
            if (!s.center.empty() && s.center.size() != table_->total_elements()) {
                throw checkpoint_error(
                    "loco: the checkpoint's centered clipping center holds " +
                    std::to_string(s.center.size()) + " elements but the fragment has " +
                    std::to_string(table_->total_elements()) +
                    "; load a checkpoint of this model with the same fragments");
            }
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream_));
            center_.zero(nullptr);
            if (!s.center.empty()) {
                from_flat<float>(*table_, s.center, center_.get());
            }
            LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
            cached_ = false;
        } else {
            state_ = std::move(s);
        }
    }

private:
    void begin(int ranks) {
        resize(ranks);
        failure_ = {};
        refused_ = false;
        produced_ = false;
    }

    void gather_reports(comm::communicator& control, const aggregate::worker_report& report) {
        if constexpr (A::needs_reports) {
            report_send_ = report;
            reports_.assign(ranks_, {});
            report_request_ = control.start_all_gather(
                {reinterpret_cast<const std::byte*>(&report_send_), sizeof report_send_, 0, 0,
                 memory_space::host},
                {reinterpret_cast<std::byte*>(reports_.data()),
                 reports_.size() * sizeof(aggregate::worker_report), 0, 0, memory_space::host});
        } else {
            static_cast<void>(control);
            static_cast<void>(report);
        }
    }

    void resize(int ranks) {
        const auto m = static_cast<std::size_t>(ranks);
        if (m > max_workers) {
            throw invalid_argument("loco::cuda::diloco: the device aggregation of " +
                                   std::string(A::name) + " takes at most " +
                                   std::to_string(max_workers) + " workers, not " +
                                   std::to_string(m) + "; use a host communicator for more");
        }
        if (m == ranks_) return;
        ranks_ = m;
        rows_ = device_buffer<float>(m * n_);
        partials_ = device_buffer<double>(m * count_);
        // EDiT's per-tensor scope uploads a weight per worker and tensor.
        scalars_ = device_buffer<double>(m * std::max<std::size_t>(1, tensors_));
    }

    void wait(comm::request& r) {
        try {
            r.finish();
        } catch (...) {
            failure_.record(loco::detail::sync_stage::transfer, std::current_exception());
        }
    }

    // The squared norm of each of `rows` rows (stride n_) minus center (null: 0), in rank order.
    std::vector<double> squares(const float* rows, std::size_t rows_count, const double* center) {
        const std::vector<double> by_tensor = tensor_squares(rows, rows_count, center);
        std::vector<double> sq(rows_count, 0.0);
        for (std::size_t r = 0; r < rows_count; ++r) {
            for (std::size_t t = 0; t < tensors_; ++t) sq[r] += by_tensor[r * tensors_ + t];
        }
        return sq;
    }

    // The same per tensor: rows_count x tensors, the stretches of a tensor summed in order.
    std::vector<double> tensor_squares(const float* rows, std::size_t rows_count,
                                       const double* center) {
        cudaStream_t stream = stream_;
        std::vector<double> sq(rows_count * tensors_, 0.0);
        if (count_ == 0) return sq;
        if (partials_.size() < rows_count * count_) {
            partials_ = device_buffer<double>(rows_count * count_);
        }
#if LOCO_HAS_CUDA()
        LOCO_CUDA_CHECK(detail::launch(detail::row_squares_kernel<>,
                                       static_cast<std::uint32_t>(rows_count * count_), stream,
                                       rows, static_cast<std::uint64_t>(n_), stretches_.get(),
                                       count_, center, partials_.get()));
#endif
        std::vector<double> p(rows_count * count_);
        LOCO_CUDA_CHECK(cudaMemcpyAsync(p.data(), partials_.get(), p.size() * sizeof(double),
                                        cudaMemcpyDeviceToHost, stream));
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        for (std::size_t r = 0; r < rows_count; ++r) {
            for (std::uint32_t s = 0; s < count_; ++s) {
                sq[r * tensors_ + stretch_tensor_[s]] += p[r * count_ + s];
            }
        }
        return sq;
    }

    // Bit k set: worker k's row is finite (its squared norm is).
    static std::uint64_t finite_mask(const std::vector<double>& sq) {
        std::uint64_t mask = 0;
        for (std::size_t k = 0; k < sq.size(); ++k) {
            if (std::isfinite(sq[k])) mask |= std::uint64_t{1} << k;
        }
        return mask;
    }

    void upload_scalars(const std::vector<double>& v) {
        LOCO_CUDA_CHECK(cudaMemcpyAsync(scalars_.get(), v.data(), v.size() * sizeof(double),
                                        cudaMemcpyHostToDevice, stream_));
        // The host vector may go before the copy is done.
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream_));
    }

    template <class Kernel, class... Args>
    void launch_elementwise(Kernel kernel, Args&&... args) {
        LOCO_CUDA_CHECK(detail::launch(kernel, detail::elementwise_blocks(n_), stream_,
                                       std::forward<Args>(args)...));
    }

#if LOCO_HAS_CUDA()
    // EDiT with scope == tensor (aggregate/edit.hpp's combine_per_tensor): each tensor weighted on
    // its own, G_i worker i's norm over the tensor, detector m * t + i; every worker an outlier on
    // one tensor refuses the round. Then the fragment's clip, as for the fragment scope.
    bool combine_per_tensor(const aggregate::edit::hyper& h, float* out) {
        const std::size_t m = ranks_;
        const std::vector<double> sq = tensor_squares(rows_.get(), m, nullptr);
        aggregate::contributions c;
        c.workers = m;
        c.elements = table_->total_elements();
        c.reports = reports_;
        std::vector<aggregate::ewma_detector> detectors = next_.detectors;
        if (detectors.size() != m * tensors_) detectors.assign(m * tensors_, {});
        std::vector<double> weights(m * tensors_), norms(m);
        std::vector<std::uint8_t> finite(m);
        for (std::size_t t = 0; t < tensors_; ++t) {
            for (std::size_t i = 0; i < m; ++i) {
                const double q = sq[i * tensors_ + t];
                norms[i] = std::sqrt(q);
                finite[i] = std::isfinite(q) ? 1 : 0;
            }
            const std::vector<double> w = aggregate::edit::weights_of(
                h, std::span<aggregate::ewma_detector>(detectors).subspan(t * m, m), norms,
                finite, c);
            if (w.empty()) return false;
            std::copy(w.begin(), w.end(), weights.begin() + static_cast<std::ptrdiff_t>(t * m));
        }
        next_.detectors = std::move(detectors);
        upload_scalars(weights);
        const auto n = static_cast<std::uint64_t>(n_);
        for (std::size_t t = 0; t < tensors_; ++t) {
            const std::uint64_t size = table_->spec(t).size;
            if (size == 0) continue;
            const std::uint64_t at = table_->padded_offset(t);
            LOCO_CUDA_CHECK(detail::launch(
                detail::consensus_kernel<>, detail::elementwise_blocks(size), stream_,
                static_cast<const float*>(rows_.get() + at), n, static_cast<std::uint32_t>(m),
                static_cast<const double*>(scalars_.get() + t * m), static_cast<int>(h.consensus),
                size, out + at));
        }
        if (std::isfinite(h.clip)) {
            const double s = aggregate::rule::norm_clip_scale(squares(out, 1, nullptr)[0], h.clip);
            if (s < 1.0) launch_elementwise(detail::scale_kernel<>, out, n, s);
        }
        return true;
    }

    // The policy's rule: true with the aggregate in out, false when it refused the round.
    bool combine(const typename A::hyper& h, float* out) {
        const auto m = static_cast<std::uint32_t>(ranks_);
        const auto n = static_cast<std::uint64_t>(n_);
        if constexpr (std::is_same_v<A, aggregate::edit>) {
            if (h.scope == aggregate::edit_scope::tensor) return combine_per_tensor(h, out);
            // A worker whose row is not finite reports a non-finite norm: the host rule's check.
            const std::vector<double> sq = squares(rows_.get(), ranks_, nullptr);
            std::vector<aggregate::worker_report> reports = reports_;
            for (std::size_t k = 0; k < ranks_; ++k) {
                if (!std::isfinite(sq[k])) {
                    reports[k].norm = std::numeric_limits<float>::quiet_NaN();
                }
            }
            aggregate::contributions c;
            c.workers = ranks_;
            c.elements = table_->total_elements();
            c.reports = reports;
            const std::vector<double> w = aggregate::edit::weights(h, next_, c);
            if (w.empty()) return false;
            upload_scalars(w);
            launch_elementwise(detail::consensus_kernel<>,
                               static_cast<const float*>(rows_.get()), n, m,
                               static_cast<const double*>(scalars_.get()),
                               static_cast<int>(h.consensus), n, out);
            if (std::isfinite(h.clip)) {
                const double s = aggregate::rule::norm_clip_scale(
                    squares(out, 1, nullptr)[0], h.clip);
                if (s < 1.0) launch_elementwise(detail::scale_kernel<>, out, n, s);
            }
            return true;
        } else if constexpr (std::is_same_v<A, aggregate::trimmed_mean> ||
                             std::is_same_v<A, aggregate::median>) {
            std::pair<std::size_t, std::size_t> window;
            if constexpr (std::is_same_v<A, aggregate::trimmed_mean>) {
                static_cast<void>(A::window(h, ranks_, ranks_));  // the configuration error first
            }
            const std::uint64_t usable = finite_mask(squares(rows_.get(), ranks_, nullptr));
            const auto count = static_cast<std::size_t>(std::popcount(usable));
            if constexpr (std::is_same_v<A, aggregate::trimmed_mean>) {
                window = A::window(h, ranks_, count);
            } else {
                window = A::window(count);
            }
            if (window.first == window.second) return false;
            launch_elementwise(detail::window_kernel<>,
                               static_cast<const float*>(rows_.get()), n, m, usable,
                               static_cast<std::uint32_t>(window.first),
                               static_cast<std::uint32_t>(window.second), n, out);
            return true;
        } else if constexpr (std::is_same_v<A, aggregate::centered_clip>) {
            launch_elementwise(detail::widen_kernel<>,
                               static_cast<const float*>(center_.get()), n, wide_.get());
            std::uint64_t usable = 0;
            for (std::uint64_t l = 0; l < h.iterations; ++l) {
                const std::vector<double> sq = squares(rows_.get(), ranks_, wide_.get());
                if (l == 0) {
                    usable = finite_mask(sq);  // (Delta - v) is finite where Delta is
                    if (usable == 0) return false;
                }
                std::vector<double> scales(ranks_, 0.0);
                for (std::size_t k = 0; k < ranks_; ++k) {
                    if ((usable >> k) & 1u) {
                        scales[k] = aggregate::rule::radius_scale(math::sqrt(sq[k]), h.tau);
                    }
                }
                upload_scalars(scales);
                launch_elementwise(detail::centered_step_kernel<>,
                                   static_cast<const float*>(rows_.get()), n, m, usable,
                                   static_cast<const double*>(scalars_.get()), n, wide_.get());
            }
            launch_elementwise(detail::narrow_kernel<>,
                               static_cast<const double*>(wide_.get()), n, out,
                               next_center_.get());
            produced_ = true;
            return true;
        } else if constexpr (std::is_same_v<A, aggregate::median_norm_clip>) {
            A::validate(h);
            // f: workers x tensors, each tensor's factors by the policy's own rule.
            std::vector<float> f(ranks_ * tensors_, 1.0f);
            if (h.clip) {
                const std::vector<double> sq = tensor_squares(rows_.get(), ranks_, nullptr);
                std::vector<float> norms(ranks_), one;
                for (std::size_t t = 0; t < tensors_; ++t) {
                    for (std::size_t k = 0; k < ranks_; ++k) {
                        norms[k] = static_cast<float>(math::sqrt(sq[k * tensors_ + t]));
                    }
                    A::factors_of(h, norms, one);
                    for (std::size_t k = 0; k < ranks_; ++k) f[k * tensors_ + t] = one[k];
                }
            }
            if (factors_.size() < f.size()) factors_ = device_buffer<float>(f.size());
            LOCO_CUDA_CHECK(cudaMemcpyAsync(factors_.get(), f.data(), f.size() * sizeof(float),
                                            cudaMemcpyHostToDevice, stream_));
            if (count_ != 0) {
                LOCO_CUDA_CHECK(detail::launch(detail::clipped_mean_kernel<>, count_, stream_,
                                               static_cast<const float*>(rows_.get()), n, m,
                                               static_cast<const detail::norm_stretch*>(
                                                   stretches_.get()),
                                               static_cast<const float*>(factors_.get()),
                                               static_cast<std::uint64_t>(tensors_), out));
            }
            LOCO_CUDA_CHECK(cudaStreamSynchronize(stream_));  // f may go
            return true;
        } else {
            static_cast<void>(h);
            static_cast<void>(out);
            static_cast<void>(m);
            static_cast<void>(n);
            throw invalid_argument(std::string("loco::cuda::diloco: the aggregation ") +
                                   std::string(A::name) + " has no device implementation");
        }
    }
#else
    bool combine(const typename A::hyper&, float*) {
        throw invalid_argument("loco::cuda::diloco: the device aggregation needs a CUDA compiler");
    }
#endif

    const tensor_table* table_;
    std::size_t n_;                 // padded elements of the fragment
    std::size_t ranks_ = 0;
    std::uint32_t count_ = 0;       // norm stretches per row
    std::size_t tensors_ = 0;       // of the fragment's table
    std::vector<std::size_t> stretch_tensor_;  // the tensor of each stretch
    device_buffer<detail::norm_stretch> stretches_;
    device_buffer<float> factors_;  // median_norm_clip: workers x tensors
    device_buffer<float> rows_;     // ranks_ x n_: every worker's pseudo-gradient
    device_buffer<float> result_;   // n_: the aggregate
    device_buffer<double> partials_, scalars_;
    device_buffer<float> center_, next_center_;  // centered_clip: v, committed and next
    device_buffer<double> wide_;                 // centered_clip: v in double while iterating
    aggregate::worker_report report_send_{};
    std::vector<aggregate::worker_report> reports_;
    comm::request request_, report_request_;
    loco::detail::stage_failure failure_;
    mutable aggregate::state_t<A> state_{};
    aggregate::state_t<A> next_{};
    cudaStream_t stream_;
    bool refused_ = false;
    bool produced_ = false;      // centered_clip: next_center_ holds this round's v
    mutable bool cached_ = false;
};

}  // namespace loco::backend::cuda
