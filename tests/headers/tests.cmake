# Every public header compiles on its own, included twice, under loco's strictest warnings.
#
# One generated translation unit per header under include/loco (found again whenever the list of
# headers changes), compiled into an object library that is part of the default build: a header
# that misses an #include, lacks #pragma once or warns under ${LOCO_HEADER_WARNINGS} breaks
# `cmake --build`, not some later user.
#
# Headers that need nvcc (kernels, the CUDA runtime, NCCL) are matched by the patterns below,
# kept out of the host set, and compiled as .cu translation units when CUDA is enabled. A new
# header needs no change here unless it needs nvcc and lives outside these patterns.

set(loco_nvcc_header_patterns
  "^loco/backend/cuda/"
  "^loco/cuda\\.hpp$"
  "^loco/comm/nccl\\.hpp$"
  "^loco/comm/cuda_replicas\\.hpp$"
  "^loco/comm/cuda_staging\\.hpp$")

set(loco_include_root ${PROJECT_SOURCE_DIR}/include)
file(GLOB_RECURSE loco_public_headers CONFIGURE_DEPENDS
     RELATIVE ${loco_include_root} ${loco_include_root}/loco/*.hpp)
list(SORT loco_public_headers)
# loco/comm/mpi.hpp needs <mpi.h>: checked on its own below, against loco::mpi, when MPI is found.
list(REMOVE_ITEM loco_public_headers loco/comm/mpi.hpp)
# loco/dlpack.hpp needs <dlpack/dlpack.h> (libdlpack-dev): checked only where it is installed.
include(CheckIncludeFileCXX)
check_include_file_cxx(dlpack/dlpack.h LOCO_HAS_DLPACK_HEADER)
if(NOT LOCO_HAS_DLPACK_HEADER)
  list(REMOVE_ITEM loco_public_headers loco/dlpack.hpp)
endif()

set(loco_host_header_tus)
set(loco_cuda_header_tus)
foreach(header IN LISTS loco_public_headers)
  set(needs_nvcc OFF)
  foreach(pattern IN LISTS loco_nvcc_header_patterns)
    if(header MATCHES "${pattern}")
      set(needs_nvcc ON)
    endif()
  endforeach()
  string(MAKE_C_IDENTIFIER "${header}" stem)
  if(needs_nvcc)
    set(tu ${CMAKE_CURRENT_BINARY_DIR}/headers/${stem}.cu)
  else()
    set(tu ${CMAKE_CURRENT_BINARY_DIR}/headers/${stem}.cpp)
  endif()
  # configure_file rewrites the file only when its text changes, so nothing recompiles needlessly.
  set(LOCO_HEADER ${header})
  configure_file(${CMAKE_CURRENT_LIST_DIR}/header_tu.in ${tu} @ONLY)
  if(needs_nvcc)
    list(APPEND loco_cuda_header_tus ${tu})
  else()
    list(APPEND loco_host_header_tus ${tu})
  endif()
endforeach()

if(loco_host_header_tus)
  add_library(loco_header_check OBJECT ${loco_host_header_tus})
  target_link_libraries(loco_header_check PRIVATE loco::loco)
  target_compile_options(loco_header_check PRIVATE ${LOCO_HEADER_WARNINGS})
endif()

if(loco_cuda_header_tus AND LOCO_HAS_CUDA)
  add_library(loco_header_check_cuda OBJECT ${loco_cuda_header_tus})
  target_link_libraries(loco_header_check_cuda PRIVATE loco::cuda)
  # The host compiler sees loco's code through nvcc, so the strict set goes through -Xcompiler,
  # less two flags that fire on what nvcc generates, not on loco: -Wpedantic (GCC line markers)
  # and -Wold-style-cast (cudafe rewrites `throw error("...")` as a C-style cast). The host TUs
  # above still hold every header they include to both. -Werror=all-warnings covers the host
  # compiler's warnings and nvcc's own front-end diagnostics alike.
  set(loco_cuda_host_warnings ${LOCO_HEADER_WARNINGS})
  list(REMOVE_ITEM loco_cuda_host_warnings -Wpedantic -Wold-style-cast -Werror)
  list(JOIN loco_cuda_host_warnings "," loco_cuda_host_warnings)
  target_compile_options(loco_header_check_cuda PRIVATE
    -Xcompiler=${loco_cuda_host_warnings} -Werror=all-warnings)
endif()

if(TARGET loco::mpi)
  set(LOCO_HEADER loco/comm/mpi.hpp)
  configure_file(${CMAKE_CURRENT_LIST_DIR}/header_tu.in
                 ${CMAKE_CURRENT_BINARY_DIR}/headers/loco_comm_mpi_hpp.cpp @ONLY)
  add_library(loco_header_check_mpi OBJECT ${CMAKE_CURRENT_BINARY_DIR}/headers/loco_comm_mpi_hpp.cpp)
  target_link_libraries(loco_header_check_mpi PRIVATE loco::mpi)
  target_compile_options(loco_header_check_mpi PRIVATE ${LOCO_HEADER_WARNINGS})
endif()
