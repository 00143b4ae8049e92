// Learning-rate schedule implementations.
#include "ringflow/ad/schedule.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "ringflow/core/error.hpp"

namespace ringflow::ad {

lr_schedule::lr_schedule(std::function<double(std::int64_t)> f) : f_(std::move(f)) {
  if (!f_) throw usage_error("ad::lr_schedule: empty function");
}

double lr_schedule::operator()(std::int64_t step) const {
  return f_(std::max<std::int64_t>(step, 0));
}

lr_schedule constant_lr(double lr) {
  return lr_schedule([lr](std::int64_t) { return lr; });
}

lr_schedule step_lr(double base, std::int64_t step_size, double gamma) {
  if (step_size <= 0) {
    throw usage_error(fmt::format("ad::step_lr: step_size {} must be positive", step_size));
  }
  return lr_schedule(
      [=](std::int64_t s) { return base * std::pow(gamma, static_cast<double>(s / step_size)); });
}

lr_schedule cosine_lr(double base, std::int64_t total_steps, double min_lr) {
  if (total_steps <= 0) {
    throw usage_error(fmt::format("ad::cosine_lr: total_steps {} must be positive", total_steps));
  }
  return lr_schedule([=](std::int64_t s) {
    const double t =
        static_cast<double>(std::min(s, total_steps)) / static_cast<double>(total_steps);
    return min_lr + (base - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * t));
  });
}

lr_schedule linear_warmup(lr_schedule after, std::int64_t warmup_steps) {
  if (warmup_steps < 0) {
    throw usage_error(fmt::format("ad::linear_warmup: warmup_steps {} must be >= 0", warmup_steps));
  }
  return lr_schedule([after = std::move(after), warmup_steps](std::int64_t s) {
    if (s < warmup_steps) {
      return after(0) * static_cast<double>(s + 1) / static_cast<double>(warmup_steps);
    }
    return after(s - warmup_steps);
  });
}

lr_schedule warmup_cosine(double base, std::int64_t warmup_steps, std::int64_t total_steps,
                          double min_lr) {
  if (total_steps <= warmup_steps) {
    throw usage_error(fmt::format(
        "ad::warmup_cosine: total_steps {} must exceed warmup_steps {} (total includes warm-up)",
        total_steps, warmup_steps));
  }
  return linear_warmup(cosine_lr(base, total_steps - warmup_steps, min_lr), warmup_steps);
}

}  // namespace ringflow::ad
