#pragma once
// Parameter groups: one optimizer runs different inner policies on different parameters, e.g. Muon
// on the hidden matrices of a transformer and AdamW on everything else (MuLoCo):
//
//   using inner = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
//                              loco::group<loco::otherwise, loco::inner::adamw>>;
//
// Each parameter goes to the first group whose selector matches it; a parameter no group takes is
// an error. Each group keeps its own hyper-parameters (the config's `inner` is a std::tuple of
// them, in group order) and its own state. A selector is a type with
//   static bool matches(const loco::parameter&);

#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/optimizer.hpp>
#include <loco/params.hpp>

#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace loco {

// Tags a trainer may give parameters (parameter_list::add's last argument) so that selectors can
// tell embeddings and output heads, which MuLoCo keeps on AdamW, from hidden matrices.
namespace tags {
inline constexpr parameter_tag none = 0;
inline constexpr parameter_tag embedding = 1;
inline constexpr parameter_tag head = 2;
}  // namespace tags

// ---- selectors ---------------------------------------------------------------------------------

struct otherwise {
    static bool matches(const parameter&) noexcept { return true; }
};

// A parameter with a 2-D shape.
struct is_matrix {
    static bool matches(const parameter& p) noexcept { return p.value.is_matrix(); }
};

// A parameter without one (biases, norm gains).
struct is_vector {
    static bool matches(const parameter& p) noexcept { return !p.value.is_matrix(); }
};

// A 2-D parameter that is not tagged as an embedding or an output head: where Muon applies.
struct is_hidden_matrix {
    static bool matches(const parameter& p) noexcept {
        return p.value.is_matrix() && p.tag != tags::embedding && p.tag != tags::head;
    }
};

template <parameter_tag Tag>
struct has_tag {
    static bool matches(const parameter& p) noexcept { return p.tag == Tag; }
};

// A string usable as a template argument: name_contains<"attn">.
template <std::size_t N>
struct fixed_string {
    char chars[N]{};
    constexpr fixed_string(const char (&s)[N]) noexcept { std::copy_n(s, N, chars); }
    constexpr std::string_view view() const noexcept { return {chars, N - 1}; }
};

template <fixed_string Part>
struct name_contains {
    static bool matches(const parameter& p) noexcept {
        return p.name.find(Part.view()) != std::string::npos;
    }
};

template <class S>
concept parameter_selector = requires(const parameter& p) {
    { S::matches(p) } -> std::convertible_to<bool>;
};

// ---- groups --------------------------------------------------------------------------------------

template <class Selector, class Policy>
struct group {
    static_assert(parameter_selector<Selector>,
                  "loco: a group's selector needs `static bool matches(const loco::parameter&)`; "
                  "see docs/groups.md");
    using selector = Selector;
    using policy = Policy;
};

template <class... Groups>
struct groups {
    static_assert(sizeof...(Groups) >= 1, "loco: groups<...> needs at least one group");
    using list = boost::mp11::mp_list<Groups...>;
};

namespace detail {

template <class... Groups>
class inner_engine<groups<Groups...>> {
    using engines = std::tuple<inner_engine<typename Groups::policy>...>;
    static constexpr std::size_t count = sizeof...(Groups);

public:
    using hyper_type = std::tuple<typename inner_engine<typename Groups::policy>::hyper_type...>;
    static constexpr bool needs_finite_gradients =
        (engine_needs_finite_gradients<inner_engine<typename Groups::policy>> || ...);

    explicit inner_engine(const parameter_list& params)
        : lists_(split(params)), engines_(make_engines(std::make_index_sequence<count>{})) {}

    static void validate(const hyper_type& h) {
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (inner_engine<typename Groups::policy>::validate(std::get<I>(h)), ...);
        }(std::make_index_sequence<count>{});
    }

    void apply(const hyper_type& h, std::uint64_t step, const parameter_list&) {
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (std::get<I>(engines_).apply(std::get<I>(h), step, lists_[I]), ...);
        }(std::make_index_sequence<count>{});
    }

    // Group I's engine (its state over its own parameters) and its parameters.
    template <std::size_t I>
    const auto& group() const noexcept {
        return std::get<I>(engines_);
    }
    template <std::size_t I>
    const parameter_list& group_params() const noexcept {
        return lists_[I];
    }

    void write(checkpoint_writer& w) const {
        w.text("groups");
        w.u64(count);
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((write_layout(w, lists_[I]), std::get<I>(engines_).write(w)), ...);
        }(std::make_index_sequence<count>{});
    }

    using pending = std::tuple<typename inner_engine<typename Groups::policy>::pending...>;
    pending read(checkpoint_reader& r) const {
        r.expect_text("groups", "the inner optimizer");
        r.expect_u64(count, "the number of parameter groups");
        pending next;
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((read_layout(r, lists_[I]), std::get<I>(next) = std::get<I>(engines_).read(r)), ...);
        }(std::make_index_sequence<count>{});
        return next;
    }
    void commit(pending&& next) noexcept {
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (std::get<I>(engines_).commit(std::move(std::get<I>(next))), ...);
        }(std::make_index_sequence<count>{});
    }

    // The routing: each group's parameters, in their original order, for the group that takes
    // them first. Throws loco::invalid_argument naming a parameter that no group takes. Public
    // so that other backends (loco::cuda::optimizer) route exactly as the host does.
    static std::vector<parameter_list> split(const parameter_list& params) {
        std::vector<parameter_list> lists(count);
        for (const auto& p : params) {
            const std::size_t g = route(p);
            if (g == count) {
                throw invalid_argument("loco: parameter '" + p.name +
                                       "' matches no parameter group; add a last "
                                       "group<loco::otherwise, ...>");
            }
            lists[g].add_views(p.name, p.value, p.grad, p.tag);
        }
        return lists;
    }

private:
    // The index of the first group that takes p, or count when none does.
    static std::size_t route(const parameter& p) {
        using matcher = bool (*)(const parameter&);
        static constexpr matcher matchers[] = {&Groups::selector::matches...};
        for (std::size_t g = 0; g < count; ++g) {
            if (matchers[g](p)) {
                return g;
            }
        }
        return count;
    }

    template <std::size_t... I>
    engines make_engines(std::index_sequence<I...>) const {
        return engines{inner_engine<typename Groups::policy>(lists_[I])...};
    }

    std::vector<parameter_list> lists_;  // each group's parameters, in their original order
    engines engines_;
};

}  // namespace detail
}  // namespace loco
