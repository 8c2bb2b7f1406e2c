#pragma once
// Plain double-precision re-implementations of the chunking, DCT and top-k rules of DeMo, DisTrO
// and SparseLoCo, written from the reference code (bloc97/DeMo demo.py; PsycheFoundation/psyche
// shared/modeling/src/distro.rs; tplr-ai/templar src/tplr/compress.py) rather than from
// include/loco/compress/, for the tests to compare against; and a bit-by-bit reader of the
// payloads' index streams written from their definition in docs/compressors.md.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <numbers>
#include <vector>

namespace loco_test::chunked {

// _get_divisors / _get_smaller_split: all divisors ascending; the last one <= target (n itself
// when every divisor is below target).
inline std::size_t side(std::size_t n, std::size_t target) {
    std::vector<std::size_t> divisors;
    for (std::size_t d = 1; d * d <= n; ++d) {
        if (n % d == 0) {
            divisors.push_back(d);
            if (d != n / d) {
                divisors.push_back(n / d);
            }
        }
    }
    std::sort(divisors.begin(), divisors.end());
    for (std::size_t i = 0; i < divisors.size(); ++i) {
        if (divisors[i] == target) {
            return target;
        }
        if (divisors[i] > target) {
            return i == 0 ? divisors[i] : divisors[i - 1];
        }
    }
    return n;
}

// The chunks of a rows x cols tensor ("(y h) (x w) -> y x (h w)"): for each chunk, the
// row-major positions of its cells, and the sides.
struct chunk_list {
    std::size_t h = 0;
    std::size_t w = 0;
    std::vector<std::vector<std::size_t>> cells;
};

inline chunk_list chunks(std::size_t rows, std::size_t cols, std::size_t target) {
    chunk_list out;
    out.h = side(rows, target);
    out.w = side(cols, target);
    for (std::size_t y = 0; y < rows / out.h; ++y) {
        for (std::size_t x = 0; x < cols / out.w; ++x) {
            std::vector<std::size_t> c;
            for (std::size_t r = 0; r < out.h; ++r) {
                for (std::size_t k = 0; k < out.w; ++k) {
                    c.push_back((y * out.h + r) * cols + x * out.w + k);
                }
            }
            out.cells.push_back(c);
        }
    }
    return out;
}

// Orthonormal DCT-II basis: coefficient k of the unit vector at position i, for size n.
inline double basis(std::size_t i, std::size_t k, std::size_t n) {
    const double scale = k == 0 ? std::sqrt(1.0 / n) : std::sqrt(2.0 / n);
    return scale * std::cos(std::numbers::pi * (2.0 * i + 1.0) * k / (2.0 * n));
}

// 2-D DCT of an h x w block (row-major), and its inverse.
inline std::vector<double> dct2(const std::vector<double>& x, std::size_t h, std::size_t w) {
    std::vector<double> out(h * w, 0.0);
    for (std::size_t b = 0; b < h; ++b) {
        for (std::size_t d = 0; d < w; ++d) {
            double s = 0;
            for (std::size_t r = 0; r < h; ++r) {
                for (std::size_t c = 0; c < w; ++c) {
                    s += x[r * w + c] * basis(r, b, h) * basis(c, d, w);
                }
            }
            out[b * w + d] = s;
        }
    }
    return out;
}

inline std::vector<double> idct2(const std::vector<double>& coef, std::size_t h, std::size_t w) {
    std::vector<double> out(h * w, 0.0);
    for (std::size_t r = 0; r < h; ++r) {
        for (std::size_t c = 0; c < w; ++c) {
            double s = 0;
            for (std::size_t b = 0; b < h; ++b) {
                for (std::size_t d = 0; d < w; ++d) {
                    s += coef[b * w + d] * basis(r, b, h) * basis(c, d, w);
                }
            }
            out[r * w + c] = s;
        }
    }
    return out;
}

// The k positions of largest |v| (NaN largest, ties to the lower position), ascending.
inline std::vector<std::size_t> top_k(const std::vector<double>& v, std::size_t k) {
    std::vector<std::size_t> order(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) {
        order[i] = i;
    }
    const auto larger = [&](std::size_t a, std::size_t b) {
        const bool na = std::isnan(v[a]);
        const bool nb = std::isnan(v[b]);
        return na != nb ? na : (!na && std::abs(v[a]) > std::abs(v[b]));
    };
    std::stable_sort(order.begin(), order.end(), larger);
    order.resize(k);
    std::sort(order.begin(), order.end());
    return order;
}

// The gap between the k-th and (k+1)-th largest magnitudes, relative to the k-th: a selection
// made from fp32 values agrees with the double one when this is well above fp32 rounding.
inline double selection_margin(const std::vector<double>& v, std::size_t k) {
    if (k >= v.size()) {
        return 1.0;
    }
    std::vector<double> m;
    for (const double a : v) {
        m.push_back(std::abs(a));
    }
    std::sort(m.begin(), m.end(), std::greater<>());
    return m[k - 1] == 0 ? 0.0 : (m[k - 1] - m[k]) / m[k - 1];
}

// How a chunk's k ascending indices of `cells` cells travel (docs/compressors.md, "Payload"):
// fixed width b = ceil(log2 cells); or, for the compact coding, nothing when k = cells, else the
// smaller of Elias-Fano (l = floor(log2(cells / k)) low bits an index, then k + ((cells - 1) >> l)
// unary high bits) and k b.
struct index_form {
    std::size_t bits = 0;  // per chunk
    int how = 0;           // 0: fixed width (l = b), 1: Elias-Fano, 2: nothing
    unsigned l = 0;
};

inline index_form index_form_of(bool compact, std::size_t cells, std::size_t k) {
    unsigned b = 0;
    while ((std::size_t{1} << b) < cells) ++b;
    if (!compact) return {k * b, 0, b};
    if (k == cells) return {0, 2, 0};
    unsigned l = 0;
    while ((std::size_t{2} << l) <= cells / k) ++l;
    const std::size_t ef = k * l + k + ((cells - 1) >> l);
    return ef < k * b ? index_form{ef, 1, l} : index_form{k * b, 0, b};
}

// Index j of chunk c of a stream of such chunks, read bit by bit (bit i of the stream is bit
// i % 8 of byte i / 8); 0xffffffff when the high part has fewer than j + 1 ones.
inline std::uint32_t index_at(const std::byte* s, const index_form& f, std::size_t k,
                              std::size_t c, std::size_t j) {
    const auto bit = [&](std::size_t i) {
        return (static_cast<unsigned>(s[i / 8]) >> (i % 8)) & 1u;
    };
    if (f.how == 2) return static_cast<std::uint32_t>(j);
    const std::size_t start = c * f.bits;
    std::uint32_t low = 0;
    for (unsigned b = 0; b < f.l; ++b) low |= bit(start + j * f.l + b) << b;
    if (f.how == 0) return low;
    for (std::size_t p = 0, ones = 0; start + k * f.l + p < start + f.bits; ++p) {
        if (bit(start + k * f.l + p) != 0 && ones++ == j) {
            return static_cast<std::uint32_t>(((p - j) << f.l) | low);
        }
    }
    return 0xffffffffu;  // never equal to an expected index
}

// Bytes of a stream of `chunks` such chunks, padded to a multiple of 4.
inline std::size_t index_stream_bytes(const index_form& f, std::size_t chunks) {
    return ((chunks * f.bits + 7) / 8 + 3) / 4 * 4;
}

}  // namespace loco_test::chunked
