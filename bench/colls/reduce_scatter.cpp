// ringflow-bench entry for reduce_scatter (ring; halving_doubling: recursive halving on
// power-of-two ranks); baseline MPI_Reduce_scatter_block.
#include <mpi.h>

#include <span>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

// As in nccl-tests: the size is the whole input, rounded down to equal pieces.
bench_shape reduce_scatter_shape(std::size_t bytes, std::size_t elem_size, int nranks,
                                 int /*rank*/) {
  const std::size_t piece = bytes / elem_size / static_cast<std::size_t>(nranks);
  const std::size_t total = piece * static_cast<std::size_t>(nranks);
  return {total * elem_size, piece, total, total, piece};
}

double reduce_scatter_bus_factor(int nranks) { return double(nranks - 1) / nranks; }

void reduce_scatter_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    for (std::size_t i = 0; i < b.shape.send_count; ++i) {
      in[i] = input_value<T>(ctx.cfg.op, ctx.comm.rank(), i);
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void reduce_scatter_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    visit_op(ctx.cfg.op, [&]<class Op>(Op op) {
      reduce_scatter<T, Op>(
          ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.send_count),
          std::span<T>(static_cast<T*>(b.recv), b.shape.recv_count), op, ctx.cfg.options());
    });
  });
}

void reduce_scatter_baseline(const bench_context& ctx, const bench_buffers& b) {
  MPI_Reduce_scatter_block(b.send, b.recv, static_cast<int>(b.shape.recv_count),
                           mpi_datatype(ctx.cfg.type), mpi_op(ctx.cfg.op), ctx.mpi);
  if (ctx.cfg.op == op_kind::avg) {
    visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
      detail::finish_range(static_cast<T*>(b.recv), b.shape.recv_count, avg_op{}, ctx.comm.size());
    });
  }
}

std::size_t reduce_scatter_wrong(const bench_context& ctx, const bench_buffers& b) {
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    return visit_op(ctx.cfg.op, [&]<class Op>(Op op) {
      const auto* out = static_cast<const T*>(b.recv);
      const chunk own = partition(b.shape.total, ctx.comm.size(), ctx.comm.rank());
      std::size_t wrong = 0;
      for (std::size_t j = 0; j < b.shape.recv_count; ++j) {
        wrong += !same_value(out[j], expected_reduction<T>(op, ctx.comm.size(), own.offset + j));
      }
      return wrong;
    });
  });
}

collective_entry make_reduce_scatter() {
  collective_entry e;
  e.name = "reduce_scatter";
  e.algos = {"ring", "auto", "halving_doubling"};
  e.baseline = "MPI_Reduce_scatter_block";
  e.uses_op = true;
  e.shape = reduce_scatter_shape;
  e.bus_formula = "(n-1)/n";
  e.bus_factor = reduce_scatter_bus_factor;
  e.fill = reduce_scatter_fill;
  e.run = reduce_scatter_run;
  e.run_baseline = reduce_scatter_baseline;
  e.count_wrong = reduce_scatter_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_reduce_scatter())
