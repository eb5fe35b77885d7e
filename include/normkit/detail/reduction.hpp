// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_REDUCTION_HPP_
#define NORMKIT_DETAIL_REDUCTION_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>  // std::min, std::fill
#include <array>      // std::array
#include <vector>     // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/parallel.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/simd.hpp>

namespace normkit {
namespace detail {

// THE reduction core. Every statistic normkit computes -- forward moments, the backward
// sums (sum dy, sum dy*(x - mean)), LayerNorm's dgamma/dbeta -- is two sums per slot over a
// Plan, produced by reduce() below with a small accumulator "op" that says what one element
// contributes. The loops, the blocking, the threading and the merge order live here once.
//
// An op provides
//   struct RowState;  (value-initialized = zero)
//   template <int AuxMode> void row(offset, len, slot, aux, aux_step, RowState& st) const;
//   void finish(const RowState& st, acc& s1, acc& s2) const;
//   template <int AuxMode> void col(offset, len, slot, aux, aux_step, acc* s1, acc* s2) const;
// row(): elements [offset, offset + len) all belong to `slot`; accumulate into st (one block
// of runs of one slot); finish() reduces st to the block's two sums.
// col(): element offset + j belongs to slot + j; add to s1[j], s2[j].
// `aux` is the aux index of the first element; it advances by aux_step per element
// (AuxMode 0: aux_step == 0, 1: aux_step == 1, 2: any other step).

using acc_t = double;

// NB: blocking. The reduction space of every slot is cut into blocks of kBlockElements
// elements (row mode) or of rows covering that many elements (column mode). A block's sums
// start from zero and blocks are added in index order, whether one thread computes them all
// or many compute them side by side: results do not depend on the thread count. 16 Ki
// elements keep a block in L1/L2 and make the per-block merge cost negligible.
inline constexpr Index kBlockElements = Index{1} << 14;
// Column-mode runs are cut into tiles of at most this many slots (the partial sums of a
// tile, 2 x 8 bytes per slot, stay in L1).
inline constexpr Index kMaxColumnTile = 1024;
// Runs of at most kShortRun elements get the run kPrefetchRuns ahead prefetched (row_block).
inline constexpr Index kShortRun = 256;
inline constexpr Index kPrefetchRuns = 4;

/// Prefetches the cache lines of p[0, len) (a hint: never faults, no effect on results).
template <class T>
NORMKIT_ALWAYS_INLINE void prefetch_lines(const T* p, Index len) {
#if defined(__GNUC__) || defined(__clang__)
  constexpr Index kLine = 64 / static_cast<Index>(sizeof(T));
  for (Index j = 0; j < len; j += kLine) __builtin_prefetch(p + j);
  __builtin_prefetch(p + len - 1);
#else
  (void)p, (void)len;
#endif
}
/// prefetch_lines of two arrays (x and dy of the backward ops).
template <class T>
NORMKIT_ALWAYS_INLINE void prefetch_lines(const T* a, const T* b, Index len) {
  prefetch_lines(a, len);
  prefetch_lines(b, len);
}

namespace reduction_impl {

struct Nest {
  Odometer ko, ro;  // key-outer and reduce-outer axes
  Index T = 1, R = 1, L = 1, aux_step = 0;
};

inline Nest split(const Plan& p) {
  Nest n;
  for (int i = 0; i + 1 < p.rank; ++i) {
    const LoopAxis& a = p.axes[static_cast<std::size_t>(i)];
    if (a.role == Role::key) {
      n.ko.add(a);
    } else {
      n.ro.add(a);
    }
  }
  n.T = n.ko.size();
  n.R = n.ro.size();
  n.L = p.inner().extent;
  n.aux_step = p.inner().aux_stride;
  return n;
}

// Row mode: the block-th block of the slot group at which `ko` stands, added into fresh
// s1, s2.
template <int AuxMode, class Op>
void row_block(const Nest& n, const Op& op, const Odometer& ko, Index block, acc_t& s1, acc_t& s2) {
  Odometer ro = n.ro;
  const Index total = n.R * n.L;
  Index start = block * kBlockElements;
  const Index end = std::min(total, start + kBlockElements);
  ro.seek(start / n.L);
  Index i0 = start % n.L;
  // The op's accumulators live across all runs of the block and are reduced once at its
  // end: short runs (7x7 feature maps) pay no per-run horizontal sum.
  typename Op::RowState st{};
  // NB: short runs far apart (a (64, 512, 7, 7) BatchNorm channel: 64 runs of 196 bytes,
  // 100 KB apart) defeat the hardware prefetchers, and the loop waits on each run's
  // latency. The run kPrefetchRuns ahead is requested explicitly.
  const bool prefetch = ro.n == 1 && n.L <= kShortRun;
  while (start < end) {
    const Index len = std::min(n.L - i0, end - start);
    if (prefetch && ro.idx[0] + kPrefetchRuns < ro.ax[0]->extent)
      op.prefetch(ko.offset + ro.offset + kPrefetchRuns * ro.ax[0]->stride, n.L);
    op.template row<AuxMode>(ko.offset + ro.offset + i0, len, ko.slot,
                             ko.aux + ro.aux + i0 * n.aux_step, n.aux_step, st);
    start += len;
    i0 = 0;
    ro.next();
  }
  op.finish(st, s1, s2);
}

// Row mode: all blocks of the slot group at which `ko` stands, merged in block order.
template <int AuxMode, class Op>
void row_group(
    const Nest& n, const Op& op, const Odometer& ko, Index blocks, acc_t& s1, acc_t& s2) {
  acc_t a1 = 0, a2 = 0;
  for (Index b = 0; b < blocks; ++b) {
    acc_t p1, p2;
    row_block<AuxMode>(n, op, ko, b, p1, p2);
    a1 += p1;
    a2 += p2;
  }
  s1 = a1;
  s2 = a2;
}

// Column mode: rows of block `block` for column tile `tile` of slot group t.
template <int AuxMode, class Op>
void col_block(const Nest& n,
               const Op& op,
               Index t,
               Index tile,
               Index block,
               Index tile_w,
               Index rows_per_block,
               acc_t* s1,
               acc_t* s2) {
  Odometer ko = n.ko, ro = n.ro;
  ko.seek(t);
  const Index c0 = tile * tile_w;
  const Index ct = std::min(tile_w, n.L - c0);
  std::fill(s1, s1 + ct, acc_t{0});
  std::fill(s2, s2 + ct, acc_t{0});
  const Index r0 = block * rows_per_block;
  const Index r1 = std::min(n.R, r0 + rows_per_block);
  ro.seek(r0);
  if constexpr (Op::kColRows) {
    if (ro.n <= 1) {  // rows evenly spaced: the op takes the block at once
      const Index stride = ro.n == 1 ? ro.ax[0]->stride : 0;
      op.col_rows(ko.offset + ro.offset + c0, stride, r1 - r0, ct, ko.slot + c0, s1, s2);
      return;
    }
  }
  for (Index r = r0; r < r1; ++r) {
    op.template col<AuxMode>(ko.offset + ro.offset + c0, ct, ko.slot + c0,
                             ko.aux + ro.aux + c0 * n.aux_step, n.aux_step, s1, s2);
    ro.next();
  }
}

inline Index slot_of_group(const Nest& n, Index t) {
  Odometer ko = n.ko;
  ko.seek(t);
  return ko.slot;
}

// Small-buffer scratch for column partials.
struct Scratch {
  std::array<acc_t, 256> small{};
  std::vector<acc_t> big;
  acc_t* get(Index n) {
    if (n <= static_cast<Index>(small.size()))
      return small.data();
    big.resize(static_cast<std::size_t>(n));
    return big.data();
  }
};

template <int AuxMode, class Op, class Device>
void reduce(const Plan& p, const Op& op, acc_t* out1, acc_t* out2, const Device& dev) {
  const Nest n = split(p);
  const int threads = device_threads(dev);
  const bool parallel = threads > 1 && p.numel >= kMinParallelElements;
  if (!p.column_mode()) {
    const Index B = (n.R * n.L + kBlockElements - 1) / kBlockElements;
    auto groups = [&](Index first, Index last) {
      Odometer ko = n.ko;
      ko.seek(first);
      for (Index t = first; t < last; ++t, ko.next()) {
        row_group<AuxMode>(n, op, ko, B, out1[ko.slot], out2[ko.slot]);
      }
    };
    if (!parallel || B == 1 || n.T >= Index{4} * threads) {
      parallel_for(dev, n.T, double(B * kBlockElements) * 4.0, parallel, groups);
      return;
    }
    std::vector<acc_t> part(static_cast<std::size_t>(2 * n.T * B));
    parallel_for(dev, n.T * B, double(kBlockElements) * 4.0, true, [&](Index first, Index last) {
      Odometer ko = n.ko;
      for (Index it = first; it < last; ++it) {
        ko.seek(it / B);
        row_block<AuxMode>(n, op, ko, it % B, part[static_cast<std::size_t>(2 * it)],
                           part[static_cast<std::size_t>(2 * it + 1)]);
      }
    });
    for (Index t = 0; t < n.T; ++t) {
      acc_t a1 = 0, a2 = 0;
      for (Index b = 0; b < B; ++b) {
        a1 += part[static_cast<std::size_t>(2 * (t * B + b))];
        a2 += part[static_cast<std::size_t>(2 * (t * B + b) + 1)];
      }
      const Index s = slot_of_group(n, t);
      out1[s] = a1;
      out2[s] = a2;
    }
    return;
  }
  // Column mode.
  const Index tile_w = std::min(n.L, kMaxColumnTile);
  const Index tiles = (n.L + tile_w - 1) / tile_w;
  const Index rows_per_block = std::max(Index{1}, kBlockElements / tile_w);
  const Index B = (n.R + rows_per_block - 1) / rows_per_block;
  const Index G = n.T * tiles;
  auto merge_into = [&](Index g, const acc_t* p1, const acc_t* p2, bool first) {
    const Index t = g / tiles, c0 = (g % tiles) * tile_w;
    const Index ct = std::min(tile_w, n.L - c0);
    const Index s = slot_of_group(n, t) + c0;
    for (Index j = 0; j < ct; ++j) {
      out1[s + j] = first ? p1[j] : out1[s + j] + p1[j];
      out2[s + j] = first ? p2[j] : out2[s + j] + p2[j];
    }
  };
  auto groups = [&](Index first, Index last) {
    Scratch scratch;
    acc_t* buf = scratch.get(2 * tile_w);
    for (Index g = first; g < last; ++g) {
      for (Index b = 0; b < B; ++b) {
        col_block<AuxMode>(n, op, g / tiles, g % tiles, b, tile_w, rows_per_block, buf,
                           buf + tile_w);
        merge_into(g, buf, buf + tile_w, b == 0);
      }
    }
  };
  if (!parallel || B == 1 || G >= Index{4} * threads) {
    parallel_for(dev, G, double(B * rows_per_block * tile_w) * 4.0, parallel, groups);
    return;
  }
  std::vector<acc_t> part(static_cast<std::size_t>(2 * G * B * tile_w));
  parallel_for(dev, G * B, double(rows_per_block * tile_w) * 4.0, true,
               [&](Index first, Index last) {
                 for (Index it = first; it < last; ++it) {
                   acc_t* buf = part.data() + 2 * it * tile_w;
                   col_block<AuxMode>(n, op, (it / B) / tiles, (it / B) % tiles, it % B, tile_w,
                                      rows_per_block, buf, buf + tile_w);
                 }
               });
  for (Index g = 0; g < G; ++g) {
    for (Index b = 0; b < B; ++b) {
      const acc_t* buf = part.data() + 2 * (g * B + b) * tile_w;
      merge_into(g, buf, buf + tile_w, b == 0);
    }
  }
}

}  // namespace reduction_impl

/// Computes, for every slot s of the plan, out1[s] and out2[s] as the op's two sums over
/// the slot's elements. out arrays are indexed by plan slot and are overwritten.
template <class Op, class Device>
void reduce(const Plan& p, const Op& op, acc_t* out1, acc_t* out2, const Device& dev) {
  if (p.numel == 0) {
    std::fill(out1, out1 + p.slots, acc_t{0});
    std::fill(out2, out2 + p.slots, acc_t{0});
    return;
  }
  switch (p.inner().aux_stride) {
    case 0:
      reduction_impl::reduce<0>(p, op, out1, out2, dev);
      break;
    case 1:
      reduction_impl::reduce<1>(p, op, out1, out2, dev);
      break;
    default:
      reduction_impl::reduce<2>(p, op, out1, out2, dev);
      break;
  }
}

// ---------------------------------------------------------------------------------------
// Accumulator ops.

// NB: lanes. The hot row kernels below use simd::d8 accumulators (detail/simd.hpp); the
// remaining scalar kernels use kLanes independent accumulators (a loop the compiler turns into
// vector adds without reassociating anything), reduced in a fixed tree at the end of a run.
inline constexpr int kLanes = 8;

NORMKIT_ALWAYS_INLINE acc_t lane_sum(const acc_t* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// NB: column strips. In column mode a block is a run of rows over a tile of consecutive
// slots. Ops that can (kColRows) take the whole block at once, a strip of columns at a
// time (64 with AVX-512, 16 otherwise), the strip's accumulators in registers down the rows:
// the plain col() loop loads and stores both accumulator arrays for every element, which
// bound BatchNorm1d and channels-last statistics at 2-3x the bandwidth floor. With 64
// channels or fewer a strip is a whole row and the block is read in memory order. Each
// column still adds its rows in order, one accumulator per column: the same sums as col().
// `step8(k, j, a, q)` accumulates row k, columns [j, j + 8) into a, q; `step1` one column.
#if defined(__AVX512F__)
inline constexpr Index kStripVectors = 8;  // 64 columns: 16 of the 32 vector registers
#else
inline constexpr Index kStripVectors = 2;  // 16 columns
#endif

template <Index kU, class Load8>
NORMKIT_ALWAYS_INLINE void column_strip(
    Index k0, Index k1, Index j, acc_t* s1, acc_t* s2, Load8& step8) {
  simd::d8 a[kU], q[kU];
  for (Index u = 0; u < kU; ++u) {
    simd::load(a[u], s1 + j + 8 * u);
    simd::load(q[u], s2 + j + 8 * u);
  }
  for (Index k = k0; k < k1; ++k) {
    for (Index u = 0; u < kU; ++u) step8(k, j + 8 * u, a[u], q[u]);
  }
  for (Index u = 0; u < kU; ++u) {
    simd::store(s1 + j + 8 * u, a[u]);
    simd::store(s2 + j + 8 * u, q[u]);
  }
}

template <class Load8, class Scalar>
NORMKIT_ALWAYS_INLINE void column_strips(
    Index rows, Index len, acc_t* s1, acc_t* s2, Load8&& step8, Scalar&& step1) {
  constexpr Index kW = 8 * kStripVectors;
  Index j = 0;
  for (; j + kW <= len; j += kW) column_strip<kStripVectors>(0, rows, j, s1, s2, step8);
  for (; j + 8 <= len; j += 8) column_strip<1>(0, rows, j, s1, s2, step8);
  for (; j < len; ++j) {
    acc_t a = s1[j], q = s2[j];
    for (Index k = 0; k < rows; ++k) step1(k, j, a, q);
    s1[j] = a;
    s2[j] = q;
  }
}

/// Forward moments with a per-slot shift c: s1 = sum(x - c), s2 = sum((x - c)^2).
///
/// NB: "shifted data" one-pass moments (Chan, Golub & LeVeque 1983), accumulated in double.
/// With c = the slot's first element, var = (s2 - s1^2/n)/n loses at most a factor
/// ((mean - c)/sigma)^2 <= n of relative precision to cancellation -- since one element at
/// distance D from the mean forces sigma^2 >= D^2/n -- i.e. < 1e-10 relative error for a
/// million elements in double, far below float rounding; for ordinary data the factor is
/// O(1). It reads memory once (the two-pass scheme reads it twice), needs no division per
/// element (Welford does), merges by plain addition (so blocks and threads combine in a
/// fixed order), and in double cannot overflow for any finite float input (|x| ~ 1e20
/// squares to 1e40). E[x^2] - E[x]^2 without the shift is the classic failure (#40308).
template <class T>
struct MomentsOp {
  const T* x;
  const acc_t* center;  // per slot

  struct RowState {
    simd::d8 a1{}, a2{}, b1{}, b2{};  // two independent pairs hide the add latency
    acc_t t1 = 0, t2 = 0;             // scalar tails
  };

  template <int AuxMode>
  NORMKIT_ALWAYS_INLINE void row(
      Index off, Index len, Index slot, Index, Index, RowState& st) const {
    const T* xp = x + off;
    const acc_t c = center[slot];
    simd::d8 cv;
    simd::splat(cv, c);
    Index i = 0;
    for (; i + 16 <= len; i += 16) {
      simd::d8 d, e;
      simd::load(d, xp + i);
      simd::load(e, xp + i + 8);
      d -= cv;
      e -= cv;
      st.a1 += d;
      st.a2 += d * d;
      st.b1 += e;
      st.b2 += e * e;
    }
    for (; i + 8 <= len; i += 8) {
      simd::d8 d;
      simd::load(d, xp + i);
      d -= cv;
      st.a1 += d;
      st.a2 += d * d;
    }
    for (; i < len; ++i) {  // Scalar tail.
      const acc_t d = static_cast<acc_t>(xp[i]) - c;
      st.t1 += d;
      st.t2 += d * d;
    }
  }
  void finish(const RowState& st, acc_t& s1, acc_t& s2) const {
    simd::d8 a1 = st.a1, a2 = st.a2;
    a1 += st.b1;
    a2 += st.b2;
    s1 = simd::hsum(a1) + st.t1;
    s2 = simd::hsum(a2) + st.t2;
  }
  void prefetch(Index off, Index len) const { prefetch_lines(x + off, len); }
  static constexpr bool kColRows = true;
  /// `rows` rows `row_stride` apart, `len` columns from `off` (slots slot, slot + 1, ...).
  NORMKIT_ALWAYS_INLINE void col_rows(
      Index off, Index row_stride, Index rows, Index len, Index slot, acc_t* s1, acc_t* s2) const {
    const T* xp = x + off;
    const acc_t* c = center + slot;
    column_strips(
        rows, len, s1, s2,
        [&](Index k, Index j, simd::d8& a, simd::d8& q) {
          simd::d8 d, cv;
          simd::load(d, xp + k * row_stride + j);
          simd::load(cv, c + j);
          d -= cv;
          a += d;
          q += d * d;
        },
        [&](Index k, Index j, acc_t& a, acc_t& q) {
          const acc_t d = static_cast<acc_t>(xp[k * row_stride + j]) - c[j];
          a += d;
          q += d * d;
        });
  }
  template <int AuxMode>
  NORMKIT_ALWAYS_INLINE void col(
      Index off, Index len, Index slot, Index, Index, acc_t* s1, acc_t* s2) const {
    const T* xp = x + off;
    const acc_t* c = center + slot;
    for (Index j = 0; j < len; ++j) {
      const acc_t d = static_cast<acc_t>(xp[j]) - c[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
};

/// Backward sums: s1 = sum(w * dy), s2 = sum(w * dy * (x - c)), c = the slot's saved mean,
/// w = weight[aux] (LayerNorm's elementwise gamma) or 1 when weight is null.
template <class T, bool kWeighted>
struct GradSumsOp {
  const T* x;
  const T* dy;
  const acc_t* center;  // per slot
  const acc_t* weight;  // per aux index (kWeighted only)

  template <int AuxMode>
  NORMKIT_ALWAYS_INLINE acc_t w(Index aux, Index aux_step, Index i) const {
    if constexpr (!kWeighted) {
      (void)aux, (void)aux_step, (void)i;
      return acc_t{1};
    } else if constexpr (AuxMode == 0) {
      (void)aux_step, (void)i;
      return weight[aux];
    } else if constexpr (AuxMode == 1) {
      (void)aux_step;
      return weight[aux + i];
    } else {
      return weight[aux + i * aux_step];
    }
  }

  struct RowState {
    simd::d8 a1{}, a2{}, b1{}, b2{};  // two independent pairs hide the add latency
    acc_t t1 = 0, t2 = 0;
  };

  /// Elements [k, k + 8) of a run at (xp, gp) whose first aux index is aux, shift splat in
  /// cv, weight splat in wv (AuxMode 0). Public for callers that interleave it with other
  /// work on the same accumulators (LayerNorm's one-pass backward): same operations as row().
  template <int AuxMode>
  NORMKIT_ALWAYS_INLINE void step8(const T* xp,
                                   const T* gp,
                                   const simd::d8& cv,
                                   simd::d8& wv,
                                   Index aux,
                                   Index k,
                                   simd::d8& s1,
                                   simd::d8& s2) const {
    simd::d8 g, xv;
    simd::load(g, gp + k);
    if constexpr (kWeighted && AuxMode == 1)
      simd::load(wv, weight + aux + k);
    if constexpr (kWeighted)
      g = g * wv;
    simd::load(xv, xp + k);
    xv -= cv;
    s1 += g;
    s2 += g * xv;
  }

  template <int AuxMode>
  NORMKIT_ALWAYS_INLINE void row(
      Index off, Index len, Index slot, Index aux, Index aux_step, RowState& st) const {
    const T* xp = x + off;
    const T* gp = dy + off;
    const acc_t c = center[slot];
    Index i = 0;
    if constexpr (AuxMode != 2) {
      simd::d8 cv, wv;
      simd::splat(cv, c);
      simd::splat(wv, kWeighted && AuxMode == 0 ? weight[aux] : acc_t{1});
      for (; i + 16 <= len; i += 16) {
        step8<AuxMode>(xp, gp, cv, wv, aux, i, st.a1, st.a2);
        step8<AuxMode>(xp, gp, cv, wv, aux, i + 8, st.b1, st.b2);
      }
      for (; i + 8 <= len; i += 8) step8<AuxMode>(xp, gp, cv, wv, aux, i, st.a1, st.a2);
    }
    for (; i < len; ++i) {  // Scalar tail (and strided-aux runs).
      const acc_t g = static_cast<acc_t>(gp[i]) * w<AuxMode>(aux, aux_step, i);
      st.t1 += g;
      st.t2 += g * (static_cast<acc_t>(xp[i]) - c);
    }
  }
  void finish(const RowState& st, acc_t& s1, acc_t& s2) const {
    simd::d8 a1 = st.a1, a2 = st.a2;
    a1 += st.b1;
    a2 += st.b2;
    s1 = simd::hsum(a1) + st.t1;
    s2 = simd::hsum(a2) + st.t2;
  }
  void prefetch(Index off, Index len) const { prefetch_lines(x + off, dy + off, len); }
  static constexpr bool kColRows = !kWeighted;
  /// As MomentsOp::col_rows (unweighted only).
  NORMKIT_ALWAYS_INLINE void col_rows(
      Index off, Index row_stride, Index rows, Index len, Index slot, acc_t* s1, acc_t* s2) const {
    const T* xp = x + off;
    const T* gp = dy + off;
    const acc_t* c = center + slot;
    column_strips(
        rows, len, s1, s2,
        [&](Index k, Index j, simd::d8& a, simd::d8& q) {
          simd::d8 g, xv, cv;
          simd::load(g, gp + k * row_stride + j);
          simd::load(xv, xp + k * row_stride + j);
          simd::load(cv, c + j);
          xv -= cv;
          a += g;
          q += g * xv;
        },
        [&](Index k, Index j, acc_t& a, acc_t& q) {
          const acc_t g = static_cast<acc_t>(gp[k * row_stride + j]);
          a += g;
          q += g * (static_cast<acc_t>(xp[k * row_stride + j]) - c[j]);
        });
  }
  template <int AuxMode>
  NORMKIT_ALWAYS_INLINE void col(
      Index off, Index len, Index slot, Index aux, Index aux_step, acc_t* s1, acc_t* s2) const {
    const T* xp = x + off;
    const T* gp = dy + off;
    const acc_t* c = center + slot;
    for (Index j = 0; j < len; ++j) {
      const acc_t g = static_cast<acc_t>(gp[j]) * w<AuxMode>(aux, aux_step, j);
      s1[j] += g;
      s2[j] += g * (static_cast<acc_t>(xp[j]) - c[j]);
    }
  }
};

/// Parameter gradients where the statistics vary along the *reduced* axes (LayerNorm's
/// dgamma/dbeta: key = position, reduced over rows): s1 = sum(dy * (x - mean[aux]) *
/// rstd[aux]), s2 = sum(dy).
template <class T>
struct RowStatGradOp {
  const T* x;
  const T* dy;
  const acc_t* mean;  // per aux index (row)
  const acc_t* rstd;  // per aux index (row)

  struct RowState {
    acc_t a1[kLanes] = {}, a2[kLanes] = {};
  };
  static constexpr bool kColRows = false;
  void prefetch(Index off, Index len) const { prefetch_lines(x + off, dy + off, len); }

  template <int AuxMode>
  NORMKIT_ALWAYS_INLINE void row(
      Index off, Index len, Index, Index aux, Index aux_step, RowState& st) const {
    const T* xp = x + off;
    const T* gp = dy + off;
    for (Index i = 0; i < len; ++i) {
      const Index k = AuxMode == 0 ? aux : aux + i * aux_step;
      const acc_t g = static_cast<acc_t>(gp[i]);
      st.a1[i % kLanes] += g * (static_cast<acc_t>(xp[i]) - mean[k]) * rstd[k];
      st.a2[i % kLanes] += g;
    }
  }
  void finish(const RowState& st, acc_t& s1, acc_t& s2) const {
    s1 = lane_sum(st.a1);
    s2 = lane_sum(st.a2);
  }
  template <int AuxMode>
  NORMKIT_ALWAYS_INLINE void col(
      Index off, Index len, Index, Index aux, Index aux_step, acc_t* s1, acc_t* s2) const {
    const T* xp = x + off;
    const T* gp = dy + off;
    if constexpr (AuxMode == 0) {
      (void)aux_step;
      const acc_t m = mean[aux], r = rstd[aux];
      for (Index j = 0; j < len; ++j) {
        const acc_t g = static_cast<acc_t>(gp[j]);
        s1[j] += g * (static_cast<acc_t>(xp[j]) - m) * r;
        s2[j] += g;
      }
    } else {
      for (Index j = 0; j < len; ++j) {
        const Index k = aux + j * aux_step;
        const acc_t g = static_cast<acc_t>(gp[j]);
        s1[j] += g * (static_cast<acc_t>(xp[j]) - mean[k]) * rstd[k];
        s2[j] += g;
      }
    }
  }
};

}  // namespace detail
}  // namespace normkit

#endif  // NORMKIT_DETAIL_REDUCTION_HPP_
