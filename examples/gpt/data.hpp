#pragma once
// The text the model learns, as bytes, split once into a training and a validation part.
//
//   fortunes  the English text of Debian's `fortunes` package (/usr/share/games/fortunes): every
//             regular file there except the .dat indices (the .u8 names are symbolic links and
//             skipped too), in sorted file-name order, byte for byte, `%` separator lines kept.
//             Of each file the first 90% goes to training and the last 10% to validation, so
//             both parts hold the same mix of topics.
//   markov    a random order-2 Markov chain over a small alphabet ('a', 'b', ...): its entropy
//             rate, the lowest loss any model can reach, is computed exactly from the chain's
//             stationary distribution, so a run reports how far it is from that floor.
//
// Each of the M workers draws its training windows from its own contiguous 1/M of the training
// part; validation uses fixed, evenly spaced windows of the validation part.

#include <loco/error.hpp>
#include <loco/random.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace gpt {

struct corpus {
    std::string description;
    std::vector<std::uint8_t> train;
    std::vector<std::uint8_t> validation;
    std::optional<double> entropy_floor;  // nats per byte, when known (markov)
};

inline constexpr const char* default_fortunes_dir = "/usr/share/games/fortunes";
inline constexpr double validation_fraction = 0.1;

// Appends the first 90% of `text` to train and the rest to validation.
// Where split_into cuts `size` bytes: the training part is [0, cut), the validation part the rest.
inline std::size_t training_bytes(std::size_t size) {
    return size - static_cast<std::size_t>(static_cast<double>(size) * validation_fraction);
}

inline void split_into(corpus& c, const std::vector<std::uint8_t>& text) {
    const auto cut = training_bytes(text.size());
    c.train.insert(c.train.end(), text.begin(), text.begin() + static_cast<std::ptrdiff_t>(cut));
    c.validation.insert(c.validation.end(), text.begin() + static_cast<std::ptrdiff_t>(cut),
                        text.end());
}

inline corpus load_fortunes(const std::filesystem::path& dir) {
    namespace fs = std::filesystem;
    const std::string install = "; install it with `apt-get install fortunes` (or "
                                "./scripts/install-deps), or train on --data markov";
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) {
        throw loco::invalid_argument("gpt: the fortunes corpus is not at " + dir.string() +
                                     install);
    }
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
        const fs::path& p = entry.path();
        // symlink_status: the .u8 names are links to the text files and would count them twice.
        if (fs::is_regular_file(fs::symlink_status(p)) && p.extension() != ".dat" &&
            p.extension() != ".u8") {
            files.push_back(p);
        }
    }
    if (ec || files.empty()) {
        throw loco::invalid_argument("gpt: no fortune files could be listed in " + dir.string() +
                                     install);
    }
    std::sort(files.begin(), files.end(),
              [](const fs::path& a, const fs::path& b) { return a.filename() < b.filename(); });
    corpus c;
    for (const fs::path& p : files) {
        std::ifstream in(p, std::ios::binary);
        if (!in.is_open()) {
            throw loco::invalid_argument("gpt: cannot open " + p.string() + install);
        }
        std::vector<std::uint8_t> text((std::istreambuf_iterator<char>(in)),
                                       std::istreambuf_iterator<char>());
        if (in.bad()) {
            throw loco::invalid_argument("gpt: cannot read " + p.string() + install);
        }
        split_into(c, text);
    }
    c.description = "fortunes (" + std::to_string(files.size()) + " files in " + dir.string() +
                    ", " + std::to_string(c.train.size() + c.validation.size()) + " bytes)";
    return c;
}

// ---- the Markov source ----------------------------------------------------------------------

// A uniform double in [0, 1) from the top 53 bits: the same on every standard library.
inline double uniform01(std::mt19937_64& rng) {
    return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

// next[(a * A + b) * A + c] = P(c | previous two symbols a, b), every entry positive (a normal,
// not a subnormal, double: make_markov_chain refuses a sharpness that would take one below).
struct markov_chain {
    std::size_t alphabet = 0;
    std::vector<double> next;
    std::vector<double> stationary;  // over the A^2 pair states (a, b), index a * A + b
    double entropy_rate = 0.0;       // nats per symbol
};

// The stationary distribution of the pair chain (a, b) -> (b, c), by the GTH algorithm
// (Grassmann, Taksar and Heyman: Gaussian elimination that only adds and multiplies positive
// numbers, the diagonal taken as the sum of the row's other entries). The chain is irreducible
// because every transition has positive probability, so the solution is unique; GTH finds it to
// a few ulps in every entry even when the chain is nearly reducible (a large sharpness: almost
// deterministic rows), where plain elimination of pi (Q - I) = 0 cancels and returned negative
// or wholly wrong probabilities (sharpness 20 over 2 symbols).
inline std::vector<double> stationary_distribution(const markov_chain& m) {
    const std::size_t a_len = m.alphabet, s = a_len * a_len;
    std::vector<double> q(s * s, 0.0);  // q[i * s + j]: P(pair state i -> pair state j)
    for (std::size_t a = 0; a < a_len; ++a) {
        for (std::size_t b = 0; b < a_len; ++b) {
            for (std::size_t c = 0; c < a_len; ++c) {
                q[(a * a_len + b) * s + b * a_len + c] = m.next[(a * a_len + b) * a_len + c];
            }
        }
    }
    // Censor the states s - 1, s - 2, ..., 1 one by one: the chain watched only on the states
    // below n, its transitions through n folded in.
    for (std::size_t n = s - 1; n >= 1; --n) {
        double leave = 0.0;  // P(n -> a state below n), > 0 in an irreducible chain
        for (std::size_t j = 0; j < n; ++j) leave += q[n * s + j];
        for (std::size_t i = 0; i < n; ++i) q[i * s + n] /= leave;
        for (std::size_t i = 0; i < n; ++i) {
            const double via = q[i * s + n];
            if (via == 0.0) continue;
            for (std::size_t j = 0; j < n; ++j) q[i * s + j] += via * q[n * s + j];
        }
    }
    std::vector<double> pi(s, 0.0);
    pi[0] = 1.0;
    double total = 1.0;
    for (std::size_t j = 1; j < s; ++j) {
        for (std::size_t i = 0; i < j; ++i) pi[j] += pi[i] * q[i * s + j];
        total += pi[j];
    }
    for (double& p : pi) p /= total;
    return pi;
}

// The transition rows at `sharpness` from the normal draws z (alphabet per row): softmax(sharpness
// * z) of each row, written to `next`. Returns the smallest probability.
inline double markov_rows(std::size_t alphabet, double sharpness, const std::vector<double>& z,
                          std::vector<double>& next) {
    next.resize(z.size());
    for (std::size_t first = 0; first < z.size(); first += alphabet) {
        const double* draws = z.data() + first;
        double* row = next.data() + first;
        // The row's largest draw is subtracted: every exp is at most 1 (no overflow to inf) and
        // the sum at least 1.
        const double hi = *std::max_element(draws, draws + alphabet);
        double sum = 0.0;
        for (std::size_t c = 0; c < alphabet; ++c) {
            row[c] = std::exp(sharpness * (draws[c] - hi));
            sum += row[c];
        }
        for (std::size_t c = 0; c < alphabet; ++c) row[c] /= sum;
    }
    return *std::min_element(next.begin(), next.end());
}

// A chain whose transition rows are softmax(sharpness * standard normal): larger sharpness, lower
// entropy. Deterministic in the seed. Refuses a sharpness at which a row's smallest probability,
// exp(-sharpness * (its largest draw - its smallest)) / (the row's sum), is not a normal double
// (over 16 symbols that is past a sharpness of 110 to 130, by the seed), naming the largest whole
// sharpness this chain takes.
inline markov_chain make_markov_chain(std::size_t alphabet, double sharpness, std::uint64_t seed) {
    if (alphabet < 2 || alphabet > 32) {
        throw loco::invalid_argument("gpt: --markov-alphabet must be between 2 and 32, got " +
                                     std::to_string(alphabet));
    }
    if (!std::isfinite(sharpness) || sharpness < 0.0) {
        throw loco::invalid_argument("gpt: --markov-sharpness must be a finite number >= 0");
    }
    markov_chain m;
    m.alphabet = alphabet;
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    std::vector<double> z(alphabet * alphabet * alphabet);
    for (double& v : z) v = normal(rng);
    const auto takes = [&](double s) {
        std::vector<double> rows;
        return markov_rows(alphabet, s, z, rows) >= std::numeric_limits<double>::min();
    };
    if (!(markov_rows(alphabet, sharpness, z, m.next) >= std::numeric_limits<double>::min())) {
        // The largest whole sharpness the chain takes, found by bisection: the smallest
        // probability falls as the sharpness grows. With w the widest row's (largest draw -
        // smallest) and L = -log(DBL_MIN), it lies between (L - log(alphabet)) / w (every row's
        // smallest probability is at least exp(-sharpness * w) / alphabet) and L / w (that row's
        // is at most exp(-sharpness * w)).
        double widest = 0.0;
        for (std::size_t first = 0; first < z.size(); first += alphabet) {
            const double* row = z.data() + first;
            const auto [lo, hi] = std::minmax_element(row, row + alphabet);
            widest = std::max(widest, *hi - *lo);
        }
        const double l = -std::log(std::numeric_limits<double>::min());
        double taken = std::floor((l - std::log(static_cast<double>(alphabet))) / widest);
        while (taken > 0.0 && !takes(taken)) taken -= 1.0;  // (rounding; not expected)
        // A whole number at least `sharpness` is refused too.
        double refused = std::ceil(std::min(sharpness, l / widest + 1.0));
        if (takes(refused)) refused = std::ceil(sharpness);  // (rounding; not expected)
        while (refused - taken > 1.0) {
            const double mid = std::floor(taken + (refused - taken) / 2.0);
            if (mid <= taken || mid >= refused) break;  // (beyond 2^53: no whole number between)
            if (takes(mid)) {
                taken = mid;
            } else {
                refused = mid;
            }
        }
        char text[256];
        std::snprintf(text, sizeof text,
                      "gpt: --markov-sharpness %g makes transition probabilities of this chain "
                      "underflow to zero; use at most %.0f with this --markov-alphabet and --seed",
                      sharpness, taken);
        throw loco::invalid_argument(text);
    }
    m.stationary = stationary_distribution(m);
    // H = sum over pair states of pi(s) * H(next symbol | s); 0 log 0 = 0.
    for (std::size_t s = 0; s < alphabet * alphabet; ++s) {
        double h = 0.0;
        for (std::size_t c = 0; c < alphabet; ++c) {
            const double p = m.next[s * alphabet + c];
            if (p > 0.0) h -= p * std::log(p);
        }
        m.entropy_rate += m.stationary[s] * h;
    }
    return m;
}

// `length` symbols of the chain, started in its stationary distribution, as the bytes 'a', 'b', ...
inline std::vector<std::uint8_t> sample_markov(const markov_chain& m, std::size_t length,
                                               std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const std::size_t a_len = m.alphabet;
    const auto draw = [&](const double* p, std::size_t count) {
        double u = uniform01(rng);
        for (std::size_t i = 0; i + 1 < count; ++i) {
            if (u < p[i]) return i;
            u -= p[i];
        }
        return count - 1;
    };
    std::size_t state = draw(m.stationary.data(), a_len * a_len);
    std::vector<std::uint8_t> out;
    out.reserve(length);
    for (std::size_t i = 0; i < length; ++i) {
        const std::size_t c = draw(m.next.data() + state * a_len, a_len);
        out.push_back(static_cast<std::uint8_t>('a' + c));
        state = (state % a_len) * a_len + c;
    }
    return out;
}

// The Markov source draws from seeds of its own, derived from --seed: the model's initialisation
// (mt19937_64(seed), model.hpp) and the workers' window samplers (seed * 1000003 + rank,
// trainer.hpp) draw from --seed too, and the same generator would have made the chain's logits
// the first weights of the embedding over 0.02, and (at --seed 0) worker 1's window positions the
// sample's symbol draws.
inline std::uint64_t markov_chain_seed(std::uint64_t seed) {
    return loco::random::mix64(seed ^ 0x6d61726b6f762d63ULL);  // "markov-c"
}
inline std::uint64_t markov_sample_seed(std::uint64_t seed) {
    return loco::random::mix64(seed ^ 0x6d61726b6f762d73ULL);  // "markov-s"
}

// The chain --data markov trains on under --seed `seed`.
inline markov_chain markov_source(std::size_t alphabet, double sharpness, std::uint64_t seed) {
    return make_markov_chain(alphabet, sharpness, markov_chain_seed(seed));
}

inline corpus make_markov_corpus(std::size_t alphabet, double sharpness, std::size_t length,
                                 std::uint64_t seed) {
    const markov_chain m = markov_source(alphabet, sharpness, seed);
    corpus c;
    split_into(c, sample_markov(m, length, markov_sample_seed(seed)));
    c.entropy_floor = m.entropy_rate;
    c.description = "markov (order 2, " + std::to_string(alphabet) + " symbols, " +
                    std::to_string(length) + " bytes, entropy rate " +
                    std::to_string(m.entropy_rate) + " nats/byte)";
    return c;
}

// ---- windows --------------------------------------------------------------------------------

// Refuses a split too short for one window of context + 1 bytes.
inline void check_fits(std::size_t bytes, std::size_t context, const std::string& what) {
    if (bytes < context + 1) {
        throw loco::invalid_argument("gpt: " + what + " holds " + std::to_string(bytes) +
                                     " bytes, fewer than --context + 1 = " +
                                     std::to_string(context + 1) +
                                     "; use a shorter --context, fewer --workers or more data");
    }
}
inline void check_fits(std::span<const std::uint8_t> part, std::size_t context,
                       const std::string& what) {
    check_fits(part.size(), context, what);
}

// Worker `rank` of `workers`: its contiguous share of the training part.
inline std::size_t shard_bytes(std::size_t train, int workers) {
    return train / static_cast<std::size_t>(workers);
}
inline std::span<const std::uint8_t> shard(const corpus& c, int rank, int workers) {
    const std::size_t per = shard_bytes(c.train.size(), workers);
    return std::span<const std::uint8_t>(c.train).subspan(static_cast<std::size_t>(rank) * per, per);
}

// Random windows of one shard: tokens[t] = text[s + t], targets[t] = text[s + t + 1].
class window_sampler {
public:
    window_sampler(std::span<const std::uint8_t> text, std::size_t context, std::uint64_t seed)
        : text_(text), context_(context), rng_(seed) {}

    void fill(std::uint8_t* tokens, std::uint8_t* targets, std::size_t batch) {
        const std::size_t starts = text_.size() - context_;  // check_fits: at least 1
        for (std::size_t b = 0; b < batch; ++b) {
            const std::size_t s = static_cast<std::size_t>(rng_() % starts);
            std::copy_n(text_.data() + s, context_, tokens + b * context_);
            std::copy_n(text_.data() + s + 1, context_, targets + b * context_);
        }
    }

private:
    std::span<const std::uint8_t> text_;
    std::size_t context_;
    std::mt19937_64 rng_;
};

// `count` windows spread evenly over the validation part, the same for every run.
inline void validation_windows(std::span<const std::uint8_t> text, std::size_t context,
                               std::size_t count, std::vector<std::uint8_t>& tokens,
                               std::vector<std::uint8_t>& targets) {
    tokens.resize(count * context);
    targets.resize(count * context);
    const std::size_t last = text.size() - context - 1;
    for (std::size_t i = 0; i < count; ++i) {
        const std::size_t s = count == 1 ? 0 : i * last / (count - 1);
        std::copy_n(text.data() + s, context, tokens.data() + i * context);
        std::copy_n(text.data() + s + 1, context, targets.data() + i * context);
    }
}

}  // namespace gpt
