// normkit/detail/channel_norm.hpp: BatchNorm and InstanceNorm -- one algorithm on two views
// (statistics per channel c over (N, *), or per (n, c) over (*)), forward and backward, on
// raw pointers and a Shape. The module headers call these after validating their input.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_CHANNEL_NORM_HPP_
#define NORMKIT_DETAIL_CHANNEL_NORM_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>  // std::fill
#include <array>      // std::array
#include <string>     // std::string, std::to_string
#include <vector>     // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/apply.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/fused.hpp>
#include <normkit/detail/instantiate.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/running_stats.hpp>
#include <normkit/detail/tensor.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

// As in ATen, where instance_norm reshapes to (1, N*C, *) and calls batch_norm: both fold
// gamma/beta into a per-slot scale/shift, keep per-channel running statistics, and share the
// eps = 0 constant-channel rule (docs/semantics.md §2.2).

enum class ChannelNormKind { batch, instance };

template <class T>
struct ChannelNormArgs {
  VectorRef<const T> weight, bias;
  VectorRef<T> running_mean, running_var;
  bool batch_stats = true;      // normalize with the batch (instance) statistics
  bool update_running = false;  // and blend them into the running statistics
  double momentum = 0.1;
  double eps = 1e-5;
  // Batch statistics computed elsewhere (SyncBatchNorm: merged over every process), per
  // channel in logical order, over batch_count elements per channel; BatchNorm only.
  const double* batch_mean = nullptr;
  const double* batch_var = nullptr;
  double batch_count = 0;
};

inline Index spatial_size(const Shape& sh) {
  Index s = 1;
  for (int i = 2; i < sh.rank; ++i) s *= sh.dim[static_cast<std::size_t>(i)];
  return s;
}

/// The channel count is always checked against the module's (docs/semantics.md §9, a
/// deliberate difference: PyTorch skips it without affine parameters and running buffers).
inline void check_channels(const char* who, const char* what, Index expected, const Shape& sh) {
  if (sh.rank < 2 || sh.dim[1] != expected) {
    fail(Fail::shape, who,
         "expected input with %lld channels (%s) at logical dim 1, but got input of size %s",
         static_cast<long long>(expected), what, shape_text(sh).s);
  }
}

NORMKIT_ALWAYS_INLINE void check_size(
    const char* who, const char* name, bool present, Index size, Index n) {
  if (present && size != n) {
    fail(Fail::shape, who, "%s should contain %lld elements not %lld", name,
         static_cast<long long>(n), static_cast<long long>(size));
  }
}
template <class V>
void check_size(const char* who, const char* name, const V& v, Index n) {
  check_size(who, name, v.present(), v.size(), n);
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
    fail(Fail::value, who, "%s must be defined in evaluation mode",
         !a.running_mean ? "running_mean" : "running_var");
  }
  if (a.batch_stats && a.batch_mean) {
    if (a.batch_count == 1) {
      fail(Fail::value, who,
           "Expected more than 1 value per channel when training, got 1 value per channel over "
           "the whole batch (input size %s here)",
           shape_text(sh).s);
    }
  } else if (a.batch_stats) {
    if (kind == ChannelNormKind::batch && sh.dim[0] * spatial_size(sh) == 1) {
      fail(Fail::value, who,
           "Expected more than 1 value per channel when training, got input size %s",
           shape_text(sh).s);
    }
    if (kind == ChannelNormKind::instance && spatial_size(sh) == 1) {
      fail(Fail::value, who,
           "Expected more than 1 spatial element when training, got input size %s",
           shape_text(sh).s);
    }
  }
}

/// The plan of a channel norm: batch = key C; instance = keys N, C. BatchNorm marks N as the
/// sample axis and takes per-sample blocks (reduction.hpp) when a sample's share of a channel
/// has at least kSampleBlockMin elements, or always when `sample_blocks` (SyncBatchNorm).
inline Plan channel_plan(ChannelNormKind kind, const Shape& sh, bool sample_blocks = false) {
  std::array<AxisSpec, kMaxAxes> ax{};
  for (int i = 0; i < sh.rank; ++i) {
    const bool key = i == 1 || (i == 0 && kind == ChannelNormKind::instance);
    ax[static_cast<std::size_t>(i)] =
        AxisSpec{sh.dim[static_cast<std::size_t>(i)], sh.stride[static_cast<std::size_t>(i)],
                 key ? Role::key : Role::reduce, 0, kind == ChannelNormKind::batch && i == 0};
  }
  Plan p = make_plan(ax.data(), sh.rank);
  p.sample_blocks =
      kind == ChannelNormKind::batch && (sample_blocks || spatial_size(sh) >= kSampleBlockMin);
  return p;
}

/// Plan slot of logical slot l (batch: l = c; instance: l = n * C + c).
inline Index plan_slot(ChannelNormKind kind, const Plan& p, Index l, Index C) {
  if (kind == ChannelNormKind::batch)
    return l * p.logical_slot_stride[1];
  return (l / C) * p.logical_slot_stride[0] + (l % C) * p.logical_slot_stride[1];
}

/// Column tables pay for themselves only when the tensor has a few rows per slot.
inline bool want_tables(const Plan& p) {
  return p.column_mode() && p.numel >= 4 * p.slots;
}

/// Forward: y from x (and `copy` of x, when not null, written as x is read); `saved` gets the
/// mean and rstd used, in logical slot order.
template <class T, class P>
void channel_norm_forward(ChannelNormKind kind,
                          const Shape& sh,
                          const T* x,
                          T* y,
                          const ChannelNormArgs<P>& a,
                          SavedStats* saved,
                          T* copy,
                          const Exec& ex,
                          const T* res = nullptr,
                          int act = 0,
                          const EpiLeaves<T>* epi = nullptr) {
  const Index N = sh.dim[0], C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : N * C;
  const Plan p = channel_plan(kind, sh);
  // One scratch block: mean, rstd, var, gamma, beta (per slot), channel sums (2C).
  SmallBuffer<double> ws(5 * slots + 2 * C);
  double* mean = ws.data();
  double* rstd = mean + slots;
  double* var = rstd + slots;
  double* gamma = var + slots;
  double* beta = gamma + slots;
  double* cm = beta + slots;
  double* cv = cm + C;
  SmallBuffer<AffineCoef, 32> coef(slots);
  if (p.numel == 0 && !a.batch_mean) {  // empty batch: empty output, statistics untouched
    if (saved) {
      double *sm, *sr;
      stats_storage(*saved, slots, sm, sr);
      std::fill(sm, sm + slots, 0.0);
      std::fill(sr, sr + slots, 0.0);
      saved->batch_stats = a.batch_stats;
    }
    return;
  }
  for (Index l = 0; l < slots; ++l) {
    const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
    const Index c = l % C;
    gamma[s] = a.weight ? static_cast<double>(a.weight.data()[c]) : 1.0;
    beta[s] = a.bias ? static_cast<double>(a.bias.data()[c]) : 0.0;
  }
  ApplyOp<T> op;
  op.kind = ApplyKind::affine;
  op.leaf = &leaves<T>();
  op.x = x;
  op.y = y;
  op.ak = coef.data();
  op.copy = copy;
  if (res || act) {
    op.res = res;
    op.act = act;
    op.epi = epi;  // the caller's table: only forward_fused instantiates the epilogue kernels
  }
  SmallBuffer<double> dtab;
  SmallBuffer<float> ftab;
  // Given statistics (SyncBatchNorm) take the column tables whenever the plan is in column
  // mode, not by size: without them the apply runs in double (ApplyOp::generic), so an
  // element's bits would depend on the size of the shard it is in.
  auto apply_all = [&] {
    if (want_tables(p) || (a.batch_mean && p.column_mode()))
      column_tables(op, slots, dtab, ftab);
    apply_plan(p, op, ex);
  };
  if (a.batch_stats) {
    auto finish = [&](Index s, double m, double v) {
      mean[s] = m;
      var[s] = v;
      rstd[s] = rstd_of(v, a.eps, true);
      coef.data()[s] = affine_coef(m, gamma[s] * rstd[s], beta[s]);
    };
    if (a.batch_mean) {
      for (Index c = 0; c < C; ++c) {
        const Index s = plan_slot(kind, p, c, C);
        finish(s, a.batch_mean[c], a.batch_var[c]);
      }
      apply_all();
    } else if (!fused_forward(p, p, x, finish, op, ex)) {
      moments(p, x, mean, var, ex);
      for (Index s = 0; s < slots; ++s) finish(s, mean[s], var[s]);
      apply_all();
    }
    if (a.update_running) {
      // Per-channel batch statistics in logical order, averaged over n for InstanceNorm.
      std::fill(cm, cm + 2 * C, 0.0);
      const double m = a.batch_mean ? a.batch_count : static_cast<double>(p.per_slot);
      const Index reps = slots / C;
      for (Index l = 0; l < slots; ++l) {
        const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
        cm[static_cast<std::size_t>(l % C)] += mean[s];
        cv[static_cast<std::size_t>(l % C)] += var[s] * m / (m - 1);
      }
      for (Index c = 0; c < C; ++c) {
        cm[static_cast<std::size_t>(c)] /= static_cast<double>(reps);
        cv[static_cast<std::size_t>(c)] /= static_cast<double>(reps);
      }
      update_running_stats(a.running_mean.data(), a.running_var.data(), cm, cv, C, a.momentum);
    }
  } else {
    for (Index l = 0; l < slots; ++l) {
      const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
      const Index c = l % C;
      mean[s] = static_cast<double>(a.running_mean.data()[c]);
      rstd[s] = rstd_of(static_cast<double>(a.running_var.data()[c]), a.eps, false);
      coef.data()[s] = affine_coef(mean[s], gamma[s] * rstd[s], beta[s]);
    }
    apply_all();
  }
  if (saved) {
    double *sm, *sr;
    stats_storage(*saved, slots, sm, sr);
    for (Index l = 0; l < slots; ++l) {
      const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
      sm[l] = mean[s];
      sr[l] = rstd[s];
    }
    saved->batch_stats = a.batch_stats;
  }
}

/// The batch (instance) statistics of x, as a training forward would save them, without
/// writing any output (backward(x, dy) after a forward that kept nothing).
template <class T>
void channel_norm_stats(ChannelNormKind kind,
                        const Shape& sh,
                        const T* x,
                        double eps,
                        SavedStats& out,
                        const Exec& ex) {
  const Index C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : sh.dim[0] * C;
  const Plan p = channel_plan(kind, sh);
  std::vector<double> mean(static_cast<std::size_t>(slots)), var(mean.size());
  moments(p, x, mean.data(), var.data(), ex);
  double *om, *orr;
  stats_storage(out, slots, om, orr);
  for (Index l = 0; l < slots; ++l) {
    const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
    om[l] = mean[s];
    orr[l] = p.numel == 0 ? 0.0 : rstd_of(var[s], eps, true);
  }
  out.batch_stats = true;
}

/// The moments of every statistic slot of x, in logical slot order (batch: C; instance:
/// N * C): out[l] = (mean, M2, count), computed as a training forward computes them (the same
/// plan, blocks and merge order, so the same bits for any thread count). precise_bn.hpp
/// merges them over batches.
template <class T>
void channel_norm_parts(
    ChannelNormKind kind, const Shape& sh, const T* x, Part* out, const Exec& ex) {
  const Index C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : sh.dim[0] * C;
  const Plan p = channel_plan(kind, sh);
  std::vector<Part> parts(static_cast<std::size_t>(slots));
  reduce(p, SumOp<T>{&leaves<T>(), x, nullptr, nullptr}, parts.data(), ex);
  for (Index l = 0; l < slots; ++l)
    out[l] = parts[static_cast<std::size_t>(plan_slot(kind, p, l, C))];
}

/// Statistics from running buffers (evaluation with track_running_stats), as a forward in
/// that mode uses them.
template <class T>
void running_saved_stats(ChannelNormKind kind,
                         const Shape& sh,
                         const T* running_mean,
                         const T* running_var,
                         double eps,
                         SavedStats& out) {
  const Index C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : sh.dim[0] * C;
  double *om, *orr;
  stats_storage(out, slots, om, orr);
  for (Index l = 0; l < slots; ++l) {
    om[l] = static_cast<double>(running_mean[l % C]);
    orr[l] = rstd_of(static_cast<double>(running_var[l % C]), eps, false);
  }
  out.batch_stats = false;
}

template <class T>
void check_grad_args(const char* who,
                     ChannelNormKind kind,
                     const Shape& sh,
                     const SavedStats& saved,
                     const VectorRef<const T>& weight,
                     const VectorRef<T>& gw,
                     const VectorRef<T>& gb) {
  const Index C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : sh.dim[0] * C;
  if (saved.mean.size() != slots || saved.rstd.size() != slots) {
    fail(Fail::shape, who, "expected saved statistics of %lld slots but got %lld",
         static_cast<long long>(slots), static_cast<long long>(saved.mean.size()));
  }
  check_size(who, "weight", weight, C);
  check_size(who, "grad_weight", gw, C);
  check_size(who, "grad_bias", gb, C);
}

/// Per-sample partials of BatchNorm (SyncBatchNorm): out[n * C + c] is sample n's moments of
/// channel c (dy null), or its backward sums sum(dy), sum(dy * (x - mean[c])) -- exactly
/// the per-sample partials BatchNorm folds when its plan takes per-sample blocks
/// (reduction.hpp): N outermost in memory (RowMajor NCHW-like and channels-last), where a
/// sample is a dense block. Otherwise (ColMajor: a sample's elements are N apart) each
/// sample is first copied to a dense buffer, in the input's axis order: the plan needs a
/// dense view, and a sample's partial is then the same wherever it sits in the batch.
template <class T>
void channel_sample_parts(
    const Shape& sh, const T* x, const T* dy, const double* mean, Part* out, const Exec& ex) {
  const Index N = sh.dim[0], C = sh.dim[1];
  Shape one = sh;
  one.dim[0] = 1;
  const Index per = one.numel();
  const bool gather = sh.stride[0] != per;
  // The gather order: axes 1.. by increasing input stride, innermost first.
  std::array<int, kMaxAxes> ord{};
  int m = 0;
  if (gather) {
    for (int i = 1; i < sh.rank; ++i) {
      int j = m++;
      for (; j > 0 && sh.stride[static_cast<std::size_t>(ord[static_cast<std::size_t>(j - 1)])] >
                          sh.stride[static_cast<std::size_t>(i)];
           --j)
        ord[static_cast<std::size_t>(j)] = ord[static_cast<std::size_t>(j - 1)];
      ord[static_cast<std::size_t>(j)] = i;
    }
    Index s = 1;
    for (int j = 0; j < m; ++j) {
      const auto a = static_cast<std::size_t>(ord[static_cast<std::size_t>(j)]);
      one.stride[a] = s;
      s *= one.dim[a];
    }
    one.stride[0] = per;
  }
  const Plan p = channel_plan(ChannelNormKind::batch, one, true);
  std::vector<double> center(static_cast<std::size_t>(C));
  if (dy) {
    for (Index c = 0; c < C; ++c)
      center[static_cast<std::size_t>(plan_slot(ChannelNormKind::batch, p, c, C))] = mean[c];
  }
  std::vector<T> gx(gather ? static_cast<std::size_t>(per) : 0);
  std::vector<T> gdy(gather && dy ? static_cast<std::size_t>(per) : 0);
  // Copies sample n of src into dst, in the gather order.
  auto copy_sample = [&](const T* src, T* dst) {
    std::array<Index, kMaxAxes> idx{};
    Index off = 0;
    for (Index k = 0; k < per; ++k) {
      dst[k] = src[off];
      for (int j = 0; j < m; ++j) {
        const auto a = static_cast<std::size_t>(ord[static_cast<std::size_t>(j)]);
        off += sh.stride[a];
        if (++idx[a] < sh.dim[a])
          break;
        off -= sh.dim[a] * sh.stride[a];
        idx[a] = 0;
      }
    }
  };
  std::vector<Part> parts(static_cast<std::size_t>(C));
  const Leaves<T>& L = leaves<T>();
  for (Index n = 0; n < N; ++n) {
    const Index off = n * sh.stride[0];
    const T* xs = x + off;
    const T* dys = dy ? dy + off : nullptr;
    if (gather) {
      copy_sample(xs, gx.data());
      xs = gx.data();
      if (dy) {
        copy_sample(dys, gdy.data());
        dys = gdy.data();
      }
    }
    reduce(p, SumOp<T>{&L, xs, dys, center.data()}, parts.data(), ex);
    for (Index c = 0; c < C; ++c)
      out[n * C + c] = parts[static_cast<std::size_t>(plan_slot(ChannelNormKind::batch, p, c, C))];
  }
}

/// BatchNorm's dx from the statistics the forward used (per channel: mean, rstd) and the
/// per-channel backward sums over `count` elements per channel (SyncBatchNorm: the sums of
/// every process): the same coefficients and apply as channel_norm_backward.
template <class T, class P>
void channel_norm_dx(const Shape& sh,
                     const T* x,
                     const T* dy,
                     T* dx,
                     const double* mean_c,
                     const double* rstd_c,
                     const Part* sums_c,
                     double count,
                     const VectorRef<const P>& weight,
                     const Exec& ex) {
  const Index C = sh.dim[1];
  const Plan p = channel_plan(ChannelNormKind::batch, sh);
  if (p.numel == 0)
    return;
  std::vector<GradCoef> gk(static_cast<std::size_t>(C));
  for (Index c = 0; c < C; ++c) {
    const double g = weight ? static_cast<double>(weight.data()[c]) : 1.0, r = rstd_c[c];
    gk[static_cast<std::size_t>(plan_slot(ChannelNormKind::batch, p, c, C))] = grad_coef(
        mean_c[c], g * r, -g * r * r * r * sums_c[c].b / count, -g * r * sums_c[c].a / count);
  }
  ApplyOp<T> aop;
  aop.kind = ApplyKind::gradin;
  aop.leaf = &leaves<T>();
  aop.x = x;
  aop.dy = dy;
  aop.y = dx;
  aop.gk = gk.data();
  SmallBuffer<double> dtab;
  SmallBuffer<float> ftab;
  if (p.column_mode())  // whatever the shard's size, as channel_norm_forward's given statistics
    column_tables(aop, C, dtab, ftab);
  apply_plan(p, aop, ex);
}

/// Backward from the statistics the forward used: dx (when not null), dweight and dbias
/// (when present; summed over the batch for InstanceNorm).
///
/// NB: batch statistics (docs/semantics.md §8): dx = a * dy + b * (x - mean) + c per slot with
/// a = w * r, b = -w * r^3 * sum(dy * (x - mean)) / m, c = -w * r * sum(dy) / m. Running
/// statistics (frozen BatchNorm, evaluation with buffers): dx = w * r * dy exactly, computed
/// from dy alone -- x never enters dx, so a NaN or inf in x cannot leak into it through a
/// 0 * x term (it does reach dweight, as in PyTorch).
template <class T, class P>
void channel_norm_backward(ChannelNormKind kind,
                           const Shape& sh,
                           const T* x,
                           const T* dy,
                           T* dx,
                           const SavedStats& saved,
                           const VectorRef<const P>& weight,
                           const VectorRef<P>& gw,
                           const VectorRef<P>& gb,
                           const Exec& ex) {
  const Index C = sh.dim[1];
  const Index slots = kind == ChannelNormKind::batch ? C : sh.dim[0] * C;
  if (sh.numel() == 0) {
    std::vector<double> zero(static_cast<std::size_t>(C), 0.0);
    store_grad(gw, zero.data());
    store_grad(gb, zero.data());
    return;
  }
  const Plan p = channel_plan(kind, sh);
  const auto n = static_cast<std::size_t>(slots);
  std::vector<double> mean(n), rstd(n), gs(n), s1(n), s2(n);
  for (Index l = 0; l < slots; ++l) {
    const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
    mean[s] = saved.mean.data()[l];
    rstd[s] = saved.rstd.data()[l];
    gs[s] = weight ? static_cast<double>(weight.data()[l % C]) : 1.0;
  }
  const double m = static_cast<double>(p.per_slot);
  const bool batch = saved.batch_stats;
  std::vector<GradCoef> gk(batch ? n : 0);
  std::vector<AffineCoef> ak(batch ? 0 : n);
  auto finish = [&](Index si, const Part& part) {
    const auto s = static_cast<std::size_t>(si);
    const double sum_dy = part.a, sum_dyx = part.b;
    s1[s] = sum_dy;
    s2[s] = sum_dyx;
    const double g = gs[s], r = rstd[s];
    if (batch)
      gk[s] = grad_coef(mean[s], g * r, -g * r * r * r * sum_dyx / m, -g * r * sum_dy / m);
  };
  const Leaves<T>& L = leaves<T>();
  const SumOp<T> rop{&L, x, dy, mean.data()};
  ApplyOp<T> aop;
  aop.leaf = &L;
  aop.y = dx;
  if (batch) {
    aop.kind = ApplyKind::gradin;
    aop.x = x;
    aop.dy = dy;
    aop.gk = gk.data();
  } else {
    // dx = (dy - 0) * (w * r) + 0: the affine apply with dy as its input.
    aop.kind = ApplyKind::affine;
    aop.x = dy;
    aop.ak = ak.data();
    for (std::size_t s = 0; s < n; ++s) ak[s] = affine_coef(0.0, gs[s] * rstd[s], 0.0);
  }
  if (dx && can_fuse(p, p, ex)) {
    fused_slots<T>(p, p, rop, make_hooks(finish), aop, ex);  // dx while the slot is in cache
  } else {
    std::vector<Part> sums(n);
    reduce(p, rop, sums.data(), ex);
    for (Index s = 0; s < slots; ++s) finish(s, sums[static_cast<std::size_t>(s)]);
    if (dx) {
      SmallBuffer<double> dtab;
      SmallBuffer<float> ftab;
      if (want_tables(p))
        column_tables(aop, slots, dtab, ftab);
      apply_plan(p, aop, ex);
    }
  }
  std::vector<double> dw(static_cast<std::size_t>(C), 0.0), db(dw.size(), 0.0);
  for (Index l = 0; l < slots; ++l) {
    const auto s = static_cast<std::size_t>(plan_slot(kind, p, l, C));
    const auto c = static_cast<std::size_t>(l % C);
    dw[c] += s2[s] * rstd[s];
    db[c] += s1[s];
  }
  store_grad(gw, dw.data());
  store_grad(gb, db.data());
}

NORMKIT_DECLARE_EXTERN(NORMKIT_CHANNEL_NORM_ENTRY_POINTS)

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_CHANNEL_NORM_HPP_
