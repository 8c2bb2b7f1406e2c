#pragma once
// What a pseudo-gradient compressor is. A compressor turns the fp32 pseudo-gradient of a list of
// segments (tensors, or pieces of tensors) into a self-describing byte payload and back:
//
//   static constexpr std::string_view name;            // recorded in checkpoints
//   static constexpr std::uint8_t wire_id;              // in every payload header (wire.hpp)
//   struct hyper { ... };                               // settings, paper defaults
//   static constexpr int state_size;                    // floats of state per element (0: none)
//   static std::size_t payload_bytes(const hyper&, std::span<const segment>);
//   static void encode(const hyper&, std::span<const float> x, std::span<const segment>,
//                      std::span<float> state, const encode_context&, std::span<std::byte> out);
//   static void decode(const hyper&, std::span<const std::byte> in, std::span<const segment>,
//                      std::span<float> out);
//
// x, state and out are indexed by the flat layout (a segment's elements are at
// [offset, offset + size)); state holds state_size arrays of x.size() floats, array j at
// j * x.size(). payload_bytes is exact and depends only on the hyper-parameters and the segments,
// so every rank knows the size of every peer's payload. decode validates the payload first
// (wire.hpp) and throws loco::wire_error, writing nothing, when it is malformed. See
// docs/compressors.md.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace loco::compress {

// A range of the flat layout that is compressed on its own. rows x cols == size; a 1-D range has
// rows == 1. Per-row quantizers use the rows; the others ignore them.
struct segment {
    std::size_t offset = 0;
    std::size_t size = 0;
    std::size_t rows = 1;
    std::size_t cols = 0;
};

// What changes from one encode to the next. Stochastic rounding draws from the counter-based
// generator in random.hpp with (seed, stream, element index), stream = round * 2^16 + rank, so
// every rank and every sync uses fresh draws and a run is reproducible per seed.
struct encode_context {
    std::uint64_t seed = 0;   // the run's seed
    std::uint64_t round = 0;  // the outer step being encoded (0 for the first sync)
    int rank = 0;
    float outer_lr = 1.0f;    // for error_feedback's MuLoCo form, which folds it into the buffer

    std::uint64_t stream() const noexcept {
        return (round << 16) + static_cast<std::uint64_t>(rank);
    }
};

template <class C>
concept compressor =
    requires {
        typename C::hyper;
        { C::name } -> std::convertible_to<std::string_view>;
        { C::wire_id } -> std::convertible_to<std::uint8_t>;
        { C::state_size } -> std::convertible_to<int>;
    } &&
    requires(const typename C::hyper& h, std::span<const segment> segs, std::span<const float> x,
             std::span<float> state, const encode_context& ctx, std::span<std::byte> out,
             std::span<const std::byte> in, std::span<float> decoded) {
        { C::payload_bytes(h, segs) } -> std::convertible_to<std::size_t>;
        C::encode(h, x, segs, state, ctx, out);
        C::decode(h, in, segs, decoded);
    };

}  // namespace loco::compress
