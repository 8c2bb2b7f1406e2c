#pragma once
// A counter-based random number generator: the value for (seed, stream, index) is a pure function
// of those three numbers, so a host loop and a CUDA kernel produce the same draws in any order and
// a run is reproducible per seed. Used for stochastic rounding.

#include <loco/config.hpp>

#include <cstdint>

namespace loco::random {

// The splitmix64 finaliser: a bijection on 64-bit words with good avalanche.
LOCO_HD std::uint64_t mix64(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// 64 random bits for element `index` of stream `stream` under `seed`.
LOCO_HD std::uint64_t bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
    return mix64(mix64(seed ^ mix64(stream + 0x9e3779b97f4a7c15ULL)) + index);
}

// A uniform float in [0, 1) with 24 random bits (every float step of that range is equally likely).
LOCO_HD float uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
    return static_cast<float>(bits(seed, stream, index) >> 40) * 0x1.0p-24f;
}

}  // namespace loco::random
