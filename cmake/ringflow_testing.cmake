# ringflow_add_test(name SOURCES ... LABELS ... [MPI_RANKS n...] [CUDA] [ARGS arg...])
#
# ARGS go to the test binary (a Catch2 test spec, say).
# Builds one Catch2 binary. Without MPI_RANKS it is registered once; with
# MPI_RANKS it is registered once per rank count as name_npN, run through
# ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} N (with --oversubscribe and,
# as root, --allow-run-as-root for OpenMPI). CUDA tests (also under mpirun)
# exit 77 = skipped when no GPU is visible.
#
# In a sanitized tree (RINGFLOW_SANITIZE, cmake/ringflow_sanitize.cmake) every
# test also gets RINGFLOW_SANITIZER_ENV: the first report ends the test with a
# non-zero status, and the suppression files of tests/sanitizers/ (OpenMPI's
# own leaks and races, never a ringflow frame) are used.

# ringflow_sanitizer_env(<out-var> [MPI]): the sanitizer runtime options for a
# test; empty outside a sanitized tree. MPI: the test calls MPI_Init (mpirun
# ranks, the tools), so LeakSanitizer unwinds malloc stacks fully (slower):
# OpenMPI's leaks are suppressed by library name (tests/sanitizers/lsan.supp),
# and the fast unwinder stops inside libmpi, before any frame that names it.
function(ringflow_sanitizer_env out)
  cmake_parse_arguments(ARG "MPI" "" "" ${ARGN})
  set(_env "")
  if(RINGFLOW_SANITIZE)
    set(_supp ${PROJECT_SOURCE_DIR}/tests/sanitizers)
    set(_lsan "suppressions=${_supp}/lsan.supp:print_suppressions=0")
    if(ARG_MPI)
      string(APPEND _lsan ":fast_unwind_on_malloc=0")
    endif()
    list(APPEND _env
         "ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:check_initialization_order=1:strict_init_order=1"
         "LSAN_OPTIONS=${_lsan}"
         "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:suppressions=${_supp}/ubsan.supp"
         "TSAN_OPTIONS=halt_on_error=1:exitcode=66:second_deadlock_stack=1:suppressions=${_supp}/tsan.supp")
  endif()
  set(${out} "${_env}" PARENT_SCOPE)
endfunction()

function(ringflow_add_test name)
  cmake_parse_arguments(ARG "CUDA" "" "SOURCES;LABELS;MPI_RANKS;ARGS" ${ARGN})
  if(ARG_MPI_RANKS)
    ringflow_sanitizer_env(_san_env MPI)
  else()
    ringflow_sanitizer_env(_san_env)
  endif()
  set(_test_env RINGFLOW_TIMEOUT=60 ${_san_env})
  if(ARG_MPI_RANKS AND ARG_CUDA)
    set(_main cuda_mpi_main)
  elseif(ARG_MPI_RANKS)
    set(_main mpi_main)
  elseif(ARG_CUDA)
    set(_main cuda_main)
  else()
    set(_main main)
  endif()
  # The entry point is compiled once per kind and shared by every binary of
  # that kind: with Catch2 v2 it carries the whole framework (about 20 s of
  # compiling each, fifteen times over before).
  set(_main_target ringflow_test_${_main})
  if(NOT TARGET ${_main_target})
    add_library(${_main_target} OBJECT ${PROJECT_SOURCE_DIR}/tests/support/${_main}.cpp)
    target_link_libraries(${_main_target} PRIVATE ringflow::ringflow ringflow::cuda Catch2::Catch2)
    target_include_directories(${_main_target} PRIVATE ${PROJECT_SOURCE_DIR}/tests)
    ringflow_set_warnings(${_main_target})
  endif()
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${_main_target} ringflow::ringflow ringflow::cuda
                                        Catch2::Catch2)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/tests)
  ringflow_set_warnings(${name})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)

  if(ARG_MPI_RANKS)
    set(_extra_flags --oversubscribe)
    execute_process(COMMAND id -u OUTPUT_VARIABLE _uid OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_uid STREQUAL "0")
      list(APPEND _extra_flags --allow-run-as-root)
    endif()
    foreach(n ${ARG_MPI_RANKS})
      add_test(NAME ${name}_np${n}
               COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${n} ${_extra_flags}
                       ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${name}> ${MPIEXEC_POSTFLAGS} ${ARG_ARGS})
      # A failing rank should stop its peers within a minute, not after the
      # 300 s default wait: the tests never wait legitimately that long.
      set_tests_properties(${name}_np${n} PROPERTIES LABELS "${ARG_LABELS}" PROCESSORS ${n}
                           TIMEOUT 600 ENVIRONMENT "${_test_env}")
      if(ARG_CUDA)
        set_tests_properties(${name}_np${n} PROPERTIES SKIP_RETURN_CODE 77)
      endif()
    endforeach()
  else()
    add_test(NAME ${name} COMMAND ${name} ${ARG_ARGS})
    set_tests_properties(${name} PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT 600
                         ENVIRONMENT "${_test_env}")
    if(ARG_CUDA)
      set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE 77)
    endif()
  endif()
endfunction()
