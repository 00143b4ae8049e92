// ringflow-bench entry for alltoallv (pairwise; uneven blocks); baseline MPI_Alltoallv.
#include <mpi.h>

#include <span>
#include <vector>

#include "harness.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::bench {
namespace {

// Uneven blocks: rank `from` sends rank `to` w/2 times the even block, with
// w = 1 + (from + 2 to) mod 3 (half, one or one and a half blocks), so the
// mean per rank is close to the size column, as in the even alltoall.
std::size_t block_of(std::size_t even, int from, int to) {
  const std::size_t w = 1 + static_cast<std::size_t>((from + 2 * to) % 3);
  return even * w / 2;
}

struct layout {
  std::vector<std::size_t> send_counts, send_displs, recv_counts, recv_displs;
};

layout layout_of(std::size_t even, int nranks, int rank) {
  layout l;
  std::size_t s = 0, r = 0;
  for (int q = 0; q < nranks; ++q) {
    l.send_counts.push_back(block_of(even, rank, q));
    l.send_displs.push_back(s);
    s += l.send_counts.back();
    l.recv_counts.push_back(block_of(even, q, rank));
    l.recv_displs.push_back(r);
    r += l.recv_counts.back();
  }
  return l;
}

std::size_t sum_of(const std::vector<std::size_t>& v) {
  std::size_t s = 0;
  for (std::size_t x : v) s += x;
  return s;
}

bench_shape alltoallv_shape(std::size_t bytes, std::size_t elem_size, int nranks, int rank) {
  const std::size_t even = bytes / elem_size / static_cast<std::size_t>(nranks);
  const layout l = layout_of(even, nranks, rank);
  const std::size_t total = even * static_cast<std::size_t>(nranks);
  return {total * elem_size, even, total, sum_of(l.send_counts), sum_of(l.recv_counts)};
}

double alltoallv_bus_factor(int nranks) { return double(nranks - 1) / nranks; }

std::size_t value_index(int from, int to, std::size_t j) {
  return (static_cast<std::size_t>(from) * 131 + static_cast<std::size_t>(to) * 17) + j;
}

void alltoallv_fill(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    auto* in = static_cast<T*>(b.send);
    const int p = ctx.comm.size(), r = ctx.comm.rank();
    const layout l = layout_of(b.shape.count, p, r);
    for (int q = 0; q < p; ++q) {
      for (std::size_t j = 0; j < l.send_counts[q]; ++j) {
        in[l.send_displs[q] + j] = input_value<T>(op_kind::sum, r, value_index(r, q, j));
      }
    }
  });
  poison(b.recv, b.shape.recv_count, dtype_size(ctx.cfg.type));
}

void alltoallv_run(const bench_context& ctx, const bench_buffers& b) {
  const layout l = layout_of(b.shape.count, ctx.comm.size(), ctx.comm.rank());
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    alltoallv<T>(ctx.comm, std::span<const T>(static_cast<const T*>(b.send), b.shape.send_count),
                 l.send_counts, l.send_displs,
                 std::span<T>(static_cast<T*>(b.recv), b.shape.recv_count), l.recv_counts,
                 l.recv_displs);
  });
}

std::vector<int> as_int(const std::vector<std::size_t>& v) { return {v.begin(), v.end()}; }

void alltoallv_baseline(const bench_context& ctx, const bench_buffers& b) {
  const layout l = layout_of(b.shape.count, ctx.comm.size(), ctx.comm.rank());
  const auto sc = as_int(l.send_counts), sd = as_int(l.send_displs);
  const auto rc = as_int(l.recv_counts), rd = as_int(l.recv_displs);
  const MPI_Datatype t = mpi_datatype(ctx.cfg.type);
  MPI_Alltoallv(b.send, sc.data(), sd.data(), t, b.recv, rc.data(), rd.data(), t, ctx.mpi);
}

std::size_t alltoallv_wrong(const bench_context& ctx, const bench_buffers& b) {
  return visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    const auto* out = static_cast<const T*>(b.recv);
    const int p = ctx.comm.size(), r = ctx.comm.rank();
    const layout l = layout_of(b.shape.count, p, r);
    std::size_t wrong = 0;
    for (int q = 0; q < p; ++q) {
      for (std::size_t j = 0; j < l.recv_counts[q]; ++j) {
        wrong += !same_value(out[l.recv_displs[q] + j],
                             input_value<T>(op_kind::sum, q, value_index(q, r, j)));
      }
    }
    return wrong;
  });
}

collective_entry make_alltoallv() {
  collective_entry e;
  e.name = "alltoallv";
  e.algos = {"pairwise", "auto"};
  e.baseline = "MPI_Alltoallv";
  e.uses_op = false;
  e.shape = alltoallv_shape;
  e.bus_formula = "(n-1)/n";
  e.bus_factor = alltoallv_bus_factor;
  e.fill = alltoallv_fill;
  e.run = alltoallv_run;
  e.run_baseline = alltoallv_baseline;
  e.count_wrong = alltoallv_wrong;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_alltoallv())
