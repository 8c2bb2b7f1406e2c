#pragma once
// Healing: the ranks of a new communicator receive, from one rank that holds it (the donor), the
// state every DiLoCo worker shares after a sync: global parameters, outer optimizer state,
// schedule state and counters. A handle serialises that state into a sealed blob (the checkpoint
// container of detail/checkpoint.hpp, with its own checksum); share_from() moves the blob over the
// communicator and makes every rank agree that it arrived intact before anyone uses it.
//
// All-or-nothing: every rank returns the donor's bytes, or every rank throws the same comm_error
// (a length or checksum that differs on some rank names that rank). The receiving handle then
// reads the blob into temporaries and commits only when all of it was read, so a failed heal
// changes nothing. See docs/reliability.md.

#include <loco/comm/communicator.hpp>
#include <loco/detail/checkpoint.hpp>
#include <loco/error.hpp>
#include <loco/tensor.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace loco::detail {

// Collective over `comm`: returns the donor's `blob` on every rank (the argument is ignored on the
// others). `max_bytes` bounds what a receiver accepts, so a corrupted length cannot make it
// allocate without limit. Costs two broadcasts and two all-gathers of 8 bytes per rank.
inline std::string share_from(comm::communicator& comm, int donor, std::string blob,
                              std::uint64_t max_bytes) {
    const int world = comm.size();
    if (donor < 0 || donor >= world) {
        throw invalid_argument("loco: the donor rank " + std::to_string(donor) +
                               " is not a rank of the " + std::string(comm.name()) +
                               " communicator of size " + std::to_string(world) +
                               "; pick a surviving worker's rank");
    }
    if (world == 1) {
        return blob;
    }
    const auto m = static_cast<std::size_t>(world);
    const bool giving = comm.rank() == donor;
    const auto bytes_of = [](auto* p, std::size_t n) {
        return tensor_view<std::byte>{reinterpret_cast<std::byte*>(p), n, 0, 0, memory_space::host};
    };
    const auto const_bytes_of = [](const auto* p, std::size_t n) {
        return tensor_view<const std::byte>{reinterpret_cast<const std::byte*>(p), n, 0, 0,
                                            memory_space::host};
    };

    // The length, checked by every rank against every other's before anyone allocates.
    std::uint64_t length = giving ? blob.size() : 0;
    comm.broadcast(bytes_of(&length, sizeof length), donor);
    std::vector<std::uint64_t> lengths(m);
    comm.all_gather(const_bytes_of(&length, sizeof length),
                    bytes_of(lengths.data(), m * sizeof length));
    for (std::size_t k = 0; k < m; ++k) {
        if (lengths[k] != lengths[static_cast<std::size_t>(donor)] || lengths[k] > max_bytes) {
            throw comm_error("loco: healing from rank " + std::to_string(donor) +
                             " failed: the state's length arrived as " +
                             std::to_string(lengths[k]) + " bytes on rank " + std::to_string(k) +
                             " (rank " + std::to_string(donor) + " sent " +
                             std::to_string(lengths[static_cast<std::size_t>(donor)]) +
                             "); nothing was changed on any rank; check the communicator");
        }
    }
    if (!giving) {
        blob.assign(static_cast<std::size_t>(length), '\0');
    }
    comm.broadcast(bytes_of(blob.data(), blob.size()), donor);

    // Every rank's digest of what it holds now; all equal, or every rank throws the same error.
    fnv1a64 h;
    h.add(blob.data(), blob.size());
    const std::uint64_t digest = h.value();
    std::vector<std::uint64_t> digests(m);
    comm.all_gather(const_bytes_of(&digest, sizeof digest),
                    bytes_of(digests.data(), m * sizeof digest));
    for (std::size_t k = 0; k < m; ++k) {
        if (digests[k] != digests[static_cast<std::size_t>(donor)]) {
            throw comm_error("loco: healing from rank " + std::to_string(donor) +
                             " failed: the state arrived corrupted on rank " + std::to_string(k) +
                             " (checksum mismatch); nothing was changed on any rank; check the "
                             "communicator and try again");
        }
    }
    return blob;
}

}  // namespace loco::detail
