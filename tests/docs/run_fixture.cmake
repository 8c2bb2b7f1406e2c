# Runs check_snippets.cmake on one fixture and judges the outcome (run with cmake -P by the
# docs.snippets_checker_* CTests). A checker that passed everything, or failed for a reason other
# than the one planted in the fixture, would make docs.snippets worthless; these tests catch that.
#
#   -DFIXTURE=<dir>   holds docs/*.md, examples.cpp.txt and expect.txt
#   -DCHECKER=<file>  check_snippets.cmake
#
# expect.txt: the first line is `pass` or `fail` (the checker's exit status); every further line is
# a regular expression that must match the checker's output.
cmake_minimum_required(VERSION 3.25)

foreach(var FIXTURE CHECKER)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_fixture.cmake: -D${var}=... is required")
  endif()
endforeach()

file(STRINGS ${FIXTURE}/expect.txt expectations)
list(POP_FRONT expectations outcome)
if(NOT outcome MATCHES "^(pass|fail)$")
  message(FATAL_ERROR "${FIXTURE}/expect.txt: the first line must be `pass` or `fail`")
endif()

execute_process(
  COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${FIXTURE} -DDOCS_DIR=${FIXTURE}/docs
          -DEXAMPLES=${FIXTURE}/examples.cpp.txt -P ${CHECKER}
  RESULT_VARIABLE status
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)
message(STATUS "check_snippets.cmake on ${FIXTURE} (status ${status}):\n${output}")

if(outcome STREQUAL "pass" AND NOT status EQUAL 0)
  message(FATAL_ERROR "the checker must accept this fixture but failed")
endif()
if(outcome STREQUAL "fail" AND status EQUAL 0)
  message(FATAL_ERROR "the checker must reject this fixture but passed")
endif()
set(missing "")
foreach(regex IN LISTS expectations)
  if(NOT output MATCHES "${regex}")
    string(APPEND missing "\n  ${regex}")
  endif()
endforeach()
if(missing)
  message(FATAL_ERROR "the checker's output lacks:${missing}")
endif()
