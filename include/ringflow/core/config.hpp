// Build-wide macros: host/device annotations and the library version.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RINGFLOW_HOST_DEVICE __host__ __device__
#else
#define RINGFLOW_HOST_DEVICE
#endif

#define RINGFLOW_VERSION_MAJOR 0
#define RINGFLOW_VERSION_MINOR 1
#define RINGFLOW_VERSION_PATCH 0
