// The threads communicator: every collective for M in {1, 2, 3, 8} against a reference computed in
// the test from all ranks' inputs, bit-identical results on every rank, bytes counted against the
// formulas in comm/threads.hpp, and the failure modes (disagreeing ranks, timeouts, aborts, wrong
// memory space, bad sizes).
#include <doctest/doctest.h>

#include "support/random.hpp"

#include <loco/comm/single.hpp>
#include <loco/comm/threads.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace loco_test;
using loco::comm::reduce_op;

// Rank r's input of an all-reduce: drawn from a stream every rank can regenerate, so each rank can
// compute the expected result itself.
std::vector<float> rank_input(const std::string& label, int rank, std::size_t n) {
    auto rng = rng_for(label + "/" + std::to_string(rank));
    return normal_floats(rng, n);
}

// Bytes rank r sends in an all-reduce of n floats over m ranks (comm/threads.hpp).
std::uint64_t all_reduce_bytes(std::size_t n, int m, int r) {
    const std::size_t chunk = n * std::size_t(r + 1) / std::size_t(m) - n * std::size_t(r) / std::size_t(m);
    return 4 * (n + (std::size_t(m) - 2) * chunk);
}

const int world_sizes[] = {1, 2, 3, 8};

}  // namespace

TEST_CASE("threads all_reduce: sum and mean match a double reference, identical on every rank") {
    for (const int m : world_sizes) {
        for (const std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t(m - 1 > 0 ? m - 1 : 1),
                                    std::size_t(m), std::size_t{1000}, std::size_t{1003}}) {
            for (const reduce_op op : {reduce_op::sum, reduce_op::mean}) {
                CAPTURE(m);
                CAPTURE(n);
                CAPTURE(op == reduce_op::sum ? "sum" : "mean");
                const std::string label = "all_reduce " + std::to_string(m) + " " + std::to_string(n);
                std::vector<std::vector<float>> results(static_cast<std::size_t>(m));
                std::vector<std::uint64_t> bytes(static_cast<std::size_t>(m));
                loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
                    auto data = rank_input(label, comm.rank(), n);
                    comm.all_reduce(loco::host_tensor(data.data(), data.size()), op);
                    results[static_cast<std::size_t>(comm.rank())] = data;
                    bytes[static_cast<std::size_t>(comm.rank())] = comm.bytes_sent();
                });
                // Reference in double from every rank's input.
                std::vector<double> want(n, 0.0);
                std::vector<double> magnitude(n, 0.0);
                for (int r = 0; r < m; ++r) {
                    const auto in = rank_input(label, r, n);
                    for (std::size_t i = 0; i < n; ++i) {
                        want[i] += in[i];
                        magnitude[i] += std::abs(double(in[i]));
                    }
                }
                std::size_t bad = 0;
                for (std::size_t i = 0; i < n; ++i) {
                    const double scale = op == reduce_op::mean ? 1.0 / m : 1.0;
                    // Float summation of m terms: within m units of rounding of the magnitudes.
                    const double tol = 1.2e-7 * m * magnitude[i] * scale + 1e-30;
                    if (std::abs(results[0][i] - want[i] * scale) > tol) {
                        ++bad;
                    }
                }
                CHECK(bad == 0);
                for (int r = 1; r < m; ++r) {  // bit-identical (memcmp also tells -0 from +0)
                    CHECK((n == 0 || std::memcmp(results[0].data(), results[static_cast<std::size_t>(r)].data(),
                                                 n * sizeof(float)) == 0));
                }
                for (int r = 0; r < m; ++r) {
                    CHECK(bytes[static_cast<std::size_t>(r)] == all_reduce_bytes(n, m, r));
                }
            }
        }
    }
}

TEST_CASE("threads all_reduce mean over 3 ranks is the rank-order sum divided by 3, bit for bit") {
    // The mean is the rank-order float sum divided by M, as comm::mpi computes it (the MPI tests
    // compare the two bit for bit); multiplying by a rounded 1/M differs in the last bit for
    // about a third of the values when M = 3.
    const int m = 3;
    auto sizes = rng_for("mean over 3 ranks size");
    const std::size_t n = 2000 + std::size_t(sizes() % 1000);
    CAPTURE(n);
    const std::string label = "mean over 3 ranks";
    std::vector<std::vector<float>> results(static_cast<std::size_t>(m));
    loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
        auto data = rank_input(label, comm.rank(), n);
        comm.all_reduce(loco::host_tensor(data.data(), n), reduce_op::mean);
        results[static_cast<std::size_t>(comm.rank())] = data;
    });
    std::vector<float> want = rank_input(label, 0, n);
    for (int r = 1; r < m; ++r) {
        const auto in = rank_input(label, r, n);
        for (std::size_t i = 0; i < n; ++i) want[i] += in[i];
    }
    for (auto& v : want) v /= float(m);
    for (int r = 0; r < m; ++r) {
        CAPTURE(r);
        std::size_t differ = 0;
        for (std::size_t i = 0; i < n; ++i) {
            differ += std::memcmp(&results[std::size_t(r)][i], &want[i], sizeof(float)) != 0;
        }
        CHECK(differ == 0);
    }
}

TEST_CASE("threads all_reduce: integer-valued data sums exactly, and volume is the ring formula") {
    for (const int m : world_sizes) {
        CAPTURE(m);
        const std::size_t n = 8 * 3 * 5 * 7;  // divisible by every world size tested
        std::vector<std::uint64_t> bytes(static_cast<std::size_t>(m));
        std::atomic<int> wrong{0};
        loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
            std::vector<float> data(n);
            for (std::size_t i = 0; i < n; ++i) {
                data[i] = float(comm.rank() + 1) * float(i % 17);
            }
            comm.all_reduce(loco::host_tensor(data.data(), n), reduce_op::sum);
            const float ranks_sum = float(m * (m + 1) / 2);
            for (std::size_t i = 0; i < n; ++i) {
                if (data[i] != ranks_sum * float(i % 17)) {
                    ++wrong;
                }
            }
            bytes[static_cast<std::size_t>(comm.rank())] = comm.bytes_sent();
        });
        CHECK(wrong == 0);
        for (const auto b : bytes) {
            CHECK(b == 2 * std::uint64_t(m - 1) * 4 * n / std::uint64_t(m));
        }
    }
}

TEST_CASE("threads all_gather, broadcast and barrier") {
    for (const int m : world_sizes) {
        CAPTURE(m);
        const std::size_t len = 37;
        std::atomic<int> wrong{0};
        std::atomic<int> arrived{0};
        std::vector<std::uint64_t> bytes(static_cast<std::size_t>(m));
        loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
            const auto pattern = [](int rank, std::size_t i) { return std::byte((rank * 31 + int(i)) & 0xff); };
            // all_gather: rank k's bytes land at k * len.
            std::vector<std::byte> send(len), recv(len * std::size_t(m));
            for (std::size_t i = 0; i < len; ++i) {
                send[i] = pattern(comm.rank(), i);
            }
            comm.all_gather({send.data(), len, 0, 0, loco::memory_space::host},
                            {recv.data(), recv.size(), 0, 0, loco::memory_space::host});
            for (int k = 0; k < m; ++k) {
                for (std::size_t i = 0; i < len; ++i) {
                    if (recv[std::size_t(k) * len + i] != pattern(k, i)) {
                        ++wrong;
                    }
                }
            }
            // broadcast from every root in turn.
            for (int root = 0; root < m; ++root) {
                std::vector<std::byte> data(len);
                for (std::size_t i = 0; i < len; ++i) {
                    data[i] = pattern(comm.rank() + 100, i);
                }
                comm.broadcast({data.data(), len, 0, 0, loco::memory_space::host}, root);
                for (std::size_t i = 0; i < len; ++i) {
                    if (data[i] != pattern(root + 100, i)) {
                        ++wrong;
                    }
                }
            }
            // barrier: nobody leaves before everybody arrived.
            for (int round = 1; round <= 3; ++round) {
                ++arrived;
                comm.barrier();
                if (arrived.load() < round * m) {
                    ++wrong;
                }
                comm.barrier();
            }
            bytes[static_cast<std::size_t>(comm.rank())] = comm.bytes_sent();
        });
        CHECK(wrong == 0);
        // all_gather: (m-1) * len per rank; broadcast: (m-1) * len from each root, once per rank.
        for (const auto b : bytes) {
            CHECK(b == 2 * std::uint64_t(m - 1) * len);
        }
    }
}

TEST_CASE("threads: ranks that disagree on a collective all get the same clear error") {
    std::vector<std::string> messages(2);
    std::atomic<int> recovered{0};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> data(comm.rank() == 0 ? 10 : 12, 1.0f);
        try {
            comm.all_reduce(loco::host_tensor(data.data(), data.size()), reduce_op::mean);
        } catch (const loco::comm_error& e) {
            messages[static_cast<std::size_t>(comm.rank())] = e.what();
        }
        // Nothing moved and the group is still usable.
        if (data == std::vector<float>(data.size(), 1.0f)) {
            std::vector<float> ok(4, float(comm.rank()));
            comm.all_reduce(loco::host_tensor(ok.data(), ok.size()), reduce_op::sum);
            if (ok == std::vector<float>(4, 1.0f)) {
                ++recovered;
            }
        }
    });
    for (const auto& msg : messages) {
        CHECK(msg.find("ranks disagree on the collective: rank 0 called all_reduce (mean) of 10 "
                       "floats, rank 1 called all_reduce (mean) of 12 floats") != std::string::npos);
    }
    CHECK(recovered == 2);

    std::atomic<int> errors{0};
    loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
        std::vector<std::byte> b(8);
        try {
            if (comm.rank() == 2) {
                comm.barrier();
            } else {
                comm.broadcast({b.data(), b.size(), 0, 0, loco::memory_space::host}, 0);
            }
        } catch (const loco::comm_error& e) {
            if (std::string(e.what()).find("called broadcast of 8 bytes from root 0, rank 2 called barrier") !=
                std::string::npos) {
                ++errors;
            }
        }
    });
    CHECK(errors == 3);

    // Calls that differ only in the reduce op, or only in the broadcast root, disagree too: a
    // mean on one rank and a sum on another, or two roots, would give the ranks different data.
    std::vector<std::string> op_messages(2), root_messages(2);
    std::atomic<int> untouched{0};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        const auto input = rank_input("disagree on the op", comm.rank(), 5);
        auto data = input;
        try {
            comm.all_reduce(loco::host_tensor(data.data(), data.size()),
                            r == 0 ? reduce_op::mean : reduce_op::sum);
        } catch (const loco::comm_error& e) {
            op_messages[r] = e.what();
        }
        untouched += std::memcmp(data.data(), input.data(), data.size() * sizeof(float)) == 0;
        std::vector<std::byte> bytes(8, std::byte(0x40 + comm.rank()));
        try {
            comm.broadcast({bytes.data(), bytes.size(), 0, 0, loco::memory_space::host}, comm.rank());
        } catch (const loco::comm_error& e) {
            root_messages[r] = e.what();
        }
        untouched += bytes == std::vector<std::byte>(8, std::byte(0x40 + comm.rank()));
    });
    for (const auto& msg : op_messages) {
        CHECK(msg.find("ranks disagree on the collective: rank 0 called all_reduce (mean) of 5 "
                       "floats, rank 1 called all_reduce (sum) of 5 floats") != std::string::npos);
    }
    for (const auto& msg : root_messages) {
        CHECK(msg.find("ranks disagree on the collective: rank 0 called broadcast of 8 bytes from "
                       "root 0, rank 1 called broadcast of 8 bytes from root 1") !=
              std::string::npos);
    }
    CHECK(untouched == 4);
}

TEST_CASE("threads: two ranks passing the same buffer is refused") {
    std::vector<float> shared(16, 1.0f);
    std::atomic<int> errors{0};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        try {
            comm.all_reduce(loco::host_tensor(shared.data(), shared.size()), reduce_op::sum);
        } catch (const loco::comm_error& e) {
            if (std::string(e.what()).find("passed the same buffer") != std::string::npos) {
                ++errors;
            }
        }
    });
    CHECK(errors == 2);
    CHECK(shared == std::vector<float>(16, 1.0f));
}

TEST_CASE("threads: ranks whose output buffers overlap are refused, not left to race") {
    // Rank 0 reduces v[0, 4), rank 1 v[2, 6): distinct pointers, shared elements.
    for (const int shift : {2, 3}) {
        CAPTURE(shift);
        std::vector<float> v(8, 1.0f);
        std::atomic<int> errors{0};
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            float* mine = v.data() + (comm.rank() == 0 ? 0 : shift);
            try {
                comm.all_reduce(loco::host_tensor(mine, 4), reduce_op::sum);
            } catch (const loco::comm_error& e) {
                if (std::string(e.what()).find("ranks 0 and 1 passed overlapping buffers to "
                                               "all_reduce") != std::string::npos) {
                    ++errors;
                }
            }
        });
        CHECK(errors == 2);
        CHECK(v == std::vector<float>(8, 1.0f));
    }
    // Adjacent buffers do not overlap: taken. All-gather outputs hold M blocks each.
    std::vector<float> adjacent(8, 1.0f);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        comm.all_reduce(loco::host_tensor(adjacent.data() + 4 * comm.rank(), 4), reduce_op::sum);
    });
    CHECK(adjacent == std::vector<float>(8, 2.0f));
    std::vector<std::byte> recv(2 * 2 * 3);
    std::atomic<int> gather_errors{0};
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<std::byte> send(3, std::byte{1});
        // Rank 1's output starts 3 bytes into rank 0's 6.
        std::byte* out = recv.data() + 3 * comm.rank();
        try {
            comm.all_gather({send.data(), 3, 0, 0, loco::memory_space::host},
                            {out, 6, 0, 0, loco::memory_space::host});
        } catch (const loco::comm_error& e) {
            if (std::string(e.what()).find("overlapping buffers to all_gather") != std::string::npos) {
                ++gather_errors;
            }
        }
    });
    CHECK(gather_errors == 2);
}

TEST_CASE("threads: a send buffer inside another rank's output is refused (all_gather, "
          "all_to_all)") {
    // Rank 1 sends bytes 0-2 of rank 0's receive buffer, which rank 0 overwrites while every
    // rank reads them: refused on every rank, nothing written.
    for (const bool to_all : {false, true}) {
        CAPTURE(to_all);
        std::vector<std::byte> recv0(6, std::byte{7}), recv1(6, std::byte{8});
        std::vector<std::byte> send0(to_all ? 6 : 3, std::byte{1});
        std::atomic<int> errors{0};
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            const bool first = comm.rank() == 0;
            std::byte* send = first ? send0.data() : recv0.data();
            const std::size_t n = to_all ? 6 : 3;
            const loco::tensor_view<const std::byte> in{send, n, 0, 0, loco::memory_space::host};
            const loco::tensor_view<std::byte> out{first ? recv0.data() : recv1.data(), 6, 0, 0,
                                                   loco::memory_space::host};
            try {
                if (to_all) {
                    comm.all_to_all(in, out);
                } else {
                    comm.all_gather(in, out);
                }
            } catch (const loco::comm_error& e) {
                const std::string want = std::string("rank 1's send buffer lies in rank 0's "
                                                     "receive buffer in ") +
                                         (to_all ? "all_to_all" : "all_gather");
                if (std::string(e.what()).find(want) != std::string::npos) ++errors;
            }
        });
        CHECK(errors == 2);
        CHECK(recv0 == std::vector<std::byte>(6, std::byte{7}));
        CHECK(recv1 == std::vector<std::byte>(6, std::byte{8}));
    }
    // A send buffer right after another rank's output does not touch it: taken.
    std::vector<std::byte> block(6 + 3);
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<std::byte> recv(6), send0(3, std::byte{1});
        if (comm.rank() == 1) std::fill(block.begin() + 6, block.end(), std::byte{2});
        const std::byte* send = comm.rank() == 0 ? send0.data() : block.data() + 6;
        std::byte* out = comm.rank() == 0 ? block.data() : recv.data();
        comm.all_gather({send, 3, 0, 0, loco::memory_space::host},
                        {out, 6, 0, 0, loco::memory_space::host});
    });
    CHECK(block[0] == std::byte{1});
    CHECK(block[5] == std::byte{2});
    // Nor does a send buffer ending exactly where another rank's output begins (rank 1 sends
    // bytes [0, 3) of a block whose bytes [3, 9) are rank 0's output): taken, and gathered.
    auto rng = rng_for("send buffer before another rank's output");
    std::vector<std::byte> sends(6);
    for (auto& b : sends) b = std::byte(rng() & 0xff);
    std::vector<std::byte> joined(3 + 6), recv1(6);
    std::copy(sends.begin() + 3, sends.end(), joined.begin());
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        const bool first = comm.rank() == 0;
        const std::byte* send = first ? sends.data() : joined.data();
        std::byte* out = first ? joined.data() + 3 : recv1.data();
        comm.all_gather({send, 3, 0, 0, loco::memory_space::host},
                        {out, 6, 0, 0, loco::memory_space::host});
    });
    CHECK(std::vector<std::byte>(joined.begin() + 3, joined.end()) == sends);
    CHECK(recv1 == sends);
    CHECK(std::equal(joined.begin(), joined.begin() + 3, sends.begin() + 3));  // read, not written
}

TEST_CASE("threads: one communicator per rank at a time") {
    auto group = std::make_shared<loco::comm::thread_group>(2);
    {
        loco::comm::threads first(group, 0);
        CHECK_THROWS_WITH_AS(loco::comm::threads(group, 0),
                             "loco::comm::threads: rank 0 already has a communicator in this "
                             "thread group; each rank needs its own, one at a time",
                             loco::invalid_argument);
        CHECK_NOTHROW(loco::comm::threads(group, 1));
    }
    // Released with its communicator.
    CHECK_NOTHROW(loco::comm::threads(group, 0));
}

TEST_CASE("threads: a timeout of milliseconds::max() means never, and a huge link latency saturates") {
    // "Never" is clamped to about a century instead of overflowing inside wait_for (which made
    // a rank give up at once when a peer was late).
    auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::milliseconds::max());
    CHECK(group->timeout() == loco::comm::detail::rendezvous::longest_timeout);
    std::atomic<bool> ok0{false}, ok1{false};
    std::thread late([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        loco::comm::threads rank1(group, 1);
        rank1.barrier();
        ok1 = true;
    });
    {
        loco::comm::threads rank0(group, 0);
        rank0.barrier();
        ok0 = true;
    }
    late.join();
    CHECK(ok0);
    CHECK(ok1);
    CHECK_FALSE(group->aborted());

    // The latency term saturates like the bandwidth term (about 95 years), never negative.
    const loco::comm::link_model huge{0.0, std::chrono::microseconds::max()};
    const auto t = huge.time_for(0);
    CHECK(t > std::chrono::hours(24 * 365 * 90));
    CHECK(t <= std::chrono::seconds(3'000'000'000LL));
    const loco::comm::link_model slow{1.0, std::chrono::seconds(2'999'999'999LL)};
    CHECK(slow.time_for(std::uint64_t{1} << 60) <= std::chrono::seconds(3'000'000'000LL));
    // Ordinary values stay exact.
    const loco::comm::link_model usual{1e6, std::chrono::microseconds(1500)};
    CHECK(usual.time_for(1000) == std::chrono::microseconds(2500));
}

TEST_CASE("threads: a peer that never arrives times out instead of hanging") {
    auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::milliseconds(100));
    loco::comm::threads rank0(group, 0);
    std::vector<float> data(8, 2.0f);
    const auto start = std::chrono::steady_clock::now();
    CHECK_THROWS_WITH_AS(rank0.all_reduce(loco::host_tensor(data.data(), data.size()), reduce_op::sum),
                         doctest::Contains("rank 0 waited 100 ms for its peers; only 1 of 2 ranks arrived"),
                         loco::comm_error);
    // Given up on after the whole timeout, counted in milliseconds, and not much later.
    CHECK(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(90));
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
    CHECK(data == std::vector<float>(8, 2.0f));
    // The group is aborted: every later call fails at once.
    CHECK(group->aborted());
    CHECK_THROWS_WITH_AS(rank0.barrier(), doctest::Contains("aborted"), loco::comm_error);
}

TEST_CASE("threads: a peer a little late, well inside the timeout, is waited for") {
    // The timeout is in milliseconds: a peer 50 ms late under a 5 s timeout (far above any
    // scheduling delay of a loaded machine) must find its peer still waiting, at a barrier and
    // at an all_reduce.
    std::atomic<int> ok{0};
    CHECK_NOTHROW(loco::comm::run_threads(
        2,
        [&](loco::comm::threads& comm) {
            std::vector<float> data(16, float(comm.rank() + 1));
            if (comm.rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
            comm.barrier();
            if (comm.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
            comm.all_reduce(loco::host_tensor(data.data(), data.size()), reduce_op::sum);
            ok += data == std::vector<float>(16, 3.0f);
        },
        std::chrono::seconds(5)));
    CHECK(ok == 2);
}

TEST_CASE("run_threads: a failing rank aborts its peers and its own exception is rethrown") {
    const auto start = std::chrono::steady_clock::now();
    std::atomic<int> peers_released{0};
    CHECK_THROWS_WITH_AS(
        loco::comm::run_threads(
            4,
            [&](loco::comm::threads& comm) {
                if (comm.rank() == 2) {
                    throw std::runtime_error("rank 2 lost its data");
                }
                std::vector<float> data(8, 1.0f);
                try {
                    comm.all_reduce(loco::host_tensor(data.data(), data.size()), reduce_op::sum);
                } catch (const loco::comm_error&) {
                    ++peers_released;
                    throw;
                }
            },
            std::chrono::seconds(60)),
        "rank 2 lost its data", std::runtime_error);
    CHECK(peers_released == 3);
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(30));
}

TEST_CASE("communicator arguments are checked before anything moves") {
    loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
        std::vector<float> data(4, 1.0f);
        CHECK_THROWS_WITH_AS(comm.all_reduce(loco::cuda_tensor(data.data(), data.size()), reduce_op::sum),
                             doctest::Contains("got a buffer in cuda memory but this communicator moves host memory"),
                             loco::memory_space_error);
        std::vector<std::byte> send(4), recv(7);
        CHECK_THROWS_WITH_AS(comm.all_gather({send.data(), 4, 0, 0, loco::memory_space::host},
                                             {recv.data(), 7, 0, 0, loco::memory_space::host}),
                             doctest::Contains("the receive buffer holds 7 bytes but 2 ranks x 4 bytes"),
                             loco::shape_error);
        // One byte more than 2 ranks x 4 bytes: its quotient by the rank count is the send size,
        // but it is no whole number of blocks.
        std::vector<std::byte> longer(2 * 4 + 1, std::byte{0x5c});
        CHECK_THROWS_WITH_AS(comm.all_gather({send.data(), 4, 0, 0, loco::memory_space::host},
                                             {longer.data(), 9, 0, 0, loco::memory_space::host}),
                             doctest::Contains("the receive buffer holds 9 bytes but 2 ranks x 4 bytes"),
                             loco::shape_error);
        CHECK(longer == std::vector<std::byte>(9, std::byte{0x5c}));
        // A send size whose product with the rank count wraps around to the receive size (2^63
        // + 1 bytes x 2 ranks = 2 in 64 bits): refused, not copied.
        CHECK_THROWS_WITH_AS(
            comm.all_gather({send.data(), (std::size_t(1) << 63) + 1, 0, 0,
                             loco::memory_space::host},
                            {recv.data(), 2, 0, 0, loco::memory_space::host}),
            doctest::Contains("the receive buffer holds 2 bytes but 2 ranks x 9223372036854775809 "
                              "bytes were sent"),
            loco::shape_error);
        CHECK_THROWS_AS(comm.broadcast({send.data(), 4, 0, 0, loco::memory_space::host}, 2),
                        loco::invalid_argument);
        CHECK_THROWS_AS(comm.all_reduce(loco::host_tensor(static_cast<float*>(nullptr), 3), reduce_op::sum),
                        loco::invalid_argument);
        // Argument errors are local: the group is still healthy.
        comm.all_reduce(loco::host_tensor(data.data(), data.size()), reduce_op::sum);
        CHECK(data == std::vector<float>(4, 2.0f));
    });
    CHECK_THROWS_AS(loco::comm::thread_group(0), loco::invalid_argument);
    auto group = std::make_shared<loco::comm::thread_group>(2);
    CHECK_THROWS_AS(loco::comm::threads(group, 2), loco::invalid_argument);
    CHECK_THROWS_AS(loco::comm::threads(nullptr, 0), loco::invalid_argument);
}

TEST_CASE("comm::single is the identity and sends nothing") {
    loco::comm::single comm;
    std::vector<float> data{1.0f, -2.0f, 3.5f};
    comm.all_reduce(loco::host_tensor(data.data(), data.size()), reduce_op::mean);
    CHECK(data == std::vector<float>{1.0f, -2.0f, 3.5f});
    std::vector<std::byte> send{std::byte{1}, std::byte{2}}, recv(2);
    comm.all_gather({send.data(), 2, 0, 0, loco::memory_space::host},
                    {recv.data(), 2, 0, 0, loco::memory_space::host});
    CHECK(recv == send);
    comm.barrier();
    CHECK(comm.bytes_sent() == 0);
    CHECK(comm.size() == 1);
    CHECK(comm.rank() == 0);
}

TEST_CASE("threads all_gather in place, and a partially overlapping send buffer is refused") {
    std::atomic<int> wrong{0};
    loco::comm::run_threads(3, [&](loco::comm::threads& comm) {
        std::vector<std::byte> buf(3 * 4, std::byte{0});
        const std::size_t own = std::size_t(comm.rank()) * 4;
        for (std::size_t i = 0; i < 4; ++i) {
            buf[own + i] = std::byte(comm.rank() * 10 + int(i));
        }
        comm.all_gather({buf.data() + own, 4, 0, 0, loco::memory_space::host},
                        {buf.data(), buf.size(), 0, 0, loco::memory_space::host});
        for (int k = 0; k < 3; ++k) {
            for (std::size_t i = 0; i < 4; ++i) {
                if (buf[std::size_t(k) * 4 + i] != std::byte(k * 10 + int(i))) {
                    ++wrong;
                }
            }
        }
        CHECK_THROWS_WITH_AS(comm.all_gather({buf.data() + own + 1, 4, 0, 0, loco::memory_space::host},
                                             {buf.data(), buf.size(), 0, 0, loco::memory_space::host}),
                             doctest::Contains("overlaps the receive buffer"), loco::invalid_argument);
    });
    CHECK(wrong == 0);
}

TEST_CASE("threads all_to_all: block k goes to rank k, (M-1) blocks sent per rank") {
    for (const int m : world_sizes) {
        CAPTURE(m);
        const std::size_t block = 13;
        std::atomic<int> wrong{0};
        std::vector<std::uint64_t> bytes(static_cast<std::size_t>(m));
        loco::comm::run_threads(m, [&](loco::comm::threads& comm) {
            const auto value = [](int from, int to, std::size_t i) { return std::byte((from * 7 + to * 3 + int(i)) & 0xff); };
            std::vector<std::byte> send(block * std::size_t(m)), recv(send.size());
            for (int to = 0; to < m; ++to) {
                for (std::size_t i = 0; i < block; ++i) {
                    send[std::size_t(to) * block + i] = value(comm.rank(), to, i);
                }
            }
            comm.all_to_all({send.data(), send.size(), 0, 0, loco::memory_space::host},
                            {recv.data(), recv.size(), 0, 0, loco::memory_space::host});
            for (int from = 0; from < m; ++from) {
                for (std::size_t i = 0; i < block; ++i) {
                    if (recv[std::size_t(from) * block + i] != value(from, comm.rank(), i)) {
                        ++wrong;
                    }
                }
            }
            CHECK_THROWS_AS(comm.all_to_all({send.data(), send.size(), 0, 0, loco::memory_space::host},
                                            {recv.data(), recv.size() - 1, 0, 0, loco::memory_space::host}),
                            loco::shape_error);
            CHECK_THROWS_AS(comm.all_to_all({send.data(), send.size(), 0, 0, loco::memory_space::host},
                                            {send.data(), send.size(), 0, 0, loco::memory_space::host}),
                            loco::invalid_argument);
            bytes[std::size_t(comm.rank())] = comm.bytes_sent();
        });
        CHECK(wrong == 0);
        for (const auto b : bytes) {
            CHECK(b == std::uint64_t(m - 1) * block);
        }
    }
}
