#pragma once
// Editing a compressed payload in a test.

#include <loco/compress/wire.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

namespace loco_test {

// Makes the header's checksum match the body again after a test changed the body, so that the
// decoder's own checks, not the checksum, have to find the change.
inline void reseal(std::span<std::byte> payload) {
    namespace wire = loco::compress::wire;
    const std::span<const std::byte> body(payload.data() + wire::header_bytes,
                                          payload.size() - wire::header_bytes);
    wire::put<std::uint64_t>(payload, 32, wire::checksum(body));
}

}  // namespace loco_test
