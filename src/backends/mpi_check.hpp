// The one checker of MPI calls for the MPI and shm backends: a failed call
// throws ringflow::mpi_error, a comm_error carrying MPI's error code and
// class, with a message naming the call, where it ran and MPI's reason.
#pragma once

#include <fmt/format.h>
#include <mpi.h>

#include <string>
#include <string_view>

#include "ringflow/core/error.hpp"

namespace ringflow::detail {

/// MPI's text for `code` ("MPI_ERR_RANK: invalid rank"), or "MPI error N".
inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", code);
  return std::string(text, static_cast<std::size_t>(len));
}

/// The class of `code` (MPI_ERR_RANK, MPI_ERR_TRUNCATE, ...); `code` itself
/// when MPI cannot say.
inline int mpi_error_class(int code) noexcept {
  int cls = code;
  if (MPI_Error_class(code, &cls) != MPI_SUCCESS) cls = code;
  return cls;
}

/// The exception for a failed call: "<what>: <MPI's text>".
inline mpi_error make_mpi_error(int code, std::string_view what) {
  return mpi_error(fmt::format("{}: {}", what, mpi_error_text(code)), code, mpi_error_class(code));
}

}  // namespace ringflow::detail

/// Checks an MPI call; on failure throws mpi_error "<call> failed <where>:
/// <MPI's text>", where `where` (evaluated only then) says on which rank,
/// e.g. fmt::format("on rank {} (peer {})", rank, peer).
#define RINGFLOW_CHECK_MPI(call, where)                                                          \
  do {                                                                                           \
    const int rf_rc_ = (call);                                                                   \
    if (rf_rc_ != MPI_SUCCESS) {                                                                 \
      throw ::ringflow::detail::make_mpi_error(rf_rc_, std::string(#call " failed ") + (where)); \
    }                                                                                            \
  } while (0)
