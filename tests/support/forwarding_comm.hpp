#pragma once
// A communicator that passes every collective on to another one: the base of the tests' fault
// injectors and recorders, which override only the collective they watch or tamper with and
// call the base's version to move the data.

#include <loco/comm/communicator.hpp>
#include <loco/error.hpp>

#include <string_view>

namespace loco_test {

class forwarding_comm : public loco::comm::communicator {
public:
    // `name` must outlive the communicator (the tests pass string literals).
    forwarding_comm(loco::comm::communicator& next, std::string_view name) : next_(&next), name_(name) {}

    int rank() const noexcept override { return next_->rank(); }
    int size() const noexcept override { return next_->size(); }
    loco::memory_space space() const noexcept override { return next_->space(); }
    std::string_view name() const noexcept override { return name_; }
    // Counted by the communicator that sends them.
    std::uint64_t bytes_sent() const noexcept override { return next_->bytes_sent(); }

protected:
    // For a wrapper whose peer group is rebuilt (a regroup): later collectives go to `next`.
    void forward_to(loco::comm::communicator& next) noexcept { next_ = &next; }

    void do_all_reduce(loco::tensor_view<float> data, loco::comm::reduce_op op) override {
        next_->all_reduce(data, op);
    }
    void do_all_gather(loco::tensor_view<const std::byte> send, loco::tensor_view<std::byte> recv) override {
        next_->all_gather(send, recv);
    }
    void do_all_to_all(loco::tensor_view<const std::byte> send, loco::tensor_view<std::byte> recv) override {
        next_->all_to_all(send, recv);
    }
    void do_broadcast(loco::tensor_view<std::byte> data, int root) override { next_->broadcast(data, root); }
    void do_barrier() override { next_->barrier(); }

private:
    loco::comm::communicator* next_;
    std::string_view name_;
};

// Forwards to `next`, and fails the transfer of the `fail_at`-th all-reduce (counted from 1) on
// rank `fail_rank` after it completed, as a link that drops the last acknowledgement would.
class failing_transfer final : public forwarding_comm {
public:
    failing_transfer(loco::comm::communicator& next, int fail_rank, int fail_at)
        : forwarding_comm(next, "failing_transfer"), fail_rank_(fail_rank), fail_at_(fail_at) {}
    int all_reduces = 0;

protected:
    void do_all_reduce(loco::tensor_view<float> d, loco::comm::reduce_op op) override {
        forwarding_comm::do_all_reduce(d, op);
        if (++all_reduces == fail_at_ && rank() == fail_rank_) {
            throw loco::comm_error("injected: link dropped");
        }
    }

private:
    int fail_rank_, fail_at_;
};

// Forwards to `next`, flipping one byte near the end of what an all_gather delivers (inside the
// last rank's payload body): on rank `victim` only, or on every rank when `victim` is negative.
// For the tests that a corrupted payload fails a sync on every rank and changes nothing.
class corrupting_all_gather final : public forwarding_comm {
public:
    explicit corrupting_all_gather(loco::comm::communicator& next, int victim = -1)
        : forwarding_comm(next, "corrupting"), victim_(victim) {}

protected:
    void do_all_gather(loco::tensor_view<const std::byte> send, loco::tensor_view<std::byte> recv) override {
        forwarding_comm::do_all_gather(send, recv);
        if (victim_ < 0 || rank() == victim_) recv.data[recv.size - 3] ^= std::byte{0x10};
    }

private:
    int victim_;
};

}  // namespace loco_test
