// ringflow-bench entry for allreduce --algo shm (intra-node shared memory); baseline MPI_Allreduce.
#include <span>

#include "allreduce_entry.hpp"
#include "harness.hpp"
#include "ringflow/backends/shm.hpp"

namespace ringflow::bench {
namespace {

// The shm entry point directly (no dispatch, no fingerprint); everything
// else, MPI_Allreduce baseline included, is the shared allreduce row.
void shm_run(const bench_context& ctx, const bench_buffers& b) {
  visit_dtype(ctx.cfg.type, [&]<class T>(type_tag<T>) {
    visit_op(ctx.cfg.op, [&]<class Op>(Op op) {
      shm::allreduce<T, Op>(ctx.comm,
                            std::span<const T>(static_cast<const T*>(b.send), b.shape.total),
                            std::span<T>(static_cast<T*>(b.recv), b.shape.total), op);
    });
  });
}

collective_entry make_shm_allreduce() {
  collective_entry e = allreduce_entry({"shm"});
  e.run = shm_run;
  return e;
}

}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::make_shm_allreduce())
