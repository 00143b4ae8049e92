# ringflow_tool_flags: the header-only flag parser (bench/flags/tool_flags.hpp)
# that ringflow-bench, the bench programs and the examples share.
if(NOT TARGET ringflow_tool_flags)
  add_library(ringflow_tool_flags INTERFACE)
  target_include_directories(ringflow_tool_flags INTERFACE ${PROJECT_SOURCE_DIR}/bench/flags)
  target_link_libraries(ringflow_tool_flags INTERFACE ringflow::ringflow)
endif()
