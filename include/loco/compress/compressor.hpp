#pragma once
// What a pseudo-gradient compressor is. A compressor turns the fp32 pseudo-gradient of a list of
// segments (tensors, or pieces of tensors) into a self-describing byte payload and back:
//
//   static constexpr std::string_view name;            // recorded in checkpoints
//   static constexpr std::uint8_t wire_id;              // in every payload header (wire.hpp)
//   struct hyper { ... };                               // settings, paper defaults
//   static constexpr int state_size;                    // floats of state per element (>= 0)
//   static std::size_t payload_bytes(const hyper&, std::span<const segment>);
//   static void encode(const hyper&, std::span<const float> x, std::span<const segment>,
//                      std::span<float> state, const encode_context&, std::span<std::byte> out);
//   static void decode(const hyper&, std::span<const std::byte> in, std::span<const segment>,
//                      std::span<float> out);
//
// and, when hyper has members,
//   static std::string describe(const hyper&);          // the settings as text: compared between
//                                                       // the ranks, recorded in checkpoints
// and optionally
//   static void validate(const hyper&);                 // throws loco::invalid_argument
//
// x, state and out are indexed by the flat layout (a segment's elements are at
// [offset, offset + size)); state holds state_size arrays of x.size() floats, array j at
// j * x.size(). payload_bytes is exact and depends only on the hyper-parameters and the segments,
// so every rank knows the size of every peer's payload. decode validates the payload first
// (wire.hpp) and throws loco::wire_error, writing nothing, when it is malformed. See
// docs/compressors.md.

#include <cstddef>
#include <loco/error.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace loco::compress {

// A range of the flat layout that is compressed on its own. A 2-D range has rows x cols == size;
// a 1-D range has rows == 1 (and cols is not used). Per-row quantizers use the rows; the others
// ignore them.
struct segment {
    std::size_t offset = 0;
    std::size_t size = 0;
    std::size_t rows = 1;
    std::size_t cols = 0;
};

// What changes from one encode to the next. Stochastic rounding draws from the counter-based
// generator in random.hpp with (seed, stream, element index), stream = round * 2^32 + rank, so
// every rank and every sync uses fresh draws and a run is reproducible per seed.
struct encode_context {
    std::uint64_t seed = 0;   // the run's seed
    std::uint64_t round = 0;  // the outer step being encoded (0 for the first sync)
    int rank = 0;
    float outer_lr = 1.0f;    // for error_feedback's MuLoCo form, which folds it into the buffer

    std::uint64_t stream() const noexcept {
        return (round << 32) + static_cast<std::uint32_t>(rank);
    }
};

inline std::size_t total_elements(std::span<const segment> segs) noexcept {
    std::size_t n = 0;
    for (const segment& s : segs) {
        n += s.size;
    }
    return n;
}

// Throws loco::shape_error unless every segment lies inside an array of n elements.
inline void check_segments_inside(std::span<const segment> segs, std::size_t n,
                                  std::string_view who, std::string_view array) {
    for (const segment& s : segs) {
        if (s.offset > n || s.size > n - s.offset) {
            throw shape_error("loco::compress::" + std::string(who) + ": a segment [" +
                              std::to_string(s.offset) + ", +" + std::to_string(s.size) +
                              ") lies outside the " + std::string(array) + " of " +
                              std::to_string(n) + " elements");
        }
    }
}

// Throws loco::shape_error unless an output buffer holds exactly the payload's bytes.
inline void check_payload_buffer(std::size_t have, std::size_t want, std::string_view who) {
    if (have != want) {
        throw shape_error("loco::compress::" + std::string(who) + ": the output buffer holds " +
                          std::to_string(have) + " bytes, payload_bytes() is " +
                          std::to_string(want));
    }
}

// Whether C's state_size, if it has one, is >= 0: loco::diloco's sentence for what the concept
// below also refuses (a negative size became a huge residual array).
template <class C>
constexpr bool state_size_not_negative() {
    if constexpr (requires { { C::state_size } -> std::convertible_to<int>; }) {
        return C::state_size >= 0;
    } else {
        return true;
    }
}

template <class C>
concept compressor =
    requires {
        typename C::hyper;
        { C::name } -> std::convertible_to<std::string_view>;
        { C::wire_id } -> std::convertible_to<std::uint8_t>;
        { C::state_size } -> std::convertible_to<int>;
    } &&
    (C::state_size >= 0) &&  // floats of state per element (error feedback's residual: 1)
    requires(const typename C::hyper& h, std::span<const segment> segs, std::span<const float> x,
             std::span<float> state, const encode_context& ctx, std::span<std::byte> out,
             std::span<const std::byte> in, std::span<float> decoded) {
        { C::payload_bytes(h, segs) } -> std::convertible_to<std::size_t>;
        C::encode(h, x, segs, state, ctx, out);
        C::decode(h, in, segs, decoded);
    };

// Whether C's payload carries a non-finite input through to the receivers' decode, so that the
// aggregate (or a robust aggregation, which leaves such a worker out) shows it. True unless C
// says otherwise: DeMo's signs carry one bit a value. Where it does not, the handle reads the
// residual a rank would commit to find one (diloco.hpp).
template <class C>
constexpr bool carries_nonfinite(const typename C::hyper& h) {
    if constexpr (requires { C::carries_nonfinite(h); }) {
        return C::carries_nonfinite(h);
    } else {
        return true;
    }
}

}  // namespace loco::compress
