// The parameter list: the flat layout every optimizer state lives in, and every way a list of
// (value, gradient) pairs can be wrong. Each refusal is checked for its exception type and for a
// message that names the parameter and the numbers involved, and for leaving the list unchanged.
#include <doctest/doctest.h>

#include <loco/comm/single.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/optimizer.hpp>
#include <loco/outer/sgd.hpp>
#include <loco/params.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace {

using doctest::Contains;

// Another library's non-owning handle: declared a view, so a temporary handle is a valid argument.
struct external_handle {
    float* ptr;
    std::size_t len;
};

}  // namespace

template <>
struct loco::tensor_traits<external_handle> {
    using element_type = float;
    static constexpr bool is_view = true;
    static float* data(const external_handle& h) { return h.ptr; }
    static std::size_t size(const external_handle& h) { return h.len; }
};

namespace {

// check_no_overlap() must throw invalid_argument naming both parameters. Which one the message
// names first depends on their addresses, so only their presence is checked.
void check_overlap_refused(const loco::parameter_list& list, const std::string& first,
                           const std::string& second) {
    INFO("expected an overlap of '" << first << "' and '" << second << "'");
    std::string message;
    try {
        list.check_no_overlap();
    } catch (const loco::invalid_argument& e) {
        message = e.what();
    }
    REQUIRE_FALSE(message.empty());
    INFO("message: " << message);
    CHECK(message.find("'" + first + "'") != std::string::npos);
    CHECK(message.find("'" + second + "'") != std::string::npos);
    CHECK(message.find(" overlaps ") != std::string::npos);
    CHECK(message.find("every parameter value needs its own storage") != std::string::npos);
}

}  // namespace

TEST_CASE("parameter_list: offsets, totals and order of a multi-tensor list") {
    std::vector<float> a(1), b(7), c(1000);
    std::vector<float> ga(1), gb(7), gc(1000);
    loco::parameter_list list;
    CHECK(list.empty());
    CHECK(list.total_elements() == 0);
    CHECK(list.space() == loco::memory_space::host);

    // add returns the list, so a model can be described in one expression.
    list.add("a", a, ga).add("b", b, gb).add("c", c, gc);

    REQUIRE(list.size() == 3);
    CHECK_FALSE(list.empty());
    CHECK(list.total_elements() == 1008);
    CHECK(list.space() == loco::memory_space::host);
    const std::vector<std::string> names{"a", "b", "c"};
    const std::vector<std::size_t> offsets{0, 1, 8};
    const std::vector<const std::vector<float>*> values{&a, &b, &c};
    const std::vector<const std::vector<float>*> grads{&ga, &gb, &gc};
    std::size_t i = 0;
    for (const loco::parameter& p : list) {
        CAPTURE(i);
        CHECK(p.name == names[i]);
        CHECK(p.offset == offsets[i]);
        CHECK(p.value.data == values[i]->data());
        CHECK(p.value.size == values[i]->size());
        CHECK(p.grad.data == grads[i]->data());
        CHECK(p.grad.size == grads[i]->size());
        CHECK(&list[i] == &p);
        ++i;
    }
    CHECK(i == 3);
}

TEST_CASE("parameter_list: what add accepts as values and gradients") {
    float cells[12] = {};
    std::vector<float> w(4), g(4);
    const std::vector<float> frozen_grad(6, 1.0f);
    loco::parameter_list list;
    list.add("vector", w, g)
        .add("span temporaries", std::span<float>(cells, 6), std::span<const float>(cells + 6, 6))
        .add("const gradient", std::span<float>(cells, 6), frozen_grad)
        .add_views("matrix view", loco::host_matrix(cells, 3, 4), loco::host_tensor(cells, 12))
        .add("handles", external_handle{cells, 2}, external_handle{cells + 2, 2});
    REQUIRE(list.size() == 5);
    CHECK(list[1].value.data == cells);
    CHECK(list[1].grad.data == cells + 6);
    CHECK(list[2].grad.data == frozen_grad.data());
    CHECK(list[3].value.rows == 3);
    CHECK(list[3].value.cols == 4);
    CHECK(list[3].offset == 16);
    CHECK(list[4].value.data == cells);
    CHECK(list[4].grad.data == cells + 2);
    CHECK(list[4].offset == 28);
    CHECK(list.total_elements() == 30);

    // An empty tensor needs no storage at all.
    list.add_views("empty", loco::host_tensor<float>(nullptr, 0),
                   loco::host_tensor<const float>(nullptr, 0));
    CHECK(list.size() == 6);
    CHECK(list[5].offset == 30);
    CHECK(list.total_elements() == 30);
}

TEST_CASE("parameter_list: a value and gradient of different sizes is a shape_error") {
    std::vector<float> w(4), g(3), ok(2), ok_grad(2);
    loco::parameter_list list;
    list.add("first", ok, ok_grad);
    CHECK_THROWS_WITH_AS(list.add("w", w, g),
                         "loco: parameter 'w': value has 4 elements but its gradient has 3",
                         loco::shape_error);
    // The refused parameter left nothing behind.
    CHECK(list.size() == 1);
    CHECK(list.total_elements() == 2);
    CHECK_THROWS_WITH_AS(list.add("longer_grad", ok, w), Contains("value has 2 elements"),
                         loco::shape_error);
}

TEST_CASE("parameter_list: a matrix shape must hold exactly the tensor's elements") {
    float cells[6] = {};
    float grad[6] = {};
    const loco::tensor_view<float> lying{cells, 6, 2, 2, loco::memory_space::host};
    loco::parameter_list list;
    CHECK_THROWS_WITH_AS(list.add_views("m", lying, loco::host_tensor(grad, 6)),
                         "loco: parameter 'm': shape 2 x 2 does not hold 6 elements",
                         loco::shape_error);
    // A shape larger than the tensor is refused too: a kernel would read rows * cols elements.
    const loco::tensor_view<float> overlong{cells, 6, 3, 3, loco::memory_space::host};
    CHECK_THROWS_WITH_AS(list.add_views("big", overlong, loco::host_tensor(grad, 6)),
                         "loco: parameter 'big': shape 3 x 3 does not hold 6 elements",
                         loco::shape_error);
    CHECK(list.empty());
    list.add_views("m", loco::host_matrix(cells, 2, 3), loco::host_tensor(grad, 6));
    CHECK(list.size() == 1);
}

TEST_CASE("parameter_list: a size no buffer can hold, or a total that would wrap, is refused") {
    // A custom adapter whose length went negative hands over SIZE_MAX; and two sizes whose sum
    // wraps around to a small total. Nothing is read from the pointers.
    float cell = 0.0f, grad = 0.0f;
    const std::size_t most = static_cast<std::size_t>(PTRDIFF_MAX) / sizeof(float);
    const auto view = [&](std::size_t n) {
        return loco::tensor_view<float>{&cell, n, 0, 0, loco::memory_space::host};
    };
    const auto grad_view = [&](std::size_t n) {
        return loco::tensor_view<const float>{&grad, n, 0, 0, loco::memory_space::host};
    };
    loco::parameter_list list;
    CHECK_THROWS_WITH_AS(list.add_views("huge", view(SIZE_MAX), grad_view(SIZE_MAX)),
                         Contains("elements is more than a buffer can hold"), loco::shape_error);
    CHECK(list.empty());
    std::vector<float> w(4), g(4);
    list.add("w", w, g);
    CHECK_THROWS_WITH_AS(list.add_views("rest", view(most - 3), grad_view(most - 3)),
                         Contains("with the 4 registered before it"), loco::shape_error);
    CHECK(list.size() == 1);
    CHECK(list.total_elements() == 4);
}

TEST_CASE("parameter_list: memory spaces must agree within a pair and across the list") {
    // The pointers are only compared, never dereferenced: host memory stands in for the GPU's.
    float cells[16] = {};
    loco::parameter_list list;
    CHECK_THROWS_WITH_AS(
        list.add_views("w", loco::host_tensor(cells, 4), loco::cuda_tensor(cells + 4, 4)),
        "loco: parameter 'w': value is in host memory but its gradient is in cuda memory",
        loco::memory_space_error);
    CHECK_THROWS_WITH_AS(
        list.add_views("w", loco::cuda_tensor(cells, 4), loco::host_tensor(cells + 4, 4)),
        Contains("value is in cuda memory but its gradient is in host memory"),
        loco::memory_space_error);
    CHECK(list.empty());

    list.add_views("host", loco::host_tensor(cells, 4), loco::host_tensor(cells + 4, 4));
    CHECK_THROWS_WITH_AS(
        list.add_views("gpu", loco::cuda_tensor(cells + 8, 4), loco::cuda_tensor(cells + 12, 4)),
        "loco: parameter 'gpu': is in cuda memory but the parameters before it are in host "
        "memory; one optimizer works in one memory space",
        loco::memory_space_error);
    CHECK(list.size() == 1);

    // The other way round: a CUDA list refuses a host parameter.
    loco::parameter_list on_gpu;
    on_gpu.add_views("gpu", loco::cuda_tensor(cells, 4), loco::cuda_tensor(cells + 4, 4));
    CHECK(on_gpu.space() == loco::memory_space::cuda);
    CHECK_THROWS_WITH_AS(
        on_gpu.add_views("host", loco::host_tensor(cells + 8, 4), loco::host_tensor(cells + 12, 4)),
        Contains("'host': is in host memory but the parameters before it are in cuda memory"),
        loco::memory_space_error);
}

TEST_CASE("parameter_list: a null pointer for a non-empty tensor is refused") {
    float cells[4] = {};
    loco::parameter_list list;
    CHECK_THROWS_WITH_AS(
        list.add_views("w", loco::host_tensor<float>(nullptr, 4), loco::host_tensor(cells, 4)),
        "loco: parameter 'w': null data pointer for a non-empty tensor", loco::invalid_argument);
    CHECK_THROWS_WITH_AS(
        list.add_views("g", loco::host_tensor(cells, 4), loco::host_tensor<const float>(nullptr, 4)),
        Contains("'g': null data pointer"), loco::invalid_argument);
    CHECK(list.empty());
}

TEST_CASE("parameter_list: names are unique, and an empty name becomes param<index>") {
    std::vector<float> a(2), b(2), c(2), d(2), g(8);
    const std::span<const float> all(g);
    loco::parameter_list list;
    list.add("", a, all.subspan(0, 2)).add("named", b, all.subspan(2, 2)).add("", c, all.subspan(4, 2));
    CHECK(list[0].name == "param0");
    CHECK(list[1].name == "named");
    CHECK(list[2].name == "param2");

    CHECK_THROWS_WITH_AS(list.add("named", d, all.subspan(6, 2)),
                         "loco: two parameters are named 'named'", loco::invalid_argument);
    CHECK(list.size() == 3);
    CHECK(list.total_elements() == 6);
}

TEST_CASE("parameter_list: check_no_overlap refuses values that share memory") {
    float cells[40] = {};
    float* const buffer = cells;
    float grads[40] = {};

    SUBCASE("two values on the same memory") {
        std::vector<float> w(4);
        loco::parameter_list list;
        list.add("a", w, std::span<const float>(grads, 4)).add("b", w, std::span<const float>(grads + 4, 4));
        check_overlap_refused(list, "a", "b");
    }
    SUBCASE("a value that is its own gradient") {
        std::vector<float> w(4);
        loco::parameter_list list;
        list.add("self", w, w);
        check_overlap_refused(list, "self", "self");
    }
    SUBCASE("a value that is another parameter's gradient") {
        loco::parameter_list list;
        list.add_views("a", loco::host_tensor(buffer, 4), loco::host_tensor(grads, 4))
            .add_views("b", loco::host_tensor(buffer + 10, 4), loco::host_tensor(buffer, 4));
        check_overlap_refused(list, "a", "b");
    }
    SUBCASE("partial overlap of two values, by one element") {
        loco::parameter_list list;
        list.add_views("low", loco::host_tensor(buffer, 6), loco::host_tensor(grads, 6))
            .add_views("high", loco::host_tensor(buffer + 5, 6), loco::host_tensor(grads + 10, 6));
        check_overlap_refused(list, "low", "high");
    }
    SUBCASE("a gradient reaching into a later value") {
        loco::parameter_list list;
        list.add_views("v", loco::host_tensor(buffer + 20, 4), loco::host_tensor(grads, 4))
            .add_views("g", loco::host_tensor(grads + 10, 6), loco::host_tensor(buffer + 15, 6));
        check_overlap_refused(list, "v", "g");
    }
    SUBCASE("a value inside a long gradient that starts before it") {
        loco::parameter_list list;
        list.add_views("long", loco::host_tensor(buffer + 30, 10), loco::host_tensor(buffer, 10))
            .add_views("inner", loco::host_tensor(buffer + 3, 2), loco::host_tensor(grads, 2));
        check_overlap_refused(list, "long", "inner");
    }
    SUBCASE("a short gradient in between does not hide an earlier, longer one") {
        // Sorted by start: gradient of 'p' [0, 20), gradient of 'q' [2, 3) (gradients may share
        // memory), value of 'r' [10, 12). 'r' overlaps 'p', not the range just before it.
        loco::parameter_list list;
        list.add_views("p", loco::host_tensor(grads, 20), loco::host_tensor(buffer, 20))
            .add_views("q", loco::host_tensor(grads + 20, 1), loco::host_tensor(buffer + 2, 1))
            .add_views("r", loco::host_tensor(buffer + 10, 2), loco::host_tensor(grads + 30, 2));
        check_overlap_refused(list, "p", "r");
        try {
            list.check_no_overlap();
        } catch (const loco::invalid_argument& e) {
            CHECK(std::string(e.what()).find("'q'") == std::string::npos);
        }
    }
}

TEST_CASE("parameter_list: check_no_overlap accepts adjacent tensors and shared gradients") {
    float cells[24] = {};
    float* const buffer = cells;
    loco::parameter_list list;
    // Values and gradients back to back in one buffer: touching is not overlapping. Empty
    // tensors occupy no memory, wherever they point.
    list.add_views("a", loco::host_tensor(buffer, 4), loco::host_tensor(buffer + 4, 4))
        .add_views("b", loco::host_tensor(buffer + 8, 4), loco::host_tensor(buffer + 12, 4))
        .add_views("c", loco::host_tensor(buffer + 16, 4), loco::host_tensor(buffer + 20, 4))
        .add_views("d", loco::host_tensor(buffer + 12, 0), loco::host_tensor(buffer + 4, 0));
    CHECK_NOTHROW(list.check_no_overlap());

    // A trainer may reuse one scratch gradient for several parameters.
    float scratch[6] = {};
    std::vector<float> x(4), y(4), z(2);
    loco::parameter_list shared;
    shared.add("x", x, std::span<const float>(scratch, 4))
        .add("y", y, std::span<const float>(scratch, 4))
        .add("z", z, std::span<const float>(scratch + 3, 2));
    CHECK_NOTHROW(shared.check_no_overlap());
    CHECK_NOTHROW(loco::optimizer<loco::inner::sgd>{shared});
}

TEST_CASE("optimizer and diloco refuse overlapping parameters when they are built") {
    std::vector<float> w(4), g(4);
    loco::parameter_list list;
    list.add("a", w, g).add("b", w, g);
    loco::comm::single comm;
    CHECK_THROWS_WITH_AS(loco::optimizer<loco::inner::sgd>{list},
                         Contains("every parameter value needs its own storage"),
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS((loco::diloco<loco::inner::sgd, loco::outer::sgd>(list, comm)),
                         Contains("every parameter value needs its own storage"),
                         loco::invalid_argument);
    CHECK(w == std::vector<float>(4, 0.0f));
}

TEST_CASE("optimizer and diloco compiled for the host refuse CUDA parameters") {
    float cells[8] = {};  // never dereferenced: the refusal comes before any access
    loco::parameter_list list;
    list.add_views("w", loco::cuda_tensor(cells, 4), loco::cuda_tensor(cells + 4, 4));
    loco::comm::single comm;
    CHECK_THROWS_WITH_AS(loco::optimizer<loco::inner::sgd>{list},
                         Contains("parameter 'w' is in cuda memory"), loco::memory_space_error);
    CHECK_THROWS_WITH_AS((loco::diloco<loco::inner::sgd, loco::outer::sgd>(list, comm)),
                         Contains("parameter 'w' is in cuda memory"), loco::memory_space_error);
}

// ---- roles and stacks ----------------------------------------------------------------------------

TEST_CASE("parameter_list: a role and a stack of matrices are recorded with the parameter") {
    std::vector<float> w(3 * 4 * 5), gw(w.size()), ln(3 * 8), gln(ln.size()), b(6), gb(6);
    loco::parameter_list list;
    // A (3, 4, 5) stack from a flat tensor: the list gives it the 2-D shape (3 * 4) x 5.
    list.add("h.attn.w", w, gw, {.role = loco::role::matrix, .stack = {3, 4, 5}});
    // A (3, 8) stack of norm gains is 2-D like a matrix; the role says what it is.
    list.add_views("h.ln.g", loco::host_matrix(ln.data(), 3, 8),
                   loco::host_matrix(static_cast<const float*>(gln.data()), 3, 8),
                   {.role = loco::role::vector});
    // The old way, a tag and no role, still works and means what it meant.
    list.add("b", b, gb, 7u);

    const loco::parameter& s = list[0];
    CHECK(s.role == loco::role::matrix);
    CHECK(s.matrices == 3);
    CHECK(s.value.rows == 12);
    CHECK(s.value.cols == 5);
    CHECK(s.grad.rows == 12);
    CHECK(s.grad.cols == 5);
    CHECK(s.matrix_rows() == 4);
    CHECK(s.matrix_cols() == 5);
    CHECK(s.value.size == 60);
    const loco::parameter_options o = s.options();
    CHECK(o.role == loco::role::matrix);
    CHECK(o.stack.count == 3);
    CHECK(o.stack.rows == 4);
    CHECK(o.stack.cols == 5);

    CHECK(list[1].role == loco::role::vector);
    CHECK(list[1].matrices == 1);
    CHECK(list[1].value.rows == 3);
    CHECK(list[2].role == loco::role::unspecified);
    CHECK(list[2].tag == 7u);
    CHECK(list[2].matrices == 1);
    CHECK(list.total_elements() == 60 + 24 + 6);
    CHECK(list[2].offset == 84);

    // A view that already has the stack's 2-D shape is accepted as it is.
    loco::parameter_list shaped;
    shaped.add_views("w", loco::host_matrix(w.data(), 12, 5),
                     loco::host_matrix(static_cast<const float*>(gw.data()), 12, 5),
                     {.stack = {3, 4, 5}});
    CHECK(shaped[0].matrices == 3);
    CHECK(shaped[0].role == loco::role::unspecified);
    CHECK(loco::to_string(loco::role::embedding) == "embedding");
}

TEST_CASE("parameter_list: a stack of L matrices may come as an L x (rows * cols) view") {
    // What a (L, rows, cols) tensor looks like through adapters that keep the first axis (DLPack
    // gives a torch parameter of stacked layers this shape): registered as the stack it is.
    std::vector<float> w(4 * 8 * 16, 1.0f), gw(w.size(), 0.5f);
    loco::parameter_list list;
    list.add_views("h.attn", loco::host_matrix(w.data(), 4, 8 * 16),
                   loco::host_matrix(static_cast<const float*>(gw.data()), 4, 8 * 16),
                   {.role = loco::role::matrix, .stack = {4, 8, 16}});
    CHECK(list[0].matrices == 4);
    CHECK(list[0].value.rows == 32);
    CHECK(list[0].value.cols == 16);
    CHECK(list[0].matrix_rows() == 8);
    CHECK(list[0].grad.rows == 32);
}

TEST_CASE("parameter_list: a wrong role or stack shape is refused and adds nothing") {
    std::vector<float> w(24), gw(24), v(5), gv(5);
    loco::parameter_list list;
    list.add("first", v, gv);

    CHECK_THROWS_WITH_AS(list.add("s", w, gw, {.stack = {2, 3, 5}}),
                         Contains("parameter 's': stack shape (2, 3, 5) does not hold its 24 elements"),
                         loco::shape_error);
    CHECK_THROWS_WITH_AS(list.add("s", w, gw, {.stack = {2, 0, 12}}),
                         Contains("stack shape (2, 0, 12) has matrices without rows or columns; "
                                  "an empty tensor needs no .stack"),
                         loco::shape_error);
    // Products that wrap around are not a match.
    CHECK_THROWS_AS(list.add("s", w, gw, {.stack = {std::size_t(1) << 62, 4, 6}}),
                    loco::shape_error);
    CHECK_THROWS_WITH_AS(
        list.add_views("s", loco::host_matrix(w.data(), 4, 6),
                       loco::host_matrix(static_cast<const float*>(gw.data()), 4, 6),
                       {.stack = {2, 3, 4}}),
        Contains("its view is 4 x 6 but the stack (2, 3, 4) is 6 x 4 (or 2 x 12)"),
        loco::shape_error);
    // An empty matrix view is not "without a 2-D shape": it has no elements.
    std::vector<float> none, g_none;
    CHECK_THROWS_WITH_AS(
        list.add_views("e", loco::host_matrix(none.data(), 0, 8),
                       loco::host_matrix(static_cast<const float*>(g_none.data()), 0, 8),
                       {.role = loco::role::matrix}),
        Contains("parameter 'e': has role matrix but no elements (a 0 x 8 view)"),
        loco::shape_error);
    CHECK_THROWS_WITH_AS(list.add("s", w, gw, {.role = loco::role::vector, .stack = {2, 3, 4}}),
                         Contains("a stack of matrices cannot have role vector"),
                         loco::invalid_argument);
    CHECK_THROWS_WITH_AS(list.add("s", w, gw, {.role = loco::role::matrix}),
                         Contains("parameter 's': has role matrix but no 2-D shape"),
                         loco::shape_error);
    CHECK_THROWS_WITH_AS(list.add("s", w, gw, {.role = static_cast<loco::role>(9)}),
                         Contains("role 9 is not a loco::role"), loco::invalid_argument);
    CHECK(list.size() == 1);
    CHECK(list.total_elements() == 5);

    // The same tensor registers once the options are right.
    list.add("s", w, gw, {.role = loco::role::matrix, .stack = {2, 3, 4}});
    CHECK(list.size() == 2);
    CHECK(list[1].matrices == 2);
}
