// normkit::fold_batch_norm (normkit/fold.hpp) against tests/fixtures/fold.txt, written by
// tools/fixtures/gen_fixtures.cpp from libtorch 1.13 (torch.nn.utils.fusion op for op):
// every case in float and double, RowMajor and ColMajor, and with mixed weight/BatchNorm
// scalar types. Per case: the folded weight and bias against PyTorch's; the layer (a
// reference Linear/convolution in double below) with the folded weights against
// bn.eval()(layer(x)); normkit's BatchNorm in evaluation mode on layer(x) against the same;
// the explicit-statistics overload and TensorMap arguments bit-identical to the module
// overload. Then every error: type, tag, message, and arguments left unchanged.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

#include "support/fixture.hpp"
#include "support/state.hpp"

namespace {

using Idx = Eigen::Index;
using normkit_test::FixtureCase;
using normkit_test::FixtureTensor;

const std::vector<FixtureCase>& fold_cases() {
  static const std::vector<FixtureCase> cases =
      normkit_test::load_fixtures(std::string(NORMKIT_FIXTURE_DIR) + "/fold.txt");
  return cases;
}

const FixtureCase& case_named(const std::string& name) {
  for (const auto& c : fold_cases()) {
    if (c.name == name)
      return c;
  }
  throw std::runtime_error("no fold case " + name);
}

// ---------------------------------------------------------------------------------------
// The worst errors seen, printed once at the end of the run.

struct Worst {
  explicit Worst(const char* w) : what(w) {}
  const char* what;
  double value = 0.0;
  std::string where;
  void see(double v, const std::string& w) {
    if (v > value || where.empty()) {
      value = std::max(v, value);
      where = w;
    }
  }
};
Worst worst_w_f32_tf{"weight vs fused_weight, float32 fixtures, T=float (rel. / FLT_EPSILON)"};
Worst worst_w_f32_td{"weight vs fused_weight, float32 fixtures, T=double (rel. / FLT_EPSILON)"};
Worst worst_b_f32_tf{"bias vs fused_bias, float32 fixtures, T=float (rel. largest term / FLT_EPS)"};
Worst worst_b_f32_td{
    "bias vs fused_bias, float32 fixtures, T=double (rel. largest term / FLT_EPS)"};
Worst worst_ulp_f32_tf{"weight/bias, float32 fixtures, T=float (ulps of the expected value/term)"};
Worst worst_ulp_f32_td{"weight/bias, float32 fixtures, T=double (ulps of the expected value/term)"};
Worst worst_w_f64{"folded weight vs fused_weight, float64 fixtures run in double (relative)"};
Worst worst_b_f64{"folded bias vs fused_bias, float64 fixtures run in double (rel. largest term)"};
Worst worst_wb_f64_as_f32{"weight/bias, float64 fixtures, T or BN float (rel. / FLT_EPSILON)"};
Worst worst_y_folded_f{"folded layer vs y, float involved (abs / max(1, max|y|))"};
Worst worst_y_folded_d{"folded layer vs y, double (abs / max(1, max|y|))"};
Worst worst_y_bn_f{"normkit BN(eval) on layer(x) vs y, float involved (abs / max(1, max|y|))"};
Worst worst_y_bn_d{"normkit BN(eval) on layer(x) vs y, double (abs / max(1, max|y|))"};

class WorstReport : public ::testing::Environment {
 public:
  void TearDown() override {
    for (const Worst* w :
         {&worst_w_f32_tf, &worst_w_f32_td, &worst_b_f32_tf, &worst_b_f32_td, &worst_ulp_f32_tf,
          &worst_ulp_f32_td, &worst_w_f64, &worst_b_f64, &worst_wb_f64_as_f32, &worst_y_folded_f,
          &worst_y_folded_d, &worst_y_bn_f, &worst_y_bn_d}) {
      if (!w->where.empty())
        std::printf("[fold worst] %-80s %.3g  (%s)\n", w->what, w->value, w->where.c_str());
    }
  }
};
::testing::Environment* const kWorstReport = ::testing::AddGlobalTestEnvironment(new WorstReport);

// ---------------------------------------------------------------------------------------
// Dense row-major double tensors and the reference layers.

struct Dense {
  std::vector<long> dims;
  std::vector<double> v;
  long numel() const {
    long n = 1;
    for (long d : dims) n *= d;
    return n;
  }
};

Dense dense(const FixtureTensor& t) {
  return Dense{t.dims, t.values};
}

/// What the fixture says about the layer.
struct Layer {
  bool linear = false;
  bool transposed = false;
  long groups = 1;
  std::array<long, 3> stride{1, 1, 1}, padding{0, 0, 0}, output_padding{0, 0, 0}, dilation{1, 1, 1};
};

Layer layer_of(const FixtureCase& c) {
  Layer l;
  if (c.module == "FuseLinearBN") {
    l.linear = true;
    return l;
  }
  l.transposed = c.opt_bool("transpose");
  l.groups = c.opt_int("groups");
  // Spatial options are right-aligned into 3 axes (Conv1d: (1, 1, L); Conv2d: (1, H, W)).
  auto fill = [&](const char* key, std::array<long, 3>& out) {
    const std::vector<long> v = c.opt_list(key);
    const std::size_t off = 3 - v.size();
    for (std::size_t i = 0; i < v.size(); ++i) out[off + i] = v[i];
  };
  fill("stride", l.stride);
  fill("padding", l.padding);
  fill("output_padding", l.output_padding);
  fill("dilation", l.dilation);
  return l;
}

/// dims (N, C, spatial...) as (N, C, 1.., spatial) with 3 spatial axes.
std::array<long, 5> as5(const std::vector<long>& d) {
  std::array<long, 5> r{1, 1, 1, 1, 1};
  r[0] = d[0];
  r[1] = d[1];
  const std::size_t off = 5 - d.size();
  for (std::size_t i = 2; i < d.size(); ++i) r[off + i] = d[i];
  return r;
}

long at5(const std::array<long, 5>& d, long a, long b, long c, long e, long f) {
  return (((a * d[1] + b) * d[2] + c) * d[3] + e) * d[4] + f;
}

/// y = layer(x) in double with weight w (PyTorch dims) and bias b (empty: none): direct
/// loops, Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d with stride, padding,
/// output_padding, dilation and groups.
Dense layer_forward(const Layer& l, const Dense& x, const Dense& w, const std::vector<double>& b) {
  Dense y;
  if (l.linear) {
    const long n = x.dims[0], in = x.dims[1], out = w.dims[0];
    y.dims = {n, out};
    y.v.assign(static_cast<std::size_t>(n * out), 0.0);
    for (long i = 0; i < n; ++i) {
      for (long o = 0; o < out; ++o) {
        double acc = b.empty() ? 0.0 : b[static_cast<std::size_t>(o)];
        for (long k = 0; k < in; ++k)
          acc +=
              x.v[static_cast<std::size_t>(i * in + k)] * w.v[static_cast<std::size_t>(o * in + k)];
        y.v[static_cast<std::size_t>(i * out + o)] = acc;
      }
    }
    return y;
  }
  const std::size_t sp = x.dims.size() - 2;
  const std::array<long, 5> xd = as5(x.dims), wd = as5(w.dims);
  const long G = l.groups;
  const long cin = xd[1];
  const long cout = l.transposed ? wd[1] * G : wd[0];
  const long cin_g = cin / G, cout_g = cout / G;
  std::array<long, 5> yd{xd[0], cout, 1, 1, 1};
  for (int a = 0; a < 3; ++a) {
    const auto u = static_cast<std::size_t>(a);
    const long k = wd[u + 2], in = xd[u + 2];
    const long span = l.dilation[u] * (k - 1);
    yd[u + 2] = l.transposed
                    ? (in - 1) * l.stride[u] - 2 * l.padding[u] + span + l.output_padding[u] + 1
                    : (in + 2 * l.padding[u] - span - 1) / l.stride[u] + 1;
  }
  y.dims = {yd[0], yd[1]};
  for (std::size_t a = 0; a < sp; ++a) y.dims.push_back(yd[5 - sp + a]);
  y.v.assign(static_cast<std::size_t>(y.numel()), 0.0);
  for (long n = 0; n < yd[0]; ++n) {
    for (long co = 0; co < cout; ++co) {
      for (long p = 0; p < yd[2] * yd[3] * yd[4]; ++p)
        y.v[static_cast<std::size_t>((n * cout + co) * yd[2] * yd[3] * yd[4] + p)] =
            b.empty() ? 0.0 : b[static_cast<std::size_t>(co)];
    }
  }
  // One loop nest for both: (input position i, kernel offset k) -> output position
  // o = i * stride - padding + k * dilation (transposed) or i = o * stride - padding +
  // k * dilation (direct).
  auto pos = [&](long base, long k, int a) {
    const auto u = static_cast<std::size_t>(a);
    return base * l.stride[u] - l.padding[u] + k * l.dilation[u];
  };
  for (long n = 0; n < xd[0]; ++n) {
    for (long g = 0; g < G; ++g) {
      for (long ci = 0; ci < cin_g; ++ci) {
        for (long co = 0; co < cout_g; ++co) {
          const long cin_abs = g * cin_g + ci, cout_abs = g * cout_g + co;
          for (long k0 = 0; k0 < wd[2]; ++k0) {
            for (long k1 = 0; k1 < wd[3]; ++k1) {
              for (long k2 = 0; k2 < wd[4]; ++k2) {
                const double wv =
                    l.transposed ? w.v[static_cast<std::size_t>(at5(wd, cin_abs, co, k0, k1, k2))]
                                 : w.v[static_cast<std::size_t>(at5(wd, cout_abs, ci, k0, k1, k2))];
                // Iterate over the "base" grid: output positions (direct) or input
                // positions (transposed); the other side is pos(base, k).
                const std::array<long, 5>& bd = l.transposed ? xd : yd;
                const std::array<long, 5>& od = l.transposed ? yd : xd;
                for (long b0 = 0; b0 < bd[2]; ++b0) {
                  const long p0 = pos(b0, k0, 0);
                  if (p0 < 0 || p0 >= od[2])
                    continue;
                  for (long b1 = 0; b1 < bd[3]; ++b1) {
                    const long p1 = pos(b1, k1, 1);
                    if (p1 < 0 || p1 >= od[3])
                      continue;
                    for (long b2 = 0; b2 < bd[4]; ++b2) {
                      const long p2 = pos(b2, k2, 2);
                      if (p2 < 0 || p2 >= od[4])
                        continue;
                      if (l.transposed) {
                        y.v[static_cast<std::size_t>(at5(yd, n, cout_abs, p0, p1, p2))] +=
                            x.v[static_cast<std::size_t>(at5(xd, n, cin_abs, b0, b1, b2))] * wv;
                      } else {
                        y.v[static_cast<std::size_t>(at5(yd, n, cout_abs, b0, b1, b2))] +=
                            x.v[static_cast<std::size_t>(at5(xd, n, cin_abs, p0, p1, p2))] * wv;
                      }
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
  }
  return y;
}

// ---------------------------------------------------------------------------------------
// Fixture values into Eigen tensors of any scalar type, rank and storage order.

/// Row-major multi-index of linear index i for dims d.
template <int R>
std::array<Idx, R> unravel(long i, const std::vector<long>& d) {
  std::array<Idx, R> ix{};
  for (int a = R - 1; a >= 0; --a) {
    const auto u = static_cast<std::size_t>(a);
    ix[u] = static_cast<Idx>(i % d[u]);
    i /= d[u];
  }
  return ix;
}

template <class T, int R, int L>
Eigen::Tensor<T, R, L> to_tensor(const Dense& t) {
  EXPECT_EQ(t.dims.size(), static_cast<std::size_t>(R));
  std::array<Idx, R> d{};
  for (int a = 0; a < R; ++a) d[static_cast<std::size_t>(a)] = t.dims[static_cast<std::size_t>(a)];
  Eigen::Tensor<T, R, L> out(d);
  for (long i = 0; i < t.numel(); ++i)
    out(unravel<R>(i, t.dims)) = static_cast<T>(t.v[static_cast<std::size_t>(i)]);
  return out;
}

/// A tensor's values in logical row-major order, as doubles.
template <class X>
Dense from_tensor(const X& x) {
  constexpr int R = X::NumDimensions;
  Dense t;
  for (std::size_t a = 0; a < static_cast<std::size_t>(R); ++a)
    t.dims.push_back(static_cast<long>(x.dimension(a)));
  t.v.resize(static_cast<std::size_t>(t.numel()));
  for (long i = 0; i < t.numel(); ++i)
    t.v[static_cast<std::size_t>(i)] = static_cast<double>(x(unravel<R>(i, t.dims)));
  return t;
}

template <class T>
Eigen::Tensor<T, 1> vec(const std::vector<double>& v) {
  Eigen::Tensor<T, 1> t(static_cast<Idx>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) t(static_cast<Idx>(i)) = static_cast<T>(v[i]);
  return t;
}

/// v rounded to T and back.
template <class T>
std::vector<double> rounded(const std::vector<double>& v) {
  std::vector<double> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = static_cast<double>(static_cast<T>(v[i]));
  return r;
}

std::vector<double> init_or_empty(const FixtureCase& c, const char* name) {
  return c.has_init(name) ? c.init_at(name).values : std::vector<double>();
}

/// Distance between adjacent floats at |v|.
double float_ulp(double v) {
  const float a = std::fabs(static_cast<float>(v));
  if (!std::isfinite(a))
    return std::numeric_limits<double>::infinity();
  return static_cast<double>(std::nextafter(a, std::numeric_limits<float>::infinity())) -
         static_cast<double>(a);
}

/// max |a - b| / max(1, max |b|).
double scaled_max_diff(const Dense& a, const Dense& b) {
  EXPECT_EQ(a.dims, b.dims);
  double m = 1.0, d = 0.0;
  for (double v : b.v) m = std::max(m, std::fabs(v));
  for (std::size_t i = 0; i < std::min(a.v.size(), b.v.size()); ++i)
    d = std::max(d, std::fabs(a.v[i] - b.v[i]));
  return d / m;
}

template <class A, class B>
bool bit_identical(const A& a, const B& b) {
  if (a.size() != b.size())
    return false;
  for (Idx i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a.data()[i], &b.data()[i], sizeof a.data()[i]) != 0)
      return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// One case: weight scalar T, BatchNorm scalar S, storage order L.

template <class T, class S, int L, int R>
void run_case_rank(const FixtureCase& c) {
  constexpr int Dim = R <= 3 ? 1 : R - 2;
  using BN = normkit::BatchNorm<S, Dim>;
  const Layer layer = layer_of(c);
  const bool f32_fixture = c.is_float32();
  const bool float_involved =
      f32_fixture || std::is_same<T, float>::value || std::is_same<S, float>::value;
  const std::string where = c.name + (std::is_same<T, float>::value ? " T=float" : " T=double") +
                            (std::is_same<S, float>::value ? " BN=float" : " BN=double") +
                            (L == Eigen::RowMajor ? " RowMajor" : " ColMajor");
  SCOPED_TRACE(where);

  // The layer and the BatchNorm, in T and S.
  const Dense w_fix = dense(c.init_at("weight"));
  const std::vector<double> b_fix = init_or_empty(c, "bias");
  const std::vector<double> gamma = init_or_empty(c, "bn_weight");
  const std::vector<double> beta = init_or_empty(c, "bn_bias");
  const std::vector<double> mean = c.init_at("bn_running_mean").values;
  const std::vector<double> var = c.init_at("bn_running_var").values;
  const double eps = c.opt_double("bn_eps");
  const bool affine = c.opt_bool("bn_affine");
  ASSERT_EQ(affine, !gamma.empty());
  const Eigen::Tensor<T, R, L> w = to_tensor<T, R, L>(w_fix);
  const Eigen::Tensor<T, 1> b = vec<T>(b_fix);
  const Idx C = static_cast<Idx>(c.opt_int("bn_num_features"));
  BN bn{normkit::BatchNormOptions(C).eps(eps).affine(affine)};
  if (affine) {
    bn.set_weight(vec<S>(gamma));
    bn.set_bias(vec<S>(beta));
  }
  bn.set_running_mean(vec<S>(mean));
  bn.set_running_var(vec<S>(var));
  bn.eval();
  const normkit_test::State bn_before = normkit_test::snapshot(bn);
  const normkit_test::State args_before = normkit_test::snapshot_tensors({"weight", "bias"}, w, b);
  const auto options = normkit::FoldOptions().transposed(layer.transposed);

  const auto f = normkit::fold_batch_norm(w, b, bn, options);
  static_assert(std::is_same<std::decay_t<decltype(f)>, normkit::FoldedWeights<T, R, L>>::value,
                "FoldedWeights<T, Rank, Layout>");
  EXPECT_TRUE(normkit_test::same_state(bn_before, normkit_test::snapshot(bn)));
  EXPECT_TRUE(normkit_test::same_state(args_before,
                                       normkit_test::snapshot_tensors({"weight", "bias"}, w, b)));
  for (std::size_t a = 0; a < static_cast<std::size_t>(R); ++a)
    ASSERT_EQ(f.weight.dimension(a), w.dimension(a));
  ASSERT_EQ(f.bias.size(), C);

  // 1. Against PyTorch's fused weight and bias. The bias tolerance is relative to its
  // largest term, |(b - mean) * s| or |beta|: PyTorch's float bias has an absolute error
  // of that size (cancellation when the two nearly cancel).
  const Dense fw = from_tensor(f.weight);
  const Dense want_w = dense(c.steps.at(0).at("fused_weight"));
  const std::vector<double> want_b = c.steps.at(0).at("fused_bias").values;
  ASSERT_EQ(fw.dims, want_w.dims);
  // The inputs as T holds them (a float64 fixture run in float is rounded first).
  const std::vector<double> bT = rounded<T>(b_fix), gT = rounded<S>(gamma), beT = rounded<S>(beta),
                            mT = rounded<S>(mean), vT = rounded<S>(var);
  std::vector<double> bias_scale(want_b.size());
  for (std::size_t k = 0; k < want_b.size(); ++k) {
    const double s = (gT.empty() ? 1.0 : gT[k]) / std::sqrt(vT[k] + eps);
    bias_scale[k] =
        std::max({std::fabs(want_b[k]), std::fabs(((bT.empty() ? 0.0 : bT[k]) - mT[k]) * s),
                  beT.empty() ? 0.0 : std::fabs(beT[k])});
  }
  double ew = 0.0, eb = 0.0;
  if (float_involved) {
    // Relative error in units of FLT_EPSILON (2^-23, a float ulp at 1.0): PyTorch's float
    // fold rounds 3 to 5 times, ours once (T = float) or not at all (T = double), so the
    // difference is PyTorch's own rounding. A float64 fixture run in float has its inputs
    // rounded to float first. Also recorded: the same in ulps of the expected value (up to
    // 2x larger just above a power of 2).
    const double feps = std::ldexp(1.0, -23);
    double ew_ulp = 0.0, eb_ulp = 0.0;
    for (std::size_t i = 0; i < fw.v.size(); ++i) {
      const double d = std::fabs(fw.v[i] - want_w.v[i]);
      ew = std::max(ew, d / (std::fabs(want_w.v[i]) * feps));
      ew_ulp = std::max(ew_ulp, d / float_ulp(want_w.v[i]));
    }
    for (std::size_t k = 0; k < want_b.size(); ++k) {
      const double d = std::fabs(static_cast<double>(f.bias(static_cast<Idx>(k))) - want_b[k]);
      eb = std::max(eb, d / (bias_scale[k] * feps));
      eb_ulp = std::max(eb_ulp, d / float_ulp(bias_scale[k]));
    }
    EXPECT_LE(ew, 2.0) << "folded weight, relative error / FLT_EPSILON";
    EXPECT_LE(eb, 2.0) << "folded bias, relative error (to the largest term) / FLT_EPSILON";
    if (f32_fixture) {
      const bool tf = std::is_same<T, float>::value;
      (tf ? worst_w_f32_tf : worst_w_f32_td).see(ew, where);
      (tf ? worst_b_f32_tf : worst_b_f32_td).see(eb, where);
      (tf ? worst_ulp_f32_tf : worst_ulp_f32_td).see(std::max(ew_ulp, eb_ulp), where);
    } else {
      worst_wb_f64_as_f32.see(std::max(ew, eb), where);
    }
  } else {
    for (std::size_t i = 0; i < fw.v.size(); ++i)
      ew = std::max(ew, std::fabs(fw.v[i] - want_w.v[i]) / std::fabs(want_w.v[i]));
    for (std::size_t k = 0; k < want_b.size(); ++k) {
      eb = std::max(eb, std::fabs(static_cast<double>(f.bias(static_cast<Idx>(k))) - want_b[k]) /
                            bias_scale[k]);
    }
    EXPECT_LE(ew, 1e-14) << "folded weight, relative";
    EXPECT_LE(eb, 1e-14) << "folded bias, relative to the largest term";
    worst_w_f64.see(ew, where);
    worst_b_f64.see(eb, where);
  }

  // 2. The layer with the folded weights equals bn.eval()(layer(x)) to float (double)
  // rounding: within 1e-6 (1e-14) * max(1, max|y|), 10x (10x) tighter than the generator's
  // own y-vs-y_fused criterion.
  const auto& step = c.steps.at(0);
  Dense x = dense(step.at("x"));
  x.v = rounded<T>(x.v);
  const Dense y = dense(step.at("y"));
  const double tol = float_involved ? 1e-6 : 1e-14;
  std::vector<double> fb(static_cast<std::size_t>(C));
  for (Idx k = 0; k < C; ++k) fb[static_cast<std::size_t>(k)] = static_cast<double>(f.bias(k));
  const Dense y_folded = layer_forward(layer, x, fw, fb);
  const double e_folded = scaled_max_diff(y_folded, y);
  EXPECT_LE(e_folded, tol) << "folded layer vs bn(layer(x))";
  EXPECT_LE(scaled_max_diff(y_folded, dense(step.at("y_fused"))), tol)
      << "folded layer vs PyTorch's folded layer";
  (float_involved ? worst_y_folded_f : worst_y_folded_d).see(e_folded, where);

  // 3. normkit's BatchNorm (evaluation mode, unfolded) on layer(x) equals it too.
  const Dense z = layer_forward(layer, x, from_tensor(w), b_fix.empty() ? b_fix : bT);
  const Eigen::Tensor<S, R, L> zt = to_tensor<S, R, L>(z);
  const Dense y_bn = from_tensor(bn.forward(zt));
  const double e_bn = scaled_max_diff(y_bn, y);
  EXPECT_LE(e_bn, tol) << "normkit BatchNorm(eval) on layer(x) vs bn(layer(x))";
  (float_involved ? worst_y_bn_f : worst_y_bn_d).see(e_bn, where);

  // 4. The explicit-statistics overload, TensorMap arguments and nullptr for absent
  // vectors give the same bits.
  const auto g = normkit::fold_batch_norm(w, b, bn.running_mean(), bn.running_var(), eps,
                                          bn.weight(), bn.bias(), options);
  EXPECT_TRUE(bit_identical(g.weight, f.weight));
  EXPECT_TRUE(bit_identical(g.bias, f.bias));
  Eigen::TensorMap<const Eigen::Tensor<T, R, L>> wmap(w.data(), w.dimensions());
  Eigen::TensorMap<const Eigen::Tensor<T, 1>> bmap(b.data(), b.size());
  Eigen::Tensor<T, R, L> wcopy = w;
  Eigen::TensorMap<Eigen::Tensor<T, R, L>> wmap_mut(wcopy.data(), wcopy.dimensions());
  const auto h = normkit::fold_batch_norm(wmap, bmap, bn, options);
  EXPECT_TRUE(bit_identical(h.weight, f.weight));
  EXPECT_TRUE(bit_identical(h.bias, f.bias));
  const auto h2 = normkit::fold_batch_norm(wmap_mut, b, bn, options);
  EXPECT_TRUE(bit_identical(h2.weight, f.weight));
  if (b_fix.empty()) {
    const auto n = normkit::fold_batch_norm(w, nullptr, bn, options);
    EXPECT_TRUE(bit_identical(n.bias, f.bias));
    EXPECT_TRUE(bit_identical(n.weight, f.weight));
  }
  if (!affine) {
    const auto n = normkit::fold_batch_norm(w, b, bn.running_mean(), bn.running_var(), eps, nullptr,
                                            nullptr, options);
    EXPECT_TRUE(bit_identical(n.bias, f.bias));
    EXPECT_TRUE(bit_identical(n.weight, f.weight));
  }
}

template <class T, class S, int L>
void run_case(const FixtureCase& c) {
  switch (c.init_at("weight").rank()) {
    case 2:
      return run_case_rank<T, S, L, 2>(c);
    case 3:
      return run_case_rank<T, S, L, 3>(c);
    case 4:
      return run_case_rank<T, S, L, 4>(c);
    case 5:
      return run_case_rank<T, S, L, 5>(c);
    default:
      FAIL() << c.where() << ": weight of rank " << c.init_at("weight").rank();
  }
}

std::vector<std::string> case_names() {
  std::vector<std::string> names;
  for (const auto& c : fold_cases()) names.push_back(c.name);
  return names;
}

class FoldFixture : public ::testing::TestWithParam<std::string> {
 protected:
  const FixtureCase& fixture() const { return case_named(GetParam()); }
};

TEST_P(FoldFixture, FloatRowMajor) {
  run_case<float, float, Eigen::RowMajor>(fixture());
}
TEST_P(FoldFixture, FloatColMajor) {
  run_case<float, float, Eigen::ColMajor>(fixture());
}
TEST_P(FoldFixture, DoubleRowMajor) {
  run_case<double, double, Eigen::RowMajor>(fixture());
}
TEST_P(FoldFixture, DoubleColMajor) {
  run_case<double, double, Eigen::ColMajor>(fixture());
}
// Mixed: a float layer with a double BatchNorm and the other way round.
TEST_P(FoldFixture, FloatWeightDoubleBatchNorm) {
  run_case<float, double, Eigen::RowMajor>(fixture());
  run_case<float, double, Eigen::ColMajor>(fixture());
}
TEST_P(FoldFixture, DoubleWeightFloatBatchNorm) {
  run_case<double, float, Eigen::RowMajor>(fixture());
  run_case<double, float, Eigen::ColMajor>(fixture());
}

INSTANTIATE_TEST_SUITE_P(Fold,
                         FoldFixture,
                         ::testing::ValuesIn(case_names()),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

TEST(FoldFixtures, CoverEveryLayerKind) {
  // The file's 36 cases: Linear, Conv1d/2d/3d (groups 1 and 2), ConvTranspose2d, with and
  // without layer bias and BN affine, float32 and float64.
  const auto& cases = fold_cases();
  EXPECT_EQ(cases.size(), 36u);
  std::vector<std::string> layers;
  for (const auto& c : cases) layers.push_back(c.opt_single("layer"));
  for (const char* k : {"Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d"})
    EXPECT_NE(std::find(layers.begin(), layers.end(), k), layers.end()) << k;
}

// ---------------------------------------------------------------------------------------
// Errors.

/// Success iff f throws exactly E with "[normkit.fold_batch_norm]" and every needle in
/// what().
template <class E, class F>
::testing::AssertionResult Throws(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    if (typeid(e) != typeid(E))
      return ::testing::AssertionFailure() << "threw " << typeid(e).name() << ": " << msg;
    if (!dynamic_cast<const std::invalid_argument*>(&e))
      return ::testing::AssertionFailure() << "not a std::invalid_argument: " << msg;
    if (msg.rfind("[normkit.fold_batch_norm] ", 0) != 0)
      return ::testing::AssertionFailure() << "tag missing: " << msg;
    for (const std::string& n : needles) {
      if (msg.find(n) == std::string::npos)
        return ::testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << n << "\"";
    }
    return ::testing::AssertionSuccess() << msg;
  }
  return ::testing::AssertionFailure() << "no exception";
}

using normkit::shape_error;
using normkit::value_error;
using normkit_test::same_state;
using normkit_test::snapshot;
using normkit_test::snapshot_tensors;

template <int R, int L = Eigen::RowMajor, class... D>
Eigen::Tensor<float, R, L> ramp_tensor(D... d) {
  Eigen::Tensor<float, R, L> t(static_cast<Idx>(d)...);
  for (Idx i = 0; i < t.size(); ++i) t.data()[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
  return t;
}

/// An evaluation-mode BatchNorm with non-default statistics and parameters.
template <class BN>
BN ready_bn(Idx C, bool affine = true, bool track = true) {
  BN bn{normkit::BatchNormOptions(C).affine(affine).track_running_stats(track)};
  using S = typename BN::Vector::Scalar;
  Eigen::Tensor<S, 1> v(C);
  for (Idx i = 0; i < C; ++i) v(i) = static_cast<S>(0.5 + 0.25 * static_cast<double>(i));
  if (affine) {
    bn.set_weight(v);
    bn.set_bias(v);
  }
  if (track) {
    bn.set_running_mean(v);
    bn.set_running_var(v);
  }
  bn.eval();
  return bn;
}

TEST(FoldErrors, OutputChannelsDifferFromNumFeatures) {
  auto bn = ready_bn<normkit::BatchNorm1d<float>>(4);
  const auto w = ramp_tensor<2>(5, 3);  // Linear(3 -> 5)
  const Eigen::Tensor<float, 1> b(5);
  auto snap = [&] { return snapshot(bn); };
  auto snap_args = [&] { return snapshot_tensors({"w", "b"}, w, b); };
  const auto before = snap(), before_args = snap_args();
  EXPECT_TRUE(Throws<shape_error>(
      [&] { normkit::fold_batch_norm(w, b, bn); },
      {"expected a weight with 4 output channels", "num_features of the BatchNorm1d",
       "axis 0 of (out, in)", "got size [5, 3]"}));
  EXPECT_TRUE(same_state(before, snap()));
  EXPECT_TRUE(same_state(before_args, snap_args()));

  // A convolution, ColMajor (the logical dims are the same).
  auto bn2 = ready_bn<normkit::BatchNorm2d<double>>(6);
  const auto wc = ramp_tensor<4, Eigen::ColMajor>(4, 2, 3, 3);
  EXPECT_TRUE(Throws<shape_error>(
      [&] { normkit::fold_batch_norm(wc, nullptr, bn2); },
      {"expected a weight with 6 output channels", "num_features of the BatchNorm2d",
       "(out, in/groups, k...)", "got size [4, 2, 3, 3]"}));
}

TEST(FoldErrors, BiasSize) {
  auto bn = ready_bn<normkit::BatchNorm2d<float>>(4);
  const auto w = ramp_tensor<4>(4, 2, 3, 3);
  Eigen::Tensor<float, 1> b(3);
  b.setConstant(1.5f);
  const auto before = snapshot(bn);
  const auto before_args = snapshot_tensors({"w", "b"}, w, b);
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::fold_batch_norm(w, b, bn); },
                                  {"expected bias of 4 elements (the output channels) or 0 (no "
                                   "bias) but got 3"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));
  EXPECT_TRUE(same_state(before_args, snapshot_tensors({"w", "b"}, w, b)));
}

TEST(FoldErrors, NoRunningStatistics) {
  auto bn = ready_bn<normkit::BatchNorm3d<float>>(4, true, false);
  const auto w = ramp_tensor<5>(4, 1, 2, 2, 2);
  const auto before = snapshot(bn);
  EXPECT_TRUE(Throws<value_error>([&] { normkit::fold_batch_norm(w, nullptr, bn); },
                                  {"expected a BatchNorm3d with running statistics",
                                   "track_running_stats false", "nothing to fold"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));
  // Training mode too: the missing statistics are reported first.
  bn.train();
  EXPECT_TRUE(Throws<value_error>([&] { normkit::fold_batch_norm(w, nullptr, bn); },
                                  {"track_running_stats false"}));
}

TEST(FoldErrors, TrainingMode) {
  // A new module is in training mode, as in PyTorch.
  normkit::BatchNorm1d<double> fresh{4};
  const auto w = ramp_tensor<3>(4, 2, 3);
  EXPECT_TRUE(Throws<value_error>([&] { normkit::fold_batch_norm(w, nullptr, fresh); },
                                  {"expected a BatchNorm1d in evaluation mode but got one in "
                                   "training mode",
                                   "Fusion only for eval!", "eval()"}));
  auto bn = ready_bn<normkit::BatchNorm1d<double>>(4);
  bn.train();
  const auto before = snapshot(bn);
  EXPECT_TRUE(
      Throws<value_error>([&] { normkit::fold_batch_norm(w, nullptr, bn); }, {"training mode"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));
  // The running statistics fold explicitly without a mode check.
  const auto f = normkit::fold_batch_norm(w, nullptr, bn.running_mean(), bn.running_var(),
                                          bn.options().eps(), bn.weight(), bn.bias());
  bn.eval();
  const auto g = normkit::fold_batch_norm(w, nullptr, bn);
  EXPECT_TRUE(bit_identical(f.weight, g.weight));
  EXPECT_TRUE(bit_identical(f.bias, g.bias));
}

TEST(FoldErrors, TransposedGroupedOrWrongAxis) {
  auto bn = ready_bn<normkit::BatchNorm2d<float>>(4);
  const auto opt = normkit::FoldOptions().transposed(true);
  // ConvTranspose2d(4 -> 4, groups 2): weight (4, 2, 3, 3).
  const auto w = ramp_tensor<4>(4, 2, 3, 3);
  const auto before = snapshot(bn);
  const auto before_w = snapshot_tensors({"w"}, w);
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::fold_batch_norm(w, nullptr, bn, opt); },
                                  {"expected a transposed convolution weight (in, out/groups, "
                                   "k...) with 4 output channels (num_features of the "
                                   "BatchNorm2d) on axis 1 but got size [4, 2, 3, 3]",
                                   "groups = 2", "only groups = 1"}));
  EXPECT_TRUE(same_state(before, snapshot(bn)));
  EXPECT_TRUE(same_state(before_w, snapshot_tensors({"w"}, w)));
  // Axis 1 holds more channels: no groups hint.
  const auto w8 = ramp_tensor<4>(2, 8, 3, 3);
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::fold_batch_norm(w8, nullptr, bn, opt); },
                                  {"on axis 1 but got size [2, 8, 3, 3]"}));
  // A correct transposed weight on axis 0 is still checked on axis 1 only.
  const auto w_ok = ramp_tensor<4>(5, 4, 3, 3);
  EXPECT_NO_THROW(normkit::fold_batch_norm(w_ok, nullptr, bn, opt));
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::fold_batch_norm(w_ok, nullptr, bn); },
                                  {"on axis 0", "got size [5, 4, 3, 3]"}));
}

TEST(FoldErrors, TransposedLinear) {
  auto bn = ready_bn<normkit::BatchNorm1d<float>>(4);
  const auto w = ramp_tensor<2>(3, 4);
  EXPECT_TRUE(Throws<value_error>(
      [&] { normkit::fold_batch_norm(w, nullptr, bn, normkit::FoldOptions().transposed(true)); },
      {"transposed(true) expects a transposed convolution weight",
       "rank-2 weight of size [3, 4]"}));
}

TEST(FoldErrors, ExplicitStatistics) {
  const auto w = ramp_tensor<3>(4, 2, 3);
  Eigen::Tensor<double, 1> m(4), v(4), v3(3), g(4), g5(5), e(0);
  m.setConstant(0.5);
  v.setConstant(2.0);
  v3.setConstant(2.0);
  g.setConstant(1.5);
  g5.setConstant(1.5);
  auto snap = [&] {
    return snapshot_tensors({"w", "m", "v", "v3", "g", "g5"}, w, m, v, v3, g, g5);
  };
  const auto before = snap();
  EXPECT_TRUE(
      Throws<shape_error>([&] { normkit::fold_batch_norm(w, nullptr, m, v3, 1e-5, g, g); },
                          {"expected running_var of 4 elements (running_mean's) but got 3"}));
  EXPECT_TRUE(
      Throws<shape_error>([&] { normkit::fold_batch_norm(w, nullptr, m, v, 1e-5, g5, g); },
                          {"expected bn_weight of 4 elements or 0 (not affine) but got 5"}));
  EXPECT_TRUE(Throws<shape_error>([&] { normkit::fold_batch_norm(w, nullptr, m, v, 1e-5, g, g5); },
                                  {"expected bn_bias of 4 elements or 0 (not affine) but got 5"}));
  EXPECT_TRUE(Throws<shape_error>(
      [&] { normkit::fold_batch_norm(w, g5, m, v, 1e-5, g, g); },
      {"expected bias of 4 elements (the output channels) or 0 (no bias) but got 5"}));
  EXPECT_TRUE(Throws<shape_error>(
      [&] { normkit::fold_batch_norm(w, nullptr, v3, v3, 1e-5, nullptr, nullptr); },
      {"expected a weight with 3 output channels (the size of running_mean) on axis 0",
       "got size [4, 2, 3]"}));
  EXPECT_TRUE(Throws<value_error>([&] { normkit::fold_batch_norm(w, nullptr, m, v, -1e-5, g, g); },
                                  {"expected eps finite and >= 0 but got -1e-05"}));
  EXPECT_TRUE(Throws<value_error>(
      [&] {
        normkit::fold_batch_norm(w, nullptr, m, v, std::numeric_limits<double>::quiet_NaN(), g, g);
      },
      {"expected eps finite and >= 0 but got nan"}));
  EXPECT_TRUE(same_state(before, snap()));
  // Empty tensors and nullptr are the same absent vector; gamma and beta independently.
  const auto a = normkit::fold_batch_norm(w, e, m, v, 1e-5, e, g);
  const auto c = normkit::fold_batch_norm(w, nullptr, m, v, 1e-5, nullptr, g);
  EXPECT_TRUE(bit_identical(a.weight, c.weight));
  EXPECT_TRUE(bit_identical(a.bias, c.bias));
  // gamma = 1: the weight is W / sqrt(2 + 1e-5); beta = 1.5: bias (0 - 0.5) * s + 1.5.
  const double s = 1.0 / std::sqrt(2.0 + 1e-5);
  EXPECT_EQ(a.weight(1, 1, 2), static_cast<float>(static_cast<double>(w(1, 1, 2)) * s));
  EXPECT_EQ(a.bias(3), static_cast<float>(-0.5 * s + 1.5));
}

TEST(Fold, EmptyChannelsAndVectorRef) {
  // C = 0: nothing to do, no error.
  normkit::BatchNorm2d<float> bn{0};
  bn.eval();
  const Eigen::Tensor<float, 4, Eigen::RowMajor> w(0, 3, 1, 1);
  const auto f = normkit::fold_batch_norm(w, nullptr, bn);
  EXPECT_EQ(f.weight.size(), 0);
  EXPECT_EQ(f.bias.size(), 0);
  // VectorRef (the free functions' vector type) works as a statistics argument.
  std::vector<float> m{0.5f, 1.0f}, v{2.0f, 3.0f};
  const auto w2 = ramp_tensor<2>(2, 3);
  const auto a = normkit::fold_batch_norm(w2, nullptr, normkit::VectorRef<const float>(m.data(), 2),
                                          normkit::VectorRef<float>(v.data(), 2), 1e-3,
                                          normkit::VectorRef<const float>(), nullptr);
  Eigen::TensorMap<Eigen::Tensor<float, 1>> mm(m.data(), 2), vm(v.data(), 2);
  const auto b = normkit::fold_batch_norm(w2, nullptr, mm, vm, 1e-3, nullptr, nullptr);
  EXPECT_TRUE(bit_identical(a.weight, b.weight));
  EXPECT_TRUE(bit_identical(a.bias, b.bias));
}

}  // namespace
