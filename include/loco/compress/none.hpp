#pragma once
// No compression: pseudo-gradients travel as fp32. loco::diloco averages them with one fp32
// all-reduce; the payload form below (header + raw floats) serves the other exchange schemes and
// is the simplest example of the compressor interface (compressor.hpp).

#include <loco/compress/compressor.hpp>
#include <loco/compress/wire.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>

namespace loco::compress {

struct none {
    static constexpr std::string_view name = "none";
    static constexpr std::uint8_t wire_id = 0;
    static constexpr int state_size = 0;

    struct hyper {};

    static std::size_t payload_bytes(const hyper&, std::span<const segment> segs) noexcept {
        return wire::header_bytes + 4 * total_elements(segs);
    }

    static void encode(const hyper& h, std::span<const float> x, std::span<const segment> segs,
                       std::span<float>, const encode_context&, std::span<std::byte> out) {
        check_segments_inside(segs, x.size(), name, "input");
        check_payload_buffer(out.size(), payload_bytes(h, segs), name);
        std::size_t at = wire::header_bytes;
        for (const segment& s : segs) {
            if (s.size != 0) {
                std::memcpy(out.data() + at, x.data() + s.offset, 4 * s.size);
            }
            at += 4 * s.size;
        }
        wire::write_header(out, expected_header(h, segs));
    }

    static void decode(const hyper& h, std::span<const std::byte> in, std::span<const segment> segs,
                       std::span<float> out) {
        check_segments_inside(segs, out.size(), name, "output");
        const auto body = wire::open(in, expected_header(h, segs), name);
        std::size_t at = 0;
        for (const segment& s : segs) {
            if (s.size != 0) {
                std::memcpy(out.data() + s.offset, body.data() + at, 4 * s.size);
            }
            at += 4 * s.size;
        }
    }

private:
    static wire::header expected_header(const hyper&, std::span<const segment> segs) noexcept {
        wire::header w;
        w.compressor = wire_id;
        w.bits = 32;
        w.segments = static_cast<std::uint32_t>(segs.size());
        w.elements = total_elements(segs);
        w.body_bytes = 4 * w.elements;
        return w;
    }
};

static_assert(compressor<none>);

}  // namespace loco::compress
