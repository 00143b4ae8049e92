// Tests of the IDX reader and dataset loaders: generated good and bad files, and the real
// Fashion-MNIST.
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "ringflow/data/dataset.hpp"
#include "ringflow/data/idx.hpp"
#include "support/catch.hpp"

namespace fs = std::filesystem;
using namespace ringflow::data;

namespace {

// A fresh directory under the system temp dir, removed at scope exit.
class temp_dir {
 public:
  temp_dir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("ringflow_data_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path operator/(const std::string& name) const { return path_ / name; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

idx_array make_images(std::uint32_t n, std::uint32_t rows = 3, std::uint32_t cols = 2) {
  idx_array a;
  a.dims = {n, rows, cols};
  a.values.resize(std::size_t{n} * rows * cols);
  for (std::size_t i = 0; i < a.values.size(); ++i)
    a.values[i] = static_cast<std::uint8_t>(i * 37 + 5);
  return a;
}

idx_array make_labels(std::uint32_t n, int num_classes = 10) {
  idx_array a;
  a.dims = {n};
  a.values.resize(n);
  for (std::size_t i = 0; i < n; ++i) a.values[i] = static_cast<std::uint8_t>(i % num_classes);
  return a;
}

std::vector<unsigned char> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void save_bytes(const fs::path& p, const std::vector<unsigned char>& b) {
  ringflow::data::write_bytes(p, b, false);
}

// The message of the data_error `f` throws, or a marker when it throws none.
std::string data_error_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const data_error& e) {
    return e.what();
  }
  return "<no data_error thrown>";
}

bool contains(const std::string& text, const std::string& fragment) {
  return text.find(fragment) != std::string::npos;
}

}  // namespace

TEST_CASE("IDX files round-trip gzipped and raw", "[data][idx]") {
  temp_dir dir;
  const auto images = make_images(7);
  const auto labels = make_labels(7);
  for (bool gz : {false, true}) {
    INFO("gzip=" << gz);
    const auto ip = dir / (gz ? "img.gz" : "img");
    const auto lp = dir / (gz ? "lab.gz" : "lab");
    write_idx(ip, images, gz);
    write_idx(lp, labels, gz);
    CHECK(is_gzip_file(ip) == gz);

    const auto back = read_idx(ip, idx_images_magic);
    CHECK(back.dims == images.dims);
    CHECK(back.values == images.values);
    CHECK(back.header_count == 7);
    CHECK(read_idx(lp, idx_labels_magic).values == labels.values);

    const auto part = read_idx(ip, idx_images_magic, 3);
    CHECK(part.count() == 3);
    CHECK(part.header_count == 7);
    CHECK(std::vector<std::uint8_t>(images.values.begin(), images.values.begin() + 18) ==
          part.values);

    const auto ds = load_idx_dataset(ip, lp);
    REQUIRE(ds.size() == 7);
    CHECK(ds.rows == 3);
    CHECK(ds.cols == 2);
    CHECK(ds.features() == 6);
    for (std::size_t i = 0; i < 7; ++i) {
      CHECK(ds.labels[i] == labels.values[i]);
      for (std::size_t j = 0; j < 6; ++j) {
        CHECK(ds.sample(i)[j] == static_cast<float>(images.values[i * 6 + j]) / 255.0f);
      }
    }
    CHECK(load_idx_dataset(ip, lp, 10, 4).size() == 4);
  }
}

TEST_CASE("concatenated gzip members read as one stream", "[data][idx]") {
  temp_dir dir;
  const auto labels = make_labels(5);
  write_idx(dir / "a.gz", labels, true);
  // A second member holding extra bytes after the IDX payload: ignored, no error.
  auto bytes = read_bytes(dir / "a.gz");
  const auto more = bytes;
  bytes.insert(bytes.end(), more.begin(), more.end());
  save_bytes(dir / "b.gz", bytes);
  CHECK(read_idx(dir / "b.gz", idx_labels_magic).values == labels.values);
}

TEST_CASE("a missing file names the path and what to do", "[data][idx][errors]") {
  temp_dir dir;
  const auto msg = data_error_message([&] { read_idx(dir / "nope.gz", idx_images_magic); });
  INFO(msg);
  CHECK(contains(msg, (dir / "nope.gz").string()));
  CHECK(contains(msg, "does not exist"));

  const auto fm = data_error_message([&] { load_fashion_mnist(dir.path()); });
  INFO(fm);
  CHECK(contains(fm, dir.path().string()));
  CHECK(contains(fm, "train-images-idx3-ubyte"));
  CHECK(contains(fm, "t10k-labels-idx1-ubyte"));
  CHECK(contains(fm, "apt-get install dataset-fashion-mnist"));
  CHECK(contains(fm, "--data-dir"));
}

TEST_CASE("a truncated file says how many bytes were expected and got", "[data][idx][errors]") {
  temp_dir dir;
  const auto images = make_images(10);  // 16-byte header + 60 bytes
  SECTION("raw, cut in the payload") {
    write_idx(dir / "img", images, false);
    auto b = read_bytes(dir / "img");
    b.resize(50);
    save_bytes(dir / "img", b);
    const auto msg = data_error_message([&] { read_idx(dir / "img", idx_images_magic); });
    INFO(msg);
    CHECK(contains(msg, "truncated"));
    CHECK(contains(msg, "76 bytes"));
    CHECK(contains(msg, "got only 50"));
    // A limit that stays within the bytes present still works.
    CHECK(read_idx(dir / "img", idx_images_magic, 5).count() == 5);
  }
  SECTION("raw, cut in the header") {
    write_idx(dir / "img", images, false);
    auto b = read_bytes(dir / "img");
    b.resize(9);
    save_bytes(dir / "img", b);
    const auto msg = data_error_message([&] { read_idx(dir / "img", idx_images_magic); });
    INFO(msg);
    CHECK(contains(msg, "truncated"));
    CHECK(contains(msg, "16 bytes"));
    CHECK(contains(msg, "got only 9"));
  }
  SECTION("empty file") {
    save_bytes(dir / "img", {});
    const auto msg = data_error_message([&] { read_idx(dir / "img", idx_images_magic); });
    INFO(msg);
    CHECK(contains(msg, "truncated"));
    CHECK(contains(msg, "got only 0"));
  }
  SECTION("gzip, the compressed stream cut short") {
    write_idx(dir / "img.gz", images, true);
    auto b = read_bytes(dir / "img.gz");
    b.resize(b.size() / 2);
    save_bytes(dir / "img.gz", b);
    const auto msg = data_error_message([&] { read_idx(dir / "img.gz", idx_images_magic); });
    INFO(msg);
    CHECK(contains(msg, "truncated"));
    CHECK(contains(msg, "76 bytes"));
    CHECK(contains(msg, "gzip stream itself ends early"));
  }
  SECTION("gzip of an IDX file that was cut before compressing") {
    write_idx(dir / "img", images, false);
    auto b = read_bytes(dir / "img");
    b.resize(40);
    ringflow::data::write_bytes(dir / "img.gz", b, true);
    const auto msg = data_error_message([&] { read_idx(dir / "img.gz", idx_images_magic); });
    INFO(msg);
    CHECK(contains(msg, "truncated"));
    CHECK(contains(msg, "76 bytes (after gunzip)"));
    CHECK(contains(msg, "got only 40"));
    CHECK_FALSE(contains(msg, "ends early"));
  }
}

TEST_CASE("a wrong magic says what was found and what was expected", "[data][idx][errors]") {
  temp_dir dir;
  write_idx(dir / "lab.gz", make_labels(4), true);
  const auto msg = data_error_message([&] { read_idx(dir / "lab.gz", idx_images_magic); });
  INFO(msg);
  CHECK(contains(msg, (dir / "lab.gz").string()));
  CHECK(contains(msg, "0x00000801"));
  CHECK(contains(msg, "0x00000803"));
  CHECK(contains(msg, "expected"));

  save_bytes(dir / "junk", {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'});
  const auto junk = data_error_message([&] { read_idx(dir / "junk", idx_labels_magic); });
  INFO(junk);
  CHECK(contains(junk, "0x68656c6c"));
  CHECK(contains(junk, "0x00000801"));
}

TEST_CASE("corrupt gzip bytes report zlib's error", "[data][idx][errors]") {
  temp_dir dir;
  write_idx(dir / "img.gz", make_images(50), true);
  SECTION("invalid deflate block type") {
    auto b = read_bytes(dir / "img.gz");
    b[10] |= 0x06;  // first deflate block header: BTYPE = 11 (reserved)
    save_bytes(dir / "img.gz", b);
    const auto msg = data_error_message([&] { read_idx(dir / "img.gz", idx_images_magic); });
    INFO(msg);
    CHECK(contains(msg, "not a valid gzip stream"));
    CHECK(contains(msg, "invalid block type"));
  }
  SECTION("bad CRC in the trailer") {
    auto b = read_bytes(dir / "img.gz");
    b[b.size() - 8] ^= 0xff;
    save_bytes(dir / "img.gz", b);
    const auto msg = data_error_message([&] { read_idx(dir / "img.gz", idx_images_magic); });
    INFO(msg);
    CHECK(contains(msg, "not a valid gzip stream"));
    CHECK(contains(msg, "incorrect data check"));
  }
}

TEST_CASE("images and labels that disagree are refused", "[data][idx][errors]") {
  temp_dir dir;
  write_idx(dir / "img.gz", make_images(5), true);
  write_idx(dir / "lab.gz", make_labels(4), true);
  const auto msg = data_error_message([&] { load_idx_dataset(dir / "img.gz", dir / "lab.gz"); });
  INFO(msg);
  CHECK(contains(msg, "5 images"));
  CHECK(contains(msg, "4 labels"));
  // Also with a limit that would hide it.
  CHECK(
      contains(data_error_message([&] { load_idx_dataset(dir / "img.gz", dir / "lab.gz", 10, 2); }),
               "5 images"));

  auto bad = make_labels(5);
  bad.values[3] = 12;
  write_idx(dir / "bad.gz", bad, true);
  const auto range = data_error_message([&] { load_idx_dataset(dir / "img.gz", dir / "bad.gz"); });
  INFO(range);
  CHECK(contains(range, "label 12 of sample 3"));
  CHECK(contains(range, "[0, 10)"));
}

TEST_CASE("normalization is computed and applied", "[data][dataset]") {
  dataset ds;
  ds.images.resize(2, 2);
  ds.images << 0.0f, 1.0f, 1.0f, 0.0f;
  ds.labels = {0, 1};
  ds.num_classes = 2;
  const auto n = compute_normalization(ds);
  CHECK(std::abs(n.mean - 0.5f) < 1e-6f);
  CHECK(std::abs(n.std - 0.5f) < 1e-6f);
  normalize(ds, n);
  CHECK(ds.images(0, 0) == -1.0f);
  CHECK(ds.images(0, 1) == 1.0f);
  CHECK_THROWS_AS(normalize(ds, normalization{0.0f, 0.0f}), ringflow::usage_error);
  CHECK(ds.label_histogram() == std::vector<std::size_t>{1, 1});
}

TEST_CASE("the real Fashion-MNIST loads", "[data][fashion_mnist]") {
  const auto dir = default_fashion_mnist_dir();
  INFO(
      "Fashion-MNIST is a declared dependency (Debian package dataset-fashion-mnist); "
      "expected in "
      << dir.string());
  train_test fm;
  REQUIRE_NOTHROW(fm = load_fashion_mnist(dir));
  REQUIRE(fm.train.size() == 60000);
  REQUIRE(fm.test.size() == 10000);
  CHECK(fm.train.rows == 28);
  CHECK(fm.train.cols == 28);
  CHECK(fm.train.features() == 784);
  CHECK(fm.train.images.rows() == 60000);
  CHECK(fm.train.label_histogram() == std::vector<std::size_t>(10, 6000));
  CHECK(fm.test.label_histogram() == std::vector<std::size_t>(10, 1000));
  CHECK(fm.train.images.minCoeff() == 0.0f);
  CHECK(fm.train.images.maxCoeff() == 1.0f);

  const auto n = compute_normalization(fm.train);
  CHECK(std::abs(n.mean - fashion_mnist_normalization.mean) < 1e-5f);
  CHECK(std::abs(n.std - fashion_mnist_normalization.std) < 1e-5f);
  CHECK(std::abs(n.mean - 0.2860f) < 1e-3f);
  CHECK(std::abs(n.std - 0.3530f) < 1e-3f);

  const auto small = load_fashion_mnist(dir, 100);
  CHECK(small.train.size() == 100);
  CHECK(small.test.size() == 100);
  CHECK(small.train.images == fm.train.images.topRows(100));
  CHECK(small.train.labels ==
        std::vector<std::int32_t>(fm.train.labels.begin(), fm.train.labels.begin() + 100));
}
