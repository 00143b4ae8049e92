// Knowledge distillation: the loss that trains a small student on a trained
// teacher's temperature-softened outputs (and the labels), and the teacher's
// logits for a data set, computed once over the ranks.
#pragma once

#include <span>
#include <vector>

#include "ringflow/ad/layers.hpp"
#include "ringflow/ad/tensor.hpp"
#include "ringflow/comm/communicator.hpp"

namespace ringflow::serve {

/// alpha * T^2 * soft_ce + (1 - alpha) * softmax_cross_entropy(student, labels),
/// where soft_ce is the batch mean of -sum_c p_c log q_c with p = softmax(teacher / T)
/// (a constant: no gradient reaches the teacher) and q = softmax(student / T).
/// soft_ce differs from KL(p || q) by p's entropy, a constant, so the
/// gradients are KL's; the T^2 keeps their size independent of T.
/// Differentiable in `student_logits` [B, C]; `teacher_logits` is [B, C].
ad::tensor distillation_loss(const ad::tensor& student_logits, const ad::tensor& teacher_logits,
                             std::span<const int> labels, double temperature, double alpha);

/// The logits [rows, classes] (row-major) of `teacher` for the `rows` rows of
/// `x` [rows, features], in evaluation mode and without gradients, computed
/// over the ranks of `comm`: the rows are cut into chunks of `chunk`, rank r
/// runs chunks r, r + N, r + 2N, ..., and one allreduce(sum) gives every rank
/// all of them. Each entry has one contributor (the others add zeros), so
/// the result equals a one-process forward of the same chunks. The teacher's
/// training mode is restored afterwards. A distillation run calls it once for
/// the training set, so the student's steps need no teacher forward.
/// Collective: every rank calls it with the same rows, features, classes
/// and chunk. Throws usage_error when the teacher's output is not `classes` wide.
/// @code
///   auto targets = serve::teacher_logits(comm, teacher, train.images.data(), n, 784, 10);
///   // the targets of sample i: targets[i * 10 .. i * 10 + 10)
/// @endcode
std::vector<float> teacher_logits(const communicator& comm, ad::module& teacher, const float* x,
                                  ad::index rows, ad::index features, ad::index classes,
                                  ad::index chunk = 512);

}  // namespace ringflow::serve
