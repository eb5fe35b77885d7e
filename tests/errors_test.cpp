// Error conditions (docs/semantics.md §7) and the stricter rules of §11.1, §11.4 and §11.5 for
// every module and free function: exact exception type, a message that names the module and the
// offending numbers, and state that is bit-identical after a rejected call. Also the edge
// cases that must be accepted. Wrong ranks for the modules are compile-time errors
// (static_assert) and are not tested here.
#include <cctype>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/state.hpp"

namespace {

using Idx = Eigen::Index;
using normkit::shape_error;
using normkit::value_error;
using normkit_test::same_state;
using normkit_test::snapshot;
using normkit_test::snapshot_tensors;
using Vec = Eigen::Tensor<double, 1>;
template <int R>
using RT = Eigen::Tensor<double, R, Eigen::RowMajor>;
template <int R>
using CT = Eigen::Tensor<double, R, Eigen::ColMajor>;
template <int R>
using RMap = Eigen::TensorMap<RT<R>>;

// ---------------------------------------------------------------------------------------
// Helpers

/// A deterministic pseudo-random tensor of the given dims.
template <int L = Eigen::RowMajor, class... D>
Eigen::Tensor<double, static_cast<int>(sizeof...(D)), L> input(D... d) {
  Eigen::Tensor<double, static_cast<int>(sizeof...(D)), L> t(static_cast<Idx>(d)...);
  static unsigned calls = 0;
  std::mt19937 rng(12345u + calls++);
  std::uniform_real_distribution<double> u(-2.0, 2.0);
  for (Idx i = 0; i < t.size(); ++i) t.data()[i] = u(rng);
  return t;
}

Vec ramp(Idx n, double start, double step) {
  Vec t(n);
  for (Idx i = 0; i < n; ++i) t(i) = start + step * static_cast<double>(i);
  return t;
}

/// What a message must contain: a literal substring, or an integer as a whole token
/// (so 3 does not match inside 13, 0.3 or -3).
struct Needle {
  Needle(const char* s) : text(s) {}                        // NOLINT: implicit by design
  Needle(std::string s) : text(std::move(s)) {}             // NOLINT
  Needle(int v) : text(std::to_string(v)), number(true) {}  // NOLINT
  std::string text;
  bool number = false;
};

bool is_num_char(char c) {
  return std::isdigit(static_cast<unsigned char>(c)) != 0;
}

bool contains(const std::string& msg, const Needle& n) {
  if (!n.number)
    return msg.find(n.text) != std::string::npos;
  for (std::size_t pos = msg.find(n.text); pos != std::string::npos;
       pos = msg.find(n.text, pos + 1)) {
    const bool lead_ok = pos == 0 || !(is_num_char(msg[pos - 1]) || msg[pos - 1] == '.' ||
                                       (msg[pos - 1] == '-' && n.text[0] != '-'));
    const std::size_t end = pos + n.text.size();
    const bool trail_ok = end >= msg.size() ||
                          !(is_num_char(msg[end]) ||
                            (msg[end] == '.' && end + 1 < msg.size() && is_num_char(msg[end + 1])));
    if (lead_ok && trail_ok)
      return true;
  }
  return false;
}

const char* kind_of(const std::exception& e) {
  if (dynamic_cast<const normkit::shape_error*>(&e))
    return "normkit::shape_error";
  if (dynamic_cast<const normkit::value_error*>(&e))
    return "normkit::value_error";
  if (dynamic_cast<const normkit::error*>(&e))
    return "normkit::error";
  if (dynamic_cast<const std::invalid_argument*>(&e))
    return "std::invalid_argument";
  return typeid(e).name();
}
template <class E>
const char* name_of() {
  return std::is_same<E, shape_error>::value ? "normkit::shape_error" : "normkit::value_error";
}

/// Success iff f throws exactly E (not a sibling or base) with every needle in what().
template <class E, class F>
::testing::AssertionResult Throws(F&& f, std::initializer_list<Needle> needles) {
  try {
    f();
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    if (typeid(e) != typeid(E)) {
      return ::testing::AssertionFailure()
             << "threw " << kind_of(e) << " instead of " << name_of<E>() << ": \"" << msg << "\"";
    }
    for (const Needle& n : needles) {
      if (!contains(msg, n)) {
        return ::testing::AssertionFailure()
               << "message \"" << msg << "\" lacks " << (n.number ? "the number " : "") << "\""
               << n.text << "\"";
      }
    }
    return ::testing::AssertionSuccess() << msg;
  }
  return ::testing::AssertionFailure() << "no exception (expected " << name_of<E>() << ")";
}

/// Throws<E>, and the state that snap() captures is bit-identical before and after.
template <class E, class Snap, class F>
::testing::AssertionResult RejectsKeeping(Snap&& snap,
                                          F&& f,
                                          std::initializer_list<Needle> needles) {
  const normkit_test::State before = snap();
  ::testing::AssertionResult r = Throws<E>(std::forward<F>(f), needles);
  if (!r)
    return r;
  ::testing::AssertionResult s = same_state(before, snap());
  if (!s)
    return ::testing::AssertionFailure()
           << "threw as expected, but the state changed: " << s.message();
  return ::testing::AssertionSuccess();
}

/// Throws<E>, and the module's state (snapshot()) is bit-identical before and after.
template <class E, class M, class F>
::testing::AssertionResult RejectsUnchanged(M& m, F&& f, std::initializer_list<Needle> needles) {
  return RejectsKeeping<E>([&] { return snapshot(m); }, std::forward<F>(f), needles);
}

/// Gives a module non-default parameters and, when it has them, running statistics and a
/// counter, so that any change made by a rejected call is visible.
template <class M>
void prime(M& m, Idx channels) {
  (void)channels;
  if (m.weight().size())
    m.set_weight(ramp(m.weight().size(), 0.75, 0.125));
  if (m.bias().size())
    m.set_bias(ramp(m.bias().size(), -0.5, 0.25));
  if constexpr (normkit_test::has_running_stats_v<M>) {
    if (m.running_mean().size()) {
      m.set_running_mean(ramp(channels, 0.3, -0.2));
      m.set_running_var(ramp(channels, 0.9, 0.35));
    }
    m.set_num_batches_tracked(7);
  }
}

template <class T>
::testing::AssertionResult bitwise_equal(const T& a, const T& b) {
  return same_state(snapshot_tensors({"a"}, a), snapshot_tensors({"a"}, b));
}

// ---------------------------------------------------------------------------------------
// The helpers themselves: a checker that cannot fail checks nothing.

TEST(Helpers, ThrowsAndSameStateCanFail) {
  auto shape = [] { throw normkit::shape_error("[normkit.X] expected 3 channels, got [4, 13]"); };
  EXPECT_TRUE(Throws<shape_error>(shape, {"[normkit.X]", 3, 4, 13, "[4, 13]"}));
  EXPECT_FALSE(Throws<value_error>(shape, {}));               // sibling type
  EXPECT_FALSE(Throws<shape_error>(shape, {"[normkit.Y]"}));  // missing text
  EXPECT_FALSE(Throws<shape_error>(shape, {1}));              // 1 only inside 13
  EXPECT_FALSE(Throws<shape_error>(shape, {5}));
  EXPECT_FALSE(Throws<shape_error>([] {}, {}));                                     // no exception
  EXPECT_FALSE(Throws<shape_error>([] { throw std::invalid_argument("x"); }, {}));  // base type
  auto neg = [] { throw normkit::value_error("got -1 and 0.5"); };
  EXPECT_TRUE(Throws<value_error>(neg, {-1}));
  EXPECT_FALSE(Throws<value_error>(neg, {1}));
  EXPECT_FALSE(Throws<value_error>(neg, {0}));
  normkit::BatchNorm1d<double> bn(3);
  const auto before = snapshot(bn);
  EXPECT_TRUE(same_state(before, snapshot(bn)));
  bn.set_num_batches_tracked(1);
  EXPECT_FALSE(same_state(before, snapshot(bn)));
  bn.set_num_batches_tracked(0);
  Vec rm = bn.running_mean();
  rm(1) = -0.0;  // bitwise, not numerically, different
  bn.set_running_mean(rm);
  EXPECT_FALSE(same_state(before, snapshot(bn)));
  EXPECT_FALSE(RejectsUnchanged<value_error>(bn,
                                             [&] {
                                               bn.set_num_batches_tracked(5);
                                               throw normkit::value_error("x");
                                             },
                                             {}));
}

// ---------------------------------------------------------------------------------------
// Exception hierarchy

TEST(ErrorTypes, BothDeriveFromInvalidArgument) {
  static_assert(std::is_base_of<std::invalid_argument, normkit::shape_error>::value, "shape_error");
  static_assert(std::is_base_of<std::invalid_argument, normkit::value_error>::value, "value_error");
  static_assert(!std::is_base_of<normkit::shape_error, normkit::value_error>::value, "siblings");
  static_assert(!std::is_base_of<normkit::value_error, normkit::shape_error>::value, "siblings");
  normkit::BatchNorm1d<double> bn(3);
  const auto x = input(4, 5);
  EXPECT_THROW((void)bn.forward(x), std::invalid_argument);
  EXPECT_THROW((void)normkit::GroupNorm<double>(normkit::GroupNormOptions(3, 4)),
               std::invalid_argument);
  try {
    (void)bn.forward(x);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("[normkit.BatchNorm1d]"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------
// docs/semantics.md §11.4: options validated at construction

template <class M, class O>
void expect_bn_like_option_errors(const char* tag) {
  SCOPED_TRACE(tag);
  EXPECT_TRUE(Throws<value_error>([] { M m(O(3).eps(-1)); }, {tag, "eps", -1}));
  EXPECT_TRUE(Throws<value_error>([] { M m(O(3).eps(-1e-5)); }, {tag, "eps", "-1e-05"}));
  EXPECT_TRUE(Throws<value_error>([] { M m(O(3).momentum(1.5)); }, {tag, "momentum", "1.5"}));
  EXPECT_TRUE(Throws<value_error>([] { M m(O(3).momentum(-0.25)); }, {tag, "momentum", "-0.25"}));
  EXPECT_TRUE(Throws<value_error>([] { M m(O(3).momentum(2.0).track_running_stats(false)); },
                                  {tag, "momentum", 2}));
  EXPECT_TRUE(Throws<value_error>([] { M m(O(-2)); }, {tag, "num_features", -2}));
  // Accepted: eps = 0, momentum 0 and 1.
  EXPECT_NO_THROW((void)M(O(3).eps(0)));
  EXPECT_NO_THROW((void)M(O(3).momentum(0.0)));
  EXPECT_NO_THROW((void)M(O(3).momentum(1.0)));
}

TEST(Options, BatchNormRejectsBadOptions) {
  using O = normkit::BatchNormOptions;
  expect_bn_like_option_errors<normkit::BatchNorm1d<double>, O>("[normkit.BatchNorm1d]");
  expect_bn_like_option_errors<normkit::BatchNorm2d<double>, O>("[normkit.BatchNorm2d]");
  expect_bn_like_option_errors<normkit::BatchNorm3d<float>, O>("[normkit.BatchNorm3d]");
  // momentum none is BatchNorm's cumulative average: accepted.
  EXPECT_NO_THROW(
      (void)normkit::BatchNorm1d<double>(normkit::BatchNormOptions(3).momentum(std::nullopt)));
}

TEST(Options, InstanceNormRejectsBadOptions) {
  using O = normkit::InstanceNormOptions;
  expect_bn_like_option_errors<normkit::InstanceNorm1d<double>, O>("[normkit.InstanceNorm1d]");
  expect_bn_like_option_errors<normkit::InstanceNorm2d<double>, O>("[normkit.InstanceNorm2d]");
  expect_bn_like_option_errors<normkit::InstanceNorm3d<float>, O>("[normkit.InstanceNorm3d]");
  // momentum none: PyTorch fails at forward (TypeError), tracking or not; normkit at construction.
  for (bool tracking : {false, true}) {
    EXPECT_TRUE(Throws<value_error>(
        [&] {
          normkit::InstanceNorm1d<double> m(
              normkit::InstanceNormOptions(3).momentum(std::nullopt).track_running_stats(tracking));
        },
        {"[normkit.InstanceNorm1d]", "momentum", "none"}));
    EXPECT_TRUE(Throws<value_error>(
        [&] {
          normkit::InstanceNorm2d<double> m(
              normkit::InstanceNormOptions(3).momentum(std::nullopt).track_running_stats(tracking));
        },
        {"[normkit.InstanceNorm2d]", "momentum", "none"}));
    EXPECT_TRUE(Throws<value_error>(
        [&] {
          normkit::InstanceNorm3d<double> m(
              normkit::InstanceNormOptions(3).momentum(std::nullopt).track_running_stats(tracking));
        },
        {"[normkit.InstanceNorm3d]", "momentum", "none"}));
  }
}

TEST(Options, LayerNormRejectsBadOptions) {
  EXPECT_TRUE(Throws<value_error>(
      [] {
        normkit::LayerNorm<double> m(normkit::LayerNormOptions(std::vector<normkit::Index>{}));
      },
      {"[normkit.LayerNorm]", "normalized_shape = []"}));
  EXPECT_TRUE(Throws<value_error>(
      [] { normkit::LayerNorm<double> m(normkit::LayerNormOptions({4}).eps(-1)); },
      {"[normkit.LayerNorm]", "eps", -1}));
  EXPECT_TRUE(Throws<value_error>(
      [] {
        normkit::LayerNorm<double> m(normkit::LayerNormOptions({3, -2}));
      },
      {"[normkit.LayerNorm]", -2}));
  EXPECT_NO_THROW((void)normkit::LayerNorm<double>(normkit::LayerNormOptions({4}).eps(0)));
}

TEST(Options, GroupNormRejectsBadOptions) {
  using GN = normkit::GroupNorm<double>;
  using O = normkit::GroupNormOptions;
  EXPECT_TRUE(Throws<value_error>([] { GN m(O(0, 4)); }, {"[normkit.GroupNorm]", "num groups", 0}));
  EXPECT_TRUE(
      Throws<value_error>([] { GN m(O(-1, 4)); }, {"[normkit.GroupNorm]", "num groups", -1}));
  EXPECT_TRUE(
      Throws<value_error>([] { GN m(O(3, 4)); }, {"[normkit.GroupNorm]", "divisible", 3, 4}));
  EXPECT_TRUE(
      Throws<value_error>([] { GN m(O(4, 6)); }, {"[normkit.GroupNorm]", "divisible", 4, 6}));
  EXPECT_TRUE(
      Throws<value_error>([] { GN m(O(2, 4).eps(-0.5)); }, {"[normkit.GroupNorm]", "eps", "-0.5"}));
  EXPECT_TRUE(Throws<value_error>([] { GN m(O(2, 4).affine(false).eps(-1)); },
                                  {"[normkit.GroupNorm]", "eps", -1}));
  // Accepted: num_groups == num_channels, one group, eps = 0.
  EXPECT_NO_THROW((void)GN(O(4, 4)));
  EXPECT_NO_THROW((void)GN(O(1, 4)));
  EXPECT_NO_THROW((void)GN(O(2, 4).eps(0)));
}

// ---------------------------------------------------------------------------------------
// BatchNorm modules

TEST(BatchNormErrors, ChannelMismatchAlwaysChecked) {
  // docs/semantics.md §11.1: checked with and without affine parameters and running statistics.
  for (bool affine : {true, false}) {
    for (bool tracking : {true, false}) {
      SCOPED_TRACE(std::string("affine ") + (affine ? "on" : "off") + ", tracking " +
                   (tracking ? "on" : "off"));
      normkit::BatchNorm1d<double> bn(
          normkit::BatchNormOptions(3).affine(affine).track_running_stats(tracking));
      prime(bn, 3);
      const auto x2 = input(4, 5);
      const auto x3 = input(4, 5, 2);
      EXPECT_TRUE(RejectsUnchanged<shape_error>(bn, [&] { (void)bn.forward(x2); },
                                                {"[normkit.BatchNorm1d]", 3, "[4, 5]"}));
      EXPECT_TRUE(RejectsUnchanged<shape_error>(bn, [&] { (void)bn.forward(x3); },
                                                {"[normkit.BatchNorm1d]", 3, "[4, 5, 2]"}));
      bn.eval();
      EXPECT_TRUE(RejectsUnchanged<shape_error>(bn, [&] { (void)bn.forward(x2); },
                                                {"[normkit.BatchNorm1d]", 3, "[4, 5]"}));
      const auto fewer = input(4, 2);
      EXPECT_TRUE(RejectsUnchanged<shape_error>(bn, [&] { (void)bn.forward(fewer); },
                                                {"[normkit.BatchNorm1d]", 3, "[4, 2]"}));
    }
  }
  normkit::BatchNorm2d<double> bn2(3);
  prime(bn2, 3);
  const auto x4 = input(2, 4, 2, 2);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(bn2, [&] { (void)bn2.forward(x4); },
                                            {"[normkit.BatchNorm2d]", 3, "[2, 4, 2, 2]"}));
  normkit::BatchNorm3d<double> bn3(
      normkit::BatchNormOptions(3).affine(false).track_running_stats(false));
  const auto x5 = input<Eigen::ColMajor>(2, 2, 2, 2, 2);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(bn3, [&] { (void)bn3.forward(x5); },
                                            {"[normkit.BatchNorm3d]", 3, "[2, 2, 2, 2, 2]"}));
  // channels_last: the tensor is (N, H, W, C) = (2, 2, 2, 5); the message may show either order.
  normkit::BatchNorm2d<double> bncl(normkit::BatchNormOptions(3).channels_last(true));
  prime(bncl, 3);
  const auto xcl = input(2, 2, 2, 5);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(bncl, [&] { (void)bncl.forward(xcl); },
                                            {"[normkit.BatchNorm2d]", 3, 5}));
  // Float modules behave the same.
  normkit::BatchNorm1d<float> bnf(3);
  Eigen::Tensor<float, 2, Eigen::RowMajor> xf(4, 5);
  xf.setConstant(1.0f);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(bnf, [&] { (void)bnf.forward(xf); },
                                            {"[normkit.BatchNorm1d]", 3, "[4, 5]"}));
}

TEST(BatchNormErrors, OneValuePerChannelInTraining) {
  for (bool cma : {false, true}) {
    SCOPED_TRACE(cma ? "momentum none" : "momentum 0.1");
    normkit::BatchNorm1d<double> bn(normkit::BatchNormOptions(3).momentum(
        cma ? std::optional<double>() : std::optional<double>(0.1)));
    prime(bn, 3);
    (void)bn.forward(input(5, 3));  // a real step first: counter 8, stats moved
    ASSERT_EQ(bn.num_batches_tracked(), 8);
    const auto x = input(1, 3);
    const auto x3 = input(1, 3, 1);
    const normkit::BatchNorm1d<double> copy = bn;
    EXPECT_TRUE(RejectsUnchanged<value_error>(
        bn, [&] { (void)bn.forward(x); },
        {"[normkit.BatchNorm1d]", "more than 1 value per channel", "[1, 3]"}));
    EXPECT_TRUE(RejectsUnchanged<value_error>(
        bn, [&] { (void)bn.forward(x3); },
        {"[normkit.BatchNorm1d]", "more than 1 value per channel", "[1, 3, 1]"}));
    // The next valid step behaves exactly as if the rejected calls never happened (with
    // momentum none the factor is still 1/9, not 1/10 or 1/11).
    normkit::BatchNorm1d<double> ref = copy;
    const auto xn = input(6, 3);
    const auto y = bn.forward(xn);
    const auto yr = ref.forward(xn);
    EXPECT_TRUE(bitwise_equal(y, yr));
    EXPECT_TRUE(same_state(snapshot(ref), snapshot(bn)));
    EXPECT_EQ(bn.num_batches_tracked(), 9);
  }
  normkit::BatchNorm2d<double> bn2(3);
  prime(bn2, 3);
  const auto x4 = input(1, 3, 1, 1);
  EXPECT_TRUE(RejectsUnchanged<value_error>(
      bn2, [&] { (void)bn2.forward(x4); },
      {"[normkit.BatchNorm2d]", "more than 1 value per channel", "[1, 3, 1, 1]"}));
  normkit::BatchNorm3d<double> bn3(2);
  prime(bn3, 2);
  const auto x5 = input<Eigen::ColMajor>(1, 2, 1, 1, 1);
  EXPECT_TRUE(RejectsUnchanged<value_error>(
      bn3, [&] { (void)bn3.forward(x5); },
      {"[normkit.BatchNorm3d]", "more than 1 value per channel", "[1, 2, 1, 1, 1]"}));
  // Without running statistics the batch statistics are used in eval too (docs/semantics.md §2.1).
  normkit::BatchNorm1d<double> nt(normkit::BatchNormOptions(3).track_running_stats(false));
  prime(nt, 3);
  const auto x = input(1, 3);
  EXPECT_TRUE(RejectsUnchanged<value_error>(nt, [&] { (void)nt.forward(x); },
                                            {"[normkit.BatchNorm1d]", "[1, 3]"}));
  nt.eval();
  EXPECT_TRUE(RejectsUnchanged<value_error>(nt, [&] { (void)nt.forward(x); },
                                            {"[normkit.BatchNorm1d]", "[1, 3]"}));
  // Batch size 1 with more than one spatial element is fine (docs/semantics.md §2.6).
  normkit::BatchNorm1d<double> ok(3);
  EXPECT_NO_THROW((void)ok.forward(input(1, 3, 2)));
  EXPECT_NO_THROW((void)ok.forward(input(2, 3)));
}

TEST(BatchNormErrors, OutputMapOfWrongSize) {
  normkit::BatchNorm1d<double> bn(3);
  prime(bn, 3);
  const auto x = input(4, 3);
  std::vector<double> buf(12, -7.0);
  RMap<2> small(buf.data(), 4, 2);
  RMap<2> swapped(buf.data(), 3, 4);
  auto keep = [&] {
    auto s = snapshot(bn);
    s.add("map", normkit_test::blob_of(RMap<2>(buf.data(), 4, 3)));
    return s;
  };
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep, [&] { bn.forward(x, small); },
                                          {"[normkit.BatchNorm1d]", "[4, 3]", "[4, 2]"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep, [&] { bn.forward(x, swapped); },
                                          {"[normkit.BatchNorm1d]", "[4, 3]", "[3, 4]"}));
  bn.eval();
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep, [&] { bn.forward(x, small); },
                                          {"[normkit.BatchNorm1d]", "[4, 3]", "[4, 2]"}));
  // The right size works and equals the allocating form.
  RMap<2> right(buf.data(), 4, 3);
  EXPECT_NO_THROW(bn.forward(x, right));
  EXPECT_TRUE(bitwise_equal(RT<2>(right), bn.forward(x)));
}

// Backward misuse, shared by every module type.
template <class M, class X, class BadDY>
void expect_backward_errors(
    M m, const char* tag, const X& x, const BadDY& bad_dy, const char* want, const char* got) {
  SCOPED_TRACE(tag);
  const X dy = input<X::Layout>(x.dimension(0), x.dimension(1), x.dimension(2));
  // Nothing kept yet: backward(dy) names the form that works, backward(x, dy).
  EXPECT_TRUE(
      RejectsUnchanged<value_error>(m, [&] { (void)m.backward(dy); }, {tag, "backward(x, dy)"}));
  // backward(x, dy) needs no forward: the statistics the current mode's forward would use.
  const auto gx = m.backward(x, dy);
  (void)m.forward(x);
  const bool training = m.is_training();
  const auto g0 = training ? m.backward(dy) : m.backward(x, dy);
  EXPECT_TRUE(bitwise_equal(g0.input, gx.input)) << "kept and recomputed statistics differ";
  EXPECT_TRUE(bitwise_equal(g0.weight, gx.weight));
  // dy of another shape than x (or than the kept input).
  EXPECT_TRUE(
      RejectsUnchanged<shape_error>(m, [&] { (void)m.backward(x, bad_dy); }, {tag, want, got}));
  if (training) {
    EXPECT_TRUE(
        RejectsUnchanged<shape_error>(m, [&] { (void)m.backward(bad_dy); }, {tag, want, got}));
    // dy in the other storage order than the kept input.
    constexpr int kLayout = static_cast<int>(X::Layout);
    constexpr int kRow = static_cast<int>(Eigen::RowMajor);
    using Other = Eigen::Tensor<typename X::Scalar, X::NumDimensions,
                                kLayout == kRow ? Eigen::ColMajor : Eigen::RowMajor>;
    const Other dy_other = input<Other::Layout>(x.dimension(0), x.dimension(1), x.dimension(2));
    EXPECT_TRUE(RejectsUnchanged<shape_error>(m, [&] { (void)m.backward(dy_other); },
                                              {tag, "other storage order"}));
  }
  // A rejected forward does not replace what backward uses.
  const auto g1 = training ? m.backward(dy) : m.backward(x, dy);
  EXPECT_TRUE(bitwise_equal(g0.input, g1.input));
  // requires_grad(false): nothing is kept; backward(x, dy) still gives the same gradients.
  m.set_requires_grad(false);
  EXPECT_TRUE(
      RejectsUnchanged<value_error>(m, [&] { (void)m.backward(dy); }, {tag, "backward(x, dy)"}));
  (void)m.forward(x);
  EXPECT_TRUE(
      RejectsUnchanged<value_error>(m, [&] { (void)m.backward(dy); }, {tag, "backward(x, dy)"}));
  const auto g2 = m.backward(x, dy);
  EXPECT_TRUE(bitwise_equal(g0.input, g2.input));
  EXPECT_TRUE(bitwise_equal(g0.weight, g2.weight));
  EXPECT_TRUE(bitwise_equal(g0.bias, g2.bias));
  m.set_requires_grad(true);
  // keep_input(false): training forwards keep only their statistics.
  m.set_keep_input(false);
  (void)m.forward(x);
  EXPECT_TRUE(
      RejectsUnchanged<value_error>(m, [&] { (void)m.backward(dy); }, {tag, "backward(x, dy)"}));
  const auto g3 = m.backward(x, dy);
  EXPECT_TRUE(bitwise_equal(g0.input, g3.input));
  m.set_keep_input(true);
  // Switching mode forgets what the last training forward kept.
  if (training) {
    (void)m.forward(x);
    m.eval();
    EXPECT_TRUE(
        RejectsUnchanged<value_error>(m, [&] { (void)m.backward(dy); }, {tag, "backward(x, dy)"}));
  }
}

TEST(BatchNormErrors, BackwardMisuse) {
  normkit::BatchNorm1d<double> bn(3);
  prime(bn, 3);
  expect_backward_errors(bn, "[normkit.BatchNorm1d]", input(4, 3, 2), input(5, 3, 2), "[4, 3, 2]",
                         "[5, 3, 2]");
  normkit::BatchNorm1d<double> bn_eval(normkit::BatchNormOptions(3).affine(false));
  bn_eval.eval();
  expect_backward_errors(bn_eval, "[normkit.BatchNorm1d]", input<Eigen::ColMajor>(4, 3, 2),
                         input<Eigen::ColMajor>(4, 3, 3), "[4, 3, 2]", "[4, 3, 3]");
  // dy of another rank than the last forward's input (BatchNorm1d takes both ranks).
  normkit::BatchNorm1d<double> b(3);
  const auto x = input(4, 3);
  (void)b.forward(x);
  const auto dy3 = input(4, 3, 1);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(b, [&] { (void)b.backward(dy3); },
                                            {"[normkit.BatchNorm1d]", "[4, 3]", "[4, 3, 1]"}));
  // A rejected forward keeps the last successful forward for backward.
  const auto dy = input(4, 3);
  const auto g0 = b.backward(dy);
  const auto x1 = input(1, 3);
  EXPECT_THROW((void)b.forward(x1), value_error);
  const auto g1 = b.backward(dy);
  EXPECT_TRUE(bitwise_equal(g0.input, g1.input));
  EXPECT_TRUE(bitwise_equal(g0.weight, g1.weight));
  const auto dy1 = input(1, 3);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(b, [&] { (void)b.backward(dy1); },
                                            {"[normkit.BatchNorm1d]", "[4, 3]", "[1, 3]"}));
  // backward(x, dy) with one value per channel in training is the forward's error.
  EXPECT_TRUE(RejectsUnchanged<value_error>(b, [&] { (void)b.backward(x1, dy1); },
                                            {"[normkit.BatchNorm1d]", "more than 1 value"}));
}

TEST(BatchNormErrors, SettersCheckSizes) {
  normkit::BatchNorm1d<double> bn(3);
  prime(bn, 3);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(bn, [&] { bn.set_weight(ramp(4, 1, 1)); },
                                            {"[normkit.BatchNorm1d]", "weight", 3, 4}));
  EXPECT_TRUE(RejectsUnchanged<shape_error>(bn, [&] { bn.set_bias(ramp(2, 1, 1)); },
                                            {"[normkit.BatchNorm1d]", "bias", 3, 2}));
  EXPECT_TRUE(RejectsUnchanged<shape_error>(bn, [&] { bn.set_running_mean(ramp(5, 1, 1)); },
                                            {"[normkit.BatchNorm1d]", "running_mean", 3, 5}));
  EXPECT_TRUE(RejectsUnchanged<shape_error>(bn, [&] { bn.set_running_var(ramp(1, 1, 1)); },
                                            {"[normkit.BatchNorm1d]", "running_var", 3, 1}));
}

TEST(BatchNormAccepted, EmptyBatchInTrainingBumpsCounterOnly) {
  normkit::BatchNorm1d<double> bn(3);
  prime(bn, 3);
  const Vec rm = bn.running_mean(), rv = bn.running_var();
  const RT<2> x(0, 3);
  RT<2> y;
  ASSERT_NO_THROW(y = bn.forward(x));
  EXPECT_EQ(y.dimension(0), 0);
  EXPECT_EQ(y.dimension(1), 3);
  EXPECT_EQ(bn.num_batches_tracked(), 8);
  EXPECT_TRUE(bitwise_equal(bn.running_mean(), rm));
  EXPECT_TRUE(bitwise_equal(bn.running_var(), rv));
  const RT<3> x3(2, 3, 0);
  ASSERT_NO_THROW((void)bn.forward(x3));
  EXPECT_EQ(bn.num_batches_tracked(), 9);
  EXPECT_TRUE(bitwise_equal(bn.running_mean(), rm));
  // docs/semantics.md §2.4: CMA with an empty batch first: counter 2, running_mean = 0.5 * mean(x).
  normkit::BatchNorm1d<double> cma(normkit::BatchNormOptions(2).momentum(std::nullopt));
  (void)cma.forward(RT<2>(0, 2));
  const auto xb = input(4, 2);
  (void)cma.forward(xb);
  EXPECT_EQ(cma.num_batches_tracked(), 2);
  for (Idx c = 0; c < 2; ++c) {
    double m = 0;
    for (Idx n = 0; n < 4; ++n) m += xb(n, c);
    EXPECT_NEAR(cma.running_mean()(c), 0.5 * m / 4, 1e-15);
  }
}

TEST(BatchNormAccepted, EvalWithRunningStatsOnOneValuePerChannel) {
  normkit::BatchNorm1d<double> bn(3);
  prime(bn, 3);
  bn.eval();
  const auto x = input(1, 3);
  RT<2> y;
  ASSERT_NO_THROW(y = bn.forward(x));
  for (Idx c = 0; c < 3; ++c) {
    const double want =
        (x(0, c) - bn.running_mean()(c)) / std::sqrt(bn.running_var()(c) + 1e-5) * bn.weight()(c) +
        bn.bias()(c);
    EXPECT_NEAR(y(0, c), want, 1e-14);
  }
  EXPECT_EQ(bn.num_batches_tracked(), 7);
  EXPECT_TRUE(bitwise_equal(bn.running_mean(), Vec(ramp(3, 0.3, -0.2))));
  EXPECT_TRUE(bitwise_equal(bn.running_var(), Vec(ramp(3, 0.9, 0.35))));
  normkit::BatchNorm2d<double> bn2(3);
  bn2.eval();
  EXPECT_NO_THROW((void)bn2.forward(input(1, 3, 1, 1)));
}

TEST(BatchNormAccepted, EpsZeroAndMomentumBounds) {
  const auto x = input(5, 3);
  normkit::BatchNorm1d<double> e0(normkit::BatchNormOptions(3).eps(0));
  EXPECT_NO_THROW((void)e0.forward(x));
  // momentum 0: buffers never change; momentum 1: buffers = last batch statistics.
  normkit::BatchNorm1d<double> m0(normkit::BatchNormOptions(3).momentum(0.0));
  prime(m0, 3);
  const Vec rm = m0.running_mean(), rv = m0.running_var();
  ASSERT_NO_THROW((void)m0.forward(x));
  EXPECT_TRUE(bitwise_equal(m0.running_mean(), rm));
  EXPECT_TRUE(bitwise_equal(m0.running_var(), rv));
  EXPECT_EQ(m0.num_batches_tracked(), 8);
  normkit::BatchNorm1d<double> m1(normkit::BatchNormOptions(3).momentum(1.0));
  prime(m1, 3);
  ASSERT_NO_THROW((void)m1.forward(x));
  for (Idx c = 0; c < 3; ++c) {
    double mean = 0, ss = 0;
    for (Idx n = 0; n < 5; ++n) mean += x(n, c);
    mean /= 5;
    for (Idx n = 0; n < 5; ++n) ss += (x(n, c) - mean) * (x(n, c) - mean);
    EXPECT_NEAR(m1.running_mean()(c), mean, 1e-14);
    EXPECT_NEAR(m1.running_var()(c), ss / 4, 1e-14);
  }
}

// ---------------------------------------------------------------------------------------
// InstanceNorm modules

TEST(InstanceNormErrors, ChannelMismatchAlwaysChecked) {
  for (bool affine : {false, true}) {
    for (bool tracking : {false, true}) {
      SCOPED_TRACE(std::string("affine ") + (affine ? "on" : "off") + ", tracking " +
                   (tracking ? "on" : "off"));
      normkit::InstanceNorm1d<double> in(
          normkit::InstanceNormOptions(3).affine(affine).track_running_stats(tracking));
      prime(in, 3);
      const auto x = input(2, 4, 5);
      EXPECT_TRUE(RejectsUnchanged<shape_error>(in, [&] { (void)in.forward(x); },
                                                {"[normkit.InstanceNorm1d]", 3, "[2, 4, 5]"}));
      // Unbatched (C, L) = (4, 3): C = 4 (docs/semantics.md §3.1).
      const auto u = input(4, 3);
      EXPECT_TRUE(RejectsUnchanged<shape_error>(in, [&] { (void)in.forward(u); },
                                                {"[normkit.InstanceNorm1d]", 3, 4}));
      in.eval();
      EXPECT_TRUE(RejectsUnchanged<shape_error>(in, [&] { (void)in.forward(x); },
                                                {"[normkit.InstanceNorm1d]", 3, "[2, 4, 5]"}));
    }
  }
  normkit::InstanceNorm2d<double> in2(3);
  const auto x4 = input<Eigen::ColMajor>(2, 4, 2, 2);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(in2, [&] { (void)in2.forward(x4); },
                                            {"[normkit.InstanceNorm2d]", 3, "[2, 4, 2, 2]"}));
  normkit::InstanceNorm3d<double> in3(
      normkit::InstanceNormOptions(3).affine(true).track_running_stats(true));
  prime(in3, 3);
  const auto u4 = input(5, 2, 2, 2);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(in3, [&] { (void)in3.forward(u4); },
                                            {"[normkit.InstanceNorm3d]", 3, 5}));
}

TEST(InstanceNormErrors, OneSpatialElementWithInstanceStats) {
  // docs/semantics.md §3.4: training, and eval without tracking, raise; eval with tracking is fine.
  for (bool tracking : {false, true}) {
    SCOPED_TRACE(tracking ? "tracking" : "no tracking");
    normkit::InstanceNorm1d<double> in(
        normkit::InstanceNormOptions(3).affine(true).track_running_stats(tracking));
    prime(in, 3);
    const auto x = input(2, 3, 1);
    const auto u = input(3, 1);
    const Needle msg = "Expected more than 1 spatial element";
    EXPECT_TRUE(RejectsUnchanged<value_error>(in, [&] { (void)in.forward(x); },
                                              {"[normkit.InstanceNorm1d]", msg, "[2, 3, 1]"}));
    EXPECT_TRUE(RejectsUnchanged<value_error>(in, [&] { (void)in.forward(u); },
                                              {"[normkit.InstanceNorm1d]", msg, "[3, 1]"}));
    in.eval();
    if (tracking) {
      EXPECT_NO_THROW((void)in.forward(x));
      EXPECT_NO_THROW((void)in.forward(u));
    } else {
      EXPECT_TRUE(RejectsUnchanged<value_error>(in, [&] { (void)in.forward(x); },
                                                {"[normkit.InstanceNorm1d]", msg, "[2, 3, 1]"}));
      EXPECT_TRUE(RejectsUnchanged<value_error>(in, [&] { (void)in.forward(u); },
                                                {"[normkit.InstanceNorm1d]", msg, "[3, 1]"}));
    }
  }
  normkit::InstanceNorm2d<double> in2(3);
  const auto x4 = input(2, 3, 1, 1);
  EXPECT_TRUE(
      RejectsUnchanged<value_error>(in2, [&] { (void)in2.forward(x4); },
                                    {"[normkit.InstanceNorm2d]", "spatial", "[2, 3, 1, 1]"}));
  normkit::InstanceNorm3d<double> in3(normkit::InstanceNormOptions(3).track_running_stats(true));
  prime(in3, 3);
  const auto u4 = input<Eigen::ColMajor>(3, 1, 1, 1);
  EXPECT_TRUE(
      RejectsUnchanged<value_error>(in3, [&] { (void)in3.forward(u4); },
                                    {"[normkit.InstanceNorm3d]", "spatial", "[3, 1, 1, 1]"}));
  // N == 1 is fine.
  normkit::InstanceNorm1d<double> ok(3);
  EXPECT_NO_THROW((void)ok.forward(input(1, 3, 4)));
}

TEST(InstanceNormErrors, OutputMapOfWrongSize) {
  normkit::InstanceNorm1d<double> in(
      normkit::InstanceNormOptions(3).affine(true).track_running_stats(true));
  prime(in, 3);
  const auto x = input(2, 3, 4);
  std::vector<double> buf(24, 1.5);
  RMap<3> wrong(buf.data(), 2, 3, 3);
  auto keep = [&] {
    auto s = snapshot(in);
    s.add("map", normkit_test::blob_of(RMap<3>(buf.data(), 2, 3, 4)));
    return s;
  };
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep, [&] { in.forward(x, wrong); },
                                          {"[normkit.InstanceNorm1d]", "[2, 3, 4]", "[2, 3, 3]"}));
  const auto u = input(3, 4);
  RMap<2> wrong_u(buf.data(), 3, 5);
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep, [&] { in.forward(u, wrong_u); },
                                          {"[normkit.InstanceNorm1d]", "[3, 4]", "[3, 5]"}));
}

TEST(InstanceNormErrors, BackwardMisuse) {
  normkit::InstanceNorm1d<double> in(normkit::InstanceNormOptions(3).affine(true));
  prime(in, 3);
  expect_backward_errors(in, "[normkit.InstanceNorm1d]", input(2, 3, 4), input(2, 3, 5),
                         "[2, 3, 4]", "[2, 3, 5]");
  normkit::InstanceNorm2d<double> in2(normkit::InstanceNormOptions(3).track_running_stats(true));
  prime(in2, 3);
  in2.eval();
  // Unbatched (C, H, W).
  expect_backward_errors(in2, "[normkit.InstanceNorm2d]", input<Eigen::ColMajor>(3, 2, 2),
                         input<Eigen::ColMajor>(3, 2, 3), "[3, 2, 2]", "[3, 2, 3]");
}

// ---------------------------------------------------------------------------------------
// LayerNorm module

TEST(LayerNormErrors, TrailingDimsMismatch) {
  normkit::LayerNorm<double> ln(normkit::LayerNormOptions({2, 3}));
  prime(ln, 6);
  const auto x = input(4, 3, 2);  // docs/semantics.md §4.1
  const Needle given = "normalized_shape=[2, 3]";
  EXPECT_TRUE(RejectsUnchanged<shape_error>(ln, [&] { (void)ln.forward(x); },
                                            {"[normkit.LayerNorm]", given, "[4, 3, 2]"}));
  const auto xc = input<Eigen::ColMajor>(5, 2, 4);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(ln, [&] { (void)ln.forward(xc); },
                                            {"[normkit.LayerNorm]", given, "[5, 2, 4]"}));
  normkit::LayerNorm<double> ln1(normkit::LayerNormOptions({5}).elementwise_affine(false));
  const auto x2 = input(2, 4);
  EXPECT_TRUE(
      RejectsUnchanged<shape_error>(ln1, [&] { (void)ln1.forward(x2); },
                                    {"[normkit.LayerNorm]", "normalized_shape=[5]", "[2, 4]"}));
  // Accepted: leading dims, none at all (input shape == normalized_shape), empty batch.
  EXPECT_NO_THROW((void)ln.forward(input(5, 2, 3)));
  EXPECT_NO_THROW((void)ln.forward(input(2, 3)));
  EXPECT_NO_THROW((void)ln.forward(RT<3>(0, 2, 3)));
}

TEST(LayerNormErrors, TooFewDims) {
  normkit::LayerNorm<double> ln(normkit::LayerNormOptions({2, 3}));
  prime(ln, 6);
  const auto x1 = input(3);
  EXPECT_TRUE(
      RejectsUnchanged<shape_error>(ln, [&] { (void)ln.forward(x1); },
                                    {"[normkit.LayerNorm]", "normalized_shape=[2, 3]", "[3]"}));
  normkit::LayerNorm<double> ln3(normkit::LayerNormOptions({4, 2, 3}));
  prime(ln3, 24);
  const auto x2 = input(2, 3);
  EXPECT_TRUE(RejectsUnchanged<shape_error>(
      ln3, [&] { (void)ln3.forward(x2); },
      {"[normkit.LayerNorm]", "normalized_shape=[4, 2, 3]", "[2, 3]"}));
}

TEST(LayerNormErrors, OutputMapAndSetters) {
  normkit::LayerNorm<double> ln(normkit::LayerNormOptions({4}));
  prime(ln, 4);
  const auto x = input(3, 4);
  std::vector<double> buf(12, 2.0);
  RMap<2> wrong(buf.data(), 4, 3);
  auto keep = [&] {
    auto s = snapshot(ln);
    s.add("map", normkit_test::blob_of(RMap<2>(buf.data(), 3, 4)));
    return s;
  };
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep, [&] { ln.forward(x, wrong); },
                                          {"[normkit.LayerNorm]", "[3, 4]", "[4, 3]"}));
  EXPECT_TRUE(RejectsUnchanged<shape_error>(ln, [&] { ln.set_weight(ramp(5, 1, 1)); },
                                            {"[normkit.LayerNorm]", "weight", 4, 5}));
  EXPECT_TRUE(RejectsUnchanged<shape_error>(ln, [&] { ln.set_bias(ramp(3, 1, 1)); },
                                            {"[normkit.LayerNorm]", "bias", 4, 3}));
}

TEST(LayerNormErrors, BackwardMisuse) {
  normkit::LayerNorm<double> ln(normkit::LayerNormOptions({3, 2}));
  prime(ln, 6);
  expect_backward_errors(ln, "[normkit.LayerNorm]", input(4, 3, 2), input(5, 3, 2), "[4, 3, 2]",
                         "[5, 3, 2]");
}

// ---------------------------------------------------------------------------------------
// GroupNorm module

TEST(GroupNormErrors, ChannelMismatchAlwaysChecked) {
  for (bool affine : {true, false}) {
    SCOPED_TRACE(affine ? "affine" : "no affine");
    normkit::GroupNorm<double> gn(normkit::GroupNormOptions(2, 4).affine(affine));
    prime(gn, 4);
    const auto x6 = input(2, 6, 3);
    const auto x5 = input(2, 5, 3);
    const auto x2 = input(3, 2);
    EXPECT_TRUE(RejectsUnchanged<shape_error>(gn, [&] { (void)gn.forward(x6); },
                                              {"[normkit.GroupNorm]", 4, "[2, 6, 3]"}));
    EXPECT_TRUE(RejectsUnchanged<shape_error>(gn, [&] { (void)gn.forward(x5); },
                                              {"[normkit.GroupNorm]", 4, "[2, 5, 3]"}));
    EXPECT_TRUE(RejectsUnchanged<shape_error>(gn, [&] { (void)gn.forward(x2); },
                                              {"[normkit.GroupNorm]", 4, "[3, 2]"}));
  }
  normkit::GroupNorm<double> gcl(normkit::GroupNormOptions(2, 4).channels_last(true));
  const auto xcl = input(2, 3, 6);  // (N, L, C) with C = 6
  EXPECT_TRUE(RejectsUnchanged<shape_error>(gcl, [&] { (void)gcl.forward(xcl); },
                                            {"[normkit.GroupNorm]", 4, 6}));
}

TEST(GroupNormAccepted, OneElementGroupsReturnBias) {
  // docs/semantics.md §11.2: GN(4, 4) on (1, 4) and (1, 4, 1) return bias, in training and eval.
  normkit::GroupNorm<double> gn(normkit::GroupNormOptions(4, 4));
  prime(gn, 4);
  const auto x = input(1, 4);
  const auto x3 = input(1, 4, 1);
  for (bool training : {true, false}) {
    gn.train(training);
    RT<2> y;
    RT<3> y3;
    ASSERT_NO_THROW(y = gn.forward(x));
    ASSERT_NO_THROW(y3 = gn.forward(x3));
    for (Idx c = 0; c < 4; ++c) {
      EXPECT_EQ(y(0, c), gn.bias()(c)) << c;
      EXPECT_EQ(y3(0, c, 0), gn.bias()(c)) << c;
    }
  }
  normkit::GroupNorm<double> one(normkit::GroupNormOptions(1, 1));
  EXPECT_NO_THROW((void)one.forward(input(1, 1)));
}

TEST(GroupNormErrors, OutputMapAndBackwardMisuse) {
  normkit::GroupNorm<double> gn(normkit::GroupNormOptions(2, 4));
  prime(gn, 4);
  const auto x = input(2, 4, 3);
  std::vector<double> buf(24, 0.5);
  RMap<3> wrong(buf.data(), 2, 4, 2);
  auto keep = [&] {
    auto s = snapshot(gn);
    s.add("map", normkit_test::blob_of(RMap<3>(buf.data(), 2, 4, 3)));
    return s;
  };
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep, [&] { gn.forward(x, wrong); },
                                          {"[normkit.GroupNorm]", "[2, 4, 3]", "[2, 4, 2]"}));
  EXPECT_TRUE(RejectsUnchanged<shape_error>(gn, [&] { gn.set_weight(ramp(3, 1, 1)); },
                                            {"[normkit.GroupNorm]", "weight", 4, 3}));
  expect_backward_errors(gn, "[normkit.GroupNorm]", input(2, 4, 3), input(3, 4, 3), "[2, 4, 3]",
                         "[3, 4, 3]");
}

// ---------------------------------------------------------------------------------------
// Free functions: batch_norm

TEST(BatchNormFunctionErrors, ParameterAndBufferSizes) {
  const auto x = input(4, 5);
  Vec rm = ramp(3, 0.1, 0.1), rv = ramp(3, 1, 0.5), w = ramp(3, 1, 0.25), b = ramp(3, 0, 0.5);
  Vec rm5 = ramp(5, 0.1, 0.1), rv5 = ramp(5, 1, 0.5), w5 = ramp(5, 1, 0.25), b5 = ramp(5, 0, 0.5);
  RT<2> y = input(4, 5);
  auto keep = [&] {
    return snapshot_tensors({"rm", "rv", "w", "b", "rm5", "rv5", "y"}, rm, rv, w, b, rm5, rv5, y);
  };
  using O = normkit::BatchNormFuncOptions<double>;
  for (bool training : {true, false}) {
    SCOPED_TRACE(training ? "training" : "eval");
    EXPECT_TRUE(RejectsKeeping<shape_error>(
        keep,
        [&] {
          normkit::batch_norm(x, y, O().running_mean(rm).running_var(rv5).training(training));
        },
        {"[normkit.batch_norm]", "running_mean should contain 5 elements not 3"}));
    EXPECT_TRUE(RejectsKeeping<shape_error>(
        keep,
        [&] {
          normkit::batch_norm(x, y, O().running_mean(rm5).running_var(rv).training(training));
        },
        {"[normkit.batch_norm]", "running_var should contain 5 elements not 3"}));
    EXPECT_TRUE(RejectsKeeping<shape_error>(
        keep,
        [&] {
          normkit::batch_norm(
              x, y, O().weight(w).bias(b5).running_mean(rm5).running_var(rv5).training(training));
        },
        {"[normkit.batch_norm]", "weight should contain 5 elements not 3"}));
    EXPECT_TRUE(RejectsKeeping<shape_error>(
        keep,
        [&] {
          normkit::batch_norm(
              x, y, O().weight(w5).bias(b).running_mean(rm5).running_var(rv5).training(training));
        },
        {"[normkit.batch_norm]", "bias should contain 5 elements not 3"}));
  }
  // No tensors passed: like F.batch_norm, any channel count is normalized (docs/semantics.md §2.7).
  EXPECT_NO_THROW(normkit::batch_norm(x, y, O().training(true)));
}

TEST(BatchNormFunctionErrors, OneValuePerChannelAndEvalWithoutBuffers) {
  using O = normkit::BatchNormFuncOptions<double>;
  Vec rm = ramp(3, 0.1, 0.1), rv = ramp(3, 1, 0.5);
  auto keep = [&] { return snapshot_tensors({"running_mean", "running_var"}, rm, rv); };
  const auto x1 = input(1, 3);
  RT<2> y;
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep,
      [&] {
        normkit::batch_norm(x1, y,
                            O().running_mean(rm).running_var(rv).training(true).momentum(1.0));
      },
      {"[normkit.batch_norm]", "more than 1 value per channel", "[1, 3]"}));
  const auto x4 = input(1, 3, 1, 1);
  RT<4> y4;
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::batch_norm(x4, y4, O().training(true)); },
      {"[normkit.batch_norm]", "more than 1 value per channel", "[1, 3, 1, 1]"}));
  // Eval uses running statistics: (1, 3) is fine with them, an error without.
  EXPECT_NO_THROW(normkit::batch_norm(x1, y, O().running_mean(rm).running_var(rv)));
  const auto x = input(4, 3);
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::batch_norm(x, y, O()); },
      {"[normkit.batch_norm]", "running_mean must be defined in evaluation mode"}));
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::batch_norm(x, y, O().running_mean(rm)); },
      {"[normkit.batch_norm]", "running_var must be defined in evaluation mode"}));
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::batch_norm(x, y, O().running_var(rv)); },
      {"[normkit.batch_norm]", "running_mean must be defined in evaluation mode"}));
}

TEST(BatchNormFunctionErrors, OutputMapOfWrongSize) {
  using O = normkit::BatchNormFuncOptions<double>;
  Vec rm = ramp(3, 0.1, 0.1), rv = ramp(3, 1, 0.5);
  std::vector<double> buf(12, 3.0);
  RMap<2> wrong(buf.data(), 3, 4);
  auto keep = [&] {
    return snapshot_tensors({"running_mean", "running_var", "map"}, rm, rv,
                            RMap<2>(buf.data(), 4, 3));
  };
  const auto x = input(4, 3);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep,
      [&] { normkit::batch_norm(x, wrong, O().running_mean(rm).running_var(rv).training(true)); },
      {"[normkit.batch_norm]", "[4, 3]", "[3, 4]"}));
}

TEST(BatchNormFunctionErrors, Backward) {
  using O = normkit::BatchNormFuncOptions<double>;
  const auto x = input(4, 3, 2);
  Vec w = ramp(3, 1, 0.5), b = ramp(3, 0, 0.5);
  RT<3> y;
  normkit::SavedStats saved;
  normkit::batch_norm(x, y, O().weight(w).bias(b).training(true), &saved);
  const auto dy = input(4, 3, 2);
  RT<3> dx = input(4, 3, 2);
  Vec gw = ramp(3, 9, 1), gb = ramp(3, 8, 1), w2 = ramp(2, 1, 1), gw4 = ramp(4, 1, 1);
  auto keep = [&] { return snapshot_tensors({"dx", "grad_weight", "grad_bias"}, dx, gw, gb); };
  const char* tag = "[normkit.batch_norm_backward]";
  const auto dy_bad = input(4, 3, 3);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::batch_norm_backward(x, dy_bad, dx, saved, w, gw, gb); },
      {tag, "[4, 3, 2]", "[4, 3, 3]"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::batch_norm_backward(x, dy, dx, saved, w2, gw, gb); },
      {tag, "weight should contain 3 elements not 2"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::batch_norm_backward(x, dy, dx, saved, w, gw4, gb); },
      {tag, "grad_weight", 3, 4}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::batch_norm_backward(x, dy, dx, saved, w, gw, w2); },
      {tag, "grad_bias", 3, 2}));
  // Statistics saved for another channel count.
  normkit::SavedStats other;
  RT<2> y2;
  normkit::batch_norm(input(4, 2), y2, O().training(true), &other);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::batch_norm_backward(x, dy, dx, other, w, gw, gb); }, {tag, 3, 2}));
  // grad_input map of the wrong size.
  std::vector<double> buf(24, 1.0);
  RMap<3> wrong(buf.data(), 4, 2, 3);
  auto keep_map = [&] {
    auto s = keep();
    s.add("map", normkit_test::blob_of(RMap<3>(buf.data(), 4, 3, 2)));
    return s;
  };
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep_map, [&] { normkit::batch_norm_backward(x, dy, wrong, saved, w, gw, gb); },
      {tag, "grad_input", "[4, 3, 2]", "[4, 2, 3]"}));
  EXPECT_NO_THROW(normkit::batch_norm_backward(x, dy, dx, saved, w, gw, gb));
}

// ---------------------------------------------------------------------------------------
// Free functions: instance_norm

TEST(InstanceNormFunctionErrors, SizesSpatialAndBuffers) {
  using O = normkit::InstanceNormFuncOptions<double>;
  Vec w = ramp(3, 1, 0.5), b = ramp(3, 0, 0.5), rm = ramp(3, 0.1, 0.1), rv = ramp(3, 1, 0.5);
  auto keep = [&] { return snapshot_tensors({"w", "b", "rm", "rv"}, w, b, rm, rv); };
  const char* tag = "[normkit.instance_norm]";
  const auto x4 = input(2, 4, 5);
  RT<3> y;
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep,
                                          [&] { normkit::instance_norm(x4, y, O().weight(w)); },
                                          {tag, "weight should contain 4 elements not 3"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::instance_norm(x4, y, O().running_mean(rm).running_var(rv)); },
      {tag, "running_mean should contain 4 elements not 3"}));
  // Without parameters or buffers any channel count is fine (functional form).
  EXPECT_NO_THROW(normkit::instance_norm(x4, y, O()));
  const auto x1 = input(2, 3, 1);
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep,
      [&] {
        normkit::instance_norm(x1, y, O().weight(w).bias(b).running_mean(rm).running_var(rv));
      },
      {tag, "Expected more than 1 spatial element", "[2, 3, 1]"}));
  // Running statistics instead of instance statistics: they must be given.
  const auto x = input(2, 3, 4);
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::instance_norm(x, y, O().use_input_stats(false)); },
      {tag, "running_mean"}));
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::instance_norm(x, y, O().use_input_stats(false).running_mean(rm)); },
      {tag, "running_var"}));
  EXPECT_NO_THROW(
      normkit::instance_norm(x1, y, O().use_input_stats(false).running_mean(rm).running_var(rv)));
  // Output map of the wrong size.
  std::vector<double> buf(24, 1.0);
  RMap<3> wrong(buf.data(), 2, 4, 3);
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::instance_norm(x, wrong, O()); },
                                  {tag, "[2, 3, 4]", "[2, 4, 3]"}));
}

TEST(InstanceNormFunctionErrors, Backward) {
  using O = normkit::InstanceNormFuncOptions<double>;
  const auto x = input(2, 3, 4);
  Vec w = ramp(3, 1, 0.5);
  RT<3> y;
  normkit::SavedStats saved;
  normkit::instance_norm(x, y, O().weight(w), &saved);
  const auto dy = input(2, 3, 4);
  RT<3> dx = input(2, 3, 4);
  Vec gw = ramp(3, 9, 1), gb = ramp(3, 8, 1);
  auto keep = [&] { return snapshot_tensors({"dx", "grad_weight", "grad_bias"}, dx, gw, gb); };
  const char* tag = "[normkit.instance_norm_backward]";
  const auto dy_bad = input(2, 3, 5);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::instance_norm_backward(x, dy_bad, dx, saved, w, gw, gb); },
      {tag, "[2, 3, 4]", "[2, 3, 5]"}));
  // Statistics of another batch size: N*C = 6 slots expected, 9 given.
  normkit::SavedStats other;
  RT<3> y3;
  normkit::instance_norm(input(3, 3, 4), y3, O(), &other);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::instance_norm_backward(x, dy, dx, other, w, gw, gb); }, {tag, 6, 9}));
  EXPECT_NO_THROW(normkit::instance_norm_backward(x, dy, dx, saved, w, gw, gb));
}

// ---------------------------------------------------------------------------------------
// Free functions: layer_norm

TEST(LayerNormFunctionErrors, ShapesAndParameters) {
  using O = normkit::LayerNormFuncOptions<double>;
  const char* tag = "[normkit.layer_norm]";
  const auto x = input(4, 3, 2);
  RT<3> y = input(4, 3, 2);
  auto keep = [&] { return snapshot_tensors({"y"}, y); };
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::layer_norm(x, y, O(std::vector<normkit::Index>{})); },
      {tag, "normalized_shape = []"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep,
                                          [&] {
                                            normkit::layer_norm(x, y, O({2, 3}));
                                          },
                                          {tag, "normalized_shape=[2, 3]", "[4, 3, 2]"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(keep,
                                          [&] {
                                            normkit::layer_norm(x, y, O({5, 4, 3, 2}));
                                          },
                                          {tag, "normalized_shape=[5, 4, 3, 2]", "[4, 3, 2]"}));
  Vec w5 = ramp(5, 1, 1), w6 = ramp(6, 1, 1), b4 = ramp(4, 1, 1);
  const auto x2 = input(2, 6);
  RT<2> y2;
  EXPECT_TRUE(Throws<shape_error>(
      [&] { normkit::layer_norm(x2, y2, O({6}).weight(w5)); },
      {tag, "Expected weight to be of same shape as normalized_shape", 5, "[6]"}));
  EXPECT_TRUE(Throws<shape_error>(
      [&] { normkit::layer_norm(x2, y2, O({6}).weight(w6).bias(b4)); },
      {tag, "Expected bias to be of same shape as normalized_shape", 4, "[6]"}));
  // Accepted: normalized_shape == the whole input shape; weight only; bias only.
  EXPECT_NO_THROW(normkit::layer_norm(x, y, O({4, 3, 2})));
  EXPECT_NO_THROW(normkit::layer_norm(x2, y2, O({6}).weight(w6)));
  EXPECT_NO_THROW(normkit::layer_norm(x2, y2, O({2, 6})));
  std::vector<double> buf(12, 1.0);
  RMap<2> wrong(buf.data(), 3, 4);
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::layer_norm(x2, wrong, O({6})); },
                                  {tag, "[2, 6]", "[3, 4]"}));
}

TEST(LayerNormFunctionErrors, Backward) {
  using O = normkit::LayerNormFuncOptions<double>;
  const auto x = input(4, 3, 2);
  Vec w = ramp(6, 1, 0.5), w5 = ramp(5, 1, 1);
  RT<3> y;
  normkit::SavedStats saved;
  normkit::layer_norm(x, y, O({3, 2}).weight(w), &saved);
  const auto dy = input(4, 3, 2);
  RT<3> dx = input(4, 3, 2);
  Vec gw = ramp(6, 9, 1), gb = ramp(6, 8, 1);
  auto keep = [&] { return snapshot_tensors({"dx", "grad_weight", "grad_bias"}, dx, gw, gb); };
  const char* tag = "[normkit.layer_norm_backward]";
  const auto dy_bad = input(4, 3, 3);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep,
      [&] {
        normkit::layer_norm_backward(x, dy_bad, dx, saved, {3, 2}, w, gw, gb);
      },
      {tag, "[4, 3, 2]", "[4, 3, 3]"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep,
      [&] {
        normkit::layer_norm_backward(x, dy, dx, saved, {2, 3}, w, gw, gb);
      },
      {tag, "normalized_shape=[2, 3]", "[4, 3, 2]"}));
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::layer_norm_backward(x, dy, dx, saved, {}, w, gw, gb); },
      {tag, "normalized_shape = []"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep,
      [&] {
        normkit::layer_norm_backward(x, dy, dx, saved, {3, 2}, w5, gw, gb);
      },
      {tag, "weight", 5, "[3, 2]"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep,
      [&] {
        normkit::layer_norm_backward(x, dy, dx, saved, {3, 2}, w, w5, gb);
      },
      {tag, "grad_weight", 6, 5}));
  // Statistics of the wrong number of rows (4 expected, 12 given).
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::layer_norm_backward(x, dy, dx, saved, {2}, nullptr, nullptr, nullptr); },
      {tag, 12, 4}));
  EXPECT_NO_THROW(normkit::layer_norm_backward(x, dy, dx, saved, {3, 2}, w, gw, gb));
}

// ---------------------------------------------------------------------------------------
// Free functions: group_norm

TEST(GroupNormFunctionErrors, GroupsChannelsAndParameters) {
  using O = normkit::GroupNormFuncOptions<double>;
  const char* tag = "[normkit.group_norm]";
  const auto x = input(2, 6, 3);
  RT<3> y = input(2, 6, 3);
  auto keep = [&] { return snapshot_tensors({"y"}, y); };
  EXPECT_TRUE(
      RejectsKeeping<value_error>(keep, [&] { normkit::group_norm(x, y, O(0)); },
                                  {tag, "Expected num groups to be greater than 0, got", 0}));
  EXPECT_TRUE(
      RejectsKeeping<value_error>(keep, [&] { normkit::group_norm(x, y, O(-1)); },
                                  {tag, "Expected num groups to be greater than 0, got", -1}));
  const auto x5 = input(2, 5, 3);
  RT<3> y5 = input(2, 5, 3);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      [&] { return snapshot_tensors({"y"}, y5); }, [&] { normkit::group_norm(x5, y5, O(2)); },
      {tag, "divisible by num_groups", "[2, 5, 3]", "num_groups=2"}));
  Vec w4 = ramp(4, 1, 1), w6 = ramp(6, 1, 1), b4 = ramp(4, 0, 1);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::group_norm(x, y, O(2).weight(w4)); },
      {tag, "Expected weight to be a vector of size equal to the number of channels", "[4]",
       "[2, 6, 3]"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::group_norm(x, y, O(2).weight(w6).bias(b4)); },
      {tag, "Expected bias to be a vector of size equal to the number of channels", "[4]",
       "[2, 6, 3]"}));
  // Accepted: no affine on any divisible channel count (docs/semantics.md §5.3); G == C; one group.
  EXPECT_NO_THROW(normkit::group_norm(x, y, O(2)));
  EXPECT_NO_THROW(normkit::group_norm(x, y, O(6).weight(w6)));
  EXPECT_NO_THROW(normkit::group_norm(x, y, O(1)));
  // docs/semantics.md §11.2: one value per group returns bias.
  const auto x1 = input(1, 4);
  RT<2> y1;
  ASSERT_NO_THROW(normkit::group_norm(x1, y1, O(4).weight(w4).bias(b4)));
  for (Idx c = 0; c < 4; ++c) EXPECT_EQ(y1(0, c), b4(c));
  std::vector<double> buf(36, 1.0);
  RMap<3> wrong(buf.data(), 2, 6, 2);
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::group_norm(x, wrong, O(2)); },
                                  {tag, "[2, 6, 3]", "[2, 6, 2]"}));
}

TEST(GroupNormFunctionErrors, Backward) {
  using O = normkit::GroupNormFuncOptions<double>;
  const auto x = input(2, 6, 3);
  Vec w = ramp(6, 1, 0.5), w4 = ramp(4, 1, 1);
  RT<3> y;
  normkit::SavedStats saved;
  normkit::group_norm(x, y, O(2).weight(w), &saved);
  const auto dy = input(2, 6, 3);
  RT<3> dx = input(2, 6, 3);
  Vec gw = ramp(6, 9, 1), gb = ramp(6, 8, 1);
  auto keep = [&] { return snapshot_tensors({"dx", "grad_weight", "grad_bias"}, dx, gw, gb); };
  const char* tag = "[normkit.group_norm_backward]";
  EXPECT_TRUE(RejectsKeeping<value_error>(
      keep, [&] { normkit::group_norm_backward(x, dy, dx, saved, 0, w, gw, gb); },
      {tag, "num groups", 0}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::group_norm_backward(x, dy, dx, saved, 4, w, gw, gb); },
      {tag, "divisible", "[2, 6, 3]", "num_groups=4"}));
  const auto dy_bad = input(2, 6, 4);
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::group_norm_backward(x, dy_bad, dx, saved, 2, w, gw, gb); },
      {tag, "[2, 6, 3]", "[2, 6, 4]"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::group_norm_backward(x, dy, dx, saved, 3, w, gw, gb); }, {tag, 6, 4}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::group_norm_backward(x, dy, dx, saved, 2, w4, gw, gb); },
      {tag, "weight", "[4]"}));
  EXPECT_TRUE(RejectsKeeping<shape_error>(
      keep, [&] { normkit::group_norm_backward(x, dy, dx, saved, 2, w, w4, gb); },
      {tag, "grad_weight", 6, 4}));
  EXPECT_NO_THROW(normkit::group_norm_backward(x, dy, dx, saved, 2, w, gw, gb));
}

}  // namespace
