// Checkpoint encoding, atomic writing (temp + fsync + rename + fsync dir), validated loading, collective save/load.
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
};

std::string encode(const training_state& s) {
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
void check_matches(const std::filesystem::path& file, const parsed_checkpoint& c,
                   const training_state& s) {
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
  for (std::size_t i = 0; i < c.opt_buffers.size(); ++i) {
    const auto& [name, values] = c.opt_buffers[i];
    const auto& [want_name, span] = s.optimizer.buffers[i];
    if (name != want_name || values.size() != span.size()) {
      fail(file, fmt::format("optimizer buffer {} is '{}' of {} elements in the checkpoint but "
                             "'{}' of {} in the optimizer",
                             i, name, values.size(), want_name, span.size()));
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
}

checkpoint_info apply(const parsed_checkpoint& c, training_state& s) {
  auto values = s.params.all_values();
  for (std::size_t i = 0; i < c.params.size(); ++i) {
    const auto& p = s.params[i];
    std::copy(c.params[i].values.begin(), c.params[i].values.end(),
              values.begin() + static_cast<std::ptrdiff_t>(p.offset));
  }
  for (std::size_t i = 0; i < c.opt_buffers.size(); ++i) {
    std::copy(c.opt_buffers[i].second.begin(), c.opt_buffers[i].second.end(),
              s.optimizer.buffers[i].second.begin());
  }
  if (s.optimizer.set_steps) s.optimizer.set_steps(c.opt_steps);
  if (s.sampler != nullptr) s.sampler->load_state(*converted_sampler(c, *s.sampler));
  s.step = c.step;
  s.extra = c.extra;
  checkpoint_info info;
  info.format_version = c.version;
  info.world_size = c.world_size;
  info.sampler = c.sampler;
  info.has_sampler = c.has_sampler;
  return info;
}

std::vector<unsigned char> read_bytes(const std::filesystem::path& file) {
  std::ifstream f(file, std::ios::binary);
  if (!f) {
    fail(file, std::filesystem::exists(file) ? "cannot be opened for reading"
                                             : "does not exist");
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

void save_checkpoint(const std::filesystem::path& file, const training_state& s) {
  if (file.empty()) throw usage_error("train::save_checkpoint: the file name is empty");
  const std::string bytes = encode(s);
  try {
    detail::write_file_atomically(file, bytes);
  } catch (const detail::file_write_error& e) {
    fail(file, e.replaced()
                   ? std::string(e.what())
                   : fmt::format("{}; the previous checkpoint (if any) is untouched", e.what()));
  }
}

checkpoint_info load_checkpoint(const std::filesystem::path& file, training_state& s) {
  const parsed_checkpoint c = parse(file, read_bytes(file));
  check_matches(file, c, s);
  return apply(c, s);
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
// The collective overloads save rank 0's optimizer state for all: refused
// when it covers only part of the parameters (a sharded optimizer, built over
// train::sharded_data_parallel::shard(), holds a different piece per rank).
std::string unsharded_problem(const training_state& s) {
  for (const auto& [name, buf] : s.optimizer.buffers) {
    if (!buf.empty() && buf.size() != s.params.numel()) {
      return fmt::format(
          "the optimizer's '{}' buffer has {} elements but the parameters {}: sharded optimizer "
          "state (train::sharded_data_parallel) cannot be saved or loaded by the collective "
          "checkpoint yet (resharding checkpoints are not implemented); use data_parallel",
          name, buf.size(), s.params.numel());
    }
  }
  return {};
}
}  // namespace

void save_checkpoint(const communicator& comm, const std::filesystem::path& file,
                     const training_state& s) {
  agree_or_throw(comm, unsharded_problem(s));
  std::string problem;
  if (comm.rank() == 0) {
    try {
      save_checkpoint(file, s);
    } catch (const std::exception& e) {
      problem = e.what();
      if (problem.empty()) problem = "unknown error";
    }
  }
  agree_or_throw(comm, problem);
}

checkpoint_info load_checkpoint(const communicator& comm, const std::filesystem::path& file,
                                training_state& s) {
  agree_or_throw(comm, unsharded_problem(s));
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
    check_matches(file, *c, s);
  } catch (const std::exception& e) {
    problem = e.what();
  }
  agree_or_throw(comm, problem);
  return apply(*c, s);
}

}  // namespace ringflow::train
