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
//
// The headers, one idea each (backend/cuda/compress/):
//   device_compressor.hpp    which compressors have a device path; codec facts (codec_traits)
//   payload_header.hpp       the wire header of device payloads and the host's check of received
//                            headers (compress/wire.hpp's rules, shared with compress_topk.hpp)
//   payload_plan.hpp         compress_plan: the payload layout of a table, CTA work items
//   statistical_plan.hpp     compress_plan<statistical<B>>: layout and encode workspace
//   encode_source.hpp        encode's inputs (encode_io, encode_from), x and e per element,
//                            warp reductions
//   codec_bodies.hpp         what a codec supplies to the generic kernels; the rank-order average
//   blockwise_kernels.hpp    blockwise encode, decode and format checks
//   cast_kernels.hpp         cast encode, decode and checks
//   statistical_kernels.hpp  statistical's encode passes, decode and checks
//   checksum.hpp             the wire checksum on the device and the header kernel
//   encode.hpp               encode()
//   payload_check.hpp        payload_check
//   decode.hpp               decode_average(), decode_average_apply()
// compress_topk.hpp holds top-k, which shares payload_header.hpp and checksum.hpp.

#include <loco/backend/cuda/compress/decode.hpp>
#include <loco/backend/cuda/compress/device_compressor.hpp>
#include <loco/backend/cuda/compress/encode.hpp>
#include <loco/backend/cuda/compress/payload_check.hpp>
#include <loco/backend/cuda/compress/payload_plan.hpp>
#include <loco/backend/cuda/compress/statistical_plan.hpp>
