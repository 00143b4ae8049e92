// ps's Chrome-trace recorder: the spans of one rank's node (worker pushes and
// pulls per server, server applies, serves and its closing load), written as
// one file per rank with train's conventions (core/trace_clock.hpp,
// core/json.hpp) but without depending on train/ (ps sits beside it).
#pragma once

#include <cstdint>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

namespace ringflow::ps::detail {

/// The trace's rows (`tid`): the server's loop, then one row per server for
/// this rank's worker traffic to it (pushes and pulls to different servers
/// overlap in time; one row each keeps spans nested).
inline constexpr int server_lane = 0;
inline int worker_lane(int server) { return 1 + server; }

class trace_recorder {
 public:
  trace_recorder(int rank, std::filesystem::path file, int servers, bool worker, bool server);

  /// A complete span; `args` is the body of the args object, already JSON.
  void record(std::string name, int lane, double start_us, double end_us, std::string args);
  const std::filesystem::path& file() const noexcept { return file_; }
  /// Writes the file (replacing it) when anything was recorded since the last
  /// write; throws ringflow::error naming the file when it cannot.
  void write();
  /// Whether write() has something new to write.
  bool dirty() const;

 private:
  struct span {
    std::string name;
    int lane;
    double start_us, dur_us;
    std::string args;
  };
  int rank_;
  std::filesystem::path file_;
  int servers_;
  bool worker_, server_;
  mutable std::mutex mutex_;
  std::vector<span> spans_;
  std::size_t written_ = 0;
  bool ever_written_ = false;
};

}  // namespace ringflow::ps::detail
