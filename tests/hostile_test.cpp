// Hostile shapes (issue #5): zero-size dims in every position, extents whose product
// overflows Eigen::Index, TensorMaps over a null pointer with zero size. Each either works
// with a well-defined (empty) result or throws the documented exception with the module
// state unchanged; nothing reads memory it does not own (the suite also runs under ASan).
#include <array>
#include <limits>
#include <string>

#include <gtest/gtest.h>

#include <normkit/normkit.hpp>

namespace {

using Row4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
using Col4 = Eigen::Tensor<float, 4, Eigen::ColMajor>;

template <class Tensor>
Tensor filled(const std::array<Eigen::Index, 4>& d) {
  Tensor t(d);
  t.setConstant(1.5f);
  return t;
}

// Runs forward and backward on an empty input and checks the shapes of what comes back.
template <class Module, class Tensor>
void expect_empty_ok(Module m, const Tensor& x, const char* what) {
  SCOPED_TRACE(what);
  for (bool training : {true, false}) {
    training ? m.train() : m.eval();
    Tensor y;
    ASSERT_NO_THROW(m.forward(x, y));
    for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(y.dimension(i), x.dimension(i));
    // dy: any empty tensor of the same shape; a training forward kept the (empty) input.
    auto g = training ? m.backward(x) : m.backward(x, x);
    for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(g.input.dimension(i), x.dimension(i));
    for (Eigen::Index i = 0; i < g.weight.size(); ++i) EXPECT_EQ(g.weight(i), 0.0f);
    for (Eigen::Index i = 0; i < g.bias.size(); ++i) EXPECT_EQ(g.bias(i), 0.0f);
  }
}

TEST(HostileTest, ZeroSizeDimsInEveryPosition) {
  const std::array<std::array<Eigen::Index, 4>, 4> shapes = {
      {{{0, 4, 3, 5}}, {{2, 4, 0, 5}}, {{2, 4, 3, 0}}, {{0, 4, 0, 0}}}};
  for (const auto& d : shapes) {
    const std::string s =
        std::to_string(d[0]) + "x4x" + std::to_string(d[2]) + "x" + std::to_string(d[3]);
    expect_empty_ok(normkit::BatchNorm2d<float>(4), filled<Row4>(d), ("BatchNorm2d " + s).c_str());
    expect_empty_ok(normkit::BatchNorm2d<float>(4), filled<Col4>(d),
                    ("BatchNorm2d ColMajor " + s).c_str());
    expect_empty_ok(normkit::InstanceNorm2d<float>(normkit::InstanceNormOptions(4).affine(true)),
                    filled<Row4>(d), ("InstanceNorm2d " + s).c_str());
    expect_empty_ok(normkit::GroupNorm<float>(normkit::GroupNormOptions(2, 4)), filled<Row4>(d),
                    ("GroupNorm " + s).c_str());
    expect_empty_ok(normkit::LayerNorm<float>(normkit::LayerNormOptions({d[2], d[3]})),
                    filled<Row4>(d), ("LayerNorm " + s).c_str());
  }
  // Zero channels: an empty module on an empty channel axis.
  expect_empty_ok(normkit::BatchNorm2d<float>(0), filled<Row4>({2, 0, 3, 3}), "BatchNorm2d(0)");
  expect_empty_ok(normkit::GroupNorm<float>(normkit::GroupNormOptions(1, 0)),
                  filled<Row4>({2, 0, 3, 3}), "GroupNorm(1, 0)");
}

TEST(HostileTest, EmptyBatchBumpsCounterButNotStatistics) {
  normkit::BatchNorm2d<float> bn(normkit::BatchNormOptions(4).momentum(std::nullopt));
  const Row4 empty = filled<Row4>({0, 4, 3, 3});
  bn.forward(empty);
  EXPECT_EQ(bn.num_batches_tracked(), 1);
  for (int c = 0; c < 4; ++c) {
    EXPECT_EQ(bn.running_mean()(c), 0.0f);
    EXPECT_EQ(bn.running_var()(c), 1.0f);
  }
}

TEST(HostileTest, ExtentProductOverflowIsAShapeError) {
  float dummy[4] = {0, 0, 0, 0};
  const Eigen::Index huge = Eigen::Index{1} << 31;
  Eigen::TensorMap<const Row4> x(dummy, huge, 4, huge, huge);  // 2^95 elements
  normkit::BatchNorm2d<float> bn(4);
  const auto before_mean = bn.running_mean();
  try {
    (void)bn.forward(x);
    FAIL() << "expected shape_error";
  } catch (const normkit::shape_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("[normkit.BatchNorm2d]"), std::string::npos) << what;
    EXPECT_NE(what.find("Eigen::Index"), std::string::npos) << what;
    EXPECT_NE(what.find(std::to_string(huge)), std::string::npos) << what;
  }
  EXPECT_EQ(bn.num_batches_tracked(), 0);
  for (int c = 0; c < 4; ++c) EXPECT_EQ(bn.running_mean()(c), before_mean(c));
  // The overflow check comes first, before the trailing dims are compared.
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({3}));
  try {
    (void)ln.forward(x);
    FAIL() << "expected shape_error";
  } catch (const normkit::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("Eigen::Index"), std::string::npos) << e.what();
  }
}

TEST(HostileTest, NullTensorMapWithZeroSize) {
  Eigen::TensorMap<const Row4> x(static_cast<const float*>(nullptr), 0, 4, 3, 3);
  Eigen::TensorMap<Row4> y(static_cast<float*>(nullptr), 0, 4, 3, 3);
  normkit::BatchNorm2d<float> bn(4);
  EXPECT_NO_THROW(bn.forward(x, y));
  EXPECT_EQ(bn.num_batches_tracked(), 1);
  auto g = bn.backward(x, x);
  EXPECT_EQ(g.input.size(), 0);
  normkit::LayerNorm<float> ln(normkit::LayerNormOptions({3, 3}));
  EXPECT_NO_THROW(ln.forward(x, y));
  normkit::GroupNorm<float> gn(normkit::GroupNormOptions(2, 4));
  EXPECT_NO_THROW(gn.forward(x, y));
  normkit::InstanceNorm2d<float> in(4);
  EXPECT_NO_THROW(in.forward(x, y));
  // A null map whose dims claim elements is the caller's bug (as for any TensorMap), but a
  // shape mismatch against it is still reported before anything is read.
  Eigen::TensorMap<const Row4> bad(static_cast<const float*>(nullptr), 2, 5, 3, 3);
  EXPECT_THROW(bn.forward(bad, y), normkit::shape_error);
}

}  // namespace
