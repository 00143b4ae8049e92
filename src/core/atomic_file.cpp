// write_file_atomically: temporary file beside the target, fsync, rename, fsync the folder.
#include "ringflow/core/atomic_file.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <system_error>

namespace ringflow::detail {

namespace {

// Closes a descriptor on scope exit.
struct fd_guard {
  int fd = -1;
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
};

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& step, int e,
                       bool replaced = false) {
  throw file_write_error(e != 0 ? fmt::format("cannot write '{}': {} failed: {} (errno {})",
                                              path.string(), step, std::strerror(e), e)
                                : fmt::format("cannot write '{}': {} failed", path.string(), step),
                         path, e, replaced);
}

}  // namespace

void write_file_atomically(const std::filesystem::path& path, std::string_view bytes,
                           const atomic_write_options& options) {
  if (path.empty()) throw file_write_error("cannot write a file with an empty name", path, 0);
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : ".";
  if (options.create_directories && path.has_parent_path()) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) fail(path, fmt::format("creating the folder '{}'", dir.string()), ec.value());
  }
  // Unique per process and call, so concurrent writers (threads, or ranks
  // sharing a folder) never share a temporary.
  static std::atomic<unsigned> counter{0};
  const std::filesystem::path tmp =
      dir / fmt::format(".{}.tmp.{}.{}", path.filename().string(), static_cast<long>(::getpid()),
                        counter.fetch_add(1));
  bool renamed = false;
  try {
    {
      fd_guard fd{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                         static_cast<mode_t>(options.mode))};
      if (fd.fd < 0) {
        fail(path,
             fmt::format("creating the temporary file '{}' (does the folder exist and is it "
                         "writable?)",
                         tmp.string()),
             errno);
      }
      std::size_t done = 0;
      while (done < bytes.size()) {
        const ssize_t n = ::write(fd.fd, bytes.data() + done, bytes.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          fail(path,
               fmt::format("writing the temporary file '{}' (after {} of {} bytes)", tmp.string(),
                           done, bytes.size()),
               n < 0 ? errno : 0);
        }
        done += static_cast<std::size_t>(n);
      }
      if (::fsync(fd.fd) != 0) fail(path, fmt::format("fsync of '{}'", tmp.string()), errno);
      const int fdv = fd.fd;
      fd.fd = -1;
      if (::close(fdv) != 0) fail(path, fmt::format("closing '{}'", tmp.string()), errno);
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      fail(path, fmt::format("renaming '{}' over it", tmp.string()), errno);
    }
    renamed = true;
    // Make the rename itself durable.
    fd_guard dfd{::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
    if (dfd.fd < 0) {
      fail(path, fmt::format("opening the folder '{}' (the file was replaced)", dir.string()),
           errno, true);
    }
    // EINVAL: a file system that cannot sync folders (the data itself is synced).
    if (::fsync(dfd.fd) != 0 && errno != EINVAL) {
      fail(path, fmt::format("fsync of the folder '{}' (the file was replaced)", dir.string()),
           errno, true);
    }
  } catch (...) {
    if (!renamed) ::unlink(tmp.c_str());
    throw;
  }
}

}  // namespace ringflow::detail
