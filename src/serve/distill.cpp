// The distillation loss, composed from the autodiff's ops, and the teacher's
// logits computed over the ranks.
#include "ringflow/serve/distill.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/ad/ops.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::serve {

ad::tensor distillation_loss(const ad::tensor& student_logits, const ad::tensor& teacher_logits,
                             std::span<const int> labels, double temperature, double alpha) {
  if (!(temperature > 0.0) || !(alpha >= 0.0 && alpha <= 1.0)) {
    throw usage_error(
        fmt::format("serve::distillation_loss: temperature {} must be > 0 and alpha {} "
                    "in [0, 1]",
                    temperature, alpha));
  }
  if (student_logits.shape().rank() != 2 || teacher_logits.shape() != student_logits.shape()) {
    throw usage_error(
        fmt::format("serve::distillation_loss: student {} and teacher {} logits must "
                    "be the same [batch, classes]",
                    student_logits.shape().str(), teacher_logits.shape().str()));
  }
  const auto inv_t = static_cast<float>(1.0 / temperature);
  ad::tensor p;
  {
    ad::no_grad guard;
    p = ad::softmax(ad::scale(teacher_logits.detach(), inv_t)).detach();
  }
  const ad::tensor log_q = ad::log_softmax(ad::scale(student_logits, inv_t));
  const auto batch = static_cast<double>(student_logits.rows());
  const ad::tensor soft = ad::scale(ad::sum(ad::mul(p, log_q)),
                                    static_cast<float>(-alpha * temperature * temperature / batch));
  if (alpha == 1.0) return soft;
  const ad::tensor hard =
      ad::scale(ad::softmax_cross_entropy(student_logits, labels), static_cast<float>(1.0 - alpha));
  return ad::add(soft, hard);
}

std::vector<float> teacher_logits(const communicator& comm, ad::module& teacher, const float* x,
                                  ad::index rows, ad::index features, ad::index classes,
                                  ad::index chunk) {
  if (rows < 0 || features < 1 || classes < 1 || chunk < 1 || (rows > 0 && x == nullptr)) {
    throw usage_error(fmt::format(
        "serve::teacher_logits (rank {}): rows {} must be >= 0 (with data), features {}, "
        "classes {} and chunk {} >= 1",
        comm.rank(), rows, features, classes, chunk));
  }
  std::vector<float> out(static_cast<std::size_t>(rows * classes), 0.0f);
  const bool was_training = teacher.training();
  teacher.eval();
  {
    ad::no_grad guard;
    // Every rank checks the output width on the first row, so that a wrong
    // teacher throws on all of them rather than leaving some in the allreduce.
    if (rows > 0) {
      const auto probe = teacher(ad::tensor::from_data(x, {1, features}));
      if (probe.shape().rank() != 2 || probe.rows() != 1 || probe.cols() != classes) {
        teacher.train(was_training);
        throw usage_error(
            fmt::format("serve::teacher_logits (rank {}): the teacher gives {} logits for one "
                        "row of {} features; expected [1, {}]",
                        comm.rank(), probe.shape().str(), features, classes));
      }
    }
    const auto np = static_cast<ad::index>(comm.size());
    for (ad::index begin = chunk * comm.rank(); begin < rows; begin += chunk * np) {
      const ad::index n = std::min(chunk, rows - begin);
      const auto y = teacher(ad::tensor::from_data(x + begin * features, {n, features}));
      const auto v = y.data();
      std::copy(v.begin(), v.end(), out.begin() + static_cast<std::ptrdiff_t>(begin * classes));
    }
  }
  teacher.train(was_training);
  // Every entry has one nonzero contributor: the sum is that rank's value.
  allreduce(comm, std::span<float>(out), sum);
  return out;
}

}  // namespace ringflow::serve
