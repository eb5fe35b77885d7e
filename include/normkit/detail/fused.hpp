// normkit/detail/fused.hpp: statistics and apply of one slot group while its data is in
// cache -- the reduction core's blocks, then the apply step, slot group by slot group.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_FUSED_HPP_
#define NORMKIT_DETAIL_FUSED_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>  // std::min

#include <normkit/config.hpp>
#include <normkit/detail/apply.hpp>
#include <normkit/detail/exec.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

// NB: cache-resident fusion. When one slot's elements fit comfortably in L2 (a LayerNorm
// row, an InstanceNorm plane, a GroupNorm group, a BatchNorm channel of a small batch), the
// forward pass computes the slot's statistics and normalizes it right away, while its data
// is still in cache: memory traffic drops from 3B (stats pass + normalize pass) to 2B. The
// statistics use the very same blocks and merge order as reduce() (row_block), so a fused
// call returns bit-for-bit what the two-pass path returns, whatever the thread count. Slots
// larger than kFuseElements, column-mode plans, and few-slot tensors on a thread pool (which
// need a slot split across threads) take the two-pass path.
// NB: 128 Ki elements (512 KiB of floats; backward keeps x and dy) stay within a 2 MiB L2
// per core; measured on the 2-vCPU Xeon: 1<<17 vs 1<<16 took the (32, 64, 56, 56)
// BatchNorm training forward from 3.1 to 2.5 ms and backward from 5.1 to 3.7 ms, and changed
// nothing else. On smaller L2s the slot falls to L3, still one DRAM pass.
inline constexpr Index kFuseElements = Index{1} << 17;
// Slots per block on the channel-block path of fused_slots (see there).
inline constexpr Index kChannelBlock = 16;
// Row batches (fused_slots): at most this many one-run slots, and about this many elements
// (32 KiB of floats, within L1), per batch.
inline constexpr Index kRowBatch = 32;
inline constexpr Index kRowBatchElements = Index{1} << 13;

/// Whether fused_slots() applies to this pair of plans on this executor.
inline bool can_fuse(const Plan& ps, const Plan& pa, const Exec& ex) {
  if (ps.numel == 0 || ps.column_mode() || pa.column_mode() || ps.per_slot > kFuseElements)
    return false;
  Index groups = 1;
  for (int i = 0; i + 1 < ps.rank; ++i) {
    if (ps.axes[static_cast<std::size_t>(i)].role == Role::key)
      groups *= ps.axes[static_cast<std::size_t>(i)].extent;
  }
  return !(ex.parallel(ps.numel) && groups < Index{2} * ex.threads);
}

/// Applies `apply` to every run of the slot group at `ka` of nest na.
template <class T>
void apply_group(const Nest& na, const Odometer& ka, const ApplyOp<T>& apply) {
  if (na.ro.n == 0) {
    apply.batch(false, ka.offset, na.L, 1, 0, ka.slot, 0, ka.aux, 0, na.aux_step);
    return;
  }
  Odometer ro = na.ro;
  ro.reset();
  const LoopAxis& in = *ro.ax[static_cast<std::size_t>(ro.n - 1)];
  for (Index r = 0; r < na.R;) {
    const Index cnt = ro.inner_room();
    apply.batch(false, ka.offset + ro.offset, na.L, cnt, in.stride, ka.slot, 0, ka.aux + ro.aux,
                in.aux_stride, na.aux_step);
    r += cnt;
    if (r < na.R)
      ro.advance(cnt);
  }
}

/// The per-slot callback of fused_slots(), by reference (one instantiation of fused_slots
/// per scalar type, whatever the callers' lambdas): finish(ctx, slot, part) turns a slot's
/// reduction (moments or backward sums, as reduce() computes them) into the coefficients the
/// apply op reads.
struct SlotHooks {
  void (*finish)(void* ctx, Index slot, const Part& part) = nullptr;
  void* ctx = nullptr;
};
template <class F>
SlotHooks make_hooks(F& f) {
  SlotHooks h;
  h.finish = [](void* c, Index s, const Part& p) { (*static_cast<F*>(c))(s, p); };
  h.ctx = &f;
  return h;
}

/// Reduction over `ps` and apply over `pa` (same key axes; pa may carry aux strides), slot
/// group by slot group: hooks.finish(slot, part) gets the slot's reduction (same blocks and
/// order as reduce()) and sets the coefficients the apply op reads. Call only when
/// can_fuse().
template <class T>
void fused_slots(const Plan& ps,
                 const Plan& pa,
                 const SumOp<T>& rop,
                 const SlotHooks& hooks,
                 const ApplyOp<T>& apply_in,
                 const Exec& ex) {
  const ApplyOp<T> apply = apply_in.streaming_for(pa.numel);
  auto finish = [&](Index s, const Part& part) { hooks.finish(hooks.ctx, s, part); };
  const bool mom = rop.moments();
  const Nest ns = split(ps);
  const Nest na = split(pa);
  NORMKIT_ASSERT(ns.T == na.T);
  const RowBlocks bl = row_blocks(ns);
  // NB: channel blocks. When a slot is many short runs and neighbouring slots' runs are
  // adjacent in memory (NCHW BatchNorm with small H*W: a (64, 512, 7, 7) channel is 64
  // runs of 196 bytes, 100 KB apart), slots go kChannelBlock at a time: for each n, the
  // block's runs form one contiguous stretch, read in memory order (the prefetchers follow
  // it; one slot at a time they see 196-byte islands). Each slot keeps its own accumulator
  // and adds its runs in the same order as row_block: the same bits.
  //
  // NB: row batches. When every slot is one run (a LayerNorm or RMSNorm row, an InstanceNorm
  // plane), the same walk takes up to kRowBatch neighbouring slots at a time: one leaf call
  // for their statistics, their finishes back to back, one leaf call for their apply. One
  // slot at a time, each row's chain (statistics -> horizontal sum -> sqrt and division ->
  // apply) ran serially and cost ~55 ns per row besides its elements (perf: a quarter of a
  // (256, 768) LayerNorm); batched, the finishes of neighbouring rows overlap. The batch
  // stays within L1 (kRowBatchElements), so the apply still reads cached data.
  // Both take slots kb at a time along the one key axis, each slot in one block.
  const bool slot_blocks = bl.count == 1 && ns.ko.n == 1 && na.ko.n == 1 && na.L == ns.L;
  const bool channel_blocks = slot_blocks && ns.R > 1 && ns.L <= kShortRunElements &&
                              ns.ro.n == 1 && na.ro.n == 1 && ns.ko.ax[0]->stride == ns.L &&
                              na.ko.ax[0]->stride == na.L;
  const Index row_batch = std::min(kRowBatch, kRowBatchElements / std::max<Index>(1, ns.L));
  const bool row_batches = slot_blocks && ns.ro.n == 0 && na.ro.n == 0 && row_batch >= 2;
  auto groups = [&](Index first, Index last) {
    Odometer ks = ns.ko, ka = na.ko;
    ks.seek(first);
    ka.seek(first);
    if (channel_blocks || row_batches) {
      const Index kb = channel_blocks ? kChannelBlock : row_batch;
      const LoopAxis& kax = *ns.ko.ax[0];
      const LoopAxis& aax = *na.ko.ax[0];
      // Reduce-outer strides (none for one-run slots).
      const Index rs = channel_blocks ? ns.ro.ax[0]->stride : 0;
      const Index ra = channel_blocks ? na.ro.ax[0]->stride : 0;
      const Index ra_aux = channel_blocks ? na.ro.ax[0]->aux_stride : 0;
      for (Index t0 = first; t0 < last; t0 += kb) {
        const Index k = std::min(kb, last - t0);
        RowAcc st[kRowBatch] = {};
        // Each slot's one block: shifted by its first element (moments, as row_block does),
        // or by the slot's center (backward sums).
        double shift[kRowBatch];
        for (Index i = 0; i < k; ++i) {
          shift[i] = mom ? static_cast<double>(rop.x[ks.offset + i * kax.stride])
                         : rop.center[ks.slot + i * kax.slot_stride];
        }
        for (Index r = 0; r < ns.R; ++r)
          rop.rows(ks.offset + r * rs, ns.L, k, kax.stride, shift, 1, st, 1);
        const Index count = ns.R * ns.L;
        for (Index i = 0; i < k; ++i) {
          double s1, s2;
          finish_acc(st[i], s1, s2);
          Part acc;  // as row_group merges its one block
          merge_part(mom, acc, mom ? block_moments(shift[i], s1, s2, count) : Part{s1, s2, count});
          finish(ks.slot + i * kax.slot_stride, acc);
        }
        for (Index r = 0; r < na.R; ++r) {
          apply.batch(false, ka.offset + r * ra, na.L, k, aax.stride, ka.slot, aax.slot_stride,
                      ka.aux + r * ra_aux, aax.aux_stride, na.aux_step);
        }
        if (t0 + k < last) {
          ks.advance(k);
          ka.advance(k);
        }
      }
      return;
    }
    for (Index t = first; t < last; ++t, ks.next(), ka.next()) {
      const Part part = row_group(ns, bl, rop, ks);
      NORMKIT_ASSERT(ka.slot == ks.slot);
      finish(ks.slot, part);
      apply_group(na, ka, apply);
    }
  };
  if (ex.parallel(ps.numel)) {
    run_ranges(ex, ns.T, items_for(ex, ns.T), groups);
  } else {
    groups(0, ns.T);
  }
}

/// Forward: moments over `ps`, then apply over `pa`, per slot while it is in cache.
/// `finish(slot, mean, var)` must fill the apply op's coefficients of that slot. Returns false
/// (doing nothing) when fusion does not apply.
template <class T, class Finish>
bool fused_forward(const Plan& ps,
                   const Plan& pa,
                   const T* x,
                   Finish&& finish,
                   const ApplyOp<T>& apply,
                   const Exec& ex) {
  if (!can_fuse(ps, pa, ex))
    return false;
  auto fin = [&](Index s, const Part& p) { finish(s, p.a, variance(p)); };
  fused_slots<T>(ps, pa, SumOp<T>{apply.leaf, x, nullptr, nullptr}, make_hooks(fin), apply, ex);
  return true;
}

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_FUSED_HPP_
