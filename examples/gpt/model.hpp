#pragma once
// The model: GPT-2's pre-LN decoder over bytes. Its parameters live in one flat array, tensor
// after tensor in the order they are registered with loco (so loco's flat layout is this array,
// and an all-reduce of the gradient array is a data-parallel step). Each tensor has a name such
// as "h3.attn.qkv.w" and a shape: weight matrices are 2-D [out x in] as in PyTorch, biases and
// layer-norm parameters 1-D, so per-matrix policies (Muon) see real layer matrices.
//
//   x   = wte[token] + wpe[position]
//   for each block h<l>:  x += attn.proj(attention(attn.qkv(ln1(x))))
//                         x += mlp.proj(gelu(mlp.fc(ln2(x))))
//   logits = ln_f(x) head^T       (head = wte when tied)

#include "config.hpp"
#include "layers.hpp"

#include <loco/groups.hpp>
#include <loco/params.hpp>
#include <loco/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace gpt {

// One parameter tensor of the model: where it lives in the flat array and what it is.
struct tensor_spec {
    std::string name;
    std::size_t offset = 0;
    std::size_t rows = 0;  // 0 for a vector
    std::size_t cols = 0;  // the vector's length, or the matrix's columns
    loco::parameter_tag tag = loco::tags::none;
    std::size_t size() const { return rows == 0 ? cols : rows * cols; }
};

// Offsets of one block's tensors in the flat array.
struct block_offsets {
    std::size_t ln1_g, ln1_b, qkv_w, qkv_b, attn_proj_w, attn_proj_b;
    std::size_t ln2_g, ln2_b, fc_w, fc_b, mlp_proj_w, mlp_proj_b;
};

// The layout: every tensor's name, shape and offset, in registration order.
class layout {
public:
    explicit layout(const model_config& c) : cfg_(c) {
        validate(c);
        const std::size_t d = c.dim;
        wte_ = add("wte", c.vocab, d, loco::tags::embedding);
        wpe_ = add("wpe", c.context, d, loco::tags::embedding);
        for (std::size_t l = 0; l < c.layers; ++l) {
            const std::string h = "h" + std::to_string(l) + ".";
            block_offsets b{};
            b.ln1_g = add(h + "ln1.g", 0, d);
            b.ln1_b = add(h + "ln1.b", 0, d);
            b.qkv_w = add(h + "attn.qkv.w", 3 * d, d);
            b.qkv_b = add(h + "attn.qkv.b", 0, 3 * d);
            b.attn_proj_w = add(h + "attn.proj.w", d, d);
            b.attn_proj_b = add(h + "attn.proj.b", 0, d);
            b.ln2_g = add(h + "ln2.g", 0, d);
            b.ln2_b = add(h + "ln2.b", 0, d);
            b.fc_w = add(h + "mlp.fc.w", 4 * d, d);
            b.fc_b = add(h + "mlp.fc.b", 0, 4 * d);
            b.mlp_proj_w = add(h + "mlp.proj.w", d, 4 * d);
            b.mlp_proj_b = add(h + "mlp.proj.b", 0, d);
            blocks_.push_back(b);
        }
        lnf_g_ = add("ln_f.g", 0, d);
        lnf_b_ = add("ln_f.b", 0, d);
        head_ = c.tied ? wte_ : add("head.w", c.vocab, d, loco::tags::head);
    }

    const model_config& config() const noexcept { return cfg_; }
    const std::vector<tensor_spec>& tensors() const noexcept { return specs_; }
    std::size_t total() const noexcept { return total_; }
    std::size_t wte() const noexcept { return wte_; }
    std::size_t wpe() const noexcept { return wpe_; }
    std::size_t lnf_g() const noexcept { return lnf_g_; }
    std::size_t lnf_b() const noexcept { return lnf_b_; }
    std::size_t head() const noexcept { return head_; }
    const block_offsets& block(std::size_t l) const { return blocks_[l]; }

private:
    std::size_t add(std::string name, std::size_t rows, std::size_t cols,
                    loco::parameter_tag tag = loco::tags::none) {
        tensor_spec s{std::move(name), total_, rows, cols, tag};
        total_ += s.size();
        specs_.push_back(std::move(s));
        return specs_.back().offset;
    }

    model_config cfg_;
    std::vector<tensor_spec> specs_;
    std::vector<block_offsets> blocks_;
    std::size_t total_ = 0;
    std::size_t wte_ = 0, wpe_ = 0, lnf_g_ = 0, lnf_b_ = 0, head_ = 0;
};

// The layer a tensor belongs to, for Streaming DiLoCo's fragments (fragments are whole layers):
// block l's tensors ("h<l>.*") are layer l, the embeddings ride with the first block and the
// final layer norm and the head with the last one.
inline std::size_t layer_of(std::string_view name, std::size_t layers) {
    if (name.starts_with("h")) {
        std::size_t l = 0;
        std::size_t i = 1;
        for (; i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i) {
            l = l * 10 + static_cast<std::size_t>(name[i] - '0');
        }
        if (i > 1 && i < name.size() && name[i] == '.') return l;
    }
    if (name.starts_with("ln_f.") || name.starts_with("head.")) {
        return layers == 0 ? 0 : layers - 1;
    }
    return 0;  // wte, wpe
}

// GPT-2's initialisation: N(0, 0.02) weights, the two residual projections of each block scaled
// by 1/sqrt(2L), zero biases, unit layer-norm gains. Deterministic in the seed.
template <class T>
void initialise(const layout& lay, std::span<T> params, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const double residual_scale = 1.0 / std::sqrt(2.0 * static_cast<double>(lay.config().layers));
    for (const tensor_spec& s : lay.tensors()) {
        T* p = params.data() + s.offset;
        const bool gain = s.name.ends_with(".g");
        if (s.rows == 0) {
            std::fill(p, p + s.size(), gain ? T(1) : T(0));
            continue;
        }
        const bool residual = s.name.ends_with("proj.w");
        std::normal_distribution<double> normal(0.0, 0.02 * (residual ? residual_scale : 1.0));
        for (std::size_t i = 0; i < s.size(); ++i) p[i] = static_cast<T>(normal(rng));
    }
}

// The role a tensor has for loco's selectors (groups.hpp): the embeddings and the untied head
// by their tags, every other 2-D weight a hidden matrix (Muon's, with --inner muon), biases and
// layer-norm parameters vectors. Given explicitly, so that loco never routes on a shape guess
// (which it warns about).
inline loco::role role_for(const tensor_spec& s) noexcept {
    if (s.tag == loco::tags::embedding) return loco::role::embedding;
    if (s.tag == loco::tags::head) return loco::role::head;
    return s.rows == 0 ? loco::role::vector : loco::role::matrix;
}

// The parameters of a float model as loco sees them: one entry per tensor, matrices with their
// 2-D shape, each with its role (role_for), the embeddings and the untied head also tagged.
inline loco::parameter_list register_parameters(const layout& lay, float* params, float* grads) {
    loco::parameter_list list;
    for (const tensor_spec& s : lay.tensors()) {
        const loco::parameter_options how{.role = role_for(s), .tag = s.tag};
        if (s.rows == 0) {
            list.add_views(s.name, loco::host_tensor(params + s.offset, s.cols),
                           loco::host_tensor(static_cast<const float*>(grads + s.offset), s.cols),
                           how);
        } else {
            list.add_views(s.name, loco::host_matrix(params + s.offset, s.rows, s.cols),
                           loco::host_matrix(static_cast<const float*>(grads + s.offset), s.rows,
                                             s.cols),
                           how);
        }
    }
    return list;
}

// Activations of one forward pass, kept for the backward pass, and the work arrays.
template <class T>
struct activations {
    struct block {
        std::vector<T> in, ln1, ln1_mean, ln1_rstd, qkv, probs, att, mid, ln2, ln2_mean,
            ln2_rstd, fc, gelu;
    };
    std::vector<block> blocks;
    std::vector<T> out, lnf, lnf_mean, lnf_rstd, logits;
    // backward
    std::vector<T> dx, dmid, dln, dqkv, datt, dfc, dgelu, dlnf;
    std::vector<T> scratch;
    attention_scratch<T> attn;
};

// The model over a parameter array and a gradient array the caller owns (so that loco's views
// and the trainer's all-reduce see the same memory). Not copyable: the views would dangle.
template <class T>
class model {
public:
    explicit model(const layout& lay) : lay_(&lay) {}
    model(const model&) = delete;
    model& operator=(const model&) = delete;

    const layout& shape() const noexcept { return *lay_; }

    // Mean next-byte cross-entropy of `batch` sequences: tokens[b*T + t] predicts
    // targets[b*T + t]. With `gradient`, keeps what backward() needs.
    double forward(const T* params, const std::uint8_t* tokens, const std::uint8_t* targets,
                   std::size_t batch, bool gradient) {
        const model_config& c = lay_->config();
        const std::size_t t_len = c.context, d = c.dim, n = batch * t_len;
        batch_ = batch;
        tokens_ = tokens;
        a_.blocks.resize(c.layers);
        a_.out.resize(n * d);
        // Embeddings.
        std::vector<T>& x0 = a_.blocks[0].in;
        x0.resize(n * d);
        for (std::size_t i = 0; i < n; ++i) {
            const T* te = params + lay_->wte() + tokens[i] * d;
            const T* pe = params + lay_->wpe() + (i % t_len) * d;
            for (std::size_t j = 0; j < d; ++j) x0[i * d + j] = te[j] + pe[j];
        }
        for (std::size_t l = 0; l < c.layers; ++l) {
            const block_offsets& o = lay_->block(l);
            auto& b = a_.blocks[l];
            std::vector<T>& next = l + 1 < c.layers ? a_.blocks[l + 1].in : a_.out;
            resize(b, n, batch);
            next.resize(n * d);
            layer_norm_forward(b.ln1.data(), b.ln1_mean.data(), b.ln1_rstd.data(), b.in.data(),
                               params + o.ln1_g, params + o.ln1_b, n, d);
            linear_forward(b.qkv.data(), b.ln1.data(), params + o.qkv_w, params + o.qkv_b, n, d,
                           3 * d, a_.scratch);
            attention_forward(b.att.data(), b.probs.data(), b.qkv.data(), batch, t_len, d, c.heads,
                              a_.attn);
            linear_forward(b.mid.data(), b.att.data(), params + o.attn_proj_w,
                           params + o.attn_proj_b, n, d, d, a_.scratch);
            for (std::size_t i = 0; i < n * d; ++i) b.mid[i] += b.in[i];
            layer_norm_forward(b.ln2.data(), b.ln2_mean.data(), b.ln2_rstd.data(), b.mid.data(),
                               params + o.ln2_g, params + o.ln2_b, n, d);
            linear_forward(b.fc.data(), b.ln2.data(), params + o.fc_w, params + o.fc_b, n, d,
                           4 * d, a_.scratch);
            gelu_forward(b.gelu.data(), b.fc.data(), n * 4 * d);
            linear_forward(next.data(), b.gelu.data(), params + o.mlp_proj_w,
                           params + o.mlp_proj_b, n, 4 * d, d, a_.scratch);
            for (std::size_t i = 0; i < n * d; ++i) next[i] += b.mid[i];
        }
        a_.lnf.resize(n * d);
        a_.lnf_mean.resize(n);
        a_.lnf_rstd.resize(n);
        layer_norm_forward(a_.lnf.data(), a_.lnf_mean.data(), a_.lnf_rstd.data(), a_.out.data(),
                           params + lay_->lnf_g(), params + lay_->lnf_b(), n, d);
        a_.logits.resize(n * c.vocab);
        linear_forward(a_.logits.data(), a_.lnf.data(), params + lay_->head(),
                       static_cast<const T*>(nullptr), n, d, c.vocab, a_.scratch);
        return cross_entropy(a_.logits.data(), targets, n, c.vocab, gradient);
    }

    // Writes the gradient of the last forward(…, gradient = true) loss into grads (all of it:
    // the array is zeroed first).
    void backward(const T* params, T* grads) {
        const model_config& c = lay_->config();
        const std::size_t t_len = c.context, d = c.dim, n = batch_ * t_len;
        std::fill(grads, grads + lay_->total(), T(0));
        // a_.logits holds dloss/dlogits after a forward with gradient.
        a_.dlnf.assign(n * d, T(0));
        linear_backward(a_.dlnf.data(), grads + lay_->head(), static_cast<T*>(nullptr),
                        a_.logits.data(), a_.lnf.data(), params + lay_->head(), n, d, c.vocab,
                        a_.scratch);
        a_.dx.assign(n * d, T(0));  // dloss/d(residual stream), walked back block by block
        layer_norm_backward(a_.dx.data(), grads + lay_->lnf_g(), grads + lay_->lnf_b(),
                            a_.dlnf.data(), a_.out.data(), a_.lnf_mean.data(), a_.lnf_rstd.data(),
                            params + lay_->lnf_g(), n, d);
        for (std::size_t l = c.layers; l-- > 0;) {
            const block_offsets& o = lay_->block(l);
            auto& b = a_.blocks[l];
            // next = mid + mlp(ln2(mid))
            a_.dmid = a_.dx;
            a_.dgelu.assign(n * 4 * d, T(0));
            linear_backward(a_.dgelu.data(), grads + o.mlp_proj_w, grads + o.mlp_proj_b,
                            a_.dx.data(), b.gelu.data(), params + o.mlp_proj_w, n, 4 * d, d,
                            a_.scratch);
            a_.dfc.assign(n * 4 * d, T(0));
            gelu_backward(a_.dfc.data(), a_.dgelu.data(), b.fc.data(), n * 4 * d);
            a_.dln.assign(n * d, T(0));
            linear_backward(a_.dln.data(), grads + o.fc_w, grads + o.fc_b, a_.dfc.data(),
                            b.ln2.data(), params + o.fc_w, n, d, 4 * d, a_.scratch);
            layer_norm_backward(a_.dmid.data(), grads + o.ln2_g, grads + o.ln2_b, a_.dln.data(),
                                b.mid.data(), b.ln2_mean.data(), b.ln2_rstd.data(),
                                params + o.ln2_g, n, d);
            // mid = in + attn(ln1(in))
            a_.dx = a_.dmid;
            a_.datt.assign(n * d, T(0));
            linear_backward(a_.datt.data(), grads + o.attn_proj_w, grads + o.attn_proj_b,
                            a_.dmid.data(), b.att.data(), params + o.attn_proj_w, n, d, d,
                            a_.scratch);
            a_.dqkv.assign(n * 3 * d, T(0));
            attention_backward(a_.dqkv.data(), a_.datt.data(), b.qkv.data(), b.probs.data(),
                               batch_, t_len, d, c.heads, a_.attn);
            a_.dln.assign(n * d, T(0));
            linear_backward(a_.dln.data(), grads + o.qkv_w, grads + o.qkv_b, a_.dqkv.data(),
                            b.ln1.data(), params + o.qkv_w, n, d, 3 * d, a_.scratch);
            layer_norm_backward(a_.dx.data(), grads + o.ln1_g, grads + o.ln1_b, a_.dln.data(),
                                b.in.data(), b.ln1_mean.data(), b.ln1_rstd.data(),
                                params + o.ln1_g, n, d);
        }
        // Embeddings: a token's row collects every position it appears at.
        for (std::size_t i = 0; i < n; ++i) {
            T* te = grads + lay_->wte() + tokens_[i] * d;
            T* pe = grads + lay_->wpe() + (i % t_len) * d;
            for (std::size_t j = 0; j < d; ++j) {
                te[j] += a_.dx[i * d + j];
                pe[j] += a_.dx[i * d + j];
            }
        }
    }

private:
    void resize(typename activations<T>::block& b, std::size_t n, std::size_t batch) {
        const model_config& c = lay_->config();
        const std::size_t d = c.dim;
        b.ln1.resize(n * d);
        b.ln1_mean.resize(n);
        b.ln1_rstd.resize(n);
        b.qkv.resize(n * 3 * d);
        b.probs.resize(batch * c.heads * c.context * c.context);
        b.att.resize(n * d);
        b.mid.resize(n * d);
        b.ln2.resize(n * d);
        b.ln2_mean.resize(n);
        b.ln2_rstd.resize(n);
        b.fc.resize(n * 4 * d);
        b.gelu.resize(n * 4 * d);
    }

    const layout* lay_;
    activations<T> a_;
    std::size_t batch_ = 0;
    const std::uint8_t* tokens_ = nullptr;
};

}  // namespace gpt
