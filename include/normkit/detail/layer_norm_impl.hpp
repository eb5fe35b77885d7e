// normkit/detail/layer_norm_impl.hpp: LayerNorm forward and backward on raw pointers and a
// Shape -- the views (statistics per row, parameter sums per position) and the one-pass
// backward. The module header calls these after validating its input.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_LAYER_NORM_IMPL_HPP_
#define NORMKIT_DETAIL_LAYER_NORM_IMPL_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::max, std::min, std::fill
#include <string>       // std::string
#include <type_traits>  // std::is_same
#include <vector>       // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/apply.hpp>
#include <normkit/detail/dispatch.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/fused.hpp>
#include <normkit/detail/instantiate.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/tensor.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

inline Text list_text(const std::vector<Index>& v) {
  return dims_text(v.data(), static_cast<int>(v.size()));
}

inline Index product(const std::vector<Index>& v) {
  Index p = 1;
  for (Index d : v) p *= d;
  return p;
}

/// v's values as C: v's own storage when it is of type C, else converted into buf.
template <class C, class P>
const C* as_compute(const VectorRef<const P>& v, std::vector<C>& buf) {
  if constexpr (std::is_same<C, P>::value) {
    (void)buf;
    return v.data();
  } else {
    buf.resize(static_cast<std::size_t>(v.size()));
    for (std::size_t i = 0; i < buf.size(); ++i)
      buf[i] = static_cast<C>(static_cast<float>(v.data()[i]));
    return buf.data();
  }
}

/// LayerNorm's (and RMSNorm's) argument checks: trailing dims equal to normalized_shape,
/// weight/bias of prod(normalized_shape) elements.
template <class T>
void layer_norm_check(const char* who,
                      const Shape& sh,
                      const std::vector<Index>& ns,
                      const VectorRef<const T>& w,
                      const VectorRef<const T>& b) {
  if (ns.empty()) {
    fail(Fail::value, who,
         "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
         "element, but got normalized_shape = []");
  }
  const int D = static_cast<int>(ns.size());
  bool ok = sh.rank >= D;
  for (int j = 0; ok && j < D; ++j) {
    const auto lead = static_cast<std::size_t>(sh.rank - D);
    ok = sh.dim[lead + static_cast<std::size_t>(j)] == ns[static_cast<std::size_t>(j)];
  }
  if (!ok) {
    const Text want = list_text(ns);
    fail(Fail::shape, who,
         "Given normalized_shape=%s, expected input with shape [*, %s, but got input of size%s",
         want.s, want.s + 1, shape_text(sh).s);
  }
  const Index n = product(ns);
  for (int i = 0; i < 2; ++i) {
    const VectorRef<const T>& v = i == 0 ? w : b;
    const char* name = i == 0 ? "weight" : "bias";
    if (v && v.size() != n) {
      fail(Fail::shape, who,
           "Expected %s to be of same shape as normalized_shape, but got %s of %lld elements and "
           "normalized_shape = %s",
           name, name, static_cast<long long>(v.size()), list_text(ns).s);
    }
  }
}

// LayerNorm's plans. stats: leading axes are keys (one slot per row), trailing axes reduced,
// their aux index = the row-major position inside normalized_shape (gamma/beta's index).
struct LayerPlans {
  Plan stats;
  int lead = 0;
  Index rows = 1, n = 1;
};

inline LayerPlans layer_plans(const Shape& sh, int D) {
  LayerPlans lp;
  lp.lead = sh.rank - D;
  std::array<AxisSpec, kMaxAxes> ax{};
  Index ps = 1;
  for (int i = sh.rank - 1; i >= 0; --i) {
    const auto u = static_cast<std::size_t>(i);
    const bool lead = i < lp.lead;
    ax[u] = AxisSpec{sh.dim[u], sh.stride[u], lead ? Role::key : Role::reduce, lead ? 0 : ps};
    if (lead) {
      lp.rows *= sh.dim[u];
    } else {
      ps *= sh.dim[u];
    }
  }
  lp.n = ps;
  lp.stats = make_plan(ax.data(), sh.rank);
  return lp;
}

/// Plan slot of every logical (row-major) index over axes [first, last) of sh.
inline std::vector<Index> slot_map(const Shape& sh, const Plan& p, int first, int last) {
  Index count = 1;
  for (int i = first; i < last; ++i) count *= sh.dim[static_cast<std::size_t>(i)];
  std::vector<Index> map(static_cast<std::size_t>(count));
  for (Index l = 0; l < count; ++l) {
    Index rem = l, s = 0;
    for (int i = last - 1; i >= first; --i) {
      const Index d = sh.dim[static_cast<std::size_t>(i)];
      s += (rem % d) * p.logical_slot_stride[static_cast<std::size_t>(i)];
      rem /= d;
    }
    map[static_cast<std::size_t>(l)] = s;
  }
  return map;
}

/// Statistics in plan slot order -> logical row order.
inline void store_row_stats(const Shape& sh,
                            const LayerPlans& lp,
                            const std::vector<double>& mean,
                            const std::vector<double>& rstd,
                            SavedStats& saved) {
  const std::vector<Index> map = slot_map(sh, lp.stats, 0, lp.lead);
  double *sm, *sr;
  stats_storage(saved, lp.rows, sm, sr);
  for (Index l = 0; l < lp.rows; ++l) {
    const auto s = static_cast<std::size_t>(map[static_cast<std::size_t>(l)]);
    sm[l] = mean[s];
    sr[l] = rstd[s];
  }
  saved.batch_stats = true;
}

// NB: RMSNorm (rms = true) is this same view and this same reduction: the mean of squares is
// var + mean^2 of the row's moments (exact in algebra, and in double far below float rounding:
// the moments are accurate to ~1e-16 relative and both terms are non-negative), saved as
// "mean" 0 and rstd = 1/sqrt(mean of squares + eps); the apply is LayerNorm's with mean 0 and
// no bias. The backward is LayerNorm's with mean 0 and without the -r * mean(g) term.

/// LayerNorm (or RMSNorm) forward.
template <class T, class P>
void layer_norm_forward(const Shape& sh,
                        int D,
                        const T* x,
                        T* y,
                        const VectorRef<const P>& w,
                        const VectorRef<const P>& b,
                        double eps,
                        SavedStats* saved,
                        T* copy,
                        const Exec& ex,
                        bool rms = false) {
  const LayerPlans lp = layer_plans(sh, D);
  const auto rows = static_cast<std::size_t>(lp.rows);
  std::vector<double> mean(rows), rstd(rows);
  std::vector<AffineCoef> coef(rows);
  auto finish = [&](Index s, double m, double v) {
    const auto u = static_cast<std::size_t>(s);
    mean[u] = rms ? 0.0 : m;
    rstd[u] = rstd_of(rms ? v + m * m : v, eps, false);
    coef[u] = affine_coef(mean[u], rstd[u], 0.0);
  };
  ApplyOp<T> op;
  op.leaf = &leaves<T>();
  op.ln_leaf = &ln_leaves<T>();
  op.x = x;
  op.y = y;
  op.ak = coef.data();
  op.copy = copy;
  using C = compute_t<T>;
  std::vector<C> fill, wbuf, bbuf;
  if (w || b) {
    // The caller's weight/bias are read in place when they are of the computation type; a
    // missing one is replaced by ones/zeros.
    op.kind = ApplyKind::ln_affine;
    if (!w || !b)
      fill.assign(static_cast<std::size_t>(lp.n), w ? C(0) : C(1));
    op.gamma = w ? as_compute<C>(w, wbuf) : fill.data();
    op.beta = b ? as_compute<C>(b, bbuf) : fill.data();
  } else {
    op.kind = ApplyKind::affine;
  }
  if (!fused_forward(lp.stats, lp.stats, x, finish, op, ex)) {
    std::vector<double> var(rows);
    moments(lp.stats, x, mean.data(), var.data(), ex);
    for (std::size_t s = 0; s < rows; ++s) finish(static_cast<Index>(s), mean[s], var[s]);
    SmallBuffer<double> dtab;
    SmallBuffer<float> ftab;
    if (op.kind == ApplyKind::affine && lp.stats.column_mode())
      column_tables(op, lp.rows, dtab, ftab);
    apply_plan(lp.stats, op, ex);
  }
  if (saved)
    store_row_stats(sh, lp, mean, rstd, *saved);
}

/// The row statistics of x, as a forward would save them.
template <class T>
void layer_norm_stats(const Shape& sh,
                      int D,
                      const T* x,
                      double eps,
                      SavedStats& out,
                      const Exec& ex,
                      bool rms = false) {
  const LayerPlans lp = layer_plans(sh, D);
  const auto rows = static_cast<std::size_t>(lp.rows);
  std::vector<double> mean(rows), var(rows), rstd(rows);
  moments(lp.stats, x, mean.data(), var.data(), ex);
  for (std::size_t s = 0; s < rows; ++s) {
    rstd[s] = rstd_of(rms ? var[s] + mean[s] * mean[s] : var[s], eps, false);
    if (rms)
      mean[s] = 0;
  }
  store_row_stats(sh, lp, mean, rstd, out);
}

// NB: LayerNorm backward in one pass over memory. dx needs per-row sums (a row is short
// and stays in L1), dweight/dbias need per-position sums over rows. Done as two passes
// (rows, then positions) they read x and dy twice: 5B of traffic against the 3B of reading
// x, dy and writing dx once. Here each row is summed, then -- while it is in L1 -- its dx is
// written and its contribution added to dweight/dbias sums of the row's block
// (kLnRowBlock elements of rows; the leaf ln_bwd_rows). Block partials are merged in block
// order, whatever the thread count, so results are bitwise identical for any thread count.
// Taken whenever the shape allows (rows contiguous, n <= kLnOnePassMaxN), never depending on
// the executor.
inline constexpr Index kLnRowBlock = Index{1} << 16;
inline constexpr Index kLnOnePassMaxN = Index{1} << 14;

/// Whether the one-pass backward applies: contiguous rows of n elements, row r at r * n.
inline bool layer_norm_one_pass_ok(const LayerPlans& lp) {
  if (lp.stats.column_mode() || lp.n > kLnOnePassMaxN || lp.n == 0)
    return false;
  const Nest ns = split(lp.stats);
  if (ns.R != 1 || ns.L != lp.n || ns.aux_step != 1)
    return false;
  return ns.ko.n == 0 ||
         (ns.ko.n == 1 && ns.ko.ax[0]->stride == lp.n && ns.ko.ax[0]->slot_stride == 1);
}

/// Backward for layouts the one-pass kernel does not take (rows longer than kLnOnePassMaxN,
/// rows not contiguous, no dx wanted): two sweeps over memory in double, one element at a
/// time, on the calling thread (a fixed order, so results do not depend on the executor).
template <class T>
void layer_norm_backward_generic(const LayerPlans& lp,
                                 const T* x,
                                 const T* dy,
                                 T* dx,
                                 const double* mean,
                                 const double* rstd,
                                 const double* gamma,
                                 double* dg,
                                 double* db,
                                 bool rms) {
  const Plan& p = lp.stats;
  const double m = static_cast<double>(lp.n);
  std::fill(dg, dg + lp.n, 0.0);
  std::fill(db, db + lp.n, 0.0);
  Odometer all;
  for (int i = 0; i < p.rank; ++i) all.add(p.axes[static_cast<std::size_t>(i)]);
  // Visits every element in memory order: f(offset, slot, aux).
  auto each = [&](auto&& f) {
    Odometer od = all;
    od.reset();
    for (Index e = 0; e < p.numel; ++e, od.next()) f(od.offset, od.slot, od.aux);
  };
  const auto rows = static_cast<std::size_t>(p.slots);
  std::vector<double> s1(rows, 0.0), s2(rows, 0.0);
  each([&](Index o, Index s, Index k) {
    const double g = static_cast<double>(dy[o]) * (gamma ? gamma[k] : 1.0);
    s1[static_cast<std::size_t>(s)] += g;
    s2[static_cast<std::size_t>(s)] += g * (static_cast<double>(x[o]) - mean[s]);
  });
  each([&](Index o, Index s, Index k) {
    const double r = rstd[s];
    const double xd = static_cast<double>(x[o]) - mean[s];
    const double g = static_cast<double>(dy[o]);
    dg[k] += g * xd * r;
    db[k] += g;
    if (dx) {
      const double B = -r * r * r * s2[static_cast<std::size_t>(s)] / m;
      const double C = rms ? 0.0 : -r * s1[static_cast<std::size_t>(s)] / m;
      dx[o] = static_cast<T>(r * (gamma ? gamma[k] : 1.0) * g + B * xd + C);
    }
  });
}

/// Gradients of layer_norm from its statistics: dx (when not null), and the per-position
/// dweight/dbias (when present).
template <class T, class P>
void layer_norm_backward(const Shape& sh,
                         int D,
                         const T* x,
                         const T* dy,
                         T* dx,
                         const SavedStats& saved,
                         const VectorRef<const P>& w,
                         const VectorRef<P>& gw,
                         const VectorRef<P>& gb,
                         const Exec& ex,
                         bool rms = false) {
  const LayerPlans lp = layer_plans(sh, D);
  const auto rows = static_cast<std::size_t>(lp.rows);
  const auto n = static_cast<std::size_t>(lp.n);
  std::vector<double> mean(rows), rstd(rows);
  {
    const std::vector<Index> map = slot_map(sh, lp.stats, 0, lp.lead);
    for (Index l = 0; l < lp.rows; ++l) {
      mean[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])] = saved.mean.data()[l];
      rstd[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])] = saved.rstd.data()[l];
    }
  }
  std::vector<double> gamma;
  if (w) {
    gamma.resize(n);
    for (std::size_t i = 0; i < n; ++i) gamma[i] = static_cast<double>(w.data()[i]);
  }
  std::vector<double> dg(n, 0.0), dbv(n, 0.0);
  if (dx && layer_norm_one_pass_ok(lp)) {
    using C = compute_t<T>;
    std::vector<C> ones, wbuf;
    if (!w)
      ones.assign(n, C(1));
    const LnBwdArgs<T> args{x,
                            dy,
                            dx,
                            mean.data(),
                            rstd.data(),
                            w ? gamma.data() : nullptr,
                            w ? as_compute<C>(w, wbuf) : ones.data(),
                            lp.n,
                            gw ? 1 : 0,
                            rms ? 1 : 0,
                            streams_output<T>(lp.stats.numel)};
    const LnLeaves<T>& L = ln_leaves<T>();
    const Index rpb = std::max(Index{1}, kLnRowBlock / lp.n);
    const Index blocks = (lp.rows + rpb - 1) / rpb;
    auto merge = [&](Index b, const double* pg, const double* pb) {
      for (std::size_t j = 0; j < n; ++j) {
        dg[j] = b == 0 ? pg[j] : dg[j] + pg[j];
        dbv[j] = b == 0 ? pb[j] : dbv[j] + pb[j];
      }
    };
    if (!ex.parallel(lp.stats.numel) || blocks == 1) {
      std::vector<double> buf(2 * n);
      for (Index b = 0; b < blocks; ++b) {
        std::fill(buf.begin(), buf.end(), 0.0);
        L.ln_bwd_rows(args, b * rpb, std::min(lp.rows, (b + 1) * rpb), buf.data(), buf.data() + n);
        merge(b, buf.data(), buf.data() + n);
      }
    } else {
      std::vector<double> part(static_cast<std::size_t>(blocks) * 2 * n, 0.0);
      run_items(ex, blocks, [&](Index b) {
        double* p = part.data() + b * 2 * lp.n;
        L.ln_bwd_rows(args, b * rpb, std::min(lp.rows, (b + 1) * rpb), p, p + lp.n);
      });
      for (Index b = 0; b < blocks; ++b)
        merge(b, part.data() + b * 2 * lp.n, part.data() + b * 2 * lp.n + lp.n);
    }
  } else {
    layer_norm_backward_generic(lp, x, dy, dx, mean.data(), rstd.data(), w ? gamma.data() : nullptr,
                                dg.data(), dbv.data(), rms);
  }
  store_grad(gw, dg.data());
  store_grad(gb, dbv.data());
}

/// x + r stored as T (computed in float for the low types, rounded once).
template <class T>
NORMKIT_ALWAYS_INLINE T add_round(T a, T b) {
  if constexpr (is_low_v<T>)
    return static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  else
    return a + b;
}

// NB: "add + norm" (the pre-norm residual of transformers): h = x + residual is the residual
// stream (written out), y = norm(h). Rows go in blocks of about kAddBlock elements: a block
// is added, then normalized while it is in cache, so x, residual, h and y each cross memory
// once (4B) instead of the unfused 5B (add: read 2, write 1; norm: read 1, write 1). Rows are
// independent, so a block's results are those of the whole tensor, bit for bit. Layouts whose
// rows are not contiguous (ColMajor) add everything first, then normalize.
inline constexpr Index kAddBlock = Index{1} << 15;

/// LayerNorm (or RMSNorm) of h = x + res, writing h too.
template <class T, class P>
void layer_norm_add_forward(const Shape& sh,
                            int D,
                            const T* x,
                            const T* res,
                            T* h,
                            T* y,
                            const VectorRef<const P>& w,
                            const VectorRef<const P>& b,
                            double eps,
                            SavedStats* saved,
                            T* copy,
                            const Exec& ex,
                            bool rms) {
  const LayerPlans lp = layer_plans(sh, D);
  auto add = [&](Index first, Index last) {
    for (Index i = first; i < last; ++i) h[i] = add_round(x[i], res[i]);
  };
  if (!layer_norm_one_pass_ok(lp)) {
    add(0, sh.numel());
    layer_norm_forward(sh, D, static_cast<const T*>(h), y, w, b, eps, saved, copy, ex, rms);
    return;
  }
  const Index n = lp.n, rows = lp.rows;
  const Index rpb = std::max(Index{1}, kAddBlock / n);
  const Index blocks = (rows + rpb - 1) / rpb;
  double *sm = nullptr, *sr = nullptr;
  if (saved)
    stats_storage(*saved, rows, sm, sr);
  const Exec serial;
  auto block = [&](Index bi) {
    const Index r0 = bi * rpb, r1 = std::min(rows, r0 + rpb);
    add(r0 * n, r1 * n);
    Shape sub;
    sub.rank = 2;
    sub.dim[0] = r1 - r0;
    sub.dim[1] = n;
    sub.stride[0] = n;
    sub.stride[1] = 1;
    SavedStats local;
    layer_norm_forward(sub, 1, static_cast<const T*>(h + r0 * n), y + r0 * n, w, b, eps,
                       saved ? &local : nullptr, copy ? copy + r0 * n : nullptr, serial, rms);
    if (saved) {
      std::copy(local.mean.data(), local.mean.data() + (r1 - r0), sm + r0);
      std::copy(local.rstd.data(), local.rstd.data() + (r1 - r0), sr + r0);
    }
  };
  if (ex.parallel(sh.numel()) && blocks > 1) {
    run_items(ex, blocks, block);
  } else {
    for (Index bi = 0; bi < blocks; ++bi) block(bi);
  }
  if (saved)
    saved->batch_stats = true;
}

NORMKIT_DECLARE_EXTERN(NORMKIT_LAYER_NORM_ENTRY_POINTS)

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_LAYER_NORM_IMPL_HPP_
