// Worker loss and rejoin over MPI (docs/reliability.md): the last rank leaves through the library's
// API (MPI_Comm_split with MPI_UNDEFINED), the survivors regroup() onto the communicator of the
// others and train a round, then the leaver comes back as a newcomer (a fresh handle on a new
// split of MPI_COMM_WORLD) and is healed from rank 0 over MPI. Every rank's parameters must equal,
// bit for bit, the same events run on comm::threads in this process (whose values
// tests/heal_test.cpp checks against a double-precision reference), and each other.
#include <doctest/doctest.h>

#include "../support/random.hpp"

#include <loco/comm/mpi.hpp>
#include <loco/comm/threads.hpp>
#include <loco/loco.hpp>

#include <mpi.h>

#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov,
                           loco::compress::error_feedback<loco::compress::blockwise<4, 8>>>;
// The one-round delay: between two rounds an exchange is always in flight, so the departure and
// the regroups drop one on every rank (over MPI that hung: the drop waited for an all-gather that
// the peers issue only in a later call).
using delayed_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov,
                               loco::compress::error_feedback<loco::compress::blockwise<4, 8>>,
                               loco::schedule::delayed>;
constexpr std::size_t n = 40;
constexpr int H = 3;

template <class Opt>
typename Opt::config config() {
    if constexpr (std::is_same_v<Opt, delayed_t>) {
        return {.inner = {.lr = 1e-2f}, .schedule = {.every = H}};
    } else {
        return {.inner = {.lr = 1e-2f}, .schedule = {.every = 1000}};  // the scenario syncs itself
    }
}

struct worker {
    int id;
    std::vector<float> w, g = std::vector<float>(n);
    loco::parameter_list list;
    int steps = 0;
    explicit worker(int id_) : id(id_) {
        auto rng = loco_test::rng_for("mpi heal init " + std::to_string(id));
        w = loco_test::normal_floats(rng, n);
        list.add_views("w", loco::host_matrix(w.data(), 5, 8),
                       loco::host_matrix(static_cast<const float*>(g.data()), 5, 8));
    }
    template <class Opt>
    void round(Opt& opt) {
        for (int s = 0; s < H; ++s) {
            auto rng = loco_test::rng_for("mpi heal grad " + std::to_string(id) + " " + std::to_string(steps++));
            const auto fresh = loco_test::normal_floats(rng, n);
            std::copy(fresh.begin(), fresh.end(), g.begin());
            opt.step();
        }
        if constexpr (!std::is_same_v<Opt, delayed_t>) opt.sync();
    }
};

// The scenario for one rank of `m`. survivors() is collective over every rank and returns the
// survivors' communicator (nullptr on the leaver, rank m - 1); everyone() returns the communicator
// of all m ranks again. Returns this rank's parameters at the end.
template <class Opt>
std::vector<float> scenario(int rank, int m, loco::comm::communicator& first,
                            const std::function<loco::comm::communicator*()>& survivors,
                            const std::function<loco::comm::communicator&()>& everyone) {
    worker x(rank);
    Opt opt(x.list, first, config<Opt>());
    opt.start();
    x.round(opt);
    x.round(opt);
    loco::comm::communicator* alone = survivors();
    if (alone != nullptr) {
        opt.regroup(*alone, 0);
        x.round(opt);
    }
    loco::comm::communicator& all = everyone();
    if (alone == nullptr) {  // the newcomer: a fresh worker with its own values, healed
        worker fresh(m + rank);
        Opt healed(fresh.list, all, config<Opt>());
        healed.regroup(all, 0);
        fresh.round(healed);
        fresh.round(healed);
        return fresh.w;
    }
    opt.regroup(all, 0);
    x.round(opt);
    x.round(opt);
    return x.w;
}

}  // namespace

TEST_CASE_TEMPLATE("mpi: a rank leaves through MPI_Comm_split, the survivors go on, it rejoins healed; as threads bit for bit",
                   Opt, opt_t, delayed_t) {
    int rank = 0, m = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &m);
    if (m < 2) {
        MESSAGE("needs 2 or more ranks");
        return;
    }

    // Over MPI.
    std::vector<float> got;
    {
        loco::comm::mpi world(MPI_COMM_WORLD);
        MPI_Comm everyone_handle = MPI_COMM_NULL;
        std::unique_ptr<loco::comm::mpi> survivors, everyone_comm;
        const bool leaving = rank == m - 1;
        got = scenario<Opt>(
            rank, m, world,
            [&]() -> loco::comm::communicator* {
                // [snippet:mpi-leave]
                // Collective over every rank: the leaver passes MPI_UNDEFINED and gets
                // MPI_COMM_NULL; the others get a communicator of the survivors.
                MPI_Comm rest = MPI_COMM_NULL;
                MPI_Comm_split(MPI_COMM_WORLD, leaving ? MPI_UNDEFINED : 0, rank, &rest);
                if (rest != MPI_COMM_NULL) {
                    survivors = std::make_unique<loco::comm::mpi>(
                        rest, loco::comm::mpi::options{.take_ownership = true});
                    // then, on every survivor: opt.regroup(*survivors);
                }
                // [snippet:mpi-leave end]
                return survivors.get();
            },
            [&]() -> loco::comm::communicator& {
                MPI_Comm_split(MPI_COMM_WORLD, 0, rank, &everyone_handle);
                everyone_comm = std::make_unique<loco::comm::mpi>(
                    everyone_handle, loco::comm::mpi::options{.take_ownership = true});
                return *everyone_comm;
            });
    }

    // The same events on threads, every rank in this process.
    auto g1 = std::make_shared<loco::comm::thread_group>(m);
    auto g2 = std::make_shared<loco::comm::thread_group>(m - 1);
    auto g3 = std::make_shared<loco::comm::thread_group>(m);
    std::vector<std::vector<float>> want(static_cast<std::size_t>(m));
    std::vector<std::thread> threads;
    for (int r = 0; r < m; ++r) {
        threads.emplace_back([&, r] {
            loco::comm::threads first(g1, r);
            std::unique_ptr<loco::comm::threads> second, third;
            want[std::size_t(r)] = scenario<Opt>(
                r, m, first,
                [&]() -> loco::comm::communicator* {
                    if (r == m - 1) return nullptr;
                    second = std::make_unique<loco::comm::threads>(g2, r);
                    return second.get();
                },
                [&]() -> loco::comm::communicator& {
                    third = std::make_unique<loco::comm::threads>(g3, r);
                    return *third;
                });
        });
    }
    for (auto& t : threads) t.join();

    CHECK(std::memcmp(got.data(), want[std::size_t(rank)].data(), n * sizeof(float)) == 0);
    for (int r = 1; r < m; ++r) CHECK(want[std::size_t(r)] == want[0]);  // every rank alike
}
