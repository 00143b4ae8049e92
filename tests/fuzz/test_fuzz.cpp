// Fuzzing the file loaders with mutated copies of valid files: each case must load or throw
// ringflow::error, in bounded memory.
//
// Seeds are written by the library itself (IDX files, checkpoints with and without compression
// state, a schedule, a tuning table, a cost model, a trace); every loader then reads a few hundred
// mutations of them (bit flips, byte overwrites, truncations, huge counts written into header
// fields, appended garbage), drawn from a fixed seed so a failure reproduces. Peak memory
// (ru_maxrss) may not grow by more than a bound a ~300 GB allocation attempt (or a few GB touched)
// would blow through.
#include <sys/resource.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/tuning.hpp"
#include "ringflow/data/dataset.hpp"
#include "ringflow/data/idx.hpp"
#include "ringflow/data/sampler.hpp"
#include "ringflow/pipeline/schedule.hpp"
#include "ringflow/pipeline/verify.hpp"
#include "ringflow/train/checkpoint.hpp"
#include "ringflow/train/timeline.hpp"
#include "support/catch.hpp"

namespace fs = std::filesystem;
using namespace ringflow;
using bytes = std::vector<unsigned char>;

namespace {

// Mutations per loader and seed file kind; the whole test stays a few
// seconds in Release.
constexpr int cases_per_loader = 300;
// Peak RSS may grow at most this much over the whole run: every seed is a
// few KB, so anything near this means a loader believed a corrupt size.
// AddressSanitizer keeps freed blocks in a quarantine (256 MB by default)
// and adds shadow memory, so it gets more room; still far below the
// gigabytes a believed header costs.
#if defined(__SANITIZE_ADDRESS__)
constexpr long max_rss_growth_kib = 1024 * 1024;
#else
constexpr long max_rss_growth_kib = 256 * 1024;
#endif

long max_rss_kib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;  // KiB on Linux
}

class temp_dir {
 public:
  temp_dir() {
    path_ = fs::temp_directory_path() / ("ringflow_fuzz_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

bytes read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_file(const fs::path& p, const bytes& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

bytes to_bytes(const std::string& s) { return {s.begin(), s.end()}; }

void put_be32(bytes& b, std::size_t at, std::uint32_t v) {
  for (int k = 0; k < 4 && at + static_cast<std::size_t>(k) < b.size(); ++k) {
    b[at + static_cast<std::size_t>(k)] = static_cast<unsigned char>(v >> (24 - 8 * k));
  }
}

void put_le64(bytes& b, std::size_t at, std::uint64_t v) {
  for (int k = 0; k < 8 && at + static_cast<std::size_t>(k) < b.size(); ++k) {
    b[at + static_cast<std::size_t>(k)] = static_cast<unsigned char>(v >> (8 * k));
  }
}

// Values a corrupt size field typically holds.
std::uint64_t huge_value(std::mt19937_64& rng) {
  static constexpr std::uint64_t picks[] = {0xffffffffull,
                                            0x7fffffffull,
                                            0x80000000ull,
                                            0x10000000ull,
                                            0x00ffffffull,
                                            0xffffffffffffffffull,
                                            0x7fffffffffffffffull,
                                            0x0000000100000000ull,
                                            0,
                                            1};
  if (rng() % 4 == 0) return rng();
  return picks[rng() % std::size(picks)];
}

// Binary mutation of `b`; `fields` are offsets of size fields worth hitting
// with huge values (big-endian 32-bit when be32, else little-endian 64-bit).
bytes mutate_binary(bytes b, std::mt19937_64& rng, const std::vector<std::size_t>& fields,
                    bool be32) {
  const int kind = static_cast<int>(rng() % 6);
  if (b.empty()) b.push_back(0);
  switch (kind) {
    case 0: {  // bit flips
      const int n = 1 + static_cast<int>(rng() % 8);
      for (int i = 0; i < n; ++i)
        b[rng() % b.size()] ^= static_cast<unsigned char>(1u << (rng() % 8));
      break;
    }
    case 1: {  // byte overwrites
      const int n = 1 + static_cast<int>(rng() % 8);
      static constexpr unsigned char special[] = {0x00, 0xff, 0x7f, 0x80, 0x01};
      for (int i = 0; i < n; ++i) {
        b[rng() % b.size()] = rng() % 2 ? special[rng() % 5] : static_cast<unsigned char>(rng());
      }
      break;
    }
    case 2:  // truncation
      b.resize(rng() % b.size());
      break;
    case 3:
    case 4: {  // a huge count or dimension in a header field
      const int n = 1 + static_cast<int>(rng() % 2);
      for (int i = 0; i < n && !fields.empty(); ++i) {
        const std::size_t at = fields[rng() % fields.size()];
        if (be32)
          put_be32(b, at, static_cast<std::uint32_t>(huge_value(rng)));
        else
          put_le64(b, at, huge_value(rng));
      }
      break;
    }
    default: {  // appended garbage
      const std::size_t n = 1 + rng() % 4096;
      for (std::size_t i = 0; i < n; ++i) b.push_back(static_cast<unsigned char>(rng()));
      break;
    }
  }
  return b;
}

// Text mutation: the binary ones plus numbers replaced by absurd ones.
bytes mutate_text(const bytes& text, std::mt19937_64& rng) {
  if (rng() % 2 == 0) return mutate_binary(text, rng, {}, false);
  static constexpr const char* absurd[] = {"1e308",
                                           "-1",
                                           "0",
                                           "nan",
                                           "inf",
                                           "99999999999999999999999",
                                           "4294967296",
                                           "2147483648",
                                           "-2147483649",
                                           "1e-320",
                                           "18446744073709551616",
                                           "1.5",
                                           "9007199254740993",
                                           "00"};
  std::vector<std::size_t> starts;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const bool digit = text[i] >= '0' && text[i] <= '9';
    if (digit && (i == 0 || !(text[i - 1] >= '0' && text[i - 1] <= '9'))) starts.push_back(i);
  }
  bytes out = text;
  const int n = 1 + static_cast<int>(rng() % 3);
  for (int k = 0; k < n && !starts.empty(); ++k) {
    const std::size_t at = starts[rng() % starts.size()];
    std::size_t end = at;
    while (end < out.size() && ((out[end] >= '0' && out[end] <= '9') || out[end] == '.' ||
                                out[end] == 'e' || out[end] == '-' || out[end] == '+')) {
      ++end;
    }
    const std::string r = absurd[rng() % std::size(absurd)];
    out.erase(out.begin() + static_cast<std::ptrdiff_t>(at),
              out.begin() + static_cast<std::ptrdiff_t>(end));
    out.insert(out.begin() + static_cast<std::ptrdiff_t>(at), r.begin(), r.end());
    // Later starts moved; recompute lazily by stopping after a change in length.
    if (r.size() != end - at) break;
  }
  return out;
}

// What happened to each case of one loader.
struct tally {
  explicit tally(std::string name) : loader(std::move(name)) {}
  std::string loader;
  int loaded = 0;
  int refused = 0;
  int other = 0;
  int unnamed = 0;            // refusals whose message does not name the file
  std::string first_problem;  // the first "other" or unnamed message
};

// Runs `load` and files the outcome. A refusal must mention one of `names`
// (the file; for text parsed from memory, the line or the schedule).
void run_case(tally& t, const std::vector<std::string>& names, const std::function<void()>& load) {
  try {
    load();
    ++t.loaded;
  } catch (const ringflow::error& e) {
    ++t.refused;
    const std::string what = e.what();
    if (std::none_of(names.begin(), names.end(),
                     [&](const std::string& n) { return what.find(n) != std::string::npos; })) {
      ++t.unnamed;
      if (t.first_problem.empty()) t.first_problem = std::string("unnamed: ") + e.what();
    }
  } catch (const std::exception& e) {
    ++t.other;
    if (t.first_problem.empty()) t.first_problem = std::string("other: ") + e.what();
  } catch (...) {
    ++t.other;
    if (t.first_problem.empty()) t.first_problem = "other: a non-std exception";
  }
}

void report(const tally& t) {
  std::printf("fuzz %-11s loaded %4d  refused %4d  other %d\n", t.loader.c_str(), t.loaded,
              t.refused, t.other);
  std::fflush(stdout);
  INFO(t.loader << ": " << t.first_problem);
  CHECK(t.other == 0);
  CHECK(t.unnamed == 0);
  CHECK(t.loaded + t.refused + t.other >= cases_per_loader);
}

// gzip of `raw` through the library's own writer.
bytes gzipped(const temp_dir& dir, const bytes& raw) {
  const fs::path p = dir / "gz.tmp";
  data::write_bytes(p, raw, true);
  return read_file(p);
}

// A checkpoint file re-sealed after its payload was mutated: fresh header
// and payload checksums and length, so the mutation reaches the parser.
bytes resealed(bytes b) {
  if (b.size() < 32) return b;
  const std::uint64_t payload = b.size() - 32;
  put_le64(b, 16, payload);
  const auto crc = static_cast<std::uint32_t>(
      crc32(crc32(0L, Z_NULL, 0), b.data() + 32, static_cast<uInt>(payload)));
  std::memcpy(b.data() + 24, &crc, 4);
  std::memset(b.data() + 12, 0, 4);
  const auto hcrc = static_cast<std::uint32_t>(crc32(crc32(0L, Z_NULL, 0), b.data(), 32));
  std::memcpy(b.data() + 12, &hcrc, 4);
  return b;
}

}  // namespace

TEST_CASE("mutated input files load or are refused with ringflow::error, in bounded memory",
          "[fuzz]") {
  temp_dir dir;
  std::mt19937_64 rng(20261202);
  const long rss_before = max_rss_kib();
  std::vector<tally> results;

  // ---- IDX files (read_idx) and image/label pairs (load_idx_dataset) ------
  {
    data::idx_array images;
    images.dims = {12, 5, 4};
    images.values.resize(12 * 5 * 4);
    for (std::size_t i = 0; i < images.values.size(); ++i)
      images.values[i] = static_cast<std::uint8_t>(i * 29 + 3);
    data::idx_array labels;
    labels.dims = {12};
    for (std::uint8_t i = 0; i < 12; ++i) labels.values.push_back(i % 10);
    data::write_idx(dir / "images", images, false);
    data::write_idx(dir / "labels", labels, false);
    const bytes raw_images = read_file(dir / "images");
    const bytes raw_labels = read_file(dir / "labels");
    const bytes gz_images = gzipped(dir, raw_images);
    const bytes gz_labels = gzipped(dir, raw_labels);
    // Sanity: the seeds themselves load.
    REQUIRE(data::load_idx_dataset(dir / "images", dir / "labels").size() == 12);

    tally idx{"idx"};
    const std::vector<std::size_t> image_fields{4, 8, 12}, label_fields{4};
    for (int i = 0; i < cases_per_loader; ++i) {
      const bool image = i % 2 == 0;
      const int style = static_cast<int>(rng() % 3);  // raw, gzip of mutated raw, mutated gzip
      const bytes& raw = image ? raw_images : raw_labels;
      bytes b = style == 2 ? mutate_binary(image ? gz_images : gz_labels, rng, {}, true)
                           : mutate_binary(raw, rng, image ? image_fields : label_fields, true);
      if (style == 1) b = gzipped(dir, b);
      const fs::path p = dir / (style == 0 ? "m.idx" : "m.idx.gz");
      write_file(p, b);
      const std::size_t limit = rng() % 4 == 0 ? 1 + rng() % 20 : 0;
      run_case(idx, {p.string()}, [&] {
        (void)data::read_idx(p, image ? data::idx_images_magic : data::idx_labels_magic, limit);
      });
    }
    results.push_back(idx);

    tally pair{"dataset"};
    for (int i = 0; i < cases_per_loader; ++i) {
      // Mutate one file of the pair (or both), raw or gzipped.
      const int which = static_cast<int>(rng() % 3);
      const bool gz = rng() % 2 == 0;
      bytes img = raw_images, lab = raw_labels;
      if (which != 1) img = mutate_binary(img, rng, image_fields, true);
      if (which != 0) lab = mutate_binary(lab, rng, label_fields, true);
      const fs::path ip = dir / (gz ? "pi.gz" : "pi"), lp = dir / (gz ? "pl.gz" : "pl");
      write_file(ip, gz ? gzipped(dir, img) : img);
      write_file(lp, gz ? gzipped(dir, lab) : lab);
      const std::size_t limit = rng() % 4 == 0 ? 1 + rng() % 20 : 0;
      const int classes = rng() % 4 == 0 ? 1 + static_cast<int>(rng() % 10) : 10;
      // A refusal names one of the two files: both share the "p" prefix.
      run_case(pair, {(dir / "p").string()},
               [&] { (void)data::load_idx_dataset(ip, lp, classes, limit); });
    }
    results.push_back(pair);
  }

  // ---- checkpoints --------------------------------------------------------
  {
    ad::mlp model({6, 5, 3}, ad::activation::relu, 7);
    ad::adamw adam(model.parameters(), {.lr = 1e-2});
    ad::sgd plain_sgd(model.parameters(), {.lr = 1e-2});  // no momentum: an empty float buffer
    data::sampler sampler(40, 0, 1, 3);
    auto state_with = [&](train::optimizer_state opt) {
      train::training_state s;
      s.params = model.parameters();
      s.optimizer = std::move(opt);
      s.sampler = &sampler;
      s.step = 17;
      s.extra = {{"global_batch", "32"}, {"note", "fuzz"}};
      return s;
    };
    train::training_state adam_state = state_with(train::optimizer_state_of(adam));
    train::training_state sgd_state = state_with(train::optimizer_state_of(plain_sgd));
    train::save_checkpoint(dir / "adam.rfck", adam_state);
    train::save_checkpoint(dir / "sgd.rfck", sgd_state);
    const bytes adam_seed = read_file(dir / "adam.rfck");
    const bytes sgd_seed = read_file(dir / "sgd.rfck");
    // Sanity: the seeds load (the SGD one has a 0-length float field).
    REQUIRE_NOTHROW(train::load_checkpoint(dir / "adam.rfck", adam_state));
    REQUIRE_NOTHROW(train::load_checkpoint(dir / "sgd.rfck", sgd_state));

    // Offsets of the payload's first length fields (header: payload bytes at
    // 16; payload: step, world size, sampler, then the parameter count at
    // 32 + 37 and the first name length after it).
    const std::vector<std::size_t> fields{16, 32 + 37, 32 + 45, 32 + 53, 32 + 8, 32 + 29};
    tally ck{"checkpoint"};
    for (int i = 0; i < cases_per_loader; ++i) {
      const bool use_adam = i % 2 == 0;
      bytes b = mutate_binary(use_adam ? adam_seed : sgd_seed, rng, fields, false);
      if (rng() % 3 != 0) b = resealed(std::move(b));  // most cases reach the payload parser
      const fs::path p = dir / "m.rfck";
      write_file(p, b);
      run_case(ck, {p.string()},
               [&] { (void)train::load_checkpoint(p, use_adam ? adam_state : sgd_state); });
    }
    results.push_back(ck);

    // Format 2's compression section: a sign compressor's per-bucket
    // residuals, loaded back into a trainer-like bucket_compression (its
    // check_state refusals must surface as checkpoint_error too).
    const auto make_compression = [] {
      auto bc = std::make_unique<compress::bucket_compression>("sign");
      bc->set_layout(0, {20, {{0, 4, 5}}});
      bc->set_layout(1, {12, {}});
      return bc;
    };
    auto saved = make_compression();
    saved->load_state({{0, "sign", true, std::vector<float>(20, 0.25f), {}},
                       {1, "sign", true, std::vector<float>(12, -0.5f), {}}});
    train::training_state comp_state = state_with(train::optimizer_state_of(adam));
    comp_state.compression = saved.get();
    train::save_checkpoint(dir / "comp.rfck", comp_state);
    const bytes comp_seed = read_file(dir / "comp.rfck");
    auto target = make_compression();
    comp_state.compression = target.get();
    REQUIRE_NOTHROW(train::load_checkpoint(dir / "comp.rfck", comp_state));
    REQUIRE(target->state() == saved->state());
    tally cc{"ckpt+compr"};  // checkpoints with compression state
    for (int i = 0; i < cases_per_loader; ++i) {
      bytes b = mutate_binary(comp_seed, rng, fields, false);
      if (rng() % 4 != 0) b = resealed(std::move(b));
      const fs::path p = dir / "mc.rfck";
      write_file(p, b);
      run_case(cc, {p.string()}, [&] { (void)train::load_checkpoint(p, comp_state); });
    }
    results.push_back(cc);
  }

  // ---- pipeline schedule text --------------------------------------------
  {
    const bytes seed = to_bytes(pipeline::to_text(pipeline::interleaved_1f1b(2, 2, 3)));
    REQUIRE_NOTHROW(pipeline::verify(pipeline::parse_schedule(
        std::string_view(reinterpret_cast<const char*>(seed.data()), seed.size()))));
    tally sc{"schedule"};
    for (int i = 0; i < cases_per_loader; ++i) {
      const bytes b = mutate_text(seed, rng);
      const std::string text(b.begin(), b.end());
      run_case(sc, {"pipeline::parse_schedule: line ", "pipeline::verify: schedule '"},
               [&] { (void)pipeline::verify(pipeline::parse_schedule(text)); });
    }
    results.push_back(sc);
  }

  // ---- tuning table and cost model (the library's own writers) ------------
  {
    tuning_file f;
    f.machine = "fuzz-host";
    for (int ranks : {2, 4}) {
      tuning_table t;
      t.ranks = ranks;
      t.nodes = 1;
      t.ranks_per_node = ranks;
      t.cores_per_node = 2;
      t.reps = 5;
      t.tuned_at = "2026-12-02T06:00:00Z";
      for (std::size_t bytes_ = 1024; bytes_ <= 1 << 20; bytes_ *= 8) {
        tuning_row r;
        r.bytes = bytes_;
        r.median = {{algo::ring, 2e-5 * static_cast<double>(bytes_ >> 10)},
                    {algo::tree, 3e-5 * static_cast<double>(bytes_ >> 10)}};
        r.best = algo::ring;
        t.rows.push_back(r);
      }
      f.put(t);
    }
    save_tuning_file(f, (dir / "tuning.json").string());
    const bytes seed = read_file(dir / "tuning.json");
    REQUIRE(read_tuning_file((dir / "tuning.json").string())->tables.size() == 2);
    tally tu{"tuning"};
    for (int i = 0; i < cases_per_loader; ++i) {
      const fs::path p = dir / "m-tuning.json";
      write_file(p, mutate_text(seed, rng));
      run_case(tu, {p.string()}, [&] { (void)read_tuning_file(p.string()); });
    }
    results.push_back(tu);

    save_cost_model(builtin_cost_model(), (dir / "cost.json").string());
    const bytes cm_seed = read_file(dir / "cost.json");
    REQUIRE_NOTHROW(cost_model::from_json(std::string(cm_seed.begin(), cm_seed.end()), "seed"));
    tally cm{"cost_model"};
    for (int i = 0; i < cases_per_loader; ++i) {
      const bytes b = mutate_text(cm_seed, rng);
      const std::string origin = (dir / "m-cost.json").string();
      run_case(cm, {origin},
               [&] { (void)cost_model::from_json(std::string(b.begin(), b.end()), origin); });
    }
    results.push_back(cm);
  }

  // ---- timeline traces ----------------------------------------------------
  {
    train::timeline tl(0, dir / "trace.json");
    for (int s = 0; s < 3; ++s) {
      tl.record("forward", train::lane::compute, 100.0 * s, 100.0 * s + 40, s);
      tl.record("backward", train::lane::compute, 100.0 * s + 40, 100.0 * s + 90, s);
      train::trace_event e;
      e.name = "allreduce";
      e.lane = train::lane::comm;
      e.start_us = 100.0 * s + 60;
      e.duration_us = 35;
      e.step = s;
      e.bucket = 0;
      e.bytes = 4096;
      tl.record(e);
    }
    tl.write();
    const bytes seed = read_file(tl.file());
    REQUIRE(train::read_trace(tl.file()).size() == 9);
    tally tr{"trace"};
    for (int i = 0; i < cases_per_loader; ++i) {
      const fs::path p = dir / "m-trace.json";
      write_file(p, mutate_text(seed, rng));
      run_case(tr, {p.string()}, [&] { (void)train::read_trace(p); });
    }
    results.push_back(tr);
  }

  for (const auto& t : results) report(t);
  const long growth = max_rss_kib() - rss_before;
  std::printf("fuzz peak RSS growth %ld KiB (limit %ld KiB)\n", growth, max_rss_growth_kib);
  CHECK(growth < max_rss_growth_kib);
}
