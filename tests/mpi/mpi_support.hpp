#pragma once
// What the MPI test runner (tests/mpi/main.cpp) shares with the test cases.

#include <mpi.h>

#include <string>

namespace loco_mpi_test {

inline int world_rank() {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}
inline int world_size() {
    int s = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &s);
    return s;
}

// What loco::comm::mpi threw when built before MPI_Init ("" if nothing).
inline std::string message_before_init;

}  // namespace loco_mpi_test
