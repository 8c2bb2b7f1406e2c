#pragma once
// The shape of the model: a decoder-only transformer over bytes (GPT-2's layout, smaller).
// Everything that is sized from it (parameters, activations) is counted here with overflow
// checks, so that a command line asking for an impossible model fails with a sentence, not a
// bad_alloc or a wrapped size.

#include <loco/error.hpp>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

namespace gpt {

struct model_config {
    std::size_t vocab = 256;   // byte-level: every byte is a token
    std::size_t context = 128; // T, the longest sequence the model sees
    std::size_t dim = 128;     // C, the width of the residual stream
    std::size_t layers = 5;    // L, transformer blocks
    std::size_t heads = 4;     // attention heads; dim must be a multiple of it
    bool tied = false;         // the output head reuses the token embedding
};

// a * b, or a thrown invalid_argument naming `what` when it does not fit a size_t.
inline std::size_t checked_mul(std::size_t a, std::size_t b, const char* what) {
    if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a) {
        throw loco::invalid_argument(std::string("gpt: the ") + what +
                                     " of this configuration overflows a 64-bit count; use a "
                                     "smaller --dim, --layers, --context or --batch");
    }
    return a * b;
}
inline std::size_t checked_add(std::size_t a, std::size_t b, const char* what) {
    if (b > std::numeric_limits<std::size_t>::max() - a) {
        throw loco::invalid_argument(std::string("gpt: the ") + what +
                                     " of this configuration overflows a 64-bit count; use a "
                                     "smaller --dim, --layers, --context or --batch");
    }
    return a + b;
}

// Parameters of one block: two layer norms (gain, bias), the qkv and output projections of
// attention, and the two layers of the MLP (hidden width 4C), each with a bias.
inline std::size_t block_parameters(const model_config& c) {
    const char* what = "parameter count";
    const std::size_t c2 = checked_mul(c.dim, c.dim, what);
    const std::size_t matrices = checked_mul(c2, 12, what);  // 3C^2 + C^2 + 4C^2 + 4C^2
    const std::size_t vectors = checked_mul(c.dim, 13, what); // 4 norm + 3C + C + 4C + C biases
    return checked_add(matrices, vectors, what);
}

inline std::size_t parameter_count(const model_config& c) {
    const char* what = "parameter count";
    std::size_t n = checked_mul(c.vocab, c.dim, what);             // token embedding
    n = checked_add(n, checked_mul(c.context, c.dim, what), what); // position embedding
    n = checked_add(n, checked_mul(block_parameters(c), c.layers, what), what);
    n = checked_add(n, checked_mul(c.dim, 2, what), what);  // final layer norm
    if (!c.tied) {
        n = checked_add(n, checked_mul(c.vocab, c.dim, what), what);
    }
    return n;
}

// Refuses a shape the model cannot have, with the flag to change.
inline void validate(const model_config& c) {
    if (c.vocab < 2 || c.vocab > 256) {
        throw loco::invalid_argument("gpt: the vocabulary must hold 2 to 256 byte tokens");
    }
    if (c.context < 1 || c.dim < 1 || c.layers < 1 || c.heads < 1) {
        throw loco::invalid_argument(
            "gpt: --context, --dim, --layers and --heads must all be at least 1");
    }
    if (c.dim % c.heads != 0) {
        throw loco::invalid_argument("gpt: --dim " + std::to_string(c.dim) +
                                     " is not a multiple of --heads " + std::to_string(c.heads));
    }
    const std::size_t n = parameter_count(c);
    // Every parameter is a float in a std::vector (and so are its gradient and the optimizer's
    // copies): past 2^40 parameters no host holds it, and the offsets loco keeps stay exact.
    if (n > (std::size_t{1} << 40)) {
        throw loco::invalid_argument("gpt: " + std::to_string(n) +
                                     " parameters is more than this host trainer can hold; "
                                     "use a smaller --dim or --layers");
    }
}

// The largest activation arrays of a step of `batch` sequences (the MLP's N x 4C and the
// attention weights, batch x heads x T x T) must be countable too.
inline void check_activations(const model_config& c, std::size_t batch) {
    const char* what = "activation size";
    const std::size_t n = checked_mul(batch, c.context, what);
    checked_mul(checked_mul(n, c.dim, what), 4 * c.layers, what);
    checked_mul(checked_mul(checked_mul(batch, c.heads, what), c.context, what),
                checked_mul(c.context, c.layers, what), what);
    checked_mul(n, c.vocab, what);
}

}  // namespace gpt
