// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_CHANNEL_NORM_HPP_
#define NORMKIT_DETAIL_CHANNEL_NORM_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>  // std::fill
#include <string>     // std::string, std::to_string
#include <vector>     // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/elementwise.hpp>
#include <normkit/detail/fused.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/running_stats.hpp>
#include <normkit/detail/tensor.hpp>

namespace normkit {
namespace detail {

// BatchNorm and InstanceNorm are one algorithm on two views (as in ATen, where
// instance_norm reshapes to (1, N*C, *) and calls batch_norm): statistics per channel c
// over (N, *), or per (n, c) over (*); both fold gamma/beta into a per-slot scale/shift,
// keep per-channel running statistics, and share the eps = 0 constant-channel rule.

enum class ChannelNormKind { batch, instance };

template <class T>
struct ChannelNormArgs {
  VectorRef<const T> weight, bias;
  VectorRef<T> running_mean, running_var;
  bool batch_stats = true;      // normalize with the batch (instance) statistics
  bool update_running = false;  // and blend them into the running statistics
  double momentum = 0.1;
  double eps = 1e-5;
};

template <class T, template <class> class O>
ChannelNormArgs<T> batch_norm_args(const O<T>& o) {
  ChannelNormArgs<T> a;
  a.weight = o.weight();
  a.bias = o.bias();
  a.running_mean = o.running_mean();
  a.running_var = o.running_var();
  a.batch_stats = o.training();
  a.update_running = o.training() && (o.running_mean() || o.running_var());
  a.momentum = o.momentum();
  a.eps = o.eps();
  return a;
}

inline Index spatial_size(const Shape& sh) {
  Index s = 1;
  for (int i = 2; i < sh.rank; ++i) s *= sh.dim[static_cast<std::size_t>(i)];
  return s;
}

/// Policy 1: the channel count is always checked against the module's.
inline void check_channels(const char* who, const char* what, Index expected, const Shape& sh) {
  if (sh.rank < 2 || sh.dim[1] != expected) {
    throw_shape(who, "expected input with " + std::to_string(expected) + " channels (" + what +
                         ") at logical dim 1, but got input of size " + shape_str(sh));
  }
}

template <class V>
void check_size(const char* who, const char* name, const V& v, Index n) {
  if (v && v.size() != n) {
    throw_shape(who, std::string(name) + " should contain " + std::to_string(n) + " elements not " +
                         std::to_string(v.size()));
  }
}

template <class T>
void channel_norm_check(const char* who,
                        ChannelNormKind kind,
                        const Shape& sh,
                        const ChannelNormArgs<T>& a) {
  const Index C = sh.dim[1];
  check_size(who, "running_mean", a.running_mean, C);
  check_size(who, "running_var", a.running_var, C);
  check_size(who, "weight", a.weight, C);
  check_size(who, "bias", a.bias, C);
  if (!a.batch_stats && (!a.running_mean || !a.running_var)) {
    throw_value(who, std::string(!a.running_mean ? "running_mean" : "running_var") +
                         " must be defined in evaluation mode");
  }
  if (a.batch_stats) {
    if (kind == ChannelNormKind::batch && sh.dim[0] * spatial_size(sh) == 1) {
      throw_value(who, "Expected more than 1 value per channel when training, got input size " +
                           shape_str(sh));
    }
    if (kind == ChannelNormKind::instance && spatial_size(sh) == 1) {
      throw_value(who, "Expected more than 1 spatial element when training, got input size " +
                           shape_str(sh));
    }
  }
}

/// The plan of a channel norm: batch = key C; instance = keys N, C.
inline Plan channel_plan(ChannelNormKind kind, const Shape& sh) {
  std::array<AxisSpec, kMaxAxes> ax{};
  for (int i = 0; i < sh.rank; ++i) {
    const bool key = i == 1 || (i == 0 && kind == ChannelNormKind::instance);
    ax[static_cast<std::size_t>(i)] =
        AxisSpec{sh.dim[static_cast<std::size_t>(i)], sh.stride[static_cast<std::size_t>(i)],
                 key ? Role::key : Role::reduce, 0};
  }
  return make_plan(ax.data(), sh.rank);
}

/// Plan slot of logical slot l (batch: l = c; instance: l = n * C + c).
inline Index plan_slot(ChannelNormKind kind, const Plan& p, Index l, Index C) {
  if (kind == ChannelNormKind::batch)
    return l * p.logical_slot_stride[1];
  return (l / C) * p.logical_slot_stride[0] + (l % C) * p.logical_slot_stride[1];
}

template <class T, class Device>
void channel_norm_forward(ChannelNormKind kind,
                          const Shape& sh,
                          const T* x,
                          T* y,
                          const ChannelNormArgs<T>& a,
                          SavedStats* saved,
                          const Device& dev) {
  const Index N = sh.dim[0], C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : N * C;
  const Plan p = channel_plan(kind, sh);
  // One scratch block: mean, rstd, var, scale, shift, centers (per slot), channel sums (2C).
  SmallBuffer<acc_t> ws(6 * slots + 2 * C);
  acc_t* mean = ws.data();
  acc_t* rstd = mean + slots;
  acc_t* var = rstd + slots;
  acc_t* scale = var + slots;
  acc_t* shift = scale + slots;
  acc_t* center = shift + slots;
  acc_t* cm = center + slots;
  acc_t* cv = cm + C;
  if (p.numel == 0) {  // empty batch: empty output, statistics untouched (§2.4)
    if (saved) {
      saved->mean.resize(slots);  // no allocation when the size is unchanged
      saved->mean.setZero();
      saved->rstd = saved->mean;
      saved->batch_stats = a.batch_stats;
    }
    return;
  }
  // gamma/beta per slot first; scale becomes rstd * gamma once the slot's rstd is known.
  for (Index l = 0; l < slots; ++l) {
    const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
    const Index c = l % C;
    scale[s] = a.weight ? static_cast<acc_t>(a.weight.data()[c]) : acc_t{1};
    shift[s] = a.bias ? static_cast<acc_t>(a.bias.data()[c]) : acc_t{0};
  }
  const AffineOp<T> op{x, y, mean, scale, shift};
  if (a.batch_stats) {
    auto finish = [&](Index s, acc_t m, acc_t v) {
      mean[s] = m;
      var[s] = v;
      rstd[s] = rstd_of(v, a.eps, true);
      scale[s] *= rstd[s];
    };
    if (!fused_forward(p, p, x, center, finish, op, dev)) {
      moments(p, x, mean, var, center, dev);
      for (Index s = 0; s < slots; ++s) finish(s, mean[s], var[s]);
      apply_affine(p, op, dev);
    }
    if (a.update_running) {
      // Per-channel batch statistics in logical order, averaged over n for InstanceNorm.
      std::fill(cm, cm + 2 * C, acc_t{0});
      const acc_t m = static_cast<acc_t>(p.per_slot);
      const Index reps = slots / C;
      for (Index l = 0; l < slots; ++l) {
        const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
        cm[static_cast<std::size_t>(l % C)] += mean[s];
        cv[static_cast<std::size_t>(l % C)] += var[s] * m / (m - 1);
      }
      for (Index c = 0; c < C; ++c) {
        cm[static_cast<std::size_t>(c)] /= static_cast<acc_t>(reps);
        cv[static_cast<std::size_t>(c)] /= static_cast<acc_t>(reps);
      }
      update_running_stats(a.running_mean.data(), a.running_var.data(), cm, cv, C, a.momentum);
    }
  } else {
    for (Index l = 0; l < slots; ++l) {
      const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
      const Index c = l % C;
      mean[s] = static_cast<acc_t>(a.running_mean.data()[c]);
      rstd[s] = rstd_of(static_cast<acc_t>(a.running_var.data()[c]), a.eps, false);
      scale[s] *= rstd[s];
    }
    apply_affine(p, op, dev);
  }
  if (saved) {
    saved->mean.resize(slots);  // no allocation when the size is unchanged
    saved->rstd.resize(slots);
    for (Index l = 0; l < slots; ++l) {
      const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
      saved->mean(l) = mean[s];
      saved->rstd(l) = rstd[s];
    }
    saved->batch_stats = a.batch_stats;
  }
}

template <class X, class DY, class T>
void check_grad_args(const char* who,
                     ChannelNormKind kind,
                     const Shape& sh,
                     const X& x,
                     const DY& dy,
                     const SavedStats& saved,
                     const VectorRef<const T>& weight,
                     const VectorRef<T>& gw,
                     const VectorRef<T>& gb) {
  static_assert(tensor_traits<X>::rank == tensor_traits<DY>::rank &&
                    tensor_traits<X>::layout == tensor_traits<DY>::layout,
                "normkit: grad_output must have the input's rank and storage order");
  constexpr int R = tensor_traits<X>::rank;
  for (int i = 0; i < R; ++i) {
    if (dim(x, i) != dim(dy, i)) {
      throw_shape(who, "expected grad_output of size " + dims_str(x.dimensions(), R) + " but got " +
                           dims_str(dy.dimensions(), R));
    }
  }
  const Index C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : sh.dim[0] * C;
  if (saved.mean.size() != slots || saved.rstd.size() != slots) {
    throw_shape(who, "expected saved statistics of " + std::to_string(slots) + " slots but got " +
                         std::to_string(saved.mean.size()));
  }
  check_size(who, "weight", weight, C);
  check_size(who, "grad_weight", gw, C);
  check_size(who, "grad_bias", gb, C);
}

template <class T, class Device>
void channel_norm_backward(ChannelNormKind kind,
                           const Shape& sh,
                           const T* x,
                           const T* dy,
                           T* dx,
                           const SavedStats& saved,
                           const VectorRef<const T>& weight,
                           const VectorRef<T>& gw,
                           const VectorRef<T>& gb,
                           const Device& dev) {
  const Index C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : sh.dim[0] * C;
  const Plan p = channel_plan(kind, sh);
  const auto n = static_cast<std::size_t>(slots);
  std::vector<acc_t> mean(n), rstd(n), s1(n), s2(n), A(n), B(n), Cc(n);
  for (Index l = 0; l < slots; ++l) {
    const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
    mean[s] = saved.mean(l);
    rstd[s] = saved.rstd(l);
  }
  const acc_t m = static_cast<acc_t>(p.per_slot);
  std::vector<acc_t> gs(n);  // gamma per slot
  for (Index l = 0; l < slots; ++l) {
    gs[static_cast<std::size_t>(plan_slot(kind, p, l, C))] =
        weight ? static_cast<acc_t>(weight.data()[l % C]) : acc_t{1};
  }
  // dx = a * dy + b * (x - mean) + c per slot, from the slot's sum(dy) and sum(dy * (x - mean)).
  auto finish = [&](Index si, acc_t sum_dy, acc_t sum_dyx) {
    const auto s = static_cast<std::size_t>(si);
    const acc_t g = gs[s], r = rstd[s];
    s1[s] = sum_dy;
    s2[s] = sum_dyx;
    A[s] = g * r;
    if (saved.batch_stats && m > 0) {
      B[s] = -g * r * r * r * sum_dyx / m;
      Cc[s] = -g * r * sum_dy / m;
    } else {
      B[s] = Cc[s] = 0;
    }
  };
  const GradSumsOp<T, false> rop{x, dy, mean.data(), nullptr};
  const GradInputOp<T, false> aop{x, dy, dx, mean.data(), A.data(), B.data(), Cc.data(), nullptr};
  if (dx && can_fuse<T>(p, p, dev)) {
    fused_slots<T>(p, p, rop, finish, aop, dev);  // dx while the slot is in cache
  } else {
    reduce(p, rop, s1.data(), s2.data(), dev);
    for (Index s = 0; s < slots; ++s)
      finish(s, s1[static_cast<std::size_t>(s)], s2[static_cast<std::size_t>(s)]);
    if (dx)
      apply_grad_input(p, aop, dev);
  }
  std::vector<acc_t> dw(static_cast<std::size_t>(C), 0.0), db(dw.size(), 0.0);
  for (Index l = 0; l < slots; ++l) {
    const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
    const auto c = static_cast<std::size_t>(l % C);
    dw[c] += s2[s] * rstd[s];
    db[c] += s1[s];
  }
  store_grad(gw, dw.data());
  store_grad(gb, db.data());
}

}  // namespace detail
}  // namespace normkit

#endif  // NORMKIT_DETAIL_CHANNEL_NORM_HPP_
