// Device element-wise reduction (ringflow/cuda/reduce.hpp): one grid-stride
// kernel per (type, op), the per-element math being the host-device reduce_op
// functors that the CPU ring uses, so GPU and CPU results are bit-identical.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "ringflow/core/dtype_visit.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/reduce.hpp"

namespace ringflow::cuda {

namespace {

template <class T, class Op>
__global__ void reduce_kernel(T* dst, const T* a, const T* b, std::size_t n, Op op) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] = op(a[i], b[i]);
  }
}

template <class T>
__global__ void avg_finish_kernel(T* data, std::size_t n, int nranks) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const avg_op op{};
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    data[i] = op.finish(data[i], nranks);
  }
}

constexpr int block_threads = 256;

unsigned grid_for(std::size_t n) {
  // Enough blocks to fill any current GPU several times over; the grid-stride
  // loop covers the rest.
  const std::size_t blocks = (n + block_threads - 1) / block_threads;
  return static_cast<unsigned>(std::min<std::size_t>(std::max<std::size_t>(blocks, 1), 4096));
}

template <class T, class Op>
void launch_reduce(void* dst, const void* a, const void* b, std::size_t n, cudaStream_t s) {
  reduce_kernel<T, Op><<<grid_for(n), block_threads, 0, s>>>(
      static_cast<T*>(dst), static_cast<const T*>(a), static_cast<const T*>(b), n, Op{});
  RINGFLOW_CHECK_LAUNCH("reduce_kernel");
}

template <class T>
void reduce_typed(op_kind op, void* dst, const void* a, const void* b, std::size_t n,
                  cudaStream_t s) {
  switch (op) {
    case op_kind::sum:
    case op_kind::avg: return launch_reduce<T, sum_op>(dst, a, b, n, s);
    case op_kind::prod: return launch_reduce<T, prod_op>(dst, a, b, n, s);
    case op_kind::min: return launch_reduce<T, min_op>(dst, a, b, n, s);
    case op_kind::max: return launch_reduce<T, max_op>(dst, a, b, n, s);
  }
  throw usage_error("cuda::reduce: unknown reduce op");
}

}  // namespace

void reduce(dtype type, op_kind op, void* dst, const void* a, const void* b, std::size_t n,
            cudaStream_t s) {
  if (n == 0) return;
  visit_dtype(type, [&]<class T>(type_tag<T>) { reduce_typed<T>(op, dst, a, b, n, s); });
}

void finish(dtype type, op_kind op, void* data, std::size_t n, int nranks, cudaStream_t s) {
  if (op != op_kind::avg || n == 0) return;
  visit_dtype(type, [&]<class T>(type_tag<T>) {
    avg_finish_kernel<T><<<grid_for(n), block_threads, 0, s>>>(static_cast<T*>(data), n, nranks);
    RINGFLOW_CHECK_LAUNCH("avg_finish_kernel");
  });
}

}  // namespace ringflow::cuda
