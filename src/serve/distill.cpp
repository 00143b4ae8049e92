// The distillation loss, composed from the autodiff's ops.
#include "ringflow/serve/distill.hpp"

#include <fmt/format.h>

#include "ringflow/ad/ops.hpp"
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

}  // namespace ringflow::serve
