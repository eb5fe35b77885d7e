// normkit/detail/plan.hpp: the view -- any norm's tensor as a short loop nest of statistic
// slots and reduced axes. Pure index arithmetic, no data.
// SPDX-License-Identifier: MIT
#ifndef NORMKIT_DETAIL_PLAN_HPP_
#define NORMKIT_DETAIL_PLAN_HPP_
// IWYU pragma: private, include <normkit/normkit.hpp>

#include <array>  // std::array

#include <normkit/config.hpp>

NORMKIT_BEGIN_NAMESPACE
namespace detail {

// NB: the view. Every normalization is "statistics per slot over a strided view". A norm
// describes the input as a list of logical axes, each either a *key* axis (it selects the
// statistic slot: C for BatchNorm, (N, C) for InstanceNorm, (N, G) for GroupNorm, the
// leading dims for LayerNorm) or a *reduce* axis (it is summed over). Each axis may also
// step an *aux* index: the per-element coefficient a kernel needs besides the slot's own
// (LayerNorm's gamma/beta position, GroupNorm's channel inside a group, a row's mean when
// LayerNorm reduces dgamma over rows).
//
// make_plan() sorts the axes by memory stride (outer to inner), drops extent-1 axes and
// coalesces neighbours that step memory, slot and aux indices consistently. What is left is
// ATen's TensorIterator idea in miniature: a short loop nest whose innermost axis is
// contiguous. If that axis is a reduce axis the kernels run in *row mode* (one slot per
// contiguous run: NCHW BatchNorm, LayerNorm, InstanceNorm); if it is a key axis they run in
// *column mode* (a contiguous run covers consecutive slots: BatchNorm1d (N, C), channels-last,
// most ColMajor layouts).
//
// Slots are numbered in memory order of the key axes (innermost key axis has slot stride 1),
// so that column-mode runs always read consecutive slots. Callers map their logical slot
// index (n, c) to the plan's numbering with logical_slot_stride.

inline constexpr int kMaxAxes = 12;

enum class Role : unsigned char { reduce, key };

/// One logical axis as a norm describes it.
struct AxisSpec {
  Index extent = 1;
  Index stride = 0;  // memory stride, in elements
  Role role = Role::reduce;
  Index aux_stride = 0;  // step of the auxiliary index (0: the axis does not move it)
  bool sample = false;   // the batch axis N (never coalesced with the axis inside it)
};

/// One axis of the coalesced loop nest.
struct LoopAxis {
  Index extent = 1;
  Index stride = 0;
  Index slot_stride = 0;  // 0 on reduce axes
  Index aux_stride = 0;
  Role role = Role::reduce;
  bool sample = false;
};

struct Plan {
  std::array<LoopAxis, kMaxAxes> axes{};  // outer -> inner; axes[rank - 1] is contiguous
  int rank = 0;
  Index numel = 0;
  Index slots = 1;     // number of statistic slots (product of key extents)
  Index per_slot = 1;  // elements reduced into one slot (product of reduce extents)
  std::array<Index, kMaxAxes> logical_slot_stride{};  // per input AxisSpec
  /// Blocks of the reduction never straddle two samples (reduction.hpp: per-sample blocks).
  bool sample_blocks = false;

  const LoopAxis& inner() const { return axes[static_cast<std::size_t>(rank - 1)]; }
  bool column_mode() const { return inner().role == Role::key; }
};

/// Builds the loop nest for `n` logical axes. The tensor must be dense (the strides of
/// the axes with extent > 1 form a permutation of a contiguous layout).
inline Plan make_plan(const AxisSpec* spec, int n) {
  NORMKIT_ASSERT(n <= kMaxAxes);
  Plan p;
  p.numel = 1;
  std::array<int, kMaxAxes> order{};
  int m = 0;
  for (int a = 0; a < n; ++a) {
    const AxisSpec& s = spec[a];
    p.numel *= s.extent;
    if (s.role == Role::key) {
      p.slots *= s.extent;
    } else {
      p.per_slot *= s.extent;
    }
    if (s.extent != 1)
      order[static_cast<std::size_t>(m++)] = a;
  }
  // Outer to inner: decreasing stride. Stable, so equal strides (only possible for
  // zero-size tensors, which callers never plan) keep their logical order.
  // (Insertion sort: at most kMaxAxes entries, and std::stable_sort allocates a buffer --
  // a visible share of a tiny tensor's call.)
  for (int i = 1; i < m; ++i) {
    const int a = order[static_cast<std::size_t>(i)];
    int j = i;
    for (; j > 0 && spec[order[static_cast<std::size_t>(j - 1)]].stride < spec[a].stride; --j)
      order[static_cast<std::size_t>(j)] = order[static_cast<std::size_t>(j - 1)];
    order[static_cast<std::size_t>(j)] = a;
  }
  // Slot strides in memory order: innermost key axis first.
  Index slot_stride = 1;
  std::array<Index, kMaxAxes> sstride{};
  for (int i = m - 1; i >= 0; --i) {
    const int a = order[static_cast<std::size_t>(i)];
    if (spec[a].role == Role::key) {
      sstride[static_cast<std::size_t>(i)] = slot_stride;
      p.logical_slot_stride[static_cast<std::size_t>(a)] = slot_stride;
      slot_stride *= spec[a].extent;
    }
  }
  // Coalesce from the outside in.
  for (int i = 0; i < m; ++i) {
    const AxisSpec& s = spec[order[static_cast<std::size_t>(i)]];
    LoopAxis ax{s.extent,     s.stride, sstride[static_cast<std::size_t>(i)],
                s.aux_stride, s.role,   s.sample};
    if (p.rank > 0) {
      LoopAxis& o = p.axes[static_cast<std::size_t>(p.rank - 1)];
      if (!o.sample && !ax.sample && o.role == ax.role && o.stride == ax.stride * ax.extent &&
          o.slot_stride == ax.slot_stride * ax.extent &&
          o.aux_stride == ax.aux_stride * ax.extent) {
        o.extent *= ax.extent;
        o.stride = ax.stride;
        o.slot_stride = ax.slot_stride;
        o.aux_stride = ax.aux_stride;
        continue;
      }
    }
    p.axes[static_cast<std::size_t>(p.rank++)] = ax;
  }
  if (p.rank == 0) {  // a single element: one run of length 1
    p.axes[0] = LoopAxis{1, 1, 0, 0, Role::reduce, false};
    p.rank = 1;
  }
  return p;
}

/// Walks a list of loop axes (outer -> inner) in row-major order of their indices and
/// keeps the memory, slot and aux offsets of the current position.
struct Odometer {
  std::array<const LoopAxis*, kMaxAxes> ax{};
  std::array<Index, kMaxAxes> idx{};
  int n = 0;
  Index offset = 0, slot = 0, aux = 0;

  void add(const LoopAxis& a) { ax[static_cast<std::size_t>(n++)] = &a; }
  Index size() const {
    Index s = 1;
    for (int i = 0; i < n; ++i) s *= ax[static_cast<std::size_t>(i)]->extent;
    return s;
  }
  /// Positions at linear index 0 (no division).
  void reset() {
    offset = slot = aux = 0;
    idx.fill(0);
  }
  /// Positions at linear index `k` (row-major over the axes). Costs a division per axis:
  /// hot loops seek once per work range and step with next().
  void seek(Index k) {
    if (k == 0) {
      reset();
      return;
    }
    offset = slot = aux = 0;
    for (int i = n - 1; i >= 0; --i) {
      const LoopAxis& a = *ax[static_cast<std::size_t>(i)];
      const Index j = k % a.extent;
      k /= a.extent;
      idx[static_cast<std::size_t>(i)] = j;
      offset += j * a.stride;
      slot += j * a.slot_stride;
      aux += j * a.aux_stride;
    }
  }
  /// Steps `k` positions along the innermost axis, which must not wrap (k <= extent - idx).
  void advance_inner(Index k) {
    const LoopAxis& a = *ax[static_cast<std::size_t>(n - 1)];
    idx[static_cast<std::size_t>(n - 1)] += k;
    offset += k * a.stride;
    slot += k * a.slot_stride;
    aux += k * a.aux_stride;
  }
  /// Steps `k` positions (any k >= 0): the innermost axis first, carrying as next() does.
  void advance(Index k) {
    if (n == 0 || k == 0)
      return;
    const LoopAxis& a = *ax[static_cast<std::size_t>(n - 1)];
    while (k > 0) {
      const Index room = a.extent - idx[static_cast<std::size_t>(n - 1)];
      if (k < room) {
        advance_inner(k);
        return;
      }
      advance_inner(room - 1);
      next();
      k -= room;
    }
  }
  /// Positions left on the innermost axis, counting the current one.
  Index inner_room() const {
    return ax[static_cast<std::size_t>(n - 1)]->extent - idx[static_cast<std::size_t>(n - 1)];
  }
  void next() {
    for (int i = n - 1; i >= 0; --i) {
      const LoopAxis& a = *ax[static_cast<std::size_t>(i)];
      Index& j = idx[static_cast<std::size_t>(i)];
      offset += a.stride;
      slot += a.slot_stride;
      aux += a.aux_stride;
      if (++j < a.extent)
        return;
      offset -= a.extent * a.stride;
      slot -= a.extent * a.slot_stride;
      aux -= a.extent * a.aux_stride;
      j = 0;
    }
  }
};

}  // namespace detail
NORMKIT_END_NAMESPACE

#endif  // NORMKIT_DETAIL_PLAN_HPP_
