# Script for the install_prefix test: a clean `cmake --install` into PREFIX, then
# a check that the package files landed.
#   cmake -DBINARY_DIR=<build> -DPREFIX=<dir> [-DSCRATCH=<dir>] [-DCONFIG=<cfg>]
#         -P install_prefix.cmake
# SCRATCH (which holds PREFIX and the consumer's build) is wiped first.
foreach(var BINARY_DIR PREFIX)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "install_prefix.cmake: pass -D${var}=...")
  endif()
endforeach()

# Start from nothing so files removed from the install rules cannot linger,
# and the consumer is configured afresh against this install.
if(SCRATCH)
  file(REMOVE_RECURSE ${SCRATCH})
endif()
file(REMOVE_RECURSE ${PREFIX})

set(_config_args)
if(CONFIG)
  set(_config_args --config ${CONFIG})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BINARY_DIR} --prefix ${PREFIX} ${_config_args}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BINARY_DIR} --prefix ${PREFIX} failed (${rc}); "
                      "was the tree built (cmake --build ${BINARY_DIR}) before ctest?")
endif()

file(GLOB_RECURSE _configs ${PREFIX}/*/ringflowConfig.cmake)
file(GLOB_RECURSE _versions ${PREFIX}/*/ringflowConfigVersion.cmake)
file(GLOB_RECURSE _targets ${PREFIX}/*/ringflowTargets.cmake)
file(GLOB_RECURSE _cuda_targets ${PREFIX}/*/ringflowCudaTargets.cmake)
file(GLOB_RECURSE _libs ${PREFIX}/*/libringflow_coll.* ${PREFIX}/*/libringflow_train.*
     ${PREFIX}/*/libringflow_cuda.*)
set(_missing)
if(NOT _configs)
  list(APPEND _missing ringflowConfig.cmake)
endif()
if(NOT _versions)
  list(APPEND _missing ringflowConfigVersion.cmake)
endif()
if(NOT _targets)
  list(APPEND _missing ringflowTargets.cmake)
endif()
if(NOT _cuda_targets)
  list(APPEND _missing ringflowCudaTargets.cmake)
endif()
list(LENGTH _libs _nlibs)
if(_nlibs LESS 3)
  list(APPEND _missing "libringflow_coll, libringflow_train and libringflow_cuda")
endif()
foreach(h ringflow.hpp coll/collectives.hpp backends/local.hpp backends/mpi.hpp)
  if(NOT EXISTS ${PREFIX}/include/ringflow/${h})
    list(APPEND _missing include/ringflow/${h})
  endif()
endforeach()
if(_missing)
  message(FATAL_ERROR "install into ${PREFIX} is missing: ${_missing}")
endif()
message(STATUS "ringflow installed into ${PREFIX}")
