// The model file: fp32, int8 and pruned models round-trip bit for bit; the
// loader refuses every truncation, every flipped byte, other versions, and
// well-sealed payloads whose fields make no sense (a fuzz loop), always with
// model_file_error and never by allocating what the file does not hold.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/serve/model_file.hpp"
#include "ringflow/serve/prune.hpp"
#include "support/catch.hpp"
#include "support/noise.hpp"

using namespace ringflow;
namespace ad = ringflow::ad;
namespace sv = ringflow::serve;

namespace {

sv::model small_fp32(std::uint64_t seed = 4) {
  ad::mlp net({12, 10, 6, 3}, ad::activation::relu, seed);
  return sv::model::from_sequential(net);
}

sv::model small_int8() {
  const auto m = small_fp32();
  const auto calib = testing::noise(32 * 12, 2);
  return sv::quantize(m, calib.data(), 32);
}

sv::model small_pruned() {
  ad::mlp net({12, 10, 6, 3}, ad::activation::relu, 4);
  sv::prune_global_magnitude(net.parameters(), 0.8);
  return sv::model::from_sequential(net);
}

// Bitwise equality (memcmp must not see the null data() of an empty vector).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

void same_layers(const sv::model& a, const sv::model& b) {
  REQUIRE(a.layers().size() == b.layers().size());
  for (std::size_t i = 0; i < a.layers().size(); ++i) {
    const auto& x = a.layers()[i];
    const auto& y = b.layers()[i];
    CHECK(x.in == y.in);
    CHECK(x.out == y.out);
    CHECK(x.act == y.act);
    CHECK(same_bits(x.weight, y.weight));
    CHECK(same_bits(x.bias, y.bias));
    CHECK(x.qweight == y.qweight);
    CHECK(same_bits(x.weight_scale, y.weight_scale));
    CHECK(x.input.scale == y.input.scale);
    CHECK(x.input.zero_point == y.input.zero_point);
  }
}

std::filesystem::path scratch_dir() {
  auto d = std::filesystem::temp_directory_path() /
           ("ringflow-serve-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(d);
  return d;
}

// The payload of a sealed file (after the 32-byte header).
std::string payload_of(const std::string& file) { return file.substr(32); }

}  // namespace

TEST_CASE("model files round-trip bit for bit", "[serve][model_file]") {
  for (const auto& m : {small_fp32(), small_int8(), small_pruned()}) {
    const std::string bytes = sv::encode_model(m);
    const sv::model back = sv::decode_model(bytes);
    same_layers(m, back);
    CHECK(sv::encode_model(back) == bytes);
    const auto x = testing::noise(5 * 12, 9);
    CHECK(back.forward(x, 5) == m.forward(x, 5));
  }
  // -0.0 and a subnormal survive the sparse encoding too.
  auto layers = small_pruned().layers();
  layers[0].weight[0] = -0.0f;
  layers[0].weight[1] = 1e-45f;
  const sv::model odd(layers);
  same_layers(odd, sv::decode_model(sv::encode_model(odd)));
}

TEST_CASE("int8 files are about 4x smaller, pruned ones store only the nonzeros",
          "[serve][model_file]") {
  ad::mlp net({784, 256, 128, 10}, ad::activation::relu, 1);
  const auto fp32 = sv::model::from_sequential(net);
  const auto calib = testing::noise(16 * 784, 1);
  const auto q = sv::quantize(fp32, calib.data(), 16);
  const double f = static_cast<double>(sv::encode_model(fp32).size());
  const double i8 = static_cast<double>(sv::encode_model(q).size());
  CHECK(f / i8 > 3.9);
  sv::prune_global_magnitude(net.parameters(), 0.8);
  const double pruned =
      static_cast<double>(sv::encode_model(sv::model::from_sequential(net)).size());
  CHECK(f / pruned > 3.5);  // 20% of the floats plus a bit per weight
}

TEST_CASE("save_model writes atomically and load_model reads it back", "[serve][model_file]") {
  const auto dir = scratch_dir();
  const auto file = dir / "m.rfmodel";
  sv::save_model(file, small_int8());
  sv::save_model(file, small_int8());  // over an existing file
  same_layers(small_int8(), sv::load_model(file));
  std::size_t entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++entries;
  CHECK(entries == 1);  // no temporary left behind
  CHECK_THROWS_AS(sv::load_model(dir / "missing.rfmodel"), sv::model_file_error);
  CHECK_THROWS_AS(sv::save_model(dir / "no" / "such" / "dir" / "m.rfmodel", small_fp32()),
                  sv::model_file_error);
  std::filesystem::remove_all(dir);
}

TEST_CASE("truncated and corrupted model files are refused", "[serve][model_file]") {
  const std::string good = sv::encode_model(small_int8());
  for (std::size_t n = 0; n < good.size(); ++n) {
    INFO("truncated to " << n << " of " << good.size() << " bytes");
    CHECK_THROWS_AS(sv::decode_model(std::string_view(good).substr(0, n)), sv::model_file_error);
  }
  for (std::size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] = static_cast<char>(bad[i] ^ 0x10);
    INFO("byte " << i << " flipped");
    CHECK_THROWS_AS(sv::decode_model(bad), sv::model_file_error);
  }
  CHECK_THROWS_AS(sv::decode_model(good + "x"), sv::model_file_error);
  try {
    sv::decode_model(good.substr(0, 40), "net.rfmodel");
    FAIL("a truncated file loaded");
  } catch (const sv::model_file_error& e) {
    CHECK(std::string(e.what()).find("net.rfmodel") != std::string::npos);
    CHECK(std::string(e.what()).find("truncated") != std::string::npos);
  }
}

TEST_CASE("model files of another version are refused by name", "[serve][model_file]") {
  const std::string payload = payload_of(sv::encode_model(small_fp32()));
  for (const std::uint32_t v : {0u, 2u, 99u}) {
    const std::string other = sv::detail::seal_model_payload(payload, v);
    try {
      sv::decode_model(other);
      FAIL("version " << v << " loaded");
    } catch (const sv::model_file_error& e) {
      CHECK(std::string(e.what()).find("version " + std::to_string(v)) != std::string::npos);
    }
  }
  CHECK_NOTHROW(sv::decode_model(sv::detail::seal_model_payload(payload)));
}

TEST_CASE("fuzz: well-sealed nonsense is refused, never crashes or over-allocates",
          "[serve][model_file][fuzz]") {
  std::mt19937_64 rng(2026);
  const std::string payloads[] = {payload_of(sv::encode_model(small_fp32())),
                                  payload_of(sv::encode_model(small_int8())),
                                  payload_of(sv::encode_model(small_pruned()))};
  int refused = 0, loaded = 0;
  for (int it = 0; it < 3000; ++it) {
    std::string p = payloads[it % 3];
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const std::size_t at = rng() % p.size();
      switch (rng() % 4) {
        case 0: p[at] = static_cast<char>(rng()); break;                        // a random byte
        case 1: p[at] = static_cast<char>(0xff); break;                         // huge lengths
        case 2: p.resize(at); break;                                            // cut short
        default: p.insert(at, 1 + rng() % 9, static_cast<char>(rng())); break;  // bytes inserted
      }
      if (p.empty()) break;
    }
    try {
      const sv::model m = sv::decode_model(sv::detail::seal_model_payload(p));
      ++loaded;  // a mutation that still describes a valid model (a changed weight, say)
      CHECK_FALSE(m.empty());
    } catch (const sv::model_file_error&) {
      ++refused;
    }
  }
  CHECK(refused > 2000);
  INFO("loaded " << loaded);
  // Handcrafted: a layer announcing 2^31 x 2^31 fp32 weights in a tiny file.
  std::string huge;
  auto put = [&](auto v) { huge.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(std::uint32_t{1});
  put(std::uint64_t{1} << 31);
  put(std::uint64_t{1} << 31);
  put(std::uint32_t{0});
  CHECK_THROWS_AS(sv::decode_model(sv::detail::seal_model_payload(huge)), sv::model_file_error);
}
