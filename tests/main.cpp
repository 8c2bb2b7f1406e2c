// The test runner: doctest's main plus a banner that says what this run covers (seed, CUDA).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "support/random.hpp"

#include <loco/config.hpp>

#include <cstdio>

int main(int argc, char** argv) {
    // stderr: doctest_discover_tests parses stdout of --list-test-cases.
    std::fprintf(stderr, "loco %s tests, random seed %llu (LOCO_TEST_SEED=%llu repeats this run)\n",
                LOCO_VERSION_STRING,
                static_cast<unsigned long long>(loco_test::process_seed()),
                static_cast<unsigned long long>(loco_test::process_seed()));
    doctest::Context context(argc, argv);
    return context.run();
}
