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
#include <cstdio>
#include <functional>
#include <mutex>
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

// ---- warnings ----------------------------------------------------------------------------------

// Where loco's warnings go: a function given one line of text (no trailing newline), called with
// a lock held (it must not call set_warning_sink). warn_to_stderr until set_warning_sink is
// called; an empty function discards them. Setting a sink also re-arms the warnings given once
// per process, so that a test or a new training run sees them again.
using warning_sink = std::function<void(std::string_view)>;

// The default sink: each line to stderr.
inline void warn_to_stderr(std::string_view line) {
    std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
}

namespace detail {

struct warning_channel {
    std::mutex mutex;
    warning_sink sink = &warn_to_stderr;
    bool role_guess_warned = false;
};

inline warning_channel& warnings() {
    static warning_channel channel;
    return channel;
}

}  // namespace detail

inline void set_warning_sink(warning_sink sink) {
    auto& w = detail::warnings();
    const std::lock_guard<std::mutex> lock(w.mutex);
    w.sink = std::move(sink);
    w.role_guess_warned = false;
}

// ---- selectors ---------------------------------------------------------------------------------

// The role of a parameter as selectors read it: the role it was added with, else the one its tag
// names (tags::embedding, tags::head), else role::unspecified.
inline role role_of(const parameter& p) noexcept {
    if (p.role != role::unspecified) return p.role;
    if (p.tag == tags::embedding) return role::embedding;
    if (p.tag == tags::head) return role::head;
    return role::unspecified;
}

struct otherwise {
    static bool matches(const parameter&) noexcept { return true; }
};

// Selectors that fall back on the shape when a parameter has no role say so with `shape_guess`
// (their name): routing a parameter without a role through one of them to a per-matrix policy
// warns, or, under parameter_list::set_strict_roles(), throws.

// A matrix: role matrix, embedding or head; without a role (tags aside), a 2-D shape.
struct is_matrix {
    static constexpr std::string_view shape_guess = "loco::is_matrix";
    static bool matches(const parameter& p) noexcept {
        return p.role == role::unspecified ? p.value.is_matrix() : p.role != role::vector;
    }
};

// Not a matrix: role vector (biases, norm gains, stacks of them); without a role (tags aside),
// no 2-D shape.
struct is_vector {
    static bool matches(const parameter& p) noexcept {
        return p.role == role::unspecified ? !p.value.is_matrix() : p.role == role::vector;
    }
};

// Where Muon applies: role matrix; without a role, a 2-D parameter not tagged as an embedding or
// an output head.
struct is_hidden_matrix {
    static constexpr std::string_view shape_guess = "loco::is_hidden_matrix";
    static bool matches(const parameter& p) noexcept {
        const role r = role_of(p);
        return r == role::unspecified ? p.value.is_matrix() : r == role::matrix;
    }
};

// A parameter added with role R (or, for embedding and head, tagged tags::embedding or
// tags::head): has_role<loco::role::matrix>. Never guesses.
template <role R>
struct has_role {
    static bool matches(const parameter& p) noexcept { return role_of(p) == R; }
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

// Which group each parameter went to, in parameter order, and the parameters' names (for
// messages). Checkpoints record the groups (format 3): two runs whose selectors or roles send
// parameters to different groups can have equal sizes per group, and a checkpoint of one would
// otherwise load into the other with every state array on the wrong parameters.
struct group_routing {
    std::vector<std::size_t> group;
    std::vector<std::string> name;

    void write(checkpoint_writer& w) const {
        w.u64(group.size());
        for (const std::size_t g : group) w.u64(g);
    }
    // Nothing to compare in a format 1 or 2 stream, which did not record the routing.
    void expect(checkpoint_reader& r) const {
        if (r.format() < 3) return;
        r.expect_u64(group.size(), "the number of parameters");
        for (std::size_t i = 0; i < group.size(); ++i) {
            const std::uint64_t saved = r.u64("a parameter's group");
            if (saved != group[i]) {
                throw checkpoint_error(
                    "loco: checkpoint mismatch in the parameter groups: parameter '" + name[i] +
                    "' was saved in group " + std::to_string(saved) + ", this optimizer puts it "
                    "in group " + std::to_string(group[i]) + " (the selectors, roles or tags "
                    "changed)");
            }
        }
    }
};

template <class... Groups>
class inner_engine<groups<Groups...>> {
    using engines = std::tuple<inner_engine<typename Groups::policy>...>;
    static constexpr std::size_t count = sizeof...(Groups);

public:
    using hyper_type = std::tuple<typename inner_engine<typename Groups::policy>::hyper_type...>;
    static constexpr bool needs_finite_gradients =
        (engine_needs_finite_gradients<inner_engine<typename Groups::policy>> || ...);

    explicit inner_engine(const parameter_list& params)
        : lists_(split(params)),
          routing_(routing(params)),
          engines_(make_engines(std::make_index_sequence<count>{})) {}

    static void validate(const hyper_type& h) {
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (inner_engine<typename Groups::policy>::validate(std::get<I>(h)), ...);
        }(std::make_index_sequence<count>{});
    }

    // Every group's check before any group is applied: a step is all-or-nothing across groups.
    void check_inputs(const hyper_type& h, const parameter_list&) const {
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (check_engine_inputs(std::get<I>(engines_), std::get<I>(h), lists_[I]), ...);
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

    // Per-state syncs (schedule/state_periods.hpp): array j of every group that keeps one, in
    // group order.
    static constexpr int max_state_size =
        std::max({0, inner_engine<typename Groups::policy>::max_state_size...});
    void state_views(int j, std::vector<std::span<float>>& out) {
        std::apply([&](auto&... e) { (e.state_views(j, out), ...); }, engines_);
    }

    void write(checkpoint_writer& w) const {
        w.text("groups");
        w.u64(count);
        routing_.write(w);
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((write_layout(w, lists_[I]), std::get<I>(engines_).write(w)), ...);
        }(std::make_index_sequence<count>{});
    }

    using pending = std::tuple<typename inner_engine<typename Groups::policy>::pending...>;
    pending read(checkpoint_reader& r) const {
        r.expect_text("groups", "the inner optimizer");
        r.expect_u64(count, "the number of parameter groups");
        routing_.expect(r);
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
        std::vector<std::string> guessed;  // "name (rows x cols) by selector"
        for (const auto& p : params) {
            const std::size_t g = route(p);
            if (g == count) {
                throw invalid_argument("loco: parameter '" + p.name +
                                       "' matches no parameter group; add a last "
                                       "group<loco::otherwise, ...>");
            }
            // A declared stack of matrices (one matrix included) says what it is, even without
            // a role.
            if (const std::string_view selector = guessing_selectors[g];
                !selector.empty() && per_matrix[g] && p.role == role::unspecified &&
                !p.stacked) {
                const std::string what = "'" + p.name + "' (" + std::to_string(p.value.rows) +
                                         " x " + std::to_string(p.value.cols) + ")";
                if (params.strict_roles()) {
                    throw invalid_argument(
                        "loco: parameter " + what + " has no role, and " + std::string(selector) +
                        " would send it to a per-matrix policy on its 2-D shape alone; add it "
                        "with .role = loco::role::matrix for a weight matrix or loco::role::vector "
                        "for a stack of norm gains or biases (docs/groups.md)");
                }
                guessed.push_back(what + " by " + std::string(selector));
            }
            lists[g].add_views(p.name, p.value, p.grad, p.options());
        }
        if (!guessed.empty()) {
            warn_guess(guessed);
        }
        return lists;
    }

    // Whether parameter i (in the list's order) is in a group whose policy must see finite
    // gradients (Muon), which nonfinite_policy::ignore checks anyway; the others' are not.
    bool needs_finite_gradient(std::size_t i) const noexcept {
        return group_needs_finite[routing_.group[i]];
    }
    static constexpr bool group_needs_finite[] = {
        engine_needs_finite_gradients<inner_engine<typename Groups::policy>>...};

    // The group of every parameter (after split() accepted them all).
    static group_routing routing(const parameter_list& params) {
        group_routing out;
        for (const auto& p : params) {
            out.group.push_back(route(p));
            out.name.push_back(p.name);
        }
        return out;
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

    // Per group: the selector's name when it guesses from the shape (else empty), and whether
    // its policy updates whole matrices.
    template <class S>
    static constexpr std::string_view guess_name() noexcept {
        if constexpr (requires { S::shape_guess; }) {
            return S::shape_guess;
        } else {
            return {};
        }
    }
    static constexpr std::string_view guessing_selectors[] = {
        guess_name<typename Groups::selector>()...};
    static constexpr bool per_matrix[] = {matrix_optimizer<typename Groups::policy>...};

    // One warning per process (re-armed by set_warning_sink), naming the first few parameters.
    static void warn_guess(const std::vector<std::string>& guessed) {
        auto& w = warnings();
        const std::lock_guard<std::mutex> lock(w.mutex);
        if (w.role_guess_warned) return;
        w.role_guess_warned = true;
        if (!w.sink) return;
        std::string names;
        const std::size_t shown = std::min<std::size_t>(guessed.size(), 3);
        for (std::size_t i = 0; i < shown; ++i) {
            names += (i == 0 ? "" : ", ") + guessed[i];
        }
        if (guessed.size() > shown) {
            names += " and " + std::to_string(guessed.size() - shown) + " more";
        }
        w.sink("loco: warning: " + names +
               " went to a per-matrix policy (Muon) on a 2-D shape alone, without a role; a (L, "
               "C) stack of norm gains or biases looks the same. Add parameters with .role = "
               "loco::role::matrix or loco::role::vector (parameter_list::set_strict_roles() "
               "makes this an error; docs/groups.md). Shown once.");
    }

    template <std::size_t... I>
    engines make_engines(std::index_sequence<I...>) const {
        return engines{inner_engine<typename Groups::policy>(lists_[I])...};
    }

    std::vector<parameter_list> lists_;  // each group's parameters, in their original order
    group_routing routing_;
    engines engines_;
};

}  // namespace detail
}  // namespace loco
