#pragma once
// How loco sees a tensor: a non-owning view (pointer, element count, optional 2-D shape, memory
// space), and the customization points that turn any user tensor type into one.
//
// A type T is a loco tensor when loco::as_view(t) works, found in this order:
//   1. T is a loco::tensor_view<E> already;
//   2. loco::tensor_traits<T> is specialised (full control);
//   3. a function loco_view(T&) returning a loco::tensor_view<E> is found by argument-dependent
//      lookup next to T (the easy way: one function).
// std::vector and std::span are tensors out of the box (host memory).

#include <loco/config.hpp>
#include <loco/error.hpp>

#include <concepts>
#include <cstddef>
#include <limits>
#include <string>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

namespace loco {

enum class memory_space : unsigned char { host, cuda };

constexpr std::string_view to_string(memory_space s) noexcept {
    return s == memory_space::host ? "host" : "cuda";
}

// A non-owning view of `size` contiguous elements. `rows` and `cols` describe a row-major 2-D
// shape when the tensor has one (rows * cols == size); both are 0 otherwise.
template <class T>
struct tensor_view {
    using element_type = T;

    T* data = nullptr;
    std::size_t size = 0;
    std::size_t rows = 0;
    std::size_t cols = 0;
    memory_space space = memory_space::host;

    LOCO_HD constexpr bool is_matrix() const noexcept { return rows != 0 && cols != 0; }
    LOCO_HD constexpr bool empty() const noexcept { return size == 0; }
    LOCO_HD constexpr T& operator[](std::size_t i) const noexcept { return data[i]; }
    constexpr std::size_t size_bytes() const noexcept { return size * sizeof(T); }

    // A view of mutable elements converts to a view of const elements, as T* to const T* does.
    // (A template, so that no conversion of a const view to itself is ever declared.)
    template <class U>
        requires(std::is_same_v<U, const T> && !std::is_const_v<T>)
    constexpr operator tensor_view<U>() const noexcept {
        return {data, size, rows, cols, space};
    }
};

namespace detail {

// True when rows * cols does not fit std::size_t (the product would wrap around to a small count).
constexpr bool element_count_overflows(std::size_t rows, std::size_t cols) noexcept {
    return cols != 0 && rows > std::numeric_limits<std::size_t>::max() / cols;
}

// rows * cols; throws shape_error when the product does not fit std::size_t.
constexpr std::size_t matrix_elements(std::size_t rows, std::size_t cols) {
    if (element_count_overflows(rows, cols)) {
        throw shape_error("loco: a " + std::to_string(rows) + " x " + std::to_string(cols) +
                          " matrix has more elements than std::size_t can count; the shape is "
                          "wrong (rows and cols swapped with something else, or uninitialised)");
    }
    return rows * cols;
}

}  // namespace detail

// Views over raw pointers, for buffers that no tensor type wraps. The matrix forms throw
// shape_error when rows * cols overflows std::size_t.
template <class T>
constexpr tensor_view<T> host_tensor(T* data, std::size_t size) noexcept {
    return {data, size, 0, 0, memory_space::host};
}
template <class T>
constexpr tensor_view<T> host_matrix(T* data, std::size_t rows, std::size_t cols) {
    return {data, detail::matrix_elements(rows, cols), rows, cols, memory_space::host};
}
template <class T>
constexpr tensor_view<T> cuda_tensor(T* data, std::size_t size) noexcept {
    return {data, size, 0, 0, memory_space::cuda};
}
template <class T>
constexpr tensor_view<T> cuda_matrix(T* data, std::size_t rows, std::size_t cols) {
    return {data, detail::matrix_elements(rows, cols), rows, cols, memory_space::cuda};
}

// 2-D shape reported by tensor_traits<T>::shape (optional member).
struct matrix_shape {
    std::size_t rows = 0;
    std::size_t cols = 0;
};

// Customization point with full control. The primary template is disabled: a specialization
// provides
//   using element_type = E;                         // E may be const
//   static E* data(T&);  static std::size_t size(const T&);
// and optionally
//   static loco::matrix_shape shape(const T&);      // 2-D shape, if the tensor is a matrix
//   static loco::memory_space space(const T&);      // defaults to host
//   static constexpr bool is_view = true;           // T does not own its elements
template <class T>
struct tensor_traits {
    static constexpr bool disabled = true;
};

template <class E, class A>
struct tensor_traits<std::vector<E, A>> {
    using element_type = E;
    static E* data(std::vector<E, A>& v) noexcept { return v.data(); }
    static std::size_t size(const std::vector<E, A>& v) noexcept { return v.size(); }
};
template <class E, class A>
struct tensor_traits<const std::vector<E, A>> {
    using element_type = const E;
    static const E* data(const std::vector<E, A>& v) noexcept { return v.data(); }
    static std::size_t size(const std::vector<E, A>& v) noexcept { return v.size(); }
};
template <class E, std::size_t N>
struct tensor_traits<std::span<E, N>> {
    using element_type = E;
    static constexpr bool is_view = true;
    static E* data(const std::span<E, N>& s) noexcept { return s.data(); }
    static std::size_t size(const std::span<E, N>& s) noexcept { return s.size(); }
};

namespace detail {

template <class T>
struct is_tensor_view : std::false_type {};
template <class E>
struct is_tensor_view<tensor_view<E>> : std::true_type {};

template <class T>
concept traits_enabled = !requires { tensor_traits<T>::disabled; };

// A const-qualified T uses tensor_traits<const T> when specialised (a const std::vector has const
// elements), else tensor_traits<T> (a const std::span still has mutable elements).
template <class T>
using traits_for = std::conditional_t<traits_enabled<T>, tensor_traits<T>,
                                      tensor_traits<std::remove_cv_t<T>>>;

template <class T>
concept has_traits = (traits_enabled<T> || traits_enabled<std::remove_cv_t<T>>) && requires(T& t) {
    typename traits_for<T>::element_type;
    { traits_for<T>::data(t) } -> std::convertible_to<typename traits_for<T>::element_type*>;
    { traits_for<T>::size(t) } -> std::convertible_to<std::size_t>;
};

template <class T>
concept has_adl_hook = requires(T& t) {
    { loco_view(t) };
    requires is_tensor_view<std::remove_cvref_t<decltype(loco_view(t))>>::value;
};

struct as_view_fn {
    template <class T>
        requires is_tensor_view<std::remove_cvref_t<T>>::value
    constexpr auto operator()(T&& t) const noexcept {
        return std::remove_cvref_t<T>(t);
    }

    template <class T>
        requires(!is_tensor_view<std::remove_cvref_t<T>>::value &&
                 has_traits<std::remove_reference_t<T>>)
    constexpr auto operator()(T&& t) const {
        using traits = traits_for<std::remove_reference_t<T>>;
        using E = typename traits::element_type;
        tensor_view<E> v{traits::data(t), static_cast<std::size_t>(traits::size(t)), 0, 0,
                         memory_space::host};
        if constexpr (requires { traits::shape(t); }) {
            const matrix_shape s = traits::shape(t);
            v.rows = s.rows;
            v.cols = s.cols;
        }
        if constexpr (requires { traits::space(t); }) {
            v.space = traits::space(t);
        }
        return v;
    }

    template <class T>
        requires(!is_tensor_view<std::remove_cvref_t<T>>::value &&
                 !has_traits<std::remove_reference_t<T>> &&
                 has_adl_hook<std::remove_reference_t<T>>)
    constexpr auto operator()(T&& t) const {
        return loco_view(t);
    }
};

}  // namespace detail

// loco::as_view(t): the tensor_view of any loco tensor (see the protocol at the top of the file).
inline constexpr detail::as_view_fn as_view{};

// A type loco can read and write as a tensor.
template <class T>
concept tensor = requires(T& t) { as_view(t); };

// The element type of a tensor (const-qualified for read-only tensors).
template <tensor T>
using tensor_element_t = typename decltype(as_view(std::declval<T&>()))::element_type;

namespace detail {

template <class T>
concept is_view_like =
    is_tensor_view<T>::value || requires { requires traits_for<T>::is_view; };

// One readable sentence when a type is not a tensor, instead of a page of overload failures.
template <class T>
constexpr void require_tensor() {
    static_assert(tensor<T>,
                  "loco: this type is not a loco tensor: specialise loco::tensor_traits<T> "
                  "(element_type, data, size) or declare loco_view(T&) returning a "
                  "loco::tensor_view next to the type; see docs/tensors.md");
}

}  // namespace detail
}  // namespace loco
