// Knowledge distillation: the loss that trains a small student on a trained
// teacher's temperature-softened outputs (and the labels).
#pragma once

#include <span>

#include "ringflow/ad/tensor.hpp"

namespace ringflow::serve {

/// alpha * T^2 * soft_ce + (1 - alpha) * softmax_cross_entropy(student, labels),
/// where soft_ce is the batch mean of -sum_c p_c log q_c with p = softmax(teacher / T)
/// (a constant: no gradient reaches the teacher) and q = softmax(student / T).
/// soft_ce differs from KL(p || q) by p's entropy, a constant, so the
/// gradients are KL's; the T^2 keeps their size independent of T.
/// Differentiable in `student_logits` [B, C]; `teacher_logits` is [B, C].
ad::tensor distillation_loss(const ad::tensor& student_logits, const ad::tensor& teacher_logits,
                             std::span<const int> labels, double temperature, double alpha);

}  // namespace ringflow::serve
