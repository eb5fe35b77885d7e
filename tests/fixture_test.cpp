// Replays every PyTorch fixture (tests/fixtures, written by tools/fixtures/gen_fixtures.cpp
// against libtorch 1.13) through the modules in RowMajor, ColMajor and channels-last storage,
// on every ISA level the CPU supports. Evaluation steps with running statistics also go through
// the free functions (batch_norm/instance_norm with saved statistics, then *_norm_backward),
// which must give the module's y and gradients exactly.
#include <tuple>

#include <gtest/gtest.h>

#include "support/fixture_runner.hpp"
#include "support/isa_param.hpp"

namespace {

using normkit_test::run_fixture_file;
using normkit_test::Storage;

class FixtureTest : public ::testing::TestWithParam<std::tuple<Storage, normkit::Isa>> {
 protected:
  Storage storage() const { return std::get<0>(GetParam()); }
  normkit_test::IsaScope isa_{std::get<1>(GetParam())};
};

TEST_P(FixtureTest, BatchNormMatchesPyTorch) {
  EXPECT_GE(run_fixture_file("batch_norm.txt", storage()), 80);
}
TEST_P(FixtureTest, InstanceNormMatchesPyTorch) {
  EXPECT_GE(run_fixture_file("instance_norm.txt", storage()), 60);
}
TEST_P(FixtureTest, LayerNormMatchesPyTorch) {
  EXPECT_GE(run_fixture_file("layer_norm.txt", storage()), 70);
}
TEST_P(FixtureTest, GroupNormMatchesPyTorch) {
  EXPECT_GE(run_fixture_file("group_norm.txt", storage()), 50);
}

INSTANTIATE_TEST_SUITE_P(Storage,
                         FixtureTest,
                         ::testing::Combine(::testing::Values(Storage::row_major,
                                                              Storage::col_major,
                                                              Storage::channels_last),
                                            ::testing::ValuesIn(normkit_test::isa_levels())),
                         [](const ::testing::TestParamInfo<std::tuple<Storage, normkit::Isa>>& p) {
                           const Storage st = std::get<0>(p.param);
                           return (st == Storage::channels_last
                                       ? std::string("ChannelsLast")
                                       : std::string(normkit_test::storage_name(st))) +
                                  "_" + normkit_test::isa_label(std::get<1>(p.param));
                         });

}  // namespace
