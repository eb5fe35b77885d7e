// normkit/detail/group_norm_impl.hpp: GroupNorm forward and backward on raw pointers and a
// Shape: statistics per (n, g) over the group's channels and positions, per-channel affine.
// The module header calls these after validating its input.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_GROUP_NORM_IMPL_HPP_
#define NORMKIT_DETAIL_GROUP_NORM_IMPL_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <string>  // std::string
#include <vector>  // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/apply.hpp>
#include <normkit/detail/channel_norm.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/fused.hpp>
#include <normkit/detail/instantiate.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/tensor.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

// GroupNorm: statistics per (n, g) over the group's C/G channels and all spatial positions
// (stats plan: keys N, G; reduced Cg, spatial), then a per-(n, c) folded apply (apply plan:
// keys N, C, as InstanceNorm's), since gamma/beta are per channel.
struct GroupPlans {
  Plan stats, apply;
  Index N, C, G, Cg;
  /// Whether each group's channels are consecutive apply slot groups of one run each (NCHW-like:
  /// a group is Cg contiguous planes), which the per-group fused loops need.
  bool planes = false;
};

inline GroupPlans group_plans(const Shape& sh, Index G) {
  GroupPlans gp;
  gp.N = sh.dim[0];
  gp.C = sh.dim[1];
  gp.G = G;
  gp.Cg = gp.C / G;
  std::array<AxisSpec, kMaxAxes> ax{};
  ax[0] = AxisSpec{gp.N, sh.stride[0], Role::key, 0};
  ax[1] = AxisSpec{G, gp.Cg * sh.stride[1], Role::key, 0};
  ax[2] = AxisSpec{gp.Cg, sh.stride[1], Role::reduce, 0};
  for (int i = 2; i < sh.rank; ++i) {
    const auto u = static_cast<std::size_t>(i);
    ax[u + 1] = AxisSpec{sh.dim[u], sh.stride[u], Role::reduce, 0};
  }
  gp.stats = make_plan(ax.data(), sh.rank + 1);
  gp.apply = channel_plan(ChannelNormKind::instance, sh);
  if (gp.apply.numel > 0 && !gp.apply.column_mode() && !gp.stats.column_mode()) {
    const Nest na = split(gp.apply);
    gp.planes = na.R == 1 && na.L <= kBlockElements && na.T == gp.N * gp.C &&
                gp.apply.logical_slot_stride[0] == gp.C && gp.apply.logical_slot_stride[1] == 1;
  }
  return gp;
}

template <class T>
void group_norm_check(const char* who,
                      const Shape& sh,
                      Index G,
                      const VectorRef<const T>& w,
                      const VectorRef<const T>& b) {
  if (G <= 0)
    fail(Fail::value, who, "Expected num groups to be greater than 0, got %lld",
         static_cast<long long>(G));
  const Index C = sh.dim[1];
  if (C % G != 0) {
    fail(Fail::shape, who,
         "Expected number of channels in input to be divisible by num_groups, but got input of "
         "shape %s and num_groups=%lld",
         shape_text(sh).s, static_cast<long long>(G));
  }
  for (int i = 0; i < 2; ++i) {
    const VectorRef<const T>& v = i == 0 ? w : b;
    const char* name = i == 0 ? "weight" : "bias";
    if (v && v.size() != C) {
      fail(Fail::shape, who,
           "Expected %s to be a vector of size equal to the number of channels in input, but got "
           "%s of shape [%lld] and input of shape %s",
           name, name, static_cast<long long>(v.size()), shape_text(sh).s);
    }
  }
}

template <class T, class P>
void group_norm_forward(const Shape& sh,
                        Index G,
                        const T* x,
                        T* y,
                        const VectorRef<const P>& w,
                        const VectorRef<const P>& b,
                        double eps,
                        SavedStats* saved,
                        T* copy,
                        const Exec& ex,
                        const T* res = nullptr,
                        int act = 0,
                        const EpiLeaves<T>* epi = nullptr) {
  const GroupPlans gp = group_plans(sh, G);
  const Index NG = gp.N * G, NC = gp.N * gp.C;
  std::vector<double> mean(static_cast<std::size_t>(NG)), rstd(mean.size());
  std::vector<AffineCoef> coef(static_cast<std::size_t>(NC));
  auto gamma = [&](Index c) { return w ? static_cast<double>(w.data()[c]) : 1.0; };
  auto beta = [&](Index c) { return b ? static_cast<double>(b.data()[c]) : 0.0; };
  auto sslot = [&](Index n, Index g) {
    return n * gp.stats.logical_slot_stride[0] + g * gp.stats.logical_slot_stride[1];
  };
  auto aslot = [&](Index n, Index c) {
    return n * gp.apply.logical_slot_stride[0] + c * gp.apply.logical_slot_stride[1];
  };
  // Coefficients of the channels of group (n, g) from its statistics slot s.
  auto coefficients = [&](Index n, Index g, Index s) {
    const auto u = static_cast<std::size_t>(s);
    for (Index c = g * gp.Cg; c < (g + 1) * gp.Cg; ++c)
      coef[static_cast<std::size_t>(aslot(n, c))] =
          affine_coef(mean[u], rstd[u] * gamma(c), beta(c));
  };
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
  const SumOp<T> rop{op.leaf, x, nullptr, nullptr};
  if (gp.planes && can_fuse(gp.stats, gp.stats, ex)) {
    // Per group, while its Cg planes are in cache: statistics, coefficients, apply.
    const Nest ns = split(gp.stats);
    const Nest na = split(gp.apply);
    const RowBlocks bl = row_blocks(ns);
    const Index pstride = na.ko.n ? na.ko.ax[static_cast<std::size_t>(na.ko.n - 1)]->stride : 0;
    auto groups = [&](Index first, Index last) {
      Odometer ks = ns.ko;
      ks.seek(first);
      for (Index q = first; q < last; ++q, ks.next()) {
        const Index s = ks.slot;
        const Part part = row_group(ns, bl, rop, ks);
        mean[static_cast<std::size_t>(s)] = part.a;
        rstd[static_cast<std::size_t>(s)] = rstd_of(variance(part), eps, false);
        const Index n = q / G, g = q % G;
        coefficients(n, g, s);
        const Index t0 = n * gp.C + g * gp.Cg;  // apply slot group of channel g*Cg (planes)
        Odometer ka = na.ko;
        ka.seek(t0);
        op.batch(false, ka.offset, na.L, gp.Cg, pstride, ka.slot, 1, 0, 0, 0);
      }
    };
    if (ex.parallel(gp.stats.numel)) {
      run_ranges(ex, NG, items_for(ex, NG), groups);
    } else {
      groups(0, NG);
    }
  } else {
    moments(gp.stats, x, mean.data(), rstd.data(), ex);
    for (std::size_t s = 0; s < mean.size(); ++s) rstd[s] = rstd_of(rstd[s], eps, false);
    for (Index n = 0; n < gp.N; ++n)
      for (Index g = 0; g < G; ++g) coefficients(n, g, sslot(n, g));
    SmallBuffer<double> dtab;
    SmallBuffer<float> ftab;
    if (want_tables(gp.apply))
      column_tables(op, NC, dtab, ftab);
    apply_plan(gp.apply, op, ex);
  }
  if (saved) {
    double *sm, *sr;
    stats_storage(*saved, NG, sm, sr);
    for (Index n = 0; n < gp.N; ++n) {
      for (Index g = 0; g < G; ++g) {
        const auto s = static_cast<std::size_t>(sslot(n, g));
        sm[n * G + g] = mean[s];
        sr[n * G + g] = rstd[s];
      }
    }
    saved->batch_stats = true;
  }
}

/// The group statistics of x, as a forward would save them.
template <class T>
void group_norm_stats(
    const Shape& sh, Index G, const T* x, double eps, SavedStats& out, const Exec& ex) {
  const GroupPlans gp = group_plans(sh, G);
  const Index NG = gp.N * G;
  std::vector<double> mean(static_cast<std::size_t>(NG)), var(mean.size());
  moments(gp.stats, x, mean.data(), var.data(), ex);
  double *om, *orr;
  stats_storage(out, NG, om, orr);
  for (Index n = 0; n < gp.N; ++n) {
    for (Index g = 0; g < G; ++g) {
      const auto s = static_cast<std::size_t>(n * gp.stats.logical_slot_stride[0] +
                                              g * gp.stats.logical_slot_stride[1]);
      om[n * G + g] = mean[s];
      orr[n * G + g] = rstd_of(var[s], eps, false);
    }
  }
  out.batch_stats = true;
}

template <class T, class P>
void group_norm_backward(const Shape& sh,
                         Index G,
                         const T* x,
                         const T* dy,
                         T* dx,
                         const SavedStats& saved,
                         const VectorRef<const P>& w,
                         const VectorRef<P>& gw,
                         const VectorRef<P>& gb,
                         const Exec& ex) {
  const GroupPlans gp = group_plans(sh, G);
  const Index NC = gp.N * gp.C;
  auto aslot = [&](Index n, Index c) {
    return n * gp.apply.logical_slot_stride[0] + c * gp.apply.logical_slot_stride[1];
  };
  const auto nc = static_cast<std::size_t>(NC);
  std::vector<double> center(nc), s1(nc), s2(nc);
  std::vector<GradCoef> gk(nc);
  for (Index n = 0; n < gp.N; ++n) {
    for (Index c = 0; c < gp.C; ++c)
      center[static_cast<std::size_t>(aslot(n, c))] = saved.mean.data()[n * G + c / gp.Cg];
  }
  const double m = static_cast<double>(gp.Cg * spatial_size(sh));
  auto gamma = [&](Index c) { return w ? static_cast<double>(w.data()[c]) : 1.0; };
  // dx coefficients of group (n, g) from its channels' sums (docs/semantics.md §8).
  auto coefficients = [&](Index n, Index g) {
    const double r = saved.rstd.data()[n * G + g];
    double sdy = 0, sdyx = 0;
    for (Index c = g * gp.Cg; c < (g + 1) * gp.Cg; ++c) {
      const auto a = static_cast<std::size_t>(aslot(n, c));
      sdy += gamma(c) * s1[a];
      sdyx += gamma(c) * s2[a];
    }
    for (Index c = g * gp.Cg; c < (g + 1) * gp.Cg; ++c) {
      const auto a = static_cast<std::size_t>(aslot(n, c));
      gk[a] = grad_coef(center[a], gamma(c) * r, m > 0 ? -r * r * r * sdyx / m : 0,
                        m > 0 ? -r * sdy / m : 0);
    }
  };
  const Leaves<T>& L = leaves<T>();
  const SumOp<T> rop{&L, x, dy, center.data()};
  ApplyOp<T> aop;
  aop.kind = ApplyKind::gradin;
  aop.leaf = &L;
  aop.x = x;
  aop.dy = dy;
  aop.y = dx;
  aop.gk = gk.data();
  const Nest na = split(gp.apply);
  // NB: fused per group (NCHW-like layouts whose (n, c) planes are single runs): the group's
  // channel sums, its coefficients and its dx, while the group's Cg planes are in cache --
  // 3B of traffic instead of 5B. The sums are reduce()'s (row_group per plane); dweight/dbias
  // are then accumulated in the same order as the two-pass path. Chosen by shape only.
  if (dx && gp.planes) {
    const Index NG = gp.N * G, Cg = gp.Cg;
    const RowBlocks bl = row_blocks(na);
    const Index pstride = na.ko.n ? na.ko.ax[static_cast<std::size_t>(na.ko.n - 1)]->stride : 0;
    auto groups = [&](Index first, Index last) {
      Odometer ko = na.ko;
      ko.seek(first * Cg);
      for (Index q = first; q < last; ++q) {
        const Odometer start = ko;
        for (Index i = 0; i < Cg; ++i, ko.next()) {
          const auto a = static_cast<std::size_t>(ko.slot);
          const Part part = row_group(na, bl, rop, ko);
          s1[a] = part.a;
          s2[a] = part.b;
        }
        coefficients(q / G, q % G);
        aop.batch(false, start.offset, na.L, Cg, pstride, start.slot, 1, 0, 0, 0);
      }
    };
    if (ex.parallel(sh.numel())) {
      run_ranges(ex, NG, items_for(ex, NG), groups);
    } else {
      groups(0, NG);
    }
  } else {
    // Per (n, c): sum dy and sum dy * (x - mean_ng) -- the same core as every other norm.
    std::vector<Part> sums(nc);
    reduce(gp.apply, rop, sums.data(), ex);
    for (std::size_t a = 0; a < nc; ++a) {
      s1[a] = sums[a].a;
      s2[a] = sums[a].b;
    }
    for (Index n = 0; n < gp.N; ++n) {
      for (Index g = 0; g < G; ++g) coefficients(n, g);
    }
    if (dx) {
      SmallBuffer<double> dtab;
      SmallBuffer<float> ftab;
      if (want_tables(gp.apply))
        column_tables(aop, NC, dtab, ftab);
      apply_plan(gp.apply, aop, ex);
    }
  }
  std::vector<double> dw(static_cast<std::size_t>(gp.C), 0.0), db(dw.size(), 0.0);
  for (Index n = 0; n < gp.N; ++n) {
    for (Index c = 0; c < gp.C; ++c) {
      const auto a = static_cast<std::size_t>(aslot(n, c));
      dw[static_cast<std::size_t>(c)] += s2[a] * saved.rstd.data()[n * G + c / gp.Cg];
      db[static_cast<std::size_t>(c)] += s1[a];
    }
  }
  store_grad(gw, dw.data());
  store_grad(gb, db.data());
}

NORMKIT_DECLARE_EXTERN(NORMKIT_GROUP_NORM_ENTRY_POINTS)

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_GROUP_NORM_IMPL_HPP_
