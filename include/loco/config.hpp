#pragma once
// Build configuration shared by every loco header: version, the host/device function macro and
// the predicates that tell a host-compiler pass from a CUDA pass.

#define LOCO_VERSION_MAJOR 0
#define LOCO_VERSION_MINOR 1
#define LOCO_VERSION_PATCH 0
#define LOCO_VERSION_STRING "0.1.0"

// Two predicates, not one: "this translation unit is compiled by a CUDA compiler" (kernels and
// launches may appear) and "this is the device pass" (device intrinsics may be used).
#if defined(__CUDACC__)
#define LOCO_HAS_CUDA() 1
#else
#define LOCO_HAS_CUDA() 0
#endif

#if defined(__CUDA_ARCH__)
#define LOCO_DEVICE_PASS() 1
#else
#define LOCO_DEVICE_PASS() 0
#endif

// Every per-element rule is written once and marked LOCO_HD, so the host backend (the test oracle)
// and the CUDA kernels run the very same code.
#if LOCO_HAS_CUDA()
#define LOCO_HD __host__ __device__ __forceinline__
#else
#define LOCO_HD inline
#endif

namespace loco {
struct version_info {
    int major;
    int minor;
    int patch;
};
inline constexpr version_info version{LOCO_VERSION_MAJOR, LOCO_VERSION_MINOR, LOCO_VERSION_PATCH};
}  // namespace loco
