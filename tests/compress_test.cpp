// Tests of the pseudo-gradient compressors (include/loco/compress/) and of the 16-bit float
// conversions they use (include/loco/float16.hpp).
//
//   * float16: every bit pattern round-trips; float -> 16 bits rounds like a reference that picks
//     the nearer of the two exact neighbours (in double), on millions of random floats and on
//     every tie and its neighbours.
//   * conformance, for every configuration in compressor_cases: exact payload size, the wire
//     header, codes and values against a plain double-precision reference written here from each
//     header's definition, the documented error bound, determinism per (seed, round, rank), and
//     decode writing only inside the segments.
//   * per compressor: the reference vectors (algorithms.md T7, a per-row example by hand),
//     non-finite inputs, payloads that pass the checksum but break the format, unbiasedness of
//     stochastic rounding, and the size of 2-bit payloads.
#include <doctest/doctest.h>

#include "support/chunked_reference.hpp"
#include "support/payloads.hpp"
#include "support/random.hpp"

#include <loco/compress/blockwise.hpp>
#include <loco/compress/cast.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/demo.hpp>
#include <loco/compress/error_feedback.hpp>
#include <loco/compress/none.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/compress/statistical.hpp>
#include <loco/compress/topk.hpp>
#include <loco/compress/wire.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/random.hpp>

#include <boost/mp11.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <sstream>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace loco_test;
namespace lc = loco::compress;
namespace wire = loco::compress::wire;

// Collects failures (the first few with their text), so one bad rule reports one line, not
// thousands.
class findings {
public:
    void fail(const std::string& what) {
        if (count_++ < 5) {
            first_ += what + "\n";
        }
    }
    template <class... Parts>
    void expect(bool ok, const Parts&... parts) {
        ++checked_;
        if (!ok) {
            std::ostringstream s;
            (s << ... << parts);
            fail(s.str());
        }
    }
    void near_boundary() { ++ambiguous_; }
    std::size_t ambiguous() const { return ambiguous_; }
    std::size_t checked() const { return checked_; }
    void check() const {
        INFO(count_ << " of " << checked_ << " checks failed; first ones:\n" << first_);
        CHECK(count_ == 0);
    }

private:
    std::size_t count_ = 0;
    std::size_t checked_ = 0;
    std::size_t ambiguous_ = 0;
    std::string first_;
};

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
float float_of(std::uint32_t u) { return std::bit_cast<float>(u); }

// round_half_to_even of a double, spelled out (independent of the rounding mode).
double round_half_even(double t) {
    const double low = std::floor(t);
    const double frac = t - low;
    if (frac > 0.5) {
        return low + 1;
    }
    if (frac < 0.5) {
        return low;
    }
    return std::fmod(low, 2.0) == 0.0 ? low : low + 1;
}

// ================================================================================================
// 16-bit floats
// ================================================================================================

// A binary16-like format, described by its field widths; values come from ldexp on the fields,
// not from the code under test.
struct half_format {
    int exponent_bits;
    int fraction_bits;

    int bias() const { return (1 << (exponent_bits - 1)) - 1; }
    std::uint32_t inf_pattern() const { return ((1u << exponent_bits) - 1u) << fraction_bits; }
    std::uint32_t quiet_bit() const { return 1u << (fraction_bits - 1); }
    std::uint32_t sign_bit() const { return 1u << (exponent_bits + fraction_bits); }
    // The value of a non-negative pattern up to inf_pattern(), which counts as 2^(emax + 1): the
    // value an unbounded exponent would give it, which is what ties at the top round towards.
    double value(std::uint32_t p) const {
        const std::uint32_t e = p >> fraction_bits;
        const double m = static_cast<double>(p & ((1u << fraction_bits) - 1u));
        if (e == 0) {
            return std::ldexp(m, 1 - bias() - fraction_bits);
        }
        return std::ldexp(1.0 + std::ldexp(m, -fraction_bits), static_cast<int>(e) - bias());
    }
    std::vector<double> table() const {
        std::vector<double> t(inf_pattern() + 1);
        for (std::uint32_t p = 0; p <= inf_pattern(); ++p) {
            t[p] = value(p);
        }
        return t;
    }
    // Unit roundoff and the smallest subnormal step.
    double unit_roundoff() const { return std::ldexp(1.0, -fraction_bits - 1); }
    double smallest_step() const { return std::ldexp(1.0, 1 - bias() - fraction_bits); }
};

constexpr half_format bf16_format{8, 7};
constexpr half_format fp16_format{5, 10};

// The 16-bit pattern float f must become: the nearer neighbour, ties to the even pattern.
std::uint32_t reference_round(const half_format& fmt, const std::vector<double>& table, float f) {
    const std::uint32_t sign = std::signbit(f) ? fmt.sign_bit() : 0u;
    const double a = std::abs(static_cast<double>(f));
    if (a >= table.back()) {
        return sign | fmt.inf_pattern();
    }
    // table[p] <= a < table[p + 1]
    const auto above = std::upper_bound(table.begin(), table.end(), a);
    const auto p = static_cast<std::uint32_t>(above - table.begin() - 1);
    const double down = a - table[p];
    const double up = table[p + 1] - a;
    const std::uint32_t chosen = down < up ? p : (up < down ? p + 1 : (p % 2 == 0 ? p : p + 1));
    return sign | chosen;
}

template <class Half>
const half_format& format_of() {
    if constexpr (std::is_same_v<Half, loco::bf16>) {
        return bf16_format;
    } else {
        return fp16_format;
    }
}

template <class Half>
void check_rounding(const std::vector<double>& table, float f, findings& log) {
    const half_format& fmt = format_of<Half>();
    const std::uint32_t got = Half::from_float(f).bits;
    if (std::isnan(f)) {
        const bool nan = (got & ~fmt.sign_bit()) > fmt.inf_pattern();
        const bool quiet = (got & fmt.quiet_bit()) != 0;
        const bool sign = ((got & fmt.sign_bit()) != 0) == std::signbit(f);
        log.expect(nan && quiet && sign, "NaN 0x", std::hex, bits_of(f), " became 0x", got);
        return;
    }
    const std::uint32_t want = reference_round(fmt, table, f);
    log.expect(got == want, std::hexfloat, f, " (0x", std::hex, bits_of(f), ") became 0x", got,
               ", expected 0x", want);
}

// Every tie between two neighbouring patterns, the floats just beside it, and both signs.
template <class Half>
std::vector<float> boundary_floats(const std::vector<double>& table) {
    std::vector<float> out;
    for (std::size_t p = 0; p + 1 < table.size(); ++p) {
        const auto mid = static_cast<float>((table[p] + table[p + 1]) / 2);  // exact in float
        for (const float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f),
                              static_cast<float>(table[p])}) {
            out.push_back(f);
            out.push_back(-f);
        }
    }
    const float specials[] = {0.0f,
                              std::numeric_limits<float>::denorm_min(),
                              std::numeric_limits<float>::min(),
                              std::numeric_limits<float>::max(),
                              std::numeric_limits<float>::infinity(),
                              std::numeric_limits<float>::quiet_NaN(),
                              float_of(0x7f800001u),  // signalling NaN
                              float_of(0x7fbfffffu),
                              65504.0f,
                              65519.996f,
                              65520.0f,
                              65536.0f,
                              0x1p-24f,
                              0x1p-25f,
                              0x1.000002p-25f,
                              0x1p-14f,
                              0x1.ffcp-15f};
    for (const float f : specials) {
        out.push_back(f);
        out.push_back(-f);
    }
    return out;
}

TEST_CASE_TEMPLATE("16-bit floats: every pattern converts to float exactly and back unchanged",
                   Half, loco::bf16, loco::fp16) {
    const half_format& fmt = format_of<Half>();
    findings log;
    for (std::uint32_t p = 0; p <= 0xffffu; ++p) {
        const float f = Half{static_cast<std::uint16_t>(p)}.to_float();
        const std::uint32_t magnitude = p & ~fmt.sign_bit();
        const bool negative = (p & fmt.sign_bit()) != 0;
        if (magnitude < fmt.inf_pattern()) {
            const double want = (negative ? -1.0 : 1.0) * fmt.value(magnitude);
            log.expect(static_cast<double>(f) == want && std::signbit(f) == negative, "pattern 0x",
                       std::hex, p, " is ", std::hexfloat, f);
        } else if (magnitude == fmt.inf_pattern()) {
            log.expect(std::isinf(f) && std::signbit(f) == negative, "pattern 0x", std::hex, p,
                       " is not an infinity");
        } else {
            // NaN: sign and payload move to the top of the float's fraction.
            const std::uint32_t shift = 23u - static_cast<std::uint32_t>(fmt.fraction_bits);
            const std::uint32_t want = (negative ? 0x80000000u : 0u) | 0x7f800000u |
                                       ((magnitude & (fmt.quiet_bit() * 2 - 1)) << shift);
            log.expect(bits_of(f) == want, "NaN pattern 0x", std::hex, p, " is 0x", bits_of(f));
        }
        const std::uint32_t back = Half::from_float(f).bits;
        const bool signalling = magnitude > fmt.inf_pattern() && (p & fmt.quiet_bit()) == 0;
        // A signalling NaN comes back quiet (documented in float16.hpp); everything else unchanged.
        const std::uint32_t want_back = signalling ? p | fmt.quiet_bit() : p;
        log.expect(back == want_back, "pattern 0x", std::hex, p, " came back as 0x", back);
    }
    log.check();
    CHECK(log.checked() == 2 * 65536);
}

TEST_CASE_TEMPLATE("16-bit floats: float rounds to the nearer neighbour, ties to even", Half,
                   loco::bf16, loco::fp16) {
    const half_format& fmt = format_of<Half>();
    const std::vector<double> table = fmt.table();
    findings log;
    SUBCASE("every tie between neighbours, the floats beside it, and the special values") {
        for (const float f : boundary_floats<Half>(table)) {
            check_rounding<Half>(table, f, log);
        }
        CHECK(log.checked() > 250000);
    }
    SUBCASE("a million floats with uniformly random bit patterns, a million in the format's range") {
        auto rng = rng_for(std::string("float16 rounding ") +
                           (fmt.exponent_bits == 8 ? "bf16" : "fp16"));
        for (int i = 0; i < 1000000; ++i) {
            check_rounding<Half>(table, float_of(static_cast<std::uint32_t>(rng())), log);
        }
        // Exponents that the format's normal and subnormal ranges and its overflow cover.
        std::uniform_int_distribution<int> exponent(-fmt.bias() - fmt.fraction_bits - 2,
                                                    fmt.bias() + 2);
        std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
        for (int i = 0; i < 1000000; ++i) {
            const float f = std::ldexp(mantissa(rng), exponent(rng));
            check_rounding<Half>(table, (rng() & 1) != 0 ? f : -f, log);
        }
    }
    log.check();
}

// ================================================================================================
// Counter-based random numbers (random.hpp), which stochastic rounding draws from
// ================================================================================================

// splitmix64 (Steele, Lea and Flood; Vigna's reference implementation): the state advances by
// the golden-ratio increment and each output is mix64 of the new state. Its published outputs
// for the seeds 0 and 1234567 pin mix64.
TEST_CASE("random: mix64 is the splitmix64 finaliser (published splitmix64 outputs)") {
    const std::uint64_t golden = 0x9e3779b97f4a7c15ULL;
    const std::pair<std::uint64_t, std::array<std::uint64_t, 5>> published[] = {
        {0,
         {0xe220a8397b1dcdafULL, 0x6e789e6aa1b965f4ULL, 0x06c45d188009454fULL,
          0xf88bb8a8724c81ecULL, 0x1b39896a51a8749bULL}},
        {1234567,
         {6457827717110365317ULL, 3203168211198807973ULL, 9817491932198370423ULL,
          4593380528125082431ULL, 16408922859458223821ULL}}};
    for (const auto& [seed, outputs] : published) {
        std::uint64_t state = seed;
        for (const std::uint64_t want : outputs) {
            state += golden;
            CHECK(loco::random::mix64(state) == want);
        }
    }
    // bits(seed, stream, index): the stream's first splitmix64 output keys the seed, and the
    // index is added before the last mix (so a run's draws do not change between versions).
    auto rng = rng_for("random bits definition");
    for (int i = 0; i < 1000; ++i) {
        const std::uint64_t seed = rng();
        const std::uint64_t stream = rng() % 1000;
        const std::uint64_t index = rng() >> (rng() % 64);
        const std::uint64_t key = loco::random::mix64(stream + golden);
        CHECK(loco::random::bits(seed, stream, index) ==
              loco::random::mix64(loco::random::mix64(seed ^ key) + index));
    }
}

// Ranks, steps and elements must not share draws: neighbouring seeds (a rank's seed is often the
// base seed plus the rank), streams and indices give pairwise different 64-bit words.
TEST_CASE("random: neighbouring seeds, streams and indices never repeat a draw") {
    auto rng = rng_for("random bits distinct");
    const std::uint64_t base = rng() & ~std::uint64_t{3};  // seeds 4k .. 4k + 3
    std::vector<std::uint64_t> all;
    for (std::uint64_t seed = base; seed < base + 4; ++seed) {
        for (std::uint64_t stream = 0; stream < 64; ++stream) {
            for (std::uint64_t index = 0; index < 256; ++index) {
                all.push_back(loco::random::bits(seed, stream, index));
            }
        }
    }
    std::sort(all.begin(), all.end());
    CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());
}

// uniform(): the top 24 bits of the draw times 2^-24, so every value is k * 2^-24 with
// 0 <= k < 2^24 (never 1), and the values are uniform on [0, 1).
TEST_CASE("random: uniform is k * 2^-24 from the draw's top 24 bits, spread evenly below 1") {
    auto rng = rng_for("random uniform");
    const std::uint64_t seed = rng();
    const std::size_t n = 200000;
    double sum = 0.0;
    std::size_t below_half = 0;
    std::size_t bad = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const float u = loco::random::uniform(seed, 7, i);
        const double k = std::ldexp(static_cast<double>(u), 24);
        const auto top = static_cast<double>(loco::random::bits(seed, 7, i) >> 40);
        bad += !(k == top && u >= 0.0f && u < 1.0f);
        sum += u;
        below_half += u < 0.5f;
    }
    CHECK(bad == 0);
    // Mean 1/2 with standard deviation sqrt(1 / (12 n)); half of the values below 1/2.
    CHECK(std::abs(sum / double(n) - 0.5) < 5 * std::sqrt(1.0 / (12.0 * double(n))));
    CHECK(std::abs(double(below_half) / double(n) - 0.5) < 5 * std::sqrt(0.25 / double(n)));
}

// ================================================================================================
// Conformance cases
// ================================================================================================

template <class C>
struct simple_case {
    using type = C;
    static typename C::hyper hyper() { return {}; }
    static std::string label() { return std::string(C::name); }
};

template <int Bits, std::size_t Block, lc::scale_kind Scale, lc::rounding Round>
struct blockwise_case {
    using type = lc::blockwise<Bits, Block>;
    static constexpr std::size_t block = Block;
    static typename type::hyper hyper() { return {.scale = Scale, .round = Round}; }
    static std::string label() {
        return "blockwise<" + std::to_string(Bits) + ", " + std::to_string(Block) + "> " +
               (Scale == lc::scale_kind::absmax ? "absmax " : "mean_abs ") +
               (Round == lc::rounding::nearest ? "nearest" : "stochastic");
    }
};

template <int Bits, lc::granularity Per, float Range = 6.0f>
struct statistical_case {
    using type = lc::statistical<Bits>;
    static typename type::hyper hyper() { return {.per = Per, .range = Range}; }
    static std::string label() {
        return "statistical<" + std::to_string(Bits) + "> per " +
               (Per == lc::granularity::tensor ? "tensor" : "row") + ", range " +
               std::to_string(Range);
    }
};

template <float Ratio>
struct topk_case {
    using type = lc::topk;
    static typename type::hyper hyper() { return {.ratio = Ratio}; }
    static std::string label() { return "topk, ratio " + std::to_string(Ratio); }
};

constexpr auto absmax = lc::scale_kind::absmax;
constexpr auto mean_abs = lc::scale_kind::mean_abs;
constexpr auto nearest = lc::rounding::nearest;
constexpr auto stochastic = lc::rounding::stochastic;
constexpr auto per_tensor = lc::granularity::tensor;
constexpr auto per_row = lc::granularity::row;

using blockwise_cases = boost::mp11::mp_list<
    blockwise_case<1, 64, absmax, nearest>, blockwise_case<1, 64, absmax, stochastic>,
    blockwise_case<1, 64, mean_abs, nearest>, blockwise_case<1, 64, mean_abs, stochastic>,
    blockwise_case<2, 256, absmax, nearest>, blockwise_case<2, 256, absmax, stochastic>,
    blockwise_case<2, 256, mean_abs, nearest>, blockwise_case<2, 256, mean_abs, stochastic>,
    blockwise_case<4, 32, absmax, nearest>, blockwise_case<4, 32, absmax, stochastic>,
    blockwise_case<4, 32, mean_abs, nearest>, blockwise_case<4, 32, mean_abs, stochastic>,
    blockwise_case<8, 1000, absmax, nearest>, blockwise_case<8, 1000, absmax, stochastic>,
    blockwise_case<8, 1000, mean_abs, nearest>, blockwise_case<8, 1000, mean_abs, stochastic>,
    blockwise_case<2, 1, absmax, nearest>, blockwise_case<4, 7, mean_abs, stochastic>,
    blockwise_case<8, 4096, absmax, nearest>>;

using statistical_cases = boost::mp11::mp_list<
    statistical_case<1, per_tensor>, statistical_case<1, per_row>, statistical_case<2, per_tensor>,
    statistical_case<2, per_row>, statistical_case<4, per_tensor>, statistical_case<4, per_row>,
    statistical_case<8, per_tensor>, statistical_case<8, per_row>,
    statistical_case<2, per_row, 4.0f>>;

using other_cases =
    boost::mp11::mp_list<simple_case<lc::none>, simple_case<lc::cast<loco::bf16>>,
                         simple_case<lc::cast<loco::fp16>>, topk_case<0.02f>, topk_case<0.3f>,
                         topk_case<1.0f>>;

template <std::uint32_t Chunk, std::uint32_t TopK, bool Sign,
          lc::index_coding Indices = lc::index_coding::compact>
struct demo_case {
    using type = lc::demo;
    static typename type::hyper hyper() {
        return {.chunk = Chunk, .topk = TopK, .sign = Sign, .indices = Indices};
    }
    static std::string label() {
        return "demo, chunk " + std::to_string(Chunk) + ", topk " + std::to_string(TopK) +
               (Sign ? ", signs" : "") + ", indices " + std::string(lc::to_string(Indices));
    }
};

template <std::uint32_t Chunk, std::uint32_t TopK, std::uint32_t Bins,
          lc::index_coding Indices = lc::index_coding::compact>
struct sparseloco_case {
    using type = lc::sparseloco;
    static typename type::hyper hyper() {
        return {.chunk = Chunk, .topk = TopK, .bins = Bins, .indices = Indices};
    }
    static std::string label() {
        return "sparseloco, chunk " + std::to_string(Chunk) + ", topk " + std::to_string(TopK) +
               ", bins " + std::to_string(Bins) + ", indices " + std::string(lc::to_string(Indices));
    }
};

using chunked_cases =
    boost::mp11::mp_list<demo_case<64, 32, false>, demo_case<64, 32, true>, demo_case<8, 3, false>,
                         demo_case<8, 3, true>, demo_case<16, 256, true>,
                         demo_case<64, 32, true, lc::index_coding::fixed>,
                         demo_case<8, 3, false, lc::index_coding::fixed>,
                         sparseloco_case<64, 64, 4>,
                         sparseloco_case<8, 5, 3>, sparseloco_case<16, 7, 256>,
                         sparseloco_case<4, 2, 2>,
                         sparseloco_case<64, 64, 4, lc::index_coding::fixed>,
                         sparseloco_case<8, 5, 3, lc::index_coding::fixed>>;

using compressor_cases =
    boost::mp11::mp_append<other_cases, blockwise_cases, statistical_cases, chunked_cases>;

// Every built-in compressor has a case and satisfies the concept; wire ids are distinct.
template <class Case>
using type_of = typename Case::type;
using builtin = boost::mp11::mp_list<lc::none, lc::cast<loco::bf16>, lc::cast<loco::fp16>,
                                     lc::blockwise<2, 256>, lc::statistical<2>, lc::topk,
                                     lc::demo, lc::sparseloco>;
template <class C>
using has_case = boost::mp11::mp_contains<boost::mp11::mp_transform<type_of, compressor_cases>, C>;
static_assert(boost::mp11::mp_all_of<builtin, has_case>::value);
template <class C>
using is_compressor = std::bool_constant<lc::compressor<C>>;
static_assert(boost::mp11::mp_all_of<boost::mp11::mp_transform<type_of, compressor_cases>,
                                     is_compressor>::value);
static_assert(lc::none::wire_id == 0 && lc::cast<loco::bf16>::wire_id == 1 &&
              lc::cast<loco::fp16>::wire_id == 1 && lc::blockwise<1, 1>::wire_id == 2 &&
              lc::statistical<8>::wire_id == 3 && lc::topk::wire_id == 4 &&
              lc::demo::wire_id == 5 && lc::sparseloco::wire_id == 6);

// ================================================================================================
// Inputs
// ================================================================================================

// Segments of every awkward kind (empty, one element, odd sizes, 2-D, one column) with gaps
// between them, which decode must leave alone.
struct layout {
    std::vector<lc::segment> segs;
    std::size_t total = 0;
};

layout standard_layout() {
    layout l;
    const lc::segment shapes[] = {{0, 0, 1, 0},    {0, 1, 1, 1},     {0, 3, 1, 3},
                                  {0, 1000, 1, 1000}, {0, 1003, 1, 1003}, {0, 91, 7, 13},
                                  {0, 1056, 32, 33}, {0, 5, 5, 1}};
    std::size_t at = 2;
    for (lc::segment s : shapes) {
        s.offset = at;
        l.segs.push_back(s);
        at += s.size + 2;
    }
    l.total = at;
    return l;
}

// Normal values with a different scale per segment and per row, a few outliers, exact zeros and
// repeated magnitudes (ties for top-k).
std::vector<float> draw_inputs(std::mt19937_64& rng, const layout& l) {
    std::vector<float> x(l.total, 0.0f);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<double> coin(0.0, 1.0);
    const float scales[] = {1.0f, 1e-3f, 30.0f, 0.25f, 7.0f, 1e-2f, 3.0f, 1.0f};
    for (std::size_t k = 0; k < l.segs.size(); ++k) {
        const lc::segment& s = l.segs[k];
        const std::size_t cols = s.rows == 0 ? s.size : s.size / s.rows;
        for (std::size_t i = 0; i < s.size; ++i) {
            const std::size_t row = i / std::max<std::size_t>(cols, 1);
            const float row_factor = 1.0f + static_cast<float>(row % 3);
            float v = normal(rng) * scales[k % 8] * row_factor;
            const double c = coin(rng);
            if (c < 0.01) {
                v *= 20.0f;
            } else if (c < 0.02) {
                v = 0.0f;
            } else if (c < 0.04 && i > 0) {
                v = -x[s.offset + i / 2];
            }
            x[s.offset + i] = v;
        }
    }
    return x;
}

template <class C>
std::vector<std::byte> encode(const typename C::hyper& h, const std::vector<float>& x,
                              std::span<const lc::segment> segs, const lc::encode_context& ctx) {
    std::vector<std::byte> out(C::payload_bytes(h, segs));
    // Compressors with state (error feedback) start from zero state on every call, so a payload
    // is the encoding of x alone.
    std::vector<float> state(static_cast<std::size_t>(C::state_size) * x.size(), 0.0f);
    C::encode(h, x, segs, state, ctx, out);
    return out;
}

constexpr std::uint32_t sentinel_bits = 0x7fa5a5a5u;  // a signalling NaN no decoder writes

std::vector<float> sentinel_buffer(std::size_t n) {
    return std::vector<float>(n, float_of(sentinel_bits));
}

std::size_t group_count(const lc::segment& s, lc::granularity per) {
    return s.size == 0 ? 0 : (per == lc::granularity::tensor ? 1 : s.rows);
}

std::size_t round_up4(std::size_t n) { return (n + 3) / 4 * 4; }

// Exact ceil(ratio * n) for a float ratio in (0, 1] and n < 2^32, in integer arithmetic.
std::size_t topk_count(float ratio, std::size_t n) {
    if (n == 0) {
        return 0;
    }
    int e = 0;
    const float m = std::frexp(ratio, &e);                                // ratio = m * 2^e
    const auto mantissa = static_cast<std::uint64_t>(std::ldexp(m, 24));  // exact, < 2^24
    const int shift = 24 - e;                          // ratio = mantissa / 2^shift
    const std::uint64_t product = mantissa * n;        // < 2^56
    std::size_t k = 1;                                 // when product < 2^shift
    if (shift < 64) {
        const std::uint64_t unit = std::uint64_t{1} << shift;
        k = static_cast<std::size_t>(product / unit + (product % unit != 0 ? 1 : 0));
    }
    return std::min(n, std::max<std::size_t>(1, k));
}

// ================================================================================================
// Per compressor: expected header fields, body size and the reference check
// ================================================================================================

template <class C>
struct family;

template <>
struct family<lc::none> {
    using hyper = lc::none::hyper;
    static std::uint8_t bits() { return 32; }
    static std::uint8_t flags(const hyper&) { return 0; }
    static std::uint32_t block(const hyper&) { return 0; }
    static bool stochastic(const hyper&) { return false; }
    static std::size_t body_bytes(const hyper&, const lc::segment& s) { return 4 * s.size; }
    static void check(const hyper&, const std::vector<float>& x, const layout& l,
                      const lc::encode_context&, const std::vector<std::byte>& payload,
                      const std::vector<float>& decoded, findings& log) {
        std::size_t at = wire::header_bytes;
        for (const lc::segment& s : l.segs) {
            for (std::size_t i = 0; i < s.size; ++i) {
                const float sent = wire::get<float>(payload, at + 4 * i);
                log.expect(bits_of(sent) == bits_of(x[s.offset + i]), "body float ", i);
                log.expect(bits_of(decoded[s.offset + i]) == bits_of(x[s.offset + i]), "decoded ", i);
            }
            at += 4 * s.size;
        }
    }
};

template <class Half>
struct family<lc::cast<Half>> {
    using hyper = typename lc::cast<Half>::hyper;
    static std::uint8_t bits() { return 16; }
    static std::uint8_t flags(const hyper&) { return std::is_same_v<Half, loco::bf16> ? 0 : 1; }
    static std::uint32_t block(const hyper&) { return 0; }
    static bool stochastic(const hyper&) { return false; }
    static std::size_t body_bytes(const hyper&, const lc::segment& s) { return 2 * s.size; }
    static void check(const hyper&, const std::vector<float>& x, const layout& l,
                      const lc::encode_context&, const std::vector<std::byte>& payload,
                      const std::vector<float>& decoded, findings& log) {
        const half_format& fmt = format_of<Half>();
        static const std::vector<double> table = fmt.table();
        std::size_t at = wire::header_bytes;
        for (const lc::segment& s : l.segs) {
            for (std::size_t i = 0; i < s.size; ++i) {
                const float v = x[s.offset + i];
                const std::uint32_t sent = wire::get<std::uint16_t>(payload, at + 2 * i);
                log.expect(sent == reference_round(fmt, table, v), "pattern of ", v);
                const double magnitude = fmt.value(sent & ~fmt.sign_bit());
                const double want = (sent & fmt.sign_bit()) != 0 ? -magnitude : magnitude;
                log.expect(static_cast<double>(decoded[s.offset + i]) == want, "decoded ", v);
                // The documented bound (cast.hpp).
                const double error = std::abs(static_cast<double>(decoded[s.offset + i]) - v);
                const double bound =
                    std::max(fmt.unit_roundoff() * std::abs(v), fmt.smallest_step() / 2);
                log.expect(error <= bound, "error ", error, " for ", v, " above ", bound);
            }
            at += 2 * s.size;
        }
    }
};

template <int Bits, std::size_t Block>
struct family<lc::blockwise<Bits, Block>> {
    using C = lc::blockwise<Bits, Block>;
    using hyper = typename C::hyper;
    static constexpr double levels = (1 << Bits) - 1;  // L
    static std::uint8_t bits() { return Bits; }
    static std::uint8_t flags(const hyper& h) {
        return static_cast<std::uint8_t>((h.scale == lc::scale_kind::mean_abs ? 1 : 0) |
                                         (h.round == lc::rounding::stochastic ? 2 : 0));
    }
    static std::uint32_t block(const hyper&) { return Block; }
    static bool stochastic(const hyper& h) { return h.round == lc::rounding::stochastic; }
    static std::size_t blocks(std::size_t n) { return (n + Block - 1) / Block; }
    static std::size_t body_bytes(const hyper&, const lc::segment& s) {
        return 4 * blocks(s.size) + round_up4((s.size * Bits + 7) / 8);
    }
    static unsigned zero_code() { return static_cast<unsigned>(round_half_even(levels / 2)); }

    // The reference scale of a block, as a float, or 0 for a block sent as zeros.
    static float reference_scale(const hyper& h, const float* x, std::size_t n) {
        long double largest = 0, sum = 0;
        for (std::size_t j = 0; j < n; ++j) {
            if (!std::isfinite(x[j])) {
                return 0.0f;
            }
            largest = std::max(largest, std::abs(static_cast<long double>(x[j])));
            sum += std::abs(static_cast<long double>(x[j]));
        }
        return static_cast<float>(h.scale == lc::scale_kind::absmax ? largest : sum / n);
    }

    static void check(const hyper& h, const std::vector<float>& x, const layout& l,
                      const lc::encode_context& ctx, const std::vector<std::byte>& payload,
                      const std::vector<float>& decoded, findings& log) {
        std::size_t at = wire::header_bytes;
        for (const lc::segment& s : l.segs) {
            const std::byte* codes = payload.data() + at + 4 * blocks(s.size);
            for (std::size_t b = 0; b < blocks(s.size); ++b) {
                const std::size_t first = b * Block;
                const std::size_t n = std::min(Block, s.size - first);
                const float scale = wire::get<float>(payload, at + 4 * b);
                const float want_scale = reference_scale(h, x.data() + s.offset + first, n);
                // The mean is summed in another order (long double) here: allow one fp32 step.
                log.expect(scale == want_scale ||
                               (h.scale == lc::scale_kind::mean_abs &&
                                std::abs(scale - want_scale) <= 0x1p-23f * want_scale),
                           "scale ", scale, " of block ", b, ", expected ", want_scale);
                for (std::size_t j = first; j < first + n; ++j) {
                    check_element(h, x[s.offset + j], s.offset + j, scale,
                                  wire::unpack<Bits>(codes, j), decoded[s.offset + j], ctx, log);
                }
            }
            at += body_bytes(h, s);
        }
    }

    static void check_element(const hyper& h, float xf, std::size_t flat, float scale,
                              unsigned code, float out, const lc::encode_context& ctx,
                              findings& log) {
        if (scale == 0.0f) {
            log.expect(code == zero_code() && out == 0.0f, "zero block: code ", code, ", value ", out);
            return;
        }
        const double s = scale;
        const double x = xf;
        const double t = std::clamp((x / s + 1) * levels / 2, 0.0, levels);
        // Within 1e-6 of the scale (in units of t) of the boundary fp32 may land on either side,
        // except where fp32 computes t exactly too: x = 0 (t = L/2) and the clamped ends.
        const double window = 1e-6 * levels / 2;
        const bool exact = x == 0 || t == 0 || t == levels;
        double want = 0;
        bool ambiguous = false;
        if (h.round == lc::rounding::nearest) {
            want = round_half_even(t);
            ambiguous = !exact && std::abs(t - std::floor(t) - 0.5) <= window;
        } else {
            // The boundary is where the fraction of t meets u.
            const double u = loco::random::uniform(ctx.seed, ctx.stream(), flat);
            const double frac = t - std::floor(t);
            want = std::floor(t) + (u < frac ? 1 : 0);
            ambiguous = !exact && std::abs(frac - u) <= window;
        }
        if (ambiguous) {
            log.near_boundary();
            log.expect(std::abs(code - want) <= 1, "code ", code, " of ", x, ", expected ", want);
        } else {
            log.expect(code == want, "code ", code, " of ", x, " (t = ", t, "), expected ", want);
        }
        const double level = s * (2.0 * code / levels - 1.0);
        log.expect(std::abs(out - level) <= 0x1p-22 * s + 0x1p-150, "value ", out, " of code ",
                   code, ", expected ", level);
        log.expect(std::abs(out - x) <= bound(h, x, s), "error ", std::abs(out - x), " of ", x,
                   " above the bound ", bound(h, x, s));
    }

    // The documented bound (blockwise.hpp, docs/compressors.md).
    static double bound(const hyper& h, double x, double s) {
        const double steps = h.round == lc::rounding::nearest ? 1.0 : 2.0;
        return std::max(std::abs(x) - s, 0.0) + steps * s / levels + 0x1p-20 * s + 0x1p-150;
    }
};

template <int Bits>
struct family<lc::statistical<Bits>> {
    using C = lc::statistical<Bits>;
    using hyper = typename C::hyper;
    static constexpr unsigned B = 1u << Bits;
    static std::uint8_t bits() { return Bits; }
    static std::uint8_t flags(const hyper& h) { return h.per == per_row ? 1 : 0; }
    static std::uint32_t block(const hyper& h) { return bits_of(h.range); }
    static bool stochastic(const hyper&) { return false; }
    static std::size_t body_bytes(const hyper& h, const lc::segment& s) {
        return 4 * group_count(s, h.per) * (1 + B) + round_up4((s.size * Bits + 7) / 8);
    }

    static void check(const hyper& h, const std::vector<float>& x, const layout& l,
                      const lc::encode_context&, const std::vector<std::byte>& payload,
                      const std::vector<float>& decoded, findings& log) {
        std::size_t at = wire::header_bytes;
        for (const lc::segment& s : l.segs) {
            const std::size_t g = group_count(s, h.per);
            const std::byte* codes = payload.data() + at + 4 * g * (1 + B);
            for (std::size_t r = 0; r < g; ++r) {
                const std::size_t n = s.size / g;
                check_group(h, x.data() + s.offset + r * n, n, payload, at + 4 * r * (1 + B),
                            codes, r * n, decoded.data() + s.offset + r * n, log);
            }
            at += body_bytes(h, s);
        }
    }

    static void check_group(const hyper& h, const float* x, std::size_t n,
                            const std::vector<std::byte>& payload, std::size_t record,
                            const std::byte* codes, std::size_t first, const float* out,
                            findings& log) {
        const float shift = wire::get<float>(payload, record);
        long double sum = 0;
        for (std::size_t i = 0; i < n; ++i) {
            sum += x[i];
        }
        const auto want_shift = static_cast<float>(sum / n);
        log.expect(std::abs(shift - want_shift) <= 0x1p-23f * std::abs(want_shift) + 1e-30f,
                   "shift ", shift, ", expected ", want_shift);
        // From here on the reference uses the transmitted shift, so it checks the codes and the
        // table the receiver sees.
        std::vector<double> c(n);
        double squares = 0;
        for (std::size_t i = 0; i < n; ++i) {
            c[i] = static_cast<double>(x[i]) - shift;
            squares += c[i] * c[i];
        }
        double scale = n < 2 ? 1.0 : h.range * std::sqrt(squares / (n - 1)) / B;
        if (!(static_cast<float>(scale) > 0.0f) || std::isinf(static_cast<float>(scale))) {
            scale = 1.0;
        }
        std::vector<double> bin_sum(B, 0.0), bin_min(B, 1e300), bin_max(B, -1e300);
        std::vector<std::size_t> bin_count(B, 0);
        std::vector<unsigned> q(n);
        for (std::size_t i = 0; i < n; ++i) {
            q[i] = wire::unpack<Bits>(codes, first + i);
            const double t = std::clamp(c[i] / scale + B / 2.0, 0.0, B - 1.0);
            const double want = round_half_even(t);
            if (std::abs(t - std::floor(t) - 0.5) <= 1e-6 * B / 2) {
                log.near_boundary();
                log.expect(std::abs(q[i] - want) <= 1, "code ", q[i], " of ", x[i], ", expected ",
                           want);
            } else {
                log.expect(q[i] == want, "code ", q[i], " of ", x[i], " (t = ", t,
                           "), expected ", want);
            }
            bin_sum[q[i]] += c[i];
            bin_min[q[i]] = std::min(bin_min[q[i]], c[i]);
            bin_max[q[i]] = std::max(bin_max[q[i]], c[i]);
            ++bin_count[q[i]];
        }
        for (unsigned b = 0; b < B; ++b) {
            const float entry = wire::get<float>(payload, record + 4 * (1 + b));
            if (bin_count[b] == 0) {
                log.expect(bits_of(entry) == 0, "entry ", entry, " of the empty bin ", b);
                continue;
            }
            const double want = bin_sum[b] / bin_count[b];
            log.expect(std::abs(entry - want) <= 0x1p-23 * std::abs(want) + 1e-30, "entry ", entry,
                       " of bin ", b, ", expected ", want);
            if (b > 0 && b < B - 1) {
                log.expect(bin_max[b] - bin_min[b] <= scale * (1 + B * 0x1p-22), "bin ", b,
                           " spreads over ", bin_max[b] - bin_min[b], ", wider than scale ", scale);
            }
        }
        for (std::size_t i = 0; i < n; ++i) {
            const float entry = wire::get<float>(payload, record + 4 * (1 + q[i]));
            const double want = static_cast<double>(entry) + shift;
            log.expect(std::abs(out[i] - want) <= 0x1p-24 * std::abs(want), "value ", out[i],
                       ", expected ", want);
            // The documented bound (statistical.hpp).
            const double bound = bin_max[q[i]] - bin_min[q[i]] +
                                 0x1p-22 * (std::abs(x[i]) + std::abs(shift) + std::abs(entry));
            log.expect(std::abs(out[i] - static_cast<double>(x[i])) <= bound, "error of ", x[i],
                       " above the bound ", bound);
        }
    }
};

template <>
struct family<lc::topk> {
    using hyper = lc::topk::hyper;
    static std::uint8_t bits() { return 32; }
    static std::uint8_t flags(const hyper&) { return 0; }
    static std::uint32_t block(const hyper& h) { return bits_of(h.ratio); }
    static bool stochastic(const hyper&) { return false; }
    static std::size_t body_bytes(const hyper& h, const lc::segment& s) {
        return 8 * topk_count(h.ratio, s.size);
    }

    // Larger magnitude first, NaN above everything, then lower index.
    static std::vector<std::uint32_t> reference_indices(const float* x, std::size_t n, std::size_t k) {
        std::vector<std::uint32_t> order(n);
        std::iota(order.begin(), order.end(), 0u);
        const auto magnitude = [&](std::uint32_t i) {
            return std::isnan(x[i]) ? std::numeric_limits<double>::max() : std::abs(double(x[i]));
        };
        std::stable_sort(order.begin(), order.end(),
                         [&](std::uint32_t a, std::uint32_t b) { return magnitude(a) > magnitude(b); });
        order.resize(k);
        std::sort(order.begin(), order.end());
        return order;
    }

    static void check(const hyper& h, const std::vector<float>& x, const layout& l,
                      const lc::encode_context&, const std::vector<std::byte>& payload,
                      const std::vector<float>& decoded, findings& log) {
        std::size_t at = wire::header_bytes;
        for (const lc::segment& s : l.segs) {
            const std::size_t k = topk_count(h.ratio, s.size);
            const auto want = reference_indices(x.data() + s.offset, s.size, k);
            std::vector<bool> sent(s.size, false);
            double smallest_sent = std::numeric_limits<double>::infinity();
            for (std::size_t j = 0; j < k; ++j) {
                const auto i = wire::get<std::uint32_t>(payload, at + 4 * j);
                const float v = wire::get<float>(payload, at + 4 * (k + j));
                log.expect(i == want[j], "index ", i, ", expected ", want[j]);
                if (i < s.size) {
                    sent[i] = true;
                    log.expect(bits_of(v) == bits_of(x[s.offset + i]), "value of index ", i);
                    smallest_sent = std::min(smallest_sent, std::abs(double(x[s.offset + i])));
                }
            }
            for (std::size_t i = 0; i < s.size; ++i) {
                const float v = x[s.offset + i];
                const float out = decoded[s.offset + i];
                if (sent[i]) {
                    log.expect(bits_of(out) == bits_of(v), "decoded sent element ", i);
                } else {
                    // The documented bound (topk.hpp): what is not sent is no larger than what is.
                    log.expect(bits_of(out) == 0 && std::abs(double(v)) <= smallest_sent,
                               "element ", i, " (", v, ") decoded as ", out);
                }
            }
            at += 8 * k;
        }
    }
};

// DeMo / DisTrO and SparseLoCo: chunks, DCT and top-k from tests/support/chunked_reference.hpp.
struct chunk_geometry {
    loco_test::chunked::chunk_list chunks;
    std::size_t cells = 0;
};

inline chunk_geometry geometry_of(const lc::segment& s, std::uint32_t target) {
    const std::size_t rows = s.rows <= 1 ? 1 : s.rows;
    chunk_geometry g;
    g.chunks = loco_test::chunked::chunks(rows, s.size / rows, target);
    g.cells = g.chunks.h * g.chunks.w;
    return g;
}

template <>
struct family<lc::demo> {
    using hyper = lc::demo::hyper;
    static std::uint8_t bits(const hyper& h) {
        return static_cast<std::uint8_t>((h.sign ? 1 : 32) + 16 * static_cast<unsigned>(h.indices));
    }
    static std::uint8_t flags(const hyper& h) { return h.sign ? 1 : 0; }
    static std::uint32_t block(const hyper& h) { return h.chunk | (h.topk << 16); }
    static bool stochastic(const hyper&) { return false; }
    static std::size_t kept(const hyper& h, std::size_t cells) {
        return std::min<std::size_t>(h.topk, cells);
    }
    static loco_test::chunked::index_form form_of(const hyper& h, std::size_t cells,
                                                   std::size_t k) {
        return loco_test::chunked::index_form_of(h.indices == lc::index_coding::compact, cells, k);
    }
    static std::size_t index_bytes(const hyper& h, const lc::segment& s, std::size_t& sent) {
        sent = 0;
        if (s.size == 0) {
            return 0;
        }
        const chunk_geometry g = geometry_of(s, h.chunk);
        const std::size_t k = kept(h, g.cells);
        sent = g.chunks.cells.size() * k;
        return loco_test::chunked::index_stream_bytes(form_of(h, g.cells, k),
                                                      g.chunks.cells.size());
    }
    static std::size_t body_bytes(const hyper& h, const lc::segment& s) {
        std::size_t sent = 0;
        const std::size_t ib = index_bytes(h, s, sent);
        return ib + (h.sign ? round_up4((sent + 7) / 8) : 4 * sent);
    }

    static void check(const hyper& h, const std::vector<float>& x, const layout& l,
                      const lc::encode_context&, const std::vector<std::byte>& payload,
                      const std::vector<float>& decoded, findings& log) {
        namespace ref = loco_test::chunked;
        std::size_t at = wire::header_bytes;
        for (const lc::segment& s : l.segs) {
            if (s.size == 0) {
                continue;
            }
            std::size_t sent = 0;
            const std::size_t ib = index_bytes(h, s, sent);
            const chunk_geometry g = geometry_of(s, h.chunk);
            const std::size_t k = kept(h, g.cells);
            const auto f = form_of(h, g.cells, k);
            const std::byte* indices = payload.data() + at;
            for (std::size_t c = 0; c < g.chunks.cells.size(); ++c) {
                std::vector<double> block;
                double norm = 0;
                for (const std::size_t i : g.chunks.cells[c]) {
                    block.push_back(x[s.offset + i]);
                    norm += block.back() * block.back();
                }
                norm = std::sqrt(norm);
                const std::vector<double> coef = ref::dct2(block, g.chunks.h, g.chunks.w);
                const double floor = 1e-9 * norm;
                if (ref::selection_margin(coef, k) < 1e-5) {
                    log.near_boundary();  // near-equal magnitudes at the cut (or a zero chunk)
                    continue;
                }
                const std::vector<std::size_t> want = ref::top_k(coef, k);
                std::vector<double> sent_coef(g.cells, 0.0);
                for (std::size_t j = 0; j < k; ++j) {
                    const std::size_t slot = c * k + j;
                    const std::uint32_t i = loco_test::chunked::index_at(indices, f, k, c, j);
                    log.expect(i == want[j], "index ", i, " of chunk ", c, ", expected ", want[j]);
                    const double v = coef[want[j]];
                    if (h.sign) {
                        const unsigned bit = wire::get_bits(indices + ib, slot, 1);
                        if (std::abs(v) > floor) {
                            log.expect(bit == (v < 0 ? 1u : 0u), "sign of coefficient ", v);
                        }
                        sent_coef[want[j]] = bit != 0 ? -1.0 : 1.0;
                    } else {
                        const float got = wire::get<float>(payload, at + ib + 4 * slot);
                        log.expect(std::abs(got - v) <= 4e-7 * std::abs(v) + floor, "value ", got,
                                   " of coefficient ", v);
                        sent_coef[want[j]] = got;
                    }
                }
                const std::vector<double> d = ref::idct2(sent_coef, g.chunks.h, g.chunks.w);
                double sent_norm = 0;
                for (const double v : sent_coef) {
                    sent_norm += v * v;
                }
                for (std::size_t j = 0; j < g.cells; ++j) {
                    const float out = decoded[s.offset + g.chunks.cells[c][j]];
                    const double tolerance = 4e-7 * std::abs(d[j]) + 1e-9 * std::sqrt(sent_norm);
                    log.expect(std::abs(out - d[j]) <= tolerance, "decoded ", out, ", expected ",
                               d[j]);
                }
                // The documented bound: in the DCT domain what is not sent is no larger than
                // what is (an orthonormal transform keeps the norm of the error).
                if (!h.sign) {
                    double dropped = 0;
                    double smallest = 1e300;
                    for (std::size_t i = 0; i < g.cells; ++i) {
                        if (std::binary_search(want.begin(), want.end(), i)) {
                            smallest = std::min(smallest, std::abs(coef[i]));
                        } else {
                            dropped = std::max(dropped, std::abs(coef[i]));
                        }
                    }
                    log.expect(dropped <= smallest, "a dropped coefficient above a sent one");
                }
            }
            at += body_bytes(h, s);
        }
    }
};

template <>
struct family<lc::sparseloco> {
    using hyper = lc::sparseloco::hyper;
    static std::uint8_t bits(const hyper& h) {
        return static_cast<std::uint8_t>(code_width(h) + 16 * static_cast<unsigned>(h.indices));
    }
    static std::uint8_t flags(const hyper& h) { return static_cast<std::uint8_t>(h.bins - 1); }
    static std::uint32_t block(const hyper& h) { return h.chunk | (h.topk << 16); }
    static bool stochastic(const hyper&) { return false; }
    static unsigned code_width(const hyper& h) { return std::bit_width(h.bins - 1); }
    static std::size_t kept(const hyper& h, std::size_t cells) {
        if (cells <= 1) {
            return cells;
        }
        std::size_t k = std::max<std::size_t>(std::min<std::size_t>(h.topk, cells), 2);
        return k - k % 2;
    }
    static std::size_t body_bytes(const hyper& h, const lc::segment& s) {
        if (s.size == 0) {
            return 0;
        }
        const chunk_geometry g = geometry_of(s, h.chunk);
        const std::size_t sent = g.chunks.cells.size() * kept(h, g.cells);
        const auto f = form_of(h, g.cells, kept(h, g.cells));
        return 4 * (1 + h.bins) + round_up4((g.chunks.cells.size() * f.bits + 7) / 8) +
               round_up4((sent * code_width(h) + 7) / 8);
    }

    static loco_test::chunked::index_form form_of(const hyper& h, std::size_t cells,
                                                   std::size_t k) {
        return loco_test::chunked::index_form_of(h.indices == lc::index_coding::compact, cells, k);
    }

    static void check(const hyper& h, const std::vector<float>& x, const layout& l,
                      const lc::encode_context&, const std::vector<std::byte>& payload,
                      const std::vector<float>& decoded, findings& log) {
        namespace ref = loco_test::chunked;
        std::size_t at = wire::header_bytes;
        for (const lc::segment& s : l.segs) {
            if (s.size == 0) {
                continue;
            }
            const chunk_geometry g = geometry_of(s, h.chunk);
            const std::size_t k = kept(h, g.cells);
            const auto f = form_of(h, g.cells, k);
            const std::byte* indices = payload.data() + at + 4 * (1 + h.bins);
            const std::byte* codes = indices + round_up4((g.chunks.cells.size() * f.bits + 7) / 8);
            // Kept values (exact: the choice is made on the fp32 inputs), then the quantizer.
            std::vector<double> v;
            std::vector<std::size_t> where;
            std::vector<bool> kept_cell(s.size, false);
            for (std::size_t c = 0; c < g.chunks.cells.size(); ++c) {
                std::vector<double> block;
                for (const std::size_t i : g.chunks.cells[c]) {
                    block.push_back(x[s.offset + i]);
                }
                const std::vector<std::size_t> want = ref::top_k(block, k);
                double smallest = 1e300;
                for (std::size_t j = 0; j < k; ++j) {
                    const std::uint32_t i = loco_test::chunked::index_at(indices, f, k, c, j);
                    log.expect(i == want[j], "index ", i, " of chunk ", c, ", expected ", want[j]);
                    v.push_back(block[want[j]]);
                    where.push_back(g.chunks.cells[c][want[j]]);
                    kept_cell[g.chunks.cells[c][want[j]]] = true;
                    smallest = std::min(smallest, std::abs(block[want[j]]));
                }
                for (std::size_t j = 0; j < g.cells; ++j) {
                    if (!std::binary_search(want.begin(), want.end(), j)) {
                        log.expect(std::abs(block[j]) <= smallest,
                                   "a dropped value above a kept one");
                    }
                }
            }
            long double sum = 0;
            for (const double a : v) {
                sum += a;
            }
            const float shift = wire::get<float>(payload, at);
            const auto want_shift = static_cast<float>(sum / v.size());
            log.expect(std::abs(shift - want_shift) <= 0x1p-23f * std::abs(want_shift) + 1e-30f,
                       "shift ", shift, ", expected ", want_shift);
            double squares = 0;
            for (const double a : v) {
                squares += (a - shift) * (a - shift);
            }
            double scale =
                v.size() < 2 ? 1.0 : h.range * std::sqrt(squares / (v.size() - 1)) / h.bins;
            if (!(static_cast<float>(scale) > 0.0f) || std::isinf(static_cast<float>(scale))) {
                scale = 1.0;
            }
            scale = static_cast<float>(scale);
            std::vector<double> bin_sum(h.bins, 0.0);
            std::vector<std::size_t> bin_count(h.bins, 0);
            std::vector<unsigned> q(v.size());
            for (std::size_t j = 0; j < v.size(); ++j) {
                q[j] = wire::get_bits(codes, j, code_width(h));
                const double t = std::clamp((v[j] - shift) / scale + h.bins / 2, 0.0, h.bins - 1.0);
                const double want = round_half_even(t);
                if (std::abs(t - std::floor(t) - 0.5) <= 1e-6 * h.bins) {
                    log.near_boundary();
                    log.expect(std::abs(q[j] - want) <= 1, "code ", q[j], ", expected ", want);
                } else {
                    log.expect(q[j] == want, "code ", q[j], " of ", v[j], " (t = ", t,
                               "), expected ", want);
                }
                if (q[j] < h.bins) {
                    bin_sum[q[j]] += v[j] - shift;
                    ++bin_count[q[j]];
                }
            }
            for (unsigned b = 0; b < h.bins; ++b) {
                const float entry = wire::get<float>(payload, at + 4 * (1 + b));
                const double want = bin_count[b] == 0 ? 0.0 : bin_sum[b] / bin_count[b];
                log.expect(std::abs(entry - want) <= 0x1p-23 * std::abs(want) + 1e-30, "entry ",
                           entry, " of bin ", b, ", expected ", want);
            }
            for (std::size_t j = 0; j < v.size(); ++j) {
                const unsigned bin = std::min(q[j], h.bins - 1);
                const float entry = wire::get<float>(payload, at + 4 * (1 + bin));
                const float out = decoded[s.offset + where[j]];
                log.expect(bits_of(out) == bits_of(entry + shift), "decoded ", out, ", expected ",
                           entry + shift);
            }
            for (std::size_t i = 0; i < s.size; ++i) {
                if (!kept_cell[i]) {
                    log.expect(bits_of(decoded[s.offset + i]) == 0, "a dropped element decoded as ",
                               decoded[s.offset + i]);
                }
            }
            at += body_bytes(h, s);
        }
    }
};

template <class C>
std::size_t expected_payload_bytes(const typename C::hyper& h, const layout& l) {
    std::size_t n = wire::header_bytes;
    for (const lc::segment& s : l.segs) {
        n += family<C>::body_bytes(h, s);
    }
    return n;
}

template <class C>
void check_header(const typename C::hyper& h, const layout& l, const std::vector<std::byte>& p) {
    using F = family<C>;
    std::size_t elements = 0;
    for (const lc::segment& s : l.segs) {
        elements += s.size;
    }
    REQUIRE(p.size() >= wire::header_bytes);
    CHECK(p[0] == std::byte{'L'});
    CHECK(p[1] == std::byte{'W'});
    CHECK(std::to_integer<unsigned>(p[2]) == wire::version);
    CHECK(std::to_integer<unsigned>(p[3]) == C::wire_id);
    if constexpr (requires { F::bits(h); }) {  // code widths that depend on the settings
        CHECK(std::to_integer<unsigned>(p[4]) == F::bits(h));
    } else {
        CHECK(std::to_integer<unsigned>(p[4]) == F::bits());
    }
    CHECK(std::to_integer<unsigned>(p[5]) == F::flags(h));
    CHECK(wire::get<std::uint16_t>(p, 6) == 0);
    CHECK(wire::get<std::uint32_t>(p, 8) == F::block(h));
    CHECK(wire::get<std::uint32_t>(p, 12) == l.segs.size());
    CHECK(wire::get<std::uint64_t>(p, 16) == elements);
    CHECK(wire::get<std::uint64_t>(p, 24) == p.size() - wire::header_bytes);
    CHECK(wire::get<std::uint64_t>(p, 32) ==
          wire::checksum(std::span<const std::byte>(p).subspan(wire::header_bytes)));
}

}  // namespace

TEST_CASE_TEMPLATE_DEFINE("compressor conformance", Case, compressor_conformance) {
    using C = typename Case::type;
    using F = family<C>;
    const auto h = Case::hyper();
    INFO("case: " << Case::label());
    auto rng = rng_for("compress conformance " + Case::label());
    const layout l = standard_layout();
    const std::vector<float> x = draw_inputs(rng, l);
    const lc::encode_context ctx{.seed = rng(), .round = 7, .rank = 3};
    const std::vector<std::byte> payload = encode<C>(h, x, l.segs, ctx);

    SUBCASE("payload size and header") {
        CHECK(C::payload_bytes(h, l.segs) == expected_payload_bytes<C>(h, l));
        CHECK(payload.size() == expected_payload_bytes<C>(h, l));
        check_header<C>(h, l, payload);
        const std::vector<lc::segment> none;
        CHECK(C::payload_bytes(h, none) == wire::header_bytes);
    }

    SUBCASE("codes and values match the reference, within the documented bound") {
        std::vector<float> decoded = sentinel_buffer(l.total);
        C::decode(h, payload, l.segs, decoded);
        findings log;
        F::check(h, x, l, ctx, payload, decoded, log);
        log.check();
        INFO(log.ambiguous() << " of " << log.checked() << " checks near a rounding boundary");
        CHECK(log.ambiguous() <= 2 + log.checked() / 1000);
        // Nothing outside the segments is written.
        std::size_t touched = 0;
        std::size_t covered = 0;
        for (const lc::segment& s : l.segs) {
            covered += s.size;
        }
        for (const float v : decoded) {
            touched += bits_of(v) != sentinel_bits ? 1 : 0;
        }
        CHECK(touched == covered);
    }

    SUBCASE("the same (seed, round, rank) gives the same bytes; another round other draws") {
        CHECK(encode<C>(h, x, l.segs, ctx) == payload);
        lc::encode_context next = ctx;
        ++next.round;
        lc::encode_context other_rank = ctx;
        ++other_rank.rank;
        if (F::stochastic(h)) {
            CHECK(encode<C>(h, x, l.segs, next) != payload);
            CHECK(encode<C>(h, x, l.segs, other_rank) != payload);
        } else {
            CHECK(encode<C>(h, x, l.segs, next) == payload);
        }
    }

    SUBCASE("an output buffer of the wrong size or a segment out of range is refused") {
        std::vector<std::byte> small(payload.size() - 1);
        CHECK_THROWS_AS(C::encode(h, x, l.segs, {}, ctx, small), loco::shape_error);
        std::vector<float> short_out = sentinel_buffer(l.total - 3);
        CHECK_THROWS_AS(C::decode(h, payload, l.segs, short_out), loco::shape_error);
        CHECK(std::all_of(short_out.begin(), short_out.end(),
                          [](float v) { return bits_of(v) == sentinel_bits; }));
    }
}

TEST_CASE_TEMPLATE_APPLY(compressor_conformance, boost::mp11::mp_rename<compressor_cases, std::tuple>);

// ================================================================================================
// Per compressor
// ================================================================================================

namespace {

lc::segment one_d(std::size_t offset, std::size_t size) { return {offset, size, 1, size}; }

template <class C>
void check_refused(const typename C::hyper& h, const std::vector<std::byte>& p,
                   std::span<const lc::segment> segs, std::size_t n, const char* what) {
    INFO(what);
    std::vector<float> out = sentinel_buffer(n);
    CHECK_THROWS_AS(C::decode(h, p, segs, out), loco::wire_error);
    CHECK(std::all_of(out.begin(), out.end(), [](float v) { return bits_of(v) == sentinel_bits; }));
}

}  // namespace

TEST_CASE("statistical: MuLoCo's 2-bit quantizer reproduces algorithms.md T7") {
    using S = lc::statistical<2>;
    const std::vector<float> v = {0.9f, -0.6f, 2.4f, 0.5f, 0.1f, 1.6f, -2.1f, 0.4f};
    const lc::segment segs[] = {one_d(0, 8)};
    const auto p = encode<S>({}, v, segs, {});
    CHECK(p.size() == wire::header_bytes + 4 * 5 + 4);
    CHECK(wire::get<float>(p, 40) == doctest::Approx(0.4).epsilon(1e-7));
    const unsigned want_q[] = {2, 2, 3, 2, 2, 3, 1, 2};
    for (std::size_t i = 0; i < 8; ++i) {
        CHECK(wire::unpack<2>(p.data() + 60, i) == want_q[i]);
    }
    const double want_lut[] = {0.0, -2.5, -0.14, 1.6};
    for (std::size_t b = 0; b < 4; ++b) {
        // fp32 rounding of the decimal (the shift itself is fp32(0.4), off by 6e-9).
        const float entry = wire::get<float>(p, 44 + 4 * b);
        CHECK(std::abs(entry - want_lut[b]) <= 1e-7 * (1 + std::abs(want_lut[b])));
    }
    CHECK(bits_of(wire::get<float>(p, 44)) == 0);  // bin 0 is empty
    std::vector<float> out(8);
    S::decode({}, p, segs, out);
    const double want[] = {0.26, 0.26, 2.0, 0.26, 0.26, 2.0, -2.1, 0.26};
    for (std::size_t i = 0; i < 8; ++i) {
        CHECK(std::abs(out[i] - want[i]) <= 4e-7 * std::abs(want[i]));
    }
}

TEST_CASE("statistical: per row on a 2 x 4 example derived by hand") {
    // Row 0 = [1, 2, 3, 10]: mean 4, c = [-3, -2, -1, 6], sigma = sqrt(50 / 3) = 4.0825,
    //   scale = 6 sigma / 4 = 6.1237, t = c / scale + 2 = [1.51, 1.67, 1.84, 2.98], q = [2, 2, 2, 3],
    //   lut = [0, 0, -2, 6], decoded [2, 2, 2, 10].
    // Row 1 = [-4, 0, 0, 4]: mean 0, sigma = sqrt(32 / 3) = 3.2660, scale = 4.8990,
    //   t = [1.18, 2, 2, 2.82], q = [1, 2, 2, 3], lut = [0, -4, 0, 4], decoded exactly the input.
    // Per tensor the eight values share mean 2, c = [-1, 0, 1, 8, -6, -2, -2, 2], sigma =
    //   sqrt(114 / 7) = 4.0356, scale 6.0533, t = [1.83, 2, 2.17, 3.32, 1.01, 1.67, 1.67, 2.33],
    //   q = [2, 2, 2, 3, 1, 2, 2, 2], lut = [0, -6, -1/3, 8], decoded [5/3, 5/3, 5/3, 10, -4, 5/3,
    //   5/3, 5/3].
    using S = lc::statistical<2>;
    const std::vector<float> v = {1, 2, 3, 10, -4, 0, 0, 4};
    const lc::segment segs[] = {{0, 8, 2, 4}};
    std::vector<float> out(8);

    const S::hyper rows{.per = per_row};
    const auto p = encode<S>(rows, v, segs, {});
    CHECK(p.size() == wire::header_bytes + 2 * 4 * 5 + 4);
    const float want_record[2][5] = {{4, 0, 0, -2, 6}, {0, 0, -4, 0, 4}};
    for (std::size_t r = 0; r < 2; ++r) {
        for (std::size_t j = 0; j < 5; ++j) {
            CHECK(wire::get<float>(p, 40 + 20 * r + 4 * j) == want_record[r][j]);
        }
    }
    const unsigned want_q[] = {2, 2, 2, 3, 1, 2, 2, 3};
    for (std::size_t i = 0; i < 8; ++i) {
        CHECK(wire::unpack<2>(p.data() + 80, i) == want_q[i]);
    }
    S::decode(rows, p, segs, out);
    CHECK(out == std::vector<float>{2, 2, 2, 10, -4, 0, 0, 4});

    const auto t = encode<S>({}, v, segs, {});
    S::decode({}, t, segs, out);
    const float third = 5.0f / 3.0f;
    const float want_tensor[] = {third, third, third, 10, -4, third, third, third};
    for (std::size_t i = 0; i < 8; ++i) {
        CHECK(out[i] == doctest::Approx(want_tensor[i]).epsilon(1e-6));
    }
}

TEST_CASE("statistical: groups of one element, constant groups, non-finite values") {
    using S = lc::statistical<2>;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    // Row 0 holds a NaN, row 1 an infinity, row 2 is constant, row 3 is fine.
    const std::vector<float> v = {1, nan, 3, 4, 1, 2, inf, 4, 5, 5, 5, 5, -1, 0, 1, 2};
    const lc::segment rows_seg[] = {{0, 16, 4, 4}};
    std::vector<float> out(16);
    S::decode({.per = per_row}, encode<S>({.per = per_row}, v, rows_seg, {}), rows_seg, out);
    for (std::size_t i = 0; i < 8; ++i) {
        CHECK(std::isnan(out[i]));  // the non-finite value reaches the receiver, as NaN
    }
    for (std::size_t i = 8; i < 12; ++i) {
        CHECK(out[i] == 5.0f);  // sigma 0: scale 1, every code B/2, lut[B/2] = 0
    }
    for (std::size_t i = 12; i < 16; ++i) {
        CHECK(std::isfinite(out[i]));
    }
    // One element per group (sigma undefined, scale 1): sent exactly.
    const lc::segment singles[] = {{0, 4, 4, 1}};
    const std::vector<float> w = {3.5f, -1e30f, 0.0f, 1e-30f};
    S::decode({.per = per_row}, encode<S>({.per = per_row}, w, singles, {}), singles, out);
    CHECK(std::vector<float>(out.begin(), out.begin() + 4) == w);
}

TEST_CASE("statistical: the summation order is the documented one, close to the exact sum") {
    using S = lc::statistical<2>;
    static_assert(S::chunk == 2048 && S::lanes == 32);
    const auto sum_of = [](const std::vector<float>& x) {
        return S::ordered_sum(x.size(), [&](std::size_t i) { return static_cast<double>(x[i]); });
    };

    // Within a chunk: lane 0 holds elements 0 and 32, lanes 1 .. 31 one element each. With
    // x_0 = 1, x_32 = -1 and 2^-60 elsewhere, element order loses every 2^-60 against the 1
    // (below half an ulp) and gives 0; the documented order cancels 1 - 1 in lane 0 first and
    // sums the small terms exactly in the tree: 31 * 2^-60.
    std::vector<float> x(33, 0x1.0p-60f);
    x[0] = 1.0f;
    x[32] = -1.0f;
    double in_order = 0.0;
    for (const float v : x) {
        in_order += static_cast<double>(v);
    }
    CHECK(in_order == 0.0);
    CHECK(sum_of(x) == 31 * 0x1.0p-60);

    // Across chunks: the chunk sums are added in chunk order, each chunk summed as a group of
    // its own (a chunk's sum does not depend on where it sits, only on its elements).
    auto rng = rng_for("statistical summation order");
    for (const std::size_t n : {1u, 31u, 32u, 33u, 2047u, 2048u, 2049u, 4096u, 5000u, 100003u}) {
        CAPTURE(n);
        std::vector<float> v = normal_floats(rng, n);
        for (std::size_t i = 0; i < n; i += 7) {  // a wide range of magnitudes
            v[i] *= 0x1.0p20f;
        }
        double chunks = 0.0;
        for (std::size_t first = 0; first < n; first += S::chunk) {
            chunks += sum_of(std::vector<float>(
                v.begin() + static_cast<std::ptrdiff_t>(first),
                v.begin() + static_cast<std::ptrdiff_t>(std::min(n, first + S::chunk))));
        }
        CHECK(sum_of(v) == chunks);
        // Against a reference that is exact to far below 1e-12 (long double, Kahan-compensated).
        long double ref = 0.0L, comp = 0.0L, magnitude = 0.0L;
        for (const float f : v) {
            const long double y = static_cast<long double>(f) - comp;
            const long double t = ref + y;
            comp = (t - ref) - y;
            ref = t;
            magnitude += std::fabs(static_cast<long double>(f));
        }
        CHECK(std::fabs(static_cast<long double>(sum_of(v)) - ref) <= 1e-12L * magnitude);
        // The sum of squares around the shift, as group_scale takes it.
        const float shift = S::group_shift(v.data(), n);
        const double squares = S::ordered_sum(n, [&](std::size_t i) {
            const double c = static_cast<double>(v[i]) - static_cast<double>(shift);
            return c * c;
        });
        long double sq_ref = 0.0L;
        for (const float f : v) {
            const long double c =
                static_cast<long double>(f) - static_cast<long double>(shift);
            sq_ref += c * c;
        }
        CHECK(std::fabs(static_cast<long double>(squares) - sq_ref) <= 1e-12L * sq_ref);
    }

    // Small integers sum exactly in any order: then the documented order is the element order,
    // whatever the chunk boundaries.
    std::vector<float> ints(10000);
    std::uniform_int_distribution<int> pick(-1000, 1000);
    double plain = 0.0;
    for (float& f : ints) {
        f = static_cast<float>(pick(rng));
        plain += static_cast<double>(f);
    }
    CHECK(sum_of(ints) == plain);

    // The butterfly: the step of offset 16 pairs lane 0 with lane 16 first. With s_0 = 2^53,
    // s_1 = 1, s_16 = -2^53 and zeros elsewhere, the tree cancels 2^53 before it meets the 1
    // and gives 1; a left fold rounds 2^53 + 1 to 2^53 (a tie, to even) and gives 0.
    std::array<double, 32> s{};
    s[0] = 0x1.0p53;
    s[1] = 1.0;
    s[16] = -0x1.0p53;
    double fold = 0.0;
    for (const double v : s) {
        fold += v;
    }
    CHECK(fold == 0.0);
    CHECK(S::lane_tree(s) == 1.0);
}

TEST_CASE("statistical: hyper-parameters and row shapes are checked") {
    using S = lc::statistical<4>;
    const lc::segment segs[] = {{0, 10, 3, 3}};  // 3 rows do not divide 10 elements
    CHECK_NOTHROW(S::payload_bytes({}, segs));
    CHECK_THROWS_AS(S::payload_bytes({.per = per_row}, segs), loco::shape_error);
    const lc::segment zero_rows[] = {{0, 10, 0, 0}};
    CHECK_THROWS_AS(S::payload_bytes({.per = per_row}, zero_rows), loco::shape_error);
    CHECK_THROWS_AS(S::validate({.range = 0.0f}), loco::invalid_argument);
    CHECK_THROWS_AS(S::validate({.range = -1.0f}), loco::invalid_argument);
    CHECK_THROWS_AS(S::validate({.range = std::numeric_limits<float>::quiet_NaN()}),
                    loco::invalid_argument);
    CHECK_THROWS_AS(S::validate({.range = std::numeric_limits<float>::infinity()}),
                    loco::invalid_argument);
    CHECK_THROWS_AS(S::validate({.per = static_cast<lc::granularity>(2)}), loco::invalid_argument);
}

TEST_CASE("statistical: payloads that pass the checksum but break the format are refused") {
    using S = lc::statistical<2>;
    const std::vector<float> v = {0.9f, -0.6f, 2.4f, 0.5f, 0.1f, 1.6f, -2.1f, 0.4f, 1.0f};
    const lc::segment segs[] = {one_d(0, 9)};
    const auto p = encode<S>({}, v, segs, {});
    // Body: shift, lut[0..3], then 3 bytes of codes and 1 byte of alignment.
    {
        auto bad = p;
        wire::put<float>(bad, 44, 1.0f);  // bin 0 is empty
        reseal(bad);
        check_refused<S>({}, bad, segs, 9, "an entry for an empty bin");
    }
    {
        auto bad = p;
        bad[40 + 20 + 2] |= std::byte{0x0c};  // element 9's slot in the last code byte
        reseal(bad);
        check_refused<S>({}, bad, segs, 9, "padding bits");
    }
    {
        auto bad = p;
        bad[40 + 20 + 3] = std::byte{1};
        reseal(bad);
        check_refused<S>({}, bad, segs, 9, "alignment padding");
    }
}

// Per row, a table entry may be nonzero only for a bin that the row's own codes use: a bin that
// another row uses does not make it valid.
TEST_CASE("statistical per row: a nonzero table entry for a bin its own row does not use is "
          "refused") {
    using S = lc::statistical<2>;
    const S::hyper h{.per = per_row};
    auto rng = rng_for("statistical per-row unused bins");
    constexpr std::size_t rows = 3, cols = 16, n = rows * cols;
    // Row 0: normal values and one -100. Its mean is about -6.25 and sigma about 25, so scale =
    //   6 sigma / 4 is about 37.5: the -100 has t = c / scale + 2 near -0.5 (bin 0), the others t
    //   between 2 and 2.5 (bin 2).
    // Row 1: one random value repeated: sigma 0, scale 1, every code B/2 = 2, so bins 0, 1 and 3
    //   are unused there although row 0 uses bin 0.
    // Row 2: normal values.
    std::vector<float> v = normal_floats(rng, n);
    v[0] = -100.0f;
    std::fill(v.begin() + cols, v.begin() + 2 * cols, v[cols]);
    const lc::segment segs[] = {{0, n, rows, cols}};
    const auto p = encode<S>(h, v, segs, {});
    // Body: 3 records of shift and lut[0..3] (20 bytes each), then the codes.
    const std::size_t codes = wire::header_bytes + 20 * rows;
    std::array<std::array<bool, 4>, rows> used{};
    for (std::size_t i = 0; i < n; ++i) {
        used[i / cols][wire::unpack<2>(p.data() + codes, i)] = true;
    }
    REQUIRE(used[0][0]);
    REQUIRE(used[1] == std::array<bool, 4>{false, false, true, false});
    std::size_t edits = 0;
    for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t b = 0; b < 4; ++b) {
            if (used[r][b]) {
                continue;
            }
            CAPTURE(r);
            CAPTURE(b);
            auto bad = p;
            wire::put<float>(bad, wire::header_bytes + 20 * r + 4 * (1 + b), 1.0f);
            reseal(bad);
            check_refused<S>(h, bad, segs, n, "a nonzero entry for a bin the row does not use");
            ++edits;
        }
    }
    CHECK(edits >= 3);
    std::vector<float> out(n);
    CHECK_NOTHROW(S::decode(h, p, segs, out));
}

TEST_CASE("blockwise: blocks holding NaN or inf arrive as NaN, blocks of zeros as zeros") {
    using Q = lc::blockwise<2, 4>;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    const std::vector<float> v = {1, 2, nan, 4, 0, 0, 0, 0, -inf, 1, 1, 1, 1, -2, 3, -4};
    const lc::segment segs[] = {one_d(0, 16)};
    for (const auto scale : {absmax, mean_abs}) {
        const Q::hyper h{.scale = scale};
        const auto p = encode<Q>(h, v, segs, {});
        std::vector<float> out(16);
        Q::decode(h, p, segs, out);
        for (std::size_t b = 0; b < 3; ++b) {
            // Blocks 0 and 2 hold a NaN and an infinity: the whole block travels as NaN, so every
            // receiver sees it and loco::diloco's non-finite policy acts on every rank alike.
            const bool poisoned = b != 1;
            CHECK(bits_of(wire::get<float>(p, 40 + 4 * b)) == (poisoned ? 0x7fc00000u : 0u));
            for (std::size_t j = 4 * b; j < 4 * b + 4; ++j) {
                CHECK(wire::unpack<2>(p.data() + 56, j) == 2);  // the code of x = 0
                if (poisoned) {
                    CHECK(std::isnan(out[j]));
                } else {
                    CHECK(out[j] == 0.0f);
                }
            }
        }
        CHECK(wire::get<float>(p, 52) == (scale == absmax ? 4.0f : 2.5f));
    }
}

TEST_CASE("blockwise: the error bound holds for blocks of subnormal numbers") {
    // v_k = s * ((2k - L) / L) rounds to a multiple of 2^-149 when s is subnormal: an absolute
    // error of up to 2^-150, which the bound's 2^-150 term covers (its 2^-20 s would not).
    auto rng = rng_for("blockwise subnormal blocks");
    std::uniform_int_distribution<std::uint32_t> mantissa(0, (1u << 23) - 1);
    std::uniform_int_distribution<int> width(1, 23);
    boost::mp11::mp_for_each<boost::mp11::mp_transform<std::type_identity, blockwise_cases>>(
        [&]<class Id>(Id) {
            using Case = typename Id::type;
            using C = typename Case::type;
            using F = family<C>;
            const auto h = Case::hyper();
            INFO(Case::label());
            constexpr std::size_t n = 4 * Case::block + 3;
            std::vector<float> x(n);
            for (std::size_t i = 0; i < n; ++i) {
                // a subnormal (or zero) of random magnitude: a random mantissa of random width
                const std::uint32_t m = mantissa(rng) >> (23 - width(rng));
                x[i] = std::bit_cast<float>(m | (rng() % 2 ? 0x80000000u : 0u));
            }
            const lc::segment segs[] = {one_d(0, n)};
            const lc::encode_context ctx{.seed = rng(), .round = 1, .rank = 0};
            const auto p = encode<C>(h, x, segs, ctx);
            std::vector<float> out(n);
            C::decode(h, p, segs, out);
            for (std::size_t b = 0; b * Case::block < n; ++b) {
                const std::size_t begin = b * Case::block;
                const std::size_t end = std::min(n, begin + Case::block);
                const double s = F::reference_scale(h, x.data() + begin, end - begin);
                for (std::size_t i = begin; i < end; ++i) {
                    CHECK(std::abs(double(out[i]) - x[i]) <= F::bound(h, x[i], s));
                }
            }
        });
    // Where the term is needed: 2 bits, s = 2^-148, x = 0 has t = 1.5 and the tie goes to code
    // 2, whose level s / 3 rounds up to 2^-149, 2^-149 / 3 past the quantization's s / L.
    using Q = lc::blockwise<2, 4>;
    const float tiny = 0x1p-149f;
    const std::vector<float> v = {0.0f, 2 * tiny, -2 * tiny, tiny};
    const lc::segment segs[] = {one_d(0, 4)};
    std::vector<float> out(4);
    Q::decode({}, encode<Q>({}, v, segs, {}), segs, out);
    CHECK(out[0] == tiny);
    CHECK(double(out[0]) > 0x1p-148 / 3 + 0x1p-20 * 0x1p-148);
    CHECK(double(out[0]) <= family<Q>::bound({}, 0.0, 0x1p-148));
}

TEST_CASE("blockwise: exact levels on a hand example") {
    // 2 bits, absmax: s = 3, levels -3, -1, 1, 3; t = (x / 3 + 1) * 1.5.
    //   x = 3 -> t = 3; x = 0 -> t = 1.5 -> 2 (tie to even); x = -2 -> t = 0.5 -> 0 (tie to even);
    //   x = 0.5 -> t = 1.75 -> 2; x = -3 -> 0.
    using Q = lc::blockwise<2, 8>;
    const std::vector<float> v = {3, 0, -2, 0.5f, -3};
    const lc::segment segs[] = {one_d(0, 5)};
    const auto p = encode<Q>({}, v, segs, {});
    CHECK(wire::get<float>(p, 40) == 3.0f);
    const unsigned want[] = {3, 2, 0, 2, 0};
    for (std::size_t j = 0; j < 5; ++j) {
        CHECK(wire::unpack<2>(p.data() + 44, j) == want[j]);
    }
    std::vector<float> out(5);
    Q::decode({}, p, segs, out);
    CHECK(out == std::vector<float>{3, 1, -3, 1, -3});
    // 1 bit: sign(x) * s, x = 0 lands on the tie t = 0.5 and goes to code 0, -s.
    using S1 = lc::blockwise<1, 8>;
    S1::decode({}, encode<S1>({}, v, segs, {}), segs, out);
    CHECK(out == std::vector<float>{3, -3, -3, 3, -3});
}

TEST_CASE("blockwise: payloads that pass the checksum but break the format are refused") {
    using Q = lc::blockwise<2, 4>;
    const std::vector<float> v = {1, -2, 3, 0.5f, 0, 0, 0, 0, 7};
    const lc::segment segs[] = {one_d(0, 9)};
    const auto p = encode<Q>({}, v, segs, {});
    // Body: 3 scales, 3 bytes of codes (9 codes), 1 byte of alignment.
    const float bad_scales[] = {-1.0f, -0.0f, std::numeric_limits<float>::infinity(),
                                float_of(0x7fc00001u), float_of(0xffc00000u)};  // other NaNs
    for (const float s : bad_scales) {
        auto bad = p;
        wire::put<float>(bad, 40, s);
        reseal(bad);
        check_refused<Q>({}, bad, segs, 9, "a negative or non-finite scale");
    }
    {
        auto bad = p;
        bad[52 + 1] ^= std::byte{0x01};  // a code of the zero block (elements 4..7)
        reseal(bad);
        check_refused<Q>({}, bad, segs, 9, "a zero block with a code other than that of 0");
    }
    {
        auto bad = p;
        bad[52 + 2] |= std::byte{0x04};  // element 9's slot
        reseal(bad);
        check_refused<Q>({}, bad, segs, 9, "padding bits");
    }
    {
        auto bad = p;
        bad[52 + 3] = std::byte{0x80};
        reseal(bad);
        check_refused<Q>({}, bad, segs, 9, "alignment padding");
    }
    std::vector<float> out(9);
    CHECK_NOTHROW(Q::decode({}, p, segs, out));
}

// A block whose scale is 0 or NaN holds the zero code k0 = round_half_to_even(L / 2) at every
// element, its last one included: any other code at any of its elements is refused.
TEST_CASE("blockwise: a zero-scale or NaN-scale block with another code at any element is "
          "refused") {
    auto rng = rng_for("blockwise zero-block codes");
    const auto run = [&]<int Bits, std::size_t Block>() {
        using Q = lc::blockwise<Bits, Block>;
        constexpr unsigned top = (1u << Bits) - 1u;  // L
        constexpr std::size_t per_byte = 8 / Bits;
        const auto k0 = static_cast<unsigned>(round_half_even(top / 2.0));
        INFO("blockwise<" << Bits << ", " << Block << ">, k0 = " << k0);
        // Blocks: normal values; zeros; normal values and a NaN; a short last block of 3 zeros.
        constexpr std::size_t n = 3 * Block + 3;
        std::vector<float> v = normal_floats(rng, n);
        std::fill(v.begin() + Block, v.begin() + 2 * Block, 0.0f);
        v[2 * Block + rng() % Block] = std::numeric_limits<float>::quiet_NaN();
        std::fill(v.begin() + 3 * Block, v.end(), 0.0f);
        const lc::segment segs[] = {one_d(0, n)};
        const auto p = encode<Q>({}, v, segs, {});
        const std::size_t codes = wire::header_bytes + 4 * 4;  // after the 4 scales
        const std::uint32_t want_scale[] = {0u, 0x7fc00000u, 0u};  // blocks 1, 2, 3
        for (std::size_t b = 1; b < 4; ++b) {
            REQUIRE(bits_of(wire::get<float>(p, wire::header_bytes + 4 * b)) == want_scale[b - 1]);
        }
        const auto with_code = [&](std::vector<std::byte> q, std::size_t j, unsigned code) {
            auto& byte = reinterpret_cast<unsigned char&>(q[codes + j / per_byte]);
            const auto shift = static_cast<unsigned>((j % per_byte) * Bits);
            byte = static_cast<unsigned char>((byte & ~(top << shift)) | (code << shift));
            return q;
        };
        std::vector<unsigned> wrong;  // the lowest, highest and neighbouring codes, not k0
        for (const unsigned code : {0u, 1u, k0 - 1, k0 + 1, top - 1, top}) {
            if (code != k0 && code <= top &&
                std::find(wrong.begin(), wrong.end(), code) == wrong.end()) {
                wrong.push_back(code);
            }
        }
        std::size_t edits = 0;
        for (std::size_t j = Block; j < n; ++j) {
            REQUIRE(wire::unpack<Bits>(p.data() + codes, j) == k0);
            for (const unsigned code : wrong) {
                CAPTURE(j);
                CAPTURE(code);
                check_refused<Q>({}, [&] {
                    auto bad = with_code(p, j, code);
                    reseal(bad);
                    return bad;
                }(), segs, n, "a code other than k0 in a zero-scale or NaN-scale block");
                ++edits;
            }
        }
        CHECK(edits >= 2 * Block + 3);
        std::vector<float> out(n);
        CHECK_NOTHROW(Q::decode({}, p, segs, out));
    };
    run.operator()<1, 8>();
    run.operator()<2, 4>();
    run.operator()<4, 4>();
    run.operator()<8, 4>();
}

TEST_CASE("blockwise: hyper-parameters are checked") {
    using Q = lc::blockwise<4, 16>;
    CHECK_THROWS_AS(Q::validate({.scale = static_cast<lc::scale_kind>(2)}), loco::invalid_argument);
    CHECK_THROWS_AS(Q::validate({.round = static_cast<lc::rounding>(5)}), loco::invalid_argument);
    const lc::segment segs[] = {one_d(0, 4)};
    CHECK_THROWS_AS(Q::payload_bytes({.round = static_cast<lc::rounding>(5)}, segs),
                    loco::invalid_argument);
}

namespace {

// Stochastic rounding is unbiased: the mean of `draws` decodes under independent seeds converges to
// x. Each draw is one of the two levels around x, one step (2s/L) apart, so its standard deviation
// is at most step/2 and that of the mean at most step / (2 sqrt(draws)). The check allows 6 of
// those (a false alarm about once in 5e8 elements) plus the fp32 rounding the error bound allows.
template <class Case>
void check_unbiased() {
    using C = typename Case::type;
    const auto h = Case::hyper();
    INFO("case: " << Case::label());
    auto rng = rng_for("compress unbiased " + Case::label());
    constexpr std::size_t n = 96;
    constexpr int draws = 4000;
    const std::vector<float> x = normal_floats(rng, n);
    const lc::segment segs[] = {one_d(0, n)};
    std::vector<double> sum(n, 0.0);
    std::vector<float> out(n);
    const std::uint64_t seed = rng();
    for (int d = 0; d < draws; ++d) {
        const auto p = encode<C>(h, x, segs, {.seed = seed + static_cast<std::uint64_t>(d)});
        C::decode(h, p, segs, out);
        for (std::size_t i = 0; i < n; ++i) {
            sum[i] += out[i];
        }
    }
    const auto p = encode<C>(h, x, segs, {});
    constexpr double levels = C::top_code;
    findings log;
    std::size_t tested = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const double s = wire::get<float>(p, 40 + 4 * (i / Case::block));
        if (std::abs(x[i]) > s) {
            continue;  // clipped by mean_abs: biased by design
        }
        ++tested;
        const double step = 2 * s / levels;
        const double bound = 6 * step / (2 * std::sqrt(double(draws))) + 0x1p-20 * s;
        const double mean = sum[i] / draws;
        log.expect(std::abs(mean - x[i]) <= bound, "element ", i, ": mean ", mean, " of x = ", x[i],
                   " is ", std::abs(mean - x[i]), " away, more than ", bound);
    }
    log.check();
    // Enough elements were tested for the check to mean something. With mean_abs scales about
    // 58 % of normal elements lie within their block's scale on average, but blocks of 7 make the
    // count vary (45 of 96 was seen in CI, seed 5299276508585555635): a quarter is the floor.
    CHECK(tested >= n / 4);
}

}  // namespace

TEST_CASE_TEMPLATE("blockwise: stochastic rounding is unbiased", Case,
                   blockwise_case<1, 64, absmax, stochastic>,
                   blockwise_case<1, 16, mean_abs, stochastic>,
                   blockwise_case<2, 256, absmax, stochastic>,
                   blockwise_case<2, 32, mean_abs, stochastic>,
                   blockwise_case<4, 32, absmax, stochastic>,
                   blockwise_case<4, 7, mean_abs, stochastic>,
                   blockwise_case<8, 1000, absmax, stochastic>,
                   blockwise_case<8, 50, mean_abs, stochastic>) {
    check_unbiased<Case>();
}

TEST_CASE("2-bit payloads of a million elements are about N/4 bytes") {
    constexpr std::size_t n = 1000000;
    auto rng = rng_for("compress 2-bit size");
    const std::vector<float> x = normal_floats(rng, n);
    const lc::segment segs[] = {one_d(0, n)};
    const double quarter = n / 4.0;
    std::vector<float> out(n);

    using S = lc::statistical<2>;
    const auto ps = encode<S>({}, x, segs, {});
    S::decode({}, ps, segs, out);
    CHECK(ps.size() == 40 + 20 + n / 4);
    CHECK(ps.size() <= 1.03 * quarter);

    // Block 256: 64 bytes of codes and a 4-byte scale per block, 1/16 = 6.25 % over N/4.
    using Q = lc::blockwise<2, 256>;
    const auto pq = encode<Q>({}, x, segs, {});
    Q::decode({}, pq, segs, out);
    CHECK(pq.size() == 40 + 4 * 3907 + n / 4);
    CHECK(pq.size() <= 1.0625 * quarter + 44);
    // Blocks of 1024 or more keep the scales under 3 %.
    using W = lc::blockwise<2, 1024>;
    const auto pw = encode<W>({}, x, segs, {});
    CHECK(pw.size() == 40 + 4 * 977 + n / 4);
    CHECK(pw.size() <= 1.03 * quarter);
    MESSAGE("2-bit payloads for 1e6 elements: statistical " << ps.size() << " bytes, blockwise<2, 256> "
            << pq.size() << ", blockwise<2, 1024> " << pw.size() << " (N/4 = " << n / 4 << ")");
}

TEST_CASE("topk: ties go to the lower index, NaN is always sent, k follows the ratio") {
    using T = lc::topk;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const std::vector<float> v = {1, -3, 3, 0, -3, 2, nan, -0.0f};
    const lc::segment segs[] = {one_d(0, 8)};
    const T::hyper h{.ratio = 0.5f};  // k = 4
    const auto p = encode<T>(h, v, segs, {});
    REQUIRE(p.size() == 40 + 8 * 4);
    const std::uint32_t want[] = {1, 2, 4, 6};  // NaN, then |3| at 1, 2, 4
    for (std::size_t j = 0; j < 4; ++j) {
        CHECK(wire::get<std::uint32_t>(p, 40 + 4 * j) == want[j]);
    }
    std::vector<float> out(8);
    T::decode(h, p, segs, out);
    CHECK(out[0] == 0.0f);
    CHECK(out[1] == -3.0f);
    CHECK(out[2] == 3.0f);
    CHECK(out[4] == -3.0f);
    CHECK(std::isnan(out[6]));
    CHECK(out[5] == 0.0f);
    // ceil(0.3 * 8) = 3 (the float 0.3 is slightly above 0.3), k at least 1, at most n.
    CHECK(T::payload_bytes({.ratio = 0.3f}, segs) == 40 + 8 * 3);
    CHECK(T::payload_bytes({.ratio = 1e-9f}, segs) == 40 + 8 * 1);
    CHECK(T::payload_bytes({.ratio = 1.0f}, segs) == 40 + 8 * 8);
    CHECK(T::count({.ratio = 0.3f}, 10) == 4);  // the float 0.3f is above 0.3 (docs/compressors.md)
    CHECK(T::count({}, 1000) == 20);
    CHECK(T::count({}, 1001) == 21);
    CHECK(T::count({}, 0) == 0);
}

TEST_CASE("topk: hyper-parameters are checked") {
    const lc::segment segs[] = {one_d(0, 8)};
    for (const float bad : {0.0f, -0.1f, 1.5f, std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity()}) {
        CHECK_THROWS_AS(lc::topk::validate({.ratio = bad}), loco::invalid_argument);
        CHECK_THROWS_AS(lc::topk::payload_bytes({.ratio = bad}, segs), loco::invalid_argument);
    }
}

TEST_CASE("topk: payloads that pass the checksum but break the format are refused") {
    using T = lc::topk;
    const std::vector<float> v = {5, 1, -7, 2, 0, 3, 9, -1};
    const lc::segment segs[] = {one_d(0, 8)};
    const T::hyper h{.ratio = 0.375f};  // k = 3: indices 0, 2, 6
    const auto p = encode<T>(h, v, segs, {});
    const std::uint32_t edits[][3] = {{0, 2, 8}, {0, 2, 2}, {2, 0, 6}, {0, 6, 2}, {0, 0, 6},
                                      {0, 2, 0xffffffffu}};
    for (const auto& e : edits) {
        auto bad = p;
        for (std::size_t j = 0; j < 3; ++j) {
            wire::put<std::uint32_t>(bad, 40 + 4 * j, e[j]);
        }
        reseal(bad);
        check_refused<T>(h, bad, segs, 8, "indices out of range, repeated or not ascending");
    }
    // Other ascending in-range indices are a valid payload, resealed or not.
    auto other = p;
    wire::put<std::uint32_t>(other, 40 + 4, 3);
    reseal(other);
    std::vector<float> out(8);
    T::decode(h, other, segs, out);
    CHECK(out == std::vector<float>{5, 0, 0, -7, 0, 0, 9, 0});
}

namespace {

// C::decode_support into sent, where C has one; false where it has none (its payloads are dense).
template <class C>
bool support_of(const typename C::hyper& h, std::span<const std::byte> p,
                std::span<const lc::segment> segs, std::span<std::uint8_t> sent) {
    if constexpr (requires { C::decode_support(h, p, segs, sent); }) {
        C::decode_support(h, p, segs, sent);
        return true;
    } else {
        return false;
    }
}

// The kind of loco error f throws, or "" when it returns.
template <class F>
std::string refusal_of(F f) {
    try {
        f();
    } catch (const loco::wire_error&) {
        return "wire_error";
    } catch (const loco::shape_error&) {
        return "shape_error";
    } catch (const loco::invalid_argument&) {
        return "invalid_argument";
    }
    return "";
}

}  // namespace

// aggregate::median_norm_clip averages each element over the workers whose payload carried it.
// topk had no decode_support, so the exchange took its payloads as dense and divided every
// element by M; error_feedback<C> did not forward C's either.
TEST_CASE("topk: decode_support marks the sent indices, sent zeros included, and refuses what "
          "decode refuses, writing nothing") {
    using T = lc::topk;
    using EF = lc::error_feedback<lc::topk>;
    // Two segments with elements 8 and 13 outside both; the second segment is all zeros, so its
    // k = 2 sent elements are its first two (ties go to the lower index) and decode to 0.
    const std::vector<float> v = {5, 1, -7, 2, 0, 3, 9, -1, 42, 0, 0, 0, 0, 42};
    const lc::segment segs[] = {one_d(0, 8), one_d(9, 4)};
    const T::hyper h{.ratio = 0.375f};  // k = 3 of 8 (indices 0, 2, 6), 2 of 4 (0, 1)
    const auto p = encode<T>(h, v, segs, {});
    const std::uint8_t u = 0xa5;  // untouched
    const std::vector<std::uint8_t> want = {1, 0, 1, 0, 0, 0, 1, 0, u, 1, 1, 0, 0, u};
    std::vector<std::uint8_t> sent(14, u);
    REQUIRE(support_of<T>(h, p, segs, sent));
    CHECK(sent == want);
    // error_feedback<topk>: the same payload (a zero residual) and the same support.
    const EF::hyper eh{.compress = h};
    CHECK(encode<EF>(eh, v, segs, {}) == p);
    std::fill(sent.begin(), sent.end(), u);
    REQUIRE(support_of<EF>(eh, p, segs, sent));
    CHECK(sent == want);
    // Dense payloads have none: every element is sent.
    std::vector<std::uint8_t> dense(14, u);
    CHECK_FALSE(support_of<lc::none>({}, p, segs, dense));
    CHECK_FALSE(support_of<lc::error_feedback<lc::none>>({}, p, segs, dense));

    // Refused payloads and buffers: the same error as decode, nothing written.
    std::vector<std::pair<std::string, std::vector<std::byte>>> bad;
    const std::uint32_t edits[][3] = {{0, 2, 8}, {0, 2, 2}, {2, 0, 6}, {0, 6, 2}};
    for (const auto& e : edits) {
        auto b = p;
        for (std::size_t j = 0; j < 3; ++j) wire::put<std::uint32_t>(b, 40 + 4 * j, e[j]);
        reseal(b);
        bad.emplace_back("indices out of range, repeated or not ascending", b);
    }
    {
        auto b = p;  // an index of the second segment past its 4 elements
        wire::put<std::uint32_t>(b, 40 + 24 + 4, 4);
        reseal(b);
        bad.emplace_back("an index past the second segment", b);
    }
    bad.emplace_back("truncated", std::vector<std::byte>(p.begin(), p.end() - 1));
    bad.emplace_back("no checksum", [&] {
        auto b = p;
        b[40] ^= std::byte{1};
        return b;
    }());
    for (const auto& [what, b] : bad) {
        INFO(what);
        std::vector<float> out(14);
        std::fill(sent.begin(), sent.end(), u);
        const std::string decode_says = refusal_of([&] { T::decode(h, b, segs, out); });
        CHECK(decode_says == "wire_error");
        CHECK(refusal_of([&] { support_of<T>(h, b, segs, sent); }) == decode_says);
        CHECK(refusal_of([&] { support_of<EF>(eh, b, segs, sent); }) == decode_says);
        CHECK(std::all_of(sent.begin(), sent.end(), [&](std::uint8_t x) { return x == u; }));
    }
    // Other settings (the header's ratio), a buffer too short for the segments, a bad ratio.
    std::vector<float> out(14);
    std::vector<std::uint8_t> short_sent(12, u);
    std::vector<float> short_out(12);
    const T::hyper other{.ratio = 0.5f}, wrong{.ratio = 0.0f};
    const std::pair<std::string, std::string> cases[] = {
        {refusal_of([&] { T::decode(other, p, segs, out); }),
         refusal_of([&] { support_of<T>(other, p, segs, sent); })},
        {refusal_of([&] { T::decode(h, p, segs, short_out); }),
         refusal_of([&] { support_of<T>(h, p, segs, short_sent); })},
        {refusal_of([&] { T::decode(wrong, p, segs, out); }),
         refusal_of([&] { support_of<T>(wrong, p, segs, sent); })},
    };
    CHECK(cases[0].first == "wire_error");
    CHECK(cases[1].first == "shape_error");
    CHECK(cases[2].first == "invalid_argument");
    for (const auto& [decode_says, support_says] : cases) CHECK(support_says == decode_says);
    CHECK(std::all_of(sent.begin(), sent.end(), [&](std::uint8_t x) { return x == u; }));
    CHECK(std::all_of(short_sent.begin(), short_sent.end(), [&](std::uint8_t x) { return x == u; }));
}

TEST_CASE("cast: fp16 overflows to infinity at 65520, NaN and infinities pass through") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    const std::vector<float> v = {65504, 65519.99f, 65520, -1e6f, nan, -inf, 1e-8f, 3e38f};
    const lc::segment segs[] = {one_d(0, 8)};
    std::vector<float> out(8);
    using H = lc::cast<loco::fp16>;
    H::decode({}, encode<H>({}, v, segs, {}), segs, out);
    CHECK(out[0] == 65504.0f);
    CHECK(out[1] == 65504.0f);
    CHECK(out[2] == inf);
    CHECK(out[3] == -inf);
    CHECK(std::isnan(out[4]));
    CHECK(out[5] == -inf);
    CHECK(out[6] == 0.0f);  // 1e-8 is 0.17 of the smallest subnormal step
    CHECK(out[7] == inf);
    using B = lc::cast<loco::bf16>;
    B::decode({}, encode<B>({}, v, segs, {}), segs, out);
    CHECK(out[3] == -999424.0f);  // 1e6 = 1.9073 * 2^19 to 8 significant bits: 1.90625 * 2^19
    CHECK(std::isnan(out[4]));
    CHECK(out[5] == -inf);
    CHECK(std::abs(out[7] - 3e38f) <= 3e38f / 256);
}

TEST_CASE_TEMPLATE("cast: every NaN is sent as the one canonical quiet NaN", Half, loco::bf16,
                   loco::fp16) {
    // An x86 host and a GPU give different NaN bits for the same arithmetic (x86 keeps the
    // operand's payload or makes the negative "indefinite" NaN, a GPU makes 0x7fffffff); the
    // payload must not say where it was encoded.
    const std::vector<float> v = {float_of(0x7fc00000u), float_of(0xffc00000u),
                                  float_of(0x7fffffffu), float_of(0x7f800001u),
                                  float_of(0xff812345u), 1.5f};
    const lc::segment segs[] = {one_d(0, v.size())};
    using H = lc::cast<Half>;
    const auto payload = encode<H>({}, v, segs, {});
    const std::uint16_t canonical = std::is_same_v<Half, loco::bf16> ? 0x7fc0 : 0x7e00;
    for (std::size_t i = 0; i + 1 < v.size(); ++i) {
        CAPTURE(i);
        CHECK(wire::get<std::uint16_t>(payload, wire::header_bytes + 2 * i) == canonical);
    }
    std::vector<float> out(v.size());
    H::decode({}, payload, segs, out);
    for (std::size_t i = 0; i + 1 < v.size(); ++i) {
        CHECK(std::isnan(out[i]));
    }
    CHECK(out.back() == 1.5f);
}

TEST_CASE("topk: every NaN has one key and is sent as the canonical quiet NaN") {
    // Two NaNs of different bits tie: the lower index goes first, whatever the bits (an x86 host
    // and a GPU make different NaN bits from the same arithmetic).
    const std::vector<float> v = {1.0f, float_of(0xffc00000u), float_of(0x7fffffffu), -3.0f};
    CHECK(lc::topk::magnitude_key(v[1]) == lc::topk::magnitude_key(v[2]));
    CHECK(lc::topk::magnitude_key(v[1]) > lc::topk::magnitude_key(
                                               std::numeric_limits<float>::infinity()));
    const lc::segment segs[] = {one_d(0, v.size())};
    const lc::topk::hyper h{.ratio = 0.25f};  // k = 1
    const auto payload = encode<lc::topk>(h, v, segs, {});
    CHECK(wire::get<std::uint32_t>(payload, wire::header_bytes) == 1u);
    CHECK(bits_of(wire::get<float>(payload, wire::header_bytes + 4)) == 0x7fc00000u);
}

namespace {

// A group of n values with an exact tie of the bin rule at t = 0.5 or 2.5 (B = 4, offset 2), where
// rounding half to even (torch.round, which MuLoCo's and templar's quantizers call) and rounding
// half up disagree, and the codes and decoded values the rule gives, computed in double from the
// specification (statistical.hpp, sparseloco.hpp):
//   shift = mean(x) -> fp32; c = x - shift; sigma = sqrt(sum c^2 / (n - 1));
//   scale = range sigma / B -> fp32; q = clamp(round_half_to_even(c / scale + B/2), 0, B - 1);
//   lut_b = mean of c over q == b -> fp32; decoded = fp32(lut[q] + shift).
// Random small integers times a random power of two, drawn until every quantity is exact in
// double and fp32 (so the fp32 t of the library is exactly the tie) and some t is such a tie.
struct tie_group {
    std::vector<float> x;
    float shift = 0.0f;
    std::array<float, 4> lut{};
    std::vector<unsigned> q;
    std::vector<float> decoded;
};

tie_group draw_tie_group(std::mt19937_64& rng, std::size_t n, double range) {
    std::uniform_int_distribution<int> small(-8, 8), offset(-100, 100), power(-6, 6);
    const auto exact_in_fp32 = [](double v) { return double(float(v)) == v; };
    const auto half_to_even = [](double t) {
        const double low = std::floor(t);
        if (t - low != 0.5) return t - low < 0.5 ? low : low + 1.0;
        return std::fmod(low, 2.0) == 0.0 ? low : low + 1.0;
    };
    for (int attempt = 0; attempt < 1000000; ++attempt) {
        tie_group g;
        const int m = offset(rng), k = power(rng);
        for (std::size_t i = 0; i < n; ++i) g.x.push_back(std::ldexp(float(small(rng) + m), k));
        double sum = 0.0;
        for (const float v : g.x) sum += v;
        const double shift = sum / double(n);
        if (!exact_in_fp32(shift)) continue;
        std::vector<double> c;
        double squares = 0.0;
        for (const float v : g.x) {
            c.push_back(double(v) - shift);
            squares += c.back() * c.back();
        }
        const double var = squares / double(n - 1), sigma = std::sqrt(var);
        const double scale = range * sigma / 4.0;
        if (!(sigma > 0.0) || sigma * sigma != var || !exact_in_fp32(scale)) continue;
        bool tie = false;
        std::array<double, 4> bin_sum{}, bin_count{};
        for (const double ci : c) {
            const double t = ci / scale + 2.0;
            tie = tie || t == 0.5 || t == 2.5;  // half to even: 0 and 2; half up: 1 and 3
            const auto q = unsigned(std::clamp(half_to_even(t), 0.0, 3.0));
            g.q.push_back(q);
            bin_sum[q] += ci;
            bin_count[q] += 1.0;
        }
        if (!tie) continue;
        g.shift = float(shift);
        for (std::size_t b = 0; b < 4; ++b) {
            g.lut[b] = bin_count[b] == 0.0 ? 0.0f : float(bin_sum[b] / bin_count[b]);
        }
        for (const unsigned q : g.q) g.decoded.push_back(g.lut[q] + g.shift);
        return g;
    }
    FAIL("no group with an exact tie drawn");
    return {};
}

}  // namespace

TEST_CASE("statistical and sparseloco: a value exactly halfway between two bins rounds half to even") {
    // bin_code::code, shared by MuLoCo's statistical quantizer and SparseLoCo's kept values:
    // round_half_to_even, as torch.round in MuLoCo's QuantizationCompressor and templar's
    // _quantize_values. Random groups of 8 values with an exact tie at t = 0.5 or 2.5, range 6
    // (both references' quantization_range), against the rule computed in double.
    auto rng = rng_for("bin code ties");
    for (int trial = 0; trial < 4; ++trial) {
        const tie_group g = draw_tie_group(rng, 8, 6.0);
        CAPTURE(trial);
        INFO("x = " << ::doctest::toString(g.x));
        const lc::segment segs[] = {one_d(0, g.x.size())};

        // statistical<2> per tensor: shift and lut records at 40, the codes at 60.
        using S = lc::statistical<2>;
        const auto p = encode<S>({}, g.x, segs, {});
        CHECK(wire::get<float>(p, wire::header_bytes) == g.shift);
        for (std::size_t b = 0; b < 4; ++b) {
            CHECK(wire::get<float>(p, wire::header_bytes + 4 + 4 * b) == g.lut[b]);
        }
        for (std::size_t i = 0; i < g.x.size(); ++i) {
            CAPTURE(i);
            CHECK(wire::unpack<2>(p.data() + wire::header_bytes + 20, i) == g.q[i]);
        }
        std::vector<float> out(g.x.size());
        S::decode({}, p, segs, out);
        CHECK(out == g.decoded);

        // sparseloco with one chunk keeping all 8 cells (compact indices: none sent), e = x:
        // shift and lut at 40, the 2-bit codes at 60; decode D and the accumulator e - D.
        const lc::sparseloco::hyper h{.chunk = 8, .topk = 8};
        std::vector<float> e(g.x.size(), 0.0f);
        std::vector<std::byte> sp(lc::sparseloco::payload_bytes(h, segs));
        lc::sparseloco::encode(h, g.x, segs, e, {}, sp);
        CHECK(wire::get<float>(sp, wire::header_bytes) == g.shift);
        for (std::size_t b = 0; b < 4; ++b) {
            CHECK(wire::get<float>(sp, wire::header_bytes + 4 + 4 * b) == g.lut[b]);
        }
        for (std::size_t j = 0; j < g.x.size(); ++j) {
            CAPTURE(j);
            CHECK(wire::get_bits(sp.data() + wire::header_bytes + 20, j, 2) == g.q[j]);
            CHECK(e[j] == g.x[j] - g.decoded[j]);
        }
        std::vector<float> d(g.x.size(), 0.0f);
        lc::sparseloco::decode(h, sp, segs, d);
        CHECK(d == g.decoded);
    }
}

// error_feedback sends e = decay * e0 + s * delta with s = ctx.outer_lr only under fold_outer_lr,
// else s = 1 whatever ctx.outer_lr is. topk at ratio 1 sends every element exactly, so from e0 = 0
// the decode is delta itself, or fp32(outer_lr * delta) (exact in double, rounded once).
TEST_CASE("error_feedback: ctx.outer_lr scales delta only with fold_outer_lr") {
    using EF = lc::error_feedback<lc::topk>;
    auto rng = rng_for("error feedback outer lr");
    constexpr std::size_t n = 64;
    const std::vector<float> x = normal_floats(rng, n);
    const lc::segment segs[] = {one_d(0, n)};
    std::uniform_real_distribution<float> pick_lr(0.05f, 0.95f);
    for (const float lr : {0.5f, pick_lr(rng), 3.0f}) {
        for (const bool fold : {false, true}) {
            CAPTURE(lr);
            CAPTURE(fold);
            const EF::hyper h{.compress = {.ratio = 1.0f}, .decay = 0.9f, .fold_outer_lr = fold};
            std::vector<float> state(n, 0.0f);
            std::vector<std::byte> p(EF::payload_bytes(h, segs));
            EF::encode(h, x, segs, state, {.outer_lr = lr}, p);
            std::vector<float> out(n);
            EF::decode(h, p, segs, out);
            findings log;
            for (std::size_t i = 0; i < n; ++i) {
                const float want =
                    fold ? static_cast<float>(double(lr) * double(x[i])) : x[i];
                log.expect(bits_of(out[i]) == bits_of(want), "element ", i, ": sent ", out[i],
                           ", expected ", want);
                log.expect(state[i] == 0.0f, "element ", i, ": residual ", state[i]);
            }
            log.check();
        }
    }
}

// error_feedback's new residual is e - D(Q(e)) with e = decay * e0 + s * delta taken as the one
// fp32 value that was encoded: where Q sends e exactly (topk at ratio 1 sends every element) the
// residual is exactly 0, however e0 and delta rounded into e. With e0 = 1, delta = 2^-30, decay 1:
// e rounds to 1, 1 is sent, and the residual is 0 (not the 2^-30 that the rounding dropped).
TEST_CASE("error_feedback: an element sent exactly leaves a residual of exactly 0") {
    using EF = lc::error_feedback<lc::topk>;
    auto rng = rng_for("error feedback exact residual");
    constexpr std::size_t n = 64;
    const lc::segment segs[] = {one_d(0, n)};
    std::uniform_real_distribution<float> unit(0.05f, 1.0f);
    struct setting {
        float decay;
        bool fold;
        float lr;
    };
    for (const setting s : {setting{1.0f, false, 1.0f}, setting{unit(rng), false, unit(rng)},
                            setting{unit(rng), true, unit(rng)}}) {
        CAPTURE(s.decay);
        CAPTURE(s.fold);
        CAPTURE(s.lr);
        const EF::hyper h{.compress = {.ratio = 1.0f}, .decay = s.decay, .fold_outer_lr = s.fold};
        // Residuals and deltas of different magnitudes, so that e rounds.
        std::vector<float> state = normal_floats(rng, n);
        std::vector<float> x = normal_floats(rng, n, 1e-3f);
        state[0] = 1.0f;
        x[0] = 0x1p-30f;
        std::vector<std::byte> p(EF::payload_bytes(h, segs));
        EF::encode(h, x, segs, state, {.outer_lr = s.lr}, p);
        std::vector<float> out(n);
        EF::decode(h, p, segs, out);
        if (s.decay == 1.0f && !s.fold) {
            CHECK(out[0] == 1.0f);  // 1 + 2^-30 rounds to 1
        }
        findings log;
        for (std::size_t i = 0; i < n; ++i) {
            log.expect(state[i] == 0.0f, "element ", i, ": residual ", std::hexfloat, state[i],
                       " after sending ", out[i]);
        }
        log.check();
    }
}

// wire::checksum is the documented sum, modulo 2^64, of splitmix64's finaliser of (word_i ^ i) over
// the body's little-endian 8-byte words (the last one zero-padded), plus the body's length:
// recomputed here from that definition, and a few values by hand (the finaliser maps 0 to 0).
TEST_CASE("wire: the checksum is the documented sum over the body's words plus its length") {
    const auto finaliser = [](std::uint64_t z) {
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    };
    const auto documented = [&](const std::vector<std::byte>& body) {
        std::uint64_t sum = body.size();
        for (std::size_t i = 0; 8 * i < body.size(); ++i) {
            std::uint64_t word = 0;
            for (std::size_t b = 0; b < 8 && 8 * i + b < body.size(); ++b) {
                word |= std::uint64_t{std::to_integer<unsigned char>(body[8 * i + b])} << (8 * b);
            }
            sum += finaliser(word ^ i);
        }
        return sum;
    };
    // {} -> 0; one zero byte -> 1 + f(0) = 1; 8 zero bytes -> 8 + f(0) = 8; 9 zero bytes ->
    // 9 + f(0) + f(1); 13 bytes 37 i + 5 (mod 256) -> a value from a separate implementation.
    CHECK(wire::checksum({}) == 0u);
    CHECK(wire::checksum(std::vector<std::byte>(1)) == 1u);
    CHECK(wire::checksum(std::vector<std::byte>(8)) == 8u);
    CHECK(finaliser(1) == 0x5692161d100b05e5ULL);
    CHECK(wire::checksum(std::vector<std::byte>(9)) == 0x5692161d100b05eeULL);
    std::vector<std::byte> counted(13);
    for (std::size_t i = 0; i < counted.size(); ++i) {
        counted[i] = static_cast<std::byte>((37 * i + 5) & 0xff);
    }
    CHECK(documented(counted) == 0xd93355e2b867db92ULL);
    CHECK(wire::checksum(counted) == 0xd93355e2b867db92ULL);
    // Random bodies of every length up to 40 bytes (every tail length, several words).
    auto rng = rng_for("wire checksum");
    for (std::size_t n = 0; n <= 40; ++n) {
        CAPTURE(n);
        std::vector<std::byte> body(n);
        for (std::byte& b : body) {
            b = static_cast<std::byte>(rng() & 0xff);
        }
        CHECK(wire::checksum(body) == documented(body));
    }
    // A payload sealed with the documented sum (as another encoder writes it) decodes.
    using B = lc::cast<loco::bf16>;
    const std::vector<float> x = {1.0f, -2.0f, 3.0f};
    const lc::segment segs[] = {one_d(0, 3)};
    auto p = encode<B>({}, x, segs, {});
    wire::put<std::uint64_t>(p, 32, documented(std::vector<std::byte>(p.begin() + 40, p.end())));
    std::vector<float> out(3);
    CHECK_NOTHROW(B::decode({}, p, segs, out));
    CHECK(out == x);
}
