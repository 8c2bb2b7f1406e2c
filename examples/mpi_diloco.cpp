// DiLoCo across MPI processes: every rank is one worker that fits a linear model of 64 weights on
// 128 points of its own and sends its pseudo-gradients in bf16 every 10 steps, as the DiLoCo papers
// do. Run it with
//   mpirun -np 4 ./mpi_diloco
// (as root or on fewer cores than ranks, OpenMPI also wants --oversubscribe and
// OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1). Exits 1 unless the weights come
// close to the true ones and every rank holds the same parameters. docs/communicators.md#mpi shows
// the marked region.
#include <loco/comm/mpi.hpp>
#include <loco/loco.hpp>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

// [snippet:mpi-diloco]
// Fits y = a . x (a_i = cos i) on 128 points of this rank's own; returns the largest |w_i - a_i|
// (infinity if the ranks disagree).
float train(MPI_Comm world) {
    loco::comm::mpi comm(world);  // collective: duplicates `world`, which stays the program's
    const int d = 64, points = 128;
    std::mt19937 rng(static_cast<unsigned>(comm.rank()));
    std::normal_distribution<float> normal;
    std::vector<float> x(points * d), y(points);
    for (int p = 0; p < points; ++p) {
        for (int i = 0; i < d; ++i) {
            x[p * d + i] = normal(rng);
            y[p] += std::cos(float(i)) * x[p * d + i];
        }
    }
    std::vector<float> w(d, 0.0f), grad(d);
    loco::parameter_list params;
    params.add("w", w, grad);
    loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::cast<loco::bf16>> opt{
        params, comm, {.inner = {.lr = 0.02f, .weight_decay = 0}, .schedule = {.every = 10}}};
    opt.start();  // every rank starts from rank 0's parameters
    for (int step = 0; step < 600; ++step) {
        std::fill(grad.begin(), grad.end(), 0.0f);  // mean squared error over this rank's points
        for (int p = 0; p < points; ++p) {
            float r = -y[p];
            for (int i = 0; i < d; ++i) {
                r += w[i] * x[p * d + i];
            }
            for (int i = 0; i < d; ++i) {
                grad[i] += 2 * r * x[p * d + i] / points;
            }
        }
        opt.step();  // an AdamW step; every 10th call also averages and applies Nesterov
    }
    float error = 0;
    for (int i = 0; i < d; ++i) {
        error = std::max(error, std::abs(w[i] - std::cos(float(i))));
    }
    if (comm.rank() == 0) {
        std::printf("%d ranks: largest weight error %.4f after %llu syncs; rank 0 sent %llu bytes "
                    "(%llu per sync)\n",
                    comm.size(), error, static_cast<unsigned long long>(opt.outer_steps()),
                    static_cast<unsigned long long>(comm.bytes_sent()),
                    static_cast<unsigned long long>(opt.bytes_per_sync()));
    }
    std::vector<float> rank0 = w;  // the last step synced: every rank holds the same weights
    comm.broadcast(loco::comm::as_bytes(loco::host_tensor(rank0.data(), rank0.size())), 0);
    return rank0 == w ? error : INFINITY;
}
// [snippet:mpi-diloco end]

}  // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    bool ok = false;
    try {
        ok = train(MPI_COMM_WORLD) < 0.01f;
    } catch (const loco::error& e) {
        std::fprintf(stderr, "mpi_diloco: %s\n", e.what());
        MPI_Abort(MPI_COMM_WORLD, 1);  // the peers may be waiting in a collective
    }
    int mine = ok ? 1 : 0;
    int all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    MPI_Finalize();
    return all == 1 ? 0 : 1;
}
