// Input a hostile review fed loco and loco accepted (issue 12): non-finite or out-of-range
// hyper-parameters, a checkpoint file that does not exist reported as "truncated", and a matrix
// shape whose element count overflows std::size_t. Each case failed before its fix.
#include <doctest/doctest.h>

#include "support/forwarding_comm.hpp"

#include <loco/loco.hpp>

#include <array>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float qnan = std::numeric_limits<float>::quiet_NaN();

// A two-element model for constructing handles.
struct model {
    std::vector<float> w{1.0f, 2.0f};
    std::vector<float> g{0.0f, 0.0f};
    loco::parameter_list list() {
        loco::parameter_list l;
        l.add("w", w, g);
        return l;
    }
};

template <class Inner>
void refused_inner(const typename Inner::hyper& h, const char* message) {
    CAPTURE(message);
    model m;
    CHECK_THROWS_WITH_AS(loco::optimizer<Inner>(m.list(), {.inner = h}), doctest::Contains(message),
                         loco::invalid_argument);
    loco::comm::single comm;
    using handle = loco::diloco<Inner, loco::outer::nesterov>;
    CHECK_THROWS_WITH_AS(handle(m.list(), comm, {.inner = h}), doctest::Contains(message),
                         loco::invalid_argument);
    CHECK(m.w == std::vector<float>{1.0f, 2.0f});
}

template <class Outer>
void refused_outer(const typename Outer::hyper& h, const char* message) {
    CAPTURE(message);
    model m;
    loco::comm::single comm;
    using handle = loco::diloco<loco::inner::sgd, Outer>;
    CHECK_THROWS_WITH_AS(handle(m.list(), comm, {.outer = h}), doctest::Contains(message),
                         loco::invalid_argument);
}

}  // namespace

TEST_CASE("inner optimizers refuse non-finite or out-of-range hyper-parameters at construction") {
    using loco::inner::adamw;
    refused_inner<adamw>({.lr = inf}, "adamw: lr must be finite and >= 0, got inf");
    refused_inner<adamw>({.lr = qnan}, "adamw: lr must be finite and >= 0");
    refused_inner<adamw>({.beta1 = qnan}, "adamw: beta1 must be in [0, 1)");
    refused_inner<adamw>({.beta2 = -inf}, "adamw: beta2 must be in [0, 1)");
    // eps divides: 0 turns a zero gradient's update into 0 / 0.
    refused_inner<adamw>({.eps = 0.0f}, "adamw: eps must be finite and > 0");
    refused_inner<adamw>({.eps = inf}, "adamw: eps must be finite and > 0");
    refused_inner<adamw>({.weight_decay = inf}, "adamw: weight_decay must be finite and >= 0");
    // Each finite, their products overflow: every parameter would have turned inf.
    refused_inner<adamw>({.lr = 1e20f, .weight_decay = 1e20f},
                         "adamw: lr * weight_decay overflows a float");
    refused_inner<adamw>({.lr = 1e38f, .weight_decay = 0.0f},
                         "adamw: lr / (1 - beta1), the first step's size, overflows a float");

    using loco::inner::lion;
    refused_inner<lion>({.lr = inf}, "lion: lr must be finite and >= 0");
    refused_inner<lion>({.beta1 = 1.5f}, "lion: beta1 must be in [0, 1]");
    refused_inner<lion>({.weight_decay = qnan}, "lion: weight_decay must be finite and >= 0");
    refused_inner<lion>({.lr = 1e20f, .weight_decay = 1e20f},
                        "lion: lr * weight_decay overflows a float");
    CHECK_THROWS_WITH_AS(loco::inner::muon::validate({.lr = 1e20f, .weight_decay = 1e20f}),
                         "loco::inner::muon: lr * weight_decay overflows a float",
                         loco::invalid_argument);
    {
        // Muon's adjusted lr depends on the shape (sqrt(1024) = 32 for a 1024 x 1 matrix under
        // `original`): refused at the step, before any matrix is written.
        std::vector<float> small(6, 1.0f), gsmall(6, 0.5f), tall(1024, 1.0f), gtall(1024, 0.5f);
        loco::parameter_list list;
        list.add_views("small", loco::host_matrix(small.data(), 2, 3),
                       loco::host_matrix(static_cast<const float*>(gsmall.data()), 2, 3));
        list.add_views("tall", loco::host_matrix(tall.data(), 1024, 1),
                       loco::host_matrix(static_cast<const float*>(gtall.data()), 1024, 1));
        loco::optimizer<loco::inner::muon> opt(list, {.inner = {.lr = 3e37f, .weight_decay = 0.0f}});
        CHECK_THROWS_WITH_AS(opt.step(),
                             doctest::Contains("times the learning-rate factor 32.000000 of a 1024 x 1 "
                                               "matrix overflows a float"),
                             loco::invalid_argument);
        CHECK(small == std::vector<float>(6, 1.0f));
        CHECK(tall == std::vector<float>(1024, 1.0f));
        CHECK(opt.steps() == 0);
    }

    using loco::inner::sgd;
    refused_inner<sgd>({.lr = inf}, "sgd: lr must be finite and >= 0");
    refused_inner<sgd>({.momentum = 1.0f}, "sgd: momentum must be in [0, 1), got 1.0");
    refused_inner<sgd>({.momentum = inf}, "sgd: momentum must be in [0, 1)");
    refused_inner<sgd>({.weight_decay = inf}, "sgd: weight_decay must be finite and >= 0");

    // The paper defaults and ordinary values still pass.
    model m;
    CHECK_NOTHROW(loco::optimizer<adamw>(m.list()));
    CHECK_NOTHROW(loco::optimizer<sgd>(m.list(), {.inner = {.momentum = 0.9f, .nesterov = true}}));
    CHECK_NOTHROW(loco::optimizer<lion>(m.list(), {.inner = {.beta1 = 1.0f}}));
}

TEST_CASE("outer optimizers refuse non-finite or out-of-range hyper-parameters at construction") {
    refused_outer<loco::outer::sgd>({.lr = inf}, "outer::sgd: lr must be finite and >= 0, got inf");
    refused_outer<loco::outer::nesterov>({.lr = qnan}, "nesterov: lr must be finite and >= 0");
    refused_outer<loco::outer::nesterov>({.momentum = inf}, "nesterov: momentum must be in [0, 1)");
    refused_outer<loco::outer::adam>({.lr = inf}, "outer::adam: lr must be finite and >= 0");
    refused_outer<loco::outer::adam>({.beta1 = 1.0f}, "outer::adam: beta1 must be in [0, 1)");
    refused_outer<loco::outer::adam>({.beta2 = qnan}, "outer::adam: beta2 must be in [0, 1)");
    // beta2 = 1 keeps v at 0: with bias correction 1 / sqrt(1 - beta2^t) is infinite and the step
    // NaN, without it every step is lr * m / tau. The largest float below 1 is still taken.
    refused_outer<loco::outer::adam>({.beta2 = 1.0f},
                                     "outer::adam: beta2 must be in [0, 1), got 1.0");
    refused_outer<loco::outer::adam>({.beta2 = 1.0f, .bias_correction = true},
                                     "outer::adam: beta2 must be in [0, 1), got 1.0");
    {
        model m;
        loco::comm::single comm;
        using handle = loco::diloco<loco::inner::sgd, loco::outer::adam>;
        CHECK_NOTHROW(handle(m.list(), comm,
                             {.outer = {.beta2 = 0.99999994f, .bias_correction = true}}));
    }
    refused_outer<loco::outer::adam>({.tau = inf}, "outer::adam: tau must be finite and > 0");
    refused_outer<loco::outer::adam>({.tau = 0.0f}, "outer::adam: tau must be finite and > 0");
    // Each finite, the factors prepare() forms overflow: the first sync made the global
    // parameters inf or NaN.
    refused_outer<loco::outer::adam>({.lr = 3e31f, .beta1 = 0.99999994f, .bias_correction = true},
                                     "outer::adam: lr / (1 - beta1), the first step's size, "
                                     "overflows a float");
    // Without bias correction the step size is lr itself, finite.
    {
        model m;
        loco::comm::single comm;
        using handle = loco::diloco<loco::inner::sgd, loco::outer::adam>;
        CHECK_NOTHROW(handle(m.list(), comm, {.outer = {.lr = 3e31f, .beta1 = 0.99999994f}}));
    }
    refused_outer<loco::outer::sign_sgd>({.lr = 1e20f, .weight_decay = 1e20f},
                                         "outer::sign_sgd: lr * weight_decay overflows a float");
}

TEST_CASE("a checkpoint file that cannot be opened is reported as such, with the system's reason") {
    model m;
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(m.list(), comm);
    const std::filesystem::path missing =
        std::filesystem::temp_directory_path() / "loco-no-such-dir" / "no-such-checkpoint.bin";

    // The usual trainer code: an std::ifstream of a path that does not exist.
    std::ifstream in(missing, std::ios::binary);
    std::string message;
    try {
        opt.load(in);
    } catch (const loco::checkpoint_error& e) {
        message = e.what();
    }
    CHECK(message.find("could not be opened") != std::string::npos);
    CHECK(message.find("truncated") == std::string::npos);

    // open_checkpoint says why.
    CHECK_THROWS_WITH_AS(loco::open_checkpoint(missing),
                         doctest::Contains("no-such-checkpoint.bin': No such file or directory"),
                         loco::checkpoint_error);
    CHECK_THROWS_WITH_AS(loco::create_checkpoint(missing),
                         doctest::Contains("cannot create the checkpoint file"),
                         loco::checkpoint_error);
    std::ofstream out(missing, std::ios::binary);
    CHECK_THROWS_WITH_AS(opt.save(out), doctest::Contains("could not be created"),
                         loco::checkpoint_error);

    // An empty stream is empty, not truncated.
    std::istringstream empty;
    CHECK_THROWS_WITH_AS(opt.load(empty), doctest::Contains("the checkpoint is empty (0 bytes)"),
                         loco::checkpoint_error);

    // And a file that opens goes through save and load.
    const auto path = std::filesystem::temp_directory_path() /
                      ("loco-hostile-input-" + std::to_string(reinterpret_cast<std::uintptr_t>(&opt)) + ".bin");
    {
        auto file = loco::create_checkpoint(path);
        opt.save(file);
    }
    auto file = loco::open_checkpoint(path);
    CHECK_NOTHROW(opt.load(file));
    std::filesystem::remove(path);
}

TEST_CASE("a matrix shape whose element count overflows std::size_t is refused") {
    float x = 0.0f;
    const std::size_t big = std::size_t{1} << (sizeof(std::size_t) * 4);  // 2^32 on 64-bit hosts
    // big * big wraps around to 0: before the check this made a "matrix" of 0 elements.
    CHECK_THROWS_WITH_AS(loco::host_matrix(&x, big, big), doctest::Contains("more elements than std::size_t"),
                         loco::shape_error);
    CHECK_THROWS_AS(loco::cuda_matrix(&x, big + 1, big), loco::shape_error);
    CHECK(loco::host_matrix(&x, big, 0).size == 0);
    CHECK(loco::host_matrix(&x, 3, 5).size == 15);

    // A hand-built view whose wrapped product equals its size is refused by the parameter list.
    loco::tensor_view<float> value{&x, 0, big, big, loco::memory_space::host};
    loco::tensor_view<const float> grad{&x, 0, 0, 0, loco::memory_space::host};
    loco::parameter_list list;
    CHECK_THROWS_AS(list.add_views("w", value, grad), loco::shape_error);
    CHECK(list.empty());
}

namespace {

// A wire that corrupts the fingerprint comparison on every rank alike: it changes the digests'
// sums, so that the ranks go on to compare their texts, and makes the texts' lengths arrive as
// `length` bytes each.
class corrupting_fingerprint_lengths final : public loco_test::forwarding_comm {
public:
    corrupting_fingerprint_lengths(loco::comm::communicator& next, std::uint64_t length)
        : forwarding_comm(next, "corrupting_fingerprint_lengths"), length_(length) {}

protected:
    void do_all_reduce(loco::tensor_view<float> d, loco::comm::reduce_op op) override {
        forwarding_comm::do_all_reduce(d, op);
        if (d.size == 16 && !sums_changed_) {  // the digests' byte sums
            sums_changed_ = true;
            d.data[0] += 1.0f;
        }
    }
    void do_all_gather(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        forwarding_comm::do_all_gather(send, recv);
        if (send.size == 8 && ++eight_byte_gathers_ == 2) {  // the digests, then the lengths
            for (std::size_t k = 0; k < recv.size / 8; ++k) {
                std::memcpy(recv.data + 8 * k, &length_, 8);
            }
        }
    }

private:
    std::uint64_t length_;
    bool sums_changed_ = false;
    int eight_byte_gathers_ = 0;
};

}  // namespace

TEST_CASE("a fingerprint comparison whose lengths arrive corrupted fails on every rank without overrun") {
    // Lengths shorter than a rank's own fingerprint used to make it copy its text past the end
    // of the buffer sized from them (a heap overflow; a null write for lengths of 0). Longer
    // than 2^24 is refused as corrupted. Either way every rank raises comm_error and the handle
    // has not started.
    for (const std::uint64_t length : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{40},
                                       std::uint64_t{1} << 30}) {
        CAPTURE(length);
        std::array<std::string, 2> what;
        std::array<bool, 2> started{true, true};
        loco::comm::run_threads(2, [&](loco::comm::threads& threads) {
            corrupting_fingerprint_lengths comm(threads, length);
            std::vector<float> w(8, 1.0f), g(8, 0.5f);
            loco::parameter_list list;
            list.add("w", w, g);
            loco::diloco<loco::inner::sgd, loco::outer::sgd> opt(
                list, comm, {.inner = {.lr = 0.1f}, .outer = {.lr = 1.0f}});
            const auto slot = std::size_t(threads.rank());
            try {
                opt.start();
            } catch (const loco::comm_error& e) {
                what[slot] = e.what();
            }
            started[slot] = opt.outer_steps() != 0 || w != std::vector<float>(8, 1.0f);
        });
        for (std::size_t r = 0; r < 2; ++r) {
            CAPTURE(r);
            CHECK(what[r].find("arrived corrupted") != std::string::npos);
            CHECK(what[r].find("check the communicator") != std::string::npos);
            CHECK_FALSE(started[r]);
        }
    }
}
