#pragma once
// The wire header of device payloads and the host's check of the headers it receives. Both are
// compress/wire.hpp's rules: the plans describe their payload as a wire::header, the header
// kernel writes wire::write_fields' bytes, and a received header is refused for exactly what
// wire::open refuses (wire::header_mismatch, then the checksum), so a payload the device accepts
// is one the host decoder accepts, with the same message plus the sender's rank.

#include <loco/compress/wire.hpp>
#include <loco/error.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace loco::backend::cuda {

// The header's first 32 bytes (the checksum follows), as the header kernel writes them.
struct header_prefix {
    unsigned char bytes[32];
};

// Where a sync's payloads live: M payloads of `stride` bytes, rank order.
struct gathered_payloads {
    const std::byte* base;
    std::uint64_t stride;
    std::uint32_t ranks;
    std::uint32_t reserved;
};

namespace detail {

inline header_prefix prefix_bytes(const compress::wire::header& h) noexcept {
    std::byte bytes[compress::wire::header_bytes]{};
    compress::wire::write_fields(bytes, h);
    header_prefix p{};
    for (std::size_t i = 0; i < sizeof(p.bytes); ++i) {
        p.bytes[i] = std::to_integer<unsigned char>(bytes[i]);
    }
    return p;
}

inline void require_payload_pointer(const void* p, const char* name, const char* what) {
    if (p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 4 != 0) {
        throw invalid_argument(std::string("loco: ") + what + ": " + name +
                               " must be a non-null, 4-byte aligned device pointer");
    }
}

// The error for rank k's payload, as the host decoder words it.
inline wire_error malformed_payload(std::string_view who, std::size_t k, const std::string& why) {
    return wire_error("loco::compress::" + std::string(who) + ": malformed payload from rank " +
                      std::to_string(k) + ": " + why);
}

// Rank k's header (header_bytes bytes copied to the host) against the expected one and the
// checksum the device summed over its body (terms plus length): wire::open's checks in its
// order. Throws malformed_payload.
inline void check_header(std::string_view who, std::size_t k, const std::byte* got,
                         const compress::wire::header& want, std::uint64_t checksum) {
    const std::span<const std::byte> header(got, compress::wire::header_bytes);
    if (const std::string why = compress::wire::header_mismatch(header, want); !why.empty()) {
        throw malformed_payload(who, k, why);
    }
    if (compress::wire::get<std::uint64_t>(header, 32) != checksum) {
        throw malformed_payload(who, k, "checksum mismatch");
    }
}

}  // namespace detail
}  // namespace loco::backend::cuda
