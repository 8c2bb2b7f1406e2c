#pragma once
// Muon (Keller Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024;
// Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982): momentum, then the
// momentum's Newton-Schulz orthogonalisation as the update of a whole matrix. The inner optimizer
// of MuLoCo (arXiv 2505.23725).
//
// The semantics are torch.optim.Muon's (PyTorch 2.9), checked against torch/optim/_muon.py
// (pytorch/pytorch; the versions with and without `use_addmm` compute the same thing):
//   * momentum is an exponential average, buf.lerp_(grad, 1 - momentum), i.e.
//     buf = momentum * buf + (1 - momentum) * grad, starting from zero. (The docstring's formula
//     B = mu B + g is not what the code does.) The heavy-ball buffer of the MuLoCo paper code,
//     M = mu M + g, is exactly M = buf / (1 - momentum), and Newton-Schulz divides out the scale,
//     so both give the same update up to eps;
//   * Nesterov (on by default): the Newton-Schulz input is grad.lerp(buf, momentum), i.e.
//     (1 - momentum) * grad + momentum * buf; without it, the buffer itself;
//   * lerp is evaluated as PyTorch's kernel does (aten/src/ATen/native/Lerp.h): from the start
//     for weights below 0.5, from the end otherwise;
//   * Newton-Schulz: transpose when rows > cols, divide by the Frobenius norm clamped from below
//     by eps, then `ns_steps` times A = X X^T, X = a X + (b A + c A A) X, transpose back;
//   * the learning rate is adjusted per matrix from its shape (rows, cols) = shape[:2]:
//     "original" (the default) lr * sqrt(max(1, rows / cols)), "match_rms_adamw"
//     lr * 0.2 * sqrt(max(rows, cols));
//   * decoupled weight decay with the UNadjusted lr, applied before the update:
//     p = p * (1 - lr * weight_decay), then p = p - adjusted_lr * O;
//   * defaults: lr 1e-3, weight_decay 0.1, momentum 0.95, nesterov true, coefficients
//     (3.4445, -4.7750, 2.0315) for every iteration, eps 1e-7, ns_steps 5, adjustment "original".
//
// Deliberate differences:
//   * PyTorch casts the Newton-Schulz input to bfloat16 and iterates in bf16; loco iterates in
//     fp32 (the Frobenius norm accumulated in double), which is closer to the exact polynomial.
//     Updates therefore differ from PyTorch's by bf16 rounding (about 1e-2 relative), not by
//     formula;
//   * the coefficients may differ per iteration (MuLoCo's table), and one more adjustment,
//     "spectral_norm" = lr * sqrt(rows / cols), reproduces the MuLoCo paper code's default;
//   * momentum must lie in [0, 1) and ns_steps in [1, 99] (PyTorch accepts any momentum >= 0 and
//     0 steps); eps must be > 0;
//   * an input to Newton-Schulz that holds NaN or infinity throws loco::nonfinite_error before
//     anything is written, instead of spreading NaN over the whole matrix. loco::optimizer asks
//     input_finite of every matrix before it updates the first, so that a step is refused whole.

#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/linalg/newton_schulz.hpp>
#include <loco/math.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace loco::inner {

// How the learning rate is scaled for a rows x cols matrix.
enum class lr_adjustment : unsigned char {
    original,         // lr * sqrt(max(1, rows / cols)), Keller Jordan's; PyTorch's default
    match_rms_adamw,  // lr * 0.2 * sqrt(max(rows, cols)), Moonshot's: reuses AdamW's lr and decay
    spectral_norm     // lr * sqrt(rows / cols), the MuLoCo paper code's default (not in PyTorch)
};

// The buffers of one Muon update, reused across calls and matrices (they grow to the largest
// matrix seen; one workspace per thread).
struct muon_workspace {
    std::vector<float> update;  // the Newton-Schulz input, then its output, rows x cols
    linalg::ns_workspace ns;
};

struct muon {
    static constexpr std::string_view name = "muon";

    // torch.optim.Muon's defaults and argument order.
    struct hyper {
        float lr = 1e-3f;
        float weight_decay = 0.1f;
        float momentum = 0.95f;
        bool nesterov = true;
        linalg::ns_coefficients coefficients = linalg::ns_coefficients::keller_jordan();
        float eps = 1e-7f;
        int ns_steps = 5;
        lr_adjustment adjust_lr = lr_adjustment::original;
    };

    static constexpr int state_size = 1;  // the momentum buffer

    // Scratch memory for update_matrix, owned by the caller (one per thread).
    using workspace = muon_workspace;

    // What the element-wise parts need for one matrix.
    struct scalars {
        float momentum;
        float buffer_weight;  // 1 - momentum: the gradient's weight in the buffer
        bool nesterov;
        float decay;  // 1 - lr * weight_decay
        float step;   // the adjusted learning rate
    };

    // The learning-rate factor of a rows x cols matrix, in double as PyTorch computes it.
    static double lr_factor(lr_adjustment adjust, std::size_t rows, std::size_t cols) {
        const double r = static_cast<double>(rows);
        const double c = static_cast<double>(cols);
        switch (adjust) {
            case lr_adjustment::original:
                return std::sqrt(std::max(1.0, r / c));
            case lr_adjustment::match_rms_adamw:
                return 0.2 * std::sqrt(std::max(r, c));
            case lr_adjustment::spectral_norm:
                return std::sqrt(r / c);
        }
        return 1.0;
    }

    // Throws invalid_argument when the adjusted learning rate of this shape overflows a float
    // (validate() cannot see shapes; the factor reaches 32 for a 1024 x 1 matrix): the step
    // would turn every element inf. Called for every matrix before the first is written (the
    // host's input_finite pre-pass, the CUDA engine's upload of the scalars).
    static scalars prepare(const hyper& h, std::size_t rows, std::size_t cols) {
        const double lr = h.lr;
        const double factor = lr_factor(h.adjust_lr, rows, cols);
        const float step = static_cast<float>(lr * factor);
        if (!std::isfinite(step)) {
            throw invalid_argument("loco::inner::muon: lr " + std::to_string(h.lr) +
                                   " times the learning-rate factor " + std::to_string(factor) +
                                   " of a " + std::to_string(rows) + " x " +
                                   std::to_string(cols) + " matrix overflows a float");
        }
        return {h.momentum, static_cast<float>(1.0 - static_cast<double>(h.momentum)), h.nesterov,
                static_cast<float>(1.0 - lr * static_cast<double>(h.weight_decay)), step};
    }

    // torch.lerp: start + weight * (end - start), evaluated from whichever end is nearer to the
    // result so that weight 1 returns `end` exactly.
    LOCO_HD static float lerp(float start, float end, float weight) {
        const float diff = end - start;
        return math::abs(weight) < 0.5f ? start + weight * diff : end - diff * (1.0f - weight);
    }

    // The new momentum buffer from the old one and the gradient.
    LOCO_HD static float next_momentum(const scalars& k, float buf, float g) {
        return lerp(buf, g, k.buffer_weight);
    }

    // The Newton-Schulz input from the NEW buffer and the gradient.
    LOCO_HD static float ns_input(const scalars& k, float buf, float g) {
        return k.nesterov ? lerp(g, buf, k.momentum) : buf;
    }

    // The parameter from its orthogonalised update o.
    LOCO_HD static void apply(const scalars& k, float& p, float o) {
        p *= k.decay;
        p -= k.step * o;
    }

    static void validate(const hyper& h) {
        if (!(h.lr >= 0.0f && std::isfinite(h.lr)))
            throw invalid_argument("loco::inner::muon: lr must be finite and >= 0");
        if (!(h.weight_decay >= 0.0f && std::isfinite(h.weight_decay)))
            throw invalid_argument("loco::inner::muon: weight_decay must be finite and >= 0");
        // Each finite, their product can overflow the float decay (every parameter inf).
        if (!std::isfinite(static_cast<float>(1.0 - static_cast<double>(h.lr) *
                                                        static_cast<double>(h.weight_decay))))
            throw invalid_argument("loco::inner::muon: lr * weight_decay overflows a float");
        if (!(h.momentum >= 0.0f && h.momentum < 1.0f))
            throw invalid_argument("loco::inner::muon: momentum must be in [0, 1)");
        switch (h.adjust_lr) {
            case lr_adjustment::original:
            case lr_adjustment::match_rms_adamw:
            case lr_adjustment::spectral_norm:
                break;
            default:
                throw invalid_argument("loco::inner::muon: adjust_lr is not an lr_adjustment");
        }
        linalg::validate_newton_schulz(h.coefficients, h.ns_steps, h.eps, "loco::inner::muon");
    }

    // The Newton-Schulz input of one element from its old momentum and its gradient: the new
    // buffer, then the blend. The single definition of the input, shared by input_finite and
    // update_matrix so that both see the same fp32 values.
    static float input_at(const scalars& k, float buf, float g) {
        return ns_input(k, next_momentum(k, buf, g), g);
    }

    // Whether update_matrix would accept this matrix, i.e. whether its Newton-Schulz input
    // (formed from `grad` and the old `momentum` by the same fp32 arithmetic, and its Frobenius
    // norm accumulated in the same double order) is finite. Finite gradients are not enough: the
    // blend can overflow. Reads only. loco::optimizer calls it for every matrix of a step before
    // it updates the first, so that a refused step leaves every matrix as it was.
    static bool input_finite(const hyper& h, const float* grad, const float* momentum,
                             std::size_t rows, std::size_t cols) {
        const std::size_t size = loco::detail::matrix_elements(rows, cols);  // shape_error
        if (rows == 0 || cols == 0) return true;
        const scalars k = prepare(h, rows, cols);
        double sum = 0.0;
        for (std::size_t i = 0; i < size; ++i) {
            const double v = input_at(k, momentum[i], grad[i]);
            sum += v * v;
        }
        return std::isfinite(std::sqrt(sum));
    }

    // What update_matrix throws for a rows x cols matrix whose input is not finite.
    static nonfinite_error nonfinite_input(std::size_t rows, std::size_t cols) {
        return nonfinite_error(
            "loco::inner::muon: the momentum or the gradient of a " + std::to_string(rows) +
            " x " + std::to_string(cols) +
            " matrix holds NaN or infinity, or their blend overflows; the matrix and its state "
            "were not updated");
    }

    // Grows `ws` to what update_matrix needs for a rows x cols matrix. loco::optimizer calls it
    // for every matrix when it is built, so that a step never allocates (an allocation failing
    // after the first matrices moved would leave a step half applied); update_matrix calls it
    // too, before it writes anything, for callers that did not.
    static void reserve(muon_workspace& ws, std::size_t rows, std::size_t cols) {
        const std::size_t size = loco::detail::matrix_elements(rows, cols);  // shape_error
        if (ws.update.size() < size) ws.update.resize(size);
        ws.ns.reserve_for(std::max(rows, cols), std::min(rows, cols));
    }

    // One update of the rows x cols row-major matrix `param` from its gradient; `momentum` holds
    // rows * cols floats of state, zero before the first step. Muon has no bias correction, so
    // `step` (counting from 1) is not used; it is taken for uniformity with the element-wise
    // policies. A matrix with no rows or no columns is left alone.
    //
    // Throws loco::invalid_argument for bad hyper-parameters and loco::nonfinite_error when the
    // Newton-Schulz input holds NaN or infinity (a non-finite gradient or momentum, or a blend that
    // overflows), in both cases before param or momentum is written; input_finite says so in
    // advance. The arrays must not overlap.
    static void update_matrix(const hyper& h, [[maybe_unused]] std::uint64_t step, float* param,
                              const float* grad, float* momentum, std::size_t rows,
                              std::size_t cols, muon_workspace& ws) {
        validate(h);
        const std::size_t size = loco::detail::matrix_elements(rows, cols);  // shape_error
        if (rows == 0 || cols == 0) return;
        const scalars k = prepare(h, rows, cols);
        reserve(ws, rows, cols);  // may throw bad_alloc: before anything is written
        float* u = ws.update.data();

        // The input is formed without touching the buffer, so that a non-finite one can still
        // be refused with the state unchanged; the new buffer is then recomputed by the same
        // arithmetic rather than kept in a second rows x cols array.
        for (std::size_t i = 0; i < size; ++i) {
            u[i] = input_at(k, momentum[i], grad[i]);
        }
        const double norm = linalg::frobenius_norm(u, size);
        if (!std::isfinite(norm)) {
            throw nonfinite_input(rows, cols);
        }
        for (std::size_t i = 0; i < size; ++i) {
            momentum[i] = next_momentum(k, momentum[i], grad[i]);
        }
        linalg::newton_schulz_unchecked(u, rows, cols, norm, u, h.coefficients, h.ns_steps, h.eps,
                                        ws.ns);
        for (std::size_t i = 0; i < size; ++i) {
            apply(k, param[i], u[i]);
        }
    }
};

}  // namespace loco::inner
