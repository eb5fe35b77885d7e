// state_dict / load_state_dict and safetensors I/O: PyTorch's keys and order, bit-exact round
// trips for every module type, errors that leave the module unchanged, and a file written by
// libtorch (tools/safetensors/write_fixture.cpp) reproduced by normkit::BatchNorm2d<float>.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/normkit.hpp>
#include <normkit/safetensors.hpp>
#include <normkit/state_dict.hpp>

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

template <class S>
bool same_bits(const Eigen::Tensor<S, 1>& a, const Eigen::Tensor<S, 1>& b) {
  return a.size() == b.size() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(S)) == 0);
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
  EXPECT_TRUE(same_bits(a.weight(), b.weight())) << tag;
  if constexpr (!normkit::detail::is_rms_norm<M>::value) {
    EXPECT_TRUE(same_bits(a.bias(), b.bias())) << tag;
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
      [] { return normkit::RMSNorm<double>(normkit::RMSNormOptions({3, 4})); }, "rms");
}

TEST(StateDictTest, RMSNormRejectsABias) {
  normkit::RMSNorm<float> rms(normkit::RMSNormOptions({4}));
  normkit::StateDict sd{
      {"weight", normkit::make_state_tensor(std::vector<float>{1, 2, 3, 4}, {4})},
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
  EXPECT_TRUE(same_bits(dst.weight(), src.weight()));
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

}  // namespace
