# RINGFLOW_SANITIZE: build every ringflow target (library, tests, tools) under sanitizers.
#
#   -DRINGFLOW_SANITIZE=address,undefined   AddressSanitizer + UBSan (LeakSanitizer with ASan)
#   -DRINGFLOW_SANITIZE=thread              ThreadSanitizer (cannot be combined with address)
#
# Compile and link flags are set together (add_compile_options/add_link_options),
# so every executable and shared library links the matching runtime. UBSan is
# built with -fno-sanitize-recover so a report ends the process with a non-zero
# status and fails its test instead of scrolling past. Only C and C++ sources get
# the flags: nvcc does not know -fsanitize (CUDA builds stay unsanitized; the
# sanitizer presets turn CUDA off). See docs/testing.md.
set(RINGFLOW_SANITIZE "" CACHE STRING
    "Sanitizers for every ringflow target: empty, address,undefined, or thread")
set_property(CACHE RINGFLOW_SANITIZE PROPERTY STRINGS "" "address,undefined" "address" "undefined" "thread")

set(RINGFLOW_SANITIZE_COMPILE_FLAGS "")
set(RINGFLOW_SANITIZE_LINK_FLAGS "")
if(RINGFLOW_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "RINGFLOW_SANITIZE needs GCC or Clang (got ${CMAKE_CXX_COMPILER_ID})")
  endif()
  string(REPLACE "," ";" _rf_san_list "${RINGFLOW_SANITIZE}")
  foreach(s ${_rf_san_list})
    if(NOT s MATCHES "^(address|undefined|thread|leak)$")
      message(FATAL_ERROR "RINGFLOW_SANITIZE: unknown sanitizer '${s}' "
                          "(use address,undefined or thread)")
    endif()
  endforeach()
  if("thread" IN_LIST _rf_san_list AND ("address" IN_LIST _rf_san_list OR "leak" IN_LIST _rf_san_list))
    message(FATAL_ERROR "RINGFLOW_SANITIZE: thread cannot be combined with address or leak; "
                        "configure two build trees (e.g. the asan and tsan presets)")
  endif()

  set(RINGFLOW_SANITIZE_COMPILE_FLAGS -fsanitize=${RINGFLOW_SANITIZE} -fno-omit-frame-pointer)
  if("undefined" IN_LIST _rf_san_list)
    list(APPEND RINGFLOW_SANITIZE_COMPILE_FLAGS -fno-sanitize-recover=undefined)
  endif()
  set(RINGFLOW_SANITIZE_LINK_FLAGS -fsanitize=${RINGFLOW_SANITIZE})
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${RINGFLOW_SANITIZE_COMPILE_FLAGS}>")
  add_link_options("$<$<LINK_LANGUAGE:C,CXX>:${RINGFLOW_SANITIZE_LINK_FLAGS}>")
  if(CMAKE_CUDA_COMPILER AND RINGFLOW_WITH_CUDA)
    message(WARNING "RINGFLOW_SANITIZE=${RINGFLOW_SANITIZE}: CUDA sources are built without "
                    "sanitizers (use -DRINGFLOW_WITH_CUDA=OFF for a fully sanitized tree)")
  endif()
  message(STATUS "ringflow: sanitizers ${RINGFLOW_SANITIZE}")
endif()
