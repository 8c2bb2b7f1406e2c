// A seeded random-mutation fuzzer for the checkpoint reader (detail/checkpoint.hpp and every
// load(): loco::optimizer, parameter groups, loco::diloco with error feedback, with a streaming
// exchange in flight, with centered_clip's saved center, and with two-phase server state on two
// ranks). Each subject's real
// checkpoint is mutated, then loaded into a live handle whose state differs from the checkpoint:
//
//   * truncations, bit flips, overwrites of 1..8 bytes, inserted and deleted bytes, and 8-byte
//     "huge lengths" (2^64 - 1, 2^63, 2^32, the stream's size + 1, ...) written at random offsets:
//     load() must throw loco::checkpoint_error and change nothing (the handle's own save() and the
//     user's tensors compare equal before and after);
//   * the same edits with the trailing checksum recomputed ("resealed"), so that only the
//     reader's field checks stand in the way: load() must either throw checkpoint_error with
//     nothing changed or succeed; never crash, read out of bounds, allocate from a length it has
//     not checked (AddressSanitizer) or throw anything else.
//
// The payload decoders are fuzzed in tests/wire_fuzz_test.cpp (every compressor, error feedback
// forwards to them). The generator is seeded from the process seed (LOCO_TEST_SEED repeats a run);
// each subject runs a fixed number of mutations, capped in time for slow sanitizer builds.
#include <doctest/doctest.h>

#include "support/random.hpp"

#include <loco/loco.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace loco_test;

// Two tensors, one of them a matrix, and a gradient stream of fresh random data.
struct fuzz_model {
    std::vector<float> w, b, gw, gb;
    loco::parameter_list list;
    std::string seed;

    explicit fuzz_model(std::string s) : seed(std::move(s)) {
        auto rng = rng_for(seed);
        w = normal_floats(rng, 4 * 6);
        b = normal_floats(rng, 7);
        gw.resize(w.size());
        gb.resize(b.size());
        list.add_views("h.w", loco::host_matrix(w.data(), 4, 6),
                       loco::host_matrix(static_cast<const float*>(gw.data()), 4, 6));
        list.add("h.b", b, gb);
    }
    void gradients(int step) {
        auto rng = rng_for(seed + "/" + std::to_string(step));
        for (auto* g : {&gw, &gb}) {
            const auto fresh = normal_floats(rng, g->size());
            std::copy(fresh.begin(), fresh.end(), g->begin());
        }
    }
    std::string tensors() const {
        std::string s(reinterpret_cast<const char*>(w.data()), 4 * w.size());
        s.append(reinterpret_cast<const char*>(b.data()), 4 * b.size());
        s.append(reinterpret_cast<const char*>(gw.data()), 4 * gw.size());
        s.append(reinterpret_cast<const char*>(gb.data()), 4 * gb.size());
        return s;
    }
};

template <class Opt>
std::string saved(const Opt& opt) {
    std::ostringstream os;
    opt.save(os);
    return os.str();
}

// One fuzzing subject: a valid checkpoint, and a live handle to load mutations into.
struct subject {
    std::string label;
    std::string good;
    std::function<std::string()> state;  // the handle's save() and the user's tensors
    std::function<void(const std::string&)> load;
    std::shared_ptr<void> keep;          // owns the handle, its model and its communicator
};

template <class Opt>
subject make_subject(std::string label, std::string good, std::shared_ptr<void> keep,
                     std::shared_ptr<fuzz_model> m, std::shared_ptr<Opt> opt) {
    subject s;
    s.label = std::move(label);
    s.good = std::move(good);
    s.state = [m, opt] { return saved(*opt) + m->tensors(); };
    s.load = [opt](const std::string& bytes) {
        std::istringstream is(bytes);
        opt->load(is);
    };
    s.keep = std::move(keep);
    return s;
}

using ef_blockwise = loco::compress::error_feedback<loco::compress::blockwise<2, 8>>;

std::vector<subject> subjects() {
    std::vector<subject> all;
    {  // loco::optimizer<adamw>
        using opt_t = loco::optimizer<loco::inner::adamw>;
        fuzz_model src("ckpt fuzz adamw");
        opt_t a(src.list);
        for (int s = 0; s < 3; ++s) {
            src.gradients(s);
            a.step();
        }
        auto m = std::make_shared<fuzz_model>("ckpt fuzz adamw target");
        auto opt = std::make_shared<opt_t>(m->list);
        m->gradients(0);
        opt->step();
        all.push_back(make_subject("optimizer<adamw>", saved(a), opt, m, opt));
    }
    {  // parameter groups: Muon on hidden matrices, AdamW elsewhere
        using groups_t = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                                      loco::group<loco::otherwise, loco::inner::adamw>>;
        using opt_t = loco::optimizer<groups_t>;
        fuzz_model src("ckpt fuzz groups");
        opt_t a(src.list);
        for (int s = 0; s < 2; ++s) {
            src.gradients(s);
            a.step();
        }
        auto m = std::make_shared<fuzz_model>("ckpt fuzz groups target");
        auto opt = std::make_shared<opt_t>(m->list);
        all.push_back(make_subject("optimizer<groups<muon, adamw>>", saved(a), opt, m, opt));
    }
    {  // diloco with error-feedback 2-bit codes, one worker
        using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov, ef_blockwise>;
        const opt_t::config cfg{.inner = {.lr = 1e-2f}, .schedule = {.every = 2}};
        auto comm = std::make_shared<loco::comm::single>();
        fuzz_model src("ckpt fuzz diloco");
        opt_t a(src.list, *comm, cfg);
        for (int s = 0; s < 5; ++s) {
            src.gradients(s);
            a.step();
        }
        auto m = std::make_shared<fuzz_model>("ckpt fuzz diloco target");
        auto opt = std::make_shared<opt_t>(m->list, *comm, cfg);
        for (int s = 0; s < 2; ++s) {
            m->gradients(s);
            opt->step();
        }
        all.push_back(make_subject("diloco<adamw, nesterov, error_feedback<blockwise<2, 8>>>",
                                   saved(a), comm, m, opt));
    }
    {  // streaming, saved with an exchange in flight
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                   loco::schedule::streaming>;
        const opt_t::config cfg{.inner = {.lr = 0.1f},
                                .schedule = {.every = 4, .fragments = 2, .overlap = 1}};
        auto comm = std::make_shared<loco::comm::single>();
        fuzz_model src("ckpt fuzz streaming");
        opt_t a(src.list, *comm, cfg);
        int s = 0;
        while (!a.in_flight(0) && !a.in_flight(1)) {
            src.gradients(s++);
            a.step();
        }
        auto m = std::make_shared<fuzz_model>("ckpt fuzz streaming target");
        auto opt = std::make_shared<opt_t>(m->list, *comm, cfg);
        all.push_back(make_subject("diloco<streaming> with an exchange in flight", saved(a), comm,
                                   m, opt));
    }
    {  // centered_clip, whose saved center has a length the live model does not bound
        using opt_t = loco::diloco<loco::inner::sgd, loco::outer::nesterov, loco::compress::none,
                                   loco::schedule::every, loco::aggregate::centered_clip>;
        const opt_t::config cfg{.inner = {.lr = 0.1f}, .schedule = {.every = 2}};
        auto comm = std::make_shared<loco::comm::single>();
        fuzz_model src("ckpt fuzz centered clip");
        opt_t a(src.list, *comm, cfg);
        for (int s = 0; s < 4; ++s) {
            src.gradients(s);
            a.step();
        }
        auto m = std::make_shared<fuzz_model>("ckpt fuzz centered clip target");
        auto opt = std::make_shared<opt_t>(m->list, *comm, cfg);
        all.push_back(make_subject("diloco<..., centered_clip>", saved(a), comm, m, opt));
    }
    {  // two ranks, two-phase exchange with server-side residuals; rank 0's checkpoint
        using opt_t = loco::diloco<loco::inner::adamw, loco::outer::nesterov, ef_blockwise>;
        const opt_t::config cfg{.inner = {.lr = 1e-2f},
                                .schedule = {.every = 2},
                                .exchange = loco::exchange_scheme::two_phase};
        std::string good;
        loco::comm::run_threads(2, [&](loco::comm::threads& comm) {
            fuzz_model src("ckpt fuzz two phase " + std::to_string(comm.rank()));
            opt_t a(src.list, comm, cfg);
            for (int s = 0; s < 4; ++s) {
                src.gradients(s);
                a.step();
            }
            if (comm.rank() == 0) good = saved(a);
        });
        // A live rank 0 of another two-rank group; load() does not communicate.
        auto group = std::make_shared<loco::comm::thread_group>(2);
        auto comm = std::make_shared<loco::comm::threads>(group, 0);
        auto m = std::make_shared<fuzz_model>("ckpt fuzz two phase target");
        auto opt = std::make_shared<opt_t>(m->list, *comm, cfg);
        auto keep = std::make_shared<std::pair<std::shared_ptr<loco::comm::thread_group>,
                                               std::shared_ptr<loco::comm::threads>>>(group, comm);
        all.push_back(make_subject("diloco two_phase, rank 0 of 2", good, keep, m, opt));
    }
    return all;
}

void reseal(std::string& s) {
    if (s.size() < 8) return;
    loco::detail::fnv1a64 h;
    h.add(s.data(), s.size() - 8);
    const std::uint64_t sum = h.value();
    std::memcpy(s.data() + s.size() - 8, &sum, 8);
}

// One random mutation of `good`.
std::string mutate(const std::string& good, std::mt19937_64& rng, bool& resealed) {
    std::string s = good;
    const auto pick = [&](std::size_t n) { return std::size_t(rng() % std::max<std::size_t>(n, 1)); };
    switch (rng() % 6) {
        case 0:  // truncation
            s.resize(pick(good.size()));
            break;
        case 1: {  // 1..8 bit flips
            const int flips = 1 + int(rng() % 8);
            for (int i = 0; i < flips; ++i) s[pick(s.size())] ^= char(1u << (rng() % 8));
            break;
        }
        case 2: {  // 1..8 bytes overwritten with random values
            const std::size_t at = pick(s.size()), n = 1 + pick(8);
            for (std::size_t i = at; i < std::min(s.size(), at + n); ++i) s[i] = char(rng());
            break;
        }
        case 3: {  // bytes inserted (not after the end: a reader stops at its checksum, so that
                   // a stream may hold more after a checkpoint)
            const std::size_t n = 1 + pick(16);
            std::string extra(n, '\0');
            for (auto& c : extra) c = char(rng());
            s.insert(pick(s.size()), extra);
            break;
        }
        case 4: {  // bytes deleted
            const std::size_t at = pick(s.size());
            s.erase(at, 1 + pick(16));
            break;
        }
        default: {  // a huge or off-by-one length
            const std::uint64_t lengths[] = {~std::uint64_t{0}, std::uint64_t{1} << 63,
                                             std::uint64_t{1} << 32, std::uint64_t{1} << 40,
                                             good.size() + 1, 4097, 0};
            const std::uint64_t v = lengths[rng() % std::size(lengths)];
            const std::size_t at = pick(s.size() >= 8 ? s.size() - 7 : 1);
            if (s.size() >= 8) std::memcpy(s.data() + at, &v, 8);
            break;
        }
    }
    resealed = rng() % 2 == 0;
    if (resealed) reseal(s);
    return s;
}

}  // namespace

TEST_CASE("checkpoint fuzz: mutated checkpoints are refused with checkpoint_error, never crash, change nothing") {
    using clock = std::chrono::steady_clock;
    auto rng = rng_for("checkpoint fuzz");
    constexpr std::size_t per_subject = 10000;
    constexpr double seconds_per_subject = 3.0;
    std::size_t mutations = 0, refused = 0, resealed_loaded = 0, failures = 0;
    std::string report;
    const auto fail = [&](const subject& s, const std::string& what) {
        if (failures++ < 8) report += s.label + ": " + what + "\n";
    };
    for (const subject& s : subjects()) {
        CAPTURE(s.label);
        // The real checkpoint loads, and loading it again from the result changes nothing.
        REQUIRE_NOTHROW(s.load(s.good));
        const std::string loaded = s.state();
        const auto start = clock::now();
        std::size_t done = 0;
        for (; done < per_subject; ++done) {
            if (done % 64 == 0 &&
                std::chrono::duration<double>(clock::now() - start).count() > seconds_per_subject) {
                break;
            }
            bool resealed = false;
            const std::string bad = mutate(s.good, rng, resealed);
            // Unchanged, or the checkpoint followed by more bytes (a stream may hold more).
            if (bad.size() >= s.good.size() && bad.compare(0, s.good.size(), s.good) == 0) continue;
            ++mutations;
            try {
                s.load(bad);
                if (!resealed) {
                    std::size_t at = 0;
                    while (at < bad.size() && at < s.good.size() && bad[at] == s.good[at]) ++at;
                    fail(s, "an unsealed mutation of " + std::to_string(bad.size()) +
                                " bytes (the checkpoint has " + std::to_string(s.good.size()) +
                                ", first difference at byte " + std::to_string(at) +
                                ") was accepted");
                }
                ++resealed_loaded;
                s.load(s.good);  // back to the known state
            } catch (const loco::checkpoint_error&) {
                ++refused;
                if (s.state() != loaded) fail(s, "a refused load changed the handle or the tensors");
            } catch (const std::exception& e) {
                fail(s, std::string("threw something else than checkpoint_error: ") + e.what());
                s.load(s.good);
            }
        }
        CHECK(done > 200);
    }
    MESSAGE(mutations << " mutated checkpoints over 6 subjects: " << refused << " refused, "
                      << resealed_loaded << " resealed edits of values loaded");
    INFO(failures << " failures; first ones:\n" << report);
    CHECK(failures == 0);
}

TEST_CASE("checkpoint fuzz: a refused load leaves a handle that never loaded exactly as it was") {
    // The subjects above compare after a good load; here the target has its own state and every
    // refused mutation must leave exactly that state, not the checkpoint's.
    auto rng = rng_for("checkpoint fuzz own state");
    std::size_t checked = 0;
    for (const subject& s : subjects()) {
        CAPTURE(s.label);
        const std::string own = s.state();
        for (int i = 0; i < 300; ++i) {
            bool resealed = false;
            const std::string bad = mutate(s.good, rng, resealed);
            if (resealed || (bad.size() >= s.good.size() &&
                             bad.compare(0, s.good.size(), s.good) == 0)) {
                continue;
            }
            CHECK_THROWS_AS(s.load(bad), loco::checkpoint_error);
            CHECK(s.state() == own);
            ++checked;
        }
    }
    CHECK(checked > 500);
}
