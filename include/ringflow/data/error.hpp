// data_error: what the data pipeline throws when a file is missing, short or malformed.
#pragma once

#include "ringflow/core/error.hpp"

namespace ringflow::data {

/// A dataset file could not be used: missing or unreadable, truncated,
/// corrupt gzip, wrong IDX magic, images/labels that disagree, a label out
/// of range. Bad arguments from the caller (batch size 0, rank >= world
/// size) are ringflow::usage_error instead.
class data_error : public ringflow::error {
 public:
  using ringflow::error::error;
};

}  // namespace ringflow::data
