# The code blocks of docs/*.md that carry a `<!-- snippet: NAME -->` marker must be the regions of
# tests/docs_examples_test.cpp that loco_tests compiles and runs; docs.snippets compares them.
# The docs.snippets_checker_* entries run the same checker on small fixtures with planted mistakes
# (and one without), so that a checker that accepts everything cannot go unnoticed.

# The pages' examples come from the host examples file and, for docs/cuda.md, from the GPU tests
# and docs/groups.md, from the GPU tests (compiled in every CUDA-enabled build, run on a GPU); the
# MPI section of docs/communicators.md shows examples/mpi_diloco.cpp (example.mpi_diloco runs it);
# docs/pytorch.md's SparseLoCo and DeMo examples are in tests/python/test_frontier_gloo.py.
add_test(NAME docs.snippets
         COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
                 "-DEXAMPLES=${PROJECT_SOURCE_DIR}/tests/docs_examples_test.cpp$<SEMICOLON>${PROJECT_SOURCE_DIR}/tests/comm_request_test.cpp$<SEMICOLON>${PROJECT_SOURCE_DIR}/tests/cuda/handles_test.cu$<SEMICOLON>${PROJECT_SOURCE_DIR}/tests/cuda/groups_test.cu$<SEMICOLON>${PROJECT_SOURCE_DIR}/examples/mpi_diloco.cpp$<SEMICOLON>${PROJECT_SOURCE_DIR}/tests/heal_test.cpp$<SEMICOLON>${PROJECT_SOURCE_DIR}/tests/mpi/heal_mpi_test.cpp$<SEMICOLON>${PROJECT_SOURCE_DIR}/tests/torchft_recovery_test.cpp$<SEMICOLON>${PROJECT_SOURCE_DIR}/tests/python/test_frontier_gloo.py"
                 -P ${CMAKE_CURRENT_LIST_DIR}/check_snippets.cmake)
set_tests_properties(docs.snippets PROPERTIES LABELS docs TIMEOUT 60)

file(GLOB loco_docs_fixtures LIST_DIRECTORIES true CONFIGURE_DEPENDS
     ${CMAKE_CURRENT_LIST_DIR}/fixtures/*)
foreach(fixture IN LISTS loco_docs_fixtures)
  if(NOT IS_DIRECTORY ${fixture})
    continue()
  endif()
  get_filename_component(name ${fixture} NAME)
  add_test(NAME docs.snippets_checker_${name}
           COMMAND ${CMAKE_COMMAND} -DFIXTURE=${fixture}
                   -DCHECKER=${CMAKE_CURRENT_LIST_DIR}/check_snippets.cmake
                   -P ${CMAKE_CURRENT_LIST_DIR}/run_fixture.cmake)
  set_tests_properties(docs.snippets_checker_${name} PROPERTIES LABELS docs TIMEOUT 60)
endforeach()

# The README's example is examples/quickstart.cpp, which example.quickstart compiles and runs.
add_test(NAME docs.readme_example
         COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR} -DDOCS_DIR=${PROJECT_SOURCE_DIR}
                 -DEXAMPLES=${PROJECT_SOURCE_DIR}/examples/quickstart.cpp
                 -P ${CMAKE_CURRENT_LIST_DIR}/check_snippets.cmake)
set_tests_properties(docs.readme_example PROPERTIES LABELS docs TIMEOUT 60)
