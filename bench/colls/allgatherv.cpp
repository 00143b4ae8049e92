// ringflow-bench entry for allgatherv (ring; uneven pieces); baseline MPI_Allgatherv.
#include <mpi.h>

#include <algorithm>
#include <span>
#include <vector>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

// Uneven pieces: rank q contributes w/2 even pieces, w = 1 + q mod 3, and
// the last rank what makes the total the size column (never less than 0).
std::vector<std::size_t> pieces(std::size_t total, int nranks) {
  const std::size_t even = total / static_cast<std::size_t>(nranks);
  std::vector<std::size_t> c(static_cast<std::size_t>(nranks));
  std::size_t used = 0;
  for (int q = 0; q + 1 < nranks; ++q) {
    c[q] = std::min(total - used, even * (1 + static_cast<std::size_t>(q % 3)) / 2);
    used += c[q];
  }
  c.back() = total - used;
  return c;
}

std::vector<std::size_t> offsets(const std::vector<std::size_t>& c) {
  std::vector<std::size_t> o(c.size());
  std::size_t at = 0;
  for (std::size_t i = 0; i < c.size(); ++i) o[i] = at, at += c[i];
  return o;
}

bench_shape allgatherv_shape(std::size_t bytes, std::size_t elem_size, int nranks, int rank) {
  const std::size_t total = bytes / elem_size;
  const auto c = pieces(total, nranks);
  return {total * elem_size, c[static_cast<std::size_t>(rank)], total,
          c[static_cast<std::size_t>(rank)], total};
}

double allgatherv_bus_factor(int nranks) { return double(nranks - 1) / nranks; }

void allgatherv_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    const auto o = offsets(pieces(b.shape.total, ctx.comm.size()));
    const std::size_t base = o[static_cast<std::size_t>(ctx.comm.rank())];
    for (std::size_t j = 0; j < b.shape.send_count; ++j) {
      in[j] = input_value<T>(op_kind::sum, ctx.comm.rank(), base + j);
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void allgatherv_run(const bench_context& ctx, const bench_buffers& b) {
  const auto c = pieces(b.shape.total, ctx.comm.size());
  const auto o = offsets(c);
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    allgatherv<T>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.send_count),
                  std::span<T>(static_cast<T*>(b.recv), b.shape.recv_count), c, o);
  });
}

void allgatherv_baseline(const bench_context& ctx, const bench_buffers& b) {
  const auto c = pieces(b.shape.total, ctx.comm.size());
  const auto o = offsets(c);
  const std::vector<int> ic(c.begin(), c.end()), io(o.begin(), o.end());
  const MPI_Datatype t = mpi_datatype(ctx.cfg.type);
  MPI_Allgatherv(b.send, static_cast<int>(b.shape.send_count), t, b.recv, ic.data(), io.data(), t,
                 ctx.mpi);
}

std::size_t allgatherv_wrong(const bench_context& ctx, const bench_buffers& b) {
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    const auto* out = static_cast<const T*>(b.recv);
    const auto c = pieces(b.shape.total, ctx.comm.size());
    std::size_t wrong = 0, i = 0;
    for (std::size_t q = 0; q < c.size(); ++q) {
      for (std::size_t j = 0; j < c[q]; ++j, ++i) {
        wrong += !same_value(out[i], input_value<T>(op_kind::sum, static_cast<int>(q), i));
      }
    }
    return wrong;
  });
}

collective_entry make_allgatherv() {
  collective_entry e;
  e.name = "allgatherv";
  e.algos = {"ring", "auto"};
  e.baseline = "MPI_Allgatherv";
  e.uses_op = false;
  e.shape = allgatherv_shape;
  e.bus_formula = "(n-1)/n";
  e.bus_factor = allgatherv_bus_factor;
  e.fill = allgatherv_fill;
  e.run = allgatherv_run;
  e.run_baseline = allgatherv_baseline;
  e.count_wrong = allgatherv_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_allgatherv())
