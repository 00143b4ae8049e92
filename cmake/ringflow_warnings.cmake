# ringflow_set_warnings(target): the warning flags every ringflow target builds with:
# -Wall -Wextra -Wpedantic for C++, and for CUDA sources nvcc's own warnings
# plus -Wall -Wextra on the host compiler's pass over them.
# RINGFLOW_WARNINGS_AS_ERRORS=ON makes any of them an error (the test
# command's first stage builds that way).
function(ringflow_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>
                                             $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
    if(RINGFLOW_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>
                                               $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Werror>)
    endif()
  endif()
endfunction()
