// expect: loco: a compressor's `state_size` \(floats of state per element: 0, or 1 for a residual\) must be >= 0
// A compressor that declares a negative state size (it became a huge residual array at run time).
#include <loco/comm/single.hpp>
#include <loco/compress/none.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

struct negative_state {
    static constexpr std::string_view name = "negative_state";
    static constexpr std::uint8_t wire_id = loco::compress::none::wire_id;
    static constexpr int state_size = -1;
    using hyper = loco::compress::none::hyper;
    static std::size_t payload_bytes(const hyper& h, std::span<const loco::compress::segment> s) {
        return loco::compress::none::payload_bytes(h, s);
    }
    static void encode(const hyper& h, std::span<const float> x,
                       std::span<const loco::compress::segment> s, std::span<float> state,
                       const loco::compress::encode_context& ctx, std::span<std::byte> out) {
        loco::compress::none::encode(h, x, s, state, ctx, out);
    }
    static void decode(const hyper& h, std::span<const std::byte> in,
                       std::span<const loco::compress::segment> s, std::span<float> out) {
        loco::compress::none::decode(h, in, s, out);
    }
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd, negative_state> opt(params, comm);
    opt.step();
}
