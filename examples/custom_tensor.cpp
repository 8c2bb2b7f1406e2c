// How your own tensor type plugs into loco: loco never owns or copies parameters, it only needs a
// view (pointer, size, optional 2-D shape) of each. There are two ways to provide one:
//   1. a function loco_view(T&) next to your type, found by argument-dependent lookup;
//   2. a specialization of loco::tensor_traits<T>, for a type whose namespace you cannot add to
//      (a third-party or C type).
// The program registers one tensor of each kind, runs three SGD steps with momentum and checks
// the result against values computed by hand. It exits non-zero if they differ.

#include <loco/loco.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <vector>

namespace app {

// Your tensor: it owns its elements and knows its shape.
struct my_tensor {
    std::size_t rows = 0, cols = 0;
    std::vector<float> data = std::vector<float>(rows * cols);
};

// Way 1: one function. host_matrix keeps the shape, which matrix-aware optimizers use.
inline loco::tensor_view<float> loco_view(my_tensor& t) {
    return loco::host_matrix(t.data.data(), t.rows, t.cols);
}

}  // namespace app

// A buffer handed out by a C library: a plain struct that cannot gain functions.
struct c_buffer {
    float* ptr;
    int len;
};

// Way 2: traits. is_view tells loco that c_buffer does not own its elements, so passing one by
// value (a temporary) is fine.
template <>
struct loco::tensor_traits<c_buffer> {
    using element_type = float;
    static constexpr bool is_view = true;
    static float* data(const c_buffer& b) { return b.ptr; }
    static std::size_t size(const c_buffer& b) { return static_cast<std::size_t>(b.len); }
};

int main() {
    app::my_tensor weight{.rows = 2, .cols = 3};
    app::my_tensor weight_grad{.rows = 2, .cols = 3};
    float bias_storage[2] = {0.5f, -0.5f};
    float bias_grad_storage[2] = {};

    loco::parameter_list params;
    params.add("weight", weight, weight_grad);
    params.add("bias", c_buffer{bias_storage, 2}, c_buffer{bias_grad_storage, 2});

    loco::optimizer<loco::inner::sgd> opt(params, {.inner = {.lr = 0.1f, .momentum = 0.9f}});
    for (int step = 0; step < 3; ++step) {
        std::fill(weight_grad.data.begin(), weight_grad.data.end(), 1.0f);
        bias_grad_storage[0] = 2.0f;
        bias_grad_storage[1] = -2.0f;
        opt.step();
    }

    // PyTorch's momentum: the buffer b starts as g, then b = 0.9 b + g, so a constant gradient g
    // moves a parameter by -lr * (1 + 1.9 + 2.71) * g = -0.561 * g over three steps.
    const float expected_weight = -0.561f;
    const float expected_bias[2] = {0.5f - 0.561f * 2.0f, -0.5f + 0.561f * 2.0f};
    const auto close = [](float a, float b) { return std::fabs(a - b) <= 1e-5f; };
    bool ok = true;
    for (float w : weight.data) {
        ok = ok && close(w, expected_weight);
    }
    ok = ok && close(bias_storage[0], expected_bias[0]) && close(bias_storage[1], expected_bias[1]);

    std::printf("weight[0] = %.6f (expected %.6f), bias = {%.6f, %.6f} (expected {%.6f, %.6f})\n",
                weight.data[0], expected_weight, bias_storage[0], bias_storage[1],
                expected_bias[0], expected_bias[1]);
    std::printf("%s\n", ok ? "ok" : "MISMATCH");
    return ok ? 0 : 1;
}
