# package.default_build_type (run with cmake -P): without CMAKE_BUILD_TYPE, loco as the top-level
# project configures Release and says so (CMakeLists.txt); a type given on the command line is
# kept; and as a parent's subdirectory loco leaves the parent's (empty) choice alone.
#   -DSETTINGS=<file>   the outer build's settings (tests/package/tests.cmake)
#   -DWORK_DIR=<dir>    emptied first
cmake_minimum_required(VERSION 3.25)
foreach(var SETTINGS WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "default_build_type.cmake: -D${var}=... is required")
  endif()
endforeach()
include(${SETTINGS})
file(REMOVE_RECURSE ${WORK_DIR})

# Configures <source> into WORK_DIR/<name> with the extra arguments; sets `output` and
# `build_type` (the cache's CMAKE_BUILD_TYPE) in the caller.
function(configure name source)
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${source} -B ${WORK_DIR}/${name}
                          -G ${LOCO_PKG_GENERATOR} -DCMAKE_MAKE_PROGRAM=${LOCO_PKG_MAKE_PROGRAM}
                          -DCMAKE_CXX_COMPILER=${LOCO_PKG_CXX_COMPILER} ${ARGN}
                  RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "configuring ${name} failed (status ${status}):\n${out}")
  endif()
  load_cache(${WORK_DIR}/${name} READ_WITH_PREFIX cached_ CMAKE_BUILD_TYPE)
  set(output "${out}" PARENT_SCOPE)
  set(build_type "${cached_CMAKE_BUILD_TYPE}" PARENT_SCOPE)
endfunction()

set(loco_only -DLOCO_BUILD_TESTS=OFF -DLOCO_BUILD_EXAMPLES=OFF -DLOCO_BUILD_PYTHON=OFF
              -DLOCO_ENABLE_CUDA=OFF -DLOCO_ENABLE_MPI=OFF)
set(notice "loco: no CMAKE_BUILD_TYPE given; building Release")

configure(top ${LOCO_PKG_SOURCE_DIR} ${loco_only})
if(NOT build_type STREQUAL "Release" OR NOT output MATCHES "${notice}")
  message(FATAL_ERROR "loco without a build type: CMAKE_BUILD_TYPE is '${build_type}', "
                      "expected Release with the notice:\n${output}")
endif()

configure(debug ${LOCO_PKG_SOURCE_DIR} ${loco_only} -DCMAKE_BUILD_TYPE=Debug)
if(NOT build_type STREQUAL "Debug" OR output MATCHES "${notice}")
  message(FATAL_ERROR "loco with -DCMAKE_BUILD_TYPE=Debug: CMAKE_BUILD_TYPE is '${build_type}' "
                      "(or the notice was printed):\n${output}")
endif()

configure(parent ${LOCO_PKG_CONSUMER_DIR} -DLOCO_CONSUMER_MODE=add_subdirectory
          -DLOCO_SOURCE_DIR=${LOCO_PKG_SOURCE_DIR})
if(NOT build_type STREQUAL "" OR output MATCHES "${notice}")
  message(FATAL_ERROR "add_subdirectory(loco) changed its parent's build type to "
                      "'${build_type}':\n${output}")
endif()
message(STATUS "default build type: Release when top-level and none given; kept otherwise")
