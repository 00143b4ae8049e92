// Loading IDX image/label pairs into float datasets; Fashion-MNIST paths and normalization.
#include "ringflow/data/dataset.hpp"

#include <fmt/format.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <string>

#include "ringflow/core/env.hpp"
#include "ringflow/data/idx.hpp"

namespace ringflow::data {

std::vector<std::size_t> dataset::label_histogram() const {
  std::vector<std::size_t> h(static_cast<std::size_t>(std::max(num_classes, 0)), 0);
  for (auto l : labels) {
    if (l >= 0 && static_cast<std::size_t>(l) < h.size()) ++h[static_cast<std::size_t>(l)];
  }
  return h;
}

normalization compute_normalization(const dataset& ds) {
  const auto n = static_cast<std::size_t>(ds.images.size());
  if (n == 0) throw usage_error("compute_normalization: the dataset is empty");
  const float* p = ds.images.data();
  // Two passes in double: exact enough for 47M values and immune to cancellation.
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) sum += p[i];
  const double mean = sum / static_cast<double>(n);
  double sq = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = p[i] - mean;
    sq += d * d;
  }
  return {static_cast<float>(mean), static_cast<float>(std::sqrt(sq / static_cast<double>(n)))};
}

void normalize(dataset& ds, const normalization& n) {
  if (!(n.std > 0.0f) || !std::isfinite(n.std) || !std::isfinite(n.mean)) {
    throw usage_error(fmt::format(
        "normalize: std must be positive and finite (got mean={}, std={}); for a constant "
        "dataset use std=1",
        n.mean, n.std));
  }
  const float scale = 1.0f / n.std;
  ds.images.array() = (ds.images.array() - n.mean) * scale;
}

dataset load_idx_dataset(const std::filesystem::path& images, const std::filesystem::path& labels,
                         int num_classes, std::size_t limit) {
  if (num_classes < 1 || num_classes > 256) {
    throw usage_error(
        fmt::format("load_idx_dataset: num_classes must be in [1, 256], got {}", num_classes));
  }
  idx_array img = read_idx(images, idx_images_magic, limit);
  idx_array lab = read_idx(labels, idx_labels_magic, limit);
  // Compare what the headers announce, so a mismatched pair is caught even
  // by quick runs that load only a prefix.
  if (img.header_count != lab.header_count) {
    throw data_error(fmt::format(
        "'{}' holds {} images but '{}' holds {} labels; the two files must come from the same "
        "split (train with train, t10k with t10k)",
        images.string(), img.header_count, labels.string(), lab.header_count));
  }
  const std::size_t n = img.count();
  const std::size_t features = img.item_size();

  dataset ds;
  ds.rows = static_cast<int>(img.dims[1]);
  ds.cols = static_cast<int>(img.dims[2]);
  ds.num_classes = num_classes;
  ds.labels.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const int l = lab.values[i];
    if (l >= num_classes) {
      throw data_error(fmt::format(
          "'{}': label {} of sample {} is out of range [0, {}); the file is corrupt or belongs "
          "to a dataset with more classes",
          labels.string(), l, i, num_classes));
    }
    ds.labels[i] = l;
  }
  ds.images.resize(static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(features));
  float* dst = ds.images.data();
  const std::uint8_t* src = img.values.data();
  // A table of v / 255 (correctly rounded division, not a multiply by 1/255).
  std::array<float, 256> scale;
  for (int v = 0; v < 256; ++v) scale[static_cast<std::size_t>(v)] = static_cast<float>(v) / 255.0f;
  for (std::size_t i = 0, total = n * features; i < total; ++i) dst[i] = scale[src[i]];
  return ds;
}

std::filesystem::path default_fashion_mnist_dir() {
  if (auto dir = env::text("RINGFLOW_DATA_DIR")) return std::move(*dir);
  return "/usr/share/datasets/fashion-mnist";
}

namespace {

// The file called `stem`.gz, else `stem`, in `dir`; empty when neither exists.
std::filesystem::path find_idx(const std::filesystem::path& dir, const std::string& stem) {
  std::error_code ec;
  for (const auto& name : {stem + ".gz", stem}) {
    auto p = dir / name;
    if (std::filesystem::is_regular_file(p, ec)) return p;
  }
  return {};
}

}  // namespace

train_test load_fashion_mnist(const std::filesystem::path& dir, std::size_t limit) {
  const std::array<std::string, 4> stems = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"};
  std::array<std::filesystem::path, 4> paths;
  std::string missing;
  for (std::size_t i = 0; i < stems.size(); ++i) {
    paths[i] = find_idx(dir, stems[i]);
    if (paths[i].empty()) {
      missing += fmt::format("{}{}[.gz]", missing.empty() ? "" : ", ", stems[i]);
    }
  }
  if (!missing.empty()) {
    throw data_error(fmt::format(
        "Fashion-MNIST not found in '{}': missing {}. Install it with `apt-get install "
        "dataset-fashion-mnist` (files go to /usr/share/datasets/fashion-mnist), or point "
        "--data-dir / RINGFLOW_DATA_DIR at a folder holding the four IDX files",
        dir.string(), missing));
  }
  train_test out;
  out.train = load_idx_dataset(paths[0], paths[1], 10, limit);
  out.test = load_idx_dataset(paths[2], paths[3], 10, limit);
  return out;
}

}  // namespace ringflow::data
