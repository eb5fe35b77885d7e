// A consumer of normkit::compiled: BatchNorm2d forward and backward in training mode must give
// every channel a mean of about 0 and a variance of about 1, and a LayerNorm row (other.cpp)
// a sum of about 0. Exits non-zero otherwise.
#include <cmath>
#include <cstdio>

#include <normkit/normkit.hpp>

#if !defined(NORMKIT_SEPARATE_COMPILATION)
#error "normkit::compiled must define NORMKIT_SEPARATE_COMPILATION"
#endif

double layer_norm_row_sum();

int main() {
  constexpr int kN = 2, kC = 3, kH = 4, kW = 5;
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(kN, kC, kH, kW);
  for (int i = 0; i < static_cast<int>(x.size()); ++i) {
    x.data()[i] = static_cast<float>((i * 37) % 23) * 0.25f + 3.0f;
  }
  normkit::BatchNorm2d<float> bn{normkit::BatchNormOptions{kC}};
  const Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);
  const auto g = bn.backward(y);  // dL/dx of L = sum(y^2)/2 is 0 at a normalized y
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
  double gmax = 0;
  for (int i = 0; i < static_cast<int>(g.input.size()); ++i)
    gmax = std::fmax(gmax, std::fabs(static_cast<double>(g.input.data()[i])));
  const double ln = layer_norm_row_sum();
  std::printf("max |dx| %.3g, LayerNorm row sum %.3g, isa %s\n", gmax, ln,
              normkit::isa_name(normkit::isa()));
  if (!(gmax < 1e-4) || !(std::fabs(ln) < 1e-9))
    ++bad;
  std::printf("normkit compiled mode: %s\n", bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}
