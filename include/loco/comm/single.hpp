#pragma once
// A communicator of one rank: every collective is the identity and nothing is sent. DiLoCo with
// M = 1 uses the outer optimizer as a lookahead around the inner one.

#include <loco/comm/communicator.hpp>

#include <cstring>

namespace loco::comm {

class single final : public communicator {
public:
    int rank() const noexcept override { return 0; }
    int size() const noexcept override { return 1; }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return "single"; }
    std::uint64_t bytes_sent() const noexcept override { return 0; }

protected:
    void do_all_reduce(tensor_view<float>, reduce_op) override {}
    void do_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        if (send.size != 0) {
            std::memmove(recv.data, send.data, send.size);
        }
    }
    void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) override {
        if (send.size != 0) {
            std::memcpy(recv.data, send.data, send.size);
        }
    }
    void do_broadcast(tensor_view<std::byte>, int) override {}
    void do_barrier() override {}
};

}  // namespace loco::comm
