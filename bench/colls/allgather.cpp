// ringflow-bench entry for allgather (ring; halving_doubling: recursive doubling on power-of-two
// ranks); baseline MPI_Allgather.
#include <mpi.h>

#include <span>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

// As in nccl-tests: the size is the whole output, rounded down to equal pieces.
bench_shape allgather_shape(std::size_t bytes, std::size_t elem_size, int nranks, int /*rank*/) {
  const std::size_t piece = bytes / elem_size / static_cast<std::size_t>(nranks);
  const std::size_t total = piece * static_cast<std::size_t>(nranks);
  return {total * elem_size, piece, total, piece, total};
}

double allgather_bus_factor(int nranks) { return double(nranks - 1) / nranks; }

// Element i of the gathered buffer comes from the rank owning piece i / piece.
void allgather_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    const chunk own = partition(b.shape.total, ctx.comm.size(), ctx.comm.rank());
    for (std::size_t j = 0; j < b.shape.send_count; ++j) {
      in[j] = input_value<T>(op_kind::sum, ctx.comm.rank(), own.offset + j);
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void allgather_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    allgather<T>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.send_count),
                 std::span<T>(static_cast<T*>(b.recv), b.shape.recv_count), ctx.cfg.options());
  });
}

void allgather_baseline(const bench_context& ctx, const bench_buffers& b) {
  const MPI_Datatype t = mpi_datatype(ctx.cfg.type);
  const int n = static_cast<int>(b.shape.send_count);
  MPI_Allgather(b.send, n, t, b.recv, n, t, ctx.mpi);
}

std::size_t allgather_wrong(const bench_context& ctx, const bench_buffers& b) {
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    const auto* out = static_cast<const T*>(b.recv);
    const std::size_t piece = b.shape.send_count;
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < b.shape.total; ++i) {
      const int owner = static_cast<int>(i / piece);
      wrong += !same_value(out[i], input_value<T>(op_kind::sum, owner, i));
    }
    return wrong;
  });
}

collective_entry make_allgather() {
  collective_entry e;
  e.name = "allgather";
  e.algos = {"ring", "auto", "halving_doubling"};
  e.baseline = "MPI_Allgather";
  e.uses_op = false;
  e.shape = allgather_shape;
  e.bus_formula = "(n-1)/n";
  e.bus_factor = allgather_bus_factor;
  e.fill = allgather_fill;
  e.run = allgather_run;
  e.run_baseline = allgather_baseline;
  e.count_wrong = allgather_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_allgather())
