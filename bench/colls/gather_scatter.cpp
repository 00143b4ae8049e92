// ringflow-bench entries for gather and scatter (linear, root -r); baselines MPI_Gather,
// MPI_Scatter.
#include <mpi.h>

#include <span>
#include <utility>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

// As in nccl-tests: the size is the root's whole buffer, rounded down to
// equal pieces; the count column is the piece each rank sends or receives.
bench_shape gather_shape(std::size_t bytes, std::size_t elem_size, int nranks, int rank) {
  (void)rank;
  const std::size_t piece = bytes / elem_size / static_cast<std::size_t>(nranks);
  const std::size_t total = piece * static_cast<std::size_t>(nranks);
  // Every rank gets the root's buffer size: -r may name any rank.
  return {total * elem_size, piece, total, piece, total};
}

bench_shape scatter_shape(std::size_t bytes, std::size_t elem_size, int nranks, int rank) {
  bench_shape s = gather_shape(bytes, elem_size, nranks, rank);
  std::swap(s.send_count, s.recv_count);
  return s;
}

double rooted_bus_factor(int nranks) { return double(nranks - 1) / nranks; }

void gather_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    const std::size_t base = static_cast<std::size_t>(ctx.comm.rank()) * b.shape.count;
    for (std::size_t j = 0; j < b.shape.count; ++j) {
      in[j] = input_value<T>(op_kind::sum, ctx.comm.rank(), base + j);
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void gather_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    gather<T>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.count),
              std::span<T>(static_cast<T*>(b.recv), b.shape.total), ctx.cfg.root);
  });
}

void gather_baseline(const bench_context& ctx, const bench_buffers& b) {
  const MPI_Datatype t = mpi_datatype(ctx.cfg.type);
  const int n = static_cast<int>(b.shape.count);
  MPI_Gather(b.send, n, t, b.recv, n, t, ctx.cfg.root, ctx.mpi);
}

std::size_t gather_wrong(const bench_context& ctx, const bench_buffers& b) {
  if (ctx.comm.rank() != ctx.cfg.root) return 0;
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    const auto* out = static_cast<const T*>(b.recv);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < b.shape.total; ++i) {
      const int owner = static_cast<int>(i / b.shape.count);
      wrong += !same_value(out[i], input_value<T>(op_kind::sum, owner, i));
    }
    return wrong;
  });
}

void scatter_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    for (std::size_t i = 0; i < b.shape.total; ++i) {
      in[i] = input_value<T>(op_kind::sum, ctx.cfg.root, i);
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void scatter_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    scatter<T>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.total),
               std::span<T>(static_cast<T*>(b.recv), b.shape.count), ctx.cfg.root);
  });
}

void scatter_baseline(const bench_context& ctx, const bench_buffers& b) {
  const MPI_Datatype t = mpi_datatype(ctx.cfg.type);
  const int n = static_cast<int>(b.shape.count);
  MPI_Scatter(b.send, n, t, b.recv, n, t, ctx.cfg.root, ctx.mpi);
}

std::size_t scatter_wrong(const bench_context& ctx, const bench_buffers& b) {
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    const auto* out = static_cast<const T*>(b.recv);
    const std::size_t base = static_cast<std::size_t>(ctx.comm.rank()) * b.shape.count;
    std::size_t wrong = 0;
    for (std::size_t j = 0; j < b.shape.count; ++j) {
      wrong += !same_value(out[j], input_value<T>(op_kind::sum, ctx.cfg.root, base + j));
    }
    return wrong;
  });
}

collective_entry make_gather() {
  collective_entry e;
  e.name = "gather";
  e.algos = {"linear", "auto"};
  e.baseline = "MPI_Gather";
  e.uses_op = false;
  e.shape = gather_shape;
  e.bus_formula = "(n-1)/n";
  e.bus_factor = rooted_bus_factor;
  e.fill = gather_fill;
  e.run = gather_run;
  e.run_baseline = gather_baseline;
  e.count_wrong = gather_wrong;
  return e;
}

collective_entry make_scatter() {
  collective_entry e;
  e.name = "scatter";
  e.algos = {"linear", "auto"};
  e.baseline = "MPI_Scatter";
  e.uses_op = false;
  e.shape = scatter_shape;
  e.bus_formula = "(n-1)/n";
  e.bus_factor = rooted_bus_factor;
  e.fill = scatter_fill;
  e.run = scatter_run;
  e.run_baseline = scatter_baseline;
  e.count_wrong = scatter_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_gather())
RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_scatter())
