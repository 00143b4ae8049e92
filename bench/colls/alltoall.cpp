// ringflow-bench entry for alltoall (auto, pairwise, bruck); baseline MPI_Alltoall.
#include <mpi.h>

#include <span>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

// As in nccl-tests: the size is each rank's whole send buffer, rounded down
// to equal blocks; the count column is the block (elements per peer).
bench_shape alltoall_shape(std::size_t bytes, std::size_t elem_size, int nranks, int /*rank*/) {
  const std::size_t block = bytes / elem_size / static_cast<std::size_t>(nranks);
  const std::size_t total = block * static_cast<std::size_t>(nranks);
  return {total * elem_size, block, total, total, total};
}

// nccl-tests' factor: (n-1)/n of the data crosses the links.
double alltoall_bus_factor(int nranks) { return double(nranks - 1) / nranks; }

// Block q of rank r's input is what r sends q; input_value is indexed by the
// position in the whole (p x p blocks) exchange, so a misplaced block shows.
std::size_t alltoall_index(std::size_t block, int from, int to, std::size_t j, int nranks) {
  return (static_cast<std::size_t>(from) * static_cast<std::size_t>(nranks) +
          static_cast<std::size_t>(to)) *
             block +
         j;
}

void alltoall_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    const int p = ctx.comm.size(), r = ctx.comm.rank();
    for (int q = 0; q < p; ++q) {
      for (std::size_t j = 0; j < b.shape.count; ++j) {
        in[static_cast<std::size_t>(q) * b.shape.count + j] =
            input_value<T>(op_kind::sum, r, alltoall_index(b.shape.count, r, q, j, p));
      }
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

alltoall_algo alltoall_choice(const bench_config& cfg) {
  if (cfg.algo_name == "pairwise") return alltoall_algo::pairwise;
  if (cfg.algo_name == "bruck") return alltoall_algo::bruck;
  return alltoall_algo::automatic;
}

void alltoall_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    alltoall<T>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.send_count),
                std::span<T>(static_cast<T*>(b.recv), b.shape.recv_count),
                alltoall_options{alltoall_choice(ctx.cfg)});
  });
}

void alltoall_baseline(const bench_context& ctx, const bench_buffers& b) {
  const MPI_Datatype t = mpi_datatype(ctx.cfg.type);
  const int n = static_cast<int>(b.shape.count);
  MPI_Alltoall(b.send, n, t, b.recv, n, t, ctx.mpi);
}

std::size_t alltoall_wrong(const bench_context& ctx, const bench_buffers& b) {
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    const auto* out = static_cast<const T*>(b.recv);
    const int p = ctx.comm.size(), r = ctx.comm.rank();
    std::size_t wrong = 0;
    for (int q = 0; q < p; ++q) {
      for (std::size_t j = 0; j < b.shape.count; ++j) {
        wrong +=
            !same_value(out[static_cast<std::size_t>(q) * b.shape.count + j],
                        input_value<T>(op_kind::sum, q, alltoall_index(b.shape.count, q, r, j, p)));
      }
    }
    return wrong;
  });
}

collective_entry make_alltoall() {
  collective_entry e;
  e.name = "alltoall";
  e.algos = {"auto", "pairwise", "bruck"};
  e.baseline = "MPI_Alltoall";
  e.uses_op = false;
  e.shape = alltoall_shape;
  e.bus_formula = "(n-1)/n";
  e.bus_factor = alltoall_bus_factor;
  e.fill = alltoall_fill;
  e.run = alltoall_run;
  e.run_baseline = alltoall_baseline;
  e.count_wrong = alltoall_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_alltoall())
