// Precise BatchNorm (normkit/precise_bn.hpp, docs/semantics.md §2.8): recompute_running_stats
// and RunningStatsAccumulator against the mean and unbiased variance computed directly, in
// double, over the concatenation of every batch (batches of different sizes, spatial sizes
// and means, offset 1e4), and against what update_bn (a cumulative-average forward per batch)
// gives instead; bitwise identical for 1, 2 and 3 threads; InstanceNorm's average of instance
// statistics; RowMajor, ColMajor and channels-last storage, TensorMaps, pointers and input
// iterators; bfloat16 batches; every error: type, tag, message, and a module left
// bit-identical. Parameters, mode and what the last forward kept are never touched.
#define EIGEN_USE_THREADS
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/bits.hpp"
#include "support/state.hpp"

namespace {

using Idx = Eigen::Index;
using normkit::shape_error;
using normkit::value_error;
using normkit_test::same_state;
using normkit_test::snapshot;

// Every parallel path of the reduction (blocks of one slot side by side, slot groups, column
// tiles) must run on tensors small enough for a unit test: the threshold is lowered for the
// whole program, as in threading_test.
[[maybe_unused]] const int kThreshold = [] {
  normkit::set_min_parallel_elements(Idx{1} << 12);
  return 0;
}();

template <class T, int R, int L = Eigen::RowMajor>
using Tn = Eigen::Tensor<T, R, L>;

// ---------------------------------------------------------------------------------------
// Data and the reference statistics.

/// A tensor of the given dims with normal(mean + channel * channel_step, sd) values (channel
/// on logical axis 1 of (N, C, ...) dims as given, i.e. the physical axis `caxis`).
template <class T, int R, int L = Eigen::RowMajor>
Tn<T, R, L> normal(unsigned seed,
                   double mean,
                   double sd,
                   const std::array<Idx, R>& dims,
                   int caxis = 1,
                   double channel_step = 0.5) {
  Tn<T, R, L> t(dims);
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(0.0, sd);
  for (Idx i = 0; i < t.size(); ++i) {
    // The channel of element i from its physical multi-index.
    Idx rem = i, c = 0;
    for (int k = 0; k < R; ++k) {
      const int a = L == Eigen::RowMajor ? R - 1 - k : k;
      const Idx v = rem % dims[static_cast<std::size_t>(a)];
      rem /= dims[static_cast<std::size_t>(a)];
      if (a == caxis)
        c = v;
    }
    t.data()[i] = static_cast<T>(mean + channel_step * static_cast<double>(c) + d(gen));
  }
  return t;
}

/// Calls f(n, c, value) for every element of x: n its sample (0 for unbatched input), c its
/// channel, as the module reads x (channels last: the last axis; unbatched: (C, *)).
template <class T, int R, int L, class F>
void for_each_element(const Tn<T, R, L>& x, bool channels_last, bool batched, F&& f) {
  const int caxis = batched ? (channels_last && R >= 3 ? R - 1 : 1) : (channels_last ? R - 1 : 0);
  for (Idx i = 0; i < x.size(); ++i) {
    std::array<Idx, R> idx{};
    Idx rem = i;
    for (int k = 0; k < R; ++k) {
      const int a = L == Eigen::RowMajor ? R - 1 - k : k;
      const Idx d = x.dimension(static_cast<std::size_t>(a));
      idx[static_cast<std::size_t>(a)] = rem % d;
      rem /= d;
    }
    f(batched ? idx[0] : Idx{0}, idx[static_cast<std::size_t>(caxis)],
      static_cast<double>(x.data()[i]));
  }
}

/// Mean and unbiased variance of v, two passes in double.
void mean_var(const std::vector<double>& v, double& mean, double& var) {
  double s = 0;
  for (double x : v) s += x;
  mean = s / static_cast<double>(v.size());
  double q = 0;
  for (double x : v) q += (x - mean) * (x - mean);
  var = q / static_cast<double>(v.size() - 1);
}

struct Stats {
  std::vector<double> mean, var;
};

/// Per channel values of every batch (the concatenation).
struct Pool {
  explicit Pool(Idx channels) : values(static_cast<std::size_t>(channels)) {}
  std::vector<std::vector<double>> values;
  template <class T, int R, int L>
  void add(const Tn<T, R, L>& x, bool channels_last = false) {
    for_each_element(x, channels_last, true, [&](Idx, Idx c, double v) {
      values[static_cast<std::size_t>(c)].push_back(v);
    });
  }
  /// The mean and unbiased variance of all values, per channel.
  Stats stats() const {
    Stats s;
    for (const auto& v : values) {
      double m = 0, q = 0;
      mean_var(v, m, q);
      s.mean.push_back(m);
      s.var.push_back(q);
    }
    return s;
  }
};

/// InstanceNorm's reference: per channel, the plain average over every instance of its mean
/// and of its unbiased variance; `pooled` also keeps every element (for the contrast).
struct Instances {
  explicit Instances(Idx channels) : C(channels), pooled(channels) {}
  Idx C;
  std::vector<std::vector<double>> mean_of, var_of;  // per channel, one entry per instance
  Pool pooled;
  template <class T, int R, int L>
  void add(const Tn<T, R, L>& x, bool batched, bool channels_last = false) {
    std::vector<std::vector<double>> inst;  // n * C + c
    const Idx N = batched ? x.dimension(0) : 1;
    inst.resize(static_cast<std::size_t>(N * C));
    for_each_element(x, channels_last, batched, [&](Idx n, Idx c, double v) {
      inst[static_cast<std::size_t>(n * C + c)].push_back(v);
      pooled.values[static_cast<std::size_t>(c)].push_back(v);
    });
    mean_of.resize(static_cast<std::size_t>(C));
    var_of.resize(static_cast<std::size_t>(C));
    for (Idx l = 0; l < N * C; ++l) {
      double m = 0, q = 0;
      mean_var(inst[static_cast<std::size_t>(l)], m, q);
      mean_of[static_cast<std::size_t>(l % C)].push_back(m);
      var_of[static_cast<std::size_t>(l % C)].push_back(q);
    }
  }
  Stats stats() const {
    Stats s;
    for (Idx c = 0; c < C; ++c) {
      double m = 0, q = 0;
      for (double v : mean_of[static_cast<std::size_t>(c)]) m += v;
      for (double v : var_of[static_cast<std::size_t>(c)]) q += v;
      const auto k = static_cast<double>(mean_of[static_cast<std::size_t>(c)].size());
      s.mean.push_back(m / k);
      s.var.push_back(q / k);
    }
    return s;
  }
};

::testing::AssertionResult Near(double got, double want, double rel, const char* what, Idx c) {
  if (std::abs(got - want) <= rel * std::abs(want))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << "[" << c << "] = " << got << ", expected " << want << " (relative error "
         << std::abs(got - want) / std::abs(want) << " > " << rel << ")";
}

/// Tensor (any 1-D, any scalar) against reference values within `rel`.
template <class V>
void expect_near(const V& got, const std::vector<double>& want, double rel, const char* what) {
  ASSERT_EQ(static_cast<std::size_t>(got.size()), want.size()) << what;
  for (Idx c = 0; c < got.size(); ++c)
    EXPECT_TRUE(Near(static_cast<double>(got(c)), want[static_cast<std::size_t>(c)], rel, what, c));
}

constexpr double kRel = 1e-12;  // double results against the double reference
// A float result: the reference rounded to float (half an ulp) plus the double error.
constexpr double kRelFloat = 0x1p-24 + 1e-12;

// ---------------------------------------------------------------------------------------
// (a) BatchNorm: exact statistics of the concatenation, not update_bn's average.

/// Four NCHW batches of different sizes, spatial sizes and means, offset 1e4.
std::vector<Tn<double, 4>> offset_batches() {
  std::vector<Tn<double, 4>> b;
  b.push_back(normal<double, 4>(1, 1e4, 1.0, {5, 3, 7, 6}));
  b.push_back(normal<double, 4>(2, 1e4 + 3.0, 0.5, {2, 3, 7, 6}));
  b.push_back(normal<double, 4>(3, 1e4 - 2.0, 2.0, {9, 3, 5, 4}));
  b.push_back(normal<double, 4>(4, 1e4 + 0.25, 1.0, {1, 3, 3, 3}));
  return b;
}

TEST(PreciseBn, BatchNormIsTheConcatenationsMeanAndUnbiasedVariance) {
  const auto batches = offset_batches();
  Pool pool(3);
  for (const auto& x : batches) pool.add(x);
  const Stats ref = pool.stats();

  normkit::BatchNorm2d<double> bn{3};
  normkit::recompute_running_stats(bn, batches);
  expect_near(bn.running_mean(), ref.mean, kRel, "running_mean");
  expect_near(bn.running_var(), ref.var, kRel, "running_var");
  EXPECT_EQ(bn.num_batches_tracked(), 4);

  // What update_bn does: reset, momentum None (cumulative average), one training forward per
  // batch. Its mean weights each batch alike, its variance misses the spread of the batch
  // means: both far from the population's.
  normkit::BatchNorm2d<double> ub{normkit::BatchNormOptions(3).momentum(std::nullopt)};
  ub.reset_running_stats();
  for (const auto& x : batches) ub.forward(x);
  EXPECT_EQ(ub.num_batches_tracked(), bn.num_batches_tracked());
  for (Idx c = 0; c < 3; ++c) {
    const auto k = static_cast<std::size_t>(c);
    EXPECT_GT(std::abs(ub.running_mean()(c) - ref.mean[k]), 0.1) << c;
    EXPECT_GT(std::abs(ub.running_var()(c) - ref.var[k]), 0.5 * ref.var[k]) << c;
    // ... and so far from ours.
    EXPECT_GT(std::abs(ub.running_var()(c) - bn.running_var()(c)), 0.5 * ref.var[k]) << c;
  }

  // The accumulator gives the same bits, and its double statistics are the reference too.
  normkit::BatchNorm2d<double> bn2{3};
  normkit::RunningStatsAccumulator<normkit::BatchNorm2d<double>> acc(bn2);
  for (const auto& x : batches) acc.add(x);
  EXPECT_EQ(acc.batches(), 4);
  EXPECT_EQ(acc.count(), 5 * 42 + 2 * 42 + 9 * 20 + 1 * 9);
  EXPECT_EQ(acc.num_features(), 3);
  expect_near(acc.mean(), ref.mean, kRel, "acc.mean()");
  expect_near(acc.var(), ref.var, kRel, "acc.var()");
  acc.write(bn2);
  EXPECT_TRUE(normkit_test::same_bits(bn2.running_mean(), bn.running_mean()));
  EXPECT_TRUE(normkit_test::same_bits(bn2.running_var(), bn.running_var()));
  EXPECT_TRUE(normkit_test::same_bits(bn2.running_mean(), acc.mean()));
  EXPECT_TRUE(normkit_test::same_bits(bn2.running_var(), acc.var()));
  EXPECT_EQ(bn2.num_batches_tracked(), 4);
}

TEST(PreciseBn, EqualSizedBatchesStillDifferFromUpdateBn) {
  // k = 4 batches of n = 2 * 4 elements per channel drawn around the same mean: update_bn's
  // variance is the average of the 4 batch variances (Bessel's correction per batch, the
  // spread of the batch means lost); ours is the variance of the 32 elements.
  std::vector<Tn<double, 3>> batches;
  for (unsigned s = 0; s < 4; ++s)
    batches.push_back(normal<double, 3>(10 + s, 0.0, 1.0, {2, 2, 4}));
  Pool pool(2);
  std::vector<double> avg_var(2, 0.0);
  for (const auto& x : batches) {
    pool.add(x);
    Pool one(2);
    one.add(x);
    const Stats s = one.stats();
    for (std::size_t c = 0; c < 2; ++c) avg_var[c] += s.var[c] / 4;
  }
  const Stats ref = pool.stats();
  normkit::BatchNorm1d<double> bn{2};
  normkit::recompute_running_stats(bn, batches);
  expect_near(bn.running_var(), ref.var, kRel, "running_var");
  normkit::BatchNorm1d<double> ub{normkit::BatchNormOptions(2).momentum(std::nullopt)};
  for (const auto& x : batches) ub.forward(x);
  expect_near(ub.running_var(), avg_var, 1e-14, "update_bn's running_var");
  for (Idx c = 0; c < 2; ++c)
    EXPECT_GT(std::abs(ub.running_var()(c) - bn.running_var()(c)), 1e-2 * bn.running_var()(c));
}

TEST(PreciseBn, OneBatchIsWhatAMomentumOneForwardStores) {
  // A batch alone: the very bits of a training forward with momentum 1 (same reduction, same
  // expressions), for double and float modules.
  const auto x = normal<double, 4>(21, 1e4, 1.0, {6, 3, 9, 9});
  normkit::BatchNorm2d<double> fwd{normkit::BatchNormOptions(3).momentum(1.0)};
  fwd.forward(x);
  normkit::BatchNorm2d<double> bn{3};
  normkit::recompute_running_stats(bn, std::vector<const Tn<double, 4>*>{&x});
  EXPECT_TRUE(normkit_test::same_bits(bn.running_mean(), fwd.running_mean()));
  EXPECT_TRUE(normkit_test::same_bits(bn.running_var(), fwd.running_var()));
  EXPECT_EQ(bn.num_batches_tracked(), fwd.num_batches_tracked());

  const Tn<float, 4> xf = x.cast<float>();
  normkit::BatchNorm2d<float> fwdf{normkit::BatchNormOptions(3).momentum(1.0)};
  fwdf.forward(xf);
  normkit::BatchNorm2d<float> bnf{3};
  normkit::recompute_running_stats(
      bnf, std::vector<std::reference_wrapper<const Tn<float, 4>>>{std::cref(xf)});
  EXPECT_TRUE(normkit_test::same_bits(bnf.running_mean(), fwdf.running_mean()));
  EXPECT_TRUE(normkit_test::same_bits(bnf.running_var(), fwdf.running_var()));
}

TEST(PreciseBn, FloatModuleRoundsTheDoubleStatisticsOnce) {
  std::vector<Tn<float, 4>> batches;
  batches.push_back(normal<float, 4>(31, 1e4, 1.0, {4, 5, 8, 8}));
  batches.push_back(normal<float, 4>(32, 1e4 + 5.0, 3.0, {7, 5, 3, 5}));
  Pool pool(5);
  for (const auto& x : batches) pool.add(x);
  const Stats ref = pool.stats();
  normkit::BatchNorm2d<float> bn{5};
  normkit::RunningStatsAccumulator<normkit::BatchNorm2d<float>> acc(bn);
  for (const auto& x : batches) acc.add(x);
  expect_near(acc.mean(), ref.mean, kRel, "acc.mean()");
  expect_near(acc.var(), ref.var, kRel, "acc.var()");
  acc.write(bn);
  expect_near(bn.running_mean(), ref.mean, kRelFloat, "running_mean");
  expect_near(bn.running_var(), ref.var, kRelFloat, "running_var");
  for (Idx c = 0; c < 5; ++c) {
    EXPECT_EQ(bn.running_mean()(c), static_cast<float>(acc.mean()(c))) << c;
    EXPECT_EQ(bn.running_var()(c), static_cast<float>(acc.var()(c))) << c;
  }
}

TEST(PreciseBn, BatchNorm1dMixesRanksAndTakesOneValueBatches) {
  // BatchNorm1d takes (N, C) and (N, C, L): a batch of one sample of (N, C) is one value per
  // channel, fine as long as all batches together have more than one.
  normkit::BatchNorm1d<double> bn{4};
  normkit::RunningStatsAccumulator<normkit::BatchNorm1d<double>> acc(bn);
  const auto a = normal<double, 2>(41, 2.0, 1.0, {1, 4});
  const auto b = normal<double, 3>(42, -1.0, 2.0, {3, 4, 5});
  const auto c = normal<double, 2>(43, 7.0, 1.0, {6, 4});
  acc.add(a);
  acc.add(b);
  acc.add(c);
  Pool pool(4);
  pool.add(a);
  pool.add(b);
  pool.add(c);
  const Stats ref = pool.stats();
  acc.write(bn);
  expect_near(bn.running_mean(), ref.mean, kRel, "running_mean");
  expect_near(bn.running_var(), ref.var, kRel, "running_var");
  EXPECT_EQ(acc.count(), 1 + 15 + 6);

  // Two single-value batches: two values per channel, the unbiased variance of the pair.
  Tn<double, 2> p(1, 4), q(1, 4);
  p.setValues({{1, 2, 3, 4}});
  q.setValues({{3, 2, 0, 10}});
  normkit::recompute_running_stats(bn, std::vector<Tn<double, 2>>{p, q});
  const double want_mean[] = {2, 2, 1.5, 7}, want_var[] = {2, 0, 4.5, 18};
  for (Idx k = 0; k < 4; ++k) {
    EXPECT_EQ(bn.running_mean()(k), want_mean[k]) << k;
    EXPECT_EQ(bn.running_var()(k), want_var[k]) << k;
  }
  EXPECT_EQ(bn.num_batches_tracked(), 2);
}

TEST(PreciseBn, EmptyBatchesCountButAddNothing) {
  const auto batches = offset_batches();
  std::vector<Tn<double, 4>> with_empty = batches;
  with_empty.insert(with_empty.begin() + 1, Tn<double, 4>(0, 3, 7, 6));
  with_empty.push_back(Tn<double, 4>(4, 3, 0, 2));
  normkit::BatchNorm2d<double> a{3}, b{3};
  normkit::recompute_running_stats(a, batches);
  normkit::recompute_running_stats(b, with_empty);
  EXPECT_TRUE(normkit_test::same_bits(a.running_mean(), b.running_mean()));
  EXPECT_TRUE(normkit_test::same_bits(a.running_var(), b.running_var()));
  EXPECT_EQ(a.num_batches_tracked(), 4);
  EXPECT_EQ(b.num_batches_tracked(), 6);  // as six training forwards count them
}

TEST(PreciseBn, MergeAppendsAnotherAccumulatorsBatches) {
  const auto batches = offset_batches();
  normkit::BatchNorm2d<double> bn{3};
  using Acc = normkit::RunningStatsAccumulator<normkit::BatchNorm2d<double>>;
  Acc first(bn), second(bn);
  first.add(batches[0]);
  first.add(batches[1]);
  second.add(batches[2]);
  second.add(batches[3]);
  first.merge(second);
  EXPECT_EQ(first.batches(), 4);
  Pool pool(3);
  for (const auto& x : batches) pool.add(x);
  const Stats ref = pool.stats();
  expect_near(first.mean(), ref.mean, kRel, "merged mean");
  expect_near(first.var(), ref.var, kRel, "merged var");
  EXPECT_EQ(second.batches(), 2);  // unchanged

  // Merged with itself: every batch twice.
  first.merge(first);
  EXPECT_EQ(first.batches(), 8);
  for (const auto& x : batches) pool.add(x);
  const Stats twice = pool.stats();
  expect_near(first.mean(), twice.mean, kRel, "self-merged mean");
  expect_near(first.var(), twice.var, kRel, "self-merged var");

  first.reset();
  EXPECT_EQ(first.batches(), 0);
  EXPECT_EQ(first.count(), 0);
  EXPECT_THROW(first.mean(), value_error);
}

// ---------------------------------------------------------------------------------------
// (b) The same bits for any thread count.

template <class M, class X>
void expect_same_for_threads(const M& proto, const std::vector<X>& batches, const char* what) {
  SCOPED_TRACE(what);
  M one = proto;
  normkit::recompute_running_stats(one, batches);
  normkit::RunningStatsAccumulator<M> acc1(proto);
  for (const auto& x : batches) acc1.add(x);
  for (int threads : {2, 3}) {
    Eigen::ThreadPool tp(threads);
    Eigen::ThreadPoolDevice dev(&tp, threads);
    M m = proto;
    normkit::recompute_running_stats(m, batches, dev);
    EXPECT_TRUE(normkit_test::same_bits(m.running_mean(), one.running_mean()))
        << threads << " threads";
    EXPECT_TRUE(normkit_test::same_bits(m.running_var(), one.running_var()))
        << threads << " threads";
    normkit::RunningStatsAccumulator<M> acc(proto);
    for (const auto& x : batches) acc.add(x, dev);
    EXPECT_TRUE(normkit_test::same_bits(acc.mean(), acc1.mean())) << threads << " threads";
    EXPECT_TRUE(normkit_test::same_bits(acc.var(), acc1.var())) << threads << " threads";
  }
}

TEST(PreciseBnThreads, BitwiseIdenticalForOneTwoAndThreeThreads) {
  ASSERT_EQ(normkit::min_parallel_elements(), Idx{1} << 12);
  // NCHW: few channels of several blocks each (blocks side by side on the pool).
  std::vector<Tn<float, 4>> nchw;
  nchw.push_back(normal<float, 4>(51, 1e4, 1.0, {8, 4, 48, 48}));
  nchw.push_back(normal<float, 4>(52, 1e4 + 2.0, 2.0, {3, 4, 40, 56}));
  expect_same_for_threads(normkit::BatchNorm2d<float>(4), nchw, "BatchNorm2d NCHW");
  // Channels last: column mode.
  std::vector<Tn<float, 4>> nhwc;
  nhwc.push_back(normal<float, 4>(53, 1e4, 1.0, {8, 48, 48, 4}, 3));
  nhwc.push_back(normal<float, 4>(54, -3.0, 1.0, {5, 24, 30, 4}, 3));
  expect_same_for_threads(
      normkit::BatchNorm2d<float>(normkit::BatchNormOptions(4).channels_last(true)), nhwc,
      "BatchNorm2d NHWC");
  // ColMajor (N, C) double: long runs along N.
  std::vector<Tn<double, 2, Eigen::ColMajor>> cm;
  cm.push_back(normal<double, 2, Eigen::ColMajor>(55, 5.0, 1.0, {40000, 3}));
  cm.push_back(normal<double, 2, Eigen::ColMajor>(56, 6.0, 1.0, {9000, 3}));
  expect_same_for_threads(normkit::BatchNorm1d<double>(3), cm, "BatchNorm1d ColMajor");
  // InstanceNorm: many slots (slot groups on the pool).
  expect_same_for_threads(
      normkit::InstanceNorm2d<float>(normkit::InstanceNormOptions(4).track_running_stats(true)),
      nchw, "InstanceNorm2d");
}

// ---------------------------------------------------------------------------------------
// (c) InstanceNorm: the average over every instance of its mean and unbiased variance.

TEST(PreciseBn, InstanceNormAveragesTheInstancesStatistics) {
  using IN = normkit::InstanceNorm1d<double>;
  IN in{normkit::InstanceNormOptions(2).track_running_stats(true)};
  in.set_num_batches_tracked(7);
  const auto a = normal<double, 3>(61, 1e4, 1.0, {3, 2, 10}, 1, 40.0);
  const auto b = normal<double, 3>(62, 1e4 + 9.0, 4.0, {5, 2, 7}, 1, 40.0);
  const auto u = normal<double, 2>(63, 1e4 - 6.0, 0.5, {2, 12}, 0, 40.0);  // unbatched (C, L)
  const Tn<double, 3> empty(0, 2, 10);
  Instances ref(2);
  ref.add(a, true);
  ref.add(b, true);
  ref.add(u, false);
  normkit::RunningStatsAccumulator<IN> acc(in);
  acc.add(a);
  acc.add(empty);
  acc.add(b);
  acc.add(u);
  EXPECT_EQ(acc.batches(), 4);
  EXPECT_EQ(acc.count(), 3 + 5 + 1);  // instances
  acc.write(in);
  const Stats want = ref.stats();
  expect_near(in.running_mean(), want.mean, kRel, "running_mean");
  expect_near(in.running_var(), want.var, kRel, "running_var");
  // num_batches_tracked is an InstanceNorm's own (never moved, as by forward).
  EXPECT_EQ(in.num_batches_tracked(), 7);
  // Not the pooled variance of all elements, which adds the spread between instances.
  const Stats pooled = ref.pooled.stats();
  for (Idx c = 0; c < 2; ++c)
    EXPECT_GT(pooled.var[static_cast<std::size_t>(c)], 2 * in.running_var()(c)) << c;

  // One batch: what a momentum-1 forward stores (within rounding: it sums the N instances
  // plainly, we compensate).
  IN fwd{normkit::InstanceNormOptions(2).track_running_stats(true).momentum(1.0)};
  fwd.forward(b);
  IN one{normkit::InstanceNormOptions(2).track_running_stats(true)};
  normkit::recompute_running_stats(one, std::vector<const Tn<double, 3>*>{&b});
  for (Idx c = 0; c < 2; ++c) {
    EXPECT_TRUE(Near(one.running_mean()(c), fwd.running_mean()(c), 1e-14, "mean", c));
    EXPECT_TRUE(Near(one.running_var()(c), fwd.running_var()(c), 1e-14, "var", c));
  }
}

TEST(PreciseBn, InstanceNormChannelsLastAndColMajor) {
  // The same logical (N, C, L) data stored NCL RowMajor, NCL ColMajor and NLC (channels last).
  const auto r = normal<double, 3>(71, 3.0, 2.0, {4, 3, 9}, 1, 10.0);
  Tn<double, 3, Eigen::ColMajor> col(4, 3, 9);
  Tn<double, 3> last(4, 9, 3);
  for (Idx n = 0; n < 4; ++n)
    for (Idx c = 0; c < 3; ++c)
      for (Idx l = 0; l < 9; ++l) {
        col(n, c, l) = r(n, c, l);
        last(n, l, c) = r(n, c, l);
      }
  Instances ref(3);
  ref.add(r, true);
  const Stats want = ref.stats();
  using IN = normkit::InstanceNorm1d<double>;
  IN a{normkit::InstanceNormOptions(3).track_running_stats(true)};
  IN b{normkit::InstanceNormOptions(3).track_running_stats(true)};
  IN c{normkit::InstanceNormOptions(3).track_running_stats(true).channels_last(true)};
  normkit::recompute_running_stats(a, std::vector<Tn<double, 3>>{r});
  normkit::recompute_running_stats(b, std::vector<Tn<double, 3, Eigen::ColMajor>>{col});
  normkit::recompute_running_stats(c, std::vector<Tn<double, 3>>{last});
  for (const IN* m : {&a, &b, &c}) {
    expect_near(m->running_mean(), want.mean, kRel, "running_mean");
    expect_near(m->running_var(), want.var, kRel, "running_var");
  }
}

// ---------------------------------------------------------------------------------------
// (d) Layouts and argument kinds.

TEST(PreciseBn, RowMajorColMajorAndChannelsLastAgree) {
  // Logical (N, C, H, W) batches stored four ways.
  std::vector<Tn<double, 4>> nchw;
  nchw.push_back(normal<double, 4>(81, 1e4, 1.0, {3, 5, 6, 7}));
  nchw.push_back(normal<double, 4>(82, 1e4 - 4.0, 2.0, {6, 5, 4, 3}));
  std::vector<Tn<double, 4, Eigen::ColMajor>> nchw_col;
  std::vector<Tn<double, 4>> nhwc;
  std::vector<Tn<double, 4, Eigen::ColMajor>> nhwc_col;
  for (const auto& x : nchw) {
    const Idx N = x.dimension(0), C = x.dimension(1), H = x.dimension(2), W = x.dimension(3);
    Tn<double, 4, Eigen::ColMajor> a(N, C, H, W), c(N, H, W, C);
    Tn<double, 4> b(N, H, W, C);
    for (Idx n = 0; n < N; ++n)
      for (Idx k = 0; k < C; ++k)
        for (Idx h = 0; h < H; ++h)
          for (Idx w = 0; w < W; ++w) {
            a(n, k, h, w) = x(n, k, h, w);
            b(n, h, w, k) = x(n, k, h, w);
            c(n, h, w, k) = x(n, k, h, w);
          }
    nchw_col.push_back(a);
    nhwc.push_back(b);
    nhwc_col.push_back(c);
  }
  Pool pool(5);
  for (const auto& x : nchw) pool.add(x);
  const Stats ref = pool.stats();
  // The reference read straight from the channels-last copies is the same population.
  Pool pool_last(5);
  for (const auto& x : nhwc) pool_last.add(x, true);
  const Stats ref_last = pool_last.stats();
  for (Idx c = 0; c < 5; ++c)
    EXPECT_TRUE(Near(ref_last.var[static_cast<std::size_t>(c)],
                     ref.var[static_cast<std::size_t>(c)], 1e-13, "reference", c));

  using BN = normkit::BatchNorm2d<double>;
  const auto last = normkit::BatchNormOptions(5).channels_last(true);
  BN a{5}, b{5}, c{last}, d{last};
  normkit::recompute_running_stats(a, nchw);
  normkit::recompute_running_stats(b, nchw_col);
  normkit::recompute_running_stats(c, nhwc);
  normkit::recompute_running_stats(d, nhwc_col);
  for (const BN* m : {&a, &b, &c, &d}) {
    expect_near(m->running_mean(), ref.mean, kRel, "running_mean");
    expect_near(m->running_var(), ref.var, kRel, "running_var");
    EXPECT_EQ(m->num_batches_tracked(), 2);
  }
  // The layout is the module's option: NCHW data of 5 channels reads as 6 channels last.
  BN e{last};
  const std::vector<Tn<double, 4>> nchw6{normal<double, 4>(84, 0.0, 1.0, {2, 5, 4, 6})};
  EXPECT_THROW(normkit::recompute_running_stats(e, nchw6), shape_error);
}

/// An input iterator over TensorMaps of a vector's tensors, made on the fly (prvalues).
template <class T>
struct MapIterator {
  using iterator_category = std::input_iterator_tag;
  using value_type = Eigen::TensorMap<const T>;
  using difference_type = std::ptrdiff_t;
  using pointer = void;
  using reference = value_type;
  const T* p;
  reference operator*() const { return value_type(p->data(), p->dimensions()); }
  MapIterator& operator++() {
    ++p;
    return *this;
  }
  bool operator==(const MapIterator& o) const { return p == o.p; }
  bool operator!=(const MapIterator& o) const { return p != o.p; }
};

TEST(PreciseBn, EveryKindOfBatchArgumentGivesTheSameBits) {
  const auto batches = offset_batches();
  using BN = normkit::BatchNorm2d<double>;
  using Map = Eigen::TensorMap<const Tn<double, 4>>;
  BN ref{3};
  normkit::recompute_running_stats(ref, batches.begin(), batches.end());
  std::vector<Map> maps;
  std::vector<const Tn<double, 4>*> ptrs;
  std::vector<std::reference_wrapper<const Tn<double, 4>>> refs;
  for (const auto& x : batches) {
    maps.emplace_back(x.data(), x.dimensions());
    ptrs.push_back(&x);
    refs.push_back(std::cref(x));
  }
  auto check = [&](const BN& m, const char* what) {
    EXPECT_TRUE(normkit_test::same_bits(m.running_mean(), ref.running_mean())) << what;
    EXPECT_TRUE(normkit_test::same_bits(m.running_var(), ref.running_var())) << what;
    EXPECT_EQ(m.num_batches_tracked(), 4) << what;
  };
  BN a{3}, b{3}, c{3}, d{3}, e{3}, f{3};
  normkit::recompute_running_stats(a, batches);
  check(a, "vector of tensors");
  normkit::recompute_running_stats(b, maps);
  check(b, "vector of TensorMaps");
  normkit::recompute_running_stats(c, ptrs);
  check(c, "vector of pointers");
  normkit::recompute_running_stats(d, refs);
  check(d, "vector of reference_wrappers");
  const MapIterator<Tn<double, 4>> first{batches.data()}, last{batches.data() + batches.size()};
  normkit::recompute_running_stats(e, first, last);
  check(e, "input iterators yielding TensorMaps");
  const Tn<double, 4> arr[2] = {batches[0], batches[1]};
  normkit::recompute_running_stats(f, arr, arr + 2);
  BN g{3};
  normkit::recompute_running_stats(g, arr);
  EXPECT_TRUE(normkit_test::same_bits(f.running_var(), g.running_var()));
  EXPECT_EQ(f.num_batches_tracked(), 2);
  Pool pool(3);
  pool.add(arr[0]);
  pool.add(arr[1]);
  expect_near(f.running_var(), pool.stats().var, kRel, "array");
}

TEST(PreciseBn, Bfloat16Batches) {
  // Mixed (a float module given bfloat16 batches) and all-low (a bfloat16 module): the
  // statistics of the exact bfloat16 values, rounded once to the module's type.
  std::vector<Tn<Eigen::bfloat16, 4>> batches;
  batches.emplace_back(normal<double, 4>(91, 300.0, 4.0, {4, 3, 6, 6}).cast<Eigen::bfloat16>());
  batches.emplace_back(normal<double, 4>(92, 310.0, 2.0, {2, 3, 5, 5}).cast<Eigen::bfloat16>());
  Pool pool(3);
  for (const auto& x : batches) pool.add(x);
  const Stats ref = pool.stats();
  normkit::BatchNorm2d<float> mixed{3};
  normkit::RunningStatsAccumulator<normkit::BatchNorm2d<float>> acc(mixed);
  for (const auto& x : batches) acc.add(x);
  expect_near(acc.mean(), ref.mean, kRel, "acc.mean()");
  expect_near(acc.var(), ref.var, kRel, "acc.var()");
  acc.write(mixed);
  expect_near(mixed.running_var(), ref.var, kRelFloat, "mixed running_var");

  normkit::BatchNorm2d<Eigen::bfloat16> low{3};
  normkit::recompute_running_stats(low, batches);
  for (Idx c = 0; c < 3; ++c) {
    const Eigen::bfloat16 m = normkit::detail::round_to<Eigen::bfloat16>(acc.mean()(c));
    const Eigen::bfloat16 v = normkit::detail::round_to<Eigen::bfloat16>(acc.var()(c));
    EXPECT_EQ(normkit::detail::float16_bits(low.running_mean()(c)),
              normkit::detail::float16_bits(m));
    EXPECT_EQ(normkit::detail::float16_bits(low.running_var()(c)),
              normkit::detail::float16_bits(v));
    EXPECT_TRUE(Near(static_cast<double>(low.running_var()(c)),
                     ref.var[static_cast<std::size_t>(c)], 0x1p-8, "bfloat16 running_var", c));
  }
}

// ---------------------------------------------------------------------------------------
// (e) Errors: type, tag, message; the module (and the accumulator) left bit-identical.

/// Success iff f throws exactly E, the message starts with `tag` and contains every needle.
template <class E, class F>
::testing::AssertionResult Throws(F&& f,
                                  const std::string& tag,
                                  std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    if (typeid(e) != typeid(E))
      return ::testing::AssertionFailure() << "threw " << typeid(e).name() << ": " << msg;
    if (!dynamic_cast<const std::invalid_argument*>(&e))
      return ::testing::AssertionFailure() << "not a std::invalid_argument: " << msg;
    if (msg.rfind(tag, 0) != 0)
      return ::testing::AssertionFailure() << "tag \"" << tag << "\" missing: " << msg;
    for (const std::string& n : needles) {
      if (msg.find(n) == std::string::npos)
        return ::testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << n << "\"";
    }
    return ::testing::AssertionSuccess() << msg;
  }
  return ::testing::AssertionFailure() << "no exception";
}

/// A BatchNorm2d<double> in training mode with non-default parameters, running statistics and
/// counter, after a forward that kept its input and statistics.
normkit::BatchNorm2d<double> busy_bn(Idx C, bool track = true) {
  normkit::BatchNorm2d<double> bn{normkit::BatchNormOptions(C).track_running_stats(track)};
  Eigen::Tensor<double, 1> v(C);
  for (Idx i = 0; i < C; ++i) v(i) = 0.5 + 0.25 * static_cast<double>(i);
  bn.set_weight(v);
  bn.set_bias(v);
  if (track) {
    bn.set_running_mean(v);
    bn.set_running_var(v);
    bn.set_num_batches_tracked(11);
  }
  bn.forward(normal<double, 4>(101, 1.0, 1.0, {2, C, 3, 3}));
  return bn;
}

TEST(PreciseBnErrors, WrongChannelCount) {
  auto bn = busy_bn(3);
  const auto before = snapshot(bn);
  std::vector<Tn<double, 4>> batches = offset_batches();
  batches.insert(batches.begin() + 2, normal<double, 4>(102, 0.0, 1.0, {2, 4, 3, 3}));
  EXPECT_TRUE(Throws<shape_error>(
      [&] { normkit::recompute_running_stats(bn, batches); },
      "[normkit.BatchNorm2d] recompute_running_stats: ",
      {"batch 2", "expected input with 3 channels", "got input of size [2, 4, 3, 3]"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));

  // An input iterator is not checked ahead: batches 0 and 1 are reduced before batch 2
  // throws, and still nothing is written.
  const MapIterator<Tn<double, 4>> first{batches.data()}, last{batches.data() + batches.size()};
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::recompute_running_stats(bn, first, last); },
                                  "[normkit.BatchNorm2d] recompute_running_stats: ", {"batch 2"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));

  // The accumulator: add() throws and the batches so far stay.
  normkit::RunningStatsAccumulator<normkit::BatchNorm2d<double>> acc(bn);
  acc.add(batches[0]);
  const auto m0 = acc.mean();
  const auto v0 = acc.var();
  EXPECT_TRUE(Throws<shape_error>([&] { acc.add(batches[2]); },
                                  "[normkit.BatchNorm2d] RunningStatsAccumulator: ",
                                  {"batch 1", "expected input with 3 channels"}));
  EXPECT_EQ(acc.batches(), 1);
  EXPECT_EQ(acc.count(), 5 * 42);
  EXPECT_TRUE(normkit_test::same_bits(acc.mean(), m0));
  EXPECT_TRUE(normkit_test::same_bits(acc.var(), v0));

  // write() into a module of another width; merge() of another width.
  auto bn4 = busy_bn(4);
  const auto before4 = snapshot(bn4);
  normkit::BatchNorm2d<double>& target = bn4;
  EXPECT_TRUE(Throws<shape_error>([&] { acc.write(target); },
                                  "[normkit.BatchNorm2d] RunningStatsAccumulator: ",
                                  {"statistics of 3 channels", "num_features 4"}));
  EXPECT_TRUE(same_state(before4, snapshot(bn4)));
  normkit::RunningStatsAccumulator<normkit::BatchNorm2d<double>> acc4(bn4);
  EXPECT_TRUE(Throws<shape_error>(
      [&] { acc.merge(acc4); },
      "[normkit.BatchNorm2d] RunningStatsAccumulator: ", {"4 channels", "accumulator of 3"}));
  EXPECT_EQ(acc.batches(), 1);
  EXPECT_TRUE(normkit_test::same_bits(acc.var(), v0));
}

TEST(PreciseBnErrors, ModuleWithoutRunningStatistics) {
  auto bn = busy_bn(3, false);
  const auto before = snapshot(bn);
  const auto batches = offset_batches();
  EXPECT_TRUE(Throws<value_error>(
      [&] { normkit::recompute_running_stats(bn, batches); },
      "[normkit.BatchNorm2d] recompute_running_stats: ", {"track_running_stats is false"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));
  using Acc = normkit::RunningStatsAccumulator<normkit::BatchNorm2d<double>>;
  EXPECT_TRUE(Throws<value_error>(
      [&] { Acc acc(bn); },
      "[normkit.BatchNorm2d] RunningStatsAccumulator: ", {"track_running_stats is false"}));
  // write() into one, from an accumulator made for a module that has them.
  auto tracked = busy_bn(3);
  Acc acc(tracked);
  acc.add(batches[0]);
  EXPECT_TRUE(Throws<value_error>(
      [&] { acc.write(bn); },
      "[normkit.BatchNorm2d] RunningStatsAccumulator: ", {"track_running_stats is false"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));

  // InstanceNorm by default has none.
  normkit::InstanceNorm2d<double> in{3};
  const auto before_in = snapshot(in);
  EXPECT_TRUE(Throws<value_error>(
      [&] { normkit::recompute_running_stats(in, batches); },
      "[normkit.InstanceNorm2d] recompute_running_stats: ", {"track_running_stats is false"}));
  EXPECT_TRUE(same_state(before_in, snapshot(in)));
}

TEST(PreciseBnErrors, NoBatchesOrTooFewValues) {
  auto bn = busy_bn(3);
  const auto before = snapshot(bn);
  const std::vector<Tn<double, 4>> none;
  EXPECT_TRUE(
      Throws<value_error>([&] { normkit::recompute_running_stats(bn, none); },
                          "[normkit.BatchNorm2d] recompute_running_stats: ", {"no batches"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));
  normkit::RunningStatsAccumulator<normkit::BatchNorm2d<double>> acc(bn);
  EXPECT_TRUE(Throws<value_error>(
      [&] { acc.write(bn); }, "[normkit.BatchNorm2d] RunningStatsAccumulator: ", {"no batches"}));
  EXPECT_TRUE(Throws<value_error>(
      [&] { acc.var(); }, "[normkit.BatchNorm2d] RunningStatsAccumulator: ", {"no batches"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));

  // One value per channel in all (and empty batches around it): no unbiased variance.
  const std::vector<Tn<double, 4>> one{Tn<double, 4>(0, 3, 2, 2),
                                       normal<double, 4>(103, 0.0, 1.0, {1, 3, 1, 1})};
  EXPECT_TRUE(Throws<value_error>([&] { normkit::recompute_running_stats(bn, one); },
                                  "[normkit.BatchNorm2d] recompute_running_stats: ",
                                  {"more than 1 value per channel", "got 1 in 2 batches"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));

  // InstanceNorm: one spatial element; only empty batches.
  using IN = normkit::InstanceNorm1d<double>;
  IN in{normkit::InstanceNormOptions(2).track_running_stats(true)};
  const auto before_in = snapshot(in);
  const std::vector<Tn<double, 3>> flat{normal<double, 3>(104, 0.0, 1.0, {3, 2, 4}),
                                        normal<double, 3>(105, 0.0, 1.0, {3, 2, 1})};
  EXPECT_TRUE(Throws<value_error>([&] { normkit::recompute_running_stats(in, flat); },
                                  "[normkit.InstanceNorm1d] recompute_running_stats: ",
                                  {"batch 1", "more than 1 spatial element", "[3, 2, 1]"}));
  EXPECT_TRUE(same_state(before_in, snapshot(in)));
  const std::vector<Tn<double, 3>> empty{Tn<double, 3>(0, 2, 4), Tn<double, 3>(0, 2, 5)};
  EXPECT_TRUE(Throws<value_error>(
      [&] { normkit::recompute_running_stats(in, empty); },
      "[normkit.InstanceNorm1d] recompute_running_stats: ", {"no instances in 2 batches"}));
  EXPECT_TRUE(same_state(before_in, snapshot(in)));
}

// ---------------------------------------------------------------------------------------
// (f) Only the running statistics (and BatchNorm's counter) change.

TEST(PreciseBn, ParametersModeAndKeptStateUntouched) {
  for (bool training : {true, false}) {
    SCOPED_TRACE(training ? "training" : "evaluation");
    auto bn = busy_bn(3);  // a training forward kept its input and statistics
    const auto dy = normal<double, 4>(111, 0.0, 1.0, {2, 3, 3, 3});
    const auto g_before = bn.backward(dy);
    if (!training)
      bn.eval();
    const auto weight = bn.weight(), bias = bn.bias();
    const auto before = snapshot(bn);
    normkit::recompute_running_stats(bn, offset_batches());
    // Everything but running_mean, running_var and num_batches_tracked is bit-identical.
    const auto after = snapshot(bn);
    ASSERT_EQ(before.parts.size(), after.parts.size());
    int changed = 0;
    for (std::size_t i = 0; i < before.parts.size(); ++i) {
      const std::string& name = before.parts[i].first;
      const bool same = before.parts[i].second.bytes == after.parts[i].second.bytes &&
                        before.parts[i].second.dims == after.parts[i].second.dims;
      if (name == "running_mean" || name == "running_var" || name == "num_batches_tracked") {
        EXPECT_FALSE(same) << name;
        ++changed;
      } else {
        EXPECT_TRUE(same) << name;
      }
    }
    EXPECT_EQ(changed, 3);
    EXPECT_TRUE(normkit_test::same_bits(bn.weight(), weight));
    EXPECT_TRUE(normkit_test::same_bits(bn.bias(), bias));
    EXPECT_EQ(bn.is_training(), training);
    if (training) {
      // The kept input and batch statistics are still there: the same gradients.
      const auto g = bn.backward(dy);
      EXPECT_TRUE(normkit_test::same_bits(g.input, g_before.input));
      EXPECT_TRUE(normkit_test::same_bits(g.weight, g_before.weight));
      EXPECT_TRUE(normkit_test::same_bits(g.bias, g_before.bias));
    }
  }
}

}  // namespace
