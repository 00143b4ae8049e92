// The exception hierarchy every layer of ringflow throws.
#pragma once

#include <stdexcept>
#include <string>

namespace ringflow {

/// Base of every error ringflow throws. The message says what went wrong,
/// on which rank (where one is involved) and what to do about it.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A transport or communication failure: a failed MPI/NCCL call, a peer that
/// died, a message that could not be delivered.
class comm_error : public error {
 public:
  using error::error;
};

/// A failed MPI call: a comm_error that also carries what MPI returned.
/// `mpi_code()` is the error code, `mpi_class()` its class (compare it with
/// `MPI_ERR_RANK`, `MPI_ERR_TRUNCATE`, ... from `<mpi.h>`; this header does
/// not include it).
/// @code
/// try { comm.raw().isend(p, n, 99, 0).wait(); }
/// catch (const ringflow::mpi_error& e) { if (e.mpi_class() == MPI_ERR_RANK) ... }
/// @endcode
class mpi_error : public comm_error {
 public:
  mpi_error(const std::string& what, int code, int error_class)
      : comm_error(what), code_(code), class_(error_class) {}
  int mpi_code() const noexcept { return code_; }
  int mpi_class() const noexcept { return class_; }

 private:
  int code_;
  int class_;
};

/// The caller did something wrong: bad argument, mismatched sizes or types
/// across ranks, a shape that does not broadcast.
class usage_error : public error {
 public:
  using error::error;
};

/// An operation waited longer than its deadline (see RINGFLOW_TIMEOUT).
class timeout_error : public comm_error {
 public:
  using comm_error::comm_error;
};

/// The feature exists in the API but not in this build or on this machine
/// (for example CUDA without a GPU).
class not_supported_error : public error {
 public:
  using error::error;
};

}  // namespace ringflow
