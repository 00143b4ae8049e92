// Embedding lookup (gather forward, sparse or dense scatter-add backward) and the embedding module.
#include "ringflow/ad/embedding.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "ringflow/ad/init.hpp"
#include "ringflow/ad/parameter_store.hpp"

namespace ringflow::ad {

namespace {
std::string rank_text(int rank) {
  return rank >= 0 ? fmt::format("on rank {}", rank) : std::string("(rank unknown)");
}
}  // namespace

template <class S>
basic_tensor<S> embedding_lookup(const basic_tensor<S>& table, std::span<const std::int64_t> ids,
                                 index fields, int rank) {
  if (!table.defined()) throw usage_error("ad::embedding: the table is an empty tensor");
  const auto& tn = table.node();
  if (rank < 0 && tn->sparse) rank = tn->sparse->rank;
  const std::string who = fmt::format("ad::embedding '{}' {}", table.name(), rank_text(rank));
  if (tn->dims.rank() != 2) {
    throw usage_error(
        fmt::format("{}: the table has shape {}; it must be [rows, dim]", who, tn->dims.str()));
  }
  const index rows = tn->dims.rows(), dim = tn->dims.cols();
  const auto n = static_cast<index>(ids.size());
  if (fields <= 0 || n % fields != 0) {
    throw usage_error(
        fmt::format("{}: {} ids do not split into rows of {} fields; pass a multiple of fields",
                    who, n, fields));
  }
  for (index k = 0; k < n; ++k) {
    const std::int64_t id = ids[static_cast<std::size_t>(k)];
    if (id < 0 || id >= rows) {
      throw usage_error(fmt::format(
          "{}: id {} (position {} of {}) is outside the table of {} rows [0, {}); map ids into "
          "the table (e.g. hash modulo its size) or build a bigger one",
          who, id, k, n, rows, rows));
    }
  }
  auto out = std::make_shared<detail::node<S>>();
  out->op = "embedding";
  out->dims = shape{n / fields, fields * dim};
  out->value = detail::allocate_uninitialized<S>(n * dim);
  const S* tv = tn->value_ptr();
  S* ov = out->value.get();
  for (index k = 0; k < n; ++k) {
    std::copy_n(tv + ids[static_cast<std::size_t>(k)] * dim, dim, ov + k * dim);
  }
  if (grad_enabled() && tn->requires_grad) {
    out->inputs = {tn};
    out->requires_grad = true;
    // The ids are copied: the caller's batch buffer may be reused before backward.
    out->backward = [saved = std::vector<std::int64_t>(ids.begin(), ids.end()), dim](
                        detail::node<S>& self, std::size_t) {
      const S* g = self.grad_map().data();
      detail::node<S>& t = *self.inputs[0];
      if (t.sparse) {
        auto& sg = *t.sparse;
        sg.indices.reserve(sg.indices.size() + saved.size());
        sg.values.reserve(sg.values.size() + saved.size() * static_cast<std::size_t>(dim));
        for (std::size_t k = 0; k < saved.size(); ++k) {
          sg.add_row(saved[k], g + static_cast<index>(k) * dim);
        }
        return;
      }
      S* tg = t.grad_map().data();
      for (std::size_t k = 0; k < saved.size(); ++k) {
        S* row = tg + saved[k] * dim;
        const S* src = g + static_cast<index>(k) * dim;
        for (index j = 0; j < dim; ++j) row[j] += src[j];
      }
    };
  }
  return basic_tensor<S>(std::move(out));
}

template <class S>
basic_embedding<S>::basic_embedding(index rows, index dim, std::uint64_t seed,
                                    embedding_options opts)
    : opts_(opts) {
  if (rows <= 0 || dim <= 0) {
    throw usage_error(fmt::format(
        "ad::embedding: a table of {} rows x {} values; both must be positive", rows, dim));
  }
  if (!(opts.init_std >= 0)) {
    throw usage_error(fmt::format("ad::embedding: init_std {} must be >= 0", opts.init_std));
  }
  weight_ = make_parameter<S>("weight", shape{rows, dim});
  generator rng(seed);
  for (S& w : weight_.data()) w = static_cast<S>(opts.init_std * normal01(rng));
  if (opts.sparse) {
    auto sg = std::make_shared<sparse_rows_grad<S>>();
    sg->width = static_cast<std::size_t>(dim);
    sg->rows = rows;
    sg->rank = opts.rank;
    weight_.node()->sparse = std::move(sg);
  }
}

template <class S>
basic_tensor<S> basic_embedding<S>::lookup(std::span<const std::int64_t> ids, index fields) {
  return embedding_lookup(weight_, ids, fields, opts_.rank);
}

template <class S>
basic_tensor<S> basic_embedding<S>::forward(const basic_tensor<S>& x) {
  if (!x.defined()) throw usage_error("ad::embedding: empty input tensor");
  std::vector<std::int64_t> ids;
  ids.reserve(static_cast<std::size_t>(x.numel()));
  for (const S v : x.data()) {
    // Exact integers only: a fractional "id" is a bug upstream, not a row.
    if (!(std::floor(v) == v)) {
      throw usage_error(fmt::format("ad::embedding {}: input value {} is not an integer id",
                                    rank_text(opts_.rank), v));
    }
    ids.push_back(static_cast<std::int64_t>(v));
  }
  const index fields = x.shape().rank() >= 2 ? x.cols() : 1;
  return lookup(ids, fields);
}

template <class S>
void basic_embedding<S>::collect_parameters(named_parameters<S>& out,
                                            const std::string& prefix) const {
  out.emplace_back(prefix + "weight", weight_);
}

template basic_tensor<float> embedding_lookup<float>(const basic_tensor<float>&,
                                                     std::span<const std::int64_t>, index, int);
template basic_tensor<double> embedding_lookup<double>(const basic_tensor<double>&,
                                                       std::span<const std::int64_t>, index, int);
template class basic_embedding<float>;
template class basic_embedding<double>;

}  // namespace ringflow::ad
