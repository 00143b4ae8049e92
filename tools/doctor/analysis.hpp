// ringflow-doctor's reader and diagnosis: loads the flight-recorder dumps of
// all ranks (docs/diagnostics.md) and says which rank is behind, where each
// stuck rank waits, and which ranks called different collectives.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace ringflow::doctor {

/// A dump that cannot be read: the message names the file (and line).
class load_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One recorded collective of one rank of one communicator.
struct record {
  std::string comm;  // communicator id (hex), the same on every member
  int instance = 0;  // the how-manyth communicator with that id in its process
  int rank = 0, size = 1;
  std::uint64_t seq = 0;
  std::string kind, dtype, op, algorithm, state;
  std::uint64_t count = 0;
  int root = -1;
  std::int64_t start_ns = 0, end_ns = 0;
  int wait_peer = -1, wait_tag = -1;
  std::int64_t wait_since_ns = 0;
  std::size_t file = 0;  // index into the loaded dumps
};

struct comm_info {
  std::string comm;
  int instance = 0;
  int rank = 0, size = 1;
  std::string backend;
  std::uint64_t started = 0;
};

/// One rank's dump file.
struct dump {
  std::string path;
  int process_rank = -1;
  long long pid = 0;
  std::string host, reason;
  std::int64_t time_ns = 0;
  std::vector<comm_info> comms;
  std::vector<record> records;
};

/// Reads one dump; throws load_error naming the file and line.
dump load_dump(const std::string& path, std::size_t index = 0);
/// Directories become their ringflow-flight.*.jsonl files (sorted); files
/// stay. Throws load_error for a path that does not exist or a directory
/// without dumps.
std::vector<std::string> expand_paths(const std::vector<std::string>& args);

/// What one rank of a communicator was doing.
struct rank_state {
  int rank = 0;
  std::size_t file = 0;
  std::optional<std::uint64_t> last_done;  // highest sequence completed
  std::uint64_t highest = 0;               // highest sequence started
  std::optional<record> in_flight;         // the running (or failed) collective at `highest`
  std::uint64_t started = 0;               // collectives begun in all
  bool any = false;                        // has recorded collectives
};

/// Ranks that called different collectives as the same sequence number.
struct disagreement {
  std::uint64_t seq = 0;
  std::vector<std::pair<std::string, std::vector<int>>> calls;  // description, ranks
};

struct comm_report {
  std::string comm;
  int instance = 0;
  int size = 1;
  std::string backend;
  std::vector<rank_state> ranks;  // by rank
  std::vector<int> missing;       // ranks without a dump
  std::uint64_t front = 0;        // highest sequence any rank started
  std::vector<int> behind;        // ranks that have not started `front`
  std::vector<int> failed;        // ranks whose collective failed
  std::vector<disagreement> disagreements;
  /// In `front`: who waits on whom, followed to a rank that waits on no one
  /// (that rank is where to look). Empty when nobody waits.
  std::vector<int> wait_chain;
  /// Ranks that started `front` more than late_after_ns after the first one.
  std::vector<std::pair<int, std::int64_t>> late;  // rank, ns after the first
  bool problem = false;
};

/// A rank that starts a collective this much after the first is "late".
inline constexpr std::int64_t late_after_ns = 1'000'000'000;

struct report {
  std::vector<comm_report> comms;
  bool problem = false;
};

report diagnose(const std::vector<dump>& dumps);
/// The human-readable diagnosis ringflow-doctor prints.
std::string render(const report& r, const std::vector<dump>& dumps);

/// "allreduce(float, sum, count=256)"
std::string describe(const record& r);

}  // namespace ringflow::doctor
