#pragma once
// The binary checkpoint container: a stream of little-endian fields with a running FNV-1a 64-bit
// checksum written at the end. The reader fails with checkpoint_error on a short read, a field that
// does not match the live model, or a checksum mismatch; it never allocates from a size it read
// without checking that size against the live model first.

#include <loco/error.hpp>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <ios>
#include <istream>
#include <limits>
#include <new>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <vector>
#include <type_traits>

namespace loco::detail {

static_assert(std::endian::native == std::endian::little,
              "loco: checkpoints are written little-endian; big-endian hosts are not supported");

inline constexpr char checkpoint_magic[8] = {'L', 'O', 'C', 'O', 'C', 'K', 'P', 'T'};
// Version 2 added, per fragment of a diloco checkpoint, the inner step count its exchange in
// flight started at and whether the schedule's next planned finish has nothing to finish.
// Version 3 records a wrapping schedule's name with what it wraps ("warmup<every>", not
// "warmup") and, in a parameter-groups section, the group of every parameter.
// Version 4 records, in a diloco checkpoint, every parameter's rows x cols (0 x 0 without a
// shape): a checkpoint of an 8 x 6 matrix no longer loads into a 6 x 8 one of the same name.
// Version 5 records them in an optimizer checkpoint too (host and CUDA, parameter groups
// included), and a CUDA tensor table's entries may carry them.
// Version 6 records, at the end of a diloco checkpoint, whether the handle had started (taken
// the ranks' agreed global snapshot): one saved before that resumes unstarted. In an optimizer
// checkpoint it records every parameter's name after its shape: parameters of one shape
// registered in another order took each other's states.
// Readers take versions 1 to 6 (format() says which).
inline constexpr std::uint32_t checkpoint_format_version = 6;
inline constexpr std::uint32_t checkpoint_oldest_readable = 1;

class fnv1a64 {
public:
    void add(const void* data, std::size_t n) noexcept {
        const auto* p = static_cast<const unsigned char*>(data);
        for (std::size_t i = 0; i < n; ++i) {
            h_ = (h_ ^ p[i]) * 0x100000001b3ULL;
        }
    }
    std::uint64_t value() const noexcept { return h_; }

private:
    std::uint64_t h_ = 0xcbf29ce484222325ULL;
};

// Clears a stream's exception mask for the lifetime of a reader or writer and puts it back
// afterwards: with the caller's `exceptions(failbit | badbit)` a short read would otherwise escape
// as std::ios_base::failure instead of the checkpoint_error the reader promises. Putting back a
// mask whose bits are set in the stream's state throws from ios::exceptions after restoring it;
// that throw is dropped (a destructor must not throw; the caller sees the error loco raised).
class stream_exceptions_off {
public:
    explicit stream_exceptions_off(std::ios& s) noexcept : s_(s), saved_(s.exceptions()) {
        s_.exceptions(std::ios::goodbit);  // never throws: no bit in the empty mask
    }
    ~stream_exceptions_off() {
        try {
            s_.exceptions(saved_);
        } catch (...) {  // NOLINT(bugprone-empty-catch): the mask is restored either way
        }
    }
    stream_exceptions_off(const stream_exceptions_off&) = delete;
    stream_exceptions_off& operator=(const stream_exceptions_off&) = delete;

private:
    std::ios& s_;
    std::ios::iostate saved_;
};

class checkpoint_writer {
public:
    explicit checkpoint_writer(std::ostream& os) : os_(os), quiet_(os) {
        if (!os_) {
            const auto* file = dynamic_cast<const std::ofstream*>(&os_);
            throw checkpoint_error(
                file != nullptr && !file->is_open()
                    ? "loco: the checkpoint file could not be created (the std::ofstream given to "
                      "save() has no open file); check the path and its permissions, or create "
                      "it with loco::create_checkpoint(path), which says why"
                    : "loco: the checkpoint stream given to save() is already in a failed state");
        }
        if (os_.eof()) {
            // A stream read to its end (a std::stringstream holding the trainer's header) writes
            // nothing and sets no error bit: the checkpoint would be lost without a word.
            throw checkpoint_error("loco: the checkpoint stream given to save() has its end-of-file "
                                   "flag set (it was read to the end), so it would write nothing; "
                                   "call clear() on it first");
        }
        raw(checkpoint_magic, sizeof checkpoint_magic);
        u32(checkpoint_format_version);
    }

    void u32(std::uint32_t v) { raw(&v, sizeof v); }
    void u64(std::uint64_t v) { raw(&v, sizeof v); }
    void text(std::string_view s) {
        u64(s.size());
        raw(s.data(), s.size());
    }
    void floats(std::span<const float> v) {
        u64(v.size());
        raw(v.data(), v.size_bytes());
    }

    // Writes the checksum; the stream must be good afterwards.
    void finish() {
        const std::uint64_t sum = hash_.value();
        guarded([&] {
            os_.write(reinterpret_cast<const char*>(&sum), sizeof sum);
            os_.flush();
        });
    }

private:
    void raw(const void* data, std::size_t n) {
        hash_.add(data, n);
        guarded([&] { os_.write(static_cast<const char*>(data), static_cast<std::streamsize>(n)); });
    }
    // Runs a write with badbit in the stream's exception mask (quiet_ clears it otherwise): what
    // the stream's buffer throws then comes out as itself instead of being swallowed into badbit.
    // Out of memory (a string buffer that cannot grow) stays std::bad_alloc, as everywhere in
    // loco (docs/design.md); anything else, a short write of a read-only buffer included, is the
    // stream error loco reports. The stream is good before each write (checked after every one),
    // so setting the mask cannot throw.
    template <class Write>
    void guarded(Write&& write) {
        os_.exceptions(std::ios::badbit);
        try {
            write();
        } catch (const std::bad_alloc&) {
            os_.exceptions(std::ios::goodbit);  // an empty mask: never throws
            throw;
        } catch (const std::exception&) {
            os_.exceptions(std::ios::goodbit);
            throw checkpoint_error("loco: writing the checkpoint failed (stream error)");
        } catch (...) {  // not the stream's (a thread's cancellation): as it came
            os_.exceptions(std::ios::goodbit);
            throw;
        }
        os_.exceptions(std::ios::goodbit);
        if (!os_) throw checkpoint_error("loco: writing the checkpoint failed (stream error)");
    }

    std::ostream& os_;
    stream_exceptions_off quiet_;
    fnv1a64 hash_;
};

class checkpoint_reader {
public:
    explicit checkpoint_reader(std::istream& is) : is_(is), quiet_(is) {
        if (!is_) {
            const auto* file = dynamic_cast<const std::ifstream*>(&is_);
            throw checkpoint_error(
                file != nullptr && !file->is_open()
                    ? "loco: the checkpoint file could not be opened (the std::ifstream given to "
                      "load() has no open file); check the path, or open it with "
                      "loco::open_checkpoint(path), which says why"
                    : "loco: the checkpoint stream given to load() is already in a failed state");
        }
        char magic[sizeof checkpoint_magic];
        is_.read(magic, sizeof magic);
        if (is_.gcount() == 0) {
            throw checkpoint_error("loco: the checkpoint is empty (0 bytes); it was never written "
                                   "or its writer failed");
        }
        if (is_.gcount() != static_cast<std::streamsize>(sizeof magic)) {
            throw checkpoint_error("loco: checkpoint truncated while reading the file signature");
        }
        hash_.add(magic, sizeof magic);
        if (std::string_view(magic, sizeof magic) !=
            std::string_view(checkpoint_magic, sizeof checkpoint_magic)) {
            throw checkpoint_error("loco: not a loco checkpoint (bad signature)");
        }
        format_ = u32("the format version");
        if (format_ < checkpoint_oldest_readable || format_ > checkpoint_format_version) {
            throw checkpoint_error("loco: checkpoint format version " + std::to_string(format_) +
                                   " is not supported (this build reads versions " +
                                   std::to_string(checkpoint_oldest_readable) + " to " +
                                   std::to_string(checkpoint_format_version) + ")");
        }
    }

    // The format version of the stream being read.
    std::uint32_t format() const noexcept { return format_; }

    std::uint32_t u32(const char* what) {
        std::uint32_t v = 0;
        raw(&v, sizeof v, what);
        return v;
    }
    std::uint64_t u64(const char* what) {
        std::uint64_t v = 0;
        raw(&v, sizeof v, what);
        return v;
    }

    // Reads a counter that every step, call or sync adds one to: 2^63 and above is refused. No
    // run gets there (2^63 steps); a corrupted stream that did would wrap to 0 a few steps later,
    // where AdamW's bias correction 1 - beta^0 = 0 turns every parameter into NaN.
    std::uint64_t counter(const char* what) {
        const std::uint64_t v = u64(what);
        if (v >= std::uint64_t{1} << 63) {
            throw checkpoint_error("loco: checkpoint holds " + std::string(what) + " " +
                                   std::to_string(v) +
                                   ", 2^63 or more: no run counts that far (a corrupted stream)");
        }
        return v;
    }

    // Reads a u64 and checks that it equals the live value.
    void expect_u64(std::uint64_t live, const char* what) {
        const std::uint64_t saved = u64(what);
        if (saved != live) {
            throw checkpoint_error("loco: checkpoint mismatch in " + std::string(what) + ": saved " +
                                   std::to_string(saved) + ", this optimizer has " +
                                   std::to_string(live));
        }
    }

    // Reads a string that must equal `live` (policy names, the handle kind, the fragment layout,
    // which lists every parameter name and may be far longer than text()'s bound): a saved
    // length equal to the live one is read whatever it is (the live value bounds it); another
    // is read for the message when text() would read it, else named by its length.
    void expect_text(std::string_view live, const char* what) {
        const std::uint64_t n = u64(what);
        std::string saved;
        if (n == live.size() || n <= max_text_bytes) {
            saved.resize(static_cast<std::size_t>(n));
            raw(saved.data(), saved.size(), what);
            if (saved == live) return;
        } else {
            throw checkpoint_error("loco: checkpoint mismatch in " + std::string(what) +
                                   ": saved a text of " + std::to_string(n) +
                                   " bytes, this optimizer has one of " +
                                   std::to_string(live.size()) + " bytes");
        }
        throw checkpoint_error("loco: checkpoint mismatch in " + std::string(what) + ": saved '" +
                               saved + "', this optimizer has '" + std::string(live) + "'");
    }

    // Reads a string of at most `bound` bytes (a description recorded for information; a
    // caller whose text can be longer, such as a parameter name, passes the live bound).
    static constexpr std::uint64_t max_text_bytes = 4096;
    std::string text(const char* what, std::uint64_t bound = max_text_bytes) {
        const std::uint64_t n = u64(what);
        if (n > bound) {
            throw checkpoint_error("loco: checkpoint corrupted: " + std::string(what) +
                                   " has an implausible length");
        }
        std::string saved(static_cast<std::size_t>(n), '\0');
        raw(saved.data(), saved.size(), what);
        return saved;
    }

    // Reads a float array whose length must equal out.size() (the live layout).
    void floats(std::span<float> out, const char* what) {
        expect_u64(out.size(), what);
        raw(out.data(), out.size_bytes(), what);
    }

    // Reads a float array of n elements, n read from the stream earlier and not bounded by the
    // live model (an aggregation's state): the vector grows only with what the stream holds, so
    // a corrupted n ends at a truncation, not at a huge allocation.
    std::vector<float> float_vector(std::uint64_t n, const char* what) {
        expect_u64(n, what);
        constexpr std::uint64_t step = std::uint64_t{1} << 16;
        std::vector<float> out;
        for (std::uint64_t at = 0; at < n; at += step) {
            const auto k = static_cast<std::size_t>(std::min(step, n - at));
            out.resize(out.size() + k);
            raw(out.data() + out.size() - k, k * sizeof(float), what);
        }
        return out;
    }

    // Reads the checksum and compares it with everything read before it.
    void finish() {
        const std::uint64_t computed = hash_.value();
        std::uint64_t saved = 0;
        is_.read(reinterpret_cast<char*>(&saved), sizeof saved);
        if (is_.gcount() != static_cast<std::streamsize>(sizeof saved)) {
            throw checkpoint_error("loco: checkpoint truncated before its checksum");
        }
        if (saved != computed) {
            throw checkpoint_error("loco: checkpoint corrupted (checksum mismatch)");
        }
    }

private:
    void raw(void* data, std::size_t n, const char* what) {
        is_.read(static_cast<char*>(data), static_cast<std::streamsize>(n));
        if (is_.gcount() != static_cast<std::streamsize>(n)) {
            throw checkpoint_error("loco: checkpoint truncated while reading " + std::string(what));
        }
        hash_.add(data, n);
    }

    std::istream& is_;
    stream_exceptions_off quiet_;
    fnv1a64 hash_;
    std::uint32_t format_ = 0;
};

}  // namespace loco::detail

namespace loco {

// Opens a checkpoint file for load(); throws checkpoint_error saying why it cannot (the system's
// reason: no such file, permission denied, ...) instead of leaving a failed stream for load().
inline std::ifstream open_checkpoint(const std::filesystem::path& path) {
    errno = 0;
    std::ifstream in(path, std::ios::binary);
    if (!in.is_open()) {
        const int reason = errno;
        throw checkpoint_error("loco: cannot open the checkpoint file '" + path.string() + "': " +
                               (reason != 0 ? std::string(std::strerror(reason))
                                            : std::string("the system gave no reason")));
    }
    return in;
}

// Creates (or truncates) a checkpoint file for save(); throws checkpoint_error saying why it
// cannot.
inline std::ofstream create_checkpoint(const std::filesystem::path& path) {
    errno = 0;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out.is_open()) {
        const int reason = errno;
        throw checkpoint_error("loco: cannot create the checkpoint file '" + path.string() + "': " +
                               (reason != 0 ? std::string(std::strerror(reason))
                                            : std::string("the system gave no reason")));
    }
    return out;
}

}  // namespace loco
