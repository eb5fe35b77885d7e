// A consumer of normkit::normkit: BatchNorm2d in training mode on a small tensor must give
// every channel a mean of about 0 (and a variance of about 1). Exits non-zero otherwise.
#include <cmath>
#include <cstdio>

#include <unsupported/Eigen/CXX11/Tensor>

#include <normkit/normkit.hpp>

int main() {
  constexpr int kN = 2, kC = 3, kH = 4, kW = 5;
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(kN, kC, kH, kW);
  for (int i = 0; i < static_cast<int>(x.size()); ++i) {
    x.data()[i] = static_cast<float>((i * 37) % 23) * 0.25f + 3.0f;
  }
  normkit::BatchNorm2d<float> bn(kC);
  const Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);
  int bad = 0;
  for (int c = 0; c < kC; ++c) {
    double sum = 0, sq = 0;
    for (int n = 0; n < kN; ++n)
      for (int h = 0; h < kH; ++h)
        for (int w = 0; w < kW; ++w) {
          sum += static_cast<double>(y(n, c, h, w));
          sq += static_cast<double>(y(n, c, h, w)) * static_cast<double>(y(n, c, h, w));
        }
    const double m = kN * kH * kW;
    const double mean = sum / m, var = sq / m - mean * mean;
    std::printf("channel %d: mean %.3g var %.6f\n", c, mean, var);
    if (!(std::fabs(mean) < 1e-5) || !(std::fabs(var - 1.0) < 1e-3))
      ++bad;
  }
  std::printf("normkit %d.%d.%d: %s\n", NORMKIT_VERSION_MAJOR, NORMKIT_VERSION_MINOR,
              NORMKIT_VERSION_PATCH, bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}
