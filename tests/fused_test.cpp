// Fused epilogues (normkit's deployment path): forward_fused, y = act(norm(x) + residual), on
// BatchNorm, InstanceNorm and GroupNorm, and forward_add, h = x + residual then y = norm(h), on
// LayerNorm and RMSNorm. Per ISA level this CPU runs:
//  - forward_fused against the unfused module's output z: y = act(z + residual) evaluated in
//    double from z (within a few float roundings; the activation polynomials within 2e-6),
//    with every activation, with and without a residual, training and evaluation, RowMajor,
//    ColMajor and channels-last, float, double and bfloat16 input;
//  - the fused forward changes the module exactly as forward does (running statistics,
//    counter, saved statistics, bit for bit), and backward_fused(ReLU) is backward(x, dy*(y>0));
//  - forward_add: h and y bit-identical to adding and then normalizing, for any thread count,
//    and backward afterwards equal to backward after forward(h);
//  - errors (wrong residual dims, SiLU/GELU backward) throw and leave the module bit-identical.
#define EIGEN_USE_THREADS
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/bits.hpp"
#include "support/isa_param.hpp"
#include "support/state.hpp"

namespace {

using Idx = Eigen::Index;
using normkit::Activation;

constexpr Activation kActs[] = {Activation::identity, Activation::relu, Activation::silu,
                                Activation::gelu, Activation::gelu_tanh};

double act_ref(Activation a, double z) {
  switch (a) {
    case Activation::relu:
      return z < 0 ? 0.0 : z;
    case Activation::silu:
      return z / (1.0 + std::exp(-z));
    case Activation::gelu:
      return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case Activation::gelu_tanh: {
      const double k = std::sqrt(2.0 / 3.14159265358979323846);
      return 0.5 * z * (1.0 + std::tanh(k * (z + 0.044715 * z * z * z)));
    }
    case Activation::identity:
      break;
  }
  return z;
}

const char* act_name(Activation a) {
  switch (a) {
    case Activation::relu:
      return "relu";
    case Activation::silu:
      return "silu";
    case Activation::gelu:
      return "gelu";
    case Activation::gelu_tanh:
      return "gelu_tanh";
    case Activation::identity:
      break;
  }
  return "identity";
}

template <class T>
double tol_unit() {
  if (std::is_same<T, double>::value)
    return 1e-13;
  if (std::is_same<T, float>::value)
    return 2e-6;
  return 1.0 / 128;  // bfloat16: 8 significand bits, one rounding each of z, r and y
}

/// y = act(z + r) elementwise, within tolerance of the double evaluation from z and r.
template <class Y, class Z>
::testing::AssertionResult epilogue_matches(const Y& y, const Z& z, const Z* r, Activation act) {
  using T = typename Y::Scalar;
  const double tol = tol_unit<T>();
  for (Idx i = 0; i < y.size(); ++i) {
    const double zi =
        static_cast<double>(z.data()[i]) + (r ? static_cast<double>(r->data()[i]) : 0.0);
    const double want = act_ref(act, zi);
    const double got = static_cast<double>(y.data()[i]);
    // z + r is rounded once in T (on the unfused side too): allow that rounding of the input
    // of the activation, whose slope is at most about 1.13.
    const double scale = 1.0 + std::abs(zi) + std::abs(want);
    if (!(std::abs(got - want) <= tol * scale)) {
      return ::testing::AssertionFailure() << act_name(act) << ": element " << i << " is " << got
                                           << ", expected " << want << " (z + r = " << zi << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

template <class T, int R, int L>
Eigen::Tensor<T, R, L> random_tensor(const std::array<Idx, R>& dims,
                                     unsigned seed,
                                     double offset = 0) {
  Eigen::Tensor<float, R, L> f(dims);
  std::srand(seed);
  f.setRandom();  // [0, 1)
  Eigen::Tensor<T, R, L> t(dims);
  for (Idx i = 0; i < t.size(); ++i)
    t.data()[i] = static_cast<T>(4.0 * (static_cast<double>(f.data()[i]) - 0.5) + offset);
  return t;
}

template <class M, class = void>
struct has_bias : std::false_type {};
template <class M>
struct has_bias<M, std::void_t<decltype(std::declval<const M&>().bias())>> : std::true_type {};

/// Gives the module non-trivial affine parameters.
template <class M>
void perturb_affine(M& m) {
  auto w = m.weight();
  using P = typename std::decay_t<decltype(w)>::Scalar;
  for (Idx i = 0; i < w.size(); ++i) w(i) = static_cast<P>(0.5 + 0.25 * static_cast<double>(i % 5));
  if (w.size())
    m.set_weight(w);
  if constexpr (has_bias<M>::value) {
    auto b = m.bias();
    for (Idx i = 0; i < b.size(); ++i)
      b(i) = static_cast<P>(-0.3 + 0.2 * static_cast<double>(i % 4));
    if (b.size())
      m.set_bias(b);
  }
}

/// The module's state, bitwise (tests/support/state.hpp; RMSNorm has no bias).
template <class M>
normkit_test::State state_of(const M& m) {
  if constexpr (has_bias<M>::value) {
    return normkit_test::snapshot(m);
  } else {
    normkit_test::State s;
    s.add("weight", normkit_test::blob_of(m.weight()));
    s.add("is_training", normkit_test::blob_of_value(m.is_training()));
    s.add("saved_stats.mean", normkit_test::blob_of(m.saved_stats().mean));
    s.add("saved_stats.rstd", normkit_test::blob_of(m.saved_stats().rstd));
    return s;
  }
}

/// One module type on one input layout: for every activation and with/without a residual,
/// train (twice, so running statistics evolve) and evaluate a fused and an unfused twin.
template <class M, class X>
void check_module(M make(), const X& x, const X& r) {
  for (Activation act : kActs) {
    for (bool with_res : {false, true}) {
      SCOPED_TRACE(std::string(act_name(act)) + (with_res ? " + residual" : ""));
      M fused = make();
      M plain = make();
      perturb_affine(fused);
      perturb_affine(plain);
      for (int step = 0; step < 3; ++step) {
        if (step == 2) {
          fused.eval();
          plain.eval();
        }
        const X z = plain.forward(x);
        const X y = with_res ? fused.forward_fused(x, r, act) : fused.forward_fused(x, act);
        ASSERT_EQ(y.dimensions(), x.dimensions());
        EXPECT_TRUE(epilogue_matches(y, z, with_res ? &r : nullptr, act)) << "step " << step;
        // The module changed exactly as forward changes it.
        EXPECT_TRUE(
            normkit_test::same_state(normkit_test::snapshot(plain), normkit_test::snapshot(fused)))
            << "step " << step;
      }
    }
  }
}

template <class T, int L>
using T4 = Eigen::Tensor<T, 4, L>;

class FusedForward : public normkit_test::PerIsa {};

TEST_P(FusedForward, BatchNorm2dRowMajor) {
  const auto x = random_tensor<float, 4, Eigen::RowMajor>({3, 5, 7, 9}, 1, 0.5);
  const auto r = random_tensor<float, 4, Eigen::RowMajor>({3, 5, 7, 9}, 2);
  check_module<normkit::BatchNorm2d<float>>(
      +[] { return normkit::BatchNorm2d<float>(5); }, x, r);
}

TEST_P(FusedForward, BatchNorm2dColMajorDouble) {
  const auto x = random_tensor<double, 4, Eigen::ColMajor>({4, 3, 6, 5}, 3, -1.0);
  const auto r = random_tensor<double, 4, Eigen::ColMajor>({4, 3, 6, 5}, 4);
  check_module<normkit::BatchNorm2d<double>>(
      +[] { return normkit::BatchNorm2d<double>(3); }, x, r);
}

TEST_P(FusedForward, BatchNorm2dChannelsLast) {
  // (N, H, W, C) dims, RowMajor: NHWC storage, the column-mode apply.
  const auto x = random_tensor<float, 4, Eigen::RowMajor>({2, 5, 7, 19}, 5, 2.0);
  const auto r = random_tensor<float, 4, Eigen::RowMajor>({2, 5, 7, 19}, 6);
  check_module<normkit::BatchNorm2d<float>>(
      +[] {
        return normkit::BatchNorm2d<float>(normkit::BatchNormOptions(19).channels_last(true));
      },
      x, r);
}

TEST_P(FusedForward, BatchNorm1dFullyConnected) {
  const auto x = random_tensor<float, 2, Eigen::RowMajor>({33, 21}, 7);
  const auto r = random_tensor<float, 2, Eigen::RowMajor>({33, 21}, 8);
  check_module<normkit::BatchNorm1d<float>>(
      +[] { return normkit::BatchNorm1d<float>(21); }, x, r);
}

TEST_P(FusedForward, InstanceNorm2dAffineAndPlain) {
  const auto x = random_tensor<float, 4, Eigen::RowMajor>({2, 4, 9, 11}, 9, 3.0);
  const auto r = random_tensor<float, 4, Eigen::RowMajor>({2, 4, 9, 11}, 10);
  check_module<normkit::InstanceNorm2d<float>>(
      +[] { return normkit::InstanceNorm2d<float>(normkit::InstanceNormOptions(4).affine(true)); },
      x, r);
  check_module<normkit::InstanceNorm2d<float>>(
      +[] {
        return normkit::InstanceNorm2d<float>(
            normkit::InstanceNormOptions(4).track_running_stats(true));
      },
      x, r);
}

TEST_P(FusedForward, GroupNorm) {
  const auto x = random_tensor<float, 4, Eigen::RowMajor>({2, 8, 5, 6}, 11, -2.0);
  const auto r = random_tensor<float, 4, Eigen::RowMajor>({2, 8, 5, 6}, 12);
  check_module<normkit::GroupNorm<float>>(
      +[] { return normkit::GroupNorm<float>(normkit::GroupNormOptions(4, 8)); }, x, r);
  const auto xc = random_tensor<float, 4, Eigen::ColMajor>({2, 8, 5, 6}, 13);
  const auto rc = random_tensor<float, 4, Eigen::ColMajor>({2, 8, 5, 6}, 14);
  check_module<normkit::GroupNorm<float>>(
      +[] { return normkit::GroupNorm<float>(normkit::GroupNormOptions(2, 8)); }, xc, rc);
}

TEST_P(FusedForward, BFloat16InputFloatModule) {
  const auto x = random_tensor<Eigen::bfloat16, 4, Eigen::RowMajor>({2, 6, 8, 8}, 15, 1.0);
  const auto r = random_tensor<Eigen::bfloat16, 4, Eigen::RowMajor>({2, 6, 8, 8}, 16);
  check_module<normkit::BatchNorm2d<float>>(
      +[] { return normkit::BatchNorm2d<float>(6); }, x, r);
}

TEST_P(FusedForward, OutputIntoResidualStorage) {
  // y may be the residual's storage (the in-place "out += norm(x)" of a ResNet block).
  const auto x = random_tensor<float, 4, Eigen::RowMajor>({2, 3, 10, 10}, 17);
  auto r = random_tensor<float, 4, Eigen::RowMajor>({2, 3, 10, 10}, 18);
  normkit::BatchNorm2d<float> a(3), b(3);
  const auto want = a.forward_fused(x, r, Activation::relu);
  Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>> out(r.data(), r.dimensions());
  b.forward_fused(x, r, Activation::relu, out);
  EXPECT_TRUE(normkit_test::same_bits(want, r));
}

TEST_P(FusedForward, ReluKeepsNaNAndClearsNegatives) {
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(4, 2), r(4, 2);
  x.setValues({{1, 2}, {3, 4}, {5, std::numeric_limits<float>::quiet_NaN()}, {7, 8}});
  r.setZero();
  normkit::BatchNorm1d<float> bn(2);
  bn.eval();  // running mean 0, var 1: y = x / sqrt(1 + eps)
  x(0, 0) = -1.0f;
  const auto y = bn.forward_fused(x, r, Activation::relu);
  EXPECT_EQ(y(0, 0), 0.0f);
  EXPECT_FALSE(std::signbit(y(0, 0)));
  EXPECT_GT(y(1, 0), 0.0f);
  EXPECT_TRUE(std::isnan(y(2, 1)));
}

TEST_P(FusedForward, BackwardReluIsBackwardOfMaskedGradient) {
  const auto x = random_tensor<float, 4, Eigen::RowMajor>({3, 4, 6, 6}, 19);
  const auto r = random_tensor<float, 4, Eigen::RowMajor>({3, 4, 6, 6}, 20);
  const auto dy = random_tensor<float, 4, Eigen::RowMajor>({3, 4, 6, 6}, 21);
  normkit::BatchNorm2d<float> fused(4), plain(4);
  const auto y = fused.forward_fused(x, r, Activation::relu);
  plain.forward(x);
  Eigen::Tensor<float, 4, Eigen::RowMajor> masked(dy.dimensions());
  for (Idx i = 0; i < dy.size(); ++i) masked.data()[i] = y.data()[i] > 0 ? dy.data()[i] : 0.0f;
  const auto g = fused.backward_fused(x, y, dy, Activation::relu);
  const auto want = plain.backward(x, masked);
  EXPECT_TRUE(normkit_test::same_bits(g.input, want.input));
  EXPECT_TRUE(normkit_test::same_bits(g.weight, want.weight));
  EXPECT_TRUE(normkit_test::same_bits(g.bias, want.bias));
  EXPECT_TRUE(normkit_test::same_bits(g.residual, masked));
  // identity: the residual's gradient is dy itself.
  const auto gi = fused.backward_fused(x, y, dy, Activation::identity);
  EXPECT_TRUE(normkit_test::same_bits(gi.residual, dy));

  normkit::GroupNorm<float> gf(normkit::GroupNormOptions(2, 4)),
      gp(normkit::GroupNormOptions(2, 4));
  const auto yg = gf.forward_fused(x, r, Activation::relu);
  for (Idx i = 0; i < dy.size(); ++i) masked.data()[i] = yg.data()[i] > 0 ? dy.data()[i] : 0.0f;
  const auto gg = gf.backward_fused(x, yg, dy, Activation::relu);
  const auto wg = gp.backward(x, masked);
  EXPECT_TRUE(normkit_test::same_bits(gg.input, wg.input));
  EXPECT_TRUE(normkit_test::same_bits(gg.weight, wg.weight));
}

TEST_P(FusedForward, ErrorsLeaveTheModuleUnchanged) {
  const auto x = random_tensor<float, 4, Eigen::RowMajor>({2, 3, 4, 4}, 22);
  const auto bad = random_tensor<float, 4, Eigen::RowMajor>({2, 3, 4, 5}, 23);
  normkit::BatchNorm2d<float> bn(3);
  const auto y = bn.forward_fused(x, Activation::relu);
  const auto before = normkit_test::snapshot(bn);
  try {
    bn.forward_fused(x, bad, Activation::relu);
    ADD_FAILURE() << "expected shape_error";
  } catch (const normkit::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("[normkit.BatchNorm2d]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("residual"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(normkit_test::same_state(before, normkit_test::snapshot(bn)));
  for (Activation act : {Activation::silu, Activation::gelu, Activation::gelu_tanh}) {
    EXPECT_THROW(bn.backward_fused(x, y, y, act), normkit::value_error);
    EXPECT_TRUE(normkit_test::same_state(before, normkit_test::snapshot(bn)));
  }
  normkit::GroupNorm<float> gn(normkit::GroupNormOptions(1, 3));
  gn.forward(x);
  const auto gbefore = normkit_test::snapshot(gn);
  EXPECT_THROW(gn.forward_fused(x, bad, Activation::identity), normkit::shape_error);
  EXPECT_TRUE(normkit_test::same_state(gbefore, normkit_test::snapshot(gn)));
}

NORMKIT_INSTANTIATE_PER_ISA(FusedForward);

// ---- forward_add (LayerNorm, RMSNorm) ----

template <class M, class X>
void check_add(M make(), const X& x, const X& r) {
  M fused = make();
  M plain = make();
  perturb_affine(fused);
  perturb_affine(plain);
  X h;
  const X y = fused.forward_add(x, r, h);
  X h_ref(x.dimensions());
  using S = typename X::Scalar;
  for (Idx i = 0; i < x.size(); ++i) {
    h_ref.data()[i] =
        static_cast<S>(static_cast<float>(x.data()[i]) + static_cast<float>(r.data()[i]));
  }
  if constexpr (std::is_same<S, double>::value) {
    for (Idx i = 0; i < x.size(); ++i) h_ref.data()[i] = x.data()[i] + r.data()[i];
  }
  const X y_ref = plain.forward(h_ref);
  EXPECT_TRUE(normkit_test::same_bits(h, h_ref));
  EXPECT_TRUE(normkit_test::same_bits(y, y_ref));
  EXPECT_TRUE(normkit_test::same_state(
      normkit_test::snapshot_tensors({"mean", "rstd"}, plain.saved_stats().mean,
                                     plain.saved_stats().rstd),
      normkit_test::snapshot_tensors({"mean", "rstd"}, fused.saved_stats().mean,
                                     fused.saved_stats().rstd)));
  // backward after forward_add is backward after forward(h): the kept input is h.
  const X dy = random_tensor<S, X::NumDimensions, X::Layout>(
      [&] {
        std::array<Idx, X::NumDimensions> d{};
        for (int i = 0; i < X::NumDimensions; ++i)
          d[static_cast<std::size_t>(i)] = x.dimension(static_cast<std::size_t>(i));
        return d;
      }(),
      99);
  const auto g = fused.backward(dy);
  const auto want = plain.backward(dy);
  EXPECT_TRUE(normkit_test::same_bits(g.input, want.input));
  EXPECT_TRUE(normkit_test::same_bits(g.weight, want.weight));
  // Two threads: the same bits.
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice dev(&pool, 2);
  M threaded = make();
  perturb_affine(threaded);
  X h2;
  const X y2 = threaded.forward_add(x, r, h2, dev);
  EXPECT_TRUE(normkit_test::same_bits(h2, h_ref));
  EXPECT_TRUE(normkit_test::same_bits(y2, y_ref));
}

class FusedAdd : public normkit_test::PerIsa {};

TEST_P(FusedAdd, LayerNorm) {
  // Enough rows for several blocks of the fused loop (and for the thread pool).
  const auto x = random_tensor<float, 3, Eigen::RowMajor>({8, 77, 256}, 31, 1.0);
  const auto r = random_tensor<float, 3, Eigen::RowMajor>({8, 77, 256}, 32);
  check_add<normkit::LayerNorm<float>>(
      +[] { return normkit::LayerNorm<float>(normkit::LayerNormOptions({256})); }, x, r);
  check_add<normkit::LayerNorm<float>>(
      +[] {
        return normkit::LayerNorm<float>(normkit::LayerNormOptions({77, 256}));
      },
      x, r);
  const auto xc = random_tensor<double, 3, Eigen::ColMajor>({6, 5, 40}, 33);
  const auto rc = random_tensor<double, 3, Eigen::ColMajor>({6, 5, 40}, 34);
  check_add<normkit::LayerNorm<double>>(
      +[] { return normkit::LayerNorm<double>(normkit::LayerNormOptions({40})); }, xc, rc);
}

TEST_P(FusedAdd, RMSNormBFloat16) {
  const auto x = random_tensor<Eigen::bfloat16, 2, Eigen::RowMajor>({300, 512}, 35, 0.5);
  const auto r = random_tensor<Eigen::bfloat16, 2, Eigen::RowMajor>({300, 512}, 36);
  check_add<normkit::RMSNorm<float>>(
      +[] { return normkit::RMSNorm<float>(normkit::RMSNormOptions({512})); }, x, r);
  const auto xf = random_tensor<float, 2, Eigen::ColMajor>({64, 48}, 37);
  const auto rf = random_tensor<float, 2, Eigen::ColMajor>({64, 48}, 38);
  check_add<normkit::RMSNorm<float>>(
      +[] { return normkit::RMSNorm<float>(normkit::RMSNormOptions({48})); }, xf, rf);
}

TEST_P(FusedAdd, HIntoResidualStorageAndErrors) {
  const auto x = random_tensor<float, 2, Eigen::RowMajor>({10, 32}, 39);
  auto r = random_tensor<float, 2, Eigen::RowMajor>({10, 32}, 40);
  normkit::LayerNorm<float> a(normkit::LayerNormOptions({32})), b(normkit::LayerNormOptions({32}));
  Eigen::Tensor<float, 2, Eigen::RowMajor> h;
  const auto want = a.forward_add(x, r, h);
  Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>> stream(r.data(), 10, 32);
  const auto got = b.forward_add(x, r, stream);  // the residual stream updated in place
  EXPECT_TRUE(normkit_test::same_bits(got, want));
  EXPECT_TRUE(normkit_test::same_bits(r, h));
  // Into a caller's y (no allocation): the same bits.
  normkit::LayerNorm<float> c(normkit::LayerNormOptions({32}));
  Eigen::Tensor<float, 2, Eigen::RowMajor> h3, y3(10, 32);
  auto r0 = random_tensor<float, 2, Eigen::RowMajor>({10, 32}, 40);
  c.forward_add(x, r0, h3, y3);
  EXPECT_TRUE(normkit_test::same_bits(y3, want));
  EXPECT_TRUE(normkit_test::same_bits(h3, h));

  const auto bad = random_tensor<float, 2, Eigen::RowMajor>({10, 31}, 41);
  const auto before = normkit_test::snapshot(b);
  const auto h_before = normkit_test::snapshot_tensors({"h"}, h);
  EXPECT_THROW(b.forward_add(x, bad, h), normkit::shape_error);
  EXPECT_TRUE(normkit_test::same_state(before, normkit_test::snapshot(b)));
  EXPECT_TRUE(normkit_test::same_state(h_before, normkit_test::snapshot_tensors({"h"}, h)));
  normkit::RMSNorm<float> rn(normkit::RMSNormOptions({32}));
  const auto rbefore = state_of(rn);
  try {
    rn.forward_add(x, bad, h);
    ADD_FAILURE() << "expected shape_error";
  } catch (const normkit::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("[normkit.RMSNorm]"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(normkit_test::same_state(rbefore, state_of(rn)));
}

NORMKIT_INSTANTIATE_PER_ISA(FusedAdd);

}  // namespace
