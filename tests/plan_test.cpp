// The view: logical axes -> coalesced loop nest, row vs column mode, memory-order slots.
#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

namespace {

using normkit::detail::AxisSpec;
using normkit::detail::make_plan;
using normkit::detail::Role;

TEST(PlanTest, BatchNormNchwIsRowModeOverSpatialRuns) {
  // (N, C, H, W) = (2, 3, 4, 5) row-major: reduce N, H, W; key C.
  const AxisSpec ax[4] = {{2, 60, Role::reduce, 0},
                          {3, 20, Role::key, 0},
                          {4, 5, Role::reduce, 0},
                          {5, 1, Role::reduce, 0}};
  const auto p = make_plan(ax, 4);
  EXPECT_EQ(p.rank, 3);  // N | C | (H*W) coalesced
  EXPECT_FALSE(p.column_mode());
  EXPECT_EQ(p.inner().extent, 20);
  EXPECT_EQ(p.slots, 3);
  EXPECT_EQ(p.per_slot, 40);
  EXPECT_EQ(p.numel, 120);
}

TEST(PlanTest, ChannelsLastIsColumnModeWithContiguousSlots) {
  // NHWC storage of logical (2, 3, 4, 5): strides N 60, C 1, H 15, W 3.
  const AxisSpec ax[4] = {{2, 60, Role::reduce, 0},
                          {3, 1, Role::key, 0},
                          {4, 15, Role::reduce, 0},
                          {5, 3, Role::reduce, 0}};
  const auto p = make_plan(ax, 4);
  EXPECT_EQ(p.rank, 2);  // (N*H*W) | C
  EXPECT_TRUE(p.column_mode());
  EXPECT_EQ(p.inner().extent, 3);
  EXPECT_EQ(p.inner().slot_stride, 1);
}

TEST(PlanTest, ColMajorInstanceNormCoalescesKeysInMemoryOrder) {
  // ColMajor (N, C, L) = (2, 3, 4): strides N 1, C 2, L 6; keys N and C.
  const AxisSpec ax[3] = {{2, 1, Role::key, 0}, {3, 2, Role::key, 0}, {4, 6, Role::reduce, 0}};
  const auto p = make_plan(ax, 3);
  EXPECT_EQ(p.rank, 2);  // L | (C*N) keys coalesced
  EXPECT_TRUE(p.column_mode());
  EXPECT_EQ(p.inner().extent, 6);
  // Logical (n, c) -> slot n * 1 + c * 2 (memory order).
  EXPECT_EQ(p.logical_slot_stride[0], 1);
  EXPECT_EQ(p.logical_slot_stride[1], 2);
}

TEST(PlanTest, AuxStridesBlockCoalescingWhenTheyDisagree) {
  // LayerNorm over ColMajor (M, D1, D2) = (3, 2, 4): the normalized dims step gamma in
  // row-major order (D1 by 4, D2 by 1) but memory in column-major order: no coalescing.
  const AxisSpec ax[3] = {{3, 1, Role::key, 0}, {2, 3, Role::reduce, 4}, {4, 6, Role::reduce, 1}};
  const auto p = make_plan(ax, 3);
  EXPECT_EQ(p.rank, 3);
  EXPECT_TRUE(p.column_mode());
}

TEST(PlanTest, SingleElementAndUnitAxes) {
  const AxisSpec ax[3] = {{1, 1, Role::key, 0}, {1, 1, Role::reduce, 0}, {1, 1, Role::reduce, 0}};
  const auto p = make_plan(ax, 3);
  EXPECT_EQ(p.rank, 1);
  EXPECT_EQ(p.numel, 1);
  EXPECT_EQ(p.slots, 1);
}

}  // namespace
