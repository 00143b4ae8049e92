// ringflow-bench main: flags, buffers, warmup, the interleaved timing loop, the check, the output.
#include "harness.hpp"

#include <fmt/format.h>
#include <mpi.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <set>
#include <thread>

#include "cli.hpp"
#include "modes.hpp"
#include "report.hpp"
#include "ring_order.hpp"
#include "ringflow/backends/mpi.hpp"
#include "ringflow/backends/mpi_interop.hpp"

namespace ringflow::bench {

namespace {
// Filled by the static initializers of the collective files, read by main.
std::vector<collective_entry>& table() {
  static std::vector<collective_entry> entries;
  return entries;
}
}  // namespace

bool register_collective(collective_entry entry) {
  table().push_back(std::move(entry));
  return true;
}

const std::vector<collective_entry>& collectives() { return table(); }

MPI_Datatype mpi_datatype(dtype t) {
  switch (t) {
    case dtype::f32: return MPI_FLOAT;
    case dtype::f64: return MPI_DOUBLE;
    case dtype::i8: return MPI_INT8_T;
    case dtype::u8: return MPI_UINT8_T;
    case dtype::i32: return MPI_INT32_T;
    case dtype::i64: return MPI_INT64_T;
    case dtype::f16:
    case dtype::bf16: return MPI_DATATYPE_NULL;
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op mpi_op(op_kind k) {
  switch (k) {
    case op_kind::sum:
    case op_kind::avg: return MPI_SUM;
    case op_kind::prod: return MPI_PROD;
    case op_kind::min: return MPI_MIN;
    case op_kind::max: return MPI_MAX;
  }
  return MPI_SUM;
}

void poison(void* data, std::size_t n, std::size_t elem_size) {
  if (n > 0) std::memset(data, 0xff, n * elem_size);
}

namespace {

// Page-aligned, so neither side of a comparison gets a luckier alignment.
struct aligned_buffer {
  std::unique_ptr<void, decltype(&std::free)> ptr{nullptr, &std::free};
  explicit aligned_buffer(std::size_t bytes) {
    constexpr std::size_t align = 4096;
    const std::size_t rounded = std::max<std::size_t>(align, (bytes + align - 1) / align * align);
    ptr.reset(std::aligned_alloc(align, rounded));
    if (!ptr) throw std::bad_alloc();
  }
  void* get() const { return ptr.get(); }
};

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  }
  return "unknown cpu";
}

std::string mpi_library() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int len = 0;
  MPI_Get_library_version(text, &len);
  std::string s(text, static_cast<std::size_t>(len));
  if (const auto cut = s.find_first_of(",\n"); cut != std::string::npos) s.resize(cut);
  return s;
}

// CPUs this process may run on (taskset, cgroup cpusets), 0 if unknown.
int usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 0;
  return CPU_COUNT(&set);
}

std::string host_name() {
  char name[256] = {};
  gethostname(name, sizeof name - 1);
  return name;
}

int count_hosts(MPI_Comm mpi, const std::string& host, int nranks) {
  constexpr int width = 256;
  std::vector<char> mine(width, '\0'), all(static_cast<std::size_t>(width) * nranks);
  std::copy_n(host.begin(), std::min<std::size_t>(host.size(), width - 1), mine.begin());
  MPI_Allgather(mine.data(), width, MPI_CHAR, all.data(), width, MPI_CHAR, mpi);
  std::set<std::string> names;
  for (int r = 0; r < nranks; ++r) names.emplace(all.data() + static_cast<std::size_t>(r) * width);
  return static_cast<int>(names.size());
}

// One repetition: a barrier, then `iters` back-to-back calls; the mean time
// per call on the slowest rank, in microseconds.
template <class F>
double timed_rep(MPI_Comm mpi, int iters, F&& call) {
  MPI_Barrier(mpi);
  const auto t0 = std::chrono::steady_clock::now();
  for (int k = 0; k < iters; ++k) call();
  const double mine =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  double slowest = 0;
  MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, mpi);
  return slowest / iters;
}

std::size_t total_wrong(MPI_Comm mpi, std::size_t mine) {
  unsigned long long in = mine, out = 0;
  MPI_Allreduce(&in, &out, 1, MPI_UNSIGNED_LONG_LONG, MPI_SUM, mpi);
  return static_cast<std::size_t>(out);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

void finish_side(side_result& s, std::size_t bytes, double factor) {
  s.time.summarize();
  s.algbw = s.time.median_us > 0 ? static_cast<double>(bytes) / s.time.median_us / 1e3 : 0.0;
  s.busbw = s.algbw * factor;
}

// Opens an output file on rank 0 and tells every rank whether that worked.
std::FILE* open_output(MPI_Comm mpi, int rank, const std::string& path, const char* flag) {
  std::FILE* f = nullptr;
  int ok = 1;
  if (rank == 0 && !path.empty()) {
    f = path == "-" ? stdout : std::fopen(path.c_str(), "w");
    if (f == nullptr) {
      ok = 0;
      std::fprintf(stderr, "ringflow-bench: error: %s %s: cannot open for writing: %s\n", flag,
                   path.c_str(), std::strerror(errno));
    }
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, mpi);
  if (!ok) throw bad_flag("");  // already reported by rank 0
  return f;
}

int run_bench(const communicator& comm, MPI_Comm mpi, bench_cli& cli,
              const collective_entry& entry) {
  const int rank = comm.rank(), nranks = comm.size();
  std::FILE* csv = open_output(mpi, rank, cli.csv_path, "--csv");
  std::FILE* json = open_output(mpi, rank, cli.json_path, "--json");
  const bool table = rank == 0 && cli.csv_path != "-" && cli.json_path != "-";
  const bool baseline = !cli.baseline.empty();
  const std::size_t elem = dtype_size(cli.cfg.type);

  run_info info;
  info.coll = std::string(entry.name);
  info.algo = cli.cfg.algo_name;
  info.type = std::string(dtype_name(cli.cfg.type));
  info.op = entry.uses_op ? std::string(op_name(cli.cfg.op)) : "none";
  info.baseline_call = baseline ? std::string(entry.baseline) : "";
  info.ranks = nranks;
  info.root = cli.cfg.root;
  info.host = host_name();
  info.hosts = count_hosts(mpi, info.host, nranks);
  info.nproc = std::thread::hardware_concurrency();
  info.usable_cpus = usable_cpus();
  info.cpu_model = cpu_model();
  info.mpi_library = mpi_library();
  info.backend = std::string(comm.backend());
  info.iters = cli.iters;
  info.warmup = cli.warmup;
  info.reps = cli.reps;
  info.segment_default = cli.cfg.segment_bytes == 0;
  info.segment_bytes = info.segment_default ? default_segment_bytes : cli.cfg.segment_bytes;
  info.check = cli.check;
  info.extended = cli.extended;
  info.checked_mode = comm.checked();
  const double factor = entry.bus_factor(nranks);
  info.bus_factor_text = fmt::format("{} = {:.3f}", entry.bus_formula, factor);

  // One pair of buffers sized for the largest message, reused for every size.
  const std::vector<std::size_t> sizes = message_sizes(cli);
  std::size_t send_bytes = 0, recv_bytes = 0;
  for (std::size_t b : sizes) {
    const bench_shape s = entry.shape(b, elem, nranks, rank);
    send_bytes = std::max(send_bytes, s.send_count * elem);
    recv_bytes = std::max(recv_bytes, s.recv_count * elem);
  }
  aligned_buffer send(send_bytes), recv(recv_bytes);

  const bench_context ctx{comm, mpi, cli.cfg};
  table_printer printer(stdout, info);
  if (table) printer.header();

  std::vector<size_result> rows;
  for (std::size_t bytes : sizes) {
    size_result row;
    row.shape = entry.shape(bytes, elem, nranks, rank);
    if (row.shape.total == 0) {
      if (table) printer.skipped(bytes);
      continue;
    }
    const bench_buffers bufs{send.get(), recv.get(), row.shape};
    auto run_once = [&] { entry.run(ctx, bufs); };
    auto base_once = [&] { entry.run_baseline(ctx, bufs); };

    entry.fill(ctx, bufs);
    for (int k = 0; k < cli.warmup; ++k) {
      run_once();
      if (baseline) base_once();
    }
    // Interleaved: rep k of ringflow, then rep k of the baseline, so slow
    // phases of a shared machine hit both sides alike.
    for (int k = 0; k < cli.reps; ++k) {
      row.ringflow.time.reps_us.push_back(timed_rep(mpi, cli.iters, run_once));
      if (baseline) row.baseline.time.reps_us.push_back(timed_rep(mpi, cli.iters, base_once));
    }
    // The check runs on fresh inputs and poisoned outputs, after timing.
    if (cli.check) {
      entry.fill(ctx, bufs);
      run_once();
      row.ringflow.wrong = total_wrong(mpi, entry.count_wrong(ctx, bufs));
      if (baseline) {
        entry.fill(ctx, bufs);
        base_once();
        row.baseline.wrong = total_wrong(mpi, entry.count_wrong(ctx, bufs));
      }
    }
    finish_side(row.ringflow, row.shape.bytes, factor);
    if (baseline) {
      row.has_baseline = true;
      finish_side(row.baseline, row.shape.bytes, factor);
      row.ratio = row.baseline.busbw > 0 ? row.ringflow.busbw / row.baseline.busbw : 0.0;
      // Rep k of each side ran back to back, so their quotient cancels slow
      // drifts in machine load better than the quotient of the medians.
      std::vector<double> pairs;
      for (int k = 0; k < cli.reps; ++k) {
        const double rf = row.ringflow.time.reps_us[static_cast<std::size_t>(k)];
        const double mp = row.baseline.time.reps_us[static_cast<std::size_t>(k)];
        if (rf > 0) pairs.push_back(mp / rf);
      }
      row.paired_ratio = median(std::move(pairs));
    }
    if (table) printer.row(row);
    rows.push_back(std::move(row));
  }
  if (table) printer.footer(rows);
  if (csv != nullptr) {
    write_csv(csv, info, rows);
    if (csv != stdout) std::fclose(csv);
  }
  if (json != nullptr) {
    write_json(json, info, rows);
    if (json != stdout) std::fclose(json);
  }
  const bool any_wrong = std::any_of(rows.begin(), rows.end(),
                                     [](const size_result& r) { return r.ringflow.wrong != 0; });
  return any_wrong ? 1 : 0;
}

}  // namespace
}  // namespace ringflow::bench

int main(int argc, char** argv) {
  using namespace ringflow::bench;
  ringflow::mpi::environment env(argc, argv);
  int status = 0;
  {
    const ringflow::communicator comm = ringflow::mpi::world();
    const MPI_Comm mpi = ringflow::mpi::native_handle(comm);
    const int rank = comm.rank();
    try {
      // Every rank parses the same argv, so a bad flag stops all of them
      // before any communication: no rank is left waiting.
      bench_cli cli = parse_cli(argc, argv);
      if (cli.help) {
        if (rank == 0) std::fputs(usage_text().c_str(), stdout);
        return 0;
      }
      // --ring-order: the same run on a permuted copy of the world.
      ringflow::communicator ring = comm;
      if (cli.ring_order != "identity") {
        MPI_Comm split = permuted_comm(mpi, cli.ring_order);
        ring = ringflow::mpi::from_comm(split);  // a duplicate: ours can go
        MPI_Comm_free(&split);
      }
      const MPI_Comm ring_mpi = ringflow::mpi::native_handle(ring);
      if (cli.ring_order != "identity" && ring.rank() == 0 && cli.csv_path != "-" &&
          cli.json_path != "-") {
        std::printf("# ring order %s\n", describe_ring_order(cli.ring_order, ring.size()).c_str());
      }
      if (cli.calibrate) {
        status = run_calibration(ring, ring_mpi, cli);
      } else {
        const collective_entry& entry = resolve(cli, ring.size());
        status = cli.tune            ? run_tuning(ring, ring_mpi, cli, entry)
                 : cli.algo == "all" ? run_algo_sweep(ring, ring_mpi, cli, entry)
                                     : run_bench(ring, ring_mpi, cli, entry);
      }
    } catch (const bad_flag& e) {
      if (rank == 0 && e.what()[0] != '\0') ringflow::tool_flags::report("ringflow-bench", e);
      status = ringflow::tool_flags::bad_flag_status;
    } catch (const std::exception& e) {
      // A failure inside a collective may leave peers waiting: end the job.
      ringflow::mpi::abort(1, e.what());
    }
  }
  return status;
}
