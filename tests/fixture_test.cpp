// Replays every PyTorch fixture (tests/fixtures, written by tools/fixtures/gen_fixtures.cpp
// against libtorch 1.13) through the modules in RowMajor, ColMajor and channels-last storage.
#include <gtest/gtest.h>

#include "support/fixture_runner.hpp"

namespace {

using normkit_test::run_fixture_file;
using normkit_test::Storage;

class FixtureTest : public ::testing::TestWithParam<Storage> {};

TEST_P(FixtureTest, BatchNormMatchesPyTorch) {
  EXPECT_GE(run_fixture_file("batch_norm.txt", GetParam()), 80);
}
TEST_P(FixtureTest, InstanceNormMatchesPyTorch) {
  EXPECT_GE(run_fixture_file("instance_norm.txt", GetParam()), 60);
}
TEST_P(FixtureTest, LayerNormMatchesPyTorch) {
  EXPECT_GE(run_fixture_file("layer_norm.txt", GetParam()), 70);
}
TEST_P(FixtureTest, GroupNormMatchesPyTorch) {
  EXPECT_GE(run_fixture_file("group_norm.txt", GetParam()), 50);
}

INSTANTIATE_TEST_SUITE_P(
    Storage,
    FixtureTest,
    ::testing::Values(Storage::row_major, Storage::col_major, Storage::channels_last),
    [](const ::testing::TestParamInfo<Storage>& p) {
      return p.param == Storage::channels_last ? std::string("ChannelsLast")
                                               : std::string(normkit_test::storage_name(p.param));
    });

}  // namespace
