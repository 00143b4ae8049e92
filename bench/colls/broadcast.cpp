// ringflow-bench entry for broadcast (tree/chain, root -r); baseline MPI_Bcast.
#include <mpi.h>

#include <span>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

// ringflow's broadcast is in place: only the receive buffer is used.
bench_shape broadcast_shape(std::size_t bytes, std::size_t elem_size, int /*nranks*/,
                            int /*rank*/) {
  const std::size_t n = bytes / elem_size;
  return {n * elem_size, n, n, 0, n};
}

double broadcast_bus_factor(int /*nranks*/) { return 1.0; }

void broadcast_fill(const bench_context& ctx, const bench_buffers& b) {
  if (ctx.comm.rank() != ctx.cfg.root) {
    poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
    return;
  }
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* data = static_cast<T*>(b.recv);
    for (std::size_t i = 0; i < b.shape.recv_count; ++i) {
      data[i] = input_value<T>(op_kind::sum, ctx.cfg.root, i);
    }
  });
}

void broadcast_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    broadcast<T>(ctx.comm, std::span<T>(static_cast<T*>(b.recv), b.shape.recv_count), ctx.cfg.root,
                 ctx.cfg.options());
  });
}

void broadcast_baseline(const bench_context& ctx, const bench_buffers& b) {
  MPI_Bcast(b.recv, static_cast<int>(b.shape.recv_count), mpi_datatype(ctx.cfg.type), ctx.cfg.root,
            ctx.mpi);
}

std::size_t broadcast_wrong(const bench_context& ctx, const bench_buffers& b) {
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    const auto* data = static_cast<const T*>(b.recv);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < b.shape.recv_count; ++i) {
      wrong += !same_value(data[i], input_value<T>(op_kind::sum, ctx.cfg.root, i));
    }
    return wrong;
  });
}

collective_entry make_broadcast() {
  collective_entry e;
  e.name = "broadcast";
  e.algos = {"ring", "auto"};
  e.baseline = "MPI_Bcast";
  e.uses_op = false;
  e.shape = broadcast_shape;
  e.bus_formula = "1";
  e.bus_factor = broadcast_bus_factor;
  e.fill = broadcast_fill;
  e.run = broadcast_run;
  e.run_baseline = broadcast_baseline;
  e.count_wrong = broadcast_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_broadcast())
