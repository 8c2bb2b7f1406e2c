#pragma once
// The message of what a call throws, for tests that compare a whole error sentence.

#include <exception>
#include <string>

namespace loco_test {

// What fn throws (any std::exception), or "" when it does not throw.
template <class Fn>
std::string error_of(Fn&& fn) {
    try {
        fn();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "";
}

}  // namespace loco_test
