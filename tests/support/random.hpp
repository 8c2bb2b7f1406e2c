#pragma once
// Random test data. Each process draws one seed (or takes LOCO_TEST_SEED) and prints it, so every
// run checks fresh inputs and any failure can be repeated exactly.

#include <cstdint>
#include <cstdlib>
#include <random>
#include <span>
#include <string_view>
#include <vector>

namespace loco_test {

inline std::uint64_t process_seed() {
    static const std::uint64_t seed = [] {
        if (const char* s = std::getenv("LOCO_TEST_SEED")) {
            return static_cast<std::uint64_t>(std::strtoull(s, nullptr, 10));
        }
        return (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
    }();
    return seed;
}

// A generator for one test: the process seed mixed with a per-test label, so tests draw
// independent streams and a test's inputs do not depend on which other tests ran.
inline std::mt19937_64 rng_for(std::string_view label) {
    std::uint64_t h = 0xcbf29ce484222325ULL ^ process_seed();
    for (const char c : label) {
        h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
    }
    return std::mt19937_64(h);
}

inline std::vector<float> normal_floats(std::mt19937_64& rng, std::size_t n, float stddev = 1.0f,
                                        float mean = 0.0f) {
    std::normal_distribution<float> dist(mean, stddev);
    std::vector<float> v(n);
    for (auto& x : v) {
        x = dist(rng);
    }
    return v;
}

// The same draws written in place: for a gradient a handle holds a view of, which a vector
// assigned over it would free.
inline void fill_normal(std::mt19937_64& rng, std::span<float> out, float stddev = 1.0f,
                        float mean = 0.0f) {
    std::normal_distribution<float> dist(mean, stddev);
    for (auto& x : out) {
        x = dist(rng);
    }
}

}  // namespace loco_test
