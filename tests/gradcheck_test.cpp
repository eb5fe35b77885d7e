// Finite-difference checks of every module's backward in float64 (docs/semantics.md §8):
// central differences of L = sum(y * dy) with step 1e-6 against m.backward(dy) for dx,
// dweight and dbias; training and (for BatchNorm/InstanceNorm) evaluation with running
// statistics, affine on and off, RowMajor and ColMajor, channels-last. Plus the exact
// degenerate cases of docs/semantics.md §8.4 (eps = 0, constant channel; LayerNorm on a
// constant row).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/state.hpp"

namespace {

using Idx = Eigen::Index;
using Vec = Eigen::Tensor<double, 1>;
constexpr int kRow = Eigen::RowMajor;
constexpr int kCol = Eigen::ColMajor;

constexpr double kStep = 1e-6;  // central-difference step
constexpr double kTol = 1e-6;   // |analytic - numeric| <= kTol * (1 + |numeric|)

const char* layout_name(int L) {
  return L == kRow ? "RowMajor" : "ColMajor";
}

template <int L, std::size_t R>
Eigen::Tensor<double, static_cast<int>(R), L> random_tensor(const std::array<Idx, R>& d,
                                                            std::mt19937& g,
                                                            double lo,
                                                            double hi) {
  Eigen::Tensor<double, static_cast<int>(R), L> t(d);
  std::uniform_real_distribution<double> u(lo, hi);
  for (Idx i = 0; i < t.size(); ++i) t.data()[i] = u(g);
  return t;
}

Vec random_vec(Idx n, std::mt19937& g, double lo, double hi) {
  Vec v(n);
  std::uniform_real_distribution<double> u(lo, hi);
  for (Idx i = 0; i < n; ++i) v(i) = u(g);
  return v;
}

/// Multi-index of linear position i in a dense tensor of dims d and storage order L.
template <int L, std::size_t R>
std::array<Idx, R> unravel(Idx i, const std::array<Idx, R>& d) {
  std::array<Idx, R> idx{};
  if (L == kRow) {
    for (std::size_t k = R; k-- > 0;) {
      idx[k] = i % d[k];
      i /= d[k];
    }
  } else {
    for (std::size_t k = 0; k < R; ++k) {
      idx[k] = i % d[k];
      i /= d[k];
    }
  }
  return idx;
}

/// Non-trivial weight (|w| in [0.5, 1.5], both signs), bias and running statistics.
template <class M>
void randomize(M& m, std::mt19937& g) {
  if (m.weight().size()) {
    Vec w = random_vec(m.weight().size(), g, 0.5, 1.5);
    for (Idx i = 0; i < w.size(); i += 2) w(i) = -w(i);
    m.set_weight(w);
  }
  if (m.bias().size())
    m.set_bias(random_vec(m.bias().size(), g, -1.0, 1.0));
  if constexpr (normkit_test::has_running_stats_v<M>) {
    if (m.running_mean().size()) {
      m.set_running_mean(random_vec(m.running_mean().size(), g, -0.5, 0.5));
      m.set_running_var(random_vec(m.running_var().size(), g, 0.5, 2.0));
      m.set_num_batches_tracked(3);
    }
  }
}

/// L = sum(y * dy) of a forward on a copy of the module (the copy's running statistics
/// may move in training; the original never does).
template <class M, class X>
double loss(const M& base, const X& x, const X& dy) {
  M m = base;
  m.set_requires_grad(false);
  const auto y = m.forward(x);
  double s = 0;
  for (Idx i = 0; i < y.size(); ++i) s += y.data()[i] * dy.data()[i];
  return s;
}

struct Mismatches {
  const char* what;
  int bad = 0;
  double worst = 0;
  void check(Idx i, double analytic, double numeric) {
    const double err = std::abs(analytic - numeric);
    worst = std::max(worst, err / (1 + std::abs(numeric)));
    if (!(err <= kTol * (1 + std::abs(numeric)))) {
      if (bad++ < 4)
        ADD_FAILURE() << what << "[" << i << "]: backward " << analytic << ", finite difference "
                      << numeric;
    }
  }
  ~Mismatches() { EXPECT_EQ(bad, 0) << what << ": worst relative error " << worst; }
};

enum class Which { weight, bias };

template <class M, class X>
double param_loss(const M& base, const X& x, const X& dy, Which which, Idx c, double delta) {
  M m = base;
  Vec v = which == Which::weight ? base.weight() : base.bias();
  v(c) += delta;
  which == Which::weight ? m.set_weight(v) : m.set_bias(v);
  return loss(m, x, dy);
}

/// dx, dweight and dbias of base.backward(dy) after base.forward(x) against central
/// differences.
template <class M, class X>
void gradcheck(const M& base, const X& x, const X& dy) {
  M a = base;
  (void)a.forward(x);
  // A training forward keeps its input (backward(dy)); an evaluation forward keeps nothing,
  // and backward(x, dy) recomputes what that mode uses.
  const auto g = a.is_training() ? a.backward(dy) : a.backward(x, dy);
  const auto g2 = a.backward(x, dy);
  EXPECT_TRUE(normkit_test::same_state(
      normkit_test::snapshot_tensors({"dx", "dw", "db"}, g.input, g.weight, g.bias),
      normkit_test::snapshot_tensors({"dx", "dw", "db"}, g2.input, g2.weight, g2.bias)))
      << "backward(dy) and backward(x, dy) differ";
  ASSERT_EQ(g.input.size(), x.size());
  for (std::size_t k = 0; k < static_cast<std::size_t>(X::NumDimensions); ++k)
    ASSERT_EQ(g.input.dimensions()[k], x.dimensions()[k]);
  {
    Mismatches mm{"dx"};
    X xp = x;
    for (Idx i = 0; i < x.size(); ++i) {
      const double x0 = x.data()[i];
      xp.data()[i] = x0 + kStep;
      const double lp = loss(base, xp, dy);
      xp.data()[i] = x0 - kStep;
      const double lm = loss(base, xp, dy);
      xp.data()[i] = x0;
      mm.check(i, g.input.data()[i], (lp - lm) / (2 * kStep));
    }
  }
  ASSERT_EQ(g.weight.size(), base.weight().size());
  ASSERT_EQ(g.bias.size(), base.bias().size());
  {
    Mismatches mm{"dweight"};
    for (Idx c = 0; c < g.weight.size(); ++c) {
      const double n = (param_loss(base, x, dy, Which::weight, c, kStep) -
                        param_loss(base, x, dy, Which::weight, c, -kStep)) /
                       (2 * kStep);
      mm.check(c, g.weight(c), n);
    }
  }
  {
    Mismatches mm{"dbias"};
    for (Idx c = 0; c < g.bias.size(); ++c) {
      const double n = (param_loss(base, x, dy, Which::bias, c, kStep) -
                        param_loss(base, x, dy, Which::bias, c, -kStep)) /
                       (2 * kStep);
      mm.check(c, g.bias(c), n);
    }
  }
}

/// Evaluation with running statistics (docs/semantics.md §8.3): dx = dy * w_c * r_c with r_c =
/// 1/sqrt(running_var_c + eps), dw_c = sum dy * (x - running_mean_c) * r_c, db_c = sum dy;
/// and the forward leaves the running statistics and the counter untouched.
template <int L, class M, class X, std::size_t R>
void check_running_stats_formula(const M& base,
                                 const X& x,
                                 const X& dy,
                                 const std::array<Idx, R>& dims,
                                 int channel_axis,
                                 double eps) {
  M a = base;
  (void)a.forward(x);
  EXPECT_TRUE(normkit_test::same_state(
      normkit_test::snapshot_tensors({"running_mean", "running_var"}, base.running_mean(),
                                     base.running_var()),
      normkit_test::snapshot_tensors({"running_mean", "running_var"}, a.running_mean(),
                                     a.running_var())))
      << "eval forward moved the running statistics";
  EXPECT_EQ(a.num_batches_tracked(), base.num_batches_tracked());
  const auto g = a.backward(x, dy);
  const Idx C = base.running_mean().size();
  std::vector<double> dw(static_cast<std::size_t>(C), 0.0), db(dw.size(), 0.0);
  for (Idx i = 0; i < x.size(); ++i) {
    const Idx c = unravel<L>(i, dims)[static_cast<std::size_t>(channel_axis)];
    const double r = 1 / std::sqrt(base.running_var()(c) + eps);
    const double w = base.weight().size() ? base.weight()(c) : 1.0;
    EXPECT_NEAR(g.input.data()[i], dy.data()[i] * w * r,
                1e-13 * (1 + std::abs(dy.data()[i] * w * r)))
        << "dx[" << i << "]";
    dw[static_cast<std::size_t>(c)] += dy.data()[i] * (x.data()[i] - base.running_mean()(c)) * r;
    db[static_cast<std::size_t>(c)] += dy.data()[i];
  }
  for (Idx c = 0; c < g.weight.size(); ++c) {
    EXPECT_NEAR(g.weight(c), dw[static_cast<std::size_t>(c)],
                1e-12 * (1 + std::abs(dw[static_cast<std::size_t>(c)])))
        << c;
    EXPECT_NEAR(g.bias(c), db[static_cast<std::size_t>(c)],
                1e-12 * (1 + std::abs(db[static_cast<std::size_t>(c)])))
        << c;
  }
}

/// Randomizes the module, draws x and dy of the given dims and runs the checks.
template <int L, class M, std::size_t R>
void check_module(M base,
                  const std::array<Idx, R>& dims,
                  int channel_axis,
                  std::mt19937& g,
                  const std::string& what) {
  SCOPED_TRACE(what + ", " + layout_name(L) + (base.is_training() ? ", train" : ", eval"));
  randomize(base, g);
  const auto x = random_tensor<L>(dims, g, -2.0, 2.0);
  const auto dy = random_tensor<L>(dims, g, -1.0, 1.0);
  gradcheck(base, x, dy);
  if constexpr (normkit_test::has_running_stats_v<M>) {
    if (!base.is_training() && base.running_mean().size()) {
      check_running_stats_formula<L>(base, x, dy, dims, channel_axis, base.options().eps());
    }
  }
}

enum class Mode { train, train_tracking, eval, eval_tracking };
constexpr Mode kModes[] = {Mode::train, Mode::train_tracking, Mode::eval, Mode::eval_tracking};
bool tracking(Mode m) {
  return m == Mode::train_tracking || m == Mode::eval_tracking;
}
bool training(Mode m) {
  return m == Mode::train || m == Mode::train_tracking;
}
std::string mode_name(Mode m, bool affine) {
  std::string s = training(m) ? "train" : "eval";
  s += tracking(m) ? "+tracking" : "";
  return s + (affine ? ", affine" : ", no affine");
}

template <class M>
M make_bn(Idx C, Mode mode, bool affine, bool channels_last = false) {
  M m(normkit::BatchNormOptions(C)
          .affine(affine)
          .track_running_stats(tracking(mode))
          .momentum(0.3)
          .eps(1e-3)
          .channels_last(channels_last));
  m.train(training(mode));
  return m;
}

template <class M>
M make_in(Idx C, Mode mode, bool affine, bool channels_last = false) {
  M m(normkit::InstanceNormOptions(C)
          .affine(affine)
          .track_running_stats(tracking(mode))
          .momentum(0.3)
          .eps(1e-3)
          .channels_last(channels_last));
  m.train(training(mode));
  return m;
}

template <int L>
void batch_norm_cases(std::mt19937& g) {
  for (Mode mode : kModes) {
    for (bool affine : {true, false}) {
      const std::string w = mode_name(mode, affine);
      check_module<L>(make_bn<normkit::BatchNorm1d<double>>(3, mode, affine),
                      std::array<Idx, 2>{5, 3}, 1, g, "BN1d (5,3), " + w);
      check_module<L>(make_bn<normkit::BatchNorm1d<double>>(3, mode, affine),
                      std::array<Idx, 3>{3, 3, 4}, 1, g, "BN1d (3,3,4), " + w);
      check_module<L>(make_bn<normkit::BatchNorm2d<double>>(3, mode, affine),
                      std::array<Idx, 4>{2, 3, 3, 2}, 1, g, "BN2d (2,3,3,2), " + w);
      check_module<L>(make_bn<normkit::BatchNorm3d<double>>(2, mode, affine),
                      std::array<Idx, 5>{2, 2, 2, 2, 3}, 1, g, "BN3d (2,2,2,2,3), " + w);
      // channels_last: dims (N, H, W, C).
      check_module<L>(make_bn<normkit::BatchNorm2d<double>>(3, mode, affine, true),
                      std::array<Idx, 4>{2, 2, 3, 3}, 3, g, "BN2d channels_last (2,2,3,3), " + w);
    }
  }
  // momentum none (cumulative average) in training.
  normkit::BatchNorm1d<double> cma(normkit::BatchNormOptions(3).momentum(std::nullopt));
  check_module<L>(cma, std::array<Idx, 3>{4, 3, 2}, 1, g, "BN1d momentum none");
}

template <int L>
void instance_norm_cases(std::mt19937& g) {
  for (Mode mode : kModes) {
    for (bool affine : {true, false}) {
      const std::string w = mode_name(mode, affine);
      check_module<L>(make_in<normkit::InstanceNorm1d<double>>(3, mode, affine),
                      std::array<Idx, 3>{2, 3, 5}, 1, g, "IN1d (2,3,5), " + w);
      check_module<L>(make_in<normkit::InstanceNorm1d<double>>(3, mode, affine),
                      std::array<Idx, 2>{3, 5}, 0, g, "IN1d unbatched (3,5), " + w);
      check_module<L>(make_in<normkit::InstanceNorm2d<double>>(3, mode, affine),
                      std::array<Idx, 4>{2, 3, 3, 2}, 1, g, "IN2d (2,3,3,2), " + w);
      check_module<L>(make_in<normkit::InstanceNorm2d<double>>(3, mode, affine),
                      std::array<Idx, 3>{3, 2, 3}, 0, g, "IN2d unbatched (3,2,3), " + w);
      check_module<L>(make_in<normkit::InstanceNorm3d<double>>(2, mode, affine),
                      std::array<Idx, 5>{2, 2, 2, 1, 3}, 1, g, "IN3d (2,2,2,1,3), " + w);
      check_module<L>(make_in<normkit::InstanceNorm2d<double>>(3, mode, affine, true),
                      std::array<Idx, 4>{2, 2, 3, 3}, 3, g, "IN2d channels_last (2,2,3,3), " + w);
    }
  }
}

template <int L>
void layer_norm_cases(std::mt19937& g) {
  struct Affine {
    bool elementwise, bias;
    const char* name;
  };
  for (Affine a : {Affine{true, true, "affine"}, Affine{false, false, "no affine"},
                   Affine{true, false, "weight only"}}) {
    auto make = [&](std::vector<normkit::Index> shape) {
      return normkit::LayerNorm<double>(normkit::LayerNormOptions(std::move(shape))
                                            .elementwise_affine(a.elementwise)
                                            .bias(a.bias));
    };
    check_module<L>(make({6}), std::array<Idx, 2>{4, 6}, -1, g,
                    std::string("LN {6} on (4,6), ") + a.name);
    check_module<L>(make({6}), std::array<Idx, 1>{6}, -1, g,
                    std::string("LN {6} on (6), ") + a.name);
    check_module<L>(make({3, 4}), std::array<Idx, 3>{2, 3, 4}, -1, g,
                    std::string("LN {3,4} on (2,3,4), ") + a.name);
    check_module<L>(make({3, 2}), std::array<Idx, 4>{2, 2, 3, 2}, -1, g,
                    std::string("LN {3,2} on (2,2,3,2), ") + a.name);
    auto ev = make({4});
    ev.eval();
    check_module<L>(ev, std::array<Idx, 2>{3, 4}, -1, g, std::string("LN {4} on (3,4), ") + a.name);
  }
}

template <int L>
void group_norm_cases(std::mt19937& g) {
  for (bool affine : {true, false}) {
    const std::string w = affine ? "affine" : "no affine";
    auto make = [&](Idx G, Idx C, bool cl = false) {
      return normkit::GroupNorm<double>(
          normkit::GroupNormOptions(G, C).affine(affine).channels_last(cl));
    };
    check_module<L>(make(2, 4), std::array<Idx, 3>{2, 4, 3}, 1, g, "GN(2,4) (2,4,3), " + w);
    check_module<L>(make(3, 6), std::array<Idx, 2>{3, 6}, 1, g, "GN(3,6) (3,6), " + w);
    check_module<L>(make(2, 4), std::array<Idx, 4>{2, 4, 2, 2}, 1, g, "GN(2,4) (2,4,2,2), " + w);
    check_module<L>(make(4, 4), std::array<Idx, 3>{2, 4, 3}, 1, g, "GN(4,4) (2,4,3), " + w);
    check_module<L>(make(1, 3), std::array<Idx, 3>{2, 3, 2}, 1, g, "GN(1,3) (2,3,2), " + w);
    check_module<L>(make(2, 4, true), std::array<Idx, 3>{2, 3, 4}, 2, g,
                    "GN(2,4) channels_last (2,3,4), " + w);
    auto ev = make(2, 4);
    ev.eval();
    check_module<L>(ev, std::array<Idx, 3>{2, 4, 3}, 1, g, "GN(2,4) (2,4,3), " + w);
  }
}

TEST(GradCheck, BatchNorm) {
  std::mt19937 g(1234u);
  batch_norm_cases<kRow>(g);
  batch_norm_cases<kCol>(g);
}

TEST(GradCheck, InstanceNorm) {
  std::mt19937 g(2345u);
  instance_norm_cases<kRow>(g);
  instance_norm_cases<kCol>(g);
}

TEST(GradCheck, LayerNorm) {
  std::mt19937 g(3456u);
  layer_norm_cases<kRow>(g);
  layer_norm_cases<kCol>(g);
}

TEST(GradCheck, GroupNorm) {
  std::mt19937 g(4567u);
  group_norm_cases<kRow>(g);
  group_norm_cases<kCol>(g);
}

// ---------------------------------------------------------------------------------------
// docs/semantics.md §6.1, §8.4: eps = 0 on a constant channel in BatchNorm/InstanceNorm with batch
// statistics: r := 0, so y = beta exactly, dx = 0, dweight = 0, dbias = sum(dy).

template <int L>
void bn_eps0_constant_channel(bool training_mode) {
  SCOPED_TRACE(std::string(layout_name(L)) +
               (training_mode ? ", train" : ", eval without running stats"));
  std::mt19937 g(99u);
  normkit::BatchNorm1d<double> bn(
      normkit::BatchNormOptions(2).eps(0).track_running_stats(training_mode));
  bn.set_weight(Vec(2).setValues({1.5, -0.7}));
  bn.set_bias(Vec(2).setValues({0.25, -1.0}));
  bn.train(training_mode);
  Eigen::Tensor<double, 3, L> x = random_tensor<L>(std::array<Idx, 3>{4, 2, 3}, g, -2.0, 2.0);
  for (Idx n = 0; n < 4; ++n) {
    for (Idx l = 0; l < 3; ++l) x(n, 0, l) = 7.0;
  }
  const Eigen::Tensor<double, 3, L> dy =
      random_tensor<L>(std::array<Idx, 3>{4, 2, 3}, g, -1.0, 1.0);
  const auto y = bn.forward(x);
  const auto gr = bn.backward(x, dy);
  double sum_dy = 0;
  for (Idx n = 0; n < 4; ++n) {
    for (Idx l = 0; l < 3; ++l) {
      EXPECT_EQ(y(n, 0, l), 0.25) << n << "," << l;
      EXPECT_EQ(gr.input(n, 0, l), 0.0) << n << "," << l;
      EXPECT_TRUE(std::isfinite(y(n, 1, l)));
      EXPECT_TRUE(std::isfinite(gr.input(n, 1, l)));
      sum_dy += dy(n, 0, l);
    }
  }
  EXPECT_EQ(gr.weight(0), 0.0);
  EXPECT_NEAR(gr.bias(0), sum_dy, 1e-14);
  EXPECT_TRUE(std::isfinite(gr.weight(1)));
}

template <int L>
void in_eps0_constant_channel() {
  SCOPED_TRACE(layout_name(L));
  std::mt19937 g(77u);
  normkit::InstanceNorm1d<double> in(normkit::InstanceNormOptions(2).eps(0).affine(true));
  in.set_weight(Vec(2).setValues({-1.25, 0.8}));
  in.set_bias(Vec(2).setValues({0.5, 2.0}));
  // Every instance of channel 0 is constant (7 and -3): dweight_0 = 0.
  Eigen::Tensor<double, 3, L> x = random_tensor<L>(std::array<Idx, 3>{2, 2, 4}, g, -2.0, 2.0);
  for (Idx l = 0; l < 4; ++l) {
    x(0, 0, l) = 7.0;
    x(1, 0, l) = -3.0;
  }
  const Eigen::Tensor<double, 3, L> dy =
      random_tensor<L>(std::array<Idx, 3>{2, 2, 4}, g, -1.0, 1.0);
  const auto y = in.forward(x);
  const auto gr = in.backward(dy);
  double sum_dy = 0;
  for (Idx n = 0; n < 2; ++n) {
    for (Idx l = 0; l < 4; ++l) {
      EXPECT_EQ(y(n, 0, l), 0.5) << n << "," << l;
      EXPECT_EQ(gr.input(n, 0, l), 0.0) << n << "," << l;
      sum_dy += dy(n, 0, l);
    }
  }
  EXPECT_EQ(gr.weight(0), 0.0);
  EXPECT_NEAR(gr.bias(0), sum_dy, 1e-14);
  // Unbatched (C, L): the same rule.
  normkit::InstanceNorm1d<double> u(normkit::InstanceNormOptions(2).eps(0).affine(true));
  u.set_bias(Vec(2).setValues({0.5, 2.0}));
  Eigen::Tensor<double, 2, L> xu(2, 4);
  xu.setValues({{7, 7, 7, 7}, {1, 2, 3, 5}});
  Eigen::Tensor<double, 2, L> dyu(2, 4);
  dyu.setValues({{1, 2, 3, 4}, {0.5, -1, 2, 0}});
  const auto yu = u.forward(xu);
  const auto gu = u.backward(dyu);
  for (Idx l = 0; l < 4; ++l) {
    EXPECT_EQ(yu(0, l), 0.5);
    EXPECT_EQ(gu.input(0, l), 0.0);
  }
  EXPECT_EQ(gu.weight(0), 0.0);
  EXPECT_NEAR(gu.bias(0), 10.0, 1e-14);
}

TEST(GradCheckEdge, EpsZeroConstantChannelBatchNorm) {
  bn_eps0_constant_channel<kRow>(true);
  bn_eps0_constant_channel<kCol>(true);
  bn_eps0_constant_channel<kRow>(false);
  bn_eps0_constant_channel<kCol>(false);
}

TEST(GradCheckEdge, EpsZeroConstantChannelInstanceNorm) {
  in_eps0_constant_channel<kRow>();
  in_eps0_constant_channel<kCol>();
}

// docs/semantics.md §6.2: LayerNorm backward on a constant row is finite:
// x = (7, 7, 7, 7), dy = (1, 2, 3, 4), eps = 1e-5: xhat = 0, so dx = r * (dy - mean(dy)) with
// r = 1/sqrt(eps) ~ 316.2: (-474.3, -158.1, 158.1, 474.3); dweight = 0, dbias = dy.
template <int L>
void ln_constant_row() {
  SCOPED_TRACE(layout_name(L));
  const double r = 1 / std::sqrt(1e-5);
  const double want[4] = {-1.5 * r, -0.5 * r, 0.5 * r, 1.5 * r};
  normkit::LayerNorm<double> ln(normkit::LayerNormOptions({4}));
  Eigen::Tensor<double, 2, L> x(1, 4), dy(1, 4);
  x.setConstant(7.0);
  dy.setValues({{1, 2, 3, 4}});
  const auto y = ln.forward(x);
  const auto gr = ln.backward(dy);
  for (Idx i = 0; i < 4; ++i) {
    EXPECT_NEAR(y(0, i), 0.0, 1e-12);
    EXPECT_NEAR(gr.input(0, i), want[i], 1e-9 * std::abs(want[i])) << i;
    EXPECT_NEAR(gr.weight(i), 0.0, 1e-12) << i;
    EXPECT_NEAR(gr.bias(i), dy(0, i), 1e-15) << i;
  }
  EXPECT_NEAR(gr.input(0, 0), -474.342, 1e-3);
  EXPECT_NEAR(gr.input(0, 1), -158.114, 1e-3);
  // The free function agrees.
  Eigen::Tensor<double, 2, L> yf, dxf;
  normkit::SavedStats saved;
  normkit::layer_norm(x, yf, normkit::LayerNormFuncOptions<double>({4}), &saved);
  normkit::layer_norm_backward(x, dy, dxf, saved, {4}, nullptr, nullptr, nullptr);
  for (Idx i = 0; i < 4; ++i) EXPECT_NEAR(dxf(0, i), want[i], 1e-9 * std::abs(want[i])) << i;
  // The function is smooth there (eps > 0): finite differences agree too.
  normkit::LayerNorm<double> ln2(normkit::LayerNormOptions({4}));
  ln2.set_weight(Vec(4).setValues({1.5, -0.5, 1.0, 2.0}));
  ln2.set_bias(Vec(4).setValues({0.1, 0.2, 0.3, 0.4}));
  gradcheck(ln2, x, dy);
  // Rank 1: input shape == normalized_shape.
  Eigen::Tensor<double, 1, L> x1(4), dy1(4);
  x1.setConstant(7.0);
  dy1.setValues({1, 2, 3, 4});
  normkit::LayerNorm<double> ln3(normkit::LayerNormOptions({4}));
  (void)ln3.forward(x1);
  const auto g1 = ln3.backward(dy1);
  for (Idx i = 0; i < 4; ++i) EXPECT_NEAR(g1.input(i), want[i], 1e-9 * std::abs(want[i])) << i;
}

TEST(GradCheckEdge, LayerNormConstantRow) {
  ln_constant_row<kRow>();
  ln_constant_row<kCol>();
}

}  // namespace
