#pragma once
// Fused CUDA compression of pseudo-gradients: compress::blockwise<Bits, Block> (every Bits,
// Block, scale and rounding), compress::cast<bf16 | fp16>, compress::statistical<1 | 2 | 4> (per
// tensor and per row), and error_feedback<> around any of them, encoded and decoded on the
// device. A device payload is byte for byte the host compressor's
// (compress/*.hpp): the same wire header, layout and checksum, and the same codes, because every
// per-element rule is the headers' own LOCO_HD function, and the device never lets a rounding
// depend on an order the host does not use:
//   - products feeding sums (error feedback's decay * e + s * x, the residual's e - level, the
//     rank-order sum of decoded values) go through __fmul_rn / __fadd_rn / __fsub_rn, which the
//     compiler may not contract into fused multiply-adds;
//   - mean_abs scales are double sums in element order on the host. A warp sums its block as a
//     tree, which gives the same double only when every partial sum is exact; it checks that
//     (exponent range of the block, see encode_stats) and otherwise sums the block in element
//     order in one lane (shuffles, no second read).
//
// Passes of one all_gather sync (n elements, M ranks, P payload bytes; 2-bit codes, Block 256:
// P ~ 0.266 n):
//   encode   1 kernel: x = global - local (phase 1 of the outer step fused in, reading global and
//            the parameter or its fp32 master once) or a given fp32 delta; with error feedback
//            e = decay * e + s * x (the residual read once); per-block scales (warp reductions,
//            the block held in registers); codes packed; e - decode(code) written to a second
//            residual buffer, which the caller adopts once the exchange succeeded. Then a
//            checksum kernel reads the P payload bytes once more, and a one-CTA kernel writes the
//            40-byte header. fp32 parameters with error feedback: 12 B/element read, 4 B + P/n
//            written. (Blocks that are not a fast-path shape, see blockwise_layout, read their
//            inputs twice and pack codes with atomicOr into a zeroed payload.)
//   verify   on the M gathered payloads: a checksum kernel (reads M P bytes) and an inspect
//            kernel (blockwise: the M scales of each block, the codes of blocks of scale 0 or NaN
//            and each segment's last bytes; cast: every payload, to find non-finite averages;
//            statistical: the bins each group's codes use, then its table and padding, and every
//            payload for non-finite averages).
//            The M headers (40 bytes each) and a verdict of 8 (2M + 1) bytes go to the host,
//            which throws loco::wire_error, naming the rank, before anything is written.
//   apply    1 kernel: decodes the M payloads, averages in fp32 in rank order (bit-identical on
//            every rank and to the host exchanger), applies Outer::update, and writes global, the
//            outer state, the parameters and their fp32 masters; the average is never stored.
//            fp32 Nesterov: 24 B/element + M P/n read.
//
// Layouts. Inputs and outputs on the device use the padded layout of a tensor_table; payloads
// use the flat segments of the host (one segment per tensor of the table, in order), so a
// payload encoded here decodes on the host and the reverse.
//
// compress::statistical. Its shift, scale and per-bin means are double sums over whole groups (a
// tensor or a row), so one pass cannot encode: the statistics come first. statistical.hpp defines
// the order of those sums for this purpose (chunks of 2048 elements of a group; lane l of a warp
// sums elements l, l + 32, ... of a chunk; the lane sums meet in the xor butterfly of
// group_sum<32>; chunks add in order), so a warp per chunk plus one thread per group reproduce
// the host's doubles bit for bit, and the payloads stay the host's bytes. Passes (see
// encode_statistical): (1) e formed and summed, (2) sum of (e - shift)^2, (3) codes and per-bin
// sums, (4) the residual, each but the last followed by a one-thread-per-group kernel; ~32 B per
// element with error feedback from fp32 parameters, against 16 B for blockwise. The layout
// depends on the granularity (per row: a record per row), so compress_plan<statistical<B>> takes
// it with the rows of every tensor, and refuses hyper-parameters of the other granularity.
// statistical<8> (256 bins: per-lane sums that no longer fit registers) stays on the host.

#include <loco/backend/cuda/control.hpp>
#include <loco/backend/cuda/dtype.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/blockwise.hpp>
#include <loco/compress/cast.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/error_feedback.hpp>
#include <loco/compress/statistical.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/float16.hpp>
#include <loco/math.hpp>
#include <loco/policy.hpp>
#include <loco/random.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace loco::backend::cuda {

// ---- which compressors run on the device -------------------------------------------------------

namespace detail {

template <class C>
struct codec_traits {
    static constexpr bool available = false;
};

// Work split of blockwise<Bits, Block>. The fast path holds a whole block in a warp's registers:
// a lane takes 8 consecutive elements of each 256-element chunk, so its codes are whole bytes
// (Bits bytes per lane). It applies when blocks tile 256-element chunks (Block in {8, 16, ...,
// 256}: a block spans Block / 8 lanes) or chunks tile blocks (Block a multiple of 256, up to 1024
// so that the block fits the registers). Other blocks take the generic path: a warp per block,
// inputs read twice, codes ORed into a zeroed payload.
template <int Bits, std::size_t Block>
struct blockwise_layout {
    static constexpr bool fast =
        Block % 8 == 0 && Block <= 1024 && (256 % Block == 0 || Block % 256 == 0);
    // Elements a warp takes at a time.
    static constexpr std::size_t unit = fast ? (Block > 256 ? Block : 256) : Block;
    static constexpr unsigned chunks = fast ? static_cast<unsigned>(unit / 256) : 0;
    // Lanes sharing one block (fast path).
    static constexpr unsigned group_lanes = Block >= 256 ? 32u : static_cast<unsigned>(Block / 8);
    // Units per CTA work item: about 8192 elements, at least one unit.
    static constexpr std::size_t item_units = unit >= 8192 ? 1 : 8192 / unit;
    // The tree sum of a block equals the element-order sum when the exponents of its nonzero
    // magnitudes span at most this much (see encode_stats).
    static constexpr int exact_span = [] {
        int log = 0;
        while ((std::size_t{1} << log) < Block) {
            ++log;
        }
        return 29 - log;
    }();
};

template <int Bits, std::size_t Block>
struct codec_traits<compress::blockwise<Bits, Block>> {
    using codec = compress::blockwise<Bits, Block>;
    using layout = blockwise_layout<Bits, Block>;
    static constexpr bool available = true;
    static constexpr bool blockwise = true;
    static constexpr std::size_t item_elements = layout::unit * layout::item_units;
    static constexpr std::size_t blocks(std::size_t n) noexcept { return codec::blocks(n); }
    static constexpr std::size_t segment_bytes(std::size_t n) noexcept {
        return codec::segment_bytes(n);
    }
    static std::uint8_t flags(const typename codec::hyper& h) noexcept {
        return static_cast<std::uint8_t>(static_cast<unsigned>(h.scale) |
                                         (static_cast<unsigned>(h.round) << 1));
    }
    static constexpr std::uint8_t bits = static_cast<std::uint8_t>(Bits);
    static constexpr std::uint32_t block = static_cast<std::uint32_t>(Block);
};

template <class T>
struct codec_traits<compress::cast<T>> {
    using codec = compress::cast<T>;
    static constexpr bool available = true;
    static constexpr bool blockwise = false;
    static constexpr std::size_t item_elements = 8192;
    static constexpr std::size_t blocks(std::size_t) noexcept { return 0; }
    static constexpr std::size_t segment_bytes(std::size_t n) noexcept { return 2 * n; }
    static std::uint8_t flags(const typename codec::hyper&) noexcept {
        return std::is_same_v<T, loco::bf16> ? 0 : 1;
    }
    static constexpr std::uint8_t bits = 16;
    static constexpr std::uint32_t block = 0;
};

// statistical<Bits>: the per-bin sums of a chunk are held in a lane's registers (2^Bits doubles
// and counts), which stays reasonable up to 16 bins; statistical<8> keeps the host exchange.
template <int Bits>
struct codec_traits<compress::statistical<Bits>> {
    static constexpr bool available = Bits <= 4;
    static constexpr bool blockwise = false;
    static constexpr int bits = Bits;
};

template <class C>
inline constexpr bool is_statistical = false;
template <int Bits>
inline constexpr bool is_statistical<compress::statistical<Bits>> = true;

}  // namespace detail

// device_compressor<C>::available: C (blockwise, cast, statistical<1 | 2 | 4>, or
// error_feedback<> around one of them) has the fused device path; ::codec is the payload's compressor, ::feedback says whether a
// residual is kept.
template <class C>
struct device_compressor {
    using codec = C;
    static constexpr bool feedback = false;
    static constexpr bool available = detail::codec_traits<C>::available;
};

template <class C>
struct device_compressor<compress::error_feedback<C>> {
    using codec = C;
    static constexpr bool feedback = true;
    static constexpr bool available = detail::codec_traits<C>::available && C::state_size == 0;
};

template <class C>
inline constexpr bool has_device_compressor = device_compressor<C>::available;

// ---- the payload layout of a table -------------------------------------------------------------

// Per tensor of the table: where its segment starts in the payload body, and its blocks.
struct compress_tensor {
    std::uint64_t body;
    std::uint64_t blocks;  // statistical: groups
    std::uint64_t cols;    // statistical: elements per group (0 for an empty tensor); else 0
};

// One CTA's work: elements [first, first + count) of a tensor; first is a multiple of the
// codec's unit (blockwise: whole blocks, and whole 256-element chunks on the fast path).
struct compress_item {
    std::uint64_t first;
    std::uint64_t count;
    std::uint32_t tensor;
    std::uint32_t reserved;
};

struct compress_view {
    const compress_tensor* tensors;
    const compress_item* items;
    std::uint64_t payload;  // bytes, header included
    std::uint64_t body;     // payload - 40
};

// The header's first 32 bytes (the checksum follows).
struct header_prefix {
    unsigned char bytes[32];
};

// Where a sync's payloads live: M payloads of `stride` bytes, rank order.
struct gathered_payloads {
    const std::byte* base;
    std::uint64_t stride;
    std::uint32_t ranks;
    std::uint32_t reserved;
};

namespace detail {

inline header_prefix make_prefix(std::uint8_t compressor, std::uint8_t bits, std::uint8_t flags,
                                 std::uint32_t block, std::uint32_t segments,
                                 std::uint64_t elements, std::uint64_t body) {
    header_prefix h{};
    const auto put = [&](std::size_t at, const void* v, std::size_t n) {
        std::memcpy(h.bytes + at, v, n);
    };
    h.bytes[0] = 'L';
    h.bytes[1] = 'W';
    h.bytes[2] = compress::wire::version;
    h.bytes[3] = compressor;
    h.bytes[4] = bits;
    h.bytes[5] = flags;
    put(8, &block, 4);
    put(12, &segments, 4);
    put(16, &elements, 8);
    put(24, &body, 8);
    return h;
}

inline void require_payload_pointer(const void* p, const char* name, const char* what) {
    if (p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 4 != 0) {
        throw invalid_argument(std::string("loco: ") + what + ": " + name +
                               " must be a non-null, 4-byte aligned device pointer");
    }
}

}  // namespace detail

// The payload layout of Codec (blockwise<...> or cast<...>; statistical<...> below) over the
// tensors of a table: one segment per tensor, as loco::cuda::diloco and the host exchanger use.
// Built and uploaded once.
// A plan's encode() calls must be ordered (one stream): they share a checksum accumulator.
template <class Codec>
class compress_plan {
    static_assert(detail::codec_traits<Codec>::available,
                  "loco: compress_plan needs compress::blockwise<Bits, Block> or "
                  "compress::cast<T> (error_feedback's codec)");
    using traits = detail::codec_traits<Codec>;

public:
    compress_plan() = default;

    explicit compress_plan(const tensor_table& table) : device_(table.device()) {
        if (table.size() > UINT32_MAX) {
            throw invalid_argument("loco: compress_plan: more than 2^32 segments");
        }
        std::vector<compress_tensor> tensors;
        std::vector<compress_item> items;
        std::uint64_t body = 0;
        for (std::size_t i = 0; i < table.size(); ++i) {
            const std::size_t n = table.spec(i).size;
            tensors.push_back({body, traits::blocks(n), 0});
            segments_.push_back({table.flat_offset(i), n, 1, n});
            body += traits::segment_bytes(n);
            for (std::size_t first = 0; first < n; first += traits::item_elements) {
                items.push_back({first, std::min(traits::item_elements, n - first),
                                 static_cast<std::uint32_t>(i), 0u});
            }
        }
        if (items.size() > INT32_MAX) {
            throw invalid_argument("loco: compress_plan: the tensors need more CUDA blocks than a "
                                   "grid holds");
        }
        payload_ = compress::wire::header_bytes + body;
        // The host compressor's own count: the layouts agree or this is a bug.
        if (payload_ != Codec::payload_bytes(typename Codec::hyper{}, segments_)) {
            throw error("loco: compress_plan: the device layout disagrees with " +
                        std::string(Codec::name) + "::payload_bytes");
        }
        item_count_ = static_cast<std::uint32_t>(items.size());
        elements_ = table.total_elements();
        const std::size_t tensor_bytes =
            (tensors.size() * sizeof(compress_tensor) + allocation_alignment - 1) /
            allocation_alignment * allocation_alignment;
        std::vector<std::byte> host(tensor_bytes + items.size() * sizeof(compress_item));
        if (!tensors.empty()) {
            std::memcpy(host.data(), tensors.data(), tensors.size() * sizeof(compress_tensor));
        }
        if (!items.empty()) {
            std::memcpy(host.data() + tensor_bytes, items.data(),
                        items.size() * sizeof(compress_item));
        }
        memory_ = device_buffer<std::byte>(host.size());
        memory_.upload(host);
        view_.tensors = reinterpret_cast<const compress_tensor*>(memory_.get());
        view_.items = reinterpret_cast<const compress_item*>(memory_.get() + tensor_bytes);
        view_.payload = payload_;
        view_.body = body;
        sum_ = device_buffer<unsigned long long>(1);
    }

    // Bytes of one payload, header included (Codec::payload_bytes of segments()).
    std::size_t payload_bytes() const noexcept { return payload_; }
    // The host compressor's segments: one per tensor, flat offsets.
    const std::vector<compress::segment>& segments() const noexcept { return segments_; }
    std::size_t elements() const noexcept { return elements_; }
    std::uint32_t items() const noexcept { return item_count_; }
    int device() const noexcept { return device_; }
    const compress_view& view() const noexcept { return view_; }
    unsigned long long* checksum_accumulator() const noexcept { return sum_.get(); }

    // The header's first 32 bytes for the hyper-parameters h.
    header_prefix prefix(const typename Codec::hyper& h) const {
        return detail::make_prefix(Codec::wire_id, traits::bits, traits::flags(h), traits::block,
                                   static_cast<std::uint32_t>(segments_.size()), elements_,
                                   payload_ - compress::wire::header_bytes);
    }

private:
    std::vector<compress::segment> segments_;
    std::size_t payload_ = compress::wire::header_bytes;
    std::size_t elements_ = 0;
    std::uint32_t item_count_ = 0;
    int device_ = 0;
    device_buffer<std::byte> memory_;
    device_buffer<unsigned long long> sum_;
    compress_view view_{};
};

// ---- the statistical layout --------------------------------------------------------------------

// compress::statistical<Bits> quantizes groups (a tensor, or each row of one) with statistics
// summed in the order statistical.hpp documents: chunks of `chunk` = 2048 consecutive elements of
// a group, one warp per chunk, lane l taking elements l, l + 32, ...; the chunk sums are added in
// chunk order by one thread per group.
struct stat_chunk {
    std::uint64_t first;  // element of the tensor
    std::uint32_t count;  // <= 2048
    std::uint32_t group;
};

struct stat_group {
    std::uint64_t n;       // elements
    std::uint64_t record;  // body offset of the record (shift, lut)
    std::uint64_t chunk0;  // its first chunk
    std::uint32_t chunks;
    std::uint32_t tensor;
};

struct stat_view {
    const stat_chunk* chunks;
    const stat_group* groups;
    const compress_tensor* tensors;  // body, groups, cols
    double* sums;                    // per chunk: the sum of e, then of c^2
    double* bin_sums;                // per chunk: 2^Bits sums of c
    unsigned* bin_counts;            // per chunk: 2^Bits counts
    float* stats;                    // per group: shift, scale, lut[0 .. 2^Bits)
    std::uint64_t chunk_count;
    std::uint64_t group_count;
    std::uint64_t tensor_count;
};

// The payload layout of statistical<Bits> over the tensors of a table, one segment per tensor,
// and the workspace of encode (per chunk: 8 + 12 * 2^Bits bytes; per group: 4 * (2 + 2^Bits)).
// The granularity fixes the layout, so it is chosen here: per row, rows[i] is the number of rows
// of tensor i (1 for a vector; an empty `rows` makes every tensor one row); encode and
// payload_check refuse hyper-parameters of the other granularity.
template <int Bits>
class compress_plan<compress::statistical<Bits>> {
    static_assert(Bits <= 4, "loco: the device statistical quantizer takes Bits 1, 2 or 4");
    using codec = compress::statistical<Bits>;
    static constexpr std::size_t chunk = codec::chunk;

public:
    compress_plan() = default;

    explicit compress_plan(const tensor_table& table,
                           compress::granularity per = compress::granularity::tensor,
                           const std::vector<std::size_t>& rows = {})
        : per_(per), device_(table.device()) {
        if (table.size() > UINT32_MAX) {
            throw invalid_argument("loco: compress_plan: more than 2^32 segments");
        }
        if (!rows.empty() && rows.size() != table.size()) {
            throw invalid_argument("loco: compress_plan: rows has " + std::to_string(rows.size()) +
                                   " entries for " + std::to_string(table.size()) + " tensors");
        }
        typename codec::hyper h{};
        h.per = per;
        std::vector<compress_tensor> tensors;
        std::vector<stat_group> groups;
        std::vector<stat_chunk> chunks;
        std::uint64_t body = 0;
        for (std::size_t i = 0; i < table.size(); ++i) {
            const std::size_t n = table.spec(i).size;
            const std::size_t r = rows.empty() ? 1 : rows[i];
            segments_.push_back({table.flat_offset(i), n, r, r == 0 ? 0 : n / r});
            const std::size_t g = codec::groups(h, segments_.back());  // throws for bad rows
            const std::size_t cols = g == 0 ? 0 : n / g;
            tensors.push_back({body, g, cols});
            for (std::size_t k = 0; k < g; ++k) {
                if (groups.size() >= UINT32_MAX) {
                    throw invalid_argument("loco: compress_plan: more than 2^32 groups");
                }
                const std::size_t count = (cols + chunk - 1) / chunk;
                groups.push_back({cols, body + codec::record_bytes * k, chunks.size(),
                                  static_cast<std::uint32_t>(count),
                                  static_cast<std::uint32_t>(i)});
                for (std::size_t c = 0; c < count; ++c) {
                    chunks.push_back({k * cols + c * chunk,
                                      static_cast<std::uint32_t>(std::min(chunk, cols - c * chunk)),
                                      static_cast<std::uint32_t>(groups.size() - 1)});
                }
            }
            body += codec::segment_bytes(h, segments_.back());
        }
        if ((chunks.size() + 7) / 8 > INT32_MAX || (groups.size() + 255) / 256 > INT32_MAX) {
            throw invalid_argument("loco: compress_plan: the tensors need more CUDA blocks than a "
                                   "grid holds");
        }
        payload_ = compress::wire::header_bytes + body;
        if (payload_ != codec::payload_bytes(h, segments_)) {
            throw error("loco: compress_plan: the device layout disagrees with "
                        "statistical::payload_bytes");
        }
        elements_ = table.total_elements();
        const auto round = [](std::size_t bytes) {
            return (bytes + allocation_alignment - 1) / allocation_alignment * allocation_alignment;
        };
        const std::size_t nc = chunks.size(), ng = groups.size(), nt = tensors.size();
        const std::size_t at_groups = round(nc * sizeof(stat_chunk));
        const std::size_t at_tensors = at_groups + round(ng * sizeof(stat_group));
        const std::size_t at_sums = at_tensors + round(nt * sizeof(compress_tensor));
        const std::size_t at_bins = at_sums + round(nc * 8);
        const std::size_t at_counts = at_bins + round(nc * codec::bins * 8);
        const std::size_t at_stats = at_counts + round(nc * codec::bins * 4);
        const std::size_t total = at_stats + round(ng * (2 + codec::bins) * 4);
        std::vector<std::byte> host(at_sums);
        const auto put = [&](std::size_t at, const auto& v) {
            if (!v.empty()) {
                std::memcpy(host.data() + at, v.data(), v.size() * sizeof(v[0]));
            }
        };
        put(0, chunks);
        put(at_groups, groups);
        put(at_tensors, tensors);
        memory_ = device_buffer<std::byte>(std::max<std::size_t>(total, 1));
        memory_.upload(host);
        std::byte* m = memory_.get();
        view_.chunks = reinterpret_cast<const stat_chunk*>(m);
        view_.groups = reinterpret_cast<const stat_group*>(m + at_groups);
        view_.tensors = reinterpret_cast<const compress_tensor*>(m + at_tensors);
        view_.sums = reinterpret_cast<double*>(m + at_sums);
        view_.bin_sums = reinterpret_cast<double*>(m + at_bins);
        view_.bin_counts = reinterpret_cast<unsigned*>(m + at_counts);
        view_.stats = reinterpret_cast<float*>(m + at_stats);
        view_.chunk_count = nc;
        view_.group_count = ng;
        view_.tensor_count = nt;
        compress_.tensors = view_.tensors;
        compress_.items = nullptr;
        compress_.payload = payload_;
        compress_.body = body;
        sum_ = device_buffer<unsigned long long>(1);
    }

    std::size_t payload_bytes() const noexcept { return payload_; }
    // The host compressor's segments: one per tensor, flat offsets, with the rows given.
    const std::vector<compress::segment>& segments() const noexcept { return segments_; }
    std::size_t elements() const noexcept { return elements_; }
    compress::granularity per() const noexcept { return per_; }
    int device() const noexcept { return device_; }
    // The decoders' view (compress_tensor: body, groups, elements per group).
    const compress_view& view() const noexcept { return compress_; }
    const stat_view& stats() const noexcept { return view_; }
    std::uint64_t chunks() const noexcept { return view_.chunk_count; }
    std::uint64_t groups() const noexcept { return view_.group_count; }
    unsigned long long* checksum_accumulator() const noexcept { return sum_.get(); }

    // Throws unless h asks for this plan's granularity.
    void require_per(const typename codec::hyper& h, const char* what) const {
        if (h.per != per_) {
            throw invalid_argument(
                std::string("loco: ") + what + ": the compress_plan was built for per-" +
                (per_ == compress::granularity::tensor ? "tensor" : "row") +
                " groups and the hyper-parameters ask per " +
                (h.per == compress::granularity::tensor ? "tensor" : "row") +
                " (build the plan with compress_plan(table, granularity, rows))");
        }
    }

    header_prefix prefix(const typename codec::hyper& h) const {
        return detail::make_prefix(codec::wire_id, static_cast<std::uint8_t>(Bits),
                                   static_cast<std::uint8_t>(h.per),
                                   loco::detail::float_bits(h.range),
                                   static_cast<std::uint32_t>(segments_.size()), elements_,
                                   payload_ - compress::wire::header_bytes);
    }

private:
    std::vector<compress::segment> segments_;
    compress::granularity per_ = compress::granularity::tensor;
    std::size_t payload_ = compress::wire::header_bytes;
    std::size_t elements_ = 0;
    int device_ = 0;
    device_buffer<std::byte> memory_;
    device_buffer<unsigned long long> sum_;
    stat_view view_{};
    compress_view compress_{};
};

// Where encode() reads x from.
enum class encode_from : unsigned char {
    delta,   // an fp32 array of the padded layout (io.delta)
    params   // global - the parameters' authoritative values (io.global, io.master), as outer_delta
};

struct encode_io {
    const float* delta = nullptr;      // encode_from::delta
    const float* global = nullptr;     // encode_from::params: the global snapshot, padded layout
    const float* master = nullptr;     // encode_from::params: the fp32 masters of bf16 values
    const float* residual = nullptr;   // error feedback: the residual, padded layout
    float* next_residual = nullptr;    // error feedback: the new residual (may equal residual)
    std::byte* payload = nullptr;      // plan.payload_bytes(), 4-byte aligned
};

// encode_context on the device. With round_from set, the round is read on the device as
// round_from->steps + round_from->skipped (the outer control of loco::cuda::diloco), so the
// launch needs no host read.
struct device_encode_context {
    std::uint64_t seed = 0;
    std::uint64_t round = 0;
    int rank = 0;
    float outer_lr = 1.0f;
    const step_control* round_from = nullptr;
};

namespace detail {

struct encode_params {
    const float* source;    // delta, or global (padded layout)
    const float* master;
    const float* residual;
    float* next;
    std::byte* payload;
    const step_control* round_from;
    std::uint64_t seed;
    std::uint64_t round;
    float decay;
    float scale;
    std::uint32_t rank;
    std::uint32_t flags;    // blockwise: bit 0 mean_abs, bit 1 stochastic
};

inline constexpr std::uint32_t flag_mean_abs = 1u;
inline constexpr std::uint32_t flag_stochastic = 2u;

// Body words a CTA of the checksum kernel sums.
inline constexpr std::uint64_t checksum_words_per_cta = 4096;

// Verdict bits of one rank's payload (blockwise).
inline constexpr unsigned long long bad_scale = 1u;
inline constexpr unsigned long long bad_zero_codes = 2u;
inline constexpr unsigned long long bad_padding_bits = 4u;
inline constexpr unsigned long long bad_padding_bytes = 8u;
inline constexpr unsigned long long bad_unused_bin = 16u;  // statistical

struct stat_encode_params {
    const float* source;  // delta, or global (padded layout)
    const float* master;
    const float* residual;
    float* next;
    std::byte* payload;
    float decay;
    float scale;  // error feedback's s
    float range;
    std::uint32_t reserved;
};

#if LOCO_HAS_CUDA()

inline constexpr unsigned full_mask = 0xffffffffu;

// (std::min and the layout functions of the compressors are host functions.)
__device__ __forceinline__ std::uint64_t min_u64(std::uint64_t a, std::uint64_t b) {
    return a < b ? a : b;
}
// wire::packed_bytes<Bits> and blockwise's code_bytes: bytes of n packed codes, and those bytes
// rounded up to a multiple of 4.
template <int Bits>
__device__ __forceinline__ std::uint64_t packed_bytes(std::uint64_t n) {
    return (n * static_cast<unsigned>(Bits) + 7) / 8;
}
template <int Bits>
__device__ __forceinline__ std::uint64_t code_bytes(std::uint64_t n) {
    return (packed_bytes<Bits>(n) + 3) / 4 * 4;
}

// ---- the compressor input x (or e, with error feedback), per tensor -----------------------------

// Reads x = delta, or global - local, and with Feedback e = decay * residual + scale * x;
// writes the new residual. Pointers are offset to the tensor's element 0.
template <bool Feedback, encode_from From, class P, bool UseMaster>
struct encode_source {
    const float* source;  // delta or global, padded layout
    const P* value;
    const float* master;
    const float* residual;
    float* next;
    std::uint64_t n;
    float decay;
    float scale;
    bool vec_value;  // value 16-byte aligned

    __device__ __forceinline__ float combine(float x, float r) const {
        if constexpr (Feedback) {
            return __fadd_rn(__fmul_rn(decay, r), __fmul_rn(scale, x));
        } else {
            return x;
        }
    }

    // j < n.
    __device__ __forceinline__ float load1(std::uint64_t j) const {
        float x;
        if constexpr (From == encode_from::delta) {
            x = source[j];
        } else {
            const float local = UseMaster ? master[j] : widen(value[j]);
            x = __fsub_rn(source[j], local);
        }
        return combine(x, Feedback ? residual[j] : 0.0f);
    }

    // Elements j0 .. j0 + 7 (j0 a multiple of 8); 0 past n.
    __device__ __forceinline__ void load8(std::uint64_t j0, float* e) const {
        if (j0 + 8 > n) {
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const std::uint64_t j = j0 + static_cast<unsigned>(r);
                e[r] = j < n ? load1(j) : 0.0f;
            }
            return;
        }
        float x[8];
        load_vec<8>(source + j0, x);
        if constexpr (From == encode_from::params) {
            float local[8];
            if constexpr (UseMaster) {
                load_vec<8>(master + j0, local);
            } else {
                if (vec_value) {
                    load_vec<8>(value + j0, local);
                } else {
#pragma unroll
                    for (int r = 0; r < 8; ++r) {
                        local[r] = widen(value[j0 + static_cast<unsigned>(r)]);
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                x[r] = __fsub_rn(x[r], local[r]);
            }
        }
        if constexpr (Feedback) {
            float res[8];
            load_vec<8>(residual + j0, res);
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                e[r] = combine(x[r], res[r]);
            }
        } else {
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                e[r] = x[r];
            }
        }
    }

    __device__ __forceinline__ void store1(std::uint64_t j, float v) const {
        if constexpr (Feedback) {
            next[j] = v;
        }
    }
    __device__ __forceinline__ void store8(std::uint64_t j0, const float* v) const {
        if constexpr (Feedback) {
            if (j0 + 8 <= n) {
                store_vec<8>(next + j0, v);
            } else {
#pragma unroll
                for (int r = 0; r < 8; ++r) {
                    if (j0 + static_cast<unsigned>(r) < n) {
                        next[j0 + static_cast<unsigned>(r)] = v[r];
                    }
                }
            }
        }
    }
};

// ---- warp reductions over groups of G lanes (G a power of 2, <= 32; all lanes take part) ------

template <unsigned G>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (unsigned m = G / 2; m > 0; m /= 2) {
        const float o = __shfl_xor_sync(full_mask, v, static_cast<int>(m));
        v = o > v ? o : v;
    }
    return v;
}
// Both partners of each butterfly step add the same two values (addition commutes), so every
// lane of a group ends with the same bits.
template <unsigned G>
__device__ __forceinline__ double group_sum(double v) {
#pragma unroll
    for (unsigned m = G / 2; m > 0; m /= 2) {
        v = v + __shfl_xor_sync(full_mask, v, static_cast<int>(m));
    }
    return v;
}
template <unsigned G>
__device__ __forceinline__ unsigned group_umax(unsigned v) {
#pragma unroll
    for (unsigned m = G / 2; m > 0; m /= 2) {
        const unsigned o = __shfl_xor_sync(full_mask, v, static_cast<int>(m));
        v = o > v ? o : v;
    }
    return v;
}
template <unsigned G>
__device__ __forceinline__ unsigned group_umin(unsigned v) {
#pragma unroll
    for (unsigned m = G / 2; m > 0; m /= 2) {
        const unsigned o = __shfl_xor_sync(full_mask, v, static_cast<int>(m));
        v = o < v ? o : v;
    }
    return v;
}

// What a block's scale needs, accumulated element by element.
//
// Exactness of the tree sum (mean_abs). Every magnitude a of the block is a multiple of
// 2^(E' - 150), E' = max(biased exponent, 1), and below 2^(E' - 126). Let Emin and Emax be the
// smallest and largest E' over the nonzero magnitudes: every partial sum, in any order, is a
// multiple of 2^(Emin - 150) below Block * 2^(Emax - 126), hence exact in a double (53 bits) when
// Emax - Emin <= 29 - ceil(log2 Block). Exact sums do not depend on the order, so the tree then
// gives the host's element-order sum; otherwise the block is summed in element order.
struct encode_stats {
    float largest = 0.0f;
    double sum = 0.0;
    unsigned emax = 0;
    unsigned emin = 255;
    bool finite = true;

    // mean_abs is the same in every lane (a launch argument), so its branches do not diverge.
    __device__ __forceinline__ void add(float x, bool mean_abs) {
        const float a = math::abs(x);
        finite = finite && math::isfinite(a);
        largest = a > largest ? a : largest;
        if (mean_abs) {
            sum += static_cast<double>(a);
            const unsigned biased = __float_as_uint(a) >> 23;
            if (a != 0.0f && biased < 255u) {
                const unsigned e = biased > 1u ? biased : 1u;
                emax = e > emax ? e : emax;
                emin = e < emin ? e : emin;
            }
        }
    }
    template <unsigned G>
    __device__ __forceinline__ void reduce(bool mean_abs) {
        largest = group_max<G>(largest);
        finite = group_umin<G>(finite ? 1u : 0u) != 0u;
        if (mean_abs) {
            sum = group_sum<G>(sum);
            emax = group_umax<G>(emax);
            emin = group_umin<G>(emin);
        }
    }
    // After reduce(): the tree sum may differ from the element-order sum.
    __device__ __forceinline__ bool inexact(bool mean_abs, int exact_span) const {
        return mean_abs && finite && emax != 0u &&
               static_cast<int>(emax) - static_cast<int>(emin) > exact_span;
    }
    __device__ __forceinline__ float scale(bool mean_abs, std::uint64_t n) const {
        if (!finite) {
            return __uint_as_float(0x7fc00000u);
        }
        return mean_abs ? static_cast<float>(sum / static_cast<double>(n)) : largest;
    }
};

// Writes the Bits bytes of 8 codes of elements j0 .. j0 + 7 (j0 a multiple of 8), skipping the
// pieces at or past `bytes` (the segment's code bytes, a multiple of 4).
template <int Bits>
__device__ __forceinline__ void store_codes8(std::byte* codes, std::uint64_t j0,
                                             std::uint64_t bytes, std::uint64_t packed) {
    const std::uint64_t at = j0 / 8 * static_cast<unsigned>(Bits);
    if constexpr (Bits == 1) {
        if (at < bytes) {
            reinterpret_cast<unsigned char*>(codes)[at] = static_cast<unsigned char>(packed);
        }
    } else if constexpr (Bits == 2) {
        if (at < bytes) {
            *reinterpret_cast<std::uint16_t*>(codes + at) = static_cast<std::uint16_t>(packed);
        }
    } else if constexpr (Bits == 4) {
        if (at < bytes) {
            *reinterpret_cast<std::uint32_t*>(codes + at) = static_cast<std::uint32_t>(packed);
        }
    } else {
        if (at < bytes) {
            *reinterpret_cast<std::uint32_t*>(codes + at) = static_cast<std::uint32_t>(packed);
        }
        if (at + 4 < bytes) {
            *reinterpret_cast<std::uint32_t*>(codes + at + 4) =
                static_cast<std::uint32_t>(packed >> 32);
        }
    }
}

// ---- blockwise encode --------------------------------------------------------------------------

// Fast path: one unit (Block > 256: one block; else 256 elements, 256 / Block blocks) in a warp.
template <int Bits, std::size_t Block, class Src>
__device__ __forceinline__ void blockwise_unit(const Src& src, std::byte* seg,
                                               std::uint64_t blocks, std::uint64_t unit_first,
                                               std::uint64_t flat, const encode_params& a,
                                               std::uint64_t stream, unsigned lane) {
    using codec = compress::blockwise<Bits, Block>;
    using L = blockwise_layout<Bits, Block>;
    constexpr unsigned C = L::chunks;
    constexpr unsigned G = L::group_lanes;
    const bool mean_abs = (a.flags & flag_mean_abs) != 0;
    const bool stochastic = (a.flags & flag_stochastic) != 0;
    const std::uint64_t n = src.n;

    float e[C][8];
#pragma unroll
    for (unsigned c = 0; c < C; ++c) {
        src.load8(unit_first + c * 256 + 8 * lane, e[c]);
    }
    encode_stats st;
#pragma unroll
    for (unsigned c = 0; c < C; ++c) {
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            st.add(e[c][r], mean_abs);
        }
    }
    st.reduce<G>(mean_abs);
    const unsigned group_base = lane / G * G;
    const std::uint64_t block_first = unit_first + (Block >= 256 ? 0 : lane / G * Block);
    const bool exists = block_first < n;
    const std::uint64_t block_n = exists ? min_u64(Block, n - block_first) : 1;
    const bool inexact = st.inexact(mean_abs, L::exact_span);
    if (__any_sync(full_mask, inexact)) {
        // Element order: chunk, then lane, then the lane's 8 elements.
        double ordered = 0.0;
#pragma unroll
        for (unsigned c = 0; c < C; ++c) {
            for (unsigned s = 0; s < G; ++s) {
#pragma unroll
                for (int r = 0; r < 8; ++r) {
                    const float v = __shfl_sync(full_mask, math::abs(e[c][r]),
                                                static_cast<int>(group_base + s));
                    ordered += static_cast<double>(v);
                }
            }
        }
        if (inexact) {
            st.sum = ordered;
        }
    }
    const float scale = st.scale(mean_abs, block_n);
    if (exists && lane == group_base) {
        reinterpret_cast<float*>(seg)[block_first / Block] = scale;
    }
    std::byte* codes = seg + 4 * blocks;
    const std::uint64_t bytes = code_bytes<Bits>(n);
#pragma unroll
    for (unsigned c = 0; c < C; ++c) {
        const std::uint64_t j0 = unit_first + c * 256 + 8 * lane;
        std::uint64_t packed = 0;
        float next[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const std::uint64_t j = j0 + static_cast<unsigned>(r);
            unsigned k = 0;
            next[r] = 0.0f;
            if (j < n) {
                const float u = stochastic ? random::uniform(a.seed, stream, flat + j) : 0.0f;
                k = codec::code(e[c][r], scale, stochastic, u);
                next[r] = __fsub_rn(e[c][r], codec::level(scale, k));
            }
            packed |= static_cast<std::uint64_t>(k) << (r * Bits);
        }
        src.store8(j0, next);
        store_codes8<Bits>(codes, j0, bytes, packed);
    }
}

// Generic path: block b of the tensor in one warp; inputs read twice; codes ORed into words of
// the zeroed payload.
template <int Bits, std::size_t Block, class Src>
__device__ __forceinline__ void blockwise_block(const Src& src, std::byte* seg,
                                                std::uint64_t blocks, std::uint64_t b,
                                                std::uint64_t flat, const encode_params& a,
                                                std::uint64_t stream, unsigned lane) {
    using codec = compress::blockwise<Bits, Block>;
    using L = blockwise_layout<Bits, Block>;
    const bool mean_abs = (a.flags & flag_mean_abs) != 0;
    const bool stochastic = (a.flags & flag_stochastic) != 0;
    const std::uint64_t first = b * Block;
    const std::uint64_t count = min_u64(Block, src.n - first);
    encode_stats st;
    for (std::uint64_t j = lane; j < count; j += 32) {
        st.add(src.load1(first + j), mean_abs);
    }
    st.reduce<32>(mean_abs);
    if (st.inexact(mean_abs, L::exact_span)) {  // the same in every lane
        double ordered = 0.0;
        if (lane == 0) {
            for (std::uint64_t j = 0; j < count; ++j) {
                ordered += static_cast<double>(math::abs(src.load1(first + j)));
            }
        }
        st.sum = __shfl_sync(full_mask, ordered, 0);
    }
    const float scale = st.scale(mean_abs, count);
    if (lane == 0) {
        reinterpret_cast<float*>(seg)[b] = scale;
    }
    auto* words = reinterpret_cast<unsigned*>(seg + 4 * blocks);
    for (std::uint64_t j = lane; j < count; j += 32) {
        const std::uint64_t at = first + j;
        const float e = src.load1(at);
        const float u = stochastic ? random::uniform(a.seed, stream, flat + at) : 0.0f;
        const unsigned k = codec::code(e, scale, stochastic, u);
        if (k != 0) {
            const std::uint64_t bit = at * static_cast<unsigned>(Bits);
            atomicOr(words + bit / 32, k << (bit % 32));
        }
        src.store1(at, __fsub_rn(e, codec::level(scale, k)));
    }
}

template <class Codec>
struct encode_body;

template <int Bits, std::size_t Block>
struct encode_body<compress::blockwise<Bits, Block>> {
    template <class Src>
    __device__ __forceinline__ static void run(const Src& src, const compress_item& item,
                                               std::byte* seg, std::uint64_t blocks,
                                               std::uint64_t flat, const encode_params& a,
                                               std::uint64_t stream) {
        using L = blockwise_layout<Bits, Block>;
        const unsigned warp = threadIdx.x / 32;
        const unsigned lane = threadIdx.x % 32;
        constexpr unsigned warps = block_threads / 32;
        if constexpr (L::fast) {
            const std::uint64_t units = (item.count + L::unit - 1) / L::unit;
            for (std::uint64_t u = warp; u < units; u += warps) {
                blockwise_unit<Bits, Block>(src, seg, blocks, item.first + u * L::unit, flat, a,
                                            stream, lane);
            }
        } else {
            const std::uint64_t first = item.first / Block;
            const std::uint64_t count = (item.count + Block - 1) / Block;
            for (std::uint64_t q = warp; q < count; q += warps) {
                blockwise_block<Bits, Block>(src, seg, blocks, first + q, flat, a, stream, lane);
            }
        }
    }
};

template <class T>
struct encode_body<compress::cast<T>> {
    template <class Src>
    __device__ __forceinline__ static void run(const Src& src, const compress_item& item,
                                               std::byte* seg, std::uint64_t, std::uint64_t,
                                               const encode_params&, std::uint64_t) {
        using codec = compress::cast<T>;
        auto* out = reinterpret_cast<std::uint16_t*>(seg);
        for (std::uint64_t i = threadIdx.x; i < item.count; i += block_threads) {
            const std::uint64_t j = item.first + i;
            const float e = src.load1(j);
            const std::uint16_t bits = codec::to_bits(e);
            out[j] = bits;
            src.store1(j, __fsub_rn(e, codec::from_bits(bits)));
        }
    }
};

template <class Codec>
inline constexpr int encode_min_blocks = [] {
    if constexpr (codec_traits<Codec>::blockwise) {
        return blockwise_layout<codec_traits<Codec>::bits, codec_traits<Codec>::block>::chunks > 2
                   ? 2
                   : min_blocks_per_sm;
    } else {
        return min_blocks_per_sm;
    }
}();

template <class Codec, bool Feedback, encode_from From, class P, bool UseMaster>
__device__ __forceinline__ void encode_item(const tensor_desc& d, const compress_tensor& ct,
                                            const compress_item& item, std::uint64_t padded,
                                            const encode_params& a, std::uint64_t stream) {
    encode_source<Feedback, From, P, UseMaster> src;
    src.source = a.source + padded;
    src.value = static_cast<const P*>(d.value);
    src.master = UseMaster ? a.master + d.master_offset : nullptr;
    src.residual = Feedback ? a.residual + padded : nullptr;
    src.next = Feedback ? a.next + padded : nullptr;
    src.n = d.size;
    src.decay = a.decay;
    src.scale = a.scale;
    src.vec_value = (d.aligned & value_aligned) != 0;
    std::byte* seg = a.payload + compress::wire::header_bytes + ct.body;
    encode_body<Codec>::run(src, item, seg, ct.blocks, d.flat_offset, a, stream);
}

template <class Codec, bool Feedback, encode_from From, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads, encode_min_blocks<Codec>)
    encode_kernel(table_view t, compress_view p, encode_params a) {
    const compress_item item = p.items[blockIdx.x];
    const tensor_desc d = t.tensors[item.tensor];
    const compress_tensor ct = p.tensors[item.tensor];
    const std::uint64_t round =
        a.round_from ? a.round_from->steps + a.round_from->skipped : a.round;
    const std::uint64_t stream = (round << 32) + a.rank;
    if constexpr (From == encode_from::delta) {
        encode_item<Codec, Feedback, From, float, false>(d, ct, item, d.padded_offset, a, stream);
    } else {
        if (d.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                encode_item<Codec, Feedback, From, loco::bf16, reads_master<loco::bf16, Mode>>(
                    d, ct, item, d.padded_offset, a, stream);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                encode_item<Codec, Feedback, From, float, false>(d, ct, item, d.padded_offset, a,
                                                                 stream);
            }
        }
    }
}

// ---- checksum and header -----------------------------------------------------------------------

// Word i of a body of `len` bytes, little-endian, zero-padded past the end. Payloads sit at any
// even offset of a gathered buffer (cast bodies are 2 n bytes), so the loads follow the address.
__device__ __forceinline__ std::uint64_t body_word(const std::byte* body, std::uint64_t i,
                                                   std::uint64_t len) {
    const std::byte* p = body + 8 * i;
    const std::uint64_t avail = min_u64(8, len - 8 * i);
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    if (avail == 8 && address % 4 == 0) {
        const auto* w = reinterpret_cast<const std::uint32_t*>(p);
        return static_cast<std::uint64_t>(w[0]) | (static_cast<std::uint64_t>(w[1]) << 32);
    }
    std::uint64_t word = 0;
    if (address % 2 == 0 && avail % 2 == 0) {
        const auto* h = reinterpret_cast<const std::uint16_t*>(p);
        for (unsigned k = 0; k < avail / 2; ++k) {
            word |= static_cast<std::uint64_t>(h[k]) << (16 * k);
        }
        return word;
    }
    const auto* b = reinterpret_cast<const unsigned char*>(p);
    for (unsigned k = 0; k < avail; ++k) {
        word |= static_cast<std::uint64_t>(b[k]) << (8 * k);
    }
    return word;
}

// The CTA's sum of v (mod 2^64), valid in thread 0.
__device__ __forceinline__ unsigned long long block_sum(unsigned long long v) {
    __shared__ unsigned long long partial[block_threads / 32];
#pragma unroll
    for (unsigned m = 16; m > 0; m /= 2) {
        v += __shfl_xor_sync(full_mask, v, static_cast<int>(m));
    }
    if (threadIdx.x % 32 == 0) {
        partial[threadIdx.x / 32] = v;
    }
    __syncthreads();
    unsigned long long total = 0;
    if (threadIdx.x == 0) {
        for (unsigned w = 0; w < block_threads / 32; ++w) {
            total += partial[w];
        }
    }
    return total;
}

// sums[k] += the mix64 terms of body words of payload k (the host's checksum less the length).
// CTA x takes payload x / per_rank, words of block x % per_rank.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    checksum_kernel(gathered_payloads g, std::uint64_t len, std::uint32_t per_rank,
                    unsigned long long* sums) {
    const std::uint32_t k = blockIdx.x / per_rank;
    const std::uint64_t part = blockIdx.x % per_rank;
    const std::byte* body = g.base + k * g.stride + compress::wire::header_bytes;
    const std::uint64_t words = (len + 7) / 8;
    const std::uint64_t first = part * checksum_words_per_cta;
    const std::uint64_t last = min_u64(words, first + checksum_words_per_cta);
    unsigned long long acc = 0;
    for (std::uint64_t i = first + threadIdx.x; i < last; i += block_threads) {
        acc += random::mix64(body_word(body, i, len) ^ i);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0 && acc != 0) {
        atomicAdd(sums + k, acc);
    }
}

template <int = 0>
__global__ void __launch_bounds__(block_threads)
    header_kernel(std::byte* out, header_prefix h, const unsigned long long* sum,
                  std::uint64_t len) {
    auto* o = reinterpret_cast<unsigned char*>(out);
    if (threadIdx.x < 32) {
        o[threadIdx.x] = h.bytes[threadIdx.x];
    } else if (threadIdx.x < 40) {
        const std::uint64_t checksum = *sum + len;
        o[threadIdx.x] = static_cast<unsigned char>(checksum >> (8 * (threadIdx.x - 32)));
    }
}

// ---- decoding ----------------------------------------------------------------------------------

template <class Codec>
struct decode_body;

// blockwise::level(s, k) is s * (float(2k - L) / float(L)): one division per decoded value. The
// decoders look the quotients up instead (computed by the same IEEE division, so the products
// are the same bits), in shared memory: `fractions` holds L + 1 floats.
template <class Codec>
struct level_fractions {
    static constexpr unsigned count = 1;
    __device__ __forceinline__ static void fill(float*) {}
};
template <int Bits, std::size_t Block>
struct level_fractions<compress::blockwise<Bits, Block>> {
    using codec = compress::blockwise<Bits, Block>;
    static constexpr unsigned count = codec::top_code + 1;
    // By the whole CTA; a __syncthreads() must follow before use.
    __device__ __forceinline__ static void fill(float* f) {
        for (unsigned k = threadIdx.x; k < count; k += block_threads) {
            const int numerator = 2 * static_cast<int>(k) - static_cast<int>(codec::top_code);
            f[k] = static_cast<float>(numerator) / static_cast<float>(codec::top_code);
        }
    }
};

template <int Bits, std::size_t Block>
struct decode_body<compress::blockwise<Bits, Block>> {
    using codec = compress::blockwise<Bits, Block>;

    // E consecutive codes from element j (a multiple of E), packed as in the payload.
    template <int E>
    __device__ __forceinline__ static std::uint64_t codes(const std::byte* c, std::uint64_t j) {
        constexpr int bits = E * Bits;
        const std::uint64_t bit = j * static_cast<unsigned>(Bits);
        if constexpr (bits <= 8) {
            const unsigned byte = reinterpret_cast<const unsigned char*>(c)[bit / 8];
            return (byte >> (bit % 8)) & ((1u << bits) - 1u);
        } else if constexpr (bits == 16) {
            return *reinterpret_cast<const std::uint16_t*>(c + bit / 8);
        } else if constexpr (bits == 32) {
            return *reinterpret_cast<const std::uint32_t*>(c + bit / 8);
        } else {
            const auto* w = reinterpret_cast<const std::uint32_t*>(c + bit / 8);
            return static_cast<std::uint64_t>(w[0]) | (static_cast<std::uint64_t>(w[1]) << 32);
        }
    }

    // The decoded values of elements j .. j + E - 1 of one payload's segment: codec::level.
    template <int E>
    __device__ __forceinline__ static void values(const std::byte* seg, std::uint64_t blocks,
                                                  std::uint64_t, std::uint64_t j, float* v,
                                                  const float* fractions) {
        const auto* scales = reinterpret_cast<const float*>(seg);
        const std::uint64_t packed = codes<E>(seg + 4 * blocks, j);
        constexpr unsigned mask = (1u << Bits) - 1u;
        if constexpr (Block % E == 0) {
            const float s = scales[j / Block];
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const unsigned k = static_cast<unsigned>(packed >> (e * Bits)) & mask;
                v[e] = __fmul_rn(s, fractions[k]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const float s = scales[(j + static_cast<unsigned>(e)) / Block];
                const unsigned k = static_cast<unsigned>(packed >> (e * Bits)) & mask;
                v[e] = __fmul_rn(s, fractions[k]);
            }
        }
    }
};

template <class T>
struct decode_body<compress::cast<T>> {
    using codec = compress::cast<T>;
    template <int E>
    __device__ __forceinline__ static void values(const std::byte* seg, std::uint64_t,
                                                  std::uint64_t, std::uint64_t j, float* v,
                                                  const float*) {
        const auto* h = reinterpret_cast<const std::uint16_t*>(seg);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            v[e] = codec::from_bits(h[j + static_cast<unsigned>(e)]);
        }
    }
};

// statistical: lut[q] + shift of the element's group (groups = the tensor's groups, cols their
// size). Per tensor there is one group and no division.
template <int Bits>
struct decode_body<compress::statistical<Bits>> {
    using codec = compress::statistical<Bits>;
    template <int E>
    __device__ __forceinline__ static void values(const std::byte* seg, std::uint64_t groups,
                                                  std::uint64_t cols, std::uint64_t j, float* v,
                                                  const float*) {
        const std::byte* codes = seg + codec::record_bytes * groups;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const std::uint64_t i = j + static_cast<unsigned>(e);
            std::uint64_t g = 0;
            if (groups > 1) {  // a 32-bit division when it is enough (the common case)
                g = (i >> 32) == 0 && (cols >> 32) == 0
                        ? static_cast<std::uint32_t>(i) / static_cast<std::uint32_t>(cols)
                        : i / cols;
            }
            const auto* record = reinterpret_cast<const float*>(seg + codec::record_bytes * g);
            const unsigned q = compress::wire::unpack<Bits>(codes, i);
            v[e] = codec::value(record[1 + q], record[0]);
        }
    }
};

// The average over the ranks of elements j .. j + E - 1: an fp32 sum in rank order from 0, then
// one division, as the host exchanger computes it. (For M a power of two the division is a
// multiplication by the exact 1/M: the same correctly rounded value.)
template <class Codec, int E>
__device__ __forceinline__ void average(const gathered_payloads& g, std::uint64_t body,
                                        std::uint64_t blocks, std::uint64_t cols, std::uint64_t j,
                                        float* avg, const float* fractions) {
    float sum[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        sum[e] = 0.0f;
    }
    const std::byte* seg = g.base + compress::wire::header_bytes + body;
    for (std::uint32_t k = 0; k < g.ranks; ++k) {
        float v[E];
        decode_body<Codec>::template values<E>(seg + k * g.stride, blocks, cols, j, v, fractions);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            sum[e] = __fadd_rn(sum[e], v[e]);
        }
    }
    const float m = static_cast<float>(g.ranks);
    if ((g.ranks & (g.ranks - 1)) == 0) {
        const float inverse = 1.0f / m;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            avg[e] = __fmul_rn(sum[e], inverse);
        }
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
            avg[e] = sum[e] / m;
        }
    }
}

// A table segment with its place in the payload.
struct apply_segment {
    resolved_segment r;
    std::uint64_t begin;   // element of the tensor at the segment's start
    std::uint64_t body;    // the tensor's segment in the payload body
    std::uint64_t blocks;
    std::uint64_t cols;
};

__device__ __forceinline__ std::uint32_t stage_apply_segments(const table_view& t,
                                                              const compress_view& p,
                                                              apply_segment* out) {
    const std::uint32_t first = t.block_first[blockIdx.x];
    const std::uint32_t count = t.block_first[blockIdx.x + 1] - first;
    if (threadIdx.x < count) {
        const segment s = t.segments[first + threadIdx.x];
        const tensor_desc d = t.tensors[s.tensor];
        const compress_tensor ct = p.tensors[s.tensor];
        const std::uint64_t value_bytes = (d.combo & 1u) ? 2 : 4;
        apply_segment a;
        a.r.value = static_cast<char*>(d.value) + s.begin * value_bytes;
        a.r.grad = nullptr;
        a.r.padded = d.padded_offset + s.begin;
        a.r.master = d.master_offset + s.begin;
        a.r.flat = d.flat_offset + s.begin;
        a.r.len = s.len;
        a.r.span = s.span;
        a.r.combo = d.combo;
        a.r.aligned = d.aligned;
        a.begin = s.begin;
        a.body = ct.body;
        a.blocks = ct.blocks;
        a.cols = ct.cols;
        out[threadIdx.x] = a;
    }
    __syncthreads();
    return count;
}

// decode_average: out = the average, padded layout (padding 0).
template <class Codec>
__device__ __forceinline__ void store_average(const apply_segment& s, const gathered_payloads& g,
                                              float* out, const float* fractions) {
    constexpr int E = 4;
    float* __restrict__ o = out + s.r.padded;
    const std::uint32_t n = s.r.len;
    const std::uint32_t vec_end = n / E * E;
    for (std::uint32_t i = threadIdx.x * E; i < vec_end; i += block_threads * E) {
        float avg[E];
        average<Codec, E>(g, s.body, s.blocks, s.cols, s.begin + i, avg, fractions);
        store_vec<E>(o + i, avg);
    }
    for (std::uint32_t i = vec_end + threadIdx.x; i < s.r.span; i += block_threads) {
        float avg = 0.0f;
        if (i < n) {
            average<Codec, 1>(g, s.body, s.blocks, s.cols, s.begin + i, &avg, fractions);
        }
        o[i] = avg;
    }
}

template <class Codec>
__global__ void __launch_bounds__(block_threads)
    decode_average_kernel(table_view t, compress_view p, gathered_payloads g, float* out) {
    __shared__ apply_segment segs[max_segments_per_block];
    __shared__ float fractions[level_fractions<Codec>::count];
    level_fractions<Codec>::fill(fractions);
    const std::uint32_t count = stage_apply_segments(t, p, segs);  // (synchronises)
    for (std::uint32_t q = 0; q < count; ++q) {
        store_average<Codec>(segs[q], g, out, fractions);
    }
}

template <class Outer>
struct apply_args {
    const typename Outer::hyper* hyper;
    step_control* control;
    float* global;
    float* state;
    float* master;
    const std::uint64_t* skip_if;  // the verdict's first non-finite index, or null: never skip
};

// outer_segment with the average decoded from the payloads instead of read from memory.
template <class Codec, class Outer, bf16_update Mode, class P, class K>
__device__ __forceinline__ void apply_segment_body(const apply_segment& s,
                                                   const gathered_payloads& g, const K& k,
                                                   const apply_args<Outer>& a,
                                                   std::uint64_t stride, bool skip,
                                                   const float* fractions) {
    constexpr int S = Outer::state_size;
    constexpr int SA = S > 0 ? S : 1;
    constexpr int E = per_vector<P>;
    constexpr bool use_master = reads_master<P, Mode>;
    const resolved_segment& r = s.r;
    P* __restrict__ v = static_cast<P*>(r.value);
    float* __restrict__ ms = use_master ? a.master + r.master : nullptr;
    float* __restrict__ gl = a.global + r.padded;
    float* __restrict__ st = S > 0 ? a.state + r.padded : nullptr;
    const std::uint32_t n = r.len;
    const bool vec = (r.aligned & value_aligned) != 0;
    const std::uint32_t vec_end = vec ? n / E * E : 0;
    for (std::uint32_t i = threadIdx.x * E; i < vec_end; i += block_threads * E) {
        float x[E];
        load_vec<E>(gl + i, x);
        if (!skip) {
            float d[E];
            float sv[SA][E];
            average<Codec, E>(g, s.body, s.blocks, s.cols, s.begin + i, d, fractions);
#pragma unroll
            for (int j = 0; j < S; ++j) {
                load_vec<E>(st + static_cast<std::uint64_t>(j) * stride + i, sv[j]);
            }
#pragma unroll
            for (int e = 0; e < E; ++e) {
                float t[SA];
#pragma unroll
                for (int j = 0; j < S; ++j) {
                    t[j] = sv[j][e];
                }
                Outer::update(k, x[e], d[e], t);
#pragma unroll
                for (int j = 0; j < S; ++j) {
                    sv[j][e] = t[j];
                }
            }
#pragma unroll
            for (int j = 0; j < S; ++j) {
                store_vec<E>(st + static_cast<std::uint64_t>(j) * stride + i, sv[j]);
            }
            store_vec<E>(gl + i, x);
        }
        if constexpr (use_master) {
            store_vec<E>(ms + i, x);
        }
        store_vec<E>(v + i, x);
    }
    for (std::uint32_t i = vec_end + threadIdx.x; i < n; i += block_threads) {
        float x = gl[i];
        if (!skip) {
            float d;
            average<Codec, 1>(g, s.body, s.blocks, s.cols, s.begin + i, &d, fractions);
            float t[SA];
#pragma unroll
            for (int j = 0; j < S; ++j) {
                t[j] = st[static_cast<std::uint64_t>(j) * stride + i];
            }
            Outer::update(k, x, d, t);
#pragma unroll
            for (int j = 0; j < S; ++j) {
                st[static_cast<std::uint64_t>(j) * stride + i] = t[j];
            }
            gl[i] = x;
        }
        if constexpr (use_master) {
            ms[i] = x;
        }
        v[i] = narrow<P>(x);
    }
}

template <class Codec, class Outer, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads, min_blocks_per_sm)
    apply_kernel(table_view t, compress_view p, gathered_payloads g, apply_args<Outer> a) {
    __shared__ apply_segment segs[max_segments_per_block];
    __shared__ float fractions[level_fractions<Codec>::count];
    const bool skip = a.skip_if != nullptr && *a.skip_if != no_nonfinite;
    const std::uint64_t step = a.control->steps + 1;
    const typename Outer::hyper h = *a.hyper;
    level_fractions<Codec>::fill(fractions);
    const std::uint32_t count = stage_apply_segments(t, p, segs);  // (synchronises)
    const auto k = Outer::prepare(h, step);
    for (std::uint32_t q = 0; q < count; ++q) {
        const apply_segment s = segs[q];
        if (s.r.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                apply_segment_body<Codec, Outer, Mode, loco::bf16>(s, g, k, a, t.padded_total,
                                                                   skip, fractions);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                apply_segment_body<Codec, Outer, Mode, float>(s, g, k, a, t.padded_total, skip,
                                                              fractions);
            }
        }
    }
    finish_block(a.control, skip);
}

// ---- verification of received payloads ---------------------------------------------------------

// verdict layout (unsigned long long): [0, M) checksum sums, [M, 2M) flags, [2M] the smallest
// flat index of a non-finite average (no_nonfinite when none).
struct verdict_view {
    unsigned long long* sums;
    unsigned long long* flags;
    unsigned long long* nonfinite;
};

template <class Codec>
struct inspect_body;

template <int Bits, std::size_t Block>
struct inspect_body<compress::blockwise<Bits, Block>> {
    using codec = compress::blockwise<Bits, Block>;

    // Codes [from, to) of a segment all equal `want`.
    __device__ static bool codes_are(const std::byte* codes, std::uint64_t from, std::uint64_t to,
                                     unsigned want) {
        for (std::uint64_t j = from; j < to; ++j) {
            if (compress::wire::unpack<Bits>(codes, j) != want) {
                return false;
            }
        }
        return true;
    }

    // Thread per block: the checks of blockwise::decode, and whether the average is finite.
    __device__ static void run(const compress_item& item, const tensor_desc& d,
                               const compress_tensor& ct, const gathered_payloads& g,
                               const verdict_view& v, const float* fractions) {
        const std::uint64_t n = d.size;
        const std::uint64_t first = item.first / Block;
        const std::uint64_t count = (item.count + Block - 1) / Block;
        const std::byte* base = g.base + compress::wire::header_bytes + ct.body;
        for (std::uint64_t q = threadIdx.x; q < count; q += block_threads) {
            const std::uint64_t b = first + q;
            const std::uint64_t from = b * Block;
            const std::uint64_t to = min_u64(n, from + Block);
            bool any_nan = false;
            double scales = 0.0;
            for (std::uint32_t k = 0; k < g.ranks; ++k) {
                const std::byte* seg = base + k * g.stride;
                const std::byte* codes = seg + 4 * ct.blocks;
                const std::uint32_t bits = reinterpret_cast<const std::uint32_t*>(seg)[b];
                if (bits >= 0x7f800000u && bits != codec::nan_scale_bits) {
                    atomicOr(v.flags + k, bad_scale);
                } else if (bits == 0u || bits == codec::nan_scale_bits) {
                    any_nan = any_nan || bits != 0u;
                    if (!codes_are(codes, from, to, codec::zero_code())) {
                        atomicOr(v.flags + k, bad_zero_codes);
                    }
                } else {
                    scales += static_cast<double>(__uint_as_float(bits));
                }
                if (b + 1 == ct.blocks) {  // the segment's last bytes
                    constexpr std::uint64_t per_byte = 8 / Bits;
                    const std::uint64_t packed = packed_bytes<Bits>(n);
                    if (!codes_are(codes, n, packed * per_byte, 0u)) {
                        atomicOr(v.flags + k, bad_padding_bits);
                    }
                    for (std::uint64_t i = packed; i < code_bytes<Bits>(n); ++i) {
                        if (codes[i] != std::byte{0}) {
                            atomicOr(v.flags + k, bad_padding_bytes);
                        }
                    }
                }
            }
            // Every element of a block with a NaN scale is NaN. Otherwise |level| <= scale, so a
            // running fp32 sum stays below (sum of scales) (1 + 2^-24)^M: finite unless the
            // scales are huge, which is checked element by element.
            if (any_nan) {
                atomicMin(v.nonfinite, d.flat_offset + from);
            } else if (scales >= 0x1.0p125) {
                for (std::uint64_t j = from; j < to; ++j) {
                    float avg;
                    average<codec, 1>(g, ct.body, ct.blocks, 0, j, &avg, fractions);
                    if (!math::isfinite(avg)) {
                        atomicMin(v.nonfinite, d.flat_offset + j);
                        break;
                    }
                }
            }
        }
    }
};

template <class T>
struct inspect_body<compress::cast<T>> {
    // Every 16-bit pattern is valid; only the average can be non-finite (NaN or inf sent, or an
    // overflowing bf16 sum).
    __device__ static void run(const compress_item& item, const tensor_desc& d,
                               const compress_tensor& ct, const gathered_payloads& g,
                               const verdict_view& v, const float*) {
        for (std::uint64_t i = threadIdx.x; i < item.count; i += block_threads) {
            const std::uint64_t j = item.first + i;
            float avg;
            average<compress::cast<T>, 1>(g, ct.body, 0, 0, j, &avg, nullptr);
            if (!math::isfinite(avg)) {
                atomicMin(v.nonfinite, d.flat_offset + j);
            }
        }
    }
};

template <class Codec>
__global__ void __launch_bounds__(block_threads)
    inspect_kernel(table_view t, compress_view p, gathered_payloads g, verdict_view v) {
    __shared__ float fractions[level_fractions<Codec>::count];
    level_fractions<Codec>::fill(fractions);
    __syncthreads();
    const compress_item item = p.items[blockIdx.x];
    const tensor_desc d = t.tensors[item.tensor];
    const compress_tensor ct = p.tensors[item.tensor];
    inspect_body<Codec>::run(item, d, ct, g, v, fractions);
}

// ---- statistical: encode -----------------------------------------------------------------------

// The unsigned sum over a warp (counts: exact in any order).
__device__ __forceinline__ unsigned warp_usum(unsigned v) {
#pragma unroll
    for (unsigned m = 16; m > 0; m /= 2) {
        v += __shfl_xor_sync(full_mask, v, static_cast<int>(m));
    }
    return v;
}

// One warp's chunk of a group, pass 1 to 4 (see encode_statistical). Lane l takes elements l,
// l + 32, ... of the chunk, in that order: the order statistical.hpp defines, so group_sum<32>
// (the documented butterfly) gives the host's chunk sums bit for bit.
template <int Bits, int Pass, bool Feedback, encode_from From, class P, bool UseMaster>
__device__ __forceinline__ void stat_chunk_pass(const tensor_desc& d, const stat_chunk& c,
                                                const compress_tensor& ct, const stat_view& v,
                                                const stat_encode_params& a, std::uint64_t index,
                                                unsigned lane) {
    using codec = compress::statistical<Bits>;
    constexpr unsigned B = codec::bins;
    encode_source<Feedback, From, P, UseMaster> src;
    src.source = a.source + d.padded_offset;
    src.value = static_cast<const P*>(d.value);
    src.master = UseMaster ? a.master + d.master_offset : nullptr;
    src.residual = Feedback ? a.residual + d.padded_offset : nullptr;
    src.next = Feedback ? a.next + d.padded_offset : nullptr;
    src.n = d.size;
    src.decay = a.decay;
    src.scale = a.scale;
    src.vec_value = false;
    // e after pass 1: with error feedback it waits in the new residual buffer (pass 4 overwrites
    // it with the residual); without, x is formed again from its source (no scratch array).
    const auto again = [&](std::uint64_t j) {
        if constexpr (Feedback) {
            return src.next[j];
        } else {
            return src.load1(j);
        }
    };
    const float* st = v.stats + static_cast<std::uint64_t>(c.group) * (2 + B);
    const std::uint64_t first = c.first;
    const unsigned count = c.count;
    if constexpr (Pass == 1) {
        double sum = 0.0;
        for (unsigned i = lane; i < count; i += 32) {
            const float e = src.load1(first + i);
            src.store1(first + i, e);
            sum += static_cast<double>(e);
        }
        sum = group_sum<32>(sum);
        if (lane == 0) {
            v.sums[index] = sum;
        }
    } else if constexpr (Pass == 2) {
        const double shift = static_cast<double>(st[0]);
        double sum = 0.0;
        for (unsigned i = lane; i < count; i += 32) {
            const double x = static_cast<double>(again(first + i)) - shift;
            sum = __dadd_rn(sum, __dmul_rn(x, x));  // rounded product, as on the host
        }
        sum = group_sum<32>(sum);
        if (lane == 0) {
            v.sums[index] = sum;
        }
    } else if constexpr (Pass == 3) {
        const float shift = st[0];
        const float scale = st[1];
        double sums[B];
        unsigned counts[B];
#pragma unroll
        for (unsigned b = 0; b < B; ++b) {
            sums[b] = 0.0;
            counts[b] = 0;
        }
        auto* words = reinterpret_cast<unsigned*>(a.payload + compress::wire::header_bytes +
                                                  ct.body + codec::record_bytes * ct.blocks);
        constexpr unsigned per_word = 32 / Bits;
        const unsigned rounds = (count + 31) / 32;
        for (unsigned r = 0; r < rounds; ++r) {
            const unsigned i = 32 * r + lane;
            unsigned q = 0;
            if (i < count) {
                const float x = again(first + i);
                q = codec::code(x, shift, scale);
                const double cx = static_cast<double>(x) - static_cast<double>(shift);
#pragma unroll
                for (unsigned b = 0; b < B; ++b) {
                    if (b == q) {  // registers, not a dynamically indexed local array
                        sums[b] += cx;
                        ++counts[b];
                    }
                }
            }
            // The 32 codes of this round are 32 * Bits bits: one ballot per code bit, then lane
            // w < Bits interleaves word w (elements w * 32 / Bits ..) from them.
            unsigned planes[Bits];
#pragma unroll
            for (int b = 0; b < Bits; ++b) {
                planes[b] = __ballot_sync(full_mask, static_cast<int>((q >> b) & 1u));
            }
            unsigned word = 0;
            const unsigned base = (lane % static_cast<unsigned>(Bits)) * per_word;
#pragma unroll
            for (unsigned k = 0; k < per_word; ++k) {
#pragma unroll
                for (int b = 0; b < Bits; ++b) {
                    const unsigned bit = (planes[b] >> (base + k)) & 1u;
                    word |= bit << (k * Bits + static_cast<unsigned>(b));
                }
            }
            const std::uint64_t bit = (first + 32 * r) * static_cast<unsigned>(Bits);
            if (lane < static_cast<unsigned>(Bits)) {
                const std::uint64_t w = bit / 32 + lane;
                const unsigned offset = static_cast<unsigned>(bit % 32);
                if (offset == 0 && i - lane + 32 <= count) {
                    words[w] = word;  // whole words of this group: a plain store
                } else {
                    // A row that starts inside a word, or a group's last round: OR into the
                    // zeroed payload (other groups own the rest of the word). Only nonzero
                    // pieces are written, so nothing past the code bytes is touched.
                    const unsigned low = word << offset;
                    const unsigned high = offset == 0 ? 0u : word >> (32 - offset);
                    if (low != 0) {
                        atomicOr(words + w, low);
                    }
                    if (high != 0) {
                        atomicOr(words + w + 1, high);
                    }
                }
            }
        }
#pragma unroll
        for (unsigned b = 0; b < B; ++b) {
            const double s = group_sum<32>(sums[b]);
            const unsigned k = warp_usum(counts[b]);
            if (lane == 0) {
                v.bin_sums[index * B + b] = s;
                v.bin_counts[index * B + b] = k;
            }
        }
    } else {
        const float shift = st[0];
        const float scale = st[1];
        for (unsigned i = lane; i < count; i += 32) {
            const float x = again(first + i);
            const unsigned q = codec::code(x, shift, scale);
            src.next[first + i] = __fsub_rn(x, codec::value(st[2 + q], shift));
        }
    }
}

template <int Bits, int Pass, bool Feedback, encode_from From, bf16_update Mode, unsigned Combos>
__global__ void __launch_bounds__(block_threads)
    stat_pass_kernel(table_view t, stat_view v, stat_encode_params a) {
    const std::uint64_t index =
        static_cast<std::uint64_t>(blockIdx.x) * (block_threads / 32) + threadIdx.x / 32;
    if (index >= v.chunk_count) {
        return;  // the whole warp
    }
    const unsigned lane = threadIdx.x % 32;
    const stat_chunk c = v.chunks[index];
    const std::uint32_t tensor = v.groups[c.group].tensor;
    const tensor_desc d = t.tensors[tensor];
    const compress_tensor ct = v.tensors[tensor];
    if constexpr (From == encode_from::delta) {
        stat_chunk_pass<Bits, Pass, Feedback, From, float, false>(d, c, ct, v, a, index, lane);
    } else {
        if (d.combo & 1u) {
            if constexpr ((Combos & (combos::bf16_f32 | combos::bf16_bf16)) != 0) {
                stat_chunk_pass<Bits, Pass, Feedback, From, loco::bf16,
                                reads_master<loco::bf16, Mode>>(d, c, ct, v, a, index, lane);
            }
        } else {
            if constexpr ((Combos & (combos::f32_f32 | combos::f32_bf16)) != 0) {
                stat_chunk_pass<Bits, Pass, Feedback, From, float, false>(d, c, ct, v, a, index,
                                                                          lane);
            }
        }
    }
}

// One thread per group: the chunk sums in chunk order (statistical.hpp), then shift (stage 1),
// scale (2) or the table (3), kept in v.stats and written to the group's record.
template <int Bits, int Stage>
__global__ void __launch_bounds__(block_threads)
    stat_finish_kernel(stat_view v, std::byte* payload, float range) {
    using codec = compress::statistical<Bits>;
    constexpr unsigned B = codec::bins;
    const std::uint64_t g = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (g >= v.group_count) {
        return;
    }
    const stat_group gr = v.groups[g];
    float* st = v.stats + g * (2 + B);
    auto* record = reinterpret_cast<float*>(payload + compress::wire::header_bytes + gr.record);
    // The adds depend on each other (chunk order); unrolling lets the loads run ahead of them.
    if constexpr (Stage == 1 || Stage == 2) {
        double total = 0.0;
#pragma unroll 8
        for (std::uint32_t c = 0; c < gr.chunks; ++c) {
            total += v.sums[gr.chunk0 + c];
        }
        if constexpr (Stage == 1) {
            const float shift = static_cast<float>(total / static_cast<double>(gr.n));
            st[0] = shift;
            record[0] = codec::canonical(shift);
        } else {
            st[1] = codec::scale_of(total, gr.n, range);
        }
    } else {
        double totals[B];
        std::uint64_t counts[B];
#pragma unroll
        for (unsigned b = 0; b < B; ++b) {
            totals[b] = 0.0;
            counts[b] = 0;
        }
#pragma unroll 2
        for (std::uint32_t c = 0; c < gr.chunks; ++c) {
            const std::uint64_t at = (gr.chunk0 + c) * B;
#pragma unroll
            for (unsigned b = 0; b < B; ++b) {
                totals[b] += v.bin_sums[at + b];
                counts[b] += v.bin_counts[at + b];
            }
        }
#pragma unroll
        for (unsigned b = 0; b < B; ++b) {
            const float lut = codec::lut_entry(totals[b], counts[b]);
            st[2 + b] = lut;
            record[1 + b] = lut;
        }
    }
}

// ---- statistical: verification -----------------------------------------------------------------

// Warp per chunk: the bins each rank's codes use (ORed into masks[rank * groups + group]), and
// the smallest flat index whose average is not finite.
template <int Bits>
__global__ void __launch_bounds__(block_threads)
    stat_inspect_kernel(table_view t, stat_view v, gathered_payloads g, verdict_view vd,
                        unsigned* masks) {
    using codec = compress::statistical<Bits>;
    const std::uint64_t index =
        static_cast<std::uint64_t>(blockIdx.x) * (block_threads / 32) + threadIdx.x / 32;
    if (index >= v.chunk_count) {
        return;
    }
    const unsigned lane = threadIdx.x % 32;
    const stat_chunk c = v.chunks[index];
    const std::uint32_t tensor = v.groups[c.group].tensor;
    const compress_tensor ct = v.tensors[tensor];
    const std::byte* codes =
        g.base + compress::wire::header_bytes + ct.body + codec::record_bytes * ct.blocks;
    for (std::uint32_t k = 0; k < g.ranks; ++k) {
        unsigned used = 0;
        for (unsigned i = lane; i < c.count; i += 32) {
            used |= 1u << compress::wire::unpack<Bits>(codes + k * g.stride, c.first + i);
        }
#pragma unroll
        for (unsigned m = 16; m > 0; m /= 2) {
            used |= __shfl_xor_sync(full_mask, used, static_cast<int>(m));
        }
        if (lane == 0) {
            atomicOr(masks + k * v.group_count + c.group, used);
        }
    }
    const std::uint64_t flat = t.tensors[tensor].flat_offset;
    for (unsigned i = lane; i < c.count; i += 32) {
        float avg;
        average<codec, 1>(g, ct.body, ct.blocks, ct.cols, c.first + i, &avg, nullptr);
        if (!math::isfinite(avg)) {
            atomicMin(vd.nonfinite, flat + c.first + i);
            break;  // this lane's later elements have larger indices
        }
    }
}

// Thread per (rank, group): a nonzero table entry for a bin no code uses; then thread per (rank,
// tensor): padding bits after the last code and alignment bytes. statistical::decode's checks.
template <int Bits>
__global__ void __launch_bounds__(block_threads)
    stat_check_kernel(stat_view v, gathered_payloads g, verdict_view vd, const unsigned* masks) {
    using codec = compress::statistical<Bits>;
    const std::uint64_t id = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    const std::uint64_t group_items = g.ranks * v.group_count;
    if (id < group_items) {
        const std::uint64_t k = id / v.group_count;
        const stat_group gr = v.groups[id % v.group_count];
        const auto* record = reinterpret_cast<const std::uint32_t*>(
            g.base + k * g.stride + compress::wire::header_bytes + gr.record);
        const unsigned used = masks[id];
        for (unsigned b = 0; b < codec::bins; ++b) {
            if (((used >> b) & 1u) == 0 && record[1 + b] != 0u) {
                atomicOr(vd.flags + k, bad_unused_bin);
            }
        }
    } else if (id < group_items + g.ranks * v.tensor_count) {
        const std::uint64_t q = id - group_items;
        const std::uint64_t k = q / v.tensor_count;
        const compress_tensor ct = v.tensors[q % v.tensor_count];
        const std::uint64_t n = ct.blocks * ct.cols;
        const std::byte* codes = g.base + k * g.stride + compress::wire::header_bytes + ct.body +
                                 codec::record_bytes * ct.blocks;
        constexpr std::uint64_t per_byte = 8 / Bits;
        const std::uint64_t packed = packed_bytes<Bits>(n);
        for (std::uint64_t j = n; j < packed * per_byte; ++j) {
            if (compress::wire::unpack<Bits>(codes, j) != 0) {
                atomicOr(vd.flags + k, bad_padding_bits);
            }
        }
        for (std::uint64_t i = packed; i < code_bytes<Bits>(n); ++i) {
            if (codes[i] != std::byte{0}) {
                atomicOr(vd.flags + k, bad_padding_bytes);
            }
        }
    }
}

#endif  // LOCO_HAS_CUDA()

template <class Codec>
void require_plan(const compress_plan<Codec>& plan, const tensor_table& table, const char* what) {
    require_device(table, what);
    if (plan.device() != table.device() || plan.elements() != table.total_elements() ||
        plan.segments().size() != table.size()) {
        throw invalid_argument(std::string("loco: ") + what +
                               ": the compress_plan was built for another table");
    }
}

// Sums body words of `ranks` payloads into sums[0 .. ranks).
inline void launch_checksum(const gathered_payloads& g, std::uint64_t len,
                            unsigned long long* sums, cudaStream_t stream) {
    const std::uint64_t words = (len + 7) / 8;
    const std::uint64_t per_rank =
        std::max<std::uint64_t>(1, (words + checksum_words_per_cta - 1) / checksum_words_per_cta);
    if (per_rank * g.ranks > INT32_MAX) {
        throw invalid_argument("loco: payloads too large for one checksum grid");
    }
#if LOCO_HAS_CUDA()
    LOCO_CUDA_CHECK(launch(checksum_kernel<>, static_cast<std::uint32_t>(per_rank * g.ranks),
                           stream, g, len, static_cast<std::uint32_t>(per_rank), sums));
#else
    static_cast<void>(sums);
    static_cast<void>(stream);
#endif
}

// statistical<Bits>: passes over the chunks of every group (warp per chunk) with a one-thread-per-
// group kernel after each sum. The code region is zeroed first: codes of rows that start inside
// a word are ORed in.
//   pass 1   e (x, or decay * residual + s * x), stored into the new residual buffer with error
//            feedback; per chunk the sum of e                        -> finish: shift
//   pass 2   per chunk the sum of (e - shift)^2                      -> finish: scale
//   pass 3   codes written; per chunk and bin the sum of e - shift and the count -> finish: lut
//   pass 4   (error feedback) residual = e - (lut[q] + shift)
template <class Codec, bool Feedback, encode_from From, bf16_update Mode, unsigned Combos>
void encode_statistical(const compress_plan<Codec>& plan, const tensor_table& table,
                        const typename Codec::hyper& h, const encode_params& a,
                        cudaStream_t stream) {
    constexpr int Bits = codec_traits<Codec>::bits;
    const std::uint64_t len = plan.payload_bytes() - compress::wire::header_bytes;
    LOCO_CUDA_CHECK(cudaMemsetAsync(plan.checksum_accumulator(), 0, sizeof(unsigned long long),
                                    stream));
    if (len != 0) {
        LOCO_CUDA_CHECK(cudaMemsetAsync(a.payload + compress::wire::header_bytes, 0, len, stream));
    }
    const stat_encode_params sp{a.source, a.master, a.residual, a.next, a.payload,
                                a.decay,  a.scale,  h.range,    0u};
    const stat_view& v = plan.stats();
    const auto chunk_grid = static_cast<std::uint32_t>((v.chunk_count + 7) / 8);
    const auto group_grid = static_cast<std::uint32_t>((v.group_count + block_threads - 1) /
                                                       block_threads);
#if LOCO_HAS_CUDA()
    if (v.chunk_count != 0) {
        const table_view t = table.view();
        LOCO_CUDA_CHECK(launch(stat_pass_kernel<Bits, 1, Feedback, From, Mode, Combos>,
                               chunk_grid, stream, t, v, sp));
        LOCO_CUDA_CHECK(launch(stat_finish_kernel<Bits, 1>, group_grid, stream, v, a.payload,
                               h.range));
        LOCO_CUDA_CHECK(launch(stat_pass_kernel<Bits, 2, Feedback, From, Mode, Combos>,
                               chunk_grid, stream, t, v, sp));
        LOCO_CUDA_CHECK(launch(stat_finish_kernel<Bits, 2>, group_grid, stream, v, a.payload,
                               h.range));
        LOCO_CUDA_CHECK(launch(stat_pass_kernel<Bits, 3, Feedback, From, Mode, Combos>,
                               chunk_grid, stream, t, v, sp));
        LOCO_CUDA_CHECK(launch(stat_finish_kernel<Bits, 3>, group_grid, stream, v, a.payload,
                               h.range));
        if constexpr (Feedback) {
            LOCO_CUDA_CHECK(launch(stat_pass_kernel<Bits, 4, Feedback, From, Mode, Combos>,
                                   chunk_grid, stream, t, v, sp));
        }
    }
    const gathered_payloads self{a.payload, plan.payload_bytes(), 1, 0};
    launch_checksum(self, len, plan.checksum_accumulator(), stream);
    LOCO_CUDA_CHECK(launch(header_kernel<>, 1, stream, a.payload, plan.prefix(h),
                           plan.checksum_accumulator(), len));
#else
    static_cast<void>(table);
    static_cast<void>(sp);
    static_cast<void>(chunk_grid);
    static_cast<void>(group_grid);
#endif
}

}  // namespace detail

// ---- encode --------------------------------------------------------------------------------------

// Encodes the pseudo-gradient of every tensor of `table` into io.payload, the host compressor's
// payload byte for byte. C is a device compressor (has_device_compressor<C>): with
// error_feedback<>, io.residual is read and io.next_residual written (padded layout; padding
// stays as it is, zero); the residual follows error_feedback::encode exactly. x is read as From
// says. Asynchronous on `stream`; no host synchronisation. statistical: the plan's workspace
// holds the group statistics, so encodes with one plan must not overlap; with error feedback
// io.next_residual holds e between the passes (it may still equal io.residual).
template <class C, encode_from From, bf16_update Mode = bf16_update::master,
          unsigned Combos = combos::all>
void encode(const compress_plan<typename device_compressor<C>::codec>& plan,
            const tensor_table& table, const typename C::hyper& h, const encode_io& io,
            const device_encode_context& ctx, cudaStream_t stream) {
    static_assert(has_device_compressor<C>, "loco: cuda::encode: C has no device implementation");
    using support = device_compressor<C>;
    using codec = typename support::codec;
    constexpr const char* what = "cuda::encode";
    loco::detail::validate_hyper<C>(h);
    detail::require_plan(plan, table, what);
    detail::require_combos(table, Combos, what);
    detail::require_payload_pointer(io.payload, "payload", what);
    const std::size_t padded = table.padded_elements();
    detail::encode_params a{};
    if constexpr (From == encode_from::delta) {
        detail::require_pointer(io.delta, padded, "delta", what);
        a.source = io.delta;
    } else {
        detail::require_pointer(io.global, padded, "global", what);
        if constexpr (Mode == bf16_update::master) {
            detail::require_pointer(io.master, table.master_elements(), "master", what);
        }
        a.source = io.global;
        a.master = io.master;
    }
    typename codec::hyper ch{};
    if constexpr (support::feedback) {
        detail::require_pointer(io.residual, padded, "residual", what);
        detail::require_pointer(io.next_residual, padded, "next_residual", what);
        a.residual = io.residual;
        a.next = io.next_residual;
        a.decay = h.decay;
        a.scale = h.fold_outer_lr ? ctx.outer_lr : 1.0f;
        ch = h.compress;
    } else {
        ch = h;
    }
    if constexpr (detail::codec_traits<codec>::blockwise) {
        a.flags = (ch.scale == compress::scale_kind::mean_abs ? detail::flag_mean_abs : 0u) |
                  (ch.round == compress::rounding::stochastic ? detail::flag_stochastic : 0u);
    }
    a.payload = io.payload;
    a.round_from = ctx.round_from;
    a.seed = ctx.seed;
    a.round = ctx.round;
    a.rank = static_cast<std::uint32_t>(ctx.rank);
    if constexpr (detail::is_statistical<codec>) {
        plan.require_per(ch, what);
        detail::encode_statistical<codec, support::feedback, From, Mode, Combos>(plan, table, ch,
                                                                                 a, stream);
    } else {
        const std::uint64_t len = plan.payload_bytes() - compress::wire::header_bytes;
        LOCO_CUDA_CHECK(cudaMemsetAsync(plan.checksum_accumulator(), 0, sizeof(unsigned long long),
                                        stream));
        bool zeroed = false;
        if constexpr (detail::codec_traits<codec>::blockwise) {
            zeroed = !detail::blockwise_layout<detail::codec_traits<codec>::bits,
                                               detail::codec_traits<codec>::block>::fast;
        }
        if (zeroed && len != 0) {  // the generic path ORs codes into zeroed words
            LOCO_CUDA_CHECK(
                cudaMemsetAsync(io.payload + compress::wire::header_bytes, 0, len, stream));
        }
#if LOCO_HAS_CUDA()
        if (plan.items() != 0) {
            LOCO_CUDA_CHECK(detail::launch(
                detail::encode_kernel<codec, support::feedback, From, Mode, Combos>, plan.items(),
                stream, table.view(), plan.view(), a));
        }
        const gathered_payloads self{io.payload, plan.payload_bytes(), 1, 0};
        detail::launch_checksum(self, len, plan.checksum_accumulator(), stream);
        LOCO_CUDA_CHECK(detail::launch(detail::header_kernel<>, 1, stream, io.payload,
                                       plan.prefix(ch), plan.checksum_accumulator(), len));
#endif
    }
}

// ---- verify ------------------------------------------------------------------------------------

// Checks M gathered payloads of a plan as the host decoder would (wire::open: header fields and
// checksum; blockwise: scales, codes of zero/NaN blocks, padding; statistical: table entries of
// unused bins, padding), and finds the smallest flat
// index where their average is not finite. Owns the device verdict and the pinned host copy.
class payload_check {
public:
    payload_check() = default;
    explicit payload_check(int ranks)
        : ranks_(checked(ranks)),
          verdict_(2 * ranks_ + 1),
          host_(2 * ranks_ + 1 + (compress::wire::header_bytes * ranks_ + 7) / 8) {}

    // Blocks until the checks are done (one host synchronisation). Throws loco::wire_error
    // naming the first bad rank, as the host decoder would refuse it; returns the smallest flat
    // index of a non-finite average element, or no_nonfinite. The device copy of that index
    // stays readable at nonfinite() until the next run().
    template <class Codec>
    std::uint64_t run(const compress_plan<Codec>& plan, const tensor_table& table,
                      const typename Codec::hyper& h, const std::byte* gathered,
                      cudaStream_t stream) {
        constexpr const char* what = "cuda::payload_check";
        detail::require_plan(plan, table, what);
        detail::require_payload_pointer(gathered, "gathered payloads", what);
        loco::detail::validate_hyper<Codec>(h);
        if constexpr (detail::is_statistical<Codec>) {
            plan.require_per(h, what);
        }
        const std::size_t m = ranks_;
        const std::uint64_t p = plan.payload_bytes();
        const std::uint64_t len = p - compress::wire::header_bytes;
        LOCO_CUDA_CHECK(cudaMemsetAsync(verdict_.get(), 0, 2 * m * 8, stream));
        LOCO_CUDA_CHECK(cudaMemsetAsync(verdict_.get() + 2 * m, 0xff, 8, stream));
        const gathered_payloads g{gathered, p, static_cast<std::uint32_t>(m), 0};
        detail::launch_checksum(g, len, verdict_.get(), stream);
        const detail::verdict_view v{verdict_.get(), verdict_.get() + m, verdict_.get() + 2 * m};
        if constexpr (detail::is_statistical<Codec>) {
            inspect_statistical(plan, table, g, v, stream);
        } else {
#if LOCO_HAS_CUDA()
            if (plan.items() != 0) {
                LOCO_CUDA_CHECK(detail::launch(detail::inspect_kernel<Codec>, plan.items(), stream,
                                               table.view(), plan.view(), g, v));
            }
#else
            static_cast<void>(v);
#endif
        }
        unsigned long long* host = host_.get();
        auto* headers = reinterpret_cast<std::byte*>(host + 2 * m + 1);
        LOCO_CUDA_CHECK(cudaMemcpyAsync(host, verdict_.get(), (2 * m + 1) * 8,
                                        cudaMemcpyDeviceToHost, stream));
        // One copy per header (a 2-D copy would limit the payload size to the device's pitch).
        for (std::size_t k = 0; k < m; ++k) {
            LOCO_CUDA_CHECK(cudaMemcpyAsync(headers + k * compress::wire::header_bytes,
                                            gathered + k * p, compress::wire::header_bytes,
                                            cudaMemcpyDeviceToHost, stream));
        }
        LOCO_CUDA_CHECK(cudaStreamSynchronize(stream));
        const header_prefix want = plan.prefix(h);
        for (std::size_t k = 0; k < m; ++k) {
            check_one(std::string(Codec::name), k, headers + k * compress::wire::header_bytes,
                      want, host[k] + len, host[m + k]);
        }
        return host[2 * m];
    }

    // Device copy of the last run's non-finite index (for decode_average_apply's skip).
    const std::uint64_t* nonfinite() const noexcept {
        return reinterpret_cast<const std::uint64_t*>(verdict_.get() + 2 * ranks_);
    }
    std::size_t ranks() const noexcept { return ranks_; }

private:
    static std::size_t checked(int ranks) {
        if (ranks < 1) {
            throw invalid_argument("loco: payload_check needs at least one rank");
        }
        return static_cast<std::size_t>(ranks);
    }

    // statistical: the bins each rank's codes use, per group (masks_), then the table entries and
    // padding; and the first non-finite average.
    template <class Codec>
    void inspect_statistical(const compress_plan<Codec>& plan, const tensor_table& table,
                             const gathered_payloads& g, const detail::verdict_view& v,
                             cudaStream_t stream) {
        constexpr int Bits = detail::codec_traits<Codec>::bits;
        const std::size_t masks = ranks_ * plan.groups();
        if (masks_.size() < masks) {
            masks_ = device_buffer<unsigned>(masks);
        }
        if (masks != 0) {
            LOCO_CUDA_CHECK(cudaMemsetAsync(masks_.get(), 0, masks * sizeof(unsigned), stream));
        }
        const std::uint64_t checks = ranks_ * (plan.groups() + plan.segments().size());
        if (checks / block_threads >= INT32_MAX) {
            throw invalid_argument("loco: payload_check: too many groups for one grid");
        }
#if LOCO_HAS_CUDA()
        if (plan.chunks() != 0) {
            LOCO_CUDA_CHECK(detail::launch(detail::stat_inspect_kernel<Bits>,
                                           static_cast<std::uint32_t>((plan.chunks() + 7) / 8),
                                           stream, table.view(), plan.stats(), g, v,
                                           masks_.get()));
        }
        if (checks != 0) {
            LOCO_CUDA_CHECK(detail::launch(
                detail::stat_check_kernel<Bits>,
                static_cast<std::uint32_t>((checks + block_threads - 1) / block_threads), stream,
                plan.stats(), g, v, static_cast<const unsigned*>(masks_.get())));
        }
#else
        static_cast<void>(table);
        static_cast<void>(g);
        static_cast<void>(v);
        static_cast<void>(stream);
#endif
    }

    // The host decoder's checks, in wire::open's order, then blockwise's or statistical's.
    static void check_one(const std::string& who, std::size_t k, const std::byte* got,
                          const header_prefix& want, std::uint64_t checksum,
                          unsigned long long flags) {
        const auto fail = [&](const std::string& why) {
            return wire_error("loco::compress::" + who + ": malformed payload from rank " +
                              std::to_string(k) + ": " + why);
        };
        const auto u = [&](const void* src, std::size_t at, std::size_t n) {
            std::uint64_t v = 0;
            std::memcpy(&v, static_cast<const unsigned char*>(src) + at, n);
            return v;
        };
        const auto field = [&](const char* name, std::size_t at, std::size_t n) {
            const std::uint64_t g = u(got, at, n);
            const std::uint64_t w = u(want.bytes, at, n);
            if (g != w) {
                throw fail(std::string(name) + " is " + std::to_string(g) + ", expected " +
                           std::to_string(w));
            }
        };
        if (u(got, 0, 1) != 'L' || u(got, 1, 1) != 'W') {
            throw fail("bad magic");
        }
        field("the format version", 2, 1);
        field("the compressor id", 3, 1);
        field("the code width", 4, 1);
        field("the flags", 5, 1);
        field("the reserved field", 6, 2);
        field("the block size", 8, 4);
        field("the segment count", 12, 4);
        field("the element count", 16, 8);
        field("the body size", 24, 8);
        if (u(got, 32, 8) != checksum) {
            throw fail("checksum mismatch");
        }
        if (flags & detail::bad_scale) {
            throw fail("a block scale is negative or not finite");
        }
        if (flags & detail::bad_zero_codes) {
            throw fail("a code of a zero-scale or NaN-scale block is not the zero code");
        }
        if (flags & detail::bad_unused_bin) {
            throw fail("a nonzero table entry for an unused bin");
        }
        if (flags & detail::bad_padding_bits) {
            throw fail("nonzero padding bits after the last code");
        }
        if (flags & detail::bad_padding_bytes) {
            throw fail("nonzero alignment padding");
        }
    }

    std::size_t ranks_ = 0;
    device_buffer<unsigned long long> verdict_;
    pinned_buffer<unsigned long long> host_;
    device_buffer<unsigned> masks_;  // statistical: ranks x groups bin masks
};

// ---- decode ------------------------------------------------------------------------------------

// out := the average of M payloads (gathered: M payloads of plan.payload_bytes() each, rank
// order), fp32 in rank order, padded layout, padding 0. The payloads must have passed
// payload_check (malformed ones decode to garbage, never out of bounds).
template <class Codec>
void decode_average(const compress_plan<Codec>& plan, const tensor_table& table,
                    const std::byte* gathered, int ranks, float* out, cudaStream_t stream) {
    constexpr const char* what = "cuda::decode_average";
    detail::require_plan(plan, table, what);
    detail::require_payload_pointer(gathered, "gathered payloads", what);
    detail::require_pointer(out, table.padded_elements(), "out", what);
    if (ranks < 1) {
        throw invalid_argument("loco: cuda::decode_average needs at least one payload");
    }
    const gathered_payloads g{gathered, plan.payload_bytes(), static_cast<std::uint32_t>(ranks),
                              0};
#if LOCO_HAS_CUDA()
    LOCO_CUDA_CHECK(detail::launch(detail::decode_average_kernel<Codec>, table.blocks(), stream,
                                   table.view(), plan.view(), g, out));
#else
    static_cast<void>(g);
    static_cast<void>(stream);
#endif
}

// Phase 2 of a compressed sync in one kernel: the average of the M payloads (as decode_average),
// then outer_apply's work: Outer::update of global and state, the new global values written to
// the parameters (bf16: rounded to nearest) and to the masters of bf16 values. With skip_if
// non-null and *skip_if != no_nonfinite (payload_check::nonfinite()), only the write-back of the
// unchanged global values happens and the skipped count advances.
template <class Codec, class Outer, bf16_update Mode = bf16_update::master,
          unsigned Combos = combos::all>
void decode_average_apply(const compress_plan<Codec>& plan, const tensor_table& table,
                          const std::byte* gathered, int ranks, float* global, float* state,
                          float* master, const typename Outer::hyper* hyper,
                          step_control* control, const std::uint64_t* skip_if,
                          cudaStream_t stream) {
    static_assert(elementwise_optimizer<Outer>);
    constexpr const char* what = "cuda::decode_average_apply";
    detail::require_plan(plan, table, what);
    detail::require_combos(table, Combos, what);
    detail::require_payload_pointer(gathered, "gathered payloads", what);
    detail::require_pointer(global, table.padded_elements(), "global", what);
    detail::require_pointer(state,
                            static_cast<std::size_t>(Outer::state_size) * table.padded_elements(),
                            "state", what);
    if constexpr (Mode == bf16_update::master) {
        detail::require_pointer(master, table.master_elements(), "master", what);
    }
    detail::require_pointer(hyper, 1, "hyper", what);
    detail::require_pointer(control, 1, "control", what);
    if (ranks < 1) {
        throw invalid_argument("loco: cuda::decode_average_apply needs at least one payload");
    }
    const gathered_payloads g{gathered, plan.payload_bytes(), static_cast<std::uint32_t>(ranks),
                              0};
    detail::apply_args<Outer> a{hyper, control, global, state, master, skip_if};
#if LOCO_HAS_CUDA()
    LOCO_CUDA_CHECK(detail::launch(detail::apply_kernel<Codec, Outer, Mode, Combos>,
                                   table.blocks(), stream, table.view(), plan.view(), g, a));
#else
    static_cast<void>(g);
    static_cast<void>(a);
    static_cast<void>(stream);
#endif
}

}  // namespace loco::backend::cuda
