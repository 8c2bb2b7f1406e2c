// The host GEMM of Muon (loco::linalg::gram_tn, loco::linalg::right_multiply) on every small
// shape and on shapes that are not multiples of its blocking, each array placed so that it ends
// exactly where an inaccessible page begins: a read or write one float past it faults.
//
// tests/CMakeLists.txt builds this file twice, apart from loco_tests:
//   * at -O3 -march=native without sanitizers: g++ 12 compiled the old micro-kernel's k loop so
//     that it read up to three rows of A past the panel with AVX2 or AVX-512, which only a
//     guard page catches (AddressSanitizer's instrumentation changes what g++ vectorises, and
//     the over-read vanishes under it);
//   * at -O3 -march=native with AddressSanitizer and UBSan, for mistakes in the blocking itself
//     (a tile or a row block that reaches past an edge), which ASan catches with or without
//     the optimiser.
// Every product is compared against a double-precision product computed here.
#include <doctest/doctest.h>

#include "../support/compare.hpp"
#include "../support/random.hpp"

#include <loco/linalg/gemm.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>
#include <vector>

#if __has_include(<sys/mman.h>) && __has_include(<unistd.h>)
#include <sys/mman.h>
#include <unistd.h>
#define LOCO_TEST_GUARD_PAGES 1
#endif

namespace {

using namespace loco_test;

// `size` floats that end exactly at an inaccessible page (where the system has mmap; elsewhere a
// heap array of exactly that size, which only ASan guards).
class exact_buffer {
public:
    explicit exact_buffer(std::size_t n) : size_(n) {
#ifdef LOCO_TEST_GUARD_PAGES
        const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
        const std::size_t bytes = std::max<std::size_t>(n, 1) * sizeof(float);
        const std::size_t pages = (bytes + page - 1) / page;
        mapped_bytes_ = (pages + 1) * page;
        void* base =
            mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        REQUIRE(base != MAP_FAILED);
        base_ = static_cast<char*>(base);
        REQUIRE(mprotect(base_ + pages * page, page, PROT_NONE) == 0);
        data_ = reinterpret_cast<float*>(base_ + pages * page - bytes);
#else
        owned_.resize(std::max<std::size_t>(n, 1));
        data_ = owned_.data();
#endif
    }
    exact_buffer(const exact_buffer&) = delete;
    exact_buffer& operator=(const exact_buffer&) = delete;
    ~exact_buffer() {
#ifdef LOCO_TEST_GUARD_PAGES
        munmap(base_, mapped_bytes_);
#endif
    }
    float* get() const { return data_; }
    float& operator[](std::size_t i) const { return data_[i]; }
    std::size_t size() const { return size_; }

private:
    std::size_t size_;
    float* data_ = nullptr;
#ifdef LOCO_TEST_GUARD_PAGES
    char* base_ = nullptr;
    std::size_t mapped_bytes_ = 0;
#else
    std::vector<float> owned_;
#endif
};

void fill_random(std::mt19937_64& rng, const exact_buffer& b) {
    const std::vector<float> v = normal_floats(rng, b.size());
    std::copy(v.begin(), v.end(), b.get());
}

// Shapes: every (n, m) up to 17 on both sides, then shapes just around the blocking (gemm_kc =
// 128 rows per panel, 64 rows per right_multiply block, tiles of 4 x 8) with odd remainders.
std::vector<std::pair<std::size_t, std::size_t>> shapes() {
    std::vector<std::pair<std::size_t, std::size_t>> s;
    for (std::size_t n = 1; n <= 17; ++n)
        for (std::size_t m = 1; m <= 17; ++m) s.emplace_back(n, m);
    const std::size_t tall[] = {63, 65, 127, 129, 130, 131, 193, 257};
    const std::size_t wide[] = {9, 31, 33, 63, 65, 127, 129, 131};
    for (const std::size_t n : tall)
        for (const std::size_t m : wide) s.emplace_back(n, m);
    return s;
}

// The relative tolerance of an fp32 dot product of k terms against its double value, per unit
// of the sum of |terms|: k * eps is the textbook bound; the checks below use it directly.
double dot_tolerance(std::size_t k) { return 4.0 * static_cast<double>(k + 1) * 6e-8; }

TEST_CASE("linalg::gram_tn: t^T t on odd shapes reads and writes only its arrays, and matches "
          "double precision") {
    auto rng = rng_for("gemm_overread gram_tn");
    for (const auto& shape : shapes()) {
        const std::size_t n = shape.first;
        const std::size_t m = shape.second;
        INFO("t is " << n << " x " << m);
        const exact_buffer t(n * m);
        fill_random(rng, t);
        const exact_buffer c(m * m);
        loco::linalg::gram_tn(n, m, t.get(), c.get());

        mismatch_log log;
        for (std::size_t i = 0; i < m; ++i) {
            for (std::size_t j = 0; j < m; ++j) {
                double want = 0.0, magnitude = 0.0;
                for (std::size_t k = 0; k < n; ++k) {
                    const double term = static_cast<double>(t[k * m + i]) * t[k * m + j];
                    want += term;
                    magnitude += std::abs(term);
                }
                const double got = c[i * m + j];
                log.expect_close(got / std::max(1.0, magnitude), want / std::max(1.0, magnitude),
                                 dot_tolerance(n), [&](auto& s) {
                                     s << n << " x " << m << " (" << i << ", " << j << ")";
                                 });
            }
        }
        log.check();
    }
}

TEST_CASE("linalg::right_multiply: alpha t + t s on odd shapes reads and writes only its "
          "arrays, and matches double precision") {
    auto rng = rng_for("gemm_overread right_multiply");
    for (const auto& shape : shapes()) {
        const std::size_t n = shape.first;
        const std::size_t m = shape.second;
        INFO("t is " << n << " x " << m << ", s is " << m << " x " << m);
        const exact_buffer t0(n * m);
        fill_random(rng, t0);
        const exact_buffer s(m * m);
        fill_random(rng, s);
        const exact_buffer t(n * m);
        std::copy(t0.get(), t0.get() + n * m, t.get());
        const exact_buffer scratch(loco::linalg::right_multiply_scratch(m));
        const float alpha = 0.75f;
        loco::linalg::right_multiply(n, m, t.get(), alpha, s.get(), scratch.get());

        mismatch_log log;
        for (std::size_t i = 0; i < n; ++i) {
            for (std::size_t j = 0; j < m; ++j) {
                double want = alpha * static_cast<double>(t0[i * m + j]);
                double magnitude = std::abs(want);
                for (std::size_t k = 0; k < m; ++k) {
                    const double term = static_cast<double>(t0[i * m + k]) * s[k * m + j];
                    want += term;
                    magnitude += std::abs(term);
                }
                const double got = t[i * m + j];
                log.expect_close(got / std::max(1.0, magnitude), want / std::max(1.0, magnitude),
                                 dot_tolerance(m), [&](auto& out) {
                                     out << n << " x " << m << " (" << i << ", " << j << ")";
                                 });
            }
        }
        log.check();
    }
}

}  // namespace
