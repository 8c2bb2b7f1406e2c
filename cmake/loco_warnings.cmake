# loco_program(<target>): the flags every program loco builds for itself (tests, examples,
# benchmarks) gets: warnings, optionally -Werror, the code generation below, and the sanitizers
# when LOCO_SANITIZE is on.
# CUDA sources get the warnings through -Xcompiler and never the sanitizers (ASan's shadow memory
# and the CUDA driver do not mix).

set(LOCO_HOST_WARNINGS -Wall -Wextra -Wpedantic -Wshadow)
set(LOCO_CUDA_HOST_WARNINGS -Wall,-Wextra)
# GCC 12 reports -Wrestrict on "literal" + std::string at -O3 where no overlap exists (GCC bug
# 105329, fixed in 13): silence that one diagnostic for GCC 12 only.
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12
   AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  list(APPEND LOCO_HOST_WARNINGS -Wno-restrict)
  # nvcc hands the host half of a .cu file to the same GCC.
  if(CMAKE_CUDA_HOST_COMPILER MATCHES "g\\+\\+" OR NOT CMAKE_CUDA_HOST_COMPILER)
    set(LOCO_CUDA_HOST_WARNINGS -Wall,-Wextra,-Wno-restrict)
  endif()
endif()
# Code generation. C's default has sqrt set errno on a negative argument, so GCC and Clang emit
# each sqrt as an instruction plus a branch to libm, and a loop with a branch to a call is not
# vectorised: AdamW's and outer Adam's host loops then run element by element, about 3x slower
# (docs/benchmarks.md, docs/pytorch.md). Nothing in loco reads errno, and a vectorised sqrt is
# correctly rounded like the scalar one, so results do not change by a bit. The headers impose no
# flag on a user's program; docs/getting-started.md says which to add.
#
# -ffp-contract=off: GCC fuses a * b + c into one fused multiply-add wherever the target has one
# (-march=native on x86-64, every aarch64 host), even in ISO C++ mode and across statements. The
# CUDA kernels round the product and the sum separately (__fmul_rn, __fadd_rn), so a fused host
# build's error-feedback residuals differed from the device's in about a quarter of the elements
# (tests/codegen/residual_rounding_test.cpp). x86-64's baseline has no FMA, so the flag changes
# nothing there.
set(LOCO_HOST_CODEGEN -fno-math-errno -ffp-contract=off)
set(LOCO_CUDA_HOST_CODEGEN -fno-math-errno,-ffp-contract=off)

# The public headers are held to more: each is compiled alone with these (tests/headers).
set(LOCO_HEADER_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wsign-conversion
    -Wold-style-cast -Wnon-virtual-dtor -Werror)

function(loco_program target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${LOCO_HOST_WARNINGS}>
    $<$<COMPILE_LANGUAGE:CXX>:${LOCO_HOST_CODEGEN}>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${LOCO_CUDA_HOST_WARNINGS}>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${LOCO_CUDA_HOST_CODEGEN}>)
  if(LOCO_WERROR)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-Werror>
      $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings>)
  endif()
  get_target_property(sources ${target} SOURCES)
  set(has_cuda_source OFF)
  foreach(source IN LISTS sources)
    if(source MATCHES "\\.cu$")
      set(has_cuda_source ON)
    endif()
  endforeach()
  if(LOCO_SANITIZE AND NOT has_cuda_source)
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer
                                             -fno-sanitize-recover=all)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined)
  endif()
endfunction()
