// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_LAYER_NORM_HPP_
#define NORMKIT_LAYER_NORM_HPP_

#include <algorithm>  // std::max, std::min, std::fill
#include <string>     // std::string
#include <vector>     // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/elementwise.hpp>
#include <normkit/detail/fused.hpp>
#include <normkit/detail/module.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/simd.hpp>
#include <normkit/detail/tensor.hpp>
#include <normkit/error.hpp>
#include <normkit/options.hpp>

namespace normkit {

/// Options of the functional layer_norm (torch.nn.functional.layer_norm). weight and bias
/// hold prod(normalized_shape) values in row-major (PyTorch) order of normalized_shape.
template <class Scalar>
class LayerNormFuncOptions {
 public:
  /// Normalizes over the trailing dims equal to normalized_shape; no weight or bias.
  /* implicit */ LayerNormFuncOptions(std::vector<Index> normalized_shape)  // NOLINT
      : normalized_shape_(std::move(normalized_shape)) {}
  /// Normalizes over the trailing dims equal to normalized_shape, e.g. {768}.
  /* implicit */ LayerNormFuncOptions(std::initializer_list<Index> normalized_shape)  // NOLINT
      : normalized_shape_(normalized_shape) {}
  /// Trailing input dims normalized over (no default); must be non-empty.
  NORMKIT_ARG(std::vector<Index>, normalized_shape);
  /// Elementwise scale of prod(normalized_shape) values, row-major over normalized_shape;
  /// not set = no scaling.
  NORMKIT_ARG(VectorRef<const Scalar>, weight);
  /// Elementwise shift of prod(normalized_shape) values, row-major over normalized_shape;
  /// not set = no shift.
  NORMKIT_ARG(VectorRef<const Scalar>, bias);
  /// Added to the variance inside the square root (default 1e-5).
  NORMKIT_ARG(double, eps) = 1e-5;
};

namespace detail {

inline std::string list_str(const std::vector<Index>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

inline Index product(const std::vector<Index>& v) {
  Index p = 1;
  for (Index d : v) p *= d;
  return p;
}

template <class T>
void layer_norm_check(const char* who,
                      const Shape& sh,
                      const std::vector<Index>& ns,
                      const VectorRef<const T>& w,
                      const VectorRef<const T>& b) {
  if (ns.empty()) {
    throw_value(who,
                "Expected normalized_shape to be at least 1-dimensional, i.e., containing "
                "at least one element, but got normalized_shape = []");
  }
  const int D = static_cast<int>(ns.size());
  bool ok = sh.rank >= D;
  for (int j = 0; ok && j < D; ++j) {
    const auto lead = static_cast<std::size_t>(sh.rank - D);
    ok = sh.dim[lead + static_cast<std::size_t>(j)] == ns[static_cast<std::size_t>(j)];
  }
  if (!ok) {
    std::string want = list_str(ns);
    throw_shape(who, "Given normalized_shape=" + want + ", expected input with shape [*, " +
                         want.substr(1) + ", but got input of size" + shape_str(sh));
  }
  const Index n = product(ns);
  auto check = [&](const VectorRef<const T>& v, const char* name) {
    if (v && v.size() != n) {
      throw_shape(who, std::string("Expected ") + name +
                           " to be of same shape as normalized_shape, but got " + name + " of " +
                           std::to_string(v.size()) +
                           " elements and normalized_shape = " + list_str(ns));
    }
  };
  check(w, "weight");
  check(b, "bias");
}

// LayerNorm's plans. stats: leading axes are keys (one slot per row), trailing axes reduced,
// their aux index = the row-major position inside normalized_shape (gamma/beta's index).
// params (for dgamma/dbeta): trailing axes are keys, leading axes reduced, their aux index =
// the row's stats slot (to read its mean/rstd).
struct LayerPlans {
  Plan stats, params;
  int lead = 0;
  Index rows = 1, n = 1;
};

inline LayerPlans layer_plans(const Shape& sh, int D, bool with_params) {
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
  if (with_params) {
    for (int i = 0; i < sh.rank; ++i) {
      const auto u = static_cast<std::size_t>(i);
      const bool lead = i < lp.lead;
      ax[u] = AxisSpec{sh.dim[u], sh.stride[u], lead ? Role::reduce : Role::key,
                       lead ? lp.stats.logical_slot_stride[u] : 0};
    }
    lp.params = make_plan(ax.data(), sh.rank);
  }
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

template <class T, class Device>
void layer_norm_forward(const Shape& sh,
                        int D,
                        const T* x,
                        T* y,
                        const VectorRef<const T>& w,
                        const VectorRef<const T>& b,
                        double eps,
                        SavedStats* saved,
                        const Device& dev) {
  const LayerPlans lp = layer_plans(sh, D, false);
  const auto rows = static_cast<std::size_t>(lp.rows);
  std::vector<acc_t> mean(rows), rstd(rows), center(rows);
  auto finish = [&](Index s, acc_t m, acc_t v) {
    mean[static_cast<std::size_t>(s)] = m;
    rstd[static_cast<std::size_t>(s)] = rstd_of(v, eps, false);
  };
  auto go = [&](const auto& op) {
    if (!fused_forward(lp.stats, lp.stats, x, center.data(), finish, op, dev)) {
      moments(lp.stats, x, mean.data(), rstd.data(), center.data(), dev);
      for (std::size_t s = 0; s < rows; ++s) finish(static_cast<Index>(s), mean[s], rstd[s]);
      for_each_run(lp.stats, op, dev);
    }
  };
  if (w || b) {
    // The caller's weight/bias are read in place; a missing one is replaced by ones/zeros.
    std::vector<T> fill;
    if (!w || !b)
      fill.assign(static_cast<std::size_t>(lp.n), w ? T(0) : T(1));
    go(AuxAffineOp<T>{x, y, mean.data(), rstd.data(), w ? w.data() : fill.data(),
                      b ? b.data() : fill.data()});
  } else {
    std::vector<acc_t> zero(rows, 0.0);
    go(AffineOp<T>{x, y, mean.data(), rstd.data(), zero.data()});
  }
  if (saved) {
    const std::vector<Index> map = slot_map(sh, lp.stats, 0, lp.lead);
    saved->mean.resize(lp.rows);  // no allocation when the size is unchanged
    saved->rstd.resize(lp.rows);
    for (Index l = 0; l < lp.rows; ++l) {
      saved->mean(l) = mean[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])];
      saved->rstd(l) = rstd[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])];
    }
    saved->batch_stats = true;
  }
}

// NB: LayerNorm backward in one pass over memory. dx needs per-row sums (a row is short
// and stays in L1), dweight/dbias need per-position sums over rows. Done as two passes
// (rows, then positions) they read x and dy twice: 5B of traffic against the 3B of reading
// x, dy and writing dx once. Here each row is summed, then -- while it is in L1 -- its dx is
// written and its contribution added to dweight/dbias accumulators of the row's block
// (kLnRowBlock elements of rows). Block partials are merged in block order, whatever the
// thread count (one thread merges as it goes, several keep each block's partial and merge
// after), so results are bitwise identical for any thread count. Taken whenever the shape
// allows (rows contiguous, n <= kLnOnePassMaxN), never depending on the device: the
// grouping of the sums differs from the two-pass fallback (last bits of dweight).
inline constexpr Index kLnRowBlock = Index{1} << 16;
inline constexpr Index kLnOnePassMaxN = Index{1} << 14;
inline constexpr Index kLnFloatRows = 4;

/// Whether layer_norm_backward_one_pass applies to this LayerNorm stats plan.
inline bool layer_norm_one_pass_ok(const LayerPlans& lp) {
  if (lp.stats.column_mode() || lp.n > kLnOnePassMaxN)
    return false;
  const reduction_impl::Nest ns = reduction_impl::split(lp.stats);
  return ns.R == 1 && ns.L == lp.n && ns.aux_step == 1;
}

template <class T, bool kWeighted>
struct LnBackwardRow {
  const T* x;
  const T* dy;
  T* dx;
  const acc_t* gamma;  // per position (kWeighted)
  const T* gamma_t;    // the same, in T (kWeighted); ones when not weighted (float)
  Index n;
  bool want_dg;

  /// Double path: dg += (g * (x - m)) * r; db += g, as RowStatGradOp; dx = (r * w) * g +
  /// B * (x - m) + C, as GradInputOp.
  NORMKIT_ALWAYS_INLINE void run(
      Index off, acc_t m, acc_t r, acc_t B, acc_t C, acc_t* pg, acc_t* pb) const {
    // Locals: the stores to pg/pb would otherwise make the compiler reload members.
    const T* const xp = x + off;
    const T* const gp = dy + off;
    T* const op = dx + off;
    const acc_t* const w = gamma;
    const Index len = n;
    const bool dg_too = want_dg;
    simd::d8 mv, rv, Bv, Cv;
    simd::splat(mv, m);
    simd::splat(rv, r);
    simd::splat(Bv, B);
    simd::splat(Cv, C);
    Index j = 0;
    for (; j + 8 <= len; j += 8) {
      simd::d8 xd, g, acc;
      simd::load(xd, xp + j);
      xd -= mv;
      simd::load(g, gp + j);
      if (dg_too) {
        simd::load(acc, pg + j);
        acc += g * xd * rv;
        simd::store(pg + j, acc);
      }
      simd::load(acc, pb + j);
      acc += g;
      simd::store(pb + j, acc);
      simd::d8 a = rv;
      if constexpr (kWeighted) {
        simd::d8 wv;
        simd::load(wv, w + j);
        a = a * wv;
      }
      const simd::d8 out = a * g + Bv * xd + Cv;
      simd::store(op + j, out);
    }
    for (; j < len; ++j) {
      const acc_t xd = static_cast<acc_t>(xp[j]) - m;
      const acc_t g = static_cast<acc_t>(gp[j]);
      if (dg_too)
        pg[j] += g * xd * r;
      pb[j] += g;
      const acc_t a = kWeighted ? r * w[j] : r;
      op[j] = static_cast<T>(a * g + B * xd + C);
    }
  }

  /// Float path (float input, coefficients fit_float): one sweep writes dx = (r * w) * g +
  /// B * xc + C with xc = x - mean through the split mean, and adds g * (xc * r) and g to
  /// float accumulators fg, fb (flushed to double every kLnFloatRows rows by the caller).
  struct FloatCoefs {
    float hi, lo, r, b, c;
    FloatCoefs(acc_t m, acc_t r_, acc_t B, acc_t C)
        : hi(SplitMean<float>(m).hi),
          lo(SplitMean<float>(m).lo),
          r(static_cast<float>(r_)),
          b(static_cast<float>(B)),
          c(static_cast<float>(C)) {}
  };
  static NORMKIT_ALWAYS_INLINE auto float_body(const FloatCoefs& k) {
    return [k](auto& o, auto& ag, auto& ab, const auto& xv, const auto& g, const auto& wv) {
      const auto xc = (xv - k.hi) - k.lo;
      o = (k.r * wv) * g + k.b * xc + k.c;
      ag += g * (xc * k.r);
      ab += g;
    };
  }
  NORMKIT_ALWAYS_INLINE void run_float(Index off, const FloatCoefs& k, float* fg, float* fb) const {
    simd::map_acc(n, dx + off, fg, fb, float_body(k), x + off, dy + off, gamma_t);
  }

  /// run_float on this row interleaved with the next row's backward sums (`sums`' row at
  /// noff, slot nslot, into st: the same operations as sums.row): the next row streams in
  /// from memory while this one is computed from L1.
  template <class Sums>
  NORMKIT_ALWAYS_INLINE void run_float_pipelined(Index off,
                                                 const FloatCoefs& k,
                                                 float* fg,
                                                 float* fb,
                                                 const Sums& sums,
                                                 Index noff,
                                                 Index nslot,
                                                 typename Sums::RowState& st) const {
#if defined(__GNUC__) || defined(__clang__)
    const Index len = n, n16 = n - n % 16;
    const float* const xp = x + off;
    const float* const gp = dy + off;
    float* const op = dx + off;
    const float* const wt = gamma_t;
    const float* const nxp = x + noff;
    const float* const ngp = dy + noff;
    simd::d8 ncv, nwv;
    simd::splat(ncv, sums.center[nslot]);
    simd::splat(nwv, acc_t{1});
    auto body = float_body(k);
    for (Index j = 0; j < n16; j += 16) {
      sums.template step8<1>(nxp, ngp, ncv, nwv, 0, j, st.a1, st.a2);
      sums.template step8<1>(nxp, ngp, ncv, nwv, 0, j + 8, st.b1, st.b2);
      simd::acc16(j, op, fg, fb, body, xp, gp, wt);
    }
    sums.template row<1>(noff + n16, len - n16, nslot, n16, 1, st);
    for (Index j = n16; j < len; ++j) body(op[j], fg[j], fb[j], xp[j], gp[j], wt[j]);
#else
    run_float(off, k, fg, fb);
    sums.template row<1>(noff, n, nslot, 0, 1, st);
#endif
  }
};

/// dx and the per-position sums dg[p] = sum dy * xhat, db[p] = sum dy in one pass (see NB).
template <class T, bool kWeighted, class Device>
void layer_norm_backward_one_pass(const LayerPlans& lp,
                                  const T* x,
                                  const T* dy,
                                  T* dx,
                                  const acc_t* mean,
                                  const acc_t* rstd,
                                  const acc_t* gamma,
                                  const T* gamma_t,
                                  bool want_dg,
                                  acc_t* dg,
                                  acc_t* db,
                                  const Device& dev) {
  const reduction_impl::Nest ns = reduction_impl::split(lp.stats);
  const Index n = lp.n, rows = lp.rows;
  const Index rpb = std::max(Index{1}, kLnRowBlock / n);
  const Index blocks = (rows + rpb - 1) / rpb;
  const acc_t m = static_cast<acc_t>(n);
  const GradSumsOp<T, kWeighted> sums{x, dy, mean, gamma};
  const auto un = static_cast<std::size_t>(n);
  // NB: for float input the per-position sums of a block run in float over kLnFloatRows
  // rows at a time and are then added to the block's double accumulators: 4 float terms
  // add at most ~2 float ulps of their magnitude, and the double work per element drops
  // 4x (it bounded this loop). dx is computed as the float forward apply is (SplitMean).
  std::vector<T> ones;
  const T* w_t = gamma_t;
  if (std::is_same<T, float>::value && !w_t) {
    ones.assign(un, T(1));
    w_t = ones.data();
  }
  const LnBackwardRow<T, kWeighted> row{x, dy, dx, gamma, w_t, n, want_dg};
  using RowState = typename GradSumsOp<T, kWeighted>::RowState;
  // Block b's rows, accumulated into fresh pg, pb.
  auto block = [&](Index b, acc_t* pg, acc_t* pb) {
    std::fill(pg, pg + n, acc_t{0});
    std::fill(pb, pb + n, acc_t{0});
    constexpr bool kFloat = std::is_same<T, float>::value;
    SmallBuffer<float, 1> fbuf(kFloat ? 2 * n + 64 : 0);
    float* fg = fbuf.data();
    float* fb = fg + n + 64;  // (offset: fg and fb do not alias in the 4 KiB sense)
    Index pending = 0;        // rows in the float accumulators
    auto clear = [&] {
      std::fill(fg, fg + n, 0.0f);
      std::fill(fb, fb + n, 0.0f);
      pending = 0;
    };
    auto flush = [&] {
      Index j = 0;
      for (; j + 8 <= n; j += 8) {
        simd::d8 a, p;
        simd::load(a, fg + j);
        simd::load(p, pg + j);
        p += a;
        simd::store(pg + j, p);
        simd::load(a, fb + j);
        simd::load(p, pb + j);
        p += a;
        simd::store(pb + j, p);
      }
      for (; j < n; ++j) {
        pg[j] += static_cast<acc_t>(fg[j]);
        pb[j] += static_cast<acc_t>(fb[j]);
      }
      clear();
    };
    if (kFloat)
      clear();
    const Index r0 = b * rpb, r1 = std::min(rows, r0 + rpb);
    Odometer ko = ns.ko;
    ko.seek(r0);
    RowState cur{};
    sums.template row<1>(ko.offset, n, ko.slot, 0, 1, cur);
    for (Index t = r0; t < r1; ++t) {
      const Index s = ko.slot, off = ko.offset;
      acc_t s1, s2;
      sums.finish(cur, s1, s2);
      const acc_t mu = mean[s], r = rstd[s], B = -r * r * r * s2 / m, C = -r * s1 / m;
      const bool more = t + 1 < r1;
      Odometer nx = ko;
      nx.next();
      RowState nxt{};
      bool next_done = false;
      bool float_done = false;
      if constexpr (kFloat) {
        if (fits_float(mu) && fits_float(r) && fits_float(B) && fits_float(C)) {
          const typename LnBackwardRow<T, kWeighted>::FloatCoefs k(mu, r, B, C);
          if (more) {
            row.run_float_pipelined(off, k, fg, fb, sums, nx.offset, nx.slot, nxt);
            next_done = true;
          } else {
            row.run_float(off, k, fg, fb);
          }
          if (++pending == kLnFloatRows)
            flush();
          float_done = true;
        }
      }
      if (!float_done)
        row.run(off, mu, r, B, C, pg, pb);
      if (more && !next_done)
        sums.template row<1>(nx.offset, n, nx.slot, 0, 1, nxt);
      cur = nxt;
      ko = nx;
    }
    if (pending)
      flush();
  };
  auto merge = [&](Index b, const acc_t* pg, const acc_t* pb) {
    for (Index j = 0; j < n; ++j) {
      dg[j] = b == 0 ? pg[j] : dg[j] + pg[j];
      db[j] = b == 0 ? pb[j] : db[j] + pb[j];
    }
  };
  const int threads = device_threads(dev);
  const bool parallel = threads > 1 && blocks > 1 && lp.stats.numel >= kMinParallelElements;
  if (!parallel) {
    std::vector<acc_t> buf(2 * un);
    for (Index b = 0; b < blocks; ++b) {
      block(b, buf.data(), buf.data() + n);
      merge(b, buf.data(), buf.data() + n);
    }
    return;
  }
  std::vector<acc_t> part(static_cast<std::size_t>(blocks) * 2 * un);
  parallel_for(dev, blocks, double(rpb * n) * 3.0 * sizeof(T), true, [&](Index first, Index last) {
    for (Index b = first; b < last; ++b) {
      acc_t* p = part.data() + b * 2 * n;
      block(b, p, p + n);
    }
  });
  for (Index b = 0; b < blocks; ++b) merge(b, part.data() + b * 2 * n, part.data() + b * 2 * n + n);
}

template <class T, class Device>
void layer_norm_backward(const Shape& sh,
                         int D,
                         const T* x,
                         const T* dy,
                         T* dx,
                         const SavedStats& saved,
                         const VectorRef<const T>& w,
                         const VectorRef<T>& gw,
                         const VectorRef<T>& gb,
                         const Device& dev) {
  const bool params = gw || gb;
  const LayerPlans lp = layer_plans(sh, D, params);
  const auto rows = static_cast<std::size_t>(lp.rows);
  std::vector<acc_t> mean(rows), rstd(rows), s1(rows), s2(rows), B(rows), C(rows);
  {
    const std::vector<Index> map = slot_map(sh, lp.stats, 0, lp.lead);
    for (Index l = 0; l < lp.rows; ++l) {
      mean[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])] = saved.mean(l);
      rstd[static_cast<std::size_t>(map[static_cast<std::size_t>(l)])] = saved.rstd(l);
    }
  }
  std::vector<acc_t> gamma;
  if (w) {
    gamma.resize(static_cast<std::size_t>(lp.n));
    for (Index i = 0; i < lp.n; ++i)
      gamma[static_cast<std::size_t>(i)] = static_cast<acc_t>(w.data()[i]);
  }
  if (dx && params && layer_norm_one_pass_ok(lp)) {
    const auto n = static_cast<std::size_t>(lp.n);
    std::vector<acc_t> dg(n), dbv(n);
    if (w) {
      layer_norm_backward_one_pass<T, true>(lp, x, dy, dx, mean.data(), rstd.data(), gamma.data(),
                                            w.data(), bool(gw), dg.data(), dbv.data(), dev);
    } else {
      layer_norm_backward_one_pass<T, false>(lp, x, dy, dx, mean.data(), rstd.data(), nullptr,
                                             nullptr, bool(gw), dg.data(), dbv.data(), dev);
    }
    store_grad(gw, dg.data());
    store_grad(gb, dbv.data());
    return;
  }
  if (dx) {
    const acc_t m = static_cast<acc_t>(lp.n);
    auto finish = [&](Index si, acc_t sum_g, acc_t sum_gx) {
      const auto s = static_cast<std::size_t>(si);
      const acc_t r = rstd[s];
      B[s] = -r * r * r * sum_gx / m;
      C[s] = -r * sum_g / m;
    };
    // dx = rstd * w * dy + B * (x - mean) + C per row, fused with the row sums when the row
    // fits in cache.
    auto go = [&](const auto& rop, const auto& aop) {
      if (can_fuse<T>(lp.stats, lp.stats, dev)) {
        fused_slots<T>(lp.stats, lp.stats, rop, finish, aop, dev);
      } else {
        reduce(lp.stats, rop, s1.data(), s2.data(), dev);
        for (std::size_t s = 0; s < rows; ++s) finish(static_cast<Index>(s), s1[s], s2[s]);
        for_each_run(lp.stats, aop, dev);
      }
    };
    if (w) {
      go(GradSumsOp<T, true>{x, dy, mean.data(), gamma.data()},
         GradInputOp<T, true>{x, dy, dx, mean.data(), rstd.data(), B.data(), C.data(),
                              gamma.data()});
    } else {
      go(GradSumsOp<T, false>{x, dy, mean.data(), nullptr},
         GradInputOp<T, false>{x, dy, dx, mean.data(), rstd.data(), B.data(), C.data(), nullptr});
    }
  }
  if (params) {
    const auto n = static_cast<std::size_t>(lp.n);
    std::vector<acc_t> dg(n), dbv(n);
    reduce(lp.params, RowStatGradOp<T>{x, dy, mean.data(), rstd.data()}, dg.data(), dbv.data(),
           dev);
    const std::vector<Index> map = slot_map(sh, lp.params, lp.lead, sh.rank);
    for (std::size_t p = 0; p < n; ++p) {
      const auto s = static_cast<std::size_t>(map[p]);
      if (gw)
        gw.data()[p] = static_cast<T>(dg[s]);
      if (gb)
        gb.data()[p] = static_cast<T>(dbv[s]);
    }
  }
}

}  // namespace detail

/// Layer normalization (Ba et al. 2016), as F.layer_norm: statistics of each row over the
/// trailing dims equal to normalized_shape; y = (x - mean) / sqrt(var + eps) * weight + bias
/// with elementwise weight/bias (biased variance). Any rank >= len(normalized_shape); dims
/// are the tensor's own (RowMajor or ColMajor alike).
/// @throws value_error for an empty normalized_shape; shape_error when the trailing dims
///         differ from normalized_shape or weight/bias have the wrong size.
template <class X, class Y, class Device = Eigen::DefaultDevice>
void layer_norm(const X& x,
                Y& y,
                const LayerNormFuncOptions<detail::scalar_of<X>>& options,
                SavedStats* saved = nullptr,
                const Device& device = Device()) {
  const detail::Shape sh = detail::logical_shape(x, false, "layer_norm");
  detail::layer_norm_check("layer_norm", sh, options.normalized_shape(), options.weight(),
                           options.bias());
  auto* y_ptr = detail::prepare_output(x, y, "layer_norm");
  if (sh.numel() == 0)
    return;
  detail::layer_norm_forward(sh, static_cast<int>(options.normalized_shape().size()), x.data(),
                             y_ptr, options.weight(), options.bias(), options.eps(), saved, device);
}

/// Allocating form of layer_norm.
template <class X>
auto layer_norm(const X& x, const LayerNormFuncOptions<detail::scalar_of<X>>& options) {
  Eigen::Tensor<detail::scalar_of<X>, detail::tensor_traits<X>::rank,
                detail::tensor_traits<X>::layout>
      y;
  layer_norm(x, y, options);
  return y;
}

/// Gradients of layer_norm from its saved statistics: dx = r * (g - mean(g) - xhat *
/// mean(g * xhat)) with g = dy * weight; dweight = sum over rows of dy * xhat, dbias = sum dy.
template <class X, class DY, class DX, class Device = Eigen::DefaultDevice>
void layer_norm_backward(const X& x,
                         const DY& dy,
                         DX& dx,
                         const SavedStats& saved,
                         const std::vector<Index>& normalized_shape,
                         VectorRef<const detail::scalar_of<X>> weight,
                         VectorRef<detail::scalar_of<X>> grad_weight,
                         VectorRef<detail::scalar_of<X>> grad_bias,
                         const Device& device = Device()) {
  using T = detail::scalar_of<X>;
  const char* who = "layer_norm_backward";
  const detail::Shape sh = detail::logical_shape(x, false, who);
  detail::layer_norm_check(who, sh, normalized_shape, weight, VectorRef<const T>());
  constexpr int R = detail::tensor_traits<X>::rank;
  for (int i = 0; i < R; ++i) {
    if (detail::dim(x, i) != detail::dim(dy, i)) {
      detail::throw_shape(who, "expected grad_output of size " +
                                   detail::dims_str(x.dimensions(), R) + " but got " +
                                   detail::dims_str(dy.dimensions(), R));
    }
  }
  const Index n = detail::product(normalized_shape);
  const Index rows = n == 0 ? 0 : sh.numel() / n;
  if (n != 0 && (saved.mean.size() != rows || saved.rstd.size() != rows)) {
    detail::throw_shape(who, "expected saved statistics of " + std::to_string(rows) +
                                 " rows but got " + std::to_string(saved.mean.size()));
  }
  detail::check_size(who, "grad_weight", grad_weight, n);
  detail::check_size(who, "grad_bias", grad_bias, n);
  auto* dx_ptr = detail::prepare_output(x, dx, who, "grad_input");
  if (sh.numel() == 0) {
    for (Index i = 0; grad_weight && i < grad_weight.size(); ++i) grad_weight.data()[i] = 0;
    for (Index i = 0; grad_bias && i < grad_bias.size(); ++i) grad_bias.data()[i] = 0;
    return;
  }
  detail::layer_norm_backward(sh, static_cast<int>(normalized_shape.size()), x.data(), dy.data(),
                              dx_ptr, saved, weight, grad_weight, grad_bias, device);
}

/// LayerNorm over the trailing dims equal to normalized_shape, as torch.nn.LayerNorm.
/// weight (1) and bias (0) hold prod(normalized_shape) values, row-major over
/// normalized_shape (PyTorch's flattening), when elementwise_affine (bias also needs
/// bias(true), the default). Same in training and evaluation.
/// @code
/// normkit::LayerNorm<float> ln(normkit::LayerNormOptions({768}));
/// auto y = ln.forward(x);  // x: (..., 768)
/// @endcode
template <class Scalar>
class LayerNorm : public detail::ModuleBase<Scalar> {
 public:
  /// 1-D tensor type of the parameters.
  using Vector = Eigen::Tensor<Scalar, 1>;
  /// Class name as in PyTorch (e.g. "LayerNorm"), used in error messages.
  static constexpr const char* kName = "LayerNorm";

  /// @throws value_error for an empty normalized_shape, negative extents or eps.
  explicit LayerNorm(const LayerNormOptions& options) : options_(options) {
    detail::validate(kName, options_);
    reset_parameters();
  }

  /// The options the module was constructed with.
  const LayerNormOptions& options() const { return options_; }

  template <class X, class Device = Eigen::DefaultDevice, detail::not_tensor<Device> = 0>
  /// Normalizes each row of x over the trailing normalized_shape dims; same in training and
  /// evaluation. Returns y; throws as the non-allocating forward.
  auto forward(const X& x, const Device& device = Device()) {
    Eigen::Tensor<Scalar, detail::tensor_traits<X>::rank, detail::tensor_traits<X>::layout> y;
    forward(x, y, device);
    return y;
  }

  /// @throws shape_error when the trailing dims differ from normalized_shape.
  template <class X, class Y, class Device = Eigen::DefaultDevice, detail::if_tensor<Y> = 0>
  void forward(const X& x, Y&& y, const Device& device = Device()) {
    static_assert(std::is_same<detail::scalar_of<X>, Scalar>::value,
                  "LayerNorm: input scalar type differs from the module's");
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::layer_norm_check(kName, sh, options_.normalized_shape(), wref(), bref());
    auto* y_ptr = detail::prepare_output(x, y, kName);
    SavedStats saved;
    if (sh.numel() != 0) {
      detail::layer_norm_forward(sh, static_cast<int>(options_.normalized_shape().size()), x.data(),
                                 y_ptr, wref(), bref(), options_.eps(),
                                 this->requires_grad_ ? &saved : nullptr, device);
    }
    // Inference (requires_grad() false) writes nothing to the module: concurrent eval
    // forwards are then pure reads (ThreadSanitizer-checked in threading_test).
    if (this->requires_grad_) {
      this->saved_ = std::move(saved);
      this->remember_input(x);
    }
  }

  template <class DY, class Device = Eigen::DefaultDevice, detail::not_tensor<Device> = 0>
  /// Gradients for the last forward, using its saved statistics and input copy.
  /// @throws value_error before any forward or when the input was not kept; shape_error when dy's
  ///         dims or storage order differ from the last input's.
  auto backward(const DY& dy, const Device& device = Device()) {
    auto x = this->saved_input(dy, kName);
    return backward(x, dy, device);
  }

  template <class X, class DY, class Device = Eigen::DefaultDevice, detail::if_tensor<DY> = 0>
  /// Gradients for the last forward with its input x given again (no copy needed).
  /// @throws value_error without a preceding forward with requires_grad() true; shape_error when
  ///         x's or dy's dims or storage order differ from the last input's.
  auto backward(const X& x, const DY& dy, const Device& device = Device()) {
    this->check_same(x, kName);
    this->check_same(dy, kName);
    Gradients<Scalar, detail::tensor_traits<DY>::rank, detail::tensor_traits<DY>::layout> g;
    const Index n = detail::product(options_.normalized_shape());
    if (options_.elementwise_affine()) {
      g.weight.resize(n);
      g.weight.setZero();
      if (options_.bias()) {
        g.bias.resize(n);
        g.bias.setZero();
      }
    }
    const detail::Shape sh = detail::logical_shape(x, false, kName);
    detail::prepare_output(x, g.input, kName);
    if (sh.numel() != 0) {
      detail::layer_norm_backward(
          sh, static_cast<int>(options_.normalized_shape().size()), x.data(), dy.data(),
          g.input.data(), this->saved_, wref(),
          g.weight.size() ? VectorRef<Scalar>(g.weight) : VectorRef<Scalar>(),
          g.bias.size() ? VectorRef<Scalar>(g.bias) : VectorRef<Scalar>(), device);
    }
    return g;
  }

  /// Elementwise scale (init 1), flat prod(normalized_shape) values, row-major over
  /// normalized_shape; empty without elementwise_affine.
  const Vector& weight() const { return weight_; }
  /// Elementwise shift (init 0), flat like weight(); empty without elementwise_affine or with
  /// bias(false).
  const Vector& bias() const { return bias_; }
  /// Sets weight.
  /// @throws shape_error unless v has prod(normalized_shape) elements (0 without
  ///         elementwise_affine).
  void set_weight(const Vector& v) {
    set_checked(weight_, v, "weight", options_.elementwise_affine());
  }
  /// Sets bias.
  /// @throws shape_error unless v has prod(normalized_shape) elements (0 without the bias).
  void set_bias(const Vector& v) {
    set_checked(bias_, v, "bias", options_.elementwise_affine() && options_.bias());
  }
  /// weight = 1, bias = 0 (when present).
  void reset_parameters() {
    const Index n = detail::product(options_.normalized_shape());
    if (options_.elementwise_affine()) {
      weight_ = detail::filled<Scalar>(n, Scalar(1));
      if (options_.bias())
        bias_ = detail::filled<Scalar>(n, Scalar(0));
    }
  }

 private:
  VectorRef<const Scalar> wref() const {
    return options_.elementwise_affine() ? VectorRef<const Scalar>(weight_)
                                         : VectorRef<const Scalar>();
  }
  VectorRef<const Scalar> bref() const {
    return options_.elementwise_affine() && options_.bias() ? VectorRef<const Scalar>(bias_)
                                                            : VectorRef<const Scalar>();
  }
  void set_checked(Vector& dst, const Vector& v, const char* name, bool exists) {
    const Index want = exists ? detail::product(options_.normalized_shape()) : 0;
    if (v.size() != want) {
      detail::throw_shape(kName, std::string("expected ") + name + " of " + std::to_string(want) +
                                     " elements but got " + std::to_string(v.size()));
    }
    dst = v;
  }

  LayerNormOptions options_;
  Vector weight_, bias_;
};

}  // namespace normkit

#endif  // NORMKIT_LAYER_NORM_HPP_
