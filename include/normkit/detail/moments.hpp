// normkit/detail/moments.hpp: per-slot mean and variance from the reduction core's shifted
// sums, and rstd.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_MOMENTS_HPP_
#define NORMKIT_DETAIL_MOMENTS_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <cmath>  // std::sqrt, std::isinf, std::isfinite

#include <normkit/config.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/scratch.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

/// Biased variance of a moments reduction (M2 / n; 0 for no elements).
NORMKIT_ALWAYS_INLINE double variance(const Part& p) {
  return p.n > 0 ? p.b / static_cast<double>(p.n) : 0.0;
}

/// Per-slot mean and biased variance of x over a plan (plan slot order), through the one
/// reduction core.
template <class T>
void moments(const Plan& p, const T* x, double* mean, double* var, const Exec& ex) {
  const Index slots = p.slots;
  SmallBuffer<Part, 64> out(slots);
  reduce(p, SumOp<T>{&leaves<T>(), x, nullptr, nullptr}, out.data(), ex);
  for (Index s = 0; s < slots; ++s) {
    mean[s] = out.data()[s].a;
    var[s] = variance(out.data()[s]);
  }
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
