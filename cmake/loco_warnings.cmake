# loco_program(<target>): the flags every program loco builds for itself (tests, examples,
# benchmarks) gets: warnings, optionally -Werror, and the sanitizers when LOCO_SANITIZE is on.
# CUDA sources get the warnings through -Xcompiler and never the sanitizers (ASan's shadow memory
# and the CUDA driver do not mix).

set(LOCO_HOST_WARNINGS -Wall -Wextra -Wpedantic -Wshadow)
# The public headers are held to more: each is compiled alone with these (tests/headers).
set(LOCO_HEADER_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wsign-conversion
    -Wold-style-cast -Wnon-virtual-dtor -Werror)

function(loco_program target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${LOCO_HOST_WARNINGS}>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
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
