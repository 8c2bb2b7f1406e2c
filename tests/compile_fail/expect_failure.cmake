# Compiles one snippet and judges the result (run with cmake -P by the compile_fail.* tests).
#   -DSNIPPET=<file.cpp>  the snippet; its first line says what must happen:
#                           // expect: <regex>   compilation fails, and the compiler output
#                                                matches <regex> exactly once
#                           // expect-compiles   compilation succeeds (the harness's control)
#   -DSETTINGS=<file>     written at configure time: LOCO_CF_COMPILER and LOCO_CF_FLAGS
#
# A failing snippet also fails this check when its mistake produces more than one loco
# static_assert sentence: each mistake should be reported once, in one sentence.
cmake_minimum_required(VERSION 3.25)

foreach(var SNIPPET SETTINGS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "expect_failure.cmake: -D${var}=... is required")
  endif()
endforeach()
include(${SETTINGS})

# file(READ), not file(STRINGS): an expected regex may hold a semicolon.
file(READ ${SNIPPET} head LIMIT 4096)
string(REGEX MATCH "^[^\n]*" first_line "${head}")
if(first_line MATCHES "^// expect-compiles$")
  set(must_compile ON)
elseif(first_line MATCHES "^// expect: (.+)$")
  set(must_compile OFF)
  set(expected "${CMAKE_MATCH_1}")
else()
  message(FATAL_ERROR "${SNIPPET}: the first line must be `// expect: <regex>` or "
                      "`// expect-compiles`, not `${first_line}`")
endif()

execute_process(
  COMMAND ${LOCO_CF_COMPILER} ${LOCO_CF_FLAGS} ${SNIPPET}
  RESULT_VARIABLE status
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)

get_filename_component(name ${SNIPPET} NAME)
if(must_compile)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${name} must compile but the compiler said (status ${status}):\n"
                        "${output}")
  endif()
  message(STATUS "${name} compiles, as it must")
  return()
endif()

if(status EQUAL 0)
  message(FATAL_ERROR "${name} compiled, but it must be rejected with a message matching\n"
                      "  ${expected}")
endif()

# Counted by hand, not with REGEX MATCHALL: compiler messages contain semicolons, which would
# split the matches of a CMake list.
function(count_matches regex text out)
  set(count 0)
  set(examples "")
  while(TRUE)
    string(REGEX MATCH "${regex}" hit "${text}")
    string(LENGTH "${hit}" hit_length)
    if(hit_length EQUAL 0)
      break()
    endif()
    math(EXPR count "${count} + 1")
    string(APPEND examples "\n  ${hit}")
    string(FIND "${text}" "${hit}" at)
    math(EXPR rest "${at} + ${hit_length}")
    string(SUBSTRING "${text}" ${rest} -1 text)
  endwhile()
  set(${out} ${count} PARENT_SCOPE)
  set(${out}_text "${examples}" PARENT_SCOPE)
endfunction()

count_matches("${expected}" "${output}" hit_count)
# GCC: "static assertion failed: loco: ...", Clang: "static_assert failed ... \"loco: ...".
count_matches("static[ _]assert[^\n]*loco: [^\n]*" "${output}" sentence_count)

if(hit_count EQUAL 0)
  message(FATAL_ERROR "${name} was rejected, but no message matches\n  ${expected}\n"
                      "The compiler said (status ${status}):\n${output}")
endif()
if(hit_count GREATER 1)
  message(FATAL_ERROR "${name}: the expected message appears ${hit_count} times; one mistake "
                      "should be reported once. The compiler said:\n${output}")
endif()
if(sentence_count GREATER 1)
  message(FATAL_ERROR "${name}: one mistake produced ${sentence_count} loco static_assert "
                      "messages:${sentence_count_text}")
endif()
message(STATUS "${name} is rejected with the expected message")
