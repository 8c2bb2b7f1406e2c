// expect: loco: a policy with settings \(a non-empty `hyper`\) needs `static std::string describe\(const hyper&\)`
// A compressor with a setting and no describe(), wrapped in error feedback: the wrapper's
// description must include the wrapped one's settings, or ranks built with other scales pass
// start() (error_feedback printed only the wrapped name).
#include <loco/comm/single.hpp>
#include <loco/compress/error_feedback.hpp>
#include <loco/compress/none.hpp>
#include <loco/diloco.hpp>
#include <loco/inner/sgd.hpp>
#include <loco/outer/sgd.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

struct scaled {
    static constexpr std::string_view name = "scaled";
    static constexpr std::uint8_t wire_id = loco::compress::none::wire_id;
    static constexpr int state_size = 0;
    struct hyper {
        float scale = 1.0f;
    };
    static std::size_t payload_bytes(const hyper&, std::span<const loco::compress::segment> s) {
        return loco::compress::none::payload_bytes({}, s);
    }
    static void encode(const hyper&, std::span<const float> x,
                       std::span<const loco::compress::segment> s, std::span<float> state,
                       const loco::compress::encode_context& ctx, std::span<std::byte> out) {
        loco::compress::none::encode({}, x, s, state, ctx, out);
    }
    static void decode(const hyper&, std::span<const std::byte> in,
                       std::span<const loco::compress::segment> s, std::span<float> out) {
        loco::compress::none::decode({}, in, s, out);
    }
};

int main() {
    std::vector<float> w(4), g(4);
    loco::parameter_list params;
    params.add("w", w, g);
    loco::comm::single comm;
    loco::diloco<loco::inner::sgd, loco::outer::sgd, loco::compress::error_feedback<scaled>> opt(
        params, comm);
    opt.step();
}
