// Reader for IDX files (the MNIST / Fashion-MNIST container), gzipped or raw.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

#include "ringflow/data/error.hpp"

namespace ringflow::data {

/// IDX magic of a 3-d unsigned-byte array (images: count, rows, cols).
inline constexpr std::uint32_t idx_images_magic = 0x00000803;
/// IDX magic of a 1-d unsigned-byte array (labels: count).
inline constexpr std::uint32_t idx_labels_magic = 0x00000801;

/// The most payload bytes read_idx accepts (4 GiB; Fashion-MNIST's largest
/// file holds 47 MB): a header claiming more is refused before allocating.
inline constexpr std::size_t idx_max_payload_bytes = std::size_t{1} << 32;
/// The most bytes one item (the product of dims[1..]) may hold (16 MiB).
inline constexpr std::size_t idx_max_item_bytes = std::size_t{1} << 24;

/// An IDX array of unsigned bytes: its dimensions (the first is the item
/// count) and its payload in row-major order.
struct idx_array {
  std::vector<std::uint32_t> dims;
  std::vector<std::uint8_t> values;
  /// Item count the file header announces (dims[0] before any limit).
  std::size_t header_count = 0;

  /// Number of items: dims[0], or fewer when the read was limited.
  std::size_t count() const { return dims.empty() ? 0 : dims[0]; }
  /// Bytes per item: the product of dims[1..].
  std::size_t item_size() const;
};

/// Reads the IDX file at `path`. A file starting with the gzip magic
/// (1f 8b) is inflated on the fly; any other file is read as raw IDX.
/// `expected_magic` is the full 32-bit magic (idx_images_magic,
/// idx_labels_magic); only unsigned-byte arrays (type code 0x08) are
/// supported. With `limit` > 0 at most `limit` items are read (dims[0]
/// becomes min(limit, count)) and the rest of the file is not touched.
///
/// Throws data_error naming the path when the file is missing or
/// unreadable, the magic differs (found vs expected), the gzip stream is
/// corrupt (zlib's message), or the file holds fewer bytes than its header
/// promises (expected vs got). Sizes are checked before allocating: a
/// dimension after the first that is 0, an item over idx_max_item_bytes, a
/// payload over idx_max_payload_bytes or over what the file's length can
/// hold (raw: its length; gzip: about 1100 times it) is refused naming the
/// header field; memory grows only with the bytes actually read.
/// @code
///   auto labels = ringflow::data::read_idx("train-labels-idx1-ubyte.gz",
///                                          ringflow::data::idx_labels_magic);
/// @endcode
idx_array read_idx(const std::filesystem::path& path, std::uint32_t expected_magic,
                   std::size_t limit = 0);

/// Serializes `array` as an IDX file with magic 0x0000'08'<ndims>: raw bytes,
/// or gzip when `gzip` is true. For tests and for writing small subsets.
void write_idx(const std::filesystem::path& path, const idx_array& array, bool gzip);

/// Writes `bytes` to `path`, gzip-compressed when `gzip` is true (what
/// write_idx uses; handy to build test files).
void write_bytes(const std::filesystem::path& path, std::span<const std::uint8_t> bytes, bool gzip);

/// True when the file starts with the gzip magic bytes 1f 8b.
bool is_gzip_file(const std::filesystem::path& path);

}  // namespace ringflow::data
