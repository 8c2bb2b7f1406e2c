# Mistakes a user can make must stop the build with a sentence that names them, not with pages of
# template errors. Each tests/compile_fail/*.cpp becomes the CTest entry compile_fail.<name>: it is
# compiled on its own with the C++ compiler of this build, and passes only when the result is the
# one its first line announces (see expect_failure.cmake). harness_accepts_valid_code.cpp is the
# control: the same harness on correct code must succeed, so the other entries cannot pass just
# because nothing compiles (a wrong include path, a missing flag).

file(GLOB loco_compile_fail_snippets CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/*.cpp)

# The include directories of loco and Boost; the compiler's own directories are left out, since
# -isystem /usr/include breaks the #include_next chain of the C++ standard library's headers.
set(loco_cf_include_flags -I${PROJECT_SOURCE_DIR}/include)
get_target_property(loco_cf_boost_dirs Boost::headers INTERFACE_INCLUDE_DIRECTORIES)
foreach(dir IN LISTS loco_cf_boost_dirs)
  if(dir AND NOT dir IN_LIST CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES)
    list(APPEND loco_cf_include_flags -isystem ${dir})
  endif()
endforeach()

# No caret lines: they echo source text, and a static_assert's own message would then match the
# expected sentence a second time.
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  set(loco_cf_diagnostic_flags -fno-caret-diagnostics -fdiagnostics-color=never)
else()
  set(loco_cf_diagnostic_flags -fno-diagnostics-show-caret -fdiagnostics-color=never)
endif()

# Bracket arguments keep paths with spaces or semicolons in one piece.
set(loco_cf_flags_text "")
foreach(flag IN ITEMS -std=c++20 -fsyntax-only ${loco_cf_diagnostic_flags} ${loco_cf_include_flags})
  string(APPEND loco_cf_flags_text " [==[${flag}]==]")
endforeach()
set(loco_cf_settings ${CMAKE_CURRENT_BINARY_DIR}/compile_fail/settings.cmake)
file(CONFIGURE OUTPUT ${loco_cf_settings} CONTENT
     "set(LOCO_CF_COMPILER [==[@CMAKE_CXX_COMPILER@]==])\nset(LOCO_CF_FLAGS@loco_cf_flags_text@)\n"
     @ONLY)

foreach(snippet IN LISTS loco_compile_fail_snippets)
  get_filename_component(name ${snippet} NAME_WE)
  file(READ ${snippet} head LIMIT 4096)
  string(REGEX MATCH "^[^\n]*" first_line "${head}")
  if(NOT first_line MATCHES "^// (expect: .+|expect-compiles)$")
    message(FATAL_ERROR "${snippet}: the first line must be `// expect: <regex>` or "
                        "`// expect-compiles`")
  endif()
  add_test(NAME compile_fail.${name}
           COMMAND ${CMAKE_COMMAND} -DSNIPPET=${snippet} -DSETTINGS=${loco_cf_settings}
                   -P ${CMAKE_CURRENT_LIST_DIR}/expect_failure.cmake)
  set_tests_properties(compile_fail.${name} PROPERTIES LABELS compile_fail TIMEOUT 120)
endforeach()
