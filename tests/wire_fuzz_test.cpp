// A seeded random-mutation fuzzer for the compressed payloads (compress/wire.hpp and every
// compressor's decode). For each configuration it encodes a valid payload of a few small segments,
// then decodes mutated copies:
//
//   * truncation at every length, extension by 1..16 bytes, single bit flips, overwrites of 1..4
//     bytes, edits of every header field, and the payloads of every other configuration and of
//     other segment lists: decode must throw loco::wire_error and leave the output untouched,
//     unless the mutated bytes happen to equal the original, where it must decode as before;
//   * body edits with the checksum recomputed ("resealed"), which only the compressor's own
//     checks can catch: decode must either throw loco::wire_error with the output untouched or
//     succeed; never crash, read out of bounds (AddressSanitizer) or throw anything else.
//
// For the chunked top-k payloads of demo and sparseloco, a second test edits their index streams
// at random: an index at or above its chunk's cells, an index equal to its neighbour, two
// neighbours swapped (fixed width), a one added to or taken from an Elias-Fano high part
// (the compact coding of both); each, resealed, must be refused with the output untouched.
//
// The generator is seeded from the process seed (LOCO_TEST_SEED repeats a run).
#include <doctest/doctest.h>

#include "support/payloads.hpp"
#include "support/random.hpp"

#include <loco/compress/blockwise.hpp>
#include <loco/compress/cast.hpp>
#include <loco/compress/demo.hpp>
#include <loco/compress/none.hpp>
#include <loco/compress/sparseloco.hpp>
#include <loco/compress/statistical.hpp>
#include <loco/compress/topk.hpp>
#include <loco/compress/wire.hpp>
#include <loco/error.hpp>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace lc = loco::compress;
namespace wire = loco::compress::wire;

using bytes = std::vector<std::byte>;
using segment_list = std::vector<lc::segment>;

// One compressor with its settings, type-erased so that payloads can cross configurations.
struct configuration {
    std::string label;
    std::function<std::size_t(const segment_list&)> payload_bytes;
    std::function<void(const std::vector<float>&, const segment_list&, const lc::encode_context&,
                       std::span<std::byte>)>
        encode;
    std::function<void(std::span<const std::byte>, const segment_list&, std::span<float>)> decode;
};

template <class C>
configuration make(std::string label, typename C::hyper h = {}) {
    return {std::move(label),
            [h](const segment_list& segs) { return C::payload_bytes(h, segs); },
            [h](const std::vector<float>& x, const segment_list& segs,
                const lc::encode_context& ctx, std::span<std::byte> out) {
                // Compressors with state (error feedback) start from zero state.
                std::vector<float> state(static_cast<std::size_t>(C::state_size) * x.size(), 0.0f);
                C::encode(h, x, segs, state, ctx, out);
            },
            [h](std::span<const std::byte> in, const segment_list& segs, std::span<float> out) {
                C::decode(h, in, segs, out);
            }};
}

std::vector<configuration> configurations() {
    using lc::granularity;
    using lc::rounding;
    using lc::scale_kind;
    std::vector<configuration> all = {
        make<lc::none>("none"),
        make<lc::cast<loco::bf16>>("cast<bf16>"),
        make<lc::cast<loco::fp16>>("cast<fp16>"),
        make<lc::topk>("topk 0.02"),
        make<lc::topk>("topk 0.3", {.ratio = 0.3f}),
        make<lc::topk>("topk 0.5", {.ratio = 0.5f}),
        make<lc::blockwise<2, 256>>("blockwise<2, 256>"),
        make<lc::blockwise<2, 5>>("blockwise<2, 5> mean_abs stochastic",
                                  {.scale = scale_kind::mean_abs, .round = rounding::stochastic}),
        make<lc::statistical<2>>("statistical<2> range 4", {.range = 4.0f}),
        // Chunked top-k: indices strictly ascending per chunk, at the chunk's width or compact.
        make<lc::demo>("demo"),
        make<lc::demo>("demo fixed indices signs",
                       {.sign = true, .indices = lc::index_coding::fixed}),
        make<lc::demo>("demo chunk 8 topk 5 fixed indices",
                       {.chunk = 8, .topk = 5, .indices = lc::index_coding::fixed}),
        make<lc::demo>("demo chunk 4 topk 3", {.chunk = 4, .topk = 3}),
        make<lc::demo>("demo chunk 4 topk 3 signs", {.chunk = 4, .topk = 3, .sign = true}),
        make<lc::demo>("demo chunk 8 topk 1 signs", {.chunk = 8, .topk = 1, .sign = true}),
        make<lc::sparseloco>("sparseloco"),
        make<lc::sparseloco>("sparseloco fixed indices", {.indices = lc::index_coding::fixed}),
        make<lc::sparseloco>("sparseloco chunk 4 topk 3 bins 3",
                             {.chunk = 4, .topk = 3, .bins = 3}),
        make<lc::sparseloco>("sparseloco chunk 3 topk 2 bins 256",
                             {.chunk = 3, .topk = 2, .bins = 256}),
    };
    const auto add_blockwise = [&]<int Bits, std::size_t Block>() {
        for (const auto scale : {scale_kind::absmax, scale_kind::mean_abs}) {
            for (const auto round : {rounding::nearest, rounding::stochastic}) {
                all.push_back(make<lc::blockwise<Bits, Block>>(
                    "blockwise<" + std::to_string(Bits) + ", " + std::to_string(Block) + "> " +
                        (scale == scale_kind::absmax ? "absmax " : "mean_abs ") +
                        (round == rounding::nearest ? "nearest" : "stochastic"),
                    {.scale = scale, .round = round}));
            }
        }
    };
    add_blockwise.operator()<1, 16>();
    add_blockwise.operator()<2, 8>();
    add_blockwise.operator()<4, 4>();
    add_blockwise.operator()<8, 32>();
    const auto add_statistical = [&]<int Bits>() {
        all.push_back(make<lc::statistical<Bits>>("statistical<" + std::to_string(Bits) + "> tensor"));
        all.push_back(make<lc::statistical<Bits>>("statistical<" + std::to_string(Bits) + "> row",
                                                  {.per = granularity::row}));
    };
    add_statistical.operator()<1>();
    add_statistical.operator()<2>();
    add_statistical.operator()<4>();
    add_statistical.operator()<8>();
    return all;
}

// A few small segments (empty, one element, odd sizes, 2-D) with a gap, and a run of zeros so
// that zero-scale blocks occur.
segment_list fuzz_segments() {
    return {{0, 0, 1, 0}, {0, 1, 1, 1}, {1, 3, 1, 3}, {5, 37, 1, 37}, {42, 24, 4, 6}};
}

std::vector<float> fuzz_inputs(std::mt19937_64& rng) {
    auto x = loco_test::normal_floats(rng, 66);
    std::fill(x.begin() + 5, x.begin() + 13, 0.0f);
    return x;
}

constexpr std::uint32_t sentinel_bits = 0x7fa5a5a5u;

bool untouched(const std::vector<float>& out) {
    return std::all_of(out.begin(), out.end(),
                       [](float v) { return std::bit_cast<std::uint32_t>(v) == sentinel_bits; });
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](float p, float q) {
        return std::bit_cast<std::uint32_t>(p) == std::bit_cast<std::uint32_t>(q);
    });
}

class fuzzer {
public:
    fuzzer(const configuration& c, const segment_list& segs, const bytes& original,
           std::mt19937_64& rng)
        : c_(c), segs_(segs), original_(original), rng_(rng) {
        reference_ = decode_or_refuse(original_).second;
        REQUIRE(!reference_.empty());
    }

    // A mutated payload that keeps its original checksum: refused unless it is the original.
    void expect_refused_unless_original(const bytes& p, const char* kind) {
        ++count_;
        const auto [refused, out] = decode_or_refuse(p);
        if (p == original_) {
            if (refused || !same_bits(out, reference_)) {
                fail(kind, "the original bytes were not decoded as before");
            }
        } else if (!refused) {
            fail(kind, "a mutated payload was accepted");
        }
    }

    // A body edit with a valid checksum: either refused cleanly or decoded; nothing else.
    void expect_no_harm(bytes p) {
        ++count_;
        loco_test::reseal(p);
        const bool refused = decode_or_refuse(p).first;
        resealed_refused_ += refused ? 1 : 0;
        ++resealed_;
    }

    void run(const std::vector<bytes>& foreign) {
        for (std::size_t n = 0; n < original_.size(); ++n) {
            const auto end = original_.begin() + static_cast<std::ptrdiff_t>(n);
            expect_refused_unless_original(bytes(original_.begin(), end), "truncation");
        }
        for (std::size_t extra = 1; extra <= 16; ++extra) {
            bytes p = original_;
            for (std::size_t i = 0; i < extra; ++i) {
                p.push_back(random_byte());
            }
            expect_refused_unless_original(p, "extension");
        }
        for (int i = 0; i < 300; ++i) {
            bytes p = original_;
            const std::size_t bit = pick(8 * p.size());
            p[bit / 8] ^= std::byte{static_cast<unsigned char>(1u << (bit % 8))};
            expect_refused_unless_original(p, "bit flip");
        }
        for (int i = 0; i < 200; ++i) {
            bytes p = original_;
            const std::size_t count = 1 + pick(4);
            for (std::size_t j = 0; j < count; ++j) {
                p[pick(p.size())] = random_byte();
            }
            expect_refused_unless_original(p, "byte overwrite");
        }
        edit_header_fields();
        for (const bytes& p : foreign) {
            expect_refused_unless_original(p, "another configuration's or segment list's payload");
        }
        for (int i = 0; i < 150; ++i) {
            bytes p = original_;
            if (p.size() > wire::header_bytes) {
                const std::size_t count = 1 + pick(3);
                for (std::size_t j = 0; j < count; ++j) {
                    p[wire::header_bytes + pick(p.size() - wire::header_bytes)] = random_byte();
                }
            }
            expect_no_harm(p);
        }
    }

    std::size_t count() const { return count_; }
    std::size_t resealed() const { return resealed_; }
    std::size_t resealed_refused() const { return resealed_refused_; }
    std::size_t failures() const { return failures_; }
    const std::string& first_failures() const { return first_; }

private:
    // (refused, output): the output is empty when decode refused with the sentinel intact.
    std::pair<bool, std::vector<float>> decode_or_refuse(const bytes& p) {
        std::vector<float> out(66, std::bit_cast<float>(sentinel_bits));
        try {
            c_.decode(p, segs_, out);
        } catch (const loco::wire_error&) {
            if (!untouched(out)) {
                fail("refusal", "the output was written before the payload was refused");
            }
            return {true, {}};
        } catch (const std::exception& e) {
            fail("decode", std::string("threw something other than loco::wire_error: ") + e.what());
            return {true, {}};
        }
        return {false, out};
    }

    // Every header field set to neighbouring and random values.
    void edit_header_fields() {
        struct field {
            std::size_t offset;
            std::size_t width;
        };
        const field fields[] = {{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}, {6, 2},
                                {8, 4}, {12, 4}, {16, 8}, {24, 8}, {32, 8}};
        for (const field& f : fields) {
            for (const std::uint64_t delta : {std::uint64_t{1}, ~std::uint64_t{0}, rng_(), rng_()}) {
                bytes p = original_;
                std::uint64_t v = 0;
                std::memcpy(&v, p.data() + f.offset, f.width);
                v += delta;
                std::memcpy(p.data() + f.offset, &v, f.width);
                expect_refused_unless_original(p, "header field edit");
            }
        }
    }

    std::size_t pick(std::size_t n) { return static_cast<std::size_t>(rng_() % n); }
    std::byte random_byte() { return static_cast<std::byte>(rng_() & 0xff); }

    void fail(const char* kind, const std::string& what) {
        if (failures_++ < 5) {
            first_ += c_.label + ", " + kind + ": " + what + "\n";
        }
    }

    const configuration& c_;
    const segment_list& segs_;
    const bytes& original_;
    std::mt19937_64& rng_;
    std::vector<float> reference_;
    std::size_t count_ = 0;
    std::size_t resealed_ = 0;
    std::size_t resealed_refused_ = 0;
    std::size_t failures_ = 0;
    std::string first_;
};

}  // namespace

TEST_CASE("wire fuzz: mutated payloads are refused, never crash, never touch the output") {
    const auto start = std::chrono::steady_clock::now();
    auto rng = loco_test::rng_for("wire fuzz");
    const std::vector<configuration> configs = configurations();
    const segment_list segs = fuzz_segments();
    const std::vector<float> x = fuzz_inputs(rng);
    const lc::encode_context ctx{.seed = rng(), .round = 3, .rank = 1};
    // The same elements cut differently: one segment fewer, and the last two merged.
    const segment_list fewer(segs.begin(), segs.end() - 1);
    segment_list merged(segs.begin(), segs.end() - 1);
    merged.back().size += 24;
    merged.back().cols = merged.back().size;

    const auto encode = [&](const configuration& c, const segment_list& s) {
        bytes p(c.payload_bytes(s));
        c.encode(x, s, ctx, p);
        return p;
    };
    std::vector<bytes> payloads;
    for (const configuration& c : configs) {
        payloads.push_back(encode(c, segs));
    }

    std::size_t mutations = 0;
    std::size_t resealed = 0;
    std::size_t resealed_refused = 0;
    std::size_t failures = 0;
    std::string report;
    for (std::size_t i = 0; i < configs.size(); ++i) {
        std::vector<bytes> foreign;
        for (std::size_t j = 0; j < configs.size(); ++j) {
            if (j != i) {
                foreign.push_back(payloads[j]);
            }
        }
        foreign.push_back(encode(configs[i], fewer));
        foreign.push_back(encode(configs[i], merged));
        fuzzer f(configs[i], segs, payloads[i], rng);
        f.run(foreign);
        mutations += f.count();
        resealed += f.resealed();
        resealed_refused += f.resealed_refused();
        failures += f.failures();
        report += f.first_failures();
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    MESSAGE(mutations << " mutated payloads over " << configs.size() << " configurations in "
                      << seconds << " s; of the " << resealed << " resealed body edits, "
                      << resealed_refused << " were refused by the compressors' own checks");
    INFO(failures << " failures; first ones:\n" << report);
    CHECK(failures == 0);
    CHECK(mutations >= 20000);
}

// The payload's size must equal the header plus the expected body exactly: bytes added to the end
// or taken from it are refused by the size even when the checksum is recomputed over the body
// as received.
TEST_CASE("wire fuzz: a longer or shorter payload is refused even with its checksum resealed") {
    auto rng = loco_test::rng_for("wire fuzz resealed sizes");
    const std::vector<configuration> configs = configurations();
    const segment_list segs = fuzz_segments();
    const std::vector<float> x = fuzz_inputs(rng);
    std::size_t failures = 0;
    std::string report;
    for (const configuration& c : configs) {
        bytes good(c.payload_bytes(segs));
        c.encode(x, segs, {.seed = rng(), .round = 1, .rank = 0}, good);
        std::vector<bytes> edited;
        for (std::size_t extra = 1; extra <= 16; ++extra) {
            bytes p = good;
            for (std::size_t i = 0; i < extra; ++i) {
                p.push_back(extra % 2 == 0 ? std::byte{0} : static_cast<std::byte>(rng() & 0xff));
            }
            edited.push_back(std::move(p));
        }
        const std::size_t body = good.size() - wire::header_bytes;
        for (std::size_t fewer = 1; fewer <= std::min<std::size_t>(16, body); ++fewer) {
            edited.emplace_back(good.begin(), good.end() - static_cast<std::ptrdiff_t>(fewer));
        }
        for (bytes& p : edited) {
            loco_test::reseal(p);
            std::vector<float> out(x.size(), std::bit_cast<float>(sentinel_bits));
            bool refused = false;
            try {
                c.decode(p, segs, out);
            } catch (const loco::wire_error&) {
                refused = true;
            }
            if (!refused || !untouched(out)) {
                if (failures++ < 5) {
                    report += c.label + ": a resealed payload of " + std::to_string(p.size()) +
                              " bytes (expected " + std::to_string(good.size()) + ") was " +
                              (refused ? "refused after writing the output\n" : "accepted\n");
                }
            }
        }
    }
    INFO(failures << " failures; first ones:\n" << report);
    CHECK(failures == 0);
}

namespace {

// Where a segment's index stream starts within its bytes, per chunked compressor.
std::size_t index_stream_offset(const lc::demo::segment_layout&) { return 0; }
std::size_t index_stream_offset(const lc::sparseloco::segment_layout& l) { return l.record_bytes; }

// Random index edits of a chunked top-k payload, resealed so that only the decoder's own checks
// stand in the way. Fixed-width indices: an index at or above its chunk's cells, an index equal
// to its neighbour, two neighbours swapped. Elias-Fano (the compact coding): a one
// added to or taken from a chunk's high part, so that it no longer holds k ones. Each must be
// refused with loco::wire_error and nothing written.
template <class C>
std::size_t fuzz_indices(const typename C::hyper& h, const std::string& label, std::mt19937_64& rng,
                         std::string& report) {
    const segment_list segs = fuzz_segments();
    const std::vector<float> x = fuzz_inputs(rng);
    std::vector<float> state(x.size(), 0.0f);
    bytes good(C::payload_bytes(h, segs));
    C::encode(h, x, segs, state, {}, good);
    struct stream {
        std::size_t at;  // payload offset of the index stream
        typename C::segment_layout l;
    };
    std::vector<stream> streams;
    std::size_t at = wire::header_bytes;
    for (const lc::segment& s : segs) {
        const auto l = C::layout_of(h, s);
        if (l.sent > 0 && l.indices.bits() > 0) {  // something to corrupt
            streams.push_back({at + index_stream_offset(l), l});
        }
        at += l.bytes();
    }
    REQUIRE(!streams.empty());
    std::size_t failures = 0;
    std::size_t tried = 0;
    for (int trial = 0; trial < 600; ++trial) {
        const stream& st = streams[rng() % streams.size()];
        const auto& l = st.l;
        bytes p = good;
        std::byte* base = p.data() + st.at;
        const unsigned width = l.indices.low;
        const auto read = [&](std::size_t slot) { return wire::get_bits(base, slot, width); };
        const auto write = [&](std::size_t slot, std::uint32_t v) {
            for (unsigned b = 0; b < width; ++b) {  // clear, then OR in
                const std::size_t bit = slot * width + b;
                auto& byte = reinterpret_cast<unsigned char&>(base[bit / 8]);
                byte = static_cast<unsigned char>(byte & ~(1u << (bit % 8)));
            }
            wire::put_bits(base, slot, width, v);
        };
        const std::size_t chunk = rng() % l.grid.chunks();
        const std::size_t j = rng() % l.k;
        const std::size_t slot = chunk * l.k + j;
        const std::uint32_t top = width >= 32 ? 0xffffffffu : (1u << width) - 1u;
        const int kind = static_cast<int>(rng() % 3);
        if (l.indices.how == lc::index_code::chunk_indices::elias_fano) {
            // A bit of the chunk's high part, flipped: one more or one fewer than k ones.
            const std::size_t bit = chunk * l.indices.bits() + std::size_t{l.k} * width +
                                    rng() % l.indices.high_bits();
            base[bit / 8] ^= static_cast<std::byte>(1u << (bit % 8));
        } else if (kind == 0) {
            if (top < l.grid.cells()) {
                continue;  // every index of this width is in range
            }
            write(slot, static_cast<std::uint32_t>(
                            l.grid.cells() + rng() % (top - l.grid.cells() + 1)));
        } else if (l.k < 2) {
            continue;
        } else {
            const std::size_t other = j + 1 < l.k ? slot + 1 : slot - 1;
            const std::uint32_t a = read(slot);
            const std::uint32_t b = read(other);
            if (kind == 1) {
                write(slot, b);  // repeated
            } else {
                write(slot, b);  // swapped: unsorted
                write(other, a);
            }
        }
        ++tried;
        loco_test::reseal(p);
        std::vector<float> out(x.size(), std::bit_cast<float>(sentinel_bits));
        bool refused = false;
        try {
            C::decode(h, p, segs, out);
        } catch (const loco::wire_error&) {
            refused = true;
        } catch (const std::exception&) {
        }
        if (!refused || !untouched(out)) {
            if (failures++ < 3) {
                report += label + ": an index edit (kind " + std::to_string(kind) + ") was " +
                          (refused ? "refused after writing the output\n" : "not refused\n");
            }
        }
    }
    CHECK(tried > 300);
    return failures;
}

}  // namespace

TEST_CASE("wire fuzz: chunked top-k payloads with out-of-range, repeated or unsorted indices are "
          "refused") {
    auto rng = loco_test::rng_for("wire fuzz chunked indices");
    std::string report;
    std::size_t failures = 0;
    for (const lc::index_coding coding : {lc::index_coding::fixed, lc::index_coding::compact}) {
        const std::string c = " " + std::string(lc::to_string(coding));
        failures += fuzz_indices<lc::demo>({.chunk = 3, .topk = 2, .indices = coding},
                                           "demo chunk 3 topk 2" + c, rng, report);
        failures += fuzz_indices<lc::demo>({.chunk = 5, .topk = 3, .sign = true, .indices = coding},
                                           "demo chunk 5 topk 3 signs" + c, rng, report);
        failures += fuzz_indices<lc::demo>({.indices = coding}, "demo" + c, rng, report);
        failures += fuzz_indices<lc::sparseloco>({.chunk = 3, .topk = 2, .indices = coding},
                                                 "sparseloco chunk 3 topk 2" + c, rng, report);
        failures += fuzz_indices<lc::sparseloco>(
            {.chunk = 6, .topk = 4, .bins = 3, .indices = coding},
            "sparseloco chunk 6 topk 4 bins 3" + c, rng, report);
        failures += fuzz_indices<lc::sparseloco>({.indices = coding}, "sparseloco" + c, rng,
                                                 report);
    }
    INFO(report);
    CHECK(failures == 0);
}
