// The runner of the MPI tests: every rank runs the same doctest cases (they call collectives, so
// the order matters and must be the same everywhere), with one random seed drawn by rank 0. Rank 0
// reports in full, the others only their failures; the exit code is the same on every rank, and the
// last line rank 0 prints says how many ranks passed and failed.
//
// Before MPI_Init and after MPI_Finalize, it checks that loco::comm::mpi refuses to be built with a
// clear error instead of crashing (the checks need a process where MPI is not running).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "mpi_support.hpp"

#include <loco/comm/mpi.hpp>
#include <loco/config.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

// The message of the comm_error a communicator built now throws, or "" when none is thrown.
std::string refusal() {
    try {
        loco::comm::mpi comm(MPI_COMM_WORLD);
    } catch (const loco::comm_error& e) {
        return e.what();
    }
    return "";
}

}  // namespace

int main(int argc, char** argv) {
    loco_mpi_test::message_before_init = refusal();

    if (MPI_Init(&argc, &argv) != MPI_SUCCESS) {
        std::fprintf(stderr, "mpi_test: MPI_Init failed\n");
        return 1;
    }
    int rank = 0;
    int size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    // One seed for every rank: the tests regenerate each other's inputs. Only rank 0 draws it;
    // the others take it through LOCO_TEST_SEED before their first process_seed().
    unsigned long long seed = rank == 0 ? loco_test::process_seed() : 0;
    MPI_Bcast(&seed, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
    setenv("LOCO_TEST_SEED", std::to_string(seed).c_str(), 1);
    if (loco_test::process_seed() != seed) {
        std::fprintf(stderr, "mpi_test rank %d: the seed was drawn before it was agreed\n", rank);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    if (rank == 0) {
        std::fprintf(stderr, "loco %s MPI tests on %d ranks, random seed %llu (LOCO_TEST_SEED=%llu "
                             "repeats this run)\n",
                     LOCO_VERSION_STRING, size, seed, seed);
    }

    doctest::Context context(argc, argv);
    if (rank != 0) {
        context.setOption("minimal", true);  // failures only
        context.setOption("no-colors", true);  // no stray escape codes in rank 0's lines
    }
    int failed = context.run() != 0 ? 1 : 0;
    if (context.shouldExit()) {  // --help, --list-test-cases, ...
        MPI_Finalize();
        return failed;
    }

    int failed_ranks = 0;
    MPI_Allreduce(&failed, &failed_ranks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Finalize();

    const std::string after = refusal();
    if (after.find("MPI has been finalized") == std::string::npos) {
        std::fprintf(stderr, "mpi_test rank %d: after MPI_Finalize, loco::comm::mpi was not refused "
                             "with a clear error (got \"%s\")\n", rank, after.c_str());
        failed = 1;
        failed_ranks = failed_ranks == 0 ? 1 : failed_ranks;
    }
    if (rank == 0) {
        std::printf("mpi_test: %d ranks, %d passed, %d failed\n", size, size - failed_ranks,
                    failed_ranks);
    }
    return failed_ranks == 0 ? 0 : 1;
}
