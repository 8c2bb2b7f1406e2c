#pragma once
// The model as loco sees it: an ordered list of (value, gradient) tensors, each with a name and an
// offset into one flat layout. Every optimizer handle keeps its state (global snapshot, moments,
// pseudo-gradient buffer) in that flat layout, so a sync is one collective over all parameters.

#include <loco/detail/overlap.hpp>
#include <loco/error.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco {

namespace detail {

// One message per mistake, each check assuming the previous ones passed (as in policy.hpp).
template <class Value, class Grad>
constexpr bool check_parameter() {
    using value_type = std::remove_reference_t<Value>;
    using grad_type = std::remove_reference_t<Grad>;
    constexpr bool tensors = tensor<value_type> && tensor<grad_type>;
    constexpr bool value_lasts =
        std::is_lvalue_reference_v<Value> || is_view_like<std::remove_cv_t<value_type>>;
    constexpr bool grad_lasts =
        std::is_lvalue_reference_v<Grad> || is_view_like<std::remove_cv_t<grad_type>>;
    constexpr bool floats = [] {
        if constexpr (tensors) {
            return std::is_same_v<tensor_element_t<value_type>, float> &&
                   std::is_same_v<std::remove_const_t<tensor_element_t<grad_type>>, float>;
        } else {
            return false;
        }
    }();
    require_tensor<value_type>();
    require_tensor<grad_type>();
    static_assert(!tensors || value_lasts,
                  "loco: a temporary container was given as a parameter value; pass the "
                  "model's own tensor so that loco can update it in place");
    static_assert(!tensors || grad_lasts,
                  "loco: a temporary container was given as a gradient; pass the gradient "
                  "tensor the trainer writes into");
    if constexpr (tensors) {
        static_assert(std::is_same_v<tensor_element_t<value_type>, float>,
                      "loco: parameter values must be mutable float (fp32) tensors");
        static_assert(std::is_same_v<std::remove_const_t<tensor_element_t<grad_type>>, float>,
                      "loco: gradients must be float (fp32) tensors");
    }
    return tensors && value_lasts && grad_lasts && floats;
}

}  // namespace detail

// A user-chosen label for selectors (groups.hpp). 0 is "no tag"; loco::tags names a few.
using parameter_tag = std::uint32_t;

// What a parameter is to the model, for selectors (groups.hpp). Shapes cannot say it: a (L, C)
// stack of L layer-norm gains is 2-D like an L x C weight matrix, and a selector that guesses from
// the rank would send both to Muon. A trainer that registers its parameters layer by layer knows.
enum class role : unsigned char {
    unspecified,  // not given: selectors guess from the shape (and tags::embedding, tags::head)
    matrix,       // a hidden weight matrix, or a stack of them: where Muon applies
    vector,       // a bias or a norm gain, or a stack of them, whatever its shape
    embedding,    // a token or position embedding
    head          // the output projection
};

constexpr std::string_view to_string(role r) noexcept {
    switch (r) {
        case role::unspecified: return "unspecified";
        case role::matrix: return "matrix";
        case role::vector: return "vector";
        case role::embedding: return "embedding";
        case role::head: return "head";
    }
    return "not a role";
}

// A (count, rows, cols) tensor: `count` row-major rows x cols matrices one after another, as a
// transformer that stacks its layers keeps them. count 0 means "not a stack".
struct matrix_stack {
    std::size_t count = 0;
    std::size_t rows = 0;
    std::size_t cols = 0;
};

// How parameter_list::add registers a parameter, beyond its name and tensors:
//   params.add("h.attn.w", w, gw, {.role = loco::role::matrix, .stack = {12, 256, 768}});
struct parameter_options {
    loco::role role = loco::role::unspecified;
    matrix_stack stack{};
    parameter_tag tag = 0;
};

struct parameter {
    std::string name;
    tensor_view<float> value;       // updated in place by the optimizer
    tensor_view<const float> grad;  // read by the inner step
    std::size_t offset = 0;         // position of element 0 in the flat layout
    parameter_tag tag = 0;
    loco::role role = loco::role::unspecified;
    // The matrices `value` holds, stacked along its first axis: a stack registered as
    // (count, rows, cols) has the 2-D shape (count * rows) x cols and matrices == count. A
    // per-matrix policy (Muon) updates each separately; element-wise policies and compressors see
    // one tensor.
    std::size_t matrices = 1;
    // Registered with .stack (a stack of one matrix included): its matrices are declared, not
    // guessed from a 2-D view (groups.hpp warns only about guesses).
    bool stacked = false;

    // The shape of each matrix of the stack (of the whole value when it is not a stack).
    std::size_t matrix_rows() const noexcept { return matrices == 0 ? 0 : value.rows / matrices; }
    std::size_t matrix_cols() const noexcept { return value.cols; }
    // The options that register this parameter again with the same role, stack and tag.
    parameter_options options() const noexcept {
        parameter_options o{role, {}, tag};
        if (stacked) o.stack = {matrices, matrix_rows(), matrix_cols()};
        return o;
    }
};

class parameter_list {
public:
    parameter_list() = default;

    // Adds a parameter and its gradient. Both must be loco tensors (see tensor.hpp) of float
    // elements, of the same size, in the same memory space as the parameters already added.
    // An empty name is replaced by "param<index>". The tag is for selectors (groups.hpp).
    template <class Value, class Grad>
    parameter_list& add(std::string name, Value&& value, Grad&& grad, parameter_tag tag = 0) {
        return add(std::move(name), std::forward<Value>(value), std::forward<Grad>(grad),
                   parameter_options{.tag = tag});
    }

    // The same with a role and, for a stack of matrices, its (count, rows, cols) shape; see
    // parameter_options and docs/groups.md.
    template <class Value, class Grad>
    parameter_list& add(std::string name, Value&& value, Grad&& grad, parameter_options options) {
        // A mistake stops the build inside check_parameter with one sentence; the discarded
        // branch keeps the compiler from piling its own errors on top.
        if constexpr (detail::check_parameter<Value, Grad>()) {
            return add_views(std::move(name), as_view(value),
                             tensor_view<const float>(as_view(grad)), options);
        } else {
            return *this;
        }
    }

    // The same with views already built (host_tensor, cuda_matrix, ...).
    parameter_list& add_views(std::string name, tensor_view<float> value,
                              tensor_view<const float> grad, parameter_tag tag = 0) {
        return add_views(std::move(name), value, grad, parameter_options{.tag = tag});
    }

    parameter_list& add_views(std::string name, tensor_view<float> value,
                              tensor_view<const float> grad, parameter_options options) {
        if (name.empty()) {
            name = unused_name("param" + std::to_string(items_.size()));
        }
        const auto where = [&] { return "loco: parameter '" + name + "': "; };
        if (value.size != grad.size) {
            throw shape_error(where() + "value has " + std::to_string(value.size) +
                              " elements but its gradient has " + std::to_string(grad.size));
        }
        // No buffer holds more bytes than a pointer difference can count, and the list's flat
        // layout (total_elements(), every state array) must not wrap around: a size from an
        // adapter that went wrong (a negative length cast to size_t) is refused here.
        constexpr std::size_t most = static_cast<std::size_t>(PTRDIFF_MAX) / sizeof(float);
        if (value.size > most || total_ > most - value.size) {
            throw shape_error(where() + std::to_string(value.size) +
                              " elements is more than a buffer can hold (with the " +
                              std::to_string(total_) + " registered before it, at most " +
                              std::to_string(most) + " floats in all); the size is wrong");
        }
        if (value.is_matrix() && (detail::element_count_overflows(value.rows, value.cols) ||
                                  value.rows * value.cols != value.size)) {
            throw shape_error(where() + "shape " + std::to_string(value.rows) + " x " +
                              std::to_string(value.cols) + " does not hold " +
                              std::to_string(value.size) + " elements");
        }
        if (value.size != 0 && (value.data == nullptr || grad.data == nullptr)) {
            throw invalid_argument(where() + "null data pointer for a non-empty tensor");
        }
        if (value.space != grad.space) {
            throw memory_space_error(where() + "value is in " + std::string(to_string(value.space)) +
                                     " memory but its gradient is in " +
                                     std::string(to_string(grad.space)) + " memory");
        }
        if (!items_.empty() && value.space != items_.front().value.space) {
            throw memory_space_error(where() + "is in " + std::string(to_string(value.space)) +
                                     " memory but the parameters before it are in " +
                                     std::string(to_string(items_.front().value.space)) +
                                     " memory; one optimizer works in one memory space");
        }
        for (const auto& p : items_) {
            if (p.name == name) {
                throw invalid_argument("loco: two parameters are named '" + name + "'");
            }
        }
        const std::size_t matrices = apply_options(where, options, value, grad);
        items_.push_back(parameter{std::move(name), value, grad, total_, options.tag,
                                   options.role, matrices, options.stack.count != 0});
        total_ += value.size;
        return *this;
    }

    // Strict roles: an optimizer over this list refuses (loco::invalid_argument, naming the
    // parameter) to let a selector that guesses from the shape (is_matrix, is_hidden_matrix) send
    // a parameter without a role to a per-matrix policy such as Muon. Off by default: the guess
    // is then made, with one warning per process (groups.hpp, loco::set_warning_sink).
    parameter_list& set_strict_roles(bool strict = true) noexcept {
        strict_roles_ = strict;
        return *this;
    }
    bool strict_roles() const noexcept { return strict_roles_; }

    std::size_t size() const noexcept { return items_.size(); }
    bool empty() const noexcept { return items_.empty(); }
    std::size_t total_elements() const noexcept { return total_; }
    const parameter& operator[](std::size_t i) const { return items_[i]; }
    auto begin() const noexcept { return items_.begin(); }
    auto end() const noexcept { return items_.end(); }

    // Memory space of every tensor in the list (host for an empty list).
    memory_space space() const noexcept {
        return items_.empty() ? memory_space::host : items_.front().value.space;
    }

    // Throws invalid_argument when two tensors share memory (two values, or a value and any
    // gradient): an update through one would silently change the other.
    void check_no_overlap() const {
        std::vector<detail::memory_range> ranges;
        ranges.reserve(2 * items_.size());
        for (std::size_t i = 0; i < items_.size(); ++i) {
            const auto& p = items_[i];
            if (p.value.size == 0) {
                continue;
            }
            const auto v = reinterpret_cast<std::uintptr_t>(p.value.data);
            const auto g = reinterpret_cast<std::uintptr_t>(p.grad.data);
            ranges.push_back({v, v + p.value.size_bytes(), i, true});
            ranges.push_back({g, g + p.grad.size_bytes(), i, false});
        }
        if (const auto hit = detail::find_value_overlap(std::move(ranges))) {
            const auto describe = [&](const detail::memory_range& x) {
                return std::string(x.is_value ? "the value" : "the gradient") + " of '" +
                       items_[x.index].name + "'";
            };
            throw invalid_argument("loco: " + describe(hit->first) + " overlaps " +
                                   describe(hit->second) +
                                   " in memory; every parameter value needs its own storage");
        }
    }

private:
    // Checks the role and the stack shape, gives the views the stack's 2-D shape, and returns
    // how many matrices the value holds. Throws before anything is added.
    template <class Where>
    static std::size_t apply_options(const Where& where, const parameter_options& o,
                                     tensor_view<float>& value, tensor_view<const float>& grad) {
        switch (o.role) {
            case role::unspecified:
            case role::matrix:
            case role::vector:
            case role::embedding:
            case role::head:
                break;
            default:
                throw invalid_argument(where() + "role " +
                                       std::to_string(static_cast<int>(o.role)) +
                                       " is not a loco::role");
        }
        const matrix_stack& st = o.stack;
        if (st.count == 0) {
            if (o.role == role::matrix && !value.is_matrix()) {
                if (value.size == 0) {
                    throw shape_error(where() + "has role matrix but no elements (a " +
                                      std::to_string(value.rows) + " x " +
                                      std::to_string(value.cols) + " view); an empty tensor "
                                      "has no matrix to update: register it without the role");
                }
                throw shape_error(where() + "has role matrix but no 2-D shape; give its view "
                                            "one (host_matrix, tensor_traits::shape) or pass "
                                            ".stack = {1, rows, cols}");
            }
            return 1;
        }
        if (o.role == role::vector) {
            throw invalid_argument(where() + "a stack of matrices cannot have role vector; "
                                             "register a stack of biases or norm gains without "
                                             ".stack, with .role = loco::role::vector");
        }
        const auto shape = [&] {
            return "(" + std::to_string(st.count) + ", " + std::to_string(st.rows) + ", " +
                   std::to_string(st.cols) + ")";
        };
        if (st.rows == 0 || st.cols == 0) {
            throw shape_error(where() + "stack shape " + shape() + " has matrices without rows "
                              "or columns; an empty tensor needs no .stack");
        }
        const std::size_t limit = static_cast<std::size_t>(-1);
        if (st.rows > limit / st.cols ||
            st.count > limit / (st.rows * st.cols) ||
            st.count * st.rows * st.cols != value.size) {
            throw shape_error(where() + "stack shape " + shape() + " does not hold its " +
                              std::to_string(value.size) + " elements");
        }
        // The stacked view ((L * rows) x cols), or (L, rows * cols) as a (L, rows, cols) tensor
        // arrives through DLPack and other adapters that keep the first axis.
        const bool stacked_view = value.rows == st.count * st.rows && value.cols == st.cols;
        const bool layer_view = value.rows == st.count && value.cols == st.rows * st.cols;
        if (value.is_matrix() && !stacked_view && !layer_view) {
            throw shape_error(where() + "its view is " + std::to_string(value.rows) + " x " +
                              std::to_string(value.cols) + " but the stack " + shape() +
                              " is " + std::to_string(st.count * st.rows) + " x " +
                              std::to_string(st.cols) + " (or " + std::to_string(st.count) +
                              " x " + std::to_string(st.rows * st.cols) +
                              "); pass a view of that shape or a flat one");
        }
        value.rows = grad.rows = st.count * st.rows;
        value.cols = grad.cols = st.cols;
        return st.count;
    }

    // `base`, or `base_2`, `base_3`, ... when a parameter already has that name.
    std::string unused_name(const std::string& base) const {
        const auto taken = [&](const std::string& n) {
            return std::any_of(items_.begin(), items_.end(),
                               [&](const parameter& p) { return p.name == n; });
        };
        std::string candidate = base;
        for (int k = 2; taken(candidate); ++k) {
            candidate = base + "_" + std::to_string(k);
        }
        return candidate;
    }

    std::vector<parameter> items_;
    std::size_t total_ = 0;
    bool strict_roles_ = false;
};

}  // namespace loco
