// RMSNorm against its float64 reference (tests/fixtures/rms_norm.txt: PyTorch >= 2.4's formula
// composed from libtorch 1.13 operations in float64, gradients by autograd), in RowMajor and
// ColMajor storage, float and double, on every ISA level; plus the free functions, the eps
// default and the error messages.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/fixture.hpp"
#include "support/fixture_runner.hpp"
#include "support/isa_param.hpp"

namespace {

using namespace normkit_test;

class RMSNormFixture : public normkit_test::PerIsa {};

// Worst |got - want| / (atol + rtol |want|) over the elements; <= 1 passes.
template <class A>
double worst(const A& got, const FixtureTensor& want, double atol, double rtol) {
  double w = 0;
  for (Eigen::Index i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got.data()[i]),
                 e = want.values[static_cast<std::size_t>(i)];
    w = std::max(w, std::abs(g - e) / (atol + rtol * std::abs(e)));
  }
  return w;
}

double max_abs_of(const FixtureTensor& t) {
  double m = 0;
  for (double v : t.values) m = std::max(m, std::abs(v));
  return m;
}

template <class S, int R, int L>
void run_step(const FixtureCase& c, const FixtureStep& step, int& checked) {
  std::vector<Eigen::Index> ns;
  for (long d : c.opt_list("normalized_shape")) ns.push_back(d);
  normkit::RMSNormOptions o(ns);
  // eps none means the computation type's epsilon: float's for float32 cases. A double module
  // run on a float32 case is given the eps that the reference added (eps_effective).
  if (std::is_same<S, float>::value || !c.has_opt("eps_effective"))
    o.eps(c.opt_double_or_none("eps"));
  else
    o.eps(c.opt_double("eps_effective"));
  o.elementwise_affine(c.opt_bool("elementwise_affine"));
  normkit::RMSNorm<S> m(o);
  if (c.has_init("weight"))
    m.set_weight(vec<S>(c.init_at("weight")));
  const auto xr = to_tensor<S, R>(step.at("x"));
  const auto dyr = to_tensor<S, R>(step.at("dy"));
  Eigen::Tensor<S, R, L> x, dy;
  if constexpr (L == Eigen::RowMajor) {
    x = xr;
    dy = dyr;
  } else {
    x = to_col<S, R>(xr);
    dy = to_col<S, R>(dyr);
  }
  const auto y = m.forward(x);
  const auto g = m.backward(dy);
  Eigen::Tensor<S, R, Eigen::RowMajor> yr, dxr;
  if constexpr (L == Eigen::RowMajor) {
    yr = y;
    dxr = g.input;
  } else {
    yr = to_row<S, R>(y);
    dxr = to_row<S, R>(g.input);
  }
  const bool flt = std::is_same<S, float>::value;
  // float: the reference rounded once is within 0.5 ulp; normkit's float apply adds a few
  // roundings. dx: r*g - x*r^3*mean(g*x) cancels; scale by the largest reference value.
  const double rt = flt ? 1e-5 : 1e-12;
  const double y_atol = (flt ? 0x1p-21 : 0x1p-45) * std::max(1e-30, max_abs_of(step.at("y")));
  const double dx_atol = (flt ? 0x1p-18 : 0x1p-42) * std::max(1e-30, max_abs_of(step.at("dx")));
  EXPECT_LE(worst(yr, step.at("y"), y_atol, rt), 1.0) << c.where() << " y";
  EXPECT_LE(worst(dxr, step.at("dx"), dx_atol, flt ? 1e-4 : 1e-10), 1.0) << c.where() << " dx";
  if (step.has("dweight")) {
    const double dw_atol =
        (flt ? 0x1p-18 : 0x1p-42) * std::max(1e-30, max_abs_of(step.at("dweight")));
    EXPECT_LE(worst(g.weight, step.at("dweight"), dw_atol, flt ? 1e-4 : 1e-10), 1.0)
        << c.where() << " dweight";
  }
  for (Eigen::Index i = 0; i < y.size(); ++i)
    ASSERT_TRUE(std::isfinite(static_cast<double>(y.data()[i]))) << c.where();
  ++checked;
}

template <class S, int L>
int run_all() {
  int checked = 0;
  for (const FixtureCase& c : load_fixtures(std::string(NORMKIT_FIXTURE_DIR) + "/rms_norm.txt")) {
    if (std::is_same<S, float>::value && !c.is_float32())
      continue;  // float64 inputs are not float values
    for (const FixtureStep& step : c.steps) {
      switch (step.at("x").rank()) {
        case 1:
          run_step<S, 1, L>(c, step, checked);
          break;
        case 2:
          run_step<S, 2, L>(c, step, checked);
          break;
        case 3:
          run_step<S, 3, L>(c, step, checked);
          break;
        case 4:
          run_step<S, 4, L>(c, step, checked);
          break;
        default:
          ADD_FAILURE() << c.where() << ": unexpected rank";
      }
    }
  }
  return checked;
}

TEST_P(RMSNormFixture, FloatMatchesFloat64Reference) {
  EXPECT_GE((run_all<float, Eigen::RowMajor>()), 50);
  EXPECT_GE((run_all<float, Eigen::ColMajor>()), 50);
}
TEST_P(RMSNormFixture, DoubleMatchesFloat64Reference) {
  EXPECT_GE((run_all<double, Eigen::RowMajor>()), 100);
  EXPECT_GE((run_all<double, Eigen::ColMajor>()), 100);
}

NORMKIT_INSTANTIATE_PER_ISA(RMSNormFixture);

TEST(RMSNorm, EpsDefaultsToTheComputationTypesMachineEpsilon) {
  EXPECT_EQ(normkit::RMSNorm<float>(normkit::RMSNormOptions({4})).eps(),
            static_cast<double>(std::numeric_limits<float>::epsilon()));
  EXPECT_EQ(normkit::RMSNorm<double>(normkit::RMSNormOptions({4})).eps(),
            std::numeric_limits<double>::epsilon());
  EXPECT_EQ(normkit::RMSNorm<float>(normkit::RMSNormOptions({4}).eps(1e-6)).eps(), 1e-6);
  // A zero row normalizes to zeros; a constant row c to c / sqrt(c^2 + eps).
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(2, 4);
  x.setValues({{0, 0, 0, 0}, {7, 7, 7, 7}});
  normkit::RMSNorm<float> m(normkit::RMSNormOptions({4}));
  const auto y = m.forward(x);
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(y(0, j), 0.0f);
    EXPECT_FLOAT_EQ(y(1, j), static_cast<float>(7.0 / std::sqrt(49.0 + m.eps())));
  }
}

TEST(RMSNorm, FreeFunctionsAgreeWithTheModule) {
  Eigen::Tensor<double, 3, Eigen::RowMajor> x(2, 3, 8), dy(2, 3, 8), y, dx;
  x.setRandom();
  dy.setRandom();
  Eigen::Tensor<double, 1> w(8), gw(8);
  for (int i = 0; i < 8; ++i) w(i) = 0.5 + 0.125 * i;
  normkit::RMSNorm<double> m(normkit::RMSNormOptions({8}).eps(1e-6));
  m.set_weight(w);
  const auto ym = m.forward(x);
  const auto gm = m.backward(dy);
  normkit::SavedStats saved;
  normkit::rms_norm(x, y, normkit::RMSNormFuncOptions<double>({8}).weight(w).eps(1e-6), &saved);
  normkit::rms_norm_backward(x, dy, dx, saved, {8}, w, gw);
  for (Eigen::Index i = 0; i < y.size(); ++i) {
    EXPECT_EQ(y.data()[i], ym.data()[i]);
    EXPECT_EQ(dx.data()[i], gm.input.data()[i]);
  }
  for (int i = 0; i < 8; ++i) EXPECT_EQ(gw(i), gm.weight(i));
  EXPECT_EQ(gm.bias.size(), 0);
  for (Eigen::Index i = 0; i < saved.mean.size(); ++i) EXPECT_EQ(saved.mean(i), 0.0);
}

TEST(RMSNorm, ErrorsNameTheModule) {
  EXPECT_THROW(normkit::RMSNorm<float>(normkit::RMSNormOptions(std::vector<Eigen::Index>{})),
               normkit::value_error);
  EXPECT_THROW(normkit::RMSNorm<float>(normkit::RMSNormOptions({4}).eps(-1.0)),
               normkit::value_error);
  normkit::RMSNorm<float> m(normkit::RMSNormOptions({2, 3}));
  Eigen::Tensor<float, 3, Eigen::RowMajor> x(4, 3, 2);
  x.setRandom();
  try {
    (void)m.forward(x);
    ADD_FAILURE() << "expected shape_error";
  } catch (const normkit::shape_error& e) {
    const std::string s = e.what();
    EXPECT_NE(s.find("[normkit.RMSNorm]"), std::string::npos) << s;
    EXPECT_NE(s.find("Given normalized_shape=[2, 3]"), std::string::npos) << s;
    EXPECT_NE(s.find("[4, 3, 2]"), std::string::npos) << s;
  }
  EXPECT_THROW(m.set_weight(Eigen::Tensor<float, 1>(5)), normkit::shape_error);
}

}  // namespace
