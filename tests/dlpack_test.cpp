// The DLPack adapter (include/loco/dlpack.hpp) on DLTensors built by hand: what view each yields
// and every refusal, with the parameter list left as it was. Compiled where <dlpack/dlpack.h> is
// installed (libdlpack-dev); the Python tests (tests/python) cover the tensors PyTorch exports.
#include <doctest/doctest.h>

#if __has_include(<dlpack/dlpack.h>)

#include <loco/dlpack.hpp>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

struct dl {
    std::vector<std::int64_t> shape, strides;
    DLTensor t{};
    dl(float* data, std::vector<std::int64_t> s, std::vector<std::int64_t> st = {},
       DLDeviceType dev = kDLCPU, DLDataType type = {kDLFloat, 32, 1})
        : shape(std::move(s)), strides(std::move(st)) {
        t.data = data;
        t.device = {dev, 0};
        t.ndim = static_cast<int>(shape.size());
        t.dtype = type;
        t.shape = shape.data();
        t.strides = strides.empty() ? nullptr : strides.data();
        t.byte_offset = 0;
    }
};

template <class E>
std::string message_of(auto&& fn) {
    try {
        fn();
    } catch (const E& e) {
        return e.what();
    }
    return "(nothing thrown)";
}

}  // namespace

TEST_CASE("dlpack: a compact float32 tensor becomes a view with its matrix shape") {
    std::vector<float> x(24);
    const dl a(x.data(), {2, 3, 4});
    const auto v = loco::dlpack::view<float>(a.t, "x");
    CHECK(v.data == x.data());
    CHECK(v.size == 24);
    CHECK(v.rows == 2);
    CHECK(v.cols == 12);
    CHECK(v.space == loco::memory_space::host);

    // Explicit row-major strides, and any stride along an extent-1 dimension, are compact.
    const dl b(x.data(), {4, 1, 6}, {6, 99, 1});
    CHECK(loco::dlpack::view<float>(b.t, "x").size == 24);
    // A byte offset moves the data pointer; a vector has no matrix shape.
    dl c(x.data(), {20});
    c.t.byte_offset = 16;
    const auto vc = loco::dlpack::view<const float>(c.t, "x");
    CHECK(vc.data == x.data() + 4);
    CHECK_FALSE(vc.is_matrix());
    // CUDA memory is a CUDA view (the host optimizer refuses it later with its own message).
    const dl d(x.data(), {24}, {}, kDLCUDA);
    CHECK(loco::dlpack::view<float>(d.t, "x").space == loco::memory_space::cuda);
}

TEST_CASE("dlpack: non-contiguous tensors, other dtypes and devices are refused by name") {
    std::vector<float> x(24);
    const dl transposed(x.data(), {4, 6}, {1, 4});
    CHECK(message_of<loco::invalid_argument>([&] { loco::dlpack::view<float>(transposed.t, "w"); })
              .find("loco: w is not contiguous") == 0);
    const dl f64(x.data(), {12}, {}, kDLCPU, {kDLFloat, 64, 1});
    CHECK(message_of<loco::invalid_argument>([&] { loco::dlpack::view<float>(f64.t, "w"); }) ==
          "loco: w holds float64 elements but loco needs float32; convert it (keep an fp32 master "
          "copy for lower-precision models)");
    const dl bf16(x.data(), {12}, {}, kDLCPU, {kDLBfloat, 16, 1});
    CHECK(message_of<loco::invalid_argument>([&] { loco::dlpack::view<float>(bf16.t, "w"); })
              .find("bfloat16") != std::string::npos);
    const dl lanes(x.data(), {12}, {}, kDLCPU, {kDLFloat, 32, 2});
    CHECK_THROWS_AS(loco::dlpack::view<float>(lanes.t, "w"), loco::invalid_argument);
    const dl metal(x.data(), {12}, {}, kDLMetal);
    CHECK_THROWS_AS(loco::dlpack::view<float>(metal.t, "w"), loco::memory_space_error);
    const dl negative(x.data(), {-1});
    CHECK_THROWS_AS(loco::dlpack::view<float>(negative.t, "w"), loco::shape_error);
    dl misaligned(x.data(), {4});
    misaligned.t.byte_offset = 2;
    CHECK_THROWS_AS(loco::dlpack::view<float>(misaligned.t, "w"), loco::invalid_argument);
}

TEST_CASE("dlpack: a tensor without elements is compact whatever its strides") {
    // PyTorch exports torch.empty(0, 3) and torch.empty(3, 0) with strides [1, 1]: nothing to lay
    // out, so nothing to refuse; they are flat tensors of no element.
    const dl no_rows(nullptr, {0, 3}, {1, 1}), no_cols(nullptr, {3, 0}, {1, 1});
    for (const dl* e : {&no_rows, &no_cols}) {
        CHECK(loco::dlpack::is_compact(e->t));
        const auto v = loco::dlpack::view<float>(e->t, "e");
        CHECK(v.size == 0);
        CHECK_FALSE(v.is_matrix());
    }
    loco::parameter_list params;
    loco::dlpack::add(params, "e", no_rows.t, no_cols.t);
    CHECK(params.size() == 1);
    CHECK(params[0].value.size == 0);
}

TEST_CASE("dlpack: extents whose bytes do not fit std::ptrdiff_t are refused, without overflow") {
    // 3 * 2^62 elements fit std::size_t but not their 4-byte count, which would wrap to 0.
    std::vector<float> x(4);
    const dl huge(x.data(), {std::int64_t{1} << 62, 3}, {3, 1});
    CHECK(message_of<loco::shape_error>([&] { loco::dlpack::view<float>(huge.t, "huge"); })
              .find("loco: huge has more elements than memory can hold") == 0);
    CHECK_THROWS_AS(loco::dlpack::view<float>(dl(x.data(), {std::int64_t{1} << 62, 3}).t, "h"),
                    loco::shape_error);
    // The byte limit is per element type: 2^61 one-byte elements pass the count, 4-byte ones not.
    const dl bytes(x.data(), {std::int64_t{1} << 61}, {}, kDLCPU, {kDLUInt, 8, 1});
    CHECK(loco::dlpack::element_count(bytes.t, "b", 1) == std::size_t{1} << 61);
    CHECK_THROWS_AS(loco::dlpack::element_count(bytes.t, "b", 4), loco::shape_error);
    // The row-major stride product past std::int64_t is not compact (and not undefined behaviour).
    const dl wide(x.data(), {3, std::int64_t{1} << 62, 4}, {1, 4, 1});
    CHECK_FALSE(loco::dlpack::is_compact(wide.t));
    // An empty tensor is empty whatever its other extents.
    const dl empty_huge(nullptr, {0, std::int64_t{1} << 62, 3});
    CHECK(loco::dlpack::view<float>(empty_huge.t, "e").size == 0);
}

TEST_CASE("dlpack: add() refuses a gradient on another device or of another size, adding nothing") {
    std::vector<float> w(6), gw(6), g5(5);
    loco::parameter_list params;
    const dl ok(w.data(), {2, 3}), ok_grad(gw.data(), {2, 3});
    loco::dlpack::add(params, "a", ok.t, ok_grad.t);
    REQUIRE(params.size() == 1);
    CHECK(params[0].value.rows == 2);
    CHECK(params[0].grad.cols == 3);

    std::vector<float> w2(6);
    const dl value(w2.data(), {2, 3}), on_gpu(gw.data(), {2, 3}, {}, kDLCUDA);
    CHECK(message_of<loco::memory_space_error>([&] {
              loco::dlpack::add(params, "b", value.t, on_gpu.t);
          }) == "loco: the gradient of 'b' is on cuda:0 but the parameter is on cpu; keep each "
                "gradient on its parameter's device");
    const dl short_grad(g5.data(), {5});
    CHECK_THROWS_AS(loco::dlpack::add(params, "b", value.t, short_grad.t), loco::shape_error);
    CHECK(params.size() == 1);
}

TEST_CASE("dlpack: a (L, rows, cols) tensor registers as a stack of L matrices") {
    // A torch parameter of stacked layers arrives as L x (rows * cols); with .stack it is the
    // L matrices Muon orthogonalises one by one, not one L x (rows * cols) matrix.
    std::vector<float> w(4 * 8 * 16, 1.0f), gw(w.size(), 0.5f);
    const dl value(w.data(), {4, 8, 16}), grad(gw.data(), {4, 8, 16});
    loco::parameter_list params;
    loco::dlpack::add(params, "h.attn", value.t, grad.t,
                      {.role = loco::role::matrix, .stack = {4, 8, 16}});
    REQUIRE(params.size() == 1);
    CHECK(params[0].matrices == 4);
    CHECK(params[0].matrix_rows() == 8);
    CHECK(params[0].matrix_cols() == 16);
}

TEST_CASE("dlpack: export_view describes a loco buffer and its deleter frees only the record") {
    std::vector<float> x{1.0f, 2.0f, 3.0f};
    DLManagedTensor* m = loco::dlpack::export_view(loco::host_tensor(x.data(), x.size()));
    CHECK(m->dl_tensor.data == x.data());
    CHECK(m->dl_tensor.ndim == 1);
    CHECK(m->dl_tensor.shape[0] == 3);
    CHECK(m->dl_tensor.device.device_type == kDLCPU);
    CHECK(m->dl_tensor.dtype.code == kDLFloat);
    // Read back through the importer: the same elements.
    const auto v = loco::dlpack::view<const float>(m->dl_tensor, "x");
    CHECK(v.data == x.data());
    CHECK(v.size == 3);
    m->deleter(m);
    CHECK(x[2] == 3.0f);
    // CUDA memory is marked with the GPU the caller names (a view does not know it); host
    // memory has no index. (Nothing is read through these pointers.)
    DLManagedTensor* on_gpu = loco::dlpack::export_view(loco::cuda_tensor(x.data(), x.size()), 3);
    CHECK(on_gpu->dl_tensor.device.device_type == kDLCUDA);
    CHECK(on_gpu->dl_tensor.device.device_id == 3);
    on_gpu->deleter(on_gpu);
    DLManagedTensor* on_host = loco::dlpack::export_view(loco::host_tensor(x.data(), x.size()), 3);
    CHECK(on_host->dl_tensor.device.device_id == 0);
    on_host->deleter(on_host);
}

TEST_CASE("dlpack: host tensors with different device indices are one memory space") {
    // A kDLCPU value (index 0) and a kDLCUDAHost gradient (pinned memory, index 1): both are host
    // memory, which has no index; refused before as "on cpu but the parameter is on cpu".
    std::vector<float> w(3, 1.0f), g(3, 0.5f);
    std::int64_t shape[1] = {3};
    DLTensor value{w.data(), {kDLCPU, 0}, 1, {kDLFloat, 32, 1}, shape, nullptr, 0};
    DLTensor grad{g.data(), {kDLCUDAHost, 1}, 1, {kDLFloat, 32, 1}, shape, nullptr, 0};
    loco::parameter_list params;
    CHECK_NOTHROW(loco::dlpack::add(params, "w", value, grad));
    CHECK(params.size() == 1);
}

TEST_CASE("dlpack: an element type of another kind but the same width is refused by name") {
    // int32 and uint32 have float32's 32 bits and one lane: only the type code tells them apart.
    std::vector<float> x(12);
    const dl i32(x.data(), {12}, {}, kDLCPU, {kDLInt, 32, 1});
    CHECK(message_of<loco::invalid_argument>([&] { loco::dlpack::view<float>(i32.t, "w"); }) ==
          "loco: w holds int32 elements but loco needs float32; convert it (keep an fp32 master "
          "copy for lower-precision models)");
    const dl u32(x.data(), {12}, {}, kDLCPU, {kDLUInt, 32, 1});
    CHECK(message_of<loco::invalid_argument>([&] { loco::dlpack::view<const float>(u32.t, "w"); })
              .find("holds uint32 elements") != std::string::npos);
    // Vectors of four floats are named with their lanes, not as the float32 asked for.
    const dl x4(x.data(), {3}, {}, kDLCPU, {kDLFloat, 32, 4});
    CHECK(message_of<loco::invalid_argument>([&] { loco::dlpack::view<float>(x4.t, "w"); })
              .find("holds float32x4 elements") != std::string::npos);
    // And a byte view wants unsigned bytes, not int8.
    const dl i8(x.data(), {48}, {}, kDLCPU, {kDLInt, 8, 1});
    CHECK_THROWS_AS(loco::dlpack::view<std::byte>(i8.t, "b"), loco::invalid_argument);
    const dl u8(x.data(), {48}, {}, kDLCPU, {kDLUInt, 8, 1});
    CHECK(loco::dlpack::view<std::byte>(u8.t, "b").size == 48);

    using loco::dlpack::describe_dtype;
    CHECK(describe_dtype({kDLInt, 64, 1}) == "int64");
    CHECK(describe_dtype({kDLUInt, 8, 1}) == "uint8");
    CHECK(describe_dtype({kDLFloat, 16, 1}) == "float16");
    CHECK(describe_dtype({kDLBfloat, 16, 1}) == "bfloat16");
    CHECK(describe_dtype({kDLComplex, 64, 1}) == "complex64");
    CHECK(describe_dtype({kDLFloat, 32, 2}) == "float32x2");
    CHECK(describe_dtype({200, 8, 1}) == "type200_8");
}

TEST_CASE("dlpack: device types other than CPU, pinned host and CUDA are refused") {
    std::vector<float> x(4);
    for (const DLDeviceType dev : {kDLCUDAManaged, kDLROCM, kDLROCMHost, kDLOpenCL, kDLVulkan,
                                   kDLVPI, kDLExtDev}) {
        CAPTURE(static_cast<int>(dev));
        const dl t(x.data(), {4}, {}, dev);
        CHECK(message_of<loco::memory_space_error>([&] { loco::dlpack::view<float>(t.t, "w"); }) ==
              "loco: w is on DLPack device type " + std::to_string(static_cast<int>(dev)) +
                  ", which loco cannot address; move it to the CPU or a CUDA GPU");
    }
    const dl pinned(x.data(), {4}, {}, kDLCUDAHost);
    CHECK(loco::dlpack::view<float>(pinned.t, "w").space == loco::memory_space::host);
}

TEST_CASE("dlpack: a malformed shape or a null data pointer is refused before anything is read") {
    std::vector<float> x(4);
    // A negative rank: nothing in the record can be trusted (it would count as one element).
    dl negative_rank(x.data(), {4});
    negative_rank.t.ndim = -1;
    CHECK(message_of<loco::shape_error>([&] { loco::dlpack::view<float>(negative_rank.t, "w"); }) ==
          "loco: w has a malformed DLPack shape (ndim -1); the exporting framework is broken");
    // Two dimensions and no shape array.
    dl no_shape(x.data(), {2, 2});
    no_shape.t.shape = nullptr;
    CHECK(message_of<loco::shape_error>([&] { loco::dlpack::view<float>(no_shape.t, "w"); })
              .find("malformed DLPack shape (ndim 2)") != std::string::npos);
    // A negative extent is refused even after an extent 0 that makes the tensor empty.
    const dl zero_then_negative(nullptr, {0, -3});
    CHECK(message_of<loco::shape_error>([&] {
              loco::dlpack::element_count(zero_then_negative.t, "w");
          }) == "loco: w has a negative extent -3 in dimension 1");
    // Elements without storage.
    const dl no_data(nullptr, {2, 2});
    CHECK(message_of<loco::invalid_argument>([&] { loco::dlpack::view<float>(no_data.t, "w"); }) ==
          "loco: w has a null data pointer");
}

TEST_CASE("dlpack: the element count may reach exactly the bytes std::ptrdiff_t counts") {
    // The cap is on n * element_bytes <= PTRDIFF_MAX: the largest count passes, one more not.
    // Only the shape is read.
    constexpr std::int64_t most_bytes = std::numeric_limits<std::ptrdiff_t>::max();
    const dl one_byte(nullptr, {most_bytes}, {}, kDLCPU, {kDLUInt, 8, 1});
    CHECK(loco::dlpack::element_count(one_byte.t, "b", 1) == std::size_t(most_bytes));
    const dl floats(nullptr, {most_bytes / 4});
    CHECK(loco::dlpack::element_count(floats.t, "f", 4) == std::size_t(most_bytes / 4));
    const dl one_more(nullptr, {most_bytes / 4 + 1});
    CHECK_THROWS_AS(loco::dlpack::element_count(one_more.t, "f", 4), loco::shape_error);
    // Across dimensions: 3 rows of (PTRDIFF_MAX / 4) / 3 floats fit, 4 rows of them do not.
    const std::int64_t row = most_bytes / 4 / 3;
    CHECK(loco::dlpack::element_count(dl(nullptr, {3, row}).t, "f", 4) == std::size_t(3 * row));
    CHECK_THROWS_AS(loco::dlpack::element_count(dl(nullptr, {4, row}).t, "f", 4),
                    loco::shape_error);
    // Row-major strides that fit std::int64_t are compact, however large the first extent.
    const dl tall(nullptr, {std::int64_t{1} << 62, 4}, {4, 1});
    CHECK(loco::dlpack::is_compact(tall.t));
}

TEST_CASE("dlpack: add() compares GPU indices, and names the devices in its message") {
    std::vector<float> w(6), g(6);
    std::int64_t shape[1] = {6};
    // Nothing is read through the pointers of a CUDA tensor here.
    DLTensor on_0{w.data(), {kDLCUDA, 0}, 1, {kDLFloat, 32, 1}, shape, nullptr, 0};
    DLTensor on_1{g.data(), {kDLCUDA, 1}, 1, {kDLFloat, 32, 1}, shape, nullptr, 0};
    loco::parameter_list params;
    const auto refusal = [&](const DLTensor& value, const DLTensor& grad) {
        return message_of<loco::memory_space_error>(
            [&] { loco::dlpack::add(params, "w", value, grad); });
    };
    CHECK(refusal(on_0, on_1) ==
          "loco: the gradient of 'w' is on cuda:1 but the parameter is on cuda:0; keep each "
          "gradient on its parameter's device");
    // Pinned host memory is named as the CPU, whatever its index.
    DLTensor pinned{w.data(), {kDLCUDAHost, 1}, 1, {kDLFloat, 32, 1}, shape, nullptr, 0};
    CHECK(refusal(pinned, on_1) ==
          "loco: the gradient of 'w' is on cuda:1 but the parameter is on cpu; keep each "
          "gradient on its parameter's device");
    CHECK(params.empty());
    DLTensor grad_on_0{g.data(), {kDLCUDA, 0}, 1, {kDLFloat, 32, 1}, shape, nullptr, 0};
    loco::dlpack::add(params, "w", on_0, grad_on_0);
    CHECK(params.size() == 1);
}

TEST_CASE("dlpack: add() names the tensor at fault, and gives the gradient the value's shape") {
    std::vector<float> w(6), g(6), g5(5);
    loco::parameter_list params;
    const auto type_refusal = [&](const dl& value, const dl& grad) {
        return message_of<loco::invalid_argument>(
            [&] { loco::dlpack::add(params, "w", value.t, grad.t); });
    };
    const dl f64_value(w.data(), {6}, {}, kDLCPU, {kDLFloat, 64, 1}), grad(g.data(), {6});
    CHECK(type_refusal(f64_value, grad).find("loco: parameter 'w' holds float64") == 0);
    const dl value(w.data(), {2, 3}), f64_grad(g.data(), {6}, {}, kDLCPU, {kDLFloat, 64, 1});
    CHECK(type_refusal(value, f64_grad).find("loco: the gradient of 'w' holds float64") == 0);
    const dl short_grad(g5.data(), {5});
    CHECK(message_of<loco::shape_error>(
              [&] { loco::dlpack::add(params, "w", value.t, short_grad.t); }) ==
          "loco: the gradient of 'w' has 5 elements but the parameter has 6");
    CHECK(params.empty());

    // A flat gradient, or one of another shape with the same count, is read as the value's matrix.
    const dl flat_grad(g.data(), {6}), other_grad(g.data(), {3, 2});
    std::vector<float> w2(6);
    const dl value2(w2.data(), {2, 3});
    loco::dlpack::add(params, "a", value.t, flat_grad.t);
    loco::dlpack::add(params, "b", value2.t, other_grad.t);
    REQUIRE(params.size() == 2);
    for (const auto& p : params) {
        CAPTURE(p.name);
        CHECK(p.grad.data == g.data());
        CHECK(p.grad.rows == 2);
        CHECK(p.grad.cols == 3);
    }
}

TEST_CASE("dlpack: export_view refuses a buffer DLPack cannot count, and exports bytes as uint8") {
    float cell = 0.0f;
    const std::size_t most = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
    // Views only: nothing is read through the pointer.
    DLManagedTensor* largest = loco::dlpack::export_view(loco::host_tensor(&cell, most));
    CHECK(largest->dl_tensor.shape[0] == std::numeric_limits<std::int64_t>::max());
    largest->deleter(largest);
    CHECK(message_of<loco::shape_error>([&] {
              loco::dlpack::export_view(loco::host_tensor(&cell, most + 1));
          }) == "loco: a buffer of " + std::to_string(most + 1) +
                    " elements is too large for DLPack");

    std::vector<std::byte> bytes(5);
    DLManagedTensor* m = loco::dlpack::export_view(loco::host_tensor(bytes.data(), bytes.size()));
    CHECK(m->dl_tensor.dtype.code == kDLUInt);
    CHECK(m->dl_tensor.dtype.bits == 8);
    CHECK(m->dl_tensor.dtype.lanes == 1);
    const auto back = loco::dlpack::view<const std::byte>(m->dl_tensor, "bytes");
    CHECK(back.data == bytes.data());
    CHECK(back.size == 5);
    m->deleter(m);
}

#endif
