#pragma once
// The policies a run may choose on the command line, each with the name it is chosen by and how
// its hyper-parameters come from the options. A run is dispatched to one compiled instantiation
// of loco::diloco<inner, outer, compressor, schedule, aggregate> (or of loco::optimizer<inner> for the
// synchronous baseline) by dispatch<List>(name, ...), which knows nothing about any policy:
// adding a choice is one struct here and its name in the list below it.

#include "model.hpp"
#include "options.hpp"

#include <loco/loco.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

namespace gpt {

namespace detail {
inline float or_default(float value, float fallback) { return value < 0.0f ? fallback : value; }
}  // namespace detail

// --weight-decay when it is given; else AdamW, Lion and Muon decay by 0.1 and SGD not at all (the
// defaults these runs always had).
inline constexpr float default_weight_decay = 0.1f;
inline constexpr float default_sgd_weight_decay = 0.0f;

// ---- inner optimizers: hyper(o, f) is the hyper-parameters at lr factor f of the schedule -----

struct adamw_choice {
    static constexpr std::string_view name = "adamw";
    using type = loco::inner::adamw;
    static constexpr float default_lr = 2e-3f;
    static type::hyper hyper(const options& o, float f) {
        return {.lr = detail::or_default(o.lr, default_lr) * f,
                .weight_decay = detail::or_default(o.weight_decay, default_weight_decay)};
    }
};

struct sgd_choice {
    static constexpr std::string_view name = "sgd";
    using type = loco::inner::sgd;
    static constexpr float default_lr = 0.3f;
    static type::hyper hyper(const options& o, float f) {
        return {.lr = detail::or_default(o.lr, default_lr) * f, .momentum = 0.9f,
                .weight_decay = detail::or_default(o.weight_decay, default_sgd_weight_decay),
                .nesterov = true};
    }
};

struct lion_choice {
    static constexpr std::string_view name = "lion";
    using type = loco::inner::lion;
    static constexpr float default_lr = 3e-4f;
    static type::hyper hyper(const options& o, float f) {
        // Lion's steps are sign-sized: its decoupled decay is scaled like its lr (x 10 less lr,
        // x 10 more decay, as its authors advise) so that --weight-decay means the same shrink.
        return {.lr = detail::or_default(o.lr, default_lr) * f,
                .weight_decay = detail::or_default(o.weight_decay, default_weight_decay) * 3.0f};
    }
};

// MuLoCo's inner optimizer: Muon on the hidden matrices (attention and MLP weights), AdamW on the
// embeddings, the head, the biases and the layer norms.
struct muon_choice {
    static constexpr std::string_view name = "muon";
    using type = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                              loco::group<loco::otherwise, loco::inner::adamw>>;
    static auto hyper(const options& o, float f) {
        return std::tuple{loco::inner::muon::hyper{.lr = o.muon_lr * f,
                                                   .weight_decay = detail::or_default(
                                                       o.weight_decay, default_weight_decay)},
                          adamw_choice::hyper(o, f)};
    }
};

using inner_choices = std::tuple<adamw_choice, sgd_choice, lion_choice, muon_choice>;

// ---- outer optimizers ---------------------------------------------------------------------------

struct nesterov_choice {
    static constexpr std::string_view name = "nesterov";
    using type = loco::outer::nesterov;
    static type::hyper hyper(const options& o) {
        return {.lr = detail::or_default(o.outer_lr, 0.7f),
                .momentum = detail::or_default(o.outer_momentum, 0.9f)};
    }
};

struct outer_sgd_choice {
    static constexpr std::string_view name = "sgd";
    using type = loco::outer::sgd;
    static type::hyper hyper(const options& o) { return {.lr = detail::or_default(o.outer_lr, 1.0f)}; }
};

struct outer_adam_choice {
    static constexpr std::string_view name = "adam";
    using type = loco::outer::adam;
    static type::hyper hyper(const options& o) {
        type::hyper h;
        h.lr = detail::or_default(o.outer_lr, h.lr);
        h.beta1 = detail::or_default(o.outer_momentum, h.beta1);
        return h;
    }
};

using outer_choices = std::tuple<nesterov_choice, outer_sgd_choice, outer_adam_choice>;

// ---- compressors of the pseudo-gradient ---------------------------------------------------------

template <class C, const char* Name>
struct compress_choice {
    static constexpr std::string_view name = Name;
    using type = C;
    static typename C::hyper hyper(const options& o) {
        typename C::hyper h{};
        if constexpr (requires { h.decay; h.fold_outer_lr; }) {  // error_feedback<...>
            h.decay = detail::or_default(o.ef_decay, h.decay);
            h.fold_outer_lr = o.ef_fold_outer_lr;
        }
        if constexpr (requires { h.beta; }) {  // sparseloco
            h.beta = detail::or_default(o.ef_decay, h.beta);  // its accumulator
        }
        if constexpr (requires { h.decay; h.sign; }) {  // demo
            h.decay = detail::or_default(o.ef_decay, h.decay);  // its residual
        }
        if constexpr (requires { h.indices; }) {  // sparseloco, demo
            if (o.fixed_indices) h.indices = loco::compress::index_coding::fixed;
        }
        if constexpr (requires { h.topk; h.chunk; }) {  // sparseloco, demo
            // Saturated, not wrapped, to 32 bits: the policy's validate() refuses what is too
            // large instead of running with a wrapped-around value.
            const auto narrow = [](std::uint64_t v) {
                return static_cast<std::uint32_t>(std::min<std::uint64_t>(v, UINT32_MAX));
            };
            if (o.topk) h.topk = narrow(*o.topk);
            if (o.chunk) h.chunk = narrow(*o.chunk);
            if constexpr (requires { h.bins; }) {  // sparseloco
                if (o.bins) h.bins = narrow(*o.bins);
            }
        }
        static_cast<void>(o);
        return h;
    }
};

inline constexpr char none_name[] = "none";
inline constexpr char bf16_name[] = "bf16";
inline constexpr char blockwise4_name[] = "blockwise4";
inline constexpr char statistical2_name[] = "statistical2";
inline constexpr char statistical2_ef_name[] = "statistical2-ef";

using compress_choices = std::tuple<
    compress_choice<loco::compress::none, none_name>,
    compress_choice<loco::compress::cast<loco::bf16>, bf16_name>,
    compress_choice<loco::compress::blockwise<4, 256>, blockwise4_name>,
    compress_choice<loco::compress::statistical<2>, statistical2_name>,
    compress_choice<loco::compress::error_feedback<loco::compress::statistical<2>>,
                    statistical2_ef_name>>;

// The compressors of the frontier, compiled only in the combinations below that use them (not
// with every inner and outer optimizer). Their hyper-parameters are the references' defaults:
// SparseLoCo's are templar's hparams.json (64 x 64 chunks, 64 values kept per chunk, 2-bit codes,
// accumulator decay 0.95), DeMo's are its repository's (64 x 64 chunks, 32 DCT coefficients kept
// per chunk, residual decay 0.999, fp32 values).
inline constexpr char sparseloco_name[] = "sparseloco";
inline constexpr char demo_name[] = "demo";

using frontier_compress_choices =
    std::tuple<compress_choice<loco::compress::sparseloco, sparseloco_name>,
               compress_choice<loco::compress::demo, demo_name>>;

// Every --compress name the trainer knows.
using known_compress_choices =
    decltype(std::tuple_cat(compress_choices{}, frontier_compress_choices{}));

// ---- aggregation of the pseudo-gradients ----------------------------------------------------
// An unset option keeps the policy's default (include/loco/aggregate/).

struct mean_choice {
    static constexpr std::string_view name = "mean";
    using type = loco::aggregate::mean;
    static type::hyper hyper(const options&) { return {}; }
};

struct edit_choice {
    static constexpr std::string_view name = "edit";
    using type = loco::aggregate::edit;
    static type::hyper hyper(const options& o) {
        type::hyper h;
        h.scope = o.edit_scope == "tensor" ? loco::aggregate::edit_scope::tensor
                                           : loco::aggregate::edit_scope::fragment;
        h.temperature = detail::or_default(o.edit_temperature, h.temperature);
        h.ewma_warmup = o.edit_warmup.value_or(h.ewma_warmup);
        h.clip = detail::or_default(o.edit_clip, h.clip);
        return h;
    }
};

struct trimmed_mean_choice {
    static constexpr std::string_view name = "trimmed_mean";
    using type = loco::aggregate::trimmed_mean;
    static type::hyper hyper(const options& o) {
        type::hyper h;
        h.trim = o.trim.value_or(h.trim);
        return h;
    }
};

struct median_choice {
    static constexpr std::string_view name = "median";
    using type = loco::aggregate::median;
    static type::hyper hyper(const options&) { return {}; }
};

struct centered_clip_choice {
    static constexpr std::string_view name = "centered_clip";
    using type = loco::aggregate::centered_clip;
    static type::hyper hyper(const options& o) {
        type::hyper h;
        h.tau = detail::or_default(o.clip_tau, h.tau);
        h.iterations = o.clip_iterations.value_or(h.iterations);
        return h;
    }
};

// SparseLoCo's aggregation (templar): each worker's tensor scaled down to the median norm.
struct median_norm_clip_choice {
    static constexpr std::string_view name = "median_norm_clip";
    using type = loco::aggregate::median_norm_clip;
    static type::hyper hyper(const options& o) {
        type::hyper h;
        h.clip = o.median_clip;
        return h;
    }
};

// DeMo's aggregation (demo.py, Psyche): each DCT coefficient averaged over the workers that sent it.
struct scatter_mean_choice {
    static constexpr std::string_view name = "scatter_mean";
    using type = loco::aggregate::scatter_mean;
    static type::hyper hyper(const options&) { return {}; }
};

using aggregate_choices = std::tuple<mean_choice, edit_choice, trimmed_mean_choice, median_choice,
                                     centered_clip_choice, median_norm_clip_choice,
                                     scatter_mean_choice>;

// ---- sync schedules -----------------------------------------------------------------------------
// Each also says how the model is cut into the fragments it syncs (fragments(o, layers)).

struct every_choice {
    static constexpr std::string_view name = "every";
    using type = loco::schedule::every;
    static type::hyper hyper(const options& o) { return {.every = o.every}; }
    static loco::fragment_layout fragments(const options&) { return {}; }
};

// Streaming DiLoCo: P fragments of whole layers (layer_of in model.hpp), dealt to fragments by
// --pattern, one fragment synced every H / P steps.
struct streaming_choice {
    static constexpr std::string_view name = "streaming";
    using type = loco::schedule::streaming;
    static type::hyper hyper(const options& o) {
        return {.every = o.every,
                .fragments = o.fragments,
                .overlap = o.overlap,
                .alpha = o.alpha,
                .pattern = o.pattern == "sequential" ? loco::fragment_pattern::sequential
                                                     : loco::fragment_pattern::strided};
    }
    static loco::fragment_layout fragments(const options& o) {
        const std::size_t layers = o.model.layers;
        return {.names = {},
                .layer_of = [layers](const loco::parameter& p) { return layer_of(p.name, layers); }};
    }
};

// DiLoCoX's one-round delay: each round's exchange travels during the next round.
struct delayed_choice {
    static constexpr std::string_view name = "delayed";
    using type = loco::schedule::delayed;
    static type::hyper hyper(const options& o) { return {.every = o.every}; }
    static loco::fragment_layout fragments(const options&) { return {}; }
};

// A new schedule: a struct like every_choice and its name in this list (and in a combination
// below, to be compiled).
using schedule_choices = std::tuple<every_choice, streaming_choice, delayed_choice>;

// ---- the compiled combinations ------------------------------------------------------------------
// Every combination is one instantiation of loco::diloco, and each costs compile time (of
// loco_gpt and of CI), so not every product is compiled: `every` with every choice of the other
// kinds, the other schedules only with what the study (scripts/study) runs. A combination
// that is not compiled is refused with the ones that are.

template <class Inners, class Outers, class Compressors, class Schedules,
          class Aggregates = std::tuple<mean_choice>>
struct combinations {
    using inners = Inners;
    using outers = Outers;
    using compressors = Compressors;
    using schedules = Schedules;
    using aggregates = Aggregates;
};

// The robust aggregations and the frontier's compressors are compiled with DiLoCo's AdamW inside
// and `every` only (seven instantiations): the attack runs (scripts/attack) and the study's edit,
// sparseloco and demo rows.
using compiled_combinations = std::tuple<
    combinations<inner_choices, outer_choices, compress_choices, std::tuple<every_choice>>,
    combinations<std::tuple<adamw_choice>, std::tuple<nesterov_choice>,
                 std::tuple<std::tuple_element_t<0, compress_choices>,   // none
                            std::tuple_element_t<2, compress_choices>>,  // blockwise4
                 std::tuple<streaming_choice, delayed_choice>>,
    combinations<std::tuple<adamw_choice>, std::tuple<nesterov_choice>,
                 std::tuple<std::tuple_element_t<0, compress_choices>>,  // none
                 std::tuple<every_choice>,
                 std::tuple<edit_choice, trimmed_mean_choice, median_choice, centered_clip_choice>>,
    // SparseLoCo as templar runs it: outer SGD at lr 1 (no momentum), median-norm clipping
    combinations<std::tuple<adamw_choice>, std::tuple<outer_sgd_choice>,
                 std::tuple<std::tuple_element_t<0, frontier_compress_choices>>,  // sparseloco
                 std::tuple<every_choice>, std::tuple<median_norm_clip_choice>>,
    // DeMo's DCT top-k (fp32 values) under DiLoCo's outer Nesterov, averaged as DiLoCo does or
    // as DeMo's references do (each coefficient over the workers that sent it)
    combinations<std::tuple<adamw_choice>, std::tuple<nesterov_choice>,
                 std::tuple<std::tuple_element_t<1, frontier_compress_choices>>,  // demo
                 std::tuple<every_choice>, std::tuple<mean_choice, scatter_mean_choice>>>;

// ---- dispatch -----------------------------------------------------------------------------------

// "a, b, c": the names a list offers, for error messages and --help.
template <class List>
std::string choice_names() {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
        std::string out;
        ((out += (I == 0 ? "" : ", ") + std::string(std::tuple_element_t<I, List>::name)), ...);
        return out;
    }(std::make_index_sequence<std::tuple_size_v<List>>{});
}

// Calls fn.template operator()<Choice>() for the choice of List named `name` and returns what it
// returns; an unknown name throws, listing the valid ones.
template <class List, class Fn>
auto dispatch(std::string_view name, std::string_view flag, Fn&& fn) {
    using result = decltype(fn.template operator()<std::tuple_element_t<0, List>>());
    bool found = false;
    result out{};
    [&]<std::size_t... I>(std::index_sequence<I...>) {
        (((!found && std::tuple_element_t<I, List>::name == name)
              ? (out = fn.template operator()<std::tuple_element_t<I, List>>(), found = true)
              : false),
         ...);
    }(std::make_index_sequence<std::tuple_size_v<List>>{});
    if (!found) {
        throw loco::invalid_argument("gpt: unknown " + std::string(flag) + " '" +
                                     std::string(name) + "'; valid: " + choice_names<List>());
    }
    return out;
}

namespace detail {

template <class T>
inline constexpr bool is_groups = false;
template <class... G>
inline constexpr bool is_groups<loco::groups<G...>> = true;

// Refuses hyper-parameters h as policy P's validate() does. Parameter groups (Muon's inner
// optimizer) have no validate() of their own: each group's part of h is checked by that group's
// policy. A policy without validate() has nothing to refuse; one whose validate() does not take
// h is a compile error here, not a check skipped without a word.
template <class P, class H>
void validate_policy(const H& h) {
    if constexpr (is_groups<P>) {
        [&]<class... G>(std::type_identity<loco::groups<G...>>) {
            [&]<std::size_t... I>(std::index_sequence<I...>) {
                (validate_policy<typename std::tuple_element_t<I, std::tuple<G...>>::policy>(
                     std::get<I>(h)),
                 ...);
            }(std::index_sequence_for<G...>{});
        }(std::type_identity<P>{});
    } else if constexpr (requires { P::validate(h); }) {
        P::validate(h);
    } else {
        static_assert(!requires { &P::validate; },
                      "gpt: this policy's validate() does not take the hyper-parameters its "
                      "choice makes");
    }
}

}  // namespace detail

// The lr factors an inner choice's hyper(o, f) is validated at: 1, the peak of the schedule
// (trainer.hpp's lr_factor: a warm-up up to it, then a cosine decay from it) and the factor the
// rules' constructors pass, and final_lr_fraction, where the decay ends. Every step's factor lies
// between these two or between 1 / (warm-up steps) and 1, and the lrs an inner optimizer accepts
// with the other settings fixed are an interval from 0 (it refuses a negative lr, one that is not
// finite, and one whose lr x weight_decay or lr / (1 - beta1) overflows a float): settings that
// pass at these factors pass at every step's.
inline std::array<float, 2> validated_lr_factors(const options& o) {
    return {1.0f, o.final_lr_fraction};
}

// Refuses a choice's bad settings (its policy's validate(), where it has one) with its
// invalid_argument, before any worker starts. An inner choice's settings depend on the step's
// lr factor (hyper(o, f)): they are checked at the factors of validated_lr_factors. (This check
// once compiled to nothing for every inner choice: it asked for a one-argument hyper(o) only.)
template <class Choice>
void validate_choice(const options& o) {
    using policy = typename Choice::type;
    if constexpr (requires { Choice::hyper(o); }) {
        detail::validate_policy<policy>(Choice::hyper(o));
    } else {
        static_assert(requires { Choice::hyper(o, 1.0f); },
                      "gpt: a choice's hyper() takes the options, or the options and an lr factor");
        for (const float f : validated_lr_factors(o)) {
            detail::validate_policy<policy>(Choice::hyper(o, f));
        }
    }
}

// Throws as dispatch does when `name` is not in List, without instantiating anything.
template <class List>
void check_choice(std::string_view name, std::string_view flag) {
    dispatch<List>(name, flag, []<class>() { return 0; });
}

template <class List>
bool has_choice(std::string_view name) {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
        return ((std::tuple_element_t<I, List>::name == name) || ...);
    }(std::make_index_sequence<std::tuple_size_v<List>>{});
}

// "a|b|c": a list's names in a compact form, for the message about combinations.
template <class List>
std::string choice_alternatives() {
    std::string s = choice_names<List>();
    for (std::size_t at = s.find(", "); at != std::string::npos; at = s.find(", ", at)) {
        s.replace(at, 2, "|");
    }
    return s;
}

}  // namespace gpt
