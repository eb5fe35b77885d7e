// quickstart: BatchNorm2d in training mode, checked by hand.
// y = (x - mean_c) / sqrt(var_c + eps) over (N, H, W) with the biased variance; with
// momentum 1 the running statistics become the batch mean and the unbiased batch variance.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <normkit/normkit.hpp>

int main() {
  const Eigen::Index N = 2, C = 3, H = 4, W = 4;
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(N, C, H, W);
  std::mt19937 gen(42);
  std::normal_distribution<float> normal(1.5f, 2.0f);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);

  normkit::BatchNorm2d<float> bn(normkit::BatchNormOptions(C).momentum(1.0));
  const Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);  // training mode

  // The same by hand, in double.
  const double eps = bn.options().eps();
  const double count = static_cast<double>(N * H * W);
  std::vector<double> mean(C, 0.0), var(C, 0.0);
  for (Eigen::Index c = 0; c < C; ++c) {
    double s = 0.0, ss = 0.0;
    for (Eigen::Index n = 0; n < N; ++n)
      for (Eigen::Index h = 0; h < H; ++h)
        for (Eigen::Index w = 0; w < W; ++w) s += x(n, c, h, w);
    const double m = s / count;
    for (Eigen::Index n = 0; n < N; ++n)
      for (Eigen::Index h = 0; h < H; ++h)
        for (Eigen::Index w = 0; w < W; ++w) ss += (x(n, c, h, w) - m) * (x(n, c, h, w) - m);
    mean[static_cast<std::size_t>(c)] = m;
    var[static_cast<std::size_t>(c)] = ss / count;  // biased
  }

  double max_diff = 0.0;
  std::printf("   n c h w          x     module       hand\n");
  for (Eigen::Index n = 0; n < N; ++n)
    for (Eigen::Index c = 0; c < C; ++c)
      for (Eigen::Index h = 0; h < H; ++h)
        for (Eigen::Index w = 0; w < W; ++w) {
          const auto cc = static_cast<std::size_t>(c);
          const double ref = (x(n, c, h, w) - mean[cc]) / std::sqrt(var[cc] + eps);
          max_diff = std::max(max_diff, std::abs(y(n, c, h, w) - ref));
          if (h == 0 && w < 2) {
            std::printf("  %2ld %ld %ld %ld %10.6f %10.6f %10.6f\n", static_cast<long>(n),
                        static_cast<long>(c), static_cast<long>(h), static_cast<long>(w),
                        static_cast<double>(x(n, c, h, w)), static_cast<double>(y(n, c, h, w)),
                        ref);
          }
        }
  std::printf("largest |module - hand| = %.3g\n", max_diff);

  // momentum 1: running = batch statistics (unbiased variance, count / (count - 1)).
  double max_rel = 0.0;
  std::printf("   c   running_mean     batch mean    running_var  unbiased var\n");
  for (Eigen::Index c = 0; c < C; ++c) {
    const auto cc = static_cast<std::size_t>(c);
    const double unbiased = var[cc] * count / (count - 1.0);
    const double rm = bn.running_mean()(c), rv = bn.running_var()(c);
    std::printf("  %2ld %14.7f %14.7f %14.7f %13.7f\n", static_cast<long>(c), rm, mean[cc], rv,
                unbiased);
    max_rel = std::max(max_rel, std::abs(rm - mean[cc]) / std::max(std::abs(mean[cc]), 1e-12));
    max_rel = std::max(max_rel, std::abs(rv - unbiased) / unbiased);
  }
  std::printf("largest relative running-stat difference = %.3g\n", max_rel);

  if (max_diff > 1e-5 || max_rel > 1e-6) {
    std::printf("FAIL\n");
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
