#pragma once
// The communicator interface every loco handle talks to. A sync moves megabytes to gigabytes, so
// one virtual call per collective costs nothing measurable, and a run-time interface lets a trainer
// pick threads, MPI or NCCL without recompiling its optimizer types (see docs/design.md).
//
// Public calls check their arguments once here (memory space, sizes, root) and then forward to the
// implementation; implementations count the bytes they actually send.

#include <loco/error.hpp>
#include <loco/tensor.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace loco::comm {

enum class reduce_op : unsigned char { sum, mean };

class communicator {
public:
    virtual ~communicator() = default;

    virtual int rank() const noexcept = 0;
    virtual int size() const noexcept = 0;
    // Where the buffers given to the collectives must live.
    virtual loco::memory_space space() const noexcept = 0;
    virtual std::string_view name() const noexcept = 0;
    // Bytes this rank has sent to its peers since construction, counted where they are sent.
    virtual std::uint64_t bytes_sent() const noexcept = 0;

    // Element-wise sum or mean over all ranks, in place; every rank gets bit-identical results.
    void all_reduce(tensor_view<float> data, reduce_op op) {
        check_buffer(data.data, data.size, data.space, "all_reduce");
        do_all_reduce(data, op);
    }

    // Concatenation of every rank's `send` bytes in rank order; recv holds size() * send.size.
    // send and recv are disjoint, or send is exactly this rank's slot of recv (in place).
    void all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) {
        check_buffer(send.data, send.size, send.space, "all_gather");
        check_buffer(recv.data, recv.size, recv.space, "all_gather");
        if (recv.size != send.size * static_cast<std::size_t>(size())) {
            throw shape_error(prefix("all_gather") + "the receive buffer holds " +
                              std::to_string(recv.size) + " bytes but " + std::to_string(size()) +
                              " ranks x " + std::to_string(send.size) + " bytes were sent");
        }
        const std::less<const std::byte*> before;
        const bool overlap = send.size != 0 && before(send.data, recv.data + recv.size) &&
                             before(recv.data, send.data + send.size);
        const std::byte* own_slot = recv.data + static_cast<std::size_t>(rank()) * send.size;
        if (overlap && send.data != own_slot) {
            throw invalid_argument(prefix("all_gather") +
                                   "the send buffer overlaps the receive buffer but is not this "
                                   "rank's slot of it");
        }
        do_all_gather(send, recv);
    }

    // Personalised exchange: send and recv hold size() blocks of b bytes each; block k of this
    // rank's send goes to rank k, and block k of recv comes from rank k. send and recv must not
    // overlap.
    void all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) {
        check_buffer(send.data, send.size, send.space, "all_to_all");
        check_buffer(recv.data, recv.size, recv.space, "all_to_all");
        const auto m = static_cast<std::size_t>(size());
        if (send.size != recv.size || send.size % m != 0) {
            throw shape_error(prefix("all_to_all") + "send (" + std::to_string(send.size) +
                              " bytes) and recv (" + std::to_string(recv.size) +
                              " bytes) must be equal and hold " + std::to_string(m) +
                              " blocks of the same size");
        }
        const std::less<const std::byte*> before;
        if (send.size != 0 && before(send.data, recv.data + recv.size) &&
            before(recv.data, send.data + send.size)) {
            throw invalid_argument(prefix("all_to_all") + "send and recv overlap");
        }
        do_all_to_all(send, recv);
    }

    // Copies root's bytes into every other rank's buffer.
    void broadcast(tensor_view<std::byte> data, int root) {
        check_buffer(data.data, data.size, data.space, "broadcast");
        if (root < 0 || root >= size()) {
            throw invalid_argument(prefix("broadcast") + "root " + std::to_string(root) +
                                   " is not a rank of a communicator of size " +
                                   std::to_string(size()));
        }
        do_broadcast(data, root);
    }

    // Returns once every rank has called it.
    void barrier() { do_barrier(); }

protected:
    virtual void do_all_reduce(tensor_view<float> data, reduce_op op) = 0;
    virtual void do_all_gather(tensor_view<const std::byte> send, tensor_view<std::byte> recv) = 0;
    virtual void do_all_to_all(tensor_view<const std::byte> send, tensor_view<std::byte> recv) = 0;
    virtual void do_broadcast(tensor_view<std::byte> data, int root) = 0;
    virtual void do_barrier() = 0;

    std::string prefix(std::string_view call) const {
        return "loco::comm::" + std::string(name()) + " rank " + std::to_string(rank()) + ", " +
               std::string(call) + ": ";
    }

private:
    void check_buffer(const void* data, std::size_t n, loco::memory_space where,
                      std::string_view call) const {
        if (where != space()) {
            throw memory_space_error(prefix(call) + "got a buffer in " +
                                     std::string(to_string(where)) +
                                     " memory but this communicator moves " +
                                     std::string(to_string(space())) + " memory");
        }
        if (n != 0 && data == nullptr) {
            throw invalid_argument(prefix(call) + "null buffer of " + std::to_string(n) +
                                   " elements");
        }
    }
};

// Byte views of float data, for all_gather and broadcast.
inline tensor_view<std::byte> as_bytes(tensor_view<float> v) noexcept {
    return {reinterpret_cast<std::byte*>(v.data), v.size_bytes(), 0, 0, v.space};
}
inline tensor_view<const std::byte> as_bytes(tensor_view<const float> v) noexcept {
    return {reinterpret_cast<const std::byte*>(v.data), v.size_bytes(), 0, 0, v.space};
}

}  // namespace loco::comm
