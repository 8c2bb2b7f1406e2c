// comm::mpi when an MPI call of a collective fails part-way through its pieces, and when the
// ranks' options disagree. The failures are injected through MPI's profiling interface: this
// file defines MPI_Iallgather and MPI_Ialltoallv, which call PMPI_* unless a test asked the n-th
// call from now to fail (every other test runs them unchanged).
//
// Every rank runs every case and fails the same call, so no rank is left waiting in one.
#include <doctest/doctest.h>

#include "mpi_support.hpp"

#include <loco/comm/mpi.hpp>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace {

int iallgather_calls = 0, iallgather_fail_at = -1;
const void* iallgather_last_send = nullptr;  // the send buffer of the last MPI_Iallgather
int ialltoallv_calls = 0, ialltoallv_fail_at = -1;

using loco_mpi_test::world_rank;
using loco_mpi_test::world_size;

}  // namespace

extern "C" int MPI_Iallgather(const void* send, int send_count, MPI_Datatype send_type, void* recv,
                              int recv_count, MPI_Datatype recv_type, MPI_Comm comm,
                              MPI_Request* request) {
    iallgather_last_send = send;
    if (++iallgather_calls == iallgather_fail_at) {
        return MPI_ERR_OTHER;
    }
    return PMPI_Iallgather(send, send_count, send_type, recv, recv_count, recv_type, comm, request);
}

// While set, MPI_Test reports every request as still in flight (a transfer slower than the calls).
bool hold_tests = false;

extern "C" int MPI_Test(MPI_Request* request, int* flag, MPI_Status* status) {
    if (hold_tests) {
        *flag = 0;
        return MPI_SUCCESS;
    }
    return PMPI_Test(request, flag, status);
}

extern "C" int MPI_Ialltoallv(const void* send, const int send_counts[], const int send_displs[],
                              MPI_Datatype send_type, void* recv, const int recv_counts[],
                              const int recv_displs[], MPI_Datatype recv_type, MPI_Comm comm,
                              MPI_Request* request) {
    if (++ialltoallv_calls == ialltoallv_fail_at) {
        return MPI_ERR_OTHER;
    }
    return PMPI_Ialltoallv(send, send_counts, send_displs, send_type, recv, recv_counts,
                           recv_displs, recv_type, comm, request);
}

TEST_CASE("mpi: a start whose second piece's MPI call fails leaves the caller's buffers alone "
          "once it has thrown") {
    // The first piece was issued: it used to stay in flight while the call threw, and MPI wrote
    // the caller's buffer afterwards (the destructor's drain, or the next call's progress).
    const int m = world_size();
    const int me = world_rank();
    const auto um = static_cast<std::size_t>(m);
    const std::size_t limit = 2 * um;
    const std::byte mine = static_cast<std::byte>(0x10 + me);
    const std::byte refill{0xee};

    SUBCASE("all_gather") {
        std::vector<std::byte> send(2 * limit, mine), recv(um * send.size(), std::byte{0});
        {
            loco::comm::mpi comm(MPI_COMM_WORLD, {.max_count = limit});
            iallgather_fail_at = iallgather_calls + 2;
            CHECK_THROWS_WITH_AS(
                comm.start_all_gather(loco::host_tensor(static_cast<const std::byte*>(send.data()), send.size()),
                                      loco::host_tensor(recv.data(), recv.size())),
                doctest::Contains("MPI_Iallgather failed"), loco::comm_error);
            iallgather_fail_at = -1;
            std::fill(recv.begin(), recv.end(), refill);  // the caller's again
            CHECK_THROWS_WITH_AS(comm.barrier(), doctest::Contains("unusable"), loco::comm_error);
        }
        CHECK(std::all_of(recv.begin(), recv.end(), [&](std::byte b) { return b == refill; }));
    }
    SUBCASE("all_reduce") {
        const std::size_t n = 2 * limit + 1;  // three pieces of at most `limit` floats
        std::vector<float> x(n, 1.0f);
        {
            loco::comm::mpi comm(MPI_COMM_WORLD, {.max_count = limit});
            ialltoallv_fail_at = ialltoallv_calls + 2;
            CHECK_THROWS_WITH_AS(comm.start_all_reduce(loco::host_tensor(x.data(), n),
                                                       loco::comm::reduce_op::sum),
                                 doctest::Contains("MPI_Ialltoallv failed"), loco::comm_error);
            ialltoallv_fail_at = -1;
            std::fill(x.begin(), x.end(), -7.0f);
        }  // the destructor completes what is pending: none of it may be this start's
        CHECK(std::all_of(x.begin(), x.end(), [](float v) { return v == -7.0f; }));
    }
}

TEST_CASE("mpi: ranks built with different max_count or check_calls all refuse at construction") {
    // It decides which MPI calls a collective is issued as: ranks that differed issued different
    // calls, and a broadcast in pieces on one rank left the others' data silently short.
    const int m = world_size();
    if (m < 2) {
        return;
    }
    const int me = world_rank();
    const std::size_t limit = me == 0 ? static_cast<std::size_t>(m) : static_cast<std::size_t>(INT_MAX);
    CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_WORLD, {.max_count = limit}),
                         doctest::Contains("ranks disagree on options::max_count"),
                         loco::comm_error);
    // A value out of range on every rank is refused on every rank (after the agreement: a rank
    // that refused alone left its peers waiting in MPI_Comm_dup).
    CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_WORLD, {.max_count = 0}),
                         doctest::Contains("max_count must be in [number of ranks"),
                         loco::invalid_argument);
    // check_calls too: with it, a rank issues one more collective per call than without.
    CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_WORLD, {.check_calls = me != 0}),
                         doctest::Contains("ranks disagree on options::check_calls"),
                         loco::comm_error);
    loco::comm::mpi ok(MPI_COMM_WORLD, {.max_count = static_cast<std::size_t>(m)});
    CHECK(ok.size() == m);
}

TEST_CASE("mpi: an all_gather in place passes MPI_IN_PLACE, never a send buffer inside the receive buffer") {
    // MPI forbids aliased send and receive buffers (MPICH refuses them: "Buffers must not be
    // aliased"); OpenMPI happens to copy the slot onto itself, so only the call shows the difference.
    const int m = world_size();
    const int me = world_rank();
    const auto um = static_cast<std::size_t>(m);
    for (const std::size_t limit : {static_cast<std::size_t>(INT_MAX), um}) {
        CAPTURE(limit);
        loco::comm::mpi comm(MPI_COMM_WORLD, {.max_count = limit});
        const std::size_t b = 3 * um + 1;  // in pieces under the small limit
        std::vector<std::byte> recv(um * b, std::byte{0});
        std::fill_n(recv.begin() + static_cast<std::ptrdiff_t>(std::size_t(me) * b), b, static_cast<std::byte>(me + 1));
        const std::byte* own = recv.data() + std::size_t(me) * b;
        iallgather_last_send = nullptr;
        comm.all_gather(loco::host_tensor(own, b), loco::host_tensor(recv.data(), recv.size()));
        CHECK(iallgather_last_send == MPI_IN_PLACE);
        bool slots_ok = true;
        for (std::size_t i = 0; i < recv.size(); ++i) {
            slots_ok = slots_ok && recv[i] == static_cast<std::byte>(i / b + 1);
        }
        CHECK(slots_ok);
        // Out of place: the send buffer itself (its last piece).
        const std::vector<std::byte> send(b, static_cast<std::byte>(me + 1));
        std::vector<std::byte> out(um * b);
        comm.all_gather(loco::host_tensor(send.data(), b), loco::host_tensor(out.data(), out.size()));
        CHECK(iallgather_last_send != MPI_IN_PLACE);
        CHECK(out == recv);
    }
}

TEST_CASE("mpi: an all_reduce in flight when an MPI error breaks the communicator fails instead of "
          "issuing its all-gather") {
    // The reduce-scatter of `x` has not completed when the next start fails (MPI_Test held): once
    // the communicator is broken, finish() completes the reduce-scatter and throws comm_error, on
    // every rank alike, without another MPI collective on the broken communicator.
    std::vector<float> x(64, 1.0f), y(64, 1.0f);
    {
        loco::comm::mpi comm(MPI_COMM_WORLD, {.check_calls = false});
        auto rx = comm.start_all_reduce(loco::host_tensor(x.data(), x.size()), loco::comm::reduce_op::sum);
        hold_tests = true;
        ialltoallv_fail_at = ialltoallv_calls + 1;
        CHECK_THROWS_WITH_AS(comm.start_all_reduce(loco::host_tensor(y.data(), y.size()),
                                                   loco::comm::reduce_op::sum),
                             doctest::Contains("MPI_Ialltoallv failed"), loco::comm_error);
        ialltoallv_fail_at = -1;
        hold_tests = false;
        CHECK_THROWS_WITH_AS(rx.finish(), doctest::Contains("an earlier MPI error left this communicator unusable"),
                             loco::comm_error);
    }
    CHECK(x == std::vector<float>(64, 1.0f));  // no result was written
    CHECK(y == std::vector<float>(64, 1.0f));
}
