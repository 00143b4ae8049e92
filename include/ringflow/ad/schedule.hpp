// Learning-rate schedules: step, cosine, linear warm-up, and their composition.
#pragma once

#include <cstdint>
#include <functional>

namespace ringflow::ad {

/// A learning rate as a function of the 0-based step. Composable: warm-up
/// wraps any schedule.
/// @code
///   auto sched = ad::warmup_cosine(1e-3, /*warmup=*/100, /*total=*/10000);
///   for (std::int64_t s = 0; s < 10000; ++s) { opt.set_lr(sched(s)); ...; opt.step(); }
/// @endcode
class lr_schedule {
 public:
  explicit lr_schedule(std::function<double(std::int64_t)> f);
  /// The learning rate for 0-based step `step` (negative steps count as 0).
  double operator()(std::int64_t step) const;

 private:
  std::function<double(std::int64_t)> f_;
};

/// Always `lr`.
lr_schedule constant_lr(double lr);
/// base * gamma^floor(step / step_size).
lr_schedule step_lr(double base, std::int64_t step_size, double gamma = 0.1);
/// min_lr + (base - min_lr) (1 + cos(pi * min(step, total) / total)) / 2:
/// base at step 0, min_lr from step `total` on.
lr_schedule cosine_lr(double base, std::int64_t total_steps, double min_lr = 0.0);
/// Linear warm-up into `after`: step s < warmup gets after(0) * (s + 1) / warmup,
/// then step s gets after(s - warmup) (so `after` starts fresh after warm-up).
lr_schedule linear_warmup(lr_schedule after, std::int64_t warmup_steps);
/// linear_warmup(cosine_lr(base, total - warmup, min_lr), warmup): `total`
/// counts the warm-up steps too.
lr_schedule warmup_cosine(double base, std::int64_t warmup_steps, std::int64_t total_steps,
                          double min_lr = 0.0);

}  // namespace ringflow::ad
