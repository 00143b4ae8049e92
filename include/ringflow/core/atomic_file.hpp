// The one atomic file writer: a temporary file in the same folder, fsync,
// rename over the target, fsync the folder. Used by the flight recorder, the
// timeline, checkpoints, tuning tables and the cost model.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "ringflow/core/error.hpp"

namespace ringflow::detail {

/// What write_file_atomically throws: the message names the step, the path
/// and the system's reason (`strerror`, with the errno value).
class file_write_error : public error {
 public:
  file_write_error(const std::string& what, std::filesystem::path path, int error_number,
                   bool replaced = false)
      : error(what), path_(std::move(path)), errno_(error_number), replaced_(replaced) {}
  /// The file that could not be written (the target, not the temporary).
  const std::filesystem::path& path() const noexcept { return path_; }
  /// The errno of the failed call (0 when there was none, e.g. a short write).
  int error_number() const noexcept { return errno_; }
  /// Whether the new file had already replaced the old one (only syncing
  /// the folder failed); otherwise an existing file is untouched.
  bool replaced() const noexcept { return replaced_; }

 private:
  std::filesystem::path path_;
  int errno_;
  bool replaced_;
};

struct atomic_write_options {
  /// Create the folder (and its parents) first when it does not exist.
  bool create_directories = false;
  /// Permission bits of a new file (before the umask).
  unsigned mode = 0644;
};

/// Writes `bytes` to `path` so that a reader sees either the old file or the
/// whole new one, never a part: into `.<name>.tmp.<pid>.<n>` beside it,
/// fsync, rename over `path`, fsync the folder (so the rename survives a
/// crash). On failure the temporary is removed, an existing `path` is
/// untouched (unless only the folder's fsync failed, after the rename), and
/// file_write_error is thrown: "cannot write '<path>': <step> failed:
/// <reason> (errno N)".
void write_file_atomically(const std::filesystem::path& path, std::string_view bytes,
                           const atomic_write_options& options = {});

}  // namespace ringflow::detail
