#pragma once
// A model on the device for the kernel tests: tensors of chosen sizes and dtypes placed in two
// arenas (values, gradients), some deliberately misaligned, filled with fresh random data, with
// the host copies the oracle works on; and comparisons that report the first mismatches.

#include "../support/random.hpp"

#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/float16.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace loco_test {

namespace lc = loco::backend::cuda;
using lc::dtype;

struct tensor_shape {
    std::size_t size = 0;
    dtype value = dtype::f32;
    dtype grad = dtype::f32;
    std::size_t value_shift = 0;  // elements past a 256-byte boundary: misaligned when != 0 mod 8
    std::size_t grad_shift = 0;
};

inline float round_to(dtype t, float x) {
    return t == dtype::f32 ? x : loco::bf16::from_float(x).to_float();
}

// The awkward model of the brief: sizes 1, 3 and 1000003, empty tensors, misaligned views, and
// `many` small tensors of random sizes (some empty), with dtypes chosen by `pick`.
template <class Pick>
std::vector<tensor_shape> awkward_shapes(std::mt19937_64& rng, std::size_t many, Pick&& pick,
                                         bool include_large = true) {
    std::vector<tensor_shape> shapes;
    const auto add = [&](std::size_t n, std::size_t vshift, std::size_t gshift) {
        tensor_shape s;
        s.size = n;
        pick(rng, s);
        s.value_shift = vshift;
        s.grad_shift = gshift;
        shapes.push_back(s);
    };
    add(1, 0, 0);
    add(3, 0, 0);
    add(0, 0, 0);
    if (include_large) {
        add(1000003, 0, 0);
    }
    add(4099, 1, 0);   // misaligned value
    add(2053, 0, 3);   // misaligned gradient
    add(0, 0, 0);
    add(16384 * 2 + 5, 5, 7);  // misaligned both, spans several blocks
    add(8, 0, 0);
    std::uniform_int_distribution<std::size_t> size(0, 300);
    std::uniform_int_distribution<int> coin(0, 9);
    for (std::size_t i = 0; i < many; ++i) {
        const std::size_t n = coin(rng) == 0 ? 0 : size(rng);
        add(n, coin(rng) == 1 ? 1 : 0, coin(rng) == 2 ? 2 : 0);
    }
    return shapes;
}

inline auto all_f32 = [](std::mt19937_64&, tensor_shape& s) {
    s.value = dtype::f32;
    s.grad = dtype::f32;
};
inline auto all_bf16 = [](std::mt19937_64&, tensor_shape& s) {
    s.value = dtype::bf16;
    s.grad = dtype::bf16;
};
inline auto mixed_dtypes = [](std::mt19937_64& rng, tensor_shape& s) {
    std::uniform_int_distribution<int> d(0, 3);
    const int k = d(rng);
    s.value = (k & 1) ? dtype::bf16 : dtype::f32;
    s.grad = (k & 2) ? dtype::bf16 : dtype::f32;
};

class device_model {
public:
    explicit device_model(std::vector<tensor_shape> shapes) : shapes_(std::move(shapes)) {
        std::size_t vbytes = 0;
        std::size_t gbytes = 0;
        for (const auto& s : shapes_) {
            flat_.push_back(total_);
            total_ += s.size;
            value_at_.push_back(vbytes + s.value_shift * lc::size_of(s.value));
            grad_at_.push_back(gbytes + s.grad_shift * lc::size_of(s.grad));
            vbytes += round256((s.size + s.value_shift) * lc::size_of(s.value));
            gbytes += round256((s.size + s.grad_shift) * lc::size_of(s.grad));
        }
        values_dev_ = lc::device_buffer<std::byte>(vbytes + 256);
        grads_dev_ = lc::device_buffer<std::byte>(gbytes + 256);
        values_dev_.zero();
        grads_dev_.zero();
        lc::detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize", __FILE__, __LINE__);
        values_.assign(total_, 0.0f);
        grads_.assign(total_, 0.0f);
    }

    std::size_t size() const { return shapes_.size(); }
    std::size_t total() const { return total_; }
    const tensor_shape& shape(std::size_t i) const { return shapes_[i]; }
    std::size_t flat(std::size_t i) const { return flat_[i]; }
    void* value_ptr(std::size_t i) const { return values_dev_.get() + value_at_[i]; }
    void* grad_ptr(std::size_t i) const { return grads_dev_.get() + grad_at_[i]; }
    // The dtype of flat element k's tensor.
    template <class F>
    void for_each_tensor(F&& f) const {
        for (std::size_t i = 0; i < shapes_.size(); ++i) {
            f(i, shapes_[i], flat_[i]);
        }
    }

    std::vector<lc::tensor_spec> specs(bool with_grads = true) const {
        std::vector<lc::tensor_spec> out;
        for (std::size_t i = 0; i < shapes_.size(); ++i) {
            const auto& s = shapes_[i];
            // (Not "t" + std::to_string(i): GCC 12 warns falsely on that form, -Wrestrict.)
            std::string name = std::to_string(i);
            name.insert(name.begin(), 't');
            out.push_back({std::move(name), value_ptr(i), s.value,
                           with_grads ? grad_ptr(i) : nullptr, s.grad, s.size});
        }
        return out;
    }
    lc::tensor_table table(bool with_grads = true) const {
        return lc::tensor_table(specs(with_grads));
    }

    // Host copies (every element representable in its tensor's dtype).
    std::vector<float>& values() { return values_; }
    const std::vector<float>& values() const { return values_; }
    std::vector<float>& grads() { return grads_; }
    const std::vector<float>& grads() const { return grads_; }

    // No byte of either arena outside the tensors was written (they were uploaded as zeros).
    bool gaps_untouched() const {
        return gaps_zero(values_dev_, value_at_, true) && gaps_zero(grads_dev_, grad_at_, false);
    }

    void randomize_values(std::mt19937_64& rng, float stddev = 1.0f) {
        values_ = normal_floats(rng, total_, stddev);
        for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t off) {
            for (std::size_t k = 0; k < s.size; ++k) {
                values_[off + k] = round_to(s.value, values_[off + k]);
            }
        });
        upload_values();
    }
    void randomize_grads(std::mt19937_64& rng, float stddev = 0.5f) {
        grads_ = normal_floats(rng, total_, stddev);
        for_each_tensor([&](std::size_t, const tensor_shape& s, std::size_t off) {
            for (std::size_t k = 0; k < s.size; ++k) {
                grads_[off + k] = round_to(s.grad, grads_[off + k]);
            }
        });
        upload_grads();
    }

    void upload_values() { upload(values_, values_dev_, value_at_, true, nullptr); }
    void upload_grads(cudaStream_t s = nullptr) { upload(grads_, grads_dev_, grad_at_, false, s); }
    std::vector<float> download_values() const {
        return download(values_dev_, value_at_, true);
    }
    std::vector<float> download_grads() const { return download(grads_dev_, grad_at_, false); }

private:
    bool gaps_zero(const lc::device_buffer<std::byte>& dev, const std::vector<std::size_t>& at,
                   bool values) const {
        const auto bytes = dev.download();
        std::vector<bool> inside(bytes.size(), false);
        for_each_tensor([&](std::size_t i, const tensor_shape& s, std::size_t) {
            const std::size_t n = s.size * lc::size_of(values ? s.value : s.grad);
            for (std::size_t b = 0; b < n; ++b) {
                inside[at[i] + b] = true;
            }
        });
        for (std::size_t b = 0; b < bytes.size(); ++b) {
            if (!inside[b] && bytes[b] != std::byte{0}) {
                return false;
            }
        }
        return true;
    }

    static std::size_t round256(std::size_t b) { return (b + 255) / 256 * 256; }

    void upload(const std::vector<float>& host, lc::device_buffer<std::byte>& dev,
                const std::vector<std::size_t>& at, bool values, cudaStream_t stream) {
        staging_.assign(dev.size(), std::byte{0});
        for_each_tensor([&](std::size_t i, const tensor_shape& s, std::size_t off) {
            const dtype t = values ? s.value : s.grad;
            for (std::size_t k = 0; k < s.size; ++k) {
                std::byte* p = staging_.data() + at[i] + k * lc::size_of(t);
                if (t == dtype::f32) {
                    std::memcpy(p, &host[off + k], 4);
                } else {
                    const auto b = loco::bf16::from_float(host[off + k]);
                    std::memcpy(p, &b.bits, 2);
                }
            }
        });
        // Pageable source: staged by CUDA before the call returns, so staging_ may change.
        lc::detail::check(cudaMemcpyAsync(dev.get(), staging_.data(), dev.size(),
                                          cudaMemcpyHostToDevice, stream),
                          "cudaMemcpyAsync(model upload)", __FILE__, __LINE__);
        if (stream == nullptr) {
            lc::detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize", __FILE__,
                              __LINE__);
        }
    }

    std::vector<float> download(const lc::device_buffer<std::byte>& dev,
                                const std::vector<std::size_t>& at, bool values) const {
        const auto bytes = dev.download();
        std::vector<float> out(total_);
        for_each_tensor([&](std::size_t i, const tensor_shape& s, std::size_t off) {
            const dtype t = values ? s.value : s.grad;
            for (std::size_t k = 0; k < s.size; ++k) {
                const std::byte* p = bytes.data() + at[i] + k * lc::size_of(t);
                if (t == dtype::f32) {
                    std::memcpy(&out[off + k], p, 4);
                } else {
                    loco::bf16 b;
                    std::memcpy(&b.bits, p, 2);
                    out[off + k] = b.to_float();
                }
            }
        });
        return out;
    }

    std::vector<tensor_shape> shapes_;
    std::vector<std::size_t> flat_;
    std::vector<std::size_t> value_at_;
    std::vector<std::size_t> grad_at_;
    std::size_t total_ = 0;
    lc::device_buffer<std::byte> values_dev_;
    lc::device_buffer<std::byte> grads_dev_;
    std::vector<float> values_;
    std::vector<float> grads_;
    std::vector<std::byte> staging_;
};

// Compares element-wise: |got - want| <= tol * (|want| + floor), where floor is the mean absolute
// value of `want` (so that elements near zero are held to the array's scale, not to 1). NaN never
// passes unless both are NaN. Reports the first mismatches and the count.
inline void expect_close_arrays(const std::vector<float>& got, const std::vector<float>& want,
                                double tol, const std::string& what) {
    REQUIRE_MESSAGE(got.size() == want.size(), what << ": sizes differ");
    double scale = 0.0;
    for (const float w : want) {
        scale += std::isfinite(w) ? std::abs(double(w)) : 0.0;
    }
    scale = want.empty() ? 0.0 : scale / double(want.size());
    std::size_t bad = 0;
    std::ostringstream first;
    for (std::size_t i = 0; i < got.size(); ++i) {
        const double g = got[i], w = want[i];
        const bool both_nan = std::isnan(g) && std::isnan(w);
        const bool ok = both_nan || std::abs(g - w) <= tol * (std::abs(w) + scale);
        if (!ok && bad++ < 5) {
            first << "  [" << i << "] got " << g << ", want " << w << "\n";
        }
    }
    INFO(what << ": " << bad << " of " << got.size() << " elements differ beyond " << tol
              << " (scale " << scale << "); first:\n"
              << first.str());
    CHECK(bad == 0);
}

// Bit-for-bit equality.
inline void expect_equal_arrays(const std::vector<float>& got, const std::vector<float>& want,
                                const std::string& what) {
    REQUIRE_MESSAGE(got.size() == want.size(), what << ": sizes differ");
    std::size_t bad = 0;
    std::ostringstream first;
    for (std::size_t i = 0; i < got.size(); ++i) {
        if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && bad++ < 5) {
            first << "  [" << i << "] got " << got[i] << ", want " << want[i] << "\n";
        }
    }
    INFO(what << ": " << bad << " of " << got.size() << " elements differ; first:\n"
              << first.str());
    CHECK(bad == 0);
}

}  // namespace loco_test
