#pragma once
// Streaming DiLoCo's schedule (Douillard et al., arXiv 2501.18512): the model is split into P
// fragments (fragments.hpp) that sync one after the other, each once every H calls to step().
// Fragment p is applied at the calls c with c = (p + 1) * H / P (mod H), its exchange starts tau
// calls earlier and travels during those tau inner steps, and at the apply the local values merge
// with the new global ones: local <- alpha * local + (1 - alpha) * global (alpha = 0 replaces).
// Each fragment has its own outer optimizer state and step counter.
//
// With H = 6, P = 2 this is torchft's DiLoCo(fragment_sync_delay = tau, fragment_update_alpha =
// alpha) schedule: fragment 0 at calls 3, 9, 15, ..., fragment 1 at 6, 12, ... (algorithms.md 2.1).

#include <loco/detail/checkpoint.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/fragments.hpp>
#include <loco/schedule/plan.hpp>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace loco::schedule {

class streaming {
public:
    static constexpr std::string_view name = "streaming";

    struct hyper {
        std::uint64_t every = 100;     // H: calls between two syncs of one fragment (paper: 100)
        std::uint64_t fragments = 4;   // P: H must be a multiple of P
        std::uint64_t overlap = 1;     // tau: inner steps an exchange travels, 0 <= tau < H / P
        float alpha = 0.5f;            // merge weight of the local values, in [0, 1]
        fragment_pattern pattern = fragment_pattern::strided;
    };

    static void validate(const hyper& h) {
        const std::string who = "loco::schedule::streaming: ";
        if (h.fragments == 0) throw invalid_argument(who + "fragments (P) must be >= 1");
        if (h.every == 0 || h.every % h.fragments != 0) {
            throw invalid_argument(who + "every (H = " + std::to_string(h.every) +
                                   ") must be a positive multiple of fragments (P = " +
                                   std::to_string(h.fragments) + "); choose H = k * P");
        }
        if (h.overlap >= h.every / h.fragments) {
            throw invalid_argument(who + "overlap (tau = " + std::to_string(h.overlap) +
                                   ") must be below H / P = " +
                                   std::to_string(h.every / h.fragments) +
                                   " so that a fragment arrives before the next one leaves");
        }
        validate_merge(who, h.alpha, h.pattern);
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os << "streaming H=" << h.every << " P=" << h.fragments << " tau=" << h.overlap
           << " alpha=" << h.alpha << " pattern=" << to_string(h.pattern);
        return os.str();
    }
    static std::size_t fragments(const hyper& h) noexcept { return h.fragments; }
    static float merge_alpha(const hyper& h) noexcept { return h.alpha; }
    static fragment_pattern pattern(const hyper& h) noexcept { return h.pattern; }

    // A fragment is finished only at an apply whose exchange this schedule started: after H or
    // tau changed (with nothing in flight), a fragment whose new start call has already passed
    // misses that apply and syncs in its next window.
    sync_plan next(const hyper& h) {
        check(h);
        if (started_.size() != h.fragments) started_.assign(h.fragments, false);
        ++calls_;
        plan_.clear();
        const std::uint64_t period = h.every / h.fragments;
        for (std::size_t p = 0; p < h.fragments; ++p) {
            const std::uint64_t apply_at = ((p + 1) * period) % h.every;
            if ((calls_ + h.overlap) % h.every == apply_at) {
                plan_.start(p);
                started_[p] = true;
            }
            if (calls_ % h.every == apply_at && started_[p]) {
                plan_.finish(p);
                started_[p] = false;
            }
        }
        planned_every_ = h.every;
        planned_overlap_ = h.overlap;
        return plan_.view();
    }

    // H or tau may change between calls, but not while an exchange they planned is in flight:
    // its apply would move, or (tau lowered to 0) come in the call that starts the next one,
    // which would then travel a whole period. loco::diloco calls this before the inner update of
    // a step, so that a refused change changes nothing.
    void check(const hyper& h) const {
        if (planned_every_ == 0 || (h.every == planned_every_ && h.overlap == planned_overlap_)) {
            return;
        }
        for (std::size_t p = 0; p < started_.size(); ++p) {
            if (!started_[p]) continue;
            const std::uint64_t period = planned_every_ / started_.size();
            const std::uint64_t apply_at = ((p + 1) * period) % planned_every_;
            const std::uint64_t ahead =
                (apply_at + planned_every_ - calls_ % planned_every_) % planned_every_;
            throw invalid_argument(
                "loco::schedule::streaming: H and tau changed from " +
                std::to_string(planned_every_) + " and " + std::to_string(planned_overlap_) +
                " to " + std::to_string(h.every) + " and " + std::to_string(h.overlap) +
                " while fragment " + std::to_string(p) + "'s exchange is in flight (due at "
                "call " + std::to_string(calls_ + ahead) + "); change them when no "
                "exchange is in flight, such as right after an apply");
        }
    }

    // loco::diloco's sync() finished fragment p's exchange early (or it has none left, after a
    // failed call): its planned apply has nothing to finish, and no longer holds H and tau.
    void forget(std::size_t p) noexcept {
        if (p < started_.size()) started_[p] = false;
    }

    std::uint64_t calls() const noexcept { return calls_; }
    void save(detail::checkpoint_writer& w) const {
        w.u64(calls_);
        w.u64(planned_every_);    // format 2
        w.u64(planned_overlap_);  // format 2
        w.u64(started_.size());   // format 3
        for (const bool b : started_) w.u64(b ? 1 : 0);
    }
    static streaming read(detail::checkpoint_reader& r) {
        streaming s;
        s.calls_ = r.counter("the step call count");
        if (r.format() >= 2) {
            s.planned_every_ = r.u64("the period of the last plan");
            s.planned_overlap_ = r.u64("the overlap of the last plan");
        }
        s.started_recorded_ = r.format() >= 3;
        if (r.format() >= 3) {
            const std::uint64_t n = r.u64("the number of streaming fragments");
            if (n > (std::uint64_t{1} << 20)) {
                throw checkpoint_error("loco: checkpoint corrupted: the number of streaming "
                                       "fragments has an implausible value");
            }
            for (std::uint64_t p = 0; p < n; ++p) {
                const std::uint64_t b = r.u64("whether a fragment's exchange was started");
                if (b > 1) throw checkpoint_error("loco: checkpoint corrupted (started flag)");
                s.started_.push_back(b == 1);
            }
        }
        return s;
    }
    // Format 1 and 2 streams did not record which exchanges this schedule started: loco::diloco's
    // load() tells it from what the checkpoint holds (an exchange in flight, or a planned finish
    // that has nothing, per fragment). Ignored when the stream recorded them.
    void resume_started(std::vector<bool> started) {
        if (!started_recorded_) started_ = std::move(started);
        started_recorded_ = true;
    }

private:
    std::uint64_t calls_ = 0;
    std::uint64_t planned_every_ = 0;  // H and tau of the last plan; 0: none yet (or format 1)
    std::uint64_t planned_overlap_ = 0;
    // Per fragment: its exchange was started by this schedule and not yet finished.
    std::vector<bool> started_;
    bool started_recorded_ = true;  // false after reading a format 1 or 2 stream
    plan_buffer plan_;
};

}  // namespace loco::schedule
