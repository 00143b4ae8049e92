# Install rules and the CMake package (ringflowConfig.cmake, version, targets with ringflow::).
#
# Included from the top-level CMakeLists.txt when RINGFLOW_INSTALL is ON. After
#   cmake --install build --prefix P
# another project finds ringflow with find_package(ringflow CONFIG REQUIRED)
# (CMAKE_PREFIX_PATH=P) and links ringflow::coll, ringflow::train, ringflow::serve,
# ringflow::ps, ringflow::ringflow (all four) and ringflow::cuda, the same target names an
# add_subdirectory(ringflow) user sees. ringflow::cuda has its own export file
# (ringflowCudaTargets.cmake), loaded only where its toolkit is found, so the
# other targets never need CUDA.
include(CMakePackageConfigHelpers)

set(RINGFLOW_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/ringflow
    CACHE STRING "Where ringflowConfig.cmake is installed, relative to the prefix")
mark_as_advanced(RINGFLOW_INSTALL_CMAKEDIR)

foreach(_rf_set ringflowTargets ringflowCudaTargets)
  if(_rf_set STREQUAL "ringflowTargets")
    set(_rf_targets ringflow_coll ringflow_train ringflow_serve ringflow_ps ringflow)
  else()
    set(_rf_targets ringflow_cuda)
  endif()
  install(TARGETS ${_rf_targets}
          EXPORT ${_rf_set}
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT ringflow_development
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT ringflow_runtime
                  NAMELINK_COMPONENT ringflow_development
          RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT ringflow_runtime
          INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
endforeach()

# Every public header, and nothing else that may sit in include/.
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/ringflow
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        COMPONENT ringflow_development
        FILES_MATCHING PATTERN "*.hpp" PATTERN "*.h" PATTERN "*.cuh" PATTERN "*.inl")

# (bench/ installs ringflow-bench itself, tools/ ringflow-doctor.)

foreach(_rf_set ringflowTargets ringflowCudaTargets)
  install(EXPORT ${_rf_set}
          NAMESPACE ringflow::
          FILE ${_rf_set}.cmake
          DESTINATION ${RINGFLOW_INSTALL_CMAKEDIR}
          COMPONENT ringflow_development)
endforeach()

# What the config file needs to know about this build.
if(RINGFLOW_WITH_CUDA)
  set(RINGFLOW_CONFIG_WITH_CUDA ON)
  set(RINGFLOW_CONFIG_CUDA_ROOT "")
  if(CUDAToolkit_BIN_DIR)
    get_filename_component(RINGFLOW_CONFIG_CUDA_ROOT ${CUDAToolkit_BIN_DIR} DIRECTORY)
  endif()
else()
  set(RINGFLOW_CONFIG_WITH_CUDA OFF)
  set(RINGFLOW_CONFIG_CUDA_ROOT "")
endif()

configure_package_config_file(
  ${CMAKE_CURRENT_LIST_DIR}/ringflowConfig.cmake.in
  ${PROJECT_BINARY_DIR}/cmake/ringflowConfig.cmake
  INSTALL_DESTINATION ${RINGFLOW_INSTALL_CMAKEDIR})

# Before 1.0 a minor release may break the API: only the same minor matches.
write_basic_package_version_file(
  ${PROJECT_BINARY_DIR}/cmake/ringflowConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)

install(FILES ${PROJECT_BINARY_DIR}/cmake/ringflowConfig.cmake
              ${PROJECT_BINARY_DIR}/cmake/ringflowConfigVersion.cmake
        DESTINATION ${RINGFLOW_INSTALL_CMAKEDIR}
        COMPONENT ringflow_development)

foreach(_rf_doc LICENSE README.md)
  if(EXISTS ${PROJECT_SOURCE_DIR}/${_rf_doc})
    install(FILES ${PROJECT_SOURCE_DIR}/${_rf_doc} DESTINATION ${CMAKE_INSTALL_DOCDIR}
            COMPONENT ringflow_development)
  endif()
endforeach()
