// Per-element compression math as RINGFLOW_HOST_DEVICE functors, shared by the
// CPU reference (src/compress/) and the fused CUDA kernels of the GPU path.
//
// Rules for this file, so nvcc device code can call everything unchanged:
// no std:: containers, no exceptions, no <cmath> calls, no allocation; plain
// arithmetic on scalars and raw pointers, bit casts through core/half.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ringflow/core/config.hpp"
#include "ringflow/core/half.hpp"

namespace ringflow::compress::kernels {

// ---------------------------------------------------------------------------
// Counter-based random numbers: a pure function of (seed, stream, index), so a
// CPU loop and a GPU thread that handles element `index` draw the same number
// without sharing any generator state.

/// splitmix64 finalizer: a bijective 64-bit mix with good avalanche.
RINGFLOW_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// Key of one call's random stream: seed, a per-call counter and the rank, mixed
/// so that neighbouring (step, rank) pairs give unrelated streams.
RINGFLOW_HOST_DEVICE inline std::uint64_t stream_key(std::uint64_t seed, std::uint64_t step,
                                                     std::uint64_t rank) {
  return mix64(mix64(mix64(seed) ^ step) ^ (rank * 0x632be59bd9b4e019ull));
}

/// splitmix64's increment: draw `index` of stream `key` starts from
/// key + index * golden_gamma.
inline constexpr std::uint64_t golden_gamma = 0x9e3779b97f4a7c15ull;

/// The draw of counter state s = key + index * golden_gamma, for callers that
/// step the state by additions instead of a multiply per element (the GPU
/// kernels). Bits 40..63 of mix64(s): mix64's last step x ^ (x >> 31) cannot
/// change them (x >> 31 has nothing above bit 32), so it is left out, and the
/// top 24 bits go through a 32-bit conversion (the same value, a cheaper
/// instruction on the GPU than a 64-bit one).
RINGFLOW_HOST_DEVICE inline float uniform01_state(std::uint64_t s) {
  std::uint64_t x = s + golden_gamma;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return static_cast<float>(static_cast<std::uint32_t>(x >> 40)) * (1.0f / 16777216.0f);
}

/// Uniform float in [0, 1) for element `index` of stream `key` (24 random bits,
/// so every value is exact in float and 1.0 is never returned). This is
/// draw `index` of a splitmix64 sequence started at `key`: one mix per element.
RINGFLOW_HOST_DEVICE inline float uniform01(std::uint64_t key, std::uint64_t index) {
  return uniform01_state(key + index * golden_gamma);
}

/// Stream id of top-k's threshold samples: sample j of a call is drawn by
/// uniform01(stream_key(seed, step, topk_sample_stream), j) on CPU and GPU.
inline constexpr std::uint64_t topk_sample_stream = 0x70b6;

// ---------------------------------------------------------------------------
// Small float helpers without <cmath>.

RINGFLOW_HOST_DEVICE inline bool is_nan(float x) { return x != x; }

/// a * b, rounded once and never fused with a neighbouring add or subtract.
/// nvcc contracts x * y + z into one fma by default (one rounding instead of
/// two), which would make a GPU result differ from the CPU's in the last bit;
/// __fmul_rn is never contracted. On the host a * b is already a plain
/// multiply: x86-64 without -march=<something with FMA> has no fma to
/// contract into.
RINGFLOW_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

RINGFLOW_HOST_DEVICE inline float abs_value(float x) {
  return ringflow::detail::bits_float(ringflow::detail::float_bits(x) & 0x7fffffffu);
}

/// Sort key of |x| for selection (top-k): the bits of |x|, which order like
/// the magnitudes for non-negative floats and put NaN above +Inf, so a NaN is
/// never dropped silently: it is the first thing transmitted.
RINGFLOW_HOST_DEVICE inline std::uint32_t magnitude_key(float x) {
  return ringflow::detail::float_bits(x) & 0x7fffffffu;
}

// ---------------------------------------------------------------------------
// The canonical order of a float sum over a block. A float sum depends on the
// order of its additions, so the CPU reference and the GPU kernel agree on one
// order, chosen to be what one warp does naturally: element i of the block
// goes to lane i % 32; each lane adds its elements in increasing i, starting
// from +0; then the 32 lane sums are folded pairwise, lane[l] += lane[l + h]
// for h = 16, 8, 4, 2, 1. That fold is what a __shfl_xor_sync butterfly
// computes in lane 0 (float addition is commutative, so after each step lanes
// l and l ^ h hold the same bits, and every lane ends with the fold's result).

inline constexpr unsigned sum_lanes = 32;

/// Folds 32 lane sums in the canonical tree; `lane` is overwritten.
RINGFLOW_HOST_DEVICE inline float fold_lanes(float* lane) {
  for (unsigned h = sum_lanes / 2; h > 0; h >>= 1) {
    for (unsigned l = 0; l < h; ++l) lane[l] = lane[l] + lane[l + h];
  }
  return lane[0];
}

/// Sum of |x[i]| for i < count in the canonical order (the sign block scale's
/// numerator). A NaN anywhere makes the sum NaN.
RINGFLOW_HOST_DEVICE inline float abs_sum_block(const float* x, std::size_t count) {
  float lane[sum_lanes] = {};
  std::size_t base = 0;
  for (; base + sum_lanes <= count; base += sum_lanes) {
    for (unsigned l = 0; l < sum_lanes; ++l) lane[l] = lane[l] + abs_value(x[base + l]);
  }
  for (unsigned l = 0; base + l < count; ++l) lane[l] = lane[l] + abs_value(x[base + l]);
  return fold_lanes(lane);
}

// ---------------------------------------------------------------------------
// fp16 / bf16: round to nearest even on encode, exact on decode.

struct encode_half {
  RINGFLOW_HOST_DEVICE std::uint16_t operator()(float x) const {
    return ringflow::detail::float_to_half_bits(x);
  }
};
struct decode_half {
  RINGFLOW_HOST_DEVICE float operator()(std::uint16_t b) const {
    return ringflow::detail::half_bits_to_float(b);
  }
};
struct encode_bf16 {
  RINGFLOW_HOST_DEVICE std::uint16_t operator()(float x) const {
    return ringflow::detail::float_to_bf16_bits(x);
  }
};
struct decode_bf16 {
  RINGFLOW_HOST_DEVICE float operator()(std::uint16_t b) const {
    return ringflow::detail::bf16_bits_to_float(b);
  }
};

// ---------------------------------------------------------------------------
// int8 block quantization with stochastic rounding.
//
// A block with scale s (its max |x|, or the max over ranks of that) and
// `levels` L maps x to q in [-L, L] with step s / L: q = floor(x/step) + b,
// b ~ Bernoulli(frac(x/step)), so E[q * step] = x (unbiased) and
// |q * step - x| < step.

/// Step of a block: scale / levels; 0 for an all-zero block.
RINGFLOW_HOST_DEVICE inline float int8_step(float scale, int levels) {
  return scale / static_cast<float>(levels);
}

/// Inverse step levels / scale that quantize_int8 multiplies by; 0 for a zero
/// or non-finite scale (the decoded block is then 0, or NaN through the scale).
RINGFLOW_HOST_DEVICE inline float int8_inv_step(float scale, int levels) {
  if (!(scale > 0.0f) || !(scale < ringflow::detail::bits_float(0x7f800000u))) return 0.0f;
  return static_cast<float>(levels) / scale;
}

/// floor(v) for |v| < 2^23, exactly: floorf on the GPU (one instruction), a
/// truncating conversion and a correction on the host (no <cmath>).
RINGFLOW_HOST_DEVICE inline float floor_small(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  const auto t = static_cast<float>(static_cast<int>(v));
  return t - (t > v ? 1.0f : 0.0f);
#endif
}

struct quantize_int8 {
  float inv_step;     ///< levels / scale, or 0 for a zero block
  int levels;         ///< L: q is clamped to [-L, L]
  std::uint64_t key;  ///< random stream of this call (see stream_key)

  /// q for element x and its draw u = uniform01(key, index), as a float (an
  /// exact integer in [-L, L]): what operator() returns, for callers that go
  /// on computing with it (the GPU kernels multiply it by the step without a
  /// round trip through int, and step the random state themselves).
  RINGFLOW_HOST_DEVICE float quantize_drawn(float x, float u) const {
    const float v = mul_rn(x, inv_step);
    // NaN/Inf make the block scale non-finite, so decode yields NaN for the
    // whole block anyway; encode 0 here to keep the conversion defined.
    if (is_nan(v)) return 0.0f;
    const float lim = static_cast<float>(levels);
    if (v >= lim) return lim;
    if (v <= -lim) return -lim;
    // |v| < 128: floor and v - floor are exact; the GPU makes the
    // data-dependent step a select.
    const float f = floor_small(v);
    return f + (u < v - f ? 1.0f : 0.0f);
  }

  /// `index` is the element's position in the bucket (the random counter).
  RINGFLOW_HOST_DEVICE std::int8_t operator()(float x, std::uint64_t index) const {
#if defined(__CUDA_ARCH__)
    return static_cast<std::int8_t>(static_cast<int>(quantize_drawn(x, uniform01(key, index))));
#else
    // The same q as quantize_drawn (checked for 10^8 inputs), in integer
    // arithmetic on comparisons: x86 compilers turn the float selects above
    // into branches, which mispredict half the time on random draws (4x slower).
    const float v = mul_rn(x, inv_step);
    if (is_nan(v)) return 0;
    const float lim = static_cast<float>(levels);
    if (v >= lim) return static_cast<std::int8_t>(levels);
    if (v <= -lim) return static_cast<std::int8_t>(-levels);
    int f = static_cast<int>(v);
    f -= static_cast<int>(static_cast<float>(f) > v);
    const float frac = v - static_cast<float>(f);
    f += static_cast<int>(uniform01(key, index) < frac);
    return static_cast<std::int8_t>(f);
#endif
  }
};

struct dequantize_int8 {
  float step;  ///< scale / levels
  RINGFLOW_HOST_DEVICE float operator()(std::int32_t q) const {
    return mul_rn(static_cast<float>(q), step);
  }
};

// ---------------------------------------------------------------------------
// 1-bit scaled sign: bit i of a 32-bit word is 1 when element i is negative;
// decoding gives -scale or +scale (zero and +0 decode as +scale).

RINGFLOW_HOST_DEVICE inline std::uint32_t sign_bit(float x) {
  return ringflow::detail::float_bits(x) >> 31;  // -0.0 counts as negative: harmless
}

/// Packs up to 32 values x[0..count) into one word (unused high bits are 0).
RINGFLOW_HOST_DEVICE inline std::uint32_t pack_signs(const float* x, unsigned count) {
  std::uint32_t w = 0;
  for (unsigned i = 0; i < count; ++i) w |= sign_bit(x[i]) << i;
  return w;
}

/// -scale or +scale: the bit is moved into the float's sign bit (branch-free).
RINGFLOW_HOST_DEVICE inline float unpack_sign(std::uint32_t word, unsigned bit, float scale) {
  return ringflow::detail::bits_float(ringflow::detail::float_bits(scale) ^
                                      (((word >> bit) & 1u) << 31));
}

// ---------------------------------------------------------------------------
// Error feedback, per element. With g the new gradient and r the residual:
//   c      = g + r                     (what is compressed this step)
//   r_next = c - decode(encode(c))     (what was not transmitted)
// A fused kernel reads g and r once and writes r_next and the payload once.

struct ef_compensate {
  RINGFLOW_HOST_DEVICE float operator()(float g, float r) const { return g + r; }
};

struct ef_residual {
  RINGFLOW_HOST_DEVICE float operator()(float c, float transmitted) const {
    return c - transmitted;
  }
};

}  // namespace ringflow::compress::kernels
