#pragma once
// MuLoCo's statistical quantizer (Thérien et al., arXiv 2505.23725; QuantizationCompressor and
// BatchedRowiseQuantizationCompressor in facebookresearch/MuLoCo quantized_outer_sgd.py): codes
// relative to the mean in units of the standard deviation, decoded through a table of the mean of
// each bin, so a code stands for the average of what it replaced.
//
// Definition, for each group of n elements x_i (granularity::tensor: the segment;
// granularity::row: each row of the segment seen as rows x (size / rows), row-major):
//
//   B     = 2^Bits bins
//   shift = (sum_i x_i) / n                                    -> fp32
//   c_i   = x_i - shift                                        (shift: the fp32 value)
//   sigma = sqrt(sum_i c_i^2 / (n - 1))                        (unbiased, like torch.var)
//   scale = range * sigma / B                                  -> fp32; 1 if that is 0, NaN or inf
//                                                                 (and for n = 1)
//   q_i   = clamp(round_half_to_even(c_i / scale + B/2), 0, B - 1)
//   lut_b = mean of c_i over the i with q_i = b; 0 for an empty bin   -> fp32
//   decode: x_i ~ lut[q_i] + shift
//
// Summation order. The three sums (sum_i x_i; sum_i c_i^2; per bin, sum of c_i and the count)
// are accumulated in double with c_i = double(x_i) - double(shift), in one fixed order that a
// GPU warp reproduces bit for bit (backend/cuda/compress.hpp), so that host and device payloads
// are the same bytes:
//   - the group splits into consecutive chunks of `chunk` = 2048 elements (the last may be
//     shorter);
//   - in a chunk, lane l (0 .. 31) sums the terms of elements l, l + 32, l + 64, ... of the chunk,
//     in that order, starting from 0.0;
//   - the 32 lane sums are combined by the butterfly of a warp's __shfl_xor_sync reduction: for
//     m = 16, 8, 4, 2, 1, every lane l takes s_l + s_(l xor m) (lane_tree below; addition
//     commutes, so both partners hold the same bits and s_0 is the result);
//   - the chunk sums are added in chunk order, starting from 0.0.
// No element's term depends on its position, only the rounding of the partial sums does; when
// every partial sum is exact (small integers, or values of a few nearby binades) the result is
// the element-order sum. Counts are integers and need no order. A product c * c is rounded
// before it is added: on the host when built with -ffp-contract=off (loco's programs are; GCC
// otherwise fuses it into an FMA wherever the target has one, docs/getting-started.md), on the
// device through __dmul_rn / __dadd_rn. shift, scale and lut are then
// rounded to fp32. The code of an element is computed in fp32 by code() below, t = (x_i -
// shift) / scale + B/2, and the decoded value is fp32 lut[q] + shift: these are the LOCO_HD
// functions a CUDA kernel shares. A group holding NaN or +-inf gets a NaN or infinite shift, all
// its codes are 0 (a NaN t counts as below the range) and it decodes to NaN: the non-finite value
// still reaches the receiver. A NaN shift or table entry is written as the quiet NaN 0x7fc00000,
// whatever NaN the arithmetic produced (x86 propagates an operand's payload and sign, a GPU
// produces its own canonical NaN), so the bytes do not depend on the machine.
//
// Error bound. Let S_b be the set of c_j of the group with code b. For an element with code b,
// |decode - x| <= max S_b - min S_b + 2^-22 * (|x| + |shift| + |lut_b|): lut_b is the mean of
// S_b, and the last term covers fp32 rounding. For the inner codes 0 < b < B - 1, S_b lies in a
// bin of width scale, so max S_b - min S_b <= scale * (1 + B * 2^-22) (the fp32 rounding of t
// may move an element across a bin edge by at most that much); the outer two bins collect
// everything below -(B/2 - 0.5) * scale and from (B/2 - 1.5) * scale up, which their means
// represent but do not bound.
//
// Wire header: bits = Bits, flags = per (0 tensor, 1 row), block = the fp32 bit pattern of
// range (a receiver with another range is refused, although decoding does not need it).
//
// Body, for each segment in order (n = its size; G groups: 0 if n = 0, else 1 per tensor or
// `rows` per row):
//   G records of 1 + B fp32: shift_g, lut_g[0], ..., lut_g[B - 1]
//   ceil(n * Bits / 8) bytes of codes, packed as wire.hpp describes (element i of the segment is
//     code i, rows one after the other), unused bits zero
//   zero bytes up to a multiple of 4, so that every fp32 of the body is 4-byte aligned
// Segment bytes: 4 * G * (1 + B) + 4 * ceil(ceil(n * Bits / 8) / 4).
//
// decode refuses, besides everything wire::open checks: a nonzero table entry for a bin no
// element uses; nonzero padding bits or bytes. Per row needs rows >= 1 dividing the segment's
// size (loco::shape_error otherwise).

#include <loco/compress/bin_code.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <sstream>
#include <string_view>

namespace loco::compress {

enum class granularity : std::uint8_t { tensor = 0, row = 1 };

template <int Bits>
struct statistical {
    static_assert(Bits == 1 || Bits == 2 || Bits == 4 || Bits == 8,
                  "loco::compress::statistical: Bits must be 1, 2, 4 or 8");

    static constexpr std::string_view name = "statistical";
    static constexpr std::uint8_t wire_id = 3;
    static constexpr int state_size = 0;

    struct hyper {
        granularity per = granularity::tensor;
        float range = 6.0f;  // MuLoCo's quantization_range
    };

    static constexpr unsigned bins = 1u << Bits;  // B

    // Name, bits and settings: what must match between ranks and checkpoints.
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        os << name << "<" << Bits << "> per=" << (h.per == granularity::tensor ? "tensor" : "row")
           << " range=" << h.range;
        return os.str();
    }

    static void validate(const hyper& h) {
        if (h.per != granularity::tensor && h.per != granularity::row) {
            throw invalid_argument("loco::compress::statistical: per must be tensor or row");
        }
        if (!(h.range > 0.0f) || !math::isfinite(h.range)) {
            throw invalid_argument(
                "loco::compress::statistical: range must be positive and finite");
        }
    }

    // ---- per element, shared with the CUDA kernels ----------------------------------------------

    // The bin rule of compress/bin_code.hpp with B = 2^Bits bins.
    LOCO_HD static unsigned code(float x, float shift, float scale) noexcept {
        return bin_code::code(x, shift, scale, bins);
    }

    LOCO_HD static float value(float lut_entry, float shift) noexcept {
        return bin_code::value(lut_entry, shift);
    }

    // ---- group statistics (host), in the summation order above -------------------------------

    static constexpr std::size_t chunk = 2048;  // elements per chunk; a power of two
    static constexpr unsigned lanes = 32;       // a warp
    static constexpr std::uint32_t nan_bits = 0x7fc00000u;  // the NaN written to payloads

    // The butterfly of a warp's xor-shuffle reduction: after the step of offset m, lane l holds
    // s_l + s_(l xor m) (what `v + __shfl_xor_sync(mask, v, m)` computes in every lane at once).
    static double lane_tree(std::array<double, lanes> s) noexcept {
        for (unsigned m = lanes / 2; m > 0; m /= 2) {
            std::array<double, lanes> t{};
            for (unsigned l = 0; l < lanes; ++l) {
                t[l] = s[l] + s[l ^ m];
            }
            s = t;
        }
        return s[0];
    }

    // sum over i < n of term(i), in the documented order.
    template <class Term>
    static double ordered_sum(std::size_t n, Term term) {
        double total = 0.0;
        for (std::size_t first = 0; first < n; first += chunk) {
            const std::size_t count = std::min(chunk, n - first);
            std::array<double, lanes> lane{};
            for (unsigned l = 0; l < lanes; ++l) {
                for (std::size_t i = l; i < count; i += lanes) {
                    lane[l] += term(first + i);
                }
            }
            total += lane_tree(lane);
        }
        return total;
    }

    LOCO_HD static float canonical(float v) noexcept {
        return v == v ? v : loco::detail::float_from_bits(nan_bits);
    }

    static float group_shift(const float* x, std::size_t n) {
        const double sum =
            ordered_sum(n, [x](std::size_t i) { return static_cast<double>(x[i]); });
        return static_cast<float>(sum / static_cast<double>(n));
    }

    static float group_scale(const float* x, std::size_t n, float shift, float range) {
        if (n < 2) {
            return 1.0f;  // the unbiased variance of one element is NaN
        }
        const double squares = ordered_sum(n, [x, shift](std::size_t i) {
            const double c = static_cast<double>(x[i]) - static_cast<double>(shift);
            return c * c;
        });
        return scale_of(squares, n, range);
    }

    // scale from the sum of squares (shared with the device's finishing kernel).
    LOCO_HD static float scale_of(double squares, std::size_t n, float range) noexcept {
        if (n < 2) {
            return 1.0f;
        }
        const double sigma = math::sqrt(squares / static_cast<double>(n - 1));
        const float scale = static_cast<float>(static_cast<double>(range) * sigma / bins);
        return scale == 0.0f || !math::isfinite(scale) ? 1.0f : scale;
    }

    // The per-bin sums of c and counts of a group, in the documented order; lut_b their mean.
    static std::array<float, bins> group_lut(const float* x, std::size_t n, float shift,
                                             float scale) {
        std::array<double, bins> sums{};
        std::array<std::size_t, bins> counts{};
        for (std::size_t first = 0; first < n; first += chunk) {
            const std::size_t count = std::min(chunk, n - first);
            std::array<std::array<double, lanes>, bins> lane{};
            for (unsigned l = 0; l < lanes; ++l) {
                for (std::size_t i = l; i < count; i += lanes) {
                    const float v = x[first + i];
                    const unsigned q = code(v, shift, scale);
                    lane[q][l] += static_cast<double>(v) - static_cast<double>(shift);
                    ++counts[q];
                }
            }
            for (unsigned b = 0; b < bins; ++b) {
                sums[b] += lane_tree(lane[b]);
            }
        }
        std::array<float, bins> lut{};
        for (unsigned b = 0; b < bins; ++b) {
            lut[b] = lut_entry(sums[b], counts[b]);
        }
        return lut;
    }

    LOCO_HD static float lut_entry(double sum, std::uint64_t count) noexcept {
        return count == 0 ? 0.0f
                          : canonical(static_cast<float>(sum / static_cast<double>(count)));
    }

    // ---- the compressor interface ---------------------------------------------------------------

    static std::size_t payload_bytes(const hyper& h, std::span<const segment> segs) {
        validate(h);
        return wire::header_bytes + body_bytes(h, segs);
    }

    static void encode(const hyper& h, std::span<const float> x, std::span<const segment> segs,
                       std::span<float>, const encode_context&, std::span<std::byte> out) {
        validate(h);
        check_encode_buffers(h, x, segs, out.size());
        std::fill(out.begin(), out.end(), std::byte{0});  // pack() ORs into zeroed bytes
        std::size_t at = wire::header_bytes;
        for (const segment& s : segs) {
            const std::size_t g = groups(h, s);
            std::byte* codes = out.data() + at + record_bytes * g;
            for (std::size_t r = 0; r < g; ++r) {
                const std::size_t first = r * (s.size / g);
                encode_group(h, x.data() + s.offset + first, s.size / g, out,
                             at + record_bytes * r, codes, first);
            }
            at += segment_bytes(h, s);
        }
        wire::write_header(out, expected_header(h, segs));
    }

    static void decode(const hyper& h, std::span<const std::byte> in, std::span<const segment> segs,
                       std::span<float> out) {
        validate(h);
        check_decode_buffer(h, segs, out.size());
        const std::span<const std::byte> body = wire::open(in, expected_header(h, segs), name);
        std::size_t at = 0;
        for (const segment& s : segs) {
            check_segment(body.subspan(at, segment_bytes(h, s)), s.size, groups(h, s));
            at += segment_bytes(h, s);
        }
        at = 0;
        for (const segment& s : segs) {
            decode_segment(body.subspan(at, segment_bytes(h, s)), groups(h, s),
                           out.subspan(s.offset, s.size));
            at += segment_bytes(h, s);
        }
    }

    // ---- layout ---------------------------------------------------------------------------------

    static constexpr std::size_t record_bytes = 4 * (1 + bins);

    static constexpr std::size_t code_bytes(std::size_t n) noexcept {
        return (wire::packed_bytes<Bits>(n) + 3) / 4 * 4;
    }

    // Groups of a segment; per row, the segment must split into `rows` equal rows.
    static std::size_t groups(const hyper& h, const segment& s) {
        if (s.size == 0) {
            return 0;
        }
        if (h.per == granularity::tensor) {
            return 1;
        }
        if (s.rows == 0 || s.size % s.rows != 0) {
            throw shape_error("loco::compress::statistical: per-row quantization of a segment of " +
                              std::to_string(s.size) + " elements in " + std::to_string(s.rows) +
                              " rows");
        }
        return s.rows;
    }

    static std::size_t segment_bytes(const hyper& h, const segment& s) {
        return record_bytes * groups(h, s) + code_bytes(s.size);
    }

private:
    static std::size_t body_bytes(const hyper& h, std::span<const segment> segs) {
        std::size_t n = 0;
        for (const segment& s : segs) {
            n += segment_bytes(h, s);
        }
        return n;
    }

    static wire::header expected_header(const hyper& h, std::span<const segment> segs) {
        wire::header w;
        w.compressor = wire_id;
        w.bits = static_cast<std::uint8_t>(Bits);
        w.flags = static_cast<std::uint8_t>(h.per);
        w.block = loco::detail::float_bits(h.range);
        w.segments = static_cast<std::uint32_t>(segs.size());
        for (const segment& s : segs) {
            w.elements += s.size;
        }
        w.body_bytes = body_bytes(h, segs);
        return w;
    }

    static void check_encode_buffers(const hyper& h, std::span<const float> x,
                                     std::span<const segment> segs, std::size_t out_bytes) {
        for (const segment& s : segs) {
            if (s.offset > x.size() || s.size > x.size() - s.offset) {
                throw shape_error("loco::compress::statistical: a segment lies outside the input");
            }
        }
        if (out_bytes != wire::header_bytes + body_bytes(h, segs)) {
            throw shape_error("loco::compress::statistical: the output buffer holds " +
                              std::to_string(out_bytes) + " bytes, payload_bytes() is " +
                              std::to_string(wire::header_bytes + body_bytes(h, segs)));
        }
    }

    static void check_decode_buffer(const hyper& h, std::span<const segment> segs,
                                    std::size_t out_size) {
        for (const segment& s : segs) {
            if (s.offset > out_size || s.size > out_size - s.offset) {
                throw shape_error("loco::compress::statistical: a segment lies outside the output");
            }
            groups(h, s);
        }
    }

    // One group: its record at `record` and its codes at codes[first ..].
    static void encode_group(const hyper& h, const float* x, std::size_t n,
                             std::span<std::byte> out, std::size_t record, std::byte* codes,
                             std::size_t first) {
        const float shift = group_shift(x, n);
        const float scale = group_scale(x, n, shift, h.range);
        for (std::size_t i = 0; i < n; ++i) {
            wire::pack<Bits>(codes, first + i, code(x[i], shift, scale));
        }
        const std::array<float, bins> lut = group_lut(x, n, shift, scale);
        wire::put<float>(out, record, canonical(shift));
        for (unsigned b = 0; b < bins; ++b) {
            wire::put<float>(out, record + 4 * (1 + b), lut[b]);
        }
    }

    [[noreturn]] static void refuse(const std::string& what) {
        throw wire_error("loco::compress::statistical: malformed payload: " + what);
    }

    static void check_segment(std::span<const std::byte> bytes, std::size_t n, std::size_t g) {
        const std::byte* codes = bytes.data() + record_bytes * g;
        for (std::size_t r = 0; r < g; ++r) {
            std::array<bool, bins> used{};
            for (std::size_t i = r * (n / g); i < (r + 1) * (n / g); ++i) {
                used[wire::unpack<Bits>(codes, i)] = true;
            }
            for (unsigned b = 0; b < bins; ++b) {
                const float entry = wire::get<float>(bytes, record_bytes * r + 4 * (1 + b));
                if (!used[b] && loco::detail::float_bits(entry) != 0) {
                    refuse("a nonzero table entry for an unused bin");
                }
            }
        }
        constexpr std::size_t per_byte = 8 / Bits;
        for (std::size_t i = n; i < wire::packed_bytes<Bits>(n) * per_byte; ++i) {
            if (wire::unpack<Bits>(codes, i) != 0) {
                refuse("nonzero padding bits after the last code");
            }
        }
        for (std::size_t i = wire::packed_bytes<Bits>(n); i < code_bytes(n); ++i) {
            if (codes[i] != std::byte{0}) {
                refuse("nonzero alignment padding");
            }
        }
    }

    static void decode_segment(std::span<const std::byte> bytes, std::size_t g,
                               std::span<float> out) noexcept {
        const std::byte* codes = bytes.data() + record_bytes * g;
        for (std::size_t i = 0; i < out.size(); ++i) {
            const std::size_t record = record_bytes * (i / (out.size() / g));
            const float shift = wire::get<float>(bytes, record);
            const unsigned q = wire::unpack<Bits>(codes, i);
            out[i] = value(wire::get<float>(bytes, record + 4 * (1 + q)), shift);
        }
    }
};

static_assert(compressor<statistical<2>>);

}  // namespace loco::compress
