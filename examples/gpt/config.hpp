#pragma once
// The shape of the model: a decoder-only transformer over bytes (GPT-2's layout, smaller).
// Everything that is sized from it (parameters, activations) is counted here with overflow
// checks, so that a command line asking for an impossible model fails with a sentence, not a
// bad_alloc or a wrapped size; and a model too large for the host's memory too (check_memory).

#include <loco/error.hpp>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

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

// About how many bytes one worker holds for a step of `batch` sequences: what the forward pass
// keeps for the backward one (per block 16 C values a token and the attention weights, batch x
// heads x T x T; the final norm and the logits), the backward pass's work arrays, attention's
// per-head T x T scratch, and the parameters, their gradient and an optimizer's state (about six
// copies of the model). Call check_activations first: the counts are then known to fit.
inline std::size_t step_bytes(const model_config& c, std::size_t batch) {
    const char* what = "activation size";
    const std::size_t n = checked_mul(batch, c.context, what);
    const std::size_t nd = checked_mul(n, c.dim, what);
    const std::size_t attn = checked_mul(checked_mul(checked_mul(batch, c.heads, what), c.context,
                                                     what), c.context, what);
    const std::size_t block = checked_add(checked_mul(nd, 16, what), attn, what);
    std::size_t floats = checked_mul(block, c.layers, what);
    floats = checked_add(floats, checked_mul(nd, 22, what), what);  // ln_f, backward arrays
    floats = checked_add(floats, checked_mul(n, c.vocab, what), what);  // the logits
    floats = checked_add(floats, checked_mul(checked_mul(c.context, c.context, what), 4, what),
                         what);
    floats = checked_add(floats, checked_mul(parameter_count(c), 6, what), what);
    return checked_mul(floats, sizeof(float), what);
}

// Refuses a run whose `workers` workers would need more than `host_bytes` for their steps
// (step_bytes): such a shape is countable but would end in a failed allocation, or in the
// kernel's out-of-memory killer, instead of a sentence. host_bytes 0: unknown, nothing refused.
inline void check_memory(const model_config& c, std::size_t batch, std::size_t workers,
                         std::size_t host_bytes) {
    const char* what = "activation size";
    const std::size_t need = checked_mul(step_bytes(c, batch), workers, what);
    if (host_bytes != 0 && need > host_bytes) {
        const auto gib = [](std::size_t b) {
            return std::to_string((b + (std::size_t{1} << 30) - 1) >> 30);
        };
        throw loco::invalid_argument("gpt: " + std::to_string(workers) +
                                     " workers of this configuration need about " + gib(need) +
                                     " GiB for their activations and parameters, more than this "
                                     "host's " + gib(host_bytes) + " GiB of memory; use a smaller "
                                     "--context, --batch, --dim, --layers or fewer --workers");
    }
}

// The host's physical memory in bytes, 0 when the system does not say.
inline std::size_t host_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
    const long pages = sysconf(_SC_PHYS_PAGES);
    const long page = sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page > 0 &&
        static_cast<std::size_t>(pages) <=
            std::numeric_limits<std::size_t>::max() / static_cast<std::size_t>(page)) {
        return static_cast<std::size_t>(pages) * static_cast<std::size_t>(page);
    }
#endif
    return 0;
}

}  // namespace gpt
