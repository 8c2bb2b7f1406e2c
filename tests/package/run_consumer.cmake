# Builds and runs tests/package/consumer against loco (run with cmake -P by the package.* tests).
#   -DMODE=find_package|add_subdirectory
#   -DSETTINGS=<file>   written at configure time: the outer build's source and binary
#                       directories, generator, compilers, build type and version
#   -DWORK_DIR=<dir>    emptied first; holds the install prefix and the consumer's build
cmake_minimum_required(VERSION 3.25)

foreach(var MODE SETTINGS WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
include(${SETTINGS})

# Runs a command, stops with its output when it fails.
function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT status EQUAL 0)
    list(JOIN ARGN " " command)
    message(FATAL_ERROR "${what} failed (status ${status}):\n  ${command}\n${out}")
  endif()
  message(STATUS "${what}: ok")
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

# A stale prefix could hide a file the install forgot; a stale build could hide a configure error.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

set(configure_args
  -S ${LOCO_PKG_CONSUMER_DIR} -B ${WORK_DIR}/build
  -G ${LOCO_PKG_GENERATOR}
  -DCMAKE_MAKE_PROGRAM=${LOCO_PKG_MAKE_PROGRAM}
  -DCMAKE_CXX_COMPILER=${LOCO_PKG_CXX_COMPILER}
  "-DCMAKE_CXX_FLAGS=${LOCO_PKG_CXX_FLAGS}"
  -DCMAKE_BUILD_TYPE=${LOCO_PKG_BUILD_TYPE}
  -DLOCO_CONSUMER_MODE=${MODE})

if(MODE STREQUAL "find_package")
  run("install loco into ${WORK_DIR}/prefix"
      ${CMAKE_COMMAND} --install ${LOCO_PKG_BINARY_DIR} --prefix ${WORK_DIR}/prefix
      --config ${LOCO_PKG_BUILD_TYPE})
  # Only the fresh prefix: the package must not be found in the build tree or a system prefix.
  list(APPEND configure_args
    -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
    -DLOCO_EXPECTED_VERSION=${LOCO_PKG_VERSION}
    -DLOCO_EXPECT_CUDA=${LOCO_PKG_HAS_CUDA})
  if(LOCO_PKG_HAS_CUDA)
    # loco's package config looks for the CUDA toolkit this build used.
    list(APPEND configure_args -DCUDAToolkit_ROOT=${LOCO_PKG_CUDA_ROOT})
  endif()
elseif(MODE STREQUAL "add_subdirectory")
  list(APPEND configure_args -DLOCO_SOURCE_DIR=${LOCO_PKG_SOURCE_DIR})
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE must be find_package or add_subdirectory")
endif()

run("configure the consumer (${MODE})" ${CMAKE_COMMAND} ${configure_args})
run("build the consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run("run the consumer" ${WORK_DIR}/build/loco_consumer)
message(STATUS "${last_output}")
