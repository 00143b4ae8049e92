// Fused fp16 / bf16 rounding with error feedback (ringflow/cuda/compress.hpp).
// Element-wise: 16-byte loads of g and r and 8-byte stores of four 16-bit
// values when the pointers allow it, scalar otherwise. The conversions are
// the bit-level functors of compress/kernels.hpp (round to nearest even), the
// CPU's, so the results are the CPU's bit for bit.
#include <cuda_runtime.h>

#include "compress_common.cuh"
#include "ringflow/cuda/compress.hpp"

namespace ringflow::cuda {

namespace {

using namespace compress_detail;

template <class Enc, class Dec, bool HasR>
__device__ __forceinline__ std::uint16_t encode_one(float g, float* r) {
  const float c = HasR ? kn::ef_compensate{}(g, *r) : g;
  const std::uint16_t h = Enc{}(c);
  // The CPU's half reduce keeps mine = decode(h) and r = c - mine.
  if constexpr (HasR) *r = kn::ef_residual{}(c, Dec{}(h));
  return h;
}

template <class Enc, class Dec, bool HasR, bool Vec>
__global__ void __launch_bounds__(cta_threads)
    half_encode_kernel(const float* __restrict__ g, float* __restrict__ r, std::size_t n,
                       std::uint16_t* __restrict__ out) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t tid = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::size_t done = 0;
  if constexpr (Vec) {
    const std::size_t quads = n / 4;
    for (std::size_t v = tid; v < quads; v += stride) {
      const float4 gv = reinterpret_cast<const float4*>(g)[v];
      float4 rv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if constexpr (HasR) rv = reinterpret_cast<const float4*>(r)[v];
      ushort4 h;
      h.x = encode_one<Enc, Dec, HasR>(gv.x, &rv.x);
      h.y = encode_one<Enc, Dec, HasR>(gv.y, &rv.y);
      h.z = encode_one<Enc, Dec, HasR>(gv.z, &rv.z);
      h.w = encode_one<Enc, Dec, HasR>(gv.w, &rv.w);
      reinterpret_cast<ushort4*>(out)[v] = h;
      if constexpr (HasR) reinterpret_cast<float4*>(r)[v] = rv;
    }
    done = 4 * quads;
  }
  for (std::size_t i = done + tid; i < n; i += stride) {
    float rv = 0.0f;
    if constexpr (HasR) rv = r[i];
    out[i] = encode_one<Enc, Dec, HasR>(g[i], &rv);
    if constexpr (HasR) r[i] = rv;
  }
}

// out = out + decode(in) (Accumulate) or decode(in) / divide_by.
template <class Dec, bool Accumulate, bool Vec>
__global__ void __launch_bounds__(cta_threads)
    half_decode_kernel(const std::uint16_t* __restrict__ in, std::size_t n, float* __restrict__ out,
                       int divide_by) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t tid = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto one = [&](std::uint16_t h, float o) {
    const float t = Dec{}(h);
    if constexpr (Accumulate) {
      return o + t;
    } else {
      // A plain decode, not 0 + t: this is the allreduce's last step, and the
      // CPU's half_compressor::reduce decodes the summed payload by
      // assignment (decode_fp16(bits, data), data[i] = decode_bf16(...)), so
      // a -0 payload gives -0 on both sides. (compressor::decode, a zero
      // fill then decode_add, would give +0; tests/cuda compare with reduce's.)
      return divide_by > 1 ? t / static_cast<float>(divide_by) : t;
    }
  };
  std::size_t done = 0;
  if constexpr (Vec) {
    const std::size_t quads = n / 4;
    for (std::size_t v = tid; v < quads; v += stride) {
      const ushort4 h = reinterpret_cast<const ushort4*>(in)[v];
      float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if constexpr (Accumulate) o = reinterpret_cast<const float4*>(out)[v];
      o.x = one(h.x, o.x);
      o.y = one(h.y, o.y);
      o.z = one(h.z, o.z);
      o.w = one(h.w, o.w);
      reinterpret_cast<float4*>(out)[v] = o;
    }
    done = 4 * quads;
  }
  for (std::size_t i = done + tid; i < n; i += stride) {
    out[i] = one(in[i], Accumulate ? out[i] : 0.0f);
  }
}

template <class Enc, class Dec>
void launch_encode(const float* g, float* r, std::size_t n, std::uint16_t* out, cudaStream_t s) {
  const bool vec = aligned(g, 16) && (!r || aligned(r, 16)) && aligned(out, 8);
  const unsigned grid = ctas_for_items(vec ? n / 4 + 1 : n, 2);
  if (vec) {
    if (r) {
      half_encode_kernel<Enc, Dec, true, true><<<grid, cta_threads, 0, s>>>(g, r, n, out);
    } else {
      half_encode_kernel<Enc, Dec, false, true><<<grid, cta_threads, 0, s>>>(g, r, n, out);
    }
  } else {
    if (r) {
      half_encode_kernel<Enc, Dec, true, false><<<grid, cta_threads, 0, s>>>(g, r, n, out);
    } else {
      half_encode_kernel<Enc, Dec, false, false><<<grid, cta_threads, 0, s>>>(g, r, n, out);
    }
  }
  RINGFLOW_CHECK_LAUNCH("half_encode_kernel");
}

template <class Dec, bool Accumulate>
void launch_decode(const std::uint16_t* in, std::size_t n, float* out, int divide_by,
                   cudaStream_t s) {
  const bool vec = aligned(in, 8) && aligned(out, 16);
  const unsigned grid = ctas_for_items(vec ? n / 4 + 1 : n, 2);
  if (vec) {
    half_decode_kernel<Dec, Accumulate, true><<<grid, cta_threads, 0, s>>>(in, n, out, divide_by);
  } else {
    half_decode_kernel<Dec, Accumulate, false><<<grid, cta_threads, 0, s>>>(in, n, out, divide_by);
  }
  RINGFLOW_CHECK_LAUNCH("half_decode_kernel");
}

__global__ void __launch_bounds__(cta_threads)
    none_encode_kernel(float* __restrict__ g, float* __restrict__ r, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float c = kn::ef_compensate{}(g[i], r[i]);
    g[i] = c;
    r[i] = kn::ef_residual{}(c, c);
  }
}

}  // namespace

void none_ef_encode(float* grad, float* residual, std::size_t n, cudaStream_t s) {
  if (n == 0 || residual == nullptr) return;
  none_encode_kernel<<<ctas_for_items(n, 4), cta_threads, 0, s>>>(grad, residual, n);
  RINGFLOW_CHECK_LAUNCH("none_encode_kernel");
}

void half_ef_encode(half_format f, const float* grad, float* residual, std::size_t n,
                    std::uint16_t* out, cudaStream_t s) {
  if (n == 0) return;
  if (f == half_format::fp16) {
    launch_encode<kn::encode_half, kn::decode_half>(grad, residual, n, out, s);
  } else {
    launch_encode<kn::encode_bf16, kn::decode_bf16>(grad, residual, n, out, s);
  }
}

void half_decode_add(half_format f, const std::uint16_t* in, std::size_t n, float* out,
                     cudaStream_t s) {
  if (n == 0) return;
  if (f == half_format::fp16) {
    launch_decode<kn::decode_half, true>(in, n, out, 1, s);
  } else {
    launch_decode<kn::decode_bf16, true>(in, n, out, 1, s);
  }
}

void half_decode(half_format f, const std::uint16_t* in, std::size_t n, float* out, int divide_by,
                 cudaStream_t s) {
  if (n == 0) return;
  if (f == half_format::fp16) {
    launch_decode<kn::decode_half, false>(in, n, out, divide_by, s);
  } else {
    launch_decode<kn::decode_bf16, false>(in, n, out, divide_by, s);
  }
}

}  // namespace ringflow::cuda
