// Numerical stress against PyTorch: for every float32 fixture tagged large_offset, constant
// or overflow, the worst error of normkit's training output against a float64 reference
// computed from the same float inputs must be no worse than PyTorch's (the fixture holds
// PyTorch's output), and finite inputs never give NaN. Prints the table quoted in the README.
#include <cmath>
#include <cstdio>
#include <functional>

#include <gtest/gtest.h>

#include "support/fixture.hpp"
#include "support/fixture_runner.hpp"
#include "support/isa_param.hpp"
#include "support/reference.hpp"

namespace {

class AccuracyTest : public normkit_test::PerIsa {};

using namespace normkit_test;

template <int R>
std::vector<double> normkit_output(const FixtureCase& c, const FixtureTensor& xt) {
  const auto x = to_tensor<float, R>(xt);
  Eigen::Tensor<float, R, Eigen::RowMajor> y;
  const std::string& m = c.module;
  if (m == "BatchNorm2d") {
    if constexpr (R == 4)
      y = normkit::BatchNorm2d<float>(
              normkit::BatchNormOptions(c.opt_int("num_features")).eps(c.opt_double("eps")))
              .forward(x);
  } else if (m == "BatchNorm1d") {
    if constexpr (R == 2 || R == 3)
      y = normkit::BatchNorm1d<float>(
              normkit::BatchNormOptions(c.opt_int("num_features")).eps(c.opt_double("eps")))
              .forward(x);
  } else if (m == "InstanceNorm2d") {
    if constexpr (R == 3 || R == 4)
      y = normkit::InstanceNorm2d<float>(
              normkit::InstanceNormOptions(c.opt_int("num_features")).eps(c.opt_double("eps")))
              .forward(x);
  } else if (m == "InstanceNorm1d") {
    if constexpr (R == 2 || R == 3)
      y = normkit::InstanceNorm1d<float>(
              normkit::InstanceNormOptions(c.opt_int("num_features")).eps(c.opt_double("eps")))
              .forward(x);
  } else if (m == "GroupNorm") {
    y = normkit::GroupNorm<float>(
            normkit::GroupNormOptions(c.opt_int("num_groups"), c.opt_int("num_channels"))
                .eps(c.opt_double("eps")))
            .forward(x);
  } else if (m == "LayerNorm") {
    std::vector<Eigen::Index> ns;
    for (long d : c.opt_list("normalized_shape")) ns.push_back(d);
    y = normkit::LayerNorm<float>(normkit::LayerNormOptions(ns).eps(c.opt_double("eps")))
            .forward(x);
  }
  return std::vector<double>(y.data(), y.data() + y.size());
}

TEST_P(AccuracyTest, NoWorseThanPyTorchOnStressFixtures) {
  int checked = 0;
  std::printf("%-28s %-14s %12s %12s\n", "case", "module", "normkit err", "PyTorch err");
  for (const char* file :
       {"batch_norm.txt", "instance_norm.txt", "layer_norm.txt", "group_norm.txt"}) {
    for (const FixtureCase& c : load_fixtures(std::string(NORMKIT_FIXTURE_DIR) + "/" + file)) {
      if (!c.is_float32() || c.has_init("weight") || c.has_init("bias") || c.steps.empty() ||
          !c.steps[0].train)
        continue;
      if (!(c.has_tag("large_offset") || c.has_tag("constant") || c.has_tag("overflow")) ||
          c.has_tag("eps0"))
        continue;
      if (c.module.rfind("InstanceNorm", 0) == 0 && c.opt_bool("track_running_stats"))
        continue;
      SCOPED_TRACE(c.where());
      const FixtureTensor& xt = c.steps[0].at("x");
      const FixtureTensor& yt = c.steps[0].at("y");
      const long n = static_cast<long>(xt.numel());
      const long N = xt.dims[0], C = xt.rank() > 1 ? xt.dims[1] : 1;
      long S = 1;
      for (std::size_t i = 2; i < xt.rank(); ++i) S *= xt.dims[i];
      long per = 1;
      std::function<long(long)> slot;
      if (c.module.rfind("BatchNorm", 0) == 0) {
        slot = [=](long i) { return (i / S) % C; };
        per = C;
      } else if (c.module.rfind("InstanceNorm", 0) == 0) {
        slot = [=](long i) { return i / S; };
        per = n / S;
      } else if (c.module == "GroupNorm") {
        const long g = C / c.opt_int("num_groups");
        slot = [=](long i) { return i / (g * S); };
        per = n / (g * S);
      } else {
        long d = 1;
        for (long v : c.opt_list("normalized_shape")) d *= v;
        slot = [=](long i) { return i / d; };
        per = n / d;
      }
      (void)N;
      const auto ref = reference_normalize(xt.values.data(), n, per, slot, c.opt_double("eps"));
      std::vector<double> ours;
      switch (xt.rank()) {
        case 2:
          ours = normkit_output<2>(c, xt);
          break;
        case 3:
          ours = normkit_output<3>(c, xt);
          break;
        case 4:
          ours = normkit_output<4>(c, xt);
          break;
        default:
          ours = normkit_output<5>(c, xt);
          break;
      }
      ASSERT_EQ(ours.size(), ref.size());
      double e_ours = 0, e_torch = 0;
      for (std::size_t i = 0; i < ref.size(); ++i) {
        ASSERT_FALSE(std::isnan(ours[i])) << "NaN from finite input at " << i;
        e_ours = std::max(e_ours, std::abs(ours[i] - ref[i]));
        e_torch = std::max(e_torch, std::abs(yt.values[i] - ref[i]));
      }
      std::printf("%-28s %-14s %12.3g %12.3g\n", c.name.c_str(), c.module.c_str(), e_ours, e_torch);
      // One float rounding of the output (<= 2^-24 |y|, |y| < 16 here) is the floor.
      EXPECT_LE(e_ours, std::max(e_torch, 1e-6)) << c.name;
      ++checked;
    }
  }
  EXPECT_GE(checked, 10);
}

NORMKIT_INSTANTIATE_PER_ISA(AccuracyTest);

}  // namespace
