// The device communicators: comm::cuda_replicas (M replicas on one GPU) against a host reference,
// bit for bit, for M in {1, 2, 3, 8}; their refusals (disagreeing ranks, host buffers, timeouts);
// and comm::nccl with one rank on one GPU, plus the multi-rank NCCL tests that need >= 2 GPUs.
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "device.cuh"

#include <loco/cuda.hpp>

#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// Its own namespace, so that the nvcc build can compile the test files together
// (tests/CMakeLists.txt).
namespace cuda_comm_test {

namespace {

using namespace loco_test;
namespace lc = loco::backend::cuda;
using loco::comm::reduce_op;

std::vector<std::byte> bytes_of(const std::vector<float>& v) {
    std::vector<std::byte> b(v.size() * sizeof(float));
    std::memcpy(b.data(), v.data(), b.size());
    return b;
}

template <class T>
std::vector<T> download(const T* p, std::size_t n) {
    std::vector<T> out(n);
    if (n != 0) {
        check_cuda(cudaMemcpy(out.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    }
    return out;
}

// What every rank must hold after each collective, computed on the host as comm::threads does.
struct expected {
    std::vector<float> sum, mean;
    std::vector<std::byte> gathered;
    std::vector<std::vector<std::byte>> to_all;  // per receiving rank
    std::vector<float> broadcast;                // the root's data
    std::vector<std::uint64_t> bytes;            // bytes_sent per rank after all collectives
};

expected reference(const std::vector<std::vector<float>>& data, int root) {
    const std::size_t m = data.size();
    const std::size_t n = data[0].size();
    expected e;
    e.sum.resize(n);
    e.mean.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
        float acc = data[0][i];
        for (std::size_t k = 1; k < m; ++k) {
            acc += data[k][i];
        }
        e.sum[i] = acc;
        e.mean[i] = acc / static_cast<float>(m);
    }
    for (const auto& d : data) {
        const auto b = bytes_of(d);
        e.gathered.insert(e.gathered.end(), b.begin(), b.end());
    }
    // all_to_all over the whole byte buffer (n floats, m blocks): n*4 must divide by m; the
    // tests pick n accordingly.
    const std::size_t block = n * sizeof(float) / m;
    e.to_all.assign(m, std::vector<std::byte>(m * block));
    for (std::size_t r = 0; r < m; ++r) {
        for (std::size_t k = 0; k < m; ++k) {
            const auto src = bytes_of(data[k]);
            std::memcpy(e.to_all[r].data() + k * block, src.data() + r * block, block);
        }
    }
    e.broadcast = data[std::size_t(root)];
    e.bytes.assign(m, 0);
    for (std::size_t r = 0; r < m; ++r) {
        const std::size_t chunk = n * (r + 1) / m - n * r / m;
        const std::uint64_t reduce = m > 1 ? 4 * (n + (m - 2) * chunk) : 0;
        e.bytes[r] = 2 * reduce                          // sum and mean
                     + 2 * (m - 1) * n * sizeof(float)   // all_gather, twice (in place too)
                     + (m - 1) * block                    // all_to_all
                     + (r == std::size_t(root) ? (m - 1) * n * sizeof(float) : 0);
    }
    return e;
}

// Runs every collective on `comm` with this rank's data and checks the results. With `sum_out`,
// the reductions are compared loosely (NCCL adds in its own order) and the sum is handed back
// for a comparison across ranks; otherwise they must equal the rank-ordered reference exactly.
void exercise(loco::comm::communicator& comm, const std::vector<float>& mine, const expected& e,
              int root, std::mutex& mutex, std::vector<float>* sum_out = nullptr) {
    const std::size_t m = std::size_t(comm.size());
    const std::size_t n = mine.size();
    const std::size_t r = std::size_t(comm.rank());
    lc::device_buffer<float> buf(n);
    lc::device_buffer<std::byte> recv(m * n * sizeof(float));
    std::vector<float> got_sum, got_mean, got_bcast;
    std::vector<std::byte> got_gather, got_gather_inplace, got_to_all;

    buf.upload(mine);
    comm.all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::sum);
    got_sum = buf.download();
    buf.upload(mine);
    comm.all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::mean);
    got_mean = buf.download();

    buf.upload(mine);
    const auto send = loco::comm::as_bytes(loco::tensor_view<const float>(loco::cuda_tensor(buf.get(), n)));
    comm.all_gather(send, loco::cuda_tensor(recv.get(), recv.size()));
    got_gather = recv.download();
    // In place: this rank's data already in its slot.
    check_cuda(cudaMemset(recv.get(), 0xab, recv.size_bytes()), "poison");
    check_cuda(cudaMemcpy(recv.get() + r * n * sizeof(float), mine.data(), n * sizeof(float),
                          cudaMemcpyHostToDevice),
               "own slot");
    // The communicators run on streams of their own: the legacy stream's work must be done.
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    comm.all_gather(loco::tensor_view<const std::byte>{recv.get() + r * n * sizeof(float),
                                                       n * sizeof(float), 0, 0,
                                                       loco::memory_space::cuda},
                    loco::cuda_tensor(recv.get(), recv.size()));
    got_gather_inplace = recv.download();

    lc::device_buffer<std::byte> a2a(n * sizeof(float));
    comm.all_to_all(send, loco::cuda_tensor(a2a.get(), a2a.size()));
    got_to_all = a2a.download();

    buf.upload(r == std::size_t(root) ? mine : std::vector<float>(n, -1.0f));
    comm.broadcast(loco::comm::as_bytes(loco::cuda_tensor(buf.get(), n)), root);
    got_bcast = buf.download();
    comm.barrier();

    std::lock_guard<std::mutex> lock(mutex);
    CAPTURE(r);
    if (sum_out) {
        std::size_t off = 0;
        for (std::size_t i = 0; i < n; ++i) {
            off += std::abs(got_sum[i] - e.sum[i]) > 1e-5f * (1.0f + std::abs(e.sum[i]));
            off += std::abs(got_mean[i] - e.mean[i]) > 1e-5f * (1.0f + std::abs(e.mean[i]));
        }
        CHECK_MESSAGE(off == 0, off << " reduced elements are off the rank-ordered reference");
        *sum_out = got_sum;
    } else {
        CHECK(std::memcmp(got_sum.data(), e.sum.data(), n * sizeof(float)) == 0);
        CHECK(std::memcmp(got_mean.data(), e.mean.data(), n * sizeof(float)) == 0);
    }
    CHECK(got_gather == e.gathered);
    CHECK(got_gather_inplace == e.gathered);
    CHECK(got_to_all == e.to_all[r]);
    CHECK(std::memcmp(got_bcast.data(), e.broadcast.data(), n * sizeof(float)) == 0);
    CHECK(comm.bytes_sent() == e.bytes[r]);
}

}  // namespace

TEST_CASE("cuda_replicas collectives equal the host reference bit for bit") {
    for (const int m : {1, 2, 3, 8}) {
        // 1000008 floats: divisible into 8 all_to_all blocks and not into equal reduce chunks
        // of 3; 40 floats over 8 ranks leaves small chunks.
        for (const std::size_t n : {std::size_t{1000008}, std::size_t{48}}) {
            CAPTURE(m);
            CAPTURE(n);
            std::vector<std::vector<float>> data;
            for (int r = 0; r < m; ++r) {
                auto rng = rng_for("replicas/" + std::to_string(m) + "/" + std::to_string(r));
                data.push_back(normal_floats(rng, n));
            }
            const int root = m - 1;
            const expected e = reference(data, root);
            std::mutex mutex;
            loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
                CHECK(comm.space() == loco::memory_space::cuda);
                exercise(comm, data[std::size_t(comm.rank())], e, root, mutex);
            });
        }
    }
}

TEST_CASE("cuda_replicas refuse disagreeing ranks, host buffers and absent peers") {
    SUBCASE("different sizes: every rank throws the same comm_error") {
        std::mutex mutex;
        std::vector<std::string> messages;
        loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
            lc::device_buffer<float> buf(12);
            const std::size_t n = comm.rank() == 0 ? 10 : 12;
            try {
                comm.all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::sum);
            } catch (const loco::comm_error& e) {
                std::lock_guard<std::mutex> lock(mutex);
                messages.push_back(e.what());
            }
            CHECK(comm.bytes_sent() == 0);
        });
        REQUIRE(messages.size() == 2);
        for (const auto& msg : messages) {
            CHECK(msg.find("disagree") != std::string::npos);
            CHECK(msg.find("10 floats") != std::string::npos);
            CHECK(msg.find("12 floats") != std::string::npos);
        }
    }
    SUBCASE("one buffer shared by two ranks") {
        lc::device_buffer<float> shared(16);
        CHECK_THROWS_AS(loco::comm::run_replicas(2,
                                                 [&](loco::comm::cuda_replicas& comm) {
                                                     comm.all_reduce(
                                                         loco::cuda_tensor(shared.get(), 16),
                                                         reduce_op::sum);
                                                 }),
                        loco::comm_error);
    }
    SUBCASE("a host buffer") {
        CHECK_THROWS_AS(loco::comm::run_replicas(2,
                                                 [&](loco::comm::cuda_replicas& comm) {
                                                     std::vector<float> host(8);
                                                     comm.all_reduce(
                                                         loco::host_tensor(host.data(), 8),
                                                         reduce_op::sum);
                                                 }),
                        loco::memory_space_error);
    }
    SUBCASE("a peer that never arrives") {
        const auto t0 = std::chrono::steady_clock::now();
        try {
            loco::comm::run_replicas(
                2,
                [&](loco::comm::cuda_replicas& comm) {
                    if (comm.rank() == 0) {
                        comm.barrier();
                    }
                },
                std::chrono::milliseconds(300));
            FAIL("a barrier without its peer returned");
        } catch (const loco::comm_error& e) {
            CHECK(std::string(e.what()).find("waited 300 ms") != std::string::npos);
        }
        CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
    }
}

TEST_CASE("split-phase collectives on cuda_replicas and cuda_staging equal the reference") {
    // Two collectives in flight per rank, finished in reverse order; the device data through
    // cuda_replicas, and host data through cuda_staging over cuda_replicas.
    for (const int m : {1, 3}) {
        CAPTURE(m);
        const std::size_t n = 4099;
        std::vector<std::vector<float>> data;
        for (int r = 0; r < m; ++r) {
            auto rng = rng_for("split/" + std::to_string(m) + "/" + std::to_string(r));
            data.push_back(normal_floats(rng, n));
        }
        const expected e = reference(data, 0);
        std::mutex mutex;
        loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
            const std::size_t r = std::size_t(comm.rank());
            lc::device_buffer<float> buf(n);
            lc::device_buffer<float> mine(n);
            lc::device_buffer<std::byte> recv(std::size_t(m) * n * sizeof(float));
            buf.upload(data[r]);
            mine.upload(data[r]);
            check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
            auto reduce = comm.start_all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::sum);
            auto gather = comm.start_all_gather(
                loco::comm::as_bytes(loco::tensor_view<const float>(loco::cuda_tensor(mine.get(), n))),
                loco::cuda_tensor(recv.get(), recv.size()));
            gather.finish();
            reduce.finish();
            CHECK_THROWS_AS(reduce.finish(), loco::invalid_argument);
            const auto got_sum = buf.download();
            const auto got_gather = recv.download();

            // The same through host memory, staged.
            loco::comm::cuda_staging staged(comm);
            std::vector<float> host = data[r];
            std::vector<std::byte> host_recv(std::size_t(m) * n * sizeof(float));
            const auto host_send = bytes_of(data[r]);
            auto mean = staged.start_all_reduce(loco::host_tensor(host.data(), n), reduce_op::mean);
            auto g2 = staged.start_all_gather({host_send.data(), host_send.size(), 0, 0,
                                               loco::memory_space::host},
                                              {host_recv.data(), host_recv.size(), 0, 0,
                                               loco::memory_space::host});
            g2.finish();
            mean.finish();

            std::lock_guard<std::mutex> lock(mutex);
            CAPTURE(r);
            CHECK(std::memcmp(got_sum.data(), e.sum.data(), n * sizeof(float)) == 0);
            CHECK(got_gather == e.gathered);
            CHECK(std::memcmp(host.data(), e.mean.data(), n * sizeof(float)) == 0);
            CHECK(host_recv == e.gathered);
        });
    }
}

namespace {

// The data of each rank for the cuda_staging tests below, and what the collectives must give.
struct staging_case {
    std::vector<std::vector<float>> data;
    expected e;
};
staging_case staging_data(int m, std::size_t n) {
    staging_case c;
    for (int r = 0; r < m; ++r) {
        auto rng = rng_for("staging/" + std::to_string(m) + "/" + std::to_string(r));
        c.data.push_back(normal_floats(rng, n));
    }
    c.e = reference(c.data, 0);
    return c;
}

}  // namespace

TEST_CASE("cuda_staging: a request finished or dropped after its staging is gone") {
    // communicator.hpp: a request may be dropped after its communicator is gone. The requests
    // hold the staging's buffer pool, not the staging: under the emulator's ASan build one that
    // touched its destroyed staging is a use after free. The staging copies on the replica's
    // stream, as the handles pass theirs (what that orders only a GPU shows: the emulator runs
    // every stream in order).
    for (const int m : {1, 3}) {
        CAPTURE(m);
        const std::size_t n = 1031;
        const staging_case c = staging_data(m, n);
        std::mutex mutex;
        loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
            const std::size_t r = std::size_t(comm.rank());
            const auto host_send = bytes_of(c.data[r]);
            std::vector<float> sum = c.data[r];
            std::vector<float> dropped_data = c.data[r];
            std::vector<std::byte> gathered(std::size_t(m) * n * sizeof(float));
            loco::comm::request reduce, gather, dropped;
            bool right_stream = false;
            {
                loco::comm::cuda_staging staged(comm, comm.stream());
                right_stream = staged.stream() == comm.stream();
                reduce = staged.start_all_reduce(loco::host_tensor(sum.data(), n), reduce_op::sum);
                gather = staged.start_all_gather(
                    {host_send.data(), host_send.size(), 0, 0, loco::memory_space::host},
                    {gathered.data(), gathered.size(), 0, 0, loco::memory_space::host});
                dropped = staged.start_all_reduce(loco::host_tensor(dropped_data.data(), n),
                                                  reduce_op::mean);
            }
            gather.finish();
            reduce.finish();
            dropped = loco::comm::request{};

            std::lock_guard<std::mutex> lock(mutex);
            CAPTURE(r);
            CHECK(right_stream);
            CHECK(std::memcmp(sum.data(), c.e.sum.data(), n * sizeof(float)) == 0);
            CHECK(gathered == c.e.gathered);
        });
    }
}

TEST_CASE("cuda_staging: requests finished on another thread while this one starts the next") {
    // communicators.md allows finishing a request on another thread than the one that started
    // it, even while that thread starts the next collective: the finishing thread gives the
    // requests' device buffers back to the pool while this one takes some for the next ones.
    // Unlocked, the pool's list was a data race: under the emulator's ASan build every one of
    // four runs failed (a null buffer taken from the corrupted list, or buffers leaked).
    for (const int m : {1, 3}) {
        CAPTURE(m);
        std::mutex mutex;
        loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
            const int r = comm.rank();
            // Whole numbers, so that sums and means are exact: rank r holds r + 1.
            const float sum = static_cast<float>(m * (m + 1) / 2);
            const float mean = sum / static_cast<float>(m);
            constexpr int k = 6;
            int wrong = 0;
            std::string finisher_error;
            loco::comm::cuda_staging staged(comm, comm.stream());
            for (int it = 0; it < 1000; ++it) {
                std::vector<std::vector<float>> a(k), b(k);
                std::vector<loco::comm::request> finished_there(k);
                for (int i = 0; i < k; ++i) {
                    a[std::size_t(i)].assign(std::size_t(16 * (i + 1)), float(r + 1));
                    finished_there[std::size_t(i)] = staged.start_all_reduce(
                        loco::host_tensor(a[std::size_t(i)].data(), a[std::size_t(i)].size()),
                        reduce_op::sum);
                }
                std::vector<float> mine(8, float(r + 1));
                std::vector<float> gathered(8 * std::size_t(m));
                loco::comm::request gather = staged.start_all_gather(
                    loco::comm::as_bytes(
                        loco::tensor_view<const float>(loco::host_tensor(mine.data(), 8))),
                    loco::comm::as_bytes(loco::host_tensor(gathered.data(), gathered.size())));
                std::atomic<bool> go{false};
                std::thread finisher([&] {
                    while (!go.load()) {
                    }
                    try {
                        for (auto& q : finished_there) {
                            loco::comm::request mine_now = std::move(q);
                            mine_now.finish();
                        }
                        loco::comm::request g = std::move(gather);
                        g.finish();
                    } catch (const std::exception& ex) {
                        finisher_error = ex.what();
                    }
                });
                go = true;
                struct joiner {
                    std::thread& t;
                    ~joiner() {
                        if (t.joinable()) t.join();
                    }
                } const join_finisher{finisher};
                std::vector<loco::comm::request> finished_here(k);
                for (int i = 0; i < k; ++i) {
                    b[std::size_t(i)].assign(std::size_t(16 * ((i + it) % k + 1)), float(r + 1));
                    finished_here[std::size_t(i)] = staged.start_all_reduce(
                        loco::host_tensor(b[std::size_t(i)].data(), b[std::size_t(i)].size()),
                        reduce_op::mean);
                }
                finisher.join();
                for (auto& q : finished_here) {
                    q.finish();
                }
                for (int i = 0; i < k; ++i) {
                    for (const float x : a[std::size_t(i)]) wrong += x != sum;
                    for (const float x : b[std::size_t(i)]) wrong += x != mean;
                }
                for (std::size_t j = 0; j < gathered.size(); ++j) {
                    wrong += gathered[j] != float(j / 8 + 1);
                }
            }

            std::lock_guard<std::mutex> lock(mutex);
            CAPTURE(r);
            CHECK(finisher_error == "");
            CHECK(wrong == 0);
        });
    }
}

TEST_CASE("cuda_replicas: a chunk longer than one grid of the reduce kernel") {
    // The reduce kernel's grid is capped (8192 blocks of 256 threads, 2^21 elements) and a
    // grid-stride loop covers the rest: with two ranks and 2^22 + 2062 floats, each rank's chunk
    // of 2^21 + 1031 is longer than one grid, so its last 1031 elements come from the loop's
    // second pass. The mean against the rank-ordered host reference, bit for bit.
    constexpr int m = 2;
    const std::size_t n = (std::size_t{1} << 22) + 2062;
    std::vector<std::vector<float>> data;
    for (int r = 0; r < m; ++r) {
        auto rng = rng_for("replicas long chunk/" + std::to_string(r));
        data.push_back(normal_floats(rng, n));
    }
    const expected e = reference(data, 0);
    std::mutex mutex;
    loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
        const std::size_t r = std::size_t(comm.rank());
        lc::device_buffer<float> buf(n);
        buf.upload(data[r]);
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        comm.all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::mean);
        const auto got_mean = buf.download();
        std::size_t off = 0;
        for (std::size_t i = 0; i < n; ++i) {
            off += std::memcmp(&got_mean[i], &e.mean[i], sizeof(float)) != 0;
        }
        std::lock_guard<std::mutex> lock(mutex);
        CAPTURE(r);
        CHECK(off == 0);
    });
}

TEST_CASE("cuda_replicas and cuda_staging refuse what they cannot serve") {
    // Group sizes 1 to max_replicas, ranks of the group, a group at all, and a staging over a
    // communicator that moves device memory.
    CHECK_THROWS_AS(loco::comm::cuda_replica_group(0), loco::invalid_argument);
    CHECK_THROWS_AS(loco::comm::cuda_replica_group(lc::max_replicas + 1), loco::invalid_argument);
    CHECK_NOTHROW(loco::comm::cuda_replica_group(1));
    CHECK_NOTHROW(loco::comm::cuda_replica_group(lc::max_replicas));
    auto group = std::make_shared<loco::comm::cuda_replica_group>(2);
    const auto outside = doctest::Contains("is outside a group of size 2");
    CHECK_THROWS_WITH_AS(loco::comm::cuda_replicas(group, 2), outside, loco::invalid_argument);
    CHECK_THROWS_WITH_AS(loco::comm::cuda_replicas(group, -1), outside, loco::invalid_argument);
    CHECK_THROWS_AS(loco::comm::cuda_replicas(nullptr, 0), loco::invalid_argument);
    {
        loco::comm::cuda_replicas last(group, 1);  // the last rank is one of the group
        CHECK(last.rank() == 1);
        CHECK(last.size() == 2);
        loco::comm::cuda_staging staged(last);
        CHECK(staged.rank() == 1);
        CHECK(staged.size() == 2);
        CHECK(staged.space() == loco::memory_space::host);
        // A staging moves host memory already: staging it again is refused.
        loco::comm::communicator& host_comm = staged;
        CHECK_THROWS_AS(loco::comm::cuda_staging{host_comm}, loco::memory_space_error);
    }
}

TEST_CASE("cuda_replicas: a group of max_replicas ranks reduces") {
    // The largest group the reduce kernel takes: rank r holds r + 1, so the sum is 2080, exact,
    // and the mean of those sums 2080 again.
    constexpr int m = lc::max_replicas;
    std::atomic<int> wrong{0};
    loco::comm::run_replicas(m, [&](loco::comm::cuda_replicas& comm) {
        lc::device_buffer<float> buf(5);
        buf.upload(std::vector<float>(5, float(comm.rank() + 1)));
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        comm.all_reduce(loco::cuda_tensor(buf.get(), 5), reduce_op::sum);
        const auto sum = buf.download();
        comm.all_reduce(loco::cuda_tensor(buf.get(), 5), reduce_op::mean);
        const auto mean = buf.download();
        wrong += sum != std::vector<float>(5, float(m * (m + 1) / 2));
        wrong += mean != std::vector<float>(5, float(m * (m + 1) / 2));
    });
    CHECK(wrong.load() == 0);
}

TEST_CASE("cuda_staging: barrier waits for every rank, bytes_sent are the wrapped ones") {
    // Rank 1 arrives late and marks its arrival first: rank 0's barrier may return only after.
    std::atomic<int> arrived{0};
    std::mutex mutex;
    loco::comm::run_replicas(2, [&](loco::comm::cuda_replicas& comm) {
        loco::comm::cuda_staging staged(comm, comm.stream());
        if (comm.rank() == 1) {
            std::this_thread::sleep_for(std::chrono::milliseconds(200));
            arrived = 1;
        }
        staged.barrier();
        const int seen = arrived.load();
        // Zero counts: no bytes, the communicator stays usable.
        std::vector<float> none;
        staged.all_reduce(loco::host_tensor(none.data(), 0), reduce_op::sum);
        staged.all_gather({nullptr, 0, 0, 0, loco::memory_space::host},
                          {nullptr, 0, 0, 0, loco::memory_space::host});
        std::vector<float> x(5, float(comm.rank() + 1));
        staged.all_reduce(loco::host_tensor(x.data(), x.size()), reduce_op::sum);
        std::lock_guard<std::mutex> lock(mutex);
        CAPTURE(comm.rank());
        CHECK(seen == 1);
        CHECK(x == std::vector<float>(5, 3.0f));
        CHECK(staged.bytes_sent() == comm.bytes_sent());
        // One all_reduce of 5 floats over 2 ranks: 4 (n + (M-2) c_r) bytes.
        CHECK(comm.bytes_sent() == 20);
    });
}

#if defined(LOCO_TEST_NCCL)

TEST_CASE("nccl with one rank on one GPU") {
    const std::string path =
        "/tmp/loco-nccl-id-" + std::to_string(getpid()) + "-" + std::to_string(process_seed());
    auto comm = loco::comm::nccl_bootstrap_file(path, 1, 0, nullptr,
                                                {.timeout = std::chrono::seconds(60)});
    std::remove(path.c_str());
    REQUIRE(comm);
    CHECK(comm->size() == 1);
    CHECK(comm->rank() == 0);
    CHECK(comm->space() == loco::memory_space::cuda);
    auto rng = rng_for("nccl one rank");
    const auto data = normal_floats(rng, 1000008);
    std::mutex mutex;
    exercise(*comm, data, reference({data}, 0), 0, mutex);
    CHECK(comm->bytes_sent() == 0);
    CHECK(comm->control_bytes_sent() == 0);

    // Ordering with a caller's stream, without the host waiting: the collective runs after the
    // caller's copy and the caller's next copy after the collective.
    lc::stream caller;
    comm->set_caller_stream(caller);
    lc::device_buffer<float> buf(data.size());
    lc::pinned_buffer<float> pinned(data.size());
    std::memcpy(pinned.get(), data.data(), data.size() * sizeof(float));
    check_cuda(cudaMemcpyAsync(buf.get(), pinned.get(), buf.size_bytes(), cudaMemcpyHostToDevice,
                               caller),
               "upload on the caller stream");
    comm->all_reduce(loco::cuda_tensor(buf.get(), buf.size()), reduce_op::mean);
    check_cuda(cudaMemcpyAsync(pinned.get(), buf.get(), buf.size_bytes(), cudaMemcpyDeviceToHost,
                               caller),
               "download on the caller stream");
    caller.synchronize();
    CHECK(std::memcmp(pinned.get(), data.data(), buf.size_bytes()) == 0);

    CHECK_THROWS_AS(comm->all_reduce(loco::host_tensor(pinned.get(), 4), reduce_op::sum),
                    loco::memory_space_error);
    lc::device_buffer<std::byte> small(8);
    CHECK_THROWS_AS(comm->all_gather(loco::tensor_view<const std::byte>{small.get(), 8, 0, 0,
                                                                        loco::memory_space::cuda},
                                     loco::cuda_tensor(small.get(), 4)),
                    loco::shape_error);
    CHECK_FALSE(comm->aborted());

    // Wrapping a communicator made elsewhere (blocking, from ncclCommInitAll).
    ncclComm_t raw = nullptr;
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    REQUIRE(ncclCommInitAll(&raw, 1, &device) == ncclSuccess);
    {
        loco::comm::nccl wrapped(raw);
        lc::device_buffer<float> x(3);
        x.upload(std::vector<float>{1.0f, 2.0f, 3.0f});
        wrapped.all_reduce(loco::cuda_tensor(x.get(), 3), reduce_op::sum);
        CHECK(x.download() == std::vector<float>{1.0f, 2.0f, 3.0f});
    }
    CHECK(ncclCommDestroy(raw) == ncclSuccess);
}

#if defined(__NVCC__)
namespace {
// Holds a stream until the host writes *flag != 0 (a real GPU only: the emulator runs kernels at
// launch, so it would spin for ever).
__global__ void hold_until(const volatile int* flag) {
    while (*flag == 0) {
    }
}
}  // namespace
#endif

TEST_CASE("nccl: a timeout of milliseconds::max() means never, not an overflowed deadline") {
    const std::string path = "/tmp/loco-nccl-id-max-" + std::to_string(getpid()) + "-" +
                             std::to_string(process_seed());
    auto comm = loco::comm::nccl_bootstrap_file(path, 1, 0, nullptr,
                                                {.timeout = std::chrono::milliseconds::max()});
    std::remove(path.c_str());
    REQUIRE(comm);
    lc::device_buffer<float> buf(8);
    const std::vector<float> ones(8, 1.0f);
    buf.upload(ones);
    CHECK_NOTHROW(comm->all_reduce(loco::cuda_tensor(buf.get(), buf.size()),
                                   loco::comm::reduce_op::sum));
    CHECK_NOTHROW(comm->barrier());
    CHECK(buf.download() == ones);
    const auto until = loco::comm::detail::deadline_after(std::chrono::milliseconds::max());
    CHECK(until > std::chrono::steady_clock::now() + std::chrono::hours(24 * 365 * 90));
}

TEST_CASE("nccl split-phase: start enqueues after the caller's stream, finish orders it back") {
    const std::string path =
        "/tmp/loco-nccl-split-" + std::to_string(getpid()) + "-" + std::to_string(process_seed());
    auto comm = loco::comm::nccl_bootstrap_file(path, 1, 0, nullptr,
                                                {.timeout = std::chrono::seconds(20)});
    std::remove(path.c_str());
    REQUIRE(comm);
    lc::stream caller;
    comm->set_caller_stream(caller);
    auto rng = rng_for("nccl split");
    const auto data = normal_floats(rng, 100003);
    const std::size_t n = data.size();
    lc::device_buffer<float> buf(n);
    lc::device_buffer<std::byte> recv(n * sizeof(float));
    lc::pinned_buffer<float> pinned(n);
    std::memcpy(pinned.get(), data.data(), n * sizeof(float));
    check_cuda(cudaMemcpyAsync(buf.get(), pinned.get(), n * sizeof(float), cudaMemcpyHostToDevice,
                               caller),
               "upload on the caller stream");
    // Two in flight: an all_gather reading buf, then a mean all_reduce writing it (ordered on the
    // communicator's stream, so the gather sees the original values).
    auto gather = comm->start_all_gather(
        loco::comm::as_bytes(loco::tensor_view<const float>(loco::cuda_tensor(buf.get(), n))),
        loco::cuda_tensor(recv.get(), recv.size()));
    auto reduce = comm->start_all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::mean);
    reduce.finish();
    gather.finish();
    CHECK_THROWS_AS(gather.finish(), loco::invalid_argument);
    lc::pinned_buffer<std::byte> back(n * sizeof(float));
    check_cuda(cudaMemcpyAsync(back.get(), recv.get(), n * sizeof(float), cudaMemcpyDeviceToHost,
                               caller),
               "download on the caller stream");
    caller.synchronize();
    CHECK(std::memcmp(back.get(), data.data(), n * sizeof(float)) == 0);
    CHECK(buf.download() == data);  // one rank: the mean is the data

    // Host buffers staged through the communicator keep the split phase.
    {
        loco::comm::cuda_staging staged(*comm);
        std::vector<float> host = data;
        auto r = staged.start_all_reduce(loco::host_tensor(host.data(), n), reduce_op::sum);
        r.finish();
        CHECK(host == data);
    }

#if defined(__NVCC__)
    // start() must not wait on the host for the caller's stream: hold that stream with a kernel
    // only the host can release, start, and release it afterwards. A start that waited would
    // time out (20 s) and throw instead.
    lc::pinned_buffer<int> flag(1);
    *const_cast<volatile int*>(flag.get()) = 0;
    hold_until<<<1, 1, 0, caller>>>(flag.get());
    check_cuda(cudaGetLastError(), "hold_until launch");
    const auto t0 = std::chrono::steady_clock::now();
    auto held = comm->start_all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::sum);
    const auto start_took = std::chrono::steady_clock::now() - t0;
    CHECK(cudaStreamQuery(caller) == cudaErrorNotReady);  // the caller's stream is still held
    *const_cast<volatile int*>(flag.get()) = 1;
    held.finish();
    caller.synchronize();
    CHECK(start_took < std::chrono::seconds(5));
    CHECK(buf.download() == data);
#endif
    CHECK_FALSE(comm->aborted());
}

TEST_CASE("nccl with wait = false: cuda_staging copies on the caller stream") {
    // A finished collective orders only the caller stream, not the host: the staging's copy out
    // must run on that stream and wait for it, its copy in land before NCCL's stream reads it.
    // The emulator runs streams in order, so only a GPU can catch a copy on the wrong stream.
    const std::string path =
        "/tmp/loco-nccl-staged-" + std::to_string(getpid()) + "-" + std::to_string(process_seed());
    auto comm = loco::comm::nccl_bootstrap_file(
        path, 1, 0, nullptr, {.timeout = std::chrono::seconds(20), .wait = false});
    std::remove(path.c_str());
    REQUIRE(comm);
    lc::stream caller;
    comm->set_caller_stream(caller);
    loco::comm::cuda_staging staged(*comm, caller);
    CHECK(staged.stream() == caller.get());
    auto rng = rng_for("nccl staged");
    const auto data = normal_floats(rng, 1 << 22);
    const std::size_t n = data.size();
    for (int it = 0; it < 3; ++it) {
        std::vector<float> sum = data;
        std::vector<float> mean = data;
        std::vector<std::byte> gathered(n * sizeof(float));
        auto q1 = staged.start_all_reduce(loco::host_tensor(sum.data(), n), reduce_op::sum);
        auto q2 = staged.start_all_gather(
            loco::comm::as_bytes(loco::tensor_view<const float>(loco::host_tensor(data.data(), n))),
            {gathered.data(), gathered.size(), 0, 0, loco::memory_space::host});
        staged.all_reduce(loco::host_tensor(mean.data(), n), reduce_op::mean);
        q2.finish();
        q1.finish();
        std::vector<float> bcast = data;
        staged.broadcast(loco::comm::as_bytes(loco::host_tensor(bcast.data(), n)), 0);
        CHECK(sum == data);  // one rank: every result is the data
        CHECK(mean == data);
        CHECK(gathered == bytes_of(data));
        CHECK(bcast == data);
    }
    CHECK_FALSE(comm->aborted());
}

TEST_CASE("nccl: requests finished on another thread while this one starts the next") {
    // As cuda_staging's test above: finishing gives each request's event back to the
    // communicator's pool while this thread takes events for the next collectives (the pool was
    // unlocked). One rank: every result is the data.
    const std::string path =
        "/tmp/loco-nccl-threads-" + std::to_string(getpid()) + "-" + std::to_string(process_seed());
    auto comm = loco::comm::nccl_bootstrap_file(path, 1, 0, nullptr,
                                                {.timeout = std::chrono::seconds(20)});
    std::remove(path.c_str());
    REQUIRE(comm);
    auto rng = rng_for("nccl finish on another thread");
    const auto data = normal_floats(rng, 64);
    constexpr int k = 6;
    std::vector<lc::device_buffer<float>> there, here;
    for (int i = 0; i < k; ++i) {
        there.emplace_back(data.size());
        here.emplace_back(data.size());
        there.back().upload(data);
        here.back().upload(data);
    }
    std::string finisher_error;
    for (int it = 0; it < 500; ++it) {
        std::vector<loco::comm::request> finished_there(k);
        for (int i = 0; i < k; ++i) {
            finished_there[std::size_t(i)] = comm->start_all_reduce(
                loco::cuda_tensor(there[std::size_t(i)].get(), data.size()), reduce_op::mean);
        }
        std::atomic<bool> go{false};
        std::thread finisher([&] {
            while (!go.load()) {
            }
            try {
                for (auto& q : finished_there) {
                    loco::comm::request mine = std::move(q);
                    mine.finish();
                }
            } catch (const std::exception& e) {
                finisher_error = e.what();
            }
        });
        go = true;
        std::vector<loco::comm::request> finished_here(k);
        for (int i = 0; i < k; ++i) {
            finished_here[std::size_t(i)] = comm->start_all_reduce(
                loco::cuda_tensor(here[std::size_t(i)].get(), data.size()), reduce_op::mean);
        }
        finisher.join();
        for (auto& q : finished_here) q.finish();
    }
    CHECK(finisher_error == "");
    for (int i = 0; i < k; ++i) {
        CHECK(there[std::size_t(i)].download() == data);
        CHECK(here[std::size_t(i)].download() == data);
    }
    CHECK_FALSE(comm->aborted());
}

TEST_CASE("nccl: a request that outlives its communicator touches nothing of it") {
    // communicator.hpp allows a request to outlive its communicator; the destructor settles the
    // collectives, so a late finish() throws and a late drop has nothing to wait for. Under the
    // emulator's ASan build, touching the destroyed communicator is a use after free.
    const std::string path =
        "/tmp/loco-nccl-late-" + std::to_string(getpid()) + "-" + std::to_string(process_seed());
    auto comm = loco::comm::nccl_bootstrap_file(path, 1, 0, nullptr,
                                                {.timeout = std::chrono::seconds(20)});
    std::remove(path.c_str());
    REQUIRE(comm);
    auto rng = rng_for("nccl late request");
    const auto data = normal_floats(rng, 1001);
    lc::device_buffer<float> buf(data.size());
    buf.upload(data);
    auto finished_late = comm->start_all_reduce(loco::cuda_tensor(buf.get(), buf.size()),
                                                reduce_op::sum);
    auto dropped_late = comm->start_all_reduce(loco::cuda_tensor(buf.get(), buf.size()),
                                               reduce_op::sum);
    comm.reset();
    CHECK_THROWS_WITH_AS(finished_late.finish(),
                         doctest::Contains("was finished after its communicator was destroyed"),
                         loco::comm_error);
    CHECK(buf.download() == data);  // one rank: the sums are the data, the collectives done
}

TEST_CASE("nccl: refuses ranks outside the clique and timeouts that are not positive") {
    // All refused before any NCCL call: invalid_argument, not a comm_error after a timeout.
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    const loco::comm::nccl_options quick{.timeout = std::chrono::milliseconds(200)};
    CHECK_THROWS_AS(loco::comm::nccl::create(2, 2, id, nullptr, quick), loco::invalid_argument);
    CHECK_THROWS_AS(loco::comm::nccl::create(2, -1, id, nullptr, quick), loco::invalid_argument);
    CHECK_THROWS_AS(loco::comm::nccl::create(0, 0, id, nullptr, quick), loco::invalid_argument);
    for (const auto timeout : {std::chrono::milliseconds(0), std::chrono::milliseconds(-1)}) {
        CAPTURE(timeout.count());
        CHECK_THROWS_AS(loco::comm::nccl::create(2, 0, id, nullptr, {.timeout = timeout}),
                        loco::invalid_argument);
        // A wrapped communicator too; after invalid_argument it is still the caller's.
        int device = 0;
        check_cuda(cudaGetDevice(&device), "cudaGetDevice");
        ncclComm_t raw = nullptr;
        REQUIRE(ncclCommInitAll(&raw, 1, &device) == ncclSuccess);
        CHECK_THROWS_AS(loco::comm::nccl(raw, nullptr, {.timeout = timeout}),
                        loco::invalid_argument);
        CHECK(ncclCommDestroy(raw) == ncclSuccess);
    }
}

TEST_CASE("nccl: abort() fails the requests in flight and every later call, with its reason") {
    const std::string path =
        "/tmp/loco-nccl-abort-" + std::to_string(getpid()) + "-" + std::to_string(process_seed());
    auto comm = loco::comm::nccl_bootstrap_file(path, 1, 0, nullptr,
                                                {.timeout = std::chrono::seconds(20)});
    std::remove(path.c_str());
    REQUIRE(comm);
    lc::device_buffer<float> buf(8);
    buf.upload(std::vector<float>(8, 1.0f));
    auto in_flight = comm->start_all_reduce(loco::cuda_tensor(buf.get(), 8), reduce_op::sum);
    comm->synchronize();  // the collective is done: only the abort can fail its finish()
    comm->abort("stopped by the test");
    CHECK(comm->aborted());
    const auto refused = doctest::Contains("stopped by the test");
    CHECK_THROWS_WITH_AS(in_flight.finish(), refused, loco::comm_error);
    CHECK_THROWS_WITH_AS(comm->synchronize(), refused, loco::comm_error);
    CHECK_THROWS_WITH_AS(comm->all_reduce(loco::cuda_tensor(buf.get(), 8), reduce_op::sum),
                         refused, loco::comm_error);
    CHECK_THROWS_WITH_AS(comm->start_all_reduce(loco::cuda_tensor(buf.get(), 8), reduce_op::mean),
                         refused, loco::comm_error);
    const auto bytes = loco::comm::as_bytes(loco::cuda_tensor(buf.get(), 8));
    CHECK_THROWS_WITH_AS(comm->all_gather(bytes, bytes), refused, loco::comm_error);
    CHECK_THROWS_WITH_AS(comm->broadcast(bytes, 0), refused, loco::comm_error);
    lc::device_buffer<std::byte> other(bytes.size);
    CHECK_THROWS_WITH_AS(comm->all_to_all(bytes, loco::cuda_tensor(other.get(), other.size())),
                         refused, loco::comm_error);
    CHECK_THROWS_WITH_AS(comm->barrier(), refused, loco::comm_error);
    CHECK(buf.download() == std::vector<float>(8, 1.0f));
}

#if defined(LOCO_EMULATED)
// Fault injection needs the emulated NCCL and CUDA runtime (tests/cuda/emulator): an NCCL call
// that reports a lost peer, a device that never reaches an event.

TEST_CASE("nccl all_to_all: an NCCL error inside its group leaves the thread's group closed") {
    // ncclSend reports a lost peer between ncclGroupStart and ncclGroupEnd. An NCCL group is the
    // thread's: left open, the survivors' new communicator on the same thread would only queue
    // its all_to_all and return with nothing moved (the emulated NCCL, like NCCL, runs grouped
    // calls at the outermost ncclGroupEnd). Both ranks fail, so neither waits for the other.
    constexpr int m = 2;
    ncclUniqueId first{};
    ncclUniqueId second{};
    REQUIRE(ncclGetUniqueId(&first) == ncclSuccess);
    REQUIRE(ncclGetUniqueId(&second) == ncclSuccess);
    std::mutex mutex;
    std::vector<std::string> failure(m);
    std::vector<int> aborted(m, 0);
    std::vector<std::vector<float>> got(m);
    std::vector<std::thread> ranks;
    for (int r = 0; r < m; ++r) {
        ranks.emplace_back([&, r] {
            try {
                std::vector<float> mine(m);
                for (int k = 0; k < m; ++k) {
                    mine[std::size_t(k)] = float(100 * r + k);  // block k goes to rank k
                }
                lc::device_buffer<float> send(m);
                lc::device_buffer<float> recv(m);
                send.upload(mine);
                const auto exchange = [&](loco::comm::nccl& comm) {
                    recv.upload(std::vector<float>(m, -1.0f));
                    comm.all_to_all(loco::comm::as_bytes(loco::tensor_view<const float>(
                                        loco::cuda_tensor(send.get(), m))),
                                    loco::comm::as_bytes(loco::cuda_tensor(recv.get(), m)));
                };
                {
                    auto comm = loco::comm::nccl::create(m, r, first, nullptr,
                                                         {.timeout = std::chrono::seconds(20)});
                    fake::send_calls = 0;
                    fake::fail_send_at = 1;
                    try {
                        exchange(*comm);
                    } catch (const loco::comm_error& err) {
                        failure[std::size_t(r)] = err.what();
                    }
                    fake::fail_send_at = 0;
                    aborted[std::size_t(r)] = comm->aborted();
                }
                auto survivors = loco::comm::nccl::create(m, r, second, nullptr,
                                                          {.timeout = std::chrono::seconds(20)});
                exchange(*survivors);
                got[std::size_t(r)] = recv.download();
            } catch (const std::exception& err) {
                std::lock_guard<std::mutex> lock(mutex);
                FAIL_CHECK("rank " << r << ": " << err.what());
            }
        });
    }
    for (auto& t : ranks) {
        t.join();
    }
    for (int r = 0; r < m; ++r) {
        CAPTURE(r);
        const std::string& why = failure[std::size_t(r)];
        CAPTURE(why);
        CHECK(why.find("rank " + std::to_string(r) + ", all_to_all") != std::string::npos);
        CHECK(why.find("ncclSend failed") != std::string::npos);
        CHECK(why.find("the communicator was aborted") != std::string::npos);
        CHECK(aborted[std::size_t(r)] == 1);
        const std::vector<float>& back = got[std::size_t(r)];
        REQUIRE(back.size() == std::size_t(m));
        CHECK(back[0] == float(r));  // -1: nothing moved
        CHECK(back[1] == float(100 + r));
    }
}

TEST_CASE("nccl: destroying a wrapped communicator settles its collectives under the timeout") {
    // A wrapped communicator is not the wrapper's to finalize, but its collectives still in
    // flight are: a request that outlives it must have nothing left to wait for. Here the device
    // never reaches the collective's event (as with a lost peer): the destructor waits out the
    // timeout, then aborts the communicator, instead of returning at once with the collective in
    // flight (and leaving the next wait for the device to hang).
    struct stuck_device {
        stuck_device() { emu::events_stuck() = true; }
        ~stuck_device() { emu::events_stuck() = false; }
    };
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    const int aborts_before = fake::comm_aborts().load();
    lc::device_buffer<float> x(4);
    x.upload(std::vector<float>{1.0f, 2.0f, 3.0f, 4.0f});
    ncclComm_t raw = nullptr;
    REQUIRE(ncclCommInitAll(&raw, 1, &device) == ncclSuccess);
    auto wrapped = std::make_unique<loco::comm::nccl>(
        raw, nullptr, loco::comm::nccl_options{.timeout = std::chrono::milliseconds(300)});
    auto late = wrapped->start_all_reduce(loco::cuda_tensor(x.get(), 4), reduce_op::sum);
    std::chrono::steady_clock::duration took{};
    {
        const stuck_device stuck;
        const auto t0 = std::chrono::steady_clock::now();
        wrapped.reset();
        took = std::chrono::steady_clock::now() - t0;
    }
    CHECK(took >= std::chrono::milliseconds(300));
    CHECK(took < std::chrono::seconds(20));
    // Aborted: raw is released (ncclCommAbort frees it), not the caller's to destroy any more.
    CHECK(fake::comm_aborts().load() == aborts_before + 1);
    if (fake::comm_aborts().load() == aborts_before) {
        CHECK(ncclCommDestroy(raw) == ncclSuccess);
    }
    CHECK_THROWS_WITH_AS(late.finish(),
                         doctest::Contains("was finished after its communicator was destroyed"),
                         loco::comm_error);

    // A device that does get there: the destructor waits for it and leaves the communicator to
    // the caller, who destroys it.
    const int aborts_after = fake::comm_aborts().load();
    REQUIRE(ncclCommInitAll(&raw, 1, &device) == ncclSuccess);
    {
        loco::comm::nccl healthy(raw, nullptr, {.timeout = std::chrono::milliseconds(300)});
        late = healthy.start_all_reduce(loco::cuda_tensor(x.get(), 4), reduce_op::sum);
    }
    CHECK(fake::comm_aborts().load() == aborts_after);
    CHECK(ncclCommDestroy(raw) == ncclSuccess);
    late = loco::comm::request{};  // a drop after the communicator: nothing to wait for
    CHECK(x.download() == std::vector<float>{1.0f, 2.0f, 3.0f, 4.0f});
}

TEST_CASE("nccl: a constructor whose agreement fails aborts its communicator once") {
    // Two ranks whose devices never reach the constructor's check_calls agreement (a lost peer):
    // each create() throws comm_error after the timeout, and each communicator is aborted
    // exactly once (the constructor aborted it to free its buffers safely; create() used to
    // abort the freed communicator again).
    struct stuck_device {
        stuck_device() { emu::events_stuck() = true; }
        ~stuck_device() { emu::events_stuck() = false; }
    };
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    const int aborts_before = fake::comm_aborts().load();
    std::array<std::string, 2> messages;
    {
        const stuck_device stuck;
        std::vector<std::thread> ranks;
        for (int r = 0; r < 2; ++r) {
            ranks.emplace_back([&, r] {
                try {
                    auto comm = loco::comm::nccl::create(
                        2, r, id, nullptr, {.timeout = std::chrono::milliseconds(200)});
                    messages[std::size_t(r)] = "constructed";
                } catch (const loco::comm_error& e) {
                    messages[std::size_t(r)] = e.what();
                }
            });
        }
        for (auto& t : ranks) t.join();
    }
    for (const auto& m : messages) {
        CHECK(m.find("waited 200 ms for its peers") != std::string::npos);
    }
    CHECK(fake::comm_aborts().load() == aborts_before + 2);
}

TEST_CASE("nccl: a wrapping constructor that throws comm_error has aborted the communicator") {
    // One rule for the caller: after comm_error from the constructor the ncclComm_t is gone
    // (aborted, which frees it), whether the ranks disagreed on check_calls or the agreement
    // failed; before, a disagreement left it to the caller and a timeout freed it.
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    std::array<ncclComm_t, 2> raw{};
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const int aborts_before = fake::comm_aborts().load();
    std::array<std::string, 2> messages;
    std::vector<std::thread> ranks;
    for (int r = 0; r < 2; ++r) {
        ranks.emplace_back([&, r] {
            ncclCommInitRankConfig(&raw[std::size_t(r)], 2, id, r, &config);
            try {
                loco::comm::nccl wrapped(raw[std::size_t(r)], nullptr,
                                         {.timeout = std::chrono::seconds(20), .check_calls = r == 0});
                messages[std::size_t(r)] = "constructed";
            } catch (const loco::comm_error& e) {
                messages[std::size_t(r)] = e.what();
            }
        });
    }
    for (auto& t : ranks) t.join();
    for (const auto& m : messages) {
        CHECK(m.find("ranks disagree on nccl_options::check_calls") != std::string::npos);
    }
    CHECK(fake::comm_aborts().load() == aborts_before + 2);  // nothing left to destroy
}

TEST_CASE("nccl: after a CUDA error the destructor leaves a wrapped communicator to the caller") {
    // synchronize() reports a CUDA error as cuda_error without aborting (aborted() stays false);
    // the destructor must not then abort, so free, the caller's communicator behind its back.
    struct failing_events {
        failing_events() { emu::events_fail() = true; }
        ~failing_events() { emu::events_fail() = false; }
    };
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    ncclComm_t raw = nullptr;
    REQUIRE(ncclCommInitAll(&raw, 1, &device) == ncclSuccess);
    const int aborts_before = fake::comm_aborts().load();
    {
        auto wrapped = std::make_unique<loco::comm::nccl>(
            raw, nullptr, loco::comm::nccl_options{.timeout = std::chrono::milliseconds(300)});
        const failing_events fail;
        CHECK_THROWS_AS(wrapped->synchronize(), loco::cuda_error);
        CHECK_FALSE(wrapped->aborted());
        wrapped.reset();  // with the error still there
    }
    CHECK(fake::comm_aborts().load() == aborts_before);
    CHECK(ncclCommDestroy(raw) == ncclSuccess);  // still the caller's
}

#endif  // LOCO_EMULATED

TEST_CASE("nccl on one GPU: peers that never come time out with a clear error") {
    using clock = std::chrono::steady_clock;
    // Rank 0 of a two-rank clique whose rank 1 never starts: creation gives up after the timeout
    // (NCCL itself would wait for ever) and says why.
    ncclUniqueId lonely{};
    REQUIRE(ncclGetUniqueId(&lonely) == ncclSuccess);
    auto t0 = clock::now();
    std::string why;
    try {
        auto made =
            loco::comm::nccl::create(2, 0, lonely, nullptr, {.timeout = std::chrono::seconds(2)});
        FAIL_CHECK("a communicator without its peer was created");
    } catch (const loco::comm_error& err) {
        why = err.what();
    }
    CHECK(clock::now() - t0 >= std::chrono::seconds(2));
    CHECK(clock::now() - t0 < std::chrono::seconds(30));
    CHECK(why.find("did not join within 2000 ms") != std::string::npos);

    // Rank 1 of a file bootstrap whose rank 0 never writes the id.
    const std::string path = "/tmp/loco-nccl-absent-" + std::to_string(getpid()) + "-" +
                             std::to_string(process_seed());
    t0 = clock::now();
    why.clear();
    try {
        auto made = loco::comm::nccl_bootstrap_file(path, 2, 1, nullptr,
                                                    {.timeout = std::chrono::milliseconds(300)});
        FAIL_CHECK("a bootstrap without rank 0 returned");
    } catch (const loco::comm_error& err) {
        why = err.what();
    }
    CHECK(clock::now() - t0 < std::chrono::seconds(10));
    CHECK(why.find("did not appear within 300 ms") != std::string::npos);
    CHECK(why.find(path) != std::string::npos);
}

namespace {

// The number of ranks for the multi-GPU NCCL tests (one per GPU, at most 4), or 0 after printing
// why they are skipped.
int nccl_ranks() {
    int devices = 0;
    check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    if (devices < 2) {
        MESSAGE("SKIPPED: the multi-rank NCCL tests need at least 2 GPUs; this machine has "
                << devices << " (NCCL refuses two ranks on one GPU; cuda_replicas covers M > 1 "
                              "on one GPU)");
        return 0;
    }
    return devices < 4 ? devices : 4;
}

// Runs fn(rank, comm) on one thread per GPU with a fresh clique; exceptions become failures.
template <class Fn>
void on_ranks(int m, std::chrono::milliseconds timeout, Fn&& fn) {
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    std::mutex mutex;
    std::vector<std::thread> ranks;
    for (int r = 0; r < m; ++r) {
        ranks.emplace_back([&, r] {
            try {
                check_cuda(cudaSetDevice(r), "cudaSetDevice");
                auto comm = loco::comm::nccl::create(m, r, id, nullptr, {.timeout = timeout});
                fn(r, *comm);
            } catch (const std::exception& err) {
                std::lock_guard<std::mutex> lock(mutex);
                FAIL_CHECK("rank " << r << ": " << err.what());
            }
        });
    }
    for (auto& t : ranks) {
        t.join();
    }
}

}  // namespace

TEST_CASE("nccl across GPUs: collectives and disagreeing ranks (needs >= 2 GPUs)") {
    const int m = nccl_ranks();
    if (m == 0) {
        return;
    }
    std::vector<std::vector<float>> data;
    for (int r = 0; r < m; ++r) {
        auto rng = rng_for("nccl multi/" + std::to_string(r));
        data.push_back(normal_floats(rng, 1000008));
    }
    const int root = 1;
    const expected e = reference(data, root);
    std::mutex mutex;
    std::vector<std::vector<float>> sums(static_cast<std::size_t>(m));
    std::vector<std::string> mismatch(static_cast<std::size_t>(m));
    on_ranks(m, std::chrono::seconds(60), [&](int r, loco::comm::nccl& comm) {
        exercise(comm, data[std::size_t(r)], e, root, mutex, &sums[std::size_t(r)]);
        // Seven calls' descriptors and the constructor's agreement on check_calls.
        CHECK(comm.control_bytes_sent() == std::uint64_t(8 * (m - 1) * 32));
        // Disagreeing sizes: every rank throws, nothing moves, the communicator lives on.
        lc::device_buffer<float> small(12);
        const auto sent = comm.bytes_sent();
        try {
            comm.all_reduce(loco::cuda_tensor(small.get(), r == 0 ? 10 : 12), reduce_op::sum);
            FAIL_CHECK("rank " << r << ": a disagreeing all_reduce went through");
        } catch (const loco::comm_error& err) {
            std::lock_guard<std::mutex> lock(mutex);
            mismatch[std::size_t(r)] = err.what();
        }
        CHECK(comm.bytes_sent() == sent);
        CHECK_FALSE(comm.aborted());
        comm.barrier();
    });
    for (int r = 0; r < m; ++r) {
        CAPTURE(r);
        CHECK(sums[std::size_t(r)] == sums[0]);  // every rank holds the same bits
        CHECK(mismatch[std::size_t(r)].find("disagree") != std::string::npos);
        CHECK(mismatch[std::size_t(r)].find("10 floats") != std::string::npos);
    }
}

TEST_CASE("nccl across GPUs: ranks with different check_calls all refuse at construction") {
    const int m = nccl_ranks();
    if (m == 0) {
        return;
    }
    // Rank 0 alone without the descriptor all-gather would pair its payload with the peers'
    // descriptors; every rank must refuse instead, naming the option.
    for (const bool first_checks : {false, true}) {
        CAPTURE(first_checks);
        ncclUniqueId id{};
        REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
        std::vector<std::string> messages(static_cast<std::size_t>(m));
        std::vector<std::thread> ranks;
        for (int r = 0; r < m; ++r) {
            ranks.emplace_back([&, r] {
                try {
                    check_cuda(cudaSetDevice(r), "cudaSetDevice");
                    const bool checks = r == 0 ? first_checks : !first_checks;
                    auto comm = loco::comm::nccl::create(
                        m, r, id, nullptr,
                        {.timeout = std::chrono::seconds(60), .check_calls = checks});
                    messages[std::size_t(r)] = "constructed";
                } catch (const loco::comm_error& err) {
                    messages[std::size_t(r)] = err.what();
                } catch (const std::exception& err) {
                    messages[std::size_t(r)] = std::string("unexpected: ") + err.what();
                }
            });
        }
        for (auto& t : ranks) {
            t.join();
        }
        const std::string count = (first_checks ? "1 of " : std::to_string(m - 1) + " of ") +
                                  std::to_string(m) + " ranks have it on";
        for (int r = 0; r < m; ++r) {
            CAPTURE(r);
            const std::string& msg = messages[std::size_t(r)];
            CAPTURE(msg);
            CHECK(msg.find("ranks disagree on nccl_options::check_calls") != std::string::npos);
            CHECK(msg.find(count) != std::string::npos);
        }
    }
    // The same setting on every rank, off: constructed, and no descriptors move per call.
    std::mutex mutex;
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    std::vector<std::thread> ranks;
    for (int r = 0; r < m; ++r) {
        ranks.emplace_back([&, r] {
            try {
                check_cuda(cudaSetDevice(r), "cudaSetDevice");
                auto comm = loco::comm::nccl::create(
                    m, r, id, nullptr, {.timeout = std::chrono::seconds(60), .check_calls = false});
                const auto at_construction = comm->control_bytes_sent();
                comm->barrier();
                const std::lock_guard<std::mutex> lock(mutex);
                CHECK(at_construction == std::uint64_t((m - 1) * 32));
                CHECK(comm->control_bytes_sent() == at_construction);
            } catch (const std::exception& err) {
                const std::lock_guard<std::mutex> lock(mutex);
                FAIL_CHECK("rank " << r << ": " << err.what());
            }
        });
    }
    for (auto& t : ranks) {
        t.join();
    }
}

TEST_CASE("nccl across GPUs: a missing peer times out instead of hanging (needs >= 2 GPUs)") {
    const int m = nccl_ranks();
    if (m == 0) {
        return;
    }
    std::string message;
    on_ranks(m, std::chrono::seconds(3), [&](int r, loco::comm::nccl& comm) {
        comm.barrier();
        if (r != 0) {
            return;  // the peers leave; rank 0 calls once more
        }
        const auto t0 = std::chrono::steady_clock::now();
        try {
            comm.barrier();
            FAIL_CHECK("a barrier without its peers returned");
        } catch (const loco::comm_error& err) {
            message = err.what();
        }
        CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30));
        CHECK(comm.aborted());
        CHECK_THROWS_AS(comm.barrier(), loco::comm_error);
        // Peers that never join a new communicator: its creation times out too.
        ncclUniqueId lonely{};
        REQUIRE(ncclGetUniqueId(&lonely) == ncclSuccess);
        CHECK_THROWS_AS(loco::comm::nccl::create(m, 0, lonely, nullptr,
                                                 {.timeout = std::chrono::seconds(2)}),
                        loco::comm_error);
    });
    CHECK(message.find("waited 3000 ms") != std::string::npos);
}

TEST_CASE("nccl across GPUs: a mean is the sum divided by M, over chunks longer than one grid") {
    // nccl.hpp: all_reduce(mean) is NCCL's sum divided by M on the device, comm::threads'
    // formula, not a product by 1/M (ncclAvg), which rounds differently. So each rank's mean
    // equals its own sum divided by M bit for bit, whatever order NCCL added in. For two ranks,
    // with n longer than one grid of the division kernel (2^21, so the tail comes from its
    // grid-stride loop), and for every GPU (up to 4) with a short n.
    const int most = nccl_ranks();
    if (most == 0) {
        return;
    }
    for (const int m : {2, most}) {
        const std::size_t n = m == 2 ? (std::size_t{1} << 21) + 1031 : 4099;
        CAPTURE(m);
        std::vector<std::vector<float>> data;
        for (int r = 0; r < m; ++r) {
            auto rng = rng_for("nccl mean/" + std::to_string(m) + "/" + std::to_string(r));
            data.push_back(normal_floats(rng, n));
        }
        const expected e = reference(data, 0);
        std::mutex mutex;
        std::vector<std::vector<float>> sums(static_cast<std::size_t>(m));
        on_ranks(m, std::chrono::seconds(60), [&](int r, loco::comm::nccl& comm) {
            lc::device_buffer<float> buf(n);
            buf.upload(data[std::size_t(r)]);
            check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
            comm.all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::sum);
            auto got_sum = buf.download();
            buf.upload(data[std::size_t(r)]);
            check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
            comm.all_reduce(loco::cuda_tensor(buf.get(), n), reduce_op::mean);
            const auto got_mean = buf.download();
            std::size_t not_quotient = 0;
            std::size_t off = 0;
            for (std::size_t i = 0; i < n; ++i) {
                const float quotient = got_sum[i] / static_cast<float>(m);
                not_quotient += std::memcmp(&got_mean[i], &quotient, sizeof(float)) != 0;
                off += std::abs(got_mean[i] - e.mean[i]) > 1e-5f * (1.0f + std::abs(e.mean[i]));
            }
            std::lock_guard<std::mutex> lock(mutex);
            CAPTURE(r);
            CHECK(not_quotient == 0);
            CHECK(off == 0);
            sums[std::size_t(r)] = std::move(got_sum);
        });
        for (int r = 1; r < m; ++r) {
            CHECK(sums[std::size_t(r)] == sums[0]);
        }
        if (m == most) {
            break;  // most == 2: once
        }
    }
}

TEST_CASE("nccl across GPUs: ranks that disagree on the op, the root or the call all refuse") {
    // The count alone is covered above; here every other field of the call descriptor, each time
    // with the rest equal. Every rank throws, nothing moves, and the next agreed call works.
    const int m = nccl_ranks();
    if (m == 0) {
        return;
    }
    std::mutex mutex;
    std::vector<std::vector<std::string>> messages(static_cast<std::size_t>(m));
    on_ranks(m, std::chrono::seconds(60), [&](int r, loco::comm::nccl& comm) {
        std::vector<std::string> mine;
        const auto refused = [&](auto&& call) {
            try {
                call();
                mine.push_back("went through");
            } catch (const loco::comm_error& err) {
                mine.push_back(err.what());
            }
        };
        const std::vector<float> ones(16, 1.0f);
        lc::device_buffer<float> x(16);
        x.upload(ones);
        // Room for m slots in both buffers, so that no call can write past them.
        lc::device_buffer<std::byte> a(std::size_t(m) * 8);
        lc::device_buffer<std::byte> b(std::size_t(m) * 8);
        check_cuda(cudaMemset(a.get(), 0, a.size_bytes()), "cudaMemset");
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        const auto sent = comm.bytes_sent();
        refused([&] {
            comm.all_reduce(loco::cuda_tensor(x.get(), 16), r == 0 ? reduce_op::mean : reduce_op::sum);
        });
        refused([&] { comm.broadcast(loco::cuda_tensor(a.get(), 8), r == 0 ? 0 : 1); });
        refused([&] {
            if (r == 0) {
                comm.all_gather(loco::tensor_view<const std::byte>{b.get(), 8, 0, 0,
                                                                   loco::memory_space::cuda},
                                loco::cuda_tensor(a.get(), a.size()));
            } else {
                comm.broadcast(loco::cuda_tensor(a.get(), 8), 0);
            }
        });
        const auto sent_after = comm.bytes_sent();
        const bool aborted = comm.aborted();
        comm.all_reduce(loco::cuda_tensor(x.get(), 16), reduce_op::sum);
        const auto got = x.download();
        std::lock_guard<std::mutex> lock(mutex);
        CAPTURE(r);
        CHECK(sent_after == sent);
        CHECK_FALSE(aborted);
        CHECK(got == std::vector<float>(16, float(m)));
        messages[std::size_t(r)] = std::move(mine);
    });
    for (int r = 0; r < m; ++r) {
        CAPTURE(r);
        const auto& mine = messages[std::size_t(r)];
        REQUIRE(mine.size() == 3);
        for (const auto& msg : mine) {
            CAPTURE(msg);
            CHECK(msg.find("ranks disagree on the collective") != std::string::npos);
        }
        CHECK(mine[0].find("(mean)") != std::string::npos);
        CHECK(mine[0].find("(sum)") != std::string::npos);
        CHECK(mine[1].find("from root 1") != std::string::npos);
        CHECK(mine[2].find("all_gather of 8 bytes") != std::string::npos);
    }
}

TEST_CASE("nccl across GPUs: without check_calls a barrier still waits for every rank") {
    // With check_calls the descriptor all-gather is the barrier; without it a one-float
    // all-reduce stands in. The peers arrive late and count their arrival first.
    const int m = nccl_ranks();
    if (m == 0) {
        return;
    }
    ncclUniqueId id{};
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    std::atomic<int> arrived{0};
    std::atomic<int> seen{-1};
    std::mutex mutex;
    std::vector<std::thread> ranks;
    for (int r = 0; r < m; ++r) {
        ranks.emplace_back([&, r] {
            try {
                check_cuda(cudaSetDevice(r), "cudaSetDevice");
                auto comm = loco::comm::nccl::create(
                    m, r, id, nullptr, {.timeout = std::chrono::seconds(60), .check_calls = false});
                if (r != 0) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(200));
                    ++arrived;
                }
                comm->barrier();
                if (r == 0) {
                    seen = arrived.load();
                }
            } catch (const std::exception& err) {
                const std::lock_guard<std::mutex> lock(mutex);
                FAIL_CHECK("rank " << r << ": " << err.what());
            }
        });
    }
    for (auto& t : ranks) {
        t.join();
    }
    CHECK(seen.load() == m - 1);
}

#if defined(LOCO_EMULATED)
TEST_CASE("nccl: an owned communicator is finalized and destroyed, not aborted") {
    // ~nccl aborts only after a failure; a healthy one is finalized and destroyed.
    const int aborts_before = fake::comm_aborts().load();
    const std::string path =
        "/tmp/loco-nccl-owned-" + std::to_string(getpid()) + "-" + std::to_string(process_seed());
    auto comm = loco::comm::nccl_bootstrap_file(path, 1, 0, nullptr,
                                                {.timeout = std::chrono::seconds(20)});
    std::remove(path.c_str());
    REQUIRE(comm);
    lc::device_buffer<float> x(3);
    x.upload(std::vector<float>{1.0f, 2.0f, 3.0f});
    comm->all_reduce(loco::cuda_tensor(x.get(), 3), reduce_op::mean);
    comm.reset();
    CHECK(fake::comm_aborts().load() == aborts_before);
    CHECK(x.download() == std::vector<float>{1.0f, 2.0f, 3.0f});
}
#endif

#endif  // LOCO_TEST_NCCL

}  // namespace cuda_comm_test
