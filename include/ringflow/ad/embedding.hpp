// Embedding tables: a [rows, dim] parameter whose forward gathers the rows of
// integer ids and whose backward, by default, yields a SPARSE gradient (the
// touched rows only, see ad::sparse_rows_grad) instead of a dense table.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "ringflow/ad/layers.hpp"
#include "ringflow/ad/sparse_grad.hpp"
#include "ringflow/ad/tensor.hpp"

namespace ringflow::ad {

/// The rows of `table` ([rows, dim]) named by `ids`, `fields` ids per output
/// row: the result is [ids.size() / fields, fields * dim], output row b the
/// concatenation of the rows of ids[b * fields .. (b + 1) * fields). Its
/// gradient goes to table.sparse_grad() (one row per id, in id order) when the
/// table has one, else it is scatter-added into the dense table.grad().
/// An id outside [0, rows) throws usage_error naming the id, its position,
/// the table size and `rank` (-1: the table's sparse_grad()->rank, if any).
template <class S>
basic_tensor<S> embedding_lookup(const basic_tensor<S>& table, std::span<const std::int64_t> ids,
                                 index fields = 1, int rank = -1);

/// Options of ad::embedding.
struct embedding_options {
  /// Sparse row gradients (the default): backward records the touched rows
  /// in weight().sparse_grad(); optimizers update only those rows and
  /// train::data_parallel reduces them with sparse_allreduce. Off: a dense
  /// [rows, dim] gradient, reduced and updated like any other parameter.
  bool sparse = true;
  /// Initial values are N(0, init_std^2), drawn from a generator seeded with `seed`.
  double init_std = 0.1;
  /// The rank, for error messages (train::data_parallel fills it for sparse tables).
  int rank = -1;
};

/// A lookup table of `rows` vectors of `dim` values: parameter "weight" [rows, dim].
/// @code
///   ad::embedding emb(100000, 16, /*seed=*/7);
///   std::vector<std::int64_t> ids = {3, 99999, 3};   // 3 fields of one sample
///   auto x = emb.lookup(ids, /*fields=*/3);             // [1, 48]
///   // after backward: emb.weight().sparse_grad()->indices == {3, 99999, 3} (coalesce() sums)
/// @endcode
/// As a module, forward(x) takes ids as the values of x ([B, F], exact
/// integers) and returns [B, F * dim].
template <class S>
class basic_embedding : public basic_module<S> {
 public:
  basic_embedding(index rows, index dim, std::uint64_t seed = 0, embedding_options opts = {});

  /// [ids.size() / fields, fields * dim] (see ad::embedding_lookup).
  basic_tensor<S> lookup(std::span<const std::int64_t> ids, index fields = 1);
  basic_tensor<S> forward(const basic_tensor<S>& x) override;
  void collect_parameters(named_parameters<S>& out, const std::string& prefix) const override;

  const basic_tensor<S>& weight() const { return weight_; }
  index rows() const { return weight_.rows(); }
  index dim() const { return weight_.cols(); }
  bool sparse() const { return opts_.sparse; }

 private:
  basic_tensor<S> weight_;
  embedding_options opts_;
};

using embedding = basic_embedding<float>;

extern template class basic_embedding<float>;
extern template class basic_embedding<double>;

}  // namespace ringflow::ad
