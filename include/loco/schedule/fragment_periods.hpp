#pragma once
// Each fragment (fragments.hpp: user-named groups of tensors) synced on its own period: fragment
// f syncs the whole of itself after every H_f calls to step(), e.g. the embeddings or an MoE
// router more often than the rest (MaxText syncs router weights more often; DES-LOC, Iacob et
// al., arXiv 2505.22549, gives each group its own period). At a call where several fragments are
// due they sync one after the other in fragment order, each with its own exchange, outer state
// and outer step counter. A fragment's local values become its new global values (alpha = 0), or
// merge with them: local <- alpha * local + (1 - alpha) * global.
//
// With one fragment this is schedule::every; with H_f = H for every f it syncs the whole model at
// the same calls, fragment by fragment.

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
#include <vector>

namespace loco::schedule {

class fragment_periods {
public:
    static constexpr std::string_view name = "fragment_periods";

    struct hyper {
        // H_f, calls between two syncs of fragment f; one entry per fragment, each >= 1.
        std::vector<std::uint64_t> every = {500};
        float alpha = 0.0f;  // merge weight of the local values, in [0, 1] (0: replace)
        fragment_pattern pattern = fragment_pattern::strided;  // for an automatic layout
    };

    static void validate(const hyper& h) {
        const std::string who = "loco::schedule::fragment_periods: ";
        if (h.every.empty()) {
            throw invalid_argument(who + "every lists no period; give one period per fragment");
        }
        for (std::size_t f = 0; f < h.every.size(); ++f) {
            if (h.every[f] == 0) {
                throw invalid_argument(who + "the period of fragment " + std::to_string(f) +
                                       " is 0; every period must be >= 1");
            }
        }
        validate_merge(who, h.alpha, h.pattern);
    }

    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os << "fragment_periods every=";
        for (std::size_t f = 0; f < h.every.size(); ++f) os << (f ? "," : "") << h.every[f];
        os << " alpha=" << h.alpha << " pattern=" << to_string(h.pattern);
        return os.str();
    }
    static std::size_t fragments(const hyper& h) noexcept { return h.every.size(); }
    static float merge_alpha(const hyper& h) noexcept { return h.alpha; }
    static fragment_pattern pattern(const hyper& h) noexcept { return h.pattern; }

    sync_plan next(const hyper& h) {
        ++calls_;
        plan_.clear();
        for (std::size_t f = 0; f < h.every.size(); ++f) {
            if (calls_ % h.every[f] == 0) {
                plan_.start(f);
                plan_.finish(f);
            }
        }
        return plan_.view();
    }

    std::uint64_t calls() const noexcept { return calls_; }
    void save(detail::checkpoint_writer& w) const { w.u64(calls_); }
    static fragment_periods read(detail::checkpoint_reader& r) {
        fragment_periods s;
        s.calls_ = r.counter("the step call count");
        return s;
    }

    // Syncs of fragment f in the first `calls` calls: floor(calls / H_f). Bytes sent over those
    // calls are the sum over f of that count times fragment f's bytes per sync.
    static std::uint64_t syncs(const hyper& h, std::size_t f, std::uint64_t calls) {
        return calls / h.every.at(f);
    }

private:
    std::uint64_t calls_ = 0;
    plan_buffer plan_;
};

}  // namespace loco::schedule
