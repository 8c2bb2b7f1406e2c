// DiLoCo across processes over NCCL, one rank per GPU, checked against the same run on the host
// with the threads communicator: the GPU run must give the host's numbers.
//
//   nccl_diloco                  as many ranks as this machine has GPUs (at most 8), started here
//   nccl_diloco --ranks N        N ranks started here (NCCL takes one rank per GPU: N GPUs)
//   nccl_diloco --ranks N --rank R --id-file PATH
//                                one rank, when your own launcher (srun, mpirun, a script) starts
//                                the N processes; rank 0 writes the NCCL id to PATH (a fresh path
//                                on a file system every rank sees), the others read it
//
// Every worker r minimises its own quadratic, 0.5 |w - c_r|^2 with c_r drawn from r, so the
// workers pull apart between syncs and only the outer step brings them together: DiLoCo with
// AdamW inside, Nesterov outside, a sync every 20 steps, 60 steps. Each rank prints how far its
// final parameters are from the host run's and exits 1 if that is beyond fp32 rounding (the
// GPU contracts a * b + c into fused multiply-adds, the host does not), 77 without a GPU.
#include <loco/cuda.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iterator>
#include <string>
#include <vector>

namespace {

constexpr std::size_t sizes[] = {(std::size_t{1} << 20) + 13, 1000, 7};
constexpr int steps = 60;
constexpr int every = 20;

using gpu_diloco = loco::cuda::diloco<loco::inner::adamw, loco::outer::nesterov>;
using host_diloco = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
const loco::inner::adamw::hyper inner{.lr = 1e-2f};

// The start (the same on every worker) and worker r's target, from a counter-based generator so
// that every process draws the same numbers without talking.
float draw(std::uint64_t stream, std::size_t i) {
    const auto bits = static_cast<std::uint32_t>(loco::random::bits(2026, stream, i));
    return static_cast<float>(bits >> 8) * 0x1.0p-24f * 2.0f - 1.0f;  // uniform in [-1, 1)
}
std::vector<float> start_values(std::size_t n) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) {
        v[i] = draw(0, i);
    }
    return v;
}
std::vector<float> target(int rank, std::size_t n) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) {
        v[i] = draw(1 + static_cast<std::uint64_t>(rank), i);
    }
    return v;
}

std::size_t total() {
    std::size_t t = 0;
    for (const std::size_t n : sizes) {
        t += n;
    }
    return t;
}

// g = w - c on the device, w and c in the flat layout of one tensor.
__global__ void quadratic_gradient(const float* w, const float* c, float* g, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
         i += std::size_t(gridDim.x) * blockDim.x) {
        g[i] = w[i] - c[i];
    }
}

// The host run: `ranks` workers as threads. Returns worker 0's final parameters (all workers
// hold the same after the closing sync).
std::vector<float> host_run(int ranks) {
    std::vector<float> out;
    loco::comm::run_threads(ranks, [&](loco::comm::threads& comm) {
        const std::size_t n = total();
        std::vector<float> w = start_values(n), g(n, 0.0f);
        const std::vector<float> c = target(comm.rank(), n);
        loco::parameter_list params;
        std::size_t at = 0;
        for (std::size_t k = 0; k < std::size(sizes); ++k) {
            params.add_views("t" + std::to_string(k), loco::host_tensor(w.data() + at, sizes[k]),
                             loco::host_tensor(static_cast<const float*>(g.data() + at), sizes[k]));
            at += sizes[k];
        }
        host_diloco opt(params, comm, {.inner = inner, .schedule = {.every = every}});
        opt.start();
        for (int t = 0; t < steps; ++t) {
            for (std::size_t i = 0; i < n; ++i) {
                g[i] = w[i] - c[i];
            }
            opt.step();
        }
        if (comm.rank() == 0) {
            out = w;
        }
    });
    return out;
}

// One rank of the GPU run. Returns the process's exit status.
int gpu_rank(int ranks, int rank, const std::string& id_file) {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::printf("nccl_diloco: no GPU here; nothing run\n");
        return 77;
    }
    LOCO_CUDA_CHECK(cudaSetDevice(rank % devices));
    loco::backend::cuda::stream s;
    auto comm = loco::comm::nccl_bootstrap_file(id_file, ranks, rank, s,
                                                {.timeout = std::chrono::seconds(120)});

    const std::size_t n = total();
    loco::backend::cuda::device_buffer<float> w(n), g(n), c(n);
    w.upload(start_values(n));
    c.upload(target(rank, n));
    loco::parameter_list params;
    std::size_t at = 0;
    for (std::size_t k = 0; k < std::size(sizes); ++k) {
        params.add_views("t" + std::to_string(k), loco::cuda_tensor(w.get() + at, sizes[k]),
                         loco::cuda_tensor(static_cast<const float*>(g.get() + at), sizes[k]));
        at += sizes[k];
    }
    gpu_diloco opt(params, *comm, {.inner = inner, .schedule = {.every = every}, .stream = s});
    opt.start();
    for (int t = 0; t < steps; ++t) {
        quadratic_gradient<<<264, 256, 0, s>>>(w.get(), c.get(), g.get(), n);
        LOCO_CUDA_CHECK(cudaGetLastError());
        opt.step();
    }
    LOCO_CUDA_CHECK(cudaStreamSynchronize(s));
    const std::vector<float> got = w.download();
    const std::vector<float> want = host_run(ranks);

    double worst = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
        worst = std::max(worst, std::abs(double(got[i]) - double(want[i])));
        scale = std::max(scale, std::abs(double(want[i])));
    }
    const bool ok = std::isfinite(worst) && worst <= 1e-5 * scale;
    std::printf("rank %d of %d (GPU %d): %d outer steps, %llu bytes sent; largest difference "
                "from the host run on threads %.3g (of values up to %.3g): %s\n",
                rank, ranks, rank % devices, static_cast<int>(opt.outer_steps()),
                static_cast<unsigned long long>(comm->bytes_sent()), worst, scale,
                ok ? "same numbers" : "DIFFERENT");
    return ok ? 0 : 1;
}

// Starts `ranks` copies of this program, one per rank, and waits for them. Each child execs a
// fresh image (a process forked after CUDA was initialised must not use CUDA).
int launch(int ranks) {
    const char* self = "/proc/self/exe";
    const std::string id_file =
        "/tmp/loco-nccl-diloco-" + std::to_string(getpid()) + "-" +
        std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
    std::vector<pid_t> children;
    for (int r = 0; r < ranks; ++r) {
        const pid_t pid = fork();
        if (pid < 0) {
            std::perror("fork");
            return 1;
        }
        if (pid == 0) {
            const std::string n = std::to_string(ranks), me = std::to_string(r);
            execl(self, self, "--ranks", n.c_str(), "--rank", me.c_str(), "--id-file",
                  id_file.c_str(), static_cast<char*>(nullptr));
            std::perror("execl");
            _exit(1);
        }
        children.push_back(pid);
    }
    int status = 0;
    for (const pid_t pid : children) {
        int s = 0;
        waitpid(pid, &s, 0);
        const int code = WIFEXITED(s) ? WEXITSTATUS(s) : 1;
        status = status != 0 ? status : code;
    }
    std::remove(id_file.c_str());
    return status;
}

// Reads the whole of `text` as a decimal integer in [lo, hi] (strtol, as examples/demo.cpp
// parses); false on anything else: no digits, trailing characters, out of range.
bool parse_int(const char* text, long lo, long hi, int& out) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno == ERANGE || v < lo || v > hi) {
        return false;
    }
    out = static_cast<int>(v);
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    // A usage error: the usage line, then what was wrong; exit status 2.
    const auto refuse = [&](const std::string& what) {
        std::fprintf(stderr, "usage: %s [--ranks N [--rank R --id-file PATH]]\nnccl_diloco: %s\n",
                     argv[0], what.c_str());
        return 2;
    };
    int ranks = 0, rank = -1;
    std::string id_file;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--ranks" && i + 1 < argc) {
            if (!parse_int(argv[++i], 1, INT_MAX, ranks)) {
                return refuse("--ranks must be a whole number of at least 1, got '" +
                              std::string(argv[i]) + "'");
            }
        } else if (a == "--rank" && i + 1 < argc) {
            if (!parse_int(argv[++i], 0, INT_MAX - 1, rank)) {
                return refuse("--rank must be a whole number of at least 0, got '" +
                              std::string(argv[i]) + "'");
            }
        } else if (a == "--id-file" && i + 1 < argc) {
            id_file = argv[++i];
        } else {
            return refuse("unknown or incomplete argument '" + a + "'");
        }
    }
    if (rank >= 0 && (ranks < 1 || rank >= ranks || id_file.empty())) {
        return refuse("--rank R needs --ranks N with 0 <= R < N, and --id-file");
    }
    if (rank < 0 && !id_file.empty()) {
        return refuse("--id-file goes with --rank (one rank of a run your launcher starts)");
    }
    try {
        if (rank >= 0) {
            return gpu_rank(ranks, rank, id_file);
        }
        if (ranks == 0) {
            int devices = 0;
            if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
                std::printf("nccl_diloco: no GPU here; nothing run\n");
                return 77;
            }
            ranks = std::min(devices, 8);
        }
        return launch(ranks);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "nccl_diloco: %s\n", e.what());
        return 1;
    }
}
