// normkit/detail/moments.hpp: per-slot mean and variance from the reduction core's shifted
// sums, rstd, and small scratch buffers.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_MOMENTS_HPP_
#define NORMKIT_DETAIL_MOMENTS_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <cmath>   // std::sqrt, std::isinf, std::isfinite
#include <vector>  // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

/// Scratch of n elements: on the stack when small (per-call cost matters for tiny
/// tensors: a heap allocation costs about as much as normalizing 100 floats), else on the heap.
template <class T, std::size_t kLocal = 192>
class SmallBuffer {
 public:
  explicit SmallBuffer(Index n) {
    if (static_cast<std::size_t>(n) > kLocal) {
      heap_.resize(static_cast<std::size_t>(n));
      ptr_ = heap_.data();
    }
  }
  SmallBuffer(const SmallBuffer&) = delete;
  SmallBuffer& operator=(const SmallBuffer&) = delete;
  T* data() { return ptr_; }

 private:
  T local_[kLocal];
  std::vector<T> heap_;
  T* ptr_ = local_;
};

/// Mean and biased variance from the shifted sums s1 = sum(x - c), s2 = sum((x - c)^2) of n
/// elements. (mean, var may alias s1, s2.) Not inlined: the fused and two-pass paths must
/// round alike (see rows_batch in kernels/leaves.hpp on FMA contraction).
NORMKIT_NOINLINE inline void finish_moments(
    double c, double s1, double s2, Index count, double& mean, double& var) {
  const double n = static_cast<double>(count);
  const double d = s1 / n;
  double v = (s2 - s1 * d) / n;
  // NB: (s2 - s1^2/n) is a sum of squared deviations, >= 0 in exact arithmetic; a tiny
  // negative value is rounding residue of the shift (never the E[x^2]-E[x]^2 cancellation
  // this scheme avoids), so it is clamped. NaN stays NaN (the comparison is false). An
  // infinite s2 with a finite s1 (double input beyond 1e154) means an infinite variance.
  if (v < 0)
    v = 0;
  if (std::isinf(s2) && std::isfinite(s1))
    v = s2;
  mean = c + d;
  var = v;
}

/// The shift of every slot: its first element (see SumOp).
template <class T>
void slot_centers(const Plan& p, const T* x, double* center) {
  Odometer keys;
  for (int i = 0; i < p.rank; ++i) {
    if (p.axes[static_cast<std::size_t>(i)].role == Role::key)
      keys.add(p.axes[static_cast<std::size_t>(i)]);
  }
  const Index n_keys = keys.size();
  keys.seek(0);
  for (Index k = 0; k < n_keys; ++k, keys.next())
    center[keys.slot] = static_cast<double>(x[keys.offset]);
}

/// Per-slot mean and biased variance of x over a plan (plan slot order), through the one
/// reduction core. `center` is scratch of plan.slots elements.
template <class T>
void moments(const Plan& p, const T* x, double* mean, double* var, double* center, const Exec& ex) {
  const Index slots = p.slots;
  if (p.numel == 0) {
    for (Index s = 0; s < slots; ++s) mean[s] = var[s] = 0.0;
    return;
  }
  slot_centers(p, x, center);
  reduce(p, SumOp<T>{&leaves<T>(), x, nullptr, center}, mean, var, ex);
  for (Index s = 0; s < slots; ++s)
    finish_moments(center[s], mean[s], var[s], p.per_slot, mean[s], var[s]);
}

/// 1/sqrt(var + eps). BatchNorm and InstanceNorm define it as 0 when var == 0 and eps == 0
/// (ATen's InvStd special case: a constant channel then outputs exactly beta); LayerNorm and
/// GroupNorm do not (PyTorch returns NaN there, and so do we).
NORMKIT_ALWAYS_INLINE double rstd_of(double var, double eps, bool zero_for_constant) {
  if (zero_for_constant && var == 0 && eps == 0)
    return 0;
  return 1 / std::sqrt(var + eps);
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_MOMENTS_HPP_
