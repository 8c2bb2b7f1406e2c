// The tensor adapter: every way a type becomes a loco tensor, what view each yields (pointer,
// size, shape, memory space, const-ness of the elements), which way wins when a type offers two,
// and which types are not tensors at all.
#include <doctest/doctest.h>

#include <loco/tensor.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace {

// A row-major matrix owned by "another library", adapted with tensor_traits and reporting its
// shape and where its memory lives.
struct grid {
    std::size_t rows;
    std::size_t cols;
    std::vector<float> cells;
    bool on_device;
};

// A handle to someone else's memory: a const handle still gives mutable elements, as a const
// std::span does.
struct borrowed {
    float* ptr;
    std::size_t len;
};

// Adapted with the ADL hook only, both for mutable and for read-only access.
struct hooked {
    std::array<float, 6> values{};
};
loco::tensor_view<float> loco_view(hooked& h) { return loco::host_matrix(h.values.data(), 2, 3); }
loco::tensor_view<const float> loco_view(const hooked& h) {
    return loco::host_tensor(h.values.data(), h.values.size());
}

// Offers both ways, with different answers, so the test can tell which one loco used.
struct both_ways {
    std::array<float, 8> values{};
};
loco::tensor_view<float> loco_view(both_ways& b) { return loco::host_tensor(b.values.data(), 8); }

struct nothing {};

}  // namespace

template <>
struct loco::tensor_traits<grid> {
    using element_type = float;
    static float* data(grid& g) { return g.cells.data(); }
    static std::size_t size(const grid& g) { return g.cells.size(); }
    static loco::matrix_shape shape(const grid& g) { return {g.rows, g.cols}; }
    static loco::memory_space space(const grid& g) {
        return g.on_device ? loco::memory_space::cuda : loco::memory_space::host;
    }
};

template <>
struct loco::tensor_traits<borrowed> {
    using element_type = float;
    static float* data(const borrowed& b) { return b.ptr; }
    static std::size_t size(const borrowed& b) { return b.len; }
};

template <>
struct loco::tensor_traits<both_ways> {
    using element_type = float;
    static float* data(both_ways& b) { return b.values.data() + 1; }
    static std::size_t size(const both_ways&) { return 3; }
};

// ---- what is a tensor, and of which elements ---------------------------------------------------
static_assert(loco::tensor<std::vector<float>>);
static_assert(loco::tensor<const std::vector<float>>);
static_assert(loco::tensor<std::span<float>>);
static_assert(loco::tensor<std::span<const float, 4>>);
static_assert(loco::tensor<loco::tensor_view<float>>);
static_assert(loco::tensor<grid>);
static_assert(loco::tensor<hooked>);
static_assert(loco::tensor<const hooked>);
static_assert(loco::tensor<both_ways>);

static_assert(!loco::tensor<int>);
static_assert(!loco::tensor<nothing>);
static_assert(!loco::tensor<float*>);  // a pointer has no size: host_tensor(p, n) says it

static_assert(std::is_same_v<loco::tensor_element_t<std::vector<float>>, float>);
static_assert(std::is_same_v<loco::tensor_element_t<const std::vector<float>>, const float>);
static_assert(std::is_same_v<loco::tensor_element_t<std::vector<double>>, double>);
static_assert(std::is_same_v<loco::tensor_element_t<std::span<float>>, float>);
static_assert(std::is_same_v<loco::tensor_element_t<std::span<const float>>, const float>);
static_assert(std::is_same_v<loco::tensor_element_t<const std::span<float>>, float>);
static_assert(std::is_same_v<loco::tensor_element_t<const borrowed>, float>);
static_assert(std::is_same_v<loco::tensor_element_t<hooked>, float>);
static_assert(std::is_same_v<loco::tensor_element_t<const hooked>, const float>);
static_assert(std::is_same_v<loco::tensor_element_t<loco::tensor_view<const float>>, const float>);

// A view of mutable elements converts to one of const elements, never the other way round.
static_assert(std::is_convertible_v<loco::tensor_view<float>, loco::tensor_view<const float>>);
static_assert(!std::is_convertible_v<loco::tensor_view<const float>, loco::tensor_view<float>>);
static_assert(!std::is_convertible_v<loco::tensor_view<float>, loco::tensor_view<double>>);

// Views are literal types: building one needs no run time.
constexpr float constant_cells[6] = {1, 2, 3, 4, 5, 6};
static_assert(loco::host_matrix(constant_cells, 2, 3).size == 6);
static_assert(loco::as_view(loco::host_tensor(constant_cells, 6))[5] == 6.0f);

namespace {

template <class E>
void check_view(const loco::tensor_view<E>& v, const void* data, std::size_t size,
                std::size_t rows, std::size_t cols, loco::memory_space space) {
    CHECK(static_cast<const void*>(v.data) == data);
    CHECK(v.size == size);
    CHECK(v.rows == rows);
    CHECK(v.cols == cols);
    CHECK(v.space == space);
    CHECK(v.is_matrix() == (rows != 0 && cols != 0));
    CHECK(v.empty() == (size == 0));
    CHECK(v.size_bytes() == size * sizeof(E));
}

}  // namespace

TEST_CASE("tensor: std::vector is a host tensor, and a const vector has const elements") {
    std::vector<float> w{1.0f, 2.0f, 3.0f};
    const auto v = loco::as_view(w);
    static_assert(std::is_same_v<decltype(v), const loco::tensor_view<float>>);
    check_view(v, w.data(), 3, 0, 0, loco::memory_space::host);
    v[1] = 20.0f;  // the view writes into the vector itself
    CHECK(w[1] == 20.0f);

    const std::vector<float>& read_only = w;
    const auto c = loco::as_view(read_only);
    static_assert(std::is_same_v<decltype(c), const loco::tensor_view<const float>>);
    check_view(c, w.data(), 3, 0, 0, loco::memory_space::host);

    std::vector<float> none;
    check_view(loco::as_view(none), none.data(), 0, 0, 0, loco::memory_space::host);
}

TEST_CASE("tensor: std::span, mutable or const elements, dynamic or fixed extent") {
    float cells[5] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f};

    const std::span<float> fixed_object(cells + 1, 3);  // the span is const, its elements are not
    const auto v = loco::as_view(fixed_object);
    static_assert(std::is_same_v<decltype(v), const loco::tensor_view<float>>);
    check_view(v, cells + 1, 3, 0, 0, loco::memory_space::host);
    v[0] = 10.0f;
    CHECK(cells[1] == 10.0f);

    const auto c = loco::as_view(std::span<const float>(cells, 5));
    static_assert(std::is_same_v<decltype(c), const loco::tensor_view<const float>>);
    check_view(c, cells, 5, 0, 0, loco::memory_space::host);

    std::span<float, 2> static_extent(cells + 3, 2);
    check_view(loco::as_view(static_extent), cells + 3, 2, 0, 0, loco::memory_space::host);
}

TEST_CASE("tensor: raw pointer views carry the shape and memory space they are given") {
    float cells[12] = {};
    check_view(loco::host_tensor(cells, 12), cells, 12, 0, 0, loco::memory_space::host);
    check_view(loco::host_matrix(cells, 3, 4), cells, 12, 3, 4, loco::memory_space::host);
    // The pointers are never dereferenced, so host memory can stand in for device memory here.
    check_view(loco::cuda_tensor(cells + 2, 5), cells + 2, 5, 0, 0, loco::memory_space::cuda);
    check_view(loco::cuda_matrix(cells, 4, 3), cells, 12, 4, 3, loco::memory_space::cuda);

    const float* read_only = cells;
    static_assert(std::is_same_v<decltype(loco::host_tensor(read_only, 1)),
                                 loco::tensor_view<const float>>);
    // A vector is not a matrix, and an empty view is not one either.
    CHECK_FALSE(loco::host_matrix(cells, 0, 4).is_matrix());
    CHECK(loco::host_matrix(cells, 0, 4).empty());

    CHECK(loco::to_string(loco::memory_space::host) == "host");
    CHECK(loco::to_string(loco::memory_space::cuda) == "cuda");
}

TEST_CASE("tensor: tensor_traits with shape and memory space members") {
    grid g{2, 3, std::vector<float>(6, 1.0f), false};
    check_view(loco::as_view(g), g.cells.data(), 6, 2, 3, loco::memory_space::host);

    g.on_device = true;
    check_view(loco::as_view(g), g.cells.data(), 6, 2, 3, loco::memory_space::cuda);

    // Without shape() and space() the view is a flat host tensor.
    float cells[4] = {};
    const borrowed handle{cells, 4};
    const auto v = loco::as_view(handle);
    check_view(v, cells, 4, 0, 0, loco::memory_space::host);
    v[3] = 7.0f;
    CHECK(cells[3] == 7.0f);
    // A temporary handle is fine: its elements live elsewhere.
    check_view(loco::as_view(borrowed{cells + 1, 2}), cells + 1, 2, 0, 0,
               loco::memory_space::host);
}

TEST_CASE("tensor: the loco_view hook found by argument-dependent lookup") {
    hooked h;
    const auto v = loco::as_view(h);
    static_assert(std::is_same_v<decltype(v), const loco::tensor_view<float>>);
    check_view(v, h.values.data(), 6, 2, 3, loco::memory_space::host);
    v[4] = 5.0f;
    CHECK(h.values[4] == 5.0f);

    // The const overload is the one a const object gets.
    const hooked& read_only = h;
    check_view(loco::as_view(read_only), h.values.data(), 6, 0, 0, loco::memory_space::host);
}

TEST_CASE("tensor: tensor_traits win over the loco_view hook") {
    both_ways b;
    // The traits say 3 elements from element 1; the hook would say 8 from element 0.
    check_view(loco::as_view(b), b.values.data() + 1, 3, 0, 0, loco::memory_space::host);
    CHECK(loco::as_view(b).data != loco_view(b).data);
}

TEST_CASE("tensor: as_view of a view is the same view, and views convert to const") {
    float cells[6] = {};
    const loco::tensor_view<float> m = loco::cuda_matrix(cells, 2, 3);

    const auto same = loco::as_view(m);
    static_assert(std::is_same_v<decltype(same), const loco::tensor_view<float>>);
    check_view(same, cells, 6, 2, 3, loco::memory_space::cuda);
    // Also from an rvalue, and for a view of const elements.
    check_view(loco::as_view(loco::cuda_matrix(cells, 3, 2)), cells, 6, 3, 2,
               loco::memory_space::cuda);
    const loco::tensor_view<const float> c = m;  // every field survives the conversion
    check_view(loco::as_view(c), cells, 6, 2, 3, loco::memory_space::cuda);
    static_assert(std::is_same_v<decltype(loco::as_view(c)), loco::tensor_view<const float>>);
}

TEST_CASE("tensor: a matrix of exactly SIZE_MAX elements is not an overflow, one row more is") {
    // rows * cols == SIZE_MAX fits std::size_t (3 * 0x5555...5, and (2^32 - 1) * (2^32 + 1) on
    // 64-bit hosts). The pointer is never dereferenced.
    float cell = 0.0f;
    const std::size_t third = SIZE_MAX / 3;
    CHECK(loco::host_matrix(&cell, third, 3).size == SIZE_MAX);
    CHECK(loco::cuda_matrix(&cell, 3, third).size == SIZE_MAX);
    const std::size_t half = std::size_t{1} << (sizeof(std::size_t) * 4);
    CHECK(loco::host_matrix(&cell, half - 1, half + 1).size == SIZE_MAX);
    CHECK_THROWS_AS(loco::host_matrix(&cell, third + 1, 3), loco::shape_error);
    CHECK_THROWS_AS(loco::cuda_matrix(&cell, 3, third + 1), loco::shape_error);
    CHECK_THROWS_AS(loco::host_matrix(&cell, half, half + 1), loco::shape_error);
}
