# loco as a dependency: package.find_package installs this build tree into a fresh prefix and
# builds tests/package/consumer against it with find_package(loco); package.add_subdirectory
# builds the same consumer with loco's source tree added as a subdirectory. Both use this build's
# generator, compiler and build type, and run the consumer, which checks numbers it computes with
# loco against values derived by hand.

if(LOCO_HAS_CUDA)
  # The toolkit root is two levels above nvcc (<root>/bin/nvcc).
  get_filename_component(loco_pkg_cuda_root ${CMAKE_CUDA_COMPILER} DIRECTORY)
  get_filename_component(loco_pkg_cuda_root ${loco_pkg_cuda_root} DIRECTORY)
else()
  set(loco_pkg_cuda_root "")
endif()
if(CMAKE_BUILD_TYPE)
  set(loco_pkg_build_type ${CMAKE_BUILD_TYPE})
else()
  set(loco_pkg_build_type Debug)
endif()

set(loco_pkg_settings ${CMAKE_CURRENT_BINARY_DIR}/package/settings.cmake)
file(CONFIGURE OUTPUT ${loco_pkg_settings} CONTENT [==[
set(LOCO_PKG_SOURCE_DIR [[@PROJECT_SOURCE_DIR@]])
set(LOCO_PKG_BINARY_DIR [[@PROJECT_BINARY_DIR@]])
set(LOCO_PKG_CONSUMER_DIR [[@CMAKE_CURRENT_LIST_DIR@/consumer]])
set(LOCO_PKG_GENERATOR [[@CMAKE_GENERATOR@]])
set(LOCO_PKG_MAKE_PROGRAM [[@CMAKE_MAKE_PROGRAM@]])
set(LOCO_PKG_CXX_COMPILER [[@CMAKE_CXX_COMPILER@]])
set(LOCO_PKG_CXX_FLAGS [[@CMAKE_CXX_FLAGS@]])
set(LOCO_PKG_BUILD_TYPE [[@loco_pkg_build_type@]])
set(LOCO_PKG_VERSION [[@PROJECT_VERSION@]])
set(LOCO_PKG_HAS_CUDA @LOCO_HAS_CUDA@)
set(LOCO_PKG_CUDA_ROOT [[@loco_pkg_cuda_root@]])
]==] @ONLY)

foreach(mode find_package add_subdirectory)
  add_test(NAME package.${mode}
           COMMAND ${CMAKE_COMMAND} -DMODE=${mode} -DSETTINGS=${loco_pkg_settings}
                   -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/package/${mode}
                   -P ${CMAKE_CURRENT_LIST_DIR}/run_consumer.cmake)
  set_tests_properties(package.${mode} PROPERTIES LABELS package TIMEOUT 300)
endforeach()

# The build type loco picks when none is given (CMakeLists.txt), only as the top-level project.
add_test(NAME package.default_build_type
         COMMAND ${CMAKE_COMMAND} -DSETTINGS=${loco_pkg_settings}
                 -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/package/default_build_type
                 -P ${CMAKE_CURRENT_LIST_DIR}/default_build_type.cmake)
set_tests_properties(package.default_build_type PROPERTIES LABELS package TIMEOUT 300)
