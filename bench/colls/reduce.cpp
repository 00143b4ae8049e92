// ringflow-bench entry for reduce to a root (auto, tree, ring; root -r); baseline MPI_Reduce.
#include <mpi.h>

#include <span>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

bench_shape reduce_shape(std::size_t bytes, std::size_t elem_size, int /*nranks*/, int /*rank*/) {
  const std::size_t n = bytes / elem_size;
  return {n * elem_size, n, n, n, n};
}

// nccl-tests' factor for reduce: 1.
double reduce_bus_factor(int /*nranks*/) { return 1.0; }

void reduce_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    for (std::size_t i = 0; i < b.shape.send_count; ++i) {
      in[i] = input_value<T>(ctx.cfg.op, ctx.comm.rank(), i);
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void reduce_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    visit_op(ctx.cfg.op, [&]<class Op>(Op op) {
      reduce<T, Op>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.send_count),
                    std::span<T>(static_cast<T*>(b.recv), b.shape.recv_count), op, ctx.cfg.root,
                    ctx.cfg.options());
    });
  });
}

void reduce_baseline(const bench_context& ctx, const bench_buffers& b) {
  MPI_Reduce(b.send, b.recv, static_cast<int>(b.shape.count), mpi_datatype(ctx.cfg.type),
             mpi_op(ctx.cfg.op), ctx.cfg.root, ctx.mpi);
  if (ctx.cfg.op == op_kind::avg && ctx.comm.rank() == ctx.cfg.root) {
    visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
      detail::finish_range(static_cast<T*>(b.recv), b.shape.count, avg_op{}, ctx.comm.size());
    });
  }
}

std::size_t reduce_wrong(const bench_context& ctx, const bench_buffers& b) {
  if (ctx.comm.rank() != ctx.cfg.root) return 0;
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    return visit_op(ctx.cfg.op, [&]<class Op>(Op op) {
      const auto* out = static_cast<const T*>(b.recv);
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < b.shape.count; ++i) {
        wrong += !same_value(out[i], expected_reduction<T>(op, ctx.comm.size(), i));
      }
      return wrong;
    });
  });
}

collective_entry make_reduce() {
  collective_entry e;
  e.name = "reduce";
  e.algos = {"auto", "tree", "ring"};
  e.baseline = "MPI_Reduce";
  e.uses_op = true;
  e.shape = reduce_shape;
  e.bus_formula = "1";
  e.bus_factor = reduce_bus_factor;
  e.fill = reduce_fill;
  e.run = reduce_run;
  e.run_baseline = reduce_baseline;
  e.count_wrong = reduce_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_reduce())
