// ringflow-bench entry for allreduce (algorithms ring, native, auto); baseline MPI_Allreduce.
// allreduce_entry() is shared by every allreduce registration (algorithms, shm).
#include <mpi.h>

#include <span>

#include "allreduce_entry.hpp"
#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

bench_shape allreduce_shape(std::size_t bytes, std::size_t elem_size, int /*nranks*/,
                            int /*rank*/) {
  const std::size_t n = bytes / elem_size;
  return {n * elem_size, n, n, n, n};
}

// Each rank sends and receives 2(n-1)/n of the buffer in a ring allreduce.
double allreduce_bus_factor(int nranks) { return 2.0 * (nranks - 1) / nranks; }

void allreduce_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    for (std::size_t i = 0; i < b.shape.send_count; ++i) {
      in[i] = input_value<T>(ctx.cfg.op, ctx.comm.rank(), i);
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void allreduce_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    visit_op(ctx.cfg.op, [&]<class Op>(Op op) {
      allreduce<T, Op>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.total),
                       std::span<T>(static_cast<T*>(b.recv), b.shape.total), op, ctx.cfg.options());
    });
  });
}

// Out of place, like the ringflow run; avg is MPI_SUM plus the division a
// user of MPI would do, so both sides deliver the same result.
void allreduce_baseline(const bench_context& ctx, const bench_buffers& b) {
  MPI_Allreduce(b.send, b.recv, static_cast<int>(b.shape.total), mpi_datatype(ctx.cfg.type),
                mpi_op(ctx.cfg.op), ctx.mpi);
  if (ctx.cfg.op == op_kind::avg) {
    visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
      detail::finish_range(static_cast<T*>(b.recv), b.shape.total, avg_op{}, ctx.comm.size());
    });
  }
}

std::size_t allreduce_wrong(const bench_context& ctx, const bench_buffers& b) {
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    return visit_op(ctx.cfg.op, [&]<class Op>(Op op) {
      const auto* out = static_cast<const T*>(b.recv);
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < b.shape.total; ++i) {
        wrong += !same_value(out[i], expected_reduction<T>(op, ctx.comm.size(), i));
      }
      return wrong;
    });
  });
}

}  // namespace

collective_entry allreduce_entry(std::vector<std::string> algos) {
  collective_entry e;
  e.name = "allreduce";
  e.algos = std::move(algos);
  e.baseline = "MPI_Allreduce";
  e.uses_op = true;
  e.shape = allreduce_shape;
  e.bus_formula = "2(n-1)/n";
  e.bus_factor = allreduce_bus_factor;
  e.fill = allreduce_fill;
  e.run = allreduce_run;
  e.run_baseline = allreduce_baseline;
  e.count_wrong = allreduce_wrong;
  return e;
}

}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::allreduce_entry({"ring", "native", "auto"}))
