#pragma once
// What the trainer (trainer.hpp) sees of a run's way to update the parameters: a worker's state
// and the update_rule interface. rules.hpp and split_rule.hpp implement it.

#include <loco/loco.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>

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

using rule_factory =
    std::function<std::unique_ptr<update_rule>(loco::comm::communicator&, worker_state&)>;

}  // namespace gpt
