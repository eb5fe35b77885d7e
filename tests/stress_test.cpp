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

#include "support/isa_param.hpp"
#include "support/reference.hpp"

namespace {

class StressTest : public normkit_test::PerIsa {};

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

TEST_P(StressTest, WorstErrorAcrossMeanAndStdGrid) {
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

namespace {

// LayerNorm backward takes a one-pass path for float rows (float dx and float accumulators
// of dweight/dbias over 4 rows, flushed to double) and a double path for rows whose
// coefficients do not fit float (eps = 0 and a variance near 1e-70): the same call mixes
// both. Float results are compared with the double module on the same (float) values.
TEST_P(StressTest, LayerNormBackwardFloatPathsAgainstDouble) {
  const Eigen::Index rows = 150, n = 200;  // several 4-row groups and a partial one
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(rows, n), dy(rows, n);
  std::mt19937 gen(11);
  std::normal_distribution<double> d(0.0, 1.0);
  for (Eigen::Index r = 0; r < rows; ++r) {
    // Offsets and scales vary by row; every 7th row is tiny (double path with eps = 0).
    const double scale = r % 7 == 3 ? 1e-35 : std::pow(10.0, double(r % 5) - 2.0);
    const double offset = r % 7 == 3 ? 0.0 : 1e3 * double(r % 3);
    for (Eigen::Index j = 0; j < n; ++j) {
      x(r, j) = static_cast<float>(offset + scale * d(gen));
      dy(r, j) = static_cast<float>(d(gen));
    }
  }
  normkit::LayerNorm<float> lf(normkit::LayerNormOptions({n}).eps(0.0));
  normkit::LayerNorm<double> ld(normkit::LayerNormOptions({n}).eps(0.0));
  Eigen::Tensor<float, 1> wf(n);
  for (Eigen::Index j = 0; j < n; ++j) wf(j) = static_cast<float>(1.0 + 0.1 * d(gen));
  lf.set_weight(wf);
  ld.set_weight(wf.cast<double>());
  lf.forward(x);
  ld.forward(Eigen::Tensor<double, 2, Eigen::RowMajor>(x.cast<double>()));
  const auto gf = lf.backward(dy);
  const auto gd = ld.backward(Eigen::Tensor<double, 2, Eigen::RowMajor>(dy.cast<double>()));
  for (Eigen::Index r = 0; r < rows; ++r) {
    double scale = 0, err = 0;
    for (Eigen::Index j = 0; j < n; ++j) {
      scale = std::max(scale, std::abs(gd.input(r, j)));
      err = std::max(err, std::abs(double(gf.input(r, j)) - gd.input(r, j)));
      ASSERT_TRUE(std::isfinite(gf.input(r, j))) << "row " << r;
    }
    EXPECT_LE(err, 8 * 6e-8 * scale) << "dx, row " << r;  // a few float ulps of the row
  }
  // dweight/dbias: sums over rows; bound by the sum of magnitudes (cancellation-aware).
  for (Eigen::Index j = 0; j < n; ++j) {
    double mag_w = 0, mag_b = 0;
    for (Eigen::Index r = 0; r < rows; ++r) {
      mag_b += std::abs(double(dy(r, j)));
      mag_w += std::abs(double(dy(r, j))) * 4.0;  // |xhat| <= sqrt(n) but ~1: generous
    }
    EXPECT_LE(std::abs(double(gf.weight(j)) - gd.weight(j)), 1e-6 * mag_w) << "dweight " << j;
    EXPECT_LE(std::abs(double(gf.bias(j)) - gd.bias(j)), 1e-6 * mag_b) << "dbias " << j;
  }
}

NORMKIT_INSTANTIATE_PER_ISA(StressTest);

}  // namespace
