// Numerical stress grid (issue #5): for every module, float inputs with mean 1 .. 1e6 and
// std 1e-3 .. 1e3, constant slices, and magnitudes near 1e20 and 1e-30. The worst error of
// the output against a float64 reference computed from the same float inputs must stay
// within a few float ulps of the output, and finite input never gives NaN or inf. Prints the
// table (the "report"); the comparison with PyTorch itself is accuracy_test (fixtures).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/reference.hpp"

namespace {

using X = Eigen::Tensor<float, 3, Eigen::RowMajor>;  // (N, C, L) = (4, 6, 64)

X make(double mean, double sd, unsigned seed) {
  X x(4, 6, 64);
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(mean, sd);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(d(gen));
  return x;
}

struct Result {
  double err, ymax;
  bool finite;
};

template <class Module, class SlotFn>
Result run(Module m, const X& x, long slots, SlotFn slot) {
  const auto y = m.forward(x);
  const auto ref = normkit_test::reference_normalize(x.data(), x.size(), slots, slot, 1e-5);
  Result r{0, 0, true};
  for (Eigen::Index i = 0; i < y.size(); ++i) {
    r.finite = r.finite && std::isfinite(y.data()[i]);
    r.err = std::max(r.err, std::abs(y.data()[i] - ref[static_cast<std::size_t>(i)]));
    r.ymax = std::max(r.ymax, std::abs(ref[static_cast<std::size_t>(i)]));
  }
  return r;
}

TEST(StressTest, WorstErrorAcrossMeanAndStdGrid) {
  std::printf("%-12s %10s %10s %12s %12s\n", "module", "mean", "std", "worst err", "bound");
  unsigned seed = 1;
  const std::vector<std::pair<double, double>> regimes = {
      {1, 1e-3},  {1, 1},      {1, 1e3},     {1e2, 1e-3},    {1e2, 1},
      {1e2, 1e3}, {1e4, 1e-3}, {1e4, 1},     {1e4, 1e3},     {1e6, 1e-3},
      {1e6, 1},   {1e6, 1e3},  {1e20, 1e19}, {1e-30, 1e-31}, {7, 0}};
  for (const auto& [mean, sd] : regimes) {
    const X x = make(mean, sd, seed++);
    const Result res[4] = {
        run(normkit::BatchNorm1d<float>(6), x, 6, [](long i) { return (i / 64) % 6; }),
        run(normkit::InstanceNorm1d<float>(6), x, 24, [](long i) { return i / 64; }),
        run(normkit::GroupNorm<float>(normkit::GroupNormOptions(3, 6)), x, 12,
            [](long i) { return i / 128; }),
        run(normkit::LayerNorm<float>(normkit::LayerNormOptions({64})), x, 24,
            [](long i) { return i / 64; })};
    const char* names[4] = {"BatchNorm1d", "InstanceNorm1d", "GroupNorm", "LayerNorm"};
    for (int k = 0; k < 4; ++k) {
      // A few float ulps of the largest output, or of 1 (values near 0 in a unit-scale slice).
      const double bound = 4 * std::ldexp(std::max(1.0, res[k].ymax), -23);
      std::printf("%-12s %10.3g %10.3g %12.3g %12.3g\n", names[k], mean, sd, res[k].err, bound);
      EXPECT_TRUE(res[k].finite) << names[k] << " mean " << mean << " std " << sd;
      EXPECT_LE(res[k].err, bound) << names[k] << " mean " << mean << " std " << sd;
    }
  }
}

}  // namespace
