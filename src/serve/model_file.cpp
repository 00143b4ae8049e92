// The model file: encoding (dense or sparse weights per layer), the sealed
// header, atomic writing, and a loader that checks every field before it
// allocates anything.
#include "ringflow/serve/model_file.hpp"

#include <fmt/format.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <fstream>
#include <iterator>

#include "ringflow/core/atomic_file.hpp"

namespace ringflow::serve {

static_assert(std::endian::native == std::endian::little,
              "the model file format is little-endian; add byte swapping for this host");

namespace {

constexpr std::array<char, 8> magic = {'R', 'F', 'L', 'O', 'W', 'M', 'D', 'L'};
constexpr std::size_t header_bytes = 32;
constexpr std::uint32_t max_layers = 4096;
constexpr std::uint64_t max_width = std::uint64_t{1} << 31;

std::uint32_t crc32_of(const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (n > 0) {
    const uInt chunk = static_cast<uInt>(std::min<std::size_t>(n, 1u << 30));
    crc = crc32(crc, p, chunk);
    p += chunk;
    n -= chunk;
  }
  return static_cast<std::uint32_t>(crc);
}

[[noreturn]] void fail(std::string_view name, const std::string& problem) {
  throw model_file_error(fmt::format("model file '{}' {}", name, problem));
}

class writer {
 public:
  template <class T>
  void put(T v) {
    out_.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  template <class T>
  void put_array(const T* v, std::size_t n) {
    if (n > 0) out_.append(reinterpret_cast<const char*>(v), n * sizeof(T));
  }
  std::string& bytes() { return out_; }

 private:
  std::string out_;
};

// Every read is checked against the bytes left; a refusal names the field.
class reader {
 public:
  reader(std::string_view name, const char* data, std::size_t n)
      : name_(name), data_(data), n_(n) {}
  template <class T>
  T get(const char* field) {
    need(sizeof(T), 1, field);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  // `count` elements of T, checked before allocating.
  template <class T>
  std::vector<T> get_array(std::uint64_t count, const char* field) {
    need(sizeof(T), count, field);
    std::vector<T> v(static_cast<std::size_t>(count));
    if (count > 0) std::memcpy(v.data(), data_ + pos_, v.size() * sizeof(T));
    pos_ += v.size() * sizeof(T);
    return v;
  }
  std::size_t left() const { return n_ - pos_; }
  std::size_t pos() const { return pos_; }
  [[noreturn]] void malformed(const std::string& what) const {
    fail(name_, fmt::format("is malformed at payload byte {} of {}: {} although the checksum "
                            "matches (written by another program?)",
                            pos_, n_, what));
  }

 private:
  void need(std::size_t size, std::uint64_t count, const char* field) const {
    if (count > (n_ - pos_) / size) {
      malformed(fmt::format("field '{}' needs {} x {} bytes but {} are left", field, count, size,
                            n_ - pos_));
    }
  }
  std::string_view name_;
  const char* data_;
  std::size_t n_;
  std::size_t pos_ = 0;
};

bool is_zero(float v) { return std::bit_cast<std::uint32_t>(v) == 0; }  // -0 is kept
bool is_zero(std::int8_t v) { return v == 0; }

// Dense, or sparse (bitmap + nonzero values) where smaller_sparse says so.
template <class T>
void put_weight_data(writer& w, const std::vector<T>& v, bool sparse) {
  if (!sparse) return w.put_array(v.data(), v.size());
  std::vector<std::uint8_t> bitmap((v.size() + 7) / 8, 0);
  std::vector<T> values;
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (!is_zero(v[i])) {
      bitmap[i / 8] = static_cast<std::uint8_t>(bitmap[i / 8] | (1u << (i % 8)));
      values.push_back(v[i]);
    }
  }
  w.put_array(bitmap.data(), bitmap.size());
  w.put<std::uint64_t>(values.size());
  w.put_array(values.data(), values.size());
}

template <class T>
bool smaller_sparse(const std::vector<T>& v) {
  std::size_t nnz = 0;
  for (const T x : v) nnz += is_zero(x) ? 0 : 1;
  return (v.size() + 7) / 8 + 8 + nnz * sizeof(T) < v.size() * sizeof(T);
}

template <class T>
std::vector<T> get_weight_data(reader& r, std::uint64_t count, bool sparse) {
  if (!sparse) return r.get_array<T>(count, "weights");
  const std::vector<std::uint8_t> bitmap =
      r.get_array<std::uint8_t>((count + 7) / 8, "weight bitmap");
  std::uint64_t set = 0;
  for (const std::uint8_t b : bitmap) set += static_cast<std::uint64_t>(std::popcount(b));
  if (count % 8 != 0 && (bitmap.back() >> (count % 8)) != 0) {
    r.malformed("the weight bitmap has bits set past its last weight");
  }
  const auto nnz = r.get<std::uint64_t>("nonzero count");
  if (nnz != set) {
    r.malformed(fmt::format("the nonzero count is {} but the bitmap marks {}", nnz, set));
  }
  const std::vector<T> values = r.get_array<T>(nnz, "nonzero weights");
  std::vector<T> out(static_cast<std::size_t>(count), T{});
  std::size_t next = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    if ((bitmap[i / 8] >> (i % 8)) & 1u) out[i] = values[next++];
  }
  return out;
}

}  // namespace

namespace detail {
std::string seal_model_payload(std::string_view payload, std::uint32_t version) {
  writer h;
  for (const char c : magic) h.put<char>(c);
  h.put<std::uint32_t>(version);
  h.put<std::uint32_t>(0);  // header crc, patched below
  h.put<std::uint64_t>(payload.size());
  h.put<std::uint32_t>(crc32_of(payload.data(), payload.size()));
  h.put<std::uint32_t>(0);  // reserved
  std::string out = std::move(h.bytes());
  const std::uint32_t hcrc = crc32_of(out.data(), header_bytes);
  std::memcpy(out.data() + 12, &hcrc, sizeof hcrc);
  out.append(payload);
  return out;
}
}  // namespace detail

std::string encode_model(const model& m) {
  if (m.empty()) throw model_file_error("serve::encode_model: the model is empty");
  writer w;
  w.put<std::uint32_t>(static_cast<std::uint32_t>(m.layers().size()));
  for (const dense_layer& l : m.layers()) {
    w.put<std::uint64_t>(static_cast<std::uint64_t>(l.in));
    w.put<std::uint64_t>(static_cast<std::uint64_t>(l.out));
    w.put<std::uint8_t>(static_cast<std::uint8_t>(l.act));
    w.put<std::uint8_t>(l.quantized() ? 1 : 0);
    const bool sparse = l.quantized() ? smaller_sparse(l.qweight) : smaller_sparse(l.weight);
    w.put<std::uint8_t>(sparse ? 1 : 0);
    w.put<std::uint8_t>(0);
    if (l.quantized()) {
      w.put<float>(l.input.scale);
      w.put<std::int32_t>(l.input.zero_point);
      w.put_array(l.weight_scale.data(), l.weight_scale.size());
    }
    w.put_array(l.bias.data(), l.bias.size());
    if (l.quantized()) {
      put_weight_data(w, l.qweight, sparse);
    } else {
      put_weight_data(w, l.weight, sparse);
    }
  }
  return detail::seal_model_payload(w.bytes());
}

model decode_model(std::string_view b, std::string_view name, int8_path path) {
  if (b.size() < header_bytes) {
    fail(name, fmt::format("is truncated: {} bytes, shorter than the {}-byte header", b.size(),
                           header_bytes));
  }
  if (!std::equal(magic.begin(), magic.end(), b.data())) {
    fail(name, "is not a ringflow model file (wrong magic bytes)");
  }
  std::array<char, header_bytes> h{};
  std::copy_n(b.data(), header_bytes, h.begin());
  std::uint32_t stored_hcrc = 0;
  std::memcpy(&stored_hcrc, h.data() + 12, 4);
  std::memset(h.data() + 12, 0, 4);
  if (crc32_of(h.data(), header_bytes) != stored_hcrc) {
    fail(name, "has a corrupt header (header checksum mismatch)");
  }
  reader hr(name, b.data() + magic.size(), header_bytes - magic.size());
  const auto version = hr.get<std::uint32_t>("format version");
  (void)hr.get<std::uint32_t>("header crc");
  const auto payload_bytes = hr.get<std::uint64_t>("payload bytes");
  const auto payload_crc = hr.get<std::uint32_t>("payload crc");
  if (version != model_format_version) {
    fail(name, fmt::format("has format version {}; this build reads version {}{}", version,
                           model_format_version,
                           version > model_format_version ? " (a newer ringflow wrote it?)" : ""));
  }
  const std::size_t have = b.size() - header_bytes;
  if (have < payload_bytes) {
    fail(name, fmt::format("is truncated: the header announces {} payload bytes but {} follow it",
                           payload_bytes, have));
  }
  if (have > payload_bytes) {
    fail(name, fmt::format("is corrupt: {} unexpected bytes follow the {}-byte payload",
                           have - payload_bytes, payload_bytes));
  }
  const char* payload = b.data() + header_bytes;
  if (const std::uint32_t crc = crc32_of(payload, have); crc != payload_crc) {
    fail(name, fmt::format("is corrupt: the payload checksum is {:08x} but the header says {:08x}",
                           crc, payload_crc));
  }

  reader r(name, payload, have);
  const auto count = r.get<std::uint32_t>("layer count");
  if (count < 1 || count > max_layers) {
    r.malformed(fmt::format("the layer count {} is not in [1, {}]", count, max_layers));
  }
  std::vector<dense_layer> layers;
  for (std::uint32_t i = 0; i < count; ++i) {
    const auto in = r.get<std::uint64_t>("inputs");
    const auto out = r.get<std::uint64_t>("outputs");
    if (in < 1 || out < 1 || in > max_width || out > max_width) {
      r.malformed(fmt::format("layer {} is {} x {}", i, in, out));
    }
    const auto act = r.get<std::uint8_t>("activation");
    const auto type = r.get<std::uint8_t>("weight type");
    const auto sparse = r.get<std::uint8_t>("sparse");
    const auto zero = r.get<std::uint8_t>("reserved");
    if (act > static_cast<std::uint8_t>(ad::activation::sigmoid) || type > 1 || sparse > 1 ||
        zero != 0) {
      r.malformed(fmt::format("layer {} has activation {}, weight type {}, sparse {}, reserved {}",
                              i, act, type, sparse, zero));
    }
    dense_layer l;
    l.in = static_cast<index>(in);
    l.out = static_cast<index>(out);
    l.act = static_cast<ad::activation>(act);
    if (type == 1) {
      l.input.scale = r.get<float>("input scale");
      l.input.zero_point = r.get<std::int32_t>("input zero point");
      l.weight_scale = r.get_array<float>(out, "weight scales");
    }
    l.bias = r.get_array<float>(out, "biases");
    if (type == 1) {
      l.qweight = get_weight_data<std::int8_t>(r, in * out, sparse != 0);
    } else {
      l.weight = get_weight_data<float>(r, in * out, sparse != 0);
    }
    layers.push_back(std::move(l));
  }
  if (r.left() != 0) {
    r.malformed(fmt::format("{} unexpected bytes follow the last layer", r.left()));
  }
  try {
    return model(std::move(layers), path);
  } catch (const usage_error& e) {
    fail(name, fmt::format("holds a model that does not hold together: {}", e.what()));
  }
}

void save_model(const std::filesystem::path& file, const model& m) {
  const std::string bytes = encode_model(m);
  try {
    ringflow::detail::write_file_atomically(file, bytes);
  } catch (const ringflow::detail::file_write_error& e) {
    throw model_file_error(
        fmt::format("model file '{}': {}{}", file.string(), e.what(),
                    e.replaced() ? "" : "; the previous file (if any) is untouched"));
  }
}

model load_model(const std::filesystem::path& file, int8_path path) {
  std::ifstream f(file, std::ios::binary);
  if (!f) {
    fail(file.string(),
         std::filesystem::exists(file) ? "cannot be opened for reading" : "does not exist");
  }
  const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) fail(file.string(), "could not be read");
  return decode_model(bytes, file.string(), path);
}

}  // namespace ringflow::serve
