// Batch CPU loops of the element-wise codecs (int8, 1-bit sign, bf16, fp32 add):
// a baseline loop that runs on any CPU, and AVX2 / AVX-512 clones chosen at
// run time, bit-identical to the per-element functors of kernels.hpp.
//
// The functors stay the reference (and what the CUDA kernels call); these are
// only the CPU's fast loops over a bucket. The library is compiled for
// baseline x86-64: the clones are built with __attribute__((target(...))) and
// called only where __builtin_cpu_supports says the CPU has the instructions.
// None of them enables FMA, and src/compress is compiled with
// -ffp-contract=off, so no multiply and add are ever fused into one rounding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ringflow/compress/kernels.hpp"

namespace ringflow::compress {

/// Which loops the CPU codecs run.
enum class codec_path {
  baseline,  ///< plain C++ (the compiler's baseline vectorization: SSE2 on x86-64)
  avx2,      ///< AVX2 (8 fp32 lanes; 64-bit multiplies from 32-bit halves)
  avx512,    ///< AVX-512 F/BW/DQ/VL (16 fp32 lanes, vpmullq for the random draw)
};

/// The fastest path this CPU runs, capped by RINGFLOW_CODEC_PATH (baseline,
/// avx2 or avx512; read once) so that a run can be forced onto the baseline
/// loops. Every path gives the same bits.
codec_path best_codec_path() noexcept;
/// Every path this CPU can run, baseline first (for tests and benchmarks).
std::vector<codec_path> supported_codec_paths();
/// "baseline", "avx2" or "avx512".
const char* to_string(codec_path path) noexcept;

namespace cpu {

// Every function is a loop over elements that gives exactly the bits of the
// functor named in its comment, on every path. A path this CPU lacks throws
// not_supported_error.

/// max over i of kernels::magnitude_key(x[i]), as a float: max |x|, NaN if
/// any element is NaN; +0 for n = 0.
float block_absmax(const float* x, std::size_t n, codec_path path = best_codec_path());

/// q[i] = quant(x[i], first_index + i) for i < n.
void quantize_int8(const float* x, std::int8_t* q, std::size_t n, std::uint64_t first_index,
                   const kernels::quantize_int8& quant, codec_path path = best_codec_path());

/// out[i] = (or += with `add`) kernels::dequantize_int8{step}(q[i]).
void dequantize_int8(const std::int8_t* q, float* out, std::size_t n, float step, bool add,
                     codec_path path = best_codec_path());

/// out[i] = kernels::encode_bf16{}(in[i]).
void encode_bf16(const float* in, std::uint16_t* out, std::size_t n,
                 codec_path path = best_codec_path());

/// out[i] = (or += with `add`) kernels::decode_bf16{}(in[i]).
void decode_bf16(const std::uint16_t* in, float* out, std::size_t n, bool add,
                 codec_path path = best_codec_path());

/// kernels::abs_sum_block(x, n): the same canonical lane order and bits.
float abs_sum_block(const float* x, std::size_t n, codec_path path = best_codec_path());

/// words[w] = kernels::pack_signs(x + 32w, min(32, n - 32w)) for w < ceil(n / 32).
void pack_signs(const float* x, std::uint32_t* words, std::size_t n,
                codec_path path = best_codec_path());

/// out[i] += kernels::unpack_sign(words[i / 32], i % 32, scale) for i < n.
void unpack_signs_add(const std::uint32_t* words, float* out, std::size_t n, float scale,
                      codec_path path = best_codec_path());

/// out[i] += in[i].
void add(const float* in, float* out, std::size_t n, codec_path path = best_codec_path());

}  // namespace cpu
}  // namespace ringflow::compress
