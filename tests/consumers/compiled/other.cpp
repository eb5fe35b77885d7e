// The second translation unit of the compiled-mode consumer: a LayerNorm, double.
#include <normkit/normkit.hpp>

double layer_norm_row_sum() {
  Eigen::Tensor<double, 2, Eigen::RowMajor> x(2, 8);
  for (int i = 0; i < 16; ++i) x.data()[i] = 1000.0 + i % 5;
  normkit::LayerNorm<double> ln{normkit::LayerNormOptions{{8}}};
  const Eigen::Tensor<double, 2, Eigen::RowMajor> y = ln.forward(x);
  double s = 0;
  for (int i = 0; i < 8; ++i) s += y(0, i);
  return s;  // the mean of a normalized row is 0
}
