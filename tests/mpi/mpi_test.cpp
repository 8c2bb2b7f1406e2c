// loco::comm::mpi under mpirun (any number of ranks, 1 included). Each MPI process also runs the
// same computation over comm::threads with as many thread ranks as there are MPI ranks, and checks
// that its own MPI rank ends with the bytes its thread rank ends with, bit for bit: collectives,
// byte counts, and whole DiLoCo runs for every compressor. Then the split-phase rules (start order,
// blocking calls between), and the errors.
//
// Every rank runs every case in the same order and calls the same collectives; checks are CHECK,
// never REQUIRE, so that a failure on one rank does not leave its peers waiting in a collective.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "mpi_support.hpp"

#include <loco/comm/mpi.hpp>
#include <loco/loco.hpp>

#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace loco_test;
using loco::comm::reduce_op;

using loco_mpi_test::world_rank;
using loco_mpi_test::world_size;

// Rank r's input, which every rank can regenerate.
std::vector<float> rank_input(const std::string& label, int rank, std::size_t n) {
    auto rng = rng_for(label + "/" + std::to_string(rank));
    return normal_floats(rng, n);
}
std::vector<std::byte> rank_bytes(const std::string& label, int rank, std::size_t n) {
    auto rng = rng_for(label + "/bytes/" + std::to_string(rank));
    std::vector<std::byte> v(n);
    for (auto& b : v) {
        b = static_cast<std::byte>(rng() & 0xffu);
    }
    return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() &&
           (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// True on every rank when `ok` is true on every rank.
bool all_ranks(bool ok) {
    int mine = ok ? 1 : 0;
    int all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return all == 1;
}

// The same rank's result of fn over comm::threads with size() thread ranks.
template <class Result, class Fn>
Result on_threads(int size, int rank, Fn fn) {
    std::vector<Result> results(static_cast<std::size_t>(size));
    loco::comm::run_threads(size, [&](loco::comm::communicator& comm) {
        results[static_cast<std::size_t>(comm.rank())] = fn(comm);
    });
    return results[static_cast<std::size_t>(rank)];
}

// Bytes rank r sends in an all-reduce of n floats over m ranks (comm/threads.hpp).
std::uint64_t all_reduce_bytes(std::size_t n, int m, int r) {
    const auto mm = static_cast<std::size_t>(m);
    const std::size_t chunk = n * std::size_t(r + 1) / mm - n * std::size_t(r) / mm;
    return 4 * (n + (mm - 2) * chunk);
}

struct reduce_result {
    std::vector<float> data;
    std::uint64_t bytes = 0;
};

// An all_reduce of n floats per rank over comm: bit for bit and byte for byte what comm::threads
// gives, and within rounding of a double-precision sum.
void check_all_reduce(loco::comm::mpi& comm, const std::string& label, std::size_t n,
                      reduce_op op) {
    const int m = world_size();
    const int me = world_rank();
    CAPTURE(op == reduce_op::sum ? "sum" : "mean");
    const auto want = on_threads<reduce_result>(m, me, [&](loco::comm::communicator& t) {
        auto x = rank_input(label, t.rank(), n);
        t.all_reduce(loco::host_tensor(x.data(), x.size()), op);
        return reduce_result{x, t.bytes_sent()};
    });
    auto x = rank_input(label, me, n);
    const std::uint64_t before = comm.bytes_sent();
    comm.all_reduce(loco::host_tensor(x.data(), x.size()), op);
    CHECK(same_bits(x, want.data));
    CHECK(comm.bytes_sent() - before == want.bytes);
    CHECK(comm.bytes_sent() - before == all_reduce_bytes(n, m, me));

    std::size_t bad = 0;
    std::vector<double> sum(n, 0.0), magnitude(n, 0.0);
    for (int r = 0; r < m; ++r) {
        const auto in = rank_input(label, r, n);
        for (std::size_t i = 0; i < n; ++i) {
            sum[i] += in[i];
            magnitude[i] += std::abs(double(in[i]));
        }
    }
    const double scale = op == reduce_op::mean ? 1.0 / m : 1.0;
    for (std::size_t i = 0; i < n; ++i) {
        if (std::abs(x[i] - sum[i] * scale) > 1.2e-7 * m * magnitude[i] * scale + 1e-30) {
            ++bad;
        }
    }
    CHECK(bad == 0);
}

// all_gather (out of place and in place), all_to_all and broadcast of b bytes per rank (per
// block) over comm: the data every rank can regenerate, and comm::threads' bytes.
void check_byte_collectives(loco::comm::mpi& comm, const std::string& label, std::size_t b) {
    const int m = world_size();
    const int me = world_rank();
    const auto um = static_cast<std::size_t>(m);
    std::vector<std::byte> want(um * b);
    for (int r = 0; r < m; ++r) {
        const auto in = rank_bytes(label, r, b);
        std::copy(in.begin(), in.end(), want.begin() + static_cast<std::ptrdiff_t>(std::size_t(r) * b));
    }
    const auto send = rank_bytes(label, me, b);
    std::vector<std::byte> recv(um * b, std::byte{0x5a});
    std::uint64_t before = comm.bytes_sent();
    comm.all_gather(loco::host_tensor(send.data(), send.size()),
                    loco::host_tensor(recv.data(), recv.size()));
    CHECK(recv == want);
    CHECK(comm.bytes_sent() - before == (um - 1) * b);

    // In place: the send buffer is this rank's slot of recv.
    std::vector<std::byte> inplace(um * b, std::byte{0});
    std::copy(send.begin(), send.end(), inplace.begin() + static_cast<std::ptrdiff_t>(std::size_t(me) * b));
    comm.all_gather(loco::host_tensor(static_cast<const std::byte*>(inplace.data()) + std::size_t(me) * b, b),
                    loco::host_tensor(inplace.data(), inplace.size()));
    CHECK(inplace == want);

    // all_to_all: block k of rank r goes to rank k.
    const auto mine = rank_bytes(label + " a2a", me, um * b);
    std::vector<std::byte> got(um * b);
    before = comm.bytes_sent();
    comm.all_to_all(loco::host_tensor(mine.data(), mine.size()),
                    loco::host_tensor(got.data(), got.size()));
    bool blocks_ok = true;
    for (int r = 0; r < m; ++r) {
        const auto theirs = rank_bytes(label + " a2a", r, um * b);
        blocks_ok = blocks_ok && std::equal(theirs.begin() + static_cast<std::ptrdiff_t>(std::size_t(me) * b),
                                            theirs.begin() + static_cast<std::ptrdiff_t>(std::size_t(me + 1) * b),
                                            got.begin() + static_cast<std::ptrdiff_t>(std::size_t(r) * b));
    }
    CHECK(blocks_ok);
    CHECK(comm.bytes_sent() - before == (um - 1) * b);

    // broadcast from the last rank.
    const int root = m - 1;
    auto data = rank_bytes(label + " bcast", me, b);
    before = comm.bytes_sent();
    comm.broadcast(loco::host_tensor(data.data(), data.size()), root);
    CHECK(data == rank_bytes(label + " bcast", root, b));
    CHECK(comm.bytes_sent() - before == (me == root ? (um - 1) * b : 0));
}

}  // namespace

TEST_CASE("mpi: built before MPI_Init, the communicator is refused with a clear error") {
    CHECK(loco_mpi_test::message_before_init.find("MPI is not initialised; call MPI_Init") !=
          std::string::npos);
}

TEST_CASE("mpi all_reduce: rank-order sums, bit-identical to comm::threads, same bytes") {
    const int m = world_size();
    const int me = world_rank();
    loco::comm::mpi comm(MPI_COMM_WORLD);
    CHECK(comm.rank() == me);
    CHECK(comm.size() == m);
    CHECK(comm.name() == "mpi");
    CHECK(comm.space() == loco::memory_space::host);
    const auto um = static_cast<std::size_t>(m);
    for (const std::size_t n : {std::size_t{0}, std::size_t{1}, um - 1, um, std::size_t{1000},
                                std::size_t{1003}, std::size_t{65537}}) {
        CAPTURE(n);
        for (const reduce_op op : {reduce_op::sum, reduce_op::mean}) {
            check_all_reduce(comm, "all_reduce " + std::to_string(n), n, op);
        }
    }
}

TEST_CASE("mpi all_gather, all_to_all, broadcast, barrier: data and bytes as comm::threads") {
    loco::comm::mpi comm(MPI_COMM_WORLD);
    for (const std::size_t b : {std::size_t{0}, std::size_t{1}, std::size_t{13}, std::size_t{4096}}) {
        CAPTURE(b);
        check_byte_collectives(comm, "gather " + std::to_string(b), b);
    }
    const std::uint64_t before = comm.bytes_sent();
    comm.barrier();
    CHECK(comm.bytes_sent() == before);
}

TEST_CASE("mpi split-phase: collectives complete in start order, whatever order they finish in") {
    const int m = world_size();
    const int me = world_rank();
    const auto um = static_cast<std::size_t>(m);
    loco::comm::mpi comm(MPI_COMM_WORLD);
    const std::size_t n = 10007;
    const std::size_t b = 333;
    const auto want_a = on_threads<reduce_result>(m, me, [&](loco::comm::communicator& t) {
        auto x = rank_input("split a", t.rank(), n);
        t.all_reduce(loco::host_tensor(x.data(), n), reduce_op::mean);
        return reduce_result{x, t.bytes_sent()};
    });
    const auto want_c = on_threads<reduce_result>(m, me, [&](loco::comm::communicator& t) {
        auto x = rank_input("split c", t.rank(), n + 5);
        t.all_reduce(loco::host_tensor(x.data(), n + 5), reduce_op::sum);
        return reduce_result{x, t.bytes_sent()};
    });
    std::vector<std::byte> want_b(um * b);
    for (int r = 0; r < m; ++r) {
        const auto in = rank_bytes("split b", r, b);
        std::copy(in.begin(), in.end(), want_b.begin() + static_cast<std::ptrdiff_t>(std::size_t(r) * b));
    }

    // Each rank finishes the three requests in another order; the ranks must agree anyway.
    const int orders[6][3] = {{0, 1, 2}, {2, 1, 0}, {1, 0, 2}, {2, 0, 1}, {1, 2, 0}, {0, 2, 1}};
    for (int round = 0; round < 3; ++round) {
        CAPTURE(round);
        auto a = rank_input("split a", me, n);
        auto c = rank_input("split c", me, n + 5);
        const auto send = rank_bytes("split b", me, b);
        std::vector<std::byte> recv(um * b);
        const std::uint64_t before = comm.bytes_sent();
        loco::comm::request requests[3];
        requests[0] = comm.start_all_reduce(loco::host_tensor(a.data(), n), reduce_op::mean);
        requests[1] = comm.start_all_gather(loco::host_tensor(send.data(), b),
                                            loco::host_tensor(recv.data(), recv.size()));
        requests[2] = comm.start_all_reduce(loco::host_tensor(c.data(), n + 5), reduce_op::sum);
        CHECK(requests[0].pending());
        const auto& order = orders[(me + round) % 6];
        for (const int k : order) {
            requests[k].finish();
        }
        CHECK(same_bits(a, want_a.data));
        CHECK(same_bits(c, want_c.data));
        CHECK(recv == want_b);
        CHECK(comm.bytes_sent() - before == want_a.bytes + want_c.bytes + (um - 1) * b);
        CHECK_THROWS_AS(requests[0].finish(), loco::invalid_argument);
    }

    // A blocking collective between start and finish completes what was started before it.
    auto a = rank_input("split a", me, n);
    auto r = comm.start_all_reduce(loco::host_tensor(a.data(), n), reduce_op::mean);
    std::vector<float> root_value{static_cast<float>(me)};
    comm.broadcast(loco::comm::as_bytes(loco::host_tensor(root_value.data(), 1)), 0);
    CHECK(root_value[0] == 0.0f);
    CHECK(same_bits(a, want_a.data));  // complete before finish()
    r.finish();
    CHECK(same_bits(a, want_a.data));

    // Compute between start and finish (what diloco's overlapped sync does).
    auto a2 = rank_input("split a", me, n);
    auto r2 = comm.start_all_reduce(loco::host_tensor(a2.data(), n), reduce_op::mean);
    double busy = 0;
    for (int i = 0; i < 100000; ++i) {
        busy += std::sqrt(double(i));
    }
    CHECK(busy > 0);
    r2.finish();
    CHECK(same_bits(a2, want_a.data));
}

TEST_CASE("mpi: a request dropped unfinished poisons its communicator on every rank") {
    loco::comm::mpi comm(MPI_COMM_WORLD);
    std::vector<float> x(100, 1.0f);
    {
        auto r = comm.start_all_reduce(loco::host_tensor(x.data(), x.size()), reduce_op::sum);
    }  // destroyed: returns once MPI no longer touches x, then marks the communicator
    CHECK_THROWS_WITH_AS(comm.barrier(), doctest::Contains("was started but never finished"),
                         loco::comm_error);
}

TEST_CASE("mpi: a dropped request leaves the caller's buffers alone, also when the communicator completes it later") {
    // The drop returns once MPI no longer touches the buffers (comm/communicator.hpp): an
    // all_reduce's all-gather still in flight goes to the request's own memory and is never copied
    // out, and an all_gather (which writes the caller's buffer directly) is waited for. The caller
    // refills its buffers at once; the destructor, which completes what is pending, must not
    // write them. Rank 0 starts late, so that the peers' all_gather cannot be complete yet.
    const int m = world_size();
    const int me = world_rank();
    const auto um = static_cast<std::size_t>(m);
    for (const std::size_t limit : {static_cast<std::size_t>(INT_MAX), 2 * um + 1}) {
        CAPTURE(limit);
        const std::size_t n = 1000;
        std::vector<float> x = rank_input("dropped reduce", me, n);
        std::vector<std::byte> recv(um * n, std::byte{0});
        const auto send = rank_bytes("dropped gather", me, n);
        // A drop poisons its communicator: one communicator for each collective.
        {
            loco::comm::mpi comm(MPI_COMM_WORLD, {.max_count = limit});
            {
                const auto dropped =
                    comm.start_all_reduce(loco::host_tensor(x.data(), n), reduce_op::sum);
            }
            std::fill(x.begin(), x.end(), -3.0f);  // the caller's again
        }  // the destructor completes the dropped all_reduce's all-gather
        CHECK(x == std::vector<float>(n, -3.0f));
        {
            loco::comm::mpi comm(MPI_COMM_WORLD, {.check_calls = false, .max_count = limit});
            MPI_Barrier(MPI_COMM_WORLD);
            if (me == 0) {
                std::this_thread::sleep_for(std::chrono::milliseconds(200));
            }
            {
                const auto dropped = comm.start_all_gather(loco::host_tensor(send.data(), n),
                                                           loco::host_tensor(recv.data(), recv.size()));
            }
            std::fill(recv.begin(), recv.end(), std::byte{0xee});
        }
        CHECK(recv == std::vector<std::byte>(recv.size(), std::byte{0xee}));
    }
}

TEST_CASE("mpi: a dropped all_reduce no longer reads the caller's buffer once the drop has returned") {
    // Rank 1 drops its all_reduce and refills the buffer at once; the others start late and
    // finish: they must get rank 1's values from before the drop (the reduce-scatter completed
    // inside the drop), never the refill. Large enough that MPI sends it in more than one go.
    const int m = world_size();
    const int me = world_rank();
    if (m < 2) return;
    const std::size_t n = std::size_t{1} << 20;
    const auto value = [](int rank, std::size_t i) { return static_cast<float>((rank + 1) * static_cast<int>(i % 13)); };
    std::vector<float> x(n);
    for (std::size_t i = 0; i < n; ++i) x[i] = value(me, i);
    loco::comm::mpi comm(MPI_COMM_WORLD, {.check_calls = false});
    if (me == 1) {
        {
            const auto dropped = comm.start_all_reduce(loco::host_tensor(x.data(), n), reduce_op::sum);
        }
        std::fill(x.begin(), x.end(), -3.0f);  // the caller's again
    } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        comm.all_reduce(loco::host_tensor(x.data(), n), reduce_op::sum);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < n; ++i) {
            wrong += x[i] != static_cast<float>(static_cast<int>(i % 13) * m * (m + 1) / 2) ? 1 : 0;
        }
        CHECK(wrong == 0);
    }
}

TEST_CASE("mpi: barrier waits for every rank, with and without the call check") {
    // Rank 0 sets a flag in memory every rank can see (an MPI shared-memory window) just before
    // it enters the barrier, after a delay; every rank reads the flag once the barrier returns.
    // Whatever the machine's load, a barrier that waits sees the flag set; one that returns
    // early reads it while rank 0 still sleeps.
    MPI_Comm node = MPI_COMM_NULL;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    int node_size = 0;
    MPI_Comm_size(node, &node_size);
    if (node_size != world_size()) {
        MPI_Comm_free(&node);
        MESSAGE("skipped: the ranks do not share one node's memory");
        return;
    }
    const int me = world_rank();
    int* mine = nullptr;
    MPI_Win window = MPI_WIN_NULL;
    MPI_Win_allocate_shared(me == 0 ? static_cast<MPI_Aint>(sizeof(int)) : 0, sizeof(int),
                            MPI_INFO_NULL, node, &mine, &window);
    MPI_Aint bytes = 0;
    int unit = 0;
    int* flag = nullptr;
    MPI_Win_shared_query(window, 0, &bytes, &unit, &flag);
    for (const bool check : {true, false}) {
        CAPTURE(check);
        loco::comm::mpi comm(MPI_COMM_WORLD, {.check_calls = check});
        if (me == 0) {
            std::atomic_ref<int>(*flag).store(0);
        }
        MPI_Barrier(MPI_COMM_WORLD);
        if (me == 0) {
            std::this_thread::sleep_for(std::chrono::milliseconds(300));
            std::atomic_ref<int>(*flag).store(1);
        }
        comm.barrier();
        CHECK(std::atomic_ref<int>(*flag).load() == 1);
        MPI_Barrier(MPI_COMM_WORLD);  // every rank has read before rank 0 clears the flag
    }
    MPI_Win_free(&window);
    MPI_Comm_free(&node);
}

TEST_CASE("mpi: all_to_all of a size that is not a multiple of the ranks is refused on every rank") {
    const int m = world_size();
    const auto um = static_cast<std::size_t>(m);
    loco::comm::mpi comm(MPI_COMM_WORLD);
    if (m > 1) {
        std::vector<std::byte> send(4 * um + 1, std::byte{1}), recv(send.size(), std::byte{0});
        CHECK_THROWS_WITH_AS(comm.all_to_all(loco::host_tensor(static_cast<const std::byte*>(send.data()), send.size()),
                                             loco::host_tensor(recv.data(), recv.size())),
                             doctest::Contains("blocks of the same size"), loco::shape_error);
        CHECK(recv == std::vector<std::byte>(recv.size(), std::byte{0}));
    }
    comm.barrier();  // still usable: the refusal is the base class's, before any MPI call
}

TEST_CASE("mpi: a rank that drops an all_reduce does not wait for its peers' next loco call") {
    // Rank 1 drops its request, then meets rank 0 in an MPI call of the program's own; rank 0
    // finishes its request only after that call. The drop used to wait for the all-gather stage
    // that rank 0 issues inside a later loco call: both waited forever (a departure or regroup
    // with an exchange in flight hung the same way).
    const int m = world_size();
    if (m < 2) return;
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    auto rng = loco_test::rng_for("mpi drop " + std::to_string(rank));
    std::vector<float> x = loco_test::normal_floats(rng, 1000);
    std::vector<std::vector<float>> rows(static_cast<std::size_t>(m));
    {
        std::vector<float> flat(1000 * static_cast<std::size_t>(m));
        MPI_Allgather(x.data(), 1000, MPI_FLOAT, flat.data(), 1000, MPI_FLOAT, MPI_COMM_WORLD);
        for (std::size_t k = 0; k < rows.size(); ++k) {
            rows[k].assign(flat.begin() + static_cast<std::ptrdiff_t>(1000 * k),
                           flat.begin() + static_cast<std::ptrdiff_t>(1000 * (k + 1)));
        }
    }
    {
        loco::comm::mpi comm(MPI_COMM_WORLD);
        auto r = comm.start_all_reduce(loco::host_tensor(x.data(), x.size()), reduce_op::sum);
        if (rank == 1) {
            const auto dropped = std::move(r);
        }
        MPI_Barrier(MPI_COMM_WORLD);
        if (rank != 1) {
            r.finish();
            // comm::threads' rank-order sum, as every other all_reduce here.
            for (std::size_t i = 0; i < x.size(); ++i) {
                float want = rows[0][i];
                for (std::size_t k = 1; k < rows.size(); ++k) want += rows[k][i];
                CHECK(x[i] == want);
            }
        }
    }  // the destructors complete the dropped request's own all-gather

    // The same when a later start already issued the dropped request's all-gather (its progress
    // found the reduce-scatter done): the all-gather writes the request's own memory from the
    // first, so the drop does not wait for it either.
    {
        loco::comm::mpi comm(MPI_COMM_WORLD, {.check_calls = false});
        std::vector<float> a(1000, 1.0f), b(1000, 2.0f);
        auto r1 = comm.start_all_reduce(loco::host_tensor(a.data(), a.size()), reduce_op::sum);
        MPI_Barrier(MPI_COMM_WORLD);
        if (rank == 1) {
            std::this_thread::sleep_for(std::chrono::milliseconds(300));
            auto r2 = comm.start_all_reduce(loco::host_tensor(b.data(), b.size()), reduce_op::sum);
            { const auto dropped = std::move(r1); }
            MPI_Barrier(MPI_COMM_WORLD);
            { const auto dropped = std::move(r2); }
        } else {
            MPI_Barrier(MPI_COMM_WORLD);
            auto r2 = comm.start_all_reduce(loco::host_tensor(b.data(), b.size()), reduce_op::sum);
            r1.finish();
            r2.finish();
            CHECK(a == std::vector<float>(a.size(), static_cast<float>(m)));
            CHECK(b == std::vector<float>(b.size(), 2.0f * static_cast<float>(m)));
        }
    }
}

TEST_CASE("mpi: a request finished or dropped after its communicator is destroyed") {
    // comm/communicator.hpp promises that a request may outlive its communicator. The destructor
    // completes what is pending; finish() then reports the result without the communicator.
    const int m = world_size();
    std::vector<float> x(1000, 1.0f), y(1000, 2.0f);
    std::vector<std::byte> send(8, std::byte{7});
    std::vector<std::byte> recv(8 * static_cast<std::size_t>(m));
    loco::comm::request rx, ry, rg;
    {
        auto comm = std::make_unique<loco::comm::mpi>(MPI_COMM_WORLD);
        rx = comm->start_all_reduce(loco::host_tensor(x.data(), x.size()), reduce_op::sum);
        rg = comm->start_all_gather(loco::host_tensor(static_cast<const std::byte*>(send.data()), 8),
                                    loco::host_tensor(recv.data(), recv.size()));
        ry = comm->start_all_reduce(loco::host_tensor(y.data(), y.size()), reduce_op::mean);
    }
    CHECK(x == std::vector<float>(1000, static_cast<float>(m)));  // completed by the destructor
    CHECK_NOTHROW(ry.finish());
    CHECK(y == std::vector<float>(1000, 2.0f));
    CHECK_NOTHROW(rx.finish());
    CHECK_THROWS_AS(rx.finish(), loco::invalid_argument);
    CHECK(recv == std::vector<std::byte>(recv.size(), std::byte{7}));
    { const auto dropped = std::move(rg); }  // dropped unfinished, its communicator gone
}

TEST_CASE("mpi: ranks that finish a request at different points do not wait for each other") {
    // Same collectives in the same order on every rank; only where a rank finishes request A
    // differs: rank 0 before starting the next collective, the others after. With the call check a
    // rank used to block in the check's all-reduce while rank 0 waited for A's all-gather, which
    // that rank issues only when it progresses A.
    const int m = world_size();
    const int me = world_rank();
    const auto um = static_cast<std::size_t>(m);
    for (const bool check : {true, false}) {
        CAPTURE(check);
        loco::comm::mpi comm(MPI_COMM_WORLD, {.check_calls = check});
        for (int next = 0; next < 5; ++next) {
            CAPTURE(next);
            std::vector<float> a(4096, 1.0f), b(4096, 2.0f);
            std::vector<std::byte> send(16 * um, static_cast<std::byte>(me));
            std::vector<std::byte> recv(16 * um);
            // The next collective; split-phase ones come back as a request, to finish last.
            const auto start_next = [&]() -> loco::comm::request {
                switch (next) {
                    case 0:
                        return comm.start_all_reduce(loco::host_tensor(b.data(), b.size()), reduce_op::sum);
                    case 1:
                        return comm.start_all_gather(
                            loco::host_tensor(static_cast<const std::byte*>(send.data()), 16),
                            loco::host_tensor(recv.data(), recv.size()));
                    case 2:
                        comm.broadcast(loco::comm::as_bytes(loco::host_tensor(b.data(), b.size())), 0);
                        break;
                    case 3:
                        comm.all_to_all(loco::host_tensor(static_cast<const std::byte*>(send.data()), send.size()),
                                        loco::host_tensor(recv.data(), recv.size()));
                        break;
                    default:
                        comm.barrier();
                }
                return {};
            };
            auto ra = comm.start_all_reduce(loco::host_tensor(a.data(), a.size()), reduce_op::sum);
            loco::comm::request rb;
            if (me == 0) {
                ra.finish();
                rb = start_next();
            } else {
                rb = start_next();
                ra.finish();
            }
            if (rb.pending()) {
                rb.finish();
            }
            CHECK(a == std::vector<float>(4096, static_cast<float>(m)));
            CHECK(b == std::vector<float>(4096, next == 0 ? 2.0f * static_cast<float>(m) : 2.0f));
            if (next == 1 || next == 3) {
                for (std::size_t k = 0; k < recv.size(); ++k) {
                    CHECK(recv[k] == static_cast<std::byte>(k / 16));
                }
            }
        }
    }
}

TEST_CASE("mpi: ranks that call different collectives with one in flight all throw, naming every kind") {
    const int m = world_size();
    const int me = world_rank();
    loco::comm::mpi comm(MPI_COMM_WORLD);
    if (m > 1) {
        // A rank in barrier() completes the all_reduce before its call check; a rank in
        // broadcast() checks first. Each must keep the other's all_reduce moving.
        std::vector<float> a(4096, 1.0f), b(16, 2.0f);
        auto ra = comm.start_all_reduce(loco::host_tensor(a.data(), a.size()), reduce_op::sum);
        const auto call = [&](int barrier_rank, int gather_rank) {
            std::vector<std::byte> recv(b.size() * sizeof(float) * static_cast<std::size_t>(m));
            if (me == barrier_rank) {
                comm.barrier();
            } else if (me == gather_rank) {
                comm.all_gather(loco::comm::as_bytes(loco::host_tensor(static_cast<const float*>(b.data()), b.size())),
                                loco::host_tensor(recv.data(), recv.size()));
            } else {
                comm.broadcast(loco::comm::as_bytes(loco::host_tensor(b.data(), b.size())), 0);
            }
        };
        CHECK_THROWS_WITH_AS(call(0, -1),
                             doctest::Contains("ranks disagree on the collective: some called barrier, others broadcast"),
                             loco::comm_error);
        ra.finish();
        CHECK(a == std::vector<float>(4096, static_cast<float>(m)));
        if (m > 2) {
            CHECK_THROWS_WITH_AS(call(0, 1),
                                 doctest::Contains("ranks disagree on the collective: some called barrier, some all_gather, others broadcast"),
                                 loco::comm_error);
        }
    }
    comm.barrier();  // still usable
}

TEST_CASE("mpi: a count over MPI's int limit that only some ranks pass is refused by every rank") {
    // The call check compares 64-bit counts before any data moves, so a rank past INT_MAX is
    // not alone in its call while its peers wait. No buffer is touched.
    const int m = world_size();
    const int me = world_rank();
    loco::comm::mpi comm(MPI_COMM_WORLD);
    const std::size_t huge = static_cast<std::size_t>(INT_MAX) + 1;
    std::vector<float> x(4, 1.0f);
    auto bytes = loco::comm::as_bytes(loco::host_tensor(x.data(), x.size()));
    if (m > 1) {
        CHECK_THROWS_WITH_AS(comm.all_reduce(loco::host_tensor(x.data(), me == 0 ? huge : 4), reduce_op::sum),
                             doctest::Contains("ranks disagree on the size: from 4 floats to 2147483648 floats"),
                             loco::comm_error);
        CHECK_THROWS_WITH_AS(comm.broadcast(loco::host_tensor(bytes.data, me == m - 1 ? huge : 16), 0),
                             doctest::Contains("ranks disagree on the size: from 16 bytes to 2147483648 bytes"),
                             loco::comm_error);
    }
    CHECK(x == std::vector<float>(4, 1.0f));
    comm.all_reduce(loco::host_tensor(x.data(), x.size()), reduce_op::sum);  // still usable
    CHECK(x == std::vector<float>(4, static_cast<float>(m)));
}

TEST_CASE("mpi: collectives over max_count elements go in pieces, with comm::threads' data and bytes") {
    // A collective larger than one MPI call may move (INT_MAX elements: loco's whole-model
    // broadcasts and exchanges pass it from 537M parameters) is issued as several calls. Small
    // limits here exercise the pieces: limits that divide the sizes and limits that do not, in
    // place and not, several requests in flight finished in another order on each rank.
    const int m = world_size();
    const int me = world_rank();
    const auto um = static_cast<std::size_t>(m);
    CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_WORLD, {.max_count = 0}),
                         doctest::Contains("max_count must be in [number of ranks"),
                         loco::invalid_argument);
    CHECK_THROWS_AS(loco::comm::mpi(MPI_COMM_WORLD, {.max_count = std::size_t(INT_MAX) + 1}),
                    loco::invalid_argument);
    for (const std::size_t limit : {um, um + 1, 7 * um, std::size_t{64}}) {
        if (limit < um) {
            continue;
        }
        CAPTURE(limit);
        loco::comm::mpi comm(MPI_COMM_WORLD, {.max_count = limit});
        for (const std::size_t n : {std::size_t{0}, std::size_t{1}, limit, limit + 1, 3 * limit,
                                    std::size_t{1003}}) {
            CAPTURE(n);
            for (const reduce_op op : {reduce_op::sum, reduce_op::mean}) {
                check_all_reduce(comm, "pieces " + std::to_string(n), n, op);
            }
            check_byte_collectives(comm, "pieces gather " + std::to_string(n), n);
        }

        // Requests in pieces in flight together, finished in another order on each rank.
        const std::size_t n = 5 * limit + 3;
        const auto want_a = on_threads<reduce_result>(m, me, [&](loco::comm::communicator& t) {
            auto x = rank_input("pieces a", t.rank(), n);
            t.all_reduce(loco::host_tensor(x.data(), n), reduce_op::mean);
            return reduce_result{x, t.bytes_sent()};
        });
        std::vector<std::byte> want_b(um * n);
        for (int r = 0; r < m; ++r) {
            const auto in = rank_bytes("pieces b", r, n);
            std::copy(in.begin(), in.end(), want_b.begin() + static_cast<std::ptrdiff_t>(std::size_t(r) * n));
        }
        auto a = rank_input("pieces a", me, n);
        auto c = rank_input("pieces a", me, n);
        const auto send = rank_bytes("pieces b", me, n);
        std::vector<std::byte> recv(um * n);
        loco::comm::request requests[3];
        requests[0] = comm.start_all_reduce(loco::host_tensor(a.data(), n), reduce_op::mean);
        requests[1] = comm.start_all_gather(loco::host_tensor(send.data(), n),
                                            loco::host_tensor(recv.data(), recv.size()));
        requests[2] = comm.start_all_reduce(loco::host_tensor(c.data(), n), reduce_op::mean);
        const int orders[3][3] = {{2, 1, 0}, {1, 0, 2}, {0, 2, 1}};
        for (const int k : orders[me % 3]) {
            requests[k].finish();
        }
        CHECK(same_bits(a, want_a.data));
        CHECK(same_bits(c, want_a.data));
        CHECK(recv == want_b);

        // A request in pieces dropped unfinished writes none of its pieces' results into the
        // caller's buffer, and poisons the communicator as one in a single piece does.
        auto d = rank_input("pieces a", me, n);
        const auto d_before = d;
        {
            auto dropped = comm.start_all_reduce(loco::host_tensor(d.data(), n), reduce_op::mean);
        }
        CHECK(same_bits(d, d_before));
        CHECK_THROWS_WITH_AS(comm.barrier(), doctest::Contains("was started but never finished"),
                             loco::comm_error);
    }
}

TEST_CASE("mpi: a request finished on another thread while this one starts the next") {
    // docs/communicators.md: finishing a request on another thread than the one that started it
    // is fine. A helper thread finishes request i while this thread starts request i + 1 (run
    // under TSan to see that they never touch the communicator's state at once).
    const int m = world_size();
    const int me = world_rank();
    int level = MPI_THREAD_SINGLE;
    MPI_Query_thread(&level);
    const std::size_t n = 1024;
    if (level >= MPI_THREAD_SERIALIZED) {
        for (const bool check : {true, false}) {
            CAPTURE(check);
            loco::comm::mpi comm(MPI_COMM_WORLD, {.check_calls = check});
            const int rounds = 40;
            std::vector<std::vector<float>> bufs(rounds, std::vector<float>(n, 1.0f));
            loco::comm::request prev;
            std::string errors;
            for (int i = 0; i < rounds; ++i) {
                std::thread finisher([&errors, r = std::move(prev)]() mutable {
                    try {
                        if (r.pending()) {
                            r.finish();
                        }
                    } catch (const std::exception& e) {
                        errors += e.what();
                    }
                });
                prev = comm.start_all_reduce(loco::host_tensor(bufs[static_cast<std::size_t>(i)].data(), n),
                                             reduce_op::sum);
                finisher.join();
            }
            prev.finish();
            CHECK(errors.empty());
            int wrong = 0;
            for (const auto& b : bufs) {
                wrong += b != std::vector<float>(n, static_cast<float>(m)) ? 1 : 0;
            }
            CHECK(wrong == 0);
            CHECK(comm.bytes_sent() == rounds * all_reduce_bytes(n, m, me));
        }
    } else {
        // Below MPI_THREAD_SERIALIZED MPI may not be called from another thread: finish() there
        // is refused, the request stays pending, and the collective completes with the next call
        // on the main thread (mpi_rules_test.cpp finishes one without a call between).
        loco::comm::mpi comm(MPI_COMM_WORLD);
        std::vector<float> x(n, 1.0f);
        auto r = comm.start_all_reduce(loco::host_tensor(x.data(), n), reduce_op::sum);
        std::string finish_message, start_message;
        std::thread other([&] {
            try {
                r.finish();
            } catch (const loco::invalid_argument& e) {
                finish_message = e.what();
            }
        });
        other.join();
        CHECK(finish_message.find("all_reduce: finish() on a thread other than MPI's main thread") !=
              std::string::npos);
        comm.barrier();
        CHECK(x == std::vector<float>(n, static_cast<float>(m)));
        CHECK(r.pending());
        CHECK_NOTHROW(r.finish());
        std::thread starter([&] {
            try {
                comm.barrier();
            } catch (const loco::invalid_argument& e) {
                start_message = e.what();
            }
        });
        starter.join();
        CHECK(start_message.find("barrier: called on a thread other than MPI's main thread") !=
              std::string::npos);
        // A dropped request returns once MPI leaves its buffer alone (the buffer may go right
        // after; what it holds is unspecified), and marks the communicator. Dropped on the main
        // thread: a drop calls MPI and cannot refuse, so below SERIALIZED it belongs there.
        auto y = std::make_unique<std::vector<float>>(n, 1.0f);
        auto dropped = comm.start_all_reduce(loco::host_tensor(y->data(), n), reduce_op::sum);
        { const auto gone = std::move(dropped); }
        y.reset();  // under ASan, a late write into it would be reported
        CHECK_THROWS_WITH_AS(comm.barrier(), doctest::Contains("was started but never finished"),
                             loco::comm_error);
    }
}

TEST_CASE("mpi: ranks that disagree all throw the same comm_error and the communicator goes on") {
    const int m = world_size();
    const int me = world_rank();
    loco::comm::mpi comm(MPI_COMM_WORLD);
    if (m > 1) {
        std::vector<float> x(me == 0 ? 4 : 5, 1.0f);
        const auto before = x;
        CHECK_THROWS_WITH_AS(comm.all_reduce(loco::host_tensor(x.data(), x.size()), reduce_op::sum),
                             doctest::Contains("ranks disagree on the size: from 4 floats to 5 floats"),
                             loco::comm_error);
        CHECK(x == before);  // no data moved

        std::vector<std::byte> bytes(8);
        std::vector<std::byte> recv(8 * static_cast<std::size_t>(m));
        const auto call = [&] {
            if (me == 0) {
                comm.broadcast(loco::host_tensor(bytes.data(), bytes.size()), 0);
            } else {
                comm.all_gather(loco::host_tensor(static_cast<const std::byte*>(bytes.data()), 8),
                                loco::host_tensor(recv.data(), recv.size()));
            }
        };
        CHECK_THROWS_WITH_AS(call(), doctest::Contains("ranks disagree on the collective: some called all_gather, others broadcast"),
                             loco::comm_error);
        CHECK_THROWS_WITH_AS(comm.broadcast(loco::host_tensor(bytes.data(), bytes.size()), me == 0 ? 0 : 1),
                             doctest::Contains("ranks disagree on the root"), loco::comm_error);
        CHECK_THROWS_WITH_AS(comm.all_reduce(loco::host_tensor(x.data(), 4),
                                             me == 0 ? reduce_op::sum : reduce_op::mean),
                             doctest::Contains("ranks disagree on the reduce operation"), loco::comm_error);
    }
    // Still usable: every rank refused the same calls.
    std::vector<float> y(7, 2.0f);
    comm.all_reduce(loco::host_tensor(y.data(), y.size()), reduce_op::mean);
    CHECK(y == std::vector<float>(7, 2.0f));
    // The base class's argument checks come first, on each rank alone.
    std::vector<std::byte> small(3);
    CHECK_THROWS_AS(comm.all_gather(loco::host_tensor(static_cast<const std::byte*>(small.data()), 3),
                                    loco::host_tensor(small.data(), 3 * static_cast<std::size_t>(m) - 1)),
                    loco::shape_error);
    CHECK_THROWS_AS(comm.broadcast(loco::host_tensor(small.data(), 3), m), loco::invalid_argument);
    CHECK_THROWS_AS(comm.all_reduce(loco::cuda_tensor(y.data(), y.size()), reduce_op::sum),
                    loco::memory_space_error);
}

TEST_CASE("mpi: an MPI error becomes a comm_error with MPI's text, and the communicator refuses later calls") {
    // Without the call check, the root broadcasts 64 bytes into a peer that expects 16: MPI itself
    // reports the truncation on the receiver. In pairs of ranks, so that the broadcast goes straight
    // from root to receiver (in a larger tree, a receiver that failed would never forward the data
    // and its children would wait forever: MPI has no timeout).
    const int me = world_rank();
    MPI_Comm pair = MPI_COMM_NULL;
    MPI_Comm_split(MPI_COMM_WORLD, me / 2, me, &pair);
    loco::comm::mpi comm(pair, {.take_ownership = true, .check_calls = false});
    std::vector<std::byte> data(comm.rank() == 0 ? 64 : 16);
    std::string message;
    try {
        comm.broadcast(loco::host_tensor(data.data(), data.size()), 0);
    } catch (const loco::comm_error& e) {
        message = e.what();
    }
    if (comm.rank() == 1) {
        CHECK(message.find("loco::comm::mpi rank 1, broadcast: MPI_Bcast failed: MPI_ERR_TRUNCATE") !=
              std::string::npos);
        CHECK_THROWS_WITH_AS(comm.barrier(), doctest::Contains("an earlier MPI error left this communicator unusable"),
                             loco::comm_error);
    } else {
        CHECK(message.empty());
    }
    MPI_Barrier(MPI_COMM_WORLD);
}

TEST_CASE("mpi: bad communicators and sizes are refused at construction") {
    const int m = world_size();
    CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_NULL), doctest::Contains("MPI_COMM_NULL"),
                         loco::invalid_argument);
    const std::string wrong_size = "expected " + std::to_string(m + 1) +
                                   " ranks but the MPI communicator has " + std::to_string(m);
    CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_WORLD, {.expected_size = m + 1}),
                         doctest::Contains(wrong_size.c_str()), loco::comm_error);
    CHECK_THROWS_AS(loco::comm::mpi(MPI_COMM_WORLD, {.expected_size = -1}), loco::invalid_argument);
    CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_WORLD, {.take_ownership = true}),
                         doctest::Contains("cannot be freed"), loco::invalid_argument);
    // One rank alone refusing its options: it throws its own error, every other rank says a peer
    // refused (they used to wait in MPI_Comm_dup for ever).
    if (m >= 2) {
        const bool alone = world_rank() == m - 1;
        const auto one_refuses = [&](loco::comm::mpi::options opts) {
            try {
                loco::comm::mpi comm(MPI_COMM_WORLD, alone ? opts : loco::comm::mpi::options{});
            } catch (const loco::error& e) {
                return std::string(e.what());
            }
            return std::string("constructed");
        };
        const std::string peer = "another rank refused its options at construction";
        const std::string size_refusal = one_refuses({.expected_size = m + 1});
        CHECK(size_refusal.find(alone ? wrong_size : peer) != std::string::npos);
        const std::string owner_refusal = one_refuses({.take_ownership = true});
        CHECK(owner_refusal.find(alone ? "cannot be freed" : peer.c_str()) != std::string::npos);
        MPI_Comm dup = MPI_COMM_NULL;
        MPI_Comm_dup(MPI_COMM_WORLD, &dup);
        // Any communicator works, not only the world: a rank's bad expected_size on a dup.
        try {
            loco::comm::mpi comm(dup, alone ? loco::comm::mpi::options{.expected_size = -1}
                                            : loco::comm::mpi::options{});
            CHECK(false);
        } catch (const loco::invalid_argument& e) {
            CHECK(alone);
            CHECK(std::string(e.what()).find("expected_size must be >= 0") != std::string::npos);
        } catch (const loco::comm_error& e) {
            CHECK_FALSE(alone);
            CHECK(std::string(e.what()).find(peer) != std::string::npos);
        }
        MPI_Comm_free(&dup);
    }
    loco::comm::mpi ok(MPI_COMM_WORLD, {.expected_size = m});
    CHECK(ok.size() == m);
    CHECK(ok.handle() == MPI_COMM_WORLD);

    // diloco refuses a communicator of another size than it was configured for.
    std::vector<float> w(4, 1.0f), g(4, 0.0f);
    loco::parameter_list list;
    list.add("w", w, g);
    using opt_t = loco::diloco<loco::inner::sgd, loco::outer::sgd>;
    const std::string refused = "communicator has " + std::to_string(m) + " ranks";
    CHECK_THROWS_WITH_AS(opt_t(list, ok, {.workers = m + 1}), doctest::Contains(refused.c_str()),
                         loco::comm_error);
}

TEST_CASE("mpi: an inter-communicator, ownership of MPI_COMM_SELF and a max_count below the ranks are refused") {
    const int m = world_size();
    const int me = world_rank();
    // MPI_COMM_SELF is MPI's as much as MPI_COMM_WORLD: freeing it in the destructor is an error.
    CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_SELF, {.take_ownership = true}),
                         doctest::Contains("cannot be freed"), loco::invalid_argument);
    // max_count must hold one float per rank (an all_reduce's pieces are multiples of M floats):
    // M - 1 is refused on every rank, M accepted.
    if (m > 1) {
        CHECK_THROWS_WITH_AS(loco::comm::mpi(MPI_COMM_WORLD, {.max_count = static_cast<std::size_t>(m - 1)}),
                             doctest::Contains("max_count must be in [number of ranks"),
                             loco::invalid_argument);
    }
    CHECK_NOTHROW(loco::comm::mpi(MPI_COMM_WORLD, {.max_count = static_cast<std::size_t>(m)}));
    // An inter-communicator between the even and the odd ranks: loco's collectives need an
    // intra-communicator, so it is refused (on every rank, before any collective over it).
    if (m > 1) {
        MPI_Comm half = MPI_COMM_NULL;
        MPI_Comm_split(MPI_COMM_WORLD, me % 2, me, &half);
        MPI_Comm inter = MPI_COMM_NULL;
        MPI_Intercomm_create(half, 0, MPI_COMM_WORLD, me % 2 == 0 ? 1 : 0, 77, &inter);
        CHECK_THROWS_WITH_AS(loco::comm::mpi{inter}, doctest::Contains("an inter-communicator was given"),
                             loco::invalid_argument);
        MPI_Comm_free(&inter);
        MPI_Comm_free(&half);
    }
}

TEST_CASE("mpi over a sub-communicator it owns: even and odd ranks reduce separately") {
    const int me = world_rank();
    MPI_Comm half = MPI_COMM_NULL;
    MPI_Comm_split(MPI_COMM_WORLD, me % 2, me, &half);
    loco::comm::mpi comm(half, {.take_ownership = true});
    int half_size = 0;
    MPI_Comm_size(half, &half_size);
    CHECK(comm.size() == half_size);
    CHECK(comm.rank() == me / 2);
    const std::size_t n = 999;
    const std::string label = "half " + std::to_string(me % 2);
    const auto want = on_threads<reduce_result>(half_size, comm.rank(), [&](loco::comm::communicator& t) {
        auto x = rank_input(label, t.rank(), n);
        t.all_reduce(loco::host_tensor(x.data(), n), reduce_op::sum);
        return reduce_result{x, t.bytes_sent()};
    });
    auto x = rank_input(label, comm.rank(), n);
    comm.all_reduce(loco::host_tensor(x.data(), n), reduce_op::sum);
    CHECK(same_bits(x, want.data));
    CHECK(comm.bytes_sent() == want.bytes);
}  // the communicator frees `half`

namespace {

// The state a DiLoCo run ends with on one rank.
struct run_result {
    std::vector<float> params;
    std::vector<float> global;
    std::vector<float> compressor_state;
    std::uint64_t bytes = 0;
    std::uint64_t outer_steps = 0;
};

// A DiLoCo run: a 12 x 20 matrix, a 37-vector and a 5-vector, inner SGD with momentum, outer
// Nesterov, four syncs of H = 3 steps, random starting points (rank 0's win) and gradients per
// (rank, step). (Not AdamW: its first steps move every element by almost exactly lr, and sums of
// such pseudo-gradients are exact in any order, which would hide a wrong summation order.)
template <class Compressor>
run_result diloco_run(loco::comm::communicator& comm, const std::string& label,
                      typename Compressor::hyper compress_hyper, loco::exchange_scheme scheme) {
    const std::size_t rows = 12, cols = 20;
    const std::size_t total = rows * cols + 37 + 5;
    auto init = [&] {
        auto rng = rng_for(label + "/init/" + std::to_string(comm.rank()));
        return normal_floats(rng, total);
    }();
    std::vector<float> flat = init, grad(total);
    loco::parameter_list list;
    list.add_views("w", loco::host_matrix(flat.data(), rows, cols),
                   loco::host_matrix(static_cast<const float*>(grad.data()), rows, cols));
    list.add_views("b", loco::host_tensor(flat.data() + rows * cols, 37),
                   loco::host_tensor(static_cast<const float*>(grad.data()) + rows * cols, 37));
    list.add_views("c", loco::host_tensor(flat.data() + rows * cols + 37, 5),
                   loco::host_tensor(static_cast<const float*>(grad.data()) + rows * cols + 37, 5));
    loco::diloco<loco::inner::sgd, loco::outer::nesterov, Compressor> opt(
        list, comm,
        {.inner = {.lr = 0.05f, .momentum = 0.9f},
         .outer = {.lr = 0.7f, .momentum = 0.9f},
         .schedule = {.every = 3},
         .compress = compress_hyper,
         .exchange = scheme,
         .seed = 1234});
    opt.start();
    for (int step = 1; step <= 12; ++step) {
        auto rng = rng_for(label + "/grad/" + std::to_string(comm.rank()) + "/" + std::to_string(step));
        const auto fresh = normal_floats(rng, total);
        std::copy(fresh.begin(), fresh.end(), grad.begin());
        opt.step();
    }
    return {flat, std::vector<float>(opt.global().begin(), opt.global().end()),
            std::vector<float>(opt.compressor_state().begin(), opt.compressor_state().end()),
            comm.bytes_sent(), opt.outer_steps()};
}

template <class Compressor>
void check_diloco_matches_threads(const std::string& label, typename Compressor::hyper h,
                                  loco::exchange_scheme scheme = loco::exchange_scheme::automatic,
                                  std::size_t max_count = static_cast<std::size_t>(INT_MAX)) {
    const int m = world_size();
    const int me = world_rank();
    CAPTURE(label);
    const auto want = on_threads<run_result>(m, me, [&](loco::comm::communicator& t) {
        return diloco_run<Compressor>(t, label, h, scheme);
    });
    loco::comm::mpi comm(MPI_COMM_WORLD, {.max_count = max_count});
    const auto got = diloco_run<Compressor>(comm, label, h, scheme);
    CHECK(got.outer_steps == 4);
    CHECK(same_bits(got.params, want.params));
    CHECK(same_bits(got.global, want.global));
    CHECK(same_bits(got.compressor_state, want.compressor_state));
    CHECK(got.bytes == want.bytes);
    // The run did move the parameters (a run that changed nothing would match trivially).
    auto rng = rng_for(label + "/init/0");
    CHECK(!same_bits(got.params, normal_floats(rng, got.params.size())));
    // And every MPI rank holds the same parameters after the last sync.
    std::vector<float> rank0 = got.params;
    MPI_Bcast(rank0.data(), static_cast<int>(rank0.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    CHECK(all_ranks(same_bits(rank0, got.params)));
}

}  // namespace

TEST_CASE("mpi diloco equals threads bit for bit: no compression") {
    check_diloco_matches_threads<loco::compress::none>("diloco none", {});
    check_diloco_matches_threads<loco::compress::none>("diloco none gather", {},
                                                       loco::exchange_scheme::all_gather);
}

TEST_CASE("mpi diloco equals threads bit for bit: cast<bf16>") {
    check_diloco_matches_threads<loco::compress::cast<loco::bf16>>("diloco bf16", {});
}

TEST_CASE("mpi diloco equals threads bit for bit: blockwise<4> with stochastic rounding") {
    check_diloco_matches_threads<loco::compress::blockwise<4, 32>>(
        "diloco blockwise", {.round = loco::compress::rounding::stochastic});
}

TEST_CASE("mpi diloco equals threads bit for bit: statistical<2> with error feedback, both schemes") {
    using ef = loco::compress::error_feedback<loco::compress::statistical<2>>;
    check_diloco_matches_threads<ef>("diloco statistical", {.decay = 0.9f});
    check_diloco_matches_threads<ef>("diloco statistical two-phase", {.decay = 0.9f},
                                     loco::exchange_scheme::two_phase);
}

TEST_CASE("mpi diloco equals threads bit for bit: topk") {
    check_diloco_matches_threads<loco::compress::topk>("diloco topk", {.ratio = 0.1f});
}

TEST_CASE("mpi diloco equals threads bit for bit with every collective in pieces of a few elements") {
    // What a model past MPI's int counts does (start()'s broadcast of the whole model from 537M
    // parameters, the exchanges of the larger fragments), at a size a test can run.
    const std::size_t few = 2 * static_cast<std::size_t>(world_size()) + 1;
    check_diloco_matches_threads<loco::compress::none>("diloco none pieces", {},
                                                       loco::exchange_scheme::automatic, few);
    check_diloco_matches_threads<loco::compress::cast<loco::bf16>>(
        "diloco bf16 pieces", {}, loco::exchange_scheme::automatic, few);
    using ef = loco::compress::error_feedback<loco::compress::statistical<2>>;
    check_diloco_matches_threads<ef>("diloco statistical two-phase pieces", {.decay = 0.9f},
                                     loco::exchange_scheme::two_phase, few);
}
