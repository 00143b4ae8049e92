// Checkpoint encoding, atomic writing (temp + fsync + rename + fsync dir), validated loading,
// collective save/load.
#include "ringflow/train/checkpoint.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/atomic_file.hpp"

namespace ringflow::train {

static_assert(std::endian::native == std::endian::little,
              "the checkpoint format is little-endian; add byte swapping for this host");

namespace {

constexpr std::array<char, 8> magic = {'R', 'F', 'L', 'O', 'W', 'C', 'K', 'P'};
constexpr std::size_t header_bytes = 32;

std::uint32_t crc32_of(const unsigned char* data, std::size_t n) {
  uLong crc = crc32(0L, Z_NULL, 0);
  while (n > 0) {
    const uInt chunk = static_cast<uInt>(std::min<std::size_t>(n, 1u << 30));
    crc = crc32(crc, data, chunk);
    data += chunk;
    n -= chunk;
  }
  return static_cast<std::uint32_t>(crc);
}

[[noreturn]] void fail(const std::filesystem::path& file, const std::string& problem) {
  throw checkpoint_error(fmt::format("checkpoint '{}': {}", file.string(), problem));
}

// ---------------------------------------------------------------------------
// Encoding

class writer {
 public:
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const char*>(&v);
    out_.append(p, sizeof v);
  }
  void put_string(const std::string& s) {
    put<std::uint64_t>(s.size());
    out_ += s;
  }
  void put_floats(std::span<const float> v) {
    put<std::uint64_t>(v.size());
    out_.append(reinterpret_cast<const char*>(v.data()), v.size_bytes());
  }
  std::string& bytes() { return out_; }

 private:
  std::string out_;
};

// Reads the payload field by field; every length and count is checked
// against the bytes left before anything is allocated, and a refusal names
// the field.
class reader {
 public:
  reader(const std::filesystem::path& file, const unsigned char* data, std::size_t n)
      : file_(file), data_(data), n_(n) {}
  template <class T>
  T get(const char* field) {
    need(sizeof(T), field, 1);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  std::string get_string(const char* field) {
    const auto len = get<std::uint64_t>(field);
    need(len, field, len);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<std::size_t>(len));
    pos_ += static_cast<std::size_t>(len);
    return s;
  }
  std::vector<float> get_floats(const char* field) {
    const auto len = get<std::uint64_t>(field);
    if (len > (n_ - pos_) / sizeof(float)) malformed(field, len);
    std::vector<float> v(static_cast<std::size_t>(len));
    // memcpy with a null destination is undefined even for 0 bytes, and an
    // empty vector's data() may be null.
    if (len > 0) std::memcpy(v.data(), data_ + pos_, v.size() * sizeof(float));
    pos_ += v.size() * sizeof(float);
    return v;
  }
  // A count of entries that each take at least `min_entry_bytes`: more than
  // the bytes left can hold is refused before any is read.
  std::uint64_t get_count(const char* field, std::size_t min_entry_bytes) {
    const auto count = get<std::uint64_t>(field);
    if (count > (n_ - pos_) / min_entry_bytes) malformed(field, count);
    return count;
  }
  bool at_end() const { return pos_ == n_; }
  [[noreturn]] void malformed(const char* field, std::uint64_t value) const {
    fail(file_, fmt::format("the payload is malformed at byte {} of {}: field '{}' = {} does not "
                            "fit in the {} bytes left although the checksum matches (written by "
                            "another program?)",
                            pos_, n_, field, value, n_ - pos_));
  }
  [[noreturn]] void trailing() const {
    fail(file_, fmt::format("the payload is malformed: {} unexpected bytes follow its last field "
                            "at byte {} of {} although the checksum matches (written by another "
                            "program?)",
                            n_ - pos_, pos_, n_));
  }

 private:
  void need(std::uint64_t k, const char* field, std::uint64_t value) const {
    if (k > n_ - pos_) malformed(field, value);
  }
  const std::filesystem::path& file_;
  const unsigned char* data_;
  std::size_t n_;
  std::size_t pos_ = 0;
};

struct saved_param {
  std::string name;
  std::string shape;
  std::vector<float> values;
};

struct parsed_checkpoint {
  std::uint32_t version = 0;
  std::int64_t step = 0;
  int world_size = 0;
  bool has_sampler = false;
  data::sampler_state sampler;
  std::vector<saved_param> params;
  std::string opt_kind;
  std::int64_t opt_steps = 0;
  std::vector<std::pair<std::string, std::vector<float>>> opt_buffers;
  std::map<std::string, std::string> extra;
  bool has_compression = false;
  std::string compression_spec;
  std::vector<std::vector<compress::bucket_state>> compression;  // per rank
};

// One rank's compression state: buckets {index, spec, error feedback,
// residual, counter, warm starts {key, values}}.
std::string encode_compression(const std::vector<compress::bucket_state>& st) {
  writer w;
  w.put<std::uint64_t>(st.size());
  for (const auto& b : st) {
    w.put<std::uint64_t>(b.bucket);
    w.put_string(b.spec);
    w.put<std::uint8_t>(b.error_feedback ? 1 : 0);
    w.put_floats(b.residual);
    w.put<std::uint64_t>(b.codec.counter);
    w.put<std::uint64_t>(b.codec.warm_start.size());
    for (const auto& [key, q] : b.codec.warm_start) {
      w.put<std::uint64_t>(key);
      w.put_floats(q);
    }
  }
  return std::move(w.bytes());
}

// The per-rank compression states of a file: blobs[r] = encode_compression(rank r's state).
struct compression_blobs {
  std::string spec;
  std::vector<std::string> ranks;
};

std::string encode(const training_state& s, const compression_blobs* comp) {
  writer w;
  w.put<std::int64_t>(s.step);
  w.put<std::int32_t>(s.world_size);
  w.put<std::uint8_t>(s.sampler ? 1 : 0);
  const data::sampler_state ss = s.sampler ? s.sampler->state() : data::sampler_state{};
  w.put<std::uint64_t>(ss.seed);
  w.put<std::uint64_t>(ss.epoch);
  w.put<std::uint64_t>(ss.position);
  w.put<std::uint64_t>(s.params.size());
  for (const auto& p : s.params) {
    w.put_string(p.name);
    w.put_string(p.tensor.shape().str());
    w.put_floats(s.params.all_values().subspan(p.offset, p.size));
  }
  w.put_string(s.optimizer.kind);
  w.put<std::int64_t>(s.optimizer.get_steps ? s.optimizer.get_steps() : 0);
  w.put<std::uint64_t>(s.optimizer.buffers.size());
  for (const auto& [name, buf] : s.optimizer.buffers) {
    w.put_string(name);
    w.put_floats(buf);
  }
  w.put<std::uint64_t>(s.extra.size());
  for (const auto& [k, v] : s.extra) {
    w.put_string(k);
    w.put_string(v);
  }
  // Version 2: the compression state, one section per rank.
  w.put<std::uint8_t>(comp != nullptr ? 1 : 0);
  if (comp != nullptr) {
    w.put_string(comp->spec);
    w.put<std::uint64_t>(comp->ranks.size());
    for (const auto& blob : comp->ranks) w.put_string(blob);
  }
  std::string payload = std::move(w.bytes());

  writer h;
  for (const char c : magic) h.put<char>(c);
  h.put<std::uint32_t>(checkpoint_format_version);
  h.put<std::uint32_t>(0);  // header crc, patched below
  h.put<std::uint64_t>(payload.size());
  h.put<std::uint32_t>(
      crc32_of(reinterpret_cast<const unsigned char*>(payload.data()), payload.size()));
  h.put<std::uint32_t>(0);  // reserved
  std::string out = std::move(h.bytes());
  // The header crc covers the header with its own field zeroed.
  const std::uint32_t hcrc =
      crc32_of(reinterpret_cast<const unsigned char*>(out.data()), header_bytes);
  std::memcpy(out.data() + 12, &hcrc, sizeof hcrc);
  out += payload;
  return out;
}

parsed_checkpoint parse(const std::filesystem::path& file, const std::vector<unsigned char>& b) {
  if (b.size() < header_bytes) {
    fail(file, fmt::format("is truncated: {} bytes, shorter than the {}-byte header", b.size(),
                           header_bytes));
  }
  if (!std::equal(magic.begin(), magic.end(), reinterpret_cast<const char*>(b.data()))) {
    fail(file, "is not a ringflow checkpoint (wrong magic bytes)");
  }
  std::array<unsigned char, header_bytes> h{};
  std::copy_n(b.begin(), header_bytes, h.begin());
  std::uint32_t stored_hcrc = 0;
  std::memcpy(&stored_hcrc, h.data() + 12, 4);
  std::memset(h.data() + 12, 0, 4);
  if (crc32_of(h.data(), header_bytes) != stored_hcrc) {
    fail(file, "the header is corrupt (header checksum mismatch); use an older checkpoint");
  }
  reader hr(file, b.data() + magic.size(), header_bytes - magic.size());
  parsed_checkpoint out;
  out.version = hr.get<std::uint32_t>("format version");
  (void)hr.get<std::uint32_t>("header crc");
  const auto payload_bytes = hr.get<std::uint64_t>("payload bytes");
  const auto payload_crc = hr.get<std::uint32_t>("payload crc");
  if (out.version == 0 || out.version > checkpoint_format_version) {
    fail(file, fmt::format("has format version {}; this build reads versions 1 to {} (a newer "
                           "ringflow wrote it?)",
                           out.version, checkpoint_format_version));
  }
  const std::size_t have = b.size() - header_bytes;
  if (have < payload_bytes) {
    fail(file, fmt::format("is truncated: the header announces {} payload bytes but only {} "
                           "follow it",
                           payload_bytes, have));
  }
  if (have > payload_bytes) {
    fail(file, fmt::format("is corrupt: {} unexpected bytes follow the {}-byte payload",
                           have - payload_bytes, payload_bytes));
  }
  const unsigned char* payload = b.data() + header_bytes;
  const std::uint32_t crc = crc32_of(payload, have);
  if (crc != payload_crc) {
    fail(file, fmt::format("is corrupt: the payload checksum is {:08x} but the header says "
                           "{:08x}; use an older checkpoint",
                           crc, payload_crc));
  }
  reader r(file, payload, have);
  out.step = r.get<std::int64_t>("step");
  out.world_size = r.get<std::int32_t>("world size");
  if (out.world_size < 1) {
    fail(file, fmt::format("is malformed: field 'world size' = {} must be at least 1 although "
                           "the checksum matches (written by another program?)",
                           out.world_size));
  }
  out.has_sampler = r.get<std::uint8_t>("has sampler") != 0;
  out.sampler.seed = r.get<std::uint64_t>("sampler seed");
  out.sampler.epoch = r.get<std::uint64_t>("sampler epoch");
  out.sampler.position = r.get<std::uint64_t>("sampler position");
  // Smallest encodings: a parameter is three lengths (name, shape, values),
  // a buffer two, an extra entry two.
  const auto nparams = r.get_count("parameter count", 24);
  for (std::uint64_t i = 0; i < nparams; ++i) {
    saved_param p;
    p.name = r.get_string("parameter name");
    p.shape = r.get_string("parameter shape");
    p.values = r.get_floats("parameter values");
    out.params.push_back(std::move(p));
  }
  out.opt_kind = r.get_string("optimizer kind");
  out.opt_steps = r.get<std::int64_t>("optimizer steps");
  const auto nbuf = r.get_count("optimizer buffer count", 16);
  for (std::uint64_t i = 0; i < nbuf; ++i) {
    std::string name = r.get_string("optimizer buffer name");
    out.opt_buffers.emplace_back(std::move(name), r.get_floats("optimizer buffer values"));
  }
  const auto nextra = r.get_count("extra count", 16);
  for (std::uint64_t i = 0; i < nextra; ++i) {
    std::string k = r.get_string("extra key");
    out.extra[std::move(k)] = r.get_string("extra value");
  }
  if (out.version >= 2) {
    out.has_compression = r.get<std::uint8_t>("has compression") != 0;
    if (out.has_compression) {
      out.compression_spec = r.get_string("compression spec");
      const auto nranks = r.get_count("compression rank count", 8);
      for (std::uint64_t k = 0; k < nranks; ++k) {
        const std::string blob = r.get_string("compression state of a rank");
        reader cr(file, reinterpret_cast<const unsigned char*>(blob.data()), blob.size());
        std::vector<compress::bucket_state> st;
        // Smallest encodings: a bucket is 6 fields of 8 bytes and a flag, a warm start two.
        const auto nb = cr.get_count("compression bucket count", 41);
        for (std::uint64_t i = 0; i < nb; ++i) {
          compress::bucket_state b;
          b.bucket = static_cast<std::size_t>(cr.get<std::uint64_t>("compression bucket"));
          b.spec = cr.get_string("compression bucket spec");
          b.error_feedback = cr.get<std::uint8_t>("compression error feedback") != 0;
          b.residual = cr.get_floats("compression residual");
          b.codec.counter = cr.get<std::uint64_t>("compression counter");
          const auto nw = cr.get_count("compression warm start count", 16);
          for (std::uint64_t j = 0; j < nw; ++j) {
            const auto key = cr.get<std::uint64_t>("compression warm start key");
            b.codec.warm_start[key] = cr.get_floats("compression warm start values");
          }
          st.push_back(std::move(b));
        }
        if (!cr.at_end()) cr.trailing();
        out.compression.push_back(std::move(st));
      }
    }
  }
  if (!r.at_end()) r.trailing();
  return out;
}

// The sampler position this rank resumes at: positions count this rank's
// samples, so a checkpoint of W ranks at position p has consumed the first
// p * W entries of the epoch's permutation; W' ranks resume at p * W / W'.
std::optional<data::sampler_state> converted_sampler(const parsed_checkpoint& c,
                                                     const data::sampler& s) {
  data::sampler_state st = c.sampler;
  const auto w_old = static_cast<std::uint64_t>(c.world_size);
  const auto w_new = static_cast<std::uint64_t>(s.world_size());
  if (w_old != w_new) {
    if ((st.position * w_old) % w_new != 0) return std::nullopt;
    st.position = st.position * w_old / w_new;
  }
  if (st.position > s.per_rank()) return std::nullopt;
  return st;
}

// Every check that can refuse the checkpoint, before anything is modified.
// `rank` of `ranks` is the caller's place (0 of 1 for the one-process overloads).
void check_matches(const std::filesystem::path& file, const parsed_checkpoint& c,
                   const training_state& s, int rank, int ranks) {
  if (c.params.size() != s.params.size()) {
    fail(file, fmt::format("does not match the model: it holds {} parameters, the model has {}",
                           c.params.size(), s.params.size()));
  }
  for (std::size_t i = 0; i < c.params.size(); ++i) {
    const auto& saved = c.params[i];
    const auto& p = s.params[i];
    const std::string shape = p.tensor.shape().str();
    if (saved.name != p.name || saved.shape != shape || saved.values.size() != p.size) {
      fail(file, fmt::format("does not match the model: parameter {} is '{}' {} in the "
                             "checkpoint but '{}' {} in the model",
                             i, saved.name, saved.shape, p.name, shape));
    }
  }
  if (c.opt_kind != s.optimizer.kind) {
    fail(file, fmt::format("holds optimizer state of kind '{}' but the optimizer is '{}'",
                           c.opt_kind, s.optimizer.kind));
  }
  if (c.opt_buffers.size() != s.optimizer.buffers.size()) {
    fail(file, fmt::format("holds {} '{}' optimizer buffers, the optimizer has {}",
                           c.opt_buffers.size(), c.opt_kind, s.optimizer.buffers.size()));
  }
  const bool sharded = !s.optimizer.pieces.empty();
  for (std::size_t i = 0; i < c.opt_buffers.size(); ++i) {
    const auto& [name, values] = c.opt_buffers[i];
    const auto& [want_name, span] = s.optimizer.buffers[i];
    if (name != want_name) {
      fail(file, fmt::format("optimizer buffer {} is '{}' in the checkpoint but '{}' in the "
                             "optimizer",
                             i, name, want_name));
    }
    if (!sharded && values.size() != span.size()) {
      fail(file, fmt::format("optimizer buffer {} is '{}' of {} elements in the checkpoint but "
                             "'{}' of {} in the optimizer",
                             i, name, values.size(), want_name, span.size()));
    }
    // Sharded: the file holds the parameters' layout (or nothing, e.g. SGD
    // without momentum); this rank takes its pieces of it.
    if (sharded && values.size() != s.params.numel() && !values.empty()) {
      fail(file, fmt::format("optimizer buffer {} '{}' has {} elements in the checkpoint, neither "
                             "the {} of the parameters' layout nor none",
                             i, name, values.size(), s.params.numel()));
    }
    if (sharded && values.empty() && !span.empty()) {
      fail(file, fmt::format("optimizer buffer {} '{}' is empty in the checkpoint but this rank's "
                             "pieces of it hold {} elements",
                             i, name, span.size()));
    }
  }
  if (s.sampler != nullptr) {
    if (!c.has_sampler) fail(file, "holds no sampler state but one was asked for");
    if (!converted_sampler(c, *s.sampler)) {
      fail(file, fmt::format("its sampler position {} of {} ranks does not map onto {} ranks "
                             "with {} samples each",
                             c.sampler.position, c.world_size, s.sampler->world_size(),
                             s.sampler->per_rank()));
    }
  }
  if (s.compression != nullptr) {
    const std::string& spec = s.compression->spec();
    if (!c.has_compression) {
      fail(file,
           fmt::format("holds no compression state but the trainer compresses with '{}' and asked "
                       "for it ({}); leave training_state::compression null to start the "
                       "compression afresh (the run then does not resume bit for bit)",
                       spec,
                       c.version < 2 ? fmt::format("format version {} has none", c.version)
                                     : std::string("written without training_state::compression")));
    }
    if (c.compression_spec != spec) {
      fail(file, fmt::format("holds the state of compression '{}' but the trainer compresses with "
                             "'{}'; use the same --compress as the run that wrote it",
                             c.compression_spec, spec));
    }
    if (c.compression.size() != static_cast<std::size_t>(ranks)) {
      fail(file,
           fmt::format("holds compression state of {} rank(s) (error-feedback residuals are per "
                       "rank) but is loaded on {}; resume on {} rank(s), or leave "
                       "training_state::compression null to start the compression afresh (not bit "
                       "for bit)",
                       c.compression.size(), ranks, c.compression.size()));
    }
    try {
      s.compression->check_state(c.compression[static_cast<std::size_t>(rank)]);
    } catch (const usage_error& e) {
      fail(file, fmt::format("its compression state of rank {} does not fit the trainer: {}", rank,
                             e.what()));
    }
  }
}

checkpoint_info apply(const parsed_checkpoint& c, training_state& s, int rank) {
  auto values = s.params.all_values();
  for (std::size_t i = 0; i < c.params.size(); ++i) {
    const auto& p = s.params[i];
    std::copy(c.params[i].values.begin(), c.params[i].values.end(),
              values.begin() + static_cast<std::ptrdiff_t>(p.offset));
  }
  for (std::size_t i = 0; i < c.opt_buffers.size(); ++i) {
    const std::vector<float>& saved = c.opt_buffers[i].second;
    const std::span<float> to = s.optimizer.buffers[i].second;
    if (s.optimizer.pieces.empty()) {
      std::copy(saved.begin(), saved.end(), to.begin());
      continue;
    }
    if (saved.empty()) continue;
    // This rank's pieces of the saved layout, concatenated: a reshard.
    std::size_t at = 0;
    for (const chunk& piece : s.optimizer.pieces) {
      std::copy_n(saved.begin() + static_cast<std::ptrdiff_t>(piece.offset), piece.count,
                  to.begin() + static_cast<std::ptrdiff_t>(at));
      at += piece.count;
    }
  }
  if (s.optimizer.set_steps) s.optimizer.set_steps(c.opt_steps);
  if (s.sampler != nullptr) s.sampler->load_state(*converted_sampler(c, *s.sampler));
  if (s.compression != nullptr) {
    s.compression->load_state(c.compression[static_cast<std::size_t>(rank)]);
  }
  s.step = c.step;
  s.extra = c.extra;
  checkpoint_info info;
  info.compression_ranks = static_cast<int>(c.compression.size());
  info.format_version = c.version;
  info.world_size = c.world_size;
  info.sampler = c.sampler;
  info.has_sampler = c.has_sampler;
  return info;
}

std::vector<unsigned char> read_bytes(const std::filesystem::path& file) {
  std::ifstream f(file, std::ios::binary);
  if (!f) {
    fail(file, std::filesystem::exists(file) ? "cannot be opened for reading" : "does not exist");
  }
  std::vector<unsigned char> b((std::istreambuf_iterator<char>(f)),
                               std::istreambuf_iterator<char>());
  if (f.bad()) fail(file, "could not be read");
  return b;
}

}  // namespace

optimizer_state optimizer_state_of(ad::adamw& opt) {
  optimizer_state s;
  s.kind = "adamw";
  s.buffers = {{"m", opt.first_moment()}, {"v", opt.second_moment()}};
  s.get_steps = [&opt] { return opt.steps(); };
  s.set_steps = [&opt](std::int64_t t) { opt.set_steps(t); };
  return s;
}

optimizer_state optimizer_state_of(ad::sgd& opt) {
  optimizer_state s;
  s.kind = "sgd";
  s.buffers = {{"velocity", opt.velocity()}};
  s.get_steps = [&opt] { return opt.steps(); };
  s.set_steps = [&opt](std::int64_t t) { opt.set_steps(t); };
  return s;
}

optimizer_state optimizer_state_of(ad::adamw& opt, std::vector<chunk> pieces) {
  optimizer_state s = optimizer_state_of(opt);
  s.pieces = std::move(pieces);
  return s;
}

optimizer_state optimizer_state_of(ad::sgd& opt, std::vector<chunk> pieces) {
  optimizer_state s = optimizer_state_of(opt);
  s.pieces = std::move(pieces);
  return s;
}

namespace {
// What is wrong with the optimizer's buffers against the parameters: "" if
// nothing. Replicated: numel elements each (or none). Sharded: the pieces lie
// inside the parameters and every buffer holds their total (or nothing).
std::string layout_problem(const training_state& s) {
  const std::size_t numel = s.params.numel();
  if (s.optimizer.pieces.empty()) {
    for (const auto& [name, buf] : s.optimizer.buffers) {
      if (!buf.empty() && buf.size() != numel) {
        return fmt::format(
            "the optimizer's '{}' buffer has {} elements but the parameters {}: sharded optimizer "
            "state (an optimizer over train::sharded_data_parallel::shard()) needs its pieces; "
            "build it with train::optimizer_state_of(opt, sdp.owned())",
            name, buf.size(), numel);
      }
    }
    return {};
  }
  std::size_t total = 0;
  for (std::size_t k = 0; k < s.optimizer.pieces.size(); ++k) {
    const chunk& piece = s.optimizer.pieces[k];
    if (piece.offset > numel || piece.count > numel - piece.offset) {
      return fmt::format(
          "optimizer piece {} [{}, {}) reaches past the {} parameter elements "
          "(pieces of another model?)",
          k, piece.offset, piece.offset + piece.count, numel);
    }
    total += piece.count;
  }
  for (const auto& [name, buf] : s.optimizer.buffers) {
    if (!buf.empty() && buf.size() != total) {
      return fmt::format(
          "the optimizer's '{}' buffer has {} elements but its pieces {} (are "
          "they this trainer's owned()?)",
          name, buf.size(), total);
    }
  }
  return {};
}

// Counts, per parameter element, the pieces that hold it.
void mark(const std::vector<chunk>& pieces, std::vector<std::uint32_t>& held) {
  for (const chunk& piece : pieces) {
    for (std::size_t i = 0; i < piece.count; ++i) ++held[piece.offset + i];
  }
}

// Puts the concatenated pieces `v` at their places in `full` (the parameters' layout).
void place(const std::vector<chunk>& pieces, std::span<const float> v, std::vector<float>& full) {
  std::size_t at = 0;
  for (const chunk& piece : pieces) {
    std::copy_n(v.begin() + static_cast<std::ptrdiff_t>(at), piece.count,
                full.begin() + static_cast<std::ptrdiff_t>(piece.offset));
    at += piece.count;
  }
}

// `s` with the optimizer's buffers replaced by `full` (the parameters' layout).
training_state with_buffers(const training_state& s, std::vector<std::vector<float>>& full) {
  training_state out = s;
  out.optimizer.pieces.clear();
  for (std::size_t i = 0; i < out.optimizer.buffers.size(); ++i) {
    out.optimizer.buffers[i].second = std::span<float>(full[i]);
  }
  return out;
}

std::string coverage_problem(const std::vector<std::uint32_t>& held) {
  for (std::size_t i = 0; i < held.size(); ++i) {
    if (held[i] != 1) {
      return fmt::format(
          "parameter element {} is in {} of the sharded optimizer's pieces, not exactly one: the "
          "pieces must be those of one sharded_data_parallel per rank (sdp.owned()), all ranks "
          "saving together",
          i, held[i]);
    }
  }
  return {};
}
}  // namespace

namespace {
void write_checkpoint(const std::filesystem::path& file, const training_state& s,
                      const compression_blobs* comp) {
  if (file.empty()) throw usage_error("train::save_checkpoint: the file name is empty");
  const std::string bytes = encode(s, comp);
  try {
    detail::write_file_atomically(file, bytes);
  } catch (const detail::file_write_error& e) {
    fail(file, e.replaced()
                   ? std::string(e.what())
                   : fmt::format("{}; the previous checkpoint (if any) is untouched", e.what()));
  }
}
}  // namespace

void save_checkpoint(const std::filesystem::path& file, const training_state& s) {
  std::optional<compression_blobs> comp;
  if (s.compression != nullptr) {
    comp = compression_blobs{s.compression->spec(), {encode_compression(s.compression->state())}};
  }
  if (s.optimizer.pieces.empty()) return write_checkpoint(file, s, comp ? &*comp : nullptr);
  // Sharded: one process can write it only when its pieces are everything
  // (one rank); otherwise the other ranks' pieces are missing.
  if (const std::string problem = layout_problem(s); !problem.empty()) fail(file, problem);
  std::vector<std::uint32_t> held(s.params.numel(), 0);
  mark(s.optimizer.pieces, held);
  if (const std::string problem = coverage_problem(held); !problem.empty()) {
    fail(file, fmt::format("cannot be written by one process: {}; save sharded optimizer state "
                           "with the collective save_checkpoint(comm, ...)",
                           problem));
  }
  std::vector<std::vector<float>> full(s.optimizer.buffers.size());
  for (std::size_t i = 0; i < full.size(); ++i) {
    const auto& buf = s.optimizer.buffers[i].second;
    if (buf.empty()) continue;
    full[i].assign(s.params.numel(), 0.0f);
    place(s.optimizer.pieces, buf, full[i]);
  }
  write_checkpoint(file, with_buffers(s, full), comp ? &*comp : nullptr);
}

checkpoint_info load_checkpoint(const std::filesystem::path& file, training_state& s) {
  if (!s.optimizer.pieces.empty()) {
    if (const std::string problem = layout_problem(s); !problem.empty()) fail(file, problem);
  }
  const parsed_checkpoint c = parse(file, read_bytes(file));
  check_matches(file, c, s, 0, 1);
  return apply(c, s, 0);
}

namespace {
// Broadcasts a string from `root` (length first).
std::string broadcast_string(const communicator& comm, std::string text, int root) {
  std::int64_t len = static_cast<std::int64_t>(text.size());
  broadcast(comm, std::span<std::int64_t>(&len, 1), root);
  std::vector<std::uint8_t> bytes(text.begin(), text.end());
  bytes.resize(static_cast<std::size_t>(len));
  broadcast(comm, std::span<std::uint8_t>(bytes), root);
  return std::string(bytes.begin(), bytes.end());
}

// If any rank has a non-empty `problem`, every rank throws the lowest such
// rank's message (prefixed with that rank).
void agree_or_throw(const communicator& comm, const std::string& problem) {
  int first_bad = problem.empty() ? comm.size() : comm.rank();
  allreduce(comm, std::span<int>(&first_bad, 1), min);
  if (first_bad == comm.size()) return;
  const std::string msg =
      broadcast_string(comm, comm.rank() == first_bad ? problem : std::string(), first_bad);
  throw checkpoint_error(fmt::format("rank {}: {}", first_bad, msg));
}
}  // namespace

namespace {
// "checkpoint '<file>': <problem>", or "" for no problem.
std::string about(const std::filesystem::path& file, const std::string& problem) {
  return problem.empty() ? problem : fmt::format("checkpoint '{}': {}", file.string(), problem);
}

// Sharded optimizer state of every rank, in the parameters' layout on rank 0
// (`full`; empty vectors elsewhere): each rank in turn broadcasts its pieces
// and their values. Returns rank 0's verdict on the coverage ("" when every
// element came from exactly one rank).
std::string gather_sharded(const communicator& comm, const std::filesystem::path& file,
                           const training_state& s, std::vector<std::vector<float>>& full) {
  const std::size_t numel = s.params.numel();
  const std::size_t nbuf = s.optimizer.buffers.size();
  const bool root = comm.rank() == 0;
  std::size_t mine = 0;
  for (const chunk& piece : s.optimizer.pieces) mine += piece.count;
  // A buffer some rank keeps (SGD without momentum keeps none).
  std::vector<std::int64_t> kept(nbuf);
  for (std::size_t i = 0; i < nbuf; ++i)
    kept[i] = static_cast<std::int64_t>(s.optimizer.buffers[i].second.size());
  allreduce(comm, std::span<std::int64_t>(kept), max);
  std::string problem;
  for (std::size_t i = 0; i < nbuf; ++i) {
    if (kept[i] != 0 && s.optimizer.buffers[i].second.size() != mine) {
      problem = fmt::format(
          "the optimizer's '{}' buffer has {} elements on this rank but its "
          "pieces {} (and other ranks keep the buffer)",
          s.optimizer.buffers[i].first, s.optimizer.buffers[i].second.size(), mine);
    }
  }
  agree_or_throw(comm, about(file, problem));
  full.assign(nbuf, {});
  if (root) {
    for (std::size_t i = 0; i < nbuf; ++i) {
      if (kept[i] != 0) full[i].assign(numel, 0.0f);
    }
  }
  std::vector<std::uint32_t> held(root ? numel : 0, 0);
  for (int r = 0; r < comm.size(); ++r) {
    std::vector<std::int64_t> pc;
    if (r == comm.rank()) {
      for (const chunk& piece : s.optimizer.pieces) {
        pc.push_back(static_cast<std::int64_t>(piece.offset));
        pc.push_back(static_cast<std::int64_t>(piece.count));
      }
    }
    std::int64_t len = static_cast<std::int64_t>(pc.size());
    broadcast(comm, std::span<std::int64_t>(&len, 1), r);
    pc.resize(static_cast<std::size_t>(len));
    broadcast(comm, std::span<std::int64_t>(pc), r);
    std::vector<chunk> pieces;
    std::size_t total = 0;
    for (std::size_t k = 0; k + 1 < pc.size(); k += 2) {
      pieces.push_back({static_cast<std::size_t>(pc[k]), static_cast<std::size_t>(pc[k + 1])});
      total += static_cast<std::size_t>(pc[k + 1]);
    }
    if (root) mark(pieces, held);  // in bounds: every rank checked its own (layout_problem)
    for (std::size_t i = 0; i < nbuf; ++i) {
      if (kept[i] == 0) continue;
      std::vector<float> values(total);
      if (r == comm.rank()) {
        const auto& buf = s.optimizer.buffers[i].second;
        std::copy(buf.begin(), buf.end(), values.begin());
      }
      broadcast(comm, std::span<float>(values), r);
      if (root) place(pieces, values, full[i]);
    }
  }
  return root ? coverage_problem(held) : std::string();
}
}  // namespace

void save_checkpoint(const communicator& comm, const std::filesystem::path& file,
                     const training_state& s) {
  agree_or_throw(comm, about(file, layout_problem(s)));
  // Sharded or not is a trainer choice, the same on every rank.
  int sharded = s.optimizer.pieces.empty() ? 0 : 1;
  int all_sharded = sharded;
  allreduce(comm, std::span<int>(&all_sharded, 1), min);
  agree_or_throw(comm, about(file, all_sharded != sharded
                                       ? "some ranks pass sharded optimizer state (pieces) and "
                                         "others do not; build it the same way on every rank"
                                       : ""));
  std::vector<std::vector<float>> full;
  if (sharded != 0) agree_or_throw(comm, about(file, gather_sharded(comm, file, s, full)));
  // Every rank's compression state (its residuals differ from the others')
  // goes to rank 0, which writes them all. Compressing or not is a trainer
  // option, the same on every rank.
  int compressing = s.compression != nullptr ? 1 : 0;
  int all_compressing = compressing;
  allreduce(comm, std::span<int>(&all_compressing, 1), min);
  agree_or_throw(comm, about(file, all_compressing != compressing
                                       ? "training_state::compression is set on some ranks "
                                         "only; set it on every rank or none"
                                       : ""));
  std::optional<compression_blobs> comp;
  if (compressing != 0) {
    comp.emplace();
    comp->spec = s.compression->spec();
    const std::string mine = encode_compression(s.compression->state());
    for (int r = 0; r < comm.size(); ++r) {
      std::string got = broadcast_string(comm, r == comm.rank() ? mine : std::string(), r);
      if (comm.rank() == 0) comp->ranks.push_back(std::move(got));
    }
  }
  std::string problem;
  if (comm.rank() == 0) {
    try {
      write_checkpoint(file, sharded != 0 ? with_buffers(s, full) : s, comp ? &*comp : nullptr);
    } catch (const std::exception& e) {
      problem = e.what();
      if (problem.empty()) problem = "unknown error";
    }
  }
  agree_or_throw(comm, problem);
}

checkpoint_info load_checkpoint(const communicator& comm, const std::filesystem::path& file,
                                training_state& s) {
  agree_or_throw(comm, about(file, layout_problem(s)));
  std::vector<unsigned char> bytes;
  std::string problem;
  if (comm.rank() == 0) {
    try {
      bytes = read_bytes(file);
    } catch (const std::exception& e) {
      problem = e.what();
    }
  }
  agree_or_throw(comm, problem);
  std::int64_t n = static_cast<std::int64_t>(bytes.size());
  broadcast(comm, std::span<std::int64_t>(&n, 1), 0);
  bytes.resize(static_cast<std::size_t>(n));
  broadcast(comm, std::span<std::uint8_t>(bytes.data(), bytes.size()), 0);
  std::optional<parsed_checkpoint> c;
  try {
    c = parse(file, bytes);
    check_matches(file, *c, s, comm.rank(), comm.size());
  } catch (const std::exception& e) {
    problem = e.what();
  }
  agree_or_throw(comm, problem);
  return apply(*c, s, comm.rank());
}

}  // namespace ringflow::train
