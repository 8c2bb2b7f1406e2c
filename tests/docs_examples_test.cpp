// The code examples of docs/*.md. A region between `// [snippet:NAME]` and `// [snippet:NAME end]`
// appears verbatim in a page (after `<!-- snippet: NAME -->`); the docs.snippets CTest fails when a
// page and this file drift apart. The test bodies check the numbers each page promises, so an
// example that stops computing what its page says fails here.
#include <doctest/doctest.h>

#include <loco/loco.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

// doctest::Approx adds 1 to the scale of its tolerance; these values are far below 1.
namespace {
doctest::Approx relative(double value) {
    return doctest::Approx(value).scale(0.0);
}
}  // namespace

// ---- docs/getting-started.md ---------------------------------------------------------------------

// A function named main outside the global namespace is an ordinary function, so the page can show
// a complete program and this file can still call it.
namespace getting_started {
// [snippet:first-program]
// Two workers fit one number w; worker r sees the loss (w - target_r)^2. Each takes inner SGD
// steps towards its own target, every 10 steps DiLoCo averages how far the workers moved, and
// the outer Nesterov step moves the shared w. The only w both agree on is the mean, 2.
int main() {
    const float targets[] = {1.0f, 3.0f};
    float result = 0.0f;

    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        std::vector<float> w = {0.0f};
        std::vector<float> grad = {0.0f};
        loco::parameter_list params;
        params.add("w", w, grad);

        loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(
            params, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 10}});
        for (int step = 0; step < 300; ++step) {
            grad[0] = 2.0f * (w[0] - targets[comm.rank()]);  // the trainer's backward pass
            opt.step();
        }
        if (comm.rank() == 0) {
            result = w[0];
        }
    });

    std::printf("w = %.5f\n", result);
    return std::abs(result - 2.0f) < 1e-3f ? EXIT_SUCCESS : EXIT_FAILURE;
}
// [snippet:first-program end]
}  // namespace getting_started

TEST_CASE("docs: getting-started first program converges to the mean target") {
    CHECK(getting_started::main() == EXIT_SUCCESS);
}

// ---- docs/index.md ------------------------------------------------------------------------------

TEST_CASE("docs: index handles and their defaults") {
    // [snippet:handles]
    // One inner optimizer over a parameter list, no communication.
    using plain = loco::optimizer<loco::inner::adamw>;

    // DiLoCo: AdamW on every worker, Nesterov on the averaged pseudo-gradient. The compressor and
    // the schedule default to no compression and a sync every H steps.
    using diloco = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    static_assert(std::is_same_v<diloco, loco::diloco<loco::inner::adamw, loco::outer::nesterov,
                                                      loco::compress::none, loco::schedule::every>>);

    diloco::config cfg;  // DiLoCo's published values
    // cfg.inner:    lr 4e-4, betas 0.9 / 0.95, eps 1e-8, weight decay 0.1
    // cfg.outer:    lr 0.7, momentum 0.9
    // cfg.schedule: every 500 steps
    // [snippet:handles end]
    CHECK(std::is_same_v<plain::policy, loco::inner::adamw>);
    CHECK(cfg.inner.lr == 4e-4f);
    CHECK(cfg.inner.beta1 == 0.9f);
    CHECK(cfg.inner.beta2 == 0.95f);
    CHECK(cfg.inner.eps == 1e-8f);
    CHECK(cfg.inner.weight_decay == 0.1f);
    CHECK(cfg.outer.lr == 0.7f);
    CHECK(cfg.outer.momentum == 0.9f);
    CHECK(cfg.schedule.every == 500);
    CHECK(cfg.on_nonfinite == loco::nonfinite_policy::skip);
    CHECK(cfg.broadcast_initial);
    CHECK(cfg.workers == 0);
}

// ---- docs/inner.md ------------------------------------------------------------------------------

TEST_CASE("docs: inner::sgd example") {
    // [snippet:inner-sgd]
    std::vector<float> w = {1.0f};
    std::vector<float> grad = {0.5f};
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::optimizer<loco::inner::sgd> opt(params, {.inner = {.lr = 0.1f, .momentum = 0.9f}});
    opt.step();  // b = g = 0.5 (first step)        w = 1 - 0.1 * 0.5     = 0.95
    opt.step();  // b = 0.9 * 0.5 + 0.5 = 0.95      w = 0.95 - 0.1 * 0.95 = 0.855
    // [snippet:inner-sgd end]
    CHECK(w[0] == doctest::Approx(0.855));
    CHECK(opt.state(0)[0] == doctest::Approx(0.95));
    CHECK(opt.steps() == 2);
}

TEST_CASE("docs: inner::adamw example") {
    // [snippet:inner-adamw]
    std::vector<float> w = {1.0f, -1.0f};
    std::vector<float> grad = {2.0f, -0.001f};
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::optimizer<loco::inner::adamw> opt(params, {.inner = {.lr = 0.01f}});
    opt.step();
    // Decay first: w *= 1 - lr * weight_decay = 0.999. The first bias-corrected step is then
    // lr * g / (|g| + eps), about lr * sign(g) whatever the gradient's size:
    // w = {0.999 - 0.01, -0.999 + 0.01} = {0.989, -0.989};  m = 0.1 * g;  v = 0.05 * g^2
    // [snippet:inner-adamw end]
    CHECK(w[0] == doctest::Approx(0.989));
    CHECK(w[1] == doctest::Approx(-0.989));
    CHECK(opt.state(0)[0] == doctest::Approx(0.2));
    CHECK(opt.state(1)[0] == doctest::Approx(0.2));
    CHECK(opt.state(0)[1] == relative(0.1 * -0.001));
    CHECK(opt.state(1)[1] == relative(0.05 * 0.001 * 0.001));
}

TEST_CASE("docs: inner::lion example") {
    // [snippet:inner-lion]
    std::vector<float> w = {1.0f, 1.0f};
    std::vector<float> grad = {-3.0f, 0.002f};
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::optimizer<loco::inner::lion> opt(params,
                                           {.inner = {.lr = 0.01f, .weight_decay = 1.0f}});
    opt.step();
    // Decay w *= 1 - lr * weight_decay = 0.99, then every element moves by exactly lr against
    // the sign of 0.1 * g (m starts at 0): w = {0.99 + 0.01, 0.99 - 0.01} = {1.0, 0.98}.
    // The momentum keeps the slower average: m = 0.01 * g = {-0.03, 0.00002}.
    // [snippet:inner-lion end]
    CHECK(w[0] == doctest::Approx(1.0));
    CHECK(w[1] == doctest::Approx(0.98));
    CHECK(opt.state(0)[0] == doctest::Approx(-0.03));
    CHECK(opt.state(0)[1] == relative(0.00002));
}

// ---- docs/outer.md ------------------------------------------------------------------------------

TEST_CASE("docs: outer::sgd example is parameter averaging") {
    // [snippet:outer-sgd]
    std::vector<float> after_sync[2];
    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        const float r = static_cast<float>(comm.rank());
        std::vector<float> w = {0.0f, 0.0f};
        std::vector<float> grad = {-1.0f - r, r};  // worker 0: {-1, 0}, worker 1: {-2, 1}
        loco::parameter_list params;
        params.add("w", w, grad);

        loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(
            params, comm, {.inner = {.lr = 1.0f}, .outer = {.lr = 1.0f}, .schedule = {.every = 2}});
        opt.step();  // worker 0: w = {1, 0}   worker 1: w = {2, -1}
        opt.step();  // worker 0: w = {2, 0}   worker 1: w = {4, -2}, then the sync:
        // delta = {0 - 2, 0 - 0} and {0 - 4, 0 + 2}; mean {-3, 1}; w = 0 - 1 * {-3, 1} = {3, -1},
        // the mean of the workers' parameters, on both workers.
        after_sync[comm.rank()] = w;
    });
    // [snippet:outer-sgd end]
    for (const auto& w : after_sync) {
        CHECK(w == std::vector<float>{3.0f, -1.0f});
    }
}

TEST_CASE("docs: outer::nesterov example (M = 1, lookahead)") {
    // [snippet:outer-nesterov]
    std::vector<float> w = {0.0f};
    std::vector<float> grad = {-1.0f};  // constant: every inner step adds lr * 1 to w
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(
        params, comm,
        {.inner = {.lr = 1.0f}, .outer = {.lr = 0.7f, .momentum = 0.9f}, .schedule = {.every = 2}});
    opt.step();
    opt.step();
    // local w = 2, delta = 0 - 2 = -2, b = -2, w = 0 - 0.7 * (-2 + 0.9 * -2) = 2.66:
    // the first outer step moves by (1 + momentum) * lr * delta.
    // [snippet:outer-nesterov end]
    CHECK(w[0] == doctest::Approx(2.66));
    CHECK(opt.outer_state(0)[0] == doctest::Approx(-2.0));
    opt.step();
    opt.step();
    // local 4.66, delta -2, b = 0.9 * -2 - 2 = -3.8, w = 2.66 - 0.7 * (-2 + 0.9 * -3.8) = 6.454
    CHECK(w[0] == doctest::Approx(6.454));
    CHECK(opt.outer_state(0)[0] == doctest::Approx(-3.8));
    CHECK(opt.outer_steps() == 2);
}

TEST_CASE("docs: outer::adam example") {
    // [snippet:outer-adam]
    std::vector<float> w = {0.0f};
    std::vector<float> grad = {-1.0f};
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::adam> opt(
        params, comm, {.inner = {.lr = 1.0f}, .schedule = {.every = 2}});
    opt.step();
    opt.step();
    // delta = 0 - 2 = -2;  m = 0.1 * -2 = -0.2;  v = 0.01 * 4 = 0.04;
    // w = 0 - 0.01 * -0.2 / (sqrt(0.04) + 0.001) = 0.00995025 (outer lr 1e-2, tau 1e-3)
    // [snippet:outer-adam end]
    CHECK(w[0] == doctest::Approx(0.00995025));
    CHECK(opt.outer_state(0)[0] == doctest::Approx(-0.2));
    CHECK(opt.outer_state(1)[0] == doctest::Approx(0.04));

    // With bias correction the same first step divides m by 1 - 0.9 and v by 1 - 0.99:
    // w = 0 - 0.01 * -2 / (2 + 0.001) = 0.00999500.
    std::vector<float> w2 = {0.0f};
    loco::parameter_list params2;
    params2.add("w", w2, grad);
    loco::diloco<loco::inner::sgd, loco::outer::adam> corrected(
        params2, comm,
        {.inner = {.lr = 1.0f}, .outer = {.bias_correction = true}, .schedule = {.every = 2}});
    corrected.step();
    corrected.step();
    CHECK(w2[0] == doctest::Approx(0.02 / 2.001));
}

// ---- docs/schedules.md --------------------------------------------------------------------------

TEST_CASE("docs: schedule::every example") {
    // [snippet:schedule-every]
    std::vector<float> w = {0.0f};
    std::vector<float> grad = {1.0f};
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(params, comm,
                                                             {.schedule = {.every = 3}});
    std::vector<std::uint64_t> synced_at;
    for (std::uint64_t call = 1; call <= 9; ++call) {
        // A non-finite gradient is skipped, but the call still counts towards H.
        grad[0] = call == 2 ? std::numeric_limits<float>::quiet_NaN() : 1.0f;
        if (opt.step().synced) {
            synced_at.push_back(call);
        }
    }
    // synced_at == {3, 6, 9}; 8 inner updates applied, 1 skipped, 3 outer steps
    // [snippet:schedule-every end]
    CHECK(synced_at == std::vector<std::uint64_t>{3, 6, 9});
    CHECK(opt.calls() == 9);
    CHECK(opt.inner_steps() == 8);
    CHECK(opt.skipped_steps() == 1);
    CHECK(opt.outer_steps() == 3);

    // H is a run-time value: a change takes effect from the next call.
    opt.schedule_hyper().every = 2;
    CHECK(opt.step().synced);  // call 10
    opt.schedule_hyper().every = 0;
    CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
    CHECK(opt.calls() == 10);
    CHECK(opt.inner_steps() == 9);
}

// ---- docs/compressors.md ------------------------------------------------------------------------

TEST_CASE("docs: compress::none example counts the bytes of one sync") {
    // [snippet:compress-none]
    std::uint64_t sent[2] = {};
    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        std::vector<float> w(1000, 1.0f);
        std::vector<float> grad(1000, 0.5f);
        loco::parameter_list params;
        params.add("w", w, grad);

        loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none> opt(
            params, comm, {.schedule = {.every = 10}});
        for (int step = 0; step < 10; ++step) {
            opt.step();  // the first call broadcasts rank 0's parameters, the 10th syncs
        }
        sent[comm.rank()] = comm.bytes_sent();
    });
    // The sync's mean all-reduce: 4 bytes * 1000 elements * 2 (M - 1) / M = 4000 bytes from each
    // of the M = 2 workers, plus 4 bytes of the ranks' agreement on its outcome. Rank 0 also sent
    // its 4000 bytes of initial parameters to rank 1, and each rank 64 bytes of the start-up check
    // that every rank built the same model and policies:
    // sent == {8068, 4068}
    // [snippet:compress-none end]
    CHECK(sent[0] == 8068);
    CHECK(sent[1] == 4068);
    const loco::compress::segment whole{0, 1000, 1, 1000};
    CHECK(loco::compress::none::payload_bytes({}, {&whole, 1}) == loco::compress::wire::header_bytes + 4000);
}

// ---- docs/communicators.md ----------------------------------------------------------------------

TEST_CASE("docs: comm::single example") {
    // [snippet:comm-single]
    loco::comm::single comm;
    std::vector<float> x = {1.0f, 2.0f};
    comm.all_reduce(loco::as_view(x), loco::comm::reduce_op::mean);  // one rank: x stays {1, 2}
    // comm.rank() == 0, comm.size() == 1, comm.bytes_sent() == 0
    // [snippet:comm-single end]
    CHECK(x == std::vector<float>{1.0f, 2.0f});
    CHECK(comm.rank() == 0);
    CHECK(comm.size() == 1);
    CHECK(comm.bytes_sent() == 0);
}

TEST_CASE("docs: comm::threads example") {
    // [snippet:comm-threads]
    std::vector<float> results[3];
    std::uint64_t bytes[3] = {};
    loco::comm::run_threads(3, [&](loco::comm::communicator& comm) {
        const auto r = static_cast<std::size_t>(comm.rank());
        std::vector<float> x(6, static_cast<float>(r + 1));  // rank r holds r + 1 everywhere
        comm.all_reduce(loco::as_view(x), loco::comm::reduce_op::mean);
        results[r] = x;                 // {2, 2, 2, 2, 2, 2} on every rank
        bytes[r] = comm.bytes_sent();   // 4 * (n + (M - 2) * c_r) = 4 * (6 + 1 * 2) = 32
    });
    // [snippet:comm-threads end]
    for (std::size_t r = 0; r < 3; ++r) {
        CHECK(results[r] == std::vector<float>(6, 2.0f));
        CHECK(bytes[r] == 32);
    }
}

TEST_CASE("docs: comm::threads timeout example") {
    // [snippet:comm-threads-timeout]
    auto group = std::make_shared<loco::comm::thread_group>(2, std::chrono::milliseconds(100));
    loco::comm::threads rank0(group, 0);  // rank 1 is never created, so it never arrives
    std::string message;
    try {
        rank0.barrier();
    } catch (const loco::comm_error& e) {
        message = e.what();  // "... rank 0 waited 100 ms for its peers; only 1 of 2 ranks arrived"
    }
    // The group is now aborted: every later collective on it throws comm_error at once.
    // [snippet:comm-threads-timeout end]
    CHECK(message == "loco::comm::threads rank 0, barrier: rank 0 waited 100 ms for its peers; "
                     "only 1 of 2 ranks arrived");
    CHECK(group->aborted());
    CHECK_THROWS_WITH_AS(rank0.barrier(), doctest::Contains("the thread group was aborted"),
                         loco::comm_error);
}

TEST_CASE("docs: comm::threads ranks that disagree all throw") {
    int failures = 0;
    try {
        loco::comm::run_threads(2, [](loco::comm::communicator& comm) {
            std::vector<float> x(comm.rank() == 0 ? 4 : 5, 1.0f);
            comm.all_reduce(loco::as_view(x), loco::comm::reduce_op::sum);
        });
    } catch (const loco::comm_error& e) {
        ++failures;
        CHECK(std::string(e.what()).find("ranks disagree on the collective: rank 0 called "
                                         "all_reduce (sum) of 4 floats, rank 1 called "
                                         "all_reduce (sum) of 5 floats") != std::string::npos);
    }
    CHECK(failures == 1);
}

// [snippet:comm-custom]
// Forwards every collective to another communicator and counts them. The base class has already
// checked the arguments when a do_ function runs; the bytes are counted by the communicator
// that sends them.
class counting_communicator final : public loco::comm::communicator {
public:
    explicit counting_communicator(loco::comm::communicator& next) : next_(next) {}

    int rank() const noexcept override { return next_.rank(); }
    int size() const noexcept override { return next_.size(); }
    loco::memory_space space() const noexcept override { return next_.space(); }
    std::string_view name() const noexcept override { return "counting"; }
    std::uint64_t bytes_sent() const noexcept override { return next_.bytes_sent(); }

    int all_reduces() const noexcept { return all_reduces_; }
    int broadcasts() const noexcept { return broadcasts_; }

protected:
    void do_all_reduce(loco::tensor_view<float> data, loco::comm::reduce_op op) override {
        ++all_reduces_;
        next_.all_reduce(data, op);
    }
    void do_all_gather(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        next_.all_gather(send, recv);
    }
    void do_all_to_all(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        next_.all_to_all(send, recv);
    }
    void do_broadcast(loco::tensor_view<std::byte> data, int root) override {
        ++broadcasts_;
        next_.broadcast(data, root);
    }
    void do_barrier() override { next_.barrier(); }

private:
    loco::comm::communicator& next_;
    int all_reduces_ = 0;
    int broadcasts_ = 0;
};
// [snippet:comm-custom end]

TEST_CASE("docs: a custom communicator sees one broadcast and two all-reduces per sync") {
    // [snippet:comm-custom-use]
    int broadcasts[2] = {};
    int all_reduces[2] = {};
    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        counting_communicator counted(comm);
        std::vector<float> w(8, 1.0f);
        std::vector<float> grad(8, 0.25f);
        loco::parameter_list params;
        params.add("w", w, grad);

        loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(params, counted,
                                                            {.schedule = {.every = 2}});
        for (int step = 0; step < 6; ++step) {
            opt.step();
        }
        broadcasts[comm.rank()] = counted.broadcasts();    // 1: the initial parameters
        all_reduces[comm.rank()] = counted.all_reduces();  // 7: the start-up check, 2 per sync
    });
    // [snippet:comm-custom-use end]
    for (int r = 0; r < 2; ++r) {
        CHECK(broadcasts[r] == 1);
        CHECK(all_reduces[r] == 7);
    }

    loco::comm::single single;
    counting_communicator counted(single);
    CHECK(counted.name() == "counting");
    CHECK(counted.size() == 1);
    CHECK(counted.bytes_sent() == 0);
}

TEST_CASE("docs: communicator argument checks") {
    loco::comm::single comm;
    float host[2] = {};
    CHECK_THROWS_AS(comm.all_reduce(loco::cuda_tensor(host, 2), loco::comm::reduce_op::sum),
                    loco::memory_space_error);
    CHECK_THROWS_AS(comm.all_reduce(loco::host_tensor(static_cast<float*>(nullptr), 2),
                                    loco::comm::reduce_op::sum),
                    loco::invalid_argument);
    std::byte send[4] = {};
    std::byte recv[3] = {};
    CHECK_THROWS_AS(comm.all_gather(loco::host_tensor(static_cast<const std::byte*>(send), 4),
                                    loco::host_tensor(recv, 3)),
                    loco::shape_error);
    CHECK_THROWS_AS(comm.broadcast(loco::host_tensor(recv, 3), 1), loco::invalid_argument);
}

// ---- docs/tensors.md ----------------------------------------------------------------------------

// [snippet:tensor-adl]
namespace mylib {

// A tensor type that loco has never heard of.
class matrix {
public:
    matrix(std::size_t r, std::size_t c, float fill) : rows_(r), cols_(c), data_(r * c, fill) {}
    float* data() { return data_.data(); }
    std::size_t rows() const { return rows_; }
    std::size_t cols() const { return cols_; }

private:
    std::size_t rows_;
    std::size_t cols_;
    std::vector<float> data_;
};

// Found by argument-dependent lookup: this one function makes mylib::matrix a loco tensor.
inline loco::tensor_view<float> loco_view(matrix& m) {
    return loco::host_matrix(m.data(), m.rows(), m.cols());
}

}  // namespace mylib
// [snippet:tensor-adl end]

// [snippet:tensor-traits]
namespace mylib {

// A view type from another library: pointer, length, and where the memory lives.
struct device_span {
    float* ptr;
    std::size_t len;
    bool on_gpu;
};

}  // namespace mylib

namespace loco {

template <>
struct tensor_traits<mylib::device_span> {
    using element_type = float;
    static constexpr bool is_view = true;  // it does not own its elements: temporaries are fine

    static float* data(const mylib::device_span& s) { return s.ptr; }
    static std::size_t size(const mylib::device_span& s) { return s.len; }
    static memory_space space(const mylib::device_span& s) {
        return s.on_gpu ? memory_space::cuda : memory_space::host;
    }
};

}  // namespace loco
// [snippet:tensor-traits end]

TEST_CASE("docs: tensors through loco_view and tensor_traits") {
    // [snippet:tensor-use]
    mylib::matrix w(2, 3, 1.0f);
    mylib::matrix dw(2, 3, 0.5f);
    std::vector<float> b(3, 0.0f);
    std::vector<float> db(3, -1.0f);

    loco::parameter_list params;
    params.add("w", w, dw)                                    // loco_view
        .add("b", mylib::device_span{b.data(), 3, false},     // tensor_traits
             mylib::device_span{db.data(), 3, false});
    // params[0].value.rows == 2, params[0].value.cols == 3, params.total_elements() == 9

    loco::optimizer<loco::inner::sgd> opt(params, {.inner = {.lr = 0.1f}});
    opt.step();  // every element of w: 1 - 0.1 * 0.5 = 0.95; every element of b: 0 + 0.1 = 0.1
    // [snippet:tensor-use end]
    CHECK(params[0].value.is_matrix());
    CHECK(params[0].value.rows == 2);
    CHECK(params[0].value.cols == 3);
    CHECK(params[1].offset == 6);
    CHECK(params.total_elements() == 9);
    for (std::size_t i = 0; i < 6; ++i) {
        CHECK(w.data()[i] == doctest::Approx(0.95));
    }
    CHECK(b == std::vector<float>(3, 0.1f));

    // The traits' space() is honoured; this build runs the optimizer on the host only.
    float fake[6] = {};
    loco::parameter_list on_gpu;
    on_gpu.add("g", mylib::device_span{fake, 3, true}, mylib::device_span{fake + 3, 3, true});
    CHECK(on_gpu.space() == loco::memory_space::cuda);
    CHECK_THROWS_AS(loco::optimizer<loco::inner::sgd>{on_gpu}, loco::memory_space_error);
    CHECK_THROWS_AS(params.add("mixed", mylib::device_span{fake, 3, true},
                               mylib::device_span{fake, 3, true}),
                    loco::memory_space_error);
}

TEST_CASE("docs: raw pointer views") {
    // [snippet:tensor-raw]
    float w[4] = {1.0f, 2.0f, 3.0f, 4.0f};  // memory owned by something that is not a tensor
    const float g[4] = {1.0f, 1.0f, 1.0f, 1.0f};

    loco::parameter_list params;
    params.add_views("w", loco::host_matrix(w, 2, 2), loco::host_tensor(g, 4));

    loco::optimizer<loco::inner::sgd> opt(params, {.inner = {.lr = 0.5f}});
    opt.step();  // w = {0.5, 1.5, 2.5, 3.5}
    // [snippet:tensor-raw end]
    CHECK(w[0] == 0.5f);
    CHECK(w[1] == 1.5f);
    CHECK(w[2] == 2.5f);
    CHECK(w[3] == 3.5f);
}

TEST_CASE("docs: parameter_list rejections") {
    std::vector<float> a(4), b(3), ga(4);
    loco::parameter_list params;
    CHECK_THROWS_AS(params.add("a", a, b), loco::shape_error);
    params.add("a", a, ga);
    CHECK_THROWS_AS(params.add("a", b, b), loco::invalid_argument);
    params.add("", b, b);
    CHECK(params[1].name == "param1");
    // b is its own gradient: values must not overlap anything.
    CHECK_THROWS_AS(loco::optimizer<loco::inner::sgd>{params}, loco::invalid_argument);
}

// ---- docs/policies.md ---------------------------------------------------------------------------

// [snippet:policy-signum]
#include <loco/config.hpp>  // LOCO_HD
#include <loco/error.hpp>   // loco::invalid_argument
#include <loco/math.hpp>    // loco::math::sign

#include <cstdint>
#include <string_view>

namespace mylib {

// Signum (signSGD with momentum): the step is the sign of an exponential average of the
// gradients, so every element moves by exactly lr.
struct signum {
    static constexpr std::string_view name = "mylib_signum";  // recorded in checkpoints

    struct hyper {
        float lr = 1e-4f;
        float beta = 0.9f;
    };

    static constexpr int state_size = 1;  // the momentum m

    struct scalars {
        float lr, beta;
    };

    LOCO_HD static scalars prepare(const hyper& h, std::uint64_t /*step*/) {
        return {h.lr, h.beta};
    }

    LOCO_HD static void update(const scalars& k, float& p, float g, float* s) {
        s[0] = k.beta * s[0] + (1.0f - k.beta) * g;
        p -= k.lr * loco::math::sign(s[0]);
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f)) {
            throw loco::invalid_argument("mylib::signum: lr must be >= 0");
        }
        if (!(h.beta >= 0.0f && h.beta < 1.0f)) {
            throw loco::invalid_argument("mylib::signum: beta must be in [0, 1)");
        }
    }
};

}  // namespace mylib
// [snippet:policy-signum end]

// [snippet:policy-schedule]
namespace mylib {

// Sync after every step during a warm-up, then every `every` steps.
struct warmup_then_every {
    static constexpr std::string_view name = "mylib_warmup_then_every";

    struct hyper {
        std::uint64_t warmup = 100;
        std::uint64_t every = 500;
    };

    static bool due(const hyper& h, std::uint64_t calls) {
        return calls <= h.warmup || (calls - h.warmup) % h.every == 0;
    }

    static void validate(const hyper& h) {
        if (h.every == 0) {
            throw loco::invalid_argument("mylib::warmup_then_every: every must be >= 1");
        }
    }

    // The settings, which start() compares between the ranks and checkpoints record.
    static std::string describe(const hyper& h) {
        return "mylib_warmup_then_every warmup=" + std::to_string(h.warmup) +
               " every=" + std::to_string(h.every);
    }
};

}  // namespace mylib
// [snippet:policy-schedule end]

static_assert(loco::inner_optimizer<mylib::signum>);
static_assert(loco::outer_optimizer<mylib::signum>);
static_assert(loco::sync_schedule<mylib::warmup_then_every>);

TEST_CASE("docs: a custom inner optimizer and schedule run through loco::diloco") {
    // [snippet:policy-use]
    std::vector<float> w = {0.0f};
    std::vector<float> grad = {-1.0f};
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::comm::single comm;
    loco::diloco<mylib::signum, loco::outer::sgd, loco::compress::none, mylib::warmup_then_every>
        opt(params, comm, {.inner = {.lr = 0.5f}, .schedule = {.warmup = 2, .every = 3}});
    for (int step = 0; step < 8; ++step) {
        opt.step();  // w += 0.5 every call; syncs after calls 1, 2, 5 and 8
    }
    // w == 4, opt.outer_steps() == 4, opt.inner_state(0)[0] == -(1 - 0.9^8)
    // [snippet:policy-use end]
    CHECK(w[0] == 4.0f);
    CHECK(opt.outer_steps() == 4);
    CHECK(opt.inner_state(0)[0] == doctest::Approx(-(1.0 - std::pow(0.9, 8))));
    CHECK(opt.global()[0] == 4.0f);

    // validate() runs at construction and before every step.
    CHECK_THROWS_WITH_AS(
        (loco::diloco<mylib::signum, loco::outer::sgd>(params, comm, {.inner = {.beta = 1.0f}})),
        "mylib::signum: beta must be in [0, 1)", loco::invalid_argument);
    opt.inner_hyper().lr = -1.0f;
    CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
    CHECK(w[0] == 4.0f);

    // A saved state names the policies it was written by.
    opt.inner_hyper().lr = 0.5f;
    std::stringstream saved;
    opt.save(saved);
    CHECK(saved.str().find("mylib_signum") != std::string::npos);
    CHECK(saved.str().find("mylib_warmup_then_every") != std::string::npos);
}

// ---- docs/diloco.md -----------------------------------------------------------------------------

TEST_CASE("docs: diloco worked example (MaxText's two-replica linear model)") {
    // [snippet:diloco-maxtext]
    // Two replicas of y = x . w + b with a mean squared error, inner SGD lr 0.1, outer Nesterov
    // lr 1.0 and momentum 0.9, a sync every 3 steps.
    struct batch {
        float x[2][2];
        float y[2];
    };
    const batch batches[2] = {{{{0, 1}, {1, 0}}, {1, 2}},   // replica 0
                              {{{1, 0}, {0, 1}}, {2, 3}}};  // replica 1
    float losses[2][4] = {};  // [replica][step - 1], measured before the step's update
    std::vector<float> after_sync[2];

    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        const int r = comm.rank();
        std::vector<float> w = {2.0f, 1.0f};
        std::vector<float> b = {1.0f};
        std::vector<float> dw(2), db(1);
        loco::parameter_list params;
        params.add("w", w, dw).add("b", b, db);

        loco::diloco<loco::inner::sgd, loco::outer::nesterov> opt(
            params, comm,
            {.inner = {.lr = 0.1f}, .outer = {.lr = 1.0f, .momentum = 0.9f}, .schedule = {.every = 3}});

        for (int step = 1; step <= 4; ++step) {
            // Forward and backward: loss = mean_i e_i^2, e_i = x_i . w + b - y_i.
            const batch& d = batches[r];
            float loss = 0.0f;
            dw[0] = dw[1] = db[0] = 0.0f;
            for (int i = 0; i < 2; ++i) {
                const float e = d.x[i][0] * w[0] + d.x[i][1] * w[1] + b[0] - d.y[i];
                loss += e * e / 2;
                dw[0] += e * d.x[i][0];  // d loss / d w = (2 / 2) * sum_i e_i * x_i
                dw[1] += e * d.x[i][1];
                db[0] += e;
            }
            losses[r][step - 1] = loss;
            opt.step();
            if (step == 3) {
                after_sync[r] = {w[0], w[1], b[0]};
            }
        }
    });
    // Mean loss: 1.0, 0.65, 0.4481, then 0.574244 from the synced parameters.
    // After the sync at step 3 both replicas hold w = [1.5345, 1.0494], b = 0.5839.
    // [snippet:diloco-maxtext end]
    const double expected_loss[4] = {1.0, 0.65, 0.4481, 0.574244};
    for (int step = 0; step < 4; ++step) {
        CAPTURE(step);
        CHECK((losses[0][step] + losses[1][step]) / 2 == doctest::Approx(expected_loss[step]));
    }
    for (const auto& p : after_sync) {
        REQUIRE(p.size() == 3);
        CHECK(p[0] == doctest::Approx(1.5345));
        CHECK(p[1] == doctest::Approx(1.0494));
        CHECK(p[2] == doctest::Approx(0.5839));
    }
}

TEST_CASE("docs: diloco save and load") {
    std::vector<float> w = {1.0f, -2.0f, 0.5f};
    std::vector<float> grad(3);
    loco::parameter_list params;
    params.add("w", w, grad);
    loco::comm::single comm;
    using diloco = loco::diloco<loco::inner::adamw, loco::outer::nesterov>;
    diloco opt(params, comm, {.inner = {.lr = 0.01f}, .schedule = {.every = 2}});
    const auto train = [&](int steps) {
        std::vector<float> trajectory;
        for (int i = 0; i < steps; ++i) {
            for (std::size_t j = 0; j < w.size(); ++j) {
                grad[j] = w[j] - static_cast<float>(j);  // gradient of a quadratic
            }
            opt.step();
            trajectory.insert(trajectory.end(), w.begin(), w.end());
        }
        return trajectory;
    };
    train(3);

    // [snippet:diloco-checkpoint]
    // Each worker writes its own stream: inner states differ between workers.
    std::stringstream checkpoint;
    opt.save(checkpoint);
    const std::vector<float> saved_w = w;  // the trainer checkpoints its parameters itself

    // ... later, in a run built with the same policies, model and number of workers:
    opt.load(checkpoint);  // optimizer state only; parameters and hyper-parameters are not in it
    std::copy(saved_w.begin(), saved_w.end(), w.begin());  // in place: loco holds views of w
    // [snippet:diloco-checkpoint end]

    const std::uint64_t calls = opt.calls();
    const auto first = train(5);
    checkpoint.clear();
    checkpoint.seekg(0);
    opt.load(checkpoint);
    std::copy(saved_w.begin(), saved_w.end(), w.begin());
    CHECK(opt.calls() == calls);
    CHECK(train(5) == first);

    // A stream from another policy is refused and changes nothing.
    loco::diloco<loco::inner::adamw, loco::outer::sgd> other(params, comm);
    checkpoint.clear();
    checkpoint.seekg(0);
    CHECK_THROWS_WITH_AS(other.load(checkpoint),
                         "loco: checkpoint mismatch in the outer optimizer: saved 'outer_nesterov', "
                         "this optimizer has 'outer_sgd'",
                         loco::checkpoint_error);
    CHECK(other.calls() == 0);

    // A truncated or corrupted stream is refused too.
    std::string bytes = checkpoint.str();
    std::stringstream truncated(bytes.substr(0, bytes.size() - 3));
    CHECK_THROWS_WITH_AS(opt.load(truncated), "loco: checkpoint truncated before its checksum",
                         loco::checkpoint_error);
    bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x40);
    std::stringstream corrupted(bytes);
    CHECK_THROWS_AS(opt.load(corrupted), loco::checkpoint_error);
    CHECK(opt.calls() == calls + 5);
}

// Every row of the bad-input table in docs/diloco.md.
TEST_CASE("docs: diloco bad inputs and what they leave untouched") {
    using handle = loco::diloco<loco::inner::sgd, loco::outer::nesterov>;
    std::vector<float> w = {1.0f, 2.0f};
    std::vector<float> grad = {0.5f, 0.5f};
    loco::parameter_list params;
    params.add("w", w, grad);
    loco::comm::single comm;
    const std::vector<float> w0 = w;

    SUBCASE("invalid hyper-parameters at construction") {
        CHECK_THROWS_AS(handle(params, comm, {.inner = {.lr = -1.0f}}), loco::invalid_argument);
        CHECK_THROWS_AS(handle(params, comm, {.outer = {.momentum = 1.0f}}), loco::invalid_argument);
        CHECK_THROWS_AS(handle(params, comm, {.schedule = {.every = 0}}), loco::invalid_argument);
        CHECK_THROWS_AS(handle(params, comm, {.workers = -1}), loco::invalid_argument);
        CHECK_THROWS_AS(handle(params, comm, {.workers = 2}), loco::comm_error);
        CHECK(w == w0);
    }

    SUBCASE("an inner hyper-parameter made invalid later") {
        handle opt(params, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 2}});
        opt.inner_hyper().lr = -1.0f;
        CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
        CHECK(w == w0);
        CHECK(opt.calls() == 0);
    }

    SUBCASE("an outer hyper-parameter made invalid later: the inner update stays") {
        handle opt(params, comm, {.inner = {.lr = 0.1f}, .schedule = {.every = 1}});
        opt.outer_hyper().lr = -1.0f;
        CHECK_THROWS_AS(opt.step(), loco::invalid_argument);
        CHECK(w[0] == doctest::Approx(0.95));  // the inner step was applied
        CHECK(opt.calls() == 1);
        CHECK(opt.outer_steps() == 0);
        CHECK(opt.global()[0] == 1.0f);
        opt.outer_hyper().lr = 0.7f;
        opt.sync();  // retried
        CHECK(opt.outer_steps() == 1);
    }

    SUBCASE("a non-finite gradient") {
        handle skip(params, comm, {.schedule = {.every = 5}});
        grad[1] = std::numeric_limits<float>::infinity();
        const auto result = skip.step();
        CHECK_FALSE(result.applied);
        CHECK(skip.calls() == 1);
        CHECK(skip.skipped_steps() == 1);
        CHECK(w == w0);

        handle strict(params, comm, {.on_nonfinite = loco::nonfinite_policy::raise});
        CHECK_THROWS_AS(strict.step(), loco::nonfinite_error);
        CHECK(strict.calls() == 0);
        CHECK(w == w0);
    }

    SUBCASE("a non-finite averaged pseudo-gradient") {
        grad[0] = -3e38f;  // lr * g overflows: the local parameter becomes +inf
        grad[1] = -1.0f;

        handle skip(params, comm, {.inner = {.lr = 10.0f}, .schedule = {.every = 1}});
        const auto result = skip.step();
        CHECK(result.applied);
        CHECK(result.synced);
        CHECK(skip.skipped_syncs() == 1);
        CHECK(skip.outer_steps() == 0);
        CHECK(w == w0);  // every worker went back to the last global parameters

        handle strict(params, comm,
                      {.inner = {.lr = 10.0f},
                       .schedule = {.every = 1},
                       .on_nonfinite = loco::nonfinite_policy::raise});
        CHECK_THROWS_AS(strict.step(), loco::nonfinite_error);
        CHECK(std::isinf(w[0]));  // the local values stay as the inner step left them
        CHECK(w[1] == 12.0f);
        CHECK(strict.outer_steps() == 0);
        CHECK(std::vector<float>(strict.global().begin(), strict.global().end()) == w0);
        CHECK(strict.outer_state(0)[0] == 0.0f);
    }

    SUBCASE("workers that disagree on the model") {
        // Worker 1 has one element more than worker 0: start() compares the ranks' fingerprints
        // and every rank refuses, naming the difference, before any pseudo-gradient is averaged.
        std::vector<float> global_after[2];
        std::string errors[2];
        const auto worker = [&](loco::comm::communicator& c) {
            std::vector<float> v(c.rank() == 0 ? 2 : 3, 1.0f);
            std::vector<float> g(v.size(), 0.5f);
            loco::parameter_list p;
            p.add("v", v, g);
            handle opt(p, c, {.schedule = {.every = 1}, .broadcast_initial = false});
            try {
                opt.step();
            } catch (const loco::invalid_argument& e) {
                errors[c.rank()] = e.what();
                global_after[c.rank()].assign(opt.global().begin(), opt.global().end());
            }
        };
        loco::comm::run_threads(2, worker);
        for (const auto& e : errors) {
            CHECK(e == "loco::diloco: the ranks were built differently: rank 0 has 'tensor: v 2 "
                       "elements' where rank 1 has 'tensor: v 3 elements'; build the same model, "
                       "schedule, fragments and policies on every rank");
        }
        CHECK(global_after[0] == std::vector<float>(2, 1.0f));
        CHECK(global_after[1] == std::vector<float>(3, 1.0f));
    }
}

// ---- docs/compressors.md: the payload compressors ---------------------------------------------

TEST_CASE("docs: a compressor in loco::diloco, MuLoCo's 2-bit setting") {
    // [snippet:compress-use]
    // MuLoCo's compression: 2-bit statistical codes, with error feedback that decays the residual
    // by 0.9 and folds the outer learning rate into it.
    using compressor = loco::compress::error_feedback<loco::compress::statistical<2>>;
    std::uint64_t per_sync[2] = {};
    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        std::vector<float> w(1000, 1.0f);
        std::vector<float> grad(1000, 0.5f);
        loco::parameter_list params;
        params.add("w", w, grad);

        loco::diloco<loco::inner::sgd, loco::outer::nesterov, compressor> opt(
            params, comm,
            {.schedule = {.every = 10}, .compress = {.decay = 0.9f, .fold_outer_lr = true}});
        for (int step = 0; step < 10; ++step) {
            opt.step();
        }
        per_sync[comm.rank()] = opt.bytes_per_sync();
    });
    // One payload: the 40-byte header, shift and 4 table entries (4 * 5 bytes), 1000 2-bit codes
    // (250 bytes, padded to 252). The all-gather sends it to the one other worker, and the ranks
    // agree on the outcome in a 4-byte all-reduce:
    // per_sync == {316, 316}
    // [snippet:compress-use end]
    CHECK(per_sync[0] == 316);
    CHECK(per_sync[1] == 316);
}

TEST_CASE("docs: compress::cast example") {
    // [snippet:compress-cast]
    using fp16 = loco::compress::cast<loco::fp16>;
    const std::vector<float> x = {1.0f / 3.0f, 70000.0f, 1e-8f, -2.5f};
    const loco::compress::segment segs[] = {{.offset = 0, .size = 4, .rows = 1, .cols = 4}};

    std::vector<std::byte> payload(fp16::payload_bytes({}, segs));  // 40 + 2 * 4 = 48 bytes
    fp16::encode({}, x, segs, {}, {}, payload);
    std::vector<float> y(4);
    fp16::decode({}, payload, segs, y);
    // y == {0.333251953125f, inf, 0.0f, -2.5f}: 11 significant bits, 70000 beyond fp16's range,
    // 1e-8 below half its smallest subnormal (2^-24 = 6e-8)
    // [snippet:compress-cast end]
    CHECK(payload.size() == 48);
    CHECK(y[0] == 0.333251953125f);
    CHECK(y[1] == std::numeric_limits<float>::infinity());
    CHECK(y[2] == 0.0f);
    CHECK(y[3] == -2.5f);
}

TEST_CASE("docs: compress::blockwise example") {
    // [snippet:compress-blockwise]
    using q = loco::compress::blockwise<2, 4>;  // 2-bit codes, one scale per 4 elements
    const std::vector<float> x = {3.0f, 0.0f, -2.0f, 0.5f, 1.0f, -1.0f, 0.25f, 0.5f};
    const loco::compress::segment segs[] = {{.offset = 0, .size = 8, .rows = 1, .cols = 8}};
    const q::hyper h{.scale = loco::compress::scale_kind::absmax,
                     .round = loco::compress::rounding::nearest};

    std::vector<std::byte> payload(q::payload_bytes(h, segs));  // 40 + 2 * 4 + 4 = 52 bytes
    q::encode(h, x, segs, {}, {}, payload);
    std::vector<float> y(8);
    q::decode(h, payload, segs, y);
    // Block 1: s = 3, levels -3, -1, 1, 3; 0 and -2 lie on ties (t = 1.5, 0.5), which go to the
    // even code. Block 2: s = 1, levels -1, -1/3, 1/3, 1.
    // y == {3, 1, -3, 1, 1, -1, 1/3, 1/3}
    // [snippet:compress-blockwise end]
    CHECK(payload.size() == 52);
    const float third = 1.0f / 3.0f;
    CHECK(y == std::vector<float>{3, 1, -3, 1, 1, -1, third, third});
}

TEST_CASE("docs: compress::statistical example reproduces MuLoCo's quantizer") {
    // [snippet:compress-statistical]
    using q = loco::compress::statistical<2>;  // MuLoCo: 4 bins, range 6
    const std::vector<float> x = {0.9f, -0.6f, 2.4f, 0.5f, 0.1f, 1.6f, -2.1f, 0.4f};
    const loco::compress::segment segs[] = {{.offset = 0, .size = 8, .rows = 1, .cols = 8}};

    std::vector<std::byte> payload(q::payload_bytes({}, segs));  // 40 + 4 * (1 + 4) + 4 = 64 bytes
    q::encode({}, x, segs, {}, {}, payload);
    std::vector<float> y(8);
    q::decode({}, payload, segs, y);
    // shift 0.4, sigma 1.3649, scale 2.0473; codes {2, 2, 3, 2, 2, 3, 1, 2};
    // table {0, -2.5, -0.14, 1.6} (bin 0 is empty), each entry the mean of its bin:
    // y == {0.26, 0.26, 2.0, 0.26, 0.26, 2.0, -2.1, 0.26}
    // [snippet:compress-statistical end]
    CHECK(payload.size() == 64);
    const double want[] = {0.26, 0.26, 2.0, 0.26, 0.26, 2.0, -2.1, 0.26};
    for (std::size_t i = 0; i < 8; ++i) {
        CHECK(y[i] == relative(want[i]).epsilon(1e-6));
    }
}

TEST_CASE("docs: compress::topk example") {
    // [snippet:compress-topk]
    using q = loco::compress::topk;
    const std::vector<float> x = {0.1f, -4.0f, 0.3f, 2.0f, -0.2f, 4.0f, 0.0f, 2.0f, -0.5f, 0.2f};
    const loco::compress::segment segs[] = {{.offset = 0, .size = 10, .rows = 1, .cols = 10}};
    const q::hyper h{.ratio = 0.25f};  // k = ceil(0.25 * 10) = 3

    std::vector<std::byte> payload(q::payload_bytes(h, segs));  // 40 + 3 * (4 + 4) = 64 bytes
    q::encode(h, x, segs, {}, {}, payload);
    std::vector<float> y(10);
    q::decode(h, payload, segs, y);
    // -4 and 4, then the 2 at index 3, which ties with the 2 at index 7 and wins as the lower index:
    // y == {0, -4, 0, 2, 0, 4, 0, 0, 0, 0}
    // [snippet:compress-topk end]
    CHECK(payload.size() == 64);
    CHECK(y == std::vector<float>{0, -4, 0, 2, 0, 4, 0, 0, 0, 0});
}

TEST_CASE("docs: compress::sparseloco example") {
    // [snippet:compress-sparseloco]
    // SparseLoCo as templar runs it (hparams.json): 64 x 64 chunks, 64 values kept per chunk,
    // 2-bit codes, the accumulator decaying by 0.95.
    using q = loco::compress::sparseloco;
    const q::hyper h{};
    const loco::compress::segment segs[] = {
        {.offset = 0, .size = 128 * 128, .rows = 128, .cols = 128}};
    std::vector<float> delta(128 * 128);
    for (std::size_t i = 0; i < delta.size(); ++i) {
        delta[i] = std::sin(0.37f * static_cast<float>(i));
    }
    std::vector<float> accumulator(delta.size(), 0.0f);  // q::state_size == 1 float per element

    std::vector<std::byte> payload(q::payload_bytes(h, segs));
    q::encode(h, delta, segs, accumulator, {}, payload);  // e = 0.95 e + delta; e -= what is sent
    std::vector<float> y(delta.size());
    q::decode(h, payload, segs, y);
    // 2 x 2 chunks, 64 values each: the 40-byte header, shift and 4 bin means (20 bytes), the
    // indices in Elias-Fano's 511 bits a chunk (256 bytes; 384 at fixed width), 256 codes of 2
    // bits (64 bytes); 172x below fp32:
    // payload.size() == 380
    // [snippet:compress-sparseloco end]
    CHECK(payload.size() == 380);
    CHECK(std::count_if(y.begin(), y.end(), [](float v) { return v != 0.0f; }) == 256);
    for (std::size_t i = 0; i < y.size(); ++i) {
        CHECK(accumulator[i] == delta[i] - y[i]);
    }
}

TEST_CASE("docs: compress::demo example") {
    // [snippet:compress-demo]
    // DisTrO as Psyche runs it with quantize_1bit: 64 x 64 DCT chunks, the 32 largest
    // coefficients of each sent as signs, the residual decaying by 0.999.
    using q = loco::compress::demo;
    const q::hyper h{.chunk = 64, .topk = 32, .decay = 0.999f, .sign = true};
    const loco::compress::segment segs[] = {
        {.offset = 0, .size = 128 * 256, .rows = 128, .cols = 256}};
    std::vector<float> delta(128 * 256);
    for (std::size_t i = 0; i < delta.size(); ++i) {
        delta[i] = std::sin(0.37f * static_cast<float>(i));
    }
    std::vector<float> residual(delta.size(), 0.0f);

    std::vector<std::byte> payload(q::payload_bytes(h, segs));
    q::encode(h, delta, segs, residual, {}, payload);
    std::vector<float> y(delta.size());
    q::decode(h, payload, segs, y);  // the inverse DCT of +-1 at the sent coefficients
    // 2 x 4 chunks, 32 coefficients each: the header, the indices in Elias-Fano's code (7 low
    // bits each and a 63-bit high part: 287 bits a chunk, 288 bytes for 8; 384 at 12 bits) and
    // 256 sign bits (32 bytes): payload.size() == 360
    // [snippet:compress-demo end]
    CHECK(payload.size() == 360);
    for (std::size_t i = 0; i < y.size(); ++i) {
        CHECK(std::abs(residual[i] - (delta[i] - y[i])) <= 1e-6f);
    }
}

// ---- docs/compressors.md: SparseLoCo's aggregation, DeMo's sign-SGD; docs/schedules.md: periods --

TEST_CASE("docs: aggregate::median_norm_clip example") {
    // [snippet:aggregate-median-norm-clip]
    // SparseLoCo as templar runs it: the accumulator and 2-bit top-k payloads
    // (compress::sparseloco), each worker clipped to the median norm and every element averaged
    // over the workers that sent it (aggregate::median_norm_clip), outer SGD with lr 1 and no
    // momentum (outer::sgd's defaults).
    using sparseloco = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::sparseloco,
                                    loco::schedule::every, loco::aggregate::median_norm_clip>;
    std::vector<float> after[2];
    std::uint64_t bytes = 0;
    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        std::vector<float> w(128 * 128, 0.0f), g(128 * 128);
        for (std::size_t i = 0; i < g.size(); ++i) {  // rank 1's gradient is twice rank 0's
            g[i] = std::sin(0.37f * static_cast<float>(i)) * static_cast<float>(comm.rank() + 1);
        }
        loco::parameter_list params;
        params.add_views("w", loco::host_matrix(w.data(), 128, 128),
                         loco::host_matrix(static_cast<const float*>(g.data()), 128, 128));
        sparseloco opt(params, comm, {.inner = {.lr = 0.5f}, .schedule = {.every = 2}});
        opt.step();
        opt.step();  // the sync
        after[comm.rank()] = w;
        bytes = opt.bytes_per_sync();
    });
    // Both workers hold the same w, nonzero at the 256 kept cells; rank 1's pseudo-gradient is
    // scaled to the median (with two workers, the lower) norm: rank 0's. bytes == 380 (one
    // payload to the peer) + 4 (the all-or-nothing agreement)
    // [snippet:aggregate-median-norm-clip end]
    CHECK(after[0] == after[1]);
    CHECK(std::count_if(after[0].begin(), after[0].end(), [](float v) { return v != 0.0f; }) == 256);
    CHECK(bytes == 384);
    // Rank 0's own decoded payload, which the clipped mean reproduces up to rounding: the
    // pseudo-gradients are g and 2 g (exactly), so D_1 = 2 D_0 and rank 1 is scaled by 1/2.
    std::vector<float> delta(128 * 128), e(128 * 128, 0.0f), d0(128 * 128);
    for (std::size_t i = 0; i < delta.size(); ++i) {
        delta[i] = std::sin(0.37f * static_cast<float>(i));
    }
    const loco::compress::segment segs[] = {{0, 128 * 128, 128, 128}};
    std::vector<std::byte> p(loco::compress::sparseloco::payload_bytes({}, segs));
    loco::compress::sparseloco::encode({}, delta, segs, e, {}, p);
    loco::compress::sparseloco::decode({}, p, segs, d0);
    for (std::size_t i = 0; i < d0.size(); ++i) {
        CHECK(std::abs(after[0][i] + d0[i]) <= 1e-6f * (1.0f + std::abs(d0[i])));
    }
}

TEST_CASE("docs: outer::sign_sgd example") {
    // [snippet:outer-sign-sgd]
    // DisTrO as Psyche runs it with quantize_1bit: sign payloads of the DCT top-k, then every
    // global parameter moves by lr against the sign of the average (outer::sign_sgd).
    using distro = loco::diloco<loco::inner::sgd, loco::outer::sign_sgd, loco::compress::demo>;
    std::vector<float> w(64 * 64, 1.0f), g(64 * 64);
    for (std::size_t i = 0; i < g.size(); ++i) {
        g[i] = std::cos(0.11f * static_cast<float>(i));
    }
    loco::parameter_list params;
    params.add_views("w", loco::host_matrix(w.data(), 64, 64),
                     loco::host_matrix(static_cast<const float*>(g.data()), 64, 64));
    loco::comm::single comm;
    distro opt(params, comm,
               {.outer = {.lr = 4e-4f}, .schedule = {.every = 4}, .compress = {.sign = true}});
    for (int step = 0; step < 4; ++step) {
        opt.step();  // the 4th call syncs
    }
    // every w[i] is now 1 - 4e-4, 1 or 1 + 4e-4: sign-SGD moves by lr or not at all
    // [snippet:outer-sign-sgd end]
    for (const float v : w) {
        CHECK((v == 1.0f - 4e-4f || v == 1.0f || v == 1.0f + 4e-4f));
    }
    CHECK(std::count(w.begin(), w.end(), 1.0f) < 64);
}

TEST_CASE("docs: aggregate::scatter_mean example") {
    // [snippet:aggregate-scatter-mean]
    // DeMo as its references aggregate: every worker's DCT top-k (compress::demo), each
    // coefficient averaged over the workers that sent it, one inverse DCT per chunk
    // (aggregate::scatter_mean); outer SGD with lr 1.
    using demo_diloco = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::demo,
                                     loco::schedule::every, loco::aggregate::scatter_mean>;
    std::vector<float> after[2];
    std::vector<float> grads[2];
    loco::comm::run_threads(2, [&](loco::comm::communicator& comm) {
        std::vector<float> w(64 * 64, 0.0f), g(64 * 64);
        for (std::size_t i = 0; i < g.size(); ++i) {  // the ranks' gradients point apart
            g[i] = std::cos((0.11f + 0.07f * static_cast<float>(comm.rank())) * static_cast<float>(i));
        }
        loco::parameter_list params;
        params.add_views("w", loco::host_matrix(w.data(), 64, 64),
                         loco::host_matrix(static_cast<const float*>(g.data()), 64, 64));
        demo_diloco opt(params, comm, {.inner = {.lr = 1.0f}, .schedule = {.every = 1}});
        opt.step();  // the sync: w = -(the scatter-mean of the two payloads)
        after[comm.rank()] = w;
        grads[comm.rank()] = g;
    });
    // [snippet:aggregate-scatter-mean end]
    CHECK(after[0] == after[1]);
    // The same aggregate from the two payloads by hand; the plain mean of their decodes is not it.
    namespace lc = loco::compress;
    const lc::segment segs[] = {{0, 64 * 64, 64, 64}};
    std::vector<std::vector<std::byte>> payloads;
    std::vector<float> mean(64 * 64, 0.0f), d(64 * 64);
    for (const auto& g : grads) {
        std::vector<float> e(64 * 64, 0.0f);
        payloads.emplace_back(lc::demo::payload_bytes({}, segs));
        lc::demo::encode({}, g, segs, e, {}, payloads.back());
        lc::demo::decode({}, payloads.back(), segs, d);
        for (std::size_t i = 0; i < d.size(); ++i) mean[i] += d[i] / 2;
    }
    const std::span<const std::byte> views[] = {payloads[0], payloads[1]};
    std::vector<float> want(64 * 64);
    lc::demo::decode_scatter_mean({}, views, segs, want);
    std::size_t differs = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
        CHECK(after[0][i] == -want[i]);
        differs += std::abs(want[i] - mean[i]) > 1e-4f;
    }
    CHECK(differs > 0);
}

TEST_CASE("docs: schedule::fragment_periods example") {
    // [snippet:schedule-fragment-periods]
    std::vector<float> embed(16, 0.0f), body(64, 0.0f);
    std::vector<float> g_embed(16, 1.0f), g_body(64, 1.0f);
    loco::parameter_list params;
    params.add("embed", embed, g_embed);
    params.add("body", body, g_body);

    loco::comm::single comm;
    using periods = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                 loco::schedule::fragment_periods>;
    periods::config cfg{.schedule = {.every = {10, 50}}};  // the embeddings 5x more often
    cfg.fragments.names = {{"embed"}, {"body"}};
    periods opt(params, comm, cfg);
    for (int step = 0; step < 100; ++step) {
        opt.step();
    }
    // opt.outer_steps(0) == 10, opt.outer_steps(1) == 2
    // [snippet:schedule-fragment-periods end]
    CHECK(opt.outer_steps(0) == 10);
    CHECK(opt.outer_steps(1) == 2);
}

TEST_CASE("docs: schedule::state_periods example (DES-LOC)") {
    std::vector<float> w(8, 0.5f), grad(8, 1.0f);
    loco::parameter_list params;
    params.add("w", w, grad);
    loco::comm::single comm;
    // [snippet:schedule-state-periods]
    using desloc = loco::diloco<loco::inner::adamw, loco::outer::sgd, loco::compress::none,
                                loco::schedule::state_periods>;
    // Parameters every 16 calls, m every 48, v every 96 (the paper's K_u = 3 K_x, K_v = 6 K_x);
    // outer::sgd at its default lr 1 makes a parameter sync plain averaging.
    desloc opt(params, comm, {.schedule = loco::schedule::state_periods::paper(16)});
    for (int step = 0; step < 96; ++step) {
        opt.step();
    }
    // opt.outer_steps() == 6 parameter syncs; m averaged after calls 48 and 96, v after call 96
    // bytes per worker: 6 * opt.bytes_per_sync() + 2 * opt.bytes_per_state_sync(0)
    //                                            + 1 * opt.bytes_per_state_sync(1)
    // [snippet:schedule-state-periods end]
    const auto& h = opt.schedule_hyper();
    CHECK(opt.outer_steps() == 6);
    CHECK(loco::schedule::state_periods::state_syncs(h, 0, 96) == 2);
    CHECK(loco::schedule::state_periods::state_syncs(h, 1, 96) == 1);
    CHECK(h.states == std::vector<std::uint64_t>{48, 96});
}

// ---- docs/inner.md: muon -------------------------------------------------------------------------


TEST_CASE("docs: inner::muon example") {
    // [snippet:inner-muon]
    // A 1 x 3 matrix has a single singular value, so Newton-Schulz returns the unit vector times
    // phi^5(1) = 0.6964 (Keller Jordan's coefficients), whatever the gradient's size.
    std::vector<float> w = {1.0f, 1.0f, 1.0f};
    std::vector<float> grad = {3.0f, 0.0f, -4.0f};
    loco::parameter_list params;
    params.add_views("w", loco::host_matrix(w.data(), 1, 3),  // Muon needs the 2-D shape
                     loco::host_matrix(static_cast<const float*>(grad.data()), 1, 3));

    loco::optimizer<loco::inner::muon> opt(params, {.inner = {.lr = 0.1f, .weight_decay = 0.0f,
                                                              .nesterov = false}});
    opt.step();
    // momentum = 0.05 * grad = {0.15, 0, -0.2};  its unit vector is {0.6, 0, -0.8};
    // lr_adj = 0.1 * sqrt(max(1, 1 / 3)) = 0.1;
    // w = 1 - 0.1 * 0.6964 * {0.6, 0, -0.8} = {0.95821, 1.0, 1.05571}
    const std::span<const float> momentum = opt.state(0);
    // [snippet:inner-muon end]
    CHECK(momentum[0] == relative(0.15).epsilon(1e-6));
    CHECK(momentum[1] == 0.0f);
    CHECK(momentum[2] == relative(-0.2).epsilon(1e-6));
    CHECK(w[0] == relative(1.0 - 0.1 * 0.69644 * 0.6).epsilon(1e-5));
    CHECK(w[1] == 1.0f);
    CHECK(w[2] == relative(1.0 + 0.1 * 0.69644 * 0.8).epsilon(1e-5));
}

// ---- docs/groups.md ------------------------------------------------------------------------------

TEST_CASE("docs: MuLoCo from parameter groups") {
    // [snippet:groups-muloco]
    // MuLoCo's inner optimizer: Muon on the hidden matrices, AdamW on everything else.
    using inner = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                               loco::group<loco::otherwise, loco::inner::adamw>>;
    // MuLoCo: that, Nesterov outside, and 2-bit statistical codes with error feedback on the wire.
    using muloco = loco::diloco<inner, loco::outer::nesterov,
                                loco::compress::error_feedback<loco::compress::statistical<2>>>;

    std::vector<float> wte(8 * 4), w1(4 * 4), gain(4), head(4 * 8);  // a tiny language model
    std::vector<float> g_wte(wte.size()), g_w1(w1.size()), g_gain(gain.size()), g_head(head.size());
    loco::parameter_list params;
    params.add_views("wte", loco::host_matrix(wte.data(), 8, 4),
                     loco::host_matrix(static_cast<const float*>(g_wte.data()), 8, 4),
                     {.role = loco::role::embedding});
    params.add_views("h0.w1", loco::host_matrix(w1.data(), 4, 4),
                     loco::host_matrix(static_cast<const float*>(g_w1.data()), 4, 4),
                     {.role = loco::role::matrix});
    params.add("h0.gain", gain, g_gain, {.role = loco::role::vector});
    params.add_views("head", loco::host_matrix(head.data(), 4, 8),
                     loco::host_matrix(static_cast<const float*>(g_head.data()), 4, 8),
                     {.role = loco::role::head});

    loco::comm::single comm;
    muloco opt(params, comm, {.inner = {{.lr = 0.02f, .momentum = 0.9f},   // Muon
                                        {.lr = 4e-4f}},                     // AdamW
                              .schedule = {.every = 30},
                              .compress = {.decay = 0.9f}});
    // Muon takes h0.w1 only; wte (an embedding), h0.gain (a vector) and head go to AdamW.
    // [snippet:groups-muloco end]
    const auto& engine = opt.inner().engine_state();
    REQUIRE(engine.group_params<0>().size() == 1);
    CHECK(engine.group_params<0>()[0].name == "h0.w1");
    CHECK(engine.group_params<1>().size() == 3);
    CHECK(std::get<0>(opt.inner_hyper()).momentum == 0.9f);
    // One step moves h0.w1 by Muon's rule: every entry of a 4 x 4 orthogonalised update is about
    // lr / 2 in size, never 0 for a random gradient.
    for (std::size_t i = 0; i < g_w1.size(); ++i) {
        g_w1[i] = float(i % 5) - 2.0f + 0.1f * float(i);
    }
    opt.step();
    for (const float x : w1) {
        CHECK(x != 0.0f);
    }
}

// ---- docs/schedules.md: streaming and delayed; docs/outer.md: delayed Nesterov -----------------

TEST_CASE("docs: streaming DiLoCo by one type and one hyper block") {
    // [snippet:schedule-streaming]
    std::vector<float> layer0(1, 1.0f), layer1(1, 1.0f);
    std::vector<float> grad0(1, 2.0f), grad1(1, 2.0f);
    loco::parameter_list params;
    params.add("layers.0.weight", layer0, grad0);
    params.add("layers.1.weight", layer1, grad1);

    loco::comm::single comm;
    using streaming = loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                                   loco::schedule::streaming>;
    streaming opt(params, comm,
                  {.inner = {.lr = 1.0f},
                   .outer = {.lr = 2.0f},
                   .schedule = {.every = 6, .fragments = 2, .overlap = 1, .alpha = 0.5f}});
    for (int step = 0; step < 3; ++step) {
        opt.step();  // call 2 starts fragment 0's exchange, call 3 applies it
    }
    // layer0 == -6 (the merge of global -7 and local -5), layer1 == -5 (not synced yet)
    // [snippet:schedule-streaming end]
    CHECK(layer0[0] == -6.0f);
    CHECK(layer1[0] == -5.0f);
    CHECK(opt.global()[0] == -7.0f);
    CHECK(opt.fragments() == 2);
}

TEST_CASE("docs: the one-outer-step delayed schedule") {
    // [snippet:schedule-delayed]
    std::vector<float> w = {0.0f};
    std::vector<float> grad = {1.0f};
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none, loco::schedule::delayed>
        opt(params, comm, {.inner = {.lr = 1.0f}, .schedule = {.every = 2}});
    opt.step();
    opt.step();  // round 1 ends: its pseudo-gradient (2) leaves, nothing is applied, w back to 0
    opt.step();
    opt.step();  // round 2 ends: round 1's average is applied (global -2), round 2's leaves
    // w == -2, opt.outer_steps() == 1, opt.in_flight(0) == true
    // [snippet:schedule-delayed end]
    CHECK(w[0] == -2.0f);
    CHECK(opt.outer_steps() == 1);
    CHECK(opt.in_flight(0));
}

TEST_CASE("docs: delayed Nesterov") {
    // [snippet:outer-delayed-nesterov]
    std::vector<float> w = {0.0f};
    std::vector<float> grad = {1.0f};
    loco::parameter_list params;
    params.add("w", w, grad);

    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::delayed_nesterov> opt(
        params, comm,
        {.inner = {.lr = 1.0f},
         .outer = {.lr = 1.0f, .momentum = 0.9f, .period = 2},
         .schedule = {.every = 1}});
    std::vector<float> global;
    for (int call = 0; call < 4; ++call) {
        opt.step();  // every pseudo-gradient is 1
        global.push_back(opt.global()[0]);
    }
    // global == {-0.5, -1.9, -2.4, -4.61}: plain steps of lr / N, momentum every N = 2 steps
    // [snippet:outer-delayed-nesterov end]
    CHECK(global[0] == doctest::Approx(-0.5));
    CHECK(global[1] == doctest::Approx(-1.9));
    CHECK(global[2] == doctest::Approx(-2.4));
    CHECK(global[3] == doctest::Approx(-4.61));
}

// ---- docs/diloco.md: writing an aggregation ----------------------------------------------------

// [snippet:aggregate-median]
namespace mylib {

// The coordinate-wise median of the workers' pseudo-gradients (robust to a minority of bad
// workers). It needs every worker's decoded delta, so the exchange all-gathers them.
struct median {
    static constexpr std::string_view name = "mylib_median";
    struct hyper {};
    static constexpr bool needs_reports = false;
    static constexpr bool needs_deltas = true;

    static void combine(const hyper&, const loco::aggregate::contributions& c,
                        std::span<float> out) {
        std::vector<float> column(c.workers);
        for (std::size_t i = 0; i < out.size(); ++i) {
            for (std::size_t k = 0; k < c.workers; ++k) {
                column[k] = c.delta(k)[i];
            }
            std::sort(column.begin(), column.end());
            const std::size_t h = c.workers / 2;
            out[i] = c.workers % 2 == 1 ? column[h] : 0.5f * (column[h - 1] + column[h]);
        }
    }
};

}  // namespace mylib
// [snippet:aggregate-median end]

TEST_CASE("docs: a median aggregation written as a user policy") {
    std::vector<float> after[3];
    loco::comm::run_threads(3, [&](loco::comm::communicator& comm) {
        // [snippet:aggregate-median-use]
        std::vector<float> w = {0.0f, 0.0f};
        // Worker 2 has a wild gradient; the median ignores it.
        std::vector<float> grad = comm.rank() == 2 ? std::vector<float>{1000.0f, -1000.0f}
                                                   : std::vector<float>{1.0f, 2.0f};
        loco::parameter_list params;
        params.add("w", w, grad);

        loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                     loco::schedule::every, mylib::median>
            opt(params, comm, {.inner = {.lr = 1.0f}, .schedule = {.every = 1}});
        opt.step();
        // w == {-1, -2} on every worker
        // [snippet:aggregate-median-use end]
        after[comm.rank()] = w;
    });
    for (const auto& w : after) {
        CHECK(w == std::vector<float>{-1.0f, -2.0f});
    }
}

TEST_CASE("docs: roles and stacked tensors") {
    // [snippet:groups-roles]
    // A model that keeps its 4 layers stacked: one tensor per kind of weight.
    constexpr std::size_t layers = 4, width = 8, vocab = 16;
    std::vector<float> wte(vocab * width), attn(layers * width * width), ln(layers * width, 1.0f),
        head(width * vocab);
    std::vector<float> g_wte(wte.size()), g_attn(attn.size()), g_ln(ln.size()), g_head(head.size());

    loco::parameter_list params;
    params.add("wte", wte, g_wte, {.role = loco::role::embedding});
    params.add("h.attn", attn, g_attn,  // (4, 8, 8): four matrices for Muon
               {.role = loco::role::matrix, .stack = {layers, width, width}});
    params.add_views("h.ln", loco::host_matrix(ln.data(), layers, width),  // (4, 8) norm gains
                     loco::host_matrix(static_cast<const float*>(g_ln.data()), layers, width),
                     {.role = loco::role::vector});
    params.add("head", head, g_head, {.role = loco::role::head});
    params.set_strict_roles();  // optional: never let a selector guess from a shape

    using inner = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                               loco::group<loco::otherwise, loco::inner::adamw>>;
    loco::optimizer<inner> opt(params, {.inner = {{.lr = 0.02f}, {.lr = 4e-4f}}});
    // Muon orthogonalises each of the four 8 x 8 attention matrices on its own; AdamW takes the
    // embedding, the (4, 8) gains (2-D, but role vector) and the head.
    // [snippet:groups-roles end]
    const auto& engine = opt.engine_state();
    REQUIRE(engine.group_params<0>().size() == 1);
    CHECK(engine.group_params<0>()[0].name == "h.attn");
    CHECK(engine.group_params<0>()[0].matrices == layers);
    REQUIRE(engine.group_params<1>().size() == 3);
    CHECK(engine.group_params<1>()[1].name == "h.ln");
    // One step: each layer moves as Muon moves that layer alone.
    for (std::size_t i = 0; i < attn.size(); ++i) {
        attn[i] = 0.1f * float(i % 7) - 0.3f;
        g_attn[i] = float((i * 5) % 11) - 5.0f;
    }
    std::vector<float> want = attn, momentum(attn.size(), 0.0f);
    loco::inner::muon_workspace ws;
    for (std::size_t l = 0; l < layers; ++l) {
        const std::size_t at = l * width * width;
        loco::inner::muon::update_matrix({.lr = 0.02f}, 1, want.data() + at, g_attn.data() + at,
                                         momentum.data() + at, width, width, ws);
    }
    REQUIRE(opt.step().applied);
    CHECK(attn == want);
}

TEST_CASE("docs: EDiT, robust aggregation and the wall-clock schedules (aggregation.md, schedules.md)") {
    std::vector<float> w(4, 1.0f), grad(4, 0.5f);
    loco::parameter_list params;
    params.add("w", w, grad);
    loco::comm::single comm;
    {
        // [snippet:aggregate-edit]
        using edit_diloco = loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                                         loco::schedule::warmup<loco::schedule::every>,
                                         loco::aggregate::edit>;
        edit_diloco::config cfg{.outer = {.lr = 0.7f, .momentum = 0.8f},
                                .schedule = {.steps = 100, .then = {.every = 10}}};
        cfg.aggregate.ewma_warmup = 10;
        cfg.aggregate.clip = 10.0f;
        edit_diloco opt(params, comm, cfg);
        // [snippet:aggregate-edit end]
        CHECK(opt.step().synced);
        CHECK(opt.outer_steps() == 1);
    }
    {
        // [snippet:aggregate-trimmed-mean]
        loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::statistical<2>,
                     loco::schedule::every, loco::aggregate::trimmed_mean>
            opt(params, comm, {.aggregate = {.trim = 2}});  // up to 2 bad workers of 8
        // [snippet:aggregate-trimmed-mean end]
        CHECK(opt.exchange() == loco::exchange_scheme::all_gather);
    }
    {
        // [snippet:schedule-warmup]
        loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::none,
                     loco::schedule::warmup<loco::schedule::every>>
            opt(params, comm, {.schedule = {.steps = 100, .then = {.every = 10}}});
        // calls 1 .. 100 sync at every step, then 110, 120, ...
        // [snippet:schedule-warmup end]
        for (int c = 1; c <= 110; ++c) CHECK(opt.step().synced == (c <= 100 || c == 110));
    }
    {
        // [snippet:schedule-wallclock]
        using a_edit = loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                                    loco::schedule::wallclock, loco::aggregate::edit>;
        a_edit::config cfg;
        cfg.schedule = {.seconds = 600.0, .min_total_global_steps = 100};
        cfg.aggregate.step_weights = true;  // w_i = (1 - r) softmax_i + r s_i, r = 0.5
        a_edit opt(params, comm, cfg);
        // [snippet:schedule-wallclock end]
        CHECK_FALSE(opt.step().synced);
    }
    {
        // [snippet:schedule-proportional]
        loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                     loco::schedule::proportional>
            opt(params, comm, {.schedule = {.every = 100}});
        // [snippet:schedule-proportional end]
        CHECK_FALSE(opt.step().synced);
    }
}
