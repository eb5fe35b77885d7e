// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_ELEMENTWISE_HPP_
#define NORMKIT_DETAIL_ELEMENTWISE_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::min
#include <cmath>        // std::abs
#include <type_traits>  // std::integral_constant
#include <vector>       // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/parallel.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>
#include <normkit/detail/simd.hpp>

namespace normkit {
namespace detail {

// The apply step: one pass over memory that maps every element with its slot's
// coefficients (and, for LayerNorm, its position's gamma/beta). Forward normalize + affine
// and backward dx are both this one loop with a different op.
//
// An op provides
//   template <bool kColumn, int AuxMode> void run(offset, len, slot, aux, aux_step) const;
// covering elements [offset, offset + len) whose slot is `slot` (row mode) or slot + j
// (column mode) and whose aux index is aux + j * aux_step.

template <class Op, class Device>
void for_each_run(const Plan& p, const Op& op, const Device& dev) {
  if (p.numel == 0)
    return;
  Odometer outer;
  for (int i = 0; i + 1 < p.rank; ++i) outer.add(p.axes[static_cast<std::size_t>(i)]);
  const Index L = p.inner().extent;
  const Index aux_step = p.inner().aux_stride;
  const bool column = p.column_mode();
  const Index chunks = (p.numel + kBlockElements - 1) / kBlockElements;
  auto body = [&](auto column_tag, auto aux_tag) {
    constexpr bool kColumn = decltype(column_tag)::value;
    constexpr int kAux = decltype(aux_tag)::value;
    parallel_for(dev, chunks, double(kBlockElements) * 8.0, p.numel >= kMinParallelElements,
                 [&](Index first, Index last) {
                   Odometer od = outer;
                   Index start = first * kBlockElements;
                   const Index end = std::min(p.numel, last * kBlockElements);
                   od.seek(start / L);
                   Index i0 = start % L;
                   while (start < end) {
                     const Index len = std::min(L - i0, end - start);
                     op.template run<kColumn, kAux>(od.offset + i0, len,
                                                    od.slot + (kColumn ? i0 : 0),
                                                    od.aux + i0 * aux_step, aux_step);
                     start += len;
                     i0 = 0;
                     od.next();
                   }
                 });
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  using A0 = std::integral_constant<int, 0>;
  using A1 = std::integral_constant<int, 1>;
  using A2 = std::integral_constant<int, 2>;
  if (column) {
    if (aux_step == 0) {
      body(T_{}, A0{});
    } else if (aux_step == 1) {
      body(T_{}, A1{});
    } else {
      body(T_{}, A2{});
    }
  } else {
    if (aux_step == 0) {
      body(F_{}, A0{});
    } else if (aux_step == 1) {
      body(F_{}, A1{});
    } else {
      body(F_{}, A2{});
    }
  }
}

/// A double mean as float hi + lo, for a float-speed, double-accurate x - mean.
///
/// NB: for float input the row-mode apply runs in float (8 or 16 lanes, no conversions: the
/// conversions bound the double version). (x - hi) is exact whenever x is within a factor 2
/// of the mean (Sterbenz) -- the large-offset case where float arithmetic usually loses
/// everything -- and otherwise |x - mean| >= |mean|/2 keeps its rounding relative; then
/// subtracting lo restores the double mean's digits. The result is within ~2 ulp of the
/// double computation, and exact for constant slices (x == mean gives 0, y == beta).
/// Whether a coefficient can take the float path: finite with ample headroom, so that no
/// product overflows and a denormal (x - mean) contributes below 2^-49 (found by the fuzzer:
/// denormal inputs with eps = 0 give rstd ~ 5e44, beyond float). NaN fails (double path).
NORMKIT_ALWAYS_INLINE bool fits_float(acc_t v) {
  return std::abs(v) <= 0x1p100;
}

template <class T>
struct SplitMean {
  T hi, lo;
  explicit SplitMean(acc_t m)
      : hi(static_cast<T>(m)), lo(static_cast<T>(m - static_cast<acc_t>(hi))) {}
};

/// y = (x - mean[s]) * scale[s] + shift[s]: normalize and affine folded per slot.
///
/// NB: the centred form (x - mean) * scale + shift, in double, rather than ATen's
/// x * scale + (shift - mean * scale): it costs one subtraction per element (free in a
/// memory-bound loop) and returns exactly beta for constant slices and one-element
/// LayerNorm rows, where the folded form leaves rounding residue (SEMANTICS.md §10, #108072).
template <class T>
struct AffineOp {
  const T* x;
  T* y;
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  // Optional float tables for column mode ([hi | lo | scale | shift], `slots` each): see
  // with_column_tables().
  const T* tables = nullptr;
  Index slots = 0;

  template <bool kColumn, int AuxMode>
  NORMKIT_ALWAYS_INLINE void run(Index off, Index len, Index slot, Index, Index) const {
    const T* xp = x + off;
    T* yp = y + off;
    if constexpr (kColumn && std::is_same<T, float>::value) {
      if (tables) {
        const T* hi = tables + slot;
        const T* lo = hi + slots;
        const T* a = lo + slots;
        const T* b = a + slots;
        simd::map(
            len, yp,
            [](auto& o, const auto& v, const auto& h, const auto& l, const auto& av,
               const auto& bv) { o = ((v - h) - l) * av + bv; },
            xp, hi, lo, a, b);
        return;
      }
    }
    if constexpr (kColumn) {
      const acc_t* m = mean + slot;
      const acc_t* a = scale + slot;
      const acc_t* b = shift + slot;
      for (Index j = 0; j < len; ++j) {
        yp[j] = static_cast<T>((static_cast<acc_t>(xp[j]) - m[j]) * a[j] + b[j]);
      }
    } else {
      if constexpr (std::is_same<T, float>::value) {
        if (fits_float(mean[slot]) && fits_float(scale[slot]) && fits_float(shift[slot])) {
          const SplitMean<T> m(mean[slot]);
          const T hi = m.hi, lo = m.lo;
          const T a = static_cast<T>(scale[slot]), b = static_cast<T>(shift[slot]);
          simd::map(
              len, yp, [&](auto& o, const auto& v) { o = ((v - hi) - lo) * a + b; }, xp);
          return;
        }
      }
      const acc_t m = mean[slot], a = scale[slot], b = shift[slot];
      for (Index j = 0; j < len; ++j) {
        yp[j] = static_cast<T>((static_cast<acc_t>(xp[j]) - m) * a + b);
      }
    }
  }
};

/// Runs an AffineOp over a plan; for float column-mode plans it first converts the per-slot
/// coefficients to float tables (split mean, as SplitMean), so the loop needs no conversions.
template <class T, class Device>
void apply_affine(const Plan& p, AffineOp<T> op, const Device& dev) {
  std::vector<T> tables;
  if constexpr (std::is_same<T, float>::value) {
    bool fit = p.column_mode() && p.numel >= 4 * p.slots;
    for (Index s = 0; fit && s < p.slots; ++s) {
      fit = fits_float(op.mean[s]) && fits_float(op.scale[s]) && fits_float(op.shift[s]);
    }
    if (fit) {
      const Index n = p.slots;
      tables.resize(static_cast<std::size_t>(4 * n));
      for (Index s = 0; s < n; ++s) {
        const SplitMean<T> m(op.mean[s]);
        tables[static_cast<std::size_t>(s)] = m.hi;
        tables[static_cast<std::size_t>(n + s)] = m.lo;
        tables[static_cast<std::size_t>(2 * n + s)] = static_cast<T>(op.scale[s]);
        tables[static_cast<std::size_t>(3 * n + s)] = static_cast<T>(op.shift[s]);
      }
      op.tables = tables.data();
      op.slots = n;
    }
  }
  for_each_run(p, op, dev);
}

/// y = (x - mean[s]) * rstd[s] * gamma[aux] + beta[aux]: LayerNorm's elementwise affine
/// (and GroupNorm's per-channel one, aux = channel). gamma/beta stay in the input's type
/// (the caller's own arrays): converting in registers halves the loads per element, which
/// bound this loop when it read double copies.
template <class T>
struct AuxAffineOp {
  const T* x;
  T* y;
  const acc_t* mean;
  const acc_t* rstd;
  const T* gamma;
  const T* beta;

  template <bool kColumn, int AuxMode>
  NORMKIT_ALWAYS_INLINE void run(
      Index off, Index len, Index slot, Index aux, Index aux_step) const {
    const T* xp = x + off;
    T* yp = y + off;
    if constexpr (kColumn && AuxMode == 0) {
      (void)aux_step;
      const acc_t* m = mean + slot;
      const acc_t* r = rstd + slot;
      const acc_t g = static_cast<acc_t>(gamma[aux]), b = static_cast<acc_t>(beta[aux]);
      for (Index j = 0; j < len; ++j) {
        yp[j] = static_cast<T>((static_cast<acc_t>(xp[j]) - m[j]) * r[j] * g + b);
      }
    } else if constexpr (!kColumn && AuxMode == 0) {
      // One gamma/beta for the whole run (GroupNorm: aux = the run's channel).
      (void)aux_step;
      const acc_t m = mean[slot], a = rstd[slot] * static_cast<acc_t>(gamma[aux]);
      const acc_t b = static_cast<acc_t>(beta[aux]);
      if constexpr (std::is_same<T, float>::value) {
        if (fits_float(m) && fits_float(a) && fits_float(b)) {
          const SplitMean<T> mf(m);
          const T hi = mf.hi, lo = mf.lo, af = static_cast<T>(a), bf = static_cast<T>(b);
          simd::map(
              len, yp, [&](auto& o, const auto& v) { o = ((v - hi) - lo) * af + bf; }, xp);
          return;
        }
      }
      for (Index j = 0; j < len; ++j)
        yp[j] = static_cast<T>((static_cast<acc_t>(xp[j]) - m) * a + b);
    } else if constexpr (!kColumn && AuxMode == 1) {
      (void)aux_step;
      if constexpr (std::is_same<T, float>::value) {
        if (fits_float(mean[slot]) && fits_float(rstd[slot])) {
          const SplitMean<T> m(mean[slot]);
          const T hi = m.hi, lo = m.lo, r = static_cast<T>(rstd[slot]);
          simd::map(
              len, yp,
              [&](auto& o, const auto& v, const auto& g, const auto& b) {
                o = ((v - hi) - lo) * r * g + b;
              },
              xp, gamma + aux, beta + aux);
          return;
        }
      }
      const acc_t m = mean[slot], r = rstd[slot];
      const T* g = gamma + aux;
      const T* b = beta + aux;
      for (Index j = 0; j < len; ++j) {
        yp[j] = static_cast<T>((static_cast<acc_t>(xp[j]) - m) * r * static_cast<acc_t>(g[j]) +
                               static_cast<acc_t>(b[j]));
      }
    } else {
      for (Index j = 0; j < len; ++j) {
        const Index s = kColumn ? slot + j : slot;
        const Index k = aux + j * aux_step;
        yp[j] = static_cast<T>((static_cast<acc_t>(xp[j]) - mean[s]) * rstd[s] *
                                   static_cast<acc_t>(gamma[k]) +
                               static_cast<acc_t>(beta[k]));
      }
    }
  }
};

/// dx = a[s] * w[aux] * dy + b[s] * (x - mean[s]) + c[s], w = 1 when weight is null.
/// Every norm's input gradient has this form (SEMANTICS.md §8, expanded per slot).
template <class T, bool kWeighted>
struct GradInputOp {
  const T* x;
  const T* dy;
  T* dx;
  const acc_t* mean;
  const acc_t* a;
  const acc_t* b;
  const acc_t* c;
  const acc_t* weight;  // per aux index (kWeighted only)
  // Optional float tables for column mode ([hi | lo | a | b | c], `slots` each): see
  // apply_grad_input().
  const T* tables = nullptr;
  Index slots = 0;

  template <bool kColumn, int AuxMode>
  NORMKIT_ALWAYS_INLINE void run(
      Index off, Index len, Index slot, Index aux, Index aux_step) const {
    const T* xp = x + off;
    const T* gp = dy + off;
    T* op = dx + off;
    if constexpr (kColumn && !kWeighted && std::is_same<T, float>::value) {
      if (tables) {
        const T* hi = tables + slot;
        const T* lo = hi + slots;
        simd::map(
            len, op,
            [](auto& o, const auto& g, const auto& v, const auto& h, const auto& l, const auto& av,
               const auto& bv, const auto& cv) { o = av * g + bv * ((v - h) - l) + cv; },
            gp, xp, hi, lo, lo + slots, lo + 2 * slots, lo + 3 * slots);
        return;
      }
    }
    if constexpr (!kWeighted && !kColumn) {
      (void)aux, (void)aux_step;
      if constexpr (std::is_same<T, float>::value) {
        // Float arithmetic with the split mean, as AffineOp (NB at SplitMean).
        if (fits_float(mean[slot]) && fits_float(a[slot]) && fits_float(b[slot]) &&
            fits_float(c[slot])) {
          const SplitMean<T> m(mean[slot]);
          const T hi = m.hi, lo = m.lo, aa = static_cast<T>(a[slot]), bb = static_cast<T>(b[slot]),
                  cc = static_cast<T>(c[slot]);
          simd::map(
              len, op,
              [&](auto& o, const auto& g, const auto& v) {
                o = aa * g + bb * ((v - hi) - lo) + cc;
              },
              gp, xp);
          return;
        }
      }
      const acc_t m = mean[slot], aa = a[slot], bb = b[slot], cc = c[slot];
      for (Index j = 0; j < len; ++j) {
        op[j] = static_cast<T>(aa * static_cast<acc_t>(gp[j]) +
                               bb * (static_cast<acc_t>(xp[j]) - m) + cc);
      }
    } else if constexpr (!kWeighted && kColumn) {
      (void)aux, (void)aux_step;
      const acc_t* m = mean + slot;
      const acc_t* aa = a + slot;
      const acc_t* bb = b + slot;
      const acc_t* cc = c + slot;
      for (Index j = 0; j < len; ++j) {
        op[j] = static_cast<T>(aa[j] * static_cast<acc_t>(gp[j]) +
                               bb[j] * (static_cast<acc_t>(xp[j]) - m[j]) + cc[j]);
      }
    } else {
      for (Index j = 0; j < len; ++j) {
        const Index s = kColumn ? slot + j : slot;
        const Index k = AuxMode == 0 ? aux : aux + j * aux_step;
        op[j] = static_cast<T>(a[s] * weight[k] * static_cast<acc_t>(gp[j]) +
                               b[s] * (static_cast<acc_t>(xp[j]) - mean[s]) + c[s]);
      }
    }
  }
};

/// Runs a GradInputOp over a plan; for float column-mode plans (unweighted) it first
/// converts the per-slot coefficients to float tables, as apply_affine.
template <class T, class Device>
void apply_grad_input(const Plan& p, GradInputOp<T, false> op, const Device& dev) {
  std::vector<T> tables;
  if constexpr (std::is_same<T, float>::value) {
    bool fit = p.column_mode() && p.numel >= 4 * p.slots;
    for (Index s = 0; fit && s < p.slots; ++s) {
      fit = fits_float(op.mean[s]) && fits_float(op.a[s]) && fits_float(op.b[s]) &&
            fits_float(op.c[s]);
    }
    if (fit) {
      const Index n = p.slots;
      tables.resize(static_cast<std::size_t>(5 * n));
      for (Index s = 0; s < n; ++s) {
        const SplitMean<T> m(op.mean[s]);
        tables[static_cast<std::size_t>(s)] = m.hi;
        tables[static_cast<std::size_t>(n + s)] = m.lo;
        tables[static_cast<std::size_t>(2 * n + s)] = static_cast<T>(op.a[s]);
        tables[static_cast<std::size_t>(3 * n + s)] = static_cast<T>(op.b[s]);
        tables[static_cast<std::size_t>(4 * n + s)] = static_cast<T>(op.c[s]);
      }
      op.tables = tables.data();
      op.slots = n;
    }
  }
  for_each_run(p, op, dev);
}

}  // namespace detail
}  // namespace normkit

#endif  // NORMKIT_DETAIL_ELEMENTWISE_HPP_
