#pragma once
// What the device encoders of the chunked compressors (compress::sparseloco, compress::demo;
// compress/chunking.hpp) share: the plan of a payload (segments, chunks, the bit streams of the
// body), the top-k of one chunk by one CTA, the kernel that packs bit streams, and the checksum and
// header of the payload (compress.hpp's kernels).
//
// Layout on the device. A chunk is the work of one CTA of 256 threads; chunks are numbered over
// the segments in order (segment s owns chunks [chunk0, chunk0 + chunks)), and so are the slots
// (the kept cells, k_c per chunk, chunk after chunk: slot0 + local chunk * k_c + j), exactly the
// slot order of the payload. A chunk of h x w cells is held in shared memory, so the device path
// takes chunk targets up to 64 (h, w <= 64, at most 4096 cells); both references default to 64.
//
// Top-k of a chunk (select_chunk): an MSB-first radix select over topk::magnitude_key, 8 bits a
// pass with a shared histogram, gives the k-th largest key T and how many cells equal to T are
// taken (the lowest ones: the host's tie rule); then the cells are compacted in ascending order,
// 256 at a time, by a block scan of (key > T, key == T). Every step is an exact count, so the
// result is the host's whatever order the threads run in.
//
// Bit streams (pack_streams): the body's index and code streams (compress/index_code.hpp, padded
// to 4 bytes) are written one 32-bit word per thread by index_code::word, the host encoder's own
// rule, so no two threads touch one byte and the padding comes out zero.

#include <loco/backend/cuda/compress/checksum.hpp>
#include <loco/backend/cuda/compress/payload_header.hpp>
#include <loco/backend/cuda/elementwise.hpp>
#include <loco/backend/cuda/error.hpp>
#include <loco/backend/cuda/memory.hpp>
#include <loco/backend/cuda/table.hpp>
#include <loco/compress/chunking.hpp>
#include <loco/compress/compressor.hpp>
#include <loco/compress/index_code.hpp>
#include <loco/compress/topk.hpp>
#include <loco/compress/wire.hpp>
#include <loco/config.hpp>
#include <loco/error.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace loco::backend::cuda {

// Largest chunk target of the device path (a chunk of at most 64 x 64 cells in shared memory).
inline constexpr std::uint32_t chunked_max_side = 64;
inline constexpr std::uint32_t chunked_max_cells = chunked_max_side * chunked_max_side;

// device_chunked<C>::available: C has a device encoder and decoder here (sparseloco_kernels.hpp,
// demo_kernels.hpp specialise it; ::plan is its plan). loco::cuda::diloco exchanges them through
// chunked_exchange.hpp.
template <class C>
struct device_chunked {
    static constexpr bool available = false;
};

// One non-empty segment, as the kernels see it. Byte offsets are from the payload's first byte.
struct chunked_segment {
    std::uint64_t offset;    // first element in the flat layout
    std::uint64_t cols;      // the segment as rows x cols
    std::uint64_t record;    // sparseloco: shift and table; demo: unused
    std::uint64_t indices;   // the index stream
    std::uint64_t values;    // sparseloco: the code stream; demo: fp32 values or the sign stream
    std::uint64_t chunk0;    // its first chunk
    std::uint64_t slot0;     // its first slot
    std::uint32_t chunks;
    std::uint32_t h, w, k;   // chunk sides, k_c
    std::uint32_t basis_h;   // demo: offsets of F_h and F_w in the plan's basis array
    std::uint32_t basis_w;
    std::uint32_t input;     // its position in the segment list the plan was built from
    compress::index_code::chunk_indices coding;  // how a chunk's indices are written
};

// A bit stream of the body: `chunks` chunks coded as `coding` (index_code::word) from
// source[slot0 ..], written from payload byte `at`; its words are numbered from word0 over all
// streams. A code stream is N "chunks" of one fixed-width code each (N codes).
struct chunked_stream {
    std::uint64_t at;
    std::uint64_t word0;
    std::uint64_t slot0;
    std::uint64_t chunks;
    compress::index_code::chunk_indices coding;
    std::uint32_t source;  // 0: the slots' cells, 1: their codes (sparseloco codes, demo signs)
    std::uint32_t reserved;
};

// Position in the flat layout of cell j of local chunk c of a segment (chunking::grid::element).
LOCO_HD std::uint64_t chunked_element(const chunked_segment& s, std::uint64_t c,
                                      std::uint32_t j) noexcept {
    const std::uint64_t across = s.cols / s.w;
    return s.offset + ((c / across) * s.h + j / s.w) * s.cols + (c % across) * s.w + j % s.w;
}

// The host side of a chunked payload: C::layout_of of every segment, turned into the tables
// above and uploaded, with the slot workspace the encoders share.
template <class C>
class chunked_layout {
public:
    // The most chunks one layout holds: chunk numbers are 32-bit on the device, and the grids
    // of the per-chunk kernels index them as int.
    static constexpr std::uint64_t max_chunks = 0x7fffffffu;

    chunked_layout() = default;

    chunked_layout(const typename C::hyper& h, std::span<const compress::segment> segs,
                   std::size_t elements)
        : hyper_(h), elements_(elements), segments_(segs.begin(), segs.end()) {
        C::validate(h);
        compress::check_segments_inside(segs, elements, C::name, "input");
        if (h.chunk > chunked_max_side) {
            throw invalid_argument("loco::cuda: the device " + std::string(C::name) +
                                   " holds a chunk in shared memory and takes chunk <= 64 (got " +
                                   std::to_string(h.chunk) + "); use the host compressor");
        }
        payload_bytes_ = C::payload_bytes(h, segs);
        // Chunk numbers are 32-bit on the device (a segment's count, the chunk -> segment map):
        // the total is checked before anything is narrowed (a 65537 x 65537 matrix has 2^32 and
        // more chunks of side 1, which wrapped into a small count) or built.
        std::uint64_t total_chunks = 0;
        for (std::size_t i = 0; i < segs.size(); ++i) {
            const std::uint64_t c = C::layout_of(h, segs[i]).grid.chunks();
            if (c > max_chunks - total_chunks) {
                throw invalid_argument(
                    "loco::cuda: the device " + std::string(C::name) + " takes at most " +
                    std::to_string(max_chunks) + " chunks per fragment; segment " +
                    std::to_string(i) + " (" + std::to_string(segs[i].rows) + " x " +
                    std::to_string(segs[i].cols) + ") makes it " + std::to_string(total_chunks + c) +
                    "; put fewer tensors in the fragment, or use the host compressor");
            }
            total_chunks += c;
        }
        host_chunk_segment_.reserve(total_chunks);
        std::uint64_t at = compress::wire::header_bytes;
        std::uint32_t input = 0;
        for (const compress::segment& s : segs) {
            const auto l = C::layout_of(h, s);
            if (s.size != 0) {
                chunked_segment d{};
                d.offset = s.offset;
                d.cols = l.grid.cols;
                d.chunk0 = chunks_;
                d.slot0 = slots_;
                d.chunks = static_cast<std::uint32_t>(l.grid.chunks());
                d.h = static_cast<std::uint32_t>(l.grid.h);
                d.w = static_cast<std::uint32_t>(l.grid.w);
                d.k = static_cast<std::uint32_t>(l.k);
                d.coding = l.indices;
                d.input = input;
                std::uint64_t record_bytes = 0;
                if constexpr (requires { l.record_bytes; }) record_bytes = l.record_bytes;
                d.record = at;
                d.indices = at + record_bytes;
                d.values = d.indices + l.index_bytes;
                host_segments_.push_back(d);
                for (std::uint32_t c = 0; c < d.chunks; ++c) {
                    host_chunk_segment_.push_back(
                        static_cast<std::uint32_t>(host_segments_.size() - 1));
                }
                chunks_ += d.chunks;
                slots_ += l.sent;
            }
            at += l.bytes();
            ++input;
        }
        compress::wire::header w = C::expected_header_of(h, segs);
        prefix_ = detail::prefix_bytes(w);
        body_bytes_ = w.body_bytes;
    }

    // The streams of the body: per segment its index stream and (code_width > 0) one more.
    void add_streams(unsigned code_width) {
        for (const chunked_segment& d : host_segments_) {
            const std::uint64_t n = static_cast<std::uint64_t>(d.chunks) * d.k;
            add_stream(d.indices, d.slot0, d.chunks, d.coding, 0);
            const compress::index_code::chunk_indices codes{
                0, 1, code_width, compress::index_code::chunk_indices::fixed_width};
            if (code_width > 0) add_stream(d.values, d.slot0, n, codes, 1);
        }
    }

    // Lets the codec's plan fill in its own fields of each segment before upload.
    template <class F>
    void for_each_segment(F f) {
        for (chunked_segment& s : host_segments_) f(s);
    }

    // Uploads the tables and sizes the workspace.
    void upload(std::vector<double> basis = {}) {
        segments_dev_ = device_buffer<chunked_segment>(host_segments_.size());
        segments_dev_.upload(host_segments_);
        chunk_segment_ = device_buffer<std::uint32_t>(host_chunk_segment_.size());
        chunk_segment_.upload(host_chunk_segment_);
        streams_dev_ = device_buffer<chunked_stream>(streams_.size());
        streams_dev_.upload(streams_);
        basis_ = device_buffer<double>(basis.size());
        basis_.upload(basis);
        slot_cell_ = device_buffer<std::uint32_t>(slots_);
        slot_value_ = device_buffer<float>(slots_);
        slot_code_ = device_buffer<std::uint32_t>(slots_);
        checksum_ = device_buffer<unsigned long long>(1);
    }

    const typename C::hyper& hyper() const noexcept { return hyper_; }
    std::span<const compress::segment> segments() const noexcept { return segments_; }
    std::size_t elements() const noexcept { return elements_; }
    std::size_t payload_bytes() const noexcept { return payload_bytes_; }
    std::uint64_t chunks() const noexcept { return chunks_; }
    std::uint64_t slots() const noexcept { return slots_; }
    std::uint64_t words() const noexcept { return words_; }
    std::uint32_t segment_count() const noexcept {
        return static_cast<std::uint32_t>(host_segments_.size());
    }
    std::uint32_t stream_count() const noexcept {
        return static_cast<std::uint32_t>(streams_.size());
    }

    const chunked_segment* segment_table() const noexcept { return segments_dev_.get(); }
    const std::uint32_t* chunk_segment() const noexcept { return chunk_segment_.get(); }
    const chunked_stream* stream_table() const noexcept { return streams_dev_.get(); }
    const double* basis() const noexcept { return basis_.get(); }
    std::uint32_t* slot_cell() const noexcept { return slot_cell_.get(); }
    float* slot_value() const noexcept { return slot_value_.get(); }
    std::uint32_t* slot_code() const noexcept { return slot_code_.get(); }

    // The body's checksum and the header, after the body is written.
    void finish(std::byte* payload, cudaStream_t stream) const;

private:
    void add_stream(std::uint64_t at, std::uint64_t slot0, std::uint64_t chunks,
                    const compress::index_code::chunk_indices& coding, std::uint32_t source) {
        if (coding.bits() == 0 || chunks == 0) return;
        streams_.push_back({at, words_, slot0, chunks, coding, source, 0});
        words_ += (chunks * coding.bits() + 31) / 32;  // = padded_bit_bytes / 4
    }

    typename C::hyper hyper_{};
    std::size_t elements_ = 0;
    std::vector<compress::segment> segments_;
    std::size_t payload_bytes_ = 0;
    std::uint64_t body_bytes_ = 0;
    std::uint64_t chunks_ = 0;
    std::uint64_t slots_ = 0;
    std::uint64_t words_ = 0;
    header_prefix prefix_{};
    std::vector<chunked_segment> host_segments_;
    std::vector<std::uint32_t> host_chunk_segment_;
    std::vector<chunked_stream> streams_;
    device_buffer<chunked_segment> segments_dev_;
    device_buffer<std::uint32_t> chunk_segment_;
    device_buffer<chunked_stream> streams_dev_;
    device_buffer<double> basis_;
    device_buffer<std::uint32_t> slot_cell_;
    device_buffer<float> slot_value_;
    device_buffer<std::uint32_t> slot_code_;
    device_buffer<unsigned long long> checksum_;
};

namespace detail {

// A null pointer is refused where it would be read or written: a plan without chunks (a
// fragment of empty tensors) touches no element, and its buffers are empty (null).
inline void require_chunked_pointer(const void* p, const char* what, std::uint64_t elements) {
    if (p == nullptr && elements != 0) {
        throw invalid_argument(std::string("loco::cuda: ") + what + " is null");
    }
}

#if LOCO_HAS_CUDA()

// The chunk of a CTA in a grid of one CTA per chunk, blockIdx.x its index over all segments.
struct cta_chunk {
    std::uint64_t index;  // over all segments
    chunked_segment s;
    std::uint64_t local;  // within its segment

    __device__ unsigned cells() const { return s.h * s.w; }
    __device__ std::uint64_t element(unsigned cell) const {
        return chunked_element(s, local, cell);
    }
};

__device__ __forceinline__ cta_chunk this_cta_chunk(const chunked_segment* segs,
                                                    const std::uint32_t* chunk_segment) {
    const std::uint64_t c = blockIdx.x;
    const chunked_segment s = segs[chunk_segment[c]];
    return {c, s, c - s.chunk0};
}

// Shared memory of select_chunk.
struct chunk_select_shared {
    unsigned hist[256];
    unsigned scan[block_threads];
    unsigned prefix;
    unsigned want;
};

// Inclusive scan of one value per thread (256 threads); s[255] holds the total on return.
__device__ inline unsigned chunked_block_scan(unsigned v, unsigned* s) {
    const unsigned t = threadIdx.x;
    s[t] = v;
    __syncthreads();
    for (unsigned off = 1; off < block_threads; off *= 2) {
        const unsigned add = t >= off ? s[t - off] : 0u;
        __syncthreads();
        s[t] += add;
        __syncthreads();
    }
    return s[t];
}

// The k cells of largest magnitude of vals[0, cells) (k <= cells), ascending, into cell_out and
// their values into value_out (chunking::select_largest's choice). Every thread of the CTA calls
// it.
__device__ inline void select_chunk(const float* vals, unsigned cells, unsigned k,
                                    std::uint32_t* cell_out, float* value_out,
                                    chunk_select_shared& sh) {
    const unsigned t = threadIdx.x;
    if (t == 0) {
        sh.prefix = 0;
        sh.want = k;
    }
    unsigned mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        sh.hist[t] = 0;
        __syncthreads();
        const unsigned prefix = sh.prefix;
        for (unsigned j = t; j < cells; j += block_threads) {
            const unsigned key = compress::topk::magnitude_key(vals[j]);
            if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (t == 0) {
            unsigned want = sh.want;
            for (int b = 255; b >= 0; --b) {
                if (sh.hist[b] >= want) {
                    sh.prefix = prefix | (static_cast<unsigned>(b) << shift);
                    break;
                }
                want -= sh.hist[b];
            }
            sh.want = want;
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    const unsigned T = sh.prefix;
    const unsigned need = sh.want;
    unsigned gt_before = 0;
    unsigned eq_before = 0;
    for (unsigned base = 0; base < cells; base += block_threads) {
        const unsigned j = base + t;
        const unsigned key = j < cells ? compress::topk::magnitude_key(vals[j]) : 0u;
        const unsigned gt = j < cells && key > T ? 1u : 0u;
        const unsigned eq = j < cells && key == T ? 1u : 0u;
        const unsigned incl = chunked_block_scan(gt << 16 | eq, sh.scan);
        const unsigned gt_rank = gt_before + (incl >> 16) - gt;
        const unsigned eq_rank = eq_before + (incl & 0xffffu) - eq;
        if (gt != 0 || (eq != 0 && eq_rank < need)) {
            const unsigned pos = gt_rank + (eq_rank < need ? eq_rank : need);
            cell_out[pos] = j;
            value_out[pos] = vals[j];
        }
        const unsigned total = sh.scan[block_threads - 1];
        gt_before += total >> 16;
        eq_before += total & 0xffffu;
        __syncthreads();  // sh.scan is rewritten by the next tile
    }
}

// One 32-bit word of a bit stream per thread.
template <int = 0>
__global__ void __launch_bounds__(block_threads)
    chunked_pack_kernel(std::byte* payload, const chunked_stream* streams, std::uint32_t count,
                        std::uint64_t words, const std::uint32_t* cells,
                        const std::uint32_t* codes) {
    const std::uint64_t w = static_cast<std::uint64_t>(blockIdx.x) * block_threads + threadIdx.x;
    if (w >= words) return;
    std::uint32_t lo = 0;
    std::uint32_t hi = count;  // the last stream with word0 <= w
    while (hi - lo > 1) {
        const std::uint32_t mid = (lo + hi) / 2;
        if (streams[mid].word0 <= w) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    const chunked_stream s = streams[lo];
    const std::uint32_t* src = (s.source == 0 ? cells : codes) + s.slot0;
    const std::uint64_t local = w - s.word0;
    reinterpret_cast<std::uint32_t*>(payload + s.at)[local] =
        compress::index_code::word(s.coding, src, s.chunks, local);
}

#endif  // LOCO_HAS_CUDA()

// Launches the pack kernel over every stream of a layout.
template <class C>
void pack_streams(const chunked_layout<C>& l, std::byte* payload, cudaStream_t stream) {
#if LOCO_HAS_CUDA()
    if (l.words() == 0) return;
    const std::uint64_t blocks = (l.words() + block_threads - 1) / block_threads;
    if (blocks > 0x7fffffffu) throw invalid_argument("loco::cuda: payload too large for one grid");
    LOCO_CUDA_CHECK(launch(chunked_pack_kernel<>, static_cast<std::uint32_t>(blocks), stream,
                           payload, l.stream_table(), l.stream_count(), l.words(), l.slot_cell(),
                           static_cast<const std::uint32_t*>(l.slot_code())));
#else
    static_cast<void>(l);
    static_cast<void>(payload);
    static_cast<void>(stream);
#endif
}

// Grid of one thread per item.
inline std::uint32_t chunked_thread_blocks(std::uint64_t items) {
    const std::uint64_t blocks = (items + block_threads - 1) / block_threads;
    if (blocks > 0x7fffffffu) throw invalid_argument("loco::cuda: too many items for one grid");
    return static_cast<std::uint32_t>(blocks == 0 ? 1 : blocks);
}

}  // namespace detail

template <class C>
void chunked_layout<C>::finish(std::byte* payload, cudaStream_t stream) const {
#if LOCO_HAS_CUDA()
    LOCO_CUDA_CHECK(cudaMemsetAsync(checksum_.get(), 0, sizeof(unsigned long long), stream));
    detail::launch_checksum(gathered_payloads{payload, payload_bytes_, 1, 0}, body_bytes_,
                            checksum_.get(), stream);
    LOCO_CUDA_CHECK(detail::launch(detail::header_kernel<>, 1, stream, payload, prefix_,
                           static_cast<const unsigned long long*>(checksum_.get()),
                           body_bytes_));
#else
    static_cast<void>(payload);
    static_cast<void>(stream);
#endif
}

}  // namespace loco::backend::cuda
