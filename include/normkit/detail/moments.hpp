// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_MOMENTS_HPP_
#define NORMKIT_DETAIL_MOMENTS_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <cmath>   // std::sqrt, std::isinf
#include <vector>  // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>

namespace normkit {
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
/// elements. (mean, var may alias s1, s2.)
NORMKIT_ALWAYS_INLINE void finish_moments(
    acc_t c, acc_t s1, acc_t s2, Index count, acc_t& mean, acc_t& var) {
  const acc_t n = static_cast<acc_t>(count);
  const acc_t d = s1 / n;
  acc_t v = (s2 - s1 * d) / n;
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

/// The shift of every slot: its first element (see MomentsOp).
template <class T>
void slot_centers(const Plan& p, const T* x, acc_t* center) {
  Odometer keys;
  for (int i = 0; i < p.rank; ++i) {
    if (p.axes[static_cast<std::size_t>(i)].role == Role::key)
      keys.add(p.axes[static_cast<std::size_t>(i)]);
  }
  const Index n_keys = keys.size();
  keys.seek(0);
  for (Index k = 0; k < n_keys; ++k, keys.next())
    center[keys.slot] = static_cast<acc_t>(x[keys.offset]);
}

/// Per-slot mean and biased variance of x over a plan (plan slot order), through the one
/// reduction core with MomentsOp. `center` is scratch of plan.slots elements.
template <class T, class Device>
void moments(const Plan& p, const T* x, acc_t* mean, acc_t* var, acc_t* center, const Device& dev) {
  const Index slots = p.slots;
  if (p.numel == 0) {
    for (Index s = 0; s < slots; ++s) mean[s] = var[s] = acc_t{0};
    return;
  }
  slot_centers(p, x, center);
  reduce(p, MomentsOp<T>{x, center}, mean, var, dev);
  for (Index s = 0; s < slots; ++s)
    finish_moments(center[s], mean[s], var[s], p.per_slot, mean[s], var[s]);
}

/// 1/sqrt(var + eps). BatchNorm and InstanceNorm define it as 0 when var == 0 and eps == 0
/// (ATen's InvStd special case: a constant channel then outputs exactly beta); LayerNorm and
/// GroupNorm do not (PyTorch returns NaN there, and so do we).
NORMKIT_ALWAYS_INLINE acc_t rstd_of(acc_t var, double eps, bool zero_for_constant) {
  if (zero_for_constant && var == 0 && eps == 0)
    return 0;
  return 1 / std::sqrt(var + eps);
}

}  // namespace detail
}  // namespace normkit

#endif  // NORMKIT_DETAIL_MOMENTS_HPP_
