// IDX reading and writing, with gzip through zlib's inflate/deflate.
#include "ringflow/data/idx.hpp"

#include <fmt/format.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <string>

namespace ringflow::data {
namespace {

constexpr std::size_t chunk_size = std::size_t{1} << 16;

std::string quoted(const std::filesystem::path& p) { return fmt::format("'{}'", p.string()); }

// A sequential byte stream over a file, inflating it when it is gzipped.
class byte_source {
 public:
  explicit byte_source(const std::filesystem::path& path) : path_(path) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) {
      throw data_error(
          fmt::format("IDX file {} does not exist; check the path (or the data "
                      "folder, --data-dir) and that the dataset is installed",
                      quoted(path)));
    }
    if (std::filesystem::is_directory(path, ec)) {
      throw data_error(fmt::format("IDX file {} is a directory; pass the path of the file itself",
                                   quoted(path)));
    }
    file_.open(path, std::ios::binary);
    if (!file_) {
      throw data_error(fmt::format("cannot open IDX file {}: {}; check its permissions",
                                   quoted(path), std::strerror(errno)));
    }
    // Peek at the first two bytes to decide between gzip and raw.
    const std::size_t got = read_raw(in_.data(), 2);
    in_len_ = got;
    in_pos_ = 0;
    gzip_ = got == 2 && static_cast<unsigned char>(in_[0]) == 0x1f &&
            static_cast<unsigned char>(in_[1]) == 0x8b;
    if (gzip_) {
      std::memset(&zs_, 0, sizeof zs_);
      // 15 + 16: a gzip wrapper is required (no raw zlib streams).
      if (inflateInit2(&zs_, 15 + 16) != Z_OK) {
        throw data_error(
            fmt::format("zlib could not start inflating {}: out of memory?", quoted(path)));
      }
      zs_live_ = true;
    }
  }

  ~byte_source() {
    if (zs_live_) inflateEnd(&zs_);
  }
  byte_source(const byte_source&) = delete;
  byte_source& operator=(const byte_source&) = delete;

  bool gzip() const { return gzip_; }

  // Reads up to n bytes into dst; returns fewer only at the end of the data
  // (see ended_early() for a gzip stream cut short). Corrupt gzip throws.
  std::size_t read(void* dst, std::size_t n) {
    auto* out = static_cast<unsigned char*>(dst);
    std::size_t done = 0;
    if (!gzip_) {
      // Serve the peeked bytes first.
      while (done < n && in_pos_ < in_len_)
        out[done++] = static_cast<unsigned char>(in_[in_pos_++]);
      return done + read_raw(out + done, n - done);
    }
    while (done < n && !finished_) {
      if (zs_.avail_in == 0) {
        if (in_pos_ < in_len_) {
          // The two peeked bytes.
          zs_.next_in = reinterpret_cast<Bytef*>(in_.data() + in_pos_);
          zs_.avail_in = static_cast<uInt>(in_len_ - in_pos_);
          in_pos_ = in_len_;
        } else {
          in_len_ = read_raw(in_.data(), in_.size());
          in_pos_ = in_len_;
          if (in_len_ == 0) {
            // Input exhausted before the end of the gzip stream.
            ended_early_ = true;
            finished_ = true;
            break;
          }
          zs_.next_in = reinterpret_cast<Bytef*>(in_.data());
          zs_.avail_in = static_cast<uInt>(in_len_);
        }
      }
      const std::size_t want = std::min<std::size_t>(n - done, std::numeric_limits<uInt>::max());
      zs_.next_out = out + done;
      zs_.avail_out = static_cast<uInt>(want);
      const int rc = inflate(&zs_, Z_NO_FLUSH);
      done += want - zs_.avail_out;
      if (rc == Z_STREAM_END) {
        // Concatenated gzip members (as `cat a.gz b.gz` makes) continue the data.
        if (zs_.avail_in == 0) {
          in_len_ = read_raw(in_.data(), in_.size());
          in_pos_ = in_len_;
          zs_.next_in = reinterpret_cast<Bytef*>(in_.data());
          zs_.avail_in = static_cast<uInt>(in_len_);
        }
        if (zs_.avail_in == 0) {
          finished_ = true;
          break;
        }
        inflateReset(&zs_);
        continue;
      }
      if (rc == Z_BUF_ERROR) continue;  // needs more input; handled at the top
      if (rc != Z_OK) {
        throw data_error(fmt::format(
            "{} is not a valid gzip stream: zlib says '{}' (code {}) after {} bytes of data; "
            "the file is corrupt: download or reinstall it",
            quoted(path_), zs_.msg != nullptr ? zs_.msg : zError(rc), rc, total_ + done));
      }
    }
    total_ += done;
    return done;
  }

  // True when a gzip file ended in the middle of its compressed stream.
  bool ended_early() const { return ended_early_; }

 private:
  std::size_t read_raw(void* dst, std::size_t n) {
    file_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    const auto got = static_cast<std::size_t>(file_.gcount());
    if (got < n && file_.bad()) {
      throw data_error(fmt::format("reading {} failed: {}", quoted(path_), std::strerror(errno)));
    }
    return got;
  }

  std::filesystem::path path_;
  std::ifstream file_;
  std::array<char, chunk_size> in_{};
  std::size_t in_len_ = 0;
  std::size_t in_pos_ = 0;
  bool gzip_ = false;
  z_stream zs_{};
  bool zs_live_ = false;
  bool finished_ = false;
  bool ended_early_ = false;
  std::size_t total_ = 0;
};

std::uint32_t load_be32(const unsigned char* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         std::uint32_t{p[3]};
}

void store_be32(unsigned char* p, std::uint32_t v) {
  p[0] = static_cast<unsigned char>(v >> 24);
  p[1] = static_cast<unsigned char>(v >> 16);
  p[2] = static_cast<unsigned char>(v >> 8);
  p[3] = static_cast<unsigned char>(v);
}

std::string describe_magic(std::uint32_t magic) {
  if (magic == idx_images_magic) return "0x00000803 (IDX images, 3-d unsigned bytes)";
  if (magic == idx_labels_magic) return "0x00000801 (IDX labels, 1-d unsigned bytes)";
  if ((magic >> 16) == 0 && (magic >> 8 & 0xff) == 0x08) {
    return fmt::format("0x{:08x} (IDX unsigned bytes, {} dimensions)", magic, magic & 0xff);
  }
  return fmt::format("0x{:08x}", magic);
}

std::string truncation_message(const std::filesystem::path& path, const byte_source& src,
                               std::string_view what, std::size_t expected, std::size_t got) {
  return fmt::format(
      "{} is truncated: {} needs {} bytes{} but got only {}{}; "
      "the download was cut short: fetch or reinstall the file",
      quoted(path), what, expected, src.gzip() ? " (after gunzip)" : "", got,
      src.ended_early() ? " (the gzip stream itself ends early)" : "");
}

// Deflate cannot compress better than about 1032:1; a gzip file cannot
// inflate to more than this many times its own length.
constexpr std::uintmax_t max_deflate_ratio = 1100;

// The name of header field `i` (dimension i) in messages.
std::string dim_name(std::uint32_t magic, std::size_t i) {
  static constexpr const char* image_names[] = {"count", "rows", "cols"};
  if (magic == idx_images_magic && i < 3) return image_names[i];
  return i == 0 ? "count" : fmt::format("dimension {}", i);
}

std::string dim_field(std::uint32_t magic, std::size_t i) {
  return fmt::format("'{}' (dimension {})", dim_name(magic, i), i);
}

std::string describe_dims(std::uint32_t magic, const std::vector<std::uint32_t>& dims) {
  std::string out;
  for (std::size_t i = 0; i < dims.size(); ++i) {
    out += fmt::format("{}{}={}", i ? ", " : "", dim_name(magic, i), dims[i]);
  }
  return out;
}

// The file's length; the largest value when it has none (a pipe), where the
// incremental reading below still bounds the memory.
std::uintmax_t file_size_of(const std::filesystem::path& path) {
  std::error_code ec;
  const std::uintmax_t n = std::filesystem::file_size(path, ec);
  return ec ? std::numeric_limits<std::uintmax_t>::max() : n;
}

}  // namespace

std::size_t idx_array::item_size() const {
  std::size_t s = 1;
  for (std::size_t i = 1; i < dims.size(); ++i) s *= dims[i];
  return s;
}

bool is_gzip_file(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  unsigned char m[2] = {0, 0};
  f.read(reinterpret_cast<char*>(m), 2);
  return f.gcount() == 2 && m[0] == 0x1f && m[1] == 0x8b;
}

idx_array read_idx(const std::filesystem::path& path, std::uint32_t expected_magic,
                   std::size_t limit) {
  byte_source src(path);
  unsigned char head[4];
  std::size_t got = src.read(head, 4);
  if (got < 4) {
    throw data_error(truncation_message(path, src, "the IDX magic", 4, got));
  }
  const std::uint32_t magic = load_be32(head);
  if (magic != expected_magic) {
    throw data_error(fmt::format(
        "{} has IDX magic {} but {} was expected{}; check that the right file was passed",
        quoted(path), describe_magic(magic), describe_magic(expected_magic),
        head[0] == 0x1f && head[1] == 0x8b ? " (it looks gzipped twice)" : ""));
  }
  const std::size_t ndims = magic & 0xff;
  if ((magic >> 8 & 0xff) != 0x08 || ndims == 0) {
    throw data_error(
        fmt::format("{}: only unsigned-byte IDX arrays with at least one dimension "
                    "are supported (magic 0x{:08x})",
                    quoted(path), magic));
  }
  std::vector<unsigned char> dim_bytes(4 * ndims);
  got = src.read(dim_bytes.data(), dim_bytes.size());
  if (got < dim_bytes.size()) {
    throw data_error(
        truncation_message(path, src, "the IDX header", 4 + dim_bytes.size(), 4 + got));
  }
  idx_array out;
  out.dims.resize(ndims);
  for (std::size_t i = 0; i < ndims; ++i) out.dims[i] = load_be32(&dim_bytes[4 * i]);

  const std::size_t header = 4 + 4 * ndims;
  // Every size the header claims is checked before anything is allocated:
  // a corrupt header must fail with a message, not ask for terabytes.
  std::size_t item = 1;
  for (std::size_t i = 1; i < ndims; ++i) {
    if (out.dims[i] == 0) {
      throw data_error(
          fmt::format("{}: IDX header field {} is 0; every dimension after the item "
                      "count must be at least 1 (the file is corrupt)",
                      quoted(path), dim_field(magic, i)));
    }
    if (out.dims[i] > idx_max_item_bytes / item) {
      throw data_error(fmt::format(
          "{}: IDX header field {} = {} makes one item larger than {} bytes (the limit); the "
          "file is corrupt",
          quoted(path), dim_field(magic, i), out.dims[i], idx_max_item_bytes));
    }
    item *= out.dims[i];
  }
  const std::size_t count = out.dims[0];
  const std::size_t keep = limit > 0 ? std::min(limit, count) : count;
  const std::string what =
      fmt::format("reading {} items of {} bytes (the header announces {} items: {})", keep, item,
                  count, describe_dims(magic, out.dims));
  // count < 2^32 and item <= 2^24, so the product cannot overflow.
  const std::size_t payload = keep * item;
  if (payload > idx_max_payload_bytes) {
    throw data_error(fmt::format(
        "{}: IDX header field {} = {} with {} bytes per item claims {} bytes, more than the {} "
        "bytes this reader accepts; the file is corrupt (or pass a limit)",
        quoted(path), dim_field(magic, 0), count, item, payload, idx_max_payload_bytes));
  }
  // The payload must fit in what the file can hold: its length when raw,
  // deflate's best compression ratio times its length when gzipped.
  const std::uintmax_t file_bytes = file_size_of(path);
  if (!src.gzip() && header + payload > file_bytes) {
    throw data_error(truncation_message(path, src, what, header + payload,
                                        static_cast<std::size_t>(file_bytes)));
  }
  if (src.gzip() && payload / max_deflate_ratio > file_bytes) {
    // (file_bytes is at most a few GB here, so the product below is exact.)
    throw data_error(fmt::format(
        "{}: IDX header field {} = {} claims {} payload bytes, but a gzip file of {} bytes "
        "inflates to at most about {}; the file is corrupt or truncated",
        quoted(path), dim_field(magic, 0), count, payload, file_bytes,
        file_bytes * max_deflate_ratio));
  }
  out.header_count = count;
  out.dims[0] = static_cast<std::uint32_t>(keep);
  // Grow the buffer as data arrives (doubling), so even a claim that passed
  // the checks above costs memory only for the bytes really present.
  got = 0;
  while (got < payload) {
    const std::size_t want = std::min(payload, std::max(2 * got, std::size_t{1} << 20));
    out.values.resize(want);
    const std::size_t n = src.read(out.values.data() + got, want - got);
    got += n;
    if (got < want) break;
  }
  out.values.resize(got);
  if (got < payload) {
    throw data_error(truncation_message(path, src, what, header + payload, header + got));
  }
  if (src.gzip() && keep == count) {
    // Drive inflate through the gzip trailer so a CRC or length mismatch
    // (corruption that still decodes) is reported too.
    unsigned char extra[1];
    (void)src.read(extra, 1);
  }
  return out;
}

void write_idx(const std::filesystem::path& path, const idx_array& array, bool gzip) {
  if (array.dims.empty() || array.dims.size() > 255) {
    throw usage_error("write_idx: an IDX array needs between 1 and 255 dimensions");
  }
  std::size_t expect = 1;
  for (auto d : array.dims) expect *= d;
  if (expect != array.values.size()) {
    throw usage_error(fmt::format("write_idx: dims hold {} values but {} were given", expect,
                                  array.values.size()));
  }
  std::vector<unsigned char> bytes(4 + 4 * array.dims.size());
  store_be32(bytes.data(), 0x00000800u | static_cast<std::uint32_t>(array.dims.size()));
  for (std::size_t i = 0; i < array.dims.size(); ++i) store_be32(&bytes[4 + 4 * i], array.dims[i]);
  bytes.insert(bytes.end(), array.values.begin(), array.values.end());

  write_bytes(path, bytes, gzip);
}

void write_bytes(const std::filesystem::path& path, std::span<const std::uint8_t> bytes,
                 bool gzip) {
  std::vector<unsigned char> compressed;
  std::span<const std::uint8_t> data = bytes;
  if (gzip) {
    if (bytes.size() > std::numeric_limits<uInt>::max()) {
      throw usage_error("write_bytes: more than 4 GiB at once is not supported");
    }
    z_stream zs{};
    if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) !=
        Z_OK) {
      throw data_error("write_bytes: zlib could not start deflating");
    }
    compressed.resize(deflateBound(&zs, static_cast<uLong>(bytes.size())) + 32);
    zs.next_in = const_cast<Bytef*>(bytes.data());
    zs.avail_in = static_cast<uInt>(bytes.size());
    zs.next_out = compressed.data();
    zs.avail_out = static_cast<uInt>(compressed.size());
    const int rc = deflate(&zs, Z_FINISH);
    compressed.resize(zs.total_out);
    deflateEnd(&zs);
    if (rc != Z_STREAM_END) {
      throw data_error(fmt::format("write_bytes: zlib deflate failed (code {})", rc));
    }
    data = compressed;
  }
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  if (!f) {
    throw data_error(fmt::format("cannot write {}: {}", quoted(path), std::strerror(errno)));
  }
}

}  // namespace ringflow::data
