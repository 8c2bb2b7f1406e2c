// loco demo: DiLoCo against fully synchronous data-parallel training, on 4 worker threads.
//
// Four workers (threads that talk only through loco::comm::threads) train the same small MLP
// classifier on data the program makes itself: a random "teacher" MLP labels Gaussian inputs by
// sampling from its softmax, so the task has a known floor, the teacher's own loss. Each worker
// draws its own shard with its own seed. The model is trained twice, with the same initial
// weights, data, inner optimizer (AdamW) and number of steps per worker:
//   synchronous  every step the workers average their gradients (one all-reduce of the whole
//                model) and each steps AdamW: classic data parallelism.
//   DiLoCo       every worker steps AdamW on its own gradients alone; every H = 50 steps the
//                workers average how far they moved (one all-reduce of the pseudo-gradient) and
//                apply Nesterov momentum (outer lr 0.7, momentum 0.9) to the shared weights.
//   DiLoCo 2-bit the same, with the pseudo-gradients sent as MuLoCo's 2-bit statistical codes
//                (all-gathered) and error feedback keeping what the codes drop for the next sync.
//   MuLoCo       the 2-bit row with Muon instead of AdamW on the hidden matrix W1.
// While it runs, worker 0 prints its mean training loss every few hundred steps.
//
// Reading the table:
//   eval loss   cross-entropy of the final global weights on a held-out set (lower is better;
//               the teacher's loss, printed above the table, is the best any model can do)
//   syncs       all-reduces of the whole model
//   MB sent     bytes one worker sent, as counted by the communicator (mean over the workers;
//               it includes the one broadcast of the initial weights every run starts with)
//   vs sync     MB sent as a fraction of the synchronous run's
// DiLoCo should end close to the synchronous loss while sending about H = 50 times fewer bytes;
// its 2-bit rows send about 7 times fewer again (2-bit codes are 16x smaller than fp32, but the
// all-gather of M = 4 payloads sends (M - 1) payloads against the ring all-reduce's 2 (M - 1)/M,
// and each tensor's payload carries its quantization table and a header: on this small model
// 6.6x per run, 6.8x per sync). MuLoCo (Muon inner optimizer) is expected to shine on
// transformer-sized models; on this small MLP it lands near the AdamW rows.
//
// Usage: demo [--steps N] [--quick] [--help]

#include <loco/loco.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <numbers>
#include <numeric>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int workers = 4;
constexpr std::uint64_t diloco_every = 50;  // H: inner steps between two DiLoCo syncs
// MuLoCo's inner Muon peak learning rate: the best of 0.003, 0.005, 0.01, 0.02 and 0.05 on this task.
constexpr float muon_lr = 0.005f;

struct shape {
    std::size_t in, hidden, classes;
};
// The student is wider than the teacher so that it can represent the teacher exactly; what is
// left of the loss then measures optimization, not capacity.
constexpr shape teacher_shape{32, 32, 10};
constexpr shape student_shape{32, 64, 10};

// ---- the model --------------------------------------------------------------------------------

// logits = W2 relu(W1 x + b1) + b2. All weights live in one flat buffer and all gradients in
// another, in the order W1, b1, W2, b2, so that the synchronous run all-reduces every gradient
// with one call and the views registered with loco cover the buffers exactly.
class mlp {
public:
    // output_gain scales the initial output layer: the teacher uses it to make confident labels.
    mlp(shape s, std::uint64_t seed, float output_gain = 1.0f)
        : s_(s),
          b1_(s.hidden * s.in),
          w2_(b1_ + s.hidden),
          b2_(w2_ + s.classes * s.hidden),
          weights_(b2_ + s.classes, 0.0f),
          grads_(weights_.size(), 0.0f) {
        std::mt19937_64 rng(seed);
        // He initialisation for the ReLU layer, LeCun for the linear output; biases start at 0.
        fill_normal(rng, w1(), s.hidden * s.in, std::sqrt(2.0f / static_cast<float>(s.in)));
        fill_normal(rng, w2(), s.classes * s.hidden,
                    output_gain / std::sqrt(static_cast<float>(s.hidden)));
    }
    // loco keeps views into the buffers; a copy would silently leave them behind.
    mlp(const mlp&) = delete;
    mlp& operator=(const mlp&) = delete;

    loco::parameter_list parameters() {
        loco::parameter_list list;
        list.add("W1", loco::host_matrix(w1(), s_.hidden, s_.in),
                 loco::host_matrix(grads_.data(), s_.hidden, s_.in), {.role = loco::role::matrix});
        list.add("b1", loco::host_tensor(weights_.data() + b1_, s_.hidden),
                 loco::host_tensor(grads_.data() + b1_, s_.hidden));
        // The output layer is tagged as a head: MuLoCo keeps it on AdamW, as Muon's authors do.
        list.add("W2", loco::host_matrix(w2(), s_.classes, s_.hidden),
                 loco::host_matrix(grads_.data() + w2_, s_.classes, s_.hidden), loco::tags::head);
        list.add("b2", loco::host_tensor(weights_.data() + b2_, s_.classes),
                 loco::host_tensor(grads_.data() + b2_, s_.classes));
        return list;
    }
    loco::tensor_view<float> weight_buffer() {
        return loco::host_tensor(weights_.data(), weights_.size());
    }
    loco::tensor_view<float> gradient_buffer() {
        return loco::host_tensor(grads_.data(), grads_.size());
    }

    // Logits of n row-major inputs, n x classes, row-major.
    const std::vector<float>& forward(const float* x, std::size_t n) {
        const std::size_t h = s_.hidden;
        hidden_.resize(n * h);
        logits_.resize(n * s_.classes);
        for (std::size_t i = 0; i < n; ++i) {
            affine(w1(), weights_.data() + b1_, x + i * s_.in, s_.in, h, hidden_.data() + i * h);
            for (std::size_t j = 0; j < h; ++j) {
                hidden_[i * h + j] = std::max(hidden_[i * h + j], 0.0f);
            }
            affine(w2(), weights_.data() + b2_, hidden_.data() + i * h, h, s_.classes,
                   logits_.data() + i * s_.classes);
        }
        return logits_;
    }

    // Mean cross-entropy of n labelled samples.
    float loss(const float* x, const int* y, std::size_t n) {
        forward(x, n);
        return softmax_cross_entropy(y, n);
    }

    // The same, and the gradient of it in gradient_buffer().
    float loss_and_gradient(const float* x, const int* y, std::size_t n) {
        forward(x, n);
        const float mean_loss = softmax_cross_entropy(y, n);  // logits_ now hold dloss/dlogits
        std::fill(grads_.begin(), grads_.end(), 0.0f);
        const std::size_t h = s_.hidden;
        float* gw1 = grads_.data();
        float* gb1 = grads_.data() + b1_;
        float* gw2 = grads_.data() + w2_;
        float* gb2 = grads_.data() + b2_;
        std::vector<float>& dhidden = scratch_;
        dhidden.assign(h, 0.0f);
        for (std::size_t i = 0; i < n; ++i) {
            const float* a = hidden_.data() + i * h;
            const float* dlogit = logits_.data() + i * s_.classes;
            std::fill(dhidden.begin(), dhidden.end(), 0.0f);
            for (std::size_t c = 0; c < s_.classes; ++c) {
                gb2[c] += dlogit[c];
                axpy(dlogit[c], a, gw2 + c * h, h);
                axpy(dlogit[c], w2() + c * h, dhidden.data(), h);
            }
            for (std::size_t j = 0; j < h; ++j) {
                if (a[j] > 0.0f) {  // ReLU passes the gradient only where it was active
                    gb1[j] += dhidden[j];
                    axpy(dhidden[j], x + i * s_.in, gw1 + j * s_.in, s_.in);
                }
            }
        }
        return mean_loss;
    }

private:
    float* w1() { return weights_.data(); }
    float* w2() { return weights_.data() + w2_; }

    static void fill_normal(std::mt19937_64& rng, float* out, std::size_t n, float stddev) {
        std::normal_distribution<float> normal(0.0f, stddev);
        std::generate_n(out, n, [&] { return normal(rng); });
    }

    // out = W v + b for a rows x cols row-major W.
    static void affine(const float* w, const float* b, const float* v, std::size_t cols,
                       std::size_t rows, float* out) {
        for (std::size_t r = 0; r < rows; ++r) {
            float acc = b[r];
            for (std::size_t c = 0; c < cols; ++c) {
                acc += w[r * cols + c] * v[c];
            }
            out[r] = acc;
        }
    }

    static void axpy(float a, const float* x, float* y, std::size_t n) {
        for (std::size_t k = 0; k < n; ++k) {
            y[k] += a * x[k];
        }
    }

    // Returns the mean loss and overwrites logits_ with its gradient, (softmax - onehot) / n.
    float softmax_cross_entropy(const int* y, std::size_t n) {
        double total = 0.0;
        const std::size_t k = s_.classes;
        for (std::size_t i = 0; i < n; ++i) {
            float* z = logits_.data() + i * k;
            const float top = *std::max_element(z, z + k);  // keeps exp() from overflowing
            float sum = 0.0f;
            for (std::size_t c = 0; c < k; ++c) {
                z[c] = std::exp(z[c] - top);
                sum += z[c];
            }
            const auto label = static_cast<std::size_t>(y[i]);
            total -= std::log(z[label] / sum);
            for (std::size_t c = 0; c < k; ++c) {
                z[c] = (z[c] / sum - (c == label ? 1.0f : 0.0f)) / static_cast<float>(n);
            }
        }
        return static_cast<float>(total / static_cast<double>(n));
    }

    shape s_;
    std::size_t b1_, w2_, b2_;  // offsets of b1, W2 and b2 in the flat buffers (W1 is at 0)
    std::vector<float> weights_;
    std::vector<float> grads_;
    std::vector<float> hidden_;   // n x hidden activations of the last forward pass
    std::vector<float> logits_;   // n x classes
    std::vector<float> scratch_;  // dloss/dhidden of one sample
};

// ---- the data ---------------------------------------------------------------------------------

struct dataset {
    std::vector<float> x;  // size() x in, row-major
    std::vector<int> y;
    std::size_t size() const { return y.size(); }
};

// n Gaussian inputs, each labelled by sampling from the teacher's softmax.
dataset draw(mlp& teacher, std::size_t n, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> uniform;
    dataset d;
    d.x.resize(n * student_shape.in);
    std::generate(d.x.begin(), d.x.end(), [&] { return normal(rng); });
    const std::vector<float>& logits = teacher.forward(d.x.data(), n);
    const std::size_t k = teacher_shape.classes;
    d.y.resize(n);
    std::vector<float> p(k);
    for (std::size_t i = 0; i < n; ++i) {
        const float* z = logits.data() + i * k;
        const float top = *std::max_element(z, z + k);
        std::transform(z, z + k, p.begin(), [&](float v) { return std::exp(v - top); });
        std::partial_sum(p.begin(), p.end(), p.begin());
        const float u = uniform(rng) * p.back();
        // Searching all but the last bound keeps a rounded-up u on the last class.
        const auto pick = std::upper_bound(p.begin(), p.end() - 1, u) - p.begin();
        d.y[i] = static_cast<int>(pick);
    }
    return d;
}

// ---- one training run -------------------------------------------------------------------------

// Everything the runs share, so that they differ only in how the workers communicate.
struct setup {
    int steps = 0;      // per worker
    int warmup = 0;     // steps of linear learning-rate warm-up
    int log_every = 0;
    std::size_t batch = 32;  // samples per worker and step
    // Tuned for the synchronous run (peak lr 5e-3 beat 3e-3 and 8e-3) and reused unchanged.
    // Weight decay 0.01, not DiLoCo's 0.1: the task has no overfitting for it to prevent.
    loco::inner::adamw::hyper inner{.lr = 5e-3f, .weight_decay = 0.01f};
    std::uint64_t init_seed = 7;
    std::vector<dataset> shards;  // one per worker
    dataset eval;
    float teacher_loss = 0.0f;    // the teacher's own loss on `eval`: the floor
};

// How one worker turns each step's gradient into an update: the only thing the runs differ in.
struct update_rule {
    std::function<void(float)> step;        // the step's gradient is in the model's buffer
    std::function<std::uint64_t()> finish;  // leaves the global weights in the model; returns
                                            // the number of all-reduces done
};
using make_rule = std::function<update_rule(loco::comm::communicator&, mlp&)>;

struct run_result {
    std::string mode;
    float eval_loss = 0.0f;
    std::uint64_t syncs = 0;
    double bytes_per_worker = 0.0;  // mean over the workers
    double seconds = 0.0;
};

// Throwing ends the run on every worker: run_threads wakes the peers of a failed worker instead
// of leaving them waiting in a collective.
void require_finite(float loss, const std::string& mode, int step) {
    if (!std::isfinite(loss)) {
        throw std::runtime_error(mode + ": non-finite loss at step " + std::to_string(step));
    }
}

// The inner learning rate of a step (counted from 1): linear warm-up, then cosine decay to a
// tenth of the peak, the schedule DiLoCo's inner AdamW uses. Without the decay the noise of
// constant-lr steps on small batches sets the final loss, not the optimizer.
float inner_lr(const setup& s, int step) {
    const float peak = s.inner.lr;
    if (step <= s.warmup) {
        return peak * static_cast<float>(step) / static_cast<float>(s.warmup);
    }
    const float progress =
        static_cast<float>(step - s.warmup) / static_cast<float>(std::max(1, s.steps - s.warmup));
    return peak * (0.1f + 0.45f * (1.0f + std::cos(std::numbers::pi_v<float> * progress)));
}

run_result train(const setup& s, const std::string& mode, const make_rule& make) {
    run_result result{.mode = mode};
    std::vector<std::uint64_t> bytes(workers);
    const auto start = std::chrono::steady_clock::now();
    loco::comm::run_threads(workers, [&](loco::comm::threads& comm) {
        mlp model(student_shape, s.init_seed);
        update_rule rule = make(comm, model);
        const dataset& shard = s.shards[static_cast<std::size_t>(comm.rank())];
        const std::size_t in = student_shape.in;
        double loss_sum = 0.0;
        for (int step = 1; step <= s.steps; ++step) {
            // The shard is already in random order, so consecutive batches are fair samples.
            const std::size_t batches = shard.size() / s.batch;
            const std::size_t first = (static_cast<std::size_t>(step - 1) % batches) * s.batch;
            const float loss =
                model.loss_and_gradient(&shard.x[first * in], &shard.y[first], s.batch);
            require_finite(loss, mode, step);
            rule.step(inner_lr(s, step));
            loss_sum += loss;
            if (comm.rank() == 0 && step % s.log_every == 0) {
                std::printf("  %-16s step %5d / %d   train loss %.4f\n", mode.c_str(), step,
                            s.steps, loss_sum / s.log_every);
                std::fflush(stdout);
                loss_sum = 0.0;
            }
        }
        const std::uint64_t syncs = rule.finish();
        bytes[static_cast<std::size_t>(comm.rank())] = comm.bytes_sent();
        if (comm.rank() == 0) {
            result.syncs = syncs;
            result.eval_loss = model.loss(s.eval.x.data(), s.eval.y.data(), s.eval.size());
        }
    });
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    result.seconds = elapsed.count();
    const std::uint64_t total_bytes = std::accumulate(bytes.begin(), bytes.end(), std::uint64_t{0});
    result.bytes_per_worker = static_cast<double>(total_bytes) / workers;
    return result;
}

// ---- the rows of the table: one function each -------------------------------------------------

run_result run_synchronous(const setup& s) {
    return train(s, "synchronous", [&s](loco::comm::communicator& comm, mlp& model) {
        // Every rank already starts from the same seed; the broadcast is what a data-parallel
        // framework does anyway (DDP does), and DiLoCo pays for the same one.
        comm.broadcast(loco::comm::as_bytes(model.weight_buffer()), 0);
        auto opt = std::make_shared<loco::optimizer<loco::inner::adamw>>(
            model.parameters(), loco::optimizer<loco::inner::adamw>::config{.inner = s.inner});
        auto all_reduces = std::make_shared<std::uint64_t>(0);
        return update_rule{
            .step =
                [&comm, &model, opt, all_reduces](float lr) {
                    opt->hyper().lr = lr;
                    comm.all_reduce(model.gradient_buffer(), loco::comm::reduce_op::mean);
                    ++*all_reduces;
                    opt->step();
                },
            .finish = [all_reduces] { return *all_reduces; }};
    });
}

// One DiLoCo row: the handle type, its configuration, and how the step's inner learning rate
// reaches it (a parameter-group optimizer has one learning rate per group).
template <class Diloco, class SetLr>
run_result run_diloco_variant(const setup& s, const std::string& mode,
                              const typename Diloco::config& cfg, SetLr set_lr) {
    return train(s, mode, [&](loco::comm::communicator& comm, mlp& model) {
        auto opt = std::make_shared<Diloco>(model.parameters(), comm, cfg);
        return update_rule{
            .step =
                [opt, set_lr](float lr) {
                    set_lr(*opt, lr);
                    opt->step();
                },
            // --steps may cut the last round short; closing it leaves every worker on the same
            // global weights.
            .finish =
                [opt] {
                    if (opt->calls() % diloco_every != 0) {
                        opt->sync();
                    }
                    return opt->outer_steps();
                }};
    });
}

run_result run_diloco(const setup& s) {
    using diloco = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    return run_diloco_variant<diloco>(
        s, "DiLoCo H=" + std::to_string(diloco_every),
        {.inner = s.inner, .outer = {.lr = 0.7f, .momentum = 0.9f}, .schedule = {.every = diloco_every}},
        [](diloco& opt, float lr) { opt.inner_hyper().lr = lr; });
}

// DiLoCo whose pseudo-gradients travel as MuLoCo's 2-bit statistical codes (codes 16x smaller
// than fp32; about 7x fewer bytes sent at M = 4, where an all-gather replaces the all-reduce and
// each tensor adds its table), with classic error feedback carrying what the codes drop into the
// next sync.
run_result run_diloco_2bit(const setup& s) {
    using compressor = loco::compress::error_feedback<loco::compress::statistical<2>>;
    using diloco = loco::diloco<loco::inner::adamw, loco::outer::nesterov, compressor>;
    return run_diloco_variant<diloco>(
        s, "DiLoCo 2-bit EF",
        {.inner = s.inner, .outer = {.lr = 0.7f, .momentum = 0.9f}, .schedule = {.every = diloco_every}},
        [](diloco& opt, float lr) { opt.inner_hyper().lr = lr; });
}

// MuLoCo: Muon on the hidden matrix (W1), AdamW on the output layer and the biases, and the
// pseudo-gradients as 2-bit statistical codes with error feedback.
run_result run_muloco(const setup& s) {
    using inner = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                               loco::group<loco::otherwise, loco::inner::adamw>>;
    using compressor = loco::compress::error_feedback<loco::compress::statistical<2>>;
    using muloco = loco::diloco<inner, loco::outer::nesterov, compressor>;
    const loco::inner::muon::hyper muon{.lr = muon_lr, .weight_decay = 0.01f};
    return run_diloco_variant<muloco>(
        s, "MuLoCo 2-bit EF",
        {.inner = {muon, s.inner}, .outer = {.lr = 0.7f, .momentum = 0.9f}, .schedule = {.every = diloco_every}},
        [&s](muloco& opt, float lr) {
            // One schedule for both groups: each group's peak scaled by the same factor.
            const float factor = lr / s.inner.lr;
            std::get<0>(opt.inner_hyper()).lr = muon_lr * factor;
            std::get<1>(opt.inner_hyper()).lr = lr;
        });
}

// ---- main -------------------------------------------------------------------------------------

void print_table(const setup& s, const std::vector<run_result>& rows) {
    const run_result& base = rows.front();
    std::printf("\n%d workers, %d steps of %zu samples each; teacher (floor) eval loss %.4f\n\n",
                workers, s.steps, s.batch, s.teacher_loss);
    std::printf("  %-16s %10s %7s %13s %9s %8s\n", "mode", "eval loss", "syncs", "MB sent/wkr",
                "vs sync", "time");
    for (const run_result& r : rows) {
        const double ratio = r.bytes_per_worker / base.bytes_per_worker;
        std::printf("  %-16s %10.4f %7llu %13.3f %9.4f %6.1f s\n", r.mode.c_str(), r.eval_loss,
                    static_cast<unsigned long long>(r.syncs), r.bytes_per_worker / 1e6, ratio,
                    r.seconds);
    }
    for (const run_result& r : rows) {
        if (&r != &base) {
            std::printf("\n%s: eval loss %+.2f%% vs synchronous, %.1fx fewer bytes\n",
                        r.mode.c_str(), 100.0 * (r.eval_loss / base.eval_loss - 1.0),
                        base.bytes_per_worker / r.bytes_per_worker);
        }
    }
}

struct options {
    int steps = 5000;
    bool quick = false;
    bool help = false;
};

void print_usage(std::FILE* to) {
    std::fprintf(
        to,
        "usage: demo [--steps N] [--quick] [--help]\n"
        "Trains a small MLP on %d worker threads, fully synchronous and with DiLoCo (H = %llu),\n"
        "and compares the final held-out loss and the bytes each worker sent.\n"
        "  --steps N  inner steps per worker (default 5000)\n"
        "  --quick    a short run on less data, for the test suite\n",
        workers, static_cast<unsigned long long>(diloco_every));
}

// Returns false when the arguments are not understood.
bool parse(int argc, char** argv, options& o) {
    bool steps_given = false;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            o.help = true;
        } else if (arg == "--quick") {
            o.quick = true;
        } else if (arg == "--steps" && i + 1 < argc) {
            char* end = nullptr;
            const long steps = std::strtol(argv[++i], &end, 10);
            if (*end != '\0' || steps < 1 || steps > 10'000'000) {
                return false;
            }
            o.steps = static_cast<int>(steps);
            steps_given = true;
        } else {
            return false;
        }
    }
    if (o.quick && !steps_given) {
        o.steps = 200;
    }
    return true;
}

// The data both runs train on. The shards are big enough that the default run sees each sample
// only a few times, as in pre-training, where DiLoCo is meant to be used.
setup make_setup(const options& o) {
    setup s;
    s.steps = o.steps;
    s.log_every = o.quick ? 50 : 500;
    s.log_every = std::min(s.log_every, std::max(1, s.steps / 4));
    s.warmup = std::min(100, s.steps / 10);
    const std::size_t shard_size = o.quick ? 1024 : 65536;
    const std::size_t eval_size = o.quick ? 1024 : 8192;

    // A gain of 4 on the teacher's output makes its labels confident but not certain: the floor
    // is well above zero, so the losses are comparable as fractions of it.
    mlp teacher(teacher_shape, 1, 4.0f);
    for (int r = 0; r < workers; ++r) {
        s.shards.push_back(draw(teacher, shard_size, 100 + static_cast<std::uint64_t>(r)));
    }
    s.eval = draw(teacher, eval_size, 99);
    s.teacher_loss = teacher.loss(s.eval.x.data(), s.eval.y.data(), s.eval.size());
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    options o;
    if (!parse(argc, argv, o)) {
        print_usage(stderr);
        return 2;
    }
    if (o.help) {
        print_usage(stdout);
        return 0;
    }
    const setup s = make_setup(o);
    std::printf("worker 0's mean training loss, every %d steps:\n", s.log_every);

    std::vector<run_result> rows;
    try {
        for (auto run : {run_synchronous, run_diloco, run_diloco_2bit, run_muloco}) {
            rows.push_back(run(s));
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "demo: %s\n", e.what());
        return 1;
    }
    print_table(s, rows);
    for (const run_result& r : rows) {
        if (!std::isfinite(r.eval_loss)) {
            std::fprintf(stderr, "demo: %s ended with a non-finite eval loss\n", r.mode.c_str());
            return 1;
        }
    }
    return 0;
}
