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
