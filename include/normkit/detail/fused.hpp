// normkit — normalization layers over Eigen tensors
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_FUSED_HPP_
#define NORMKIT_DETAIL_FUSED_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <algorithm>    // std::min
#include <type_traits>  // std::integral_constant

#include <normkit/config.hpp>
#include <normkit/detail/moments.hpp>
#include <normkit/detail/parallel.hpp>
#include <normkit/detail/plan.hpp>
#include <normkit/detail/reduction.hpp>

namespace normkit {
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
// per core; measured on the 2-vCPU Xeon (BENCHMARKS.md suite): 1<<17 vs 1<<16 took the
// (32, 64, 56, 56) BatchNorm training forward from 3.1 to 2.5 ms and backward from 5.1 to
// 3.7 ms, and changed nothing else. On smaller L2s the slot falls to L3, still one DRAM pass.
inline constexpr Index kFuseElements = Index{1} << 17;
// Slots per block on the channel-block path of fused_slots (see there).
inline constexpr Index kChannelBlock = 16;

/// Whether fused_slots() applies to this pair of plans on this device.
template <class T, class Device>
bool can_fuse(const Plan& ps, const Plan& pa, const Device& dev) {
  if (ps.numel == 0 || ps.column_mode() || pa.column_mode() || ps.per_slot > kFuseElements)
    return false;
  const int threads = device_threads(dev);
  const bool parallel = threads > 1 && ps.numel >= kMinParallelElements;
  Index groups = 1;
  for (int i = 0; i + 1 < ps.rank; ++i) {
    if (ps.axes[static_cast<std::size_t>(i)].role == Role::key)
      groups *= ps.axes[static_cast<std::size_t>(i)].extent;
  }
  return !(parallel && groups < Index{2} * threads);
}

/// fused_slots()'s default `begin`: nothing to prepare per slot.
struct NoBegin {
  void operator()(Index, Index) const {}
};

/// Reduction over `ps` and apply over `pa` (same key axes; pa may carry aux strides), slot
/// group by slot group: `finish(slot, s1, s2)` turns a slot's two sums (op's, same blocks and
/// order as reduce()) into the coefficients the apply op reads; `begin(slot, offset)` runs
/// first, with the memory offset of the slot's first element. Call only when can_fuse().
template <class T, class ReduceOp, class Finish, class ApplyOp, class Device, class Begin = NoBegin>
void fused_slots(const Plan& ps,
                 const Plan& pa,
                 const ReduceOp& rop,
                 Finish&& finish,
                 const ApplyOp& apply,
                 const Device& dev,
                 Begin&& begin = Begin()) {
  const reduction_impl::Nest ns = reduction_impl::split(ps);
  const reduction_impl::Nest na = reduction_impl::split(pa);
  NORMKIT_ASSERT(ns.T == na.T);
  const int threads = device_threads(dev);
  const bool parallel = threads > 1 && ps.numel >= kMinParallelElements;
  const Index B = (ns.R * ns.L + kBlockElements - 1) / kBlockElements;
  // NB: channel blocks. When a slot is many short runs and neighbouring slots' runs are
  // adjacent in memory (NCHW BatchNorm with small H*W: a (64, 512, 7, 7) channel is 64
  // runs of 196 bytes, 100 KB apart), slots go kChannelBlock at a time: for each n, the
  // block's runs form one contiguous stretch, read in memory order (the prefetchers follow
  // it; one slot at a time they see 196-byte islands). Each slot keeps its own accumulator
  // state and adds its runs in the same order as row_block: the same bits.
  const bool channel_blocks =
      B == 1 && ns.R > 1 && ns.L <= kShortRun && ns.ko.n == 1 && ns.ro.n == 1 && na.ko.n == 1 &&
      na.ro.n == 1 && ns.ko.ax[0]->stride == ns.L && na.ko.ax[0]->stride == na.L && na.L == ns.L;
  auto groups = [&](auto red_tag, auto aux_tag, Index first, Index last) {
    constexpr int kRedAux = decltype(red_tag)::value;
    constexpr int kAux = decltype(aux_tag)::value;
    Odometer ks = ns.ko, ka = na.ko, ro = na.ro;
    ks.seek(first);
    ka.seek(first);
    if (channel_blocks) {
      using State = typename ReduceOp::RowState;
      const LoopAxis& kax = *ns.ko.ax[0];
      const LoopAxis& aax = *na.ko.ax[0];
      for (Index t0 = first; t0 < last; t0 += kChannelBlock) {
        const Index k = std::min(kChannelBlock, last - t0);
        State st[kChannelBlock] = {};
        for (Index i = 0; i < k; ++i)
          begin(ks.slot + i * kax.slot_stride, ks.offset + i * kax.stride);
        Odometer rs = ns.ro;
        rs.reset();
        for (Index r = 0; r < ns.R; ++r, rs.next()) {
          for (Index i = 0; i < k; ++i) {
            rop.template row<kRedAux>(ks.offset + i * kax.stride + rs.offset, ns.L,
                                      ks.slot + i * kax.slot_stride,
                                      ks.aux + i * kax.aux_stride + rs.aux, ns.aux_step, st[i]);
          }
        }
        for (Index i = 0; i < k; ++i) {
          acc_t p1, p2, a1 = 0, a2 = 0;
          rop.finish(st[i], p1, p2);
          a1 += p1;  // as row_group merges its one block
          a2 += p2;
          finish(ks.slot + i * kax.slot_stride, a1, a2);
        }
        ro.reset();
        for (Index r = 0; r < na.R; ++r, ro.next()) {
          for (Index i = 0; i < k; ++i) {
            apply.template run<false, kAux>(ka.offset + i * aax.stride + ro.offset, na.L,
                                            ka.slot + i * aax.slot_stride,
                                            ka.aux + i * aax.aux_stride + ro.aux, na.aux_step);
          }
        }
        ks.seek(t0 + k < last ? t0 + k : 0);
        ka.seek(t0 + k < last ? t0 + k : 0);
      }
      return;
    }
    for (Index t = first; t < last; ++t, ks.next(), ka.next()) {
      acc_t a1, a2;
      begin(ks.slot, ks.offset);
      reduction_impl::row_group<kRedAux>(ns, rop, ks, B, a1, a2);
      NORMKIT_ASSERT(ka.slot == ks.slot);
      finish(ks.slot, a1, a2);
      ro.reset();
      for (Index r = 0; r < na.R; ++r, ro.next()) {
        apply.template run<false, kAux>(ka.offset + ro.offset, na.L, ka.slot, ka.aux + ro.aux,
                                        na.aux_step);
      }
    }
  };
  const double bytes = double(ps.per_slot) * 3.0 * sizeof(T);
  // Aux modes of the reduction (ps's inner aux step) and of the apply (pa's), as reduce()
  // and for_each_run() choose them.
  auto run = [&](auto red_tag) {
    auto go = [&](auto aux_tag) {
      parallel_for(dev, ns.T, bytes, parallel,
                   [&](Index first, Index last) { groups(red_tag, aux_tag, first, last); });
    };
    if (na.aux_step == 0) {
      go(std::integral_constant<int, 0>{});
    } else if (na.aux_step == 1) {
      go(std::integral_constant<int, 1>{});
    } else {
      go(std::integral_constant<int, 2>{});
    }
  };
  if (ns.aux_step == 0) {
    run(std::integral_constant<int, 0>{});
  } else if (ns.aux_step == 1) {
    run(std::integral_constant<int, 1>{});
  } else {
    run(std::integral_constant<int, 2>{});
  }
}

/// Forward: moments over `ps`, then apply over `pa`, per slot while it is in cache.
/// `finish(slot, mean, var)`. Returns false (doing nothing) when fusion does not apply.
template <class T, class Finish, class ApplyOp, class Device>
bool fused_forward(const Plan& ps,
                   const Plan& pa,
                   const T* x,
                   acc_t* center,
                   Finish&& finish,
                   const ApplyOp& apply,
                   const Device& dev) {
  if (!can_fuse<T>(ps, pa, dev))
    return false;
  const Index n = ps.per_slot;
  fused_slots<T>(
      ps, pa, MomentsOp<T>{x, center},
      [&](Index s, acc_t s1, acc_t s2) {
        acc_t mean, var;
        finish_moments(center[s], s1, s2, n, mean, var);
        finish(s, mean, var);
      },
      apply, dev,
      // The shift (MomentsOp): the slot's first element, read as the slot starts (a
      // separate pass over every slot's first line costs ~5% of a LayerNorm forward).
      [&](Index s, Index offset) { center[s] = static_cast<acc_t>(x[offset]); });
  return true;
}

}  // namespace detail
}  // namespace normkit

#endif  // NORMKIT_DETAIL_FUSED_HPP_
