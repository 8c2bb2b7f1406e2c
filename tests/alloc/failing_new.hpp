#pragma once
// The global operator new of the out-of-memory test programs (tests/alloc/): a thread arms its
// n-th allocation to throw std::bad_alloc. Included by exactly one file of each program (it
// defines the replacement), which is why those programs are their own executables.

#include <cstdlib>
#include <new>

namespace {

// Allocations left before the one that fails on this thread; 0: none fails.
thread_local long allocations_left = 0;
thread_local bool out_of_memory = false;  // every allocation fails while set
thread_local bool stays_out = false;      // the failing allocation sets out_of_memory

void* allocate(std::size_t n) {
    if (out_of_memory || (allocations_left > 0 && --allocations_left == 0)) {
        if (stays_out) out_of_memory = true;
        throw std::bad_alloc();
    }
    if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
    throw std::bad_alloc();
}

// Arms the n-th allocation of this thread to fail while it lives.
struct failing_allocation {
    explicit failing_allocation(long n) { allocations_left = n; }
    ~failing_allocation() { allocations_left = 0; }
    failing_allocation(const failing_allocation&) = delete;
    failing_allocation& operator=(const failing_allocation&) = delete;
};

// Arms the n-th allocation of this thread and every one after it to fail while it lives.
struct no_memory_from {
    explicit no_memory_from(long n) : arm(n) { stays_out = n > 0; }
    ~no_memory_from() {
        stays_out = false;
        out_of_memory = false;
    }
    no_memory_from(const no_memory_from&) = delete;
    no_memory_from& operator=(const no_memory_from&) = delete;
    failing_allocation arm;
};

}  // namespace

void* operator new(std::size_t n) { return allocate(n); }
void* operator new[](std::size_t n) { return allocate(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
