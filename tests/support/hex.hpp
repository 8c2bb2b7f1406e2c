#pragma once
// Checkpoint fixtures written by earlier loco builds are kept in the tests as hex text.

#include <cstddef>
#include <string>
#include <string_view>

namespace loco_test {

// The bytes spelled by `hex` (two lowercase or uppercase digits a byte; no separators).
inline std::string bytes_from_hex(std::string_view hex) {
    std::string bytes;
    bytes.reserve(hex.size() / 2);
    for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
        bytes.push_back(static_cast<char>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16)));
    }
    return bytes;
}

}  // namespace loco_test
