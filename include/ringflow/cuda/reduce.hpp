// Element-wise reduction on the device: the GPU twin of coll/ring.hpp's
// reduce_into, used by the NCCL point-to-point ring and the staged MPI path.
// Same ops, same per-element arithmetic (the reduce_op functors of
// core/reduce_op.hpp are host-device), so results match the CPU bit for bit.
//
// Needs the CUDA toolkit headers (see check.hpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::cuda {

/// dst[i] = op(a[i], b[i]) for i < n, queued on `s`. dst may equal a or b.
/// All three are device pointers to `type` elements. Checked launch.
void reduce(dtype type, op_kind op, void* dst, const void* a, const void* b, std::size_t n,
            cudaStream_t s);

/// The final step of an op on a finished range (avg: divide by nranks, exactly
/// as the CPU's finish(); identity for the others, which launch nothing).
void finish(dtype type, op_kind op, void* data, std::size_t n, int nranks, cudaStream_t s);

}  // namespace ringflow::cuda
