// Compiles the non-ring allreduce algorithms once for every element type and
// reduce op (a separate file from the ring's so the two build in parallel).
#include "ringflow/coll/collectives.hpp"

#define RINGFLOW_ALGOS_INSTANTIATE(T, OP)                                                      \
  template void ringflow::detail::recursive_doubling_allreduce<T, ringflow::OP>(               \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&);                   \
  template void ringflow::detail::halving_doubling_allreduce<T, ringflow::OP>(                 \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&);                   \
  template void ringflow::detail::tree_allreduce<T, ringflow::OP>(                             \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t, int); \
  template void ringflow::detail::hierarchical_allreduce<T, ringflow::OP>(                     \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&,                    \
      const ringflow::topology&, std::size_t);
#define RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(T) \
  RINGFLOW_ALGOS_INSTANTIATE(T, sum_op)       \
  RINGFLOW_ALGOS_INSTANTIATE(T, prod_op)      \
  RINGFLOW_ALGOS_INSTANTIATE(T, min_op)       \
  RINGFLOW_ALGOS_INSTANTIATE(T, max_op)       \
  RINGFLOW_ALGOS_INSTANTIATE(T, avg_op)

RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(float)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(double)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(std::int8_t)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(std::uint8_t)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(std::int32_t)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(std::int64_t)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(ringflow::half)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(ringflow::bfloat16)

// The algorithm table's runners (coll/algorithms.hpp): the type-erased entry
// of each built-in algorithm, dispatching on the element type and op.
#include "builtin_algorithms.hpp"
#include "ringflow/core/dtype_visit.hpp"

namespace ringflow::detail {
namespace {
template <class F>
void typed(dtype type, op_kind op, const void* in, void* out, F&& f) {
  visit_dtype_op(type, op, [&]<class T, class Op>(type_tag<T>, Op o) {
    f(static_cast<const T*>(in), static_cast<T*>(out), o);
  });
}
}  // namespace

void run_ring(const communicator& comm, void* out, const void* in, std::size_t count, dtype type,
              op_kind op, const coll_options& opt) {
  typed(type, op, in, out, [&](const auto* i, auto* o, const auto& f) {
    ring_allreduce(comm.raw(), i, o, count, f, segment_or_default(opt));
  });
}

void run_recursive_doubling(const communicator& comm, void* out, const void* in, std::size_t count,
                            dtype type, op_kind op, const coll_options&) {
  typed(type, op, in, out, [&](const auto* i, auto* o, const auto& f) {
    recursive_doubling_allreduce(comm.raw(), i, o, count, f);
  });
}

void run_halving_doubling(const communicator& comm, void* out, const void* in, std::size_t count,
                          dtype type, op_kind op, const coll_options&) {
  typed(type, op, in, out, [&](const auto* i, auto* o, const auto& f) {
    halving_doubling_allreduce(comm.raw(), i, o, count, f);
  });
}

void run_tree(const communicator& comm, void* out, const void* in, std::size_t count, dtype type,
              op_kind op, const coll_options& opt) {
  typed(type, op, in, out, [&](const auto* i, auto* o, const auto& f) {
    tree_allreduce(comm.raw(), i, o, count, f, opt.segment_bytes, 1);
  });
}

void run_double_tree(const communicator& comm, void* out, const void* in, std::size_t count,
                     dtype type, op_kind op, const coll_options& opt) {
  typed(type, op, in, out, [&](const auto* i, auto* o, const auto& f) {
    tree_allreduce(comm.raw(), i, o, count, f, opt.segment_bytes, 2);
  });
}

void run_hierarchical(const communicator& comm, void* out, const void* in, std::size_t count,
                      dtype type, op_kind op, const coll_options& opt) {
  if (count == 0) return;
  typed(type, op, in, out, [&](const auto* i, auto* o, const auto& f) {
    hierarchical_allreduce(comm.raw(), i, o, count, f, context_of(comm)->topo, opt.segment_bytes);
  });
}

}  // namespace ringflow::detail
