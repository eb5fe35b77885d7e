// state_dict / load_state_dict and safetensors I/O: PyTorch's keys and order, bit-exact round
// trips for every module type, errors that leave the module unchanged, and a file written by
// libtorch (tools/safetensors/write_fixture.cpp) reproduced by normkit::BatchNorm2d<float>.
// BF16 and F16 entries: raw bit patterns through files, exact widening into float and double
// modules, and one round-to-nearest-even step from the stored value into bfloat16 and half
// (detail::round_to, exhaustively at every tie, and load_state_dict into such modules).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/normkit.hpp>
#include <normkit/safetensors.hpp>
#include <normkit/state_dict.hpp>

#include "support/bits.hpp"

namespace {

std::vector<std::string> keys(const normkit::StateDict& sd) {
  std::vector<std::string> k;
  for (const auto& kv : sd) k.push_back(kv.first);
  return k;
}

// Fills v with distinct, non-round values (so that bit-exact comparisons mean something).
template <class S>
Eigen::Tensor<S, 1> ramp(Eigen::Index n, double start) {
  Eigen::Tensor<S, 1> v(n);
  for (Eigen::Index i = 0; i < n; ++i)
    v(i) = static_cast<S>(start + 0.1234567891 * static_cast<double>(i) / 3.0);
  return v;
}

// Every tensor of a state dict, byte for byte.
bool same_dict(const normkit::StateDict& a, const normkit::StateDict& b) {
  if (a.size() != b.size())
    return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].first != b[i].first || a[i].second.dtype != b[i].second.dtype ||
        a[i].second.shape != b[i].second.shape || a[i].second.bytes != b[i].second.bytes) {
      return false;
    }
  }
  return true;
}

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "normkit_" + name + ".safetensors";
}

// ---- 16-bit floats ----

using BF16 = Eigen::bfloat16;
using F16 = Eigen::half;

std::string hex16(std::uint16_t u) {
  char b[8];
  std::snprintf(b, sizeof b, "0x%04x", static_cast<unsigned>(u));
  return b;
}

template <class T>
std::uint16_t bits(T v) {
  return normkit::detail::float16_bits(v);
}

template <class T>
T from_bits(std::uint16_t u) {
  return normkit::detail::float16_from_bits<T>(u);
}

template <class T>
std::uint64_t bits64(T v) {
  std::uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

double from_bits64(std::uint64_t u) {
  double d = 0;
  std::memcpy(&d, &u, 8);
  return d;
}

// The bit pattern detail::round_to<T> gives for x.
template <class T>
std::string rounded(double x) {
  return hex16(bits(normkit::detail::round_to<T>(x)));
}

template <class T>
std::vector<T> from_patterns(const std::vector<std::uint16_t>& p) {
  std::vector<T> v;
  for (std::uint16_t u : p) v.push_back(from_bits<T>(u));
  return v;
}

template <class S>
Eigen::Tensor<S, 1> tensor_of(const std::vector<S>& v) {
  Eigen::Tensor<S, 1> t(static_cast<Eigen::Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) t(static_cast<Eigen::Index>(i)) = v[i];
  return t;
}

template <class S>
std::vector<std::uint16_t> patterns_of(const Eigen::Tensor<S, 1>& t) {
  std::vector<std::uint16_t> p;
  for (Eigen::Index i = 0; i < t.size(); ++i) p.push_back(bits(t(i)));
  return p;
}

// A module with BatchNorm's state dict interface (weight, bias, running_mean, running_var,
// num_batches_tracked) over any Scalar: what load_state_dict needs from a module, so that
// loading into Eigen::bfloat16 and Eigen::half parameters is tested without depending on the
// modules' forward for those types.
template <class S>
class MockNorm {
 public:
  using Vector = Eigen::Tensor<S, 1>;
  static constexpr const char* kName = "MockNorm";
  explicit MockNorm(Eigen::Index c)
      : options_(c), weight_(c), bias_(c), running_mean_(c), running_var_(c) {
    for (Vector* v : {&weight_, &bias_, &running_mean_, &running_var_})
      for (Eigen::Index i = 0; i < c; ++i) (*v)(i) = S(0.5f);
  }
  const normkit::BatchNormOptions& options() const { return options_; }
  const Vector& weight() const { return weight_; }
  const Vector& bias() const { return bias_; }
  const Vector& running_mean() const { return running_mean_; }
  const Vector& running_var() const { return running_var_; }
  std::int64_t num_batches_tracked() const { return nbt_; }
  void set_weight(const Vector& v) { weight_ = v; }
  void set_bias(const Vector& v) { bias_ = v; }
  void set_running_mean(const Vector& v) { running_mean_ = v; }
  void set_running_var(const Vector& v) { running_var_ = v; }
  void set_num_batches_tracked(std::int64_t n) { nbt_ = n; }

 private:
  normkit::BatchNormOptions options_;
  Vector weight_, bias_, running_mean_, running_var_;
  std::int64_t nbt_ = 0;
};

normkit::StateTensor raw16(const std::string& dtype,
                           const std::vector<std::uint16_t>& p,
                           std::vector<std::int64_t> shape) {
  normkit::StateTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes.resize(2 * p.size());
  for (std::size_t i = 0; i < p.size(); ++i) normkit::detail::store_le(p[i], &t.bytes[2 * i]);
  return t;
}

double p2(int e) {
  return std::ldexp(1.0, e);
}

// Sets non-default values everywhere, saves, loads into a fresh module through a file and
// checks that the state dicts agree byte for byte.
template <class M, class Make>
void round_trip(Make make, const std::string& tag) {
  using S = typename M::Vector::Scalar;
  M a = make();
  if (a.weight().size())
    a.set_weight(ramp<S>(a.weight().size(), 0.7));
  if constexpr (!normkit::detail::is_rms_norm<M>::value) {
    if (a.bias().size())
      a.set_bias(ramp<S>(a.bias().size(), -0.3));
  }
  if constexpr (!normkit::detail::stateless_v<M>) {
    if (a.running_mean().size())
      a.set_running_mean(ramp<S>(a.running_mean().size(), 1.1));
    if (a.running_var().size())
      a.set_running_var(ramp<S>(a.running_var().size(), 2.3));
    a.set_num_batches_tracked(1234567890123);
  }
  const normkit::StateDict sd = normkit::state_dict(a);
  const std::string path = temp_path(tag);
  normkit::write_safetensors(path, sd, {{"format", "pt"}});
  std::map<std::string, std::string> meta;
  const normkit::StateDict back = normkit::read_safetensors(path, &meta);
  std::remove(path.c_str());
  EXPECT_EQ(meta.at("format"), "pt") << tag;
  EXPECT_TRUE(same_dict(sd, back)) << tag;
  M b = make();
  normkit::load_state_dict(b, back);
  EXPECT_TRUE(same_dict(sd, normkit::state_dict(b))) << tag;
  EXPECT_TRUE(normkit_test::same_bits(a.weight(), b.weight())) << tag;
  if constexpr (!normkit::detail::is_rms_norm<M>::value) {
    EXPECT_TRUE(normkit_test::same_bits(a.bias(), b.bias())) << tag;
  }
}

TEST(StateDictTest, KeysFollowPyTorchOrder) {
  using V = std::vector<std::string>;
  normkit::BatchNorm2d<float> bn(3);
  EXPECT_EQ(keys(normkit::state_dict(bn)),
            (V{"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}));
  EXPECT_EQ(keys(normkit::state_dict(bn, "layer1.0.bn1.")),
            (V{"layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
               "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked"}));
  normkit::BatchNorm1d<double> bn_noaffine(normkit::BatchNormOptions(4).affine(false));
  EXPECT_EQ(keys(normkit::state_dict(bn_noaffine)),
            (V{"running_mean", "running_var", "num_batches_tracked"}));
  normkit::BatchNorm3d<float> bn_notrack(normkit::BatchNormOptions(4).track_running_stats(false));
  EXPECT_EQ(keys(normkit::state_dict(bn_notrack)), (V{"weight", "bias"}));
  normkit::InstanceNorm2d<float> in(normkit::InstanceNormOptions(3));
  EXPECT_TRUE(normkit::state_dict(in).empty());
  normkit::InstanceNorm1d<float> in_full(
      normkit::InstanceNormOptions(3).affine(true).track_running_stats(true));
  EXPECT_EQ(keys(normkit::state_dict(in_full)),
            (V{"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}));
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({2, 3}));
  EXPECT_EQ(keys(normkit::state_dict(ln)), (V{"weight", "bias"}));
  normkit::LayerNorm<float> ln_nobias(normkit::LayerNormOptions({5}).bias(false));
  EXPECT_EQ(keys(normkit::state_dict(ln_nobias)), (V{"weight"}));
  normkit::GroupNorm<double> gn(normkit::GroupNormOptions(2, 4));
  EXPECT_EQ(keys(normkit::state_dict(gn)), (V{"weight", "bias"}));
  normkit::RMSNorm<float> rms(normkit::RMSNormOptions({2, 8}));
  EXPECT_EQ(keys(normkit::state_dict(rms, "norm.")), (V{"norm.weight"}));
  EXPECT_EQ(normkit::state_dict(rms)[0].second.shape, (std::vector<std::int64_t>{2, 8}));
  normkit::RMSNorm<float> rms_plain(normkit::RMSNormOptions({8}).elementwise_affine(false));
  EXPECT_TRUE(normkit::state_dict(rms_plain).empty());
}

TEST(StateDictTest, DtypesAndShapesMatchPyTorch) {
  normkit::BatchNorm2d<double> bn(3);
  bn.set_num_batches_tracked(7);
  const normkit::StateDict sd = normkit::state_dict(bn);
  EXPECT_EQ(sd[0].second.dtype, "F64");
  EXPECT_EQ(sd[0].second.shape, (std::vector<std::int64_t>{3}));
  EXPECT_EQ(sd[4].second.dtype, "I64");
  EXPECT_TRUE(sd[4].second.shape.empty());  // torch.tensor(0, dtype=torch.long): 0-dim
  EXPECT_EQ(normkit::to_vector<std::int64_t>(sd[4].second), (std::vector<std::int64_t>{7}));
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({2, 3}));
  const normkit::StateDict lsd = normkit::state_dict(ln);
  EXPECT_EQ(lsd[0].second.dtype, "F32");
  EXPECT_EQ(lsd[0].second.shape, (std::vector<std::int64_t>{2, 3}));
}

TEST(StateDictTest, RoundTripIsBitExactForEveryModule) {
  round_trip<normkit::BatchNorm1d<float>>([] { return normkit::BatchNorm1d<float>(5); }, "bn1d");
  round_trip<normkit::BatchNorm2d<double>>([] { return normkit::BatchNorm2d<double>(3); }, "bn2d");
  round_trip<normkit::BatchNorm3d<float>>(
      [] { return normkit::BatchNorm3d<float>(normkit::BatchNormOptions(2).affine(false)); },
      "bn3d");
  round_trip<normkit::InstanceNorm1d<float>>(
      [] {
        return normkit::InstanceNorm1d<float>(
            normkit::InstanceNormOptions(3).affine(true).track_running_stats(true));
      },
      "in1d");
  round_trip<normkit::InstanceNorm2d<double>>(
      [] { return normkit::InstanceNorm2d<double>(normkit::InstanceNormOptions(3).affine(true)); },
      "in2d");
  round_trip<normkit::InstanceNorm3d<float>>([] { return normkit::InstanceNorm3d<float>(4); },
                                             "in3d");
  round_trip<normkit::LayerNorm<float>>(
      [] {
        return normkit::LayerNorm<float>(normkit::LayerNormOptions({2, 3}));
      },
      "ln");
  round_trip<normkit::LayerNorm<double>>(
      [] { return normkit::LayerNorm<double>(normkit::LayerNormOptions({7}).bias(false)); },
      "ln_nobias");
  round_trip<normkit::GroupNorm<float>>(
      [] { return normkit::GroupNorm<float>(normkit::GroupNormOptions(2, 6)); }, "gn");
  round_trip<normkit::RMSNorm<double>>(
      [] {
        return normkit::RMSNorm<double>(normkit::RMSNormOptions({3, 4}));
      },
      "rms");
}

TEST(StateDictTest, RMSNormRejectsABias) {
  normkit::RMSNorm<float> rms(normkit::RMSNormOptions({4}));
  normkit::StateDict sd{{"weight", normkit::make_state_tensor(std::vector<float>{1, 2, 3, 4}, {4})},
                        {"bias", normkit::make_state_tensor(std::vector<float>{0, 0, 0, 0}, {4})}};
  EXPECT_THROW(normkit::load_state_dict(rms, sd), normkit::shape_error);
  EXPECT_EQ(rms.weight()(3), 1.0f);  // unchanged
  sd.pop_back();
  normkit::load_state_dict(rms, sd);
  EXPECT_EQ(rms.weight()(3), 4.0f);
}

TEST(StateDictTest, LayerNormAcceptsFlatWeight) {
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({2, 3}));
  normkit::StateDict sd{
      {"weight", normkit::make_state_tensor(std::vector<float>{1, 2, 3, 4, 5, 6}, {6})},
      {"bias", normkit::make_state_tensor(std::vector<float>{0, 0, 0, 0, 0, 1}, {6})}};
  normkit::load_state_dict(ln, sd);
  EXPECT_EQ(ln.weight()(5), 6.0f);
  EXPECT_EQ(ln.bias()(5), 1.0f);
}

TEST(StateDictTest, LoadsByPrefixAndIgnoresOtherPrefixes) {
  normkit::BatchNorm2d<float> src(3);
  src.set_weight(ramp<float>(3, 0.5));
  src.set_num_batches_tracked(11);
  normkit::StateDict sd = normkit::state_dict(src, "layer1.0.bn1.");
  const normkit::StateDict other =
      normkit::state_dict(normkit::BatchNorm2d<float>(8), "layer1.0.bn2.");
  sd.insert(sd.end(), other.begin(), other.end());
  normkit::BatchNorm2d<float> dst(3);
  normkit::load_state_dict(dst, sd, "layer1.0.bn1.");
  EXPECT_TRUE(normkit_test::same_bits(dst.weight(), src.weight()));
  EXPECT_EQ(dst.num_batches_tracked(), 11);
}

TEST(StateDictTest, ConvertsDtypeAsTorchCopy) {
  normkit::BatchNorm1d<double> bn(2);
  normkit::StateDict sd = normkit::state_dict(normkit::BatchNorm1d<float>(2));
  sd[0].second = normkit::make_state_tensor(std::vector<float>{0.1f, 0.2f}, {2});
  normkit::load_state_dict(bn, sd);
  EXPECT_EQ(bn.weight()(0), static_cast<double>(0.1f));
}

TEST(StateDictTest, MissingAndUnexpectedKeysThrowAndLeaveModuleUnchanged) {
  normkit::BatchNorm2d<float> bn(3);
  bn.set_weight(ramp<float>(3, 0.25));
  const normkit::StateDict before = normkit::state_dict(bn);
  normkit::StateDict sd = normkit::state_dict(normkit::BatchNorm2d<float>(3));
  sd[0].second = normkit::make_state_tensor(std::vector<float>{9, 9, 9}, {3});
  sd.erase(sd.begin() + 1);  // no bias
  sd.emplace_back("gamma", normkit::make_state_tensor(std::vector<float>{1}, {1}));
  try {
    normkit::load_state_dict(bn, sd);
    FAIL() << "expected shape_error";
  } catch (const normkit::shape_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("missing key(s): \"bias\""), std::string::npos) << msg;
    EXPECT_NE(msg.find("unexpected key(s): \"gamma\""), std::string::npos) << msg;
  }
  EXPECT_TRUE(same_dict(before, normkit::state_dict(bn)));
}

TEST(StateDictTest, MissingNumBatchesTrackedKeepsValueAsTorch) {
  normkit::BatchNorm2d<float> bn(3);
  bn.set_num_batches_tracked(5);
  normkit::StateDict sd = normkit::state_dict(normkit::BatchNorm2d<float>(3));
  sd.pop_back();
  normkit::load_state_dict(bn, sd);
  EXPECT_EQ(bn.num_batches_tracked(), 5);
}

TEST(StateDictTest, ShapeAndDtypeErrorsLeaveModuleUnchanged) {
  normkit::GroupNorm<float> gn(normkit::GroupNormOptions(2, 4));
  gn.set_bias(ramp<float>(4, 0.5));
  const normkit::StateDict before = normkit::state_dict(gn);
  // A good bias comes first in the dict, then a bad weight: nothing may be applied.
  normkit::StateDict sd{{"bias", normkit::make_state_tensor(std::vector<float>{1, 2, 3, 4}, {4})},
                        {"weight", normkit::make_state_tensor(std::vector<float>{1, 2, 3}, {3})}};
  EXPECT_THROW(normkit::load_state_dict(gn, sd), normkit::shape_error);
  EXPECT_TRUE(same_dict(before, normkit::state_dict(gn)));
  sd[1].second = normkit::make_state_tensor(std::vector<std::int64_t>{1, 2, 3, 4}, {4});
  EXPECT_THROW(normkit::load_state_dict(gn, sd), normkit::value_error);
  sd[1].second = normkit::make_state_tensor(std::vector<float>{1, 2, 3, 4}, {4});
  sd[1].second.bytes.pop_back();
  EXPECT_THROW(normkit::load_state_dict(gn, sd), normkit::value_error);
  EXPECT_TRUE(same_dict(before, normkit::state_dict(gn)));
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({2, 3}));
  normkit::StateDict lsd = normkit::state_dict(ln);
  lsd[0].second.shape = {3, 2};
  EXPECT_THROW(normkit::load_state_dict(ln, lsd), normkit::shape_error);
}

TEST(SafetensorsTest, HeaderIsAlignedAndFollowsTheFormat) {
  const normkit::StateDict sd = normkit::state_dict(normkit::BatchNorm1d<float>(3), "bn.");
  const std::vector<unsigned char> file = normkit::serialize_safetensors(sd);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file[static_cast<std::size_t>(i)];
  EXPECT_EQ(n % 8, 0u);
  const std::string header(file.begin() + 8, file.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  EXPECT_NE(header.find("\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}"),
            std::string::npos)
      << header;
  EXPECT_NE(
      header.find(
          "\"bn.num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[48,56]}"),
      std::string::npos)
      << header;
  EXPECT_EQ(file.size(), 8 + n + 56);
}

TEST(SafetensorsTest, MalformedFilesThrow) {
  const normkit::StateDict sd = normkit::state_dict(normkit::BatchNorm1d<float>(3));
  const std::vector<unsigned char> good = normkit::serialize_safetensors(sd);
  EXPECT_THROW(
      normkit::parse_safetensors(std::vector<unsigned char>(good.begin(), good.begin() + 5)),
      normkit::value_error);
  std::vector<unsigned char> truncated(good.begin(), good.end() - 1);
  EXPECT_THROW(normkit::parse_safetensors(truncated), normkit::value_error);
  std::vector<unsigned char> trailing = good;
  trailing.push_back(0);
  EXPECT_THROW(normkit::parse_safetensors(trailing), normkit::value_error);
  std::vector<unsigned char> huge = good;
  huge[6] = 0x7f;  // header length far past the end
  EXPECT_THROW(normkit::parse_safetensors(huge), normkit::value_error);
  std::vector<unsigned char> badjson = good;
  badjson[8] = '[';
  EXPECT_THROW(normkit::parse_safetensors(badjson), normkit::value_error);
  EXPECT_THROW(normkit::read_safetensors("/nonexistent/normkit.safetensors"), normkit::value_error);
}

// tests/fixtures/bn2d_state.safetensors: written by libtorch 1.13 through an independent writer
// (tools/safetensors/write_fixture.cpp): torch::nn::BatchNorm2d(3) after 3 training steps,
// keys bn.*, plus "input" and "output" = bn.eval()(input).
TEST(SafetensorsTest, ReproducesLibtorchBatchNorm2dEvalOutput) {
  std::map<std::string, std::string> meta;
  const normkit::StateDict file = normkit::read_safetensors(
      std::string(NORMKIT_FIXTURE_DIR) + "/bn2d_state.safetensors", &meta);
  EXPECT_EQ(meta.at("format"), "pt");
  normkit::BatchNorm2d<float> bn(3);
  normkit::load_state_dict(bn, file, "bn.");
  EXPECT_EQ(bn.num_batches_tracked(), 3);
  bn.eval();
  const normkit::StateTensor* in = normkit::find_state(file, "input");
  const normkit::StateTensor* out = normkit::find_state(file, "output");
  ASSERT_TRUE(in && out);
  ASSERT_EQ(in->shape, (std::vector<std::int64_t>{2, 3, 4, 5}));
  std::vector<float> xv = normkit::to_vector<float>(*in);
  const std::vector<float> want = normkit::to_vector<float>(*out);
  Eigen::TensorMap<const Eigen::Tensor<float, 4, Eigen::RowMajor>> x(xv.data(), 2, 3, 4, 5);
  const Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);
  ASSERT_EQ(static_cast<std::size_t>(y.size()), want.size());
  double worst = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    worst =
        std::max(worst, std::fabs(static_cast<double>(y.data()[i]) - static_cast<double>(want[i])) /
                            (1.0 + std::fabs(static_cast<double>(want[i]))));
  }
  EXPECT_LT(worst, 1e-6);
  // Saving again gives PyTorch's bytes back for the bn.* entries.
  const normkit::StateDict again = normkit::state_dict(bn, "bn.");
  for (const auto& kv : again) {
    const normkit::StateTensor* orig = normkit::find_state(file, kv.first);
    ASSERT_TRUE(orig) << kv.first;
    EXPECT_EQ(orig->bytes, kv.second.bytes) << kv.first;
    EXPECT_EQ(orig->shape, kv.second.shape) << kv.first;
  }
}

// ---- 16-bit floats: the conversions ----

TEST(Float16Test, RoundToTiesOverflowSubnormalsAndNaN) {
  using normkit::detail::round_to;
  // Exactly halfway between two bfloat16 values: to the even one.
  EXPECT_EQ(rounded<BF16>(1 + p2(-8)), "0x3f80");
  EXPECT_EQ(rounded<BF16>(1 + 3 * p2(-8)), "0x3f82");
  EXPECT_EQ(rounded<BF16>(-(1 + 3 * p2(-8))), "0xbf82");
  // Just above halfway, where float would land exactly on the tie: rounding through float
  // (Eigen's own double -> bfloat16) gives the even neighbour below, one step gives the one above.
  const double above = 1 + p2(-8) + p2(-40);
  EXPECT_EQ(static_cast<float>(above), static_cast<float>(1 + p2(-8)));
  EXPECT_EQ(hex16(bits(BF16(static_cast<float>(above)))), "0x3f80");  // rounded twice
  EXPECT_EQ(rounded<BF16>(above), "0x3f81");
  EXPECT_EQ(rounded<BF16>(-above), "0xbf81");
  EXPECT_EQ(rounded<BF16>(1 + p2(-8) - p2(-40)), "0x3f80");
  EXPECT_EQ(rounded<F16>(1 + p2(-11)), "0x3c00");
  EXPECT_EQ(rounded<F16>(1 + 3 * p2(-11)), "0x3c02");
  EXPECT_EQ(hex16(bits(F16(static_cast<float>(1 + p2(-11) + p2(-40))))), "0x3c00");
  EXPECT_EQ(rounded<F16>(1 + p2(-11) + p2(-40)), "0x3c01");
  // Zeros keep their sign; doubles far below the smallest subnormal round to zero.
  EXPECT_EQ(rounded<BF16>(0.0), "0x0000");
  EXPECT_EQ(rounded<BF16>(-0.0), "0x8000");
  EXPECT_EQ(rounded<F16>(-1e-300), "0x8000");
  EXPECT_EQ(rounded<BF16>(std::numeric_limits<double>::denorm_min()), "0x0000");
  EXPECT_EQ(rounded<F16>(-std::numeric_limits<double>::denorm_min()), "0x8000");
  // Subnormals: half's smallest is 2^-24, bfloat16's 2^-133.
  EXPECT_EQ(rounded<F16>(p2(-24)), "0x0001");
  EXPECT_EQ(rounded<F16>(p2(-25)), "0x0000");  // tie with 0: even
  EXPECT_EQ(rounded<F16>(p2(-25) + p2(-60)), "0x0001");
  EXPECT_EQ(rounded<F16>(3 * p2(-25)), "0x0002");        // tie: even
  EXPECT_EQ(rounded<F16>(p2(-14) - p2(-25)), "0x0400");  // tie below the smallest normal
  EXPECT_EQ(rounded<F16>(p2(-14) - p2(-25) - p2(-60)), "0x03ff");
  EXPECT_EQ(rounded<BF16>(p2(-133)), "0x0001");
  EXPECT_EQ(rounded<BF16>(p2(-134)), "0x0000");
  // 2^-134 + 2^-160 is 2^-134 in float (a tie, so 0 through float); one step gives 2^-133.
  EXPECT_EQ(static_cast<float>(p2(-134) + p2(-160)), static_cast<float>(p2(-134)));
  EXPECT_EQ(rounded<BF16>(p2(-134) + p2(-160)), "0x0001");
  EXPECT_EQ(rounded<BF16>(-(p2(-134) + p2(-160))), "0x8001");
  EXPECT_EQ(rounded<BF16>(p2(-126)), "0x0080");
  // Overflow: from the largest finite value plus half an ulp (a tie, to even = infinity) up.
  EXPECT_EQ(rounded<F16>(65504), "0x7bff");
  EXPECT_EQ(rounded<F16>(65520 - p2(-30)), "0x7bff");
  EXPECT_EQ(hex16(bits(F16(static_cast<float>(65520 - p2(-30))))), "0x7c00");  // rounded twice
  EXPECT_EQ(rounded<F16>(65520), "0x7c00");
  EXPECT_EQ(rounded<F16>(-65520), "0xfc00");
  EXPECT_EQ(rounded<F16>(1e300), "0x7c00");
  const double bf_max = (2 - p2(-7)) * p2(127);
  const double bf_tie = (2 - p2(-8)) * p2(127);
  EXPECT_EQ(rounded<BF16>(bf_max), "0x7f7f");
  EXPECT_EQ(rounded<BF16>(bf_tie), "0x7f80");
  EXPECT_EQ(rounded<BF16>(bf_tie - p2(87)), "0x7f7f");  // float: the tie, then infinity
  EXPECT_EQ(hex16(bits(BF16(static_cast<float>(bf_tie - p2(87))))), "0x7f80");
  EXPECT_EQ(rounded<BF16>(std::numeric_limits<float>::max()), "0x7f80");
  EXPECT_EQ(rounded<BF16>(-1e300), "0xff80");
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(rounded<BF16>(inf), "0x7f80");
  EXPECT_EQ(rounded<F16>(-inf), "0xfc00");
  // NaN stays NaN: sign and the top payload bits kept, quieted; a signaling NaN whose payload
  // lies below the kept bits does not become infinity.
  EXPECT_EQ(rounded<BF16>(std::numeric_limits<double>::quiet_NaN()), "0x7fc0");
  EXPECT_EQ(rounded<F16>(std::numeric_limits<double>::quiet_NaN()), "0x7e00");
  EXPECT_EQ(rounded<BF16>(from_bits64(0xfff8000000000000u)), "0xffc0");
  EXPECT_EQ(rounded<F16>(from_bits64(0xfff8000000000000u)), "0xfe00");
  EXPECT_EQ(rounded<BF16>(from_bits64(0x7ff0000000000001u)), "0x7fc0");
  EXPECT_EQ(rounded<F16>(from_bits64(0x7ff0000000000001u)), "0x7e00");
  EXPECT_EQ(rounded<BF16>(from_bits64(0x7ffc000000000000u)), "0x7fe0");
  EXPECT_EQ(rounded<F16>(from_bits64(0x7ffc000000000000u)), "0x7f00");
  // float and double: the hardware's conversion, and the identity.
  EXPECT_EQ(round_to<float>(1 + p2(-24) + p2(-40)), 1 + p2(-23));
  EXPECT_EQ(round_to<float>(1 + p2(-24)), 1.0f);
  EXPECT_EQ(round_to<double>(above), above);
}

// Every finite bfloat16 and half value, each tie between neighbours and the doubles next to
// each tie (where rounding through float would land on the tie), both signs.
template <class T>
void check_every_tie() {
  using normkit::detail::round_to;
  using normkit::detail::widen_float16;
  constexpr int kExp = normkit::detail::Float16Format<T>::kExp;
  constexpr int kMan = normkit::detail::Float16Format<T>::kMan;
  constexpr unsigned kInf = ((1u << kExp) - 1) << kMan;
  const double past_max = std::ldexp(1.0, 1 << (kExp - 1));  // 2^(emax + 1)
  int failures = 0;
  auto expect = [&](double x, unsigned want, const char* what) {
    const std::uint16_t got = bits(round_to<T>(x)), got_neg = bits(round_to<T>(-x));
    if (got != want || got_neg != (want | 0x8000u)) {
      if (++failures <= 10) {
        ADD_FAILURE() << what << ": " << std::hexfloat << x << " -> " << hex16(got) << " / "
                      << hex16(got_neg) << ", want " << hex16(static_cast<std::uint16_t>(want));
      }
    }
  };
  for (unsigned lo = 0; lo < kInf; ++lo) {
    const unsigned hi = lo + 1;
    const double a = widen_float16<double, T>(static_cast<std::uint16_t>(lo));
    const double b =
        hi == kInf ? past_max : widen_float16<double, T>(static_cast<std::uint16_t>(hi));
    const double mid = a + (b - a) / 2;  // exact: a few more bits than T has
    expect(a, lo, "value");
    expect(mid, (lo & 1u) ? hi : lo, "tie");
    expect(std::nextafter(mid, b), hi, "just above the tie");
    expect(std::nextafter(mid, a), lo, "just below the tie");
  }
  EXPECT_EQ(failures, 0);
}

TEST(Float16Test, EveryTieRoundsOnceToEven) {
  check_every_tie<BF16>();
  check_every_tie<F16>();
}

// From float, one rounding step is what Eigen's conversion does too.
TEST(Float16Test, AgreesWithEigenFromFloat) {
  for (std::uint64_t u = 0; u < (std::uint64_t{1} << 32); u += 4099) {
    const auto w = static_cast<std::uint32_t>(u);
    float f = 0;
    std::memcpy(&f, &w, 4);
    const auto d = static_cast<double>(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(Eigen::numext::isnan(normkit::detail::round_to<BF16>(d)));
      EXPECT_TRUE(Eigen::numext::isnan(normkit::detail::round_to<F16>(d)));
      continue;
    }
    ASSERT_EQ(bits(normkit::detail::round_to<BF16>(d)), bits(BF16(f))) << std::hexfloat << f;
    ASSERT_EQ(bits(normkit::detail::round_to<F16>(d)), bits(F16(f))) << std::hexfloat << f;
  }
}

template <class T>
void check_widening() {
  using normkit::detail::widen_float16;
  constexpr int kExp = normkit::detail::Float16Format<T>::kExp;
  constexpr int kMan = normkit::detail::Float16Format<T>::kMan;
  for (unsigned p = 0; p < 65536; ++p) {
    const auto h = static_cast<std::uint16_t>(p);
    const float f = widen_float16<float, T>(h);
    const double d = widen_float16<double, T>(h);
    const unsigned e = (p >> kMan) & ((1u << kExp) - 1), m = p & ((1u << kMan) - 1);
    const std::uint64_t sign = p >> 15;
    if (e == (1u << kExp) - 1) {  // infinity, NaN: sign and payload kept, not quieted
      ASSERT_EQ(bits64(f), sign << 31 | 0x7f800000u | std::uint64_t{m} << (23 - kMan)) << p;
      ASSERT_EQ(bits64(d),
                sign << 63 | std::uint64_t{0x7ff} << 52 | std::uint64_t{m} << (52 - kMan))
          << p;
    } else {  // exact: Eigen's conversion to float is exact, float -> double too
      ASSERT_EQ(bits64(f), bits64(static_cast<float>(from_bits<T>(h)))) << p;
      ASSERT_EQ(bits64(d), bits64(static_cast<double>(f))) << p;
      ASSERT_EQ(bits(normkit::detail::round_to<T>(d)), h) << p;
    }
  }
}

TEST(Float16Test, WideningIsExactAndKeepsNaNPayloads) {
  check_widening<BF16>();
  check_widening<F16>();
  // bfloat16 -> float is a 16-bit shift, signaling NaNs included (as torch's).
  for (unsigned p = 0; p < 65536; p += 257) {
    EXPECT_EQ(bits64(normkit::detail::widen_float16<float, BF16>(static_cast<std::uint16_t>(p))),
              std::uint64_t{p} << 16);
  }
}

// ---- 16-bit floats in state dicts ----

TEST(StateDictTest, BF16AndF16RoundTripRawBitsThroughAFile) {
  const std::vector<std::uint16_t> bf = {0x0000, 0x8000, 0x0001, 0x3f81, 0x7f7f,
                                         0x7f80, 0xff80, 0x7fc1, 0xff81, 0xc2f7};
  const std::vector<std::uint16_t> hf = {0x0000, 0x8000, 0x0001, 0x03ff, 0x3c01, 0x7bff,
                                         0x7c00, 0xfc00, 0x7e01, 0xfd01, 0x3555, 0xc000};
  const normkit::StateDict sd{{"bf", normkit::make_state_tensor(from_patterns<BF16>(bf), {2, 5})},
                              {"hf", normkit::make_state_tensor(from_patterns<F16>(hf), {3, 4})}};
  EXPECT_EQ(sd[0].second.dtype, "BF16");
  EXPECT_EQ(sd[1].second.dtype, "F16");
  for (std::size_t k = 0; k < 2; ++k) {  // 2 bytes each, little-endian: the raw bit pattern
    const std::vector<std::uint16_t>& p = k == 0 ? bf : hf;
    std::vector<unsigned char> want;
    for (std::uint16_t u : p) {
      want.push_back(static_cast<unsigned char>(u & 0xffu));
      want.push_back(static_cast<unsigned char>(u >> 8));
    }
    EXPECT_EQ(sd[k].second.bytes, want) << k;
  }
  const std::vector<unsigned char> file = normkit::serialize_safetensors(sd);
  const std::string text(file.begin(), file.end());
  EXPECT_NE(text.find("\"bf\":{\"dtype\":\"BF16\",\"shape\":[2,5],\"data_offsets\":[0,20]}"),
            std::string::npos);
  EXPECT_NE(text.find("\"hf\":{\"dtype\":\"F16\",\"shape\":[3,4],\"data_offsets\":[20,44]}"),
            std::string::npos);
  const std::string path = temp_path("float16");
  normkit::write_safetensors(path, sd);
  const normkit::StateDict back = normkit::read_safetensors(path);
  std::remove(path.c_str());
  EXPECT_TRUE(same_dict(sd, back));
  std::vector<std::uint16_t> got;
  for (BF16 v : normkit::to_vector<BF16>(back[0].second)) got.push_back(bits(v));
  EXPECT_EQ(got, bf);
  got.clear();
  for (F16 v : normkit::to_vector<F16>(back[1].second)) got.push_back(bits(v));
  EXPECT_EQ(got, hf);
  // to_vector wants the dtype exactly; the byte count is 2 x numel.
  EXPECT_THROW(normkit::to_vector<float>(back[0].second), normkit::value_error);
  EXPECT_THROW(normkit::to_vector<BF16>(back[1].second), normkit::value_error);
  normkit::StateDict short_bytes = sd;
  short_bytes[0].second.bytes.pop_back();
  try {
    normkit::serialize_safetensors(short_bytes);
    ADD_FAILURE() << "accepted";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[normkit.write_safetensors] tensor \"bf\": 19 bytes, but BF16 of shape [2, 5] "
              "needs 20");
  }
  EXPECT_THROW(normkit::to_vector<BF16>(short_bytes[0].second), normkit::value_error);
}

// BF16 and F16 into float and double modules: exact (every value is representable), a NaN with
// its sign and payload.
template <class S>
void load_float16_into_wide() {
  normkit::BatchNorm1d<S> bn(4);
  const normkit::StateDict sd{
      {"weight", raw16("BF16", {0x3f81, 0x0001, 0xff80, 0x7f81}, {4})},
      {"bias", raw16("F16", {0x3c01, 0x0001, 0x7bff, 0xfe01}, {4})},
      {"running_mean", raw16("F16", {0x8000, 0x03ff, 0xfc00, 0x4248}, {4})},
      {"running_var", raw16("BF16", {0x4049, 0x0080, 0x7f7f, 0x3eab}, {4})},
      {"num_batches_tracked", normkit::make_state_tensor(std::vector<std::int64_t>{3}, {})}};
  normkit::load_state_dict(bn, sd);
  const double inf = std::numeric_limits<double>::infinity();
  auto same = [](const Eigen::Tensor<S, 1>& got, const std::vector<double>& want, int nan_at,
                 std::uint64_t nan_bits) {
    for (Eigen::Index i = 0; i < got.size(); ++i) {
      const std::uint64_t w =
          i == nan_at ? nan_bits : bits64(static_cast<S>(want[static_cast<std::size_t>(i)]));
      EXPECT_EQ(bits64(got(i)), w) << i;
    }
  };
  const bool f = std::is_same<S, float>::value;
  // 0x7f81: a signaling NaN, not quieted.
  same(bn.weight(), {1 + p2(-7), p2(-133), -inf, 0}, 3, f ? 0x7f810000u : 0x7ff0200000000000u);
  same(bn.bias(), {1 + p2(-10), p2(-24), 65504, 0}, 3, f ? 0xffc02000u : 0xfff8040000000000u);
  same(bn.running_mean(), {-0.0, 1023 * p2(-24), -inf, 3.140625}, -1, 0);
  same(bn.running_var(), {3.140625, p2(-126), (2 - p2(-7)) * p2(127), 0.333984375}, -1, 0);
  EXPECT_EQ(bn.num_batches_tracked(), 3);
}

TEST(StateDictTest, BF16AndF16LoadIntoFloatAndDoubleModulesExactly) {
  load_float16_into_wide<float>();
  load_float16_into_wide<double>();
  // And through a file, into a LayerNorm.
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({2, 2}));
  const std::string path = temp_path("ln_bf16");
  normkit::write_safetensors(path, {{"w", raw16("BF16", {0x3f81, 0xc000, 0x0001, 0x7f7f}, {2, 2})},
                                    {"b", raw16("F16", {0x3c01, 0x8001, 0x0400, 0x7bff}, {4})}});
  const normkit::StateDict file = normkit::read_safetensors(path);
  std::remove(path.c_str());
  normkit::StateDict sd{{"weight", file[0].second}, {"bias", file[1].second}};
  normkit::load_state_dict(ln, sd);
  EXPECT_EQ(ln.weight()(0), static_cast<float>(1 + p2(-7)));
  EXPECT_EQ(ln.weight()(1), -2.0f);
  EXPECT_EQ(ln.weight()(2), static_cast<float>(p2(-133)));
  EXPECT_EQ(ln.weight()(3), static_cast<float>((2 - p2(-7)) * p2(127)));
  EXPECT_EQ(ln.bias()(0), static_cast<float>(1 + p2(-10)));
  EXPECT_EQ(ln.bias()(1), static_cast<float>(-p2(-24)));
  EXPECT_EQ(ln.bias()(2), static_cast<float>(p2(-14)));
  EXPECT_EQ(ln.bias()(3), 65504.0f);
}

// Loads into a bfloat16 module round once, from the stored value; its own BF16 entries are
// copied bit for bit.
TEST(StateDictTest, LoadIntoBFloat16ModuleRoundsOnceFromTheStoredValue) {
  MockNorm<BF16> m(4);
  const double up = 1 + p2(-8) + p2(-40), big = (2 - p2(-8)) * p2(127) - p2(87);
  const double tiny = p2(-134) + p2(-160);
  // Through float, each of these lands on a tie and goes the other way.
  EXPECT_EQ(hex16(bits(BF16(static_cast<float>(up)))), "0x3f80");
  EXPECT_EQ(hex16(bits(BF16(static_cast<float>(big)))), "0x7f80");
  EXPECT_EQ(hex16(bits(BF16(static_cast<float>(tiny)))), "0x0000");
  const normkit::StateDict sd{
      {"weight",
       normkit::make_state_tensor(std::vector<double>{up, big, tiny, 1 + 3 * p2(-8)}, {4})},
      {"bias", normkit::make_state_tensor(
                   std::vector<float>{
                       static_cast<float>(1 + p2(-8)), static_cast<float>(-(1 + p2(-8) + p2(-23))),
                       std::numeric_limits<float>::max(), static_cast<float>(p2(-140))},
                   {4})},
      {"running_mean", raw16("BF16", {0x7f81, 0x8001, 0x3f81, 0xffff}, {4})},
      {"running_var", raw16("F16", {0x3c06, 0x7bff, 0x3c04, 0x0001}, {4})},
      {"num_batches_tracked", normkit::make_state_tensor(std::vector<std::int64_t>{7}, {})}};
  normkit::load_state_dict(m, sd);
  using P = std::vector<std::uint16_t>;
  EXPECT_EQ(patterns_of(m.weight()), (P{0x3f81, 0x7f7f, 0x0001, 0x3f82}));
  EXPECT_EQ(patterns_of(m.bias()), (P{0x3f80, 0xbf81, 0x7f80, 0x0000}));
  EXPECT_EQ(patterns_of(m.running_mean()), (P{0x7f81, 0x8001, 0x3f81, 0xffff}));
  // F16 -> bfloat16 through the exact double: 1 + 3 x 2^-9 up, 65504 up to 2^16, a tie to even.
  EXPECT_EQ(patterns_of(m.running_var()), (P{0x3f81, 0x4780, 0x3f80, 0x3380}));
  EXPECT_EQ(m.num_batches_tracked(), 7);

  // The module's own state dict: BF16, bit for bit, and back.
  const normkit::StateDict own = normkit::state_dict(m, "m.");
  for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(own[i].second.dtype, "BF16") << i;
  EXPECT_EQ(own[2].second.bytes, sd[2].second.bytes);
  MockNorm<BF16> m2(4);
  normkit::load_state_dict(m2, own, "m.");
  EXPECT_TRUE(same_dict(own, normkit::state_dict(m2, "m.")));
}

TEST(StateDictTest, LoadIntoHalfModuleRoundsOnceFromTheStoredValue) {
  MockNorm<F16> m(4);
  const double up = 1 + p2(-11) + p2(-40), big = 65520 - p2(-30), tiny = p2(-25) + p2(-60);
  EXPECT_EQ(hex16(bits(F16(static_cast<float>(up)))), "0x3c00");
  EXPECT_EQ(hex16(bits(F16(static_cast<float>(big)))), "0x7c00");
  EXPECT_EQ(hex16(bits(F16(static_cast<float>(tiny)))), "0x0000");
  const normkit::StateDict sd{
      {"weight",
       normkit::make_state_tensor(std::vector<double>{up, big, tiny, 1 + 3 * p2(-11)}, {4})},
      {"bias", raw16("BF16", {0x3f81, 0x3080, 0x47c3, 0xb380}, {4})},
      {"running_mean", raw16("F16", {0x7c01, 0xfbff, 0x0001, 0x8000}, {4})},
      {"running_var", normkit::make_state_tensor(
                          std::vector<float>{65520.0f, 65519.0f, static_cast<float>(p2(-25)),
                                             static_cast<float>(p2(-25) + p2(-40))},
                          {4})}};
  normkit::load_state_dict(m, sd);  // no num_batches_tracked: kept
  using P = std::vector<std::uint16_t>;
  EXPECT_EQ(patterns_of(m.weight()), (P{0x3c01, 0x7bff, 0x0001, 0x3c02}));
  // BF16 -> half: 1 + 2^-7 exactly, 2^-30 to zero, 99840 to infinity, -2^-24 exactly.
  EXPECT_EQ(patterns_of(m.bias()), (P{0x3c08, 0x0000, 0x7c00, 0x8001}));
  EXPECT_EQ(patterns_of(m.running_mean()), (P{0x7c01, 0xfbff, 0x0001, 0x8000}));
  EXPECT_EQ(patterns_of(m.running_var()), (P{0x7c00, 0x7bff, 0x0000, 0x0001}));
  EXPECT_EQ(m.num_batches_tracked(), 0);
  const normkit::StateDict own = normkit::state_dict(m);
  for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(own[i].second.dtype, "F16") << i;
  EXPECT_EQ(own[4].second.dtype, "I64");
  EXPECT_EQ(own[2].second.bytes, sd[2].second.bytes);
}

// The conversion layer on its own: each dtype into each Scalar.
TEST(StateDictTest, DecodeFloatsConvertsEachDtypeToEachScalar) {
  using normkit::detail::decode_floats;
  const normkit::StateTensor f64 =
      normkit::make_state_tensor(std::vector<double>{1 + p2(-8) + p2(-40)}, {1});
  const normkit::StateTensor f32 =
      normkit::make_state_tensor(std::vector<float>{static_cast<float>(1 + p2(-8))}, {1});
  const normkit::StateTensor bf = raw16("BF16", {0x3f81}, {1});
  const normkit::StateTensor hf = raw16("F16", {0x3c01}, {1});
  EXPECT_EQ(hex16(bits(decode_floats<BF16>(f64, 1)(0))), "0x3f81");
  EXPECT_EQ(hex16(bits(decode_floats<BF16>(f32, 1)(0))), "0x3f80");
  EXPECT_EQ(hex16(bits(decode_floats<BF16>(bf, 1)(0))), "0x3f81");
  EXPECT_EQ(hex16(bits(decode_floats<BF16>(hf, 1)(0))), "0x3f80");
  EXPECT_EQ(hex16(bits(decode_floats<F16>(f64, 1)(0))), "0x3c04");
  EXPECT_EQ(hex16(bits(decode_floats<F16>(f32, 1)(0))), "0x3c04");
  EXPECT_EQ(hex16(bits(decode_floats<F16>(bf, 1)(0))), "0x3c08");
  EXPECT_EQ(hex16(bits(decode_floats<F16>(hf, 1)(0))), "0x3c01");
  EXPECT_EQ(decode_floats<float>(f64, 1)(0), static_cast<float>(1 + p2(-8)));
  EXPECT_EQ(decode_floats<float>(bf, 1)(0), static_cast<float>(1 + p2(-7)));
  EXPECT_EQ(decode_floats<double>(f64, 1)(0), 1 + p2(-8) + p2(-40));
  EXPECT_EQ(decode_floats<double>(hf, 1)(0), 1 + p2(-10));
}

// The modules themselves over Eigen::bfloat16 / Eigen::half (parameters and buffers in that
// type) save BF16 / F16.
TEST(StateDictTest, BFloat16AndHalfModulesSaveBF16AndF16) {
  normkit::LayerNorm<BF16> ln(normkit::LayerNormOptions({2, 2}));
  const normkit::StateDict sd = normkit::state_dict(ln);
  ASSERT_EQ(keys(sd), (std::vector<std::string>{"weight", "bias"}));
  EXPECT_EQ(sd[0].second.dtype, "BF16");
  EXPECT_EQ(sd[0].second.shape, (std::vector<std::int64_t>{2, 2}));
  EXPECT_EQ(sd[0].second.bytes,
            (std::vector<unsigned char>{0x80, 0x3f, 0x80, 0x3f, 0x80, 0x3f, 0x80, 0x3f}));
  normkit::StateDict in = sd;
  in[0].second = normkit::make_state_tensor(std::vector<double>{1 + p2(-8) + p2(-40), 2, 3, 4},
                                            {4});  // LayerNorm's flat weight
  normkit::load_state_dict(ln, in);
  EXPECT_EQ(hex16(bits(ln.weight()(0))), "0x3f81");

  normkit::BatchNorm1d<F16> bn(2);
  bn.set_running_var(tensor_of(std::vector<F16>{from_bits<F16>(0x7c01), from_bits<F16>(0x0001)}));
  bn.set_num_batches_tracked(5);
  const normkit::StateDict bsd = normkit::state_dict(bn, "bn.");
  for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(bsd[i].second.dtype, "F16") << i;
  EXPECT_EQ(bsd[4].second.dtype, "I64");
  const std::string path = temp_path("bn_f16");
  normkit::write_safetensors(path, bsd);
  normkit::BatchNorm1d<F16> back(2);
  normkit::load_safetensors(back, path, "bn.");
  std::remove(path.c_str());
  EXPECT_TRUE(same_dict(bsd, normkit::state_dict(back, "bn.")));
  EXPECT_EQ(patterns_of(back.running_var()), (std::vector<std::uint16_t>{0x7c01, 0x0001}));
}

TEST(StateDictTest, Float16DtypeAndByteCountErrors) {
  normkit::BatchNorm1d<float> bn(2);
  bn.set_weight(ramp<float>(2, 0.5));
  const normkit::StateDict before = normkit::state_dict(bn);
  normkit::StateDict sd = before;
  sd[0].second.dtype = "F8_E4M3";
  sd[0].second.bytes = {0, 0};
  try {
    normkit::load_state_dict(bn, sd);
    ADD_FAILURE() << "accepted";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[normkit.load_state_dict] BatchNorm1d: unsupported dtype \"F8_E4M3\" for weight "
              "(expected F16, BF16, F32 or F64)");
  }
  sd[0].second = raw16("BF16", {0x3f80, 0x4000}, {2});
  sd[0].second.bytes.pop_back();
  try {
    normkit::load_state_dict(bn, sd);
    ADD_FAILURE() << "accepted";
  } catch (const normkit::value_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[normkit.load_state_dict] BatchNorm1d: weight: 3 bytes, but BF16 of shape [2] "
              "needs 4");
  }
  EXPECT_TRUE(same_dict(before, normkit::state_dict(bn)));
}

}  // namespace
