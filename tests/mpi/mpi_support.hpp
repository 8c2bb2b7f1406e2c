#pragma once
// What the MPI test runner (tests/mpi/main.cpp) shares with the test cases.

#include <string>

namespace loco_mpi_test {

// What loco::comm::mpi threw when built before MPI_Init ("" if nothing).
inline std::string message_before_init;

}  // namespace loco_mpi_test
