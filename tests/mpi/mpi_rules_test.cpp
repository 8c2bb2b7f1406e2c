// loco::comm::mpi at the edges of what MPI allows: a nonblocking collective's error under the
// error handler the program set on MPI_COMM_WORLD, counts near the top of size_t in the call
// check, and below MPI_THREAD_SERIALIZED the calls refused on a thread other than MPI's main one
// (mpi.np2.funneled runs these under MPI_THREAD_FUNNELED; at SERIALIZED and above tests/mpi/main.cpp
// leaves them out, and doctest reports them as skipped).
//
// As in mpi_test.cpp, every rank runs every case and calls the same collectives, and checks are
// CHECK, never REQUIRE, so that a failure on one rank does not leave its peers waiting.
#include <doctest/doctest.h>

#include "mpi_support.hpp"

#include <loco/comm/mpi.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using loco::comm::reduce_op;

using loco_mpi_test::world_rank;
using loco_mpi_test::world_size;
bool below_serialized() {
    int level = MPI_THREAD_SINGLE;
    MPI_Query_thread(&level);
    return level < MPI_THREAD_SERIALIZED;
}

// Sets MPI_ERRORS_RETURN on MPI_COMM_WORLD for its lifetime, then puts the program's handler back.
class world_errors_return {
public:
    world_errors_return() {
        MPI_Comm_get_errhandler(MPI_COMM_WORLD, &old_);
        MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    }
    ~world_errors_return() {
        MPI_Comm_set_errhandler(MPI_COMM_WORLD, old_);
        MPI_Errhandler_free(&old_);
    }
    world_errors_return(const world_errors_return&) = delete;
    world_errors_return& operator=(const world_errors_return&) = delete;

private:
    MPI_Errhandler old_ = MPI_ERRHANDLER_NULL;
};

}  // namespace

TEST_CASE("mpi: with MPI_ERRORS_RETURN on MPI_COMM_WORLD, a nonblocking collective's MPI error is a comm_error") {
    // OpenMPI 4.1 raises the error MPI_Wait finds in a nonblocking collective on MPI_COMM_WORLD's
    // handler, not on loco's duplicate: with the default (fatal) one this case would abort the
    // job, as docs/communicators.md says. Without the call check, rank 0 of each pair gathers 64
    // bytes per rank and rank 1 only 16: rank 1 receives 64 bytes into a 16-byte slot (MPI_ERR_TRUNCATE),
    // rank 0 receives less than it asked for, which MPI allows. In pairs, so that no third rank
    // waits on data a failed rank never forwards (MPI has no timeout).
    const world_errors_return guard;
    const int me = world_rank();
    MPI_Comm pair = MPI_COMM_NULL;
    MPI_Comm_split(MPI_COMM_WORLD, me / 2, me, &pair);
    {
        loco::comm::mpi comm(pair, {.take_ownership = true, .check_calls = false});
        const int m = comm.size();
        const std::size_t n = comm.rank() == 0 ? 64 : 16;
        std::vector<std::byte> send(64, std::byte{1});
        std::vector<std::byte> recv(64 * static_cast<std::size_t>(m));
        std::string message;
        try {
            comm.all_gather(loco::host_tensor(static_cast<const std::byte*>(send.data()), n),
                            loco::host_tensor(recv.data(), n * static_cast<std::size_t>(m)));
        } catch (const loco::comm_error& e) {
            message = e.what();
        }
        if (m == 2 && comm.rank() == 1) {
            CHECK(message.find("loco::comm::mpi rank 1, all_gather: MPI_Iallgather failed: "
                               "MPI_ERR_TRUNCATE") != std::string::npos);
            // The failure leaves the ranks' views of what was exchanged unknown: refused from now
            // on, before any MPI call, so this cannot wait for a peer.
            CHECK_THROWS_WITH_AS(comm.barrier(),
                                 doctest::Contains("an earlier MPI error left this communicator unusable"),
                                 loco::comm_error);
            std::vector<float> x(4, 1.0f);
            CHECK_THROWS_WITH_AS(comm.start_all_reduce(loco::host_tensor(x.data(), 4), reduce_op::sum),
                                 doctest::Contains("an earlier MPI error left this communicator unusable"),
                                 loco::comm_error);
        } else {
            CHECK(message.empty());
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
}

TEST_CASE("mpi: the call check compares counts of 2^63 and more exactly") {
    // The counts went through int64 and a negation: 2^63 became INT64_MIN, whose negation is
    // undefined, and the disagreement was missed (the other ranks went on into the collective).
    // Views of that size are never read: the call check and the address-space limit come first.
    const int m = world_size();
    const int me = world_rank();
    loco::comm::mpi comm(MPI_COMM_WORLD);
    std::vector<float> x(4, 1.0f);
    const std::size_t two63 = std::size_t{1} << 63;
    if (m > 1) {
        CHECK_THROWS_WITH_AS(comm.all_reduce(loco::host_tensor(x.data(), me == 0 ? two63 : 4), reduce_op::sum),
                             doctest::Contains("ranks disagree on the size: from 4 floats to 9223372036854775808 floats"),
                             loco::comm_error);
        CHECK_THROWS_WITH_AS(comm.all_reduce(loco::host_tensor(x.data(), me == 0 ? two63 + 1 : 4), reduce_op::sum),
                             doctest::Contains("from 4 floats to 9223372036854775809 floats"),
                             loco::comm_error);
        CHECK_THROWS_WITH_AS(comm.broadcast(loco::host_tensor(reinterpret_cast<std::byte*>(x.data()),
                                                              me == m - 1 ? SIZE_MAX : 16), 0),
                             doctest::Contains("from 16 bytes to 18446744073709551615 bytes"),
                             loco::comm_error);
        // The ranks that pass 2^63 and 2^63 + 1 disagree too (they differed only in the sign bit
        // and the last bit after the negation).
        CHECK_THROWS_WITH_AS(comm.all_reduce(loco::host_tensor(x.data(), me == 0 ? two63 : two63 + 1), reduce_op::sum),
                             doctest::Contains("from 9223372036854775808 floats to 9223372036854775809 floats"),
                             loco::comm_error);
    }
    CHECK_THROWS_WITH_AS(comm.all_reduce(loco::host_tensor(x.data(), two63), reduce_op::sum),
                         doctest::Contains("9223372036854775808 floats exceed the address space"),
                         loco::invalid_argument);
    CHECK(x == std::vector<float>(4, 1.0f));
    comm.all_reduce(loco::host_tensor(x.data(), x.size()), reduce_op::sum);  // still usable
    CHECK(x == std::vector<float>(4, static_cast<float>(m)));
}

TEST_CASE("mpi below MPI_THREAD_SERIALIZED: a finish() refused on another thread leaves the request pending") {
    REQUIRE(below_serialized());  // main.cpp leaves these cases out at SERIALIZED and above
    const int m = world_size();
    const std::size_t n = 1000;
    std::vector<float> x(n, 1.0f);
    loco::comm::mpi comm(MPI_COMM_WORLD);
    auto r = comm.start_all_reduce(loco::host_tensor(x.data(), n), reduce_op::sum);
    std::string refused;
    std::thread([&] {
        try {
            r.finish();
        } catch (const loco::invalid_argument& e) {
            refused = e.what();
        }
    }).join();
    CHECK(refused.find("all_reduce: finish() on a thread other than MPI's main thread") != std::string::npos);
    // Nothing was touched: the request is still the caller's, and finishes on the main thread
    // with its result (not "already finished", and not only at the next collective).
    CHECK(r.pending());
    CHECK_NOTHROW(r.finish());
    CHECK_FALSE(r.pending());
    CHECK(x == std::vector<float>(n, static_cast<float>(m)));
    CHECK_THROWS_WITH_AS(r.finish(), doctest::Contains("was already finished"), loco::invalid_argument);

    // The same with an all_gather and a blocking call between: the call completes the collective
    // (start order), and the request still gives its result.
    std::vector<std::byte> send(8, static_cast<std::byte>(world_rank()));
    std::vector<std::byte> recv(8 * static_cast<std::size_t>(m));
    auto g = comm.start_all_gather(loco::host_tensor(static_cast<const std::byte*>(send.data()), 8),
                                   loco::host_tensor(recv.data(), recv.size()));
    std::thread([&] {
        try {
            g.finish();
        } catch (const loco::invalid_argument&) {
        }
    }).join();
    CHECK(g.pending());
    comm.barrier();  // not refused: no request was dropped
    CHECK_NOTHROW(g.finish());
    for (int k = 0; k < m; ++k) {
        CHECK(recv[static_cast<std::size_t>(k) * 8] == static_cast<std::byte>(k));
    }
}

TEST_CASE("mpi below MPI_THREAD_SERIALIZED: construction on another thread is refused before any MPI collective") {
    REQUIRE(below_serialized());  // main.cpp leaves these cases out at SERIALIZED and above
    // Every rank builds on a helper thread, so every rank is refused and none waits in
    // MPI_Comm_dup for the others.
    std::string refused;
    std::thread([&] {
        try {
            loco::comm::mpi comm(MPI_COMM_WORLD);
        } catch (const loco::invalid_argument& e) {
            refused = e.what();
        }
    }).join();
    CHECK(refused.find("loco::comm::mpi: constructed on a thread other than MPI's main thread, but "
                       "MPI provides only MPI_THREAD_") != std::string::npos);
    loco::comm::mpi comm(MPI_COMM_WORLD);  // the main thread still may
    comm.barrier();
}
