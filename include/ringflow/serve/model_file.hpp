// The model file (.rfmodel): fp32, int8 and pruned (sparse) inference models,
// versioned and CRC-checked, written atomically; the loader refuses any file
// that is not exactly what a writer produced.
//
// Layout (little-endian), docs/inference.md has the full table:
//   header (32 bytes): magic "RFLOWMDL", u32 version, u32 header crc (of the
//     header with this field zeroed), u64 payload bytes, u32 payload crc, u32 0
//   payload: u32 layer count, then per layer u64 in, u64 out, u8 activation,
//     u8 weight type (0 fp32, 1 int8), u8 sparse (0 dense, 1 bitmap + values),
//     u8 0; int8 layers: f32 input scale, i32 input zero point, f32 weight
//     scales[out]; f32 bias[out]; weights [in * out] row-major, or with sparse
//     a bitmap of ceil(in * out / 8) bytes (bit i of byte i / 8: element i is
//     not zero), u64 nonzero count, then the nonzero values in order.
// Each layer's weights are stored sparse when that is smaller (a pruned model).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "ringflow/core/error.hpp"
#include "ringflow/serve/model.hpp"

namespace ringflow::serve {

/// A model file that cannot be read or written: the message names the file
/// and what was wrong (truncated, corrupt, another version, malformed).
class model_file_error : public error {
 public:
  using error::error;
};

/// The format version this build writes (and the newest it reads).
inline constexpr std::uint32_t model_format_version = 1;

/// The file's bytes for `m`.
std::string encode_model(const model& m);

/// The model in `bytes`; `name` (a path, say) goes into error messages.
/// Throws model_file_error for anything but a whole, uncorrupted file of a
/// version this build reads, whose fields all make sense.
model decode_model(std::string_view bytes, std::string_view name = "<memory>",
                   int8_path path = best_int8_path());

/// Writes `m` to `file` atomically (a reader sees the old file or the whole
/// new one: core/atomic_file.hpp). Throws model_file_error.
/// @code
///   serve::save_model("mlp.int8.rfmodel", serve::quantize(fp32, calib.data(), 1024));
///   serve::model m = serve::load_model("mlp.int8.rfmodel");
/// @endcode
void save_model(const std::filesystem::path& file, const model& m);

/// Reads a model written by save_model. Throws model_file_error.
model load_model(const std::filesystem::path& file, int8_path path = best_int8_path());

namespace detail {
/// A header for `payload` with the given version and both checksums: the
/// file's bytes. For tests that build well-sealed but malformed files.
std::string seal_model_payload(std::string_view payload,
                               std::uint32_t version = model_format_version);
}  // namespace detail

}  // namespace ringflow::serve
