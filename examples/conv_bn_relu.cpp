// conv_bn_relu: a Conv2d -> BatchNorm2d -> ReLU stack from training to deployment.
//
//   x (8, 8, 32, 32) -> Conv2d(8 -> 32, 3x3, padding 1) -> BatchNorm2d(32) -> ReLU -> y
//
// 1. Training: a few SGD steps on synthetic data (the target is a fixed "teacher" stack's
//    output), with BatchNorm's fused forward and backward: bn.forward_fused(z, relu) and
//    bn.backward_fused(z, y, dy, relu) (the ReLU mask comes from y).
// 2. Deployment, BatchNorm in evaluation mode, three ways that must agree:
//    - unfused: conv, bn.forward(z), then ReLU as a separate pass;
//    - fused:   conv, bn.forward_fused(z, relu): one pass over z;
//    - folded:  normkit::fold_batch_norm(W, b, bn) gives W', b', and the network is conv'
//               followed by ReLU: no BatchNorm left at all.
//    Prints the largest differences and the time of each variant; exits 1 when the loss did
//    not fall or the variants disagree beyond float rounding.
//
// The convolution (im2col + one Eigen matrix product per sample) is example code, not
// normkit API.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <Eigen/Dense>

#include <normkit/normkit.hpp>

namespace {

using Index = Eigen::Index;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Tensor4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;  // (N, C, H, W)
using Tensor1 = Eigen::Tensor<float, 1>;

constexpr Index kN = 8, kCin = 8, kCout = 32, kH = 32, kW = 32, kK = 3;
constexpr int kSteps = 30;
constexpr float kLearningRate = 20.0f;  // loss is a mean over 262144 elements

class Rng {  // std::mt19937 turned into variates here: the same numbers everywhere
 public:
  explicit Rng(std::uint32_t seed) : gen_(seed) {}
  float uniform() { return static_cast<float>(gen_() >> 8) * (1.0f / 16777216.0f); }
  float normal() {
    const double u1 = 1.0 - static_cast<double>(uniform()), u2 = static_cast<double>(uniform());
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }

 private:
  std::mt19937 gen_;
};

/// A 3x3 convolution, stride 1, padding 1: weight (Cout, Cin, 3, 3), bias (Cout).
struct Conv {
  Tensor4 weight{kCout, kCin, kK, kK};
  Tensor1 bias{kCout};

  /// The (Cin*9, H*W) patch matrix of sample n (im2col).
  static Mat patches(const Tensor4& x, Index n) {
    Mat col(kCin * kK * kK, kH * kW);
    for (Index c = 0; c < kCin; ++c) {
      for (Index ky = 0; ky < kK; ++ky) {
        for (Index kx = 0; kx < kK; ++kx) {
          const Index row = (c * kK + ky) * kK + kx;
          for (Index i = 0; i < kH; ++i) {
            for (Index j = 0; j < kW; ++j) {
              const Index yi = i + ky - 1, xj = j + kx - 1;
              col(row, i * kW + j) =
                  (yi < 0 || yi >= kH || xj < 0 || xj >= kW) ? 0.0f : x(n, c, yi, xj);
            }
          }
        }
      }
    }
    return col;
  }

  Eigen::Map<const Mat> w_mat() const { return {weight.data(), kCout, kCin * kK * kK}; }

  /// z = conv(x) into (N, Cout, H, W); cols keeps the patch matrices for the backward.
  void forward(const Tensor4& x, Tensor4& z, std::vector<Mat>* cols = nullptr) const {
    z.resize(kN, kCout, kH, kW);
    if (cols)
      cols->resize(static_cast<std::size_t>(kN));
    for (Index n = 0; n < kN; ++n) {
      Mat col = patches(x, n);
      Eigen::Map<Mat> out(z.data() + n * kCout * kH * kW, kCout, kH * kW);
      out.noalias() = w_mat() * col;
      for (Index c = 0; c < kCout; ++c) out.row(c).array() += bias(c);
      if (cols)
        (*cols)[static_cast<std::size_t>(n)] = std::move(col);
    }
  }

  /// SGD step from dL/dz (the first layer: no dL/dx needed).
  void step(const Tensor4& dz, const std::vector<Mat>& cols, float lr) {
    Mat dw = Mat::Zero(kCout, kCin * kK * kK);
    for (Index n = 0; n < kN; ++n) {
      Eigen::Map<const Mat> g(dz.data() + n * kCout * kH * kW, kCout, kH * kW);
      dw.noalias() += g * cols[static_cast<std::size_t>(n)].transpose();
      for (Index c = 0; c < kCout; ++c) bias(c) -= lr * g.row(c).sum();
    }
    Eigen::Map<Mat>(weight.data(), kCout, kCin * kK * kK) -= lr * dw;
  }
};

void relu_inplace(Tensor4& t) {
  t = t.cwiseMax(0.0f);  // Eigen's vectorized max (a scalar loop may branch per element)
}

double max_abs_diff(const Tensor4& a, const Tensor4& b) {
  double m = 0;
  for (Index i = 0; i < a.size(); ++i)
    m = std::max(m, std::abs(static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i])));
  return m;
}

double max_abs(const Tensor4& a) {
  double m = 0;
  for (Index i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a.data()[i])));
  return m;
}

/// Best-of-10 wall time of f in milliseconds.
template <class F>
double time_ms(F&& f) {
  double best = 1e30;
  for (int r = 0; r < 10; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

}  // namespace

int main() {
  Rng rng(7);
  Tensor4 x(kN, kCin, kH, kW);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = 2.0f + 3.0f * rng.normal();  // offset, scale

  Conv conv, teacher;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kCin * kK * kK));
  for (Index i = 0; i < conv.weight.size(); ++i) conv.weight.data()[i] = scale * rng.normal();
  for (Index i = 0; i < teacher.weight.size(); ++i) teacher.weight.data()[i] = scale * rng.normal();
  conv.bias.setZero();
  teacher.bias.setZero();
  // The target: the teacher's conv, normalized per channel and ReLU'd (a reachable target).
  Tensor4 target;
  {
    normkit::BatchNorm2d<float> tbn(kCout);
    teacher.forward(x, target);
    target = tbn.forward_fused(target, normkit::Activation::relu);
  }

  // ---- 1. training ----
  normkit::BatchNorm2d<float> bn(kCout);  // momentum 0.1, eps 1e-5, affine, running stats
  Tensor4 z, y, dy(kN, kCout, kH, kW);
  std::vector<Mat> cols;
  double first_loss = 0, loss = 0;
  const float inv_numel = 1.0f / static_cast<float>(kN * kCout * kH * kW);
  for (int step = 0; step < kSteps; ++step) {
    conv.forward(x, z, &cols);
    y = bn.forward_fused(z, normkit::Activation::relu);
    loss = 0;
    for (Index i = 0; i < y.size(); ++i) {
      const float d = y.data()[i] - target.data()[i];
      loss += 0.5 * static_cast<double>(d) * static_cast<double>(d);
      dy.data()[i] = d * inv_numel;  // loss = mean over every element of (y - target)^2 / 2
    }
    loss /= static_cast<double>(y.size());
    if (step == 0)
      first_loss = loss;
    if (step % 5 == 0 || step == kSteps - 1)
      std::printf("step %2d  loss %.4f\n", step, loss);
    const auto g = bn.backward_fused(z, y, dy, normkit::Activation::relu);  // dz = g.input
    conv.step(g.input, cols, kLearningRate);
    Tensor1 w = bn.weight(), b = bn.bias();
    for (Index c = 0; c < kCout; ++c) {
      w(c) -= kLearningRate * g.weight(c);
      b(c) -= kLearningRate * g.bias(c);
    }
    bn.set_weight(w);
    bn.set_bias(b);
  }

  // ---- 2. deployment ----
  bn.eval();
  Tensor4 y_unfused, y_fused, y_folded, zz;
  auto unfused = [&] {
    conv.forward(x, zz);
    bn.forward(zz, y_unfused);
    relu_inplace(y_unfused);
  };
  auto fused = [&] {
    conv.forward(x, zz);
    bn.forward_fused(zz, normkit::Activation::relu, y_fused);
  };
  const auto folded_params = normkit::fold_batch_norm(conv.weight, conv.bias, bn);
  Conv folded;
  folded.weight = folded_params.weight;
  folded.bias = folded_params.bias;
  auto run_folded = [&] {
    folded.forward(x, y_folded);
    relu_inplace(y_folded);
  };
  Tensor4 bn_only_in;
  conv.forward(x, bn_only_in);
  Tensor4 bn_only_out(bn_only_in.dimensions());
  const double t_unfused = time_ms(unfused), t_fused = time_ms(fused),
               t_folded = time_ms(run_folded);
  const double t_bn = time_ms([&] {
    bn.forward(bn_only_in, bn_only_out);
    relu_inplace(bn_only_out);
  });
  const double t_bn_fused =
      time_ms([&] { bn.forward_fused(bn_only_in, normkit::Activation::relu, bn_only_out); });

  const double mag = max_abs(y_unfused);
  const double d_fused = max_abs_diff(y_fused, y_unfused);
  const double d_folded = max_abs_diff(y_folded, y_unfused);
  std::printf("\nloss %.4f -> %.4f after %d steps\n", first_loss, loss, kSteps);
  std::printf("evaluation, max |y| = %.3f\n", mag);
  std::printf("  unfused (conv, bn.forward, relu)  %7.3f ms\n", t_unfused);
  std::printf("  fused   (conv, bn.forward_fused)  %7.3f ms   max |diff| %.3g\n", t_fused, d_fused);
  std::printf("  folded  (conv', relu)             %7.3f ms   max |diff| %.3g\n", t_folded,
              d_folded);
  std::printf("  the norm + ReLU alone: forward then a ReLU pass %.3f ms, forward_fused %.3f ms\n",
              t_bn, t_bn_fused);

  bool ok = true;
  if (!(loss < 0.7 * first_loss)) {
    std::printf("FAIL: the loss did not fall by 30%%\n");
    ok = false;
  }
  // fused: the same affine and the same max in one pass: equal to float rounding (in fact
  // bit for bit on the float path). folded: W' and b' are rounded once to float and the
  // product sums 72 terms in another order: a few float roundings of |y|.
  if (!(d_fused <= 1e-6 * (1.0 + mag))) {
    std::printf("FAIL: fused differs from unfused\n");
    ok = false;
  }
  if (!(d_folded <= 1e-4 * (1.0 + mag))) {
    std::printf("FAIL: folded differs from unfused\n");
    ok = false;
  }
  std::printf(ok ? "OK\n" : "MISMATCH\n");
  return ok ? 0 : 1;
}
