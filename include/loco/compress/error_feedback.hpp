#pragma once
// Error feedback around any compressor C (Stich et al., arXiv 1809.07599; Karimireddy et al.,
// arXiv 1901.09847): what compression dropped in one round is added back in the next, so the sum
// of what a worker sends tracks the sum of its pseudo-gradients within one quantization error
// (up to the fp32 rounding of e + s * delta each round).
// Per element, with residual e (zero at the start):
//
//   e = decay * e + s * delta          s = 1, or the outer lr with fold_outer_lr (MuLoCo's form)
//   send Q(e)                          Q = C's encoding
//   e = e - D(Q(e))                    D = C's decoding, exactly what the receivers decode
//
// The default is the classic unscaled form (decay 1, s = 1). MuLoCo (quantized_outer_sgd.py)
// folds the outer learning rate into the buffer (s = outer lr) with decay 0.9: the outer optimizer
// then multiplies by the lr a second time, so its effective step scales with lr^2 and the outer lr
// must be tuned in that parametrisation (algorithms.md section 4.3).
//
// The payloads are C's own (same wire_id and layout); the residual is the first of this
// compressor's state arrays, C's own state follows.

#include <loco/compress/compressor.hpp>
#include <loco/detail/text_stream.hpp>
#include <loco/error.hpp>
#include <loco/policy.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace loco::compress {
namespace detail {

struct error_feedback_word {
    static constexpr std::string_view value = "error_feedback";
};

}  // namespace detail

template <class C>
struct error_feedback {
    static_assert(compressor<C>,
                  "loco: error_feedback<C> needs a loco compressor C; see docs/compressors.md");

    using base = C;
    static constexpr std::string_view name =
        loco::detail::wrapped_name<detail::error_feedback_word, C>::value;
    static constexpr std::uint8_t wire_id = C::wire_id;
    static constexpr int state_size = 1 + C::state_size;

    struct hyper {
        typename C::hyper compress{};
        float decay = 1.0f;          // MuLoCo: 0.9
        bool fold_outer_lr = false;  // MuLoCo: true
    };

    static constexpr bool carries_nonfinite(const hyper& h) {
        return compress::carries_nonfinite<C>(h.compress);
    }

    // What must match between ranks and checkpoints, the inner compressor's settings included.
    static std::string describe(const hyper& h) {
        ::loco::detail::text_stream os;
        os.precision(9);
        // describe_policy: a wrapped compressor with settings must describe them too (its name
        // alone, the text for one without settings, is what `name` holds).
        os << "error_feedback<" << ::loco::detail::describe_policy<C>(h.compress) << ">";
        os << " decay=" << h.decay << " fold_outer_lr=" << h.fold_outer_lr;
        return os.str();
    }

    static void validate(const hyper& h) {
        if (!(h.decay >= 0.0f && h.decay <= 1.0f)) {
            throw invalid_argument("loco::compress::error_feedback: decay must be in [0, 1]");
        }
        loco::detail::validate_hyper<C>(h.compress);
    }

    static std::size_t payload_bytes(const hyper& h, std::span<const segment> segs) {
        return C::payload_bytes(h.compress, segs);
    }

    // Checks everything before it writes: a refused call leaves the residual as it was.
    static void encode(const hyper& h, std::span<const float> x, std::span<const segment> segs,
                       std::span<float> state, const encode_context& ctx, std::span<std::byte> out) {
        validate(h);
        const std::size_t n = x.size();
        check_segments_inside(segs, n, name, "input");
        check_payload_buffer(out.size(), payload_bytes(h, segs), name);
        if (state.size() < n) {
            throw shape_error("loco::compress::" + std::string(name) + ": the state holds " +
                              std::to_string(state.size()) + " floats, the residual needs " +
                              std::to_string(n));
        }
        const std::span<float> residual = state.first(n);
        const std::span<float> base_state = state.subspan(n);
        const float scale = h.fold_outer_lr ? ctx.outer_lr : 1.0f;
        // decay * e + s * delta, kept aside until C has written the payload.
        std::vector<float> e(n, 0.0f);
        for (const segment& s : segs) {
            for (std::size_t i = s.offset; i < s.offset + s.size; ++i) {
                e[i] = h.decay * residual[i] + scale * x[i];
            }
        }
        C::encode(h.compress, e, segs, base_state, ctx, out);
        // Subtract exactly what the receivers will decode.
        std::vector<float> sent(n, 0.0f);
        C::decode(h.compress, out, segs, sent);
        for (const segment& s : segs) {
            for (std::size_t i = s.offset; i < s.offset + s.size; ++i) {
                residual[i] = e[i] - sent[i];
            }
        }
    }

    static void decode(const hyper& h, std::span<const std::byte> in, std::span<const segment> segs,
                       std::span<float> out) {
        C::decode(h.compress, in, segs, out);
    }

    // C's, where C can tell which elements a payload carries (the payloads are C's own): without
    // it the exchange took error_feedback<topk>'s payloads as dense.
    static void decode_support(const hyper& h, std::span<const std::byte> in,
                               std::span<const segment> segs, std::span<std::uint8_t> sent)
        requires requires(const typename C::hyper& ch, std::span<const std::byte> bytes,
                          std::span<const segment> ss, std::span<std::uint8_t> flags) {
            C::decode_support(ch, bytes, ss, flags);
        }
    {
        C::decode_support(h.compress, in, segs, sent);
    }
};

}  // namespace loco::compress
