// normkit/detail/reduction.hpp: THE reduction core. Every statistic normkit computes -- the
// forward moments, the backward sums, LayerNorm's dweight/dbias -- is two sums per slot of a
// Plan, computed here: blocking, threading and merge order live in this file once; the
// element loops are the leaves' (kernels/leaves.hpp).
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_REDUCTION_HPP_
#define NORMKIT_DETAIL_REDUCTION_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>  // std::min, std::max, std::fill
#include <array>      // std::array
#include <vector>     // std::vector

#include <normkit/config.hpp>
#include <normkit/detail/dispatch.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/kernels/types.hpp>
#include <normkit/detail/plan.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

// NB: blocking. The reduction space of every slot is cut into blocks fixed by the shape: in
// row mode whole runs, kBlockElements elements' worth of them (a run longer than that is cut
// into chunks of kBlockElements); in column mode groups of rows of a tile of at most
// kMaxColumnTile slots. A block's sums start from zero and blocks are added in index order,
// whether one thread computes them all or many compute them side by side: results do not
// depend on the thread count. 16 Ki elements keep a block in L1/L2 and make the per-block
// merge cost negligible.
inline constexpr Index kBlockElements = Index{1} << 14;
inline constexpr Index kMaxColumnTile = 1024;
// Runs of at most this many elements are "short" (the leaves prefetch ahead on them; fused.hpp
// takes neighbouring slots together).
inline constexpr Index kShortRunElements = 256;

/// A plan split into key-outer axes (ko), reduce-outer axes (ro) and the contiguous inner
/// axis of extent L.
struct Nest {
  Odometer ko, ro;
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

/// Row-mode blocks of one slot: `chunks` blocks per run (runs longer than kBlockElements), or
/// `rpb` whole runs per block.
struct RowBlocks {
  Index chunks = 1;
  Index rpb = 1;
  Index count = 1;
};

inline RowBlocks row_blocks(const Nest& n) {
  RowBlocks b;
  if (n.L > kBlockElements) {
    b.chunks = (n.L + kBlockElements - 1) / kBlockElements;
    b.count = n.R * b.chunks;
  } else {
    b.rpb = std::max<Index>(1, kBlockElements / std::max<Index>(1, n.L));
    b.count = (n.R + b.rpb - 1) / b.rpb;
  }
  return b;
}

/// Calls f(offset, len, count, stride) for the runs of block b of the slot group at which
/// `ko` stands, in order, batched along the innermost reduce-outer axis.
template <class F>
void for_block_runs(const Nest& n, const RowBlocks& bl, const Odometer& ko, Index b, F&& f) {
  Odometer ro = n.ro;
  if (bl.chunks > 1) {
    const Index r = b / bl.chunks, j = b % bl.chunks;
    ro.seek(r);
    const Index start = j * kBlockElements;
    f(ko.offset + ro.offset + start, std::min(kBlockElements, n.L - start), Index{1}, Index{0});
    return;
  }
  Index r0 = b * bl.rpb;
  const Index r1 = std::min(n.R, r0 + bl.rpb);
  if (ro.n == 0) {  // one run
    f(ko.offset, n.L, Index{1}, Index{0});
    return;
  }
  ro.seek(r0);
  const Index stride = ro.ax[static_cast<std::size_t>(ro.n - 1)]->stride;
  while (r0 < r1) {
    const Index cnt = std::min(r1 - r0, ro.inner_room());
    f(ko.offset + ro.offset, n.L, cnt, stride);
    r0 += cnt;
    if (r0 < r1)
      ro.advance(cnt);
  }
}

/// The two sums of a row accumulator: lanes of both pairs added, then a fixed tree (the same
/// for every ISA), then the scalar tail. Not inlined, so that every caller rounds alike.
NORMKIT_NOINLINE inline void finish_acc(const RowAcc& s, double& s1, double& s2) {
  double a[8], q[8];
  for (int k = 0; k < 8; ++k) {
    a[k] = s.a1[k] + s.b1[k];
    q[k] = s.a2[k] + s.b2[k];
  }
  s1 = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])) + s.t1;
  s2 = ((q[0] + q[4]) + (q[2] + q[6])) + ((q[1] + q[5]) + (q[3] + q[7])) + s.t2;
}

/// What a reduction sums, per slot s with shift c = center[s]:
///  - moments (dy null): s1 = sum(x - c), s2 = sum((x - c)^2);
///  - backward sums: s1 = sum(dy), s2 = sum(dy * (x - c)).
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
struct SumOp {
  const Leaves<T>* leaf;
  const T* x;
  const T* dy;  // null: moments
  const double* center;

  /// Runs of one slot into one accumulator.
  void rows(Index off, Index len, Index count, Index stride, Index slot, RowAcc* st) const {
    rows_multi(off, len, count, stride, slot, 0, st, 0);
  }
  /// Run r into st[r * st_step] with shift center[slot + r * slot_step].
  void rows_multi(Index off,
                  Index len,
                  Index count,
                  Index stride,
                  Index slot,
                  Index slot_step,
                  RowAcc* st,
                  Index st_step) const {
    if (dy) {
      leaf->grad_rows(x + off, dy + off, len, count, stride, center + slot, slot_step, st,
                      st_step);
    } else {
      leaf->mom_rows(x + off, len, count, stride, center + slot, slot_step, st, st_step);
    }
  }
  /// Rows of consecutive slots slot, slot + 1, ... (column mode).
  void cols(Index off,
            Index row_stride,
            Index rows,
            Index len,
            Index slot,
            double* s1,
            double* s2) const {
    if (dy) {
      leaf->grad_cols(x + off, dy + off, row_stride, rows, len, center + slot, s1, s2);
    } else {
      leaf->mom_cols(x + off, row_stride, rows, len, center + slot, s1, s2);
    }
  }
};

/// Sums of block b of the slot group at `ko` (fresh accumulator).
template <class T>
void row_block(const Nest& n,
               const RowBlocks& bl,
               const SumOp<T>& op,
               const Odometer& ko,
               Index b,
               double& s1,
               double& s2) {
  RowAcc st{};
  for_block_runs(n, bl, ko, b, [&](Index off, Index len, Index cnt, Index stride) {
    op.rows(off, len, cnt, stride, ko.slot, &st);
  });
  finish_acc(st, s1, s2);
}

/// Sums of every block of the slot group at `ko`, merged in block order.
template <class T>
void row_group(const Nest& n,
               const RowBlocks& bl,
               const SumOp<T>& op,
               const Odometer& ko,
               double& s1,
               double& s2) {
  double a1 = 0, a2 = 0;
  for (Index b = 0; b < bl.count; ++b) {
    double p1, p2;
    row_block(n, bl, op, ko, b, p1, p2);
    a1 += p1;
    a2 += p2;
  }
  s1 = a1;
  s2 = a2;
}

inline Index slot_of_group(const Nest& n, Index t) {
  Odometer ko = n.ko;
  ko.seek(t);
  return ko.slot;
}

/// Column-mode geometry: tiles of at most kMaxColumnTile slots, blocks of rows.
struct ColBlocks {
  Index tile_w = 1, tiles = 1, rpb = 1, count = 1;
};

inline ColBlocks col_blocks(const Nest& n) {
  ColBlocks c;
  c.tile_w = std::max<Index>(1, std::min(n.L, kMaxColumnTile));
  c.tiles = (n.L + c.tile_w - 1) / c.tile_w;
  c.rpb = std::max<Index>(1, kBlockElements / c.tile_w);
  c.count = (n.R + c.rpb - 1) / c.rpb;
  return c;
}

/// Column mode: rows of block b for column tile `tile` of slot group t, into fresh s1, s2.
template <class T>
void col_block(const Nest& n,
               const ColBlocks& cb,
               const SumOp<T>& op,
               Index t,
               Index tile,
               Index b,
               double* s1,
               double* s2) {
  Odometer ko = n.ko, ro = n.ro;
  ko.seek(t);
  const Index c0 = tile * cb.tile_w;
  const Index ct = std::min(cb.tile_w, n.L - c0);
  std::fill(s1, s1 + ct, 0.0);
  std::fill(s2, s2 + ct, 0.0);
  Index r0 = b * cb.rpb;
  const Index r1 = std::min(n.R, r0 + cb.rpb);
  if (ro.n == 0) {
    op.cols(ko.offset + c0, 0, 1, ct, ko.slot + c0, s1, s2);
    return;
  }
  ro.seek(r0);
  const Index stride = ro.ax[static_cast<std::size_t>(ro.n - 1)]->stride;
  while (r0 < r1) {
    const Index cnt = std::min(r1 - r0, ro.inner_room());
    op.cols(ko.offset + ro.offset + c0, stride, cnt, ct, ko.slot + c0, s1, s2);
    r0 += cnt;
    if (r0 < r1)
      ro.advance(cnt);
  }
}

/// Computes, for every slot s of the plan, out1[s] and out2[s] as the op's two sums over the
/// slot's elements (plan slot order; overwritten).
template <class T>
void reduce(const Plan& p, const SumOp<T>& op, double* out1, double* out2, const Exec& ex) {
  if (p.numel == 0) {
    std::fill(out1, out1 + p.slots, 0.0);
    std::fill(out2, out2 + p.slots, 0.0);
    return;
  }
  const Nest n = split(p);
  const bool parallel = ex.parallel(p.numel);
  if (!p.column_mode()) {
    const RowBlocks bl = row_blocks(n);
    auto groups = [&](Index first, Index last) {
      Odometer ko = n.ko;
      ko.seek(first);
      for (Index t = first; t < last; ++t, ko.next())
        row_group(n, bl, op, ko, out1[ko.slot], out2[ko.slot]);
    };
    if (!parallel || bl.count == 1 || n.T >= Index{4} * ex.threads) {
      if (!parallel) {
        groups(0, n.T);
      } else {
        run_ranges(ex, n.T, items_for(ex, n.T), groups);
      }
      return;
    }
    // Few slots, many blocks: blocks side by side, partials merged in block order after.
    std::vector<double> part(static_cast<std::size_t>(2 * n.T * bl.count));
    run_ranges(ex, n.T * bl.count, items_for(ex, n.T * bl.count), [&](Index first, Index last) {
      Odometer ko = n.ko;
      for (Index it = first; it < last; ++it) {
        ko.seek(it / bl.count);
        row_block(n, bl, op, ko, it % bl.count, part[static_cast<std::size_t>(2 * it)],
                  part[static_cast<std::size_t>(2 * it + 1)]);
      }
    });
    for (Index t = 0; t < n.T; ++t) {
      double a1 = 0, a2 = 0;
      for (Index b = 0; b < bl.count; ++b) {
        a1 += part[static_cast<std::size_t>(2 * (t * bl.count + b))];
        a2 += part[static_cast<std::size_t>(2 * (t * bl.count + b) + 1)];
      }
      const Index s = slot_of_group(n, t);
      out1[s] = a1;
      out2[s] = a2;
    }
    return;
  }
  // Column mode.
  const ColBlocks cb = col_blocks(n);
  const Index G = n.T * cb.tiles;
  auto merge_into = [&](Index g, const double* p1, const double* p2, bool first) {
    const Index t = g / cb.tiles, c0 = (g % cb.tiles) * cb.tile_w;
    const Index ct = std::min(cb.tile_w, n.L - c0);
    const Index s = slot_of_group(n, t) + c0;
    for (Index j = 0; j < ct; ++j) {
      out1[s + j] = first ? p1[j] : out1[s + j] + p1[j];
      out2[s + j] = first ? p2[j] : out2[s + j] + p2[j];
    }
  };
  auto groups = [&](Index first, Index last) {
    std::vector<double> buf(static_cast<std::size_t>(2 * cb.tile_w));
    for (Index g = first; g < last; ++g) {
      for (Index b = 0; b < cb.count; ++b) {
        col_block(n, cb, op, g / cb.tiles, g % cb.tiles, b, buf.data(), buf.data() + cb.tile_w);
        merge_into(g, buf.data(), buf.data() + cb.tile_w, b == 0);
      }
    }
  };
  if (!parallel || cb.count == 1 || G >= Index{4} * ex.threads) {
    if (!parallel) {
      groups(0, G);
    } else {
      run_ranges(ex, G, items_for(ex, G), groups);
    }
    return;
  }
  std::vector<double> part(static_cast<std::size_t>(2 * G * cb.count * cb.tile_w));
  run_ranges(ex, G * cb.count, items_for(ex, G * cb.count), [&](Index first, Index last) {
    for (Index it = first; it < last; ++it) {
      double* buf = part.data() + 2 * it * cb.tile_w;
      const Index g = it / cb.count;
      col_block(n, cb, op, g / cb.tiles, g % cb.tiles, it % cb.count, buf, buf + cb.tile_w);
    }
  });
  for (Index g = 0; g < G; ++g) {
    for (Index b = 0; b < cb.count; ++b) {
      const double* buf = part.data() + 2 * (g * cb.count + b) * cb.tile_w;
      merge_into(g, buf, buf + cb.tile_w, b == 0);
    }
  }
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_REDUCTION_HPP_
