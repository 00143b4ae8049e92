// ringflow-bench entry for the allreduce algorithms beyond ring/native/auto:
// recursive_doubling, halving_doubling, tree, double_tree, hierarchical, and
// "all" (every algorithm at each size, interleaved: bench/algo_sweep.cpp).
#include <mpi.h>

#include <span>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

bench_shape algos_shape(std::size_t bytes, std::size_t elem_size, int, int) {
  const std::size_t n = bytes / elem_size;
  return {n * elem_size, n, n, n, n};
}

double algos_bus_factor(int nranks) { return 2.0 * (nranks - 1) / nranks; }

void algos_fill(const bench_context& ctx, const bench_buffers& b) {
  with_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    for (std::size_t i = 0; i < b.shape.send_count; ++i) {
      in[i] = input_value<T>(ctx.cfg.op, ctx.comm.rank(), i);
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void algos_run(const bench_context& ctx, const bench_buffers& b) {
  with_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    with_op(ctx.cfg.op, [&]<class Op>(Op op) {
      allreduce<T, Op>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.total),
                       std::span<T>(static_cast<T*>(b.recv), b.shape.total), op,
                       ctx.cfg.options());
    });
  });
}

void algos_baseline(const bench_context& ctx, const bench_buffers& b) {
  MPI_Allreduce(b.send, b.recv, static_cast<int>(b.shape.total), mpi_datatype(ctx.cfg.type),
                mpi_op(ctx.cfg.op), ctx.mpi);
  if (ctx.cfg.op == op_kind::avg) {
    with_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
      detail::finish_range(static_cast<T*>(b.recv), b.shape.total, avg_op{}, ctx.comm.size());
    });
  }
}

std::size_t algos_wrong(const bench_context& ctx, const bench_buffers& b) {
  return with_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    return with_op(ctx.cfg.op, [&]<class Op>(Op op) {
      const auto* out = static_cast<const T*>(b.recv);
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < b.shape.total; ++i) {
        wrong += !same_value(out[i], expected_reduction<T>(op, ctx.comm.size(), i));
      }
      return wrong;
    });
  });
}

collective_entry make_allreduce_algorithms() {
  collective_entry e;
  e.name = "allreduce";
  // (shm has its own entry, bench/shm_allreduce.cpp.)
  e.algos = {"recursive_doubling", "halving_doubling", "tree", "double_tree", "hierarchical",
             "all"};
  e.baseline = "MPI_Allreduce";
  e.uses_op = true;
  e.shape = algos_shape;
  e.bus_formula = "2(n-1)/n";
  e.bus_factor = algos_bus_factor;
  e.fill = algos_fill;
  e.run = algos_run;
  e.run_baseline = algos_baseline;
  e.count_wrong = algos_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_allreduce_algorithms())
