#pragma once
// How a worker turns the gradient of a step into new parameters: the one thing the runs differ
// in. The trainer (trainer.hpp) sees only update_rule; make_rule_factory (below) picks the
// compiled instantiation the options name.
//
//   synchronous_rule  data parallelism: the gradients are averaged over the workers every step
//                     (one fp32 all-reduce of the whole model) and every worker applies the same
//                     inner step. The baseline DiLoCo is measured against, same global batch.
//   diloco_rule       loco::diloco: inner steps on the worker's own gradients, and a sync of the
//                     pseudo-gradients when the schedule says so.

#include "options.hpp"
#include "policies.hpp"

#include <loco/loco.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

namespace gpt {

// A worker's parameters and gradients (one flat array each, in loco's layout) and loco's view of
// them.
struct worker_state {
    float* params = nullptr;
    float* grads = nullptr;
    std::size_t total = 0;
    loco::parameter_list list;
};

class update_rule {
public:
    virtual ~update_rule() = default;
    // Collective, before the first forward pass: every worker starts from rank 0's parameters.
    virtual void start() = 0;
    // The step's gradient is in the gradient array; lr_factor scales every peak learning rate.
    virtual void step(float lr_factor) = 0;
    // Collective, after the last step: leaves every worker on the same final parameters.
    virtual void finish() = 0;
    // The parameters a validation measures, in the flat layout: the global ones.
    virtual std::span<const float> global() const = 0;
    virtual std::uint64_t syncs() const = 0;
};

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

template <class Inner, class Outer, class Compress, class Schedule>
class diloco_rule final : public update_rule {
    using handle = loco::diloco<typename Inner::type, typename Outer::type, typename Compress::type,
                                typename Schedule::type>;

public:
    diloco_rule(const options& o, loco::comm::communicator& comm, worker_state& w)
        : o_(o),
          d_(w.list, comm,
             typename handle::config{.inner = Inner::hyper(o, 1.0f),
                                     .outer = Outer::hyper(o),
                                     .schedule = Schedule::hyper(o),
                                     .compress = Compress::hyper(o),
                                     .seed = o.seed}) {}

    void start() override { d_.start(); }
    void step(float lr_factor) override {
        d_.inner_hyper() = Inner::hyper(o_, lr_factor);
        last_synced_ = d_.step().synced;
    }
    void finish() override {
        if (!last_synced_) {  // --steps may cut the last round short: close it
            d_.sync();
            last_synced_ = true;
        }
    }
    std::span<const float> global() const override { return d_.global(); }
    std::uint64_t syncs() const override { return d_.outer_steps(); }

private:
    const options& o_;
    handle d_;
    bool last_synced_ = true;
};

using rule_factory =
    std::function<std::unique_ptr<update_rule>(loco::comm::communicator&, worker_state&)>;

// The rule the options name, among the choices in the lists (by default every choice of
// policies.hpp; a test may compile fewer). Throws invalid_argument for an unknown name, listing
// the valid ones, before any worker starts.
template <class Inners = inner_choices, class Outers = outer_choices,
          class Compressors = compress_choices, class Schedules = schedule_choices>
rule_factory make_rule_factory(const options& o) {
    // Every name is checked, also those a synchronous run does not use.
    check_choice<Inners>(o.inner, "--inner");
    check_choice<Outers>(o.outer, "--outer");
    check_choice<Compressors>(o.compress, "--compress");
    check_choice<Schedules>(o.schedule, "--schedule");
    if (o.sync_every_step) {
        if (o.compress != "none") {
            throw loco::invalid_argument(
                "gpt: --sync-every-step all-reduces fp32 gradients; drop --compress " + o.compress);
        }
        return dispatch<Inners>(o.inner, "--inner", [&]<class I>() -> rule_factory {
            return [&o](loco::comm::communicator& c, worker_state& w) -> std::unique_ptr<update_rule> {
                return std::make_unique<synchronous_rule<I>>(o, c, w);
            };
        });
    }
    return dispatch<Inners>(o.inner, "--inner", [&]<class I>() -> rule_factory {
        return dispatch<Outers>(o.outer, "--outer", [&]<class O>() -> rule_factory {
            return dispatch<Compressors>(o.compress, "--compress", [&]<class C>() -> rule_factory {
                return dispatch<Schedules>(o.schedule, "--schedule", [&]<class S>() -> rule_factory {
                    return [&o](loco::comm::communicator& c,
                                worker_state& w) -> std::unique_ptr<update_rule> {
                        return std::make_unique<diloco_rule<I, O, C, S>>(o, c, w);
                    };
                });
            });
        });
    });
}

// A name for the run's mode in progress lines and summaries.
inline std::string describe_mode(const options& o) {
    if (o.sync_every_step) {
        return "synchronous data parallel, inner " + o.inner;
    }
    return "DiLoCo inner " + o.inner + ", outer " + o.outer + ", compress " + o.compress +
           ", schedule " + o.schedule + " H=" + std::to_string(o.every);
}

}  // namespace gpt
