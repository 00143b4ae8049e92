// recommend_clicks: a click-through model (a 100000 x 16 embedding table + MLP) trained
// data-parallel on a synthetic click log; the table's gradients are sparse rows.
//
//   mpirun -np 2 build/bin/recommend_clicks                      # sparse reduction
//   mpirun -np 2 build/bin/recommend_clicks --reduction dense    # the same model, dense table
//   grads
//   mpirun -np 3 build/bin/recommend_clicks --ps 1               # 1 parameter server, 2 workers:
//                                                                # pushes and pulls only the rows
//                                                                used
//
// Every sample has --fields categorical ids (field f owns rows [f R/F, (f+1) R/F)
// of the shared table, drawn from a power law so a few ids are common), and a
// click drawn with probability sigmoid(sum of hidden per-id weights): the log is a
// pure function of --seed and the sample number, so each rank generates its own
// slice of every global batch. Rank 0 prints the loss and the held-out AUC and
// accuracy every --report steps, then the bytes this rank sent per step: the
// sparse_allreduce of the touched rows against the dense allreduce of the table.
// The last line on stdout is auc=<value>.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/backends/mpi.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/core/log.hpp>
#include <ringflow/ps/parameter_server.hpp>
#include <ringflow/train/data_parallel.hpp>

namespace ad = ringflow::ad;
namespace rt = ringflow::train;
namespace ps = ringflow::ps;
using ringflow::tool_flags::bad_flag;

namespace {

struct options {
  std::int64_t rows = 100000;
  ad::index dim = 16;
  ad::index fields = 8;
  ad::index hidden = 64;
  std::size_t batch = 512;  // global
  int steps = 300;
  int report = 100;
  double lr = 0.01;
  std::string optimizer = "adamw";
  std::string reduction = "sparse";
  std::uint64_t seed = 42;
  std::size_t eval = 8192;
  int ps_servers = 0;  // 0: data parallel; S: S dedicated parameter servers (sync)
};

void print_help() {
  std::printf(
      "recommend_clicks: data-parallel click-through training with a sparse embedding table.\n"
      "\n"
      "Usage: mpirun -np N recommend_clicks [flags]   (--flag value or --flag=value)\n"
      "  --rows N          embedding table rows (default 100000)\n"
      "  --dim N           embedding width (default 16)\n"
      "  --fields N        categorical ids per sample (default 8)\n"
      "  --hidden N        hidden width of the MLP on the concatenated embeddings (default 64)\n"
      "  --batch N         GLOBAL batch, a multiple of the rank count (default 512)\n"
      "  --steps N         training steps (default 300)\n"
      "  --report N        print loss and held-out AUC every N steps (default 100)\n"
      "  --lr X            learning rate (default 0.01)\n"
      "  --optimizer NAME  adamw (lazy on the table: touched rows only) or sgd (default adamw)\n"
      "  --reduction MODE  sparse (the table's touched rows, sparse_allreduce) or dense (a dense\n"
      "                    table gradient in the bucketed allreduce) (default sparse)\n"
      "  --seed N          seed of the click log and the weights (default 42)\n"
      "  --eval N          held-out samples for AUC and accuracy (default 8192)\n"
      "  --ps S            train through S dedicated parameter servers (ranks 0..S-1, sync)\n"
      "                    instead of data parallel; with sparse reduction the workers push\n"
      "                    and pull only the table rows their batch uses (default: off)\n"
      "  --help            this text\n"
      "\n"
      "The last line on stdout is auc=<value>.\n");
}

std::optional<options> parse_args(int argc, char** argv) {
  options o;
  ringflow::tool_flags::reader flags(argc, argv);
  while (flags.next()) {
    const std::string& arg = flags.flag();
    if (flags.is("--help", "-h")) {
      return std::nullopt;
    } else if (arg == "--rows") {
      o.rows = flags.integer(1, 1LL << 26);
    } else if (arg == "--dim") {
      o.dim = static_cast<ad::index>(flags.integer(1, 1024));
    } else if (arg == "--fields") {
      o.fields = static_cast<ad::index>(flags.integer(1, 256));
    } else if (arg == "--hidden") {
      o.hidden = static_cast<ad::index>(flags.integer(1, 1 << 14));
    } else if (arg == "--batch") {
      o.batch = static_cast<std::size_t>(flags.integer(1, 1 << 20));
    } else if (arg == "--steps") {
      o.steps = static_cast<int>(flags.integer(0, 10000000));
    } else if (arg == "--report") {
      o.report = static_cast<int>(flags.integer(1, 10000000));
    } else if (arg == "--lr") {
      o.lr = flags.number(0, 10, /*lo_open=*/true);
    } else if (arg == "--optimizer") {
      o.optimizer = flags.value();
      if (o.optimizer != "adamw" && o.optimizer != "sgd") {
        throw bad_flag(fmt::format("--optimizer expects adamw or sgd, got '{}'", o.optimizer));
      }
    } else if (arg == "--reduction") {
      o.reduction = flags.value();
      if (o.reduction != "sparse" && o.reduction != "dense") {
        throw bad_flag(fmt::format("--reduction expects sparse or dense, got '{}'", o.reduction));
      }
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint64_t>(flags.integer(0, INT64_MAX));
    } else if (arg == "--eval") {
      o.eval = static_cast<std::size_t>(flags.integer(1, 1 << 24));
    } else if (arg == "--ps") {
      o.ps_servers = static_cast<int>(flags.integer(1, 4096));
    } else {
      flags.unknown();
    }
  }
  if (o.rows < o.fields) {
    throw bad_flag(fmt::format("--rows {} must be at least --fields {} (each field owns rows)",
                               o.rows, o.fields));
  }
  return o;
}

// splitmix64: the click log's only source of randomness.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
double unit(std::uint64_t x) { return static_cast<double>(x >> 11) / 9007199254740992.0; }

// The synthetic click log: sample i's ids and click, from (seed, i) alone.
struct click_log {
  const options& o;
  std::int64_t per_field() const { return o.rows / o.fields; }
  std::int64_t id(std::uint64_t sample, ad::index f) const {
    const double u = unit(mix(o.seed ^ mix(sample * 131 + static_cast<std::uint64_t>(f))));
    // Power law: P(rank < k) = (k / n)^(1/4), so a few hundred ids cover half the traffic.
    const auto k = static_cast<std::int64_t>(static_cast<double>(per_field()) * std::pow(u, 4.0));
    return f * per_field() + std::min(k, per_field() - 1);
  }
  // Hidden per-id effect, roughly N(0, 1) (sum of 4 uniforms, centred).
  double effect(std::int64_t row) const {
    double s = 0;
    for (int j = 0; j < 4; ++j)
      s += unit(mix(o.seed * 7 + static_cast<std::uint64_t>(row) * 4 + j));
    return (s - 2.0) * std::sqrt(3.0);
  }
  int click(std::uint64_t sample, const std::vector<std::int64_t>& ids) const {
    double logit = -0.5;
    for (const auto id : ids)
      logit += effect(id) / std::sqrt(static_cast<double>(ids.size())) * 1.5;
    const double p = 1.0 / (1.0 + std::exp(-logit));
    return unit(mix(o.seed ^ 0x5ca1ab1eull ^ mix(sample))) < p ? 1 : 0;
  }
  // Samples [first, first + n): ids row-major [n, fields] and clicks.
  void fill(std::uint64_t first, std::size_t n, std::vector<std::int64_t>& ids,
            std::vector<int>& clicks) const {
    ids.clear();
    clicks.clear();
    std::vector<std::int64_t> one(static_cast<std::size_t>(o.fields));
    for (std::size_t s = 0; s < n; ++s) {
      for (ad::index f = 0; f < o.fields; ++f) one[static_cast<std::size_t>(f)] = id(first + s, f);
      ids.insert(ids.end(), one.begin(), one.end());
      clicks.push_back(click(first + s, one));
    }
  }
};

struct click_model {
  ad::embedding table;
  ad::mlp head;
  click_model(const options& o, int rank)
      : table(o.rows, o.dim, o.seed,
              {.sparse = o.reduction == "sparse", .init_std = 0.05, .rank = rank}),
        head({o.fields * o.dim, o.hidden, 2}, ad::activation::relu, o.seed + 1) {}
  ad::tensor logits(const std::vector<std::int64_t>& ids, ad::index fields) {
    return head(table.lookup(ids, fields));
  }
};

// The model's parameters in one store: table first, then the MLP.
ad::parameter_store<float> pack(click_model& m) {
  ad::named_parameters<float> all;
  m.table.collect_parameters(all, "table.");
  m.head.collect_parameters(all, "head.");
  ad::parameter_store<float> store;
  store.pack(all);
  return store;
}

// Area under the ROC curve of scores against 0/1 labels (ties count one half).
double auc(const std::vector<float>& score, const std::vector<int>& label) {
  std::vector<std::size_t> order(score.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](auto a, auto b) { return score[a] < score[b]; });
  double rank_sum = 0, pos = 0;
  for (std::size_t i = 0; i < order.size();) {
    std::size_t j = i;
    while (j < order.size() && score[order[j]] == score[order[i]]) ++j;
    const double mid = (static_cast<double>(i + j - 1)) / 2.0 + 1.0;  // 1-based average rank
    for (std::size_t k = i; k < j; ++k) {
      if (label[order[k]] == 1) {
        rank_sum += mid;
        pos += 1;
      }
    }
    i = j;
  }
  const double neg = static_cast<double>(score.size()) - pos;
  if (pos == 0 || neg == 0) return 0.5;
  return (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg);
}

// Held-out AUC of `model` on `clicks` (ids: `fields` per sample), in chunks of
// 1024 samples; `acc` gets the accuracy at threshold 0.5.
double evaluate_clicks(click_model& model, const std::vector<std::int64_t>& ids,
                       const std::vector<int>& clicks, ad::index fields, double& acc) {
  ad::no_grad guard;
  const std::size_t samples = clicks.size(), f = static_cast<std::size_t>(fields);
  std::vector<float> score(samples);
  std::size_t right = 0;
  for (std::size_t s = 0; s < samples; s += 1024) {
    const std::size_t n = std::min<std::size_t>(1024, samples - s);
    std::vector<std::int64_t> chunk(ids.begin() + static_cast<std::ptrdiff_t>(s * f),
                                    ids.begin() + static_cast<std::ptrdiff_t>((s + n) * f));
    auto p = ad::softmax(model.logits(chunk, fields));
    for (std::size_t k = 0; k < n; ++k) {
      score[s + k] = p.data()[k * 2 + 1];
      right += (score[s + k] > 0.5f ? 1 : 0) == clicks[s + k] ? 1u : 0u;
    }
  }
  acc = samples ? static_cast<double>(right) / static_cast<double>(samples) : 0.0;
  return auc(score, clicks);
}

// A progress line: the mean training loss over `comm`'s ranks since the
// last report (the sums are reset), and, on `reporter`, the held-out AUC and
// accuracy. Collective over `comm`.
template <class Evaluate>
void report_step(const ringflow::communicator& comm, int step, double& loss_sum, int& loss_count,
                 bool reporter, Evaluate& evaluate) {
  double mean[2] = {loss_sum, static_cast<double>(loss_count)};
  ringflow::allreduce(comm, std::span<double>(mean, 2), ringflow::sum);
  loss_sum = 0;
  loss_count = 0;
  if (reporter) {
    double acc = 0;
    const double a = evaluate(acc);
    std::printf("step %5d  loss %.4f  held-out auc %.4f  accuracy %.4f\n", step + 1,
                mean[0] / mean[1], a, acc);
    std::fflush(stdout);
  }
}

int train(const options& o, const ringflow::communicator& comm) {
  const int rank = comm.rank(), np = comm.size();
  if (o.batch % static_cast<std::size_t>(np) != 0) {
    throw ringflow::usage_error(
        fmt::format("--batch {} is not a multiple of the {} ranks; use a multiple", o.batch, np));
  }
  const std::size_t local = o.batch / static_cast<std::size_t>(np);
  click_model model(o, rank);
  auto params = pack(model);
  rt::data_parallel dp(comm, params);
  std::optional<ad::adamw> adamw;
  std::optional<ad::sgd> sgd;
  if (o.optimizer == "adamw") {
    adamw.emplace(params, ad::adamw_options{.lr = o.lr, .weight_decay = 0.0});
  } else {
    sgd.emplace(params, ad::sgd_options{.lr = o.lr});
  }
  const click_log log{o};
  // Held-out samples: numbers past anything training reaches.
  const std::uint64_t eval_first = std::uint64_t{1} << 40;
  std::vector<std::int64_t> eval_ids;
  std::vector<int> eval_clicks;
  if (rank == 0) log.fill(eval_first, o.eval, eval_ids, eval_clicks);
  auto evaluate = [&](double& acc) {
    return evaluate_clicks(model, eval_ids, eval_clicks, o.fields, acc);
  };

  if (rank == 0) {
    std::printf(
        "recommend_clicks: %d ranks, table %lld x %lld (%.1f MiB), %lld fields, mlp %lld-%lld-2, "
        "global batch %zu, %s, %s reduction\n",
        np, static_cast<long long>(o.rows), static_cast<long long>(o.dim),
        static_cast<double>(o.rows * o.dim) * 4.0 / (1 << 20), static_cast<long long>(o.fields),
        static_cast<long long>(o.fields * o.dim), static_cast<long long>(o.hidden), o.batch,
        o.optimizer.c_str(), o.reduction.c_str());
    std::fflush(stdout);
  }
  std::vector<std::int64_t> ids;
  std::vector<int> clicks;
  std::uint64_t bytes_total = 0;
  double loss_sum = 0;
  int loss_count = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < o.steps; ++step) {
    // This rank's slice of global batch `step`.
    log.fill(static_cast<std::uint64_t>(step) * o.batch + static_cast<std::uint64_t>(rank) * local,
             local, ids, clicks);
    params.zero_grad();
    auto loss =
        ad::softmax_cross_entropy(model.logits(ids, o.fields), std::span<const int>(clicks));
    dp.backward(loss);
    if (adamw) {
      dp.step(*adamw);
    } else {
      dp.step(*sgd);
    }
    bytes_total += dp.last_step().bytes_sent;
    loss_sum += loss.item();
    ++loss_count;
    if ((step + 1) % o.report == 0 || step + 1 == o.steps) {
      report_step(comm, step, loss_sum, loss_count, rank == 0, evaluate);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // What the dense reduction of the same parameters sends from this rank:
  // the ring allreduce of every bucket, the table included.
  const auto table_floats = static_cast<std::size_t>(o.rows * o.dim);
  std::uint64_t dense_bytes = 0;
  for (const auto& bk :
       rt::plan_buckets(params, rt::default_bucket_cap_bytes, rt::default_first_bucket_cap_bytes)) {
    dense_bytes += rt::ring_bytes_sent(bk.size, sizeof(float), np, rank, true, true);
  }
  if (rank == 0) {
    const double per_step = o.steps > 0 ? static_cast<double>(bytes_total) / o.steps : 0.0;
    std::printf("trained %d steps in %.2f s (%.1f ms/step)\n", o.steps, secs,
                o.steps > 0 ? secs * 1e3 / o.steps : 0.0);
    std::printf(
        "bytes sent per step by rank 0: %.0f with %s reduction; a dense allreduce of all %zu "
        "parameters (%zu in the table) sends %llu (%.1fx %s)\n",
        per_step, o.reduction.c_str(), params.numel(), table_floats,
        static_cast<unsigned long long>(dense_bytes),
        per_step > 0 ? static_cast<double>(dense_bytes) / per_step : 0.0,
        per_step > 0 && per_step < static_cast<double>(dense_bytes) ? "fewer" : "as many");
    double acc = 0;
    const double a = evaluate(acc);
    std::printf("auc=%.4f\n", a);
    std::fflush(stdout);
  }
  return 0;
}

// --ps S: the same model through S dedicated parameter servers (sync: each
// step's update is the average of the workers' gradients, as data parallel).
// Sparse reduction: a worker pulls the dense MLP and only the table rows its
// batch looks up, and pushes the MLP's gradient and only those rows.
int train_ps(const options& o, const ringflow::communicator& comm) {
  const int rank = comm.rank(), np = comm.size();
  const bool sparse = o.reduction == "sparse";
  click_model model(o, rank);
  auto params = pack(model);
  const auto values = params.all_values();
  const auto grads = params.all_grads();
  ps::options po{.mode = ps::consistency::sync, .servers = o.ps_servers};
  if (o.optimizer == "adamw") {
    po.optimizer.type = ps::optimizer_options::kind::adamw;
    po.optimizer.adamw = {.lr = o.lr, .weight_decay = 0.0};
  } else {
    po.optimizer.sgd = {.lr = o.lr, .momentum = 0.0};
  }
  // pack() puts the table first: rows x dim floats from offset 0.
  if (sparse) {
    po.tables = {{.offset = params.at("table.weight").offset,
                  .rows = static_cast<std::size_t>(o.rows),
                  .width = static_cast<std::size_t>(o.dim)}};
  }
  const std::vector<float> initial(values.begin(), values.end());
  ps::node node(comm, initial, po);
  const int W = node.roles().workers();
  if (o.batch % static_cast<std::size_t>(W) != 0) {
    throw ringflow::usage_error(
        fmt::format("--batch {} is not a multiple of the {} workers (ranks - --ps); use a multiple",
                    o.batch, W));
  }
  const std::size_t local = o.batch / static_cast<std::size_t>(W);
  const int reporter = node.roles().worker_rank(0);
  if (rank == 0) {
    std::printf(
        "recommend_clicks: %d ranks (%d parameter server(s), %d workers), table %lld x %lld, %lld "
        "fields, mlp %lld-%lld-2, global batch %zu, %s, %s push/pull\n",
        np, node.roles().servers(), W, static_cast<long long>(o.rows),
        static_cast<long long>(o.dim), static_cast<long long>(o.fields),
        static_cast<long long>(o.fields * o.dim), static_cast<long long>(o.hidden), o.batch,
        o.optimizer.c_str(), sparse ? "sparse" : "dense");
    std::fflush(stdout);
  }
  if (!node.is_worker()) {
    node.serve();
    return 0;
  }
  const click_log log{o};
  const std::uint64_t eval_first = std::uint64_t{1} << 40;
  std::vector<std::int64_t> eval_ids;
  std::vector<int> eval_clicks;
  if (rank == reporter) log.fill(eval_first, o.eval, eval_ids, eval_clicks);
  auto evaluate = [&](double& acc) {
    node.pull(values).wait();  // every row, for the held-out samples
    return evaluate_clicks(model, eval_ids, eval_clicks, o.fields, acc);
  };
  const int w = node.worker_index();
  std::vector<std::int64_t> ids, rows;
  std::vector<int> clicks;
  double loss_sum = 0;
  int loss_count = 0;
  std::uint64_t train_bytes = 0;  // pushes and pulls of training steps (not the evaluations)
  const auto t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < o.steps; ++step) {
    log.fill(static_cast<std::uint64_t>(step) * o.batch + static_cast<std::uint64_t>(w) * local,
             local, ids, clicks);
    const std::uint64_t before = node.bytes_sent();
    if (sparse) {
      rows = ids;
      std::sort(rows.begin(), rows.end());
      rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
      const std::span<const std::int64_t> want(rows);
      node.pull_sparse(values, std::span(&want, 1)).wait();
    } else {
      node.pull(values).wait();
    }
    params.zero_grad();
    auto loss =
        ad::softmax_cross_entropy(model.logits(ids, o.fields), std::span<const int>(clicks));
    loss.backward();
    if (sparse) {
      auto* sg = model.table.weight().sparse_grad();
      sg->coalesce();  // one row per distinct id on the wire
      const ps::table_rows tr{sg->indices, sg->values};
      node.push_sparse(grads, std::span(&tr, 1)).wait();
    } else {
      node.push(grads).wait();
    }
    train_bytes += node.bytes_sent() - before;
    loss_sum += loss.item();
    ++loss_count;
    if ((step + 1) % o.report == 0 || step + 1 == o.steps) {
      report_step(node.workers(), step, loss_sum, loss_count, rank == reporter, evaluate);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (rank == reporter) {
    const double samples = static_cast<double>(o.steps) * static_cast<double>(local);
    // A dense step sends a pull header and a push of the whole buffer to
    // every server.
    const double dense_step = static_cast<double>(params.numel() * sizeof(float)) +
                              2.0 * 24.0 * static_cast<double>(node.roles().servers());
    const double per_sample = samples > 0 ? static_cast<double>(train_bytes) / samples : 0.0;
    const double dense_per_sample = dense_step / static_cast<double>(local);
    std::printf("trained %d steps in %.2f s (%.1f ms/step)\n", o.steps, secs,
                o.steps > 0 ? secs * 1e3 / o.steps : 0.0);
    std::printf(
        "bytes sent per sample by worker rank %d: %.0f with %s push/pull; a dense push of all "
        "%zu parameters sends %.0f (%.1fx %s)\n",
        rank, per_sample, sparse ? "sparse" : "dense", params.numel(), dense_per_sample,
        per_sample > 0 ? dense_per_sample / per_sample : 0.0,
        per_sample > 0 && per_sample < dense_per_sample ? "fewer" : "as many");
    double acc = 0;
    const double a = evaluate(acc);
    std::printf("auc=%.4f\n", a);
    std::fflush(stdout);
  }
  node.finish();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ringflow::mpi::environment env(argc, argv);
  auto comm = ringflow::mpi::world();
  std::optional<options> o;
  try {
    o = parse_args(argc, argv);
  } catch (const bad_flag& e) {
    return comm.rank() == 0 ? ringflow::tool_flags::report("recommend_clicks", e)
                            : ringflow::tool_flags::bad_flag_status;
  }
  if (!o) {
    if (comm.rank() == 0) print_help();
    return 0;
  }
  try {
    return o->ps_servers > 0 ? train_ps(*o, comm) : train(*o, comm);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "recommend_clicks (rank %d): %s\n", comm.rank(), e.what());
    return 1;
  }
}
