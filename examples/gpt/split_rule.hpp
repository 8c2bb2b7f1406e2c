#pragma once
// --head-compress NAME: the output head (`head.w`) synced with its own compressor. loco::diloco
// has one compressor for every tensor it syncs, so the split is two handles over disjoint
// parameter lists on the one communicator: the rest of the model with the run's --compress and
// --aggregate, the head with NAME and that compressor's own aggregation (reference_aggregate
// below). Both run the same `every` schedule, so they sync on the same calls, in the same order on
// every worker (the rest's exchange first, then the head's). Each handle keeps its own inner and
// outer state; with element-wise optimizers (AdamW inside, SGD or Nesterov outside) and
// compressors that work tensor by tensor, that is the state one handle would keep, so naming the
// run's own compressor for the head changes nothing (tests/gpt_split_test.cpp checks it to the
// bit).
//
// The study uses it to ask which of DeMo's losses comes from sending the head's broad DCT part
// (docs/study.md).

#include "options.hpp"
#include "policies.hpp"
#include "update_rule.hpp"

#include <loco/loco.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

namespace gpt {

inline constexpr std::string_view split_tensor = "head.w";

// Each part is synced with its compressor's own aggregation: its reference's (DeMo's
// scatter-mean, SparseLoCo's median-norm clip, which --no-median-clip turns off) or, without
// compression, DiLoCo's mean.
template <class Compress>
using reference_aggregate = std::conditional_t<
    std::is_same_v<typename Compress::type, loco::compress::demo>, scatter_mean_choice,
    std::conditional_t<std::is_same_v<typename Compress::type, loco::compress::sparseloco>,
                       median_norm_clip_choice, mean_choice>>;

// The splits compiled: inner and outer optimizers, the rest's compressors and the head's (every
// product is one split_rule, two handles).
template <class Inners, class Outers, class Rests, class Heads>
struct split_combinations {
    using inners = Inners;
    using outers = Outers;
    using rests = Rests;
    using heads = Heads;
};

// What the study runs: AdamW inside, outer SGD or Nesterov, the frontier's compressors for the
// rest, and for the head none, SparseLoCo or DeMo (12 instantiations).
using compiled_splits = split_combinations<
    std::tuple<adamw_choice>, std::tuple<outer_sgd_choice, nesterov_choice>,
    frontier_compress_choices,
    std::tuple<std::tuple_element_t<0, compress_choices>,             // none
               std::tuple_element_t<0, frontier_compress_choices>,    // sparseloco
               std::tuple_element_t<1, frontier_compress_choices>>>;  // demo

// Every --head-compress name the trainer knows.
using head_compress_names = compiled_splits::heads;

// For a build (a test) that compiles no split.
using no_splits = split_combinations<std::tuple<>, std::tuple<>, std::tuple<>, std::tuple<>>;

template <class Inner, class Outer, class RestCompress, class HeadCompress>
class split_rule final : public update_rule {
    template <class Compress>
    using handle =
        loco::diloco<typename Inner::type, typename Outer::type, typename Compress::type,
                     loco::schedule::every, typename reference_aggregate<Compress>::type>;
    using rest_handle = handle<RestCompress>;
    using head_handle = handle<HeadCompress>;

public:
    split_rule(const options& o, loco::comm::communicator& comm, worker_state& w)
        : o_(o),
          rest_list_(part(w.list, false)),
          head_list_(part(w.list, true)),
          rest_(rest_list_, comm, make_config<rest_handle, RestCompress>(o)),
          head_(head_list_, comm, make_config<head_handle, HeadCompress>(o)),
          global_(w.list.total_elements()) {
        for (const loco::parameter& p : w.list) {
            (p.name == split_tensor ? head_offsets_ : rest_offsets_).push_back(p.offset);
        }
    }

    void start() override {
        rest_.start();
        head_.start();
        refresh();
    }
    void step(float lr_factor) override {
        rest_.inner_hyper() = Inner::hyper(o_, lr_factor);
        head_.inner_hyper() = Inner::hyper(o_, lr_factor);
        const bool rest_synced = rest_.step().synced;
        const bool head_synced = head_.step().synced;
        if (rest_synced != head_synced) {  // one schedule, one count of calls: a bug if it does
            throw std::logic_error("gpt: --head-compress: the two handles' syncs diverged");
        }
        last_synced_ = rest_synced;
        if (last_synced_) refresh();
    }
    void finish() override {
        if (last_synced_) return;  // --steps cut the last round short: close it
        rest_.sync();
        head_.sync();
        last_synced_ = true;
        refresh();
    }
    std::span<const float> global() const override { return global_; }
    std::uint64_t syncs() const override { return rest_.outer_steps(); }

private:
    // The head alone, or everything else, registered again with the same role and tag.
    static loco::parameter_list part(const loco::parameter_list& all, bool head) {
        loco::parameter_list out;
        for (const loco::parameter& p : all) {
            if ((p.name == split_tensor) == head) {
                out.add_views(p.name, p.value, p.grad, p.options());
            }
        }
        if (out.empty()) {
            throw loco::invalid_argument("gpt: --head-compress needs the untied output head '" +
                                         std::string(split_tensor) + "' and other tensors");
        }
        return out;
    }

    template <class Handle, class Compress>
    static typename Handle::config make_config(const options& o) {
        typename Handle::config c{.inner = Inner::hyper(o, 1.0f),
                                  .outer = Outer::hyper(o),
                                  .schedule = every_choice::hyper(o),
                                  .compress = Compress::hyper(o),
                                  .seed = o.seed};
        c.aggregate = reference_aggregate<Compress>::hyper(o);
        return c;
    }

    // The model's global parameters in the trainer's flat layout, gathered from the two handles'
    // (each flat over its own list, in the list's order).
    void refresh() {
        const auto scatter = [&](std::span<const float> from, const loco::parameter_list& list,
                                 const std::vector<std::size_t>& offsets) {
            for (std::size_t i = 0; i < list.size(); ++i) {
                const loco::parameter& p = list[i];
                const auto src = from.subspan(p.offset, p.value.size);
                std::copy(src.begin(), src.end(),
                          global_.begin() + static_cast<std::ptrdiff_t>(offsets[i]));
            }
        };
        scatter(rest_.global(), rest_list_, rest_offsets_);
        scatter(head_.global(), head_list_, head_offsets_);
    }

    const options& o_;
    loco::parameter_list rest_list_, head_list_;  // before the handles, which view them
    rest_handle rest_;
    head_handle head_;
    std::vector<float> global_;
    std::vector<std::size_t> rest_offsets_, head_offsets_;  // each tensor's place in global_
    bool last_synced_ = true;
};

// The split rule the options name, when they name --head-compress (else an empty factory).
// Throws invalid_argument, before any worker starts, for what the split cannot run and for a
// combination it does not compile (the tied head is refused when the rule is built, where the
// parameter list is known).
template <class Splits = compiled_splits>
rule_factory make_split_factory(const options& o) {
    if (o.head_compress.empty()) return {};
    check_choice<head_compress_names>(o.head_compress, "--head-compress");
    if (o.sync_every_step || o.attackers > 0 || !o.residual_csv.empty()) {
        throw loco::invalid_argument(
            "gpt: --head-compress splits DiLoCo's sync; drop --sync-every-step, --attackers and "
            "--residual-csv");
    }
    if (o.model.tied) {
        throw loco::invalid_argument("gpt: --head-compress needs the untied output head '" +
                                     std::string(split_tensor) + "'; drop --tied");
    }
    if constexpr (std::tuple_size_v<typename Splits::heads> == 0) {
        throw loco::invalid_argument("gpt: --head-compress is not compiled into this trainer");
    } else {
        const std::string rest_aggregate = o.compress == "demo"         ? "scatter_mean"
                                           : o.compress == "sparseloco" ? "median_norm_clip"
                                                                        : "";
        if (!has_choice<typename Splits::inners>(o.inner) ||
            !has_choice<typename Splits::outers>(o.outer) ||
            !has_choice<typename Splits::rests>(o.compress) ||
            !has_choice<typename Splits::heads>(o.head_compress) || o.aggregate != rest_aggregate ||
            o.schedule != "every") {
            throw loco::invalid_argument(
                "gpt: --head-compress " + o.head_compress + " is compiled with --inner " +
                choice_alternatives<typename Splits::inners>() + " --outer " +
                choice_alternatives<typename Splits::outers>() + " --schedule every --compress " +
                choice_alternatives<typename Splits::rests>() +
                " (demo with --aggregate scatter_mean, sparseloco with --aggregate "
                "median_norm_clip) and --head-compress " +
                choice_alternatives<typename Splits::heads>());
        }
        // Every setting the two handles take is checked as the unsplit run checks it, before
        // any data is loaded (the outer optimizer's and the schedule's were not: --H 0 and
        // --outer-momentum 1.5 failed in the workers, after loading).
        validate_choice<every_choice>(o);
        return dispatch<typename Splits::inners>(o.inner, "--inner", [&]<class I>() {
            validate_choice<I>(o);
            return dispatch<typename Splits::outers>(o.outer, "--outer", [&]<class O>() {
                validate_choice<O>(o);
                return dispatch<typename Splits::rests>(o.compress, "--compress", [&]<class R>() {
                    return dispatch<typename Splits::heads>(
                        o.head_compress, "--head-compress", [&]<class H>() -> rule_factory {
                            // Bad compressor settings (--topk, --chunk, --bins, --ef-decay) are
                            // refused for either part, and so are their aggregations'.
                            validate_choice<R>(o);
                            validate_choice<H>(o);
                            validate_choice<reference_aggregate<R>>(o);
                            validate_choice<reference_aggregate<H>>(o);
                            return [&o](loco::comm::communicator& c,
                                        worker_state& w) -> std::unique_ptr<update_rule> {
                                return std::make_unique<split_rule<I, O, R, H>>(o, c, w);
                            };
                        });
                });
            });
        });
    }
}

}  // namespace gpt
