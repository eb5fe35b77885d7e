// bfloat16 and half: every module, all in the low type (Module<Eigen::bfloat16>) and mixed
// (Module<float> given bfloat16/half tensors), on every ISA level, in RowMajor, ColMajor and
// channels-last storage, against the same module in double on the same (exactly widened)
// values, rounded once to the output type: every y within 1 ulp of that type. Plus half inputs
// near 65504 (no overflow), the libtorch 1.13 bfloat16 fixtures (tests/fixtures/bf16.txt:
// at least as close to the float64 reference as PyTorch), thread-count identity and the
// kept-input type check.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#define EIGEN_USE_THREADS
#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/bits.hpp"
#include "support/fixture.hpp"
#include "support/fixture_runner.hpp"
#include "support/isa_param.hpp"

namespace {

using bf16 = Eigen::bfloat16;
using f16 = Eigen::half;

template <class L>
const char* type_name() {
  return std::is_same<L, bf16>::value ? "bfloat16" : "half";
}

// The ordered integer of a 16-bit float's bits (negative values below positive ones, -0 = +0),
// so that neighbours differ by 1.
template <class L>
std::int32_t ordered(L v) {
  const auto b = Eigen::numext::bit_cast<std::uint16_t>(v);
  const std::int32_t mag = b & 0x7fff;
  return (b & 0x8000) ? -mag : mag;
}

// Distance in units in the last place of L between got and the reference rounded once to L.
template <class L>
std::int32_t ulps(L got, double ref) {
  // ref rounded once to L: the nearest of L(float(ref)) and its two neighbours (going through
  // float could round twice).
  const float f = static_cast<float>(ref);
  const L lo = static_cast<L>(f);
  const double lv = static_cast<double>(static_cast<float>(lo));
  const std::int32_t o = ordered(lo);
  auto from_ordered = [](std::int32_t k) {
    const std::uint16_t b = static_cast<std::uint16_t>(
        k < 0 ? (0x8000 | static_cast<std::uint16_t>(-k)) : static_cast<std::uint16_t>(k));
    return Eigen::numext::bit_cast<L>(b);
  };
  L best = lo;
  double best_err = std::abs(lv - ref);
  for (std::int32_t k : {o - 1, o + 1}) {
    const L c = from_ordered(k);
    const double cv = static_cast<double>(static_cast<float>(c));
    if (std::isfinite(cv) && std::abs(cv - ref) < best_err) {
      best = c;
      best_err = std::abs(cv - ref);
    }
  }
  return std::abs(ordered(got) - ordered(best));
}

template <class T>
double maxabs(const T& t) {
  double m = 0;
  for (Eigen::Index i = 0; i < t.size(); ++i)
    m = std::max(m, std::abs(static_cast<double>(static_cast<float>(t.data()[i]))));
  return m;
}

// y: within 1 ulp of the reference rounded once. dx (and bf16/half parameter gradients):
// within 1 ulp, or -- where the float computation's own cancellation dominates (an element
// far smaller than the tensor's largest) -- within 2^-18 of the largest reference element.
template <class A, class B>
void expect_ulps(const A& got, const B& ref, bool exact, const std::string& what) {
  using L = typename A::Scalar;
  ASSERT_EQ(got.size(), ref.size()) << what;
  const double scale = maxabs(ref);
  std::int32_t worst = 0;
  Eigen::Index at = -1, inexact = 0;
  for (Eigen::Index i = 0; i < got.size(); ++i) {
    const double r = static_cast<double>(ref.data()[i]);
    const L g = got.data()[i];
    ASSERT_TRUE(std::isfinite(static_cast<float>(g))) << what << " element " << i;
    const std::int32_t u = ulps(g, r);
    inexact += u != 0;
    if (u <= 1)
      continue;
    if (!exact &&
        std::abs(static_cast<double>(static_cast<float>(g)) - r) <= std::ldexp(scale, -18))
      continue;
    if (u > worst) {
      worst = u;
      at = i;
    }
  }
  // Computed in float and rounded once: all but the rare element within float rounding of a
  // tie of L are the correctly rounded value.
  if (exact) {
    EXPECT_LE(inexact, got.size() / 200 + 1) << what << ": " << inexact << " of " << got.size()
                                             << " elements are not the reference rounded once";
  }
  EXPECT_EQ(worst, 0) << what << ": element " << at << " is " << worst
                      << " ulps from the reference "
                      << (at >= 0 ? static_cast<double>(ref.data()[at]) : 0.0) << " (got "
                      << (at >= 0 ? static_cast<double>(static_cast<float>(got.data()[at])) : 0.0)
                      << ")";
}

// float parameter gradients (mixed mode): float rounding of double sums.
template <class A, class B>
void expect_float_close(const A& got, const B& ref, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const double scale = maxabs(ref);
  for (Eigen::Index i = 0; i < got.size(); ++i) {
    const double r = static_cast<double>(ref.data()[i]);
    EXPECT_NEAR(static_cast<double>(got.data()[i]), r, std::ldexp(scale, -21) + 1e-6 * std::abs(r))
        << what << " element " << i;
  }
}

template <class L, class T>
Eigen::Tensor<L, T::NumDimensions, T::Layout> to_low(const T& t) {
  Eigen::Tensor<L, T::NumDimensions, T::Layout> r(t.dimensions());
  for (Eigen::Index i = 0; i < t.size(); ++i)
    r.data()[i] = static_cast<L>(static_cast<float>(t.data()[i]));
  return r;
}
template <class T>
auto widen(const T& t) {
  Eigen::Tensor<double, T::NumDimensions, T::Layout> r(t.dimensions());
  for (Eigen::Index i = 0; i < t.size(); ++i)
    r.data()[i] = static_cast<double>(static_cast<float>(t.data()[i]));
  return r;
}

template <class P>
Eigen::Tensor<P, 1> param_values(Eigen::Index n, unsigned seed, float center) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(-0.5f, 0.5f);
  Eigen::Tensor<P, 1> v(n);
  // Values exact in bfloat16 and half, so that every type holds the same parameters.
  for (Eigen::Index i = 0; i < n; ++i)
    v(i) = static_cast<P>(static_cast<float>(static_cast<bf16>(center + d(gen))));
  return v;
}
template <class P>
Eigen::Tensor<double, 1> as_double(const Eigen::Tensor<P, 1>& v) {
  Eigen::Tensor<double, 1> r(v.size());
  for (Eigen::Index i = 0; i < v.size(); ++i) r(i) = static_cast<double>(static_cast<float>(v(i)));
  return r;
}

template <class M>
struct has_running : std::false_type {};
template <class S, int D>
struct has_running<normkit::BatchNorm<S, D>> : std::true_type {};
template <class M>
struct is_instance : std::false_type {};
template <class S, int D>
struct is_instance<normkit::InstanceNorm<S, D>> : std::true_type {};
template <class M>
struct has_bias : std::true_type {};
template <class S>
struct has_bias<normkit::RMSNorm<S>> : std::false_type {};

// Same random parameters (and running statistics) in the module under test and the double
// reference.
template <class M, class R>
void same_params(M& m, R& r, unsigned seed) {
  using P = typename M::Vector::Scalar;
  if (m.weight().size()) {
    const auto w = param_values<P>(m.weight().size(), seed, 1.0f);
    m.set_weight(w);
    r.set_weight(as_double(w));
  }
  if constexpr (has_bias<M>::value) {
    if (m.bias().size()) {
      const auto b = param_values<P>(m.bias().size(), seed + 1, 0.0f);
      m.set_bias(b);
      r.set_bias(as_double(b));
    }
  }
  if constexpr (has_running<M>::value) {
    if (m.running_mean().size()) {
      const auto rm = param_values<P>(m.running_mean().size(), seed + 2, 0.25f);
      const auto rv = param_values<P>(m.running_var().size(), seed + 3, 1.5f);
      m.set_running_mean(rm);
      r.set_running_mean(as_double(rm));
      m.set_running_var(rv);
      r.set_running_var(as_double(rv));
    }
  }
}

template <class M, class R, class XL, class XD>
void check_pass(
    M& m, R& r, const XL& xl, const XL& dyl, const XD& xd, const XD& dyd, const std::string& what) {
  using P = typename M::Vector::Scalar;
  const auto y = m.forward(xl);
  const auto yr = r.forward(xd);
  expect_ulps(y, yr, true, what + " y");
  const auto g = m.backward(xl, dyl);
  const auto gr = r.backward(xd, dyd);
  expect_ulps(g.input, gr.input, false, what + " dx");
  if constexpr (std::is_same<P, float>::value) {
    expect_float_close(g.weight, gr.weight, what + " dweight");
    expect_float_close(g.bias, gr.bias, what + " dbias");
  } else {
    expect_ulps(g.weight, gr.weight, false, what + " dweight");
    expect_ulps(g.bias, gr.bias, false, what + " dbias");
  }
  if constexpr (has_running<M>::value) {
    if (m.running_mean().size()) {
      if constexpr (std::is_same<P, float>::value) {
        expect_float_close(m.running_mean(), r.running_mean(), what + " running_mean");
        expect_float_close(m.running_var(), r.running_var(), what + " running_var");
      } else {
        expect_ulps(m.running_mean(), r.running_mean(), true, what + " running_mean");
        expect_ulps(m.running_var(), r.running_var(), true, what + " running_var");
      }
    }
  }
}

// Runs module M (parameters P, input L) against R (the double module) in training, then in
// evaluation, on x of the given dims and storage order.
template <class L, class M, class R, class T>
void check(M m, R r, const T& xf, const T& dyf, const std::string& what) {
  SCOPED_TRACE(what);
  same_params(m, r, 7);
  const auto xl = to_low<L>(xf);
  const auto dyl = to_low<L>(dyf);
  const auto xd = widen(xl);
  const auto dyd = widen(dyl);
  check_pass(m, r, xl, dyl, xd, dyd, what + " (train)");
  m.eval();
  r.eval();
  // An all-low module's running statistics are rounded to its type (as PyTorch's): evaluation
  // is judged from those same buffers.
  if constexpr (has_running<M>::value) {
    if (m.running_mean().size()) {
      r.set_running_mean(as_double(m.running_mean()));
      r.set_running_var(as_double(m.running_var()));
    }
  }
  check_pass(m, r, xl, dyl, xd, dyd, what + " (eval)");
}

template <class T>
T random_tensor(std::array<Eigen::Index, T::NumDimensions> d, unsigned seed, float mean, float sd) {
  T t(d);
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(mean, sd);
  for (Eigen::Index i = 0; i < t.size(); ++i) t.data()[i] = dist(gen);
  return t;
}

// Every module in one storage order, for parameter type P and input type L.
template <class P, class L, int Layout>
void all_modules(const char* tag) {
  using T4 = Eigen::Tensor<float, 4, Layout>;
  const std::string base = std::string(tag) + " " + type_name<L>() +
                           (std::is_same<P, float>::value ? " mixed" : " all-low") +
                           (Layout == Eigen::RowMajor ? " RowMajor" : " ColMajor");
  const T4 x = random_tensor<T4>({3, 8, 9, 13}, 1, 0.5f, 2.0f);
  const T4 dy = random_tensor<T4>({3, 8, 9, 13}, 2, 0.0f, 1.0f);
  check<L>(normkit::BatchNorm2d<P>(8), normkit::BatchNorm2d<double>(8), x, dy,
           base + " BatchNorm2d");
  check<L>(normkit::InstanceNorm2d<P>(normkit::InstanceNormOptions(8).affine(true)),
           normkit::InstanceNorm2d<double>(normkit::InstanceNormOptions(8).affine(true)), x, dy,
           base + " InstanceNorm2d");
  check<L>(normkit::GroupNorm<P>(normkit::GroupNormOptions(4, 8)),
           normkit::GroupNorm<double>(normkit::GroupNormOptions(4, 8)), x, dy, base + " GroupNorm");
  check<L>(normkit::LayerNorm<P>(normkit::LayerNormOptions({9, 13})),
           normkit::LayerNorm<double>(normkit::LayerNormOptions({9, 13})), x, dy,
           base + " LayerNorm");
  check<L>(normkit::RMSNorm<P>(normkit::RMSNormOptions({13}).eps(1e-6)),
           normkit::RMSNorm<double>(normkit::RMSNormOptions({13}).eps(1e-6)), x, dy,
           base + " RMSNorm");
  // Channels-last (NHWC: logical C is the last storage dim).
  check<L>(normkit::BatchNorm2d<P>(normkit::BatchNormOptions(13).channels_last(true)),
           normkit::BatchNorm2d<double>(normkit::BatchNormOptions(13).channels_last(true)), x, dy,
           base + " BatchNorm2d channels_last");
  check<L>(normkit::GroupNorm<P>(normkit::GroupNormOptions(13, 13).channels_last(true)),
           normkit::GroupNorm<double>(normkit::GroupNormOptions(13, 13).channels_last(true)), x, dy,
           base + " GroupNorm channels_last");
  // Long rows (vector bodies, the one-pass LayerNorm backward) and BatchNorm1d columns.
  using T2 = Eigen::Tensor<float, 2, Layout>;
  const T2 x2 = random_tensor<T2>({12, 1000}, 3, 100.0f, 3.0f);
  const T2 dy2 = random_tensor<T2>({12, 1000}, 4, 0.0f, 1.0f);
  check<L>(normkit::LayerNorm<P>(normkit::LayerNormOptions({1000})),
           normkit::LayerNorm<double>(normkit::LayerNormOptions({1000})), x2, dy2,
           base + " LayerNorm rows");
  check<L>(normkit::RMSNorm<P>(normkit::RMSNormOptions({1000})),
           normkit::RMSNorm<double>(normkit::RMSNormOptions({1000})), x2, dy2,
           base + " RMSNorm rows");
  const T2 xc = random_tensor<T2>({1000, 12}, 5, -3.0f, 2.0f);
  const T2 dyc = random_tensor<T2>({1000, 12}, 6, 0.0f, 1.0f);
  check<L>(normkit::BatchNorm1d<P>(12), normkit::BatchNorm1d<double>(12), xc, dyc,
           base + " BatchNorm1d");
}

class LowPrecision : public normkit_test::PerIsa {};

TEST_P(LowPrecision, MixedBfloat16WithinOneUlp) {
  all_modules<float, bf16, Eigen::RowMajor>("");
  all_modules<float, bf16, Eigen::ColMajor>("");
}
TEST_P(LowPrecision, AllBfloat16WithinOneUlp) {
  all_modules<bf16, bf16, Eigen::RowMajor>("");
  all_modules<bf16, bf16, Eigen::ColMajor>("");
}
TEST_P(LowPrecision, MixedHalfWithinOneUlp) {
  all_modules<float, f16, Eigen::RowMajor>("");
  all_modules<float, f16, Eigen::ColMajor>("");
}
TEST_P(LowPrecision, AllHalfWithinOneUlp) {
  all_modules<f16, f16, Eigen::RowMajor>("");
  all_modules<f16, f16, Eigen::ColMajor>("");
}

// Half inputs near its largest finite value: the sums of squares (~1e10) and the variance are
// never formed in half.
TEST_P(LowPrecision, HalfNear65504DoesNotOverflow) {
  using T2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  T2 x(4, 64), dy(4, 64);
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    x.data()[i] = (i % 3 == 0 ? -1.0f : 1.0f) * (65504.0f - 32.0f * static_cast<float>(i % 40));
    dy.data()[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
  }
  check<f16>(normkit::LayerNorm<float>(normkit::LayerNormOptions({64})),
             normkit::LayerNorm<double>(normkit::LayerNormOptions({64})), x, dy, "LayerNorm mixed");
  check<f16>(normkit::LayerNorm<f16>(normkit::LayerNormOptions({64})),
             normkit::LayerNorm<double>(normkit::LayerNormOptions({64})), x, dy, "LayerNorm half");
  check<f16>(normkit::RMSNorm<f16>(normkit::RMSNormOptions({64})),
             normkit::RMSNorm<double>(normkit::RMSNormOptions({64})), x, dy, "RMSNorm half");
  check<f16>(normkit::BatchNorm1d<float>(64), normkit::BatchNorm1d<double>(64), x, dy,
             "BatchNorm1d mixed");
  // An all-half BatchNorm: the running variance of these values (~4e9) is beyond half and
  // stores as inf (the buffer's type cannot hold it); the training outputs stay exact.
  normkit::BatchNorm1d<f16> bn(64);
  normkit::BatchNorm1d<double> ref(64);
  const auto xl = to_low<f16>(x);
  const auto y = bn.forward(xl);
  expect_ulps(y, ref.forward(widen(xl)), true, "BatchNorm1d half y");
  EXPECT_TRUE(std::isinf(static_cast<float>(bn.running_var()(0))));
}

// bfloat16 values whose squared distances from the shift are beyond float (|x - c| > 1.8e19;
// the running variance, a tenth of the batch variance, still fits bfloat16).
// The AVX2 and AVX-512 copies add 16-bit data in float blocks (kernels/leaves.hpp, the NB
// above mom_run); a run whose float sums overflow is summed again in double, so the results
// stay the double module's, rounded once. Rows of 256 and 128: several float blocks per run.
// The backward sums of 16-bit data subtract the mean rounded to float in the float blocks and
// add the difference back in double (kernels/leaves.hpp, the NB above mom_run). Means near
// 1e4 of 210 elements are not values of float; without the correction the float dweight of a
// mixed BatchNorm2d was 2.3e-6 relative off the double module's (6e-8 with it).
TEST_P(LowPrecision, Bfloat16BackwardSumsKeepTheMeanBeyondFloat) {
  using T4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  const T4 x = random_tensor<T4>({2, 3, 7, 15}, 11, 1e4f, 30.0f);
  const T4 dy = random_tensor<T4>({2, 3, 7, 15}, 12, 0.0f, 1.0f);
  check<bf16>(normkit::BatchNorm2d<float>(3), normkit::BatchNorm2d<double>(3), x, dy,
              "BatchNorm2d mixed, mean 1e4");
  // LayerNorm's one-pass backward sums its rows (315 elements) in float blocks too; its
  // outputs do not depend on the shift correction at 16-bit precision (dweight comes from the
  // per-position sums), so these guard the float blocks against a mean far from zero.
  check<bf16>(normkit::LayerNorm<float>(normkit::LayerNormOptions({3, 7, 15})),
              normkit::LayerNorm<double>(normkit::LayerNormOptions({3, 7, 15})), x, dy,
              "LayerNorm mixed, mean 1e4");
  check<bf16>(normkit::LayerNorm<bf16>(normkit::LayerNormOptions({3, 7, 15})),
              normkit::LayerNorm<double>(normkit::LayerNormOptions({3, 7, 15})), x, dy,
              "LayerNorm bfloat16, mean 1e4");
}

// dy * (x - mean) beyond float (|x| near 1e36, |dy| near 1e4): LayerNorm's and RMSNorm's
// backward row sums of 16-bit data (float blocks) are summed again in double.
TEST_P(LowPrecision, Bfloat16BackwardProductsBeyondFloatSumInDouble) {
  using T2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  T2 x(3, 200), dy(3, 200);
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    x.data()[i] = (i % 3 == 0 ? -1.0f : 1.0f) * 1e36f * (1.0f + 0.01f * static_cast<float>(i % 17));
    dy.data()[i] = 1e4f * (0.25f * static_cast<float>(i % 7) - 0.5f);
  }
  check<bf16>(normkit::LayerNorm<bf16>(normkit::LayerNormOptions({200})),
              normkit::LayerNorm<double>(normkit::LayerNormOptions({200})), x, dy,
              "LayerNorm bfloat16");
  check<bf16>(normkit::LayerNorm<float>(normkit::LayerNormOptions({200})),
              normkit::LayerNorm<double>(normkit::LayerNormOptions({200})), x, dy,
              "LayerNorm mixed");
  check<bf16>(normkit::RMSNorm<bf16>(normkit::RMSNormOptions({200})),
              normkit::RMSNorm<double>(normkit::RMSNormOptions({200})), x, dy, "RMSNorm bfloat16");
}

TEST_P(LowPrecision, Bfloat16BeyondFloatSquaresSumInDouble) {
  using T2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  using T3 = Eigen::Tensor<float, 3, Eigen::RowMajor>;
  T2 x(4, 256), dy(4, 256);
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    x.data()[i] = (i % 3 == 0 ? -1.0f : 1.0f) * 2e19f * (1.0f + 0.01f * static_cast<float>(i % 17));
    dy.data()[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
  }
  check<bf16>(normkit::LayerNorm<float>(normkit::LayerNormOptions({256})),
              normkit::LayerNorm<double>(normkit::LayerNormOptions({256})), x, dy,
              "LayerNorm mixed");
  check<bf16>(normkit::LayerNorm<bf16>(normkit::LayerNormOptions({256})),
              normkit::LayerNorm<double>(normkit::LayerNormOptions({256})), x, dy,
              "LayerNorm bfloat16");
  check<bf16>(normkit::RMSNorm<bf16>(normkit::RMSNormOptions({256})),
              normkit::RMSNorm<double>(normkit::RMSNormOptions({256})), x, dy, "RMSNorm bfloat16");
  T3 x3(4, 2, 128), dy3(4, 2, 128);
  std::copy(x.data(), x.data() + x.size(), x3.data());
  std::copy(dy.data(), dy.data() + dy.size(), dy3.data());
  check<bf16>(normkit::BatchNorm1d<bf16>(2), normkit::BatchNorm1d<double>(2), x3, dy3,
              "BatchNorm1d bfloat16");
  check<bf16>(normkit::BatchNorm1d<float>(2), normkit::BatchNorm1d<double>(2), x3, dy3,
              "BatchNorm1d mixed");
  check<bf16>(normkit::InstanceNorm1d<float>(normkit::InstanceNormOptions(2).affine(true)),
              normkit::InstanceNorm1d<double>(normkit::InstanceNormOptions(2).affine(true)), x3,
              dy3, "InstanceNorm1d mixed");
}

NORMKIT_INSTANTIATE_PER_ISA(LowPrecision);

// libtorch 1.13's own bfloat16 results (tests/fixtures/bf16.txt): normkit's are at least as
// close to the float64 reference (max |error| per tensor), and within 1 ulp of it.
template <class P, class M>
void run_bf16_case(const normkit_test::FixtureCase& c, M& m) {
  using namespace normkit_test;
  if (c.has_init("weight"))
    m.set_weight(vec<P>(c.init_at("weight")));
  if constexpr (has_bias<M>::value) {
    if (c.has_init("bias"))
      m.set_bias(vec<P>(c.init_at("bias")));
  }
  if constexpr (has_running<M>::value || is_instance<M>::value) {
    if (c.has_init("running_mean"))
      m.set_running_mean(vec<P>(c.init_at("running_mean")));
    if (c.has_init("running_var"))
      m.set_running_var(vec<P>(c.init_at("running_var")));
  }
  int k = 0;
  const FixtureStep* prev = nullptr;
  for (const FixtureStep& step : c.steps) {
    SCOPED_TRACE(c.where() + " step " + std::to_string(k++));
    step.train ? m.train() : m.eval();
    // Each step starts from PyTorch's state after the previous one (its low-precision running
    // statistics), so that both are judged on the same step, not on how two chains of
    // roundings drifted apart.
    if constexpr (has_running<M>::value || is_instance<M>::value) {
      if (prev && prev->has("running_mean")) {
        m.set_running_mean(vec<P>(prev->at("running_mean")));
        m.set_running_var(vec<P>(prev->at("running_var")));
      }
    }
    prev = &step;
    auto one = [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      if constexpr (!module_traits<M>::accepts(R)) {
        FAIL() << "rank " << R << " is not accepted by " << c.module;
      } else {
        const auto x = to_tensor<bf16, R>(step.at("x"));
        const auto dy = to_tensor<bf16, R>(step.at("dy"));
        const auto y = m.forward(x);
        const auto g = m.backward(x, dy);
        auto compare = [&](const auto& got, const char* name) {
          const std::string ref_name = std::string(name) + "_ref";
          if (!step.has(name) || !step.has(ref_name))
            return;
          const FixtureTensor& pt = step.at(name);
          const FixtureTensor& ref = step.at(ref_name);
          ASSERT_EQ(static_cast<std::size_t>(got.size()), ref.values.size()) << name;
          double ours = 0, theirs = 0;
          for (std::size_t i = 0; i < ref.values.size(); ++i) {
            const double v = static_cast<double>(static_cast<float>(got.data()[i]));
            ours = std::max(ours, std::abs(v - ref.values[i]));
            theirs = std::max(theirs, std::abs(pt.values[i] - ref.values[i]));
          }
          std::string detail;
          for (std::size_t i = 0; i < ref.values.size() && i < 8; ++i)
            detail += " [" +
                      std::to_string(static_cast<double>(static_cast<float>(got.data()[i]))) +
                      " pt " + std::to_string(pt.values[i]) + " ref " +
                      std::to_string(ref.values[i]) + "]";
          EXPECT_LE(ours, theirs) << name << ": normkit's largest error " << ours
                                  << " exceeds PyTorch's " << theirs << detail;
        };
        compare(y, "y");
        compare(g.input, "dx");
        compare(g.weight, "dweight");
        compare(g.bias, "dbias");
        if constexpr (has_running<M>::value || is_instance<M>::value) {
          compare(m.running_mean(), "running_mean");
          compare(m.running_var(), "running_var");
        }
      }
    };
    switch (step.at("x").rank()) {
      case 2:
        one(std::integral_constant<int, 2>());
        break;
      case 3:
        one(std::integral_constant<int, 3>());
        break;
      case 4:
        one(std::integral_constant<int, 4>());
        break;
      default:
        FAIL() << "unexpected rank";
    }
  }
}

template <class P>
int run_bf16_fixtures(const std::string& param_dtype) {
  using namespace normkit_test;
  int n = 0;
  for (const FixtureCase& c : load_fixtures(std::string(NORMKIT_FIXTURE_DIR) + "/bf16.txt")) {
    if (c.opt_single("param_dtype") != param_dtype)
      continue;
    ++n;
    if (c.module == "BatchNorm1d" || c.module == "BatchNorm2d") {
      normkit::BatchNormOptions o(c.opt_int("num_features"));
      o.eps(c.opt_double("eps"))
          .momentum(c.opt_momentum())
          .affine(c.opt_bool("affine"))
          .track_running_stats(c.opt_bool("track_running_stats"));
      if (c.module == "BatchNorm1d") {
        normkit::BatchNorm1d<P> m(o);
        run_bf16_case<P>(c, m);
      } else {
        normkit::BatchNorm2d<P> m(o);
        run_bf16_case<P>(c, m);
      }
    } else if (c.module == "InstanceNorm1d" || c.module == "InstanceNorm2d") {
      normkit::InstanceNormOptions o(c.opt_int("num_features"));
      o.eps(c.opt_double("eps"))
          .momentum(c.opt_double("momentum"))
          .affine(c.opt_bool("affine"))
          .track_running_stats(c.opt_bool("track_running_stats"));
      if (c.module == "InstanceNorm1d") {
        normkit::InstanceNorm1d<P> m(o);
        run_bf16_case<P>(c, m);
      } else {
        normkit::InstanceNorm2d<P> m(o);
        run_bf16_case<P>(c, m);
      }
    } else if (c.module == "LayerNorm") {
      std::vector<Eigen::Index> ns;
      for (long d : c.opt_list("normalized_shape")) ns.push_back(d);
      normkit::LayerNorm<P> m(normkit::LayerNormOptions(ns)
                                  .eps(c.opt_double("eps"))
                                  .elementwise_affine(c.opt_bool("elementwise_affine")));
      run_bf16_case<P>(c, m);
    } else if (c.module == "GroupNorm") {
      normkit::GroupNorm<P> m(
          normkit::GroupNormOptions(c.opt_int("num_groups"), c.opt_int("num_channels"))
              .eps(c.opt_double("eps"))
              .affine(c.opt_bool("affine")));
      run_bf16_case<P>(c, m);
    } else {
      ADD_FAILURE() << c.where() << ": unexpected module " << c.module;
    }
  }
  return n;
}

TEST(LowPrecisionFixtures, Bfloat16ModulesAtLeastAsCloseAsPyTorch) {
  EXPECT_GE(run_bf16_fixtures<bf16>("bfloat16"), 9);
}
TEST(LowPrecisionFixtures, MixedModulesAtLeastAsCloseAsPyTorch) {
  EXPECT_GE(run_bf16_fixtures<float>("float32"), 6);
}

TEST(LowPrecision, BitwiseIdenticalForAnyThreadCount) {
  normkit::set_min_parallel_elements(Eigen::Index{1} << 12);
  using T4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  const auto x = to_low<bf16>(random_tensor<T4>({8, 16, 40, 40}, 11, 2.0f, 1.0f));
  const auto dy = to_low<bf16>(random_tensor<T4>({8, 16, 40, 40}, 12, 0.0f, 1.0f));
  auto run = [&](auto proto, const char* what) {
    SCOPED_TRACE(what);
    auto m1 = proto;
    const auto y1 = m1.forward(x);
    const auto g1 = m1.backward(dy);
    for (int threads : {2, 5}) {
      Eigen::ThreadPool pool(threads);
      Eigen::ThreadPoolDevice dev(&pool, threads);
      auto m = proto;
      const auto y = m.forward(x, dev);
      const auto g = m.backward(dy, dev);
      EXPECT_TRUE(normkit_test::same_bits(y, y1)) << threads;
      EXPECT_TRUE(normkit_test::same_bits(g.input, g1.input)) << threads;
      EXPECT_TRUE(normkit_test::same_bits(g.weight, g1.weight)) << threads;
    }
  };
  run(normkit::BatchNorm2d<float>(16), "BatchNorm2d mixed");
  run(normkit::BatchNorm2d<bf16>(16), "BatchNorm2d bf16");
  run(normkit::LayerNorm<float>(normkit::LayerNormOptions({40, 40})), "LayerNorm mixed");
  run(normkit::RMSNorm<bf16>(normkit::RMSNormOptions({40})), "RMSNorm bf16");
  run(normkit::GroupNorm<float>(normkit::GroupNormOptions(4, 16)), "GroupNorm mixed");
  normkit::set_min_parallel_elements(Eigen::Index{1} << 16);
}

// The baseline ISA copy's vector conversions (kernels/simd.hpp: GCC/Clang generic vectors,
// the NEON path on aarch64, SSE2 on x86-64, F16C for half when the translation unit has it)
// give the bits of the scalar ones: loads for every 16-bit value, stores for floats at and
// around every rounding boundary of both types (ties, NaN payloads, infinities, subnormals,
// overflow).
TEST(LowPrecision, VectorConversionsGiveTheScalarBits) {
  namespace k = normkit::detail::isa_base;
  constexpr std::size_t fw = static_cast<std::size_t>(k::kFW);
  constexpr std::size_t dw = static_cast<std::size_t>(k::kDW);
  auto fbits = [](float v) { return Eigen::numext::bit_cast<std::uint32_t>(v); };
  std::vector<float> fs;
  for (std::uint32_t hi = 0; hi < (1u << 19); ++hi)  // half: 13 bits dropped below a normal
    for (std::uint32_t low : {0x0u, 0x1u, 0xfffu, 0x1000u, 0x1001u, 0x1fffu})
      fs.push_back(Eigen::numext::bit_cast<float>((hi << 13) | low));
  for (std::uint32_t hi = 0; hi < (1u << 16); ++hi)  // bfloat16: 16 bits dropped
    for (std::uint32_t low : {0x0u, 0x1u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu})
      fs.push_back(Eigen::numext::bit_cast<float>((hi << 16) | low));
  while (fs.size() % fw != 0) fs.push_back(0.0f);
  auto check = [&](auto tag) {
    using L = decltype(tag);
    SCOPED_TRACE(type_name<L>());
    std::vector<L> all(65536);
    for (std::size_t b = 0; b < all.size(); ++b)
      all[b] = Eigen::numext::bit_cast<L>(static_cast<std::uint16_t>(b));
    int bad = 0;
    for (std::size_t i = 0; i < all.size(); i += fw) {
      const k::fvec v = k::fload(all.data() + i);
      float got[fw];
      std::memcpy(got, &v, sizeof got);
      for (std::size_t j = 0; j < fw; ++j) {
        const float want = k::to_f(all[i + j]);
        if (fbits(got[j]) != fbits(want) && bad++ < 8)
          ADD_FAILURE() << "fload of 0x" << std::hex << i + j << ": 0x" << fbits(got[j])
                        << ", scalar 0x" << fbits(want);
      }
    }
    for (std::size_t i = 0; i < all.size(); i += dw) {
      const k::dvec v = k::dload(all.data() + i);
      double got[dw];
      std::memcpy(got, &v, sizeof got);
      for (std::size_t j = 0; j < dw; ++j) {
        const double want = static_cast<double>(k::to_f(all[i + j]));
        const bool same = std::isnan(want) ? std::isnan(got[j]) : got[j] == want;
        if (!same && bad++ < 8)
          ADD_FAILURE() << "dload of 0x" << std::hex << i + j << ": " << got[j] << ", scalar "
                        << want;
      }
    }
    std::vector<L> out(fw);
    for (std::size_t i = 0; i < fs.size(); i += fw) {
      k::fstore(out.data(), k::fload(fs.data() + i));
      for (std::size_t j = 0; j < fw; ++j) {
        const auto got = Eigen::numext::bit_cast<std::uint16_t>(out[j]);
        const auto want = Eigen::numext::bit_cast<std::uint16_t>(k::from_f<L>(fs[i + j]));
        if (got != want && bad++ < 8)
          ADD_FAILURE() << "fstore of float 0x" << std::hex << fbits(fs[i + j]) << ": 0x" << got
                        << ", scalar 0x" << want;
      }
    }
    EXPECT_EQ(bad, 0);
  };
  check(bf16{});
  check(f16{});
}

TEST(LowPrecision, KeptInputMustMatchTheGradientsType) {
  Eigen::Tensor<bf16, 2, Eigen::RowMajor> x(4, 8);
  Eigen::Tensor<float, 2, Eigen::RowMajor> dyf(4, 8);
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    x.data()[i] = static_cast<bf16>(static_cast<float>(i % 5));
    dyf.data()[i] = 1.0f;
  }
  normkit::LayerNorm<float> m(normkit::LayerNormOptions({8}));
  const auto y = m.forward(x);
  static_assert(std::is_same<std::decay_t<decltype(y)>::Scalar, bf16>::value,
                "mixed mode returns the input's type");
  EXPECT_THROW((void)m.backward(dyf), normkit::value_error);
  const auto g = m.backward(to_low<bf16>(dyf));
  static_assert(std::is_same<std::decay_t<decltype(g.weight)>::Scalar, float>::value,
                "mixed mode gives parameter gradients in the parameters' type");
  EXPECT_EQ(g.input.size(), 32);
}

TEST(LowPrecision, FreeFunctionsTakeLowPrecisionTensors) {
  using T2 = Eigen::Tensor<float, 2, Eigen::RowMajor>;
  const auto x = to_low<bf16>(random_tensor<T2>({6, 40}, 21, 1.0f, 2.0f));
  Eigen::Tensor<bf16, 1> w = param_values<bf16>(40, 3, 1.0f);
  Eigen::Tensor<bf16, 2, Eigen::RowMajor> y;
  normkit::layer_norm(x, y, normkit::LayerNormFuncOptions<bf16>({40}).weight(w));
  normkit::LayerNorm<bf16> m(normkit::LayerNormOptions({40}).bias(false));
  m.set_weight(w);
  const auto ym = m.forward(x);
  EXPECT_TRUE(normkit_test::same_bits(y, ym));
  Eigen::Tensor<bf16, 2, Eigen::RowMajor> yr;
  normkit::rms_norm(x, yr, normkit::RMSNormFuncOptions<bf16>({40}).weight(w));
  normkit::RMSNorm<bf16> r(normkit::RMSNormOptions({40}));
  r.set_weight(w);
  EXPECT_TRUE(normkit_test::same_bits(yr, r.forward(x)));
  EXPECT_EQ(r.eps(), static_cast<double>(std::numeric_limits<float>::epsilon()));
}

// Mixed precision through the free functions: float parameters (and running statistics),
// bfloat16/half data -- the same bits as the mixed modules.
TEST(LowPrecision, FreeFunctionsTakeFloatParametersWithLowPrecisionData) {
  using T4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  const auto x = to_low<f16>(random_tensor<T4>({2, 4, 5, 6}, 31, 1.0f, 2.0f));
  const auto dy = to_low<f16>(random_tensor<T4>({2, 4, 5, 6}, 32, 0.0f, 1.0f));
  Eigen::Tensor<float, 1> w = param_values<float>(4, 5, 1.0f), b = param_values<float>(4, 6, 0.0f);
  Eigen::Tensor<float, 1> rm(4), rv(4);
  rm.setZero();
  rv.setConstant(1.0f);
  normkit::BatchNorm2d<float> bn(4);
  bn.set_weight(w);
  bn.set_bias(b);
  const auto ym = bn.forward(x);
  const auto gm = bn.backward(x, dy);
  Eigen::Tensor<f16, 4, Eigen::RowMajor> y, dx;
  normkit::SavedStats saved;
  normkit::batch_norm(x, y,
                      normkit::BatchNormFuncOptions<float>()
                          .weight(w)
                          .bias(b)
                          .running_mean(rm)
                          .running_var(rv)
                          .training(true),
                      &saved);
  EXPECT_TRUE(normkit_test::same_bits(y, ym));
  EXPECT_TRUE(normkit_test::same_bits(rm, bn.running_mean()));
  Eigen::Tensor<float, 1> gw(4), gb(4);
  normkit::batch_norm_backward(x, dy, dx, saved, w, gw, gb);
  EXPECT_TRUE(normkit_test::same_bits(dx, gm.input));
  EXPECT_TRUE(normkit_test::same_bits(gw, gm.weight));
  EXPECT_TRUE(normkit_test::same_bits(gb, gm.bias));

  const auto xr = to_low<bf16>(random_tensor<T4>({2, 4, 5, 6}, 33, 1.0f, 2.0f));
  const auto dyr = to_low<bf16>(random_tensor<T4>({2, 4, 5, 6}, 34, 0.0f, 1.0f));
  Eigen::Tensor<float, 1> wl = param_values<float>(30, 7, 1.0f);
  normkit::RMSNorm<float> rms(normkit::RMSNormOptions({5, 6}));
  rms.set_weight(wl);
  const auto yrm = rms.forward(xr);
  const auto grm = rms.backward(xr, dyr);
  Eigen::Tensor<bf16, 4, Eigen::RowMajor> yr, dxr;
  normkit::rms_norm(xr, yr, normkit::RMSNormFuncOptions<float>({5, 6}).weight(wl), &saved);
  EXPECT_TRUE(normkit_test::same_bits(yr, yrm));
  Eigen::Tensor<float, 1> gwl(30);
  normkit::rms_norm_backward(xr, dyr, dxr, saved, {5, 6}, wl, gwl);
  EXPECT_TRUE(normkit_test::same_bits(dxr, grm.input));
  EXPECT_TRUE(normkit_test::same_bits(gwl, grm.weight));
  // The braced form takes the input's type: all-bfloat16 with no parameters.
  const auto yl = normkit::layer_norm(xr, {5, 6});
  static_assert(std::is_same<std::decay_t<decltype(yl)>::Scalar, bf16>::value, "bfloat16 out");
  normkit::GroupNorm<float> gn(normkit::GroupNormOptions(2, 4));
  const auto ygm = gn.forward(xr);
  const auto ygf = normkit::group_norm(
      xr, normkit::GroupNormFuncOptions<float>(2).weight(gn.weight()).bias(gn.bias()));
  EXPECT_TRUE(normkit_test::same_bits(ygf, ygm));
}

}  // namespace
