#pragma once
// How a worker turns the gradient of a step into new parameters: the one thing the runs differ
// in. The trainer (trainer.hpp) sees only update_rule; make_rule_factory (below) picks the
// compiled instantiation the options name.
//
//   synchronous_rule  data parallelism: the gradients are averaged over the workers every step
//                     (one fp32 all-reduce of the whole model) and every worker applies the same
//                     inner step. The baseline DiLoCo is measured against, same global batch.
//   diloco_rule       loco::diloco: inner steps on the worker's own gradients, and a sync of the
//                     pseudo-gradients when the schedule says so, aggregated by the chosen
//                     policy. With --attackers N the last N workers corrupt what they send
//                     (diloco_rule::attack); with --residual-csv worker 0 reports what each
//                     sync of SparseLoCo or DeMo sends of its residual (residual_report.hpp).
//   split_rule        --head-compress: two loco::diloco handles, the output head synced with
//                     its own compressor (split_rule.hpp).

#include "model.hpp"
#include "options.hpp"
#include "policies.hpp"
#include "residual_report.hpp"
#include "split_rule.hpp"
#include "update_rule.hpp"

#include <loco/loco.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace gpt {

template <class Inner>
class synchronous_rule final : public update_rule {
public:
    synchronous_rule(const options& o, loco::comm::communicator& comm, worker_state& w)
        : o_(o), comm_(comm), w_(w),
          opt_(w.list, typename loco::optimizer<typename Inner::type>::config{
                           .inner = Inner::hyper(o, 1.0f)}) {}

    void start() override {
        // What a data-parallel framework does anyway (DDP does), and DiLoCo pays for the same.
        comm_.broadcast(loco::comm::as_bytes(loco::host_tensor(w_.params, w_.total)), 0);
    }
    void step(float lr_factor) override {
        comm_.all_reduce(loco::host_tensor(w_.grads, w_.total), loco::comm::reduce_op::mean);
        ++syncs_;
        opt_.hyper() = Inner::hyper(o_, lr_factor);
        opt_.step();
    }
    void finish() override {}
    std::span<const float> global() const override { return {w_.params, w_.total}; }
    std::uint64_t syncs() const override { return syncs_; }

private:
    const options& o_;
    loco::comm::communicator& comm_;
    worker_state& w_;
    loco::optimizer<typename Inner::type> opt_;
    std::uint64_t syncs_ = 0;
};

// The corruptions an attacker applies to its honest pseudo-gradient Delta (as in
// tests/attack_test.cpp): 100 Delta, -4 Delta, NaN everywhere, or Gaussian noise scaled to
// Delta's norm.
inline constexpr std::string_view attack_names[] = {"scaled", "sign_flip", "nan", "random"};

template <class Inner, class Outer, class Compress, class Schedule, class Aggregate = mean_choice>
class diloco_rule final : public update_rule {
    using handle = loco::diloco<typename Inner::type, typename Outer::type, typename Compress::type,
                                typename Schedule::type, typename Aggregate::type>;

public:
    diloco_rule(const options& o, loco::comm::communicator& comm, worker_state& w)
        : o_(o),
          w_(w),
          attacker_(comm.rank() >= comm.size() - o.attackers),
          noise_(o.seed * 7919 + static_cast<std::uint64_t>(comm.rank())),
          d_(w.list, comm, make_config(o)) {
        if (!o.residual_csv.empty()) {
            if constexpr (chunked_residual_compressor<typename Compress::type> &&
                          std::is_same_v<typename Schedule::type, loco::schedule::every>) {
                split_sync_ = true;
                if (comm.rank() == 0) {
                    report_.emplace(residual_report::of<typename Compress::type>(
                        Compress::hyper(o), w.list, o.residual_csv));
                }
            } else {
                throw loco::invalid_argument(residual_csv_refusal);
            }
        }
    }

    void start() override { d_.start(); }
    void step(float lr_factor) override {
        d_.inner_hyper() = Inner::hyper(o_, lr_factor);
        const bool syncs_now = (d_.calls() + 1) % o_.every == 0;  // --schedule every
        if (attacker_ && syncs_now) attack();
        if constexpr (std::is_same_v<typename Schedule::type, loco::schedule::every>) {
            if (split_sync_ && syncs_now) {
                step_then_sync();
                last_synced_ = true;
                return;
            }
        }
        last_synced_ = d_.step().synced;
    }
    void finish() override {
        // --steps may cut the last round short: close it. A schedule with fragments or with an
        // exchange in flight never ends with every fragment freshly synced: it ends with one sync
        // of the whole model (whose bytes are counted like any others).
        if (!last_synced_ || !std::is_same_v<typename Schedule::type, loco::schedule::every>) {
            if (attacker_) attack();
            reported_sync();
            last_synced_ = true;
        }
        if (report_) report_->close();
    }
    std::span<const float> global() const override { return d_.global(); }
    std::uint64_t syncs() const override { return d_.outer_steps(); }

private:
    static typename handle::config make_config(const options& o) {
        typename handle::config c{.inner = Inner::hyper(o, 1.0f),
                                  .outer = Outer::hyper(o),
                                  .schedule = Schedule::hyper(o),
                                  .compress = Compress::hyper(o),
                                  .seed = o.seed,
                                  .fragments = Schedule::fragments(o)};
        c.aggregate = Aggregate::hyper(o);
        // `mean` under the NaN attack skips every sync; the run then shows a model that never
        // moves instead of stopping at the 10th skipped sync.
        if (o.attackers > 0) c.max_skipped_syncs = 0;
        return c;
    }

    // A call that syncs, taken apart so that worker 0 sees the residual its sync compresses: the
    // inner step with the schedule held back for this one call, then the sync its plan would
    // have run (diloco::sync() starts and finishes the one fragment as step() does for `every`;
    // tests/gpt_residual_test.cpp checks that the run is the same to the bit).
    void step_then_sync() {
        std::uint64_t& every = d_.schedule_hyper().every;
        const std::uint64_t kept = every;
        every = std::numeric_limits<std::uint64_t>::max();
        try {
            d_.step();
        } catch (...) {
            every = kept;
            throw;
        }
        every = kept;
        reported_sync();
    }

    void reported_sync() {
        if (report_) report_->before(d_.calls(), d_.compressor_state(0), d_.global(), w_.params);
        d_.sync();
        if (report_) report_->after(d_.compressor_state(0));
    }

    // An attacker's move, just before a call that syncs (--schedule every only): it replaces its
    // local parameters x by g - a(g - x), g the global parameters and a the corruption, so the
    // pseudo-gradient it sends is a(Delta) for Delta its honest pseudo-gradient of the round's
    // first H - 1 inner steps, plus its last (honest) inner step. It trains honestly in between:
    // every sync resets x to the new global parameters.
    void attack() {
        const std::span<const float> g = d_.global();
        float* x = w_.params;
        double norm = 0.0;
        for (std::size_t i = 0; i < w_.total; ++i) {
            const double d = static_cast<double>(g[i]) - x[i];
            norm += d * d;
        }
        norm = std::sqrt(norm);
        if (o_.attack == "random") {
            std::normal_distribution<double> gauss;
            noise_buffer_.resize(w_.total);
            double nn = 0.0;
            for (double& v : noise_buffer_) {
                v = gauss(noise_);
                nn += v * v;
            }
            const double scale = nn > 0.0 ? norm / std::sqrt(nn) : 0.0;
            for (std::size_t i = 0; i < w_.total; ++i) {
                x[i] = static_cast<float>(g[i] - noise_buffer_[i] * scale);
            }
            return;
        }
        const double factor = o_.attack == "scaled" ? 100.0 : o_.attack == "sign_flip" ? -4.0 : 0.0;
        for (std::size_t i = 0; i < w_.total; ++i) {
            const double d = static_cast<double>(g[i]) - x[i];
            x[i] = o_.attack == "nan" ? std::numeric_limits<float>::quiet_NaN()
                                      : static_cast<float>(g[i] - factor * d);
        }
    }

    const options& o_;
    worker_state& w_;
    bool attacker_;
    std::mt19937_64 noise_;
    std::vector<double> noise_buffer_;
    handle d_;
    bool last_synced_ = true;
    bool split_sync_ = false;               // --residual-csv: every worker splits its syncing calls
    std::optional<residual_report> report_;  // worker 0's
};

namespace detail {

// The rule of the combination named by the options within one `combinations` (policies.hpp),
// whose lists hold every name.
template <class Combo>
rule_factory make_diloco_factory(const options& o) {
    return dispatch<typename Combo::inners>(o.inner, "--inner", [&]<class I>() -> rule_factory {
        validate_choice<I>(o);  // bad inner settings (--lr, --weight-decay, ...)
        return dispatch<typename Combo::outers>(o.outer, "--outer", [&]<class O>() -> rule_factory {
            validate_choice<O>(o);  // and outer ones (--outer-momentum 1.5)
            return dispatch<typename Combo::compressors>(
                o.compress, "--compress", [&]<class C>() -> rule_factory {
                    // Bad compressor settings (--topk, --chunk, --bins, --ef-decay) too.
                    validate_choice<C>(o);
                    return dispatch<typename Combo::schedules>(
                        o.schedule, "--schedule", [&]<class S>() -> rule_factory {
                            // A bad schedule (H not a multiple of P) is refused before any data
                            // is loaded.
                            validate_choice<S>(o);
                            // Fragments are whole layers (layer_of): more would leave one empty.
                            if constexpr (std::is_same_v<typename S::type,
                                                         loco::schedule::streaming>) {
                                if (o.fragments > o.model.layers) {
                                    throw loco::invalid_argument(
                                        "gpt: --fragments " + std::to_string(o.fragments) +
                                        " needs at least that many layers (fragments are whole "
                                        "layers; --layers " + std::to_string(o.model.layers) +
                                        ")");
                                }
                            }
                            return dispatch<typename Combo::aggregates>(
                                o.aggregate, "--aggregate", [&]<class A>() -> rule_factory {
                                    // So are bad aggregation settings, and a trim that
                                    // leaves no worker (the policy sees M only at a sync).
                                    validate_choice<A>(o);
                                    if constexpr (std::is_same_v<typename A::type,
                                                                 loco::aggregate::trimmed_mean>) {
                                        const std::uint64_t b = A::hyper(o).trim;
                                        // Not 2 * b >= M: 2 * b wraps from b = 2^63.
                                        if (b > (static_cast<std::uint64_t>(o.workers) - 1) / 2) {
                                            throw loco::invalid_argument(
                                                "gpt: --trim " + std::to_string(b) + " drops 2 x " +
                                                std::to_string(b) + " of the " +
                                                std::to_string(o.workers) +
                                                " workers' values; choose 2B < --workers");
                                        }
                                    }
                                    return [&o](loco::comm::communicator& c, worker_state& w)
                                               -> std::unique_ptr<update_rule> {
                                        return std::make_unique<diloco_rule<I, O, C, S, A>>(o, c,
                                                                                             w);
                                    };
                                });
                        });
                });
        });
    });
}

template <class Combo>
bool offers(const options& o) {
    return has_choice<typename Combo::inners>(o.inner) &&
           has_choice<typename Combo::outers>(o.outer) &&
           has_choice<typename Combo::compressors>(o.compress) &&
           has_choice<typename Combo::schedules>(o.schedule) &&
           has_choice<typename Combo::aggregates>(o.aggregate);
}

// Whether a combination compiles other aggregations than `mean` (then its messages name them).
template <class Combo>
constexpr bool aggregates_beyond_mean() {
    return !std::is_same_v<typename Combo::aggregates, std::tuple<mean_choice>>;
}

// The attack options, checked before any worker starts.
// Muon's lr times a matrix's shape factor must be a float (muon::prepare refuses it at the first
// step; validate() cannot, it sees no shapes): checked for every hidden matrix of the model, at
// the factors validate_choice uses, before any data is loaded.
inline void check_muon_shapes(const options& o) {
    if (o.inner != "muon") return;
    validate_choice<muon_choice>(o);  // prepare() assumes settings validate() passed (a NaN lr)
    const layout lay(o.model);
    for (const tensor_spec& s : lay.tensors()) {
        if (role_for(s) != loco::role::matrix) continue;
        for (const float f : validated_lr_factors(o)) {
            loco::inner::muon::prepare(std::get<0>(muon_choice::hyper(o, f)), s.rows, s.cols);
        }
    }
}

inline void check_attack(const options& o) {
    bool known = false;
    std::string valid;
    for (const std::string_view a : attack_names) {
        known = known || a == o.attack;
        valid += (valid.empty() ? "" : ", ") + std::string(a);
    }
    if (!known) {
        throw loco::invalid_argument("gpt: unknown --attack '" + o.attack + "'; valid: " + valid);
    }
    if (o.attackers < 0 || o.attackers >= o.workers) {
        throw loco::invalid_argument("gpt: --attackers must be between 0 and --workers - 1 = " +
                                     std::to_string(o.workers - 1) +
                                     " (worker 0, which measures the loss, stays honest)");
    }
    if (o.attackers > 0 && (o.sync_every_step || o.schedule != "every")) {
        throw loco::invalid_argument(
            "gpt: --attackers needs DiLoCo's --schedule every (an attacker corrupts its "
            "parameters just before each sync); drop --sync-every-step or --schedule " +
            o.schedule);
    }
}

}  // namespace detail

// The rule the options name, among the compiled combinations (by default those of policies.hpp;
// a test may compile fewer) and, for --sync-every-step, the inner optimizers SyncInners. Throws
// invalid_argument before any worker starts for an unknown name (listing the valid ones) and for
// a combination that is not compiled (listing those that are, for the chosen schedule).
// Splits: the --head-compress runs compiled (split_rule.hpp).
template <class Combos = compiled_combinations, class SyncInners = inner_choices,
          class Splits = compiled_splits>
rule_factory make_rule_factory(const options& o) {
    // Every name is checked, also those a synchronous run does not use.
    check_choice<inner_choices>(o.inner, "--inner");
    check_choice<outer_choices>(o.outer, "--outer");
    check_choice<known_compress_choices>(o.compress, "--compress");
    check_choice<schedule_choices>(o.schedule, "--schedule");
    check_choice<aggregate_choices>(o.aggregate, "--aggregate");
    if (o.edit_scope != "fragment" && o.edit_scope != "tensor") {
        throw loco::invalid_argument("gpt: unknown --edit-scope '" + o.edit_scope +
                                     "'; valid: fragment, tensor");
    }
    detail::check_attack(o);
    detail::check_muon_shapes(o);
    if (!residual_csv_fits(o.residual_csv, o.compress, o.sync_every_step)) {
        throw loco::invalid_argument(residual_csv_refusal);
    }
    if (rule_factory split = make_split_factory<Splits>(o)) return split;
    if (o.sync_every_step) {
        if (o.compress != "none") {
            throw loco::invalid_argument(
                "gpt: --sync-every-step all-reduces fp32 gradients; drop --compress " + o.compress);
        }
        if (o.aggregate != "mean") {
            throw loco::invalid_argument(
                "gpt: --sync-every-step averages gradients; drop --aggregate " + o.aggregate);
        }
        if (o.schedule != "every") {
            throw loco::invalid_argument(
                "gpt: --sync-every-step averages gradients every step, with no schedule; drop "
                "--schedule " + o.schedule);
        }
        return dispatch<SyncInners>(o.inner, "--inner", [&]<class I>() -> rule_factory {
            validate_choice<I>(o);  // bad inner settings, before any data is loaded
            return [&o](loco::comm::communicator& c, worker_state& w) -> std::unique_ptr<update_rule> {
                return std::make_unique<synchronous_rule<I>>(o, c, w);
            };
        });
    }
    rule_factory out;
    std::string compiled;  // the combinations compiled for this schedule, for the message
    [&]<std::size_t... K>(std::index_sequence<K...>) {
        (([&] {
             using combo = std::tuple_element_t<K, Combos>;
             if (!out && detail::offers<combo>(o)) out = detail::make_diloco_factory<combo>(o);
             if (has_choice<typename combo::schedules>(o.schedule)) {
                 compiled += std::string(compiled.empty() ? "" : "; or ") + "--inner " +
                             choice_alternatives<typename combo::inners>() + " --outer " +
                             choice_alternatives<typename combo::outers>() + " --compress " +
                             choice_alternatives<typename combo::compressors>();
                 if constexpr (detail::aggregates_beyond_mean<combo>()) {
                     compiled += " --aggregate " + choice_alternatives<typename combo::aggregates>();
                 }
             }
         }()),
         ...);
    }(std::make_index_sequence<std::tuple_size_v<Combos>>{});
    if (!out) {
        throw loco::invalid_argument(
            "gpt: --schedule " + o.schedule + " with --inner " + o.inner + " --outer " + o.outer +
            " --compress " + o.compress +
            (o.aggregate == "mean" ? std::string() : " --aggregate " + o.aggregate) +
            " is not compiled into this trainer; " +
            (compiled.empty() ? std::string("no combination with this schedule is")
                              : "it is compiled with " + compiled) +
            " (add a combination to compiled_combinations in examples/gpt/policies.hpp)");
    }
    return out;
}

// A name for the run's mode in progress lines and summaries.
inline std::string describe_mode(const options& o) {
    if (o.sync_every_step) {
        return "synchronous data parallel, inner " + o.inner;
    }
    std::string s = "DiLoCo inner " + o.inner + ", outer " + o.outer + ", compress " + o.compress +
                    ", schedule " + o.schedule + " H=" + std::to_string(o.every);
    if (o.aggregate != "mean") s += ", aggregate " + o.aggregate;
    if (!o.head_compress.empty()) s += ", head.w compress " + o.head_compress;
    if (o.attackers > 0) {
        s += ", " + std::to_string(o.attackers) + " attacker" + (o.attackers > 1 ? "s" : "") +
             " (" + o.attack + ")";
    }
    if (o.schedule == "streaming") {
        char buf[96];
        std::snprintf(buf, sizeof buf, " P=%llu tau=%llu alpha=%g pattern=",
                      static_cast<unsigned long long>(o.fragments),
                      static_cast<unsigned long long>(o.overlap), double(o.alpha));
        s += buf + o.pattern;
    }
    return s;
}

}  // namespace gpt
