// In-memory image classification datasets (Fashion-MNIST) as row-major float matrices.
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

#include "ringflow/data/error.hpp"

namespace ringflow::data {

/// Row-major float matrix: one sample per row, so a batch of consecutive
/// rows (and every assembled batch) is one contiguous [B, features] block.
using float_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Labelled images held in memory. `images` is [size(), rows*cols], pixel
/// values scaled to [0, 1] by the loaders (then optionally standardized with
/// normalize()); `labels` holds class ids in [0, num_classes).
struct dataset {
  float_matrix images;
  std::vector<std::int32_t> labels;
  int rows = 0;
  int cols = 0;
  int num_classes = 0;

  /// Number of samples.
  std::size_t size() const { return labels.size(); }
  /// Features per sample (rows * cols).
  std::size_t features() const { return static_cast<std::size_t>(images.cols()); }
  /// Pointer to the `features()` floats of sample i.
  const float* sample(std::size_t i) const { return images.data() + i * features(); }
  /// How many samples carry each label (size num_classes).
  std::vector<std::size_t> label_histogram() const;
};

/// Per-pixel standardization x -> (x - mean) / std, applied after the
/// [0, 1] scaling.
struct normalization {
  float mean = 0.0f;
  float std = 1.0f;
};

/// Mean and standard deviation of the Fashion-MNIST training pixels after
/// scaling to [0, 1] (computed over all 60000 x 784 values: 0.2860, 0.3530).
inline constexpr normalization fashion_mnist_normalization{0.2860406f, 0.3530242f};

/// Mean and (population) standard deviation over every pixel of `ds`,
/// accumulated in double. Throws usage_error on an empty dataset.
normalization compute_normalization(const dataset& ds);

/// Standardizes every pixel in place: (x - n.mean) / n.std. Throws
/// usage_error when n.std is not positive. Apply the *training* statistics to
/// the test set too.
void normalize(dataset& ds, const normalization& n);

/// Builds a dataset from an IDX image file (magic 0x803, [N, rows, cols])
/// and an IDX label file (magic 0x801, [N]), gzipped or raw. Pixels are
/// scaled to [0, 1]. With `limit` > 0 only the first `limit` samples are read.
/// Throws data_error on any file problem (see read_idx), when the image and
/// label counts differ, or when a label is >= num_classes.
dataset load_idx_dataset(const std::filesystem::path& images, const std::filesystem::path& labels,
                         int num_classes = 10, std::size_t limit = 0);

/// Fashion-MNIST split in two.
struct train_test {
  dataset train;
  dataset test;
};

/// Folder searched by load_fashion_mnist() when none is given:
/// $RINGFLOW_DATA_DIR if set, else /usr/share/datasets/fashion-mnist
/// (installed by the Debian package dataset-fashion-mnist).
std::filesystem::path default_fashion_mnist_dir();

/// Loads Fashion-MNIST from `dir`: train-{images-idx3,labels-idx1}-ubyte and
/// t10k-{...}, each either gzipped (.gz) or raw. Pixels are scaled to [0, 1]
/// but not standardized (call normalize()). With `limit` > 0 at most `limit`
/// samples are loaded from each split. Throws data_error listing the missing
/// files and how to install them when the folder is incomplete.
/// @code
///   auto fm = ringflow::data::load_fashion_mnist(ringflow::data::default_fashion_mnist_dir());
///   ringflow::data::normalize(fm.train, ringflow::data::fashion_mnist_normalization);
///   ringflow::data::normalize(fm.test, ringflow::data::fashion_mnist_normalization);
/// @endcode
train_test load_fashion_mnist(const std::filesystem::path& dir = default_fashion_mnist_dir(),
                              std::size_t limit = 0);

}  // namespace ringflow::data
