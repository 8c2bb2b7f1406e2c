#pragma once
// GPT-2's parameter layout (Radford et al. 2019; the Hugging Face tensor names), registered with
// loco on host memory for the byte benchmarks (bench/sync_bytes.cpp, bench/wan_projection.cpp)
// and their test (tests/sync_bytes_test.cpp). GPT-2 small is vocab 50257, context 1024, width
// 768, 12 layers: 124,439,808 parameters with the output head tied to wte. The same structure at
// a smaller width and vocabulary lets a test run real syncs on it.
//
// Tensors, in registration order:
//   wte (vocab x C), wpe (context x C),
//   per layer l: h.l.ln_1.weight, h.l.ln_1.bias (C), h.l.attn.c_attn.weight (C x 3C) and .bias
//   (3C), h.l.attn.c_proj.weight (C x C) and .bias (C), h.l.ln_2.weight, h.l.ln_2.bias (C),
//   h.l.mlp.c_fc.weight (C x 4C) and .bias (4C), h.l.mlp.c_proj.weight (4C x C) and .bias (C),
//   ln_f.weight, ln_f.bias (C).
// Values are filled with a cheap deterministic pattern (the bytes of a sync do not depend on
// them); every gradient views one shared zero buffer as long as the largest tensor (gradients
// are only read, so they may share memory), which keeps 124M x 4 workers affordable.

#include <loco/fragments.hpp>
#include <loco/params.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace loco_bench {

struct gpt2_shape {
    std::size_t vocab = 50257;
    std::size_t context = 1024;
    std::size_t width = 768;
    std::size_t layers = 12;

    // Parameters, head tied to wte: V C + T C + L (12 C^2 + 13 C) + 2 C.
    std::size_t parameters() const {
        const std::size_t c = width;
        return vocab * c + context * c + layers * (12 * c * c + 13 * c) + 2 * c;
    }
};

inline constexpr gpt2_shape gpt2_small{};

// One worker's model: its tensors and their registration with loco.
class gpt2_model {
public:
    explicit gpt2_model(const gpt2_shape& s, std::uint32_t seed = 0) : shape_(s) {
        const std::size_t c = s.width;
        struct spec {
            std::string name;
            std::size_t rows, cols;
            loco::role role;
        };
        std::vector<spec> specs{{"wte", s.vocab, c, loco::role::embedding},
                                {"wpe", s.context, c, loco::role::embedding}};
        for (std::size_t l = 0; l < s.layers; ++l) {
            const std::string h = "h." + std::to_string(l) + ".";
            specs.push_back({h + "ln_1.weight", 1, c, loco::role::vector});
            specs.push_back({h + "ln_1.bias", 1, c, loco::role::vector});
            specs.push_back({h + "attn.c_attn.weight", c, 3 * c, loco::role::matrix});
            specs.push_back({h + "attn.c_attn.bias", 1, 3 * c, loco::role::vector});
            specs.push_back({h + "attn.c_proj.weight", c, c, loco::role::matrix});
            specs.push_back({h + "attn.c_proj.bias", 1, c, loco::role::vector});
            specs.push_back({h + "ln_2.weight", 1, c, loco::role::vector});
            specs.push_back({h + "ln_2.bias", 1, c, loco::role::vector});
            specs.push_back({h + "mlp.c_fc.weight", c, 4 * c, loco::role::matrix});
            specs.push_back({h + "mlp.c_fc.bias", 1, 4 * c, loco::role::vector});
            specs.push_back({h + "mlp.c_proj.weight", 4 * c, c, loco::role::matrix});
            specs.push_back({h + "mlp.c_proj.bias", 1, c, loco::role::vector});
        }
        specs.push_back({"ln_f.weight", 1, c, loco::role::vector});
        specs.push_back({"ln_f.bias", 1, c, loco::role::vector});

        std::size_t largest = 0;
        for (const auto& t : specs) largest = std::max(largest, t.rows * t.cols);
        zero_grad_.assign(largest, 0.0f);
        values_.resize(specs.size());
        std::uint32_t x = 2463534242u ^ seed;
        for (std::size_t i = 0; i < specs.size(); ++i) {
            const auto& t = specs[i];
            auto& v = values_[i];
            v.resize(t.rows * t.cols);
            for (float& e : v) {
                x ^= x << 13;  // xorshift32: values in [-0.01, 0.01)
                x ^= x >> 17;
                x ^= x << 5;
                e = (static_cast<float>(x >> 8) / 16777216.0f - 0.5f) * 0.02f;
            }
            const loco::tensor_view<float> value =
                t.rows > 1 ? loco::host_matrix(v.data(), t.rows, t.cols)
                           : loco::host_tensor(v.data(), v.size());
            const loco::tensor_view<const float> grad =
                t.rows > 1 ? loco::tensor_view<const float>(
                                 loco::host_matrix(zero_grad_.data(), t.rows, t.cols))
                           : loco::tensor_view<const float>(
                                 loco::host_tensor(zero_grad_.data(), v.size()));
            params_.add_views(t.name, value, grad, loco::parameter_options{.role = t.role});
        }
    }

    gpt2_model(const gpt2_model&) = delete;
    gpt2_model& operator=(const gpt2_model&) = delete;

    const gpt2_shape& shape() const noexcept { return shape_; }
    const loco::parameter_list& params() const noexcept { return params_; }
    std::vector<std::vector<float>>& values() noexcept { return values_; }

    // Moves every parameter a little, as an inner step would, so that a sync has something to
    // send (the bytes do not depend on it; the compressors' work does).
    void nudge(float by) {
        for (auto& v : values_) {
            for (std::size_t i = 0; i < v.size(); i += 7) v[i] += by;
        }
    }

private:
    gpt2_shape shape_;
    std::vector<std::vector<float>> values_;
    std::vector<float> zero_grad_;
    loco::parameter_list params_;
};

// Streaming DiLoCo's fragments by transformer layer (algorithms.md 3.2: whole layers per
// fragment, strided): block h.l is layer l; the embeddings travel with layer 0 and ln_f with the
// last layer. With the strided pattern and P = 4, fragment p holds layers p, p + 4, p + 8: three
// layers per fragment, as in the paper.
inline loco::fragment_layout by_transformer_layer(std::size_t layers) {
    loco::fragment_layout layout;
    layout.layer_of = [layers](const loco::parameter& p) -> std::size_t {
        if (p.name.rfind("h.", 0) == 0) return std::stoul(p.name.substr(2));
        if (p.name.rfind("ln_f.", 0) == 0) return layers - 1;
        return 0;  // wte, wpe
    };
    return layout;
}

}  // namespace loco_bench
