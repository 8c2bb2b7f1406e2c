#pragma once
// Which compressors have a fused device path (device_compressor<C>), and the facts about each
// codec the layouts and kernels use (detail::codec_traits; blockwise's work split,
// detail::blockwise_layout).

#include <loco/compress/blockwise.hpp>
#include <loco/compress/cast.hpp>
#include <loco/compress/error_feedback.hpp>
#include <loco/compress/statistical.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>
#include <loco/math.hpp>
#include <loco/policy.hpp>

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
// error_feedback<> around one of them) has the fused device path; ::codec is the payload's
// compressor, ::feedback says whether a residual is kept, ::codec_hyper(h) is the codec's part of
// C's settings.
template <class C>
struct device_compressor {
    using codec = C;
    static constexpr bool feedback = false;
    static constexpr bool available = detail::codec_traits<C>::available;
    static const typename codec::hyper& codec_hyper(const typename C::hyper& h) noexcept {
        return h;
    }
};

template <class C>
struct device_compressor<compress::error_feedback<C>> {
    using codec = C;
    static constexpr bool feedback = true;
    static constexpr bool available = detail::codec_traits<C>::available && C::state_size == 0;
    static const typename codec::hyper& codec_hyper(
        const typename compress::error_feedback<C>::hyper& h) noexcept {
        return h.compress;
    }
};

template <class C>
inline constexpr bool has_device_compressor = device_compressor<C>::available;

}  // namespace loco::backend::cuda
