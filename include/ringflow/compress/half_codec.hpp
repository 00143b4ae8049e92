// Batch fp16 conversion for the CPU codec: F16C (x86-64, picked at run time)
// or the portable bit manipulation of core/half.hpp, bit-identical either way.
//
// The per-element functors in kernels.hpp stay the reference (and what the
// CUDA kernels call); this is only the CPU's fast loop over a whole bucket.
#pragma once

#include <cstdint>
#include <span>

namespace ringflow::compress {

/// How the CPU converts fp16 batches.
enum class fp16_path {
  portable,  ///< ringflow::detail::float_to_half_bits / half_bits_to_float per element
  f16c,      ///< x86 VCVTPS2PH / VCVTPH2PS, 8 lanes at a time (needs F16C and AVX2)
};

/// f16c when this CPU has F16C and AVX2, else portable (decided once).
fp16_path best_fp16_path() noexcept;
/// "portable" or "f16c".
const char* to_string(fp16_path path) noexcept;

/// out[i] = detail::float_to_half_bits(in[i]) for every i, bit for bit in
/// every path (round to nearest even, subnormals, Inf, NaN with its top
/// payload bits and the quiet bit set). Throws usage_error if the sizes
/// differ, not_supported_error for fp16_path::f16c on a CPU without it.
void encode_fp16(std::span<const float> in, std::span<std::uint16_t> out,
                 fp16_path path = best_fp16_path());

/// out[i] = detail::half_bits_to_float(in[i]) (with `add`: out[i] += it),
/// bit for bit in every path: a signalling NaN keeps its payload (the F16C
/// path rebuilds the NaN lanes, which the hardware would quiet).
void decode_fp16(std::span<const std::uint16_t> in, std::span<float> out, bool add = false,
                 fp16_path path = best_fp16_path());

}  // namespace ringflow::compress
