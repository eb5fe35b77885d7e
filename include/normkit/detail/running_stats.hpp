// normkit/detail/running_stats.hpp: the momentum update of running statistics.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_RUNNING_STATS_HPP_
#define NORMKIT_DETAIL_RUNNING_STATS_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <normkit/config.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

/// running = f * batch + (1 - f) * running, per channel, in double (ATen's expression order,
/// batch_norm_cpu_update_stats_template). `batch_var` is already the unbiased variance. Either
/// buffer may be null: each given one is updated on its own, as ATen does. The callers run
/// every check before this, so a rejected call never gets here.
template <class T>
void update_running_stats(T* running_mean,
                          T* running_var,
                          const double* batch_mean,
                          const double* batch_var,
                          Index channels,
                          double f) {
  for (Index c = 0; running_mean && c < channels; ++c) {
    running_mean[c] =
        static_cast<T>(f * batch_mean[c] + (1 - f) * static_cast<double>(running_mean[c]));
  }
  for (Index c = 0; running_var && c < channels; ++c) {
    running_var[c] =
        static_cast<T>(f * batch_var[c] + (1 - f) * static_cast<double>(running_var[c]));
  }
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_RUNNING_STATS_HPP_
