// The runner of the MPI tests: every rank runs the same doctest cases (they call collectives, so
// the order matters and must be the same everywhere), with one random seed drawn by rank 0. Rank 0
// reports in full, the others only their failures; the exit code is the same on every rank, and the
// last line rank 0 prints says how many ranks passed and failed.
//
// Before MPI_Init and after MPI_Finalize, it checks that loco::comm::mpi refuses to be built with a
// clear error instead of crashing (the checks need a process where MPI is not running), and that a
// request its communicator outlived past MPI_Finalize throws instead of touching freed memory (and
// one finished after MPI_Finalize, its communicator alive, throws instead of calling MPI).
//
// MPI is initialised with MPI_THREAD_SERIALIZED, what loco needs to finish a request on another
// thread; LOCO_MPI_TEST_THREAD_LEVEL=single|funneled|serialized|multiple asks for another level
// (below serialized, the thread tests check that calls from other threads are refused without
// consuming the request; mpi.np2.funneled runs them).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "mpi_support.hpp"

#include <loco/comm/mpi.hpp>
#include <loco/config.hpp>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

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

int requested_thread_level() {
    const char* env = std::getenv("LOCO_MPI_TEST_THREAD_LEVEL");
    const std::string level = env != nullptr ? env : "serialized";
    if (level == "single") return MPI_THREAD_SINGLE;
    if (level == "funneled") return MPI_THREAD_FUNNELED;
    if (level == "multiple") return MPI_THREAD_MULTIPLE;
    return MPI_THREAD_SERIALIZED;
}

}  // namespace

int main(int argc, char** argv) {
    loco_mpi_test::message_before_init = refusal();

    int provided = MPI_THREAD_SINGLE;
    if (MPI_Init_thread(&argc, &argv, requested_thread_level(), &provided) != MPI_SUCCESS) {
        std::fprintf(stderr, "mpi_test: MPI_Init_thread failed\n");
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
        std::fprintf(stderr, "loco %s MPI tests on %d ranks, MPI thread level %d, random seed %llu "
                             "(LOCO_TEST_SEED=%llu repeats this run)\n",
                     LOCO_VERSION_STRING, size, provided, seed, seed);
    }

    doctest::Context context(argc, argv);
    if (provided >= MPI_THREAD_SERIALIZED) {
        // The refusals below SERIALIZED cannot happen at this level: left out, so that doctest
        // counts them as skipped (mpi.np2.funneled runs them).
        context.addFilter("test-case-exclude", "*below MPI_THREAD_SERIALIZED*");
    }
    if (rank != 0) {
        context.setOption("minimal", true);  // failures only
        context.setOption("no-colors", true);  // no stray escape codes in rank 0's lines
    }
    int failed = context.run() != 0 ? 1 : 0;
    if (context.shouldExit()) {  // --help, --list-test-cases, ...
        MPI_Finalize();
        return failed;
    }

    // A communicator over MPI_COMM_SELF with a collective still pending at MPI_Finalize, destroyed
    // after it: MPI can no longer complete the collective, so finish() throws comm_error (and a
    // request dropped then returns), instead of reaching into the destroyed communicator.
    // (The second start may complete the first: only the last one started is surely pending.)
    std::vector<float> late_x(3, 1.0f), late_y(3, 1.0f);
    auto late = std::make_unique<loco::comm::mpi>(MPI_COMM_SELF);
    auto late_dropped = late->start_all_reduce(loco::host_tensor(late_x.data(), 3),
                                               loco::comm::reduce_op::sum);
    auto late_finished = late->start_all_reduce(loco::host_tensor(late_y.data(), 3),
                                                loco::comm::reduce_op::sum);

    // One whose communicator is still alive at MPI_Finalize: finish() then throws comm_error
    // instead of calling MPI after MPI_Finalize (which OpenMPI answers by aborting the job).
    std::vector<float> alive_x(3, 1.0f);
    auto alive = std::make_unique<loco::comm::mpi>(MPI_COMM_SELF);
    auto alive_request = alive->start_all_reduce(loco::host_tensor(alive_x.data(), 3),
                                                 loco::comm::reduce_op::sum);

    int failed_ranks = 0;
    MPI_Allreduce(&failed, &failed_ranks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Finalize();

    std::string alive_message;
    try {
        alive_request.finish();
    } catch (const loco::comm_error& e) {
        alive_message = e.what();
    }
    alive.reset();
    if (alive_message.find("MPI has been finalized") == std::string::npos) {
        std::fprintf(stderr, "mpi_test rank %d: a request finished after MPI_Finalize, its "
                             "communicator alive, did not throw comm_error (got \"%s\")\n",
                     rank, alive_message.c_str());
        failed = 1;
        failed_ranks = failed_ranks == 0 ? 1 : failed_ranks;
    }

    late.reset();
    std::string late_message;
    try {
        late_finished.finish();
    } catch (const loco::comm_error& e) {
        late_message = e.what();
    }
    { const auto dropped = std::move(late_dropped); }
    if (late_message.find("the communicator was destroyed before finish()") == std::string::npos) {
        std::fprintf(stderr, "mpi_test rank %d: a request finished after its communicator was "
                             "destroyed past MPI_Finalize did not throw comm_error (got \"%s\")\n",
                     rank, late_message.c_str());
        failed = 1;
        failed_ranks = failed_ranks == 0 ? 1 : failed_ranks;
    }

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
