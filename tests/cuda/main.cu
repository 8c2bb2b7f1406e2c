// The CUDA test runner. Without a usable GPU it prints why and exits with 77, which CTest reports
// as "skipped" (SKIP_RETURN_CODE), never as a pass.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "../support/random.hpp"
#include "device.cuh"

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
    const std::string child_flag = "--loco-child=";
    if (argc > 1 && std::string(argv[1]).rfind(child_flag, 0) == 0) {
        return loco_test::loco_test_child(std::string(argv[1]).substr(child_flag.size()));
    }
    std::string why;
    if (!loco_test::gpu_available(&why)) {
        std::printf("loco CUDA tests SKIPPED: %s. These tests only count when run on a GPU.\n",
                    why.c_str());
        return 77;
    }
    cudaDeviceProp prop{};
    loco_test::check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    std::printf("loco CUDA tests on %s (sm_%d%d), random seed %llu (LOCO_TEST_SEED repeats it)\n",
                prop.name, prop.major, prop.minor,
                static_cast<unsigned long long>(loco_test::process_seed()));
    doctest::Context context(argc, argv);
    return context.run();
}
