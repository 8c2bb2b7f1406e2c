#pragma once
// The exceptions loco throws. Every one of them is thrown before anything the user owns is
// modified, so catching it leaves parameters, gradients and the optimizer state as they were.

#include <stdexcept>
#include <string>

namespace loco {

// Base of everything loco throws; catch this to handle any loco failure.
struct error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A hyper-parameter or argument outside its valid range (negative learning rate, H = 0, ...).
struct invalid_argument : error {
    using error::error;
};

// Tensors whose sizes or shapes do not fit together (value vs gradient, checkpoint vs model).
struct shape_error : error {
    using error::error;
};

// A tensor in the wrong memory space for the call (CUDA memory given to a host-only path, or
// the reverse).
struct memory_space_error : error {
    using error::error;
};

// A gradient or an averaged pseudo-gradient holding NaN or infinity, under
// nonfinite_policy::raise.
struct nonfinite_error : error {
    using error::error;
};

// A collective that could not complete: peers disagree on the call, a peer did not arrive before
// the timeout, or the group was aborted.
struct comm_error : error {
    using error::error;
};

// A compressed payload received from a peer that is truncated, oversized, corrupted, or encoded with
// other settings than the receiver's. Nothing is decoded from it.
struct wire_error : error {
    using error::error;
};

// A checkpoint stream that is truncated, corrupted, or saved from a different model, policy or
// worker.
struct checkpoint_error : error {
    using error::error;
};

}  // namespace loco
