#pragma once
// The device-resident part of an optimizer's bookkeeping: step counters, the non-finite flag, the
// stochastic-rounding seed, and the policy's hyper-parameters.
//
// Nothing in a step synchronises the host with the device: the update kernel reads the
// hyper-parameters and the step count from device memory, computes Rule::prepare(hyper, steps + 1)
// itself, and its last block advances the counters. A step can therefore be captured once in a
// CUDA graph and replayed. The host writes the hyper-parameters (cudaMemcpyAsync, stream-ordered)
// only when they change, and reads the counters only when it asks for them.

#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace loco::backend::cuda {

// "No non-finite value found": the flag's resting value.
inline constexpr std::uint64_t no_nonfinite = ~std::uint64_t{0};

struct step_control {
    // Updates applied; the next update uses step number steps + 1 (Rule::prepare counts from 1).
    std::uint64_t steps;
    // Updates refused because the check found a non-finite input (nonfinite_policy::skip).
    std::uint64_t skipped;
    // The smallest flat index of a non-finite input found by the checks since the last update
    // kernel, or no_nonfinite. The update kernel's last block resets it.
    std::uint64_t first_nonfinite;
    // Seed of stochastic rounding (bf16_update::stochastic).
    std::uint64_t seed;
    // Internal: blocks of the running update kernel that have finished (last-block detection).
    std::uint32_t blocks_done;
    std::uint32_t reserved;
};
static_assert(std::is_trivially_copyable_v<step_control>);

// Refuses new hyper-parameters while `s` is being captured into a CUDA graph: a replay would not
// read the host again. `who` starts the message ("loco::cuda").
inline void refuse_hyper_change_in_capture(cudaStream_t s, const char* who) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    LOCO_CUDA_CHECK(cudaStreamIsCapturing(s, &status));
    if (status != cudaStreamCaptureStatusNone) {
        throw invalid_argument(std::string(who) +
                               ": hyper-parameters changed while a CUDA graph was being "
                               "captured; change them between replays, outside the capture");
    }
}

// A step_control and a Hyper in device memory, owned.
template <class Hyper>
class device_control {
    static_assert(std::is_trivially_copyable_v<Hyper>,
                  "loco: hyper-parameters are copied to the device byte for byte");

public:
    explicit device_control(const Hyper& h = {}, std::uint64_t seed = 0)
        : control_(1), hyper_(1) {
        const step_control c{0, 0, no_nonfinite, seed, 0, 0};
        LOCO_CUDA_CHECK(cudaMemcpy(control_.get(), &c, sizeof c, cudaMemcpyHostToDevice));
        LOCO_CUDA_CHECK(cudaMemcpy(hyper_.get(), &h, sizeof h, cudaMemcpyHostToDevice));
        // Done before any stream uses them (pageable copies may return before their DMA ends).
        LOCO_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    }

    step_control* control() const noexcept { return control_.get(); }
    const Hyper* hyper() const noexcept { return hyper_.get(); }

    // Stream-ordered: launches enqueued on `s` after this call see the new values. The source is
    // pageable host memory, which CUDA copies out before returning, so `h` may change right after.
    // Not capturable in a graph (a replay would not re-read the host): call it outside.
    void set_hyper(const Hyper& h, cudaStream_t s) {
        LOCO_CUDA_CHECK(cudaMemcpyAsync(hyper_.get(), &h, sizeof h, cudaMemcpyHostToDevice, s));
    }

    // The counters after everything enqueued on `s`; blocks until then.
    step_control read(cudaStream_t s) const {
        step_control c{};
        LOCO_CUDA_CHECK(cudaMemcpyAsync(&c, control_.get(), sizeof c, cudaMemcpyDeviceToHost, s));
        LOCO_CUDA_CHECK(cudaStreamSynchronize(s));
        return c;
    }

    // Overwrites the counters (restoring a checkpoint); clears the flag. Stream-ordered.
    void set_counters(std::uint64_t steps, std::uint64_t skipped, std::uint64_t seed,
                      cudaStream_t s) {
        staged_ = step_control{steps, skipped, no_nonfinite, seed, 0, 0};
        // Pageable source: copied out before the call returns (see set_hyper).
        LOCO_CUDA_CHECK(
            cudaMemcpyAsync(control_.get(), &staged_, sizeof staged_, cudaMemcpyHostToDevice, s));
    }

    // Clears the non-finite flag without an update (after a check under nonfinite_policy::raise
    // found something and the update is not launched). Capturable.
    void reset_nonfinite(cudaStream_t s) { clear_nonfinite(control_.get(), s); }

    static void clear_nonfinite(step_control* c, cudaStream_t s) {
        LOCO_CUDA_CHECK(cudaMemsetAsync(&c->first_nonfinite, 0xff, sizeof(std::uint64_t), s));
    }

private:
    device_buffer<step_control> control_;
    device_buffer<Hyper> hyper_;
    step_control staged_{};
};

}  // namespace loco::backend::cuda
