// ringflow-bench --algo all: every allreduce algorithm, auto and MPI_Allreduce
// at each size, interleaved rep by rep (a fresh shuffled order each rep), so slow
// phases of a shared machine hit all of them alike; medians, p99, min, max.
// ringflow-bench --tune: the same loop over the algorithms automatic may
// pick, saved as this rank count's and layout's tuning table.
#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "gloo_peer.hpp"
#include "modes.hpp"
#include "ringflow/backends/shm.hpp"
#include "ringflow/coll/algorithms.hpp"
#include "ringflow/coll/context.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/explain.hpp"
#include "ringflow/coll/tuning.hpp"

namespace ringflow::bench {
namespace {

struct contender {
  std::string name;
  algo algorithm = algo::ring;
  bool fixed = true;  // a fixed ringflow algorithm (auto and mpi are not)
  bool mpi = false;   // MPI_Allreduce
  std::vector<double> reps_us;
  double median_us = 0, p99_us = 0, min_us = 0, max_us = 0;
  std::size_t wrong = 0;
};

// Where automatic's choice came from, for the table's "from" column.
const char* from_label(const explanation& e) {
  return e.from_table ? "table" : e.from_first_use ? "first" : "model";
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<std::size_t>(pos);
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

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

// Column labels: the algorithm table's (coll/algorithms.hpp), and Gloo's
// one long name shortened.
std::string label(std::string_view name) {
  for (const algorithm_info& info : allreduce_algorithms()) {
    if (name == info.name) return std::string(info.label);
  }
  if (name == "gloo_ring_chunked") return "gloo_rchnk";
  return std::string(name);
}

std::string human(std::size_t b) {
  if (b >= (1u << 20) && b % (1u << 20) == 0) return fmt::format("{}M", b >> 20);
  if (b >= 1024 && b % 1024 == 0) return fmt::format("{}K", b >> 10);
  return fmt::format("{}", b);
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32] = {};
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

// Rank 0, --tune: merges `table` into the tuning file; false (and a message
// on stderr) when that fails. An unreadable existing file is not
// overwritten: it may be something else.
bool save_table(const tuning_table& table) {
  const std::string path = tuning_path();
  try {
    std::optional<tuning_file> file = read_tuning_file(path);
    if (file && file->machine != tuning_host()) {
      std::fprintf(stderr,
                   "ringflow-bench: --tune: %s holds tables of machine '%s', this is '%s'; set "
                   "RINGFLOW_TUNING to another file\n",
                   path.c_str(), file->machine.c_str(), tuning_host().c_str());
      return false;
    }
    if (!file) {
      file.emplace();
      file->machine = tuning_host();
    }
    cluster_shape shape;
    shape.ranks = table.ranks, shape.nodes = table.nodes,
    shape.ranks_per_node = table.ranks_per_node;
    const tuning_table* old = file->find(shape);
    const tuning_table merged = old != nullptr ? merge_sessions(*old, table) : table;
    const bool averaged = merged.sessions > 1;
    file->put(merged);
    save_tuning_file(*file, path);
    fmt::print(
        "# saved the table for {} ranks ({} node{} x {}) to {} ({}; RINGFLOW_TUNING "
        "overrides the path; {} table{} in the file)\n",
        table.ranks, table.nodes, table.nodes == 1 ? "" : "s", table.ranks_per_node, path,
        averaged         ? fmt::format("averaged with the {} earlier session{} of these sizes",
                                       merged.sessions - 1, merged.sessions == 2 ? "" : "s")
        : old != nullptr ? "replacing the earlier table, measured at other sizes"
                         : "new",
        file->tables.size(), file->tables.size() == 1 ? "" : "s");
    std::string bests;
    for (const auto& r : merged.rows) {
      bests += fmt::format(" {}:{}", human(r.bytes), label(algo_name(r.best)));
    }
    fmt::print("# best in the saved table ({} session{}):{}\n", merged.sessions,
               merged.sessions == 1 ? "" : "s", bests);

    return true;
  } catch (const std::exception& e) {
    std::fprintf(stderr,
                 "ringflow-bench: --tune: %s\n(move the file away or set RINGFLOW_TUNING)\n",
                 e.what());
    return false;
  }
}

// Iterations per repetition for --tune: -n for small messages, fewer for
// large ones (about 8 MiB per repetition), so a sweep to 64 MiB stays short.
int tune_iters(const bench_cli& cli, std::size_t bytes) {
  const std::size_t budget = std::size_t{8} << 20;
  return static_cast<int>(std::clamp<std::size_t>(budget / std::max<std::size_t>(bytes, 1), 1,
                                                  static_cast<std::size_t>(cli.iters)));
}

int sweep(const communicator& comm, MPI_Comm mpi, const bench_cli& cli,
          const collective_entry& entry, bool tune) {
  const int rank = comm.rank(), nranks = comm.size();
  if (entry.name != "allreduce") {
    throw bad_flag(tune ? "--tune is available for --coll allreduce only"
                        : "--algo all is available for --coll allreduce only");
  }
  if (tune && nranks < 2) throw bad_flag("--tune needs at least 2 ranks (mpirun -np 2 or more)");
  if (tune && tuning_path().empty()) {
    throw bad_flag("--tune: RINGFLOW_TUNING=off; set it to the file to write (or unset it)");
  }
  const explanation shape = explain(comm, 0);
  // shm when the shape allows it and its segment can be set up (collective).
  const bool shm_ok = shape.shape.shm && shm::usable(comm);
  std::vector<contender> who;
  // Every algorithm automatic may pick here (the table's, in its order,
  // the ring first as the reference column).
  std::vector<algo> fixed{algo::ring};
  for (const algorithm_info& info : allreduce_algorithms()) {
    if (info.id != algo::ring) fixed.push_back(info.id);
  }
  for (algo a : fixed) {
    if (!automatic_candidate(a, shape.shape)) continue;  // one level only, or no shm
    if (a == algo::shm && !shm_ok) continue;
    who.push_back({std::string(algo_name(a)), a, true, false, {}, 0, 0, 0, 0, 0});
  }
  if (!tune) {
    who.push_back({"auto", algo::automatic, false, false, {}, 0, 0, 0, 0, 0});
    if (mpi_datatype(cli.cfg.type) != MPI_DATATYPE_NULL) {
      who.push_back({"mpi", algo::native, false, true, {}, 0, 0, 0, 0, 0});
    }
  }
  // Gloo's allreduces as peers (float sum only; none when built without
  // Gloo; not in --tune: automatic cannot pick them).
  std::optional<gloo_peer> gloo;
  if (!tune && cli.gloo) {
    gloo.emplace(mpi, cli.cfg.type, cli.cfg.op);
    for (const auto& name : gloo->names()) {
      who.push_back({name, algo::native, false, false, {}, 0, 0, 0, 0, 0});
    }
  }

  const std::size_t elem = dtype_size(cli.cfg.type);
  const std::vector<std::size_t> sizes = message_sizes(cli);
  const std::size_t max_bytes = sizes.empty() ? elem : sizes.back();
  auto alloc = [](std::size_t bytes) {
    return std::unique_ptr<void, decltype(&std::free)>(
        std::aligned_alloc(4096, std::max<std::size_t>(4096, (bytes + 4095) / 4096 * 4096)),
        &std::free);
  };
  auto send = alloc(max_bytes), recv = alloc(max_bytes);

  std::FILE* csv = nullptr;
  if (rank == 0 && !cli.csv_path.empty()) {
    csv = cli.csv_path == "-" ? stdout : std::fopen(cli.csv_path.c_str(), "w");
    if (csv == nullptr)
      std::fprintf(stderr, "ringflow-bench: cannot write %s\n", cli.csv_path.c_str());
  }
  const bool table = rank == 0 && cli.csv_path != "-";
  // Whether a table applies, asked at the first size (0 bytes is outside
  // every table); collective, so on every rank.
  const explanation first = explain(comm, sizes.empty() ? 0 : sizes.front(), cli.cfg.type);
  if (table) {
    fmt::print(
        "# ringflow-bench allreduce {}: {} ranks, {}, {} {}, median of {} reps x {} "
        "iters{} ({} order), times in us\n",
        tune ? "--tune" : "--algo all", nranks,
        fmt::format("{} node{} x {}{}", shape.shape.nodes, shape.shape.nodes == 1 ? "" : "s",
                    shape.shape.ranks_per_node,
                    shape.shape.cores_per_node > 0
                        ? fmt::format(" on {} cores", shape.shape.cores_per_node)
                        : ""),
        dtype_name(cli.cfg.type), op_name(cli.cfg.op), cli.reps, cli.iters,
        tune ? " (fewer from 1 MiB: ~8 MiB per rep; rep-major over sizes)" : "",
        tune ? "rotating" : "shuffled");
    if (tune) {
      fmt::print("# tuning file: {}\n", tuning_path());
    } else {
      fmt::print("# auto: {}\n",
                 first.from_table
                     ? fmt::format("tuning table {} where it covers the size, else cost model {}",
                                   first.table_origin, first.model_origin)
                     : fmt::format("cost model {}{}", first.model_origin,
                                   first.table_note.empty() ? "" : "; " + first.table_note));
    }
    if (gloo && !gloo->skip_reason().empty()) {
      fmt::print("# gloo: not run: {}\n", gloo->skip_reason());
    }
    std::string head = fmt::format("{:>8}", "size");
    for (const auto& c : who) head += fmt::format(" {:>10}", label(c.name));
    head += fmt::format("  {:>12}", "best");
    if (!tune) {
      head +=
          fmt::format(" {:>12} {:>6} {:>9} {:>16}", "auto picks", "from", "auto/best", "first use");
    }
    fmt::print("{}\n", head);
  }
  if (csv != nullptr) {
    fmt::print(csv,
               "bytes,algo,ranks,nodes,median_us,p99_us,min_us,max_us,busbw_GBs,wrong,"
               "auto_choice,best_fixed,auto_from,first_use_calls,first_use_ms\n");
  }

  bench_config cfg = cli.cfg;
  const bench_context ctx{comm, mpi, cfg};
  int status = 0;
  tuning_table tuned;
  tuned.ranks = nranks;
  tuned.nodes = shape.shape.nodes;
  tuned.ranks_per_node = shape.shape.ranks_per_node;
  tuned.cores_per_node = shape.shape.cores_per_node;
  tuned.dtype = std::string(dtype_name(cli.cfg.type));
  tuned.op = std::string(op_name(cli.cfg.op));
  tuned.reps = cli.reps;
  tuned.tuned_at = utc_now();
  // One call of contender c on the buffers of one size.
  auto run_on = [&](contender& c, const bench_buffers& bufs) {
    if (gloo && gloo->runs(c.name)) {
      gloo->run(c.name, bufs);
    } else if (c.mpi) {
      entry.run_baseline(ctx, bufs);
    } else {
      cfg.algorithm = c.algorithm;
      entry.run(ctx, bufs);
    }
  };
  // --tune measures rep-major (rep k of every size, then rep k+1): a burst
  // of load from other jobs then spoils a few reps of every size, which the
  // median drops, instead of every rep of a few neighbouring sizes, which
  // would put a wrong winner in the table there. (--algo all stays
  // size-major: Gloo's algorithms are rebuilt per size.)
  std::vector<std::vector<std::vector<double>>> tuned_reps;  // [size][contender]
  if (tune) {
    tuned_reps.assign(sizes.size(), std::vector<std::vector<double>>(who.size()));
    // Inputs do not depend on the size (element i is the same at every
    // size), so one fill of the largest serves every size's timing.
    entry.fill(ctx,
               bench_buffers{send.get(), recv.get(), entry.shape(max_bytes, elem, nranks, rank)});
    for (int k = -1; k < cli.reps; ++k) {  // k = -1: warmup
      for (std::size_t si = 0; si < sizes.size(); ++si) {
        const bench_shape s = entry.shape(sizes[si], elem, nranks, rank);
        if (s.total == 0) continue;
        const bench_buffers bufs{send.get(), recv.get(), s};
        const int iters = tune_iters(cli, sizes[si]);
        for (std::size_t j = 0; j < who.size(); ++j) {
          const std::size_t ci = (j + si + static_cast<std::size_t>(k + 1)) % who.size();
          contender& c = who[ci];
          if (k < 0) {
            for (int w = 0; w < cli.warmup; ++w) run_on(c, bufs);
          } else {
            tuned_reps[si][ci].push_back(timed_rep(mpi, iters, [&] { run_on(c, bufs); }));
          }
        }
      }
    }
  }
  int first_calls = 0;  // auto's first-use trials at this size
  double first_ms = 0;  // and their time on rank 0
  for (std::size_t si = 0; si < sizes.size(); ++si) {
    const std::size_t bytes = sizes[si];
    const bench_shape s = entry.shape(bytes, elem, nranks, rank);
    if (s.total == 0) continue;
    const bench_buffers bufs{send.get(), recv.get(), s};
    auto run = [&](contender& c) { run_on(c, bufs); };
    if (tune) {
      for (std::size_t ci = 0; ci < who.size(); ++ci) who[ci].reps_us = tuned_reps[si][ci];
    } else {
      if (gloo) gloo->prepare(bufs);
      entry.fill(ctx, bufs);
      // auto first: where first-use tuning decides this size, its trials
      // (the first few dozen calls) run before the warmup, so the timed reps
      // show what auto runs afterwards; the table reports what the trials
      // cost. The count is a pure function of the call history, the same
      // on every rank.
      first_calls = 0;
      first_ms = 0;
      for (auto& c : who) {
        if (c.name != "auto") continue;
        const double t0 = MPI_Wtime();
        while (first_calls < 100000 && detail::automatic_calls_left(comm, s.total * elem) != 0) {
          run(c);
          ++first_calls;
        }
        first_ms = (MPI_Wtime() - t0) * 1e3;
      }
      for (auto& c : who) {
        c.reps_us.clear();
        for (int k = 0; k < cli.warmup; ++k) run(c);
      }
      // A fresh order every rep (the same on every rank: a fixed seed per
      // size and rep): a plain rotation keeps each contender's predecessor
      // fixed, and what runs just before matters (shm's 16 MiB segment
      // leaves the caches cold for whoever follows it: the ring measured
      // 10-30% slower right after shm than right after MPI_Allreduce).
      std::vector<std::size_t> order(who.size());
      for (int k = 0; k < cli.reps; ++k) {
        for (std::size_t j = 0; j < order.size(); ++j) order[j] = j;
        std::mt19937 gen(static_cast<std::uint32_t>(1000003u * si + static_cast<std::uint32_t>(k)));
        std::shuffle(order.begin(), order.end(), gen);
        for (std::size_t j : order) {
          contender& c = who[j];
          c.reps_us.push_back(timed_rep(mpi, cli.iters, [&] { run(c); }));
        }
      }
    }
    for (auto& c : who) {
      c.median_us = percentile(c.reps_us, 0.5);
      c.p99_us = percentile(c.reps_us, 0.99);
      c.min_us = *std::min_element(c.reps_us.begin(), c.reps_us.end());
      c.max_us = *std::max_element(c.reps_us.begin(), c.reps_us.end());
      c.wrong = 0;
      if (cli.check || tune) {  // a wrong algorithm must never be tuned in
        entry.fill(ctx, bufs);
        run(c);
        unsigned long long mine = entry.count_wrong(ctx, bufs), all = 0;
        MPI_Allreduce(&mine, &all, 1, MPI_UNSIGNED_LONG_LONG, MPI_SUM, mpi);
        c.wrong = static_cast<std::size_t>(all);
        if (all != 0) status = 1;
      }
    }
    const explanation e = explain(comm, s.total * elem, cli.cfg.type);
    const contender* best = nullptr;
    const contender* automatic = nullptr;
    for (const auto& c : who) {
      if (c.fixed && c.wrong == 0 && (best == nullptr || c.median_us < best->median_us)) best = &c;
      if (c.name == "auto") automatic = &c;
    }
    if (best == nullptr) continue;  // every algorithm wrong: reported by the status
    if (tune) {
      tuning_row row;
      row.bytes = s.total * elem;
      row.best = best->algorithm;
      for (const auto& c : who) {
        if (c.wrong == 0) row.median.push_back({c.algorithm, c.median_us * 1e-6});
      }
      tuned.rows.push_back(std::move(row));
    }
    const double ratio = automatic != nullptr ? automatic->median_us / best->median_us : 0.0;
    if (table) {
      std::string line = fmt::format("{:>8}", human(s.total * elem));
      for (const auto& c : who) {
        line += fmt::format(" {:>10.1f}{}", c.median_us, c.wrong ? "!" : "");
      }
      line += fmt::format("  {:>12}", label(best->name));
      if (!tune) {
        line += fmt::format(
            " {:>12} {:>6} {:>9.3f} {:>16}", label(algo_name(e.choice)), from_label(e), ratio,
            first_calls > 0 ? fmt::format("{} calls {:.1f} ms", first_calls, first_ms) : "-");
      }
      fmt::print("{}\n", line);
      std::fflush(stdout);
    }
    if (csv != nullptr) {
      const double factor = entry.bus_factor(nranks);
      for (const auto& c : who) {
        fmt::print(csv, "{},{},{},{},{:.2f},{:.2f},{:.2f},{:.2f},{:.3f},{},{},{},{},{},{:.3f}\n",
                   s.total * elem, c.name, nranks, e.shape.nodes, c.median_us, c.p99_us, c.min_us,
                   c.max_us,
                   c.median_us > 0
                       ? static_cast<double>(s.total * elem) / c.median_us / 1e3 * factor
                       : 0.0,
                   c.wrong, algo_name(e.choice), best->name, from_label(e), first_calls, first_ms);
      }
      std::fflush(csv);
    }
  }
  if (table && !tune) {
    fmt::print(
        "# auto/best: auto's median over the best fixed ringflow algorithm's median at that "
        "size; from: auto's choice came from the tuning table, first-use tuning (first) or "
        "the cost model; first use: the allreduces auto spent trying candidates at that "
        "size before the timed reps, and their time ('!' marks wrong results)\n");
  }
  if (csv != nullptr && csv != stdout) std::fclose(csv);
  if (tune) {
    int ok = 1;
    if (rank == 0) {
      if (tuned.rows.empty()) {
        std::fprintf(stderr, "ringflow-bench: --tune: nothing measured, nothing saved\n");
        ok = 0;
      } else {
        ok = save_table(tuned) ? 1 : 0;
      }
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, mpi);
    if (!ok) status = 1;
  }
  return status;
}

}  // namespace

int run_algo_sweep(const communicator& comm, MPI_Comm mpi, const bench_cli& cli,
                   const collective_entry& entry) {
  return sweep(comm, mpi, cli, entry, false);
}

int run_tuning(const communicator& comm, MPI_Comm mpi, const bench_cli& cli,
               const collective_entry& entry) {
  return sweep(comm, mpi, cli, entry, true);
}

}  // namespace ringflow::bench
