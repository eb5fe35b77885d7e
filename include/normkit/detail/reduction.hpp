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
#include <cmath>      // std::isinf, std::isfinite
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
/// axis of extent L. sample_runs: positions of ro per sample when the plan asks for
/// per-sample blocks and its sample axis is ro's outermost axis (else 0).
struct Nest {
  Odometer ko, ro;
  Index T = 1, R = 1, L = 1, aux_step = 0;
  Index sample_runs = 0;
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
  if (p.sample_blocks && n.ro.n > 0 && n.ro.ax[0]->sample)
    n.sample_runs = n.R / n.ro.ax[0]->extent;
  return n;
}

// NB: per-sample blocks (SyncBatchNorm, issue #13). When a plan asks for them and its batch
// axis N is the outermost reduce axis (NCHW, NHWC, channels-last), no block holds elements of
// two samples: a block is a run of one sample (or a chunk of it), or rows of one sample. A
// process holding samples [a, b) of a batch then computes exactly the blocks a single process
// computes for those samples, and merging every process's blocks in global order gives the
// single process's bits. BatchNorm asks for them when a sample's share of a channel has at
// least kSampleBlockMin elements: below that the per-block cost (a horizontal sum and a
// merge, ~15 ns) would show.
inline constexpr Index kSampleBlockMin = 1024;

/// Row-mode blocks of one slot: `chunks` blocks per run (runs longer than kBlockElements), or
/// `rpb` whole runs per block (per sample: `bps` blocks of each sample's `per_sample` runs).
struct RowBlocks {
  Index chunks = 1;
  Index rpb = 1;
  Index count = 1;
  Index per_sample = 0;
  Index bps = 1;
};

inline RowBlocks row_blocks(const Nest& n) {
  RowBlocks b;
  if (n.L > kBlockElements) {
    // Each run is in one sample: chunks never straddle samples.
    b.chunks = (n.L + kBlockElements - 1) / kBlockElements;
    b.count = n.R * b.chunks;
    b.per_sample = n.sample_runs;
  } else {
    b.rpb = std::max<Index>(1, kBlockElements / std::max<Index>(1, n.L));
    if (n.sample_runs > 0) {
      b.per_sample = n.sample_runs;
      b.rpb = std::min(b.rpb, b.per_sample);
      b.bps = (b.per_sample + b.rpb - 1) / b.rpb;
      b.count = (n.R / b.per_sample) * b.bps;
    } else {
      b.count = (n.R + b.rpb - 1) / b.rpb;
    }
  }
  return b;
}

/// The sample of block b (per-sample blocks), or b itself (no samples: every block alone).
NORMKIT_ALWAYS_INLINE Index sample_of(const RowBlocks& bl, Index b) {
  if (bl.per_sample == 0)
    return b;
  if (bl.chunks > 1)
    return (b / bl.chunks) / bl.per_sample;
  return b / bl.bps;
}

/// Runs [r0, r1) of block b (whole-run blocks).
NORMKIT_ALWAYS_INLINE void block_runs(const RowBlocks& bl, Index R, Index b, Index& r0, Index& r1) {
  if (bl.per_sample > 0) {
    const Index s = b / bl.bps, k = b % bl.bps;
    r0 = s * bl.per_sample + k * bl.rpb;
    r1 = std::min(r0 + bl.rpb, (s + 1) * bl.per_sample);
  } else {
    r0 = b * bl.rpb;
    r1 = std::min(R, r0 + bl.rpb);
  }
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
  if (ro.n == 0) {  // one run
    f(ko.offset, n.L, Index{1}, Index{0});
    return;
  }
  Index r0, r1;
  block_runs(bl, n.R, b, r0, r1);
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

/// A partial reduction of n elements: moments (a = mean, b = M2, the sum of squared
/// deviations) or backward sums (a = sum dy, b = sum dy * (x - mean)).
struct Part {
  double a = 0, b = 0;
  Index n = 0;
};

/// A block's moments from its shifted sums s1 = sum(x - c), s2 = sum((x - c)^2).
///
/// NB: "shifted data" moments (Chan, Golub & LeVeque 1983), in double, with c = the block's
/// first element: M2 = s2 - s1^2/n loses at most a factor ((mean - c)/sigma)^2 <= n of
/// relative precision to cancellation -- one element at distance D from the mean forces
/// sigma^2 >= D^2/n -- i.e. < 1e-10 relative error for a million elements in double, far
/// below float rounding; for ordinary data the factor is O(1). It reads memory once (two
/// passes read it twice), needs no division per element (Welford does), and in double cannot
/// overflow for any finite float input (|x| ~ 1e20 squares to 1e40). E[x^2] - E[x]^2 without
/// the shift is the classic failure (#40308). A tiny negative M2 is rounding residue of the
/// shift and is clamped; NaN stays NaN; an infinite s2 with a finite s1 (double input beyond
/// 1e154) is an infinite M2.
NORMKIT_NOINLINE inline Part block_moments(double c, double s1, double s2, Index count) {
  Part p;
  p.n = count;
  if (count == 0)
    return p;
  const double d = s1 / static_cast<double>(count);
  double m2 = s2 - s1 * d;
  if (m2 < 0)
    m2 = 0;
  if (std::isinf(s2) && std::isfinite(s1))
    m2 = s2;
  p.a = c + d;
  p.b = m2;
  return p;
}

/// acc <- acc merged with p, in that order: Chan's formula for moments (blocks shifted
/// differently merge exactly in algebra, and the same way in every process), plain sums for
/// backward sums. Not inlined, so that every caller rounds alike.
NORMKIT_NOINLINE inline void merge_part(bool moments, Part& acc, const Part& p) {
  if (!moments) {
    acc.a += p.a;
    acc.b += p.b;
    acc.n += p.n;
    return;
  }
  if (p.n == 0)
    return;
  if (acc.n == 0) {
    acc = p;
    return;
  }
  const double na = static_cast<double>(acc.n), nb = static_cast<double>(p.n);
  const double n = na + nb;
  const double d = p.a - acc.a;
  acc.a = acc.a + d * (nb / n);
  acc.b = acc.b + p.b + d * d * (na * (nb / n));
  acc.n += p.n;
}

/// Folds block partials in block order, per sample first: acc = ((s0 ⊕ s1) ⊕ s2) ... with
/// each sample's s = (its first block ⊕ its second ...). A sample's partial is then the same
/// whether one process or several compute the batch (SyncBatchNorm exchanges them); without
/// samples every block is its own and this is the plain fold.
struct Folder {
  bool moments;
  Part acc, cur;
  Index cur_sample = -1;
  void add(Index sample, const Part& p) {
    if (sample != cur_sample) {
      if (cur_sample >= 0)
        merge_part(moments, acc, cur);
      cur = Part{};
      cur_sample = sample;
    }
    merge_part(moments, cur, p);
  }
  /// The fold so far; the folder starts over.
  Part done() {
    if (cur_sample >= 0)
      merge_part(moments, acc, cur);
    const Part r = acc;
    acc = cur = Part{};
    cur_sample = -1;
    return r;
  }
};

/// What a reduction sums, per slot:
///  - moments (dy null): mean and M2, each block shifted by its first element;
///  - backward sums: s1 = sum(dy), s2 = sum(dy * (x - c)), c = center[slot] (the mean the
///    forward used).
template <class T>
struct SumOp {
  const Leaves<T>* leaf;
  const T* x;
  const T* dy;           // null: moments
  const double* center;  // backward sums only (per slot)

  bool moments() const { return dy == nullptr; }
  /// Run r (at off + r*stride) into st[r * st_step] with shift c[r * c_step].
  void rows(Index off,
            Index len,
            Index count,
            Index stride,
            const double* c,
            Index c_step,
            RowAcc* st,
            Index st_step) const {
    if (dy) {
      leaf->grad_rows(x + off, dy + off, len, count, stride, c, c_step, st, st_step);
    } else {
      leaf->mom_rows(x + off, len, count, stride, c, c_step, st, st_step);
    }
  }
  /// Rows of consecutive slots (column mode), column j shifted by c[j].
  void cols(Index off,
            Index row_stride,
            Index rows,
            Index len,
            const double* c,
            double* s1,
            double* s2) const {
    if (dy) {
      leaf->grad_cols(x + off, dy + off, row_stride, rows, len, c, s1, s2);
    } else {
      leaf->mom_cols(x + off, row_stride, rows, len, c, s1, s2);
    }
  }
};

/// Block b of the slot group at `ko`, from a fresh accumulator.
template <class T>
Part row_block(
    const Nest& n, const RowBlocks& bl, const SumOp<T>& op, const Odometer& ko, Index b) {
  RowAcc st{};
  double shift = 0;
  Index count = 0;
  const bool mom = op.moments();
  for_block_runs(n, bl, ko, b, [&](Index off, Index len, Index cnt, Index stride) {
    if (count == 0 && mom)
      shift = static_cast<double>(op.x[off]);
    op.rows(off, len, cnt, stride, mom ? &shift : op.center + ko.slot, 0, &st, 0);
    count += len * cnt;
  });
  double s1, s2;
  finish_acc(st, s1, s2);
  return mom ? block_moments(shift, s1, s2, count) : Part{s1, s2, count};
}

/// Every block of the slot group at `ko`, merged in block order (per sample first).
template <class T>
Part row_group(const Nest& n, const RowBlocks& bl, const SumOp<T>& op, const Odometer& ko) {
  Folder f{op.moments(), {}, {}};
  for (Index b = 0; b < bl.count; ++b) f.add(sample_of(bl, b), row_block(n, bl, op, ko, b));
  return f.done();
}

inline Index slot_of_group(const Nest& n, Index t) {
  Odometer ko = n.ko;
  ko.seek(t);
  return ko.slot;
}

/// Column-mode geometry: tiles of at most kMaxColumnTile slots, blocks of rows (per sample:
/// `bps` blocks of each sample's `per_sample` rows).
struct ColBlocks {
  Index tile_w = 1, tiles = 1, rpb = 1, count = 1;
  Index per_sample = 0, bps = 1;
};

// At least this many rows per column block: each block costs every column a merge (Chan's
// formula, two divisions), which at 16 rows (kBlockElements over 1024 columns) took a quarter
// of BatchNorm1d (256, 1024)'s statistics pass (perf). Wide tiles are split by columns for
// threads (reduce()), so longer blocks cost no parallelism.
inline constexpr Index kMinColumnRows = 128;

inline ColBlocks col_blocks(const Nest& n) {
  ColBlocks c;
  c.tile_w = std::max<Index>(1, std::min(n.L, kMaxColumnTile));
  c.tiles = (n.L + c.tile_w - 1) / c.tile_w;
  c.rpb = std::max<Index>(kMinColumnRows, kBlockElements / c.tile_w);
  if (n.sample_runs > 0) {
    c.per_sample = n.sample_runs;
    c.rpb = std::min(c.rpb, c.per_sample);
    c.bps = (c.per_sample + c.rpb - 1) / c.rpb;
    c.count = (n.R / c.per_sample) * c.bps;
  } else {
    c.count = (n.R + c.rpb - 1) / c.rpb;
  }
  return c;
}

/// Column mode: rows of block b for columns [j0, j0 + jw) of column tile `tile` of slot group
/// t (clipped to the tile), into fresh s1, s2 (moments: each column shifted by its value in the
/// block's first row, kept in `shift`). Returns the block's row count.
template <class T>
Index col_block(const Nest& n,
                const ColBlocks& cb,
                const SumOp<T>& op,
                Index t,
                Index tile,
                Index b,
                Index j0,
                Index jw,
                double* s1,
                double* s2,
                double* shift) {
  Odometer ko = n.ko, ro = n.ro;
  ko.seek(t);
  const Index c0 = tile * cb.tile_w + j0;
  const Index ct = std::min(jw, std::min(cb.tile_w, n.L - tile * cb.tile_w) - j0);
  std::fill(s1, s1 + ct, 0.0);
  std::fill(s2, s2 + ct, 0.0);
  const bool mom = op.moments();
  const double* c = mom ? shift : op.center + ko.slot + c0;
  if (ro.n == 0) {
    if (mom) {
      for (Index j = 0; j < ct; ++j) shift[j] = static_cast<double>(op.x[ko.offset + c0 + j]);
    }
    op.cols(ko.offset + c0, 0, 1, ct, c, s1, s2);
    return 1;
  }
  Index r0, r1;
  block_runs(RowBlocks{1, cb.rpb, cb.count, cb.per_sample, cb.bps}, n.R, b, r0, r1);
  const Index rows = r1 - r0;
  ro.seek(r0);
  if (mom) {
    const Index first = ko.offset + ro.offset + c0;
    for (Index j = 0; j < ct; ++j) shift[j] = static_cast<double>(op.x[first + j]);
  }
  const Index stride = ro.ax[static_cast<std::size_t>(ro.n - 1)]->stride;
  while (r0 < r1) {
    const Index cnt = std::min(r1 - r0, ro.inner_room());
    op.cols(ko.offset + ro.offset + c0, stride, cnt, ct, c, s1, s2);
    r0 += cnt;
    if (r0 < r1)
      ro.advance(cnt);
  }
  return rows;
}

/// Column ranges handed to one thread: a multiple of every kernel copy's column strip
/// (kernels/leaves.hpp: 64, 16 or 8 columns), so a column is summed by the same instructions
/// wherever a range starts.
inline constexpr Index kColumnChunk = 64;

/// Computes, for every slot s of the plan, out[s]: the op's moments or sums over the slot's
/// elements (plan slot order; overwritten). Blocks are fixed by the shape and merged in
/// block order, whatever the executor.
template <class T>
void reduce(const Plan& p, const SumOp<T>& op, Part* out, const Exec& ex) {
  const bool mom = op.moments();
  if (p.numel == 0) {
    std::fill(out, out + p.slots, Part{});
    return;
  }
  const Nest n = split(p);
  const bool parallel = ex.parallel(p.numel);
  if (!p.column_mode()) {
    const RowBlocks bl = row_blocks(n);
    auto groups = [&](Index first, Index last) {
      Odometer ko = n.ko;
      ko.seek(first);
      for (Index t = first; t < last; ++t, ko.next()) out[ko.slot] = row_group(n, bl, op, ko);
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
    std::vector<Part> part(static_cast<std::size_t>(n.T * bl.count));
    run_ranges(ex, n.T * bl.count, items_for(ex, n.T * bl.count), [&](Index first, Index last) {
      Odometer ko = n.ko;
      for (Index it = first; it < last; ++it) {
        ko.seek(it / bl.count);
        part[static_cast<std::size_t>(it)] = row_block(n, bl, op, ko, it % bl.count);
      }
    });
    for (Index t = 0; t < n.T; ++t) {
      Folder f{mom, {}, {}};
      for (Index b = 0; b < bl.count; ++b)
        f.add(sample_of(bl, b), part[static_cast<std::size_t>(t * bl.count + b)]);
      out[slot_of_group(n, t)] = f.done();
    }
    return;
  }
  // Column mode.
  const ColBlocks cb = col_blocks(n);
  const Index G = n.T * cb.tiles;
  const auto tw = static_cast<std::size_t>(cb.tile_w);
  // The sample of block b (per-sample blocks), or b.
  auto col_sample = [&](Index b) { return cb.per_sample > 0 ? b / cb.bps : b; };
  // Block b's sums of ct columns (p1, p2; shifts sh) into the columns' folders.
  auto fold_block = [&](Folder* fold, Index ct, Index b, const double* p1, const double* p2,
                        const double* sh, Index rows) {
    for (Index j = 0; j < ct; ++j) {
      fold[j].add(col_sample(b),
                  mom ? block_moments(sh[j], p1[j], p2[j], rows) : Part{p1[j], p2[j], rows});
    }
  };
  // Columns [j0, j0 + jw) of tile group g: every block in block order, each column's blocks
  // folded into its own folder, then written to its slot. Columns never mix, so how a group's
  // columns are split into ranges changes no result.
  auto columns = [&](Index g, Index j0, Index jw, double* buf, Folder* fold) {
    const Index c0 = (g % cb.tiles) * cb.tile_w;
    const Index ct = std::min(jw, std::min(cb.tile_w, n.L - c0) - j0);
    if (ct <= 0)
      return;
    double *p1 = buf, *p2 = buf + jw, *sh = buf + 2 * jw;
    for (Index j = 0; j < ct; ++j) fold[j] = Folder{mom, {}, {}};
    for (Index b = 0; b < cb.count; ++b) {
      const Index rows = col_block(n, cb, op, g / cb.tiles, g % cb.tiles, b, j0, jw, p1, p2, sh);
      fold_block(fold, ct, b, p1, p2, sh, rows);
    }
    const Index s = slot_of_group(n, g / cb.tiles) + c0 + j0;
    for (Index j = 0; j < ct; ++j) out[s + j] = fold[j].done();
  };
  auto groups = [&](Index first, Index last) {
    std::vector<double> buf(3 * tw);
    std::vector<Folder> fold(tw);
    for (Index g = first; g < last; ++g) columns(g, 0, cb.tile_w, buf.data(), fold.data());
  };
  if (!parallel || cb.count == 1 || G >= Index{4} * ex.threads) {
    if (!parallel) {
      groups(0, G);
    } else {
      run_ranges(ex, G, items_for(ex, G), groups);
    }
    return;
  }
  // Few groups of many columns (BatchNorm1d (N, C), channels-last with C >= 128): column
  // ranges side by side, each thread folding its own columns through every block. (Blocks
  // side by side, below, leave a serial merge of blocks x columns partials: BatchNorm1d
  // (256, 1024) ran slower on 2 threads than on 1.)
  const Index chunks = (cb.tile_w + kColumnChunk - 1) / kColumnChunk;
  if (chunks >= 2) {
    const Index want = items_for(ex, G * chunks);
    const Index per = std::max<Index>(1, (G * chunks) / want);  // chunks per item
    const Index cw = per * kColumnChunk;
    const Index ipg = (chunks + per - 1) / per;  // items per group
    run_ranges(ex, G * ipg, items_for(ex, G * ipg), [&](Index first, Index last) {
      std::vector<double> buf(3 * static_cast<std::size_t>(cw));
      std::vector<Folder> fold(static_cast<std::size_t>(cw));
      for (Index it = first; it < last; ++it)
        columns(it / ipg, (it % ipg) * cw, cw, buf.data(), fold.data());
    });
    return;
  }
  // Few columns: blocks side by side, their partials merged in block order after.
  std::vector<double> part(static_cast<std::size_t>(G * cb.count) * 3 * tw);
  std::vector<Index> rows(static_cast<std::size_t>(G * cb.count));
  run_ranges(ex, G * cb.count, items_for(ex, G * cb.count), [&](Index first, Index last) {
    for (Index it = first; it < last; ++it) {
      double* buf = part.data() + static_cast<std::size_t>(it) * 3 * tw;
      const Index g = it / cb.count;
      rows[static_cast<std::size_t>(it)] =
          col_block(n, cb, op, g / cb.tiles, g % cb.tiles, it % cb.count, 0, cb.tile_w, buf,
                    buf + tw, buf + 2 * tw);
    }
  });
  std::vector<Folder> fold(tw, Folder{mom, {}, {}});
  for (Index g = 0; g < G; ++g) {
    const Index c0 = (g % cb.tiles) * cb.tile_w;
    const Index ct = std::min(cb.tile_w, n.L - c0);
    for (Index b = 0; b < cb.count; ++b) {
      const std::size_t it = static_cast<std::size_t>(g * cb.count + b);
      const double* p1 = part.data() + it * 3 * tw;
      fold_block(fold.data(), ct, b, p1, p1 + tw, p1 + 2 * tw, rows[it]);
    }
    const Index s = slot_of_group(n, g / cb.tiles) + c0;
    for (Index j = 0; j < ct; ++j) out[s + j] = fold[static_cast<std::size_t>(j)].done();
  }
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_REDUCTION_HPP_
